//! Model swap: the built-in `atelier` swap engine puts an identity's face
//! on the model of a product photo and leaves everything else as it was.
//!
//! 1. SCRFD finds the model's face (the largest one) and its landmarks.
//! 2. The identity's 512×512 aligned crop is mapped onto it by the
//!    similarity transform of the two landmark sets.
//! 3. A feathered elliptical face mask (built in the crop's upright frame,
//!    so it turns and scales with the face) says where the new face goes.
//! 4. The new face's colours are matched to the old face's (per-channel
//!    mean and spread under the mask), so skin tone and lighting follow
//!    the photo.
//! 5. Laplacian-pyramid blending joins them: coarse levels mix over a wide
//!    band (no visible seam in shading), fine levels over a narrow one
//!    (no ghosting of edges).
//!
//! Only a region of interest around the face is touched: every pixel
//! outside it is copied unchanged, so the garment stays as photographed.
//!
//! Where the new face comes from is a [`FaceSource`] ([`super::swapper`]):
//! the identity's own aligned crop or an operator's face-swap model.
//! Steps 3–5 are the same for both.

use super::align;
use super::detect::Face;
use super::kit::FaceKit;
use super::swapper::{CropSource, FaceSource, IdentityFace};
use crate::failure::TaskFailure;
use image::RgbImage;

/// Where the swap went, for the result's `input_description`.
#[derive(Debug, Clone, PartialEq)]
pub struct Swapped {
    pub image: RgbImage,
    pub face: Face,
    pub faces_found: usize,
    /// `[x0, y0, x1, y1)` of the pixels that may differ from the input.
    pub region: [u32; 4],
}

/// A single-channel float image.
#[derive(Clone)]
struct Plane {
    w: usize,
    h: usize,
    v: Vec<f32>,
}

impl Plane {
    fn new(w: usize, h: usize) -> Plane {
        Plane {
            w,
            h,
            v: vec![0.0; w * h],
        }
    }

    fn at(&self, x: usize, y: usize) -> f32 {
        self.v[y * self.w + x]
    }

    /// Separable [1 4 6 4 1]/16 blur with clamped edges.
    fn blur(&self) -> Plane {
        self.blur_pass(true).blur_pass(false)
    }

    /// One direction of [`Plane::blur`]: along rows or along columns.
    fn blur_pass(&self, along_rows: bool) -> Plane {
        const K: [f32; 5] = [1.0 / 16.0, 4.0 / 16.0, 6.0 / 16.0, 4.0 / 16.0, 1.0 / 16.0];
        let mut out = Plane::new(self.w, self.h);
        let clamp = |i: usize, k: usize, n: usize| {
            (i as isize + k as isize - 2).clamp(0, n as isize - 1) as usize
        };
        for y in 0..self.h {
            for x in 0..self.w {
                let mut s = 0.0;
                for (k, wgt) in K.iter().enumerate() {
                    s += wgt
                        * if along_rows {
                            self.at(clamp(x, k, self.w), y)
                        } else {
                            self.at(x, clamp(y, k, self.h))
                        };
                }
                out.v[y * self.w + x] = s;
            }
        }
        out
    }

    fn down(&self) -> Plane {
        let b = self.blur();
        let (w, h) = (self.w.div_ceil(2), self.h.div_ceil(2));
        let mut out = Plane::new(w, h);
        for y in 0..h {
            for x in 0..w {
                out.v[y * w + x] = b.at((2 * x).min(self.w - 1), (2 * y).min(self.h - 1));
            }
        }
        out
    }

    /// Bilinear enlargement to `w`×`h`.
    fn up(&self, w: usize, h: usize) -> Plane {
        let mut out = Plane::new(w, h);
        for y in 0..h {
            let fy = ((y as f32 + 0.5) / 2.0 - 0.5).clamp(0.0, (self.h - 1) as f32);
            let (y0, ty) = (fy.floor() as usize, fy - fy.floor());
            let y1 = (y0 + 1).min(self.h - 1);
            for x in 0..w {
                let fx = ((x as f32 + 0.5) / 2.0 - 0.5).clamp(0.0, (self.w - 1) as f32);
                let (x0, tx) = (fx.floor() as usize, fx - fx.floor());
                let x1 = (x0 + 1).min(self.w - 1);
                let top = self.at(x0, y0) * (1.0 - tx) + self.at(x1, y0) * tx;
                let bottom = self.at(x0, y1) * (1.0 - tx) + self.at(x1, y1) * tx;
                out.v[y * w + x] = top * (1.0 - ty) + bottom * ty;
            }
        }
        out
    }
}

/// Laplacian-pyramid blend of `a` (where `mask` is 1) over `b`.
fn pyramid_blend(a: &Plane, b: &Plane, mask: &Plane, levels: usize) -> Plane {
    let (mut ga, mut gb, mut gm) = (vec![a.clone()], vec![b.clone()], vec![mask.clone()]);
    for _ in 0..levels {
        let (na, nb, nm) = (
            ga.last().map(Plane::down),
            gb.last().map(Plane::down),
            gm.last().map(Plane::down),
        );
        match (na, nb, nm) {
            (Some(na), Some(nb), Some(nm)) => {
                ga.push(na);
                gb.push(nb);
                gm.push(nm);
            }
            _ => break,
        }
    }
    let top = ga.len() - 1;
    // The coarsest level blends the images themselves.
    let mut out = Plane::new(ga[top].w, ga[top].h);
    for i in 0..out.v.len() {
        let m = gm[top].v[i];
        out.v[i] = m * ga[top].v[i] + (1.0 - m) * gb[top].v[i];
    }
    for l in (0..top).rev() {
        let (w, h) = (ga[l].w, ga[l].h);
        let (ua, ub) = (ga[l + 1].up(w, h), gb[l + 1].up(w, h));
        let mut next = out.up(w, h);
        for i in 0..next.v.len() {
            let m = gm[l].v[i];
            let la = ga[l].v[i] - ua.v[i];
            let lb = gb[l].v[i] - ub.v[i];
            next.v[i] += m * la + (1.0 - m) * lb;
        }
        out = next;
    }
    out
}

fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// The face ellipse in the crop's upright frame: centre and radii from the
/// landmarks (eyes, nose, mouth), in crop pixels.
fn face_ellipse(l: &[[f32; 2]; 5]) -> ([f32; 2], f32, f32) {
    let iod = ((l[1][0] - l[0][0]).powi(2) + (l[1][1] - l[0][1]).powi(2)).sqrt();
    let eyes_y = (l[0][1] + l[1][1]) / 2.0;
    let mouth_y = (l[3][1] + l[4][1]) / 2.0;
    let cx = l.iter().map(|p| p[0]).sum::<f32>() / 5.0;
    let cy = (eyes_y + mouth_y) / 2.0;
    (
        [cx, cy],
        iod * 1.05,
        (mouth_y - eyes_y).max(iod * 0.5) * 1.75,
    )
}

/// Mask weight at a crop point: 1 in the inner face, feathered to 0 at the
/// ellipse's edge.
fn mask_at(centre: [f32; 2], rx: f32, ry: f32, u: f32, v: f32) -> f32 {
    let r = (((u - centre[0]) / rx).powi(2) + ((v - centre[1]) / ry).powi(2)).sqrt();
    1.0 - smoothstep(0.7, 1.0, r)
}

/// Swaps the largest face of `target` for `identity`, drawn by the kit's
/// face source. `equalise` is the post-processing pass (skin equalisation
/// inside the face). Returns the result and the source's name.
pub fn swap_face(
    kit: &FaceKit,
    target: &RgbImage,
    identity: &IdentityFace,
    equalise: bool,
) -> Result<(Swapped, String), TaskFailure> {
    let faces = kit
        .detector
        .detect(target, kit.min_score)
        .map_err(|e| TaskFailure::retryable(format!("face detector: {e}")))?;
    let Some(face) = faces
        .iter()
        .max_by(|a, b| (a.width() * a.height()).total_cmp(&(b.width() * b.height())))
        .cloned()
    else {
        return Err(TaskFailure::permanent(
            "no face detected in the product photo; model swap needs a visible face",
        ));
    };
    let source: &dyn FaceSource = match &kit.swapper {
        Some(s) => s.as_ref(),
        None => &CropSource,
    };
    let (new_face, landmarks) = source.face_for(target, &face, identity)?;
    Ok((
        blend_onto(target, &face, &new_face, &landmarks, equalise, faces.len()),
        source.name(),
    ))
}

/// Steps 2–5 for a known target face (no model involved).
pub fn blend_onto(
    target: &RgbImage,
    face: &Face,
    crop: &RgbImage,
    crop_landmarks: &[[f32; 2]; 5],
    equalise: bool,
    faces_found: usize,
) -> Swapped {
    let to_target = align::similarity(crop_landmarks, &face.landmarks);
    let to_crop = align::invert(&to_target);
    let (centre, rx, ry) = face_ellipse(crop_landmarks);

    // Region of interest: the ellipse's box in the photo plus a margin wide
    // enough for the pyramid's coarsest level.
    let levels = 4usize;
    let margin = (8 << levels) as f32 / 2.0;
    let corners = [
        (centre[0] - rx, centre[1] - ry),
        (centre[0] + rx, centre[1] - ry),
        (centre[0] - rx, centre[1] + ry),
        (centre[0] + rx, centre[1] + ry),
    ]
    .map(|(u, v)| align::apply(&to_target, u, v));
    let (tw, th) = (target.width() as f32, target.height() as f32);
    let x0 = (corners.iter().map(|c| c.0).fold(f32::MAX, f32::min) - margin).clamp(0.0, tw) as u32;
    let y0 = (corners.iter().map(|c| c.1).fold(f32::MAX, f32::min) - margin).clamp(0.0, th) as u32;
    let x1 = (corners.iter().map(|c| c.0).fold(f32::MIN, f32::max) + margin)
        .ceil()
        .clamp(0.0, tw) as u32;
    let y1 = (corners.iter().map(|c| c.1).fold(f32::MIN, f32::max) + margin)
        .ceil()
        .clamp(0.0, th) as u32;
    let mut out = target.clone();
    let (w, h) = ((x1 - x0) as usize, (y1 - y0) as usize);
    if w < 4 || h < 4 {
        return Swapped {
            image: out,
            face: face.clone(),
            faces_found,
            region: [x0, y0, x0, y0],
        };
    }

    // The identity's face warped into the region, and the mask.
    let mut src = [Plane::new(w, h), Plane::new(w, h), Plane::new(w, h)];
    let mut dst = [Plane::new(w, h), Plane::new(w, h), Plane::new(w, h)];
    let mut mask = Plane::new(w, h);
    for y in 0..h {
        for x in 0..w {
            let (px, py) = (x0 as usize + x, y0 as usize + y);
            let p = target.get_pixel(px as u32, py as u32).0;
            let (u, v) = align::apply(&to_crop, px as f32, py as f32);
            let s = align::sample(crop, u, v);
            let m = if s.is_some() {
                mask_at(centre, rx, ry, u, v)
            } else {
                0.0
            };
            let s = s.unwrap_or([f32::from(p[0]), f32::from(p[1]), f32::from(p[2])]);
            let i = y * w + x;
            mask.v[i] = m;
            for c in 0..3 {
                src[c].v[i] = s[c];
                dst[c].v[i] = f32::from(p[c]);
            }
        }
    }

    // Colour transfer under the inner mask: the new face takes the photo's
    // skin tone and light.
    let inner: Vec<usize> = (0..w * h).filter(|&i| mask.v[i] > 0.5).collect();
    if inner.len() > 16 {
        for c in 0..3 {
            let stats = |p: &Plane| {
                let n = inner.len() as f32;
                let mean = inner.iter().map(|&i| p.v[i]).sum::<f32>() / n;
                let var = inner.iter().map(|&i| (p.v[i] - mean).powi(2)).sum::<f32>() / n;
                (mean, var.sqrt().max(1.0))
            };
            let ((ms, ss), (mt, st)) = (stats(&src[c]), stats(&dst[c]));
            let k = (st / ss).clamp(0.6, 1.6);
            for v in &mut src[c].v {
                *v = (*v - ms) * k + mt;
            }
        }
    }

    let mut blended: Vec<Plane> = (0..3)
        .map(|c| pyramid_blend(&src[c], &dst[c], &mask, levels))
        .collect();
    if equalise {
        // Skin equalisation: soften blotches and pores inside the face.
        for p in &mut blended {
            let soft = p.blur().blur();
            for i in 0..p.v.len() {
                let k = 0.45 * mask.v[i];
                p.v[i] = p.v[i] * (1.0 - k) + soft.v[i] * k;
            }
        }
    }
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let px = image::Rgb([0, 1, 2].map(|c| blended[c].v[i].round().clamp(0.0, 255.0) as u8));
            out.put_pixel(x0 + x as u32, y0 + y as u32, px);
        }
    }
    Swapped {
        image: out,
        face: face.clone(),
        faces_found,
        region: [x0, y0, x1, y1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faces::align as face;
    use crate::faces::swapper::swap_template;

    fn gradient(w: u32, h: u32, seed: u8) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                ((x * 3 + y) % 256) as u8,
                ((y * 2 + u32::from(seed)) % 256) as u8,
                ((x + y * 5) % 256) as u8,
            ])
        })
    }

    #[test]
    fn an_onnx_swap_model_redraws_the_aligned_face_with_the_embedding() {
        use crate::faces::identity::tests::{kit, photo};
        use crate::faces::swapper::OnnxSwapper;
        let dir = crate::inference::default_models_dir();
        let rt = crate::inference::test_runtime();
        let swapper = OnnxSwapper::load(&rt, &dir.join("test/swap_invert.onnx"), None)
            .expect("generated test model (scripts/fetch-models --test-models)");
        assert_eq!((swapper.size, swapper.dims), (128, 512));
        // The model inverts the face and adds the embedding's mean: a
        // constant embedding of 0.1 brightens the inverted face by 25 levels.
        let target = photo("newton.png").to_rgb8();
        let face = kit().single_face(&target).expect("a face");
        let identity = IdentityFace {
            crop: RgbImage::new(512, 512),
            landmarks: face::crop_template(),
            embedding: vec![0.1; 512],
        };
        let (drawn, landmarks) = swapper.face_for(&target, &face, &identity).expect("runs");
        assert_eq!(landmarks, swap_template());
        let aligned = face::align_to(&target, &face.landmarks, &swap_template(), 128);
        for (u, v) in [(64, 64), (40, 52), (90, 100)] {
            let (a, b) = (aligned.get_pixel(u, v), drawn.get_pixel(u, v));
            for c in 0..3 {
                let want = (255.0 - f32::from(a[c]) + 25.5).clamp(0.0, 255.0);
                assert!(
                    (f32::from(b[c]) - want).abs() <= 1.0,
                    "({u},{v}) channel {c}: {b:?} vs {a:?}"
                );
            }
        }
        let wrong = IdentityFace {
            embedding: vec![0.0; 128],
            ..identity
        };
        let e = swapper
            .face_for(&target, &face, &wrong)
            .err()
            .expect("refused");
        assert!(e.message.contains("128 values"), "{}", e.message);

        // With a projection (here every entry 1/512: any positive embedding
        // becomes the unit vector of equal entries, 1/sqrt(512) each), the
        // model sees the latent, not the embedding: +11.3 levels, not +25.5.
        let tmp = tempfile::tempdir().expect("tempdir");
        let m = tmp.path().join("emap.f32");
        std::fs::write(
            &m,
            (0..512 * 512)
                .flat_map(|_| (1.0f32 / 512.0).to_le_bytes())
                .collect::<Vec<u8>>(),
        )
        .expect("write");
        let projected =
            OnnxSwapper::load(&rt, &dir.join("test/swap_invert.onnx"), Some(&m)).expect("loads");
        let who = IdentityFace {
            crop: RgbImage::new(512, 512),
            landmarks: face::crop_template(),
            embedding: vec![0.1; 512],
        };
        let (drawn, _) = projected.face_for(&target, &face, &who).expect("runs");
        let shift = 255.0 / (512.0f32).sqrt();
        for (u, v) in [(64, 64), (40, 52)] {
            let (a, b) = (aligned.get_pixel(u, v), drawn.get_pixel(u, v));
            for c in 0..3 {
                let want = (255.0 - f32::from(a[c]) + shift).clamp(0.0, 255.0);
                assert!(
                    (f32::from(b[c]) - want).abs() <= 1.0,
                    "({u},{v}) channel {c}: {b:?} vs {a:?}"
                );
            }
        }
        std::fs::write(&m, [0u8; 12]).expect("write");
        let bad = OnnxSwapper::load(&rt, &dir.join("test/swap_invert.onnx"), Some(&m))
            .err()
            .expect("refused");
        assert!(bad.to_string().contains("512 columns"), "{bad}");

        // Through the whole swap: the face region is the inverse of the
        // photo's (negative correlation), everything far away is unchanged.
        let mut k = kit();
        k.swapper = Some(std::sync::Arc::new(swapper));
        let id = IdentityFace {
            embedding: vec![0.0; 512],
            ..wrong
        };
        let (s, engine) = swap_face(&k, &target, &id, false).expect("swaps");
        assert!(engine.contains("onnx swap_invert"), "{engine}");
        let grey = |p: &image::Rgb<u8>| (f32::from(p[0]) + f32::from(p[1]) + f32::from(p[2])) / 3.0;
        let [x0, y0, x1, y1] = face.bbox.map(|v| v as u32);
        let (cx, cy, hw, hh) = ((x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 5, (y1 - y0) / 5);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for y in cy - hh..cy + hh {
            for x in cx - hw..cx + hw {
                a.push(grey(target.get_pixel(x, y)));
                b.push(grey(s.image.get_pixel(x, y)));
            }
        }
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let (ma, mb) = (mean(&a), mean(&b));
        let cov: f32 = a.iter().zip(&b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let var = |v: &[f32], m: f32| v.iter().map(|x| (x - m).powi(2)).sum::<f32>().sqrt();
        let r = cov / (var(&a, ma) * var(&b, mb)).max(f32::EPSILON);
        assert!(
            r < -0.5,
            "correlation {r} between the photo's face and the swapped one"
        );
        assert_eq!(s.image.get_pixel(5, 5), target.get_pixel(5, 5));
    }

    #[test]
    fn pyramid_blend_reproduces_its_inputs_where_the_mask_is_flat() {
        let (w, h) = (64, 48);
        let a = Plane {
            w,
            h,
            v: (0..w * h).map(|i| (i % 97) as f32).collect(),
        };
        let b = Plane {
            w,
            h,
            v: (0..w * h).map(|i| (i % 31) as f32 * 2.0).collect(),
        };
        let ones = Plane {
            w,
            h,
            v: vec![1.0; w * h],
        };
        let zeros = Plane::new(w, h);
        let all_a = pyramid_blend(&a, &b, &ones, 4);
        let all_b = pyramid_blend(&a, &b, &zeros, 4);
        for i in 0..w * h {
            assert!((all_a.v[i] - a.v[i]).abs() < 1e-3, "a at {i}");
            assert!((all_b.v[i] - b.v[i]).abs() < 1e-3, "b at {i}");
        }
    }

    #[test]
    fn only_the_face_region_changes() {
        let target = gradient(400, 600, 0);
        // A checkerboard "face": its texture survives the colour transfer.
        let crop = RgbImage::from_fn(512, 512, |x, y| {
            let v = if (x / 32 + y / 32) % 2 == 0 { 230 } else { 20 };
            image::Rgb([v, v, v])
        });
        let landmarks = face::crop_template();
        // A face about 100 px wide around (200, 150).
        let to = landmarks.map(|[x, y]| [(x - 256.0) * 0.5 + 200.0, (y - 256.0) * 0.5 + 150.0]);
        let face = Face {
            bbox: [150.0, 90.0, 250.0, 220.0],
            score: 0.9,
            landmarks: to,
        };
        let s = blend_onto(&target, &face, &crop, &landmarks, false, 1);
        let [x0, y0, x1, y1] = s.region;
        assert!(x0 > 0 && y0 > 0 && x1 < 400 && y1 < 600, "{:?}", s.region);
        let mut inside_changed = 0;
        for (x, y, p) in s.image.enumerate_pixels() {
            let q = target.get_pixel(x, y);
            if x < x0 || x >= x1 || y < y0 || y >= y1 {
                assert_eq!(p, q, "pixel ({x}, {y}) outside the region changed");
            } else if p != q {
                inside_changed += 1;
            }
        }
        assert!(inside_changed > 2000, "{inside_changed} pixels changed");
        // Around the face centre the identity's texture replaced the photo's.
        let mut diff = 0.0;
        let mut n = 0.0;
        for y in 130..170 {
            for x in 180..220 {
                let (p, q) = (s.image.get_pixel(x, y), target.get_pixel(x, y));
                diff += (0..3)
                    .map(|c| (f32::from(p[c]) - f32::from(q[c])).abs())
                    .sum::<f32>()
                    / 3.0;
                n += 1.0;
            }
        }
        assert!(
            diff / n > 20.0,
            "mean difference {} at the face centre",
            diff / n
        );
    }
}
