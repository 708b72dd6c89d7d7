//! Generation jobs: `POST /create-packshot` (contract §3.5) with every
//! admission rule, status (§3.9), results (§3.10) and abort (§3.12).

use crate::admission::{self, creation_limit};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonValue;
use crate::state::AppState;
use crate::views::{
    ImageLinks, ImageResult, JobAborted, JobAccepted, JobIdentity, JobResults, JobStatusView,
    ResultSummary,
};
use atelier_shared::db::rows::JobRow;
use atelier_shared::domain::JobStatus;
use atelier_shared::domain::packshot::{self, PackshotRequest};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rand::Rng;

/// Create packshots of garment photos: every instruction × variation is an
/// output, priced by its size class.
#[utoipa::path(
    post, path = "/create-packshot", tag = "jobs",
    request_body = PackshotRequest,
    responses(
        (status = 202, description = "The job is recorded; poll its status, stream notifications or wait for the webhook", body = JobAccepted),
        (status = 402, description = "Not enough credits", body = crate::error::ErrorBody),
        (status = 403, description = "The plan does not allow the size or custom dimensions", body = crate::error::ErrorBody),
        (status = 429, description = "Creation rate limit or active-job cap", body = crate::error::ErrorBody),
    ),
)]
pub async fn create_packshot(
    State(s): State<AppState>,
    Caller(acc): Caller,
    headers: axum::http::HeaderMap,
    body: JsonValue,
) -> ApiResult<Response> {
    let decision = match creation_limit(&s, &acc.id, "create-packshot").await {
        Ok(d) => d,
        Err(refused) => return Ok(refused),
    };
    let req = packshot::parse_request(&body.0).map_err(|e| ApiError::invalid(vec![e]))?;
    let spec = packshot::validate(&req, &s.config.catalogue, &s.engines, || {
        rand::rng().random()
    })
    .map_err(ApiError::invalid)?;

    admission::plan_policy(&acc, spec.largest_size(), spec.uses_custom_dimensions())?;

    // Ownership (404 for anything of another account).
    let project = admission::project(&s, &acc.id, &req.project_id).await?;
    let spec = spec.into();
    admission::check_files(&s, &acc.id, &spec).await?;
    admission::admit(
        &s,
        admission::Request {
            caller: &acc,
            project_id: Some(&project.id),
            spec,
            decision,
            headers: &headers,
            noun: "Packshot job",
        },
    )
    .await
}

async fn load(s: &AppState, account: &str, job_id: &str) -> ApiResult<JobRow> {
    s.store
        .job_for(account, job_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Job {job_id} not found")))
}

/// A job's status and progress.
#[utoipa::path(
    get, path = "/jobs/{job_id}/status", tag = "jobs",
    params(("job_id" = String, Path, description = "The job's id")),
    responses((status = 200, description = "The job", body = JobStatusView)),
)]
pub async fn status(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(job_id): Path<String>,
) -> ApiResult<axum::Json<JobStatusView>> {
    Ok(axum::Json(JobStatusView::from(
        &load(&s, &acc.id, &job_id).await?,
    )))
}

/// A job's results: the latest version of every output, with signed URLs.
#[utoipa::path(
    get, path = "/jobs/{job_id}/results", tag = "jobs",
    params(("job_id" = String, Path, description = "The job's id")),
    responses((status = 200, description = "The job and its outputs", body = JobResults)),
)]
pub async fn results(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(job_id): Path<String>,
) -> ApiResult<axum::Json<JobResults>> {
    let job = load(&s, &acc.id, &job_id).await?;
    let outputs = s.store.latest_outputs(&job.id).await?;
    let ttl = s.result_ttl();
    let mut inputs = Vec::new();
    for file_id in job.spec.requirements().files {
        let full_size = match s.store.file(file_id).await? {
            Some(f) if f.is_uploaded() => {
                Some(s.object_url(&f.object_key, &f.content_type, ttl).await?)
            }
            _ => None,
        };
        inputs.push(ImageLinks {
            full_size,
            thumbnail: None,
        });
    }
    let mut results = Vec::with_capacity(outputs.len());
    for o in &outputs {
        results.push(ImageResult::build(&s, &job, o, &inputs).await?);
    }
    Ok(axum::Json(JobResults {
        summary: ResultSummary::of(&outputs),
        credits_used: job
            .status
            .is_terminal()
            .then(|| job.credits_charged as f64 / 1000.0),
        identity: JobIdentity::of(&job, &outputs),
        job: JobStatusView::from(&job),
        results,
    }))
}

/// Aborts a job: open outputs are cancelled and their credits released;
/// completed outputs stay billed.
#[utoipa::path(
    post, path = "/jobs/{job_id}/abort", tag = "jobs",
    params(("job_id" = String, Path, description = "The job's id")),
    responses(
        (status = 202, description = "Aborted", body = JobAborted),
        (status = 409, description = "The job has already finished", body = crate::error::ErrorBody),
    ),
)]
pub async fn abort(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(job_id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    match s.store.abort_job(&acc.id, &job_id).await? {
        None => Err(ApiError::not_found(format!("Job {job_id} not found"))),
        Some(false) => Err(ApiError::conflict(
            "conflict",
            "The job has already finished",
        )),
        Some(true) => Ok((
            StatusCode::ACCEPTED,
            axum::Json(JobAborted {
                job_id,
                status: JobStatus::Aborted,
            }),
        )),
    }
}
