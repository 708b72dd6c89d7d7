//! Profile photos from public URLs: guarded resolution and redirects (the
//! egress policy), a time limit, a size limit, an image content type.

use crate::context::WorkerContext;
use bytes::Bytes;

/// Fetches one profile photo from a public URL: guarded resolution and
/// redirects, a time limit, a size limit, an image content type.
pub(crate) async fn fetch(ctx: &WorkerContext, url: &str) -> Result<Bytes, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
    ctx.egress
        .check_syntax(&parsed)
        .map_err(|e| e.to_string())?;
    let client = ctx
        .egress
        .fetch_client(ctx.fetch_timeout, 3)
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let resp = client
        .get(parsed)
        .send()
        .await
        .map_err(|e| format!("cannot fetch: {}", error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("the server answered {}", resp.status()));
    }
    let ct = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !(ct.is_empty() || ct.starts_with("image/") || ct.starts_with("application/octet-stream")) {
        return Err(format!("not an image (Content-Type {ct})"));
    }
    let limit = ctx.fetch_max_bytes as usize;
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(format!("larger than {limit} bytes"));
    }
    let body = atelier_shared::egress::read_capped(resp, limit + 1)
        .await
        .map_err(|e| format!("cannot read: {}", error_chain(&e)))?;
    if body.len() > limit {
        return Err(format!("larger than {limit} bytes"));
    }
    Ok(Bytes::from(body))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
