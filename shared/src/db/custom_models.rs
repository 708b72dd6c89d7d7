//! Custom models and their training images (contract §7, seed 001). Every
//! read is scoped to the owning account; a soft-deleted model is gone for
//! reads (404) and its rows stay for history.

use super::{Result, Store};
use crate::time::now_ms;

/// Training images one model may hold.
pub const MAX_TRAINING_IMAGES: i64 = 500;

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct CustomModel {
    pub id: String,
    pub account_id: String,
    pub display_name: String,
    pub custom_model_type: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct TrainingImage {
    pub id: String,
    pub model_id: String,
    pub object_key: String,
    pub content_type: String,
    pub size: i64,
    pub created_at: i64,
}

/// What adding a training image did.
#[derive(Debug, Clone, PartialEq)]
pub enum AddImage {
    Added(TrainingImage),
    /// The model is not the caller's (or is deleted).
    NoModel,
    /// The model holds [`MAX_TRAINING_IMAGES`] already.
    Full,
}

const MODEL_COLUMNS: &str =
    "id, account_id, display_name, custom_model_type, created_at, updated_at";
const IMAGE_COLUMNS: &str = "id, model_id, object_key, content_type, size, created_at";

impl Store {
    pub async fn create_custom_model(
        &self,
        account_id: &str,
        display_name: &str,
        custom_model_type: Option<&str>,
    ) -> Result<CustomModel> {
        let now = now_ms();
        let model = CustomModel {
            id: format!("cm_{}", crate::domain::ids::base32_lower(16)),
            account_id: account_id.to_string(),
            display_name: display_name.to_string(),
            custom_model_type: custom_model_type.map(str::to_string),
            created_at: now,
            updated_at: now,
        };
        sqlx::query(
            "INSERT INTO custom_models (id, account_id, display_name, custom_model_type, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind(&model.id)
        .bind(account_id)
        .bind(display_name)
        .bind(custom_model_type)
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(model)
    }

    /// A live model of `account_id`; `None` for anything else (404).
    pub async fn custom_model(&self, account_id: &str, id: &str) -> Result<Option<CustomModel>> {
        let sql = format!(
            "SELECT {MODEL_COLUMNS} FROM custom_models WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL"
        );
        Ok(sqlx::query_as::<_, CustomModel>(&sql)
            .bind(id)
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// Renames a live model; the model after, or `None` (404).
    pub async fn rename_custom_model(
        &self,
        account_id: &str,
        id: &str,
        display_name: &str,
    ) -> Result<Option<CustomModel>> {
        let r = sqlx::query(
            "UPDATE custom_models SET display_name = $3, updated_at = $4 \
             WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(account_id)
        .bind(display_name)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        if r.rows_affected() == 0 {
            return Ok(None);
        }
        self.custom_model(account_id, id).await
    }

    /// Soft-deletes a live model; false when there is none (404).
    pub async fn delete_custom_model(&self, account_id: &str, id: &str) -> Result<bool> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE custom_models SET deleted_at = $3, updated_at = $3 \
             WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(account_id)
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records a training image already stored at `object_key`, within the
    /// per-model cap (checked under the model's row lock).
    pub async fn add_training_image(
        &self,
        account_id: &str,
        model_id: &str,
        object_key: &str,
        content_type: &str,
        size: i64,
    ) -> Result<AddImage> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let locked = sqlx::query(
            "UPDATE custom_models SET updated_at = $3 WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
        )
        .bind(model_id)
        .bind(account_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if locked.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(AddImage::NoModel);
        }
        let held: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM training_data WHERE model_id = $1")
                .bind(model_id)
                .fetch_one(&mut *tx)
                .await?;
        if held >= MAX_TRAINING_IMAGES {
            tx.rollback().await?;
            return Ok(AddImage::Full);
        }
        let image = TrainingImage {
            id: format!("td_{}", crate::domain::ids::base32_lower(16)),
            model_id: model_id.to_string(),
            object_key: object_key.to_string(),
            content_type: content_type.to_string(),
            size,
            created_at: now,
        };
        sqlx::query(
            "INSERT INTO training_data (id, model_id, object_key, content_type, size, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
        )
        .bind(&image.id)
        .bind(model_id)
        .bind(object_key)
        .bind(content_type)
        .bind(size)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(AddImage::Added(image))
    }

    /// The training images of a live model of `account_id`, oldest first;
    /// `None` when the model is not the caller's (404).
    pub async fn training_images(
        &self,
        account_id: &str,
        model_id: &str,
    ) -> Result<Option<Vec<TrainingImage>>> {
        if self.custom_model(account_id, model_id).await?.is_none() {
            return Ok(None);
        }
        let sql = format!(
            "SELECT {IMAGE_COLUMNS} FROM training_data WHERE model_id = $1 ORDER BY created_at, id"
        );
        Ok(Some(
            sqlx::query_as::<_, TrainingImage>(&sql)
                .bind(model_id)
                .fetch_all(self.pool())
                .await?,
        ))
    }

    /// One training image of a live model of `account_id`.
    pub async fn training_image(
        &self,
        account_id: &str,
        model_id: &str,
        data_id: &str,
    ) -> Result<Option<TrainingImage>> {
        let sql = format!(
            "SELECT t.id, t.model_id, t.object_key, t.content_type, t.size, t.created_at \
             FROM training_data t JOIN custom_models m ON m.id = t.model_id \
             WHERE t.id = $1 AND t.model_id = $2 AND m.account_id = $3 AND m.deleted_at IS NULL"
        );
        Ok(sqlx::query_as::<_, TrainingImage>(&sql)
            .bind(data_id)
            .bind(model_id)
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// Points a training image at new bytes; the key it had (to erase), or
    /// `None` when there is no such image (404).
    pub async fn replace_training_image(
        &self,
        account_id: &str,
        model_id: &str,
        data_id: &str,
        object_key: &str,
        content_type: &str,
        size: i64,
    ) -> Result<Option<String>> {
        let Some(old) = self.training_image(account_id, model_id, data_id).await? else {
            return Ok(None);
        };
        let r = sqlx::query(
            "UPDATE training_data SET object_key = $3, content_type = $4, size = $5, updated_at = $6 \
             WHERE id = $1 AND model_id = $2 AND object_key = $7",
        )
        .bind(data_id)
        .bind(model_id)
        .bind(object_key)
        .bind(content_type)
        .bind(size)
        .bind(now_ms())
        .bind(&old.object_key)
        .execute(self.pool())
        .await?;
        // A concurrent replace or delete won: this call changed nothing.
        Ok((r.rows_affected() == 1).then_some(old.object_key))
    }

    /// Deletes a training image for good; its object key (to erase), or
    /// `None` when there is no such image (404).
    pub async fn delete_training_image(
        &self,
        account_id: &str,
        model_id: &str,
        data_id: &str,
    ) -> Result<Option<String>> {
        let Some(old) = self.training_image(account_id, model_id, data_id).await? else {
            return Ok(None);
        };
        // Only the image as read: a concurrent replace wins, and its object
        // is not erased under it.
        let r = sqlx::query(
            "DELETE FROM training_data WHERE id = $1 AND model_id = $2 AND object_key = $3",
        )
        .bind(data_id)
        .bind(model_id)
        .bind(&old.object_key)
        .execute(self.pool())
        .await?;
        Ok((r.rows_affected() == 1).then_some(old.object_key))
    }
}
