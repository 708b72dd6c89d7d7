//! Job and output state machines, and account plans. The `WHERE status IN
//! (..)` guards of every state-changing query are derived from
//! [`OutputStatus::sources_of`], so the SQL and this file cannot drift.
//! Rows decode into these enums; an unknown stored name is an error.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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

    /// The states of a job that is not finished (holds its slot and
    /// reservation).
    pub const OPEN: [JobStatus; 2] = [JobStatus::Pending, JobStatus::Processing];

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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

    /// Not terminal: its cost is still reserved.
    pub const OPEN: [OutputStatus; 3] = [
        OutputStatus::Pending,
        OutputStatus::Dispatched,
        OutputStatus::Running,
    ];
    /// Holding a lease.
    pub const LEASED: [OutputStatus; 2] = [OutputStatus::Dispatched, OutputStatus::Running];

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
        Self::sql_in(&Self::sources_of(to))
    }
}

/// Implements `TryFrom<String>` (row decoding) for a state enum with `parse`.
macro_rules! decode_from_text {
    ($t:ty, $what:literal) => {
        impl TryFrom<String> for $t {
            type Error = super::UnknownName;

            fn try_from(s: String) -> Result<$t, Self::Error> {
                <$t>::parse(&s).ok_or(super::UnknownName {
                    what: $what,
                    name: s,
                })
            }
        }

        impl $t {
            /// `'a','b'` for an SQL `IN (..)` list of these values.
            pub fn sql_in(items: &[$t]) -> String {
                items
                    .iter()
                    .map(|s| format!("'{}'", s.as_str()))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

decode_from_text!(JobStatus, "job status");
decode_from_text!(OutputStatus, "output status");
decode_from_text!(Plan, "plan");

/// An account's plan: enterprise accounts are exempt from the caps and
/// weigh more in the fair share (contract §1.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    Standard,
    Enterprise,
}

impl Plan {
    pub const ALL: [Plan; 2] = [Plan::Standard, Plan::Enterprise];

    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Standard => "standard",
            Plan::Enterprise => "enterprise",
        }
    }

    pub fn parse(s: &str) -> Option<Plan> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_output_status() -> impl Strategy<Value = OutputStatus> {
        (0usize..OutputStatus::ALL.len()).prop_map(|i| OutputStatus::ALL[i])
    }

    /// A completion comes only from a leased state: the store guards a
    /// completion report by this alone, without reading the output first.
    #[test]
    fn only_leased_outputs_complete() {
        assert_eq!(
            OutputStatus::sources_of(OutputStatus::Completed),
            OutputStatus::LEASED.to_vec()
        );
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
