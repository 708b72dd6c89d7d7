//! Training parameters of Models API models (contract §8.3): which names
//! each model family takes, their ranges, and the defaults a training
//! starts with. A parameter a family does not take is a 400 naming it.

use super::credits::{Credits, PriceTable};
use super::kinds::{JobKind, PlannedOutput, Requirements};
use super::packshot::{FieldError, ImageFormat};
use super::task::WorkQueue;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The model families of the implemented types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `sd-1_5`
    Sd15,
    /// `sd-xl-lora`
    SdxlLora,
    /// `flux.1-lora`, `flux.1-composition`
    FluxLora,
}

impl Family {
    pub fn of(model_type: &str) -> Option<Family> {
        match model_type {
            "sd-1_5" => Some(Family::Sd15),
            "sd-xl-lora" => Some(Family::SdxlLora),
            "flux.1-lora" | "flux.1-composition" => Some(Family::FluxLora),
            _ => None,
        }
    }
}

/// How a parameter's value is checked.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// A number strictly above 0.
    Positive,
    /// A number within the bounds.
    Range(f64, f64),
    /// A whole number within the bounds.
    Whole(i64, i64),
    Text,
    Bool,
    OneOf(&'static [&'static str]),
    /// An array of strings.
    Strings,
    /// Accepted and ignored (legacy).
    Ignored,
}

const SD_SCHEDULERS: &[&str] = &[
    "constant",
    "constant-with-warmup",
    "cosine",
    "cosine-with-restarts",
    "linear",
    "polynomial",
];

/// The parameters of a family and their rules.
fn rules(f: Family) -> Vec<(&'static str, Rule)> {
    use Rule::*;
    let mut v = vec![("learningRate", Positive), ("conceptPrompt", Text)];
    match f {
        Family::Sd15 => v.extend([
            ("maxTrainSteps", Whole(0, 40_000)),
            ("classPrompt", Text),
            ("lrScheduler", OneOf(SD_SCHEDULERS)),
            ("priorLossWeight", Range(0.0, f64::MAX)),
            ("randomCrop", Bool),
            ("randomCropRatio", Range(0.0, 1.0)),
            ("randomCropScale", Range(0.0, f64::MAX)),
            ("seed", Whole(0, u32::MAX as i64)),
            ("validationFrequency", Whole(0, 40_000)),
            ("scaleLr", Ignored),
            ("textEncoderTrainingRatio", Ignored),
        ]),
        Family::SdxlLora => v.extend([
            ("learningRateTextEncoder", Range(0.0, f64::MAX)),
            ("learningRateUnet", Positive),
            ("numTextTrainSteps", Whole(0, 40_000)),
            ("numUNetTrainSteps", Whole(0, 40_000)),
            ("rank", Whole(2, 128)),
            ("lrScheduler", OneOf(SD_SCHEDULERS)),
            ("priorLossWeight", Range(0.0, f64::MAX)),
            ("randomCrop", Bool),
            ("randomCropRatio", Range(0.0, 1.0)),
            ("randomCropScale", Range(0.0, f64::MAX)),
            ("seed", Whole(0, u32::MAX as i64)),
            ("validationFrequency", Whole(0, 40_000)),
            ("scaleLr", Ignored),
            ("textEncoderTrainingRatio", Ignored),
        ]),
        Family::FluxLora => v.extend([
            ("learningRateTextEncoder", Range(0.000_001, 0.001)),
            ("maxTrainSteps", Whole(0, 10_000)),
            ("nbEpochs", Whole(1, 100)),
            ("nbRepeats", Whole(1, 100)),
            ("batchSize", Whole(1, 4)),
            ("rank", Whole(2, 64)),
            ("optimizeFor", OneOf(&["likeness", "all", "none"])),
            ("samplePrompts", Strings),
        ]),
    }
    v
}

fn check(at: &str, rule: Rule, v: &Value) -> Option<String> {
    let num = v.as_f64();
    match rule {
        Rule::Positive => match num {
            Some(n) if n > 0.0 && n.is_finite() => None,
            _ => Some("must be a number above 0".into()),
        },
        Rule::Range(lo, hi) => match num {
            Some(n) if (lo..=hi).contains(&n) => None,
            _ if hi == f64::MAX => Some(format!("must be a number of at least {lo}")),
            _ => Some(format!("must be a number between {lo} and {hi}")),
        },
        Rule::Whole(lo, hi) => match v.as_i64() {
            Some(n) if (lo..=hi).contains(&n) => None,
            _ => Some(format!("must be a whole number between {lo} and {hi}")),
        },
        Rule::Text => (!v.is_string()).then(|| "must be a string".into()),
        Rule::Bool => (!v.is_boolean()).then(|| "must be true or false".into()),
        Rule::OneOf(names) => match v.as_str() {
            Some(s) if names.contains(&s) => None,
            _ => Some(format!("must be one of {}", names.join(", "))),
        },
        Rule::Strings => match v.as_array() {
            Some(a) if a.iter().all(Value::is_string) && a.len() <= 20 => None,
            _ => Some("must be an array of at most 20 strings".into()),
        },
        Rule::Ignored => {
            let _ = at;
            None
        }
    }
}

/// Checks `params` for a model of `model_type`: every name is one the
/// family takes, every value within its range (`validationFrequency` not
/// above `maxTrainSteps`). Problems are named `parameters.<name>`.
pub fn validate(model_type: &str, params: &Map<String, Value>) -> Result<(), Vec<FieldError>> {
    let Some(family) = Family::of(model_type) else {
        return Err(vec![FieldError::new(
            "type",
            format!("{model_type:?} takes no training parameters here"),
        )]);
    };
    let rules = rules(family);
    let mut errs = Vec::new();
    for (name, v) in params {
        let at = format!("parameters.{}", name.chars().take(64).collect::<String>());
        match rules.iter().find(|(n, _)| n == name) {
            None => errs.push(FieldError::new(
                &at,
                format!(
                    "not a training parameter of {model_type}; it takes {}",
                    rules.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                ),
            )),
            Some((_, rule)) if !v.is_null() => {
                if let Some(m) = check(&at, *rule, v) {
                    errs.push(FieldError::new(&at, m));
                }
            }
            Some(_) => {}
        }
    }
    if let (Some(freq), Some(steps)) = (
        params.get("validationFrequency").and_then(Value::as_i64),
        params.get("maxTrainSteps").and_then(Value::as_i64),
    ) && freq > steps
    {
        errs.push(FieldError::new(
            "parameters.validationFrequency",
            "must not be above maxTrainSteps",
        ));
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

/// The parameters a training of a `model_type` model over `images`
/// training images starts with: the client's, then the family's defaults.
pub fn resolve(model_type: &str, params: &Map<String, Value>, images: u32) -> Map<String, Value> {
    let mut out = params.clone();
    out.retain(|_, v| !v.is_null());
    let n = u64::from(images);
    let defaults: Vec<(&str, Value)> = match Family::of(model_type) {
        Some(Family::Sd15) => vec![
            ("learningRate", json!(0.000_005)),
            (
                "maxTrainSteps",
                json!(((n * 225) as f64 / 3.0).round() as u64),
            ),
            ("lrScheduler", json!("constant")),
            (
                "conceptPrompt",
                json!(if params.contains_key("classPrompt") {
                    ""
                } else {
                    "daiton"
                }),
            ),
        ],
        Some(Family::SdxlLora) => vec![
            ("learningRate", json!(0.000_005)),
            ("learningRateTextEncoder", json!(0.000_05)),
            ("numTextTrainSteps", json!(n * 175 / 4)),
            ("numUNetTrainSteps", json!(n * 175)),
            ("rank", json!(64)),
            ("lrScheduler", json!("constant")),
            ("conceptPrompt", json!("daiton")),
        ],
        Some(Family::FluxLora) => vec![
            ("learningRate", json!(0.0001)),
            ("learningRateTextEncoder", json!(0.000_01)),
            ("maxTrainSteps", json!((n * 100).min(10_000))),
            ("batchSize", json!(1)),
            ("rank", json!(16)),
            ("optimizeFor", json!("all")),
            ("conceptPrompt", json!("")),
        ],
        None => Vec::new(),
    };
    for (k, v) in defaults {
        out.entry(k.to_string()).or_insert(v);
    }
    out
}

/// The steps a training of a `model_type` model runs, from its resolved
/// parameters (SDXL LoRA counts its UNet steps).
pub fn steps(model_type: &str, params: &Map<String, Value>) -> u64 {
    let key = match Family::of(model_type) {
        Some(Family::SdxlLora) => "numUNetTrainSteps",
        _ => "maxTrainSteps",
    };
    params.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// What a training costs (contract §8.4): `ceil(steps / 100)` times the
/// family's price per hundred steps (default 2 for Flux LoRA, 1 for the SD
/// types).
pub fn cost(model_type: &str, steps: u64, prices: &PriceTable) -> Credits {
    let per_100 = match Family::of(model_type) {
        Some(Family::FluxLora) => prices.training_flux_per_100_steps,
        _ => prices.training_sd_per_100_steps,
    };
    let hundreds = steps.div_ceil(100).max(1);
    Credits::from_f64(hundreds as f64 * per_100).unwrap_or(Credits::ZERO)
}

/// A fresh trigger word: 7 characters of `A–Z0–9` (contract §7).
pub fn trigger_word() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..7)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Which API a training was started through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainingApi {
    /// `/v1/custom-models/{id}/trainings` (contract §7).
    Custom,
    /// `PUT /v1/models/{id}/train` (contract §8).
    Models,
}

impl TrainingApi {
    pub fn as_str(self) -> &'static str {
        match self {
            TrainingApi::Custom => "custom",
            TrainingApi::Models => "models",
        }
    }
}

/// A training job: everything its trainer is given, fixed at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSpec {
    pub training_id: String,
    pub api: TrainingApi,
    pub model_id: String,
    pub model_type: String,
    pub trigger_word: String,
    /// The resolved parameters (the client's, then the family's defaults).
    pub parameters: Map<String, Value>,
    pub steps: u64,
    pub image_count: u32,
    /// The frozen dataset: one ZIP of every training image.
    pub dataset_key: String,
    pub cost: Credits,
}

/// The training kind: one output (the weights), on the `training` queue.
pub struct Training;

impl JobKind for Training {
    const NAME: &'static str = "training";
    const QUEUE: WorkQueue = WorkQueue::Training;
    /// Trainings have their own cap (`training.parallel_per_account`).
    const COUNTS_AGAINST_CAP: bool = false;
    type Spec = TrainingSpec;

    fn plan(spec: &TrainingSpec, _: &PriceTable) -> Vec<PlannedOutput> {
        vec![PlannedOutput {
            instruction_index: 0,
            variation_index: 0,
            cost: spec.cost,
            // Replaced by the weights' own format when they are recorded.
            format: ImageFormat::Png,
        }]
    }

    fn requirements(_: &TrainingSpec) -> Requirements<'_> {
        Requirements::default()
    }

    fn post_process(_: &TrainingSpec) -> bool {
        false
    }

    /// What a trainer route can map onto its container's inputs.
    const GENERATOR_FIELDS: &'static [&'static str] = &[
        "dataset_url",
        "trigger_word",
        "max_train_steps",
        "learning_rate",
        "rank",
        "batch_size",
        "epochs",
        "model_type",
        "image_count",
        "parameters",
    ];
}

impl TrainingSpec {
    /// The fields a trainer mapping names (`GENERATOR_FIELDS`), given the
    /// signed dataset URL of the attempt.
    pub fn fields(&self, dataset_url: &str) -> Map<String, Value> {
        let p = &self.parameters;
        let mut f = Map::new();
        f.insert("dataset_url".into(), json!(dataset_url));
        f.insert("trigger_word".into(), json!(self.trigger_word));
        f.insert("max_train_steps".into(), json!(self.steps));
        f.insert(
            "learning_rate".into(),
            p.get("learningRate").cloned().unwrap_or(json!(0.0001)),
        );
        f.insert("rank".into(), p.get("rank").cloned().unwrap_or(json!(16)));
        f.insert(
            "batch_size".into(),
            p.get("batchSize").cloned().unwrap_or(json!(1)),
        );
        f.insert(
            "epochs".into(),
            p.get("nbEpochs").cloned().unwrap_or(json!(1)),
        );
        f.insert("model_type".into(), json!(self.model_type));
        f.insert("image_count".into(), json!(self.image_count));
        f.insert("parameters".into(), Value::Object(p.clone()));
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().expect("object").clone()
    }

    #[test]
    fn each_family_takes_its_own_names_within_range() {
        assert!(validate("flux.1-lora", &obj(json!({"learningRate": 0.0002, "rank": 32, "optimizeFor": "likeness", "samplePrompts": ["a"]}))).is_ok());
        assert!(
            validate(
                "sd-1_5",
                &obj(json!({"maxTrainSteps": 1500, "validationFrequency": 100, "scaleLr": true}))
            )
            .is_ok()
        );
        let errs = validate(
            "flux.1-lora",
            &obj(json!({"rank": 128, "lrScheduler": "cosine", "learningRateTextEncoder": 0.5, "batchSize": 0, "gender": "f"})),
        )
        .expect_err("invalid");
        let fields: Vec<_> = errs.iter().filter_map(|e| e.field.clone()).collect();
        for f in [
            "parameters.rank",
            "parameters.lrScheduler",
            "parameters.learningRateTextEncoder",
            "parameters.batchSize",
            "parameters.gender",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} in {fields:?}");
        }
        let errs = validate(
            "sd-1_5",
            &obj(json!({"maxTrainSteps": 100, "validationFrequency": 200})),
        )
        .expect_err("frequency above steps");
        assert_eq!(
            errs[0].field.as_deref(),
            Some("parameters.validationFrequency")
        );
        assert!(validate("sd-xl-lora", &obj(json!({"learningRate": 0}))).is_err());
    }

    #[test]
    fn defaults_follow_the_image_count_and_keep_what_the_client_set() {
        let r = resolve("sd-1_5", &Map::new(), 12);
        assert_eq!(r["maxTrainSteps"], json!(900));
        assert_eq!(r["conceptPrompt"], json!("daiton"));
        let r = resolve("flux.1-lora", &obj(json!({"rank": 8})), 150);
        assert_eq!(
            (r["rank"].clone(), r["maxTrainSteps"].clone()),
            (json!(8), json!(10_000))
        );
        let r = resolve("sd-xl-lora", &Map::new(), 10);
        assert_eq!(r["numUNetTrainSteps"], json!(1750));
    }
}
