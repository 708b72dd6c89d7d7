//! Models API model records (contract §8). Scoped to the owning account;
//! a deleted model is gone for reads (404) and its row stays.

use super::{Result, Store};
use crate::time::now_ms;

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct ApiModelRow {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub short_description: String,
    pub model_type: String,
    pub status: String,
    pub privacy: String,
    pub base_model_id: Option<String>,
    pub epoch: Option<String>,
    /// JSON array of strings.
    pub tags: String,
    /// JSON object: `collectionIds`, `concepts`, `parameters`, `classSlug`.
    pub extra: String,
    pub description: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

const COLUMNS: &str = "id, account_id, name, short_description, model_type, status, privacy, \
     base_model_id, epoch, tags, extra, description, created_at, updated_at";

/// Filters and position of a model list (newest first).
#[derive(Debug, Clone, Default)]
pub struct ApiModelQuery {
    pub page_size: i64,
    /// `(created_at, id)` of the last model of the previous page.
    pub after: Option<(i64, String)>,
    pub privacy: Option<String>,
    pub status: Option<String>,
    pub model_type: Option<String>,
    /// Every one of these tags.
    pub tags: Vec<String>,
}

/// `LIKE` pattern for a JSON string element `"tag"` of the tags array.
fn tag_pattern(tag: &str) -> String {
    let json = serde_json::to_string(tag).unwrap_or_default();
    format!("%{}%", super::like_escape(&json))
}

impl Store {
    pub async fn insert_api_model(&self, m: &ApiModelRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_models (id, account_id, name, short_description, model_type, status, privacy, \
             base_model_id, epoch, tags, extra, description, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&m.id)
        .bind(&m.account_id)
        .bind(&m.name)
        .bind(&m.short_description)
        .bind(&m.model_type)
        .bind(&m.status)
        .bind(&m.privacy)
        .bind(&m.base_model_id)
        .bind(&m.epoch)
        .bind(&m.tags)
        .bind(&m.extra)
        .bind(&m.description)
        .bind(m.created_at)
        .bind(m.updated_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// A live model of `account_id`.
    pub async fn api_model(&self, account_id: &str, id: &str) -> Result<Option<ApiModelRow>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM api_models WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL"
        );
        Ok(sqlx::query_as::<_, ApiModelRow>(&sql)
            .bind(id)
            .bind(account_id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// Writes back every mutable field of `m` if it is still live and at
    /// `expected_updated_at` (an update that lost a race changes nothing:
    /// `false`).
    pub async fn update_api_model(
        &self,
        m: &ApiModelRow,
        expected_updated_at: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE api_models SET name = $3, short_description = $4, model_type = $5, status = $6, \
             privacy = $7, base_model_id = $8, epoch = $9, tags = $10, extra = $11, description = $12, \
             updated_at = $13 \
             WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL AND updated_at = $14",
        )
        .bind(&m.id)
        .bind(&m.account_id)
        .bind(&m.name)
        .bind(&m.short_description)
        .bind(&m.model_type)
        .bind(&m.status)
        .bind(&m.privacy)
        .bind(&m.base_model_id)
        .bind(&m.epoch)
        .bind(&m.tags)
        .bind(&m.extra)
        .bind(&m.description)
        .bind(m.updated_at)
        .bind(expected_updated_at)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Soft-deletes a live model; false when there is none.
    pub async fn delete_api_model(&self, account_id: &str, id: &str) -> Result<bool> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE api_models SET deleted_at = $3, updated_at = $3 \
             WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(account_id)
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A page of the account's live models, newest first, filtered; one
    /// more than `page_size` is read so the caller knows a next page exists.
    /// A page of the models of `owner`, or (`None`) of every account's
    /// public models.
    pub async fn api_models(
        &self,
        owner: Option<&str>,
        q: &ApiModelQuery,
    ) -> Result<Vec<ApiModelRow>> {
        let whose = if owner.is_some() {
            "account_id = $1"
        } else {
            "privacy = 'public' AND $1 = ''"
        };
        let mut sql = format!("SELECT {COLUMNS} FROM api_models WHERE {whose} AND deleted_at IS NULL");
        let mut n = 1;
        if q.after.is_some() {
            sql.push_str(" AND (created_at < $2 OR (created_at = $2 AND id < $3))");
            n = 3;
        }
        for (v, col) in [
            (&q.privacy, "privacy"),
            (&q.status, "status"),
            (&q.model_type, "model_type"),
        ] {
            if v.is_some() {
                n += 1;
                sql.push_str(&format!(" AND {col} = ${n}"));
            }
        }
        for _ in &q.tags {
            n += 1;
            sql.push_str(&format!(" AND tags LIKE ${n} ESCAPE '\\'"));
        }
        n += 1;
        sql.push_str(&format!(" ORDER BY created_at DESC, id DESC LIMIT ${n}"));
        let mut query = sqlx::query_as::<_, ApiModelRow>(&sql).bind(owner.unwrap_or(""));
        if let Some((at, id)) = &q.after {
            query = query.bind(*at).bind(id.clone());
        }
        for v in [&q.privacy, &q.status, &q.model_type].into_iter().flatten() {
            query = query.bind(v.clone());
        }
        for t in &q.tags {
            query = query.bind(tag_pattern(t));
        }
        Ok(query.bind(q.page_size + 1).fetch_all(self.pool()).await?)
    }
}

/// Training images one Models API model may hold (the dataset-size cap).
pub const MAX_MODEL_IMAGES: i64 = 500;

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct ApiModelImage {
    pub id: String,
    pub model_id: String,
    pub asset_id: Option<String>,
    pub name: String,
    pub object_key: String,
    pub content_type: String,
    pub created_at: i64,
}

/// What attaching training images did.
#[derive(Debug, Clone, PartialEq)]
pub enum AttachImages {
    Attached(Vec<ApiModelImage>),
    NoModel,
    /// An asset is already a training image of the model.
    AlreadyAttached(String),
    /// Over [`MAX_MODEL_IMAGES`].
    Full {
        held: i64,
    },
}

const IMAGE_COLUMNS: &str = "id, model_id, asset_id, name, object_key, content_type, created_at";

impl Store {
    /// Attaches `images` (already stored) to a live model of `account_id`,
    /// all or none, within the cap (counted under the model's row lock).
    pub async fn attach_api_model_images(
        &self,
        account_id: &str,
        model_id: &str,
        images: &[ApiModelImage],
    ) -> Result<AttachImages> {
        let mut tx = self.begin().await?;
        let locked = sqlx::query(
            "UPDATE api_models SET updated_at = updated_at WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
        )
        .bind(model_id)
        .bind(account_id)
        .execute(&mut *tx)
        .await?;
        if locked.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(AttachImages::NoModel);
        }
        let held: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM api_model_images WHERE model_id = $1")
                .bind(model_id)
                .fetch_one(&mut *tx)
                .await?;
        if held + images.len() as i64 > MAX_MODEL_IMAGES {
            tx.rollback().await?;
            return Ok(AttachImages::Full { held });
        }
        for img in images {
            if let Some(asset) = &img.asset_id {
                let dup: Option<String> = sqlx::query_scalar(
                    "SELECT id FROM api_model_images WHERE model_id = $1 AND asset_id = $2",
                )
                .bind(model_id)
                .bind(asset)
                .fetch_optional(&mut *tx)
                .await?;
                if dup.is_some() {
                    tx.rollback().await?;
                    return Ok(AttachImages::AlreadyAttached(asset.clone()));
                }
            }
            sqlx::query(
                "INSERT INTO api_model_images (id, model_id, asset_id, name, object_key, content_type, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&img.id)
            .bind(model_id)
            .bind(&img.asset_id)
            .bind(&img.name)
            .bind(&img.object_key)
            .bind(&img.content_type)
            .bind(img.created_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(AttachImages::Attached(images.to_vec()))
    }

    /// The first `limit` training images of a model (oldest first) and how
    /// many it holds.
    pub async fn api_model_images(
        &self,
        model_id: &str,
        limit: i64,
    ) -> Result<(Vec<ApiModelImage>, i64)> {
        let sql = format!(
            "SELECT {IMAGE_COLUMNS} FROM api_model_images WHERE model_id = $1 ORDER BY created_at, id LIMIT $2"
        );
        let images = sqlx::query_as::<_, ApiModelImage>(&sql)
            .bind(model_id)
            .bind(limit)
            .fetch_all(self.pool())
            .await?;
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM api_model_images WHERE model_id = $1")
                .bind(model_id)
                .fetch_one(self.pool())
                .await?;
        Ok((images, count))
    }

    /// Detaches a training image of a live model of `account_id`; its
    /// object key (to erase), or `None` (404).
    pub async fn detach_api_model_image(
        &self,
        account_id: &str,
        model_id: &str,
        image_id: &str,
    ) -> Result<Option<String>> {
        if self.api_model(account_id, model_id).await?.is_none() {
            return Ok(None);
        }
        let key: Option<String> = sqlx::query_scalar(
            "SELECT object_key FROM api_model_images WHERE id = $1 AND model_id = $2",
        )
        .bind(image_id)
        .bind(model_id)
        .fetch_optional(self.pool())
        .await?;
        let Some(key) = key else {
            return Ok(None);
        };
        let r = sqlx::query("DELETE FROM api_model_images WHERE id = $1 AND model_id = $2")
            .bind(image_id)
            .bind(model_id)
            .execute(self.pool())
            .await?;
        Ok((r.rows_affected() == 1).then_some(key))
    }
}

impl Store {
    /// Sets the status of a live model (`copying` → its final status).
    pub async fn set_api_model_status(&self, id: &str, status: &str) -> Result<()> {
        sqlx::query("UPDATE api_models SET status = $2, updated_at = $3 WHERE id = $1 AND deleted_at IS NULL")
            .bind(id)
            .bind(status)
            .bind(now_ms())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Every training image of a model, oldest first.
    pub async fn all_api_model_images(&self, model_id: &str) -> Result<Vec<ApiModelImage>> {
        let sql = format!(
            "SELECT {IMAGE_COLUMNS} FROM api_model_images WHERE model_id = $1 ORDER BY created_at, id"
        );
        Ok(sqlx::query_as::<_, ApiModelImage>(&sql)
            .bind(model_id)
            .fetch_all(self.pool())
            .await?)
    }
}
