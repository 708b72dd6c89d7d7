//! `flat_2_model`: one on-model image of the identity wearing every garment
//! of the job, drawn by a generator route.

use super::generate::{data_url, draw};
use super::input;
use crate::context::WorkerContext;
use crate::failure::TaskFailure;
use atelier_shared::domain::flat::{FlatSpec, prompt_for};
use atelier_shared::domain::{JobType, OutputResult, Task};
use atelier_shared::storage::StorageError;
use serde_json::{Map, Value, json};

pub(super) async fn run(
    ctx: &WorkerContext,
    task: &Task,
    spec: &FlatSpec,
) -> Result<OutputResult, TaskFailure> {
    let ins = spec
        .instructions
        .get(task.output.instruction_index as usize)
        .ok_or_else(|| TaskFailure::permanent("instruction index out of range"))?;
    // The face fixed when the job was admitted, whatever replaced it since.
    let face = task
        .inputs
        .face
        .as_ref()
        .ok_or_else(|| TaskFailure::permanent("the job names no identity face"))?;
    let crop = ctx.objects.get(&face.crop_key).await.map_err(|e| match e {
        StorageError::NotFound(_) => {
            TaskFailure::permanent("the identity's face is gone (the identity was deleted)")
        }
        other => other.into(),
    })?;
    let identity = data_url(ctx, "the identity's face".into(), crop).await?;
    let mut garments = Vec::with_capacity(spec.images.len());
    let mut notes = Vec::with_capacity(spec.images.len());
    for img in &spec.images {
        let bytes = input(ctx, task, &img.file_id).await?;
        garments.push(Value::String(
            data_url(ctx, format!("input {}", img.file_id), bytes).await?,
        ));
        notes.push(json!(img.note.clone().unwrap_or_default()));
    }
    let seed = task
        .output
        .seed(ins.variation_seed(task.output.variation_index));
    let anchor_seed = if spec.use_anchor {
        spec.instructions
            .get(spec.anchor_index as usize)
            .map_or(seed, |a| a.seed)
    } else {
        seed
    };
    let fields: Map<String, Value> = [
        ("identity", json!(identity)),
        ("garments", Value::Array(garments)),
        ("garment_notes", Value::Array(notes)),
        ("prompt", json!(prompt_for(spec, ins))),
        ("client_prompt", json!(ins.prompt)),
        ("pose", json!(ins.pose.clone().unwrap_or_default())),
        (
            "background",
            json!(
                ins.background
                    .as_ref()
                    .and_then(|b| b.text.clone())
                    .unwrap_or_default()
            ),
        ),
        ("scene", json!(ins.scene)),
        ("barefoot", json!(spec.barefoot)),
        ("seed", json!(seed)),
        ("width", json!(ins.output.width)),
        ("height", json!(ins.output.height)),
        ("variation", json!(task.output.variation_index)),
        ("format", json!(ins.output.format)),
        ("anchor_seed", json!(anchor_seed)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let describe: Map<String, Value> = [
        ("identity_code", json!(spec.identity_code)),
        (
            "garment_file_ids",
            json!(spec.images.iter().map(|i| &i.file_id).collect::<Vec<_>>()),
        ),
        ("seed", json!(seed)),
        ("pose", json!(ins.pose)),
        ("anchor_seed", json!(spec.use_anchor.then_some(anchor_seed))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    draw(
        ctx,
        task,
        JobType::Flat2Model,
        spec.model,
        &fields,
        &ins.output,
        describe,
        |_| Ok(Map::new()),
    )
    .await
}
