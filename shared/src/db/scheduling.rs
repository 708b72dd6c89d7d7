//! Output lifecycle in the store: dispatch claims, worker reports, retries,
//! lease reaping, settlement and job finalisation.
//!
//! Exactly-once effects rest on one rule: every transition is a conditional
//! `UPDATE … WHERE id = $1 AND attempt = $2 AND status IN (<legal sources>)`,
//! and everything the transition causes (charge or release, counters,
//! notifications, job finalisation) happens in the same transaction only if
//! that update touched a row. A duplicate or stale report changes nothing.

use super::accounts::ledger;
use super::jobs::{OUTPUT_COLUMNS, OutputRow, touch_job};
use super::notifications::{notify_job, notify_output};
use super::{Result, Store, Tx, to_json};
use crate::domain::credits::Credits;
use crate::domain::retry::RetryPolicy;
use crate::domain::{FailureKind, JobStatus, OutputResult, OutputStatus};
use crate::time::now_ms;
use std::collections::HashMap;

/// An eligible output, with what the fair pick needs.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchCandidate {
    pub output_id: i64,
    pub job_id: String,
    pub account_id: String,
    pub plan: String,
    pub ready_at: i64,
    /// The job's W3C `traceparent`, for the task message.
    pub traceparent: Option<String>,
}

/// What became of a failure report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Rescheduled for another attempt at `at` (epoch ms).
    Retried { at: i64 },
    /// The engine refused; rescheduled at once on the next engine of the
    /// `auto` order.
    FellBack { engine_index: i64 },
    /// The output failed for good.
    Failed,
    /// Stale or duplicate report: nothing changed.
    Ignored,
}

impl Store {
    /// Up to `per_account` eligible outputs of every account for `queue`,
    /// oldest first within an account.
    pub async fn dispatch_candidates(
        &self,
        queue: &str,
        per_account: i64,
    ) -> Result<Vec<DispatchCandidate>> {
        let rows: Vec<(i64, String, String, String, i64, Option<String>)> = sqlx::query_as(
            "SELECT id, job_id, account_id, plan, scheduled_at, traceparent FROM ( \
               SELECT o.id, o.job_id, j.account_id, a.plan, o.scheduled_at, j.traceparent, \
                      ROW_NUMBER() OVER (PARTITION BY j.account_id ORDER BY o.scheduled_at, o.id) AS rn \
               FROM outputs o JOIN jobs j ON j.id = o.job_id JOIN accounts a ON a.id = j.account_id \
               WHERE o.status = 'pending' AND o.queue = $1 AND o.scheduled_at <= $2) t \
             WHERE rn <= $3 ORDER BY scheduled_at, id",
        )
        .bind(queue)
        .bind(now_ms())
        .bind(per_account)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(output_id, job_id, account_id, plan, ready_at, traceparent)| DispatchCandidate {
                    output_id,
                    job_id,
                    account_id,
                    plan,
                    ready_at,
                    traceparent,
                },
            )
            .collect())
    }

    /// Outputs of `queue` holding a lease, per account (`dispatched` + `running`).
    pub async fn in_flight_by_account(&self, queue: &str) -> Result<HashMap<String, u32>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT j.account_id, COUNT(*) FROM outputs o JOIN jobs j ON j.id = o.job_id \
             WHERE o.queue = $1 AND o.status IN ('dispatched', 'running') GROUP BY j.account_id",
        )
        .bind(queue)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(a, n)| (a, u32::try_from(n).unwrap_or(u32::MAX)))
            .collect())
    }

    /// Tasks published to `queue` that no worker has started yet.
    pub async fn queued_count(&self, queue: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM outputs WHERE queue = $1 AND status = 'dispatched'",
        )
        .bind(queue)
        .fetch_one(self.pool())
        .await?)
    }

    /// Claims a pending output for dispatch: `pending → dispatched`, the
    /// attempt counter incremented, leased until `lease_until`. Returns the
    /// new attempt number, or `None` if another scheduler got it first.
    pub async fn claim_for_dispatch(
        &self,
        output_id: i64,
        lease_until: i64,
        owner: &str,
    ) -> Result<Option<i64>> {
        let sql = format!(
            "UPDATE outputs SET status = 'dispatched', attempt = attempt + 1, lease_expires_at = $2, lease_owner = $3, updated_at = $4 \
             WHERE id = $1 AND status IN ({}) AND attempt < max_attempts RETURNING attempt",
            OutputStatus::sql_sources_of(OutputStatus::Dispatched)
        );
        Ok(sqlx::query_scalar(&sql)
            .bind(output_id)
            .bind(lease_until)
            .bind(owner)
            .bind(now_ms())
            .fetch_optional(self.pool())
            .await?)
    }

    /// Undoes a claim whose task could not be published (the attempt never ran).
    pub async fn unclaim(&self, output_id: i64, attempt: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE outputs SET status = 'pending', attempt = attempt - 1, lease_expires_at = NULL, lease_owner = NULL, updated_at = $3 \
             WHERE id = $1 AND attempt = $2 AND status = 'dispatched'",
        )
        .bind(output_id)
        .bind(attempt)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Whether `attempt` is the live attempt of a leased output: workers skip
    /// stale deliveries (an older attempt redelivered after a reclaim).
    pub async fn is_live_attempt(&self, output_id: i64, attempt: i64) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM outputs WHERE id = $1 AND attempt = $2 AND status IN ('dispatched', 'running')",
        )
        .bind(output_id)
        .bind(attempt)
        .fetch_one(self.pool())
        .await?;
        Ok(n == 1)
    }

    /// A worker started `attempt`: `dispatched → running` (or a renewed
    /// lease if a redelivery restarted it), and the job becomes `processing`.
    pub async fn record_started(
        &self,
        output_id: i64,
        attempt: i64,
        lease_until: i64,
        worker: &str,
    ) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let job_id: Option<String> = sqlx::query_scalar(
            "UPDATE outputs SET status = 'running', lease_expires_at = $3, lease_owner = $4, started_at = $5, updated_at = $5 \
             WHERE id = $1 AND attempt = $2 AND status IN ('dispatched', 'running') RETURNING job_id",
        )
        .bind(output_id)
        .bind(attempt)
        .bind(lease_until)
        .bind(worker)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(job_id) = job_id else {
            tx.rollback().await?;
            return Ok(false);
        };
        let r = sqlx::query("UPDATE jobs SET status = 'processing', updated_at = $2 WHERE id = $1 AND status = 'pending'")
            .bind(&job_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 1 {
            notify_job(&mut tx, &job_id).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Heartbeat: extends the lease of a running attempt.
    pub async fn extend_lease(
        &self,
        output_id: i64,
        attempt: i64,
        lease_until: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE outputs SET lease_expires_at = $3, updated_at = $4 WHERE id = $1 AND attempt = $2 AND status IN ('dispatched', 'running')",
        )
        .bind(output_id)
        .bind(attempt)
        .bind(lease_until)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records a completed attempt and charges its cost. `false` for a stale
    /// or duplicate report (nothing changed, nothing charged).
    pub async fn record_completed(
        &self,
        output_id: i64,
        attempt: i64,
        result: &OutputResult,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let Some(o) = live_output(&mut tx, output_id, attempt).await? else {
            tx.rollback().await?;
            return Ok(false);
        };
        if finish_output(&mut tx, &o, OutputStatus::Completed, "", Some(result), true).await? {
            post_processing_progress(&mut tx, &o, result.post_processed).await?;
        }
        finalize_job(&mut tx, &o.job_id, None).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records a failed attempt: retried with backoff when the failure is
    /// retryable and attempts remain, failed for good (reservation released)
    /// otherwise. `unit` is a uniform sample in [0, 1) for the jitter.
    pub async fn record_failure(
        &self,
        output_id: i64,
        attempt: i64,
        kind: &FailureKind,
        message: &str,
        policy: &RetryPolicy,
        unit: f64,
    ) -> Result<FailureOutcome> {
        let mut tx = self.begin().await?;
        let Some(o) = live_output(&mut tx, output_id, attempt).await? else {
            tx.rollback().await?;
            return Ok(FailureOutcome::Ignored);
        };
        let retry_allowed = match kind {
            FailureKind::Retryable => attempt < o.max_attempts,
            FailureKind::Permanent | FailureKind::Refused => false,
        };
        // A refusal falls back to the next engine only when the client let the
        // server choose (`model: auto`); a named engine's refusal is final.
        let fallback_allowed =
            matches!(kind, FailureKind::Refused) && attempt < o.max_attempts && {
                let spec: String = sqlx::query_scalar("SELECT spec FROM jobs WHERE id = $1")
                    .bind(&o.job_id)
                    .fetch_one(&mut *tx)
                    .await?;
                serde_json::from_str::<serde_json::Value>(&spec)
                    .ok()
                    .is_some_and(|v| v["model"] == "auto")
            };
        let outcome = if fallback_allowed {
            let sql = format!(
                "UPDATE outputs SET status = 'pending', engine_index = engine_index + 1, scheduled_at = $3, lease_expires_at = NULL, \
                 lease_owner = NULL, last_error = $4, updated_at = $3 WHERE id = $1 AND attempt = $2 AND status IN ({})",
                OutputStatus::sql_sources_of(OutputStatus::Pending)
            );
            sqlx::query(&sql)
                .bind(output_id)
                .bind(attempt)
                .bind(now_ms())
                .bind(message)
                .execute(&mut *tx)
                .await?;
            FailureOutcome::FellBack {
                engine_index: o.engine_index + 1,
            }
        } else if retry_allowed {
            let delay = policy.delay(u32::try_from(attempt).unwrap_or(u32::MAX), unit);
            let at = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
            let sql = format!(
                "UPDATE outputs SET status = 'pending', scheduled_at = $3, lease_expires_at = NULL, lease_owner = NULL, \
                 last_error = $4, updated_at = $5 WHERE id = $1 AND attempt = $2 AND status IN ({})",
                OutputStatus::sql_sources_of(OutputStatus::Pending)
            );
            sqlx::query(&sql)
                .bind(output_id)
                .bind(attempt)
                .bind(at)
                .bind(message)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            FailureOutcome::Retried { at }
        } else {
            let reason = if matches!(kind, FailureKind::Retryable) {
                format!("{message} (gave up after {attempt} attempts)")
            } else {
                message.to_string()
            };
            finish_output(&mut tx, &o, OutputStatus::Failed, &reason, None, false).await?;
            finalize_job(&mut tx, &o.job_id, None).await?;
            FailureOutcome::Failed
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// Leased outputs whose lease ended before `now`: `(output_id, attempt)`.
    pub async fn expired_leases(&self, now: i64, limit: i64) -> Result<Vec<(i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT id, attempt FROM outputs WHERE status IN ('dispatched', 'running') AND lease_expires_at < $1 ORDER BY lease_expires_at LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// Non-terminal outputs of one job (used by tests and the CLI).
    pub async fn open_outputs(&self, job_id: &str) -> Result<Vec<OutputRow>> {
        let sql = format!(
            "SELECT {OUTPUT_COLUMNS} FROM outputs WHERE job_id = $1 AND status IN ('pending', 'dispatched', 'running')"
        );
        Ok(sqlx::query_as::<_, OutputRow>(&sql)
            .bind(job_id)
            .fetch_all(self.pool())
            .await?)
    }
}

async fn live_output(tx: &mut Tx, output_id: i64, attempt: i64) -> Result<Option<OutputRow>> {
    let sql = format!(
        "SELECT {OUTPUT_COLUMNS} FROM outputs WHERE id = $1 AND attempt = $2 AND status IN ('dispatched', 'running')"
    );
    Ok(sqlx::query_as::<_, OutputRow>(&sql)
        .bind(output_id)
        .bind(attempt)
        .fetch_optional(&mut **tx)
        .await?)
}

/// Moves one output to a terminal state and settles its credits: a charge
/// for `completed`, a release otherwise. No-op if the guard does not match.
pub(crate) async fn finish_output(
    tx: &mut Tx,
    o: &OutputRow,
    to: OutputStatus,
    message: &str,
    result: Option<&OutputResult>,
    charge: bool,
) -> Result<bool> {
    debug_assert!(to.is_terminal());
    let now = now_ms();
    let sql = format!(
        "UPDATE outputs SET status = $3, lease_expires_at = NULL, lease_owner = NULL, finalized_at = $4, updated_at = $4, \
         error_message = $5, full_key = $6, thumb_key = $7, model_used = $8, width = $9, height = $10, \
         processing_ms = $11, input_description = $12, output_format = COALESCE($13, output_format) \
         WHERE id = $1 AND attempt = $2 AND status IN ({})",
        OutputStatus::sql_sources_of(to)
    );
    let description = result.map(|r| to_json(&r.input_description)).transpose()?;
    let r = sqlx::query(&sql)
        .bind(o.id)
        .bind(o.attempt)
        .bind(to.as_str())
        .bind(now)
        .bind((!message.is_empty()).then_some(message))
        .bind(result.map(|r| r.full_key.as_str()))
        .bind(result.map(|r| r.thumb_key.as_str()))
        .bind(result.map(|r| r.model_used.as_str()))
        .bind(result.map(|r| i64::from(r.width)))
        .bind(result.map(|r| i64::from(r.height)))
        .bind(result.map(|r| r.processing_ms))
        .bind(description)
        .bind(result.map(|r| r.format.as_str()))
        .execute(&mut **tx)
        .await?;
    if r.rows_affected() == 0 {
        return Ok(false);
    }
    let cost = Credits(o.cost);
    let account_sql = if charge {
        "UPDATE accounts SET balance = balance - $2, reserved = reserved - $2 WHERE id = $1"
    } else {
        "UPDATE accounts SET reserved = reserved - $2 WHERE id = $1"
    };
    sqlx::query(account_sql)
        .bind(&o.billing_account_id)
        .bind(cost.0)
        .execute(&mut **tx)
        .await?;
    let res_sql = if charge {
        "UPDATE reservations SET held = held - $2, charged = charged + $2 WHERE job_id = $1"
    } else {
        "UPDATE reservations SET held = held - $2, released = released + $2 WHERE job_id = $1"
    };
    sqlx::query(res_sql)
        .bind(&o.job_id)
        .bind(cost.0)
        .execute(&mut **tx)
        .await?;
    ledger(
        tx,
        &o.billing_account_id,
        Some(&o.job_id),
        Some(o.id),
        if charge { "charge" } else { "release" },
        cost,
        None,
    )
    .await?;
    let counter = if to == OutputStatus::Completed {
        "completed_outputs"
    } else {
        "failed_outputs"
    };
    sqlx::query(&format!(
        "UPDATE jobs SET {counter} = {counter} + 1, updated_at = $2 WHERE id = $1"
    ))
    .bind(&o.job_id)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let sql = format!("SELECT {OUTPUT_COLUMNS} FROM outputs WHERE id = $1");
    let after = sqlx::query_as::<_, OutputRow>(&sql)
        .bind(o.id)
        .fetch_one(&mut **tx)
        .await?;
    let account: String = sqlx::query_scalar("SELECT account_id FROM jobs WHERE id = $1")
        .bind(&o.job_id)
        .fetch_one(&mut **tx)
        .await?;
    notify_output(tx, &account, &after).await?;
    Ok(true)
}

/// Tracks the post-processing pass of a job that asked for one: the first
/// post-processed output moves it to `processing`; an output completed
/// without the pass (a worker that lacks it) marks it `failed`, for good.
async fn post_processing_progress(tx: &mut Tx, o: &OutputRow, post_processed: bool) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET post_processing_status = CASE WHEN $2 = 1 THEN 'processing' ELSE 'failed' END, \
         post_processing_error = CASE WHEN $2 = 1 THEN post_processing_error ELSE $3 END \
         WHERE id = $1 AND should_post_process = 1 AND post_processing_status IN ('pending', 'processing')",
    )
    .bind(&o.job_id)
    .bind(i64::from(post_processed))
    .bind(format!(
        "output {} (instruction {}, variation {}) completed without the post-processing pass",
        o.id, o.instruction_index, o.variation_index
    ))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Finalises a job whose outputs are all terminal (or that is being
/// aborted): terminal status, reservation closed, active-job slot freed,
/// `batch_edit` notification. While outputs remain open it only reports the
/// progress (`batch_edit` with `processed_images`).
pub(crate) async fn finalize_job(
    tx: &mut Tx,
    job_id: &str,
    forced: Option<JobStatus>,
) -> Result<()> {
    let now = now_ms();
    let (status, total, completed, failed, account, counts): (String, i64, i64, i64, String, i64) = sqlx::query_as(
        "SELECT status, total_outputs, completed_outputs, failed_outputs, account_id, counts_against_cap \
         FROM jobs WHERE id = $1",
    )
    .bind(job_id)
    .fetch_one(&mut **tx)
    .await?;
    if JobStatus::parse(&status).is_none_or(|s| s.is_terminal()) {
        return Ok(());
    }
    let next = match forced {
        Some(s) => s,
        None if completed + failed == total => JobStatus::finished(completed),
        None => {
            // Progress: one more output is terminal.
            touch_job(tx, job_id, now).await?;
            notify_job(tx, job_id).await?;
            return Ok(());
        }
    };
    let error = match next {
        JobStatus::Failed => {
            let last: Option<String> = sqlx::query_scalar(
                "SELECT error_message FROM outputs WHERE job_id = $1 AND error_message IS NOT NULL ORDER BY finalized_at DESC, id DESC LIMIT 1",
            )
            .bind(job_id)
            .fetch_optional(&mut **tx)
            .await?
            .flatten();
            Some(format!(
                "all {total} outputs failed; last error: {}",
                last.unwrap_or_else(|| "unknown".into())
            ))
        }
        _ => None,
    };
    // The pass runs inside each output's task; the job's pass is complete
    // when the job is, unless an output came back without it.
    let (post_status, post_error) = if next == JobStatus::Completed {
        ("completed", None)
    } else {
        ("failed", Some("the job did not complete"))
    };
    let finalized = sqlx::query(
        "UPDATE jobs SET status = $2, finalized_at = $3, updated_at = $3, error_message = COALESCE($4, error_message), \
         post_processing_status = CASE WHEN should_post_process = 1 THEN \
           CASE WHEN post_processing_status = 'failed' THEN 'failed' ELSE $5 END ELSE NULL END, \
         post_processing_error = CASE WHEN should_post_process = 1 THEN COALESCE(post_processing_error, $6) ELSE NULL END \
         WHERE id = $1 AND status IN ('pending', 'processing')",
    )
    .bind(job_id)
    .bind(next.as_str())
    .bind(now)
    .bind(error)
    .bind(post_status)
    .bind(post_error)
    .execute(&mut **tx)
    .await?;
    if finalized.rows_affected() == 0 {
        // Someone else finalised it first: its slot and reservation are settled.
        return Ok(());
    }
    sqlx::query("UPDATE reservations SET closed_at = $2 WHERE job_id = $1 AND closed_at IS NULL")
        .bind(job_id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    if counts == 1 {
        sqlx::query("UPDATE accounts SET active_jobs = active_jobs - 1 WHERE id = $1")
            .bind(&account)
            .execute(&mut **tx)
            .await?;
    }
    notify_job(tx, job_id).await?;
    Ok(())
}
