//! Notifications after they are stored: the relay (live fan-out and webhook
//! queueing), webhook delivery, and housekeeping.
//!
//! - **relay**: one scheduler at a time (named lease `notification-relay`)
//!   reads stored notifications not yet relayed, oldest first, publishes
//!   them on the event bus (SSE listeners on every API replica), then marks
//!   them relayed and queues their webhook deliveries in one transaction. A
//!   crash between the two publishes them again; streams drop duplicates by
//!   id. One relay keeps each job's events in order.
//! - **deliverer**: claims due deliveries with a lease, POSTs each (signed,
//!   through the SSRF-guarded client), records the attempt: delivered, or
//!   retried on `webhooks.retry_delays_ms` until it gives up. At least once:
//!   a scheduler that dies mid-attempt leaves the claim to expire.
//! - **housekeeping**: prunes expired notifications, old deliveries and
//!   expired idempotency keys;
//!   gauges for relay lag and the delivery backlog.

use crate::{SchedulerContext, sleep_or_stop};
use atelier_shared::config::{NotificationsConfig, WebhooksConfig};
use atelier_shared::db::notifications::RelayedDelivery;
use atelier_shared::db::webhooks::{AttemptResult, AttemptVerdict, DueDelivery};
use atelier_shared::egress::{EgressPolicy, read_capped};
use atelier_shared::events::{EventBus, wire};
use atelier_shared::storage::Links;
use atelier_shared::time::now_ms;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What the notification loops need besides the store.
#[derive(Clone)]
pub struct NotifyContext {
    pub events: EventBus,
    pub links: Links,
    pub egress: EgressPolicy,
    pub notifications: NotificationsConfig,
    pub webhooks: WebhooksConfig,
    /// Lifetime of the result URLs inside a delivered `image_result`.
    pub result_url_ttl: Duration,
    /// How long `Idempotency-Key` answers are kept.
    pub idempotency_ttl: Duration,
}

const RELAY_LEASE: &str = "notification-relay";
const RELAY_LEASE_MS: i64 = 10_000;

/// `sha256=<lowercase hex HMAC-SHA256(secret, body)>` (contract §4.9).
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub(crate) async fn relay(ctx: SchedulerContext, stop: CancellationToken) {
    let n = ctx.notify.clone();
    let period = Duration::from_millis(n.notifications.relay_ms);
    let mut holding = false;
    let mut renewed = tokio::time::Instant::now();
    let mut bus_failing = false;
    // Renewed a third into the lease, not on every poll.
    let renew_every = Duration::from_millis(RELAY_LEASE_MS as u64 / 3);
    loop {
        let leader = if holding && renewed.elapsed() < renew_every {
            true
        } else {
            renewed = tokio::time::Instant::now();
            match ctx
                .store
                .try_lease(RELAY_LEASE, &ctx.instance, RELAY_LEASE_MS)
                .await
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "relay: store unavailable");
                    false
                }
            }
        };
        if leader != holding {
            tracing::info!(instance = %ctx.instance, leader, "notification relay leadership changed");
            holding = leader;
        }
        if !leader {
            if sleep_or_stop(Duration::from_millis(1000), &stop).await {
                return;
            }
            continue;
        }
        let batch = match ctx.store.unrelayed_notifications(500).await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "relay: store unavailable");
                Vec::new()
            }
        };
        if batch.is_empty() {
            if sleep_or_stop(period, &stop).await {
                return;
            }
            continue;
        }
        match n.events.publish(&batch).await {
            Ok(()) if bus_failing => {
                tracing::info!("relay: live events flow again");
                bus_failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !bus_failing {
                    tracing::warn!(error = %e, "relay: live events not published (SSE streams fall back to polling the store)");
                }
                bus_failing = true;
                metrics::counter!("atelier_events_publish_failures_total").increment(1);
            }
        }
        let mut pairs = Vec::with_capacity(batch.len());
        for note in batch {
            let body = wire(&note, &n.links, n.result_url_ttl).await.to_string();
            let delivery = RelayedDelivery {
                notification_id: note.id,
                body,
            };
            pairs.push((note, delivery));
        }
        match ctx.store.finish_relay(&pairs).await {
            Ok(()) => {
                metrics::counter!("atelier_notifications_relayed_total")
                    .increment(pairs.len() as u64);
            }
            Err(e) => {
                tracing::warn!(error = %e, "relay: cannot mark notifications relayed (they will be relayed again)");
                if sleep_or_stop(Duration::from_secs(1), &stop).await {
                    return;
                }
            }
        }
    }
}

pub(crate) async fn deliverer(ctx: SchedulerContext, stop: CancellationToken) {
    let w = ctx.notify.webhooks.clone();
    let timeout = Duration::from_secs(w.timeout_secs);
    let client = match ctx.notify.egress.client(timeout, w.max_redirects) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhooks: cannot build the HTTP client; deliveries stay queued");
            return;
        }
    };
    // Long enough for every redirect hop to time out, with room to record.
    let lease_ms = i64::try_from(timeout.as_millis()).unwrap_or(10_000)
        * (w.max_redirects as i64 + 1)
        + 30_000;
    let mut running: JoinSet<()> = JoinSet::new();
    loop {
        let free = w.concurrency.saturating_sub(running.len());
        let mut claimed = 0;
        if free > 0 && !stop.is_cancelled() {
            match ctx.store.claim_deliveries(free as i64, lease_ms).await {
                Ok(due) => {
                    claimed = due.len();
                    for d in due {
                        let ctx = ctx.clone();
                        let client = client.clone();
                        running.spawn(async move { deliver(&ctx, &client, d).await });
                    }
                }
                Err(e) => tracing::debug!(error = %e, "webhooks: store unavailable"),
            }
        }
        if stop.is_cancelled() {
            // Let attempts in flight finish and be recorded.
            while running.join_next().await.is_some() {}
            return;
        }
        if claimed > 0 && running.len() < w.concurrency {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

async fn deliver(ctx: &SchedulerContext, client: &reqwest::Client, d: DueDelivery) {
    let w = &ctx.notify.webhooks;
    let span = tracing::info_span!("webhook_delivery", delivery = d.id, event = %d.event, attempt = d.attempt, account = %d.account_id);
    async {
        let started = std::time::Instant::now();
        let result = attempt(&ctx.notify.egress, client, &d, w.max_response_bytes).await;
        metrics::histogram!("atelier_webhook_attempt_seconds").record(started.elapsed().as_secs_f64());
        let verdict = match ctx
            .store
            .record_attempt(&d, &result, &w.retry_delays_ms, w.disable_after_failures)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                // The claim expires and the delivery is attempted again.
                tracing::warn!(error = %e, "webhooks: cannot record the attempt");
                return;
            }
        };
        let outcome = match verdict {
            AttemptVerdict::Delivered => "delivered",
            AttemptVerdict::RetryAt(_) => "retry",
            AttemptVerdict::GaveUp => "failed",
            AttemptVerdict::Stale => "stale",
        };
        metrics::counter!("atelier_webhook_deliveries_total", "outcome" => outcome).increment(1);
        match (&result, verdict) {
            (AttemptResult::Failed { status, error }, AttemptVerdict::RetryAt(at)) => {
                tracing::info!(?status, error = %error, retry_in_ms = at - now_ms(), "webhook attempt failed; will retry");
            }
            (AttemptResult::Failed { status, error }, AttemptVerdict::GaveUp) => {
                tracing::warn!(?status, error = %error, "webhook delivery failed for good");
            }
            _ => tracing::debug!(outcome, "webhook attempt recorded"),
        }
    }
    .instrument(span)
    .await
}

async fn attempt(
    egress: &EgressPolicy,
    client: &reqwest::Client,
    d: &DueDelivery,
    max_response: usize,
) -> AttemptResult {
    let url = match url::Url::parse(&d.url) {
        Ok(u) => u,
        Err(e) => {
            return AttemptResult::Failed {
                status: None,
                error: format!("invalid webhook URL: {e}"),
            };
        }
    };
    // Literal addresses never reach the resolver: check them here.
    if let Err(e) = egress.check_syntax(&url) {
        return AttemptResult::Failed {
            status: None,
            error: e.to_string(),
        };
    }
    let sent = client
        .post(url)
        .header("content-type", "application/json")
        .header(
            "x-webhook-signature",
            signature(&d.secret, d.body.as_bytes()),
        )
        .header("x-webhook-event", &d.event)
        .header("x-webhook-delivery", &d.delivery_uuid)
        .body(d.body.clone())
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let status = i64::from(resp.status().as_u16());
            let ok = resp.status().is_success();
            // Drain a bounded amount so the connection can be reused.
            let _ = read_capped(resp, max_response).await;
            if ok {
                AttemptResult::Delivered { status }
            } else {
                AttemptResult::Failed {
                    status: Some(status),
                    error: format!("receiver answered {status}"),
                }
            }
        }
        Err(e) => AttemptResult::Failed {
            status: None,
            error: describe(&e),
        },
    }
}

/// The error chain of a failed request, on one line.
fn describe(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_redirect() {
        "redirect refused".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s.chars().take(300).collect()
}

pub(crate) async fn housekeeping(ctx: SchedulerContext, stop: CancellationToken) {
    let n = &ctx.notify;
    let mut last_prune = 0i64;
    let mut last_audit: Option<tokio::time::Instant> = None;
    loop {
        if let Some(every) = ctx.credit_audit
            && last_audit.is_none_or(|t| t.elapsed() >= every)
        {
            last_audit = Some(tokio::time::Instant::now());
            // Each check is one statement, so it sees one committed state:
            // a live system shows no problem unless the books disagree.
            match ctx.store.audit_credits().await {
                Ok(problems) => {
                    metrics::gauge!("atelier_credit_audit_problems").set(problems.len() as f64);
                    for p in problems.iter().take(10) {
                        tracing::error!(problem = %p, "credit audit");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "credit audit skipped"),
            }
        }
        if let Ok(lag) = ctx.store.relay_lag_ms().await {
            metrics::gauge!("atelier_notification_relay_lag_seconds").set(lag as f64 / 1000.0);
        }
        if let Ok(b) = ctx.store.delivery_backlog().await {
            metrics::gauge!("atelier_webhook_backlog").set(b as f64);
        }
        let now = now_ms();
        if now - last_prune > 60_000 {
            last_prune = now;
            let keep = i64::try_from(n.notifications.retention_secs).unwrap_or(600) * 1000;
            match ctx.store.prune_notifications(now - keep).await {
                Ok(k) if k > 0 => tracing::debug!(pruned = k, "expired notifications pruned"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "notification pruning skipped"),
            }
            let keep = i64::try_from(n.webhooks.keep_deliveries_secs).unwrap_or(0) * 1000;
            let _ = ctx.store.prune_deliveries(now - keep).await;
            let keep = i64::try_from(n.idempotency_ttl.as_millis()).unwrap_or(i64::MAX / 2);
            match ctx
                .store
                .prune_idempotency_keys(now.saturating_sub(keep))
                .await
            {
                Ok(k) if k > 0 => tracing::debug!(pruned = k, "expired idempotency keys pruned"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "idempotency key pruning skipped"),
            }
        }
        if sleep_or_stop(Duration::from_secs(5), &stop).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_hmac_sha256_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
