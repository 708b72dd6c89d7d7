//! `preset_extraction` (contract §6.8, §6.18): measures one reference
//! image and drafts the `instruction_data` of a preset of the requested
//! type from what it measured (see [`crate::analysis`]). The output's
//! image is a preview of what was analysed (the backdrop dimmed where the
//! segmenter found the subject); its description is the draft and the
//! figures behind every field of it.

use super::off_runtime;
use crate::analysis::{self, BackdropClass, Lab, Placement};
use crate::context::WorkerContext;
use crate::engines::atelier::AtelierEngine;
use crate::faces::FaceKit;
use crate::failure::TaskFailure;
use crate::imaging;
use atelier_shared::domain::extraction::{ExtractionReport, ExtractionSpec};
use atelier_shared::domain::presets::PresetType;
use atelier_shared::domain::{OutputResult, Task};
use image::{DynamicImage, GrayImage, RgbImage, RgbaImage};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Instant;

/// Long edge of the copy the analysis reads.
const ANALYSIS_EDGE: u32 = 1024;

/// Palette colours below this share are left out of `color_palette`.
const PALETTE_MIN_SHARE: f32 = 0.08;

pub(super) async fn run(
    ctx: &WorkerContext,
    task: &Task,
    spec: &ExtractionSpec,
) -> Result<OutputResult, TaskFailure> {
    let index = task.output.instruction_index as usize;
    let file_id = spec
        .file_ids
        .get(index)
        .ok_or_else(|| TaskFailure::permanent("image index out of range"))?;
    let bytes = super::input(ctx, task, file_id).await?;
    let kind = spec.preset_type;
    let faces = match kind {
        PresetType::IdentityCreation => Some(super::identity::face_kit(ctx)?),
        _ => ctx.faces.clone(),
    };
    let pipeline = ctx.pipeline.clone();
    let max_pixels = ctx.max_input_pixels;
    let started = Instant::now();
    let (report, preview, model_used) = off_runtime(ctx, move || {
        let img = imaging::decode_limited(&bytes, max_pixels)
            .map_err(|f| TaskFailure::permanent(super::identity::unreadable(&f.message)))?;
        analyse(&img, kind, pipeline.segmenter(), faces)
    })
    .await?;
    super::measured(ctx, task, &preview, model_used, started, &report).await
}

/// Measures `img` for a preset of type `kind`: the draft, a preview and
/// what ran. Blocking.
pub fn analyse(
    img: &DynamicImage,
    kind: PresetType,
    segmenter: Option<&AtelierEngine>,
    faces: Option<Arc<FaceKit>>,
) -> Result<(ExtractionReport, RgbaImage, String), TaskFailure> {
    let rgb = analysis_copy(img)?;
    let labs = analysis::lab_image(&rgb);
    if kind == PresetType::ModelSwap {
        let report = ExtractionReport {
            instruction_data: json!({}),
            suggested_name: None,
            suggested_description: Some(
                "A model-swap preset holds engine options only; nothing in it can be measured from a photo."
                    .into(),
            ),
            measurements: json!({}),
        };
        return Ok((report, DynamicImage::ImageRgb8(rgb).to_rgba8(), "atelier-analysis".into()));
    }
    let (mask, mask_source) = match segmenter {
        Some(s) => (
            s.mask(&DynamicImage::ImageRgb8(rgb.clone()))?,
            format!("{} mask", s.isnet_variant),
        ),
        None => (analysis::border_mask(&rgb, &labs), "border-colour mask".to_string()),
    };
    let mut model_used = format!("atelier-analysis ({mask_source}");
    let report = match kind {
        PresetType::CreatePackshot => packshot(&rgb, &labs, &mask)?,
        PresetType::Flat2Model => {
            if faces.is_some() {
                model_used.push_str(" + scrfd");
            }
            on_model(&rgb, &labs, &mask, faces.as_deref())?
        }
        PresetType::IdentityCreation => {
            model_used.push_str(" + scrfd");
            let kit = faces.ok_or_else(|| TaskFailure::retryable("this worker has no face models loaded"))?;
            identity(&rgb, &labs, segmenter.map(|_| &mask), &kit)?
        }
        PresetType::ModelSwap => unreachable!("answered above"),
    };
    model_used.push(')');
    Ok((report, preview(&rgb, &mask), model_used))
}

/// The image scaled to at most [`ANALYSIS_EDGE`] on its long side.
fn analysis_copy(img: &DynamicImage) -> Result<RgbImage, TaskFailure> {
    let (w, h) = (img.width(), img.height());
    let long = w.max(h).max(1);
    if long <= ANALYSIS_EDGE {
        return Ok(img.to_rgb8());
    }
    let s = f64::from(ANALYSIS_EDGE) / f64::from(long);
    let (tw, th) = (
        ((f64::from(w) * s).round() as u32).max(1),
        ((f64::from(h) * s).round() as u32).max(1),
    );
    Ok(DynamicImage::ImageRgba8(imaging::resize(img, tw, th)?).to_rgb8())
}

/// The analysed image with what the mask leaves out dimmed halfway to grey.
fn preview(rgb: &RgbImage, mask: &GrayImage) -> RgbaImage {
    RgbaImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let p = rgb.get_pixel(x, y).0;
        let m = f32::from(mask.get_pixel(x, y).0[0]) / 255.0;
        let k = 0.5 + 0.5 * m;
        let mix = |c: u8| (f32::from(c) * k + 128.0 * (1.0 - k)).round() as u8;
        image::Rgba([mix(p[0]), mix(p[1]), mix(p[2]), 255])
    })
}

/// The colours of the mask's foreground (≥ 128).
fn subject_palette(labs: &[Lab], mask: &GrayImage) -> Vec<analysis::Swatch> {
    let px: Vec<Lab> = labs
        .iter()
        .zip(mask.pixels())
        .filter(|(_, m)| m.0[0] >= 128)
        .map(|(l, _)| *l)
        .collect();
    analysis::palette(&px, 5)
}

fn palette_words(p: &[analysis::Swatch]) -> Option<String> {
    let names: Vec<&str> = p
        .iter()
        .filter(|s| s.share >= PALETTE_MIN_SHARE)
        .take(4)
        .map(|s| s.name)
        .collect();
    (!names.is_empty()).then(|| names.join(", "))
}

fn r2(v: f32) -> f64 {
    (f64::from(v) * 100.0).round() / 100.0
}

fn placement_figures(p: &Placement) -> Value {
    json!({
        "bbox": p.bbox,
        "fill": r2(p.fill),
        "margins_left_top_right_bottom": p.margins.map(r2),
        "centre": p.centre.map(r2),
    })
}

fn backdrop_figures(b: &analysis::Backdrop) -> Value {
    json!({
        "class": format!("{:?}", b.class).to_lowercase(),
        "lab": b.lab.map(r2),
        "std_l": r2(b.std_l),
        "grain": r2(b.grain),
        "block_std": r2(b.block_std),
    })
}

fn light_figures(l: &analysis::LightReading) -> Value {
    json!({
        "left_minus_right": r2(l.left_minus_right),
        "top_minus_bottom": r2(l.top_minus_bottom),
        "contrast": r2(l.contrast),
        "midtones": r2(l.midtones),
    })
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// A packshot draft: framing and composition from the product's box,
/// `color_palette` from its pixels, style and background (or surface)
/// from the backdrop, the shadow under it, the light on its main colour.
fn packshot(rgb: &RgbImage, labs: &[Lab], mask: &GrayImage) -> Result<ExtractionReport, TaskFailure> {
    let (w, h) = rgb.dimensions();
    let place = analysis::placement(mask).ok_or_else(|| {
        TaskFailure::permanent("no product found: nothing in the image stands out from its background")
    })?;
    let pal = subject_palette(labs, mask);
    let bd = analysis::backdrop(labs, mask, Some(&place));
    stands_out(&pal, bd.as_ref(), "product")?;
    let mut d = Map::new();
    let mut said: Vec<String> = Vec::new();
    let style = match bd.as_ref().map(|b| b.class) {
        Some(BackdropClass::White) => "white_cutout",
        Some(BackdropClass::Textured) => "flat_lay",
        Some(BackdropClass::Scene) => "marketing_ready",
        Some(BackdropClass::Plain) | None => "free",
    };
    d.insert("style".into(), json!(style));
    if let Some(b) = &bd {
        let key = if b.class == BackdropClass::Textured { "surface" } else { "background" };
        d.insert(key.into(), json!(b.words()));
        said.push(b.words());
    }
    if let Some(words) = palette_words(&pal) {
        said.insert(0, format!("{words} product"));
        d.insert("color_palette".into(), json!(words));
    }
    let shadow = bd
        .as_ref()
        .filter(|b| b.class != BackdropClass::Scene)
        .and_then(|b| analysis::shadow(labs, mask, &place, b.lab[0]));
    if let Some(s) = &shadow {
        d.insert("shadow".into(), json!(s.kind()));
        said.push(match s.kind() {
            "none" => "no shadow".to_string(),
            k => format!("{} shadow", k.replace('_', " ")),
        });
    }
    let light = pal
        .first()
        .and_then(|main| analysis::light(labs, mask, &place, main.lab));
    if let Some(l) = &light {
        d.insert(
            "lighting".into(),
            json!({"direction": l.direction(), "quality": l.quality()}),
        );
        said.push(format!("{} light from the {}", l.quality(), l.direction()));
    }
    d.insert("framing".into(), json!(place.framing(w, h)));
    d.insert("composition".into(), json!(place.composition()));
    let name = format!(
        "{}{}",
        capitalised(&style.replace('_', " ")),
        pal.first().map(|s| format!(", {}", s.name)).unwrap_or_default()
    );
    Ok(ExtractionReport {
        instruction_data: Value::Object(d),
        suggested_name: Some(name),
        suggested_description: Some(format!("Measured: {}.", said.join(", "))),
        measurements: json!({
            "image": [w, h],
            "placement": placement_figures(&place),
            "palette": pal.iter().map(|s| json!({"name": s.name, "share": r2(s.share), "lab": s.lab.map(|v| r2(v))})).collect::<Vec<_>>(),
            "backdrop": bd.as_ref().map(backdrop_figures),
            "shadow_darkening_near_far": shadow.as_ref().map(|s| [r2(s.near), r2(s.far)]),
            "light": light.as_ref().map(light_figures),
        }),
    })
}

/// A segmenter stretches whatever it sees to a full mask, even on a
/// plain image: a subject whose main colour is the backdrop's (ΔE < 5)
/// is no subject.
fn stands_out(
    pal: &[analysis::Swatch],
    bd: Option<&analysis::Backdrop>,
    what: &str,
) -> Result<(), TaskFailure> {
    match (pal.first(), bd) {
        (Some(main), Some(b)) if analysis::delta_e(main.lab, b.lab) < 5.0 => Err(TaskFailure::permanent(format!(
            "no {what} found: nothing in the image stands out from its background"
        ))),
        _ => Ok(()),
    }
}

/// An on-model (flat-2-model) draft: the backdrop, the light on the
/// person's main colour, and the camera's distance from how many face
/// heights the person spans.
fn on_model(
    rgb: &RgbImage,
    labs: &[Lab],
    mask: &GrayImage,
    faces: Option<&FaceKit>,
) -> Result<ExtractionReport, TaskFailure> {
    let place = analysis::placement(mask).ok_or_else(|| {
        TaskFailure::permanent("no person found: nothing in the image stands out from its background")
    })?;
    let bd = analysis::backdrop(labs, mask, Some(&place));
    let pal = subject_palette(labs, mask);
    stands_out(&pal, bd.as_ref(), "person")?;
    let face = match faces {
        Some(kit) => kit
            .detector
            .detect(rgb, kit.min_score)
            .map_err(|e| TaskFailure::retryable(format!("face detector: {e}")))?
            .into_iter()
            .max_by(|a, b| (a.width() * a.height()).total_cmp(&(b.width() * b.height()))),
        None => None,
    };
    let mut d = Map::new();
    let mut said = Vec::new();
    if let Some(b) = &bd {
        d.insert("background".into(), json!(b.words()));
        said.push(b.words());
    }
    let light = pal
        .first()
        .and_then(|main| analysis::light(labs, mask, &place, main.lab));
    if let Some(l) = &light {
        let words = format!("{} light from the {}", l.quality(), l.direction());
        d.insert("lighting".into(), json!(words));
        said.push(words);
    }
    let span = face
        .as_ref()
        .map(|f| (place.bbox[3] - place.bbox[1]) as f32 / f.height().max(1.0));
    if let Some(s) = span {
        let camera = if s >= 6.0 {
            "full body"
        } else if s >= 2.8 {
            "waist up"
        } else {
            "close-up"
        };
        d.insert("camera".into(), json!(camera));
        said.push(format!("{camera} framing"));
    }
    let name = said.first().map(|s| capitalised(s));
    Ok(ExtractionReport {
        instruction_data: Value::Object(d),
        suggested_name: name,
        suggested_description: (!said.is_empty()).then(|| format!("Measured: {}.", said.join(", "))),
        measurements: json!({
            "image": [rgb.width(), rgb.height()],
            "placement": placement_figures(&place),
            "backdrop": bd.as_ref().map(backdrop_figures),
            "light": light.as_ref().map(light_figures),
            "person_height_in_face_heights": span.map(r2),
        }),
    })
}

/// An identity draft: the `appearance`, `face` and `hair` groups measured
/// on the photo's one face.
fn identity(
    rgb: &RgbImage,
    labs: &[Lab],
    person: Option<&GrayImage>,
    kit: &FaceKit,
) -> Result<ExtractionReport, TaskFailure> {
    let face = kit.single_face(rgb)?;
    let reading = analysis::face_reading(rgb, labs, &face, person);
    let mut words = Vec::new();
    if let Some(c) = reading.hair_colour {
        words.push(format!("{c} hair"));
    }
    if let Some(s) = reading.skin {
        words.push(format!("{s} skin"));
    }
    words.push(format!("{} face", reading.face_shape));
    Ok(ExtractionReport {
        instruction_data: reading.groups(),
        suggested_name: Some(capitalised(&words.join(", "))),
        suggested_description: Some(format!(
            "Measured on the face: {}, {} expression{}.",
            words.join(", "),
            reading.expression,
            reading
                .hair_length
                .map(|l| format!(", {l} hair"))
                .unwrap_or_default()
        )),
        measurements: json!({
            "image": [rgb.width(), rgb.height()],
            "face_box": face.bbox.map(|v| r2(v)),
            "face_score": r2(face.score),
            "face": reading.measurements,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::tests::drawn;

    #[test]
    fn a_drawn_packshot_gives_a_draft_the_packshot_validator_reads() {
        let img = DynamicImage::ImageRgb8(drawn([255, 255, 255], |u| 1.15 - 0.35 * u, 0));
        let (report, preview, model) = analyse(&img, PresetType::CreatePackshot, None, None).unwrap();
        let d = &report.instruction_data;
        assert_eq!(d["style"], "white_cutout");
        assert_eq!(d["background"], "pure white seamless background");
        assert!(d["color_palette"].as_str().unwrap().starts_with("red"), "{d}");
        assert_eq!(d["lighting"], json!({"direction": "left", "quality": "soft"}));
        assert_eq!(d["shadow"], "none");
        assert_eq!(d["framing"], "square_packshot");
        assert_eq!(report.suggested_name.as_deref(), Some("White cutout, red"));
        assert!(
            report.suggested_description.as_deref().is_some_and(|t| t.contains(", no shadow,")),
            "{:?}",
            report.suggested_description
        );
        assert_eq!(preview.dimensions(), (400, 400));
        assert!(model.contains("border-colour mask"), "{model}");
    }

    #[test]
    fn a_model_swap_draft_says_nothing_it_did_not_measure() {
        let img = DynamicImage::ImageRgb8(drawn([255, 255, 255], |_| 1.0, 0));
        let (report, _, _) = analyse(&img, PresetType::ModelSwap, None, None).unwrap();
        assert_eq!(report.instruction_data, json!({}));
    }

    #[test]
    fn an_image_with_nothing_in_it_is_refused_with_the_reason() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, image::Rgb([250, 250, 250])));
        let e = analyse(&img, PresetType::CreatePackshot, None, None).unwrap_err();
        assert!(e.message.starts_with("no product found"), "{}", e.message);
    }
}
