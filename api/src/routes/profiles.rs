//! Profiles (contract §9.1–9.3, Phota-compatible): a subject built from
//! several photos, given as public URLs (JSON) or uploaded files
//! (multipart). The "training" is an `identity_preprocessing` job on the
//! identity queue that keeps the photos of one person and builds a robust
//! mean embedding and a best crop; the status reads `IN_PROGRESS`, then
//! `READY` or `ERROR` with a message.
//!
//! URLs are checked here (syntax, scheme, credentials, and every address
//! the host resolves to against the egress policy) so a private or
//! unresolvable address is a 400 naming the item; the worker fetches them
//! through the same guard again (DNS may change in between).

use crate::admission::{job_trace, refusal};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::Query;
use crate::routes::identities::{preprocessing_job, read_form};
use crate::state::AppState;
use crate::views::{ProfileAdded, ProfileDeleted, ProfileEntry, ProfileIds, ProfileStatus};
use atelier_shared::db::identities::{
    DeleteIdentity, IdentityAdmission, IdentityQuery, NewIdentity,
};
use atelier_shared::domain::identity::{
    self, IdentityKind, PhotoSource, PreprocessSpec, profile_status,
};
use atelier_shared::time::iso8601;
use axum::extract::multipart::Multipart;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

/// `POST …/profiles/add` as JSON: photos by public URL.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct AddRequest {
    /// Public http(s) URLs of the photos (10–50 for `standard`, 5–10 for `fast`).
    #[serde(default)]
    image_urls: Vec<String>,
    /// `standard` (default) or `fast`.
    #[serde(default)]
    training_tier: Option<String>,
    #[serde(default)]
    tag: Option<String>,
}

/// `POST …/profiles/add` as a form: uploaded photos.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct AddForm {
    /// The photos (`images` or `images[]` parts).
    #[schema(value_type = Vec<String>, format = Binary)]
    images: Vec<Vec<u8>>,
    training_tier: Option<String>,
    tag: Option<String>,
}

/// A new profile id: a UUID, as the upstream API's ids look.
fn new_profile_id() -> String {
    atelier_shared::domain::FileId::generate().0
}

pub async fn add(
    State(s): State<AppState>,
    Caller(acc): Caller,
    headers: HeaderMap,
    req: Request,
) -> ApiResult<Response> {
    let max = s
        .config
        .identity
        .fast_photos
        .1
        .max(s.config.identity.standard_photos.1);
    let is_multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    let code = new_profile_id();
    // (request fields, photo sources already stored)
    let (body, stored): (AddRequest, Vec<String>) = if is_multipart {
        let mp = Multipart::from_request(req, &s).await;
        let form = read_form(&s, mp, "images", max as usize).await?;
        let mut keys = Vec::new();
        for img in &form.images {
            let key = format!(
                "profiles/{}/{}/photo-{}.{}",
                acc.id,
                code,
                ulid::Ulid::new().to_string().to_lowercase(),
                img.ext
            );
            if let Err(e) = s
                .objects
                .put(&key, img.bytes.clone(), img.content_type)
                .await
            {
                s.erase(&keys).await;
                return Err(e.into());
            }
            keys.push(key);
        }
        (
            AddRequest {
                image_urls: Vec::new(),
                training_tier: form.text.get("training_tier").cloned(),
                tag: form.text.get("tag").cloned(),
            },
            keys,
        )
    } else {
        let v = crate::extract::JsonValue::from_request(req, &s).await?.0;
        let body: AddRequest = serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            ApiError::bad_request(
                (path != ".").then_some(path.as_str()),
                e.into_inner().to_string(),
                "body",
            )
        })?;
        (body, Vec::new())
    };
    let result = admit(&s, &acc, &headers, &code, &body, &stored).await;
    if result.is_err() {
        s.erase(&stored).await;
    }
    result
}

async fn admit(
    s: &AppState,
    acc: &atelier_shared::db::accounts::Account,
    headers: &HeaderMap,
    code: &str,
    body: &AddRequest,
    stored: &[String],
) -> ApiResult<Response> {
    let tier = body.training_tier.as_deref().unwrap_or("standard");
    let (min, max) = match tier {
        "standard" => s.config.identity.standard_photos,
        "fast" => s.config.identity.fast_photos,
        _ => {
            return Err(ApiError::bad_request(
                Some("training_tier"),
                "must be standard or fast",
                "body",
            ));
        }
    };
    if let Some(t) = &body.tag {
        identity::validate_tag(t).map_err(|e| ApiError::invalid(vec![e]))?;
    }
    let n = body.image_urls.len() + stored.len();
    if n < min as usize || n > max as usize {
        return Err(ApiError::bad_request(
            Some(if stored.is_empty() {
                "image_urls"
            } else {
                "images"
            }),
            format!("the {tier} tier takes {min} to {max} photos, got {n}"),
            "body",
        ));
    }
    let mut photos: Vec<PhotoSource> = stored
        .iter()
        .map(|k| PhotoSource::Object {
            key: k.clone(),
            filename: None,
        })
        .collect();
    for (i, raw) in body.image_urls.iter().enumerate() {
        let url = s.egress.check_url(raw).await.map_err(|e| {
            ApiError::bad_request(
                Some(&format!("image_urls[{i}]")),
                format!("unusable URL: {e}"),
                "body",
            )
        })?;
        photos.push(PhotoSource::Url {
            url: url.to_string(),
        });
    }
    let count = photos.len() as u32;
    let spec = PreprocessSpec {
        identity_code: code.to_string(),
        kind: IdentityKind::Profile,
        photos: photos.clone(),
        // Most of the photos must show the subject clearly.
        min_usable: count.div_ceil(2),
        replaces: false,
    };
    let (billing, _) = s.store.billing_owner(&acc.id).await?;
    let job = preprocessing_job(s, &acc.id, &billing, spec, job_trace(headers).to_string());
    let ident = NewIdentity {
        code,
        account_id: &acc.id,
        kind: IdentityKind::Profile,
        name: code,
        tag: body.tag.as_deref(),
        original_filename: None,
        photo_key: stored.first().map(String::as_str),
        sources_json: serde_json::to_string(&photos).map_err(ApiError::internal)?,
        training_tier: Some(tier),
        slot_cap: None,
        promoted_from: None,
    };
    match s.store.create_identity(ident, job).await? {
        IdentityAdmission::Created { job_id, .. } => {
            metrics::counter!("atelier_jobs_created_total", "type" => IdentityKind::Profile.as_str()).increment(1);
            tracing::info!(profile = %code, job.id = %job_id, photos = count, "profile accepted");
            Ok((
                StatusCode::OK,
                axum::Json(ProfileAdded {
                    profile_id: code.to_string(),
                }),
            )
                .into_response())
        }
        IdentityAdmission::Refused(a) => Err(refusal(a)),
        IdentityAdmission::NameTaken { .. }
        | IdentityAdmission::SlotsExhausted { .. }
        | IdentityAdmission::AlreadyPromoted { .. } => {
            Err(ApiError::internal("profile id collision"))
        }
    }
}

async fn load(
    s: &AppState,
    account: &str,
    id: &str,
) -> ApiResult<atelier_shared::db::identities::IdentityRow> {
    s.store
        .identity_for(account, IdentityKind::Profile, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Profile {id} not found")))
}

pub async fn status(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<ProfileStatus>> {
    let p = load(&s, &acc.id, &id).await?;
    Ok(axum::Json(ProfileStatus {
        profile_id: p.code.clone(),
        status: profile_status(p.job_status),
        message: p.error_message(),
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct IdsQuery {
    /// Only profiles with exactly this tag.
    pub tag: Option<String>,
}

pub async fn ids(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Query(q): Query<IdsQuery>,
) -> ApiResult<axum::Json<ProfileIds>> {
    let (rows, _) = s
        .store
        .list_identities(
            &acc.id,
            IdentityKind::Profile,
            &IdentityQuery {
                page: 1,
                per_page: 1000,
                ascending: false,
                tag: q.tag.as_ref().map(|t| t.to_lowercase()),
                ..Default::default()
            },
        )
        .await?;
    // LIKE treats `_` and `%` as wildcards: keep exact matches only.
    let profiles = rows
        .iter()
        .filter(|p| q.tag.is_none() || p.tag == q.tag)
        .map(|p| ProfileEntry {
            profile_id: p.code.clone(),
            status: profile_status(p.job_status),
            tag: p.tag.clone(),
            created_at: iso8601(p.created_at),
        })
        .collect();
    Ok(axum::Json(ProfileIds { profiles }))
}

pub async fn picture(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let p = load(&s, &acc.id, &id).await?;
    let Some(key) = p.crop_key.as_deref() else {
        return Err(ApiError::conflict(
            "profile_not_ready",
            format!(
                "The profile is {}; its picture exists once it is READY",
                profile_status(p.job_status)
            ),
        ));
    };
    let bytes = s.objects.get(key).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            atelier_shared::storage::content_type_of(key),
        )],
        bytes,
    )
        .into_response())
}

pub async fn delete(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<ProfileDeleted>> {
    match s
        .store
        .delete_identity(&acc.id, IdentityKind::Profile, &id)
        .await?
    {
        DeleteIdentity::NotFound => Err(ApiError::not_found(format!("Profile {id} not found"))),
        DeleteIdentity::InUse { job_id } => Err(ApiError::conflict(
            "profile_in_use",
            format!("Job {job_id} is still working with this profile; abort it first"),
        )
        .with("job_id", job_id)),
        DeleteIdentity::Deleted { keys } => {
            s.erase(&keys).await;
            Ok(axum::Json(ProfileDeleted {
                profile_id: id,
                status: "ok",
            }))
        }
    }
}

/// The profile routes under one base path: the canonical `/v1/phota/profiles`
/// and the short `/profiles` alias share the handlers above; each base
/// gets its own documented operations.
macro_rules! profile_routes {
    ($module:ident, $add:literal, $ids:literal, $one:literal, $status:literal, $picture:literal) => {
        pub mod $module {
            use super::*;

            /// Create a profile from 10–50 photos (`standard`) or 5–10
            /// (`fast`), as public URLs (JSON) or uploads (multipart), and
            /// start building it.
            #[utoipa::path(
                post, path = $add, tag = "profiles",
                request_body(content(
                    (AddRequest = "application/json"),
                    (AddForm = "multipart/form-data"),
                )),
                responses((status = 200, description = "The profile; poll its status", body = ProfileAdded)),
            )]
            pub async fn add(
                s: State<AppState>,
                c: Caller,
                h: HeaderMap,
                r: Request,
            ) -> ApiResult<Response> {
                super::add(s, c, h, r).await
            }

            /// Every profile of the caller (unpaginated, contract §1.6).
            #[utoipa::path(
                get, path = $ids, tag = "profiles", params(IdsQuery),
                responses((status = 200, description = "The profiles", body = ProfileIds)),
            )]
            pub async fn ids(
                s: State<AppState>,
                c: Caller,
                q: Query<IdsQuery>,
            ) -> ApiResult<axum::Json<ProfileIds>> {
                super::ids(s, c, q).await
            }

            /// Deletes a profile and every photo, crop and embedding it had.
            #[utoipa::path(
                delete, path = $one, tag = "profiles",
                params(("profile_id" = String, Path, description = "The profile's id")),
                responses(
                    (status = 200, description = "Deleted", body = ProfileDeleted),
                    (status = 409, description = "A job still works with it", body = crate::error::ErrorBody),
                ),
            )]
            pub async fn delete(
                s: State<AppState>,
                c: Caller,
                p: Path<String>,
            ) -> ApiResult<axum::Json<ProfileDeleted>> {
                super::delete(s, c, p).await
            }

            /// A profile's build status: `IN_PROGRESS`, `READY` or `ERROR`.
            #[utoipa::path(
                get, path = $status, tag = "profiles",
                params(("profile_id" = String, Path, description = "The profile's id")),
                responses((status = 200, description = "Its status", body = ProfileStatus)),
            )]
            pub async fn status(
                s: State<AppState>,
                c: Caller,
                p: Path<String>,
            ) -> ApiResult<axum::Json<ProfileStatus>> {
                super::status(s, c, p).await
            }

            /// The profile's picture: its best face, aligned (JPEG).
            #[utoipa::path(
                get, path = $picture, tag = "profiles",
                params(("profile_id" = String, Path, description = "The profile's id")),
                responses(
                    (status = 200, description = "The picture", content_type = "image/jpeg", body = crate::views::Binary),
                    (status = 409, description = "The profile is not READY", body = crate::error::ErrorBody),
                ),
            )]
            pub async fn picture(s: State<AppState>, c: Caller, p: Path<String>) -> ApiResult<Response> {
                super::picture(s, c, p).await
            }
        }
    };
}

profile_routes!(
    phota,
    "/v1/phota/profiles/add",
    "/v1/phota/profiles/ids",
    "/v1/phota/profiles/{profile_id}",
    "/v1/phota/profiles/{profile_id}/status",
    "/v1/phota/profiles/{profile_id}/profile_picture"
);
profile_routes!(
    short,
    "/profiles/add",
    "/profiles/ids",
    "/profiles/{profile_id}",
    "/profiles/{profile_id}/status",
    "/profiles/{profile_id}/profile_picture"
);
