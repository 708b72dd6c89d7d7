//! # atelier-worker
//!
//! Consumes tasks from the work queues, runs the image pipeline and reports
//! outcomes to the scheduler.
//!
//! ## Runtime model
//!
//! [`run`] opens one consumer per work queue it serves with a prefetch of
//! `worker.concurrency`, so at most that many tasks are in flight. Each
//! delivery becomes a tokio task that:
//!
//! 1. drops deliveries of stale attempts (the scheduler reclaimed the output),
//! 2. reports `started` and then a heartbeat every `worker.heartbeat_secs`
//!    (the scheduler extends the output's lease on each),
//! 3. downloads the inputs and runs the [`engine::Pipeline`] on the blocking
//!    pool (never on the async runtime), bounded by `worker.task_timeout_secs`;
//!    a panic inside the pipeline is caught and reported as retryable,
//! 4. uploads the full-size result and its thumbnail under keys unique to
//!    the run, so a duplicate run never overwrites a recorded result,
//! 5. publishes the outcome durably and only then acks the delivery.
//!
//! Shutdown (SIGTERM): stop taking deliveries, let in-flight tasks finish
//! for `worker.shutdown_grace_secs`, then nack what is left so another
//! worker picks it up at once.
//!
//! ## Guarantees
//!
//! At-least-once execution: a delivery that is not acked (crash, shutdown,
//! failed outcome publish) is redelivered. Effects are made exactly-once by
//! the scheduler, which records an outcome only for the live attempt.

pub mod engine;
pub mod face;
pub mod failure;
pub mod hanger;
pub mod identity;
pub mod imaging;
pub mod inference;
mod jobs;
pub mod model_store;
pub mod packshot;
pub mod postprocess;
pub mod routes;
pub mod swap;

use atelier_shared::db::Store;
use atelier_shared::domain::packshot::PackshotSpec;
use atelier_shared::domain::trace::TraceParent;
use atelier_shared::domain::{FailureKind, Outcome, OutputResult, Task};
use atelier_shared::queue::{Delivery, DynQueue, Message};
use atelier_shared::storage::DynObjectStore;
use bytes::Bytes;
use engine::{Input, Pipeline, RenderRequest};
use failure::TaskFailure;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Queues every worker serves.
pub const QUEUES: &[&str] = &["packshot"];
/// Queues a worker serves when its face models are loaded.
pub const FACE_QUEUES: &[&str] = &["identity", "swap"];

/// Outcome queue read by the scheduler.
pub const OUTCOMES: &str = "outcomes";

#[derive(Clone)]
pub struct WorkerContext {
    pub store: Store,
    pub queue: DynQueue,
    pub objects: DynObjectStore,
    pub pipeline: Pipeline,
    pub concurrency: usize,
    pub heartbeat: Duration,
    pub task_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_input_pixels: u64,
    /// Face models (identities, model swap); `None`: this worker does not
    /// consume the `identity` and `swap` queues.
    pub faces: Option<Arc<identity::FaceKit>>,
    /// Outbound fetches of profile photos go through this guard.
    pub egress: atelier_shared::egress::EgressPolicy,
    pub fetch_max_bytes: u64,
    pub fetch_timeout: Duration,
    /// `worker.fault_delay_ms`: fault drills only.
    pub fault_delay: Duration,
    /// Identifies this worker in leases and logs.
    pub worker_id: String,
    /// `concurrency` task slots shared by every queue this worker serves,
    /// so serving three queues never means three times the work (each
    /// queue still prefetches up to `concurrency` deliveries).
    pub slots: Arc<tokio::sync::Semaphore>,
}

impl WorkerContext {
    pub fn from_config(
        cfg: &atelier_shared::config::Config,
        store: Store,
        queue: DynQueue,
        objects: DynObjectStore,
    ) -> WorkerContext {
        WorkerContext {
            store,
            queue,
            objects,
            pipeline: Pipeline::default(),
            concurrency: cfg.worker.concurrency,
            heartbeat: Duration::from_secs(cfg.worker.heartbeat_secs),
            task_timeout: Duration::from_secs(cfg.worker.task_timeout_secs),
            shutdown_grace: Duration::from_secs(cfg.worker.shutdown_grace_secs),
            max_input_pixels: cfg.worker.max_input_pixels,
            faces: None,
            egress: atelier_shared::egress::EgressPolicy::new(&cfg.egress.allow)
                .unwrap_or_default(),
            fetch_max_bytes: cfg.identity.fetch_max_bytes,
            fetch_timeout: Duration::from_secs(cfg.identity.fetch_timeout_secs),
            fault_delay: Duration::from_millis(cfg.worker.fault_delay_ms),
            worker_id: format!("wrk_{}_{}", std::process::id(), ulid::Ulid::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(cfg.worker.concurrency.max(1))),
        }
    }
}

/// Runs the worker until `shutdown` fires, then drains as described above.
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut consumers = Vec::new();
    let faces: &[&'static str] = if ctx.faces.is_some() {
        FACE_QUEUES
    } else {
        &[]
    };
    for q in QUEUES.iter().chain(faces) {
        consumers.push(consume_queue(ctx.clone(), q, shutdown.clone()));
    }
    for r in futures::future::join_all(consumers).await {
        r?;
    }
    Ok(())
}

async fn consume_queue(
    ctx: WorkerContext,
    queue: &'static str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut consumer = loop {
        match ctx.queue.consume(queue, ctx.concurrency).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(queue, error = %e, "worker: cannot consume yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    tracing::info!(queue, worker = %ctx.worker_id, concurrency = ctx.concurrency, "worker consuming");
    let hard_stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            d = consumer.next() => match d {
                Some(d) => { tasks.spawn(handle(ctx.clone(), queue, d, hard_stop.clone())); }
                None => break,
            },
        }
    }
    // Stop taking deliveries; the queue itself keeps working so that the
    // in-flight tasks can still report and settle theirs.
    drop(consumer);
    let in_flight = tasks.len();
    if in_flight > 0 {
        tracing::info!(
            queue,
            in_flight,
            grace_secs = ctx.shutdown_grace.as_secs(),
            "worker draining"
        );
        let drained = tokio::time::timeout(ctx.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                queue,
                left = tasks.len(),
                "worker: grace period over; releasing unfinished tasks"
            );
            hard_stop.cancel();
            while tasks.join_next().await.is_some() {}
        }
    }
    Ok(())
}

/// Reports to the scheduler, carrying the task's trace context.
async fn publish_outcome(
    ctx: &WorkerContext,
    outcome: &Outcome,
    trace: Option<TraceParent>,
) -> Result<(), atelier_shared::queue::QueueError> {
    let mut message = Message::json(outcome)?;
    if let Some(t) = trace {
        message = message.with_header("traceparent", t.to_string());
    }
    ctx.queue.publish(OUTCOMES, message).await
}

/// Settles one delivery. Never panics: every failure becomes an outcome or a nack.
async fn handle(
    ctx: WorkerContext,
    queue: &'static str,
    delivery: Delivery,
    hard_stop: CancellationToken,
) {
    // One of the worker's slots, shared by all its queues: a delivery of a
    // busy worker waits here (unacked; released at shutdown).
    let _slot = tokio::select! {
        p = ctx.slots.clone().acquire_owned() => p.ok(),
        _ = hard_stop.cancelled() => {
            let _ = delivery.nack(None).await;
            return;
        }
    };
    let task: Task = match delivery.parse() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(queue, error = %e, "worker: malformed task; dead-lettering");
            let _ = delivery.dead_letter(&format!("malformed task: {e}")).await;
            return;
        }
    };
    // This task is a hop of the job's trace (the task's own field, else the
    // message header).
    let parent = task
        .traceparent
        .as_deref()
        .or(delivery.headers.get("traceparent").map(String::as_str))
        .and_then(TraceParent::parse);
    let span = tracing::info_span!(
        "task",
        job.id = %task.job_id,
        output.id = task.output_id,
        attempt = task.attempt,
        job.r#type = queue,
        trace_id = %parent.map(|t| t.trace_id_hex()).unwrap_or_default(),
    );
    if let Some(p) = &parent {
        atelier_shared::telemetry::adopt(&span, p);
    }
    let trace = parent.map(|p| atelier_shared::telemetry::hop_of(&span, Some(&p)));
    match ctx
        .store
        .is_live_attempt(task.output_id, task.attempt)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(parent: &span, "worker: stale attempt; dropping");
            metrics::counter!("atelier_tasks_total", "type" => queue, "outcome" => "stale")
                .increment(1);
            let _ = delivery.ack().await;
            return;
        }
        Err(e) => {
            tracing::warn!(parent: &span, error = %e, "worker: store unavailable; requeueing");
            let _ = delivery.nack(Some(Duration::from_secs(2))).await;
            return;
        }
    }
    let started = Outcome::Started {
        output_id: task.output_id,
        attempt: task.attempt,
        worker: ctx.worker_id.clone(),
    };
    if let Err(e) = publish_outcome(&ctx, &started, trace).await {
        tracing::warn!(parent: &span, error = %e, "worker: cannot report start; requeueing");
        let _ = delivery.nack(Some(Duration::from_secs(2))).await;
        return;
    }

    // Heartbeats for as long as the task runs.
    let beat_stop = CancellationToken::new();
    let beat = {
        let (ctx, stop, id, attempt) =
            (ctx.clone(), beat_stop.clone(), task.output_id, task.attempt);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(ctx.heartbeat) => {
                        let _ = publish_outcome(&ctx, &Outcome::Heartbeat { output_id: id, attempt }, trace).await;
                    }
                }
            }
        })
    };

    let t0 = Instant::now();
    let result = tokio::select! {
        r = execute(&ctx, &task) => Some(r),
        _ = hard_stop.cancelled() => None,
    };
    beat_stop.cancel();
    let _ = beat.await;

    let Some(result) = result else {
        tracing::info!(parent: &span, "worker: released at shutdown");
        let _ = delivery.nack(None).await;
        return;
    };
    let outcome = match result {
        Ok(mut r) => {
            r.processing_ms = i64::try_from(t0.elapsed().as_millis()).unwrap_or(i64::MAX);
            Outcome::Completed {
                output_id: task.output_id,
                attempt: task.attempt,
                result: r,
            }
        }
        Err(f) => {
            tracing::warn!(parent: &span, kind = ?f.kind, error = %f.message, "worker: task failed");
            Outcome::Failed {
                output_id: task.output_id,
                attempt: task.attempt,
                failure: f.kind,
                message: f.message,
            }
        }
    };
    let label = match &outcome {
        Outcome::Completed { .. } => "completed",
        Outcome::Failed {
            failure: FailureKind::Retryable,
            ..
        } => "retryable_failure",
        _ => "failed",
    };
    metrics::histogram!("atelier_task_duration_seconds", "type" => queue, "stage" => "total")
        .record(t0.elapsed().as_secs_f64());
    // Ack only once the outcome is durably queued; otherwise run it again.
    match publish_outcome(&ctx, &outcome, trace).await {
        Ok(()) => {
            metrics::counter!("atelier_worker_tasks_total", "type" => queue, "outcome" => label)
                .increment(1);
            if let Err(e) = delivery.ack().await {
                tracing::warn!(parent: &span, error = %e, "worker: ack failed; the task may run again");
            }
        }
        Err(e) => {
            tracing::warn!(parent: &span, error = %e, "worker: cannot report outcome; requeueing");
            let _ = delivery.nack(Some(Duration::from_secs(2))).await;
        }
    }
}

/// Loads the task's output and job and runs the job type's pipeline.
async fn execute(ctx: &WorkerContext, task: &Task) -> Result<OutputResult, TaskFailure> {
    if !ctx.fault_delay.is_zero() {
        tokio::time::sleep(ctx.fault_delay).await;
    }
    let output = ctx
        .store
        .output(task.output_id)
        .await?
        .ok_or_else(|| TaskFailure::permanent("output no longer exists"))?;
    let job = ctx
        .store
        .job(&output.job_id)
        .await?
        .ok_or_else(|| TaskFailure::permanent("job no longer exists"))?;
    match job.job_type.as_str() {
        "create_packshot" => execute_packshot(ctx, task, &output, &job).await,
        "identity_preprocessing" => jobs::identity(ctx, task, &output, &job).await,
        "model_swap" => jobs::swap(ctx, task, &output, &job).await,
        other => Err(TaskFailure::permanent(format!(
            "this worker cannot run {other} jobs"
        ))),
    }
}

/// Runs `work` on the blocking pool, bounded by `worker.task_timeout_secs`;
/// a panic is a retryable failure.
pub(crate) async fn off_runtime<T: Send + 'static>(
    ctx: &WorkerContext,
    work: impl FnOnce() -> Result<T, TaskFailure> + Send + 'static,
) -> Result<T, TaskFailure> {
    match tokio::time::timeout(ctx.task_timeout, tokio::task::spawn_blocking(work)).await {
        Err(_) => Err(TaskFailure::retryable(format!(
            "pipeline exceeded {} s",
            ctx.task_timeout.as_secs()
        ))),
        Ok(Err(join)) if join.is_panic() => Err(TaskFailure::retryable("pipeline panicked")),
        Ok(Err(join)) => Err(TaskFailure::retryable(format!(
            "pipeline task failed: {join}"
        ))),
        Ok(Ok(r)) => r,
    }
}

/// Object keys of one run of an output: unique per run, not only per
/// attempt, so a redelivered attempt never overwrites the objects of a run
/// that was already recorded.
pub(crate) fn run_base(
    job: &atelier_shared::db::jobs::JobRow,
    output: &atelier_shared::db::jobs::OutputRow,
    task: &Task,
) -> String {
    format!(
        "results/{}/{}/{}-a{}-{}",
        job.account_id,
        job.id,
        output.id,
        task.attempt,
        ulid::Ulid::new().to_string().to_lowercase()
    )
}

/// The packshot pipeline: decode the inputs, render, upload.
async fn execute_packshot(
    ctx: &WorkerContext,
    task: &Task,
    output: &atelier_shared::db::jobs::OutputRow,
    job: &atelier_shared::db::jobs::JobRow,
) -> Result<OutputResult, TaskFailure> {
    let spec: PackshotSpec = serde_json::from_str(&job.spec)
        .map_err(|e| TaskFailure::permanent(format!("unreadable job spec: {e}")))?;

    let t = Instant::now();
    let mut raw = Vec::with_capacity(spec.images.len());
    for img in &spec.images {
        let file = ctx.store.file(&img.file_id).await?.ok_or_else(|| {
            TaskFailure::permanent(format!("input image {} no longer exists", img.file_id))
        })?;
        raw.push((
            img.file_id.clone(),
            ctx.objects.get(&file.object_key).await?,
        ));
    }
    engine::stage("download", t);

    let pipeline = ctx.pipeline.clone();
    let max_pixels = ctx.max_input_pixels;
    let (ins, var, engine_index) = (
        output.instruction_index as usize,
        output.variation_index as u32,
        output.engine_index as usize,
    );
    let previous_refusal = (engine_index > 0)
        .then(|| output.last_error.clone())
        .flatten();
    let (out, format) = off_runtime(ctx, move || {
        let t = Instant::now();
        let inputs = raw
            .into_iter()
            .map(|(file_id, bytes)| {
                imaging::decode_limited(&bytes, max_pixels)
                    .map(|image| Input {
                        file_id: file_id.clone(),
                        image,
                    })
                    .map_err(|f| TaskFailure {
                        kind: f.kind,
                        message: format!("input {file_id}: {}", f.message),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        engine::stage("decode", t);
        if ins >= spec.instructions.len() {
            return Err(TaskFailure::permanent("instruction index out of range"));
        }
        let req = RenderRequest {
            spec: &spec,
            instruction_index: ins,
            variation_index: var,
            inputs: &inputs,
        };
        let out = pipeline.run(&req, engine_index, previous_refusal.as_deref())?;
        let format = spec.instructions[ins].output.format;
        Ok((out, format))
    })
    .await?;

    let t = Instant::now();
    let base = run_base(job, output, task);
    let full_key = format!("{base}.{}", format.ext());
    let thumb_key = format!("{base}-thumb.jpg");
    ctx.objects
        .put(&full_key, Bytes::from(out.full), format.content_type())
        .await?;
    ctx.objects
        .put(&thumb_key, Bytes::from(out.thumb), "image/jpeg")
        .await?;
    engine::stage("upload", t);
    Ok(OutputResult {
        full_key,
        thumb_key,
        format: format.ext().to_string(),
        width: out.width,
        height: out.height,
        model_used: out.model_used,
        processing_ms: 0,
        input_description: out.description,
        post_processed: out.post_processed,
    })
}

/// Re-exported for wiring code that builds a custom pipeline.
pub type DynEngine = Arc<dyn engine::Engine>;
