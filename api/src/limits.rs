//! Rate limits (contract §1.9): GCRA buckets per account, in process
//! (governor). The distributed runtime swaps in a Redis GCRA behind the same
//! [`Decision`] shape so every API replica shares the buckets.

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;

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
        }
    }

    pub fn check(&self, bucket: Bucket, key: &str) -> Decision {
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

    #[test]
    fn five_per_minute_then_refused_with_retry_after() {
        let l = Limiter::new(600, 5);
        for i in 0..5 {
            let d = l.check(Bucket::Create, "acc:create-packshot");
            assert!(d.allowed, "request {i} refused");
            assert_eq!(d.remaining, 4 - i);
        }
        let d = l.check(Bucket::Create, "acc:create-packshot");
        assert!(!d.allowed);
        assert!((1..=12).contains(&d.retry_after_secs), "{d:?}");
        assert!(
            l.check(Bucket::Create, "other:create-packshot").allowed,
            "buckets are per key"
        );
    }
}
