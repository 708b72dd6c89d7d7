//! # atelier-scheduler
//!
//! Admits work to the fleet and turns worker reports into recorded,
//! settled outputs.
//!
//! ## Runtime model
//!
//! [`run`] starts the loops below, which stop when the shutdown token
//! fires. One replica is active at a time ([`duty`]: the holder of a lease
//! in the store, `scheduler.duty_lease_secs`): it runs the relay, the
//! dispatcher's rounds, the outcome consumer and the notification relay
//! and housekeeping; the others deliver webhooks, export gauges and take
//! over when the holder's lease runs out.
//!
//! - **outbox relay**: publishes committed outbox rows (written by the API in
//!   the job's creating transaction) and marks them sent, a claimed batch of
//!   up to 500 at a time (one wake-up message per batch); polls every 200 ms
//!   while the outbox is empty.
//! - **dispatcher**: takes and renews the duty; on the active replica,
//!   woken by relay messages on the `scheduler` queue, by recorded
//!   outcomes, and every `scheduler.tick_ms`. For each work queue it
//!   keeps between half of `queue_target` and `queue_target` tasks queued:
//!   it picks the next outputs across accounts with the weighted fair pick
//!   ([`atelier_shared::domain::fair`]), claims them with a lease in one
//!   statement (so two replicas never dispatch one output) and publishes
//!   their tasks together, awaiting the confirms at once. It also reaps
//!   leases that ran out (worker lost) and turns them into retryable
//!   failures.
//! - **outcome consumer**: applies `started`/`heartbeat`/`completed`/`failed`
//!   reports in `scheduler.outcome_concurrency` lanes; a lane applies what
//!   it has waiting (up to 64 reports) in one transaction of idempotent
//!   transitions, then acks them (a group commit).
//! - **gauges**: queue depth, outbox lag and in-flight outputs per account.
//! - **notifications** ([`notify`]): the relay that pushes stored
//!   notifications to live listeners and queues webhook deliveries, the
//!   webhook deliverer, and pruning.
//!
//! ## Guarantees
//!
//! Every state change is a conditional update guarded by the output's live
//! attempt, so duplicate or stale reports are no-ops: an output is recorded,
//! charged and notified once. Retries: `scheduler.retry` (defaults: 4
//! attempts, waits of about 2 s, 4 s, 8 s ± 20 %).

pub mod duty;
pub mod notify;

use atelier_shared::db::scheduling::{Applied, FailureOutcome, JobWork};
use atelier_shared::db::{Store, StoreError};
use atelier_shared::domain::fair::{self, Candidate, Lane};
use atelier_shared::domain::retry::RetryPolicy;
use atelier_shared::domain::task::{OUTCOME_QUEUE, WAKE_QUEUE};
use atelier_shared::domain::trace::TraceParent;
use atelier_shared::domain::{FailureKind, Outcome, Plan, Task, WorkQueue};
use atelier_shared::queue::{Delivery, DynQueue, Message};
use atelier_shared::time::now_ms;
use rand::Rng;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Clone)]
pub struct SchedulerContext {
    pub store: Store,
    pub queue: DynQueue,
    pub tick: Duration,
    pub queue_target: usize,
    pub dispatch_lease: Duration,
    pub running_lease: Duration,
    pub retry: RetryPolicy,
    pub enterprise_weight: u32,
    /// `training.fleet_slots`: trainings running at once across the fleet.
    pub training_slots: u32,
    /// How long a training attempt's signed URLs (dataset, webhook) last.
    pub training_url_ttl: Duration,
    /// How far back trainer time counts in the fair pick, and the slot
    /// time of one training when none ended in that window.
    pub training_window: Duration,
    pub training_quantum: Duration,
    pub instance: String,
    pub notify: notify::NotifyContext,
    /// `scheduler.outcome_concurrency`: reports applied at once.
    pub outcome_lanes: usize,
    /// `scheduler.credit_audit_secs` (none: no audit).
    pub credit_audit: Option<Duration>,
    /// Whether this replica is the active one (see [`duty`]).
    pub duty: Arc<duty::Duty>,
}

impl SchedulerContext {
    pub fn from_config(
        cfg: &atelier_shared::config::Config,
        store: Store,
        queue: DynQueue,
        events: atelier_shared::events::EventBus,
        links: atelier_shared::storage::Links,
        egress: atelier_shared::egress::EgressPolicy,
    ) -> SchedulerContext {
        let instance = format!("sch_{}_{}", std::process::id(), ulid::Ulid::new());
        SchedulerContext {
            store,
            queue,
            tick: Duration::from_millis(cfg.scheduler.tick_ms),
            queue_target: cfg.queue_target(),
            dispatch_lease: Duration::from_secs(cfg.scheduler.dispatch_lease_secs),
            running_lease: Duration::from_secs(cfg.scheduler.running_lease_secs),
            retry: cfg.scheduler.retry,
            enterprise_weight: cfg.scheduler.enterprise_weight,
            training_slots: cfg.training.fleet_slots,
            // The longest training, plus the time it may wait in the queue.
            training_url_ttl: Duration::from_secs(cfg.training.timeout_secs.saturating_mul(2)),
            training_window: Duration::from_secs(cfg.training.share_window_secs),
            training_quantum: Duration::from_secs(cfg.training.share_quantum_secs.max(1)),
            instance: instance.clone(),
            duty: Arc::new(duty::Duty::new(
                duty::DISPATCH,
                &instance,
                Duration::from_secs(cfg.scheduler.duty_lease_secs),
            )),
            credit_audit: (cfg.scheduler.credit_audit_secs > 0)
                .then(|| Duration::from_secs(cfg.scheduler.credit_audit_secs)),
            // SQLite has one writer: parallel reports would only queue for it
            // while holding pool connections.
            outcome_lanes: if cfg.database_url().starts_with("sqlite:") {
                1
            } else {
                cfg.scheduler.outcome_concurrency
            },
            notify: notify::NotifyContext {
                events,
                links,
                // Validated with the configuration.
                egress,
                notifications: cfg.notifications.clone(),
                webhooks: cfg.webhooks.clone(),
                result_url_ttl: Duration::from_secs(cfg.limits.result_url_ttl_secs),
                idempotency_ttl: Duration::from_secs(cfg.limits.idempotency_ttl_secs),
            },
        }
    }
}

pub async fn run(ctx: SchedulerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let wake = Arc::new(Notify::new());
    tracing::info!(instance = %ctx.instance, queue_target = ctx.queue_target, "scheduler running");
    // One replica is active at a time (the holder of the duty, taken and
    // renewed by the dispatcher loop); the others stand by, ready to take
    // over, and only deliver webhooks and export gauges.
    let duty = ctx.duty.clone();
    let held = |work: OnDuty| {
        let (ctx, wake, duty, stop) = (ctx.clone(), wake.clone(), duty.clone(), shutdown.clone());
        async move {
            duty.run_while_held(&stop, |on_duty| work(ctx.clone(), wake.clone(), on_duty))
                .await
        }
    };
    tokio::join!(
        dispatcher(ctx.clone(), wake.clone(), shutdown.clone()),
        held(|c, _, s| Box::pin(outbox_relay(c, s))),
        held(|c, w, s| Box::pin(wake_consumer(c, w, s))),
        held(|c, w, s| Box::pin(outcome_consumer(c, w, s))),
        held(|c, _, s| Box::pin(notify::relay(c, s))),
        held(|c, _, s| Box::pin(notify::housekeeping(c, s))),
        gauges(ctx.clone(), shutdown.clone()),
        notify::deliverer(ctx.clone(), shutdown.clone()),
    );
    Ok(())
}

/// A loop that runs on the active replica only.
type OnDuty = fn(
    SchedulerContext,
    Arc<Notify>,
    CancellationToken,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

pub(crate) async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// How often an idle relay deletes outbox rows marked sent by a relay of the
/// previous version ([`atelier_shared::db::Store::delete_marked_outbox`]).
const MARKED_OUTBOX_SWEEP: Duration = Duration::from_secs(600);

async fn outbox_relay(ctx: SchedulerContext, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    let mut swept = std::time::Instant::now();
    loop {
        match ctx.store.claim_outbox(500, 30_000).await {
            Ok(rows) if rows.is_empty() => {
                backoff = Duration::from_millis(200);
                // Idle: now and then, the rows a relay of the previous
                // version left marked instead of deleted (a rolling
                // upgrade), which no claim returns.
                if swept.elapsed() >= MARKED_OUTBOX_SWEEP {
                    swept = std::time::Instant::now();
                    match ctx.store.delete_marked_outbox().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(
                            rows = n,
                            "relay: deleted outbox rows marked sent by a previous version"
                        ),
                        Err(e) => {
                            tracing::debug!(error = %e, "relay: cannot delete marked outbox rows yet")
                        }
                    }
                }
            }
            Ok(rows) => match relay_batch(&ctx, rows).await {
                Ok(()) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "relay: publish failed; will retry");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "relay: store unavailable");
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        if sleep_or_stop(backoff, &stop).await {
            return;
        }
    }
}

/// Publishes one claimed batch of outbox rows and marks it sent with one
/// statement. Wake-ups for the dispatcher carry nothing it reads (it looks
/// at the store), so a batch of them is one message; rows of any other
/// topic are published one message each, concurrently, confirms awaited
/// together. Rows whose publish failed are given back for the next round;
/// a row published but not marked (the store failed in between) is
/// published again, which consumers tolerate (at-least-once).
async fn relay_batch(
    ctx: &SchedulerContext,
    rows: Vec<atelier_shared::db::outbox::OutboxRow>,
) -> anyhow::Result<()> {
    let (wakes, others): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.topic == WAKE_QUEUE);
    let mut sent = Vec::with_capacity(wakes.len() + others.len());
    let mut failed: Option<(Vec<i64>, String)> = None;
    if !wakes.is_empty() {
        let m = Message::json(&serde_json::json!({"event": "wake", "rows": wakes.len()}))?;
        match ctx.queue.publish(WAKE_QUEUE, m).await {
            Ok(()) => sent.extend(wakes.iter().map(|r| r.id)),
            Err(e) => failed = Some((wakes.iter().map(|r| r.id).collect(), e.to_string())),
        }
    }
    let results = futures::future::join_all(others.iter().map(|row| {
        let m = Message {
            payload: row.payload.clone(),
            headers: Default::default(),
            delay: None,
        };
        ctx.queue.publish(&row.topic, m)
    }))
    .await;
    for (row, r) in others.iter().zip(results) {
        match r {
            Ok(()) => sent.push(row.id),
            Err(e) => {
                let f = failed.get_or_insert_with(|| (Vec::new(), e.to_string()));
                f.0.push(row.id);
            }
        }
    }
    if let Err(e) = ctx.store.mark_outbox_sent(&sent).await {
        tracing::warn!(error = %e, rows = sent.len(), "relay: cannot mark sent (they will be published again)");
    }
    match failed {
        None => Ok(()),
        Some((ids, error)) => {
            for id in ids {
                let _ = ctx.store.release_outbox(id, &error).await;
            }
            anyhow::bail!(error)
        }
    }
}

/// Wake-ups (a job was admitted), on the active replica only.
async fn wake_consumer(ctx: SchedulerContext, wake: Arc<Notify>, stop: CancellationToken) {
    let mut c = loop {
        match ctx.queue.consume(WAKE_QUEUE, 32).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler: cannot consume wake-ups yet");
                if sleep_or_stop(Duration::from_secs(1), &stop).await {
                    return;
                }
            }
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            d = c.next() => match d {
                Some(d) => { wake.notify_one(); let _ = d.ack().await; }
                None => return,
            }
        }
    }
}

/// Dispatch rounds, on the replica holding the dispatch duty
/// ([`duty`]); the others only check now and then whether it is free.
async fn dispatcher(ctx: SchedulerContext, wake: Arc<Notify>, stop: CancellationToken) {
    let mut lanes_assigned: Option<std::time::Instant> = None;
    let mut lanes_seen = [0usize; WorkQueue::ALL.len()];
    loop {
        if ctx.duty.held(&ctx.store).await {
            if lanes_assigned.is_none_or(|t| t.elapsed() >= ASSIGN_LANES_EVERY) {
                assign_lanes(&ctx).await;
                lanes_assigned = Some(std::time::Instant::now());
            }
            if let Err(e) = reap(&ctx).await {
                tracing::warn!(error = %e, "scheduler: reaping failed");
            }
            for (q, seen) in WorkQueue::ALL.into_iter().zip(lanes_seen.iter_mut()) {
                if let Err(e) = dispatch_queue(&ctx, q, seen).await {
                    tracing::warn!(queue = %q, error = %e, "scheduler: dispatch failed");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(ctx.tick) => {}
        }
    }
    ctx.duty.release(&ctx.store).await;
}

/// How often the dispatcher gives pending outputs without a lane theirs
/// ([`Store::assign_lanes`]): only outputs written by an API of the
/// previous version during a rolling upgrade lack one, so a few seconds'
/// delay for those is the price of not running the update every round.
const ASSIGN_LANES_EVERY: Duration = Duration::from_secs(5);

async fn assign_lanes(ctx: &SchedulerContext) {
    for q in WorkQueue::ALL {
        match ctx.store.assign_lanes(q).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(queue = %q, outputs = n, "scheduler: gave outputs without a lane theirs")
            }
            Err(e) => tracing::warn!(queue = %q, error = %e, "scheduler: cannot assign lanes"),
        }
    }
}

/// Turns expired leases into retryable failures (the worker died or hung).
async fn reap(ctx: &SchedulerContext) -> anyhow::Result<()> {
    for (output_id, attempt) in ctx.store.expired_leases(now_ms(), 100).await? {
        let unit: f64 = rand::rng().random();
        let r = ctx
            .store
            .record_failure(
                output_id,
                attempt,
                &FailureKind::Retryable,
                "lease expired: the worker was lost or timed out",
                &ctx.retry,
                unit,
            )
            .await;
        match r {
            Ok(r) => {
                tracing::warn!(output_id, attempt, outcome = ?r, "scheduler: reclaimed an expired lease");
                metrics::counter!("atelier_leases_reaped_total").increment(1);
            }
            // A job this version cannot read stays as it is for one that
            // can; the other expired leases are still reaped.
            Err(e @ StoreError::Corrupt(_)) => {
                tracing::error!(output_id, error = %e, "scheduler: cannot reap an output of an unreadable job");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Tops the queue up to its target with a fair pick across accounts. Each
/// task carries its job's spec and resolved inputs, read once per job and
/// round.
///
/// `lanes_seen`: how many accounts had outputs eligible in this queue's
/// last round (kept by the caller from round to round).
async fn dispatch_queue(
    ctx: &SchedulerContext,
    queue: WorkQueue,
    lanes_seen: &mut usize,
) -> anyhow::Result<()> {
    let queued = usize::try_from(ctx.store.queued_count(queue).await?).unwrap_or(usize::MAX);
    // Topped up only once at most half of the target is left: under load a
    // round claims and publishes many tasks at once instead of one or two
    // per report, and the candidate query runs that much less often.
    // Workers still have half the target queued when a round starts.
    if queue != WorkQueue::Training && queued > ctx.queue_target / 2 {
        return Ok(());
    }
    let mut slots = ctx.queue_target.saturating_sub(queued);
    let mut in_flight = None;
    if queue == WorkQueue::Training && slots > 0 {
        // A training holds a trainer for its whole run: only as many are
        // handed out as the fleet has slots, so the fair pick below decides
        // which account's training gets the next free one.
        let per_account = ctx.store.in_flight_by_account(queue).await?;
        let busy: u32 = per_account.values().sum();
        slots = slots.min(ctx.training_slots.saturating_sub(busy) as usize);
        in_flight = Some(per_account);
    }
    if slots == 0 {
        return Ok(());
    }
    // Each lane's oldest few first (about twice its share, by the lanes
    // the last round saw), all of every lane's possible share only when
    // the pick needs it: with many accounts waiting, reading `slots`
    // outputs of each was most of a round's cost.
    let mut limit = fair::first_read(slots, *lanes_seen);
    let mut candidates = ctx.store.dispatch_candidates(queue, limit as i64).await?;
    if candidates.is_empty() {
        *lanes_seen = 0;
        return Ok(());
    }
    // What the pick weighs besides the outputs, read once per round.
    let in_flight = match in_flight {
        Some(m) => m,
        None => ctx.store.in_flight_by_account(queue).await?,
    };
    let used = if queue == WorkQueue::Training {
        training_usage(ctx).await?
    } else {
        Default::default()
    };
    let (picked, jobs) = loop {
        let mut lanes: BTreeMap<String, Lane> = BTreeMap::new();
        let mut jobs = std::collections::HashMap::new();
        for c in candidates {
            let weight = match c.plan {
                Plan::Enterprise => ctx.enterprise_weight,
                Plan::Standard => 1,
            };
            let lane = lanes.entry(c.account_id.clone()).or_insert_with(|| Lane {
                account: c.account_id.clone(),
                weight,
                in_flight: in_flight.get(&c.account_id).copied().unwrap_or(0),
                used_millis: used.get(&c.account_id).copied().unwrap_or(0),
                waiting: VecDeque::new(),
            });
            lane.waiting.push_back(Candidate {
                output_id: c.output_id,
                ready_at: c.ready_at,
            });
            jobs.insert(c.output_id, c.job_id);
        }
        *lanes_seen = lanes.len();
        if let Some(picked) = fair::pick_within(lanes.into_values().collect(), slots, limit) {
            break (picked, jobs);
        }
        metrics::counter!("atelier_dispatch_rereads_total", "type" => queue.as_str()).increment(1);
        limit = slots;
        candidates = ctx.store.dispatch_candidates(queue, limit as i64).await?;
    };
    // What every task of a job carries, read once per job this round, for
    // all of the round's jobs in one statement.
    let picks: Vec<(i64, String)> = picked
        .into_iter()
        .filter_map(|(_, pick)| Some((pick.output_id, jobs.get(&pick.output_id)?.clone())))
        .collect();
    let mut ids: Vec<String> = picks.iter().map(|(_, j)| j.clone()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut read = ctx.store.job_works(&ids).await?;
    let mut work: std::collections::HashMap<String, Work> = Default::default();
    for job_id in ids {
        let w = match read.remove(&job_id) {
            Some(Ok(Some(w))) => Work::Ready(w),
            None | Some(Ok(None)) => Work::Gone,
            // A kind or spec this version cannot read (a newer API
            // admitted it during an upgrade): left pending for a
            // scheduler that can, without holding up the others.
            Some(Err(e @ StoreError::Corrupt(_))) => {
                tracing::error!(job.id = %job_id, error = %e, "scheduler: cannot read this job; leaving it pending");
                metrics::counter!("atelier_unreadable_jobs_total").increment(1);
                Work::Unreadable
            }
            Some(Err(e)) => return Err(e.into()),
        };
        work.insert(job_id, w);
    }
    let mut runnable: Vec<(i64, String)> = Vec::new();
    for (output_id, job_id) in picks {
        match work.get(&job_id) {
            Some(Work::Ready(job)) if job.waiting => {}
            Some(Work::Ready(job)) if job.blocked.is_some() => {
                let why = job.blocked.clone().unwrap_or_default();
                fail_unrunnable(ctx, output_id, &why).await?;
            }
            Some(Work::Ready(_)) => runnable.push((output_id, job_id)),
            Some(Work::Unreadable) | None => {}
            Some(Work::Gone) => {
                // Its job is gone, or an input of a job admitted before
                // inputs were resolved at admission is: fail it for good.
                fail_unrunnable(ctx, output_id, "an input of this job no longer exists")
                    .await?;
            }
        }
    }
    if runnable.is_empty() {
        return Ok(());
    }
    // One claim for the round (those another replica took are missing),
    // then every task published at once, their confirms awaited together.
    let deadline = now_ms() + ctx.dispatch_lease.as_millis() as i64;
    let ids: Vec<i64> = runnable.iter().map(|(id, _)| *id).collect();
    let mut claims = ctx
        .store
        .claim_many_for_dispatch(&ids, deadline, &ctx.instance)
        .await?;
    let mut sends = Vec::with_capacity(claims.len());
    let mut first_error: Option<anyhow::Error> = None;
    for (output_id, job_id) in runnable {
        let Some(claim) = claims.remove(&output_id) else {
            continue; // another replica took it
        };
        let Some(Work::Ready(job)) = work.get(&job_id) else {
            continue;
        };
        let attempt = claim.attempt;
        // The dispatch is a hop of the job's trace (a new root for jobs
        // created before traces were kept).
        let parent = job.traceparent.as_deref().and_then(TraceParent::parse);
        let span = tracing::info_span!("dispatch", job.id = %job_id, output.id = output_id, attempt, queue = %queue);
        if let Some(p) = &parent {
            atelier_shared::telemetry::adopt(&span, p);
        }
        let trace = atelier_shared::telemetry::hop_of(&span, parent.as_ref());
        let built = async {
            let task = Task {
                job_id,
                account_id: job.account_id.clone(),
                output_id,
                attempt,
                deadline_ms: deadline,
                traceparent: Some(trace.to_string()),
                output: claim.output,
                work: job.spec.clone(),
                inputs: job.inputs.clone(),
                training: training_links(ctx, &job.spec, output_id, attempt).await?,
                weights_urls: weights_urls(ctx, &job.spec).await?,
            };
            anyhow::Ok(Message::json(&task)?.with_header("traceparent", trace.to_string()))
        }
        .await;
        let message = match built {
            Ok(m) => m,
            Err(e) => {
                // Given back, as the others are when their publish fails;
                // the rest of the round still goes out.
                ctx.store.unclaim(output_id, attempt).await?;
                first_error.get_or_insert(e);
                continue;
            }
        };
        tracing::debug!(trace_id = %trace.trace_id_hex(), output_id, attempt, "dispatching");
        sends.push(
            async move {
                let r = ctx.queue.publish(queue.as_str(), message).await;
                (output_id, attempt, r)
            }
            .instrument(span),
        );
    }
    for (output_id, attempt, r) in futures::future::join_all(sends).await {
        match r {
            Ok(()) => {
                metrics::counter!("atelier_tasks_dispatched_total", "type" => queue.as_str())
                    .increment(1);
            }
            Err(e) => {
                ctx.store.unclaim(output_id, attempt).await?;
                first_error.get_or_insert(e.into());
            }
        }
    }
    match first_error {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// The trainer time each account had within `training.share_window`, in
/// thousandths of one training's worth (the window's mean training, or
/// `training.share_quantum` when none ended in it): what the fair pick
/// weighs besides what is in flight, so that trainer time is shared.
async fn training_usage(
    ctx: &SchedulerContext,
) -> anyhow::Result<std::collections::HashMap<String, u64>> {
    let now = now_ms();
    let since = now - i64::try_from(ctx.training_window.as_millis()).unwrap_or(i64::MAX / 2);
    let (per_account, mean) = ctx
        .store
        .slot_time_by_account(WorkQueue::Training, since, now)
        .await?;
    let quantum = mean
        .filter(|m| *m > 0)
        .unwrap_or_else(|| i64::try_from(ctx.training_quantum.as_millis()).unwrap_or(1))
        .max(1) as u64;
    Ok(per_account
        .into_iter()
        .map(|(a, ms)| (a, (ms.max(0) as u64).saturating_mul(1000) / quantum))
        .collect())
}

/// The signed URLs of one attempt of a training: the frozen dataset, and
/// the webhook its trainer reports to (any API replica verifies it).
async fn training_links(
    ctx: &SchedulerContext,
    spec: &atelier_shared::domain::JobSpec,
    output_id: i64,
    attempt: i64,
) -> anyhow::Result<Option<atelier_shared::domain::task::TrainingLinks>> {
    let atelier_shared::domain::JobSpec::Training(spec) = spec else {
        return Ok(None);
    };
    let links = &ctx.notify.links;
    let dataset_url = links
        .object_url(&spec.dataset_key, "application/zip", ctx.training_url_ttl)
        .await?;
    let exp = now_ms() + i64::try_from(ctx.training_url_ttl.as_millis()).unwrap_or(i64::MAX / 2);
    let token = links.signer.sign(
        &atelier_shared::storage::Capability::TrainingEvents { output_id, attempt },
        exp,
    );
    Ok(Some(atelier_shared::domain::task::TrainingLinks {
        dataset_url,
        webhook_url: format!("{}/internal/training-events/{token}", links.base),
    }))
}

/// Signed URLs of the trained weights a prediction uses (valid for an
/// hour: the task runs within its leases).
async fn weights_urls(
    ctx: &SchedulerContext,
    spec: &atelier_shared::domain::JobSpec,
) -> anyhow::Result<Vec<String>> {
    let atelier_shared::domain::JobSpec::Prediction(spec) = spec else {
        return Ok(Vec::new());
    };
    let mut urls = Vec::with_capacity(spec.loras.len());
    for l in &spec.loras {
        urls.push(
            ctx.notify
                .links
                .object_url(
                    &l.weights_key,
                    &l.weights_content_type,
                    Duration::from_secs(3600),
                )
                .await?,
        );
    }
    Ok(urls)
}

/// What dispatch found of a job.
enum Work {
    Ready(JobWork),
    /// The job or one of its inputs no longer exists.
    Gone,
    /// Stored in a form this version cannot read.
    Unreadable,
}

/// Fails an output whose job can no longer run (its inputs are gone): it
/// is claimed like a dispatch and its attempt recorded as a permanent
/// failure, so it is released, counted and notified like any other.
async fn fail_unrunnable(ctx: &SchedulerContext, output_id: i64, why: &str) -> anyhow::Result<()> {
    let deadline = now_ms() + ctx.dispatch_lease.as_millis() as i64;
    if let Some(claim) = ctx
        .store
        .claim_for_dispatch(output_id, deadline, &ctx.instance)
        .await?
    {
        ctx.store
            .record_failure(
                output_id,
                claim.attempt,
                &FailureKind::Permanent,
                why,
                &ctx.retry,
                0.0,
            )
            .await?;
    }
    Ok(())
}

/// Applies workers' reports, `scheduler.outcome_concurrency` lanes at a
/// time: a delivery goes to the lane of its output (`output_id` modulo the
/// lanes), so that the reports of one output (started, heartbeats,
/// completed) are applied in the order they arrived while different
/// outputs' reports do not wait for each other. A lane applies the reports
/// it has waiting, up to [`OUTCOME_BATCH`], in one transaction and
/// acknowledges them once it committed; if that fails it applies them one
/// by one, so that a report the store refuses goes back to the broker
/// alone (each report is idempotent, so applying one again is harmless).
async fn outcome_consumer(ctx: SchedulerContext, wake: Arc<Notify>, stop: CancellationToken) {
    let lanes = ctx.outcome_lanes.max(1);
    let mut c = loop {
        match ctx
            .queue
            .consume(OUTCOME_QUEUE, (64 * lanes).min(1024))
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler: cannot consume outcomes yet");
                if sleep_or_stop(Duration::from_secs(1), &stop).await {
                    return;
                }
            }
        }
    };
    let mut senders = Vec::with_capacity(lanes);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..lanes {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Outcome, Delivery)>(64);
        senders.push(tx);
        let (ctx, wake) = (ctx.clone(), wake.clone());
        workers.spawn(async move {
            while let Some(first) = rx.recv().await {
                // Whatever else this lane has waiting goes in the same
                // transaction (one commit, one write per account row).
                let mut batch = vec![first];
                while batch.len() < OUTCOME_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                settle(&ctx, &wake, batch).await;
            }
        });
    }
    loop {
        let d = tokio::select! {
            _ = stop.cancelled() => break,
            d = c.next() => match d { Some(d) => d, None => break },
        };
        let outcome: Outcome = match d.parse() {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "scheduler: malformed outcome; dead-lettering");
                let _ = d.dead_letter(&format!("malformed outcome: {e}")).await;
                continue;
            }
        };
        let lane = outcome.output_id().rem_euclid(lanes as i64) as usize;
        if senders[lane].send((outcome, d)).await.is_err() {
            break;
        }
    }
    // Reports already handed to a lane are applied and acknowledged;
    // whatever was not is redelivered by the broker.
    drop(senders);
    while workers.join_next().await.is_some() {}
}

/// The work queue of an output, for metric labels (`unknown` if it is gone).
async fn queue_of(ctx: &SchedulerContext, output_id: i64) -> &'static str {
    match ctx.store.output(output_id).await {
        Ok(Some(o)) => o.queue.as_str(),
        _ => "unknown",
    }
}

/// Applies a lane's batch in one transaction and acknowledges it. One
/// report the store refuses must not hold the others back (nor take them
/// to the dead letters with it): when the batch fails, its reports are
/// applied again one at a time, and only those that fail alone go back.
async fn settle(ctx: &SchedulerContext, wake: &Notify, batch: Vec<(Outcome, Delivery)>) {
    let (outcomes, deliveries): (Vec<Outcome>, Vec<Delivery>) = batch.into_iter().unzip();
    let applied = apply(ctx, &outcomes).await;
    if let Err(e) = &applied
        && outcomes.len() > 1
    {
        tracing::debug!(error = %e, reports = outcomes.len(), "scheduler: batch failed; applying its reports one by one");
        for (outcome, d) in outcomes.iter().zip(deliveries) {
            let alone = apply(ctx, std::slice::from_ref(outcome)).await;
            acknowledge(wake, alone, outcome, vec![d]).await;
        }
        return;
    }
    if let Some(first) = outcomes.first() {
        acknowledge(wake, applied, first, deliveries).await;
    }
}

/// Acks `deliveries` once their reports are recorded (waking the
/// dispatcher when a slot was freed), or hands them back for a later
/// redelivery. `first` names the reports in the log.
async fn acknowledge(
    wake: &Notify,
    applied: anyhow::Result<bool>,
    first: &Outcome,
    deliveries: Vec<Delivery>,
) {
    match applied {
        Ok(freed) => {
            if freed {
                wake.notify_one();
            }
            for d in deliveries {
                let _ = d.ack().await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, output_id = first.output_id(), "scheduler: cannot record outcome yet; requeueing");
            for d in deliveries {
                let _ = d.nack(Some(Duration::from_secs(1))).await;
            }
        }
    }
}

/// Reports a lane applies in one transaction at most.
const OUTCOME_BATCH: usize = 64;

/// Applies a batch of reports in one transaction ([`Store::apply_outcomes`])
/// and counts them. Returns whether an output slot was freed.
pub async fn apply(ctx: &SchedulerContext, outcomes: &[Outcome]) -> anyhow::Result<bool> {
    let lease = now_ms() + ctx.running_lease.as_millis() as i64;
    let units: Vec<f64> = outcomes.iter().map(|_| rand::rng().random()).collect();
    let applied = ctx
        .store
        .apply_outcomes(outcomes, lease, &ctx.retry, &units)
        .await?;
    let mut freed = false;
    for (outcome, applied) in outcomes.iter().zip(applied) {
        let output_id = outcome.output_id();
        match applied {
            Applied::Started(started) => {
                if !started {
                    tracing::debug!(output_id, "scheduler: stale start ignored");
                }
            }
            Applied::Extended(_) => {}
            Applied::Completed(recorded) => {
                let (queue, label) = match recorded {
                    Some(q) => (q.as_str(), "completed"),
                    None => (queue_of(ctx, output_id).await, "stale"),
                };
                metrics::counter!("atelier_tasks_total", "type" => queue, "outcome" => label)
                    .increment(1);
                freed |= recorded.is_some();
            }
            Applied::Failed(r) => {
                let queue = queue_of(ctx, output_id).await;
                let label = match r {
                    FailureOutcome::Retried { .. } => {
                        metrics::counter!("atelier_retries_total", "type" => queue).increment(1);
                        "retried"
                    }
                    FailureOutcome::FellBack { .. } => "fell_back",
                    FailureOutcome::Failed => "failed",
                    FailureOutcome::Ignored => "stale",
                };
                metrics::counter!("atelier_tasks_total", "type" => queue, "outcome" => label)
                    .increment(1);
                freed = true;
            }
        }
    }
    Ok(freed)
}

async fn gauges(ctx: SchedulerContext, stop: CancellationToken) {
    // Accounts reported last round: one that has nothing in flight any more
    // is set to 0, not left at its last value.
    let mut reported: std::collections::HashSet<String> = Default::default();
    let mut round: u64 = 0;
    loop {
        round += 1;
        let queues = WorkQueue::ALL.map(WorkQueue::as_str);
        for q in queues.iter().chain([&OUTCOME_QUEUE, &WAKE_QUEUE]) {
            if let Ok(n) = ctx.queue.depth(q).await {
                metrics::gauge!("atelier_queue_depth", "queue" => *q).set(n as f64);
            }
        }
        if let Ok(lag) = ctx.store.outbox_lag_ms().await {
            metrics::gauge!("atelier_outbox_lag_seconds").set(lag as f64 / 1000.0);
        }
        // How long the oldest output due to run has waited for a worker,
        // per work queue (0 when none waits): the backlog-age alert.
        let now = atelier_shared::time::now_ms();
        for q in WorkQueue::ALL {
            if let Ok(oldest) = ctx.store.oldest_waiting(q, now).await {
                let age = oldest.map_or(0, |at| now.saturating_sub(at).max(0));
                metrics::gauge!("atelier_queue_oldest_waiting_seconds", "queue" => q.as_str())
                    .set(age as f64 / 1000.0);
            }
        }
        // Live workers per queue, from their presence records (every
        // third round: one read per worker); the records of workers gone
        // for an hour are deleted.
        let objects = ctx.notify.links.objects.as_ref();
        if round % 3 == 1
            && let Ok(known) = atelier_shared::fleet::workers(objects).await
        {
            for (q, n) in atelier_shared::fleet::alive_per_queue(&known, now) {
                metrics::gauge!("atelier_workers_alive", "queue" => q.as_str()).set(f64::from(n));
            }
            if let Err(e) = atelier_shared::fleet::forget_gone(objects, &known, now).await {
                tracing::debug!(error = %e, "scheduler: cannot delete gone workers' presence records");
            }
        }
        // What each work queue still has to do, by state: trainer pools
        // scale on it (a running training has no ready message).
        for q in WorkQueue::ALL {
            if let Ok(states) = ctx.store.open_by_state(q).await {
                for s in atelier_shared::domain::OutputStatus::OPEN {
                    let n = states
                        .iter()
                        .find(|(st, _)| *st == s)
                        .map_or(0, |(_, n)| *n);
                    metrics::gauge!("atelier_outputs_open", "queue" => q.as_str(), "state" => s.as_str())
                        .set(n as f64);
                }
            }
        }
        // Outputs holding a lease, per account, over every work queue.
        if let Ok(m) = ctx.store.in_flight_everywhere().await {
            for gone in reported.iter().filter(|a| !m.contains_key(*a)) {
                metrics::gauge!("atelier_in_flight", "account" => gone.clone()).set(0.0);
            }
            reported = m.keys().cloned().collect();
            for (acc, n) in m {
                metrics::gauge!("atelier_in_flight", "account" => acc).set(f64::from(n));
            }
        }
        if let Ok(t) = ctx.store.credit_totals().await {
            metrics::gauge!("atelier_credits_reserved").set(t.reserved as f64 / 1000.0);
            // Ledger totals only grow: counters, set from the store.
            metrics::counter!("atelier_credits_charged_millicredits_total")
                .absolute(u64::try_from(t.charged).unwrap_or(0));
            metrics::counter!("atelier_credits_released_millicredits_total")
                .absolute(u64::try_from(t.released).unwrap_or(0));
        }
        if sleep_or_stop(Duration::from_secs(5), &stop).await {
            return;
        }
    }
}
