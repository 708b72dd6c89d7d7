//! `/metrics` as dashboards and alerts use it: every metric described and
//! typed as the catalogue says, and every metric the Grafana dashboard
//! queries exported with the type its query needs.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use atelier_shared::metric_catalogue::{self, Kind};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The series names a PromQL text mentions, with whether each sits directly
/// inside `rate(` or `increase(` (which need a counter or a histogram part).
fn queried(expr: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = expr[i..].starts_with("atelier_") || expr[i..].starts_with("process_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            let before = expr[..i].trim_end();
            let in_rate = before.ends_with("rate(") || before.ends_with("increase(");
            out.push((expr[i..end].to_string(), in_rate));
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// The catalogue name and kind a queried series belongs to.
fn resolve(series: &str) -> (String, Kind) {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix)
            && let Some(m) = metric_catalogue::find(base)
            && m.kind == Kind::Histogram
        {
            return (base.to_string(), Kind::Histogram);
        }
    }
    let m = metric_catalogue::find(series)
        .unwrap_or_else(|| panic!("the dashboard queries {series}, which nothing exports"));
    (series.to_string(), m.kind)
}

/// [`resolve`], checking that `rate()`/`increase()` only runs over a
/// counter or a histogram's parts.
fn checked_series(expr: &str, series: &str, in_rate: bool) -> (String, Kind) {
    let (name, kind) = resolve(series);
    if in_rate {
        assert!(
            kind == Kind::Counter || (kind == Kind::Histogram && series != name),
            "{expr}: rate() over {series}, a {}",
            kind.as_str()
        );
    }
    (name, kind)
}

/// `# TYPE` of every metric in a Prometheus text, and the names with a
/// `# HELP`.
fn scrape(text: &str) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let mut types = BTreeMap::new();
    let mut helps = BTreeSet::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("#"), Some("TYPE"), Some(name), Some(kind)) => {
                types.insert(name.to_string(), kind.to_string());
            }
            (Some("#"), Some("HELP"), Some(name), Some(_)) => {
                helps.insert(name.to_string());
            }
            _ => {}
        }
    }
    (types, helps)
}

/// Metrics that only appear once something rare happened, and why they
/// may be missing from a short run on the model-free engine.
const ONLY_AFTER: &[(&str, &str)] = &[
    ("atelier_inference_seconds", "an ONNX model ran"),
    ("atelier_batch_size", "an ONNX model ran"),
    (
        "atelier_admission_batch_jobs",
        "jobs were admitted on PostgreSQL",
    ),
    ("atelier_model_load_seconds", "an ONNX model was loaded"),
    ("atelier_retries_total", "an attempt failed and was retried"),
    (
        "atelier_queue_dead_letters_total",
        "a message was dead-lettered",
    ),
    (
        "atelier_webhook_deliveries_total",
        "a webhook was delivered",
    ),
    ("atelier_webhook_attempt_seconds", "a webhook was delivered"),
    ("atelier_in_flight", "an output held a lease at the scrape"),
];

/// Every series the Grafana dashboard and the alert rules query is in
/// `types` (a scrape, or several merged) with the type its query needs,
/// but for the [`ONLY_AFTER`] ones.
fn queries_find_their_series(types: &BTreeMap<String, String>, text: &str) {
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/grafana/atelier-dashboard.json"),
    )
    .expect("dashboard");
    let doc: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let mut exprs = Vec::new();
    collect_exprs(&doc, &mut exprs);
    assert!(exprs.len() > 20, "only {} queries found", exprs.len());
    // And every series the alert rules read.
    let rules = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml"),
    )
    .expect("rules");
    exprs.extend(rule_exprs(&rules));
    let mut checked = 0;
    let mut missing = Vec::new();
    for expr in &exprs {
        for (series, in_rate) in queried(expr) {
            let (name, kind) = checked_series(expr, &series, in_rate);
            match types.get(&name) {
                Some(t) => assert_eq!(t, kind.as_str(), "{expr}"),
                None if ONLY_AFTER.iter().any(|(n, _)| *n == name) => {}
                None => missing.push(format!("{name} (in {expr})")),
            }
            checked += 1;
        }
    }
    assert!(
        missing.is_empty(),
        "not exported after a job: {missing:#?}\n{text}"
    );
    assert!(checked > 20, "{checked}");
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_query_what_is_exported_with_its_type() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |_| {}).await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(64, 64), "a.jpg").await;
    let (s, v) = app.post("/create-packshot", packshot_body(&p, &[&f])).await;
    assert_eq!(s, reqwest::StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    app.wait_for_job(&job, Duration::from_secs(60)).await;
    // The scheduler refreshes its gauges every 5 s.
    let t = std::time::Instant::now();
    let text = loop {
        let m = app.metrics().await;
        if m.contains("atelier_queue_depth{") && m.contains("atelier_outputs_open") {
            break m;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "gauges missing: {m}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (types, helps) = scrape(&text);

    // Everything exported is catalogued, typed as catalogued, and described.
    for (name, kind) in &types {
        let m = metric_catalogue::find(name)
            .unwrap_or_else(|| panic!("{name} is exported but not catalogued"));
        assert_eq!(kind, m.kind.as_str(), "{name}");
        assert!(helps.contains(name), "{name} has no # HELP");
    }
    for name in [
        "atelier_build_info",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(types.contains_key(name), "{name} missing:\n{text}");
    }

    queries_find_their_series(&types, &text);
    app.stop().await;
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The `expr` texts of a Prometheus rules file (one-line or `|` blocks).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        if let Some(rest) = line.trim_start().strip_prefix("expr:") {
            if rest.trim() == "|" {
                let mut block = Vec::new();
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty()
                        || lines[i + 1].len() - lines[i + 1].trim_start().len() > indent)
                {
                    i += 1;
                    block.push(lines[i].trim());
                }
                out.push(block.join(" "));
            } else {
                out.push(rest.trim().to_string());
            }
        }
        i += 1;
    }
    out
}

/// The alert rules query only catalogued metrics, with the type their
/// query needs, and the Kubernetes PrometheusRule carries the same groups.
#[test]
fn alert_rules_query_catalogued_metrics_and_match_the_prometheus_rule() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let rules = std::fs::read_to_string(root.join("prometheus/alerts.yml")).expect("rules");
    let exprs = rule_exprs(&rules);
    assert!(exprs.len() >= 8, "{exprs:?}");
    for expr in &exprs {
        let series = queried(expr);
        assert!(!series.is_empty(), "{expr}");
        for (series, in_rate) in series {
            checked_series(expr, &series, in_rate);
        }
    }
    let operator =
        std::fs::read_to_string(root.join("k8s/components/monitoring/prometheusrule.yaml"))
            .expect("rule");
    let groups = |text: &str, indent: usize| -> Vec<String> {
        let from = text.find("groups:").expect("groups");
        let start = text[..from].rfind('\n').map_or(0, |n| n + 1);
        text[start..]
            .lines()
            .map(|l| {
                l.get(indent.min(l.len() - l.trim_start().len())..)
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    };
    assert_eq!(
        groups(&operator, 2),
        groups(&rules, 0),
        "deploy/k8s/components/monitoring/prometheusrule.yaml differs from deploy/prometheus/alerts.yml"
    );
}

/// The value of the series `series` (name and labels exactly as exported).
fn value_of(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The backlog-age and credit-audit gauges the alerts read: work that no
/// worker takes ages in `atelier_queue_oldest_waiting_seconds`; books that
/// disagree show in `atelier_credit_audit_problems`.
#[tokio::test]
async fn backlog_age_and_credit_audit_are_exported() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API_AND_SCHEDULER, |c| {
        c.scheduler.credit_audit_secs = 1;
    })
    .await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(64, 64), "a.jpg").await;
    let (s, v) = app.post("/create-packshot", packshot_body(&p, &[&f])).await;
    assert_eq!(s, reqwest::StatusCode::ACCEPTED, "{v}");
    let wait_for = |series: &'static str, ok: fn(f64) -> bool| {
        let app = &app;
        async move {
            let t = std::time::Instant::now();
            loop {
                let m = app.metrics().await;
                if let Some(v) = value_of(&m, series).filter(|v| ok(*v)) {
                    return v;
                }
                assert!(t.elapsed() < Duration::from_secs(20), "{series}:\n{m}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    // No worker runs: the packshot waits, and its wait grows.
    let age = wait_for(
        "atelier_queue_oldest_waiting_seconds{queue=\"packshot\"}",
        |v| v >= 1.0,
    )
    .await;
    assert!(age < 60.0, "{age}");
    assert_eq!(
        wait_for(
            "atelier_queue_oldest_waiting_seconds{queue=\"swap\"}",
            |_| true
        )
        .await,
        0.0
    );
    assert_eq!(
        wait_for("atelier_credit_audit_problems", |_| true).await,
        0.0
    );
    // An account whose `reserved` no longer matches its reservations.
    sqlx::query("UPDATE accounts SET reserved = reserved + 1000")
        .execute(app.store.pool())
        .await
        .expect("corrupt");
    let problems = wait_for("atelier_credit_audit_problems", |v| v > 0.0).await;
    assert!(problems >= 1.0, "{problems}");
    app.stop().await;
}

/// The address a child process printed (`atelier listening on …`); its
/// output is drained afterwards so that it never blocks on a full pipe.
async fn listening(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncBufReadExt;
    let out = child.stdout.take().expect("piped stdout");
    let mut lines = tokio::io::BufReader::new(out).lines();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the process prints its address in time")
            .expect("stdout")
            .expect("a line before the process ends");
        if let Some(url) = line.strip_prefix("atelier listening on ") {
            let url = url.trim().to_string();
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return url;
        }
    }
}

/// A fleet as deployed: the API (in the test) with its metrics on the
/// operations listener only, a scheduler and a worker as processes, on
/// PostgreSQL, RabbitMQ and S3. After a job, every process is scraped:
/// each metric is catalogued, described and typed alike by every role,
/// and every series the dashboard and the alerts query is there.
#[tokio::test]
async fn a_fleet_exports_what_the_dashboard_and_the_alerts_query() {
    let _broker = broker_lock().await;
    let bucket = s3_bucket().await;
    let app = TestApp::with(Dialect::Postgres, Roles::API, |c| {
        with_rabbitmq(c);
        with_s3(c, &bucket);
        c.server.admin_listen = Some("127.0.0.1:0".into());
    })
    .await;
    let mut targets = vec![app.admin.clone().expect("the operations listener")];
    let mut children = Vec::new();
    for role in ["scheduler", "worker"] {
        let mut cmd = spawn_role_command(&app, role, 0);
        cmd.stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("the role starts");
        targets.push(listening(&mut child).await);
        children.push(child);
    }
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(64, 64), "a.jpg").await;
    let (s, v) = app.post("/create-packshot", packshot_body(&p, &[&f])).await;
    assert_eq!(s, reqwest::StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let done = app.wait_for_job(&job, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "completed", "{done}");
    // Per-account series stay off the data port.
    let r = app.http.get(app.url("/metrics")).send().await.expect("get");
    assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);

    let t = std::time::Instant::now();
    let (types, text) = loop {
        let mut types = BTreeMap::new();
        let mut text = String::new();
        for target in &targets {
            let m = app
                .http
                .get(format!("{target}/metrics"))
                .send()
                .await
                .expect("scrape")
                .text()
                .await
                .expect("text");
            let (these, helps) = scrape(&m);
            for (name, kind) in these {
                let c = metric_catalogue::find(&name)
                    .unwrap_or_else(|| panic!("{name} ({target}) is not catalogued"));
                assert_eq!(kind, c.kind.as_str(), "{name} at {target}");
                assert!(helps.contains(&name), "{name} has no # HELP at {target}");
                if let Some(other) = types.insert(name.clone(), kind.clone()) {
                    assert_eq!(other, kind, "{name} typed differently by two roles");
                }
            }
            text.push_str(&m);
        }
        // The scheduler refreshes its gauges every 5 s.
        if types.contains_key("atelier_outputs_open")
            && types.contains_key("atelier_worker_tasks_total")
        {
            break (types, text);
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{text}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("atelier_build_info{"))
            .count(),
        targets.len(),
        "every process says what it runs"
    );
    queries_find_their_series(&types, &text);
    for mut c in children {
        assert!(c.try_wait().expect("status").is_none(), "a role died");
        c.kill().await.expect("kill");
    }
    app.stop().await;
}
