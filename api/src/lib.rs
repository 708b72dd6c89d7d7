//! # atelier-api
//!
//! The HTTP API (axum): authentication, validation, rate limits, admission,
//! signed object URLs and ZIP export, with the shapes of `API.md`, and the
//! OpenAPI document built from the same types.
//!
//! ## Runtime model
//!
//! [`serve`] runs the router on a listener until the shutdown token fires,
//! then stops accepting and lets in-flight requests finish; [`server`]
//! holds every connection to a cap and to timeouts (slow or silent clients
//! are closed). Handlers only
//! talk to the store and the object store; nothing is published to the
//! broker inside a request (the outbox row written with the job is relayed
//! by the scheduler). Every request runs in a `tracing` span.
//!
//! ## Layout
//!
//! - [`state`]: what handlers read ([`AppState`]).
//! - [`router`]: the route table, grouped by caller, and the layers every
//!   request passes (the error envelope, metrics, spans, panics).
//! - [`routes`]: handlers, one module per resource.
//! - [`admission`]: what every job-creating route does around its own
//!   validation (rate limit, file ownership, the admitting transaction,
//!   refusals).
//! - [`idempotency`]: `Idempotency-Key` on creating requests.
//! - [`console`]: the web console's page and assets, served at `/`.
//! - [`views`]: the answers, as types; [`openapi`]: the document.
//!
//! ## Guarantees
//!
//! - A job is durably recorded (with its outputs, reservation and outbox row,
//!   in one transaction) before `202` is sent.
//! - Bad input gets a 4xx envelope naming the problem; a database outage is
//!   a 503 with `Retry-After`; no handler panics on input.
//! - Another account's resources are indistinguishable from missing ones (404).

pub mod admission;
pub mod auth;
pub mod console;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod limits;
pub mod openapi;
pub mod router;
pub mod routes;
pub mod server;
pub mod state;
pub mod views;

pub use router::{router, serve};
pub use state::AppState;
