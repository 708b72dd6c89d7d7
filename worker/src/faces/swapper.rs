//! Where a swapped face comes from: a [`FaceSource`] draws the face that
//! [`super::swap`] blends onto the photo. By default the identity's own
//! aligned crop ([`CropSource`]); when `models.face_swap` names an
//! operator-installed model with the common 128×128 signature, an
//! [`OnnxSwapper`] that redraws the photo's face with the identity's
//! embedding.

use super::align::{self, ARCFACE_TEMPLATE};
use super::detect::Face;
use crate::failure::TaskFailure;
use crate::inference::{InferenceError, Runtime};
use image::RgbImage;
use ndarray::{Array2, Array4};
use ort::session::Session;
use ort::value::TensorRef;
use std::path::Path;
use std::sync::Mutex;

/// Name reported in `model_used`.
pub const ENGINE: &str = "atelier-swap";

/// What a preprocessed identity brings to a swap.
pub struct IdentityFace {
    /// The 512×512 aligned crop and where its landmarks are.
    pub crop: RgbImage,
    pub landmarks: [[f32; 2]; 5],
    /// Unit identity embedding.
    pub embedding: Vec<f32>,
}

/// Produces the face to blend onto a photo's face, with its landmarks.
pub trait FaceSource: Send + Sync {
    /// What `model_used` reports.
    fn name(&self) -> String;
    fn face_for(
        &self,
        target: &RgbImage,
        face: &Face,
        identity: &IdentityFace,
    ) -> Result<(RgbImage, [[f32; 2]; 5]), TaskFailure>;
}

/// The built-in source: the identity's own aligned crop.
pub struct CropSource;

impl FaceSource for CropSource {
    fn name(&self) -> String {
        format!("{ENGINE} (scrfd + laplacian blend)")
    }

    fn face_for(
        &self,
        _: &RgbImage,
        _: &Face,
        identity: &IdentityFace,
    ) -> Result<(RgbImage, [[f32; 2]; 5]), TaskFailure> {
        Ok((identity.crop.clone(), identity.landmarks))
    }
}

/// Where the five landmarks sit in the 128×128 crop the common face-swap
/// models take (InsightFace's convention: the ArcFace template shifted by
/// 8 px to the right).
pub fn swap_template() -> [[f32; 2]; 5] {
    ARCFACE_TEMPLATE.map(|[x, y]| [x + 8.0, y])
}

/// An operator-installed face-swap model with the common signature: an
/// aligned face `[1,3,S,S]` in RGB [0,1] and an identity embedding `[1,D]`
/// in; the redrawn face `[1,3,S,S]` in [0,1] out. Inputs are told apart
/// by rank, whatever their names. Models that take a projected latent
/// rather than the embedding itself (InsightFace's 128×128 swapper wants
/// `normalize(embedding · emap)`) are given the matrix as a projection file.
pub struct OnnxSwapper {
    name: String,
    session: Mutex<Session>,
    target_input: String,
    source_input: String,
    output: String,
    pub(crate) size: u32,
    pub(crate) dims: usize,
    /// `rows`×`dims` matrix, row-major: latent = normalize(embedding · M).
    projection: Option<(usize, Vec<f32>)>,
}

/// Reads a projection matrix: little-endian f32, row-major, `rows`×`cols`
/// where `cols` is the model's embedding input size.
fn read_projection(path: &Path, cols: usize) -> Result<(usize, Vec<f32>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.is_empty() || bytes.len() % 4 != 0 || (bytes.len() / 4) % cols != 0 {
        return Err(format!(
            "{}: {} bytes is not a matrix of little-endian f32 with {cols} columns",
            path.display(),
            bytes.len()
        ));
    }
    let m: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if m.iter().any(|v| !v.is_finite()) {
        return Err(format!("{}: holds non-finite values", path.display()));
    }
    Ok((m.len() / cols, m))
}

impl OnnxSwapper {
    /// Loads the model at `path`, with the optional projection file.
    pub fn load(
        rt: &Runtime,
        path: &Path,
        projection: Option<&Path>,
    ) -> Result<OnnxSwapper, InferenceError> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "face_swap".into());
        let bad = |reason: String| InferenceError::Load {
            model: name.clone(),
            reason,
        };
        let (session, _) = rt.session(&name, path)?;
        let shape_of = |o: &ort::value::Outlet| -> Vec<i64> {
            o.dtype()
                .tensor_shape()
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default()
        };
        let inputs: Vec<(String, Vec<i64>)> = session
            .inputs()
            .iter()
            .map(|o| (o.name().to_string(), shape_of(o)))
            .collect();
        if inputs.len() != 2 {
            return Err(bad(format!(
                "a face-swap model takes 2 inputs (face, embedding), this one {}",
                inputs.len()
            )));
        }
        let target = inputs
            .iter()
            .find(|(_, s)| s.len() == 4)
            .ok_or_else(|| bad("no [1,3,S,S] face input".into()))?;
        let source = inputs
            .iter()
            .find(|(_, s)| s.len() == 2)
            .ok_or_else(|| bad("no [1,D] embedding input".into()))?;
        if target.1[1] > 0 && target.1[1] != 3 {
            return Err(bad(format!(
                "face input has {} channels, not 3",
                target.1[1]
            )));
        }
        let size = match (target.1[2], target.1[3]) {
            (h, w) if h > 0 && h == w => h as u32,
            (h, w) if h <= 0 && w <= 0 => 128,
            (h, w) => return Err(bad(format!("face input is {h}x{w}, not square"))),
        };
        let dims = if source.1[1] > 0 {
            source.1[1] as usize
        } else {
            512
        };
        let output = session
            .outputs()
            .first()
            .map(|o| o.name().to_string())
            .ok_or_else(|| bad("no output".into()))?;
        let projection = match projection {
            Some(p) => Some(read_projection(p, dims).map_err(bad)?),
            None => None,
        };
        tracing::info!(model = %name, size, dims, projected = projection.is_some(), "face-swap model loaded");
        Ok(OnnxSwapper {
            projection,
            target_input: target.0.clone(),
            source_input: source.0.clone(),
            name,
            session: Mutex::new(session),
            output,
            size,
            dims,
        })
    }

    /// The template scaled to this model's face size.
    fn template(&self) -> [[f32; 2]; 5] {
        let k = self.size as f32 / 128.0;
        swap_template().map(|[x, y]| [x * k, y * k])
    }

    fn run(&self, aligned: &RgbImage, embedding: &[f32]) -> Result<RgbImage, TaskFailure> {
        let fail =
            |e: String| TaskFailure::retryable(format!("face-swap model {}: {e}", self.name));
        let wanted = self
            .projection
            .as_ref()
            .map_or(self.dims, |(rows, _)| *rows);
        if embedding.len() != wanted {
            return Err(TaskFailure::permanent(format!(
                "the identity's embedding has {} values; the face-swap model {} takes {wanted}",
                embedding.len(),
                self.name,
            )));
        }
        let latent: Vec<f32> = match &self.projection {
            None => embedding.to_vec(),
            Some((_, m)) => {
                let mut out = vec![0.0f32; self.dims];
                for (r, e) in embedding.iter().enumerate() {
                    let row = &m[r * self.dims..(r + 1) * self.dims];
                    for (o, v) in out.iter_mut().zip(row) {
                        *o += e * v;
                    }
                }
                let n = out
                    .iter()
                    .map(|v| v * v)
                    .sum::<f32>()
                    .sqrt()
                    .max(f32::EPSILON);
                out.into_iter().map(|v| v / n).collect()
            }
        };
        let n = self.size as usize;
        let mut x = Array4::<f32>::zeros((1, 3, n, n));
        for (px, py, p) in aligned.enumerate_pixels() {
            for c in 0..3 {
                x[[0, c, py as usize, px as usize]] = f32::from(p[c]) / 255.0;
            }
        }
        let e = Array2::from_shape_vec((1, self.dims), latent).map_err(|e| fail(e.to_string()))?;
        let mut session = self
            .session
            .lock()
            .map_err(|_| fail("session lock poisoned".into()))?;
        let tx = TensorRef::from_array_view(x.view()).map_err(|e| fail(e.to_string()))?;
        let te = TensorRef::from_array_view(e.view()).map_err(|e| fail(e.to_string()))?;
        let outputs = session
            .run(ort::inputs![self.target_input.as_str() => tx, self.source_input.as_str() => te])
            .map_err(|e| fail(e.to_string()))?;
        let y = outputs
            .get(self.output.as_str())
            .ok_or_else(|| fail(format!("no output named {}", self.output)))?
            .try_extract_array::<f32>()
            .map_err(|e| fail(e.to_string()))?;
        if y.shape() != [1, 3, n, n] {
            return Err(fail(format!(
                "output shape {:?}, expected [1, 3, {n}, {n}]",
                y.shape()
            )));
        }
        Ok(RgbImage::from_fn(self.size, self.size, |u, v| {
            image::Rgb([0, 1, 2].map(|c| {
                (y[[0, c, v as usize, u as usize]] * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8
            }))
        }))
    }
}

impl FaceSource for OnnxSwapper {
    fn name(&self) -> String {
        format!("{ENGINE} (scrfd + onnx {} + laplacian blend)", self.name)
    }

    fn face_for(
        &self,
        target: &RgbImage,
        face: &Face,
        identity: &IdentityFace,
    ) -> Result<(RgbImage, [[f32; 2]; 5]), TaskFailure> {
        let template = self.template();
        let aligned = align::align_to(target, &face.landmarks, &template, self.size);
        Ok((self.run(&aligned, &identity.embedding)?, template))
    }
}
