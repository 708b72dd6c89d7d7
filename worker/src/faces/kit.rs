//! The face models a worker loads once: detector, embedder and the
//! optional face-swap model, with the face checks every build and swap use.

use super::align::FaceEmbedder;
use super::detect::{Face, FaceDetector};
use super::swapper::OnnxSwapper;
use crate::failure::TaskFailure;
use crate::inference::{InferenceError, ModelOptions, Runtime};
use image::RgbImage;
use std::path::Path;
use std::sync::Arc;

/// A second face at least this large (relative area) makes a photo ambiguous.
const SECOND_FACE_AREA: f32 = 0.3;

/// The face models a worker serving `identity` and `swap` loads once.
pub struct FaceKit {
    pub detector: FaceDetector,
    pub embedder: FaceEmbedder,
    /// `models.face_swap`: draws swapped faces instead of the identity crop.
    pub swapper: Option<Arc<OnnxSwapper>>,
    pub min_face_px: f32,
    pub min_score: f32,
}

impl FaceKit {
    /// Loads the configured face models. Blocking: call from the blocking pool.
    pub fn from_config(cfg: &atelier_shared::config::Config) -> Result<FaceKit, InferenceError> {
        let rt = crate::inference::runtime_for(cfg)?;
        FaceKit::load(&rt, cfg, ModelOptions::from_config(cfg))
    }

    pub fn load(
        rt: &Arc<Runtime>,
        cfg: &atelier_shared::config::Config,
        opts: ModelOptions,
    ) -> Result<FaceKit, InferenceError> {
        let dir: &Path = &cfg.models.dir;
        let swapper = if cfg.models.face_swap.is_empty() {
            None
        } else {
            let projection = (!cfg.models.face_swap_projection.is_empty())
                .then(|| dir.join(&cfg.models.face_swap_projection));
            Some(Arc::new(OnnxSwapper::load(
                rt,
                &dir.join(&cfg.models.face_swap),
                projection.as_deref(),
            )?))
        };
        Ok(FaceKit {
            detector: FaceDetector::load(rt, &dir.join(&cfg.models.face_detector), opts)?,
            embedder: FaceEmbedder::load(rt, &dir.join(&cfg.models.face_embedder), opts)?,
            swapper,
            min_face_px: cfg.identity.min_face_px as f32,
            min_score: cfg.identity.min_face_score,
        })
    }

    /// The one face of a photo, or why there is none usable. `strict`
    /// (identity uploads) refuses any second clear face; otherwise the
    /// largest face wins unless another is nearly as large.
    pub fn single_face(&self, img: &RgbImage) -> Result<Face, TaskFailure> {
        let faces = self
            .detector
            .detect(img, self.min_score)
            .map_err(|e| TaskFailure::retryable(format!("face detector: {e}")))?;
        let Some(largest) = faces
            .iter()
            .max_by(|a, b| area(a).total_cmp(&area(b)))
            .cloned()
        else {
            return Err(TaskFailure::permanent("no face detected"));
        };
        let others = faces
            .iter()
            .filter(|f| *f != &largest && area(f) >= SECOND_FACE_AREA * area(&largest))
            .count();
        if others > 0 {
            return Err(TaskFailure::permanent(format!(
                "several faces detected ({}); use a photo of one person",
                others + 1
            )));
        }
        let side = largest.width().min(largest.height());
        if side < self.min_face_px {
            return Err(TaskFailure::permanent(format!(
                "face too small ({side:.0} px; at least {:.0} px)",
                self.min_face_px
            )));
        }
        Ok(largest)
    }
}

pub(crate) fn area(f: &Face) -> f32 {
    f.width().max(0.0) * f.height().max(0.0)
}
