//! `identity_creation`: one draft portrait, drawn by a generator route
//! from the instruction's words (and its reference images, if any).

use super::generate::{data_url, draw};
use super::input;
use crate::context::WorkerContext;
use crate::failure::TaskFailure;
use atelier_shared::domain::drafts::{DraftSpec, ratio_name};
use atelier_shared::domain::{JobType, OutputResult, Task};
use serde_json::{Map, Value, json};

pub(super) async fn run(
    ctx: &WorkerContext,
    task: &Task,
    spec: &DraftSpec,
) -> Result<OutputResult, TaskFailure> {
    let ins = spec
        .instructions
        .get(task.output.instruction_index as usize)
        .ok_or_else(|| TaskFailure::permanent("instruction index out of range"))?;
    let mut references = Vec::with_capacity(ins.input_assets.len());
    for file_id in &ins.input_assets {
        let bytes = input(ctx, task, file_id).await?;
        references.push(Value::String(
            data_url(ctx, format!("input asset {file_id}"), bytes).await?,
        ));
    }
    let seed = task
        .output
        .seed(ins.variation_seed(task.output.variation_index));
    let fields: Map<String, Value> = [
        ("prompt", json!(ins.prompt)),
        (
            "client_prompt",
            json!(ins.client_prompt.clone().unwrap_or_default()),
        ),
        ("appearance", json!(ins.appearance)),
        ("face", json!(ins.face)),
        ("hair", json!(ins.hair)),
        ("references", Value::Array(references)),
        ("seed", json!(seed)),
        ("width", json!(ins.output.width)),
        ("height", json!(ins.output.height)),
        ("aspect_ratio", json!(ratio_name(&ins.output))),
        ("variation", json!(task.output.variation_index)),
        ("format", json!(ins.output.format)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let describe: Map<String, Value> = [
        ("seed", json!(seed)),
        ("appearance", json!(ins.appearance)),
        ("face", json!(ins.face)),
        ("hair", json!(ins.hair)),
        ("input_assets", json!(ins.input_assets)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    draw(
        ctx,
        task,
        JobType::IdentityCreation,
        spec.model,
        &fields,
        &ins.output,
        describe,
        |_| Ok(Map::new()),
    )
    .await
}
