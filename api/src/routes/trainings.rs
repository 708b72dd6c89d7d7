//! Trainings: starting one (contract §7 `…/trainings`, §8.4 `PUT …/train`),
//! reading, cancelling and deleting them, the §8.5 job object, and the
//! trainer's webhook (`/internal/training-events/{token}`), through which
//! a running training reports its progress and its end to whichever API
//! replica receives it.
//!
//! A training is a job of kind `training` with one output, the weights:
//! its cost is reserved when it starts, charged when the weights are
//! recorded, released when it fails or is cancelled. Its training images
//! are frozen at start into one ZIP in the object store, which the trainer
//! reads through a signed URL.

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use async_zip::base::write::ZipFileWriter;
use async_zip::{Compression, ZipEntryBuilder};
use atelier_shared::db::trainings::{NewTraining, TrainingRow, TrainingStart};
use atelier_shared::domain::task::{TrainingEnd, training_end};
use atelier_shared::domain::training::{self, TrainingApi, TrainingSpec};
use atelier_shared::domain::{FailureKind, OutputResult};
use atelier_shared::storage::Capability;
use atelier_shared::time::{iso8601, now_ms};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Map, Value, json};

/// One training image as it goes into the dataset.
pub struct DatasetImage {
    pub object_key: String,
    pub content_type: String,
}

/// What a start asks for, once its API has validated it.
pub struct StartRequest<'a> {
    pub api: TrainingApi,
    pub model_id: &'a str,
    pub model_type: &'a str,
    pub trigger_word: String,
    /// Resolved parameters (defaults applied).
    pub parameters: Map<String, Value>,
    pub images: Vec<DatasetImage>,
}

fn ext_of(content_type: &str) -> &'static str {
    match content_type {
        "image/png" => "png",
        "image/webp" => "webp",
        _ => "jpg",
    }
}

/// The parallel-training cap of the caller.
fn parallel_cap(s: &AppState, acc: &atelier_shared::db::accounts::Account) -> u32 {
    if acc.is_enterprise() {
        s.config.training.parallel_enterprise
    } else {
        s.config.training.parallel_per_account
    }
}

/// Freezes the training images into one ZIP object; its key.
async fn freeze_dataset(
    s: &AppState,
    account: &str,
    training_id: &str,
    images: &[DatasetImage],
) -> ApiResult<String> {
    let max = s.config.training.max_dataset_bytes;
    let mut zip = ZipFileWriter::with_tokio(Vec::<u8>::new());
    let mut total: u64 = 0;
    for (i, img) in images.iter().enumerate() {
        let bytes = s.objects.get(&img.object_key).await?;
        total += bytes.len() as u64;
        if total > max {
            return Err(ApiError::bad_request(
                None,
                format!("the training images add up to more than {max} bytes"),
                "body",
            ));
        }
        let name = format!("{:04}.{}", i + 1, ext_of(&img.content_type));
        // Images are already compressed: stored as they are.
        zip.write_entry_whole(
            ZipEntryBuilder::new(name.into(), Compression::Stored),
            &bytes,
        )
        .await
        .map_err(ApiError::internal)?;
    }
    let out = zip.close().await.map_err(ApiError::internal)?;
    let key = format!("datasets/{account}/{training_id}.zip");
    s.objects
        .put(&key, Bytes::from(out.into_inner()), "application/zip")
        .await?;
    Ok(key)
}

/// Starts a training: the dataset frozen, then the caps, credits and job in
/// one transaction. The training's id and job id, or the refusal.
pub async fn start(
    s: &AppState,
    acc: &atelier_shared::db::accounts::Account,
    headers: &axum::http::HeaderMap,
    r: StartRequest<'_>,
) -> ApiResult<(String, String)> {
    let steps = training::steps(r.model_type, &r.parameters);
    let cost = training::cost(r.model_type, steps, &s.config.prices);
    let training_id = format!("trn_{}", atelier_shared::domain::ids::base32_lower(16));
    let dataset_key = freeze_dataset(s, &acc.id, &training_id, &r.images).await?;
    let (billing, _) = s.store.billing_owner(&acc.id).await?;
    let spec = TrainingSpec {
        training_id: training_id.clone(),
        api: r.api,
        model_id: r.model_id.to_string(),
        model_type: r.model_type.to_string(),
        trigger_word: r.trigger_word,
        parameters: r.parameters,
        steps,
        image_count: u32::try_from(r.images.len()).unwrap_or(u32::MAX),
        dataset_key: dataset_key.clone(),
        cost,
    };
    let trace = crate::admission::job_trace(headers);
    let started = s
        .store
        .start_training(NewTraining {
            account_id: &acc.id,
            billing_account_id: &billing,
            spec,
            prices: &s.config.prices,
            max_attempts: s.config.scheduler.retry.max_attempts,
            parallel_cap: parallel_cap(s, acc),
            cooldown_ms: i64::try_from(s.config.training.relaunch_cooldown_secs)
                .unwrap_or(i64::MAX / 2000)
                * 1000,
            traceparent: Some(trace.to_string()),
        })
        .await;
    let refusal = match started {
        Ok(TrainingStart::Started { job_id }) => {
            metrics::counter!("atelier_jobs_created_total", "type" => "training").increment(1);
            tracing::info!(training = %training_id, job.id = %job_id, account.id = %acc.id, steps, credits = cost.as_f64(), "training accepted");
            return Ok((training_id, job_id));
        }
        Ok(refused) => refused,
        Err(e) => {
            s.erase(std::slice::from_ref(&dataset_key)).await;
            return Err(e.into());
        }
    };
    s.erase(std::slice::from_ref(&dataset_key)).await;
    Err(match refusal {
        TrainingStart::ModelBusy => ApiError::conflict(
            "training_running",
            "A training of this model is already queued or running",
        ),
        TrainingStart::AccountCap {
            open,
            cap,
            remaining_secs,
        } => ApiError::too_many(
            "parallel_training",
            format!("{open} trainings are already queued or running; at most {cap} at once (parallel-training)"),
            u64::try_from(remaining_secs).unwrap_or(1),
        )
        .with("remainingSeconds", remaining_secs),
        TrainingStart::Cooldown { remaining_secs } => ApiError::too_many(
            "relaunch_cooldown",
            format!("This model's last training ended recently; it can be trained again in {remaining_secs} s"),
            u64::try_from(remaining_secs).unwrap_or(1),
        )
        .with("remainingSeconds", remaining_secs),
        TrainingStart::InsufficientCredits {
            required,
            available,
        } => ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_credits",
            format!(
                "This training costs {} credits; {} are available",
                required.as_f64(),
                available.as_f64()
            ),
        )
        .with("creativeUnitsCost", required.as_f64())
        .with("available", available.as_f64()),
        TrainingStart::Started { .. } => unreachable!("returned above"),
    })
}

/// Cancels an open training: its job aborted (cost released) and its
/// worker told, which cancels it in its container. `false` when it had
/// already ended.
pub async fn cancel(s: &AppState, account: &str, t: &TrainingRow) -> ApiResult<bool> {
    let Some(abort) = s.store.abort_job(account, &t.job_id).await? else {
        return Ok(false);
    };
    s.signal_abort(&abort.running).await;
    Ok(abort.aborted)
}

/// `trainingProgress` (§8.1) of a training: the trainer's last report.
pub fn progress_json(t: &TrainingRow) -> Value {
    let mut p: Value = t
        .progress
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or_else(|| json!({"stage": "queued", "position": 0, "progress": 0.0}));
    if t.job_status == atelier_shared::domain::JobStatus::Completed {
        p["stage"] = json!("done");
        p["progress"] = json!(1.0);
        p["remainingTimeMs"] = json!(0);
    }
    p
}

/// `statusHistory` (§8.5): when it was queued, started and ended.
pub fn status_history(t: &TrainingRow) -> Value {
    let mut h = vec![json!({"status": "queued", "date": iso8601(t.created_at)})];
    if let Some(at) = t.started_at {
        h.push(json!({"status": "in-progress", "date": iso8601(at)}));
    }
    if let Some(at) = t.finalized_at {
        h.push(json!({"status": job_status(t), "date": iso8601(at)}));
    }
    Value::Array(h)
}

/// The §8.5 status word.
pub fn job_status(t: &TrainingRow) -> &'static str {
    use atelier_shared::domain::JobStatus::*;
    match t.job_status {
        Pending => "queued",
        Processing => "in-progress",
        Completed => "success",
        Failed => "failure",
        Aborted => "canceled",
    }
}

/// The §8.5 job object of a training.
pub fn job_json(t: &TrainingRow) -> Value {
    let progress = progress_json(t);
    json!({
        "jobId": t.job_id,
        "jobType": "train",
        "status": job_status(t),
        "progress": progress["progress"].as_f64().unwrap_or(0.0),
        "metadata": {
            "assetIds": [],
            "error": t.output_error.as_ref().or(t.job_error.as_ref()),
            "input": serde_json::from_str::<Value>(&t.parameters).unwrap_or(json!({})),
            "modelId": t.model_id,
            "trainingId": t.id,
        },
        "statusHistory": status_history(t),
        "ownerId": t.account_id,
        "authorId": t.account_id,
        "createdAt": iso8601(t.created_at),
        "updatedAt": iso8601(t.job_updated_at.max(t.updated_at)),
    })
}

/// The weights a completed training recorded: `{key, epoch, bytes}` each,
/// the final one last.
pub fn weights_of(t: &TrainingRow) -> Vec<Value> {
    t.input_description
        .as_deref()
        .and_then(|d| serde_json::from_str::<Value>(d).ok())
        .and_then(|d| d["weights"].as_array().cloned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The trainer's webhook.

/// The last `step N/M` (or bare `N/M`) a trainer logged.
fn last_step(logs: &str) -> Option<(u64, u64)> {
    logs.lines().rev().find_map(|line| {
        line.split(|c: char| c.is_whitespace() || c == '|' || c == '[' || c == ']')
            .rev()
            .find_map(|word| {
                let (a, b) = word.split_once('/')?;
                let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
                (b > 0 && a <= b).then_some((a, b))
            })
    })
}

/// The trainer's files (data URLs), as `(content type, bytes)`.
fn trainer_files(output: &Value, max: u64) -> Result<Vec<(String, Vec<u8>)>, String> {
    let items: Vec<&Value> = match output {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) => o.values().collect(),
        Value::Null => Vec::new(),
        v => vec![v],
    };
    let mut out = Vec::new();
    let mut total = 0u64;
    for v in items {
        let Some(url) = v.as_str() else {
            continue;
        };
        let (mime, b64) = url
            .strip_prefix("data:")
            .and_then(|r| r.split_once(";base64,"))
            .ok_or_else(|| {
                "the trainer returned a file that is not a data URL (give the container no upload URL)"
                    .to_string()
            })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| "the trainer returned undecodable base64".to_string())?;
        total += bytes.len() as u64;
        if total > max {
            return Err(format!("the trainer's weights are larger than {max} bytes"));
        }
        out.push((mime.to_string(), bytes));
    }
    if out.is_empty() {
        return Err("the trainer returned no weights file".into());
    }
    Ok(out)
}

fn weights_ext(mime: &str) -> &'static str {
    match mime {
        "application/json" => "json",
        "application/zip" => "zip",
        "application/x-tar" => "tar",
        _ => "safetensors",
    }
}

/// Receive a trainer's webhook event (Cog's training object) for one attempt.
#[utoipa::path(
    post, path = "/internal/training-events/{token}", tag = "capabilities", security(()),
    params(("token" = String, Path, description = "The attempt's signed capability")),
    request_body(content = Object, description = "Cog's training object"),
    responses(
        (status = 200, description = "Recorded (or already recorded)"),
        (status = 403, description = "Forged or expired token", body = crate::error::ErrorBody),
        (status = 404, description = "No such training", body = crate::error::ErrorBody),
    ),
)]
pub async fn events(
    State(s): State<AppState>,
    Path(token): Path<String>,
    body: axum::body::Body,
) -> ApiResult<StatusCode> {
    // The token first: a body (up to the weights' size) is read only for
    // a trainer this server sent.
    let (output_id, attempt) = match s.signer.verify(&token, now_ms()) {
        Ok((Capability::TrainingEvents { output_id, attempt }, _)) => (output_id, attempt),
        Ok(_) | Err(_) => {
            return Err(ApiError::forbidden("not a valid training webhook URL"));
        }
    };
    let limit = usize::try_from(s.config.training.max_weights_bytes)
        .unwrap_or(usize::MAX)
        .saturating_mul(4)
        / 3
        + (1 << 20);
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the trainer's event is larger than training.max_weights_bytes allows",
        )
    })?;
    let event: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(None, format!("not JSON: {e}"), "body"))?;
    let t = s
        .store
        .training_of_output(output_id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such training"))?;
    let status = event["status"].as_str().unwrap_or("");
    metrics::counter!("atelier_training_events_total", "status" => status.to_string()).increment(1);
    let now = now_ms();
    match status {
        "starting" | "processing" => {
            // A live training keeps its lease, whether or not a worker
            // is watching it.
            let lease = now
                + i64::try_from(s.config.training.lease_secs)
                    .unwrap_or(i64::MAX / 4000)
                    .saturating_mul(1000);
            s.store.extend_lease(output_id, attempt, lease).await?;
            if t.attempt == attempt {
                let progress = progress_of(&t, event["logs"].as_str().unwrap_or(""), now);
                s.store.set_training_progress(&t.id, &progress).await?;
            }
        }
        "succeeded" => {
            let files = match trainer_files(&event["output"], s.config.training.max_weights_bytes) {
                Ok(f) => f,
                Err(why) => {
                    fail(&s, output_id, attempt, FailureKind::Permanent, &why).await?;
                    return Ok(StatusCode::OK);
                }
            };
            let epochs = files.len();
            let mut weights = Vec::with_capacity(epochs);
            for (i, (mime, bytes)) in files.into_iter().enumerate() {
                let key = format!(
                    "weights/{}/{}/a{attempt}-{:06}.{}",
                    t.account_id,
                    t.id,
                    i + 1,
                    weights_ext(&mime)
                );
                let size = bytes.len();
                s.objects.put(&key, Bytes::from(bytes), &mime).await?;
                weights.push(json!({"key": key, "epoch": format!("{:06}", i + 1), "bytes": size, "contentType": mime}));
            }
            let last = weights
                .last()
                .and_then(|w| w["key"].as_str())
                .unwrap_or_default()
                .to_string();
            let predict_time = event["metrics"]["predict_time"].as_f64();
            let result = OutputResult {
                full_key: last.clone(),
                thumb_key: String::new(),
                format: weights_ext(
                    weights
                        .last()
                        .and_then(|w| w["contentType"].as_str())
                        .unwrap_or(""),
                )
                .to_string(),
                width: 0,
                height: 0,
                model_used: "trainer (cog)".into(),
                processing_ms: predict_time.map(|p| (p * 1000.0) as i64).unwrap_or(0),
                input_description: json!({
                    "weights": weights,
                    "train_time": predict_time,
                    "trigger_word": t.trigger_word,
                }),
                post_processed: false,
            };
            let mut final_progress = progress_of(&t, event["logs"].as_str().unwrap_or(""), now);
            final_progress["stage"] = json!("done");
            final_progress["progress"] = json!(1.0);
            final_progress["remainingTimeMs"] = json!(0);
            s.store
                .set_training_progress(&t.id, &final_progress)
                .await?;
            let recorded = s
                .store
                .record_completed(output_id, attempt, &result)
                .await?;
            tracing::info!(training = %t.id, output_id, attempt, recorded, epochs, "training: weights recorded");
            mark_end(
                &s,
                output_id,
                attempt,
                TrainingEnd {
                    status: "succeeded".into(),
                    result: Some(result),
                    error: None,
                },
            )
            .await;
        }
        "failed" => {
            let why = format!(
                "the trainer failed: {}",
                event["error"].as_str().unwrap_or("no reason given")
            );
            fail(&s, output_id, attempt, FailureKind::Permanent, &why).await?;
        }
        "canceled" => {
            fail(
                &s,
                output_id,
                attempt,
                FailureKind::Retryable,
                "the trainer cancelled the training",
            )
            .await?;
        }
        other => {
            return Err(ApiError::bad_request(
                Some("status"),
                format!("unknown training status {other:?}"),
                "body",
            ));
        }
    }
    Ok(StatusCode::OK)
}

/// Records a failed attempt (once) and tells its worker.
async fn fail(
    s: &AppState,
    output_id: i64,
    attempt: i64,
    kind: FailureKind,
    why: &str,
) -> ApiResult<()> {
    let unit: f64 = rand::random();
    let r = s
        .store
        .record_failure(
            output_id,
            attempt,
            &kind,
            why,
            &s.config.scheduler.retry,
            unit,
        )
        .await?;
    tracing::warn!(output_id, attempt, outcome = ?r, reason = why, "training: attempt ended without weights");
    mark_end(
        s,
        output_id,
        attempt,
        TrainingEnd {
            status: match kind {
                FailureKind::Permanent | FailureKind::Refused => "failed".into(),
                FailureKind::Retryable => "canceled".into(),
            },
            result: None,
            error: Some(why.to_string()),
        },
    )
    .await;
    Ok(())
}

/// Leaves the end marker the attempt's worker waits for.
async fn mark_end(s: &AppState, output_id: i64, attempt: i64, end: TrainingEnd) {
    let body = serde_json::to_vec(&end).unwrap_or_default();
    if let Err(e) = s
        .objects
        .put(
            &training_end(output_id, attempt),
            Bytes::from(body),
            "application/json",
        )
        .await
    {
        tracing::warn!(output_id, attempt, error = %e, "training: cannot leave the end marker; the worker finds the trainer idle and fails the attempt");
    }
}

/// The progress of a running training from its trainer's logs.
fn progress_of(t: &TrainingRow, logs: &str, now: i64) -> Value {
    let started = t.started_at.unwrap_or(now);
    let (position, total) = last_step(logs).unwrap_or((0, 0));
    let fraction = if total > 0 {
        position as f64 / total as f64
    } else {
        0.0
    };
    let elapsed = (now - started).max(0);
    let remaining = if fraction > 0.0 {
        Some(((elapsed as f64) * (1.0 - fraction) / fraction) as i64)
    } else {
        None
    };
    json!({
        "stage": if position == 0 { "preparing" } else { "training" },
        "position": position,
        "totalSteps": total,
        "progress": fraction,
        "remainingTimeMs": remaining,
        "startedAt": iso8601(started),
        "updatedAt": iso8601(now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_step_of_the_logs_is_the_position() {
        assert_eq!(last_step("step 1/10\nstep 2/10\n"), Some((2, 10)));
        assert_eq!(
            last_step("epoch 1 | 37/200 [00:01<00:05]\n"),
            Some((37, 200))
        );
        assert_eq!(last_step("loading\n"), None);
        assert_eq!(last_step("12/0\n"), None);
        assert_eq!(last_step("step 11/10\n"), None);
    }

    #[test]
    fn trainer_files_are_data_urls_within_the_limit() {
        let one = json!(["data:application/json;base64,e30="]);
        let f = trainer_files(&one, 100).expect("files");
        assert_eq!(f, vec![("application/json".to_string(), b"{}".to_vec())]);
        assert!(trainer_files(&json!("http://elsewhere/x"), 100).is_err());
        assert!(trainer_files(&one, 1).is_err());
        assert!(trainer_files(&Value::Null, 100).is_err());
    }
}
