//! Row types of jobs and outputs, decoded once: kinds, statuses and queues
//! into their enums, the spec into its kind's typed spec. The queries that
//! move them between states live in [`super::transitions`] and
//! [`super::scheduling`]; these types depend on nothing else in the store.

use crate::domain::task::JobInputs;
use crate::domain::{JobSpec, JobStatus, JobType, OutputStatus, WorkQueue};
use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};

#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub account_id: String,
    pub billing_account_id: String,
    pub project_id: Option<String>,
    pub project_name: Option<String>,
    pub job_type: JobType,
    pub status: JobStatus,
    pub spec: JobSpec,
    /// What admission resolved (object keys, the identity face); `None`
    /// for jobs admitted before this column existed.
    pub inputs: Option<JobInputs>,
    pub total_outputs: i64,
    pub completed_outputs: i64,
    pub failed_outputs: i64,
    pub should_post_process: bool,
    pub post_processing_status: Option<JobStatus>,
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
    /// The preprocessing job this job waits for (its identity was not
    /// ready when it was admitted).
    pub waits_for: Option<String>,
    pub traceparent: Option<String>,
}

impl JobRow {
    pub fn processed(&self) -> i64 {
        self.completed_outputs + self.failed_outputs
    }

    /// 0–100, share of outputs in a terminal state (contract §3.9).
    pub fn progress(&self) -> f64 {
        progress(self.status, self.total_outputs, self.processed())
    }
}

/// 0–100, share of a job's `total` outputs that are terminal (`processed`);
/// 100 once the job is.
pub(crate) fn progress(status: JobStatus, total: i64, processed: i64) -> f64 {
    if status.is_terminal() {
        return 100.0;
    }
    if total == 0 {
        0.0
    } else {
        (processed as f64 * 100.0 / total as f64 * 10.0).round() / 10.0
    }
}

/// What the transitions of a job read back from the statement that
/// changed it (`RETURNING`): enough to finalise it and to write its
/// `batch_edit`, without reading the row again.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct JobState {
    pub id: String,
    pub account_id: String,
    pub job_type: JobType,
    pub status: JobStatus,
    pub total_outputs: i64,
    pub completed_outputs: i64,
    pub failed_outputs: i64,
    pub counts_against_cap: i64,
    pub should_post_process: i64,
    pub error_message: Option<String>,
    pub post_processing_status: Option<JobStatus>,
}

/// The columns of a [`JobState`].
pub(crate) const JOB_STATE: &str = "id, account_id, job_type, status, total_outputs, completed_outputs, \
     failed_outputs, counts_against_cap, should_post_process, error_message, post_processing_status";

fn corrupt(column: &str, e: impl std::error::Error + Send + Sync + 'static) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: Box::new(e),
    }
}

impl<'r> FromRow<'r, AnyRow> for JobRow {
    fn from_row(row: &'r AnyRow) -> Result<Self, sqlx::Error> {
        let job_type: JobType = row.try_get("job_type")?;
        let spec: String = row.try_get("spec")?;
        let spec = serde_json::from_str(&spec)
            .and_then(|v| JobSpec::from_value(job_type, v))
            .map_err(|e| corrupt("spec", e))?;
        let inputs: Option<String> = row.try_get("inputs")?;
        let inputs = inputs
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| corrupt("inputs", e))?;
        Ok(JobRow {
            id: row.try_get("id")?,
            account_id: row.try_get("account_id")?,
            billing_account_id: row.try_get("billing_account_id")?,
            project_id: row.try_get("project_id")?,
            project_name: row.try_get("project_name")?,
            job_type,
            status: row.try_get("status")?,
            spec,
            inputs,
            total_outputs: row.try_get("total_outputs")?,
            completed_outputs: row.try_get("completed_outputs")?,
            failed_outputs: row.try_get("failed_outputs")?,
            should_post_process: row.try_get::<i64, _>("should_post_process")? == 1,
            post_processing_status: row.try_get("post_processing_status")?,
            post_processing_error: row.try_get("post_processing_error")?,
            error_message: row.try_get("error_message")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            finalized_at: row.try_get("finalized_at")?,
            credits_held: row.try_get("credits_held")?,
            credits_charged: row.try_get("credits_charged")?,
            identity_code: row.try_get("identity_code")?,
            identity_face_job: row.try_get("identity_face_job")?,
            waits_for: row.try_get("waits_for")?,
            traceparent: row.try_get("traceparent")?,
        })
    }
}

/// `SELECT` of a [`JobRow`]: the job `j` with its project `p` and its
/// reservation `r`.
pub(crate) const JOB_SELECT: &str = "SELECT j.id, j.account_id, j.billing_account_id, j.project_id, p.name AS project_name, \
     j.job_type, j.status, j.spec, j.inputs, j.total_outputs, j.completed_outputs, j.failed_outputs, j.should_post_process, \
     j.post_processing_status, j.post_processing_error, j.error_message, j.created_at, j.updated_at, j.finalized_at, \
     COALESCE(r.held, 0) AS credits_held, COALESCE(r.charged, 0) AS credits_charged, j.identity_code, j.identity_face_job, \
     j.traceparent, j.waits_for \
     FROM jobs j LEFT JOIN projects p ON p.id = j.project_id LEFT JOIN reservations r ON r.job_id = j.id";

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct OutputRow {
    pub id: i64,
    pub job_id: String,
    pub billing_account_id: String,
    pub queue: WorkQueue,
    pub instruction_index: i64,
    pub variation_index: i64,
    pub version: i64,
    pub status: OutputStatus,
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

/// The columns of an [`OutputRow`].
pub(crate) const OUTPUT_COLUMNS: &str = "id, job_id, billing_account_id, queue, instruction_index, variation_index, version, status, \
     attempt, max_attempts, engine_index, scheduled_at, lease_expires_at, cost, full_key, thumb_key, output_format, width, height, \
     model_used, input_description, processing_ms, last_error, error_message, created_at, updated_at, finalized_at";
