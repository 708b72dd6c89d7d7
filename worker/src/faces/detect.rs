//! Face detection for identities and model swap: SCRFD (InsightFace's
//! detector, `models/scrfd.onnx`) finds faces with a box and five landmarks
//! (left eye, right eye, nose, left and right mouth corner, image left and
//! right).
//!
//! The graph takes a 640×640 letterboxed RGB image normalised as
//! `(pixel - 127.5) / 128` and answers, per stride 8, 16 and 32, sigmoid
//! scores, box distances and landmark offsets for two anchors per grid
//! cell (layout in `models/manifest.toml`). Decoding, thresholding and
//! non-maximum suppression happen here, in image coordinates.

use crate::inference::{InferenceError, Model, ModelOptions, Runtime, load_shared_outputs};
use image::RgbImage;
use ndarray::Array4;
use std::path::Path;
use std::sync::Arc;

/// The detector's input side.
const SIZE: u32 = 640;
const STRIDES: [usize; 3] = [8, 16, 32];
/// Output heads in the order the decoder reads them.
pub const SCRFD_OUTPUTS: [&str; 9] = [
    "score_8", "score_16", "score_32", "bbox_8", "bbox_16", "bbox_32", "kps_8", "kps_16", "kps_32",
];
/// Overlap above which the weaker of two detections is dropped.
const NMS_IOU: f32 = 0.4;

/// One detected face, in the pixel coordinates of the analysed image.
#[derive(Debug, Clone, PartialEq)]
pub struct Face {
    /// `[x0, y0, x1, y1]`.
    pub bbox: [f32; 4],
    pub score: f32,
    /// Left eye, right eye, nose, left mouth corner, right mouth corner.
    pub landmarks: [[f32; 2]; 5],
}

impl Face {
    pub fn width(&self) -> f32 {
        self.bbox[2] - self.bbox[0]
    }

    pub fn height(&self) -> f32 {
        self.bbox[3] - self.bbox[1]
    }
}

pub struct FaceDetector {
    model: Arc<Model>,
}

impl FaceDetector {
    /// Loads SCRFD from `path` (once per process).
    pub fn load(
        rt: &Runtime,
        path: &Path,
        opts: ModelOptions,
    ) -> Result<FaceDetector, InferenceError> {
        Ok(FaceDetector {
            model: load_shared_outputs(rt, "scrfd", path, opts, &SCRFD_OUTPUTS)?,
        })
    }

    /// Faces scoring at least `threshold` (0.5 is a good default), best
    /// first. Blocks: call from the blocking pool.
    pub fn detect(&self, img: &RgbImage, threshold: f32) -> Result<Vec<Face>, InferenceError> {
        let (input, scale) = letterbox(img);
        let heads = self.model.run_all(input.into_dyn())?;
        let flat: Vec<Vec<f32>> = heads.iter().map(|h| h.iter().copied().collect()).collect();
        let mut faces = decode(&flat, threshold).map_err(|reason| InferenceError::Run {
            model: "scrfd".into(),
            reason,
        })?;
        for f in &mut faces {
            for v in &mut f.bbox {
                *v /= scale;
            }
            for p in &mut f.landmarks {
                p[0] /= scale;
                p[1] /= scale;
            }
        }
        Ok(faces)
    }
}

/// The image scaled so its longer side is 640, at the top-left of a black
/// 640×640 canvas, normalised; and the scale used.
fn letterbox(img: &RgbImage) -> (Array4<f32>, f32) {
    let (w, h) = img.dimensions();
    let scale = SIZE as f32 / w.max(h).max(1) as f32;
    let nw = ((w as f32 * scale).round() as u32).clamp(1, SIZE);
    let nh = ((h as f32 * scale).round() as u32).clamp(1, SIZE);
    let resized = image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle);
    let side = SIZE as usize;
    // Black padding, normalised like every other pixel.
    let mut x = Array4::<f32>::from_elem((1, 3, side, side), -127.5 / 128.0);
    for (px, py, p) in resized.enumerate_pixels() {
        for c in 0..3 {
            x[[0, c, py as usize, px as usize]] = (f32::from(p[c]) - 127.5) / 128.0;
        }
    }
    (x, scale)
}

/// Decodes the nine heads (in [`SCRFD_OUTPUTS`] order, flattened) into
/// faces in letterbox coordinates, after non-maximum suppression.
fn decode(heads: &[Vec<f32>], threshold: f32) -> Result<Vec<Face>, String> {
    if heads.len() != 9 {
        return Err(format!("expected 9 output heads, got {}", heads.len()));
    }
    let mut found = Vec::new();
    for (i, &stride) in STRIDES.iter().enumerate() {
        let grid = SIZE as usize / stride;
        let anchors = grid * grid * 2;
        let (scores, boxes, kps) = (&heads[i], &heads[3 + i], &heads[6 + i]);
        if scores.len() != anchors || boxes.len() != anchors * 4 || kps.len() != anchors * 10 {
            return Err(format!(
                "stride {stride}: heads of {}/{}/{} values, expected {anchors}/{}/{}",
                scores.len(),
                boxes.len(),
                kps.len(),
                anchors * 4,
                anchors * 10
            ));
        }
        let s = stride as f32;
        for (idx, &score) in scores.iter().enumerate() {
            if score < threshold {
                continue;
            }
            let cell = idx / 2;
            let (cx, cy) = ((cell % grid) as f32 * s, (cell / grid) as f32 * s);
            let b = &boxes[idx * 4..idx * 4 + 4];
            let k = &kps[idx * 10..idx * 10 + 10];
            let mut landmarks = [[0.0f32; 2]; 5];
            for (j, l) in landmarks.iter_mut().enumerate() {
                *l = [cx + k[j * 2] * s, cy + k[j * 2 + 1] * s];
            }
            found.push(Face {
                bbox: [cx - b[0] * s, cy - b[1] * s, cx + b[2] * s, cy + b[3] * s],
                score,
                landmarks,
            });
        }
    }
    Ok(non_maximum_suppression(found, NMS_IOU))
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// Keeps the best of every group of boxes overlapping more than `limit`.
fn non_maximum_suppression(mut faces: Vec<Face>, limit: f32) -> Vec<Face> {
    faces.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Face> = Vec::new();
    for f in faces {
        if kept.iter().all(|k| iou(&k.bbox, &f.bbox) <= limit) {
            kept.push(f);
        }
    }
    kept
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::inference::default_models_dir;

    fn face(bbox: [f32; 4], score: f32) -> Face {
        Face {
            bbox,
            score,
            landmarks: [[0.0; 2]; 5],
        }
    }

    #[test]
    fn suppression_keeps_the_best_of_overlapping_boxes() {
        let kept = non_maximum_suppression(
            vec![
                face([0.0, 0.0, 10.0, 10.0], 0.6),
                face([1.0, 1.0, 11.0, 11.0], 0.9),
                face([50.0, 50.0, 60.0, 60.0], 0.7),
            ],
            0.4,
        );
        let scores: Vec<f32> = kept.iter().map(|f| f.score).collect();
        assert_eq!(scores, vec![0.9, 0.7]);
    }

    #[test]
    fn decoding_places_boxes_and_landmarks_on_the_anchor_grid() {
        // One confident anchor: stride 8, cell (col 3, row 2), second anchor.
        let mut heads: Vec<Vec<f32>> = Vec::new();
        for &s in &STRIDES {
            heads.push(vec![0.0; (SIZE as usize / s).pow(2) * 2]);
        }
        for &s in &STRIDES {
            heads.push(vec![1.0; (SIZE as usize / s).pow(2) * 2 * 4]);
        }
        for &s in &STRIDES {
            heads.push(vec![0.5; (SIZE as usize / s).pow(2) * 2 * 10]);
        }
        let idx = (2 * 80 + 3) * 2 + 1;
        heads[0][idx] = 0.95;
        let faces = decode(&heads, 0.5).expect("decodes");
        assert_eq!(faces.len(), 1);
        let f = &faces[0];
        // Centre (24, 16); distances of 1 stride (8 px) each side.
        assert_eq!(f.bbox, [16.0, 8.0, 32.0, 24.0]);
        assert_eq!(f.landmarks[0], [28.0, 20.0]);
        assert!(decode(&heads[..8], 0.5).is_err(), "missing head");
    }

    pub(crate) fn detector() -> FaceDetector {
        let dir = default_models_dir();
        let rt = crate::inference::test_runtime();
        FaceDetector::load(&rt, &dir.join("scrfd.onnx"), ModelOptions::default())
            .expect("SCRFD (scripts/fetch-models)")
    }

    pub(crate) fn photo(path: &str) -> RgbImage {
        let dir = default_models_dir();
        image::open(dir.join(path)).expect("test photo").to_rgb8()
    }

    #[test]
    fn the_real_detector_finds_the_one_face_of_a_portrait_and_none_on_a_garment() {
        let det = detector();
        let faces = det
            .detect(&photo("testdata/newton.png"), 0.5)
            .expect("runs");
        assert_eq!(faces.len(), 1, "{faces:?}");
        let f = &faces[0];
        // The scrfd package's own expectation for this photo (its tests):
        // score 0.818, box (334.9, 89.2, 438.6, 232.9).
        let truth = [334.9, 89.2, 438.6, 232.9];
        for (got, want) in f.bbox.iter().zip(truth) {
            assert!((got - want).abs() < 8.0, "box {:?} vs {truth:?}", f.bbox);
        }
        assert!(f.score > 0.7, "{}", f.score);
        // Eyes above the nose, nose above the mouth, left eye left of right.
        let [le, re, nose, lm, rm] = f.landmarks;
        assert!(le[0] < re[0] && lm[0] < rm[0]);
        assert!(le[1] < nose[1] && re[1] < nose[1] && nose[1] < lm[1] && nose[1] < rm[1]);
        for p in f.landmarks {
            assert!(p[0] > f.bbox[0] && p[0] < f.bbox[2] && p[1] > f.bbox[1] && p[1] < f.bbox[3]);
        }
        let garment = image::open(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/garment.jpg"),
        )
        .expect("garment photo")
        .to_rgb8();
        assert!(det.detect(&garment, 0.5).expect("runs").is_empty());
    }
}
