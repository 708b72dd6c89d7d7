//! Trainings: one attempt holds one trainer container for its whole run.
//!
//! The attempt's claim (which container holds it) is written to the object
//! store before the training is started there, so that whoever comes next
//! knows where it runs: a worker that gets the same attempt again (the
//! first one died; the broker redelivered it) watches that container
//! instead of starting anything, and the worker of a later attempt cancels
//! the earlier ones where they ran before it starts, so two attempts of a
//! training never run at once. The trainer reports progress and its end to
//! the API through the attempt's signed webhook; the API records the end
//! (once, whoever reports it) and leaves a marker, which is what the worker
//! waits for. A container that stops answering, or that is idle without the
//! end having arrived, has lost the training: the attempt fails and the
//! retry policy decides.

use crate::context::WorkerContext;
use crate::engines::trainer::{Health, Trainers};
use crate::failure::TaskFailure;
use atelier_shared::domain::task::{
    TrainingClaim, TrainingEnd, training_claim, training_end, training_run_id,
};
use atelier_shared::domain::training::TrainingSpec;
use atelier_shared::domain::{OutputResult, Task};
use atelier_shared::time::now_ms;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;

pub(super) async fn run(
    ctx: &WorkerContext,
    task: &Task,
    spec: &TrainingSpec,
) -> Result<OutputResult, TaskFailure> {
    let trainers = ctx
        .trainers
        .clone()
        .ok_or_else(|| TaskFailure::retryable("this worker drives no trainer container"))?;
    let links = task.training.as_ref().ok_or_else(|| {
        TaskFailure::retryable("the task carries no training URLs (an older scheduler sent it)")
    })?;
    let (output, attempt) = (task.output_id, task.attempt);
    let id = training_run_id(output, attempt);
    // A redelivery after the end was recorded: nothing left to run.
    if let Some(end) = read::<TrainingEnd>(ctx, &training_end(output, attempt)).await {
        return ended(end);
    }
    // Earlier attempts may still run where they were started: stopped
    // first (a no-op where they have ended).
    for earlier in 1..attempt {
        if let Some(c) = read::<TrainingClaim>(ctx, &training_claim(output, earlier)).await {
            trainers.cancel(&c.url, &training_run_id(output, earlier)).await;
        }
    }
    let claim_key = training_claim(output, attempt);
    let (url, _taken) = match read::<TrainingClaim>(ctx, &claim_key).await {
        Some(c) => {
            tracing::info!(training = %id, url = %c.url, first_worker = %c.worker, "trainer: re-attaching to a running training");
            metrics::counter!("atelier_training_reattached_total").increment(1);
            let taken = trainers.take_url(&c.url);
            (c.url, taken)
        }
        None => {
            // The worker's slots are as many as its containers, so one is
            // free unless another worker shares them.
            let taken = loop {
                if let Some(t) = trainers.take() {
                    break t;
                }
                tokio::time::sleep(trainers.poll).await;
            };
            let url = taken.url().to_string();
            let claim = TrainingClaim {
                url: url.clone(),
                worker: ctx.worker_id.clone(),
                at_ms: now_ms(),
            };
            let body = serde_json::to_vec(&claim)
                .map_err(|e| TaskFailure::retryable(format!("claim: {e}")))?;
            ctx.objects
                .put(&claim_key, Bytes::from(body), "application/json")
                .await?;
            let input = trainers.inputs(&spec.fields(&links.dataset_url))?;
            let since = Instant::now();
            // A container busy with another worker's training is offered
            // this one again until it has been busy for `lost_after`.
            while !trainers
                .start(&url, &id, input.clone(), &links.webhook_url)
                .await?
            {
                if since.elapsed() > trainers.lost_after {
                    return Err(TaskFailure::retryable(format!(
                        "trainer {url} stayed busy with another training"
                    )));
                }
                tokio::time::sleep(trainers.poll).await;
            }
            tracing::info!(training = %id, %url, steps = spec.steps, images = spec.image_count, "trainer: training started");
            (url, Some(taken))
        }
    };
    let mut guard = CancelOnAbort {
        trainers: trainers.clone(),
        url: url.clone(),
        id: id.clone(),
        releasing: ctx.releasing.clone(),
        armed: true,
    };
    let r = watch(ctx, &trainers, &url, &id, output, attempt).await;
    if r.is_ok() || matches!(&r, Err(f) if f.ended) {
        guard.armed = false;
    }
    r.map_err(|f| f.failure)
}

struct WatchFailure {
    failure: TaskFailure,
    /// The training has ended in the container (no cancel needed).
    ended: bool,
}

/// Waits for the end of training `id` at `url`.
async fn watch(
    ctx: &WorkerContext,
    trainers: &Trainers,
    url: &str,
    id: &str,
    output: i64,
    attempt: i64,
) -> Result<OutputResult, WatchFailure> {
    let end_key = training_end(output, attempt);
    let started = Instant::now();
    let mut silent_since: Option<Instant> = None;
    let mut idle_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(trainers.poll).await;
        if let Some(end) = read::<TrainingEnd>(ctx, &end_key).await {
            return ended(end).map_err(|failure| WatchFailure {
                failure,
                ended: true,
            });
        }
        if started.elapsed() > trainers.timeout {
            return Err(WatchFailure {
                failure: TaskFailure::permanent(format!(
                    "the training ran longer than {} s and was cancelled",
                    trainers.timeout.as_secs()
                )),
                ended: false,
            });
        }
        match trainers.health(url).await {
            Health::Busy => {
                silent_since = None;
                idle_since = None;
            }
            Health::Ready => {
                silent_since = None;
                // Idle: the training has ended there; its end is on its
                // way to the API (or was lost with a webhook).
                if idle_since.get_or_insert_with(Instant::now).elapsed() > trainers.lost_after {
                    return Err(WatchFailure {
                        failure: TaskFailure::retryable(format!(
                            "trainer {url} is idle but the end of training {id} never arrived"
                        )),
                        ended: true,
                    });
                }
            }
            Health::Unreachable | Health::Other(_) => {
                if silent_since.get_or_insert_with(Instant::now).elapsed() > trainers.lost_after {
                    return Err(WatchFailure {
                        failure: TaskFailure::retryable(format!(
                            "trainer {url} stopped answering; training {id} was lost"
                        )),
                        ended: false,
                    });
                }
            }
        }
    }
}

/// What the recorded end of an attempt means for its task.
fn ended(end: TrainingEnd) -> Result<OutputResult, TaskFailure> {
    match (end.status.as_str(), end.result) {
        ("succeeded", Some(result)) => Ok(result),
        ("failed", _) => Err(TaskFailure::permanent(
            end.error.unwrap_or_else(|| "the training failed".into()),
        )),
        (status, _) => Err(TaskFailure::retryable(format!(
            "the training ended {status}{}",
            end.error.map(|e| format!(": {e}")).unwrap_or_default()
        ))),
    }
}

async fn read<T: serde::de::DeserializeOwned>(ctx: &WorkerContext, key: &str) -> Option<T> {
    match ctx.objects.size(key).await {
        Ok(Some(_)) => {}
        _ => return None,
    }
    let bytes = ctx.objects.get(key).await.ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Cancels the training in its container when the task is dropped before
/// the training ended: the job was aborted, or the training timed out. A
/// worker that releases its tasks at shutdown leaves it running for the
/// worker that re-attaches.
struct CancelOnAbort {
    trainers: Arc<Trainers>,
    url: String,
    id: String,
    releasing: tokio_util::sync::CancellationToken,
    armed: bool,
}

impl Drop for CancelOnAbort {
    fn drop(&mut self) {
        if self.armed && !self.releasing.is_cancelled() {
            let (t, url, id) = (
                self.trainers.clone(),
                std::mem::take(&mut self.url),
                std::mem::take(&mut self.id),
            );
            tokio::spawn(async move { t.cancel(&url, &id).await });
        }
    }
}
