//! Accounts, API keys, groups and credit grants.

use super::{Result, Store, StoreError, Tx};
use crate::domain::Plan;
use crate::domain::credits::{Balance, Credits};
use crate::time::now_ms;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct Account {
    pub id: String,
    pub name: String,
    pub plan: Plan,
    pub max_size: String,
    pub custom_dimensions: i64,
    pub is_operator: i64,
    pub balance: i64,
    pub reserved: i64,
    pub active_jobs: i64,
    pub created_at: i64,
    /// The account its jobs are charged to (itself, or the owner of a
    /// group with shared billing), read with the account only by
    /// [`Store::account_for_token`]; `None` when not read
    /// ([`Store::billing_owner`] answers it).
    #[sqlx(default)]
    pub billing_account_id: Option<String>,
}

impl Account {
    pub fn is_enterprise(&self) -> bool {
        self.plan == Plan::Enterprise
    }

    pub fn credits(&self) -> Balance {
        Balance {
            balance: Credits(self.balance),
            reserved: Credits(self.reserved),
        }
    }
}

pub(crate) const ACCOUNT_COLUMNS: &str = "id, name, plan, max_size, custom_dimensions, is_operator, balance, reserved, active_jobs, created_at";

/// The groups with shared billing `member` (an SQL expression) belongs
/// to, first the oldest: the first one's owner is the account its jobs are
/// charged to.
fn billing_groups(member: &str) -> String {
    format!(
        "FROM group_members m JOIN groups g ON g.id = m.group_id \
         WHERE m.account_id = {member} AND g.shared_billing = 1 ORDER BY g.created_at, g.id LIMIT 1"
    )
}

/// Hash under which a token is stored; tokens carry 256 random bits, so a
/// fast hash is enough (no offline guessing is feasible).
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh API token: `atl_` + 43 URL-safe characters (256 random bits).
pub fn generate_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    format!(
        "atl_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

#[derive(Debug, Clone)]
pub struct NewAccount<'a> {
    pub name: &'a str,
    pub plan: Plan,
    pub max_size: &'a str,
    pub custom_dimensions: bool,
    pub is_operator: bool,
}

impl Store {
    pub async fn create_account(&self, a: NewAccount<'_>) -> Result<Account> {
        let id = crate::domain::AccountId::generate().0;
        let sql = format!(
            "INSERT INTO accounts (id, name, plan, max_size, custom_dimensions, is_operator, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {ACCOUNT_COLUMNS}"
        );
        Ok(sqlx::query_as::<_, Account>(&sql)
            .bind(&id)
            .bind(a.name)
            .bind(a.plan)
            .bind(a.max_size)
            .bind(i64::from(a.custom_dimensions))
            .bind(i64::from(a.is_operator))
            .bind(now_ms())
            .fetch_one(self.pool())
            .await?)
    }

    pub async fn account(&self, id: &str) -> Result<Option<Account>> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1");
        Ok(sqlx::query_as::<_, Account>(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn account_by_name(&self, name: &str) -> Result<Option<Account>> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = $1");
        Ok(sqlx::query_as::<_, Account>(&sql)
            .bind(name)
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn count_accounts(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM accounts")
                .fetch_one(self.pool())
                .await?,
        )
    }

    pub async fn set_account_policy(
        &self,
        id: &str,
        plan: Option<Plan>,
        max_size: Option<&str>,
        custom_dimensions: Option<bool>,
    ) -> Result<Account> {
        let sql = format!(
            "UPDATE accounts SET plan = COALESCE($2, plan), max_size = COALESCE($3, max_size), \
             custom_dimensions = COALESCE($4, custom_dimensions) WHERE id = $1 RETURNING {ACCOUNT_COLUMNS}"
        );
        sqlx::query_as::<_, Account>(&sql)
            .bind(id)
            .bind(plan)
            .bind(max_size)
            .bind(custom_dimensions.map(i64::from))
            .fetch_optional(self.pool())
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// Issues a key for `account_id`; returns `(key id, token)`. The token is
    /// shown once: only its hash is stored.
    pub async fn create_api_key(
        &self,
        account_id: &str,
        name: &str,
        token: Option<&str>,
        expires_at: Option<i64>,
    ) -> Result<(String, String)> {
        let token = token.map(String::from).unwrap_or_else(generate_token);
        let id = crate::domain::ids::base32_lower(16);
        sqlx::query(
            "INSERT INTO api_keys (id, account_id, key_hash, name, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(account_id)
        .bind(hash_token(&token))
        .bind(name)
        .bind(now_ms())
        .bind(expires_at)
        .execute(self.pool())
        .await?;
        Ok((id, token))
    }

    /// Locks the account's row until `tx` ends (PostgreSQL; SQLite
    /// serialises writers anyway): the checks a caller makes after it
    /// (caps, counts) cannot be passed twice by concurrent requests.
    pub(crate) async fn lock_account(&self, tx: &mut Tx, account_id: &str) -> Result<()> {
        let sql = format!("SELECT id FROM accounts WHERE id = $1{}", self.for_update());
        let _: Option<String> = sqlx::query_scalar(&sql)
            .bind(account_id)
            .fetch_optional(&mut **tx)
            .await?;
        Ok(())
    }

    /// Mints a key for `account_id` expiring at `expires_at`, unless the
    /// account already holds `cap` live keys (`None`). One transaction with
    /// the account locked, so concurrent mints cannot pass the cap.
    pub async fn mint_api_key(
        &self,
        account_id: &str,
        expires_at: i64,
        cap: i64,
    ) -> Result<Option<(String, String)>> {
        let mut tx = self.begin().await?;
        self.lock_account(&mut tx, account_id).await?;
        let now = now_ms();
        let live: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys WHERE account_id = $1 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(account_id)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        if live >= cap {
            return Ok(None);
        }
        let token = generate_token();
        let id = crate::domain::ids::base32_lower(16);
        sqlx::query(
            "INSERT INTO api_keys (id, account_id, key_hash, name, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(account_id)
        .bind(hash_token(&token))
        .bind("api")
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some((id, token)))
    }

    /// A page of the account's unrevoked keys, newest first, as
    /// `(id, expires_at)`, and how many there are.
    pub async fn list_api_keys(
        &self,
        account_id: &str,
        include_expired: bool,
        page: i64,
        per_page: i64,
    ) -> Result<(Vec<(String, Option<i64>)>, i64)> {
        let filter = if include_expired {
            "account_id = $1 AND revoked_at IS NULL AND $2 = $2"
        } else {
            "account_id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)"
        };
        let now = now_ms();
        let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM api_keys WHERE {filter}"))
            .bind(account_id)
            .bind(now)
            .fetch_one(self.pool())
            .await?;
        let rows = sqlx::query_as(&format!(
            "SELECT id, expires_at FROM api_keys WHERE {filter} ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4"
        ))
        .bind(account_id)
        .bind(now)
        .bind(per_page)
        .bind((page - 1) * per_page)
        .fetch_all(self.pool())
        .await?;
        Ok((rows, total))
    }

    /// The account a live (not revoked, not expired) token belongs to.
    pub async fn account_for_token(&self, token: &str) -> Result<Option<Account>> {
        let cols = ACCOUNT_COLUMNS
            .split(", ")
            .map(|c| format!("a.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        // The billing owner comes with the account, so a request that
        // creates a job needs no second read for it.
        let sql = format!(
            "SELECT {cols}, (SELECT g.owner_account_id {}) AS billing_account_id \
             FROM api_keys k JOIN accounts a ON a.id = k.account_id \
             WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > $2)",
            billing_groups("a.id")
        );
        let account = sqlx::query_as::<_, Account>(&sql)
            .bind(hash_token(token))
            .bind(now_ms())
            .fetch_optional(self.pool())
            .await?;
        Ok(account.map(|mut a| {
            if a.billing_account_id.is_none() {
                a.billing_account_id = Some(a.id.clone());
            }
            a
        }))
    }

    pub async fn revoke_api_key(&self, account_id: &str, key_id: &str) -> Result<bool> {
        let r = sqlx::query("UPDATE api_keys SET revoked_at = $3 WHERE id = $1 AND account_id = $2 AND revoked_at IS NULL")
            .bind(key_id)
            .bind(account_id)
            .bind(now_ms())
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Adds (or, negative, removes) credits with a ledger entry. Refused with
    /// `Ok(None)` when the result would fall below what is reserved.
    pub async fn grant_credits(
        &self,
        account_id: &str,
        amount: Credits,
        reason: &str,
    ) -> Result<Option<Account>> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "UPDATE accounts SET balance = balance + $2 WHERE id = $1 AND balance + $2 >= reserved RETURNING {ACCOUNT_COLUMNS}"
        );
        let acc = sqlx::query_as::<_, Account>(&sql)
            .bind(account_id)
            .bind(amount.0)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(acc) = acc else {
            tx.rollback().await?;
            return Ok(None);
        };
        ledger(
            &mut tx,
            account_id,
            None,
            None,
            "grant",
            amount,
            Some(reason),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(acc))
    }

    pub async fn create_group(
        &self,
        name: &str,
        owner_account_id: &str,
        shared_billing: bool,
    ) -> Result<String> {
        let id = format!("grp_{}", ulid::Ulid::new());
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO groups (id, name, owner_account_id, shared_billing, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&id)
            .bind(name)
            .bind(owner_account_id)
            .bind(i64::from(shared_billing))
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        add_member(&mut tx, &id, owner_account_id).await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn add_group_member(&self, group_name: &str, account_id: &str) -> Result<()> {
        let gid: Option<String> = sqlx::query_scalar("SELECT id FROM groups WHERE name = $1")
            .bind(group_name)
            .fetch_optional(self.pool())
            .await?;
        let gid = gid.ok_or(StoreError::NotFound)?;
        let mut tx = self.begin().await?;
        add_member(&mut tx, &gid, account_id).await?;
        tx.commit().await?;
        Ok(())
    }

    /// `(id, name)` of the groups an account belongs to.
    pub async fn account_group_refs(&self, account_id: &str) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT g.id, g.name FROM group_members m JOIN groups g ON g.id = m.group_id WHERE m.account_id = $1 ORDER BY g.name",
        )
        .bind(account_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Names of the groups an account belongs to.
    pub async fn account_groups(&self, account_id: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT g.name FROM group_members m JOIN groups g ON g.id = m.group_id WHERE m.account_id = $1 ORDER BY g.name",
        )
        .bind(account_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Whose credits an account spends: the owner of its first group with
    /// shared billing, else itself. Returns `(billing account id, group name)`.
    pub async fn billing_owner(&self, account_id: &str) -> Result<(String, Option<String>)> {
        let sql = format!("SELECT g.owner_account_id, g.name {}", billing_groups("$1"));
        let row: Option<(String, String)> = sqlx::query_as(&sql)
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?;
        Ok(match row {
            Some((owner, name)) if owner != account_id => (owner, Some(name)),
            _ => (account_id.to_string(), None),
        })
    }

    /// Sum of every ledger movement of an account by kind, for audits and tests.
    /// Charges `amount` at once for work done inside the request (no job:
    /// a text extraction): recorded as a reservation charged in full, so
    /// the ledger's sums hold. `false` (nothing written) when the
    /// available balance is short.
    pub async fn charge_now(&self, account_id: &str, amount: Credits, reason: &str) -> Result<bool> {
        let mut tx = self.begin().await?;
        let r = sqlx::query(
            "UPDATE accounts SET balance = balance - $2 WHERE id = $1 AND balance - reserved >= $2",
        )
        .bind(account_id)
        .bind(amount.0)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        for kind in ["reserve", "charge"] {
            ledger(&mut tx, account_id, None, None, kind, amount, Some(reason)).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The charges of `account_id`'s work in `[from, to)`: `(when,
    /// amount, job type, job id)` each; the job type is `None` for work done
    /// inside a request (extractions), charged to the billing account.
    /// Free work (a face replacement, tagging an upload) charged nothing
    /// and is not listed.
    pub async fn charges_between(
        &self,
        account_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, i64, Option<String>, Option<String>)>> {
        Ok(sqlx::query_as(
            "SELECT l.created_at, l.amount, j.job_type, l.job_id FROM credit_ledger l LEFT JOIN jobs j ON j.id = l.job_id \
             WHERE l.kind = 'charge' AND l.amount <> 0 AND l.created_at >= $2 AND l.created_at < $3 \
             AND (j.account_id = $1 OR (l.job_id IS NULL AND l.account_id = $1)) ORDER BY l.created_at",
        )
        .bind(account_id)
        .bind(from)
        .bind(to)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn ledger_totals(&self, account_id: &str) -> Result<LedgerTotals> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT kind, CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM credit_ledger WHERE account_id = $1 GROUP BY kind",
        )
        .bind(account_id)
        .fetch_all(self.pool())
        .await?;
        let mut t = LedgerTotals::default();
        for (k, v) in rows {
            match k.as_str() {
                "grant" => t.granted = v,
                "reserve" => t.reserved = v,
                "charge" => t.charged = v,
                "release" => t.released = v,
                _ => {}
            }
        }
        Ok(t)
    }
}

/// Ledger sums in milli-credits. For a consistent account:
/// `balance = granted − charged` and `reserved = reserved − charged − released`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerTotals {
    pub granted: i64,
    pub reserved: i64,
    pub charged: i64,
    pub released: i64,
}

async fn add_member(tx: &mut Tx, group_id: &str, account_id: &str) -> Result<()> {
    sqlx::query("INSERT INTO group_members (group_id, account_id, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
        .bind(group_id)
        .bind(account_id)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Appends one ledger row. The unique index on `(output_id, kind)` makes a
/// second charge or release of the same output fail instead of double-counting.
pub(crate) async fn ledger(
    tx: &mut Tx,
    account_id: &str,
    job_id: Option<&str>,
    output_id: Option<i64>,
    kind: &str,
    amount: Credits,
    reason: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO credit_ledger (account_id, job_id, output_id, kind, amount, reason, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(account_id)
    .bind(job_id)
    .bind(output_id)
    .bind(kind)
    .bind(amount.0)
    .bind(reason)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
