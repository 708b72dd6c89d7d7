//! Custom models and training data (contract §7, seed 001): the model's
//! life (create, read, rename, soft delete) and its training images sent as
//! raw bodies, with every documented refusal.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::config::Config;
use atelier_shared::db::Dialect;
use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn png(rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(64, 48, image::Rgb(rgb));
    let mut b = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
        .expect("encode");
    b
}

/// A raw-body request with `content_type`.
async fn raw(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let r = app
        .http
        .request(method, app.url(path))
        .header("x-api-key", &app.key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("sent");
    let s = r.status();
    let text = r.text().await.expect("body");
    (
        s,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn models_and_training_data(dialect: Dialect, tweak: impl FnOnce(&mut Config)) {
    let app = TestApp::with(dialect, Roles::API, tweak).await;
    let (s, v) = app
        .post(
            "/v1/custom-models",
            json!({"displayName": "Summer Collection Style Model"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["displayName"], "Summer Collection Style Model");
    let id = v["id"].as_str().expect("id").to_string();
    let (s, m) = app.get(&format!("/v1/custom-models/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(
        (m["id"].as_str(), m["customModelType"].is_null()),
        (Some(id.as_str()), true),
        "{m}"
    );
    let (s, m, _) = app
        .call(
            reqwest::Method::PATCH,
            &format!("/v1/custom-models/{id}"),
            Some(&app.key),
            Some(json!({"updatedDisplayName": "Summer Dresses Style Model"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{m}");
    assert_eq!(m["displayName"], "Summer Dresses Style Model");
    let (s, m, _) = app
        .call(
            reqwest::Method::PUT,
            &format!("/v1/custom-models/{id}"),
            Some(&app.key),
            Some(json!({"displayName": "Dresses"})),
        )
        .await;
    assert_eq!(
        (s, m["displayName"].as_str()),
        (StatusCode::OK, Some("Dresses")),
        "{m}"
    );

    // Five training images, raw bodies.
    let data = format!("/v1/custom-models/{id}/data");
    let mut ids = Vec::new();
    for i in 0..5u8 {
        let (s, v) = raw(
            &app,
            reqwest::Method::POST,
            &data,
            "image/png",
            png([40 * i, 90, 200]),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        ids.push(v["dataId"].as_str().expect("dataId").to_string());
    }
    let (s, list) = app.get(&data).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    let list = list.as_array().expect("a bare array").clone();
    assert_eq!(list.len(), 5);
    assert_eq!(list[0]["dataId"], ids[0].as_str());
    assert_eq!(list[0]["contentType"], "image/png");
    assert_eq!(list[0]["size"], png([0, 90, 200]).len());

    // Read one back with its bytes; replace it; delete another.
    let one = format!("{data}/{}", ids[1]);
    let (s, v) = app.get(&one).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let url = v["dataUrl"].as_str().expect("dataUrl");
    let b64 = url
        .strip_prefix("data:image/png;base64,")
        .expect("a PNG data URL");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64"),
        png([40, 90, 200])
    );
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(32, 32, image::Rgb([1, 2, 3]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .expect("jpeg");
    let (s, v) = raw(&app, reqwest::Method::PUT, &one, "image/jpg", jpeg.clone()).await;
    assert_eq!(
        (s, v["dataId"].as_str()),
        (StatusCode::OK, Some(ids[1].as_str())),
        "{v}"
    );
    let (_, v) = app.get(&one).await;
    assert!(
        v["dataUrl"]
            .as_str()
            .expect("url")
            .starts_with("data:image/jpeg;base64,"),
        "{v}"
    );
    let (s, v, _) = app
        .call(
            reqwest::Method::DELETE,
            &format!("{data}/{}", ids[2]),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (_, list) = app.get(&data).await;
    assert_eq!(list.as_array().map(Vec::len), Some(4));
    let (s, _) = app.get(&format!("{data}/{}", ids[2])).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Refusals.
    for (ct, body, status) in [
        (
            "text/plain",
            b"hello".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "image/gif",
            png([1, 1, 1]),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        ("image/png", jpeg.clone(), StatusCode::BAD_REQUEST),
        (
            "image/png",
            b"\x89PNG not really".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        ("image/png", Vec::new(), StatusCode::BAD_REQUEST),
        (
            "image/png",
            vec![0u8; 10 * 1024 * 1024 + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ] {
        let (s, v) = raw(&app, reqwest::Method::POST, &data, ct, body).await;
        assert_eq!(s, status, "{ct}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    for body in [
        json!({}),
        json!({"displayName": "  "}),
        json!({"displayName": "a\u{0}b"}),
    ] {
        let (s, v) = app.post("/v1/custom-models", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
    }
    // Another account sees nothing of it.
    let other = app.account("other", 10.0).await;
    let (s, _) = app.get_as(&other, &format!("/v1/custom-models/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app.get_as(&other, &data).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Soft delete: gone for reads.
    let (s, _, _) = app
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/custom-models/{id}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    for path in [format!("/v1/custom-models/{id}"), data.clone(), one.clone()] {
        let (s, _) = app.get(&path).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
    let (s, _, _) = app
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/custom-models/{id}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "deleted once");
    let (s, _) = raw(
        &app,
        reqwest::Method::POST,
        &data,
        "image/png",
        png([9, 9, 9]),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn custom_models_and_training_data_embedded() {
    models_and_training_data(Dialect::Sqlite, |_| {}).await;
}

#[tokio::test]
async fn custom_models_and_training_data_on_postgres_and_s3() {
    let bucket = s3_bucket().await;
    models_and_training_data(Dialect::Postgres, |c| with_s3(c, &bucket)).await;
}
