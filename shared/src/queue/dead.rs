//! Dead letters: what `<queue>.dead` holds (deliveries that failed too
//! often, reports that could not be read), looked at and moved back to
//! their queue by operators (`atelier admin dead-letters`, the console's
//! operator view).
//!
//! Looking takes the messages and hands them back, so two operators
//! looking at once each see part of them; moving one back publishes it
//! first and removes it after (at least once: a message may be replayed
//! twice if the second step fails, never lost).

use super::{DynQueue, Message, QueueError};
use crate::domain::task::{OUTCOME_QUEUE, WAKE_QUEUE};
use crate::domain::{Task, WorkQueue};
use std::time::Duration;

/// Every queue that has dead letters: the work queues, the workers'
/// reports and the scheduler's wake-ups.
pub fn queues() -> Vec<&'static str> {
    WorkQueue::ALL
        .iter()
        .map(|q| q.as_str())
        .chain([OUTCOME_QUEUE, WAKE_QUEUE])
        .collect()
}

/// `name` if it is one of [`queues`], else why not (naming them).
pub fn known(name: &str) -> Result<&'static str, String> {
    queues()
        .into_iter()
        .find(|q| *q == name)
        .ok_or_else(|| format!("no queue {name:?}; the queues are {}", queues().join(", ")))
}

/// The dead-letter queue of `queue`.
pub fn of(queue: &str) -> String {
    format!("{queue}.dead")
}

/// One dead letter, described (never its payload: it may carry signed URLs).
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// The queue it came from.
    pub original_queue: Option<String>,
    /// When it is a task: its job, output and attempt.
    pub job_id: Option<String>,
    pub output_id: Option<i64>,
    pub attempt: Option<i64>,
    pub payload_bytes: usize,
}

/// How long a dead-letter queue may stay silent before it counts as read.
const DRAINED: Duration = Duration::from_millis(500);

/// Lets a dropped consumer hand back what it had fetched but not passed on
/// (it does so on tasks of its own) before the caller goes on.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// How many dead letters `queue` has, and the first `limit` of them
/// described (none read when it has none).
pub async fn look(
    q: &DynQueue,
    queue: &str,
    limit: usize,
) -> Result<(u64, Vec<DeadLetter>), QueueError> {
    let depth = q.depth(&of(queue)).await?;
    let first = if depth > 0 {
        peek(q, queue, limit).await?
    } else {
        Vec::new()
    };
    Ok((depth, first))
}

/// Up to `limit` dead letters of `queue`, described; every one handed back.
pub async fn peek(q: &DynQueue, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut consumer = q.consume(&of(queue), limit).await?;
    let mut held = Vec::new();
    while held.len() < limit {
        match tokio::time::timeout(DRAINED, consumer.next()).await {
            Ok(Some(d)) => held.push(d),
            _ => break,
        }
    }
    // Stop fetching first, so that nothing handed back is fetched again.
    drop(consumer);
    let mut shown = Vec::with_capacity(held.len());
    let mut first_error = None;
    for d in held {
        let task: Option<Task> = d.parse().ok();
        shown.push(DeadLetter {
            reason: d.headers.get("x-death-reason").cloned(),
            original_queue: d.headers.get("x-original-queue").cloned(),
            job_id: task.as_ref().map(|t| t.job_id.clone()),
            output_id: task.as_ref().map(|t| t.output_id),
            attempt: task.as_ref().map(|t| t.attempt),
            payload_bytes: d.payload.len(),
        });
        // Hand back every one even if one fails (it then comes back
        // when its delivery lapses).
        if let Err(e) = d.nack(None).await {
            first_error.get_or_insert(e);
        }
    }
    settle().await;
    match first_error {
        Some(e) => Err(e),
        None => Ok(shown),
    }
}

/// Moves up to `limit` (or every) dead letter of `queue` back to it,
/// without the dead-letter headers; returns how many.
pub async fn replay(q: &DynQueue, queue: &str, limit: Option<usize>) -> Result<usize, QueueError> {
    let limit = limit.unwrap_or(usize::MAX);
    if limit == 0 {
        return Ok(0);
    }
    let mut consumer = q.consume(&of(queue), limit.clamp(1, 16)).await?;
    let mut replayed = 0;
    while replayed < limit {
        let Ok(Some(d)) = tokio::time::timeout(DRAINED, consumer.next()).await else {
            break;
        };
        let mut headers = d.headers.clone();
        headers.retain(|k, _| !k.starts_with("x-"));
        q.publish(
            queue,
            Message {
                payload: d.payload.clone(),
                headers,
                delay: None,
            },
        )
        .await?;
        d.ack().await?;
        replayed += 1;
    }
    drop(consumer);
    settle().await;
    Ok(replayed)
}
