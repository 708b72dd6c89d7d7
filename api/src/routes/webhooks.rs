//! Webhooks (contract §4.5–4.8) and their delivery records (an extension:
//! `GET /webhooks/deliveries`). Deliveries are made by the scheduler, never
//! from a request.

use super::PageQuery;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Query};
use crate::state::AppState;
use crate::views::{DeliveryList, DeliveryView, Pagination, Queued, WebhookView};
use atelier_shared::db::webhooks::{Delivery, TestPing, Webhook};
use atelier_shared::time::iso8601;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use rand::RngCore;
use serde::Deserialize;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PutBody {
    /// Where deliveries go: a public http(s) URL.
    #[schema(required = true, value_type = String)]
    pub url: Option<String>,
}

fn view(w: &Webhook, secret: Option<&str>) -> WebhookView {
    WebhookView {
        id: w.id,
        url: w.url.clone(),
        secret: secret.map(str::to_string),
        is_active: w.is_active,
        created_at: iso8601(w.created_at),
        updated_at: iso8601(w.updated_at),
        last_response_status: w.last_response_status,
        last_response_at: w.last_response_at.map(iso8601),
        consecutive_failures: w.consecutive_failures,
    }
}

fn delivery_view(d: &Delivery) -> DeliveryView {
    DeliveryView {
        id: d.id,
        notification_id: d.notification_id,
        event: d.event.clone(),
        job_id: d.job_id.clone(),
        delivery_id: d.delivery_uuid.clone(),
        status: d.status.clone(),
        attempts: d.attempts,
        next_attempt_at: d.next_attempt_at.map(iso8601),
        last_response_status: d.last_status,
        last_error: d.last_error.clone(),
        created_at: iso8601(d.created_at),
        finished_at: d.finished_at.map(iso8601),
    }
}

fn no_webhook() -> ApiError {
    ApiError::not_found("No webhook is configured; create one with PUT /webhooks")
}

/// Creates or replaces the webhook; every call rotates the signing secret,
/// which this answer shows once.
#[utoipa::path(
    put, path = "/webhooks", tag = "webhooks",
    request_body = PutBody,
    responses((status = 200, description = "The webhook with its new secret", body = WebhookView)),
)]
pub async fn put(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Json(body): Json<PutBody>,
) -> ApiResult<axum::Json<WebhookView>> {
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

/// The webhook (without its secret).
#[utoipa::path(
    get, path = "/webhooks", tag = "webhooks",
    responses((status = 200, description = "The webhook", body = WebhookView)),
)]
pub async fn read(
    State(s): State<AppState>,
    Caller(acc): Caller,
) -> ApiResult<axum::Json<WebhookView>> {
    let hook = s.store.webhook(&acc.id).await?.ok_or_else(no_webhook)?;
    Ok(axum::Json(view(&hook, None)))
}

/// Removes the webhook; its pending deliveries are cancelled.
#[utoipa::path(
    delete, path = "/webhooks", tag = "webhooks",
    responses((status = 204, description = "Removed")),
)]
pub async fn delete(State(s): State<AppState>, Caller(acc): Caller) -> ApiResult<StatusCode> {
    if s.store.delete_webhook(&acc.id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(no_webhook())
    }
}

/// Queues a signed `ping` delivery to the webhook.
#[utoipa::path(
    post, path = "/webhooks/test", tag = "webhooks",
    responses(
        (status = 202, description = "Queued", body = Queued),
        (status = 409, description = "The webhook was deactivated", body = crate::error::ErrorBody),
    ),
)]
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
        axum::Json(Queued {
            message: "A ping delivery was queued for your webhook".into(),
        }),
    ))
}

/// Webhook deliveries, newest first, with attempts and last status.
#[utoipa::path(
    get, path = "/webhooks/deliveries", tag = "webhooks", params(PageQuery),
    responses((status = 200, description = "A page of deliveries", body = DeliveryList)),
)]
pub async fn deliveries(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<DeliveryList>> {
    let (page, per_page, _) = q.resolve(20)?;
    let (rows, total) = s.store.deliveries(&acc.id, page, per_page).await?;
    Ok(axum::Json(DeliveryList {
        deliveries: rows.iter().map(delivery_view).collect(),
        pagination: Pagination::new(page, per_page, total),
    }))
}
