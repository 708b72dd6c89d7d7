//! Which workers are alive, and what each serves: every worker writes a
//! presence record to the object store (`control/workers/<id>.json`) every
//! `worker.presence_secs` and deletes it when it stops; operators' views
//! and the scheduler read them back.
//!
//! Workers hold no database credentials, only the broker's and the object
//! store's, and presence must not add to the outcome stream that the
//! scheduler applies in order: so the registry lives beside the other
//! control objects (cancel markers, training claims). A worker killed
//! without warning leaves its record behind; it reads as not alive once it
//! is [`STALE_AFTER`] intervals old and is deleted by the scheduler after
//! [`FORGET_AFTER_MS`].

use crate::domain::WorkQueue;
use crate::storage::{ObjectStore, StorageError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Where presence records live.
pub const PRESENCE_PREFIX: &str = "control/workers/";

/// A record older than this many presence intervals is not alive.
pub const STALE_AFTER: i64 = 3;

/// A record not renewed for this long is deleted (the worker is gone).
pub const FORGET_AFTER_MS: i64 = 60 * 60 * 1000;

/// Records read at most (a fleet larger than this shows its first ones).
pub const MAX_WORKERS: usize = 2_000;

/// The object key of a worker's presence record.
pub fn presence_key(worker: &str) -> String {
    format!("{PRESENCE_PREFIX}{worker}.json")
}

/// What a worker says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Presence {
    /// The worker's id (as in leases and logs).
    pub worker: String,
    /// The host (pod) it runs on.
    pub host: String,
    pub version: String,
    /// The queues it consumes.
    #[schema(value_type = Vec<String>)]
    pub queues: Vec<WorkQueue>,
    /// Where its models run (`cpu`, `cuda`); `cuda` asked for but not
    /// available reads `cpu`.
    pub device: String,
    /// Task slots (`worker.concurrency`).
    pub slots: u32,
    /// Tasks running now.
    pub in_flight: u32,
    /// Tasks it finished since it started (completed or failed).
    pub finished: u64,
    /// Epoch ms it started at.
    pub started_ms: i64,
    /// Epoch ms of this record.
    pub seen_ms: i64,
    /// The interval it renews this record at, in seconds.
    pub every_secs: u64,
}

impl Presence {
    /// Whether the worker renewed its record recently enough to count as
    /// running.
    pub fn alive(&self, now_ms: i64) -> bool {
        let every = i64::try_from(self.every_secs.max(1)).unwrap_or(i64::MAX / 4_000) * 1000;
        now_ms.saturating_sub(self.seen_ms) <= every.saturating_mul(STALE_AFTER)
    }

    pub async fn publish(&self, objects: &dyn ObjectStore) -> Result<(), StorageError> {
        let body = serde_json::to_vec(self).expect("a presence record serialises");
        objects
            .put(
                &presence_key(&self.worker),
                Bytes::from(body),
                "application/json",
            )
            .await
    }

    pub async fn withdraw(&self, objects: &dyn ObjectStore) -> Result<(), StorageError> {
        objects.delete(&presence_key(&self.worker)).await
    }
}

/// Every presence record in the store, worker id order. A record that
/// cannot be read (deleted meanwhile, not a record) is left out.
pub async fn workers(objects: &dyn ObjectStore) -> Result<Vec<Presence>, StorageError> {
    let keys = objects.list(PRESENCE_PREFIX, MAX_WORKERS).await?;
    let reads = keys.iter().map(|k| objects.get(k));
    let mut found = Vec::with_capacity(keys.len());
    for (key, body) in keys.iter().zip(futures::future::join_all(reads).await) {
        match body {
            Ok(b) => match serde_json::from_slice::<Presence>(&b) {
                Ok(p) => found.push(p),
                Err(e) => tracing::debug!(%key, error = %e, "not a presence record"),
            },
            Err(StorageError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

/// Deletes the records of workers gone for [`FORGET_AFTER_MS`]; returns
/// how many.
pub async fn forget_gone(
    objects: &dyn ObjectStore,
    known: &[Presence],
    now_ms: i64,
) -> Result<usize, StorageError> {
    let mut n = 0;
    for p in known {
        if now_ms.saturating_sub(p.seen_ms) > FORGET_AFTER_MS {
            p.withdraw(objects).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// Live workers per work queue (every queue named, 0 where none serves it).
pub fn alive_per_queue(known: &[Presence], now_ms: i64) -> Vec<(WorkQueue, u32)> {
    WorkQueue::ALL
        .into_iter()
        .map(|q| {
            let n = known
                .iter()
                .filter(|p| p.alive(now_ms) && p.queues.contains(&q))
                .count();
            (q, u32::try_from(n).unwrap_or(u32::MAX))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStore;

    fn record(worker: &str, seen_ms: i64, queues: Vec<WorkQueue>) -> Presence {
        Presence {
            worker: worker.into(),
            host: "h".into(),
            version: "0".into(),
            queues,
            device: "cpu".into(),
            slots: 4,
            in_flight: 1,
            finished: 0,
            started_ms: 0,
            seen_ms,
            every_secs: 10,
        }
    }

    #[test]
    fn a_record_is_alive_for_three_intervals() {
        let p = record("w", 100_000, vec![]);
        assert!(p.alive(100_000 + 30_000));
        assert!(!p.alive(100_000 + 30_001));
    }

    #[tokio::test]
    async fn records_are_read_back_counted_and_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = LocalStore::new(dir.path()).expect("store");
        let now = 10 * FORGET_AFTER_MS;
        let fresh = record("a", now - 1_000, vec![WorkQueue::Packshot, WorkQueue::Swap]);
        let stale = record("b", now - 60_000, vec![WorkQueue::Packshot]);
        let gone = record("c", now - FORGET_AFTER_MS - 1, vec![WorkQueue::Identity]);
        for p in [&fresh, &stale, &gone] {
            p.publish(&s).await.expect("publish");
        }
        // Not a record: skipped, not an error.
        s.put(
            &presence_key("junk"),
            Bytes::from_static(b"{"),
            "application/json",
        )
        .await
        .expect("put");
        let known = workers(&s).await.expect("workers");
        assert_eq!(known, vec![fresh.clone(), stale.clone(), gone.clone()]);
        let alive = alive_per_queue(&known, now);
        assert!(alive.contains(&(WorkQueue::Packshot, 1)), "{alive:?}");
        assert!(alive.contains(&(WorkQueue::Swap, 1)), "{alive:?}");
        assert!(alive.contains(&(WorkQueue::Identity, 0)), "{alive:?}");
        assert_eq!(forget_gone(&s, &known, now).await.expect("forget"), 1);
        let left = workers(&s).await.expect("workers");
        assert_eq!(left, vec![fresh.clone(), stale]);
        fresh.withdraw(&s).await.expect("withdraw");
        assert_eq!(workers(&s).await.expect("workers").len(), 1);
    }
}
