//! Generation jobs: `POST /create-packshot` (contract §3.5) with every
//! admission rule, status (§3.9), results (§3.10) and abort (§3.12).

use crate::AppState;
use crate::auth::{Caller, stamp};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonValue;
use crate::limits::Bucket;
use crate::views;
use atelier_shared::db::jobs::{Admission, NewJob, NewOutput};
use atelier_shared::domain::JobType;
use atelier_shared::domain::credits::SizeClass;
use atelier_shared::domain::packshot;
use atelier_shared::domain::trace::TraceParent;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use rand::Rng;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

pub async fn create_packshot(
    State(s): State<AppState>,
    Caller(acc): Caller,
    headers: axum::http::HeaderMap,
    body: JsonValue,
) -> ApiResult<axum::response::Response> {
    let decision = match creation_limit(&s, &acc.id, "create-packshot").await {
        Ok(d) => d,
        Err(refused) => return Ok(refused),
    };

    let req = packshot::parse_request(&body.0).map_err(|e| ApiError::invalid(vec![e]))?;
    let spec = packshot::validate(&req, &s.config.catalogue, &s.engines, || {
        rand::rng().random()
    })
    .map_err(ApiError::invalid)?;

    // Plan policy (403).
    let max = SizeClass::parse(&acc.max_size).unwrap_or(SizeClass::K1);
    if spec.largest_size() > max {
        return Err(ApiError::forbidden(format!(
            "Output size {} exceeds your plan's maximum of {}",
            spec.largest_size().as_str(),
            max.as_str()
        ))
        .with("max_size", max.as_str()));
    }
    if spec.uses_custom_dimensions() && acc.custom_dimensions != 1 {
        return Err(ApiError::forbidden(
            "Custom width/height requires the OUTPUT_CUSTOM_DIMENSIONS policy on your account",
        ));
    }

    // Ownership (404 for anything of another account).
    let project = s
        .store
        .project(&acc.id, &req.project_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Project {} not found", req.project_id)))?;
    check_images(&s, &acc.id, &spec.images).await?;

    // Admission: cap, credits, job, outputs, reservation, outbox: one transaction.
    let (billing, _) = s.store.billing_owner(&acc.id).await?;
    let outputs = spec
        .planned_outputs(&s.config.prices)
        .into_iter()
        .map(|(i, v, cost)| NewOutput {
            instruction_index: i,
            variation_index: v,
            cost,
            output_format: spec.instructions[i as usize]
                .output
                .format
                .ext()
                .to_string(),
        })
        .collect::<Vec<_>>();
    let spec_json = serde_json::to_string(&spec).map_err(ApiError::internal)?;
    let trace = job_trace(&headers);
    tracing::info!(trace_id = %trace.trace_id_hex(), account = %acc.id, "admitting create-packshot");
    let admission = s
        .store
        .create_job(NewJob {
            account_id: &acc.id,
            billing_account_id: &billing,
            project_id: Some(&project.id),
            job_type: JobType::CreatePackshot,
            spec_json,
            post_process: spec.post_process,
            outputs,
            max_attempts: s.config.scheduler.retry.max_attempts,
            active_job_cap: (!acc.is_enterprise()).then_some(s.config.limits.active_jobs),
            traceparent: Some(trace.to_string()),
            identity: None,
        })
        .await?;
    let mut resp = match admission {
        Admission::Created {
            job_id,
            total_outputs,
            required,
        } => {
            metrics::counter!("atelier_jobs_created_total", "type" => "create_packshot")
                .increment(1);
            tracing::info!(job.id = %job_id, account.id = %acc.id, outputs = total_outputs, credits = required.as_f64(), "job accepted");
            (
                StatusCode::ACCEPTED,
                axum::Json(json!({
                    "job_id": job_id, "status": "pending", "total_outputs": total_outputs,
                    "message": format!("Packshot job accepted: {total_outputs} outputs, {} credits reserved", required.as_f64()),
                })),
            )
                .into_response()
        }
        refused => return Err(refusal(refused)),
    };
    stamp(resp.headers_mut(), &decision);
    Ok(resp)
}

/// The trace a new job's work continues: a hop of the request span, in the
/// client's trace when it sent a `traceparent` (the request span already
/// adopted it: see `router`).
pub(crate) fn job_trace(headers: &axum::http::HeaderMap) -> TraceParent {
    let client = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    atelier_shared::telemetry::hop_of(&tracing::Span::current(), client.as_ref())
}

/// The creation bucket of `endpoint` (contract §1.9: 5 per minute per
/// account and endpoint): the decision to stamp on the answer, or the 429.
pub(crate) async fn creation_limit(
    s: &AppState,
    account: &str,
    endpoint: &str,
) -> Result<crate::limits::Decision, axum::response::Response> {
    let decision = s
        .limiter
        .check(Bucket::Create, &format!("{account}:{endpoint}"))
        .await;
    if decision.allowed {
        return Ok(decision);
    }
    let mut r = ApiError::too_many(
        "rate_limited",
        format!("At most {} {endpoint} requests per minute", decision.limit),
        decision.retry_after_secs,
    )
    .into_response();
    stamp(r.headers_mut(), &decision);
    Err(r)
}

/// The answer to an admission that did not create the job.
pub(crate) fn refusal(a: Admission) -> ApiError {
    match a {
        Admission::ConcurrencyLimit { active, cap } => ApiError::too_many(
            "concurrency_limit",
            format!("{active} jobs are already pending or processing; at most {cap} at once"),
            10,
        ),
        Admission::InsufficientCredits {
            required,
            in_progress,
            user_credits,
        } => ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_credits",
            "Insufficient credits to create job",
        )
        .with("required_credits", required.as_f64())
        .with("in_progress_credits", in_progress.as_f64())
        .with("user_credits", user_credits.as_f64()),
        Admission::IdentityNotFound => ApiError::not_found("Identity not found"),
        Admission::IdentityNotReady { status } => ApiError::conflict(
            "identity_not_ready",
            format!("The identity's preprocessing is {status}, not completed"),
        )
        .with("preprocessing_status", status),
        Admission::Created { job_id, .. } => {
            ApiError::internal(format!("job {job_id} was created but reported as refused"))
        }
    }
}

/// Every image must be the caller's (404 otherwise) and uploaded (400).
pub(crate) async fn check_images(
    s: &AppState,
    account: &str,
    images: &[atelier_shared::domain::packshot::ImageSpec],
) -> ApiResult<()> {
    let ids: Vec<String> = images.iter().map(|i| i.file_id.clone()).collect();
    let found: HashMap<String, String> = s
        .store
        .files_of(account, &ids)
        .await?
        .into_iter()
        .map(|f| (f.id, f.status))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        match found.get(id).map(String::as_str) {
            None => {
                return Err(
                    ApiError::not_found(format!("File {id} not found")).with_detail(
                        Some(&format!("images[{i}]")),
                        "file not found",
                        "body",
                    ),
                );
            }
            Some("uploaded") => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    Some(&format!("images[{i}]")),
                    format!("missing or invalid image: the upload of {id} has not completed"),
                    "body",
                ));
            }
        }
    }
    Ok(())
}

async fn load(
    s: &AppState,
    account: &str,
    job_id: &str,
) -> ApiResult<atelier_shared::db::jobs::JobRow> {
    s.store
        .job_for(account, job_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Job {job_id} not found")))
}

pub async fn status(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(job_id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(axum::Json(views::job_status(
        &load(&s, &acc.id, &job_id).await?,
    )))
}

pub async fn results(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(job_id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let job = load(&s, &acc.id, &job_id).await?;
    let outputs = s.store.latest_outputs(&job.id).await?;
    let ttl = Duration::from_secs(s.config.limits.result_url_ttl_secs);
    // Every job type's spec lists its input images the same way.
    let images: Vec<atelier_shared::domain::packshot::ImageSpec> =
        serde_json::from_str::<Value>(&job.spec)
            .ok()
            .and_then(|v| v.get("images").cloned())
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
    let mut inputs = Vec::new();
    for img in &images {
        let url = match s.store.file(&img.file_id).await? {
            Some(f) if f.status == "uploaded" => {
                Value::String(s.object_url(&f.object_key, &f.content_type, ttl).await?)
            }
            _ => Value::Null,
        };
        inputs.push(json!({"full_size": url, "thumbnail": Value::Null}));
    }
    let inputs = Value::Array(inputs);
    let mut results = Vec::with_capacity(outputs.len());
    for o in &outputs {
        results.push(views::image_result(&s, &job, o, &inputs, ttl).await?);
    }
    let successful = outputs.iter().filter(|o| o.status == "completed").count();
    let failed = outputs
        .iter()
        .filter(|o| matches!(o.status.as_str(), "failed" | "cancelled"))
        .count();
    let mut body = views::job_status(&job);
    let obj = body
        .as_object_mut()
        .ok_or_else(|| ApiError::internal("job status is not an object"))?;
    obj.insert("results".into(), Value::Array(results));
    obj.insert(
        "summary".into(),
        json!({
            "total_images": outputs.len(), "successful": successful, "failed": failed,
            "average_quality_score": Value::Null,
            "success_rate": if outputs.is_empty() { 0.0 } else { successful as f64 / outputs.len() as f64 },
        }),
    );
    obj.insert(
        "credits_used".into(),
        if job.status().is_terminal() {
            json!(job.credits_charged as f64 / 1000.0)
        } else {
            Value::Null
        },
    );
    // For preprocessing jobs: what this job made of the identity (§3.10).
    let identity = match (&job.identity_code, job.job_type.as_str()) {
        (Some(code), "identity_preprocessing") => {
            let record = outputs.first().and_then(|o| {
                o.input_description.as_deref().and_then(|d| {
                    serde_json::from_str::<atelier_shared::domain::identity::FaceRecord>(d).ok()
                })
            });
            json!({
                "identity_code": code,
                "preprocessing_status": atelier_shared::domain::identity::preprocessing_status(Some(&job.status)),
                "quality_score": record.map(|r| r.quality()),
                "preprocessing_time": job.finalized_at.map(|f| (f - job.created_at).max(0) as f64 / 1000.0),
            })
        }
        _ => Value::Null,
    };
    obj.insert("identity".into(), identity);
    Ok(axum::Json(body))
}

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
            axum::Json(json!({"job_id": job_id, "status": "aborted"})),
        )),
    }
}
