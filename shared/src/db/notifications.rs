//! Stored notifications (contract §4.1). Each is written in the same
//! transaction as the state change it reports, so a notification exists if
//! and only if the change committed.

use super::rows::{JOB_SELECT, JobRow, JobState, OutputRow, progress};
use super::{Result, Store, Tx, from_json, to_json};
use crate::domain::{JobSpec, JobStatus, JobType};
use crate::time::now_ms;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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

/// What a webhook delivery of a notification needs besides its body.
#[derive(Debug, Clone)]
pub struct RelayedDelivery {
    pub notification_id: i64,
    /// The exact JSON every attempt sends and signs.
    pub body: String,
}

/// What a `batch_edit` notification (contract §4.1) reports of a job.
struct BatchEdit<'a> {
    job_id: &'a str,
    job_type: JobType,
    status: JobStatus,
    progress: f64,
    total: i64,
    processed: i64,
    error_message: Option<&'a str>,
    post_processing_status: Option<JobStatus>,
}

impl<'a> BatchEdit<'a> {
    fn of_row(job: &'a JobRow) -> Self {
        BatchEdit {
            job_id: &job.id,
            job_type: job.job_type,
            status: job.status,
            progress: job.progress(),
            total: job.total_outputs,
            processed: job.processed(),
            error_message: job.error_message.as_deref(),
            post_processing_status: job.post_processing_status,
        }
    }

    fn of_state(job: &'a JobState) -> Self {
        let processed = job.completed_outputs + job.failed_outputs;
        BatchEdit {
            job_id: &job.id,
            job_type: job.job_type,
            status: job.status,
            progress: progress(job.status, job.total_outputs, processed),
            total: job.total_outputs,
            processed,
            error_message: job.error_message.as_deref(),
            post_processing_status: job.post_processing_status,
        }
    }

    /// Stores it for `account_id`, the job's owner.
    async fn write(&self, tx: &mut Tx, account_id: &str) -> Result<()> {
        insert(
            tx,
            account_id,
            "batch_edit",
            Some(self.job_id),
            &self.data(),
        )
        .await?;
        Ok(())
    }

    fn data(&self) -> serde_json::Value {
        serde_json::json!({
            "id_task": self.job_id,
            "job_id": self.job_id,
            "job_type": self.job_type,
            "status": self.status,
            "progress": self.progress,
            "total_images": self.total,
            "processed_images": self.processed,
            "error_message": self.error_message,
            "post_processing_status": self.post_processing_status,
        })
    }
}

/// `batch_edit` for the job's current state (read inside the transaction);
/// nothing for a quiet kind.
pub(crate) async fn notify_job(tx: &mut Tx, job_id: &str) -> Result<()> {
    let sql = format!("{JOB_SELECT} WHERE j.id = $1");
    let job = sqlx::query_as::<_, JobRow>(&sql)
        .bind(job_id)
        .fetch_one(&mut **tx)
        .await?;
    if job.job_type.quiet() {
        return Ok(());
    }
    BatchEdit::of_row(&job).write(tx, &job.account_id).await?;
    // A face replacement leaves the identity's status as it is: only the
    // job's own batch_edit events tell its progress.
    if let JobSpec::IdentityPreprocessing(spec) = &job.spec
        && !spec.replaces
        && let Some(code) = &job.identity_code
    {
        notify_identity(tx, &job, code).await?;
    }
    Ok(())
}

/// `batch_edit` for the state a transition read back from the statement
/// that changed the job ([`JobState`]); nothing for a quiet kind. A
/// preprocessing job also reports its identity's state, which
/// [`notify_job`] reads with the row.
pub(crate) async fn notify_state(tx: &mut Tx, job: &JobState) -> Result<()> {
    if job.job_type.quiet() {
        return Ok(());
    }
    if job.job_type == JobType::IdentityPreprocessing {
        return notify_job(tx, &job.id).await;
    }
    BatchEdit::of_state(job).write(tx, &job.account_id).await
}

/// The state of a job admission has just written (pending, nothing
/// processed), from what admission knows rather than a read of the row.
pub(crate) fn created_state(
    account_id: &str,
    job_id: &str,
    spec: &JobSpec,
    total_outputs: i64,
) -> JobState {
    let post_process = spec.post_process();
    JobState {
        id: job_id.to_string(),
        account_id: account_id.to_string(),
        job_type: spec.job_type(),
        status: JobStatus::Pending,
        total_outputs,
        completed_outputs: 0,
        failed_outputs: 0,
        counts_against_cap: i64::from(spec.job_type().counts_against_cap()),
        should_post_process: i64::from(post_process),
        error_message: None,
        post_processing_status: post_process.then_some(JobStatus::Pending),
    }
}

/// The `data` of the `batch_edit` a job in `state` reports.
pub(crate) fn batch_edit_data(state: &JobState) -> serde_json::Value {
    BatchEdit::of_state(state).data()
}

/// The `batch_edit` of a job admission has just written ([`created_state`]).
pub(crate) async fn notify_created(
    tx: &mut Tx,
    account_id: &str,
    job_id: &str,
    spec: &JobSpec,
    total_outputs: i64,
) -> Result<()> {
    notify_state(tx, &created_state(account_id, job_id, spec, total_outputs)).await
}

/// `identity_preprocessing` (contract §4.1) for a preprocessing job's
/// status change: the identity's view of it.
async fn notify_identity(tx: &mut Tx, job: &JobRow, code: &str) -> Result<()> {
    let status = crate::domain::identity::preprocessing_status(Some(job.status));
    let (record, output_error): (Option<String>, Option<String>) = if job.status.is_terminal() {
        sqlx::query_as(
            "SELECT input_description, error_message FROM outputs WHERE job_id = $1 ORDER BY version DESC, id LIMIT 1",
        )
        .bind(&job.id)
        .fetch_optional(&mut **tx)
        .await?
        .unwrap_or((None, None))
    } else {
        (None, None)
    };
    let quality = record
        .and_then(|r| serde_json::from_str::<crate::domain::identity::FaceRecord>(&r).ok())
        .map(|r| r.quality());
    let data = serde_json::json!({
        "identity_code": code,
        "preprocessing_job_id": job.id,
        "id_task": job.id,
        "preprocessing_status": status,
        "quality_score": quality,
        "error_message": job.status.is_terminal().then_some(()).filter(|_| job.status != crate::domain::JobStatus::Completed)
            .and_then(|_| output_error.or_else(|| job.error_message.clone())),
    });
    insert(
        tx,
        &job.account_id,
        "identity_preprocessing",
        Some(&job.id),
        &data,
    )
    .await?;
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
        "status": o.status.public(),
        "model_used": o.model_used,
        "error_message": o.error_message,
        "output_keys": {"full_size": o.full_key, "thumbnail": o.thumb_key},
    });
    insert(tx, account_id, "image_result", Some(&o.job_id), &data).await?;
    Ok(())
}

type NotificationRow = (i64, String, String, String, i64);

fn from_row((id, account_id, name, data, created_at): NotificationRow) -> Result<Notification> {
    Ok(Notification {
        id,
        account_id,
        name,
        data: from_json(&data)?,
        created_at,
    })
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
        let rows: Vec<NotificationRow> = sqlx::query_as(
            "SELECT id, account_id, name, data, created_at FROM notifications \
             WHERE account_id = $1 AND id > $2 AND deleted_at IS NULL AND created_at >= $3 ORDER BY id",
        )
        .bind(account_id)
        .bind(after_id)
        .bind(now_ms() - max_age_ms)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(from_row).collect()
    }

    /// Consumes (soft-deletes) one notification. `false` when it is unknown,
    /// already deleted, expired or another account's.
    pub async fn delete_notification(
        &self,
        account_id: &str,
        id: i64,
        max_age_ms: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE notifications SET deleted_at = $3 \
             WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL AND created_at >= $4",
        )
        .bind(id)
        .bind(account_id)
        .bind(now_ms())
        .bind(now_ms() - max_age_ms)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The relay's backlog: notifications not yet relayed, oldest first.
    pub async fn unrelayed_notifications(&self, limit: i64) -> Result<Vec<Notification>> {
        let rows: Vec<NotificationRow> = sqlx::query_as(
            "SELECT id, account_id, name, data, created_at FROM notifications \
             WHERE relayed_at IS NULL ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(from_row).collect()
    }

    /// Marks notifications relayed and, in the same transaction, queues a
    /// webhook delivery for each one whose account has an active webhook.
    /// One statement marks the batch and one finds the accounts with a
    /// webhook; only their notifications cost a statement each.
    pub async fn finish_relay(&self, relayed: &[(Notification, RelayedDelivery)]) -> Result<()> {
        if relayed.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.begin().await?;
        let ids: Vec<i64> = relayed.iter().map(|(n, _)| n.id).collect();
        // Those another relay marked first are not returned: theirs to queue.
        let mine: std::collections::HashSet<i64> = sqlx::query_scalar(&format!(
            "UPDATE notifications SET relayed_at = $1 WHERE id IN ({}) AND relayed_at IS NULL RETURNING id",
            super::id_list(&ids)
        ))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut accounts: Vec<&str> = relayed
            .iter()
            .filter(|(n, _)| mine.contains(&n.id))
            .map(|(n, _)| n.account_id.as_str())
            .collect();
        accounts.sort_unstable();
        accounts.dedup();
        let hooked: std::collections::HashSet<String> = if accounts.is_empty() {
            Default::default()
        } else {
            let sql = format!(
                "SELECT account_id FROM webhooks WHERE is_active = 1 AND account_id IN ({})",
                super::placeholders(1, accounts.len())
            );
            let mut q = sqlx::query_scalar(&sql);
            for a in &accounts {
                q = q.bind(*a);
            }
            q.fetch_all(&mut *tx).await?.into_iter().collect()
        };
        for (n, d) in relayed {
            if !mine.contains(&n.id) || !hooked.contains(&n.account_id) {
                continue;
            }
            let job_id = n.data.get("id_task").and_then(|v| v.as_str());
            super::webhooks::queue_delivery(
                &mut tx,
                &n.account_id,
                d.notification_id,
                job_id,
                &n.name,
                &d.body,
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Age of the oldest notification the relay has not handled, ms.
    pub async fn relay_lag_ms(&self) -> Result<i64> {
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(created_at) FROM notifications WHERE relayed_at IS NULL",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(oldest.map_or(0, |t| (now_ms() - t).max(0)))
    }

    /// Deletes relayed notifications created before `before_ms`.
    pub async fn prune_notifications(&self, before_ms: i64) -> Result<u64> {
        let r = sqlx::query(
            "DELETE FROM notifications WHERE created_at < $1 AND relayed_at IS NOT NULL",
        )
        .bind(before_ms)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected())
    }

    /// Takes or renews the named lease for `holder`; `true` while it holds it.
    pub async fn try_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool> {
        let now = now_ms();
        let got: Option<String> = sqlx::query_scalar(
            "INSERT INTO leases (name, holder, until) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until \
             WHERE leases.until < $4 OR leases.holder = excluded.holder RETURNING holder",
        )
        .bind(name)
        .bind(holder)
        .bind(now + ttl_ms)
        .bind(now)
        .fetch_optional(self.pool())
        .await?;
        Ok(got.as_deref() == Some(holder))
    }
}
