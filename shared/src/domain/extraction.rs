//! `preset_extraction` (contract §6.8, §6.18): drafting a preset's
//! `instruction_data` from reference images. The measuring happens on a
//! worker (it needs the segmentation and face models); this is the job
//! kind that carries it, and the rule that words the traits several
//! images share identically.

use super::credits::PriceTable;
use super::kinds::{JobKind, PlannedOutput, Requirements};
use super::packshot::ImageFormat;
use super::presets::PresetType;
use super::task::WorkQueue;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Most images one category extraction reads (contract §6.18).
pub const MAX_IMAGES: usize = 6;

/// The spec of a `preset_extraction` job: one output per image, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtractionSpec {
    pub preset_type: PresetType,
    pub file_ids: Vec<String>,
}

/// What a worker measured in one image: the draft instruction and the
/// figures it came from (kept in the output's description, so that every
/// word of a draft can be traced to a measurement).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtractionReport {
    pub instruction_data: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggested_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggested_description: Option<String>,
    /// The raw figures (fill ratio, palette shares, luminance gradients…).
    #[serde(default)]
    pub measurements: Value,
}

/// The `preset_extraction` kind. It runs on the `identity` queue, whose
/// workers hold the face models as well as the segmenter; it holds no
/// active-job slot (a client waits for it inside one request).
pub struct PresetExtraction;

impl JobKind for PresetExtraction {
    const NAME: &'static str = "preset_extraction";
    const QUEUE: WorkQueue = WorkQueue::Identity;
    const COUNTS_AGAINST_CAP: bool = false;
    type Spec = ExtractionSpec;

    /// One output per image at `prices.extraction`.
    fn plan(spec: &ExtractionSpec, prices: &PriceTable) -> Vec<PlannedOutput> {
        (0..spec.file_ids.len() as u32)
            .map(|i| PlannedOutput {
                instruction_index: i,
                variation_index: 0,
                cost: PriceTable::flat(prices.extraction),
                format: ImageFormat::Jpg,
            })
            .collect()
    }

    fn requirements(spec: &ExtractionSpec) -> Requirements<'_> {
        Requirements {
            files: spec.file_ids.iter().map(String::as_str).collect(),
            identity: None,
            profiles: Vec::new(),
        }
    }

    fn post_process(_: &ExtractionSpec) -> bool {
        false
    }
}

/// Whether an extraction failure is the image's (the caller's to fix, a
/// `400` naming the file): what makes a photo unusable for an identity
/// (decoding failures arrive as `unreadable image: …`), no subject in
/// it, or an input gone since admission. Anything else is the platform's.
pub fn is_image_problem(message: &str) -> bool {
    const OWN: [&str; 3] = ["no product found", "no person found", "input image"];
    super::identity::is_input_problem(message) || OWN.iter().any(|p| message.starts_with(p))
}

/// The fields (paths such as `hair.color`) that every draft has and on
/// which all of them agree, in the first draft's order. Drafts word a
/// measured class the same way wherever it is measured, so agreeing
/// traits already read identically; this names them.
pub fn shared_traits(drafts: &[Value]) -> Vec<String> {
    let Some((first, rest)) = drafts.split_first() else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    leaf_paths(first, &mut paths);
    paths.retain(|p| {
        let v = value_at(first, p);
        rest.iter().all(|d| value_at(d, p) == v)
    });
    paths
}

/// Appends the leaf paths of a draft (`lighting.direction`; an empty
/// object is a leaf) that `out` does not hold yet, in the draft's order.
pub fn leaf_paths(v: &Value, out: &mut Vec<String>) {
    fn walk(prefix: &str, m: &Map<String, Value>, out: &mut Vec<String>) {
        for (k, inner) in m {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match inner {
                Value::Object(o) if !o.is_empty() => walk(&path, o, out),
                _ if !out.contains(&path) => out.push(path),
                _ => {}
            }
        }
    }
    if let Some(m) = v.as_object() {
        walk("", m, out);
    }
}

/// The value at `path` (`hair.color`) of a draft, if it has one.
pub fn value_at<'a>(d: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(d, |d, part| d.get(part))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shared_traits_are_the_fields_every_draft_words_alike() {
        let a = json!({"style": "white_cutout", "shadow": "contact", "color_palette": "red",
                       "lighting": {"direction": "left", "quality": "soft"}});
        let b = json!({"style": "white_cutout", "shadow": "none", "color_palette": "blue",
                       "lighting": {"direction": "left", "quality": "hard"}});
        let c = json!({"style": "white_cutout", "color_palette": "green",
                       "lighting": {"direction": "left", "quality": "soft"}});
        let mut shared = shared_traits(&[a.clone(), b, c]);
        shared.sort();
        assert_eq!(shared, vec!["lighting.direction", "style"]);
        // One draft shares everything with itself; none shares nothing.
        assert_eq!(shared_traits(&[a]).len(), 5);
        assert!(shared_traits(&[]).is_empty());
    }

    #[test]
    fn image_problems_are_told_from_the_platforms() {
        for m in ["unreadable image: corrupt image data: eof", "no product found: nothing…", "no face detected", "input image f was not resolved"] {
            assert!(is_image_problem(m), "{m}");
        }
        assert!(!is_image_problem("pipeline exceeded 300 s"));
        assert_eq!(value_at(&serde_json::json!({"hair": {"color": "red"}}), "hair.color"), Some(&serde_json::json!("red")));
    }
}
