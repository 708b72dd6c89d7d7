//! Preset types and the check of a preset's `instruction_data` (contract
//! §6.1): the same typed validator the job's own route uses, run on a
//! request that holds the instruction, with every problem's `detail`
//! pointing into `instruction_data`.

use super::engines::EngineAvailability;
use super::packshot::{DesignCatalogue, FieldError};
use super::policy::ContentPolicy;
use serde_json::{Value, json};

/// The job kinds a preset can describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresetType {
    CreatePackshot,
    #[serde(rename = "flat_2_model")]
    Flat2Model,
    IdentityCreation,
    ModelSwap,
}

impl PresetType {
    pub const ALL: [PresetType; 4] = [
        PresetType::CreatePackshot,
        PresetType::Flat2Model,
        PresetType::IdentityCreation,
        PresetType::ModelSwap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PresetType::CreatePackshot => "create_packshot",
            PresetType::Flat2Model => "flat_2_model",
            PresetType::IdentityCreation => "identity_creation",
            PresetType::ModelSwap => "model_swap",
        }
    }

    pub fn parse(s: &str) -> Option<PresetType> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// What the validators need besides the instruction.
pub struct Checks<'a> {
    pub catalogue: &'a DesignCatalogue,
    pub engines: &'a EngineAvailability,
    pub policy: &'a ContentPolicy,
}

/// Where the instruction sits in the job request the validator reads.
fn wrapped(t: PresetType, data: &Value) -> (Value, &'static str) {
    const PLACEHOLDER: &str = "preset";
    match t {
        PresetType::CreatePackshot => (
            json!({"project_id": PLACEHOLDER, "images": [PLACEHOLDER], "instructions": [data]}),
            "instructions[0]",
        ),
        PresetType::Flat2Model => (
            json!({"identity_code": PLACEHOLDER, "project_id": PLACEHOLDER, "images": [PLACEHOLDER], "instructions": [data]}),
            "instructions[0]",
        ),
        PresetType::IdentityCreation => (json!({"instructions": [data]}), "instructions[0]"),
        PresetType::ModelSwap => (
            json!({"identity_code": PLACEHOLDER, "project_id": PLACEHOLDER, "images": [PLACEHOLDER], "swap_options": data}),
            "swap_options",
        ),
    }
}

/// Rewrites a validator's field path into `instruction_data…`; `None` for
/// problems outside the instruction (the placeholders around it, or
/// job-level engine availability, which a preset does not fix).
fn repath(field: Option<&str>, at: &str) -> Option<String> {
    let f = field?;
    let rest = f.strip_prefix(at)?;
    if rest.is_empty() {
        Some("instruction_data".into())
    } else if rest.starts_with('.') || rest.starts_with('[') {
        Some(format!("instruction_data{rest}"))
    } else {
        None
    }
}

/// Checks `data` as an instruction of type `t`.
pub fn check_instruction(t: PresetType, data: &Value, c: &Checks<'_>) -> Result<(), Vec<FieldError>> {
    if !data.is_object() {
        return Err(vec![FieldError::new("instruction_data", "must be an object")]);
    }
    let (body, at) = wrapped(t, data);
    let seed = || 0u32;
    let result: Result<(), Vec<FieldError>> = match t {
        PresetType::CreatePackshot => super::packshot::parse_request(&body)
            .map_err(|e| vec![e])
            .and_then(|r| super::packshot::validate(&r, c.catalogue, c.engines, seed).map(|_| ())),
        PresetType::Flat2Model => super::flat::parse_request(&body)
            .map_err(|e| vec![e])
            .and_then(|r| super::flat::validate(&r, c.catalogue, c.engines, seed).map(|_| ())),
        PresetType::IdentityCreation => super::drafts::parse_request(&body)
            .map_err(|e| vec![e])
            .and_then(|r| super::drafts::validate(&r, c.engines, c.policy, seed).map(|_| ())),
        PresetType::ModelSwap => super::swap::parse_swap(&body)
            .map_err(|e| vec![e])
            .and_then(|r| {
                use super::swap::SwapEngine;
                let known = [SwapEngine::Auto, SwapEngine::Onda, SwapEngine::NanoBananaPro];
                super::swap::validate_swap(&r, &known).map(|_| ())
            }),
    };
    let Err(errs) = result else {
        return Ok(());
    };
    let mine: Vec<FieldError> = errs
        .into_iter()
        .filter_map(|e| {
            repath(e.field.as_deref(), at).map(|field| FieldError {
                field: Some(field),
                message: e.message,
            })
        })
        .collect();
    if mine.is_empty() { Ok(()) } else { Err(mine) }
}

/// A job instruction with a preset applied: the preset's fields, then the
/// instruction's own (explicit fields win; `null` counts as not given).
pub fn apply(preset: &Value, instruction: &Value) -> Value {
    let mut merged = preset.as_object().cloned().unwrap_or_default();
    if let Some(own) = instruction.as_object() {
        for (k, v) in own {
            if !v.is_null() {
                merged.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_point_into_the_instruction() {
        assert_eq!(repath(Some("instructions[0].style"), "instructions[0]").as_deref(), Some("instruction_data.style"));
        assert_eq!(repath(Some("instructions[0]"), "instructions[0]").as_deref(), Some("instruction_data"));
        assert_eq!(repath(Some("swap_options.model"), "swap_options").as_deref(), Some("instruction_data.model"));
        assert_eq!(repath(Some("instructions[0].options.size"), "instructions[0]").as_deref(), Some("instruction_data.options.size"));
        assert_eq!(repath(Some("project_id"), "instructions[0]"), None);
        assert_eq!(repath(Some("instructions[01]"), "instructions[0]"), None);
        assert_eq!(repath(None, "instructions[0]"), None);
    }

    #[test]
    fn explicit_fields_override_the_preset() {
        let p = json!({"style": "flat_lay", "lighting": "soft", "prompt": "linen"});
        let i = json!({"style": "white_cutout", "prompt": null, "num_variations": 2});
        assert_eq!(
            apply(&p, &i),
            json!({"style": "white_cutout", "lighting": "soft", "prompt": "linen", "num_variations": 2})
        );
    }
}
