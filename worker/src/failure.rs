//! Failure classification: every way a task can fail maps to one
//! [`FailureKind`], which alone decides what the scheduler does next.

use atelier_shared::domain::FailureKind;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TaskFailure {
    pub kind: FailureKind,
    /// Readable by the API client (shown as `error_message`).
    pub message: String,
}

impl TaskFailure {
    pub fn retryable(message: impl Into<String>) -> Self {
        TaskFailure {
            kind: FailureKind::Retryable,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        TaskFailure {
            kind: FailureKind::Permanent,
            message: message.into(),
        }
    }

    pub fn refused(message: impl Into<String>) -> Self {
        TaskFailure {
            kind: FailureKind::Refused,
            message: message.into(),
        }
    }
}

impl From<atelier_shared::db::StoreError> for TaskFailure {
    fn from(e: atelier_shared::db::StoreError) -> Self {
        // The store failing is never the input's fault.
        TaskFailure::retryable(format!("store: {e}"))
    }
}

impl From<atelier_shared::storage::StorageError> for TaskFailure {
    fn from(e: atelier_shared::storage::StorageError) -> Self {
        use atelier_shared::storage::StorageError as S;
        match e {
            S::NotFound(k) => {
                TaskFailure::permanent(format!("input image {k} is missing from storage"))
            }
            S::InvalidKey(k) => TaskFailure::permanent(format!("invalid object key {k}")),
            S::Unavailable(m) => TaskFailure::retryable(format!("object store unavailable: {m}")),
            S::Refused(m) => TaskFailure::permanent(format!("object store refused: {m}")),
        }
    }
}
