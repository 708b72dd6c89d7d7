//! The Models API's model records (contract §8, Scenario-compatible):
//! create, list (pagination tokens, filters), get, get-bulk, update,
//! delete, tags, description, examples. camelCase JSON; a single model is
//! wrapped as `{"model": …}`; every success is `200`. Training (§8.3–8.5)
//! builds on these records.

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonValue, Query};
use crate::routes::trainings;
use crate::state::AppState;
use atelier_shared::db::api_models::{
    ApiModelImage, ApiModelQuery, ApiModelRow, AttachImages, MAX_MODEL_IMAGES,
};
use atelier_shared::db::trainings::TrainingRow;
use atelier_shared::time::{iso8601, now_ms};
use axum::extract::{Path, State};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The model types implemented here (§8.1) and the base model each runs on.
const TYPES: [(&str, &str); 4] = [
    ("sd-1_5", "stable-diffusion-v1-5"),
    ("sd-xl-lora", "stable-diffusion-xl-base-1.0"),
    ("flux.1-lora", "flux.1-dev"),
    ("flux.1-composition", "flux.1-dev"),
];
const PRIVACY: [&str; 3] = ["private", "public", "unlisted"];
const STATUSES: [&str; 6] = [
    "new",
    "training",
    "trained",
    "failed",
    "copying",
    "training-canceled",
];
const MAX_NAME: usize = 64;
const MAX_SHORT_DESCRIPTION: usize = 256;
const MAX_DESCRIPTION: usize = 20_000;
const MAX_TAG: usize = 64;
const MAX_TAGS: usize = 100;

fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(Some(field), message, "body")
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("Model {id} not found"))
}

/// A live model of the account (404 otherwise).
pub(crate) async fn model_of(s: &AppState, account: &str, id: &str) -> ApiResult<ApiModelRow> {
    s.store
        .api_model(account, id)
        .await?
        .ok_or_else(|| not_found(id))
}

fn extra_of(row: &ApiModelRow) -> Map<String, Value> {
    serde_json::from_str(&row.extra).unwrap_or_default()
}

fn tags_of(row: &ApiModelRow) -> Vec<String> {
    serde_json::from_str(&row.tags).unwrap_or_default()
}

/// The §8.1 model object of a row, with its first training images.
fn model_json(row: &ApiModelRow, images: Vec<Value>, training: Option<&TrainingRow>) -> Value {
    let extra = extra_of(row);
    let flux = row.model_type.starts_with("flux.1");
    json!({
        "id": row.id,
        "name": row.name,
        "shortDescription": row.short_description,
        "type": row.model_type,
        "status": row.status,
        "privacy": row.privacy,
        "source": "scenario",
        "capabilities": ["txt2img", "img2img"],
        "custom": false,
        "collectionIds": extra.get("collectionIds").cloned().unwrap_or(json!([])),
        "exampleAssetIds": [],
        "tags": tags_of(row),
        "baseModelId": row.base_model_id,
        "compliantModelIds": if flux { json!(["flux.1-dev"]) } else { json!([]) },
        "concepts": extra.get("concepts").cloned().unwrap_or(json!([])),
        "class": extra.get("classSlug").and_then(Value::as_str).map(|s| json!({"slug": s})),
        "parameters": extra.get("parameters").cloned().unwrap_or(json!({})),
        "epoch": row.epoch,
        "trainingImages": images,
        "trainingProgress": training.filter(|t| t.is_open()).map(trainings::progress_json),
        "trainingStats": training.map(training_stats),
        "accessRestrictions": 0,
        "createdAt": iso8601(row.created_at),
        "updatedAt": iso8601(row.updated_at),
    })
}

/// `trainingStats` (§8.1): when the model's last training started and
/// ended, how long it waited and how long it trained (ms).
fn training_stats(t: &TrainingRow) -> Value {
    let queue = t.started_at.map(|st| (st - t.created_at).max(0));
    let train = match (t.started_at, t.finalized_at) {
        (Some(st), Some(end)) => Some((end - st).max(0)),
        _ => None,
    };
    json!({
        "startedAt": t.started_at.map(iso8601),
        "endedAt": t.finalized_at.map(iso8601),
        "queueDuration": queue,
        "trainDuration": train,
    })
}

/// A training image as the API shows it.
async fn image_json(s: &AppState, img: &ApiModelImage) -> ApiResult<Value> {
    Ok(json!({
        "id": img.id,
        "name": img.name,
        "automaticCaptioning": false,
        "description": "",
        "downloadUrl": s.object_url(&img.object_key, &img.content_type, s.result_ttl()).await?,
        "createdAt": iso8601(img.created_at),
    }))
}

/// The model object with its first three training images.
async fn full(s: &AppState, row: &ApiModelRow) -> ApiResult<Value> {
    let (first, _) = s.store.api_model_images(&row.id, 3).await?;
    let mut images = Vec::with_capacity(first.len());
    for img in &first {
        images.push(image_json(s, img).await?);
    }
    // Only a model that has been trained has a training to show.
    let training = match row.status.as_str() {
        "new" | "copying" => None,
        _ => s.store.latest_training(&row.account_id, &row.id).await?,
    };
    Ok(model_json(row, images, training.as_ref()))
}

async fn wrapped(s: &AppState, row: &ApiModelRow) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(json!({ "model": full(s, row).await? })))
}

/// A bounded string field: trimmed, at most `max` characters, no control
/// characters.
fn text(v: &Value, field: &str, max: usize) -> ApiResult<String> {
    let s = v
        .as_str()
        .ok_or_else(|| bad(field, "must be a string"))?
        .trim()
        .to_string();
    if s.chars().count() > max {
        return Err(bad(field, format!("must be at most {max} characters")));
    }
    if s.chars().any(char::is_control) {
        return Err(bad(field, "must not contain control characters"));
    }
    Ok(s)
}

fn string_list(v: &Value, field: &str, max_items: usize) -> ApiResult<Vec<String>> {
    let items = v
        .as_array()
        .ok_or_else(|| bad(field, "must be an array of strings"))?;
    if items.len() > max_items {
        return Err(bad(field, format!("must hold at most {max_items} items")));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, x)| text(x, &format!("{field}[{i}]"), MAX_TAG))
        .collect()
}

/// Applies the create/update fields of `body` to `row` (`creating`: the
/// fields only create takes, and `type` is required).
fn apply(row: &mut ApiModelRow, body: &Value, creating: bool) -> ApiResult<()> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request(None, "the body must be a JSON object", "body"))?;
    let mut extra = extra_of(row);
    if let Some(v) = obj.get("type") {
        let t = text(v, "type", 64)?;
        let Some((_, base)) = TYPES.iter().find(|(name, _)| *name == t) else {
            return Err(bad(
                "type",
                format!(
                    "{t:?} is not a model type this server trains; use one of {}",
                    TYPES.map(|(n, _)| n).join(", ")
                ),
            ));
        };
        if !creating && row.status != "new" && t != row.model_type {
            return Err(bad(
                "type",
                "the type can only change while the model is new",
            ));
        }
        row.model_type = t;
        if row.base_model_id.is_none() || creating {
            row.base_model_id = Some(base.to_string());
        }
    } else if creating {
        return Err(bad("type", "is required"));
    }
    if let Some(v) = obj.get("name") {
        row.name = text(v, "name", MAX_NAME)?;
    }
    if let Some(v) = obj.get("shortDescription") {
        row.short_description = text(v, "shortDescription", MAX_SHORT_DESCRIPTION)?;
    }
    if let Some(v) = obj.get("baseModelId") {
        row.base_model_id = match v {
            Value::Null => TYPES
                .iter()
                .find(|(n, _)| *n == row.model_type)
                .map(|(_, b)| b.to_string()),
            v => Some(text(v, "baseModelId", 128)?),
        };
    }
    if let Some(v) = obj.get("classSlug") {
        match v {
            Value::Null => {
                extra.remove("classSlug");
            }
            v => {
                extra.insert("classSlug".into(), json!(text(v, "classSlug", 128)?));
            }
        }
    }
    if let Some(v) = obj.get("collectionIds") {
        extra.insert(
            "collectionIds".into(),
            json!(string_list(v, "collectionIds", 100)?),
        );
    }
    if let Some(v) = obj.get("concepts") {
        let items = v
            .as_array()
            .ok_or_else(|| bad("concepts", "must be an array"))?;
        for (i, c) in items.iter().enumerate() {
            let at = |f: &str| format!("concepts[{i}].{f}");
            c.get("modelId")
                .and_then(Value::as_str)
                .filter(|s| !s.trim().is_empty())
                .ok_or_else(|| bad(&at("modelId"), "is required"))?;
            let scale = c
                .get("scale")
                .and_then(Value::as_f64)
                .ok_or_else(|| bad(&at("scale"), "is required (a number)"))?;
            if !(-2.0..=2.0).contains(&scale) {
                return Err(bad(&at("scale"), "must be between -2 and 2"));
            }
        }
        extra.insert("concepts".into(), v.clone());
    }
    if let Some(v) = obj.get("parameters") {
        if !v.is_object() {
            return Err(bad("parameters", "must be an object"));
        }
        extra.insert("parameters".into(), v.clone());
    }
    if !creating {
        if let Some(v) = obj.get("privacy") {
            let p = text(v, "privacy", 16)?;
            if !PRIVACY.contains(&p.as_str()) {
                return Err(bad(
                    "privacy",
                    format!("must be one of {}", PRIVACY.join(", ")),
                ));
            }
            row.privacy = p;
        }
        if let Some(v) = obj.get("epoch") {
            row.epoch = match v {
                Value::Null => None,
                v => Some(text(v, "epoch", 16)?),
            };
        }
    }
    if let Some(Value::Object(params)) = extra.get("parameters") {
        atelier_shared::domain::training::validate(&row.model_type, params)
            .map_err(ApiError::invalid)?;
    }
    if row.model_type.ends_with("-composition")
        && extra
            .get("concepts")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
    {
        return Err(bad(
            "concepts",
            "a composition model needs at least one concept",
        ));
    }
    row.extra = Value::Object(extra).to_string();
    Ok(())
}

/// Create a model (`status: new`).
#[utoipa::path(
    post, path = "/v1/models", tag = "models",
    request_body = Object,
    responses((status = 200, description = "`{model}`", body = Object)),
)]
pub async fn create(
    State(s): State<AppState>,
    Caller(acc): Caller,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let now = now_ms();
    let mut row = ApiModelRow {
        id: format!("model_{}", atelier_shared::domain::ids::base32_lower(20)),
        account_id: acc.id.clone(),
        name: String::new(),
        short_description: String::new(),
        model_type: String::new(),
        status: "new".into(),
        privacy: "private".into(),
        base_model_id: None,
        epoch: None,
        tags: "[]".into(),
        extra: "{}".into(),
        description: None,
        created_at: now,
        updated_at: now,
    };
    apply(&mut row, &body.0, true)?;
    s.store.insert_api_model(&row).await?;
    wrapped(&s, &row).await
}

/// Query of `GET /v1/models`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    /// 1–100 (default 50).
    pub page_size: Option<i64>,
    /// `nextPaginationToken` of the previous page.
    pub pagination_token: Option<String>,
    pub privacy: Option<String>,
    pub status: Option<String>,
    #[serde(rename = "type")]
    pub model_type: Option<String>,
    /// Comma-separated; a model must have every one.
    pub tags: Option<String>,
}

fn token_of(row: &ApiModelRow) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}:{}", row.created_at, row.id))
}

fn position(token: &str) -> ApiResult<(i64, String)> {
    let wrong = || {
        ApiError::bad_request(
            Some("paginationToken"),
            "is not a token this server gave",
            "query",
        )
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| wrong())?;
    let raw = String::from_utf8(raw).map_err(|_| wrong())?;
    let (at, id) = raw.split_once(':').ok_or_else(wrong)?;
    Ok((at.parse().map_err(|_| wrong())?, id.to_string()))
}

/// The caller's models, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelPage {
    #[schema(value_type = Vec<Object>)]
    pub models: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_pagination_token: Option<String>,
}

/// List the caller's models (filters, pagination tokens).
#[utoipa::path(
    get, path = "/v1/models", tag = "models",
    params(ListQuery),
    responses((status = 200, description = "A page of models", body = ModelPage)),
)]
pub async fn list(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<ModelPage>> {
    page(&s, Some(&acc.id), q).await
}

/// List every account's public models (their records only: no training
/// images, no training progress).
#[utoipa::path(
    get, path = "/v1/models/public", tag = "models",
    params(ListQuery),
    responses((status = 200, description = "A page of public models", body = ModelPage)),
)]
pub async fn list_public(
    State(s): State<AppState>,
    Caller(_caller): Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<ModelPage>> {
    page(&s, None, q).await
}

/// A page of `owner`'s models (`None`: the public ones of every account).
async fn page(s: &AppState, owner: Option<&str>, q: ListQuery) -> ApiResult<axum::Json<ModelPage>> {
    let page_size = q.page_size.unwrap_or(50);
    if !(1..=100).contains(&page_size) {
        return Err(ApiError::bad_request(
            Some("pageSize"),
            "must be between 1 and 100",
            "query",
        ));
    }
    let check = |v: &Option<String>, field: &str, allowed: &[&str]| -> ApiResult<()> {
        match v {
            Some(x) if !allowed.contains(&x.as_str()) => Err(ApiError::bad_request(
                Some(field),
                format!("must be one of {}", allowed.join(", ")),
                "query",
            )),
            _ => Ok(()),
        }
    };
    check(&q.privacy, "privacy", &PRIVACY)?;
    check(&q.status, "status", &STATUSES)?;
    check(&q.model_type, "type", &TYPES.map(|(n, _)| n))?;
    let tags: Vec<String> = q
        .tags
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .take(MAX_TAGS)
        .collect();
    let query = ApiModelQuery {
        page_size,
        after: q.pagination_token.as_deref().map(position).transpose()?,
        privacy: q.privacy,
        status: q.status,
        model_type: q.model_type,
        tags,
    };
    let mut rows = s.store.api_models(owner, &query).await?;
    let more = rows.len() as i64 > page_size;
    rows.truncate(page_size as usize);
    let mut models = Vec::with_capacity(rows.len());
    for row in &rows {
        models.push(match owner {
            Some(_) => full(s, row).await?,
            None => model_json(row, Vec::new(), None),
        });
    }
    Ok(axum::Json(ModelPage {
        next_pagination_token: if more {
            rows.last().map(token_of)
        } else {
            None
        },
        models,
    }))
}

/// Retrieve a model.
#[utoipa::path(
    get, path = "/v1/models/{modelId}", tag = "models",
    params(("modelId" = String, Path, description = "The model's id")),
    responses((status = 200, description = "`{model}`", body = Object)),
)]
pub async fn read(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let row = model_of(&s, &acc.id, &id).await?;
    wrapped(&s, &row).await
}

/// Read-modify-write of one model, retried when a concurrent write won.
async fn modify(
    s: &AppState,
    account: &str,
    id: &str,
    mut change: impl FnMut(&mut ApiModelRow) -> ApiResult<()>,
) -> ApiResult<ApiModelRow> {
    for _ in 0..5 {
        let mut row = s
            .store
            .api_model(account, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        let seen = row.updated_at;
        change(&mut row)?;
        row.updated_at = now_ms().max(seen + 1);
        if s.store.update_api_model(&row, seen).await? {
            return Ok(row);
        }
    }
    Err(ApiError::conflict(
        "busy",
        "The model is being changed; try again",
    ))
}

/// Update a model (`type` only while `status` is `new`).
#[utoipa::path(
    put, path = "/v1/models/{modelId}", tag = "models",
    params(("modelId" = String, Path, description = "The model's id")),
    request_body = Object,
    responses((status = 200, description = "`{model}`", body = Object)),
)]
pub async fn update(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let row = modify(&s, &acc.id, &id, |row| apply(row, &body.0, false)).await?;
    wrapped(&s, &row).await
}

/// Delete a model (soft; refused while it trains).
#[utoipa::path(
    delete, path = "/v1/models/{modelId}", tag = "models",
    params(("modelId" = String, Path, description = "The model's id")),
    responses(
        (status = 200, description = "`{}`", body = Object),
        (status = 409, description = "The model is training", body = crate::error::ErrorBody),
    ),
)]
pub async fn delete(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let row = model_of(&s, &acc.id, &id).await?;
    if row.status == "training" {
        return Err(ApiError::conflict(
            "model_training",
            "The model is training: cancel the training first",
        ));
    }
    if !s.store.delete_api_model(&acc.id, &id).await? {
        return Err(not_found(&id));
    }
    // Its trained weights (its own trainings' and those it was copied
    // with) and frozen datasets go with it.
    let mut objects = s.store.training_objects(&id).await?;
    if let Some(w) = extra_of(&row).get("weights").and_then(Value::as_array) {
        objects.extend(
            w.iter()
                .filter_map(|w| w["key"].as_str().map(str::to_string)),
        );
    }
    s.erase(&objects).await;
    Ok(axum::Json(json!({})))
}

/// Fetch up to 100 of the caller's models by id (unknown ids omitted).
#[utoipa::path(
    post, path = "/v1/models/get-bulk", tag = "models",
    request_body = Object,
    responses((status = 200, description = "`{models}`", body = Object)),
)]
pub async fn get_bulk(
    State(s): State<AppState>,
    Caller(acc): Caller,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let ids = string_list(
        body.0.get("modelIds").unwrap_or(&Value::Null),
        "modelIds",
        100,
    )?;
    let mut models = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for id in ids.iter().filter(|id| seen.insert(id.as_str())) {
        if let Some(row) = s.store.api_model(&acc.id, id).await? {
            models.push(full(&s, &row).await?);
        }
    }
    Ok(axum::Json(json!({ "models": models })))
}

/// Add and remove tags; with `strict`, adding a present tag or removing a
/// missing one is a 400 and nothing changes.
#[utoipa::path(
    put, path = "/v1/models/{modelId}/tags", tag = "models",
    params(("modelId" = String, Path, description = "The model's id")),
    request_body = Object,
    responses((status = 200, description = "`{added, deleted}`", body = Object)),
)]
pub async fn tags(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let list = |f: &str| match body.0.get(f) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => string_list(v, f, MAX_TAGS),
    };
    let (add, del) = (list("add")?, list("delete")?);
    let strict = body
        .0
        .get("strict")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let (mut added, mut deleted) = (Vec::new(), Vec::new());
    modify(&s, &acc.id, &id, |row| {
        let mut tags = tags_of(row);
        added.clear();
        deleted.clear();
        for t in &add {
            if tags.contains(t) {
                if strict {
                    return Err(bad("add", format!("the model already has the tag {t:?}")));
                }
            } else if !t.is_empty() {
                tags.push(t.clone());
                added.push(t.clone());
            }
        }
        for t in &del {
            match tags.iter().position(|x| x == t) {
                Some(i) => {
                    tags.remove(i);
                    deleted.push(t.clone());
                }
                None if strict => {
                    return Err(bad("delete", format!("the model has no tag {t:?}")));
                }
                None => {}
            }
        }
        if tags.len() > MAX_TAGS {
            return Err(bad("add", format!("a model has at most {MAX_TAGS} tags")));
        }
        row.tags = json!(tags).to_string();
        Ok(())
    })
    .await?;
    Ok(axum::Json(json!({"added": added, "deleted": deleted})))
}

fn description_json(row: &ApiModelRow) -> axum::Json<Value> {
    axum::Json(json!({
        "description": {"value": row.description.clone().unwrap_or_default(), "assets": [], "models": []}
    }))
}

/// The model's Markdown description.
#[utoipa::path(
    get, path = "/v1/models/{modelId}/description", tag = "models",
    params(("modelId" = String, Path, description = "The model's id")),
    responses((status = 200, description = "`{description: {value, assets, models}}`", body = Object)),
)]
pub async fn description(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let row = model_of(&s, &acc.id, &id).await?;
    Ok(description_json(&row))
}

/// Set (a string) or clear (`null`) the model's description.
#[utoipa::path(
    put, path = "/v1/models/{modelId}/description", tag = "models",
    params(("modelId" = String, Path, description = "The model's id")),
    request_body = Object,
    responses((status = 200, description = "`{description: {value, assets, models}}`", body = Object)),
)]
pub async fn set_description(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let value = match body.0.get("description") {
        Some(Value::Null) => None,
        Some(Value::String(d)) if d.chars().count() <= MAX_DESCRIPTION => Some(d.clone()),
        Some(Value::String(_)) => {
            return Err(bad(
                "description",
                format!("must be at most {MAX_DESCRIPTION} characters"),
            ));
        }
        _ => {
            return Err(bad(
                "description",
                "is required: a string, or null to clear it",
            ));
        }
    };
    let row = modify(&s, &acc.id, &id, |row| {
        row.description = value.clone();
        Ok(())
    })
    .await?;
    Ok(description_json(&row))
}

/// Example assets (none are produced here).
#[utoipa::path(
    get, path = "/v1/models/{modelId}/examples", tag = "models",
    params(("modelId" = String, Path, description = "The model's id")),
    responses((status = 200, description = "`{examples: []}`", body = Object)),
)]
pub async fn examples(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    model_of(&s, &acc.id, &id).await?;
    Ok(axum::Json(json!({"examples": []})))
}

/// One image of an attach request, before it is stored.
struct Incoming {
    asset_id: Option<String>,
    name: String,
    bytes: bytes::Bytes,
}

/// Attach training images: one `assetId`, up to 10 `assetIds` (uploaded
/// files of the caller), or one image as a `data` URL with its `name`; a
/// frozen copy of each is kept with the model.
#[utoipa::path(
    post, path = "/v1/models/{modelId}/training-images", tag = "models",
    params(("modelId" = String, Path, description = "The model's id")),
    request_body = Object,
    responses(
        (status = 200, description = "`{trainingImage}` (or `{trainingImages}` for `assetIds`)", body = Object),
        (status = 400, description = "No form, several forms, more than 10 ids, an asset already attached, or not an image", body = crate::error::ErrorBody),
        (status = 429, description = "The model's dataset is full (`actionLimit`)", body = crate::error::ErrorBody),
    ),
)]
pub async fn add_images(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let b = body
        .0
        .as_object()
        .ok_or_else(|| ApiError::bad_request(None, "the body must be a JSON object", "body"))?;
    model_of(&s, &acc.id, &id).await?;
    if let Some(p) = b.get("preset") {
        let p = text(p, "preset", 16)?;
        if !["default", "style", "subject"].contains(&p.as_str()) {
            return Err(bad("preset", "must be one of default, style, subject"));
        }
    }
    let forms: Vec<&str> = ["assetId", "assetIds", "data"]
        .into_iter()
        .filter(|f| b.get(*f).is_some_and(|v| !v.is_null()))
        .collect();
    if forms.len() != 1 {
        return Err(ApiError::bad_request(
            None,
            format!(
                "send exactly one of assetId, assetIds or data (got {})",
                if forms.is_empty() {
                    "none".to_string()
                } else {
                    forms.join(", ")
                }
            ),
            "body",
        ));
    }
    let many = forms[0] == "assetIds";
    let mut incoming = Vec::new();
    if forms[0] == "data" {
        let url = text(&b["data"], "data", usize::MAX)?;
        let raw = url
            .strip_prefix("data:")
            .and_then(|r| r.split_once(";base64,"))
            .map(|(_, d)| d)
            .ok_or_else(|| bad("data", "must be a data URL (data:<type>;base64,…)"))?;
        let max = usize::try_from(s.config.limits.max_upload_bytes).unwrap_or(usize::MAX);
        if raw.len() / 4 * 3 > max + 3 {
            return Err(bad("data", format!("the image is larger than {max} bytes")));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(raw.as_bytes())
            .map_err(|_| bad("data", "is not valid base64"))?;
        let name = match b.get("name") {
            Some(n) => text(n, "name", 128)?,
            None => String::new(),
        };
        incoming.push(Incoming {
            asset_id: None,
            name,
            bytes: bytes.into(),
        });
    } else {
        let ids = if many {
            string_list(&b["assetIds"], "assetIds", 10)?
        } else {
            vec![text(&b["assetId"], "assetId", 128)?]
        };
        if ids.is_empty() {
            return Err(bad("assetIds", "must not be empty"));
        }
        for (i, a) in ids.iter().enumerate() {
            if ids[..i].contains(a) {
                return Err(bad("assetIds", format!("{a} is listed twice")));
            }
        }
        let files = s.store.files_of(&acc.id, &ids).await?;
        for a in &ids {
            let f = files
                .iter()
                .find(|f| &f.id == a && f.is_uploaded())
                .ok_or_else(|| ApiError::not_found(format!("Asset {a} not found")))?;
            let bytes = s.objects.get(&f.object_key).await.map_err(|e| match e {
                atelier_shared::storage::StorageError::NotFound(_) => {
                    ApiError::not_found(format!("Asset {a} not found"))
                }
                other => other.into(),
            })?;
            incoming.push(Incoming {
                asset_id: Some(a.clone()),
                name: f.filename.clone(),
                bytes,
            });
        }
    }
    // Check every image, then store the copies.
    let mut checked = Vec::with_capacity(incoming.len());
    for (i, img) in incoming.into_iter().enumerate() {
        let field = match (&img.asset_id, many) {
            (Some(_), true) => format!("assetIds[{i}]"),
            (Some(_), false) => "assetId".to_string(),
            (None, _) => "data".to_string(),
        };
        let (ct, ext, _, _) =
            crate::routes::uploads::checked_image(&s, &img.bytes, Some(&field), "body").await?;
        checked.push((img, ct, ext));
    }
    let now = now_ms();
    let mut rows = Vec::with_capacity(checked.len());
    for (img, ct, ext) in checked {
        let key = format!(
            "models/{}/{id}/{}.{ext}",
            acc.id,
            ulid::Ulid::new().to_string().to_lowercase()
        );
        if let Err(e) = s.objects.put(&key, img.bytes, ct).await {
            erase_all(&s, &rows).await;
            return Err(e.into());
        }
        rows.push(ApiModelImage {
            id: format!("asset_{}", atelier_shared::domain::ids::base32_lower(20)),
            model_id: id.clone(),
            asset_id: img.asset_id,
            name: img.name,
            object_key: key,
            content_type: ct.to_string(),
            created_at: now,
        });
    }
    let attached = match s.store.attach_api_model_images(&acc.id, &id, &rows).await {
        Ok(AttachImages::Attached(r)) => r,
        other => {
            erase_all(&s, &rows).await;
            return Err(match other {
                Ok(AttachImages::NoModel) => not_found(&id),
                Ok(AttachImages::AlreadyAttached(a)) => bad(
                    if many { "assetIds" } else { "assetId" },
                    format!("{a} is already a training image of this model"),
                ),
                Ok(AttachImages::Full { held }) => ApiError::too_many(
                    "actionLimit",
                    format!("The model holds {held} training images; at most {MAX_MODEL_IMAGES}"),
                    60,
                ),
                Err(e) => e.into(),
                Ok(AttachImages::Attached(_)) => unreachable!("handled above"),
            });
        }
    };
    let mut shown = Vec::with_capacity(attached.len());
    for img in &attached {
        shown.push(image_json(&s, img).await?);
    }
    Ok(axum::Json(if many {
        json!({ "trainingImages": shown })
    } else {
        json!({ "trainingImage": shown.into_iter().next() })
    }))
}

/// Erases the stored copies of `rows`.
async fn erase_all(s: &AppState, rows: &[ApiModelImage]) {
    let keys: Vec<String> = rows.iter().map(|r| r.object_key.clone()).collect();
    s.erase(&keys).await;
}

/// Detach a training image (its copy is erased).
#[utoipa::path(
    delete, path = "/v1/models/{modelId}/training-images/{trainingImageId}", tag = "models",
    params(
        ("modelId" = String, Path, description = "The model's id"),
        ("trainingImageId" = String, Path, description = "The training image's id"),
    ),
    responses((status = 200, description = "`{}`", body = Object)),
)]
pub async fn delete_image(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((id, image_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let key = s
        .store
        .detach_api_model_image(&acc.id, &id, &image_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Training image {image_id} not found")))?;
    s.erase(&[key]).await;
    Ok(axum::Json(json!({})))
}

/// Duplicate a model: a new id with the same fields, tags, description and
/// training images (each copied again), `status: copying` until the copy is
/// complete, then the source's status (a model in training copies as `new`);
/// a trained model's weights are copied too, so the copy is usable alone.
#[utoipa::path(
    post, path = "/v1/models/{modelId}/copy", tag = "models",
    params(("modelId" = String, Path, description = "The model's id")),
    responses((status = 200, description = "`{model}` of the copy", body = Object)),
)]
pub async fn copy(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let src = model_of(&s, &acc.id, &id).await?;
    let row = duplicate(&s, &acc.id, &src, Map::new()).await?;
    wrapped(&s, &row).await
}

/// Transfer a model to another project (and team): the destination gets a
/// copy with its training images and weights; the original stays.
#[utoipa::path(
    post, path = "/v1/models/{modelId}/transfer", tag = "models",
    params(("modelId" = String, Path, description = "The model's id")),
    request_body = Object,
    responses(
        (status = 200, description = "`{model}` in the destination", body = Object),
        (status = 400, description = "No destinationProjectId", body = crate::error::ErrorBody),
        (status = 403, description = "A team the caller is not a member of", body = crate::error::ErrorBody),
        (status = 404, description = "No such model or project", body = crate::error::ErrorBody),
    ),
)]
pub async fn transfer(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let b = &body.0;
    let project = b
        .get("destinationProjectId")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("destinationProjectId", "is required: a project id"))?;
    let team = match b.get("destinationTeamId") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if !t.trim().is_empty() => Some(t.trim().to_string()),
        Some(_) => return Err(bad("destinationTeamId", "must be a team id")),
    };
    let src = model_of(&s, &acc.id, &id).await?;
    s.store
        .project(&acc.id, project)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Project {project} not found")))?;
    let mut changes = Map::new();
    changes.insert("projectId".into(), json!(project));
    if let Some(team) = team {
        let groups = s.store.account_group_refs(&acc.id).await?;
        let Some((gid, _)) = groups
            .iter()
            .find(|(gid, name)| *gid == team || *name == team)
        else {
            return Err(ApiError::forbidden(format!(
                "you are not a member of team {team}"
            )));
        };
        changes.insert("teamId".into(), json!(gid));
    }
    changes.insert("transferredFrom".into(), json!(src.id));
    let row = duplicate(&s, &acc.id, &src, changes).await?;
    wrapped(&s, &row).await
}

/// The weights file a generation with the model uses: its selected
/// `epoch`, else the last one.
pub(crate) fn selected_weights(row: &ApiModelRow, weights: &[Value]) -> Option<Value> {
    row.epoch
        .as_deref()
        .and_then(|e| weights.iter().find(|w| w["epoch"] == e))
        .or(weights.last())
        .cloned()
}

/// The trained weights a model can use: its latest completed training's,
/// or those it was copied with. `{key, epoch, bytes, contentType}` each,
/// and its trigger word.
pub(crate) async fn model_weights(
    s: &AppState,
    row: &ApiModelRow,
) -> ApiResult<Option<(Vec<Value>, String)>> {
    let trained = s
        .store
        .latest_training(&row.account_id, &row.id)
        .await?
        .filter(|t| t.job_status == atelier_shared::domain::JobStatus::Completed);
    if let Some(t) = trained {
        return Ok(Some((trainings::weights_of(&t), t.trigger_word.clone())));
    }
    let extra = extra_of(row);
    Ok(extra
        .get("weights")
        .and_then(Value::as_array)
        .filter(|w| !w.is_empty())
        .map(|w| {
            (
                w.clone(),
                extra
                    .get("triggerWord")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            )
        }))
}

/// A new model of `account` with everything of `src` (training images and
/// weights copied object by object), `changes` merged into its record.
async fn duplicate(
    s: &AppState,
    account: &str,
    src: &ApiModelRow,
    changes: Map<String, Value>,
) -> ApiResult<ApiModelRow> {
    let now = now_ms();
    let mut row = src.clone();
    row.id = format!("model_{}", atelier_shared::domain::ids::base32_lower(20));
    row.status = "copying".into();
    row.created_at = now;
    row.updated_at = now;
    let mut extra = extra_of(src);
    extra.remove("weights");
    extra.remove("triggerWord");
    extra.extend(changes);
    row.extra = Value::Object(extra.clone()).to_string();
    s.store.insert_api_model(&row).await?;
    let mut written: Vec<String> = Vec::new();
    let failed = |s: &AppState, row: &ApiModelRow, written: Vec<String>| {
        let (s, id) = (s.clone(), row.id.clone());
        async move {
            s.erase(&written).await;
            let _ = s.store.set_api_model_status(&id, "failed").await;
        }
    };
    let mut copies = Vec::new();
    for img in s.store.all_api_model_images(&src.id).await? {
        let bytes = match s.objects.get(&img.object_key).await {
            Ok(b) => b,
            // Detached meanwhile: not part of the copy.
            Err(atelier_shared::storage::StorageError::NotFound(_)) => continue,
            Err(e) => {
                failed(s, &row, written).await;
                return Err(e.into());
            }
        };
        let key = format!(
            "models/{account}/{}/{}",
            row.id,
            img.object_key.rsplit('/').next().unwrap_or("image")
        );
        if let Err(e) = s.objects.put(&key, bytes, &img.content_type).await {
            failed(s, &row, written).await;
            return Err(e.into());
        }
        written.push(key.clone());
        copies.push(ApiModelImage {
            id: format!("asset_{}", atelier_shared::domain::ids::base32_lower(20)),
            model_id: row.id.clone(),
            object_key: key,
            ..img
        });
    }
    match s
        .store
        .attach_api_model_images(account, &row.id, &copies)
        .await?
    {
        AttachImages::Attached(_) => {}
        other => {
            failed(s, &row, written).await;
            return Err(ApiError::internal(format!(
                "copying the training images: {other:?}"
            )));
        }
    }
    // A trained model's weights: copies of its own.
    let mut status = match src.status.as_str() {
        "training" | "copying" => "new".to_string(),
        other => other.to_string(),
    };
    if status == "trained" {
        match model_weights(s, src).await? {
            Some((weights, trigger)) => {
                let mut copied = Vec::with_capacity(weights.len());
                for w in weights {
                    let Some(from) = w["key"].as_str() else {
                        continue;
                    };
                    let ct = w["contentType"]
                        .as_str()
                        .unwrap_or("application/octet-stream");
                    let to = format!(
                        "weights/{account}/{}/{}",
                        row.id,
                        from.rsplit('/').next().unwrap_or("weights")
                    );
                    let copy = match s.objects.get(from).await {
                        Ok(bytes) => s.objects.put(&to, bytes, ct).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = copy {
                        failed(s, &row, written).await;
                        return Err(e.into());
                    }
                    written.push(to.clone());
                    let mut w = w.clone();
                    w["key"] = json!(to);
                    copied.push(w);
                }
                extra.insert("weights".into(), Value::Array(copied));
                extra.insert("triggerWord".into(), json!(trigger));
                let mut r = row.clone();
                r.extra = Value::Object(extra).to_string();
                r.updated_at = now_ms().max(row.updated_at + 1);
                if !s.store.update_api_model(&r, row.updated_at).await? {
                    failed(s, &row, written).await;
                    return Err(ApiError::conflict(
                        "busy",
                        "The copy changed meanwhile; try again",
                    ));
                }
            }
            // Trained but its weights are gone: the copy is not trained.
            None => status = "new".into(),
        }
    }
    s.store.set_api_model_status(&row.id, &status).await?;
    model_of(s, account, &row.id).await
}

// ---------------------------------------------------------------------------
// Training (§8.4, §8.5) and weights.

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct TrainQuery {
    /// Any truthy value: price the training without starting it.
    pub dry_run: Option<String>,
    /// Simulated dataset size for a dry run.
    pub training_images_count: Option<String>,
}

fn truthy(v: Option<&str>) -> bool {
    matches!(
        v.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("" | "1" | "true" | "yes" | "on")
    )
}

/// Start (or, with `dryRun`, price) the training of a model.
#[utoipa::path(
    put, path = "/v1/models/{modelId}/train", tag = "models",
    params(("modelId" = String, Path, description = "The model's id"), TrainQuery),
    request_body = Object,
    responses(
        (status = 200, description = "`{job, model, creativeUnitsCost, creativeUnitsDiscount}`", body = Object),
        (status = 400, description = "No or too few training images, already training, or invalid parameters", body = crate::error::ErrorBody),
        (status = 402, description = "Balance below creativeUnitsCost", body = crate::error::ErrorBody),
        (status = 429, description = "parallel-training cap or relaunch cooldown (remainingSeconds)", body = crate::error::ErrorBody),
    ),
)]
pub async fn train(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    Query(q): Query<TrainQuery>,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
) -> ApiResult<axum::Json<Value>> {
    let row = model_of(&s, &acc.id, &id).await?;
    let dry_run = q.dry_run.is_some() && truthy(q.dry_run.as_deref());
    // The body is optional: none (or `{}`) trains with the stored parameters.
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(None, format!("the body is not valid JSON: {e}"), "body")
        })?
    };
    if !matches!(body, Value::Null | Value::Object(_)) {
        return Err(ApiError::bad_request(
            None,
            "the body must be a JSON object",
            "body",
        ));
    }
    let given = match &body["parameters"] {
        Value::Null => Map::new(),
        Value::Object(m) => m.clone(),
        _ => return Err(bad("parameters", "must be an object")),
    };
    if matches!(row.status.as_str(), "training" | "copying") {
        return Err(ApiError::bad_request(
            None,
            format!("the model is {}: it cannot be trained now", row.status),
            "body",
        ));
    }
    if atelier_shared::domain::training::Family::of(&row.model_type).is_none() {
        return Err(bad(
            "type",
            format!("models of type {} are not trained here", row.model_type),
        ));
    }
    // The model's stored parameters, then the request's.
    let mut params = extra_of(&row)
        .get("parameters")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    params.extend(given);
    atelier_shared::domain::training::validate(&row.model_type, &params)
        .map_err(ApiError::invalid)?;
    let images = s.store.all_api_model_images(&row.id).await?;
    let count = match (dry_run, q.training_images_count.as_deref()) {
        (true, Some(n)) => n.trim().parse::<u32>().map_err(|_| {
            ApiError::bad_request(
                Some("trainingImagesCount"),
                "must be a whole number",
                "query",
            )
        })?,
        _ => u32::try_from(images.len()).unwrap_or(u32::MAX),
    };
    let min = s.config.training.min_images;
    if count == 0 {
        return Err(ApiError::bad_request(
            None,
            "the model has no training images",
            "body",
        ));
    }
    if count < min {
        return Err(ApiError::bad_request(
            None,
            format!("a training needs at least {min} training images; the model has {count}"),
            "body",
        ));
    }
    let resolved = atelier_shared::domain::training::resolve(&row.model_type, &params, count);
    let steps = atelier_shared::domain::training::steps(&row.model_type, &resolved);
    let cost = atelier_shared::domain::training::cost(&row.model_type, steps, &s.config.prices);
    if dry_run {
        return Ok(axum::Json(json!({
            "job": null,
            "model": full(&s, &row).await?,
            "creativeUnitsCost": cost.as_f64(),
            "creativeUnitsDiscount": 0,
        })));
    }
    let trigger_word = resolved
        .get("conceptPrompt")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .unwrap_or_else(atelier_shared::domain::training::trigger_word);
    let (training_id, _) = trainings::start(
        &s,
        &acc,
        &headers,
        trainings::StartRequest {
            api: atelier_shared::domain::training::TrainingApi::Models,
            model_id: &row.id,
            model_type: &row.model_type,
            trigger_word,
            parameters: resolved,
            images: images
                .iter()
                .map(|i| trainings::DatasetImage {
                    object_key: i.object_key.clone(),
                    content_type: i.content_type.clone(),
                })
                .collect(),
        },
    )
    .await?;
    let t = s
        .store
        .training(&acc.id, &training_id)
        .await?
        .ok_or_else(|| ApiError::internal("the started training is not readable"))?;
    let row = model_of(&s, &acc.id, &id).await?;
    Ok(axum::Json(json!({
        "job": trainings::job_json(&t),
        "model": full(&s, &row).await?,
        "creativeUnitsCost": cost.as_f64(),
        "creativeUnitsDiscount": 0,
    })))
}

/// Act on a model's training: `{"action": "cancel"}`.
#[utoipa::path(
    post, path = "/v1/models/{modelId}/train/action", tag = "models",
    params(("modelId" = String, Path, description = "The model's id")),
    request_body = Object,
    responses(
        (status = 200, description = "`{model}` with `status: training-canceled`", body = Object),
        (status = 400, description = "Unknown action", body = crate::error::ErrorBody),
        (status = 409, description = "The model is not training", body = crate::error::ErrorBody),
    ),
)]
pub async fn train_action(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    body: JsonValue,
) -> ApiResult<axum::Json<Value>> {
    let action = body.0.get("action").and_then(Value::as_str).unwrap_or("");
    if action != "cancel" {
        return Err(bad("action", "must be `cancel`"));
    }
    model_of(&s, &acc.id, &id).await?;
    let open = s
        .store
        .latest_training(&acc.id, &id)
        .await?
        .filter(TrainingRow::is_open);
    let Some(t) = open else {
        return Err(ApiError::conflict(
            "not_training",
            "The model is not training",
        ));
    };
    if !trainings::cancel(&s, &acc.id, &t).await? {
        return Err(ApiError::conflict(
            "not_training",
            "The model's training has already ended",
        ));
    }
    let row = model_of(&s, &acc.id, &id).await?;
    wrapped(&s, &row).await
}

/// A job's status (§8.5): trainings started through `PUT …/train`.
#[utoipa::path(
    get, path = "/v1/jobs/{jobId}", tag = "models",
    params(("jobId" = String, Path, description = "The job's id")),
    responses((status = 200, description = "`{job}`", body = Object)),
)]
pub async fn job(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(job_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let t = s
        .store
        .training_of_job(&acc.id, &job_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Job {job_id} not found")))?;
    Ok(axum::Json(json!({ "job": trainings::job_json(&t) })))
}

/// Export a trained model's weights: signed URLs of each epoch's file
/// (the selected `epoch`, else the last, is `url`).
#[utoipa::path(
    post, path = "/v1/models/{modelId}/download", tag = "models",
    params(("modelId" = String, Path, description = "The model's id")),
    responses(
        (status = 200, description = "`{job}` of type `assets-download`, its URLs in `metadata.output`", body = Object),
        (status = 409, description = "The model is not trained", body = crate::error::ErrorBody),
    ),
)]
pub async fn download(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let row = model_of(&s, &acc.id, &id).await?;
    let Some((weights, trigger)) = model_weights(&s, &row).await? else {
        return Err(ApiError::conflict(
            "not_trained",
            "The model has no trained weights",
        ));
    };
    let mut files = Vec::new();
    for w in weights {
        let (Some(key), Some(epoch)) = (w["key"].as_str(), w["epoch"].as_str()) else {
            continue;
        };
        let ct = w["contentType"]
            .as_str()
            .unwrap_or("application/octet-stream");
        files.push(json!({
            "epoch": epoch,
            "bytes": w["bytes"],
            "url": s.object_url(key, ct, s.result_ttl()).await?,
        }));
    }
    let chosen = row
        .epoch
        .as_deref()
        .and_then(|e| files.iter().find(|f| f["epoch"] == e))
        .or(files.last())
        .map(|f| f["url"].clone())
        .unwrap_or(Value::Null);
    let now = iso8601(now_ms());
    Ok(axum::Json(json!({
        "job": {
            "jobId": format!("dl_{}", atelier_shared::domain::ids::base32_lower(16)),
            "jobType": "assets-download",
            "status": "success",
            "progress": 1.0,
            "metadata": {
                "assetIds": [],
                "error": null,
                "input": {"modelId": id},
                "output": {"url": chosen, "files": files, "triggerWord": trigger},
            },
            "statusHistory": [{"status": "success", "date": now}],
            "ownerId": acc.id,
            "authorId": acc.id,
            "createdAt": now,
            "updatedAt": now,
        }
    })))
}
