//! Image operations that need no model: guarded decoding, fitting to a
//! requested canvas, encoding and thumbnails. Pure CPU work: callers run it
//! on the blocking pool, never on the async runtime.

use crate::failure::TaskFailure;
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageFormat, ImageReader, Limits, Rgba, RgbaImage};
use std::io::Cursor;

/// Long edge of result thumbnails.
pub const THUMBNAIL_EDGE: u32 = 512;

/// Decodes an uploaded image, refusing anything that is not JPEG, PNG or
/// WebP and anything larger than `max_pixels` *before* allocating for it
/// (decompression bombs: a 50 KB PNG can claim 100,000 × 100,000 pixels).
pub fn decode_limited(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, TaskFailure> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| TaskFailure::permanent(format!("unreadable image: {e}")))?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) => {}
        Some(other) => {
            return Err(TaskFailure::permanent(format!(
                "unsupported image format {other:?}; use JPEG, PNG or WebP"
            )));
        }
        None => {
            return Err(TaskFailure::permanent(
                "not an image: the bytes are not JPEG, PNG or WebP",
            ));
        }
    }
    if reader.format() == Some(ImageFormat::Jpeg)
        && let Some(why) = atelier_shared::domain::images::jpeg_truncation(bytes)
    {
        return Err(TaskFailure::permanent(why));
    }
    let (w, h) = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .and_then(|r| r.into_dimensions().map_err(std::io::Error::other))
        .map_err(|e| TaskFailure::permanent(format!("corrupt image header: {e}")))?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(TaskFailure::permanent(format!(
            "image is {w}x{h} = {pixels} pixels, above the limit of {max_pixels} pixels"
        )));
    }
    let mut reader = reader;
    let mut limits = Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // RGBA16 of the declared size plus decoder scratch.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| TaskFailure::permanent(format!("corrupt image data: {e}")))
}

/// Scales `img` to fit inside `width`×`height` (aspect preserved, centred)
/// and composites it over `background`.
pub fn fit(
    img: &DynamicImage,
    width: u32,
    height: u32,
    background: [u8; 3],
) -> Result<RgbaImage, TaskFailure> {
    let (sw, sh) = (img.width().max(1), img.height().max(1));
    let scale = f64::min(
        f64::from(width) / f64::from(sw),
        f64::from(height) / f64::from(sh),
    );
    let tw = ((f64::from(sw) * scale).round() as u32).clamp(1, width);
    let th = ((f64::from(sh) * scale).round() as u32).clamp(1, height);
    let scaled = resize(img, tw, th)?;
    let mut canvas = RgbaImage::from_pixel(
        width,
        height,
        Rgba([background[0], background[1], background[2], 255]),
    );
    let (ox, oy) = ((width - tw) / 2, (height - th) / 2);
    image::imageops::overlay(&mut canvas, &scaled, i64::from(ox), i64::from(oy));
    Ok(canvas)
}

/// Scales `img` to cover `width`×`height` (aspect preserved) and crops the
/// centre: a photo keeps its framing, with no bars.
pub fn cover(img: &DynamicImage, width: u32, height: u32) -> Result<RgbaImage, TaskFailure> {
    let (sw, sh) = (img.width().max(1), img.height().max(1));
    if (sw, sh) == (width, height) {
        return Ok(img.to_rgba8());
    }
    let scale = f64::max(
        f64::from(width) / f64::from(sw),
        f64::from(height) / f64::from(sh),
    );
    let tw = ((f64::from(sw) * scale).round() as u32).max(width);
    let th = ((f64::from(sh) * scale).round() as u32).max(height);
    let scaled = resize(img, tw, th)?;
    let (ox, oy) = ((tw - width) / 2, (th - height) / 2);
    Ok(image::imageops::crop_imm(&scaled, ox, oy, width, height).to_image())
}

/// High-quality resize (Lanczos3, alpha-aware).
pub fn resize(img: &DynamicImage, width: u32, height: u32) -> Result<RgbaImage, TaskFailure> {
    let src = DynamicImage::ImageRgba8(img.to_rgba8());
    let mut dst = DynamicImage::new_rgba8(width, height);
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new()
        .resize(&src, &mut dst, &opts)
        .map_err(|e| TaskFailure::retryable(format!("resize failed: {e}")))?;
    Ok(dst.to_rgba8())
}

/// Encodes an opaque canvas as JPEG (quality 92) or PNG.
pub fn encode(
    img: &RgbaImage,
    format: atelier_shared::domain::packshot::ImageFormat,
) -> Result<Vec<u8>, TaskFailure> {
    use atelier_shared::domain::packshot::ImageFormat as Out;
    let mut buf = Vec::new();
    let err = |e: image::ImageError| TaskFailure::retryable(format!("encoding failed: {e}"));
    match format {
        Out::Jpg => {
            let rgb = DynamicImage::ImageRgba8(img.clone()).to_rgb8();
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 92);
            rgb.write_with_encoder(enc).map_err(err)?;
        }
        Out::Png => {
            img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png)
                .map_err(err)?;
        }
    }
    Ok(buf)
}

/// A JPEG thumbnail whose long edge is at most [`THUMBNAIL_EDGE`].
pub fn thumbnail(img: &RgbaImage) -> Result<Vec<u8>, TaskFailure> {
    let (w, h) = img.dimensions();
    let scale = f64::from(THUMBNAIL_EDGE) / f64::from(w.max(h).max(1));
    let (tw, th) = if scale < 1.0 {
        (
            ((f64::from(w) * scale).round() as u32).max(1),
            ((f64::from(h) * scale).round() as u32).max(1),
        )
    } else {
        (w, h)
    };
    let small = resize(&DynamicImage::ImageRgba8(img.clone()), tw, th)?;
    encode(&small, atelier_shared::domain::packshot::ImageFormat::Jpg)
}

/// Bounding box of pixels at or above `threshold`.
pub fn bbox(alpha: &image::GrayImage, threshold: u8) -> Option<(u32, u32, u32, u32)> {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in alpha.enumerate_pixels() {
        if p.0[0] >= threshold {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
    }
    (x0 != u32::MAX).then_some((x0, y0, x1, y1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbaImage::from_pixel(w, h, Rgba([200, 30, 30, 255]));
        let mut b = Vec::new();
        img.write_to(&mut Cursor::new(&mut b), ImageFormat::Png)
            .expect("encode");
        b
    }

    #[test]
    fn rejects_garbage_wrong_formats_and_bombs() {
        assert!(
            decode_limited(b"definitely not an image", 1 << 20)
                .unwrap_err()
                .message
                .contains("not an image")
        );
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        assert!(
            decode_limited(gif, 1 << 20)
                .unwrap_err()
                .message
                .contains("unsupported image format")
        );
        let mut truncated = png(64, 64);
        truncated.truncate(60);
        assert!(decode_limited(&truncated, 1 << 20).is_err());
        // A small file that declares a huge canvas is refused before decoding.
        let bomb = png(3000, 3000);
        let e = decode_limited(&bomb, 1_000_000).unwrap_err();
        assert!(e.message.contains("above the limit"), "{}", e.message);
        assert_eq!(e.kind, atelier_shared::domain::FailureKind::Permanent);
    }

    /// Half of a photo is refused, not decoded with a grey fill: JPEG by its
    /// missing end marker, PNG by its decoder.
    #[test]
    fn truncated_photos_are_refused_with_the_reason() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata");
        let noisy = RgbaImage::from_fn(300, 200, |x, y| {
            Rgba([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x ^ y) % 256) as u8,
                255,
            ])
        });
        let encoded =
            encode(&noisy, atelier_shared::domain::packshot::ImageFormat::Jpg).expect("jpg");
        let mut jpegs = vec![encoded];
        for f in ["garment.jpg", "dress.jpg"] {
            jpegs.push(std::fs::read(dir.join(f)).expect("testdata"));
        }
        for whole in jpegs {
            assert!(
                decode_limited(&whole, 1 << 24).is_ok(),
                "a whole JPEG decodes"
            );
            for cut in [whole.len() / 2, whole.len() - 2] {
                let e = decode_limited(&whole[..cut], 1 << 24).unwrap_err();
                assert!(e.message.contains("truncated JPEG"), "{}", e.message);
                assert_eq!(e.kind, atelier_shared::domain::FailureKind::Permanent);
            }
        }
        let mut png_bytes = Vec::new();
        noisy
            .write_to(&mut Cursor::new(&mut png_bytes), ImageFormat::Png)
            .expect("png");
        png_bytes.truncate(png_bytes.len() / 2);
        let e = decode_limited(&png_bytes, 1 << 24).unwrap_err();
        assert!(e.message.contains("corrupt image data"), "{}", e.message);
    }

    #[test]
    fn fit_letterboxes_onto_the_background() {
        let img = decode_limited(&png(100, 50), 1 << 20).expect("decodes");
        let out = fit(&img, 64, 64, [255, 255, 255]).expect("fits");
        assert_eq!(out.dimensions(), (64, 64));
        assert_eq!(
            out.get_pixel(0, 0).0,
            [255, 255, 255, 255],
            "padding is the background"
        );
        let c = out.get_pixel(32, 32).0;
        assert!(c[0] > 150 && c[1] < 80, "centre keeps the image: {c:?}");
        let jpg = encode(&out, atelier_shared::domain::packshot::ImageFormat::Jpg).expect("jpg");
        assert_eq!(&jpg[..2], &[0xFF, 0xD8]);
        let t = thumbnail(&fit(&img, 1024, 768, [0, 0, 0]).expect("fits")).expect("thumb");
        let ti = image::load_from_memory(&t).expect("thumb decodes");
        assert_eq!((ti.width(), ti.height()), (512, 384));
    }

    #[test]
    fn cover_fills_the_canvas_and_keeps_the_centre() {
        // Left half red, right half blue, 200×100 → 100×100: the centre
        // column band stays, both colours present, no padding.
        let img = RgbaImage::from_fn(200, 100, |x, _| {
            if x < 100 {
                Rgba([255, 0, 0, 255])
            } else {
                Rgba([0, 0, 255, 255])
            }
        });
        let out = cover(&DynamicImage::ImageRgba8(img), 100, 100).expect("covers");
        assert_eq!(out.dimensions(), (100, 100));
        assert!(out.get_pixel(10, 50).0[0] > 200, "left of centre is red");
        assert!(out.get_pixel(90, 50).0[2] > 200, "right of centre is blue");
        let same = RgbaImage::from_pixel(8, 8, Rgba([1, 2, 3, 255]));
        assert_eq!(
            cover(&DynamicImage::ImageRgba8(same.clone()), 8, 8).expect("same"),
            same
        );
    }
}
