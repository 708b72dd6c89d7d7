//! # atelier
//!
//! The `atelier` binary's library: wiring of the roles over the shared
//! adapters ([`app`]), the command line ([`cli`]), operator commands
//! ([`admin`]) and the user commands, a client of the public API
//! ([`client`]).
//!
//! ## Runtime model
//!
//! [`app::start`] connects the store (running migrations), the queue and the
//! object store, creates the dev account on a first embedded start, then
//! spawns the requested roles as tasks: the API server, the scheduler loops
//! and the worker consumers. Every role watches one shutdown token
//! (SIGINT/SIGTERM); when all roles have stopped, the queue's own tasks are
//! stopped and the pool is closed. Tests call [`app::start`] directly with a
//! port-0 listener and a fresh database.

pub mod admin;
pub mod app;
pub mod cli;
pub mod client;
