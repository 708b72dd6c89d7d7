//! The pipeline seam. An [`Engine`] turns one planned output into pixels;
//! the [`Pipeline`] around it picks the engine, decodes inputs, encodes the
//! result and its thumbnail and times every stage. The ONNX stages of the
//! inference issue are further engines behind the same trait.

use crate::failure::TaskFailure;
use crate::imaging;
use atelier_shared::domain::packshot::{PackshotSpec, Style};
use image::{DynamicImage, RgbaImage};
use std::sync::Arc;
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
    pub inputs: &'a [Input],
}

pub struct Rendered {
    pub image: RgbaImage,
    /// What really ran, reported to clients as `model_used`.
    pub model_used: String,
    pub description: serde_json::Value,
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
    fn background(style: Style) -> [u8; 3] {
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
        let ins = req
            .spec
            .instructions
            .get(req.instruction_index)
            .ok_or_else(|| TaskFailure::permanent("instruction index out of range"))?;
        if req.inputs.is_empty() {
            return Err(TaskFailure::permanent("the job has no input image"));
        }
        // Variations cycle through the inputs (several views of one garment).
        let src = &req.inputs[req.variation_index as usize % req.inputs.len()];
        let image = imaging::fit(
            &src.image,
            ins.output.width,
            ins.output.height,
            Self::background(ins.style),
        )?;
        Ok(Rendered {
            image,
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

/// Encoded artefacts of one output.
pub struct PipelineOutput {
    pub full: Vec<u8>,
    pub thumb: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub model_used: String,
    pub description: serde_json::Value,
}

#[derive(Clone)]
pub struct Pipeline {
    engines: Vec<Arc<dyn Engine>>,
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline {
            engines: vec![Arc::new(BasicEngine)],
        }
    }
}

impl Pipeline {
    pub fn new(engines: Vec<Arc<dyn Engine>>) -> Pipeline {
        Pipeline { engines }
    }

    /// The engines this worker can run, from configuration: the `atelier`
    /// engine when ONNX Runtime and the ISNet model load, otherwise the
    /// model-free `atelier-basic` (or an error when `models.required`).
    /// Blocking (loads and warms models): call from the blocking pool.
    pub fn from_config(
        cfg: &atelier_shared::config::Config,
    ) -> Result<Pipeline, crate::inference::InferenceError> {
        use crate::inference::{Device, ModelOptions, Runtime, RuntimeOptions};
        let device = if cfg.worker.device == "cuda" {
            Device::Cuda
        } else {
            Device::Cpu
        };
        let rt = Runtime::get(&RuntimeOptions {
            library: Some(cfg.models.onnxruntime_lib()),
            device,
            intra_threads: cfg.worker.inference_threads,
        });
        let opts = ModelOptions {
            sessions: cfg.models.sessions,
            batch_window: std::time::Duration::from_millis(cfg.models.batch_window_ms),
            max_batch: cfg.models.max_batch,
        };
        let loaded = rt.and_then(|rt| {
            crate::packshot::AtelierEngine::load(
                &rt,
                &cfg.models.dir,
                &cfg.models.isnet,
                &cfg.models.upscaler,
                opts,
            )
        });
        match loaded {
            Ok(engine) => Ok(Pipeline {
                engines: vec![Arc::new(engine)],
            }),
            Err(e) if !cfg.models.required => {
                tracing::warn!(error = %e, "models unavailable: this worker runs the model-free `atelier-basic` engine (run scripts/fetch-models)");
                Ok(Pipeline::default())
            }
            Err(e) => Err(e),
        }
    }

    /// Names of the engines, in `auto` order.
    pub fn engine_names(&self) -> Vec<&'static str> {
        self.engines.iter().map(|e| e.name()).collect()
    }

    /// Runs engine `engine_index` (the `auto` fallback order) on one output.
    /// `previous_refusal` is why the engine before it refused, if one did.
    /// Synchronous and CPU-bound: call it from the blocking pool.
    pub fn run(
        &self,
        req: &RenderRequest<'_>,
        engine_index: usize,
        previous_refusal: Option<&str>,
    ) -> Result<PipelineOutput, TaskFailure> {
        let engine = self.engines.get(engine_index).ok_or_else(|| {
            TaskFailure::permanent(match previous_refusal {
                Some(why) => {
                    format!("every configured engine refused this content; last refusal: {why}")
                }
                None => "no engine left to try for this output".to_string(),
            })
        })?;
        let ins = &req.spec.instructions[req
            .instruction_index
            .min(req.spec.instructions.len().saturating_sub(1))];
        let t = Instant::now();
        let rendered = engine.render(req)?;
        stage("render", t);
        let t = Instant::now();
        let full = imaging::encode(&rendered.image, ins.output.format)?;
        stage("encode", t);
        let t = Instant::now();
        let thumb = imaging::thumbnail(&rendered.image)?;
        stage("thumbnail", t);
        let (width, height) = rendered.image.dimensions();
        Ok(PipelineOutput {
            full,
            thumb,
            width,
            height,
            model_used: rendered.model_used,
            description: rendered.description,
        })
    }
}

pub(crate) fn stage(name: &'static str, since: Instant) {
    metrics::histogram!("atelier_task_duration_seconds", "type" => "packshot", "stage" => name)
        .record(since.elapsed().as_secs_f64());
}
