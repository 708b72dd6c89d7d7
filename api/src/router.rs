//! The route table, grouped by caller, and the layers every request passes.
//!
//! Every route is registered with its documented handler (`routes!`), so
//! the router and the OpenAPI document are built from the same calls; the
//! only routes outside the document are the interactive docs page and its
//! assets ([`UNDOCUMENTED`]). A test compares the document with the live
//! router, method by method.

use crate::auth;
use crate::error::ApiError;
use crate::idempotency;
use crate::openapi;
use crate::routes::{
    billing, custom_models, downloads, drafts, flat, health, identities, jobs, models_api,
    notifications, operator, predictions, presets, profiles, projects, studio, swap, tokens,
    trainings, uploads, webhooks,
};
use crate::state::AppState;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Instant;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

/// Where the interactive API docs are served (not part of the document).
pub const DOCS: &str = "/docs";
/// Routes that are not operations of the API: the docs page and its
/// assets, the web console and its assets.
pub const UNDOCUMENTED: [&str; 5] = [
    DOCS,
    "/docs/ui/swagger-ui-bundle.js",
    crate::console::PATHS[0],
    crate::console::PATHS[1],
    crate::console::PATHS[2],
];

/// The body limit of routes that name none (axum's default).
const DEFAULT_BODY: usize = 2 << 20;

/// A client route: request bodies up to `limit` bytes, and `Idempotency-Key`
/// honoured on its creating methods.
fn keyed_route(
    state: &AppState,
    (schemas, paths, method): UtoipaMethodRouter<AppState>,
    limit: usize,
) -> UtoipaMethodRouter<AppState> {
    let method: axum::routing::MethodRouter<AppState> = method.layer(
        middleware::from_fn_with_state((state.clone(), limit), idempotency::idempotent),
    );
    let method = method.layer(DefaultBodyLimit::max(limit));
    (schemas, paths, method)
}

/// A route whose request bodies may be up to `limit` bytes.
fn limited(
    (schemas, paths, method): UtoipaMethodRouter<AppState>,
    limit: usize,
) -> UtoipaMethodRouter<AppState> {
    (schemas, paths, method.layer(DefaultBodyLimit::max(limit)))
}

/// What API clients call with their key.
fn clients(state: &AppState, max_upload: usize) -> OpenApiRouter<AppState> {
    let keyed = |r, limit| keyed_route(state, r, limit);
    // A photo plus the form's text parts.
    let photo_form = max_upload.saturating_add(64 << 10);
    // A multipart profile carries many photos: up to 8 full-size uploads.
    let profile_form = max_upload.saturating_mul(8).saturating_add(1 << 20);
    // A training image is sent raw, up to 10 MB (seed 001).
    let training_image = custom_models::MAX_TRAINING_IMAGE_BYTES;
    // A Studio edit carries up to 10 photos as base64 (4/3 of their size).
    let studio_body = max_upload.saturating_mul(14).saturating_add(1 << 20);
    OpenApiRouter::new()
        .routes(keyed(routes!(tokens::mint, tokens::list), DEFAULT_BODY))
        .routes(keyed(routes!(tokens::revoke), DEFAULT_BODY))
        .routes(keyed(
            routes!(projects::create, projects::list),
            DEFAULT_BODY,
        ))
        .routes(keyed(
            routes!(projects::read, projects::delete),
            DEFAULT_BODY,
        ))
        .routes(keyed(routes!(uploads::issue), DEFAULT_BODY))
        .routes(keyed(routes!(uploads::assets), DEFAULT_BODY))
        .routes(keyed(routes!(jobs::create_packshot), DEFAULT_BODY))
        .routes(keyed(routes!(swap::create), DEFAULT_BODY))
        .routes(keyed(routes!(flat::create), DEFAULT_BODY))
        .routes(keyed(routes!(jobs::list), DEFAULT_BODY))
        .routes(keyed(routes!(jobs::status), DEFAULT_BODY))
        .routes(keyed(routes!(jobs::results), DEFAULT_BODY))
        .routes(keyed(routes!(jobs::abort), DEFAULT_BODY))
        .routes(keyed(routes!(jobs::regenerate), DEFAULT_BODY))
        .routes(keyed(routes!(downloads::issue), DEFAULT_BODY))
        .routes(keyed(routes!(downloads::issue_bulk), DEFAULT_BODY))
        .routes(keyed(routes!(identities::upload), photo_form))
        .routes(keyed(routes!(identities::list), DEFAULT_BODY))
        .routes(keyed(
            routes!(identities::read, identities::delete),
            DEFAULT_BODY,
        ))
        .routes(keyed(routes!(identities::status), DEFAULT_BODY))
        .routes(keyed(
            routes!(identities::share, identities::unshare),
            DEFAULT_BODY,
        ))
        .routes(keyed(routes!(drafts::create), DEFAULT_BODY))
        .routes(keyed(routes!(drafts::promote), DEFAULT_BODY))
        .routes(keyed(routes!(identities::replace_pov), photo_form))
        .routes(keyed(routes!(notifications::poll), DEFAULT_BODY))
        .routes(keyed(routes!(notifications::stream), DEFAULT_BODY))
        .routes(keyed(routes!(notifications::delete), DEFAULT_BODY))
        .routes(keyed(
            routes!(webhooks::put, webhooks::read, webhooks::delete),
            DEFAULT_BODY,
        ))
        .routes(keyed(routes!(webhooks::test), DEFAULT_BODY))
        .routes(keyed(routes!(webhooks::deliveries), DEFAULT_BODY))
        .routes(keyed(routes!(billing::balance), DEFAULT_BODY))
        .routes(keyed(routes!(billing::usage), DEFAULT_BODY))
        .routes(keyed(routes!(profiles::phota::add), profile_form))
        .routes(keyed(routes!(profiles::phota::ids), DEFAULT_BODY))
        .routes(keyed(routes!(profiles::phota::delete), DEFAULT_BODY))
        .routes(keyed(routes!(profiles::phota::status), DEFAULT_BODY))
        .routes(keyed(routes!(profiles::phota::picture), DEFAULT_BODY))
        .routes(keyed(routes!(profiles::short::add), profile_form))
        .routes(keyed(routes!(profiles::short::ids), DEFAULT_BODY))
        .routes(keyed(routes!(profiles::short::delete), DEFAULT_BODY))
        .routes(keyed(routes!(profiles::short::status), DEFAULT_BODY))
        .routes(keyed(routes!(profiles::short::picture), DEFAULT_BODY))
        .routes(keyed(
            routes!(models_api::create, models_api::list),
            DEFAULT_BODY,
        ))
        .routes(keyed(routes!(models_api::get_bulk), DEFAULT_BODY))
        .routes(keyed(routes!(models_api::list_public), DEFAULT_BODY))
        .routes(keyed(
            routes!(models_api::read, models_api::update, models_api::delete),
            DEFAULT_BODY,
        ))
        .routes(keyed(routes!(models_api::tags), DEFAULT_BODY))
        .routes(keyed(
            routes!(models_api::description, models_api::set_description),
            DEFAULT_BODY,
        ))
        .routes(keyed(routes!(models_api::examples), DEFAULT_BODY))
        .routes(keyed(routes!(models_api::add_images), studio_body))
        .routes(keyed(routes!(models_api::delete_image), DEFAULT_BODY))
        .routes(keyed(routes!(models_api::copy), DEFAULT_BODY))
        .routes(keyed(routes!(models_api::transfer), DEFAULT_BODY))
        .routes(keyed(routes!(models_api::train), DEFAULT_BODY))
        .routes(keyed(routes!(models_api::train_action), DEFAULT_BODY))
        .routes(keyed(routes!(models_api::job), DEFAULT_BODY))
        .routes(keyed(routes!(models_api::download), DEFAULT_BODY))
        .routes(keyed(routes!(custom_models::create), DEFAULT_BODY))
        .routes(keyed(
            routes!(
                custom_models::read,
                custom_models::rename,
                custom_models::rename_put,
                custom_models::delete
            ),
            DEFAULT_BODY,
        ))
        .routes(keyed(
            routes!(custom_models::add_data, custom_models::list_data),
            training_image,
        ))
        .routes(keyed(
            routes!(
                custom_models::read_data,
                custom_models::replace_data,
                custom_models::delete_data
            ),
            training_image,
        ))
        .routes(keyed(
            routes!(custom_models::start_training, custom_models::list_trainings),
            DEFAULT_BODY,
        ))
        .routes(keyed(
            routes!(custom_models::read_training, custom_models::delete_training),
            DEFAULT_BODY,
        ))
        .routes(keyed(routes!(custom_models::cancel_training), DEFAULT_BODY))
        .routes(keyed(routes!(predictions::create), DEFAULT_BODY))
        .routes(keyed(
            routes!(predictions::read, predictions::delete),
            DEFAULT_BODY,
        ))
        .routes(keyed(routes!(presets::create, presets::list), DEFAULT_BODY))
        .routes(keyed(
            routes!(presets::read, presets::update, presets::delete),
            DEFAULT_BODY,
        ))
        .routes(keyed(routes!(presets::bulk_delete), DEFAULT_BODY))
        .routes(keyed(routes!(presets::extract_from_text), DEFAULT_BODY))
        .routes(keyed(routes!(presets::extract_from_image), DEFAULT_BODY))
        .routes(keyed(routes!(presets::extract_category), DEFAULT_BODY))
        .routes(keyed(
            routes!(presets::share, presets::unshare),
            DEFAULT_BODY,
        ))
        .routes(keyed(
            routes!(presets::create_category, presets::list_categories),
            DEFAULT_BODY,
        ))
        .routes(keyed(
            routes!(
                presets::read_category,
                presets::update_category,
                presets::delete_category
            ),
            DEFAULT_BODY,
        ))
        .routes(keyed(routes!(presets::assign), DEFAULT_BODY))
        .routes(keyed(routes!(presets::unassign), DEFAULT_BODY))
        .routes(keyed(routes!(presets::duplicate), DEFAULT_BODY))
        .routes(keyed(
            routes!(presets::share_category, presets::unshare_category),
            DEFAULT_BODY,
        ))
        .routes(keyed(routes!(studio::phota::edit), studio_body))
        .routes(keyed(routes!(studio::phota::generate), DEFAULT_BODY))
        .routes(keyed(routes!(studio::short::edit), studio_body))
        .routes(keyed(routes!(studio::short::generate), DEFAULT_BODY))
}

/// What operators call with an operator account's key.
fn operators(state: &AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(keyed_route(state, routes!(billing::grant), DEFAULT_BODY))
        .routes(limited(routes!(operator::overview), DEFAULT_BODY))
        .routes(limited(routes!(operator::dead_letters), DEFAULT_BODY))
        .routes(limited(routes!(operator::replay), DEFAULT_BODY))
}

/// Signed, expiring capabilities: no credentials, the URL is the grant.
fn capabilities(max_upload: usize, max_weights: u64) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(limited(
            routes!(uploads::receive),
            max_upload.saturating_add(1),
        ))
        .routes(routes!(uploads::serve_file))
        .routes(routes!(downloads::stream))
        .routes(limited(
            routes!(trainings::events),
            usize::try_from(max_weights).unwrap_or(usize::MAX),
        ))
}

/// What probes, scrapers and tooling read without credentials. `/metrics`
/// only when no operations listener serves it (`server.admin_listen`): its
/// series carry account ids.
fn operations(with_metrics: bool) -> OpenApiRouter<AppState> {
    let r = OpenApiRouter::new()
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(openapi::document));
    if with_metrics {
        r.routes(routes!(health::metrics))
    } else {
        r
    }
}

/// The operations listener's routes (`server.admin_listen`), and the only
/// routes of a process without the API role.
pub fn operations_router(probes: Arc<health::Probes>) -> Router {
    use axum::routing::get;
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(health::not_found)
        .layer(axum::Extension(probes))
        .layer(middleware::from_fn(envelope))
}

/// Every documented route, and the document they make.
pub fn api(state: &AppState) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let max_upload = usize::try_from(state.config.limits.max_upload_bytes).unwrap_or(usize::MAX);
    let authed =
        clients(state, max_upload)
            .merge(operators(state))
            .layer(middleware::from_fn_with_state(
                state.clone(),
                auth::authenticate,
            ));
    let (router, doc) = OpenApiRouter::with_openapi(openapi::base())
        .merge(authed)
        .merge(capabilities(
            max_upload,
            state.config.training.max_weights_bytes.saturating_mul(4) / 3 + (1 << 20),
        ))
        .merge(operations(state.config.server.admin_listen.is_none()))
        .split_for_parts();
    (router, openapi::finish(doc, &state.config))
}

pub fn router(state: AppState) -> Router {
    let (api, doc) = api(&state);
    let doc = Arc::new(openapi::Document::new(&doc));
    let app = api
        .fallback(health::not_found)
        .layer(axum::Extension(doc))
        .layer(axum::Extension(state.probes.clone()))
        .with_state(state.clone())
        .merge(openapi::docs_routes())
        .merge(crate::console::routes());
    let app = if state.config.server.prefix.is_empty() {
        app
    } else {
        Router::new()
            .nest(&state.config.server.prefix, app)
            .fallback(health::not_found)
    };
    app.layer(middleware::from_fn(envelope))
        .layer(middleware::from_fn(record_metrics))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("handler panicked").into_response()
        }))
        .layer(middleware::from_fn(request_id))
}

/// The request id header, accepted from clients and echoed.
pub const X_REQUEST_ID: &str = "x-request-id";

/// Whether a client's `X-Request-Id` is kept: 1–128 characters of letters,
/// digits and `-_.:` (anything else could forge or break log lines).
fn usable_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// `X-Request-Id`: the client's when usable, else a new ULID; set on the
/// request before its span is made (so every log line of the request
/// carries it) and echoed on every response, refusals and panics included.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| usable_request_id(id))
        .map(str::to_owned)
        .unwrap_or_else(|| ulid::Ulid::new().to_string());
    let Ok(value) = header::HeaderValue::from_str(&id) else {
        return next.run(req).await;
    };
    req.headers_mut().insert(X_REQUEST_ID, value.clone());
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(X_REQUEST_ID, value);
    resp
}

/// The span of one request, a child of the client's `traceparent` when it
/// sent one (exported over OTLP when configured).
fn request_span(req: &Request) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        uri = %req.uri().path(),
        version = ?req.version(),
        request_id = req
            .headers()
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
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

async fn record_metrics(req: Request, next: Next) -> Response {
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

/// Every refusal in the contract's envelope (§1.4): what the framework
/// answers by itself (405 with its `Allow`, 413 from a body limit, a 400 or
/// 415 of an extractor, a 404 of a path parameter) comes as plain text;
/// this rewrites any error answer that is not JSON, keeping its status and
/// headers. The framework's text becomes the envelope's `detail` message.
async fn envelope(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // Framework rejections are short texts; never buffer more than that.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let (code, summary) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "This method is not allowed on this path; see the Allow header",
        ),
        StatusCode::NOT_FOUND => ("not_found", "No such route"),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "Request body too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "Unsupported media type"),
        StatusCode::UNPROCESSABLE_ENTITY | StatusCode::BAD_REQUEST => {
            ("invalid_request", "Invalid request")
        }
        s if s.is_server_error() => ("internal_error", "Internal server error"),
        _ => ("error", "The request was refused"),
    };
    // A 422 of an extractor is a validation failure: 400 in every family
    // (contract §11).
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    let mut e = ApiError::new(status, code, summary);
    if !text.is_empty() && !status.is_server_error() {
        e = e.with_detail(None, text, "request");
    }
    let fresh = e.into_response();
    parts.status = fresh.status();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, fresh.into_body())
}

/// Serves the API on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mut state: AppState,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    state.shutdown = shutdown.clone();
    let limiter = state.limiter.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => limiter.shrink(),
            }
        }
    });
    let limits = crate::server::Limits::from_config(&state.config.server);
    crate::server::serve(listener, router(state), limits, "api", shutdown).await
}
