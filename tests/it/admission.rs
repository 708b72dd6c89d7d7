//! Every admission rule of `POST /create-packshot`.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn validation_errors_name_the_field_and_create_nothing() {
    // API only: nothing would run anyway; we only look at admission.
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |c| {
        c.limits.create_per_minute = 1000
    })
    .await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(64, 64), "a.jpg").await;
    let base = packshot_body(&p, &[&f]);
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            json!({"instructions": base["instructions"], "images": [f]}),
            "",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][0]["style"] = json!("cubist");
                b
            },
            "instructions[0].style",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][0]
                    .as_object_mut()
                    .expect("obj")
                    .remove("style");
                b
            },
            "instructions[0]",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][1]["num_variations"] = json!(9);
                b
            },
            "instructions[1].num_variations",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][1]["num_variations"] = json!(0);
                b
            },
            "instructions[1].num_variations",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][0]["options"] = json!({"width": 1024});
                b
            },
            "instructions[0].options.height",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][0]["options"] = json!({"width": 1020, "height": 1024});
                b
            },
            "instructions[0].options.width",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][0]["options"] = json!({"width": 8000, "height": 1024});
                b
            },
            "instructions[0].options.width",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][0]["options"] = json!({"width": 256, "height": 2048});
                b
            },
            "instructions[0].options.width",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][0]["options"] = json!({"ar": "2:1"});
                b
            },
            "instructions[0].options.ar",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][0]["shadow"] = json!("hard");
                b
            },
            "instructions[0].shadow",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][0]["framing"] = json!("tall");
                b
            },
            "instructions[0].framing",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][0]["background"] = json!(999);
                b
            },
            "instructions[0].background",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"][0]["prompt"] = json!("x".repeat(4001));
                b
            },
            "instructions[0].prompt",
        ),
        (
            {
                let mut b = base.clone();
                b["options"] = json!({"use_anchor": true, "anchor_index": 5});
                b
            },
            "options.anchor_index",
        ),
        (
            {
                let mut b = base.clone();
                b["options"] = json!({"model": "seedream"});
                b
            },
            "options.model",
        ),
        (
            {
                let mut b = base.clone();
                b["options"] = json!({"model": "midjourney"});
                b
            },
            "options.model",
        ),
        (
            {
                let mut b = base.clone();
                b["images"] = json!([f, f]);
                b
            },
            "images[1]",
        ),
        (
            {
                let mut b = base.clone();
                b["images"] = json!([]);
                b
            },
            "images",
        ),
        (
            {
                let mut b = base.clone();
                b["images"] = json!((0..11).map(|i| format!("f{i}")).collect::<Vec<_>>());
                b
            },
            "images",
        ),
        (
            {
                let mut b = base.clone();
                b["images"] = json!([{"note": "no id"}]);
                b
            },
            "images[0]",
        ),
        (
            {
                let mut b = base.clone();
                b["instructions"] = json!(
                    (0..11)
                        .map(|_| json!({"style": "free"}))
                        .collect::<Vec<_>>()
                );
                b
            },
            "instructions",
        ),
    ];
    for (body, field) in cases {
        let (s, v) = app.post("/create-packshot", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {v}");
        assert_eq!(v["code"], "invalid_request");
        if !field.is_empty() {
            assert_eq!(v["detail"][0]["field"], field, "{v}");
        }
        assert!(
            !v["detail"][0]["message"].as_str().unwrap_or("").is_empty(),
            "{v}"
        );
    }
    let r = app
        .http
        .post(app.url("/create-packshot"))
        .bearer_auth(&app.key)
        .header("content-type", "application/json")
        .body("{\"project_id\":")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let (_, v) = app.get("/billing/balance").await;
    assert_eq!(
        v["in_progress_credits"], 0.0,
        "refused requests reserve nothing"
    );
    assert_eq!(app.store.count_accounts().await.expect("count"), 1);
    app.stop().await;
}

#[tokio::test]
async fn credits_plan_ownership_and_caps() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |c| {
        c.limits.create_per_minute = 1000;
        c.limits.active_jobs = 2;
    })
    .await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(64, 64), "a.jpg").await;

    // 402 with the three numbers of the contract: 4 outputs at 4K = 40 > 30.
    let poor = app.account("poor", 30.0).await;
    let pp = {
        let (_, v) = app
            .post_as(&poor, "/project", json!({"project_name": "p"}))
            .await;
        v["project_id"].as_str().expect("id").to_string()
    };
    let pf = app.upload_as(&poor, garment_jpeg(32, 32), "b.jpg").await;
    let body = json!({"project_id": pp, "images": [pf], "instructions": [{"style": "free", "num_variations": 4, "options": {"size": "4K"}}]});
    let (s, v) = app.post_as(&poor, "/create-packshot", body).await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED, "{v}");
    assert_eq!(
        (
            v["required_credits"].as_f64(),
            v["in_progress_credits"].as_f64(),
            v["user_credits"].as_f64()
        ),
        (Some(40.0), Some(0.0), Some(30.0))
    );
    assert_eq!(v["code"], "insufficient_credits");

    // 403: size above the plan, custom dimensions without the policy.
    let acc = app.dev_account_id().await;
    app.store
        .set_account_policy(&acc, None, Some("2K"), None)
        .await
        .expect("policy");
    let body = json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout", "options": {"size": "4K"}}]});
    let (s, v) = app.post("/create-packshot", body).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let body = json!({"project_id": p, "images": [f], "instructions": [{"style": "white_cutout", "options": {"width": 800, "height": 1200}}]});
    assert_eq!(
        app.post("/create-packshot", body.clone()).await.0,
        StatusCode::FORBIDDEN
    );
    app.store
        .set_account_policy(&acc, None, None, Some(true))
        .await
        .expect("policy");
    let (s, v) = app.post("/create-packshot", body).await;
    assert_eq!(
        s,
        StatusCode::ACCEPTED,
        "custom dimensions allowed by policy: {v}"
    );

    // 404: another account's project or file; 400: a file whose upload never happened.
    let other = app.account("other", 100.0).await;
    let (_, v) = app
        .post_as(&other, "/project", json!({"project_name": "theirs"}))
        .await;
    let their_project = v["project_id"].as_str().expect("id").to_string();
    let their_file = app.upload_as(&other, garment_jpeg(32, 32), "c.jpg").await;
    let ins = json!([{"style": "white_cutout"}]);
    let (s, _) = app
        .post(
            "/create-packshot",
            json!({"project_id": their_project, "images": [f], "instructions": ins}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [their_file], "instructions": ins}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (_, slot) = app.post("/upload", json!({"filename": "never.jpg"})).await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [slot["file_id"]], "instructions": ins}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["detail"][0]["field"], "images[0]");

    // 429 concurrency: the custom-dimension job above is active; one more fits, the third is refused.
    let (s, _) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": ins}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, v, h) = app
        .call(
            Method::POST,
            "/create-packshot",
            Some(&app.key),
            Some(json!({"project_id": p, "images": [f], "instructions": ins})),
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["code"], "concurrency_limit");
    assert!(h.contains_key("retry-after"));
    // Enterprise accounts are exempt.
    app.store
        .set_account_policy(
            &acc,
            Some(atelier_shared::domain::Plan::Enterprise),
            None,
            None,
        )
        .await
        .expect("policy");
    let (s, _) = app
        .post(
            "/create-packshot",
            json!({"project_id": p, "images": [f], "instructions": ins}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    app.audit_clean().await;
    app.stop().await;
}

#[tokio::test]
async fn creation_rate_limit_answers_429_with_retry_after() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |c| c.limits.active_jobs = 100).await;
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(32, 32), "a.jpg").await;
    let body = json!({"project_id": p, "images": [f], "instructions": [{"style": "free"}]});
    for i in 0..5 {
        let (s, v, h) = app
            .call(
                Method::POST,
                "/create-packshot",
                Some(&app.key),
                Some(body.clone()),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "request {i}: {v}");
        assert_eq!(h["x-ratelimit-limit"], "5");
    }
    let (s, v, h) = app
        .call(
            Method::POST,
            "/create-packshot",
            Some(&app.key),
            Some(body.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(v["code"], "rate_limited");
    let wait: u64 = h["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(v["retry_after"], wait);
    // Other endpoints are not affected by the creation bucket.
    assert_eq!(app.get("/project").await.0, StatusCode::OK);
    app.stop().await;
}
