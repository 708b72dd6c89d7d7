//! Health, metrics and the answer to paths nothing serves.

use crate::error::ApiError;
use crate::views::Health;
use axum::Json;
use axum::response::IntoResponse;

/// Liveness (unauthenticated).
#[utoipa::path(
    get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "The process serves requests", body = Health)),
)]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Prometheus metrics of this process (unauthenticated; keep it off the
/// public network).
#[utoipa::path(
    get, path = "/metrics", tag = "operations", security(()),
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String)),
)]
pub async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        atelier_shared::telemetry::metrics().render(),
    )
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("No such route")
}
