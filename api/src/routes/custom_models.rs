//! Custom models and their training images (contract §7, seed 001):
//! `/v1/custom-models…`. Field names are the seed's (camelCase); training
//! images are sent as the raw request body and kept in the object store.

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::Json;
use crate::state::AppState;
use atelier_shared::db::custom_models::{
    AddImage, CustomModel, MAX_TRAINING_IMAGES, TrainingImage,
};
use atelier_shared::db::trainings::TrainingRow;
use atelier_shared::time::iso8601;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Largest training image (seed 001: 10 MB).
pub const MAX_TRAINING_IMAGE_BYTES: usize = 10 * 1024 * 1024;

/// A custom model as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomModelView {
    pub id: String,
    pub display_name: String,
    pub custom_model_type: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&CustomModel> for CustomModelView {
    fn from(m: &CustomModel) -> Self {
        CustomModelView {
            id: m.id.clone(),
            display_name: m.display_name.clone(),
            custom_model_type: m.custom_model_type.clone(),
            created_at: iso8601(m.created_at),
            updated_at: iso8601(m.updated_at),
        }
    }
}

/// `201` of a model's creation.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelCreated {
    pub id: String,
    pub display_name: String,
}

/// A training image in a list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingDataItem {
    pub data_id: String,
    pub content_type: String,
    /// Bytes.
    pub size: i64,
    pub created_at: String,
}

impl From<&TrainingImage> for TrainingDataItem {
    fn from(t: &TrainingImage) -> Self {
        TrainingDataItem {
            data_id: t.id.clone(),
            content_type: t.content_type.clone(),
            size: t.size,
            created_at: iso8601(t.created_at),
        }
    }
}

/// `{dataId}`: an upload or a replacement.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataStored {
    pub data_id: String,
}

/// One training image with its bytes.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataWithUrl {
    pub data_id: String,
    /// `data:<type>;base64,…`
    pub data_url: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateModel {
    /// 1–128 characters.
    #[schema(required = true, value_type = String)]
    pub display_name: Option<String>,
    /// Reserved.
    pub custom_model_type: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RenameModel {
    /// The new name (`displayName` is accepted too).
    pub updated_display_name: Option<String>,
    pub display_name: Option<String>,
}

/// A display name: 1–128 characters after trimming, no control characters.
fn display_name(raw: Option<&str>, field: &str) -> ApiResult<String> {
    let name = raw.map(str::trim).unwrap_or("");
    let problem = if name.is_empty() {
        Some("is required and must not be empty")
    } else if name.chars().count() > 128 {
        Some("must be at most 128 characters")
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    };
    match problem {
        Some(p) => Err(ApiError::bad_request(Some(field), p, "body")),
        None => Ok(name.to_string()),
    }
}

fn no_model(id: &str) -> ApiError {
    ApiError::not_found(format!("Model {id} not found"))
}

fn no_data(id: &str) -> ApiError {
    ApiError::not_found(format!("Training image {id} not found"))
}

/// The raw body of an upload, checked: a declared `Content-Type` of
/// `image/webp`, `image/png` or `image/jpeg` (`image/jpg` too), bytes of
/// that type, within the pixel limit. The canonical content type and file
/// extension.
async fn training_bytes(
    s: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<(&'static str, &'static str)> {
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let want = match declared.as_str() {
        "image/webp" => "image/webp",
        "image/png" => "image/png",
        "image/jpeg" | "image/jpg" => "image/jpeg",
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "Content-Type {:?} is not accepted: send image/webp, image/png or image/jpeg",
                    other
                ),
            ));
        }
    };
    if body.is_empty() {
        return Err(ApiError::bad_request(
            None,
            "the body is empty: send the image bytes",
            "body",
        ));
    }
    let (ct, ext, _, _) = crate::routes::uploads::checked_image(s, body, None, "body").await?;
    if ct != want {
        return Err(ApiError::bad_request(
            None,
            format!("the bytes are {ct}, not the declared {want}"),
            "body",
        ));
    }
    Ok((ct, ext))
}

/// Puts a training image's bytes in the object store; its key.
async fn put_image(
    s: &AppState,
    account: &str,
    model: &str,
    body: Bytes,
    ct: &'static str,
    ext: &str,
) -> ApiResult<String> {
    let key = format!(
        "training/{account}/{model}/{}.{ext}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    s.objects.put(&key, body, ct).await?;
    Ok(key)
}

/// Create a custom model.
#[utoipa::path(
    post, path = "/v1/custom-models", tag = "custom models",
    request_body = CreateModel,
    responses(
        (status = 201, description = "Created", body = ModelCreated),
        (status = 400, description = "Invalid name", body = crate::error::ErrorBody),
    ),
)]
pub async fn create(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Json(body): Json<CreateModel>,
) -> ApiResult<Response> {
    let name = display_name(body.display_name.as_deref(), "displayName")?;
    let kind = match body.custom_model_type.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(t) => Some(display_name(Some(t), "customModelType")?),
    };
    let m = s
        .store
        .create_custom_model(&acc.id, &name, kind.as_deref())
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(ModelCreated {
            id: m.id,
            display_name: m.display_name,
        }),
    )
        .into_response())
}

/// Read a custom model.
#[utoipa::path(
    get, path = "/v1/custom-models/{modelId}", tag = "custom models",
    params(("modelId" = String, Path, description = "The model's id")),
    responses((status = 200, description = "The model", body = CustomModelView)),
)]
pub async fn read(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<CustomModelView>> {
    let m = s
        .store
        .custom_model(&acc.id, &id)
        .await?
        .ok_or_else(|| no_model(&id))?;
    Ok(axum::Json(CustomModelView::from(&m)))
}

async fn do_rename(
    s: &AppState,
    account: &str,
    id: &str,
    body: RenameModel,
) -> ApiResult<axum::Json<CustomModelView>> {
    let raw = body.updated_display_name.or(body.display_name);
    let name = display_name(raw.as_deref(), "updatedDisplayName")?;
    let m = s
        .store
        .rename_custom_model(account, id, &name)
        .await?
        .ok_or_else(|| no_model(id))?;
    Ok(axum::Json(CustomModelView::from(&m)))
}

/// Rename a custom model.
#[utoipa::path(
    patch, path = "/v1/custom-models/{modelId}", tag = "custom models",
    params(("modelId" = String, Path, description = "The model's id")),
    request_body = RenameModel,
    responses((status = 200, description = "The renamed model", body = CustomModelView)),
)]
pub async fn rename(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    Json(body): Json<RenameModel>,
) -> ApiResult<axum::Json<CustomModelView>> {
    do_rename(&s, &acc.id, &id, body).await
}

/// Rename a custom model (`PUT`, as the seed's clients may send it).
#[utoipa::path(
    put, path = "/v1/custom-models/{modelId}", tag = "custom models",
    params(("modelId" = String, Path, description = "The model's id")),
    request_body = RenameModel,
    responses((status = 200, description = "The renamed model", body = CustomModelView)),
)]
pub async fn rename_put(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    Json(body): Json<RenameModel>,
) -> ApiResult<axum::Json<CustomModelView>> {
    do_rename(&s, &acc.id, &id, body).await
}

/// Soft-delete a custom model: gone for reads, its history kept.
#[utoipa::path(
    delete, path = "/v1/custom-models/{modelId}", tag = "custom models",
    params(("modelId" = String, Path, description = "The model's id")),
    responses((status = 204, description = "Deleted")),
)]
pub async fn delete(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if s.store.delete_custom_model(&acc.id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(no_model(&id))
    }
}

/// Upload one training image as the raw body (`Content-Type` image/webp,
/// image/png or image/jpeg; at most 10 MB).
#[utoipa::path(
    post, path = "/v1/custom-models/{modelId}/data", tag = "custom models",
    params(("modelId" = String, Path, description = "The model's id")),
    request_body(content = crate::views::Binary, content_type = "image/jpeg"),
    responses(
        (status = 201, description = "Stored", body = DataStored),
        (status = 400, description = "Not an image of the declared type, or too many pixels", body = crate::error::ErrorBody),
        (status = 409, description = "The model holds its maximum of training images", body = crate::error::ErrorBody),
        (status = 413, description = "Larger than 10 MB", body = crate::error::ErrorBody),
        (status = 415, description = "Not image/webp, image/png or image/jpeg", body = crate::error::ErrorBody),
    ),
)]
pub async fn add_data(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    s.store
        .custom_model(&acc.id, &id)
        .await?
        .ok_or_else(|| no_model(&id))?;
    let (ct, ext) = training_bytes(&s, &headers, &body).await?;
    let size = body.len() as i64;
    let key = put_image(&s, &acc.id, &id, body, ct, ext).await?;
    match s
        .store
        .add_training_image(&acc.id, &id, &key, ct, size)
        .await
    {
        Ok(AddImage::Added(t)) => Ok((
            StatusCode::CREATED,
            axum::Json(DataStored { data_id: t.id }),
        )
            .into_response()),
        other => {
            s.erase(std::slice::from_ref(&key)).await;
            Err(match other {
                Ok(AddImage::NoModel) => no_model(&id),
                Ok(AddImage::Full) => ApiError::conflict(
                    "training_images_full",
                    format!("A model holds at most {MAX_TRAINING_IMAGES} training images"),
                ),
                Err(e) => e.into(),
                Ok(AddImage::Added(_)) => unreachable!("handled above"),
            })
        }
    }
}

/// The training images of a model (a bare array).
#[utoipa::path(
    get, path = "/v1/custom-models/{modelId}/data", tag = "custom models",
    params(("modelId" = String, Path, description = "The model's id")),
    responses((status = 200, description = "Its training images", body = Vec<TrainingDataItem>)),
)]
pub async fn list_data(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Vec<TrainingDataItem>>> {
    let images = s
        .store
        .training_images(&acc.id, &id)
        .await?
        .ok_or_else(|| no_model(&id))?;
    Ok(axum::Json(
        images.iter().map(TrainingDataItem::from).collect(),
    ))
}

/// One training image with its bytes as a data URL.
#[utoipa::path(
    get, path = "/v1/custom-models/{modelId}/data/{dataId}", tag = "custom models",
    params(
        ("modelId" = String, Path, description = "The model's id"),
        ("dataId" = String, Path, description = "The training image's id"),
    ),
    responses((status = 200, description = "The image", body = DataWithUrl)),
)]
pub async fn read_data(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((id, data_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<DataWithUrl>> {
    let t = s
        .store
        .training_image(&acc.id, &id, &data_id)
        .await?
        .ok_or_else(|| no_data(&data_id))?;
    // Replaced or deleted since the read: as if it were already gone.
    let bytes = s.objects.get(&t.object_key).await.map_err(|e| match e {
        atelier_shared::storage::StorageError::NotFound(_) => no_data(&data_id),
        other => other.into(),
    })?;
    Ok(axum::Json(DataWithUrl {
        data_id: t.id,
        data_url: format!(
            "data:{};base64,{}",
            t.content_type,
            base64::engine::general_purpose::STANDARD.encode(&bytes)
        ),
    }))
}

/// Replace a training image's bytes (raw body, as for an upload).
#[utoipa::path(
    put, path = "/v1/custom-models/{modelId}/data/{dataId}", tag = "custom models",
    params(
        ("modelId" = String, Path, description = "The model's id"),
        ("dataId" = String, Path, description = "The training image's id"),
    ),
    request_body(content = crate::views::Binary, content_type = "image/jpeg"),
    responses(
        (status = 200, description = "Replaced", body = DataStored),
        (status = 413, description = "Larger than 10 MB", body = crate::error::ErrorBody),
        (status = 415, description = "Not image/webp, image/png or image/jpeg", body = crate::error::ErrorBody),
    ),
)]
pub async fn replace_data(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((id, data_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<axum::Json<DataStored>> {
    s.store
        .training_image(&acc.id, &id, &data_id)
        .await?
        .ok_or_else(|| no_data(&data_id))?;
    let (ct, ext) = training_bytes(&s, &headers, &body).await?;
    let size = body.len() as i64;
    let key = put_image(&s, &acc.id, &id, body, ct, ext).await?;
    match s
        .store
        .replace_training_image(&acc.id, &id, &data_id, &key, ct, size)
        .await
    {
        Ok(Some(old)) => {
            s.erase(std::slice::from_ref(&old)).await;
            Ok(axum::Json(DataStored { data_id }))
        }
        Ok(None) => {
            s.erase(std::slice::from_ref(&key)).await;
            Err(no_data(&data_id))
        }
        Err(e) => {
            s.erase(std::slice::from_ref(&key)).await;
            Err(e.into())
        }
    }
}

/// Delete a training image for good.
#[utoipa::path(
    delete, path = "/v1/custom-models/{modelId}/data/{dataId}", tag = "custom models",
    params(
        ("modelId" = String, Path, description = "The model's id"),
        ("dataId" = String, Path, description = "The training image's id"),
    ),
    responses((status = 204, description = "Deleted")),
)]
pub async fn delete_data(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((id, data_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let key = s
        .store
        .delete_training_image(&acc.id, &id, &data_id)
        .await?
        .ok_or_else(|| no_data(&data_id))?;
    s.erase(std::slice::from_ref(&key)).await;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------
// Trainings (contract §7).

/// `POST …/trainings`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartTraining {
    /// 0–10 (default 5): higher follows the dataset more closely.
    pub training_strength: Option<i64>,
    /// `fast` (default) or `high_quality`.
    pub training_speed: Option<String>,
}

/// `202` of a started training.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingStarted {
    pub training_id: String,
}

/// A training as §7 shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingView {
    pub id: String,
    /// `queued`, `processing`, `succeeded`, `failed`, `canceled`.
    pub status: String,
    pub training_strength: i64,
    pub training_speed: String,
    pub trigger_word: Option<String>,
    pub error: Option<String>,
    /// `{stage, position, totalSteps, progress (0–1), remainingTimeMs, startedAt, updatedAt}`.
    #[schema(value_type = Object)]
    pub training_progress: serde_json::Value,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&TrainingRow> for TrainingView {
    fn from(t: &TrainingRow) -> Self {
        let p: serde_json::Value = serde_json::from_str(&t.parameters).unwrap_or_default();
        TrainingView {
            id: t.id.clone(),
            status: t.status().to_string(),
            training_strength: p["trainingStrength"].as_i64().unwrap_or(5),
            training_speed: p["trainingSpeed"].as_str().unwrap_or("fast").to_string(),
            trigger_word: Some(t.trigger_word.clone()),
            error: t.output_error.clone().or_else(|| t.job_error.clone()),
            training_progress: crate::routes::trainings::progress_json(t),
            created_at: iso8601(t.created_at),
            updated_at: iso8601(t.job_updated_at.max(t.updated_at)),
        }
    }
}

/// `{id, status}` of a training in a list or after a cancel.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TrainingBrief {
    pub id: String,
    pub status: String,
}

fn no_training(id: &str) -> ApiError {
    ApiError::not_found(format!("Training {id} not found"))
}

/// The steps of a seed 001 training: per image, 60 (`fast`) or 120
/// (`high_quality`), scaled by the strength (5 is 1×, 0 is ½×, 10 is 1½×).
fn custom_steps(images: usize, strength: i64, speed: &str) -> u64 {
    let per_image: u64 = if speed == "high_quality" { 120 } else { 60 };
    let steps = images as u64 * per_image * (5 + strength.clamp(0, 10) as u64) / 10;
    steps.clamp(1, 10_000)
}

/// Start training a custom model on its training images.
#[utoipa::path(
    post, path = "/v1/custom-models/{modelId}/trainings", tag = "custom models",
    params(("modelId" = String, Path, description = "The model's id")),
    request_body = StartTraining,
    responses(
        (status = 202, description = "Queued", body = TrainingStarted),
        (status = 400, description = "Fewer than the minimum of training images, or a value out of range", body = crate::error::ErrorBody),
        (status = 402, description = "Not enough credits", body = crate::error::ErrorBody),
        (status = 404, description = "No such model", body = crate::error::ErrorBody),
        (status = 409, description = "A training of this model is queued or running", body = crate::error::ErrorBody),
        (status = 429, description = "parallel-training cap or relaunch cooldown (remainingSeconds)", body = crate::error::ErrorBody),
    ),
)]
pub async fn start_training(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<StartTraining>,
) -> ApiResult<Response> {
    let strength = body.training_strength.unwrap_or(5);
    if !(0..=10).contains(&strength) {
        return Err(ApiError::bad_request(
            Some("trainingStrength"),
            "must be an integer from 0 to 10",
            "body",
        ));
    }
    let speed = body.training_speed.as_deref().unwrap_or("fast");
    if !matches!(speed, "fast" | "high_quality") {
        return Err(ApiError::bad_request(
            Some("trainingSpeed"),
            "must be `fast` or `high_quality`",
            "body",
        ));
    }
    let images = s
        .store
        .training_images(&acc.id, &id)
        .await?
        .ok_or_else(|| no_model(&id))?;
    let min = s.config.training.min_images as usize;
    if images.len() < min {
        return Err(ApiError::bad_request(
            None,
            format!(
                "a training needs at least {min} training images; this model has {}",
                images.len()
            ),
            "body",
        ));
    }
    let mut parameters = serde_json::Map::new();
    parameters.insert("trainingStrength".into(), strength.into());
    parameters.insert("trainingSpeed".into(), speed.into());
    parameters.insert(
        "maxTrainSteps".into(),
        custom_steps(images.len(), strength, speed).into(),
    );
    let parameters = atelier_shared::domain::training::resolve(
        CUSTOM_MODEL_TYPE,
        &parameters,
        u32::try_from(images.len()).unwrap_or(u32::MAX),
    );
    let (training_id, _) = crate::routes::trainings::start(
        &s,
        &acc,
        &headers,
        crate::routes::trainings::StartRequest {
            api: atelier_shared::domain::training::TrainingApi::Custom,
            model_id: &id,
            model_type: CUSTOM_MODEL_TYPE,
            trigger_word: atelier_shared::domain::training::trigger_word(),
            parameters,
            images: images
                .iter()
                .map(|i| crate::routes::trainings::DatasetImage {
                    object_key: i.object_key.clone(),
                    content_type: i.content_type.clone(),
                })
                .collect(),
        },
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(TrainingStarted { training_id }),
    )
        .into_response())
}

/// The family custom models train as.
const CUSTOM_MODEL_TYPE: &str = "flux.1-lora";

/// The trainings of a model (a bare array of `{id, status}`).
#[utoipa::path(
    get, path = "/v1/custom-models/{modelId}/trainings", tag = "custom models",
    params(("modelId" = String, Path, description = "The model's id")),
    responses((status = 200, description = "Its trainings, oldest first", body = Vec<TrainingBrief>)),
)]
pub async fn list_trainings(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Vec<TrainingBrief>>> {
    s.store
        .custom_model(&acc.id, &id)
        .await?
        .ok_or_else(|| no_model(&id))?;
    let rows = s.store.trainings_of_model(&acc.id, &id).await?;
    Ok(axum::Json(
        rows.iter()
            .map(|t| TrainingBrief {
                id: t.id.clone(),
                status: t.status().to_string(),
            })
            .collect(),
    ))
}

/// A training of this model of the caller's, live.
async fn training_of(s: &AppState, account: &str, model: &str, id: &str) -> ApiResult<TrainingRow> {
    s.store
        .custom_model(account, model)
        .await?
        .ok_or_else(|| no_model(model))?;
    s.store
        .training(account, id)
        .await?
        .filter(|t| t.model_id == model)
        .ok_or_else(|| no_training(id))
}

/// A training's status, trigger word and progress.
#[utoipa::path(
    get, path = "/v1/custom-models/{modelId}/trainings/{trainingId}", tag = "custom models",
    params(
        ("modelId" = String, Path, description = "The model's id"),
        ("trainingId" = String, Path, description = "The training's id"),
    ),
    responses((status = 200, description = "The training", body = TrainingView)),
)]
pub async fn read_training(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((id, training_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<TrainingView>> {
    let t = training_of(&s, &acc.id, &id, &training_id).await?;
    Ok(axum::Json(TrainingView::from(&t)))
}

/// Cancel a training (best effort: one about to finish may still succeed).
#[utoipa::path(
    post, path = "/v1/custom-models/{modelId}/trainings/{trainingId}/cancel", tag = "custom models",
    params(
        ("modelId" = String, Path, description = "The model's id"),
        ("trainingId" = String, Path, description = "The training's id"),
    ),
    responses(
        (status = 202, description = "Cancelled; its cost released", body = TrainingBrief),
        (status = 409, description = "Already ended", body = crate::error::ErrorBody),
    ),
)]
pub async fn cancel_training(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((id, training_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let t = training_of(&s, &acc.id, &id, &training_id).await?;
    if !t.is_open() || !crate::routes::trainings::cancel(&s, &acc.id, &t).await? {
        return Err(ApiError::conflict(
            "training_ended",
            format!("Training {training_id} has already ended ({})", t.status()),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(TrainingBrief {
            id: training_id,
            status: "canceled".into(),
        }),
    )
        .into_response())
}

/// Delete a training's record; a running training keeps running and its
/// weights stay usable.
#[utoipa::path(
    delete, path = "/v1/custom-models/{modelId}/trainings/{trainingId}", tag = "custom models",
    params(
        ("modelId" = String, Path, description = "The model's id"),
        ("trainingId" = String, Path, description = "The training's id"),
    ),
    responses((status = 204, description = "Deleted")),
)]
pub async fn delete_training(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path((id, training_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    training_of(&s, &acc.id, &id, &training_id).await?;
    if s.store.delete_training(&acc.id, &training_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(no_training(&training_id))
    }
}
