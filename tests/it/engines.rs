//! Engine routes over HTTP: a local service speaking the Atelier engine
//! protocol stands in for a generative backend (none is reachable from
//! here); the adapter, routing, refusal fallback and settlement are real.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::config::{CogInput, EngineRoute};
use atelier_shared::db::Dialect;
use atelier_shared::domain::JobType;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxStatus};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Value>>>);

/// Answers with the primary input, colours inverted, as a PNG, after
/// checking the request has what the protocol promises.
async fn generate(
    State(seen): State<Seen>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let problems: Vec<&str> = [
        (body["protocol"] != "atelier-engine/1", "protocol"),
        (!body["prompt"].is_string(), "prompt"),
        (!body["seed"].is_u64(), "seed"),
        (!body["instruction"]["style"].is_string(), "instruction"),
        (
            headers.get("authorization").is_some(),
            "no key was configured",
        ),
    ]
    .into_iter()
    .filter_map(|(bad, what)| bad.then_some(what))
    .collect();
    if !problems.is_empty() {
        return (
            AxStatus::BAD_REQUEST,
            Json(json!({"error": problems.join(", ")})),
        )
            .into_response();
    }
    let primary = body["primary_image"].clone();
    let Some(img) = body["images"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["file_id"] == primary))
        .and_then(|i| i["data"].as_str())
        .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
        .and_then(|b| image::load_from_memory(&b).ok())
    else {
        return (
            AxStatus::BAD_REQUEST,
            Json(json!({"error": "no primary image"})),
        )
            .into_response();
    };
    seen.0.lock().expect("lock").push(body);
    let mut rgb = img.to_rgb8();
    image::imageops::invert(&mut rgb);
    let mut png = Vec::new();
    rgb.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("png");
    (
        [
            ("content-type", "image/png"),
            ("x-model-used", "inverter-1"),
        ],
        png,
    )
        .into_response()
}

async fn refuse() -> Response {
    (
        AxStatus::UNPROCESSABLE_ENTITY,
        Json(json!({"error": "content policy: garments only"})),
    )
        .into_response()
}

async fn backend() -> (String, Seen) {
    let seen = Seen::default();
    let app = axum::Router::new()
        .route("/generate", axum::routing::post(generate))
        .route("/refuse", axum::routing::post(refuse))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn http_routes_serve_named_engines_and_refusals_fall_back_under_auto() {
    let (url, seen) = backend().await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        let route = |path: &str| EngineRoute::Http {
            url: format!("{url}{path}"),
            api_key_env: None,
            timeout_secs: 10,
        };
        c.engines
            .routes
            .insert("seedream".into(), route("/generate"));
        c.engines
            .routes
            .insert("nano_banana_pro".into(), route("/refuse"));
        c.engines.auto.insert(
            JobType::CreatePackshot,
            vec!["nano_banana_pro".into(), "atelier".into()],
        );
    })
    .await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(96, 128), "a.jpg").await;
    let (before, _) = app.balance(&app.key).await;
    let body = |model: &str| {
        json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout", "prompt": "navy tee"}],
               "options": {"model": model}})
    };
    let run = |model: &'static str| {
        let body = body(model);
        let app = &app;
        async move {
            let (s, v) = app.post("/create-packshot", body).await;
            assert_eq!(s, StatusCode::ACCEPTED, "{v}");
            let job = v["job_id"].as_str().expect("job").to_string();
            let st = app.wait_for_job(&job, Duration::from_secs(60)).await;
            let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
            (st, r)
        }
    };

    // A named route runs its backend; model_used says what really ran.
    let (st, r) = run("seedream").await;
    assert_eq!(st["status"], "completed", "{st}");
    let res = &r["results"][0];
    assert_eq!(res["model_used"], "seedream (inverter-1)", "{res}");
    assert_eq!(res["input_description"]["route"], "http");
    let bytes = app.fetch(&res["output"]["full_size"]).await;
    let out = image::load_from_memory(&bytes).expect("image").to_rgb8();
    // garment_jpeg draws a blue garment (30, 60, 160): inverted, it is ochre.
    let mid = out.get_pixel(out.width() / 2, out.height() / 2).0;
    assert!(
        mid[0] > 200 && mid[2] < 120,
        "the backend's image was used: {mid:?}"
    );
    {
        let seen = seen.0.lock().expect("lock");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0]["engine"], "seedream");
        assert_eq!(seen[0]["width"], 1024);
        assert!(
            seen[0]["prompt"]
                .as_str()
                .is_some_and(|p| p.contains("navy tee")),
            "{}",
            seen[0]
        );
    }

    // auto: the first engine refuses (422), the built-in one takes over.
    let (st, r) = run("auto").await;
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(r["results"][0]["model_used"], "atelier-basic");

    // A named engine's refusal is final: failed with the reason, not charged.
    let (st, _) = run("nano_banana_pro").await;
    assert_eq!(st["status"], "failed", "{st}");
    assert!(
        st["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("refused the content") && m.contains("garments only")),
        "{st}"
    );
    assert_eq!(app.balance(&app.key).await, (before - 6.0, 0.0));
    app.audit_clean().await;
    app.stop().await;
}

/// The packshot mapping of the fixture: its inputs from the job's fields.
fn cog_route(url: &str, extra: &[(&str, &str)]) -> EngineRoute {
    let mut mapping: std::collections::BTreeMap<String, CogInput> = [
        ("image", "$image"),
        ("prompt", "$client_prompt"),
        ("seed", "$seed"),
        ("width", "$width"),
        ("height", "$height"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| {
        (
            k.to_string(),
            serde_json::from_value(json!(v)).expect("a mapping value"),
        )
    })
    .collect();
    mapping
        .entry("delay".into())
        .or_insert(CogInput::Constant(json!(0.05)));
    EngineRoute::Cog {
        url: url.to_string(),
        timeout_secs: 60,
        slots: 1,
        startup_secs: 60,
        inputs: [(JobType::CreatePackshot, mapping)].into(),
    }
}

/// A model container speaking Cog's HTTP API (the real Cog runtime serving
/// a fixture predictor): the job's fields reach the container's inputs as
/// mapped (seed and prompt are read back from the pixels it drew), the
/// output is stored and charged once; garbage bytes and a content refusal
/// fail the output with the reason and charge nothing.
#[tokio::test]
async fn cog_containers_serve_named_engines() {
    let fixture = CogFixture::start("packshot").await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        c.engines
            .routes
            .insert("seedream".into(), cog_route(&fixture.url, &[]));
    })
    .await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(120, 160), "g.jpg").await;
    let (before, _) = app.balance(&app.key).await;
    let create = |prompt: &str, seed: u32| {
        json!({"project_id": p, "images": [f], "options": {"model": "seedream"},
               "instructions": [{"style": "marketing_ready", "prompt": prompt, "seed": seed,
                                 "options": {"width": 512, "height": 512}}]})
    };
    // Custom dimensions need the account policy.
    let dev = app.dev_account_id().await;
    app.store
        .set_account_policy(&dev, None, None, Some(true))
        .await
        .expect("policy");
    let (s, v) = app
        .post("/create-packshot", create("linen dress", 77))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let st = app.wait_for_job(&job, Duration::from_secs(60)).await;
    assert_eq!(st["status"], "completed", "{st}");
    let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
    let out = &r["results"][0];
    assert_eq!(out["model_used"], "seedream (cog)", "{out}");
    assert_eq!(out["input_description"]["route"], "cog");
    assert!(
        out["input_description"]["predict_time"].as_f64().is_some(),
        "{out}"
    );
    let bytes = app.fetch(&out["output"]["full_size"]).await;
    let img = image::load_from_memory(&bytes).expect("an image").to_rgb8();
    assert_eq!((img.width(), img.height()), (512, 512));
    // The canvas colour says what the container was given: red = seed
    // (77 for variation 0) mod 251, green = the client prompt's length.
    let corner = img.get_pixel(4, 4).0;
    let near = |a: u8, b: u8| a.abs_diff(b) <= 6;
    assert!(
        near(corner[0], 77) && near(corner[1], "linen dress".len() as u8),
        "{corner:?}"
    );
    // The garment sits in the middle (dark blue in the fixture's photo).
    let mid = img.get_pixel(256, 256).0;
    assert!(mid[2] > 100 && mid[0] < 90, "{mid:?}");
    let (after, _) = app.balance(&app.key).await;
    assert_eq!(before - after, 3.0, "one 1K output, charged once");

    for (prompt, reason) in [
        ("garbage please", "unusable image"),
        ("refuse-me", "refused the content"),
    ] {
        let (s, v) = app.post("/create-packshot", create(prompt, 1)).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let job = v["job_id"].as_str().expect("job").to_string();
        let st = app.wait_for_job(&job, Duration::from_secs(60)).await;
        assert_eq!(st["status"], "failed", "{st}");
        let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
        let msg = r["results"][0]["error_message"]
            .as_str()
            .unwrap_or_default();
        assert!(msg.contains(reason), "{prompt}: {msg}");
    }
    let (last, _) = app.balance(&app.key).await;
    assert_eq!(last, after, "failed outputs cost nothing");
    app.audit_clean().await;
    app.stop().await;
}

/// A mapping that names an input the container lacks is refused when the
/// worker starts, with a message naming both; so is a mapping of an
/// unknown job field, when the configuration loads.
#[tokio::test]
async fn cog_mappings_are_checked_against_the_container_and_the_kind() {
    let fixture = CogFixture::start("packshot").await;
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = test_config(dir.path(), database_url(Dialect::Sqlite, dir.path()).await);
    cfg.engines.routes.insert(
        "seedream".into(),
        cog_route(&fixture.url, &[("steps", "$seed")]),
    );
    let err = match atelier::app::start(cfg.clone(), Roles::ALL, Default::default()).await {
        Ok(_) => panic!("a worker with a bad mapping started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("`steps`") && err.contains(&fixture.url) && err.contains("seed"),
        "{err}"
    );
    cfg.engines.routes.insert(
        "seedream".into(),
        cog_route(&fixture.url, &[("seed", "$sed")]),
    );
    let err = cfg.validate().expect_err("unknown field").to_string();
    assert!(
        err.contains("engines.routes.seedream.inputs.create_packshot.seed"),
        "{err}"
    );
    assert!(err.contains("$sed") && err.contains("$seed"), "{err}");
}

/// Under `auto`, a `marketing_ready` instruction goes to the operator's
/// generator routes before the built-in engine (whose lit scene is
/// procedural); the other styles keep the configured order.
#[tokio::test]
async fn marketing_ready_scenes_go_to_generators_first() {
    let fixture = CogFixture::start("packshot").await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        c.limits.create_per_minute = 1000;
        c.engines
            .routes
            .insert("seedream".into(), cog_route(&fixture.url, &[]));
        c.engines.auto.insert(
            JobType::CreatePackshot,
            vec!["atelier".into(), "seedream".into()],
        );
    })
    .await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(120, 160), "g.jpg").await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": [
                {"style": "white_cutout"},
                {"style": "marketing_ready", "prompt": "a sunlit terrace"}
            ]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let st = app.wait_for_job(&job, Duration::from_secs(120)).await;
    assert_eq!(st["status"], "completed", "{st}");
    let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
    let used: Vec<String> = r["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|o| o["model_used"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(used[0].starts_with("atelier"), "{used:?}");
    assert_eq!(used[1], "seedream (cog)", "{used:?}");
    app.stop().await;
}

/// Aborting a packshot job whose output a Cog route is drawing cancels the
/// container's prediction (the packshot pipeline runs on the blocking
/// pool; the task's stop signal reaches it there).
#[tokio::test]
async fn abort_cancels_a_packshot_prediction() {
    let fixture = CogFixture::start("packshot").await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        c.worker.abort_check_ms = 100;
        let mut route = cog_route(&fixture.url, &[]);
        if let EngineRoute::Cog { inputs, .. } = &mut route {
            for m in inputs.values_mut() {
                m.insert("delay".into(), CogInput::Constant(json!(30.0)));
            }
        }
        c.engines.routes.insert("seedream".into(), route);
    })
    .await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(120, 160), "g.jpg").await;
    let (before, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "options": {"model": "seedream"},
                   "instructions": [{"style": "white_cutout", "seed": 17}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let t = std::time::Instant::now();
    while app.store.latest_outputs(&job).await.expect("outputs")[0].status
        != atelier_shared::domain::OutputStatus::Running
    {
        assert!(t.elapsed() < Duration::from_secs(30), "never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s, v) = app.post(&format!("/jobs/{job}/abort"), json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let t = std::time::Instant::now();
    while fixture.cancelled().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the container never saw the cancel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fixture.cancelled(), ["cancelled seed=17"]);
    assert_eq!(
        app.balance(&app.key).await,
        (before, 0.0),
        "nothing charged"
    );
    app.audit_clean().await;
    app.stop().await;
}
