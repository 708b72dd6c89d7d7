//! `POST /flat-2-model` (contract §3.7): an identity wearing the garments
//! of 1–10 flat-lay photos, drawn by the operator's generator engines.

use crate::admission::{self, creation_limit};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonValue;
use crate::state::AppState;
use crate::views::JobAccepted;
use atelier_shared::domain::flat::{self, FlatRequest};
use axum::extract::State;
use axum::response::Response;
use rand::Rng;

/// Dress a preprocessed identity in flat-lay garments: every instruction ×
/// variation is an on-model output, priced by its size class.
#[utoipa::path(
    post, path = "/flat-2-model", tag = "jobs",
    request_body = FlatRequest,
    responses(
        (status = 202, description = "The job is recorded", body = JobAccepted),
        (status = 400, description = "Invalid request, or no generator engine draws flat-2-model on this server (`options.model` names what is missing)", body = crate::error::ErrorBody),
        (status = 402, description = "Not enough credits", body = crate::error::ErrorBody),
        (status = 403, description = "The plan does not allow the size or custom dimensions", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown project, file or identity", body = crate::error::ErrorBody),
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
    let decision = match creation_limit(&s, &acc.id, "flat-2-model").await {
        Ok(d) => d,
        Err(refused) => return Ok(refused),
    };
    let mut body = body;
    crate::routes::presets::apply_presets(
        &s,
        &acc.id,
        &mut body.0,
        atelier_shared::domain::presets::PresetType::Flat2Model,
    )
    .await?;
    let req = flat::parse_request(&body.0).map_err(|e| ApiError::invalid(vec![e]))?;
    let spec = flat::validate(&req, &s.config.catalogue, &s.engines, || {
        rand::rng().random()
    })
    .map_err(ApiError::invalid)?;
    admission::plan_policy(&acc, spec.largest_size(), spec.uses_custom_dimensions())?;
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
            noun: "Flat-2-model job",
        },
    )
    .await
}
