//! The OpenAPI 3.1 document, built from the handlers' own request and
//! response types (`#[utoipa::path]` on every handler, `ToSchema` on every
//! type), served at `GET /openapi.json`, and the interactive docs page at
//! `GET /docs` (Swagger UI, its assets compiled into the binary: no
//! internet access needed).
//!
//! What is added here rather than on each handler: the security schemes
//! (`Authorization: Bearer`, `X-API-Key`) required by default, the error
//! envelope as every operation's `default` answer, operation ids derived
//! from method and path (unique by construction), and the server URL
//! (`server.public_url` + `server.prefix`).

use crate::error::ErrorBody;
use atelier_shared::config::Config;
use axum::Extension;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use std::sync::Arc;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Ref, RefOr, Required,
    ResponseBuilder, SecurityRequirement, ServerBuilder, Tag,
};
use utoipa::{PartialSchema, ToSchema};

/// Name of the bearer scheme.
const BEARER: &str = "bearer";
/// Name of the `X-API-Key` scheme.
const API_KEY: &str = "api_key";

/// What the document says before the routes are added.
pub fn base() -> OpenApi {
    let tags = [
        ("projects", "Projects (contract §2)"),
        (
            "uploads",
            "Upload slots and signed file URLs (contract §2.4–2.5)",
        ),
        (
            "jobs",
            "Generation jobs: creation, status, results, abort (contract §3)",
        ),
        ("downloads", "ZIP export (contract §3.13)"),
        (
            "notifications",
            "Stored and live notifications (contract §4.1–4.4)",
        ),
        (
            "webhooks",
            "The account's webhook and its deliveries (contract §4.5–4.9)",
        ),
        ("identities", "Identities (contract §5)"),
        ("profiles", "Profiles, Phota-compatible (contract §9)"),
        ("billing", "Credits (contract §10)"),
        (
            "operator",
            "Operator accounts only: queues, workers, dead letters (the console's operator view)",
        ),
        ("operations", "Health, metrics and this document"),
    ];
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Atelier API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Self-hostable platform for AI fashion imagery jobs. Every error answer is \
                     the envelope `{error, detail[], code}` (see `ErrorBody`); job-creating \
                     routes answer 202 and the work is observed by polling, Server-Sent Events \
                     or webhooks.",
                ))
                .build(),
        )
        .tags(Some(tags.into_iter().map(|(name, description)| {
            let mut t = Tag::new(name);
            t.description = Some(description.into());
            t
        })))
        .components(Some(
            ComponentsBuilder::new()
                .security_scheme(
                    BEARER,
                    SecurityScheme::Http(
                        HttpBuilder::new()
                            .scheme(HttpAuthScheme::Bearer)
                            .description(Some("The API key as a bearer token"))
                            .build(),
                    ),
                )
                .security_scheme(
                    API_KEY,
                    SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
                )
                .schema(ErrorBody::name(), ErrorBody::schema())
                .build(),
        ))
        .security(Some([
            SecurityRequirement::new(BEARER, Vec::<String>::new()),
            SecurityRequirement::new(API_KEY, Vec::<String>::new()),
        ]))
        .build()
}

/// Every operation of `doc`, with its method and path.
fn operations(doc: &mut OpenApi) -> impl Iterator<Item = (&'static str, &str, &mut Operation)> {
    doc.paths.paths.iter_mut().flat_map(|(path, item)| {
        [
            ("get", &mut item.get),
            ("put", &mut item.put),
            ("post", &mut item.post),
            ("delete", &mut item.delete),
            ("patch", &mut item.patch),
            ("head", &mut item.head),
            ("options", &mut item.options),
            ("trace", &mut item.trace),
        ]
        .into_iter()
        .filter_map(move |(m, op)| op.as_mut().map(|op| (m, path.as_str(), op)))
    })
}

/// The document as served: the server URL, operation ids, and the error
/// envelope as every operation's `default` answer.
pub fn finish(mut doc: OpenApi, cfg: &Config) -> OpenApi {
    doc.servers = Some(vec![
        ServerBuilder::new()
            .url(format!(
                "{}{}",
                cfg.server.public_url.trim_end_matches('/'),
                cfg.server.prefix
            ))
            .build(),
    ]);
    let error = ResponseBuilder::new()
        .description("A refusal or an error, in the envelope of every answer that is not a success")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                .build(),
        )
        .build();
    let idempotency_key = ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "Any 1–255 visible ASCII characters, new for each request: a retry with the same \
             key and the same request answers what the first one did (header \
             `Idempotent-Replayed: true`) without doing it again; the same key on another \
             request is refused (422 `idempotency_key_reused`). Successful answers are kept \
             24 h per account.",
        ))
        .schema(Some(String::schema()))
        .build();
    for (method, path, op) in operations(&mut doc) {
        op.operation_id = Some(operation_id(method, path));
        // Client routes (those under the default security) honour the key
        // on their creating methods.
        if matches!(method, "post" | "put") && op.security.is_none() {
            op.parameters
                .get_or_insert_with(Vec::new)
                .push(RefOr::T(idempotency_key.clone()));
        }
        op.responses
            .responses
            .entry("default".into())
            .or_insert_with(|| RefOr::T(error.clone()));
    }
    doc
}

/// `get_jobs_job_id_status` for `GET /jobs/{job_id}/status`.
fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_string();
    for part in path.split(|c: char| !c.is_ascii_alphanumeric()) {
        if !part.is_empty() {
            id.push('_');
            id.push_str(part);
        }
    }
    id
}

/// The document, serialised once.
pub struct Document {
    json: String,
}

impl Document {
    pub fn new(doc: &OpenApi) -> Document {
        Document {
            // A document of plain data always serialises.
            json: doc.to_json().unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot serialise the OpenAPI document");
                String::from("{}")
            }),
        }
    }

    pub fn json(&self) -> &str {
        &self.json
    }
}

/// This document (OpenAPI 3.1).
#[utoipa::path(
    get, path = "/openapi.json", tag = "operations", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this server", content_type = "application/json", body = Object)),
)]
pub async fn document(Extension(doc): Extension<Arc<Document>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.json().to_string(),
    )
}

/// The docs page: Swagger UI over `openapi.json`. Its links are relative,
/// so the page works under any `server.prefix`.
async fn docs_page() -> Html<&'static str> {
    Html(
        r##"<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Atelier API</title>
  <link rel="stylesheet" href="docs/ui/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/ui/swagger-ui-bundle.js"></script>
  <script>
    window.onload = () => {
      window.ui = SwaggerUIBundle({ url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true });
    };
  </script>
</body>
</html>"##,
    )
}

/// `/docs` and the Swagger UI assets (compiled into the binary by the
/// `swagger-ui-dist` crate) under `/docs/ui`.
pub fn docs_routes() -> axum::Router {
    axum::Router::new()
        .route(crate::router::DOCS, axum::routing::get(docs_page))
        .merge(swagger_ui_dist::generate_routes(
            swagger_ui_dist::ApiDefinition {
                uri_prefix: "/docs/ui",
                api_definition: swagger_ui_dist::OpenApiSource::Uri("../../openapi.json"),
                title: Some("Atelier API"),
            },
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_ids_follow_method_and_path() {
        assert_eq!(
            operation_id("get", "/jobs/{job_id}/status"),
            "get_jobs_job_id_status"
        );
        assert_eq!(
            operation_id("post", "/v1/phota/profiles/add"),
            "post_v1_phota_profiles_add"
        );
        assert_eq!(
            operation_id("post", "/create-packshot"),
            "post_create_packshot"
        );
    }
}
