//! Authentication (contract §1.2): `Authorization: Bearer`, `X-API-Key`, or
//! `Authorization: Basic base64(token:secret)`. Keys are looked up by hash.
//! The middleware also applies the general rate limit and stamps the
//! `X-RateLimit-*` headers on every authenticated response.

use crate::AppState;
use crate::error::ApiError;
use crate::limits::{Bucket, Decision};
use atelier_shared::db::accounts::Account;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;

/// The authenticated account of a request.
#[derive(Debug, Clone)]
pub struct Caller(pub Account);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("Missing credentials"))
    }
}

/// The token a request authenticated with, for responses that outlive the
/// request's check (an event stream re-checks it while it runs).
#[derive(Clone)]
pub struct Credential(pub String);

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(…)")
    }
}

/// Extracts the presented token, or why the credentials are malformed.
pub fn presented_token(headers: &HeaderMap, query_token: Option<&str>) -> Result<String, ApiError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let mut bearer = None;
    if let Some(auth) = header("authorization") {
        if let Some(t) = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
        {
            bearer = Some(t.trim().to_string());
        } else if let Some(b) = auth
            .strip_prefix("Basic ")
            .or_else(|| auth.strip_prefix("basic "))
        {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|_| ApiError::unauthorized("Malformed Basic credentials"))?;
            let s = String::from_utf8(raw)
                .map_err(|_| ApiError::unauthorized("Malformed Basic credentials"))?;
            bearer = Some(s.split_once(':').map(|(u, _)| u.to_string()).unwrap_or(s));
        } else {
            return Err(ApiError::unauthorized(
                "Unsupported Authorization scheme; use Bearer",
            ));
        }
    }
    let api_key = header("x-api-key").map(String::from);
    match (bearer, api_key) {
        (Some(a), Some(b)) if a != b => Err(ApiError::unauthorized(
            "Authorization and X-API-Key carry different tokens",
        )),
        (Some(t), _) | (None, Some(t)) if !t.is_empty() => Ok(t),
        _ => match query_token {
            Some(t) if !t.is_empty() => Ok(t.to_string()),
            _ => Err(ApiError::unauthorized(
                "Missing credentials: send Authorization: Bearer <token> or X-API-Key",
            )),
        },
    }
}

pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    // `?token=` only on the event stream: browser EventSource cannot send
    // headers (contract §1.2). Anywhere else a query token would leak into
    // access logs for no reason.
    let is_stream = req
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|p| p.as_str().ends_with("/notifications/events"));
    let query_token = if is_stream {
        req.uri().query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        })
    } else {
        None
    };
    let token = match presented_token(req.headers(), query_token.as_deref()) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let account = match state.store.account_for_token(&token).await {
        Ok(Some(a)) => a,
        Ok(None) => {
            return ApiError::unauthorized("Invalid, revoked or expired token").into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    let decision = state.limiter.check(Bucket::General, &account.id).await;
    if !decision.allowed {
        let mut r = ApiError::too_many(
            "rate_limited",
            "Too many requests",
            decision.retry_after_secs,
        )
        .into_response();
        stamp(r.headers_mut(), &decision);
        return r;
    }
    req.extensions_mut().insert(Caller(account));
    req.extensions_mut().insert(Credential(token));
    let mut resp = next.run(req).await;
    if !resp.headers().contains_key("x-ratelimit-limit") {
        stamp(resp.headers_mut(), &decision);
    }
    resp
}

/// Writes the `X-RateLimit-*` headers of a bucket.
pub fn stamp(h: &mut HeaderMap, d: &Decision) {
    for (k, v) in [
        ("x-ratelimit-limit", d.limit as u64),
        ("x-ratelimit-remaining", d.remaining as u64),
        ("x-ratelimit-reset", d.reset_secs),
    ] {
        if let Ok(v) = HeaderValue::from_str(&v.to_string()) {
            h.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        m
    }

    #[test]
    fn every_carrier_is_accepted_and_conflicts_are_refused() {
        assert_eq!(
            presented_token(&h(&[("authorization", "Bearer abc")]), None)
                .ok()
                .as_deref(),
            Some("abc")
        );
        assert_eq!(
            presented_token(&h(&[("x-api-key", "abc")]), None)
                .ok()
                .as_deref(),
            Some("abc")
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("abc:secret");
        assert_eq!(
            presented_token(&h(&[("authorization", &format!("Basic {basic}"))]), None)
                .ok()
                .as_deref(),
            Some("abc")
        );
        assert!(
            presented_token(
                &h(&[("authorization", "Bearer a"), ("x-api-key", "b")]),
                None
            )
            .is_err()
        );
        assert!(
            presented_token(
                &h(&[("authorization", "Bearer a"), ("x-api-key", "a")]),
                None
            )
            .is_ok()
        );
        assert!(presented_token(&h(&[]), None).is_err());
        assert_eq!(
            presented_token(&h(&[]), Some("q")).ok().as_deref(),
            Some("q")
        );
        assert!(presented_token(&h(&[("authorization", "Digest x")]), None).is_err());
    }
}
