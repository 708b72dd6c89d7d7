//! The embedded queue: durable messages in the `queue_messages` table of the
//! store, so `cargo run` needs no broker and keeps the same guarantees.
//!
//! A delivery takes a lease (`locked_until`) owned by this process; a
//! background task renews the leases of deliveries still held every
//! [`RENEW_EVERY`], so a message held by a process that died becomes visible
//! again within [`LEASE`] — the same effect as RabbitMQ requeueing what a
//! closed channel held. Publishes in this process wake its consumers at
//! once; other processes and delayed messages are found by polling.

use super::{Acker, Consumer, Delivery, Headers, MAX_DELIVERIES, Message, Queue, QueueError};
use crate::db::Store;
use crate::time::now_ms;
use async_trait::async_trait;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// Lease of a delivery that is not renewed.
pub const LEASE: Duration = Duration::from_secs(30);
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(200);

#[derive(Clone)]
pub struct EmbeddedQueue {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    owner: String,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    held: Mutex<HashSet<i64>>,
    shutdown: CancellationToken,
    lease: Duration,
}

impl EmbeddedQueue {
    /// Starts the lease-renewal task; it stops with `shutdown`.
    pub fn new(store: Store, shutdown: CancellationToken) -> EmbeddedQueue {
        Self::with_lease(store, shutdown, LEASE, RENEW_EVERY)
    }

    /// As [`EmbeddedQueue::new`] with another lease (tests use short ones).
    pub fn with_lease(
        store: Store,
        shutdown: CancellationToken,
        lease: Duration,
        renew_every: Duration,
    ) -> EmbeddedQueue {
        let inner = Arc::new(Inner {
            store,
            owner: format!("proc_{}", ulid::Ulid::new()),
            wakers: Mutex::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
            shutdown,
            lease,
        });
        let renew = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = renew.upgrade() else { return };
                let stop = inner.shutdown.clone();
                let ids: Vec<i64> = inner
                    .held
                    .lock()
                    .map(|h| h.iter().copied().collect())
                    .unwrap_or_default();
                for id in ids {
                    let r = sqlx::query("UPDATE queue_messages SET locked_until = $2 WHERE id = $1 AND lock_owner = $3")
                        .bind(id)
                        .bind(now_ms() + inner.lease.as_millis() as i64)
                        .bind(&inner.owner)
                        .execute(inner.store.pool())
                        .await;
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "embedded queue: lease renewal failed");
                    }
                }
                drop(inner);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(renew_every) => {}
                }
            }
        });
        EmbeddedQueue { inner }
    }

    /// Makes every delivery held by any process visible again. Only for a
    /// process that knows it is the only one on the database (the embedded
    /// mode's node lock): what is held was held by a process that died.
    pub async fn release_orphans(store: &Store) -> Result<u64, QueueError> {
        let r = sqlx::query(
            "UPDATE queue_messages SET locked_until = NULL, lock_owner = NULL WHERE lock_owner IS NOT NULL",
        )
        .execute(store.pool())
        .await
        .map_err(db)?;
        Ok(r.rows_affected())
    }

    fn waker(&self, queue: &str) -> Arc<Notify> {
        let mut w = self.inner.wakers.lock().unwrap_or_else(|p| p.into_inner());
        w.entry(queue.to_string())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Claims the oldest visible message of `queue`, dead-lettering any that
    /// exceeded the delivery limit on the way.
    async fn claim(&self, queue: &str) -> Result<Option<(i64, String, Headers, i64)>, QueueError> {
        let store = &self.inner.store;
        loop {
            let now = now_ms();
            let mut tx = store.begin().await?;
            let sql = format!(
                "SELECT id FROM queue_messages WHERE queue = $1 AND available_at <= $2 \
                 AND (locked_until IS NULL OR locked_until < $2) ORDER BY available_at, id LIMIT 1{}",
                store.skip_locked()
            );
            let id: Option<i64> = sqlx::query_scalar(&sql)
                .bind(queue)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
            let Some(id) = id else {
                tx.rollback().await.map_err(db)?;
                return Ok(None);
            };
            let row: Option<(String, String, i64)> = sqlx::query_as(
                "UPDATE queue_messages SET locked_until = $2, lock_owner = $3, deliveries = deliveries + 1 \
                 WHERE id = $1 AND (locked_until IS NULL OR locked_until < $4) RETURNING payload, headers, deliveries",
            )
            .bind(id)
            .bind(now + self.inner.lease.as_millis() as i64)
            .bind(&self.inner.owner)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            let Some((payload, headers, deliveries)) = row else {
                tx.rollback().await.map_err(db)?;
                continue;
            };
            if deliveries > MAX_DELIVERIES {
                move_to_dead(&mut tx, id, queue, "delivery limit exceeded").await?;
                tx.commit().await.map_err(db)?;
                metrics::counter!("atelier_queue_dead_letters_total", "queue" => queue.to_string())
                    .increment(1);
                tracing::warn!(
                    queue,
                    message_id = id,
                    "embedded queue: dead-lettered after {MAX_DELIVERIES} deliveries"
                );
                continue;
            }
            tx.commit().await.map_err(db)?;
            let headers: Headers = serde_json::from_str(&headers).unwrap_or_default();
            return Ok(Some((id, payload, headers, deliveries)));
        }
    }
}

fn db(e: sqlx::Error) -> QueueError {
    QueueError::from(crate::db::StoreError::from(e))
}

async fn move_to_dead(
    tx: &mut crate::db::Tx,
    id: i64,
    queue: &str,
    reason: &str,
) -> Result<(), QueueError> {
    sqlx::query(
        "UPDATE queue_messages SET queue = $2, locked_until = NULL, lock_owner = NULL, deliveries = 0, available_at = $3, headers = $4 WHERE id = $1",
    )
    .bind(id)
    .bind(format!("{queue}.dead"))
    .bind(now_ms())
    .bind(serde_json::json!({"x-death-reason": reason, "x-original-queue": queue}).to_string())
    .execute(&mut **tx)
    .await
    .map_err(db)?;
    Ok(())
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn publish(&self, queue: &str, m: Message) -> Result<(), QueueError> {
        let now = now_ms();
        let at = now + m.delay.map(|d| d.as_millis() as i64).unwrap_or(0);
        let headers =
            serde_json::to_string(&m.headers).map_err(|e| QueueError::Other(e.to_string()))?;
        sqlx::query("INSERT INTO queue_messages (queue, payload, headers, available_at, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(queue)
            .bind(&m.payload)
            .bind(headers)
            .bind(at)
            .bind(now)
            .execute(self.inner.store.pool())
            .await
            .map_err(db)?;
        if m.delay.is_none() {
            self.waker(queue).notify_waiters();
        }
        Ok(())
    }

    async fn consume(&self, queue: &str, prefetch: usize) -> Result<Consumer, QueueError> {
        let (tx, rx) = mpsc::channel(prefetch.max(1));
        let permits = Arc::new(Semaphore::new(prefetch.max(1)));
        let this = self.clone();
        let queue = queue.to_string();
        let waker = self.waker(&queue);
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    _ = this.inner.shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                };
                let notified = waker.notified();
                match this.claim(&queue).await {
                    Ok(Some((id, payload, headers, deliveries))) => {
                        if let Ok(mut h) = this.inner.held.lock() {
                            h.insert(id);
                        }
                        let acker = EmbeddedAcker {
                            queue: this.clone(),
                            id,
                            name: queue.clone(),
                            permit: Mutex::new(Some(permit)),
                        };
                        if let Err(mpsc::error::SendError(unread)) = tx
                            .send(Delivery::new(payload, headers, deliveries, Box::new(acker)))
                            .await
                        {
                            // The consumer went away between the claim and
                            // the hand-over: the message goes back at once
                            // instead of waiting for its lease to run out.
                            let _ = unread.nack(None).await;
                            return;
                        }
                    }
                    Ok(None) => {
                        drop(permit);
                        tokio::select! {
                            _ = this.inner.shutdown.cancelled() => return,
                            _ = tx.closed() => return,
                            _ = notified => {}
                            _ = tokio::time::sleep(POLL) => {}
                        }
                    }
                    Err(e) => {
                        drop(permit);
                        tracing::warn!(queue = %queue, error = %e, "embedded queue: claim failed; retrying");
                        tokio::select! {
                            _ = this.inner.shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        });
        Ok(Consumer::new(rx))
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM queue_messages WHERE queue = $1 AND (locked_until IS NULL OR locked_until < $2)",
        )
        .bind(queue)
        .bind(now_ms())
        .fetch_one(self.inner.store.pool())
        .await
        .map_err(db)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

struct EmbeddedAcker {
    queue: EmbeddedQueue,
    id: i64,
    name: String,
    /// Released when the delivery is settled (or dropped): bounded prefetch.
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl EmbeddedAcker {
    fn settle(&self) {
        if let Ok(mut h) = self.queue.inner.held.lock() {
            h.remove(&self.id);
        }
        if let Ok(mut p) = self.permit.lock() {
            p.take();
        }
    }
}

impl Drop for EmbeddedAcker {
    fn drop(&mut self) {
        // Neither acked nor nacked: stop renewing; the lease runs out and the
        // message is redelivered.
        self.settle();
    }
}

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn ack(&self) -> Result<(), QueueError> {
        let r = sqlx::query("DELETE FROM queue_messages WHERE id = $1 AND lock_owner = $2")
            .bind(self.id)
            .bind(&self.queue.inner.owner)
            .execute(self.queue.inner.store.pool())
            .await
            .map_err(db);
        self.settle();
        r.map(|_| ())
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<(), QueueError> {
        let at = now_ms() + delay.map(|d| d.as_millis() as i64).unwrap_or(0);
        let r = sqlx::query(
            "UPDATE queue_messages SET locked_until = NULL, lock_owner = NULL, available_at = $2 WHERE id = $1 AND lock_owner = $3",
        )
        .bind(self.id)
        .bind(at)
        .bind(&self.queue.inner.owner)
        .execute(self.queue.inner.store.pool())
        .await
        .map_err(db);
        self.settle();
        if delay.is_none() {
            self.queue.waker(&self.name).notify_waiters();
        }
        r.map(|_| ())
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), QueueError> {
        let mut tx = self.queue.inner.store.begin().await?;
        move_to_dead(&mut tx, self.id, &self.name, reason).await?;
        tx.commit().await.map_err(db)?;
        metrics::counter!("atelier_queue_dead_letters_total", "queue" => self.name.clone())
            .increment(1);
        self.settle();
        Ok(())
    }
}
