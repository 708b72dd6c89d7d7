//! Request extractors that turn every malformed input into the envelope:
//! a JSON body that is not JSON, has the wrong content type, or does not
//! match the expected shape gets a 400/415 naming the problem.

use crate::error::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// A JSON body deserialised into `T`, with the failing field named.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let v = JsonValue::from_request(req, state).await?.0;
        serde_path_to_error::deserialize::<_, T>(v)
            .map(Json)
            .map_err(|e| {
                let path = e.path().to_string();
                let field = (path != ".").then_some(path);
                ApiError::bad_request(field.as_deref(), e.into_inner().to_string(), "body")
            })
    }
}

/// Any syntactically valid JSON body.
pub struct JsonValue(pub serde_json::Value);

impl<S: Send + Sync> FromRequest<S> for JsonValue {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ct = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let is_json = {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        };
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Expected a JSON body with Content-Type: application/json",
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        "Request body too large",
                    )
                } else {
                    ApiError::bad_request(None, format!("cannot read body: {e}"), "body")
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonValue)
            .map_err(|e| ApiError::bad_request(None, format!("malformed JSON: {e}"), "body"))
    }
}

/// Query parameters with a 400 naming the bad parameter.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(q.as_bytes()));
        serde_path_to_error::deserialize::<_, T>(de)
            .map(Query)
            .map_err(|e| {
                let path = e.path().to_string();
                let field = (path != ".").then_some(path);
                ApiError::bad_request(field.as_deref(), e.into_inner().to_string(), "query")
            })
    }
}
