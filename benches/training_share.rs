//! How trainer time is shared between accounts. `cargo bench --bench
//! training_share`.
//!
//! `ACCOUNTS` accounts each start `PER_ACCOUNT` trainings at once, one
//! account after the other (the first account's burst is the oldest), on
//! `SLOTS` trainer containers (the fixture trainer of
//! tests/fixtures/cog/trainer under the real Cog runtime, each training
//! about the same length). Figures, from the database's own timestamps:
//! each account's share of the slot time, when each account's first
//! training started (its wait), and when its last one ended. Under a
//! first-come order the last account would wait for every training of the
//! others; under the fair pick every account gets a trainer within about
//! one round.
//!
//! Needs the Cog runtime `scripts/test` installs (ATELIER_TEST_COG_VENV,
//! default ~/.cache/atelier/cog-venv). Sizes: ATELIER_BENCH_ACCOUNTS (5),
//! ATELIER_BENCH_PER_ACCOUNT (4), ATELIER_BENCH_SLOTS (2),
//! ATELIER_BENCH_STEP_SECONDS (0.01: 300 steps per training).

use atelier::app::{self, Roles};
use atelier_shared::config::{CogInput, Config};
use atelier_shared::db::accounts::NewAccount;
use atelier_shared::domain::Credits;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn png(rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(32, 32, image::Rgb(rgb));
    let mut b = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
        .expect("encode");
    b
}

/// One fixture trainer under the real Cog runtime; killed on drop.
fn trainer(port: u16) -> anyhow::Result<tokio::process::Child> {
    let venv = std::env::var("ATELIER_TEST_COG_VENV").unwrap_or_else(|_| {
        format!(
            "{}/.cache/atelier/cog-venv",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cog/trainer");
    Ok(
        tokio::process::Command::new(format!("{venv}/bin/python"))
            .args(["-m", "cog.server.http", "--host", "127.0.0.1", "--x-mode", "train"])
            .current_dir(dir)
            .env("PORT", port.to_string())
            .env("COG_TRAIN_TYPE_STUB", "train.py:train")
            .env("PATH", format!("{venv}/bin:{}", std::env::var("PATH").unwrap_or_default()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?,
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let accounts: usize = env("ATELIER_BENCH_ACCOUNTS", 5);
    let per_account: usize = env("ATELIER_BENCH_PER_ACCOUNT", 4);
    let slots: usize = env("ATELIER_BENCH_SLOTS", 2);
    let step: f64 = env("ATELIER_BENCH_STEP_SECONDS", 0.01);
    let mut trainers = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..slots {
        let port = free_port();
        trainers.push(trainer(port)?);
        urls.push(format!("http://127.0.0.1:{port}"));
    }
    let dir = tempfile::tempdir()?;
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.data_dir = dir.path().to_path_buf();
    cfg.database.url = Some(format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("atelier.db").display()
    ));
    cfg.bootstrap.enabled = false;
    cfg.limits.create_per_minute = 1_000_000;
    cfg.limits.requests_per_minute = 1_000_000;
    cfg.models.auto_fetch = false;
    cfg.models.dir = dir.path().join("no-models");
    cfg.worker.concurrency = slots;
    cfg.scheduler.tick_ms = 100;
    cfg.log.level = "warn".into();
    cfg.training.containers = urls;
    cfg.training.fleet_slots = u32::try_from(slots)?;
    cfg.training.parallel_per_account = u32::try_from(per_account)?;
    cfg.training.relaunch_cooldown_secs = 0;
    cfg.training.poll_ms = 100;
    cfg.training.startup_secs = 60;
    cfg.training.inputs = [
        ("input_images", CogInput::Field("dataset_url".into())),
        ("trigger_word", CogInput::Field("trigger_word".into())),
        ("max_train_steps", CogInput::Field("max_train_steps".into())),
        ("step_seconds", CogInput::Constant(json!(step))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let shutdown = CancellationToken::new();
    let running = app::start(cfg.clone(), Roles::ALL, shutdown.clone()).await?;
    let store = running.services.store.clone().expect("the API role's store");
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();

    // Accounts, their models and training images, before any training.
    let mut keys = Vec::new();
    for a in 0..accounts {
        let name = format!("account-{}", (b'A' + a as u8) as char);
        let acc = store
            .create_account(NewAccount {
                name: &name,
                plan: atelier_shared::domain::Plan::Standard,
                max_size: "4K",
                custom_dimensions: false,
                is_operator: false,
            })
            .await?;
        store
            .grant_credits(&acc.id, Credits::whole(10_000), "bench")
            .await?;
        let key = store.create_api_key(&acc.id, "bench", None, None).await?.1;
        let mut models = Vec::new();
        for m in 0..per_account {
            let v: Value = http
                .post(format!("{base}/v1/custom-models"))
                .header("x-api-key", &key)
                .json(&json!({"displayName": format!("{name} model {m}")}))
                .send()
                .await?
                .json()
                .await?;
            let id = v["id"].as_str().expect("model id").to_string();
            for i in 0..5u8 {
                let r = http
                    .post(format!("{base}/v1/custom-models/{id}/data"))
                    .header("x-api-key", &key)
                    .header("content-type", "image/png")
                    .body(png([40 * i, 200 - 30 * i, 90]))
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "upload: {}", r.status());
            }
            models.push(id);
        }
        keys.push((name, acc.id, key, models));
    }

    // Each account's burst, one after the other.
    let t0 = Instant::now();
    let start_ms = atelier_shared::time::now_ms();
    for (name, _, key, models) in &keys {
        for id in models {
            let r = http
                .post(format!("{base}/v1/custom-models/{id}/trainings"))
                .header("x-api-key", key)
                .json(&json!({}))
                .send()
                .await?;
            anyhow::ensure!(r.status().as_u16() == 202, "{name}: start answered {}", r.status());
        }
    }
    let submitted = t0.elapsed();
    // Until every training has ended.
    let total = accounts * per_account;
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let mut ended = 0;
        for (_, acc, _, models) in &keys {
            for m in models {
                if let Some(t) = store.latest_training(acc, m).await? {
                    ended += usize::from(!t.is_open());
                }
            }
        }
        if ended == total {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "trainings did not end");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let wall = t0.elapsed();

    // Figures from the database's timestamps.
    let mut slot_ms: BTreeMap<String, i64> = BTreeMap::new();
    let mut first_start: BTreeMap<String, i64> = BTreeMap::new();
    let mut last_end: BTreeMap<String, i64> = BTreeMap::new();
    let mut submitted_at: BTreeMap<String, i64> = BTreeMap::new();
    let mut failed = 0;
    let mut durations = Vec::new();
    for (name, acc, _, models) in &keys {
        for m in models {
            let t = store.latest_training(acc, m).await?.expect("training");
            if t.status() != "succeeded" {
                failed += 1;
            }
            let (Some(st), Some(end)) = (t.started_at, t.finalized_at) else {
                continue;
            };
            *slot_ms.entry(name.clone()).or_default() += end - st;
            durations.push(end - st);
            let fs = first_start.entry(name.clone()).or_insert(st);
            *fs = (*fs).min(st);
            let le = last_end.entry(name.clone()).or_insert(end);
            *le = (*le).max(end);
            let sa = submitted_at.entry(name.clone()).or_insert(t.created_at);
            *sa = (*sa).min(t.created_at);
        }
    }
    let all: i64 = slot_ms.values().sum();
    durations.sort_unstable();
    let mean = all as f64 / durations.len().max(1) as f64 / 1000.0;
    println!(
        "training_share: {total} trainings ({accounts} accounts x {per_account}), {slots} trainer slots, \
         submitted in {:.2} s, all ended after {:.1} s, {failed} not succeeded; one training holds a slot {:.2} s on average",
        submitted.as_secs_f64(),
        wall.as_secs_f64(),
        mean
    );
    println!("account     share of slot time   waited for its first trainer   its last training ended at");
    for (name, _, _, _) in &keys {
        let share = slot_ms.get(name).copied().unwrap_or(0) as f64 / all.max(1) as f64;
        let wait = first_start.get(name).copied().unwrap_or(0) - submitted_at.get(name).copied().unwrap_or(0);
        let end = last_end.get(name).copied().unwrap_or(0) - start_ms;
        println!(
            "{name:<11} {:>17.1} %   {:>26.1} s   {:>25.1} s",
            share * 100.0,
            wait as f64 / 1000.0,
            end as f64 / 1000.0
        );
    }
    let first_come_wait = (accounts - 1) as f64 * per_account as f64 / slots as f64 * mean;
    println!(
        "under a first-come order the last account would wait about {first_come_wait:.1} s for its first trainer"
    );
    shutdown.cancel();
    running.wait().await?;
    drop(trainers);
    Ok(())
}
