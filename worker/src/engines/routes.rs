//! Engine routes: the contract's generative engine names (`nano_banana_pro`,
//! `seedream`) mapped by the operator to concrete backends, behind the same
//! [`Engine`] trait as the built-in engine.
//!
//! * [`HttpEngine`] calls a remote service speaking the Atelier engine
//!   protocol (README, "Engine routes"): one JSON POST per output with the
//!   prompt, the normalised instruction, the seed and the input images as
//!   base64 JPEG; the reply is the image itself. `422` is a content refusal
//!   (under `model: auto` the next engine tries), `408`/`429`/`5xx`,
//!   timeouts and connection errors are retried, other `4xx` fail the output.
//! * [`OnnxEngine`] runs an operator-installed single-graph image-to-image
//!   model through the model registry.
//!
//! Both fit what comes back onto the requested canvas; `model_used` names
//! the route and what the backend says really ran.

use super::engine::{BasicEngine, Engine, RenderRequest, Rendered};
use crate::failure::TaskFailure;
use crate::imaging;
use crate::inference::Model;
use crate::postprocess::PostContext;
use atelier_shared::domain::packshot::{
    DesignResolved, EngineChoice, ImageFormat, InstructionSpec, Style,
};
use base64::Engine as _;
use image::{DynamicImage, RgbaImage};
use ndarray::{ArrayD, IxDyn};
use std::sync::Arc;
use std::time::Duration;

/// Largest reply body an HTTP route may send.
const MAX_REPLY_BYTES: usize = 64 << 20;
/// Largest error reply read for its reason.
const MAX_REASON_BYTES: usize = 64 << 10;
/// Largest image (pixels) an HTTP route may send back.
const MAX_REPLY_PIXELS: u64 = 64_000_000;

/// A prompt for a generative backend: what the instruction asks for, in
/// words, followed by the client's own prompt.
pub fn prompt_for(ins: &InstructionSpec) -> String {
    let text = |d: &Option<DesignResolved>| {
        d.as_ref()
            .and_then(|d| d.text.clone())
            .filter(|t| !t.trim().is_empty())
    };
    let style = match ins.style {
        Style::WhiteCutout => {
            "the garment alone on a pure white (#FFFFFF) background with a minimal contact shadow"
        }
        Style::FlatLay => "the garment laid flat, photographed from directly above on a surface",
        Style::GhostMannequin => {
            "ghost-mannequin packshot: the garment with its 3D shape, no mannequin, hanger or model visible, neutral studio background"
        }
        Style::MarketingReady => "a marketing image of the garment in a styled setting",
        Style::Free => "a product image of the garment",
    };
    let mut parts = vec![format!(
        "Professional e-commerce packshot of the garment in the reference image: {style}. Keep the garment's colours, print, fabric and details exactly."
    )];
    for (label, v) in [
        ("Background", text(&ins.background)),
        ("Surface", text(&ins.surface)),
        ("Lighting", text(&ins.lighting)),
        ("Colour palette", text(&ins.color_palette)),
        ("Composition", text(&ins.composition)),
        ("Props", text(&ins.props)),
    ] {
        if let Some(v) = v {
            parts.push(format!("{label}: {v}."));
        }
    }
    if let Some(f) = ins.framing.and_then(|f| serde_json::to_value(f).ok()) {
        parts.push(format!("Framing: {}.", f.as_str().unwrap_or_default()));
    }
    if !ins.prompt.trim().is_empty() {
        parts.push(ins.prompt.trim().to_string());
    }
    parts.join(" ")
}

pub struct HttpEngine {
    name: &'static str,
    url: String,
    token: Option<String>,
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl HttpEngine {
    /// `runtime` drives the request: [`Engine::render`] runs on the blocking
    /// pool and waits there, never on an async worker thread.
    pub fn new(
        choice: EngineChoice,
        url: &str,
        token: Option<String>,
        timeout: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Result<HttpEngine, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(HttpEngine {
            name: choice.as_str(),
            url: url.to_string(),
            token,
            client,
            runtime,
        })
    }

    async fn call(
        &self,
        body: serde_json::Value,
    ) -> Result<(Vec<u8>, Option<String>), TaskFailure> {
        let mut rq = self.client.post(&self.url).json(&body);
        if let Some(t) = &self.token {
            rq = rq.bearer_auth(t);
        }
        let who = self.name;
        let resp = rq.send().await.map_err(|e| {
            TaskFailure::retryable(format!("engine {who} unreachable: {}", without_url(&e)))
        })?;
        let status = resp.status();
        let model = resp
            .headers()
            .get("x-model-used")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(120).collect::<String>());
        // An error reply is read only as far as its reason needs.
        let limit = if status.is_success() {
            MAX_REPLY_BYTES
        } else {
            MAX_REASON_BYTES
        };
        let bytes = match read_limited(resp, limit).await {
            Ok(b) => b,
            Err(ReadError::TooLarge) if status.is_success() => {
                return Err(TaskFailure::permanent(format!(
                    "engine {who} sent a reply larger than {} MiB",
                    MAX_REPLY_BYTES >> 20
                )));
            }
            Err(ReadError::TooLarge) => Vec::new(),
            Err(ReadError::Failed(e)) if status.is_success() => {
                return Err(TaskFailure::retryable(format!(
                    "engine {who}: reading the reply failed: {e}"
                )));
            }
            Err(ReadError::Failed(_)) => Vec::new(),
        };
        if status.is_success() {
            return Ok((bytes, model));
        }
        let reason = reply_reason(&bytes);
        Err(match status.as_u16() {
            422 => TaskFailure::refused(format!("engine {who} refused the content: {reason}")),
            408 | 429 | 500..=599 => {
                TaskFailure::retryable(format!("engine {who} answered {status}: {reason}"))
            }
            _ => TaskFailure::permanent(format!(
                "engine {who} rejected the request ({status}): {reason}"
            )),
        })
    }
}

/// reqwest errors name the URL, which may carry a key in its query.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    kind.to_string()
}

enum ReadError {
    TooLarge,
    Failed(String),
}

async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, ReadError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ReadError::Failed(without_url(&e)))?
    {
        if out.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// `{"error": "..."}` or the start of a text body, at most 300 characters
/// (it ends up in `error_message`).
fn reply_reason(bytes: &[u8]) -> String {
    let reason = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(1200)]).into_owned());
    let mut short: String = reason.chars().take(300).collect();
    if short.len() < reason.len() {
        short.push('…');
    }
    short
}

impl Engine for HttpEngine {
    fn name(&self) -> &'static str {
        self.name
    }

    fn render(&self, req: &RenderRequest<'_>) -> Result<Rendered, TaskFailure> {
        let ins = req.instruction()?;
        let src = req.source()?;
        let mut images = Vec::with_capacity(req.inputs.len());
        for input in req.inputs {
            let jpeg = imaging::encode(&input.image.to_rgba8(), ImageFormat::Jpg)?;
            images.push(serde_json::json!({
                "file_id": input.file_id,
                "mime_type": "image/jpeg",
                "data": base64::engine::general_purpose::STANDARD.encode(jpeg),
            }));
        }
        let seed = req.seed(ins);
        let body = serde_json::json!({
            "protocol": "atelier-engine/1",
            "engine": self.name,
            "task": "packshot",
            "prompt": prompt_for(ins),
            "client_prompt": ins.prompt,
            "instruction": ins,
            "width": ins.output.width,
            "height": ins.output.height,
            "seed": seed,
            "variation_index": req.variation_index,
            "primary_image": src.file_id,
            "images": images,
        });
        let (bytes, model) = self.runtime.block_on(self.call(body))?;
        let got = imaging::decode_limited(&bytes, MAX_REPLY_PIXELS).map_err(|f| {
            TaskFailure::retryable(format!(
                "engine {} sent an unusable image: {}",
                self.name, f.message
            ))
        })?;
        let got_size = (got.width(), got.height());
        let image = imaging::fit(
            &got,
            ins.output.width,
            ins.output.height,
            BasicEngine::background(ins.style),
        )?;
        let model_used = match &model {
            Some(m) => format!("{} ({m})", self.name),
            None => self.name.to_string(),
        };
        Ok(Rendered {
            image,
            model_used,
            description: serde_json::json!({
                "engine": self.name,
                "route": "http",
                "backend_model": model,
                "source_file_id": src.file_id,
                "returned_size": [got_size.0, got_size.1],
                "style": ins.style,
                "seed": seed,
            }),
            post: PostContext::whole_source(&src.image),
        })
    }
}

/// Tensor value range of an ONNX route (`input_range`, `output_range`).
pub use atelier_shared::config::ValueRange as Range;

/// Conversions between pixel bytes and a range's tensor values.
trait RangeValues {
    fn tensor_value(self, v: u8) -> f32;
    fn byte_value(self, v: f32) -> u8;
}

impl RangeValues for Range {
    fn tensor_value(self, v: u8) -> f32 {
        let v = f32::from(v);
        match self {
            Range::Unit => v / 255.0,
            Range::Signed => v / 127.5 - 1.0,
            Range::Byte => v,
        }
    }

    fn byte_value(self, v: f32) -> u8 {
        let b = match self {
            Range::Unit => v * 255.0,
            Range::Signed => (v + 1.0) * 127.5,
            Range::Byte => v,
        };
        if b.is_finite() {
            b.round().clamp(0.0, 255.0) as u8
        } else {
            0
        }
    }
}

pub struct OnnxEngine {
    name: &'static str,
    model: Arc<Model>,
    input_range: Range,
    output_range: Range,
    max_edge: u32,
}

impl OnnxEngine {
    pub fn new(
        choice: EngineChoice,
        model: Arc<Model>,
        input_range: Range,
        output_range: Range,
        max_edge: u32,
    ) -> Result<OnnxEngine, String> {
        let shape = &model.input_shape;
        if shape.len() != 4 || !(shape[1] == 3 || shape[1] == -1) {
            return Err(format!(
                "model {} takes {:?}; an image route needs an NCHW input with 3 channels",
                model.name, shape
            ));
        }
        Ok(OnnxEngine {
            name: choice.as_str(),
            model,
            input_range,
            output_range,
            max_edge,
        })
    }

    /// The size fed to the model: its fixed H×W, or the source scaled so its
    /// long edge is at most `max_edge` (rounded to a multiple of 8).
    fn feed_size(&self, w: u32, h: u32) -> (u32, u32) {
        let s = &self.model.input_shape;
        if s[2] > 0 && s[3] > 0 {
            return (s[3] as u32, s[2] as u32);
        }
        let scale = (f64::from(self.max_edge) / f64::from(w.max(h))).min(1.0);
        let r = |v: u32| ((((f64::from(v) * scale) / 8.0).round() as u32) * 8).max(8);
        (r(w), r(h))
    }
}

impl Engine for OnnxEngine {
    fn name(&self) -> &'static str {
        self.name
    }

    fn render(&self, req: &RenderRequest<'_>) -> Result<Rendered, TaskFailure> {
        let ins = req.instruction()?;
        let src = req.source()?;
        let (fw, fh) = self.feed_size(src.image.width(), src.image.height());
        let fed = imaging::resize(&src.image, fw, fh)?;
        let n = (fw * fh) as usize;
        let mut x = vec![0f32; 3 * n];
        for (i, p) in fed.pixels().enumerate() {
            for c in 0..3 {
                x[c * n + i] = self.input_range.tensor_value(p.0[c]);
            }
        }
        let input = ArrayD::from_shape_vec(IxDyn(&[1, 3, fh as usize, fw as usize]), x)
            .map_err(|e| TaskFailure::retryable(e.to_string()))?;
        let y = self
            .model
            .run(input)
            .map_err(|e| TaskFailure::retryable(format!("engine {}: {e}", self.name)))?;
        let shape = y.shape().to_vec();
        let (channels, oh, ow) = match shape.as_slice() {
            [1, c @ (1 | 3), h, w] if *h > 0 && *w > 0 => (*c, *h, *w),
            _ => {
                return Err(TaskFailure::permanent(format!(
                    "engine {}: the model returned shape {shape:?}, not an image [1, 1|3, H, W]",
                    self.name
                )));
            }
        };
        let data = y
            .as_slice()
            .ok_or_else(|| TaskFailure::retryable("model output is not contiguous"))?;
        let m = oh * ow;
        let out = RgbaImage::from_fn(ow as u32, oh as u32, |xx, yy| {
            let i = yy as usize * ow + xx as usize;
            let v = |c: usize| {
                self.output_range
                    .byte_value(data[c.min(channels - 1) * m + i])
            };
            image::Rgba([v(0), v(1), v(2), 255])
        });
        let image = imaging::fit(
            &DynamicImage::ImageRgba8(out),
            ins.output.width,
            ins.output.height,
            BasicEngine::background(ins.style),
        )?;
        Ok(Rendered {
            image,
            model_used: format!("{} (onnx {})", self.name, self.model.name),
            description: serde_json::json!({
                "engine": self.name,
                "route": "onnx",
                "model": self.model.name,
                "fed_size": [fw, fh],
                "returned_shape": shape,
                "source_file_id": src.file_id,
                "style": ins.style,
            }),
            post: PostContext::whole_source(&src.image),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::Input;
    use crate::inference::{ModelOptions, default_models_dir};
    use atelier_shared::domain::engines::EngineAvailability;
    use atelier_shared::domain::packshot::{DesignCatalogue, parse_request, validate};

    fn spec(body: serde_json::Value) -> atelier_shared::domain::packshot::PackshotSpec {
        validate(
            &parse_request(&body).expect("parses"),
            &DesignCatalogue::default(),
            &EngineAvailability::builtin_packshots(vec![EngineChoice::Seedream]),
            || 3,
        )
        .expect("valid")
    }

    #[test]
    fn ranges_round_trip_bytes() {
        for r in [Range::Unit, Range::Signed, Range::Byte] {
            for b in [0u8, 1, 127, 128, 254, 255] {
                assert_eq!(r.byte_value(r.tensor_value(b)), b, "{r:?} {b}");
            }
        }
        assert_eq!(Range::Unit.byte_value(f32::NAN), 0);
        assert_eq!(Range::Signed.byte_value(3.0), 255);
    }

    #[test]
    fn the_prompt_says_what_the_instruction_asks_for() {
        let s = spec(
            serde_json::json!({"project_id": "p", "images": ["f"], "instructions": [
            {"style": "flat_lay", "surface": "light oak wood", "prompt": "keep the logo sharp"}]}),
        );
        let p = prompt_for(&s.instructions[0]);
        assert!(
            p.contains("laid flat") && p.contains("Surface: light oak wood."),
            "{p}"
        );
        assert!(p.ends_with("keep the logo sharp"), "{p}");
    }

    #[test]
    fn an_onnx_route_runs_the_operator_model_and_fits_its_output() {
        let dir = default_models_dir();
        let rt = crate::inference::test_runtime();
        let model = crate::inference::load_shared(
            &rt,
            "conv_sigmoid",
            &dir.join("test/conv_sigmoid.onnx"),
            ModelOptions::default(),
        )
        .expect("test model (scripts/fetch-models --test-models)");
        let engine = OnnxEngine::new(EngineChoice::Seedream, model, Range::Unit, Range::Unit, 256)
            .expect("an image model");
        let s = spec(
            serde_json::json!({"project_id": "p", "images": ["f"], "options": {"model": "seedream"},
            "instructions": [{"style": "white_cutout"}]}),
        );
        // All black in → conv(0) + 0.1 → sigmoid(0.1) = 0.525 everywhere → grey 134.
        let inputs = vec![Input {
            file_id: "f".into(),
            image: DynamicImage::ImageRgba8(RgbaImage::from_pixel(
                400,
                300,
                image::Rgba([0, 0, 0, 255]),
            )),
        }];
        let r = engine
            .render(&RenderRequest {
                spec: &s,
                instruction_index: 0,
                variation_index: 0,
                version: 0,
                inputs: &inputs,
                stop: None,
            })
            .expect("renders");
        assert_eq!(r.image.dimensions(), (1024, 1024));
        assert_eq!(r.image.get_pixel(512, 512).0, [134, 134, 134, 255]);
        assert_eq!(
            r.image.get_pixel(2, 2).0,
            [255, 255, 255, 255],
            "letterbox in the style's colour"
        );
        assert_eq!(r.model_used, "seedream (onnx conv_sigmoid)");
        assert_eq!(r.description["fed_size"], serde_json::json!([256, 192]));
    }
}
