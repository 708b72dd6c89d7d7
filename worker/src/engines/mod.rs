//! Engines. Packshots: the [`Engine`] trait and what implements it (the
//! built-in `atelier` engine in [`atelier`] with its [`hanger`] removal, the
//! model-free [`BasicEngine`], the operator's HTTP, ONNX and [`cog`]
//! routes), and the [`Pipeline`] that picks one per output and runs the
//! stages after it. Generative kinds: the operator's model containers
//! ([`cog`]), picked per output by [`Generators`]. Trainings: the
//! operator's trainer containers ([`trainer`]).

pub mod atelier;
pub mod cog;
pub mod engine;
pub mod generators;
pub mod hanger;
pub mod pipeline;
pub mod routes;
pub mod trainer;

pub use engine::{BasicEngine, Engine, Input, RenderRequest, Rendered};
pub use generators::Generators;
pub use pipeline::{Pipeline, PipelineOutput};
