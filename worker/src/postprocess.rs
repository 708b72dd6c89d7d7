//! The post-processing pass (`post_process: true`): colour consistency and
//! sharpening, applied to each rendered output before it is encoded.
//!
//! Colour consistency: every output of a job is pulled towards one reference,
//! the colour statistics of the garment in its source photo (per-channel mean
//! and spread in YCbCr, Reinhard-style). Variations and instructions that
//! started from the same photo therefore agree in colour even when an engine
//! (an upscaler, a generative route) drifted, and no output needs another
//! output to be finished first, so the pass runs inside the output's own
//! task and retries with it.
//!
//! Sharpening: an unsharp mask on luminance only (no colour fringes), with a
//! noise threshold, inside the garment region.
//!
//! Both steps are weighted by the garment region when the engine knows it
//! (the canvas outside it, a pure white background say, is never touched).

use image::{GrayImage, Luma, RgbaImage};

/// Weighted per-channel mean and standard deviation in YCbCr (BT.601, 0–255).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ColourStats {
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

/// What an engine hands the post-processing pass besides the image.
#[derive(Debug, Clone, Default)]
pub struct PostContext {
    /// Statistics to match: those of the garment in the source photo.
    pub reference: Option<ColourStats>,
    /// Where the garment is on the canvas (0 = background, 255 = garment);
    /// `None` treats the whole canvas as the subject.
    pub region: Option<GrayImage>,
}

impl PostContext {
    /// For engines that do not know where the garment is: the whole source
    /// photo is the reference and the whole canvas the region.
    pub fn whole_source(source: &image::DynamicImage) -> PostContext {
        PostContext {
            reference: colour_stats(&source.to_rgba8(), None),
            region: None,
        }
    }
}

/// Largest mean shift per channel the transfer applies, in levels: enough to
/// undo an engine's drift, not enough to repaint a garment.
const MAX_SHIFT: f64 = 48.0;
/// Bounds of the contrast gain per channel.
const GAIN: (f64, f64) = (0.75, 1.33);
/// Unsharp mask amount and noise threshold (levels of luminance).
const SHARPEN_AMOUNT: f32 = 0.6;
const SHARPEN_THRESHOLD: f32 = 2.0;

fn to_ycc(p: [u8; 3]) -> [f64; 3] {
    let [r, g, b] = p.map(f64::from);
    [
        0.299 * r + 0.587 * g + 0.114 * b,
        128.0 - 0.168_736 * r - 0.331_264 * g + 0.5 * b,
        128.0 + 0.5 * r - 0.418_688 * g - 0.081_312 * b,
    ]
}

fn to_rgb(c: [f64; 3]) -> [f64; 3] {
    let [y, cb, cr] = [c[0], c[1] - 128.0, c[2] - 128.0];
    [
        y + 1.402 * cr,
        y - 0.344_136 * cb - 0.714_136 * cr,
        y + 1.772 * cb,
    ]
}

/// Colour statistics of `img`, each pixel weighted by `weights` (same size)
/// or equally. Samples a grid of at most ~250,000 pixels. `None` when the
/// weights are (almost) all zero.
pub fn colour_stats(img: &RgbaImage, weights: Option<&GrayImage>) -> Option<ColourStats> {
    let (w, h) = img.dimensions();
    let step = (((u64::from(w) * u64::from(h)) as f64 / 250_000.0)
        .sqrt()
        .floor() as u32)
        .max(1);
    let (mut sw, mut s1, mut s2) = (0.0, [0.0; 3], [0.0; 3]);
    for y in (0..h).step_by(step as usize) {
        for x in (0..w).step_by(step as usize) {
            let wt = weights.map_or(1.0, |m| f64::from(m.get_pixel(x, y).0[0]) / 255.0);
            if wt <= 0.0 {
                continue;
            }
            let p = img.get_pixel(x, y).0;
            let c = to_ycc([p[0], p[1], p[2]]);
            sw += wt;
            for k in 0..3 {
                s1[k] += wt * c[k];
                s2[k] += wt * c[k] * c[k];
            }
        }
    }
    if sw < 16.0 {
        return None;
    }
    let mean = s1.map(|s| s / sw);
    let mut std = [0.0; 3];
    for k in 0..3 {
        std[k] = (s2[k] / sw - mean[k] * mean[k]).max(0.0).sqrt();
    }
    Some(ColourStats { mean, std })
}

/// What the pass did, for `input_description.post_processing`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PostReport {
    /// Mean shift applied per YCbCr channel (levels), `None` without a reference.
    pub colour_shift: Option<[f64; 3]>,
    pub contrast_gain: Option<[f64; 3]>,
    pub sharpen_sigma: f32,
    pub sharpen_amount: f32,
}

/// Runs the pass on `img` in place.
pub fn apply(img: &mut RgbaImage, ctx: &PostContext) -> PostReport {
    let region = ctx
        .region
        .as_ref()
        .filter(|r| r.dimensions() == img.dimensions());
    let (shift, gain) = match (ctx.reference, colour_stats(img, region)) {
        (Some(reference), Some(now)) => {
            let (shift, gain) = transfer(img, region, &now, &reference);
            (Some(shift), Some(gain))
        }
        _ => (None, None),
    };
    let (w, h) = img.dimensions();
    // About one pixel at 1K, scaled with the output so 4K gets the same look.
    let sigma = (0.9 * w.max(h) as f32 / 1024.0).clamp(0.6, 3.0);
    sharpen(img, region, sigma);
    let round = |a: [f64; 3]| a.map(|v| (v * 100.0).round() / 100.0);
    PostReport {
        colour_shift: shift.map(round),
        contrast_gain: gain.map(round),
        sharpen_sigma: sigma,
        sharpen_amount: SHARPEN_AMOUNT,
    }
}

/// Moves the region's statistics from `now` to `reference`.
fn transfer(
    img: &mut RgbaImage,
    region: Option<&GrayImage>,
    now: &ColourStats,
    reference: &ColourStats,
) -> ([f64; 3], [f64; 3]) {
    let mut shift = [0.0; 3];
    let mut gain = [1.0; 3];
    for k in 0..3 {
        shift[k] = (reference.mean[k] - now.mean[k]).clamp(-MAX_SHIFT, MAX_SHIFT);
        gain[k] = if now.std[k] > 1.0 {
            (reference.std[k] / now.std[k]).clamp(GAIN.0, GAIN.1)
        } else {
            1.0
        };
    }
    for (x, y, p) in img.enumerate_pixels_mut() {
        let wt = region.map_or(1.0, |m| f64::from(m.get_pixel(x, y).0[0]) / 255.0);
        if wt <= 0.0 {
            continue;
        }
        let c = to_ycc([p.0[0], p.0[1], p.0[2]]);
        let mut t = [0.0; 3];
        for k in 0..3 {
            let moved = (c[k] - now.mean[k]) * gain[k] + now.mean[k] + shift[k];
            t[k] = c[k] + wt * (moved - c[k]);
        }
        for (out, v) in p.0.iter_mut().zip(to_rgb(t)) {
            *out = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    (shift, gain)
}

/// Unsharp mask on luminance: Y += amount·(Y − blur(Y)) where the detail
/// exceeds the noise threshold; the chroma is left as it is.
fn sharpen(img: &mut RgbaImage, region: Option<&GrayImage>, sigma: f32) {
    let (w, h) = img.dimensions();
    let luma = GrayImage::from_fn(w, h, |x, y| {
        let p = img.get_pixel(x, y).0;
        Luma([to_ycc([p[0], p[1], p[2]])[0].round().clamp(0.0, 255.0) as u8])
    });
    let blurred = image::imageops::blur(&luma, sigma);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let wt = region.map_or(1.0, |m| f32::from(m.get_pixel(x, y).0[0]) / 255.0);
        if wt <= 0.0 {
            continue;
        }
        let detail = f32::from(luma.get_pixel(x, y).0[0]) - f32::from(blurred.get_pixel(x, y).0[0]);
        if detail.abs() <= SHARPEN_THRESHOLD {
            continue;
        }
        // Adding the same amount to R, G and B changes Y by that amount and
        // leaves Cb and Cr as they were.
        let add = wt * SHARPEN_AMOUNT * detail;
        for k in 0..3 {
            p.0[k] = (f32::from(p.0[k]) + add).round().clamp(0.0, 255.0) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgba;

    /// A striped "garment" square in the middle of a white canvas, and its region.
    fn garment(cast: [i16; 3]) -> (RgbaImage, GrayImage) {
        let img = RgbaImage::from_fn(128, 128, |x, y| {
            if (32..96).contains(&x) && (32..96).contains(&y) {
                let base: [i16; 3] = if (x / 4) % 2 == 0 {
                    [40, 80, 150]
                } else {
                    [70, 110, 180]
                };
                let c = |k: usize| (base[k] + cast[k]).clamp(0, 255) as u8;
                Rgba([c(0), c(1), c(2), 255])
            } else {
                Rgba([255, 255, 255, 255])
            }
        });
        let region = GrayImage::from_fn(128, 128, |x, y| {
            Luma([if (32..96).contains(&x) && (32..96).contains(&y) {
                255
            } else {
                0
            }])
        });
        (img, region)
    }

    #[test]
    fn a_colour_cast_is_pulled_back_to_the_reference_and_the_background_is_untouched() {
        let (source, region) = garment([0, 0, 0]);
        let reference = colour_stats(&source, Some(&region)).expect("stats");
        let (mut drifted, _) = garment([30, 5, -25]);
        let before = colour_stats(&drifted, Some(&region)).expect("stats");
        let report = apply(
            &mut drifted,
            &PostContext {
                reference: Some(reference),
                region: Some(region.clone()),
            },
        );
        let after = colour_stats(&drifted, Some(&region)).expect("stats");
        for k in 1..3 {
            // Chroma is what the cast moved; sharpening leaves it alone.
            assert!(
                (after.mean[k] - reference.mean[k]).abs() < 1.5,
                "channel {k}: {} → {} (reference {})",
                before.mean[k],
                after.mean[k],
                reference.mean[k]
            );
            assert!(
                (before.mean[k] - reference.mean[k]).abs() > 5.0,
                "the cast was real"
            );
        }
        assert!(report.colour_shift.is_some());
        for (x, y) in [(0, 0), (127, 127), (10, 64), (31, 31)] {
            assert_eq!(
                drifted.get_pixel(x, y).0,
                [255, 255, 255, 255],
                "background at ({x},{y})"
            );
        }
    }

    #[test]
    fn two_variations_with_different_drifts_end_up_alike() {
        let (source, region) = garment([0, 0, 0]);
        let ctx = PostContext {
            reference: colour_stats(&source, Some(&region)),
            region: Some(region.clone()),
        };
        let (mut a, _) = garment([25, 0, -10]);
        let (mut b, _) = garment([-20, 10, 20]);
        let gap = |a: &RgbaImage, b: &RgbaImage| {
            let (sa, sb) = (
                colour_stats(a, Some(&region)).expect("stats"),
                colour_stats(b, Some(&region)).expect("stats"),
            );
            (0..3)
                .map(|k| (sa.mean[k] - sb.mean[k]).abs())
                .fold(0.0, f64::max)
        };
        let before = gap(&a, &b);
        apply(&mut a, &ctx);
        apply(&mut b, &ctx);
        let after = gap(&a, &b);
        assert!(
            before > 15.0 && after < 2.0,
            "variation gap {before:.1} → {after:.1}"
        );
    }

    #[test]
    fn sharpening_adds_edge_contrast_and_leaves_flat_areas_alone() {
        // A soft vertical edge between two greys, on a flat field.
        let mut img = RgbaImage::from_fn(64, 64, |x, _| {
            let v = match x {
                0..30 => 100u8,
                30..34 => 100 + ((x - 29) * 20) as u8,
                _ => 180,
            };
            Rgba([v, v, v, 255])
        });
        let energy = |i: &RgbaImage| -> f64 {
            (1..63u32)
                .map(|x| {
                    let d = 2 * i32::from(i.get_pixel(x, 32).0[0])
                        - i32::from(i.get_pixel(x - 1, 32).0[0])
                        - i32::from(i.get_pixel(x + 1, 32).0[0]);
                    f64::from(d * d)
                })
                .sum()
        };
        let before = energy(&img);
        apply(&mut img, &PostContext::default());
        assert!(energy(&img) > before * 1.3, "{before} → {}", energy(&img));
        assert_eq!(
            img.get_pixel(5, 5).0,
            [100, 100, 100, 255],
            "flat dark side"
        );
        assert_eq!(
            img.get_pixel(60, 60).0,
            [180, 180, 180, 255],
            "flat light side"
        );
    }

    #[test]
    fn without_a_reference_only_sharpening_runs() {
        let (mut img, region) = garment([10, 10, 10]);
        let report = apply(
            &mut img,
            &PostContext {
                reference: None,
                region: Some(region),
            },
        );
        assert!(report.colour_shift.is_none());
        assert!(report.sharpen_sigma > 0.0);
    }
}
