//! Predictions (contract §7, seed 001): images generated with one or more
//! trained custom models, each given to the generator as its weights (a
//! signed URL) and a scale. One output per requested image, priced as a 1K
//! output.

use super::credits::PriceTable;
use super::kinds::{JobKind, PlannedOutput, Requirements};
use super::credits::SizeClass;
use super::packshot::ImageFormat;
use super::task::WorkQueue;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// One trained model a prediction uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRef {
    /// Its key in `scaleConfigs` (`"1"`, `"2"`, …).
    pub slot: String,
    pub model_id: String,
    pub training_id: String,
    /// 0–1.
    pub scale: f64,
    /// The final weights of the training, in the object store.
    pub weights_key: String,
    pub weights_content_type: String,
    pub trigger_word: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionSpec {
    pub prompt: String,
    pub seed: u32,
    pub width: u32,
    pub height: u32,
    pub num_images: u32,
    pub output_format: ImageFormat,
    pub guidance_scale: f64,
    pub num_inference_steps: u32,
    /// In `scaleConfigs` order (by numeric key).
    pub loras: Vec<LoraRef>,
}

impl PredictionSpec {
    /// The seed of image `index`.
    pub fn seed_of(&self, index: u32) -> u32 {
        self.seed.wrapping_add(index)
    }

    /// The fields a generator mapping names (`GENERATOR_FIELDS`), given the
    /// signed URLs of the weights (in `loras` order).
    pub fn fields(&self, index: u32, seed: u32, weights_urls: &[String]) -> Map<String, Value> {
        let loras: Vec<Value> = self
            .loras
            .iter()
            .zip(weights_urls)
            .map(|(l, url)| json!({"url": url, "scale": l.scale, "trigger_word": l.trigger_word}))
            .collect();
        let mut f = Map::new();
        f.insert("prompt".into(), json!(self.prompt));
        f.insert("seed".into(), json!(seed));
        f.insert("width".into(), json!(self.width));
        f.insert("height".into(), json!(self.height));
        f.insert("num_inference_steps".into(), json!(self.num_inference_steps));
        f.insert("guidance_scale".into(), json!(self.guidance_scale));
        f.insert(
            "output_format".into(),
            json!(match self.output_format {
                ImageFormat::Jpg => "jpeg",
                ImageFormat::Png => "png",
            }),
        );
        f.insert(
            "loras".into(),
            json!(serde_json::to_string(&loras).unwrap_or_default()),
        );
        f.insert(
            "lora_url".into(),
            json!(weights_urls.first().cloned().unwrap_or_default()),
        );
        f.insert(
            "lora_scale".into(),
            json!(self.loras.first().map_or(0.0, |l| l.scale)),
        );
        f.insert(
            "lora_urls".into(),
            Value::Array(weights_urls.iter().map(|u| json!(u)).collect()),
        );
        f.insert(
            "lora_scales".into(),
            Value::Array(self.loras.iter().map(|l| json!(l.scale)).collect()),
        );
        f.insert(
            "trigger_words".into(),
            Value::Array(self.loras.iter().map(|l| json!(l.trigger_word)).collect()),
        );
        f.insert("image_index".into(), json!(index));
        f
    }
}

pub struct Prediction;

impl JobKind for Prediction {
    const NAME: &'static str = "prediction";
    const QUEUE: WorkQueue = WorkQueue::Generate;
    type Spec = PredictionSpec;

    fn plan(spec: &PredictionSpec, prices: &PriceTable) -> Vec<PlannedOutput> {
        (0..spec.num_images)
            .map(|i| PlannedOutput {
                instruction_index: 0,
                variation_index: i,
                cost: prices.price(SizeClass::K1),
                format: spec.output_format,
            })
            .collect()
    }

    fn requirements(_: &PredictionSpec) -> Requirements<'_> {
        Requirements::default()
    }

    fn post_process(_: &PredictionSpec) -> bool {
        false
    }

    const GENERATOR_FIELDS: &'static [&'static str] = &[
        "prompt",
        "seed",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "output_format",
        "loras",
        "lora_url",
        "lora_scale",
        "lora_urls",
        "lora_scales",
        "trigger_words",
        "image_index",
    ];
}
