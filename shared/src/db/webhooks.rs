//! Webhooks (contract §4.5–4.9): one per account, and the deliveries owed to
//! it. A delivery row is queued in the transaction that relays its
//! notification (or saves/tests the webhook, for `ping`), then claimed with a
//! lease by a scheduler, attempted, and recorded: delivered, or retried on
//! the schedule until it gives up.

use super::{Result, Store, Tx};
use crate::time::now_ms;

#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub id: i64,
    pub account_id: String,
    pub url: String,
    pub is_active: bool,
    pub consecutive_failures: i64,
    pub last_response_status: Option<i64>,
    pub last_response_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

type WebhookRow = (
    i64,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    i64,
    i64,
);

const WEBHOOK_COLUMNS: &str = "id, account_id, url, is_active, consecutive_failures, \
     last_response_status, last_response_at, created_at, updated_at";

fn webhook(r: WebhookRow) -> Webhook {
    Webhook {
        id: r.0,
        account_id: r.1,
        url: r.2,
        is_active: r.3 == 1,
        consecutive_failures: r.4,
        last_response_status: r.5,
        last_response_at: r.6,
        created_at: r.7,
        updated_at: r.8,
    }
}

/// A delivery as its account sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub id: i64,
    pub notification_id: i64,
    pub job_id: Option<String>,
    pub event: String,
    pub delivery_uuid: String,
    /// `pending`, `delivered`, `failed` (gave up) or `cancelled` (webhook
    /// removed or deactivated before it went out).
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: Option<i64>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

/// A claimed delivery with what sending it needs.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub id: i64,
    pub account_id: String,
    pub event: String,
    pub delivery_uuid: String,
    pub body: String,
    /// Attempt number this claim is (1-based).
    pub attempt: i64,
    pub url: String,
    pub secret: String,
}

/// What `POST /webhooks/test` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestPing {
    Queued,
    NoWebhook,
    /// Deactivated after repeated failures; saving it again reactivates it.
    Inactive,
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    /// A 2xx answer.
    Delivered { status: i64 },
    /// Any other answer, a timeout or a refused connection.
    Failed { status: Option<i64>, error: String },
}

/// What recording an attempt decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptVerdict {
    Delivered,
    /// Will be tried again at this time (epoch ms).
    RetryAt(i64),
    GaveUp,
    /// The delivery was no longer pending (cancelled meanwhile).
    Stale,
}

/// Queues a delivery of `body` if `account_id` has an active webhook.
pub(crate) async fn queue_delivery(
    tx: &mut Tx,
    account_id: &str,
    notification_id: i64,
    job_id: Option<&str>,
    event: &str,
    body: &str,
    now: i64,
) -> Result<bool> {
    let r = sqlx::query(
        "INSERT INTO webhook_deliveries (account_id, notification_id, job_id, event, delivery_uuid, body, \
           status, attempts, next_attempt_at, created_at, updated_at) \
         SELECT account_id, $2, $3, $4, $5, $6, 'pending', 0, $7, $7, $7 FROM webhooks \
         WHERE account_id = $1 AND is_active = 1",
    )
    .bind(account_id)
    .bind(notification_id)
    .bind(job_id)
    .bind(event)
    .bind(uuid::Uuid::new_v4().to_string())
    .bind(body)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Queues a `ping` (webhook channel only: stored deleted and relayed so no
/// stream or poll ever shows it, but with an id of the notification space).
async fn queue_ping(tx: &mut Tx, account_id: &str, now: i64) -> Result<()> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO notifications (account_id, name, job_id, data, created_at, deleted_at, relayed_at) \
         VALUES ($1, 'ping', NULL, '{}', $2, $2, $2) RETURNING id",
    )
    .bind(account_id)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    let body = serde_json::json!({
        "id": id,
        "name": "ping",
        "data": {},
        "timestamp": now as f64 / 1000.0,
        "created_at": crate::time::iso8601(now),
    })
    .to_string();
    queue_delivery(tx, account_id, id, None, "ping", &body, now).await?;
    Ok(())
}

impl Store {
    /// Creates or replaces the account's webhook with a new URL and secret,
    /// reactivates it, and queues a `ping` to it.
    pub async fn put_webhook(&self, account_id: &str, url: &str, secret: &str) -> Result<Webhook> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let sql = format!(
            "INSERT INTO webhooks (account_id, url, secret, is_active, consecutive_failures, created_at, updated_at) \
             VALUES ($1, $2, $3, 1, 0, $4, $4) \
             ON CONFLICT (account_id) DO UPDATE SET url = excluded.url, secret = excluded.secret, \
               is_active = 1, consecutive_failures = 0, updated_at = excluded.updated_at \
             RETURNING {WEBHOOK_COLUMNS}"
        );
        let row: WebhookRow = sqlx::query_as(&sql)
            .bind(account_id)
            .bind(url)
            .bind(secret)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
        queue_ping(&mut tx, account_id, now).await?;
        tx.commit().await?;
        Ok(webhook(row))
    }

    pub async fn webhook(&self, account_id: &str) -> Result<Option<Webhook>> {
        let sql = format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE account_id = $1");
        let row: Option<WebhookRow> = sqlx::query_as(&sql)
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(webhook))
    }

    /// Removes the webhook and cancels what was still owed to it.
    pub async fn delete_webhook(&self, account_id: &str) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let r = sqlx::query("DELETE FROM webhooks WHERE account_id = $1")
            .bind(account_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE webhook_deliveries SET status = 'cancelled', last_error = 'webhook removed', \
             finished_at = $2, updated_at = $2 WHERE account_id = $1 AND status = 'pending'",
        )
        .bind(account_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    /// Queues a test `ping` when the account has an active webhook.
    pub async fn test_webhook(&self, account_id: &str) -> Result<TestPing> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let active: Option<i64> =
            sqlx::query_scalar("SELECT is_active FROM webhooks WHERE account_id = $1")
                .bind(account_id)
                .fetch_optional(&mut *tx)
                .await?;
        let outcome = match active {
            None => TestPing::NoWebhook,
            Some(0) => TestPing::Inactive,
            Some(_) => {
                queue_ping(&mut tx, account_id, now).await?;
                TestPing::Queued
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// Claims up to `limit` due deliveries for `lease_ms`. A delivery waits
    /// while an older one of the same job is still pending, so a job's
    /// events arrive in order when the receiver is healthy. Deliveries whose
    /// webhook is gone or inactive are cancelled here.
    pub async fn claim_deliveries(&self, limit: i64, lease_ms: i64) -> Result<Vec<DueDelivery>> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let sql = format!(
            "SELECT d.id FROM webhook_deliveries d WHERE d.status = 'pending' AND d.next_attempt_at <= $1 \
               AND (d.claimed_until IS NULL OR d.claimed_until < $1) \
               AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.account_id = d.account_id \
                 AND p.job_id = d.job_id AND p.status = 'pending' AND p.id < d.id) \
             ORDER BY d.next_attempt_at, d.id LIMIT $2{}",
            self.skip_locked()
        );
        let ids: Vec<i64> = sqlx::query_scalar(&sql)
            .bind(now)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        let mut due = Vec::with_capacity(ids.len());
        for id in ids {
            let row: Option<(i64, String, String, String, String, i64)> = sqlx::query_as(
                "UPDATE webhook_deliveries SET claimed_until = $2, attempts = attempts + 1, updated_at = $3 \
                 WHERE id = $1 AND status = 'pending' AND (claimed_until IS NULL OR claimed_until < $3) \
                 RETURNING id, account_id, event, delivery_uuid, body, attempts",
            )
            .bind(id)
            .bind(now + lease_ms)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((id, account_id, event, delivery_uuid, body, attempt)) = row else {
                continue;
            };
            let hook: Option<(String, String, i64)> =
                sqlx::query_as("SELECT url, secret, is_active FROM webhooks WHERE account_id = $1")
                    .bind(&account_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            match hook {
                Some((url, secret, 1)) => due.push(DueDelivery {
                    id,
                    account_id,
                    event,
                    delivery_uuid,
                    body,
                    attempt,
                    url,
                    secret,
                }),
                other => {
                    let why = if other.is_some() {
                        "webhook deactivated after repeated failed deliveries"
                    } else {
                        "webhook removed"
                    };
                    sqlx::query(
                        "UPDATE webhook_deliveries SET status = 'cancelled', attempts = attempts - 1, \
                         last_error = $2, claimed_until = NULL, finished_at = $3 WHERE id = $1",
                    )
                    .bind(id)
                    .bind(why)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(due)
    }

    /// Records one attempt of a claimed delivery (once: a second report of
    /// the same claim, or one whose claim was taken over, is `Stale`). `retry_delays_ms[n]` is the
    /// wait after the n-th failed attempt; after the last one it gives up.
    /// The webhook's `last_response_*` follow every attempt; it is
    /// deactivated after `disable_after` consecutive deliveries that gave up.
    pub async fn record_attempt(
        &self,
        d: &DueDelivery,
        result: &AttemptResult,
        retry_delays_ms: &[u64],
        disable_after: i64,
    ) -> Result<AttemptVerdict> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let (status, error) = match result {
            AttemptResult::Delivered { status } => (Some(*status), None),
            AttemptResult::Failed { status, error } => (*status, Some(error.as_str())),
        };
        let verdict = match result {
            AttemptResult::Delivered { .. } => AttemptVerdict::Delivered,
            AttemptResult::Failed { .. } => {
                match usize::try_from(d.attempt - 1)
                    .ok()
                    .and_then(|i| retry_delays_ms.get(i))
                {
                    Some(wait) => {
                        AttemptVerdict::RetryAt(now + i64::try_from(*wait).unwrap_or(i64::MAX / 4))
                    }
                    None => AttemptVerdict::GaveUp,
                }
            }
        };
        let (new_status, next_at, finished) = match verdict {
            AttemptVerdict::Delivered => ("delivered", now, Some(now)),
            AttemptVerdict::RetryAt(t) => ("pending", t, None),
            _ => ("failed", now, Some(now)),
        };
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET status = $2, next_attempt_at = $3, claimed_until = NULL, \
             last_status = $4, last_error = $5, finished_at = $6, updated_at = $7 \
             WHERE id = $1 AND status = 'pending' AND attempts = $8 AND claimed_until IS NOT NULL",
        )
        .bind(d.id)
        .bind(new_status)
        .bind(next_at)
        .bind(status)
        .bind(error)
        .bind(finished)
        .bind(now)
        .bind(d.attempt)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(AttemptVerdict::Stale);
        }
        // A delivery that gave up is one failed delivery; retries in
        // between do not count (a receiver down for a minute under load
        // must not cost the webhook).
        let delivered = verdict == AttemptVerdict::Delivered;
        let gave_up = verdict == AttemptVerdict::GaveUp;
        sqlx::query(
            "UPDATE webhooks SET last_response_status = $2, last_response_at = $3, \
               consecutive_failures = CASE WHEN $4 = 1 THEN 0 WHEN $6 = 1 THEN consecutive_failures + 1 \
                 ELSE consecutive_failures END, \
               is_active = CASE WHEN $6 = 1 AND consecutive_failures + 1 >= $5 THEN 0 ELSE is_active END \
             WHERE account_id = $1",
        )
        .bind(&d.account_id)
        .bind(status)
        .bind(now)
        .bind(i64::from(delivered))
        .bind(disable_after)
        .bind(i64::from(gave_up))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(verdict)
    }

    /// The account's deliveries, newest first, `(page, per_page)` 1-based.
    pub async fn deliveries(
        &self,
        account_id: &str,
        page: i64,
        per_page: i64,
    ) -> Result<(Vec<Delivery>, i64)> {
        type Row = (
            i64,
            i64,
            Option<String>,
            String,
            String,
            String,
            i64,
            i64,
            Option<i64>,
            Option<String>,
            i64,
            Option<i64>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, notification_id, job_id, event, delivery_uuid, status, attempts, next_attempt_at, \
               last_status, last_error, created_at, finished_at FROM webhook_deliveries \
             WHERE account_id = $1 ORDER BY id DESC LIMIT $2 OFFSET $3",
        )
        .bind(account_id)
        .bind(per_page)
        .bind((page - 1) * per_page)
        .fetch_all(self.pool())
        .await?;
        let total: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE account_id = $1")
                .bind(account_id)
                .fetch_one(self.pool())
                .await?;
        let list = rows
            .into_iter()
            .map(|r| Delivery {
                id: r.0,
                notification_id: r.1,
                job_id: r.2,
                event: r.3,
                delivery_uuid: r.4,
                next_attempt_at: (r.5 == "pending").then_some(r.7),
                status: r.5,
                attempts: r.6,
                last_status: r.8,
                last_error: r.9,
                created_at: r.10,
                finished_at: r.11,
            })
            .collect();
        Ok((list, total))
    }

    /// Deliveries still owed (the retry backlog).
    pub async fn delivery_backlog(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'pending'")
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// Deletes finished deliveries older than `before_ms`.
    pub async fn prune_deliveries(&self, before_ms: i64) -> Result<u64> {
        let r = sqlx::query(
            "DELETE FROM webhook_deliveries WHERE status <> 'pending' AND created_at < $1",
        )
        .bind(before_ms)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected())
    }
}
