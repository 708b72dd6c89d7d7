//! API tokens (contract §1.2): `POST /auth/token` mints one (its value is
//! shown only then), `GET /auth/token` lists them (ids and expiry, never
//! values), `DELETE /auth/token/{id}` revokes one. The store keeps only a
//! hash of each token.

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonValue, Query};
use crate::views::Pagination;
use crate::state::AppState;
use atelier_shared::time::{iso8601, now_ms};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

/// Live tokens one account may hold (contract §1.2).
const MAX_TOKENS: i64 = 20;
const HOUR: f64 = 3600.0;
/// Longest lifetime: four years.
const MAX_LIFETIME: f64 = 4.0 * 365.25 * 24.0 * HOUR;

/// Seconds of an ISO 8601 duration (`P90D`, `PT12H`, `P1Y2M3DT4H5M6.5S`,
/// `P2W`; a year is 365.25 days, a month 30.44).
fn iso_duration(s: &str) -> Option<f64> {
    let rest = s.strip_prefix('P').or_else(|| s.strip_prefix('p'))?;
    let (date, time) = match rest.split_once(['T', 't']) {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    let mut total = 0.0;
    let mut any = false;
    let mut take = |part: &str, units: &[(char, f64)]| -> Option<()> {
        let mut num = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' || c == ',' {
                num.push(if c == ',' { '.' } else { c });
                continue;
            }
            let (_, secs) = units.iter().find(|(u, _)| u.eq_ignore_ascii_case(&c))?;
            let n: f64 = num.parse().ok()?;
            total += n * secs;
            any = true;
            num.clear();
        }
        num.is_empty().then_some(())
    };
    take(
        date,
        &[('Y', 365.25 * 86400.0), ('M', 30.44 * 86400.0), ('W', 7.0 * 86400.0), ('D', 86400.0)],
    )?;
    if let Some(t) = time {
        if t.is_empty() {
            return None;
        }
        take(t, &[('H', HOUR), ('M', 60.0), ('S', 1.0)])?;
    }
    any.then_some(total)
}

/// Seconds of `[-][DD]D[,][HH:MM:]SS[.ffffff]` text (`1d,01:02:03`,
/// `2 days, 00:00:00`, `01:00:00`, `3600`).
fn clock_duration(s: &str) -> Option<f64> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r.trim()),
        None => (false, s),
    };
    let (days, clock) = match s.find(|c: char| c == 'd' || c == 'D') {
        Some(i) => {
            let days: f64 = s[..i].trim().parse().ok()?;
            let after = s[i..].trim_start_matches(|c: char| c.is_ascii_alphabetic());
            (days, after.trim_start_matches([',', ' ']).trim())
        }
        None => (0.0, s.trim()),
    };
    let mut secs = days * 86400.0;
    if !clock.is_empty() {
        let parts: Vec<&str> = clock.split(':').collect();
        if parts.len() > 3 {
            return None;
        }
        let mut unit = 1.0;
        for p in parts.iter().rev() {
            let v: f64 = p.parse().ok()?;
            if v < 0.0 {
                return None;
            }
            secs += v * unit;
            unit *= 60.0;
        }
    }
    Some(if neg { -secs } else { secs })
}

/// The lifetime an `expiration` value asks for, in seconds, or why it
/// cannot be used.
pub fn lifetime(v: &Value) -> Result<f64, String> {
    let secs = match v {
        Value::Number(n) => n.as_f64().ok_or("must be a number of seconds")?,
        Value::String(s) => {
            let s = s.trim();
            iso_duration(s)
                .or_else(|| clock_duration(s))
                .ok_or("must be an ISO 8601 duration (P90D), [DD]D,[HH:MM:]SS text or seconds")?
        }
        _ => return Err("is required: an ISO 8601 duration, duration text or seconds".into()),
    };
    if !secs.is_finite() || secs < HOUR || secs > MAX_LIFETIME {
        return Err("must give a lifetime between 1 hour and 4 years".into());
    }
    Ok(secs)
}

/// Mint an API token.
#[utoipa::path(
    post, path = "/auth/token", tag = "auth",
    request_body = Object,
    responses(
        (status = 201, description = "`{token, expiration_date}`: the only time the token is shown", body = Object),
        (status = 400, description = "Unparsable or out-of-range expiration", body = crate::error::ErrorBody),
        (status = 409, description = "20 live tokens already", body = crate::error::ErrorBody),
    ),
)]
pub async fn mint(
    State(s): State<AppState>,
    Caller(acc): Caller,
    body: JsonValue,
) -> ApiResult<Response> {
    let secs = lifetime(body.0.get("expiration").unwrap_or(&Value::Null))
        .map_err(|why| ApiError::bad_request(Some("expiration"), why, "body"))?;
    let expires = now_ms() + (secs * 1000.0) as i64;
    let Some((_, token)) = s.store.mint_api_key(&acc.id, expires, MAX_TOKENS).await? else {
        return Err(ApiError::conflict(
            "token_limit",
            format!("You already hold {MAX_TOKENS} live tokens: revoke one first"),
        ));
    };
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"token": token, "expiration_date": iso8601(expires)})),
    )
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TokenListQuery {
    pub page: Option<i64>,
    /// 1–100 (default 10).
    pub per_page: Option<i64>,
    pub include_expired: Option<bool>,
}

/// List the caller's tokens (ids and expiry only).
#[utoipa::path(
    get, path = "/auth/token", tag = "auth",
    params(TokenListQuery),
    responses((status = 200, description = "`{tokens: [{token_id, expiration_date}], pagination}`", body = Object)),
)]
pub async fn list(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Query(q): Query<TokenListQuery>,
) -> ApiResult<axum::Json<Value>> {
    let (page, per_page, _) = crate::routes::paging(q.page, q.per_page, None, 10)?;
    let (rows, total) = s
        .store
        .list_api_keys(&acc.id, q.include_expired.unwrap_or(false), page, per_page)
        .await?;
    let tokens: Vec<Value> = rows
        .into_iter()
        .map(|(id, exp)| json!({"token_id": id, "expiration_date": exp.map(iso8601)}))
        .collect();
    Ok(axum::Json(json!({
        "tokens": tokens,
        "pagination": Pagination::new(page, per_page, total),
    })))
}

/// Revoke one of the caller's tokens.
#[utoipa::path(
    delete, path = "/auth/token/{token_id}", tag = "auth",
    params(("token_id" = String, Path, description = "The token's id")),
    responses((status = 204, description = "Revoked")),
)]
pub async fn revoke(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if s.store.revoke_api_key(&acc.id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("Token {id} not found")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expirations_in_each_form() {
        let day = 86400.0;
        assert_eq!(lifetime(&json!("P90D")), Ok(90.0 * day));
        assert_eq!(lifetime(&json!("PT12H")), Ok(12.0 * HOUR));
        assert_eq!(lifetime(&json!("P1DT1H30M")), Ok(day + 1.5 * HOUR));
        assert_eq!(lifetime(&json!("P2W")), Ok(14.0 * day));
        assert_eq!(lifetime(&json!("1d,01:02:03")), Ok(day + HOUR + 123.0));
        assert_eq!(lifetime(&json!("2 days, 00:00:00")), Ok(2.0 * day));
        assert_eq!(lifetime(&json!("01:00:00")), Ok(HOUR));
        assert_eq!(lifetime(&json!("7200")), Ok(7200.0));
        assert_eq!(lifetime(&json!(7200)), Ok(7200.0));
        for bad in [json!("PT30M"), json!("P5Y"), json!("-1d"), json!(60), json!("soon"), json!("P"), json!("PT"), json!(null), json!("1:2:3:4")] {
            assert!(lifetime(&bad).is_err(), "{bad}");
        }
    }
}
