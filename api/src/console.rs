//! The web console: a page and its script and styles, compiled into the
//! binary (no CDN, no build step), served by the API role at `/`. It is a
//! client of the public API, so it can do nothing the API refuses.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/app.js");
const STYLES: &str = include_str!("../console/app.css");

/// Where the console is served (outside the OpenAPI document).
pub const PATHS: [&str; 3] = ["/", "/console/app.js", "/console/app.css"];

/// Scripts and styles only from this server; images from anywhere (results
/// are signed URLs of the object store, possibly another origin); requests
/// to anywhere (uploads go to signed object-store URLs too).
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src * data: blob:; connect-src *; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The assets change with the binary: browsers revalidate every time.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

pub fn routes() -> axum::Router {
    axum::Router::new()
        .route(
            PATHS[0],
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            PATHS[1],
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            PATHS[2],
            get(|| async { asset(STYLES, "text/css; charset=utf-8") }),
        )
}
