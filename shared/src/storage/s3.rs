//! S3-compatible object store (AWS S3, MinIO, Garage, s3s-fs, …) on the
//! official SDK. One bucket, every key under an optional prefix
//! (`s3://bucket/prefix` → `prefix/<key>`).
//!
//! Choices that matter against servers other than AWS:
//!
//! - Checksums only when an operation requires them
//!   ([`RequestChecksumCalculation::WhenRequired`],
//!   [`ResponseChecksumValidation::WhenRequired`]). The SDK's default sends
//!   `PutObject` bodies as `aws-chunked` with a CRC32 trailer and validates
//!   response checksums; several S3-compatible servers (s3s-fs, Garage, older
//!   MinIO) refuse the former, and a presigned PUT would otherwise carry a
//!   checksum of an empty body. TLS and SigV4 already protect the bytes.
//! - Path-style addressing when `path_style` is set (`endpoint/bucket/key`):
//!   self-hosted servers rarely have the wildcard DNS that virtual-hosted
//!   style (`bucket.endpoint/key`) needs.
//! - The HTTPS client is built here (rustls with ring, platform root
//!   certificates) because the SDK is built without its default client,
//!   which would pull aws-lc-sys and its C toolchain into the build.
//! - Bounded waits: 5 s to connect, 60 s per operation (every attempt
//!   included) up to the response headers, and 60 s more for a GET body;
//!   standard retries with 3 attempts in all (throttling, 5xx and
//!   connection failures are retried by the SDK's classifier). A 4xx other
//!   than 408/429 is [`StorageError::Refused`] (not worth retrying).
//!
//! Errors: a missing object is [`StorageError::NotFound`] for `get`, `None`
//! for `size`, and no error at all for `delete`; everything else (refused
//! credentials, missing bucket, throttling, 5xx, timeouts, connection
//! failures) is [`StorageError::Unavailable`] with the SDK's full error chain
//! ([`DisplayErrorContext`]), which never holds the secret key. On AWS a key
//! without `s3:ListBucket` on the bucket reads a missing object as 403, not
//! 404: grant it, or `size` of a missing object is an error.
//!
//! Presigned URLs are built on the configured endpoint, so clients must be
//! able to resolve and reach it (deploy/README.md).

use super::{ObjectStore, StorageError, validate_key, validate_prefix};
use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::operation::head_bucket::HeadBucketError;
use aws_sdk_s3::operation::head_object::HeadObjectError;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use aws_smithy_http_client::tls;
use bytes::Bytes;
use std::time::Duration;

/// Longest validity of a presigned URL: S3 refuses anything beyond 7 days.
pub const MAX_PRESIGN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest validity: `X-Amz-Expires` must be at least 1 second.
const MIN_PRESIGN_TTL: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole operation, retries included; bodies are at most a few tens of MB.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts in all (the first one included).
const MAX_ATTEMPTS: u32 = 3;
/// The region S3 takes without a `LocationConstraint` on CreateBucket.
const DEFAULT_REGION: &str = "us-east-1";

/// Where and how to reach the bucket.
#[derive(Clone)]
pub struct S3Options {
    /// `http(s)://host[:port]` of an S3-compatible server; `None`: AWS,
    /// resolved from `region`.
    pub endpoint: Option<String>,
    /// Signing region; empty: `us-east-1` (what most self-hosted servers expect).
    pub region: String,
    pub bucket: String,
    /// Keys are stored under `prefix/`; empty: at the bucket's root. Leading,
    /// trailing and doubled `/` are ignored.
    pub prefix: String,
    pub access_key: String,
    pub secret_key: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most
    /// self-hosted servers.
    pub path_style: bool,
    /// Create the bucket when it is missing (tests, dev setups); production
    /// buckets are provisioned by the operator and a missing one is an error.
    pub create_bucket: bool,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("path_style", &self.path_style)
            .field("create_bucket", &self.create_bucket)
            .finish()
    }
}

#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Normalised: no leading, trailing or doubled `/`; empty for none.
    prefix: String,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Builds the client and checks the bucket (creating it when
    /// `create_bucket` is set), so a wrong bucket, endpoint or key fails at
    /// start rather than on the first job.
    pub async fn new(opts: S3Options) -> Result<S3Store, StorageError> {
        if opts.bucket.is_empty() {
            return Err(StorageError::Unavailable("S3: no bucket name".into()));
        }
        let prefix = normalize_prefix(&opts.prefix)?;
        let region = if opts.region.is_empty() {
            DEFAULT_REGION.to_string()
        } else {
            opts.region.clone()
        };
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(region.clone()))
            .credentials_provider(Credentials::new(
                opts.access_key.clone(),
                opts.secret_key.clone(),
                None,
                None,
                "atelier-config",
            ))
            .force_path_style(opts.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
        if let Some(endpoint) = opts.endpoint.as_deref().filter(|e| !e.is_empty()) {
            conf = conf.endpoint_url(endpoint);
        }
        let store = S3Store {
            client: Client::from_conf(conf.build()),
            bucket: opts.bucket,
            prefix,
        };
        store.ensure_bucket(&region, opts.create_bucket).await?;
        Ok(store)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// HeadBucket; on 404, CreateBucket when allowed; on 403,
    /// [`check_credentials`](Self::check_credentials).
    async fn ensure_bucket(&self, region: &str, create: bool) -> Result<(), StorageError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(HeadBucketError::is_not_found)
                    || status(&e) == Some(404) =>
            {
                if !create {
                    return Err(StorageError::Unavailable(format!(
                        "S3 bucket {} does not exist",
                        self.bucket
                    )));
                }
            }
            Err(e) if status(&e) == Some(403) => return self.check_credentials().await,
            Err(e) => return Err(self.unavailable("HeadBucket", "", e)),
        }
        let mut req = self.client.create_bucket().bucket(&self.bucket);
        if region != DEFAULT_REGION {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => Ok(()),
            // Another process (a parallel test, a second replica) won the race.
            Err(e)
                if e.as_service_error().is_some_and(|s| {
                    s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()
                }) =>
            {
                Ok(())
            }
            Err(e) => Err(self.unavailable("CreateBucket", "", e)),
        }
    }

    /// After a 403 on HeadBucket, which has no body and so no error code:
    /// a key limited to objects (no `s3:ListBucket`) cannot see the bucket
    /// yet may use it, while a wrong key or secret must fail at start. A GET
    /// of an object that does not exist tells them apart by its error code.
    async fn check_credentials(&self) -> Result<(), StorageError> {
        let probe = self.object_key(".atelier-credentials-check")?;
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&probe)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if object_missing(&e) => Ok(()),
            Err(e) if status(&e) == Some(403) && e.code() == Some("AccessDenied") => {
                tracing::warn!(
                    bucket = %self.bucket,
                    "S3: the access key may not list the bucket; a missing object will read as an error, not as absent"
                );
                Ok(())
            }
            Err(e) => Err(self.unavailable("GetObject", &probe, e)),
        }
    }

    /// The object's key in the bucket: validated, then under the prefix.
    fn object_key(&self, key: &str) -> Result<String, StorageError> {
        validate_key(key)?;
        Ok(if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        })
    }

    /// `Unavailable` naming the operation, the object and the HTTP status,
    /// with the SDK's whole error chain (its `Display` alone says only
    /// "service error" or "dispatch failure").
    fn unavailable<E>(&self, op: &str, key: &str, e: SdkError<E>) -> StorageError
    where
        E: std::error::Error + 'static,
    {
        let code = status(&e);
        let status = code.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
        let message = format!(
            "{op} s3://{}/{key}{status}: {}",
            self.bucket,
            DisplayErrorContext(e)
        );
        // A 4xx other than timeout/throttling will not change on retry.
        match code {
            Some(c) if (400..500).contains(&c) && c != 408 && c != 429 => {
                StorageError::Refused(message)
            }
            _ => StorageError::Unavailable(message),
        }
    }
}

/// `/a//b/` → `a/b`; each segment must be a valid key segment.
fn normalize_prefix(prefix: &str) -> Result<String, StorageError> {
    let p = prefix
        .split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/");
    if !p.is_empty() {
        validate_key(&p).map_err(|_| StorageError::InvalidKey(prefix.to_string()))?;
    }
    Ok(p)
}

fn status<E>(e: &SdkError<E>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// A 404 about the object, not about the bucket (`NoSuchBucket` is a
/// configuration error and must not read as a missing object).
fn object_missing<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    status(e) == Some(404) && e.code() != Some("NoSuchBucket")
}

fn presigning(ttl: Duration) -> Result<PresigningConfig, StorageError> {
    PresigningConfig::expires_in(ttl.clamp(MIN_PRESIGN_TTL, MAX_PRESIGN_TTL))
        .map_err(|e| StorageError::Unavailable(format!("S3 presigning: {e}")))
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StorageError> {
        let k = self.object_key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&k)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.unavailable("PutObject", &k, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let k = self.object_key(key)?;
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&k)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e)
                if e.as_service_error()
                    .is_some_and(GetObjectError::is_no_such_key)
                    || object_missing(&e) =>
            {
                return Err(StorageError::NotFound(key.to_string()));
            }
            Err(e) => return Err(self.unavailable("GetObject", &k, e)),
        };
        // The SDK's operation timeout ends with the headers; a body that
        // stalls must not hold the task (and its delivery) forever.
        let body = tokio::time::timeout(OPERATION_TIMEOUT, out.body.collect())
            .await
            .map_err(|_| {
                StorageError::Unavailable(format!(
                    "GetObject s3://{}/{k}: the body did not arrive within {OPERATION_TIMEOUT:?}",
                    self.bucket
                ))
            })?
            .map_err(|e| {
                StorageError::Unavailable(format!(
                    "GetObject s3://{}/{k}: reading the body: {}",
                    self.bucket,
                    DisplayErrorContext(e)
                ))
            })?;
        Ok(body.into_bytes())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let k = self.object_key(key)?;
        // S3 answers 204 for a missing key; some compatible servers say 404.
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&k)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if object_missing(&e) => Ok(()),
            Err(e) => Err(self.unavailable("DeleteObject", &k, e)),
        }
    }

    async fn size(&self, key: &str) -> Result<Option<u64>, StorageError> {
        let k = self.object_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&k)
            .send()
            .await
        {
            Ok(out) => Ok(Some(
                out.content_length()
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0),
            )),
            // A HEAD response has no body, so no error code: a missing
            // bucket reads as a missing object here (`new` checked it).
            Err(e)
                if e.as_service_error()
                    .is_some_and(HeadObjectError::is_not_found)
                    || status(&e) == Some(404) =>
            {
                Ok(None)
            }
            Err(e) => Err(self.unavailable("HeadObject", &k, e)),
        }
    }

    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StorageError> {
        validate_prefix(prefix)?;
        let full = if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}/{prefix}", self.prefix)
        };
        let strip = full.len() - prefix.len();
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        while keys.len() < limit {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full)
                .max_keys(i32::try_from((limit - keys.len()).min(1000)).unwrap_or(1000))
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.unavailable("ListObjectsV2", &full, e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter_map(|k| k.get(strip..))
                    .map(str::to_string),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        keys.truncate(limit);
        Ok(keys)
    }

    /// Signed locally (no request is sent); valid `ttl`, clamped to 1 s – 7 days.
    async fn presign_get(&self, key: &str, ttl: Duration) -> Result<Option<String>, StorageError> {
        let k = self.object_key(key)?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&k)
            .presigned(presigning(ttl)?)
            .await
            .map_err(|e| self.unavailable("presign GetObject", &k, e))?;
        Ok(Some(req.uri().to_string()))
    }

    /// As [`presign_get`](Self::presign_get); `Content-Type` is a signed
    /// header, so the uploader must send exactly `content_type`.
    async fn presign_put(
        &self,
        key: &str,
        content_type: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StorageError> {
        let k = self.object_key(key)?;
        let req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&k)
            .content_type(content_type)
            .presigned(presigning(ttl)?)
            .await
            .map_err(|e| self.unavailable("presign PutObject", &k, e))?;
        Ok(Some(req.uri().to_string()))
    }

    fn kind(&self) -> &'static str {
        "s3"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalised() {
        assert_eq!(normalize_prefix("").expect("empty"), "");
        assert_eq!(normalize_prefix("/").expect("slash"), "");
        assert_eq!(normalize_prefix("/a//b/").expect("a/b"), "a/b");
        assert!(matches!(
            normalize_prefix("a/../b"),
            Err(StorageError::InvalidKey(_))
        ));
    }

    #[test]
    fn options_debug_hides_the_secret() {
        let o = S3Options {
            endpoint: None,
            region: String::new(),
            bucket: "b".into(),
            prefix: String::new(),
            access_key: "AKIA".into(),
            secret_key: "very-secret".into(),
            path_style: true,
            create_bucket: false,
        };
        assert!(!format!("{o:?}").contains("very-secret"));
    }
}
