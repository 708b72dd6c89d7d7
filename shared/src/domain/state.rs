//! Job and output state machines. The store's CHECK constraints and the
//! `WHERE status IN (..)` guards of every state-changing query are derived
//! from [`OutputStatus::sources_of`], so the SQL and this file cannot drift.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobType {
    CreatePackshot,
    ModelSwap,
    Flat2Model,
    IdentityCreation,
    IdentityPreprocessing,
}

impl JobType {
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::CreatePackshot => "create_packshot",
            JobType::ModelSwap => "model_swap",
            JobType::Flat2Model => "flat_2_model",
            JobType::IdentityCreation => "identity_creation",
            JobType::IdentityPreprocessing => "identity_preprocessing",
        }
    }

    pub fn parse(s: &str) -> Option<JobType> {
        [
            JobType::CreatePackshot,
            JobType::ModelSwap,
            JobType::Flat2Model,
            JobType::IdentityCreation,
            JobType::IdentityPreprocessing,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }

    /// The work queue that carries this job type's tasks (DESIGN.md).
    pub fn queue(self) -> &'static str {
        match self {
            JobType::CreatePackshot => "packshot",
            JobType::ModelSwap | JobType::Flat2Model => "swap",
            JobType::IdentityCreation | JobType::IdentityPreprocessing => "identity",
        }
    }

    /// Whether jobs of this type count against the account's active-job cap
    /// (contract §1.9, §11 #5).
    pub fn counts_against_cap(self) -> bool {
        !matches!(self, JobType::IdentityPreprocessing)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Aborted,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::Processing,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Processing => "processing",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Aborted
        )
    }

    /// Legal job transitions: forward only, terminal states are final.
    pub fn can_transition(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Pending, Processing) | (Pending | Processing, Completed | Failed | Aborted)
        )
    }

    /// The terminal status of a job whose outputs are all terminal
    /// (contract §11 #33): completed if at least one output completed.
    pub fn finished(completed_outputs: i64) -> JobStatus {
        if completed_outputs > 0 {
            JobStatus::Completed
        } else {
            JobStatus::Failed
        }
    }
}

/// Internal output states. The contract shows four (`pending`, `processing`,
/// `completed`, `failed`); `dispatched` is shown as `pending` (queued, not
/// started) and `cancelled` as `failed` with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStatus {
    /// Waiting for dispatch; eligible once `scheduled_at` has passed.
    Pending,
    /// A task for the current attempt is in a work queue; leased until its deadline.
    Dispatched,
    /// A worker reported it started; the lease is extended by heartbeats.
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl OutputStatus {
    pub const ALL: [OutputStatus; 6] = [
        OutputStatus::Pending,
        OutputStatus::Dispatched,
        OutputStatus::Running,
        OutputStatus::Completed,
        OutputStatus::Failed,
        OutputStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutputStatus::Pending => "pending",
            OutputStatus::Dispatched => "dispatched",
            OutputStatus::Running => "running",
            OutputStatus::Completed => "completed",
            OutputStatus::Failed => "failed",
            OutputStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<OutputStatus> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            OutputStatus::Completed | OutputStatus::Failed | OutputStatus::Cancelled
        )
    }

    /// Holds a lease (`lease_expires_at` set).
    pub fn is_leased(self) -> bool {
        matches!(self, OutputStatus::Dispatched | OutputStatus::Running)
    }

    /// The status the public contract shows.
    pub fn public(self) -> &'static str {
        match self {
            OutputStatus::Pending | OutputStatus::Dispatched => "pending",
            OutputStatus::Running => "processing",
            OutputStatus::Completed => "completed",
            OutputStatus::Failed | OutputStatus::Cancelled => "failed",
        }
    }

    /// Legal output transitions.
    ///
    /// ```text
    /// pending ──dispatch──▶ dispatched ──start──▶ running ──▶ completed
    ///    ▲                     │   │                 │  │
    ///    └──── retry ──────────┘   └──── complete ───┼──┘ (a fast worker may
    ///    ▲                                           │     finish before the
    ///    └──────────────── retry ────────────────────┘     start is recorded)
    /// any non-terminal ──▶ failed | cancelled
    /// ```
    pub fn can_transition(self, to: OutputStatus) -> bool {
        use OutputStatus::*;
        match (self, to) {
            (Pending, Dispatched) => true,
            (Dispatched, Running) => true,
            (Dispatched | Running, Completed) => true,
            (Dispatched | Running, Pending) => true,
            (Pending | Dispatched | Running, Failed | Cancelled) => true,
            _ => false,
        }
    }

    /// Every status from which `to` may be reached: the guard of the SQL
    /// statement that performs the transition.
    pub fn sources_of(to: OutputStatus) -> Vec<OutputStatus> {
        Self::ALL
            .into_iter()
            .filter(|s| s.can_transition(to))
            .collect()
    }

    /// `'a','b'` for an SQL `IN (..)` list of the sources of `to`.
    pub fn sql_sources_of(to: OutputStatus) -> String {
        Self::sources_of(to)
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_output_status() -> impl Strategy<Value = OutputStatus> {
        (0usize..OutputStatus::ALL.len()).prop_map(|i| OutputStatus::ALL[i])
    }

    proptest! {
        /// Walking the machine with arbitrary requested moves, only legal
        /// moves are applied; once terminal, nothing changes any more.
        #[test]
        fn outputs_only_move_legally(moves in prop::collection::vec(any_output_status(), 0..50)) {
            let mut s = OutputStatus::Pending;
            let mut terminal_seen: Option<OutputStatus> = None;
            for to in moves {
                if s.can_transition(to) {
                    prop_assert!(!s.is_terminal());
                    s = to;
                }
                if let Some(t) = terminal_seen { prop_assert_eq!(s, t); }
                if s.is_terminal() { terminal_seen = Some(s); }
            }
        }

        #[test]
        fn jobs_never_leave_terminal_states(a in 0usize..5, b in 0usize..5) {
            let (from, to) = (JobStatus::ALL[a], JobStatus::ALL[b]);
            if from.is_terminal() { prop_assert!(!from.can_transition(to)); }
            if from.can_transition(to) { prop_assert_ne!(from, to); }
        }
    }

    #[test]
    fn sources_match_the_diagram() {
        assert_eq!(
            OutputStatus::sql_sources_of(OutputStatus::Dispatched),
            "'pending'"
        );
        assert_eq!(
            OutputStatus::sql_sources_of(OutputStatus::Completed),
            "'dispatched','running'"
        );
        assert_eq!(
            OutputStatus::sql_sources_of(OutputStatus::Cancelled),
            "'pending','dispatched','running'"
        );
        assert_eq!(OutputStatus::Dispatched.public(), "pending");
        assert_eq!(JobStatus::finished(0), JobStatus::Failed);
        assert_eq!(JobStatus::finished(1), JobStatus::Completed);
    }
}
