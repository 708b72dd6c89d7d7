//! Projects: named folders of an account's jobs.

use super::{Result, Store, StoreError};
use crate::domain::JobStatus;
use crate::time::now_ms;

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct Project {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub created_at: i64,
    pub created_by: String,
    pub total_images: i64,
}

/// `total_images` counts the outputs filed under the project (contract §2.2).
const PROJECT_SELECT: &str = "SELECT p.id, p.account_id, p.name, p.created_at, a.name AS created_by, \
     (SELECT COUNT(*) FROM outputs o JOIN jobs j ON j.id = o.job_id WHERE j.project_id = p.id) AS total_images \
     FROM projects p JOIN accounts a ON a.id = p.account_id";

/// Outcome of a create: the new project, or the existing one of that name.
pub enum CreateProject {
    Created(Project),
    Exists(Project),
}

#[derive(Debug, Clone, Default)]
pub struct ProjectQuery {
    pub page: i64,
    pub per_page: i64,
    pub ascending: bool,
    pub search: Option<String>,
}

impl Store {
    pub async fn create_project(&self, account_id: &str, name: &str) -> Result<CreateProject> {
        let id = crate::domain::ProjectId::generate().0;
        let r = sqlx::query(
            "INSERT INTO projects (id, account_id, name, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (account_id, name) DO NOTHING",
        )
        .bind(&id)
        .bind(account_id)
        .bind(name)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        let created = r.rows_affected() == 1;
        let p = self
            .project_by_name(account_id, name)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(if created {
            CreateProject::Created(p)
        } else {
            CreateProject::Exists(p)
        })
    }

    /// The caller's project named `name`, created if missing (uploads without
    /// a project land in `default`, contract §2.4).
    pub async fn ensure_project(&self, account_id: &str, name: &str) -> Result<Project> {
        match self.create_project(account_id, name).await? {
            CreateProject::Created(p) | CreateProject::Exists(p) => Ok(p),
        }
    }

    pub async fn project_by_name(&self, account_id: &str, name: &str) -> Result<Option<Project>> {
        let sql = format!("{PROJECT_SELECT} WHERE p.account_id = $1 AND p.name = $2");
        Ok(sqlx::query_as::<_, Project>(&sql)
            .bind(account_id)
            .bind(name)
            .fetch_optional(self.pool())
            .await?)
    }

    /// Whether project `id` is one of `account_id`'s: the admission check,
    /// one index lookup (a [`Store::project`] also counts its outputs).
    pub async fn owns_project(&self, account_id: &str, id: &str) -> Result<bool> {
        let found: Option<String> =
            sqlx::query_scalar("SELECT id FROM projects WHERE id = $1 AND account_id = $2")
                .bind(id)
                .bind(account_id)
                .fetch_optional(self.pool())
                .await?;
        Ok(found.is_some())
    }

    /// A project of `account_id`; another account's project is `None` (404).
    pub async fn project(&self, account_id: &str, id: &str) -> Result<Option<Project>> {
        let sql = format!("{PROJECT_SELECT} WHERE p.account_id = $1 AND p.id = $2");
        Ok(sqlx::query_as::<_, Project>(&sql)
            .bind(account_id)
            .bind(id)
            .fetch_optional(self.pool())
            .await?)
    }

    pub async fn list_projects(
        &self,
        account_id: &str,
        q: &ProjectQuery,
    ) -> Result<(Vec<Project>, i64)> {
        let pattern = q.search.as_ref().map(|s| format!("%{}%", s.to_lowercase()));
        let total: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM projects p WHERE p.account_id = $1 AND ($2 IS NULL OR LOWER(p.name) LIKE $2)",
        )
        .bind(account_id)
        .bind(pattern.as_deref())
        .fetch_one(self.pool())
        .await?;
        let order = if q.ascending { "ASC" } else { "DESC" };
        let sql = format!(
            "{PROJECT_SELECT} WHERE p.account_id = $1 AND ($2 IS NULL OR LOWER(p.name) LIKE $2) \
             ORDER BY p.created_at {order}, p.id {order} LIMIT $3 OFFSET $4"
        );
        let rows = sqlx::query_as::<_, Project>(&sql)
            .bind(account_id)
            .bind(pattern.as_deref())
            .bind(q.per_page)
            .bind((q.page - 1).max(0) * q.per_page)
            .fetch_all(self.pool())
            .await?;
        Ok((rows, total))
    }

    /// Deletes a project with its jobs (outputs, reservations cascade).
    /// Returns the object keys of the deleted results so the caller can
    /// remove them from the object store after the commit.
    pub async fn delete_project(&self, account_id: &str, id: &str) -> Result<DeleteProject> {
        let mut tx = self.begin().await?;
        // Locking the project row blocks concurrent job inserts into it (their
        // foreign-key check needs a share lock), so the active-job check below
        // cannot be overtaken by a job created in between.
        let sql = format!(
            "SELECT name FROM projects WHERE id = $1 AND account_id = $2{}",
            self.for_update()
        );
        let name: Option<String> = sqlx::query_scalar(&sql)
            .bind(id)
            .bind(account_id)
            .fetch_optional(&mut *tx)
            .await?;
        match name.as_deref() {
            None => return Ok(DeleteProject::NotFound),
            Some(DEFAULT_PROJECT) => return Ok(DeleteProject::IsDefault),
            Some(_) => {}
        }
        let sql = format!(
            "SELECT COUNT(*) FROM jobs WHERE project_id = $1 AND status IN ({})",
            JobStatus::sql_in(&JobStatus::OPEN)
        );
        let active: i64 = sqlx::query_scalar(&sql)
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        if active > 0 {
            return Ok(DeleteProject::HasActiveJobs);
        }
        let keys: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT o.full_key, o.thumb_key FROM outputs o JOIN jobs j ON j.id = o.job_id WHERE j.project_id = $1",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        // Uploaded assets are kept (contract §2.3): move them to the default project.
        let default_id: Option<String> =
            sqlx::query_scalar("SELECT id FROM projects WHERE account_id = $1 AND name = $2")
                .bind(account_id)
                .bind(DEFAULT_PROJECT)
                .fetch_optional(&mut *tx)
                .await?;
        let default_id = match default_id {
            Some(d) => d,
            None => {
                let d = crate::domain::ProjectId::generate().0;
                sqlx::query("INSERT INTO projects (id, account_id, name, created_at) VALUES ($1, $2, $4, $3)")
                    .bind(&d)
                    .bind(account_id)
                    .bind(now_ms())
                    .bind(DEFAULT_PROJECT)
                    .execute(&mut *tx)
                    .await?;
                d
            }
        };
        sqlx::query("UPDATE files SET project_id = $1 WHERE project_id = $2")
            .bind(&default_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let sql = format!(
            "DELETE FROM jobs WHERE project_id = $1 AND status NOT IN ({})",
            JobStatus::sql_in(&JobStatus::OPEN)
        );
        sqlx::query(&sql).bind(id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM projects WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(DeleteProject::Deleted {
            object_keys: keys
                .into_iter()
                .flat_map(|(a, b)| [a, b])
                .flatten()
                .collect(),
        })
    }
}

pub enum DeleteProject {
    Deleted {
        object_keys: Vec<String>,
    },
    NotFound,
    HasActiveJobs,
    /// The account's default project holds the uploads of every deleted
    /// project (contract §2.3 keeps uploaded assets): it stays.
    IsDefault,
}

/// The project uploads land in when no project is named, and where the
/// files of deleted projects move.
pub const DEFAULT_PROJECT: &str = "default";
