//! Face pipeline figures on this machine (CPU unless built with `cuda` and
//! `ATELIER_WORKER__DEVICE=cuda`). Run: `cargo bench -p atelier-worker --bench faces`.
//!
//! Prints the median time of: SCRFD detection, one ArcFace embedding (two
//! runs: the face and its mirror), an identity build from one photo, a
//! profile build from ten photos, and a model swap of one product photo
//! (detection + built-in blend), plus the blend alone.

mod common;

use atelier_shared::domain::identity::{IdentityKind, PhotoSource, PreprocessSpec};
use atelier_worker::faces::align::{self, FaceEmbedder};
use atelier_worker::faces::detect::FaceDetector;
use atelier_worker::faces::swapper::IdentityFace;
use atelier_worker::faces::{FaceKit, identity, swap};
use atelier_worker::inference::ModelOptions;
use std::time::Instant;

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut v: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spec(kind: IdentityKind, n: usize) -> PreprocessSpec {
    PreprocessSpec {
        identity_code: "idn_bench".into(),
        kind,
        photos: (0..n)
            .map(|i| PhotoSource::Url {
                url: format!("http://bench.test/{i}"),
            })
            .collect(),
        min_usable: (n as u32).div_ceil(2),
        replaces: false,
    }
}

fn main() {
    let (dir, rt) = common::runtime();
    let opts = ModelOptions::default();
    let kit = FaceKit {
        detector: FaceDetector::load(&rt, &dir.join("scrfd.onnx"), opts).expect("scrfd"),
        embedder: FaceEmbedder::load(&rt, &dir.join("arcface_faceplugin.onnx"), opts)
            .expect("arcface"),
        swapper: None,
        min_face_px: 48.0,
        min_score: 0.5,
    };
    let newton = image::open(dir.join("testdata/newton.png")).expect("newton");
    let gauss = image::open(dir.join("testdata/gauss.png")).expect("gauss");
    let rgb = newton.to_rgb8();
    println!("photo: newton.png {}x{}", rgb.width(), rgb.height());

    let detect = median_ms(10, || {
        kit.detector.detect(&rgb, 0.5).expect("detects");
    });
    let face = kit.single_face(&rgb).expect("one face");
    let aligned = align::align(&rgb, &face);
    let embed = median_ms(10, || {
        kit.embedder.embed(&aligned).expect("embeds");
    });
    let build_one = median_ms(5, || {
        identity::build(
            &kit,
            &spec(IdentityKind::Identity, 1),
            vec![Ok(gauss.clone())],
        )
        .expect("builds");
    });
    let ten: Vec<image::DynamicImage> = (0..10)
        .map(|i| {
            if i % 2 == 0 {
                newton.clone()
            } else {
                newton.fliph()
            }
        })
        .collect();
    let build_ten = median_ms(3, || {
        identity::build(
            &kit,
            &spec(IdentityKind::Profile, 10),
            ten.iter().cloned().map(Ok).collect(),
        )
        .expect("builds");
    });
    let built = identity::build(
        &kit,
        &spec(IdentityKind::Identity, 1),
        vec![Ok(gauss.clone())],
    )
    .expect("builds");
    let who = IdentityFace {
        crop: image::load_from_memory(&built.crop_jpeg)
            .expect("crop")
            .to_rgb8(),
        landmarks: built.record.landmarks,
        embedding: built.embedding.clone(),
    };
    let swap_ms = median_ms(5, || {
        swap::swap_face(&kit, &rgb, &who, false).expect("swaps");
    });
    let blend_ms = median_ms(5, || {
        swap::blend_onto(&rgb, &face, &who.crop, &who.landmarks, false, 1);
    });
    println!("scrfd detection (640 letterbox):      {detect:8.1} ms");
    println!("arcface embedding (face + mirror):    {embed:8.1} ms");
    println!("identity build, 1 photo:              {build_one:8.1} ms");
    println!("profile build, 10 photos:             {build_ten:8.1} ms");
    println!("model swap, 1 photo (detect + blend): {swap_ms:8.1} ms");
    println!("  of which mask + colour + blend:     {blend_ms:8.1} ms");
}
