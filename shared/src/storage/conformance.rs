//! Object-store conformance suite, run against every implementation.

use super::{DynObjectStore, StorageError, local::LocalStore};
use bytes::Bytes;
use std::sync::Arc;

pub async fn round_trip(s: DynObjectStore) {
    let key = format!("t/{}/a.jpg", ulid::Ulid::new());
    assert_eq!(s.size(&key).await.expect("size"), None);
    assert!(matches!(s.get(&key).await, Err(StorageError::NotFound(_))));
    s.put(&key, Bytes::from_static(b"hello"), "image/jpeg")
        .await
        .expect("put");
    assert_eq!(
        s.get(&key).await.expect("get"),
        Bytes::from_static(b"hello")
    );
    assert_eq!(s.size(&key).await.expect("size"), Some(5));
    s.put(&key, Bytes::from_static(b"replaced"), "image/jpeg")
        .await
        .expect("overwrite");
    assert_eq!(
        s.get(&key).await.expect("get"),
        Bytes::from_static(b"replaced")
    );
    s.delete(&key).await.expect("delete");
    s.delete(&key).await.expect("deleting twice is fine");
    assert_eq!(s.size(&key).await.expect("size"), None);
}

pub async fn rejects_unsafe_keys(s: DynObjectStore) {
    for k in ["../etc/passwd", "/abs", "a//b", "a/./b", "", "a/b c"] {
        assert!(
            matches!(
                s.put(k, Bytes::new(), "x").await,
                Err(StorageError::InvalidKey(_))
            ),
            "{k:?} accepted"
        );
    }
}

#[tokio::test]
async fn local_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s: DynObjectStore = Arc::new(LocalStore::new(dir.path()).expect("store"));
    round_trip(s.clone()).await;
    rejects_unsafe_keys(s.clone()).await;
    assert_eq!(s.kind(), "local");
}
