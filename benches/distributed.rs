//! End-to-end throughput of the distributed runtime, and the broker's own
//! ceiling for comparison. `cargo bench --bench distributed`.
//!
//! 1. The platform: API and scheduler in this process (one each), `WORKERS`
//!    in-process workers running a no-op engine, on PostgreSQL + RabbitMQ
//!    (quorum queues, publisher confirms) + a local object store. `JOBS` jobs
//!    of one output each go through the real HTTP API (admission, credits,
//!    outbox, dispatch, worker, settlement); figures: jobs/s from the first
//!    admission to the last completion, and enqueue→completion p50/p99 from
//!    the database's own timestamps.
//! 2. The broker alone: `MESSAGES` persistent messages published with
//!    confirms to a quorum queue through the same adapter and consumed with
//!    acks, by `PUBLISHERS` concurrent publishers, as msg/s.
//!
//! Needs the services `scripts/test` starts (or ATELIER_TEST_POSTGRES_URL,
//! ATELIER_TEST_AMQP_URL). Sizes: ATELIER_BENCH_JOBS (default 400),
//! ATELIER_BENCH_MESSAGES (default 4000); ATELIER_BENCH_OUTCOME_LANES (reports
//! the scheduler applies at once, default 8; 1 is the old sequential path).

use atelier::app::{self, Roles};
use atelier_shared::config::Config;
use atelier_shared::db::testing::create_postgres_database;
use atelier_shared::domain::JobStatus;
use atelier_shared::queue::rabbitmq::RabbitQueue;
use atelier_shared::queue::{Message, Queue};
use atelier_worker::engines::{Engine, Pipeline, RenderRequest, Rendered};
use atelier_worker::failure::TaskFailure;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const WORKERS: usize = 2;
const WORKER_CONCURRENCY: usize = 8;
const SUBMITTERS: usize = 16;
const PUBLISHERS: usize = 8;
const KEY: &str = "atl_bench_key_0123456789abcdefghijklmnopqrstuv";

/// Does no image work: the figures measure the platform, not a model.
struct Noop;

impl Engine for Noop {
    fn name(&self) -> &'static str {
        "noop"
    }

    fn render(&self, _: &RenderRequest<'_>) -> Result<Rendered, TaskFailure> {
        Ok(Rendered {
            image: image::RgbaImage::from_pixel(8, 8, image::Rgba([255, 255, 255, 255])),
            model_used: "noop".into(),
            description: json!({}),
            post: Default::default(),
        })
    }
}

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn amqp_url() -> String {
    std::env::var("ATELIER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        platform(env_usize("ATELIER_BENCH_JOBS", 400)).await?;
        broker(env_usize("ATELIER_BENCH_MESSAGES", 4000)).await
    })
}

async fn platform(jobs: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.data_dir = dir.path().to_path_buf();
    cfg.database.url = Some(create_postgres_database().await);
    cfg.database.max_connections = 20;
    cfg.queue.url = amqp_url();
    cfg.queue.namespace = format!("bench{}.", ulid::Ulid::new().to_string().to_lowercase());
    cfg.bootstrap.api_key = Some(KEY.into());
    cfg.bootstrap.credits = 1_000_000.0;
    cfg.limits.create_per_minute = 1_000_000;
    cfg.limits.requests_per_minute = 1_000_000;
    cfg.limits.active_jobs = 1_000_000;
    cfg.models.auto_fetch = false;
    cfg.models.dir = dir.path().join("no-models");
    cfg.worker.concurrency = WORKER_CONCURRENCY;
    cfg.scheduler.tick_ms = 50;
    cfg.scheduler.queue_target = WORKERS * WORKER_CONCURRENCY * 2;
    cfg.scheduler.outcome_concurrency = env_usize("ATELIER_BENCH_OUTCOME_LANES", 8);
    println!("scheduler outcome lanes: {}", cfg.scheduler.outcome_concurrency);
    cfg.log.level = "warn".into();
    let shutdown = CancellationToken::new();
    let running = app::start(
        cfg.clone(),
        Roles {
            api: true,
            scheduler: true,
            worker: false,
        },
        shutdown.clone(),
    )
    .await?;
    let s = running.services.clone();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let mut ctx = atelier_worker::WorkerContext::from_config(
            &cfg,
            Default::default(),
            s.queue.clone(),
            s.objects.clone(),
        );
        ctx.pipeline = Pipeline::new(vec![Arc::new(Noop)]);
        workers.push(tokio::spawn(atelier_worker::run(ctx, shutdown.clone())));
    }
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
    };
    let project: Value = post("/project", json!({"project_name": "bench"}))
        .await?
        .json()
        .await?;
    let slot: Value = post("/upload", json!({"filename": "a.png"}))
        .await?
        .json()
        .await?;
    let mut png = Vec::new();
    image::RgbImage::from_pixel(32, 32, image::Rgb([20, 60, 160]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    http.put(slot["upload_url"].as_str().unwrap_or_default())
        .header("content-type", "image/png")
        .body(png)
        .send()
        .await?
        .error_for_status()?;
    let body = json!({"project_id": project["project_id"], "images": [slot["file_id"]],
                      "instructions": [{"style": "white_cutout"}]});

    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut submitters = Vec::new();
    for _ in 0..SUBMITTERS {
        let (http, base, body, next) = (http.clone(), base.clone(), body.clone(), next.clone());
        submitters.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < jobs {
                let r = http
                    .post(format!("{base}/create-packshot"))
                    .bearer_auth(KEY)
                    .json(&body)
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 202, "create-packshot answered {}", r.status());
                let v: Value = r.json().await?;
                ids.push(v["job_id"].as_str().unwrap_or_default().to_string());
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::new();
    for s in submitters {
        ids.extend(s.await??);
    }
    let admitted = started.elapsed();
    let store = s
        .store
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the API role has the database"))?;
    loop {
        let sql = format!(
            "SELECT COUNT(*) FROM jobs WHERE status IN ({})",
            JobStatus::sql_in(&JobStatus::OPEN)
        );
        let open: i64 = sqlx::query_scalar(&sql).fetch_one(store.pool()).await?;
        if open == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{open} jobs still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT status, created_at, finalized_at FROM jobs")
            .fetch_all(store.pool())
            .await?;
    anyhow::ensure!(
        rows.len() == ids.len() && rows.iter().all(|r| r.0 == "completed"),
        "not every job completed"
    );
    let first = rows.iter().map(|r| r.1).min().unwrap_or(0);
    let last = rows.iter().map(|r| r.2).max().unwrap_or(0);
    let mut lat: Vec<i64> = rows.iter().map(|r| r.2 - r.1).collect();
    lat.sort_unstable();
    println!(
        "platform (PostgreSQL + RabbitMQ, {WORKERS} workers × {WORKER_CONCURRENCY}, no-op engine, 1 output per job):"
    );
    println!(
        "  {} jobs admitted in {:.2} s ({:.0} admissions/s over HTTP, {SUBMITTERS} clients)",
        ids.len(),
        admitted.as_secs_f64(),
        ids.len() as f64 / admitted.as_secs_f64()
    );
    println!(
        "  {:.1} jobs/s end to end (first admission → last completion, {:.2} s)",
        ids.len() as f64 / ((last - first) as f64 / 1000.0),
        (last - first) as f64 / 1000.0
    );
    println!(
        "  enqueue → completion: p50 {} ms, p99 {} ms, max {} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0)
    );
    shutdown.cancel();
    for w in workers {
        w.await??;
    }
    running.wait().await?;
    Ok(())
}

async fn broker(messages: usize) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let q = Arc::new(
        RabbitQueue::connect(
            &amqp_url(),
            &format!("bench{}.", ulid::Ulid::new().to_string().to_lowercase()),
            stop.clone(),
        )
        .await?,
    );
    let name = "raw";
    let started = Instant::now();
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let q = q.clone();
        publishers.push(tokio::spawn(async move {
            for i in (p..messages).step_by(PUBLISHERS) {
                q.publish(name, Message::json(&i)?).await?;
            }
            anyhow::Ok(())
        }));
    }
    let mut consumer = q.consume(name, 256).await?;
    let mut got = 0;
    while got < messages {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("consumer ended"))?;
        d.ack().await?;
        got += 1;
    }
    for p in publishers {
        p.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "broker alone (same adapter: persistent, confirmed, quorum queue; {PUBLISHERS} publishers, 1 consumer, prefetch 256):"
    );
    println!(
        "  {messages} messages published and consumed in {secs:.2} s = {:.0} msg/s",
        messages as f64 / secs
    );
    stop.cancel();
    Ok(())
}
