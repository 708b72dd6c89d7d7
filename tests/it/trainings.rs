//! Trainings (contract §7, §8.4, §8.5) on real Cog trainer runtimes: the
//! fixture trainer (tests/fixtures/cog/trainer) learns the mean colour of
//! its dataset and writes it as its weights, so these tests prove that the
//! frozen dataset reached the trainer and that its weights came back.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::config::{CogInput, Config};
use atelier_shared::db::Dialect;
use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Five solid colours; their mean is what the fixture trainer learns.
const COLOURS: [[u8; 3]; 5] = [
    [200, 20, 20],
    [20, 200, 20],
    [20, 20, 200],
    [200, 200, 20],
    [100, 100, 100],
];

fn mean_colour() -> [f64; 3] {
    let mut m = [0.0; 3];
    for c in COLOURS {
        for i in 0..3 {
            m[i] += f64::from(c[i]) / COLOURS.len() as f64;
        }
    }
    m
}

fn png(rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(40, 30, image::Rgb(rgb));
    let mut b = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
        .expect("encode");
    b
}

/// The trainer mapping of the fixture: `step_seconds` sets its pace.
pub fn with_trainer(c: &mut Config, url: &str, step_seconds: f64) {
    c.training.containers = vec![url.to_string()];
    c.training.inputs = [
        ("input_images", CogInput::Field("dataset_url".into())),
        ("trigger_word", CogInput::Field("trigger_word".into())),
        ("max_train_steps", CogInput::Field("max_train_steps".into())),
        ("epochs", CogInput::Field("epochs".into())),
        ("learning_rate", CogInput::Field("learning_rate".into())),
        ("step_seconds", CogInput::Constant(json!(step_seconds))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    c.training.poll_ms = 100;
    c.training.lost_after_secs = 3;
    c.training.relaunch_cooldown_secs = 0;
    c.training.startup_secs = 60;
}

/// The fixture predictor of tests/fixtures/cog/lora as the route that
/// draws predictions.
fn with_lora_route(c: &mut Config, url: &str) {
    let route: atelier_shared::config::EngineRoute = toml::from_str(&format!(
        r#"
kind = "cog"
url = "{url}"
timeout_secs = 60
[inputs.prediction]
prompt = "$prompt"
loras = "$loras"
seed = "$seed"
width = "$width"
height = "$height"
output_format = "$output_format"
"#
    ))
    .expect("route");
    c.engines.routes.insert("seedream".into(), route);
}

/// Seed 001's predictions with the weights of training `tid` of `model`.
async fn predictions_use_the_trained_weights(app: &TestApp, model: &str, tid: &str, trigger: &str) {
    let body = |prompt: &str, extra: Value| {
        let mut b = json!({
            "scaleConfigs": {"1": {"scale": 0.5, "modelId": model, "trainingId": tid}},
            "prompt": prompt,
            "seed": 7,
            "image_size": {"width": 512, "height": 512},
            "num_images": 2,
            "output_format": "png",
        });
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    for (extra, status, what) in [
        (json!({"scaleConfigs": {}}), StatusCode::BAD_REQUEST, "scaleConfigs"),
        (json!({"scaleConfigs": {"1": {"scale": 2, "modelId": model, "trainingId": tid}}}), StatusCode::BAD_REQUEST, "scale"),
        (json!({"scaleConfigs": {"1": {"scale": 0.5, "modelId": model, "trainingId": "trn_nope"}}}), StatusCode::NOT_FOUND, "trn_nope"),
        (json!({"scaleConfigs": {"1": {"scale": 0.5, "modelId": "cm_nope", "trainingId": tid}}}), StatusCode::NOT_FOUND, "cm_nope"),
        (json!({"image_size": {"width": 500, "height": 512}}), StatusCode::BAD_REQUEST, "image_size.width"),
        (json!({"image_size": {"width": 516, "height": 512}}), StatusCode::BAD_REQUEST, "multiple of 8"),
        (json!({"num_images": 5}), StatusCode::BAD_REQUEST, "num_images"),
        (json!({"output_format": "webp"}), StatusCode::BAD_REQUEST, "output_format"),
        (json!({"guidance_scale": 11}), StatusCode::BAD_REQUEST, "guidance_scale"),
        (json!({"num_inference_steps": 0}), StatusCode::BAD_REQUEST, "num_inference_steps"),
    ] {
        let (s, v) = app.post("/v1/predictions", body(&format!("dress {trigger}"), extra)).await;
        assert_eq!(s, status, "{v}");
        assert!(v.to_string().contains(what), "{what}: {v}");
    }
    let (s, v) = app
        .post("/v1/predictions", body(&format!("a summer dress in the style of {trigger}"), json!({})))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert!(v.get("warnings").is_none(), "{v}");
    let pid = v["predictionId"].as_str().expect("id").to_string();
    let (s, w) = app
        .post("/v1/predictions", body("a summer dress", json!({"num_images": 1})))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{w}");
    assert!(w["warnings"][0].as_str().unwrap_or("").contains(trigger), "{w}");
    let unlit = w["predictionId"].as_str().expect("id").to_string();
    for (id, n, lit) in [(&pid, 2, true), (&unlit, 1, false)] {
        let path = format!("/v1/predictions/{id}");
        let (done, _) = poll_training(app, &path, Duration::from_secs(60), |v| {
            v["status"] == "succeeded" || v["status"] == "failed"
        })
        .await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let urls = done["outputImages"].as_array().expect("images");
        assert_eq!(urls.len(), n, "{done}");
        let img = image::load_from_memory(&app.fetch(&urls[0]).await)
            .expect("an image")
            .to_rgb8();
        assert_eq!(img.dimensions(), (512, 512));
        let px = img.get_pixel(256, 256).0;
        let want: Vec<f64> = if lit {
            mean_colour().iter().map(|m| m * 0.5).collect()
        } else {
            vec![128.0; 3]
        };
        for c in 0..3 {
            assert!((f64::from(px[c]) - want[c]).abs() <= 2.0, "{px:?} vs {want:?}");
        }
        let marker = img.get_pixel(2, 2).0;
        assert_eq!(marker[1], 1, "one LoRA handed over");
        assert_eq!(marker[2], u8::from(lit), "active only with its trigger word");
    }
    let (s, _) = app.delete_as(&app.key, &format!("/v1/predictions/{pid}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = app.get(&format!("/v1/predictions/{pid}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

async fn raw_post(app: &TestApp, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let r = app
        .http
        .post(app.url(path))
        .header("x-api-key", &app.key)
        .header("content-type", "image/png")
        .body(body)
        .send()
        .await
        .expect("sent");
    let s = r.status();
    let text = r.text().await.expect("body");
    (s, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A custom model with `n` of the [`COLOURS`] as its training images.
async fn custom_model(app: &TestApp, n: usize) -> String {
    let (s, v) = app
        .post("/v1/custom-models", json!({"displayName": "Linen looks"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    for c in COLOURS.iter().take(n) {
        let (s, v) = raw_post(app, &format!("/v1/custom-models/{id}/data"), png(*c)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    id
}

/// Polls a training until `done` says so; every state seen on the way.
async fn poll_training(
    app: &TestApp,
    path: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> (Value, Vec<Value>) {
    let until = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let (s, v) = app.get(path).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        seen.push(v.clone());
        if done(&v) {
            return (v, seen);
        }
        assert!(Instant::now() < until, "{path} did not get there: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The weights a training recorded, read from the object store.
async fn weights(app: &TestApp, training_id: &str) -> Vec<Value> {
    let acc = app.dev_account_id().await;
    let t = app
        .store
        .training(&acc, training_id)
        .await
        .expect("read")
        .expect("the training");
    let described: Value =
        serde_json::from_str(t.input_description.as_deref().expect("weights recorded"))
            .expect("json");
    let mut out = Vec::new();
    for w in described["weights"].as_array().expect("weights") {
        let key = w["key"].as_str().expect("key");
        let bytes = app.services.objects.get(key).await.expect("weights object");
        out.push(serde_json::from_slice(&bytes).expect("the fixture's JSON weights"));
    }
    out
}

fn assert_learned_the_dataset(w: &Value, trigger: &str, images: u64) {
    assert_eq!(w["trigger_word"], trigger, "{w}");
    assert_eq!(w["images"], images, "{w}");
    let learned = w["mean_rgb"].as_array().expect("mean");
    for (i, want) in mean_colour().iter().enumerate() {
        let got = learned[i].as_f64().expect("number");
        assert!((got - want).abs() < 1.0, "channel {i}: {got} vs {want}: {w}");
    }
}

/// Seed 001's flow on the embedded stack: create → upload 5 images →
/// start → poll → the weights learned the dataset → predict with the
/// trigger word; every refusal of §7.
#[tokio::test]
async fn custom_model_training_end_to_end_embedded() {
    seed_001_flow(Dialect::Sqlite, |_| {}).await;
}

/// The same on PostgreSQL + RabbitMQ + S3.
#[tokio::test]
async fn custom_model_training_end_to_end_distributed() {
    let _broker = broker_lock().await;
    let bucket = s3_bucket().await;
    seed_001_flow(Dialect::Postgres, |c| {
        with_rabbitmq(c);
        with_s3(c, &bucket);
    })
    .await;
}

async fn seed_001_flow(dialect: Dialect, tweak: impl FnOnce(&mut Config)) {
    let trainer = CogFixture::trainer("trainer").await;
    let painter = CogFixture::start("lora").await;
    trainer.ready(Duration::from_secs(60)).await;
    let app = TestApp::with(dialect, Roles::ALL, |c| {
        with_trainer(c, &trainer.url, 0.02);
        with_lora_route(c, &painter.url);
        tweak(c);
    })
    .await;
    let (before, _) = app.balance(&app.key).await;
    let id = custom_model(&app, 4).await;
    let start = format!("/v1/custom-models/{id}/trainings");
    let (s, v) = app.post(&start, json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "fewer than 5 images: {v}");
    assert!(v.to_string().contains("at least 5"), "{v}");
    let (s, v) = raw_post(&app, &format!("/v1/custom-models/{id}/data"), png(COLOURS[4])).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    for (body, field) in [
        (json!({"trainingStrength": 11}), "trainingStrength"),
        (json!({"trainingStrength": -1}), "trainingStrength"),
        (json!({"trainingSpeed": "slow"}), "trainingSpeed"),
    ] {
        let (s, v) = app.post(&start, body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v.to_string().contains(field), "{v}");
    }
    let (s, v) = app
        .post("/v1/custom-models/cm_nope/trainings", json!({}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");

    let (s, v) = app
        .post(&start, json!({"trainingStrength": 5, "trainingSpeed": "fast"}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let tid = v["trainingId"].as_str().expect("trainingId").to_string();
    let (s, v) = app.post(&start, json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "one training per model: {v}");
    // 5 images × 60 steps (fast, strength 5) = 300 steps: 3 × 2 credits.
    let (_, reserved) = app.balance(&app.key).await;
    assert_eq!(reserved, 6.0);

    let path = format!("/v1/custom-models/{id}/trainings/{tid}");
    let (done, seen) = poll_training(&app, &path, Duration::from_secs(120), |v| {
        v["status"] == "succeeded" || v["status"] == "failed"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let trigger = done["triggerWord"].as_str().expect("trigger word");
    assert!(
        trigger.len() == 7
            && trigger
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()),
        "{trigger}"
    );
    assert_eq!((done["trainingStrength"].as_i64(), done["trainingSpeed"].as_str()), (Some(5), Some("fast")));
    assert!(done["error"].is_null(), "{done}");
    // Progress came from the trainer's logs while it ran.
    let mid = seen
        .iter()
        .filter(|v| v["status"] == "processing")
        .filter_map(|v| v["trainingProgress"]["progress"].as_f64())
        .find(|p| *p > 0.0 && *p < 1.0);
    assert!(mid.is_some(), "no progress seen: {seen:?}");
    assert_eq!(done["trainingProgress"]["progress"], 1.0);

    // Each state change was notified (created, started, finished).
    let acc = app.dev_account_id().await;
    let job = app.store.training(&acc, &tid).await.expect("read").expect("training").job_id;
    let (s, polled) = app
        .post("/notifications", json!({"id_task": job, "name_list": "batch_edit"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{polled}");
    let states: Vec<&str> = polled
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|n| n["data"]["status"].as_str())
        .collect();
    for want in ["pending", "processing", "completed"] {
        assert!(states.contains(&want), "{want} not notified: {polled}");
    }

    let w = weights(&app, &tid).await;
    assert_eq!(w.len(), 1);
    assert_learned_the_dataset(&w[0], trigger, 5);
    assert_eq!(w[0]["steps"], 300);
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!((before - after, reserved), (6.0, 0.0), "charged once, nothing held");
    assert_eq!(trainer.events(), vec![format!("start {trigger}"), format!("done {trigger}")]);

    let (s, list) = app.get(&start).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list, json!([{"id": tid, "status": "succeeded"}]));

    predictions_use_the_trained_weights(&app, &id, &tid, trigger).await;
    let (s, v) = app.post(&format!("{path}/cancel"), json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "already ended: {v}");
    let (s, _) = app.delete_as(&app.key, &path).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = app.get(&path).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, list) = app.get(&start).await;
    assert_eq!(list, json!([]));
    app.audit_clean().await;
}

/// Cancelling a running training stops it in its container and releases
/// its cost; the model can be trained again.
#[tokio::test]
async fn cancelling_a_training_stops_the_trainer_and_releases_the_credits() {
    let trainer = CogFixture::trainer("trainer").await;
    trainer.ready(Duration::from_secs(60)).await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_trainer(c, &trainer.url, 0.2)
    })
    .await;
    let (before, _) = app.balance(&app.key).await;
    let id = custom_model(&app, 5).await;
    let start = format!("/v1/custom-models/{id}/trainings");
    let (s, v) = app.post(&start, json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let tid = v["trainingId"].as_str().expect("id").to_string();
    let path = format!("/v1/custom-models/{id}/trainings/{tid}");
    let (running, _) = poll_training(&app, &path, Duration::from_secs(60), |v| {
        v["trainingProgress"]["position"].as_u64().unwrap_or(0) > 0
    })
    .await;
    assert_eq!(running["status"], "processing", "{running}");
    let (s, v) = app.post(&format!("{path}/cancel"), json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v, json!({"id": tid, "status": "canceled"}));
    let trigger = running["triggerWord"].as_str().expect("trigger").to_string();
    let until = Instant::now() + Duration::from_secs(20);
    while !trainer.cancelled().contains(&format!("canceled {trigger}")) {
        assert!(Instant::now() < until, "the trainer never saw the cancel");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, v) = app.get(&path).await;
    assert_eq!(v["status"], "canceled", "{v}");
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!((after, reserved), (before, 0.0), "nothing charged, nothing held");
    let (s, v) = app.post(&format!("{path}/cancel"), json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // The container is free again and the model can be retrained.
    trainer.ready(Duration::from_secs(20)).await;
    let (s, v) = app.post(&start, json!({"trainingSpeed": "high_quality"})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    app.audit_clean().await;
}

fn data_url(rgb: [u8; 3]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png(rgb))
    )
}

/// The Scenario-style flow on PostgreSQL + RabbitMQ + S3: create → add
/// training images → dry run → train → poll the job → download the weights
/// of each epoch; a training the trainer fails.
#[tokio::test]
async fn models_api_training_on_the_distributed_stack() {
    let _broker = broker_lock().await;
    let bucket = s3_bucket().await;
    scenario_flow(Dialect::Postgres, |c| {
        with_rabbitmq(c);
        with_s3(c, &bucket);
    })
    .await;
}

/// The same on the embedded stack.
#[tokio::test]
async fn models_api_training_embedded() {
    scenario_flow(Dialect::Sqlite, |_| {}).await;
}

async fn scenario_flow(dialect: Dialect, tweak: impl FnOnce(&mut Config)) {
    let trainer = CogFixture::trainer("trainer").await;
    let painter = CogFixture::start("lora").await;
    trainer.ready(Duration::from_secs(60)).await;
    let app = TestApp::with(dialect, Roles::ALL, |c| {
        with_trainer(c, &trainer.url, 0.01);
        with_lora_route(c, &painter.url);
        tweak(c);
    })
    .await;
    let (before, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/v1/models",
            json!({"name": "Linen", "type": "flux.1-lora", "parameters": {"nbEpochs": 2}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["model"]["id"].as_str().expect("id").to_string();
    let train = format!("/v1/models/{id}/train");
    let (s, v) = app.put_as(&app.key, &train, json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "no training images: {v}");
    for c in COLOURS {
        let (s, v) = app
            .post(
                &format!("/v1/models/{id}/training-images"),
                json!({"data": data_url(c), "name": "swatch.png"}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, v) = app
        .put_as(&app.key, &format!("{train}?dryRun=true"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Flux: 5 images × 100 steps = 500 steps → 5 × 2 credits.
    assert_eq!((v["job"].clone(), v["creativeUnitsCost"].as_f64()), (Value::Null, Some(10.0)));
    assert_eq!(v["model"]["status"], "new");
    let (s, v) = app
        .put_as(&app.key, &format!("{train}?dryRun=1&trainingImagesCount=40"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["creativeUnitsCost"], 80.0, "40 images × 100 steps: {v}");
    let (s, v) = app
        .put_as(&app.key, &train, json!({"parameters": {"rank": 999}}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("rank"), "{v}");
    let (s, v) = app
        .put_as(&app.key, &train, json!({"parameters": {"maxTrainSteps": 40}}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["creativeUnitsCost"], 2.0);
    assert_eq!(v["model"]["status"], "training");
    let job_id = v["job"]["jobId"].as_str().expect("jobId").to_string();
    assert_eq!(v["job"]["jobType"], "train");
    let (s, v) = app.put_as(&app.key, &train, json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "already training: {v}");
    let (s, v) = app.delete_as(&app.key, &format!("/v1/models/{id}")).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    let until = Instant::now() + Duration::from_secs(120);
    let job = loop {
        let (s, v) = app.get(&format!("/v1/jobs/{job_id}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let status = v["job"]["status"].as_str().unwrap_or("").to_string();
        if ["success", "failure", "canceled"].contains(&status.as_str()) {
            break v["job"].clone();
        }
        assert!(Instant::now() < until, "{v}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    };
    assert_eq!(job["status"], "success", "{job}");
    assert_eq!(job["progress"], 1.0);
    let history: Vec<&str> = job["statusHistory"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["status"].as_str())
        .collect();
    assert_eq!(history, ["queued", "in-progress", "success"], "{job}");
    let (_, m) = app.get(&format!("/v1/models/{id}")).await;
    assert_eq!(m["model"]["status"], "trained", "{m}");
    assert!(m["model"]["trainingStats"]["trainDuration"].as_i64().is_some(), "{m}");
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!((before - after, reserved), (2.0, 0.0));

    let (s, d) = app
        .post(&format!("/v1/models/{id}/download"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{d}");
    let files = d["job"]["metadata"]["output"]["files"]
        .as_array()
        .expect("files")
        .clone();
    assert_eq!(files.len(), 2, "one weights file per epoch: {d}");
    let mut epochs = Vec::new();
    for f in &files {
        let w: Value = serde_json::from_slice(&app.fetch(&f["url"]).await).expect("json");
        assert_learned_the_dataset(&w, w["trigger_word"].as_str().unwrap_or(""), 5);
        epochs.push(w["epoch"].as_u64());
    }
    assert_eq!(epochs, [Some(1), Some(2)]);
    assert_eq!(d["job"]["metadata"]["output"]["url"], files[1]["url"]);

    // Generating with the model uses its selected epoch (the last when unset).
    let trigger = d["job"]["metadata"]["output"]["triggerWord"]
        .as_str()
        .expect("trigger word")
        .to_string();
    for (epoch, want) in [(None, 2u8), (Some("000001"), 1)] {
        if let Some(e) = epoch {
            let (s, v) = app
                .put_as(&app.key, &format!("/v1/models/{id}"), json!({"epoch": e}))
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
        let (s, v) = app
            .post(
                "/v1/predictions",
                json!({
                    "scaleConfigs": {"1": {"scale": 1.0, "modelId": id}},
                    "prompt": format!("linen shirt, {trigger}"),
                    "image_size": {"width": 512, "height": 512},
                    "output_format": "png",
                }),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let path = format!("/v1/predictions/{}", v["predictionId"].as_str().expect("id"));
        let (done, _) = poll_training(&app, &path, Duration::from_secs(60), |v| {
            v["status"] == "succeeded" || v["status"] == "failed"
        })
        .await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let img = image::load_from_memory(&app.fetch(&done["outputImages"][0]).await)
            .expect("image")
            .to_rgb8();
        let px = img.get_pixel(256, 256).0;
        for (c, m) in mean_colour().iter().enumerate() {
            assert!((f64::from(px[c]) - m).abs() <= 2.0, "{px:?}");
        }
        assert_eq!(img.get_pixel(20, 4).0[0], want, "weights of epoch {want}");
    }
    let (s, v) = app
        .post(&format!("/v1/models/{id}/train/action"), json!({"action": "cancel"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "not training: {v}");

    // A training the trainer fails: the model shows it, nothing is charged.
    let (after, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/v1/models",
            json!({"name": "Doomed", "type": "flux.1-lora", "parameters": {"conceptPrompt": "FAILNOW", "maxTrainSteps": 20}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let doomed = v["model"]["id"].as_str().expect("id").to_string();
    let (s, v) = app
        .post(
            &format!("/v1/models/{doomed}/training-images"),
            json!({"assetIds": []}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    for c in COLOURS {
        let (s, v) = app
            .post(
                &format!("/v1/models/{doomed}/training-images"),
                json!({"data": data_url(c)}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, v) = app.put_as(&app.key, &format!("/v1/models/{doomed}/train"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let failing_job = v["job"]["jobId"].as_str().expect("job").to_string();
    let until = Instant::now() + Duration::from_secs(120);
    let failed = loop {
        let (_, v) = app.get(&format!("/v1/jobs/{failing_job}")).await;
        if v["job"]["status"] == "failure" {
            break v["job"].clone();
        }
        assert!(Instant::now() < until, "{v}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    };
    assert!(
        failed["metadata"]["error"].as_str().unwrap_or("").contains("asked to fail"),
        "{failed}"
    );
    let (_, m) = app.get(&format!("/v1/models/{doomed}")).await;
    assert_eq!(m["model"]["status"], "failed", "{m}");
    let (s, _) = app.post(&format!("/v1/models/{doomed}/download"), json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "nothing to download");
    let (after_failure, reserved) = app.balance(&app.key).await;
    assert_eq!((after - after_failure, reserved), (0.0, 0.0), "a failed training costs nothing");
    // A copy and a transfer of a trained model have weights of their own.
    let (s, c) = app.post(&format!("/v1/models/{id}/copy"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["model"]["status"], "trained", "{c}");
    let copy = c["model"]["id"].as_str().expect("id").to_string();
    let transfer = format!("/v1/models/{id}/transfer");
    let project = app.project("lookbook").await;
    for (body, status) in [
        (json!({}), StatusCode::BAD_REQUEST),
        (json!({"destinationProjectId": "prj_nope"}), StatusCode::NOT_FOUND),
        (json!({"destinationProjectId": project, "destinationTeamId": "grp_not_mine"}), StatusCode::FORBIDDEN),
    ] {
        let (s, v) = app.post(&transfer, body).await;
        assert_eq!(s, status, "{v}");
    }
    let (s, t) = app
        .post(&transfer, json!({"destinationProjectId": project}))
        .await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert_eq!(t["model"]["status"], "trained", "{t}");
    let moved = t["model"]["id"].as_str().expect("id").to_string();
    assert_ne!(moved, id);

    // Deleting the model erases its weights and dataset.
    let acc = app.dev_account_id().await;
    let objects = app.store.training_objects(&id).await.expect("objects");
    assert_eq!(objects.len(), 3, "a dataset and two weights files: {objects:?}");
    let (s, v) = app.delete_as(&app.key, &format!("/v1/models/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for k in &objects {
        assert!(
            app.services.objects.size(k).await.expect("size").is_none(),
            "{k} survived its model ({acc})"
        );
    }
    // The copies still have theirs.
    for m in [&copy, &moved] {
        let (s, d) = app.post(&format!("/v1/models/{m}/download"), json!({})).await;
        assert_eq!(s, StatusCode::OK, "{d}");
        let files = d["job"]["metadata"]["output"]["files"].as_array().expect("files").clone();
        assert_eq!(files.len(), 2, "{d}");
        let w: Value = serde_json::from_slice(&app.fetch(&files[1]["url"]).await).expect("json");
        assert_learned_the_dataset(&w, w["trigger_word"].as_str().unwrap_or(""), 5);
    }
    app.audit_clean().await;
}

/// A configuration file for worker processes: the trainer of `c`.
fn worker_config(c: &Config, dir: &std::path::Path) -> std::path::PathBuf {
    let mut doc = toml::Table::new();
    doc.insert(
        "training".into(),
        toml::Value::try_from(&c.training).expect("training as TOML"),
    );
    let path = dir.join("worker.toml");
    std::fs::write(&path, toml::to_string(&doc).expect("toml")).expect("write");
    path
}

async fn charges(app: &TestApp, job_id: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM credit_ledger WHERE job_id = $1 AND kind = 'charge'")
        .bind(job_id)
        .fetch_one(app.store.pool())
        .await
        .expect("count")
}

/// Starts a custom-model training; `(model, training, job)`.
async fn started(app: &TestApp) -> (String, String, String) {
    let id = custom_model(app, 5).await;
    let (s, v) = app
        .post(&format!("/v1/custom-models/{id}/trainings"), json!({}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let tid = v["trainingId"].as_str().expect("id").to_string();
    let acc = app.dev_account_id().await;
    let job = app
        .store
        .training(&acc, &tid)
        .await
        .expect("read")
        .expect("training")
        .job_id;
    (id, tid, job)
}

/// Drills on PostgreSQL + RabbitMQ with worker processes: a worker
/// SIGKILLed mid-training is replaced by one that re-attaches to the same
/// attempt (trained once, charged once); a training whose worker died and
/// was not replaced still completes, its end recorded from the trainer's
/// webhook alone, and the worker that comes later settles nothing twice.
#[tokio::test]
async fn a_killed_worker_neither_loses_nor_repeats_a_training() {
    let _broker = broker_lock().await;
    let trainer = CogFixture::trainer("trainer").await;
    trainer.ready(Duration::from_secs(60)).await;
    let app = TestApp::with(Dialect::Postgres, Roles::API_AND_SCHEDULER, |c| {
        with_rabbitmq(c);
        with_trainer(c, &trainer.url, 0.04);
        c.training.parallel_per_account = 2;
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let cfg = worker_config(&app.cfg, dir.path());
    let worker = || {
        let mut cmd = spawn_role_command(&app, "worker", 0);
        cmd.env("ATELIER_CONFIG", &cfg);
        cmd.spawn().expect("worker starts")
    };
    let (before, _) = app.balance(&app.key).await;

    // 1. Killed mid-training, replaced while the training runs.
    let (model, tid, job) = started(&app).await;
    let path = format!("/v1/custom-models/{model}/trainings/{tid}");
    let mut doomed = worker();
    let (running, _) = poll_training(&app, &path, Duration::from_secs(60), |v| {
        v["trainingProgress"]["position"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let word = running["triggerWord"].as_str().expect("word").to_string();
    let acc = app.dev_account_id().await;
    let started_at = |tid: String| {
        let (app, acc) = (&app, acc.clone());
        async move {
            app.store
                .training(&acc, &tid)
                .await
                .expect("read")
                .expect("training")
                .started_at
        }
    };
    let first_start = started_at(tid.clone()).await;
    assert!(first_start.is_some());
    doomed.kill().await.expect("SIGKILL");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, v) = app.get(&path).await;
    assert_eq!(v["status"], "processing", "the training outlived its worker: {v}");
    assert_eq!(
        app.services.queue.depth("training").await.expect("depth"),
        1,
        "the broker took the dead worker's task back"
    );
    let mut second = worker();
    // The new worker takes the task while the training still runs: it
    // re-attaches to the claimed container (it starts nothing: below).
    let until = Instant::now() + Duration::from_secs(30);
    while app.services.queue.depth("training").await.expect("depth") > 0 {
        assert!(Instant::now() < until, "no worker took the task back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, v) = app.get(&path).await;
    assert_eq!(v["status"], "processing", "re-attached while it ran: {v}");
    let (done, _) = poll_training(&app, &path, Duration::from_secs(90), |v| {
        v["status"] != "processing" && v["status"] != "queued"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let out = app.store.latest_outputs(&job).await.expect("outputs");
    assert_eq!(out[0].attempt, 1, "the same attempt, re-attached, not retried");
    assert_eq!(started_at(tid.clone()).await, first_start, "re-attaching keeps the attempt's start");
    assert_eq!(charges(&app, &job).await, 1, "charged once");
    let runs: Vec<String> = trainer
        .events()
        .into_iter()
        .filter(|e| e.ends_with(&word))
        .collect();
    assert_eq!(runs, [format!("start {word}"), format!("done {word}")], "trained once");
    second.kill().await.expect("SIGKILL");

    // 2. Killed mid-training and not replaced: the webhook records the end.
    let (model, tid, job) = started(&app).await;
    let path = format!("/v1/custom-models/{model}/trainings/{tid}");
    trainer.ready(Duration::from_secs(30)).await;
    let mut doomed = worker();
    let (running, _) = poll_training(&app, &path, Duration::from_secs(60), |v| {
        v["trainingProgress"]["position"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let word = running["triggerWord"].as_str().expect("word").to_string();
    doomed.kill().await.expect("SIGKILL");
    let (done, _) = poll_training(&app, &path, Duration::from_secs(90), |v| {
        v["status"] != "processing" && v["status"] != "queued"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "recorded with no worker alive: {done}");
    assert_eq!(charges(&app, &job).await, 1);
    // A worker that comes later gets the task again: it finds the end
    // recorded and starts nothing.
    let mut late = worker();
    let until = Instant::now() + Duration::from_secs(30);
    while app.services.queue.depth("training").await.unwrap_or(1) > 0 {
        assert!(Instant::now() < until, "the redelivered task was never settled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs: Vec<String> = trainer
        .events()
        .into_iter()
        .filter(|e| e.ends_with(&word))
        .collect();
    assert_eq!(runs, [format!("start {word}"), format!("done {word}")]);
    assert_eq!(charges(&app, &job).await, 1, "still charged once");
    late.kill().await.expect("SIGKILL");
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!((before - after, reserved), (12.0, 0.0), "two trainings of 6 credits");
    app.audit_clean().await;
}

/// A trainer container killed mid-training fails its attempt; the retry
/// starts the training again once the container is back, and the training
/// is charged once.
#[tokio::test]
async fn a_killed_trainer_container_fails_the_attempt_and_the_retry_runs() {
    let mut trainer = CogFixture::trainer("trainer").await;
    trainer.ready(Duration::from_secs(60)).await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_trainer(c, &trainer.url, 0.04);
    })
    .await;
    let (model, tid, job) = started(&app).await;
    let path = format!("/v1/custom-models/{model}/trainings/{tid}");
    let (running, _) = poll_training(&app, &path, Duration::from_secs(60), |v| {
        v["trainingProgress"]["position"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let word = running["triggerWord"].as_str().expect("word").to_string();
    trainer.kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    trainer.respawn();
    let (done, _) = poll_training(&app, &path, Duration::from_secs(120), |v| {
        v["status"] != "processing" && v["status"] != "queued"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let out = app.store.latest_outputs(&job).await.expect("outputs");
    assert!(out[0].attempt >= 2, "a new attempt trained it: {}", out[0].attempt);
    let runs: Vec<String> = trainer
        .events()
        .into_iter()
        .filter(|e| e.ends_with(&word))
        .collect();
    // The killed run never finished; the retry ran once, after it.
    assert_eq!(
        runs,
        [format!("start {word}"), format!("start {word}"), format!("done {word}")],
    );
    assert_eq!(charges(&app, &job).await, 1);
    app.audit_clean().await;
}

/// The caps a training start enforces, before any trainer is involved: the
/// account's `parallel-training` cap and the relaunch cooldown (`429` with
/// `remainingSeconds`), the balance (`402`), and a dry run that prices
/// without reserving.
#[tokio::test]
async fn training_starts_respect_the_caps_and_the_balance() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API_AND_SCHEDULER, |c| {
        c.training.relaunch_cooldown_secs = 60;
    })
    .await;
    let m1 = custom_model(&app, 5).await;
    let m2 = custom_model(&app, 5).await;
    let start = |m: &str| format!("/v1/custom-models/{m}/trainings");
    let (s, v) = app.post(&start(&m1), json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let t1 = v["trainingId"].as_str().expect("id").to_string();
    let (s, v) = app.post(&start(&m2), json!({})).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "parallel-training is 1: {v}");
    assert!(v["remainingSeconds"].as_i64().unwrap_or(0) >= 1, "{v}");
    assert!(v.to_string().contains("parallel-training"), "{v}");
    let (s, v) = app
        .post(&format!("/v1/custom-models/{m1}/trainings/{t1}/cancel"), json!({}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "a queued training is cancelled too: {v}");
    let (s, v) = app.post(&start(&m1), json!({})).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "relaunch cooldown: {v}");
    let left = v["remainingSeconds"].as_i64().unwrap_or(0);
    assert!((50..=60).contains(&left), "{v}");
    // Another model is not cooling down, and the cap is free again.
    let (s, v) = app.post(&start(&m2), json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");

    // A poor account: the dry run prices, the start is refused.
    let poor = app.account("poor", 1.0).await;
    let (s, v) = app
        .post_as(&poor, "/v1/models", json!({"name": "n", "type": "sd-1_5"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["model"]["id"].as_str().expect("id").to_string();
    for c in COLOURS {
        let (s, v) = app
            .post_as(
                &poor,
                &format!("/v1/models/{id}/training-images"),
                json!({"data": data_url(c)}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let train = format!("/v1/models/{id}/train");
    let (s, v) = app.put_as(&poor, &format!("{train}?dryRun=true"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // SD 1.5: round(5 × 225 / 3) = 375 steps → 4 credits.
    assert_eq!(v["creativeUnitsCost"], 4.0, "{v}");
    let (s, v) = app.put_as(&poor, &train, json!({})).await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED, "{v}");
    let (_, m) = app.get_as(&poor, &format!("/v1/models/{id}")).await;
    assert_eq!(m["model"]["status"], "new", "a refused start changes nothing: {m}");
    assert_eq!(app.balance(&poor).await, (1.0, 0.0));
    for (body, what) in [
        (json!({"parameters": {"nbEpochs": 2}}), "nbEpochs"),
        (json!({"parameters": "fast"}), "parameters"),
    ] {
        let (s, v) = app.put_as(&poor, &format!("{train}?dryRun=true"), body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v.to_string().contains(what), "{what}: {v}");
    }
    let (s, v) = app
        .post_as(&poor, &format!("/v1/models/{id}/train/action"), json!({"action": "pause"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = app.get_as(&poor, "/v1/jobs/job_nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    // The trainers' webhook takes only URLs this server signed; a forged
    // one is refused before its body is read.
    let r = app
        .http
        .post(app.url("/internal/training-events/forged.token"))
        .body(vec![b'x'; 8 << 20])
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // A public model is listed for everyone, as a record only.
    let (s, v) = app
        .put_as(&poor, &format!("/v1/models/{id}"), json!({"privacy": "public"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = app.get("/v1/models/public?pageSize=10").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let listed: Vec<&Value> = v["models"].as_array().expect("models").iter().collect();
    assert_eq!(listed.len(), 1, "only the public one: {v}");
    assert_eq!(listed[0]["id"], json!(id));
    assert_eq!(listed[0]["trainingImages"], json!([]), "no training images of others");
    let (s, v) = app.get("/v1/models/public?privacy=nope").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // §8's cancel: the queued training ends canceled, its cost released.
    let rich = app.account("rich", 100.0).await;
    let (_, v) = app
        .post_as(&rich, "/v1/models", json!({"name": "n", "type": "flux.1-lora"}))
        .await;
    let id = v["model"]["id"].as_str().expect("id").to_string();
    for c in COLOURS {
        let (s, v) = app
            .post_as(&rich, &format!("/v1/models/{id}/training-images"), json!({"data": data_url(c)}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, v) = app.put_as(&rich, &format!("/v1/models/{id}/train"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let job = v["job"]["jobId"].as_str().expect("job").to_string();
    assert_eq!(app.balance(&rich).await, (100.0, 10.0), "10 credits reserved");
    let (s, v) = app
        .post_as(&rich, &format!("/v1/models/{id}/train/action"), json!({"action": "cancel"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["model"]["status"], "training-canceled", "{v}");
    let (_, j) = app.get_as(&rich, &format!("/v1/jobs/{job}")).await;
    assert_eq!(j["job"]["status"], "canceled", "{j}");
    let (_, j2) = app.get(&format!("/v1/jobs/{job}")).await;
    assert!(j2["job"].is_null(), "another account's job is not found: {j2}");
    assert_eq!(app.balance(&rich).await, (100.0, 0.0), "released");
    let (s, v) = app
        .post_as(&rich, &format!("/v1/models/{id}/train/action"), json!({"action": "cancel"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    app.audit_clean().await;
}
