//! The HTTP error envelope (contract §1.4): `{error, detail[], code}` plus
//! endpoint-specific members. Library errors are typed; this is the only
//! place they become status codes. 5xx bodies are generic and the cause is
//! logged once, inside the request span.

use atelier_shared::db::StoreError;
use atelier_shared::domain::packshot::FieldError;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// The error envelope every refusal answers with (contract §1.4).
/// Endpoint-specific members (`required_credits`, `retry_after`,
/// `existing_identity_code`, …) may follow the three fixed ones.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Short human-readable summary.
    pub error: String,
    pub detail: Vec<ErrorDetail>,
    /// Stable machine-readable code (`invalid_request`, `not_found`,
    /// `insufficient_credits`, `rate_limited`, …).
    pub code: String,
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: Map<String, Value>,
}

/// One problem of a request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// The field as the client wrote it (`instructions[0].options.width`).
    pub field: Option<String>,
    pub message: String,
    /// `body`, `query`, `path`, `header` or `form`.
    pub position: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub error: String,
    pub detail: Vec<ErrorDetail>,
    pub extra: Map<String, Value>,
    pub headers: Vec<(HeaderName, String)>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            error: error.into(),
            detail: Vec::new(),
            extra: Map::new(),
            headers: Vec::new(),
        }
    }

    pub fn with_detail(
        mut self,
        field: Option<&str>,
        message: impl Into<String>,
        position: &str,
    ) -> ApiError {
        self.detail.push(ErrorDetail {
            field: field.map(str::to_string),
            message: message.into(),
            position: Some(position.to_string()),
        });
        self
    }

    pub fn with(mut self, key: &str, v: impl Into<Value>) -> ApiError {
        self.extra.insert(key.to_string(), v.into());
        self
    }

    pub fn header(mut self, name: HeaderName, v: impl Into<String>) -> ApiError {
        self.headers.push((name, v.into()));
        self
    }

    pub fn invalid(fields: Vec<FieldError>) -> ApiError {
        let summary = fields
            .first()
            .map(|f| match &f.field {
                Some(name) => format!("Invalid request: {name} {}", f.message),
                None => format!("Invalid request: {}", f.message),
            })
            .unwrap_or_else(|| "Invalid request".into());
        let mut e = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", summary);
        for f in fields {
            e = e.with_detail(f.field.as_deref(), f.message, "body");
        }
        e
    }

    pub fn bad_request(
        field: Option<&str>,
        message: impl Into<String>,
        position: &str,
    ) -> ApiError {
        let message = message.into();
        let summary = match field {
            Some(f) => format!("Invalid request: {f} {message}"),
            None => format!("Invalid request: {message}"),
        };
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", summary)
            .with_detail(field, message, position)
    }

    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    pub fn unauthorized(why: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", why)
    }

    pub fn forbidden(why: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", why)
    }

    pub fn conflict(code: &'static str, why: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, why)
    }

    pub fn too_many(code: &'static str, why: impl Into<String>, retry_after_secs: u64) -> ApiError {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, why)
            .with("retry_after", retry_after_secs)
            .header(
                axum::http::header::RETRY_AFTER,
                retry_after_secs.to_string(),
            )
    }

    pub fn unavailable(why: impl Into<String>, retry_after_secs: u64) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why).header(
            axum::http::header::RETRY_AFTER,
            retry_after_secs.to_string(),
        )
    }

    /// A 500 whose cause is logged here and never sent to the client.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "Internal server error",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "database unavailable");
            ApiError::unavailable("The database is unavailable; retry shortly", 5)
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<atelier_shared::storage::StorageError> for ApiError {
    fn from(e: atelier_shared::storage::StorageError) -> Self {
        match e {
            atelier_shared::storage::StorageError::Unavailable(m) => {
                tracing::warn!(error = %m, "object store unavailable");
                ApiError::unavailable("The object store is unavailable; retry shortly", 5)
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<atelier_shared::queue::QueueError> for ApiError {
    fn from(e: atelier_shared::queue::QueueError) -> Self {
        match e {
            atelier_shared::queue::QueueError::Unavailable(m) => {
                tracing::warn!(error = %m, "queue unavailable");
                ApiError::unavailable("The queue is unavailable; retry shortly", 5)
            }
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.error,
            detail: self.detail,
            code: self.code.into(),
            extra: self.extra,
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        for (k, v) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&v) {
                resp.headers_mut().insert(k, v);
            }
        }
        resp
    }
}
