//! `Idempotency-Key` on creating requests (`POST`, `PUT`): a retry with the
//! same key and the same request gets the first answer again, status and
//! body, without the work being done (or charged) twice.
//!
//! - The key is claimed in the store before the handler runs, so it holds
//!   across API replicas and restarts; a second request with the key while
//!   the first runs waits for the first's answer (up to [`WAIT`], then
//!   `409 idempotency_key_in_use`).
//! - The request is identified by its method, path, query, content type and
//!   body (SHA-256): the same key on another request is refused with `422
//!   idempotency_key_reused`.
//! - Only successful answers (2xx) are kept, for `limits.idempotency_ttl_secs`
//!   (24 h). A refusal or failure did not do the work; it releases the key
//!   and a retry runs again (after the client bought credits, say).

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use atelier_shared::db::idempotency::{Claim, StoredAnswer};
use atelier_shared::time::now_ms;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::time::Duration;

pub const HEADER: &str = "idempotency-key";
/// Set on an answer replayed from the store.
pub const REPLAYED: &str = "idempotent-replayed";
/// How long a retry waits for the first request with its key to answer.
const WAIT: Duration = Duration::from_secs(150);
/// A claim older than this whose request never answered (its process
/// died) is taken over; longer than any handler's own bound.
const STALE_CLAIM_MS: i64 = 15 * 60 * 1000;
/// Answers larger than this are not kept (creation answers are small).
const MAX_KEPT_ANSWER: usize = 1 << 20;

/// Whether `key` is usable: 1–255 visible ASCII characters.
fn usable(key: &str) -> bool {
    (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

fn fingerprint(req: &axum::http::request::Parts, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(req.method.as_str());
    h.update(b" ");
    h.update(
        req.uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or_default(),
    );
    h.update(b"\n");
    h.update(
        req.headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.as_bytes())
            .unwrap_or_default(),
    );
    h.update(b"\n");
    h.update(body);
    hex::encode(h.finalize())
}

fn replay(answer: StoredAnswer) -> Response {
    let mut resp = Response::new(Body::from(answer.body));
    *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    if let Some(ct) = answer
        .content_type
        .and_then(|ct| HeaderValue::from_str(&ct).ok())
    {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    resp.headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    resp
}

/// Releases a claim whose request ended without an answer to keep (a
/// refusal, a failure, or a client that went away mid-request).
struct Release {
    state: AppState,
    account: String,
    key: String,
    owner: String,
    armed: bool,
}

impl Drop for Release {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (store, account, key, owner) = (
            self.state.store.clone(),
            std::mem::take(&mut self.account),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.owner),
        );
        // Outside a runtime (it is shutting down) the claim goes stale
        // instead.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            if let Err(e) = store.release_idempotency_key(&account, &key, &owner).await {
                tracing::warn!(error = %e, "cannot release an idempotency key; it frees itself when its claim goes stale");
            }
        });
    }
}

/// The middleware of one route: `limit` is that route's body limit (the
/// body is read here, up to it, to identify the request).
pub async fn idempotent(
    State((state, limit)): State<(AppState, usize)>,
    req: Request,
    next: Next,
) -> Response {
    if !matches!(*req.method(), Method::POST | Method::PUT) {
        return next.run(req).await;
    }
    let Some(raw) = req.headers().get(HEADER) else {
        return next.run(req).await;
    };
    let key = match raw.to_str() {
        Ok(k) if usable(k) => k.to_owned(),
        _ => {
            return ApiError::bad_request(
                Some("Idempotency-Key"),
                "must be 1 to 255 visible ASCII characters",
                "header",
            )
            .into_response();
        }
    };
    let Some(Caller(account)) = req.extensions().get::<Caller>().cloned() else {
        return next.run(req).await;
    };
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Request body too large",
            )
            .into_response();
        }
    };
    let fp = fingerprint(&parts, &body);
    let ttl_ms = i64::try_from(state.config.limits.idempotency_ttl_secs)
        .unwrap_or(i64::MAX / 2)
        .saturating_mul(1000);
    let started = tokio::time::Instant::now();
    let owner = loop {
        let now = now_ms();
        let claim = state
            .store
            .claim_idempotency_key(
                &account.id,
                &key,
                &fp,
                now,
                now.saturating_sub(ttl_ms),
                now - STALE_CLAIM_MS,
            )
            .await;
        match claim {
            Ok(Claim::Claimed { owner }) => break owner,
            Ok(Claim::Replay(answer)) => return replay(answer),
            Ok(Claim::Mismatch) => {
                return ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    format!("Idempotency-Key `{key}` was already used for a different request"),
                )
                .with_detail(
                    Some("Idempotency-Key"),
                    "this key belongs to a request with another method, path or body; use a new key for a new request",
                    "header",
                )
                .into_response();
            }
            Ok(Claim::Running) if started.elapsed() < WAIT => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Claim::Running) => {
                return ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_key_in_use",
                    format!("A request with Idempotency-Key `{key}` is still running; retry later"),
                )
                .header(header::RETRY_AFTER, "5")
                .into_response();
            }
            Err(e) => return ApiError::from(e).into_response(),
        }
    };
    let mut release = Release {
        state: state.clone(),
        account: account.id.clone(),
        key: key.clone(),
        owner: owner.clone(),
        armed: true,
    };
    let resp = next.run(Request::from_parts(parts, Body::from(body))).await;
    if !resp.status().is_success() {
        // Released before the answer leaves, so that a client correcting
        // its request at once finds the key free. (The guard releases it
        // in the background only when the request is cut short.)
        release.armed = false;
        if let Err(e) = state
            .store
            .release_idempotency_key(&account.id, &key, &owner)
            .await
        {
            tracing::warn!(error = %e, "cannot release an idempotency key; it frees itself when its claim goes stale");
        }
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_KEPT_ANSWER).await else {
        // Too large to keep (no creating route answers so much): the work
        // is done, its answer lost; a retry would run it again.
        tracing::error!(%key, "an answer too large to keep for its Idempotency-Key");
        return ApiError::internal("answer too large to keep for its Idempotency-Key")
            .into_response();
    };
    let answer = StoredAnswer {
        status: parts.status.as_u16(),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: String::from_utf8_lossy(&bytes).into_owned(),
    };
    match state
        .store
        .complete_idempotency_key(&account.id, &key, &owner, &answer)
        .await
    {
        Ok(true) => release.armed = false,
        Ok(false) => tracing::warn!(%key, "an idempotency claim went stale before its answer"),
        // The work is done: answer it; the claim stays until it goes
        // stale, and retries meanwhile wait, then 409.
        Err(e) => {
            release.armed = false;
            tracing::error!(%key, error = %e, "cannot keep the answer of an idempotent request");
        }
    }
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert!(usable("retry-7f3a"));
        assert!(usable(&"k".repeat(255)));
        assert!(!usable(""));
        assert!(!usable(&"k".repeat(256)));
        assert!(!usable("with space"));
        assert!(!usable("é"));
    }

    #[test]
    fn the_fingerprint_covers_route_type_and_body() {
        let parts = |uri: &str, ct: &str| {
            let (p, _) = axum::http::Request::post(uri)
                .header(header::CONTENT_TYPE, ct)
                .body(())
                .expect("request")
                .into_parts();
            p
        };
        let base = fingerprint(&parts("/a?x=1", "application/json"), b"{}");
        assert_eq!(
            base,
            fingerprint(&parts("/a?x=1", "application/json"), b"{}")
        );
        assert_ne!(
            base,
            fingerprint(&parts("/b?x=1", "application/json"), b"{}")
        );
        assert_ne!(
            base,
            fingerprint(&parts("/a?x=2", "application/json"), b"{}")
        );
        assert_ne!(base, fingerprint(&parts("/a?x=1", "text/plain"), b"{}"));
        assert_ne!(
            base,
            fingerprint(&parts("/a?x=1", "application/json"), b"{ }")
        );
    }
}
