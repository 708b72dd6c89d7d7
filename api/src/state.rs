//! What every handler reads: the adapters, the configuration and the
//! values built from it once at start.

use crate::error::ApiError;
use crate::limits::Limiter;
use atelier_shared::config::Config;
use atelier_shared::db::Store;
use atelier_shared::domain::engines::EngineAvailability;
use atelier_shared::domain::policy::ContentPolicy;
use atelier_shared::egress::EgressPolicy;
use atelier_shared::events::EventBus;
use atelier_shared::storage::{DynObjectStore, Links, Signer};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub objects: DynObjectStore,
    pub signer: Signer,
    pub limiter: Arc<Limiter>,
    pub config: Arc<Config>,
    /// Per job kind, the engines clients may name (`options.model`) and
    /// what `auto` tries.
    pub engines: Arc<EngineAvailability>,
    /// What generative prompts may not name (real people).
    pub policy: Arc<ContentPolicy>,
    pub links: Links,
    pub events: EventBus,
    /// Outbound URLs a client gives (webhooks, profile photos) are checked
    /// against it at the edge.
    pub egress: EgressPolicy,
    /// Fires when the server stops: long-lived responses (SSE) end with it.
    pub shutdown: CancellationToken,
    /// Open event streams per account.
    pub streams: Arc<crate::routes::notifications::StreamSlots>,
    /// What `/readyz` checks: the database and the object store, and what
    /// the process's other roles add.
    pub probes: Arc<crate::routes::health::Probes>,
    /// The queue, for the operator view (depths, dead letters); `None`:
    /// those routes answer 503.
    pub queue: Option<atelier_shared::queue::DynQueue>,
}

/// In-process buckets, shared through Redis when `redis.url` is set.
fn limiter(config: &Config) -> Limiter {
    let mut l = Limiter::new(
        config.limits.requests_per_minute,
        config.limits.create_per_minute,
    );
    if let Some(url) = &config.redis.url
        && let Err(e) = l.share_through_redis(url, &config.redis.prefix)
    {
        tracing::error!(error = %e, "rate limits stay per replica");
    }
    l
}

/// What the API takes from the configuration's targets (parsed once, by
/// `Config::targets`).
pub struct Edge {
    pub egress: EgressPolicy,
    pub links: Links,
    /// Per job kind, the engines this server runs.
    pub engines: EngineAvailability,
}

impl AppState {
    pub fn new(
        config: Arc<Config>,
        edge: Edge,
        store: Store,
        objects: DynObjectStore,
        signer: Signer,
        events: EventBus,
    ) -> AppState {
        AppState {
            links: edge.links,
            events,
            egress: edge.egress,
            shutdown: CancellationToken::new(),
            streams: Arc::default(),
            probes: Arc::new(crate::routes::health::Probes {
                store: Some(store.clone()),
                objects: Some(objects.clone()),
                ..Default::default()
            }),
            queue: None,
            store,
            objects,
            signer,
            limiter: Arc::new(limiter(&config)),
            engines: Arc::new(edge.engines),
            policy: Arc::new(ContentPolicy::new(&config.identity.blocked_terms)),
            config,
        }
    }

    /// Absolute URL of an API path (public base + optional prefix).
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}{}{}",
            self.config.server.public_url.trim_end_matches('/'),
            self.config.server.prefix,
            path
        )
    }

    /// A URL that reads one stored object without credentials, valid `ttl`.
    pub async fn object_url(
        &self,
        key: &str,
        content_type: &str,
        ttl: Duration,
    ) -> Result<String, ApiError> {
        Ok(self.links.object_url(key, content_type, ttl).await?)
    }

    /// Tells the work of aborted outputs (`(output, attempt)`, as
    /// `Store::abort_job` returns them) to stop: a marker each, which the
    /// worker looks for (a model container's prediction or training is
    /// cancelled). If one cannot be written the work runs out and its
    /// result is ignored: the outputs are already cancelled and released.
    pub async fn signal_abort(&self, running: &[(i64, i64)]) {
        for (output, attempt) in running {
            let marker = atelier_shared::domain::task::cancel_marker(*output, *attempt);
            if let Err(e) = self
                .objects
                .put(&marker, bytes::Bytes::from_static(b"aborted"), "text/plain")
                .await
            {
                tracing::warn!(%marker, error = %e, "cannot signal the abort to the worker");
            }
        }
    }

    /// How long result URLs in answers stay valid.
    /// Deletes objects nothing refers to any more (a refused or replaced
    /// image, a deleted identity's files); one that cannot be deleted is
    /// logged and stays orphaned.
    pub async fn erase(&self, keys: &[String]) {
        for k in keys {
            if let Err(e) = self.objects.delete(k).await {
                tracing::warn!(key = %k, error = %e, "cannot erase an object; it stays orphaned");
            }
        }
    }

    pub fn result_ttl(&self) -> Duration {
        Duration::from_secs(self.config.limits.result_url_ttl_secs)
    }
}
