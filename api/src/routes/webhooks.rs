//! Webhooks (contract §4.5–4.8) and their delivery records (an extension:
//! `GET /webhooks/deliveries`). Deliveries are made by the scheduler, never
//! from a request.

use super::PageQuery;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Query};
use crate::views;
use atelier_shared::db::webhooks::{Delivery, TestPing, Webhook};
use atelier_shared::time::iso8601;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use rand::RngCore;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
pub struct PutBody {
    pub url: Option<String>,
}

fn view(w: &Webhook, secret: Option<&str>) -> Value {
    json!({
        "id": w.id,
        "url": w.url,
        "secret": secret,
        "is_active": w.is_active,
        "created_at": iso8601(w.created_at),
        "updated_at": iso8601(w.updated_at),
        "last_response_status": w.last_response_status,
        "last_response_at": w.last_response_at.map(iso8601),
        "consecutive_failures": w.consecutive_failures,
    })
}

fn delivery_view(d: &Delivery) -> Value {
    json!({
        "id": d.id,
        "notification_id": d.notification_id,
        "event": d.event,
        "job_id": d.job_id,
        "delivery_id": d.delivery_uuid,
        "status": d.status,
        "attempts": d.attempts,
        "next_attempt_at": d.next_attempt_at.map(iso8601),
        "last_response_status": d.last_status,
        "last_error": d.last_error,
        "created_at": iso8601(d.created_at),
        "finished_at": d.finished_at.map(iso8601),
    })
}

fn no_webhook() -> ApiError {
    ApiError::not_found("No webhook is configured; create one with PUT /webhooks")
}

/// `PUT /webhooks`: creates or replaces the webhook; every call rotates the
/// secret, which this response shows once.
pub async fn put(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Json(body): Json<PutBody>,
) -> ApiResult<impl IntoResponse> {
    let raw = body.url.as_deref().map(str::trim).unwrap_or("");
    if raw.is_empty() {
        return Err(ApiError::bad_request(Some("url"), "is required", "body"));
    }
    let url = s
        .egress
        .check_url(raw)
        .await
        .map_err(|e| ApiError::bad_request(Some("url"), e.to_string(), "body"))?;
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let secret = hex::encode(key);
    let hook = s.store.put_webhook(&acc.id, url.as_str(), &secret).await?;
    tracing::info!(account = %acc.id, host = url.host_str().unwrap_or(""), "webhook saved");
    Ok(axum::Json(view(&hook, Some(&secret))))
}

pub async fn read(State(s): State<AppState>, Caller(acc): Caller) -> ApiResult<impl IntoResponse> {
    let hook = s.store.webhook(&acc.id).await?.ok_or_else(no_webhook)?;
    Ok(axum::Json(view(&hook, None)))
}

pub async fn delete(State(s): State<AppState>, Caller(acc): Caller) -> ApiResult<StatusCode> {
    if s.store.delete_webhook(&acc.id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(no_webhook())
    }
}

pub async fn test(State(s): State<AppState>, Caller(acc): Caller) -> ApiResult<impl IntoResponse> {
    match s.store.test_webhook(&acc.id).await? {
        TestPing::Queued => {}
        TestPing::NoWebhook => return Err(no_webhook()),
        TestPing::Inactive => {
            return Err(ApiError::conflict(
                "webhook_inactive",
                "The webhook was deactivated after repeated failed deliveries; save it again with PUT /webhooks to reactivate it",
            ));
        }
    }
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"message": "A ping delivery was queued for your webhook"})),
    ))
}

/// `GET /webhooks/deliveries`: newest first, with attempts and last status.
pub async fn deliveries(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<impl IntoResponse> {
    let (page, per_page, _) = q.resolve(20)?;
    let (rows, total) = s.store.deliveries(&acc.id, page, per_page).await?;
    Ok(axum::Json(json!({
        "deliveries": rows.iter().map(delivery_view).collect::<Vec<_>>(),
        "pagination": views::pagination(page, per_page, total),
    })))
}
