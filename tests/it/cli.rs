//! The binary's operator commands: `atelier admin …`, `atelier config`.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use serde_json::Value;

fn atelier(db: &str, args: &[&str]) -> (bool, Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args(args)
        .env("ATELIER_DATABASE__URL", db)
        .env("ATELIER_LOG__LEVEL", "warn")
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    (
        out.status.success(),
        json,
        format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

#[tokio::test]
async fn admin_manages_accounts_keys_credits_and_shared_billing() {
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |_| {}).await;
    let db = app.cfg.database_url();
    let (ok, acme, out) = atelier(
        &db,
        &[
            "admin",
            "account",
            "create",
            "--name",
            "acme",
            "--credits",
            "50",
            "--with-key",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(acme["credits"], 50.0);
    let acme_key = acme["api_key"]
        .as_str()
        .expect("key printed once")
        .to_string();
    assert_eq!(app.balance(&acme_key).await, (50.0, 0.0));

    let (ok, _, out) = atelier(&db, &["admin", "account", "create", "--name", "acme"]);
    assert!(!ok && out.contains("already exists"), "{out}");

    let (ok, v, out) = atelier(
        &db,
        &[
            "admin",
            "credits",
            "grant",
            "--account",
            "acme",
            "--amount",
            "-20",
            "--reason",
            "correction",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(v["credits"], 30.0);
    let (ok, _, out) = atelier(
        &db,
        &[
            "admin",
            "credits",
            "grant",
            "--account",
            "acme",
            "--amount",
            "-31",
            "--reason",
            "too much",
        ],
    );
    assert!(!ok, "credits must never go negative: {out}");

    let (ok, bob, out) = atelier(&db, &["admin", "account", "create", "--name", "bob"]);
    assert!(ok, "{out}");
    let (ok, key, out) = atelier(
        &db,
        &[
            "admin",
            "key",
            "create",
            "--account",
            "bob",
            "--name",
            "laptop",
        ],
    );
    assert!(ok, "{out}");
    let bob_key = key["api_key"].as_str().expect("key").to_string();
    let (ok, _, out) = atelier(
        &db,
        &[
            "admin",
            "group",
            "create",
            "--name",
            "studio",
            "--owner",
            "acme",
            "--shared-billing",
        ],
    );
    assert!(ok, "{out}");
    let (ok, _, out) = atelier(
        &db,
        &[
            "admin",
            "group",
            "add-member",
            "--group",
            "studio",
            "--account",
            bob["id"].as_str().expect("id"),
        ],
    );
    assert!(ok, "{out}");
    // Bob spends the group owner's credits.
    let (_, v) = app.get_as(&bob_key, "/billing/balance").await;
    assert_eq!(
        (v["user_credits"].as_f64(), v["billing_owner"].as_str()),
        (Some(30.0), Some("studio"))
    );

    let (ok, v, out) = atelier(
        &db,
        &[
            "admin",
            "key",
            "revoke",
            "--account",
            "bob",
            "--key-id",
            key["key_id"].as_str().expect("id"),
        ],
    );
    assert!(ok, "{out} {v}");
    assert_eq!(
        app.get_as(&bob_key, "/billing/balance").await.0,
        reqwest::StatusCode::UNAUTHORIZED
    );

    let (ok, v, out) = atelier(&db, &["admin", "audit"]);
    assert!(ok && v["ok"] == true, "{out}");
    app.stop().await;
}

#[test]
fn config_prints_the_effective_config_without_secrets() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_atelier"))
        .arg("config")
        .env(
            "ATELIER_DATABASE__URL",
            "postgres://atelier:hunter2-secret@db:5432/atelier",
        )
        .env(
            "ATELIER_BOOTSTRAP__API_KEY",
            "atl_do_not_print_me_0123456789abcdefghij",
        )
        .env("ATELIER_SERVER__LISTEN", "0.0.0.0:9090")
        .output()
        .expect("runs");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}");
    assert!(s.contains("0.0.0.0:9090"), "{s}");
    assert!(
        !s.contains("hunter2-secret") && !s.contains("atl_do_not_print_me"),
        "{s}"
    );

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_atelier"))
        .arg("config")
        .env("ATELIER_SERVER__LISTEN", "not-an-address")
        .env("ATELIER_WORKER__CONCURRENCY", "0")
        .output()
        .expect("runs");
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        e.contains("server.listen") && e.contains("worker.concurrency"),
        "every bad key is named: {e}"
    );
}

/// `admin accounts ls`, `keys ls` (never a secret) and `jobs show` (the job,
/// its outputs with their attempts, its ledger rows).
#[tokio::test]
async fn admin_lists_accounts_and_keys_and_shows_a_job() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, |_| {}).await;
    let db = app.cfg.database_url();
    let p = app.project("p").await;
    let f = app.upload(garment_jpeg(64, 64), "a.jpg").await;
    let (s, v) = app.post("/create-packshot", packshot_body(&p, &[&f])).await;
    assert_eq!(s, reqwest::StatusCode::ACCEPTED, "{v}");
    let job = v["job_id"].as_str().expect("job").to_string();
    let st = app
        .wait_for_job(&job, std::time::Duration::from_secs(60))
        .await;
    assert_eq!(st["status"], "completed", "{st}");

    let (ok, v, out) = atelier(&db, &["admin", "accounts", "ls"]);
    assert!(ok, "{out}");
    let accounts = v["accounts"].as_array().expect("accounts");
    assert_eq!(accounts.len(), 1, "{v}");
    assert_eq!(accounts[0]["name"], "dev");
    assert_eq!(accounts[0]["credits"], 1000.0 - 16.0);

    let account = app.dev_account_id().await;
    let (spare, _) = app
        .store
        .create_api_key(&account, "spare", None, None)
        .await
        .expect("key");
    assert!(
        app.store
            .revoke_api_key(&account, &spare)
            .await
            .expect("revoke")
    );
    let (ok, v, out) = atelier(&db, &["admin", "keys", "ls", "--account", "dev"]);
    assert!(ok, "{out}");
    assert!(!out.contains(DEV_KEY), "a secret is never shown: {out}");
    let keys = v["keys"].as_array().expect("keys");
    let state = |name: &str| {
        keys.iter()
            .find(|k| k["name"] == name)
            .map(|k| k["state"].clone())
    };
    assert_eq!(state("bootstrap"), Some(Value::from("live")), "{v}");
    assert_eq!(state("spare"), Some(Value::from("revoked")), "{v}");

    let (ok, v, out) = atelier(&db, &["admin", "jobs", "show", &job]);
    assert!(ok, "{out}");
    assert_eq!(v["job"]["status"], "completed", "{v}");
    assert_eq!(v["job"]["credits_charged"], 16.0, "{v}");
    let outputs = v["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 4, "{v}");
    for o in outputs {
        assert_eq!(
            (o["status"].as_str(), o["attempt"].as_i64()),
            (Some("completed"), Some(1)),
            "{o}"
        );
    }
    let kinds: Vec<&str> = v["ledger"]
        .as_array()
        .expect("ledger")
        .iter()
        .filter_map(|l| l["kind"].as_str())
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "reserve").count(), 1, "{v}");
    assert_eq!(kinds.iter().filter(|k| **k == "charge").count(), 4, "{v}");

    let (ok, _, out) = atelier(&db, &["admin", "jobs", "show", "job_nope"]);
    assert!(!ok && out.contains("no job"), "{out}");
    // Every subcommand and flag explains itself.
    let (ok, _, out) = atelier(&db, &["admin", "keys", "ls", "--help"]);
    assert!(ok && out.contains("Account id or name"), "{out}");
    app.stop().await;
}

/// `admin dead-letters ls` shows what `<queue>.dead` holds and leaves it
/// there; `replay` moves it back to its queue.
#[tokio::test]
async fn dead_letters_are_listed_and_replayed() {
    // No worker: replayed tasks stay in their queue for the test to count.
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |_| {}).await;
    let db = app.cfg.database_url();
    let q = app.services.queue.clone();
    for n in 0..3 {
        let mut m = atelier_shared::queue::Message {
            payload: format!("{{\"poison\":{n}}}"),
            headers: Default::default(),
            delay: None,
        };
        m = m
            .with_header("x-death-reason", "delivery limit exceeded")
            .with_header("x-original-queue", "packshot");
        q.publish("packshot.dead", m).await.expect("publish");
    }
    let (ok, v, out) = atelier(&db, &["admin", "dead-letters", "ls", "--limit", "2"]);
    assert!(ok, "{out}");
    let packshot = v["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["queue"] == "packshot")
        .cloned()
        .expect("packshot");
    assert_eq!(packshot["dead"], 3, "{v}");
    assert_eq!(packshot["first"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(packshot["first"][0]["reason"], "delivery limit exceeded");
    // Looking leaves them where they are.
    assert_eq!(q.depth("packshot.dead").await.expect("depth"), 3);

    let (ok, _, out) = atelier(&db, &["admin", "dead-letters", "ls", "--queue", "nope"]);
    assert!(!ok && out.contains("no queue"), "{out}");

    let (ok, v, out) = atelier(
        &db,
        &[
            "admin",
            "dead-letters",
            "replay",
            "--queue",
            "packshot",
            "--limit",
            "1",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(v["replayed"], 1, "{v}");
    assert_eq!(q.depth("packshot.dead").await.expect("depth"), 2);
    assert_eq!(q.depth("packshot").await.expect("depth"), 1);
    let (ok, v, out) = atelier(
        &db,
        &["admin", "dead-letters", "replay", "--queue", "packshot"],
    );
    assert!(ok, "{out}");
    assert_eq!(v["replayed"], 2, "{v}");
    assert_eq!(q.depth("packshot.dead").await.expect("depth"), 0);
    assert_eq!(q.depth("packshot").await.expect("depth"), 3);
    // The replayed messages lost the dead-letter headers.
    let mut c = q.consume("packshot", 3).await.expect("consume");
    let d = c.next().await.expect("a message");
    assert!(!d.headers.contains_key("x-death-reason"), "{:?}", d.headers);
    d.ack().await.expect("ack");
    app.stop().await;
}

/// The console's operator routes: queues with their dead letters, looked
/// at and moved back; the accounts holding credits; the configuration
/// with its secrets hidden. To any other key the routes do not exist.
#[tokio::test]
async fn the_operator_routes_show_the_queues_and_replay_dead_letters() {
    use reqwest::StatusCode;
    use serde_json::json;
    // No scheduler and no worker: the job below stays pending with its
    // credits held, replayed tasks stay in their queue.
    let app = TestApp::with(Dialect::Sqlite, Roles::API, |_| {}).await;
    let q = app.services.queue.clone();
    for n in 0..3 {
        let m = atelier_shared::queue::Message {
            payload: format!("{{\"poison\":{n}}}"),
            headers: Default::default(),
            delay: None,
        }
        .with_header("x-death-reason", "delivery limit exceeded")
        .with_header("x-original-queue", "swap");
        q.publish("swap.dead", m).await.expect("publish");
    }
    let customer = app.account("shop", 50.0).await;
    let (s, v) = app
        .post_as(&customer, "/project", json!({"project_name": "mine"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let f2 = app
        .upload_as(&customer, garment_jpeg(64, 64), "b.jpg")
        .await;
    let (s, v) = app
        .post_as(
            &customer,
            "/create-packshot",
            json!({"project_id": v["project_id"], "images": [f2], "instructions": [{"style": "white_cutout", "num_variations": 2}]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");

    // Not an operator: the routes do not exist.
    for (m, path) in [
        (reqwest::Method::GET, "/admin/overview"),
        (reqwest::Method::GET, "/admin/dead-letters/swap"),
        (reqwest::Method::POST, "/admin/dead-letters/swap/replay"),
    ] {
        let (s, v, _) = app
            .call(
                m.clone(),
                path,
                Some(&customer),
                Some(json!({})).filter(|_| m == reqwest::Method::POST),
            )
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {v}");
    }

    let (s, o) = app.get("/admin/overview").await;
    assert_eq!(s, StatusCode::OK, "{o}");
    assert_eq!(o["queue_kind"], "embedded", "{o}");
    let queue = |name: &str| {
        o["queues"]
            .as_array()
            .expect("queues")
            .iter()
            .find(|q| q["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no queue {name} in {o}"))
    };
    assert_eq!(queue("swap")["dead_letters"], 3, "{o}");
    assert_eq!(queue("packshot")["dead_letters"], 0, "{o}");
    assert_eq!(queue("packshot")["open"]["pending"], 2, "{o}");
    assert_eq!(queue("packshot")["workers_alive"], 0, "{o}");
    assert_eq!(queue("outcomes")["role"], "reports", "{o}");
    assert!(o["workers"].as_array().is_some_and(Vec::is_empty), "{o}");
    let shop = o["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .find(|a| a["name"] == "shop")
        .cloned()
        .unwrap_or_else(|| panic!("the account holding credits is listed: {o}"));
    assert_eq!(shop["reserved_credits"], 6.0, "{shop}");
    assert_eq!(shop["available_credits"], 44.0, "{shop}");
    // The configuration, its secrets hidden.
    let config = o["config"].to_string();
    assert!(config.contains("\"presence_secs\""), "{config}");
    assert!(
        !config.contains(&app.key),
        "the bootstrap key leaked: {config}"
    );
    assert!(
        !config.contains(app.cfg.server.url_signing_key.as_deref().unwrap_or("never")),
        "the signing key leaked"
    );

    // Dead letters: described, and left where they are.
    let (s, d) = app.get("/admin/dead-letters/swap?limit=2").await;
    assert_eq!(s, StatusCode::OK, "{d}");
    assert_eq!(d["dead_letters"], 3, "{d}");
    assert_eq!(d["first"].as_array().map(Vec::len), Some(2), "{d}");
    assert_eq!(d["first"][0]["reason"], "delivery limit exceeded", "{d}");
    assert_eq!(d["first"][0]["original_queue"], "swap", "{d}");
    assert_eq!(q.depth("swap.dead").await.expect("depth"), 3);
    for (path, field) in [
        ("/admin/dead-letters/nope", "queue"),
        ("/admin/dead-letters/swap?limit=0", "limit"),
        ("/admin/dead-letters/swap?limit=101", "limit"),
    ] {
        let (s, e) = app.get(path).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {e}");
        assert_eq!(e["detail"][0]["field"], field, "{path}: {e}");
    }
    let (s, e) = app
        .post("/admin/dead-letters/swap/replay", json!({"limit": 0}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");

    // Moved back: one, then the rest.
    let (s, r) = app
        .post("/admin/dead-letters/swap/replay", json!({"limit": 1}))
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        (r["replayed"].clone(), r["dead_letters"].clone()),
        (json!(1), json!(2)),
        "{r}"
    );
    let (s, r) = app.post("/admin/dead-letters/swap/replay", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        (r["replayed"].clone(), r["dead_letters"].clone()),
        (json!(2), json!(0)),
        "{r}"
    );
    assert_eq!(q.depth("swap").await.expect("depth"), 3);
    let mut c = q.consume("swap", 3).await.expect("consume");
    let d = c.next().await.expect("a message");
    assert!(!d.headers.contains_key("x-death-reason"), "{:?}", d.headers);
    d.ack().await.expect("ack");
    app.stop().await;
}
