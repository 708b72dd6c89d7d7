//! Object-store conformance suite, run against every implementation: the
//! local directory store, and the S3 store on the S3-compatible server at
//! `ATELIER_TEST_S3_ENDPOINT` (s3s-fs, started by `scripts/test`).

use super::s3::{S3Options, S3Store};
use super::{DynObjectStore, ObjectStore, StorageError, local::LocalStore};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

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

/// Listing a folder names its objects (nested ones too) and nothing
/// beside it, in key order, up to the limit.
pub async fn lists_a_folder(s: DynObjectStore) {
    let base = format!("t/{}", ulid::Ulid::new());
    for k in ["b.json", "a.json", "deeper/c.json"] {
        s.put(
            &format!("{base}/in/{k}"),
            Bytes::from_static(b"{}"),
            "application/json",
        )
        .await
        .expect("put");
    }
    s.put(
        &format!("{base}/inside.json"),
        Bytes::from_static(b"{}"),
        "application/json",
    )
    .await
    .expect("put");
    let listed = s.list(&format!("{base}/in/"), 100).await.expect("list");
    assert_eq!(
        listed,
        ["a.json", "b.json", "deeper/c.json"].map(|k| format!("{base}/in/{k}"))
    );
    assert_eq!(
        s.list(&format!("{base}/in/"), 2).await.expect("list").len(),
        2
    );
    assert!(
        s.list(&format!("{base}/none/"), 10)
            .await
            .expect("list")
            .is_empty()
    );
    assert!(matches!(
        s.list(&format!("{base}/in"), 10).await,
        Err(StorageError::InvalidKey(_))
    ));
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
    lists_a_folder(s.clone()).await;
    rejects_unsafe_keys(s.clone()).await;
    assert_eq!(s.kind(), "local");
}

/// The server `scripts/test` starts, unless `ATELIER_TEST_S3_*` say otherwise.
const DEFAULT_S3_ENDPOINT: &str = "http://127.0.0.1:9019";
const DEFAULT_S3_ACCESS_KEY: &str = "atelier-test";
const DEFAULT_S3_SECRET_KEY: &str = "atelier-test-secret";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// A bucket of its own for each test (s3s-fs keeps buckets as directories;
/// tests never delete them). S3 names: 3–63 lowercase letters, digits, `-`.
fn fresh_bucket() -> String {
    format!("atelier-t-{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// An S3 store on `bucket` (created when missing), keys under `prefix`.
async fn s3_store(bucket: &str, prefix: &str) -> S3Store {
    S3Store::new(S3Options {
        endpoint: Some(env_or("ATELIER_TEST_S3_ENDPOINT", DEFAULT_S3_ENDPOINT)),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        prefix: prefix.into(),
        access_key: env_or("ATELIER_TEST_S3_ACCESS_KEY", DEFAULT_S3_ACCESS_KEY),
        secret_key: env_or("ATELIER_TEST_S3_SECRET_KEY", DEFAULT_S3_SECRET_KEY),
        path_style: true,
        create_bucket: true,
    })
    .await
    .expect(
        "an S3 server must be reachable for tests (scripts/test starts s3s-fs); set ATELIER_TEST_S3_ENDPOINT",
    )
}

#[tokio::test]
async fn s3_store_conforms() {
    let s: DynObjectStore = Arc::new(s3_store(&fresh_bucket(), "").await);
    round_trip(s.clone()).await;
    lists_a_folder(s.clone()).await;
    rejects_unsafe_keys(s.clone()).await;
    assert_eq!(s.kind(), "s3");
}

#[tokio::test]
async fn s3_store_conforms_under_a_prefix() {
    let bucket = fresh_bucket();
    let s: DynObjectStore = Arc::new(s3_store(&bucket, "/objects//tenant/").await);
    round_trip(s.clone()).await;
    lists_a_folder(s.clone()).await;
    rejects_unsafe_keys(s.clone()).await;
    // Keys land under the normalised prefix, and nowhere else.
    s.put(
        "k/a.bin",
        Bytes::from_static(b"abc"),
        "application/octet-stream",
    )
    .await
    .expect("put");
    let root = s3_store(&bucket, "").await;
    assert_eq!(
        root.get("objects/tenant/k/a.bin").await.expect("get"),
        Bytes::from_static(b"abc")
    );
    assert_eq!(root.size("k/a.bin").await.expect("size"), None);
}

#[tokio::test]
async fn s3_presigned_urls_work_over_plain_http() {
    use reqwest::StatusCode;
    use reqwest::header::CONTENT_TYPE;

    let s = s3_store(&fresh_bucket(), "p").await;
    let http = reqwest::Client::new();
    let key = format!("t/{}/in.jpg", ulid::Ulid::new());
    let ttl = Duration::from_secs(300);

    let put_url = s
        .presign_put(&key, "image/jpeg", ttl)
        .await
        .expect("presign PUT")
        .expect("S3 signs URLs");
    // The content type is part of the signature.
    let r = http
        .put(&put_url)
        .header(CONTENT_TYPE, "text/plain")
        .body("not an image")
        .send()
        .await
        .expect("PUT with another content type");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(s.size(&key).await.expect("size"), None);
    let r = http
        .put(&put_url)
        .header(CONTENT_TYPE, "image/jpeg")
        .body(Bytes::from_static(b"jpeg bytes"))
        .send()
        .await
        .expect("presigned PUT");
    assert!(r.status().is_success(), "presigned PUT: {}", r.status());
    assert_eq!(
        s.get(&key).await.expect("get"),
        Bytes::from_static(b"jpeg bytes")
    );

    let get_url = s
        .presign_get(&key, ttl)
        .await
        .expect("presign GET")
        .expect("S3 signs URLs");
    let r = http.get(&get_url).send().await.expect("presigned GET");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.bytes().await.expect("body"),
        Bytes::from_static(b"jpeg bytes")
    );

    let missing = s
        .presign_get("t/missing.jpg", ttl)
        .await
        .expect("presign GET")
        .expect("S3 signs URLs");
    let r = http.get(&missing).send().await.expect("GET missing");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let short = s
        .presign_get(&key, Duration::from_secs(1))
        .await
        .expect("presign GET")
        .expect("S3 signs URLs");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = http.get(&short).send().await.expect("GET expired");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}
