//! Route handlers, one module per resource.

pub mod billing;
pub mod custom_models;
pub mod downloads;
pub mod drafts;
pub mod flat;
pub mod health;
pub mod identities;
pub mod jobs;
pub mod models_api;
pub mod notifications;
pub mod operator;
pub mod predictions;
pub mod presets;
pub mod profiles;
pub mod projects;
pub mod studio;
pub mod swap;
pub mod tokens;
pub mod trainings;
pub mod uploads;
pub mod webhooks;

use crate::error::ApiError;
use serde::Deserialize;

/// `page`/`per_page`/`order` of On-Model list endpoints (contract §1.6).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// 1-based page (default 1).
    pub page: Option<i64>,
    /// 1–100 (default 20).
    pub per_page: Option<i64>,
    /// `asc` or `desc` (default `desc`).
    pub order: Option<String>,
    /// Text the name contains.
    pub search: Option<String>,
}

impl PageQuery {
    /// `(page, per_page, ascending)`, validated.
    pub fn resolve(&self, default_per_page: i64) -> Result<(i64, i64, bool), ApiError> {
        paging(self.page, self.per_page, self.order.as_deref(), default_per_page)
    }
}

/// `(page, per_page, ascending)` of a list query's paging parameters,
/// validated (the list queries that carry more than [`PageQuery`]).
pub fn paging(
    page: Option<i64>,
    per_page: Option<i64>,
    order: Option<&str>,
    default_per_page: i64,
) -> Result<(i64, i64, bool), ApiError> {
    let page = page.unwrap_or(1);
    if !(1..=1_000_000).contains(&page) {
        return Err(ApiError::bad_request(
            Some("page"),
            "must be between 1 and 1000000",
            "query",
        ));
    }
    let per_page = per_page.unwrap_or(default_per_page);
    if !(1..=100).contains(&per_page) {
        return Err(ApiError::bad_request(
            Some("per_page"),
            "must be between 1 and 100",
            "query",
        ));
    }
    let asc = match order {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                Some("order"),
                "must be asc or desc",
                "query",
            ));
        }
    };
    Ok((page, per_page, asc))
}
