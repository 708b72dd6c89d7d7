//! Studio outputs (contract §9.4–9.5): `studio` (a generator route draws
//! the output from the prompt, the photos and the named subjects' faces)
//! and `studio_restore` (the built-in engine: each face of the photo that
//! matches a named profile gets that profile's face back, through the
//! model-swap blend). Both count the named subjects in what they return
//! (`known_subjects`), by face matching against the profiles' embeddings.

use super::generate::{data_url, draw};
use super::identity::face_kit;
use super::{Encoded, off_runtime, store_result};
use crate::context::WorkerContext;
use crate::faces::align::{self, cosine};
use crate::faces::identity as faces;
use crate::faces::kit::FaceKit;
use crate::faces::swap::blend_onto;
use crate::failure::TaskFailure;
use crate::imaging;
use atelier_shared::domain::identity::PhotoSource;
use atelier_shared::domain::packshot::{EngineChoice, OutputSpec};
use atelier_shared::domain::studio::{RestoreSpec, StudioMode, StudioSpec};
use atelier_shared::domain::{JobType, OutputResult, Task};
use atelier_shared::storage::StorageError;
use bytes::Bytes;
use image::{DynamicImage, RgbImage, RgbaImage};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Similarity at which a face in an output is taken for a named profile
/// (ArcFace cosine; the profile builds use the same bound).
const SAME_SUBJECT: f32 = 0.35;

/// A named profile, as the worker uses it.
#[derive(Clone)]
struct Subject {
    id: String,
    crop: Bytes,
    landmarks: [[f32; 2]; 5],
    embedding: Vec<f32>,
}

/// The profiles the job names, as resolved when it was admitted.
async fn subjects(ctx: &WorkerContext, task: &Task) -> Result<Vec<Subject>, TaskFailure> {
    let gone = |e: StorageError| match e {
        StorageError::NotFound(_) => {
            TaskFailure::permanent("a profile's face is gone (the profile was deleted)")
        }
        other => other.into(),
    };
    let mut out = Vec::with_capacity(task.inputs.profiles.len());
    for p in &task.inputs.profiles {
        let crop = ctx.objects.get(&p.face.crop_key).await.map_err(gone)?;
        let raw = ctx
            .objects
            .get(&p.face.record.embedding_key)
            .await
            .map_err(gone)?;
        let embedding = faces::embedding_from_bytes(&raw).map_err(|e| {
            TaskFailure::permanent(format!(
                "profile {}: unreadable embedding: {e}",
                p.profile_id
            ))
        })?;
        out.push(Subject {
            id: p.profile_id.clone(),
            crop,
            landmarks: p.face.record.landmarks,
            embedding,
        });
    }
    Ok(out)
}

/// The bytes of one photo of the call.
async fn photo(ctx: &WorkerContext, src: &PhotoSource, i: usize) -> Result<Bytes, TaskFailure> {
    match src {
        PhotoSource::Object { key, .. } => Ok(ctx.objects.get(key).await?),
        PhotoSource::Url { url } => crate::fetch::fetch(ctx, url)
            .await
            .map_err(|m| TaskFailure::permanent(format!("images[{i}]: {m}"))),
    }
}

/// How often each subject appears in `img`: every face found, matched to
/// the most similar subject at or above [`SAME_SUBJECT`].
fn count_subjects(
    kit: &FaceKit,
    img: &RgbImage,
    subjects: &[Subject],
) -> Result<BTreeMap<String, u32>, TaskFailure> {
    let mut counts: BTreeMap<String, u32> = subjects.iter().map(|s| (s.id.clone(), 0)).collect();
    if subjects.is_empty() {
        return Ok(counts);
    }
    let found = kit
        .detector
        .detect(img, kit.min_score)
        .map_err(|e| TaskFailure::retryable(format!("face detector: {e}")))?;
    for face in &found {
        if let Some(s) = best_match(kit, img, face, subjects)? {
            *counts.entry(s.id.clone()).or_default() += 1;
        }
    }
    Ok(counts)
}

/// The subject `face` shows, if any.
fn best_match<'a>(
    kit: &FaceKit,
    img: &RgbImage,
    face: &crate::faces::detect::Face,
    subjects: &'a [Subject],
) -> Result<Option<&'a Subject>, TaskFailure> {
    let emb = kit
        .embedder
        .embed(&align::align(img, face))
        .map_err(|e| TaskFailure::retryable(format!("face embedder: {e}")))?;
    Ok(subjects
        .iter()
        .map(|s| (cosine(&emb, &s.embedding), s))
        .filter(|(sim, _)| *sim >= SAME_SUBJECT)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, s)| s))
}

/// The canvas of an output: the ratio asked for, or (`auto`) the first
/// photo's shape, at the resolution's long edge.
fn canvas(spec: &StudioSpec, first: Option<(u32, u32)>) -> OutputSpec {
    let long = spec.resolution.long_edge();
    let (width, height, ar) = match (spec.aspect_ratio.fixed(), first) {
        (Some(ar), _) => {
            let (w, h) = ar.pixels(long);
            (w, h, Some(ar))
        }
        (None, Some((w, h))) if w > 0 && h > 0 => {
            let scale = f64::from(long) / f64::from(w.max(h));
            let side = |v: u32| (((f64::from(v) * scale) / 8.0).round() as u32 * 8).max(8);
            (side(w), side(h), None)
        }
        (None, _) => (long, long, None),
    };
    OutputSpec {
        size: spec.resolution,
        width,
        height,
        format: spec.format,
        custom: false,
        ar,
    }
}

/// `studio`: one output drawn by a generator route.
pub(super) async fn run(
    ctx: &WorkerContext,
    task: &Task,
    spec: &StudioSpec,
) -> Result<OutputResult, TaskFailure> {
    let variation = task.output.variation_index;
    let mut images = Vec::with_capacity(spec.images.len());
    let mut first = None;
    for (i, src) in spec.images.iter().enumerate() {
        let bytes = photo(ctx, src, i).await?;
        if first.is_none() {
            first = image::ImageReader::new(std::io::Cursor::new(&bytes))
                .with_guessed_format()
                .ok()
                .and_then(|r| r.into_dimensions().ok());
        }
        images.push(Value::String(
            data_url(ctx, format!("images[{i}]"), bytes).await?,
        ));
    }
    let named = subjects(ctx, task).await?;
    let mut faces_of = Vec::with_capacity(named.len());
    for s in &named {
        faces_of.push(Value::String(
            data_url(ctx, format!("profile {}", s.id), s.crop.clone()).await?,
        ));
    }
    let out = canvas(spec, first);
    let seed = task.output.seed(spec.seed_of(variation));
    let fields: Map<String, Value> = [
        ("prompt", json!(spec.generator_prompt())),
        ("client_prompt", json!(spec.prompt)),
        ("images", Value::Array(images)),
        ("subjects", Value::Array(faces_of)),
        ("profile_ids", json!(spec.profiles)),
        (
            "mode",
            json!(match spec.mode {
                StudioMode::Edit => "edit",
                StudioMode::Generate => "generate",
            }),
        ),
        ("seed", json!(seed)),
        ("width", json!(out.width)),
        ("height", json!(out.height)),
        (
            "aspect_ratio",
            json!(out.ar.map(|a| a.as_str()).unwrap_or_default()),
        ),
        ("variation", json!(variation)),
        ("format", json!(out.format)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let describe: Map<String, Value> = [("seed", json!(seed)), ("profiles", json!(spec.profiles))]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    // Counting needs the face models; a worker without them says so.
    let kit = ctx.faces.clone();
    let inspect = move |img: &RgbaImage| -> Result<Map<String, Value>, TaskFailure> {
        let mut m = Map::new();
        match kit {
            Some(kit) => {
                let rgb = DynamicImage::ImageRgba8(img.clone()).to_rgb8();
                m.insert(
                    "known_subjects".into(),
                    json!(count_subjects(&kit, &rgb, &named)?),
                );
            }
            None if !named.is_empty() => {
                m.insert("known_subjects".into(), json!(null));
                m.insert(
                    "known_subjects_error".into(),
                    json!("this worker has no face models to count subjects"),
                );
            }
            None => {
                m.insert("known_subjects".into(), json!({}));
            }
        }
        Ok(m)
    };
    draw(
        ctx,
        task,
        JobType::Studio,
        EngineChoice::Auto,
        &fields,
        &out,
        describe,
        inspect,
    )
    .await
}

/// `studio_restore`: output `v` restores photo `v mod n`. Every face in it
/// that matches a named profile gets that profile's face (the model-swap
/// blend: only a region around each face changes); the rest of the photo
/// is returned as it was, at its own size.
pub(super) async fn restore(
    ctx: &WorkerContext,
    task: &Task,
    spec: &RestoreSpec,
) -> Result<OutputResult, TaskFailure> {
    let spec = &spec.0;
    let kit: Arc<FaceKit> = face_kit(ctx)?;
    let n = spec.images.len().max(1);
    let index = task.output.variation_index as usize % n;
    let src = spec
        .images
        .get(index)
        .ok_or_else(|| TaskFailure::permanent("the call has no photo"))?;
    let bytes = photo(ctx, src, index).await?;
    let named = subjects(ctx, task).await?;
    let max_pixels = ctx.max_input_pixels;
    let format = spec.format;
    let (full, thumb, dims, restored, counts) = off_runtime(ctx, move || {
        let mut img = imaging::decode_limited(&bytes, max_pixels)
            .map_err(|f| TaskFailure {
                kind: f.kind,
                message: format!("images[{index}]: {}", f.message),
            })?
            .to_rgb8();
        let found = kit
            .detector
            .detect(&img, kit.min_score)
            .map_err(|e| TaskFailure::retryable(format!("face detector: {e}")))?;
        let mut restored = Vec::new();
        for face in &found {
            let Some(s) = best_match(&kit, &img, face, &named)? else {
                continue;
            };
            let crop = imaging::decode_limited(&s.crop, max_pixels)?.to_rgb8();
            let swapped = blend_onto(&img, face, &crop, &s.landmarks, false, found.len());
            img = swapped.image;
            restored.push(json!({"profile_id": s.id, "face_box": face.bbox.map(|v| v.round())}));
        }
        let counts = count_subjects(&kit, &img, &named)?;
        let rgba = DynamicImage::ImageRgb8(img).to_rgba8();
        let full = imaging::encode(&rgba, format)?;
        let thumb = imaging::thumbnail(&rgba)?;
        Ok((full, thumb, rgba.dimensions(), restored, counts))
    })
    .await?;
    let (full_key, thumb_key) = store_result(
        ctx,
        &task.run_base(),
        Encoded {
            full,
            format,
            thumb,
        },
    )
    .await?;
    Ok(OutputResult {
        full_key,
        thumb_key,
        format: format.ext().to_string(),
        width: dims.0,
        height: dims.1,
        model_used: "atelier-restore".into(),
        processing_ms: 0,
        input_description: json!({
            "image_index": index,
            "restored": restored,
            "known_subjects": counts,
        }),
        post_processed: false,
    })
}
