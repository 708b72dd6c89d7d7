//! Identities (contract §5) and profiles (§9): the `identity_preprocessing`
//! job kind that builds them, request validation, and what a preprocessing
//! run records about the face it built.

use super::JobStatus;
use super::credits::PriceTable;
use super::kinds::{IdentityUse, JobKind, PlannedOutput, Requirements};
use super::packshot::{FieldError, ImageFormat};
use super::task::WorkQueue;
use serde::{Deserialize, Serialize};

/// Longest identity name (contract §5.7).
pub const MAX_NAME: usize = 128;

/// An identity's `preprocessing_status` from its preprocessing job's status
/// (`None`: no job yet). An aborted preprocessing is a failed one.
pub fn preprocessing_status(job_status: Option<JobStatus>) -> &'static str {
    match job_status {
        None => JobStatus::Pending.as_str(),
        Some(s @ (JobStatus::Pending | JobStatus::Processing | JobStatus::Completed)) => s.as_str(),
        Some(JobStatus::Failed | JobStatus::Aborted) => JobStatus::Failed.as_str(),
    }
}

/// A profile's `status` (contract §9.2) from its build job's status. The
/// seed knows `IN_PROGRESS`, `READY` and `ERROR`; queued work is shown as
/// `IN_PROGRESS` so that seed-era clients keep polling.
pub fn profile_status(job_status: Option<JobStatus>) -> &'static str {
    match job_status {
        None | Some(JobStatus::Pending | JobStatus::Processing) => "IN_PROGRESS",
        Some(JobStatus::Completed) => "READY",
        Some(JobStatus::Failed | JobStatus::Aborted) => "ERROR",
    }
}

/// How preprocessing failures caused by the photo itself begin: these are
/// the client's to fix (400), everything else is the platform's.
pub const INPUT_PROBLEMS: [&str; 7] = [
    "no face detected",
    "several faces detected",
    "face too small",
    "unreadable image",
    "image too large",
    "no usable photo",
    "photo unavailable",
];

/// Whether a preprocessing error is about the photo (see [`INPUT_PROBLEMS`]).
pub fn is_input_problem(message: &str) -> bool {
    INPUT_PROBLEMS.iter().any(|p| message.starts_with(p))
}

/// Whether an input problem means no single usable face was found
/// (`face_detected: false` in the upload answer).
pub fn is_face_problem(message: &str) -> bool {
    INPUT_PROBLEMS[..3].iter().any(|p| message.starts_with(p))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// One photo, one clearly visible face (contract §5.2).
    Identity,
    /// Several photos of one subject (contract §9.1).
    Profile,
}

impl IdentityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Identity => "identity",
            IdentityKind::Profile => "profile",
        }
    }
}

/// Where a photo to preprocess comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum PhotoSource {
    /// Already in the object store (uploaded with the request).
    Object {
        key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filename: Option<String>,
    },
    /// A public URL the worker fetches through the egress guard.
    Url { url: String },
}

/// The spec of an `identity_preprocessing` job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessSpec {
    pub identity_code: String,
    pub kind: IdentityKind,
    pub photos: Vec<PhotoSource>,
    /// Photos that must pass the face checks for the build to succeed
    /// (1 for an identity; a profile needs most of its photos).
    pub min_usable: u32,
    /// A face replacement (`POST /identity/{code}/pov`): the identity's
    /// status does not follow this job's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replaces: bool,
}

/// The `identity_preprocessing` kind: builds an identity or a profile from
/// its photos on the `identity` queue. It holds no active-job slot (the
/// identity slots cap identities instead).
pub struct IdentityPreprocessing;

impl JobKind for IdentityPreprocessing {
    const NAME: &'static str = "identity_preprocessing";
    const QUEUE: WorkQueue = WorkQueue::Identity;
    const COUNTS_AGAINST_CAP: bool = false;
    type Spec = PreprocessSpec;

    /// One output (the face crop) at the identity price; a face
    /// replacement is free (contract §5.8).
    fn plan(spec: &PreprocessSpec, prices: &PriceTable) -> Vec<PlannedOutput> {
        let price = match (spec.kind, spec.replaces) {
            (_, true) => 0.0,
            (IdentityKind::Identity, false) => prices.identity,
            (IdentityKind::Profile, false) => prices.profile,
        };
        vec![PlannedOutput {
            instruction_index: 0,
            variation_index: 0,
            cost: PriceTable::flat(price),
            format: ImageFormat::Jpg,
        }]
    }

    /// Its photos are its own objects (or public URLs): nothing to check
    /// but the identity it builds.
    fn requirements(spec: &PreprocessSpec) -> Requirements<'_> {
        Requirements {
            files: Vec::new(),
            identity: Some(IdentityUse::Builds(&spec.identity_code)),
            profiles: Vec::new(),
        }
    }

    fn post_process(_: &PreprocessSpec) -> bool {
        false
    }
}

/// What one photo of a build contributed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhotoReport {
    pub index: u32,
    pub accepted: bool,
    /// Why the photo was not used (no face, several faces, too small,
    /// blurred, another person, unreadable, unreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub face_score: Option<f32>,
    /// Shorter side of the face box, pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub face_px: Option<f32>,
    /// Quality of the photo's face, 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<f32>,
    /// Cosine similarity to the identity's final embedding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
}

/// The description a completed preprocessing output carries: where the
/// face crop's landmarks are and where the embedding is stored. The crop
/// itself is the output's full-size image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaceRecord {
    /// Object key of the embedding: `dims` little-endian f32, unit length.
    pub embedding_key: String,
    pub dims: u32,
    /// Side of the square face crop (the output image), pixels.
    pub crop_size: u32,
    /// The five landmarks (eyes, nose, mouth corners) in crop pixels.
    pub landmarks: [[f32; 2]; 5],
    /// Overall quality, 0–1 (contract `quality_score`).
    pub quality_score: f32,
    /// The best face's box in its photo, and that photo's index and size.
    pub photo_index: u32,
    pub face_box: [f32; 4],
    pub photo_width: u32,
    pub photo_height: u32,
    pub photos: Vec<PhotoReport>,
    /// An identity's points of view (contract §5.8), in photo order: each
    /// photo's face and shoulders normalised to [`POV_SIZE`]². Empty for
    /// profiles and for identities built before points of view were kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub povs: Vec<PovImage>,
}

/// One point of view of an identity: photo `index` of its preprocessing,
/// normalised, with its thumbnail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PovImage {
    pub index: u32,
    pub key: String,
    pub thumb_key: String,
}

/// Points of view an identity keeps at most (contract §5.8: `pov_index`
/// is `0..IDENTITY_POVS`). Each is a photo of the same person; the face
/// that model swap uses is built from all of them.
pub const IDENTITY_POVS: usize = 4;

/// Side of a point-of-view image (contract §5.8: "normalised to
/// 1024×1024").
pub const POV_SIZE: u32 = 1024;

impl FaceRecord {
    /// `quality_score` as shown to clients (three decimals).
    pub fn quality(&self) -> f64 {
        round3(self.quality_score)
    }
}

/// An `f32` score as a clean JSON number with three decimals (`0.799`, not
/// `0.7990000247955322`).
pub fn round3(v: f32) -> f64 {
    (f64::from(v) * 1000.0).round() / 1000.0
}

/// A default identity name from an uploaded file name: its stem, trimmed to
/// [`MAX_NAME`] characters (contract §5.2).
pub fn name_from_filename(filename: &str) -> String {
    let stem = filename
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(filename)
        .rsplit_once('.')
        .map(|(s, _)| s)
        .unwrap_or(filename)
        .trim();
    let stem = if stem.is_empty() { "identity" } else { stem };
    stem.chars().take(MAX_NAME).collect()
}

/// Checks a client-given identity name.
pub fn validate_name(name: &str) -> Result<String, FieldError> {
    let n = name.trim();
    if n.is_empty() {
        return Err(FieldError::new("name", "must not be empty"));
    }
    if n.chars().count() > MAX_NAME {
        return Err(FieldError::new(
            "name",
            format!("must be at most {MAX_NAME} characters"),
        ));
    }
    if n.chars().any(char::is_control) {
        return Err(FieldError::new(
            "name",
            "must not contain control characters",
        ));
    }
    Ok(n.to_string())
}

/// Checks a tag (1–128 characters, no control characters).
pub fn validate_tag(tag: &str) -> Result<String, FieldError> {
    let t = tag.trim();
    if t.is_empty() || t.chars().count() > MAX_NAME {
        return Err(FieldError::new(
            "tag",
            format!("must be 1 to {MAX_NAME} characters"),
        ));
    }
    validate_text("tag", t)?;
    Ok(t.to_string())
}

/// Free text a filter or field may hold: no control characters (NUL
/// cannot even be stored), at most 1000 characters.
pub fn validate_text(field: &str, text: &str) -> Result<(), FieldError> {
    if text.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    if text.chars().count() > 1000 {
        return Err(FieldError::new(field, "must be at most 1000 characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_job() {
        assert_eq!(preprocessing_status(None), "pending");
        assert_eq!(
            preprocessing_status(Some(JobStatus::Processing)),
            "processing"
        );
        assert_eq!(preprocessing_status(Some(JobStatus::Aborted)), "failed");
        assert_eq!(profile_status(Some(JobStatus::Pending)), "IN_PROGRESS");
        assert_eq!(profile_status(Some(JobStatus::Completed)), "READY");
        assert_eq!(profile_status(Some(JobStatus::Failed)), "ERROR");
    }

    #[test]
    fn names() {
        assert_eq!(name_from_filename("photos/Anna B.jpeg"), "Anna B");
        assert_eq!(name_from_filename(".jpg"), "identity");
        assert_eq!(name_from_filename("noext"), "noext");
        assert!(validate_name("  ").is_err());
        assert!(validate_name(&"x".repeat(129)).is_err());
        assert_eq!(validate_name(" Eva ").expect("ok"), "Eva");
        assert!(validate_tag("a\u{0}b").is_err());
        assert!(validate_tag("").is_err());
        assert_eq!(validate_tag(" user_42 ").expect("ok"), "user_42");
        assert!(validate_text("search", "x\ny").is_err());
    }
}
