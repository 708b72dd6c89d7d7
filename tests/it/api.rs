//! Auth, envelope, projects, uploads and tenant isolation.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A valid PNG (signature, IHDR with a correct CRC, one tiny IDAT, IEND)
/// whose header declares `w`×`h`: a decompression bomb's shape.
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

fn assert_envelope(v: &serde_json::Value, code: &str) {
    assert!(v["error"].is_string(), "{v}");
    assert!(v["detail"].is_array(), "{v}");
    assert_eq!(v["code"], code, "{v}");
}

#[tokio::test]
async fn health_auth_and_rate_limit_headers() {
    let app = TestApp::spawn().await;
    let (s, v, _) = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"status": "ok"})));

    let (s, v, _) = app.call(Method::GET, "/project", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_envelope(&v, "unauthorized");
    let (s, _, _) = app
        .call(Method::GET, "/project", Some("atl_not_a_real_key"), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let r = app
        .http
        .get(app.url("/project"))
        .header("x-api-key", &app.key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-ratelimit-limit"], "600");
    assert!(r.headers().contains_key("x-ratelimit-remaining"));
    assert!(r.headers().contains_key("x-ratelimit-reset"));

    let r = app
        .http
        .get(app.url("/project"))
        .bearer_auth(&app.key)
        .header("x-api-key", "atl_other")
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "Bearer and X-API-Key must agree"
    );

    let (s, v) = app.get("/no/such/route").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_envelope(&v, "not_found");
    app.stop().await;
}

/// `X-Request-Id`: generated when absent, the client's echoed when it is
/// a short token, replaced when it is not; on answers of every kind.
#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let app = TestApp::spawn().await;
    let get = |path: &str, id: Option<&str>| {
        let mut r = app.http.get(app.url(path)).header("x-api-key", &app.key);
        if let Some(id) = id {
            r = r.header("x-request-id", id);
        }
        r.send()
    };
    let id_of = |r: &reqwest::Response| {
        r.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .expect("an x-request-id on the answer")
    };
    let a = id_of(&get("/project", None).await.expect("send"));
    let b = id_of(&get("/project", None).await.expect("send"));
    assert_eq!(a.len(), 26, "a ULID: {a}");
    assert_ne!(a, b, "one per request");
    let r = get("/project", Some("client-42:retry.1"))
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(id_of(&r), "client-42:retry.1");
    // Refusals carry it too, and an unusable one is replaced.
    let r = get("/no/such/route", Some("x".repeat(129).as_str()))
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(id_of(&r).len(), 26);
    let r = get("/project", Some("two words")).await.expect("send");
    assert_ne!(id_of(&r), "two words");
    let r = app
        .http
        .get(app.url("/project"))
        .header("x-request-id", "no-key-1")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(id_of(&r), "no-key-1");
}

#[tokio::test]
async fn projects_crud_conflict_and_isolation() {
    let app = TestApp::spawn().await;
    let id = app.project("Spring 2026").await;
    let (s, v) = app
        .post("/project", json!({"project_name": "Spring 2026"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["project_id"], id.as_str());
    assert_eq!(v["project_name"], "Spring 2026");
    assert_envelope(&v, "conflict");

    let (s, v) = app.post("/project", json!({"project_name": "   "})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["detail"][0]["field"], "project_name");
    let (s, _) = app
        .post("/project", json!({"project_name": "x".repeat(129)}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v) = app.post("/project", json!({"project_name": 5})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Control characters are refused, as in every other name; nothing stored.
    for bad in ["a\u{0}b", "line\nbreak", "bell\u{7}"] {
        let (s, v) = app.post("/project", json!({"project_name": bad})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}: {v}");
        assert_eq!(v["detail"][0]["field"], "project_name", "{v}");
        assert!(v.to_string().contains("control characters"), "{v}");
        let (s, v) = app
            .post("/upload", json!({"project_name": bad, "filename": "a.jpg"}))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}: {v}");
    }
    let (_, v) = app.get("/project").await;
    assert!(
        !v.to_string().contains("\\u0000"),
        "no project with a NUL was stored: {v}"
    );
    let r = app
        .http
        .post(app.url("/project"))
        .bearer_auth(&app.key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = app
        .http
        .post(app.url("/project"))
        .bearer_auth(&app.key)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    for i in 0..3 {
        // Distinct creation times: ties in one millisecond have no defined order.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        app.project(&format!("p{i}")).await;
    }
    let (s, v) = app.get("/project?per_page=2&page=2&order=asc").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v["pagination"],
        json!({"page": 2, "per_page": 2, "total": 4, "pages": 2, "has_next": false, "has_prev": true})
    );
    assert_eq!(v["projects"][0]["project_text"], "p1");
    assert_eq!(
        v["projects"][0]["project_key"],
        v["projects"][0]["project_id"]
    );
    let (s, v) = app.get("/project?per_page=0").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["detail"][0]["field"], "per_page");
    let (s, _) = app.get("/project?page=abc").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let (s, v) = app.get(&format!("/project/{id}")).await;
    assert_eq!(
        (s, v["project_name"].as_str()),
        (StatusCode::OK, Some("Spring 2026"))
    );

    // Another account sees nothing of it.
    let other = app.account("mallory", 100.0).await;
    assert_eq!(
        app.get_as(&other, &format!("/project/{id}")).await.0,
        StatusCode::NOT_FOUND
    );
    let (s, _, _) = app
        .call(
            Method::DELETE,
            &format!("/project/{id}"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        app.get_as(&other, "/project").await.1["pagination"]["total"],
        0
    );

    let (s, _, _) = app
        .call(
            Method::DELETE,
            &format!("/project/{id}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get(&format!("/project/{id}")).await.0,
        StatusCode::NOT_FOUND
    );
    app.stop().await;
}

#[tokio::test]
async fn uploads_are_checked_and_single_use() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |c| {
        c.limits.max_upload_bytes = 200_000
    })
    .await;
    let (s, v) = app.post("/upload", json!({"filename": "notes.txt"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["detail"][0]["field"], "filename");
    let (s, _) = app.post("/upload", json!({"filename": "../x.jpg"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = app.post("/upload", json!({"project_name": "nope"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // An empty body is valid: a generated name in the default project.
    let r = app
        .http
        .post(app.url("/upload"))
        .bearer_auth(&app.key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::OK);

    let (s, v) = app.post("/upload", json!({"filename": "Front.PNG"})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["content_type"], "image/png");
    assert_eq!(v["project_name"], "default");
    // The default project keeps the uploads of deleted projects: it stays
    // (deleting it was a 500: a second `default` could not be created).
    let default_project = v["project_id"].as_str().expect("project").to_string();
    let (s, body) = app
        .delete_as(&app.key, &format!("/project/{default_project}"))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let url = v["upload_url"].as_str().expect("url").to_string();
    let put = |ct: &'static str, body: Vec<u8>| {
        let (http, url) = (app.http.clone(), url.clone());
        async move {
            http.put(url)
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .expect("put")
                .status()
        }
    };
    assert_eq!(
        put("image/jpeg", png(8, 8)).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "content type must match"
    );
    assert_eq!(
        put("image/png", b"not an image at all".to_vec()).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    assert_eq!(
        put("image/png", garment_jpeg(16, 16)).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "JPEG bytes declared PNG"
    );
    assert_eq!(
        put("image/png", vec![0u8; 300_000]).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let r = app
        .http
        .put(&url)
        .header("content-type", "image/png")
        .body(vec![0u8; 300_000])
        .send()
        .await
        .expect("put");
    let body: serde_json::Value = r.json().await.expect("an envelope, not plain text");
    assert_eq!(body["code"], "payload_too_large");
    // A small PNG whose header declares 50000×50000 pixels, refused before
    // anything is stored, naming the limit; the slot stays usable.
    let r = app
        .http
        .put(&url)
        .header("content-type", "image/png")
        .body(png_declaring(50_000, 50_000))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = r.json().await.expect("envelope");
    assert!(
        body.to_string().contains("50000x50000"),
        "the refusal names the size: {body}"
    );
    assert_eq!(put("image/png", png(8, 8)).await, StatusCode::OK);
    assert_eq!(
        put("image/png", png(8, 8)).await,
        StatusCode::FORBIDDEN,
        "single use"
    );
    // Half a JPEG is refused as truncated, not stored to be charged for.
    let (_, slot) = app.post("/upload", json!({"filename": "half.jpg"})).await;
    let jpg_url = slot["upload_url"].as_str().expect("url").to_string();
    // (Large enough that its first half holds every header.)
    let whole = garment_jpeg(400, 400);
    let r = app
        .http
        .put(&jpg_url)
        .header("content-type", "image/jpeg")
        .body(whole[..whole.len() / 2].to_vec())
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = r.json().await.expect("envelope");
    assert!(body.to_string().contains("truncated JPEG"), "{body}");
    let r = app
        .http
        .put(&jpg_url)
        .header("content-type", "image/jpeg")
        .body(whole)
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::OK, "the whole photo is then taken");
    let mut forged = url.clone();
    forged.push('x');
    let r = app
        .http
        .put(forged)
        .header("content-type", "image/png")
        .body(png(8, 8))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // The download URL serves the stored original without credentials.
    let bytes = app.fetch(&v["download_url"]).await;
    assert_eq!(&bytes[..4], b"\x89PNG");
    app.stop().await;
}

#[tokio::test]
async fn expired_upload_urls_are_refused() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |c| {
        c.limits.upload_url_ttl_secs = 1
    })
    .await;
    let (_, v) = app.post("/upload", json!({"filename": "a.png"})).await;
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let r = app
        .http
        .put(v["upload_url"].as_str().expect("url"))
        .header("content-type", "image/png")
        .body(png(8, 8))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("expired")),
        "{body}"
    );
    app.stop().await;
}

/// Two API replicas on one database and one Redis share the creation bucket
/// (5 per minute per account): 3 through one and 2 through the other use it
/// up. With Redis unreachable an API still serves and limits per replica.
#[tokio::test]
async fn rate_limits_are_shared_through_redis_and_degrade_without_it() {
    let redis =
        std::env::var("ATELIER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("t{}:", ulid::Ulid::new().to_string().to_lowercase());
    let db = database_url(Dialect::Postgres, std::path::Path::new("/unused")).await;
    let replica = |redis_url: String| {
        let (db, prefix) = (db.clone(), prefix.clone());
        async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut c = test_config(dir.path(), db);
            c.redis.url = Some(redis_url);
            c.redis.prefix = prefix;
            TestApp::start(c, Roles::API, dir).await
        }
    };
    let a = replica(redis.clone()).await;
    let b = replica(redis).await;
    // An invalid body still takes a token: the limit is checked first.
    async fn create(app: &TestApp) -> StatusCode {
        app.post("/create-packshot", json!({})).await.0
    }
    for app in [&a, &a, &a, &b, &b] {
        assert_eq!(create(app).await, StatusCode::BAD_REQUEST);
    }
    assert_eq!(
        create(&b).await,
        StatusCode::TOO_MANY_REQUESTS,
        "b saw a's three"
    );
    assert_eq!(create(&a).await, StatusCode::TOO_MANY_REQUESTS);

    // Redis unreachable (nothing listens on port 1): the API answers, and
    // the replica enforces the limit on its own.
    let c = replica("redis://127.0.0.1:1".into()).await;
    let t = std::time::Instant::now();
    assert_eq!(c.get("/project").await.0, StatusCode::OK);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "no long stall per request"
    );
    for _ in 0..5 {
        assert_eq!(create(&c).await, StatusCode::BAD_REQUEST);
    }
    assert_eq!(create(&c).await, StatusCode::TOO_MANY_REQUESTS);
    for app in [a, b, c] {
        app.stop().await;
    }
}

/// The OpenAPI document and the live router agree: every documented path
/// answers (a method it does not route is a 405 whose `Allow` lists
/// exactly the documented methods), and the routes outside the document are
/// only the docs page and its assets. A route added without its
/// documentation, or documentation without its route, fails here.
#[tokio::test]
async fn the_openapi_document_covers_every_route() {
    let app = TestApp::spawn().await;
    let r = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    let doc: Value = r.json().await.expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() > 30, "{} paths", paths.len());
    let methods = ["get", "put", "post", "delete", "patch"];
    let mut ids = std::collections::HashSet::new();
    for (path, item) in paths {
        let documented: std::collections::BTreeSet<String> = methods
            .iter()
            .filter(|m| item.get(**m).is_some())
            .map(|m| m.to_uppercase())
            .collect();
        for m in methods {
            if let Some(op) = item.get(m) {
                let id = op["operationId"].as_str().expect("operationId");
                assert!(ids.insert(id.to_string()), "duplicate operationId {id}");
                assert!(
                    op["responses"]["default"].is_object(),
                    "{m} {path}: no default (error envelope) answer"
                );
            }
        }
        // Any value fills a path parameter: routing does not look at it.
        let concrete: String = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        let r = app
            .http
            .request(reqwest::Method::TRACE, app.url(&concrete))
            .bearer_auth(&app.key)
            .send()
            .await
            .expect("probe");
        assert_eq!(
            r.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{path} is documented but not routed"
        );
        let allow: std::collections::BTreeSet<String> = r
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(',')
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty() && m != "HEAD")
            .collect();
        assert_eq!(
            allow, documented,
            "{path}: routed methods vs documented ones"
        );
    }
    for path in atelier_api::router::UNDOCUMENTED {
        assert!(!paths.contains_key(path), "{path} is documented");
        let r = app.http.get(app.url(path)).send().await.expect("get");
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    // The docs page works offline: its assets come from this server.
    let page = app
        .http
        .get(app.url("/docs"))
        .send()
        .await
        .expect("docs")
        .text()
        .await
        .expect("html");
    assert!(page.contains("docs/ui/swagger-ui-bundle.js") && !page.contains("https://"));
    let js = app
        .http
        .get(app.url("/docs/ui/swagger-ui-bundle.js"))
        .send()
        .await
        .expect("asset");
    assert!(js.bytes().await.expect("bytes").len() > 100_000);
    // The console too: its page loads only this server's assets, under a
    // policy that allows no other script or inline style.
    let page = app.http.get(app.url("/")).send().await.expect("console");
    let policy = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        policy.contains("script-src 'self'") && policy.contains("style-src 'self'"),
        "{policy}"
    );
    let html = page.text().await.expect("html");
    assert!(
        html.contains("console/app.js") && !html.contains("http"),
        "{html}"
    );
    for asset in ["/console/app.js", "/console/app.css"] {
        let body = app
            .http
            .get(app.url(asset))
            .send()
            .await
            .expect("asset")
            .text()
            .await
            .expect("text");
        assert!(
            !body.contains("https://") && !body.contains("http://"),
            "{asset} fetches nothing from elsewhere"
        );
    }
    app.stop().await;
}

/// What the framework refuses by itself answers in the envelope too: an
/// unknown path, a method the path does not allow (with `Allow`), a body
/// over the limit, a wrong content type, a body that does not parse, a
/// bad path parameter.
#[tokio::test]
async fn every_refusal_is_an_envelope() {
    let app = TestApp::spawn().await;
    let envelope = |what: &str, v: &Value, code: &str| {
        assert!(v["error"].is_string(), "{what}: {v}");
        assert!(v["detail"].is_array(), "{what}: {v}");
        assert_eq!(v["code"], code, "{what}: {v}");
    };
    // `/identity/{identity_code}` takes GET and DELETE: PUT is a 405 in
    // the envelope, with `Allow` (it was a bare 405 with an empty body).
    let (s, v, h) = app
        .call(
            reqwest::Method::PUT,
            "/identity/idn_someone",
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    envelope("PUT /identity/idn_someone", &v, "method_not_allowed");
    let allow = h.get("allow").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(allow.contains("GET") && allow.contains("DELETE"), "{allow}");
    let (s, v, h) = app
        .call(reqwest::Method::PUT, "/jobs/x/status", Some(&app.key), None)
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    envelope("405", &v, "method_not_allowed");
    assert_eq!(
        h.get("allow").and_then(|v| v.to_str().ok()),
        Some("GET,HEAD")
    );
    let (s, v, _) = app
        .call(reqwest::Method::GET, "/no/such/route", Some(&app.key), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    envelope("404", &v, "not_found");
    let big = vec![b'x'; 3 << 20];
    let r = app
        .http
        .post(app.url("/project"))
        .bearer_auth(&app.key)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    envelope("413", &r.json().await.expect("json"), "payload_too_large");
    let r = app
        .http
        .post(app.url("/identity/upload"))
        .bearer_auth(&app.key)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    envelope(
        "415",
        &r.json().await.expect("json"),
        "unsupported_media_type",
    );
    let r = app
        .http
        .post(app.url("/download"))
        .bearer_auth(&app.key)
        .header("content-type", "application/json")
        .body(r#"{"job_id": 5}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.expect("json");
    envelope("bad body", &v, "invalid_request");
    assert_eq!(v["detail"][0]["field"], "job_id", "{v}");
    let r = app
        .http
        .delete(app.url("/notifications/not-a-number"))
        .bearer_auth(&app.key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    envelope("bad id", &r.json().await.expect("json"), "not_found");
    app.stop().await;
}

/// API tokens (§1.2): minted with an expiration in each accepted form,
/// usable at once, listed without their values, revoked, capped at 20.
#[tokio::test]
async fn tokens_are_minted_listed_and_revoked() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |_| {}).await;
    let (s, v) = app.post("/auth/token", json!({"expiration": "P90D"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let token = v["token"].as_str().expect("token").to_string();
    assert!(token.len() >= 32);
    // 90 days from now, to the day (the server's own formatting).
    let day_ms = 86_400_000;
    let lo = atelier_shared::time::iso8601(atelier_shared::time::now_ms() + 90 * day_ms - 60_000);
    let hi = atelier_shared::time::iso8601(atelier_shared::time::now_ms() + 90 * day_ms + 60_000);
    let exp = v["expiration_date"].as_str().expect("date");
    assert!(
        lo.as_str() <= exp && exp <= hi.as_str(),
        "{exp} not within [{lo}, {hi}]"
    );
    let (s, _) = app.get_as(&token, "/billing/balance").await;
    assert_eq!(s, StatusCode::OK, "the new token works at once");
    for bad in [
        json!({"expiration": "PT10M"}),
        json!({"expiration": "P5Y"}),
        json!({"expiration": "soon"}),
        json!({}),
    ] {
        let (s, v) = app.post("/auth/token", bad).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v.to_string().contains("expiration"), "{v}");
    }
    // An expired key is listed only on request.
    let acc = app.dev_account_id().await;
    app.store
        .create_api_key(
            &acc,
            "old",
            None,
            Some(atelier_shared::time::now_ms() - 1000),
        )
        .await
        .expect("key");
    let (s, list) = app.get("/auth/token").await;
    assert_eq!(s, StatusCode::OK, "{list}");
    assert_eq!(
        list["pagination"]["total"], 2,
        "the bootstrap key and the new one: {list}"
    );
    assert!(
        !list.to_string().contains(&token),
        "values are never listed"
    );
    let (_, all) = app.get("/auth/token?include_expired=true").await;
    assert_eq!(all["pagination"]["total"], 3, "{all}");
    let minted_id = list["tokens"][0]["token_id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(list["tokens"][0]["expiration_date"].is_string());
    // Revoked: gone at once; not another account's to revoke.
    let other = app.account("other", 0.0).await;
    let (s, _) = app
        .delete_as(&other, &format!("/auth/token/{minted_id}"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app
        .delete_as(&app.key, &format!("/auth/token/{minted_id}"))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = app.get_as(&token, "/billing/balance").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = app
        .delete_as(&app.key, &format!("/auth/token/{minted_id}"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // 20 live tokens at most (the bootstrap key is one).
    for i in 0..19 {
        let (s, v) = app.post("/auth/token", json!({"expiration": 86400})).await;
        assert_eq!(s, StatusCode::CREATED, "{i}: {v}");
    }
    let (s, v) = app
        .post("/auth/token", json!({"expiration": "1d,00:00:00"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
}

/// `GET /billing/credits` (§10.4): what the caller's work was charged, per
/// period and job type, with the balance; the date and resolution checks.
#[tokio::test]
async fn usage_is_summed_per_period_and_job_type() {
    let app = TestApp::spawn().await;
    let p = app.project("usage").await;
    let f = app.upload(png(64, 64), "a.png").await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout", "num_variations": 2}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let st = app
        .wait_for_job(&job, std::time::Duration::from_secs(60))
        .await;
    assert_eq!(st["status"], "completed", "{st}");
    let (s, _) = app
        .post("/preset/extract-from-text", json!({"text": "white cutout"}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = app.get("/billing/credits").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["total_credits"], 7.0,
        "two 1K outputs and one extraction: {v}"
    );
    let rows = v["summary"].as_array().expect("summary");
    let row = |t: &str| {
        rows.iter()
            .find(|r| r["job_type"] == t)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        (
            row("create_packshot")["total_credits"].as_f64(),
            row("create_packshot")["job_count"].as_i64()
        ),
        (Some(6.0), Some(1)),
        "{v}"
    );
    assert_eq!(
        (
            row("preset_extraction")["total_credits"].as_f64(),
            row("preset_extraction")["job_count"].as_i64()
        ),
        (Some(1.0), Some(1)),
        "{v}"
    );
    let start = row("create_packshot")["period_start"]
        .as_str()
        .expect("start")
        .to_string();
    assert!(
        start.ends_with("T00:00:00.000Z") || start.ends_with("T00:00:00Z"),
        "a UTC day: {start}"
    );
    let (balance, _) = app.balance(&app.key).await;
    assert_eq!(v["balance"]["user_credits"].as_f64(), Some(balance));
    let (_, m) = app.get("/billing/credits?resolution=month").await;
    let month_start = m["summary"][0]["period_start"].as_str().expect("start");
    assert_eq!(&month_start[8..10], "01", "the first of the month: {m}");
    let (_, none) = app
        .get("/billing/credits?start_date=2020-01-01&end_date=2020-02-01")
        .await;
    assert_eq!(
        (none["total_credits"].as_f64(), none["summary"].clone()),
        (Some(0.0), json!([]))
    );
    for q in [
        "start_date=yesterday",
        "start_date=2025-03-02&end_date=2025-03-01",
        "resolution=year",
    ] {
        let (s, v) = app.get(&format!("/billing/credits?{q}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
    }
    // Another account's work is not the caller's usage.
    let other = app.account("other", 10.0).await;
    let (_, v) = app.get_as(&other, "/billing/credits").await;
    assert_eq!(v["total_credits"], 0.0, "{v}");
}

/// `GET /assets` (§2.6): the caller's uploaded files with signed URLs and
/// their size, searched, sorted, paged and filtered.
#[tokio::test]
async fn assets_list_the_callers_uploads() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |_| {}).await;
    let summer = app.project("summer drop").await;
    let a = app.upload(png(64, 48), "b-shirt.png").await;
    let b = app.upload(png(32, 32), "a-dress.png").await;
    let (_, slot) = app
        .post("/upload", json!({"filename": "pending.png"}))
        .await;
    let _ = (summer, slot);
    let (s, v) = app.get("/assets").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["pagination"]["total"], 2, "only uploaded files: {v}");
    let ids: Vec<&str> = v["assets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["id"].as_str())
        .collect();
    assert_eq!(ids, [b.as_str(), a.as_str()], "newest first");
    let first = &v["assets"][1];
    assert_eq!(first["dimensions"], json!({"width": 64, "height": 48}));
    assert_eq!(
        (first["visibility"].as_str(), first["tags"].clone()),
        (Some("private"), json!([]))
    );
    assert_eq!(
        app.fetch(&first["url"]).await.len(),
        png(64, 48).len(),
        "the URL serves the bytes"
    );
    let (_, v) = app.get("/assets?sort_by=filename&order=asc").await;
    assert_eq!(v["assets"][0]["filename"], "a-dress.png");
    let (_, v) = app.get("/assets?search=SHIRT").await;
    assert_eq!(v["pagination"]["total"], 1, "{v}");
    let (_, v) = app.get("/assets?per_page=1&page=2").await;
    assert_eq!(
        (
            v["assets"].as_array().map(Vec::len),
            v["pagination"]["pages"].as_i64()
        ),
        (Some(1), Some(2))
    );
    for q in [
        "ownership=shared",
        "include_tags=model",
        "created_after=2999-01-01",
        "created_before=2000-01-01",
    ] {
        let (s, v) = app.get(&format!("/assets?{q}")).await;
        assert_eq!(
            (s, v["pagination"]["total"].as_i64()),
            (StatusCode::OK, Some(0)),
            "{q}: {v}"
        );
    }
    for q in [
        "sort_by=size",
        "ownership=everyone",
        "include_tags=shoes",
        "created_after=soon",
        "per_page=101",
    ] {
        let (s, v) = app.get(&format!("/assets?{q}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
    }
    let other = app.account("other", 0.0).await;
    let (_, v) = app.get_as(&other, "/assets").await;
    assert_eq!(
        v["pagination"]["total"], 0,
        "another account's uploads are not listed"
    );
}
