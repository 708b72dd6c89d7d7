//! Projects (contract §2.1–§2.3).

use super::PageQuery;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Query};
use crate::views;
use atelier_shared::db::projects::{CreateProject, DeleteProject, ProjectQuery};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
pub struct CreateBody {
    pub project_name: Option<String>,
}

/// Validates a project name: 1–128 characters after trimming.
pub fn project_name(raw: Option<&str>, field: &str) -> ApiResult<String> {
    let name = raw.map(str::trim).unwrap_or("");
    if name.is_empty() {
        return Err(ApiError::bad_request(
            Some(field),
            "is required and must not be empty",
            "body",
        ));
    }
    if name.chars().count() > 128 {
        return Err(ApiError::bad_request(
            Some(field),
            "must be at most 128 characters",
            "body",
        ));
    }
    Ok(name.to_string())
}

pub async fn create(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Json(body): Json<CreateBody>,
) -> ApiResult<impl IntoResponse> {
    let name = project_name(body.project_name.as_deref(), "project_name")?;
    match s.store.create_project(&acc.id, &name).await? {
        CreateProject::Created(p) => Ok((
            StatusCode::CREATED,
            axum::Json(
                json!({"project_id": p.id, "project_name": p.name, "project_key": p.id, "created_at": atelier_shared::time::iso8601(p.created_at)}),
            ),
        )),
        CreateProject::Exists(p) => Err(ApiError::conflict(
            "conflict",
            format!("A project named {:?} already exists", p.name),
        )
        .with("project_id", p.id)
        .with("project_name", p.name)),
    }
}

pub async fn list(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<impl IntoResponse> {
    let (page, per_page, ascending) = q.resolve(20)?;
    let query = ProjectQuery {
        page,
        per_page,
        ascending,
        search: q.search.clone().filter(|s| !s.is_empty()),
    };
    let (rows, total) = s.store.list_projects(&acc.id, &query).await?;
    Ok(axum::Json(json!({
        "projects": rows.iter().map(views::project).collect::<Vec<_>>(),
        "pagination": views::pagination(page, per_page, total),
    })))
}

pub async fn read(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let p = s
        .store
        .project(&acc.id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("Project not found"))?;
    Ok(axum::Json(views::project(&p)))
}

pub async fn delete(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    match s.store.delete_project(&acc.id, &id).await? {
        DeleteProject::NotFound => Err(ApiError::not_found("Project not found")),
        DeleteProject::HasActiveJobs => Err(ApiError::conflict(
            "conflict",
            "The project has pending or processing jobs",
        )),
        DeleteProject::Deleted { object_keys } => {
            // The rows are gone; the files follow (a leftover file is harmless, a
            // dangling row would not be).
            for k in object_keys {
                if let Err(e) = s.objects.delete(&k).await {
                    tracing::warn!(key = %k, error = %e, "could not delete a result file of a deleted project");
                }
            }
            Ok(StatusCode::NO_CONTENT)
        }
    }
}
