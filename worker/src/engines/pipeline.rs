//! The [`Pipeline`]: the engines of one worker, picked per output (the
//! `auto` chain with fallback on refusals, or the route a client named),
//! and the stages around the engine: post-processing, encoding, thumbnail.

use super::atelier::AtelierEngine;
use super::cog::CogEngine;
use super::engine::{BasicEngine, Engine, RenderRequest, stage};
use super::generators::Generators;
use super::routes::{HttpEngine, OnnxEngine};
use crate::failure::TaskFailure;
use crate::imaging;
use atelier_shared::config::{AutoEngine, EngineRoute, EngineTargets};
use atelier_shared::domain::JobType;
use atelier_shared::domain::packshot::{EngineChoice, Style};
use std::sync::Arc;
use std::time::Instant;

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
    /// The built-in engine when its models loaded: its segmenter also
    /// serves image analysis (preset extraction).
    segmenter: Option<Arc<AtelierEngine>>,
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
            segmenter: None,
        }
    }

    /// The segmenter (ISNet), when this worker loaded it.
    pub fn segmenter(&self) -> Option<&AtelierEngine> {
        self.segmenter.as_deref()
    }

    /// Adds (or replaces) the engine that serves `options.model = choice`.
    pub fn with_route(mut self, choice: EngineChoice, engine: Arc<dyn Engine>) -> Pipeline {
        self.routes.retain(|(c, _)| *c != choice);
        self.routes.push((choice, engine));
        self
    }

    /// The engines an output of `model` may use, in fallback order.
    fn chain(
        &self,
        model: EngineChoice,
        style: Style,
    ) -> Result<Vec<Arc<dyn Engine>>, TaskFailure> {
        if model == EngineChoice::Auto {
            if style == Style::MarketingReady {
                // Lifestyle scenes are what generators are for: the
                // operator's routes in the `auto` order come before the
                // built-in engine, whose lit scene is procedural.
                let (routes, builtin): (Vec<_>, Vec<_>) = self
                    .auto
                    .iter()
                    .cloned()
                    .partition(|e| self.routes.iter().any(|(_, r)| Arc::ptr_eq(r, e)));
                return Ok(routes.into_iter().chain(builtin).collect());
            }
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
    /// Also returns the generator routes (every Cog route), which draw the
    /// generative kinds.
    pub fn from_config(
        cfg: &atelier_shared::config::Config,
        engines: &EngineTargets,
    ) -> Result<(Pipeline, Generators), crate::inference::InferenceError> {
        let rt = crate::inference::runtime_for(cfg);
        let opts = crate::inference::ModelOptions::from_config(cfg);
        let loaded = rt.as_ref().map_err(Clone::clone).and_then(|rt| {
            AtelierEngine::load(
                rt,
                &cfg.models.dir,
                &cfg.models.isnet,
                &cfg.models.upscaler,
                opts,
            )
            .map(|mut e| {
                e.upscale_above = cfg.models.upscale_above;
                e
            })
        });
        let mut segmenter = None;
        let builtin: Arc<dyn Engine> = match loaded {
            Ok(engine) => {
                let engine = Arc::new(engine);
                segmenter = Some(engine.clone());
                engine
            }
            Err(e) if !cfg.models.required => {
                tracing::warn!(error = %e, "models unavailable: this worker runs the model-free `atelier-basic` engine (run scripts/fetch-models)");
                Arc::new(BasicEngine)
            }
            Err(e) => return Err(e),
        };

        // Routes the operator configured; one that cannot be set up stops
        // the worker (the API accepts jobs for it).
        let mut routes: Vec<(EngineChoice, Arc<dyn Engine>)> = Vec::new();
        let mut generators: Vec<(EngineChoice, Arc<CogEngine>)> = Vec::new();
        for (choice, route) in &engines.routes {
            let choice = *choice;
            let bad = |reason: String| crate::inference::InferenceError::Load {
                model: format!("engines.routes.{}", choice.as_str()),
                reason,
            };
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
                        HttpEngine::new(
                            choice,
                            url,
                            token,
                            std::time::Duration::from_secs(*timeout_secs),
                            handle,
                        )
                        .map_err(bad)?,
                    )
                }
                EngineRoute::Cog {
                    url,
                    timeout_secs,
                    slots,
                    startup_secs,
                    inputs,
                } => {
                    let handle = tokio::runtime::Handle::try_current()
                        .map_err(|_| bad("Cog routes need a Tokio runtime".into()))?;
                    let engine = Arc::new(
                        CogEngine::connect(
                            choice,
                            url,
                            inputs,
                            std::time::Duration::from_secs(*timeout_secs),
                            *slots,
                            std::time::Duration::from_secs(*startup_secs),
                            handle,
                        )
                        .map_err(|e| bad(e.to_string()))?,
                    );
                    generators.push((choice, engine.clone()));
                    if !route.serves(JobType::CreatePackshot) {
                        continue;
                    }
                    engine
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
                    Arc::new(
                        OnnxEngine::new(choice, model, *input_range, *output_range, *max_edge)
                            .map_err(bad)?,
                    )
                }
            };
            routes.push((choice, engine));
        }
        let generators = Generators::new(generators, engines);
        let auto = engines
            .auto_for(JobType::CreatePackshot)
            .iter()
            .filter_map(|a| match a {
                AutoEngine::Builtin => Some(builtin.clone()),
                AutoEngine::Route(choice) => routes
                    .iter()
                    .find(|(c, _)| c == choice)
                    .map(|(_, e)| e.clone()),
            })
            .collect::<Vec<_>>();
        let auto = if auto.is_empty() { vec![builtin] } else { auto };
        Ok((
            Pipeline {
                auto,
                routes,
                segmenter,
            },
            generators,
        ))
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
        let ins = &req.spec.instructions[req
            .instruction_index
            .min(req.spec.instructions.len().saturating_sub(1))];
        let chain = self.chain(req.spec.model, ins.style)?;
        let engine = chain.get(engine_index).ok_or_else(|| {
            TaskFailure::permanent(match previous_refusal {
                Some(why) => {
                    format!("every configured engine refused this content; last refusal: {why}")
                }
                None => "no engine left to try for this output".to_string(),
            })
        })?;
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
