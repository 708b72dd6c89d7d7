//! Face alignment and identity embeddings: [`align`] maps a detected face
//! onto the 112×112 ArcFace template by the least-squares similarity
//! transform of its landmarks; [`FaceEmbedder`] turns an aligned face into
//! a unit 512-d identity embedding (the mean of the face and its mirror
//! image, so a flipped photo gives the same identity), compared by cosine.

use super::detect::Face;
use crate::inference::{InferenceError, Model, ModelOptions, Runtime};
use image::RgbImage;
use ndarray::Array4;
use std::path::Path;
use std::sync::Arc;

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

/// Where the five landmarks sit in a point-of-view image of `size`² (an
/// identity's photo normalised, contract §5.8): the face's 112 px box takes
/// 30 % of the side, centred across and a little above the middle, so the
/// hair above it and the shoulders below it stay in the picture.
pub fn pov_template(size: u32) -> [[f32; 2]; 5] {
    let side = size as f32;
    let s = side / ALIGNED_SIZE as f32 * 0.3;
    let half = ALIGNED_SIZE as f32 / 2.0 * s;
    let (ox, oy) = (side / 2.0 - half, side * 0.42 - half);
    ARCFACE_TEMPLATE.map(|[x, y]| [x * s + ox, y * s + oy])
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
    use crate::faces::detect::FaceDetector;
    use crate::faces::detect::tests::{detector, photo};
    use crate::inference::default_models_dir;

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
}
