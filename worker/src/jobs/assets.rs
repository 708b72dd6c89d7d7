//! `asset_tagging` (contract §2.6): looks once at an uploaded picture and
//! says what kind it is (see [`Detected::tag`]). The output's image is a
//! 512 px preview (the asset's `thumbnail_big`, its thumbnail the
//! `thumbnail_small`); its description is the tag and the measurements.

use super::off_runtime;
use crate::analysis::{self, BackdropClass};
use crate::context::WorkerContext;
use crate::faces::FaceKit;
use crate::failure::TaskFailure;
use crate::imaging;
use atelier_shared::domain::assets::{AssetReport, Detected, TaggingSpec};
use atelier_shared::domain::identity::round3;
use atelier_shared::domain::{OutputResult, Task};
use image::DynamicImage;
use std::time::Instant;

/// Long edge of the preview and of the copy the backdrop analysis reads.
const PREVIEW_EDGE: u32 = 512;

pub(super) async fn run(
    ctx: &WorkerContext,
    task: &Task,
    spec: &TaggingSpec,
) -> Result<OutputResult, TaskFailure> {
    // The identity queue's workers have the face models; a person's photo
    // is never tagged without looking for faces.
    let faces = super::identity::face_kit(ctx)?;
    let bytes = super::input(ctx, task, &spec.file_id).await?;
    let max_pixels = ctx.max_input_pixels;
    let started = Instant::now();
    let (detected, preview) = off_runtime(ctx, move || {
        let img = imaging::decode_limited(&bytes, max_pixels)
            .map_err(|f| TaskFailure::permanent(super::identity::unreadable(&f.message)))?;
        look(&img, Some(&faces))
    })
    .await?;
    let report = AssetReport {
        tags: vec![detected.tag().to_string()],
        detected,
    };
    super::measured(
        ctx,
        task,
        &preview.to_rgba8(),
        "atelier-analysis (scrfd, border-colour mask)".into(),
        started,
        &report,
    )
    .await
}

/// Measures `img`: faces (`None`: not looked for), then what
/// stands out from the border's colour on a 512 px copy and what
/// surrounds it. Returns the measurements and the copy. Blocking.
pub fn look(
    img: &DynamicImage,
    faces: Option<&FaceKit>,
) -> Result<(Detected, DynamicImage), TaskFailure> {
    let small = if img.width().max(img.height()) > PREVIEW_EDGE {
        img.resize(
            PREVIEW_EDGE,
            PREVIEW_EDGE,
            image::imageops::FilterType::Triangle,
        )
    } else {
        img.clone()
    };
    let (faces, largest_face) = match faces {
        Some(kit) => {
            let rgb = img.to_rgb8();
            let found = kit
                .detector
                .detect(&rgb, kit.min_score)
                .map_err(|e| TaskFailure::retryable(format!("face detector: {e}")))?;
            let short = rgb.width().min(rgb.height()).max(1) as f32;
            let largest = found
                .iter()
                .map(|f| f.width().min(f.height()) / short)
                .fold(0.0f32, f32::max);
            (Some(found.len() as u32), Some(round3(largest)))
        }
        None => (None, None),
    };
    let rgb = small.to_rgb8();
    let labs = analysis::lab_image(&rgb);
    let mask = analysis::border_mask(&rgb, &labs);
    let placement = analysis::placement(&mask);
    let backdrop = analysis::backdrop(&labs, &mask, placement.as_ref());
    let (subject_fill, subject_edges) = match &placement {
        Some(p) => (
            round3(p.fill),
            p.margins.iter().filter(|m| **m < 0.02).count() as u32,
        ),
        None => (0.0, 0),
    };
    let plain_backdrop = backdrop.is_some_and(|b| b.class != BackdropClass::Scene);
    Ok((
        Detected {
            faces,
            largest_face,
            subject_fill,
            subject_edges,
            plain_backdrop,
        },
        small,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn tag(img: RgbImage) -> (String, Detected, (u32, u32)) {
        let (d, preview) = look(&DynamicImage::ImageRgb8(img), None).expect("look");
        (d.tag().to_string(), d, preview.to_rgb8().dimensions())
    }

    #[test]
    fn drawn_pictures_get_the_tag_their_content_means() {
        // A red garment-sized block on white: a product shot.
        let product = RgbImage::from_fn(800, 1000, |x, y| {
            if (250..550).contains(&x) && (200..800).contains(&y) {
                Rgb([200, 30, 40])
            } else {
                Rgb([250, 250, 250])
            }
        });
        let (t, d, size) = tag(product);
        assert_eq!(t, "product", "{d:?}");
        assert!((d.subject_fill - 0.225).abs() < 0.02, "{d:?}");
        assert_eq!((d.subject_edges, d.plain_backdrop), (0, true));
        assert_eq!(d.faces, None, "no face models: not looked for");
        assert_eq!(size, (410, 512), "the 512 px preview");
        // One flat colour: nothing stands out.
        let (t, d, _) = tag(RgbImage::from_pixel(300, 200, Rgb([120, 90, 60])));
        assert_eq!((t.as_str(), d.subject_fill), ("background", 0.0));
        // A sky-like gradient: what differs runs across the frame.
        let sky = RgbImage::from_fn(400, 300, |x, y| {
            Rgb([
                (90 + y / 3) as u8,
                (140 + y / 4) as u8,
                (230 - x / 20) as u8,
            ])
        });
        let (t, d, _) = tag(sky);
        assert_eq!(t, "background", "{d:?}");
    }
}
