//! Upload slots (contract §2.4), the signed `PUT` target (§2.5) and signed
//! reads of stored objects.

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::Json;
use crate::state::AppState;
use crate::views::UploadSlot;
use atelier_shared::domain::assets::AssetReport;
use atelier_shared::storage::{Capability, SignError};
use atelier_shared::time::now_ms;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize, Default, utoipa::ToSchema)]
pub struct IssueBody {
    /// `.jpg`, `.jpeg`, `.png` or `.webp`; default: a generated `.jpg` name.
    pub filename: Option<String>,
    /// An existing project; default: the account's `default` project.
    pub project_name: Option<String>,
}

/// Content type for an accepted filename extension.
pub fn content_type_for(filename: &str) -> Option<&'static str> {
    let ext = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())?;
    match ext.as_str() {
        "jpg" | "jpeg" => Some("image/jpeg"),
        "png" => Some("image/png"),
        "webp" => Some("image/webp"),
        _ => None,
    }
}

fn validate_filename(raw: Option<&str>) -> ApiResult<String> {
    let name = match raw {
        None => return Ok(format!("{}.jpg", uuid::Uuid::new_v4())),
        Some(n) => n.trim(),
    };
    if name.is_empty() || name.chars().count() > 255 {
        return Err(ApiError::bad_request(
            Some("filename"),
            "must be 1 to 255 characters",
            "body",
        ));
    }
    if name.contains('/') || name.contains('\\') || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            Some("filename"),
            "must be a plain file name without path separators",
            "body",
        ));
    }
    if content_type_for(name).is_none() {
        return Err(ApiError::bad_request(
            Some("filename"),
            "extension must be .jpg, .jpeg, .png or .webp",
            "body",
        ));
    }
    Ok(name.to_string())
}

/// An upload slot: a signed, single-use `PUT` target for the bytes. The
/// body is optional (both fields have defaults).
#[utoipa::path(
    post, path = "/upload", tag = "uploads",
    request_body(content = IssueBody, content_type = "application/json", description = "Optional"),
    responses((status = 200, description = "The slot", body = UploadSlot)),
)]
pub async fn issue(
    State(s): State<AppState>,
    Caller(acc): Caller,
    headers: HeaderMap,
    raw: Bytes,
) -> ApiResult<impl IntoResponse> {
    // Both fields are optional, so an empty body is a valid request.
    let body: IssueBody = if raw.iter().all(u8::is_ascii_whitespace) {
        IssueBody::default()
    } else {
        let req = axum::http::Request::builder()
            .header(
                header::CONTENT_TYPE,
                headers
                    .get(header::CONTENT_TYPE)
                    .cloned()
                    .unwrap_or(header::HeaderValue::from_static("")),
            )
            .body(axum::body::Body::from(raw))
            .map_err(ApiError::internal)?;
        let Json(b) =
            <Json<IssueBody> as axum::extract::FromRequest<()>>::from_request(req, &()).await?;
        b
    };
    let filename = validate_filename(body.filename.as_deref())?;
    let content_type = content_type_for(&filename).unwrap_or("image/jpeg");
    let project = match body.project_name.as_deref() {
        Some(name) => {
            let name = super::projects::project_name(Some(name), "project_name")?;
            s.store
                .project_by_name(&acc.id, &name)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("Project {name:?} not found")))?
        }
        None => {
            s.store
                .ensure_project(&acc.id, atelier_shared::db::projects::DEFAULT_PROJECT)
                .await?
        }
    };
    let file_id = atelier_shared::domain::FileId::generate().0;
    let ext = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_else(|| "jpg".into());
    let key = format!("uploads/{}/{}/original.{}", acc.id, file_id, ext);
    s.store
        .create_file(
            &file_id,
            &acc.id,
            &project.id,
            &filename,
            content_type,
            &key,
        )
        .await?;
    let ttl = Duration::from_secs(s.config.limits.upload_url_ttl_secs);
    let exp = now_ms() + ttl.as_millis() as i64;
    let upload_url = s.url(&format!(
        "/upload/{}",
        s.signer.sign(
            &Capability::Upload {
                file_id: file_id.clone(),
                content_type: content_type.into()
            },
            exp
        )
    ));
    let download_url = s.url(&format!(
        "/files/{}",
        s.signer.sign(
            &Capability::File {
                file_id: file_id.clone()
            },
            now_ms() + Duration::from_secs(s.config.limits.result_url_ttl_secs).as_millis() as i64
        )
    ));
    Ok((
        StatusCode::OK,
        axum::Json(UploadSlot {
            upload_url,
            download_url,
            file_id,
            filename,
            content_type: content_type.to_string(),
            project_id: project.id,
            project_name: project.name,
        }),
    ))
}

/// The type, extension and size of an image whose header decodes, whatever
/// it was declared as: JPEG, PNG or WebP.
pub(crate) fn sniff_any(bytes: &[u8]) -> Result<(&'static str, &'static str, u32, u32), String> {
    let (ct, ext) = match image::guess_format(bytes) {
        Ok(image::ImageFormat::Jpeg) => ("image/jpeg", "jpg"),
        Ok(image::ImageFormat::Png) => ("image/png", "png"),
        Ok(image::ImageFormat::WebP) => ("image/webp", "webp"),
        Ok(other) => return Err(format!("{other:?} is not accepted; send JPEG, PNG or WebP")),
        Err(_) => return Err("the bytes are not a JPEG, PNG or WebP image".into()),
    };
    let (w, h) = sniff(bytes, ct)?;
    Ok((ct, ext, w, h))
}

/// An image a client sent inside a request: JPEG, PNG or WebP whose header
/// decodes, within `worker.max_input_pixels` (the limit workers decode
/// under), not cut off, and whose data decodes whole (checked off the async
/// runtime, a few at a time): what a worker would refuse is refused before
/// anything is stored or charged. `(content type, extension, width,
/// height)`; a problem is a 400 naming `field` at `position`.
pub(crate) async fn checked_image(
    s: &crate::state::AppState,
    bytes: &[u8],
    field: Option<&str>,
    position: &str,
) -> Result<(&'static str, &'static str, u32, u32), ApiError> {
    let (ct, ext, w, h) = sniff_any(bytes)
        .map_err(|m| ApiError::bad_request(field, format!("unreadable image: {m}"), position))?;
    full_decode(s, bytes::Bytes::copy_from_slice(bytes), w, h)
        .await?
        .map_err(|m| ApiError::bad_request(field, m, position))?;
    Ok((ct, ext, w, h))
}

/// [`decodes_whole`] on the blocking pool, a few at a time per process;
/// the inner error is the client's problem.
async fn full_decode(
    s: &crate::state::AppState,
    bytes: bytes::Bytes,
    w: u32,
    h: u32,
) -> Result<Result<(), String>, ApiError> {
    let limit = s.config.worker.max_input_pixels;
    // A full decode holds the whole bitmap (up to 3–8 bytes a pixel of
    // `worker.max_input_pixels`): a few at a time per process.
    let _slot = FULL_DECODES
        .acquire()
        .await
        .map_err(|e| ApiError::internal(format!("image check failed: {e}")))?;
    tokio::task::spawn_blocking(move || decodes_whole(&bytes, w, h, limit))
        .await
        .map_err(|e| ApiError::internal(format!("image check failed: {e}")))
}

/// Full decodes of uploads running at once in this process.
static FULL_DECODES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Whether an image whose header said `w`×`h` is within `limit` pixels and
/// decodes whole: a JPEG must reach its end marker (decoders fill a cut-off
/// scan with grey), and every format must decode without error, under
/// allocation limits sized from the header.
fn decodes_whole(bytes: &[u8], w: u32, h: u32, limit: u64) -> Result<(), String> {
    let pixels = u64::from(w) * u64::from(h);
    if pixels > limit {
        return Err(format!(
            "image too large: {w}x{h} = {pixels} pixels is above the limit of {limit} pixels"
        ));
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("unreadable image: {e}"))?;
    if reader.format() == Some(image::ImageFormat::Jpeg)
        && let Some(why) = atelier_shared::domain::images::jpeg_truncation(bytes)
    {
        return Err(why.to_string());
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    reader
        .decode()
        .map(|_| ())
        .map_err(|e| format!("corrupt image data: {e}"))
}

/// Whether `bytes` are an image of the declared type whose header decodes.
fn sniff(bytes: &[u8], content_type: &str) -> Result<(u32, u32), String> {
    let want = match content_type {
        "image/jpeg" => image::ImageFormat::Jpeg,
        "image/png" => image::ImageFormat::Png,
        "image/webp" => image::ImageFormat::WebP,
        other => return Err(format!("unsupported content type {other}")),
    };
    let got = image::guess_format(bytes)
        .map_err(|_| format!("the bytes are not a {content_type} image"))?;
    if got != want {
        return Err(format!(
            "the bytes are {got:?}, not the declared {content_type}"
        ));
    }
    // Only the header is read here; the pixel budget is checked by the
    // caller with a message that names it (the decoder's own allocation
    // limit would refuse a large header as a header that does not decode).
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), want);
    reader.no_limits();
    reader
        .into_dimensions()
        .map_err(|e| format!("the {content_type} header does not decode: {e}"))
}

/// The signed upload target: the image bytes, with the `Content-Type` the
/// slot named (no credentials; single use; checked to be that image type).
#[utoipa::path(
    put, path = "/upload/{token}", tag = "uploads", security(()),
    params(("token" = String, Path, description = "The signature in `upload_url`")),
    request_body(content(
        (crate::views::Binary = "image/jpeg"),
        (crate::views::Binary = "image/png"),
        (crate::views::Binary = "image/webp"),
    )),
    responses(
        (status = 200, description = "Stored"),
        (status = 400, description = "Above `worker.max_input_pixels`, truncated or corrupt", body = crate::error::ErrorBody),
        (status = 403, description = "Expired, invalid or already used URL", body = crate::error::ErrorBody),
        (status = 413, description = "Larger than `limits.max_upload_bytes`", body = crate::error::ErrorBody),
        (status = 415, description = "Not the declared image type", body = crate::error::ErrorBody),
    ),
)]
pub async fn receive(
    State(s): State<AppState>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<impl IntoResponse> {
    let (cap, _) = s.signer.verify(&token, now_ms()).map_err(|e| match e {
        SignError::Expired => ApiError::forbidden("The upload URL has expired; request a new one"),
        SignError::Invalid => ApiError::forbidden("Invalid upload URL signature"),
    })?;
    let Capability::Upload {
        file_id,
        content_type,
    } = cap
    else {
        return Err(ApiError::forbidden("This URL does not grant an upload"));
    };
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "The image is larger than {} bytes",
                s.config.limits.max_upload_bytes
            ),
        )
    };
    // Bodies beyond the route's limit are cut off while reading.
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::bad_request(None, format!("cannot read the body: {e}"), "body")
        }
    })?;
    let sent = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let sent_mime = sent
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if sent_mime != content_type {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type must be {content_type} (as returned by POST /upload), got {sent:?}"
            ),
        ));
    }
    if body.len() as u64 > s.config.limits.max_upload_bytes {
        return Err(too_large());
    }
    let (w, h) = sniff(&body, &content_type).map_err(|m| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            m,
        )
    })?;
    // What a worker would refuse (too many pixels, cut off, corrupt) is
    // refused here, before anything is stored or a job is charged for it.
    full_decode(&s, body.clone(), w, h)
        .await?
        .map_err(|m| ApiError::bad_request(None, m, "body"))?;
    let file = s
        .store
        .file(&file_id)
        .await?
        .ok_or_else(|| ApiError::forbidden("The upload slot no longer exists"))?;
    if file.is_uploaded() {
        return Err(ApiError::forbidden("The upload URL was already used"));
    }
    // Each PUT writes under its own key; only the one recorded below wins.
    let ext = file
        .object_key
        .rsplit_once('.')
        .map(|(_, e)| e.to_string())
        .unwrap_or_else(|| "jpg".into());
    let key = format!(
        "uploads/{}/{}/{}.{}",
        file.account_id,
        file.id,
        ulid::Ulid::new().to_string().to_lowercase(),
        ext
    );
    s.objects.put(&key, body.clone(), &content_type).await?;
    if !s
        .store
        .mark_file_uploaded(
            &file.id,
            &key,
            body.len() as i64,
            i64::from(w),
            i64::from(h),
        )
        .await?
    {
        let _ = s.objects.delete(&key).await;
        return Err(ApiError::forbidden("The upload URL was already used"));
    }
    if s.config.limits.tag_uploads {
        tag(&s, &file).await;
    }
    Ok(StatusCode::OK)
}

/// Asks a worker to tag the stored upload (contract §2.6). The upload has
/// succeeded whatever happens here: a file that could not be tagged lists
/// without tags.
async fn tag(s: &AppState, file: &atelier_shared::db::files::FileRow) {
    let billing = match s.store.billing_owner(&file.account_id).await {
        Ok((billing, _)) => billing,
        Err(e) => {
            tracing::warn!(file_id = %file.id, error = %e, "upload not tagged");
            return;
        }
    };
    let job = atelier_shared::db::jobs::NewJob {
        account_id: &file.account_id,
        billing_account_id: &billing,
        // Not the project's work: deleting the project neither waits for
        // it nor takes the tags with it (the file moves to `default`).
        project_id: None,
        spec: atelier_shared::domain::assets::TaggingSpec {
            file_id: file.id.clone(),
        }
        .into(),
        prices: &s.config.prices,
        max_attempts: s.config.scheduler.retry.max_attempts,
        active_job_cap: None,
        traceparent: None,
    };
    match s.store.start_tagging(&file.id, job).await {
        Ok(atelier_shared::db::jobs::Admission::Created { .. }) => {}
        Ok(other) => tracing::warn!(file_id = %file.id, answer = ?other, "upload not tagged"),
        Err(e) => tracing::warn!(file_id = %file.id, error = %e, "upload not tagged"),
    }
}

/// A signed read of a stored file (no credentials; expires).
#[utoipa::path(
    get, path = "/files/{token}", tag = "uploads", security(()),
    params(("token" = String, Path, description = "The signature in the URL")),
    responses(
        (status = 200, description = "The file", content_type = "image/*", body = crate::views::Binary),
        (status = 403, description = "Expired link", body = crate::error::ErrorBody),
    ),
)]
pub async fn serve_file(
    State(s): State<AppState>,
    Path(token): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let (cap, _) = s.signer.verify(&token, now_ms()).map_err(|e| match e {
        SignError::Expired => ApiError::forbidden("The link has expired"),
        SignError::Invalid => ApiError::not_found("Unknown link"),
    })?;
    let (key, content_type) = match cap {
        Capability::Get { key, content_type } => (key, content_type),
        Capability::File { file_id } => {
            let f = s
                .store
                .file(&file_id)
                .await?
                .ok_or_else(|| ApiError::not_found("The file no longer exists"))?;
            if !f.is_uploaded() {
                return Err(ApiError::not_found("The file has not been uploaded yet"));
            }
            (f.object_key, f.content_type)
        }
        _ => return Err(ApiError::not_found("Unknown link")),
    };
    let bytes = s.objects.get(&key).await.map_err(|e| match e {
        atelier_shared::storage::StorageError::NotFound(_) => {
            ApiError::not_found("The file no longer exists")
        }
        other => other.into(),
    })?;
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "private, max-age=3600".into()),
        ],
        bytes,
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AssetQuery {
    pub page: Option<i64>,
    /// 1–100 (default 20).
    pub per_page: Option<i64>,
    /// `asc` or `desc` (default).
    pub order: Option<String>,
    /// `created_at` (default) or `filename`.
    pub sort_by: Option<String>,
    /// Text in the filename or the project's name.
    pub search: Option<String>,
    /// Only the caller's uploads are listed; any other value matches none.
    pub created_by: Option<String>,
    /// ISO 8601 date or date-time.
    pub created_after: Option<String>,
    pub created_before: Option<String>,
    /// `mine` (the caller's uploads), `shared` or `default` (none exist).
    pub ownership: Option<String>,
    /// Comma-separated subset of `model`, `product`, `background`, `other`.
    pub include_tags: Option<String>,
    pub exclude_tags: Option<String>,
}

/// The caller's uploaded assets (contract §2.6), with the tags a worker
/// gave each one after its upload (none until it has looked).
#[utoipa::path(
    get, path = "/assets", tag = "uploads",
    params(AssetQuery),
    responses(
        (status = 200, description = "`{assets, pagination}`", body = Object),
        (status = 400, description = "A bad filter", body = crate::error::ErrorBody),
    ),
)]
pub async fn assets(
    State(s): State<AppState>,
    Caller(acc): Caller,
    crate::extract::Query(q): crate::extract::Query<AssetQuery>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    let bad = |f: &str, m: &str| ApiError::bad_request(Some(f), m, "query");
    let (page, per_page, ascending) =
        crate::routes::paging(q.page, q.per_page, q.order.as_deref(), 20)?;
    let sort_by_name = match q.sort_by.as_deref() {
        None | Some("created_at") => false,
        Some("filename") => true,
        Some(_) => return Err(bad("sort_by", "must be created_at or filename")),
    };
    let tags = |v: &Option<String>, field: &str| -> ApiResult<Vec<String>> {
        let list: Vec<String> = v
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        match list
            .iter()
            .find(|t| !atelier_shared::domain::assets::TAGS.contains(&t.as_str()))
        {
            Some(_) => Err(bad(field, "must list model, product, background or other")),
            None => Ok(list),
        }
    };
    let include = tags(&q.include_tags, "include_tags")?;
    let exclude = tags(&q.exclude_tags, "exclude_tags")?;
    // Uploads are private to their account: none is shared or a platform
    // default.
    let none_match = match q.ownership.as_deref() {
        None | Some("mine") => false,
        Some("shared" | "default") => true,
        Some(_) => return Err(bad("ownership", "must be mine, shared or default")),
    } || q
        .created_by
        .as_deref()
        .is_some_and(|c| c != acc.id && c != acc.name);
    let when = |v: &Option<String>, field: &str| -> ApiResult<Option<i64>> {
        v.as_deref()
            .map(|t| {
                crate::routes::billing::instant(t.trim())
                    .ok_or_else(|| bad(field, "must be an ISO 8601 date or date-time"))
            })
            .transpose()
    };
    let after = when(&q.created_after, "created_after")?;
    let before = when(&q.created_before, "created_before")?;
    let (rows, total) = if none_match {
        (Vec::new(), 0)
    } else {
        s.store
            .list_files(
                &acc.id,
                &atelier_shared::db::files::AssetQuery {
                    search: q.search.as_deref().map(str::trim).filter(|t| !t.is_empty()),
                    created_after: after,
                    created_before: before,
                    include_tags: &include,
                    exclude_tags: &exclude,
                    sort_by_name,
                    ascending,
                    page,
                    per_page,
                },
            )
            .await?
    };
    let ttl = std::time::Duration::from_secs(s.config.limits.result_url_ttl_secs);
    let exp = now_ms() + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
    let mut assets = Vec::with_capacity(rows.len());
    for a in &rows {
        let f = &a.file;
        let url = s.url(&format!(
            "/files/{}",
            s.signer.sign(
                &Capability::File {
                    file_id: f.id.clone()
                },
                exp
            )
        ));
        let report: Option<AssetReport> = a
            .tagging
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok());
        let jpeg = atelier_shared::domain::packshot::ImageFormat::Jpg.content_type();
        // The tagging's preview (512 px) and its thumbnail, once it ran.
        let big = match &a.preview_key {
            Some(k) => s.object_url(k, jpeg, ttl).await?,
            None => url.clone(),
        };
        let small = match &a.preview_thumb_key {
            Some(k) => s.object_url(k, jpeg, ttl).await?,
            None => url.clone(),
        };
        assets.push(serde_json::json!({
            "id": f.id,
            "filename": f.filename,
            "url": url,
            "created_at": atelier_shared::time::iso8601(f.created_at),
            "created_by": f.account_id,
            "tags": report.as_ref().map(|r| r.tags.clone()).unwrap_or_default(),
            "visibility": "private",
            "thumbnail_big": big,
            "thumbnail_small": small,
            "styling_note": null,
            "detected": report.as_ref().map(|r| &r.detected),
            "dimensions": match (f.width, f.height) {
                (Some(w), Some(h)) => serde_json::json!({"width": w, "height": h}),
                _ => serde_json::Value::Null,
            },
        }));
    }
    Ok(axum::Json(serde_json::json!({
        "assets": assets,
        "pagination": crate::views::Pagination::new(page, per_page, total),
    })))
}
