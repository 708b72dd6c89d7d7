//! `model_swap`: one product photo, the identity's face (fixed when the job
//! was admitted) on its model.

use super::identity::face_kit;
use super::{Encoded, input, off_runtime, store_result};
use crate::context::WorkerContext;
use crate::faces::identity as faces;
use crate::faces::swap::swap_face;
use crate::faces::swapper::IdentityFace;
use crate::failure::TaskFailure;
use crate::imaging;
use atelier_shared::domain::packshot::ImageFormat;
use atelier_shared::domain::swap::SwapSpec;
use atelier_shared::domain::{OutputResult, Task};
use atelier_shared::storage::StorageError;
use image::DynamicImage;

/// `model_swap`: one product photo, the identity's face on its model.
pub(super) async fn run(
    ctx: &WorkerContext,
    task: &Task,
    spec: &SwapSpec,
) -> Result<OutputResult, TaskFailure> {
    let kit = face_kit(ctx)?;
    let index = task.output.instruction_index as usize;
    let image = spec
        .images
        .get(index)
        .ok_or_else(|| TaskFailure::permanent("image index out of range"))?
        .clone();
    // The face fixed when the job was admitted, whatever replaced it since.
    let face = task
        .inputs
        .face
        .clone()
        .ok_or_else(|| TaskFailure::permanent("the job names no identity face"))?;
    let photo = input(ctx, task, &image.file_id).await?;
    // The identity's objects are erased with it (deleting an identity that
    // a job still uses is refused, so this only meets a vanished object).
    let gone = |e: StorageError| match e {
        StorageError::NotFound(_) => {
            TaskFailure::permanent("the identity's face is gone (the identity was deleted)")
        }
        other => other.into(),
    };
    let crop = ctx.objects.get(&face.crop_key).await.map_err(gone)?;
    let embedding = ctx
        .objects
        .get(&face.record.embedding_key)
        .await
        .map_err(gone)?;
    let embedding = faces::embedding_from_bytes(&embedding).map_err(|e| {
        TaskFailure::permanent(format!("the identity's embedding is unreadable: {e}"))
    })?;
    let record = face.record;
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
        let identity = IdentityFace {
            crop: imaging::decode_limited(&crop, max_pixels)?.to_rgb8(),
            landmarks: record.landmarks,
            embedding,
        };
        let (s, engine) = swap_face(&kit, &target, &identity, equalise)?;
        let rgba = DynamicImage::ImageRgb8(s.image.clone()).to_rgba8();
        let full = imaging::encode(&rgba, ImageFormat::Jpg)?;
        let thumb = imaging::thumbnail(&rgba)?;
        Ok((full, thumb, (s, engine)))
    })
    .await?;
    let (swapped, engine) = swapped;
    let (full_key, thumb_key) = store_result(
        ctx,
        &task.run_base(),
        Encoded {
            full,
            format: ImageFormat::Jpg,
            thumb,
        },
    )
    .await?;
    Ok(OutputResult {
        full_key,
        thumb_key,
        format: ImageFormat::Jpg.ext().to_string(),
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
