//! Phota Studio (contract §9.4–9.5): `/edit` and `/generate`, synchronous
//! calls answered with the images. Two job kinds carry them:
//!
//! - `studio`: drawn by a generator engine (a model container), for every
//!   prompt; on the `generate` queue.
//! - `studio_restore`: what the built-in engine does for real — an `/edit`
//!   with no prompt and with profiles: every face of the photo that matches
//!   one of the referenced profiles gets that profile's face back (face
//!   match, then the model-swap blend); on the `swap` queue, where the face
//!   models are.
//!
//! Subjects are only ever the profiles the call names (`profile_ids` and
//! `[[profile_id]]` references in the prompt); `known_subjects.counts` is
//! measured on the outputs by face matching against their embeddings.

use super::credits::{PriceTable, SizeClass};
use super::identity::PhotoSource;
use super::kinds::{JobKind, PlannedOutput, Requirements};
use super::packshot::{AspectRatio, EngineChoice, FieldError, ImageFormat, MAX_PROMPT};
use super::task::WorkQueue;
use serde::{Deserialize, Serialize};

/// Images of one `/edit` call.
pub const MAX_IMAGES: usize = 10;
/// Outputs of one call.
pub const MAX_OUTPUTS: u32 = 4;
/// Distinct profiles one call may name.
pub const MAX_PROFILES: usize = 10;
/// Characters of a profile id.
pub const MAX_PROFILE_ID: usize = 64;

/// Which endpoint a call came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StudioMode {
    Edit,
    Generate,
}

/// `aspect_ratio` of a Studio call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum StudioRatio {
    /// The first image's own shape (`/edit`), else square.
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "1:1")]
    Square,
    #[serde(rename = "3:4")]
    R3x4,
    #[serde(rename = "4:3")]
    R4x3,
    #[serde(rename = "9:16")]
    R9x16,
    #[serde(rename = "16:9")]
    R16x9,
}

impl StudioRatio {
    pub fn fixed(self) -> Option<AspectRatio> {
        match self {
            StudioRatio::Auto => None,
            StudioRatio::Square => Some(AspectRatio::Square),
            StudioRatio::R3x4 => Some(AspectRatio::R3x4),
            StudioRatio::R4x3 => Some(AspectRatio::R4x3),
            StudioRatio::R9x16 => Some(AspectRatio::R9x16),
            StudioRatio::R16x9 => Some(AspectRatio::R16x9),
        }
    }
}

/// How the answer carries the images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseMode {
    /// Base64 in `images`.
    #[default]
    Bytes,
    /// Signed URLs (24 h) in `download_urls`.
    Urls,
}

/// The body of `/v1/phota/edit` and `/v1/phota/generate`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct StudioRequest {
    /// The change (edit) or the scene (generate); `[[profile_id]]` names a
    /// subject.
    pub prompt: Option<String>,
    /// `/edit` only: 1–10, each raw base64 bytes or an `http(s)` URL.
    pub images: Option<Vec<String>>,
    /// `/edit` only: candidate subjects.
    pub profile_ids: Option<Vec<String>>,
    /// 1–4 (default 1).
    pub num_output_images: Option<u32>,
    pub aspect_ratio: Option<StudioRatio>,
    pub resolution: Option<SizeClass>,
    pub output_format: Option<ImageFormat>,
    pub response_mode: Option<ResponseMode>,
    /// Seed of the first output (random when absent).
    pub seed: Option<u32>,
}

/// One image of the call, as the request gave it (before it is stored).
#[derive(Debug, Clone, PartialEq)]
pub enum StudioImageIn {
    /// Decoded base64 bytes.
    Bytes(Vec<u8>),
    Url(String),
}

/// The normalised call (stored as the job spec of both kinds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudioSpec {
    pub mode: StudioMode,
    /// As the client wrote it, references included.
    pub prompt: String,
    /// `/edit`: the photos (stored objects or public URLs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<PhotoSource>,
    /// Every profile the call names: `profile_ids`, then the prompt's
    /// references, each once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    pub num_outputs: u32,
    pub aspect_ratio: StudioRatio,
    pub resolution: SizeClass,
    pub format: ImageFormat,
    pub response_mode: ResponseMode,
    pub seed: u32,
}

impl StudioSpec {
    /// Whether the built-in engine serves the call: an edit with no words
    /// and with subjects to restore.
    pub fn is_restore(&self) -> bool {
        self.mode == StudioMode::Edit
            && strip_references(&self.prompt).trim().is_empty()
            && !self.profiles.is_empty()
    }

    /// The seed of output `v`.
    pub fn seed_of(&self, v: u32) -> u32 {
        self.seed.wrapping_add(v)
    }

    /// The prompt for a generator: each `[[id]]` becomes "person N" (N its
    /// place in `profiles`, 1-based), the order of the `profiles` field.
    pub fn generator_prompt(&self) -> String {
        let mut out = String::with_capacity(self.prompt.len());
        let mut rest = self.prompt.as_str();
        while let Some(start) = rest.find("[[") {
            let Some(len) = rest[start + 2..].find("]]") else {
                break;
            };
            let id = rest[start + 2..start + 2 + len].trim();
            out.push_str(&rest[..start]);
            match self.profiles.iter().position(|p| p == id) {
                Some(i) => out.push_str(&format!("person {}", i + 1)),
                None => out.push_str(&rest[start..start + 4 + len]),
            }
            rest = &rest[start + 4 + len..];
        }
        out.push_str(rest);
        out
    }
}

/// The distinct `[[profile_id]]` references of a prompt, in order.
pub fn references(prompt: &str) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("[[") {
        let Some(len) = rest[start + 2..].find("]]") else {
            break;
        };
        let id = rest[start + 2..start + 2 + len].trim().to_string();
        if !id.is_empty() && !ids.contains(&id) {
            ids.push(id);
        }
        rest = &rest[start + 4 + len..];
    }
    ids
}

/// The prompt without its references.
pub fn strip_references(prompt: &str) -> String {
    let mut out = String::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("[[") {
        let Some(len) = rest[start + 2..].find("]]") else {
            break;
        };
        out.push_str(&rest[..start]);
        rest = &rest[start + 4 + len..];
    }
    out.push_str(rest);
    out
}

/// A call, checked: its spec without the images (which the API stores
/// first) and the images as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct StudioCall {
    pub spec: StudioSpec,
    pub images: Vec<StudioImageIn>,
}

/// Validates a call through `mode`'s endpoint, reporting every problem.
/// `max_image_bytes` bounds each decoded image.
pub fn validate(
    mode: StudioMode,
    body: &serde_json::Value,
    max_image_bytes: usize,
    mut random_seed: impl FnMut() -> u32,
) -> Result<StudioCall, Vec<FieldError>> {
    let req: StudioRequest = serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        vec![FieldError {
            field: (path != ".").then_some(path),
            message: e.into_inner().to_string(),
        }]
    })?;
    let mut errs = Vec::new();
    let prompt = req.prompt.clone().unwrap_or_default();
    if prompt.chars().count() > MAX_PROMPT {
        errs.push(FieldError::new(
            "prompt",
            format!("must be at most {MAX_PROMPT} characters"),
        ));
    }
    let mut images = Vec::new();
    let mut profiles: Vec<String> = Vec::new();
    match mode {
        StudioMode::Generate => {
            for f in ["images", "profile_ids"] {
                let sent = match f {
                    "images" => req.images.is_some(),
                    _ => req.profile_ids.is_some(),
                };
                if sent {
                    errs.push(FieldError::new(
                        f,
                        "not accepted by /generate: name subjects with [[profile_id]] in the prompt",
                    ));
                }
            }
            if prompt.trim().is_empty() {
                errs.push(FieldError::new(
                    "prompt",
                    "must describe the image to generate",
                ));
            }
        }
        StudioMode::Edit => {
            let given = req.images.clone().unwrap_or_default();
            if given.is_empty() || given.len() > MAX_IMAGES {
                errs.push(FieldError::new(
                    "images",
                    format!("must hold 1 to {MAX_IMAGES} images, got {}", given.len()),
                ));
            }
            for (i, item) in given.iter().enumerate() {
                match image_in(item, max_image_bytes) {
                    Ok(img) => images.push(img),
                    Err(m) => errs.push(FieldError::new(format!("images[{i}]"), m)),
                }
            }
            for (i, id) in req.profile_ids.iter().flatten().enumerate() {
                let id = id.trim();
                if id.is_empty() {
                    errs.push(FieldError::new(
                        format!("profile_ids[{i}]"),
                        "must not be empty",
                    ));
                } else if !profiles.iter().any(|p| p == id) {
                    profiles.push(id.to_string());
                }
            }
        }
    }
    for id in references(&prompt) {
        if !profiles.contains(&id) {
            profiles.push(id);
        }
    }
    for id in &profiles {
        if id.chars().count() > MAX_PROFILE_ID || id.chars().any(char::is_control) {
            errs.push(FieldError::new(
                "profile_ids",
                format!(
                    "a profile id is at most {MAX_PROFILE_ID} characters, without control characters: {:?}",
                    id.chars().take(MAX_PROFILE_ID).collect::<String>()
                ),
            ));
        }
    }
    if profiles.len() > MAX_PROFILES {
        errs.push(FieldError::new(
            "profile_ids",
            format!("at most {MAX_PROFILES} distinct profiles per call"),
        ));
    }
    let num_outputs = req.num_output_images.unwrap_or(1);
    if !(1..=MAX_OUTPUTS).contains(&num_outputs) {
        errs.push(FieldError::new(
            "num_output_images",
            format!("must be between 1 and {MAX_OUTPUTS}"),
        ));
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(StudioCall {
        spec: StudioSpec {
            mode,
            prompt,
            images: Vec::new(),
            profiles,
            num_outputs,
            aspect_ratio: req.aspect_ratio.unwrap_or(StudioRatio::Auto),
            resolution: req.resolution.unwrap_or(SizeClass::K1),
            format: req.output_format.unwrap_or(ImageFormat::Png),
            response_mode: req.response_mode.unwrap_or_default(),
            seed: req.seed.unwrap_or_else(&mut random_seed),
        },
        images,
    })
}

/// One `images` item: an `http(s)` URL, or raw base64 (a `data:` URL is
/// accepted too) decoding to at most `max_bytes`.
fn image_in(item: &str, max_bytes: usize) -> Result<StudioImageIn, String> {
    use base64::Engine as _;
    let t = item.trim();
    if t.starts_with("http://") || t.starts_with("https://") {
        return url::Url::parse(t)
            .map(|_| StudioImageIn::Url(t.to_string()))
            .map_err(|e| format!("not a valid URL: {e}"));
    }
    let b64 = match t.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(";base64,")
            .map(|(_, d)| d)
            .ok_or("a data URL must be base64 (data:<type>;base64,…)")?,
        None => t,
    };
    if b64.len() / 4 * 3 > max_bytes + 3 {
        return Err(format!("the image is larger than {max_bytes} bytes"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map_err(|_| "neither an http(s) URL nor valid base64 image bytes".to_string())?;
    if bytes.len() > max_bytes {
        return Err(format!("the image is larger than {max_bytes} bytes"));
    }
    Ok(StudioImageIn::Bytes(bytes))
}

fn plan_outputs(spec: &StudioSpec, prices: &PriceTable) -> Vec<PlannedOutput> {
    (0..spec.num_outputs)
        .map(|v| PlannedOutput {
            instruction_index: 0,
            variation_index: v,
            cost: prices.price(spec.resolution),
            format: spec.format,
        })
        .collect()
}

/// The `studio` kind: a generator draws each output.
pub struct Studio;

impl JobKind for Studio {
    const NAME: &'static str = "studio";
    const QUEUE: WorkQueue = WorkQueue::Generate;
    /// A synchronous call holds its request, not an active-job slot.
    const COUNTS_AGAINST_CAP: bool = false;
    type Spec = StudioSpec;
    /// `prompt` (references as "person N"), `client_prompt`, `images`
    /// (`/edit`: data URLs), `subjects` (each named profile's aligned face,
    /// data URLs, in the order of "person N"), `profile_ids`, `mode`
    /// (`edit`|`generate`), `seed`, `width`, `height`, `aspect_ratio`,
    /// `variation`, `format`.
    const GENERATOR_FIELDS: &'static [&'static str] = &[
        "prompt",
        "client_prompt",
        "images",
        "subjects",
        "profile_ids",
        "mode",
        "seed",
        "width",
        "height",
        "aspect_ratio",
        "variation",
        "format",
    ];
    const ENGINE_NAMES: &'static [EngineChoice] = &[];

    /// 3 / 5 / 10 per output by resolution (§9, as §3.4).
    fn plan(spec: &StudioSpec, prices: &PriceTable) -> Vec<PlannedOutput> {
        plan_outputs(spec, prices)
    }

    fn requirements(spec: &StudioSpec) -> Requirements<'_> {
        Requirements {
            profiles: spec.profiles.iter().map(String::as_str).collect(),
            ..Requirements::default()
        }
    }

    fn post_process(_: &StudioSpec) -> bool {
        false
    }

    /// Studio calls name no engine: the `auto` order, with its fallback.
    fn engine_fallback(_: &StudioSpec) -> bool {
        true
    }
}

/// The spec of a `studio_restore` job: the call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RestoreSpec(pub StudioSpec);

/// The `studio_restore` kind: the built-in identity restore.
pub struct StudioRestore;

impl JobKind for StudioRestore {
    const NAME: &'static str = "studio_restore";
    const QUEUE: WorkQueue = WorkQueue::Swap;
    const COUNTS_AGAINST_CAP: bool = false;
    const BUILTIN_ENGINE: bool = true;
    type Spec = RestoreSpec;

    fn plan(spec: &RestoreSpec, prices: &PriceTable) -> Vec<PlannedOutput> {
        plan_outputs(&spec.0, prices)
    }

    fn requirements(spec: &RestoreSpec) -> Requirements<'_> {
        Studio::requirements(&spec.0)
    }

    fn post_process(_: &RestoreSpec) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn edit(v: serde_json::Value) -> Result<StudioCall, Vec<FieldError>> {
        validate(StudioMode::Edit, &v, 1 << 20, || 9)
    }

    #[test]
    fn references_are_found_once_and_named_person_n() {
        let call = edit(json!({
            "prompt": "[[p_b]] and [[ p_a ]] at the beach with [[p_b]]",
            "images": ["https://example.test/a.jpg", "aGVsbG8="],
            "profile_ids": ["p_a"],
        }))
        .expect("valid");
        assert_eq!(call.spec.profiles, ["p_a", "p_b"]);
        assert_eq!(
            call.spec.generator_prompt(),
            "person 2 and person 1 at the beach with person 2"
        );
        assert_eq!(
            call.images,
            [
                StudioImageIn::Url("https://example.test/a.jpg".into()),
                StudioImageIn::Bytes(b"hello".to_vec())
            ]
        );
        assert!(!call.spec.is_restore());
        assert_eq!((call.spec.num_outputs, call.spec.seed), (1, 9));
        let restore = edit(json!({"images": ["aGVsbG8="], "profile_ids": ["p_a"]})).expect("valid");
        assert!(restore.spec.is_restore());
        let prices = PriceTable::default();
        let cost: super::super::Credits = Studio::plan(&restore.spec, &prices)
            .iter()
            .map(|p| p.cost)
            .sum();
        assert_eq!(cost.as_f64(), 3.0);
    }

    #[test]
    fn every_problem_is_named() {
        let errs = edit(json!({"images": [], "num_output_images": 5})).expect_err("invalid");
        let f: Vec<_> = errs.iter().filter_map(|e| e.field.clone()).collect();
        assert_eq!(f, ["images", "num_output_images"]);
        let errs = edit(json!({"images": ["%%%", "ftp://x"]})).expect_err("invalid");
        let f: Vec<_> = errs.iter().filter_map(|e| e.field.clone()).collect();
        assert_eq!(f, ["images[0]", "images[1]"]);
        let errs = validate(
            StudioMode::Generate,
            &json!({"prompt": "", "images": ["aGVsbG8="], "profile_ids": []}),
            1 << 20,
            || 1,
        )
        .expect_err("invalid");
        let f: Vec<_> = errs.iter().filter_map(|e| e.field.clone()).collect();
        assert_eq!(f, ["images", "profile_ids", "prompt"]);
        let errs = edit(json!({"images": ["aGVsbG8="], "prompt": "[[a\u{0}b]]"})).expect_err("NUL");
        assert_eq!(errs[0].field.as_deref(), Some("profile_ids"));
        let errs = edit(json!({"images": ["aGVsbG8="], "aspect_ratio": "2:1"})).expect_err("enum");
        assert_eq!(errs[0].field.as_deref(), Some("aspect_ratio"));
    }
}
