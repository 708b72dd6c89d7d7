//! Phota Studio (`/v1/phota/edit`, `/v1/phota/generate` and the short
//! aliases): synchronous answers, `[[profile_id]]` references, subjects
//! counted by real face matching, the built-in identity restore, and the
//! documented refusals.

use crate::generate::{face_photo, near};
use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::config::{CogInput, Config, EngineRoute};
use atelier_shared::db::Dialect;
use atelier_shared::domain::JobType;
use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn png(img: &image::DynamicImage) -> Vec<u8> {
    let mut b = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
        .expect("encode");
    b
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A Cog route to the Studio fixture.
fn studio_route(url: &str) -> EngineRoute {
    let mapping: std::collections::BTreeMap<String, CogInput> =
        ["prompt", "seed", "width", "height", "images", "subjects"]
            .into_iter()
            .map(|k| (k.to_string(), CogInput::Field(k.to_string())))
            .collect();
    EngineRoute::Cog {
        url: url.to_string(),
        timeout_secs: 60,
        slots: 1,
        startup_secs: 60,
        inputs: [(JobType::Studio, mapping)].into(),
    }
}

/// `POST /v1/phota/profiles/add` (multipart, `fast` tier) with `photos`;
/// the new profile's id.
async fn add_profile(app: &TestApp, photos: &[image::DynamicImage]) -> String {
    let boundary = format!("atelier-test-{}", ulid::Ulid::new());
    let mut body = Vec::new();
    for (i, p) in photos.iter().enumerate() {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(&png(p));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"training_tier\"\r\n\r\nfast\r\n--{boundary}--\r\n").as_bytes(),
    );
    let r = app
        .http
        .post(app.url("/v1/phota/profiles/add"))
        .header("x-api-key", &app.key)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .expect("add");
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    v["profile_id"].as_str().expect("id").to_string()
}

/// A READY profile of the person in `photo` (five variations of it, the
/// `fast` tier), built by the real face pipeline.
async fn profile_of(app: &TestApp, photo: &str) -> String {
    let img = image::load_from_memory(&face_photo(photo)).expect("photo");
    let variations = [
        img.clone(),
        img.fliph(),
        img.brighten(20),
        img.brighten(-15),
        img.resize(700, 700, image::imageops::FilterType::Triangle),
    ];
    let id = add_profile(app, &variations).await;
    let t = Instant::now();
    loop {
        let (_, st) = app.get(&format!("/v1/phota/profiles/{id}/status")).await;
        match st["status"].as_str() {
            Some("READY") => return id,
            Some("ERROR") => panic!("profile failed: {st}"),
            _ => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "profile stuck: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn decode_all(v: &Value) -> Vec<image::RgbImage> {
    v["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|s| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s.as_str().expect("base64"))
                .expect("base64 decodes");
            image::load_from_memory(&bytes).expect("image").to_rgb8()
        })
        .collect()
}

/// Edit and generate on a generator route: the photos and the named
/// subjects' faces reach the container, `[[id]]` becomes "person N", the
/// answer carries the images (bytes or signed URLs) and the subjects
/// counted in them by face matching; each output is charged.
async fn studio_on_a_generator(dialect: Dialect, tweak: impl FnOnce(&mut Config)) {
    let fixture = CogFixture::start("studio").await;
    let app = TestApp::with(dialect, Roles::ALL, |c| {
        with_models(c);
        c.engines
            .routes
            .insert("seedream".into(), studio_route(&fixture.url));
        tweak(c);
    })
    .await;
    let gauss = profile_of(&app, "gauss.png").await;
    let (before, _) = app.balance(&app.key).await;

    // /edit: the photo shows the profile's person; two outputs.
    let (s, v) = app
        .post(
            "/v1/phota/edit",
            json!({
                "prompt": "make [[".to_string() + &gauss + "]] smile",
                "images": [b64(&face_photo("gauss.png"))],
                "num_output_images": 2,
                "aspect_ratio": "3:4",
                "seed": 40,
            }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let imgs = decode_all(&v);
    assert_eq!(imgs.len(), 2, "{v}");
    for (i, img) in imgs.iter().enumerate() {
        assert_eq!(img.dimensions(), (768, 1024));
        let c = img.get_pixel(4, 4).0;
        let prompt_len = "make person 1 smile".len() as u8;
        assert!(
            near(c[0], 40 + i as u8) && near(c[1], prompt_len) && near(c[2], 111),
            "output {i}: corner {c:?}"
        );
    }
    assert_eq!(
        v["known_subjects"]["counts"][&gauss], 2,
        "{}",
        v["known_subjects"]
    );
    assert_eq!(v["download_urls"], json!([]));

    // /generate (short alias), URLs: the subject's face drawn by the
    // fixture is found again in the output.
    let (s, v) = app
        .post(
            "/generate",
            json!({"prompt": format!("[[{gauss}]] on a beach"), "response_mode": "urls"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["images"], json!([]));
    let urls = v["download_urls"].as_array().expect("urls");
    assert_eq!(urls.len(), 1);
    let img = image::load_from_memory(&app.fetch(&urls[0]).await)
        .expect("image")
        .to_rgb8();
    assert_eq!(
        img.dimensions(),
        (1024, 1024),
        "auto without a photo: square"
    );
    assert_eq!(v["known_subjects"]["counts"][&gauss], 1, "{v}");
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!((before - after, reserved), (9.0, 0.0), "three 1K outputs");

    // A refusal is a 400 and costs nothing.
    let (s, v) = app
        .post("/v1/phota/generate", json!({"prompt": "refuse-me please"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = app
        .post("/v1/phota/generate", json!({"prompt": "garbage"}))
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert_eq!(
        app.balance(&app.key).await.0,
        after,
        "failures cost nothing"
    );
    app.audit_clean().await;
    app.stop().await;
}

#[tokio::test]
async fn studio_edit_and_generate_on_a_generator_embedded() {
    studio_on_a_generator(Dialect::Sqlite, |_| {}).await;
}

#[tokio::test]
async fn studio_edit_and_generate_on_postgres_rabbitmq_and_s3() {
    let _broker = broker_lock().await;
    let bucket = s3_bucket().await;
    studio_on_a_generator(Dialect::Postgres, |c| {
        with_rabbitmq(c);
        with_s3(c, &bucket);
    })
    .await;
}

/// The built-in engine: an edit with no prompt restores the named
/// profile's face on the matching person only, and counts them; every
/// documented refusal of both endpoints.
#[tokio::test]
async fn studio_restore_and_refusals() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_models(c);
    })
    .await;
    let gauss = profile_of(&app, "gauss.png").await;
    // The person, photographed worse: darker and softer.
    let photo = image::load_from_memory(&face_photo("gauss.png"))
        .expect("photo")
        .brighten(-40)
        .blur(2.0);
    let photo_png = png(&photo);
    let (s, v) = app
        .post(
            "/v1/phota/edit",
            json!({"images": [b64(&photo_png), b64(&face_photo("newton.png"))],
                   "profile_ids": [gauss], "num_output_images": 2, "output_format": "png"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["known_subjects"]["counts"][&gauss], 1, "{v}");
    let imgs = decode_all(&v);
    // Output 0 is the restored photo: its face changed, its corners not.
    let before = photo.to_rgb8();
    assert_eq!(imgs[0].dimensions(), before.dimensions());
    let diff = |x: u32, y: u32| {
        let (a, b) = (imgs[0].get_pixel(x, y).0, before.get_pixel(x, y).0);
        (0..3).map(|i| a[i].abs_diff(b[i]) as u32).sum::<u32>()
    };
    assert_eq!(diff(2, 2), 0, "outside the face nothing changes");
    let (w, h) = before.dimensions();
    let changed = (0..h)
        .step_by(4)
        .flat_map(|y| (0..w).step_by(4).map(move |x| (x, y)))
        .filter(|&(x, y)| diff(x, y) > 30)
        .count();
    assert!(
        changed > 100,
        "the face was restored ({changed} samples changed)"
    );
    // Output 1 is the other photo: nobody to restore, returned as it was.
    let newton = image::load_from_memory(&face_photo("newton.png"))
        .expect("newton")
        .to_rgb8();
    assert_eq!(imgs[1].as_raw(), newton.as_raw(), "no match, no change");

    // Refusals.
    let one = b64(&photo_png);
    for (path, body, status) in [
        (
            "/v1/phota/edit",
            json!({"images": []}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/phota/edit",
            json!({"images": ["not base64 !"]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/phota/edit",
            json!({"images": [one], "num_output_images": 5}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/phota/edit",
            json!({"images": [b64(b"hello")], "profile_ids": [gauss]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/phota/generate",
            json!({"prompt": "x", "images": [one]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/phota/generate",
            json!({"prompt": "x", "profile_ids": [gauss]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/phota/generate",
            json!({"prompt": "[[prf_nobody]] smiling"}),
            StatusCode::NOT_FOUND,
        ),
        (
            "/edit",
            json!({"images": [one], "profile_ids": ["prf_nobody"]}),
            StatusCode::NOT_FOUND,
        ),
        // A prompt needs a generator, and this server has none.
        (
            "/v1/phota/generate",
            json!({"prompt": "a cat"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/phota/edit",
            json!({"images": [one], "prompt": "add a hat"}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (s, v) = app.post(path, body.clone()).await;
        assert_eq!(s, status, "{path} {body}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    // A profile that is not READY (its photos show nobody): 409.
    let blanks: Vec<image::DynamicImage> = (0..5u8)
        .map(|i| {
            image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
                200,
                200,
                image::Rgb([40 * i, 90, 160]),
            ))
        })
        .collect();
    let broken = add_profile(&app, &blanks).await;
    let (s, v) = app
        .post(
            "/v1/phota/edit",
            json!({"images": [one], "profile_ids": [broken]}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["code"], "profile_not_ready", "{v}");
    app.audit_clean().await;
    app.stop().await;
}
