//! Predictions (contract §7, seed 001): `POST /v1/predictions` generates
//! with the weights of one or more succeeded trainings, `GET` shows its
//! status and images, `DELETE` soft-deletes it.

use crate::admission::{job_trace, refusal};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonValue;
use crate::state::AppState;
use atelier_shared::db::jobs::{Admission, NewJob};
use atelier_shared::domain::packshot::ImageFormat;
use atelier_shared::domain::prediction::{LoraRef, PredictionSpec};
use atelier_shared::domain::{JobSpec, JobStatus, JobType, OutputStatus};
use atelier_shared::time::iso8601;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Most trained models one prediction combines.
const MAX_LORAS: usize = 5;

fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(Some(field), message, "body")
}

fn number(v: &Value, field: &str, lo: f64, hi: f64) -> ApiResult<f64> {
    match v.as_f64() {
        Some(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(bad(field, format!("must be a number from {lo} to {hi}"))),
    }
}

fn whole(v: &Value, field: &str, lo: u64, hi: u64) -> ApiResult<u64> {
    match v.as_u64() {
        Some(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(bad(field, format!("must be a whole number from {lo} to {hi}"))),
    }
}

fn text<'a>(v: &'a Value, field: &str) -> ApiResult<&'a str> {
    v.as_str()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| bad(field, "is required and must be a non-empty string"))
}

/// Generate with trained models.
#[utoipa::path(
    post, path = "/v1/predictions", tag = "custom models",
    request_body = Object,
    responses(
        (status = 202, description = "`{predictionId, warnings?}`", body = Object),
        (status = 400, description = "A value out of range, no scaleConfigs, or a training of another model", body = crate::error::ErrorBody),
        (status = 402, description = "Not enough credits", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown model or training", body = crate::error::ErrorBody),
        (status = 409, description = "A referenced training has not succeeded", body = crate::error::ErrorBody),
    ),
)]
pub async fn create(
    State(s): State<AppState>,
    Caller(acc): Caller,
    headers: axum::http::HeaderMap,
    body: JsonValue,
) -> ApiResult<Response> {
    let b = body.0;
    if !b.is_object() {
        return Err(ApiError::bad_request(None, "the body must be a JSON object", "body"));
    }
    let prompt = text(&b["prompt"], "prompt")?;
    if prompt.chars().count() > 4000 {
        return Err(bad("prompt", "must be at most 4000 characters"));
    }
    let seed = match &b["seed"] {
        Value::Null => rand::random::<u32>(),
        v => whole(v, "seed", 0, u64::from(u32::MAX))? as u32,
    };
    let (width, height) = match &b["image_size"] {
        Value::Null => (1024, 1024),
        Value::Object(o) => {
            let side = |k: &str| -> ApiResult<u32> {
                let field = format!("image_size.{k}");
                let n = whole(o.get(k).unwrap_or(&Value::Null), &field, 512, 1536)?;
                if n % 8 != 0 {
                    return Err(bad(&field, "must be a multiple of 8"));
                }
                Ok(n as u32)
            };
            (side("width")?, side("height")?)
        }
        _ => return Err(bad("image_size", "must be {\"width\", \"height\"}")),
    };
    let num_images = match &b["num_images"] {
        Value::Null => 1,
        v => whole(v, "num_images", 1, 4)? as u32,
    };
    let output_format = match b["output_format"].as_str() {
        None if b["output_format"].is_null() => ImageFormat::Jpg,
        Some("jpeg") => ImageFormat::Jpg,
        Some("png") => ImageFormat::Png,
        _ => return Err(bad("output_format", "must be `jpeg` or `png`")),
    };
    let guidance_scale = match &b["guidance_scale"] {
        Value::Null => 7.5,
        v => number(v, "guidance_scale", 0.0, 10.0)?,
    };
    let num_inference_steps = match &b["num_inference_steps"] {
        Value::Null => 30,
        v => whole(v, "num_inference_steps", 1, 50)? as u32,
    };
    let configs: &Map<String, Value> = b["scaleConfigs"]
        .as_object()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("scaleConfigs", "is required: an object of at least one {scale, modelId, trainingId}"))?;
    if configs.len() > MAX_LORAS {
        return Err(bad("scaleConfigs", format!("combines at most {MAX_LORAS} models")));
    }
    let mut slots: Vec<(u32, &String, &Value)> = Vec::with_capacity(configs.len());
    for (k, v) in configs {
        let n = k
            .parse::<u32>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| bad(&format!("scaleConfigs.{k}"), "keys are \"1\", \"2\", …"))?;
        slots.push((n, k, v));
    }
    slots.sort_by_key(|(n, _, _)| *n);
    let mut loras = Vec::with_capacity(slots.len());
    let mut warnings = Vec::new();
    for (_, k, v) in slots {
        let field = |f: &str| format!("scaleConfigs.{k}.{f}");
        let scale = number(&v["scale"], &field("scale"), 0.0, 1.0)?;
        let model_id = text(&v["modelId"], &field("modelId"))?;
        let not_its_training = |t: &str| {
            bad(
                &field("trainingId"),
                format!("training {t} is not a training of model {model_id}"),
            )
        };
        let (weights, trigger) = if model_id.starts_with("model_") {
            // A Models API model (§8): the weights of its selected epoch.
            let row = crate::routes::models_api::model_of(&s, &acc.id, model_id).await?;
            if let Some(t) = v["trainingId"].as_str() {
                let theirs = s
                    .store
                    .training_with_deleted(&acc.id, t)
                    .await?
                    .is_some_and(|t| t.model_id == model_id);
                if !theirs {
                    return Err(not_its_training(t));
                }
            }
            let Some((all, trigger)) = crate::routes::models_api::model_weights(&s, &row).await?
            else {
                return Err(ApiError::conflict(
                    "training_not_succeeded",
                    format!("model {model_id} is {}, not trained", row.status),
                ));
            };
            (crate::routes::models_api::selected_weights(&row, &all), trigger)
        } else {
            let training_id = text(&v["trainingId"], &field("trainingId"))?;
            s.store
                .custom_model(&acc.id, model_id)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("Model {model_id} not found")))?;
            let t = s
                .store
                .training_with_deleted(&acc.id, training_id)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("Training {training_id} not found")))?;
            if t.model_id != model_id {
                return Err(not_its_training(training_id));
            }
            if t.job_status != JobStatus::Completed {
                return Err(ApiError::conflict(
                    "training_not_succeeded",
                    format!("training {training_id} is {}, not succeeded", t.status()),
                ));
            }
            (
                crate::routes::trainings::weights_of(&t).pop(),
                t.trigger_word.clone(),
            )
        };
        let training_id = v["trainingId"].as_str().unwrap_or_default();
        let (Some(key), ct) = (
            weights
                .as_ref()
                .and_then(|w| w["key"].as_str())
                .map(str::to_string),
            weights
                .as_ref()
                .and_then(|w| w["contentType"].as_str())
                .unwrap_or("application/octet-stream")
                .to_string(),
        ) else {
            return Err(ApiError::conflict(
                "training_not_succeeded",
                format!("model {model_id} has no weights"),
            ));
        };
        if !prompt.contains(&trigger) {
            warnings.push(format!(
                "the prompt does not contain the trigger word {trigger} of model {model_id}: it will not be activated"
            ));
        }
        loras.push(LoraRef {
            slot: k.clone(),
            model_id: model_id.to_string(),
            training_id: training_id.to_string(),
            scale,
            weights_key: key,
            weights_content_type: ct,
            trigger_word: trigger,
        });
    }
    let spec = JobSpec::Prediction(PredictionSpec {
        prompt: prompt.to_string(),
        seed,
        width,
        height,
        num_images,
        output_format,
        guidance_scale,
        num_inference_steps,
        loras,
    });
    // A generator must draw this kind: refused here, nothing charged.
    if let Some(e) = s.engines.check(
        JobType::Prediction,
        atelier_shared::domain::packshot::EngineChoice::Auto,
        "scaleConfigs",
    ) {
        return Err(ApiError::invalid(vec![e]));
    }
    let (billing, _) = s.store.billing_owner(&acc.id).await?;
    let trace = job_trace(&headers);
    let admission = s
        .store
        .create_prediction(
            NewJob {
                account_id: &acc.id,
                billing_account_id: &billing,
                project_id: None,
                spec,
                prices: &s.config.prices,
                max_attempts: s.config.scheduler.retry.max_attempts,
                active_job_cap: (!acc.is_enterprise()).then_some(s.config.limits.active_jobs),
                traceparent: Some(trace.to_string()),
            },
            &warnings,
        )
        .await?;
    let Admission::Created { job_id, .. } = admission else {
        return Err(refusal(admission));
    };
    metrics::counter!("atelier_jobs_created_total", "type" => "prediction").increment(1);
    let mut out = json!({"predictionId": job_id});
    if !warnings.is_empty() {
        out["warnings"] = json!(warnings);
    }
    Ok((StatusCode::ACCEPTED, axum::Json(out)).into_response())
}

/// A prediction's status and images.
#[utoipa::path(
    get, path = "/v1/predictions/{predictionId}", tag = "custom models",
    params(("predictionId" = String, Path, description = "The prediction's id")),
    responses((status = 200, description = "`{id, status, outputImages, error, createdAt}`", body = Object)),
)]
pub async fn read(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let gone = || ApiError::not_found(format!("Prediction {id} not found"));
    let warnings = s
        .store
        .prediction_warnings(&acc.id, &id)
        .await?
        .ok_or_else(gone)?;
    let job = s.store.job_for(&acc.id, &id).await?.ok_or_else(gone)?;
    let mut images = Vec::new();
    for o in s.store.latest_outputs(&job.id).await? {
        if o.status == OutputStatus::Completed {
            if let Some(key) = &o.full_key {
                images.push(json!(
                    s.object_url(key, atelier_shared::storage::content_type_of(key), s.result_ttl())
                        .await?
                ));
            }
        }
    }
    let status = match job.status {
        JobStatus::Pending => "queued",
        JobStatus::Processing => "processing",
        JobStatus::Completed => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Aborted => "canceled",
    };
    Ok(axum::Json(json!({
        "id": job.id,
        "status": status,
        "outputImages": images,
        "error": job.error_message,
        "warnings": warnings,
        "createdAt": iso8601(job.created_at),
    })))
}

/// Soft-delete a prediction.
#[utoipa::path(
    delete, path = "/v1/predictions/{predictionId}", tag = "custom models",
    params(("predictionId" = String, Path, description = "The prediction's id")),
    responses((status = 204, description = "Deleted")),
)]
pub async fn delete(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if s.store.delete_prediction(&acc.id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("Prediction {id} not found")))
    }
}
