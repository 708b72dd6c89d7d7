//! `TestApp`: a started Atelier with typed helpers.

#![allow(dead_code)]

use atelier::app::{self, Roles};
use atelier_shared::config::Config;
use atelier_shared::db::accounts::NewAccount;
use atelier_shared::db::testing::create_postgres_database;
use atelier_shared::db::{Dialect, Store};
use atelier_shared::domain::Credits;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const DEV_KEY: &str = "atl_test_bootstrap_key_0123456789abcdefghijklmnop";

pub struct TestApp {
    pub base: String,
    /// The operations listener's base URL, when `server.admin_listen` is set.
    pub admin: Option<String>,
    pub key: String,
    pub http: reqwest::Client,
    pub store: Store,
    pub services: atelier::app::Services,
    pub cfg: Config,
    pub shutdown: CancellationToken,
    pub dir: tempfile::TempDir,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The models installed by scripts/fetch-models in this checkout.
pub fn with_models(c: &mut Config) {
    c.models.dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    c.models.onnxruntime_lib = None;
    c.models.required = true;
}

/// Tests that use RabbitMQ take this first: the broker drill restarts the
/// one broker they share.
pub async fn broker_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// RabbitMQ (`scripts/test` starts it) under a namespace of this test's own.
pub fn with_rabbitmq(c: &mut Config) {
    c.queue.url = std::env::var("ATELIER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    c.queue.namespace = format!("t{}.", ulid::Ulid::new().to_string().to_lowercase());
}

/// A fresh bucket on the S3-compatible server `scripts/test` starts (s3s-fs);
/// `with_s3` points a configuration at it.
pub async fn s3_bucket() -> String {
    let bucket = format!(
        "atelier-it-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let (endpoint, access_key, secret_key) = s3_env();
    atelier_shared::storage::s3::S3Store::new(atelier_shared::storage::s3::S3Options {
        endpoint: Some(endpoint),
        region: "us-east-1".into(),
        bucket: bucket.clone(),
        prefix: String::new(),
        access_key,
        secret_key,
        path_style: true,
        create_bucket: true,
    })
    .await
    .expect("the S3 test server is up (scripts/test starts s3s-fs)");
    bucket
}

fn s3_env() -> (String, String, String) {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    (
        var("ATELIER_TEST_S3_ENDPOINT", "http://127.0.0.1:9019"),
        var("ATELIER_TEST_S3_ACCESS_KEY", "atelier-test"),
        var("ATELIER_TEST_S3_SECRET_KEY", "atelier-test-secret"),
    )
}

pub fn with_s3(c: &mut Config, bucket: &str) {
    let (endpoint, access_key, secret_key) = s3_env();
    c.storage.url = Some(format!("s3://{bucket}/objects"));
    c.storage.s3_endpoint = Some(endpoint);
    c.storage.s3_region = Some("us-east-1".into());
    c.storage.s3_access_key = Some(access_key);
    c.storage.s3_secret_key = Some(secret_key);
    c.storage.s3_path_style = true;
}

/// Starts `atelier <role>` as a child process on the app's database, queue
/// and object store, with the test timings (1 s heartbeats, 3 s leases).
pub fn spawn_role(app: &TestApp, role: &str, fault_delay_ms: u64) -> tokio::process::Child {
    spawn_role_command(app, role, fault_delay_ms)
        .spawn()
        .expect("atelier child process starts")
}

/// The command `spawn_role` runs, for a test to add to its environment.
pub fn spawn_role_command(
    app: &TestApp,
    role: &str,
    fault_delay_ms: u64,
) -> tokio::process::Command {
    let c = &app.cfg;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_atelier"));
    cmd.arg(role)
        .env("ATELIER_SERVER__LISTEN", "127.0.0.1:0")
        .env("ATELIER_DATA_DIR", c.data_dir.as_os_str())
        .env("ATELIER_QUEUE__URL", &c.queue.url)
        .env("ATELIER_QUEUE__NAMESPACE", &c.queue.namespace)
        .env("ATELIER_STORAGE__URL", c.storage_url())
        .env(
            "ATELIER_STORAGE__S3_PATH_STYLE",
            c.storage.s3_path_style.to_string(),
        )
        .env("ATELIER_MODELS__DIR", &c.models.dir)
        .env("ATELIER_MODELS__AUTO_FETCH", "false")
        .env("ATELIER_BOOTSTRAP__ENABLED", "false")
        .env("ATELIER_WORKER__HEARTBEAT_SECS", "1")
        .env("ATELIER_WORKER__PRESENCE_SECS", "1")
        .env("ATELIER_WORKER__CONCURRENCY", "1")
        .env(
            "ATELIER_SCHEDULER__TICK_MS",
            c.scheduler.tick_ms.to_string(),
        )
        // 0 = the default (twice the worker concurrency).
        .env(
            "ATELIER_SCHEDULER__QUEUE_TARGET",
            c.scheduler.queue_target.to_string(),
        )
        .env("ATELIER_SCHEDULER__RUNNING_LEASE_SECS", "3")
        // A scheduler killed between claiming and publishing leaves its
        // claim to this lease: short, so drills do not wait the default 600 s.
        .env("ATELIER_SCHEDULER__DISPATCH_LEASE_SECS", "10")
        .env("ATELIER_WORKER__FAULT_DELAY_MS", fault_delay_ms.to_string())
        .env(
            "ATELIER_LIMITS__TAG_UPLOADS",
            c.limits.tag_uploads.to_string(),
        )
        .env("ATELIER_LOG__LEVEL", "warn")
        .env_remove("ATELIER_DATABASE__URL")
        .kill_on_drop(true);
    // Workers on a broker get no database credentials (DESIGN.md, flow
    // step 3); on the embedded queue the queue lives in the database.
    if role != "worker" || c.queue.url == "embedded" {
        cmd.env("ATELIER_DATABASE__URL", c.database_url());
    }
    for (k, v) in [
        ("ATELIER_STORAGE__S3_ENDPOINT", &c.storage.s3_endpoint),
        ("ATELIER_STORAGE__S3_REGION", &c.storage.s3_region),
        ("ATELIER_STORAGE__S3_ACCESS_KEY", &c.storage.s3_access_key),
        ("ATELIER_STORAGE__S3_SECRET_KEY", &c.storage.s3_secret_key),
    ] {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    cmd
}

/// A configuration for tests: port 0, fast ticks, short leases.
pub fn test_config(dir: &std::path::Path, database_url: String) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".into();
    c.data_dir = dir.to_path_buf();
    c.database.url = Some(database_url);
    c.bootstrap.api_key = Some(DEV_KEY.into());
    // Model-free engine by default (fast); tests of the real pipeline point
    // models.dir at the fetched models with `with_models`.
    c.models.dir = dir.join("no-models");
    c.models.auto_fetch = false;
    c.worker.concurrency = 2;
    c.worker.heartbeat_secs = 1;
    c.scheduler.tick_ms = 100;
    c.scheduler.running_lease_secs = 3;
    c.scheduler.retry.base_ms = 100;
    c.scheduler.retry.cap_ms = 400;
    // Tagging puts a quiet output per upload on the identity queue; the
    // tests that count outputs or hold worker slots leave it off, the
    // tagging tests turn it on (and `atelier serve` in the console test
    // and the fuzzer runs with it, the default).
    c.limits.tag_uploads = false;
    c
}

pub async fn database_url(dialect: Dialect, dir: &std::path::Path) -> String {
    match dialect {
        Dialect::Sqlite => format!("sqlite://{}?mode=rwc", dir.join("atelier.db").display()),
        Dialect::Postgres => create_postgres_database().await,
    }
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::with(Dialect::Sqlite, Roles::ALL, |_| {}).await
    }

    pub async fn with(dialect: Dialect, roles: Roles, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = test_config(dir.path(), database_url(dialect, dir.path()).await);
        tweak(&mut cfg);
        Self::start(cfg, roles, dir).await
    }

    pub async fn start(cfg: Config, roles: Roles, dir: tempfile::TempDir) -> TestApp {
        let shutdown = CancellationToken::new();
        let running = app::start(cfg.clone(), roles, shutdown.clone())
            .await
            .expect("app starts");
        let base = format!("http://{}", running.addr);
        let admin = running.admin_addr.map(|a| format!("http://{a}"));
        let store = running
            .services
            .store
            .clone()
            .expect("the API role has the database");
        let services = running.services.clone();
        let mut cfg = cfg;
        cfg.server.public_url = base.clone();
        let handle = tokio::spawn(running.wait());
        TestApp {
            base,
            admin,
            key: DEV_KEY.into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            store,
            services,
            cfg,
            shutdown,
            dir,
            handle: Some(handle),
        }
    }

    /// Stops every role and waits for them.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("joins").expect("roles stop cleanly");
        }
        self.dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// GETs an absolute (signed) URL without credentials; the body's bytes.
    pub async fn fetch(&self, url: &serde_json::Value) -> bytes::Bytes {
        let url = url.as_str().expect("a URL string");
        let r = self.http.get(url).send().await.expect("get");
        assert!(r.status().is_success(), "GET {url}: {}", r.status());
        r.bytes().await.expect("body")
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut r = self.http.request(method, self.url(path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request sent");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v, headers)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (s, v, _) = self
            .call(reqwest::Method::GET, path, Some(&self.key), None)
            .await;
        (s, v)
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let (s, v, _) = self
            .call(reqwest::Method::POST, path, Some(&self.key), Some(body))
            .await;
        (s, v)
    }

    pub async fn post_as(&self, key: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let (s, v, _) = self
            .call(reqwest::Method::POST, path, Some(key), Some(body))
            .await;
        (s, v)
    }

    pub async fn put_as(&self, key: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let (s, v, _) = self
            .call(reqwest::Method::PUT, path, Some(key), Some(body))
            .await;
        (s, v)
    }

    pub async fn delete_as(&self, key: &str, path: &str) -> (StatusCode, Value) {
        let (s, v, _) = self
            .call(reqwest::Method::DELETE, path, Some(key), None)
            .await;
        (s, v)
    }

    pub async fn get_as(&self, key: &str, path: &str) -> (StatusCode, Value) {
        let (s, v, _) = self.call(reqwest::Method::GET, path, Some(key), None).await;
        (s, v)
    }

    /// A second account with `credits`, returning its API key.
    pub async fn account(&self, name: &str, credits: f64) -> String {
        let a = self
            .store
            .create_account(NewAccount {
                name,
                plan: atelier_shared::domain::Plan::Standard,
                max_size: "4K",
                custom_dimensions: false,
                is_operator: false,
            })
            .await
            .expect("account");
        if credits > 0.0 {
            self.store
                .grant_credits(&a.id, Credits::from_f64(credits).expect("amount"), "test")
                .await
                .expect("grant");
        }
        self.store
            .create_api_key(&a.id, "test", None, None)
            .await
            .expect("key")
            .1
    }

    pub async fn dev_account_id(&self) -> String {
        self.store
            .account_for_token(&self.key)
            .await
            .expect("lookup")
            .expect("dev account")
            .id
    }

    pub async fn project(&self, name: &str) -> String {
        let (s, v) = self.post("/project", json!({"project_name": name})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["project_id"].as_str().expect("project_id").to_string()
    }

    /// Uploads through the signed URL, returning the file id.
    pub async fn upload_as(&self, key: &str, bytes: Vec<u8>, filename: &str) -> String {
        let (s, v) = self
            .post_as(key, "/upload", json!({"filename": filename}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let put = self
            .http
            .put(v["upload_url"].as_str().expect("upload_url"))
            .header(
                "content-type",
                v["content_type"].as_str().expect("content_type"),
            )
            .body(bytes)
            .send()
            .await
            .expect("put");
        assert_eq!(
            put.status(),
            StatusCode::OK,
            "{}",
            put.text().await.unwrap_or_default()
        );
        v["file_id"].as_str().expect("file_id").to_string()
    }

    pub async fn upload(&self, bytes: Vec<u8>, filename: &str) -> String {
        let key = self.key.clone();
        self.upload_as(&key, bytes, filename).await
    }

    /// POSTs a `multipart/form-data` body: one file part and text parts.
    pub async fn post_form(
        &self,
        path: &str,
        file: (&str, &str, &[u8]),
        text: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let key = self.key.clone();
        self.post_form_as(&key, path, file, text).await
    }

    /// [`TestApp::post_form`] with another account's key.
    pub async fn post_form_as(
        &self,
        key: &str,
        path: &str,
        file: (&str, &str, &[u8]),
        text: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let boundary = format!("atelier-test-{}", ulid::Ulid::new());
        let mut body = Vec::new();
        let (field, filename, bytes) = file;
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
        for (name, value) in text {
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
            );
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(key)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
            .await
            .expect("post form");
        let status = r.status();
        let text = r.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    pub async fn balance(&self, key: &str) -> (f64, f64) {
        let (s, v) = self.get_as(key, "/billing/balance").await;
        assert_eq!(s, StatusCode::OK, "{v}");
        (
            v["user_credits"].as_f64().expect("user"),
            v["in_progress_credits"].as_f64().expect("reserved"),
        )
    }

    /// Polls the job until it is terminal.
    pub async fn wait_for_job(&self, job_id: &str, within: Duration) -> Value {
        self.wait_for_job_as(&self.key, job_id, within).await
    }

    /// [`TestApp::wait_for_job`] for a job of the account of `key`.
    pub async fn wait_for_job_as(&self, key: &str, job_id: &str, within: Duration) -> Value {
        let t = Instant::now();
        loop {
            let (s, v) = self.get_as(key, &format!("/jobs/{job_id}/status")).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            if matches!(
                v["status"].as_str(),
                Some("completed" | "failed" | "aborted")
            ) {
                return v;
            }
            assert!(
                t.elapsed() < within,
                "job {job_id} not terminal after {within:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the first failed attempt of `job`'s first output to be
    /// recorded (`last_error` set) and returns the output as it then is.
    pub async fn wait_for_failed_attempt(
        &self,
        job: &str,
        within: Duration,
    ) -> atelier_shared::db::rows::OutputRow {
        let t = Instant::now();
        loop {
            let o = self
                .store
                .latest_outputs(job)
                .await
                .expect("outputs")
                .remove(0);
            if o.last_error.is_some() {
                return o;
            }
            assert!(t.elapsed() < within, "no failed attempt recorded: {o:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn audit_clean(&self) {
        let problems = self.store.audit_credits().await.expect("audit");
        assert!(
            problems.is_empty(),
            "credit invariants broken: {problems:#?}"
        );
    }
}

/// A JPEG "garment": a dark shape on a light background.
pub fn garment_jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let inside = x > w / 4 && x < 3 * w / 4 && y > h / 6 && y < 5 * h / 6;
        if inside {
            image::Rgb([30, 60, 160])
        } else {
            image::Rgb([235, 235, 235])
        }
    });
    let mut b = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Jpeg)
        .expect("encode");
    b
}

pub fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 120, 40]));
    let mut b = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
        .expect("encode");
    b
}

pub fn packshot_body(project: &str, files: &[&str]) -> Value {
    json!({
        "project_id": project,
        "images": files,
        "instructions": [
            {"style": "white_cutout", "num_variations": 2},
            {"style": "flat_lay", "num_variations": 2, "options": {"size": "2K", "format": "png"}}
        ]
    })
}

/// A fixture predictor (or trainer) of `tests/fixtures/cog/<name>` served
/// by the real Cog runtime from PyPI (the venv `scripts/test` installs), on
/// a free port of 127.0.0.1. Killed when dropped.
pub struct CogFixture {
    pub url: String,
    name: String,
    port: u16,
    train: bool,
    /// Where fixtures that notice cancellations record them.
    cancel_log: std::path::PathBuf,
    /// Where trainer fixtures record the trainings they start and finish.
    events_log: std::path::PathBuf,
    _dir: tempfile::TempDir,
    child: Option<tokio::process::Child>,
}

impl CogFixture {
    pub async fn start(name: &str) -> CogFixture {
        Self::launch(name, false).await
    }

    /// A trainer fixture (`--x-mode train`, `train.py:train`).
    pub async fn trainer(name: &str) -> CogFixture {
        Self::launch(name, true).await
    }

    async fn launch(name: &str, train: bool) -> CogFixture {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("addr")
            .port();
        let scratch = tempfile::tempdir().expect("dir");
        let mut f = CogFixture {
            url: format!("http://127.0.0.1:{port}"),
            name: name.to_string(),
            port,
            train,
            cancel_log: scratch.path().join("cancelled.log"),
            events_log: scratch.path().join("events.log"),
            _dir: scratch,
            child: None,
        };
        f.respawn();
        f
    }

    /// Starts the runtime (again, on the same port).
    pub fn respawn(&mut self) {
        let venv = std::env::var("ATELIER_TEST_COG_VENV").unwrap_or_else(|_| {
            format!(
                "{}/.cache/atelier/cog-venv",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        let python = std::path::Path::new(&venv).join("bin/python");
        assert!(
            python.exists(),
            "no Cog runtime at {venv}: scripts/test installs it (ATELIER_TEST_COG_VENV)"
        );
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/cog")
            .join(&self.name);
        let path = format!("{}/bin:{}", venv, std::env::var("PATH").unwrap_or_default());
        let mut cmd = tokio::process::Command::new(&python);
        cmd.args(["-m", "cog.server.http", "--host", "127.0.0.1"]);
        if self.train {
            cmd.args(["--x-mode", "train"])
                .env("COG_TRAIN_TYPE_STUB", "train.py:train");
        } else {
            cmd.env("COG_PREDICT_TYPE_STUB", "predict.py:Predictor");
        }
        let child = cmd
            .current_dir(&dir)
            .env("PORT", self.port.to_string())
            .env("FIXTURE_CANCEL_LOG", &self.cancel_log)
            .env("FIXTURE_EVENTS_LOG", &self.events_log)
            .env(
                "FIXTURE_FACES",
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/testdata"),
            )
            .env("PATH", path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .expect("the Cog runtime starts");
        self.child = Some(child);
    }

    /// Kills the runtime and everything it started (SIGKILL to its
    /// process group: the server and its worker subprocess).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Its own process group (`process_group(0)` at spawn): the
            // group id is its pid. Spelled `-s KILL -- -<pgid>`: procps'
            // `kill -9 -<pgid>` reads the `-9` as process group 9.
            if let Some(pid) = c.id().filter(|p| *p > 1) {
                let _ = std::process::Command::new("kill")
                    .args(["-s", "KILL", "--", &format!("-{pid}")])
                    .status();
            }
            let _ = c.kill().await;
            let _ = c.wait().await;
        }
    }

    /// Waits until the runtime answers READY.
    pub async fn ready(&self, within: Duration) {
        let until = Instant::now() + within;
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{}/health-check", self.url)).send().await {
                if let Ok(v) = r.json::<Value>().await {
                    if v["status"] == "READY" {
                        return;
                    }
                }
            }
            assert!(Instant::now() < until, "{} is not READY", self.url);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The lines the fixture wrote for the predictions it saw cancelled.
    pub fn cancelled(&self) -> Vec<String> {
        read_lines(&self.cancel_log)
    }

    /// The lines a trainer fixture wrote (`start <word>`, `done <word>`).
    pub fn events(&self) -> Vec<String> {
        read_lines(&self.events_log)
    }
}

fn read_lines(p: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}
