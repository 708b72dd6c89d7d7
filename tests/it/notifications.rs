//! Notifications and webhooks (contract §4): the SSE stream (replay, live
//! events from another process through Redis, the degraded mode without
//! it), polling and consuming, signed webhook deliveries with retries, and
//! the SSRF guard on webhook URLs.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test here

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One server-sent event as a client sees it.
#[derive(Debug, Clone)]
struct SseEvent {
    event: Option<String>,
    id: Option<i64>,
    data: Value,
}

/// A minimal EventSource: parses frames, skips comments, remembers how many
/// keep-alive comments it saw.
struct SseClient {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
    comments: usize,
}

impl SseClient {
    async fn connect(url: &str, key: Option<&str>, last_event_id: Option<i64>) -> SseClient {
        let mut r = reqwest::Client::new().get(url);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        if let Some(id) = last_event_id {
            r = r.header("Last-Event-ID", id.to_string());
        }
        let resp = r.send().await.expect("stream request");
        assert_eq!(resp.status(), StatusCode::OK, "stream status");
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert_eq!(ct, "text/event-stream");
        assert_eq!(resp.headers()["cache-control"], "no-cache");
        assert_eq!(resp.headers()["x-accel-buffering"], "no");
        SseClient {
            body: resp.bytes_stream().boxed(),
            buf: String::new(),
            comments: 0,
        }
    }

    /// The next event, or `None` when nothing arrives within `within`.
    async fn next(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent {
                    event: None,
                    id: None,
                    data: Value::Null,
                };
                let mut has_data = false;
                for line in frame.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        ev.event = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        ev.id = Some(v.parse().expect("integer id"));
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        ev.data = serde_json::from_str(v).expect("data is one line of JSON");
                        has_data = true;
                    }
                }
                if has_data {
                    return Some(ev);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .ok()??;
            self.buf
                .push_str(std::str::from_utf8(&chunk.expect("stream chunk")).expect("utf-8"));
        }
    }

    /// Events up to and including the `backfill_complete` marker.
    async fn backfill(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        loop {
            let ev = self
                .next(Duration::from_secs(10))
                .await
                .expect("backfill ends with a marker");
            if ev.event.as_deref() == Some("backfill_complete") {
                assert_eq!(ev.data, json!({}));
                return out;
            }
            assert_eq!(ev.event.as_deref(), Some("backfill"), "{ev:?}");
            out.push(ev);
        }
    }

    /// Live events until the `batch_edit` of `job` with a terminal status
    /// (what the seed's consumer stops on).
    async fn until_terminal(&mut self, job: &str, within: Duration) -> Vec<SseEvent> {
        let t = Instant::now();
        let mut out = Vec::new();
        loop {
            let left = within.saturating_sub(t.elapsed());
            let ev = self.next(left).await.unwrap_or_else(|| {
                panic!("no terminal event for {job} within {within:?}; got {out:#?}")
            });
            assert!(
                ev.event.is_none(),
                "live events carry no event line: {ev:?}"
            );
            let task = ev.data["data"]["id_task"]
                .as_str()
                .or(ev.data["data"]["job_id"].as_str());
            let terminal = ev.data["name"] == "batch_edit"
                && task == Some(job)
                && matches!(
                    ev.data["data"]["status"].as_str(),
                    Some("completed" | "failed")
                );
            out.push(ev);
            if terminal {
                return out;
            }
        }
    }
}

fn one_output(project: &str, file: &str) -> Value {
    json!({
        "project_id": project,
        "images": [file],
        "instructions": [{"style": "white_cutout", "num_variations": 1}]
    })
}

async fn submit(app: &TestApp, project: &str, file: &str) -> String {
    let (s, v) = app
        .post("/create-packshot", one_output(project, file))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    v["job_id"].as_str().expect("job_id").to_string()
}

fn ids(events: &[SseEvent]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e.id.expect("every notification has an id"))
        .collect()
}

#[tokio::test]
async fn the_stream_replays_then_follows_a_job_and_deletes_drop_from_the_replay() {
    let app = TestApp::spawn().await;
    let p = app.project("Events").await;
    let file = app.upload(garment_jpeg(320, 400), "a.jpg").await;
    let first = submit(&app, &p, &file).await;
    assert_eq!(
        app.wait_for_job(&first, Duration::from_secs(60)).await["status"],
        "completed"
    );

    // ?token= is accepted on the stream (EventSource cannot send headers).
    let stream_url = app.url(&format!("/notifications/events?token={}", app.key));
    let mut sse = SseClient::connect(&stream_url, None, None).await;
    let replay = sse.backfill().await;
    let names: Vec<_> = replay
        .iter()
        .map(|e| {
            (
                e.data["name"].as_str().unwrap().to_string(),
                e.data["data"]["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        names.contains(&("batch_edit".into(), "pending".into())),
        "{names:?}"
    );
    assert!(
        names.contains(&("image_result".into(), "completed".into())),
        "{names:?}"
    );
    assert!(
        names.contains(&("batch_edit".into(), "completed".into())),
        "{names:?}"
    );
    let replay_ids = ids(&replay);
    assert!(
        replay_ids.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {replay_ids:?}"
    );
    for e in &replay {
        assert_eq!(
            e.id,
            e.data["id"].as_i64(),
            "the SSE id is the notification id"
        );
        assert!(
            e.data["timestamp"].as_f64().is_some() && e.data["created_at"].is_string(),
            "{e:?}"
        );
    }

    // Live: a second job, run by the worker role while we listen.
    let second = submit(&app, &p, &file).await;
    let live = sse.until_terminal(&second, Duration::from_secs(60)).await;
    assert!(
        live.iter()
            .all(|e| e.data["data"]["id_task"] == second.as_str()),
        "{live:#?}"
    );
    assert!(ids(&live).iter().all(|id| id > replay_ids.last().unwrap()));
    let result = live
        .iter()
        .find(|e| e.data["name"] == "image_result")
        .expect("an image_result event");
    assert_eq!(result.data["data"]["status"], "completed");
    assert_eq!(result.data["data"]["job_id"], second.as_str());
    let bytes = app.fetch(&result.data["data"]["output"]["full_size"]).await;
    assert!(
        image::load_from_memory(&bytes).is_ok(),
        "the event's result URL serves the image"
    );
    let progress: Vec<_> = live
        .iter()
        .filter(|e| e.data["name"] == "batch_edit")
        .map(|e| e.data["data"]["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        progress.last().map(String::as_str),
        Some("completed"),
        "{progress:?}"
    );
    assert!(progress.contains(&"processing".to_string()), "{progress:?}");
    drop(sse);

    // Consume one notification: it is gone from the next replay and from polls.
    let gone = replay_ids[0];
    let (s, _) = app
        .delete_as(&app.key, &format!("/notifications/{gone}"))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = app
        .delete_as(&app.key, &format!("/notifications/{gone}"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, _) = app.delete_as(&app.key, "/notifications/not-a-number").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let mut again =
        SseClient::connect(&app.url("/notifications/events"), Some(&app.key), None).await;
    let replay2 = ids(&again.backfill().await);
    assert!(!replay2.contains(&gone), "{replay2:?}");
    assert_eq!(replay2.len(), replay_ids.len() - 1 + live.len());

    // Last-Event-ID resumes after what the client saw.
    let resume_from = replay_ids[2];
    let mut resumed = SseClient::connect(
        &app.url("/notifications/events"),
        Some(&app.key),
        Some(resume_from),
    )
    .await;
    let after = ids(&resumed.backfill().await);
    assert!(
        !after.is_empty() && after.iter().all(|id| *id > resume_from),
        "{after:?}"
    );

    // Filters: only the second job's image results.
    let mut filtered = SseClient::connect(
        &app.url(&format!(
            "/notifications/events?id_task={second}&name_list=image_result"
        )),
        Some(&app.key),
        None,
    )
    .await;
    let only = filtered.backfill().await;
    assert_eq!(only.len(), 1, "{only:#?}");
    assert_eq!(
        only[0].data["data"]["image_result_id"],
        result.data["data"]["image_result_id"]
    );

    // Poll: name_list required; filters by task.
    let (s, v) = app.post("/notifications", json!({"id_task": second})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("name_list"), "{v}");
    let (s, v) = app
        .post(
            "/notifications",
            json!({"id_task": [second], "name_list": "batch_edit,image_result"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let polled = v.as_array().expect("array");
    assert_eq!(polled.len(), live.len(), "{v}");
    assert!(
        polled
            .iter()
            .all(|n| n["data"]["id_task"] == second.as_str())
    );

    // Another account sees none of it, and cannot consume it.
    let other = app.account("other", 0.0).await;
    let (s, v) = app
        .post_as(
            &other,
            "/notifications",
            json!({"name_list": ["batch_edit", "image_result"]}),
        )
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!([])));
    let (s, _) = app
        .delete_as(&other, &format!("/notifications/{}", replay_ids[1]))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // ?token= is refused anywhere but the stream; a Last-Event-ID that is
    // not an id is ignored (full replay) so EventSource keeps reconnecting.
    let r = app
        .http
        .get(app.url(&format!("/project?token={}", app.key)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = app
        .http
        .get(app.url("/notifications/events"))
        .bearer_auth(&app.key)
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    drop(r);
    let r = app
        .http
        .get(app.url("/notifications/events?token=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test]
async fn keepalive_comments_flow_while_nothing_happens() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        c.notifications.keepalive_secs = 1
    })
    .await;
    let mut sse = SseClient::connect(&app.url("/notifications/events"), Some(&app.key), None).await;
    assert!(sse.backfill().await.is_empty());
    assert!(sse.next(Duration::from_millis(2500)).await.is_none());
    assert!(sse.comments >= 2, "keep-alives seen: {}", sse.comments);
    app.stop().await;
}

fn redis_url() -> String {
    std::env::var("ATELIER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The API replica that serves the stream is not the process that runs the
/// job: live events reach it through Redis, and, with Redis unreachable on
/// its side, by re-reading the store.
#[tokio::test]
async fn live_events_reach_an_api_replica_through_redis_and_without_it() {
    let prefix = format!(
        "atelier-it-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let dir = tempfile::tempdir().unwrap();
    let db = database_url(Dialect::Postgres, dir.path()).await;
    let base = |redis: String, prefix: String, db: String| {
        move |c: &mut atelier_shared::config::Config| {
            c.database.url = Some(db);
            c.redis.url = Some(redis);
            c.redis.prefix = prefix;
            // Only the bus can deliver in time: no periodic re-read.
            c.notifications.reconcile_secs = 3600;
        }
    };
    let backend = TestApp::with(
        Dialect::Postgres,
        Roles {
            api: false,
            scheduler: true,
            worker: true,
        },
        base(redis_url(), prefix.clone(), db.clone()),
    )
    .await;
    let api = TestApp::with(
        Dialect::Postgres,
        Roles::API,
        base(redis_url(), prefix.clone(), db.clone()),
    )
    .await;
    // A replica whose Redis is unreachable (nothing listens on port 1).
    let degraded = TestApp::with(
        Dialect::Postgres,
        Roles::API,
        base("redis://127.0.0.1:1".into(), prefix.clone(), db.clone()),
    )
    .await;

    let p = api.project("Fan-out").await;
    let file = api.upload(garment_jpeg(320, 400), "a.jpg").await;
    let mut through_redis =
        SseClient::connect(&api.url("/notifications/events"), Some(&api.key), None).await;
    assert!(through_redis.backfill().await.is_empty());
    let mut polling =
        SseClient::connect(&degraded.url("/notifications/events"), Some(&api.key), None).await;
    assert!(polling.backfill().await.is_empty());

    let job = submit(&api, &p, &file).await;
    let a = through_redis
        .until_terminal(&job, Duration::from_secs(30))
        .await;
    let b = polling.until_terminal(&job, Duration::from_secs(30)).await;
    assert_eq!(
        ids(&a),
        ids(&b),
        "both replicas stream the same events once each"
    );
    assert!(
        a.len() >= 4,
        "created, processing, image_result, completed: {a:#?}"
    );

    // Nothing is sent twice even though the relay and re-reads overlap.
    let second = submit(&api, &p, &file).await;
    let a2 = through_redis
        .until_terminal(&second, Duration::from_secs(30))
        .await;
    let mut seen = ids(&a);
    seen.extend(ids(&a2));
    let mut dedup = seen.clone();
    dedup.dedup();
    assert_eq!(seen, dedup);

    api.stop().await;
    degraded.stop().await;
    backend.stop().await;
}

/// A webhook receiver on 127.0.0.1 that verifies signatures the way seed
/// 004's Python sample does, answers 500 to its first `fail_first`
/// requests, and records every request.
struct Receiver {
    url: String,
    secret: Arc<Mutex<String>>,
    seen: Arc<Mutex<Vec<Received>>>,
}

#[derive(Debug, Clone)]
struct Received {
    status: u16,
    event: String,
    delivery: String,
    body: Value,
}

fn verify(secret: &str, body: &[u8], header: &str) -> bool {
    // "sha256=" + hmac.new(secret, body, sha256).hexdigest(), compared in constant time.
    let Some(hex_sig) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

async fn receiver(fail_first: usize) -> Receiver {
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    let secret = Arc::new(Mutex::new(String::new()));
    let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
    let (s2, seen2) = (secret.clone(), seen.clone());
    let handler = move |headers: HeaderMap, body: Bytes| {
        let (secret, seen) = (s2.clone(), seen2.clone());
        async move {
            let h = |n: &str| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let mut seen = seen.lock().unwrap();
            let status = if seen.len() < fail_first {
                500
            } else if verify(&secret.lock().unwrap(), &body, &h("x-webhook-signature")) {
                200
            } else {
                401
            };
            assert_eq!(h("content-type"), "application/json");
            seen.push(Received {
                status,
                event: h("x-webhook-event"),
                delivery: h("x-webhook-delivery"),
                body: serde_json::from_slice(&body).expect("JSON body"),
            });
            axum::http::StatusCode::from_u16(status).unwrap()
        }
    };
    let router = axum::Router::new().route("/hook", axum::routing::post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    Receiver { url, secret, seen }
}

impl Receiver {
    fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let t = Instant::now();
        loop {
            let seen = self.seen();
            if done(&seen) {
                return seen;
            }
            assert!(
                t.elapsed() < within,
                "{what} not seen within {within:?}: {seen:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn webhooks_are_signed_retried_after_failures_and_recorded() {
    let rx = receiver(2).await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        c.egress.allow = vec!["127.0.0.1".into()];
        c.webhooks.retry_delays_ms = vec![200, 400, 800];
    })
    .await;

    let (s, v) = app
        .put_as(&app.key, "/webhooks", json!({"url": rx.url}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let secret = v["secret"].as_str().expect("secret shown once").to_string();
    assert_eq!(secret.len(), 64);
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        (v["url"].as_str(), v["is_active"].as_bool()),
        (Some(rx.url.as_str()), Some(true))
    );
    *rx.secret.lock().unwrap() = secret.clone();

    // The ping: refused twice with 500, then delivered (same delivery id, same bytes).
    let seen = rx
        .wait_for("the ping delivered", Duration::from_secs(20), |s| {
            s.iter().any(|r| r.status == 200)
        })
        .await;
    assert_eq!(
        seen.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![500, 500, 200]
    );
    assert!(
        seen.iter()
            .all(|r| r.event == "ping" && r.body["name"] == "ping")
    );
    assert!(
        seen.windows(2)
            .all(|w| w[0].delivery == w[1].delivery && w[0].body == w[1].body)
    );
    // The receiver saw the 200 before the scheduler recorded it: wait
    // for the record.
    let t = std::time::Instant::now();
    let v = loop {
        let (s, v) = app.get("/webhooks").await;
        assert_eq!(s, StatusCode::OK);
        if v["last_response_status"] == json!(200) || t.elapsed() > Duration::from_secs(10) {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (v["secret"].clone(), v["last_response_status"].clone()),
        (Value::Null, json!(200))
    );
    let (_, v) = app.get("/webhooks/deliveries").await;
    let ping = &v["deliveries"][0];
    assert_eq!(
        (
            ping["event"].as_str(),
            ping["status"].as_str(),
            ping["attempts"].as_i64()
        ),
        (Some("ping"), Some("delivered"), Some(3)),
        "{v}"
    );

    // A job: every state change is delivered, verified, the terminal one once.
    let p = app.project("Hooks").await;
    let file = app.upload(garment_jpeg(320, 400), "a.jpg").await;
    let job = submit(&app, &p, &file).await;
    let terminal = |r: &Received| {
        r.body["name"] == "batch_edit"
            && r.body["data"]["id_task"] == job.as_str()
            && r.body["data"]["status"] == "completed"
    };
    let seen = rx
        .wait_for("the job's completion", Duration::from_secs(60), |s| {
            s.iter().any(terminal)
        })
        .await;
    let for_job: Vec<_> = seen
        .iter()
        .filter(|r| r.body["data"]["id_task"] == job.as_str())
        .collect();
    assert!(
        for_job.iter().all(|r| r.status == 200),
        "signatures verify: {for_job:#?}"
    );
    assert!(
        for_job
            .iter()
            .all(|r| r.event == r.body["name"].as_str().unwrap())
    );
    assert_eq!(for_job.iter().filter(|r| terminal(r)).count(), 1);
    let note_ids: Vec<i64> = for_job
        .iter()
        .map(|r| r.body["id"].as_i64().unwrap())
        .collect();
    assert!(
        note_ids.windows(2).all(|w| w[0] < w[1]),
        "one job's events arrive in order: {note_ids:?}"
    );
    let result = for_job
        .iter()
        .find(|r| r.body["name"] == "image_result")
        .expect("image_result delivered");
    assert!(
        result.body["data"]["output"]["full_size"].is_string(),
        "{:?}",
        result.body
    );
    // Webhook delivery does not consume the notification.
    let (_, polled) = app
        .post(
            "/notifications",
            json!({"id_task": job, "name_list": "batch_edit"}),
        )
        .await;
    assert!(
        polled
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["data"]["status"] == "completed")
    );

    // Replacing rotates the secret; the old one no longer verifies.
    let (_, v) = app
        .put_as(&app.key, "/webhooks", json!({"url": rx.url}))
        .await;
    let rotated = v["secret"].as_str().unwrap().to_string();
    assert_ne!(rotated, secret);
    let before = rx.seen().len();
    let seen = rx
        .wait_for("the rotation ping", Duration::from_secs(20), |s| {
            s.len() > before
        })
        .await;
    assert_eq!(
        seen[before].status, 401,
        "signed with the new secret, not the old one"
    );
    *rx.secret.lock().unwrap() = rotated;
    let (s, v) = app.post("/webhooks/test", json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // First ping, the rotation ping's retry, the test ping.
    rx.wait_for("the test ping", Duration::from_secs(20), |s| {
        s.iter()
            .filter(|r| r.status == 200 && r.event == "ping")
            .count()
            == 3
    })
    .await;

    // Removal: 204, then 404 for every webhook route.
    let (s, _) = app.delete_as(&app.key, "/webhooks").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(app.get("/webhooks").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        app.post("/webhooks/test", json!({})).await.0,
        StatusCode::NOT_FOUND
    );
    let (s, _) = app.delete_as(&app.key, "/webhooks").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn webhook_urls_aimed_at_private_networks_are_refused() {
    let app = TestApp::spawn().await;
    for (url, why) in [
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.0.0.1/hook", "private"),
        ("http://localhost:9/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("ftp://example.com/hook", "scheme"),
        ("not a url", "absolute URL"),
        ("http://user:pw@example.com/hook", "credentials"),
    ] {
        let (s, v) = app.put_as(&app.key, "/webhooks", json!({"url": url})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{url}: {v}");
        assert!(v.to_string().contains(why), "{url}: {v}");
        assert_eq!(v["detail"][0]["field"], "url", "{v}");
    }
    let (s, v) = app.put_as(&app.key, "/webhooks", json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(
        app.get("/webhooks").await.0,
        StatusCode::NOT_FOUND,
        "nothing was saved"
    );
    app.stop().await;
}
