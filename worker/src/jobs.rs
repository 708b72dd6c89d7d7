//! The face pipelines' task bodies: identity preprocessing and model swap.
//! Inputs come from the object store (and, for profiles, from public URLs
//! through the egress guard); models run on the blocking pool; results are
//! uploaded under keys unique to the run.

use crate::failure::TaskFailure;
use crate::identity::{self, FaceKit, PhotoInput};
use crate::{WorkerContext, imaging, off_runtime, run_base, swap};
use atelier_shared::db::jobs::{JobRow, OutputRow};
use atelier_shared::domain::identity::{PhotoSource, PreprocessSpec, SwapSpec};
use atelier_shared::domain::packshot::ImageFormat;
use atelier_shared::domain::{OutputResult, Task};
use atelier_shared::storage::StorageError;
use bytes::Bytes;
use image::DynamicImage;
use std::sync::Arc;

/// The face models and the job's spec, as every face task starts.
fn setup<T: serde::de::DeserializeOwned>(
    ctx: &WorkerContext,
    job: &JobRow,
) -> Result<(Arc<FaceKit>, T), TaskFailure> {
    let kit = ctx
        .faces
        .clone()
        .ok_or_else(|| TaskFailure::retryable("this worker has no face models loaded"))?;
    let spec = serde_json::from_str(&job.spec)
        .map_err(|e| TaskFailure::permanent(format!("unreadable job spec: {e}")))?;
    Ok((kit, spec))
}

/// "unreadable image: …" for any decoding failure.
fn unreadable(message: &str) -> String {
    if message.starts_with("unreadable image") {
        message.to_string()
    } else {
        format!("unreadable image: {message}")
    }
}

/// Fetches one profile photo from a public URL: guarded resolution and
/// redirects, a time limit, a size limit, an image content type.
async fn fetch(ctx: &WorkerContext, url: &str) -> Result<Bytes, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
    ctx.egress
        .check_syntax(&parsed)
        .map_err(|e| e.to_string())?;
    let client = ctx
        .egress
        .fetch_client(ctx.fetch_timeout, 3)
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let resp = client
        .get(parsed)
        .send()
        .await
        .map_err(|e| format!("cannot fetch: {}", error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("the server answered {}", resp.status()));
    }
    let ct = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !(ct.is_empty() || ct.starts_with("image/") || ct.starts_with("application/octet-stream")) {
        return Err(format!("not an image (Content-Type {ct})"));
    }
    let limit = ctx.fetch_max_bytes as usize;
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(format!("larger than {limit} bytes"));
    }
    let body = atelier_shared::egress::read_capped(resp, limit + 1)
        .await
        .map_err(|e| format!("cannot read: {}", error_chain(&e)))?;
    if body.len() > limit {
        return Err(format!("larger than {limit} bytes"));
    }
    Ok(Bytes::from(body))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// `identity_preprocessing`: builds an identity or profile from its photos.
pub(crate) async fn identity(
    ctx: &WorkerContext,
    task: &Task,
    output: &OutputRow,
    job: &JobRow,
) -> Result<OutputResult, TaskFailure> {
    let (kit, spec): (_, PreprocessSpec) = setup(ctx, job)?;
    // One photo at a time: fetched, decoded, analysed and dropped, so a
    // profile of many large photos never holds more than one of them.
    let strict = spec.kind == atelier_shared::domain::identity::IdentityKind::Identity;
    let max_pixels = ctx.max_input_pixels;
    let mut reports = Vec::with_capacity(spec.photos.len());
    let mut candidates = Vec::new();
    for (index, p) in spec.photos.iter().enumerate() {
        let raw: Result<Bytes, String> = match p {
            PhotoSource::Object { key, .. } => match ctx.objects.get(key).await {
                Ok(b) => Ok(b),
                Err(StorageError::NotFound(_)) => Err("photo unavailable: it was deleted".into()),
                Err(e) => return Err(e.into()),
            },
            PhotoSource::Url { url } => fetch(ctx, url)
                .await
                .map_err(|e| format!("photo unavailable: {url}: {e}")),
        };
        let kit = kit.clone();
        let (report, candidate) = off_runtime(ctx, move || {
            let photo: PhotoInput = raw.and_then(|bytes| {
                imaging::decode_limited(&bytes, max_pixels).map_err(|f| unreadable(&f.message))
            });
            identity::analyze(&kit, index, photo, strict)
        })
        .await?;
        reports.push(report);
        candidates.extend(candidate);
    }
    let spec_for_build = spec.clone();
    let built = off_runtime(ctx, move || {
        identity::assemble(&spec_for_build, reports, candidates)
    })
    .await?;

    let base = run_base(job, output, task);
    let (full_key, thumb_key, embedding_key) = (
        format!("{base}.jpg"),
        format!("{base}-thumb.jpg"),
        format!("{base}-embedding.f32"),
    );
    ctx.objects
        .put(
            &embedding_key,
            Bytes::from(identity::embedding_bytes(&built.embedding)),
            "application/octet-stream",
        )
        .await?;
    ctx.objects
        .put(&full_key, Bytes::from(built.crop_jpeg), "image/jpeg")
        .await?;
    ctx.objects
        .put(&thumb_key, Bytes::from(built.thumb_jpeg), "image/jpeg")
        .await?;
    let mut record = built.record;
    record.embedding_key = embedding_key;
    record.dims = built.embedding.len() as u32;
    Ok(OutputResult {
        full_key,
        thumb_key,
        format: "jpg".into(),
        width: record.crop_size,
        height: record.crop_size,
        model_used: "atelier-face (scrfd + arcface)".into(),
        processing_ms: 0,
        input_description: serde_json::to_value(&record)
            .map_err(|e| TaskFailure::retryable(format!("cannot describe the identity: {e}")))?,
        post_processed: false,
    })
}

/// `model_swap`: one product photo, the identity's face on its model.
pub(crate) async fn swap(
    ctx: &WorkerContext,
    task: &Task,
    output: &OutputRow,
    job: &JobRow,
) -> Result<OutputResult, TaskFailure> {
    let (kit, spec): (_, SwapSpec) = setup(ctx, job)?;
    let index = output.instruction_index as usize;
    let image = spec
        .images
        .get(index)
        .ok_or_else(|| TaskFailure::permanent("image index out of range"))?
        .clone();
    if ctx.store.identity(&spec.identity_code).await?.is_none() {
        return Err(TaskFailure::permanent("the identity was deleted"));
    }
    // The face fixed when the job was admitted, whatever replaced it since.
    let face_job = job
        .identity_face_job
        .as_deref()
        .ok_or_else(|| TaskFailure::permanent("the job names no identity face"))?;
    let (crop_key, record) = ctx.store.face_of(face_job).await?.ok_or_else(|| {
        TaskFailure::permanent("the identity's face is gone (its preprocessing did not complete)")
    })?;
    let file = ctx.store.file(&image.file_id).await?.ok_or_else(|| {
        TaskFailure::permanent(format!("input image {} no longer exists", image.file_id))
    })?;
    let photo = ctx.objects.get(&file.object_key).await?;
    let crop = ctx.objects.get(&crop_key).await?;
    let embedding = identity::embedding_from_bytes(&ctx.objects.get(&record.embedding_key).await?)
        .map_err(|e| {
            TaskFailure::permanent(format!("the identity's embedding is unreadable: {e}"))
        })?;
    let max_pixels = ctx.max_input_pixels;
    let equalise = spec.post_process;
    let file_id = image.file_id.clone();
    let (full, thumb, swapped) = off_runtime(ctx, move || {
        let target = imaging::decode_limited(&photo, max_pixels)
            .map_err(|f| TaskFailure {
                kind: f.kind,
                message: format!("input {file_id}: {}", f.message),
            })?
            .to_rgb8();
        let identity = swap::IdentityFace {
            crop: imaging::decode_limited(&crop, max_pixels)?.to_rgb8(),
            landmarks: record.landmarks,
            embedding,
        };
        let (s, engine) = swap::swap_face(&kit, &target, &identity, equalise)?;
        let rgba = DynamicImage::ImageRgb8(s.image.clone()).to_rgba8();
        let full = imaging::encode(&rgba, ImageFormat::Jpg)?;
        let thumb = imaging::thumbnail(&rgba)?;
        Ok((full, thumb, (s, engine)))
    })
    .await?;
    let (swapped, engine) = swapped;
    let base = run_base(job, output, task);
    let (full_key, thumb_key) = (format!("{base}.jpg"), format!("{base}-thumb.jpg"));
    ctx.objects
        .put(&full_key, Bytes::from(full), "image/jpeg")
        .await?;
    ctx.objects
        .put(&thumb_key, Bytes::from(thumb), "image/jpeg")
        .await?;
    Ok(OutputResult {
        full_key,
        thumb_key,
        format: "jpg".into(),
        width: swapped.image.width(),
        height: swapped.image.height(),
        model_used: engine,
        processing_ms: 0,
        input_description: serde_json::json!({
            "file_id": image.file_id,
            "note": image.note,
            "identity_code": spec.identity_code,
            "requested_model": spec.model.as_str(),
            "face_box": swapped.face.bbox.map(|v| v.round()),
            "faces_in_photo": swapped.faces_found,
            "changed_region": swapped.region,
        }),
        post_processed: equalise,
    })
}
