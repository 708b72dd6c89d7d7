//! Every metric Atelier exports: its type, its labels and what it means.
//! The recorder describes each one (`# HELP` on `/metrics`), counters
//! without labels exist from the start (at 0), and a test checks that the
//! code records nothing outside this list and that the Grafana dashboard
//! queries only what is here, with its type.
//!
//! Label values are bounded: `route` is the matched route template,
//! `type` a job kind or work queue, `queue`, `listener`, `model`,
//! `engine`, `outcome`, `status`, `stage`, `state` and `reason` come from
//! fixed sets. `account` (on `atelier_in_flight`) has one series per account
//! with work in flight, removed when it has none: serve `/metrics` on the
//! operations listener (`server.admin_listen`) to keep it off the data port.

/// A metric's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The word of a `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn m(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

use Kind::{Counter, Gauge, Histogram};

pub const CATALOGUE: &[Metric] = &[
    // HTTP edge.
    m(
        "atelier_http_requests_total",
        Counter,
        &["route", "status"],
        "HTTP requests answered, by route template and status code.",
    ),
    m(
        "atelier_http_request_duration_seconds",
        Histogram,
        &["route"],
        "Time to answer an HTTP request (to the first byte of the body), seconds.",
    ),
    m(
        "atelier_http_connections",
        Gauge,
        &["listener"],
        "Connections a listener holds.",
    ),
    m(
        "atelier_http_connections_refused_total",
        Counter,
        &["listener"],
        "Connections refused with 503 because the listener held server.max_connections.",
    ),
    m(
        "atelier_http_connections_closed_total",
        Counter,
        &["listener", "reason"],
        "Connections the server closed: header_timeout (no whole request head in time) or idle.",
    ),
    m(
        "atelier_http_slow_bodies_total",
        Counter,
        &["listener"],
        "Requests answered 408 because their body came too slowly.",
    ),
    m(
        "atelier_rate_limit_degraded_total",
        Counter,
        &[],
        "Rate-limit checks made per replica because Redis did not answer.",
    ),
    m(
        "atelier_sse_connections",
        Gauge,
        &[],
        "Open event streams (GET /notifications/events).",
    ),
    m(
        "atelier_sse_streams_total",
        Counter,
        &[],
        "Event streams opened.",
    ),
    m(
        "atelier_sse_revoked_total",
        Counter,
        &[],
        "Event streams ended because their API key was revoked or expired.",
    ),
    // Jobs, queues, scheduling.
    m(
        "atelier_jobs_created_total",
        Counter,
        &["type"],
        "Jobs admitted, by kind.",
    ),
    m(
        "atelier_regenerations_total",
        Counter,
        &["type"],
        "Outputs regenerated on request, by job kind.",
    ),
    m(
        "atelier_tasks_dispatched_total",
        Counter,
        &["type"],
        "Tasks published to a work queue, by queue.",
    ),
    m(
        "atelier_dispatch_rereads_total",
        Counter,
        &["type"],
        "Dispatch rounds that read the waiting accounts again with the whole target each: an account read short had all of its outputs picked.",
    ),
    m(
        "atelier_tasks_total",
        Counter,
        &["type", "outcome"],
        "Task reports applied by the scheduler, by queue and outcome.",
    ),
    m(
        "atelier_retries_total",
        Counter,
        &["type"],
        "Attempts scheduled again after a retryable failure, by queue.",
    ),
    m(
        "atelier_leases_reaped_total",
        Counter,
        &[],
        "Leases that ran out (a worker lost or hung) and were turned into retryable failures.",
    ),
    m(
        "atelier_unreadable_jobs_total",
        Counter,
        &[],
        "Jobs this version cannot read (left for a version that can).",
    ),
    m(
        "atelier_queue_depth",
        Gauge,
        &["queue"],
        "Messages ready in a queue.",
    ),
    m(
        "atelier_queue_dead_letters_total",
        Counter,
        &["queue"],
        "Messages moved to <queue>.dead after too many deliveries.",
    ),
    m(
        "atelier_outputs_open",
        Gauge,
        &["queue", "state"],
        "Open outputs by queue and state (pending, dispatched, running).",
    ),
    m(
        "atelier_workers_alive",
        Gauge,
        &["queue"],
        "Workers whose presence record is fresh (renewed within three `worker.presence_secs`), per work queue they consume.",
    ),
    m(
        "atelier_queue_oldest_waiting_seconds",
        Gauge,
        &["queue"],
        "Seconds the longest-waiting due output of a work queue has waited for a worker (0: none waits).",
    ),
    m(
        "atelier_credit_audit_problems",
        Gauge,
        &[],
        "Disagreements the last credit audit found (reservations vs open outputs, accounts vs reservations); 0 when the books agree.",
    ),
    m(
        "atelier_in_flight",
        Gauge,
        &["account"],
        "Outputs holding a lease, per account with any (series removed at 0).",
    ),
    m(
        "atelier_outbox_lag_seconds",
        Gauge,
        &[],
        "Age of the oldest outbox row not yet relayed, seconds.",
    ),
    m(
        "atelier_credits_reserved",
        Gauge,
        &[],
        "Credits reserved by open outputs, all accounts.",
    ),
    m(
        "atelier_credits_charged_millicredits_total",
        Counter,
        &[],
        "Credits charged since the ledger began, in thousandths of a credit (from the ledger: the same on every scheduler; aggregate with max).",
    ),
    m(
        "atelier_credits_released_millicredits_total",
        Counter,
        &[],
        "Reserved credits released without a charge since the ledger began, in thousandths of a credit (aggregate with max).",
    ),
    // Notifications and webhooks.
    m(
        "atelier_notifications_relayed_total",
        Counter,
        &[],
        "Notifications relayed to the event bus.",
    ),
    m(
        "atelier_notification_relay_lag_seconds",
        Gauge,
        &[],
        "Age of the oldest notification not yet relayed, seconds.",
    ),
    m(
        "atelier_event_bus_live",
        Gauge,
        &[],
        "1 while this process's event bus (Redis pub/sub, or in-process) delivers live events, else 0.",
    ),
    m(
        "atelier_events_publish_failures_total",
        Counter,
        &[],
        "Live events the bus could not publish (streams fall back to re-reading the store).",
    ),
    m(
        "atelier_webhook_deliveries_total",
        Counter,
        &["outcome"],
        "Webhook delivery attempts, by outcome.",
    ),
    m(
        "atelier_webhook_attempt_seconds",
        Histogram,
        &[],
        "Time of one webhook delivery attempt, seconds.",
    ),
    m(
        "atelier_webhook_backlog",
        Gauge,
        &[],
        "Webhook deliveries due or waiting for a retry.",
    ),
    // Workers and models.
    m(
        "atelier_worker_tasks_total",
        Counter,
        &["type", "outcome"],
        "Tasks a worker settled, by queue and outcome.",
    ),
    m(
        "atelier_task_duration_seconds",
        Histogram,
        &["type", "stage"],
        "Time a worker spent on a task, by queue and stage, seconds.",
    ),
    m(
        "atelier_inference_seconds",
        Histogram,
        &["model"],
        "Time of one model inference (one batch), seconds.",
    ),
    m(
        "atelier_admission_batch_jobs",
        Histogram,
        &[],
        "Jobs written by one group-admission statement (PostgreSQL).",
    ),
    m(
        "atelier_batch_size",
        Histogram,
        &["model"],
        "Images in one inference batch.",
    ),
    m(
        "atelier_model_load_seconds",
        Histogram,
        &["model"],
        "Time to load and warm a model, seconds.",
    ),
    m(
        "atelier_model_arena_releases_total",
        Counter,
        &["model"],
        "Times a model's CPU memory arena was given back after being idle.",
    ),
    m(
        "atelier_generator_seconds",
        Histogram,
        &["engine"],
        "Time of one call to a generator container, seconds.",
    ),
    m(
        "atelier_generator_busy_total",
        Counter,
        &["engine"],
        "Calls a generator container refused as busy.",
    ),
    m(
        "atelier_training_events_total",
        Counter,
        &["status"],
        "Trainer webhook events received, by status.",
    ),
    m(
        "atelier_training_reattached_total",
        Counter,
        &[],
        "Trainings a restarted worker re-attached to instead of starting again.",
    ),
    // Process.
    m(
        "atelier_build_info",
        Gauge,
        &["version"],
        "Always 1; the version of this binary.",
    ),
    m(
        "atelier_allocator_allocated_bytes",
        Gauge,
        &[],
        "Bytes the allocator has handed out (jemalloc).",
    ),
    m(
        "atelier_allocator_resident_bytes",
        Gauge,
        &[],
        "Bytes the allocator holds in physical memory (jemalloc).",
    ),
    m(
        "process_resident_memory_bytes",
        Gauge,
        &[],
        "Resident memory of this process, bytes.",
    ),
    m(
        "process_virtual_memory_bytes",
        Gauge,
        &[],
        "Virtual memory of this process, bytes.",
    ),
    m(
        "process_open_fds",
        Gauge,
        &[],
        "Open file descriptors of this process.",
    ),
    m(
        "process_max_fds",
        Gauge,
        &[],
        "The soft open-file limit of this process.",
    ),
    m("process_threads", Gauge, &[], "Threads of this process."),
    m(
        "process_cpu_seconds_total",
        Counter,
        &[],
        "CPU time (user and system) this process used, seconds.",
    ),
    m(
        "process_start_time_seconds",
        Gauge,
        &[],
        "When this process started, seconds since the Unix epoch.",
    ),
];

/// Gauges that count things and so truthfully start at 0 (a gauge like
/// `atelier_event_bus_live` does not: it is absent until known).
const ZERO_GAUGES: &[&str] = &["atelier_sse_connections"];

/// The catalogue's entry for `name`.
pub fn find(name: &str) -> Option<&'static Metric> {
    CATALOGUE.iter().find(|m| m.name == name)
}

/// Describes every metric to the installed recorder and creates the
/// unlabelled counters at 0, so that a query for one finds a series from
/// the first scrape.
pub fn describe() {
    for m in CATALOGUE {
        match m.kind {
            Kind::Counter => {
                metrics::describe_counter!(m.name, m.help);
                if m.labels.is_empty() {
                    metrics::counter!(m.name).increment(0);
                }
            }
            Kind::Gauge => {
                metrics::describe_gauge!(m.name, m.help);
                if ZERO_GAUGES.contains(&m.name) {
                    metrics::gauge!(m.name).set(0.0);
                }
            }
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
    metrics::gauge!("atelier_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Reads this process's figures from `/proc` into the `process_*` gauges
/// (Linux; elsewhere nothing is set). Called before each render.
pub fn refresh_process() {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    if let Some(v) = kb("VmRSS:") {
        metrics::gauge!("process_resident_memory_bytes").set(v * 1024.0);
    }
    if let Some(v) = kb("VmSize:") {
        metrics::gauge!("process_virtual_memory_bytes").set(v * 1024.0);
    }
    if let Some(v) = kb("Threads:") {
        metrics::gauge!("process_threads").set(v);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("process_open_fds").set(fds.count() as f64);
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
        && let Some(soft) = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<f64>().ok())
    {
        metrics::gauge!("process_max_fds").set(soft);
    }
    // /proc/self/stat: fields after the command's closing parenthesis;
    // utime and stime are the 12th and 13th of those, starttime the 20th,
    // in clock ticks (USER_HZ, 100 on Linux).
    const TICKS: f64 = 100.0;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some((_, rest)) = stat.rsplit_once(')')
    {
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (num(11), num(12)) {
            metrics::counter!("process_cpu_seconds_total").absolute(((u + s) / TICKS) as u64);
        }
        if let (Some(start), Some(boot)) = (num(19), boot_time()) {
            metrics::gauge!("process_start_time_seconds").set(boot + start / TICKS);
        }
    }
}

/// When the machine booted, seconds since the Unix epoch (`btime`).
fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for m in CATALOGUE {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(
                m.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit()),
                "{}",
                m.name
            );
            assert_eq!(
                m.name.ends_with("_total"),
                m.kind == Kind::Counter,
                "counters and only counters end in _total: {}",
                m.name
            );
            assert!(!m.help.is_empty(), "{}", m.name);
        }
    }

    /// Every metric the code records is in the catalogue, with its type:
    /// the sources are read for `metrics::counter!("…"` and its kin.
    #[test]
    fn the_code_records_only_catalogued_metrics() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        for dir in [
            "api/src",
            "scheduler/src",
            "worker/src",
            "shared/src",
            "src",
        ] {
            collect_rs(&root.join(dir), &mut files);
        }
        let mut found = 0;
        for file in files {
            if file.ends_with("metric_catalogue.rs") {
                continue; // names held in variables, and this scan's own words
            }
            let text = std::fs::read_to_string(&file).expect("source");
            for (kind, macro_name) in [
                (Kind::Counter, "metrics::counter!("),
                (Kind::Gauge, "metrics::gauge!("),
                (Kind::Histogram, "metrics::histogram!("),
            ] {
                for (at, _) in text.match_indices(macro_name) {
                    let rest = text[at + macro_name.len()..].trim_start();
                    let Some(name) = rest
                        .strip_prefix('"')
                        .and_then(|r| r.split_once('"'))
                        .map(|(n, _)| n)
                    else {
                        continue; // a name held in a variable (this module)
                    };
                    found += 1;
                    let m = find(name).unwrap_or_else(|| {
                        panic!("{} records {name}, which is not catalogued", file.display())
                    });
                    assert_eq!(m.kind, kind, "{name} in {}", file.display());
                }
            }
        }
        assert!(
            found > 40,
            "only {found} metric uses found: is the scan broken?"
        );
    }

    fn collect_rs(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).expect("source dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                collect_rs(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
}
