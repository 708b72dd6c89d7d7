//! Identities (contract §5): upload (one photo, one face), list, read,
//! status, delete. The face work is an `identity_preprocessing` job on the
//! `identity` queue; the API never runs a model. Upload waits a bounded
//! time for that job so that a photo without a face is answered with the
//! contract's `400` (and nothing is kept), and otherwise answers `201`
//! while the job goes on.

use super::PageQuery;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::Query;
use crate::routes::jobs::{job_trace, refusal};
use atelier_shared::db::identities::{
    DeleteIdentity, IdentityAdmission, IdentityQuery, IdentityRow, NewIdentity,
};
use atelier_shared::db::jobs::{IdentityUse, NewJob, NewOutput};
use atelier_shared::domain::JobType;
use atelier_shared::domain::credits::PriceTable;
use atelier_shared::domain::identity::{
    self, IdentityKind, PhotoSource, PreprocessSpec, is_face_problem, is_input_problem,
};
use atelier_shared::time::iso8601;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
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
            let (content_type, ext, width, height) = crate::routes::uploads::sniff_any(&bytes)
                .map_err(|m| {
                    ApiError::bad_request(
                        Some(image_field),
                        format!("unreadable image: {m}"),
                        "form",
                    )
                    .with("face_detected", false)
                })?;
            let pixels = u64::from(width) * u64::from(height);
            if pixels > s.config.worker.max_input_pixels {
                return Err(ApiError::bad_request(
                    Some(image_field),
                    format!(
                        "image too large: {width}x{height} is above the limit of {} pixels",
                        s.config.worker.max_input_pixels
                    ),
                    "form",
                ));
            }
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

/// Stores one photo of identity `code` under `identities/<account>/<code>/`
/// and returns its key and the one-photo preprocessing spec.
async fn store_photo(
    s: &AppState,
    account: &str,
    code: &str,
    what: &str,
    image: &FormImage,
) -> ApiResult<(String, PreprocessSpec)> {
    let replaces = what == "pov";
    let key = format!(
        "identities/{account}/{code}/{what}-{}.{}",
        ulid::Ulid::new().to_string().to_lowercase(),
        image.ext
    );
    s.objects
        .put(&key, image.bytes.clone(), image.content_type)
        .await?;
    let spec = PreprocessSpec {
        identity_code: code.to_string(),
        kind: IdentityKind::Identity,
        photos: vec![PhotoSource::Object {
            key: key.clone(),
            filename: image.filename.clone(),
        }],
        min_usable: 1,
        replaces,
    };
    Ok((key, spec))
}

/// The one-output `identity_preprocessing` job that builds `code`.
pub(crate) fn preprocessing_job<'a>(
    s: &AppState,
    account: &'a str,
    billing: &'a str,
    code: &'a str,
    spec_json: String,
    cost: atelier_shared::domain::Credits,
    traceparent: String,
) -> NewJob<'a> {
    NewJob {
        account_id: account,
        billing_account_id: billing,
        project_id: None,
        job_type: JobType::IdentityPreprocessing,
        spec_json,
        post_process: false,
        outputs: vec![NewOutput {
            instruction_index: 0,
            variation_index: 0,
            cost,
            output_format: "jpg".into(),
        }],
        max_attempts: s.config.scheduler.retry.max_attempts,
        active_job_cap: None,
        traceparent: Some(traceparent),
        identity: Some(IdentityUse::Builds(code)),
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

/// A new identity code: `idn_` + 16 base32 characters.
pub fn new_code() -> String {
    format!("idn_{}", atelier_shared::domain::ids::base32_lower(16))
}

/// The identity object (contract §5.1). URLs are signed.
pub async fn view(s: &AppState, i: &IdentityRow) -> ApiResult<Value> {
    let ttl = Duration::from_secs(s.config.limits.result_url_ttl_secs);
    let link = match &i.photo_key {
        Some(k) => Value::String(
            s.object_url(k, atelier_shared::storage::content_type_of(k), ttl)
                .await?,
        ),
        None => Value::Null,
    };
    let face_link = match &i.crop_key {
        Some(k) => Value::String(s.object_url(k, "image/jpeg", ttl).await?),
        None => Value::Null,
    };
    let record = i.record();
    Ok(json!({
        "identity_code": i.code,
        "name": i.name,
        "link": link,
        "face_link": face_link,
        "original_filename": i.original_filename,
        "visibility": "private",
        "groups": [],
        "created_by": i.created_by,
        "image_description": i.tag.as_ref().map(|t| json!({"tags": [t]})),
        "tag": i.tag,
        "preprocessing_status": i.preprocessing_status(),
        "preprocessing_job_id": i.job_id,
        "preprocessing_time": i.preprocessing_time(),
        "quality_score": record.as_ref().map(|r| r.quality()),
        "error_message": i.error_message(),
        "tier": Value::Null,
        "created_at": iso8601(i.created_at),
        "updated_at": iso8601(i.job_finalized_at.unwrap_or(i.updated_at).max(i.updated_at)),
    }))
}

/// `face_metadata` of the upload answer: the face found, in photo pixels.
fn face_metadata(i: &IdentityRow) -> Value {
    match i.record() {
        Some(r) => json!({
            "confidence": r.photos.first().and_then(|p| p.face_score).map(identity::round3),
            "x": r.face_box[0], "y": r.face_box[1],
            "width": r.face_box[2] - r.face_box[0], "height": r.face_box[3] - r.face_box[1],
            "image_width": r.photo_width, "image_height": r.photo_height,
            "quality_score": r.quality(),
        }),
        None => json!({}),
    }
}

pub(crate) async fn erase(s: &AppState, keys: &[String]) {
    for k in keys {
        if let Err(e) = s.objects.delete(k).await {
            tracing::warn!(key = %k, error = %e, "cannot erase an identity object; it stays orphaned");
        }
    }
}

/// Waits, up to `identity.upload_wait_ms`, for a preprocessing job to end
/// (the face check is done then); its status when it ended or the wait did.
async fn wait_for_job(s: &AppState, job_id: &str) -> ApiResult<atelier_shared::domain::JobStatus> {
    let limit = Duration::from_millis(s.config.identity.upload_wait_ms);
    let start = Instant::now();
    let mut pause = Duration::from_millis(25);
    loop {
        let status = s
            .store
            .job(job_id)
            .await?
            .ok_or_else(|| ApiError::internal(format!("preprocessing job {job_id} vanished")))?
            .status();
        if status.is_terminal() || start.elapsed() >= limit {
            return Ok(status);
        }
        tokio::select! {
            _ = tokio::time::sleep(pause.min(limit.saturating_sub(start.elapsed()))) => {}
            _ = s.shutdown.cancelled() => return Ok(status),
        }
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

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
    let (photo_key, spec) = store_photo(&s, &acc.id, &code, "photo", &image).await?;
    let spec_json = serde_json::to_string(&spec).map_err(ApiError::internal)?;
    let (billing, _) = s.store.billing_owner(&acc.id).await?;
    let trace = job_trace(&headers).to_string();
    // The default name (the file stem) is made unique with a suffix; an
    // explicit name that is taken is the client's conflict (409).
    let mut attempt = 1;
    let admitted = loop {
        let name = if attempt == 1 {
            base_name.clone()
        } else {
            let suffix = format!(" ({attempt})");
            let keep = identity::MAX_NAME - suffix.chars().count();
            format!(
                "{}{suffix}",
                base_name.chars().take(keep).collect::<String>()
            )
        };
        let job = preprocessing_job(
            &s,
            &acc.id,
            &billing,
            &code,
            spec_json.clone(),
            PriceTable::flat(s.config.prices.identity),
            trace.clone(),
        );
        let ident = NewIdentity {
            code: &code,
            account_id: &acc.id,
            kind: IdentityKind::Identity,
            name: &name,
            tag: tag.as_deref(),
            original_filename: image.filename.as_deref(),
            photo_key: Some(&photo_key),
            sources_json: "[]".into(),
            training_tier: None,
            slot_cap: (!acc.is_enterprise()).then_some(s.config.identity.slots),
        };
        let refused = match s.store.create_identity(ident, job).await {
            Ok(a) => a,
            Err(e) => {
                erase(&s, std::slice::from_ref(&photo_key)).await;
                return Err(e.into());
            }
        };
        match refused {
            IdentityAdmission::Created { job_id, .. } => break job_id,
            IdentityAdmission::NameTaken { .. } if explicit.is_none() && attempt < 50 => {
                attempt += 1;
            }
            other => {
                erase(&s, std::slice::from_ref(&photo_key)).await;
                return Err(match other {
                    IdentityAdmission::NameTaken { existing_code } => ApiError::conflict(
                        "identity_exists",
                        format!("An identity named {name:?} already exists"),
                    )
                    .with("existing_identity_code", existing_code.clone())
                    .with("identity_code", existing_code),
                    IdentityAdmission::SlotsExhausted { used, cap } => ApiError::too_many(
                        "identity_slots_exhausted",
                        format!(
                            "{used} identities exist; at most {cap} per account (delete one to free a slot)"
                        ),
                        60,
                    ),
                    IdentityAdmission::Refused(a) => refusal(a),
                    IdentityAdmission::Created { .. } => unreachable!("handled above"),
                });
            }
        }
    };
    metrics::counter!("atelier_jobs_created_total", "type" => "identity_preprocessing")
        .increment(1);
    tracing::info!(identity = %code, job.id = %admitted, account.id = %acc.id, "identity accepted");

    wait_for_job(&s, &admitted).await?;
    let row = load(&s, &acc.id, &code).await?;
    let mut body = view(&s, &row).await?;
    let obj = body
        .as_object_mut()
        .ok_or_else(|| ApiError::internal("identity view is not an object"))?;
    match row.preprocessing_status() {
        "completed" => {
            obj.insert("success".into(), json!(true));
            obj.insert("face_detected".into(), json!(true));
            obj.insert("face_metadata".into(), face_metadata(&row));
        }
        "failed" => {
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
                erase(&s, &keys).await;
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
        _ => {
            // Still running: the status endpoint tells the outcome.
            obj.insert("success".into(), json!(true));
            obj.insert("face_detected".into(), Value::Null);
            obj.insert("face_metadata".into(), json!({}));
        }
    }
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
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

pub async fn list(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<impl IntoResponse> {
    let (page, per_page, ascending) = PageQuery {
        page: q.page,
        per_page: q.per_page,
        order: q.order.clone(),
        search: None,
    }
    .resolve(20)?;
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
        && !matches!(
            st.as_str(),
            "pending" | "processing" | "completed" | "failed"
        )
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
    // Only private identities exist on this platform (no group sharing or
    // platform defaults yet): `shared` and `default` list nothing.
    let empty = match q.ownership.as_deref() {
        None | Some("mine") => false,
        Some("shared" | "default") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                Some("ownership"),
                "must be mine, shared or default",
                "query",
            ));
        }
    };
    // Extracted metadata (gender, age) is not computed: such filters match nothing.
    let empty = empty || q.gender.is_some() || q.age_min.is_some() || q.age_max.is_some();
    let (rows, total) = if empty {
        (Vec::new(), 0)
    } else {
        s.store
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
                },
            )
            .await?
    };
    let mut identities = Vec::with_capacity(rows.len());
    for r in &rows {
        identities.push(view(&s, r).await?);
    }
    Ok(axum::Json(json!({
        "identities": identities,
        "pagination": crate::views::pagination(page, per_page, total),
    })))
}

async fn load(s: &AppState, account: &str, code: &str) -> ApiResult<IdentityRow> {
    s.store
        .identity_for(account, IdentityKind::Identity, code)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Identity {code} not found")))
}

pub async fn read(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(code): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let row = load(&s, &acc.id, &code).await?;
    Ok(axum::Json(view(&s, &row).await?))
}

pub async fn status(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(code): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let row = load(&s, &acc.id, &code).await?;
    Ok(axum::Json(json!({
        "identity_code": row.code,
        "preprocessing_status": row.preprocessing_status(),
        "preprocessing_job_id": row.job_id,
        "preprocessing_time": row.preprocessing_time(),
        "quality_score": row.record().map(|r| r.quality()),
        "error_message": row.error_message(),
    })))
}

pub async fn delete(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(code): Path<String>,
) -> ApiResult<impl IntoResponse> {
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
            erase(&s, &keys).await;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

/// `POST /identity/{code}/pov` (contract §5.8): replaces the identity's
/// face with one from a new photo. This platform keeps one point of view
/// per identity (index 0: the aligned face that model swap uses). The new
/// face is preprocessed like an upload (free of charge); until its job
/// completes, and if it fails, the identity keeps the face it had.
pub async fn replace_pov(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(code): Path<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult<axum::response::Response> {
    let row = load(&s, &acc.id, &code).await?;
    if row.preprocessing_status() != "completed" {
        return Err(ApiError::conflict(
            "identity_not_ready",
            format!(
                "The identity's preprocessing is {}; replace a point of view once it is completed",
                row.preprocessing_status()
            ),
        ));
    }
    let (image, form) = one_photo(&s, multipart).await?;
    let index: i64 = form
        .text
        .get("pov_index")
        .ok_or_else(|| ApiError::bad_request(Some("pov_index"), "missing", "form"))?
        .trim()
        .parse()
        .map_err(|_| ApiError::bad_request(Some("pov_index"), "must be an integer", "form"))?;
    if index != 0 {
        return Err(ApiError::bad_request(
            Some("pov_index"),
            format!("{index} is out of range: this identity has 1 point of view (index 0)"),
            "form",
        ));
    }
    let (key, spec) = store_photo(&s, &acc.id, &code, "pov", &image).await?;
    let (billing, _) = s.store.billing_owner(&acc.id).await?;
    let job = preprocessing_job(
        &s,
        &acc.id,
        &billing,
        &code,
        serde_json::to_string(&spec).map_err(ApiError::internal)?,
        atelier_shared::domain::Credits::ZERO,
        job_trace(&headers).to_string(),
    );
    let job_id = match s.store.start_face_replacement(&acc.id, &code, job).await {
        Ok(Some(atelier_shared::db::jobs::Admission::Created { job_id, .. })) => job_id,
        Ok(other) => {
            erase(&s, std::slice::from_ref(&key)).await;
            return Err(match other {
                None => ApiError::not_found(format!("Identity {code} not found")),
                Some(a) => refusal(a),
            });
        }
        Err(e) => {
            erase(&s, std::slice::from_ref(&key)).await;
            return Err(e.into());
        }
    };
    // Wait for the face check, as an upload does.
    let status = wait_for_job(&s, &job_id).await?;
    let ttl = Duration::from_secs(s.config.limits.result_url_ttl_secs);
    match status {
        atelier_shared::domain::JobStatus::Completed => {
            let row = load(&s, &acc.id, &code).await?;
            let (Some(full), Some(thumb)) = (&row.crop_key, &row.crop_thumb_key) else {
                return Err(ApiError::internal("a completed face has no crop"));
            };
            Ok(axum::Json(json!({
                "success": true,
                "pov_index": index,
                "processed_images": [{
                    "original_filename": image.filename,
                    "link": s.object_url(full, "image/jpeg", ttl).await?,
                    "thumbnail_link": s.object_url(thumb, "image/jpeg", ttl).await?,
                }],
                "processed_count": 1,
                "preprocessing_job_id": job_id,
            }))
            .into_response())
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
            erase(&s, std::slice::from_ref(&key)).await;
            Err(if is_input_problem(&message) {
                photo_problem(&message)
            } else {
                ApiError::unavailable(format!("face replacement failed: {message}; try again"), 5)
            })
        }
        _ => Ok(axum::Json(json!({
            "success": true,
            "pov_index": index,
            "processed_images": [],
            "processed_count": 0,
            "preprocessing_status": "processing",
            "preprocessing_job_id": job_id,
        }))
        .into_response()),
    }
}
