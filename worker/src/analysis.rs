//! Pixel analysis behind preset extraction (contract §6.8): colours in
//! CIE L*a*b*, a garment's palette by clustering, what kind of backdrop an
//! image has, the shadow under a product, where the light comes from and
//! how hard it is, how the product is framed, and the traits of a face
//! measured around its landmarks. Every function measures; the words it
//! returns name classes of those measurements, with the thresholds here.

use crate::faces::detect::Face;
use image::{GrayImage, RgbImage};
use serde_json::{Value, json};

/// A colour in CIE L*a*b* (D65): L 0–100, a and b roughly ±100.
pub type Lab = [f32; 3];

/// The L*a*b* of an sRGB colour.
pub fn lab(rgb: [u8; 3]) -> Lab {
    fn linear(c: u8) -> f32 {
        let c = f32::from(c) / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    }
    let [r, g, b] = rgb.map(linear);
    let x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.950_47;
    let y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    let z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.088_83;
    let f = |t: f32| {
        if t > 0.008_856 {
            t.cbrt()
        } else {
            7.787 * t + 16.0 / 116.0
        }
    };
    let (fx, fy, fz) = (f(x), f(y), f(z));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// Euclidean distance in L*a*b* (CIE76 ΔE).
pub fn delta_e(p: Lab, q: Lab) -> f32 {
    ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2) + (p[2] - q[2]).powi(2)).sqrt()
}

fn chroma(p: Lab) -> f32 {
    p[1].hypot(p[2])
}

/// Reference colours of the chromatic names (the names the text parser
/// maps synonyms onto, plus a few it has no word for).
const CHROMATIC: &[(&str, [u8; 3])] = &[
    ("red", [200, 30, 35]),
    ("burgundy", [115, 25, 40]),
    ("pink", [240, 150, 175]),
    ("orange", [235, 125, 35]),
    ("yellow", [240, 210, 50]),
    ("gold", [196, 158, 62]),
    ("beige", [220, 200, 165]),
    ("brown", [125, 80, 45]),
    ("olive", [115, 115, 45]),
    ("green", [45, 150, 65]),
    ("teal", [20, 130, 130]),
    ("light blue", [150, 190, 230]),
    ("blue", [40, 90, 200]),
    ("navy blue", [25, 35, 90]),
    ("purple", [120, 55, 160]),
];

/// The name of a colour: greys by lightness when it has little chroma,
/// otherwise the nearest chromatic reference.
pub fn colour_name(p: Lab) -> &'static str {
    if chroma(p) < 10.0 || p[0] < 10.0 {
        return match p[0] {
            l if l >= 92.0 => "white",
            l if l >= 70.0 => "light grey",
            l if l >= 40.0 => "grey",
            l if l >= 18.0 => "dark grey",
            _ => "black",
        };
    }
    CHROMATIC
        .iter()
        .map(|(n, rgb)| (*n, delta_e(p, lab(*rgb))))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(n, _)| n)
        .unwrap_or("grey")
}

/// One colour of a palette.
#[derive(Debug, Clone, PartialEq)]
pub struct Swatch {
    pub name: &'static str,
    pub lab: Lab,
    /// Share of the sampled pixels, 0–1.
    pub share: f32,
}

/// The palette of `pixels` (L*a*b*): k-means with `k` clusters seeded by
/// farthest points (deterministic), clusters of one name merged, largest
/// share first.
pub fn palette(pixels: &[Lab], k: usize) -> Vec<Swatch> {
    if pixels.is_empty() || k == 0 {
        return Vec::new();
    }
    let step = (pixels.len() / 16_384).max(1);
    let sample: Vec<Lab> = pixels.iter().step_by(step).copied().collect();
    let mean = mean_lab(&sample);
    let mut centres: Vec<Lab> = vec![
        *sample
            .iter()
            .min_by(|a, b| delta_e(**a, mean).total_cmp(&delta_e(**b, mean)))
            .unwrap_or(&mean),
    ];
    while centres.len() < k.min(sample.len()) {
        let far = sample
            .iter()
            .max_by(|a, b| nearest(&centres, **a).1.total_cmp(&nearest(&centres, **b).1));
        match far {
            Some(p) if nearest(&centres, *p).1 > 4.0 => centres.push(*p),
            _ => break,
        }
    }
    let mut members = vec![0usize; centres.len()];
    for _ in 0..12 {
        let mut sums = vec![[0f64; 3]; centres.len()];
        members = vec![0; centres.len()];
        for p in &sample {
            let (i, _) = nearest(&centres, *p);
            members[i] += 1;
            for c in 0..3 {
                sums[i][c] += f64::from(p[c]);
            }
        }
        for (i, c) in centres.iter_mut().enumerate() {
            if members[i] > 0 {
                *c = sums[i].map(|s| (s / members[i] as f64) as f32);
            }
        }
    }
    let total = sample.len() as f32;
    let mut swatches: Vec<Swatch> = Vec::new();
    for (c, n) in centres.iter().zip(&members) {
        if *n == 0 {
            continue;
        }
        let share = *n as f32 / total;
        let name = colour_name(*c);
        match swatches.iter_mut().find(|s| s.name == name) {
            Some(s) => {
                let w = s.share + share;
                for i in 0..3 {
                    s.lab[i] = (s.lab[i] * s.share + c[i] * share) / w;
                }
                s.share = w;
            }
            None => swatches.push(Swatch {
                name,
                lab: *c,
                share,
            }),
        }
    }
    swatches.sort_by(|a, b| b.share.total_cmp(&a.share));
    swatches
}

fn nearest(centres: &[Lab], p: Lab) -> (usize, f32) {
    centres
        .iter()
        .enumerate()
        .map(|(i, c)| (i, delta_e(*c, p)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((0, f32::MAX))
}

fn mean_lab(p: &[Lab]) -> Lab {
    let n = p.len().max(1) as f64;
    let mut s = [0f64; 3];
    for q in p {
        for c in 0..3 {
            s[c] += f64::from(q[c]);
        }
    }
    s.map(|v| (v / n) as f32)
}

fn median(v: &mut [f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f32::total_cmp);
    v[v.len() / 2]
}

fn median_lab(p: &[Lab]) -> Lab {
    let mut out = [0f32; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let mut ch: Vec<f32> = p.iter().map(|q| q[c]).collect();
        *o = median(&mut ch);
    }
    out
}

/// The image in L*a*b*, row-major.
pub fn lab_image(img: &RgbImage) -> Vec<Lab> {
    img.pixels().map(|p| lab(p.0)).collect()
}

/// A product mask without a segmentation model: whatever differs from the
/// colour of the image's border (its median) by more than ΔE 14. Good for
/// plain backdrops only; the segmenter is used when the worker has it.
pub fn border_mask(img: &RgbImage, labs: &[Lab]) -> GrayImage {
    let (w, h) = img.dimensions();
    let frame = (w.min(h) / 33).max(2);
    let mut border = Vec::new();
    for y in 0..h {
        for x in 0..w {
            if x < frame || y < frame || x >= w - frame || y >= h - frame {
                border.push(labs[(y * w + x) as usize]);
            }
        }
    }
    let bg = median_lab(&border);
    GrayImage::from_fn(w, h, |x, y| {
        let d = delta_e(labs[(y * w + x) as usize], bg);
        image::Luma([if d > 14.0 { 255 } else { 0 }])
    })
}

/// Where the product is and how much of the frame it fills.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// `[x0, y0, x1, y1]`, pixels, inclusive.
    pub bbox: [u32; 4],
    /// Share of the frame the mask covers.
    pub fill: f32,
    /// Left, top, right, bottom margins as shares of the frame.
    pub margins: [f32; 4],
    /// Centre of the box as shares of the frame.
    pub centre: [f32; 2],
}

/// The placement of the mask's foreground (≥ 128), if it has any (at
/// least 0.5 % of the frame).
pub fn placement(mask: &GrayImage) -> Option<Placement> {
    let (w, h) = mask.dimensions();
    let (x0, y0, x1, y1) = crate::imaging::bbox(mask, 128)?;
    let on = mask.pixels().filter(|p| p.0[0] >= 128).count() as f32;
    let area = (w * h) as f32;
    if on < 0.005 * area {
        return None;
    }
    let (wf, hf) = (w as f32, h as f32);
    Some(Placement {
        bbox: [x0, y0, x1, y1],
        fill: on / area,
        margins: [
            x0 as f32 / wf,
            y0 as f32 / hf,
            (w - 1 - x1) as f32 / wf,
            (h - 1 - y1) as f32 / hf,
        ],
        centre: [(x0 + x1) as f32 / 2.0 / wf, (y0 + y1) as f32 / 2.0 / hf],
    })
}

impl Placement {
    /// The packshot `framing` this placement and frame shape correspond
    /// to: `full_frame` when the product touches the edges (margins under
    /// 2 %), else by the frame's aspect ratio.
    pub fn framing(&self, width: u32, height: u32) -> &'static str {
        let touching = self.margins.iter().filter(|m| **m < 0.02).count();
        if touching >= 2 {
            return "full_frame";
        }
        let ar = width as f32 / height.max(1) as f32;
        if ar < 0.9 {
            "tall_3_4"
        } else if ar > 1.1 {
            "wide_4_3"
        } else {
            "square_packshot"
        }
    }

    /// A composition note: centred or off-centre, and the share of the
    /// frame's height (or width, if larger) the product fills.
    pub fn composition(&self) -> String {
        let [cx, cy] = self.centre;
        let mut side = Vec::new();
        if cx < 0.44 {
            side.push("left");
        } else if cx > 0.56 {
            side.push("right");
        }
        if cy < 0.42 {
            side.push("high");
        } else if cy > 0.58 {
            side.push("low");
        }
        let position = if side.is_empty() {
            "centred".to_string()
        } else {
            format!("placed {} of centre", side.join(" and "))
        };
        let span_h = 1.0 - self.margins[1] - self.margins[3];
        let span_w = 1.0 - self.margins[0] - self.margins[2];
        let (span, dim) = if span_h >= span_w {
            (span_h, "height")
        } else {
            (span_w, "width")
        };
        format!(
            "single product {position}, spanning {:.0}% of the frame's {dim}",
            span * 100.0
        )
    }
}

/// What is behind the subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackdropClass {
    /// Uniform and near pure white.
    White,
    /// Uniform, one colour.
    Plain,
    /// One colour at large scale with fine texture (fabric, wood, paper).
    Textured,
    /// Varies at large scale: a photographed scene.
    Scene,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backdrop {
    pub class: BackdropClass,
    /// Median colour of the backdrop.
    pub lab: Lab,
    pub name: &'static str,
    /// Standard deviation of L* over the backdrop.
    pub std_l: f32,
    /// Mean absolute L* difference between neighbouring pixels.
    pub grain: f32,
    /// Standard deviation of the L* means of an 8×8 grid of blocks.
    pub block_std: f32,
}

impl Backdrop {
    /// How a `background` field words it.
    pub fn words(&self) -> String {
        match self.class {
            BackdropClass::White => "pure white seamless background".into(),
            BackdropClass::Plain => format!("plain {} seamless backdrop", self.name),
            BackdropClass::Textured => format!("textured {} surface", self.name),
            BackdropClass::Scene => format!("photographed scene in mostly {} tones", self.name),
        }
    }
}

/// Measures the backdrop: the pixels the mask leaves out (< 64), away
/// from the subject (its box widened by 10 % and extended 25 % downwards,
/// where its shadow falls). `None` when too little of it shows (3 %).
pub fn backdrop(labs: &[Lab], mask: &GrayImage, around: Option<&Placement>) -> Option<Backdrop> {
    let (w, h) = mask.dimensions();
    let keep_out = around.map(|p| {
        let [x0, y0, x1, y1] = p.bbox.map(|v| v as f32);
        let (bw, bh) = (x1 - x0, y1 - y0);
        [x0 - 0.1 * bw, y0 - 0.05 * bh, x1 + 0.1 * bw, y1 + 0.25 * bh]
    });
    let is_bg = |x: u32, y: u32| {
        if mask.get_pixel(x, y).0[0] >= 64 {
            return false;
        }
        match keep_out {
            Some([a, b, c, d]) => {
                let (xf, yf) = (x as f32, y as f32);
                !(xf >= a && xf <= c && yf >= b && yf <= d)
            }
            None => true,
        }
    };
    let mut px = Vec::new();
    let mut grain = (0f64, 0usize);
    const GRID: u32 = 8;
    let mut blocks = vec![(0f64, 0usize); (GRID * GRID) as usize];
    for y in 0..h {
        for x in 0..w {
            if !is_bg(x, y) {
                continue;
            }
            let p = labs[(y * w + x) as usize];
            px.push(p);
            let b = ((y * GRID / h) * GRID + x * GRID / w) as usize;
            blocks[b].0 += f64::from(p[0]);
            blocks[b].1 += 1;
            if x + 1 < w && y + 1 < h && is_bg(x + 1, y) && is_bg(x, y + 1) {
                let r = labs[(y * w + x + 1) as usize][0];
                let d = labs[((y + 1) * w + x) as usize][0];
                grain.0 += f64::from((r - p[0]).abs() + (d - p[0]).abs()) / 2.0;
                grain.1 += 1;
            }
        }
    }
    if (px.len() as f32) < 0.03 * (w * h) as f32 {
        return None;
    }
    let centre = median_lab(&px);
    let mean_l = px.iter().map(|p| f64::from(p[0])).sum::<f64>() / px.len() as f64;
    let std_l = (px
        .iter()
        .map(|p| (f64::from(p[0]) - mean_l).powi(2))
        .sum::<f64>()
        / px.len() as f64)
        .sqrt() as f32;
    let block_area = (w * h / (GRID * GRID)) as usize;
    let means: Vec<f64> = blocks
        .iter()
        .filter(|(_, n)| *n * 5 >= block_area)
        .map(|(s, n)| s / *n as f64)
        .collect();
    let block_std = if means.len() < 2 {
        0.0
    } else {
        let m = means.iter().sum::<f64>() / means.len() as f64;
        (means.iter().map(|v| (v - m).powi(2)).sum::<f64>() / means.len() as f64).sqrt() as f32
    };
    let grain = if grain.1 == 0 {
        0.0
    } else {
        (grain.0 / grain.1 as f64) as f32
    };
    let class = if block_std > 8.0 {
        BackdropClass::Scene
    } else if std_l < 3.5 && grain < 1.5 {
        if centre[0] >= 93.0 && chroma(centre) < 6.0 {
            BackdropClass::White
        } else {
            BackdropClass::Plain
        }
    } else {
        BackdropClass::Textured
    };
    Some(Backdrop {
        class,
        lab: centre,
        name: colour_name(centre),
        std_l,
        grain,
        block_std,
    })
}

/// The shadow under a product: how much darker than the backdrop (L*) a
/// thin band right under it is, and a deeper band below that. `None`
/// when there is no room under the product to look.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowReading {
    pub near: f32,
    pub far: f32,
}

impl ShadowReading {
    /// `none` (neither band 3 L* darker), `soft_drop` (a fifth of the
    /// darkening, at least 2 L*, reaches the deeper band), else `contact`.
    pub fn kind(&self) -> &'static str {
        if self.near < 3.0 && self.far < 3.0 {
            "none"
        } else if self.far >= 2.0 && self.far >= 0.2 * self.near {
            "soft_drop"
        } else {
            "contact"
        }
    }
}

pub fn shadow(labs: &[Lab], mask: &GrayImage, p: &Placement, backdrop_l: f32) -> Option<ShadowReading> {
    let (w, h) = mask.dimensions();
    let [x0, y0, x1, y1] = p.bbox;
    let bh = (y1 - y0).max(1) as f32;
    let bw = (x1 - x0).max(1);
    let near_rows = (0.04 * bh).ceil().max(2.0) as u32;
    let far_rows = (0.16 * bh).ceil().max(4.0) as u32;
    if y1 + 1 + near_rows + far_rows > h {
        return None;
    }
    let (cx0, cx1) = (x0 + bw / 5, x1 - bw / 5);
    let band = |from: u32, rows: u32| -> Option<f32> {
        let mut v = Vec::new();
        for y in from..(from + rows).min(h) {
            for x in cx0..=cx1.min(w - 1) {
                if mask.get_pixel(x, y).0[0] < 128 {
                    v.push(labs[(y * w + x) as usize][0]);
                }
            }
        }
        (v.len() >= 10).then(|| v.iter().sum::<f32>() / v.len() as f32)
    };
    let near = band(y1 + 1, near_rows)?;
    let far = band(y1 + 1 + near_rows, far_rows)?;
    Some(ShadowReading {
        near: (backdrop_l - near).max(0.0),
        far: (backdrop_l - far).max(0.0),
    })
}

/// The light on a surface of one colour: L* fitted as a plane over the
/// subject's box, and the spread of L* values.
#[derive(Debug, Clone, PartialEq)]
pub struct LightReading {
    /// How much brighter the left edge is than the right (L*).
    pub left_minus_right: f32,
    /// How much brighter the top is than the bottom (L*).
    pub top_minus_bottom: f32,
    /// p95 − p5 of L*.
    pub contrast: f32,
    /// Share of values in the middle third of that range: near 1/3 for a
    /// gradual fall-off, near 0 for a hard terminator.
    pub midtones: f32,
}

impl LightReading {
    /// Where the key light comes from: `front` when neither gradient
    /// reaches 4 L*, else the brighter side (two words when both axes
    /// are within a factor of two).
    pub fn direction(&self) -> &'static str {
        let (dx, dy) = (self.left_minus_right, self.top_minus_bottom);
        let (ax, ay) = (dx.abs(), dy.abs());
        if ax.max(ay) < 4.0 {
            return "front";
        }
        let horizontal = if dx > 0.0 { "left" } else { "right" };
        let vertical = if dy > 0.0 { "top" } else { "bottom" };
        if ax >= 4.0 && ay >= 4.0 && ax.min(ay) >= 0.5 * ax.max(ay) {
            return match (vertical, horizontal) {
                ("top", "left") => "top left",
                ("top", _) => "top right",
                (_, "left") => "bottom left",
                _ => "bottom right",
            };
        }
        if ax >= ay { horizontal } else { vertical }
    }

    /// `hard` when the values split into lit and shadowed with few
    /// midtones, else `soft`.
    pub fn quality(&self) -> &'static str {
        if self.contrast >= 12.0 && self.midtones < 0.15 {
            "hard"
        } else {
            "soft"
        }
    }
}

/// Whether `q` is `surface`'s material in another light: the same hue
/// (within 25°) with at least 30 % of its chroma, or both near grey. Light
/// scales L* and chroma together, not hue.
fn same_surface(q: Lab, surface: Lab) -> bool {
    let (cs, cq) = (chroma(surface), chroma(q));
    if cs < 10.0 {
        return cq < 12.0;
    }
    let hue = |p: Lab| p[2].atan2(p[1]).to_degrees();
    let mut d = (hue(q) - hue(surface)).abs();
    if d > 180.0 {
        d = 360.0 - d;
    }
    d < 25.0 && cq >= 0.3 * cs
}

/// Reads the light on the pixels of `region` (≥ 200, at least 2 px inside
/// its edge) of `surface`'s material (see [`same_surface`]), so that a
/// pattern in another colour does not read as shading. `None` under 200
/// such pixels.
pub fn light(labs: &[Lab], region: &GrayImage, p: &Placement, surface: Lab) -> Option<LightReading> {
    let (w, h) = region.dimensions();
    let inside = |x: i64, y: i64| {
        x >= 0
            && y >= 0
            && (x as u32) < w
            && (y as u32) < h
            && region.get_pixel(x as u32, y as u32).0[0] >= 200
    };
    let [x0, y0, x1, y1] = p.bbox.map(|v| v as f32);
    let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
    let (hw, hh) = (((x1 - x0) / 2.0).max(1.0), ((y1 - y0) / 2.0).max(1.0));
    // Normal equations of L = a + b·u + c·v.
    let mut m = [[0f64; 3]; 3];
    let mut r = [0f64; 3];
    let mut ls = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let (xi, yi) = (i64::from(x), i64::from(y));
            if !(inside(xi, yi)
                && inside(xi - 2, yi)
                && inside(xi + 2, yi)
                && inside(xi, yi - 2)
                && inside(xi, yi + 2))
            {
                continue;
            }
            let q = labs[(y * w + x) as usize];
            if !same_surface(q, surface) {
                continue;
            }
            let f = [1.0, f64::from((x as f32 - cx) / hw), f64::from((y as f32 - cy) / hh)];
            for i in 0..3 {
                for j in 0..3 {
                    m[i][j] += f[i] * f[j];
                }
                r[i] += f[i] * f64::from(q[0]);
            }
            ls.push(q[0]);
        }
    }
    if ls.len() < 200 {
        return None;
    }
    let [_, b, c] = solve3(m, r)?;
    let lo = percentile(&mut ls, 0.05);
    let hi = percentile(&mut ls, 0.95);
    let contrast = hi - lo;
    let (a3, b3) = (lo + contrast / 3.0, hi - contrast / 3.0);
    let mid = ls.iter().filter(|v| **v >= a3 && **v <= b3).count() as f32 / ls.len() as f32;
    Some(LightReading {
        left_minus_right: (-2.0 * b) as f32,
        top_minus_bottom: (-2.0 * c) as f32,
        contrast,
        midtones: mid,
    })
}

fn percentile(v: &mut [f32], q: f32) -> f32 {
    v.sort_by(f32::total_cmp);
    v[((v.len() - 1) as f32 * q).round() as usize]
}

/// Solves a 3×3 system by Cramer's rule; `None` when it is singular.
fn solve3(m: [[f64; 3]; 3], r: [f64; 3]) -> Option<[f64; 3]> {
    let det = |a: [[f64; 3]; 3]| {
        a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
    };
    let d = det(m);
    if d.abs() < 1e-9 {
        return None;
    }
    let mut out = [0f64; 3];
    for (col, o) in out.iter_mut().enumerate() {
        let mut a = m;
        for row in 0..3 {
            a[row][col] = r[row];
        }
        *o = det(a) / d;
    }
    Some(out)
}

/// What was measured on one face, by group of an identity instruction
/// (`appearance`, `face`, `hair`), and the figures behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct FaceReading {
    pub face_shape: &'static str,
    pub skin: Option<&'static str>,
    pub expression: &'static str,
    pub hair_colour: Option<&'static str>,
    pub hair_length: Option<&'static str>,
    pub measurements: Value,
}

impl FaceReading {
    /// The `appearance`, `face` and `hair` groups of an identity
    /// instruction, with only what was measured.
    pub fn groups(&self) -> Value {
        let mut appearance = serde_json::Map::new();
        if let Some(s) = self.skin {
            appearance.insert("skin".into(), json!(s));
        }
        appearance.insert("expression".into(), json!(self.expression));
        let mut hair = serde_json::Map::new();
        if let Some(c) = self.hair_colour {
            hair.insert("color".into(), json!(c));
        }
        if let Some(l) = self.hair_length {
            hair.insert("length".into(), json!(l));
        }
        let mut out = serde_json::Map::new();
        out.insert("appearance".into(), Value::Object(appearance));
        out.insert("face".into(), json!({"face_shape": self.face_shape}));
        if !hair.is_empty() {
            out.insert("hair".into(), Value::Object(hair));
        }
        Value::Object(out)
    }
}

/// Skin tone by the individual typology angle, ITA° = atan((L* − 50)/b*).
pub fn skin_class(ita: f32) -> &'static str {
    match ita {
        a if a > 55.0 => "very light",
        a if a > 41.0 => "light",
        a if a > 28.0 => "medium",
        a if a > 10.0 => "tan",
        a if a > -30.0 => "brown",
        _ => "dark",
    }
}

/// A hair colour from its median L*a*b*.
pub fn hair_class(p: Lab) -> &'static str {
    let [l, a, b] = p;
    let c = chroma(p);
    if l < 22.0 {
        "black"
    } else if a > 14.0 && a >= 0.7 * b && c >= 22.0 {
        if l < 36.0 { "auburn" } else { "red" }
    } else if c < 12.0 {
        if l >= 45.0 { "grey" } else { "dark brown" }
    } else if l >= 55.0 && b >= 15.0 {
        "blonde"
    } else if l < 38.0 {
        "dark brown"
    } else {
        "brown"
    }
}

/// Measures a face: shape from the detector's box (width/height: round
/// ≥ 0.85, oval ≥ 0.75, long below), skin from both cheeks (between eye
/// and mouth corner, pushed outwards), expression from the mouth's width
/// against the eyes' distance (smiling ≥ 0.95; the ArcFace template face
/// is 0.83), hair from the band above the box (pixels of the person that
/// are not skin-coloured) and its length from strips beside the face.
/// `person`: the segmenter's mask, when the worker has one; without it
/// hair is told from the backdrop by the colour of the top corners.
pub fn face_reading(img: &RgbImage, labs: &[Lab], face: &Face, person: Option<&GrayImage>) -> FaceReading {
    let (w, h) = img.dimensions();
    let at = |x: f32, y: f32| -> Option<Lab> {
        (x >= 0.0 && y >= 0.0 && (x as u32) < w && (y as u32) < h)
            .then(|| labs[(y as u32 * w + x as u32) as usize])
    };
    let [le, re, nose, lm, rm] = face.landmarks;
    let eye_d = (re[0] - le[0]).hypot(re[1] - le[1]).max(1.0);
    let mouth_w = (rm[0] - lm[0]).hypot(rm[1] - lm[1]);
    let mouth_ratio = mouth_w / eye_d;
    let box_ratio = face.width() / face.height().max(1.0);
    let face_shape = if box_ratio >= 0.85 {
        "round"
    } else if box_ratio >= 0.75 {
        "oval"
    } else {
        "long"
    };
    let expression = if mouth_ratio >= 0.95 { "smiling" } else { "neutral" };

    // Cheeks.
    let radius = (0.07 * eye_d).max(2.0);
    let mut cheeks = Vec::new();
    for (eye, mouth) in [(le, lm), (re, rm)] {
        let cx = (eye[0] + mouth[0]) / 2.0;
        let cy = (eye[1] + mouth[1]) / 2.0;
        let out = if cx < nose[0] { -1.0 } else { 1.0 };
        let cx = cx + out * 0.12 * eye_d;
        let r = radius as i32;
        for dy in -r..=r {
            for dx in -r..=r {
                if let Some(p) = at(cx + dx as f32, cy + dy as f32) {
                    cheeks.push(p);
                }
            }
        }
    }
    let skin_lab = (!cheeks.is_empty()).then(|| median_lab(&cheeks));
    let ita = skin_lab.map(|s| (s[0] - 50.0).atan2(s[2]).to_degrees());

    // Hair: the band above the face box.
    let [bx0, by0, bx1, by1] = face.bbox;
    let fh = face.height().max(1.0);
    let fw = face.width().max(1.0);
    let corner_bg = {
        let patch = (w.min(h) / 20).max(2);
        let mut v = Vec::new();
        for y in 0..patch.min(h) {
            for x in (0..patch.min(w)).chain(w.saturating_sub(patch)..w) {
                v.push(labs[(y * w + x) as usize]);
            }
        }
        median_lab(&v)
    };
    let is_person = |x: f32, y: f32| -> bool {
        match person {
            Some(m) => m.get_pixel(x as u32, y as u32).0[0] >= 128,
            None => at(x, y).is_some_and(|p| delta_e(p, corner_bg) > 15.0),
        }
    };
    let not_skin = |p: Lab| skin_lab.is_none_or(|s| delta_e(p, s) > 18.0);
    let mut band = Vec::new();
    let mut band_total = 0usize;
    let (top, bottom) = ((by0 - 0.35 * fh).max(0.0), (by0 - 0.02 * fh).max(0.0));
    let mut y = top;
    while y < bottom {
        let mut x = bx0.max(0.0);
        while x < bx1.min(w as f32) {
            if let Some(p) = at(x, y) {
                band_total += 1;
                if is_person(x, y) && not_skin(p) {
                    band.push(p);
                }
            }
            x += 1.0;
        }
        y += 1.0;
    }
    let hair_lab = (band_total > 0 && band.len() as f32 >= 0.15 * band_total as f32)
        .then(|| median_lab(&band));
    let hair_colour = hair_lab.map(hair_class);

    // Hair length: the lowest row at which the strips beside the face
    // still hold hair-coloured pixels of the person (a quarter of them).
    let mut hair_bottom: Option<f32> = None;
    let mut reaches_edge = false;
    if let Some(hl) = hair_lab {
        let strips = [
            (bx0 - 0.45 * fw, bx0 - 0.05 * fw),
            (bx1 + 0.05 * fw, bx1 + 0.45 * fw),
        ];
        let mut y = (by0 + by1) / 2.0;
        while y < h as f32 {
            let mut hits = 0usize;
            let mut total = 0usize;
            for (a, b) in strips {
                let mut x = a.max(0.0);
                while x < b.min(w as f32) {
                    if let Some(p) = at(x, y) {
                        total += 1;
                        if is_person(x, y) && delta_e(p, hl) < 14.0 {
                            hits += 1;
                        }
                    }
                    x += 1.0;
                }
            }
            if total > 0 && hits * 4 >= total {
                hair_bottom = Some(y);
                if y >= h as f32 - 2.0 {
                    reaches_edge = true;
                }
            }
            y += 1.0;
        }
    }
    let hair_length = hair_lab.map(|_| match hair_bottom {
        _ if reaches_edge => "long",
        None => "short",
        Some(b) if b < by1 - 0.1 * fh => "short",
        Some(b) if b < by1 + 0.45 * fh => "shoulder length",
        Some(_) => "long",
    });

    let r1 = |v: f32| (v * 10.0).round() / 10.0;
    let r3 = |v: f32| (v * 1000.0).round() / 1000.0;
    FaceReading {
        face_shape,
        skin: ita.map(skin_class),
        expression,
        hair_colour,
        hair_length,
        measurements: json!({
            "face_box_width_over_height": r3(box_ratio),
            "mouth_width_over_eye_distance": r3(mouth_ratio),
            "skin_lab": skin_lab.map(|s| s.map(r1)),
            "skin_ita_degrees": ita.map(r1),
            "hair_lab": hair_lab.map(|s| s.map(r1)),
            "hair_bottom_below_chin_in_face_heights": hair_bottom.map(|b| r3((b - by1) / fh)),
            "hair_reaches_frame_edge": reaches_edge,
            "person_mask": if person.is_some() { "segmenter" } else { "backdrop colour" },
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn colours_are_named_by_their_nearest_reference() {
        assert_eq!(colour_name(lab([255, 255, 255])), "white");
        assert_eq!(colour_name(lab([0, 0, 0])), "black");
        assert_eq!(colour_name(lab([128, 128, 128])), "grey");
        assert_eq!(colour_name(lab([210, 25, 30])), "red");
        assert_eq!(colour_name(lab([30, 40, 95])), "navy blue");
        assert_eq!(colour_name(lab([50, 160, 70])), "green");
        assert_eq!(colour_name(lab([222, 204, 170])), "beige");
    }

    #[test]
    fn a_palette_finds_the_colours_and_their_shares() {
        let mut px = vec![lab([200, 30, 35]); 700];
        px.extend(vec![lab([25, 35, 90]); 300]);
        let p = palette(&px, 4);
        assert_eq!(p[0].name, "red");
        assert!((p[0].share - 0.7).abs() < 0.02, "{p:?}");
        assert_eq!(p[1].name, "navy blue");
    }

    /// A garment (a red trapezoid) on `bg`, lit by `shade(u)` (u: 0 at the
    /// garment's left edge, 1 at its right), with a grey shadow of `shadow`
    /// L* steps under it.
    pub(crate) fn drawn(bg: [u8; 3], shade: impl Fn(f32) -> f32, shadow: u8) -> RgbImage {
        let (w, h) = (400, 400);
        let mut img = RgbImage::from_pixel(w, h, Rgb(bg));
        for y in 80..300u32 {
            let t = (y - 80) as f32 / 220.0;
            let half = 60.0 + 40.0 * t;
            for x in 0..w {
                let dx = x as f32 - 200.0;
                if dx.abs() <= half {
                    let u = (dx + half) / (2.0 * half);
                    let k = shade(u);
                    img.put_pixel(x, y, Rgb([(200.0 * k) as u8, (30.0 * k) as u8, (35.0 * k) as u8]));
                }
            }
        }
        // A soft drop shadow fading over 30 rows under the hem.
        for y in 300..330u32 {
            let fade = 1.0 - (y - 300) as f32 / 30.0;
            for x in 120..280u32 {
                let d = (f32::from(shadow) * fade) as u8;
                let p = img.get_pixel(x, y).0;
                img.put_pixel(x, y, Rgb(p.map(|c| c.saturating_sub(d))));
            }
        }
        img
    }

    #[test]
    fn a_red_garment_lit_from_the_left_on_white_reads_as_such() {
        let img = drawn([255, 255, 255], |u| 1.15 - 0.35 * u, 40);
        let labs = lab_image(&img);
        let mask = border_mask(&img, &labs);
        let p = placement(&mask).expect("a product");
        assert_eq!(p.framing(400, 400), "square_packshot");
        let bd = backdrop(&labs, &mask, Some(&p)).expect("a backdrop");
        assert_eq!(bd.class, BackdropClass::White, "{bd:?}");
        let garment: Vec<Lab> = labs
            .iter()
            .zip(mask.pixels())
            .filter(|(_, m)| m.0[0] >= 128)
            .map(|(l, _)| *l)
            .collect();
        let pal = palette(&garment, 5);
        assert_eq!(pal[0].name, "red", "{pal:?}");
        let light = light(&labs, &mask, &p, pal[0].lab).expect("enough garment");
        assert_eq!(light.direction(), "left", "{light:?}");
        assert_eq!(light.quality(), "soft", "{light:?}");
        // The shadow (40 levels fading over 30 rows) is a soft drop; the
        // border mask keeps its darkest rows, so look under the garment
        // proper: its box is the red pixels'.
        let red_only = GrayImage::from_fn(400, 400, |x, y| {
            let q = labs[(y * 400 + x) as usize];
            image::Luma([if chroma(q) > 20.0 { 255 } else { 0 }])
        });
        let rp = placement(&red_only).unwrap();
        let s = shadow(&labs, &red_only, &rp, bd.lab[0]).expect("room under it");
        assert_eq!(s.kind(), "soft_drop", "{s:?}");
    }

    #[test]
    fn a_hard_light_from_the_right_splits_the_garment_in_two() {
        let img = drawn([255, 255, 255], |u| if u < 0.5 { 0.55 } else { 1.2 }, 0);
        let labs = lab_image(&img);
        let mask = border_mask(&img, &labs);
        let p = placement(&mask).unwrap();
        let l = light(&labs, &mask, &p, lab([200, 30, 35])).unwrap();
        assert_eq!(l.direction(), "right", "{l:?}");
        assert_eq!(l.quality(), "hard", "{l:?}");
        let bd = backdrop(&labs, &mask, Some(&p)).unwrap();
        let s = shadow(&labs, &mask, &p, bd.lab[0]).unwrap();
        assert_eq!(s.kind(), "none", "{s:?}");
    }

    #[test]
    fn backdrops_are_told_apart() {
        let plain = drawn([40, 90, 200], |_| 1.0, 0);
        let labs = lab_image(&plain);
        let mask = border_mask(&plain, &labs);
        let bd = backdrop(&labs, &mask, placement(&mask).as_ref()).unwrap();
        assert_eq!(bd.class, BackdropClass::Plain);
        assert_eq!(bd.words(), "plain blue seamless backdrop");

        // Fine grain (±8 per pixel) on beige: a textured surface.
        let mut grain = drawn([220, 200, 165], |_| 1.0, 0);
        for (x, y, p) in grain.enumerate_pixels_mut() {
            if p.0 == [220, 200, 165] {
                let n = ((x * 7 + y * 13) % 5) as u8 * 4;
                *p = Rgb([212 + n, 192 + n, 157 + n]);
            }
        }
        let labs = lab_image(&grain);
        let mask = border_mask(&grain, &labs);
        let bd = backdrop(&labs, &mask, placement(&mask).as_ref()).unwrap();
        assert_eq!(bd.class, BackdropClass::Textured, "{bd:?}");

        // Dark left half, bright right half: a scene.
        let mut scene = drawn([255, 255, 255], |_| 1.0, 0);
        for (x, _, p) in scene.enumerate_pixels_mut() {
            if x < 200 && p.0 == [255, 255, 255] {
                *p = Rgb([40, 90, 50]);
            }
        }
        let labs = lab_image(&scene);
        let mask = GrayImage::from_fn(400, 400, |x, y| {
            image::Luma([if (80..300).contains(&y) && (100..300).contains(&x) { 255 } else { 0 }])
        });
        let bd = backdrop(&labs, &mask, placement(&mask).as_ref()).unwrap();
        assert_eq!(bd.class, BackdropClass::Scene, "{bd:?}");
    }

    #[test]
    fn skin_and_hair_classes_follow_their_measures() {
        assert_eq!(skin_class(60.0), "very light");
        assert_eq!(skin_class(30.0), "medium");
        assert_eq!(skin_class(-40.0), "dark");
        assert_eq!(hair_class(lab([20, 18, 16])), "black");
        assert_eq!(hair_class(lab([170, 170, 168])), "grey");
        assert_eq!(hair_class(lab([190, 60, 30])), "red");
        assert_eq!(hair_class(lab([120, 40, 20])), "auburn");
        assert_eq!(hair_class(lab([225, 195, 120])), "blonde");
        assert_eq!(hair_class(lab([140, 95, 60])), "brown");
        assert_eq!(hair_class(lab([70, 50, 35])), "dark brown");
    }
}
