//! `prediction` (seed 001): one image drawn by a generator route with the
//! weights of trained custom models, handed over as signed URLs with their
//! scales.

use super::generate::draw;
use crate::context::WorkerContext;
use crate::failure::TaskFailure;
use atelier_shared::domain::credits::SizeClass;
use atelier_shared::domain::packshot::{EngineChoice, OutputSpec};
use atelier_shared::domain::prediction::PredictionSpec;
use atelier_shared::domain::{JobType, OutputResult, Task};
use serde_json::{Map, json};

pub(super) async fn run(
    ctx: &WorkerContext,
    task: &Task,
    spec: &PredictionSpec,
) -> Result<OutputResult, TaskFailure> {
    if task.weights_urls.len() != spec.loras.len() {
        return Err(TaskFailure::retryable(
            "the task carries no signed weights URLs (an older scheduler sent it)",
        ));
    }
    let index = task.output.variation_index;
    let seed = task.output.seed(spec.seed_of(index));
    let fields = spec.fields(index, seed, &task.weights_urls);
    let out = OutputSpec {
        size: SizeClass::for_custom(spec.width, spec.height),
        width: spec.width,
        height: spec.height,
        format: spec.output_format,
        custom: true,
        ar: None,
    };
    let mut describe = Map::new();
    describe.insert("seed".into(), json!(seed));
    describe.insert(
        "loras".into(),
        json!(
            spec.loras
                .iter()
                .map(|l| json!({"modelId": l.model_id, "trainingId": l.training_id, "scale": l.scale}))
                .collect::<Vec<_>>()
        ),
    );
    draw(
        ctx,
        task,
        JobType::Prediction,
        EngineChoice::Auto,
        &fields,
        &out,
        describe,
        |_| Ok(Map::new()),
    )
    .await
}
