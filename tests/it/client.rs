//! The user CLI (`atelier packshot|swap|jobs|identities`) against the
//! embedded server: the binary as a user runs it, configured by
//! ATELIER_URL and ATELIER_API_KEY, checked by its exit codes, its `--json`
//! documents and the files it saves.

use crate::helpers::*;
use atelier::app::Roles;
use atelier_shared::db::Dialect;
use serde_json::Value;
use std::path::Path;

struct Run {
    code: i32,
    json: Value,
    stdout: String,
    stderr: String,
}

/// Runs the binary as a client of `app` (HOME in `home`, so no profile of
/// the machine is read).
async fn atelier(app: &TestApp, home: &Path, key: &str, args: &[&str]) -> Run {
    let env = [
        ("ATELIER_URL", Some(app.base.as_str())),
        ("ATELIER_API_KEY", Some(key)),
    ];
    run(home, &env, args).await
}

/// Runs the binary in `home` with `env` set (or, for `None`, removed).
async fn run(home: &Path, env: &[(&str, Option<&str>)], args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_atelier"));
    cmd.args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .current_dir(home);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().await.expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    Run {
        code: out.status.code().unwrap_or(-1),
        json: serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

fn decodes(path: &str) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{path} is not an image: {e}"));
    (img.width(), img.height())
}

/// `atelier packshot` uploads, creates one job per photo, follows them,
/// saves every output under a readable name and reports; `jobs …` lists,
/// inspects and downloads them; every failure has its exit code.
#[tokio::test]
async fn packshot_command_creates_follows_and_saves_results() {
    let app = TestApp::spawn().await;
    let home = tempfile::tempdir().expect("home");
    let dir = home.path();
    std::fs::write(dir.join("shirt.jpg"), garment_jpeg(320, 400)).expect("write");
    std::fs::write(dir.join("dress.png"), png(300, 300)).expect("write");
    let key = app.key.clone();
    let (before, _) = app.balance(&key).await;

    let r = atelier(
        &app,
        dir,
        &key,
        &[
            "packshot",
            "shirt.jpg",
            "dress.png",
            "--style",
            "white_cutout",
            "--variations",
            "2",
            "--out",
            "results",
            "--json",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let jobs = r.json["jobs"].as_array().expect("jobs").clone();
    assert_eq!(jobs.len(), 2, "one job per photo: {}", r.json);
    let mut charged = 0.0;
    for (job, stem) in jobs.iter().zip(["shirt", "dress"]) {
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["label"], stem);
        charged += job["credits_used"].as_f64().expect("credits_used");
        let outputs = job["outputs"].as_array().expect("outputs");
        assert_eq!(outputs.len(), 2, "{job}");
        let per_output: f64 = outputs.iter().filter_map(|o| o["credits"].as_f64()).sum();
        assert_eq!(Some(per_output), job["credits_used"].as_f64(), "{job}");
        for (n, o) in outputs.iter().enumerate() {
            assert_eq!(o["status"], "completed", "{o}");
            let file = o["file"].as_str().expect("saved file");
            assert!(
                file.starts_with("results/")
                    && file.contains(&format!("{stem}_white_cutout_{}.", n + 1)),
                "{file}"
            );
            let (w, h) = decodes(&dir.join(file).to_string_lossy());
            assert!(w > 0 && h > 0);
        }
    }
    let (after, held) = app.balance(&key).await;
    assert!(charged > 0.0);
    assert_eq!(
        (before - after, held),
        (charged, 0.0),
        "the credits the jobs report"
    );
    let ids: Vec<String> = jobs
        .iter()
        .map(|j| j["job_id"].as_str().expect("id").to_string())
        .collect();

    // Without --json, on a pipe: progress as lines on stderr, a summary on stdout.
    let r = atelier(
        &app,
        dir,
        &key,
        &["packshot", "shirt.jpg", "--out", "plain"],
    )
    .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("uploading shirt.jpg"), "{}", r.stderr);
    assert!(r.stderr.contains("completed 1/1"), "{}", r.stderr);
    assert!(
        r.stdout.contains("-> plain/shirt_white_cutout_1."),
        "{}",
        r.stdout
    );

    let r = atelier(&app, dir, &key, &["jobs", "ls", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let listed: Vec<&str> = r.json["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["job_id"].as_str())
        .collect();
    assert_eq!(listed.len(), 3, "{}", r.json);
    for id in &ids {
        assert!(listed.contains(&id.as_str()), "{id} in {listed:?}");
    }
    assert_eq!(r.json["pagination"]["total"], 3);
    let r = atelier(
        &app,
        dir,
        &key,
        &["jobs", "ls", "--status", "failed", "--json"],
    )
    .await;
    assert_eq!(r.json["pagination"]["total"], 0, "{}", r.json);
    let r = atelier(&app, dir, &key, &["jobs", "ls"]).await;
    assert!(
        r.stdout.contains(&ids[0]) && r.stdout.contains("completed"),
        "{}",
        r.stdout
    );

    let r = atelier(&app, dir, &key, &["jobs", "status", &ids[0]]).await;
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("completed: 2/2 outputs done"),
        "{}",
        r.stdout
    );
    let r = atelier(
        &app,
        dir,
        &key,
        &["jobs", "download", &ids[0], "--out", "dl"],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.matches("saved dl/").count(), 2, "{}", r.stdout);
    let r = atelier(
        &app,
        dir,
        &key,
        &[
            "jobs", "download", &ids[1], "--zip", "--out", "zip", "--json",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let zip = std::fs::read(dir.join(format!("zip/{}.zip", ids[1]))).expect("zip saved");
    assert_eq!(&zip[..2], b"PK");
    let r = atelier(&app, dir, &key, &["jobs", "watch", &ids[0], "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json["jobs"][0]["status"], "completed");

    // Exit codes: the API refuses (3), the server is not there (4), bad
    // usage or files (2).
    let r = atelier(&app, dir, &key, &["jobs", "abort", &ids[0]]).await;
    assert_eq!(r.code, 3, "a finished job cannot be aborted: {}", r.stderr);
    let r = atelier(&app, dir, "atl_not_a_key", &["jobs", "ls"]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("401"), "{}", r.stderr);
    let r = atelier(&app, dir, &key, &["jobs", "status", "job_nope"]).await;
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("404"), "{}", r.stderr);
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    // --url beats ATELIER_URL.
    let gone = format!("http://{gone}");
    let r = atelier(&app, dir, &key, &["jobs", "ls", "--url", &gone]).await;
    assert_eq!(r.code, 4, "{}", r.stderr);
    let r = atelier(&app, dir, &key, &["packshot", "missing.jpg"]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    std::fs::write(dir.join("anim.gif"), b"GIF89a").expect("write");
    let r = atelier(&app, dir, &key, &["packshot", "anim.gif"]).await;
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(".jpg, .jpeg, .png and .webp"),
        "{}",
        r.stderr
    );
    // A contract refusal names the field.
    let r = atelier(
        &app,
        dir,
        &key,
        &["packshot", "shirt.jpg", "--style", "cubist"],
    )
    .await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("style"), "{}", r.stderr);

    // A profile file instead of the environment.
    std::fs::create_dir_all(dir.join(".config/atelier")).expect("dir");
    std::fs::write(
        dir.join(".config/atelier/profiles.toml"),
        format!("[local]\nurl = \"{}\"\napi_key = \"{key}\"\n", app.base),
    )
    .expect("write");
    let unset = [("ATELIER_URL", None), ("ATELIER_API_KEY", None)];
    let r = run(dir, &unset, &["jobs", "ls", "--json", "--profile", "local"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json["pagination"]["total"], 3);
    app.audit_clean().await;
    app.stop().await;
}

/// `atelier identities upload|ls|rm` and `atelier swap` with the real face
/// models.
#[tokio::test]
async fn identities_and_swap_commands_with_the_face_models() {
    let app = TestApp::with(Dialect::Sqlite, Roles::ALL, with_models).await;
    let home = tempfile::tempdir().expect("home");
    let dir = home.path();
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/testdata");
    for f in ["newton.png", "gauss.png"] {
        std::fs::copy(testdata.join(f), dir.join(f)).expect("copy");
    }
    let key = app.key.clone();

    let r = atelier(
        &app,
        dir,
        &key,
        &[
            "identities",
            "upload",
            "newton.png",
            "--name",
            "Isaac",
            "--wait",
            "--json",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.json["preprocessing_status"], "completed", "{}", r.json);
    let code = r.json["identity_code"].as_str().expect("code").to_string();
    let r = atelier(
        &app,
        dir,
        &key,
        &["identities", "upload", "newton.png", "--name", "Isaac"],
    )
    .await;
    assert_eq!(r.code, 3, "the name is taken: {}", r.stderr);
    assert!(r.stderr.contains("409"), "{}", r.stderr);

    let r = atelier(&app, dir, &key, &["identities", "ls", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.json["identities"]
            .as_array()
            .expect("identities")
            .iter()
            .any(|i| i["identity_code"] == code.as_str() && i["name"] == "Isaac"),
        "{}",
        r.json
    );

    let r = atelier(
        &app,
        dir,
        &key,
        &["swap", &code, "gauss.png", "--out", "swapped", "--json"],
    )
    .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let job = &r.json["jobs"][0];
    assert_eq!(job["status"], "completed", "{job}");
    let file = job["outputs"][0]["file"].as_str().expect("file");
    assert!(file.contains("gauss_swap."), "{file}");
    decodes(&dir.join(file).to_string_lossy());

    let r = atelier(&app, dir, &key, &["identities", "rm", &code]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = atelier(&app, dir, &key, &["identities", "ls"]).await;
    assert!(!r.stdout.contains(&code), "{}", r.stdout);
    app.audit_clean().await;
    app.stop().await;
}
