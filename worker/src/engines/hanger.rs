//! Hanger and mannequin removal for every packshot style, working on the
//! garment alpha only (no extra model).
//!
//! What holds a garment up sits above its shoulders and is either thin (a
//! hanger's hook and wire, a mannequin stand) or shows the photo's background
//! through it (the neck opening, the gap between wire and shoulders that a
//! segmentation model tends to fill in). So, above the shoulder line:
//!
//! 1. structures thinner than about 3 % of the garment's width are opened
//!    away (erosion then dilation), and whatever is then no longer connected
//!    to the garment body goes;
//! 2. pixels whose colour is the background's (estimated from the unmasked
//!    photo beside them) are cleared, unless the garment itself has the
//!    background's colour (a white shirt on a white sweep), where keying
//!    would eat the garment.
//!
//! Below the shoulder line nothing is touched: thin parts there (straps,
//! drawstrings) belong to the garment. "As far as the mask allows": a
//! mannequin torso as wide as the garment stays, the mask cannot tell it
//! from the garment.

use image::{GrayImage, RgbaImage};
use std::collections::VecDeque;

/// What the removal did, for `input_description`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HangerReport {
    /// Row (source pixels) above which removal applied.
    pub shoulder_line: u32,
    /// Pixels cleared because they were thin or cut off from the garment.
    pub thin_removed: u64,
    /// Pixels cleared because they showed the background.
    pub background_removed: u64,
    /// Why keying was skipped, if it was.
    pub keying_skipped: Option<&'static str>,
}

/// Alpha at or above this is garment.
const SOLID: u8 = 128;
/// RGB distance under which a masked pixel counts as background.
const KEY_DISTANCE: f64 = 16.0;
/// Keying needs the garment to stand out from the background by this much.
const MIN_CONTRAST: f64 = 48.0;

pub fn remove(alpha: &GrayImage, photo: &RgbaImage) -> (GrayImage, HangerReport) {
    let mut out = alpha.clone();
    let mut report = HangerReport::default();
    let Some((x0, y0, x1, y1)) = crate::imaging::bbox(alpha, SOLID) else {
        return (out, report);
    };
    let (w, h) = alpha.dimensions();
    let r = ((f64::from(x1 - x0 + 1) * 0.015).round() as u32).max(2);

    // The shoulder line: the first row where the garment body is half its widest.
    let body = body_of(alpha, r);
    let widths: Vec<u32> = (0..h)
        .map(|y| (0..w).filter(|&x| body[(y * w + x) as usize]).count() as u32)
        .collect();
    let widest = widths.iter().copied().max().unwrap_or(0);
    let shoulder = (y0..=y1)
        .find(|&y| widths[y as usize] * 2 >= widest)
        .unwrap_or(y0);
    // Wire ends rest on the shoulders a little below the line.
    let limit = (shoulder + (y1 - y0 + 1) / 10).min(h);
    report.shoulder_line = shoulder;

    // First the background showing through (the gap a model filled in
    // between wire and shoulders, the neck opening): once it is gone, the
    // wire around it is a thin line of its own.
    report.keying_skipped = key_background(
        &mut out,
        alpha,
        photo,
        (y0, limit, y1),
        &mut report.background_removed,
    );

    // Then what is thin or cut off from the garment body: what stays is the
    // body plus what connects to it within a band of about `r` (the
    // garment's own edges and corners, which the opening rounded off).
    let body = body_of(&out, r);
    let band = dilate(&body, w, h, r + 1);
    let solid: Vec<bool> = out.pixels().map(|p| p.0[0] >= SOLID).collect();
    let mut kept = flood(&body, w, h, |i| solid[i] && band[i]);
    // The band also keeps the first `r` pixels of every thin part where it
    // meets the garment (a hanger arm's end on a shoulder), and an arm lying
    // along a shoulder's edge is part of the opened body: near the outline,
    // what has the thin parts' colour rather than the garment's goes.
    drop_stubs(&mut kept, &body, &solid, photo, (w, h), limit, r);
    // The feathered rim next to what stays stays too.
    let rim = dilate(&kept, w, h, 2);
    for y in 0..limit {
        for x in 0..w {
            let i = (y * w + x) as usize;
            let a = out.get_pixel(x, y).0[0];
            let keep = if a >= SOLID { kept[i] } else { rim[i] };
            if a > 0 && !keep {
                if a >= SOLID {
                    report.thin_removed += 1;
                }
                out.get_pixel_mut(x, y).0[0] = 0;
            }
        }
    }
    (out, report)
}

/// Clears, above row `limit`, the pixels near the garment's outline (within
/// `2r`) whose colour is nearer the mean colour of the removed thin parts
/// than the garment's own colour around them (the mean over its interior,
/// the body eroded by `2r`, within `4r`): the ends of a hanger's arms where
/// they meet the shoulders, which the band kept, and an arm lying along a
/// shoulder's edge, which the opening cannot tell from the garment. Does
/// nothing when too little was removed to know the thin parts' colour, or
/// when that colour is the garment's (`MIN_CONTRAST`).
fn drop_stubs(
    kept: &mut [bool],
    body: &[bool],
    solid: &[bool],
    photo: &RgbaImage,
    (w, h): (u32, u32),
    limit: u32,
    r: u32,
) {
    let (wu, hu) = (w as usize, h as usize);
    let top = (limit as usize).min(hu) * wu;
    let rgb = |i: usize| {
        let p = photo.get_pixel((i % wu) as u32, (i / wu) as u32).0;
        [f64::from(p[0]), f64::from(p[1]), f64::from(p[2])]
    };
    let (mut n, mut sum) = (0.0, [0.0; 3]);
    for i in (0..top).filter(|&i| solid[i] && !kept[i]) {
        let c = rgb(i);
        for k in 0..3 {
            sum[k] += c[k];
        }
        n += 1.0;
    }
    if n < 32.0 {
        return;
    }
    let thin = sum.map(|v| v / n);
    let interior = erode(body, w, h, 2 * r);
    // Summed-area table of the interior's colours and count: [r, g, b, n].
    let stride = wu + 1;
    let mut table = vec![[0.0f64; 4]; stride * (hu + 1)];
    for y in 0..hu {
        let mut row = [0.0; 4];
        for x in 0..wu {
            let i = y * wu + x;
            if interior[i] {
                let c = rgb(i);
                row = [row[0] + c[0], row[1] + c[1], row[2] + c[2], row[3] + 1.0];
            }
            let above = table[y * stride + x + 1];
            table[(y + 1) * stride + x + 1] = std::array::from_fn(|k| above[k] + row[k]);
        }
    }
    let reach = 4 * r as usize;
    let dist = |a: [f64; 3], b: [f64; 3]| {
        ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
    };
    // A hanger of the garment's own colour cannot be told apart by colour:
    // then nothing goes (as keying skips a garment of the background's).
    // The table's last cell sums the whole interior.
    let all = table[hu * stride + wu];
    if all[3] < 1.0
        || dist([all[0] / all[3], all[1] / all[3], all[2] / all[3]], thin) < MIN_CONTRAST
    {
        return;
    }
    let edge: Vec<usize> = (0..top).filter(|&i| kept[i] && !interior[i]).collect();
    for i in edge {
        let (x, y) = (i % wu, i / wu);
        let (xa, ya) = (x.saturating_sub(reach), y.saturating_sub(reach));
        let (xb, yb) = ((x + reach + 1).min(wu), (y + reach + 1).min(hu));
        let at = |yy: usize, xx: usize| table[yy * stride + xx];
        let s: [f64; 4] =
            std::array::from_fn(|k| at(yb, xb)[k] - at(ya, xb)[k] - at(yb, xa)[k] + at(ya, xa)[k]);
        if s[3] < 1.0 {
            continue;
        }
        let near = [s[0] / s[3], s[1] / s[3], s[2] / s[3]];
        let c = rgb(i);
        if dist(c, thin) < dist(c, near) {
            kept[i] = false;
        }
    }
}

/// The 4-neighbours of pixel `i` in a `w`×`h` row-major grid.
fn neighbours(i: usize, w: usize, h: usize) -> impl Iterator<Item = usize> {
    let (x, y) = (i % w, i / w);
    [
        (x > 0).then(|| i - 1),
        (x + 1 < w).then(|| i + 1),
        (y > 0).then(|| i - w),
        (y + 1 < h).then(|| i + w),
    ]
    .into_iter()
    .flatten()
}

/// Pixels reachable from `seeds` (4-connected) through pixels that `pass`.
fn flood(seeds: &[bool], w: u32, h: u32, pass: impl Fn(usize) -> bool) -> Vec<bool> {
    let (w, h) = (w as usize, h as usize);
    let mut seen = seeds.to_vec();
    let mut queue: VecDeque<usize> = (0..seeds.len()).filter(|&i| seeds[i]).collect();
    while let Some(i) = queue.pop_front() {
        for j in neighbours(i, w, h) {
            if !seen[j] && pass(j) {
                seen[j] = true;
                queue.push_back(j);
            }
        }
    }
    seen
}

/// The garment body: the mask opened by `r` (thin parts gone), largest
/// connected piece.
fn body_of(alpha: &GrayImage, r: u32) -> Vec<bool> {
    let (w, h) = alpha.dimensions();
    let bin: Vec<bool> = alpha.pixels().map(|p| p.0[0] >= SOLID).collect();
    let opened = dilate(&erode(&bin, w, h, r), w, h, r);
    largest_component(&opened, w, h)
}

/// Clears pixels of `out` between rows `y0` and `limit` whose colour is the
/// background's. Returns why it did nothing, if it did nothing.
fn key_background(
    out: &mut GrayImage,
    alpha: &GrayImage,
    photo: &RgbaImage,
    (y0, limit, y1): (u32, u32, u32),
    removed: &mut u64,
) -> Option<&'static str> {
    let w = alpha.width();
    let mean = |pred: &dyn Fn(u32, u32) -> bool, rows: std::ops::Range<u32>| {
        let (mut n, mut s) = (0.0, [0.0; 3]);
        for y in rows {
            for x in 0..w {
                if pred(x, y) {
                    let p = photo.get_pixel(x, y).0;
                    for k in 0..3 {
                        s[k] += f64::from(p[k]);
                    }
                    n += 1.0;
                }
            }
        }
        (n > 64.0).then(|| s.map(|v| v / n))
    };
    // Background colour beside the upper part of the garment.
    let Some(bg) = mean(
        &|x, y| alpha.get_pixel(x, y).0[0] < 16,
        y0..limit.max(y0 + 1),
    ) else {
        return Some("no background visible beside the garment's top");
    };
    let Some(fg) = mean(&|x, y| alpha.get_pixel(x, y).0[0] >= SOLID, limit..y1 + 1) else {
        return Some("garment body too small");
    };
    let dist = |a: [f64; 3], b: [f64; 3]| {
        ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
    };
    if dist(fg, bg) < MIN_CONTRAST {
        return Some("the garment has the background's colour");
    }
    for y in y0..limit {
        for x in 0..w {
            if out.get_pixel(x, y).0[0] == 0 {
                continue;
            }
            let p = photo.get_pixel(x, y).0;
            if dist([p[0], p[1], p[2]].map(f64::from), bg) < KEY_DISTANCE {
                out.get_pixel_mut(x, y).0[0] = 0;
                *removed += 1;
            }
        }
    }
    None
}

/// Square-kernel erosion (radius `r`), separable.
fn erode(m: &[bool], w: u32, h: u32, r: u32) -> Vec<bool> {
    morph(m, w, h, r, true)
}

fn dilate(m: &[bool], w: u32, h: u32, r: u32) -> Vec<bool> {
    morph(m, w, h, r, false)
}

/// Erosion (`all`) or dilation (any) along rows, then along columns, with a
/// running count over the window. Outside the image counts as empty.
fn morph(m: &[bool], w: u32, h: u32, r: u32, all: bool) -> Vec<bool> {
    let (w, h, r) = (w as usize, h as usize, r as usize);
    let window = 2 * r + 1;
    let pass = |src: &[bool], len: usize, lines: usize, at: &dyn Fn(usize, usize) -> usize| {
        let mut dst = vec![false; src.len()];
        for line in 0..lines {
            let mut count = 0usize;
            // Window [i - r, i + r]: prime with [0, r).
            for i in 0..r.min(len) {
                count += usize::from(src[at(line, i)]);
            }
            for i in 0..len {
                if i + r < len {
                    count += usize::from(src[at(line, i + r)]);
                }
                if i > r {
                    count -= usize::from(src[at(line, i - r - 1)]);
                }
                dst[at(line, i)] = if all { count == window } else { count > 0 };
            }
        }
        dst
    };
    let rows = pass(m, w, h, &|y, x| y * w + x);
    pass(&rows, h, w, &|x, y| y * w + x)
}

/// The largest 4-connected component of `m`.
fn largest_component(m: &[bool], w: u32, h: u32) -> Vec<bool> {
    let (w, h) = (w as usize, h as usize);
    let mut label = vec![0u32; m.len()];
    let (mut best, mut best_size, mut next) = (0u32, 0usize, 0u32);
    let mut queue = VecDeque::new();
    for start in 0..m.len() {
        if !m[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        queue.push_back(start);
        let mut size = 0;
        while let Some(i) = queue.pop_front() {
            size += 1;
            for j in neighbours(i, w, h) {
                if m[j] && label[j] == 0 {
                    label[j] = next;
                    queue.push_back(j);
                }
            }
        }
        if size > best_size {
            (best, best_size) = (next, size);
        }
    }
    label.iter().map(|&l| l != 0 && l == best).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgba};

    /// A red body with a 3-pixel hook on top, on a grey background.
    fn scene() -> (GrayImage, RgbaImage) {
        let inside_body = |x: u32, y: u32| (40..160).contains(&x) && (60..190).contains(&y);
        let hook = |x: u32, y: u32| (98..101).contains(&x) && (20..60).contains(&y);
        let alpha = GrayImage::from_fn(200, 200, |x, y| {
            Luma([if inside_body(x, y) || hook(x, y) {
                255
            } else {
                0
            }])
        });
        let photo = RgbaImage::from_fn(200, 200, |x, y| {
            if inside_body(x, y) {
                Rgba([180, 30, 30, 255])
            } else if hook(x, y) {
                Rgba([60, 60, 60, 255])
            } else {
                Rgba([210, 208, 200, 255])
            }
        });
        (alpha, photo)
    }

    #[test]
    fn a_thin_hook_above_the_shoulders_goes_and_the_body_stays() {
        let (alpha, photo) = scene();
        let (out, report) = remove(&alpha, &photo);
        assert_eq!(out.get_pixel(99, 30).0[0], 0, "hook");
        assert_eq!(out.get_pixel(99, 50).0[0], 0, "hook near the body");
        assert_eq!(out.get_pixel(100, 100).0[0], 255, "body");
        assert_eq!(out.get_pixel(41, 61).0[0], 255, "body corner");
        // All of it, including the stub next to the body that the band
        // around the opened body kept: it has the hook's colour.
        assert_eq!(report.thin_removed, 3 * 40, "{report:?}");
    }

    #[test]
    fn background_showing_through_the_neck_is_keyed_out_unless_the_garment_matches_it() {
        let (mut alpha, mut photo) = scene();
        // A neck opening that the mask filled in, showing the background.
        for y in 60..75 {
            for x in 85..115 {
                alpha.put_pixel(x, y, Luma([255]));
                photo.put_pixel(x, y, Rgba([212, 207, 201, 255]));
            }
        }
        let (out, report) = remove(&alpha, &photo);
        assert_eq!(out.get_pixel(100, 65).0[0], 0, "neck opening");
        assert!(report.background_removed >= 15 * 30, "{report:?}");
        assert_eq!(out.get_pixel(60, 65).0[0], 255, "shoulder");

        // The same scene with a garment of the background's colour: no keying.
        for p in photo.pixels_mut() {
            *p = Rgba([210, 208, 200, 255]);
        }
        let (out, report) = remove(&alpha, &photo);
        assert_eq!(out.get_pixel(100, 65).0[0], 255);
        assert_eq!(
            report.keying_skipped,
            Some("the garment has the background's colour")
        );
    }

    #[test]
    fn a_hook_of_the_garments_colour_leaves_the_outline_alone() {
        let (alpha, mut photo) = scene();
        // A hook of nearly the body's red, and a seam along the body's top
        // edge that is nearer the hook's colour than the body's: told apart
        // by colour, the seam would go.
        for y in 20..60 {
            for x in 98..101 {
                photo.put_pixel(x, y, Rgba([160, 45, 40, 255]));
            }
        }
        for y in 60..63 {
            for x in 40..160 {
                photo.put_pixel(x, y, Rgba([163, 43, 39, 255]));
            }
        }
        let (out, _) = remove(&alpha, &photo);
        assert_eq!(out.get_pixel(99, 30).0[0], 0, "the hook still goes");
        for x in [41, 60, 95, 103, 140, 158] {
            for y in 60..63 {
                assert_eq!(out.get_pixel(x, y).0[0], 255, "seam at ({x},{y})");
            }
        }
    }

    #[test]
    fn thin_parts_below_the_shoulders_are_kept() {
        let (mut alpha, photo) = scene();
        // A drawstring hanging below the hem.
        for y in 190..199 {
            alpha.put_pixel(70, y, Luma([255]));
        }
        let (out, _) = remove(&alpha, &photo);
        assert_eq!(out.get_pixel(70, 195).0[0], 255);
    }

    #[test]
    fn morphology_opens_thin_lines_only() {
        let (w, h) = (20u32, 20u32);
        let m: Vec<bool> = (0..h * w)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                (5..15).contains(&x) && (5..15).contains(&y) || (x == 2 && y < 18)
            })
            .collect();
        let opened = dilate(&erode(&m, w, h, 2), w, h, 2);
        assert!(opened[(10 * w + 10) as usize] && opened[(5 * w + 5) as usize]);
        assert!(!opened[(10 * w + 2) as usize]);
        assert_eq!(opened.iter().filter(|b| **b).count(), 100);
    }
}
