//! Model swap (contract §3.6): the `model_swap` job kind. One output per
//! product photo, in which the model's face is replaced by a preprocessed
//! identity's; the identity must be `completed` when the job is admitted,
//! and the face it has then is the one every output uses.

use super::credits::PriceTable;
use super::kinds::{IdentityUse, JobKind, PlannedOutput, Requirements};
use super::packshot::{FieldError, ImageFormat, ImageRefIn, ImageSpec, validate_images};
use super::task::WorkQueue;
use serde::{Deserialize, Serialize};

/// The `model_swap` kind, on the `swap` queue.
pub struct ModelSwap;

impl JobKind for ModelSwap {
    const NAME: &'static str = "model_swap";
    const QUEUE: WorkQueue = WorkQueue::Swap;
    type Spec = SwapSpec;

    /// One output per image at the model-swap price.
    fn plan(spec: &SwapSpec, prices: &PriceTable) -> Vec<PlannedOutput> {
        (0..spec.images.len() as u32)
            .map(|i| PlannedOutput {
                instruction_index: i,
                variation_index: 0,
                cost: PriceTable::flat(prices.model_swap),
                format: ImageFormat::Jpg,
            })
            .collect()
    }

    fn requirements(spec: &SwapSpec) -> Requirements<'_> {
        Requirements {
            files: spec.images.iter().map(|i| i.file_id.as_str()).collect(),
            identity: Some(IdentityUse::Ready(&spec.identity_code)),
            profiles: Vec::new(),
        }
    }

    fn post_process(spec: &SwapSpec) -> bool {
        spec.post_process
    }

    fn engine_fallback(spec: &SwapSpec) -> bool {
        spec.model == SwapEngine::Auto
    }
}

/// Model-swap engines a client can name (contract §3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SwapEngine {
    Auto,
    Onda,
    NanoBananaPro,
}

impl SwapEngine {
    pub fn parse(s: &str) -> Option<SwapEngine> {
        match s {
            "auto" => Some(SwapEngine::Auto),
            "onda" => Some(SwapEngine::Onda),
            "nano_banana_pro" => Some(SwapEngine::NanoBananaPro),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SwapEngine::Auto => "auto",
            SwapEngine::Onda => "onda",
            SwapEngine::NanoBananaPro => "nano_banana_pro",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct SwapRequest {
    pub project_id: String,
    pub images: Vec<ImageRefIn>,
    pub identity_code: String,
    #[serde(default)]
    pub post_process: bool,
    #[serde(default)]
    pub swap_options: serde_json::Map<String, serde_json::Value>,
    /// `{ "model": … }`, an alias of `swap_options.model` (contract §3.6).
    #[serde(default)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

/// The normalised model-swap job (stored as the job spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwapSpec {
    pub identity_code: String,
    pub images: Vec<ImageSpec>,
    pub model: SwapEngine,
    pub post_process: bool,
    /// `swap_options` keys other than `model`, kept verbatim.
    pub processing_options: serde_json::Map<String, serde_json::Value>,
}

pub fn parse_swap(body: &serde_json::Value) -> Result<SwapRequest, FieldError> {
    serde_path_to_error::deserialize::<_, SwapRequest>(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let message = if inner.contains("untagged enum ImageRefIn") {
            "must be a file_id string or an object {file_id, note}".to_string()
        } else {
            inner
        };
        FieldError {
            field: (path != ".").then_some(path),
            message,
        }
    })
}

/// Validates a swap request. `available` lists the engines this server
/// runs for model swap (`auto` is always accepted).
pub fn validate_swap(
    req: &SwapRequest,
    available: &[SwapEngine],
) -> Result<SwapSpec, Vec<FieldError>> {
    let mut errs = Vec::new();
    if req.project_id.trim().is_empty() {
        errs.push(FieldError::new("project_id", "must not be empty"));
    }
    if req.identity_code.trim().is_empty() {
        errs.push(FieldError::new("identity_code", "must not be empty"));
    }
    let images = validate_images(&req.images, &mut errs);
    let mut model = SwapEngine::Auto;
    for (field, v) in [
        ("swap_options.model", req.swap_options.get("model")),
        ("options.model", req.options.get("model")),
    ] {
        let Some(v) = v else { continue };
        match v.as_str().and_then(SwapEngine::parse) {
            None => errs.push(FieldError::new(
                field,
                "must be one of auto, onda, nano_banana_pro",
            )),
            Some(SwapEngine::Auto) => {}
            Some(e) if !available.contains(&e) => errs.push(FieldError::new(
                field,
                format!(
                    "engine {} is not configured for model swap on this server; use auto",
                    e.as_str()
                ),
            )),
            // `swap_options.model` wins over the alias.
            Some(e) if model == SwapEngine::Auto => model = e,
            Some(_) => {}
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    let mut processing_options = req.swap_options.clone();
    processing_options.remove("model");
    Ok(SwapSpec {
        identity_code: req.identity_code.trim().to_string(),
        images,
        model,
        post_process: req.post_process,
        processing_options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn swap_requests_are_validated() {
        let all = [SwapEngine::Onda];
        let req = parse_swap(&json!({
            "project_id": "p", "identity_code": "idn_x",
            "images": ["a", {"file_id": "b", "note": "back view"}],
            "swap_options": {"model": "onda", "strength": 0.7},
        }))
        .expect("parses");
        let spec = validate_swap(&req, &all).expect("valid");
        assert_eq!(spec.model, SwapEngine::Onda);
        assert_eq!(spec.images.len(), 2);
        assert_eq!(spec.processing_options.get("strength"), Some(&json!(0.7)));
        assert!(!spec.processing_options.contains_key("model"));

        let req = parse_swap(&json!({
            "project_id": "p", "identity_code": "", "images": ["a", "a"],
            "options": {"model": "nano_banana_pro"},
        }))
        .expect("parses");
        let errs = validate_swap(&req, &all).expect_err("invalid");
        let fields: Vec<_> = errs.iter().filter_map(|e| e.field.clone()).collect();
        assert!(fields.contains(&"identity_code".to_string()), "{fields:?}");
        assert!(fields.contains(&"images[1]".to_string()), "{fields:?}");
        assert!(fields.contains(&"options.model".to_string()), "{fields:?}");

        let e = parse_swap(&json!({"project_id": "p", "identity_code": "x", "images": [3]}))
            .expect_err("wrong image type");
        assert_eq!(e.field.as_deref(), Some("images[0]"));
        let e = parse_swap(&json!({"project_id": "p", "images": []})).expect_err("missing");
        assert!(e.message.contains("identity_code"), "{}", e.message);
    }
}
