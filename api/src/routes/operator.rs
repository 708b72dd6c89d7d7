//! The operator view (the console's operator tab, tooling): the queues,
//! the workers, the busiest accounts and the effective configuration
//! (secrets redacted), and the dead letters, looked at and moved back to
//! their queue. Operator accounts only: to any other key these routes do
//! not exist (404), as with the credit grants.

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Query};
use crate::state::AppState;
use atelier_shared::db::accounts::Account;
use atelier_shared::domain::task::{OUTCOME_QUEUE, WAKE_QUEUE};
use atelier_shared::domain::{Credits, OutputStatus, WorkQueue};
use atelier_shared::fleet::Presence;
use atelier_shared::queue::DynQueue;
use atelier_shared::queue::dead::{self, DeadLetter};
use atelier_shared::time::{iso8601, now_ms};
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The window of a queue's rate (`finished_per_minute`).
const RATE_WINDOW_MS: i64 = 5 * 60 * 1000;
/// Accounts the overview lists at most.
const TOP_ACCOUNTS: usize = 50;
/// Dead letters one look shows at most.
const MAX_PEEK: usize = 100;

/// One queue as operators see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueView {
    pub name: String,
    /// `work` (workers consume it), `reports` (workers' outcomes, the
    /// scheduler consumes them) or `wake` (the scheduler's wake-ups).
    pub role: &'static str,
    /// Messages ready or delayed in the broker; null: the broker did not say.
    pub depth: Option<u64>,
    /// Messages in `<name>.dead`; null: the broker did not say.
    pub dead_letters: Option<u64>,
    /// Work queues: outputs not finished, by state (`pending`,
    /// `dispatched`, `running`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open: Option<HashMap<String, i64>>,
    /// Work queues: how long the longest-waiting due output has waited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_waiting_seconds: Option<f64>,
    /// Work queues: outputs that completed in the last five minutes, per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_per_minute: Option<f64>,
    /// Work queues: outputs that failed for good in the last five minutes, per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_per_minute: Option<f64>,
    /// Work queues: live workers that consume it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers_alive: Option<u32>,
}

/// A worker's presence record and what it means now.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkerView {
    #[serde(flatten)]
    pub presence: Presence,
    /// Renewed its record within three intervals.
    pub alive: bool,
    /// Seconds since its last record.
    pub seen_seconds_ago: f64,
    pub started_at: String,
}

/// An account's work and credits now.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AccountActivity {
    pub id: String,
    pub name: String,
    pub plan: String,
    pub is_operator: bool,
    /// Outputs holding a lease (dispatched or running), every queue.
    pub in_flight: u32,
    pub active_jobs: i64,
    pub credits: f64,
    pub reserved_credits: f64,
    pub available_credits: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Overview {
    pub generated_at: String,
    /// `embedded` or `rabbitmq`; null: this API process has no queue.
    pub queue_kind: Option<&'static str>,
    pub queues: Vec<QueueView>,
    pub workers: Vec<WorkerView>,
    /// Accounts with work in flight or credits reserved, busiest first
    /// (at most 50).
    pub accounts: Vec<AccountActivity>,
    pub account_count: i64,
    /// The effective configuration of this API process, secrets redacted.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
}

/// Refuses every caller that is not an operator, as if the route did not
/// exist (every operator-only route).
pub(crate) fn operator(acc: &Account) -> ApiResult<()> {
    if acc.is_operator == 1 {
        Ok(())
    } else {
        Err(ApiError::not_found("No such route"))
    }
}

fn queue_of(s: &AppState) -> ApiResult<&DynQueue> {
    s.queue
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("This API process has no queue connection", 5))
}

fn queue_name(name: &str) -> ApiResult<&'static str> {
    dead::known(name).map_err(|why| ApiError::bad_request(Some("queue"), why, "path"))
}

/// The work queues, the reports queue and the wake-ups: depths, dead
/// letters, what each work queue has open and its recent rate.
async fn queues(s: &AppState, alive: &[(WorkQueue, u32)], now: i64) -> ApiResult<Vec<QueueView>> {
    let depth = |name: String| async move {
        match &s.queue {
            Some(q) => q.depth(&name).await.ok(),
            None => None,
        }
    };
    let minutes = RATE_WINDOW_MS as f64 / 60_000.0;
    let mut views = Vec::new();
    for q in WorkQueue::ALL {
        let open = s.store.open_by_state(q).await?;
        let oldest = s.store.oldest_waiting(q, now).await?;
        let finished = s.store.finished_since(q, now - RATE_WINDOW_MS).await?;
        views.push(QueueView {
            name: q.as_str().into(),
            role: "work",
            depth: depth(q.as_str().into()).await,
            dead_letters: depth(dead::of(q.as_str())).await,
            open: Some(
                OutputStatus::OPEN
                    .iter()
                    .map(|st| {
                        let n = open.iter().find(|(o, _)| o == st).map_or(0, |(_, n)| *n);
                        (st.as_str().to_string(), n)
                    })
                    .collect(),
            ),
            oldest_waiting_seconds: Some(
                oldest.map_or(0.0, |at| now.saturating_sub(at).max(0) as f64 / 1000.0),
            ),
            completed_per_minute: Some(finished.completed as f64 / minutes),
            failed_per_minute: Some(finished.failed as f64 / minutes),
            workers_alive: alive.iter().find(|(w, _)| *w == q).map(|(_, n)| *n),
        });
    }
    for (name, role) in [(OUTCOME_QUEUE, "reports"), (WAKE_QUEUE, "wake")] {
        views.push(QueueView {
            name: name.into(),
            role,
            depth: depth(name.into()).await,
            dead_letters: depth(dead::of(name)).await,
            open: None,
            oldest_waiting_seconds: None,
            completed_per_minute: None,
            failed_per_minute: None,
            workers_alive: None,
        });
    }
    Ok(views)
}

/// The accounts with the most in flight, then those with the most
/// credits reserved, at most [`TOP_ACCOUNTS`].
async fn busiest(s: &AppState) -> ApiResult<Vec<AccountActivity>> {
    let in_flight = s.store.in_flight_everywhere().await?;
    let mut ranked: Vec<(&String, &u32)> = in_flight.iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let mut accounts = Vec::new();
    for (id, _) in ranked.into_iter().take(TOP_ACCOUNTS) {
        if let Some(a) = s.store.account(id).await? {
            accounts.push(a);
        }
    }
    for a in s.store.accounts_by_reserved(TOP_ACCOUNTS as i64).await? {
        if accounts.len() >= TOP_ACCOUNTS {
            break;
        }
        if !accounts.iter().any(|b| b.id == a.id) {
            accounts.push(a);
        }
    }
    Ok(accounts
        .into_iter()
        .map(|a| {
            let b = a.credits();
            AccountActivity {
                in_flight: in_flight.get(&a.id).copied().unwrap_or(0),
                is_operator: a.is_operator == 1,
                plan: a.plan.as_str().to_string(),
                active_jobs: a.active_jobs,
                credits: Credits(a.balance).as_f64(),
                reserved_credits: Credits(a.reserved).as_f64(),
                available_credits: b.available().as_f64(),
                id: a.id,
                name: a.name,
            }
        })
        .collect())
}

/// Operators only: the queues (depth, dead letters, open outputs, rate,
/// live workers), the workers (alive, queues, device, in flight), the
/// busiest accounts (in flight, credits) and the effective configuration
/// with secrets redacted.
#[utoipa::path(
    get, path = "/admin/overview", tag = "operator",
    responses(
        (status = 200, description = "The overview", body = Overview),
        (status = 404, description = "Not an operator", body = crate::error::ErrorBody),
    ),
)]
pub async fn overview(
    State(s): State<AppState>,
    Caller(acc): Caller,
) -> ApiResult<axum::Json<Overview>> {
    operator(&acc)?;
    let now = now_ms();
    let known = atelier_shared::fleet::workers(s.objects.as_ref()).await?;
    let alive = atelier_shared::fleet::alive_per_queue(&known, now);
    let queues = queues(&s, &alive, now).await?;
    let mut workers: Vec<WorkerView> = known
        .into_iter()
        .map(|p| WorkerView {
            alive: p.alive(now),
            seen_seconds_ago: now.saturating_sub(p.seen_ms).max(0) as f64 / 1000.0,
            started_at: iso8601(p.started_ms),
            presence: p,
        })
        .collect();
    // Live ones first, then by id.
    workers.sort_by(|a, b| {
        b.alive
            .cmp(&a.alive)
            .then_with(|| a.presence.worker.cmp(&b.presence.worker))
    });
    let config = serde_json::to_value(s.config.redacted())
        .map_err(|e| ApiError::internal(format!("configuration as JSON: {e}")))?;
    Ok(axum::Json(Overview {
        generated_at: iso8601(now),
        queue_kind: s.queue.as_ref().map(|q| q.kind()),
        queues,
        workers,
        accounts: busiest(&s).await?,
        account_count: s.store.account_count().await?,
        config,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PeekQuery {
    /// Dead letters shown at most, 1–100 (default 20).
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetters {
    pub queue: String,
    /// How many `<queue>.dead` holds.
    pub dead_letters: u64,
    /// The first of them, described (never their payload).
    pub first: Vec<DeadLetter>,
}

/// Operators only: what `<queue>.dead` holds (left there).
#[utoipa::path(
    get, path = "/admin/dead-letters/{queue}", tag = "operator",
    params(("queue" = String, Path, description = "A work queue, `outcomes` or `scheduler`"), PeekQuery),
    responses(
        (status = 200, description = "The dead letters", body = DeadLetters),
        (status = 400, description = "No such queue, or a bad limit", body = crate::error::ErrorBody),
        (status = 404, description = "Not an operator", body = crate::error::ErrorBody),
    ),
)]
pub async fn dead_letters(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(queue): Path<String>,
    Query(p): Query<PeekQuery>,
) -> ApiResult<axum::Json<DeadLetters>> {
    operator(&acc)?;
    let name = queue_name(&queue)?;
    let limit = p.limit.unwrap_or(20);
    if !(1..=MAX_PEEK).contains(&limit) {
        return Err(ApiError::bad_request(
            Some("limit"),
            format!("must be between 1 and {MAX_PEEK}"),
            "query",
        ));
    }
    let (depth, first) = dead::look(queue_of(&s)?, name, limit).await?;
    Ok(axum::Json(DeadLetters {
        queue: name.into(),
        dead_letters: depth,
        first,
    }))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Dead letters moved back at most (at least 1); default: all.
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Replayed {
    pub queue: String,
    pub replayed: usize,
    /// Still in `<queue>.dead` afterwards.
    pub dead_letters: u64,
}

/// Operators only: moves dead letters of `queue` back to it (published
/// first, removed after: at least once), without their dead-letter headers.
#[utoipa::path(
    post, path = "/admin/dead-letters/{queue}/replay", tag = "operator",
    params(("queue" = String, Path, description = "A work queue, `outcomes` or `scheduler`")),
    request_body = ReplayRequest,
    responses(
        (status = 200, description = "Moved back", body = Replayed),
        (status = 400, description = "No such queue, or a bad limit", body = crate::error::ErrorBody),
        (status = 404, description = "Not an operator", body = crate::error::ErrorBody),
    ),
)]
pub async fn replay(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(queue): Path<String>,
    Json(r): Json<ReplayRequest>,
) -> ApiResult<axum::Json<Replayed>> {
    operator(&acc)?;
    let name = queue_name(&queue)?;
    if r.limit == Some(0) {
        return Err(ApiError::bad_request(
            Some("limit"),
            "must be at least 1",
            "body",
        ));
    }
    let q = queue_of(&s)?;
    let replayed = dead::replay(q, name, r.limit).await?;
    tracing::info!(operator = %acc.id, queue = name, replayed, "dead letters replayed");
    Ok(axum::Json(Replayed {
        queue: name.into(),
        replayed,
        dead_letters: q.depth(&dead::of(name)).await?,
    }))
}
