//! Rate limits (contract §1.9): GCRA buckets per account.
//!
//! With `redis.url` set, the buckets live in Redis (one Lua script, atomic,
//! clocked by Redis's own `TIME`), so every API replica shares them. Without
//! Redis, or while it is unreachable, each replica keeps its own buckets in
//! process (governor): the API keeps serving, limits then apply per replica
//! (degraded mode, logged and counted in `atelier_rate_limit_degraded_total`).

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Keyed =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// The state of the bucket a request was checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// On refusal: seconds until one more request is allowed.
    pub retry_after_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// Any authenticated request (per account).
    General,
    /// Job creation, per account and endpoint.
    Create,
}

pub struct Limiter {
    general: Keyed,
    create: Keyed,
    general_per_minute: u32,
    create_per_minute: u32,
    redis: Option<RedisGcra>,
}

/// GCRA in Redis. Returns `{allowed, remaining, retry_after_ms, reset_ms}`.
/// TAT (theoretical arrival time) per key; `interval` ms per token, `burst`
/// tokens; the key expires when the bucket is full again.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
"#;

/// How long a check may wait for Redis before the replica decides alone.
const REDIS_BUDGET: Duration = Duration::from_millis(250);

struct RedisGcra {
    /// `None` until connected; the connection manager reconnects by itself.
    conn: Arc<Mutex<Option<redis::aio::ConnectionManager>>>,
    script: redis::Script,
    prefix: String,
    /// When degraded mode was last logged (ms), to log it once a minute.
    last_warned: AtomicI64,
    /// After a failure Redis is not asked again before this (ms): a
    /// blackholed Redis costs one request the budget, not every request.
    skip_until: AtomicI64,
}

/// How long a replica decides alone after Redis failed to answer.
const REDIS_COOLDOWN_MS: i64 = 5_000;

impl RedisGcra {
    async fn check(&self, key: &str, per_minute: u32) -> Result<Decision, String> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| "connection slot poisoned".to_string())?
            .clone();
        let mut conn = conn.ok_or_else(|| "not connected yet".to_string())?;
        let interval_ms = (60_000 / u64::from(per_minute)).max(1);
        let mut call = self.script.key(format!("{}rl:{key}", self.prefix));
        call.arg(interval_ms).arg(per_minute);
        let r: Vec<i64> = tokio::time::timeout(REDIS_BUDGET, call.invoke_async(&mut conn))
            .await
            .map_err(|_| format!("no answer within {REDIS_BUDGET:?}"))?
            .map_err(|e| e.to_string())?;
        let [allowed, remaining, retry_ms, reset_ms] = r[..] else {
            return Err(format!("unexpected script reply {r:?}"));
        };
        let secs = |ms: i64| (ms.max(0) as u64).div_ceil(1000);
        Ok(Decision {
            allowed: allowed == 1,
            limit: per_minute,
            remaining: u32::try_from(remaining.max(0)).unwrap_or(0),
            reset_secs: secs(reset_ms),
            retry_after_secs: if allowed == 1 {
                0
            } else {
                secs(retry_ms).max(1)
            },
        })
    }
}

fn keyed(per_minute: u32) -> Keyed {
    let n = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
    RateLimiter::keyed(Quota::per_minute(n)).with_middleware::<StateInformationMiddleware>()
}

impl Limiter {
    pub fn new(general_per_minute: u32, create_per_minute: u32) -> Limiter {
        Limiter {
            general: keyed(general_per_minute),
            create: keyed(create_per_minute),
            general_per_minute: general_per_minute.max(1),
            create_per_minute: create_per_minute.max(1),
            redis: None,
        }
    }

    /// Shares the buckets through Redis at `url`, keys under `prefix`.
    /// Connects in the background (retrying every few seconds), so an API
    /// replica starts, and serves, while Redis is down. Needs a Tokio runtime.
    pub fn share_through_redis(&mut self, url: &str, prefix: &str) -> Result<(), String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis.url: {e}"))?;
        let conn = Arc::new(Mutex::new(None));
        let slot = conn.clone();
        let redacted = atelier_shared::config::redact_url(url);
        tokio::spawn(async move {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Duration::from_secs(2))
                .set_response_timeout(REDIS_BUDGET)
                .set_number_of_retries(2)
                .set_max_delay(2_000);
            loop {
                match client
                    .get_connection_manager_with_config(config.clone())
                    .await
                {
                    Ok(m) => {
                        if let Ok(mut s) = slot.lock() {
                            *s = Some(m);
                        }
                        tracing::info!(redis = %redacted, "rate limits shared through Redis");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(redis = %redacted, error = %e, "Redis unreachable: rate limits are per replica until it answers");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        });
        self.redis = Some(RedisGcra {
            conn,
            script: redis::Script::new(GCRA),
            prefix: prefix.to_string(),
            last_warned: AtomicI64::new(0),
            skip_until: AtomicI64::new(0),
        });
        Ok(())
    }

    /// Whether the buckets are in Redis right now.
    pub fn is_shared(&self) -> bool {
        self.redis
            .as_ref()
            .and_then(|r| r.conn.lock().ok().map(|c| c.is_some()))
            .unwrap_or(false)
    }

    /// Waits (at most `within`) for the Redis connection; false if none came.
    pub async fn wait_shared(&self, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        while !self.is_shared() {
            if self.redis.is_none() || tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    pub async fn check(&self, bucket: Bucket, key: &str) -> Decision {
        let per_minute = match bucket {
            Bucket::General => self.general_per_minute,
            Bucket::Create => self.create_per_minute,
        };
        if let Some(r) = &self.redis
            && atelier_shared::time::now_ms() >= r.skip_until.load(Ordering::Relaxed)
        {
            let bucket_key = match bucket {
                Bucket::General => format!("g:{key}"),
                Bucket::Create => format!("c:{key}"),
            };
            match r.check(&bucket_key, per_minute).await {
                Ok(d) => return d,
                Err(e) => {
                    metrics::counter!("atelier_rate_limit_degraded_total").increment(1);
                    let now = atelier_shared::time::now_ms();
                    r.skip_until
                        .store(now + REDIS_COOLDOWN_MS, Ordering::Relaxed);
                    if now - r.last_warned.swap(now, Ordering::Relaxed) > 60_000 {
                        tracing::warn!(error = %e, "rate limits: Redis unavailable, deciding per replica (degraded)");
                    }
                }
            }
        }
        self.local(bucket, key)
    }

    fn local(&self, bucket: Bucket, key: &str) -> Decision {
        let (l, per_minute) = match bucket {
            Bucket::General => (&self.general, self.general_per_minute),
            Bucket::Create => (&self.create, self.create_per_minute),
        };
        // One token every 60/n seconds; a full bucket holds n.
        let refill = 60.0 / f64::from(per_minute);
        match l.check_key(&key.to_string()) {
            Ok(snap) => {
                let remaining = snap.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    limit: per_minute,
                    remaining,
                    reset_secs: (f64::from(per_minute - remaining.min(per_minute)) * refill).ceil()
                        as u64,
                    retry_after_secs: 0,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Decision {
                    allowed: false,
                    limit: per_minute,
                    remaining: 0,
                    reset_secs: (f64::from(per_minute) * refill).ceil() as u64,
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                }
            }
        }
    }

    /// Forgets idle keys (call periodically).
    pub fn shrink(&self) {
        self.general.retain_recent();
        self.create.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn five_per_minute_then_refused_with_retry_after() {
        let l = Limiter::new(600, 5);
        for i in 0..5 {
            let d = l.check(Bucket::Create, "acc:create-packshot").await;
            assert!(d.allowed, "request {i} refused");
            assert_eq!(d.remaining, 4 - i);
        }
        let d = l.check(Bucket::Create, "acc:create-packshot").await;
        assert!(!d.allowed);
        assert!((1..=12).contains(&d.retry_after_secs), "{d:?}");
        assert!(
            l.check(Bucket::Create, "other:create-packshot")
                .await
                .allowed,
            "buckets are per key"
        );
    }
}
