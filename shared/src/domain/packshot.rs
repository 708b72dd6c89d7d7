//! `POST /create-packshot`: the request as clients send it, its validation
//! (contract §3.2–§3.5) and the normalised [`PackshotSpec`] the job stores.
//! Parsing happens once, at the HTTP edge; the scheduler and the worker only
//! ever read the normalised form.

use super::credits::{PriceTable, SizeClass};
use super::engines::EngineAvailability;
use super::kinds::{JobKind, JobType, PlannedOutput, Requirements, per_variation};
use super::task::WorkQueue;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// One problem with a request, naming the field as the client wrote it
/// (`instructions[0].options.width`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: Option<String>,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

pub const MAX_IMAGES: usize = 10;
pub const MAX_INSTRUCTIONS: usize = 10;
pub const MAX_VARIATIONS: u32 = 8;
pub const MAX_PROMPT: usize = 4000;
pub const MAX_NOTE: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Style {
    FlatLay,
    GhostMannequin,
    MarketingReady,
    WhiteCutout,
    Free,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    SquarePackshot,
    #[serde(rename = "tall_3_4")]
    Tall34,
    #[serde(rename = "wide_4_3")]
    Wide43,
    FullFrame,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Angle {
    Front,
    Back,
    ThreeQuarter,
    TopDown,
    DetailMacro,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Shadow {
    Auto,
    None,
    Contact,
    SoftDrop,
    Natural,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum AspectRatio {
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
    /// Identity creation only (contract §3.8).
    #[serde(rename = "4:5")]
    R4x5,
    /// Identity creation only.
    #[serde(rename = "5:4")]
    R5x4,
    /// Identity creation only.
    #[serde(rename = "21:9")]
    R21x9,
}

impl AspectRatio {
    fn wh(self) -> (u32, u32) {
        match self {
            AspectRatio::Square => (1, 1),
            AspectRatio::R3x4 => (3, 4),
            AspectRatio::R4x3 => (4, 3),
            AspectRatio::R9x16 => (9, 16),
            AspectRatio::R16x9 => (16, 9),
            AspectRatio::R4x5 => (4, 5),
            AspectRatio::R5x4 => (5, 4),
            AspectRatio::R21x9 => (21, 9),
        }
    }

    /// The ratios only identity creation accepts.
    pub fn identity_only(self) -> bool {
        matches!(
            self,
            AspectRatio::R4x5 | AspectRatio::R5x4 | AspectRatio::R21x9
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AspectRatio::Square => "1:1",
            AspectRatio::R3x4 => "3:4",
            AspectRatio::R4x3 => "4:3",
            AspectRatio::R9x16 => "9:16",
            AspectRatio::R16x9 => "16:9",
            AspectRatio::R4x5 => "4:5",
            AspectRatio::R5x4 => "5:4",
            AspectRatio::R21x9 => "21:9",
        }
    }

    /// Pixel size for a long edge: the long side is `long`, the short side
    /// is rounded to a multiple of 8 (encoders and models prefer it).
    pub fn pixels(self, long: u32) -> (u32, u32) {
        let (w, h) = self.wh();
        let short = |a: u32, b: u32| ((long * a / b + 4) / 8 * 8).max(8);
        if w >= h {
            (long, short(h, w))
        } else {
            (short(w, h), long)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    Jpg,
    Png,
}

impl ImageFormat {
    pub fn ext(self) -> &'static str {
        match self {
            ImageFormat::Jpg => "jpg",
            ImageFormat::Png => "png",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Jpg => "image/jpeg",
            ImageFormat::Png => "image/png",
        }
    }
}

/// Engines a client may name (`options.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EngineChoice {
    Auto,
    NanoBananaPro,
    Seedream,
    /// Identity drafts only (contract §3.8).
    #[serde(rename = "nano_banana_2")]
    NanoBanana2,
    /// Identity drafts only: 1K, no `input_assets`, no 4:5, 5:4 or 21:9.
    Orbita,
}

impl EngineChoice {
    pub const ALL: [EngineChoice; 5] = [
        EngineChoice::Auto,
        EngineChoice::NanoBananaPro,
        EngineChoice::Seedream,
        EngineChoice::NanoBanana2,
        EngineChoice::Orbita,
    ];

    pub fn parse(name: &str) -> Option<EngineChoice> {
        Self::ALL.into_iter().find(|e| e.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EngineChoice::Auto => "auto",
            EngineChoice::NanoBananaPro => "nano_banana_pro",
            EngineChoice::Seedream => "seedream",
            EngineChoice::NanoBanana2 => "nano_banana_2",
            EngineChoice::Orbita => "orbita",
        }
    }
}

/// `string | integer | object` fields (background, surface, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum DesignValue {
    Text(String),
    Index(u32),
    Object(DesignObject),
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DesignObject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// A `file_id` used as a visual reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complexity: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct OutputOptionsIn {
    pub size: Option<SizeClass>,
    pub ar: Option<AspectRatio>,
    pub format: Option<ImageFormat>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub seed: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct JobOptionsIn {
    pub model: Option<EngineChoice>,
    pub use_anchor: Option<bool>,
    pub anchor_index: Option<i64>,
    pub size: Option<SizeClass>,
    pub ar: Option<AspectRatio>,
    pub format: Option<ImageFormat>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub seed: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct InstructionIn {
    pub style: Style,
    pub background: Option<DesignValue>,
    pub composition: Option<DesignValue>,
    pub props: Option<DesignValue>,
    pub surface: Option<DesignValue>,
    pub color_palette: Option<DesignValue>,
    pub lighting: Option<DesignValue>,
    pub framing: Option<Framing>,
    pub angle: Option<Angle>,
    pub shadow: Option<Shadow>,
    pub prompt: Option<String>,
    pub seed: Option<u32>,
    pub num_variations: Option<u32>,
    pub preset_name: Option<String>,
    pub category_names: Option<Vec<String>>,
    pub preset_code: Option<String>,
    #[serde(default)]
    pub options: OutputOptionsIn,
}

/// An entry of `images`: a bare `file_id` or `{file_id, note}` (§3.2).
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ImageRefIn {
    Id(String),
    Annotated {
        file_id: String,
        note: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
pub struct PackshotRequest {
    pub project_id: String,
    pub images: Vec<ImageRefIn>,
    pub instructions: Vec<InstructionIn>,
    #[serde(default)]
    pub post_process: bool,
    #[serde(default)]
    pub options: JobOptionsIn,
    #[serde(default)]
    pub review_config: Option<serde_json::Value>,
}

/// The operator's Design-Value catalogue: integer values of a design field
/// index into the list for that field (§3.5). Unknown index → 400.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesignCatalogue(pub BTreeMap<String, Vec<String>>);

impl Default for DesignCatalogue {
    fn default() -> Self {
        let mut m = BTreeMap::new();
        let e = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        m.insert(
            "background".into(),
            e(&[
                "pure white seamless",
                "light grey studio",
                "warm beige paper",
                "soft gradient grey",
                "pale blue studio",
            ]),
        );
        m.insert(
            "surface".into(),
            e(&[
                "white linen",
                "light oak wood",
                "grey concrete",
                "white marble",
                "kraft paper",
            ]),
        );
        m.insert(
            "lighting".into(),
            e(&[
                "soft even studio",
                "window light from left",
                "high key",
                "warm golden hour",
            ]),
        );
        m.insert(
            "color_palette".into(),
            e(&["neutral", "pastel", "earth tones", "monochrome"]),
        );
        m.insert(
            "composition".into(),
            e(&[
                "single garment centered",
                "garment with accessories",
                "detail close-up",
            ]),
        );
        m.insert(
            "props".into(),
            e(&["dried flowers", "folded magazine", "sunglasses"]),
        );
        DesignCatalogue(m)
    }
}

/// A design field after catalogue lookup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesignResolved {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// Output geometry and encoding of one instruction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OutputSpec {
    pub size: SizeClass,
    pub width: u32,
    pub height: u32,
    pub format: ImageFormat,
    /// Set when the client sent `width`/`height` (needs the account policy).
    pub custom: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ar: Option<AspectRatio>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstructionSpec {
    pub style: Style,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<DesignResolved>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub composition: Option<DesignResolved>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub props: Option<DesignResolved>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub surface: Option<DesignResolved>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color_palette: Option<DesignResolved>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lighting: Option<DesignResolved>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framing: Option<Framing>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub angle: Option<Angle>,
    pub shadow: Shadow,
    pub prompt: String,
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

impl InstructionSpec {
    pub fn variation_seed(&self, variation: u32) -> u32 {
        self.seed.wrapping_add(variation)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub file_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The normalised packshot job (stored as the job spec, shown as
/// `processing_options`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackshotSpec {
    pub images: Vec<ImageSpec>,
    pub instructions: Vec<InstructionSpec>,
    pub model: EngineChoice,
    pub use_anchor: bool,
    pub anchor_index: u32,
    pub post_process: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_config: Option<serde_json::Value>,
}

impl PackshotSpec {
    pub fn total_outputs(&self) -> u32 {
        self.instructions.iter().map(|i| i.num_variations).sum()
    }

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

/// The `create_packshot` kind (contract §3.5), on the `packshot` queue.
pub struct CreatePackshot;

impl JobKind for CreatePackshot {
    const NAME: &'static str = "create_packshot";
    const QUEUE: WorkQueue = WorkQueue::Packshot;
    type Spec = PackshotSpec;
    /// `image`: the output's source image (a data URL); `images`: every
    /// input; `prompt`: the instruction in words with the client's prompt;
    /// `client_prompt`; `seed` (of this variation); `width`, `height`;
    /// `style`; `variation`; `format`.
    const GENERATOR_FIELDS: &'static [&'static str] = &[
        "image",
        "images",
        "prompt",
        "client_prompt",
        "seed",
        "width",
        "height",
        "style",
        "variation",
        "format",
    ];
    const ENGINE_NAMES: &'static [EngineChoice] =
        &[EngineChoice::NanoBananaPro, EngineChoice::Seedream];
    const BUILTIN_ENGINE: bool = true;

    /// Instructions × variations, each at the price of its size class.
    fn plan(spec: &PackshotSpec, prices: &PriceTable) -> Vec<PlannedOutput> {
        per_variation(
            spec.instructions
                .iter()
                .map(|i| (i.num_variations, &i.output)),
            prices,
        )
    }

    fn requirements(spec: &PackshotSpec) -> Requirements<'_> {
        Requirements {
            files: spec.images.iter().map(|i| i.file_id.as_str()).collect(),
            identity: None,
            profiles: Vec::new(),
        }
    }

    fn post_process(spec: &PackshotSpec) -> bool {
        spec.post_process
    }

    fn engine_fallback(spec: &PackshotSpec) -> bool {
        spec.model == EngineChoice::Auto
    }
}

/// Deserialises the JSON body, naming the field of the first type error.
pub fn parse_request(body: &serde_json::Value) -> Result<PackshotRequest, FieldError> {
    serde_path_to_error::deserialize::<_, PackshotRequest>(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let message = if inner.contains("did not match any variant of untagged enum DesignValue") {
            "must be a string, a Design-Value index or an object".to_string()
        } else if inner.contains("did not match any variant of untagged enum ImageRefIn") {
            "must be a file_id string or an object {file_id, note}".to_string()
        } else {
            inner
        };
        let field = if path == "." { None } else { Some(path) };
        FieldError { field, message }
    })
}

/// Style defaults (contract §3.5 table).
fn style_defaults(style: Style) -> (Option<Angle>, Option<Framing>, Shadow, Option<&'static str>) {
    match style {
        Style::FlatLay => (
            Some(Angle::TopDown),
            Some(Framing::SquarePackshot),
            Shadow::Natural,
            Some("neutral surface"),
        ),
        Style::GhostMannequin => (
            Some(Angle::Front),
            Some(Framing::Tall34),
            Shadow::Contact,
            Some("white studio"),
        ),
        Style::MarketingReady => (
            Some(Angle::ThreeQuarter),
            Some(Framing::FullFrame),
            Shadow::Natural,
            None,
        ),
        Style::WhiteCutout => (
            Some(Angle::Front),
            Some(Framing::SquarePackshot),
            Shadow::Contact,
            Some("pure white"),
        ),
        Style::Free => (None, None, Shadow::Auto, None),
    }
}

/// The `images` field (contract §3.2): 1–10 entries, no duplicate, notes of
/// at most 1000 characters. Problems are appended to `errs`.
pub fn validate_images(refs: &[ImageRefIn], errs: &mut Vec<FieldError>) -> Vec<ImageSpec> {
    if refs.is_empty() || refs.len() > MAX_IMAGES {
        errs.push(FieldError::new(
            "images",
            format!("must hold 1 to {MAX_IMAGES} images, got {}", refs.len()),
        ));
    }
    let mut seen = HashSet::new();
    let mut images = Vec::new();
    for (i, img) in refs.iter().enumerate() {
        let (id, note) = match img {
            ImageRefIn::Id(id) => (id.clone(), None),
            ImageRefIn::Annotated { file_id, note } => (file_id.clone(), note.clone()),
        };
        if id.trim().is_empty() {
            errs.push(FieldError::new(
                format!("images[{i}]"),
                "missing or invalid image: empty file_id",
            ));
        } else if !seen.insert(id.clone()) {
            errs.push(FieldError::new(
                format!("images[{i}]"),
                format!("duplicate file_id {id}"),
            ));
        }
        if note.as_ref().is_some_and(|n| n.chars().count() > MAX_NOTE) {
            errs.push(FieldError::new(
                format!("images[{i}].note"),
                format!("must be at most {MAX_NOTE} characters"),
            ));
        }
        images.push(ImageSpec { file_id: id, note });
    }

    images
}

/// Validates a parsed request and produces the normalised spec. Every
/// problem is reported, not only the first. `random_seed` supplies seeds for
/// instructions that have none (kept in the spec, so outputs reproduce).
pub fn validate(
    req: &PackshotRequest,
    catalogue: &DesignCatalogue,
    engines: &EngineAvailability,
    mut random_seed: impl FnMut() -> u32,
) -> Result<PackshotSpec, Vec<FieldError>> {
    let mut errs = Vec::new();

    if req.project_id.trim().is_empty() {
        errs.push(FieldError::new("project_id", "must not be empty"));
    }
    let images = validate_images(&req.images, &mut errs);

    let n_ins = req.instructions.len();
    if n_ins == 0 || n_ins > MAX_INSTRUCTIONS {
        errs.push(FieldError::new(
            "instructions",
            format!("must hold 1 to {MAX_INSTRUCTIONS} instructions, got {n_ins}"),
        ));
    }

    let opts = &req.options;
    let model = opts.model.unwrap_or(EngineChoice::Auto);
    if let Some(e) = engines.check(JobType::CreatePackshot, model, "options.model") {
        errs.push(e);
    }
    let use_anchor = opts.use_anchor.unwrap_or(false);
    let anchor_index = opts.anchor_index.unwrap_or(0);
    if use_anchor && (anchor_index < 0 || anchor_index as usize >= n_ins.max(1)) {
        errs.push(FieldError::new(
            "options.anchor_index",
            format!("must satisfy 0 <= anchor_index < {n_ins} (number of instructions)"),
        ));
    }
    // Job-level output options are defaults each instruction overrides key by key.
    check_dimensions("options", opts.width, opts.height, &mut errs);

    let mut instructions = Vec::new();
    for (i, ins) in req.instructions.iter().enumerate() {
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
        let o = &ins.options;
        let output = resolve_output(&at("options"), &OutputDefaults::from(opts), o, &mut errs);

        let (d_angle, d_framing, d_shadow, d_background) = style_defaults(ins.style);
        let mut resolve = |name: &str, v: &Option<DesignValue>| {
            resolve_design(catalogue, &at(name), name, v.as_ref(), &mut errs)
        };
        let mut background = resolve("background", &ins.background);
        let composition = resolve("composition", &ins.composition);
        let props = resolve("props", &ins.props);
        let surface = resolve("surface", &ins.surface);
        let color_palette = resolve("color_palette", &ins.color_palette);
        let lighting = resolve("lighting", &ins.lighting);
        if ins.style == Style::WhiteCutout {
            // "pure white (overrides input)".
            background = d_background.map(|t| DesignResolved {
                text: Some(t.into()),
                image: None,
                attributes: BTreeMap::new(),
            });
        } else if background.is_none() {
            background = d_background.map(|t| DesignResolved {
                text: Some(t.into()),
                image: None,
                attributes: BTreeMap::new(),
            });
        }
        let angle = if ins.style == Style::FlatLay {
            Some(Angle::TopDown)
        } else {
            ins.angle.or(d_angle)
        };
        instructions.push(InstructionSpec {
            style: ins.style,
            background,
            composition,
            // Props only matter to marketing_ready; surface only to flat_lay.
            props: if ins.style == Style::MarketingReady {
                props
            } else {
                None
            },
            surface: if ins.style == Style::FlatLay {
                surface
            } else {
                None
            },
            color_palette,
            lighting,
            framing: ins.framing.or(d_framing),
            angle,
            shadow: ins.shadow.unwrap_or(d_shadow),
            prompt,
            seed: ins
                .seed
                .or(o.seed)
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
    Ok(PackshotSpec {
        images,
        instructions,
        model,
        use_anchor,
        anchor_index: anchor_index.max(0) as u32,
        post_process: req.post_process,
        review_config: req.review_config.clone(),
    })
}

/// Job-level output options (`options`), the defaults each instruction's
/// own `options` override key by key (contract §3.3).
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputDefaults {
    pub size: Option<SizeClass>,
    pub ar: Option<AspectRatio>,
    pub format: Option<ImageFormat>,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

impl From<&JobOptionsIn> for OutputDefaults {
    fn from(o: &JobOptionsIn) -> Self {
        OutputDefaults {
            size: o.size,
            ar: o.ar,
            format: o.format,
            width: o.width,
            height: o.height,
        }
    }
}

/// An instruction's output geometry and encoding (contract §3.3): its own
/// options over the job's defaults; custom `width`/`height` (checked, and
/// billed by their long edge) or a size class with an aspect ratio.
/// Problems are appended to `errs`, named under `at` (`instructions[0].options`).
pub fn resolve_output(
    at: &str,
    job: &OutputDefaults,
    o: &OutputOptionsIn,
    errs: &mut Vec<FieldError>,
) -> OutputSpec {
    for (where_, ar) in [(at.to_string(), o.ar), ("options".to_string(), job.ar)] {
        if let Some(ar) = ar.filter(|a| a.identity_only()) {
            let e = FieldError::new(
                format!("{where_}.ar"),
                format!(
                    "{} is accepted for identity creation only; use one of 1:1, 3:4, 4:3, 9:16, 16:9",
                    ar.as_str()
                ),
            );
            // A job-level default is named once, not once per instruction.
            if !errs
                .iter()
                .any(|x| x.field == e.field && x.message == e.message)
            {
                errs.push(e);
            }
        }
    }
    resolve_output_any_ar(at, job, o, errs)
}

/// [`resolve_output`] accepting every ratio (identity creation).
pub fn resolve_output_any_ar(
    at: &str,
    job: &OutputDefaults,
    o: &OutputOptionsIn,
    errs: &mut Vec<FieldError>,
) -> OutputSpec {
    check_dimensions(at, o.width, o.height, errs);
    let (w, h) = match (o.width.or(job.width), o.height.or(job.height)) {
        (Some(w), Some(h)) if o.width.is_some() == o.height.is_some() => (Some(w), Some(h)),
        _ => (None, None),
    };
    let format = o.format.or(job.format).unwrap_or(ImageFormat::Jpg);
    match (w, h) {
        (Some(w), Some(h)) => OutputSpec {
            size: SizeClass::for_custom(w, h),
            width: w,
            height: h,
            format,
            custom: true,
            ar: None,
        },
        _ => {
            let size = o.size.or(job.size).unwrap_or(SizeClass::K1);
            let ar = o.ar.or(job.ar).unwrap_or(AspectRatio::Square);
            let (w, h) = ar.pixels(size.long_edge());
            OutputSpec {
                size,
                width: w,
                height: h,
                format,
                custom: false,
                ar: Some(ar),
            }
        }
    }
}

/// A design field (`background`, `lighting`, …: text, a Design-Value index
/// into the catalogue's list for `name`, or an object), resolved; an
/// unknown index is a problem named `at`.
pub fn resolve_design(
    catalogue: &DesignCatalogue,
    at: &str,
    name: &str,
    v: Option<&DesignValue>,
    errs: &mut Vec<FieldError>,
) -> Option<DesignResolved> {
    let text = |t: &str| DesignResolved {
        text: Some(t.to_string()),
        image: None,
        attributes: BTreeMap::new(),
    };
    match v? {
        DesignValue::Text(t) => Some(text(t)),
        DesignValue::Index(idx) => match catalogue.0.get(name).and_then(|l| l.get(*idx as usize)) {
            Some(t) => Some(text(t)),
            None => {
                errs.push(FieldError::new(
                    at,
                    format!("unknown Design-Value index {idx}"),
                ));
                None
            }
        },
        DesignValue::Object(o) => {
            let mut attributes = BTreeMap::new();
            for (k, v) in [
                ("direction", &o.direction),
                ("quality", &o.quality),
                ("complexity", &o.complexity),
            ] {
                if let Some(v) = v {
                    attributes.insert(k.to_string(), v.clone());
                }
            }
            Some(DesignResolved {
                text: o.text.clone(),
                image: o.image.clone(),
                attributes,
            })
        }
    }
}

/// Custom dimension rules (§3.3): together, 256–7000, multiples of 8,
/// ratio within 1:4…4:1.
pub(crate) fn check_dimensions(
    prefix: &str,
    width: Option<u32>,
    height: Option<u32>,
    errs: &mut Vec<FieldError>,
) {
    match (width, height) {
        (None, None) => {}
        (Some(_), None) => errs.push(FieldError::new(
            format!("{prefix}.height"),
            "width and height must be sent together",
        )),
        (None, Some(_)) => errs.push(FieldError::new(
            format!("{prefix}.width"),
            "width and height must be sent together",
        )),
        (Some(w), Some(h)) => {
            for (name, v) in [("width", w), ("height", h)] {
                if !(256..=7000).contains(&v) {
                    errs.push(FieldError::new(
                        format!("{prefix}.{name}"),
                        "must be between 256 and 7000",
                    ));
                } else if v % 8 != 0 {
                    errs.push(FieldError::new(
                        format!("{prefix}.{name}"),
                        "must be a multiple of 8",
                    ));
                }
            }
            let ratio = f64::from(w) / f64::from(h.max(1));
            if !(0.25..=4.0).contains(&ratio) {
                errs.push(FieldError::new(
                    format!("{prefix}.width"),
                    "width/height must lie between 1:4 and 4:1",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn engines() -> EngineAvailability {
        EngineAvailability::builtin_packshots(vec![])
    }

    fn check(body: serde_json::Value) -> Result<PackshotSpec, Vec<FieldError>> {
        let req = parse_request(&body).map_err(|e| vec![e])?;
        validate(&req, &DesignCatalogue::default(), &engines(), || 7)
    }

    fn base() -> serde_json::Value {
        json!({"project_id": "p", "images": ["a", {"file_id": "b", "note": "back"}],
               "instructions": [{"style": "white_cutout", "num_variations": 2, "options": {"size": "2K"}},
                                {"style": "marketing_ready", "options": {"ar": "16:9", "format": "png"}}]})
    }

    #[test]
    fn contract_example_normalises() {
        let s = check(base()).expect("valid");
        assert_eq!(s.total_outputs(), 3);
        let cost: super::super::Credits = CreatePackshot::plan(&s, &PriceTable::default())
            .iter()
            .map(|p| p.cost)
            .sum();
        assert_eq!(cost.as_f64(), 13.0);
        assert_eq!(
            (
                s.instructions[0].output.width,
                s.instructions[0].output.height
            ),
            (2048, 2048)
        );
        assert_eq!(
            (
                s.instructions[1].output.width,
                s.instructions[1].output.height
            ),
            (1024, 576)
        );
        assert_eq!(s.instructions[1].output.format, ImageFormat::Png);
        assert_eq!(s.instructions[0].shadow, Shadow::Contact);
        assert_eq!(s.instructions[0].seed, 7);
        assert_eq!(s.images[1].note.as_deref(), Some("back"));
    }

    fn field_of(body: serde_json::Value) -> Vec<String> {
        check(body)
            .expect_err("invalid")
            .into_iter()
            .filter_map(|e| e.field)
            .collect()
    }

    #[test]
    fn every_rule_names_its_field() {
        let mut b = base();
        b["instructions"][0]["style"] = json!("watercolour");
        assert_eq!(field_of(b), vec!["instructions[0].style"]);

        let mut b = base();
        b["instructions"][0]["num_variations"] = json!(9);
        assert_eq!(field_of(b), vec!["instructions[0].num_variations"]);

        let mut b = base();
        b["instructions"][1]["options"] = json!({"width": 1000, "height": 1004});
        assert_eq!(field_of(b), vec!["instructions[1].options.height"]);

        let mut b = base();
        b["instructions"][1]["options"] = json!({"width": 1024});
        assert_eq!(field_of(b), vec!["instructions[1].options.height"]);

        let mut b = base();
        b["instructions"][1]["options"] = json!({"width": 256, "height": 2048});
        assert_eq!(field_of(b), vec!["instructions[1].options.width"]);

        let mut b = base();
        b["options"] = json!({"use_anchor": true, "anchor_index": 2});
        assert_eq!(field_of(b), vec!["options.anchor_index"]);

        let mut b = base();
        b["options"] = json!({"use_anchor": false, "anchor_index": 2});
        assert!(
            check(b).is_ok(),
            "anchor_index is only checked with use_anchor"
        );

        let mut b = base();
        b["options"] = json!({"model": "seedream"});
        assert_eq!(field_of(b), vec!["options.model"]);

        let mut b = base();
        b["options"] = json!({"model": "dall-e"});
        assert_eq!(field_of(b), vec!["options.model"]);

        let mut b = base();
        b["images"] = json!(["a", "a"]);
        assert_eq!(field_of(b), vec!["images[1]"]);

        let mut b = base();
        b["images"] = json!((0..11).map(|i| i.to_string()).collect::<Vec<_>>());
        assert_eq!(field_of(b), vec!["images"]);

        let mut b = base();
        b["instructions"] = json!([]);
        assert_eq!(field_of(b), vec!["instructions"]);

        let mut b = base();
        b["instructions"][0]["background"] = json!(99);
        assert_eq!(field_of(b), vec!["instructions[0].background"]);

        let mut b = base();
        b["instructions"][0]["options"]["size"] = json!("8K");
        assert_eq!(field_of(b), vec!["instructions[0].options.size"]);

        let mut b = base();
        b["instructions"][0]["seed"] = json!(-1);
        assert_eq!(field_of(b), vec!["instructions[0].seed"]);
    }

    #[test]
    fn style_rules_apply() {
        let mut b = base();
        b["instructions"] = json!([
            {"style": "flat_lay", "angle": "front", "surface": 1, "props": "flowers"},
            {"style": "white_cutout", "background": "neon jungle"}
        ]);
        let s = check(b).expect("valid");
        assert_eq!(
            s.instructions[0].angle,
            Some(Angle::TopDown),
            "flat_lay forces top_down"
        );
        assert_eq!(
            s.instructions[0]
                .surface
                .as_ref()
                .and_then(|d| d.text.as_deref()),
            Some("light oak wood")
        );
        assert!(
            s.instructions[0].props.is_none(),
            "props ignored outside marketing_ready"
        );
        assert_eq!(
            s.instructions[1]
                .background
                .as_ref()
                .and_then(|d| d.text.as_deref()),
            Some("pure white")
        );
    }

    #[test]
    fn aspect_ratios_give_multiples_of_eight() {
        for ar in [
            AspectRatio::Square,
            AspectRatio::R3x4,
            AspectRatio::R4x3,
            AspectRatio::R9x16,
            AspectRatio::R16x9,
        ] {
            for long in [1024, 2048, 4096] {
                let (w, h) = ar.pixels(long);
                assert_eq!(w.max(h), long);
                assert_eq!(w % 8, 0);
                assert_eq!(h % 8, 0);
            }
        }
        assert_eq!(AspectRatio::R3x4.pixels(1024), (768, 1024));
    }
}
