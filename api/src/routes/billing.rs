//! Balance (contract §10.5), usage (§10.4) and the operator top-up
//! (§10.6).

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::Json;
use crate::state::AppState;
use crate::views::{Balance, GrantRecorded};
use atelier_shared::domain::Credits;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;

/// The credits of the caller's billing owner (itself, or its group's).
#[utoipa::path(
    get, path = "/billing/balance", tag = "billing",
    responses((status = 200, description = "The balance", body = Balance)),
)]
pub async fn balance(
    State(s): State<AppState>,
    Caller(acc): Caller,
) -> ApiResult<axum::Json<Balance>> {
    Ok(axum::Json(owner_balance(&s, &acc.id).await?))
}

/// The balance of whoever pays for `account`'s work.
async fn owner_balance(s: &AppState, account: &str) -> ApiResult<Balance> {
    let (owner_id, group) = s.store.billing_owner(account).await?;
    let owner = s
        .store
        .account(&owner_id)
        .await?
        .ok_or_else(|| ApiError::internal("billing owner vanished"))?;
    let b = owner.credits();
    Ok(Balance {
        user_credits: b.balance.as_f64(),
        in_progress_credits: b.reserved.as_f64(),
        available_credits: b.available().as_f64(),
        billing_owner: group.unwrap_or_else(|| "self".into()),
    })
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct Grant {
    /// Account id or name.
    pub user: String,
    /// Credits to add (negative: a correction).
    pub amount: f64,
    pub reason: String,
}

/// Operators only: grant (or correct) an account's credits; an entry of
/// the append-only ledger.
#[utoipa::path(
    post, path = "/admin/credits/grants", tag = "billing",
    request_body = Grant,
    responses(
        (status = 201, description = "Granted", body = GrantRecorded),
        (status = 404, description = "Not an operator, or no such account", body = crate::error::ErrorBody),
        (status = 409, description = "The correction would leave less than what running jobs reserved", body = crate::error::ErrorBody),
    ),
)]
pub async fn grant(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Json(g): Json<Grant>,
) -> ApiResult<impl IntoResponse> {
    super::operator::operator(&acc)?;
    let amount = Credits::from_f64(g.amount)
        .ok_or_else(|| ApiError::bad_request(Some("amount"), "must be a finite number", "body"))?;
    if g.reason.trim().is_empty() {
        return Err(ApiError::bad_request(
            Some("reason"),
            "must not be empty",
            "body",
        ));
    }
    let target = match s.store.account(&g.user).await? {
        Some(a) => a,
        None => s
            .store
            .account_by_name(&g.user)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("User {} not found", g.user)))?,
    };
    let after = s
        .store
        .grant_credits(&target.id, amount, g.reason.trim())
        .await?
        .ok_or_else(|| {
            ApiError::conflict(
                "conflict",
                "The correction would leave less than the credits reserved by running jobs",
            )
        })?;
    Ok((
        StatusCode::CREATED,
        axum::Json(GrantRecorded {
            grant_id: format!("grant_{}", ulid::Ulid::new()),
            user_credits: Credits(after.balance).as_f64(),
        }),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// ISO 8601 date or date-time, UTC (default: 30 days before `end_date`).
    pub start_date: Option<String>,
    /// ISO 8601 date or date-time, UTC (default: now).
    pub end_date: Option<String>,
    /// `day` (default), `week` (from Monday) or `month`.
    pub resolution: Option<String>,
}

/// Epoch ms of an ISO 8601 date (`2025-03-01`, midnight UTC) or date-time.
pub(crate) fn instant(v: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(v, &Rfc3339) {
        return Some((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let d = time::Date::parse(v, time::macros::format_description!("[year]-[month]-[day]")).ok()?;
    Some(d.midnight().assume_utc().unix_timestamp() * 1000)
}

/// The start of the period (`day`, `week`, `month`) holding `ms`, and of
/// the next one.
fn period(ms: i64, resolution: &str) -> (i64, i64) {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let day = t.date();
    let (start, next) = match resolution {
        "week" => {
            let monday = day - time::Duration::days(i64::from(day.weekday().number_days_from_monday()));
            (monday, monday + time::Duration::days(7))
        }
        "month" => {
            let first = day.replace_day(1).unwrap_or(day);
            let next = match first.month() {
                time::Month::December => first
                    .replace_year(first.year() + 1)
                    .and_then(|d| d.replace_month(time::Month::January)),
                m => first.replace_month(m.next()),
            }
            .unwrap_or(first);
            (first, next)
        }
        _ => (day, day + time::Duration::days(1)),
    };
    let ms = |d: time::Date| d.midnight().assume_utc().unix_timestamp() * 1000;
    (ms(start), ms(next))
}

/// Credits the caller's work was charged, per period and job type, with
/// the balance of its billing owner.
#[utoipa::path(
    get, path = "/billing/credits", tag = "billing",
    params(UsageQuery),
    responses(
        (status = 200, description = "`{total_credits, summary: [{period_start, period_end, job_type, total_credits, job_count}], balance}`", body = Object),
        (status = 400, description = "Bad dates, or end_date before start_date", body = crate::error::ErrorBody),
    ),
)]
pub async fn usage(
    State(s): State<AppState>,
    Caller(acc): Caller,
    crate::extract::Query(q): crate::extract::Query<UsageQuery>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    let bad = |f: &str, m: &str| ApiError::bad_request(Some(f), m, "query");
    let end = match q.end_date.as_deref() {
        None => atelier_shared::time::now_ms(),
        Some(v) => instant(v.trim()).ok_or_else(|| bad("end_date", "must be an ISO 8601 date or date-time"))?,
    };
    let start = match q.start_date.as_deref() {
        None => end - 30 * 86_400_000,
        Some(v) => instant(v.trim()).ok_or_else(|| bad("start_date", "must be an ISO 8601 date or date-time"))?,
    };
    if end < start {
        return Err(bad("end_date", "must not be before start_date"));
    }
    let resolution = q.resolution.as_deref().unwrap_or("day");
    if !matches!(resolution, "day" | "week" | "month") {
        return Err(bad("resolution", "must be day, week or month"));
    }
    let rows = s.store.charges_between(&acc.id, start, end).await?;
    // (period start, job type) → (milli-credits, the jobs, jobless charges, period end)
    type Bucket = (i64, std::collections::BTreeSet<String>, i64, i64);
    let mut buckets: std::collections::BTreeMap<(i64, String), Bucket> = Default::default();
    let mut total = 0i64;
    for (at, amount, job_type, job_id) in rows {
        let (p0, p1) = period(at, resolution);
        let kind = job_type.unwrap_or_else(|| "preset_extraction".into());
        let e = buckets
            .entry((p0, kind))
            .or_insert_with(|| (0, Default::default(), 0, p1));
        e.0 += amount;
        match job_id {
            Some(j) => {
                e.1.insert(j);
            }
            None => e.2 += 1,
        }
        total += amount;
    }
    let summary: Vec<serde_json::Value> = buckets
        .into_iter()
        .map(|((p0, kind), (amount, jobs, jobless, p1))| {
            serde_json::json!({
                "period_start": atelier_shared::time::iso8601(p0),
                "period_end": atelier_shared::time::iso8601(p1),
                "job_type": kind,
                "total_credits": Credits(amount).as_f64(),
                "job_count": jobs.len() as i64 + jobless,
            })
        })
        .collect();
    let b = owner_balance(&s, &acc.id).await?;
    Ok(axum::Json(serde_json::json!({
        "total_credits": Credits(total).as_f64(),
        "summary": summary,
        "balance": {
            "user_credits": b.user_credits,
            "in_progress_credits": b.in_progress_credits,
            "available_credits": b.available_credits,
        },
    })))
}
