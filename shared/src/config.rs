//! Configuration: [`Config::default`] is the embedded default (so `cargo run`
//! needs no file), then an optional TOML file (`--config`), then `ATELIER_*`
//! environment variables with `__` for nesting (`ATELIER_SERVER__LISTEN`),
//! then [`Config::validate`]. Key names are those of DESIGN.md's
//! "Configuration surface": operators' scripts rely on them.

use crate::domain::JobType;
use crate::domain::credits::PriceTable;
use crate::domain::engines::{EngineAvailability, KindEngines};
use crate::domain::packshot::{DesignCatalogue, EngineChoice};
use crate::domain::retry::RetryPolicy;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Config {
    pub server: ServerConfig,
    pub data_dir: PathBuf,
    pub database: DatabaseConfig,
    pub queue: QueueConfig,
    pub redis: RedisConfig,
    pub storage: StorageConfig,
    pub models: ModelsConfig,
    pub engines: EnginesConfig,
    pub bootstrap: BootstrapConfig,
    pub egress: EgressConfig,
    pub notifications: NotificationsConfig,
    pub webhooks: WebhooksConfig,
    pub worker: WorkerConfig,
    pub scheduler: SchedulerConfig,
    pub limits: LimitsConfig,
    pub identity: IdentityConfig,
    pub training: TrainingConfig,
    pub prices: PriceTable,
    pub catalogue: DesignCatalogue,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ServerConfig {
    pub listen: String,
    /// Base of every absolute URL the API returns.
    pub public_url: String,
    /// Optional global route prefix (`/api`).
    pub prefix: String,
    /// HMAC key for upload/download capability URLs. Unset: generated once
    /// and kept in the database, so every API replica shares it.
    pub url_signing_key: Option<String>,
    /// The operations listener (`/healthz`, `/readyz`, `/metrics`), e.g.
    /// `0.0.0.0:9464`: probes and scrapes answer there while the data port
    /// is saturated, and `/metrics` (whose series carry account ids) leaves
    /// the data port. Unset: they are served on `listen`.
    pub admin_listen: Option<String>,
    /// Connections one listener holds at once; a connection beyond it gets
    /// `503` and is closed (logged, counted in
    /// `atelier_http_connections_refused_total`). Also kept below the
    /// process's open-file limit.
    pub max_connections: u32,
    /// How long a client may take to send a request's head (HTTP/1.1),
    /// counted from the moment the connection opened or its previous answer
    /// ended: silent, slow-header and idle keep-alive connections are closed
    /// after it.
    pub header_read_timeout_secs: u64,
    /// A connection (HTTP/1.1 or HTTP/2) with no request in progress for
    /// this long is closed. Event streams are requests in progress.
    pub idle_timeout_secs: u64,
    /// Longest wait for the next piece of a request body; past it the
    /// request is answered `408` and the connection closed.
    pub body_read_timeout_secs: u64,
    /// Slowest average rate (bytes/s) a request body may arrive at once it
    /// has taken `body_read_timeout_secs`.
    pub min_body_rate: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct DatabaseConfig {
    /// `sqlite://…` or `postgres://…`; unset: `sqlite://<data_dir>/atelier.db`.
    pub url: Option<String>,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct QueueConfig {
    /// `embedded` or `amqp://…`.
    pub url: String,
    /// Prefix of every queue name on the broker (e.g. `prod.`): deployments
    /// sharing a RabbitMQ keep apart. Letters, digits, `.`, `_`, `-`.
    pub namespace: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RedisConfig {
    pub url: Option<String>,
    /// Prefix of every key this deployment writes.
    pub prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            prefix: "atelier:".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct StorageConfig {
    /// `file://<dir>` or `s3://bucket[/prefix]`; unset: `file://<data_dir>/objects`.
    pub url: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_access_key: Option<String>,
    pub s3_secret_key: Option<String>,
    pub s3_path_style: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ModelsConfig {
    pub dir: PathBuf,
    /// ONNX Runtime library; unset: `ORT_DYLIB_PATH`, else
    /// `<dir>/onnxruntime/libonnxruntime.so.1.31.1` (installed by scripts/fetch-models).
    pub onnxruntime_lib: Option<PathBuf>,
    /// Background-removal model file under `dir` (`isnet_fp16.onnx` or `isnet_quint8.onnx`).
    pub isnet: String,
    /// ×4 upscaler under `dir`; empty: Lanczos only.
    pub upscaler: String,
    /// Enlargements of the garment above this factor go through the
    /// upscaler; 0: never. Measured (`cargo bench -p atelier-worker --bench
    /// pipeline`: photos shrunk by the factor and enlarged back, PSNR and
    /// SSIM against the original): the shipped upscaler loses to Lanczos on
    /// both up to 4× (by 5.1 dB at 1.25×, 0.8 dB at 4×), ties on SSIM at 6×
    /// and wins on SSIM only at 8×, so it runs above 6×. Set it from the
    /// same bench for another upscaler.
    pub upscale_above: f64,
    /// ONNX Runtime's CPU memory arena: runs reuse their activations'
    /// memory (without it ISNet at 1024² runs about 30 % slower on CPU, each
    /// run mapping and faulting in ~1 GB afresh), at the price of keeping
    /// the largest run's memory.
    pub cpu_arena: bool,
    /// With the arena on, a model idle for this long gives the arena's
    /// memory back (one extra run with ONNX Runtime's arena shrinkage), so
    /// an idle worker holds its weights, not its largest run; 0: never.
    pub arena_release_idle_secs: u64,
    /// Sessions per model (concurrent runs of one model).
    pub sessions: usize,
    /// Dynamic batching: largest batch (1 = off) and how long to wait to fill one.
    pub max_batch: usize,
    pub batch_window_ms: u64,
    /// On a worker's start, run `scripts/fetch-models` (when it exists in the
    /// working directory) if the models are missing: `cargo run` sets itself up.
    pub auto_fetch: bool,
    /// Refuse to start a worker whose models are missing (otherwise it runs
    /// the model-free `atelier-basic` engine and says so in every result).
    pub required: bool,
    /// At a worker's start, take model files missing from `dir` from the
    /// object store's `models/` prefix (checked by sha256; `atelier models push`).
    pub pull_from_store: bool,
    /// Face detector (SCRFD, five landmarks) under `dir`.
    pub face_detector: String,
    /// Face embedder (ArcFace-style, 112×112 aligned in, 512-d out) under `dir`.
    pub face_embedder: String,
    /// Optional face-swap model under `dir` with the common signature
    /// (aligned S×S face in RGB [0,1] + identity embedding in, face out);
    /// empty: model swap blends the identity's own aligned crop.
    pub face_swap: String,
    /// Optional projection for `face_swap` under `dir`: a row-major matrix
    /// of little-endian f32 (embedding size × the model's input size);
    /// the model is fed `normalize(embedding · M)` (e.g. InsightFace's
    /// `emap`, saved with `emap.astype('<f4').tofile(path)`).
    pub face_swap_projection: String,
}

/// `queue.url` of the embedded queue (a table of the database).
pub const EMBEDDED_QUEUE: &str = "embedded";
/// The built-in packshot engine's name in `engines.auto`.
pub const BUILTIN_ENGINE: &str = "atelier";

/// What the configuration resolves to: the values roles use, each parsed
/// and checked once by [`Config::targets`].
#[derive(Debug, Clone)]
pub struct Targets {
    pub queue: QueueTarget,
    pub storage: StorageTarget,
    /// What outbound fetches and webhooks may reach.
    pub egress: crate::egress::EgressPolicy,
    pub engines: EngineTargets,
}

/// How roles exchange work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueTarget {
    /// The durable in-process queue, a table of the database.
    Embedded,
    /// RabbitMQ; `namespace` prefixes every queue name.
    Amqp { url: String, namespace: String },
}

/// Where objects (uploads, results, models) live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageTarget {
    Local { dir: PathBuf },
    S3(S3Target),
}

#[derive(Clone, PartialEq, Eq)]
pub struct S3Target {
    pub bucket: String,
    /// Key prefix inside the bucket (may be empty).
    pub prefix: String,
    /// `None`: AWS.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub path_style: bool,
}

impl std::fmt::Debug for S3Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Target")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .finish_non_exhaustive()
    }
}

/// The engines beyond the built-in one, and which kinds each draws.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineTargets {
    /// Each route under the engine name clients send.
    pub routes: Vec<(EngineChoice, EngineRoute)>,
    /// Per job kind, what `model: auto` tries, in order. A kind that is
    /// absent has nothing to draw it.
    pub auto: BTreeMap<JobType, Vec<AutoEngine>>,
}

impl EngineTargets {
    /// What `model: auto` tries for `kind`, in order.
    pub fn auto_for(&self, kind: JobType) -> &[AutoEngine] {
        self.auto.get(&kind).map(Vec::as_slice).unwrap_or_default()
    }

    /// The routes that draw `kind`.
    pub fn serving(&self, kind: JobType) -> Vec<EngineChoice> {
        self.routes
            .iter()
            .filter(|(_, r)| r.serves(kind))
            .map(|(c, _)| *c)
            .collect()
    }

    /// What admission needs to know: per kind, the engines clients may
    /// name and what `auto` tries.
    pub fn availability(&self) -> EngineAvailability {
        let mut kinds = BTreeMap::new();
        for kind in JobType::ALL.iter().copied() {
            let named: Vec<EngineChoice> = self
                .serving(kind)
                .into_iter()
                .filter(|c| kind.engine_names().contains(c))
                .collect();
            let auto: Vec<String> = self
                .auto_for(kind)
                .iter()
                .map(|a| match a {
                    AutoEngine::Builtin => BUILTIN_ENGINE.to_string(),
                    AutoEngine::Route(c) => c.as_str().to_string(),
                })
                .collect();
            if !named.is_empty() || !auto.is_empty() {
                kinds.insert(kind, KindEngines { named, auto });
            }
        }
        EngineAvailability::new(kinds)
    }
}

/// One step of the `model: auto` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoEngine {
    Builtin,
    Route(EngineChoice),
}

/// Engines beyond the built-in `atelier`: the contract's engine names
/// (`nano_banana_pro`, `seedream`, …) are logical routes that the operator
/// maps to concrete backends. A name without a route is refused at job
/// creation (400); `model: auto` tries the kind's `auto` list in order,
/// falling back on a refusal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct EnginesConfig {
    /// What `model: auto` tries, in order, per job kind: `atelier` (built
    /// in) and route names. A plain list is the `create_packshot` order; a
    /// table names kinds (`flat_2_model = ["seedream"]`). A generative
    /// kind left out tries the routes that map it, by name.
    #[serde(deserialize_with = "auto_orders")]
    pub auto: BTreeMap<JobType, Vec<String>>,
    pub routes: BTreeMap<String, EngineRoute>,
}

impl Default for EnginesConfig {
    fn default() -> Self {
        EnginesConfig {
            auto: default_auto(),
            routes: Default::default(),
        }
    }
}

fn default_auto() -> BTreeMap<JobType, Vec<String>> {
    [(JobType::CreatePackshot, vec![BUILTIN_ENGINE.to_string()])].into()
}

/// `engines.auto`: a name, a list (both the packshot order) or a table of
/// kinds; the packshot order defaults to the built-in engine.
fn auto_orders<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<JobType, Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        One(String),
        Many(Vec<String>),
    }
    impl Names {
        fn list(self) -> Vec<String> {
            match self {
                Names::One(s) => s
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
                Names::Many(v) => v,
            }
        }
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Packshot(Names),
        PerKind(BTreeMap<String, Names>),
    }
    let mut out = default_auto();
    match Either::deserialize(d)? {
        Either::Packshot(n) => {
            out.insert(JobType::CreatePackshot, n.list());
        }
        Either::PerKind(m) => {
            for (kind, names) in m {
                let kind = JobType::parse(&kind).ok_or_else(|| {
                    D::Error::custom(format!(
                        "engines.auto.{kind}: not a job kind (kinds: {})",
                        JobType::ALL
                            .iter()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
                out.insert(kind, names.list());
            }
        }
    }
    Ok(out)
}

/// Where models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    /// The CUDA execution provider (a build with `--features cuda`).
    Cuda,
}

/// The value range of an operator model's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueRange {
    /// [0, 1]
    #[default]
    Unit,
    /// [-1, 1]
    Signed,
    /// [0, 255]
    Byte,
}

/// One engine route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EngineRoute {
    /// A remote image-generation service speaking the Atelier engine
    /// protocol (README, "Engine routes"): JSON request with the prompt,
    /// instruction and base64 inputs; image bytes back; 422 = refusal.
    Http {
        url: String,
        /// Environment variable holding the bearer token (never the token itself).
        #[serde(default)]
        api_key_env: Option<String>,
        #[serde(default = "default_route_timeout")]
        timeout_secs: u64,
    },
    /// An operator-installed single-graph image-to-image ONNX model under
    /// `models.dir`: NCHW float input with 3 channels, NCHW output with 1 or 3.
    Onnx {
        file: String,
        /// Value range of the input and output tensors: `unit` [0,1],
        /// `signed` [-1,1] or `byte` [0,255].
        #[serde(default)]
        input_range: ValueRange,
        #[serde(default)]
        output_range: ValueRange,
        /// Long edge fed to a model with dynamic height and width.
        #[serde(default = "default_route_edge")]
        max_edge: u32,
    },
    /// An operator-installed model container speaking Cog's HTTP API (the
    /// format most published generative models ship in): one prediction
    /// per output, the job's fields mapped onto the container's inputs
    /// (README, "Engine routes").
    Cog {
        /// The container's base URL (`http://gen:5000`).
        url: String,
        /// Longest prediction; past it the prediction is cancelled and the
        /// output retried.
        #[serde(default = "default_cog_timeout")]
        timeout_secs: u64,
        /// Predictions the container runs at once (its slots): a worker
        /// sends it at most this many.
        #[serde(default = "default_cog_slots")]
        slots: usize,
        /// How long a starting worker waits for the container to be READY.
        #[serde(default = "default_cog_startup")]
        startup_secs: u64,
        /// Per job kind (`create_packshot`): container input name → a
        /// field of the job (`"$prompt"`) or a constant (`7.5`, `"euler"`;
        /// `"$$x"` is the literal `"$x"`).
        #[serde(default)]
        inputs: BTreeMap<JobType, BTreeMap<String, CogInput>>,
    },
}

impl EngineRoute {
    /// How long one call of a remote route may take (`None`: in process).
    pub fn timeout_secs(&self) -> Option<u64> {
        match self {
            EngineRoute::Http { timeout_secs, .. } | EngineRoute::Cog { timeout_secs, .. } => {
                Some(*timeout_secs)
            }
            EngineRoute::Onnx { .. } => None,
        }
    }

    /// Whether this route draws `kind`: HTTP and ONNX routes draw
    /// packshots; a Cog route draws the kinds it has a mapping for.
    pub fn serves(&self, kind: JobType) -> bool {
        match self {
            EngineRoute::Http { .. } | EngineRoute::Onnx { .. } => kind == JobType::CreatePackshot,
            EngineRoute::Cog { inputs, .. } => inputs.contains_key(&kind),
        }
    }
}

/// A value a Cog route sends for one container input.
#[derive(Debug, Clone, PartialEq)]
pub enum CogInput {
    /// A field of the job, by the name its kind gives it.
    Field(String),
    /// The same value for every prediction.
    Constant(serde_json::Value),
}

impl Serialize for CogInput {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            CogInput::Field(f) => s.serialize_str(&format!("${f}")),
            CogInput::Constant(serde_json::Value::String(t)) if t.starts_with('$') => {
                s.serialize_str(&format!("${t}"))
            }
            CogInput::Constant(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for CogInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => match s.strip_prefix('$') {
                Some(rest) if rest.starts_with('$') => {
                    CogInput::Constant(serde_json::Value::String(rest.to_string()))
                }
                Some(field) => CogInput::Field(field.to_string()),
                None => CogInput::Constant(serde_json::Value::String(s)),
            },
            other => CogInput::Constant(other),
        })
    }
}

fn default_route_timeout() -> u64 {
    120
}
fn default_cog_timeout() -> u64 {
    300
}
fn default_cog_slots() -> usize {
    1
}
fn default_cog_startup() -> u64 {
    120
}
fn default_route_edge() -> u32 {
    1024
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct BootstrapConfig {
    /// Key of the dev account created at first start; unset: generated and printed once.
    pub api_key: Option<String>,
    /// Credits granted to the dev account at first start.
    pub credits: f64,
    /// Create the dev account at all (off for production deployments).
    pub enabled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct EgressConfig {
    /// Hosts or CIDRs that outbound fetches may reach despite the
    /// private-address rules. Comma-separated in the environment.
    #[serde(deserialize_with = "string_or_list")]
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct NotificationsConfig {
    /// How long a notification is replayed and kept (contract: 600 s).
    pub retention_secs: u64,
    /// Relay poll period: the bound on how late a live event is.
    pub relay_ms: u64,
    /// SSE keep-alive comment period.
    pub keepalive_secs: u64,
    /// An SSE stream is closed after this long; clients reconnect with
    /// `Last-Event-ID`.
    pub stream_max_secs: u64,
    /// Streams re-read the store this often while live events flow (a safety
    /// net for messages Redis pub/sub dropped); every second while they
    /// don't (Redis down, or no Redis and no relay in this process).
    pub reconcile_secs: u64,
    /// An open stream checks its API key this often: a stream whose key
    /// was revoked or expired ends within this bound (plus one lookup),
    /// with a last `revoked` event.
    pub auth_recheck_secs: u64,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            retention_secs: 600,
            relay_ms: 100,
            keepalive_secs: 15,
            stream_max_secs: 3600,
            reconcile_secs: 10,
            auth_recheck_secs: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct WebhooksConfig {
    /// An attempt that has no 2xx answer within this long failed.
    pub timeout_secs: u64,
    /// Waits after each failed attempt; attempts = len + 1 (contract: 30 s,
    /// 2 min, 10 min, 30 min, 2 h).
    pub retry_delays_ms: Vec<u64>,
    /// Redirects followed (each checked against the egress rules).
    pub max_redirects: usize,
    /// Response bytes read (the rest is discarded).
    pub max_response_bytes: usize,
    /// Consecutive failed attempts after which a webhook is deactivated.
    pub disable_after_failures: i64,
    /// Deliveries attempted at once by one scheduler.
    pub concurrency: usize,
    /// Finished deliveries are kept this long for `GET /webhooks/deliveries`.
    pub keep_deliveries_secs: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            timeout_secs: 10,
            retry_delays_ms: vec![30_000, 120_000, 600_000, 1_800_000, 7_200_000],
            max_redirects: 3,
            max_response_bytes: 64 * 1024,
            disable_after_failures: 50,
            concurrency: 16,
            keep_deliveries_secs: 7 * 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct WorkerConfig {
    /// Tasks run at once by one worker process.
    pub concurrency: usize,
    /// The work queues this worker consumes (`packshot`, `swap`,
    /// `identity`, `generate`), so pools of workers scale apart (GPU face
    /// workers, generator fronts, packshot workers); empty: every queue it
    /// has the models or routes for. A list, or one comma-separated string
    /// (`ATELIER_WORKER__QUEUES=swap,identity`).
    #[serde(deserialize_with = "queue_list")]
    pub queues: Vec<crate::domain::WorkQueue>,
    /// Interval of the heartbeats that extend a running output's lease.
    pub heartbeat_secs: u64,
    /// How often the worker renews its presence record (`control/workers/`
    /// in the object store: what operators see of the fleet); it counts as
    /// gone after three intervals without one.
    pub presence_secs: u64,
    /// How often a running task looks for the sign that its job was
    /// aborted (then its work stops: a container's prediction is
    /// cancelled); the bound on how long aborted work keeps running.
    pub abort_check_ms: u64,
    /// Hard limit for one pipeline run.
    pub task_timeout_secs: u64,
    /// On SIGTERM: how long in-flight tasks may take before they are released.
    pub shutdown_grace_secs: u64,
    /// Largest decoded input, in pixels (decompression-bomb guard).
    pub max_input_pixels: u64,
    /// `cpu` or `cuda` (needs a build with `--features cuda`; falls back to
    /// CPU with a warning when no GPU is usable).
    pub device: Device,
    /// Threads ONNX Runtime may use inside one model run.
    pub inference_threads: usize,
    /// Fault drills only: sleep this long inside every task before the
    /// pipeline runs, so a drill can kill a worker mid-task. 0 in production.
    pub fault_delay_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Dispatch loop period when nothing wakes it earlier.
    pub tick_ms: u64,
    /// Tasks kept in each work queue (about the fleet's capacity); 0: twice
    /// `worker.concurrency`.
    pub queue_target: usize,
    /// Lease of a dispatched task waiting in a queue.
    pub dispatch_lease_secs: u64,
    /// Lease of a running task, renewed by the worker's heartbeats
    /// (`worker.heartbeat_secs`, at most half of it): the bound on how long
    /// a dead worker's task waits before it is retried elsewhere.
    pub running_lease_secs: u64,
    pub retry: RetryPolicy,
    /// Fair-share weight of enterprise accounts (standard accounts weigh 1).
    pub enterprise_weight: u32,
    /// Workers' reports (started, completed, failed) one scheduler applies
    /// at once on PostgreSQL, each in its own short transaction (each holds
    /// a pooled connection meanwhile: keep it under
    /// `database.max_connections`); the reports of one output stay in
    /// order. SQLite applies one at a time (it has one writer).
    pub outcome_concurrency: usize,
    /// How often the scheduler checks the credit invariants (every
    /// reservation holds its open outputs' cost, every account's `reserved`
    /// is its reservations' sum) and exports what it found as
    /// `atelier_credit_audit_problems`; 0 turns the audit off.
    pub credit_audit_secs: u64,
    /// Dispatch rounds and the credit audit run on one scheduler replica
    /// at a time, the holder of a lease of this length in the database;
    /// when it dies another takes over within it (a clean stop hands over
    /// at once).
    pub duty_lease_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LimitsConfig {
    /// Job-creation requests per minute per account and endpoint.
    pub create_per_minute: u32,
    /// Any other authenticated request, per minute per account.
    pub requests_per_minute: u32,
    /// Active (pending/processing) jobs per non-enterprise account.
    pub active_jobs: u32,
    pub max_upload_bytes: u64,
    pub upload_url_ttl_secs: u64,
    pub result_url_ttl_secs: u64,
    pub download_url_ttl_secs: u64,
    /// Largest output size class of a standard plan (`1K`, `2K`, `4K`).
    pub default_max_size: String,
    /// How long a Studio call (`/v1/phota/edit`, `/generate`) waits for
    /// its images before answering `504` with the job to poll.
    pub studio_wait_ms: u64,
    /// How long a preset extraction from images (contract §6.8, §6.18)
    /// waits for the workers' analysis; past it the extraction is
    /// cancelled, nothing is charged, and the answer is `504`.
    pub extraction_wait_ms: u64,
    /// Presets a non-enterprise account may hold (contract §6.2).
    pub presets: u32,
    /// Whether every upload is looked at once by a worker (a free, quiet
    /// `asset_tagging` job on the identity queue) so that `GET /assets`
    /// can show and filter its `tags` (contract §2.6).
    pub tag_uploads: bool,
    /// How long the answer to a request with an `Idempotency-Key` is kept
    /// for its retries (per account, in the database).
    pub idempotency_ttl_secs: u64,
    /// Event streams (`GET /notifications/events`) one account may hold open
    /// on one API process; one more is refused with `429`.
    pub streams_per_account: u32,
}

/// Identities and profiles (contract §5, §9).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct IdentityConfig {
    /// Identities per non-enterprise account.
    pub slots: u32,
    /// How long `POST /identity/upload` waits for the face check of the
    /// preprocessing job before answering `201` with `face_detected: null`
    /// (0: never wait; the status endpoint tells the outcome).
    pub upload_wait_ms: u64,
    /// Smallest face (shorter side of its box, pixels) accepted.
    pub min_face_px: u32,
    /// Detector score a face needs.
    pub min_face_score: f32,
    /// Profile photos fetched from URLs: largest body and time per photo.
    pub fetch_max_bytes: u64,
    pub fetch_timeout_secs: u64,
    /// Photos a profile takes, per training tier (contract §9.1).
    pub standard_photos: (u32, u32),
    pub fast_photos: (u32, u32),
    /// Names of real people that identity-creation prompts may not depict,
    /// added to the list the release ships (contract §3.8).
    pub blocked_terms: Vec<String>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            slots: 50,
            upload_wait_ms: 15_000,
            min_face_px: 48,
            min_face_score: 0.5,
            fetch_max_bytes: 25 * 1024 * 1024,
            fetch_timeout_secs: 20,
            standard_photos: (10, 50),
            fast_photos: (5, 10),
            blocked_terms: Vec::new(),
        }
    }
}

/// Trainings (contract §7, §8): the trainer containers a worker drives,
/// and the caps the scheduler and the API enforce.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TrainingConfig {
    /// Base URLs of this worker's trainer containers (Cog's HTTP API in
    /// train mode); each runs one training at a time. Empty: the worker
    /// does not consume the `training` queue.
    pub containers: Vec<String>,
    /// Container input name → a training field (`"$dataset_url"`) or a
    /// constant, as for generator routes.
    pub inputs: BTreeMap<String, CogInput>,
    /// How long a starting worker waits for each container to be READY.
    pub startup_secs: u64,
    /// Trainings running at once across the fleet (the trainer slots the
    /// scheduler hands out); waiting trainings get them by weighted fair
    /// share between accounts.
    pub fleet_slots: u32,
    /// Trainings an account may have queued or running at once
    /// (`parallel-training`); enterprise accounts get
    /// `parallel_enterprise`.
    pub parallel_per_account: u32,
    pub parallel_enterprise: u32,
    /// After a training of a model ends, how long before the model can be
    /// trained again.
    pub relaunch_cooldown_secs: u64,
    /// The lease of a running training: the worker's heartbeats and the
    /// trainer's own webhook events renew it; past it with neither, the
    /// attempt is failed and retried.
    pub lease_secs: u64,
    /// How often the worker holding a training checks on it.
    pub poll_ms: u64,
    /// A container that stops answering for this long has lost the
    /// training; one that is idle without the training's end recorded
    /// gets this long for the end to arrive before the attempt is failed.
    pub lost_after_secs: u64,
    /// Longest training; past it the training is cancelled and failed.
    pub timeout_secs: u64,
    /// Largest webhook body (the trainer's weights come as data URLs).
    pub max_weights_bytes: u64,
    /// Largest dataset ZIP frozen at start.
    pub max_dataset_bytes: u64,
    /// Fewest training images a training starts with (contract §7).
    pub min_images: u32,
    /// How far back an account's trainer time counts when the scheduler
    /// picks which waiting training gets a free trainer.
    pub share_window_secs: u64,
    /// The trainer time of one training, when none ended in that window.
    pub share_quantum_secs: u64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            containers: Vec::new(),
            inputs: BTreeMap::new(),
            startup_secs: 120,
            fleet_slots: 4,
            parallel_per_account: 1,
            parallel_enterprise: 4,
            relaunch_cooldown_secs: 30,
            lease_secs: 600,
            poll_ms: 1000,
            lost_after_secs: 30,
            timeout_secs: 24 * 3600,
            max_weights_bytes: 1 << 30,
            max_dataset_bytes: 512 << 20,
            min_images: 5,
            share_window_secs: 24 * 3600,
            share_quantum_secs: 600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LogConfig {
    /// `pretty` or `json`.
    pub format: String,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub level: String,
    /// OTLP/HTTP collector base URL (e.g. `http://otel-collector:4318`):
    /// spans are exported there when set. Unset: traces stay in the logs
    /// (`trace_id` on every line of a job's spans).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans; empty: `atelier-<roles>`.
    pub service_name: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            data_dir: PathBuf::from("./data"),
            database: DatabaseConfig {
                url: None,
                max_connections: 10,
            },
            queue: QueueConfig::default(),
            redis: RedisConfig::default(),
            storage: StorageConfig::default(),
            models: ModelsConfig::default(),
            engines: EnginesConfig::default(),
            bootstrap: BootstrapConfig::default(),
            egress: EgressConfig::default(),
            notifications: NotificationsConfig::default(),
            webhooks: WebhooksConfig::default(),
            worker: WorkerConfig::default(),
            scheduler: SchedulerConfig::default(),
            limits: LimitsConfig::default(),
            identity: IdentityConfig::default(),
            training: TrainingConfig::default(),
            prices: PriceTable::default(),
            catalogue: DesignCatalogue::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            public_url: "http://127.0.0.1:8080".into(),
            prefix: String::new(),
            url_signing_key: None,
            admin_listen: None,
            max_connections: 8192,
            header_read_timeout_secs: 30,
            idle_timeout_secs: 60,
            body_read_timeout_secs: 30,
            min_body_rate: 1024,
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            url: "embedded".into(),
            namespace: String::new(),
        }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            dir: PathBuf::from("./models"),
            onnxruntime_lib: None,
            isnet: "isnet_fp16.onnx".into(),
            upscaler: "realesr-animevideov3-x4.onnx".into(),
            upscale_above: 6.0,
            cpu_arena: true,
            arena_release_idle_secs: 30,
            sessions: 1,
            max_batch: 1,
            batch_window_ms: 5,
            auto_fetch: true,
            required: false,
            pull_from_store: true,
            face_detector: "scrfd.onnx".into(),
            face_embedder: "arcface_faceplugin.onnx".into(),
            face_swap: String::new(),
            face_swap_projection: String::new(),
        }
    }
}

impl ModelsConfig {
    pub fn onnxruntime_lib(&self) -> PathBuf {
        self.onnxruntime_lib
            .clone()
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
            .unwrap_or_else(|| {
                self.dir
                    .join("onnxruntime")
                    .join("libonnxruntime.so.1.31.1")
            })
    }
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        BootstrapConfig {
            api_key: None,
            credits: 1000.0,
            enabled: true,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            queues: Vec::new(),
            heartbeat_secs: 5,
            presence_secs: 10,
            abort_check_ms: 1_000,
            task_timeout_secs: 600,
            shutdown_grace_secs: 30,
            max_input_pixels: 64_000_000,
            device: Device::Cpu,
            inference_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            fault_delay_ms: 0,
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            tick_ms: 500,
            queue_target: 0,
            dispatch_lease_secs: 600,
            running_lease_secs: 15,
            retry: RetryPolicy::default(),
            enterprise_weight: 4,
            outcome_concurrency: 4,
            credit_audit_secs: 300,
            duty_lease_secs: 5,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            create_per_minute: 5,
            requests_per_minute: 600,
            active_jobs: 5,
            max_upload_bytes: 25 * 1024 * 1024,
            upload_url_ttl_secs: 900,
            result_url_ttl_secs: 86_400,
            download_url_ttl_secs: 3_600,
            default_max_size: "4K".into(),
            studio_wait_ms: 120_000,
            extraction_wait_ms: 60_000,
            tag_uploads: true,
            presets: 200,
            idempotency_ttl_secs: 86_400,
            streams_per_account: 10,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "pretty".into(),
            level: "info".into(),
            otlp_endpoint: None,
            service_name: String::new(),
        }
    }
}

/// A configuration that cannot run, with every reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Defaults → `file` (if any) → `ATELIER_*` environment → validate.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            fig = fig.merge(Toml::file_exact(f));
        }
        fig = fig.merge(Env::prefixed("ATELIER_").split("__"));
        let cfg: Config = fig.extract().map_err(Box::new)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn database_url(&self) -> String {
        self.database.url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("atelier.db").display()
            )
        })
    }

    pub fn storage_url(&self) -> String {
        self.storage
            .url
            .clone()
            .unwrap_or_else(|| format!("file://{}", self.data_dir.join("objects").display()))
    }

    /// Tasks the scheduler keeps in each work queue.
    pub fn queue_target(&self) -> usize {
        if self.scheduler.queue_target > 0 {
            self.scheduler.queue_target
        } else {
            self.worker.concurrency.max(1) * 2
        }
    }

    /// Checks every key (an error names each bad one) and parses the values
    /// roles use as typed targets. The one place they are parsed: roles get
    /// the [`Targets`], never the raw strings.
    pub fn targets(&self) -> Result<Targets, ConfigError> {
        let mut e = Vec::new();
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            e.push(format!(
                "server.listen: `{}` is not an address like 127.0.0.1:8080",
                self.server.listen
            ));
        }
        if let Some(admin) = &self.server.admin_listen
            && admin.parse::<std::net::SocketAddr>().is_err()
        {
            e.push(format!(
                "server.admin_listen: `{admin}` is not an address like 0.0.0.0:9464"
            ));
        }
        for (key, v) in [
            (
                "server.max_connections",
                u64::from(self.server.max_connections),
            ),
            (
                "server.header_read_timeout_secs",
                self.server.header_read_timeout_secs,
            ),
            ("server.idle_timeout_secs", self.server.idle_timeout_secs),
            (
                "server.body_read_timeout_secs",
                self.server.body_read_timeout_secs,
            ),
        ] {
            if v == 0 {
                e.push(format!("{key}: must be at least 1"));
            }
        }
        match url::Url::parse(&self.server.public_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => e.push(format!(
                "server.public_url: `{}` must be an absolute http(s) URL",
                self.server.public_url
            )),
        }
        if !self.server.prefix.is_empty()
            && (!self.server.prefix.starts_with('/') || self.server.prefix.ends_with('/'))
        {
            e.push("server.prefix: must start with `/` and not end with one (e.g. `/api`)".into());
        }
        if self
            .server
            .url_signing_key
            .as_ref()
            .is_some_and(|k| k.len() < 32)
        {
            e.push("server.url_signing_key: must be at least 32 characters".into());
        }
        let db = self.database_url();
        if !(db.starts_with("sqlite:")
            || db.starts_with("postgres://")
            || db.starts_with("postgresql://"))
        {
            e.push("database.url: must start with sqlite:// or postgres://".into());
        }
        if self.database.max_connections == 0 {
            e.push("database.max_connections: must be at least 1".into());
        }
        let queue = if self.queue.url == EMBEDDED_QUEUE {
            Some(QueueTarget::Embedded)
        } else if self.queue.url.starts_with("amqp://") || self.queue.url.starts_with("amqps://") {
            Some(QueueTarget::Amqp {
                url: self.queue.url.clone(),
                namespace: self.queue.namespace.clone(),
            })
        } else {
            e.push(format!(
                "queue.url: `{}` must be `{EMBEDDED_QUEUE}` or an amqp:// URL",
                self.queue.url
            ));
            None
        };
        if !self
            .queue
            .namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            || self.queue.namespace.len() > 64
        {
            e.push("queue.namespace: up to 64 letters, digits, `.`, `_` or `-`".into());
        }
        if let Some(r) = &self.redis.url
            && !(r.starts_with("redis://") || r.starts_with("rediss://"))
        {
            e.push("redis.url: must be a redis:// URL".into());
        }
        let storage = match self.storage_target() {
            Ok(t) => Some(t),
            Err(msg) => {
                e.push(msg);
                None
            }
        };
        if let Some(u) = &self.log.otlp_endpoint
            && !url::Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
        {
            e.push(format!("log.otlp_endpoint: `{u}` must be an http(s) URL"));
        }
        let egress = match crate::egress::EgressPolicy::new(&self.egress.allow) {
            Ok(p) => Some(p),
            Err(msg) => {
                e.push(msg);
                None
            }
        };
        let n = &self.notifications;
        if n.retention_secs == 0
            || n.relay_ms == 0
            || n.keepalive_secs == 0
            || n.reconcile_secs == 0
            || n.auth_recheck_secs == 0
        {
            e.push("notifications: retention_secs, relay_ms, keepalive_secs, reconcile_secs and auth_recheck_secs must be at least 1".into());
        }
        let w = &self.webhooks;
        if w.timeout_secs == 0 || w.concurrency == 0 || w.disable_after_failures < 1 {
            e.push(
                "webhooks: timeout_secs, concurrency and disable_after_failures must be at least 1"
                    .into(),
            );
        }
        if let Some(k) = &self.bootstrap.api_key
            && k.len() < 32
        {
            e.push("bootstrap.api_key: must be at least 32 characters".into());
        }
        if crate::domain::Credits::from_f64(self.bootstrap.credits).is_none_or(|c| c.0 < 0) {
            e.push("bootstrap.credits: must be a non-negative number".into());
        }
        if !(self.models.upscale_above == 0.0 || self.models.upscale_above >= 1.0) {
            e.push("models.upscale_above: 0 (never) or a factor of at least 1".into());
        }
        if self.models.sessions == 0 || self.models.max_batch == 0 {
            e.push("models.sessions and models.max_batch: must be at least 1".into());
        }
        let mut routes = Vec::new();
        for (name, route) in &self.engines.routes {
            match EngineChoice::parse(name).filter(|c| *c != EngineChoice::Auto) {
                Some(choice) => routes.push((choice, route.clone())),
                None => {
                    let names: Vec<&str> = EngineChoice::ALL
                        .iter()
                        .filter(|c| **c != EngineChoice::Auto)
                        .map(|c| c.as_str())
                        .collect();
                    e.push(format!(
                        "engines.routes.{name}: routes are named after the engines clients may ask for: {}",
                        names.join(", ")
                    ));
                }
            }
            match route {
                EngineRoute::Http {
                    url, timeout_secs, ..
                } => {
                    if !url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) {
                        e.push(format!(
                            "engines.routes.{name}.url: `{url}` must be an http(s) URL"
                        ));
                    }
                    if *timeout_secs == 0 {
                        e.push(format!(
                            "engines.routes.{name}.timeout_secs: must be at least 1"
                        ));
                    }
                }
                EngineRoute::Cog {
                    url,
                    timeout_secs,
                    slots,
                    inputs,
                    ..
                } => {
                    if !url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) {
                        e.push(format!(
                            "engines.routes.{name}.url: `{url}` must be an http(s) URL"
                        ));
                    }
                    if *timeout_secs == 0 || *slots == 0 {
                        e.push(format!(
                            "engines.routes.{name}: timeout_secs and slots must be at least 1"
                        ));
                    }
                    if inputs.is_empty() {
                        e.push(format!(
                            "engines.routes.{name}.inputs: a Cog route maps the inputs of at least one job kind (e.g. inputs.{})",
                            JobType::CreatePackshot
                        ));
                    }
                    for (kind, mapping) in inputs {
                        let fields = kind.generator_fields();
                        if fields.is_empty() {
                            e.push(format!(
                                "engines.routes.{name}.inputs.{kind}: generators do not draw {kind}"
                            ));
                            continue;
                        }
                        for (input, value) in mapping {
                            if let CogInput::Field(f) = value
                                && !fields.contains(&f.as_str())
                            {
                                e.push(format!(
                                    "engines.routes.{name}.inputs.{kind}.{input}: `${f}` is not a field of {kind}; it has {}",
                                    fields.iter().map(|f| format!("${f}")).collect::<Vec<_>>().join(", ")
                                ));
                            }
                        }
                    }
                }
                EngineRoute::Onnx { file, max_edge, .. } => {
                    if file.is_empty() {
                        e.push(format!(
                            "engines.routes.{name}.file: names a model file under models.dir"
                        ));
                    }
                    if !(16..=8192).contains(max_edge) {
                        e.push(format!(
                            "engines.routes.{name}.max_edge: must be within 16..=8192"
                        ));
                    }
                }
            }
        }
        let mut auto = BTreeMap::new();
        let mut orders: BTreeMap<JobType, Vec<String>> = self.engines.auto.clone();
        // A generative kind without an order tries the routes that map it.
        for kind in JobType::ALL.iter().copied() {
            if !orders.contains_key(&kind) {
                let serving: Vec<String> = self
                    .engines
                    .routes
                    .iter()
                    .filter(|(_, r)| r.serves(kind))
                    .map(|(n, _)| n.clone())
                    .collect();
                if !serving.is_empty() {
                    orders.insert(kind, serving);
                }
            }
        }
        for (kind, names) in &orders {
            let kind = *kind;
            if kind == JobType::CreatePackshot && names.is_empty() {
                e.push(format!(
                    "engines.auto: needs at least one engine (e.g. {BUILTIN_ENGINE})"
                ));
            }
            let mut order = Vec::new();
            for n in names {
                if n == BUILTIN_ENGINE {
                    if kind.builtin_engine() {
                        order.push(AutoEngine::Builtin);
                    } else {
                        e.push(format!(
                            "engines.auto.{kind}: the built-in engine `{BUILTIN_ENGINE}` does not draw {kind}; name a generator route"
                        ));
                    }
                } else if let Some((choice, route)) = routes.iter().find(|(c, _)| c.as_str() == n) {
                    if route.serves(kind) {
                        order.push(AutoEngine::Route(*choice));
                    } else {
                        e.push(format!(
                            "engines.auto.{kind}: route `{n}` does not draw {kind} (it has no inputs.{kind} mapping)"
                        ));
                    }
                } else {
                    e.push(format!(
                        "engines.auto.{kind}: `{n}` is neither `{BUILTIN_ENGINE}` nor a configured route"
                    ));
                }
            }
            if !order.is_empty() {
                auto.insert(kind, order);
            }
        }
        // Each engine of a fallback order runs in its own attempt: one
        // route's call must fit inside one task.
        for (name, route) in &self.engines.routes {
            if let Some(t) = route.timeout_secs()
                && t >= self.worker.task_timeout_secs
            {
                e.push(format!(
                    "engines.routes.{name}.timeout_secs: {t} s must be below worker.task_timeout_secs ({})",
                    self.worker.task_timeout_secs
                ));
            }
        }
        if self.worker.concurrency == 0 {
            e.push("worker.concurrency: must be at least 1".into());
        }
        if self.worker.heartbeat_secs == 0
            || self.worker.heartbeat_secs * 2 > self.scheduler.running_lease_secs
        {
            e.push("worker.heartbeat_secs: must be positive and at most half of scheduler.running_lease_secs".into());
        }
        if self.scheduler.duty_lease_secs == 0 {
            e.push("scheduler.duty_lease_secs: must be at least 1".into());
        }
        if self.worker.presence_secs == 0 {
            e.push("worker.presence_secs: must be at least 1".into());
        }
        if self.scheduler.retry.max_attempts == 0 {
            e.push("scheduler.retry.max_attempts: must be at least 1".into());
        }
        if self.limits.create_per_minute == 0 || self.limits.requests_per_minute == 0 {
            e.push("limits: per-minute limits must be at least 1".into());
        }
        if crate::domain::credits::SizeClass::parse(&self.limits.default_max_size).is_none() {
            e.push("limits.default_max_size: must be 1K, 2K or 4K".into());
        }
        for (k, v) in [
            ("1K", self.prices.k1),
            ("2K", self.prices.k2),
            ("4K", self.prices.k4),
        ] {
            if !v.is_finite() || v < 0.0 {
                e.push(format!("prices.{k}: must be a non-negative number"));
            }
        }
        if !matches!(self.log.format.as_str(), "pretty" | "json") {
            e.push("log.format: must be `pretty` or `json`".into());
        }
        match (queue, storage, egress) {
            (Some(queue), Some(storage), Some(egress)) if e.is_empty() => Ok(Targets {
                queue,
                storage,
                egress,
                engines: EngineTargets { routes, auto },
            }),
            _ => Err(ConfigError::Invalid(e)),
        }
    }

    /// Checks every key, with a message naming each bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.targets().map(drop)
    }

    /// `storage.url` (or its default) with its keys, parsed.
    fn storage_target(&self) -> Result<StorageTarget, String> {
        let url = self.storage_url();
        if let Some(dir) = url.strip_prefix("file://") {
            return Ok(StorageTarget::Local {
                dir: PathBuf::from(dir),
            });
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err("storage.url: must be file://<dir> or s3://bucket[/prefix]".into());
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!(
                "storage.url {url}: no bucket; use s3://bucket[/prefix]"
            ));
        }
        let st = &self.storage;
        let (Some(access_key), Some(secret_key)) = (&st.s3_access_key, &st.s3_secret_key) else {
            return Err(
                "storage: s3:// needs storage.s3_access_key and storage.s3_secret_key".into(),
            );
        };
        Ok(StorageTarget::S3(S3Target {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: st.s3_endpoint.clone().filter(|e| !e.is_empty()),
            region: st
                .s3_region
                .clone()
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "us-east-1".into()),
            access_key: access_key.clone(),
            secret_key: secret_key.clone(),
            path_style: st.s3_path_style,
        }))
    }

    /// The effective configuration with every secret replaced, for `atelier config`.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        let hide = |s: &mut Option<String>| {
            if s.is_some() {
                *s = Some("<redacted>".into());
            }
        };
        hide(&mut c.server.url_signing_key);
        hide(&mut c.bootstrap.api_key);
        hide(&mut c.storage.s3_secret_key);
        c.database.url = c.database.url.as_deref().map(redact_url);
        c.redis.url = c.redis.url.as_deref().map(redact_url);
        c.queue.url = redact_url(&c.queue.url);
        for route in c.engines.routes.values_mut() {
            if let EngineRoute::Http { url, .. } | EngineRoute::Cog { url, .. } = route {
                *url = redact_url(url);
            }
        }
        for url in &mut c.training.containers {
            *url = redact_url(url);
        }
        c
    }
}

/// Masks the password of a URL (`postgres://u:secret@h` → `postgres://u:<redacted>@h`).
pub fn redact_url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("<redacted>"));
            u.to_string()
        }
        _ => s.to_string(),
    }
}

fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        Either::Many(v) => v,
    })
}

fn queue_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<crate::domain::WorkQueue>, D::Error> {
    use serde::de::Error as _;
    string_or_list(d)?
        .iter()
        .map(|name| {
            crate::domain::WorkQueue::parse(name).ok_or_else(|| {
                D::Error::custom(format!(
                    "unknown work queue `{name}`; the queues are {}",
                    crate::domain::WorkQueue::ALL.map(|q| q.as_str()).join(", ")
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_embedded() {
        let c = Config::default();
        let t = c.targets().expect("default config is valid");
        assert!(c.database_url().starts_with("sqlite://./data/atelier.db"));
        assert_eq!(
            t.storage,
            StorageTarget::Local {
                dir: PathBuf::from("./data/objects")
            }
        );
        assert_eq!(t.queue, QueueTarget::Embedded);
        assert_eq!(
            t.engines.auto_for(JobType::CreatePackshot),
            [AutoEngine::Builtin]
        );
        assert!(t.engines.auto_for(JobType::Flat2Model).is_empty());
        assert_eq!(c.worker.device, Device::Cpu);
    }

    #[test]
    fn targets_are_parsed_with_every_problem_named() {
        let mut c = Config::default();
        c.storage.url = Some("s3://media/atelier".into());
        c.storage.s3_access_key = Some("ak".into());
        c.storage.s3_secret_key = Some("sk".into());
        c.queue.url = "amqp://u:p@rabbit:5672/%2f".into();
        c.queue.namespace = "prod.".into();
        let t = c.targets().expect("valid");
        let StorageTarget::S3(s3) = &t.storage else {
            panic!("{:?}", t.storage)
        };
        assert_eq!(
            (s3.bucket.as_str(), s3.prefix.as_str()),
            ("media", "atelier")
        );
        assert_eq!(s3.region, "us-east-1");
        assert!(
            !format!("{s3:?}").contains("sk"),
            "the secret stays out of logs"
        );
        assert_eq!(
            t.queue,
            QueueTarget::Amqp {
                url: "amqp://u:p@rabbit:5672/%2f".into(),
                namespace: "prod.".into()
            }
        );
        c.storage.url = Some("s3:///nobucket".into());
        c.egress.allow = vec!["not a/cidr".into()];
        c.queue.url = "kafka://x".into();
        let err = c.targets().expect_err("invalid").to_string();
        for key in ["storage.url", "egress", "queue.url"] {
            assert!(err.contains(key), "{key} in {err}");
        }
    }

    #[test]
    fn env_overrides_file_and_validation_names_keys() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "a.toml",
                "[server]\nlisten = \"127.0.0.1:9000\"\n[limits]\nactive_jobs = 7\n",
            )?;
            jail.set_env("ATELIER_SERVER__LISTEN", "127.0.0.1:9100");
            jail.set_env("ATELIER_EGRESS__ALLOW", "127.0.0.1, example.test");
            let c = Config::load(Some(Path::new("a.toml"))).expect("loads");
            assert_eq!(c.server.listen, "127.0.0.1:9100");
            assert_eq!(c.limits.active_jobs, 7);
            assert_eq!(c.egress.allow, vec!["127.0.0.1", "example.test"]);
            jail.set_env("ATELIER_WORKER__QUEUES", "swap, identity");
            let c = Config::load(None).expect("loads");
            assert_eq!(
                c.worker.queues,
                [
                    crate::domain::WorkQueue::Swap,
                    crate::domain::WorkQueue::Identity
                ]
            );
            jail.set_env("ATELIER_WORKER__QUEUES", "swap,gpu");
            let err = Config::load(None).expect_err("unknown queue").to_string();
            assert!(err.contains("unknown work queue `gpu`"), "{err}");
            jail.set_env("ATELIER_WORKER__QUEUES", "");
            jail.set_env("ATELIER_QUEUE__URL", "kafka://x");
            let err = Config::load(None).expect_err("invalid").to_string();
            assert!(err.contains("queue.url"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn engine_routes_load_from_toml_and_are_checked() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "e.toml",
                r#"
[engines]
auto = ["seedream", "atelier"]
[engines.routes.seedream]
kind = "http"
url = "https://gen.example.test/v1/packshot"
api_key_env = "SEEDREAM_TOKEN"
[engines.routes.nano_banana_pro]
kind = "onnx"
file = "operator/img2img.onnx"
input_range = "signed"
"#,
            )?;
            let c = Config::load(Some(Path::new("e.toml"))).expect("loads");
            assert_eq!(
                c.engines.auto[&JobType::CreatePackshot],
                vec!["seedream", "atelier"]
            );
            assert_eq!(
                c.engines.routes["seedream"],
                EngineRoute::Http {
                    url: "https://gen.example.test/v1/packshot".into(),
                    api_key_env: Some("SEEDREAM_TOKEN".into()),
                    timeout_secs: 120,
                }
            );
            assert!(matches!(
                &c.engines.routes["nano_banana_pro"],
                EngineRoute::Onnx {
                    input_range: ValueRange::Signed,
                    output_range: ValueRange::Unit,
                    max_edge: 1024,
                    ..
                }
            ));
            let t = c.targets().expect("valid");
            assert_eq!(
                t.engines.auto_for(JobType::CreatePackshot),
                [
                    AutoEngine::Route(EngineChoice::Seedream),
                    AutoEngine::Builtin
                ]
            );
            assert_eq!(t.engines.serving(JobType::CreatePackshot).len(), 2);
            jail.create_file(
                "bad.toml",
                r#"
[engines]
auto = ["dalle"]
[engines.routes.dalle]
kind = "http"
url = "ftp://x"
"#,
            )?;
            let err = Config::load(Some(Path::new("bad.toml")))
                .expect_err("invalid")
                .to_string();
            assert!(
                err.contains("engines.routes.dalle: routes are named"),
                "{err}"
            );
            assert!(err.contains("engines.routes.dalle.url"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn cog_routes_map_fields_and_constants() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                r#"
[engines.routes.seedream]
kind = "cog"
url = "http://gen:5000"
[engines.routes.seedream.inputs.create_packshot]
image = "$image"
steps = 30
scheduler = "euler"
literal = "$$money"
"#,
            )?;
            let c = Config::load(Some(Path::new("c.toml"))).expect("loads");
            let EngineRoute::Cog {
                inputs,
                timeout_secs,
                slots,
                ..
            } = &c.engines.routes["seedream"]
            else {
                panic!("a cog route")
            };
            assert_eq!((*timeout_secs, *slots), (300, 1));
            let m = &inputs[&JobType::CreatePackshot];
            assert_eq!(m["image"], CogInput::Field("image".into()));
            assert_eq!(m["steps"], CogInput::Constant(serde_json::json!(30)));
            assert_eq!(
                m["scheduler"],
                CogInput::Constant(serde_json::json!("euler"))
            );
            assert_eq!(
                m["literal"],
                CogInput::Constant(serde_json::json!("$money"))
            );
            // What is printed reads back the same.
            let back: Config = toml::from_str(&toml::to_string(&c).expect("toml")).expect("parses");
            assert_eq!(back.engines.routes, c.engines.routes);
            jail.create_file(
                "bad.toml",
                r#"
[engines.routes.seedream]
kind = "cog"
url = "http://gen:5000"
[engines.routes.seedream.inputs.model_swap]
image = "$image"
"#,
            )?;
            let err = Config::load(Some(Path::new("bad.toml")))
                .expect_err("invalid")
                .to_string();
            assert!(
                err.contains("inputs.model_swap: generators do not draw model_swap"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn auto_orders_are_per_kind_and_checked() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "k.toml",
                r#"
[engines.routes.seedream]
kind = "cog"
url = "http://gen:5000"
[engines.routes.seedream.inputs.flat_2_model]
identity = "$identity"
[engines.routes.nano_banana_pro]
kind = "cog"
url = "http://edit:5000"
[engines.routes.nano_banana_pro.inputs.flat_2_model]
garments = "$garments"
[engines.routes.nano_banana_pro.inputs.create_packshot]
image = "$image"
"#,
            )?;
            let c = Config::load(Some(Path::new("k.toml"))).expect("loads");
            let t = c.targets().expect("valid");
            // No order for flat-2-model: the routes that map it, by name.
            assert_eq!(
                t.engines.auto_for(JobType::Flat2Model),
                [
                    AutoEngine::Route(EngineChoice::NanoBananaPro),
                    AutoEngine::Route(EngineChoice::Seedream)
                ]
            );
            assert_eq!(
                t.engines.auto_for(JobType::CreatePackshot),
                [AutoEngine::Builtin]
            );
            let a = t.engines.availability();
            assert_eq!(
                a.of(JobType::CreatePackshot).named,
                vec![EngineChoice::NanoBananaPro]
            );
            assert_eq!(a.of(JobType::Flat2Model).named.len(), 2);
            jail.create_file(
                "o.toml",
                r#"
[engines.auto]
create_packshot = ["nano_banana_pro", "atelier"]
flat_2_model = "seedream"
[engines.routes.seedream]
kind = "cog"
url = "http://gen:5000"
[engines.routes.seedream.inputs.flat_2_model]
identity = "$identity"
[engines.routes.nano_banana_pro]
kind = "cog"
url = "http://edit:5000"
[engines.routes.nano_banana_pro.inputs.create_packshot]
image = "$image"
"#,
            )?;
            let t = Config::load(Some(Path::new("o.toml")))
                .expect("loads")
                .targets()
                .expect("valid");
            assert_eq!(
                t.engines.auto_for(JobType::Flat2Model),
                [AutoEngine::Route(EngineChoice::Seedream)]
            );
            assert_eq!(
                t.engines.auto_for(JobType::CreatePackshot),
                [
                    AutoEngine::Route(EngineChoice::NanoBananaPro),
                    AutoEngine::Builtin
                ]
            );
            jail.create_file(
                "bad.toml",
                r#"
[engines.auto]
flat_2_model = ["atelier", "nano_banana_pro"]
create_packshots = ["atelier"]
[engines.routes.nano_banana_pro]
kind = "cog"
url = "http://edit:5000"
[engines.routes.nano_banana_pro.inputs.create_packshot]
image = "$image"
"#,
            )?;
            let err = Config::load(Some(Path::new("bad.toml")))
                .expect_err("invalid")
                .to_string();
            assert!(
                err.contains("engines.auto.create_packshots: not a job kind"),
                "{err}"
            );
            jail.create_file(
                "bad2.toml",
                r#"
[engines.auto]
flat_2_model = ["atelier", "nano_banana_pro"]
[engines.routes.nano_banana_pro]
kind = "cog"
url = "http://edit:5000"
[engines.routes.nano_banana_pro.inputs.create_packshot]
image = "$image"
"#,
            )?;
            let err = Config::load(Some(Path::new("bad2.toml")))
                .expect_err("invalid")
                .to_string();
            assert!(
                err.contains("engines.auto.flat_2_model: the built-in engine `atelier` does not draw flat_2_model"),
                "{err}"
            );
            assert!(
                err.contains(
                    "engines.auto.flat_2_model: route `nano_banana_pro` does not draw flat_2_model"
                ),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn redaction_hides_secrets() {
        let mut c = Config::default();
        c.database.url = Some("postgres://u:hunter2@db/atelier".into());
        c.bootstrap.api_key = Some("k".repeat(40));
        c.training.containers = vec!["http://trainer:s3cret@10.0.0.5:5000".into()];
        let shown = toml::to_string(&c.redacted()).expect("serialises");
        assert!(!shown.contains("hunter2") && !shown.contains(&"k".repeat(40)));
        assert!(!shown.contains("s3cret") && shown.contains("10.0.0.5"), "{shown}");
    }
}
