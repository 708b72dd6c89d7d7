//! Admission: what every job-creating route does around its own
//! validation. The creation rate limit, the one transaction that checks
//! and records the job (input files, cap, credits, outputs, reservation,
//! outbox: the store's [`Store::create_job`]), the answer to a refusal
//! (an input file is named by its place in `images`), the trace the job's
//! work continues.
//!
//! A route parses and validates its request into its kind's typed spec,
//! checks what only it knows (plan policy, the identity's readiness), and
//! hands the spec to [`admit`].
//!
//! [`Store::create_job`]: atelier_shared::db::Store::create_job

use crate::auth::stamp;
use crate::error::{ApiError, ApiResult};
use crate::limits::{Bucket, Decision};
use crate::state::AppState;
use crate::views::JobAccepted;
use atelier_shared::db::accounts::Account;
use atelier_shared::db::jobs::{Admission, NewJob};
use atelier_shared::domain::trace::TraceParent;
use atelier_shared::domain::{JobSpec, JobStatus};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

/// The creation bucket of `endpoint` (contract §1.9: 5 per minute per
/// account and endpoint): the decision to stamp on the answer, or the 429.
pub async fn creation_limit(
    s: &AppState,
    account: &str,
    endpoint: &str,
) -> Result<Decision, Response> {
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

/// The trace a new job's work continues: a hop of the request span, in the
/// client's trace when it sent a `traceparent` (the request span already
/// adopted it: see `router`).
pub fn job_trace(headers: &HeaderMap) -> TraceParent {
    let client = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    atelier_shared::telemetry::hop_of(&tracing::Span::current(), client.as_ref())
}

/// The project a job is created in must be the caller's (404 for anything
/// else); its id.
pub async fn project<'a>(s: &AppState, account: &str, project_id: &'a str) -> ApiResult<&'a str> {
    if s.store.owns_project(account, project_id).await? {
        Ok(project_id)
    } else {
        Err(ApiError::not_found(format!("Project {project_id} not found")))
    }
}

/// The answer about an input file that is not an uploaded file of the
/// caller: `404` when it has no such file, `400` when its bytes were never
/// stored (`pending`); `field` names it in the request.
fn file_refusal(id: &str, pending: bool, field: Option<&str>) -> ApiError {
    if pending {
        ApiError::bad_request(
            field,
            format!("missing or invalid image: the upload of {id} has not completed"),
            "body",
        )
    } else {
        let e = ApiError::not_found(format!("File {id} not found"));
        match field {
            Some(f) => e.with_detail(Some(f), "file not found", "body"),
            None => e,
        }
    }
}

/// [`refusal`], with an input file the caller named refused by its field:
/// `field(i)` names the spec's file `i` in the request.
pub fn refusal_naming_files(a: Admission, field: impl Fn(usize) -> String) -> ApiError {
    match a {
        Admission::FileUnavailable {
            index,
            file_id,
            pending,
        } => file_refusal(&file_id, pending, Some(&field(index))),
        refused => refusal(refused),
    }
}

/// The account's plan must allow the job's largest output size and, when
/// it asks for them, custom dimensions (403 otherwise).
pub fn plan_policy(
    caller: &Account,
    largest: atelier_shared::domain::credits::SizeClass,
    custom_dimensions: bool,
) -> ApiResult<()> {
    use atelier_shared::domain::credits::SizeClass;
    let max = SizeClass::parse(&caller.max_size).unwrap_or(SizeClass::K1);
    if largest > max {
        return Err(ApiError::forbidden(format!(
            "Output size {} exceeds your plan's maximum of {}",
            largest.as_str(),
            max.as_str()
        ))
        .with("max_size", max.as_str()));
    }
    if custom_dimensions && caller.custom_dimensions != 1 {
        return Err(ApiError::forbidden(
            "Custom width/height requires the OUTPUT_CUSTOM_DIMENSIONS policy on your account",
        ));
    }
    Ok(())
}

/// The identity a job uses must be one the caller may use (its own, shared
/// with one of its groups, or a platform identity of its plan: else 404) and preprocessed or
/// being preprocessed (a job admitted meanwhile waits for it); one whose
/// preprocessing failed is a 409 `identity_not_ready`. Answered before the
/// cap and the credits (DESIGN.md's order); admission checks it again with
/// the identity row locked.
pub async fn ready_identity(s: &AppState, account: &str, code: &str) -> ApiResult<()> {
    let ident = s
        .store
        .identity_visible(account, code)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Identity {code} not found")))?;
    if !matches!(
        ident.job_status,
        Some(JobStatus::Completed | JobStatus::Pending | JobStatus::Processing)
    ) {
        return Err(refusal(Admission::IdentityNotReady {
            status: ident.preprocessing_status(),
        }));
    }
    Ok(())
}

/// The answer to an admission that did not create the job.
pub fn refusal(a: Admission) -> ApiError {
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
        Admission::FileUnavailable {
            file_id, pending, ..
        } => file_refusal(&file_id, pending, None),
        Admission::IdentityNotFound { code } => {
            ApiError::not_found(format!("Identity {code} not found"))
        }
        Admission::ProfileNotFound { id } => ApiError::not_found(format!("Profile {id} not found")),
        Admission::ProfileNotReady { id } => {
            ApiError::conflict("profile_not_ready", format!("Profile {id} is not READY"))
                .with("profile_id", id)
        }
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

/// A job to admit for `caller`.
pub struct Request<'a> {
    pub caller: &'a Account,
    pub project_id: Option<&'a str>,
    pub spec: JobSpec,
    /// The decision of the route's creation bucket, stamped on the answer.
    pub decision: Decision,
    pub headers: &'a HeaderMap,
    /// How the answer's `message` names the job (`Packshot job`).
    pub noun: &'static str,
}

/// Records the job in one transaction and answers `202` with
/// [`JobAccepted`], or the refusal.
pub async fn admit(s: &AppState, r: Request<'_>) -> ApiResult<Response> {
    let billing = match &r.caller.billing_account_id {
        Some(b) => b.clone(),
        None => s.store.billing_owner(&r.caller.id).await?.0,
    };
    let job_type = r.spec.job_type();
    let drafts = match &r.spec {
        JobSpec::IdentityCreation(d) => {
            Some((d.instructions.len() as i64, i64::from(d.total_variations())))
        }
        _ => None,
    };
    let trace = job_trace(r.headers);
    tracing::info!(trace_id = %trace.trace_id_hex(), account = %r.caller.id, %job_type, "admitting");
    let admission = s
        .store
        .create_job(NewJob {
            account_id: &r.caller.id,
            billing_account_id: &billing,
            project_id: r.project_id,
            spec: r.spec,
            prices: &s.config.prices,
            max_attempts: s.config.scheduler.retry.max_attempts,
            active_job_cap: (!r.caller.is_enterprise()).then_some(s.config.limits.active_jobs),
            traceparent: Some(trace.to_string()),
        })
        .await?;
    let Admission::Created {
        job_id,
        total_outputs,
        required,
    } = admission
    else {
        // The spec's files are the request's `images`, in order.
        return Err(refusal_naming_files(admission, |i| format!("images[{i}]")));
    };
    metrics::counter!("atelier_jobs_created_total", "type" => job_type.as_str()).increment(1);
    tracing::info!(job.id = %job_id, account.id = %r.caller.id, %job_type, outputs = total_outputs, credits = required.as_f64(), "job accepted");
    let mut resp = (
        StatusCode::ACCEPTED,
        axum::Json(JobAccepted {
            job_id,
            status: JobStatus::Pending,
            total_outputs,
            message: format!(
                "{} accepted: {total_outputs} outputs, {} credits reserved",
                r.noun,
                required.as_f64()
            ),
            num_instructions: drafts.map(|d| d.0),
            total_variations: drafts.map(|d| d.1),
        }),
    )
        .into_response();
    stamp(resp.headers_mut(), &r.decision);
    Ok(resp)
}
