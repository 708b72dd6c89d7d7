//! Projects (contract §2.1–§2.3).

use super::PageQuery;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Json, Query};
use crate::state::AppState;
use crate::views::{Pagination, ProjectCreated, ProjectList, ProjectView};
use atelier_shared::db::projects::{CreateProject, DeleteProject, ProjectQuery};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;

#[derive(Deserialize, utoipa::ToSchema)]
pub struct CreateBody {
    /// 1–128 characters, unique per account.
    #[schema(required = true, value_type = String)]
    pub project_name: Option<String>,
}

/// Validates a project name: 1–128 characters after trimming, no control
/// characters.
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
    // As every other name (identities, presets, models): no NUL, newlines
    // or other control characters, which would break logs and exports.
    if name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            Some(field),
            "must not contain control characters",
            "body",
        ));
    }
    Ok(name.to_string())
}

/// Create a project.
#[utoipa::path(
    post, path = "/project", tag = "projects",
    request_body = CreateBody,
    responses(
        (status = 201, description = "Created", body = ProjectCreated),
        (status = 409, description = "A project of that name exists (`project_id`, `project_name`)", body = crate::error::ErrorBody),
    ),
)]
pub async fn create(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Json(body): Json<CreateBody>,
) -> ApiResult<impl IntoResponse> {
    let name = project_name(body.project_name.as_deref(), "project_name")?;
    match s.store.create_project(&acc.id, &name).await? {
        CreateProject::Created(p) => Ok((
            StatusCode::CREATED,
            axum::Json(ProjectCreated {
                project_key: p.id.clone(),
                project_id: p.id,
                project_name: p.name,
                created_at: atelier_shared::time::iso8601(p.created_at),
            }),
        )),
        CreateProject::Exists(p) => Err(ApiError::conflict(
            "conflict",
            format!("A project named {:?} already exists", p.name),
        )
        .with("project_id", p.id)
        .with("project_name", p.name)),
    }
}

/// The caller's projects.
#[utoipa::path(
    get, path = "/project", tag = "projects", params(PageQuery),
    responses((status = 200, description = "A page of projects", body = ProjectList)),
)]
pub async fn list(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::Json<ProjectList>> {
    let (page, per_page, ascending) = q.resolve(20)?;
    let query = ProjectQuery {
        page,
        per_page,
        ascending,
        search: q.search.clone().filter(|s| !s.is_empty()),
    };
    let (rows, total) = s.store.list_projects(&acc.id, &query).await?;
    Ok(axum::Json(ProjectList {
        projects: rows.iter().map(ProjectView::from).collect(),
        pagination: Pagination::new(page, per_page, total),
    }))
}

/// One project.
#[utoipa::path(
    get, path = "/project/{project_id}", tag = "projects",
    params(("project_id" = String, Path, description = "The project's id")),
    responses((status = 200, description = "The project", body = ProjectView)),
)]
pub async fn read(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<ProjectView>> {
    let p = s
        .store
        .project(&acc.id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("Project not found"))?;
    Ok(axum::Json(ProjectView::from(&p)))
}

/// Deletes a project with its finished jobs and their results; its files
/// move to the default project.
#[utoipa::path(
    delete, path = "/project/{project_id}", tag = "projects",
    params(("project_id" = String, Path, description = "The project's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "The project has pending or processing jobs, or is the default project", body = crate::error::ErrorBody),
    ),
)]
pub async fn delete(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    match s.store.delete_project(&acc.id, &id).await? {
        DeleteProject::NotFound => Err(ApiError::not_found("Project not found")),
        DeleteProject::HasActiveJobs => Err(ApiError::conflict(
            "conflict",
            "The project has pending or processing jobs",
        )),
        DeleteProject::IsDefault => Err(ApiError::conflict(
            "conflict",
            "The default project keeps the account's uploads and cannot be deleted",
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
