//! Phota Studio (contract §9.4–9.5): `POST /v1/phota/edit` and
//! `/v1/phota/generate` (and the short `/edit`, `/generate`). Synchronous:
//! the call becomes a job like any other (credits reserved, fair dispatch,
//! retries, settlement per output), and the API waits for it up to
//! `limits.studio_wait_ms`, then answers `200` with the images (base64 or
//! signed URLs) and how often each named subject appears in them.
//!
//! An `/edit` with no prompt and with profiles is served by the built-in
//! engine (the `studio_restore` kind: the matched people get their
//! profile's face back); anything else needs a generator route for the
//! `studio` kind.

use crate::admission::{job_trace, refusal};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonValue;
use crate::state::AppState;
use crate::views::StudioAnswer;
use atelier_shared::db::jobs::{Admission, NewJob};
use atelier_shared::domain::identity::{IdentityKind, PhotoSource};
use atelier_shared::domain::packshot::EngineChoice;
use atelier_shared::domain::studio::{
    self, ResponseMode, RestoreSpec, StudioImageIn, StudioMode, StudioRequest,
};
use atelier_shared::domain::{JobSpec, JobStatus, JobType, OutputStatus};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use rand::Rng;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long signed result URLs of Studio answers stay valid (§9.4: 24 h).
const URL_TTL: Duration = Duration::from_secs(24 * 3600);

async fn call(
    s: &AppState,
    acc: &atelier_shared::db::accounts::Account,
    headers: &HeaderMap,
    mode: StudioMode,
    body: &serde_json::Value,
) -> ApiResult<axum::Json<StudioAnswer>> {
    let max = usize::try_from(s.config.limits.max_upload_bytes).unwrap_or(usize::MAX);
    let studio::StudioCall { mut spec, images } =
        studio::validate(mode, body, max, || rand::rng().random()).map_err(ApiError::invalid)?;
    // Every named subject: the caller's, and READY.
    for id in &spec.profiles {
        let row = s
            .store
            .identity_for(&acc.id, IdentityKind::Profile, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("Profile {id} not found")))?;
        if row.job_status != Some(JobStatus::Completed) {
            return Err(ApiError::conflict(
                "profile_not_ready",
                format!(
                    "Profile {id} is {}, not READY",
                    atelier_shared::domain::identity::profile_status(row.job_status)
                ),
            )
            .with("profile_id", id.clone()));
        }
    }
    let restore = spec.is_restore();
    if !restore
        && let Some(e) = s
            .engines
            .check(JobType::Studio, EngineChoice::Auto, "prompt")
    {
        return Err(ApiError::invalid(vec![e]));
    }
    // The photos: bytes are checked and stored now; URLs are checked
    // against the egress policy here and fetched by the worker. Whatever
    // was stored is erased again if the call goes no further.
    let mut stored = Vec::new();
    if let Err(e) = place_photos(s, &acc.id, &mut spec, images, &mut stored).await {
        s.erase(&stored).await;
        return Err(e);
    }
    let response_mode = spec.response_mode;
    let job_spec: JobSpec = if restore {
        RestoreSpec(spec).into()
    } else {
        spec.into()
    };
    let job_type = job_spec.job_type();
    let admitted = match s.store.billing_owner(&acc.id).await {
        Ok((billing, _)) => {
            s.store
                .create_job(NewJob {
                    account_id: &acc.id,
                    billing_account_id: &billing,
                    project_id: None,
                    spec: job_spec,
                    prices: &s.config.prices,
                    max_attempts: s.config.scheduler.retry.max_attempts,
                    active_job_cap: None,
                    traceparent: Some(job_trace(headers).to_string()),
                })
                .await
        }
        Err(e) => Err(e),
    };
    let job_id = match admitted {
        Ok(Admission::Created { job_id, .. }) => job_id,
        other => {
            s.erase(&stored).await;
            return Err(match other {
                Ok(a) => refusal(a),
                Err(e) => e.into(),
            });
        }
    };
    metrics::counter!("atelier_jobs_created_total", "type" => job_type.as_str()).increment(1);
    tracing::info!(job.id = %job_id, account.id = %acc.id, %job_type, "studio call accepted");

    // From here the call is a job: every answer names it.
    answer(s, &job_id, response_mode)
        .await
        .map(axum::Json)
        .map_err(|e| e.with("job_id", job_id.clone()))
}

/// Waits for the call's job (up to `limits.studio_wait_ms`) and builds the
/// answer from its outputs.
async fn answer(
    s: &AppState,
    job_id: &str,
    response_mode: ResponseMode,
) -> ApiResult<StudioAnswer> {
    // Wait for it, within the bound.
    let limit = Duration::from_millis(s.config.limits.studio_wait_ms);
    let job = crate::routes::identities::wait_for_end(s, job_id, limit).await?;
    if !job.status.is_terminal() {
        if s.shutdown.is_cancelled() {
            return Err(ApiError::unavailable(
                "the server is stopping; try again",
                5,
            ));
        }
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "studio_timeout",
            format!(
                "The images are not ready after {} s; the job goes on: GET /jobs/{job_id}/results",
                limit.as_secs()
            ),
        )
        .with("job_id", job_id.to_string()));
    }
    let outputs = s.store.latest_outputs(&job.id).await?;
    let done: Vec<_> = outputs
        .iter()
        .filter(|o| o.status == OutputStatus::Completed && o.full_key.is_some())
        .collect();
    if done.is_empty() {
        let why = outputs
            .iter()
            .find_map(|o| o.error_message.clone())
            .or(job.error_message.clone())
            .unwrap_or_else(|| "no image was produced".into());
        let refused = why.contains("refused the content");
        return Err(if refused {
            ApiError::bad_request(Some("prompt"), why, "body").with("job_id", job.id)
        } else {
            ApiError::new(StatusCode::BAD_GATEWAY, "generation_failed", why).with("job_id", job.id)
        });
    }
    let mut out = StudioAnswer {
        images: Vec::new(),
        download_urls: Vec::new(),
        known_subjects: Default::default(),
        job_id: job.id.clone(),
    };
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for o in done {
        let key = o.full_key.as_deref().unwrap_or_default();
        match response_mode {
            ResponseMode::Bytes => {
                let bytes = s.objects.get(key).await?;
                out.images
                    .push(base64::engine::general_purpose::STANDARD.encode(&bytes));
            }
            ResponseMode::Urls => {
                let ct = if o.output_format == "png" {
                    "image/png"
                } else {
                    "image/jpeg"
                };
                out.download_urls
                    .push(s.object_url(key, ct, URL_TTL).await?);
            }
        }
        let described: Option<serde_json::Value> = o
            .input_description
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok());
        if let Some(serde_json::Value::Object(m)) = described.as_ref().map(|d| &d["known_subjects"])
        {
            for (id, n) in m {
                *counts.entry(id.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
        }
    }
    out.known_subjects.counts = counts;
    Ok(out)
}

/// Stores the call's byte photos (checked: an image of an accepted type,
/// within the pixel limit) and checks its URLs, in order, into
/// `spec.images`; the keys stored so far in `stored`.
async fn place_photos(
    s: &AppState,
    account: &str,
    spec: &mut studio::StudioSpec,
    images: Vec<StudioImageIn>,
    stored: &mut Vec<String>,
) -> ApiResult<()> {
    for (i, img) in images.into_iter().enumerate() {
        let at = format!("images[{i}]");
        match img {
            StudioImageIn::Bytes(bytes) => {
                let (ct, ext, _, _) =
                    crate::routes::uploads::checked_image(s, &bytes, Some(&at), "body").await?;
                let key = format!(
                    "studio/{account}/{}.{ext}",
                    ulid::Ulid::new().to_string().to_lowercase()
                );
                s.objects.put(&key, bytes.into(), ct).await?;
                stored.push(key.clone());
                spec.images.push(PhotoSource::Object {
                    key,
                    filename: None,
                });
            }
            StudioImageIn::Url(raw) => {
                let url = s.egress.check_url(&raw).await.map_err(|e| {
                    ApiError::bad_request(Some(&at), format!("unusable URL: {e}"), "body")
                })?;
                spec.images.push(PhotoSource::Url {
                    url: url.to_string(),
                });
            }
        }
    }
    Ok(())
}

macro_rules! studio_routes {
    ($module:ident, $edit:literal, $generate:literal) => {
        pub mod $module {
            use super::*;

            /// Edit 1–10 photos, preserving the named subjects (`profile_ids`
            /// and `[[profile_id]]` in the prompt); answers with the images.
            /// With no prompt and with profiles, the built-in engine
            /// restores the matched people's faces.
            #[utoipa::path(
                post, path = $edit, tag = "studio",
                request_body = StudioRequest,
                responses(
                    (status = 200, description = "The images and the subjects counted in them", body = StudioAnswer),
                    (status = 400, description = "Invalid input, a content refusal, or no generator engine for this call", body = crate::error::ErrorBody),
                    (status = 402, description = "Not enough credits", body = crate::error::ErrorBody),
                    (status = 404, description = "Unknown profile", body = crate::error::ErrorBody),
                    (status = 409, description = "A profile is not READY (`profile_not_ready`)", body = crate::error::ErrorBody),
                    (status = 502, description = "The engine could not draw any image", body = crate::error::ErrorBody),
                    (status = 504, description = "Not ready within `limits.studio_wait_ms` (`job_id` to poll)", body = crate::error::ErrorBody),
                ),
            )]
            pub async fn edit(
                State(s): State<AppState>,
                Caller(acc): Caller,
                headers: HeaderMap,
                body: JsonValue,
            ) -> ApiResult<axum::Json<StudioAnswer>> {
                call(&s, &acc, &headers, StudioMode::Edit, &body.0).await
            }

            /// Text to image with subjects named by `[[profile_id]]`;
            /// answers with the images.
            #[utoipa::path(
                post, path = $generate, tag = "studio",
                request_body = StudioRequest,
                responses(
                    (status = 200, description = "The images and the subjects counted in them", body = StudioAnswer),
                    (status = 400, description = "Invalid input (`images` and `profile_ids` are refused here), a content refusal, or no generator engine", body = crate::error::ErrorBody),
                    (status = 402, description = "Not enough credits", body = crate::error::ErrorBody),
                    (status = 404, description = "Unknown profile", body = crate::error::ErrorBody),
                    (status = 409, description = "A profile is not READY (`profile_not_ready`)", body = crate::error::ErrorBody),
                    (status = 502, description = "The engine could not draw any image", body = crate::error::ErrorBody),
                    (status = 504, description = "Not ready within `limits.studio_wait_ms` (`job_id` to poll)", body = crate::error::ErrorBody),
                ),
            )]
            pub async fn generate(
                State(s): State<AppState>,
                Caller(acc): Caller,
                headers: HeaderMap,
                body: JsonValue,
            ) -> ApiResult<axum::Json<StudioAnswer>> {
                call(&s, &acc, &headers, StudioMode::Generate, &body.0).await
            }
        }
    };
}

studio_routes!(phota, "/v1/phota/edit", "/v1/phota/generate");
studio_routes!(short, "/edit", "/generate");
