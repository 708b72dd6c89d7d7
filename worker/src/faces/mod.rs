//! Faces: detection ([`detect`]: SCRFD), alignment and identity embeddings
//! ([`align`]: ArcFace template, mirror-averaged unit embeddings), the
//! models a worker loads once ([`kit`]), identity and profile builds
//! ([`identity`]) and model swap ([`swap`], with the face drawn by a
//! [`swapper`]).

pub mod align;
pub mod detect;
pub mod identity;
pub mod kit;
pub mod swap;
pub mod swapper;

pub use kit::FaceKit;
