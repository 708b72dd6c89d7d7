//! `identity_preprocessing`: builds an identity or a profile from its
//! photos (object keys, or public URLs fetched through the egress guard),
//! one photo at a time, and stores the face crop, its thumbnail and the
//! embedding.

use super::{Encoded, off_runtime, store_result};
use crate::context::WorkerContext;
use crate::faces::FaceKit;
use crate::faces::identity::{self, PhotoInput};
use crate::failure::TaskFailure;
use crate::imaging;
use atelier_shared::domain::identity::{IdentityKind, PhotoSource, PovImage, PreprocessSpec};
use atelier_shared::domain::packshot::ImageFormat;
use atelier_shared::domain::{OutputResult, Task};
use atelier_shared::storage::StorageError;
use bytes::Bytes;
use std::sync::Arc;

/// The face models, which the queues of face jobs need.
pub(super) fn face_kit(ctx: &WorkerContext) -> Result<Arc<FaceKit>, TaskFailure> {
    ctx.faces
        .clone()
        .ok_or_else(|| TaskFailure::retryable("this worker has no face models loaded"))
}

/// "unreadable image: …" for any decoding failure.
pub(super) fn unreadable(message: &str) -> String {
    if message.starts_with("unreadable image") {
        message.to_string()
    } else {
        format!("unreadable image: {message}")
    }
}

/// `identity_preprocessing`: builds an identity or profile from its photos.
pub(super) async fn run(
    ctx: &WorkerContext,
    task: &Task,
    spec: &PreprocessSpec,
) -> Result<OutputResult, TaskFailure> {
    let kit = face_kit(ctx)?;
    // One photo at a time: fetched, decoded, analysed and dropped, so a
    // profile of many large photos never holds more than one of them.
    let strict = spec.kind == IdentityKind::Identity;
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
            PhotoSource::Url { url } => crate::fetch::fetch(ctx, url)
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

    let base = task.run_base();
    let embedding_key = format!("{base}-embedding.f32");
    ctx.objects
        .put(
            &embedding_key,
            Bytes::from(identity::embedding_bytes(&built.embedding)),
            "application/octet-stream",
        )
        .await?;
    let (full_key, thumb_key) = store_result(
        ctx,
        &base,
        Encoded {
            full: built.crop_jpeg,
            format: ImageFormat::Jpg,
            thumb: built.thumb_jpeg,
        },
    )
    .await?;
    let mut record = built.record;
    for (index, full, thumb) in built.povs {
        let (key, thumb_key) = store_result(
            ctx,
            &format!("{base}-pov{index}"),
            Encoded {
                full,
                format: ImageFormat::Jpg,
                thumb,
            },
        )
        .await?;
        record.povs.push(PovImage {
            index,
            key,
            thumb_key,
        });
    }
    record.embedding_key = embedding_key;
    record.dims = built.embedding.len() as u32;
    Ok(OutputResult {
        full_key,
        thumb_key,
        format: ImageFormat::Jpg.ext().to_string(),
        width: record.crop_size,
        height: record.crop_size,
        model_used: "atelier-face (scrfd + arcface)".into(),
        processing_ms: 0,
        input_description: serde_json::to_value(&record)
            .map_err(|e| TaskFailure::retryable(format!("cannot describe the identity: {e}")))?,
        post_processed: false,
    })
}
