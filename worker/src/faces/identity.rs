//! Identity building: the `identity_preprocessing` job of an uploaded
//! identity (one photo) or a profile (several photos of one subject).
//!
//! Per photo: decode (guarded), detect faces (SCRFD), refuse photos with no
//! face, several faces or a face too small, score the face's quality
//! (detector confidence, size, sharpness), align it on the ArcFace template
//! and embed it. A profile then keeps the photos that agree: the mean of
//! the unit embeddings, re-estimated without photos whose similarity to it
//! is low in absolute terms or far below the others' (median − 3·MAD),
//! until nothing changes. The identity keeps its best face as a 512×512
//! aligned crop (known landmark positions, used by model swap) and the unit
//! mean embedding.

use super::align::{self, CROP_SIZE};
use super::detect::Face;
use super::kit::FaceKit;
use crate::failure::TaskFailure;
use crate::imaging;
use atelier_shared::domain::identity::{
    FaceRecord, IdentityKind, POV_SIZE, PhotoReport, PreprocessSpec,
};
use image::{DynamicImage, GrayImage, RgbImage};

/// Similarity to the profile's mean below which a photo shows someone else.
const SAME_PERSON: f32 = 0.35;
/// Quality below which a profile photo is not used (too blurred or small).
const MIN_QUALITY: f32 = 0.2;

/// Sharpness of an aligned face: variance of the Laplacian of its grey
/// image (blur lowers it), mapped to 0–1.
fn sharpness(aligned: &RgbImage) -> f32 {
    let g: GrayImage = image::imageops::grayscale(aligned);
    let (w, h) = g.dimensions();
    let mut vals = Vec::with_capacity((w * h) as usize);
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let p = |dx: i32, dy: i32| {
                f32::from(g.get_pixel((x as i32 + dx) as u32, (y as i32 + dy) as u32)[0])
            };
            vals.push(p(-1, 0) + p(1, 0) + p(0, -1) + p(0, 1) - 4.0 * p(0, 0));
        }
    }
    if vals.is_empty() {
        return 0.0;
    }
    let mean = vals.iter().sum::<f32>() / vals.len() as f32;
    let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vals.len() as f32;
    (var / 200.0).min(1.0)
}

/// A photo's face quality, 0–1: detector confidence × size × sharpness.
fn quality(face: &Face, aligned: &RgbImage) -> f32 {
    let size = (face.width().min(face.height()) / 112.0).min(1.0);
    let q = face.score.clamp(0.0, 1.0) * (0.5 + 0.5 * size) * (0.4 + 0.6 * sharpness(aligned));
    (q * 1000.0).round() / 1000.0
}

/// One photo as the worker received it: decoded, or why not.
pub type PhotoInput = Result<DynamicImage, String>;

/// A built identity: its crop (JPEG), thumbnail, unit embedding and record
/// (the embedding key is filled in by the caller once stored).
pub struct Built {
    pub crop_jpeg: Vec<u8>,
    pub thumb_jpeg: Vec<u8>,
    pub embedding: Vec<f32>,
    pub record: FaceRecord,
    /// An identity's points of view in photo order: photo index, image
    /// (JPEG) and thumbnail. The caller stores them and lists their keys in
    /// `record.povs`.
    pub povs: Vec<(u32, Vec<u8>, Vec<u8>)>,
}

/// A photo whose face can join the identity: what the build keeps of it
/// (a 512×512 aligned crop, not the photo, so a profile of many large
/// photos holds a few megabytes at a time).
pub struct Candidate {
    index: usize,
    face: Face,
    crop: RgbImage,
    photo_size: (u32, u32),
    embedding: Vec<f32>,
    quality: f32,
    /// The photo normalised to a point of view (identities only).
    pov: Option<RgbImage>,
}

/// Photos are analysed at most this large (long edge, contract §9.1).
pub const MAX_EDGE: u32 = 4096;

/// Analyses photo `index`: its report and, when usable, its candidate.
/// `strict` (an identity's single photo) makes every problem the build's
/// failure. Blocking (models run here).
pub fn analyze(
    kit: &FaceKit,
    index: usize,
    photo: PhotoInput,
    strict: bool,
) -> Result<(PhotoReport, Option<Candidate>), TaskFailure> {
    let mut report = PhotoReport {
        index: index as u32,
        accepted: false,
        reason: None,
        face_score: None,
        face_px: None,
        quality: None,
        similarity: None,
    };
    let img = match photo {
        Ok(img) => img,
        Err(reason) if strict => return Err(TaskFailure::permanent(reason)),
        Err(reason) => {
            report.reason = Some(reason);
            return Ok((report, None));
        }
    };
    let img = if img.width().max(img.height()) > MAX_EDGE {
        img.resize(MAX_EDGE, MAX_EDGE, image::imageops::FilterType::Triangle)
    } else {
        img
    };
    let rgb = img.to_rgb8();
    drop(img);
    let face = match kit.single_face(&rgb) {
        Ok(f) => f,
        Err(f) if strict || f.kind != atelier_shared::domain::FailureKind::Permanent => {
            return Err(f);
        }
        Err(f) => {
            report.reason = Some(f.message);
            return Ok((report, None));
        }
    };
    let aligned = align::align(&rgb, &face);
    let q = quality(&face, &aligned);
    report.face_score = Some((face.score * 1000.0).round() / 1000.0);
    report.face_px = Some(face.width().min(face.height()).round());
    report.quality = Some(q);
    if !strict && q < MIN_QUALITY {
        report.reason = Some(format!(
            "face quality {q:.2} below {MIN_QUALITY} (blurred or small)"
        ));
        return Ok((report, None));
    }
    let embedding = kit
        .embedder
        .embed(&aligned)
        .map_err(|e| TaskFailure::retryable(format!("face embedder: {e}")))?;
    let crop = align::align_to(&rgb, &face.landmarks, &align::crop_template(), CROP_SIZE);
    // An identity keeps each photo as a point of view; a profile's photos
    // serve only its embedding and best crop.
    let pov = strict.then(|| {
        align::align_to(
            &rgb,
            &face.landmarks,
            &align::pov_template(POV_SIZE),
            POV_SIZE,
        )
    });
    Ok((
        report,
        Some(Candidate {
            index,
            face,
            crop,
            photo_size: rgb.dimensions(),
            embedding,
            quality: q,
            pov,
        }),
    ))
}

/// Builds the identity from its photos. Blocking (models run here).
pub fn build(
    kit: &FaceKit,
    spec: &PreprocessSpec,
    photos: Vec<PhotoInput>,
) -> Result<Built, TaskFailure> {
    let strict = spec.kind == IdentityKind::Identity;
    let mut reports = Vec::with_capacity(photos.len());
    let mut candidates = Vec::new();
    for (index, photo) in photos.into_iter().enumerate() {
        let (report, candidate) = analyze(kit, index, photo, strict)?;
        reports.push(report);
        candidates.extend(candidate);
    }
    assemble(spec, reports, candidates)
}

/// Keeps the candidates that agree and makes the identity of them:
/// robust mean embedding, best crop, reports. `reports[i]` is photo `i`'s.
pub fn assemble(
    spec: &PreprocessSpec,
    mut reports: Vec<PhotoReport>,
    candidates: Vec<Candidate>,
) -> Result<Built, TaskFailure> {
    let (kept, mean) = robust_mean(&candidates);
    for c in &candidates {
        let sim = align::cosine(&c.embedding, &mean);
        let Some(r) = reports.get_mut(c.index) else {
            continue;
        };
        r.similarity = Some((sim * 1000.0).round() / 1000.0);
        if kept.contains(&c.index) {
            r.accepted = true;
        } else {
            r.reason = Some(format!(
                "another person than the others (similarity {sim:.2})"
            ));
        }
    }
    if (kept.len() as u32) < spec.min_usable.max(1) {
        let mut why: Vec<String> = reports
            .iter()
            .filter_map(|r| {
                r.reason
                    .as_ref()
                    .map(|m| format!("photo {}: {m}", r.index + 1))
            })
            .collect();
        why.truncate(5);
        let what = match spec.kind {
            IdentityKind::Identity => "points of view show one person",
            IdentityKind::Profile => "photos show the subject clearly",
        };
        return Err(TaskFailure::permanent(format!(
            "no usable photo set: {} of {} {what}, {} needed ({})",
            kept.len(),
            reports.len(),
            spec.min_usable.max(1),
            why.join("; ")
        )));
    }
    // The best face: quality, then agreement with the identity.
    let best = candidates
        .iter()
        .filter(|c| kept.contains(&c.index))
        .max_by(|a, b| {
            let score =
                |c: &Candidate| c.quality * (0.5 + 0.5 * align::cosine(&c.embedding, &mean));
            score(a).total_cmp(&score(b))
        })
        .ok_or_else(|| TaskFailure::permanent("no usable photo"))?;
    let template = align::crop_template();
    let crop_rgba = DynamicImage::ImageRgb8(best.crop.clone()).to_rgba8();
    let crop_jpeg = imaging::encode(
        &crop_rgba,
        atelier_shared::domain::packshot::ImageFormat::Jpg,
    )?;
    let thumb_jpeg = imaging::thumbnail(&crop_rgba)?;
    let used: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| kept.contains(&c.index))
        .collect();
    let quality_score = used.iter().map(|c| c.quality).fold(0.0f32, f32::max);
    let mut povs = Vec::new();
    for c in &used {
        if let Some(pov) = &c.pov {
            let rgba = DynamicImage::ImageRgb8(pov.clone()).to_rgba8();
            povs.push((
                c.index as u32,
                imaging::encode(&rgba, atelier_shared::domain::packshot::ImageFormat::Jpg)?,
                imaging::thumbnail(&rgba)?,
            ));
        }
    }
    povs.sort_by_key(|p| p.0);
    Ok(Built {
        crop_jpeg,
        thumb_jpeg,
        povs,
        embedding: mean,
        record: FaceRecord {
            embedding_key: String::new(),
            dims: 0,
            crop_size: CROP_SIZE,
            landmarks: template,
            quality_score: (quality_score * 1000.0).round() / 1000.0,
            photo_index: best.index as u32,
            face_box: best.face.bbox.map(|v| v.round()),
            photo_width: best.photo_size.0,
            photo_height: best.photo_size.1,
            photos: reports,
            povs: Vec::new(),
        },
    })
}

/// Indices of the candidates that agree, and their unit mean embedding.
fn robust_mean(candidates: &[Candidate]) -> (Vec<usize>, Vec<f32>) {
    let mut kept: Vec<usize> = (0..candidates.len()).collect();
    let mut mean = unit_mean(candidates, &kept);
    for _ in 0..5 {
        if kept.len() <= 2 {
            break;
        }
        let sims: Vec<f32> = kept
            .iter()
            .map(|&i| align::cosine(&candidates[i].embedding, &mean))
            .collect();
        let med = median(&sims);
        let mad = median(&sims.iter().map(|s| (s - med).abs()).collect::<Vec<_>>());
        let floor = SAME_PERSON.max(med - 3.0 * mad.max(0.02));
        let next: Vec<usize> = kept
            .iter()
            .zip(&sims)
            .filter(|(_, s)| **s >= floor)
            .map(|(i, _)| *i)
            .collect();
        if next.len() == kept.len() || next.is_empty() {
            break;
        }
        kept = next;
        mean = unit_mean(candidates, &kept);
    }
    // Two photos that disagree: nothing says which one is the subject.
    if kept.len() == 2
        && align::cosine(
            &candidates[kept[0]].embedding,
            &candidates[kept[1]].embedding,
        ) < SAME_PERSON
    {
        kept.truncate(0);
    }
    (kept.iter().map(|&i| candidates[i].index).collect(), mean)
}

fn unit_mean(candidates: &[Candidate], idx: &[usize]) -> Vec<f32> {
    let dims = candidates.first().map(|c| c.embedding.len()).unwrap_or(0);
    let mut sum = vec![0.0f32; dims];
    for &i in idx {
        for (s, v) in sum.iter_mut().zip(&candidates[i].embedding) {
            *s += v;
        }
    }
    let n = sum
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    sum.into_iter().map(|v| v / n).collect()
}

fn median(v: &[f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f32::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 0 {
        (s[m - 1] + s[m]) / 2.0
    } else {
        s[m]
    }
}

/// Little-endian f32 bytes of an embedding (how it is stored).
pub fn embedding_bytes(e: &[f32]) -> Vec<u8> {
    e.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// An embedding read back from its stored bytes.
pub fn embedding_from_bytes(b: &[u8]) -> Result<Vec<f32>, String> {
    if b.len() % 4 != 0 || b.is_empty() {
        return Err(format!(
            "embedding of {} bytes is not a list of f32",
            b.len()
        ));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::faces::align::FaceEmbedder;
    use crate::faces::detect::FaceDetector;
    use crate::inference::{ModelOptions, default_models_dir};
    use atelier_shared::domain::identity::PhotoSource;

    pub(crate) fn kit() -> FaceKit {
        let dir = default_models_dir();
        let rt = crate::inference::test_runtime();
        let opts = ModelOptions::default();
        FaceKit {
            detector: FaceDetector::load(&rt, &dir.join("scrfd.onnx"), opts)
                .expect("SCRFD (scripts/fetch-models)"),
            embedder: FaceEmbedder::load(&rt, &dir.join("arcface_faceplugin.onnx"), opts)
                .expect("ArcFace (scripts/fetch-models)"),
            swapper: None,
            min_face_px: 48.0,
            min_score: 0.5,
        }
    }

    pub(crate) fn photo(name: &str) -> DynamicImage {
        image::open(default_models_dir().join("testdata").join(name)).expect("test photo")
    }

    fn spec(kind: IdentityKind, n: usize, min_usable: u32) -> PreprocessSpec {
        PreprocessSpec {
            identity_code: "idn_test".into(),
            kind,
            photos: (0..n)
                .map(|i| PhotoSource::Url {
                    url: format!("http://example.test/{i}"),
                })
                .collect(),
            min_usable,
            replaces: false,
        }
    }

    #[test]
    fn one_face_builds_an_identity_and_problems_are_named() {
        let kit = kit();
        let built = build(
            &kit,
            &spec(IdentityKind::Identity, 1, 1),
            vec![Ok(photo("newton.png"))],
        )
        .expect("builds");
        assert_eq!(built.embedding.len(), 512);
        let n: f32 = built.embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-3, "unit embedding, norm {n}");
        assert!(built.record.quality_score > 0.3, "{:?}", built.record);
        let crop = image::load_from_memory(&built.crop_jpeg).expect("crop");
        assert_eq!((crop.width(), crop.height()), (CROP_SIZE, CROP_SIZE));
        // The crop really is the face: it embeds as the same person.
        let again = kit.single_face(&crop.to_rgb8()).expect("face in the crop");
        let e = kit
            .embedder
            .embed(&align::align(&crop.to_rgb8(), &again))
            .expect("embeds");
        assert!(align::cosine(&e, &built.embedding) > 0.9);

        // Two faces side by side.
        let (a, b) = (
            photo("newton.png").to_rgb8(),
            photo("newton.png").fliph().to_rgb8(),
        );
        let h = a.height().max(b.height());
        let mut both = RgbImage::new(a.width() + b.width(), h);
        image::imageops::replace(&mut both, &a, 0, 0);
        image::imageops::replace(&mut both, &b, i64::from(a.width()), 0);
        let e = build(
            &kit,
            &spec(IdentityKind::Identity, 1, 1),
            vec![Ok(DynamicImage::ImageRgb8(both))],
        )
        .err()
        .expect("refused");
        assert!(
            e.message.starts_with("several faces detected (2)"),
            "{}",
            e.message
        );

        // A tiny face.
        let small = photo("newton.png").resize(120, 120, image::imageops::FilterType::Triangle);
        let e = build(&kit, &spec(IdentityKind::Identity, 1, 1), vec![Ok(small)])
            .err()
            .expect("refused");
        assert!(e.message.starts_with("face too small"), "{}", e.message);

        // No face; an unreadable photo.
        let garment = image::open(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/garment.jpg"),
        )
        .expect("garment");
        let e = build(&kit, &spec(IdentityKind::Identity, 1, 1), vec![Ok(garment)])
            .err()
            .expect("refused");
        assert_eq!(e.message, "no face detected");
        let e = build(
            &kit,
            &spec(IdentityKind::Identity, 1, 1),
            vec![Err("unreadable image: truncated".into())],
        )
        .err()
        .expect("refused");
        assert_eq!(e.message, "unreadable image: truncated");
    }

    #[test]
    fn a_profile_drops_the_photo_of_someone_else() {
        let kit = kit();
        let newton = photo("newton.png");
        let photos = vec![
            Ok(newton.clone()),
            Ok(newton.fliph()),
            Ok(newton.brighten(25)),
            Ok(photo("gauss.png")),
            Err(
                "photo unavailable: http://example.test/4: the server answered 404 Not Found"
                    .into(),
            ),
        ];
        let built = build(&kit, &spec(IdentityKind::Profile, 5, 3), photos).expect("builds");
        let accepted: Vec<u32> = built
            .record
            .photos
            .iter()
            .filter(|p| p.accepted)
            .map(|p| p.index)
            .collect();
        assert_eq!(accepted, vec![0, 1, 2], "{:#?}", built.record.photos);
        assert!(
            built.record.photos[3]
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("another person"))
        );
        assert!(
            built.record.photos[4]
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("404"))
        );
        assert!(built.record.photo_index <= 2);

        // Needing four usable photos of three: the build fails with reasons.
        let photos = vec![
            Ok(newton.clone()),
            Ok(newton.fliph()),
            Ok(photo("gauss.png")),
        ];
        let e = build(&kit, &spec(IdentityKind::Profile, 3, 3), photos)
            .err()
            .expect("refused");
        assert!(e.message.starts_with("no usable photo"), "{}", e.message);
        assert!(
            e.message.contains("photo 3: another person"),
            "{}",
            e.message
        );
    }

    #[test]
    fn large_photos_are_analysed_at_4096_pixels_and_only_a_crop_is_kept() {
        let kit = kit();
        let big = photo("newton.png").resize(6144, 6144, image::imageops::FilterType::Triangle);
        assert_eq!(big.width(), 6144);
        let (report, candidate) = analyze(&kit, 0, Ok(big), false).expect("analyses");
        let c = candidate.expect("a usable face");
        assert_eq!(c.photo_size.0, MAX_EDGE, "{report:?}");
        assert_eq!(c.crop.dimensions(), (CROP_SIZE, CROP_SIZE));
    }

    #[test]
    fn embeddings_round_trip_through_bytes() {
        let e = vec![0.25f32, -1.5, 3.0];
        assert_eq!(
            embedding_from_bytes(&embedding_bytes(&e)).expect("decodes"),
            e
        );
        assert!(embedding_from_bytes(&[1, 2, 3]).is_err());
    }
}
