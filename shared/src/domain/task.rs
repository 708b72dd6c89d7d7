//! What flows between the scheduler and the workers: a [`Task`] on a work
//! queue, an [`Outcome`] back on the outcome queue.
//!
//! A task carries everything its worker needs (the typed spec, the object
//! keys of its inputs, the identity face it uses, which output and attempt
//! it is, until when), so workers hold no database credentials: only the
//! broker's and the object store's. Whether a report still matters is
//! decided where it is recorded: the scheduler applies an outcome only to
//! the output's live attempt.

use super::identity::FaceRecord;
use super::kinds::JobSpec;
use serde::{Deserialize, Serialize};

/// The queue workers report [`Outcome`]s on; the scheduler consumes it.
pub const OUTCOME_QUEUE: &str = "outcomes";
/// The queue through which the outbox relay wakes the scheduler (a job was
/// admitted); consumed by the replica that dispatches (the holder of the
/// dispatch duty).
pub const WAKE_QUEUE: &str = "scheduler";

/// The object that tells the worker running `attempt` of an output to stop
/// (the job was aborted): written by the API after the abort commits,
/// looked for by the worker while the task runs, deleted by it once seen.
pub fn cancel_marker(output_id: i64, attempt: i64) -> String {
    format!("control/cancel/{output_id}-a{attempt}")
}

/// The id a trainer container knows one attempt of a training by.
pub fn training_run_id(output_id: i64, attempt: i64) -> String {
    format!("atl-{output_id}-a{attempt}")
}

/// The object that says which trainer container holds `attempt` of a
/// training output: written by the worker before it starts the training
/// there, read by a worker that re-attaches to it (the first one died) and
/// by the worker of a later attempt, which cancels it there first.
pub fn training_claim(output_id: i64, attempt: i64) -> String {
    format!("control/training/{output_id}-a{attempt}/claim.json")
}

/// The object that says how `attempt` of a training ended, written by the
/// API once the trainer's completion webhook is recorded; the worker
/// holding the training's slot waits for it.
pub fn training_end(output_id: i64, attempt: i64) -> String {
    format!("control/training/{output_id}-a{attempt}/end.json")
}

/// What [`training_claim`] holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingClaim {
    /// The trainer container's base URL.
    pub url: String,
    pub worker: String,
    pub at_ms: i64,
}

/// What [`training_end`] holds: how the attempt ended, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingEnd {
    /// `succeeded`, `failed` or `canceled` (the trainer's word).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<OutputResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The URLs a training task carries, signed by the scheduler when it
/// dispatches the attempt: where the trainer reads the frozen dataset and
/// where it reports (a per-attempt webhook on the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingLinks {
    pub dataset_url: String,
    pub webhook_url: String,
}

/// The queues workers consume, one per pool of workers that scale apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkQueue {
    /// Packshot pipelines (segmentation, upscaling, compositing).
    Packshot,
    /// Model swap (face models).
    Swap,
    /// Identity and profile preprocessing (face models).
    Identity,
    /// Generative kinds (flat-2-model, …): workers in front of the
    /// operator's generator containers.
    Generate,
    /// Trainings: workers in front of the operator's trainer containers,
    /// one training per container for its whole run.
    Training,
}

impl WorkQueue {
    pub const ALL: [WorkQueue; 5] = [
        WorkQueue::Packshot,
        WorkQueue::Swap,
        WorkQueue::Identity,
        WorkQueue::Generate,
        WorkQueue::Training,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkQueue::Packshot => "packshot",
            WorkQueue::Swap => "swap",
            WorkQueue::Identity => "identity",
            WorkQueue::Generate => "generate",
            WorkQueue::Training => "training",
        }
    }

    pub fn parse(s: &str) -> Option<WorkQueue> {
        WorkQueue::ALL.into_iter().find(|q| q.as_str() == s)
    }
}

impl std::fmt::Display for WorkQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for WorkQueue {
    type Error = super::UnknownName;

    fn try_from(s: String) -> Result<WorkQueue, Self::Error> {
        WorkQueue::parse(&s).ok_or(super::UnknownName {
            what: "work queue",
            name: s,
        })
    }
}

/// One input file of a job: where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    pub file_id: String,
    pub object_key: String,
}

/// The identity face a job works with, fixed when it was admitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaceRef {
    /// The preprocessing job that built it.
    pub job_id: String,
    /// Object key of the aligned face crop.
    pub crop_key: String,
    pub record: FaceRecord,
}

/// What admission resolved about a job's inputs (stored in `jobs.inputs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobInputs {
    /// The job's input files, in the order its spec names them.
    #[serde(default)]
    pub files: Vec<InputFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub face: Option<FaceRef>,
    /// The faces of the profiles the job names (Studio), in its order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<ProfileFace>,
}

/// A named profile's face, fixed when the job was admitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileFace {
    pub profile_id: String,
    pub face: FaceRef,
}

impl JobInputs {
    /// The object key of input `file_id`.
    pub fn key_of(&self, file_id: &str) -> Option<&str> {
        self.files
            .iter()
            .find(|f| f.file_id == file_id)
            .map(|f| f.object_key.as_str())
    }
}

/// Which output of its job a task produces, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutput {
    pub instruction_index: u32,
    pub variation_index: u32,
    /// 0 for the original output, +1 per regeneration (contract §3.11).
    #[serde(default)]
    pub version: u32,
    /// Position in the `model: auto` fallback order.
    pub engine_index: u32,
    /// Why the engine before it refused, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_refusal: Option<String>,
}

/// A task handed from the scheduler to a worker through a work queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Task {
    pub job_id: String,
    pub account_id: String,
    pub output_id: i64,
    /// 1-based attempt number this delivery is for. A report of any other
    /// attempt is ignored when the scheduler records it.
    pub attempt: i64,
    /// Epoch ms at which the scheduler reclaims the output if no worker
    /// has started it.
    pub deadline_ms: i64,
    /// W3C `traceparent` of the dispatching span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub output: TaskOutput,
    pub work: JobSpec,
    pub inputs: JobInputs,
    /// Trainings only: the signed URLs of this attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingLinks>,
    /// Predictions only: signed URLs of the trained weights the job uses,
    /// in its order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights_urls: Vec<String>,
}

/// The seed of version `version` of an output whose variation seed is
/// `variation_seed`: itself for the original, another for each regeneration.
pub fn regeneration_seed(variation_seed: u32, version: u32) -> u32 {
    variation_seed.wrapping_add(version.wrapping_mul(1_000_003))
}

impl TaskOutput {
    /// The seed a generator uses for this output: the variation's own
    /// seed for the original, a different one for each regeneration (a
    /// regeneration that drew the same picture again would be pointless).
    pub fn seed(&self, variation_seed: u32) -> u32 {
        regeneration_seed(variation_seed, self.version)
    }
}

impl Task {
    /// Object keys of one run of this task: unique per run, not only per
    /// attempt, so a redelivered attempt never overwrites the objects of a
    /// run that was already recorded.
    pub fn run_base(&self) -> String {
        format!(
            "results/{}/{}/{}-a{}-{}",
            self.account_id,
            self.job_id,
            self.output_id,
            self.attempt,
            ulid::Ulid::new().to_string().to_lowercase()
        )
    }
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

/// What a worker reports about a task, on the outcome queue.
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
