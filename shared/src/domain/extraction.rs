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

/// The fields (paths such as `hair.color`) that every draft has and on
/// which all of them agree, in the first draft's order. Drafts word a
/// measured class the same way wherever it is measured, so agreeing
/// traits already read identically; this names them.
pub fn shared_traits(drafts: &[Value]) -> Vec<String> {
    let Some(first) = drafts.first().and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    collect_shared("", first, &drafts[1..], &mut out);
    out
}

fn collect_shared(prefix: &str, first: &Map<String, Value>, rest: &[Value], out: &mut Vec<String>) {
    for (k, v) in first {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let at = |d: &Value| -> Option<Value> {
            path.split('.').try_fold(d.clone(), |d, part| d.get(part).cloned())
        };
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                collect_shared(&path, inner, rest, out);
            }
            _ => {
                if rest.iter().all(|d| at(d).as_ref() == Some(v)) {
                    out.push(path);
                }
            }
        }
    }
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
}
