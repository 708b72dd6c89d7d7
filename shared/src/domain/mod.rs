//! Pure domain types and decisions. Nothing here performs I/O, so every rule
//! (legal state transitions, credit arithmetic, prices, retry schedule,
//! fair-share pick) is unit- and property-tested in isolation.

pub mod credits;
pub mod fair;
pub mod identity;
pub mod ids;
pub mod packshot;
pub mod retry;
pub mod state;
pub mod trace;

pub use credits::Credits;
pub use ids::{AccountId, FileId, JobId, ProjectId};
pub use state::{JobStatus, JobType, OutputStatus};

/// A task handed from the scheduler to a worker through a work queue.
/// The worker re-reads everything else from the store; the message only says
/// *which* attempt of *which* output to run and until when.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Task {
    pub job_id: String,
    pub output_id: i64,
    /// 1-based attempt number this delivery is for; stale attempts are dropped.
    pub attempt: i64,
    /// Epoch ms after which the scheduler reclaims the output.
    pub deadline_ms: i64,
    /// W3C `traceparent` of the dispatching span, when tracing is exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// Why a pipeline run did not produce an output. The scheduler decides what
/// happens next from the kind alone.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FailureKind {
    /// Transient (I/O, timeout, panic): try again after a backoff.
    Retryable,
    /// The input can never succeed (corrupt image, no face): fail the output.
    Permanent,
    /// The engine refused the content: fall back to the next engine if allowed.
    Refused,
}

/// What a worker reports about a task, on the `outcomes` queue.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Outcome {
    /// The worker began executing; doubles as the first heartbeat.
    Started {
        output_id: i64,
        attempt: i64,
        worker: String,
    },
    /// Still working: extends the lease.
    Heartbeat { output_id: i64, attempt: i64 },
    Completed {
        output_id: i64,
        attempt: i64,
        result: OutputResult,
    },
    Failed {
        output_id: i64,
        attempt: i64,
        failure: FailureKind,
        message: String,
    },
}

impl Outcome {
    pub fn output_id(&self) -> i64 {
        match self {
            Outcome::Started { output_id, .. }
            | Outcome::Heartbeat { output_id, .. }
            | Outcome::Completed { output_id, .. }
            | Outcome::Failed { output_id, .. } => *output_id,
        }
    }
}

/// The stored artefacts of a completed output.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct OutputResult {
    pub full_key: String,
    pub thumb_key: String,
    pub format: String,
    pub width: u32,
    pub height: u32,
    /// Engine that really produced the image (e.g. `atelier-basic`).
    pub model_used: String,
    pub processing_ms: i64,
    /// Free-form engine-side description of what was done with the inputs.
    pub input_description: serde_json::Value,
    /// The post-processing pass ran on this output (`post_process: true`).
    #[serde(default)]
    pub post_processed: bool,
}
