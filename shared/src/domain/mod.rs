//! Pure domain types and decisions. Nothing here performs I/O, so every rule
//! (legal state transitions, credit arithmetic, prices, retry schedule,
//! fair-share pick, what each job kind declares) is unit- and
//! property-tested in isolation.

pub mod assets;
pub mod credits;
pub mod drafts;
pub mod engines;
pub mod extract;
pub mod extraction;
pub mod fair;
pub mod flat;
pub mod identity;
pub mod images;
pub mod ids;
pub mod kinds;
pub mod packshot;
pub mod policy;
pub mod prediction;
pub mod presets;
pub mod retry;
pub mod state;
pub mod studio;
pub mod swap;
pub mod task;
pub mod trace;
pub mod training;

pub use credits::Credits;
pub use ids::{AccountId, FileId, JobId, ProjectId};
pub use kinds::{JobKind, JobSpec, JobType};
pub use state::{JobStatus, OutputStatus, Plan};
pub use task::{FailureKind, Outcome, OutputResult, Task, WorkQueue};

/// A stored name (status, kind, queue, plan) that this version does not
/// know: reading it is an error, never a default.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{name}`")]
pub struct UnknownName {
    pub what: &'static str,
    pub name: String,
}
