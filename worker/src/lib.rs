//! # atelier-worker
//!
//! Consumes tasks from the work queues, runs the image pipelines and reports
//! outcomes to the scheduler. A worker talks only to the broker and the
//! object store: every task carries what its job needs (typed spec, input
//! object keys, the identity face), so GPU nodes hold no database
//! credentials and a large fleet never exhausts database connections.
//!
//! ## Runtime model
//!
//! [`run`] ([`consume`]) opens one consumer per work queue it serves with a
//! prefetch of `worker.concurrency`; the queues share `concurrency` task
//! slots. Each delivery becomes a tokio task that:
//!
//! 1. drops a first delivery whose dispatch deadline has passed (the
//!    scheduler has already reclaimed it and dispatched a new attempt),
//! 2. reports `started` and then a heartbeat every `worker.heartbeat_secs`
//!    (the scheduler extends the output's lease on each),
//! 3. runs its kind's handler ([`jobs`]): downloads the inputs, runs the
//!    pipeline on the blocking pool (never on the async runtime), bounded by
//!    `worker.task_timeout_secs`; a panic inside it is caught and reported
//!    as retryable,
//! 4. uploads the results under keys unique to the run, so a duplicate run
//!    never overwrites a recorded result,
//! 5. publishes the outcome durably and only then acks the delivery.
//!
//! Shutdown (SIGTERM): stop taking deliveries, let in-flight tasks finish
//! for `worker.shutdown_grace_secs`, then nack what is left so another
//! worker picks it up at once.
//!
//! ## Layout
//!
//! - [`consume`]: the consume loop, heartbeats, outcome reports.
//! - [`jobs`]: one handler per job kind, picked once from the task's spec.
//! - [`engines`]: the packshot engine trait, the built-in engine, operator
//!   routes, hanger removal, and the pipeline that picks an engine.
//! - [`faces`]: face detection, alignment, identity builds and model swap.
//! - [`inference`]: ONNX Runtime sessions, batching, the model registry.
//!
//! ## Guarantees
//!
//! At-least-once execution: a delivery that is not acked (crash, shutdown,
//! failed outcome publish) is redelivered. Effects are made exactly-once by
//! the scheduler, which records an outcome only for the output's live
//! attempt.

pub mod analysis;
pub mod consume;
pub mod context;
pub mod engines;
pub mod faces;
pub mod failure;
mod fetch;
pub mod imaging;
pub mod inference;
pub mod jobs;
pub mod model_store;
pub mod postprocess;

pub use consume::run;
pub use context::WorkerContext;
