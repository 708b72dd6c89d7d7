//! The pipeline seam. An [`Engine`] turns one planned output into pixels;
//! the [`Pipeline`] around it picks the engine, decodes inputs, encodes the
//! result and its thumbnail and times every stage. The ONNX stages of the
//! inference issue are further engines behind the same trait.

use crate::failure::TaskFailure;
use crate::imaging;
use atelier_shared::config::EngineRoute;
use atelier_shared::domain::packshot::{EngineChoice, InstructionSpec, PackshotSpec, Style};
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

impl RenderRequest<'_> {
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

/// Encoded artefacts of one output.
pub struct PipelineOutput {
    pub full: Vec<u8>,
    pub thumb: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub model_used: String,
    pub description: serde_json::Value,
    /// Whether the post-processing pass ran on this output.
    pub post_processed: bool,
}

/// The engines of one worker: the `auto` chain, tried in order on
/// refusals, and the routes clients may name (`options.model`).
#[derive(Clone)]
pub struct Pipeline {
    auto: Vec<Arc<dyn Engine>>,
    routes: Vec<(EngineChoice, Arc<dyn Engine>)>,
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline::new(vec![Arc::new(BasicEngine)])
    }
}

impl Pipeline {
    /// A pipeline whose `auto` chain is `engines` and that has no routes.
    pub fn new(engines: Vec<Arc<dyn Engine>>) -> Pipeline {
        Pipeline {
            auto: engines,
            routes: Vec::new(),
        }
    }

    /// Adds (or replaces) the engine that serves `options.model = choice`.
    pub fn with_route(mut self, choice: EngineChoice, engine: Arc<dyn Engine>) -> Pipeline {
        self.routes.retain(|(c, _)| *c != choice);
        self.routes.push((choice, engine));
        self
    }

    /// The engines an output of `model` may use, in fallback order.
    fn chain(&self, model: EngineChoice) -> Result<Vec<Arc<dyn Engine>>, TaskFailure> {
        if model == EngineChoice::Auto {
            return Ok(self.auto.clone());
        }
        self.routes
            .iter()
            .find(|(c, _)| *c == model)
            .map(|(_, e)| vec![e.clone()])
            .ok_or_else(|| {
                TaskFailure::permanent(format!(
                    "engine {} is not configured on this worker (engines.routes.{})",
                    model.as_str(),
                    model.as_str()
                ))
            })
    }

    /// The engines this worker can run, from configuration: the `atelier`
    /// engine when ONNX Runtime and the ISNet model load, otherwise the
    /// model-free `atelier-basic` (or an error when `models.required`).
    /// Blocking (loads and warms models): call from the blocking pool.
    pub fn from_config(
        cfg: &atelier_shared::config::Config,
    ) -> Result<Pipeline, crate::inference::InferenceError> {
        let rt = runtime(cfg);
        let opts = model_options(cfg);
        let loaded = rt.as_ref().map_err(Clone::clone).and_then(|rt| {
            crate::packshot::AtelierEngine::load(
                rt,
                &cfg.models.dir,
                &cfg.models.isnet,
                &cfg.models.upscaler,
                opts,
            )
        });
        let builtin: Arc<dyn Engine> = match loaded {
            Ok(engine) => Arc::new(engine),
            Err(e) if !cfg.models.required => {
                tracing::warn!(error = %e, "models unavailable: this worker runs the model-free `atelier-basic` engine (run scripts/fetch-models)");
                Arc::new(BasicEngine)
            }
            Err(e) => return Err(e),
        };

        // Routes the operator configured; one that cannot be set up stops
        // the worker (the API accepts jobs for it).
        let mut routes: Vec<(String, EngineChoice, Arc<dyn Engine>)> = Vec::new();
        for (name, route) in &cfg.engines.routes {
            let bad = |reason: String| crate::inference::InferenceError::Load {
                model: format!("engines.routes.{name}"),
                reason,
            };
            let choice = EngineChoice::parse(name)
                .filter(|c| *c != EngineChoice::Auto)
                .ok_or_else(|| bad("not an engine name clients can send".into()))?;
            let engine: Arc<dyn Engine> = match route {
                EngineRoute::Http {
                    url,
                    api_key_env,
                    timeout_secs,
                } => {
                    let token = match api_key_env {
                        Some(var) => Some(std::env::var(var).map_err(|_| {
                            bad(format!(
                                "environment variable {var} (its API key) is not set"
                            ))
                        })?),
                        None => None,
                    };
                    let handle = tokio::runtime::Handle::try_current()
                        .map_err(|_| bad("HTTP routes need a Tokio runtime".into()))?;
                    Arc::new(
                        crate::routes::HttpEngine::new(
                            choice,
                            url,
                            token,
                            std::time::Duration::from_secs(*timeout_secs),
                            handle,
                        )
                        .map_err(bad)?,
                    )
                }
                EngineRoute::Onnx {
                    file,
                    input_range,
                    output_range,
                    max_edge,
                } => {
                    let rt = rt.as_ref().map_err(Clone::clone)?;
                    let model = crate::inference::load_shared(
                        rt,
                        file.trim_end_matches(".onnx"),
                        &cfg.models.dir.join(file),
                        opts,
                    )?;
                    let range = |r: &str| {
                        crate::routes::Range::parse(r)
                            .ok_or_else(|| bad(format!("unknown range {r}")))
                    };
                    Arc::new(
                        crate::routes::OnnxEngine::new(
                            choice,
                            model,
                            range(input_range)?,
                            range(output_range)?,
                            *max_edge,
                        )
                        .map_err(bad)?,
                    )
                }
            };
            routes.push((name.clone(), choice, engine));
        }
        let mut auto = Vec::new();
        for name in &cfg.engines.auto {
            if name == "atelier" {
                auto.push(builtin.clone());
            } else if let Some((_, _, e)) = routes.iter().find(|(n, _, _)| n == name) {
                auto.push(e.clone());
            }
        }
        if auto.is_empty() {
            auto.push(builtin);
        }
        Ok(Pipeline {
            auto,
            routes: routes.into_iter().map(|(_, c, e)| (c, e)).collect(),
        })
    }

    /// Names of the engines, in `auto` order, then the named routes.
    pub fn engine_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.auto.iter().map(|e| e.name().to_string()).collect();
        names.extend(
            self.routes
                .iter()
                .map(|(c, e)| format!("{}={}", c.as_str(), e.name())),
        );
        names
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
        let chain = self.chain(req.spec.model)?;
        let engine = chain.get(engine_index).ok_or_else(|| {
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
        let mut rendered = engine.render(req)?;
        stage("render", t);
        let post_processed = req.spec.post_process;
        if post_processed {
            let t = Instant::now();
            let report = crate::postprocess::apply(&mut rendered.image, &rendered.post);
            stage("post_process", t);
            if let Some(d) = rendered.description.as_object_mut() {
                d.insert(
                    "post_processing".into(),
                    serde_json::to_value(&report).unwrap_or_default(),
                );
            }
        }
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
            post_processed,
        })
    }
}

pub(crate) fn stage(name: &'static str, since: Instant) {
    metrics::histogram!("atelier_task_duration_seconds", "type" => "packshot", "stage" => name)
        .record(since.elapsed().as_secs_f64());
}

/// The process's ONNX Runtime, as configured (`worker.device`, threads).
pub fn runtime(
    cfg: &atelier_shared::config::Config,
) -> Result<Arc<crate::inference::Runtime>, crate::inference::InferenceError> {
    use crate::inference::{Device, Runtime, RuntimeOptions};
    let device = if cfg.worker.device == "cuda" {
        Device::Cuda
    } else {
        Device::Cpu
    };
    Runtime::get(&RuntimeOptions {
        library: Some(cfg.models.onnxruntime_lib()),
        device,
        intra_threads: cfg.worker.inference_threads,
    })
}

/// Sessions and batching of every model, as configured.
pub fn model_options(cfg: &atelier_shared::config::Config) -> crate::inference::ModelOptions {
    crate::inference::ModelOptions {
        sessions: cfg.models.sessions,
        batch_window: std::time::Duration::from_millis(cfg.models.batch_window_ms),
        max_batch: cfg.models.max_batch,
    }
}
