//! `POST /model-swap` (contract §3.6): one output per product photo, in
//! which the person's face is replaced by a preprocessed identity's.

use crate::AppState;
use crate::auth::{Caller, stamp};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonValue;
use crate::routes::jobs::{check_images, creation_limit, job_trace, refusal};
use atelier_shared::db::jobs::{Admission, IdentityUse, NewJob, NewOutput};
use atelier_shared::domain::JobType;
use atelier_shared::domain::credits::PriceTable;
use atelier_shared::domain::identity::{self, IdentityKind, SwapEngine};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

/// Swap engines a client may name on this server: `onda`, the default
/// route, runs the configured face-swap model or the built-in blender.
pub const AVAILABLE: [SwapEngine; 1] = [SwapEngine::Onda];

pub async fn create(
    State(s): State<AppState>,
    Caller(acc): Caller,
    headers: axum::http::HeaderMap,
    body: JsonValue,
) -> ApiResult<axum::response::Response> {
    let decision = match creation_limit(&s, &acc.id, "model-swap").await {
        Ok(d) => d,
        Err(refused) => return Ok(refused),
    };
    let req = identity::parse_swap(&body.0).map_err(|e| ApiError::invalid(vec![e]))?;
    let spec = identity::validate_swap(&req, &AVAILABLE).map_err(ApiError::invalid)?;
    let project = s
        .store
        .project(&acc.id, &req.project_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Project {} not found", req.project_id)))?;
    check_images(&s, &acc.id, &spec.images).await?;
    // The identity's 404/409 come before the cap and credits (DESIGN.md's
    // order); admission checks it again with the identity row locked.
    let ident = s
        .store
        .identity_for(&acc.id, IdentityKind::Identity, &spec.identity_code)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Identity {} not found", spec.identity_code)))?;
    if ident.preprocessing_status() != "completed" {
        return Err(refusal(Admission::IdentityNotReady {
            status: ident.preprocessing_status().to_string(),
        }));
    }

    let (billing, _) = s.store.billing_owner(&acc.id).await?;
    let outputs = (0..spec.images.len() as u32)
        .map(|i| NewOutput {
            instruction_index: i,
            variation_index: 0,
            cost: PriceTable::flat(s.config.prices.model_swap),
            output_format: "jpg".into(),
        })
        .collect::<Vec<_>>();
    let spec_json = serde_json::to_string(&spec).map_err(ApiError::internal)?;
    let trace = job_trace(&headers);
    let admission = s
        .store
        .create_job(NewJob {
            account_id: &acc.id,
            billing_account_id: &billing,
            project_id: Some(&project.id),
            job_type: JobType::ModelSwap,
            spec_json,
            post_process: spec.post_process,
            outputs,
            max_attempts: s.config.scheduler.retry.max_attempts,
            active_job_cap: (!acc.is_enterprise()).then_some(s.config.limits.active_jobs),
            traceparent: Some(trace.to_string()),
            identity: Some(IdentityUse::Ready(&spec.identity_code)),
        })
        .await?;
    let Admission::Created {
        job_id,
        total_outputs,
        required,
    } = admission
    else {
        return Err(match refusal(admission) {
            e if e.status == StatusCode::NOT_FOUND => {
                ApiError::not_found(format!("Identity {} not found", spec.identity_code))
            }
            e => e,
        });
    };
    metrics::counter!("atelier_jobs_created_total", "type" => "model_swap").increment(1);
    tracing::info!(job.id = %job_id, account.id = %acc.id, identity = %spec.identity_code, outputs = total_outputs, "model-swap job accepted");
    let mut resp = (
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "job_id": job_id, "status": "pending", "total_outputs": total_outputs,
            "message": format!("Model swap job accepted: {total_outputs} outputs, {} credits reserved", required.as_f64()),
        })),
    )
        .into_response();
    stamp(resp.headers_mut(), &decision);
    Ok(resp)
}
