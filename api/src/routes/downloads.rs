//! ZIP export (contract §3.13): a signed, expiring link to a streamed ZIP of
//! the latest completed version of every output, plus `manifest.json`.

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::Json;
use crate::state::AppState;
use crate::views::{DownloadLink, ImageResult};
use async_zip::base::write::ZipFileWriter;
use async_zip::{Compression, ZipEntryBuilder};
use atelier_shared::storage::{Capability, SignError};
use atelier_shared::time::{iso8601, now_ms};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;
use tokio_util::io::ReaderStream;

/// At most this many images in one archive.
pub const MAX_ZIP_IMAGES: usize = 100;

#[derive(Deserialize, utoipa::ToSchema)]
pub struct One {
    pub job_id: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct Bulk {
    /// 1–100 jobs with at most 100 completed images together.
    pub job_ids: Vec<String>,
}

/// A signed link to a ZIP of a job's completed outputs and a
/// `manifest.json`.
#[utoipa::path(
    post, path = "/download", tag = "downloads",
    request_body = One,
    responses(
        (status = 200, description = "The link", body = DownloadLink),
        (status = 409, description = "No completed output yet", body = crate::error::ErrorBody),
    ),
)]
pub async fn issue(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Json(b): Json<One>,
) -> ApiResult<impl IntoResponse> {
    let job = s
        .store
        .job_for(&acc.id, &b.job_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Job {} not found", b.job_id)))?;
    if job.completed_outputs == 0 {
        return Err(ApiError::conflict(
            "conflict",
            "The job has no completed outputs yet",
        ));
    }
    link(&s, &acc.id, vec![job.id])
}

/// A signed link to one ZIP of several jobs' outputs.
#[utoipa::path(
    post, path = "/download/bulk", tag = "downloads",
    request_body = Bulk,
    responses(
        (status = 200, description = "The link", body = DownloadLink),
        (status = 409, description = "No completed output yet", body = crate::error::ErrorBody),
    ),
)]
pub async fn issue_bulk(
    State(s): State<AppState>,
    Caller(acc): Caller,
    Json(b): Json<Bulk>,
) -> ApiResult<impl IntoResponse> {
    if b.job_ids.is_empty() || b.job_ids.len() > MAX_ZIP_IMAGES {
        return Err(ApiError::bad_request(
            Some("job_ids"),
            format!("must name 1 to {MAX_ZIP_IMAGES} jobs"),
            "body",
        ));
    }
    let mut total = 0i64;
    let mut ids = Vec::new();
    for id in &b.job_ids {
        let job = s
            .store
            .job_for(&acc.id, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("Job {id} not found")))?;
        total += job.completed_outputs;
        if !ids.contains(&job.id) {
            ids.push(job.id);
        }
    }
    if total as usize > MAX_ZIP_IMAGES {
        return Err(ApiError::bad_request(
            Some("job_ids"),
            format!("{total} images exceed the limit of {MAX_ZIP_IMAGES} per archive"),
            "body",
        ));
    }
    if total == 0 {
        return Err(ApiError::conflict(
            "conflict",
            "None of the jobs has completed outputs yet",
        ));
    }
    link(&s, &acc.id, ids)
}

fn link(s: &AppState, account: &str, job_ids: Vec<String>) -> ApiResult<axum::Json<DownloadLink>> {
    let exp =
        now_ms() + Duration::from_secs(s.config.limits.download_url_ttl_secs).as_millis() as i64;
    let token = s.signer.sign(
        &Capability::Zip {
            job_ids,
            account_id: account.to_string(),
        },
        exp,
    );
    Ok(axum::Json(DownloadLink {
        download_url: s.url(&format!("/download/{token}")),
        expires: iso8601(exp),
    }))
}

/// The signed ZIP (no credentials; expires: 410).
#[utoipa::path(
    get, path = "/download/{token}", tag = "downloads", security(()),
    params(("token" = String, Path, description = "The signature in `download_url`")),
    responses(
        (status = 200, description = "The archive", content_type = "application/zip", body = crate::views::Binary),
        (status = 410, description = "The link has expired", body = crate::error::ErrorBody),
    ),
)]
pub async fn stream(
    State(s): State<AppState>,
    Path(token): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let (cap, _) = s.signer.verify(&token, now_ms()).map_err(|e| match e {
        SignError::Expired => {
            ApiError::new(StatusCode::GONE, "expired", "The download link has expired")
        }
        SignError::Invalid => ApiError::not_found("Unknown download link"),
    })?;
    let Capability::Zip {
        job_ids,
        account_id,
    } = cap
    else {
        return Err(ApiError::not_found("Unknown download link"));
    };
    // Collect everything before streaming, so a missing job is a 404, not a broken ZIP.
    let bulk = job_ids.len() > 1;
    let mut entries = Vec::new();
    let mut manifest = Vec::new();
    for id in &job_ids {
        let job = s
            .store
            .job_for(&account_id, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("Job {id} not found")))?;
        for o in s.store.latest_outputs(&job.id).await? {
            manifest.push(ImageResult::build(&s, &job, &o, &[]).await?);
            if let (Some(key), atelier_shared::domain::OutputStatus::Completed) =
                (o.full_key.clone(), o.status)
            {
                let name = format!(
                    "{}_{}_v{}.{}",
                    o.instruction_index, o.variation_index, o.version, o.output_format
                );
                entries.push((
                    if bulk {
                        format!("{}/{name}", job.id)
                    } else {
                        name
                    },
                    key,
                    o.finalized_at.unwrap_or(o.updated_at),
                ));
            }
        }
    }
    let filename = if bulk {
        "bulk.zip".to_string()
    } else {
        format!("{}.zip", job_ids[0])
    };
    let manifest =
        serde_json::to_vec_pretty(&json!({"results": manifest})).map_err(ApiError::internal)?;
    let (writer, reader) = tokio::io::duplex(256 * 1024);
    let objects = s.objects.clone();
    tokio::spawn(async move {
        let mut zip = ZipFileWriter::with_tokio(writer);
        for (name, key, at) in entries {
            let bytes = match objects.get(&key).await {
                Ok(b) => b,
                Err(e) => {
                    // Headers are sent: the client sees a truncated archive, which
                    // ZIP readers reject, rather than a silently incomplete one.
                    tracing::error!(key, error = %e, "zip: cannot read a result; aborting the archive");
                    return;
                }
            };
            // Images are already compressed: store them as they are.
            let entry = ZipEntryBuilder::new(name.into(), Compression::Stored)
                .last_modification_date(zip_date(at));
            if let Err(e) = zip.write_entry_whole(entry, &bytes).await {
                tracing::warn!(error = %e, "zip: client went away");
                return;
            }
        }
        let entry = ZipEntryBuilder::new("manifest.json".to_string().into(), Compression::Stored)
            .last_modification_date(zip_date(now_ms()));
        if zip.write_entry_whole(entry, &manifest).await.is_ok() {
            let _ = zip.close().await;
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/zip".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        Body::from_stream(ReaderStream::new(reader)),
    ))
}

/// ZIP timestamps (DOS format, UTC) for an epoch-millisecond instant.
fn zip_date(ms: i64) -> async_zip::ZipDateTime {
    let t = time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    async_zip::ZipDateTimeBuilder::new()
        .year(t.year())
        .month(u32::from(u8::from(t.month())))
        .day(u32::from(t.day()))
        .hour(u32::from(t.hour()))
        .minute(u32::from(t.minute()))
        .second(u32::from(t.second()))
        .build()
}
