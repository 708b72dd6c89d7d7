//! What every generative kind does with the fields of one output: pick the
//! generator route, draw, fit the picture to the requested canvas, encode,
//! store. The kinds' own files build the fields.

use super::{Encoded, off_runtime, store_result};
use crate::context::WorkerContext;
use crate::engines::cog::Generated;
use crate::failure::TaskFailure;
use crate::imaging;
use atelier_shared::domain::packshot::{EngineChoice, OutputSpec};
use atelier_shared::domain::{JobType, OutputResult, Task};
use base64::Engine as _;
use bytes::Bytes;
use image::RgbaImage;
use serde_json::{Map, Value};

/// Draws this attempt of the task's output with the route its kind and
/// `model` pick, at `out`'s size and format; `describe` adds the kind's own
/// keys to `input_description`, and so does `inspect`, which looks at the
/// final picture (on the blocking pool).
#[allow(clippy::too_many_arguments)]
pub(super) async fn draw(
    ctx: &WorkerContext,
    task: &Task,
    kind: JobType,
    model: EngineChoice,
    fields: &Map<String, Value>,
    out: &OutputSpec,
    describe: Map<String, Value>,
    inspect: impl FnOnce(&RgbaImage) -> Result<Map<String, Value>, TaskFailure> + Send + 'static,
) -> Result<OutputResult, TaskFailure> {
    let route = ctx.generators.pick(
        kind,
        model,
        task.output.engine_index,
        task.output.previous_refusal.as_deref(),
    )?;
    let Generated {
        image,
        model_used,
        mut description,
    } = route.generate(kind, fields).await?;
    description.extend(describe);
    let (width, height, format) = (out.width, out.height, out.format);
    let (encoded, seen) = off_runtime(ctx, move || {
        let canvas = imaging::cover(&image, width, height)?;
        let seen = inspect(&canvas)?;
        Ok((
            Encoded {
                full: imaging::encode(&canvas, format)?,
                format,
                thumb: imaging::thumbnail(&canvas)?,
            },
            seen,
        ))
    })
    .await?;
    description.extend(seen);
    let (full_key, thumb_key) = store_result(ctx, &task.run_base(), encoded).await?;
    Ok(OutputResult {
        full_key,
        thumb_key,
        format: format.ext().to_string(),
        width,
        height,
        model_used,
        processing_ms: 0,
        input_description: Value::Object(description),
        post_processed: false,
    })
}

/// A stored image as a data URL for a container, after the guarded decoder
/// has accepted it (JPEG, PNG or WebP, within `worker.max_input_pixels`):
/// the original bytes, so nothing is lost to re-encoding.
pub(super) async fn data_url(
    ctx: &WorkerContext,
    what: String,
    bytes: Bytes,
) -> Result<String, TaskFailure> {
    let max_pixels = ctx.max_input_pixels;
    off_runtime(ctx, move || {
        imaging::decode_limited(&bytes, max_pixels).map_err(|f| TaskFailure {
            kind: f.kind,
            message: format!("{what}: {}", f.message),
        })?;
        let mime = match image::guess_format(&bytes) {
            Ok(image::ImageFormat::Png) => "image/png",
            Ok(image::ImageFormat::WebP) => "image/webp",
            _ => "image/jpeg",
        };
        Ok(format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&bytes)
        ))
    })
    .await
}
