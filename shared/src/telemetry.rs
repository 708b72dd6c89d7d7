//! Logs, traces and metrics. Logs are pretty by default, JSON with
//! `log.format = "json"`; spans are exported over OTLP/HTTP when
//! `log.otlp_endpoint` is set; metrics go to one process-wide Prometheus
//! recorder rendered by `/metrics`.
//!
//! Trace context: a job's [`TraceParent`] is the source of truth between
//! processes (request header → job row → task → outcome). Inside a process,
//! [`adopt`] makes a span a child of the hop it continues and [`hop_of`]
//! reads back the context to pass on: the exported span's own ids when
//! export is on, so the next process's spans hang under it; a fresh hop of
//! the same trace when it is off.

use crate::config::LogConfig;
use crate::domain::trace::TraceParent;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use std::sync::OnceLock;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the OTLP exporter alive; flushes what is buffered when dropped.
#[must_use = "dropping the guard stops trace export"]
pub struct TracingGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("atelier: flushing traces failed: {e}");
        }
    }
}

/// The OTLP/HTTP (JSON) span exporter for a collector's base URL; spans go
/// to `<endpoint>/v1/traces`, batched on the SDK's own thread.
fn otlp_provider(
    endpoint: &str,
    service: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .with_timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_string())
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Installs the global subscriber (logs, and OTLP export when configured);
/// later calls are no-ops (tests start many apps in one process).
/// `service` names the exported spans unless `log.service_name` does.
pub fn init_tracing(log: &LogConfig, service: &str) -> TracingGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (json, pretty) = if log.format == "json" {
        (
            Some(tracing_subscriber::fmt::layer().json().with_target(false)),
            None,
        )
    } else {
        (
            None,
            Some(tracing_subscriber::fmt::layer().with_target(false)),
        )
    };
    let mut provider = None;
    let mut export_error = None;
    if let Some(endpoint) = &log.otlp_endpoint {
        let name = if log.service_name.is_empty() {
            service
        } else {
            &log.service_name
        };
        match otlp_provider(endpoint, name) {
            Ok(p) => provider = Some(p),
            Err(e) => export_error = Some(e),
        }
    }
    let otel = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(p.tracer("atelier"))
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(json)
        .with(pretty)
        .with(otel)
        .try_init()
        .is_ok();
    if let Some(e) = export_error {
        tracing::error!(error = %e, "spans are not exported");
    } else if installed && let Some(endpoint) = &log.otlp_endpoint {
        tracing::info!(endpoint = %endpoint, "exporting spans over OTLP/HTTP");
    }
    TracingGuard {
        provider: provider.filter(|_| installed),
    }
}

/// Makes `span` a child of `parent` (a hop received from another process)
/// in the exported trace. No effect while export is off.
pub fn adopt(span: &tracing::Span, parent: &TraceParent) {
    let remote = SpanContext::new(
        TraceId::from_bytes(parent.trace_id.to_be_bytes()),
        SpanId::from_bytes(parent.span_id.to_be_bytes()),
        if parent.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        },
        true,
        TraceState::default(),
    );
    // `set_parent` reports whether a tracing layer took it; without the
    // OpenTelemetry layer there is nothing to attach to.
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The context to pass on from `span`: the exported span itself when
/// export is on, else a new hop after `parent` (or a new trace).
pub fn hop_of(span: &tracing::Span, parent: Option<&TraceParent>) -> TraceParent {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        return TraceParent {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            sampled: sc.is_sampled(),
        };
    }
    parent.map_or_else(TraceParent::root, TraceParent::child)
}

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus handle, installing the recorder on first use.
pub fn metrics() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let secs = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0,
            ];
            let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
            // Every histogram has buckets (a summary has no `_bucket` series
            // for `histogram_quantile` across replicas).
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &secs)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("atelier_batch_size".into()), &sizes)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("atelier_admission_batch_jobs".into()),
                        &sizes,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(h) => {
                    crate::metric_catalogue::describe();
                    h
                }
                // Another recorder is installed (e.g. by an embedding program):
                // render an empty, detached registry rather than fail.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

    #[test]
    fn a_hop_continues_the_remote_parent_and_passes_on_its_own_span() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let parent = TraceParent::root();
        let next = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("hop");
            adopt(&span, &parent);
            let next = hop_of(&span, Some(&parent));
            drop(span);
            next
        });
        assert_eq!(next.trace_id, parent.trace_id);
        assert_ne!(next.span_id, parent.span_id);
        let spans = exporter.get_finished_spans().expect("spans");
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(
            s.span_context.trace_id().to_bytes(),
            parent.trace_id.to_be_bytes()
        );
        assert_eq!(s.parent_span_id.to_bytes(), parent.span_id.to_be_bytes());
        assert_eq!(
            s.span_context.span_id().to_bytes(),
            next.span_id.to_be_bytes(),
            "the next process hangs under this span"
        );
    }

    #[test]
    fn without_export_a_hop_is_a_new_span_of_the_same_trace() {
        let parent = TraceParent::root();
        let span = tracing::info_span!("hop");
        adopt(&span, &parent);
        let next = hop_of(&span, Some(&parent));
        assert_eq!(next.trace_id, parent.trace_id);
        assert_ne!(next.span_id, parent.span_id);
        assert_ne!(
            hop_of(&span, None).trace_id,
            parent.trace_id,
            "no parent: a new trace"
        );
    }
}
