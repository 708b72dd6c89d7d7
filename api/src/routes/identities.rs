//! Identities (contract §5): upload (one photo, one face), list, read,
//! status, delete. The face work is an `identity_preprocessing` job on the
//! `identity` queue; the API never runs a model. Upload waits a bounded
//! time for that job so that a photo without a face is answered with the
//! contract's `400` (and nothing is kept), and otherwise answers `201`
//! while the job goes on.

use super::paging;
use crate::admission::{job_trace, refusal};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::Query;
use crate::state::AppState;
use crate::views::{
    FaceMetadata, IdentityList, IdentityStatus, IdentityUploaded, IdentityView, Pagination,
    PovReplaced, ProcessedImage,
};
use atelier_shared::db::accounts::Account;
use atelier_shared::db::identities::{
    DeleteIdentity, IdentityAdmission, IdentityQuery, IdentityRow, NewIdentity, Ownership,
};
use atelier_shared::db::jobs::NewJob;
use atelier_shared::db::rows::JobRow;
use atelier_shared::domain::JobStatus;
use atelier_shared::domain::identity::{
    self, IDENTITY_POVS, IdentityKind, PhotoSource, PreprocessSpec, is_face_problem,
    is_input_problem,
};
use atelier_shared::domain::kinds::JobSpec;
use atelier_shared::domain::packshot::ImageFormat;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// An image part of a multipart form, checked.
pub struct FormImage {
    pub bytes: Bytes,
    pub filename: Option<String>,
    pub content_type: &'static str,
    pub ext: &'static str,
    pub width: u32,
    pub height: u32,
}

/// The parts of an identity form: image parts plus text fields.
pub struct Form {
    pub images: Vec<FormImage>,
    pub text: std::collections::HashMap<String, String>,
}

/// Reads a multipart form with up to `max_images` image parts named
/// `image_field` (or `image_field[]`) and short text fields. Every problem
/// is a 400/413/415 naming the part.
pub async fn read_form(
    s: &AppState,
    multipart: Result<Multipart, MultipartRejection>,
    image_field: &str,
    max_images: usize,
) -> ApiResult<Form> {
    let mut mp = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected a multipart/form-data body: {e}"),
        )
    })?;
    let max = s.config.limits.max_upload_bytes;
    let mut form = Form {
        images: Vec::new(),
        text: Default::default(),
    };
    let unreadable = |e: axum::extract::multipart::MultipartError| -> ApiError {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("The image is larger than {max} bytes"),
            )
        } else {
            ApiError::bad_request(None, format!("malformed multipart body: {e}"), "body")
        }
    };
    while let Some(mut field) = mp.next_field().await.map_err(unreadable)? {
        let name = field.name().unwrap_or_default().to_string();
        if name == image_field || name.strip_suffix("[]") == Some(image_field) {
            if form.images.len() >= max_images {
                return Err(ApiError::bad_request(
                    Some(image_field),
                    format!("at most {max_images} image parts"),
                    "form",
                ));
            }
            let filename = field.file_name().map(str::to_string);
            let mut buf = Vec::new();
            while let Some(chunk) = field.chunk().await.map_err(unreadable)? {
                if (buf.len() + chunk.len()) as u64 > max {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        format!("The image is larger than {max} bytes"),
                    ));
                }
                buf.extend_from_slice(&chunk);
            }
            let bytes = Bytes::from(buf);
            // Header, pixel budget, truncation and a full decode: what a
            // worker would refuse is refused before a photo is stored.
            let (content_type, ext, width, height) =
                crate::routes::uploads::checked_image(s, &bytes, Some(image_field), "form")
                    .await
                    .map_err(|e| e.with("face_detected", false))?;
            form.images.push(FormImage {
                bytes,
                filename,
                content_type,
                ext,
                width,
                height,
            });
        } else {
            let text = field.text().await.map_err(unreadable)?;
            if text.len() > 4096 {
                return Err(ApiError::bad_request(
                    Some(&name),
                    "must be at most 4096 bytes",
                    "form",
                ));
            }
            form.text.insert(name, text);
        }
    }
    Ok(form)
}

/// A form with exactly one `image` part; the image and the text fields.
async fn one_photo(
    s: &AppState,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult<(FormImage, Form)> {
    let mut form = read_form(s, multipart, "image", 1).await?;
    let image = form.images.pop().ok_or_else(|| {
        ApiError::bad_request(
            Some("image"),
            "missing: send the photo as the image part",
            "form",
        )
    })?;
    Ok((image, form))
}

/// Stores the photo of a new identity `code` under
/// `identities/<account>/<code>/` and returns its key and the one-photo
/// preprocessing spec.
async fn store_photo(
    s: &AppState,
    account: &str,
    code: &str,
    image: &FormImage,
) -> ApiResult<(String, PreprocessSpec)> {
    let key = put_identity_photo(
        s,
        account,
        code,
        "photo",
        image.bytes.clone(),
        image.content_type,
        image.ext,
    )
    .await?;
    let spec = one_photo_spec(code, key.clone(), image.filename.clone());
    Ok((key, spec))
}

/// Puts `bytes` under `identities/<account>/<code>/<what>-<ulid>.<ext>`.
pub(crate) async fn put_identity_photo(
    s: &AppState,
    account: &str,
    code: &str,
    what: &str,
    bytes: Bytes,
    content_type: &'static str,
    ext: &str,
) -> ApiResult<String> {
    let key = format!(
        "identities/{account}/{code}/{what}-{}.{ext}",
        ulid::Ulid::new().to_string().to_lowercase(),
    );
    s.objects.put(&key, bytes, content_type).await?;
    Ok(key)
}

/// The preprocessing that builds a new identity `code` from its one stored
/// photo (points of view are added later, by `POST /identity/{code}/pov`).
pub(crate) fn one_photo_spec(code: &str, key: String, filename: Option<String>) -> PreprocessSpec {
    PreprocessSpec {
        identity_code: code.to_string(),
        kind: IdentityKind::Identity,
        photos: vec![PhotoSource::Object { key, filename }],
        min_usable: 1,
        replaces: false,
    }
}

/// The `identity_preprocessing` job that builds `code` from `spec`.
pub(crate) fn preprocessing_job<'a>(
    s: &'a AppState,
    account: &'a str,
    billing: &'a str,
    spec: PreprocessSpec,
    traceparent: String,
) -> NewJob<'a> {
    NewJob {
        account_id: account,
        billing_account_id: billing,
        project_id: None,
        spec: spec.into(),
        prices: &s.config.prices,
        max_attempts: s.config.scheduler.retry.max_attempts,
        active_job_cap: None,
        traceparent: Some(traceparent),
    }
}

/// A new identity's row, before its name is made unique.
pub(crate) struct Named<'a> {
    pub code: &'a str,
    /// The name asked for, or the default one.
    pub base_name: &'a str,
    /// Whether the client chose the name: a clash is then its conflict
    /// (409); a default name is made unique with " (2)", " (3)", ….
    pub explicit: bool,
    pub tag: Option<&'a str>,
    pub original_filename: Option<&'a str>,
    /// The canonical photo, already stored; erased if nothing is recorded.
    pub photo_key: &'a str,
    /// The draft it is promoted from (contract §5.7).
    pub promoted_from: Option<i64>,
}

/// Records identity `n` with its preprocessing job (slot, name and credits
/// decided in one transaction); the preprocessing job's id. A refusal is
/// the contract's answer, and the stored photo is erased with it.
pub(crate) async fn admit_named(
    s: &AppState,
    acc: &Account,
    n: Named<'_>,
    spec: PreprocessSpec,
    trace: String,
) -> ApiResult<String> {
    let (billing, _) = s.store.billing_owner(&acc.id).await?;
    let mut attempt = 1;
    loop {
        let name = if attempt == 1 {
            n.base_name.to_string()
        } else {
            let suffix = format!(" ({attempt})");
            let keep = identity::MAX_NAME - suffix.chars().count();
            format!(
                "{}{suffix}",
                n.base_name.chars().take(keep).collect::<String>()
            )
        };
        let job = preprocessing_job(s, &acc.id, &billing, spec.clone(), trace.clone());
        let ident = NewIdentity {
            code: n.code,
            account_id: &acc.id,
            kind: IdentityKind::Identity,
            name: &name,
            tag: n.tag,
            original_filename: n.original_filename,
            photo_key: Some(n.photo_key),
            sources_json: "[]".into(),
            training_tier: None,
            slot_cap: (!acc.is_enterprise()).then_some(s.config.identity.slots),
            promoted_from: n.promoted_from,
        };
        let admitted = match s.store.create_identity(ident, job).await {
            Ok(a) => a,
            Err(e) => {
                s.erase(&[n.photo_key.to_string()]).await;
                return Err(e.into());
            }
        };
        let refused = match admitted {
            IdentityAdmission::Created { job_id, .. } => {
                metrics::counter!("atelier_jobs_created_total", "type" => atelier_shared::domain::JobType::IdentityPreprocessing.as_str())
                    .increment(1);
                tracing::info!(identity = %n.code, job.id = %job_id, account.id = %acc.id, "identity accepted");
                return Ok(job_id);
            }
            IdentityAdmission::NameTaken { .. } if !n.explicit && attempt < 50 => {
                attempt += 1;
                continue;
            }
            other => other,
        };
        s.erase(&[n.photo_key.to_string()]).await;
        return Err(match refused {
            // An upload names the clash both ways (the scripts read either);
            // a promotion only as `existing_identity_code`, so that a client
            // cannot mistake it for "already promoted" (§5.7, §11 #44).
            IdentityAdmission::NameTaken { existing_code } => {
                let e = ApiError::conflict(
                    "identity_exists",
                    format!("An identity named {name:?} already exists"),
                )
                .with("existing_identity_code", existing_code.clone());
                if n.promoted_from.is_some() {
                    e
                } else {
                    e.with("identity_code", existing_code)
                }
            }
            IdentityAdmission::AlreadyPromoted { code } => ApiError::conflict(
                "already_promoted",
                format!("This draft was already promoted: identity {code}"),
            )
            .with("identity_code", code),
            IdentityAdmission::SlotsExhausted { used, cap } => ApiError::too_many(
                "identity_slots_exhausted",
                format!(
                    "Maximum identities reached: {used} exist, at most {cap} per account (delete one to free a slot)"
                ),
                60,
            ),
            IdentityAdmission::Refused(a) => refusal(a),
            IdentityAdmission::Created { .. } => unreachable!("returned above"),
        });
    }
}

/// The 400 for a photo that cannot become (or replace) a face. Says
/// `face_detected: false` when the problem is the face; other problems
/// (unreadable, too large) leave it out: no face was looked for.
fn photo_problem(message: &str) -> ApiError {
    let e = ApiError::bad_request(Some("image"), message.to_string(), "form");
    if is_face_problem(message) {
        e.with("face_detected", false)
    } else {
        e
    }
}

/// The statuses `preprocessing_status` may filter on.
const PREPROCESSING_STATUSES: [JobStatus; 4] = [
    JobStatus::Pending,
    JobStatus::Processing,
    JobStatus::Completed,
    JobStatus::Failed,
];

/// A new identity code: `idn_` + 16 base32 characters.
pub fn new_code() -> String {
    format!("idn_{}", atelier_shared::domain::ids::base32_lower(16))
}

/// Waits, up to `identity.upload_wait_ms`, for a preprocessing job to end
/// (the face check is done then); its status when it ended or the wait did.
async fn wait_for_job(s: &AppState, job_id: &str) -> ApiResult<JobStatus> {
    let limit = Duration::from_millis(s.config.identity.upload_wait_ms);
    Ok(wait_for_end(s, job_id, limit).await?.status)
}

/// Waits up to `limit` for job `job_id` to end (or the server to stop);
/// the job as it is then.
pub(crate) async fn wait_for_end(s: &AppState, job_id: &str, limit: Duration) -> ApiResult<JobRow> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(25);
    loop {
        let job = s
            .store
            .job(job_id)
            .await?
            .ok_or_else(|| ApiError::internal(format!("job {job_id} vanished")))?;
        if job.status.is_terminal() || start.elapsed() >= limit {
            return Ok(job);
        }
        tokio::select! {
            _ = tokio::time::sleep(pause.min(limit.saturating_sub(start.elapsed()))) => {}
            _ = s.shutdown.cancelled() => return Ok(job),
        }
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// The form of `POST /identity/upload`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct IdentityUploadForm {
    /// The photo: JPEG, PNG or WebP showing one face clearly.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    /// Unique per account; default: the file name's stem (made unique).
    name: Option<String>,
    tag: Option<String>,
}

/// Create an identity from one photo. Answers once the face check ran (up
/// to `identity.upload_wait_ms`): a photo without one clear face is a 400
/// and nothing is kept.
#[utoipa::path(
    post, path = "/identity/upload", tag = "identities",
    request_body(content = IdentityUploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "The identity; `face_detected` is null while the check still runs", body = IdentityUploaded),
        (status = 400, description = "No face, several faces, a face too small, or an unreadable image (`face_detected: false` when the problem is the face)", body = crate::error::ErrorBody),
        (status = 409, description = "An identity of that name exists (`existing_identity_code`)", body = crate::error::ErrorBody),
        (status = 429, description = "Identity slots exhausted or rate limited", body = crate::error::ErrorBody),
    ),
)]
pub async fn upload(
    State(s): State<AppState>,
    Caller(acc): Caller,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult<axum::response::Response> {
    let (image, form) = one_photo(&s, multipart).await?;
    let explicit = match form.text.get("name") {
        Some(n) => Some(identity::validate_name(n).map_err(|e| ApiError::invalid(vec![e]))?),
        None => None,
    };
    let tag = match form.text.get("tag").map(|t| t.trim()) {
        Some("") | None => None,
        Some(t) => Some(identity::validate_tag(t).map_err(|e| ApiError::invalid(vec![e]))?),
    };
    let base_name = explicit.clone().unwrap_or_else(|| {
        identity::name_from_filename(image.filename.as_deref().unwrap_or("identity"))
    });

    let code = new_code();
    let (photo_key, spec) = store_photo(&s, &acc.id, &code, &image).await?;
    let admitted = admit_named(
        &s,
        &acc,
        Named {
            code: &code,
            base_name: &base_name,
            explicit: explicit.is_some(),
            tag: tag.as_deref(),
            original_filename: image.filename.as_deref(),
            photo_key: &photo_key,
            promoted_from: None,
        },
        spec,
        job_trace(&headers).to_string(),
    )
    .await?;

    wait_for_job(&s, &admitted).await?;
    let row = load(&s, &acc.id, &code).await?;
    let face_detected = match row.job_status {
        Some(JobStatus::Completed) => Some(true),
        Some(JobStatus::Failed | JobStatus::Aborted) => {
            // Nothing is kept of a photo that cannot become an identity:
            // the name and slot are free again (its credits were released
            // when the job failed).
            let message = row
                .error_message()
                .unwrap_or_else(|| "preprocessing failed".into());
            if let Ok(DeleteIdentity::Deleted { keys }) = s
                .store
                .delete_identity(&acc.id, IdentityKind::Identity, &code)
                .await
            {
                s.erase(&keys).await;
            }
            return Err(if is_input_problem(&message) {
                photo_problem(&message).with("preprocessing_job_id", admitted)
            } else {
                ApiError::unavailable(
                    format!("identity preprocessing failed: {message}; try again"),
                    5,
                )
            });
        }
        // Still running: the status endpoint tells the outcome.
        _ => None,
    };
    let face_metadata = match (face_detected, row.record()) {
        (Some(true), Some(r)) => FaceMetadata::of(&r),
        _ => FaceMetadata::unknown(),
    };
    let body = IdentityUploaded {
        identity: IdentityView::build(&s, &row).await?,
        success: true,
        face_detected,
        face_metadata,
    };
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    pub page: Option<i64>,
    pub per_page: Option<i64>,
    pub order: Option<String>,
    pub search: Option<String>,
    pub sort_by: Option<String>,
    pub ownership: Option<String>,
    pub include_locked: Option<bool>,
    pub preprocessing_status: Option<String>,
    pub tag: Option<String>,
    pub gender: Option<String>,
    pub age_min: Option<i64>,
    pub age_max: Option<i64>,
}

/// The caller's identities.
#[utoipa::path(
    get, path = "/identity", tag = "identities",
    params(ListQuery),
    responses((status = 200, description = "A page of identities", body = IdentityList)),
)]
pub async fn list(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<IdentityList>> {
    let (page, per_page, ascending) = paging(q.page, q.per_page, q.order.as_deref(), 20)?;
    let by_name = match q.sort_by.as_deref() {
        None | Some("created_at") => false,
        Some("name") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                Some("sort_by"),
                "must be name or created_at",
                "query",
            ));
        }
    };
    if let Some(st) = &q.preprocessing_status
        && !PREPROCESSING_STATUSES
            .iter()
            .any(|s| s.as_str() == st.as_str())
    {
        return Err(ApiError::bad_request(
            Some("preprocessing_status"),
            "must be pending, processing, completed or failed",
            "query",
        ));
    }
    for (field, v) in [("search", &q.search), ("tag", &q.tag)] {
        if let Some(v) = v {
            identity::validate_text(field, v).map_err(|e| ApiError::invalid(vec![e]))?;
        }
    }
    let ownership = match q.ownership.as_deref() {
        None | Some("") => Ownership::Any,
        Some("mine") => Ownership::Mine,
        Some("shared") => Ownership::Shared,
        Some("default") => Ownership::Default,
        Some(_) => {
            return Err(ApiError::bad_request(
                Some("ownership"),
                "must be mine, shared or default",
                "query",
            ));
        }
    };
    if let Some(g) = &q.gender {
        identity::validate_text("gender", g).map_err(|e| ApiError::invalid(vec![e]))?;
    }
    for (field, v) in [("age_min", q.age_min), ("age_max", q.age_max)] {
        if v.is_some_and(|a| !(0..=150).contains(&a)) {
            return Err(ApiError::bad_request(
                Some(field),
                "must be 0 to 150",
                "query",
            ));
        }
    }
    // Gender and age are what the operator recorded for a platform
    // identity (`atelier admin identities platform`); nothing guesses them
    // from a photo, so these filters match platform identities only.
    let include_locked = q.include_locked.unwrap_or(false);
    let (rows, total) = s
        .store
        .list_identities(
            &acc.id,
            IdentityKind::Identity,
            &IdentityQuery {
                page,
                per_page,
                ascending,
                by_name,
                search: q.search.clone().filter(|x| !x.is_empty()),
                status: q.preprocessing_status.clone(),
                tag: q.tag.clone().filter(|x| !x.is_empty()),
                tag_exact: None,
                ownership,
                include_locked,
                gender: q.gender.clone().filter(|x| !x.is_empty()),
                age_min: q.age_min,
                age_max: q.age_max,
            },
        )
        .await?;
    let mut identities = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut view = IdentityView::build(&s, r).await?;
        if include_locked {
            view.locked =
                Some(r.default_tier.as_deref() == Some("enterprise") && !acc.is_enterprise());
        }
        identities.push(view);
    }
    Ok(axum::Json(IdentityList {
        identities,
        pagination: Pagination::new(page, per_page, total),
    }))
}

/// An identity of the caller's own (uploads, face replacements).
async fn load(s: &AppState, account: &str, code: &str) -> ApiResult<IdentityRow> {
    s.store
        .identity_for(account, IdentityKind::Identity, code)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Identity {code} not found")))
}

/// An identity the caller may read: its own, shared with one of its
/// groups, or a platform identity of its plan.
async fn load_visible(s: &AppState, account: &str, code: &str) -> ApiResult<IdentityRow> {
    s.store
        .identity_visible(account, code)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Identity {code} not found")))
}

/// One identity.
#[utoipa::path(
    get, path = "/identity/{identity_code}", tag = "identities",
    params(("identity_code" = String, Path, description = "The identity's code")),
    responses((status = 200, description = "The identity", body = IdentityView)),
)]
pub async fn read(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(code): Path<String>,
) -> ApiResult<axum::Json<IdentityView>> {
    let row = load_visible(&s, &acc.id, &code).await?;
    Ok(axum::Json(IdentityView::build(&s, &row).await?))
}

/// An identity's preprocessing status (contract §5.5).
#[utoipa::path(
    get, path = "/identity/{identity_code}/status", tag = "identities",
    params(("identity_code" = String, Path, description = "The identity's code")),
    responses((status = 200, description = "Its preprocessing", body = IdentityStatus)),
)]
pub async fn status(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(code): Path<String>,
) -> ApiResult<axum::Json<IdentityStatus>> {
    let row = load_visible(&s, &acc.id, &code).await?;
    Ok(axum::Json(IdentityStatus::from(&row)))
}

/// Deletes an identity and every photo, crop and embedding it had.
#[utoipa::path(
    delete, path = "/identity/{identity_code}", tag = "identities",
    params(("identity_code" = String, Path, description = "The identity's code")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "A platform identity, or one shared with the caller by its owner", body = crate::error::ErrorBody),
        (status = 409, description = "A pending or processing job uses it (`identity_in_use`)", body = crate::error::ErrorBody),
    ),
)]
pub async fn delete(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(code): Path<String>,
) -> ApiResult<StatusCode> {
    if let Some(i) = s.store.identity_visible(&acc.id, &code).await? {
        if i.default_tier.is_some() {
            return Err(ApiError::forbidden(
                "A platform identity cannot be deleted through the API",
            ));
        }
        if i.account_id != acc.id {
            return Err(ApiError::forbidden("Only its owner can delete an identity"));
        }
    }
    match s
        .store
        .delete_identity(&acc.id, IdentityKind::Identity, &code)
        .await?
    {
        DeleteIdentity::NotFound => Err(ApiError::not_found(format!("Identity {code} not found"))),
        DeleteIdentity::InUse { job_id } => Err(ApiError::conflict(
            "identity_in_use",
            format!("Job {job_id} is pending or processing with this identity"),
        )
        .with("job_id", job_id)),
        DeleteIdentity::Deleted { keys } => {
            s.erase(&keys).await;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

/// `POST /identity/{code}/pov` (contract §5.8): replaces one of the
/// identity's points of view (`pov_index` below the number it has) or adds
/// one (`pov_index` equal to it), up to [`IDENTITY_POVS`]. Each point of
/// view is a photo of the same person, normalised to 1024×1024; the face
/// that model swap uses is rebuilt from all of them by a free
/// preprocessing job, which fails when the new photo shows someone else.
/// Until that job completes, and if it fails, the identity keeps what it
/// had. The owner and members of the groups it is shared with may do this.
/// The form of `POST /identity/{identity_code}/pov`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct PovForm {
    /// A photo of the same person, one face.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    /// The point of view to replace (below the identity's count) or to add
    /// (equal to it); at most 3.
    pov_index: i64,
}

#[utoipa::path(
    post, path = "/identity/{identity_code}/pov", tag = "identities",
    params(("identity_code" = String, Path, description = "The identity's code")),
    request_body(content = PovForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "Replaced (or still being checked: `preprocessing_status: processing`); `processed_images` lists every point of view", body = PovReplaced),
        (status = 400, description = "The new photo cannot join the identity, or the index is out of range", body = crate::error::ErrorBody),
        (status = 403, description = "A platform identity", body = crate::error::ErrorBody),
        (status = 409, description = "The identity is not completed", body = crate::error::ErrorBody),
    ),
)]
pub async fn replace_pov(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(code): Path<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult<axum::Json<PovReplaced>> {
    let row = load_visible(&s, &acc.id, &code).await?;
    if row.account_id != acc.id && row.default_tier.is_some() {
        return Err(ApiError::forbidden(format!(
            "Identity {code} is a platform identity; its points of view cannot be changed"
        )));
    }
    if row.job_status != Some(JobStatus::Completed) {
        return Err(ApiError::conflict(
            "identity_not_ready",
            format!(
                "The identity's preprocessing is {}; replace a point of view once it is completed",
                row.preprocessing_status()
            ),
        ));
    }
    let mut photos = current_povs(&s, &row).await?;
    let (image, form) = one_photo(&s, multipart).await?;
    let index: i64 = form
        .text
        .get("pov_index")
        .ok_or_else(|| ApiError::bad_request(Some("pov_index"), "missing", "form"))?
        .trim()
        .parse()
        .map_err(|_| ApiError::bad_request(Some("pov_index"), "must be an integer", "form"))?;
    let last = photos.len().min(IDENTITY_POVS - 1);
    let slot = usize::try_from(index).ok().filter(|i| *i <= last).ok_or_else(|| {
        ApiError::bad_request(
            Some("pov_index"),
            format!(
                "{index} is out of range: this identity has {} point(s) of view; replace one with 0..={}{}",
                photos.len(),
                photos.len() - 1,
                if photos.len() < IDENTITY_POVS {
                    format!(" or add one with {}", photos.len())
                } else {
                    format!(" (an identity keeps at most {IDENTITY_POVS})")
                }
            ),
            "form",
        )
    })?;
    let key = put_identity_photo(
        &s,
        &acc.id,
        &code,
        "pov",
        image.bytes.clone(),
        image.content_type,
        image.ext,
    )
    .await?;
    let new = PhotoSource::Object {
        key: key.clone(),
        filename: image.filename.clone(),
    };
    if slot == photos.len() {
        photos.push(new);
    } else {
        photos[slot] = new;
    }
    let spec = PreprocessSpec {
        identity_code: code.clone(),
        kind: IdentityKind::Identity,
        min_usable: photos.len() as u32,
        photos,
        replaces: true,
    };
    let (billing, _) = s.store.billing_owner(&acc.id).await?;
    let job = preprocessing_job(&s, &acc.id, &billing, spec, job_trace(&headers).to_string());
    let job_id = match s.store.start_face_replacement(&acc.id, &code, job).await {
        Ok(Some(atelier_shared::db::jobs::Admission::Created { job_id, .. })) => job_id,
        Ok(other) => {
            s.erase(std::slice::from_ref(&key)).await;
            return Err(match other {
                None => ApiError::not_found(format!("Identity {code} not found")),
                Some(a) => refusal(a),
            });
        }
        Err(e) => {
            s.erase(std::slice::from_ref(&key)).await;
            return Err(e.into());
        }
    };
    // Wait for the face check, as an upload does.
    let status = wait_for_job(&s, &job_id).await?;
    match status {
        JobStatus::Completed => {
            let row = load_visible(&s, &acc.id, &code).await?;
            let processed_images = pov_images(&s, &row).await?;
            Ok(axum::Json(PovReplaced {
                success: true,
                pov_index: index,
                processed_count: processed_images.len(),
                processed_images,
                preprocessing_status: None,
                preprocessing_job_id: job_id,
            }))
        }
        st if st.is_terminal() => {
            let message = s
                .store
                .latest_outputs(&job_id)
                .await?
                .into_iter()
                .find_map(|o| o.error_message)
                .unwrap_or_else(|| "preprocessing failed".into());
            // The refused photo is not kept (the identity keeps its face).
            s.erase(std::slice::from_ref(&key)).await;
            Err(if is_input_problem(&message) {
                photo_problem(&message)
            } else {
                ApiError::unavailable(format!("face replacement failed: {message}; try again"), 5)
            })
        }
        _ => Ok(axum::Json(PovReplaced {
            success: true,
            pov_index: index,
            processed_images: Vec::new(),
            processed_count: 0,
            preprocessing_status: Some(JobStatus::Processing),
            preprocessing_job_id: job_id,
        })),
    }
}

/// The photos of the identity's points of view: those its effective
/// preprocessing job was given.
async fn current_povs(s: &AppState, row: &IdentityRow) -> ApiResult<Vec<PhotoSource>> {
    let job = match &row.job_id {
        Some(id) => s.store.job(id).await?,
        None => None,
    };
    match job.map(|j| j.spec) {
        Some(JobSpec::IdentityPreprocessing(spec)) if !spec.photos.is_empty() => Ok(spec.photos),
        _ => Err(ApiError::internal(format!(
            "identity {} has no preprocessing photos",
            row.code
        ))),
    }
}

/// Every point of view of a completed identity, signed. An identity built
/// before points of view were kept shows its face crop as its one view.
async fn pov_images(s: &AppState, row: &IdentityRow) -> ApiResult<Vec<ProcessedImage>> {
    let record = row
        .record()
        .ok_or_else(|| ApiError::internal("a completed identity has no face record"))?;
    let photos = current_povs(s, row).await?;
    let filename = |i: u32| match photos.get(i as usize) {
        Some(PhotoSource::Object { filename, .. }) => filename.clone(),
        _ => None,
    };
    let ttl = s.result_ttl();
    let jpeg = ImageFormat::Jpg.content_type();
    let mut out = Vec::with_capacity(record.povs.len().max(1));
    if record.povs.is_empty() {
        let (Some(full), Some(thumb)) = (&row.crop_key, &row.crop_thumb_key) else {
            return Err(ApiError::internal("a completed face has no crop"));
        };
        out.push(ProcessedImage {
            original_filename: filename(record.photo_index),
            link: s.object_url(full, jpeg, ttl).await?,
            thumbnail_link: s.object_url(thumb, jpeg, ttl).await?,
        });
    }
    for p in &record.povs {
        out.push(ProcessedImage {
            original_filename: filename(p.index),
            link: s.object_url(&p.key, jpeg, ttl).await?,
            thumbnail_link: s.object_url(&p.thumb_key, jpeg, ttl).await?,
        });
    }
    Ok(out)
}

/// `POST`/`DELETE /identity/{code}/share/{group_name}`: what sharing did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IdentityShared {
    pub identity_code: String,
    pub visibility: &'static str,
    pub groups: Vec<String>,
}

async fn share_with(
    s: &AppState,
    acc: &Account,
    code: &str,
    group: &str,
    share: bool,
) -> ApiResult<IdentityShared> {
    let row = load(s, &acc.id, code).await?;
    if row.default_tier.is_some() {
        return Err(ApiError::forbidden(
            "A platform identity is offered to every account already",
        ));
    }
    let gid = super::presets::member_group(s, &acc.id, group).await?;
    s.store.set_identity_share(&row.code, &gid, share).await?;
    let groups = s.store.identity_groups(&row.code).await?;
    Ok(IdentityShared {
        identity_code: row.code,
        visibility: if groups.is_empty() {
            "private"
        } else {
            "shared"
        },
        groups,
    })
}

/// Share an identity with a group the caller belongs to: its members may
/// read it and use it in their jobs (contract §5.1 `shared`; the path
/// mirrors the preset's, §6.10).
#[utoipa::path(
    post, path = "/identity/{identity_code}/share/{group_name}", tag = "identities",
    params(
        ("identity_code" = String, Path, description = "The identity's code"),
        ("group_name" = String, Path, description = "A group the caller belongs to"),
    ),
    responses(
        (status = 200, description = "Shared", body = IdentityShared),
        (status = 403, description = "Not a member of the group, or a platform identity", body = crate::error::ErrorBody),
        (status = 404, description = "Not the caller's identity", body = crate::error::ErrorBody),
    ),
)]
pub async fn share(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((code, group)): Path<(String, String)>,
) -> ApiResult<axum::Json<IdentityShared>> {
    Ok(axum::Json(share_with(&s, &acc, &code, &group, true).await?))
}

/// Stop sharing an identity with a group; unshared from its last group it
/// is private again. Jobs its members already admitted keep the face.
#[utoipa::path(
    delete, path = "/identity/{identity_code}/share/{group_name}", tag = "identities",
    params(
        ("identity_code" = String, Path, description = "The identity's code"),
        ("group_name" = String, Path, description = "A group the caller belongs to"),
    ),
    responses(
        (status = 200, description = "Unshared", body = IdentityShared),
        (status = 403, description = "Not a member of the group, or a platform identity", body = crate::error::ErrorBody),
        (status = 404, description = "Not the caller's identity", body = crate::error::ErrorBody),
    ),
)]
pub async fn unshare(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((code, group)): Path<(String, String)>,
) -> ApiResult<axum::Json<IdentityShared>> {
    Ok(axum::Json(
        share_with(&s, &acc, &code, &group, false).await?,
    ))
}
