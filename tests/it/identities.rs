//! Identities and model swap with the real face models (SCRFD, ArcFace):
//! upload → preprocessing job → completed or a readable failure; model swap
//! end to end on the embedded stack and on PostgreSQL + RabbitMQ + S3.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use image::RgbImage;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn model_photo(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/testdata")
            .join(name),
    )
    .expect("face test photo (scripts/fetch-models)")
}

fn garment_photo() -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/garment.jpg")).expect("testdata")
}

async fn wait_for_identity(app: &TestApp, code: &str) -> Value {
    let t = Instant::now();
    loop {
        let (s, v) = app.get(&format!("/identity/{code}/status")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if matches!(
            v["preprocessing_status"].as_str(),
            Some("completed" | "failed")
        ) {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "identity {code} stuck: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Upload waits for the face check: a face → 201 `completed`; no face,
/// a corrupt photo → 400 and nothing kept; a name clash → 409 with both codes.
#[tokio::test]
async fn identity_upload_checks_the_face_before_answering() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, with_models).await;
    let (before, _) = app.balance(&app.key.clone()).await;

    let (s, v) = app
        .post_form(
            "/identity/upload",
            ("image", "newton.png", &model_photo("newton.png")),
            &[("name", "Isaac"), ("tag", "team_1")],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["success"], true);
    assert_eq!(v["face_detected"], true, "{v}");
    assert_eq!(v["preprocessing_status"], "completed", "{v}");
    let code = v["identity_code"].as_str().expect("code").to_string();
    let meta = &v["face_metadata"];
    // The face SCRFD's own package marks at about (335, 89)–(439, 233).
    assert!(
        (meta["x"].as_f64().expect("x") - 335.0).abs() < 10.0,
        "{meta}"
    );
    assert!(
        meta["confidence"].as_f64().expect("confidence") > 0.5,
        "{meta}"
    );
    let q = v["quality_score"].as_f64().expect("quality");
    assert!(q > 0.0 && q <= 1.0, "{q}");
    assert!(
        ((q * 1000.0).round() - q * 1000.0).abs() < 1e-6,
        "three decimals: {q}"
    );
    // The crop is a real 512×512 face image.
    let crop = app.fetch(&v["face_link"]).await;
    let crop = image::load_from_memory(&crop).expect("crop decodes");
    assert_eq!((crop.width(), crop.height()), (512, 512));
    let (after, reserved) = app.balance(&app.key.clone()).await;
    assert_eq!((before - after, reserved), (50.0, 0.0));

    let (s, v) = app.get(&format!("/identity/{code}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "Isaac");
    let (s, v) = app.get("/identity?search=isa").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["pagination"]["total"], 1, "{v}");
    // Filters match text literally: `_` and `%` are not wildcards.
    for (query, total) in [
        ("tag=team_", 1),
        ("tag=TEAM", 1),
        ("tag=team%25", 0),
        ("search=I_aac", 0),
    ] {
        let (s, v) = app.get(&format!("/identity?{query}")).await;
        assert_eq!(s, StatusCode::OK, "{query}: {v}");
        assert_eq!(v["pagination"]["total"], total, "{query}: {v}");
    }
    let (s, v) = app.get("/identity?tag=a%00b").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // Same name: 409 naming the existing identity twice; nothing charged.
    let (s, v) = app
        .post_form(
            "/identity/upload",
            ("image", "gauss.png", &model_photo("gauss.png")),
            &[("name", "Isaac")],
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["existing_identity_code"], code.as_str());
    assert_eq!(v["identity_code"], code.as_str());

    // No face: 400 with the reason; the credits come back, nothing is listed.
    let (s, v) = app
        .post_form(
            "/identity/upload",
            ("image", "garment.jpg", &garment_photo()),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["face_detected"], false, "{v}");
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .contains("no face detected"),
        "{v}"
    );
    // Corrupt bytes behind a PNG signature: refused before any job.
    let mut corrupt = b"\x89PNG\r\n\x1a\n".to_vec();
    corrupt.extend_from_slice(&[7u8; 300]);
    let (s, v) = app
        .post_form("/identity/upload", ("image", "broken.png", &corrupt), &[])
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .contains("unreadable image"),
        "{v}"
    );
    // No image part at all.
    let (s, v) = app
        .post_form(
            "/identity/upload",
            ("photo", "x.png", &model_photo("gauss.png")),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    let (_, v) = app.get("/identity").await;
    assert_eq!(v["pagination"]["total"], 1, "{v}");
    let (after2, reserved) = app.balance(&app.key.clone()).await;
    assert_eq!(
        (after2, reserved),
        (after, 0.0),
        "the failed upload's credits are released"
    );

    // Replacing the face (point of view 0) with Gauss's photo: free, and
    // the identity then works with the new face.
    let (s, v) = app
        .post_form(
            &format!("/identity/{code}/pov"),
            ("image", "gauss.png", &model_photo("gauss.png")),
            &[("pov_index", "0")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["processed_count"], 1, "{v}");
    let replaced = v["preprocessing_job_id"].as_str().expect("job").to_string();
    app.fetch(&v["processed_images"][0]["link"]).await;
    let (_, st) = app.get(&format!("/identity/{code}/status")).await;
    assert_eq!(st["preprocessing_job_id"], replaced.as_str(), "{st}");
    assert_eq!(st["preprocessing_status"], "completed", "{st}");
    // A replacement without a face is refused and changes nothing.
    let (s, v) = app
        .post_form(
            &format!("/identity/{code}/pov"),
            ("image", "garment.jpg", &garment_photo()),
            &[("pov_index", "0")],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .contains("no face detected"),
        "{v}"
    );
    let (_, st) = app.get(&format!("/identity/{code}/status")).await;
    assert_eq!(st["preprocessing_job_id"], replaced.as_str(), "{st}");
    assert_eq!(st["preprocessing_status"], "completed", "{st}");
    // Replacements do not report the identity as failed (or pending).
    let (_, n) = app
        .post(
            "/notifications",
            json!({"name_list": "identity_preprocessing"}),
        )
        .await;
    let statuses: Vec<&str> = n
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["data"]["identity_code"] == code.as_str())
        .filter_map(|e| e["data"]["preprocessing_status"].as_str())
        .collect();
    assert_eq!(statuses, ["pending", "processing", "completed"], "{n}");
    // A second point of view of the same person (Gauss mirrored) is added
    // with the next index; both are listed, normalised to 1024×1024.
    let mirrored = {
        let img = image::load_from_memory(&model_photo("gauss.png")).expect("png");
        let mut out = std::io::Cursor::new(Vec::new());
        img.fliph()
            .write_to(&mut out, image::ImageFormat::Png)
            .expect("encode");
        out.into_inner()
    };
    let (s, v) = app
        .post_form(
            &format!("/identity/{code}/pov"),
            ("image", "gauss-left.png", &mirrored),
            &[("pov_index", "1")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["pov_index"], 1, "{v}");
    assert_eq!(v["processed_count"], 2, "{v}");
    let names: Vec<&str> = v["processed_images"]
        .as_array()
        .expect("images")
        .iter()
        .filter_map(|p| p["original_filename"].as_str())
        .collect();
    assert_eq!(names, ["gauss.png", "gauss-left.png"], "{v}");
    for p in v["processed_images"].as_array().expect("images") {
        let pov = image::load_from_memory(&app.fetch(&p["link"]).await).expect("jpeg");
        assert_eq!((pov.width(), pov.height()), (1024, 1024));
        image::load_from_memory(&app.fetch(&p["thumbnail_link"]).await).expect("thumbnail");
    }
    let two_views = v["preprocessing_job_id"].as_str().expect("job").to_string();
    // Another person as a point of view is refused, naming why, and the
    // identity keeps its two views.
    let (s, v) = app
        .post_form(
            &format!("/identity/{code}/pov"),
            ("image", "newton.png", &model_photo("newton.png")),
            &[("pov_index", "1")],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"].as_str().expect("error").contains("another person"),
        "{v}"
    );
    let (_, st) = app.get(&format!("/identity/{code}/status")).await;
    assert_eq!(st["preprocessing_job_id"], two_views.as_str(), "{st}");
    // Indexes past the next one are out of range, named in the answer.
    for bad in ["3", "-1", "one"] {
        let (s, v) = app
            .post_form(
                &format!("/identity/{code}/pov"),
                ("image", "gauss.png", &model_photo("gauss.png")),
                &[("pov_index", bad)],
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert!(v.to_string().contains("pov_index"), "{v}");
    }
    let (after3, _) = app.balance(&app.key.clone()).await;
    assert_eq!(after3, after, "replacing a point of view is free");
    let objects_before_delete = count_files(&app.dir.path().join("objects"));

    // Delete frees the identity and erases its objects: both photos' crops,
    // thumbnails, embeddings and the photos themselves.
    let (s, _) = app
        .delete_as(&app.key.clone(), &format!("/identity/{code}"))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = app.get(&format!("/identity/{code}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let erased = objects_before_delete - count_files(&app.dir.path().join("objects"));
    // The three photos kept (upload, replacement, second view) and what
    // each of the three builds stored: crop, thumbnail, embedding, and each
    // point of view with its thumbnail (1, 1, 2). The refused photos were
    // not kept.
    assert_eq!(erased, 3 + 3 * 3 + 2 * (1 + 1 + 2), "objects erased by the delete");
    app.audit_clean().await;
    app.stop().await;
}

fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() { count_files(&p) } else { 1 }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Without waiting, the outcome is the status endpoint's: `completed` for
/// a face, `failed` with `no face detected` for a garment; a swap with the
/// failed identity is a 409, and the slot cap is a 429.
#[tokio::test]
async fn identity_preprocessing_runs_on_the_identity_queue() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_models(c);
        c.identity.upload_wait_ms = 0;
        c.identity.slots = 2;
        // Every task waits a second before it runs: the job is still
        // unfinished when the delete below arrives.
        c.worker.fault_delay_ms = 1000;
    })
    .await;
    let (s, v) = app
        .post_form(
            "/identity/upload",
            ("image", "gauss.png", &model_photo("gauss.png")),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["name"], "gauss", "default name: the file stem");
    assert_eq!(v["face_detected"], Value::Null, "not checked yet: {v}");
    let good = v["identity_code"].as_str().expect("code").to_string();
    let job = v["preprocessing_job_id"].as_str().expect("job").to_string();
    // Its preprocessing job is still running: it cannot be deleted.
    let (s, d) = app
        .delete_as(&app.key.clone(), &format!("/identity/{good}"))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{d}");
    assert_eq!(d["code"], "identity_in_use", "{d}");
    let st = wait_for_identity(&app, &good).await;
    assert_eq!(st["preprocessing_status"], "completed", "{st}");
    assert!(st["preprocessing_time"].as_f64().is_some(), "{st}");
    let (_, j) = app.get(&format!("/jobs/{job}/status")).await;
    assert_eq!(j["job_type"], "identity_preprocessing", "{j}");
    let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
    assert_eq!(r["identity"]["identity_code"], good.as_str(), "{r}");
    assert_eq!(r["identity"]["preprocessing_status"], "completed", "{r}");
    assert!(r["identity"]["quality_score"].as_f64().is_some(), "{r}");

    let (s, v) = app
        .post_form(
            "/identity/upload",
            ("image", "garment.jpg", &garment_photo()),
            &[("name", "shirt")],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let bad = v["identity_code"].as_str().expect("code").to_string();
    let st = wait_for_identity(&app, &bad).await;
    assert_eq!(st["preprocessing_status"], "failed", "{st}");
    assert_eq!(st["error_message"], "no face detected", "{st}");

    // Each status change was notified as `identity_preprocessing`.
    let (s, v) = app
        .post(
            "/notifications",
            json!({"name_list": "identity_preprocessing"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let seen = |code: &str| -> Vec<Value> {
        v.as_array()
            .expect("array")
            .iter()
            .filter(|n| n["data"]["identity_code"] == code)
            .map(|n| n["data"].clone())
            .collect()
    };
    let good_events = seen(&good);
    let statuses: Vec<&str> = good_events
        .iter()
        .filter_map(|d| d["preprocessing_status"].as_str())
        .collect();
    assert_eq!(statuses, ["pending", "processing", "completed"], "{v}");
    assert_eq!(good_events[2]["preprocessing_job_id"], job.as_str());
    assert!(good_events[2]["quality_score"].as_f64().is_some(), "{v}");
    let bad_events = seen(&bad);
    assert_eq!(
        bad_events.last().expect("events")["preprocessing_status"],
        "failed",
        "{v}"
    );
    assert_eq!(
        bad_events.last().expect("events")["error_message"],
        "no face detected",
        "{v}"
    );

    // Two identities exist: the cap of 2 is reached.
    let (s, v) = app
        .post_form(
            "/identity/upload",
            ("image", "newton.png", &model_photo("newton.png")),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["code"], "identity_slots_exhausted", "{v}");

    // A swap needs a completed identity.
    let p = app.project("swaps").await;
    let f = app.upload(model_photo("newton.png"), "model.png").await;
    let (s, v) = app
        .post(
            "/model-swap",
            json!({"project_id": p, "images": [f], "identity_code": bad}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["code"], "identity_not_ready", "{v}");
    let (s, v) = app
        .post(
            "/model-swap",
            json!({"project_id": p, "images": [f], "identity_code": "idn_nope"}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    // An account without credits is told the identity is unknown, not
    // that it lacks credits: the identity is checked first.
    let poor = app.account("poor", 0.0).await;
    let (_, pp) = app
        .post_as(&poor, "/project", json!({"project_name": "p"}))
        .await;
    let pf = app
        .upload_as(&poor, model_photo("newton.png"), "m.png")
        .await;
    let (s, v) = app
        .post_as(
            &poor,
            "/model-swap",
            json!({"project_id": pp["project_id"], "images": [pf], "identity_code": good}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another account's identity: {v}");
    let (s, v) = app
        .post("/model-swap", json!({"project_id": p, "images": [f], "identity_code": good, "swap_options": {"model": "nano_banana_pro"}}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    app.audit_clean().await;
    app.stop().await;
}

fn mean_abs_diff(a: &RgbImage, b: &RgbImage, keep: impl Fn(u32, u32) -> bool) -> f64 {
    let (mut sum, mut n) = (0.0f64, 0u64);
    for (x, y, p) in a.enumerate_pixels() {
        if !keep(x, y) {
            continue;
        }
        let q = b.get_pixel(x, y);
        sum += (0..3)
            .map(|c| (f64::from(p[c]) - f64::from(q[c])).abs())
            .sum::<f64>()
            / 3.0;
        n += 1;
    }
    assert!(n > 0, "no pixel compared");
    sum / n as f64
}

async fn swap_end_to_end(
    dialect: Dialect,
    engine: &str,
    tweak: impl FnOnce(&mut atelier_shared::config::Config),
) {
    let app = TestApp::with(dialect, Roles::ALL, |c| {
        with_models(c);
        tweak(c);
    })
    .await;
    let (s, v) = app
        .post_form(
            "/identity/upload",
            ("image", "gauss.png", &model_photo("gauss.png")),
            &[("name", "Carl")],
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let code = v["identity_code"].as_str().expect("code").to_string();
    let st = wait_for_identity(&app, &code).await;
    assert_eq!(st["preprocessing_status"], "completed", "{st}");

    let (before, _) = app.balance(&app.key.clone()).await;
    let p = app.project("swap").await;
    let product = model_photo("newton.png");
    let with_face = app.upload(product.clone(), "look.png").await;
    let no_face = app.upload(garment_photo(), "flat.jpg").await;
    let (s, v) = app
        .post(
            "/model-swap",
            json!({"project_id": p, "images": [with_face, {"file_id": no_face, "note": "flat lay"}], "identity_code": code}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["total_outputs"], 2);
    let job = v["job_id"].as_str().expect("job").to_string();
    let st = app.wait_for_job(&job, Duration::from_secs(120)).await;
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["identity_code"], code.as_str(), "{st}");

    let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
    let results = r["results"].as_array().expect("results");
    let swapped = &results[0];
    assert_eq!(swapped["status"], "completed", "{swapped}");
    // Each output keeps its input photo's own name (§3.10).
    assert_eq!(
        (swapped["original_filename"].as_str(), results[1]["original_filename"].as_str()),
        (Some("look.png"), Some("flat.jpg")),
        "{r}"
    );
    assert!(
        swapped["model_used"]
            .as_str()
            .is_some_and(|m| m.starts_with("atelier-swap") && m.contains(engine)),
        "{swapped}"
    );
    // The photo without a face fails alone, with the reason, and is not charged.
    assert_eq!(results[1]["status"], "failed", "{}", results[1]);
    assert!(
        results[1]["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("no face detected in the product photo")),
        "{}",
        results[1]
    );
    let (after, reserved) = app.balance(&app.key.clone()).await;
    assert_eq!((before - after, reserved), (3.0, 0.0));

    let out = image::load_from_memory(&app.fetch(&swapped["output"]["full_size"]).await)
        .expect("result decodes")
        .to_rgb8();
    let input = image::load_from_memory(&product).expect("input").to_rgb8();
    assert_eq!(out.dimensions(), input.dimensions());
    let fb: Vec<f64> = swapped["input_description"]["face_box"]
        .as_array()
        .expect("face_box")
        .iter()
        .map(|v| v.as_f64().expect("number"))
        .collect();
    let region: Vec<u32> = swapped["input_description"]["changed_region"]
        .as_array()
        .expect("region")
        .iter()
        .map(|v| v.as_u64().expect("number") as u32)
        .collect();
    let inside = |x: u32, y: u32| {
        f64::from(x) >= fb[0]
            && f64::from(x) < fb[2]
            && f64::from(y) >= fb[1]
            && f64::from(y) < fb[3]
    };
    let outside =
        |x: u32, y: u32| x < region[0] || x >= region[2] || y < region[1] || y >= region[3];
    let face_diff = mean_abs_diff(&out, &input, inside);
    let far_diff = mean_abs_diff(&out, &input, outside);
    eprintln!(
        "model swap: mean |Δ| {face_diff:.2} inside the face box, {far_diff:.2} outside the changed region {region:?}"
    );
    if let Ok(dir) = std::env::var("ATELIER_TEST_SAVE_DIR") {
        out.save(format!("{dir}/swap.png")).expect("save");
    }
    // Tasks are counted per work queue.
    let m = app.metrics().await;
    assert!(
        m.lines().any(|l| l.starts_with("atelier_tasks_total")
            && l.contains("type=\"swap\"")
            && l.contains("outcome=\"completed\"")),
        "no swap tasks counted"
    );
    // Far outside the face the photo is the input up to JPEG re-encoding;
    // inside it, another person's face.
    assert!(
        far_diff < 3.0,
        "outside the face the result differs by {far_diff:.2} on average"
    );
    assert!(
        face_diff > 8.0,
        "inside the face box the result differs by only {face_diff:.2}"
    );
    app.audit_clean().await;
    app.stop().await;
}

#[tokio::test]
async fn model_swap_end_to_end_embedded() {
    swap_end_to_end(Dialect::Sqlite, "laplacian blend", |_| {}).await;
}

#[tokio::test]
async fn model_swap_end_to_end_on_postgres_rabbitmq_and_s3() {
    let _broker = broker_lock().await;
    let bucket = s3_bucket().await;
    swap_end_to_end(Dialect::Postgres, "laplacian blend", |c| {
        with_rabbitmq(c);
        with_s3(c, &bucket);
    })
    .await;
}

/// An operator-installed face-swap model (here the generated test model
/// with the common signature) draws the face; the rest of the job is the
/// same.
#[tokio::test]
async fn model_swap_runs_a_configured_onnx_swap_model() {
    swap_end_to_end(Dialect::Sqlite, "onnx swap_invert", |c| {
        c.models.face_swap = "test/swap_invert.onnx".into();
    })
    .await;
}

/// A model swap (or flat-2-model) sent while its identity is still being
/// preprocessed is admitted and waits for it: the scheduler holds its
/// outputs until the face exists, then the swap runs with it; when the
/// preprocessing fails, the waiting job fails with its reason and costs
/// nothing (what `batch_swap.py --parallel 3` does with a fresh identity).
#[tokio::test]
async fn a_swap_waits_for_the_identity_it_names() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_models(c);
        // The upload answers at once, before the face check, and every
        // task takes a while: the swaps come while the faces are built.
        c.identity.upload_wait_ms = 0;
        c.worker.fault_delay_ms = 1500;
        c.limits.create_per_minute = 1000;
    })
    .await;
    let p = app.project("fresh").await;
    let f = app.upload(model_photo("newton.png"), "model.png").await;
    let (before, _) = app.balance(&app.key).await;
    let upload = |photo: Vec<u8>, name: &'static str| {
        let app = &app;
        async move {
            let (s, v) = app
                .post_form("/identity/upload", ("image", "photo.png", &photo), &[("name", name)])
                .await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            v["identity_code"].as_str().expect("code").to_string()
        }
    };
    let good = upload(model_photo("gauss.png"), "fresh").await;
    let bad = upload(garment_photo(), "faceless").await;
    let mut jobs = Vec::new();
    for code in [&good, &bad] {
        let (_, st) = app.get(&format!("/identity/{code}/status")).await;
        assert!(
            matches!(st["preprocessing_status"].as_str(), Some("pending" | "processing")),
            "{st}"
        );
        let (s, v) = app
            .post("/model-swap", json!({"project_id": p, "images": [f], "identity_code": code}))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "admitted while {code} is preprocessed: {v}");
        jobs.push(v["job_id"].as_str().expect("job").to_string());
    }
    let ok = app.wait_for_job(&jobs[0], Duration::from_secs(120)).await;
    assert_eq!(ok["status"], "completed", "{ok}");
    let (_, id) = app.get(&format!("/identity/{good}/status")).await;
    assert_eq!(id["preprocessing_status"], "completed");
    let failed = app.wait_for_job(&jobs[1], Duration::from_secs(120)).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed.to_string().contains("the identity's preprocessing failed"),
        "{failed}"
    );
    // Two identities (50 each) and one swap (3); the failed swap is free.
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!((before - after, reserved), (50.0 + 3.0, 0.0), "only what was made is charged");
    // Once failed, the identity is refused outright.
    let (s, v) = app
        .post("/model-swap", json!({"project_id": p, "images": [f], "identity_code": bad}))
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::CONFLICT, Some("identity_not_ready")), "{v}");
    app.audit_clean().await;
}

/// Identities beyond their owner (contract §5.1, §5.3, §5.4, §5.9): shared
/// with a group, a member reads it, lists it as `shared` and swaps with
/// it, an outsider sees nothing; unshared, it is gone for the member.
/// A platform identity (offered by the operator from a plan tier up) is
/// listed as `default` to every account its tier reaches, `locked` to the
/// others with `include_locked`, filtered by the operator's gender and
/// age, and cannot be deleted through the API.
#[tokio::test]
async fn identities_are_shared_with_groups_and_offered_by_the_platform() {
    let app = TestApp::with(Dialect::Postgres, Roles::ALL, with_models).await;
    let member = app.account("member", 100.0).await;
    let outsider = app.account("outsider", 100.0).await;
    let owner_id = app.dev_account_id().await;
    let member_id = app.store.account_for_token(&member).await.expect("lookup").expect("member").id;
    app.store.create_group("studio", &owner_id, false).await.expect("group");
    app.store.add_group_member("studio", &member_id).await.expect("member");

    let (s, v) = app
        .post_form("/identity/upload", ("image", "newton.png", &model_photo("newton.png")), &[("name", "Isaac")])
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let code = v["identity_code"].as_str().expect("code").to_string();
    assert_eq!((v["visibility"].as_str(), v["groups"].clone()), (Some("private"), json!([])));
    let path = format!("/identity/{code}");
    let (s, _) = app.get_as(&member, &path).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "private before it is shared");

    // Sharing: only with a group the owner belongs to.
    let (s, v) = app.post(&format!("{path}/share/elsewhere"), json!({})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = app.post_as(&member, &format!("{path}/share/studio"), json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "only the owner shares: {v}");
    let (s, v) = app.post(&format!("{path}/share/studio"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"identity_code": code, "visibility": "shared", "groups": ["studio"]}));

    let (s, v) = app.get_as(&member, &path).await;
    assert_eq!((s, v["visibility"].as_str(), v["groups"].clone()), (StatusCode::OK, Some("shared"), json!(["studio"])), "{v}");
    let (s, v) = app.get_as(&member, &format!("{path}/status")).await;
    assert_eq!((s, v["preprocessing_status"].as_str()), (StatusCode::OK, Some("completed")), "{v}");
    for (q, n) in [("", 1), ("?ownership=shared", 1), ("?ownership=mine", 0), ("?ownership=default", 0)] {
        let (s, v) = app.get_as(&member, &format!("/identity{q}")).await;
        assert_eq!((s, v["pagination"]["total"].as_i64()), (StatusCode::OK, Some(n)), "{q}: {v}");
    }
    let (s, v) = app.get_as(&outsider, &path).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (_, v) = app.get_as(&outsider, "/identity").await;
    assert_eq!(v["pagination"]["total"], 0, "{v}");

    // The member uses it in a job of its own (its credits).
    let (_, project) = app.post_as(&member, "/project", json!({"project_name": "m"})).await;
    let photo = app.upload_as(&member, model_photo("newton.png"), "m.png").await;
    let (s, v) = app
        .post_as(&member, "/model-swap", json!({"project_id": project["project_id"], "images": [photo], "identity_code": code}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let done = app
        .wait_for_job_as(&member, v["job_id"].as_str().expect("job"), Duration::from_secs(120))
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    let (s, v) = app.delete_as(&member, &path).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "only its owner deletes it: {v}");
    // A member adds a point of view (§5.8: owner or group members); an
    // outsider cannot see the identity at all.
    let mirrored = {
        let img = image::load_from_memory(&model_photo("newton.png")).expect("png");
        let mut out = std::io::Cursor::new(Vec::new());
        img.fliph().write_to(&mut out, image::ImageFormat::Png).expect("encode");
        out.into_inner()
    };
    let pov = ("image", "newton-left.png", mirrored.as_slice());
    let (s, v) = app.post_form_as(&outsider, &format!("{path}/pov"), pov, &[("pov_index", "1")]).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = app.post_form_as(&member, &format!("{path}/pov"), pov, &[("pov_index", "1")]).await;
    assert_eq!((s, v["processed_count"].as_i64()), (StatusCode::OK, Some(2)), "{v}");
    let rebuilt = v["preprocessing_job_id"].clone();
    let (_, v) = app.get(&format!("{path}/status")).await;
    assert_eq!(
        (v["preprocessing_status"].as_str(), v["preprocessing_job_id"].clone()),
        (Some("completed"), rebuilt),
        "the owner's identity has the rebuilt face: {v}"
    );

    // Unshared: gone for the member, jobs and all.
    let (s, v) = app.delete_as(&app.key, &format!("{path}/share/studio")).await;
    assert_eq!((s, v["visibility"].as_str()), (StatusCode::OK, Some("private")), "{v}");
    let (s, _) = app.get_as(&member, &path).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let photo2 = app.upload_as(&member, model_photo("newton.png"), "m2.png").await;
    let (s, _) = app
        .post_as(&member, "/model-swap", json!({"project_id": project["project_id"], "images": [photo2], "identity_code": code}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A platform identity for enterprise plans, described by the operator.
    let admin = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_atelier"))
            .arg("admin")
            .args(args)
            .env("ATELIER_DATABASE__URL", app.cfg.database_url())
            .env("ATELIER_LOG__LEVEL", "warn")
            .output()
            .expect("runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).expect("json")
    };
    let v = admin(&["identities", "platform", &code, "--tier", "enterprise", "--gender", "Male", "--age", "46"]);
    assert_eq!(v["visibility"], "default", "{v}");
    let (s, _) = app.get_as(&outsider, &path).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a standard plan does not reach the enterprise tier");
    let (_, v) = app.get_as(&outsider, "/identity?include_locked=true").await;
    assert_eq!((v["pagination"]["total"].as_i64(), v["identities"][0]["locked"].as_bool()), (Some(1), Some(true)), "{v}");
    admin(&["identities", "platform", &code, "--tier", "standard", "--gender", "male", "--age", "46"]);
    let (s, v) = app.get_as(&outsider, &path).await;
    assert_eq!((s, v["visibility"].as_str(), v["tier"].as_str()), (StatusCode::OK, Some("default"), Some("standard")), "{v}");
    assert_eq!(v["image_description"]["gender"], "male", "{v}");
    let (s, v) = app.post_form_as(&outsider, &format!("{path}/pov"), pov, &[("pov_index", "0")]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a platform identity's views are the operator's: {v}");
    for (q, n) in [
        ("?ownership=default", 1),
        ("?gender=male", 1),
        ("?gender=female", 0),
        ("?age_min=40&age_max=50", 1),
        ("?age_min=47", 0),
        ("?ownership=mine", 0),
    ] {
        let (s, v) = app.get_as(&outsider, &format!("/identity{q}")).await;
        assert_eq!((s, v["pagination"]["total"].as_i64()), (StatusCode::OK, Some(n)), "{q}: {v}");
    }
    let (_, v) = app.get_as(&outsider, "/identity?include_locked=true").await;
    assert_eq!(v["identities"][0]["locked"], false, "{v}");
    let (s, v) = app.get("/identity?age_min=-1").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = app.delete_as(&app.key, &path).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a platform identity is not deleted through the API: {v}");
    let (s, v) = app.post(&format!("{path}/share/studio"), json!({})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    admin(&["identities", "unplatform", &code]);
    let (s, _) = app.get_as(&outsider, &path).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    app.audit_clean().await;
    app.stop().await;
}

/// Uploads are tagged by a worker (contract §2.6): a portrait is a
/// `model` photo, garments on a plain backdrop are `product`s, a picture
/// where nothing stands out is a `background`. The tagging is free and
/// quiet: no job in the caller's list, no notification.
#[tokio::test]
async fn uploads_are_tagged_by_what_a_worker_sees() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_models(c);
        c.limits.tag_uploads = true;
    })
    .await;
    let (before, _) = app.balance(&app.key.clone()).await;
    let sky = {
        let img = RgbImage::from_fn(400, 300, |x, y| {
            image::Rgb([
                (90 + y / 3) as u8,
                (140 + y / 4) as u8,
                (230 - x / 20) as u8,
            ])
        });
        let mut b = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
            .expect("png");
        b
    };
    let dress = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/dress.jpg"))
        .expect("testdata");
    let mut ids = Vec::new();
    for (bytes, name) in [
        (model_photo("newton.png"), "newton.png"),
        (garment_photo(), "shirt.jpg"),
        (dress, "dress.jpg"),
        (sky, "sky.png"),
    ] {
        ids.push((app.upload(bytes, name).await, name));
    }
    // One more in a project of its own, deleted below.
    let drop = app.project("drop").await;
    let (s, slot) = app
        .post(
            "/upload",
            json!({"filename": "drop-shirt.jpg", "project_name": "drop"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{slot}");
    let put = reqwest::Client::new()
        .put(slot["upload_url"].as_str().expect("upload_url"))
        .header("content-type", "image/jpeg")
        .body(garment_photo())
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), StatusCode::OK);
    let t = Instant::now();
    let listed = loop {
        let (s, v) = app.get("/assets?per_page=10").await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let assets = v["assets"].as_array().expect("assets").clone();
        if assets.iter().all(|a| a["tags"].as_array().is_some_and(|t| !t.is_empty())) {
            break assets;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "not tagged: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let tag_of = |name: &str| {
        listed
            .iter()
            .find(|a| a["filename"] == name)
            .map(|a| (a["tags"].clone(), a["detected"].clone()))
            .expect("listed")
    };
    for (name, tag) in [
        ("newton.png", "model"),
        ("shirt.jpg", "product"),
        ("dress.jpg", "product"),
        ("sky.png", "background"),
    ] {
        let (tags, detected) = tag_of(name);
        assert_eq!(tags, json!([tag]), "{name}: {detected}");
    }
    let (_, detected) = tag_of("newton.png");
    assert_eq!(detected["faces"], 1, "{detected}");
    let (_, detected) = tag_of("shirt.jpg");
    assert_eq!(detected["faces"], 0, "{detected}");
    assert_eq!(detected["plain_backdrop"], true, "{detected}");
    // The preview is the 512 px copy the worker looked at.
    let shirt = listed.iter().find(|a| a["filename"] == "shirt.jpg").expect("shirt");
    let big = image::load_from_memory(&app.fetch(&shirt["thumbnail_big"]).await).expect("jpeg");
    assert_eq!(big.width().max(big.height()), 512);
    image::load_from_memory(&app.fetch(&shirt["thumbnail_small"]).await).expect("thumbnail");

    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v["assets"]
            .as_array()
            .expect("assets")
            .iter()
            .filter_map(|a| a["filename"].as_str().map(str::to_string))
            .collect();
        n.sort();
        n
    };
    let (_, v) = app.get("/assets?include_tags=product").await;
    assert_eq!(names(&v), ["dress.jpg", "drop-shirt.jpg", "shirt.jpg"], "{v}");
    let (_, v) = app.get("/assets?include_tags=product,model").await;
    assert_eq!(v["pagination"]["total"], 0, "include is AND: {v}");
    let (_, v) = app.get("/assets?exclude_tags=product").await;
    assert_eq!(names(&v), ["newton.png", "sky.png"], "{v}");
    let (_, v) = app.get("/assets?exclude_tags=product,background").await;
    assert_eq!(names(&v), ["newton.png"], "{v}");
    let (_, v) = app.get("/assets?search=backgr").await;
    assert_eq!(names(&v), ["sky.png"], "search matches tags: {v}");

    // Deleting the project moves its upload to `default` with its tags:
    // the tagging was not the project's work.
    let (s, v) = app.delete_as(&app.key.clone(), &format!("/project/{drop}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (_, v) = app.get("/assets?search=drop-shirt").await;
    assert_eq!(v["assets"][0]["tags"], json!(["product"]), "{v}");

    // Free and quiet.
    let (after, _) = app.balance(&app.key.clone()).await;
    assert_eq!(after, before, "tagging is free");
    let (_, jobs) = app.get("/jobs").await;
    assert_eq!(jobs["pagination"]["total"], 0, "{jobs}");
    let (s, n) = app
        .post(
            "/notifications",
            json!({"name_list": "batch_edit,image_result"}),
        )
        .await;
    assert_eq!((s, n.clone()), (StatusCode::OK, json!([])), "nothing notifies of tagging");
    app.audit_clean().await;
    app.stop().await;
}
