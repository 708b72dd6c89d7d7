//! Identity drafts (contract §3.8) and their promotion into identities
//! (§5.7). Drafts are the outputs of an `identity_creation` job, drawn by
//! the operator's generator engines; promoting one copies its image into
//! the identity's photo and runs the same preprocessing as an upload.

use super::identities::{Named, admit_named, new_code, one_photo_spec, put_identity_photo};
use crate::admission::{self, creation_limit, job_trace};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonValue;
use crate::state::AppState;
use crate::views::{IdentityPromoted, JobAccepted, PublicOutputStatus};
use atelier_shared::domain::drafts::{self, DraftRequest};
use atelier_shared::domain::identity;
use atelier_shared::domain::packshot::FieldError;
use atelier_shared::domain::{JobSpec, JobStatus, OutputStatus};
use atelier_shared::storage::StorageError;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::Deserialize;

/// The name of identities promoted from a job that gave none.
const DEFAULT_NAME: &str = "Generated identity";

/// Generate identity drafts: standardised portraits of a fictional person
/// per instruction × variation, priced by size; prompts naming real
/// people are refused.
#[utoipa::path(
    post, path = "/identity/create", tag = "identities",
    request_body = DraftRequest,
    responses(
        (status = 202, description = "The job is recorded (`num_instructions`, `total_variations`)", body = JobAccepted),
        (status = 400, description = "Invalid request, a blocked term (`detail[].message` names it), an engine constraint, or no generator engine draws identity drafts on this server", body = crate::error::ErrorBody),
        (status = 402, description = "Not enough credits", body = crate::error::ErrorBody),
        (status = 403, description = "The plan does not allow the size or custom dimensions", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown input asset", body = crate::error::ErrorBody),
        (status = 429, description = "Creation rate limit or active-job cap", body = crate::error::ErrorBody),
    ),
)]
pub async fn create(
    State(s): State<AppState>,
    Caller(acc): Caller,
    headers: HeaderMap,
    body: JsonValue,
) -> ApiResult<Response> {
    let decision = match creation_limit(&s, &acc.id, "identity/create").await {
        Ok(d) => d,
        Err(refused) => return Ok(refused),
    };
    let mut body = body;
    crate::routes::presets::apply_presets(
        &s,
        &acc.id,
        &mut body.0,
        atelier_shared::domain::presets::PresetType::IdentityCreation,
    )
    .await?;
    let req = drafts::parse_request(&body.0).map_err(|e| ApiError::invalid(vec![e]))?;
    let spec = drafts::validate(&req, &s.engines, &s.policy, || rand::rng().random())
        .map_err(ApiError::invalid)?;
    admission::plan_policy(&acc, spec.largest_size(), spec.uses_custom_dimensions())?;
    let spec = spec.into();
    admission::admit(
        &s,
        admission::Request {
            caller: &acc,
            project_id: None,
            spec,
            decision,
            headers: &headers,
            noun: "Identity creation job",
        },
    )
    .await
}

/// `POST /identity/promote-generated`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PromoteRequest {
    /// A completed draft of one of the caller's identity-creation jobs.
    pub image_result_id: i64,
    /// 1–128 characters; default: the creation job's `name`, made unique.
    pub name: Option<String>,
}

/// Turn a completed draft into an identity: one slot, 50 credits, and the
/// preprocessing an upload gets. Promoting the same draft again answers
/// `409` with the identity made the first time.
#[utoipa::path(
    post, path = "/identity/promote-generated", tag = "identities",
    request_body = PromoteRequest,
    responses(
        (status = 201, description = "The identity exists and its preprocessing started", body = IdentityPromoted),
        (status = 400, description = "The result is not a completed draft of an identity-creation job", body = crate::error::ErrorBody),
        (status = 402, description = "Not enough credits", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown image_result_id", body = crate::error::ErrorBody),
        (status = 409, description = "Already promoted (`identity_code`), or the explicit name is taken (`existing_identity_code` only)", body = crate::error::ErrorBody),
        (status = 429, description = "Identity slots exhausted or rate limited", body = crate::error::ErrorBody),
    ),
)]
pub async fn promote(
    State(s): State<AppState>,
    Caller(acc): Caller,
    headers: HeaderMap,
    body: JsonValue,
) -> ApiResult<Response> {
    let decision = match creation_limit(&s, &acc.id, "identity/promote-generated").await {
        Ok(d) => d,
        Err(refused) => return Ok(refused),
    };
    let req: PromoteRequest = serde_path_to_error::deserialize(&body.0).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(vec![FieldError {
            field: Some(if path == "." {
                "image_result_id".into()
            } else {
                path
            }),
            message: e.into_inner().to_string(),
        }])
    })?;
    let explicit = match &req.name {
        Some(n) => Some(identity::validate_name(n).map_err(|e| ApiError::invalid(vec![e]))?),
        None => None,
    };
    let unknown = || ApiError::not_found(format!("image result {}", req.image_result_id));
    let out = s
        .store
        .output(req.image_result_id)
        .await?
        .ok_or_else(unknown)?;
    let job = s
        .store
        .job_for(&acc.id, &out.job_id)
        .await?
        .ok_or_else(unknown)?;
    let JobSpec::IdentityCreation(spec) = &job.spec else {
        return Err(ApiError::bad_request(
            Some("image_result_id"),
            format!(
                "result {} is an output of a {} job, not an identity draft",
                out.id, job.job_type
            ),
            "body",
        ));
    };
    if let Some(code) = s.store.promoted_from(out.id).await? {
        return Err(already_promoted(code));
    }
    let full_key = match (&out.status, &out.full_key) {
        (OutputStatus::Completed, Some(k)) => k.clone(),
        (status, _) => {
            let public = format!("{:?}", PublicOutputStatus::from(*status)).to_lowercase();
            return Err(ApiError::bad_request(
                Some("image_result_id"),
                format!("draft {} is not completed (status {public})", out.id),
                "body",
            ));
        }
    };
    let bytes = s.objects.get(&full_key).await.map_err(|e| match e {
        StorageError::NotFound(_) => ApiError::bad_request(
            Some("image_result_id"),
            format!("the image of draft {} is gone", out.id),
            "body",
        ),
        other => other.into(),
    })?;
    let (content_type, ext, _, _) = crate::routes::uploads::sniff_any(&bytes)
        .map_err(|m| ApiError::internal(format!("stored draft {}: {m}", out.id)))?;
    let code = new_code();
    let filename = format!("draft_{}.{ext}", out.id);
    let key = put_identity_photo(&s, &acc.id, &code, "photo", bytes, content_type, ext).await?;
    let base_name = explicit
        .clone()
        .or_else(|| spec.name.clone())
        .unwrap_or_else(|| DEFAULT_NAME.to_string());
    let job_id = admit_named(
        &s,
        &acc,
        Named {
            code: &code,
            base_name: &base_name,
            explicit: explicit.is_some(),
            tag: None,
            original_filename: Some(&filename),
            photo_key: &key,
            promoted_from: Some(out.id),
        },
        one_photo_spec(&code, key.clone(), Some(filename.clone())),
        job_trace(&headers).to_string(),
    )
    .await?;
    // What the brief asked for describes the person (the list filters use
    // it); nothing here estimates gender or age from pixels.
    if let Some(brief) = spec.instructions.get(out.instruction_index as usize)
        && let (gender, age) = brief.described()
        && (gender.is_some() || age.is_some())
    {
        s.store
            .describe_identity(&code, gender.as_deref(), age)
            .await?;
    }
    tracing::info!(identity = %code, draft = out.id, job.id = %job_id, "draft promoted");
    let mut resp = (
        StatusCode::CREATED,
        axum::Json(IdentityPromoted {
            identity_code: code.clone(),
            preprocessing_job_id: job_id,
            status: JobStatus::Pending,
            message: format!(
                "Draft {} promoted to identity {code}; preprocessing started",
                out.id
            ),
        }),
    )
        .into_response();
    crate::auth::stamp(resp.headers_mut(), &decision);
    Ok(resp)
}

fn already_promoted(code: String) -> ApiError {
    ApiError::conflict(
        "already_promoted",
        format!("This draft was already promoted: identity {code}"),
    )
    .with("identity_code", code)
}
