//! The Models API's model records (contract §8): create, list with
//! filters and pagination tokens, get, get-bulk, update, tags (`strict`),
//! description, delete, with the documented refusals, on both databases.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn put(app: &TestApp, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, v, _) = app
        .call(Method::PUT, path, Some(&app.key), Some(body))
        .await;
    (s, v)
}

async fn model_records(dialect: Dialect) {
    let app = TestApp::with(dialect, Roles::API, |_| {}).await;
    let (s, v) = app
        .post(
            "/v1/models",
            json!({"name": "Dresses", "type": "flux.1-lora", "shortDescription": "summer"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let m = &v["model"];
    assert_eq!(
        (m["status"].as_str(), m["privacy"].as_str()),
        (Some("new"), Some("private")),
        "{m}"
    );
    assert_eq!(m["baseModelId"], "flux.1-dev");
    assert!(
        m["createdAt"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{m}"
    );
    let first = m["id"].as_str().expect("id").to_string();
    assert!(first.starts_with("model_"), "{first}");
    for (body, field) in [
        (json!({"name": "x"}), "type"),
        (json!({"type": "sd-3"}), "type"),
        (json!({"type": "flux.1-composition"}), "concepts"),
        (json!({"type": "sd-1_5", "name": "n".repeat(65)}), "name"),
        (
            json!({"type": "flux.1-composition", "concepts": [{"modelId": "m", "scale": 3}]}),
            "concepts[0].scale",
        ),
        (
            json!({"type": "flux.1-lora", "parameters": {"rank": 512}}),
            "parameters.rank",
        ),
        (
            json!({"type": "sd-1_5", "parameters": {"nbEpochs": 2}}),
            "parameters.nbEpochs",
        ),
    ] {
        let (s, v) = app.post("/v1/models", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["detail"][0]["field"], field, "{body}: {v}");
    }
    let mut ids = vec![first.clone()];
    for t in ["sd-1_5", "sd-xl-lora", "sd-1_5"] {
        let (_, v) = app.post("/v1/models", json!({"type": t})).await;
        ids.push(v["model"]["id"].as_str().expect("id").to_string());
    }
    // Pages of two, newest first, then the filters.
    let (s, p1) = app.get("/v1/models?pageSize=2").await;
    assert_eq!(s, StatusCode::OK, "{p1}");
    let token = p1["nextPaginationToken"]
        .as_str()
        .expect("a next page")
        .to_string();
    let (_, p2) = app
        .get(&format!("/v1/models?pageSize=2&paginationToken={token}"))
        .await;
    assert!(p2.get("nextPaginationToken").is_none(), "{p2}");
    let listed: Vec<String> = [&p1, &p2]
        .iter()
        .flat_map(|p| p["models"].as_array().expect("models").clone())
        .map(|m| m["id"].as_str().expect("id").to_string())
        .collect();
    // Every model once, newest first (models of the same millisecond in
    // id order).
    let mut sorted = listed.clone();
    sorted.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(sorted, expected, "{listed:?}");
    let times: Vec<String> = [&p1, &p2]
        .iter()
        .flat_map(|p| p["models"].as_array().expect("models").clone())
        .map(|m| m["createdAt"].as_str().expect("createdAt").to_string())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    let (_, sd) = app.get("/v1/models?type=sd-1_5").await;
    assert_eq!(sd["models"].as_array().map(Vec::len), Some(2), "{sd}");
    for bad in [
        "/v1/models?pageSize=0",
        "/v1/models?paginationToken=nope",
        "/v1/models?status=gone",
    ] {
        let (s, v) = app.get(bad).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }

    // Update, tags, description.
    let one = format!("/v1/models/{first}");
    let (s, v) = put(
        &app,
        &one,
        json!({"name": "Summer dresses", "privacy": "public", "epoch": "000002"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (
            v["model"]["name"].as_str(),
            v["model"]["privacy"].as_str(),
            v["model"]["epoch"].as_str()
        ),
        (Some("Summer dresses"), Some("public"), Some("000002")),
        "{v}"
    );
    let (s, v) = put(&app, &one, json!({"privacy": "secret"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = put(
        &app,
        &one,
        json!({"parameters": {"rank": 32, "optimizeFor": "likeness"}}),
    )
    .await;
    assert_eq!(
        (s, v["model"]["parameters"]["rank"].as_i64()),
        (StatusCode::OK, Some(32)),
        "{v}"
    );
    // Parameters follow the type: an SD type refuses the Flux ones kept.
    let (s, v) = put(&app, &one, json!({"type": "sd-1_5"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["detail"][0]["field"], "parameters.optimizeFor", "{v}");
    let tags = format!("{one}/tags");
    let (s, v) = put(&app, &tags, json!({"add": ["sc:scenario", "dress"]})).await;
    assert_eq!(
        (s, v["added"].clone()),
        (StatusCode::OK, json!(["sc:scenario", "dress"])),
        "{v}"
    );
    let (s, v) = put(&app, &tags, json!({"add": ["dress"], "strict": true})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = put(&app, &tags, json!({"delete": ["nope", "dress"]})).await;
    assert_eq!(
        (s, v["deleted"].clone()),
        (StatusCode::OK, json!(["dress"])),
        "{v}"
    );
    let (_, v) = app.get(&one).await;
    assert_eq!(v["model"]["tags"], json!(["sc:scenario"]));
    let (_, tagged) = app.get("/v1/models?tags=sc:scenario").await;
    assert_eq!(
        tagged["models"].as_array().map(Vec::len),
        Some(1),
        "{tagged}"
    );
    let description = format!("{one}/description");
    let (s, v) = put(
        &app,
        &description,
        json!({"description": "# Summer\nlight fabrics"}),
    )
    .await;
    assert_eq!(
        (s, v["description"]["value"].as_str()),
        (StatusCode::OK, Some("# Summer\nlight fabrics")),
        "{v}"
    );
    let (_, v) = app.get(&description).await;
    assert_eq!(v["description"]["value"], "# Summer\nlight fabrics");
    let (_, v) = put(&app, &description, json!({"description": null})).await;
    assert_eq!(v["description"]["value"], "");
    let (s, _) = put(&app, &description, json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Training images: an uploaded asset, several, a data URL; the model
    // shows its first three.
    let png = |rgb: [u8; 3]| {
        let mut b = Vec::new();
        image::RgbImage::from_pixel(40, 40, image::Rgb(rgb))
            .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
            .expect("png");
        b
    };
    let ti = format!("{one}/training-images");
    let a1 = app.upload(png([200, 0, 0]), "a1.png").await;
    let (s, v) = app.post(&ti, json!({"assetId": a1})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let first_image = v["trainingImage"]["id"].as_str().expect("id").to_string();
    assert_eq!(v["trainingImage"]["name"], "a1.png");
    let copy = app.fetch(&v["trainingImage"]["downloadUrl"]).await;
    assert_eq!(copy.as_ref(), png([200, 0, 0]).as_slice(), "a frozen copy");
    let (a2, a3) = (
        app.upload(png([0, 200, 0]), "a2.png").await,
        app.upload(png([0, 0, 200]), "a3.png").await,
    );
    let (s, v) = app.post(&ti, json!({"assetIds": [a2, a3]})).await;
    assert_eq!(
        (s, v["trainingImages"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(2)),
        "{v}"
    );
    let data = format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, png([9, 9, 9]))
    );
    let (s, v) = app.post(&ti, json!({"data": data, "name": "grey"})).await;
    assert_eq!(
        (s, v["trainingImage"]["name"].as_str()),
        (StatusCode::OK, Some("grey")),
        "{v}"
    );
    let (_, v) = app.get(&one).await;
    assert_eq!(
        v["model"]["trainingImages"].as_array().map(Vec::len),
        Some(3),
        "{v}"
    );
    for (body, status) in [
        (json!({"assetId": a1}), StatusCode::BAD_REQUEST),
        (json!({}), StatusCode::BAD_REQUEST),
        (
            json!({"assetId": a1, "data": "data:image/png;base64,AA=="}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"assetIds": (0..11).map(|i| format!("f{i}")).collect::<Vec<_>>()}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"data": "data:image/png;base64,aGVsbG8="}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"assetId": "file_nope"}), StatusCode::NOT_FOUND),
        (
            json!({"assetId": a2, "preset": "weird"}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (s, v) = app.post(&ti, body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
    }
    let (s, v, _) = app
        .call(
            Method::DELETE,
            &format!("{ti}/{first_image}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!((s, v), (StatusCode::OK, json!({})));
    let (_, v) = app.get(&one).await;
    let shown: Vec<&str> = v["model"]["trainingImages"]
        .as_array()
        .expect("images")
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert!(
        !shown.contains(&first_image.as_str()) && shown.len() == 3,
        "{shown:?}"
    );
    let (s, _, _) = app
        .call(
            Method::DELETE,
            &format!("{ti}/{first_image}"),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A copy: a new id, the same fields and tags, its own image copies.
    let (s, v) = app.post(&format!("{one}/copy"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["model"];
    assert_ne!(c["id"], first.as_str());
    assert_eq!(
        (c["name"].as_str(), c["status"].as_str()),
        (Some("Summer dresses"), Some("new")),
        "{c}"
    );
    assert_eq!(c["tags"], json!(["sc:scenario"]));
    let copied: Vec<String> = c["trainingImages"]
        .as_array()
        .expect("images")
        .iter()
        .map(|i| i["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(copied.len(), 3, "{c}");
    assert!(
        copied.iter().all(|i| !shown.contains(&i.as_str())),
        "new image ids"
    );
    let copy_id = c["id"].as_str().expect("id").to_string();
    // Detaching from the copy leaves the source's images alone.
    let (s, _, _) = app
        .call(
            Method::DELETE,
            &format!("/v1/models/{copy_id}/training-images/{}", copied[0]),
            Some(&app.key),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = app.get(&one).await;
    assert_eq!(
        v["model"]["trainingImages"].as_array().map(Vec::len),
        Some(3)
    );
    let (s, _) = app.post("/v1/models/model_nope/copy", json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Bulk, isolation, delete.
    let (s, v) = app
        .post(
            "/v1/models/get-bulk",
            json!({"modelIds": [ids[1], "model_unknown", ids[2], ids[1]]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["models"].as_array().map(Vec::len), Some(2), "{v}");
    let too_many: Vec<String> = (0..101).map(|i| format!("m{i}")).collect();
    let (s, _) = app
        .post("/v1/models/get-bulk", json!({"modelIds": too_many}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let other = app.account("other", 0.0).await;
    let (s, _) = app.get_as(&other, &one).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, v) = app.get(&format!("{one}/examples")).await;
    assert_eq!(v, json!({"examples": []}));
    let (s, v, _) = app.call(Method::DELETE, &one, Some(&app.key), None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({})));
    for path in [one.clone(), format!("{one}/examples"), description.clone()] {
        let (s, _) = app.get(&path).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
    let (_, all) = app.get("/v1/models").await;
    assert_eq!(
        all["models"].as_array().map(Vec::len),
        Some(4),
        "three and the copy"
    );
    app.stop().await;
}

#[tokio::test]
async fn model_records_embedded() {
    model_records(Dialect::Sqlite).await;
}

#[tokio::test]
async fn model_records_on_postgres() {
    model_records(Dialect::Postgres).await;
}
