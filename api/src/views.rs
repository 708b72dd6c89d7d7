//! Response shapes of the contract, as types built from store rows. The
//! same types describe the answers in the OpenAPI document.

use crate::error::ApiError;
use crate::state::AppState;
use atelier_shared::db::identities::IdentityRow;
use atelier_shared::db::projects::Project;
use atelier_shared::db::rows::{JobRow, OutputRow};
use atelier_shared::domain::identity::{FaceRecord, preprocessing_status};
use atelier_shared::domain::{JobSpec, JobStatus, JobType, OutputStatus};
use atelier_shared::storage::content_type_of;
use atelier_shared::time::iso8601;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// Offset pagination (contract §1.6).
#[derive(Debug, Serialize, ToSchema)]
pub struct Pagination {
    pub page: i64,
    pub per_page: i64,
    pub total: i64,
    pub pages: i64,
    pub has_next: bool,
    pub has_prev: bool,
}

impl Pagination {
    pub fn new(page: i64, per_page: i64, total: i64) -> Pagination {
        let pages = if total == 0 {
            0
        } else {
            (total + per_page - 1) / per_page
        };
        Pagination {
            page,
            per_page,
            total,
            pages,
            has_next: page < pages,
            has_prev: page > 1,
        }
    }
}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
}

/// `GET /readyz`: whether this process's roles can serve, dependency by
/// dependency.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, or `not_ready` (answered with 503).
    pub status: &'static str,
    /// Each dependency checked (`database`, `queue`, `object_store`,
    /// `models`): `ok`, or why not.
    pub checks: std::collections::BTreeMap<&'static str, String>,
}

/// A project (contract §2.1–§2.3).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectView {
    pub project_id: String,
    /// Alias of `project_id`.
    pub project_key: String,
    pub project_name: String,
    /// Alias of `project_name`.
    pub project_text: String,
    pub created_at: String,
    pub created_by: String,
    pub total_images: i64,
}

impl From<&Project> for ProjectView {
    fn from(p: &Project) -> Self {
        ProjectView {
            project_id: p.id.clone(),
            project_key: p.id.clone(),
            project_name: p.name.clone(),
            project_text: p.name.clone(),
            created_at: iso8601(p.created_at),
            created_by: p.created_by.clone(),
            total_images: p.total_images,
        }
    }
}

/// `POST /project` (201).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectCreated {
    pub project_id: String,
    pub project_name: String,
    pub project_key: String,
    pub created_at: String,
}

/// `GET /project`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectList {
    pub projects: Vec<ProjectView>,
    pub pagination: Pagination,
}

/// `POST /upload`: where to send the bytes (contract §2.4).
#[derive(Debug, Serialize, ToSchema)]
pub struct UploadSlot {
    /// Signed `PUT` target; no credentials needed, single use.
    pub upload_url: String,
    /// Signed `GET` of the stored file once uploaded.
    pub download_url: String,
    pub file_id: String,
    pub filename: String,
    /// The `Content-Type` the `PUT` must carry.
    pub content_type: String,
    pub project_id: String,
    pub project_name: String,
}

/// Raw bytes (images, archives) in a request or an answer.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct Binary(#[allow(dead_code)] Vec<u8>);

/// `202` of every job-creating route (contract §1.10).
#[derive(Debug, Serialize, ToSchema)]
pub struct JobAccepted {
    pub job_id: String,
    pub status: JobStatus,
    pub total_outputs: i64,
    pub message: String,
    /// Identity creation: the instructions of the job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_instructions: Option<i64>,
    /// Identity creation: Σ `num_variations` (the drafts asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_variations: Option<i64>,
}

/// An output's status as the contract shows it (`dispatched` is still
/// `pending`, `cancelled` is `failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PublicOutputStatus {
    Pending,
    Processing,
    Completed,
    Failed,
}

impl From<OutputStatus> for PublicOutputStatus {
    fn from(s: OutputStatus) -> Self {
        match s {
            OutputStatus::Pending | OutputStatus::Dispatched => PublicOutputStatus::Pending,
            OutputStatus::Running => PublicOutputStatus::Processing,
            OutputStatus::Completed => PublicOutputStatus::Completed,
            OutputStatus::Failed | OutputStatus::Cancelled => PublicOutputStatus::Failed,
        }
    }
}

/// `GET /jobs` (extension): a page of the caller's jobs.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobStatusView>,
    pub pagination: Pagination,
}

/// `JobStatus` (contract §3.9).
#[derive(Debug, Serialize, ToSchema)]
pub struct JobStatusView {
    pub job_id: String,
    pub job_type: JobType,
    pub status: JobStatus,
    /// 0–100.
    pub progress: f64,
    pub total_images: i64,
    pub processed_images: i64,
    pub should_post_process: bool,
    pub post_processing_status: Option<JobStatus>,
    pub post_processing_error: Option<String>,
    pub error_message: Option<String>,
    pub identity_code: Option<String>,
    pub identity_name: Option<String>,
    pub project_id: Option<String>,
    pub project_key: Option<String>,
    pub project_text: Option<String>,
    /// The normalised job, as the job's kind validated it.
    #[schema(value_type = Object)]
    pub processing_options: Value,
    pub credits_reserved: f64,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&JobRow> for JobStatusView {
    fn from(j: &JobRow) -> Self {
        JobStatusView {
            job_id: j.id.clone(),
            job_type: j.job_type,
            status: j.status,
            progress: j.progress(),
            total_images: j.total_outputs,
            processed_images: j.processed(),
            should_post_process: j.should_post_process,
            post_processing_status: j.post_processing_status,
            post_processing_error: j.post_processing_error.clone(),
            error_message: j.error_message.clone(),
            identity_code: j.identity_code.clone(),
            identity_name: None,
            project_id: j.project_id.clone(),
            project_key: j.project_id.clone(),
            project_text: j.project_name.clone(),
            processing_options: j.spec.to_value().unwrap_or(Value::Null),
            credits_reserved: j.credits_held as f64 / 1000.0,
            created_at: iso8601(j.created_at),
            updated_at: iso8601(j.updated_at),
        }
    }
}

/// Signed links to an image and its thumbnail.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImageLinks {
    pub full_size: Option<String>,
    pub thumbnail: Option<String>,
}

/// `ImageResult` (contract §3.10). URLs are signed for the result TTL.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageResult {
    pub id: i64,
    pub image_result_id: i64,
    pub job_id: String,
    pub image_index: i64,
    pub group_index: i64,
    pub instruction_index: i64,
    pub variation_index: i64,
    pub version: i64,
    pub status: PublicOutputStatus,
    pub original_filename: String,
    pub download_filename: String,
    pub inputs: Vec<ImageLinks>,
    pub output: ImageLinks,
    pub output_format: String,
    pub model_used: Option<String>,
    /// What this output costs (an extension): charged once it completed,
    /// held while it is pending or running, 0 once it failed (released).
    pub credits: f64,
    /// What the engine did with the inputs.
    #[schema(value_type = Object)]
    pub input_description: Value,
    pub quality_score: Option<f64>,
    /// Seconds.
    pub processing_time: Option<f64>,
    pub error_message: Option<String>,
    pub feedback: Option<String>,
    pub feedback_comment: Option<String>,
    pub created_at: String,
}

impl ImageResult {
    pub async fn build(
        s: &AppState,
        job: &JobRow,
        o: &OutputRow,
        inputs: &[ImageLinks],
    ) -> Result<ImageResult, ApiError> {
        let ttl = s.result_ttl();
        let link = |k: Option<&String>| {
            let k = k.cloned();
            async move {
                match k {
                    Some(k) => s.object_url(&k, content_type_of(&k), ttl).await.map(Some),
                    None => Ok(None),
                }
            }
        };
        let ext = &o.output_format;
        // A model swap's output is one input photo made over: it keeps the
        // photo's own name (contract §3.10).
        let mut original_filename =
            format!("{}_{}.{}", o.instruction_index, o.variation_index, ext);
        if let atelier_shared::domain::JobSpec::ModelSwap(spec) = &job.spec
            && let Some(img) = usize::try_from(o.instruction_index)
                .ok()
                .and_then(|i| spec.images.get(i))
            && let Some(f) = s.store.file(&img.file_id).await?
        {
            original_filename = f.filename;
        }
        Ok(ImageResult {
            id: o.id,
            image_result_id: o.id,
            job_id: job.id.clone(),
            image_index: o.instruction_index,
            group_index: o.variation_index,
            instruction_index: o.instruction_index,
            variation_index: o.variation_index,
            version: o.version,
            status: o.status.into(),
            original_filename,
            download_filename: format!(
                "{}_{}_{}_v{}.{}",
                job.id, o.instruction_index, o.variation_index, o.version, ext
            ),
            inputs: inputs.to_vec(),
            output: ImageLinks {
                full_size: link(o.full_key.as_ref()).await?,
                thumbnail: link(o.thumb_key.as_ref()).await?,
            },
            output_format: ext.clone(),
            model_used: o.model_used.clone(),
            credits: match o.status {
                OutputStatus::Failed | OutputStatus::Cancelled => 0.0,
                _ => o.cost as f64 / 1000.0,
            },
            input_description: o
                .input_description
                .as_deref()
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or_else(|| Value::Object(Default::default())),
            quality_score: None,
            processing_time: o.processing_ms.map(|ms| ms as f64 / 1000.0),
            error_message: matches!(o.status, OutputStatus::Failed | OutputStatus::Cancelled)
                .then(|| o.error_message.clone())
                .flatten(),
            feedback: None,
            feedback_comment: None,
            created_at: iso8601(o.created_at),
        })
    }
}

/// `summary` of a job's results.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResultSummary {
    pub total_images: usize,
    pub successful: usize,
    pub failed: usize,
    pub average_quality_score: Option<f64>,
    pub success_rate: f64,
}

impl ResultSummary {
    pub fn of(outputs: &[OutputRow]) -> ResultSummary {
        let successful = outputs
            .iter()
            .filter(|o| o.status == OutputStatus::Completed)
            .count();
        let failed = outputs
            .iter()
            .filter(|o| matches!(o.status, OutputStatus::Failed | OutputStatus::Cancelled))
            .count();
        ResultSummary {
            total_images: outputs.len(),
            successful,
            failed,
            average_quality_score: None,
            success_rate: if outputs.is_empty() {
                0.0
            } else {
                successful as f64 / outputs.len() as f64
            },
        }
    }
}

/// What a preprocessing job made of its identity (contract §3.10).
#[derive(Debug, Serialize, ToSchema)]
pub struct JobIdentity {
    pub identity_code: String,
    pub preprocessing_status: &'static str,
    pub quality_score: Option<f64>,
    /// Seconds.
    pub preprocessing_time: Option<f64>,
}

impl JobIdentity {
    /// For jobs that build an identity; `None` for every other kind.
    pub fn of(job: &JobRow, outputs: &[OutputRow]) -> Option<JobIdentity> {
        let (Some(code), JobSpec::IdentityPreprocessing(_)) = (&job.identity_code, &job.spec)
        else {
            return None;
        };
        let record = outputs.first().and_then(|o| {
            o.input_description
                .as_deref()
                .and_then(|d| serde_json::from_str::<FaceRecord>(d).ok())
        });
        Some(JobIdentity {
            identity_code: code.clone(),
            preprocessing_status: preprocessing_status(Some(job.status)),
            quality_score: record.map(|r| r.quality()),
            preprocessing_time: job
                .finalized_at
                .map(|f| (f - job.created_at).max(0) as f64 / 1000.0),
        })
    }
}

/// `GET /jobs/{job_id}/results` (contract §3.10).
#[derive(Debug, Serialize, ToSchema)]
pub struct JobResults {
    #[serde(flatten)]
    pub job: JobStatusView,
    pub results: Vec<ImageResult>,
    pub summary: ResultSummary,
    /// Charged credits once the job is terminal.
    pub credits_used: Option<f64>,
    pub identity: Option<JobIdentity>,
}

/// `POST /jobs/{job_id}/abort` (202).
#[derive(Debug, Serialize, ToSchema)]
pub struct JobAborted {
    pub job_id: String,
    pub status: JobStatus,
}

/// A signed ZIP link (contract §3.13).
#[derive(Debug, Serialize, ToSchema)]
pub struct DownloadLink {
    pub download_url: String,
    pub expires: String,
}

/// `GET /billing/balance` (contract §10.5).
#[derive(Debug, Serialize, ToSchema)]
pub struct Balance {
    pub user_credits: f64,
    pub in_progress_credits: f64,
    pub available_credits: f64,
    /// `self`, or the group whose credits this account spends.
    pub billing_owner: String,
}

/// `POST /admin/credits/grants` (201).
#[derive(Debug, Serialize, ToSchema)]
pub struct GrantRecorded {
    pub grant_id: String,
    pub user_credits: f64,
}

/// The identity object (contract §5.1).
#[derive(Debug, Serialize, ToSchema)]
pub struct IdentityView {
    pub identity_code: String,
    pub name: String,
    /// Signed link to the photo.
    pub link: Option<String>,
    /// Signed link to the aligned face crop.
    pub face_link: Option<String>,
    pub original_filename: Option<String>,
    pub visibility: &'static str,
    pub groups: Vec<String>,
    pub created_by: String,
    pub image_description: Option<ImageDescription>,
    pub tag: Option<String>,
    /// `pending`, `processing`, `completed` or `failed`.
    pub preprocessing_status: &'static str,
    pub preprocessing_job_id: Option<String>,
    pub preprocessing_time: Option<f64>,
    pub quality_score: Option<f64>,
    pub error_message: Option<String>,
    pub tier: Option<String>,
    /// Only in lists with `include_locked=true`: a platform identity above
    /// the caller's plan.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked: Option<bool>,
    pub created_at: String,
    pub updated_at: String,
}

/// What is known of the person: the owner's tag, and for a platform
/// identity the operator's `gender` and `age` (nothing is guessed from
/// the photo).
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageDescription {
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gender: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age: Option<i64>,
}

impl IdentityView {
    pub async fn build(s: &AppState, i: &IdentityRow) -> Result<IdentityView, ApiError> {
        let ttl = s.result_ttl();
        let link = match &i.photo_key {
            Some(k) => Some(s.object_url(k, content_type_of(k), ttl).await?),
            None => None,
        };
        let face_link = match &i.crop_key {
            Some(k) => Some(s.object_url(k, content_type_of(k), ttl).await?),
            None => None,
        };
        let groups = s.store.identity_groups(&i.code).await?;
        Ok(IdentityView {
            identity_code: i.code.clone(),
            name: i.name.clone(),
            link,
            face_link,
            original_filename: i.original_filename.clone(),
            visibility: match (&i.default_tier, groups.is_empty()) {
                (Some(_), _) => "default",
                (None, false) => "shared",
                (None, true) => "private",
            },
            groups,
            created_by: i.created_by.clone(),
            image_description: (i.tag.is_some() || i.gender.is_some() || i.age.is_some()).then(
                || ImageDescription {
                    tags: i.tag.iter().cloned().collect(),
                    gender: i.gender.clone(),
                    age: i.age,
                },
            ),
            tag: i.tag.clone(),
            preprocessing_status: i.preprocessing_status(),
            preprocessing_job_id: i.job_id.clone(),
            preprocessing_time: i.preprocessing_time(),
            quality_score: i.record().map(|r| r.quality()),
            error_message: i.error_message(),
            tier: i.default_tier.clone(),
            locked: None,
            created_at: iso8601(i.created_at),
            updated_at: iso8601(i.job_finalized_at.unwrap_or(i.updated_at).max(i.updated_at)),
        })
    }
}

/// The face an upload found, in photo pixels; `{}` while it is unknown.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum FaceMetadata {
    Found(FaceFound),
    Unknown(Empty),
}

/// An empty JSON object.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Empty {}

#[derive(Debug, Serialize, ToSchema)]
pub struct FaceFound {
    /// The detector's score of the face, when the photo recorded one.
    pub confidence: Option<f64>,
    pub x: f32,
    pub y: f32,
    pub width: f32,
    pub height: f32,
    pub image_width: u32,
    pub image_height: u32,
    pub quality_score: f64,
}

impl FaceMetadata {
    pub fn unknown() -> FaceMetadata {
        FaceMetadata::Unknown(Empty {})
    }

    pub fn of(r: &FaceRecord) -> FaceMetadata {
        FaceMetadata::Found(FaceFound {
            confidence: r
                .photos
                .first()
                .and_then(|p| p.face_score)
                .map(atelier_shared::domain::identity::round3),
            x: r.face_box[0],
            y: r.face_box[1],
            width: r.face_box[2] - r.face_box[0],
            height: r.face_box[3] - r.face_box[1],
            image_width: r.photo_width,
            image_height: r.photo_height,
            quality_score: r.quality(),
        })
    }
}

/// `POST /identity/upload` (201): the identity and what the face check found.
#[derive(Debug, Serialize, ToSchema)]
pub struct IdentityUploaded {
    #[serde(flatten)]
    pub identity: IdentityView,
    pub success: bool,
    /// `true` once a face passed the checks; `null` while the check runs.
    pub face_detected: Option<bool>,
    pub face_metadata: FaceMetadata,
}

/// `GET /identity`.
#[derive(Debug, Serialize, ToSchema)]
pub struct IdentityList {
    pub identities: Vec<IdentityView>,
    pub pagination: Pagination,
}

/// `GET /identity/{identity_code}/status` (contract §5.5).
#[derive(Debug, Serialize, ToSchema)]
pub struct IdentityStatus {
    pub identity_code: String,
    pub preprocessing_status: &'static str,
    pub preprocessing_job_id: Option<String>,
    pub preprocessing_time: Option<f64>,
    pub quality_score: Option<f64>,
    pub error_message: Option<String>,
}

impl From<&IdentityRow> for IdentityStatus {
    fn from(row: &IdentityRow) -> Self {
        IdentityStatus {
            identity_code: row.code.clone(),
            preprocessing_status: row.preprocessing_status(),
            preprocessing_job_id: row.job_id.clone(),
            preprocessing_time: row.preprocessing_time(),
            quality_score: row.record().map(|r| r.quality()),
            error_message: row.error_message(),
        }
    }
}

/// One processed image of a point-of-view replacement.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessedImage {
    pub original_filename: Option<String>,
    pub link: String,
    pub thumbnail_link: String,
}

/// `POST /identity/{identity_code}/pov` (contract §5.8).
#[derive(Debug, Serialize, ToSchema)]
pub struct PovReplaced {
    pub success: bool,
    pub pov_index: i64,
    pub processed_images: Vec<ProcessedImage>,
    pub processed_count: usize,
    /// `processing` while the new face is still being checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preprocessing_status: Option<JobStatus>,
    pub preprocessing_job_id: String,
}

/// `POST /v1/phota/profiles/add` (contract §9.1).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProfileAdded {
    pub profile_id: String,
}

/// `GET /v1/phota/profiles/{profile_id}/status` (contract §9.2).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProfileStatus {
    pub profile_id: String,
    /// `IN_PROGRESS`, `READY` or `ERROR`.
    pub status: &'static str,
    pub message: Option<String>,
}

/// One entry of `GET /v1/phota/profiles/ids`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProfileEntry {
    pub profile_id: String,
    pub status: &'static str,
    pub tag: Option<String>,
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProfileIds {
    pub profiles: Vec<ProfileEntry>,
}

/// `DELETE /v1/phota/profiles/{profile_id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProfileDeleted {
    pub profile_id: String,
    /// `ok`.
    pub status: &'static str,
}

/// The webhook (contract §4.5–4.6).
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookView {
    pub id: i64,
    pub url: String,
    /// The signing secret: shown once, by the `PUT` that set it.
    pub secret: Option<String>,
    pub is_active: bool,
    pub created_at: String,
    pub updated_at: String,
    pub last_response_status: Option<i64>,
    pub last_response_at: Option<String>,
    pub consecutive_failures: i64,
}

/// One webhook delivery and its attempts.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    pub id: i64,
    pub notification_id: i64,
    pub event: String,
    pub job_id: Option<String>,
    pub delivery_id: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: Option<String>,
    pub last_response_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryView>,
    pub pagination: Pagination,
}

/// A short acknowledgement (`202` of a queued action).
#[derive(Debug, Serialize, ToSchema)]
pub struct Queued {
    pub message: String,
}

/// `201` of `POST /identity/promote-generated` (contract §5.7).
#[derive(Debug, Serialize, ToSchema)]
pub struct IdentityPromoted {
    pub identity_code: String,
    pub preprocessing_job_id: String,
    /// `pending`: preprocessing has started.
    pub status: JobStatus,
    pub message: String,
}

/// `202` of `POST /jobs/{job_id}/regenerate/{image_index}` (§3.11).
#[derive(Debug, Serialize, ToSchema)]
pub struct Regenerated {
    pub success: bool,
    pub message: String,
    pub image_index: i64,
    pub group_index: i64,
    /// The new version's number.
    pub version: i64,
}

/// `known_subjects` of a Studio answer.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct KnownSubjects {
    /// How many times each named profile appears across all outputs.
    pub counts: std::collections::BTreeMap<String, u64>,
}

/// `200` of `/v1/phota/edit` and `/v1/phota/generate` (§9.4).
#[derive(Debug, Serialize, ToSchema)]
pub struct StudioAnswer {
    /// Base64 images, no `data:` prefix (`response_mode: bytes`).
    pub images: Vec<String>,
    /// Signed URLs valid 24 h (`response_mode: urls`).
    pub download_urls: Vec<String>,
    pub known_subjects: KnownSubjects,
    /// The job behind the call (`GET /jobs/{job_id}/results`).
    pub job_id: String,
}
