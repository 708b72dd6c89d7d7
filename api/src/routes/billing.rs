//! Balance (contract §10.5) and the operator top-up (§10.6).

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::Json;
use atelier_shared::domain::Credits;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

pub async fn balance(
    State(s): State<AppState>,
    Caller(acc): Caller,
) -> ApiResult<impl IntoResponse> {
    let (owner_id, group) = s.store.billing_owner(&acc.id).await?;
    let owner = s
        .store
        .account(&owner_id)
        .await?
        .ok_or_else(|| ApiError::internal("billing owner vanished"))?;
    let b = owner.credits();
    Ok(axum::Json(json!({
        "user_credits": b.balance.as_f64(),
        "in_progress_credits": b.reserved.as_f64(),
        "available_credits": b.available().as_f64(),
        "billing_owner": group.unwrap_or_else(|| "self".into()),
    })))
}

#[derive(Deserialize)]
pub struct Grant {
    pub user: String,
    pub amount: f64,
    pub reason: String,
}

pub async fn grant(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Json(g): Json<Grant>,
) -> ApiResult<impl IntoResponse> {
    if acc.is_operator != 1 {
        // Not visible to ordinary accounts.
        return Err(ApiError::not_found("No such route"));
    }
    let amount = Credits::from_f64(g.amount)
        .ok_or_else(|| ApiError::bad_request(Some("amount"), "must be a finite number", "body"))?;
    if g.reason.trim().is_empty() {
        return Err(ApiError::bad_request(
            Some("reason"),
            "must not be empty",
            "body",
        ));
    }
    let target = match s.store.account(&g.user).await? {
        Some(a) => a,
        None => s
            .store
            .account_by_name(&g.user)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("User {} not found", g.user)))?,
    };
    let after = s
        .store
        .grant_credits(&target.id, amount, g.reason.trim())
        .await?
        .ok_or_else(|| {
            ApiError::conflict(
                "conflict",
                "The correction would leave less than the credits reserved by running jobs",
            )
        })?;
    Ok((
        StatusCode::CREATED,
        axum::Json(
            json!({"grant_id": format!("grant_{}", ulid::Ulid::new()), "user_credits": Credits(after.balance).as_f64()}),
        ),
    ))
}
