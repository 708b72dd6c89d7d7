//! Uploaded assets (`file_id`): a row is created with the upload slot and
//! becomes `uploaded` once the bytes are stored.

use super::jobs::{Admission, NewJob};
use super::{Result, Store};
use crate::domain::assets::TAGS;
use crate::time::now_ms;
use sqlx::AnyConnection;

/// `files.status` while the upload slot waits for its bytes.
const PENDING: &str = "pending";
/// `files.status` once the bytes are stored.
const UPLOADED: &str = "uploaded";

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct FileRow {
    pub id: String,
    pub account_id: String,
    pub project_id: String,
    pub filename: String,
    pub content_type: String,
    pub object_key: String,
    pub status: String,
    pub size_bytes: Option<i64>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub created_at: i64,
    pub uploaded_at: Option<i64>,
}

/// What `GET /assets` filters on (contract §2.6). `search` matches the
/// filename, the project's name and the tags; tags to include must all be
/// found, tags to exclude none (an upload not tagged yet has none).
pub struct AssetQuery<'a> {
    pub search: Option<&'a str>,
    pub created_after: Option<i64>,
    pub created_before: Option<i64>,
    pub include_tags: &'a [String],
    pub exclude_tags: &'a [String],
    pub sort_by_name: bool,
    pub ascending: bool,
    pub page: i64,
    pub per_page: i64,
}

/// An uploaded file and what its tagging found: the report (JSON, an
/// [`crate::domain::assets::AssetReport`]) and the preview it stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AssetRow {
    #[sqlx(flatten)]
    pub file: FileRow,
    pub tagging: Option<String>,
    pub preview_key: Option<String>,
    pub preview_thumb_key: Option<String>,
}

impl FileRow {
    /// The bytes are stored: the file can be an input.
    pub fn is_uploaded(&self) -> bool {
        self.status == UPLOADED
    }
}

/// A value bound to a query built piece by piece.
enum BindValue {
    Text(String),
    Int(i64),
}

const FILE_COLUMNS: &str = "id, account_id, project_id, filename, content_type, object_key, status, size_bytes, width, height, created_at, uploaded_at";

impl Store {
    pub async fn create_file(
        &self,
        id: &str,
        account_id: &str,
        project_id: &str,
        filename: &str,
        content_type: &str,
        object_key: &str,
    ) -> Result<FileRow> {
        let sql = format!(
            "INSERT INTO files (id, account_id, project_id, filename, content_type, object_key, status, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $8, $7) RETURNING {FILE_COLUMNS}"
        );
        Ok(sqlx::query_as::<_, FileRow>(&sql)
            .bind(id)
            .bind(account_id)
            .bind(project_id)
            .bind(filename)
            .bind(content_type)
            .bind(object_key)
            .bind(now_ms())
            .bind(PENDING)
            .fetch_one(self.pool())
            .await?)
    }

    pub async fn file(&self, id: &str) -> Result<Option<FileRow>> {
        let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE id = $1");
        Ok(sqlx::query_as::<_, FileRow>(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// A page of the account's uploaded files with what tagging found, and
    /// how many match the query.
    pub async fn list_files(&self, account_id: &str, q: &AssetQuery<'_>) -> Result<(Vec<AssetRow>, i64)> {
        let mut filter = format!("f.account_id = $1 AND f.status = '{UPLOADED}'");
        let mut binds: Vec<BindValue> = Vec::new();
        let mut n = 1;
        // A tag's name quoted, as it stands in a tagging report (whose only
        // strings are its tags).
        let quoted = |t: &str| format!("%\"{}\"%", super::like_escape(t));
        if let Some(text) = q.search {
            let text = text.to_lowercase();
            n += 1;
            let mut any = format!(
                "LOWER(f.filename) LIKE ${n} ESCAPE '\\' OR LOWER(COALESCE(p.name, '')) LIKE ${n} ESCAPE '\\'"
            );
            binds.push(BindValue::Text(format!("%{}%", super::like_escape(&text))));
            for tag in TAGS.iter().filter(|t| t.contains(text.as_str())) {
                n += 1;
                any.push_str(&format!(" OR t.input_description LIKE ${n} ESCAPE '\\'"));
                binds.push(BindValue::Text(quoted(tag)));
            }
            filter.push_str(&format!(" AND ({any})"));
        }
        for tag in q.include_tags {
            n += 1;
            filter.push_str(&format!(" AND t.input_description LIKE ${n} ESCAPE '\\'"));
            binds.push(BindValue::Text(quoted(tag)));
        }
        for tag in q.exclude_tags {
            n += 1;
            filter.push_str(&format!(
                " AND (t.input_description IS NULL OR t.input_description NOT LIKE ${n} ESCAPE '\\')"
            ));
            binds.push(BindValue::Text(quoted(tag)));
        }
        if let Some(t) = q.created_after {
            n += 1;
            filter.push_str(&format!(" AND f.created_at >= ${n}"));
            binds.push(BindValue::Int(t));
        }
        if let Some(t) = q.created_before {
            n += 1;
            filter.push_str(&format!(" AND f.created_at < ${n}"));
            binds.push(BindValue::Int(t));
        }
        let from = "FROM files f LEFT JOIN projects p ON p.id = f.project_id \
             LEFT JOIN outputs t ON t.job_id = f.tagging_job_id AND t.status = 'completed' \
             AND t.instruction_index = 0 AND t.variation_index = 0 AND t.version = 0";
        let count_sql = format!("SELECT COUNT(*) {from} WHERE {filter}");
        let mut count = sqlx::query_scalar::<_, i64>(&count_sql).bind(account_id);
        for b in &binds {
            count = match b {
                BindValue::Text(t) => count.bind(t.clone()),
                BindValue::Int(i) => count.bind(*i),
            };
        }
        let total = count.fetch_one(self.pool()).await?;
        let column = if q.sort_by_name { "f.filename" } else { "f.created_at" };
        let dir = if q.ascending { "ASC" } else { "DESC" };
        let cols = FILE_COLUMNS
            .split(", ")
            .map(|c| format!("f.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {cols}, t.input_description AS tagging, t.full_key AS preview_key, t.thumb_key AS preview_thumb_key \
             {from} WHERE {filter} ORDER BY {column} {dir}, f.id {dir} LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let mut query = sqlx::query_as::<_, AssetRow>(&sql).bind(account_id);
        for b in &binds {
            query = match b {
                BindValue::Text(t) => query.bind(t.clone()),
                BindValue::Int(i) => query.bind(*i),
            };
        }
        let rows = query
            .bind(q.per_page)
            .bind((q.page - 1) * q.per_page)
            .fetch_all(self.pool())
            .await?;
        Ok((rows, total))
    }

    /// Starts tagging an upload (contract §2.6): admits its quiet
    /// `asset_tagging` job and records it on the file, in one transaction.
    pub async fn start_tagging(&self, file_id: &str, job: NewJob<'_>) -> Result<Admission> {
        let mut tx = self.begin().await?;
        let admission = self.admit(&mut tx, &job).await?;
        let Admission::Created { job_id, .. } = &admission else {
            tx.rollback().await?;
            return Ok(admission);
        };
        sqlx::query("UPDATE files SET tagging_job_id = $2 WHERE id = $1")
            .bind(file_id)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(admission)
    }

    /// Files of `ids` that belong to `account_id`.
    pub async fn files_of(&self, account_id: &str, ids: &[String]) -> Result<Vec<FileRow>> {
        let mut out = Vec::with_capacity(ids.len());
        let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE id = $1 AND account_id = $2");
        for id in ids {
            if let Some(f) = sqlx::query_as::<_, FileRow>(&sql)
                .bind(id)
                .bind(account_id)
                .fetch_optional(self.pool())
                .await?
            {
                out.push(f);
            }
        }
        Ok(out)
    }

    /// Marks a pending file uploaded with the key its bytes were stored
    /// under. `false` if it was not pending any more: the upload URL is
    /// single-use, and of two racing uploads only one is recorded (the caller
    /// deletes the loser's object, which was written under its own key).
    pub async fn mark_file_uploaded(
        &self,
        id: &str,
        object_key: &str,
        size: i64,
        width: i64,
        height: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE files SET status = $7, size_bytes = $2, width = $3, height = $4, uploaded_at = $5, object_key = $6 \
             WHERE id = $1 AND status = $8",
        )
        .bind(id)
        .bind(size)
        .bind(width)
        .bind(height)
        .bind(now_ms())
        .bind(object_key)
        .bind(UPLOADED)
        .bind(PENDING)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }
}

/// Why input file `index` of a job cannot be read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UnusableFile {
    pub index: usize,
    pub file_id: String,
    /// The caller's file exists but its bytes were never stored.
    pub pending: bool,
}

/// The object keys of `ids`, uploaded files of `account_id`, in the order
/// given, read in one statement; `Err` names the first that is not
/// (deleted or another account's, or still waiting for its bytes).
pub(crate) async fn uploaded_keys(
    conn: &mut AnyConnection,
    account_id: &str,
    ids: &[&str],
) -> Result<std::result::Result<Vec<crate::domain::task::InputFile>, UnusableFile>> {
    if ids.is_empty() {
        return Ok(Ok(Vec::new()));
    }
    let sql = format!(
        "SELECT id, object_key, status FROM files WHERE account_id = $1 AND id IN ({})",
        super::placeholders(2, ids.len())
    );
    let mut q = sqlx::query_as::<_, (String, String, String)>(&sql).bind(account_id);
    for id in ids {
        q = q.bind(*id);
    }
    let found = q.fetch_all(&mut *conn).await?;
    let mut out = Vec::with_capacity(ids.len());
    for (index, id) in ids.iter().enumerate() {
        match found.iter().find(|(fid, _, _)| fid == id) {
            Some((_, object_key, status)) if status == UPLOADED => {
                out.push(crate::domain::task::InputFile {
                    file_id: id.to_string(),
                    object_key: object_key.clone(),
                })
            }
            other => {
                return Ok(Err(UnusableFile {
                    index,
                    file_id: id.to_string(),
                    pending: other.is_some(),
                }));
            }
        }
    }
    Ok(Ok(out))
}
