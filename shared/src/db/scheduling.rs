//! Output lifecycle in the store: dispatch claims, worker reports, retries,
//! lease reaping, settlement and job finalisation.
//!
//! Exactly-once effects rest on one rule: every transition is a conditional
//! `UPDATE … WHERE id = $1 AND attempt = $2 AND status IN (<legal sources>)`,
//! and everything the transition causes (charge or release, counters,
//! notifications, job finalisation) happens in the same transaction only if
//! that update touched a row. A duplicate or stale report changes nothing.

use super::notifications::notify_state;
use super::rows::{JOB_SELECT, JOB_STATE, JobRow, JobState, OUTPUT_COLUMNS, OutputRow};
use super::transitions::{
    AccountChanges, finalize_job, finalize_state, finish_output, live_output,
    post_processing_progress,
};
use super::{Result, Store, Tx, id_list};
use crate::domain::retry::RetryPolicy;
use crate::domain::task::{JobInputs, TaskOutput};
use crate::domain::{
    FailureKind, JobSpec, JobStatus, Outcome, OutputResult, OutputStatus, Plan, WorkQueue,
};
use crate::time::now_ms;
use std::collections::HashMap;

/// An eligible output, with what the fair pick needs.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchCandidate {
    pub output_id: i64,
    pub job_id: String,
    pub account_id: String,
    pub plan: Plan,
    pub ready_at: i64,
    /// The job's W3C `traceparent`, for the task message.
    pub traceparent: Option<String>,
}

/// A claimed output: the attempt it now runs and which output it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub attempt: i64,
    pub output: TaskOutput,
}

/// A claimed output as `RETURNING` gives it: id, attempt, instruction,
/// variation, engine index, last error, version.
type ClaimRow = (i64, i64, i64, i64, i64, Option<String>, i64);

/// What every task of a job carries: its typed spec and resolved inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct JobWork {
    pub account_id: String,
    pub spec: JobSpec,
    pub inputs: JobInputs,
    pub traceparent: Option<String>,
    /// The job can never run, for this reason (the preprocessing it
    /// waited for failed): its outputs fail, nothing is charged.
    pub blocked: Option<String>,
    /// The preprocessing it waits for has not ended yet.
    pub waiting: bool,
}

/// What became of a failure report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Rescheduled for another attempt at `at` (epoch ms).
    Retried { at: i64 },
    /// The engine refused; rescheduled at once on the next engine of the
    /// `auto` order.
    FellBack { engine_index: i64 },
    /// The output failed for good.
    Failed,
    /// Stale or duplicate report: nothing changed.
    Ignored,
}

/// What applying one worker report did (see [`Store::apply_outcomes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// `started`: whether it moved the output to `running`.
    Started(bool),
    /// `heartbeat`: whether the lease was extended.
    Extended(bool),
    /// `completed`: the output's work queue when recorded, `None` if stale.
    Completed(Option<WorkQueue>),
    Failed(FailureOutcome),
}

impl Store {
    /// Gives the pending outputs of `queue` that have no lane (no
    /// `account_id`: an API of the previous version inserted them during a
    /// rolling upgrade) their job's account, so that
    /// [`Store::dispatch_candidates`] finds them on PostgreSQL; how many.
    /// Indexed, and with nothing to do once every API is upgraded: the
    /// dispatcher runs it every few seconds, not every round.
    pub async fn assign_lanes(&self, queue: WorkQueue) -> Result<u64> {
        if self.dialect != super::Dialect::Postgres {
            // SQLite's candidates come from the jobs, not the lanes.
            return Ok(0);
        }
        Ok(sqlx::query(
            "UPDATE outputs SET account_id = (SELECT j.account_id FROM jobs j WHERE j.id = outputs.job_id) \
             WHERE queue = $1 AND status = $2 AND account_id IS NULL",
        )
        .bind(queue)
        .bind(OutputStatus::Pending)
        .execute(self.pool())
        .await?
        .rows_affected())
    }

    /// Up to `per_account` eligible outputs of every account for `queue`,
    /// oldest first within an account.
    ///
    /// On PostgreSQL the accounts with pending outputs are found by a skip
    /// scan of the `outputs_lanes` index and each account's oldest outputs
    /// by a bounded scan of the same index, so a round reads about
    /// accounts × `per_account` rows however long the backlog is. SQLite
    /// (one process, small queues) ranks the whole backlog.
    pub async fn dispatch_candidates(
        &self,
        queue: WorkQueue,
        per_account: i64,
    ) -> Result<Vec<DispatchCandidate>> {
        let waits = format!(
            "(j.waits_for IS NULL OR NOT EXISTS (SELECT 1 FROM jobs w WHERE w.id = j.waits_for \
             AND w.status IN ({})))",
            JobStatus::sql_in(&JobStatus::OPEN)
        );
        let sql = match self.dialect {
            super::Dialect::Postgres => format!(
                "WITH RECURSIVE lanes(account_id) AS ( \
                   (SELECT account_id FROM outputs WHERE queue = $1 AND status = $4 AND account_id IS NOT NULL \
                    ORDER BY account_id LIMIT 1) \
                   UNION ALL \
                   SELECT (SELECT o.account_id FROM outputs o WHERE o.queue = $1 AND o.status = $4 \
                           AND o.account_id > l.account_id ORDER BY o.account_id LIMIT 1) \
                   FROM lanes l WHERE l.account_id IS NOT NULL) \
                 SELECT c.id, c.job_id, l.account_id, a.plan, c.scheduled_at, c.traceparent \
                 FROM lanes l JOIN accounts a ON a.id = l.account_id \
                 CROSS JOIN LATERAL ( \
                   SELECT o.id, o.job_id, o.scheduled_at, j.traceparent FROM outputs o JOIN jobs j ON j.id = o.job_id \
                   WHERE o.queue = $1 AND o.status = $4 AND o.account_id = l.account_id AND o.scheduled_at <= $2 \
                     AND {waits} \
                   ORDER BY o.scheduled_at, o.id LIMIT $3) c \
                 ORDER BY c.scheduled_at, c.id"
            ),
            super::Dialect::Sqlite => format!(
                "SELECT id, job_id, account_id, plan, scheduled_at, traceparent FROM ( \
                   SELECT o.id, o.job_id, j.account_id, a.plan, o.scheduled_at, j.traceparent, \
                          ROW_NUMBER() OVER (PARTITION BY j.account_id ORDER BY o.scheduled_at, o.id) AS rn \
                   FROM outputs o JOIN jobs j ON j.id = o.job_id JOIN accounts a ON a.id = j.account_id \
                   WHERE o.status = $4 AND o.queue = $1 AND o.scheduled_at <= $2 AND {waits}) t \
                 WHERE rn <= $3 ORDER BY scheduled_at, id"
            ),
        };
        let rows: Vec<(i64, String, String, Plan, i64, Option<String>)> = sqlx::query_as(&sql)
            .bind(queue)
            .bind(now_ms())
            .bind(per_account)
            .bind(OutputStatus::Pending)
            .fetch_all(self.pool())
            .await?;
        Ok(rows
            .into_iter()
            .map(
                |(output_id, job_id, account_id, plan, ready_at, traceparent)| DispatchCandidate {
                    output_id,
                    job_id,
                    account_id,
                    plan,
                    ready_at,
                    traceparent,
                },
            )
            .collect())
    }

    /// Outputs of `queue` holding a lease, per account (`dispatched` + `running`).
    pub async fn in_flight_by_account(&self, queue: WorkQueue) -> Result<HashMap<String, u32>> {
        self.in_flight_per_account(Some(queue)).await
    }

    /// Outputs holding a lease, per account, over every work queue.
    pub async fn in_flight_everywhere(&self) -> Result<HashMap<String, u32>> {
        self.in_flight_per_account(None).await
    }

    async fn in_flight_per_account(
        &self,
        queue: Option<WorkQueue>,
    ) -> Result<HashMap<String, u32>> {
        // Two statements rather than `$1 IS NULL OR …`, so that the
        // dispatcher's per-queue one keeps a plan that uses the queue.
        let sql = format!(
            "SELECT j.account_id, COUNT(*) FROM outputs o JOIN jobs j ON j.id = o.job_id \
             WHERE o.status IN ({}){} GROUP BY j.account_id",
            OutputStatus::sql_in(&OutputStatus::LEASED),
            if queue.is_some() {
                " AND o.queue = $1"
            } else {
                ""
            }
        );
        let mut q = sqlx::query_as::<_, (String, i64)>(&sql);
        if let Some(queue) = queue {
            q = q.bind(queue);
        }
        let rows = q.fetch_all(self.pool()).await?;
        Ok(rows
            .into_iter()
            .map(|(a, n)| (a, u32::try_from(n).unwrap_or(u32::MAX)))
            .collect())
    }

    /// Slot time (ms) each account's outputs of `queue` held within
    /// `[since, now]` (running ones up to now), and the mean slot time of
    /// the outputs that ended in it.
    pub async fn slot_time_by_account(
        &self,
        queue: WorkQueue,
        since: i64,
        now: i64,
    ) -> Result<(HashMap<String, i64>, Option<i64>)> {
        let rows: Vec<(String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT j.account_id, o.started_at, o.finalized_at FROM outputs o JOIN jobs j ON j.id = o.job_id \
             WHERE o.queue = $1 AND o.started_at IS NOT NULL AND (o.finalized_at IS NULL OR o.finalized_at >= $2)",
        )
        .bind(queue)
        .bind(since)
        .fetch_all(self.pool())
        .await?;
        let mut per: HashMap<String, i64> = HashMap::new();
        let (mut ended, mut ended_ms) = (0i64, 0i64);
        for (account, started, finalized) in rows {
            let end = finalized.unwrap_or(now).min(now);
            let held = (end - started.max(since)).max(0);
            *per.entry(account).or_default() += held;
            if let Some(f) = finalized {
                ended += 1;
                ended_ms += (f - started).max(0);
            }
        }
        Ok((per, (ended > 0).then(|| ended_ms / ended)))
    }

    /// Open outputs of `queue` by state (`pending`, `dispatched`,
    /// `running`): what the work queue still has to do, for gauges and
    /// autoscalers.
    pub async fn open_by_state(&self, queue: WorkQueue) -> Result<Vec<(OutputStatus, i64)>> {
        let sql = format!(
            "SELECT status, COUNT(*) FROM outputs WHERE queue = $1 AND status IN ({}) GROUP BY status",
            OutputStatus::sql_in(&OutputStatus::OPEN)
        );
        Ok(sqlx::query_as(&sql)
            .bind(queue)
            .fetch_all(self.pool())
            .await?)
    }

    /// When the longest-waiting output of `queue` that is due (pending or
    /// published, not waiting for a retry's backoff) became due; `None` when
    /// none waits.
    pub async fn oldest_waiting(&self, queue: WorkQueue, now: i64) -> Result<Option<i64>> {
        let sql = format!(
            "SELECT MIN(scheduled_at) FROM outputs WHERE status IN ({}) AND queue = $1 AND scheduled_at <= $2",
            OutputStatus::sql_in(&[OutputStatus::Pending, OutputStatus::Dispatched])
        );
        Ok(sqlx::query_scalar(&sql)
            .bind(queue)
            .bind(now)
            .fetch_one(self.pool())
            .await?)
    }

    /// Tasks published to `queue` that no worker has started yet.
    pub async fn queued_count(&self, queue: WorkQueue) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM outputs WHERE queue = $1 AND status = $2")
                .bind(queue)
                .bind(OutputStatus::Dispatched)
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// Claims a pending output for dispatch: `pending → dispatched`, the
    /// attempt counter incremented, leased until `lease_until`. Returns the
    /// new attempt and what the task must produce, or `None` if another
    /// scheduler got it first.
    pub async fn claim_for_dispatch(
        &self,
        output_id: i64,
        lease_until: i64,
        owner: &str,
    ) -> Result<Option<Claim>> {
        Ok(self
            .claim_many_for_dispatch(&[output_id], lease_until, owner)
            .await?
            .remove(&output_id))
    }

    /// [`Store::claim_for_dispatch`] for several outputs in one statement;
    /// the outputs another scheduler got first are missing from the answer.
    pub async fn claim_many_for_dispatch(
        &self,
        output_ids: &[i64],
        lease_until: i64,
        owner: &str,
    ) -> Result<HashMap<i64, Claim>> {
        if output_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let list = id_list(output_ids);
        let sql = format!(
            "UPDATE outputs SET status = $4, attempt = attempt + 1, lease_expires_at = $1, lease_owner = $2, updated_at = $3 \
             WHERE id IN ({list}) AND status IN ({}) AND attempt < max_attempts \
             RETURNING id, attempt, instruction_index, variation_index, engine_index, last_error, version",
            OutputStatus::sql_sources_of(OutputStatus::Dispatched)
        );
        let rows: Vec<ClaimRow> = sqlx::query_as(&sql)
            .bind(lease_until)
            .bind(owner)
            .bind(now_ms())
            .bind(OutputStatus::Dispatched)
            .fetch_all(self.pool())
            .await?;
        let index =
            |v: i64| u32::try_from(v).map_err(|e| super::StoreError::Corrupt(e.to_string()));
        rows.into_iter()
            .map(|(id, attempt, ins, var, engine, last_error, version)| {
                Ok((
                    id,
                    Claim {
                        attempt,
                        output: TaskOutput {
                            instruction_index: index(ins)?,
                            variation_index: index(var)?,
                            version: index(version)?,
                            engine_index: index(engine)?,
                            // Only a fallback engine needs to know why the one
                            // before it refused.
                            previous_refusal: (engine > 0).then_some(last_error).flatten(),
                        },
                    },
                ))
            })
            .collect()
    }

    /// The spec and resolved inputs every task of `job_id` carries; `None`
    /// if the job is gone, or (for a job admitted before inputs were
    /// resolved at admission) one of its inputs is.
    pub async fn job_work(&self, job_id: &str) -> Result<Option<JobWork>> {
        let sql = format!("{JOB_SELECT} WHERE j.id = $1");
        let Some(job) = sqlx::query_as::<_, JobRow>(&sql)
            .bind(job_id)
            .fetch_optional(self.pool())
            .await?
        else {
            return Ok(None);
        };
        self.work_of(job).await
    }

    /// [`Store::job_work`] of several jobs, their rows read in one
    /// statement: what a dispatch round needs for the jobs it picked. A
    /// job that is gone is missing from the answer; one this version cannot
    /// read answers `Err(Corrupt)` alone, without failing the others.
    pub async fn job_works(
        &self,
        job_ids: &[String],
    ) -> Result<HashMap<String, Result<Option<JobWork>>>> {
        let mut out = HashMap::with_capacity(job_ids.len());
        if job_ids.is_empty() {
            return Ok(out);
        }
        // The list is padded to a power of two (repeating the last id), so
        // that a connection prepares a handful of statements, not one per
        // round size.
        let slots = job_ids.len().next_power_of_two();
        let sql = format!(
            "{JOB_SELECT} WHERE j.id IN ({})",
            super::placeholders(1, slots)
        );
        let mut q = sqlx::query(&sql);
        for i in 0..slots {
            q = q.bind(&job_ids[i.min(job_ids.len() - 1)]);
        }
        for row in q.fetch_all(self.pool()).await? {
            let id: String = sqlx::Row::try_get(&row, "id")?;
            let work = match <JobRow as sqlx::FromRow<_>>::from_row(&row) {
                Ok(job) => self.work_of(job).await,
                Err(e) => Err(e.into()),
            };
            out.insert(id, work);
        }
        Ok(out)
    }

    /// What every task of `job` carries (see [`Store::job_work`]).
    async fn work_of(&self, job: JobRow) -> Result<Option<JobWork>> {
        let job_id = job.id.as_str();
        let mut inputs = match job.inputs.clone() {
            Some(inputs) => inputs,
            None => match self.resolve_job_inputs(&job).await? {
                Some(inputs) => inputs,
                None => return Ok(None),
            },
        };
        let (mut blocked, mut waiting) = (None, false);
        if let Some(w) = job.waits_for.as_deref()
            && inputs.face.is_none()
        {
            let (status, error): (JobStatus, Option<String>) =
                sqlx::query_as("SELECT status, error_message FROM jobs WHERE id = $1")
                    .bind(w)
                    .fetch_one(self.pool())
                    .await?;
            match status {
                JobStatus::Pending | JobStatus::Processing => waiting = true,
                JobStatus::Completed => {
                    let mut conn = self.pool().acquire().await?;
                    match super::jobs::face_of_job(&mut conn, w).await? {
                        Some(face) => {
                            inputs.face = Some(face);
                            // Recorded once: every task of the job, and
                            // every retry, uses this face.
                            sqlx::query(
                                "UPDATE jobs SET inputs = $2, identity_face_job = $3 WHERE id = $1",
                            )
                            .bind(job_id)
                            .bind(super::to_json(&inputs)?)
                            .bind(w)
                            .execute(&mut *conn)
                            .await?;
                        }
                        None => {
                            blocked = Some(
                                "the identity's preprocessing built no usable face".to_string(),
                            )
                        }
                    }
                }
                JobStatus::Failed | JobStatus::Aborted => {
                    blocked = Some(format!(
                        "the identity's preprocessing failed: {}",
                        error.unwrap_or_else(|| status.as_str().to_string())
                    ));
                }
            }
        }
        Ok(Some(JobWork {
            account_id: job.account_id,
            spec: job.spec,
            inputs,
            traceparent: job.traceparent,
            blocked,
            waiting,
        }))
    }

    /// Undoes a claim whose task could not be published (the attempt never ran).
    pub async fn unclaim(&self, output_id: i64, attempt: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE outputs SET status = $4, attempt = attempt - 1, lease_expires_at = NULL, lease_owner = NULL, updated_at = $3 \
             WHERE id = $1 AND attempt = $2 AND status = $5",
        )
        .bind(output_id)
        .bind(attempt)
        .bind(now_ms())
        .bind(OutputStatus::Pending)
        .bind(OutputStatus::Dispatched)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A worker started `attempt`: `dispatched → running` (or a renewed
    /// lease if a redelivery restarted it), and the job becomes `processing`.
    pub async fn record_started(
        &self,
        output_id: i64,
        attempt: i64,
        lease_until: i64,
        worker: &str,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let started = record_started_in(&mut tx, output_id, attempt, lease_until, worker).await?;
        tx.commit().await?;
        Ok(started)
    }

    /// Heartbeat: extends the lease of a running attempt.
    pub async fn extend_lease(
        &self,
        output_id: i64,
        attempt: i64,
        lease_until: i64,
    ) -> Result<bool> {
        let mut conn = self.pool().acquire().await?;
        extend_lease_in(&mut conn, output_id, attempt, lease_until).await
    }

    /// Records a completed attempt and charges its cost. `false` for a stale
    /// or duplicate report (nothing changed, nothing charged).
    pub async fn record_completed(
        &self,
        output_id: i64,
        attempt: i64,
        result: &OutputResult,
    ) -> Result<bool> {
        Ok(self
            .complete_output(output_id, attempt, result)
            .await?
            .is_some())
    }

    /// [`Store::record_completed`], answering the output's work queue
    /// when the report was recorded (the scheduler's metric label, without
    /// another read).
    pub async fn complete_output(
        &self,
        output_id: i64,
        attempt: i64,
        result: &OutputResult,
    ) -> Result<Option<WorkQueue>> {
        let mut tx = self.begin().await?;
        let mut accounts = AccountChanges::default();
        let queue = complete_output_in(&mut tx, &mut accounts, output_id, attempt, result).await?;
        accounts.apply(&mut tx).await?;
        tx.commit().await?;
        Ok(queue)
    }

    /// Records a failed attempt: retried with backoff when the failure is
    /// retryable and attempts remain, failed for good (reservation released)
    /// otherwise. `unit` is a uniform sample in [0, 1) for the jitter.
    pub async fn record_failure(
        &self,
        output_id: i64,
        attempt: i64,
        kind: &FailureKind,
        message: &str,
        policy: &RetryPolicy,
        unit: f64,
    ) -> Result<FailureOutcome> {
        let mut tx = self.begin().await?;
        let mut accounts = AccountChanges::default();
        let outcome = record_failure_in(
            &mut tx,
            &mut accounts,
            output_id,
            attempt,
            kind,
            message,
            policy,
            unit,
        )
        .await?;
        accounts.apply(&mut tx).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    /// Applies a batch of workers' reports in ONE transaction, in order (a
    /// group commit): each is the same guarded transition as when applied
    /// alone, so a duplicate or stale report changes nothing, and what the
    /// batch owes the account rows is written once, last. All or nothing:
    /// after an error none of them is recorded, and the caller hands the
    /// batch back for redelivery (every report is idempotent). `units[i]`
    /// is report `i`'s retry jitter sample; starts and heartbeats lease
    /// until `lease_until`.
    pub async fn apply_outcomes(
        &self,
        outcomes: &[Outcome],
        lease_until: i64,
        policy: &RetryPolicy,
        units: &[f64],
    ) -> Result<Vec<Applied>> {
        let mut tx = self.begin().await?;
        if self.dialect == super::Dialect::Postgres && outcomes.len() > 1 {
            // One lock order for every batch: its outputs, then their jobs,
            // each by id (then the account rows, last). Applied in report
            // order instead, two batches (lanes, or replicas sharing the
            // reports) could each hold a row the other needs next.
            let ids: Vec<i64> = outcomes.iter().map(Outcome::output_id).collect();
            let ids = id_list(&ids);
            sqlx::query(&format!(
                "SELECT id FROM outputs WHERE id IN ({ids}) ORDER BY id FOR UPDATE"
            ))
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!(
                "SELECT id FROM jobs WHERE id IN (SELECT job_id FROM outputs WHERE id IN ({ids})) \
                 ORDER BY id FOR UPDATE"
            ))
            .execute(&mut *tx)
            .await?;
        }
        let mut accounts = AccountChanges::default();
        let mut applied = Vec::with_capacity(outcomes.len());
        for (i, outcome) in outcomes.iter().enumerate() {
            applied.push(match outcome {
                Outcome::Started {
                    output_id,
                    attempt,
                    worker,
                } => Applied::Started(
                    record_started_in(&mut tx, *output_id, *attempt, lease_until, worker).await?,
                ),
                Outcome::Heartbeat { output_id, attempt } => Applied::Extended(
                    extend_lease_in(&mut tx, *output_id, *attempt, lease_until).await?,
                ),
                Outcome::Completed {
                    output_id,
                    attempt,
                    result,
                } => Applied::Completed(
                    complete_output_in(&mut tx, &mut accounts, *output_id, *attempt, result)
                        .await?,
                ),
                Outcome::Failed {
                    output_id,
                    attempt,
                    failure,
                    message,
                } => Applied::Failed(
                    record_failure_in(
                        &mut tx,
                        &mut accounts,
                        *output_id,
                        *attempt,
                        failure,
                        message,
                        policy,
                        units.get(i).copied().unwrap_or(0.5),
                    )
                    .await?,
                ),
            });
        }
        accounts.apply(&mut tx).await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// Leased outputs whose lease ended before `now`: `(output_id, attempt)`.
    pub async fn expired_leases(&self, now: i64, limit: i64) -> Result<Vec<(i64, i64)>> {
        let sql = format!(
            "SELECT id, attempt FROM outputs WHERE status IN ({}) AND lease_expires_at < $1 ORDER BY lease_expires_at LIMIT $2",
            OutputStatus::sql_in(&OutputStatus::LEASED)
        );
        Ok(sqlx::query_as(&sql)
            .bind(now)
            .bind(limit)
            .fetch_all(self.pool())
            .await?)
    }

    /// Non-terminal outputs of one job (used by tests and the CLI).
    pub async fn open_outputs(&self, job_id: &str) -> Result<Vec<OutputRow>> {
        let sql = format!(
            "SELECT {OUTPUT_COLUMNS} FROM outputs WHERE job_id = $1 AND status IN ({})",
            OutputStatus::sql_in(&OutputStatus::OPEN)
        );
        Ok(sqlx::query_as::<_, OutputRow>(&sql)
            .bind(job_id)
            .fetch_all(self.pool())
            .await?)
    }
}
/// [`Store::record_started`] inside the caller's transaction.
async fn record_started_in(
    tx: &mut Tx,
    output_id: i64,
    attempt: i64,
    lease_until: i64,
    worker: &str,
) -> Result<bool> {
    let now = now_ms();
    let sql = format!(
        // A redelivered attempt that was already running (its worker
        // died; a training was re-attached) keeps its start time.
        "UPDATE outputs SET started_at = CASE WHEN status = $6 THEN started_at ELSE $5 END, \
         status = $6, lease_expires_at = $3, lease_owner = $4, updated_at = $5 \
         WHERE id = $1 AND attempt = $2 AND status IN ({}) RETURNING job_id",
        OutputStatus::sql_in(&OutputStatus::LEASED)
    );
    let job_id: Option<String> = sqlx::query_scalar(&sql)
        .bind(output_id)
        .bind(attempt)
        .bind(lease_until)
        .bind(worker)
        .bind(now)
        .bind(OutputStatus::Running)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(job_id) = job_id else {
        return Ok(false);
    };
    let started: Option<JobState> = sqlx::query_as(&format!(
        "UPDATE jobs SET status = $3, updated_at = $2 WHERE id = $1 AND status = $4 RETURNING {JOB_STATE}"
    ))
    .bind(&job_id)
    .bind(now)
    .bind(JobStatus::Processing)
    .bind(JobStatus::Pending)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(job) = started {
        notify_state(tx, &job).await?;
    }
    Ok(true)
}

/// [`Store::complete_output`] inside the caller's transaction; what it owes
/// the account rows goes to `accounts`.
async fn complete_output_in(
    tx: &mut Tx,
    accounts: &mut AccountChanges,
    output_id: i64,
    attempt: i64,
    result: &OutputResult,
) -> Result<Option<WorkQueue>> {
    // The update's guard is the live attempt's (a completion comes only
    // from a leased state): a stale or duplicate report changes nothing.
    let Some((o, job)) = finish_output(
        tx,
        accounts,
        (output_id, attempt),
        OutputStatus::Completed,
        "",
        Some(result),
        true,
    )
    .await?
    else {
        return Ok(None);
    };
    if job.should_post_process == 1 {
        // The pass changes the job's post-processing status after the
        // state came back: the job is read again for its notification.
        post_processing_progress(tx, &o, result.post_processed).await?;
        finalize_job(tx, accounts, &o.job_id, None).await?;
    } else {
        finalize_state(tx, accounts, job, None, true).await?;
    }
    Ok(Some(o.queue))
}

/// [`Store::record_failure`] inside the caller's transaction; what it owes
/// the account rows goes to `accounts`.
#[allow(clippy::too_many_arguments)]
async fn record_failure_in(
    tx: &mut Tx,
    accounts: &mut AccountChanges,
    output_id: i64,
    attempt: i64,
    kind: &FailureKind,
    message: &str,
    policy: &RetryPolicy,
    unit: f64,
) -> Result<FailureOutcome> {
    let Some(o) = live_output(tx, output_id, attempt).await? else {
        return Ok(FailureOutcome::Ignored);
    };
    let retry_allowed = match kind {
        FailureKind::Retryable => attempt < o.max_attempts,
        FailureKind::Permanent | FailureKind::Refused => false,
    };
    // A refusal falls back to the next engine only when the client let the
    // server choose (`model: auto`); a named engine's refusal is final.
    let fallback_allowed = matches!(kind, FailureKind::Refused) && attempt < o.max_attempts && {
        let sql = format!("{JOB_SELECT} WHERE j.id = $1");
        let job = sqlx::query_as::<_, JobRow>(&sql)
            .bind(&o.job_id)
            .fetch_one(&mut **tx)
            .await?;
        job.spec.engine_fallback()
    };
    let outcome = if fallback_allowed {
        let sql = format!(
            "UPDATE outputs SET status = $5, engine_index = engine_index + 1, scheduled_at = $3, lease_expires_at = NULL, \
             lease_owner = NULL, last_error = $4, updated_at = $3 WHERE id = $1 AND attempt = $2 AND status IN ({})",
            OutputStatus::sql_sources_of(OutputStatus::Pending)
        );
        sqlx::query(&sql)
            .bind(output_id)
            .bind(attempt)
            .bind(now_ms())
            .bind(message)
            .bind(OutputStatus::Pending)
            .execute(&mut **tx)
            .await?;
        FailureOutcome::FellBack {
            engine_index: o.engine_index + 1,
        }
    } else if retry_allowed {
        let delay = policy.delay(u32::try_from(attempt).unwrap_or(u32::MAX), unit);
        let at = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
        let sql = format!(
            "UPDATE outputs SET status = $6, scheduled_at = $3, lease_expires_at = NULL, lease_owner = NULL, \
             last_error = $4, updated_at = $5 WHERE id = $1 AND attempt = $2 AND status IN ({})",
            OutputStatus::sql_sources_of(OutputStatus::Pending)
        );
        sqlx::query(&sql)
            .bind(output_id)
            .bind(attempt)
            .bind(at)
            .bind(message)
            .bind(now_ms())
            .bind(OutputStatus::Pending)
            .execute(&mut **tx)
            .await?;
        FailureOutcome::Retried { at }
    } else {
        let reason = if matches!(kind, FailureKind::Retryable) {
            format!("{message} (gave up after {attempt} attempts)")
        } else {
            message.to_string()
        };
        match finish_output(
            tx,
            accounts,
            (o.id, o.attempt),
            OutputStatus::Failed,
            &reason,
            None,
            false,
        )
        .await?
        {
            Some((_, job)) => finalize_state(tx, accounts, job, None, true).await?,
            None => finalize_job(tx, accounts, &o.job_id, None).await?,
        }
        FailureOutcome::Failed
    };
    Ok(outcome)
}

/// [`Store::extend_lease`] on the caller's connection or transaction.
async fn extend_lease_in(
    conn: &mut sqlx::AnyConnection,
    output_id: i64,
    attempt: i64,
    lease_until: i64,
) -> Result<bool> {
    let sql = format!(
        "UPDATE outputs SET lease_expires_at = $3, updated_at = $4 WHERE id = $1 AND attempt = $2 AND status IN ({})",
        OutputStatus::sql_in(&OutputStatus::LEASED)
    );
    let r = sqlx::query(&sql)
        .bind(output_id)
        .bind(attempt)
        .bind(lease_until)
        .bind(now_ms())
        .execute(&mut *conn)
        .await?;
    Ok(r.rows_affected() == 1)
}

impl Store {
    /// Takes or renews the lease of duty `name` for `holder` until
    /// `now + ttl_ms`: granted when nobody holds it, `holder` already does
    /// or the holder's lease ran out. Whether it was granted.
    pub async fn hold_duty(&self, name: &str, holder: &str, now: i64, ttl_ms: i64) -> Result<bool> {
        let until = now.saturating_add(ttl_ms);
        let taken = sqlx::query(
            "UPDATE scheduler_duties SET holder = $2, expires_at = $3 \
             WHERE name = $1 AND (holder = $2 OR expires_at < $4)",
        )
        .bind(name)
        .bind(holder)
        .bind(until)
        .bind(now)
        .execute(self.pool())
        .await?;
        if taken.rows_affected() == 1 {
            return Ok(true);
        }
        let created = sqlx::query(
            "INSERT INTO scheduler_duties (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(holder)
        .bind(until)
        .execute(self.pool())
        .await?;
        Ok(created.rows_affected() == 1)
    }

    /// Gives duty `name` up if `holder` holds it, so another replica takes
    /// it at once.
    pub async fn release_duty(&self, name: &str, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM scheduler_duties WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Frees every duty: for a process alone on its database (the holders
    /// were processes that are gone).
    pub async fn release_all_duties(&self) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM scheduler_duties")
            .execute(self.pool())
            .await?
            .rows_affected())
    }

    /// Who holds duty `name` and until when, if anyone.
    pub async fn duty_holder(&self, name: &str) -> Result<Option<(String, i64)>> {
        Ok(
            sqlx::query_as("SELECT holder, expires_at FROM scheduler_duties WHERE name = $1")
                .bind(name)
                .fetch_optional(self.pool())
                .await?,
        )
    }
}
