//! The distributed deployment as separate processes: one API (in the test),
//! two schedulers and three workers as child processes, on PostgreSQL,
//! RabbitMQ and S3. The workers are given no database URL: they run every
//! job from what the task carries.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use atelier_shared::domain::JobStatus;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::process::Child;

/// Tasks the schedulers keep queued: about the fleet's capacity (3 workers × 1).
const QUEUE_TARGET: usize = 3;

async fn fleet() -> (TestApp, Vec<Child>, tokio::sync::MutexGuard<'static, ()>) {
    let broker = broker_lock().await;
    let bucket = s3_bucket().await;
    let app = TestApp::with(Dialect::Postgres, Roles::API, |c| {
        with_rabbitmq(c);
        with_s3(c, &bucket);
        c.scheduler.queue_target = QUEUE_TARGET;
    })
    .await;
    let mut children = Vec::new();
    for role in ["scheduler", "scheduler", "worker", "worker", "worker"] {
        children.push(spawn_role(&app, role, 0));
    }
    (app, children, broker)
}

/// A job of `outputs` white-cutout outputs (8 variations per instruction,
/// the contract's maximum; at most 10 instructions).
async fn submit(app: &TestApp, key: &str, outputs: usize) -> String {
    let (s, p) = app
        .post_as(
            key,
            "/project",
            json!({"project_name": format!("p{}", ulid::Ulid::new())}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    let f = app.upload_as(key, garment_jpeg(64, 64), "a.jpg").await;
    let instructions: Vec<Value> = (0..outputs.div_ceil(8))
        .map(|i| json!({"style": "white_cutout", "num_variations": (outputs - i * 8).min(8)}))
        .collect();
    let (s, v) = app
        .post_as(
            key,
            "/create-packshot",
            json!({"project_id": p["project_id"], "images": [f], "instructions": instructions}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["total_outputs"], outputs);
    v["job_id"].as_str().expect("job").to_string()
}

async fn wait_done(app: &TestApp, job: &str, within: Duration) -> atelier_shared::db::rows::JobRow {
    let t = Instant::now();
    loop {
        let j = app.store.job(job).await.expect("read").expect("job");
        if j.status.is_terminal() {
            return j;
        }
        assert!(
            t.elapsed() < within,
            "job {job} still {} after {within:?}",
            j.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn stop(app: &TestApp, children: Vec<Child>) {
    for mut c in children {
        assert!(
            c.try_wait().expect("child status").is_none(),
            "a child process died during the test"
        );
        c.kill().await.expect("kill");
    }
    // The workers ran with no database.url: had one opened a database
    // anyway, it would be the embedded default under the shared data_dir.
    assert!(
        !app.cfg.data_dir.join("atelier.db").exists(),
        "a process of the fleet opened the embedded default database"
    );
}

/// … and one of the two schedulers is killed (SIGKILL) mid-batch: the other
/// carries on, nothing is lost or charged twice.
#[tokio::test]
async fn two_schedulers_and_three_workers_complete_200_outputs_each_charged_once() {
    let (app, mut children, _broker) = fleet().await;
    let mut jobs = Vec::new();
    for i in 0..5 {
        let key = app.account(&format!("acct{i}"), 150.0).await;
        jobs.push((key.clone(), submit(&app, &key, 40).await));
    }
    let t = Instant::now();
    loop {
        let done: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM outputs WHERE status = 'completed'")
                .fetch_one(app.store.pool())
                .await
                .expect("count");
        if done >= 30 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the fleet is not progressing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The operator view sees the three workers (their presence records in
    // S3) and the broker's queues.
    let (s, o) = app.get("/admin/overview").await;
    assert_eq!(s, StatusCode::OK, "{o}");
    assert_eq!(o["queue_kind"], "rabbitmq", "{o}");
    let workers = o["workers"].as_array().expect("workers");
    assert_eq!(
        workers.iter().filter(|w| w["alive"] == true).count(),
        3,
        "{workers:?}"
    );
    let packshot = o["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == "packshot")
        .cloned()
        .expect("packshot");
    assert_eq!(packshot["workers_alive"], 3, "{packshot}");
    assert!(packshot["depth"].is_u64(), "the broker's depth: {packshot}");
    // One scheduler dispatches (it holds the duty); that one is killed.
    let pid_of = |holder: &str| -> u32 {
        holder
            .split('_')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("holder {holder:?}"))
    };
    let (holder, _) = app
        .store
        .duty_holder("dispatch")
        .await
        .expect("read")
        .expect("a scheduler holds the dispatch duty");
    let at = children
        .iter()
        .position(|c| c.id() == Some(pid_of(&holder)))
        .expect("the holder is one of the two schedulers");
    let mut scheduler = children.remove(at);
    scheduler
        .kill()
        .await
        .expect("SIGKILL the dispatching scheduler");
    for (key, job) in &jobs {
        let j = wait_done(&app, job, Duration::from_secs(240)).await;
        assert_eq!(
            (j.status, j.completed_outputs, j.failed_outputs),
            (JobStatus::Completed, 40, 0)
        );
        assert_eq!(
            app.balance(key).await,
            (150.0 - 120.0, 0.0),
            "40 × 3 credits"
        );
    }
    let (charges, charged_outputs): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT output_id) FROM credit_ledger WHERE kind = 'charge'",
    )
    .fetch_one(app.store.pool())
    .await
    .expect("ledger");
    assert_eq!(
        (charges, charged_outputs),
        (200, 200),
        "each output charged once"
    );
    let completions: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM notifications WHERE name = 'image_result' AND data LIKE '%\"completed\"%'",
    )
    .fetch_one(app.store.pool())
    .await
    .expect("notifications");
    assert_eq!(completions, 200, "each output recorded (and notified) once");
    // The other scheduler took the duty over.
    let (now_holder, _) = app
        .store
        .duty_holder("dispatch")
        .await
        .expect("read")
        .expect("held");
    assert_ne!(pid_of(&now_holder), pid_of(&holder), "the duty passed on");
    assert!(
        children.iter().any(|c| c.id() == Some(pid_of(&now_holder))),
        "held by the surviving scheduler: {now_holder}"
    );
    app.audit_clean().await;
    stop(&app, children).await;
    app.stop().await;
}

/// One account floods the fleet (240 outputs); another submits a single
/// output. The small job waits for what was already queued or running when
/// it arrived (at most ~2 × queue target + the fleet's slots, with two
/// schedulers topping up), not for the flood.
#[tokio::test]
async fn a_one_output_job_is_not_stuck_behind_another_accounts_flood() {
    let (app, children, _broker) = fleet().await;
    let flooder = app.account("flood", 1000.0).await;
    let small = app.account("small", 10.0).await;
    let floods = [
        submit(&app, &flooder, 80).await,
        submit(&app, &flooder, 80).await,
        submit(&app, &flooder, 80).await,
    ];
    // Let the flood occupy every queue slot and worker.
    let t = Instant::now();
    while app
        .store
        .job(&floods[0])
        .await
        .expect("read")
        .expect("job")
        .completed_outputs
        < 3
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the flood never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let arrived = atelier_shared::time::now_ms();
    let job = submit(&app, &small, 1).await;
    let done = wait_done(&app, &job, Duration::from_secs(120)).await;
    assert_eq!(done.status, JobStatus::Completed);
    let finished = done.finalized_at.expect("finalised");
    let overtaking: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM outputs o JOIN jobs j ON j.id = o.job_id \
         WHERE j.id IN ($1, $2, $3) AND o.status = 'completed' AND o.finalized_at > $4 AND o.finalized_at < $5",
    )
    .bind(&floods[0])
    .bind(&floods[1])
    .bind(&floods[2])
    .bind(arrived)
    .bind(finished)
    .fetch_one(app.store.pool())
    .await
    .expect("count");
    let bound = (2 * QUEUE_TARGET + 3 + 1) as i64;
    eprintln!(
        "fairness: {overtaking} flood outputs finished while the one-output job waited {} ms",
        finished - arrived
    );
    assert!(
        overtaking <= bound,
        "{overtaking} flood outputs finished while the one-output job waited (bound {bound})"
    );
    let left: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM outputs WHERE job_id IN ($1, $2, $3) AND status <> 'completed'",
    )
    .bind(&floods[0])
    .bind(&floods[1])
    .bind(&floods[2])
    .fetch_one(app.store.pool())
    .await
    .expect("count");
    assert!(
        left > 100,
        "the flood was still mostly waiting ({left} open)"
    );
    stop(&app, children).await;
    app.stop().await;
}
