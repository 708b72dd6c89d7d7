//! `asset_tagging` (contract §2.6): what kind of picture an uploaded file
//! is, so that `GET /assets` can filter by `model`, `product`,
//! `background` and `other`. A worker measures it once, right after the
//! upload, with the face detector and the backdrop analysis; the job is
//! free and quiet (no notification, no webhook, not in the caller's job
//! list), since the caller never asked for it.

use super::credits::{Credits, PriceTable};
use super::kinds::{JobKind, PlannedOutput, Requirements};
use super::packshot::ImageFormat;
use super::task::WorkQueue;
use serde::{Deserialize, Serialize};

/// The tags an asset can carry, in the contract's order.
pub const TAGS: [&str; 4] = ["model", "product", "background", "other"];

/// The spec of an `asset_tagging` job: the uploaded file to look at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaggingSpec {
    pub file_id: String,
}

/// What the worker found, kept as the output's description. Only `tags`
/// holds strings: `GET /assets` filters on the quoted tag names in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssetReport {
    pub tags: Vec<String>,
    pub detected: Detected,
}

/// The measurements behind the tags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detected {
    /// Faces the detector found, and the largest one's short side as a
    /// share of the picture's short side; `null` on a worker without the
    /// face models (nothing was looked for).
    pub faces: Option<u32>,
    pub largest_face: Option<f64>,
    /// Share of the picture that stands out from its border's colour, and
    /// how many picture edges that region touches.
    pub subject_fill: f64,
    pub subject_edges: u32,
    /// Whether what surrounds it is a uniform backdrop (white, one colour,
    /// or one finely textured surface) rather than a scene.
    pub plain_backdrop: bool,
}

impl Detected {
    /// The tag these measurements mean: a person's face big enough to be
    /// the subject is a `model` photo; a subject on a uniform backdrop,
    /// clear of at least two edges, is a `product` shot; a picture where
    /// nothing stands out from the border, or where what differs runs
    /// across it (a scene, a texture), is a `background`; anything else is
    /// `other`.
    pub fn tag(&self) -> &'static str {
        if self.faces.unwrap_or(0) > 0 && self.largest_face.unwrap_or(0.0) >= 0.04 {
            "model"
        } else if self.subject_fill >= 0.01
            && self.subject_fill <= 0.9
            && self.subject_edges <= 2
            && self.plain_backdrop
        {
            "product"
        } else if self.subject_fill < 0.01 || self.subject_edges >= 3 {
            "background"
        } else {
            "other"
        }
    }
}

/// The `asset_tagging` kind, on the `identity` queue: its workers always
/// hold the face detector, so a person's photo is never tagged without
/// looking for faces (a look at one picture, well under a second). Free,
/// holds no active-job slot, and quiet.
pub struct AssetTagging;

impl JobKind for AssetTagging {
    const NAME: &'static str = "asset_tagging";
    const QUEUE: WorkQueue = WorkQueue::Identity;
    const COUNTS_AGAINST_CAP: bool = false;
    const QUIET: bool = true;
    type Spec = TaggingSpec;

    fn plan(_: &TaggingSpec, _: &PriceTable) -> Vec<PlannedOutput> {
        vec![PlannedOutput {
            instruction_index: 0,
            variation_index: 0,
            cost: Credits::ZERO,
            format: ImageFormat::Jpg,
        }]
    }

    fn requirements(spec: &TaggingSpec) -> Requirements<'_> {
        Requirements {
            files: vec![spec.file_id.as_str()],
            identity: None,
            profiles: Vec::new(),
        }
    }

    fn post_process(_: &TaggingSpec) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(faces: u32, face: f64, fill: f64, edges: u32, plain: bool) -> Detected {
        Detected {
            faces: Some(faces),
            largest_face: Some(face),
            subject_fill: fill,
            subject_edges: edges,
            plain_backdrop: plain,
        }
    }

    #[test]
    fn each_measurement_means_one_tag() {
        assert_eq!(d(1, 0.2, 0.4, 1, true).tag(), "model");
        // A face in a crowd far away does not make a model photo.
        assert_eq!(d(1, 0.01, 0.4, 0, true).tag(), "product");
        assert_eq!(d(0, 0.0, 0.4, 0, true).tag(), "product");
        assert_eq!(d(0, 0.0, 0.0, 0, true).tag(), "background");
        assert_eq!(d(0, 0.0, 0.7, 4, false).tag(), "background");
        assert_eq!(d(0, 0.0, 0.4, 1, false).tag(), "other");
        // Not looked for: a face cannot make it a model photo.
        let unmeasured = Detected {
            faces: None,
            largest_face: None,
            ..d(0, 0.0, 0.4, 0, true)
        };
        assert_eq!(unmeasured.tag(), "product");
        assert_eq!(d(0, 0.0, 0.95, 2, true).tag(), "other");
    }

    #[test]
    fn a_report_holds_no_string_but_its_tags() {
        let r = AssetReport {
            tags: vec!["product".into()],
            detected: d(0, 0.0, 0.3, 0, true),
        };
        let text = serde_json::to_string(&r).expect("json");
        for t in TAGS {
            let quoted = format!("\"{t}\"");
            assert_eq!(
                text.matches(&quoted).count(),
                usize::from(t == "product"),
                "{text}"
            );
        }
    }
}
