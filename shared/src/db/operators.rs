//! What operators read through `atelier admin`: every account, every key of
//! an account (never a secret), a job's ledger rows.

use super::accounts::{ACCOUNT_COLUMNS, Account};
use super::{Result, Store};

/// One API key as operators see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// One row of the credit ledger.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LedgerRow {
    pub id: i64,
    pub account_id: String,
    pub output_id: Option<i64>,
    pub kind: String,
    pub amount: i64,
    pub reason: Option<String>,
    pub created_at: i64,
}

impl Store {
    /// Accounts, oldest first, `limit` from `offset`.
    pub async fn accounts_page(&self, limit: i64, offset: i64) -> Result<Vec<Account>> {
        Ok(sqlx::query_as::<_, Account>(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY created_at, id LIMIT $1 OFFSET $2"
        ))
        .bind(limit)
        .bind(offset)
        .fetch_all(self.pool())
        .await?)
    }

    /// Every key of an account, revoked and expired ones included, newest
    /// first.
    pub async fn keys_of(&self, account_id: &str) -> Result<Vec<KeyRecord>> {
        Ok(sqlx::query_as::<_, KeyRecord>(
            "SELECT id, name, created_at, expires_at, revoked_at FROM api_keys \
             WHERE account_id = $1 ORDER BY created_at DESC, id DESC",
        )
        .bind(account_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// The ledger rows of a job (its reservation and each output's charge
    /// or release), in order.
    pub async fn job_ledger(&self, job_id: &str) -> Result<Vec<LedgerRow>> {
        Ok(sqlx::query_as::<_, LedgerRow>(
            "SELECT id, account_id, output_id, kind, amount, reason, created_at FROM credit_ledger \
             WHERE job_id = $1 ORDER BY id",
        )
        .bind(job_id)
        .fetch_all(self.pool())
        .await?)
    }
}

/// What the operator view shows of one work queue's recent past.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Finished {
    pub completed: i64,
    pub failed: i64,
}

impl Store {
    /// Outputs of `queue` that ended (completed, failed) at `since` or later.
    pub async fn finished_since(
        &self,
        queue: crate::domain::WorkQueue,
        since: i64,
    ) -> Result<Finished> {
        use crate::domain::OutputStatus;
        let rows: Vec<(OutputStatus, i64)> = sqlx::query_as(
            "SELECT status, COUNT(*) FROM outputs \
             WHERE queue = $1 AND finalized_at IS NOT NULL AND finalized_at >= $2 GROUP BY status",
        )
        .bind(queue)
        .bind(since)
        .fetch_all(self.pool())
        .await?;
        let of = |s: OutputStatus| rows.iter().find(|(st, _)| *st == s).map_or(0, |(_, n)| *n);
        Ok(Finished {
            completed: of(OutputStatus::Completed),
            failed: of(OutputStatus::Failed),
        })
    }

    /// The accounts holding the most reserved credits, at most `limit`.
    pub async fn accounts_by_reserved(&self, limit: i64) -> Result<Vec<Account>> {
        Ok(sqlx::query_as::<_, Account>(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE reserved > 0 \
             ORDER BY reserved DESC, id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// How many accounts there are.
    pub async fn account_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM accounts")
            .fetch_one(self.pool())
            .await?)
    }
}
