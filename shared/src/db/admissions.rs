//! Group admission on PostgreSQL: the jobs of one account that
//! [`Store::admit_at_once`] admits are written by one statement per *batch*
//! of concurrent requests, the way a database groups the commits of
//! concurrent transactions.
//!
//! Every admission of an account locks that account's row from its update
//! to its commit (the WAL flush included), so one account's jobs were
//! admitted one commit at a time however many clients sent them. Here a
//! request joins its account's queue; one drainer per account with
//! requests waiting takes what is there (up to [`MAX_JOBS`] jobs,
//! [`MAX_OUTPUTS`] outputs) and writes it with ONE statement and ONE commit:
//! the account's row is updated once with the sum of the batch's
//! reservations and slots, and the jobs are written only if the whole sum
//! fits (credits and active-job cap). Different accounts never share a
//! statement: each still locks only its own row, and one account's wait for
//! its row (behind a settlement, say) holds up no other account's jobs.
//!
//! A job the batch did not write (the sum did not fit, or the statement
//! failed on one job's data) is admitted again alone, in the order the
//! requests arrived, with the same statement: its answer (created, which
//! check refused it, or its own error) is exactly what admitting it on its
//! own gives. When the database is out of reach every job of the batch is
//! answered so at once. A job id is generated once
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
const JOBS_RECORD: &str = "id text, project text, kind text, spec text, total bigint, post bigint, \
     post_status text, slots bigint, traceparent text, inputs text, required bigint, note text, \
     queue text, attempts bigint";
/// The record of each output: the fields of [`Prepared::outputs`].
const OUTPUTS_RECORD: &str = "job text, ins bigint, var bigint, cost bigint, fmt text";

/// The statement, for one account's jobs. `$1` the jobs, `$2` their
/// outputs (JSON arrays of the records above), `$3` now, `$4` the new jobs'
/// status, `$5` the scheduler's wake-up topic, `$6` the new outputs'
/// status, `$7` the account, `$8` the jobs' credits together, `$9` their
/// active-job slots together, `$10` the account's cap. Answers the ids of
/// the jobs it wrote: all of them, or none when the sums do not fit.
static STATEMENT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH acct AS ( \
           UPDATE accounts SET reserved = reserved + $8, active_jobs = active_jobs + $9 \
           WHERE id = $7 AND balance - reserved >= $8 AND ($9 = 0 OR active_jobs + $9 <= $10) \
           RETURNING id), \
         v AS (SELECT * FROM jsonb_to_recordset($1::jsonb) AS v({JOBS_RECORD}) \
               WHERE EXISTS (SELECT 1 FROM acct)), \
         job AS ( \
           INSERT INTO jobs (id, account_id, billing_account_id, project_id, job_type, status, spec, \
             total_outputs, should_post_process, post_processing_status, counts_against_cap, created_at, \
             updated_at, traceparent, inputs) \
           SELECT v.id, $7, $7, v.project, v.kind, $4, v.spec, v.total, v.post, v.post_status, \
             v.slots, $3, $3, v.traceparent, v.inputs FROM v RETURNING id), \
         outs AS ( \
           INSERT INTO outputs (job_id, billing_account_id, queue, instruction_index, variation_index, status, \
             max_attempts, scheduled_at, cost, output_format, created_at, updated_at, account_id) \
           SELECT o.job, $7, v.queue, o.ins, o.var, $6, v.attempts, $3, o.cost, o.fmt, $3, $3, $7 \
           FROM jsonb_to_recordset($2::jsonb) AS o({OUTPUTS_RECORD}) JOIN v ON v.id = o.job), \
         res AS ( \
           INSERT INTO reservations (job_id, account_id, amount, held, created_at) \
           SELECT v.id, $7, v.required, v.required, $3 FROM v), \
         led AS ( \
           INSERT INTO credit_ledger (account_id, job_id, kind, amount, created_at) \
           SELECT $7, v.id, 'reserve', v.required, $3 FROM v), \
         note AS ( \
           INSERT INTO notifications (account_id, name, job_id, data, created_at) \
           SELECT $7, 'batch_edit', v.id, v.note, $3 FROM v), \
         wake AS ( \
           INSERT INTO outbox (topic, payload, created_at) \
           SELECT $5, json_build_object('event', 'job_created', 'job_id', id)::text, $3 FROM job) \
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
}

impl std::fmt::Debug for Admitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitter").finish_non_exhaustive()
    }
}

/// The accounts with admissions waiting or being written.
#[derive(Default)]
struct Queue {
    accounts: HashMap<String, VecDeque<Waiting>>,
}

struct Waiting {
    job: Prepared,
    answer: oneshot::Sender<Result<Admission>>,
}

/// An account's drainer; if it ends without emptying its account's queue
/// (a panic), the entry is removed, so that later requests start another.
struct Drainer<'a> {
    admitter: &'a Admitter,
    account: &'a str,
    done: bool,
}

impl Drop for Drainer<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.admitter.queue().accounts.remove(self.account);
        }
    }
}

impl Admitter {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // The queue is left consistent at every step: a panic elsewhere
        // while it was held does not make it unusable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The account's next batch, or `None` (and the account's entry
    /// removed: the next request starts a new drainer) when nothing waits.
    fn next_batch(&self, drainer: &mut Drainer<'_>) -> Option<Vec<Waiting>> {
        let mut q = self.queue();
        let waiting = q.accounts.get_mut(drainer.account)?;
        if waiting.is_empty() {
            q.accounts.remove(drainer.account);
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

    /// Admits `job` with the next batch statement; see the module's note.
    pub(crate) async fn admit_grouped(&self, job: Prepared) -> Result<Admission> {
        let (answer, answered) = oneshot::channel();
        let account = job.account_id.clone();
        let start = {
            let mut q = self.admitter.queue();
            let start = !q.accounts.contains_key(&account);
            q.accounts
                .entry(account.clone())
                .or_default()
                .push_back(Waiting { job, answer });
            start
        };
        if start {
            let store = self.clone();
            tokio::spawn(async move { store.drain_admissions(&account).await });
        }
        answered.await.map_err(|_| {
            StoreError::Unavailable(sqlx::Error::Protocol(
                "the admission batch ended without an answer".into(),
            ))
        })?
    }

    /// Writes `account`'s waiting admissions, batch after batch, until
    /// none is left.
    async fn drain_admissions(&self, account: &str) {
        let admitter = self.admitter.clone();
        let mut drainer = Drainer {
            admitter: &admitter,
            account,
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
                    if ids.len() > 1 {
                        self.admitter
                            .batched
                            .fetch_add(ids.len() as u64, Ordering::Relaxed);
                    }
                    ids.into_iter().collect()
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
        let Some(first) = jobs.first() else {
            return Ok(Vec::new());
        };
        debug_assert!(jobs.iter().all(|j| j.account_id == first.account_id));
        let rows = to_json(&jobs.iter().map(|j| &j.job).collect::<Vec<_>>())?;
        let outputs = to_json(&jobs.iter().flat_map(|j| &j.outputs).collect::<Vec<_>>())?;
        let required: i64 = jobs.iter().map(|j| j.required.0).sum();
        let slots: i64 = jobs.iter().map(|j| j.slots).sum();
        let cap = jobs
            .iter()
            .filter_map(|j| j.active_job_cap)
            .min()
            .map(i64::from)
            .unwrap_or(i64::MAX);
        Ok(sqlx::query_scalar::<_, String>(STATEMENT.as_str())
            .bind(rows)
            .bind(outputs)
            .bind(now_ms())
            .bind(JobStatus::Pending)
            .bind(crate::domain::task::WAKE_QUEUE)
            .bind(OutputStatus::Pending)
            .bind(&first.account_id)
            .bind(required)
            .bind(slots)
            .bind(cap)
            .fetch_all(self.pool())
            .await?)
    }
}

fn created(job: &Prepared) -> Admission {
    Admission::Created {
        job_id: job.job_id.clone(),
        total_outputs: job.total_outputs,
        required: job.required,
    }
}
