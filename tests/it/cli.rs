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
