//! Group admission on PostgreSQL: the jobs that [`Store::admit_at_once`]
//! admits are written by one statement per *batch* of concurrent requests,
//! the way a database groups the commits of concurrent transactions.
//!
//! Every admission locks its account's row from its update to its commit
//! (the WAL flush included), so one account's jobs were admitted one commit
//! at a time however many clients sent them, and many accounts' jobs each
//! paid a statement and a commit of their own. Here a request joins one of
//! [`LANES`] queues, chosen by its account (so that one account's requests
//! stay in one queue, in arrival order); one drainer per queue with
//! requests waiting takes what is there (up to [`MAX_JOBS`] jobs,
//! [`MAX_OUTPUTS`] outputs, of any accounts of that lane) and writes it
//! with ONE statement and ONE commit: the statement locks the batch's
//! account rows in id order (the order settlement locks billing accounts
//! in too, so the two cannot deadlock; lanes share no account), updates
//! each once with the sum of that account's reservations and slots, and
//! writes the jobs of the accounts whose sums fit (credits and active-job
//! cap), all of each account's or none.
//!
//! A job the batch did not write (its account's sum did not fit, or the
//! statement failed on one job's data) is admitted again alone, in the
//! order the requests arrived, with the same statement: its answer
//! (created, which check refused it, or its own error) is exactly what
//! admitting it on its own gives. When the database is out of reach every
//! job of the batch is answered so at once. A job id is generated once
//! per request, so a batch that committed although its answer was lost can
//! never be written twice: the retry meets the unique key and fails like
//! any lost commit did before.

use super::jobs::{Admission, account_refusal, credits_of};
use super::{Result, Store, StoreError, to_json};
use crate::domain::credits::Credits;
use crate::domain::{JobStatus, OutputStatus};
use crate::time::now_ms;
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use tokio::sync::oneshot;

/// Jobs per statement.
const MAX_JOBS: usize = 64;
/// Queues (and statements in flight at once, at most) per [`Store`].
const LANES: usize = 2;
/// Outputs per statement.
const MAX_OUTPUTS: usize = 1024;

/// One job's admission, everything the statement writes: decided and
/// serialised by the requesting task before it joins the queue.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub job_id: String,
    pub account_id: String,
    pub active_job_cap: Option<u32>,
    pub required: Credits,
    /// Active-job slots it takes (0 or 1).
    pub slots: i64,
    pub total_outputs: i64,
    /// This job's row of the `jobs` record set (see [`JOBS_RECORD`]).
    pub job: Value,
    /// Its rows of the `outputs` record set (see [`OUTPUTS_RECORD`]).
    pub outputs: Vec<Value>,
}

/// The record the statement reads each job as: the fields of
/// [`Prepared::job`].
const JOBS_RECORD: &str = "id text, account text, project text, kind text, spec text, total bigint, \
     post bigint, post_status text, slots bigint, traceparent text, inputs text, required bigint, \
     note text, queue text, attempts bigint";
/// The record of each output: the fields of [`Prepared::outputs`].
const OUTPUTS_RECORD: &str = "job text, ins bigint, var bigint, cost bigint, fmt text";
/// What the batch asks of each account: its jobs' credits and active-job
/// slots together, and the account's cap.
const SUMS_RECORD: &str = "account text, required bigint, slots bigint, cap bigint";

/// The statement. `$1` the jobs, `$2` their outputs, `$3` each account's
/// sums (JSON arrays of the records above), `$4` now, `$5` the new jobs'
/// status, `$6` the scheduler's wake-up topic, `$7` the new outputs'
/// status. Answers the ids of the jobs it wrote: those of the accounts
/// whose sums fit.
static STATEMENT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH sums AS (SELECT * FROM jsonb_to_recordset($3::jsonb) AS s({SUMS_RECORD})), \
         locked AS (SELECT id FROM accounts WHERE id IN (SELECT account FROM sums) \
           ORDER BY id FOR NO KEY UPDATE), \
         acct AS ( \
           UPDATE accounts a SET reserved = a.reserved + s.required, active_jobs = a.active_jobs + s.slots \
           FROM sums s WHERE a.id = s.account AND a.id IN (SELECT id FROM locked) \
             AND a.balance - a.reserved >= s.required AND (s.slots = 0 OR a.active_jobs + s.slots <= s.cap) \
           RETURNING a.id), \
         v AS (SELECT * FROM jsonb_to_recordset($1::jsonb) AS v({JOBS_RECORD}) \
               WHERE v.account IN (SELECT id FROM acct)), \
         job AS ( \
           INSERT INTO jobs (id, account_id, billing_account_id, project_id, job_type, status, spec, \
             total_outputs, should_post_process, post_processing_status, counts_against_cap, created_at, \
             updated_at, traceparent, inputs) \
           SELECT v.id, v.account, v.account, v.project, v.kind, $5, v.spec, v.total, v.post, v.post_status, \
             v.slots, $4, $4, v.traceparent, v.inputs FROM v RETURNING id), \
         outs AS ( \
           INSERT INTO outputs (job_id, billing_account_id, queue, instruction_index, variation_index, status, \
             max_attempts, scheduled_at, cost, output_format, created_at, updated_at, account_id) \
           SELECT o.job, v.account, v.queue, o.ins, o.var, $7, v.attempts, $4, o.cost, o.fmt, $4, $4, v.account \
           FROM jsonb_to_recordset($2::jsonb) AS o({OUTPUTS_RECORD}) JOIN v ON v.id = o.job), \
         res AS ( \
           INSERT INTO reservations (job_id, account_id, amount, held, created_at) \
           SELECT v.id, v.account, v.required, v.required, $4 FROM v), \
         led AS ( \
           INSERT INTO credit_ledger (account_id, job_id, kind, amount, created_at) \
           SELECT v.account, v.id, 'reserve', v.required, $4 FROM v), \
         note AS ( \
           INSERT INTO notifications (account_id, name, job_id, data, created_at) \
           SELECT v.account, 'batch_edit', v.id, v.note, $4 FROM v), \
         wake AS ( \
           INSERT INTO outbox (topic, payload, created_at) \
           SELECT $6, json_build_object('event', 'job_created', 'job_id', id)::text, $4 FROM job) \
         SELECT id FROM job"
    )
});

/// The queue of admissions waiting for a statement, shared by the clones
/// of one [`Store`].
#[derive(Default)]
pub(crate) struct Admitter {
    state: Mutex<Queue>,
    /// Jobs written by a statement that wrote more than one.
    batched: AtomicU64,
    /// Jobs written by a statement that wrote jobs of more than one account.
    across: AtomicU64,
}

impl std::fmt::Debug for Admitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitter").finish_non_exhaustive()
    }
}

/// The lanes with admissions waiting or being written.
#[derive(Default)]
struct Queue {
    lanes: HashMap<usize, VecDeque<Waiting>>,
}

/// The lane of `account`'s admissions.
pub(crate) fn lane_of(account: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    account.hash(&mut h);
    (h.finish() % LANES as u64) as usize
}

struct Waiting {
    job: Prepared,
    answer: oneshot::Sender<Result<Admission>>,
}

/// A lane's drainer; if it ends without emptying its lane (a panic), the
/// entry is removed, so that later requests start another.
struct Drainer<'a> {
    admitter: &'a Admitter,
    lane: usize,
    done: bool,
}

impl Drop for Drainer<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.admitter.queue().lanes.remove(&self.lane);
        }
    }
}

impl Admitter {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // The queue is left consistent at every step: a panic elsewhere
        // while it was held does not make it unusable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lane's next batch, or `None` (and the lane's entry removed:
    /// the next request starts a new drainer) when nothing waits.
    fn next_batch(&self, drainer: &mut Drainer<'_>) -> Option<Vec<Waiting>> {
        let mut q = self.queue();
        let waiting = q.lanes.get_mut(&drainer.lane)?;
        if waiting.is_empty() {
            q.lanes.remove(&drainer.lane);
            drainer.done = true;
            return None;
        }
        let mut batch = Vec::new();
        let mut outputs = 0;
        while let Some(w) = waiting.front() {
            let n = w.job.outputs.len();
            if !batch.is_empty() && (batch.len() == MAX_JOBS || outputs + n > MAX_OUTPUTS) {
                break;
            }
            outputs += n;
            batch.extend(waiting.pop_front());
        }
        Some(batch)
    }
}

impl Store {
    /// How many jobs this handle admitted in statements that wrote more
    /// than one.
    pub fn jobs_admitted_in_batches(&self) -> u64 {
        self.admitter.batched.load(Ordering::Relaxed)
    }

    /// How many jobs this handle admitted in statements that wrote jobs of
    /// more than one account.
    pub fn jobs_admitted_across_accounts(&self) -> u64 {
        self.admitter.across.load(Ordering::Relaxed)
    }

    /// Admits `job` with the next batch statement; see the module's note.
    pub(crate) async fn admit_grouped(&self, job: Prepared) -> Result<Admission> {
        let (answer, answered) = oneshot::channel();
        let lane = lane_of(&job.account_id);
        let start = {
            let mut q = self.admitter.queue();
            let start = !q.lanes.contains_key(&lane);
            q.lanes
                .entry(lane)
                .or_default()
                .push_back(Waiting { job, answer });
            start
        };
        if start {
            let store = self.clone();
            tokio::spawn(async move { store.drain_admissions(lane).await });
        }
        answered.await.map_err(|_| {
            StoreError::Unavailable(sqlx::Error::Protocol(
                "the admission batch ended without an answer".into(),
            ))
        })?
    }

    /// Writes `lane`'s waiting admissions, batch after batch, until none
    /// is left.
    async fn drain_admissions(&self, lane: usize) {
        let admitter = self.admitter.clone();
        let mut drainer = Drainer {
            admitter: &admitter,
            lane,
            done: false,
        };
        while let Some(batch) = admitter.next_batch(&mut drainer) {
            let (jobs, answers): (Vec<Prepared>, Vec<_>) =
                batch.into_iter().map(|w| (w.job, w.answer)).unzip();
            let results = self.admit_batch(&jobs).await;
            for (answer, result) in answers.into_iter().zip(results) {
                // A requester that went away no longer needs its answer.
                let _ = answer.send(result);
            }
        }
    }

    /// Each of `jobs` admitted: by one statement when they all fit, else
    /// those left over one at a time.
    async fn admit_batch(&self, jobs: &[Prepared]) -> Vec<Result<Admission>> {
        let written: HashSet<String> = if jobs.len() > 1 {
            match self.write_batch(jobs).await {
                Ok(ids) => {
                    metrics::histogram!("atelier_admission_batch_jobs").record(ids.len() as f64);
                    let ids: HashSet<String> = ids.into_iter().collect();
                    if ids.len() > 1 {
                        self.admitter
                            .batched
                            .fetch_add(ids.len() as u64, Ordering::Relaxed);
                        let accounts: HashSet<&str> = jobs
                            .iter()
                            .filter(|j| ids.contains(&j.job_id))
                            .map(|j| j.account_id.as_str())
                            .collect();
                        if accounts.len() > 1 {
                            self.admitter
                                .across
                                .fetch_add(ids.len() as u64, Ordering::Relaxed);
                        }
                    }
                    ids
                }
                // The database is out of reach: every job of the batch
                // gets that answer now (503, try again), rather than one
                // pool timeout after another.
                Err(StoreError::Unavailable(e)) => {
                    return jobs
                        .iter()
                        .map(|_| {
                            Err(StoreError::Unavailable(sqlx::Error::Protocol(
                                e.to_string(),
                            )))
                        })
                        .collect();
                }
                Err(e) => {
                    tracing::debug!(error = %e, jobs = jobs.len(), "batch admission failed; admitting one at a time");
                    HashSet::new()
                }
            }
        } else {
            HashSet::new()
        };
        let mut results = Vec::with_capacity(jobs.len());
        for job in jobs {
            results.push(if written.contains(&job.job_id) {
                Ok(created(job))
            } else {
                self.admit_alone(job).await
            });
        }
        results
    }

    async fn admit_alone(&self, job: &Prepared) -> Result<Admission> {
        if self
            .write_batch(std::slice::from_ref(job))
            .await?
            .contains(&job.job_id)
        {
            metrics::histogram!("atelier_admission_batch_jobs").record(1.0);
            return Ok(created(job));
        }
        // Nothing was written: the account row tells which check failed.
        let mut conn = self.pool().acquire().await?;
        let (balance, reserved) = credits_of(&mut conn, &job.account_id).await?;
        account_refusal(
            &mut conn,
            &job.account_id,
            job.active_job_cap,
            job.required,
            balance,
            reserved,
        )
        .await
    }

    /// Runs the statement over `jobs`; the ids of those it wrote.
    async fn write_batch(&self, jobs: &[Prepared]) -> Result<Vec<String>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let rows = to_json(&jobs.iter().map(|j| &j.job).collect::<Vec<_>>())?;
        let outputs = to_json(&jobs.iter().flat_map(|j| &j.outputs).collect::<Vec<_>>())?;
        // Each account's credits and slots together, and its cap (the
        // smallest any of its jobs was admitted under).
        let mut sums: Vec<AccountSums<'_>> = Vec::new();
        for j in jobs {
            let i = match sums.iter().position(|s| s.account == j.account_id) {
                Some(i) => i,
                None => {
                    sums.push(AccountSums {
                        account: &j.account_id,
                        required: 0,
                        slots: 0,
                        cap: i64::MAX,
                    });
                    sums.len() - 1
                }
            };
            let s = &mut sums[i];
            s.required += j.required.0;
            s.slots += j.slots;
            s.cap = s.cap.min(j.active_job_cap.map_or(i64::MAX, i64::from));
        }
        Ok(sqlx::query_scalar::<_, String>(STATEMENT.as_str())
            .bind(rows)
            .bind(outputs)
            .bind(to_json(&sums)?)
            .bind(now_ms())
            .bind(JobStatus::Pending)
            .bind(crate::domain::task::WAKE_QUEUE)
            .bind(OutputStatus::Pending)
            .fetch_all(self.pool())
            .await?)
    }
}

/// One account's row of the `sums` record set (see [`SUMS_RECORD`]).
#[derive(serde::Serialize)]
struct AccountSums<'a> {
    account: &'a str,
    required: i64,
    slots: i64,
    cap: i64,
}

fn created(job: &Prepared) -> Admission {
    Admission::Created {
        job_id: job.job_id.clone(),
        total_outputs: job.total_outputs,
        required: job.required,
    }
}
