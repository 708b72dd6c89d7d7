//! Which scheduler replica is active.
//!
//! The control plane is bound by the database, not by the scheduler's CPU.
//! Replicas working side by side only competed for the same rows: each
//! dispatch round scanned what the others were claiming, and every
//! replica's settlement batches took the same account rows that admission
//! needs. The bench fell from 94 to 57 to 30 jobs/s with 1, 2 and 4
//! replicas. So one replica is active: the holder of the [`DISPATCH`]
//! duty, a lease in the store (`scheduler_duties`). It dispatches, applies
//! workers' reports, relays the outbox and the notifications and audits
//! the credits ([`Duty::run_while_held`]), and renews the lease. The
//! others stand by, deliver webhooks, export gauges, ask for the duty now
//! and then, and take it over once the holder's lease runs out (a killed
//! replica) or at once when the holder gives it up (a clean stop).
//!
//! The lease is about efficiency only. Claims and reports stay
//! conditional, so two replicas that both believe they hold it (a paused
//! process, clocks apart) can waste work but never dispatch or record an
//! output twice.

use atelier_shared::db::Store;
use atelier_shared::time::now_ms;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The duty of dispatch rounds and the credit audit.
pub const DISPATCH: &str = "dispatch";

pub struct Duty {
    name: &'static str,
    holder: String,
    ttl: Duration,
    state: Mutex<State>,
    /// Whether this replica holds it; the loops that run only on the
    /// holder follow it.
    holding: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    /// Until when this replica surely holds it (its lease, counted from
    /// before the store granted it).
    held_until: Option<Instant>,
    /// When a replica that does not hold it asks again.
    next_ask: Option<Instant>,
}

impl Duty {
    pub fn new(name: &'static str, holder: &str, ttl: Duration) -> Duty {
        Duty {
            name,
            holder: holder.to_string(),
            ttl: ttl.max(Duration::from_secs(1)),
            state: Mutex::default(),
            holding: tokio::sync::watch::Sender::new(false),
        }
    }

    fn set_holding(&self, held: bool) {
        self.holding
            .send_if_modified(|h| std::mem::replace(h, held) != held);
    }

    /// Runs `work` while this replica holds the duty: started when it
    /// takes the duty, stopped (its token cancelled) when it loses it,
    /// started again when it takes it back; returns once `stop` fires and
    /// `work` has returned.
    pub async fn run_while_held<F, Fut>(&self, stop: &CancellationToken, work: F)
    where
        F: Fn(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut changes = self.holding.subscribe();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                held = changes.wait_for(|h| *h) => if held.is_err() { return },
            }
            let on_duty = stop.child_token();
            let lost = async {
                let _ = changes.wait_for(|h| !*h).await;
                on_duty.cancel();
            };
            let running = work(on_duty.clone());
            tokio::pin!(running);
            tokio::select! {
                _ = &mut running => {}
                // Told to stop through its token: it finishes what it
                // holds (a lane's batch) before it may start again.
                _ = lost => running.await,
            }
            on_duty.cancel();
            if stop.is_cancelled() {
                return;
            }
        }
    }

    /// Whether this replica held the duty when last asked (no round trip).
    pub fn holding(&self) -> bool {
        *self.holding.borrow()
    }

    /// Whether this replica holds the duty now: renewed once half of the
    /// lease is gone; a replica that does not hold it asks the store at
    /// most every quarter of a lease. When the store cannot say, nothing
    /// changes (it is asked again at the next call).
    pub async fn held(&self, store: &Store) -> bool {
        let now = Instant::now();
        {
            let st = self.state.lock().expect("duty state");
            match (st.held_until, st.next_ask) {
                (Some(until), _) if now + self.ttl / 2 < until => return true,
                (None, Some(next)) if now < next => return false,
                _ => {}
            }
        }
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let answer = store
            .hold_duty(self.name, &self.holder, now_ms(), ttl_ms)
            .await;
        let mut st = self.state.lock().expect("duty state");
        let held = match answer {
            Ok(true) => {
                if st.held_until.is_none() {
                    tracing::info!(duty = self.name, holder = %self.holder, "scheduler: took the duty");
                }
                st.held_until = Some(now + self.ttl);
                true
            }
            Ok(false) => {
                if st.held_until.is_some() {
                    tracing::warn!(duty = self.name, holder = %self.holder, "scheduler: lost the duty to another replica");
                }
                st.held_until = None;
                false
            }
            // The store cannot say (busy, unreachable): carry on as before.
            // Only another holder's grant takes the duty away; until the
            // store answers, a holder that stopped would only leave reports
            // unapplied (and leases to run out), while two replicas active
            // at once merely compete.
            Err(e) => {
                tracing::warn!(duty = self.name, error = %e, "scheduler: cannot renew the duty; carrying on");
                self.holding()
            }
        };
        if !held {
            st.next_ask = Some(Instant::now() + self.ttl / 4);
        }
        self.set_holding(held);
        held
    }

    /// Gives the duty up (a clean stop), so another replica takes it at
    /// its next ask instead of after the lease.
    pub async fn release(&self, store: &Store) {
        if !self.holding() {
            return;
        }
        self.set_holding(false);
        self.state.lock().expect("duty state").held_until = None;
        if let Err(e) = store.release_duty(self.name, &self.holder).await {
            tracing::warn!(duty = self.name, error = %e, "scheduler: cannot give the duty up; it passes on when its lease runs out");
        }
    }
}
