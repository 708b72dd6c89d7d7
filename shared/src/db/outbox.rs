//! Transactional outbox: rows written with a state change and published to
//! the queue by the relay (scheduler role) after commit. Publishing is
//! at-least-once; consumers are idempotent.

use super::{Result, Store, Tx, id_list, to_json};
use crate::time::now_ms;

#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub topic: String,
    pub payload: String,
}

pub(crate) async fn enqueue_outbox(
    tx: &mut Tx,
    topic: &str,
    payload: &serde_json::Value,
) -> Result<()> {
    sqlx::query("INSERT INTO outbox (topic, payload, created_at) VALUES ($1, $2, $3)")
        .bind(topic)
        .bind(to_json(payload)?)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl Store {
    /// Claims up to `limit` unsent rows for `lease_ms`, oldest first, in one
    /// statement. Rows claimed by a relay that died become claimable again
    /// when the lease ends; concurrent relays skip each other's rows.
    pub async fn claim_outbox(&self, limit: i64, lease_ms: i64) -> Result<Vec<OutboxRow>> {
        let now = now_ms();
        let sql = format!(
            "UPDATE outbox SET claimed_until = $2, attempts = attempts + 1 WHERE id IN ( \
               SELECT id FROM outbox WHERE sent_at IS NULL AND (claimed_until IS NULL OR claimed_until < $1) \
               ORDER BY id LIMIT $3{}) RETURNING id, topic, payload",
            self.skip_locked()
        );
        let mut rows: Vec<(i64, String, String)> = sqlx::query_as(&sql)
            .bind(now)
            .bind(now + lease_ms)
            .bind(limit)
            .fetch_all(self.pool())
            .await?;
        rows.sort_unstable_by_key(|r| r.0);
        Ok(rows
            .into_iter()
            .map(|(id, topic, payload)| OutboxRow { id, topic, payload })
            .collect())
    }

    /// Done with published rows, in one statement: they are deleted
    /// (nothing reads a sent row again; PostgreSQL's migration 0023 says
    /// why they are no longer kept, marked).
    pub async fn mark_outbox_sent(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(&format!(
            "DELETE FROM outbox WHERE id IN ({})",
            id_list(ids)
        ))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Gives a claimed row back after a failed publish, keeping the error.
    pub async fn release_outbox(&self, id: i64, error: &str) -> Result<()> {
        sqlx::query("UPDATE outbox SET claimed_until = NULL, last_error = $2 WHERE id = $1")
            .bind(id)
            .bind(error)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Deletes the rows a relay of the previous version marked sent (it
    /// set `sent_at` instead of deleting them) during a rolling upgrade;
    /// how many. A scan of the table, which holds only unsent rows.
    pub async fn delete_marked_outbox(&self) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM outbox WHERE sent_at IS NOT NULL")
            .execute(self.pool())
            .await?
            .rows_affected())
    }

    /// Age in ms of the oldest unsent row (0 when none): the relay's lag.
    pub async fn outbox_lag_ms(&self) -> Result<i64> {
        let oldest: Option<i64> =
            sqlx::query_scalar("SELECT MIN(created_at) FROM outbox WHERE sent_at IS NULL")
                .fetch_one(self.pool())
                .await?;
        Ok(oldest.map(|t| (now_ms() - t).max(0)).unwrap_or(0))
    }

    /// Credits (milli-credits) held in reservations now, and charged and
    /// released since the beginning, for the operators' gauges.
    pub async fn credit_totals(&self) -> Result<CreditTotals> {
        let reserved: Option<i64> =
            sqlx::query_scalar("SELECT CAST(SUM(reserved) AS BIGINT) FROM accounts")
                .fetch_one(self.pool())
                .await?;
        let (charged, released): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT CAST(SUM(CASE WHEN kind = 'charge' THEN amount ELSE 0 END) AS BIGINT), \
             CAST(SUM(CASE WHEN kind = 'release' THEN amount ELSE 0 END) AS BIGINT) FROM credit_ledger",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(CreditTotals {
            reserved: reserved.unwrap_or(0),
            charged: charged.unwrap_or(0),
            released: released.unwrap_or(0),
        })
    }
}

/// See [`Store::credit_totals`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditTotals {
    pub reserved: i64,
    pub charged: i64,
    pub released: i64,
}
