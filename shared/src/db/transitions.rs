//! The transitions every role shares: an output reaching a terminal state
//! (with its settlement) and a job being finalised. Each runs inside the
//! caller's transaction, guarded so that a duplicate or stale call changes
//! nothing; everything the transition causes (charge or release, counters,
//! notifications, the freed active-job slot) happens in the same
//! transaction only if the guarded update touched a row.
//!
//! The account rows are written last: every admission and settlement of an
//! account serialises on its row, so a transition collects what it owes
//! them in [`AccountChanges`] and the caller applies that as the last
//! statement(s) before its commit. The row is then locked only from there to
//! the commit, not across the transition's other writes.

use super::accounts::ledger;
use super::notifications::{notify_output, notify_state};
use super::rows::{JOB_STATE, JobState, OUTPUT_COLUMNS, OutputRow};
use super::{Result, Tx, to_json};
use crate::domain::credits::Credits;
use crate::domain::{JobStatus, JobType, OutputResult, OutputStatus};
use crate::time::now_ms;

/// What one transaction owes the account rows; see the module's note.
#[derive(Debug, Default)]
pub(crate) struct AccountChanges {
    /// One entry per account, in the order first touched.
    deltas: Vec<AccountDelta>,
}

/// Changes to one account row: milli-credits and active-job slots.
#[derive(Debug)]
struct AccountDelta {
    account: String,
    balance: i64,
    reserved: i64,
    active_jobs: i64,
    /// Pays for an output settled here (even one that cost nothing).
    pays: bool,
}

impl AccountDelta {
    fn moves_credits(&self) -> bool {
        self.balance != 0 || self.reserved != 0
    }
}

impl AccountChanges {
    fn entry(&mut self, account: &str) -> &mut AccountDelta {
        let i = match self.deltas.iter().position(|d| d.account == account) {
            Some(i) => i,
            None => {
                self.deltas.push(AccountDelta {
                    account: account.to_string(),
                    balance: 0,
                    reserved: 0,
                    active_jobs: 0,
                    pays: false,
                });
                self.deltas.len() - 1
            }
        };
        &mut self.deltas[i]
    }

    /// A settled output's credits: its reservation released, and charged
    /// to the balance when `charge`.
    fn settle(&mut self, billing_account: &str, cost: Credits, charge: bool) {
        let e = self.entry(billing_account);
        e.pays = true;
        e.reserved -= cost.0;
        if charge {
            e.balance -= cost.0;
        }
    }

    /// The changes that write something, in the order they are written
    /// (see [`AccountChanges::apply`]).
    fn in_lock_order(self) -> Vec<AccountDelta> {
        let mut deltas = self.deltas;
        deltas.retain(|d| d.moves_credits() || d.active_jobs != 0);
        deltas.sort_by(|a, b| (!a.pays, &a.account).cmp(&(!b.pays, &b.account)));
        deltas
    }

    /// A freed active-job slot.
    fn free_slot(&mut self, account: &str) {
        self.entry(account).active_jobs -= 1;
    }

    /// Writes what is owed, one statement per account: the accounts that
    /// pay for an output settled here (billing accounts) first, then the
    /// others (member accounts), the lock order admission keeps too (a
    /// group's owner before its member; a batch of self-paying accounts by
    /// id); by id within each, so that two transactions lock the same
    /// accounts in the same order. An output that cost nothing still puts
    /// its payer first: ordered by whether its credits moved, a
    /// self-paying account freeing only a slot came after the others and
    /// could deadlock with an admission batch locking both by id.
    pub(crate) async fn apply(self, tx: &mut Tx) -> Result<()> {
        for d in self.in_lock_order() {
            sqlx::query(
                "UPDATE accounts SET balance = balance + $2, reserved = reserved + $3, \
                 active_jobs = active_jobs + $4 WHERE id = $1",
            )
            .bind(&d.account)
            .bind(d.balance)
            .bind(d.reserved)
            .bind(d.active_jobs)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

/// The output if `attempt` is its live (leased) attempt: reports of any
/// other attempt (superseded by a retry, or duplicates of a recorded one)
/// find nothing here and change nothing.
pub(crate) async fn live_output(
    tx: &mut Tx,
    output_id: i64,
    attempt: i64,
) -> Result<Option<OutputRow>> {
    let sql = format!(
        "SELECT {OUTPUT_COLUMNS} FROM outputs WHERE id = $1 AND attempt = $2 AND status IN ({})",
        OutputStatus::sql_in(&OutputStatus::LEASED)
    );
    Ok(sqlx::query_as::<_, OutputRow>(&sql)
        .bind(output_id)
        .bind(attempt)
        .fetch_optional(&mut **tx)
        .await?)
}

/// Moves attempt `live.1` of output `live.0` to a terminal state and
/// settles its credits: a charge for `completed`, a release otherwise.
/// No-op (`None`) if the guard (that attempt, in a state that may reach
/// `to`) does not match; else the output as it is now and its job's state
/// after its counter moved (terminal if this output finalised it: see
/// [`count_output`]; [`finalize_state`] then has nothing left to do).
pub(crate) async fn finish_output(
    tx: &mut Tx,
    accounts: &mut AccountChanges,
    live: (i64, i64),
    to: OutputStatus,
    message: &str,
    result: Option<&OutputResult>,
    charge: bool,
) -> Result<Option<(OutputRow, JobState)>> {
    debug_assert!(to.is_terminal());
    let now = now_ms();
    let sql = format!(
        "UPDATE outputs SET status = $3, lease_expires_at = NULL, lease_owner = NULL, finalized_at = $4, updated_at = $4, \
         error_message = $5, full_key = $6, thumb_key = $7, model_used = $8, width = $9, height = $10, \
         processing_ms = $11, input_description = $12, output_format = COALESCE($13, output_format) \
         WHERE id = $1 AND attempt = $2 AND status IN ({}) RETURNING {OUTPUT_COLUMNS}",
        OutputStatus::sql_sources_of(to)
    );
    let description = result.map(|r| to_json(&r.input_description)).transpose()?;
    // The row as it is now, for the settlement and the notification: no
    // second read.
    let after = sqlx::query_as::<_, OutputRow>(&sql)
        .bind(live.0)
        .bind(live.1)
        .bind(to.as_str())
        .bind(now)
        .bind((!message.is_empty()).then_some(message))
        .bind(result.map(|r| r.full_key.as_str()))
        .bind(result.map(|r| r.thumb_key.as_str()))
        .bind(result.map(|r| r.model_used.as_str()))
        .bind(result.map(|r| i64::from(r.width)))
        .bind(result.map(|r| i64::from(r.height)))
        .bind(result.map(|r| r.processing_ms))
        .bind(description)
        .bind(result.map(|r| r.format.as_str()))
        .fetch_optional(&mut **tx)
        .await?;
    let Some(o) = after else {
        return Ok(None);
    };
    let cost = Credits(o.cost);
    accounts.settle(&o.billing_account_id, cost, charge);
    let (job, finalized) = count_output(tx, &o.job_id, to, now).await?;
    // The reservation is closed with the job's last output.
    let res_sql = if charge {
        "UPDATE reservations SET held = held - $2, charged = charged + $2, \
         closed_at = CASE WHEN $3 = 1 THEN COALESCE(closed_at, $4) ELSE closed_at END WHERE job_id = $1"
    } else {
        "UPDATE reservations SET held = held - $2, released = released + $2, \
         closed_at = CASE WHEN $3 = 1 THEN COALESCE(closed_at, $4) ELSE closed_at END WHERE job_id = $1"
    };
    sqlx::query(res_sql)
        .bind(&o.job_id)
        .bind(cost.0)
        .bind(i64::from(finalized))
        .bind(now)
        .execute(&mut **tx)
        .await?;
    ledger(
        tx,
        &o.billing_account_id,
        Some(&o.job_id),
        Some(o.id),
        if charge { "charge" } else { "release" },
        cost,
        None,
    )
    .await?;
    if !job.job_type.quiet() {
        notify_output(tx, &job.account_id, &o).await?;
    }
    if finalized {
        // What [`finalize_state`] does after its update; the reservation
        // was closed above.
        if job.counts_against_cap == 1 {
            accounts.free_slot(&job.account_id);
        }
        if job.job_type == JobType::Training {
            super::trainings::on_finalized(tx, &job.id, job.status).await?;
        }
        notify_state(tx, &job).await?;
    }
    Ok(Some((o, job)))
}

/// Counts a terminal output on its job and answers the job's state after
/// that, and whether this update finalised the job. A completed output
/// that is the last open one of an open job without a post-processing
/// pass (the common case) finalises the job in the same update, as
/// [`finalize_state`] would right after (`completed`, no post-processing
/// status): one statement instead of two. Every other case only counts,
/// and the caller finalises as before.
async fn count_output(
    tx: &mut Tx,
    job_id: &str,
    to: OutputStatus,
    now: i64,
) -> Result<(JobState, bool)> {
    if to == OutputStatus::Completed {
        let last =
            "should_post_process = 0 AND completed_outputs + failed_outputs + 1 = total_outputs";
        let sql = format!(
            "UPDATE jobs SET completed_outputs = completed_outputs + 1, updated_at = $2, \
             status = CASE WHEN {last} THEN $3 ELSE status END, \
             finalized_at = CASE WHEN {last} THEN $2 ELSE finalized_at END, \
             post_processing_status = CASE WHEN {last} THEN NULL ELSE post_processing_status END, \
             post_processing_error = CASE WHEN {last} THEN NULL ELSE post_processing_error END \
             WHERE id = $1 AND status IN ({}) RETURNING {JOB_STATE}",
            JobStatus::sql_in(&JobStatus::OPEN)
        );
        let counted: Option<JobState> = sqlx::query_as(&sql)
            .bind(job_id)
            .bind(now)
            .bind(JobStatus::Completed)
            .fetch_optional(&mut **tx)
            .await?;
        if let Some(job) = counted {
            // The job was open before this update (its guard).
            let finalized = job.status.is_terminal();
            return Ok((job, finalized));
        }
    }
    let counter = if to == OutputStatus::Completed {
        "completed_outputs"
    } else {
        "failed_outputs"
    };
    let job: JobState = sqlx::query_as(&format!(
        "UPDATE jobs SET {counter} = {counter} + 1, updated_at = $2 WHERE id = $1 RETURNING {JOB_STATE}"
    ))
    .bind(job_id)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    Ok((job, false))
}

/// Tracks the post-processing pass of a job that asked for one: the first
/// post-processed output moves it to `processing`; an output completed
/// without the pass (a worker that lacks it) marks it `failed`, for good.
pub(crate) async fn post_processing_progress(
    tx: &mut Tx,
    o: &OutputRow,
    post_processed: bool,
) -> Result<()> {
    let sql = format!(
        "UPDATE jobs SET post_processing_status = $4, \
         post_processing_error = CASE WHEN $2 = 1 THEN post_processing_error ELSE $3 END \
         WHERE id = $1 AND should_post_process = 1 AND post_processing_status IN ({})",
        JobStatus::sql_in(&JobStatus::OPEN)
    );
    sqlx::query(&sql)
        .bind(&o.job_id)
        .bind(i64::from(post_processed))
        .bind(format!(
            "output {} (instruction {}, variation {}) completed without the post-processing pass",
            o.id, o.instruction_index, o.variation_index
        ))
        .bind(if post_processed {
            JobStatus::Processing
        } else {
            JobStatus::Failed
        })
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Finalises a job whose outputs are all terminal (or that is being
/// aborted): terminal status, reservation closed, active-job slot freed,
/// `batch_edit` notification. While outputs remain open it only reports the
/// progress (`batch_edit` with `processed_images`).
pub(crate) async fn finalize_job(
    tx: &mut Tx,
    accounts: &mut AccountChanges,
    job_id: &str,
    forced: Option<JobStatus>,
) -> Result<()> {
    let job: JobState = sqlx::query_as(&format!("SELECT {JOB_STATE} FROM jobs WHERE id = $1"))
        .bind(job_id)
        .fetch_one(&mut **tx)
        .await?;
    finalize_state(tx, accounts, job, forced, false).await
}

/// [`finalize_job`] from the job's state as the caller read it back from
/// its own update in this transaction (`touched`: that update already
/// moved `updated_at`).
pub(crate) async fn finalize_state(
    tx: &mut Tx,
    accounts: &mut AccountChanges,
    job: JobState,
    forced: Option<JobStatus>,
    touched: bool,
) -> Result<()> {
    let now = now_ms();
    if job.status.is_terminal() {
        return Ok(());
    }
    let (total, completed, failed) = (job.total_outputs, job.completed_outputs, job.failed_outputs);
    let next = match forced {
        Some(s) => s,
        None if completed + failed == total => JobStatus::finished(completed),
        None => {
            // Progress: one more output is terminal.
            if !touched {
                touch_job(tx, &job.id, now).await?;
            }
            notify_state(tx, &job).await?;
            return Ok(());
        }
    };
    let error = match next {
        JobStatus::Failed => {
            let last: Option<String> = sqlx::query_scalar(
                "SELECT error_message FROM outputs WHERE job_id = $1 AND error_message IS NOT NULL ORDER BY finalized_at DESC, id DESC LIMIT 1",
            )
            .bind(&job.id)
            .fetch_optional(&mut **tx)
            .await?
            .flatten();
            Some(format!(
                "all {total} outputs failed; last error: {}",
                last.unwrap_or_else(|| "unknown".into())
            ))
        }
        _ => None,
    };
    // The pass runs inside each output's task; the job's pass is complete
    // when the job is, unless an output came back without it.
    let (post_status, post_error) = if next == JobStatus::Completed {
        (JobStatus::Completed, None)
    } else {
        (JobStatus::Failed, Some("the job did not complete"))
    };
    let sql = format!(
        "UPDATE jobs SET status = $2, finalized_at = $3, updated_at = $3, error_message = COALESCE($4, error_message), \
         post_processing_status = CASE WHEN should_post_process = 1 THEN \
           CASE WHEN post_processing_status = $7 THEN $7 ELSE $5 END ELSE NULL END, \
         post_processing_error = CASE WHEN should_post_process = 1 THEN COALESCE(post_processing_error, $6) ELSE NULL END \
         WHERE id = $1 AND status IN ({}) RETURNING {JOB_STATE}",
        JobStatus::sql_in(&JobStatus::OPEN)
    );
    let finalized: Option<JobState> = sqlx::query_as(&sql)
        .bind(&job.id)
        .bind(next)
        .bind(now)
        .bind(error)
        .bind(post_status)
        .bind(post_error)
        .bind(JobStatus::Failed)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(finalized) = finalized else {
        // Someone else finalised it first: its slot and reservation are settled.
        return Ok(());
    };
    sqlx::query("UPDATE reservations SET closed_at = $2 WHERE job_id = $1 AND closed_at IS NULL")
        .bind(&job.id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    if job.counts_against_cap == 1 {
        accounts.free_slot(&job.account_id);
    }
    if job.job_type == JobType::Training {
        super::trainings::on_finalized(tx, &job.id, next).await?;
    }
    notify_state(tx, &finalized).await?;
    Ok(())
}

/// Bumps `updated_at` of a job (every state change does).
pub(crate) async fn touch_job(tx: &mut Tx, job_id: &str, now: i64) -> Result<()> {
    sqlx::query("UPDATE jobs SET updated_at = $2 WHERE id = $1")
        .bind(job_id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Payers first, by id, then the accounts that only free a slot: a
    /// payer whose output cost nothing is still a payer, so a batch of
    /// self-paying accounts is locked by id, as group admission locks it.
    #[test]
    fn payers_are_locked_first_even_when_nothing_was_charged() {
        let mut c = AccountChanges::default();
        c.settle("c-member-owner", Credits(3_000), true);
        c.free_slot("b-member");
        c.settle("d-self", Credits(0), true);
        c.free_slot("d-self");
        c.settle("a-self", Credits(1_000), false);
        c.free_slot("a-self");
        c.settle("e-nothing", Credits(0), true);
        let order: Vec<String> = c.in_lock_order().into_iter().map(|d| d.account).collect();
        assert_eq!(order, ["a-self", "c-member-owner", "d-self", "b-member"]);
    }
}
