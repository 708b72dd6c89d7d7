//! Live notification fan-out: every relayed notification reaches the SSE
//! streams of every API process.
//!
//! The stored notification is the source of truth (written in the same
//! transaction as the state change); the bus only makes it arrive without
//! polling. In one process (embedded mode) the bus is a broadcast channel.
//! With `redis.url` set, the relay publishes to one Redis channel and every
//! process subscribes to it and re-broadcasts locally. Redis pub/sub drops
//! what is published while a subscriber is disconnected, so streams also
//! reconcile against the store: often while the bus is down
//! ([`EventBus::live`] false) and after every reconnection
//! ([`EventBus::generation`] changes).

use crate::db::notifications::Notification;
use crate::storage::{Links, content_type_of};
use futures::StreamExt;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Notifications buffered per local subscriber before it lags (and then
/// reconciles from the store).
const LOCAL_CAPACITY: usize = 4096;

#[derive(Clone)]
pub struct EventBus {
    local: broadcast::Sender<Arc<Notification>>,
    redis: Option<Arc<RedisSide>>,
    /// Without Redis: whether this process relays (runs the scheduler), so
    /// that what it relays is all there is to hear.
    relays_here: bool,
}

struct RedisSide {
    client: redis::Client,
    channel: String,
    publisher: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    subscribed: AtomicBool,
    generation: AtomicU64,
}

impl EventBus {
    /// The in-process bus. `relays_here`: this process runs the relay (the
    /// scheduler role); an API process without it and without Redis hears
    /// nothing live, so its streams poll the store ([`Self::live`] false).
    pub fn in_process(relays_here: bool) -> EventBus {
        // Live exactly when the relay runs in this process (see `live`).
        metrics::gauge!("atelier_event_bus_live").set(if relays_here { 1.0 } else { 0.0 });
        EventBus {
            local: broadcast::channel(LOCAL_CAPACITY).0,
            redis: None,
            relays_here,
        }
    }

    /// A bus shared through Redis channel `<prefix>:events`. With
    /// `subscribe` (processes that serve streams) it listens in the
    /// background, reconnecting with backoff, until `stop` fires; an
    /// unreachable Redis is not an error here but is reported by
    /// [`Self::live`]. Without it the bus only publishes.
    pub fn through_redis(
        url: &str,
        prefix: &str,
        subscribe: bool,
        stop: CancellationToken,
    ) -> Result<EventBus, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis.url: {e}"))?;
        let side = Arc::new(RedisSide {
            client,
            channel: format!("{prefix}:events"),
            publisher: tokio::sync::Mutex::new(None),
            subscribed: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        });
        let bus = EventBus {
            local: broadcast::channel(LOCAL_CAPACITY).0,
            redis: Some(side.clone()),
            relays_here: false,
        };
        if subscribe {
            tokio::spawn(subscribe_loop(side, bus.local.clone(), stop));
        }
        Ok(bus)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Notification>> {
        self.local.subscribe()
    }

    /// Whether notifications published anywhere reach this process now.
    pub fn live(&self) -> bool {
        match &self.redis {
            Some(r) => r.subscribed.load(Ordering::Acquire),
            None => self.relays_here,
        }
    }

    /// Changes whenever the Redis subscription is (re)established: what was
    /// published while it was down never arrives.
    pub fn generation(&self) -> u64 {
        self.redis
            .as_ref()
            .map_or(0, |r| r.generation.load(Ordering::Acquire))
    }

    /// Publishes relayed notifications, oldest first. Through Redis, a
    /// failure is returned (the caller logs it; streams reconcile from the
    /// store) and this process's own listeners still get them.
    pub async fn publish(&self, batch: &[Notification]) -> Result<(), String> {
        let Some(r) = &self.redis else {
            self.hand_to_local_listeners(batch);
            return Ok(());
        };
        // One retry on a fresh connection rides out a dropped one.
        let mut result = r.publish(batch).await;
        if result.is_err() {
            result = r.publish(batch).await;
        }
        if result.is_err() {
            self.hand_to_local_listeners(batch);
        }
        result
    }

    fn hand_to_local_listeners(&self, batch: &[Notification]) {
        for n in batch {
            let _ = self.local.send(Arc::new(n.clone()));
        }
    }
}

impl RedisSide {
    async fn publish(&self, batch: &[Notification]) -> Result<(), String> {
        let mut slot = self.publisher.lock().await;
        if slot.is_none() {
            let conn = tokio::time::timeout(
                Duration::from_secs(2),
                self.client.get_multiplexed_async_connection(),
            )
            .await
            .map_err(|_| "Redis connect timed out".to_string())?
            .map_err(|e| format!("Redis: {e}"))?;
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_mut() else {
            return Err("Redis: no connection".into());
        };
        let mut pipe = redis::pipe();
        for n in batch {
            let body = serde_json::to_string(n).map_err(|e| e.to_string())?;
            pipe.publish(&self.channel, body).ignore();
        }
        let sent: Result<Result<(), redis::RedisError>, _> =
            tokio::time::timeout(Duration::from_secs(2), pipe.query_async(conn)).await;
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                *slot = None;
                Err(format!("Redis publish: {e}"))
            }
            Err(_) => {
                *slot = None;
                Err("Redis publish timed out".into())
            }
        }
    }
}

async fn subscribe_loop(
    side: Arc<RedisSide>,
    local: broadcast::Sender<Arc<Notification>>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    let mut warned = false;
    loop {
        let attempt = async {
            let mut ps = side.client.get_async_pubsub().await?;
            ps.subscribe(&side.channel).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(3), attempt) => r,
        };
        match connected {
            Ok(Ok(ps)) => {
                side.generation.fetch_add(1, Ordering::AcqRel);
                side.subscribed.store(true, Ordering::Release);
                metrics::gauge!("atelier_event_bus_live").set(1.0);
                if warned {
                    tracing::info!("live events: Redis subscription restored");
                }
                backoff = Duration::from_millis(200);
                let mut messages = ps.into_on_message();
                loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => return,
                        m = messages.next() => m,
                    };
                    let Some(msg) = msg else { break };
                    let Ok(payload) = msg.get_payload::<String>() else {
                        continue;
                    };
                    match serde_json::from_str::<Notification>(&payload) {
                        Ok(n) => {
                            let _ = local.send(Arc::new(n));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "live events: unreadable message ignored")
                        }
                    }
                }
                side.subscribed.store(false, Ordering::Release);
                metrics::gauge!("atelier_event_bus_live").set(0.0);
                tracing::warn!(
                    "live events: Redis subscription lost; streams poll the store until it is back"
                );
            }
            Ok(Err(e)) => {
                if !warned {
                    tracing::warn!(error = %e, "live events: Redis unreachable; streams poll the store until it is back");
                    warned = true;
                }
            }
            Err(_) => {
                if !warned {
                    tracing::warn!(
                        "live events: Redis did not answer; streams poll the store until it is back"
                    );
                    warned = true;
                }
            }
        }
        metrics::gauge!("atelier_event_bus_live").set(0.0);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The contract's notification object (§4.1). `image_result` events carry
/// stored keys; here they become URLs signed for `ttl`.
/// A notification as clients receive it (contract §4.1): over SSE, from
/// `POST /notifications` and in webhook deliveries.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct WireNotification {
    /// Strictly increasing per server; the SSE event id.
    pub id: i64,
    /// `batch_edit`, `image_result`, `identity_preprocessing`, …
    pub name: String,
    /// The event's own members; result object keys become signed `output` URLs.
    #[schema(value_type = Object)]
    pub data: Value,
    /// Unix epoch seconds.
    pub timestamp: f64,
    pub created_at: String,
}

impl std::fmt::Display for WireNotification {
    /// The JSON every transport sends.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match serde_json::to_string(self) {
            Ok(s) => f.write_str(&s),
            Err(_) => Err(std::fmt::Error),
        }
    }
}

pub async fn wire(n: &Notification, links: &Links, ttl: Duration) -> WireNotification {
    let mut data = n.data.clone();
    if let Some(obj) = data.as_object_mut()
        && let Some(keys) = obj.remove("output_keys")
    {
        let mut output = serde_json::Map::new();
        for field in ["full_size", "thumbnail"] {
            let url = match keys.get(field).and_then(Value::as_str) {
                // A training's weights have no thumbnail.
                Some(k) if !k.is_empty() => match links.object_url(k, content_type_of(k), ttl).await {
                    Ok(u) => Value::String(u),
                    Err(e) => {
                        tracing::warn!(error = %e, key = k, "cannot sign a result URL for a notification");
                        Value::Null
                    }
                },
                _ => Value::Null,
            };
            output.insert(field.to_string(), url);
        }
        obj.insert("output".into(), Value::Object(output));
    }
    WireNotification {
        id: n.id,
        name: n.name.clone(),
        data,
        timestamp: n.created_at as f64 / 1000.0,
        created_at: crate::time::iso8601(n.created_at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn note(id: i64) -> Notification {
        Notification {
            id,
            account_id: "acc".into(),
            name: "batch_edit".into(),
            data: json!({"id_task": "job"}),
            created_at: 1_700_000_000_000,
        }
    }

    #[tokio::test]
    async fn the_in_process_bus_is_live_only_where_the_relay_runs() {
        let here = EventBus::in_process(true);
        let mut rx = here.subscribe();
        here.publish(&[note(1), note(2)]).await.expect("published");
        assert_eq!(rx.recv().await.expect("first").id, 1);
        assert_eq!(rx.recv().await.expect("second").id, 2);
        assert!(here.live());
        // An API process without the relay and without Redis hears nothing:
        // its streams must poll the store.
        assert!(!EventBus::in_process(false).live());
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_reported_not_live_and_publishing_falls_back_locally() {
        let stop = CancellationToken::new();
        let bus =
            EventBus::through_redis("redis://127.0.0.1:1", "t", true, stop.clone()).expect("bus");
        let mut rx = bus.subscribe();
        assert!(bus.publish(&[note(7)]).await.is_err());
        assert_eq!(rx.recv().await.expect("local copy").id, 7);
        assert!(!bus.live());
        stop.cancel();
    }
}
