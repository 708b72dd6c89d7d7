//! The engine seam. An [`Engine`] turns one planned packshot output into
//! pixels; the [`super::Pipeline`] around it picks the engine, runs the
//! stages after it and times every stage. The built-in `atelier` engine,
//! the model-free [`BasicEngine`] and the operator's routes all implement it.

use crate::failure::TaskFailure;
use crate::imaging;
use atelier_shared::domain::WorkQueue;
use atelier_shared::domain::packshot::{InstructionSpec, PackshotSpec, Style};
use image::{DynamicImage, RgbaImage};
use std::time::Instant;

/// One input image, decoded.
pub struct Input {
    pub file_id: String,
    pub image: DynamicImage,
}

/// What an engine is asked to produce: output `(instruction, variation)` of a packshot job.
pub struct RenderRequest<'a> {
    pub spec: &'a PackshotSpec,
    pub instruction_index: usize,
    pub variation_index: u32,
    /// 0 for the original output, +1 per regeneration.
    pub version: u32,
    pub inputs: &'a [Input],
    /// Fires when the task is dropped (its job aborted, the worker
    /// stopping): engines that wait on something remote give up then.
    pub stop: Option<tokio_util::sync::CancellationToken>,
}

impl RenderRequest<'_> {
    /// The seed of this output: its variation's, moved on per regeneration
    /// so that a regenerated output is drawn anew.
    pub fn seed(&self, ins: &InstructionSpec) -> u32 {
        atelier_shared::domain::task::regeneration_seed(
            ins.variation_seed(self.variation_index),
            self.version,
        )
    }

    /// The instruction this output belongs to.
    pub fn instruction(&self) -> Result<&InstructionSpec, TaskFailure> {
        self.spec
            .instructions
            .get(self.instruction_index)
            .ok_or_else(|| TaskFailure::permanent("instruction index out of range"))
    }

    /// The input this variation works from: variations cycle through the
    /// inputs (several views of one garment).
    pub fn source(&self) -> Result<&Input, TaskFailure> {
        if self.inputs.is_empty() {
            return Err(TaskFailure::permanent("the job has no input image"));
        }
        Ok(&self.inputs[self.variation_index as usize % self.inputs.len()])
    }
}

pub struct Rendered {
    pub image: RgbaImage,
    /// What really ran, reported to clients as `model_used`.
    pub model_used: String,
    pub description: serde_json::Value,
    /// What the post-processing pass needs (reference colours, garment region).
    pub post: crate::postprocess::PostContext,
}

pub trait Engine: Send + Sync {
    fn name(&self) -> &'static str;
    fn render(&self, req: &RenderRequest<'_>) -> Result<Rendered, TaskFailure>;
}

/// The built-in engine without a model stage: it frames the chosen input on
/// the style's background at the requested size. It says so in
/// `model_used` and `input_description` instead of claiming a cutout.
pub struct BasicEngine;

impl BasicEngine {
    /// The plain canvas colour of a style, for engines that letterbox
    /// (this one and the engine routes).
    pub fn background(style: Style) -> [u8; 3] {
        match style {
            Style::WhiteCutout | Style::GhostMannequin => [255, 255, 255],
            Style::FlatLay => [240, 236, 228],
            Style::MarketingReady | Style::Free => [236, 236, 236],
        }
    }
}

impl Engine for BasicEngine {
    fn name(&self) -> &'static str {
        "atelier-basic"
    }

    fn render(&self, req: &RenderRequest<'_>) -> Result<Rendered, TaskFailure> {
        let ins = req.instruction()?;
        let src = req.source()?;
        let image = imaging::fit(
            &src.image,
            ins.output.width,
            ins.output.height,
            Self::background(ins.style),
        )?;
        Ok(Rendered {
            image,
            post: crate::postprocess::PostContext::whole_source(&src.image),
            model_used: self.name().to_string(),
            description: serde_json::json!({
                "engine": self.name(),
                "note": "geometric framing only: the input is scaled onto the style background; no segmentation or generative model ran",
                "source_file_id": src.file_id,
                "style": ins.style,
            }),
        })
    }
}

pub(crate) fn stage(name: &'static str, since: Instant) {
    metrics::histogram!("atelier_task_duration_seconds", "type" => WorkQueue::Packshot.as_str(), "stage" => name)
        .record(since.elapsed().as_secs_f64());
}
