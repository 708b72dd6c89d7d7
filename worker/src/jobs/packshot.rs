//! `create_packshot`: decode the inputs, render one output with the
//! engine its instruction and the fallback order pick, upload.

use super::{Encoded, input, off_runtime, store_result};
use crate::context::WorkerContext;
use crate::engines::engine::stage;
use crate::engines::{Input, RenderRequest};
use crate::failure::TaskFailure;
use crate::imaging;
use atelier_shared::domain::packshot::PackshotSpec;
use atelier_shared::domain::{OutputResult, Task};
use std::time::Instant;

pub(super) async fn run(
    ctx: &WorkerContext,
    task: &Task,
    spec: &PackshotSpec,
) -> Result<OutputResult, TaskFailure> {
    let t = Instant::now();
    let mut raw = Vec::with_capacity(spec.images.len());
    for img in &spec.images {
        raw.push((img.file_id.clone(), input(ctx, task, &img.file_id).await?));
    }
    stage("download", t);

    let pipeline = ctx.pipeline.clone();
    let max_pixels = ctx.max_input_pixels;
    // Cancelled when this task is dropped (an abort): a remote engine's
    // prediction is then cancelled instead of running on.
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let spec = spec.clone();
    let output = task.output.clone();
    let (out, format) = off_runtime(ctx, move || {
        let t = Instant::now();
        let inputs = raw
            .into_iter()
            .map(|(file_id, bytes)| {
                imaging::decode_limited(&bytes, max_pixels)
                    .map(|image| Input {
                        file_id: file_id.clone(),
                        image,
                    })
                    .map_err(|f| TaskFailure {
                        kind: f.kind,
                        message: format!("input {file_id}: {}", f.message),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        stage("decode", t);
        let ins = output.instruction_index as usize;
        let format = spec
            .instructions
            .get(ins)
            .ok_or_else(|| TaskFailure::permanent("instruction index out of range"))?
            .output
            .format;
        let req = RenderRequest {
            spec: &spec,
            instruction_index: ins,
            variation_index: output.variation_index,
            version: output.version,
            inputs: &inputs,
            stop: Some(stop.clone()),
        };
        let out = pipeline.run(
            &req,
            output.engine_index as usize,
            output.previous_refusal.as_deref(),
        )?;
        Ok((out, format))
    })
    .await?;

    let t = Instant::now();
    let (full_key, thumb_key) = store_result(
        ctx,
        &task.run_base(),
        Encoded {
            full: out.full,
            format,
            thumb: out.thumb,
        },
    )
    .await?;
    stage("upload", t);
    Ok(OutputResult {
        full_key,
        thumb_key,
        format: format.ext().to_string(),
        width: out.width,
        height: out.height,
        model_used: out.model_used,
        processing_ms: 0,
        input_description: out.description,
        post_processed: out.post_processed,
    })
}
