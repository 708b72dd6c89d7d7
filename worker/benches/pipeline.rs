//! Packshot pipeline figures on this machine (CPU unless built with `cuda`
//! and `ATELIER_WORKER__DEVICE=cuda`). Run: `cargo bench -p atelier-worker --bench pipeline`.
//!
//! Prints: the worker's memory with the packshot models loaded (measured in
//! a child process that loads only what a worker loads), ISNet raw inference
//! time, per-stage time of a 2K white cutout and the time of a 1K one,
//! images/s with 1 and 2 concurrent tasks, the effect of dynamic batching on
//! a model with a dynamic batch axis, the upscaler's quality against Lanczos
//! per enlargement factor (PSNR/SSIM on downscaled photos), and, unless
//! `ATELIER_BENCH_PEERS=0`, the Python peer (`scripts/bench-rembg`: raw
//! inference in Python's onnxruntime and rembg's `remove()` on the same model
//! file, photo and threads) with the ratios the targets name.

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

/// Set in the child process that measures a worker's memory.
const RSS_CHILD: &str = "ATELIER_BENCH_RSS_CHILD";
/// The child's `models.arena_release_idle_secs` (a worker's default is 30).
const IDLE_SECS: u64 = 2;

fn main() {
    if std::env::var_os(RSS_CHILD).is_some() {
        return rss_child();
    }
    // Before this process loads anything: a fresh process, as a worker.
    let rss = rss_of_a_worker();
    let (dir, rt) = common::runtime();
    let mut raw_fp16 = f64::NAN;
    let mut raw_py: Option<f64> = None;

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
        if name == "isnet_fp16" {
            raw_fp16 = runs.iter().cloned().fold(f64::MAX, f64::min);
            // Python's runs right after these, on the same machine state.
            if peers() {
                match rembg_peer(&dir.join(file), "raw") {
                    Ok(p) => raw_py = p["raw_min_s"].as_f64(),
                    Err(e) => println!("Python onnxruntime peer: not run ({e})"),
                }
            }
        }
        println!(
            "{name}: load+warm-up {load:.2} s, raw inference 1024² median {:.3} s (min {:.3})",
            median(runs.clone()),
            runs.iter().cloned().fold(f64::MAX, f64::min)
        );
    }

    let (engine, inputs) = engine_and_photo(&rt, &dir, ModelOptions::default());
    let render = |s: &PackshotSpec, variation: u32| {
        engine
            .render_timed(&RenderRequest {
                spec: s,
                instruction_index: 0,
                variation_index: variation,
                version: 0,
                inputs: &inputs,
                stop: None,
            })
            .expect("renders")
    };

    // Per-stage time of a 2K white cutout (median of 5).
    let s2k = spec("2K");
    let mut stages: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
    let mut totals = Vec::new();
    let mut post = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (r, times) = render(&s2k, 0);
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
    let total_2k = total;
    let s1k_one = spec("1K");
    let total_1k = median(
        (0..5)
            .map(|v| {
                let t = Instant::now();
                let (r, _) = render(&s1k_one, v);
                imaging::encode(&r.image, s1k_one.instructions[0].output.format).expect("encodes");
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    println!(
        "1K white cutout (same input → 1024², median of 5): {total_1k:.3} s; 2K / 1K {:.2}",
        total_2k / total_1k
    );

    // Throughput with 1 and 2 concurrent tasks (1K outputs).
    let s1k = Arc::new(spec("1K"));
    let mut images_per_s = Vec::new();
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
        let ips = n as f64 / t.elapsed().as_secs_f64();
        images_per_s.push(ips);
        println!("1K white cutout, {conc} concurrent task(s): {ips:.2} images/s");
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
                    ..ModelOptions::default()
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
    upscaler_quality(&engine);

    let peer = if !peers() {
        None
    } else {
        match rembg_peer(&dir.join("isnet_fp16.onnx"), "remove") {
            Ok(p) => Some(p),
            Err(e) => {
                println!("rembg peer: not run ({e})");
                None
            }
        }
    };

    println!("\ntargets (issue 16, pipeline):");
    if let Some(raw_py) = raw_py {
        println!(
            "  raw ISNet 1024² (best of 5, one after the other), worker {raw_fp16:.3} s vs Python onnxruntime {raw_py:.3} s: {:+.1} % (target ≤ +5 %)",
            (raw_fp16 / raw_py - 1.0) * 100.0
        );
    }
    if let Some(p) = &peer {
        let remove = p["remove_images_per_s"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  1K white cutout {:.3} images/s vs rembg {} remove() {remove:.3} images/s: {:.2}× (target ≥ 1.5×)",
            images_per_s[0],
            p["rembg"].as_str().unwrap_or("?"),
            images_per_s[0] / remove
        );
    }
    println!(
        "  2K white cutout {total_2k:.3} s vs 1K {total_1k:.3} s: {:.2}× (target ≤ 1.5×)",
        total_2k / total_1k
    );
    match rss {
        Ok(r) => println!(
            "  worker memory with the packshot models: {:.0} MB after loading, {:.0} MB after 1K and 2K renders (2 at once), {:.0} MB once idle (arena released after {IDLE_SECS} s), peak {:.0} MB (target ≤ 1,024 MB)",
            r.after_load, r.after_renders, r.after_idle, r.peak
        ),
        Err(e) => println!("  worker memory: not measured ({e})"),
    }
}

/// Resident and peak memory of this process, in MB (`/proc/self/status`).
fn memory_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(serde::Deserialize)]
struct Rss {
    after_load: f64,
    after_renders: f64,
    after_idle: f64,
    peak: f64,
}

/// Runs this bench again as a child that only does what a packshot worker
/// does (load the engine with the worker's default options, render 1K and
/// 2K cutouts, two at once), and reads its memory.
fn rss_of_a_worker() -> Result<Rss, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe);
    child.env(RSS_CHILD, "1");
    last_json_line(child)
}

/// Runs `cmd` (its stderr shown) and reads the last line it prints as JSON.
fn last_json_line<T: serde::de::DeserializeOwned>(
    mut cmd: std::process::Command,
) -> Result<T, String> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{:?} exited with {}",
            cmd.get_program(),
            out.status
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))
}

/// The packshot engine as a worker loads it (with `opts`) and the test
/// photo as its one input.
fn engine_and_photo(
    rt: &atelier_worker::inference::Runtime,
    dir: &std::path::Path,
    opts: ModelOptions,
) -> (Arc<AtelierEngine>, Arc<Vec<Input>>) {
    let engine = AtelierEngine::load(
        rt,
        dir,
        "isnet_fp16.onnx",
        "realesr-animevideov3-x4.onnx",
        opts,
    )
    .expect("isnet");
    let photo = image::open(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/garment.jpg"),
    )
    .expect("testdata");
    let inputs = vec![Input {
        file_id: "f".into(),
        image: photo,
    }];
    (Arc::new(engine), Arc::new(inputs))
}

fn rss_child() {
    let (dir, rt) = common::runtime();
    let (engine, inputs) = engine_and_photo(
        &rt,
        &dir,
        ModelOptions {
            release_idle: Some(Duration::from_secs(IDLE_SECS)),
            ..ModelOptions::default()
        },
    );
    let after_load = memory_mb().0;
    let specs = Arc::new([spec("1K"), spec("2K")]);
    let hs: Vec<_> = (0..2)
        .map(|w| {
            let (engine, inputs, specs) = (engine.clone(), inputs.clone(), specs.clone());
            std::thread::spawn(move || {
                for s in specs.iter() {
                    let (r, _) = engine
                        .render_timed(&RenderRequest {
                            spec: s,
                            instruction_index: 0,
                            variation_index: w,
                            version: 0,
                            inputs: &inputs,
                            stop: None,
                        })
                        .expect("renders");
                    imaging::encode(&r.image, s.instructions[0].output.format).expect("encodes");
                }
            })
        })
        .collect();
    for h in hs {
        h.join().expect("thread");
    }
    let after_renders = memory_mb().0;
    // The idle period, then ISNet's release run (about one inference).
    std::thread::sleep(Duration::from_secs(IDLE_SECS + 4));
    let (after_idle, peak) = memory_mb();
    println!(
        "{}",
        serde_json::json!({"after_load": after_load, "after_renders": after_renders, "after_idle": after_idle, "peak": peak})
    );
}

/// Luma (BT.601) of an image, as f64.
fn luma(img: &image::RgbaImage) -> Vec<f64> {
    img.pixels()
        .map(|p| 0.299 * f64::from(p.0[0]) + 0.587 * f64::from(p.0[1]) + 0.114 * f64::from(p.0[2]))
        .collect()
}

/// PSNR over the colour channels, in dB.
fn psnr(a: &image::RgbaImage, b: &image::RgbaImage) -> f64 {
    let (mut se, mut n) = (0f64, 0f64);
    for (p, q) in a.pixels().zip(b.pixels()) {
        for c in 0..3 {
            let d = f64::from(p.0[c]) - f64::from(q.0[c]);
            se += d * d;
            n += 1.0;
        }
    }
    10.0 * (255.0 * 255.0 / (se / n).max(1e-12)).log10()
}

/// Mean SSIM (Wang et al. 2004) of the luma over 8×8 windows, stride 4.
fn ssim(a: &image::RgbaImage, b: &image::RgbaImage) -> f64 {
    let (w, h) = (a.width() as usize, a.height() as usize);
    let (la, lb) = (luma(a), luma(b));
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let (mut sum, mut count) = (0f64, 0f64);
    for y in (0..h.saturating_sub(7)).step_by(4) {
        for x in (0..w.saturating_sub(7)).step_by(4) {
            let (mut ma, mut mb, mut va, mut vb, mut cov) = (0f64, 0f64, 0f64, 0f64, 0f64);
            for j in 0..8 {
                for i in 0..8 {
                    let k = (y + j) * w + x + i;
                    ma += la[k];
                    mb += lb[k];
                }
            }
            ma /= 64.0;
            mb /= 64.0;
            for j in 0..8 {
                for i in 0..8 {
                    let k = (y + j) * w + x + i;
                    let (da, db) = (la[k] - ma, lb[k] - mb);
                    va += da * da;
                    vb += db * db;
                    cov += da * db;
                }
            }
            let (va, vb, cov) = (va / 63.0, vb / 63.0, cov / 63.0);
            sum += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            count += 1.0;
        }
    }
    sum / count.max(1.0)
}

/// Photos for the upscaler's quality: `ATELIER_BENCH_PHOTOS` (a folder), or
/// the photos scikit-image ships (in the rembg peer's venv, from PyPI), plus
/// the drawn garment. Each is cut to its central 384×384 at most.
fn quality_photos() -> Vec<(String, image::RgbaImage)> {
    let mut dirs: Vec<std::path::PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("ATELIER_BENCH_PHOTOS") {
        dirs.push(d.into());
    } else if let Some(home) = std::env::var_os("HOME") {
        let lib = std::path::Path::new(&home).join(".cache/atelier/rembg-venv/lib");
        for py in std::fs::read_dir(&lib).into_iter().flatten().flatten() {
            dirs.push(py.path().join("site-packages/skimage/data"));
        }
    }
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    for d in dirs {
        for name in [
            "astronaut.png",
            "coffee.png",
            "chelsea.png",
            "rocket.jpg",
            "motorcycle_left.png",
        ] {
            if d.join(name).is_file() {
                files.push(d.join(name));
            }
        }
    }
    files.push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/garment.jpg"));
    files
        .into_iter()
        .filter_map(|f| {
            let img = image::open(&f).ok()?.to_rgba8();
            let (cw, ch) = (img.width().min(384), img.height().min(384));
            let crop = image::imageops::crop_imm(
                &img,
                (img.width() - cw) / 2,
                (img.height() - ch) / 2,
                cw,
                ch,
            )
            .to_image();
            Some((f.file_name()?.to_string_lossy().into_owned(), crop))
        })
        .collect()
}

/// For each enlargement factor: each photo is shrunk by the factor and
/// enlarged back by Lanczos and by the ×4 upscaler (then Lanczos down to
/// size, as the engine does); PSNR and SSIM against the original.
fn upscaler_quality(engine: &AtelierEngine) {
    let Some(up) = &engine.upscaler else {
        println!("upscaler quality: no upscaler loaded");
        return;
    };
    let photos = quality_photos();
    println!(
        "upscaler quality against the original (mean over {} photos: {}):",
        photos.len(),
        photos
            .iter()
            .map(|p| p.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  factor   Lanczos PSNR  SSIM   time     {} PSNR  SSIM   time",
        up.name
    );
    for f in [1.25f64, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0] {
        let mut acc = [[0f64; 3]; 2];
        for (_, orig) in &photos {
            let (w, h) = orig.dimensions();
            let (sw, sh) = (
                ((f64::from(w) / f).round() as u32).max(1),
                ((f64::from(h) / f).round() as u32).max(1),
            );
            let small = imaging::resize(&image::DynamicImage::ImageRgba8(orig.clone()), sw, sh)
                .expect("resize");
            let t = Instant::now();
            let lanczos = imaging::resize(&image::DynamicImage::ImageRgba8(small.clone()), w, h)
                .expect("resize");
            let tl = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let big = atelier_worker::engines::atelier::upscale4(up, &small).expect("upscales");
            let sr = imaging::resize(&image::DynamicImage::ImageRgba8(big), w, h).expect("resize");
            let ts = t.elapsed().as_secs_f64();
            for (k, (img, time)) in [(lanczos, tl), (sr, ts)].into_iter().enumerate() {
                acc[k][0] += psnr(orig, &img);
                acc[k][1] += ssim(orig, &img);
                acc[k][2] += time;
            }
        }
        let n = photos.len().max(1) as f64;
        println!(
            "  {f:>5.2}×   {:>11.2} dB {:.4} {:>6.3} s   {:>14.2} dB {:.4} {:>6.3} s",
            acc[0][0] / n,
            acc[0][1] / n,
            acc[0][2] / n,
            acc[1][0] / n,
            acc[1][1] / n,
            acc[1][2] / n
        );
    }
}

/// Whether to run the Python peers (`ATELIER_BENCH_PEERS=0` skips them).
fn peers() -> bool {
    std::env::var("ATELIER_BENCH_PEERS").as_deref() != Ok("0")
}

/// Runs `scripts/bench-rembg --only <only>` on the same model file, photo
/// and threads.
fn rembg_peer(model: &std::path::Path, only: &str) -> Result<serde_json::Value, String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut peer = std::process::Command::new(root.join("scripts/bench-rembg"));
    peer.arg("--model")
        .arg(model)
        .arg("--photo")
        .arg(root.join("testdata/garment.jpg"))
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--only")
        .arg(only);
    last_json_line(peer)
}
