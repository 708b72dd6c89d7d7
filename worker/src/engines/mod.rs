//! Packshot engines: the [`Engine`] trait and what implements it (the
//! built-in `atelier` engine in [`atelier`] with its [`hanger`] removal, the
//! model-free [`BasicEngine`], the operator's HTTP and ONNX [`routes`]),
//! and the [`Pipeline`] that picks one per output and runs the stages
//! after it.

pub mod atelier;
pub mod cog;
pub mod engine;
pub mod hanger;
pub mod pipeline;
pub mod routes;

pub use engine::{BasicEngine, Engine, Input, RenderRequest, Rendered};
pub use pipeline::{Pipeline, PipelineOutput};
