//! Response shapes of the contract, built from store rows.

use crate::AppState;
use crate::error::ApiError;
use atelier_shared::db::jobs::{JobRow, OutputRow};
use atelier_shared::db::projects::Project;
use atelier_shared::domain::OutputStatus;
use atelier_shared::storage::content_type_of;
use atelier_shared::time::iso8601;
use serde_json::{Value, json};
use std::time::Duration;

pub fn pagination(page: i64, per_page: i64, total: i64) -> Value {
    let pages = if total == 0 {
        0
    } else {
        (total + per_page - 1) / per_page
    };
    json!({"page": page, "per_page": per_page, "total": total, "pages": pages, "has_next": page < pages, "has_prev": page > 1})
}

pub fn project(p: &Project) -> Value {
    json!({
        "project_id": p.id, "project_key": p.id, "project_name": p.name, "project_text": p.name,
        "created_at": iso8601(p.created_at), "created_by": p.created_by, "total_images": p.total_images,
    })
}

/// `JobStatus` (contract §3.9).
pub fn job_status(j: &JobRow) -> Value {
    let processing_options: Value = serde_json::from_str(&j.spec).unwrap_or(Value::Null);
    json!({
        "job_id": j.id,
        "job_type": j.job_type,
        "status": j.status,
        "progress": j.progress(),
        "total_images": j.total_outputs,
        "processed_images": j.processed(),
        "should_post_process": j.should_post_process == 1,
        "post_processing_status": j.post_processing_status,
        "post_processing_error": j.post_processing_error,
        "error_message": j.error_message,
        "identity_code": j.identity_code,
        "identity_name": Value::Null,
        "project_id": j.project_id,
        "project_key": j.project_id,
        "project_text": j.project_name,
        "processing_options": processing_options,
        "credits_reserved": j.credits_held as f64 / 1000.0,
        "created_at": iso8601(j.created_at),
        "updated_at": iso8601(j.updated_at),
    })
}

/// `ImageResult` (contract §3.10). URLs are signed for `ttl`.
pub async fn image_result(
    state: &AppState,
    job: &JobRow,
    o: &OutputRow,
    inputs: &Value,
    ttl: Duration,
) -> Result<Value, ApiError> {
    let url = |k: Option<&String>| {
        let k = k.cloned();
        async move {
            match k {
                Some(k) => state
                    .object_url(&k, content_type_of(&k), ttl)
                    .await
                    .map(Value::String),
                None => Ok(Value::Null),
            }
        }
    };
    let status = o.status();
    let description: Value = o
        .input_description
        .as_deref()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or(json!({}));
    let ext = &o.output_format;
    Ok(json!({
        "id": o.id,
        "image_result_id": o.id,
        "job_id": job.id,
        "image_index": o.instruction_index,
        "group_index": o.variation_index,
        "instruction_index": o.instruction_index,
        "variation_index": o.variation_index,
        "version": o.version,
        "status": status.public(),
        "original_filename": format!("{}_{}.{}", o.instruction_index, o.variation_index, ext),
        "download_filename": format!("{}_{}_{}_v{}.{}", job.id, o.instruction_index, o.variation_index, o.version, ext),
        "inputs": inputs,
        "output": {"full_size": url(o.full_key.as_ref()).await?, "thumbnail": url(o.thumb_key.as_ref()).await?},
        "output_format": ext,
        "model_used": o.model_used,
        "input_description": description,
        "quality_score": Value::Null,
        "processing_time": o.processing_ms.map(|ms| ms as f64 / 1000.0),
        "error_message": if matches!(status, OutputStatus::Failed | OutputStatus::Cancelled) { json!(o.error_message) } else { Value::Null },
        "feedback": Value::Null,
        "feedback_comment": Value::Null,
        "created_at": iso8601(o.created_at),
    }))
}
