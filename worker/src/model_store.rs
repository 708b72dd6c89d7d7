//! Models from the object store. In a fleet, workers take the files that
//! `scripts/fetch-models` installed from the `models/` prefix of the shared
//! object store instead of each downloading them from the registries:
//! `atelier models push` uploads them once, and a worker pulls what its
//! `models.dir` lacks at start.
//!
//! Every pulled file is checked before it is used: against its sha256 in
//! `models/manifest.toml` (the files this repository knows), otherwise
//! against a `<file>.sha256` object uploaded beside it (an operator's own
//! route model). A file that fails the check is not installed.

use atelier_shared::config::{Config, EngineRoute};
use atelier_shared::storage::{ObjectStore, StorageError};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Object-store prefix of the model files.
pub const PREFIX: &str = "models/";

/// Files under `models.dir` a worker with this configuration loads.
pub fn needed_files(cfg: &Config) -> Vec<String> {
    let mut files = Vec::new();
    let lib = cfg.models.onnxruntime_lib();
    if let Ok(rel) = lib.strip_prefix(&cfg.models.dir) {
        files.push(rel.to_string_lossy().into_owned());
    }
    files.push(cfg.models.isnet.clone());
    files.push(cfg.models.face_detector.clone());
    files.push(cfg.models.face_embedder.clone());
    for f in [&cfg.models.face_swap, &cfg.models.face_swap_projection] {
        if !f.is_empty() {
            files.push(f.clone());
        }
    }
    if !cfg.models.upscaler.is_empty() {
        files.push(cfg.models.upscaler.clone());
    }
    for route in cfg.engines.routes.values() {
        if let EngineRoute::Onnx { file, .. } = route {
            files.push(file.clone());
        }
    }
    files.sort();
    files.dedup();
    files
}

/// sha256 of each file the manifest in `dir` lists (empty without one).
pub fn manifest_hashes(dir: &Path) -> HashMap<String, String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        file: String,
        sha256: String,
    }
    #[derive(serde::Deserialize)]
    struct Manifest {
        #[serde(default)]
        model: Vec<Entry>,
    }
    std::fs::read_to_string(dir.join("manifest.toml"))
        .ok()
        .and_then(|s| toml::from_str::<Manifest>(&s).ok())
        .map(|m| m.model.into_iter().map(|e| (e.file, e.sha256)).collect())
        .unwrap_or_default()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Debug, Default, PartialEq)]
pub struct PullReport {
    pub pulled: Vec<String>,
    /// Already present locally.
    pub present: Vec<String>,
    /// Not in the object store either.
    pub absent: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("object store: {0}")]
    Store(#[from] StorageError),
    #[error("{file}: {reason}")]
    Rejected { file: String, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Installs into `dir` each of `files` it lacks, from the object store.
pub async fn pull_missing(
    objects: &dyn ObjectStore,
    dir: &Path,
    files: &[String],
) -> Result<PullReport, PullError> {
    let known = manifest_hashes(dir);
    let mut report = PullReport::default();
    for file in files {
        if !plain_relative(file) {
            return Err(PullError::Rejected {
                file: file.clone(),
                reason: "not a relative path under models.dir".into(),
            });
        }
        let target = dir.join(file);
        if target.exists() {
            report.present.push(file.clone());
            continue;
        }
        let key = format!("{PREFIX}{file}");
        let bytes = match objects.get(&key).await {
            Ok(b) => b,
            Err(StorageError::NotFound(_)) => {
                report.absent.push(file.clone());
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let expected = match known.get(file) {
            Some(h) => h.clone(),
            None => match objects.get(&format!("{key}.sha256")).await {
                Ok(h) => String::from_utf8_lossy(&h).trim().to_lowercase(),
                Err(StorageError::NotFound(_)) => {
                    return Err(PullError::Rejected {
                        file: file.clone(),
                        reason: format!(
                            "not in manifest.toml and no {key}.sha256 beside it: cannot verify"
                        ),
                    });
                }
                Err(e) => return Err(e.into()),
            },
        };
        let got = sha256_hex(&bytes);
        if got != expected {
            return Err(PullError::Rejected {
                file: file.clone(),
                reason: format!("sha256 {got} does not match the expected {expected}"),
            });
        }
        write_atomically(&target, &bytes)?;
        tracing::info!(
            file,
            bytes = bytes.len(),
            "model pulled from the object store"
        );
        report.pulled.push(file.clone());
    }
    Ok(report)
}

/// Writes to a temporary file of this call's own (workers sharing a models
/// volume may pull at once), flushes it to disk, then renames it into place:
/// a crash leaves either no file or the whole, checked one.
fn write_atomically(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let parent = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp: PathBuf =
        target.with_extension(format!("part-{}-{}", std::process::id(), ulid::Ulid::new()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, target)?;
    // The rename itself, durable.
    std::fs::File::open(parent).and_then(|d| d.sync_all())
}

/// Model file names are relative paths of plain components (no `..`, no
/// absolute paths): they name places under `models.dir` and `models/`.
fn plain_relative(file: &str) -> bool {
    !file.is_empty()
        && Path::new(file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Uploads each of `files` present in `dir` to the object store, with a
/// `.sha256` object beside it. Returns what was uploaded.
pub async fn push(
    objects: &dyn ObjectStore,
    dir: &Path,
    files: &[String],
) -> Result<Vec<(String, u64)>, PullError> {
    let mut done = Vec::new();
    for file in files {
        let path = dir.join(file);
        if !plain_relative(file) || !path.exists() {
            continue;
        }
        let bytes = Bytes::from(tokio::fs::read(&path).await?);
        let key = format!("{PREFIX}{file}");
        let hash = sha256_hex(&bytes);
        let len = bytes.len() as u64;
        objects.put(&key, bytes, "application/octet-stream").await?;
        objects
            .put(&format!("{key}.sha256"), Bytes::from(hash), "text/plain")
            .await?;
        done.push((file.clone(), len));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_shared::storage::local::LocalStore;

    #[tokio::test]
    async fn a_worker_pulls_verified_models_and_refuses_tampered_ones() {
        let store_dir = tempfile::tempdir().expect("tmp");
        let objects = LocalStore::new(store_dir.path()).expect("store");
        let fleet = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(fleet.path().join("sub")).expect("mkdir");
        std::fs::write(fleet.path().join("a.onnx"), b"model a").expect("write");
        std::fs::write(fleet.path().join("sub/b.onnx"), b"model b").expect("write");
        let files = vec![
            "a.onnx".to_string(),
            "sub/b.onnx".to_string(),
            "c.onnx".to_string(),
        ];
        let pushed = push(&objects, fleet.path(), &files).await.expect("push");
        assert_eq!(pushed, vec![("a.onnx".into(), 7), ("sub/b.onnx".into(), 7)]);

        let worker = tempfile::tempdir().expect("tmp");
        std::fs::write(worker.path().join("a.onnx"), b"local a").expect("write");
        let report = pull_missing(&objects, worker.path(), &files)
            .await
            .expect("pull");
        assert_eq!(
            report,
            PullReport {
                pulled: vec!["sub/b.onnx".into()],
                present: vec!["a.onnx".into()],
                absent: vec!["c.onnx".into()],
            }
        );
        assert_eq!(
            std::fs::read(worker.path().join("sub/b.onnx")).expect("read"),
            b"model b"
        );
        assert_eq!(
            std::fs::read(worker.path().join("a.onnx")).expect("read"),
            b"local a",
            "present files are kept"
        );

        // A tampered object is refused and not installed.
        objects
            .put(
                "models/c.onnx",
                Bytes::from_static(b"evil"),
                "application/octet-stream",
            )
            .await
            .expect("put");
        objects
            .put(
                "models/c.onnx.sha256",
                Bytes::from(sha256_hex(b"good")),
                "text/plain",
            )
            .await
            .expect("put");
        let err = pull_missing(&objects, worker.path(), &files)
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(!worker.path().join("c.onnx").exists());

        // Files the manifest lists are checked against it, not the sidecar.
        std::fs::write(
            worker.path().join("manifest.toml"),
            format!(
                "[[model]]\nfile = \"c.onnx\"\nsha256 = \"{}\"\n",
                sha256_hex(b"evil")
            ),
        )
        .expect("write");
        let report = pull_missing(&objects, worker.path(), &files)
            .await
            .expect("pull");
        assert_eq!(report.pulled, vec!["c.onnx".to_string()]);

        // Names that would leave models.dir are refused.
        for bad in ["../x.onnx", "/etc/passwd"] {
            let err = pull_missing(&objects, worker.path(), &[bad.to_string()])
                .await
                .expect_err("refused");
            assert!(err.to_string().contains("not a relative path"), "{err}");
        }
    }

    #[test]
    fn needed_files_follow_the_configuration() {
        let mut c = Config::default();
        c.engines.routes.insert(
            "seedream".into(),
            EngineRoute::Onnx {
                file: "ops/gen.onnx".into(),
                input_range: Default::default(),
                output_range: Default::default(),
                max_edge: 512,
            },
        );
        let files = needed_files(&c);
        assert!(files.contains(&"isnet_fp16.onnx".to_string()), "{files:?}");
        assert!(files.contains(&"realesr-animevideov3-x4.onnx".to_string()));
        assert!(files.contains(&"ops/gen.onnx".to_string()));
    }
}
