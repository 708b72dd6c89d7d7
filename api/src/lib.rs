//! # atelier-api
//!
//! The HTTP API (axum): authentication, validation, rate limits, admission,
//! signed object URLs and ZIP export, with the shapes of `API.md`.
//!
//! ## Runtime model
//!
//! [`serve`] runs the router on a listener until the shutdown token fires,
//! then stops accepting and lets in-flight requests finish. Handlers only
//! talk to the store and the object store; nothing is published to the
//! broker inside a request (the outbox row written with the job is relayed
//! by the scheduler). Every request runs in a `tracing` span.
//!
//! ## Guarantees
//!
//! - A job is durably recorded (with its outputs, reservation and outbox row,
//!   in one transaction) before `202` is sent.
//! - Bad input gets a 4xx envelope naming the problem; a database outage is
//!   a 503 with `Retry-After`; no handler panics on input.
//! - Another account's resources are indistinguishable from missing ones (404).

pub mod auth;
pub mod error;
pub mod extract;
pub mod limits;
pub mod routes;
pub mod views;

use atelier_shared::config::Config;
use atelier_shared::db::Store;
use atelier_shared::domain::packshot::{EngineAvailability, EngineChoice};
use atelier_shared::egress::EgressPolicy;
use atelier_shared::events::EventBus;
use atelier_shared::storage::{DynObjectStore, Links, Signer};
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware;
use axum::routing::{get, post, put};
use error::ApiError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub objects: DynObjectStore,
    pub signer: Signer,
    pub limiter: Arc<limits::Limiter>,
    pub config: Arc<Config>,
    pub engines: Arc<EngineAvailability>,
    pub links: Links,
    pub events: EventBus,
    pub egress: EgressPolicy,
    /// Fires when the server stops: long-lived responses (SSE) end with it.
    pub shutdown: CancellationToken,
}

/// In-process buckets, shared through Redis when `redis.url` is set.
fn limiter(config: &Config) -> limits::Limiter {
    let mut l = limits::Limiter::new(
        config.limits.requests_per_minute,
        config.limits.create_per_minute,
    );
    if let Some(url) = &config.redis.url
        && let Err(e) = l.share_through_redis(url, &config.redis.prefix)
    {
        tracing::error!(error = %e, "rate limits stay per replica");
    }
    l
}

impl AppState {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        objects: DynObjectStore,
        signer: Signer,
        events: EventBus,
    ) -> AppState {
        AppState {
            links: Links::new(
                objects.clone(),
                signer.clone(),
                &config.server.public_url,
                &config.server.prefix,
            ),
            events,
            // Validated with the configuration.
            egress: EgressPolicy::new(&config.egress.allow).unwrap_or_default(),
            shutdown: CancellationToken::new(),
            store,
            objects,
            signer,
            limiter: Arc::new(limiter(&config)),
            engines: Arc::new(EngineAvailability {
                configured: config
                    .engines
                    .routes
                    .keys()
                    .filter_map(|name| EngineChoice::parse(name))
                    .collect(),
            }),
            config,
        }
    }

    /// Absolute URL of an API path (public base + optional prefix).
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}{}{}",
            self.config.server.public_url.trim_end_matches('/'),
            self.config.server.prefix,
            path
        )
    }

    /// A URL that reads one stored object without credentials, valid `ttl`.
    pub async fn object_url(
        &self,
        key: &str,
        content_type: &str,
        ttl: Duration,
    ) -> Result<String, ApiError> {
        Ok(self.links.object_url(key, content_type, ttl).await?)
    }
}

/// Profile routes (contract §9) under `base`: the canonical `/v1/phota`
/// paths and the short aliases share the handlers.
fn profile_routes(base: &str, max_upload: usize) -> Router<AppState> {
    // A multipart profile carries many photos: up to 8 full-size uploads.
    let limit = max_upload.saturating_mul(8).saturating_add(1 << 20);
    Router::new()
        .route(
            &format!("{base}/add"),
            post(routes::profiles::add).layer(DefaultBodyLimit::max(limit)),
        )
        .route(&format!("{base}/ids"), get(routes::profiles::ids))
        .route(
            &format!("{base}/{{profile_id}}"),
            axum::routing::delete(routes::profiles::delete),
        )
        .route(
            &format!("{base}/{{profile_id}}/status"),
            get(routes::profiles::status),
        )
        .route(
            &format!("{base}/{{profile_id}}/profile_picture"),
            get(routes::profiles::picture),
        )
}

pub fn router(state: AppState) -> Router {
    let max_upload = usize::try_from(state.config.limits.max_upload_bytes).unwrap_or(usize::MAX);
    let authed = Router::new()
        .route(
            "/project",
            post(routes::projects::create).get(routes::projects::list),
        )
        .route(
            "/project/{project_id}",
            get(routes::projects::read).delete(routes::projects::delete),
        )
        .route("/upload", post(routes::uploads::issue))
        .route("/create-packshot", post(routes::jobs::create_packshot))
        .route("/model-swap", post(routes::swap::create))
        .route(
            "/identity/upload",
            post(routes::identities::upload)
                .layer(DefaultBodyLimit::max(max_upload.saturating_add(64 << 10))),
        )
        .route("/identity", get(routes::identities::list))
        .route(
            "/identity/{identity_code}",
            get(routes::identities::read).delete(routes::identities::delete),
        )
        .route(
            "/identity/{identity_code}/status",
            get(routes::identities::status),
        )
        .route(
            "/identity/{identity_code}/pov",
            post(routes::identities::replace_pov)
                .layer(DefaultBodyLimit::max(max_upload.saturating_add(64 << 10))),
        )
        .route("/jobs/{job_id}/status", get(routes::jobs::status))
        .route("/jobs/{job_id}/results", get(routes::jobs::results))
        .route("/jobs/{job_id}/abort", post(routes::jobs::abort))
        .route("/download", post(routes::downloads::issue))
        .route("/download/bulk", post(routes::downloads::issue_bulk))
        .route("/notifications", post(routes::notifications::poll))
        .route("/notifications/events", get(routes::notifications::stream))
        .route(
            "/notifications/{id}",
            axum::routing::delete(routes::notifications::delete),
        )
        .route(
            "/webhooks",
            put(routes::webhooks::put)
                .get(routes::webhooks::read)
                .delete(routes::webhooks::delete),
        )
        .route("/webhooks/test", post(routes::webhooks::test))
        .route("/webhooks/deliveries", get(routes::webhooks::deliveries))
        .route("/billing/balance", get(routes::billing::balance))
        .merge(profile_routes("/v1/phota/profiles", max_upload))
        .merge(profile_routes("/profiles", max_upload))
        .route("/admin/credits/grants", post(routes::billing::grant))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let public = Router::new()
        .route("/healthz", get(routes::health::healthz))
        .route("/metrics", get(routes::health::metrics))
        .route(
            "/upload/{token}",
            put(routes::uploads::receive)
                .layer(DefaultBodyLimit::max(max_upload.saturating_add(1))),
        )
        .route("/files/{token}", get(routes::uploads::serve_file))
        .route("/download/{token}", get(routes::downloads::stream));
    let app = authed
        .merge(public)
        .fallback(routes::health::not_found)
        .with_state(state.clone());
    let app = if state.config.server.prefix.is_empty() {
        app
    } else {
        Router::new()
            .nest(&state.config.server.prefix, app)
            .fallback(routes::health::not_found)
    };
    app.layer(middleware::from_fn(record_metrics))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::internal("handler panicked"))
        }))
}

/// The span of one request, a child of the client's `traceparent` when it
/// sent one (exported over OTLP when configured).
fn request_span(req: &Request) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        uri = %req.uri().path(),
        version = ?req.version(),
    );
    if let Some(parent) = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(atelier_shared::domain::trace::TraceParent::parse)
    {
        atelier_shared::telemetry::adopt(&span, &parent);
    }
    span
}

async fn record_metrics(req: Request, next: middleware::Next) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let t = Instant::now();
    let resp = next.run(req).await;
    metrics::counter!("atelier_http_requests_total", "route" => route.clone(), "status" => resp.status().as_u16().to_string())
        .increment(1);
    metrics::histogram!("atelier_http_request_duration_seconds", "route" => route)
        .record(t.elapsed().as_secs_f64());
    resp
}

/// Serves the API on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    mut state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    state.shutdown = shutdown.clone();
    let limiter = state.limiter.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => limiter.shrink(),
            }
        }
    });
    tracing::info!(addr = %listener.local_addr()?, "api listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}
