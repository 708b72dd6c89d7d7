//! Profiles (Phota-compatible): built from photo URLs by the identity
//! worker with the real face models; outliers rejected; URLs guarded
//! against SSRF.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use atelier_shared::domain::identity::IdentityKind;
use axum::http::header;
use axum::response::IntoResponse;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn png(img: &image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode");
    out.into_inner()
}

/// A photo server on 127.0.0.1: `/name` answers the named body.
async fn photo_server(files: HashMap<String, (String, Vec<u8>)>) -> String {
    let files = Arc::new(files);
    let app = axum::Router::new().route(
        "/{name}",
        axum::routing::get(
            move |axum::extract::Path(name): axum::extract::Path<String>| {
                let files = files.clone();
                async move {
                    match files.get(&name) {
                        // `redirect:<status>` answers that redirect to the body.
                        Some((ct, body)) if ct.starts_with("redirect:") => {
                            let code: u16 = ct["redirect:".len()..].parse().expect("status");
                            (
                                StatusCode::from_u16(code).expect("status"),
                                [(header::LOCATION, String::from_utf8_lossy(body).into_owned())],
                            )
                                .into_response()
                        }
                        Some((ct, body)) => {
                            ([(header::CONTENT_TYPE, ct.clone())], body.clone()).into_response()
                        }
                        None => StatusCode::NOT_FOUND.into_response(),
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn wait_for_profile(app: &TestApp, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let (s, v) = app.get(&format!("/v1/phota/profiles/{id}/status")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if matches!(v["status"].as_str(), Some("READY" | "ERROR")) {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "profile {id} stuck: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_profile_keeps_the_photos_of_one_person() {
    let newton = image::load_from_memory(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/testdata/newton.png"
        ))
        .expect("newton"),
    )
    .expect("decodes");
    let gauss = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/testdata/gauss.png"
    ))
    .expect("gauss");
    let mut files = HashMap::new();
    let ct = "image/png".to_string();
    files.insert("a.png".into(), (ct.clone(), png(&newton)));
    files.insert("b.png".into(), (ct.clone(), png(&newton.fliph())));
    files.insert("c.png".into(), (ct.clone(), png(&newton.brighten(30))));
    files.insert(
        "d.png".into(),
        (
            ct.clone(),
            png(&newton.resize(480, 480, image::imageops::FilterType::Triangle)),
        ),
    );
    files.insert("e.png".into(), (ct.clone(), gauss));
    files.insert(
        "notes.txt".into(),
        ("text/plain".into(), b"not a photo".to_vec()),
    );
    files.insert("f.png".into(), (ct.clone(), png(&newton.brighten(-15))));
    files.insert(
        "g.png".into(),
        (
            ct.clone(),
            png(&newton.resize(640, 640, image::imageops::FilterType::Triangle)),
        ),
    );
    // A redirect to an address the policy refuses (only 127.0.0.1 is
    // allowed here), and a 302 to a photo here, which is followed.
    files.insert(
        "hop.png".into(),
        ("redirect:307".into(), b"http://127.0.0.2/a.png".to_vec()),
    );
    files.insert(
        "moved.png".into(),
        ("redirect:302".into(), b"/a.png".to_vec()),
    );
    let base = photo_server(files).await;

    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_models(c);
        c.egress.allow = vec!["127.0.0.1".into()];
    })
    .await;
    let (before, _) = app.balance(&app.key.clone()).await;
    let urls: Vec<String> = [
        "a.png",
        "b.png",
        "c.png",
        "d.png",
        "e.png",
        "missing.png",
        "notes.txt",
        "hop.png",
        "moved.png",
        "f.png",
        "g.png",
    ]
    .iter()
    .map(|n| format!("{base}/{n}"))
    .collect();
    let (s, v) = app
        .post(
            "/v1/phota/profiles/add",
            json!({"image_urls": urls, "training_tier": "standard", "tag": "user_42"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["profile_id"].as_str().expect("profile_id").to_string();
    let st = wait_for_profile(&app, &id).await;
    assert_eq!(st["status"], "READY", "{st}");
    assert_eq!(st["message"], Value::Null);

    let row = app
        .store
        .identity_for(&app.dev_account_id().await, IdentityKind::Profile, &id)
        .await
        .expect("read")
        .expect("profile");
    let record = row.record().expect("record");
    let accepted: Vec<u32> = record
        .photos
        .iter()
        .filter(|p| p.accepted)
        .map(|p| p.index)
        .collect();
    assert_eq!(accepted, vec![0, 1, 2, 3, 8, 9, 10], "{:#?}", record.photos);
    let reason = |i: usize| record.photos[i].reason.clone().unwrap_or_default();
    assert!(reason(4).contains("another person"), "{}", reason(4));
    assert!(
        reason(5).contains("photo unavailable") && reason(5).contains("404"),
        "{}",
        reason(5)
    );
    assert!(reason(6).contains("not an image"), "{}", reason(6));
    assert!(
        reason(7).contains("photo unavailable") && reason(7).contains("127.0.0.2"),
        "{}",
        reason(7)
    );

    assert!(record.photos[0].similarity.expect("similarity") > 0.9);

    // The picture is the best crop; the tag lists it; delete erases it.
    let r = app
        .http
        .get(app.url(&format!("/profiles/{id}/profile_picture")))
        .bearer_auth(&app.key)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    let pic = image::load_from_memory(&r.bytes().await.expect("bytes")).expect("jpeg");
    assert_eq!(pic.width(), 512);
    let (_, v) = app.get("/v1/phota/profiles/ids?tag=user_42").await;
    assert_eq!(v["profiles"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["profiles"][0]["status"], "READY", "{v}");
    let (_, v) = app.get("/v1/phota/profiles/ids?tag=USER_42").await;
    assert_eq!(
        v["profiles"].as_array().map(Vec::len),
        Some(0),
        "exact tags: {v}"
    );
    let (_, v) = app.get("/v1/phota/profiles/ids?tag=userX42").await;
    assert_eq!(
        v["profiles"].as_array().map(Vec::len),
        Some(0),
        "a LIKE wildcard is not a match: {v}"
    );
    let (after, reserved) = app.balance(&app.key.clone()).await;
    assert_eq!((before - after, reserved), (50.0, 0.0));
    let (s, v) = app
        .delete_as(&app.key.clone(), &format!("/v1/phota/profiles/{id}"))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "ok");
    let (s, _) = app.get(&format!("/v1/phota/profiles/{id}/status")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    app.audit_clean().await;
    app.stop().await;
}

/// Too few usable photos: `ERROR` with the reasons, credits released.
#[tokio::test]
async fn a_profile_without_enough_faces_fails_with_the_reasons() {
    let garment = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/garment.jpg"))
        .expect("garment");
    let mut files = HashMap::new();
    files.insert("g.jpg".into(), ("image/jpeg".to_string(), garment));
    let base = photo_server(files).await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_models(c);
        c.egress.allow = vec!["127.0.0.1".into()];
        c.identity.fast_photos = (1, 10);
    })
    .await;
    let (s, v) = app
        .post("/profiles/add", json!({"image_urls": [format!("{base}/g.jpg"), format!("{base}/none.jpg")], "training_tier": "fast"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["profile_id"].as_str().expect("id").to_string();
    let st = wait_for_profile(&app, &id).await;
    assert_eq!(st["status"], "ERROR", "{st}");
    let msg = st["message"].as_str().expect("message");
    assert!(msg.starts_with("no usable photo"), "{msg}");
    assert!(
        msg.contains("no face detected") && msg.contains("404"),
        "{msg}"
    );
    let (_, reserved) = app.balance(&app.key.clone()).await;
    assert_eq!(reserved, 0.0);
    app.audit_clean().await;
    app.stop().await;
}

/// Private, loopback, link-local and metadata addresses, names resolving
/// to them, other schemes and credentials: 400 naming the item, nothing kept.
#[tokio::test]
async fn profile_urls_are_guarded_against_ssrf() {
    // 127.0.0.2 is allowed (a literal address: no DNS needed here), so the
    // first URL passes and the second is the one refused.
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |c| {
        c.identity.fast_photos = (1, 10);
        c.egress.allow = vec!["127.0.0.2".into()];
    })
    .await;
    let (before, _) = app.balance(&app.key.clone()).await;
    for url in [
        "http://127.0.0.1/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/a.jpg",
        "http://192.168.1.20/a.jpg",
        "http://localhost/a.jpg",
        "http://[::1]/a.jpg",
        "http://[::ffff:127.0.0.1]/a.jpg",
        "http://0.0.0.0/a.jpg",
        "file:///etc/passwd",
        "ftp://example.com/a.jpg",
        "http://user:secret@example.com/a.jpg",
        "not a url",
    ] {
        let (s, v) = app
            .post(
                "/v1/phota/profiles/add",
                json!({"image_urls": ["http://127.0.0.2/ok.jpg", url], "training_tier": "fast"}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{url}: {v}");
        assert_eq!(v["detail"][0]["field"], "image_urls[1]", "{url}: {v}");
    }
    // Counts per tier.
    let (s, v) = app
        .post(
            "/v1/phota/profiles/add",
            json!({"image_urls": [], "training_tier": "fast"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = app
        .post(
            "/v1/phota/profiles/add",
            json!({"image_urls": ["https://example.com/a.jpg"]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "standard takes 10 to 50: {v}");
    let (s, v) = app
        .post(
            "/v1/phota/profiles/add",
            json!({"image_urls": ["https://example.com/a.jpg"], "training_tier": "turbo"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (_, v) = app.get("/v1/phota/profiles/ids").await;
    assert_eq!(v["profiles"], json!([]), "{v}");
    let (after, _) = app.balance(&app.key.clone()).await;
    assert_eq!(after, before);
    app.stop().await;
}
