//! Health, readiness, metrics and the answer to paths nothing serves.

use crate::error::ApiError;
use crate::views::{Health, Readiness};
use atelier_shared::db::Store;
use atelier_shared::queue::DynQueue;
use atelier_shared::storage::DynObjectStore;
use axum::Json;
use axum::extract::Extension;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What `/readyz` checks: the dependencies of this process's roles (the
/// database for the API and the scheduler; the queue for the scheduler and
/// workers; the object store for the API and workers; the models for a
/// worker).
#[derive(Clone, Default)]
pub struct Probes {
    pub store: Option<Store>,
    pub queue: Option<DynQueue>,
    pub objects: Option<DynObjectStore>,
    /// Set once a worker has loaded its models (absent: no worker role).
    pub models: Option<Arc<AtomicBool>>,
}

/// How long one dependency may take to answer a probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

async fn probe<E: std::fmt::Display>(
    check: impl std::future::Future<Output = Result<(), E>>,
) -> String {
    match tokio::time::timeout(PROBE_TIMEOUT, check).await {
        Ok(Ok(())) => "ok".into(),
        Ok(Err(e)) => format!("unavailable: {e}"),
        Err(_) => format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
    }
}

impl Probes {
    /// Every check, run at once.
    pub async fn check(&self) -> Readiness {
        use futures::future::OptionFuture;
        // Only the dependencies of this process's roles are probed.
        let database: OptionFuture<_> = self.store.as_ref().map(|s| probe(s.ping())).into();
        let queue: OptionFuture<_> = self
            .queue
            .as_ref()
            .map(|q| {
                probe(async {
                    q.depth(atelier_shared::domain::task::OUTCOME_QUEUE)
                        .await
                        .map(|_| ())
                })
            })
            .into();
        let objects: OptionFuture<_> = self
            .objects
            .as_ref()
            .map(|o| probe(async { o.size("readyz/probe").await.map(|_| ()) }))
            .into();
        let (database, queue, objects) = tokio::join!(database, queue, objects);
        let mut checks = std::collections::BTreeMap::new();
        for (name, result) in [
            ("database", database),
            ("queue", queue),
            ("object_store", objects),
        ] {
            if let Some(r) = result {
                checks.insert(name, r);
            }
        }
        if let Some(models) = &self.models {
            let state = if models.load(Ordering::SeqCst) {
                "ok"
            } else {
                "loading"
            };
            checks.insert("models", state.to_string());
        }
        let ready = checks.values().all(|v| v == "ok");
        Readiness {
            status: if ready { "ready" } else { "not_ready" },
            checks,
        }
    }
}

/// Liveness (unauthenticated).
#[utoipa::path(
    get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "The process serves requests", body = Health)),
)]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness (unauthenticated): 200 when every dependency of this
/// process's roles answers, 503 naming the ones that do not. Kubernetes
/// sends traffic (and rollouts proceed) only to ready pods; `/healthz`
/// stays liveness.
#[utoipa::path(
    get, path = "/readyz", tag = "operations", security(()),
    responses(
        (status = 200, description = "Every dependency answers", body = Readiness),
        (status = 503, description = "A dependency does not answer (named in `checks`)", body = Readiness),
    ),
)]
pub async fn readyz(Extension(probes): Extension<Arc<Probes>>) -> Response {
    let r = probes.check().await;
    let status = if r.status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r)).into_response()
}

/// Prometheus metrics of this process (unauthenticated; keep it off the
/// public network).
#[utoipa::path(
    get, path = "/metrics", tag = "operations", security(()),
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String)),
)]
pub async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        {
            atelier_shared::metric_catalogue::refresh_process();
            atelier_shared::telemetry::metrics().render()
        },
    )
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("No such route")
}
