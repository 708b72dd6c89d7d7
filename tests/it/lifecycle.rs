//! Jobs end to end through the embedded queue, scheduler and worker.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use atelier_shared::domain::trace::TraceParent;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::io::Read;
use std::time::Duration;

async fn end_to_end(dialect: Dialect, tweak: impl FnOnce(&mut atelier_shared::config::Config)) {
    let app = TestApp::with(dialect, Roles::ALL, tweak).await;
    let p = app.project("Spring").await;
    let front = app.upload(garment_jpeg(600, 800), "front.jpg").await;
    let back = app.upload(garment_jpeg(400, 400), "back.jpg").await;
    let (before, _) = app.balance(&app.key).await;

    let (s, v) = app
        .post("/create-packshot", packshot_body(&p, &[&front, &back]))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["total_outputs"], 4);
    assert_eq!(v["status"], "pending");
    let job = v["job_id"].as_str().expect("job_id").to_string();
    // Durable before 202: visible at once.
    assert_eq!(
        app.get(&format!("/jobs/{job}/status")).await.0,
        StatusCode::OK
    );
    // Reserved: 2 × 3 (1K) + 2 × 5 (2K) = 16.
    assert_eq!(app.balance(&app.key).await, (before, 16.0));

    let st = app.wait_for_job(&job, Duration::from_secs(60)).await;
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(
        (st["progress"].as_f64(), st["processed_images"].as_i64()),
        (Some(100.0), Some(4))
    );
    assert_eq!(
        app.balance(&app.key).await,
        (before - 16.0, 0.0),
        "balance drops by exactly the completed outputs"
    );

    // Operators see the queue, credits and outbox on /metrics (the
    // scheduler refreshes its gauges every 5 s).
    let t = std::time::Instant::now();
    loop {
        let m = app.metrics().await;
        if [
            "atelier_credits_charged_millicredits_total",
            "atelier_credits_reserved",
            "atelier_queue_depth{queue=\"packshot\"}",
            "atelier_outbox_lag_seconds",
            "atelier_task_duration_seconds_bucket",
            "atelier_tasks_total",
        ]
        .iter()
        .all(|name| m.contains(name))
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(12),
            "metrics missing: {m}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let (s, r) = app.get(&format!("/jobs/{job}/results")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["credits_used"], 16.0);
    assert_eq!(r["summary"]["successful"], 4);
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 4);
    for res in results {
        assert_eq!(res["status"], "completed");
        assert_eq!(
            res["model_used"], "atelier-basic",
            "results name the engine that really ran"
        );
        // Signed URLs work without credentials.
        let bytes = app.fetch(&res["output"]["full_size"]).await;
        let img = image::load_from_memory(&bytes).expect("a real image");
        let (w, h) = (img.width(), img.height());
        let ii = res["image_index"].as_u64().expect("index");
        assert_eq!((w, h), if ii == 0 { (1024, 1024) } else { (2048, 2048) });
        let thumb = app.fetch(&res["output"]["thumbnail"]).await;
        assert!(image::load_from_memory(&thumb).expect("thumb").width() <= 512);
        assert_eq!(res["instruction_index"], res["image_index"]);
        assert_eq!(res["variation_index"], res["group_index"]);
    }

    let (s, d) = app.post("/download", json!({"job_id": job})).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    let zip = app
        .http
        .get(d["download_url"].as_str().expect("url"))
        .send()
        .await
        .expect("get");
    assert_eq!(zip.headers()["content-type"], "application/zip");
    let bytes = zip.bytes().await.expect("zip bytes");
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).expect("valid zip");
    let mut names: Vec<String> = (0..archive.len())
        .map(|i| archive.by_index(i).expect("entry").name().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "0_0_v0.jpg",
            "0_1_v0.jpg",
            "1_0_v0.png",
            "1_1_v0.png",
            "manifest.json"
        ]
    );
    let mut manifest = String::new();
    archive
        .by_name("manifest.json")
        .expect("manifest")
        .read_to_string(&mut manifest)
        .expect("read");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&manifest).expect("json")["results"]
            .as_array()
            .map(Vec::len),
        Some(4)
    );

    // Another account cannot see or touch any of it.
    let other = app.account("mallory", 10.0).await;
    for path in [
        format!("/jobs/{job}/status"),
        format!("/jobs/{job}/results"),
    ] {
        assert_eq!(
            app.get_as(&other, &path).await.0,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    assert_eq!(
        app.post_as(&other, &format!("/jobs/{job}/abort"), json!({}))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.post_as(&other, "/download", json!({"job_id": job}))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.post(&format!("/jobs/{job}/abort"), json!({})).await.0,
        StatusCode::CONFLICT,
        "terminal jobs cannot be aborted"
    );

    app.audit_clean().await;
    app.stop().await;
}

#[tokio::test]
async fn packshot_end_to_end_on_sqlite() {
    end_to_end(Dialect::Sqlite, |_| {}).await;
}

#[tokio::test]
async fn packshot_end_to_end_on_postgres() {
    end_to_end(Dialect::Postgres, |_| {}).await;
}

/// The production stack: PostgreSQL, RabbitMQ (quorum queues, confirms) and
/// S3 (inputs, results and the presigned URLs clients download from).
#[tokio::test]
async fn packshot_end_to_end_on_postgres_rabbitmq_and_s3() {
    let _broker = broker_lock().await;
    let bucket = s3_bucket().await;
    end_to_end(Dialect::Postgres, |c| {
        with_rabbitmq(c);
        with_s3(c, &bucket);
    })
    .await;
}

#[tokio::test]
async fn abort_releases_pending_outputs() {
    // No worker: the job stays pending until aborted.
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |_| {}).await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(64, 64), "a.jpg").await;
    let (before, _) = app.balance(&app.key).await;
    let (_, v) = app.post("/create-packshot", packshot_body(&p, &[&f])).await;
    let job = v["job_id"].as_str().expect("job").to_string();
    assert_eq!(app.balance(&app.key).await.1, 16.0);
    let (s, v) = app.post(&format!("/jobs/{job}/abort"), json!({})).await;
    assert_eq!(
        (s, v),
        (
            StatusCode::ACCEPTED,
            json!({"job_id": job, "status": "aborted"})
        )
    );
    let st = app.wait_for_job(&job, Duration::from_secs(5)).await;
    assert_eq!(st["status"], "aborted");
    assert_eq!(app.balance(&app.key).await, (before, 0.0));
    assert_eq!(
        app.post("/download", json!({"job_id": job})).await.0,
        StatusCode::CONFLICT,
        "nothing to download"
    );
    app.audit_clean().await;
    app.stop().await;
}

#[tokio::test]
async fn corrupt_and_oversized_images_fail_the_output_with_a_reason() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        c.worker.max_input_pixels = 1_000_000
    })
    .await;
    let p = app.project("p").await;
    // A PNG whose header is intact but whose data is cut, and a small file
    // declaring 2000 × 2000 = 4 MP, above the worker's 1 MP limit.
    let mut corrupt = png(300, 300);
    corrupt.truncate(corrupt.len() / 2);
    let bomb_bytes = png(2000, 2000);
    // The signed upload refuses both, naming the problem, and stores nothing.
    for (bytes, needle) in [
        (&corrupt, "corrupt image data"),
        (&bomb_bytes, "above the limit"),
    ] {
        let (_, slot) = app.post("/upload", json!({"filename": "x.png"})).await;
        let r = app
            .http
            .put(slot["upload_url"].as_str().expect("url"))
            .header("content-type", "image/png")
            .body(bytes.clone())
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v: serde_json::Value = r.json().await.expect("envelope");
        assert!(v.to_string().contains(needle), "{v}");
    }
    // Files stored before that check (an earlier version's uploads) still
    // fail in the worker with the reason, and cost nothing: a stored
    // object's bytes are replaced on disk.
    let stored = |bytes: Vec<u8>| {
        let app = &app;
        async move {
            let id = app.upload(png(8, 8), "x.png").await;
            let key = app
                .store
                .file(&id)
                .await
                .expect("file")
                .expect("row")
                .object_key;
            std::fs::write(app.cfg.data_dir.join("objects").join(key), bytes).expect("replace");
            id
        }
    };
    let bad = stored(corrupt).await;
    let bomb = stored(bomb_bytes).await;
    let (before, _) = app.balance(&app.key).await;
    for (file, needle) in [(bad, "corrupt image"), (bomb, "above the limit")] {
        let body =
            json!({"project_id": p, "images": [file], "instructions": [{"style": "white_cutout"}]});
        let (s, v) = app.post("/create-packshot", body).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let job = v["job_id"].as_str().expect("job").to_string();
        let st = app.wait_for_job(&job, Duration::from_secs(30)).await;
        assert_eq!(st["status"], "failed", "{st}");
        assert!(
            st["error_message"]
                .as_str()
                .is_some_and(|m| m.contains(needle)),
            "{st}"
        );
        let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
        assert!(
            r["results"][0]["error_message"]
                .as_str()
                .is_some_and(|m| m.contains(needle)),
            "{r}"
        );
        // A permanent failure is not retried.
        let outputs = app.store.latest_outputs(&job).await.expect("outputs");
        assert_eq!(outputs[0].attempt, 1);
    }
    assert_eq!(
        app.balance(&app.key).await,
        (before, 0.0),
        "failed outputs cost nothing"
    );
    app.audit_clean().await;
    app.stop().await;
}

#[tokio::test]
async fn real_models_cut_out_a_garment_on_pure_white() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, with_models).await;
    let p = app.project("p").await;
    let photo = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/garment.jpg"))
        .expect("testdata");
    let f = app.upload(photo, "garment.jpg").await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout"}], "post_process": true}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let st = app.wait_for_job(&job, Duration::from_secs(120)).await;
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["post_processing_status"], "completed", "{st}");
    let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
    let res = &r["results"][0];
    assert!(
        res["model_used"]
            .as_str()
            .is_some_and(|m| m.starts_with("atelier (isnet_fp16")),
        "{res}"
    );
    assert_eq!(res["input_description"]["segmentation_model"], "isnet_fp16");
    let post = &res["input_description"]["post_processing"];
    assert!(
        post["sharpen_sigma"].as_f64().is_some_and(|s| s > 0.0) && post["colour_shift"].is_array(),
        "the post-processing pass ran and says what it did: {res}"
    );
    let bytes = app.fetch(&res["output"]["full_size"]).await;
    let img = image::load_from_memory(&bytes).expect("jpeg").to_rgb8();
    // JPEG keeps pure white corners at (or within a step of) 255.
    for (x, y) in [(0, 0), (1023, 0), (0, 1023), (1023, 1023)] {
        let px = img.get_pixel(x, y).0;
        assert!(px.iter().all(|c| *c >= 254), "corner ({x},{y}) = {px:?}");
    }
    app.audit_clean().await;
    app.stop().await;
}

/// An engine that refuses everything, like a generative backend's content filter.
struct Refuser;

impl atelier_worker::engines::Engine for Refuser {
    fn name(&self) -> &'static str {
        "refuser"
    }

    fn render(
        &self,
        _: &atelier_worker::engines::RenderRequest<'_>,
    ) -> Result<atelier_worker::engines::Rendered, atelier_worker::failure::TaskFailure> {
        Err(atelier_worker::failure::TaskFailure::refused(
            "content policy: refused by the test engine",
        ))
    }
}

#[tokio::test]
async fn auto_falls_back_to_the_next_engine_when_one_refuses() {
    use atelier_worker::engines::{BasicEngine, Engine, Pipeline};
    use std::sync::Arc;
    let app = TestApp::with(Dialect::Sqlite, Roles::API_AND_SCHEDULER, |_| {}).await;
    let worker = |engines: Vec<Arc<dyn Engine>>| {
        let s = &app.services;
        let mut ctx = atelier_worker::WorkerContext::from_config(
            &app.cfg,
            Default::default(),
            s.queue.clone(),
            s.objects.clone(),
        );
        ctx.pipeline = Pipeline::new(engines);
        let stop = tokio_util::sync::CancellationToken::new();
        (tokio::spawn(atelier_worker::run(ctx, stop.clone())), stop)
    };
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(64, 64), "a.jpg").await;
    let body = json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout"}], "options": {"model": "auto"}});
    let (before, _) = app.balance(&app.key).await;

    let (handle, stop) = worker(vec![Arc::new(Refuser), Arc::new(BasicEngine)]);
    let (_, v) = app.post("/create-packshot", body.clone()).await;
    let job = v["job_id"].as_str().expect("job").to_string();
    let st = app.wait_for_job(&job, Duration::from_secs(30)).await;
    assert_eq!(st["status"], "completed", "{st}");
    let (_, r) = app.get(&format!("/jobs/{job}/results")).await;
    assert_eq!(
        r["results"][0]["model_used"], "atelier-basic",
        "model_used names the engine that really ran"
    );
    assert_eq!(
        app.store.latest_outputs(&job).await.expect("outputs")[0].engine_index,
        1
    );
    stop.cancel();
    handle.await.expect("joins").expect("stops");

    // When every engine refuses, the output fails with the refusal and costs nothing.
    let (handle, stop) = worker(vec![Arc::new(Refuser)]);
    let (_, v) = app.post("/create-packshot", body).await;
    let job = v["job_id"].as_str().expect("job").to_string();
    let st = app.wait_for_job(&job, Duration::from_secs(30)).await;
    assert_eq!(st["status"], "failed", "{st}");
    assert!(
        st["error_message"].as_str().is_some_and(
            |m| m.contains("every configured engine refused") && m.contains("content policy")
        ),
        "{st}"
    );
    assert_eq!(
        app.balance(&app.key).await,
        (before - 3.0, 0.0),
        "only the completed output was charged"
    );
    stop.cancel();
    handle.await.expect("joins").expect("stops");
    app.audit_clean().await;
    app.stop().await;
}

/// The client's W3C trace continues through the job: the scheduler's task
/// message carries the same trace id (in the task and as an AMQP-style
/// header) with a span id of its own; a request without one starts a trace.
#[tokio::test]
async fn trace_context_travels_from_the_request_to_the_task_message() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API_AND_SCHEDULER, |_| {}).await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(64, 64), "a.jpg").await;
    let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout"}]});
    let r = app
        .http
        .post(app.url("/create-packshot"))
        .bearer_auth(&app.key)
        .header("traceparent", client)
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let (_, v) = app.post("/create-packshot", body).await;
    let untraced = v["job_id"].as_str().expect("job").to_string();

    // Stand in for a worker: read what the scheduler dispatched.
    let mut consumer = app
        .services
        .queue
        .consume("packshot", 4)
        .await
        .expect("consume");
    let mut seen = std::collections::HashMap::new();
    while seen.len() < 2 {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("a task within 20 s")
            .expect("consumer open");
        let task: atelier_shared::domain::Task = d.parse().expect("a task");
        let header = d.headers.get("traceparent").cloned();
        seen.insert(task.job_id.clone(), (task.traceparent.clone(), header));
        d.ack().await.expect("ack");
    }
    let expected = TraceParent::parse(client).expect("valid");
    let traced = seen
        .iter()
        .find(|(job, _)| **job != untraced)
        .map(|(_, v)| v.clone())
        .expect("the traced job's task");
    for tp in [traced.0, traced.1] {
        let tp = TraceParent::parse(tp.as_deref().expect("present")).expect("valid traceparent");
        assert_eq!(tp.trace_id, expected.trace_id, "the client's trace");
        assert_ne!(tp.span_id, expected.span_id, "a hop of its own");
    }
    let (own, _) = &seen[&untraced];
    let own = TraceParent::parse(own.as_deref().expect("present")).expect("valid");
    assert_ne!(
        own.trace_id, expected.trace_id,
        "a new trace for an untraced request"
    );
    app.stop().await;
}

/// Spans exported over OTLP by a scheduler and a worker running as their
/// own processes: one trace, the dispatch under the job's hop, the task
/// under the dispatch.
#[tokio::test]
async fn spans_are_exported_over_otlp_as_one_trace_across_processes() {
    use std::sync::{Arc, Mutex};
    // An OTLP/HTTP (JSON) collector on 127.0.0.1 that keeps every span.
    type Spans = Arc<Mutex<Vec<(String, Value)>>>;
    let spans: Spans = Arc::default();
    let sink = spans.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                    let service = rs["resource"]["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["key"] == "service.name")
                        .and_then(|a| a["value"]["stringValue"].as_str())
                        .unwrap_or("")
                        .to_string();
                    for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                        for span in ss["spans"].as_array().into_iter().flatten() {
                            sink.lock()
                                .expect("lock")
                                .push((service.clone(), span.clone()));
                        }
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, router).await });

    let app = TestApp::with(Dialect::Postgres, Roles::API, |_| {}).await;
    let mut children = Vec::new();
    for role in ["scheduler", "worker"] {
        let mut cmd = spawn_role_command(&app, role, 0);
        cmd.env("ATELIER_LOG__LEVEL", "info")
            .env("ATELIER_LOG__OTLP_ENDPOINT", &collector)
            .env("OTEL_BSP_SCHEDULE_DELAY", "200");
        children.push(cmd.spawn().expect("child starts"));
    }
    let p = app.project("Traced").await;
    let f = app.upload(garment_jpeg(200, 200), "a.jpg").await;
    let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = app
        .http
        .post(app.url("/create-packshot"))
        .bearer_auth(&app.key)
        .header("traceparent", client)
        .json(&json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout", "num_variations": 1}]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let job = r.json::<Value>().await.expect("json")["job_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(
        app.wait_for_job(&job, Duration::from_secs(60)).await["status"],
        "completed"
    );
    let stored: Option<String> = sqlx::query_scalar("SELECT traceparent FROM jobs WHERE id = $1")
        .bind(&job)
        .fetch_one(app.store.pool())
        .await
        .expect("job row");
    let job_hop = TraceParent::parse(&stored.expect("kept")).expect("valid");
    let trace_hex = "4bf92f3577b34da6a3ce929d0e0e4736";

    let t = std::time::Instant::now();
    let (dispatch, task) = loop {
        let seen = spans.lock().expect("lock").clone();
        let find = |service: &str, name: &str| {
            seen.iter()
                .find(|(s, sp)| s == service && sp["name"] == name && sp["traceId"] == trace_hex)
                .map(|(_, sp)| sp.clone())
        };
        if let (Some(d), Some(w)) = (
            find("atelier-scheduler", "dispatch"),
            find("atelier-worker", "task"),
        ) {
            break (d, w);
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "spans not exported: {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        dispatch["parentSpanId"],
        format!("{:016x}", job_hop.span_id),
        "the dispatch continues the job's hop"
    );
    assert_eq!(
        task["parentSpanId"], dispatch["spanId"],
        "the task continues the dispatch"
    );
    for mut c in children {
        let _ = c.kill().await;
    }
    app.stop().await;
}

/// A task in a format the worker does not read (a scheduler of another
/// version published it during a rolling upgrade) is handed back as a
/// retryable failure: the scheduler dispatches the output again, in its own
/// format, at once, and the job completes, charged once.
#[tokio::test]
async fn a_task_of_another_format_is_handed_back_and_dispatched_again() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API_AND_SCHEDULER, |_| {}).await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(64, 64), "a.jpg").await;
    let (before, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    // Take the task the scheduler dispatched and put back what an older
    // scheduler would have sent for it: ids only.
    let queue = app.services.queue.clone();
    let mut consumer = queue
        .consume(atelier_shared::domain::WorkQueue::Packshot.as_str(), 1)
        .await
        .expect("consume");
    let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("a task within 20 s")
        .expect("consumer open");
    let task: atelier_shared::domain::Task = d.parse().expect("a task");
    d.ack().await.expect("ack");
    drop(consumer);
    let old = json!({"job_id": task.job_id, "output_id": task.output_id, "attempt": task.attempt, "deadline_ms": task.deadline_ms});
    queue
        .publish(
            atelier_shared::domain::WorkQueue::Packshot.as_str(),
            atelier_shared::queue::Message::json(&old).expect("message"),
        )
        .await
        .expect("publish");

    let ctx = atelier_worker::WorkerContext::from_config(
        &app.cfg,
        Default::default(),
        queue.clone(),
        app.services.objects.clone(),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(atelier_worker::run(ctx, stop.clone()));
    let st = app.wait_for_job(&job, Duration::from_secs(30)).await;
    assert_eq!(st["status"], "completed", "{st}");
    let o = app
        .store
        .latest_outputs(&job)
        .await
        .expect("outputs")
        .remove(0);
    assert_eq!(o.attempt, 2, "the handed-back attempt, then the new one");
    assert!(
        o.last_error
            .as_deref()
            .is_some_and(|e| e.contains("format")),
        "{:?}",
        o.last_error
    );
    let (after, _) = app.balance(&app.key).await;
    assert_eq!(before - after, 3.0, "charged once");
    app.audit_clean().await;
    stop.cancel();
    worker.await.expect("joins").expect("worker stops");
    app.stop().await;
}

/// `worker.queues` chooses what a worker consumes: one told to serve only
/// `generate` leaves a packshot alone; a worker on the default serves it;
/// one told to serve what it cannot (`swap` without face models) stops
/// with the reason instead of idling.
#[tokio::test]
async fn worker_queues_choose_what_a_worker_consumes() {
    use atelier_shared::domain::WorkQueue;
    let fixture = CogFixture::start("flat2model").await;
    let app = TestApp::with(Dialect::Sqlite, Roles::API_AND_SCHEDULER, |c| {
        c.engines.routes.insert(
            "seedream".into(),
            crate::generate::flat_route(&fixture.url, &[]),
        );
    })
    .await;
    let start = |queues: Vec<WorkQueue>| {
        let mut cfg = app.cfg.clone();
        cfg.worker.queues = queues;
        let cfg = std::sync::Arc::new(cfg);
        let (queue, objects) = (app.services.queue.clone(), app.services.objects.clone());
        async move {
            let mut ctx = atelier_worker::WorkerContext::from_config(
                &cfg,
                Default::default(),
                queue,
                objects,
            );
            let engines = cfg.targets().expect("targets").engines;
            let c = cfg.clone();
            (ctx.pipeline, ctx.generators) = tokio::task::spawn_blocking(move || {
                atelier_worker::engines::Pipeline::from_config(&c, &engines)
            })
            .await
            .expect("joins")
            .expect("the generator route connects");
            let serves = ctx.queues();
            let stop = tokio_util::sync::CancellationToken::new();
            (
                serves,
                stop.clone(),
                tokio::spawn(atelier_worker::run(ctx, stop)),
            )
        }
    };
    let (serves, _, refused) = start(vec![WorkQueue::Swap]).await;
    assert!(serves.is_empty(), "{serves:?}");
    let err = refused
        .await
        .expect("joins")
        .expect_err("cannot serve swap");
    assert!(
        err.to_string().contains("worker.queues names swap"),
        "{err}"
    );

    let (serves, stop_gen, gen_worker) = start(vec![WorkQueue::Generate]).await;
    assert_eq!(serves, [WorkQueue::Generate]);
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(64, 64), "a.jpg").await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, st) = app.get(&format!("/jobs/{job}/status")).await;
    assert_eq!(st["status"], "pending", "nobody serves packshot yet: {st}");

    let (serves, stop_all, all_worker) = start(Vec::new()).await;
    assert_eq!(serves, [WorkQueue::Packshot, WorkQueue::Generate]);
    let st = app.wait_for_job(&job, Duration::from_secs(30)).await;
    assert_eq!(st["status"], "completed", "{st}");
    for (stop, w) in [(stop_gen, gen_worker), (stop_all, all_worker)] {
        stop.cancel();
        w.await.expect("joins").expect("worker stops");
    }
    app.stop().await;
}
