//! Flat-lay-to-on-model (contract §3.7): the `flat_2_model` job kind. An
//! identity wears the garments of 1–10 flat-lay photos; every output sees
//! every garment photo; each instruction asks for `num_variations` on-model
//! images, drawn by a generator engine (a model container).

use super::credits::PriceTable;
use super::credits::SizeClass;
use super::engines::EngineAvailability;
use super::kinds::JobType;
use super::kinds::{IdentityUse, JobKind, PlannedOutput, Requirements, per_variation};
use super::packshot::AspectRatio;
use super::packshot::{
    DesignCatalogue, DesignResolved, DesignValue, EngineChoice, FieldError, ImageFormat,
    ImageRefIn, ImageSpec, MAX_INSTRUCTIONS, MAX_PROMPT, MAX_VARIATIONS, OutputDefaults,
    OutputOptionsIn, OutputSpec, resolve_design, resolve_output, validate_images,
};
use super::task::WorkQueue;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `flat_2_model` kind, on the `generate` queue.
pub struct Flat2Model;

impl JobKind for Flat2Model {
    const NAME: &'static str = "flat_2_model";
    const QUEUE: WorkQueue = WorkQueue::Generate;
    type Spec = FlatSpec;
    /// `identity`: the identity's aligned face (a data URL); `garments`:
    /// every garment photo (data URLs); `garment_notes`; `prompt`: the
    /// instruction in words with the client's prompt; `client_prompt`;
    /// `pose`; `background`; `scene` (the other scene keys, an object);
    /// `barefoot`; `seed` (of this variation); `width`, `height`;
    /// `variation`; `format`.
    const GENERATOR_FIELDS: &'static [&'static str] = &[
        "identity",
        "garments",
        "garment_notes",
        "prompt",
        "client_prompt",
        "pose",
        "background",
        "scene",
        "barefoot",
        "seed",
        "width",
        "height",
        "variation",
        "format",
        "anchor_seed",
    ];
    const ENGINE_NAMES: &'static [EngineChoice] =
        &[EngineChoice::NanoBananaPro, EngineChoice::Seedream];

    /// Instructions × variations, each at the price of its size class
    /// (flat-2-model prices as packshots, contract §3.4).
    fn plan(spec: &FlatSpec, prices: &PriceTable) -> Vec<PlannedOutput> {
        per_variation(
            spec.instructions
                .iter()
                .map(|i| (i.num_variations, &i.output)),
            prices,
        )
    }

    fn requirements(spec: &FlatSpec) -> Requirements<'_> {
        Requirements {
            files: spec.images.iter().map(|i| i.file_id.as_str()).collect(),
            identity: Some(IdentityUse::Ready(&spec.identity_code)),
            profiles: Vec::new(),
        }
    }

    fn post_process(spec: &FlatSpec) -> bool {
        spec.post_process
    }

    fn engine_fallback(spec: &FlatSpec) -> bool {
        spec.model == EngineChoice::Auto
    }
}

/// Job-level `options` of a flat-2-model request.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct FlatOptionsIn {
    pub model: Option<EngineChoice>,
    /// Cross-output consistency; on by default for this kind.
    pub use_anchor: Option<bool>,
    pub anchor_index: Option<i64>,
    /// Render without footwear; footwear inputs are ignored.
    pub barefoot: Option<bool>,
    pub size: Option<SizeClass>,
    pub ar: Option<AspectRatio>,
    pub format: Option<ImageFormat>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub seed: Option<u32>,
}

/// One instruction (`FlatInstruction`, contract §3.7).
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct FlatInstructionIn {
    pub prompt: Option<String>,
    /// e.g. "walking, three-quarter".
    pub pose: Option<String>,
    pub background: Option<DesignValue>,
    pub seed: Option<u32>,
    pub num_variations: Option<u32>,
    pub preset_name: Option<String>,
    pub category_names: Option<Vec<String>>,
    pub preset_code: Option<String>,
    #[serde(default)]
    pub options: OutputOptionsIn,
    /// Other scene keys (`lighting`, `outfit`, `style`, `camera`, …):
    /// string values, forwarded to the engine.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub scene: BTreeMap<String, serde_json::Value>,
}

/// `POST /flat-2-model` as clients send it.
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct FlatRequest {
    pub identity_code: String,
    pub project_id: String,
    pub images: Vec<ImageRefIn>,
    /// 0–10; none: one default instruction.
    #[serde(default)]
    pub instructions: Vec<FlatInstructionIn>,
    #[serde(default)]
    pub post_process: bool,
    #[serde(default)]
    pub options: FlatOptionsIn,
    /// Stored and echoed in `processing_options`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub review_config: Option<serde_json::Value>,
}

/// One normalised instruction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlatInstructionSpec {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pose: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<DesignResolved>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scene: BTreeMap<String, String>,
    /// Seed of variation 0; variation `v` uses `seed + v` (wrapping).
    pub seed: u32,
    pub num_variations: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset_name: Option<String>,
    /// The preset the instruction was built from (contract §6.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset_code: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub category_names: Vec<String>,
    pub output: OutputSpec,
}

impl FlatInstructionSpec {
    pub fn variation_seed(&self, variation: u32) -> u32 {
        self.seed.wrapping_add(variation)
    }
}

/// The normalised flat-2-model job (stored as the job spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlatSpec {
    pub identity_code: String,
    pub images: Vec<ImageSpec>,
    pub instructions: Vec<FlatInstructionSpec>,
    pub model: EngineChoice,
    pub use_anchor: bool,
    pub anchor_index: u32,
    pub barefoot: bool,
    pub post_process: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_config: Option<serde_json::Value>,
}

impl FlatSpec {
    pub fn largest_size(&self) -> SizeClass {
        self.instructions
            .iter()
            .map(|i| i.output.size)
            .max()
            .unwrap_or(SizeClass::K1)
    }

    pub fn uses_custom_dimensions(&self) -> bool {
        self.instructions.iter().any(|i| i.output.custom)
    }
}

/// Deserialises the JSON body, naming the field of the first type error.
pub fn parse_request(body: &serde_json::Value) -> Result<FlatRequest, FieldError> {
    serde_path_to_error::deserialize::<_, FlatRequest>(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let message = if inner.contains("untagged enum DesignValue") {
            "must be a string, a Design-Value index or an object".to_string()
        } else if inner.contains("untagged enum ImageRefIn") {
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

/// Validates a request into the normalised spec, reporting every problem.
/// `engines` are the engines this server runs for flat-2-model (the
/// operator's generator routes for the kind); `random_seed` supplies seeds
/// for instructions that have none.
pub fn validate(
    req: &FlatRequest,
    catalogue: &DesignCatalogue,
    engines: &EngineAvailability,
    mut random_seed: impl FnMut() -> u32,
) -> Result<FlatSpec, Vec<FieldError>> {
    let mut errs = Vec::new();
    if req.project_id.trim().is_empty() {
        errs.push(FieldError::new("project_id", "must not be empty"));
    }
    if req.identity_code.trim().is_empty() {
        errs.push(FieldError::new("identity_code", "must not be empty"));
    }
    let images = validate_images(&req.images, &mut errs);
    if req.instructions.len() > MAX_INSTRUCTIONS {
        errs.push(FieldError::new(
            "instructions",
            format!(
                "must hold at most {MAX_INSTRUCTIONS} instructions, got {}",
                req.instructions.len()
            ),
        ));
    }
    let opts = &req.options;
    let model = opts.model.unwrap_or(EngineChoice::Auto);
    if let Some(e) = engines.check(JobType::Flat2Model, model, "options.model") {
        errs.push(e);
    }
    let default_instruction = [FlatInstructionIn {
        prompt: None,
        pose: None,
        background: None,
        seed: None,
        num_variations: None,
        preset_name: None,
        category_names: None,
        preset_code: None,
        options: OutputOptionsIn::default(),
        scene: BTreeMap::new(),
    }];
    let given: &[FlatInstructionIn] = if req.instructions.is_empty() {
        &default_instruction
    } else {
        &req.instructions
    };
    let use_anchor = opts.use_anchor.unwrap_or(true);
    let anchor_index = opts.anchor_index.unwrap_or(0);
    if use_anchor && (anchor_index < 0 || anchor_index as usize >= given.len()) {
        errs.push(FieldError::new(
            "options.anchor_index",
            format!(
                "must satisfy 0 <= anchor_index < {} (number of instructions)",
                given.len()
            ),
        ));
    }
    let defaults = OutputDefaults {
        size: opts.size,
        ar: opts.ar,
        format: opts.format,
        width: opts.width,
        height: opts.height,
    };
    super::packshot::check_dimensions("options", opts.width, opts.height, &mut errs);
    let mut instructions = Vec::with_capacity(given.len());
    for (i, ins) in given.iter().enumerate() {
        let at = |f: &str| format!("instructions[{i}].{f}");
        let n_var = ins.num_variations.unwrap_or(1);
        if !(1..=MAX_VARIATIONS).contains(&n_var) {
            errs.push(FieldError::new(
                at("num_variations"),
                format!("must be between 1 and {MAX_VARIATIONS}"),
            ));
        }
        let prompt = ins.prompt.clone().unwrap_or_default();
        if prompt.chars().count() > MAX_PROMPT {
            errs.push(FieldError::new(
                at("prompt"),
                format!("must be at most {MAX_PROMPT} characters"),
            ));
        }
        // A `preset_code` was resolved by the API before this check: the
        // preset's fields are merged in, the code is kept for the record.
        let mut scene = BTreeMap::new();
        for (k, v) in &ins.scene {
            match v.as_str() {
                Some(t) if t.chars().count() <= MAX_PROMPT => {
                    scene.insert(k.clone(), t.to_string());
                }
                Some(_) => errs.push(FieldError::new(
                    at(k),
                    format!("must be at most {MAX_PROMPT} characters"),
                )),
                None => errs.push(FieldError::new(at(k), "must be a string")),
            }
        }
        let output = resolve_output(&at("options"), &defaults, &ins.options, &mut errs);
        let background = resolve_design(
            catalogue,
            &at("background"),
            "background",
            ins.background.as_ref(),
            &mut errs,
        );
        instructions.push(FlatInstructionSpec {
            prompt,
            pose: ins.pose.clone().filter(|p| !p.trim().is_empty()),
            background,
            scene,
            seed: ins
                .seed
                .or(ins.options.seed)
                .or(opts.seed)
                .unwrap_or_else(&mut random_seed),
            num_variations: n_var,
            preset_name: ins.preset_name.clone(),
            preset_code: ins.preset_code.clone(),
            category_names: ins.category_names.clone().unwrap_or_default(),
            output,
        });
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(FlatSpec {
        identity_code: req.identity_code.trim().to_string(),
        images,
        instructions,
        model,
        use_anchor,
        anchor_index: anchor_index.max(0) as u32,
        barefoot: opts.barefoot.unwrap_or(false),
        post_process: req.post_process,
        review_config: req.review_config.clone(),
    })
}

/// A prompt for a generator: the identity wearing the garments, the pose,
/// background and scene asked for, then the client's own prompt.
pub fn prompt_for(spec: &FlatSpec, ins: &FlatInstructionSpec) -> String {
    let mut parts = vec![
        "A full-body fashion photo of the person in the identity image wearing the garments of \
         the flat-lay photos. Keep the garments' colours, prints, fabric and details exactly, \
         and the person's face and identity."
            .to_string(),
    ];
    if spec.barefoot {
        parts.push("Barefoot, no footwear.".into());
    }
    if let Some(p) = &ins.pose {
        parts.push(format!("Pose: {p}."));
    }
    if let Some(t) = ins.background.as_ref().and_then(|b| b.text.as_ref()) {
        parts.push(format!("Background: {t}."));
    }
    for (k, v) in &ins.scene {
        parts.push(format!("{}: {v}.", k.replace('_', " ")));
    }
    let notes: Vec<&str> = spec
        .images
        .iter()
        .filter_map(|i| i.note.as_deref())
        .collect();
    if !notes.is_empty() {
        parts.push(format!("Garment notes: {}.", notes.join("; ")));
    }
    if !ins.prompt.trim().is_empty() {
        parts.push(ins.prompt.trim().to_string());
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seedream() -> EngineAvailability {
        let mut kinds = BTreeMap::new();
        kinds.insert(
            JobType::Flat2Model,
            super::super::engines::KindEngines {
                named: vec![EngineChoice::Seedream],
                auto: vec!["seedream".into()],
            },
        );
        EngineAvailability::new(kinds)
    }

    fn check(v: serde_json::Value) -> Result<FlatSpec, Vec<FieldError>> {
        let req = parse_request(&v).map_err(|e| vec![e])?;
        validate(&req, &DesignCatalogue::default(), &seedream(), || 5)
    }

    #[test]
    fn no_instruction_is_one_default_and_anchor_is_on() {
        let s = check(json!({"identity_code": "idn_a", "project_id": "p", "images": ["g1", "g2"]}))
            .expect("valid");
        assert_eq!(s.instructions.len(), 1);
        assert!(s.use_anchor && !s.barefoot);
        assert_eq!(s.instructions[0].num_variations, 1);
        assert_eq!(s.instructions[0].seed, 5);
        let cost: super::super::Credits = Flat2Model::plan(&s, &PriceTable::default())
            .iter()
            .map(|p| p.cost)
            .sum();
        assert_eq!(cost.as_f64(), 3.0);
    }

    #[test]
    fn instructions_keep_scene_keys_and_every_problem_is_named() {
        let s = check(json!({
            "identity_code": "idn_a", "project_id": "p", "images": [{"file_id": "g", "note": "tucked"}],
            "options": {"barefoot": true, "size": "2K", "use_anchor": false, "model": "seedream"},
            "instructions": [{"prompt": "street", "pose": "walking", "lighting": "golden hour",
                              "num_variations": 2, "seed": 40, "background": "city"}],
        }))
        .expect("valid");
        let ins = &s.instructions[0];
        assert_eq!(
            ins.scene.get("lighting").map(String::as_str),
            Some("golden hour")
        );
        assert_eq!((ins.output.width, ins.variation_seed(1)), (2048, 41));
        let p = prompt_for(&s, ins);
        for part in [
            "Barefoot",
            "walking",
            "city",
            "golden hour",
            "tucked",
            "street",
        ] {
            assert!(p.contains(part), "{part} in {p}");
        }
        let errs = check(json!({
            "identity_code": "", "project_id": "p", "images": [],
            "options": {"model": "nano_banana_pro", "anchor_index": 3},
            "instructions": [{"num_variations": 9, "camera": 5}],
        }))
        .expect_err("invalid");
        let fields: Vec<String> = errs.iter().filter_map(|e| e.field.clone()).collect();
        for f in [
            "identity_code",
            "images",
            "options.model",
            "options.anchor_index",
            "instructions[0].num_variations",
            "instructions[0].camera",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} in {fields:?}");
        }
    }
}
