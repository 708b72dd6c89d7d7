//! The HTTP listeners: hyper connections with a cap and timeouts, so that
//! silent, slow or idle clients cannot hold the process's connections (or
//! its open files) forever.
//!
//! - **Connection cap** per listener (`server.max_connections`, kept below
//!   the open-file limit): a connection beyond it is answered `503` and
//!   closed; the log says so (at most every 10 s) and
//!   `atelier_http_connections_refused_total` counts it. The operations
//!   listener has its own cap, so probes get in while the data port is full.
//! - **Request heads** must arrive whole within `server.header_read_timeout_secs`
//!   of the connection opening (this module's watchdog: hyper's timer only
//!   starts once the protocol is sniffed from a first byte) or of its
//!   previous answer (hyper's timer): silent, slow-header and idle HTTP/1.1
//!   keep-alive connections close.
//! - **Idle connections** (no request in progress, HTTP/1.1 or HTTP/2) close
//!   after `server.idle_timeout_secs`. A streaming answer (SSE) is a request
//!   in progress until its body ends.
//! - **Request bodies** must keep coming: no gap longer than
//!   `server.body_read_timeout_secs`, and past that long an average of at
//!   least `server.min_body_rate` bytes/s; otherwise `408`. The clock starts
//!   when the handler first reads the body.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::error::ApiError;

/// What one listener allows its connections.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
    pub min_body_rate: u64,
}

/// Connections the operations listener holds: probes and scrapers only.
const ADMIN_CONNECTIONS: usize = 64;
/// Open files kept for everything that is not a connection (the database
/// pool, models, files being served).
const RESERVED_FILES: u64 = 512;
/// How long connections may take to finish once the server stops.
const DRAIN: Duration = Duration::from_secs(30);

impl Limits {
    pub fn from_config(s: &atelier_shared::config::ServerConfig) -> Limits {
        Limits {
            max_connections: usize::try_from(s.max_connections).unwrap_or(usize::MAX),
            header_read_timeout: Duration::from_secs(s.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(s.idle_timeout_secs),
            body_read_timeout: Duration::from_secs(s.body_read_timeout_secs),
            min_body_rate: s.min_body_rate,
        }
    }

    /// The operations listener's: the same timeouts, its own small cap.
    pub fn admin(s: &atelier_shared::config::ServerConfig) -> Limits {
        Limits {
            max_connections: ADMIN_CONNECTIONS,
            ..Limits::from_config(s)
        }
    }
}

/// Raises the soft open-file limit to the hard one and returns the
/// connections a listener may hold: `wanted`, or fewer where the limit
/// leaves less room.
fn connection_cap(wanted: usize) -> usize {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(files) => {
            let room =
                usize::try_from(files.saturating_sub(RESERVED_FILES).max(16)).unwrap_or(usize::MAX);
            if room < wanted {
                tracing::warn!(
                    open_files = files,
                    wanted,
                    cap = room,
                    "the open-file limit leaves room for fewer connections than server.max_connections"
                );
            }
            wanted.min(room)
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the open-file limit");
            wanted
        }
    }
}

/// Serves `app` on `listener` until `shutdown` fires, then lets open
/// connections finish (up to 30 s). `name` labels the metrics and logs.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    name: &'static str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cap = connection_cap(limits.max_connections);
    let slots = Arc::new(Semaphore::new(cap));
    let tracker = TaskTracker::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    tracing::info!(listener = name, addr = %listener.local_addr()?, max_connections = cap, "listening");
    // Exported from the start, so that rates over it read 0, not nothing.
    metrics::counter!("atelier_http_connections_refused_total", "listener" => name).increment(0);
    let mut last_refusal_log: Option<Instant> = None;
    let mut last_accept_error_log: Option<Instant> = None;
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of open files or memory: the listener waits a
                    // little rather than spin.
                    if every_10s(&mut last_accept_error_log) {
                        tracing::error!(listener = name, error = %e, "cannot accept connections");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!("atelier_http_connections_refused_total", "listener" => name)
                .increment(1);
            if every_10s(&mut last_refusal_log) {
                tracing::warn!(
                    listener = name,
                    max_connections = cap,
                    "connection limit reached: new connections are refused with 503 (server.max_connections)"
                );
            }
            refuse(&stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(connection(
            stream,
            app.clone(),
            builder.clone(),
            limits.clone(),
            name,
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
        tracing::warn!(
            listener = name,
            open = tracker.len(),
            "connections still open after the drain; closing them"
        );
    }
    Ok(())
}

fn every_10s(last: &mut Option<Instant>) -> bool {
    let now = Instant::now();
    if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
        return false;
    }
    *last = Some(now);
    true
}

/// Answers a connection over the cap with `503` (if its send buffer takes
/// it at once) and closes it.
fn refuse(stream: &TcpStream) {
    const BODY: &str =
        r#"{"error":"Too many connections; retry shortly","detail":[],"code":"overloaded"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

/// Whether a connection has a request in progress, and since when it has
/// had none.
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
    /// Whether a request head ever arrived.
    served: AtomicBool,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            served: AtomicBool::new(false),
        })
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.served.store(true, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// How long the connection has had no request in progress (`None`
    /// while one is).
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
        Some(self.epoch.elapsed().saturating_sub(since))
    }
}

/// A request in progress: until its answer's body is done or dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(now, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer's body that keeps its request counted as in progress.
struct Answer {
    inner: Body,
    _busy: Busy,
}

impl HttpBody for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body too slow: {0}")]
struct BodyTooSlow(String);

/// A request body held to a pace: no gap longer than `gap`, and past `gap`
/// an average of at least `min_rate` bytes/s.
struct Paced {
    inner: Body,
    gap: Duration,
    min_rate: u64,
    started: Option<Instant>,
    received: u64,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    slow: Arc<AtomicBool>,
}

impl Paced {
    fn too_slow(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.slow.store(true, Ordering::SeqCst);
        Poll::Ready(Some(Err(axum::Error::new(BodyTooSlow(why)))))
    }
}

impl HttpBody for Paced {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let gap = this.gap;
        let started = *this.started.get_or_insert_with(Instant::now);
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                }
                let elapsed = started.elapsed();
                if elapsed > gap
                    && (this.received as f64) < this.min_rate as f64 * elapsed.as_secs_f64()
                {
                    let why = format!(
                        "{} bytes in {:.0} s, below the minimum of {} bytes/s",
                        this.received,
                        elapsed.as_secs_f64(),
                        this.min_rate
                    );
                    return this.too_slow(why);
                }
                timer.as_mut().reset(Instant::now() + gap);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                if timer.as_mut().poll(cx).is_ready() {
                    let why = format!("no data for {} s", gap.as_secs());
                    return this.too_slow(why);
                }
                Poll::Pending
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The answer to a request whose body came too slowly.
fn too_slow_answer(limits: &Limits) -> Response<Body> {
    let mut r = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        "The request body arrived too slowly",
    )
    .with_detail(
        None,
        format!(
            "a request body must keep arriving: no gap over {} s, and at least {} bytes/s on average after that",
            limits.body_read_timeout.as_secs(),
            limits.min_body_rate
        ),
        "body",
    )
    .into_response();
    r.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    r
}

async fn connection(
    stream: TcpStream,
    app: Router,
    builder: Arc<Builder<TokioExecutor>>,
    limits: Limits,
    name: &'static str,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let gauge = metrics::gauge!("atelier_http_connections", "listener" => name);
    gauge.increment(1.0);
    let activity = Activity::new();
    let service = {
        let (activity, limits) = (activity.clone(), limits.clone());
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let (app, activity, limits) = (app.clone(), activity.clone(), limits.clone());
            async move {
                let busy = activity.begin();
                let slow = Arc::new(AtomicBool::new(false));
                let req = req.map(|body| {
                    Body::new(Paced {
                        inner: Body::new(body),
                        gap: limits.body_read_timeout,
                        min_rate: limits.min_body_rate,
                        started: None,
                        received: 0,
                        timer: None,
                        slow: slow.clone(),
                    })
                });
                let Ok(mut resp) = app.oneshot(req).await;
                if slow.load(Ordering::SeqCst) && !resp.status().is_success() {
                    metrics::counter!("atelier_http_slow_bodies_total", "listener" => name)
                        .increment(1);
                    resp = too_slow_answer(&limits);
                }
                Ok::<_, Infallible>(resp.map(|inner| Body::new(Answer { inner, _busy: busy })))
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut closing = false;
    // Until its first request head, a connection has the head timeout: the
    // version sniffing that precedes hyper's own timer waits for a first
    // byte forever. Then the idle timeout.
    let first_head = limits.header_read_timeout.min(limits.idle_timeout);
    let allowed = |activity: &Activity| {
        if activity.served.load(Ordering::SeqCst) {
            limits.idle_timeout
        } else {
            first_head
        }
    };
    let mut check = Instant::now() + first_head;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    let timeout = e
                        .downcast_ref::<hyper::Error>()
                        .is_some_and(hyper::Error::is_timeout);
                    if timeout {
                        metrics::counter!("atelier_http_connections_closed_total", "listener" => name, "reason" => "header_timeout").increment(1);
                    }
                    tracing::debug!(listener = name, error = %e, "connection ended");
                }
                break;
            }
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(check), if !closing => {
                let allowed = allowed(&activity);
                match activity.idle_for() {
                    Some(idle) if idle >= allowed => {
                        let reason = if activity.served.load(Ordering::SeqCst) { "idle" } else { "header_timeout" };
                        metrics::counter!("atelier_http_connections_closed_total", "listener" => name, "reason" => reason).increment(1);
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    Some(idle) => check = Instant::now() + (allowed - idle),
                    None => check = Instant::now() + limits.idle_timeout,
                }
            }
        }
    }
    gauge.decrement(1.0);
}
