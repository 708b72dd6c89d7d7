//! Object storage behind one seam: the local directory store (embedded mode)
//! and, in production, any S3-compatible endpoint. Inputs and results are
//! images of at most a few tens of MB, so whole-object reads are fine.
//!
//! Capability URLs: the local store cannot sign URLs itself, so the API
//! serves `PUT /upload/{token}` and `GET /files/{token}` and the tokens are
//! minted by [`Signer`]. A store that can presign (S3) returns its own URLs
//! from [`ObjectStore::presign_get`]/[`ObjectStore::presign_put`].

pub mod local;
pub mod s3;
mod signer;

pub use signer::{Capability, SignError, Signer};

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object not found: {0}")]
    NotFound(String),
    #[error("invalid object key: {0}")]
    InvalidKey(String),
    #[error("object store unavailable: {0}")]
    Unavailable(String),
    /// The store answered and refused the request (credentials, policy, a
    /// malformed request): trying again would not help.
    #[error("object store refused the request: {0}")]
    Refused(String),
}

#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StorageError>;
    async fn get(&self, key: &str) -> Result<Bytes, StorageError>;
    /// Deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
    /// Size of the object, `None` when it does not exist.
    async fn size(&self, key: &str) -> Result<Option<u64>, StorageError>;
    /// The keys under `prefix` (a folder: it ends with `/`), at most
    /// `limit` of them, in key order.
    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StorageError>;
    /// A store-native signed GET URL, if the store can sign.
    async fn presign_get(
        &self,
        _key: &str,
        _ttl: Duration,
    ) -> Result<Option<String>, StorageError> {
        Ok(None)
    }
    /// A store-native signed PUT URL, if the store can sign.
    async fn presign_put(
        &self,
        _key: &str,
        _content_type: &str,
        _ttl: Duration,
    ) -> Result<Option<String>, StorageError> {
        Ok(None)
    }
    fn kind(&self) -> &'static str;
}

pub type DynObjectStore = Arc<dyn ObjectStore>;

/// Turns stored object keys into URLs a client can fetch without
/// credentials: the store's own presigned URL when it can sign (S3), else a
/// `GET /files/{token}` capability on the API's public URL.
#[derive(Clone)]
pub struct Links {
    pub objects: DynObjectStore,
    pub signer: Signer,
    /// Public base URL plus the optional route prefix, no trailing slash.
    pub base: String,
}

impl Links {
    pub fn new(objects: DynObjectStore, signer: Signer, public_url: &str, prefix: &str) -> Links {
        Links {
            objects,
            signer,
            base: format!("{}{}", public_url.trim_end_matches('/'), prefix),
        }
    }

    /// A URL that reads one stored object for `ttl`.
    pub async fn object_url(
        &self,
        key: &str,
        content_type: &str,
        ttl: Duration,
    ) -> Result<String, StorageError> {
        if let Some(u) = self.objects.presign_get(key, ttl).await? {
            return Ok(u);
        }
        let exp = crate::time::now_ms() + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let token = self.signer.sign(
            &Capability::Get {
                key: key.to_string(),
                content_type: content_type.to_string(),
            },
            exp,
        );
        Ok(format!("{}/files/{token}", self.base))
    }
}

/// Content type of a result object, from its key's extension.
pub fn content_type_of(key: &str) -> &'static str {
    match key.rsplit_once('.').map(|(_, ext)| ext) {
        Some("png") => "image/png",
        // A training's weights (and its frozen dataset).
        Some("json") => "application/json",
        Some("zip") => "application/zip",
        Some("safetensors" | "tar") => "application/octet-stream",
        _ => "image/jpeg",
    }
}

/// Keys are `/`-separated relative paths of safe characters; no `..`,
/// no leading `/`, no empty segment.
/// A listing prefix: a valid key that ends with `/`.
pub fn validate_prefix(prefix: &str) -> Result<(), StorageError> {
    match prefix.strip_suffix('/') {
        Some(folder) => validate_key(folder),
        None => Err(StorageError::InvalidKey(prefix.to_string())),
    }
}

pub fn validate_key(key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && key.len() <= 512
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidKey(key.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod conformance;
