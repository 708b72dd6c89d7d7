use crate::error::ApiError;
use axum::Json;
use axum::response::IntoResponse;
use serde_json::json;

pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

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
