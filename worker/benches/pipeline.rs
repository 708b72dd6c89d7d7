//! Packshot pipeline figures on this machine (CPU unless built with `cuda`
//! and `ATELIER_WORKER__DEVICE=cuda`). Run: `cargo bench -p atelier-worker --bench pipeline`.
//!
//! Prints: ISNet raw inference time, per-stage time of a 2K white cutout,
//! images/s with 1 and 2 concurrent tasks, and the effect of dynamic
//! batching on a model with a dynamic batch axis.

mod common;

use atelier_shared::domain::engines::EngineAvailability;
use atelier_shared::domain::packshot::{DesignCatalogue, PackshotSpec, parse_request, validate};
use atelier_worker::engines::atelier::AtelierEngine;
use atelier_worker::engines::{Input, RenderRequest};
use atelier_worker::imaging;
use atelier_worker::inference::{Model, ModelOptions};
use ndarray::{ArrayD, IxDyn};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spec(size: &str) -> PackshotSpec {
    let body = serde_json::json!({"project_id": "p", "images": ["f"], "instructions": [{"style": "white_cutout", "options": {"size": size}}]});
    validate(
        &parse_request(&body).expect("parses"),
        &DesignCatalogue::default(),
        &EngineAvailability::builtin_packshots(vec![]),
        || 7,
    )
    .expect("valid")
}

fn main() {
    let (dir, rt) = common::runtime();

    for (name, file) in [
        ("isnet_fp16", "isnet_fp16.onnx"),
        ("isnet_quint8", "isnet_quint8.onnx"),
    ] {
        let t = Instant::now();
        let m =
            Model::load(&rt, name, &dir.join(file), ModelOptions::default()).expect("model loads");
        let load = t.elapsed().as_secs_f64();
        let x = ArrayD::<f32>::from_elem(IxDyn(&[1, 3, 1024, 1024]), 0.1);
        let runs: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                m.run(x.clone()).expect("runs");
                t.elapsed().as_secs_f64()
            })
            .collect();
        println!(
            "{name}: load+warm-up {load:.2} s, raw inference 1024² median {:.3} s (min {:.3})",
            median(runs.clone()),
            runs.iter().cloned().fold(f64::MAX, f64::min)
        );
    }

    let engine = Arc::new(
        AtelierEngine::load(
            &rt,
            &dir,
            "isnet_fp16.onnx",
            "realesr-animevideov3-x4.onnx",
            ModelOptions::default(),
        )
        .expect("isnet"),
    );
    let photo = image::open(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/garment.jpg"),
    )
    .expect("testdata");
    let inputs = Arc::new(vec![Input {
        file_id: "f".into(),
        image: photo,
    }]);

    // Per-stage time of a 2K white cutout (median of 5).
    let s2k = spec("2K");
    let mut stages: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
    let mut totals = Vec::new();
    let mut post = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (r, times) = engine
            .render_timed(&RenderRequest {
                spec: &s2k,
                instruction_index: 0,
                variation_index: 0,
                version: 0,
                inputs: &inputs,
                stop: None,
            })
            .expect("renders");
        for (k, v) in times.0 {
            stages.entry(k).or_default().push(v);
        }
        // The post_process: true pass, on a copy (timed, not part of the total).
        let mut copy = r.image.clone();
        let tp = Instant::now();
        atelier_worker::postprocess::apply(&mut copy, &r.post);
        post.push(tp.elapsed().as_secs_f64());
        let te = Instant::now();
        let _full = imaging::encode(&r.image, s2k.instructions[0].output.format).expect("encodes");
        stages
            .entry("encode_jpeg")
            .or_default()
            .push(te.elapsed().as_secs_f64());
        let tt = Instant::now();
        let _thumb = imaging::thumbnail(&r.image).expect("thumb");
        stages
            .entry("thumbnail")
            .or_default()
            .push(tt.elapsed().as_secs_f64());
        totals.push(t.elapsed().as_secs_f64() - post.last().copied().unwrap_or(0.0));
    }
    println!("2K white cutout (900×1100 input → 2048², median of 5):");
    for (k, v) in &stages {
        println!("  {k:<12} {:>7.3} s", median(v.clone()));
    }
    println!("  (post_process pass, when asked: {:.3} s)", median(post));
    let total = median(totals);
    let mask = median(stages["mask"].clone());
    println!(
        "  total        {total:>7.3} s   (pipeline / ISNet-inference ratio {:.2})",
        total / mask
    );

    // Throughput with 1 and 2 concurrent tasks (1K outputs).
    let s1k = Arc::new(spec("1K"));
    for conc in [1usize, 2] {
        let n = 6;
        let t = Instant::now();
        let handles: Vec<_> = (0..conc)
            .map(|w| {
                let (engine, inputs, s) = (engine.clone(), inputs.clone(), s1k.clone());
                std::thread::spawn(move || {
                    for i in (w..n).step_by(conc) {
                        let (r, _) = engine
                            .render_timed(&RenderRequest {
                                spec: &s,
                                instruction_index: 0,
                                variation_index: i as u32,
                                version: 0,
                                inputs: &inputs,
                                stop: None,
                            })
                            .expect("renders");
                        let _ = imaging::encode(&r.image, s.instructions[0].output.format)
                            .expect("encodes");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        println!(
            "1K white cutout, {conc} concurrent task(s): {:.2} images/s",
            n as f64 / t.elapsed().as_secs_f64()
        );
    }

    // Dynamic batching on CPU: Real-ESRGAN (dynamic batch axis), 8 concurrent 96² tiles.
    for max_batch in [1usize, 4] {
        let m = Arc::new(
            Model::load(
                &rt,
                "realesrgan-bench",
                &dir.join("realesr-animevideov3-x4.onnx"),
                ModelOptions {
                    sessions: 1,
                    batch_window: Duration::from_millis(5),
                    max_batch,
                },
            )
            .expect("upscaler"),
        );
        let t = Instant::now();
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..3 {
                        m.run(ArrayD::<f32>::from_elem(IxDyn(&[1, 3, 96, 96]), 0.5))
                            .expect("runs");
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().expect("thread");
        }
        let (runs, reqs) = m.stats.snapshot();
        println!(
            "realesrgan 96² tiles, max_batch {max_batch}: {:.1} tiles/s ({reqs} requests in {runs} runs)",
            24.0 / t.elapsed().as_secs_f64()
        );
    }
}
