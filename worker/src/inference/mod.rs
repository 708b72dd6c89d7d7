//! ONNX Runtime in the worker: one runtime per process, a registry that loads
//! each model once, bounded concurrency per model, and dynamic batching.
//!
//! Threads: every loaded model owns `sessions` runner threads, each holding
//! one ORT session (ORT's `Run` needs exclusive access in this binding). A
//! caller (always on tokio's blocking pool, never on the async runtime)
//! sends its input to the model's queue and waits for the reply. A runner
//! takes the first waiting request, then gathers more requests of the same
//! shape for up to `batch_window` or until `max_batch`, stacks them along
//! the batch axis, runs once, and splits the output back. Models whose batch
//! axis is fixed at 1 run one request at a time.
//!
//! Metrics: `atelier_model_load_seconds{model}`,
//! `atelier_inference_seconds{model}`, `atelier_batch_size{model}`.

use ndarray::{ArrayD, Axis, IxDyn};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, thiserror::Error)]
pub enum InferenceError {
    #[error("ONNX Runtime is not available: {0}")]
    Runtime(String),
    #[error("cannot load model {model}: {reason}")]
    Load { model: String, reason: String },
    #[error("inference failed in {model}: {reason}")]
    Run { model: String, reason: String },
    #[error("model {0} is not loaded")]
    Missing(String),
}

/// Where inference runs (`worker.device`).
pub use atelier_shared::config::Device;

#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// `libonnxruntime.so`; `None`: `ORT_DYLIB_PATH`, then the default names.
    pub library: Option<PathBuf>,
    pub device: Device,
    /// Threads ORT may use inside one run.
    pub intra_threads: usize,
    /// ONNX Runtime's CPU memory arena (`models.cpu_arena`).
    pub cpu_arena: bool,
}

/// The process-wide ONNX Runtime environment.
pub struct Runtime {
    env: ort::environment::Environment,
    /// What sessions actually use (CUDA may fall back to CPU).
    pub device: Device,
    intra_threads: usize,
    cpu_arena: bool,
}

static RUNTIME: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);

/// Where this process's sessions run, once ONNX Runtime is loaded.
pub fn loaded_device() -> Option<Device> {
    RUNTIME.lock().ok()?.as_ref().map(|rt| rt.device)
}

impl Runtime {
    /// Loads the ONNX Runtime library once per process (later calls return
    /// the same runtime, whatever their options). A failed load is not
    /// remembered: a later call with a usable library succeeds.
    pub fn get(opts: &RuntimeOptions) -> Result<Arc<Runtime>, InferenceError> {
        let mut slot = RUNTIME
            .lock()
            .map_err(|_| InferenceError::Runtime("runtime lock poisoned".into()))?;
        if let Some(rt) = slot.as_ref() {
            return Ok(rt.clone());
        }
        let rt = Arc::new(Self::init(opts)?);
        *slot = Some(rt.clone());
        Ok(rt)
    }

    fn init(opts: &RuntimeOptions) -> Result<Runtime, InferenceError> {
        let lib = opts
            .library
            .clone()
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
            .ok_or_else(|| InferenceError::Runtime("no library: set models.onnxruntime_lib or ORT_DYLIB_PATH (scripts/fetch-models installs one)".into()))?;
        if !lib.exists() {
            return Err(InferenceError::Runtime(format!(
                "{} does not exist (run scripts/fetch-models)",
                lib.display()
            )));
        }
        // ort panics inside a failed dlopen on some paths; keep that a typed error.
        let builder = std::panic::catch_unwind(|| ort::init_from(&lib))
            .map_err(|_| InferenceError::Runtime(format!("loading {} panicked", lib.display())))?
            .map_err(|e| InferenceError::Runtime(format!("{}: {e}", lib.display())))?;
        let env = builder
            .with_name("atelier")
            .build()
            .map_err(|e| InferenceError::Runtime(e.to_string()))?;
        let device = match opts.device {
            Device::Cpu => Device::Cpu,
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => {
                tracing::warn!(
                    "CUDA requested, but this build has no CUDA support (build with `--features cuda`): running on CPU"
                );
                Device::Cpu
            }
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                use ort::ep::ExecutionProvider;
                match ort::ep::CUDA::is_available() {
                    Ok(true) => Device::Cuda,
                    Ok(false) => {
                        tracing::warn!(library = %lib.display(), "CUDA requested, but this ONNX Runtime has no CUDA execution provider: running on CPU");
                        Device::Cpu
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "CUDA requested, but its availability cannot be queried: running on CPU");
                        Device::Cpu
                    }
                }
            }
        };
        tracing::info!(library = %lib.display(), device = ?device, "ONNX Runtime loaded");
        Ok(Runtime {
            env,
            device,
            intra_threads: opts.intra_threads.max(1),
            cpu_arena: opts.cpu_arena,
        })
    }

    /// A session of the model at `path` with every graph optimisation
    /// ONNX Runtime has (`ORT_ENABLE_ALL`). Note: ort's `Level3` is
    /// `ORT_ENABLE_LAYOUT`, which leaves out fusions that made ISNet about
    /// 13 % slower on CPU.
    pub(crate) fn session(
        &self,
        model: &str,
        path: &Path,
    ) -> Result<(Session, Device), InferenceError> {
        self.session_at(model, path, GraphOptimizationLevel::All)
    }

    fn session_at(
        &self,
        model: &str,
        path: &Path,
        level: GraphOptimizationLevel,
    ) -> Result<(Session, Device), InferenceError> {
        let err = |e: String| InferenceError::Load {
            model: model.into(),
            reason: e,
        };
        let mut b = Session::builder(&self.env)
            .map_err(|e| err(e.to_string()))?
            .with_optimization_level(level)
            .map_err(|e| err(e.to_string()))?
            .with_intra_threads(self.intra_threads)
            .map_err(|e| err(e.to_string()))?;
        // The CPU provider runs every model on CPU and the nodes CUDA
        // cannot: its arena keeps a run's activations after the run.
        let cpu = ort::ep::CPU::default()
            .with_arena_allocator(self.cpu_arena)
            .build();
        #[allow(unused_mut)]
        let mut device = self.device;
        #[cfg(feature = "cuda")]
        if device == Device::Cuda {
            match b.clone().with_execution_providers([
                ort::ep::CUDA::default().build().error_on_failure(),
                cpu.clone(),
            ]) {
                Ok(with_cuda) => b = with_cuda,
                Err(e) => {
                    tracing::warn!(model, error = %e, "CUDA execution provider failed to register (no GPU or driver?): running this model on CPU");
                    device = Device::Cpu;
                }
            }
        }
        if device == Device::Cpu {
            b = b
                .with_execution_providers([cpu])
                .map_err(|e| err(e.to_string()))?;
        }
        let s = b.commit_from_file(path).map_err(|e| err(e.to_string()))?;
        Ok((s, device))
    }
}

/// Per-model runner settings.
#[derive(Debug, Clone, Copy)]
pub struct ModelOptions {
    /// Sessions (and so concurrent runs) of this model.
    pub sessions: usize,
    /// How long a runner waits to fill a batch after the first request.
    pub batch_window: Duration,
    /// Largest batch; 1 disables batching.
    pub max_batch: usize,
    /// With the CPU arena on: after this long without a request, a session
    /// gives its arena's free memory back to the system (one run with
    /// ONNX Runtime's arena shrinkage); `None`: it keeps it.
    pub release_idle: Option<Duration>,
}

impl ModelOptions {
    /// Sessions and batching of every model, as configured.
    pub fn from_config(cfg: &atelier_shared::config::Config) -> ModelOptions {
        ModelOptions {
            sessions: cfg.models.sessions,
            batch_window: Duration::from_millis(cfg.models.batch_window_ms),
            max_batch: cfg.models.max_batch,
            release_idle: (cfg.models.arena_release_idle_secs > 0)
                .then(|| Duration::from_secs(cfg.models.arena_release_idle_secs)),
        }
    }
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            sessions: 1,
            batch_window: Duration::from_millis(5),
            max_batch: 1,
            release_idle: Some(Duration::from_secs(
                atelier_shared::config::ModelsConfig::default().arena_release_idle_secs,
            )),
        }
    }
}

struct Request {
    input: ArrayD<f32>,
    reply: SyncSender<Result<Vec<ArrayD<f32>>, InferenceError>>,
}

/// A loaded model and its runners.
pub struct Model {
    pub name: String,
    pub input: String,
    /// The first requested output (what [`Model::run`] returns).
    pub output: String,
    /// Every requested output, in the order [`Model::run_all`] returns them.
    pub outputs: Vec<String>,
    /// Input shape as the model declares it (`-1` for dynamic axes).
    pub input_shape: Vec<i64>,
    pub device: Device,
    pub batching: bool,
    /// Session runs and the requests they served (runs < requests when batching).
    pub stats: Arc<RunStats>,
    queue: SyncSender<Request>,
}

#[derive(Debug, Default)]
pub struct RunStats {
    pub runs: AtomicU64,
    pub requests: AtomicU64,
    /// Idle releases of the arena (`ModelOptions::release_idle`).
    pub releases: AtomicU64,
}

impl RunStats {
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.runs.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("input_shape", &self.input_shape)
            .finish()
    }
}

impl Model {
    /// Loads `path` into `opts.sessions` sessions, warms each up with one run
    /// on zeros when the input shape is static, and starts the runners. Only
    /// the graph's first output is fetched; see [`Model::load_outputs`].
    pub fn load(
        rt: &Runtime,
        name: &str,
        path: &Path,
        opts: ModelOptions,
    ) -> Result<Model, InferenceError> {
        Model::load_outputs(rt, name, path, opts, &[])
    }

    /// As [`Model::load`], fetching the named outputs (detectors with score,
    /// box and landmark heads); empty: the first output.
    pub fn load_outputs(
        rt: &Runtime,
        name: &str,
        path: &Path,
        opts: ModelOptions,
        wanted: &[&str],
    ) -> Result<Model, InferenceError> {
        let t = Instant::now();
        let mut sessions = Vec::new();
        let mut device = rt.device;
        for _ in 0..opts.sessions.max(1) {
            let (s, d) = rt.session(name, path)?;
            device = d;
            sessions.push(s);
        }
        let first = &sessions[0];
        let input = first
            .inputs()
            .first()
            .map(|o| o.name().to_string())
            .ok_or_else(|| InferenceError::Load {
                model: name.into(),
                reason: "model has no input".into(),
            })?;
        let declared: Vec<String> = first
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let outputs: Vec<String> = if wanted.is_empty() {
            declared.first().cloned().into_iter().collect()
        } else {
            wanted.iter().map(|w| w.to_string()).collect()
        };
        if let Some(missing) = outputs.iter().find(|o| !declared.contains(o)) {
            return Err(InferenceError::Load {
                model: name.into(),
                reason: format!("no output named {missing} (the graph has {declared:?})"),
            });
        }
        let output = outputs
            .first()
            .cloned()
            .ok_or_else(|| InferenceError::Load {
                model: name.into(),
                reason: "model has no output".into(),
            })?;
        let input_shape: Vec<i64> = first.inputs()[0]
            .dtype()
            .tensor_shape()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let batching = opts.max_batch > 1 && input_shape.first().is_some_and(|d| *d < 0);
        let (tx, rx) = sync_channel::<Request>(1024);
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(RunStats::default());
        let mut warm = Vec::new();
        // What a session runs to give its arena back: the warm-up input, or
        // a small one on the dynamic axes.
        let release = opts.release_idle.filter(|_| rt.cpu_arena).map(|idle| {
            let shape: Vec<usize> = input_shape
                .iter()
                .enumerate()
                .map(|(k, d)| match (*d, k) {
                    (d, _) if d > 0 => d as usize,
                    (_, 0) => 1,
                    _ => 16,
                })
                .collect();
            (idle, ArrayD::<f32>::zeros(IxDyn(&shape)))
        });
        for (i, mut s) in sessions.into_iter().enumerate() {
            if input_shape.iter().all(|d| *d > 0) {
                let shape: Vec<usize> = input_shape.iter().map(|d| *d as usize).collect();
                let zeros = ArrayD::<f32>::zeros(IxDyn(&shape));
                run_session(&mut s, name, &input, &outputs, &zeros)?;
                warm.push(i);
            }
            let (rx, model, input, outs, st, release) = (
                rx.clone(),
                name.to_string(),
                input.clone(),
                outputs.clone(),
                stats.clone(),
                release.clone(),
            );
            let max_batch = if batching { opts.max_batch } else { 1 };
            std::thread::Builder::new()
                .name(format!("ort-{name}-{i}"))
                .spawn(move || {
                    runner(
                        s,
                        &model,
                        &input,
                        &outs,
                        &rx,
                        max_batch,
                        opts.batch_window,
                        &st,
                        release,
                    )
                })
                .map_err(|e| InferenceError::Load {
                    model: name.to_string(),
                    reason: e.to_string(),
                })?;
        }
        let secs = t.elapsed().as_secs_f64();
        metrics::histogram!("atelier_model_load_seconds", "model" => name.to_string()).record(secs);
        tracing::info!(model = name, path = %path.display(), ?device, sessions = opts.sessions, batching, warmed = warm.len(), load_secs = secs, "model loaded");
        Ok(Model {
            name: name.into(),
            input,
            output,
            outputs,
            input_shape,
            device,
            batching,
            stats,
            queue: tx,
        })
    }

    /// Runs one input (batch axis of size 1) and returns its (first)
    /// output. Blocks: call from the blocking pool.
    pub fn run(&self, input: ArrayD<f32>) -> Result<ArrayD<f32>, InferenceError> {
        self.run_all(input)?
            .into_iter()
            .next()
            .ok_or_else(|| InferenceError::Run {
                model: self.name.clone(),
                reason: "no output".into(),
            })
    }

    /// Runs one input and returns every requested output, in order.
    pub fn run_all(&self, input: ArrayD<f32>) -> Result<Vec<ArrayD<f32>>, InferenceError> {
        let (reply, rx) = sync_channel(1);
        self.queue
            .send(Request { input, reply })
            .map_err(|_| InferenceError::Run {
                model: self.name.clone(),
                reason: "runner stopped".into(),
            })?;
        rx.recv().map_err(|_| InferenceError::Run {
            model: self.name.clone(),
            reason: "runner stopped".into(),
        })?
    }
}

fn run_session(
    s: &mut Session,
    model: &str,
    input: &str,
    wanted: &[String],
    x: &ArrayD<f32>,
) -> Result<Vec<ArrayD<f32>>, InferenceError> {
    let err = |e: String| InferenceError::Run {
        model: model.into(),
        reason: e,
    };
    let t = Instant::now();
    let tensor = TensorRef::from_array_view(x.view()).map_err(|e| err(e.to_string()))?;
    let outputs = s
        .run(ort::inputs![input => tensor])
        .map_err(|e| err(e.to_string()))?;
    let mut ys = Vec::with_capacity(wanted.len());
    for output in wanted {
        let y = outputs
            .get(output.as_str())
            .ok_or_else(|| err(format!("no output named {output}")))?
            .try_extract_array::<f32>()
            .map_err(|e| err(e.to_string()))?
            .to_owned();
        ys.push(y);
    }
    metrics::histogram!("atelier_inference_seconds", "model" => model.to_string())
        .record(t.elapsed().as_secs_f64());
    Ok(ys)
}

/// One run of `x` with ONNX Runtime's CPU arena shrinkage: the arena's
/// chunks no run is using go back to the system.
fn release_arena(s: &mut Session, model: &str, input: &str, x: &ArrayD<f32>, stats: &RunStats) {
    let t = Instant::now();
    let done = ort::session::RunOptions::new().and_then(|mut o| {
        o.set("memory.enable_memory_arena_shrinkage", "cpu:0")?;
        let tensor = TensorRef::from_array_view(x.view())?;
        s.run_with_options(ort::inputs![input => tensor], &o)
            .map(|_| ())
    });
    match done {
        Ok(()) => {
            stats.releases.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("atelier_model_arena_releases_total", "model" => model.to_string())
                .increment(1);
            tracing::debug!(
                model,
                secs = t.elapsed().as_secs_f64(),
                "idle: arena memory released"
            );
        }
        Err(e) => tracing::warn!(model, error = %e, "idle: releasing the arena failed"),
    }
}

#[allow(clippy::too_many_arguments)]
fn runner(
    mut s: Session,
    model: &str,
    input: &str,
    output: &[String],
    rx: &Mutex<Receiver<Request>>,
    max_batch: usize,
    window: Duration,
    stats: &RunStats,
    release: Option<(Duration, ArrayD<f32>)>,
) {
    // Whether the arena may hold memory a release would give back.
    let mut holding = true;
    loop {
        let mut batch = Vec::with_capacity(max_batch);
        // Requests of another shape wait for their own run after this batch,
        // outside the lock, so other runners keep gathering meanwhile.
        let mut others = Vec::new();
        {
            let Ok(rx) = rx.lock() else { return };
            let first = match &release {
                Some((idle, _)) if holding => match rx.recv_timeout(*idle) {
                    Ok(r) => Ok(r),
                    Err(RecvTimeoutError::Timeout) => Err(true),
                    Err(RecvTimeoutError::Disconnected) => Err(false),
                },
                _ => rx.recv().map_err(|_| false),
            };
            match first {
                Ok(r) => batch.push(r),
                Err(true) => {
                    drop(rx);
                    if let Some((_, x)) = &release {
                        release_arena(&mut s, model, input, x, stats);
                    }
                    holding = false;
                    continue;
                }
                Err(false) => return, // the model was dropped
            }
            let deadline = Instant::now() + window;
            while batch.len() < max_batch {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(r) if r.input.shape() == batch[0].input.shape() => batch.push(r),
                    Ok(r) => others.push(r),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        holding = true;
        run_batch(&mut s, model, input, output, batch, stats);
        for r in others {
            run_batch(&mut s, model, input, output, vec![r], stats);
        }
    }
}

/// Runs requests of one shape as one session run and answers each.
fn run_batch(
    s: &mut Session,
    model: &str,
    input: &str,
    output: &[String],
    mut batch: Vec<Request>,
    stats: &RunStats,
) {
    metrics::histogram!("atelier_batch_size", "model" => model.to_string())
        .record(batch.len() as f64);
    stats.runs.fetch_add(1, Ordering::Relaxed);
    stats
        .requests
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    if batch.len() == 1 {
        let r = batch.pop().expect("one request");
        let y = run_session(s, model, input, output, &r.input);
        let _ = r.reply.send(y);
        return;
    }
    let views: Vec<_> = batch.iter().map(|r| r.input.view()).collect();
    let stacked = match ndarray::concatenate(Axis(0), &views) {
        Ok(x) => x,
        Err(e) => {
            for r in batch {
                let _ = r.reply.send(Err(InferenceError::Run {
                    model: model.into(),
                    reason: e.to_string(),
                }));
            }
            return;
        }
    };
    let rows: usize = batch
        .iter()
        .map(|r| r.input.shape().first().copied().unwrap_or(1))
        .sum();
    match run_session(s, model, input, output, &stacked) {
        Ok(ys) if ys.iter().any(|y| y.shape().first().copied() != Some(rows)) => {
            let reason = format!(
                "output batch axes {:?} do not match {rows} batched inputs",
                ys.iter()
                    .map(|y| y.shape().first().copied())
                    .collect::<Vec<_>>()
            );
            for r in batch {
                let _ = r.reply.send(Err(InferenceError::Run {
                    model: model.into(),
                    reason: reason.clone(),
                }));
            }
        }
        Ok(ys) => {
            let per = rows / batch.len().max(1);
            for (i, r) in batch.into_iter().enumerate() {
                let parts = ys
                    .iter()
                    .map(|y| {
                        y.slice_axis(Axis(0), ndarray::Slice::from(i * per..(i + 1) * per))
                            .to_owned()
                    })
                    .collect();
                let _ = r.reply.send(Ok(parts));
            }
        }
        Err(e) => {
            for r in batch {
                let _ = r.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Models loaded by this process, by name.
#[derive(Default, Clone)]
pub struct ModelRegistry {
    models: HashMap<String, Arc<Model>>,
}

impl ModelRegistry {
    pub fn insert(&mut self, model: Model) {
        self.models.insert(model.name.clone(), Arc::new(model));
    }

    pub fn get(&self, name: &str) -> Result<Arc<Model>, InferenceError> {
        self.models
            .get(name)
            .cloned()
            .ok_or_else(|| InferenceError::Missing(name.into()))
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.models.keys().cloned().collect();
        v.sort();
        v
    }
}

/// Models loaded by this process, by path and requested outputs: a model is
/// loaded once per process however many pipelines ask for it.
type LoadedKey = (PathBuf, Vec<String>);
static LOADED: OnceLock<Mutex<HashMap<LoadedKey, Arc<Model>>>> = OnceLock::new();

/// Loads `path` once per process and shares it.
pub fn load_shared(
    rt: &Runtime,
    name: &str,
    path: &Path,
    opts: ModelOptions,
) -> Result<Arc<Model>, InferenceError> {
    load_shared_outputs(rt, name, path, opts, &[])
}

/// As [`load_shared`], fetching the named outputs.
pub fn load_shared_outputs(
    rt: &Runtime,
    name: &str,
    path: &Path,
    opts: ModelOptions,
    outputs: &[&str],
) -> Result<Arc<Model>, InferenceError> {
    let cache = LOADED.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = cache.lock().map_err(|_| InferenceError::Load {
        model: name.into(),
        reason: "model cache poisoned".into(),
    })?;
    let key = (
        path.to_path_buf(),
        outputs.iter().map(|o| o.to_string()).collect::<Vec<_>>(),
    );
    if let Some(m) = map.get(&key) {
        return Ok(m.clone());
    }
    if !path.exists() {
        return Err(InferenceError::Load {
            model: name.into(),
            reason: format!(
                "{} does not exist (run scripts/fetch-models)",
                path.display()
            ),
        });
    }
    let m = Arc::new(Model::load_outputs(rt, name, path, opts, outputs)?);
    map.insert(key, m.clone());
    Ok(m)
}

/// The models directory of this checkout, for tests and benches:
/// `ATELIER_MODELS__DIR`, else `<workspace>/models`.
/// The process's ONNX Runtime, as configured (`worker.device`, threads).
pub fn runtime_for(cfg: &atelier_shared::config::Config) -> Result<Arc<Runtime>, InferenceError> {
    Runtime::get(&RuntimeOptions {
        library: Some(cfg.models.onnxruntime_lib()),
        device: cfg.worker.device,
        intra_threads: cfg.worker.inference_threads,
        cpu_arena: cfg.models.cpu_arena,
    })
}

pub fn default_models_dir() -> PathBuf {
    std::env::var_os("ATELIER_MODELS__DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("models")
        })
}

/// The CPU runtime from this checkout's `models/` (scripts/fetch-models
/// installs it), for the crate's tests. One per process: the first caller's
/// options win, as with [`Runtime::get`].
#[cfg(test)]
pub(crate) fn test_runtime() -> Arc<Runtime> {
    let lib = default_models_dir().join("onnxruntime/libonnxruntime.so.1.31.1");
    Runtime::get(&RuntimeOptions {
        library: Some(lib),
        device: Device::Cpu,
        intra_threads: 2,
        cpu_arena: true,
    })
    .expect("ONNX Runtime loads (scripts/fetch-models installs it)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> Arc<Runtime> {
        test_runtime()
    }

    fn test_model(opts: ModelOptions) -> Model {
        let path = default_models_dir().join("test/conv_sigmoid.onnx");
        Model::load(&runtime(), "conv_sigmoid", &path, opts)
            .expect("test model loads (scripts/fetch-models --test-models)")
    }

    fn input(seed: f32, h: usize, w: usize) -> ArrayD<f32> {
        ArrayD::from_shape_fn(IxDyn(&[1, 3, h, w]), |d| {
            ((d[1] * 31 + d[2] * 7 + d[3]) as f32 * 0.01 + seed).sin()
        })
    }

    /// Full graph optimisation changes ISNet's speed, not its answer: the
    /// saliency map of the test garment under `ORT_ENABLE_ALL` matches the
    /// one under `ORT_ENABLE_LAYOUT` (the level the worker used before).
    #[test]
    fn full_graph_optimisation_keeps_isnets_output() {
        let rt = runtime();
        let path = default_models_dir().join("isnet_fp16.onnx");
        let img =
            image::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/garment.jpg"))
                .expect("testdata/garment.jpg")
                .resize_exact(1024, 1024, image::imageops::FilterType::Triangle)
                .to_rgb8();
        let n = 1024 * 1024;
        let mut x = vec![0f32; 3 * n];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                x[c * n + i] = (f32::from(p.0[c]) - 128.0) / 256.0;
            }
        }
        let x = ArrayD::from_shape_vec(IxDyn(&[1, 3, 1024, 1024]), x).expect("shape");
        let mut outputs = Vec::new();
        for level in [GraphOptimizationLevel::Level3, GraphOptimizationLevel::All] {
            let (mut s, _) = rt
                .session_at("isnet", &path, level)
                .expect("ISNet (scripts/fetch-models)");
            let input = s.inputs()[0].name().to_string();
            let output = s.outputs()[0].name().to_string();
            let y = run_session(&mut s, "isnet", &input, &[output], &x).expect("runs");
            outputs.push(y.into_iter().next().expect("one output"));
        }
        let (a, b) = (&outputs[0], &outputs[1]);
        assert_eq!(a.shape(), b.shape());
        let worst = a
            .iter()
            .zip(b.iter())
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        let range =
            a.iter().fold(f32::MIN, |m, v| m.max(*v)) - a.iter().fold(f32::MAX, |m, v| m.min(*v));
        assert!(
            worst <= 0.01 * range,
            "largest difference {worst} of a range of {range}"
        );
    }

    #[test]
    fn an_idle_model_gives_its_arena_back_once_and_keeps_serving() {
        let m = test_model(ModelOptions {
            release_idle: Some(Duration::from_millis(100)),
            ..ModelOptions::default()
        });
        let releases = || m.stats.releases.load(Ordering::Relaxed);
        m.run(input(0.0, 64, 64)).expect("runs");
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(releases(), 1, "one release after the idle period");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(releases(), 1, "nothing more to release without runs");
        let y = m.run(input(0.5, 32, 32)).expect("runs after a release");
        assert_eq!(y.shape(), &[1, 1, 32, 32]);
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(releases(), 2, "released again after the next run");
        assert_eq!(m.stats.snapshot().0, 2, "releases are not counted as runs");
        let kept = test_model(ModelOptions {
            release_idle: None,
            ..ModelOptions::default()
        });
        kept.run(input(0.0, 64, 64)).expect("runs");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(kept.stats.releases.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn runs_a_real_model_with_dynamic_sizes() {
        let m = test_model(ModelOptions::default());
        assert_eq!(m.input_shape.len(), 4);
        let y = m.run(input(0.0, 16, 24)).expect("runs");
        assert_eq!(y.shape(), &[1, 1, 16, 24]);
        assert!(
            y.iter().all(|v| (0.0..=1.0).contains(v)),
            "sigmoid output range"
        );
        let y2 = m.run(input(0.0, 8, 8)).expect("another size");
        assert_eq!(y2.shape(), &[1, 1, 8, 8]);
    }

    #[test]
    fn concurrent_requests_are_batched_and_answered_correctly() {
        let single = test_model(ModelOptions::default());
        let batched = Arc::new(test_model(ModelOptions {
            sessions: 1,
            batch_window: Duration::from_millis(50),
            max_batch: 8,
            ..ModelOptions::default()
        }));
        assert!(batched.batching, "dynamic batch axis allows batching");
        let expected: Vec<ArrayD<f32>> = (0..8)
            .map(|i| single.run(input(i as f32, 32, 32)).expect("runs"))
            .collect();
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let m = batched.clone();
                std::thread::spawn(move || m.run(input(i as f32, 32, 32)).expect("runs"))
            })
            .collect();
        let got: Vec<ArrayD<f32>> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        for (g, e) in got.iter().zip(&expected) {
            let diff = (g - e).iter().fold(0f32, |a, b| a.max(b.abs()));
            assert!(diff < 1e-5, "batched result differs by {diff}");
        }
        let (runs, requests) = batched.stats.snapshot();
        assert_eq!(requests, 8);
        assert!(
            runs < 8,
            "8 concurrent requests ran as {runs} session runs: no batching happened"
        );
    }

    #[test]
    fn a_missing_model_is_a_typed_error() {
        let e = Model::load(
            &runtime(),
            "nope",
            Path::new("/nonexistent/model.onnx"),
            ModelOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, InferenceError::Load { .. }), "{e}");
        assert!(matches!(
            ModelRegistry::default().get("isnet"),
            Err(InferenceError::Missing(_))
        ));
    }
}
