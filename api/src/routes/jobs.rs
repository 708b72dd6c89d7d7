//! Generation jobs: `POST /create-packshot` (contract §3.5) with every
//! admission rule, status (§3.9), results (§3.10) and abort (§3.12).

use crate::admission::{self, creation_limit};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonValue, Query};
use crate::state::AppState;
use crate::views::{
    ImageLinks, ImageResult, JobAborted, JobAccepted, JobIdentity, JobList, JobResults,
    JobStatusView, Pagination, Regenerated, ResultSummary,
};
use atelier_shared::db::jobs::{JobQuery, Regeneration};
use atelier_shared::db::rows::JobRow;
use atelier_shared::domain::packshot::{self, PackshotRequest};
use atelier_shared::domain::{JobStatus, JobType};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::Deserialize;

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
    let mut body = body;
    crate::routes::presets::apply_presets(
        &s,
        &acc.id,
        &mut body.0,
        atelier_shared::domain::presets::PresetType::CreatePackshot,
    )
    .await?;
    let req = packshot::parse_request(&body.0).map_err(|e| ApiError::invalid(vec![e]))?;
    let spec = packshot::validate(&req, &s.config.catalogue, &s.engines, || {
        rand::rng().random()
    })
    .map_err(ApiError::invalid)?;

    admission::plan_policy(&acc, spec.largest_size(), spec.uses_custom_dimensions())?;

    // Ownership (404 for anything of another account).
    let project = admission::project(&s, &acc.id, &req.project_id).await?;
    let spec = spec.into();
    admission::admit(
        &s,
        admission::Request {
            caller: &acc,
            project_id: Some(project),
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

/// Query of `GET /jobs`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobListQuery {
    /// 1-based page (default 1).
    pub page: Option<i64>,
    /// 1–100 (default 20).
    pub per_page: Option<i64>,
    /// `asc` or `desc` by creation time (default `desc`).
    pub order: Option<String>,
    /// Only jobs in this state (`pending`, `processing`, `completed`,
    /// `failed`, `aborted`).
    pub status: Option<String>,
    /// Only jobs of this kind (`create_packshot`, `model_swap`, …).
    pub job_type: Option<String>,
    /// Only the jobs filed under this project.
    pub project_id: Option<String>,
}

/// The caller's jobs, newest first (an extension of the contract: the
/// console and the CLI list them).
#[utoipa::path(
    get, path = "/jobs", tag = "jobs", params(JobListQuery),
    responses((status = 200, description = "A page of jobs", body = JobList)),
)]
pub async fn list(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Query(q): Query<JobListQuery>,
) -> ApiResult<axum::Json<JobList>> {
    let (page, per_page, ascending) =
        crate::routes::paging(q.page, q.per_page, q.order.as_deref(), 20)?;
    let status = match q.status.as_deref().filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => Some(JobStatus::parse(v).ok_or_else(|| {
            ApiError::bad_request(
                Some("status"),
                "must be pending, processing, completed, failed or aborted",
                "query",
            )
        })?),
    };
    let job_type = match q.job_type.as_deref().filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => Some(JobType::parse(v).ok_or_else(|| {
            ApiError::bad_request(Some("job_type"), format!("unknown job type {v:?}"), "query")
        })?),
    };
    let query = JobQuery {
        page,
        per_page,
        ascending,
        status,
        job_type,
        project_id: q.project_id.clone().filter(|p| !p.is_empty()),
    };
    let (rows, total) = s.store.list_jobs(&acc.id, &query).await?;
    Ok(axum::Json(JobList {
        jobs: rows.iter().map(JobStatusView::from).collect(),
        pagination: Pagination::new(page, per_page, total),
    }))
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

/// Query of `GET /jobs/{job_id}/results`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResultsQuery {
    /// Also list the earlier versions of regenerated outputs (default
    /// false: the latest version of each output, contract §3.10).
    pub all_versions: Option<bool>,
}

/// A job's results: the latest version of every output (every version
/// with `all_versions=true`), with signed URLs.
#[utoipa::path(
    get, path = "/jobs/{job_id}/results", tag = "jobs",
    params(("job_id" = String, Path, description = "The job's id"), ResultsQuery),
    responses((status = 200, description = "The job and its outputs", body = JobResults)),
)]
pub async fn results(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(job_id): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> ApiResult<axum::Json<JobResults>> {
    let job = load(&s, &acc.id, &job_id).await?;
    let outputs = if q.all_versions.unwrap_or(false) {
        s.store.all_outputs(&job.id).await?
    } else {
        s.store.latest_outputs(&job.id).await?
    };
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
        Some(a) if !a.aborted => Err(ApiError::conflict(
            "conflict",
            "The job has already finished",
        )),
        Some(a) => {
            s.signal_abort(&a.running).await;
            Ok((
                StatusCode::ACCEPTED,
                axum::Json(JobAborted {
                    job_id,
                    status: JobStatus::Aborted,
                }),
            ))
        }
    }
}

/// Query of `POST /jobs/{job_id}/regenerate/{image_index}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RegenerateQuery {
    /// The variation (default 0).
    pub group_index: Option<i64>,
}

/// Regenerates one output of a finished job with its original parameters
/// (a generator draws it with a new seed): a new version, priced as the
/// original and reserved now; earlier versions are kept.
#[utoipa::path(
    post, path = "/jobs/{job_id}/regenerate/{image_index}", tag = "jobs",
    params(
        ("job_id" = String, Path, description = "The job's id"),
        ("image_index" = i64, Path, description = "The instruction (the input image for model swap)"),
        RegenerateQuery,
    ),
    responses(
        (status = 202, description = "The new version is queued", body = Regenerated),
        (status = 400, description = "An identity-preprocessing job, or no output at that index", body = crate::error::ErrorBody),
        (status = 402, description = "Not enough credits", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown job", body = crate::error::ErrorBody),
        (status = 409, description = "The job is still pending or processing", body = crate::error::ErrorBody),
        (status = 429, description = "Rate limit or active-job cap", body = crate::error::ErrorBody),
    ),
)]
pub async fn regenerate(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((job_id, image_index)): Path<(String, i64)>,
    Query(q): Query<RegenerateQuery>,
) -> ApiResult<Response> {
    let decision = match creation_limit(&s, &acc.id, "regenerate").await {
        Ok(d) => d,
        Err(refused) => return Ok(refused),
    };
    let group_index = q.group_index.unwrap_or(0);
    let job = load(&s, &acc.id, &job_id).await?;
    if job.job_type == JobType::IdentityPreprocessing {
        return Err(ApiError::bad_request(
            Some("job_id"),
            "identity-preprocessing jobs have no outputs to regenerate",
            "path",
        ));
    }
    let out_of_range = || {
        ApiError::bad_request(
            Some("image_index"),
            format!(
                "job {job_id} has no output at image_index {image_index}, group_index {group_index}"
            ),
            "path",
        )
    };
    if image_index < 0 || group_index < 0 {
        return Err(out_of_range());
    }
    let cap = (!acc.is_enterprise()).then_some(s.config.limits.active_jobs);
    let done = s
        .store
        .regenerate(&acc.id, &job.id, image_index, group_index, cap)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Job {job_id} not found")))?;
    match done {
        Regeneration::Queued {
            output_id,
            version,
            cost,
        } => {
            metrics::counter!("atelier_regenerations_total", "type" => job.job_type.as_str())
                .increment(1);
            tracing::info!(job.id = %job.id, output = output_id, version, "output regenerated");
            let mut resp = (
                StatusCode::ACCEPTED,
                axum::Json(Regenerated {
                    success: true,
                    message: format!(
                        "Output {image_index}/{group_index} queued as version {version}; {} credits reserved",
                        cost.as_f64()
                    ),
                    image_index,
                    group_index,
                    version,
                }),
            )
                .into_response();
            crate::auth::stamp(resp.headers_mut(), &decision);
            Ok(resp)
        }
        Regeneration::NotFinished(status) => Err(ApiError::conflict(
            "job_not_finished",
            format!("The job is {status}: only finished jobs can be regenerated"),
        )),
        Regeneration::NoSuchOutput => Err(out_of_range()),
        Regeneration::Refused(a) => Err(admission::refusal(a)),
    }
}
