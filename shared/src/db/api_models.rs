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
    let escaped: String = json
        .chars()
        .flat_map(|c| match c {
            '\\' | '%' | '_' => vec!['\\', c],
            c => vec![c],
        })
        .collect();
    format!("%{escaped}%")
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
    pub async fn api_models(
        &self,
        account_id: &str,
        q: &ApiModelQuery,
    ) -> Result<Vec<ApiModelRow>> {
        let mut sql = format!(
            "SELECT {COLUMNS} FROM api_models WHERE account_id = $1 AND deleted_at IS NULL"
        );
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
        let mut query = sqlx::query_as::<_, ApiModelRow>(&sql).bind(account_id);
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
