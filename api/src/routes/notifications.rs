//! Notifications (contract §4.2–4.4): the SSE stream with replay, polling,
//! and consuming.
//!
//! A stream subscribes to the event bus first, then replays the account's
//! stored notifications (after `Last-Event-ID`), then forwards live ones.
//! Every id sent is remembered, so what arrives twice (the bus and a store
//! re-read, or a relay that published again after a crash) is sent once.
//! The store is re-read every `notifications.reconcile_secs` while the bus
//! is live, every second while it is not, and at once after the bus lagged
//! or reconnected: live events can be late but not lost.

use crate::auth::{Caller, Credential};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Query};
use crate::state::AppState;
use atelier_shared::db::notifications::Notification;
use atelier_shared::events::{WireNotification, wire};
use atelier_shared::time::now_ms;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// The API key, for clients that cannot send headers (browser
    /// EventSource). Consumed by authentication.
    #[allow(dead_code)]
    pub token: Option<String>,
    /// Only these jobs (comma-separated ids).
    pub id_task: Option<String>,
    /// Only this image result.
    pub id_image: Option<String>,
    /// Only these event names (comma-separated).
    pub name_list: Option<String>,
}

/// Which notifications a stream or poll wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    tasks: Vec<String>,
    image: Option<String>,
    names: Vec<String>,
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

impl Filter {
    fn matches(&self, n: &Notification) -> bool {
        let text = |v: Option<&Value>| match v {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(x)) => Some(x.to_string()),
            _ => None,
        };
        if !self.names.is_empty() && !self.names.contains(&n.name) {
            return false;
        }
        if !self.tasks.is_empty() {
            let task = text(n.data.get("id_task")).or_else(|| text(n.data.get("job_id")));
            if !task.is_some_and(|t| self.tasks.contains(&t)) {
                return false;
            }
        }
        if let Some(img) = &self.image
            && text(n.data.get("image_result_id")).as_ref() != Some(img)
        {
            return false;
        }
        true
    }
}

fn retention_ms(s: &AppState) -> i64 {
    i64::try_from(s.config.notifications.retention_secs).unwrap_or(600) * 1000
}

/// Where a reconnecting client resumes. A value that is not a notification
/// id is ignored (full replay): an error would stop a browser's
/// EventSource from ever reconnecting.
fn last_event_id(headers: &HeaderMap) -> i64 {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.trim().parse::<i64>().ok())
        .filter(|id| *id >= 0)
        .unwrap_or(0)
}

/// Counts open streams for the gauge; decremented when the stream ends.
struct StreamGauge;

impl StreamGauge {
    fn open() -> StreamGauge {
        metrics::gauge!("atelier_sse_connections").increment(1.0);
        metrics::counter!("atelier_sse_streams_total").increment(1);
        StreamGauge
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        metrics::gauge!("atelier_sse_connections").decrement(1.0);
    }
}

/// The event streams each account holds open on this process
/// (`limits.streams_per_account`).
#[derive(Default)]
pub struct StreamSlots {
    open: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

/// One account's open stream; its slot is given back when dropped.
pub struct StreamSlot {
    slots: std::sync::Arc<StreamSlots>,
    account: String,
}

impl StreamSlots {
    /// A slot for one more stream of `account`, unless it holds `max`.
    pub fn open(self: &std::sync::Arc<Self>, account: &str, max: u32) -> Option<StreamSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(account.to_string()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            slots: self.clone(),
            account: account.to_string(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.account) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.account);
            }
        }
    }
}

/// The account's notifications as Server-Sent Events: a replay of the
/// stored ones (`event: backfill`, after `Last-Event-ID`), then
/// `backfill_complete`, then live events, with `:keepalive` comments.
/// The stream ends with an event `revoked` within
/// `notifications.auth_recheck_secs` of its key being revoked or expiring.
#[utoipa::path(
    get, path = "/notifications/events", tag = "notifications",
    params(
        StreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this notification id"),
    ),
    responses(
        (status = 200, description = "The event stream (each `data:` is a notification)", content_type = "text/event-stream", body = String),
        (status = 429, description = "The account holds `limits.streams_per_account` streams on this server already", body = crate::error::ErrorBody),
    ),
)]
pub async fn stream(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Extension(credential): Extension<Credential>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> ApiResult<Response> {
    let max = s.config.limits.streams_per_account;
    let Some(slot) = s.streams.open(&acc.id, max) else {
        return Err(ApiError::too_many(
            "too_many_streams",
            format!(
                "This account already holds {max} open event streams on this server; close one first"
            ),
            5,
        ));
    };
    let after = last_event_id(&headers);
    let filter = Filter {
        tasks: q.id_task.as_deref().map(split_list).unwrap_or_default(),
        image: q.id_image.filter(|s| !s.is_empty()),
        names: q.name_list.as_deref().map(split_list).unwrap_or_default(),
    };
    // Subscribe before reading the replay so nothing falls in between.
    let sub = s.events.subscribe();
    let replay = s
        .store
        .notifications(&acc.id, after, retention_ms(&s))
        .await?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let span = tracing::info_span!("sse_stream", account = %acc.id, after);
    tokio::spawn(tracing::Instrument::instrument(
        produce(
            s,
            Open {
                account: acc.id,
                credential,
                _slot: slot,
            },
            filter,
            after,
            replay,
            sub,
            tx,
        ),
        span,
    ));
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

fn frame(event: Option<&str>, id: Option<i64>, data: &str) -> Bytes {
    let mut s = String::with_capacity(data.len() + 48);
    if let Some(e) = event {
        s.push_str("event: ");
        s.push_str(e);
        s.push('\n');
    }
    if let Some(id) = id {
        s.push_str(&format!("id: {id}\n"));
    }
    s.push_str("data: ");
    s.push_str(data);
    s.push_str("\n\n");
    Bytes::from(s)
}

/// Whose stream it is, and what it holds while open.
struct Open {
    account: String,
    credential: Credential,
    _slot: StreamSlot,
}

/// Writes the stream until the client leaves, the server stops, the
/// stream's maximum age passes, or its key stops being valid.
async fn produce(
    s: AppState,
    open: Open,
    filter: Filter,
    after: i64,
    replay: Vec<Notification>,
    mut sub: tokio::sync::broadcast::Receiver<std::sync::Arc<Notification>>,
    tx: mpsc::Sender<Bytes>,
) {
    let _gauge = StreamGauge::open();
    let account = open.account.clone();
    let cfg = s.config.notifications.clone();
    let ttl = Duration::from_secs(s.config.limits.result_url_ttl_secs);
    // Ids sent (with their creation time, to forget them after retention).
    let mut sent: BTreeMap<i64, i64> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.stream_max_secs);
    // A client that stops reading fills the channel: a send then waits, but
    // never past the stream's deadline or the server's shutdown.
    let push = |bytes: Bytes| {
        let tx = tx.clone();
        let stop = s.shutdown.clone();
        async move {
            tokio::select! {
                r = tx.send(bytes) => r.is_ok(),
                _ = stop.cancelled() => false,
                _ = tokio::time::sleep_until(deadline) => false,
            }
        }
    };
    let send = |n: &Notification, event: Option<&'static str>| {
        let s = s.clone();
        let n = n.clone();
        let push = &push;
        async move {
            let body = wire(&n, &s.links, ttl).await.to_string();
            push(frame(event, Some(n.id), &body)).await
        }
    };
    for n in &replay {
        sent.insert(n.id, n.created_at);
        if filter.matches(n) && !send(n, Some("backfill")).await {
            return;
        }
    }
    if tx
        .send(frame(Some("backfill_complete"), None, "{}"))
        .await
        .is_err()
    {
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.stream_max_secs);
    let mut keepalive = tokio::time::interval(Duration::from_secs(cfg.keepalive_secs));
    keepalive.reset();
    let mut generation = s.events.generation();
    let mut last_reconcile = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut recheck = tokio::time::interval(Duration::from_secs(cfg.auth_recheck_secs));
    recheck.reset();
    loop {
        let mut reconcile = false;
        tokio::select! {
            _ = s.shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = tx.closed() => return,
            _ = recheck.tick() => {
                match s.store.account_for_token(&open.credential.0).await {
                    Ok(Some(a)) if a.id == account => {}
                    Ok(_) => {
                        tracing::info!("event stream ended: its API key was revoked or expired");
                        metrics::counter!("atelier_sse_revoked_total").increment(1);
                        push(frame(
                            Some("revoked"),
                            None,
                            r#"{"reason":"the API key of this stream was revoked or expired"}"#,
                        ))
                        .await;
                        return;
                    }
                    // The store is down: the stream goes on; checked again.
                    Err(_) => {}
                }
            }
            _ = keepalive.tick() => {
                if !push(Bytes::from_static(b":keepalive\n\n")).await {
                    return;
                }
            }
            _ = tick.tick() => {
                let every = if s.events.live() {
                    Duration::from_secs(cfg.reconcile_secs)
                } else {
                    Duration::from_secs(1)
                };
                let g = s.events.generation();
                reconcile = g != generation || last_reconcile.elapsed() >= every;
                generation = g;
            }
            got = sub.recv() => match got {
                Ok(n) => {
                    if n.account_id == account && n.id > after && !sent.contains_key(&n.id) {
                        sent.insert(n.id, n.created_at);
                        if filter.matches(&n) && !send(&n, None).await {
                            return;
                        }
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "stream lagged behind the bus; re-reading the store");
                    reconcile = true;
                }
                Err(RecvError::Closed) => return,
            },
        }
        if reconcile {
            last_reconcile = tokio::time::Instant::now();
            let Ok(stored) = s
                .store
                .notifications(&account, after, retention_ms(&s))
                .await
            else {
                continue; // the store is down; try again next round
            };
            for n in stored {
                if sent.contains_key(&n.id) {
                    continue;
                }
                sent.insert(n.id, n.created_at);
                if filter.matches(&n) && !send(&n, None).await {
                    return;
                }
            }
            let horizon = now_ms() - retention_ms(&s) - 60_000;
            sent.retain(|_, created| *created >= horizon);
        }
    }
}

/// `name_list`/`id_task` of `POST /notifications`: a string (comma-separated)
/// or an array of strings.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_list(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => split_list(&s),
            OneOrMany::Many(v) => v.iter().flat_map(|s| split_list(s)).collect(),
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PollBody {
    /// Only these jobs.
    pub id_task: Option<OneOrMany>,
    /// The event names wanted, e.g. `batch_edit, image_result`.
    #[schema(required = true, value_type = OneOrMany)]
    pub name_list: Option<OneOrMany>,
}

/// The account's stored notifications (kept `notifications.retention_secs`
/// or until deleted) that match.
#[utoipa::path(
    post, path = "/notifications", tag = "notifications",
    request_body = PollBody,
    responses((status = 200, description = "Matching notifications, oldest first", body = Vec<WireNotification>)),
)]
pub async fn poll(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Json(body): Json<PollBody>,
) -> ApiResult<axum::Json<Vec<WireNotification>>> {
    let names = body.name_list.map(OneOrMany::into_list).unwrap_or_default();
    if names.is_empty() {
        return Err(ApiError::bad_request(
            Some("name_list"),
            "is required: one or more event names such as batch_edit, image_result",
            "body",
        ));
    }
    let filter = Filter {
        tasks: body.id_task.map(OneOrMany::into_list).unwrap_or_default(),
        image: None,
        names,
    };
    let ttl = Duration::from_secs(s.config.limits.result_url_ttl_secs);
    let mut out = Vec::new();
    for n in s.store.notifications(&acc.id, 0, retention_ms(&s)).await? {
        if filter.matches(&n) {
            out.push(wire(&n, &s.links, ttl).await);
        }
    }
    Ok(axum::Json(out))
}

/// Consumes a notification (it is no longer replayed).
#[utoipa::path(
    delete, path = "/notifications/{id}", tag = "notifications",
    params(("id" = String, Path, description = "The notification's id")),
    responses((status = 204, description = "Deleted")),
)]
pub async fn delete(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let missing = || ApiError::not_found(format!("Notification {id} not found"));
    let n: i64 = id.trim().parse().map_err(|_| missing())?;
    if s.store
        .delete_notification(&acc.id, n, retention_ms(&s))
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(missing())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn note(name: &str, data: Value) -> Notification {
        Notification {
            id: 7,
            account_id: "acc".into(),
            name: name.into(),
            data,
            created_at: 0,
        }
    }

    #[test]
    fn frames_follow_the_contract() {
        assert_eq!(
            frame(Some("backfill"), Some(7), r#"{"a":1}"#),
            Bytes::from("event: backfill\nid: 7\ndata: {\"a\":1}\n\n")
        );
        assert_eq!(
            frame(None, Some(8), "{}"),
            Bytes::from("id: 8\ndata: {}\n\n")
        );
        assert_eq!(
            frame(Some("backfill_complete"), None, "{}"),
            Bytes::from("event: backfill_complete\ndata: {}\n\n")
        );
    }

    #[test]
    fn filters_match_tasks_images_and_names() {
        let n = note(
            "image_result",
            json!({"id_task": "job_1", "image_result_id": 42}),
        );
        let f = |tasks: &str, image: Option<&str>, names: &str| Filter {
            tasks: split_list(tasks),
            image: image.map(String::from),
            names: split_list(names),
        };
        assert!(f("", None, "").matches(&n));
        assert!(f("job_2, job_1", None, "").matches(&n));
        assert!(!f("job_2", None, "").matches(&n));
        assert!(f("", Some("42"), "image_result").matches(&n));
        assert!(!f("", Some("43"), "").matches(&n));
        assert!(!f("", None, "batch_edit").matches(&n));
        let by_job_id = note("batch_edit", json!({"job_id": "job_1"}));
        assert!(f("job_1", None, "batch_edit").matches(&by_job_id));
    }
}
