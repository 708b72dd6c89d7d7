//! End-to-end throughput of the distributed runtime, side by side with
//! Celery on the same broker, and the broker's own ceiling.
//! `cargo bench --bench distributed`.
//!
//! 1. The platform: API and `SCHEDULERS` scheduler replicas in this process,
//!    `WORKERS` in-process workers × 8 running a no-op engine, on PostgreSQL,
//!    RabbitMQ (quorum queues, publisher confirms) and a local object store.
//!    `JOBS` jobs of one output each go through the real HTTP API (admission,
//!    credits, outbox, dispatch, worker, settlement) from 16 clients spread
//!    over `ACCOUNTS` accounts. Figures: admissions/s over HTTP, jobs/s from
//!    the first admission to the last completion, enqueue→start and
//!    enqueue→completion p50/p99 from the database's own timestamps. The run
//!    fails if any output ran more than once (double dispatch).
//! 2. Steady state: jobs submitted at a fixed rate (`PACE` × the jobs/s just
//!    measured) for `PACED_SECS`; enqueue→start p50/p99. Then admission
//!    alone (`ADMIT_ALONE`): the workers stopped, `JOBS` more jobs
//!    submitted flat out (admissions/s with nothing else to do but fill the
//!    work queue), and the rate at which the workers, back, drain them.
//! 3. The peer: `scripts/bench-celery` (Celery 5, thread pool, quorum queue,
//!    acks_late, publisher confirms; same jobs, clients and workers × 8)
//!    right after each round, and the ratio of the two.
//! 4. The broker alone: `MESSAGES` persistent messages published with
//!    confirms to a quorum queue through the same adapter and consumed with
//!    acks, by `PUBLISHERS` concurrent publishers, as msg/s.
//! 5. The database alone: `benches/peers/job_sql.pgbench`, the rows one job
//!    writes in the platform's own statements and transactions, run by
//!    pgbench from `SUBMITTERS` clients for `FLOOR_SECS` with nothing else
//!    around them: the most jobs/s PostgreSQL allows this machine for that
//!    work, beside Celery's rate of the same run; then one client alone,
//!    for each statement's own time.
//!
//! Each platform round and the floor also print the whole machine's CPU
//! time per job (from /proc/stat: every process, the database and the
//! broker included).
//!
//! Needs the services `scripts/test` starts (or ATELIER_TEST_POSTGRES_URL,
//! ATELIER_TEST_AMQP_URL); the floor needs `pgbench` (PostgreSQL's client
//! tools) on the PATH and says so, skipped, without it. Settings (environment, `ATELIER_BENCH_` + name):
//! JOBS (400), ROUNDS (1), ACCOUNTS (1), SCHEDULERS (1), WORKERS (2),
//! OUTCOME_LANES (8), PACE (0.5; 0 skips), PACED_SECS (10), ADMIT_ALONE (1;
//! 0 skips), PEERS (1; 0
//! skips Celery), MESSAGES (4000; 0 skips), FLOOR_SECS (10; 0 skips), DATA_DIR (where the local
//! object store's folder is made: /dev/shm when there is one, else the
//! system's temporary folder). Every queue a run declared is
//! deleted at its end, and every database it made dropped.

use atelier::app::{self, Roles};
use atelier_shared::config::Config;
use atelier_shared::db::accounts::NewAccount;
use atelier_shared::db::testing::create_postgres_database;
use atelier_shared::domain::task::{OUTCOME_QUEUE, WAKE_QUEUE};
use atelier_shared::domain::{Credits, JobStatus, Plan, WorkQueue};
use atelier_shared::queue::rabbitmq::RabbitQueue;
use atelier_shared::queue::{Message, Queue};
use atelier_worker::engines::{Engine, Pipeline, RenderRequest, Rendered};
use atelier_worker::failure::TaskFailure;
use serde_json::{Value, json};
use sqlx::Connection;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const WORKER_CONCURRENCY: usize = 8;
const SUBMITTERS: usize = 16;
const PUBLISHERS: usize = 8;

/// Does no image work: the figures measure the platform, not a model. It
/// counts what it ran, so that a double dispatch shows.
struct Noop(Arc<AtomicUsize>);

impl Engine for Noop {
    fn name(&self) -> &'static str {
        "noop"
    }

    fn render(&self, _: &RenderRequest<'_>) -> Result<Rendered, TaskFailure> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(Rendered {
            image: image::RgbaImage::from_pixel(8, 8, image::Rgba([255, 255, 255, 255])),
            model_used: "noop".into(),
            description: json!({}),
            post: Default::default(),
        })
    }
}

/// `ATELIER_BENCH_<k>`, or `d` when unset or unreadable.
fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(format!("ATELIER_BENCH_{k}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn amqp_url() -> String {
    std::env::var("ATELIER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(Clone, Copy)]
struct Settings {
    jobs: usize,
    accounts: usize,
    schedulers: usize,
    workers: usize,
    lanes: usize,
    pace: f64,
    paced_secs: f64,
    admit_alone: bool,
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let set = Settings {
        jobs: env("JOBS", 400),
        accounts: env("ACCOUNTS", 1).max(1),
        schedulers: env("SCHEDULERS", 1).max(1),
        workers: env("WORKERS", 2).max(1),
        lanes: env("OUTCOME_LANES", 8),
        pace: env("PACE", 0.5),
        paced_secs: env("PACED_SECS", 10.0),
        admit_alone: env("ADMIT_ALONE", 1) > 0,
    };
    let rounds = env("ROUNDS", 1).max(1);
    let peers = env("PEERS", 1) > 0;
    rt.block_on(async {
        println!(
            "load average before: {}",
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        );
        let mut ratios = Vec::new();
        let mut celery_rate = None;
        for round in 1..=rounds {
            println!("— round {round} of {rounds}");
            let ours = platform(set).await?;
            if peers {
                match celery(set).await {
                    Ok(theirs) => {
                        let ratio = ours / theirs;
                        ratios.push(ratio);
                        celery_rate = Some(theirs);
                        println!("  ratio Atelier / Celery (end-to-end jobs/s): {ratio:.2}×");
                    }
                    Err(e) => println!("celery peer: not run ({e:#})"),
                }
            }
        }
        if !ratios.is_empty() {
            let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}×")).collect();
            println!("ratios over {} rounds: {}", ratios.len(), shown.join(", "));
        }
        let messages = env("MESSAGES", 4000);
        if messages > 0 {
            broker(messages).await?;
        }
        let floor_secs = env("FLOOR_SECS", 10.0);
        if floor_secs > 0.0 {
            if let Err(e) = floor(floor_secs, celery_rate).await {
                println!("database floor: not run ({e:#})");
            }
        }
        println!(
            "load average after: {}",
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        );
        anyhow::Ok(())
    })
}

/// One account the clients submit as: its key and the job body.
struct Submitter {
    key: String,
    body: Value,
}

/// Runs the platform round; returns its end-to-end jobs/s.
async fn platform(set: Settings) -> anyhow::Result<f64> {
    // The local object store keeps results on a memory file system when
    // the machine has one: in production they go to S3 on other machines,
    // and on this one's disk file creation (ext4 inode allocation, a
    // journal commit per fsync) took a third of the run's CPU, measuring
    // the disk rather than the control plane. The store's code (temporary
    // file, fsync, rename) runs as it does anywhere.
    let parent = std::env::var_os("ATELIER_BENCH_DATA_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| Some(std::path::PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("atelier-bench")
        .tempdir_in(&parent)?;
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.data_dir = dir.path().to_path_buf();
    cfg.database.url = Some(create_postgres_database().await);
    cfg.database.max_connections = 20;
    cfg.queue.url = amqp_url();
    let namespace = format!("bench{}.", ulid::Ulid::new().to_string().to_lowercase());
    cfg.queue.namespace = namespace.clone();
    let bootstrap = atelier_shared::db::accounts::generate_token();
    cfg.bootstrap.api_key = Some(bootstrap.clone());
    cfg.bootstrap.credits = 1_000_000.0;
    cfg.limits.create_per_minute = 1_000_000;
    cfg.limits.requests_per_minute = 1_000_000;
    cfg.limits.active_jobs = 1_000_000;
    // The figures are about jobs; the one upload per account made before
    // the clock starts needs no tagging (its quiet output would also count
    // as an output without a render below).
    cfg.limits.tag_uploads = false;
    cfg.models.auto_fetch = false;
    cfg.models.dir = dir.path().join("no-models");
    cfg.worker.concurrency = WORKER_CONCURRENCY;
    cfg.scheduler.tick_ms = 50;
    cfg.scheduler.queue_target = set.workers * WORKER_CONCURRENCY * 2;
    cfg.scheduler.outcome_concurrency = set.lanes;
    cfg.log.level = "warn".into();
    println!(
        "platform: PostgreSQL + RabbitMQ, {} scheduler(s) with {} outcome lanes, {} workers × {WORKER_CONCURRENCY}, \
         no-op engine, 1 output per job, {SUBMITTERS} clients over {} account(s), objects under {}",
        set.schedulers,
        set.lanes,
        set.workers,
        set.accounts,
        parent.display()
    );
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
    let mut replicas = Vec::new();
    for _ in 1..set.schedulers {
        replicas.push(
            app::start(
                cfg.clone(),
                Roles {
                    api: false,
                    scheduler: true,
                    worker: false,
                },
                shutdown.clone(),
            )
            .await?,
        );
    }
    let s = running.services.clone();
    let store = s
        .store
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the API role has the database"))?;
    let renders = Arc::new(AtomicUsize::new(0));
    // The workers, stopped on their own for the admission-alone phase.
    let start_workers = |stop: CancellationToken| {
        (0..set.workers)
            .map(|_| {
                let mut ctx = atelier_worker::WorkerContext::from_config(
                    &cfg,
                    Default::default(),
                    s.queue.clone(),
                    s.objects.clone(),
                );
                ctx.pipeline = Pipeline::new(vec![Arc::new(Noop(renders.clone()))]);
                tokio::spawn(atelier_worker::run(ctx, stop.clone()))
            })
            .collect::<Vec<_>>()
    };
    let mut workers_stop = shutdown.child_token();
    let mut workers = start_workers(workers_stop.clone());
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();

    // The accounts: the bootstrapped one, and more made like `atelier admin
    // accounts create`; each with a project and an uploaded photo.
    let mut keys = vec![bootstrap];
    for i in 1..set.accounts {
        let a = store
            .create_account(NewAccount {
                name: &format!("bench-{i}"),
                plan: Plan::Standard,
                max_size: &cfg.limits.default_max_size,
                custom_dimensions: false,
                is_operator: false,
            })
            .await?;
        store
            .grant_credits(&a.id, Credits(1_000_000_000), "bench")
            .await?;
        keys.push(store.create_api_key(&a.id, "bench", None, None).await?.1);
    }
    let mut png = Vec::new();
    image::RgbImage::from_pixel(32, 32, image::Rgb([20, 60, 160]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    let mut submitters = Vec::new();
    for key in keys {
        let post = |path: &str, body: Value| {
            http.post(format!("{base}{path}"))
                .bearer_auth(&key)
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
        http.put(slot["upload_url"].as_str().unwrap_or_default())
            .header("content-type", "image/png")
            .body(png.clone())
            .send()
            .await?
            .error_for_status()?;
        let body = json!({"project_id": project["project_id"], "images": [slot["file_id"]],
                          "instructions": [{"style": "white_cutout"}]});
        submitters.push(Submitter { key, body });
    }
    let submitters = Arc::new(submitters);

    // Flat out: every client submits as fast as it is answered.
    let cpu_before = machine_cpu_secs();
    let started = Instant::now();
    let admitted_jobs = flat_out(&http, &base, &submitters, set.jobs).await?;
    let admitted = started.elapsed();
    wait_until_done(&store, started).await?;
    let cpu = cpu_since(cpu_before);
    let rows = job_times(&store, 0).await?;
    anyhow::ensure!(
        rows.len() == admitted_jobs && rows.iter().all(|r| r.status == "completed"),
        "not every job completed"
    );
    let first = rows.iter().map(|r| r.created).min().unwrap_or(0);
    let last = rows.iter().map(|r| r.finalized).max().unwrap_or(0);
    let rate = rows.len() as f64 / ((last - first).max(1) as f64 / 1000.0);
    println!(
        "  {} jobs admitted in {:.2} s: {:.0} admissions/s over HTTP",
        admitted_jobs,
        admitted.as_secs_f64(),
        admitted_jobs as f64 / admitted.as_secs_f64()
    );
    println!(
        "  {rate:.1} jobs/s end to end (first admission → last completion, {:.2} s)",
        (last - first) as f64 / 1000.0
    );
    if let Some(cpu) = cpu {
        println!(
            "  machine CPU: {:.1} ms per job ({cpu:.1} s over the flat-out phase, every process)",
            cpu * 1000.0 / rows.len().max(1) as f64
        );
    }
    print_latencies(&rows);

    // Steady state at a fraction of what was just measured.
    if set.pace > 0.0 && set.paced_secs > 0.0 {
        let target = (rate * set.pace).max(1.0);
        let since = atelier_shared::time::now_ms();
        let n = paced(&http, &base, submitters.clone(), target, set.paced_secs).await?;
        wait_until_done(&store, Instant::now()).await?;
        let rows = job_times(&store, since).await?;
        anyhow::ensure!(
            rows.len() == n,
            "paced: {} of {n} jobs recorded",
            rows.len()
        );
        println!(
            "  steady state at {:.0}% of that ({target:.0} jobs/s offered for {:.0} s, {n} jobs):",
            set.pace * 100.0,
            set.paced_secs
        );
        print_latencies(&rows);
    }

    // Admission alone: the workers stopped, the clients submit flat out
    // again, so that admission has the machine to itself (the dispatcher
    // fills the work queue to its target and waits); then the workers
    // come back and drain the backlog.
    if set.admit_alone {
        workers_stop.cancel();
        for w in workers.drain(..) {
            w.await??;
        }
        let since = atelier_shared::time::now_ms();
        let cpu_before = machine_cpu_secs();
        let began = Instant::now();
        let n = flat_out(&http, &base, &submitters, set.jobs).await?;
        let took = began.elapsed();
        let cpu = cpu_since(cpu_before);
        println!(
            "  admission alone (no worker running): {n} jobs admitted in {:.2} s: {:.0} admissions/s over HTTP{}",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64(),
            cpu.map(|c| format!(
                ", machine CPU {:.1} ms per admission",
                c * 1000.0 / n.max(1) as f64
            ))
            .unwrap_or_default()
        );
        workers_stop = shutdown.child_token();
        workers = start_workers(workers_stop.clone());
        let drain_began = atelier_shared::time::now_ms();
        wait_until_done(&store, Instant::now()).await?;
        let rows = job_times(&store, since).await?;
        anyhow::ensure!(
            rows.len() == n && rows.iter().all(|r| r.status == "completed"),
            "admission alone: {} of {n} jobs completed",
            rows.len()
        );
        let last = rows
            .iter()
            .map(|r| r.finalized)
            .max()
            .unwrap_or(drain_began);
        println!(
            "  then the backlog drained at {:.1} jobs/s (workers back → last completion, {:.2} s)",
            n as f64 / ((last - drain_began).max(1) as f64 / 1000.0),
            (last - drain_began) as f64 / 1000.0
        );
    }

    // Exactly once: one render and one attempt per output.
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outputs")
        .fetch_one(store.pool())
        .await?;
    let repeated: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outputs WHERE attempt <> 1")
        .fetch_one(store.pool())
        .await?;
    let ran = renders.load(Ordering::Relaxed);
    anyhow::ensure!(
        repeated == 0 && ran as i64 == total,
        "double dispatch: {total} outputs, {ran} renders, {repeated} outputs with more than one attempt"
    );
    println!("  exactly once: {total} outputs, {ran} renders, no output with a second attempt");

    shutdown.cancel();
    for w in workers {
        w.await??;
    }
    for r in replicas {
        r.wait().await?;
    }
    running.wait().await?;
    delete_queues(&namespace).await;
    if let Some(url) = &cfg.database.url {
        drop_database(url).await?;
    }
    Ok(rate)
}

/// Drops a database the bench made, closing its connections by force (the
/// round's pool, still held by the caller, or pgbench's last backends).
async fn drop_database(url: &str) -> anyhow::Result<()> {
    let mut admin =
        sqlx::AnyConnection::connect(&atelier_shared::db::testing::postgres_admin_url()).await?;
    let name = url.rsplit('/').next().unwrap_or_default();
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    Ok(())
}

/// `jobs` jobs submitted by `SUBMITTERS` clients, each as fast as it is
/// answered, round-robin over the accounts; returns how many were admitted.
async fn flat_out(
    http: &reqwest::Client,
    base: &str,
    submitters: &Arc<Vec<Submitter>>,
    jobs: usize,
) -> anyhow::Result<usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..SUBMITTERS {
        let (http, base, next, submitters) = (
            http.clone(),
            base.to_string(),
            next.clone(),
            submitters.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut n = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs {
                    return anyhow::Ok(n);
                }
                submit(&http, &base, &submitters[i % submitters.len()]).await?;
                n += 1;
            }
        }));
    }
    let mut admitted = 0;
    for c in clients {
        admitted += c.await??;
    }
    Ok(admitted)
}

async fn submit(http: &reqwest::Client, base: &str, who: &Submitter) -> anyhow::Result<()> {
    let r = http
        .post(format!("{base}/create-packshot"))
        .bearer_auth(&who.key)
        .json(&who.body)
        .send()
        .await?;
    anyhow::ensure!(r.status() == 202, "create-packshot answered {}", r.status());
    Ok(())
}

/// Submits at `rate` jobs/s for `secs` (each on its own task, so a slow
/// answer does not slow the offered load); returns how many were admitted.
async fn paced(
    http: &reqwest::Client,
    base: &str,
    submitters: Arc<Vec<Submitter>>,
    rate: f64,
    secs: f64,
) -> anyhow::Result<usize> {
    let n = (rate * secs).round() as usize;
    let every = Duration::from_secs_f64(1.0 / rate);
    let began = tokio::time::Instant::now();
    let mut sent = tokio::task::JoinSet::new();
    for i in 0..n {
        tokio::time::sleep_until(began + every.mul_f64(i as f64)).await;
        let (http, base, submitters) = (http.clone(), base.to_string(), submitters.clone());
        sent.spawn(async move { submit(&http, &base, &submitters[i % submitters.len()]).await });
    }
    while let Some(r) = sent.join_next().await {
        r??;
    }
    Ok(n)
}

async fn wait_until_done(store: &atelier_shared::db::Store, since: Instant) -> anyhow::Result<()> {
    let sql = format!(
        "SELECT COUNT(*) FROM jobs WHERE status IN ({})",
        JobStatus::sql_in(&JobStatus::OPEN)
    );
    loop {
        let open: i64 = sqlx::query_scalar(&sql).fetch_one(store.pool()).await?;
        if open == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(600),
            "{open} jobs still open"
        );
        // The figures come from the database's own timestamps, not from
        // when this loop notices: it polls rarely, as the count is a scan
        // that would otherwise take a share of the database's CPU.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct JobTimes {
    status: String,
    created: i64,
    started: i64,
    finalized: i64,
}

/// The jobs created at or after `since` (epoch ms), with when their output started.
async fn job_times(store: &atelier_shared::db::Store, since: i64) -> anyhow::Result<Vec<JobTimes>> {
    let rows: Vec<(String, i64, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT j.status, j.created_at, MIN(o.started_at), j.finalized_at FROM jobs j \
         JOIN outputs o ON o.job_id = j.id WHERE j.created_at >= $1 \
         GROUP BY j.id, j.status, j.created_at, j.finalized_at",
    )
    .bind(since)
    .fetch_all(store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(status, created, started, finalized)| JobTimes {
            status,
            created,
            started: started.unwrap_or(created),
            finalized: finalized.unwrap_or(created),
        })
        .collect())
}

fn print_latencies(rows: &[JobTimes]) {
    let mut start: Vec<i64> = rows.iter().map(|r| r.started - r.created).collect();
    let mut done: Vec<i64> = rows.iter().map(|r| r.finalized - r.created).collect();
    start.sort_unstable();
    done.sort_unstable();
    println!(
        "  enqueue → start: p50 {} ms, p99 {} ms; enqueue → completion: p50 {} ms, p99 {} ms, max {} ms",
        percentile(&start, 0.5),
        percentile(&start, 0.99),
        percentile(&done, 0.5),
        percentile(&done, 0.99),
        done.last().copied().unwrap_or(0)
    );
}

/// Runs `scripts/bench-celery` with the same workload; returns its jobs/s.
async fn celery(set: Settings) -> anyhow::Result<f64> {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tokio::process::Command::new("bash")
        .arg(format!("{root}/scripts/bench-celery"))
        .args(["--jobs", &set.jobs.to_string()])
        .args(["--clients", &SUBMITTERS.to_string()])
        .args(["--workers", &set.workers.to_string()])
        .args(["--concurrency", &WORKER_CONCURRENCY.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "scripts/bench-celery exited with {}",
        out.status
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(line.lines().last().unwrap_or_default())?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "celery 5 (same RabbitMQ, quorum queue, acks_late, confirms; {} workers × {WORKER_CONCURRENCY} threads, {SUBMITTERS} clients):",
        set.workers
    );
    println!(
        "  {} tasks published at {:.0}/s; {:.1} tasks/s end to end ({:.2} s)",
        f("jobs"),
        f("publish_per_s"),
        f("jobs_per_s"),
        f("seconds")
    );
    println!(
        "  enqueue → start: p50 {:.0} ms, p99 {:.0} ms; enqueue → completion: p50 {:.0} ms, p99 {:.0} ms",
        f("start_p50_ms"),
        f("start_p99_ms"),
        f("done_p50_ms"),
        f("done_p99_ms")
    );
    let rate = f("jobs_per_s");
    anyhow::ensure!(rate.is_finite() && rate > 0.0, "no rate in {line}");
    Ok(rate)
}

/// Deletes every queue a platform round declared (its namespace), so that
/// runs do not leave quorum queues behind for the next one to share the
/// broker with. Delay queues expire on their own.
async fn delete_queues(namespace: &str) {
    let stop = CancellationToken::new();
    let Ok(q) = RabbitQueue::connect(&amqp_url(), namespace, stop.clone()).await else {
        return;
    };
    for name in WorkQueue::ALL
        .map(WorkQueue::as_str)
        .into_iter()
        .chain([OUTCOME_QUEUE, WAKE_QUEUE])
    {
        if let Err(e) = q.delete_queue(name).await {
            println!("  (could not delete queue {namespace}{name}: {e})");
        }
    }
    stop.cancel();
}

async fn broker(messages: usize) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let namespace = format!("bench{}.", ulid::Ulid::new().to_string().to_lowercase());
    let q = Arc::new(RabbitQueue::connect(&amqp_url(), &namespace, stop.clone()).await?);
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
    drop(consumer);
    q.delete_queue(name).await?;
    stop.cancel();
    Ok(())
}

/// CPU time the whole machine has spent so far, in seconds (every state of
/// /proc/stat's `cpu` line but idle and iowait), if it can be read.
fn machine_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …; 100 ticks a second
    // (USER_HZ, the same on every Linux architecture this runs on).
    let busy: f64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Some(busy / 100.0)
}

/// Machine CPU seconds spent since `before` (a [`machine_cpu_secs`] reading).
fn cpu_since(before: Option<f64>) -> Option<f64> {
    Some(machine_cpu_secs()? - before?)
}

/// The database floor (see the module's note): `benches/peers/job_sql.pgbench`
/// through pgbench in a database of its own; prints its jobs/s beside
/// Celery's, if Celery ran.
async fn floor(secs: f64, celery: Option<f64>) -> anyhow::Result<()> {
    let url = create_postgres_database().await;
    let store = atelier_shared::db::Store::connect(&url, 2).await?;
    store.migrate().await?;
    sqlx::query(
        "INSERT INTO accounts (id, name, balance, created_at) \
         SELECT 'floor-' || g, 'floor ' || g, 1000000000000000, 0 FROM generate_series(1, 100) g",
    )
    .execute(store.pool())
    .await?;
    sqlx::query(
        "INSERT INTO projects (id, account_id, name, created_at) \
         SELECT 'floor-p' || g, 'floor-' || g, 'floor', 0 FROM generate_series(1, 100) g",
    )
    .execute(store.pool())
    .await?;
    store.pool().close().await;
    let cpu_before = machine_cpu_secs();
    let loaded = pgbench(&url, SUBMITTERS, secs).await?;
    let cpu = cpu_since(cpu_before);
    let tps = field(&loaded, "tps").ok_or_else(|| anyhow::anyhow!("no tps in pgbench's output"))?;
    let jobs = field(&loaded, "number of transactions actually processed").unwrap_or(0.0);
    println!(
        "database floor (pgbench, the SQL of one job's life in the platform's statements and transactions, \
         {SUBMITTERS} clients, prepared, asynchronous commit, nothing else running):"
    );
    println!("  {jobs:.0} jobs in {secs:.0} s: {tps:.0} jobs/s");
    if let Some(cpu) = cpu.filter(|_| jobs > 0.0) {
        println!(
            "  machine CPU: {:.2} ms per job (PostgreSQL and pgbench)",
            cpu * 1000.0 / jobs
        );
    }
    if let Some(c) = celery {
        println!(
            "  floor / Celery (last round): {:.2}×; 4× Celery would be {:.0} jobs/s",
            tps / c,
            4.0 * c
        );
    }
    // Where a job's time goes in the database: each statement's mean
    // latency with one client (no queueing for the cores: the statement's
    // own time and its round trip; a COMMIT's is its commit record), from
    // pgbench's per-command report; BEGIN and the variable settings left
    // out.
    let alone = pgbench(&url, 1, secs.min(3.0)).await?;
    let per_command: Vec<(f64, String)> = alone
        .lines()
        .skip_while(|l| !l.contains("statement latencies"))
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let ms: f64 = it.next()?.parse().ok()?;
            let rest: Vec<&str> = it.skip_while(|t| t.parse::<f64>().is_ok()).collect();
            let text = rest.join(" ");
            (!text.starts_with('\\') && text != "BEGIN;")
                .then(|| (ms, text.chars().take(64).collect()))
        })
        .collect();
    if !per_command.is_empty() {
        let total: f64 = per_command.iter().map(|(ms, _)| ms).sum();
        println!(
            "  one client alone: {:.0} jobs/s; per statement, mean ms (sum {total:.2} ms per job):",
            field(&alone, "tps").unwrap_or(f64::NAN)
        );
        for (ms, text) in per_command {
            println!("    {ms:>6.3}  {text}");
        }
    }
    // pgbench's last backends may still be on their way out.
    drop_database(&url).await
}

/// One pgbench run of `benches/peers/job_sql.pgbench` against `url`:
/// `clients` clients for `secs` seconds; its standard output.
async fn pgbench(url: &str, clients: usize, secs: f64) -> anyhow::Result<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tokio::process::Command::new("pgbench")
        // Asynchronous commit: no commit waits for its WAL flush, more than
        // the platform's group commits save (it commits an admission, or a
        // batch of claims or reports, once), so that the figure is a
        // ceiling for this work, not a measure of the disk.
        .env("PGOPTIONS", "-c synchronous_commit=off")
        .args(["--no-vacuum", "--protocol=prepared", "--report-per-command"])
        .args(["--client", &clients.to_string()])
        .args(["--jobs", &clients.min(2).to_string()])
        .args(["--time", &format!("{}", secs.ceil().max(1.0) as u64)])
        .args(["--file", &format!("{root}/benches/peers/job_sql.pgbench")])
        .arg(url)
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("pgbench: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "pgbench exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A number from pgbench's report: the first after `name`'s `=` or `:`
/// (`tps = 1234.5 (without …)`; `… processed: 12345/12345`).
fn field(report: &str, name: &str) -> Option<f64> {
    let line = report.lines().find(|l| l.trim_start().starts_with(name))?;
    line.split(['=', ':'])
        .nth(1)?
        .split(|c: char| c == '/' || c.is_whitespace())
        .find(|t| !t.is_empty())?
        .parse()
        .ok()
}
