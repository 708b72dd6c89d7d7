//! Balance (contract §10.5) and the operator top-up (§10.6).

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::Json;
use crate::state::AppState;
use crate::views::{Balance, GrantRecorded};
use atelier_shared::domain::Credits;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;

/// The credits of the caller's billing owner (itself, or its group's).
#[utoipa::path(
    get, path = "/billing/balance", tag = "billing",
    responses((status = 200, description = "The balance", body = Balance)),
)]
pub async fn balance(
    State(s): State<AppState>,
    Caller(acc): Caller,
) -> ApiResult<axum::Json<Balance>> {
    let (owner_id, group) = s.store.billing_owner(&acc.id).await?;
    let owner = s
        .store
        .account(&owner_id)
        .await?
        .ok_or_else(|| ApiError::internal("billing owner vanished"))?;
    let b = owner.credits();
    Ok(axum::Json(Balance {
        user_credits: b.balance.as_f64(),
        in_progress_credits: b.reserved.as_f64(),
        available_credits: b.available().as_f64(),
        billing_owner: group.unwrap_or_else(|| "self".into()),
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct Grant {
    /// Account id or name.
    pub user: String,
    /// Credits to add (negative: a correction).
    pub amount: f64,
    pub reason: String,
}

/// Operators only: grant (or correct) an account's credits; an entry of
/// the append-only ledger.
#[utoipa::path(
    post, path = "/admin/credits/grants", tag = "billing",
    request_body = Grant,
    responses(
        (status = 201, description = "Granted", body = GrantRecorded),
        (status = 404, description = "Not an operator, or no such account", body = crate::error::ErrorBody),
        (status = 409, description = "The correction would leave less than what running jobs reserved", body = crate::error::ErrorBody),
    ),
)]
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
        axum::Json(GrantRecorded {
            grant_id: format!("grant_{}", ulid::Ulid::new()),
            user_credits: Credits(after.balance).as_f64(),
        }),
    ))
}
