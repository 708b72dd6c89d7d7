//! Work queues between roles. The database owns state; a queue only carries
//! work, so every consumer is idempotent and acks a delivery only after the
//! state change it causes has committed.
//!
//! Queues used by Atelier:
//!
//! | queue | producer | consumer | message |
//! |---|---|---|---|
//! | `scheduler` ([`crate::domain::task::WAKE_QUEUE`]) | outbox relay | scheduler | wake-ups (one per relayed batch of `job_created` rows) |
//! | one per [`crate::domain::WorkQueue`] (`packshot`, `swap`, `identity`) | scheduler | workers | [`crate::domain::Task`] |
//! | `outcomes` ([`crate::domain::task::OUTCOME_QUEUE`]) | workers | scheduler | [`crate::domain::Outcome`] |
//!
//! Semantics every implementation keeps (one conformance suite checks them):
//! durable publish (returns only once the message is safe), at-least-once
//! delivery, manual ack, bounded prefetch per consumer, redelivery of what a
//! dead consumer held, delayed publish, and dead-lettering to `<queue>.dead`
//! after [`MAX_DELIVERIES`] deliveries.

pub mod dead;
pub mod embedded;
pub mod rabbitmq;

use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A message delivered this many times without an ack is dead-lettered.
pub const MAX_DELIVERIES: i64 = 10;

pub type Headers = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    #[error("queue error: {0}")]
    Other(String),
}

impl From<crate::db::StoreError> for QueueError {
    fn from(e: crate::db::StoreError) -> Self {
        if e.is_unavailable() {
            QueueError::Unavailable(e.to_string())
        } else {
            QueueError::Other(e.to_string())
        }
    }
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub payload: String,
    pub headers: Headers,
    /// Deliver no earlier than this far in the future.
    pub delay: Option<Duration>,
}

impl Message {
    pub fn json<T: serde::Serialize>(v: &T) -> Result<Message, QueueError> {
        Ok(Message {
            payload: serde_json::to_string(v).map_err(|e| QueueError::Other(e.to_string()))?,
            headers: Headers::new(),
            delay: None,
        })
    }

    pub fn with_header(mut self, k: &str, v: impl Into<String>) -> Message {
        self.headers.insert(k.to_string(), v.into());
        self
    }
}

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Publishes durably: returns once the broker (or store) has the message.
    async fn publish(&self, queue: &str, message: Message) -> Result<(), QueueError>;

    /// Starts consuming `queue` with at most `prefetch` unacknowledged deliveries.
    async fn consume(&self, queue: &str, prefetch: usize) -> Result<Consumer, QueueError>;

    /// Messages waiting (ready or delayed, not in flight) in `queue`.
    async fn depth(&self, queue: &str) -> Result<u64, QueueError>;

    /// Short name for logs and metrics (`embedded`, `rabbitmq`).
    fn kind(&self) -> &'static str;
}

/// Settles a delivery with the implementation that produced it.
#[async_trait]
pub trait Acker: Send + Sync {
    async fn ack(&self) -> Result<(), QueueError>;
    /// Returns the message to the queue, visible again after `delay`.
    async fn nack(&self, delay: Option<Duration>) -> Result<(), QueueError>;
    /// Moves the message to `<queue>.dead` (poison message).
    async fn dead_letter(&self, reason: &str) -> Result<(), QueueError>;
}

pub struct Delivery {
    pub payload: String,
    pub headers: Headers,
    /// 1 for a first delivery.
    pub deliveries: i64,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("payload", &self.payload)
            .field("deliveries", &self.deliveries)
            .finish()
    }
}

impl Delivery {
    pub fn new(payload: String, headers: Headers, deliveries: i64, acker: Box<dyn Acker>) -> Self {
        Delivery {
            payload,
            headers,
            deliveries,
            acker,
        }
    }

    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.payload)
    }

    pub async fn ack(self) -> Result<(), QueueError> {
        self.acker.ack().await
    }

    pub async fn nack(self, delay: Option<Duration>) -> Result<(), QueueError> {
        self.acker.nack(delay).await
    }

    pub async fn dead_letter(self, reason: &str) -> Result<(), QueueError> {
        self.acker.dead_letter(reason).await
    }
}

/// A stream of deliveries; dropping it stops the consumer.
pub struct Consumer {
    rx: mpsc::Receiver<Delivery>,
}

impl Consumer {
    pub fn new(rx: mpsc::Receiver<Delivery>) -> Self {
        Consumer { rx }
    }

    /// The next delivery; `None` once the consumer has stopped.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }
}

/// Deliveries fetched for this consumer but never read go back to their
/// queue at once (not when a lease runs out, or the channel closes).
impl Drop for Consumer {
    fn drop(&mut self) {
        self.rx.close();
        let mut unread = Vec::new();
        while let Ok(d) = self.rx.try_recv() {
            unread.push(d);
        }
        if unread.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for d in unread {
                    let _ = d.nack(None).await;
                }
            });
        }
    }
}

pub type DynQueue = Arc<dyn Queue>;

#[cfg(test)]
pub(crate) mod conformance;
