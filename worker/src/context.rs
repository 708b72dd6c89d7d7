//! What a worker runs with: the broker, the object store, its engines and
//! face models, and its limits, from configuration.

use crate::engines::{Generators, Pipeline};
use crate::faces::FaceKit;
use atelier_shared::config::Config;
use atelier_shared::domain::WorkQueue;
use atelier_shared::egress::EgressPolicy;
use atelier_shared::queue::DynQueue;
use atelier_shared::storage::DynObjectStore;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct WorkerContext {
    pub queue: DynQueue,
    pub objects: DynObjectStore,
    pub pipeline: Pipeline,
    /// The operator's model containers, which draw the generative kinds;
    /// empty: this worker does not consume the `generate` queue.
    pub generators: Generators,
    pub concurrency: usize,
    pub heartbeat: Duration,
    /// How often a running task looks for its abort marker.
    pub abort_check: Duration,
    pub task_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_input_pixels: u64,
    /// Face models (identities, model swap); `None`: this worker does not
    /// consume the queues whose jobs need them.
    pub faces: Option<Arc<FaceKit>>,
    /// Outbound fetches of profile photos go through this guard.
    pub egress: EgressPolicy,
    pub fetch_max_bytes: u64,
    pub fetch_timeout: Duration,
    /// `worker.fault_delay_ms`: fault drills only.
    pub fault_delay: Duration,
    /// `worker.queues`: the only queues to consume (empty: every queue
    /// this worker can serve).
    pub only: Vec<WorkQueue>,
    /// The operator's trainer containers; `None`: this worker does not
    /// consume the `training` queue.
    pub trainers: Option<Arc<crate::engines::trainer::Trainers>>,
    /// Fires when the worker releases its unfinished tasks at shutdown
    /// (the grace period is over): a training left running then is
    /// re-attached by the next worker, not cancelled.
    pub releasing: tokio_util::sync::CancellationToken,
    /// Identifies this worker in leases and logs.
    pub worker_id: String,
    /// `concurrency` task slots shared by every queue this worker serves,
    /// so serving three queues never means three times the work (each
    /// queue still prefetches up to `concurrency` deliveries).
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Where this worker's models run, as its presence record says
    /// (`worker.device` until the runtime says what it got).
    pub device: String,
    /// `worker.presence_secs`.
    pub presence_every: Duration,
    /// Tasks finished (outcome reported) since start.
    pub finished: Arc<std::sync::atomic::AtomicU64>,
}

impl WorkerContext {
    pub fn from_config(
        cfg: &Config,
        egress: EgressPolicy,
        queue: DynQueue,
        objects: DynObjectStore,
    ) -> WorkerContext {
        WorkerContext {
            queue,
            objects,
            pipeline: Pipeline::default(),
            generators: Generators::default(),
            concurrency: cfg.worker.concurrency,
            heartbeat: Duration::from_secs(cfg.worker.heartbeat_secs),
            only: cfg.worker.queues.clone(),
            abort_check: Duration::from_millis(cfg.worker.abort_check_ms.max(50)),
            task_timeout: Duration::from_secs(cfg.worker.task_timeout_secs),
            shutdown_grace: Duration::from_secs(cfg.worker.shutdown_grace_secs),
            max_input_pixels: cfg.worker.max_input_pixels,
            faces: None,
            egress,
            fetch_max_bytes: cfg.identity.fetch_max_bytes,
            fetch_timeout: Duration::from_secs(cfg.identity.fetch_timeout_secs),
            fault_delay: Duration::from_millis(cfg.worker.fault_delay_ms),
            trainers: None,
            releasing: tokio_util::sync::CancellationToken::new(),
            worker_id: format!("wrk_{}_{}", std::process::id(), ulid::Ulid::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(cfg.worker.concurrency.max(1))),
            device: match cfg.worker.device {
                atelier_shared::config::Device::Cpu => "cpu".into(),
                atelier_shared::config::Device::Cuda => "cuda".into(),
            },
            presence_every: Duration::from_secs(cfg.worker.presence_secs.max(1)),
            finished: Arc::default(),
        }
    }

    /// The work queues this worker can serve with what it has loaded.
    /// The queues `worker.queues` names that this worker cannot serve (its
    /// models or generator routes are missing).
    pub fn unservable(&self) -> Vec<WorkQueue> {
        self.only
            .iter()
            .copied()
            .filter(|q| !crate::jobs::serves(self, *q))
            .collect()
    }

    pub fn queues(&self) -> Vec<WorkQueue> {
        let chosen = |q: &WorkQueue| self.only.is_empty() || self.only.contains(q);
        WorkQueue::ALL
            .into_iter()
            .filter(|q| chosen(q) && crate::jobs::serves(self, *q))
            .collect()
    }
}
