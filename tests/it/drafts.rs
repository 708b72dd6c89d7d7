//! Identity drafts (`POST /identity/create`) on a generator route served by
//! the real Cog runtime with the portrait fixture (which returns a real
//! face photo chosen by the seed, with what it was given stamped in a
//! corner), and their promotion into identities that then serve a swap.

use crate::generate::{face_photo, near};
use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::config::{CogInput, Config, EngineRoute};
use atelier_shared::db::Dialect;
use atelier_shared::domain::JobType;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// A Cog route to the portrait fixture for identity drafts; `extra` adds
/// or overrides inputs.
pub fn portrait_route(url: &str, extra: &[(&str, Value)]) -> EngineRoute {
    let mapping: std::collections::BTreeMap<String, CogInput> = [
        ("prompt", json!("$prompt")),
        ("seed", json!("$seed")),
        ("width", json!("$width")),
        ("height", json!("$height")),
        ("aspect_ratio", json!("$aspect_ratio")),
        ("references", json!("$references")),
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
    EngineRoute::Cog {
        url: url.to_string(),
        timeout_secs: 60,
        slots: 2,
        startup_secs: 60,
        inputs: [(JobType::IdentityCreation, mapping)].into(),
    }
}

async fn wait_identity(app: &TestApp, code: &str) -> Value {
    let t = Instant::now();
    loop {
        let (s, st) = app.get(&format!("/identity/{code}/status")).await;
        assert_eq!(s, StatusCode::OK, "{st}");
        if matches!(
            st["preprocessing_status"].as_str(),
            Some("completed" | "failed")
        ) {
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "identity stuck: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn drafts_promoted_into_a_working_identity(
    dialect: Dialect,
    tweak: impl FnOnce(&mut Config),
) {
    let fixture = CogFixture::start("portrait").await;
    let app = TestApp::with(dialect, Roles::ALL, |c| {
        with_models(c);
        c.limits.create_per_minute = 1000;
        c.engines
            .routes
            .insert("seedream".into(), portrait_route(&fixture.url, &[]));
        tweak(c);
    })
    .await;
    let reference = app.upload(face_photo("newton.png"), "ref.png").await;
    let (before, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/identity/create",
            json!({
                "instructions": [
                    {
                        "appearance": {"gender": "female", "age": 28, "expression": "relaxed"},
                        "hair": {"color": "ash blonde"},
                        "camera": {"angle": "ignored"},
                        "num_variations": 2,
                        "options": {"ar": "4:5", "seed": 0}
                    },
                    {
                        "prompt": "A calm man with a grey beard",
                        "input_assets": [{"file_id": reference}],
                        "options": {"seed": 7, "format": "png"}
                    }
                ],
                "options": {"model": "auto"},
                "name": "Spring model"
            }),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(
        (
            v["num_instructions"].as_u64(),
            v["total_variations"].as_u64()
        ),
        (Some(2), Some(3)),
        "{v}"
    );
    let job = v["job_id"].as_str().expect("job").to_string();
    let st = app.wait_for_job(&job, Duration::from_secs(90)).await;
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["job_type"], "identity_creation", "{st}");
    let prompts: Vec<String> = st["processing_options"]["instructions"]
        .as_array()
        .expect("instructions")
        .iter()
        .map(|i| i["prompt"].as_str().expect("prompt").to_string())
        .collect();
    assert!(
        prompts[0].contains("28 years old") && prompts[0].contains("ash blonde"),
        "{prompts:?}"
    );
    assert_eq!(prompts[1], "A calm man with a grey beard");
    let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 3, "{r}");
    let mut first = None;
    for out in results {
        assert_eq!(out["status"], "completed", "{out}");
        assert_eq!(out["model_used"], "seedream (cog)", "{out}");
        let (ins, var) = (
            out["image_index"].as_u64().expect("index"),
            out["group_index"].as_u64().expect("variation"),
        );
        let img = image::load_from_memory(&app.fetch(&out["output"]["full_size"]).await)
            .expect("an image")
            .to_rgb8();
        let (seed, size, refs) = match ins {
            0 => (var, (816, 1024), 0),
            _ => (7, (1024, 1024), 1),
        };
        assert_eq!(img.dimensions(), size, "{out}");
        // The corner: the variation's seed, the prompt's length, the
        // reference images that reached the container.
        let c = img.get_pixel(4, 4).0;
        let len = prompts[ins as usize].chars().count() % 251;
        assert!(
            near(c[0], seed as u8) && near(c[1], len as u8) && near(c[2], 100 + 10 * refs),
            "instruction {ins} variation {var}: corner {c:?}"
        );
        if (ins, var) == (0, 0) {
            first = Some(out["image_result_id"].as_i64().expect("id"));
        }
    }
    let (after, _) = app.balance(&app.key).await;
    assert_eq!(before - after, 9.0, "three 1K drafts");

    // The first draft (the fixture drew gauss.png for seed 0) becomes an
    // identity named after the job, for 50 credits.
    let draft = first.expect("draft 0/0");
    let (s, p) = app
        .post(
            "/identity/promote-generated",
            json!({"image_result_id": draft}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    assert_eq!(p["status"], "pending", "{p}");
    let code = p["identity_code"].as_str().expect("code").to_string();
    assert!(p["preprocessing_job_id"].is_string(), "{p}");
    let st = wait_identity(&app, &code).await;
    assert_eq!(st["preprocessing_status"], "completed", "{st}");
    let (_, ident) = app.get(&format!("/identity/{code}")).await;
    assert_eq!(ident["name"], "Spring model", "{ident}");
    // It describes itself with the brief's gender and age, which the list
    // filters find.
    assert_eq!(
        (
            ident["image_description"]["gender"].clone(),
            ident["image_description"]["age"].clone()
        ),
        (json!("female"), json!(28)),
        "{ident}"
    );
    for (q, found) in [
        ("gender=female&age_min=25&age_max=30", true),
        ("gender=male", false),
        ("age_min=29", false),
    ] {
        let (s, v) = app.get(&format!("/identity?{q}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let listed = v["identities"]
            .as_array()
            .expect("identities")
            .iter()
            .any(|i| i["identity_code"] == code.as_str());
        assert_eq!(listed, found, "{q}: {v}");
    }
    let (after_promotion, reserved) = app.balance(&app.key).await;
    assert_eq!((after - after_promotion, reserved), (50.0, 0.0));

    // Promoting it again names the identity made the first time; an
    // explicit name that is taken names only the existing identity.
    let (s, again) = app
        .post(
            "/identity/promote-generated",
            json!({"image_result_id": draft}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{again}");
    assert_eq!(again["identity_code"], code.as_str(), "{again}");
    let other = results
        .iter()
        .find(|o| o["image_result_id"].as_i64() != Some(draft))
        .expect("another draft")["image_result_id"]
        .clone();
    let (s, taken) = app
        .post(
            "/identity/promote-generated",
            json!({"image_result_id": other, "name": "Spring model"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{taken}");
    assert_eq!(taken["existing_identity_code"], code.as_str(), "{taken}");
    assert!(taken.get("identity_code").is_none(), "{taken}");
    let (no_charge, _) = app.balance(&app.key).await;
    assert_eq!(
        no_charge, after_promotion,
        "refused promotions cost nothing"
    );

    // The promoted identity serves a model swap.
    let proj = app.project("swaps").await;
    let photo = app.upload(face_photo("newton.png"), "model.png").await;
    let (s, v) = app
        .post(
            "/model-swap",
            json!({"project_id": proj, "images": [photo], "identity_code": code}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let st = app
        .wait_for_job(v["job_id"].as_str().expect("job"), Duration::from_secs(120))
        .await;
    assert_eq!(st["status"], "completed", "{st}");

    // The expert instruction's draft, regenerated: a new version with a
    // new seed, charged as the original; the first version is kept.
    let before_regen = app.balance(&app.key).await.0;
    let (s, v) = app
        .post(&format!("/jobs/{job}/regenerate/1"), json!({}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let st = app.wait_for_job(&job, Duration::from_secs(90)).await;
    assert_eq!(st["status"], "completed", "{st}");
    let (_, all) = app
        .get(&format!("/jobs/{job}/results?all_versions=true"))
        .await;
    let versions: Vec<(u64, u64, String)> = all["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter(|o| o["image_index"] == 1)
        .map(|o| {
            (
                o["version"].as_u64().expect("version"),
                o["group_index"].as_u64().expect("group"),
                o["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [(0, 0, "completed".into()), (1, 0, "completed".into())],
        "{all}"
    );
    let latest = all["results"]
        .as_array()
        .expect("results")
        .iter()
        .find(|o| o["image_index"] == 1 && o["version"] == 1)
        .expect("version 1")
        .clone();
    let img = image::load_from_memory(&app.fetch(&latest["output"]["full_size"]).await)
        .expect("an image")
        .to_rgb8();
    let c = img.get_pixel(4, 4).0;
    assert!(
        near(c[0], ((7u64 + 1_000_003) % 251) as u8),
        "new seed: {c:?}"
    );
    assert_eq!(app.balance(&app.key).await.0, before_regen - 3.0);
    app.audit_clean().await;
    app.stop().await;
}

/// Drafts on the embedded stack: structured and expert instructions reach
/// the container (seed, prompt, references), are charged per draft, and a
/// draft promoted into an identity serves a model swap.
#[tokio::test]
async fn drafts_promoted_into_a_working_identity_embedded() {
    drafts_promoted_into_a_working_identity(Dialect::Sqlite, |_| {}).await;
}

#[tokio::test]
async fn drafts_promoted_into_a_working_identity_on_postgres_rabbitmq_and_s3() {
    let _broker = broker_lock().await;
    let bucket = s3_bucket().await;
    drafts_promoted_into_a_working_identity(Dialect::Postgres, |c| {
        with_rabbitmq(c);
        with_s3(c, &bucket);
    })
    .await;
}

/// Every documented refusal of identity creation and promotion, each
/// before anything is charged.
#[tokio::test]
async fn draft_refusals() {
    let fixture = CogFixture::start("portrait").await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_models(c);
        c.limits.create_per_minute = 1000;
        c.identity.blocked_terms = vec!["Ada Operator".into()];
        c.engines
            .routes
            .insert("orbita".into(), portrait_route(&fixture.url, &[]));
    })
    .await;
    let (before, _) = app.balance(&app.key).await;
    let refused = |v: &Value, field: &str| -> String {
        v["detail"]
            .as_array()
            .and_then(|d| d.iter().find(|e| e["field"] == field))
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("no detail for {field}: {v}"))
    };
    for (body, field, says) in [
        (
            json!({"instructions": [{"prompt": "Portrait of Taylor Swift, smiling"}]}),
            "instructions[0].prompt",
            "blocked term: 'Taylor Swift'",
        ),
        (
            json!({"instructions": [{"appearance": {"expression": "like ada operator"}}]}),
            "instructions[0].appearance.expression",
            "blocked term: 'Ada Operator'",
        ),
        (
            json!({"instructions": [{"camera": {"angle": "front"}}]}),
            "instructions[0]",
            "needs a non-empty prompt",
        ),
        (json!({"instructions": []}), "instructions", "1 to 10"),
        (
            json!({"instructions": [{"prompt": "a man", "options": {"size": "2K"}}], "options": {"model": "orbita"}}),
            "instructions[0].options.size",
            "1K only",
        ),
        (
            json!({"instructions": [{"prompt": "a man", "options": {"ar": "21:9"}}], "options": {"model": "orbita"}}),
            "instructions[0].options.ar",
            "does not draw 21:9",
        ),
        (
            json!({"instructions": [{"prompt": "a man", "input_assets": [{"file_id": "x"}]}], "options": {"model": "orbita"}}),
            "instructions[0].input_assets",
            "no reference images",
        ),
        (
            json!({"instructions": [{"prompt": "a man"}], "options": {"model": "seedream"}}),
            "options.model",
            "not configured for identity_creation",
        ),
        (
            json!({"instructions": [{"prompt": "a man", "num_variations": 9}]}),
            "instructions[0].num_variations",
            "between 1 and 8",
        ),
    ] {
        let (s, v) = app.post("/identity/create", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        let m = refused(&v, field);
        assert!(m.contains(says), "{body}: {m}");
    }
    let (s, v) = app
        .post("/identity/create", json!({"instructions": [{"prompt": "a man", "input_assets": [{"file_id": "file_nope"}]}]}))
        .await;
    assert!(
        matches!(s, StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND),
        "{v}"
    );
    let (s, v) = app
        .post("/identity/create", json!({"instructions": [{"prompt": "a man", "options": {"width": 1024, "height": 1024}}]}))
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "custom dimensions need the policy: {v}"
    );

    // A draft the container could not draw fails alone and costs nothing;
    // it cannot be promoted.
    let (s, v) = app
        .post(
            "/identity/create",
            json!({"instructions": [{"prompt": "garbage please"}], "options": {"model": "orbita"}}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let st = app.wait_for_job(&job, Duration::from_secs(60)).await;
    assert_eq!(st["status"], "failed", "{st}");
    let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
    let out = &r["results"][0];
    assert!(
        out["error_message"]
            .as_str()
            .unwrap_or_default()
            .contains("orbita"),
        "{out}"
    );
    let (s, v) = app
        .post(
            "/identity/promote-generated",
            json!({"image_result_id": out["image_result_id"]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        refused(&v, "image_result_id").contains("not completed"),
        "{v}"
    );
    let (s, v) = app
        .post(
            "/identity/promote-generated",
            json!({"image_result_id": 987654321}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = app
        .post("/identity/promote-generated", json!({"name": "x"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = app
        .post(
            "/identity/promote-generated",
            json!({"image_result_id": "12"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Another account cannot see the draft.
    let other = app.account("other", 500.0).await;
    let (s, v) = app
        .post_as(
            &other,
            "/identity/promote-generated",
            json!({"image_result_id": out["image_result_id"]}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!((before - after, reserved), (0.0, 0.0), "nothing charged");
    app.audit_clean().await;
    app.stop().await;
}

/// Without a generator for drafts the route says which engine is missing
/// and charges nothing; promoting an output of another kind is a 400.
#[tokio::test]
async fn drafts_need_a_generator_and_only_drafts_are_promoted() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_models(c);
        c.limits.create_per_minute = 1000;
    })
    .await;
    let (s, v) = app
        .post(
            "/identity/create",
            json!({"instructions": [{"prompt": "a man"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no engine draws identity_creation"),
        "{v}"
    );
    let p = app.project("shots").await;
    let f = app.upload(face_photo("gauss.png"), "p.png").await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    app.wait_for_job(&job, Duration::from_secs(120)).await;
    let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
    let (s, v) = app
        .post(
            "/identity/promote-generated",
            json!({"image_result_id": r["results"][0]["image_result_id"]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("create_packshot"),
        "{v}"
    );
    app.stop().await;
}

/// `POST /jobs/{id}/regenerate/{image_index}`: only finished jobs, a new
/// version drawn with a new seed and charged as the original, the earlier
/// version kept (`all_versions=true`), every documented refusal.
#[tokio::test]
async fn regenerate_adds_a_version_and_keeps_the_earlier_one() {
    let fixture = CogFixture::start("portrait").await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_models(c);
        c.limits.create_per_minute = 1000;
        c.engines.routes.insert(
            "seedream".into(),
            portrait_route(&fixture.url, &[("delay", json!(0.4))]),
        );
    })
    .await;
    let (before, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/identity/create",
            json!({"instructions": [{"prompt": "a woman", "options": {"seed": 5}}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let regen = |q: &str| format!("/jobs/{job}/regenerate/{q}");
    let (s, v) = app.post(&regen("0"), json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "still running: {v}");
    app.wait_for_job(&job, Duration::from_secs(60)).await;
    let (s, v) = app.post(&regen("0"), json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(
        (
            v["success"].as_bool(),
            v["image_index"].as_i64(),
            v["version"].as_i64()
        ),
        (Some(true), Some(0), Some(1)),
        "{v}"
    );
    let (s, v) = app.post(&regen("0"), json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "reopened: {v}");
    let st = app.wait_for_job(&job, Duration::from_secs(60)).await;
    assert_eq!(st["status"], "completed", "{st}");

    let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
    let latest = r["results"].as_array().expect("results");
    assert_eq!(latest.len(), 1, "{r}");
    assert_eq!(latest[0]["version"], 1, "{r}");
    let (_, all) = app
        .get(&format!("/jobs/{job}/results?all_versions=true"))
        .await;
    let all = all["results"].as_array().expect("results").clone();
    assert_eq!(all.len(), 2, "{all:?}");
    for (version, out) in all.iter().enumerate() {
        assert_eq!(out["version"], version, "{out}");
        assert_eq!(out["status"], "completed", "{out}");
        let img = image::load_from_memory(&app.fetch(&out["output"]["full_size"]).await)
            .expect("an image")
            .to_rgb8();
        let seed = (5u64 + 1_000_003 * version as u64) % 251;
        let c = img.get_pixel(4, 4).0;
        assert!(near(c[0], seed as u8), "version {version}: corner {c:?}");
    }
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!(
        (before - after, reserved),
        (6.0, 0.0),
        "original and regeneration"
    );

    // Refusals.
    let (s, v) = app.post(&regen("3"), json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = app.post(&regen("0?group_index=2"), json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = app.post("/jobs/job_nope/regenerate/0", json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let code = crate::generate::ready_identity(&app, "gauss.png", "Grace").await;
    let (_, st) = app.get(&format!("/identity/{code}/status")).await;
    let pre = st["preprocessing_job_id"]
        .as_str()
        .expect("job")
        .to_string();
    let (s, v) = app
        .post(&format!("/jobs/{pre}/regenerate/0"), json!({}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Without the credits for the new version: 402, nothing reserved.
    let poor = app.account("poor", 3.0).await;
    let (s, v) = app
        .post_as(
            &poor,
            "/identity/create",
            json!({"instructions": [{"prompt": "a man"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let pj = v["job_id"].as_str().expect("job").to_string();
    let t = Instant::now();
    loop {
        let (_, st) = app.get_as(&poor, &format!("/jobs/{pj}/status")).await;
        if st["status"] == "completed" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = app
        .post_as(&poor, &format!("/jobs/{pj}/regenerate/0"), json!({}))
        .await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED, "{v}");
    let (_, st) = app.get_as(&poor, &format!("/jobs/{pj}/status")).await;
    assert_eq!(
        st["status"], "completed",
        "a refused regeneration leaves the job alone: {st}"
    );
    app.audit_clean().await;
    app.stop().await;
}

/// Waits until the (only) output of `job` runs on a worker.
async fn running_output(app: &TestApp, job: &str) -> atelier_shared::db::rows::OutputRow {
    let t = Instant::now();
    loop {
        let o = app
            .store
            .latest_outputs(job)
            .await
            .expect("outputs")
            .remove(0);
        if o.status == atelier_shared::domain::OutputStatus::Running {
            return o;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never started: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Aborting a job stops the container's prediction: the fixture sees the
/// cancel, nothing is charged.
#[tokio::test]
async fn abort_cancels_the_running_prediction() {
    let fixture = CogFixture::start("portrait").await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        c.worker.abort_check_ms = 100;
        c.engines.routes.insert(
            "seedream".into(),
            portrait_route(&fixture.url, &[("delay", json!(30.0))]),
        );
    })
    .await;
    let (before, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/identity/create",
            json!({"instructions": [{"prompt": "a woman", "options": {"seed": 42}}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    running_output(&app, &job).await;
    // The prediction is in the container by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(fixture.cancelled().is_empty());
    let (s, v) = app.post(&format!("/jobs/{job}/abort"), json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let t = Instant::now();
    while fixture.cancelled().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the container never saw the cancel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fixture.cancelled(), ["cancelled seed=42"]);
    let (_, st) = app.get(&format!("/jobs/{job}/status")).await;
    assert_eq!(st["status"], "aborted", "{st}");
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!((before - after, reserved), (0.0, 0.0), "nothing charged");
    app.audit_clean().await;
    app.stop().await;
}

/// A worker SIGKILLed in the middle of a prediction: the attempt is
/// reclaimed and drawn again by another worker (waiting while the
/// container still runs the orphaned prediction), one output recorded,
/// one charge.
#[tokio::test]
async fn a_worker_killed_mid_prediction_records_one_output_and_one_charge() {
    let fixture = CogFixture::start("portrait").await;
    let route = portrait_route(&fixture.url, &[("delay", json!(2.0))]);
    let app = TestApp::with(Dialect::Sqlite, Roles::API_AND_SCHEDULER, |c| {
        c.engines.routes.insert("seedream".into(), route.clone());
    })
    .await;
    // The workers' configuration file: the same route.
    let dir = tempfile::tempdir().expect("dir");
    let cfg = dir.path().join("worker.toml");
    let mut doc = toml::Table::new();
    let mut routes = toml::Table::new();
    routes.insert(
        "seedream".into(),
        toml::Value::try_from(&route).expect("route as TOML"),
    );
    let mut engines = toml::Table::new();
    engines.insert("routes".into(), toml::Value::Table(routes));
    doc.insert("engines".into(), toml::Value::Table(engines));
    std::fs::write(&cfg, toml::to_string(&doc).expect("toml")).expect("write");
    let worker = || {
        let mut cmd = spawn_role_command(&app, "worker", 0);
        cmd.env("ATELIER_CONFIG", &cfg);
        cmd.spawn().expect("worker starts")
    };
    let (before, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/identity/create",
            json!({"instructions": [{"prompt": "a woman", "options": {"seed": 3}}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let mut doomed = worker();
    let first = running_output(&app, &job).await;
    assert_eq!(first.attempt, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    doomed.kill().await.expect("SIGKILL");

    let _healthy = worker();
    let st = app.wait_for_job(&job, Duration::from_secs(60)).await;
    assert_eq!(st["status"], "completed", "{st}");
    let outputs = app.store.latest_outputs(&job).await.expect("outputs");
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].attempt, 2, "the killed attempt was drawn again");
    let charges: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM credit_ledger WHERE job_id = $1 AND kind = 'charge'",
    )
    .bind(&job)
    .fetch_one(app.store.pool())
    .await
    .expect("count");
    assert_eq!(charges, 1, "charged exactly once");
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!((before - after, reserved), (3.0, 0.0));
    app.audit_clean().await;
    app.stop().await;
}
