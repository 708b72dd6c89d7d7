//! Jobs and their outputs: transactional creation (admission), reads, abort.

use super::accounts::ledger;
use super::admissions::Prepared;
use super::files::{UnusableFile, uploaded_keys};
use super::notifications::{batch_edit_data, created_state, notify_created, notify_job};
use super::outbox::enqueue_outbox;
use super::rows::{JOB_SELECT, JobRow, OUTPUT_COLUMNS, OutputRow};
use super::transitions::{AccountChanges, finalize_job, finish_output};
use super::{Result, Store, Tx, to_json};
use crate::domain::credits::{Credits, PriceTable};
use crate::domain::identity::FaceRecord;
use crate::domain::kinds::IdentityUse;
use crate::domain::task::{FaceRef, JobInputs, ProfileFace};
use crate::domain::{JobSpec, JobStatus, JobType, OutputStatus};
use crate::time::now_ms;
use sqlx::AnyConnection;

/// A job to admit. Its kind, outputs, costs, post-processing flag and the
/// checks admission makes all follow from the typed spec.
pub struct NewJob<'a> {
    pub account_id: &'a str,
    pub billing_account_id: &'a str,
    pub project_id: Option<&'a str>,
    pub spec: JobSpec,
    pub prices: &'a PriceTable,
    pub max_attempts: u32,
    /// `None`: exempt from the active-job cap (enterprise).
    pub active_job_cap: Option<u32>,
    /// W3C `traceparent` the job's work continues (see `domain::trace`).
    pub traceparent: Option<String>,
}

/// The result of admission, decided inside the creating transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    Created {
        job_id: String,
        total_outputs: i64,
        required: Credits,
    },
    ConcurrencyLimit {
        active: i64,
        cap: u32,
    },
    InsufficientCredits {
        required: Credits,
        in_progress: Credits,
        user_credits: Credits,
    },
    /// Input file `index` (in the spec's order) is not an uploaded file of
    /// the caller: none of the caller's (deleted, another account's), or,
    /// `pending`, one whose bytes were never stored.
    FileUnavailable {
        index: usize,
        file_id: String,
        pending: bool,
    },
    /// [`IdentityUse::Ready`] names no identity of the caller.
    IdentityNotFound {
        code: String,
    },
    /// [`IdentityUse::Ready`] names an identity whose preprocessing is in
    /// this state (not `completed`).
    IdentityNotReady {
        status: &'static str,
    },
    /// A named profile is not one of the caller's.
    ProfileNotFound {
        id: String,
    },
    /// A named profile is not READY (or has no usable face).
    ProfileNotReady {
        id: String,
    },
}

/// What [`Store::abort_job`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Abort {
    /// False when the job had already finished.
    pub aborted: bool,
    /// `(output_id, attempt)` of the outputs handed to workers (dispatched
    /// or running): their work is told to stop
    /// ([`crate::domain::task::cancel_marker`]).
    pub running: Vec<(i64, i64)>,
}

/// What [`Store::regenerate`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Regeneration {
    /// The new version is queued, its cost reserved.
    Queued {
        output_id: i64,
        version: i64,
        cost: Credits,
    },
    /// Only finished jobs are regenerated; the job is in this state.
    NotFinished(JobStatus),
    /// The job has no output at that index.
    NoSuchOutput,
    /// Credits or the active-job cap.
    Refused(Admission),
}

/// What resolving a job's inputs found missing.
enum Missing {
    File(UnusableFile),
    Face,
    Profile(String),
}

impl From<UnusableFile> for Admission {
    fn from(f: UnusableFile) -> Admission {
        Admission::FileUnavailable {
            index: f.index,
            file_id: f.file_id,
            pending: f.pending,
        }
    }
}

/// The stored form of a job's spec (`jobs.spec`).
fn spec_json(spec: &JobSpec) -> Result<String> {
    to_json(
        &spec
            .to_value()
            .map_err(|e| super::StoreError::Corrupt(e.to_string()))?,
    )
}

/// `(balance, reserved)` of an account, as they are now.
pub(crate) async fn credits_of(conn: &mut AnyConnection, account_id: &str) -> Result<(i64, i64)> {
    Ok(
        sqlx::query_as("SELECT balance, reserved FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// Which of admission's account checks refused `j`, its billing account
/// showing `balance` and `reserved` after the refusal: the credits when
/// they fall short of `required`, else the active-job cap (the member's
/// count read now).
pub(crate) async fn account_refusal(
    conn: &mut AnyConnection,
    account_id: &str,
    active_job_cap: Option<u32>,
    required: Credits,
    balance: i64,
    reserved: i64,
) -> Result<Admission> {
    if balance - reserved < required.0 {
        return Ok(Admission::InsufficientCredits {
            required,
            in_progress: Credits(reserved),
            user_credits: Credits(balance),
        });
    }
    let active: i64 = sqlx::query_scalar("SELECT active_jobs FROM accounts WHERE id = $1")
        .bind(account_id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Admission::ConcurrencyLimit {
        active,
        cap: active_job_cap.unwrap_or(u32::MAX),
    })
}

/// The face a completed preprocessing job built: its crop and record;
/// `None` when it has none usable (missing, or recorded in a form this
/// version cannot read).
pub(crate) async fn face_of_job(conn: &mut AnyConnection, job_id: &str) -> Result<Option<FaceRef>> {
    let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT full_key, input_description FROM outputs WHERE job_id = $1 AND status = $2 \
         ORDER BY version DESC LIMIT 1",
    )
    .bind(job_id)
    .bind(OutputStatus::Completed)
    .fetch_optional(&mut *conn)
    .await?;
    let record = row.as_ref().and_then(|(_, d)| {
        d.as_deref()
            .and_then(|d| serde_json::from_str::<FaceRecord>(d).ok())
    });
    Ok(match (row, record) {
        (Some((Some(crop_key), _)), Some(record)) => Some(FaceRef {
            job_id: job_id.to_string(),
            crop_key,
            record,
        }),
        _ => None,
    })
}

/// Resolves what a job reads: the object keys of its input files (which
/// must be uploaded files of `account_id`) and the face of `face_job`.
async fn resolve_inputs(
    conn: &mut AnyConnection,
    account_id: &str,
    spec: &JobSpec,
    face_job: Option<&str>,
    profile_jobs: &[(&str, String)],
) -> Result<std::result::Result<JobInputs, Missing>> {
    let files = match uploaded_keys(conn, account_id, &spec.requirements().files).await? {
        Ok(f) => f,
        Err(f) => return Ok(Err(Missing::File(f))),
    };
    let face = match face_job {
        None => None,
        Some(job_id) => match face_of_job(conn, job_id).await? {
            Some(f) => Some(f),
            None => return Ok(Err(Missing::Face)),
        },
    };
    let mut profiles = Vec::new();
    for (profile_id, job_id) in profile_jobs {
        match face_of_job(conn, job_id).await? {
            Some(face) => profiles.push(ProfileFace {
                profile_id: profile_id.to_string(),
                face,
            }),
            None => return Ok(Err(Missing::Profile(profile_id.to_string()))),
        }
    }
    Ok(Ok(JobInputs {
        files,
        face,
        profiles,
    }))
}

/// Rows per multi-row `INSERT` of outputs: 11 values each, well under
/// either database's limit on bound parameters.
const OUTPUTS_PER_INSERT: usize = 256;

/// For each column of an output row, which of the row's 11 bound values
/// it takes: the three timestamps share one.
const OUTPUT_ROW: [usize; 13] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 7, 7, 10];

/// One pending row per planned output of a new job, in as few statements
/// as the parameter limit allows (one for every job but the largest).
async fn insert_outputs(
    tx: &mut Tx,
    job_id: &str,
    j: &NewJob<'_>,
    job_type: JobType,
    outputs: &[crate::domain::kinds::PlannedOutput],
    now: i64,
) -> Result<()> {
    for chunk in outputs.chunks(OUTPUTS_PER_INSERT) {
        let rows = (0..chunk.len())
            .map(|r| {
                let values = OUTPUT_ROW.map(|k| format!("${}", r * 11 + k + 1));
                format!("({})", values.join(", "))
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO outputs (job_id, billing_account_id, queue, instruction_index, variation_index, status, \
             max_attempts, scheduled_at, cost, output_format, created_at, updated_at, account_id) VALUES {rows}"
        );
        let mut q = sqlx::query(&sql);
        for o in chunk {
            q = q
                .bind(job_id)
                .bind(j.billing_account_id)
                .bind(job_type.queue())
                .bind(i64::from(o.instruction_index))
                .bind(i64::from(o.variation_index))
                .bind(OutputStatus::Pending)
                .bind(i64::from(j.max_attempts))
                .bind(now)
                .bind(o.cost.0)
                .bind(o.format.ext())
                .bind(j.account_id);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Filters and page of [`Store::list_jobs`].
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    pub page: i64,
    pub per_page: i64,
    pub ascending: bool,
    pub status: Option<JobStatus>,
    pub job_type: Option<JobType>,
    pub project_id: Option<String>,
}

impl Store {
    /// Admits and records a job in ONE transaction: the active-job slot, the
    /// credit reservation (with its ledger row), the job with its resolved
    /// inputs, one row per output, the creation notification and the
    /// outbox row that wakes the scheduler. Either all of it is committed or
    /// none of it.
    pub async fn create_job(&self, j: NewJob<'_>) -> Result<Admission> {
        if let Some(outputs) = self.at_once_plan(&j) {
            return self.admit_at_once(&j, outputs).await;
        }
        let mut tx = self.begin().await?;
        let admission = self.admit(&mut tx, &j).await?;
        if matches!(admission, Admission::Created { .. }) {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(admission)
    }

    /// The planned outputs of `j` when [`Store::admit_at_once`] admits it:
    /// on PostgreSQL, a job of a kind that reports its state, charged to
    /// its own account, that reads files only (no identity or profile row
    /// to lock) and has at least one output and no more than one statement
    /// carries.
    fn at_once_plan(&self, j: &NewJob<'_>) -> Option<Vec<crate::domain::kinds::PlannedOutput>> {
        let requirements = j.spec.requirements();
        let job_type = j.spec.job_type();
        let eligible = self.dialect == super::Dialect::Postgres
            && j.billing_account_id == j.account_id
            && requirements.identity.is_none()
            && requirements.profiles.is_empty()
            && !job_type.quiet()
            && !matches!(j.spec, JobSpec::IdentityPreprocessing(_));
        if !eligible {
            return None;
        }
        let outputs = j.spec.plan(j.prices);
        (1..=OUTPUTS_PER_INSERT)
            .contains(&outputs.len())
            .then_some(outputs)
    }

    /// Admission of a job that needs no row locked but its account's
    /// ([`Store::at_once_plan`], which planned its `outputs`): its files
    /// are read, then everything is
    /// written by ONE statement, committed on its own (data-modifying
    /// `WITH`), each insert conditional on the account row's conditional
    /// update, together with the other admissions that arrived meanwhile
    /// (`admissions`: group admission). That row is then locked only while
    /// the server runs the statement and commits it, never across a round
    /// trip to this process, and once per batch rather than once per job.
    /// It writes and checks what [`Store::admit`] does.
    async fn admit_at_once(
        &self,
        j: &NewJob<'_>,
        outputs: Vec<crate::domain::kinds::PlannedOutput>,
    ) -> Result<Admission> {
        let job_type = j.spec.job_type();
        let required: Credits = outputs.iter().map(|o| o.cost).sum();
        let files = {
            let mut conn = self.pool().acquire().await?;
            match uploaded_keys(&mut conn, j.account_id, &j.spec.requirements().files).await? {
                Ok(files) => files,
                Err(f) => return Ok(f.into()),
            }
        };
        let inputs = JobInputs {
            files,
            face: None,
            profiles: Vec::new(),
        };
        let job_id = crate::domain::JobId::generate().0;
        let total = outputs.len() as i64;
        let note = batch_edit_data(&created_state(j.account_id, &job_id, &j.spec, total));
        let slots = i64::from(job_type.counts_against_cap());
        let job = serde_json::json!({
            "id": job_id,
            "account": j.account_id,
            "project": j.project_id,
            "kind": job_type.as_str(),
            "spec": spec_json(&j.spec)?,
            "total": total,
            "post": i64::from(j.spec.post_process()),
            "post_status": j.spec.post_process().then_some(JobStatus::Pending.as_str()),
            "slots": slots,
            "traceparent": j.traceparent,
            "inputs": to_json(&inputs)?,
            "required": required.0,
            "note": to_json(&note)?,
            "queue": job_type.queue().as_str(),
            "attempts": i64::from(j.max_attempts),
        });
        let outputs = outputs
            .iter()
            .map(|o| {
                serde_json::json!({
                    "job": job_id,
                    "ins": o.instruction_index,
                    "var": o.variation_index,
                    "cost": o.cost.0,
                    "fmt": o.format.ext(),
                })
            })
            .collect();
        self.admit_grouped(Prepared {
            job_id,
            account_id: j.account_id.to_string(),
            active_job_cap: j.active_job_cap,
            required,
            slots,
            total_outputs: total,
            job,
            outputs,
        })
        .await
    }

    /// [`Store::create_job`] inside the caller's transaction, which the
    /// caller commits on `Created` and rolls back otherwise.
    pub(crate) async fn admit(&self, tx: &mut Tx, j: &NewJob<'_>) -> Result<Admission> {
        let job_type = j.spec.job_type();
        let outputs = j.spec.plan(j.prices);
        let requirements = j.spec.requirements();
        let required: Credits = outputs.iter().map(|o| o.cost).sum();
        let now = now_ms();

        let counts = job_type.counts_against_cap();
        // The identity's current face (a completed replacement counts),
        // with the identity row locked against a concurrent delete.
        let mut face_job: Option<String> = None;
        let mut waits_for: Option<String> = None;
        if let Some(IdentityUse::Ready(code)) = requirements.identity {
            let sql = format!(
                "SELECT j.status, j.id FROM identities i \
                 LEFT JOIN jobs pj ON pj.id = i.pending_job_id \
                 LEFT JOIN jobs j ON j.id = (CASE WHEN pj.status = $3 THEN pj.id ELSE i.job_id END) \
                 WHERE i.code = $1 AND i.kind = 'identity' AND {}{}",
                super::identities::visible_to("$2"),
                self.for_update_of("i")
            );
            let found: Option<(Option<JobStatus>, Option<String>)> = sqlx::query_as(&sql)
                .bind(code)
                .bind(j.account_id)
                .bind(JobStatus::Completed)
                .fetch_optional(&mut **tx)
                .await?;
            match found {
                None => {
                    return Ok(Admission::IdentityNotFound {
                        code: code.to_string(),
                    });
                }
                Some((Some(JobStatus::Completed), id)) => face_job = id,
                // Being preprocessed: the job waits for it (the scheduler
                // holds its outputs until the face exists).
                Some((Some(JobStatus::Pending | JobStatus::Processing), Some(id))) => {
                    waits_for = Some(id)
                }
                Some((s, _)) => {
                    return Ok(Admission::IdentityNotReady {
                        status: crate::domain::identity::preprocessing_status(s),
                    });
                }
            }
        }
        // Each named profile: the caller's, READY, locked against a delete.
        let mut profile_jobs: Vec<(&str, String)> = Vec::new();
        for id in &requirements.profiles {
            let sql = format!(
                "SELECT j.status, j.id FROM identities i LEFT JOIN jobs j ON j.id = i.job_id \
                 WHERE i.code = $1 AND i.account_id = $2 AND i.kind = $3{}",
                self.for_update_of("i")
            );
            let found: Option<(Option<JobStatus>, Option<String>)> = sqlx::query_as(&sql)
                .bind(*id)
                .bind(j.account_id)
                .bind(crate::domain::identity::IdentityKind::Profile.as_str())
                .fetch_optional(&mut **tx)
                .await?;
            match found {
                None => return Ok(Admission::ProfileNotFound { id: id.to_string() }),
                Some((Some(JobStatus::Completed), Some(job))) => profile_jobs.push((id, job)),
                Some(_) => return Ok(Admission::ProfileNotReady { id: id.to_string() }),
            }
        }
        let inputs = match resolve_inputs(
            tx,
            j.account_id,
            &j.spec,
            face_job.as_deref(),
            &profile_jobs,
        )
        .await?
        {
            Ok(inputs) => inputs,
            Err(Missing::File(f)) => return Ok(f.into()),
            Err(Missing::Face) => {
                return Ok(Admission::IdentityNotReady {
                    status: crate::domain::identity::preprocessing_status(Some(JobStatus::Failed)),
                });
            }
            Err(Missing::Profile(id)) => return Ok(Admission::ProfileNotReady { id }),
        };
        let spec_json = spec_json(&j.spec)?;
        let job_id = crate::domain::JobId::generate().0;
        sqlx::query(
            "INSERT INTO jobs (id, account_id, billing_account_id, project_id, job_type, status, spec, total_outputs, \
             should_post_process, post_processing_status, counts_against_cap, created_at, updated_at, traceparent, identity_code, \
             identity_face_job, inputs, waits_for) \
             VALUES ($1, $2, $3, $4, $5, $15, $6, $7, $8, $9, $10, $11, $11, $12, $13, $14, $16, $17)",
        )
        .bind(&job_id)
        .bind(j.account_id)
        .bind(j.billing_account_id)
        .bind(j.project_id)
        .bind(job_type)
        .bind(&spec_json)
        .bind(outputs.len() as i64)
        .bind(i64::from(j.spec.post_process()))
        .bind(j.spec.post_process().then_some(JobStatus::Pending))
        .bind(i64::from(counts))
        .bind(now)
        .bind(j.traceparent.as_deref())
        .bind(requirements.identity.map(IdentityUse::code))
        .bind(face_job.as_deref())
        .bind(JobStatus::Pending)
        .bind(to_json(&inputs)?)
        .bind(waits_for.as_deref())
        .execute(&mut **tx)
        .await?;
        insert_outputs(tx, &job_id, j, job_type, &outputs, now).await?;
        sqlx::query("INSERT INTO reservations (job_id, account_id, amount, held, created_at) VALUES ($1, $2, $3, $3, $4)")
            .bind(&job_id)
            .bind(j.billing_account_id)
            .bind(required.0)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        ledger(
            tx,
            j.billing_account_id,
            Some(&job_id),
            None,
            "reserve",
            required,
            None,
        )
        .await?;
        notify_created(tx, j.account_id, &job_id, &j.spec, outputs.len() as i64).await?;
        enqueue_outbox(
            tx,
            crate::domain::task::WAKE_QUEUE,
            &serde_json::json!({"event": "job_created", "job_id": job_id}),
        )
        .await?;
        // The account rows last (see `transitions`): every admission and
        // settlement of an account serialises on its row, so it is held
        // only from here to the commit. The updates are conditional, so
        // no check can be overtaken; a refusal rolls back everything
        // written above (the caller commits only `Created`).
        if let Some(refused) = self.reserve_for_admission(tx, j, required, counts).await? {
            return Ok(refused);
        }
        Ok(Admission::Created {
            job_id,
            total_outputs: outputs.len() as i64,
            required,
        })
    }

    /// Admission's writes to the account rows: `reserved` within the
    /// balance on the billing account, then (for a kind that counts) an
    /// active-job slot under the cap on the member account, the lock order
    /// used everywhere. One statement when both are the same account (as
    /// they are unless a group pays). `Some(refusal)` when a check fails.
    async fn reserve_for_admission(
        &self,
        tx: &mut Tx,
        j: &NewJob<'_>,
        required: Credits,
        counts: bool,
    ) -> Result<Option<Admission>> {
        let cap = j.active_job_cap.map(i64::from).unwrap_or(i64::MAX);
        let slot = i64::from(counts);
        let (balance, reserved): (i64, i64) = if j.billing_account_id == j.account_id {
            let r = sqlx::query(
                "UPDATE accounts SET reserved = reserved + $2, active_jobs = active_jobs + $3 \
                 WHERE id = $1 AND balance - reserved >= $2 AND ($3 = 0 OR active_jobs < $4)",
            )
            .bind(j.billing_account_id)
            .bind(required.0)
            .bind(slot)
            .bind(cap)
            .execute(&mut **tx)
            .await?;
            if r.rows_affected() == 1 {
                return Ok(None);
            }
            // Nothing changed: the row tells which check failed.
            credits_of(tx, j.billing_account_id).await?
        } else {
            let r = sqlx::query("UPDATE accounts SET reserved = reserved + $2 WHERE id = $1 AND balance - reserved >= $2")
                .bind(j.billing_account_id)
                .bind(required.0)
                .execute(&mut **tx)
                .await?;
            if r.rows_affected() == 0 {
                credits_of(tx, j.billing_account_id).await?
            } else if !counts {
                return Ok(None);
            } else {
                // Conditional increments are atomic on both dialects: no read-then-write race.
                let r = sqlx::query("UPDATE accounts SET active_jobs = active_jobs + 1 WHERE id = $1 AND active_jobs < $2")
                    .bind(j.account_id)
                    .bind(cap)
                    .execute(&mut **tx)
                    .await?;
                if r.rows_affected() == 1 {
                    return Ok(None);
                }
                // The credits were there: the cap refused.
                (i64::MAX, 0)
            }
        };
        Ok(Some(
            account_refusal(
                tx,
                j.account_id,
                j.active_job_cap,
                required,
                balance,
                reserved,
            )
            .await?,
        ))
    }

    /// What a job admitted before `jobs.inputs` existed reads, resolved
    /// now (the same resolution admission makes); `None` if an input is
    /// gone.
    pub async fn resolve_job_inputs(&self, job: &JobRow) -> Result<Option<JobInputs>> {
        let mut conn = self.pool().acquire().await?;
        // Jobs that name profiles were all admitted with `jobs.inputs`.
        Ok(resolve_inputs(
            &mut conn,
            &job.account_id,
            &job.spec,
            job.identity_face_job.as_deref(),
            &[],
        )
        .await?
        .ok())
    }

    /// A job visible to `account_id` (its own); `None` otherwise (404).
    pub async fn job_for(&self, account_id: &str, job_id: &str) -> Result<Option<JobRow>> {
        let sql = format!("{JOB_SELECT} WHERE j.id = $1 AND j.account_id = $2");
        Ok(sqlx::query_as::<_, JobRow>(&sql)
            .bind(job_id)
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// A page of `account_id`'s jobs, newest first unless `ascending`, with
    /// the number that match the filters.
    pub async fn list_jobs(&self, account_id: &str, q: &JobQuery) -> Result<(Vec<JobRow>, i64)> {
        // Quiet kinds (run on the platform's own behalf) are left out.
        static FILTER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            let quiet: Vec<String> = JobType::ALL
                .iter()
                .filter(|t| t.quiet())
                .map(|t| format!("'{t}'"))
                .collect();
            format!(
                "j.account_id = $1 AND ($2 IS NULL OR j.status = $2) \
                 AND ($3 IS NULL OR j.job_type = $3) AND ($4 IS NULL OR j.project_id = $4) \
                 AND j.job_type NOT IN ({})",
                quiet.join(", ")
            )
        });
        let filter = FILTER.as_str();
        let status = q.status.map(JobStatus::as_str);
        let job_type = q.job_type.map(JobType::as_str);
        let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM jobs j WHERE {filter}"))
            .bind(account_id)
            .bind(status)
            .bind(job_type)
            .bind(q.project_id.as_deref())
            .fetch_one(self.pool())
            .await?;
        let order = if q.ascending { "ASC" } else { "DESC" };
        let sql = format!(
            "{JOB_SELECT} WHERE {filter} ORDER BY j.created_at {order}, j.id {order} LIMIT $5 OFFSET $6"
        );
        let rows = sqlx::query_as::<_, JobRow>(&sql)
            .bind(account_id)
            .bind(status)
            .bind(job_type)
            .bind(q.project_id.as_deref())
            .bind(q.per_page)
            .bind((q.page - 1).max(0) * q.per_page)
            .fetch_all(self.pool())
            .await?;
        Ok((rows, total))
    }

    pub async fn job(&self, job_id: &str) -> Result<Option<JobRow>> {
        let sql = format!("{JOB_SELECT} WHERE j.id = $1");
        Ok(sqlx::query_as::<_, JobRow>(&sql)
            .bind(job_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// The latest version of every output of a job, in index order.
    /// Every version of every output of `job_id`, oldest version first.
    pub async fn all_outputs(&self, job_id: &str) -> Result<Vec<OutputRow>> {
        let sql = format!(
            "SELECT {OUTPUT_COLUMNS} FROM outputs WHERE job_id = $1 \
             ORDER BY instruction_index, variation_index, version"
        );
        Ok(sqlx::query_as::<_, OutputRow>(&sql)
            .bind(job_id)
            .fetch_all(self.pool())
            .await?)
    }

    pub async fn latest_outputs(&self, job_id: &str) -> Result<Vec<OutputRow>> {
        let sql = format!(
            "SELECT {OUTPUT_COLUMNS} FROM outputs o WHERE o.job_id = $1 AND o.version = \
             (SELECT MAX(v.version) FROM outputs v WHERE v.job_id = o.job_id AND v.instruction_index = o.instruction_index \
              AND v.variation_index = o.variation_index) ORDER BY instruction_index, variation_index"
        );
        Ok(sqlx::query_as::<_, OutputRow>(&sql)
            .bind(job_id)
            .fetch_all(self.pool())
            .await?)
    }

    pub async fn output(&self, output_id: i64) -> Result<Option<OutputRow>> {
        let sql = format!("SELECT {OUTPUT_COLUMNS} FROM outputs WHERE id = $1");
        Ok(sqlx::query_as::<_, OutputRow>(&sql)
            .bind(output_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// Aborts a non-terminal job: every output not yet terminal is cancelled
    /// and its reservation released; completed outputs stay billed.
    /// Returns `None` when the job is unknown to the account, `Some(false)`
    /// when it was already terminal.
    pub async fn abort_job(&self, account_id: &str, job_id: &str) -> Result<Option<Abort>> {
        let mut tx = self.begin().await?;
        let status: Option<JobStatus> =
            sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 AND account_id = $2")
                .bind(job_id)
                .bind(account_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(status) = status else {
            return Ok(None);
        };
        if status.is_terminal() {
            return Ok(Some(Abort::default()));
        }
        // Lock the open outputs first (in id order), so neither a dispatch nor
        // a completing worker can change them between this read and the cancel.
        let sql = format!(
            "SELECT {OUTPUT_COLUMNS} FROM outputs WHERE job_id = $1 AND status IN ({}) ORDER BY id{}",
            OutputStatus::sql_sources_of(OutputStatus::Cancelled),
            self.for_update()
        );
        let open = sqlx::query_as::<_, OutputRow>(&sql)
            .bind(job_id)
            .fetch_all(&mut *tx)
            .await?;
        let mut running = Vec::new();
        let mut accounts = AccountChanges::default();
        for o in &open {
            if finish_output(
                &mut tx,
                &mut accounts,
                (o.id, o.attempt),
                OutputStatus::Cancelled,
                "aborted by the client",
                None,
                false,
            )
            .await?
            .is_some()
                && matches!(o.status, OutputStatus::Dispatched | OutputStatus::Running)
            {
                // A dispatched task may already be running: its worker
                // starts before the scheduler records the start.
                running.push((o.id, o.attempt));
            }
        }
        finalize_job(&mut tx, &mut accounts, job_id, Some(JobStatus::Aborted)).await?;
        accounts.apply(&mut tx).await?;
        tx.commit().await?;
        Ok(Some(Abort {
            aborted: true,
            running,
        }))
    }

    /// Regenerates one output of a finished job (contract §3.11) in ONE
    /// transaction: the cost of the output's latest version reserved, the
    /// job reopened (`processing`, holding an active-job slot again when its
    /// kind counts against the cap) and a new output row with `version + 1`
    /// queued; earlier versions are kept. `None` when the job is not the
    /// caller's.
    pub async fn regenerate(
        &self,
        account_id: &str,
        job_id: &str,
        instruction_index: i64,
        variation_index: i64,
        active_job_cap: Option<u32>,
    ) -> Result<Option<Regeneration>> {
        let Some(job) = self.job_for(account_id, job_id).await? else {
            return Ok(None);
        };
        if !job.status.is_terminal() {
            return Ok(Some(Regeneration::NotFinished(job.status)));
        }
        let sql = format!(
            "SELECT {OUTPUT_COLUMNS} FROM outputs WHERE job_id = $1 AND instruction_index = $2 \
             AND variation_index = $3 ORDER BY version DESC LIMIT 1"
        );
        let Some(latest) = sqlx::query_as::<_, OutputRow>(&sql)
            .bind(job_id)
            .bind(instruction_index)
            .bind(variation_index)
            .fetch_optional(self.pool())
            .await?
        else {
            return Ok(Some(Regeneration::NoSuchOutput));
        };
        let cost = Credits(latest.cost);
        let now = now_ms();
        let mut tx = self.begin().await?;
        // Lock order everywhere: the billing account, then the member
        // account, then the job.
        let r = sqlx::query("UPDATE accounts SET reserved = reserved + $2 WHERE id = $1 AND balance - reserved >= $2")
            .bind(&job.billing_account_id)
            .bind(cost.0)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 0 {
            let (balance, reserved): (i64, i64) =
                sqlx::query_as("SELECT balance, reserved FROM accounts WHERE id = $1")
                    .bind(&job.billing_account_id)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.rollback().await?;
            return Ok(Some(Regeneration::Refused(
                Admission::InsufficientCredits {
                    required: cost,
                    in_progress: Credits(reserved),
                    user_credits: Credits(balance),
                },
            )));
        }
        let counts = job.job_type.counts_against_cap();
        if counts {
            let cap = active_job_cap.map(i64::from).unwrap_or(i64::MAX);
            let r = sqlx::query("UPDATE accounts SET active_jobs = active_jobs + 1 WHERE id = $1 AND active_jobs < $2")
                .bind(account_id)
                .bind(cap)
                .execute(&mut *tx)
                .await?;
            if r.rows_affected() == 0 {
                let active: i64 =
                    sqlx::query_scalar("SELECT active_jobs FROM accounts WHERE id = $1")
                        .bind(account_id)
                        .fetch_one(&mut *tx)
                        .await?;
                tx.rollback().await?;
                return Ok(Some(Regeneration::Refused(Admission::ConcurrencyLimit {
                    active,
                    cap: active_job_cap.unwrap_or(u32::MAX),
                })));
            }
        }
        // Reopened only if still finished: a concurrent regeneration of the
        // same job that committed first makes this one a conflict.
        let sql = format!(
            "UPDATE jobs SET status = $2, finalized_at = NULL, error_message = NULL, updated_at = $3, \
             total_outputs = total_outputs + 1, counts_against_cap = $4 \
             WHERE id = $1 AND status IN ({})",
            JobStatus::sql_in(&[JobStatus::Completed, JobStatus::Failed, JobStatus::Aborted])
        );
        let reopened = sqlx::query(&sql)
            .bind(job_id)
            .bind(JobStatus::Processing)
            .bind(now)
            .bind(i64::from(counts))
            .execute(&mut *tx)
            .await?;
        if reopened.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(Some(Regeneration::NotFinished(JobStatus::Processing)));
        }
        // Read again under the job's lock: a regeneration that committed
        // since the read above has moved the latest version on.
        let latest_version: i64 = sqlx::query_scalar(
            "SELECT CAST(MAX(version) AS BIGINT) FROM outputs WHERE job_id = $1 \
             AND instruction_index = $2 AND variation_index = $3",
        )
        .bind(job_id)
        .bind(instruction_index)
        .bind(variation_index)
        .fetch_one(&mut *tx)
        .await?;
        let version = latest_version + 1;
        let output_id: i64 = sqlx::query_scalar(
            "INSERT INTO outputs (job_id, billing_account_id, queue, instruction_index, variation_index, version, status, \
             max_attempts, scheduled_at, cost, output_format, created_at, updated_at, account_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $9, $9, $12) RETURNING id",
        )
        .bind(job_id)
        .bind(&job.billing_account_id)
        .bind(job.job_type.queue())
        .bind(instruction_index)
        .bind(variation_index)
        .bind(version)
        .bind(OutputStatus::Pending)
        .bind(latest.max_attempts)
        .bind(now)
        .bind(cost.0)
        .bind(&latest.output_format)
        .bind(&job.account_id)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE reservations SET amount = amount + $2, held = held + $2, closed_at = NULL WHERE job_id = $1",
        )
        .bind(job_id)
        .bind(cost.0)
        .execute(&mut *tx)
        .await?;
        ledger(
            &mut tx,
            &job.billing_account_id,
            Some(job_id),
            Some(output_id),
            "reserve",
            cost,
            None,
        )
        .await?;
        notify_job(&mut tx, job_id).await?;
        enqueue_outbox(
            &mut tx,
            crate::domain::task::WAKE_QUEUE,
            &serde_json::json!({"event": "output_regenerated", "job_id": job_id}),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(Regeneration::Queued {
            output_id,
            version,
            cost,
        }))
    }

    /// Invariant check used by tests and `atelier admin audit`: every
    /// reservation holds exactly the cost of its job's open outputs, closed
    /// jobs hold nothing, and each account's `reserved` is the sum of its
    /// reservations.
    pub async fn audit_credits(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let sql = format!(
            "SELECT r.job_id, r.held, CAST(COALESCE((SELECT SUM(o.cost) FROM outputs o WHERE o.job_id = r.job_id \
             AND o.status IN ({})), 0) AS BIGINT) FROM reservations r",
            OutputStatus::sql_in(&OutputStatus::OPEN)
        );
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(&sql).fetch_all(self.pool()).await?;
        for (job, held, open) in rows {
            if held != open {
                problems.push(format!(
                    "job {job}: reservation holds {held} but open outputs cost {open}"
                ));
            }
        }
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT a.id, a.reserved, CAST(COALESCE((SELECT SUM(r.held) FROM reservations r WHERE r.account_id = a.id), 0) AS BIGINT) \
             FROM accounts a",
        )
        .fetch_all(self.pool())
        .await?;
        for (acc, reserved, held) in rows {
            if reserved != held {
                problems.push(format!(
                    "account {acc}: reserved {reserved} but reservations hold {held}"
                ));
            }
        }
        let sql = format!(
            "SELECT a.id, a.active_jobs, (SELECT COUNT(*) FROM jobs j WHERE j.account_id = a.id AND j.counts_against_cap = 1 \
             AND j.status IN ({})) FROM accounts a",
            JobStatus::sql_in(&JobStatus::OPEN)
        );
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(&sql).fetch_all(self.pool()).await?;
        for (acc, active, open) in rows {
            if active != open {
                problems.push(format!(
                    "account {acc}: active_jobs {active} but {open} open jobs"
                ));
            }
        }
        for acc in sqlx::query_scalar::<_, String>("SELECT id FROM accounts")
            .fetch_all(self.pool())
            .await?
        {
            let t = self.ledger_totals(&acc).await?;
            let (balance, reserved): (i64, i64) =
                sqlx::query_as("SELECT balance, reserved FROM accounts WHERE id = $1")
                    .bind(&acc)
                    .fetch_one(self.pool())
                    .await?;
            if balance != t.granted - t.charged {
                problems.push(format!(
                    "account {acc}: balance {balance} but ledger says {}",
                    t.granted - t.charged
                ));
            }
            if reserved != t.reserved - t.charged - t.released {
                problems.push(format!(
                    "account {acc}: reserved {reserved} but ledger says {}",
                    t.reserved - t.charged - t.released
                ));
            }
        }
        Ok(problems)
    }
}
