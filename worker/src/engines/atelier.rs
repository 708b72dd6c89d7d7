//! The built-in `atelier` packshot engine: ISNet garment mask → edge
//! refinement → crop → framing → style background → shadow → optional
//! Real-ESRGAN upscale → compositing. Every stage is plain Rust over `image`
//! buffers except the two model calls, which go through the registry.
//!
//! Determinism: everything random (texture noise, placement jitter, shadow
//! softness) derives from the instruction seed plus the variation index, so
//! the same job reproduces the same pixels and variations differ.

use super::engine::{Engine, RenderRequest, Rendered};
use crate::failure::TaskFailure;
use crate::imaging;
use crate::imaging::bbox;
use crate::inference::Model;
use atelier_shared::domain::packshot::{DesignResolved, Framing, InstructionSpec, Shadow, Style};
use image::{DynamicImage, GrayImage, Luma, Rgba, RgbaImage};
use ndarray::{ArrayD, IxDyn};
use std::sync::Arc;
use std::time::Instant;

/// ISNet's square input edge.
pub const ISNET_EDGE: u32 = 1024;

pub struct AtelierEngine {
    pub isnet: Arc<Model>,
    /// ×4 upscaler; without it, enlargement falls back to Lanczos.
    pub upscaler: Option<Arc<Model>>,
    /// Enlargements above this factor use the upscaler; 0: never
    /// (`models.upscale_above`, which says why that is the default).
    pub upscale_above: f64,
    /// The name of the ISNet variant, for `model_used`.
    pub isnet_variant: String,
}

/// Per-stage timings of one render, in seconds (for benches and logs).
#[derive(Debug, Default, Clone)]
pub struct StageTimes(pub Vec<(&'static str, f64)>);

impl StageTimes {
    fn record(&mut self, stage: &'static str, since: Instant) {
        let s = since.elapsed().as_secs_f64();
        metrics::histogram!("atelier_task_duration_seconds", "type" => atelier_shared::domain::WorkQueue::Packshot.as_str(), "stage" => stage).record(s);
        self.0.push((stage, s));
    }
}

impl AtelierEngine {
    /// Loads (once per process) ISNet `isnet_file` and, unless empty, the
    /// upscaler `upscaler_file` from `dir`. A missing upscaler is not an
    /// error: enlargements then use Lanczos.
    pub fn load(
        rt: &crate::inference::Runtime,
        dir: &std::path::Path,
        isnet_file: &str,
        upscaler_file: &str,
        opts: crate::inference::ModelOptions,
    ) -> Result<AtelierEngine, crate::inference::InferenceError> {
        let isnet = crate::inference::load_shared(rt, "isnet", &dir.join(isnet_file), opts)?;
        let upscaler = if upscaler_file.is_empty() {
            None
        } else {
            match crate::inference::load_shared(rt, "realesrgan", &dir.join(upscaler_file), opts) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, "upscaler unavailable: enlargements use Lanczos");
                    None
                }
            }
        };
        Ok(AtelierEngine {
            isnet,
            upscaler,
            upscale_above: atelier_shared::config::ModelsConfig::default().upscale_above,
            isnet_variant: isnet_file.trim_end_matches(".onnx").to_string(),
        })
    }

    /// The garment mask of `img` at the image's own size (0–255).
    pub fn mask(&self, img: &DynamicImage) -> Result<GrayImage, TaskFailure> {
        let small = imaging::resize(img, ISNET_EDGE, ISNET_EDGE)?;
        let n = (ISNET_EDGE * ISNET_EDGE) as usize;
        let mut x = vec![0f32; 3 * n];
        for (i, p) in small.pixels().enumerate() {
            for c in 0..3 {
                x[c * n + i] = (f32::from(p.0[c]) - 128.0) / 256.0;
            }
        }
        let input =
            ArrayD::from_shape_vec(IxDyn(&[1, 3, ISNET_EDGE as usize, ISNET_EDGE as usize]), x)
                .map_err(|e| TaskFailure::retryable(e.to_string()))?;
        let y = self
            .isnet
            .run(input)
            .map_err(|e| TaskFailure::retryable(e.to_string()))?;
        let (min, max) = y
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
        // ISNet's output is a saliency map; stretch it to the full range as its authors do.
        let span = (max - min).max(1e-6);
        let raw: Vec<u8> = y
            .iter()
            .map(|v| (((v - min) / span) * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        let m = GrayImage::from_raw(ISNET_EDGE, ISNET_EDGE, raw)
            .ok_or_else(|| TaskFailure::retryable("mask has the wrong size"))?;
        let back = imaging::resize(&DynamicImage::ImageLuma8(m), img.width(), img.height())?;
        Ok(DynamicImage::ImageRgba8(back).to_luma8())
    }

    /// Renders one packshot, returning the canvas and stage timings.
    pub fn render_timed(
        &self,
        req: &RenderRequest<'_>,
    ) -> Result<(Rendered, StageTimes), TaskFailure> {
        let ins = req.instruction()?;
        let src = req.source()?;
        let seed = u64::from(req.seed(ins));
        let mut times = StageTimes::default();

        let t = Instant::now();
        let mask = self.mask(&src.image)?;
        times.record("mask", t);

        let t = Instant::now();
        let rgba = src.image.to_rgba8();
        let mut alpha = refine(&mask);
        // A hanger, a mannequin stand and the background seen through the
        // garment's outline above its shoulders are not the product, in
        // any style.
        let (cleaned, report) = super::hanger::remove(&alpha, &rgba);
        alpha = cleaned;
        let hanger = report;
        let Some((x0, y0, x1, y1)) = bbox(&alpha, 128) else {
            return Err(TaskFailure::permanent(
                "no garment found in the input image (the mask is empty)",
            ));
        };
        // The garment's own colours, the post-processing pass's reference.
        let reference = crate::postprocess::colour_stats(&rgba, Some(&alpha));
        let (cw, ch) = (x1 - x0 + 1, y1 - y0 + 1);
        let mut garment = image::imageops::crop_imm(&rgba, x0, y0, cw, ch).to_image();
        let calpha = image::imageops::crop_imm(&alpha, x0, y0, cw, ch).to_image();
        for (p, a) in garment.pixels_mut().zip(calpha.pixels()) {
            p.0[3] = a.0[0];
        }
        times.record("refine_crop", t);

        // Where the garment goes on the canvas.
        let (w, h) = (ins.output.width, ins.output.height);
        let mut rng = Rng(seed ^ 0x9E37_79B9_7F4A_7C15);
        let fill = framing_fill(ins.framing) * (1.0 - 0.04 * rng.unit());
        let scale = f64::min(
            f64::from(w) * fill / f64::from(cw),
            f64::from(h) * fill / f64::from(ch),
        );
        let (gw, gh) = (
            ((f64::from(cw) * scale).round() as u32).max(1),
            ((f64::from(ch) * scale).round() as u32).max(1),
        );

        let t = Instant::now();
        let mut upscaled_with = None;
        // Super-resolution only where it was measured to beat Lanczos
        // (`models.upscale_above`): the ×4 network costs seconds.
        let garment = if self.upscale_above > 0.0 && scale > self.upscale_above {
            match &self.upscaler {
                Some(up) if (cw as u64 * ch as u64) <= 1_200_000 => {
                    let big = upscale4(up, &garment)?;
                    upscaled_with = Some(up.name.clone());
                    imaging::resize(&DynamicImage::ImageRgba8(big), gw, gh)?
                }
                _ => imaging::resize(&DynamicImage::ImageRgba8(garment), gw, gh)?,
            }
        } else {
            imaging::resize(&DynamicImage::ImageRgba8(garment), gw, gh)?
        };
        times.record("upscale", t);

        let t = Instant::now();
        let mut canvas = background(ins, w, h, seed);
        times.record("background", t);

        let jitter = |span: u32, r: &mut Rng| ((r.unit() - 0.5) * f64::from(span) * 0.02) as i64;
        let ox = i64::from(w.saturating_sub(gw) / 2) + jitter(w, &mut rng);
        // Packshots sit slightly low, leaving room above.
        let oy = (i64::from(h.saturating_sub(gh)) * 11 / 20).min(i64::from(h.saturating_sub(gh)))
            + jitter(h, &mut rng);

        let t = Instant::now();
        let shadow = effective_shadow(ins);
        draw_shadow(&mut canvas, &garment, ox, oy, shadow, ins.style, &mut rng);
        times.record("shadow", t);

        let t = Instant::now();
        image::imageops::overlay(&mut canvas, &garment, ox, oy);
        if ins.style == Style::WhiteCutout {
            whiten_border(&mut canvas);
        }
        let mut region = GrayImage::new(w, h);
        for (x, y, p) in garment.enumerate_pixels() {
            let (cx, cy) = (ox + i64::from(x), oy + i64::from(y));
            if cx >= 0 && cy >= 0 && (cx as u32) < w && (cy as u32) < h {
                region.put_pixel(cx as u32, cy as u32, Luma([p.0[3]]));
            }
        }
        if ins.style == Style::WhiteCutout {
            // The pure-white border stays out of any later pass.
            let (bx, by) = ((w / 50).max(1), (h / 50).max(1));
            for (x, y, p) in region.enumerate_pixels_mut() {
                if x < bx || y < by || x >= w - bx || y >= h - by {
                    p.0[0] = 0;
                }
            }
        }
        times.record("composite", t);

        let mut stages = vec!["isnet_mask", "edge_refinement", "hanger_removal"];
        stages.extend([
            "crop",
            "framing",
            "background",
            "shadow",
            if upscaled_with.is_some() {
                "upscale_realesrgan"
            } else {
                "resize_lanczos"
            },
            "composite",
        ]);
        let description = serde_json::json!({
            "engine": "atelier",
            "stages": stages,
            "hanger_removal": hanger,
            "segmentation_model": self.isnet_variant,
            "upscaler": upscaled_with,
            "source_file_id": src.file_id,
            "garment_box": [x0, y0, cw, ch],
            // Where that box went on the canvas: left, top, width, height.
            "placement": [ox, oy, gw, gh],
            "style": ins.style,
            "shadow": shadow,
            "seed": seed,
        });
        let model_used = match &upscaled_with {
            Some(u) => format!("atelier ({} + {u})", self.isnet_variant),
            None => format!("atelier ({})", self.isnet_variant),
        };
        let rendered = Rendered {
            image: canvas,
            model_used,
            description,
            post: crate::postprocess::PostContext {
                reference,
                region: Some(region),
            },
        };
        Ok((rendered, times))
    }
}

impl Engine for AtelierEngine {
    fn name(&self) -> &'static str {
        "atelier"
    }

    fn render(&self, req: &RenderRequest<'_>) -> Result<Rendered, TaskFailure> {
        Ok(self.render_timed(req)?.0)
    }
}

/// Mask → alpha: snap near-certain values, pull the edge in by about one
/// pixel (so no background fringe survives), then feather it.
pub fn refine(mask: &GrayImage) -> GrayImage {
    let (w, h) = mask.dimensions();
    let mut snapped = GrayImage::new(w, h);
    for (o, i) in snapped.pixels_mut().zip(mask.pixels()) {
        let v = i.0[0];
        o.0[0] = if v < 20 {
            0
        } else if v > 235 {
            255
        } else {
            v
        };
    }
    // 3×3 minimum: a one-pixel erosion removes the halo of mixed pixels.
    let mut eroded = snapped.clone();
    for y in 0..h {
        for x in 0..w {
            let mut m = 255u8;
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    let v = if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        0
                    } else {
                        snapped.get_pixel(nx as u32, ny as u32).0[0]
                    };
                    m = m.min(v);
                }
            }
            eroded.put_pixel(x, y, Luma([m.max(snapped.get_pixel(x, y).0[0] / 2)]));
        }
    }
    let sigma = (w.max(h) as f32 / 1500.0).clamp(0.6, 2.0);
    image::imageops::fast_blur(&eroded, sigma)
}

/// Share of the canvas the garment may fill, by framing.
fn framing_fill(f: Option<Framing>) -> f64 {
    match f {
        Some(Framing::SquarePackshot) => 0.80,
        Some(Framing::Tall34) => 0.86,
        Some(Framing::Wide43) => 0.78,
        Some(Framing::FullFrame) | None => 0.92,
    }
}

fn effective_shadow(ins: &InstructionSpec) -> Shadow {
    match ins.shadow {
        Shadow::Auto => match ins.style {
            Style::WhiteCutout | Style::GhostMannequin => Shadow::Contact,
            Style::FlatLay | Style::MarketingReady => Shadow::Natural,
            Style::Free => Shadow::SoftDrop,
        },
        s => s,
    }
}

fn text_of(d: &Option<DesignResolved>) -> String {
    d.as_ref()
        .and_then(|d| d.text.clone())
        .unwrap_or_default()
        .to_lowercase()
}

/// Named colours understood in `background`, `surface` and `color_palette`.
fn colour_for(text: &str) -> Option<[u8; 3]> {
    const NAMED: &[(&str, [u8; 3])] = &[
        ("white", [250, 250, 248]),
        ("grey", [214, 214, 212]),
        ("gray", [214, 214, 212]),
        ("black", [38, 38, 40]),
        ("beige", [233, 222, 204]),
        ("cream", [243, 236, 220]),
        ("sand", [226, 208, 180]),
        ("blue", [196, 214, 232]),
        ("green", [205, 222, 200]),
        ("pink", [242, 216, 218]),
        ("red", [214, 92, 86]),
        ("yellow", [246, 232, 178]),
        ("terracotta", [204, 122, 92]),
        ("navy", [52, 66, 102]),
        ("pastel", [232, 222, 240]),
        ("earth", [196, 170, 136]),
        ("neutral", [232, 229, 224]),
        ("monochrome", [226, 226, 226]),
        ("linen", [236, 230, 218]),
        ("oak", [196, 160, 118]),
        ("wood", [180, 140, 100]),
        ("concrete", [190, 190, 186]),
        ("marble", [238, 238, 236]),
        ("paper", [205, 180, 140]),
        ("kraft", [196, 164, 120]),
        ("studio", [236, 236, 236]),
    ];
    NAMED
        .iter()
        .find(|(k, _)| text.contains(k))
        .map(|(_, c)| *c)
}

/// The style's background at `w`×`h`.
pub fn background(ins: &InstructionSpec, w: u32, h: u32, seed: u64) -> RgbaImage {
    match ins.style {
        // Pure #FFFFFF, nothing else.
        Style::WhiteCutout => RgbaImage::from_pixel(w, h, Rgba([255, 255, 255, 255])),
        // Neutral studio: a soft light-grey vignette.
        Style::GhostMannequin => radial(w, h, [246, 246, 246], [228, 228, 228]),
        // Top-down on a generated surface texture.
        Style::FlatLay => {
            let name = text_of(&ins.surface);
            let base = colour_for(&name).unwrap_or([236, 230, 218]);
            surface(w, h, base, &name, seed)
        }
        Style::MarketingReady | Style::Free => {
            let bg = text_of(&ins.background);
            let palette = text_of(&ins.color_palette);
            let base = colour_for(&bg)
                .or_else(|| colour_for(&palette))
                .unwrap_or([232, 229, 224]);
            let light = ins
                .lighting
                .as_ref()
                .and_then(|l| l.attributes.get("direction").cloned().or(l.text.clone()))
                .unwrap_or_default();
            lit(w, h, base, &light.to_lowercase())
        }
    }
}

fn radial(w: u32, h: u32, centre: [u8; 3], edge: [u8; 3]) -> RgbaImage {
    let (cx, cy) = (f64::from(w) / 2.0, f64::from(h) * 0.45);
    let r = (cx * cx + cy * cy).sqrt();
    RgbaImage::from_fn(w, h, |x, y| {
        let d = ((f64::from(x) - cx).powi(2) + (f64::from(y) - cy).powi(2)).sqrt() / r;
        let t = d.clamp(0.0, 1.0).powf(1.5);
        let c =
            |i: usize| (f64::from(centre[i]) * (1.0 - t) + f64::from(edge[i]) * t).round() as u8;
        Rgba([c(0), c(1), c(2), 255])
    })
}

/// A light gradient falling off away from the light's side.
fn lit(w: u32, h: u32, base: [u8; 3], light: &str) -> RgbaImage {
    let (lx, ly) = if light.contains("left") {
        (0.0, 0.4)
    } else if light.contains("right") {
        (1.0, 0.4)
    } else if light.contains("top") || light.contains("above") {
        (0.5, 0.0)
    } else {
        (0.5, 0.3)
    };
    RgbaImage::from_fn(w, h, |x, y| {
        let (u, v) = (
            f64::from(x) / f64::from(w.max(1)),
            f64::from(y) / f64::from(h.max(1)),
        );
        let d = ((u - lx).powi(2) + (v - ly).powi(2)).sqrt();
        let k = 1.06 - 0.16 * d.min(1.2);
        let c = |i: usize| (f64::from(base[i]) * k).round().clamp(0.0, 255.0) as u8;
        Rgba([c(0), c(1), c(2), 255])
    })
}

/// Procedural surface: value noise at two scales, with grain along one axis
/// for wood and linen, veins for marble.
fn surface(w: u32, h: u32, base: [u8; 3], name: &str, seed: u64) -> RgbaImage {
    let (grain_x, amp) = if name.contains("wood") || name.contains("oak") {
        (6.0, 22.0)
    } else if name.contains("linen") {
        (2.0, 10.0)
    } else if name.contains("concrete") {
        (1.0, 16.0)
    } else if name.contains("marble") {
        (1.0, 6.0)
    } else {
        (1.0, 8.0)
    };
    let coarse = ValueNoise::new(seed, 24);
    let fine = ValueNoise::new(seed.wrapping_add(1), 96);
    let veins = name.contains("marble");
    RgbaImage::from_fn(w, h, |x, y| {
        let (u, v) = (
            f64::from(x) / f64::from(w.max(1)),
            f64::from(y) / f64::from(h.max(1)),
        );
        let n = 0.65 * coarse.at(u, v * grain_x) + 0.35 * fine.at(u * grain_x, v);
        let mut d = (n - 0.5) * amp;
        if veins {
            let s = ((u * 7.0 + coarse.at(u, v) * 4.0).sin()).abs();
            if s < 0.04 {
                d -= 30.0 * (0.04 - s) / 0.04;
            }
        }
        let c = |i: usize| (f64::from(base[i]) + d).round().clamp(0.0, 255.0) as u8;
        Rgba([c(0), c(1), c(2), 255])
    })
}

/// Shadow of the garment on the background.
fn draw_shadow(
    canvas: &mut RgbaImage,
    garment: &RgbaImage,
    ox: i64,
    oy: i64,
    kind: Shadow,
    style: Style,
    rng: &mut Rng,
) {
    let (gw, gh) = garment.dimensions();
    let (w, h) = canvas.dimensions();
    let size = f64::from(w.max(h));
    let mut layer = GrayImage::new(w, h);
    let (opacity, blur) = match kind {
        Shadow::None | Shadow::Auto => return,
        Shadow::Contact => {
            // A thin ellipse under the garment's lower edge.
            let (cx, cy) = (ox as f64 + f64::from(gw) / 2.0, oy as f64 + f64::from(gh));
            let (rx, ry) = (f64::from(gw) * 0.42, (f64::from(gh) * 0.025).max(3.0));
            for y in 0..h {
                for x in 0..w {
                    let d = ((f64::from(x) - cx) / rx).powi(2) + ((f64::from(y) - cy) / ry).powi(2);
                    if d <= 1.0 {
                        layer.put_pixel(x, y, Luma([((1.0 - d) * 255.0) as u8]));
                    }
                }
            }
            (
                if style == Style::WhiteCutout {
                    0.22
                } else {
                    0.30
                },
                (size * 0.006) as f32,
            )
        }
        Shadow::SoftDrop | Shadow::Natural => {
            let natural = kind == Shadow::Natural;
            let (dx, dy) = if natural {
                (size * 0.004, size * 0.012)
            } else {
                (size * 0.010, size * 0.014)
            };
            for (x, y, p) in garment.enumerate_pixels() {
                let (tx, ty) = (ox + i64::from(x) + dx as i64, oy + i64::from(y) + dy as i64);
                if tx >= 0 && ty >= 0 && (tx as u32) < w && (ty as u32) < h {
                    layer.put_pixel(tx as u32, ty as u32, Luma([p.0[3]]));
                }
            }
            let spread = 0.012 + 0.006 * rng.unit();
            (if natural { 0.28 } else { 0.35 }, (size * spread) as f32)
        }
    };
    let layer = image::imageops::fast_blur(&layer, blur.max(1.0));
    for (c, s) in canvas.pixels_mut().zip(layer.pixels()) {
        let a = f64::from(s.0[0]) / 255.0 * opacity;
        for i in 0..3 {
            c.0[i] = (f64::from(c.0[i]) * (1.0 - a)).round() as u8;
        }
    }
}

/// Keeps the outer 2 % of a white cutout pure #FFFFFF, whatever the shadow did.
fn whiten_border(canvas: &mut RgbaImage) {
    let (w, h) = canvas.dimensions();
    let (bx, by) = ((w / 50).max(1), (h / 50).max(1));
    for (x, y, p) in canvas.enumerate_pixels_mut() {
        if x < bx || y < by || x >= w - bx || y >= h - by {
            *p = Rgba([255, 255, 255, 255]);
        }
    }
}

/// ×4 super-resolution of the colour channels; alpha is resized with Lanczos.
pub fn upscale4(model: &Model, img: &RgbaImage) -> Result<RgbaImage, TaskFailure> {
    let (w, h) = img.dimensions();
    let n = (w * h) as usize;
    let mut x = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            x[c * n + i] = f32::from(p.0[c]) / 255.0;
        }
    }
    let input = ArrayD::from_shape_vec(IxDyn(&[1, 3, h as usize, w as usize]), x)
        .map_err(|e| TaskFailure::retryable(e.to_string()))?;
    let y = model
        .run(input)
        .map_err(|e| TaskFailure::retryable(e.to_string()))?;
    let (ow, oh) = (w * 4, h * 4);
    if y.shape() != [1, 3, oh as usize, ow as usize] {
        return Err(TaskFailure::retryable(format!(
            "upscaler returned shape {:?}",
            y.shape()
        )));
    }
    let alpha = imaging::resize(&DynamicImage::ImageRgba8(img.clone()), ow, oh)?;
    let m = (ow * oh) as usize;
    let data = y
        .as_slice()
        .ok_or_else(|| TaskFailure::retryable("upscaler output is not contiguous"))?;
    Ok(RgbaImage::from_fn(ow, oh, |x, yy| {
        let i = (yy * ow + x) as usize;
        let c = |k: usize| (data[k * m + i] * 255.0).round().clamp(0.0, 255.0) as u8;
        Rgba([c(0), c(1), c(2), alpha.get_pixel(x, yy).0[3]])
    }))
}

/// SplitMix64: small, seedable, good enough for textures and jitter.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Smooth value noise on a `cells`×`cells` lattice over the unit square.
struct ValueNoise {
    cells: usize,
    grid: Vec<f64>,
}

impl ValueNoise {
    fn new(seed: u64, cells: usize) -> ValueNoise {
        let mut r = Rng(seed);
        ValueNoise {
            cells,
            grid: (0..(cells + 1) * (cells + 1)).map(|_| r.unit()).collect(),
        }
    }

    fn at(&self, u: f64, v: f64) -> f64 {
        let n = self.cells as f64;
        let (x, y) = ((u.rem_euclid(1.0)) * n, (v.rem_euclid(1.0)) * n);
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (fx, fy) = (x - x0 as f64, y - y0 as f64);
        let s = |t: f64| t * t * (3.0 - 2.0 * t);
        let g = |i: usize, j: usize| {
            self.grid[j.min(self.cells) * (self.cells + 1) + i.min(self.cells)]
        };
        let a = g(x0, y0) + (g(x0 + 1, y0) - g(x0, y0)) * s(fx);
        let b = g(x0, y0 + 1) + (g(x0 + 1, y0 + 1) - g(x0, y0 + 1)) * s(fx);
        a + (b - a) * s(fy)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engines::Input;
    use crate::inference::{ModelOptions, default_models_dir};
    use atelier_shared::domain::engines::EngineAvailability;
    use atelier_shared::domain::packshot::{DesignCatalogue, parse_request, validate};

    fn engine() -> AtelierEngine {
        let dir = default_models_dir();
        let rt = crate::inference::test_runtime();
        AtelierEngine::load(
            &rt,
            &dir,
            "isnet_fp16.onnx",
            "realesr-animevideov3-x4.onnx",
            ModelOptions::default(),
        )
        .expect("ISNet (scripts/fetch-models)")
    }

    fn garment() -> DynamicImage {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/garment.jpg");
        image::open(path).expect("testdata/garment.jpg")
    }

    /// The T-shirt polygon `scripts/make-testdata.py` draws into
    /// `garment.jpg`: the known foreground.
    const SHIRT: [(f64, f64); 13] = [
        (300., 250.),
        (390., 215.),
        (450., 240.),
        (510., 215.),
        (600., 250.),
        (740., 360.),
        (670., 450.),
        (610., 400.),
        (610., 930.),
        (290., 930.),
        (290., 400.),
        (230., 450.),
        (160., 360.),
    ];

    /// The dress `scripts/make-testdata.py` draws into `dress.jpg`.
    const DRESS: [(f64, f64); 11] = [
        (290., 240.),
        (350., 240.),
        (400., 300.),
        (450., 240.),
        (510., 240.),
        (540., 330.),
        (520., 480.),
        (610., 900.),
        (190., 900.),
        (280., 480.),
        (260., 330.),
    ];

    /// Whether (x, y) lies inside `poly` (even-odd rule).
    fn inside(poly: &[(f64, f64)], x: f64, y: f64) -> bool {
        let mut c = false;
        let n = poly.len();
        for i in 0..n {
            let (xi, yi) = poly[i];
            let (xj, yj) = poly[(i + n - 1) % n];
            if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
                c = !c;
            }
        }
        c
    }

    fn truth(w: u32, h: u32) -> Vec<bool> {
        (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .map(|(x, y)| inside(&SHIRT, f64::from(x) + 0.5, f64::from(y) + 0.5))
            .collect()
    }

    #[test]
    fn isnet_mask_matches_the_known_garment() {
        let img = garment();
        let mask = engine().mask(&img).expect("mask");
        let alpha = refine(&mask);
        let gt = truth(img.width(), img.height());
        let (mut inter, mut union) = (0u64, 0u64);
        for (p, t) in alpha.pixels().zip(gt) {
            let m = p.0[0] >= 128;
            inter += u64::from(m && t);
            union += u64::from(m || t);
        }
        let iou = inter as f64 / union as f64;
        assert!(
            iou >= 0.9,
            "IoU of the ISNet garment mask with the drawn shirt: {iou:.3}"
        );
    }

    #[test]
    fn ghost_mannequin_removes_the_hanger_and_keeps_the_garment() {
        let img = garment();
        let rgba = img.to_rgba8();
        let alpha = refine(&engine().mask(&img).expect("mask"));
        let (cleaned, report) = crate::engines::hanger::remove(&alpha, &rgba);
        let gt = truth(img.width(), img.height());
        let iou = |a: &GrayImage| {
            let (mut inter, mut union) = (0u64, 0u64);
            for (p, t) in a.pixels().zip(gt.iter()) {
                let m = p.0[0] >= 128;
                inter += u64::from(m && *t);
                union += u64::from(m || *t);
            }
            inter as f64 / union as f64
        };
        let (before, after) = (iou(&alpha), iou(&cleaned));
        eprintln!("hanger removal: {report:?}; IoU {before:.4} → {after:.4}");
        if let Ok(dir) = std::env::var("ATELIER_DUMP") {
            alpha.save(format!("{dir}/alpha.png")).expect("dump");
            cleaned.save(format!("{dir}/cleaned.png")).expect("dump");
        }
        // Hook stem, hook arc, both wire arms, their ends close above the
        // shoulders (scripts/make-testdata.py).
        for (x, y) in [
            (450, 150),
            (450, 130),
            (425, 101),
            (330, 224),
            (570, 224),
            (350, 215),
            (300, 237),
            (600, 237),
            (260, 255),
        ] {
            assert!(
                cleaned.get_pixel(x, y).0[0] < 128,
                "hanger pixel ({x},{y}) kept: alpha {} (before {})",
                cleaned.get_pixel(x, y).0[0],
                alpha.get_pixel(x, y).0[0]
            );
        }
        // Garment: shoulders, chest, sleeve, hem.
        for (x, y) in [(330, 270), (450, 500), (200, 370), (450, 900)] {
            assert!(
                cleaned.get_pixel(x, y).0[0] >= 128,
                "garment pixel ({x},{y}) lost"
            );
        }
        assert!(
            after >= 0.95 && after > before,
            "IoU {before:.4} → {after:.4}"
        );
    }

    /// The first instruction's first variation of `s` on `inputs`.
    fn render_first(
        e: &AtelierEngine,
        s: &atelier_shared::domain::packshot::PackshotSpec,
        inputs: &[Input],
    ) -> Rendered {
        e.render_timed(&RenderRequest {
            spec: s,
            instruction_index: 0,
            variation_index: 0,
            version: 0,
            inputs,
            stop: None,
        })
        .expect("renders")
        .0
    }

    pub(crate) fn spec(body: serde_json::Value) -> atelier_shared::domain::packshot::PackshotSpec {
        let req = parse_request(&body).expect("parses");
        validate(
            &req,
            &DesignCatalogue::default(),
            &EngineAvailability::builtin_packshots(vec![]),
            || 42,
        )
        .expect("valid")
    }

    #[test]
    fn white_cutout_has_pure_white_corners_and_the_garment_in_the_middle() {
        let e = engine();
        let s = spec(
            serde_json::json!({"project_id": "p", "images": ["f"], "instructions": [{"style": "white_cutout", "num_variations": 2}]}),
        );
        let inputs = vec![Input {
            file_id: "f".into(),
            image: garment(),
        }];
        let render = |v| {
            e.render_timed(&RenderRequest {
                spec: &s,
                instruction_index: 0,
                variation_index: v,
                version: 0,
                inputs: &inputs,
                stop: None,
            })
            .expect("renders")
        };
        let (r, times) = render(0);
        let (img, desc) = (r.image, r.description);
        if let Ok(p) = std::env::var("ATELIER_DUMP") {
            img.save(p).expect("dump");
        }
        assert_eq!(img.dimensions(), (1024, 1024));
        for (x, y) in [
            (0, 0),
            (1023, 0),
            (0, 1023),
            (1023, 1023),
            (512, 2),
            (5, 512),
        ] {
            assert_eq!(
                img.get_pixel(x, y).0,
                [255, 255, 255, 255],
                "corner/edge ({x},{y}) is not pure white"
            );
        }
        let c = img.get_pixel(512, 560).0;
        assert!(c[2] > c[0] + 40, "the blue shirt is in the middle: {c:?}");
        // The original background (light beige-grey, about half the photo) is
        // gone, including what ISNet counts as part of the object: the neck
        // opening and the triangle between hanger wire and shoulders.
        let beige = img
            .pixels()
            .filter(|p| p.0[0] > 190 && p.0[0] < 235 && (p.0[0] as i32 - p.0[2] as i32) > 6)
            .count();
        assert!(
            beige < 1024 * 1024 / 1000,
            "{beige} pixels of the old background survived"
        );
        assert!(times.0.iter().any(|(s, _)| *s == "mask"));
        assert_eq!(desc["segmentation_model"], "isnet_fp16");
        // Reproducible, and variations differ.
        assert_eq!(render(0).0.image, img, "same seed, same pixels");
        assert_ne!(render(1).0.image, img, "variations differ");
    }

    /// The hanger is not the product in any style. On both drawn photos
    /// (a T-shirt on a wire hanger, a dress on a wooden hanger wider than
    /// its shoulders and seen through its V neck), the garment on each
    /// style's canvas matches the drawn garment without its hanger: IoU ≥
    /// 0.95 between the composited garment's alpha and the drawn outline
    /// carried onto the canvas by the same crop, scale and placement.
    #[test]
    fn every_style_removes_the_hanger() {
        let e = engine();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata");
        let mut failures = Vec::new();
        for (file, outline, shoulders) in [
            ("garment.jpg", &SHIRT[..], 215u64),
            ("dress.jpg", &DRESS[..], 240),
        ] {
            let inputs = vec![Input {
                file_id: "f".into(),
                image: image::open(dir.join(file)).expect("testdata"),
            }];
            for style in [
                "white_cutout",
                "flat_lay",
                "marketing_ready",
                "ghost_mannequin",
                "free",
            ] {
                let s = spec(
                    serde_json::json!({"project_id": "p", "images": ["f"], "instructions": [{"style": style}]}),
                );
                let r = render_first(&e, &s, &inputs);
                let d = &r.description;
                if let Ok(dump) = std::env::var("ATELIER_DUMP") {
                    let region = r.post.region.as_ref().expect("region");
                    region
                        .save(format!("{dump}/{file}-{style}.png"))
                        .expect("dump");
                }
                let n = |v: &serde_json::Value| v.as_f64().expect("number");
                let top = d["garment_box"][1].as_u64().expect("box");
                if top + 8 < shoulders {
                    failures.push(format!("{file} {style}: the garment box starts at row {top}, the shoulders at {shoulders}: {d}"));
                }
                let (bx, by, bw, bh) = (
                    n(&d["garment_box"][0]),
                    n(&d["garment_box"][1]),
                    n(&d["garment_box"][2]),
                    n(&d["garment_box"][3]),
                );
                let (ox, oy, gw, gh) = (
                    n(&d["placement"][0]),
                    n(&d["placement"][1]),
                    n(&d["placement"][2]),
                    n(&d["placement"][3]),
                );
                let region = r.post.region.as_ref().expect("region");
                let (mut inter, mut union) = (0u64, 0u64);
                for (x, y, p) in region.enumerate_pixels() {
                    // The canvas pixel's centre, back in the photo.
                    let sx = bx + (f64::from(x) + 0.5 - ox) * bw / gw;
                    let sy = by + (f64::from(y) + 0.5 - oy) * bh / gh;
                    let (m, t) = (p.0[0] >= 128, inside(outline, sx, sy));
                    inter += u64::from(m && t);
                    union += u64::from(m || t);
                }
                let iou = inter as f64 / union.max(1) as f64;
                eprintln!("{file} {style}: IoU {iou:.4} ({})", d["hanger_removal"]);
                if iou < 0.95 {
                    failures.push(format!(
                        "{file} {style}: IoU {iou:.4} with the drawn garment: {d}"
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    /// The upscaler runs only where `upscale_above` says it wins: never by
    /// default, and above the factor when one is set.
    #[test]
    fn the_upscaler_runs_only_above_its_factor() {
        let mut e = engine();
        let inputs = vec![Input {
            file_id: "f".into(),
            image: garment(),
        }];
        // The 2K canvas enlarges the 900×1100 photo's garment about 2.2×.
        let s = spec(
            serde_json::json!({"project_id": "p", "images": ["f"], "instructions": [{"style": "white_cutout", "options": {"size": "2K"}}]}),
        );
        let render = |e: &AtelierEngine| render_first(e, &s, &inputs);
        let plain = render(&e);
        assert_eq!(plain.description["upscaler"], serde_json::Value::Null);
        assert_eq!(plain.model_used, "atelier (isnet_fp16)");
        e.upscale_above = 3.0;
        assert_eq!(
            render(&e).description["upscaler"],
            serde_json::Value::Null,
            "2.2× is below 3×"
        );
        e.upscale_above = 1.5;
        let sr = render(&e);
        assert_eq!(
            sr.description["upscaler"], "realesrgan",
            "{}",
            sr.description
        );
        assert!(sr.model_used.contains("realesrgan"), "{}", sr.model_used);
        assert_eq!(sr.image.dimensions(), plain.image.dimensions());
    }

    #[test]
    fn styles_paint_their_backgrounds() {
        let s = spec(
            serde_json::json!({"project_id": "p", "images": ["f"], "instructions": [
            {"style": "flat_lay", "surface": "light oak wood"},
            {"style": "ghost_mannequin"},
            {"style": "marketing_ready", "background": "terracotta wall", "lighting": {"direction": "left"}}]}),
        );
        let flat = background(&s.instructions[0], 256, 256, 1);
        let ghost = background(&s.instructions[1], 256, 256, 1);
        let mk = background(&s.instructions[2], 256, 256, 1);
        let px = |i: &RgbaImage, x, y| i.get_pixel(x, y).0;
        assert!(
            px(&flat, 10, 10)[0] > px(&flat, 10, 10)[2] + 30,
            "oak is warm: {:?}",
            px(&flat, 10, 10)
        );
        assert_ne!(
            background(&s.instructions[0], 256, 256, 2),
            flat,
            "the texture follows the seed"
        );
        assert!(
            px(&ghost, 128, 115)[0] > px(&ghost, 0, 255)[0],
            "studio vignette"
        );
        assert!(
            px(&mk, 5, 100)[0] > px(&mk, 250, 100)[0],
            "lit from the left"
        );
        assert!(
            px(&mk, 128, 128)[0] > px(&mk, 128, 128)[2] + 60,
            "terracotta"
        );
    }
}
