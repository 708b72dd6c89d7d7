//! Presets and categories (contract §6): every route and error, checked
//! `instruction_data` per type, the sharing rules across two accounts in
//! one group and one outside it, the cap, and the operator's system set.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn codes(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|p| p["preset_code"].as_str().map(String::from))
        .collect()
}

/// The operator's starter set, imported through the binary.
fn import_system(app: &TestApp) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args(["admin", "presets", "import"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("presets/system.toml"))
        .env("ATELIER_DATABASE__URL", app.cfg.database_url())
        .env("ATELIER_LOG__LEVEL", "warn")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v, json!({"categories": 3, "presets": 9}));
}

async fn presets_and_categories(dialect: Dialect) {
    let app = TestApp::with(dialect, Roles::API, |c| c.limits.presets = 6).await;
    import_system(&app);
    // Two accounts in one group, one outside it.
    let member = app.account("member", 0.0).await;
    let outsider = app.account("outsider", 0.0).await;
    let owner_id = app.dev_account_id().await;
    let member_id = app
        .store
        .account_for_token(&member)
        .await
        .expect("lookup")
        .expect("member")
        .id;
    app.store.create_group("studio", &owner_id, false).await.expect("group");
    app.store.add_group_member("studio", &member_id).await.expect("member");
    app.store
        .create_group("elsewhere", &member_id, false)
        .await
        .expect("group");

    // Create: one per type, each checked by its job's validator.
    let mut made = Vec::new();
    for (t, data) in [
        ("create_packshot", json!({"style": "white_cutout", "shadow": "contact", "options": {"size": "2K"}})),
        ("flat_2_model", json!({"pose": "walking", "lighting": "soft"})),
        ("identity_creation", json!({"appearance": {"age": 30}, "hair": {"color": "auburn"}})),
        ("model_swap", json!({"model": "auto"})),
    ] {
        let (s, v) = app
            .post("/preset", json!({"name": format!("my {t}"), "type": t, "instruction_data": data, "description": "mine"}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!((v["type"].as_str(), v["visibility"].as_str()), (Some(t), Some("private")));
        assert_eq!(v["instruction_data"], data);
        assert_eq!(v["created_by"], json!(owner_id));
        made.push(v["preset_code"].as_str().expect("code").to_string());
    }
    for (t, data, field) in [
        ("create_packshot", json!({"shadow": "contact"}), "instruction_data"),
        ("create_packshot", json!({"style": "white_cutout", "shadow": "dramatic"}), "instruction_data.shadow"),
        ("create_packshot", json!({"style": "free", "num_variations": 99}), "instruction_data.num_variations"),
        ("identity_creation", json!({"appearance": {"wings": "yes"}}), "instruction_data.appearance"),
        ("model_swap", json!({"model": "nope"}), "instruction_data.model"),
        ("flat_2_model", json!("walking"), "instruction_data"),
    ] {
        let (s, v) = app
            .post("/preset", json!({"name": "bad", "type": t, "instruction_data": data}))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{t} {data}: {v}");
        assert!(v.to_string().contains(field), "{field}: {v}");
    }
    for (body, status, what) in [
        (json!({"name": "x", "type": "video", "instruction_data": {}}), StatusCode::BAD_REQUEST, "type"),
        (json!({"type": "model_swap", "instruction_data": {}}), StatusCode::BAD_REQUEST, "name"),
        (json!({"name": "my model_swap", "type": "model_swap", "instruction_data": {}}), StatusCode::CONFLICT, "name"),
        (json!({"name": "y", "type": "model_swap", "instruction_data": {}, "category_ids": ["cat_nope"]}), StatusCode::NOT_FOUND, "cat_nope"),
        (json!({"name": "z", "type": "model_swap", "instruction_data": {}, "category_ids": ["cat_system_models"]}), StatusCode::NOT_FOUND, "cat_system_models"),
    ] {
        let (s, v) = app.post("/preset", body).await;
        assert_eq!(s, status, "{v}");
        assert!(v.to_string().contains(what), "{what}: {v}");
    }

    // Lists: own and system; filters; pages.
    let (s, v) = app.get("/preset?per_page=100").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["pagination"]["total"], 13, "4 own + 9 system: {v}");
    let (_, v) = app.get("/preset?visibility=system&type=create_packshot").await;
    assert_eq!(v["pagination"]["total"], 4, "{v}");
    let (_, v) = app.get("/preset?visibility=private&sort_by=name&order=asc").await;
    let names: Vec<&str> = v["presets"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["my create_packshot", "my flat_2_model", "my identity_creation", "my model_swap"]);
    let (_, v) = app.get("/preset?search=LINEN").await;
    assert_eq!(codes(&v, "presets"), ["pst_system_flat_lay_linen"]);
    let (_, v) = app.get("/preset?category_id=cat_system_models&per_page=2&page=2").await;
    assert_eq!((v["pagination"]["total"].as_i64(), v["presets"].as_array().map(Vec::len)), (Some(3), Some(1)), "{v}");
    for q in ["sort_by=size", "type=video", "visibility=public", "per_page=0"] {
        let (s, v) = app.get(&format!("/preset?{q}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
    }
    let (_, v) = app.get_as(&outsider, "/preset").await;
    assert_eq!(v["pagination"]["total"], 9, "only system presets: {v}");

    // Read, update, delete: the owner's; system presets are read-only.
    let [packshot, flat, identity, swap] = [&made[0], &made[1], &made[2], &made[3]];
    let (s, _) = app.get_as(&outsider, &format!("/preset/{packshot}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = app.get_as(&outsider, "/preset/pst_system_white_cutout").await;
    assert_eq!((s, v["visibility"].as_str(), v["created_by"].as_str()), (StatusCode::OK, Some("system"), Some("system")));
    assert_eq!(v["categories"], json!([{"id": "cat_system_ecommerce", "name": "E-commerce essentials"}]));
    let patch = |code: &str, body: Value| {
        let path = format!("/preset/{code}");
        let app = &app;
        async move {
            let (s, v, _) = app.call(reqwest::Method::PATCH, &path, Some(&app.key), Some(body)).await;
            (s, v)
        }
    };
    let (s, v) = patch(packshot, json!({"name": "cutout", "instruction_data": {"style": "flat_lay"}})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["name"].as_str(), v["instruction_data"]["style"].as_str(), v["description"].as_str()), (Some("cutout"), Some("flat_lay"), Some("mine")));
    for (code, body, status) in [
        (packshot.as_str(), json!({"type": "model_swap"}), StatusCode::BAD_REQUEST),
        (packshot.as_str(), json!({"instruction_data": {"style": "neon"}}), StatusCode::BAD_REQUEST),
        (packshot.as_str(), json!({"name": "my flat_2_model"}), StatusCode::CONFLICT),
        ("pst_system_white_cutout", json!({"name": "mine now"}), StatusCode::FORBIDDEN),
        ("pst_nope", json!({"name": "n"}), StatusCode::NOT_FOUND),
    ] {
        let (s, v) = patch(code, body).await;
        assert_eq!(s, status, "{code}: {v}");
    }
    let (s, _) = app.delete_as(&app.key, "/preset/pst_system_white_cutout").await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Sharing: with a group the owner belongs to; members read, never write.
    let (s, v) = app.post(&format!("/preset/{flat}/share/studio"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"preset_code": flat, "visibility": "shared", "groups": ["studio"]}));
    let (s, _) = app.post(&format!("/preset/{flat}/share/elsewhere"), json!({})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "not a member of that group");
    let (s, _) = app.post("/preset/pst_system_white_cutout/share/studio", json!({})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "system presets are not shared");
    let (s, v) = app.get_as(&member, &format!("/preset/{flat}")).await;
    assert_eq!((s, v["visibility"].as_str()), (StatusCode::OK, Some("shared")), "{v}");
    let (s, _) = app.get_as(&outsider, &format!("/preset/{flat}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = app
        .call(reqwest::Method::PATCH, &format!("/preset/{flat}"), Some(&member), Some(json!({"name": "taken over"})))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a member reads, the owner writes");
    let (_, v) = app.get_as(&member, "/preset?visibility=shared").await;
    assert_eq!(codes(&v, "presets"), [flat.clone()]);
    let (s, v) = app.delete_as(&app.key, &format!("/preset/{flat}/share/studio")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["visibility"].as_str(), v["groups"].clone()), (Some("private"), json!([])));
    let (s, _) = app.get_as(&member, &format!("/preset/{flat}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "unshared");

    // Categories.
    let (s, cat) = app
        .post("/preset/categories", json!({"name": "Summer", "description": "linen and light", "thumbnail_url": "https://example.com/t.jpg"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{cat}");
    let cat_id = cat["id"].as_str().expect("id").to_string();
    assert_eq!((cat["visibility"].as_str(), cat["preset_count"].as_i64()), (Some("private"), Some(0)));
    let (s, _) = app.post("/preset/categories", json!({"name": "Summer"})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let assign = format!("/preset/categories/{cat_id}/presets");
    let (s, v) = app.post(&assign, json!({"preset_codes": [packshot, identity, "pst_system_white_cutout"]})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"category_id": cat_id, "assigned_count": 3, "already_assigned_count": 0}));
    let (_, v) = app.post(&assign, json!({"preset_codes": [packshot]})).await;
    assert_eq!((v["assigned_count"].as_i64(), v["already_assigned_count"].as_i64()), (Some(0), Some(1)));
    let (s, _) = app.post(&assign, json!({"preset_codes": ["pst_nope"]})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app.post("/preset/categories/cat_system_models/presets", json!({"preset_codes": [swap]})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "system categories are read-only");
    let (s, v) = app.get(&format!("/preset/categories/{cat_id}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["preset_count"], 3);
    assert_eq!(codes(&v, "presets").len(), 3);
    let (s, _) = app.delete_as(&app.key, &format!("{assign}/{identity}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = app.delete_as(&app.key, &format!("{assign}/{identity}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, v) = app.get(&format!("/preset/{packshot}")).await;
    assert!(v["categories"].as_array().unwrap().iter().any(|c| c["id"] == json!(cat_id)), "{v}");
    let (s, v, _) = app
        .call(reqwest::Method::PATCH, &format!("/preset/categories/{cat_id}"), Some(&app.key), Some(json!({"name": "Summer 26"})))
        .await;
    assert_eq!((s, v["name"].as_str(), v["description"].as_str()), (StatusCode::OK, Some("Summer 26"), Some("linen and light")));
    let (s, _, _) = app
        .call(reqwest::Method::PATCH, "/preset/categories/cat_system_models", Some(&app.key), Some(json!({"name": "x"})))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (_, v) = app.get("/preset/categories?visibility=system").await;
    assert_eq!(v["pagination"]["total"], 3, "{v}");
    let (_, v) = app.get("/preset/categories?search=summer").await;
    assert_eq!(v["pagination"]["total"], 1, "{v}");

    // Sharing a category: the owner's presets in it are shared, others skipped.
    let share = format!("/preset/categories/{cat_id}/share/studio");
    let (s, v) = app.post(&share, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"shared_count": 1, "already_shared_count": 0, "skipped_preset_codes": ["pst_system_white_cutout"]}));
    let (_, v) = app.post(&share, json!({})).await;
    assert_eq!((v["shared_count"].as_i64(), v["already_shared_count"].as_i64()), (Some(0), Some(1)));
    let (s, v) = app.get_as(&member, &format!("/preset/categories/{cat_id}")).await;
    assert_eq!((s, v["visibility"].as_str()), (StatusCode::OK, Some("shared")), "{v}");
    let (s, _) = app.get_as(&outsider, &format!("/preset/categories/{cat_id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app.post_as(&member, &share, json!({})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a member cannot write the owner's category");
    let (s, _) = app.post(&format!("/preset/categories/{cat_id}/share/elsewhere"), json!({})).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Duplicate (by the member, into its own category) and the cap.
    let (s, v) = app
        .post_as(&member, &format!("/preset/categories/{cat_id}/duplicate"), json!({"name": "My summer"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["preset_count"], 2, "the shared packshot and the system preset: {v}");
    let copy_id = v["category"]["id"].as_str().expect("id").to_string();
    let (_, v) = app.get_as(&member, &format!("/preset/categories/{copy_id}")).await;
    let copied = codes(&v, "presets");
    assert_eq!(copied.len(), 2);
    assert!(copied.iter().all(|c| c != packshot && c != "pst_system_white_cutout"), "fresh codes: {copied:?}");
    assert!(v["presets"].as_array().unwrap().iter().all(|p| p["created_by"] == json!(member_id)));
    let (s, _) = app.post(&format!("/preset/categories/{cat_id}/duplicate"), json!({"name": "Summer 26"})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    // The owner holds 4 of its 6: a copy of the 2-preset category fits, a third does not.
    let (s, v) = app.post(&format!("/preset/categories/{cat_id}/duplicate"), json!({"name": "Copy 1"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = app.post(&format!("/preset/categories/{cat_id}/duplicate"), json!({"name": "Copy 2"})).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["code"], "preset_cap_reached", "{v}");
    let (s, v) = app
        .post("/preset", json!({"name": "seventh", "type": "model_swap", "instruction_data": {}}))
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("preset_cap_reached")), "{v}");

    // Deletes: single, bulk (others' and system codes fail), category.
    let (s, v) = app
        .post("/preset/bulk-delete", json!({"preset_codes": [identity, swap, "pst_system_white_cutout", copied[0]]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"deleted_count": 2, "failed_codes": ["pst_system_white_cutout", copied[0]]}));
    let (s, _) = app.post("/preset/bulk-delete", json!({"preset_codes": []})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = app.delete_as(&app.key, &format!("/preset/{flat}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = app.get(&format!("/preset/{flat}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = app.delete_as(&app.key, &format!("/preset/categories/{cat_id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = app.get(&format!("/preset/{packshot}")).await;
    assert_eq!((s, v["categories"].clone()), (StatusCode::OK, json!([])), "kept, unassigned: {v}");
    let (s, _) = app.delete_as(&app.key, "/preset/categories/cat_system_models").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn presets_and_categories_embedded() {
    presets_and_categories(Dialect::Sqlite).await;
}

#[tokio::test]
async fn presets_and_categories_on_postgres() {
    presets_and_categories(Dialect::Postgres).await;
}

async fn preset(app: &TestApp, key: &str, name: &str, t: &str, data: Value) -> String {
    let (s, v) = app
        .post_as(key, "/preset", json!({"name": name, "type": t, "instruction_data": data}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["preset_code"].as_str().expect("code").to_string()
}

/// A job's status, as soon as it is recorded.
async fn processing_options(app: &TestApp, job: &Value) -> Value {
    let id = job["job_id"].as_str().expect("job_id");
    let (s, v) = app.get(&format!("/jobs/{id}/status")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["processing_options"].clone()
}

/// `preset_code` in each job kind: the preset's fields fill the
/// instruction, explicit fields win, the code is recorded; a preset of
/// another kind, an unknown one or another account's private one is a 400
/// naming the field.
#[tokio::test]
async fn presets_fill_in_job_instructions() {
    let portrait = CogFixture::start("portrait").await;
    let flat = CogFixture::start("flat2model").await;
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |c| {
        with_models(c);
        c.limits.create_per_minute = 1000;
        c.engines.routes.insert(
            "nano_banana_2".into(),
            crate::drafts::portrait_route(&portrait.url, &[]),
        );
        c.engines
            .routes
            .insert("seedream".into(), crate::generate::flat_route(&flat.url, &[]));
    })
    .await;
    let project = app.project("presets").await;
    let file = app.upload(png(64, 64), "top.png").await;
    let code = crate::generate::ready_identity(&app, "gauss.png", "Carl").await;

    // create_packshot
    let linen = preset(
        &app,
        &app.key,
        "linen flat lay",
        "create_packshot",
        json!({"style": "flat_lay", "surface": "natural linen", "shadow": "natural", "options": {"format": "png"}}),
    )
    .await;
    let (s, v) = app
        .post(
            "/create-packshot",
            json!({"project_id": project, "images": [file], "instructions": [
                {"preset_code": linen},
                {"preset_code": linen, "shadow": "none", "num_variations": 2}
            ]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["total_outputs"], 3);
    let po = processing_options(&app, &v).await;
    let ins = po["instructions"].as_array().expect("instructions");
    for i in ins {
        assert_eq!((i["style"].as_str(), i["preset_code"].as_str()), (Some("flat_lay"), Some(linen.as_str())), "{po}");
        assert_eq!(i["surface"]["text"], "natural linen", "{po}");
        assert_eq!(i["output"]["format"], "png", "{po}");
    }
    assert_eq!((ins[0]["shadow"].as_str(), ins[1]["shadow"].as_str()), (Some("natural"), Some("none")), "explicit fields win");

    // identity_creation
    let natural = preset(
        &app,
        &app.key,
        "natural",
        "identity_creation",
        json!({"appearance": {"age": 31, "expression": "relaxed"}, "hair": {"color": "auburn"}}),
    )
    .await;
    let (s, v) = app
        .post(
            "/identity/create",
            json!({"instructions": [{"preset_code": natural, "hair": {"color": "black"}, "options": {"seed": 3}}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let po = processing_options(&app, &v).await;
    let i = &po["instructions"][0];
    assert_eq!((i["appearance"]["age"].as_str(), i["hair"]["color"].as_str()), (Some("31"), Some("black")), "{po}");
    assert_eq!(i["preset_code"], json!(natural));

    // flat_2_model
    let street = preset(&app, &app.key, "street", "flat_2_model", json!({"pose": "walking", "lighting": "golden hour"})).await;
    let (s, v) = app
        .post(
            "/flat-2-model",
            json!({"identity_code": code, "project_id": project, "images": [file],
                   "instructions": [{"preset_code": street, "pose": "seated"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let po = processing_options(&app, &v).await;
    let i = &po["instructions"][0];
    assert_eq!((i["pose"].as_str(), i["scene"]["lighting"].as_str()), (Some("seated"), Some("golden hour")), "{po}");
    assert_eq!(i["preset_code"], json!(street));

    // model_swap
    let swap = preset(&app, &app.key, "swap", "model_swap", json!({"model": "auto", "skin": "even"})).await;
    let (s, v) = app
        .post(
            "/model-swap",
            json!({"identity_code": code, "project_id": project, "images": [file], "swap_options": {"preset_code": swap}}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let po = processing_options(&app, &v).await;
    let kept = &po["processing_options"];
    assert_eq!((kept["preset_code"].as_str(), kept["skin"].as_str()), (Some(swap.as_str()), Some("even")), "{po}");

    // Refusals.
    let other = app.account("other", 100.0).await;
    let theirs = preset(&app, &other, "theirs", "create_packshot", json!({"style": "free"})).await;
    for (code, why) in [
        (swap.as_str(), "model_swap preset"),
        ("pst_nope", "unknown preset"),
        (theirs.as_str(), "unknown preset"),
    ] {
        let (s, v) = app
            .post(
                "/create-packshot",
                json!({"project_id": project, "images": [file], "instructions": [{"style": "free"}, {"preset_code": code}]}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        let text = v.to_string();
        assert!(text.contains("instructions[1].preset_code") && text.contains(why), "{why}: {v}");
    }
    let (s, v) = app
        .post(
            "/model-swap",
            json!({"identity_code": code, "project_id": project, "images": [file], "swap_options": {"preset_code": linen}}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("swap_options.preset_code"), "{v}");
}

/// `POST /preset/extract-from-text`: what the words say, as fields a preset
/// of that type accepts; 1 credit; the refusals.
#[tokio::test]
async fn extraction_from_text_drafts_savable_instructions() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |_| {}).await;
    let (before, _) = app.balance(&app.key).await;
    let cases = [
        (
            "create_packshot",
            "Ghost mannequin shot of a navy blazer, soft drop shadow, portrait format 3:4, 2K png",
            json!({"style": "ghost_mannequin", "shadow": "soft_drop", "framing": "tall_3_4", "color_palette": "navy blue",
                   "options": {"size": "2K", "format": "png"}, "prompt": "shot blazer"}),
        ),
        (
            "identity_creation",
            "A relaxed woman in her 30s with long curly auburn hair and green eyes, no makeup",
            json!({"appearance": {"gender": "female", "age": 35, "expression": "relaxed"},
                   "face": {"eyes": "green", "makeup": "none"},
                   "hair": {"color": "auburn", "length": "long", "style": "curly"}}),
        ),
        (
            "flat_2_model",
            "Seated on a rooftop, waist up, hard light from the right",
            json!({"pose": "seated", "camera": "waist up", "background": "rooftop", "lighting": "hard direct light from the right"}),
        ),
    ];
    for (i, (t, text, want)) in cases.iter().enumerate() {
        let (s, v) = app
            .post("/preset/extract-from-text", json!({"text": text, "type": t}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["instruction_data"], *want, "{t}: {v}");
        assert_eq!((v["file_id"].clone(), v["suggested_description"].as_str()), (Value::Null, Some(*text)));
        // What it drafts is a preset of that type as it is.
        let (s, p) = app
            .post("/preset", json!({"name": format!("drafted {i}"), "type": t, "instruction_data": v["instruction_data"]}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{t}: {p}");
    }
    let (s, v) = app.post("/preset/extract-from-text", json!({"text": "walking"})).await;
    assert_eq!((s, v["instruction_data"]["pose"].as_str()), (StatusCode::OK, Some("walking")), "flat_2_model by default: {v}");
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!((before - after, reserved), (4.0, 0.0), "1 credit each");
    for (body, field) in [
        (json!({"text": "  "}), "text"),
        (json!({"text": "x", "type": "video"}), "type"),
        (json!({"text": "x".repeat(4001)}), "text"),
    ] {
        let (s, v) = app.post("/preset/extract-from-text", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v.to_string().contains(field), "{v}");
    }
    let broke = app.account("broke", 0.0).await;
    let (s, v) = app
        .post_as(&broke, "/preset/extract-from-text", json!({"text": "white cutout"}))
        .await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED, "{v}");
    app.audit_clean().await;
}

/// A garment of `colour` (a trapezoid, like a T-shirt's body) on white,
/// brighter on its left by a third (a soft key light from the left), as
/// a PNG.
fn lit_garment(colour: [u8; 3]) -> Vec<u8> {
    let (w, h) = (600u32, 600u32);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (x as f32, y as f32);
        if !(120.0..=450.0).contains(&y) {
            return image::Rgb([255, 255, 255]);
        }
        let half = 90.0 + 60.0 * (y - 120.0) / 330.0;
        let dx = x - 300.0;
        if dx.abs() > half {
            return image::Rgb([255, 255, 255]);
        }
        let u = (dx + half) / (2.0 * half);
        let k = 1.15 - 0.35 * u;
        image::Rgb(colour.map(|c| (f32::from(c) * k).min(255.0) as u8))
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

/// `POST /preset/extract-from-image` and `/preset/categories/extract-from-images`
/// measure the image on the workers (ISNet, SCRFD) and say only what they
/// measured: a red garment lit from the left on white reads as a red
/// palette, a white cutout and a left key light; Newton's portrait as
/// shoulder-length hair, a long face and a neutral expression, and red
/// hair once the test paints it red. The
/// drafts are presets as they are; a category of two images words what
/// they share identically; 1 credit per image; the refusals.
#[tokio::test]
async fn extraction_from_images_measures_what_they_show() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, with_models).await;
    let (before, _) = app.balance(&app.key).await;
    let red = app.upload(lit_garment([190, 30, 40]), "red.png").await;
    let (s, v) = app
        .post("/preset/extract-from-image", json!({"file_id": red, "type": "create_packshot"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let d = &v["instruction_data"];
    assert_eq!(d["style"], "white_cutout", "{v}");
    assert_eq!(d["background"], "pure white seamless background", "{v}");
    assert!(d["color_palette"].as_str().is_some_and(|p| p.starts_with("red")), "{v}");
    assert_eq!(d["lighting"]["direction"], "left", "{v}");
    assert_eq!(d["shadow"], "none", "{v}");
    assert_eq!(d["framing"], "square_packshot", "{v}");
    assert_eq!(v["file_id"], json!(red));
    let (s, p) = app
        .post("/preset", json!({"name": "measured", "type": "create_packshot", "instruction_data": d}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "a draft is a preset as it is: {p}");

    // A face: Newton's portrait (grey shoulder-length hair, a long face).
    let newton = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/testdata/newton.png"),
    )
    .expect("scripts/fetch-models");
    let portrait = app.upload(newton.clone(), "newton.png").await;
    let (s, v) = app
        .post("/preset/extract-from-image", json!({"file_id": portrait, "type": "identity_creation"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let d = &v["instruction_data"];
    let groups: Vec<&String> = d.as_object().expect("object").keys().collect();
    assert_eq!(groups, ["appearance", "face", "hair"], "{v}");
    // The painting's varnish casts everything yellow (its grey hair
    // measures L* 57, b* 22): the colour is checked on painted hair below.
    assert!(d["hair"]["color"].is_string(), "{v}");
    assert_eq!(d["hair"]["length"], "shoulder length", "{v}");
    assert_eq!(d["face"]["face_shape"], "long", "{v}");
    assert!(v["measurements"]["face"]["hair_lab"].is_array(), "the figures come along: {v}");
    assert_eq!(d["appearance"]["expression"], "neutral", "{v}");
    assert!(d["appearance"]["skin"].is_string(), "{v}");
    assert!(d["appearance"].get("gender").is_none(), "gender is not measured: {v}");
    // The same portrait with the hair above the face painted red.
    let mut painted = image::load_from_memory(&newton).expect("png").to_rgb8();
    for y in 45..86 {
        for x in 334..439 {
            painted.put_pixel(x, y, image::Rgb([190, 60, 30]));
        }
    }
    let mut bytes = std::io::Cursor::new(Vec::new());
    painted.write_to(&mut bytes, image::ImageFormat::Png).expect("png");
    let repainted = app.upload(bytes.into_inner(), "red-haired.png").await;
    let (s, v) = app
        .post("/preset/extract-from-image", json!({"file_id": repainted, "type": "identity_creation"}))
        .await;
    assert_eq!((s, v["instruction_data"]["hair"]["color"].as_str()), (StatusCode::OK, Some("red")), "{v}");

    // A category from two garments: what they share reads alike.
    let blue = app.upload(lit_garment([40, 70, 190]), "blue.png").await;
    let (s, v) = app
        .post(
            "/preset/categories/extract-from-images",
            json!({"file_ids": [red, blue], "type": "create_packshot"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let presets = v["presets"].as_array().expect("presets");
    assert_eq!((presets.len(), v["category"]["preset_count"].as_i64()), (2, Some(2)), "{v}");
    for key in ["style", "background", "framing"] {
        assert_eq!(presets[0]["instruction_data"][key], presets[1]["instruction_data"][key], "{key}: {v}");
        assert!(v["shared_traits"].as_array().expect("traits").contains(&json!(key)), "{v}");
    }
    assert!(presets[1]["instruction_data"]["color_palette"].as_str().is_some_and(|p| p.starts_with("blue")), "{v}");
    assert!(!v["shared_traits"].as_array().expect("traits").contains(&json!("color_palette")), "{v}");
    assert!(v["category"]["description"].as_str().is_some_and(|d| d.contains("The same in every image: ")), "{v}");
    let cat = v["category"]["id"].as_str().expect("id");
    let (s, c) = app.get(&format!("/preset/categories/{cat}")).await;
    assert_eq!((s, c["presets"].as_array().map(Vec::len)), (StatusCode::OK, Some(2)), "{c}");
    let (after, reserved) = app.balance(&app.key).await;
    assert_eq!((before - after, reserved), (5.0, 0.0), "1 credit per image measured");

    // Refusals, each naming the problem; none is charged.
    let blank = app.upload(png(64, 64), "blank.png").await;
    let garment = app.upload(garment_jpeg(400, 500), "garment.jpg").await;
    for (path, body, status, says) in [
        ("/preset/extract-from-image", json!({"type": "create_packshot"}), StatusCode::BAD_REQUEST, "file_id"),
        ("/preset/extract-from-image", json!({"file_id": "nope"}), StatusCode::NOT_FOUND, "nope"),
        ("/preset/extract-from-image", json!({"file_id": red, "type": "video"}), StatusCode::BAD_REQUEST, "type"),
        ("/preset/extract-from-image", json!({"file_id": blank, "type": "create_packshot"}), StatusCode::BAD_REQUEST, "no product found"),
        ("/preset/extract-from-image", json!({"file_id": garment, "type": "identity_creation"}), StatusCode::BAD_REQUEST, "no face detected"),
        ("/preset/categories/extract-from-images", json!({"file_ids": [red], "type": "create_packshot"}), StatusCode::BAD_REQUEST, "file_ids"),
        ("/preset/categories/extract-from-images", json!({"file_ids": [red, red], "type": "create_packshot"}), StatusCode::BAD_REQUEST, "twice"),
        ("/preset/categories/extract-from-images", json!({"file_ids": [red, blue]}), StatusCode::BAD_REQUEST, "type"),
    ] {
        let (s, v) = app.post(path, body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
        assert!(v.to_string().contains(says), "{body}: {v}");
    }
    let (s, v) = app
        .post("/preset/categories/extract-from-images", json!({"file_ids": [red, blue], "type": "create_packshot", "name": c["name"]}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "an explicit name taken: {v}");
    let broke = app.account("broke", 0.0).await;
    let theirs = app.upload_as(&broke, lit_garment([190, 30, 40]), "r.png").await;
    let (s, v) = app
        .post_as(&broke, "/preset/extract-from-image", json!({"file_id": theirs, "type": "create_packshot"}))
        .await;
    assert_eq!(s, StatusCode::PAYMENT_REQUIRED, "{v}");
    let (s, _) = app
        .post_as(&broke, "/preset/extract-from-image", json!({"file_id": red, "type": "create_packshot"}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another account's file");
    let (spent, reserved) = app.balance(&app.key).await;
    assert_eq!((before - spent, reserved), (5.0, 0.0), "a refused image costs nothing");
    app.audit_clean().await;
}
