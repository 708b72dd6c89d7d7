//! Face analysis for identities and model swap: SCRFD (InsightFace's
//! detector, `models/scrfd.onnx`) finds faces with a box and five landmarks
//! (left eye, right eye, nose, left and right mouth corner, image left and
//! right); [`align`] maps a face onto the 112×112 ArcFace template by the
//! least-squares similarity transform of its landmarks; [`FaceEmbedder`]
//! turns an aligned face into a unit 512-d identity embedding (the mean of
//! the face and its mirror image, so a flipped photo gives the same
//! identity), compared by cosine.
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

/// Where ArcFace-style models expect the five landmarks in a 112×112 crop.
pub const ARCFACE_TEMPLATE: [[f32; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];
pub const ALIGNED_SIZE: u32 = 112;

/// The similarity transform (rotation, uniform scale, translation; no
/// reflection) that best maps `from` onto `to` in the least-squares sense,
/// as `[[a, -b, tx], [b, a, ty]]`.
pub fn similarity(from: &[[f32; 2]; 5], to: &[[f32; 2]; 5]) -> [[f32; 3]; 2] {
    let mean = |p: &[[f32; 2]; 5]| {
        let (x, y) = p.iter().fold((0.0, 0.0), |(x, y), q| (x + q[0], y + q[1]));
        [x / 5.0, y / 5.0]
    };
    let (mf, mt) = (mean(from), mean(to));
    let (mut dot, mut cross, mut norm) = (0.0f32, 0.0f32, 0.0f32);
    for (f, t) in from.iter().zip(to) {
        let (fx, fy) = (f[0] - mf[0], f[1] - mf[1]);
        let (tx, ty) = (t[0] - mt[0], t[1] - mt[1]);
        dot += fx * tx + fy * ty;
        cross += fx * ty - fy * tx;
        norm += fx * fx + fy * fy;
    }
    let (a, b) = if norm > 0.0 {
        (dot / norm, cross / norm)
    } else {
        (1.0, 0.0)
    };
    [
        [a, -b, mt[0] - (a * mf[0] - b * mf[1])],
        [b, a, mt[1] - (b * mf[0] + a * mf[1])],
    ]
}

/// The face cut out and aligned to [`ARCFACE_TEMPLATE`] (bilinear; black
/// outside the photo).
pub fn align(img: &RgbImage, face: &Face) -> RgbImage {
    align_to(img, &face.landmarks, &ARCFACE_TEMPLATE, ALIGNED_SIZE)
}

/// Side of the face crop an identity keeps (the face with forehead, chin
/// and some hair around it).
pub const CROP_SIZE: u32 = 512;

/// Where the five landmarks sit in a [`CROP_SIZE`] crop: the ArcFace
/// template scaled so that its 112 px box fills the central half.
pub fn crop_template() -> [[f32; 2]; 5] {
    let s = CROP_SIZE as f32 / ALIGNED_SIZE as f32 * 0.5;
    let o = CROP_SIZE as f32 / 2.0 - ALIGNED_SIZE as f32 / 2.0 * s;
    ARCFACE_TEMPLATE.map(|[x, y]| [x * s + o, y * s + o])
}

/// The `size`×`size` image in which `landmarks` of `img` land on `template`.
pub fn align_to(
    img: &RgbImage,
    landmarks: &[[f32; 2]; 5],
    template: &[[f32; 2]; 5],
    size: u32,
) -> RgbImage {
    let m = similarity(landmarks, template);
    let inv = invert(&m);
    RgbImage::from_fn(size, size, |u, v| {
        let (x, y) = apply(&inv, u as f32, v as f32);
        image::Rgb(
            sample(img, x, y)
                .unwrap_or([0.0; 3])
                .map(|c| c.round().clamp(0.0, 255.0) as u8),
        )
    })
}

/// Applies a similarity (or any affine) transform to a point.
pub fn apply(m: &[[f32; 3]; 2], x: f32, y: f32) -> (f32, f32) {
    (
        m[0][0] * x + m[0][1] * y + m[0][2],
        m[1][0] * x + m[1][1] * y + m[1][2],
    )
}

/// The inverse of a similarity transform `[[a, -b, tx], [b, a, ty]]`.
pub fn invert(m: &[[f32; 3]; 2]) -> [[f32; 3]; 2] {
    let (a, b) = (m[0][0], m[1][0]);
    let det = (a * a + b * b).max(f32::EPSILON);
    let (ia, ib) = (a / det, -b / det);
    // x = R^-1 (p - t)
    let (tx, ty) = (m[0][2], m[1][2]);
    [
        [ia, -ib, -(ia * tx - ib * ty)],
        [ib, ia, -(ib * tx + ia * ty)],
    ]
}

/// Bilinear sample of `img` at `(x, y)`; `None` outside the image.
pub fn sample(img: &RgbImage, x: f32, y: f32) -> Option<[f32; 3]> {
    let (w, h) = (img.width() as f32, img.height() as f32);
    if !(x >= 0.0 && y >= 0.0 && x <= w - 1.0 && y <= h - 1.0) {
        return None;
    }
    let (x0, y0) = (x.floor() as u32, y.floor() as u32);
    let (x1, y1) = (
        (x0 + 1).min(img.width() - 1),
        (y0 + 1).min(img.height() - 1),
    );
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let px = |xx, yy| img.get_pixel(xx, yy).0;
    let (p00, p10, p01, p11) = (px(x0, y0), px(x1, y0), px(x0, y1), px(x1, y1));
    let mut out = [0f32; 3];
    for c in 0..3 {
        let top = f32::from(p00[c]) * (1.0 - fx) + f32::from(p10[c]) * fx;
        let bottom = f32::from(p01[c]) * (1.0 - fx) + f32::from(p11[c]) * fx;
        out[c] = top * (1.0 - fy) + bottom * fy;
    }
    Some(out)
}

/// ArcFace-style identity embeddings (`models/arcface_faceplugin.onnx`).
pub struct FaceEmbedder {
    model: Arc<Model>,
}

impl FaceEmbedder {
    pub fn load(
        rt: &Runtime,
        path: &Path,
        opts: ModelOptions,
    ) -> Result<FaceEmbedder, InferenceError> {
        Ok(FaceEmbedder {
            model: crate::inference::load_shared(rt, "arcface", path, opts)?,
        })
    }

    /// The unit embedding of an aligned 112×112 face: the normalised sum of
    /// the embeddings of the face and of its mirror image. Blocks.
    pub fn embed(&self, aligned: &RgbImage) -> Result<Vec<f32>, InferenceError> {
        let mirrored = image::imageops::flip_horizontal(aligned);
        let mut sum = vec![0.0f32; 0];
        for face in [aligned, &mirrored] {
            let e = self.model.run(tensor(face).into_dyn())?;
            let e: Vec<f32> = e.iter().copied().collect();
            if sum.is_empty() {
                sum = vec![0.0; e.len()];
            }
            if e.len() != sum.len() {
                return Err(InferenceError::Run {
                    model: "arcface".into(),
                    reason: format!("embedding of {} values, expected {}", e.len(), sum.len()),
                });
            }
            let n = norm(&e);
            for (s, v) in sum.iter_mut().zip(&e) {
                *s += v / n;
            }
        }
        let n = norm(&sum);
        Ok(sum.into_iter().map(|v| v / n).collect())
    }
}

fn norm(v: &[f32]) -> f32 {
    v.iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON)
}

/// NCHW, RGB, `(pixel - 127) / 128` (the model's own preprocessing).
fn tensor(img: &RgbImage) -> Array4<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut x = Array4::<f32>::zeros((1, 3, h, w));
    for (px, py, p) in img.enumerate_pixels() {
        for c in 0..3 {
            x[[0, c, py as usize, px as usize]] = (f32::from(p[c]) - 127.0) / 128.0;
        }
    }
    x
}

/// Cosine similarity of two embeddings.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (norm(a) * norm(b))
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn the_similarity_transform_recovers_a_known_one() {
        // Rotate by 30°, scale 2, shift (5, -3).
        let (c, sn) = (
            30f32.to_radians().cos() * 2.0,
            30f32.to_radians().sin() * 2.0,
        );
        let to = ARCFACE_TEMPLATE.map(|p| [c * p[0] - sn * p[1] + 5.0, sn * p[0] + c * p[1] - 3.0]);
        let m = similarity(&ARCFACE_TEMPLATE, &to);
        for (got, want) in [m[0][0], m[1][0], m[0][2], m[1][2]]
            .iter()
            .zip([c, sn, 5.0, -3.0])
        {
            assert!((got - want).abs() < 1e-3, "{m:?}");
        }
    }

    fn detector() -> FaceDetector {
        let dir = default_models_dir();
        let rt = crate::inference::test_runtime();
        FaceDetector::load(&rt, &dir.join("scrfd.onnx"), ModelOptions::default())
            .expect("SCRFD (scripts/fetch-models)")
    }

    fn embedder() -> FaceEmbedder {
        let dir = default_models_dir();
        let rt = crate::inference::test_runtime();
        FaceEmbedder::load(
            &rt,
            &dir.join("arcface_faceplugin.onnx"),
            ModelOptions::default(),
        )
        .expect("face embedding model (scripts/fetch-models)")
    }

    fn identity_of(det: &FaceDetector, emb: &FaceEmbedder, img: &RgbImage) -> Vec<f32> {
        let faces = det.detect(img, 0.5).expect("detects");
        assert_eq!(faces.len(), 1, "{faces:?}");
        emb.embed(&align(img, &faces[0])).expect("embeds")
    }

    #[test]
    fn embeddings_agree_for_one_person_and_disagree_across_people() {
        let (det, emb) = (detector(), embedder());
        let newton = photo("testdata/newton.png");
        let e = identity_of(&det, &emb, &newton);
        assert_eq!(e.len(), 512);
        assert!((norm(&e) - 1.0).abs() < 1e-4);
        let flipped = image::imageops::flip_horizontal(&newton);
        let brighter = image::RgbImage::from_fn(newton.width(), newton.height(), |x, y| {
            image::Rgb(newton.get_pixel(x, y).0.map(|v| v.saturating_add(35)))
        });
        let same_flipped = cosine(&e, &identity_of(&det, &emb, &flipped));
        let same_brighter = cosine(&e, &identity_of(&det, &emb, &brighter));
        let other = cosine(&e, &identity_of(&det, &emb, &photo("testdata/gauss.png")));
        assert!(same_flipped >= 0.9, "flipped: {same_flipped}");
        assert!(same_brighter >= 0.9, "brighter: {same_brighter}");
        assert!(other < 0.4, "another person: {other}");
        eprintln!(
            "cosine: flipped {same_flipped:.3}, brighter {same_brighter:.3}, another person {other:.3}"
        );
    }

    fn photo(path: &str) -> RgbImage {
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
