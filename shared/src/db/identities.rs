//! Identities and profiles. An identity row names its preprocessing job;
//! status, timing, crop and embedding are read through that job and its
//! output, so they are recorded once, by the scheduler, like every result.

use super::jobs::{Admission, NewJob};
use super::{Result, Store, StoreError};
use crate::domain::JobStatus;
use crate::domain::identity::{FaceRecord, IdentityKind, preprocessing_status};
use crate::time::now_ms;
use std::sync::LazyLock;

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct IdentityRow {
    pub code: String,
    pub account_id: String,
    pub kind: String,
    pub name: String,
    pub tag: Option<String>,
    pub original_filename: Option<String>,
    pub photo_key: Option<String>,
    pub sources: String,
    pub training_tier: Option<String>,
    pub job_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub created_by: String,
    pub job_status: Option<JobStatus>,
    pub job_error: Option<String>,
    pub job_created_at: Option<i64>,
    pub job_finalized_at: Option<i64>,
    pub crop_key: Option<String>,
    pub crop_thumb_key: Option<String>,
    pub record: Option<String>,
    pub output_error: Option<String>,
    /// A platform identity offered to plans from this tier up.
    pub default_tier: Option<String>,
    /// The operator's description of a platform identity.
    pub gender: Option<String>,
    pub age: Option<i64>,
}

impl IdentityRow {
    /// `pending`, `processing`, `completed` or `failed` (contract §5.1).
    pub fn preprocessing_status(&self) -> &'static str {
        preprocessing_status(self.job_status)
    }

    /// Why the preprocessing failed, in the words of the step that failed
    /// (`no face detected`), not the job's summary.
    pub fn error_message(&self) -> Option<String> {
        if !matches!(
            self.job_status,
            Some(JobStatus::Failed | JobStatus::Aborted)
        ) {
            return None;
        }
        self.output_error.clone().or_else(|| self.job_error.clone())
    }

    /// What the preprocessing recorded, once it completed.
    pub fn record(&self) -> Option<FaceRecord> {
        self.record
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
    }

    /// Seconds from the preprocessing job's creation to its end.
    pub fn preprocessing_time(&self) -> Option<f64> {
        match (self.job_created_at, self.job_finalized_at) {
            (Some(a), Some(b)) => Some((b - a).max(0) as f64 / 1000.0),
            _ => None,
        }
    }
}

/// The identity with its effective preprocessing job `j`: the pending
/// replacement once it completed, the current one otherwise.
static IDENTITY_FROM: LazyLock<String> = LazyLock::new(|| {
    format!(
        "FROM identities i JOIN accounts a ON a.id = i.account_id \
         LEFT JOIN jobs pj ON pj.id = i.pending_job_id \
         LEFT JOIN jobs j ON j.id = (CASE WHEN pj.status = '{}' THEN pj.id ELSE i.job_id END) \
         LEFT JOIN outputs o ON o.job_id = j.id AND o.instruction_index = 0 AND o.variation_index = 0 AND o.version = 0",
        JobStatus::Completed
    )
});

const IDENTITY_COLUMNS: &str = "SELECT i.code, i.account_id, i.kind, i.name, i.tag, i.original_filename, i.photo_key, \
     i.sources, i.training_tier, j.id AS job_id, i.created_at, i.updated_at, a.name AS created_by, \
     j.status AS job_status, j.error_message AS job_error, j.created_at AS job_created_at, \
     j.finalized_at AS job_finalized_at, o.full_key AS crop_key, o.thumb_key AS crop_thumb_key, \
     o.input_description AS record, o.error_message AS output_error, i.default_tier, i.gender, i.age";

/// Identity `i` may be read and used by account `acc` (a bind parameter):
/// its own, shared with one of its groups, or a platform identity its plan
/// reaches.
pub(crate) fn visible_to(acc: &str) -> String {
    format!(
        "(i.account_id = {acc} OR EXISTS (SELECT 1 FROM identity_shares s JOIN group_members m ON m.group_id = s.group_id \
          WHERE s.identity_code = i.code AND m.account_id = {acc}) \
         OR (i.default_tier IS NOT NULL AND {}))",
        tier_reached(acc)
    )
}

/// The plan of account `acc` reaches the tier of platform identity `i`.
fn tier_reached(acc: &str) -> String {
    format!("(i.default_tier = 'standard' OR (SELECT plan FROM accounts WHERE id = {acc}) = 'enterprise')")
}

/// The status an identity shows, as SQL over the joined job (for filters).
static STATUS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "COALESCE(CASE j.status WHEN '{}' THEN '{}' ELSE j.status END, '{}')",
        JobStatus::Aborted,
        JobStatus::Failed,
        JobStatus::Pending
    )
});

fn identity_select(filter: &str) -> String {
    format!("{IDENTITY_COLUMNS} {} {filter}", *IDENTITY_FROM)
}

pub struct NewIdentity<'a> {
    pub code: &'a str,
    pub account_id: &'a str,
    pub kind: IdentityKind,
    pub name: &'a str,
    pub tag: Option<&'a str>,
    pub original_filename: Option<&'a str>,
    pub photo_key: Option<&'a str>,
    /// JSON list of [`crate::domain::identity::PhotoSource`].
    pub sources_json: String,
    pub training_tier: Option<&'a str>,
    /// `None`: no cap (enterprise, or profiles).
    pub slot_cap: Option<u32>,
    /// The draft (output id) it is promoted from.
    pub promoted_from: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum IdentityAdmission {
    Created {
        code: String,
        job_id: String,
        required: crate::domain::Credits,
    },
    /// The account already has an identity of this name.
    NameTaken {
        existing_code: String,
    },
    SlotsExhausted {
        used: i64,
        cap: u32,
    },
    /// The draft was promoted before, into identity `code`.
    AlreadyPromoted {
        code: String,
    },
    /// The preprocessing job was not admitted (credits).
    Refused(Admission),
}

#[derive(Debug, Clone, Default)]
pub struct IdentityQuery {
    pub page: i64,
    pub per_page: i64,
    pub ascending: bool,
    pub by_name: bool,
    /// Text the name contains (case-insensitive for ASCII).
    pub search: Option<String>,
    pub status: Option<String>,
    /// Text the tag contains (case-insensitive for ASCII).
    pub tag: Option<String>,
    /// The exact tag.
    pub tag_exact: Option<String>,
    /// Whose identities (identities only; profiles are always the caller's).
    pub ownership: Ownership,
    /// Also platform identities above the caller's plan (shown locked).
    pub include_locked: bool,
    pub gender: Option<String>,
    pub age_min: Option<i64>,
    pub age_max: Option<i64>,
}

/// The `ownership` filter of an identity list (contract §5.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ownership {
    /// Everything the caller may see.
    #[default]
    Any,
    Mine,
    /// Shared with the caller by another account.
    Shared,
    /// Offered by the platform.
    Default,
}

/// A `LIKE` pattern (escape `\`) matching values that contain `text`
/// literally: `%`, `_` and `\` in it are not wildcards.
fn contains_pattern(text: &str) -> String {
    let mut p = String::with_capacity(text.len() + 2);
    p.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeleteIdentity {
    NotFound,
    /// A pending or processing job works with the identity.
    InUse {
        job_id: String,
    },
    /// Deleted; these objects are the caller's to erase.
    Deleted {
        keys: Vec<String>,
    },
}

impl Store {
    /// Records an identity and admits its preprocessing job in one
    /// transaction: name clash, slot cap and credits are decided together,
    /// and either all of it is committed or none of it.
    pub async fn create_identity(
        &self,
        ident: NewIdentity<'_>,
        job: NewJob<'_>,
    ) -> Result<IdentityAdmission> {
        // Friendly answers first (a clash is not a credit problem); the
        // same checks are repeated under the account lock below.
        if let Some(draft) = ident.promoted_from
            && let Some(code) = self.promoted_from(draft).await?
        {
            return Ok(IdentityAdmission::AlreadyPromoted { code });
        }
        if let Some(code) = self
            .identity_named(ident.account_id, ident.kind, ident.name)
            .await?
        {
            return Ok(IdentityAdmission::NameTaken {
                existing_code: code,
            });
        }
        if let Some(cap) = ident.slot_cap {
            let used = count_identities(self.pool(), ident.account_id, ident.kind).await?;
            if used >= i64::from(cap) {
                return Ok(IdentityAdmission::SlotsExhausted { used, cap });
            }
        }
        let mut tx = self.begin().await?;
        let admission = self.admit(&mut tx, &job).await?;
        let (job_id, required) = match admission {
            Admission::Created {
                job_id, required, ..
            } => (job_id, required),
            other => {
                tx.rollback().await?;
                return Ok(IdentityAdmission::Refused(other));
            }
        };
        // Admission locked the billing account; the member account comes
        // second (the lock order used everywhere) and serialises this
        // account's identity creations, so the count cannot be overtaken.
        sqlx::query("UPDATE accounts SET active_jobs = active_jobs WHERE id = $1")
            .bind(ident.account_id)
            .execute(&mut *tx)
            .await?;
        if let Some(cap) = ident.slot_cap {
            let used = count_identities(&mut *tx, ident.account_id, ident.kind).await?;
            if used >= i64::from(cap) {
                tx.rollback().await?;
                return Ok(IdentityAdmission::SlotsExhausted { used, cap });
            }
        }
        let now = now_ms();
        let inserted = sqlx::query(
            "INSERT INTO identities (code, account_id, kind, name, tag, original_filename, photo_key, sources, \
             training_tier, job_id, created_at, updated_at, promoted_from) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, $12)",
        )
        .bind(ident.code)
        .bind(ident.account_id)
        .bind(ident.kind.as_str())
        .bind(ident.name)
        .bind(ident.tag)
        .bind(ident.original_filename)
        .bind(ident.photo_key)
        .bind(&ident.sources_json)
        .bind(ident.training_tier)
        .bind(&job_id)
        .bind(now)
        .bind(ident.promoted_from)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) => {
                let e = StoreError::from(e);
                tx.rollback().await?;
                // A concurrent promotion of the same draft won the index.
                if matches!(e, StoreError::Conflict(_))
                    && let Some(draft) = ident.promoted_from
                    && let Some(code) = self.promoted_from(draft).await?
                {
                    return Ok(IdentityAdmission::AlreadyPromoted { code });
                }
                if matches!(e, StoreError::Conflict(_))
                    && let Some(code) = self
                        .identity_named(ident.account_id, ident.kind, ident.name)
                        .await?
                {
                    return Ok(IdentityAdmission::NameTaken {
                        existing_code: code,
                    });
                }
                return Err(e);
            }
        }
        tx.commit().await?;
        Ok(IdentityAdmission::Created {
            code: ident.code.to_string(),
            job_id,
            required,
        })
    }

    /// The identity promoted from draft `output_id`, if any.
    pub async fn promoted_from(&self, output_id: i64) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT code FROM identities WHERE promoted_from = $1")
                .bind(output_id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    async fn identity_named(
        &self,
        account_id: &str,
        kind: IdentityKind,
        name: &str,
    ) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT code FROM identities WHERE account_id = $1 AND kind = $2 AND name = $3",
        )
        .bind(account_id)
        .bind(kind.as_str())
        .bind(name)
        .fetch_optional(self.pool())
        .await?)
    }

    /// An identity `account_id` may read and use: its own, shared with
    /// one of its groups, or a platform identity its plan reaches; `None`
    /// for anything else (404).
    pub async fn identity_visible(&self, account_id: &str, code: &str) -> Result<Option<IdentityRow>> {
        let sql = identity_select(&format!(
            "WHERE i.code = $1 AND i.kind = $3 AND {}",
            visible_to("$2")
        ));
        Ok(sqlx::query_as::<_, IdentityRow>(&sql)
            .bind(code)
            .bind(account_id)
            .bind(IdentityKind::Identity.as_str())
            .fetch_optional(self.pool())
            .await?)
    }

    /// The names of the groups identity `code` is shared with.
    pub async fn identity_groups(&self, code: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT g.name FROM identity_shares s JOIN groups g ON g.id = s.group_id \
             WHERE s.identity_code = $1 ORDER BY g.name",
        )
        .bind(code)
        .fetch_all(self.pool())
        .await?)
    }

    /// Shares (or unshares) identity `code` with group `group_id`; whether
    /// anything changed.
    pub async fn set_identity_share(&self, code: &str, group_id: &str, share: bool) -> Result<bool> {
        let r = if share {
            sqlx::query(
                "INSERT INTO identity_shares (identity_code, group_id, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(code)
            .bind(group_id)
            .bind(now_ms())
            .execute(self.pool())
            .await?
        } else {
            sqlx::query("DELETE FROM identity_shares WHERE identity_code = $1 AND group_id = $2")
                .bind(code)
                .bind(group_id)
                .execute(self.pool())
                .await?
        };
        Ok(r.rows_affected() > 0)
    }

    /// Makes identity `code` a platform identity offered from plan `tier`
    /// up, described by `gender` and `age` (the operator's words), or,
    /// with `tier` `None`, its owner's again. Whether it exists.
    pub async fn set_platform_identity(
        &self,
        code: &str,
        tier: Option<&str>,
        gender: Option<&str>,
        age: Option<i64>,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE identities SET default_tier = $2, gender = $3, age = $4, updated_at = $5 \
             WHERE code = $1 AND kind = 'identity'",
        )
        .bind(code)
        .bind(tier)
        .bind(gender)
        .bind(age)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Records who an identity shows (`image_description`'s `gender` and
    /// `age`, which the list filters read).
    pub async fn describe_identity(
        &self,
        code: &str,
        gender: Option<&str>,
        age: Option<i64>,
    ) -> Result<()> {
        sqlx::query("UPDATE identities SET gender = $2, age = $3 WHERE code = $1")
            .bind(code)
            .bind(gender)
            .bind(age)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// An identity or profile of `account_id`; `None` for anything else (404).
    pub async fn identity_for(
        &self,
        account_id: &str,
        kind: IdentityKind,
        code: &str,
    ) -> Result<Option<IdentityRow>> {
        let sql = identity_select("WHERE i.code = $1 AND i.account_id = $2 AND i.kind = $3");
        Ok(sqlx::query_as::<_, IdentityRow>(&sql)
            .bind(code)
            .bind(account_id)
            .bind(kind.as_str())
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn list_identities(
        &self,
        account_id: &str,
        kind: IdentityKind,
        q: &IdentityQuery,
    ) -> Result<(Vec<IdentityRow>, i64)> {
        let name_like = q.search.as_deref().map(contains_pattern);
        let tag_like = q.tag.as_deref().map(contains_pattern);
        let shared = "i.account_id <> $1 AND EXISTS (SELECT 1 FROM identity_shares s JOIN group_members m \
             ON m.group_id = s.group_id WHERE s.identity_code = i.code AND m.account_id = $1)";
        let platform = if q.include_locked {
            "i.default_tier IS NOT NULL".to_string()
        } else {
            format!("i.default_tier IS NOT NULL AND {}", tier_reached("$1"))
        };
        let whose = match (kind, q.ownership) {
            (IdentityKind::Profile, _) | (_, Ownership::Mine) => "i.account_id = $1".to_string(),
            (_, Ownership::Shared) => format!("({shared})"),
            (_, Ownership::Default) => format!("({platform})"),
            (_, Ownership::Any) => format!("(i.account_id = $1 OR ({shared}) OR ({platform}))"),
        };
        let filter = format!(
            "WHERE {whose} AND i.kind = $2 \
             AND ($3 IS NULL OR LOWER(i.name) LIKE LOWER($3) ESCAPE '\\') \
             AND ($4 IS NULL OR {} = $4) \
             AND ($5 IS NULL OR LOWER(i.tag) LIKE LOWER($5) ESCAPE '\\') \
             AND ($6 IS NULL OR i.tag = $6) \
             AND ($7 IS NULL OR LOWER(i.gender) = LOWER($7)) \
             AND ($8 IS NULL OR i.age >= $8) AND ($9 IS NULL OR i.age <= $9)",
            *STATUS_SQL
        );
        // Both statements take the filter's parameters, $1 to $9.
        macro_rules! filters {
            ($query:expr) => {
                $query
                    .bind(account_id)
                    .bind(kind.as_str())
                    .bind(name_like.as_deref())
                    .bind(q.status.as_deref())
                    .bind(tag_like.as_deref())
                    .bind(q.tag_exact.as_deref())
                    .bind(q.gender.as_deref())
                    .bind(q.age_min)
                    .bind(q.age_max)
            };
        }
        let count = format!("SELECT COUNT(*) {} {filter}", *IDENTITY_FROM);
        let total: i64 = filters!(sqlx::query_scalar(&count))
            .fetch_one(self.pool())
            .await?;
        let order = if q.ascending { "ASC" } else { "DESC" };
        let column = if q.by_name { "i.name" } else { "i.created_at" };
        let sql = identity_select(&format!(
            "{filter} ORDER BY {column} {order}, i.code {order} LIMIT $10 OFFSET $11"
        ));
        let rows = filters!(sqlx::query_as::<_, IdentityRow>(&sql))
            .bind(q.per_page)
            .bind((q.page - 1).max(0) * q.per_page)
            .fetch_all(self.pool())
            .await?;
        Ok((rows, total))
    }

    /// Starts replacing an identity's face (`POST /identity/{code}/pov`):
    /// admits the preprocessing job and makes it the identity's pending
    /// one, folding an earlier replacement that completed into the
    /// current face first. `None` when the identity is neither the
    /// caller's nor shared with one of its groups.
    pub async fn start_face_replacement(
        &self,
        account_id: &str,
        code: &str,
        job: NewJob<'_>,
    ) -> Result<Option<Admission>> {
        let mut tx = self.begin().await?;
        let admission = self.admit(&mut tx, &job).await?;
        let Admission::Created { job_id, .. } = &admission else {
            tx.rollback().await?;
            return Ok(Some(admission));
        };
        let r = sqlx::query(
            "UPDATE identities SET job_id = COALESCE((SELECT pj.id FROM jobs pj WHERE pj.id = identities.pending_job_id \
             AND pj.status = $5), job_id), pending_job_id = $3, updated_at = $4 \
             WHERE code = $1 AND (account_id = $2 OR EXISTS (SELECT 1 FROM identity_shares s \
             JOIN group_members m ON m.group_id = s.group_id \
             WHERE s.identity_code = identities.code AND m.account_id = $2))",
        )
        .bind(code)
        .bind(account_id)
        .bind(job_id)
        .bind(now_ms())
        .bind(JobStatus::Completed)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(admission))
    }

    /// Deletes an identity no unfinished job works with. The row is removed
    /// (its name and slot are free again); the returned object keys are the
    /// caller's to erase after the commit. Jobs keep their history.
    pub async fn delete_identity(
        &self,
        account_id: &str,
        kind: IdentityKind,
        code: &str,
    ) -> Result<DeleteIdentity> {
        let mut tx = self.begin().await?;
        // Locking the row makes a concurrent model-swap admission (which
        // locks it too) either finish first and be seen below, or find the
        // identity gone.
        let sql = format!(
            "SELECT code FROM identities WHERE code = $1 AND account_id = $2 AND kind = $3{}",
            self.for_update()
        );
        let found: Option<String> = sqlx::query_scalar(&sql)
            .bind(code)
            .bind(account_id)
            .bind(kind.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if found.is_none() {
            return Ok(DeleteIdentity::NotFound);
        }
        // A job works with it when it names it (model swap, flat-2-model,
        // its own preprocessing) or carries its face (Studio profiles).
        let sql = format!(
            "SELECT id FROM jobs WHERE status IN ({}) AND (identity_code = $1 \
             OR (account_id = $2 AND inputs LIKE $3 ESCAPE '\\')) ORDER BY created_at LIMIT 1",
            JobStatus::sql_in(&JobStatus::OPEN)
        );
        let busy: Option<String> = sqlx::query_scalar(&sql)
            .bind(code)
            .bind(account_id)
            .bind(format!("%\"profile_id\":\"{}\"%", super::like_escape(code)))
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(job_id) = busy {
            return Ok(DeleteIdentity::InUse { job_id });
        }
        let keys = identity_objects(&mut tx, code).await?;
        sqlx::query("DELETE FROM identities WHERE code = $1")
            .bind(code)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(DeleteIdentity::Deleted { keys })
    }
}

/// Every object an identity owns: its photo and, for each of its
/// preprocessing jobs (the first and every face replacement), the photos
/// it was given, the crop, the thumbnail, the embedding and the points of
/// view.
async fn identity_objects(tx: &mut super::Tx, code: &str) -> Result<Vec<String>> {
    use crate::domain::identity::{PhotoSource, PreprocessSpec};
    let mut keys: Vec<String> =
        sqlx::query_scalar::<_, Option<String>>("SELECT photo_key FROM identities WHERE code = $1")
            .bind(code)
            .fetch_optional(&mut **tx)
            .await?
            .flatten()
            .into_iter()
            .collect();
    let rows: Vec<(String, Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT j.spec, o.full_key, o.thumb_key, o.input_description FROM jobs j \
         LEFT JOIN outputs o ON o.job_id = j.id \
         WHERE j.identity_code = $1 AND j.job_type = 'identity_preprocessing'",
    )
    .bind(code)
    .fetch_all(&mut **tx)
    .await?;
    for (spec, full, thumb, description) in rows {
        if let Ok(spec) = serde_json::from_str::<PreprocessSpec>(&spec) {
            for p in spec.photos {
                if let PhotoSource::Object { key, .. } = p {
                    keys.push(key);
                }
            }
        }
        keys.extend(full);
        keys.extend(thumb);
        if let Some(r) = description.and_then(|d| serde_json::from_str::<FaceRecord>(&d).ok()) {
            keys.push(r.embedding_key);
            for p in r.povs {
                keys.push(p.key);
                keys.push(p.thumb_key);
            }
        }
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// Identities of one kind an account has (the slot count), on the pool or
/// inside a transaction.
async fn count_identities<'e, E>(e: E, account_id: &str, kind: IdentityKind) -> Result<i64>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM identities WHERE account_id = $1 AND kind = $2")
            .bind(account_id)
            .bind(kind.as_str())
            .fetch_one(e)
            .await?,
    )
}
