//! `Idempotency-Key`: the first successful answer to a keyed request, kept
//! per account so that a retry (from any API replica) gets that answer
//! instead of doing the work again.
//!
//! A key is claimed before the request runs (a row without a status), then
//! completed with the answer or released when the request failed. Two
//! requests with one key therefore never run at once: the second sees the
//! claim and waits for the answer.

use super::{Result, Store};
use sqlx::Row;

/// What a request carrying a key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is this request's: run it, then `complete` or `release`.
    Claimed { owner: String },
    /// A request with this key already answered: replay its answer.
    Replay(StoredAnswer),
    /// A request with this key and the same fingerprint is running.
    Running,
    /// The key was used for another request (another body or route).
    Mismatch,
}

/// A kept answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

impl Store {
    /// Claims `key` for a request with `fingerprint`. A kept answer older
    /// than `expired_before` (ms) counts as absent, and so does a claim
    /// older than `stale_before` whose request never finished (its process
    /// died).
    pub async fn claim_idempotency_key(
        &self,
        account_id: &str,
        key: &str,
        fingerprint: &str,
        now: i64,
        expired_before: i64,
        stale_before: i64,
    ) -> Result<Claim> {
        let owner = ulid::Ulid::new().to_string();
        let won = sqlx::query(
            "INSERT INTO idempotency_keys (account_id, idem_key, fingerprint, owner, created_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (account_id, idem_key) DO UPDATE SET fingerprint = excluded.fingerprint, \
               owner = excluded.owner, created_at = excluded.created_at, status = NULL, \
               content_type = NULL, body = NULL \
             WHERE idempotency_keys.created_at < $6 \
                OR (idempotency_keys.status IS NULL AND idempotency_keys.created_at < $7) \
             RETURNING owner",
        )
        .bind(account_id)
        .bind(key)
        .bind(fingerprint)
        .bind(&owner)
        .bind(now)
        .bind(expired_before)
        .bind(stale_before)
        .fetch_optional(self.pool())
        .await?;
        if won.is_some() {
            return Ok(Claim::Claimed { owner });
        }
        let row = sqlx::query(
            "SELECT fingerprint, status, content_type, body FROM idempotency_keys \
             WHERE account_id = $1 AND idem_key = $2",
        )
        .bind(account_id)
        .bind(key)
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            // Released between the insert and this read: the caller asks again.
            return Ok(Claim::Running);
        };
        if row.try_get::<String, _>("fingerprint")? != fingerprint {
            return Ok(Claim::Mismatch);
        }
        let status: Option<i64> = row.try_get("status")?;
        Ok(match status {
            None => Claim::Running,
            Some(status) => Claim::Replay(StoredAnswer {
                status: u16::try_from(status).unwrap_or(500),
                content_type: row.try_get("content_type")?,
                body: row
                    .try_get::<Option<String>, _>("body")?
                    .unwrap_or_default(),
            }),
        })
    }

    /// Keeps the answer of the request that claimed the key. False when the
    /// claim was lost (it went stale and another request took the key).
    pub async fn complete_idempotency_key(
        &self,
        account_id: &str,
        key: &str,
        owner: &str,
        answer: &StoredAnswer,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE idempotency_keys SET status = $4, content_type = $5, body = $6 \
             WHERE account_id = $1 AND idem_key = $2 AND owner = $3 AND status IS NULL",
        )
        .bind(account_id)
        .bind(key)
        .bind(owner)
        .bind(i64::from(answer.status))
        .bind(answer.content_type.as_deref())
        .bind(&answer.body)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives the key up: its request failed or was cancelled, so a retry
    /// runs again.
    pub async fn release_idempotency_key(
        &self,
        account_id: &str,
        key: &str,
        owner: &str,
    ) -> Result<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys \
             WHERE account_id = $1 AND idem_key = $2 AND owner = $3 AND status IS NULL",
        )
        .bind(account_id)
        .bind(key)
        .bind(owner)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Forgets keys created before `before_ms`.
    pub async fn prune_idempotency_keys(&self, before_ms: i64) -> Result<u64> {
        let r = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(before_ms)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected())
    }
}
