//! Local-directory object store: one file per key under a root directory.
//! Writes go to a temporary file in the same directory and are renamed into
//! place, so a reader never sees a half-written object.

use super::{ObjectStore, StorageError, validate_key, validate_prefix};
use async_trait::async_trait;
use bytes::Bytes;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Result<LocalStore, StorageError> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(|e| StorageError::Unavailable(format!("{}: {e}", root.display())))?;
        Ok(LocalStore { root })
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn io(key: &str, e: std::io::Error) -> StorageError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StorageError::NotFound(key.to_string())
    } else {
        StorageError::Unavailable(format!("{key}: {e}"))
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put(&self, key: &str, body: Bytes, _content_type: &str) -> Result<(), StorageError> {
        let path = self.path(key)?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone());
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| io(key, e))?;
        let tmp = dir.join(format!(".tmp-{}", ulid::Ulid::new()));
        let write = async {
            tokio::fs::write(&tmp, &body).await?;
            let f = tokio::fs::File::open(&tmp).await?;
            f.sync_all().await?;
            tokio::fs::rename(&tmp, &path).await
        };
        if let Err(e) = write.await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(io(key, e));
        }
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = self.path(key)?;
        tokio::fs::read(&path)
            .await
            .map(Bytes::from)
            .map_err(|e| io(key, e))
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn size(&self, key: &str) -> Result<Option<u64>, StorageError> {
        let path = self.path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StorageError> {
        validate_prefix(prefix)?;
        let mut keys = Vec::new();
        let mut folders = vec![prefix.to_string()];
        while let Some(folder) = folders.pop() {
            let mut dir = match tokio::fs::read_dir(self.root.join(&folder)).await {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&folder, e)),
            };
            while let Some(entry) = dir.next_entry().await.map_err(|e| io(&folder, e))? {
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                // Writes in progress are not objects yet.
                if name.starts_with(".tmp-") {
                    continue;
                }
                let kind = entry.file_type().await.map_err(|e| io(&folder, e))?;
                if kind.is_dir() {
                    folders.push(format!("{folder}{name}/"));
                } else if kind.is_file() {
                    keys.push(format!("{folder}{name}"));
                }
            }
        }
        keys.sort();
        keys.truncate(limit);
        Ok(keys)
    }

    fn kind(&self) -> &'static str {
        "local"
    }
}
