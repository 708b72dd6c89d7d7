//! The consume loop: deliveries in, heartbeats and outcomes out.

use crate::context::WorkerContext;
use crate::jobs;
use atelier_shared::domain::task::{OUTCOME_QUEUE, cancel_marker};
use atelier_shared::domain::trace::TraceParent;
use atelier_shared::domain::{FailureKind, Outcome, Task, WorkQueue};
use atelier_shared::queue::{Delivery, Message};
use atelier_shared::time::now_ms;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How far past its dispatch deadline a first delivery must be before it
/// counts as reclaimed: leaves room for clock skew between the scheduler
/// and the worker.
const DEADLINE_SKEW_MS: i64 = 5_000;

/// Runs the worker until `shutdown` fires, then drains (see the crate docs).
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    // A worker told to serve what it cannot would idle while looking
    // healthy (and an autoscaler would add more of it): it stops instead.
    let unservable = ctx.unservable();
    if !unservable.is_empty() {
        let names: Vec<&str> = unservable.iter().map(|q| q.as_str()).collect();
        anyhow::bail!(
            "worker.queues names {} but this worker cannot serve {}: the face models (swap, identity), generator routes (generate) or trainer containers (training.containers) are missing",
            names.join(", "),
            if names.len() == 1 { "it" } else { "them" }
        );
    }
    let queues = ctx.queues();
    // Present while it drains too: withdrawn once the consumers are done.
    let done = CancellationToken::new();
    let presence = tokio::spawn(announce(ctx.clone(), queues.clone(), done.clone()));
    let consumers = queues
        .into_iter()
        .map(|q| consume_queue(ctx.clone(), q, shutdown.clone()));
    let results = futures::future::join_all(consumers).await;
    done.cancel();
    let _ = presence.await;
    for r in results {
        r?;
    }
    Ok(())
}

/// The host this worker runs on (a pod's name in Kubernetes).
fn host() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Keeps this worker's presence record ([`atelier_shared::fleet`]) fresh
/// until `done`, then deletes it.
async fn announce(ctx: WorkerContext, queues: Vec<WorkQueue>, done: CancellationToken) {
    let slots = u32::try_from(ctx.concurrency.max(1)).unwrap_or(u32::MAX);
    let mut record = atelier_shared::fleet::Presence {
        worker: ctx.worker_id.clone(),
        host: host(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        queues,
        device: ctx.device.clone(),
        slots,
        in_flight: 0,
        finished: 0,
        started_ms: now_ms(),
        seen_ms: now_ms(),
        every_secs: ctx.presence_every.as_secs().max(1),
    };
    let mut failing = false;
    loop {
        let free = u32::try_from(ctx.slots.available_permits()).unwrap_or(u32::MAX);
        record.in_flight = slots.saturating_sub(free);
        record.finished = ctx.finished.load(std::sync::atomic::Ordering::Relaxed);
        record.seen_ms = now_ms();
        match record.publish(ctx.objects.as_ref()).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "worker: cannot write its presence record; operators will see it as gone");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = done.cancelled() => break,
            _ = tokio::time::sleep(ctx.presence_every) => {}
        }
    }
    if let Err(e) = record.withdraw(ctx.objects.as_ref()).await {
        tracing::warn!(error = %e, "worker: cannot delete its presence record; it reads as gone after three intervals");
    }
}

async fn consume_queue(
    ctx: WorkerContext,
    queue: WorkQueue,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut consumer = loop {
        match ctx.queue.consume(queue.as_str(), ctx.concurrency).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(%queue, error = %e, "worker: cannot consume yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    tracing::info!(%queue, worker = %ctx.worker_id, concurrency = ctx.concurrency, "worker consuming");
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
            %queue,
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
                %queue,
                left = tasks.len(),
                "worker: grace period over; releasing unfinished tasks"
            );
            ctx.releasing.cancel();
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
    ctx.queue.publish(OUTCOME_QUEUE, message).await
}

/// Whether a delivery is an attempt the scheduler has already reclaimed:
/// never started by anyone (a first delivery) and past its dispatch
/// deadline, so a newer attempt has been (or is about to be) dispatched.
/// A redelivery is run even then: it was started, and while its worker's
/// lease lasts it is still the live attempt. Whatever a stale run reports
/// is ignored where it is recorded; this only saves the work.
fn reclaimed(task: &Task, deliveries: i64, now: i64) -> bool {
    deliveries <= 1 && now > task.deadline_ms + DEADLINE_SKEW_MS
}

/// What every task message names, whatever its format.
#[derive(serde::Deserialize)]
struct TaskHeader {
    output_id: i64,
    attempt: i64,
}

/// A delivery that is not a task this worker reads. One that still names
/// its output and attempt (a scheduler of another version published it,
/// e.g. during a rolling upgrade) is reported as a retryable failure, so
/// the scheduler dispatches it again at once in its own format instead of
/// waiting for the dispatch lease to run out; anything else is poison and
/// is dead-lettered.
async fn unreadable(
    ctx: &WorkerContext,
    queue: WorkQueue,
    delivery: Delivery,
    e: serde_json::Error,
) {
    let Ok(h) = delivery.parse::<TaskHeader>() else {
        tracing::error!(%queue, error = %e, "worker: malformed task; dead-lettering");
        let _ = delivery.dead_letter(&format!("malformed task: {e}")).await;
        return;
    };
    tracing::warn!(%queue, output_id = h.output_id, error = %e, "worker: a task in a format this worker does not read; handing it back");
    let outcome = Outcome::Failed {
        output_id: h.output_id,
        attempt: h.attempt,
        failure: FailureKind::Retryable,
        message: format!("the task's format is not this worker's ({e}); dispatched again"),
    };
    match publish_outcome(ctx, &outcome, None).await {
        Ok(()) => {
            let _ = delivery.ack().await;
        }
        Err(_) => {
            let _ = delivery.nack(Some(Duration::from_secs(2))).await;
        }
    }
}

/// Resolves once the abort marker of the running task exists (checked
/// every `worker.abort_check_ms`); never while the store cannot say.
async fn aborted(ctx: &WorkerContext, marker: &str) {
    loop {
        tokio::time::sleep(ctx.abort_check).await;
        if let Ok(Some(_)) = ctx.objects.size(marker).await {
            return;
        }
    }
}

/// Settles one delivery. Never panics: every failure becomes an outcome or a nack.
async fn handle(
    ctx: WorkerContext,
    queue: WorkQueue,
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
        Err(e) => return unreadable(&ctx, queue, delivery, e).await,
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
        job.r#type = %task.work.job_type(),
        account.id = %task.account_id,
        trace_id = %parent.map(|t| t.trace_id_hex()).unwrap_or_default(),
    );
    if let Some(p) = &parent {
        atelier_shared::telemetry::adopt(&span, p);
    }
    let trace = parent.map(|p| atelier_shared::telemetry::hop_of(&span, Some(&p)));
    if reclaimed(&task, delivery.deliveries, now_ms()) {
        tracing::info!(parent: &span, deadline_ms = task.deadline_ms, "worker: attempt reclaimed by the scheduler; dropping");
        metrics::counter!("atelier_worker_tasks_total", "type" => queue.as_str(), "outcome" => "stale")
            .increment(1);
        let _ = delivery.ack().await;
        return;
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
    let marker = cancel_marker(task.output_id, task.attempt);
    let result = tokio::select! {
        r = jobs::execute(&ctx, &task) => Some(r),
        _ = hard_stop.cancelled() => None,
        _ = aborted(&ctx, &marker) => {
            // Dropping the work stops it (a container's prediction is
            // cancelled); the output is already cancelled and released.
            beat_stop.cancel();
            let _ = beat.await;
            tracing::info!(parent: &span, "worker: the job was aborted; work stopped");
            metrics::counter!("atelier_worker_tasks_total", "type" => queue.as_str(), "outcome" => "aborted")
                .increment(1);
            let _ = ctx.objects.delete(&marker).await;
            let _ = delivery.ack().await;
            return;
        }
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
    metrics::histogram!("atelier_task_duration_seconds", "type" => queue.as_str(), "stage" => "total")
        .record(t0.elapsed().as_secs_f64());
    // Ack only once the outcome is durably queued; otherwise run it again.
    match publish_outcome(&ctx, &outcome, trace).await {
        Ok(()) => {
            metrics::counter!("atelier_worker_tasks_total", "type" => queue.as_str(), "outcome" => label)
                .increment(1);
            ctx.finished
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_shared::domain::identity::{IdentityKind, PhotoSource, PreprocessSpec};
    use atelier_shared::domain::task::{JobInputs, TaskOutput};

    fn task(deadline_ms: i64) -> Task {
        Task {
            job_id: "job_1".into(),
            account_id: "acc_1".into(),
            output_id: 1,
            attempt: 1,
            deadline_ms,
            traceparent: None,
            output: TaskOutput {
                instruction_index: 0,
                variation_index: 0,
                version: 0,
                engine_index: 0,
                previous_refusal: None,
            },
            work: PreprocessSpec {
                identity_code: "idn_x".into(),
                kind: IdentityKind::Identity,
                photos: vec![PhotoSource::Url {
                    url: "https://example.test/a.jpg".into(),
                }],
                min_usable: 1,
                replaces: false,
            }
            .into(),
            inputs: JobInputs::default(),
            training: None,
            weights_urls: Vec::new(),
        }
    }

    #[test]
    fn only_an_unstarted_task_past_its_deadline_is_reclaimed() {
        let t = task(10_000);
        assert!(!reclaimed(&t, 1, 10_000), "at the deadline");
        assert!(
            !reclaimed(&t, 1, 10_000 + DEADLINE_SKEW_MS),
            "within the skew"
        );
        assert!(reclaimed(&t, 1, 10_001 + DEADLINE_SKEW_MS));
        assert!(
            !reclaimed(&t, 2, 1_000_000),
            "a redelivery was started: its lease decides"
        );
    }

    #[test]
    fn tasks_round_trip_as_messages() {
        let t = task(10_000);
        let m = Message::json(&t).expect("serialises");
        let back: Task = serde_json::from_str(&m.payload).expect("parses");
        assert_eq!(back, t);
        assert!(
            m.payload.contains(r#""job_type":"identity_preprocessing""#),
            "{}",
            m.payload
        );
    }
}
