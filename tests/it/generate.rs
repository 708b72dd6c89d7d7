//! The generative kinds on generator routes: real Cog runtimes serving the
//! fixture predictors of `tests/fixtures/cog`, which encode what they were
//! given into the pixels they draw, so each test reads back that the right
//! inputs reached the container.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::config::{CogInput, Config, EngineRoute};
use atelier_shared::db::Dialect;
use atelier_shared::domain::JobType;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

pub fn face_photo(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/testdata")
            .join(name),
    )
    .expect("face test photo (scripts/fetch-models)")
}

fn solid_png(rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(96, 128, image::Rgb(rgb));
    let mut b = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
        .expect("encode");
    b
}

/// A Cog route to the flat-2-model fixture; `extra` adds or overrides
/// inputs (`"$field"` or a constant).
pub fn flat_route(url: &str, extra: &[(&str, Value)]) -> EngineRoute {
    let mut mapping: std::collections::BTreeMap<String, CogInput> = [
        ("identity", json!("$identity")),
        ("garments", json!("$garments")),
        ("prompt", json!("$prompt")),
        ("pose", json!("$pose")),
        ("seed", json!("$seed")),
        ("width", json!("$width")),
        ("height", json!("$height")),
        ("barefoot", json!("$barefoot")),
    ]
    .into_iter()
    .chain(extra.iter().cloned())
    .map(|(k, v)| {
        (
            k.to_string(),
            serde_json::from_value(v).expect("a mapping value"),
        )
    })
    .collect();
    mapping
        .entry("delay".into())
        .or_insert(CogInput::Constant(json!(0.02)));
    EngineRoute::Cog {
        url: url.to_string(),
        timeout_secs: 60,
        slots: 2,
        startup_secs: 60,
        inputs: [(JobType::Flat2Model, mapping)].into(),
    }
}

pub async fn ready_identity(app: &TestApp, photo: &str, name: &str) -> String {
    let (s, v) = app
        .post_form(
            "/identity/upload",
            ("image", photo, &face_photo(photo)),
            &[("name", name)],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let code = v["identity_code"].as_str().expect("code").to_string();
    let t = Instant::now();
    loop {
        let (_, st) = app.get(&format!("/identity/{code}/status")).await;
        match st["preprocessing_status"].as_str() {
            Some("completed") => return code,
            Some("failed") => panic!("identity failed: {st}"),
            _ => {}
        }
        assert!(t.elapsed() < Duration::from_secs(120), "identity stuck");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn near(a: u8, b: u8) -> bool {
    a.abs_diff(b) <= 6
}

async fn flat_2_model_end_to_end(dialect: Dialect, tweak: impl FnOnce(&mut Config)) {
    let fixture = CogFixture::start("flat2model").await;
    let app = TestApp::with(dialect, Roles::ALL, |c| {
        with_models(c);
        c.engines
            .routes
            .insert("seedream".into(), flat_route(&fixture.url, &[]));
        tweak(c);
    })
    .await;
    let code = ready_identity(&app, "gauss.png", "Carl").await;
    let p = app.project("looks").await;
    let red = app.upload(solid_png([220, 20, 20]), "top.png").await;
    let green = app.upload(solid_png([20, 200, 40]), "skirt.png").await;
    let (before, _) = app.balance(&app.key).await;
    let review = json!({"requires_review": true, "auto_approve_threshold": 0.8});
    let (s, v) = app
        .post(
            "/flat-2-model",
            json!({
                "identity_code": code, "project_id": p,
                "images": [red, {"file_id": green, "note": "tucked in"}],
                "options": {"barefoot": true, "format": "png"},
                "review_config": review,
                "instructions": [
                    {"pose": "walking", "seed": 77, "num_variations": 2, "lighting": "soft"},
                    {"pose": "seated, side", "seed": 10, "options": {"ar": "3:4", "format": "jpg"}}
                ]
            }),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["total_outputs"], 3, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let st = app.wait_for_job(&job, Duration::from_secs(90)).await;
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["job_type"], "flat_2_model", "{st}");
    assert_eq!(st["identity_code"], code.as_str(), "{st}");
    assert_eq!(st["processing_options"]["review_config"], review, "{st}");
    assert_eq!(st["processing_options"]["use_anchor"], true, "{st}");
    let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 3, "{r}");
    for out in results {
        assert_eq!(out["status"], "completed", "{out}");
        assert_eq!(out["model_used"], "seedream (cog)", "{out}");
        assert!(
            out["input_description"]["predict_time"].as_f64().is_some(),
            "{out}"
        );
        let (ins, var) = (
            out["instruction_index"].as_u64().expect("index"),
            out["variation_index"].as_u64().expect("variation"),
        );
        let img = image::load_from_memory(&app.fetch(&out["output"]["full_size"]).await)
            .expect("an image")
            .to_rgb8();
        let (seed, pose, size) = match ins {
            0 => (77 + var, "walking", (1024, 1024)),
            _ => (10, "seated, side", (768, 1024)),
        };
        assert_eq!(img.dimensions(), size, "{out}");
        assert_eq!(
            out["output_format"],
            if ins == 0 { "png" } else { "jpg" },
            "{out}"
        );
        // The corner says what reached the container: the variation's
        // seed, the pose, two garments and barefoot.
        let c = img.get_pixel(3, 3).0;
        assert!(
            near(c[0], seed as u8) && near(c[1], pose.len() as u8) && near(c[2], 125),
            "instruction {ins} variation {var}: corner {c:?}"
        );
        // The garments, side by side in the bottom half, in request order.
        let (w, h) = img.dimensions();
        let left = img.get_pixel(w / 4, h * 3 / 4).0;
        let right = img.get_pixel(w * 3 / 4, h * 3 / 4).0;
        assert!(left[0] > 180 && left[1] < 80, "left garment {left:?}");
        assert!(right[1] > 160 && right[0] < 80, "right garment {right:?}");
        // The identity's face in the top half's middle: not the canvas.
        let face = img.get_pixel(w / 2, h / 4).0;
        assert!(
            !(near(face[0], c[0]) && near(face[1], c[1]) && near(face[2], c[2])),
            "no face drawn: {face:?}"
        );
    }
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!((before - after, reserved), (9.0, 0.0), "three 1K outputs");

    // The ZIP export carries the outputs.
    let (s, d) = app.post("/download", json!({"job_id": job})).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    let zip = app
        .http
        .get(d["download_url"].as_str().expect("url"))
        .send()
        .await
        .expect("zip")
        .bytes()
        .await
        .expect("bytes");
    let archive = zip::ZipArchive::new(std::io::Cursor::new(zip.to_vec())).expect("zip");
    assert_eq!(archive.len(), 4, "three images and the manifest");
    // Tasks are counted on the generate queue.
    let m = app.metrics().await;
    assert!(
        m.lines().any(|l| l.starts_with("atelier_tasks_total")
            && l.contains("type=\"generate\"")
            && l.contains("outcome=\"completed\"")),
        "no generate tasks counted"
    );
    app.audit_clean().await;
    app.stop().await;
}

/// `POST /flat-2-model` end to end on the embedded stack: the identity's
/// face and every garment reach the container, each output its own seed
/// and the instruction's pose, sizes and formats as asked, charged per
/// output, in the ZIP.
#[tokio::test]
async fn flat_2_model_end_to_end_embedded() {
    flat_2_model_end_to_end(Dialect::Sqlite, |_| {}).await;
}

#[tokio::test]
async fn flat_2_model_end_to_end_on_postgres_rabbitmq_and_s3() {
    let _broker = broker_lock().await;
    let bucket = s3_bucket().await;
    flat_2_model_end_to_end(Dialect::Postgres, |c| {
        with_rabbitmq(c);
        with_s3(c, &bucket);
    })
    .await;
}

/// Every documented refusal of `POST /flat-2-model`, each before anything
/// is charged; and the outputs a container cannot draw (garbage bytes, a
/// refusal under a named engine) fail alone with the reason and cost
/// nothing, while under `auto` a refusal falls back to the next route.
#[tokio::test]
async fn flat_2_model_refusals_and_failures() {
    let fixture = CogFixture::start("flat2model").await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_models(c);
        c.limits.create_per_minute = 1000;
        c.engines
            .routes
            .insert("seedream".into(), flat_route(&fixture.url, &[]));
        // The same container under another name, told to refuse everything.
        c.engines.routes.insert(
            "nano_banana_pro".into(),
            flat_route(&fixture.url, &[("prompt", json!("refuse-me"))]),
        );
        c.engines.auto.insert(
            JobType::Flat2Model,
            vec!["nano_banana_pro".into(), "seedream".into()],
        );
    })
    .await;
    let code = ready_identity(&app, "gauss.png", "Carl").await;
    let p = app.project("looks").await;
    let g = app.upload(solid_png([220, 20, 20]), "top.png").await;
    let (before, _) = app.balance(&app.key).await;
    let body = |extra: Value| {
        let mut b = json!({"identity_code": code, "project_id": p, "images": [g]});
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    let field_of = |v: &Value| -> Vec<String> {
        v["detail"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|e| e["field"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (extra, status, field) in [
        (json!({"images": []}), StatusCode::BAD_REQUEST, "images"),
        (
            json!({"images": [g, g]}),
            StatusCode::BAD_REQUEST,
            "images[1]",
        ),
        (
            json!({"options": {"anchor_index": 1}}),
            StatusCode::BAD_REQUEST,
            "options.anchor_index",
        ),
        (
            json!({"options": {"model": "orbita"}}),
            StatusCode::BAD_REQUEST,
            "options.model",
        ),
        (
            json!({"instructions": [{"num_variations": 9}]}),
            StatusCode::BAD_REQUEST,
            "instructions[0].num_variations",
        ),
        (
            json!({"instructions": [{"camera": 3}]}),
            StatusCode::BAD_REQUEST,
            "instructions[0].camera",
        ),
        (
            json!({"options": {"width": 1000}}),
            StatusCode::BAD_REQUEST,
            "options.height",
        ),
    ] {
        let (s, v) = app.post("/flat-2-model", body(extra.clone())).await;
        assert_eq!(s, status, "{extra}: {v}");
        assert!(
            field_of(&v).iter().any(|f| f == field),
            "{extra}: {field} in {v}"
        );
    }
    let (s, v) = app
        .post(
            "/flat-2-model",
            body(json!({"options": {"width": 1024, "height": 768}})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "custom dimensions need the policy: {v}"
    );
    let (s, v) = app
        .post("/flat-2-model", body(json!({"identity_code": "idn_nope"})))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = app
        .post("/flat-2-model", body(json!({"project_id": "prj_nope"})))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = app
        .post("/flat-2-model", body(json!({"images": ["file_nope"]})))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(
        app.balance(&app.key).await.0,
        before,
        "refusals cost nothing"
    );

    // Under auto the refusing route goes first and the next one draws.
    let (s, v) = app
        .post(
            "/flat-2-model",
            body(json!({"instructions": [{"seed": 5}]})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let st = app.wait_for_job(&job, Duration::from_secs(60)).await;
    assert_eq!(st["status"], "completed", "{st}");
    let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
    assert_eq!(r["results"][0]["model_used"], "seedream (cog)", "{r}");

    // Named engines: no fallback; garbage and refusals fail alone, free.
    for (model, prompt, reason) in [
        ("seedream", "garbage please", "returned an unusable image"),
        ("nano_banana_pro", "", "refused the content"),
    ] {
        let (s, v) = app
            .post(
                "/flat-2-model",
                body(json!({"options": {"model": model},
                            "instructions": [{"prompt": prompt}]})),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let job = v["job_id"].as_str().expect("job").to_string();
        let st = app.wait_for_job(&job, Duration::from_secs(60)).await;
        assert_eq!(st["status"], "failed", "{st}");
        let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
        let msg = r["results"][0]["error_message"]
            .as_str()
            .unwrap_or_default();
        assert!(msg.contains(reason), "{model}: {msg}");
    }
    assert_eq!(
        app.balance(&app.key).await,
        (before - 3.0, 0.0),
        "only the drawn output is charged"
    );
    app.audit_clean().await;
    app.stop().await;
}

/// With no generator for the kind, the route refuses at creation, naming
/// what is missing, and charges nothing; an identity still preprocessing
/// is a 409.
#[tokio::test]
async fn flat_2_model_needs_a_generator_and_a_ready_identity() {
    // No worker: the identity stays pending.
    let app = TestApp::with(Dialect::Sqlite, Roles::API_AND_SCHEDULER, |c| {
        c.identity.upload_wait_ms = 50;
    })
    .await;
    let p = app.project("looks").await;
    let g = app.upload(solid_png([220, 20, 20]), "top.png").await;
    let (s, v) = app
        .post_form(
            "/identity/upload",
            ("image", "gauss.png", &face_photo("gauss.png")),
            &[("name", "Carl")],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let code = v["identity_code"].as_str().expect("code").to_string();
    let (before, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/flat-2-model",
            json!({"identity_code": code, "project_id": p, "images": [g]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["detail"][0]["field"], "options.model", "{v}");
    assert!(
        v["detail"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no engine draws flat_2_model")),
        "{v}"
    );
    app.stop().await;

    let fixture_url = "http://127.0.0.1:9"; // never called: no worker
    let app = TestApp::with(Dialect::Sqlite, Roles::API_AND_SCHEDULER, |c| {
        c.identity.upload_wait_ms = 50;
        c.engines
            .routes
            .insert("seedream".into(), flat_route(fixture_url, &[]));
    })
    .await;
    let p = app.project("looks").await;
    let g = app.upload(solid_png([220, 20, 20]), "top.png").await;
    let (_, v) = app
        .post_form(
            "/identity/upload",
            ("image", "gauss.png", &face_photo("gauss.png")),
            &[("name", "Carl")],
        )
        .await;
    let code = v["identity_code"].as_str().expect("code").to_string();
    let (before2, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/flat-2-model",
            json!({"identity_code": code, "project_id": p, "images": [g]}),
        )
        .await;
    // An identity still being preprocessed (no worker here: it stays so)
    // is waited for: the job is admitted, reserved, and held.
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, st) = app.get(&format!("/jobs/{job}/status")).await;
    assert_eq!(st["status"], "pending", "held until the face exists: {st}");
    let outputs = app.store.open_outputs(&job).await.expect("outputs");
    assert!(outputs.iter().all(|o| o.attempt == 0), "never dispatched: {outputs:?}");
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!(after, before2, "nothing charged");
    assert!(reserved > 0.0, "its cost is reserved");
    let _ = before;
    app.stop().await;
}
