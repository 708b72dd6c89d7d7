//! The RabbitMQ queue (lapin 4), for deployments with more than one process.
//!
//! Topology, declared lazily and idempotently the first time this connection
//! uses a name (durable queues, never deleted):
//!
//! - `<q>`: a quorum queue with `x-delivery-limit` and dead-lettering to
//!   `<q>.dead` through the default exchange, so the broker itself moves a
//!   message after [`MAX_DELIVERIES`] deliveries (see `work_queue_args`).
//! - `<q>.dead`: a quorum queue without limit or dead-lettering. Names ending
//!   in `.dead` are always declared this way (a dead queue never dead-letters
//!   further by itself, unlike the embedded queue).
//! - `<q>.delay.<ms>`: delayed delivery without the delayed-message plugin. A
//!   classic queue with `x-message-ttl = ms` that dead-letters expired messages
//!   back to `<q>`. A delay is rounded *up* to the next bucket of
//!   `DELAY_BUCKETS_MS` (100 ms … 1024 s, each at most about twice the
//!   previous), so a message never arrives early and a queue has at most 14
//!   delay queues. Longer delays wait in the largest bucket with an
//!   `x-atelier-not-before` header and take further hops until due. Unused
//!   delay queues expire (`x-expires`) 10 minutes after their TTL; this
//!   connection re-declares one at least every minute while it publishes to it
//!   (publishing alone does not renew the expiry).
//!
//! Counting deliveries: quorum queues count returns in `x-delivery-count`
//! (nack with requeue, or the consumer's channel closing with the message
//! unacked). A `nack` with a delay re-publishes a copy through a delay queue,
//! where the count would restart, so the copy carries `x-atelier-deliveries`;
//! `deliveries` is that plus `x-delivery-count` plus one. The consumer
//! dead-letters a copy that arrives past the limit itself, and a delayed nack
//! of the last allowed delivery goes straight to `<q>.dead`.
//!
//! Publishing waits for the broker's publisher confirm. A broken connection is
//! re-opened lazily, with backoff, by whatever needs it; consumers re-subscribe
//! on their own. The `shutdown` token closes the connection: what this process
//! still holds goes back to its queue, as when a process dies.

use super::{Acker, Consumer, Delivery, Headers, MAX_DELIVERIES, Message, Queue, QueueError};
use crate::time::now_ms;
use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

/// Delay buckets; a delay is rounded up to the first that is not shorter.
const DELAY_BUCKETS_MS: [u64; 14] = [
    100, 250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000,
    1_024_000,
];
const MAX_DELAY_BUCKET_MS: u64 = DELAY_BUCKETS_MS[DELAY_BUCKETS_MS.len() - 1];
/// An unused delay queue disappears this long after its TTL.
const DELAY_QUEUE_IDLE_MS: u64 = 10 * 60 * 1000;
/// Re-declaring renews `x-expires`; well within [`DELAY_QUEUE_IDLE_MS`].
const DELAY_REDECLARE_EVERY: Duration = Duration::from_secs(60);

/// Deliveries a copy had before it was re-published (through a delay queue).
const DELIVERIES_HEADER: &str = "x-atelier-deliveries";
/// Unix ms before which a message is not delivered (delays past the largest bucket).
const NOT_BEFORE_HEADER: &str = "x-atelier-not-before";
/// Returns of this copy, set by quorum queues on redeliveries.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// Broker and adapter bookkeeping, not shown in [`Delivery::headers`].
const INTERNAL_HEADERS: [&str; 3] = [DELIVERIES_HEADER, NOT_BEFORE_HEADER, DELIVERY_COUNT_HEADER];
/// Same reason text as the embedded queue.
const LIMIT_REASON: &str = "delivery limit exceeded";

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long publish, consume and connect keep retrying a broker that is down.
const RETRY_FOR: Duration = Duration::from_secs(30);
/// `depth` feeds a gauge: give up sooner.
const DEPTH_RETRY_FOR: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);
/// `delivery_mode` of a message the broker writes to disk.
const PERSISTENT: u8 = 2;
const REQUEUE: BasicNackOptions = BasicNackOptions {
    multiple: false,
    requeue: true,
};

#[derive(Clone)]
pub struct RabbitQueue {
    inner: Arc<Inner>,
    /// Prefix of every queue name on the broker (`queue.namespace`): several
    /// deployments, or parallel tests, share one broker without sharing queues.
    namespace: String,
}

struct Inner {
    url: String,
    /// `url` without its password, for messages.
    redacted: String,
    shutdown: CancellationToken,
    /// Cancelled when `Inner` is dropped: ends the shutdown watcher.
    dropped: CancellationToken,
    /// The current connection; replaced when found broken.
    conn: Mutex<Option<Arc<Connection>>>,
    /// Channel in confirm mode for every publish.
    publisher: Mutex<Option<Channel>>,
    /// Channel for declarations (a refused declaration closes its channel).
    admin: Mutex<Option<Channel>>,
    /// Names declared on the current connection, and when.
    declared: StdMutex<HashMap<String, Instant>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.dropped.cancel();
    }
}

/// Why one attempt failed, and whether another could succeed.
#[derive(Debug)]
enum Fail {
    /// The connection or a channel broke, or the broker refused or returned
    /// the message: another attempt (on a fresh connection) may succeed.
    Retry(String),
    /// Another attempt would fail the same way (bad name, inequivalent queue
    /// arguments, shut down, …).
    Fatal(QueueError),
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Retry(cause) => f.write_str(cause),
            Fail::Fatal(e) => write!(f, "{e}"),
        }
    }
}

impl From<lapin::Error> for Fail {
    fn from(e: lapin::Error) -> Fail {
        if is_transient(&e) {
            Fail::Retry(e.to_string())
        } else {
            Fail::Fatal(QueueError::Other(e.to_string()))
        }
    }
}

impl From<QueueError> for Fail {
    fn from(e: QueueError) -> Fail {
        Fail::Fatal(e)
    }
}

/// A lost connection or channel (IO, heartbeat, a connection-level AMQP
/// error such as a broker shutting down): worth reconnecting for.
fn is_transient(e: &lapin::Error) -> bool {
    match e.kind() {
        ErrorKind::IOError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::ChannelsLimitReached => true,
        ErrorKind::ProtocolError(_) => e.is_amqp_hard_error(),
        _ => false,
    }
}

/// lapin's errors as the queue's: lost connections are `Unavailable`.
fn queue_error(e: lapin::Error) -> QueueError {
    if is_transient(&e) {
        QueueError::Unavailable(e.to_string())
    } else {
        QueueError::Other(e.to_string())
    }
}

/// Retries with exponential backoff within a time budget.
struct Backoff {
    deadline: Instant,
    pause: Duration,
}

impl Backoff {
    fn new(budget: Duration) -> Backoff {
        Backoff {
            deadline: Instant::now() + budget,
            pause: BACKOFF_START,
        }
    }

    /// After a failed attempt: waits before the next one, or returns the
    /// error when it is fatal, the budget is spent or the queue shuts down.
    async fn wait(
        &mut self,
        shutdown: &CancellationToken,
        what: &str,
        fail: Fail,
    ) -> Result<(), QueueError> {
        let cause = match fail {
            Fail::Fatal(e) => return Err(e),
            Fail::Retry(cause) => cause,
        };
        if shutdown.is_cancelled() || Instant::now() + self.pause > self.deadline {
            return Err(QueueError::Unavailable(format!("{what}: {cause}")));
        }
        tracing::warn!(what, error = %cause, retry_in = ?self.pause, "rabbitmq: retrying");
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(self.pause) => {}
        }
        self.pause = (self.pause * 2).min(BACKOFF_MAX);
        Ok(())
    }
}

impl RabbitQueue {
    /// Connects to `url` (`amqp://` or `amqps://`), retrying for a while when
    /// the broker is not up yet. Cancelling `shutdown` stops the consumers
    /// and closes the connection, so the broker requeues what is unsettled.
    pub async fn connect(
        url: &str,
        namespace: &str,
        shutdown: CancellationToken,
    ) -> Result<RabbitQueue, QueueError> {
        let redacted = crate::config::redact_url(url);
        url.parse::<lapin::uri::AMQPUri>()
            .map_err(|e| QueueError::Other(format!("queue url {redacted}: {e}")))?;
        let inner = Arc::new(Inner {
            url: url.to_string(),
            redacted,
            shutdown,
            dropped: CancellationToken::new(),
            conn: Mutex::new(None),
            publisher: Mutex::new(None),
            admin: Mutex::new(None),
            declared: StdMutex::new(HashMap::new()),
        });
        let mut backoff = Backoff::new(RETRY_FOR);
        loop {
            match inner.connection().await {
                Ok(_) => break,
                Err(fail) => backoff.wait(&inner.shutdown, "connect", fail).await?,
            }
        }
        watch_shutdown(&inner);
        Ok(RabbitQueue {
            inner,
            namespace: namespace.to_string(),
        })
    }

    /// The broker's name for `queue`.
    fn name(&self, queue: &str) -> String {
        format!("{}{queue}", self.namespace)
    }

    /// Deletes `queue` and its `.dead` queue, messages and all (benches
    /// and tests clean up their namespace with it; nothing in a deployment
    /// deletes a queue). Its delay queues expire on their own. Returns the
    /// messages the two held. Not for a broker that has just booted: deleting
    /// an at-least-once dead-lettering quorum queue then could wedge
    /// RabbitMQ 3.10 until restart (seen here), so the test suite, which
    /// may start the broker, never calls it; the bench does, after a run.
    pub async fn delete_queue(&self, queue: &str) -> Result<u64, QueueError> {
        let name = self.name(queue);
        let mut deleted = 0u64;
        // The work queue first: it dead-letters into the other.
        for n in [name.clone(), dead_queue_name(&name)] {
            let mut slot = self.inner.admin.lock().await;
            let channel = match self.inner.open_channel(&mut slot, false).await {
                Ok(c) => c,
                Err(Fail::Retry(m)) => return Err(QueueError::Unavailable(m)),
                Err(Fail::Fatal(e)) => return Err(e),
            };
            let count = channel
                .queue_delete(short(&n)?, QueueDeleteOptions::default())
                .await
                .map_err(queue_error)?;
            deleted += u64::from(count);
            self.inner.forget(&n);
        }
        Ok(deleted)
    }
}

/// Closes the connection when the queue shuts down: every channel closes
/// with it and the broker requeues whatever this process held, as it does
/// when a process dies.
fn watch_shutdown(inner: &Arc<Inner>) {
    let weak = Arc::downgrade(inner);
    let stop = inner.shutdown.clone();
    let dropped = inner.dropped.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = dropped.cancelled() => return,
        }
        let Some(inner) = weak.upgrade() else { return };
        let conn = inner.conn.lock().await.take();
        drop(inner);
        if let Some(conn) = conn
            && let Err(e) = conn.close(200, "shutdown".into()).await
        {
            tracing::debug!(error = %e, "rabbitmq: closing the connection failed");
        }
    });
}

impl Inner {
    /// The open connection, reconnecting (once; callers retry) when it broke.
    async fn connection(&self) -> Result<Arc<Connection>, Fail> {
        let mut slot = self.conn.lock().await;
        // Checked under the lock: the shutdown watcher empties the slot.
        if self.shutdown.is_cancelled() {
            return Err(Fail::Fatal(QueueError::Unavailable(
                "the RabbitMQ queue is shut down".into(),
            )));
        }
        if let Some(conn) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(Arc::clone(conn));
        }
        if slot.take().is_some() {
            tracing::warn!("rabbitmq: connection lost; reconnecting");
        }
        // Declare everything again on the new connection: the broker may
        // have restarted, delay queues may have expired.
        self.declared().clear();
        let props = ConnectionProperties::default()
            .with_connection_name(format!("atelier-{}", std::process::id()).into());
        let conn = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(&self.url, props),
        )
        .await
        {
            Ok(Ok(conn)) => Arc::new(conn),
            Ok(Err(e)) => {
                return Err(Fail::Retry(format!(
                    "cannot connect to {}: {e}",
                    self.redacted
                )));
            }
            Err(_) => {
                return Err(Fail::Retry(format!(
                    "connecting to {} timed out",
                    self.redacted
                )));
            }
        };
        *slot = Some(Arc::clone(&conn));
        Ok(conn)
    }

    /// The channel in `slot`, or a new one when it is missing or closed.
    async fn open_channel(
        &self,
        slot: &mut Option<Channel>,
        confirms: bool,
    ) -> Result<Channel, Fail> {
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        *slot = None;
        let channel = self.connection().await?.create_channel().await?;
        if confirms {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        *slot = Some(channel.clone());
        Ok(channel)
    }

    fn declared(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.declared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Declared on this connection, and (for `max_age`) recently enough.
    fn declared_within(&self, name: &str, max_age: Option<Duration>) -> bool {
        self.declared()
            .get(name)
            .is_some_and(|at| max_age.is_none_or(|max| at.elapsed() < max))
    }

    fn mark_declared(&self, name: &str) {
        self.declared().insert(name.to_string(), Instant::now());
    }

    fn forget(&self, name: &str) {
        self.declared().remove(name);
    }

    /// Declares one durable queue; returns its count of ready messages.
    async fn declare(&self, name: &str, args: FieldTable) -> Result<u32, Fail> {
        let queue = short(name)?;
        let mut slot = self.admin.lock().await;
        let channel = self.open_channel(&mut slot, false).await?;
        let declared = channel
            .queue_declare(queue, QueueDeclareOptions::durable(), args)
            .await?;
        Ok(declared.message_count())
    }

    /// Declares `name` (a work queue's `.dead` queue first, so the broker
    /// always has somewhere to dead-letter to); returns its ready messages.
    async fn declare_topology(&self, name: &str) -> Result<u32, Fail> {
        let args = if is_dead_queue(name) {
            dead_queue_args()
        } else {
            let dead = dead_queue_name(name);
            if !self.declared_within(&dead, None) {
                self.declare(&dead, dead_queue_args()).await?;
                self.mark_declared(&dead);
            }
            work_queue_args(name)
        };
        let ready = self.declare(name, args).await?;
        self.mark_declared(name);
        Ok(ready)
    }

    async fn ensure_queue(&self, name: &str) -> Result<(), Fail> {
        if !self.declared_within(name, None) {
            self.declare_topology(name).await?;
        }
        Ok(())
    }

    async fn ensure_delay_queue(&self, queue: &str, bucket_ms: u64) -> Result<(), Fail> {
        let name = delay_queue_name(queue, bucket_ms);
        if self.declared_within(&name, Some(DELAY_REDECLARE_EVERY)) {
            return Ok(());
        }
        self.ensure_queue(queue).await?;
        self.declare(&name, delay_queue_args(queue, bucket_ms))
            .await?;
        self.mark_declared(&name);
        Ok(())
    }

    /// Publishes `payload` for `queue` (through a delay queue when `delay`
    /// is set) and waits for the broker's confirm, retrying across
    /// reconnections for up to [`RETRY_FOR`].
    async fn send(
        &self,
        queue: &str,
        payload: &[u8],
        mut headers: FieldTable,
        delay: Option<Duration>,
    ) -> Result<(), QueueError> {
        let (target, bucket) = match delay.filter(|d| !d.is_zero()) {
            None => (queue.to_string(), None),
            Some(d) => {
                let bucket = delay_bucket(d);
                if d.as_millis() > u128::from(MAX_DELAY_BUCKET_MS) {
                    let due =
                        now_ms().saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                    headers.insert(NOT_BEFORE_HEADER.into(), AMQPValue::LongLongInt(due));
                }
                (delay_queue_name(queue, bucket), Some(bucket))
            }
        };
        let what = format!("publish to `{target}`");
        let mut backoff = Backoff::new(RETRY_FOR);
        loop {
            // Bounded as a whole: a broker that stops reading (a memory or
            // disk alarm) must not hold the publisher lock forever.
            let left = backoff
                .deadline
                .saturating_duration_since(Instant::now())
                .max(BACKOFF_START);
            let attempt = tokio::time::timeout(
                left,
                self.send_once(queue, &target, bucket, payload, &headers),
            )
            .await
            .unwrap_or_else(|_| Err(Fail::Retry(format!("no confirm within {left:?}"))));
            match attempt {
                Ok(()) => return Ok(()),
                Err(fail) => backoff.wait(&self.shutdown, &what, fail).await?,
            }
        }
    }

    async fn send_once(
        &self,
        queue: &str,
        target: &str,
        bucket: Option<u64>,
        payload: &[u8],
        headers: &FieldTable,
    ) -> Result<(), Fail> {
        match bucket {
            None => self.ensure_queue(queue).await?,
            Some(ms) => self.ensure_delay_queue(queue, ms).await?,
        }
        self.publish_once(target, payload, headers).await
    }

    /// One confirmed, persistent, mandatory publish to `routing_key` through
    /// the default exchange.
    async fn publish_once(
        &self,
        routing_key: &str,
        payload: &[u8],
        headers: &FieldTable,
    ) -> Result<(), Fail> {
        let key = short(routing_key)?;
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers.clone());
        let confirm = {
            // Held across `basic_publish`: lapin numbers confirms in the
            // order it registers publishes, so concurrent publishes on one
            // channel must not interleave registering and sending.
            let mut slot = self.publisher.lock().await;
            let channel = self.open_channel(&mut slot, true).await?;
            channel
                .basic_publish(
                    ShortString::default(),
                    key,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    payload,
                    properties,
                )
                .await?
        };
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| {
                Fail::Retry(format!("no publisher confirm within {CONFIRM_TIMEOUT:?}"))
            })??;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                // Mandatory and unroutable: the queue is gone (an expired
                // delay queue, a deleted queue). Declare it again and retry.
                self.forget(routing_key);
                Err(Fail::Retry(format!(
                    "`{routing_key}` is unroutable ({} {})",
                    returned.reply_code, returned.reply_text
                )))
            }
            Confirmation::Nack(_) => Err(Fail::Retry(format!(
                "the broker refused the message for `{routing_key}`"
            ))),
            Confirmation::NotRequested => Err(Fail::Fatal(QueueError::Other(
                "publisher confirms are not enabled on the publishing channel".into(),
            ))),
        }
    }

    /// A new channel consuming `queue` with at most `prefetch` unacked.
    async fn subscribe(&self, queue: &str, prefetch: u16) -> Result<Subscription, Fail> {
        let name = short(queue)?;
        self.ensure_queue(queue).await?;
        let channel = self.connection().await?.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                name,
                ShortString::default(), // the broker names the consumer
                BasicConsumeOptions::default(), // manual acks (`no_ack: false`)
                FieldTable::default(),
            )
            .await
            .inspect_err(|_| self.forget(queue))?;
        Ok(Subscription { channel, consumer })
    }

    /// Forwards one subscription's deliveries until it ends.
    async fn run(
        self: &Arc<Self>,
        queue: &str,
        sub: Subscription,
        tx: &mpsc::Sender<Delivery>,
    ) -> Ended {
        let Subscription {
            channel,
            mut consumer,
        } = sub;
        let mut delivered = false;
        loop {
            let next = tokio::select! {
                // The shutdown watcher closes the connection, which hands
                // back everything unsettled.
                _ = self.shutdown.cancelled() => return Ended::Stopped,
                _ = tx.closed() => None,
                next = consumer.next() => Some(next),
            };
            let Some(next) = next else {
                stop_consuming(queue, &channel, consumer).await;
                return Ended::Stopped;
            };
            match next {
                Some(Ok(d)) => {
                    delivered = true;
                    if !self.forward(queue, &channel, d, tx).await {
                        if !self.shutdown.is_cancelled() {
                            stop_consuming(queue, &channel, consumer).await;
                        }
                        return Ended::Stopped;
                    }
                }
                _ if self.shutdown.is_cancelled() => return Ended::Stopped,
                Some(Err(e)) => {
                    tracing::warn!(queue, error = %e, "rabbitmq: consumer failed; re-subscribing");
                    return Ended::Lost { delivered };
                }
                None => {
                    tracing::warn!(
                        queue,
                        "rabbitmq: consumer cancelled by the broker; re-subscribing"
                    );
                    return Ended::Lost { delivered };
                }
            }
        }
    }

    /// Hands one delivery to the consumer, unless it is an internal hop or
    /// past the limit. Returns false once the receiver is gone.
    async fn forward(
        self: &Arc<Self>,
        queue: &str,
        channel: &Channel,
        d: lapin::message::Delivery,
        tx: &mpsc::Sender<Delivery>,
    ) -> bool {
        let table = d.properties.headers().clone().unwrap_or_default();
        let prior = int_header(&table, DELIVERIES_HEADER).unwrap_or(0).max(0);
        // `redelivered` covers a broker that does not count returns.
        let returned = int_header(&table, DELIVERY_COUNT_HEADER)
            .unwrap_or(0)
            .max(i64::from(d.redelivered));
        let deliveries = prior.saturating_add(returned).saturating_add(1);
        let headers = visible_headers(&table);
        let acker = RabbitAcker {
            inner: Arc::clone(self),
            queue: queue.to_string(),
            acker: d.acker,
            channel: channel.clone(),
            payload: d.data,
            headers: headers.clone(),
            deliveries,
            settled: AtomicBool::new(false),
        };
        let payload = match std::str::from_utf8(&acker.payload) {
            Ok(p) => p.to_string(),
            Err(_) => {
                log_internal(queue, acker.move_to_dead("payload is not UTF-8").await);
                return true;
            }
        };
        if let Some(due) = int_header(&table, NOT_BEFORE_HEADER) {
            let wait = due.saturating_sub(now_ms());
            if wait > 0 {
                // Not due yet: another hop, which is not a delivery.
                let wait = Duration::from_millis(u64::try_from(wait).unwrap_or(0));
                log_internal(queue, acker.hop(wait, deliveries - 1).await);
                return true;
            }
        }
        if !is_dead_queue(queue) && deliveries > MAX_DELIVERIES {
            log_internal(queue, acker.move_to_dead(LIMIT_REASON).await);
            return true;
        }
        let delivery = Delivery::new(payload, headers, deliveries, Box::new(acker));
        tokio::select! {
            sent = tx.send(delivery) => sent.is_ok(),
            _ = self.shutdown.cancelled() => false,
        }
    }
}

struct Subscription {
    channel: Channel,
    consumer: lapin::Consumer,
}

enum Ended {
    /// Shut down, or the receiver is gone.
    Stopped,
    /// The broker or the connection ended the subscription.
    Lost { delivered: bool },
}

/// Feeds one [`Consumer`], re-subscribing with backoff whenever the
/// subscription is lost, until shutdown or until the receiver is dropped.
async fn pump(
    inner: Arc<Inner>,
    queue: String,
    prefetch: u16,
    first: Subscription,
    tx: mpsc::Sender<Delivery>,
) {
    let mut next = Some(first);
    let mut pause = BACKOFF_START;
    loop {
        let sub = match next.take() {
            Some(sub) => sub,
            None => {
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(BACKOFF_MAX);
                let attempt = tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    attempt = inner.subscribe(&queue, prefetch) => attempt,
                };
                match attempt {
                    Ok(sub) => {
                        tracing::info!(queue = %queue, "rabbitmq: consumer re-subscribed");
                        sub
                    }
                    Err(e) => {
                        tracing::warn!(queue = %queue, error = %e, "rabbitmq: cannot re-subscribe yet");
                        continue;
                    }
                }
            }
        };
        match inner.run(&queue, sub, &tx).await {
            Ended::Stopped => return,
            Ended::Lost { delivered } => {
                if delivered {
                    pause = BACKOFF_START;
                }
                // Declare it again in case it was deleted under us.
                inner.forget(&queue);
            }
        }
    }
}

/// The receiver is gone: stop deliveries and hand back what lapin received
/// but nobody took. Deliveries already handed out keep the channel open
/// (their ackers hold it), so they can still be settled while a worker
/// drains; it closes, requeueing anything left, once the last is dropped.
async fn stop_consuming(queue: &str, channel: &Channel, mut consumer: lapin::Consumer) {
    if let Err(e) = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await
    {
        tracing::debug!(queue, error = %e, "rabbitmq: basic.cancel failed");
        return;
    }
    // After the cancel-ok the stream yields what it buffered, then ends.
    let requeue_rest = async {
        while let Some(Ok(d)) = consumer.next().await {
            let _ = d.acker.nack(REQUEUE).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), requeue_rest).await;
}

fn log_internal(queue: &str, r: Result<(), QueueError>) {
    if let Err(e) = r {
        tracing::warn!(queue, error = %e, "rabbitmq: re-publishing a delivery failed; it was requeued");
    }
}

#[async_trait]
impl Queue for RabbitQueue {
    async fn publish(&self, queue: &str, message: Message) -> Result<(), QueueError> {
        let queue = &self.name(queue);
        let headers = to_table(&message.headers)?;
        self.inner
            .send(queue, message.payload.as_bytes(), headers, message.delay)
            .await
    }

    async fn consume(&self, queue: &str, prefetch: usize) -> Result<Consumer, QueueError> {
        let queue = &self.name(queue);
        let prefetch = u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX);
        let mut backoff = Backoff::new(RETRY_FOR);
        let first = loop {
            match self.inner.subscribe(queue, prefetch).await {
                Ok(sub) => break sub,
                Err(fail) => backoff.wait(&self.inner.shutdown, "consume", fail).await?,
            }
        };
        let (tx, rx) = mpsc::channel(usize::from(prefetch));
        tokio::spawn(pump(
            Arc::clone(&self.inner),
            queue.to_string(),
            prefetch,
            first,
            tx,
        ));
        Ok(Consumer::new(rx))
    }

    /// Ready messages in `queue`. Messages waiting in its delay queues are
    /// not counted (finding them would mean declaring every bucket), nor
    /// are deliveries in flight.
    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let queue = &self.name(queue);
        let mut backoff = Backoff::new(DEPTH_RETRY_FOR);
        loop {
            match self.inner.declare_topology(queue).await {
                Ok(ready) => return Ok(u64::from(ready)),
                Err(fail) => backoff.wait(&self.inner.shutdown, "depth", fail).await?,
            }
        }
    }

    fn kind(&self) -> &'static str {
        "rabbitmq"
    }
}

/// Settles one delivery. Dropped unsettled, it requeues the message.
struct RabbitAcker {
    inner: Arc<Inner>,
    queue: String,
    acker: lapin::Acker,
    /// Keeps the consumer's channel open until this delivery is settled.
    channel: Channel,
    /// The raw body, for copies.
    payload: Vec<u8>,
    headers: Headers,
    deliveries: i64,
    settled: AtomicBool,
}

impl RabbitAcker {
    async fn ack_original(&self) -> Result<(), QueueError> {
        self.settled.store(true, Ordering::SeqCst);
        match self.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            // The channel closed: the broker redelivers the message.
            Ok(false) => Err(QueueError::Unavailable(
                "the delivery's channel closed before the ack; it will be redelivered".into(),
            )),
            Err(e) => Err(queue_error(e)),
        }
    }

    async fn requeue(&self) -> Result<(), QueueError> {
        self.settled.store(true, Ordering::SeqCst);
        // `Ok(false)`: the channel closed, which requeues it just the same.
        // `reject`, not `nack`: RabbitMQ 4.3+ counts a rejected return in
        // `x-delivery-count` but no longer a nacked one, and the delivery
        // limit depends on that count.
        self.acker
            .reject(BasicRejectOptions { requeue: true })
            .await
            .map(|_| ())
            .map_err(queue_error)
    }

    /// Publishes a confirmed copy to `queue`, then acks the original. When
    /// the copy cannot be published the original is requeued instead.
    async fn replace(
        &self,
        queue: &str,
        headers: FieldTable,
        delay: Option<Duration>,
    ) -> Result<(), QueueError> {
        self.settled.store(true, Ordering::SeqCst);
        // The delivery's channel is gone: the broker has requeued the
        // original already, and a copy would be a second one.
        if !self.acker.usable() {
            return Err(QueueError::Unavailable(
                "the delivery's channel closed; the broker redelivers it".into(),
            ));
        }
        if let Err(e) = self.inner.send(queue, &self.payload, headers, delay).await {
            if let Err(requeue) = self.requeue().await {
                tracing::debug!(queue = %self.queue, error = %requeue, "rabbitmq: requeue failed");
            }
            return Err(e);
        }
        if let Err(e) = self.ack_original().await {
            // The copy is safe; the original comes back too (a duplicate,
            // which at-least-once delivery allows).
            tracing::warn!(queue = %self.queue, error = %e, "rabbitmq: ack after re-publishing failed");
        }
        Ok(())
    }

    /// Back to the queue after `delay`, carrying `counted` deliveries.
    async fn hop(&self, delay: Duration, counted: i64) -> Result<(), QueueError> {
        let mut headers = self.copy_headers()?;
        if counted > 0 {
            headers.insert(DELIVERIES_HEADER.into(), AMQPValue::LongLongInt(counted));
        }
        self.replace(&self.queue, headers, Some(delay)).await
    }

    /// To `<queue>.dead`, with the same headers as the embedded queue adds.
    async fn move_to_dead(&self, reason: &str) -> Result<(), QueueError> {
        let mut headers = self.copy_headers()?;
        headers.insert("x-death-reason".into(), long_string(reason));
        headers.insert("x-original-queue".into(), long_string(&self.queue));
        self.replace(&dead_queue_name(&self.queue), headers, None)
            .await?;
        metrics::counter!("atelier_queue_dead_letters_total", "queue" => self.queue.clone())
            .increment(1);
        tracing::warn!(queue = %self.queue, reason, deliveries = self.deliveries, "rabbitmq: dead-lettered");
        Ok(())
    }

    /// Headers for a copy. The broker writes `x-first-death-*` only when
    /// absent, so a copy that kept them would misreport a later death.
    fn copy_headers(&self) -> Result<FieldTable, QueueError> {
        let kept: Headers = self
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with("x-first-death-") && !k.starts_with("x-last-death-"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        to_table(&kept)
    }
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(&self) -> Result<(), QueueError> {
        self.ack_original().await
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<(), QueueError> {
        match delay.filter(|d| !d.is_zero()) {
            None => self.requeue().await,
            // The copy would arrive past the limit: dead-letter it now.
            Some(_) if !is_dead_queue(&self.queue) && self.deliveries >= MAX_DELIVERIES => {
                self.move_to_dead(LIMIT_REASON).await
            }
            Some(delay) => self.hop(delay, self.deliveries).await,
        }
    }

    async fn dead_letter(&self, reason: &str) -> Result<(), QueueError> {
        self.move_to_dead(reason).await
    }
}

impl Drop for RabbitAcker {
    fn drop(&mut self) {
        if self.settled.load(Ordering::SeqCst) {
            return;
        }
        // Neither acked nor nacked (a consumer that stopped, a delivery still
        // queued in the dropped receiver): requeue it now rather than when
        // the channel closes. Counts as a delivery, like a lapsed lease.
        let acker = self.acker.clone();
        let channel = self.channel.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = acker.nack(REQUEUE).await;
                drop(channel);
            });
        }
    }
}

fn is_dead_queue(name: &str) -> bool {
    name.ends_with(".dead")
}

fn dead_queue_name(queue: &str) -> String {
    format!("{queue}.dead")
}

fn delay_queue_name(queue: &str, bucket_ms: u64) -> String {
    format!("{queue}.delay.{bucket_ms}")
}

/// The first bucket not shorter than `delay`, or the largest.
fn delay_bucket(delay: Duration) -> u64 {
    let ms = delay.as_millis();
    DELAY_BUCKETS_MS
        .iter()
        .copied()
        .find(|&b| u128::from(b) >= ms)
        .unwrap_or(MAX_DELAY_BUCKET_MS)
}

fn short(s: &str) -> Result<ShortString, QueueError> {
    ShortString::try_new(s).map_err(|e| QueueError::Other(format!("`{s}`: {e}")))
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Headers as AMQP long strings (`ShortString` values cannot be encoded in a
/// table).
fn to_table(headers: &Headers) -> Result<FieldTable, QueueError> {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(short(k)?, long_string(v));
    }
    Ok(table)
}

/// The string headers of a delivery, without the internal ones.
fn visible_headers(table: &FieldTable) -> Headers {
    table
        .inner()
        .iter()
        .filter(|(k, _)| !INTERNAL_HEADERS.contains(&k.as_str()))
        .filter_map(|(k, v)| {
            let v = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                _ => return None,
            };
            Some((k.as_str().to_string(), v))
        })
        .collect()
}

/// An integer header, whatever integer type the broker chose.
fn int_header(table: &FieldTable, key: &str) -> Option<i64> {
    match table.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

/// Arguments of a work queue `<q>`.
///
/// `x-delivery-limit`: a quorum queue increments a message's delivery count
/// on every return (nack/reject with requeue, or its consumer's channel
/// closing) and dead-letters it when the count *exceeds* the limit
/// (`rabbit_fifo:return_one`, RabbitMQ 3.10). The n-th delivery follows
/// n - 1 returns, so with limit L the (L + 1)-th return, after L + 1
/// deliveries, dead-letters it: L = MAX_DELIVERIES - 1.
///
/// `x-dead-letter-strategy = at-least-once`: the broker keeps a dead-lettered
/// message until `<q>.dead` confirms it instead of possibly dropping it on
/// the way. It requires `x-overflow = reject-publish` (without it RabbitMQ
/// silently falls back to at-most-once); with no length limit set, that
/// overflow setting never rejects anything.
fn work_queue_args(queue: &str) -> FieldTable {
    table([
        ("x-queue-type", long_string("quorum")),
        (
            "x-delivery-limit",
            AMQPValue::LongLongInt(MAX_DELIVERIES - 1),
        ),
        ("x-dead-letter-exchange", long_string("")),
        (
            "x-dead-letter-routing-key",
            long_string(&dead_queue_name(queue)),
        ),
        ("x-dead-letter-strategy", long_string("at-least-once")),
        ("x-overflow", long_string("reject-publish")),
    ])
}

/// Arguments of a `.dead` queue: replicated, no limit, no dead-lettering.
fn dead_queue_args() -> FieldTable {
    table([("x-queue-type", long_string("quorum"))])
}

/// Arguments of `<q>.delay.<ms>`. A classic queue: cheap, one per bucket, and
/// as every message in it has the same TTL, expiry at the head is exact.
/// Classic queues dead-letter at-most-once; the hop back into `<q>` is
/// internal to the broker.
fn delay_queue_args(queue: &str, bucket_ms: u64) -> FieldTable {
    let ttl = i64::try_from(bucket_ms).unwrap_or(i64::MAX);
    let idle = i64::try_from(bucket_ms + DELAY_QUEUE_IDLE_MS).unwrap_or(i64::MAX);
    table([
        ("x-queue-type", long_string("classic")),
        ("x-message-ttl", AMQPValue::LongLongInt(ttl)),
        ("x-expires", AMQPValue::LongLongInt(idle)),
        ("x-dead-letter-exchange", long_string("")),
        ("x-dead-letter-routing-key", long_string(queue)),
    ])
}

fn table<const N: usize>(entries: [(&'static str, AMQPValue); N]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in entries {
        table.insert(k.into(), v);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_a_bucket() {
        assert_eq!(delay_bucket(Duration::from_millis(1)), 100);
        assert_eq!(delay_bucket(Duration::from_millis(100)), 100);
        assert_eq!(delay_bucket(Duration::from_millis(1_500)), 2_000);
        assert_eq!(delay_bucket(Duration::from_secs(2)), 2_000);
        assert_eq!(
            delay_bucket(Duration::from_secs(3_600)),
            MAX_DELAY_BUCKET_MS
        );
    }

    #[test]
    fn headers_round_trip_without_internal_ones() {
        let mut headers = Headers::new();
        headers.insert("traceparent".into(), "00-ab-cd-01".into());
        let mut table = to_table(&headers).expect("table");
        table.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongInt(3));
        table.insert(DELIVERIES_HEADER.into(), AMQPValue::LongLongInt(4));
        assert_eq!(visible_headers(&table), headers);
        assert_eq!(int_header(&table, DELIVERY_COUNT_HEADER), Some(3));
        assert_eq!(int_header(&table, DELIVERIES_HEADER), Some(4));
    }
}
