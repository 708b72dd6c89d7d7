//! Predictions (contract §7): a job of kind `prediction` plus a row for
//! what the prediction API adds (the warnings it answered, soft delete).

use super::jobs::{Admission, NewJob};
use super::{Result, Store};
use crate::time::now_ms;

impl Store {
    /// Admits a prediction's job and records its row, in ONE transaction.
    pub async fn create_prediction(&self, j: NewJob<'_>, warnings: &[String]) -> Result<Admission> {
        let mut tx = self.begin().await?;
        let admission = self.admit(&mut tx, &j).await?;
        let Admission::Created { job_id, .. } = &admission else {
            tx.rollback().await?;
            return Ok(admission);
        };
        sqlx::query(
            "INSERT INTO predictions (id, account_id, warnings, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(job_id)
        .bind(j.account_id)
        .bind(serde_json::to_string(warnings).unwrap_or_else(|_| "[]".into()))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(admission)
    }

    /// The warnings of a live (not deleted) prediction of the account;
    /// `None`: there is none.
    pub async fn prediction_warnings(&self, account_id: &str, id: &str) -> Result<Option<Vec<String>>> {
        let w: Option<String> = sqlx::query_scalar(
            "SELECT warnings FROM predictions WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(account_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(w.map(|w| serde_json::from_str(&w).unwrap_or_default()))
    }

    /// Soft-deletes a prediction; `false` when there is none to delete.
    pub async fn delete_prediction(&self, account_id: &str, id: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE predictions SET deleted_at = $3 WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(account_id)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }
}
