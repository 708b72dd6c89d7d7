//! `POST /model-swap` (contract §3.6): one output per product photo, in
//! which the person's face is replaced by a preprocessed identity's.

use crate::admission::{self, creation_limit};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonValue;
use crate::state::AppState;
use crate::views::JobAccepted;
use atelier_shared::domain::swap::{self, SwapEngine, SwapRequest};
use axum::extract::State;
use axum::response::Response;

/// Swap engines a client may name on this server: `onda`, the default
/// route, runs the configured face-swap model or the built-in blender.
pub const AVAILABLE: [SwapEngine; 1] = [SwapEngine::Onda];

/// Replace the model's face in product photos with a preprocessed
/// identity's.
#[utoipa::path(
    post, path = "/model-swap", tag = "jobs",
    request_body = SwapRequest,
    responses(
        (status = 202, description = "The job is recorded", body = JobAccepted),
        (status = 402, description = "Not enough credits", body = crate::error::ErrorBody),
        (status = 409, description = "The identity's preprocessing is not completed (`identity_not_ready`)", body = crate::error::ErrorBody),
        (status = 429, description = "Creation rate limit or active-job cap", body = crate::error::ErrorBody),
    ),
)]
pub async fn create(
    State(s): State<AppState>,
    Caller(acc): Caller,
    headers: axum::http::HeaderMap,
    body: JsonValue,
) -> ApiResult<Response> {
    let decision = match creation_limit(&s, &acc.id, "model-swap").await {
        Ok(d) => d,
        Err(refused) => return Ok(refused),
    };
    let mut body = body;
    crate::routes::presets::apply_presets(
        &s,
        &acc.id,
        &mut body.0,
        atelier_shared::domain::presets::PresetType::ModelSwap,
    )
    .await?;
    let req = swap::parse_swap(&body.0).map_err(|e| ApiError::invalid(vec![e]))?;
    let spec = swap::validate_swap(&req, &AVAILABLE).map_err(ApiError::invalid)?;
    let project = admission::project(&s, &acc.id, &req.project_id).await?;
    let code = spec.identity_code.clone();
    let spec = spec.into();
    admission::ready_identity(&s, &acc.id, &code).await?;
    admission::admit(
        &s,
        admission::Request {
            caller: &acc,
            project_id: Some(project),
            spec,
            decision,
            headers: &headers,
            noun: "Model swap job",
        },
    )
    .await
}
