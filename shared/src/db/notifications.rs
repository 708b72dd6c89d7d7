//! Stored notifications (contract §4.1). Each is written in the same
//! transaction as the state change it reports, so a notification exists if
//! and only if the change committed.

use super::jobs::{JOB_SELECT, JobRow, OutputRow};
use super::{Result, Store, Tx, from_json, to_json};
use crate::time::now_ms;

#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub id: i64,
    pub account_id: String,
    pub name: String,
    pub data: serde_json::Value,
    pub created_at: i64,
}

/// Inserts a notification for `account_id`.
pub(crate) async fn insert(
    tx: &mut Tx,
    account_id: &str,
    name: &str,
    job_id: Option<&str>,
    data: &serde_json::Value,
) -> Result<i64> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO notifications (account_id, name, job_id, data, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(account_id)
    .bind(name)
    .bind(job_id)
    .bind(to_json(data)?)
    .bind(now_ms())
    .fetch_one(&mut **tx)
    .await?;
    Ok(id)
}

/// `batch_edit` for the job's current state (read inside the transaction).
pub(crate) async fn notify_job(tx: &mut Tx, job_id: &str) -> Result<()> {
    let sql = format!("{JOB_SELECT} WHERE j.id = $1");
    let job = sqlx::query_as::<_, JobRow>(&sql)
        .bind(job_id)
        .fetch_one(&mut **tx)
        .await?;
    let data = serde_json::json!({
        "id_task": job.id,
        "job_id": job.id,
        "job_type": job.job_type,
        "status": job.status,
        "progress": job.progress(),
        "total_images": job.total_outputs,
        "processed_images": job.processed(),
        "error_message": job.error_message,
    });
    insert(tx, &job.account_id, "batch_edit", Some(job_id), &data).await?;
    Ok(())
}

/// `image_result` for an output that reached a terminal state. Object keys
/// are stored, not URLs: readers sign URLs when they render the event.
pub(crate) async fn notify_output(tx: &mut Tx, account_id: &str, o: &OutputRow) -> Result<()> {
    let data = serde_json::json!({
        "id_task": o.job_id,
        "job_id": o.job_id,
        "image_result_id": o.id,
        "image_index": o.instruction_index,
        "group_index": o.variation_index,
        "version": o.version,
        "status": o.status().public(),
        "model_used": o.model_used,
        "error_message": o.error_message,
        "output_keys": {"full_size": o.full_key, "thumbnail": o.thumb_key},
    });
    insert(tx, account_id, "image_result", Some(&o.job_id), &data).await?;
    Ok(())
}

impl Store {
    /// Undeleted notifications of an account newer than `after_id` and not
    /// older than `max_age_ms`, oldest first.
    pub async fn notifications(
        &self,
        account_id: &str,
        after_id: i64,
        max_age_ms: i64,
    ) -> Result<Vec<Notification>> {
        let rows: Vec<(i64, String, String, String, i64)> = sqlx::query_as(
            "SELECT id, account_id, name, data, created_at FROM notifications \
             WHERE account_id = $1 AND id > $2 AND deleted_at IS NULL AND created_at >= $3 ORDER BY id",
        )
        .bind(account_id)
        .bind(after_id)
        .bind(now_ms() - max_age_ms)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(id, account_id, name, data, created_at)| {
                Ok(Notification {
                    id,
                    account_id,
                    name,
                    data: from_json(&data)?,
                    created_at,
                })
            })
            .collect()
    }
}
