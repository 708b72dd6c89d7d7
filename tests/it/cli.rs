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
