//! # atelier-shared
//!
//! Everything the Atelier roles (`api`, `scheduler`, `worker`) have in common,
//! and nothing that only one of them needs.
//!
//! ## Architecture
//!
//! - [`domain`]: pure types and functions, no I/O: identifiers, job and
//!   output states with their legal transitions, credit arithmetic, pricing,
//!   retry schedule, fair-share pick, and the parsed job specifications.
//! - [`config`]: the figment configuration (defaults → TOML file → `ATELIER_*`
//!   environment), validated once at start.
//! - [`db`]: the [`db::Store`] over sqlx's `Any` driver. One migration set per
//!   dialect (SQLite for the embedded mode, PostgreSQL for production) and one
//!   set of portable queries; a dialect switch only where Postgres needs
//!   `FOR UPDATE SKIP LOCKED` and SQLite needs `BEGIN IMMEDIATE`.
//! - [`queue`]: the [`queue::Queue`] trait carrying work between roles and its
//!   embedded, durable implementation (a table in the same database).
//! - [`storage`]: the [`storage::ObjectStore`] trait, the local-directory store
//!   and the HMAC [`storage::Signer`] for capability URLs.
//! - [`events`]: live fan-out of relayed notifications (in-process, or
//!   through Redis pub/sub) and their wire form.
//! - [`fleet`]: the workers' presence records (who is alive, serving what).
//! - [`egress`]: the SSRF guard for outbound requests a client can aim
//!   (webhooks, photo URLs).
//! - [`telemetry`]: tracing subscriber and the Prometheus recorder.
//!
//! ## Runtime model
//!
//! This crate spawns no task of its own except where a type says so
//! ([`queue::embedded::EmbeddedQueue`] renews the leases of deliveries it
//! handed out). Every long-running loop lives in a role crate and stops when
//! its `CancellationToken` fires.

pub mod config;
pub mod db;
pub mod domain;
pub mod egress;
pub mod events;
pub mod fleet;
pub mod metric_catalogue;
pub mod queue;
pub mod storage;
pub mod telemetry;
pub mod time;

pub use tokio_util::sync::CancellationToken;
