//! Trainings (contract §7, §8): a job of kind `training` plus the row the
//! training APIs read. Starting one checks the caps and admits its job in
//! ONE transaction; its status, error, timing and weights are its job's
//! and its output's, so nothing here can disagree with what was recorded
//! and charged.

use super::jobs::{Admission, NewJob};
use super::{Result, Store, Tx};
use crate::domain::credits::{Credits, PriceTable};
use crate::domain::training::{TrainingApi, TrainingSpec};
use crate::domain::{JobSpec, JobStatus};
use crate::time::now_ms;

/// A training as the APIs show it: its row joined with its job and output.
#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct TrainingRow {
    pub id: String,
    pub account_id: String,
    pub api: String,
    pub model_id: String,
    pub job_id: String,
    pub trigger_word: String,
    pub model_type: String,
    /// JSON object: the resolved parameters.
    pub parameters: String,
    pub image_count: i64,
    pub dataset_key: String,
    /// JSON object: the last progress the trainer reported.
    pub progress: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub deleted_at: Option<i64>,
    pub job_status: JobStatus,
    pub job_error: Option<String>,
    pub job_updated_at: i64,
    pub finalized_at: Option<i64>,
    pub output_id: i64,
    pub attempt: i64,
    /// When the live attempt started on a worker.
    pub started_at: Option<i64>,
    /// The final weights' object key, once completed.
    pub full_key: Option<String>,
    /// JSON: what the trainer returned (every weights file, per epoch).
    pub input_description: Option<String>,
    pub cost: i64,
    /// Why it failed (the output's reason), once failed.
    pub output_error: Option<String>,
}

const SELECT: &str = "SELECT t.id, t.account_id, t.api, t.model_id, t.job_id, t.trigger_word, t.model_type, \
     t.parameters, t.image_count, t.dataset_key, t.progress, t.created_at, t.updated_at, t.deleted_at, \
     j.status AS job_status, j.error_message AS job_error, j.updated_at AS job_updated_at, j.finalized_at, \
     o.id AS output_id, o.attempt, o.started_at, o.full_key, o.input_description, o.cost, o.error_message AS output_error \
     FROM trainings t JOIN jobs j ON j.id = t.job_id JOIN outputs o ON o.job_id = t.job_id";

impl TrainingRow {
    /// The status word of contract §7 (`queued`, `processing`,
    /// `succeeded`, `failed`, `canceled`).
    pub fn status(&self) -> &'static str {
        match self.job_status {
            JobStatus::Pending => "queued",
            JobStatus::Processing => "processing",
            JobStatus::Completed => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Aborted => "canceled",
        }
    }

    pub fn is_open(&self) -> bool {
        !self.job_status.is_terminal()
    }
}

/// A training to start: the spec (with its id, trigger word, dataset and
/// cost already fixed) and the caps it must fit.
pub struct NewTraining<'a> {
    pub account_id: &'a str,
    /// Who pays (the account itself, or the organisation it belongs to).
    pub billing_account_id: &'a str,
    pub spec: TrainingSpec,
    pub prices: &'a PriceTable,
    pub max_attempts: u32,
    /// Trainings the account may have open at once.
    pub parallel_cap: u32,
    pub cooldown_ms: i64,
    pub traceparent: Option<String>,
}

/// What starting a training did.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainingStart {
    Started { job_id: String },
    /// A training of this model is queued or running.
    ModelBusy,
    /// The account's `parallel-training` cap is reached; the soonest of
    /// its trainings is expected to end in this many seconds.
    AccountCap { open: i64, cap: u32, remaining_secs: i64 },
    /// The model's last training ended less than the cooldown ago.
    Cooldown { remaining_secs: i64 },
    InsufficientCredits { required: Credits, available: Credits },
}

impl Store {
    /// Starts a training in ONE transaction: the account locked, the
    /// model's and the account's open trainings and the cooldown checked,
    /// the job admitted (its cost reserved), the training row written and a
    /// Models API model moved to `training`.
    pub async fn start_training(&self, t: NewTraining<'_>) -> Result<TrainingStart> {
        let mut tx = self.begin().await?;
        let r = self.start_training_in(&mut tx, &t).await?;
        if matches!(r, TrainingStart::Started { .. }) {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(r)
    }

    async fn start_training_in(&self, tx: &mut Tx, t: &NewTraining<'_>) -> Result<TrainingStart> {
        let now = now_ms();
        // Every start of this account serialises here, so two concurrent
        // starts cannot both pass the checks below.
        self.lock_account(tx, t.account_id).await?;
        let open_in = JobStatus::sql_in(&JobStatus::OPEN);
        let busy: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM trainings t JOIN jobs j ON j.id = t.job_id \
             WHERE t.model_id = $1 AND j.status IN ({open_in})"
        ))
        .bind(&t.spec.model_id)
        .fetch_one(&mut **tx)
        .await?;
        if busy > 0 {
            return Ok(TrainingStart::ModelBusy);
        }
        let open: Vec<(Option<String>, i64)> = sqlx::query_as(&format!(
            "SELECT t.progress, t.created_at FROM trainings t JOIN jobs j ON j.id = t.job_id \
             WHERE t.account_id = $1 AND j.status IN ({open_in})"
        ))
        .bind(t.account_id)
        .fetch_all(&mut **tx)
        .await?;
        if open.len() as i64 >= i64::from(t.parallel_cap) {
            // The soonest end the trainers have estimated; a training
            // that has reported nothing yet counts a minute.
            let remaining_ms = open
                .iter()
                .map(|(p, _)| {
                    p.as_deref()
                        .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
                        .and_then(|p| p["remainingTimeMs"].as_i64())
                        .unwrap_or(60_000)
                })
                .min()
                .unwrap_or(60_000);
            return Ok(TrainingStart::AccountCap {
                open: open.len() as i64,
                cap: t.parallel_cap,
                remaining_secs: (remaining_ms + 999) / 1000,
            });
        }
        let last_end: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(j.finalized_at) FROM trainings t JOIN jobs j ON j.id = t.job_id WHERE t.model_id = $1",
        )
        .bind(&t.spec.model_id)
        .fetch_one(&mut **tx)
        .await?;
        if let Some(end) = last_end {
            let left = end + t.cooldown_ms - now;
            if left > 0 {
                return Ok(TrainingStart::Cooldown {
                    remaining_secs: (left + 999) / 1000,
                });
            }
        }
        let admission = self
            .admit(
                tx,
                &NewJob {
                    account_id: t.account_id,
                    billing_account_id: t.billing_account_id,
                    project_id: None,
                    spec: JobSpec::Training(t.spec.clone()),
                    prices: t.prices,
                    max_attempts: t.max_attempts,
                    active_job_cap: None,
                    traceparent: t.traceparent.clone(),
                },
            )
            .await?;
        let job_id = match admission {
            Admission::Created { job_id, .. } => job_id,
            Admission::InsufficientCredits {
                required,
                in_progress,
                user_credits,
            } => {
                return Ok(TrainingStart::InsufficientCredits {
                    required,
                    available: user_credits - in_progress,
                });
            }
            other => {
                return Err(super::StoreError::Corrupt(format!(
                    "a training was refused for a reason trainings cannot have: {other:?}"
                )));
            }
        };
        let s = &t.spec;
        sqlx::query(
            "INSERT INTO trainings (id, account_id, api, model_id, job_id, trigger_word, model_type, parameters, \
             image_count, dataset_key, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11)",
        )
        .bind(&s.training_id)
        .bind(t.account_id)
        .bind(s.api.as_str())
        .bind(&s.model_id)
        .bind(&job_id)
        .bind(&s.trigger_word)
        .bind(&s.model_type)
        .bind(serde_json::Value::Object(s.parameters.clone()).to_string())
        .bind(i64::from(s.image_count))
        .bind(&s.dataset_key)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        if s.api == TrainingApi::Models {
            sqlx::query("UPDATE api_models SET status = 'training', updated_at = $2 WHERE id = $1")
                .bind(&s.model_id)
                .bind(now)
                .execute(&mut **tx)
                .await?;
        }
        Ok(TrainingStart::Started { job_id })
    }

    /// A live (not deleted) training of the account.
    pub async fn training(&self, account_id: &str, id: &str) -> Result<Option<TrainingRow>> {
        let sql = format!("{SELECT} WHERE t.id = $1 AND t.account_id = $2 AND t.deleted_at IS NULL");
        Ok(sqlx::query_as::<_, TrainingRow>(&sql)
            .bind(id)
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// A training of the account, deleted record or not (a deleted
    /// training's weights stay usable by predictions).
    pub async fn training_with_deleted(&self, account_id: &str, id: &str) -> Result<Option<TrainingRow>> {
        let sql = format!("{SELECT} WHERE t.id = $1 AND t.account_id = $2");
        Ok(sqlx::query_as::<_, TrainingRow>(&sql)
            .bind(id)
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// The training a job is, for the account (deleted ones included:
    /// a Models API job stays readable).
    pub async fn training_of_job(&self, account_id: &str, job_id: &str) -> Result<Option<TrainingRow>> {
        let sql = format!("{SELECT} WHERE t.job_id = $1 AND t.account_id = $2");
        Ok(sqlx::query_as::<_, TrainingRow>(&sql)
            .bind(job_id)
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// The training an output belongs to, whoever owns it (the trainer's
    /// webhook names the output).
    pub async fn training_of_output(&self, output_id: i64) -> Result<Option<TrainingRow>> {
        let sql = format!("{SELECT} WHERE o.id = $1");
        Ok(sqlx::query_as::<_, TrainingRow>(&sql)
            .bind(output_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// The live trainings of one model, oldest first.
    pub async fn trainings_of_model(&self, account_id: &str, model_id: &str) -> Result<Vec<TrainingRow>> {
        let sql = format!(
            "{SELECT} WHERE t.model_id = $1 AND t.account_id = $2 AND t.deleted_at IS NULL ORDER BY t.created_at, t.id"
        );
        Ok(sqlx::query_as::<_, TrainingRow>(&sql)
            .bind(model_id)
            .bind(account_id)
            .fetch_all(self.pool())
            .await?)
    }

    /// The latest training of a model (deleted records included: their
    /// weights stay usable), if any.
    pub async fn latest_training(&self, account_id: &str, model_id: &str) -> Result<Option<TrainingRow>> {
        let sql = format!(
            "{SELECT} WHERE t.model_id = $1 AND t.account_id = $2 ORDER BY t.created_at DESC, t.id DESC LIMIT 1"
        );
        Ok(sqlx::query_as::<_, TrainingRow>(&sql)
            .bind(model_id)
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// Records the trainer's latest progress (only while the job is open:
    /// a late event never overwrites the end).
    pub async fn set_training_progress(&self, id: &str, progress: &serde_json::Value) -> Result<bool> {
        let sql = format!(
            "UPDATE trainings SET progress = $2, updated_at = $3 WHERE id = $1 AND job_id IN \
             (SELECT id FROM jobs WHERE status IN ({}))",
            JobStatus::sql_in(&JobStatus::OPEN)
        );
        let r = sqlx::query(&sql)
            .bind(id)
            .bind(progress.to_string())
            .bind(now_ms())
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Soft-deletes a training record (it keeps running if it runs; its
    /// weights stay usable). `false` when there is none to delete.
    pub async fn delete_training(&self, account_id: &str, id: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE trainings SET deleted_at = $3, updated_at = $3 WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(account_id)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Every weights object of a model's trainings (to erase with it).
    pub async fn training_objects(&self, model_id: &str) -> Result<Vec<String>> {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT t.dataset_key, o.input_description FROM trainings t JOIN outputs o ON o.job_id = t.job_id \
             WHERE t.model_id = $1",
        )
        .bind(model_id)
        .fetch_all(self.pool())
        .await?;
        let mut keys = Vec::new();
        for (dataset, described) in rows {
            keys.push(dataset);
            if let Some(d) = described.and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok()) {
                for w in d["weights"].as_array().into_iter().flatten() {
                    if let Some(k) = w["key"].as_str() {
                        keys.push(k.to_string());
                    }
                }
            }
        }
        Ok(keys)
    }
}

/// A training job reached its end: its Models API model shows it
/// (`trained`, `failed`, `training-canceled`). Called by
/// `finalize_job` inside the finalising transaction.
pub(crate) async fn on_finalized(tx: &mut Tx, job_id: &str, status: JobStatus) -> Result<()> {
    let model_status = match status {
        JobStatus::Completed => "trained",
        JobStatus::Failed => "failed",
        JobStatus::Aborted => "training-canceled",
        JobStatus::Pending | JobStatus::Processing => return Ok(()),
    };
    sqlx::query(
        "UPDATE api_models SET status = $2, updated_at = $3 WHERE status = 'training' AND id IN \
         (SELECT model_id FROM trainings WHERE job_id = $1 AND api = 'models')",
    )
    .bind(job_id)
    .bind(model_status)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
