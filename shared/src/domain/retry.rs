//! Retry schedule for retryable output failures.
//!
//! Attempt `n` (1-based) that failed is retried after
//! `min(base · 2^(n-1), cap)` scaled by a jitter factor in `[1 − j, 1 + j]`.
//! With the defaults (base 2 s, cap 300 s, jitter 20 %, 4 attempts) the
//! waits are about 2 s, 4 s, 8 s, then the output fails.

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in total, the first one included.
    pub max_attempts: u32,
    pub base_ms: u64,
    pub cap_ms: u64,
    /// Fraction of the delay added or removed at random (0.2 = ±20 %).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base_ms: 2_000,
            cap_ms: 300_000,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The un-jittered delay after failed attempt `attempt` (1-based).
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(62);
        let ms = self.base_ms.saturating_mul(1u64 << exp).min(self.cap_ms);
        Duration::from_millis(ms)
    }

    /// The delay with jitter; `unit` is a uniform sample in `[0, 1)`, passed
    /// in so the function stays pure.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base_delay(attempt).as_millis() as f64;
        let factor = 1.0 + self.jitter.clamp(0.0, 1.0) * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_millis((base * factor).round().max(0.0) as u64)
    }

    /// Whether a failed attempt `attempt` may be followed by another one.
    pub fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn documented_numbers_hold() {
        let p = RetryPolicy::default();
        let waits: Vec<u64> = (1..=3).map(|a| p.base_delay(a).as_secs()).collect();
        assert_eq!(waits, vec![2, 4, 8]);
        assert!(p.may_retry(3));
        assert!(!p.may_retry(4));
        assert_eq!(p.base_delay(40), Duration::from_secs(300));
    }

    proptest! {
        #[test]
        fn backoff_is_monotone_and_capped(a in 1u32..100, unit in 0.0f64..1.0) {
            let p = RetryPolicy::default();
            prop_assert!(p.base_delay(a) <= p.base_delay(a + 1));
            prop_assert!(p.base_delay(a) <= Duration::from_millis(p.cap_ms));
            let d = p.delay(a, unit).as_millis() as f64;
            let b = p.base_delay(a).as_millis() as f64;
            prop_assert!(d >= b * (1.0 - p.jitter) - 1.0 && d <= b * (1.0 + p.jitter) + 1.0);
        }
    }
}
