//! Presets and categories (contract §6, seed 000): `/preset…`. A preset is
//! one instruction of a job kind, checked by that kind's own validator;
//! categories group presets; both are private, shared with groups, or
//! system (operator-seeded, read-only through the API).

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonValue, Query};
use crate::routes::paging;
use crate::state::AppState;
use crate::views::Pagination;
use atelier_shared::db::accounts::Account;
use atelier_shared::db::presets::{CategoryRow, NewPreset, PresetQuery, PresetRefusal, PresetRow};
use atelier_shared::domain::presets::{Checks, PresetType, check_instruction};
use atelier_shared::time::iso8601;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// Presets one bulk delete or assignment names at most.
const MAX_CODES: usize = 100;
/// Presets a category duplicate copies at most (contract §6.16).
const MAX_DUPLICATE: usize = 50;

fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(Some(field), message, "body")
}

fn no_preset(code: &str) -> ApiError {
    ApiError::not_found(format!("Preset {code} not found"))
}

fn no_category(id: &str) -> ApiError {
    ApiError::not_found(format!("Category {id} not found"))
}

fn name_taken(what: &str, name: &str) -> ApiError {
    ApiError::conflict("name_taken", format!("You already have a {what} named {name:?}"))
}

/// A name: 1–128 characters after trimming, no control characters.
fn name_field(v: Option<&Value>, field: &str) -> ApiResult<String> {
    let s = v
        .and_then(Value::as_str)
        .map(str::trim)
        .ok_or_else(|| bad(field, "is required: a string of 1 to 128 characters"))?;
    if s.is_empty() || s.chars().count() > 128 {
        return Err(bad(field, "must be 1 to 128 characters"));
    }
    if s.chars().any(char::is_control) {
        return Err(bad(field, "must not contain control characters"));
    }
    Ok(s.to_string())
}

/// An optional text field (`null` or absent: not given).
fn opt_text(v: Option<&Value>, field: &str, max: usize) -> ApiResult<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            if s.chars().count() > max {
                return Err(bad(field, format!("must be at most {max} characters")));
            }
            if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
                return Err(bad(field, "must not contain control characters"));
            }
            Ok(Some(s.clone()))
        }
        Some(_) => Err(bad(field, "must be a string")),
    }
}

fn codes_field(v: Option<&Value>, field: &str) -> ApiResult<Vec<String>> {
    let items = v
        .and_then(Value::as_array)
        .ok_or_else(|| bad(field, "is required: an array of preset codes"))?;
    if items.is_empty() || items.len() > MAX_CODES {
        return Err(bad(field, format!("must hold 1 to {MAX_CODES} preset codes")));
    }
    items
        .iter()
        .map(|c| {
            c.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(field, "must hold strings"))
        })
        .collect()
}

fn checks(s: &AppState) -> Checks<'_> {
    Checks {
        catalogue: &s.config.catalogue,
        engines: &s.engines,
        policy: &s.policy,
    }
}

fn preset_cap(s: &AppState, acc: &Account) -> Option<i64> {
    (!acc.is_enterprise()).then_some(i64::from(s.config.limits.presets))
}

fn cap_reached(cap: i64) -> ApiError {
    ApiError::too_many(
        "preset_cap_reached",
        format!("You hold the most presets your plan allows ({cap})"),
        60,
    )
}

/// The Preset object (§6.1).
async fn preset_json(s: &AppState, account: &str, p: &PresetRow) -> ApiResult<Value> {
    let (visibility, groups) = s.store.preset_sharing(p).await?;
    let categories: Vec<Value> = s
        .store
        .categories_of_preset(account, &p.code)
        .await?
        .iter()
        .map(|c| json!({"id": c.id, "name": c.name}))
        .collect();
    Ok(json!({
        "preset_code": p.code,
        "name": p.name,
        "description": p.description,
        "type": p.preset_type,
        "instruction_data": serde_json::from_str::<Value>(&p.instruction_data).unwrap_or(json!({})),
        "visibility": visibility,
        "groups": groups,
        "categories": categories,
        "created_by": p.owner_id.as_deref().unwrap_or("system"),
        "created_at": iso8601(p.created_at),
        "updated_at": iso8601(p.updated_at),
    }))
}

/// The Category object (§6.1).
async fn category_json(s: &AppState, c: &CategoryRow) -> ApiResult<Value> {
    let (visibility, groups, count) = s.store.category_sharing(c).await?;
    Ok(json!({
        "id": c.id,
        "name": c.name,
        "description": c.description,
        "thumbnail_url": c.thumbnail_url,
        "visibility": visibility,
        "groups": groups,
        "preset_count": count,
        "created_by": c.owner_id.as_deref().unwrap_or("system"),
        "created_at": iso8601(c.created_at),
    }))
}

/// A preset the caller may see and write (404 when it may not see it,
/// 403 when it may see but not write it).
async fn writable_preset(s: &AppState, account: &str, code: &str) -> ApiResult<PresetRow> {
    let p = s
        .store
        .preset_visible(account, code)
        .await?
        .ok_or_else(|| no_preset(code))?;
    match p.owner_id.as_deref() {
        None => Err(ApiError::forbidden("System presets cannot be changed")),
        Some(o) if o != account => Err(ApiError::forbidden("Only the preset's owner can change it")),
        Some(_) => Ok(p),
    }
}

async fn writable_category(s: &AppState, account: &str, id: &str) -> ApiResult<CategoryRow> {
    let c = s
        .store
        .category_visible(account, id)
        .await?
        .ok_or_else(|| no_category(id))?;
    match c.owner_id.as_deref() {
        None => Err(ApiError::forbidden("System categories cannot be changed")),
        Some(o) if o != account => Err(ApiError::forbidden("Only the category's owner can change it")),
        Some(_) => Ok(c),
    }
}

/// The group `name` when the caller is a member (403 otherwise).
pub(crate) async fn member_group(s: &AppState, account: &str, name: &str) -> ApiResult<String> {
    s.store
        .member_group(account, name)
        .await?
        .ok_or_else(|| ApiError::forbidden(format!("You are not a member of group {name}")))
}

/// Create a preset.
#[utoipa::path(
    post, path = "/preset", tag = "presets",
    request_body = Object,
    responses(
        (status = 201, description = "The preset", body = Object),
        (status = 400, description = "Invalid instruction_data for its type (detail points into it)", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown category", body = crate::error::ErrorBody),
        (status = 409, description = "Name taken", body = crate::error::ErrorBody),
        (status = 429, description = "preset_cap_reached", body = crate::error::ErrorBody),
    ),
)]
pub async fn create(
    State(s): State<AppState>,
    Caller(acc): Caller,
    body: JsonValue,
) -> ApiResult<Response> {
    let b = &body.0;
    let name = name_field(b.get("name"), "name")?;
    let description = opt_text(b.get("description"), "description", 2000)?;
    let t = b
        .get("type")
        .and_then(Value::as_str)
        .and_then(PresetType::parse)
        .ok_or_else(|| {
            bad(
                "type",
                "is required: one of create_packshot, flat_2_model, identity_creation, model_swap",
            )
        })?;
    let data = b
        .get("instruction_data")
        .ok_or_else(|| bad("instruction_data", "is required: an object"))?;
    check_instruction(t, data, &checks(&s)).map_err(ApiError::invalid)?;
    let categories = match b.get("category_ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => v
            .as_array()
            .ok_or_else(|| bad("category_ids", "must be an array of category ids"))?
            .iter()
            .map(|c| {
                c.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("category_ids", "must hold strings"))
            })
            .collect::<ApiResult<Vec<_>>>()?,
    };
    let made = s
        .store
        .create_preset(NewPreset {
            owner_id: Some(&acc.id),
            name: &name,
            description: description.as_deref(),
            preset_type: t.as_str(),
            instruction_data: data,
            category_ids: &categories,
            cap: preset_cap(&s, &acc),
        })
        .await?;
    let p = match made {
        Ok(p) => p,
        Err(PresetRefusal::NameTaken) => return Err(name_taken("preset", &name)),
        Err(PresetRefusal::CapReached { cap }) => return Err(cap_reached(cap)),
        Err(PresetRefusal::NoCategory(id)) => return Err(no_category(&id)),
    };
    Ok((StatusCode::CREATED, axum::Json(preset_json(&s, &acc.id, &p).await?)).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PresetListQuery {
    /// 1-based page (default 1).
    pub page: Option<i64>,
    /// 1–100 (default 20).
    pub per_page: Option<i64>,
    /// `asc` or `desc` (default `desc`).
    pub order: Option<String>,
    /// Text the name or description contains.
    pub search: Option<String>,
    /// `created_at` (default), `updated_at` or `name`.
    pub sort_by: Option<String>,
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub preset_type: Option<String>,
    pub category_id: Option<String>,
    /// `private`, `shared` or `system`.
    pub visibility: Option<String>,
}

fn check_visibility(v: Option<&str>) -> ApiResult<()> {
    match v {
        None | Some("private" | "shared" | "system") => Ok(()),
        Some(_) => Err(ApiError::bad_request(
            Some("visibility"),
            "must be private, shared or system",
            "query",
        )),
    }
}

/// List the presets the caller may use: its own, shared and system ones.
#[utoipa::path(
    get, path = "/preset", tag = "presets",
    params(PresetListQuery),
    responses((status = 200, description = "`{presets, pagination}`", body = Object)),
)]
pub async fn list(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Query(q): Query<PresetListQuery>,
) -> ApiResult<axum::Json<Value>> {
    let (page, per_page, ascending) = paging(q.page, q.per_page, q.order.as_deref(), 20)?;
    let sort_by = q.sort_by.clone().unwrap_or_else(|| "created_at".into());
    if !["created_at", "updated_at", "name"].contains(&sort_by.as_str()) {
        return Err(ApiError::bad_request(
            Some("sort_by"),
            "must be created_at, updated_at or name",
            "query",
        ));
    }
    if let Some(t) = &q.preset_type
        && PresetType::parse(t).is_none()
    {
        return Err(ApiError::bad_request(
            Some("type"),
            "must be create_packshot, flat_2_model, identity_creation or model_swap",
            "query",
        ));
    }
    check_visibility(q.visibility.as_deref())?;
    let (rows, total) = s
        .store
        .list_presets(
            &acc.id,
            &PresetQuery {
                page,
                per_page,
                ascending,
                sort_by,
                preset_type: q.preset_type,
                category_id: q.category_id,
                visibility: q.visibility,
                search: q.search.clone().filter(|s| !s.trim().is_empty()),
            },
        )
        .await?;
    let mut presets = Vec::with_capacity(rows.len());
    for p in &rows {
        presets.push(preset_json(&s, &acc.id, p).await?);
    }
    Ok(axum::Json(json!({
        "presets": presets,
        "pagination": Pagination::new(page, per_page, total),
    })))
}

/// Read a preset.
#[utoipa::path(
    get, path = "/preset/{preset_code}", tag = "presets",
    params(("preset_code" = String, Path, description = "The preset's code")),
    responses((status = 200, description = "The preset", body = Object)),
)]
pub async fn read(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(code): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let p = s
        .store
        .preset_visible(&acc.id, &code)
        .await?
        .ok_or_else(|| no_preset(&code))?;
    Ok(axum::Json(preset_json(&s, &acc.id, &p).await?))
}

/// Update a preset (owner only; its type never changes).
#[utoipa::path(
    patch, path = "/preset/{preset_code}", tag = "presets",
    params(("preset_code" = String, Path, description = "The preset's code")),
    request_body = Object,
    responses(
        (status = 200, description = "The preset", body = Object),
        (status = 403, description = "Not the owner, or a system preset", body = crate::error::ErrorBody),
        (status = 409, description = "Name taken", body = crate::error::ErrorBody),
    ),
)]
pub async fn update(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(code): Path<String>,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let b = &body.0;
    if !b.is_object() {
        return Err(ApiError::bad_request(None, "the body must be a JSON object", "body"));
    }
    let p = writable_preset(&s, &acc.id, &code).await?;
    if let Some(t) = b.get("type").filter(|t| !t.is_null())
        && t.as_str() != Some(p.preset_type.as_str())
    {
        return Err(bad("type", "cannot change"));
    }
    let name = match b.get("name") {
        None | Some(Value::Null) => None,
        v => Some(name_field(v, "name")?),
    };
    let description = opt_text(b.get("description"), "description", 2000)?;
    let data = match b.get("instruction_data") {
        None | Some(Value::Null) => None,
        Some(d) => {
            let t = PresetType::parse(&p.preset_type)
                .ok_or_else(|| ApiError::internal(format!("stored preset type {}", p.preset_type)))?;
            check_instruction(t, d, &checks(&s)).map_err(ApiError::invalid)?;
            Some(d)
        }
    };
    if let Err(PresetRefusal::NameTaken) = s
        .store
        .update_preset(&code, name.as_deref(), description.as_deref(), data)
        .await?
    {
        return Err(name_taken("preset", name.as_deref().unwrap_or("")));
    }
    let p = s
        .store
        .preset_visible(&acc.id, &code)
        .await?
        .ok_or_else(|| no_preset(&code))?;
    Ok(axum::Json(preset_json(&s, &acc.id, &p).await?))
}

/// Delete a preset (soft; owner only).
#[utoipa::path(
    delete, path = "/preset/{preset_code}", tag = "presets",
    params(("preset_code" = String, Path, description = "The preset's code")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "Not the owner, or a system preset", body = crate::error::ErrorBody),
    ),
)]
pub async fn delete(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(code): Path<String>,
) -> ApiResult<StatusCode> {
    writable_preset(&s, &acc.id, &code).await?;
    if s.store.delete_presets(&acc.id, &[code.clone()]).await?.is_empty() {
        return Err(no_preset(&code));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Delete several presets; those the caller does not own are listed.
#[utoipa::path(
    post, path = "/preset/bulk-delete", tag = "presets",
    request_body = Object,
    responses((status = 200, description = "`{deleted_count, failed_codes}`", body = Object)),
)]
pub async fn bulk_delete(
    State(s): State<AppState>,
    Caller(acc): Caller,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let codes = codes_field(body.0.get("preset_codes"), "preset_codes")?;
    let deleted = s.store.delete_presets(&acc.id, &codes).await?;
    let failed: Vec<&String> = codes.iter().filter(|c| !deleted.contains(c)).collect();
    Ok(axum::Json(json!({
        "deleted_count": deleted.len(),
        "failed_codes": failed,
    })))
}

async fn share_preset(s: &AppState, acc: &Account, code: &str, group: &str, share: bool) -> ApiResult<Value> {
    let p = writable_preset(s, &acc.id, code).await?;
    let gid = member_group(s, &acc.id, group).await?;
    s.store.set_preset_share(&p.code, &gid, share).await?;
    let (visibility, groups) = s.store.preset_sharing(&p).await?;
    Ok(json!({"preset_code": p.code, "visibility": visibility, "groups": groups}))
}

/// Share a preset with a group the caller belongs to.
#[utoipa::path(
    post, path = "/preset/{preset_code}/share/{group_name}", tag = "presets",
    params(
        ("preset_code" = String, Path, description = "The preset's code"),
        ("group_name" = String, Path, description = "A group the caller belongs to"),
    ),
    responses(
        (status = 200, description = "`{preset_code, visibility, groups}`", body = Object),
        (status = 403, description = "Not the owner, not a member, or a system preset", body = crate::error::ErrorBody),
    ),
)]
pub async fn share(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((code, group)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(share_preset(&s, &acc, &code, &group, true).await?))
}

/// Stop sharing a preset with a group (the last one: private again).
#[utoipa::path(
    delete, path = "/preset/{preset_code}/share/{group_name}", tag = "presets",
    params(
        ("preset_code" = String, Path, description = "The preset's code"),
        ("group_name" = String, Path, description = "A group the caller belongs to"),
    ),
    responses((status = 200, description = "`{preset_code, visibility, groups}`", body = Object)),
)]
pub async fn unshare(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((code, group)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(share_preset(&s, &acc, &code, &group, false).await?))
}

// -- categories -------------------------------------------------------------

/// Create a category.
#[utoipa::path(
    post, path = "/preset/categories", tag = "presets",
    request_body = Object,
    responses(
        (status = 201, description = "The category", body = Object),
        (status = 409, description = "Name taken", body = crate::error::ErrorBody),
    ),
)]
pub async fn create_category(
    State(s): State<AppState>,
    Caller(acc): Caller,
    body: JsonValue,
) -> ApiResult<Response> {
    let b = &body.0;
    let name = name_field(b.get("name"), "name")?;
    let description = opt_text(b.get("description"), "description", 2000)?;
    let thumbnail = opt_text(b.get("thumbnail_url"), "thumbnail_url", 2048)?;
    let c = match s
        .store
        .create_category(Some(&acc.id), &name, description.as_deref(), thumbnail.as_deref())
        .await?
    {
        Ok(c) => c,
        Err(_) => return Err(name_taken("category", &name)),
    };
    Ok((StatusCode::CREATED, axum::Json(category_json(&s, &c).await?)).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CategoryListQuery {
    pub page: Option<i64>,
    pub per_page: Option<i64>,
    pub order: Option<String>,
    /// Text the name contains.
    pub search: Option<String>,
    /// `private`, `shared` or `system`.
    pub visibility: Option<String>,
}

/// List the categories the caller may see.
#[utoipa::path(
    get, path = "/preset/categories", tag = "presets",
    params(CategoryListQuery),
    responses((status = 200, description = "`{categories, pagination}`", body = Object)),
)]
pub async fn list_categories(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Query(q): Query<CategoryListQuery>,
) -> ApiResult<axum::Json<Value>> {
    let (page, per_page, ascending) = paging(q.page, q.per_page, q.order.as_deref(), 20)?;
    check_visibility(q.visibility.as_deref())?;
    let (rows, total) = s
        .store
        .list_categories(
            &acc.id,
            q.visibility.as_deref(),
            q.search.as_deref().filter(|s| !s.trim().is_empty()),
            page,
            per_page,
            ascending,
        )
        .await?;
    let mut categories = Vec::with_capacity(rows.len());
    for c in &rows {
        categories.push(category_json(&s, c).await?);
    }
    Ok(axum::Json(json!({
        "categories": categories,
        "pagination": Pagination::new(page, per_page, total),
    })))
}

/// Read a category with its presets.
#[utoipa::path(
    get, path = "/preset/categories/{category_id}", tag = "presets",
    params(("category_id" = String, Path, description = "The category's id")),
    responses((status = 200, description = "The category and its `presets`", body = Object)),
)]
pub async fn read_category(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let c = s
        .store
        .category_visible(&acc.id, &id)
        .await?
        .ok_or_else(|| no_category(&id))?;
    let mut v = category_json(&s, &c).await?;
    let mut presets = Vec::new();
    for p in s.store.category_presets(&acc.id, &id).await? {
        presets.push(preset_json(&s, &acc.id, &p).await?);
    }
    v["presets"] = Value::Array(presets);
    Ok(axum::Json(v))
}

/// Update a category (owner only).
#[utoipa::path(
    patch, path = "/preset/categories/{category_id}", tag = "presets",
    params(("category_id" = String, Path, description = "The category's id")),
    request_body = Object,
    responses(
        (status = 200, description = "The category", body = Object),
        (status = 403, description = "Not the owner, or a system category", body = crate::error::ErrorBody),
        (status = 409, description = "Name taken", body = crate::error::ErrorBody),
    ),
)]
pub async fn update_category(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let b = &body.0;
    if !b.is_object() {
        return Err(ApiError::bad_request(None, "the body must be a JSON object", "body"));
    }
    writable_category(&s, &acc.id, &id).await?;
    let name = match b.get("name") {
        None | Some(Value::Null) => None,
        v => Some(name_field(v, "name")?),
    };
    let description = opt_text(b.get("description"), "description", 2000)?;
    let thumbnail = opt_text(b.get("thumbnail_url"), "thumbnail_url", 2048)?;
    if s
        .store
        .update_category(&id, name.as_deref(), description.as_deref(), thumbnail.as_deref())
        .await?
        .is_err()
    {
        return Err(name_taken("category", name.as_deref().unwrap_or("")));
    }
    let c = s
        .store
        .category_visible(&acc.id, &id)
        .await?
        .ok_or_else(|| no_category(&id))?;
    Ok(axum::Json(category_json(&s, &c).await?))
}

/// Delete a category; its presets are kept, unassigned.
#[utoipa::path(
    delete, path = "/preset/categories/{category_id}", tag = "presets",
    params(("category_id" = String, Path, description = "The category's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "Not the owner, or a system category", body = crate::error::ErrorBody),
    ),
)]
pub async fn delete_category(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    writable_category(&s, &acc.id, &id).await?;
    if !s.store.delete_category(&id).await? {
        return Err(no_category(&id));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Put presets the caller may see into its category.
#[utoipa::path(
    post, path = "/preset/categories/{category_id}/presets", tag = "presets",
    params(("category_id" = String, Path, description = "The category's id")),
    request_body = Object,
    responses(
        (status = 200, description = "`{category_id, assigned_count, already_assigned_count}`", body = Object),
        (status = 403, description = "No write access to the category", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown category or preset", body = crate::error::ErrorBody),
    ),
)]
pub async fn assign(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let codes = codes_field(body.0.get("preset_codes"), "preset_codes")?;
    writable_category(&s, &acc.id, &id).await?;
    for code in &codes {
        s.store
            .preset_visible(&acc.id, code)
            .await?
            .ok_or_else(|| no_preset(code))?;
    }
    let (assigned, already) = s.store.assign_presets(&id, &codes).await?;
    Ok(axum::Json(json!({
        "category_id": id,
        "assigned_count": assigned,
        "already_assigned_count": already,
    })))
}

/// Take a preset out of a category.
#[utoipa::path(
    delete, path = "/preset/categories/{category_id}/presets/{preset_code}", tag = "presets",
    params(
        ("category_id" = String, Path, description = "The category's id"),
        ("preset_code" = String, Path, description = "The preset's code"),
    ),
    responses((status = 204, description = "Unassigned")),
)]
pub async fn unassign(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((id, code)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    writable_category(&s, &acc.id, &id).await?;
    if !s.store.unassign_preset(&id, &code).await? {
        return Err(no_preset(&code));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Deep-copy a category the caller may see: a new category of its own
/// with copies (fresh codes) of up to 50 of the presets.
#[utoipa::path(
    post, path = "/preset/categories/{category_id}/duplicate", tag = "presets",
    params(("category_id" = String, Path, description = "The category's id")),
    request_body = Object,
    responses(
        (status = 201, description = "`{category, preset_count}`", body = Object),
        (status = 409, description = "Name taken", body = crate::error::ErrorBody),
        (status = 429, description = "The preset cap would be exceeded", body = crate::error::ErrorBody),
    ),
)]
pub async fn duplicate(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    body: JsonValue,
) -> ApiResult<Response> {
    let name = name_field(body.0.get("name"), "name")?;
    let source = s
        .store
        .category_visible(&acc.id, &id)
        .await?
        .ok_or_else(|| no_category(&id))?;
    let mut presets = s.store.category_presets(&acc.id, &id).await?;
    presets.truncate(MAX_DUPLICATE);
    let (c, n) = match s
        .store
        .duplicate_category(&acc.id, &name, &source, &presets, preset_cap(&s, &acc))
        .await?
    {
        Ok(r) => r,
        Err(PresetRefusal::CapReached { cap }) => return Err(cap_reached(cap)),
        Err(_) => return Err(name_taken("category", &name)),
    };
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"category": category_json(&s, &c).await?, "preset_count": n})),
    )
        .into_response())
}

async fn share_category_with(
    s: &AppState,
    acc: &Account,
    id: &str,
    group: &str,
    share: bool,
) -> ApiResult<Value> {
    let c = writable_category(s, &acc.id, id).await?;
    let gid = member_group(s, &acc.id, group).await?;
    s.store.set_category_share(&c.id, &gid, share).await?;
    let (mut changed, mut already, mut skipped) = (0, 0, Vec::new());
    for p in s.store.category_presets(&acc.id, &c.id).await? {
        if p.owner_id.as_deref() != Some(acc.id.as_str()) {
            skipped.push(p.code);
            continue;
        }
        if s.store.set_preset_share(&p.code, &gid, share).await? {
            changed += 1;
        } else {
            already += 1;
        }
    }
    let mut out = Map::new();
    if share {
        out.insert("shared_count".into(), json!(changed));
        out.insert("already_shared_count".into(), json!(already));
    } else {
        out.insert("unshared_count".into(), json!(changed));
    }
    out.insert("skipped_preset_codes".into(), json!(skipped));
    Ok(Value::Object(out))
}

/// Share a category and every preset of it the caller owns with a group.
#[utoipa::path(
    post, path = "/preset/categories/{category_id}/share/{group_name}", tag = "presets",
    params(
        ("category_id" = String, Path, description = "The category's id"),
        ("group_name" = String, Path, description = "A group the caller belongs to"),
    ),
    responses(
        (status = 200, description = "`{shared_count, already_shared_count, skipped_preset_codes}`", body = Object),
        (status = 403, description = "Not a member of the group, or no write access", body = crate::error::ErrorBody),
    ),
)]
pub async fn share_category(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((id, group)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(share_category_with(&s, &acc, &id, &group, true).await?))
}

/// Stop sharing a category and its presets with a group.
#[utoipa::path(
    delete, path = "/preset/categories/{category_id}/share/{group_name}", tag = "presets",
    params(
        ("category_id" = String, Path, description = "The category's id"),
        ("group_name" = String, Path, description = "A group the caller belongs to"),
    ),
    responses((status = 200, description = "`{unshared_count, skipped_preset_codes}`", body = Object)),
)]
pub async fn unshare_category(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((id, group)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(share_category_with(&s, &acc, &id, &group, false).await?))
}

/// Applies the presets a job request names (contract §6.1): each
/// instruction's `preset_code` (`swap_options.preset_code` for model swap)
/// must be a preset of the job's kind the caller may see; its fields are
/// the instruction's defaults, the instruction's own fields win, and the
/// code stays in the instruction, so the job's `processing_options` shows
/// both.
pub async fn apply_presets(s: &AppState, account: &str, body: &mut Value, kind: PresetType) -> ApiResult<()> {
    let mut slots: Vec<(String, &mut Value)> = Vec::new();
    match kind {
        PresetType::ModelSwap => {
            if let Some(o) = body.get_mut("swap_options") {
                slots.push(("swap_options".into(), o));
            }
        }
        _ => {
            if let Some(list) = body.get_mut("instructions").and_then(Value::as_array_mut) {
                for (i, ins) in list.iter_mut().enumerate() {
                    slots.push((format!("instructions[{i}]"), ins));
                }
            }
        }
    }
    for (at, slot) in slots {
        let field = format!("{at}.preset_code");
        let code = match slot.get("preset_code") {
            None | Some(Value::Null) => continue,
            Some(Value::String(c)) => c.clone(),
            Some(_) => return Err(bad(&field, "must be a preset code")),
        };
        let p = s
            .store
            .preset_visible(account, &code)
            .await?
            .ok_or_else(|| bad(&field, format!("unknown preset {code}")))?;
        if p.preset_type != kind.as_str() {
            return Err(bad(
                &field,
                format!("preset {code} is a {} preset, not {}", p.preset_type, kind.as_str()),
            ));
        }
        let data: Value = serde_json::from_str(&p.instruction_data)
            .map_err(|e| ApiError::internal(format!("stored preset {code}: {e}")))?;
        *slot = atelier_shared::domain::presets::apply(&data, slot);
    }
    Ok(())
}

/// What one extraction from a text costs (contract §6.9): the
/// per-image extraction price.
fn extraction_price(s: &AppState) -> atelier_shared::domain::Credits {
    atelier_shared::domain::credits::PriceTable::flat(s.config.prices.extraction)
}

/// Draft an instruction from a description: the fields and enums of the
/// type its words name, the rest of it in `prompt`. Nothing is saved.
#[utoipa::path(
    post, path = "/preset/extract-from-text", tag = "presets",
    request_body = Object,
    responses(
        (status = 200, description = "`{instruction_data, suggested_name, suggested_description, file_id: null}`", body = Object),
        (status = 400, description = "No text, or an unknown type", body = crate::error::ErrorBody),
        (status = 402, description = "Not enough credits (1 credit)", body = crate::error::ErrorBody),
    ),
)]
pub async fn extract_from_text(
    State(s): State<AppState>,
    Caller(acc): Caller,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let b = &body.0;
    let text = b
        .get("text")
        .and_then(Value::as_str)
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| bad("text", "is required: a description of 1 to 4000 characters"))?;
    if text.chars().count() > 4000 {
        return Err(bad("text", "must be at most 4000 characters"));
    }
    let t = match b.get("type") {
        None | Some(Value::Null) => PresetType::Flat2Model,
        Some(v) => v.as_str().and_then(PresetType::parse).ok_or_else(|| {
            bad(
                "type",
                "must be create_packshot, flat_2_model, identity_creation or model_swap",
            )
        })?,
    };
    let (billing, _) = s.store.billing_owner(&acc.id).await?;
    if !s
        .store
        .charge_now(&billing, extraction_price(&s), "preset extraction from text")
        .await?
    {
        return Err(ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_credits",
            format!(
                "Insufficient credits: an extraction costs {} credit(s)",
                extraction_price(&s).as_f64()
            ),
        )
        .with("required_credits", extraction_price(&s).as_f64()));
    }
    let e = atelier_shared::domain::extract::from_text(text, t);
    Ok(axum::Json(json!({
        "instruction_data": e.instruction_data,
        "suggested_name": e.suggested_name,
        "suggested_description": e.suggested_description,
        "file_id": null,
    })))
}

/// The preset type of an extraction request: `type`, or `default` when
/// absent (`None`: required).
fn preset_type(v: Option<&Value>, default: Option<PresetType>) -> ApiResult<PresetType> {
    const TYPES: &str = "create_packshot, flat_2_model, identity_creation or model_swap";
    match (v, default) {
        (None | Some(Value::Null), Some(d)) => Ok(d),
        (None | Some(Value::Null), None) => Err(bad("type", format!("is required: {TYPES}"))),
        (Some(v), _) => v
            .as_str()
            .and_then(PresetType::parse)
            .ok_or_else(|| bad("type", format!("must be {TYPES}"))),
    }
}

/// Measures the uploaded images `file_ids` for a preset of type `t` on the
/// workers (one `preset_extraction` job, one output per image, each
/// charged `prices.extraction` when it completes) and waits for the drafts,
/// in order, up to `limits.extraction_wait_ms`. `field(i)` names image
/// `i` in errors. Past the wait the job is cancelled (nothing is charged)
/// and the answer is `504`.
async fn extract_images(
    s: &AppState,
    acc: &Account,
    headers: &axum::http::HeaderMap,
    t: PresetType,
    file_ids: Vec<String>,
    field: impl Fn(usize) -> String,
) -> ApiResult<Vec<atelier_shared::domain::extraction::ExtractionReport>> {
    use atelier_shared::db::jobs::{Admission, NewJob};
    use atelier_shared::domain::extraction::{ExtractionReport, ExtractionSpec};
    use atelier_shared::domain::{JobSpec, JobStatus};
    let (billing, _) = s.store.billing_owner(&acc.id).await?;
    let trace = crate::admission::job_trace(headers);
    let admission = s
        .store
        .create_job(NewJob {
            account_id: &acc.id,
            billing_account_id: &billing,
            project_id: None,
            spec: JobSpec::PresetExtraction(ExtractionSpec {
                preset_type: t,
                file_ids: file_ids.clone(),
            }),
            prices: &s.config.prices,
            max_attempts: s.config.scheduler.retry.max_attempts,
            active_job_cap: None,
            traceparent: Some(trace.to_string()),
        })
        .await?;
    // Admission checks the files (the caller's, uploaded) before anything
    // else; the spec lists them in the request's order.
    let Admission::Created { job_id, .. } = admission else {
        return Err(crate::admission::refusal_naming_files(admission, &field));
    };
    let limit = std::time::Duration::from_millis(s.config.limits.extraction_wait_ms);
    let mut job = crate::routes::identities::wait_for_end(s, &job_id, limit).await?;
    if !job.status.is_terminal() {
        match s.store.abort_job(&acc.id, &job_id).await? {
            Some(a) if a.aborted => {
                s.signal_abort(&a.running).await;
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "extraction_timed_out",
                    format!(
                        "No worker finished the analysis within {} s; it was cancelled and nothing was charged. Try again later.",
                        limit.as_secs()
                    ),
                )
                .with("job_id", job_id));
            }
            // It ended between the wait and the abort.
            _ => {
                job = s
                    .store
                    .job(&job_id)
                    .await?
                    .ok_or_else(|| ApiError::internal(format!("job {job_id} vanished")))?;
            }
        }
    }
    let mut outputs = s.store.latest_outputs(&job_id).await?;
    outputs.sort_by_key(|o| o.instruction_index);
    if job.status != JobStatus::Completed {
        let failed = outputs
            .iter()
            .find(|o| o.error_message.is_some() || o.last_error.is_some());
        let message = failed
            .and_then(|o| o.error_message.clone().or_else(|| o.last_error.clone()))
            .unwrap_or_else(|| format!("the analysis ended {}", job.status.as_str()));
        let index = failed.map(|o| o.instruction_index as usize).unwrap_or(0);
        if atelier_shared::domain::extraction::is_image_problem(&message) {
            return Err(bad(&field(index), message));
        }
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "extraction_failed",
            format!("The analysis failed: {message}"),
        )
        .with("job_id", job_id));
    }
    outputs
        .iter()
        .map(|o| {
            o.input_description
                .as_deref()
                .and_then(|d| serde_json::from_str::<ExtractionReport>(d).ok())
                .ok_or_else(|| {
                    ApiError::internal(format!("extraction {job_id}: output {} has no draft", o.id))
                })
        })
        .collect()
}

/// Draft an instruction from a reference image: measured on the workers
/// (the product's mask, palette, backdrop, shadow and light; a face's
/// shape, skin, expression and hair), only what was measured. Nothing is
/// saved.
#[utoipa::path(
    post, path = "/preset/extract-from-image", tag = "presets",
    request_body = Object,
    responses(
        (status = 200, description = "`{instruction_data, suggested_name, suggested_description, file_id, measurements}` (`measurements`: the figures behind the fields)", body = Object),
        (status = 400, description = "No file_id, an unknown type, or an image that cannot be analysed (the reason)", body = crate::error::ErrorBody),
        (status = 402, description = "Not enough credits (1 credit)", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown file_id", body = crate::error::ErrorBody),
        (status = 504, description = "No worker finished the analysis in time (nothing charged)", body = crate::error::ErrorBody),
    ),
)]
pub async fn extract_from_image(
    State(s): State<AppState>,
    Caller(acc): Caller,
    headers: axum::http::HeaderMap,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let b = &body.0;
    let file_id = b
        .get("file_id")
        .and_then(Value::as_str)
        .filter(|f| !f.is_empty())
        .ok_or_else(|| bad("file_id", "is required: the id of an uploaded image"))?
        .to_string();
    let t = preset_type(b.get("type"), Some(PresetType::Flat2Model))?;
    let mut reports =
        extract_images(&s, &acc, &headers, t, vec![file_id.clone()], |_| "file_id".into()).await?;
    let r = reports
        .pop()
        .ok_or_else(|| ApiError::internal("an extraction without its draft"))?;
    Ok(axum::Json(json!({
        "instruction_data": r.instruction_data,
        "suggested_name": r.suggested_name,
        "suggested_description": r.suggested_description,
        "file_id": file_id,
        // An extension: the figures every field was drawn from.
        "measurements": r.measurements,
    })))
}

/// The label of a preset type in generated names.
fn type_label(t: PresetType) -> &'static str {
    match t {
        PresetType::CreatePackshot => "Packshot",
        PresetType::Flat2Model => "On-model",
        PresetType::IdentityCreation => "Identity",
        PresetType::ModelSwap => "Model swap",
    }
}

/// Build a category from 2–6 images: one preset per image, all of `type`,
/// created with the category in one transaction. Traits measured alike in
/// every image read identically; the category's description names them.
#[utoipa::path(
    post, path = "/preset/categories/extract-from-images", tag = "presets",
    request_body = Object,
    responses(
        (status = 201, description = "`{category, presets}`", body = Object),
        (status = 400, description = "Not 2–6 distinct file ids, an unknown type, a bad name, or an image that cannot be analysed", body = crate::error::ErrorBody),
        (status = 402, description = "Not enough credits (1 per image)", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown file id", body = crate::error::ErrorBody),
        (status = 409, description = "Category name taken", body = crate::error::ErrorBody),
        (status = 429, description = "preset_cap_reached", body = crate::error::ErrorBody),
        (status = 504, description = "No worker finished the analysis in time (nothing charged)", body = crate::error::ErrorBody),
    ),
)]
pub async fn extract_category(
    State(s): State<AppState>,
    Caller(acc): Caller,
    headers: axum::http::HeaderMap,
    body: JsonValue,
) -> ApiResult<Response> {
    use atelier_shared::db::presets::PresetDraft;
    use atelier_shared::domain::extraction::{MAX_IMAGES, leaf_paths, shared_traits};
    let b = &body.0;
    let ids = codes_field(b.get("file_ids"), "file_ids")?;
    if !(2..=MAX_IMAGES).contains(&ids.len()) {
        return Err(bad(
            "file_ids",
            format!("must hold 2 to {MAX_IMAGES} uploaded image ids"),
        ));
    }
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            return Err(bad(&format!("file_ids[{i}]"), format!("{id} is listed twice")));
        }
    }
    let t = preset_type(b.get("type"), None)?;
    let explicit_name = match b.get("name") {
        None | Some(Value::Null) => None,
        v => Some(name_field(v, "name")?),
    };
    let explicit_description = opt_text(b.get("description"), "description", 2000)?;
    // What can be refused is refused before the images are measured (and
    // charged); a race past these checks is still refused by the insert.
    if let Some(n) = &explicit_name
        && s.store.category_name_taken(&acc.id, n).await?
    {
        return Err(name_taken("category", n));
    }
    let cap = preset_cap(&s, &acc);
    if let Some(cap) = cap {
        let held = s.store.preset_count(&acc.id).await?;
        if held + ids.len() as i64 > cap {
            return Err(cap_reached(cap));
        }
    }
    let reports = extract_images(&s, &acc, &headers, t, ids.clone(), |i| format!("file_ids[{i}]")).await?;
    let drafts: Vec<Value> = reports.iter().map(|r| r.instruction_data.clone()).collect();
    let shared = shared_traits(&drafts);
    let c = checks(&s);
    for (i, d) in drafts.iter().enumerate() {
        check_instruction(t, d, &c).map_err(|e| {
            ApiError::internal(format!(
                "the draft of file_ids[{i}] does not pass its own validator: {}",
                e.iter().map(|f| format!("{}: {}", f.field.as_deref().unwrap_or("-"), f.message)).collect::<Vec<_>>().join("; ")
            ))
        })?;
    }
    let n = reports.len();
    let common_name = reports
        .first()
        .and_then(|r| r.suggested_name.clone())
        .filter(|first| reports.iter().all(|r| r.suggested_name.as_ref() == Some(first)));
    let generated = format!(
        "{} look from {n} images",
        common_name.as_deref().unwrap_or(type_label(t))
    );
    let all_keys: Vec<String> = {
        let mut k: Vec<String> = Vec::new();
        for d in &drafts {
            leaf_paths(d, &mut k);
        }
        k
    };
    let per_image: Vec<&String> = all_keys.iter().filter(|k| !shared.contains(k)).collect();
    let description = explicit_description.unwrap_or_else(|| {
        let shared_words: Vec<String> = shared
            .iter()
            .map(|p| format!("{p} = {}", words_at(&drafts[0], p)))
            .collect();
        let mut text = format!("Drawn from {n} images.");
        if !shared_words.is_empty() {
            text.push_str(&format!(" The same in every image: {}.", shared_words.join(", ")));
        }
        if !per_image.is_empty() {
            let names: Vec<&str> = per_image.iter().map(|s| s.as_str()).collect();
            text.push_str(&format!(" Worded per image: {}.", names.join(", ")));
        }
        text
    });
    let presets: Vec<PresetDraft> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| PresetDraft {
            name: format!(
                "{} ({}/{n})",
                r.suggested_name.as_deref().unwrap_or(type_label(t)),
                i + 1
            )
            .chars()
            .take(128)
            .collect(),
            description: r.suggested_description.clone(),
            preset_type: t.as_str().to_string(),
            instruction_data: r.instruction_data.to_string(),
        })
        .collect();
    // A generated name the caller already uses gets a number; an explicit
    // one is a 409.
    let mut attempt = 1;
    let made = loop {
        let name = match (&explicit_name, attempt) {
            (Some(n), _) => n.clone(),
            (None, 1) => generated.clone(),
            (None, k) => format!("{generated} ({k})"),
        };
        match s
            .store
            .category_with_presets(&acc.id, &name, Some(&description), None, &presets, cap)
            .await?
        {
            Ok(made) => break made,
            Err(PresetRefusal::NameTaken) if explicit_name.is_none() && attempt < 20 => attempt += 1,
            Err(PresetRefusal::NameTaken) => return Err(name_taken("category", &name)),
            Err(PresetRefusal::CapReached { cap }) => return Err(cap_reached(cap)),
            Err(PresetRefusal::NoCategory(id)) => return Err(no_category(&id)),
        }
    };
    let (category, codes) = made;
    let mut out = Vec::with_capacity(codes.len());
    for code in &codes {
        let p = s
            .store
            .preset_visible(&acc.id, code)
            .await?
            .ok_or_else(|| ApiError::internal(format!("preset {code} vanished")))?;
        out.push(preset_json(&s, &acc.id, &p).await?);
    }
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "category": category_json(&s, &category).await?,
            "presets": out,
            "shared_traits": shared,
        })),
    )
        .into_response())
}

/// The value at `path` of a draft, as words.
fn words_at(d: &Value, path: &str) -> String {
    match atelier_shared::domain::extraction::value_at(d, path) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "null".into(),
    }
}
