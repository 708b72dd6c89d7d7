//! Fault drills: a worker killed mid-task, the database going away, the
//! broker restarting.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use atelier_shared::db::testing::create_postgres_database;
use atelier_shared::domain::OutputStatus;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;
use tokio::task::JoinHandle;

/// Starts `atelier worker` as a child process on the app's services.
fn spawn_worker(app: &TestApp, fault_delay_ms: u64) -> Child {
    spawn_role(app, "worker", fault_delay_ms)
}

/// The one worker of the operator view's list, once `ready` holds for it.
async fn operator_sees_worker(app: &TestApp, ready: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let (s, o) = app.get("/admin/overview").await;
        assert_eq!(s, StatusCode::OK, "{o}");
        if let Some([w]) = o["workers"].as_array().map(Vec::as_slice)
            && ready(w)
        {
            return w.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "workers: {}",
            o["workers"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_worker_killed_mid_task_loses_nothing_and_charges_once() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API_AND_SCHEDULER, |_| {}).await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(200, 200), "a.jpg").await;
    let (before, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();

    // A slow worker takes the task …
    let mut doomed = spawn_worker(&app, 60_000);
    let t = Instant::now();
    let output = loop {
        let o = app
            .store
            .latest_outputs(&job)
            .await
            .expect("outputs")
            .remove(0);
        if o.status == OutputStatus::Running {
            break o;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the worker never started the task: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(output.attempt, 1);
    // … and dies with SIGKILL in the middle of it.
    doomed.kill().await.expect("SIGKILL");
    // Its presence record stays behind, and reads as gone after three
    // missed renewals.
    let dead = operator_sees_worker(&app, |w| w["alive"] == false).await;
    assert!(
        dead["seen_seconds_ago"].as_f64().unwrap_or(0.0) > 3.0,
        "{dead}"
    );

    // A healthy worker finishes the job once the lease of the dead one runs out.
    let _healthy = spawn_worker(&app, 0);
    let st = app.wait_for_job(&job, Duration::from_secs(60)).await;
    assert_eq!(st["status"], "completed", "{st}");
    let o = app
        .store
        .latest_outputs(&job)
        .await
        .expect("outputs")
        .remove(0);
    assert_eq!(
        o.attempt, 2,
        "the killed attempt was reclaimed and run again"
    );
    let charges: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM credit_ledger WHERE output_id = $1 AND kind = 'charge'",
    )
    .bind(o.id)
    .fetch_one(app.store.pool())
    .await
    .expect("count");
    assert_eq!(charges, 1, "charged exactly once");
    assert_eq!(app.balance(&app.key).await, (before - 3.0, 0.0));
    let completed_notes = app
        .store
        .notifications(&app.dev_account_id().await, 0, 600_000)
        .await
        .expect("notes")
        .into_iter()
        .filter(|n| n.name == "image_result" && n.data["status"] == "completed")
        .count();
    assert_eq!(completed_notes, 1, "notified as completed once");
    app.audit_clean().await;
    app.stop().await;
}

/// A TCP proxy the test can cut and restore, between the app and Postgres.
struct Proxy {
    port: u16,
    target: String,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: &str) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let p = Proxy {
            port,
            target: target.to_string(),
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        p.serve(l);
        p
    }

    fn serve(&self, l: TcpListener) {
        let (target, tasks) = (self.target.clone(), self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                let target = target.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                tasks.lock().expect("lock").push(conn);
            }
        });
        self.tasks.lock().expect("lock").push(accept);
    }

    /// Drops every connection and stops listening.
    fn cut(&self) {
        for t in self.tasks.lock().expect("lock").drain(..) {
            t.abort();
        }
    }

    async fn restore(&self) {
        let l = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("rebind");
        self.serve(l);
    }
}

#[tokio::test]
async fn database_outage_is_a_503_and_recovers_by_itself() {
    let url = create_postgres_database().await;
    let after_host = url
        .split_once("@")
        .map(|(_, r)| r.to_string())
        .expect("url has a host");
    let (hostport, dbname) = after_host.split_once('/').expect("url has a database");
    let proxy = Proxy::start(hostport).await;
    let proxied = url.replace(hostport, &format!("127.0.0.1:{}", proxy.port));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path(), proxied);
    let app = TestApp::start(cfg, Roles::API, dir).await;
    assert!(!dbname.is_empty());
    let p = app.project("p").await;
    assert_eq!(app.get("/project").await.0, StatusCode::OK);

    proxy.cut();
    let (s, v, h) = app
        .call(reqwest::Method::GET, "/project", Some(&app.key), None)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(h.contains_key("retry-after"));
    assert_eq!(v["code"], "unavailable");
    let (s, _) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": ["x"], "instructions": [{"style": "free"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);

    proxy.restore().await;
    let t = Instant::now();
    loop {
        if app.get("/project").await.0 == StatusCode::OK {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the API did not recover"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (s, v) = app.get(&format!("/project/{p}")).await;
    assert_eq!(s, StatusCode::OK, "data survived: {v}");
    app.stop().await;
}

#[tokio::test]
async fn storage_failures_are_retried_with_backoff_then_succeed() {
    // A backoff long enough for the test to repair storage between attempts.
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        c.scheduler.retry.base_ms = 1500;
        c.scheduler.retry.cap_ms = 3000;
    })
    .await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(120, 120), "a.jpg").await;
    // Break result uploads: a plain file where the results directory must go.
    let objects = app.cfg.data_dir.join("objects");
    let blocker = objects.join("results");
    std::fs::write(&blocker, b"not a directory").expect("block results/");
    let (before, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let failed_once = app
        .wait_for_failed_attempt(&job, Duration::from_secs(30))
        .await;
    assert!(
        failed_once
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("object store unavailable")),
        "{failed_once:?}"
    );
    assert_ne!(
        failed_once.status,
        OutputStatus::Failed,
        "a storage outage is retryable"
    );
    // Storage comes back; the next attempt succeeds.
    std::fs::remove_file(&blocker).expect("unblock");
    let st = app.wait_for_job(&job, Duration::from_secs(30)).await;
    assert_eq!(st["status"], "completed", "{st}");
    let o = app
        .store
        .latest_outputs(&job)
        .await
        .expect("outputs")
        .remove(0);
    assert!(o.attempt >= 2, "{o:?}");
    assert_eq!(
        app.balance(&app.key).await,
        (before - 3.0, 0.0),
        "charged once despite the retries"
    );
    app.audit_clean().await;
    app.stop().await;
}

/// Runs `rabbitmqctl <args>` against the broker the tests share.
fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl (Debian's rabbitmq-server package) is installed");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the broker's application again, even when the test fails.
struct BrokerRestart;

impl Drop for BrokerRestart {
    fn drop(&mut self) {
        rabbitmqctl(&["start_app"]);
    }
}

/// RabbitMQ restarted (`rabbitmqctl stop_app`, then `start_app`: every
/// connection drops, queues recover from disk) in the middle of a batch on
/// PostgreSQL + RabbitMQ: the API keeps answering 202 (admission commits to
/// the outbox, it never publishes), every accepted output completes once,
/// and the ledger balances.
#[tokio::test]
async fn a_broker_restart_mid_batch_loses_nothing_and_charges_once() {
    let _broker = broker_lock().await;
    let app = TestApp::with(Dialect::Postgres, Roles::ALL, |c| {
        with_rabbitmq(c);
        c.worker.fault_delay_ms = 150;
    })
    .await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(120, 160), "a.jpg").await;
    let (before, _) = app.balance(&app.key).await;
    let body = json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout", "num_variations": 4}]});
    let submit = |body: serde_json::Value| {
        let app = &app;
        async move {
            let (s, v) = app.post("/create-packshot", body).await;
            assert_eq!(s, StatusCode::ACCEPTED, "{v}");
            v["job_id"].as_str().expect("job").to_string()
        }
    };

    let first = submit(body.clone()).await;
    // Let the batch get going, then take the broker away.
    let t = Instant::now();
    while app
        .store
        .job(&first)
        .await
        .expect("read")
        .expect("job")
        .status
        == atelier_shared::domain::JobStatus::Pending
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the first job never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rabbitmqctl(&["stop_app"]);
    let restart = BrokerRestart;
    let second = submit(body.clone()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(restart);

    for job in [&first, &second] {
        let st = app.wait_for_job(job, Duration::from_secs(120)).await;
        assert_eq!(st["status"], "completed", "{st}");
        assert_eq!(st["processed_images"], 4, "{st}");
    }
    assert_eq!(
        app.balance(&app.key).await,
        (before - 24.0, 0.0),
        "8 outputs × 3 credits, each charged once"
    );
    app.audit_clean().await;
    app.stop().await;
}

/// S3 unreachable for a while (every connection to it cut, through a TCP
/// proxy) on PostgreSQL + RabbitMQ + S3: admission does not need it (202),
/// the worker's attempts fail as retryable, and once S3 is back the next
/// attempt succeeds; charged once.
#[tokio::test]
async fn an_s3_outage_is_retried_until_it_ends() {
    let _broker = broker_lock().await;
    let bucket = s3_bucket().await;
    let endpoint = std::env::var("ATELIER_TEST_S3_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:9019".into());
    let hostport = endpoint.trim_start_matches("http://").to_string();
    let proxy = Proxy::start(&hostport).await;
    let app = TestApp::with(Dialect::Postgres, Roles::ALL, |c| {
        with_rabbitmq(c);
        with_s3(c, &bucket);
        c.storage.s3_endpoint = Some(format!("http://127.0.0.1:{}", proxy.port));
        // Time to restore S3 between attempts.
        c.scheduler.retry.base_ms = 1500;
        c.scheduler.retry.cap_ms = 3000;
    })
    .await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(120, 120), "a.jpg").await;
    let (before, _) = app.balance(&app.key).await;

    proxy.cut();
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let failed_once = app
        .wait_for_failed_attempt(&job, Duration::from_secs(60))
        .await;
    assert!(
        failed_once
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("object store unavailable")),
        "{failed_once:?}"
    );
    assert_ne!(
        failed_once.status,
        OutputStatus::Failed,
        "an S3 outage is retryable"
    );

    proxy.restore().await;
    let st = app.wait_for_job(&job, Duration::from_secs(60)).await;
    assert_eq!(st["status"], "completed", "{st}");
    assert!(
        app.store.latest_outputs(&job).await.expect("outputs")[0].attempt >= 2,
        "it took another attempt"
    );
    assert_eq!(app.balance(&app.key).await, (before - 3.0, 0.0));
    app.audit_clean().await;
    app.stop().await;
}

/// PostgreSQL unreachable in the middle of a batch (every connection cut,
/// through a TCP proxy) with every role running on it and RabbitMQ: the API
/// answers 503 meanwhile, no role dies, and once the database is back the
/// batch finishes with each output charged once.
#[tokio::test]
async fn a_database_outage_mid_batch_is_survived_by_every_role() {
    let _broker = broker_lock().await;
    let url = create_postgres_database().await;
    let hostport = url
        .split_once('@')
        .and_then(|(_, r)| r.split_once('/'))
        .map(|(h, _)| h.to_string())
        .expect("url has a host");
    let proxy = Proxy::start(&hostport).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = test_config(
        dir.path(),
        url.replace(&hostport, &format!("127.0.0.1:{}", proxy.port)),
    );
    with_rabbitmq(&mut cfg);
    cfg.worker.fault_delay_ms = 200;
    let app = TestApp::start(cfg, Roles::ALL, dir).await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(120, 160), "a.jpg").await;
    let (before, _) = app.balance(&app.key).await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout", "num_variations": 6}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let t = Instant::now();
    while app
        .store
        .job(&job)
        .await
        .expect("read")
        .expect("job")
        .completed_outputs
        < 1
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the batch never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    proxy.cut();
    let (s, _, h) = app
        .call(reqwest::Method::GET, "/project", Some(&app.key), None)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.contains_key("retry-after"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore().await;

    let st = app.wait_for_job(&job, Duration::from_secs(90)).await;
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["processed_images"], 6, "{st}");
    assert_eq!(app.balance(&app.key).await, (before - 18.0, 0.0));
    app.audit_clean().await;
    app.stop().await;
}

/// SIGTERM to a worker in the middle of a task: it stops taking work,
/// finishes the task it holds within the grace period, reports it and exits
/// cleanly; the output completes on its first attempt (nothing reclaimed).
#[tokio::test]
async fn a_worker_stopped_with_sigterm_finishes_its_task_then_exits() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API_AND_SCHEDULER, |_| {}).await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(120, 120), "a.jpg").await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let mut worker = spawn_worker(&app, 2_500);
    let t = Instant::now();
    while app.store.latest_outputs(&job).await.expect("outputs")[0].status != OutputStatus::Running
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the worker never started the task"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The operator view shows the worker alive, busy with the task.
    let seen = operator_sees_worker(&app, |w| w["in_flight"] == 1).await;
    assert_eq!(seen["alive"], true, "{seen}");
    assert_eq!(seen["slots"], 1, "{seen}");
    assert_eq!(seen["device"], "cpu", "{seen}");
    assert!(
        seen["queues"]
            .as_array()
            .is_some_and(|q| q.iter().any(|q| q == "packshot")),
        "{seen}"
    );
    let pid = worker.id().expect("pid").to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(term.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker exits within its grace period")
        .expect("wait");
    assert!(exit.success(), "clean exit: {exit:?}");
    // A worker that stopped cleanly withdrew its presence record.
    let (s, o) = app.get("/admin/overview").await;
    assert_eq!(s, StatusCode::OK, "{o}");
    assert_eq!(o["workers"], json!([]), "{o}");
    // Its outcome was published before it exited; the scheduler settles it.
    let st = app.wait_for_job(&job, Duration::from_secs(20)).await;
    assert_eq!(st["status"], "completed", "{st}");
    let o = app
        .store
        .latest_outputs(&job)
        .await
        .expect("outputs")
        .remove(0);
    assert_eq!((o.status, o.attempt), (OutputStatus::Completed, 1), "{o:?}");
    app.audit_clean().await;
    app.stop().await;
}
