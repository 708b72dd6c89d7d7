//! Identity drafts (contract §3.8): the `identity_creation` job kind. Each
//! instruction describes a fictional person (structured groups or a free
//! prompt) and asks for `num_variations` standardised portraits, drawn by a
//! generator engine. Drafts are results, not identities: one is later
//! promoted with `POST /identity/promote-generated` (§5.7).

use super::credits::{PriceTable, SizeClass};
use super::engines::EngineAvailability;
use super::identity;
use super::kinds::{JobKind, JobType, PlannedOutput, Requirements, per_variation};
use super::packshot::{
    AspectRatio, EngineChoice, FieldError, MAX_INSTRUCTIONS, MAX_PROMPT, MAX_VARIATIONS,
    OutputDefaults, OutputOptionsIn, OutputSpec, resolve_output_any_ar,
};
use super::policy::ContentPolicy;
use super::task::WorkQueue;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Reference images per instruction.
pub const MAX_INPUT_ASSETS: usize = 3;
/// Characters of one structured value (`appearance.gender`, …).
pub const MAX_ATTRIBUTE: usize = 200;

/// The structured groups and their documented sub-fields.
pub const GROUPS: [(&str, &[&str]); 3] = [
    (
        "appearance",
        &[
            "gender",
            "age",
            "ethnicity",
            "skin",
            "build",
            "size",
            "height",
            "expression",
        ],
    ),
    (
        "face",
        &[
            "eyes",
            "eyebrows",
            "nose",
            "lips",
            "smile",
            "face_shape",
            "facial_hair",
            "makeup",
            "marks",
        ],
    ),
    ("hair", &["color", "length", "style"]),
];

/// The `identity_creation` kind, on the `generate` queue.
pub struct IdentityCreation;

impl JobKind for IdentityCreation {
    const NAME: &'static str = "identity_creation";
    const QUEUE: WorkQueue = WorkQueue::Generate;
    type Spec = DraftSpec;
    /// `prompt`: the portrait in words (the client's own prompt verbatim
    /// when it sent one); `client_prompt`; `appearance`, `face`, `hair`
    /// (objects of strings); `references` (data URLs of `input_assets`);
    /// `seed` (of this variation); `width`, `height`; `aspect_ratio`
    /// (`3:4`, …; empty for custom dimensions); `variation`; `format`.
    const GENERATOR_FIELDS: &'static [&'static str] = &[
        "prompt",
        "client_prompt",
        "appearance",
        "face",
        "hair",
        "references",
        "seed",
        "width",
        "height",
        "aspect_ratio",
        "variation",
        "format",
    ];
    const ENGINE_NAMES: &'static [EngineChoice] = &[
        EngineChoice::NanoBanana2,
        EngineChoice::NanoBananaPro,
        EngineChoice::Seedream,
        EngineChoice::Orbita,
    ];

    /// Instructions × variations, each priced by its size class (§3.4).
    fn plan(spec: &DraftSpec, prices: &PriceTable) -> Vec<PlannedOutput> {
        per_variation(
            spec.instructions
                .iter()
                .map(|i| (i.num_variations, &i.output)),
            prices,
        )
    }

    fn requirements(spec: &DraftSpec) -> Requirements<'_> {
        let mut files: Vec<&str> = Vec::new();
        for f in spec.instructions.iter().flat_map(|i| &i.input_assets) {
            if !files.contains(&f.as_str()) {
                files.push(f);
            }
        }
        Requirements {
            files,
            identity: None,
            profiles: Vec::new(),
        }
    }

    fn post_process(_spec: &DraftSpec) -> bool {
        false
    }

    fn engine_fallback(spec: &DraftSpec) -> bool {
        spec.model == EngineChoice::Auto
    }
}

/// `options` of `POST /identity/create`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct DraftOptionsIn {
    pub model: Option<EngineChoice>,
}

/// A reference image of an expert prompt.
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct InputAssetIn {
    pub file_id: String,
}

/// One `IdentityInstruction`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct DraftInstructionIn {
    /// `gender`, `age` (integer or string), `ethnicity`, `skin`, `build`,
    /// `size`, `height`, `expression`.
    #[schema(value_type = Option<Object>)]
    pub appearance: Option<serde_json::Value>,
    /// `eyes`, `eyebrows`, `nose`, `lips`, `smile`, `face_shape`,
    /// `facial_hair`, `makeup`, `marks`.
    #[schema(value_type = Option<Object>)]
    pub face: Option<serde_json::Value>,
    /// `color`, `length`, `style`.
    #[schema(value_type = Option<Object>)]
    pub hair: Option<serde_json::Value>,
    /// Replaces the built prompt; the groups are kept as metadata.
    pub prompt: Option<String>,
    /// At most 3 visual references; not with `orbita`.
    pub input_assets: Option<Vec<InputAssetIn>>,
    pub num_variations: Option<u32>,
    #[serde(default)]
    pub options: OutputOptionsIn,
    pub preset_code: Option<String>,
    /// Accepted and ignored: the platform standardises them.
    #[schema(value_type = Option<Object>)]
    pub camera: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub outfit: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub style: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub scene: Option<serde_json::Value>,
}

/// `POST /identity/create` as clients send it.
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct DraftRequest {
    /// 1–10 instructions.
    pub instructions: Vec<DraftInstructionIn>,
    #[serde(default)]
    pub options: DraftOptionsIn,
    /// The default name of identities promoted from this job.
    pub name: Option<String>,
}

/// One normalised instruction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DraftInstructionSpec {
    /// What the generator is told: the client's prompt, or one built from
    /// the groups.
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub appearance: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub face: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hair: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_assets: Vec<String>,
    /// Seed of variation 0; variation `v` uses `seed + v` (wrapping).
    pub seed: u32,
    pub num_variations: u32,
    pub output: OutputSpec,
    /// The preset the instruction was built from (contract §6.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset_code: Option<String>,
}

impl DraftInstructionSpec {
    pub fn variation_seed(&self, variation: u32) -> u32 {
        self.seed.wrapping_add(variation)
    }

    pub fn group(&self, name: &str) -> &BTreeMap<String, String> {
        match name {
            "appearance" => &self.appearance,
            "face" => &self.face,
            _ => &self.hair,
        }
    }
}

/// The normalised identity-creation job (stored as the job spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DraftSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub model: EngineChoice,
    pub instructions: Vec<DraftInstructionSpec>,
}

impl DraftInstructionSpec {
    /// The `gender` and `age` the brief asked for, as an identity promoted
    /// from its draft describes itself (contract §5.1 `image_description`):
    /// the gender lower-cased, the age when it is a whole number of years
    /// ("28", or "28 years old").
    pub fn described(&self) -> (Option<String>, Option<i64>) {
        let gender = self
            .appearance
            .get("gender")
            .map(|g| g.trim().to_lowercase())
            .filter(|g| !g.is_empty());
        let age = self.appearance.get("age").and_then(|a| {
            let a = a.trim();
            let years = a.strip_suffix("years old").unwrap_or(a).trim();
            years.parse::<i64>().ok().filter(|n| (1..=120).contains(n))
        });
        (gender, age)
    }
}

impl DraftSpec {
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

    pub fn total_variations(&self) -> u32 {
        self.instructions.iter().map(|i| i.num_variations).sum()
    }
}

/// Deserialises the JSON body, naming the field of the first type error.
pub fn parse_request(body: &serde_json::Value) -> Result<DraftRequest, FieldError> {
    serde_path_to_error::deserialize::<_, DraftRequest>(body).map_err(|e| {
        let path = e.path().to_string();
        FieldError {
            field: (path != ".").then_some(path),
            message: e.into_inner().to_string(),
        }
    })
}

/// Group `name` (`appearance`, …) as strings; `age` may be an integer.
/// Empty values are dropped; a key the group does not document, or any
/// other value, is a problem named `at.key`.
fn read_group(
    name: &str,
    at: &str,
    v: Option<&serde_json::Value>,
    errs: &mut Vec<FieldError>,
) -> BTreeMap<String, String> {
    let keys = GROUPS
        .iter()
        .find(|(g, _)| *g == name)
        .map_or(&[][..], |(_, k)| *k);
    let mut out = BTreeMap::new();
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return out;
    };
    let Some(obj) = v.as_object() else {
        errs.push(FieldError::new(at, "must be an object of strings"));
        return out;
    };
    for (k, v) in obj {
        if !keys.contains(&k.as_str()) {
            errs.push(FieldError::new(
                format!("{at}.{}", k.chars().take(64).collect::<String>()),
                format!("unknown field; {name} takes {}", keys.join(", ")),
            ));
            continue;
        }
        let text = match v {
            serde_json::Value::String(s) => s.trim().to_string(),
            serde_json::Value::Number(n) if k == "age" && n.is_u64() => n.to_string(),
            serde_json::Value::Null => continue,
            _ if k == "age" => {
                errs.push(FieldError::new(
                    format!("{at}.{k}"),
                    "must be a whole number or a string",
                ));
                continue;
            }
            _ => {
                errs.push(FieldError::new(format!("{at}.{k}"), "must be a string"));
                continue;
            }
        };
        if text.chars().count() > MAX_ATTRIBUTE {
            errs.push(FieldError::new(
                format!("{at}.{k}"),
                format!("must be at most {MAX_ATTRIBUTE} characters"),
            ));
        } else if !text.is_empty() {
            out.insert(k.clone(), text);
        }
    }
    out
}

/// Validates a request into the normalised spec, reporting every problem:
/// shape, engine constraints (`orbita`), the content policy (a blocked
/// term anywhere in the words sent to the engine), plan-free checks.
pub fn validate(
    req: &DraftRequest,
    engines: &EngineAvailability,
    policy: &ContentPolicy,
    mut random_seed: impl FnMut() -> u32,
) -> Result<DraftSpec, Vec<FieldError>> {
    let mut errs = Vec::new();
    if req.instructions.is_empty() || req.instructions.len() > MAX_INSTRUCTIONS {
        errs.push(FieldError::new(
            "instructions",
            format!(
                "must hold 1 to {MAX_INSTRUCTIONS} instructions, got {}",
                req.instructions.len()
            ),
        ));
    }
    let model = req.options.model.unwrap_or(EngineChoice::Auto);
    if let Some(e) = engines.check(JobType::IdentityCreation, model, "options.model") {
        errs.push(e);
    }
    let name = match &req.name {
        Some(n) => match identity::validate_name(n) {
            Ok(n) => Some(n),
            Err(e) => {
                errs.push(e);
                None
            }
        },
        None => None,
    };
    let orbita = model == EngineChoice::Orbita;
    let mut instructions = Vec::with_capacity(req.instructions.len());
    for (i, ins) in req.instructions.iter().enumerate() {
        let at = |f: &str| format!("instructions[{i}].{f}");
        let n_var = ins.num_variations.unwrap_or(1);
        if !(1..=MAX_VARIATIONS).contains(&n_var) {
            errs.push(FieldError::new(
                at("num_variations"),
                format!("must be between 1 and {MAX_VARIATIONS}"),
            ));
        }
        let appearance = read_group(
            "appearance",
            &at("appearance"),
            ins.appearance.as_ref(),
            &mut errs,
        );
        let face = read_group("face", &at("face"), ins.face.as_ref(), &mut errs);
        let hair = read_group("hair", &at("hair"), ins.hair.as_ref(), &mut errs);
        let client_prompt = ins
            .prompt
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        if let Some(p) = &client_prompt
            && p.chars().count() > MAX_PROMPT
        {
            errs.push(FieldError::new(
                at("prompt"),
                format!("must be at most {MAX_PROMPT} characters"),
            ));
        }
        if client_prompt.is_none() && appearance.is_empty() && face.is_empty() && hair.is_empty() {
            errs.push(FieldError::new(
                format!("instructions[{i}]"),
                "needs a non-empty prompt or at least one field of appearance, face or hair",
            ));
        }
        // The content policy reads every word that reaches the engine.
        let mut words: Vec<(String, &str)> = Vec::new();
        if let Some(p) = &client_prompt {
            words.push((at("prompt"), p));
        }
        for (g, m) in [
            ("appearance", &appearance),
            ("face", &face),
            ("hair", &hair),
        ] {
            for (k, v) in m {
                words.push((at(&format!("{g}.{k}")), v));
            }
        }
        for (field, text) in words {
            if let Some(term) = policy.blocked_term(text) {
                errs.push(FieldError::new(
                    field,
                    format!(
                        "blocked term: '{term}': prompts may not depict real people; describe a fictional person"
                    ),
                ));
            }
        }
        let assets: Vec<String> = ins
            .input_assets
            .iter()
            .flatten()
            .map(|a| a.file_id.trim().to_string())
            .collect();
        if assets.len() > MAX_INPUT_ASSETS {
            errs.push(FieldError::new(
                at("input_assets"),
                format!("must hold at most {MAX_INPUT_ASSETS} items"),
            ));
        }
        if orbita && !assets.is_empty() {
            errs.push(FieldError::new(
                at("input_assets"),
                "the orbita engine takes no reference images",
            ));
        }
        for (j, a) in assets.iter().enumerate() {
            if a.is_empty() {
                errs.push(FieldError::new(
                    format!("instructions[{i}].input_assets[{j}].file_id"),
                    "must not be empty",
                ));
            } else if assets[..j].contains(a) {
                errs.push(FieldError::new(
                    format!("instructions[{i}].input_assets[{j}].file_id"),
                    format!("{a} is listed twice"),
                ));
            }
        }
        // A `preset_code` was resolved by the API before this check: the
        // preset's fields are merged in, the code is kept for the record.
        let output = resolve_output_any_ar(
            &at("options"),
            &OutputDefaults::default(),
            &ins.options,
            &mut errs,
        );
        if orbita {
            if output.size != SizeClass::K1 {
                errs.push(FieldError::new(
                    at("options.size"),
                    "the orbita engine draws 1K only",
                ));
            }
            if let Some(ar) = output.ar.filter(|a| a.identity_only()) {
                errs.push(FieldError::new(
                    at("options.ar"),
                    format!(
                        "the orbita engine does not draw {}; use 1:1, 3:4, 4:3, 9:16 or 16:9",
                        ar.as_str()
                    ),
                ));
            }
        }
        let mut spec = DraftInstructionSpec {
            prompt: String::new(),
            client_prompt,
            appearance,
            face,
            hair,
            input_assets: assets,
            seed: ins.options.seed.unwrap_or_else(&mut random_seed),
            num_variations: n_var,
            output,
            preset_code: ins.preset_code.clone(),
        };
        spec.prompt = prompt_for(&spec);
        instructions.push(spec);
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(DraftSpec {
        name,
        model,
        instructions,
    })
}

/// The words for the generator: the client's prompt verbatim when it sent
/// one; otherwise the platform's standard portrait with the groups.
pub fn prompt_for(ins: &DraftInstructionSpec) -> String {
    if let Some(p) = &ins.client_prompt {
        return p.clone();
    }
    let mut parts = vec![
        "A photorealistic, front-facing studio portrait of a fictional person, head and \
         shoulders, centred, looking at the camera, soft even light, plain light-grey \
         background, plain white top, no jewellery."
            .to_string(),
    ];
    for (group, keys) in GROUPS {
        let m = ins.group(group);
        let said: Vec<String> = keys
            .iter()
            .filter_map(|k| m.get(*k).map(|v| describe(k, v)))
            .collect();
        if !said.is_empty() {
            parts.push(format!("{}: {}.", capitalise(group), said.join(", ")));
        }
    }
    parts.join(" ")
}

fn describe(key: &str, value: &str) -> String {
    match key {
        "age" if value.chars().all(|c| c.is_ascii_digit()) => format!("{value} years old"),
        _ => format!("{} {value}", key.replace('_', " ")),
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// The aspect ratio a generator is told (`""` for custom dimensions).
pub fn ratio_name(out: &OutputSpec) -> &'static str {
    out.ar.map_or("", AspectRatio::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn engines(names: &[EngineChoice]) -> EngineAvailability {
        let mut kinds = BTreeMap::new();
        kinds.insert(
            JobType::IdentityCreation,
            super::super::engines::KindEngines {
                named: names.to_vec(),
                auto: vec!["seedream".into()],
            },
        );
        EngineAvailability::new(kinds)
    }

    fn check(v: serde_json::Value) -> Result<DraftSpec, Vec<FieldError>> {
        let req = parse_request(&v).map_err(|e| vec![e])?;
        validate(
            &req,
            &engines(&[EngineChoice::Seedream, EngineChoice::Orbita]),
            &ContentPolicy::default(),
            || 7,
        )
    }

    fn fields(errs: &[FieldError]) -> Vec<String> {
        errs.iter().filter_map(|e| e.field.clone()).collect()
    }

    #[test]
    fn a_structured_brief_becomes_a_standard_portrait_prompt() {
        let s = check(json!({
            "instructions": [{
                "appearance": {"gender": "female", "age": 28, "expression": "relaxed"},
                "face": {"eyes": "pale blue", "marks": "freckles"},
                "hair": {"color": "ash blonde", "length": "long"},
                "camera": {"angle": "ignored"},
                "num_variations": 3,
                "options": {"ar": "4:5", "size": "2K", "format": "jpg"}
            }],
            "options": {"model": "auto"},
            "name": "Spring catalog model"
        }))
        .expect("valid");
        let ins = &s.instructions[0];
        assert_eq!(s.total_variations(), 3);
        assert_eq!(s.name.as_deref(), Some("Spring catalog model"));
        assert_eq!((ins.output.width, ins.output.height), (1640, 2048));
        for part in [
            "front-facing",
            "28 years old",
            "eyes pale blue",
            "color ash blonde",
        ] {
            assert!(ins.prompt.contains(part), "{part} in {}", ins.prompt);
        }
        let cost: super::super::Credits = IdentityCreation::plan(&s, &PriceTable::default())
            .iter()
            .map(|p| p.cost)
            .sum();
        assert_eq!(cost.as_f64(), 15.0);
        // An expert prompt is sent verbatim.
        let s = check(json!({"instructions": [{"prompt": "  A calm woman, olive skin ", "appearance": {"gender": "female"}}]}))
            .expect("valid");
        assert_eq!(s.instructions[0].prompt, "A calm woman, olive skin");
        assert_eq!(s.instructions[0].appearance["gender"], "female");
    }

    #[test]
    fn every_problem_is_named_with_its_field() {
        let errs = check(json!({
            "instructions": [
                {"num_variations": 9},
                {"prompt": "a portrait of Taylor Swift on a beach", "input_assets": [{"file_id": "a"}, {"file_id": "a"}, {"file_id": "b"}, {"file_id": "c"}]},
                {"appearance": {"age": true, "gender": 5, "Taylor Swift": "yes"}, "options": {"width": 1000}}
            ],
            "options": {"model": "nano_banana_pro"},
            "name": ""
        }))
        .expect_err("invalid");
        let f = fields(&errs);
        for want in [
            "instructions[0]",
            "instructions[0].num_variations",
            "instructions[1].prompt",
            "instructions[1].input_assets",
            "instructions[1].input_assets[1].file_id",
            "instructions[2].appearance.age",
            "instructions[2].appearance.gender",
            "instructions[2].appearance.Taylor Swift",
            "instructions[2].options.height",
            "instructions[2]",
            "options.model",
            "name",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} in {f:?}");
        }
        let blocked = errs
            .iter()
            .find(|e| e.field.as_deref() == Some("instructions[1].prompt"))
            .expect("blocked");
        assert!(
            blocked.message.contains("blocked term: 'Taylor Swift'"),
            "{}",
            blocked.message
        );
        assert_eq!(
            fields(&check(json!({"instructions": []})).expect_err("none")),
            ["instructions"]
        );
    }

    #[test]
    fn orbita_draws_1k_without_references_or_the_extra_ratios() {
        let errs = check(json!({
            "instructions": [{"prompt": "a man", "input_assets": [{"file_id": "f"}],
                              "options": {"size": "2K", "ar": "21:9"}}],
            "options": {"model": "orbita"}
        }))
        .expect_err("orbita limits");
        let f = fields(&errs);
        for want in [
            "instructions[0].input_assets",
            "instructions[0].options.size",
            "instructions[0].options.ar",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} in {f:?}");
        }
        let ok = check(
            json!({"instructions": [{"prompt": "a man", "options": {"ar": "3:4"}}],
                              "options": {"model": "orbita"}}),
        )
        .expect("1K 3:4 is fine");
        assert_eq!(ok.model, EngineChoice::Orbita);
        assert!(IdentityCreation::requirements(&ok).files.is_empty());
    }
}
