//! Integration tests: the real roles in-process (and, for crash drills, as
//! child processes) on port 0, each test with its own database. One test
//! binary for the whole suite.

mod admission;
mod api;
mod cli;
mod client;
mod custom_models;
mod drafts;
mod edge;
mod engines;
mod faults;
mod fleet;
mod generate;
mod helpers;
mod identities;
mod lifecycle;
mod metrics;
mod models_api;
mod notifications;
mod presets;
mod profiles;
mod studio;
mod trainings;
