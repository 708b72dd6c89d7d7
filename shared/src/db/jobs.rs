//! Jobs and their outputs: transactional creation (admission), reads, abort.

use super::accounts::ledger;
use super::notifications::notify_job;
use super::outbox::enqueue_outbox;
use super::{Result, Store, Tx};
use crate::domain::credits::Credits;
use crate::domain::{JobStatus, JobType, OutputStatus};
use crate::time::now_ms;

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub account_id: String,
    pub billing_account_id: String,
    pub project_id: Option<String>,
    pub project_name: Option<String>,
    pub job_type: String,
    pub status: String,
    pub spec: String,
    pub total_outputs: i64,
    pub completed_outputs: i64,
    pub failed_outputs: i64,
    pub should_post_process: i64,
    pub post_processing_status: Option<String>,
    pub post_processing_error: Option<String>,
    pub error_message: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub finalized_at: Option<i64>,
    pub credits_held: i64,
    pub credits_charged: i64,
    pub identity_code: Option<String>,
    /// The preprocessing job whose face a model swap uses.
    pub identity_face_job: Option<String>,
}

impl JobRow {
    pub fn status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }

    pub fn job_type(&self) -> Option<JobType> {
        JobType::parse(&self.job_type)
    }

    pub fn processed(&self) -> i64 {
        self.completed_outputs + self.failed_outputs
    }

    /// 0–100, share of outputs in a terminal state (contract §3.9).
    pub fn progress(&self) -> f64 {
        if self.status().is_terminal() {
            return 100.0;
        }
        if self.total_outputs == 0 {
            0.0
        } else {
            (self.processed() as f64 * 100.0 / self.total_outputs as f64 * 10.0).round() / 10.0
        }
    }
}

pub(crate) const JOB_SELECT: &str = "SELECT j.id, j.account_id, j.billing_account_id, j.project_id, p.name AS project_name, \
     j.job_type, j.status, j.spec, j.total_outputs, j.completed_outputs, j.failed_outputs, j.should_post_process, \
     j.post_processing_status, j.post_processing_error, j.error_message, j.created_at, j.updated_at, j.finalized_at, \
     COALESCE(r.held, 0) AS credits_held, COALESCE(r.charged, 0) AS credits_charged, j.identity_code, j.identity_face_job \
     FROM jobs j LEFT JOIN projects p ON p.id = j.project_id LEFT JOIN reservations r ON r.job_id = j.id";

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct OutputRow {
    pub id: i64,
    pub job_id: String,
    pub billing_account_id: String,
    pub queue: String,
    pub instruction_index: i64,
    pub variation_index: i64,
    pub version: i64,
    pub status: String,
    pub attempt: i64,
    pub max_attempts: i64,
    pub engine_index: i64,
    pub scheduled_at: i64,
    pub lease_expires_at: Option<i64>,
    pub cost: i64,
    pub full_key: Option<String>,
    pub thumb_key: Option<String>,
    pub output_format: String,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub model_used: Option<String>,
    pub input_description: Option<String>,
    pub processing_ms: Option<i64>,
    pub last_error: Option<String>,
    pub error_message: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub finalized_at: Option<i64>,
}

impl OutputRow {
    pub fn status(&self) -> OutputStatus {
        OutputStatus::parse(&self.status).unwrap_or(OutputStatus::Failed)
    }
}

pub(crate) const OUTPUT_COLUMNS: &str = "id, job_id, billing_account_id, queue, instruction_index, variation_index, version, status, \
     attempt, max_attempts, engine_index, scheduled_at, lease_expires_at, cost, full_key, thumb_key, output_format, width, height, \
     model_used, input_description, processing_ms, last_error, error_message, created_at, updated_at, finalized_at";

pub struct NewOutput {
    pub instruction_index: u32,
    pub variation_index: u32,
    pub cost: Credits,
    pub output_format: String,
}

pub struct NewJob<'a> {
    pub account_id: &'a str,
    pub billing_account_id: &'a str,
    pub project_id: Option<&'a str>,
    pub job_type: JobType,
    pub spec_json: String,
    pub post_process: bool,
    pub outputs: Vec<NewOutput>,
    pub max_attempts: u32,
    /// `None`: exempt from the active-job cap (enterprise).
    pub active_job_cap: Option<u32>,
    /// W3C `traceparent` the job's work continues (see `domain::trace`).
    pub traceparent: Option<String>,
    /// The identity the job works with or builds.
    pub identity: Option<IdentityUse<'a>>,
}

/// How a job relates to an identity (recorded in `jobs.identity_code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityUse<'a> {
    /// The job needs this identity of the caller, preprocessed: checked
    /// inside the admitting transaction with the identity row locked, so a
    /// concurrent delete either sees this job or makes admission fail.
    Ready(&'a str),
    /// The job preprocesses this identity (its row is written by the caller
    /// in the same transaction).
    Builds(&'a str),
}

/// The result of admission, decided inside the creating transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    Created {
        job_id: String,
        total_outputs: i64,
        required: Credits,
    },
    ConcurrencyLimit {
        active: i64,
        cap: u32,
    },
    InsufficientCredits {
        required: Credits,
        in_progress: Credits,
        user_credits: Credits,
    },
    /// [`IdentityUse::Ready`] names no identity of the caller.
    IdentityNotFound,
    /// [`IdentityUse::Ready`] names an identity whose preprocessing is in
    /// this state (not `completed`).
    IdentityNotReady {
        status: String,
    },
}

impl Store {
    /// Admits and records a job in ONE transaction: the active-job slot, the
    /// credit reservation (with its ledger row), the job, one row per output,
    /// the creation notification and the outbox row that wakes the scheduler.
    /// Either all of it is committed or none of it.
    pub async fn create_job(&self, j: NewJob<'_>) -> Result<Admission> {
        let mut tx = self.begin().await?;
        let admission = self.admit(&mut tx, &j).await?;
        if matches!(admission, Admission::Created { .. }) {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(admission)
    }

    /// [`Store::create_job`] inside the caller's transaction, which the
    /// caller commits on `Created` and rolls back otherwise.
    pub(crate) async fn admit(&self, tx: &mut Tx, j: &NewJob<'_>) -> Result<Admission> {
        let required: Credits = j.outputs.iter().map(|o| o.cost).sum();
        let now = now_ms();

        // Lock order everywhere: the billing account, then the member account
        // (settlement and finalisation take them in the same order).
        let r = sqlx::query("UPDATE accounts SET reserved = reserved + $2 WHERE id = $1 AND balance - reserved >= $2")
            .bind(j.billing_account_id)
            .bind(required.0)
            .execute(&mut **tx)
            .await?;
        if r.rows_affected() == 0 {
            let (balance, reserved): (i64, i64) =
                sqlx::query_as("SELECT balance, reserved FROM accounts WHERE id = $1")
                    .bind(j.billing_account_id)
                    .fetch_one(&mut **tx)
                    .await?;
            return Ok(Admission::InsufficientCredits {
                required,
                in_progress: Credits(reserved),
                user_credits: Credits(balance),
            });
        }

        let counts = j.job_type.counts_against_cap();
        if counts {
            // Conditional increments are atomic on both dialects: no read-then-write race.
            let cap = j.active_job_cap.map(i64::from).unwrap_or(i64::MAX);
            let r = sqlx::query("UPDATE accounts SET active_jobs = active_jobs + 1 WHERE id = $1 AND active_jobs < $2")
                .bind(j.account_id)
                .bind(cap)
                .execute(&mut **tx)
                .await?;
            if r.rows_affected() == 0 {
                let active: i64 =
                    sqlx::query_scalar("SELECT active_jobs FROM accounts WHERE id = $1")
                        .bind(j.account_id)
                        .fetch_one(&mut **tx)
                        .await?;
                return Ok(Admission::ConcurrencyLimit {
                    active,
                    cap: j.active_job_cap.unwrap_or(u32::MAX),
                });
            }
        }
        // The identity's current face (a completed replacement counts),
        // with the identity row locked against a concurrent delete.
        let mut face_job: Option<String> = None;
        if let Some(IdentityUse::Ready(code)) = j.identity {
            let sql = format!(
                "SELECT j.status, j.id FROM identities i \
                 LEFT JOIN jobs pj ON pj.id = i.pending_job_id \
                 LEFT JOIN jobs j ON j.id = (CASE WHEN pj.status = 'completed' THEN pj.id ELSE i.job_id END) \
                 WHERE i.code = $1 AND i.account_id = $2{}",
                self.for_update_of("i")
            );
            let found: Option<(Option<String>, Option<String>)> = sqlx::query_as(&sql)
                .bind(code)
                .bind(j.account_id)
                .fetch_optional(&mut **tx)
                .await?;
            match found {
                None => return Ok(Admission::IdentityNotFound),
                Some((Some(s), id)) if s == "completed" => face_job = id,
                Some((s, _)) => {
                    return Ok(Admission::IdentityNotReady {
                        status: crate::domain::identity::preprocessing_status(s.as_deref())
                            .to_string(),
                    });
                }
            }
        }
        let job_id = crate::domain::JobId::generate().0;
        sqlx::query(
            "INSERT INTO jobs (id, account_id, billing_account_id, project_id, job_type, status, spec, total_outputs, \
             should_post_process, post_processing_status, counts_against_cap, created_at, updated_at, traceparent, identity_code, identity_face_job) \
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8, $9, $10, $11, $11, $12, $13, $14)",
        )
        .bind(&job_id)
        .bind(j.account_id)
        .bind(j.billing_account_id)
        .bind(j.project_id)
        .bind(j.job_type.as_str())
        .bind(&j.spec_json)
        .bind(j.outputs.len() as i64)
        .bind(i64::from(j.post_process))
        .bind(j.post_process.then_some("pending"))
        .bind(i64::from(counts))
        .bind(now)
        .bind(j.traceparent.as_deref())
        .bind(j.identity.map(|i| match i {
            IdentityUse::Ready(c) | IdentityUse::Builds(c) => c,
        }))
        .bind(face_job.as_deref())
        .execute(&mut **tx)
        .await?;
        for o in &j.outputs {
            sqlx::query(
                "INSERT INTO outputs (job_id, billing_account_id, queue, instruction_index, variation_index, status, max_attempts, \
                 scheduled_at, cost, output_format, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8, $9, $7, $7)",
            )
            .bind(&job_id)
            .bind(j.billing_account_id)
            .bind(j.job_type.queue())
            .bind(i64::from(o.instruction_index))
            .bind(i64::from(o.variation_index))
            .bind(i64::from(j.max_attempts))
            .bind(now)
            .bind(o.cost.0)
            .bind(&o.output_format)
            .execute(&mut **tx)
            .await?;
        }
        sqlx::query("INSERT INTO reservations (job_id, account_id, amount, held, created_at) VALUES ($1, $2, $3, $3, $4)")
            .bind(&job_id)
            .bind(j.billing_account_id)
            .bind(required.0)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        ledger(
            tx,
            j.billing_account_id,
            Some(&job_id),
            None,
            "reserve",
            required,
            None,
        )
        .await?;
        notify_job(tx, &job_id).await?;
        enqueue_outbox(
            tx,
            "scheduler",
            &serde_json::json!({"event": "job_created", "job_id": job_id}),
        )
        .await?;
        Ok(Admission::Created {
            job_id,
            total_outputs: j.outputs.len() as i64,
            required,
        })
    }

    /// A job visible to `account_id` (its own); `None` otherwise (404).
    pub async fn job_for(&self, account_id: &str, job_id: &str) -> Result<Option<JobRow>> {
        let sql = format!("{JOB_SELECT} WHERE j.id = $1 AND j.account_id = $2");
        Ok(sqlx::query_as::<_, JobRow>(&sql)
            .bind(job_id)
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn job(&self, job_id: &str) -> Result<Option<JobRow>> {
        let sql = format!("{JOB_SELECT} WHERE j.id = $1");
        Ok(sqlx::query_as::<_, JobRow>(&sql)
            .bind(job_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// The latest version of every output of a job, in index order.
    pub async fn latest_outputs(&self, job_id: &str) -> Result<Vec<OutputRow>> {
        let sql = format!(
            "SELECT {OUTPUT_COLUMNS} FROM outputs o WHERE o.job_id = $1 AND o.version = \
             (SELECT MAX(v.version) FROM outputs v WHERE v.job_id = o.job_id AND v.instruction_index = o.instruction_index \
              AND v.variation_index = o.variation_index) ORDER BY instruction_index, variation_index"
        );
        Ok(sqlx::query_as::<_, OutputRow>(&sql)
            .bind(job_id)
            .fetch_all(self.pool())
            .await?)
    }

    pub async fn output(&self, output_id: i64) -> Result<Option<OutputRow>> {
        let sql = format!("SELECT {OUTPUT_COLUMNS} FROM outputs WHERE id = $1");
        Ok(sqlx::query_as::<_, OutputRow>(&sql)
            .bind(output_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// Aborts a non-terminal job: every output not yet terminal is cancelled
    /// and its reservation released; completed outputs stay billed.
    /// Returns `None` when the job is unknown to the account, `Some(false)`
    /// when it was already terminal.
    pub async fn abort_job(&self, account_id: &str, job_id: &str) -> Result<Option<bool>> {
        let mut tx = self.begin().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 AND account_id = $2")
                .bind(job_id)
                .bind(account_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(status) = status else {
            return Ok(None);
        };
        if JobStatus::parse(&status).is_none_or(|s| s.is_terminal()) {
            return Ok(Some(false));
        }
        // Lock the open outputs first (in id order), so neither a dispatch nor
        // a completing worker can change them between this read and the cancel.
        let sql = format!(
            "SELECT {OUTPUT_COLUMNS} FROM outputs WHERE job_id = $1 AND status IN ({}) ORDER BY id{}",
            OutputStatus::sql_sources_of(OutputStatus::Cancelled),
            self.for_update()
        );
        let open = sqlx::query_as::<_, OutputRow>(&sql)
            .bind(job_id)
            .fetch_all(&mut *tx)
            .await?;
        for o in &open {
            super::scheduling::finish_output(
                &mut tx,
                o,
                OutputStatus::Cancelled,
                "aborted by the client",
                None,
                false,
            )
            .await?;
        }
        super::scheduling::finalize_job(&mut tx, job_id, Some(JobStatus::Aborted)).await?;
        tx.commit().await?;
        Ok(Some(true))
    }

    /// Invariant check used by tests and `atelier admin audit`: every
    /// reservation holds exactly the cost of its job's open outputs, closed
    /// jobs hold nothing, and each account's `reserved` is the sum of its
    /// reservations.
    pub async fn audit_credits(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT r.job_id, r.held, CAST(COALESCE((SELECT SUM(o.cost) FROM outputs o WHERE o.job_id = r.job_id \
             AND o.status IN ('pending', 'dispatched', 'running')), 0) AS BIGINT) FROM reservations r",
        )
        .fetch_all(self.pool())
        .await?;
        for (job, held, open) in rows {
            if held != open {
                problems.push(format!(
                    "job {job}: reservation holds {held} but open outputs cost {open}"
                ));
            }
        }
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT a.id, a.reserved, CAST(COALESCE((SELECT SUM(r.held) FROM reservations r WHERE r.account_id = a.id), 0) AS BIGINT) \
             FROM accounts a",
        )
        .fetch_all(self.pool())
        .await?;
        for (acc, reserved, held) in rows {
            if reserved != held {
                problems.push(format!(
                    "account {acc}: reserved {reserved} but reservations hold {held}"
                ));
            }
        }
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT a.id, a.active_jobs, (SELECT COUNT(*) FROM jobs j WHERE j.account_id = a.id AND j.counts_against_cap = 1 \
             AND j.status IN ('pending', 'processing')) FROM accounts a",
        )
        .fetch_all(self.pool())
        .await?;
        for (acc, active, open) in rows {
            if active != open {
                problems.push(format!(
                    "account {acc}: active_jobs {active} but {open} open jobs"
                ));
            }
        }
        for acc in sqlx::query_scalar::<_, String>("SELECT id FROM accounts")
            .fetch_all(self.pool())
            .await?
        {
            let t = self.ledger_totals(&acc).await?;
            let (balance, reserved): (i64, i64) =
                sqlx::query_as("SELECT balance, reserved FROM accounts WHERE id = $1")
                    .bind(&acc)
                    .fetch_one(self.pool())
                    .await?;
            if balance != t.granted - t.charged {
                problems.push(format!(
                    "account {acc}: balance {balance} but ledger says {}",
                    t.granted - t.charged
                ));
            }
            if reserved != t.reserved - t.charged - t.released {
                problems.push(format!(
                    "account {acc}: reserved {reserved} but ledger says {}",
                    t.reserved - t.charged - t.released
                ));
            }
        }
        Ok(problems)
    }
}

/// Bumps `updated_at` of a job (every state change does).
pub(crate) async fn touch_job(tx: &mut Tx, job_id: &str, now: i64) -> Result<()> {
    sqlx::query("UPDATE jobs SET updated_at = $2 WHERE id = $1")
        .bind(job_id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
