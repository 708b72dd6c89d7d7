//! The cost of the Cog hop: what a generator route adds to the container's
//! own `predict_time`. Run: `cargo bench -p atelier-worker --bench cog_hop`
//! (needs the Cog runtime from PyPI: the venv `scripts/test` creates, or
//! `ATELIER_TEST_COG_VENV`).
//!
//! Serves the portrait fixture (`tests/fixtures/cog/portrait`, a test
//! fixture that returns a real face photo as a PNG data URL) with the real
//! Cog runtime, then draws 50 drafts of 512×512 through a `CogEngine`, one
//! after the other, and prints p50/p90 of: the container's `predict_time`,
//! the HTTP round trip (request with its JSON, the container's queueing,
//! the answer with the image as a data URL, read and parsed), the hop
//! (round trip − predict_time) and the whole call (hop + the guarded
//! decode of the returned image).

use atelier_shared::config::CogInput;
use atelier_shared::domain::JobType;
use atelier_shared::domain::packshot::EngineChoice;
use atelier_worker::engines::cog::CogEngine;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const RUNS: usize = 50;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let venv = std::env::var("ATELIER_TEST_COG_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/atelier/cog-venv",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = std::process::Command::new(format!("{venv}/bin/python"))
        .args(["-m", "cog.server.http", "--host", "127.0.0.1"])
        .current_dir(root.join("tests/fixtures/cog/portrait"))
        .env("PORT", port.to_string())
        .env("COG_PREDICT_TYPE_STUB", "predict.py:Predictor")
        .env("FIXTURE_FACES", root.join("models/testdata"))
        .env(
            "PATH",
            format!("{venv}/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("the Cog runtime in {venv} starts (scripts/test installs it): {e}")
        });

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mapping: BTreeMap<String, CogInput> = ["prompt", "seed", "width", "height"]
        .into_iter()
        .map(|k| (k.to_string(), CogInput::Field(k.to_string())))
        .collect();
    let handle = rt.handle().clone();
    let url = format!("http://127.0.0.1:{port}");
    let engine = std::thread::spawn(move || {
        CogEngine::connect(
            EngineChoice::Seedream,
            &url,
            &[(JobType::IdentityCreation, mapping)].into(),
            Duration::from_secs(60),
            1,
            Duration::from_secs(60),
            handle,
        )
    })
    .join()
    .expect("connect thread")
    .expect("the fixture container is READY");

    let (mut predict, mut round_trip, mut hop, mut call) = (vec![], vec![], vec![], vec![]);
    rt.block_on(async {
        for i in 0..=RUNS {
            let fields: Map<String, Value> = [
                ("prompt", json!("a calm woman, studio portrait")),
                ("seed", json!(i)),
                ("width", json!(512)),
                ("height", json!(512)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let t = Instant::now();
            let g = engine
                .generate(JobType::IdentityCreation, &fields)
                .await
                .expect("a draft");
            let whole = t.elapsed().as_secs_f64() * 1000.0;
            if i == 0 {
                continue; // warm-up
            }
            let p = g.description["predict_time"]
                .as_f64()
                .expect("predict_time")
                * 1000.0;
            let r = g.description["round_trip"].as_f64().expect("round_trip") * 1000.0;
            predict.push(p);
            round_trip.push(r);
            hop.push(r - p);
            call.push(whole - p);
        }
    });
    let _ = child.kill();
    println!("Cog hop, {RUNS} predictions of 512x512 PNG (portrait fixture), sequential:");
    for (name, v) in [
        ("container predict_time", &mut predict),
        ("HTTP round trip", &mut round_trip),
        ("hop (round trip - predict_time)", &mut hop),
        ("whole call - predict_time (incl. decode)", &mut call),
    ] {
        println!(
            "  {name:<42} p50 {:>7.2} ms   p90 {:>7.2} ms",
            pct(v, 0.5),
            pct(v, 0.9)
        );
    }
}
