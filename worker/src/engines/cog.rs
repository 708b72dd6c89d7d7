//! Engine routes to model containers that speak Cog's HTTP API (the format
//! most published generative models ship in).
//!
//! At start the worker waits for the container's `GET /health-check` to say
//! `READY` (up to `startup_secs`), reads its input schema from
//! `GET /openapi.json` when the container serves one, and refuses a mapping
//! that names an input the container lacks. Each output is one prediction,
//! `PUT /predictions/{id}` (waiting for its result), with the id of the
//! output's attempt and the job's fields mapped onto the container's inputs
//! (images as data URLs). At most `slots` predictions run at once per
//! container from one worker; one past `timeout_secs` is cancelled
//! (`POST /predictions/{id}/cancel`) and the output retried.
//!
//! What comes back: a data URL or a URL on the container's own origin (or a
//! list of them, the first is used), decoded by the guarded decoder before
//! it is stored. A prediction that `failed` fails the output with the
//! container's reason, or is a refusal (the next engine tries under
//! `model: auto`) when the reason says so; a container that cannot be
//! reached or errs (`5xx`) is retried; one that is busy (`409`: its own
//! slots are taken) is offered the prediction again until the timeout.

use super::engine::{BasicEngine, Engine, RenderRequest, Rendered};
use super::routes::prompt_for;
use crate::failure::TaskFailure;
use crate::imaging;
use crate::postprocess::PostContext;
use atelier_shared::config::CogInput;
use atelier_shared::domain::JobType;
use atelier_shared::domain::packshot::{EngineChoice, ImageFormat};
use base64::Engine as _;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Largest prediction answer read (its output is an image as a data URL).
const MAX_REPLY_BYTES: usize = 96 << 20;
/// Largest image (pixels) a container may send back.
const MAX_REPLY_PIXELS: u64 = 64_000_000;
/// Words in a failed prediction's reason that make it a content refusal.
const REFUSAL_MARKERS: [&str; 5] = ["nsfw", "content policy", "refused", "refusal", "safety"];

/// A route to one model container.
pub struct CogEngine {
    name: &'static str,
    base: reqwest::Url,
    /// Per job kind, container input → field or constant.
    inputs: BTreeMap<JobType, BTreeMap<String, CogInput>>,
    timeout: Duration,
    slots: Arc<Semaphore>,
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

/// Why a container cannot serve a route.
#[derive(Debug, thiserror::Error)]
pub enum CogSetupError {
    #[error("the container at {url} is not READY after {secs} s: {last}")]
    NotReady {
        url: String,
        secs: u64,
        last: String,
    },
    #[error(
        "the {kind} mapping names input `{input}`, which the container at {url} does not have (it has: {has})"
    )]
    UnknownInput {
        kind: JobType,
        input: String,
        url: String,
        has: String,
    },
    #[error("{0}")]
    Other(String),
}

impl CogEngine {
    /// Connects to the container: waits for it to be READY and checks
    /// every kind's mapping against its input schema. Blocking (it waits
    /// on `runtime`): call it from the blocking pool.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        choice: EngineChoice,
        url: &str,
        inputs: &BTreeMap<JobType, BTreeMap<String, CogInput>>,
        timeout: Duration,
        slots: usize,
        startup: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Result<CogEngine, CogSetupError> {
        let base = reqwest::Url::parse(url).map_err(|e| CogSetupError::Other(e.to_string()))?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Redirects would take images where the route does not point.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| CogSetupError::Other(e.to_string()))?;
        let engine = CogEngine {
            name: choice.as_str(),
            base,
            inputs: inputs.clone(),
            timeout,
            slots: Arc::new(Semaphore::new(slots.max(1))),
            client,
            runtime: runtime.clone(),
        };
        runtime.block_on(engine.check(startup))?;
        Ok(engine)
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.base.as_str().trim_end_matches('/'))
    }

    /// Waits for READY, then checks the mapping against the input schema.
    async fn check(&self, startup: Duration) -> Result<(), CogSetupError> {
        let until = Instant::now() + startup;
        loop {
            let last = match self.client.get(self.endpoint("/health-check")).send().await {
                Ok(r) => match r.json::<Value>().await {
                    Ok(v) if v["status"] == "READY" => break,
                    Ok(v) => format!("status {}", v["status"]),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= until {
                return Err(CogSetupError::NotReady {
                    url: self.base.to_string(),
                    secs: startup.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let Some(have) = self.schema_inputs().await else {
            tracing::warn!(engine = self.name, url = %self.base, "the container serves no input schema: the mapping is not checked");
            return Ok(());
        };
        for (kind, mapping) in &self.inputs {
            for input in mapping.keys() {
                if !have.iter().any(|h| h == input) {
                    return Err(CogSetupError::UnknownInput {
                        kind: *kind,
                        input: input.clone(),
                        url: self.base.to_string(),
                        has: have.join(", "),
                    });
                }
            }
        }
        Ok(())
    }

    /// The input names of the container's schema (`components.schemas.
    /// Input.properties`); `None` when it serves none.
    async fn schema_inputs(&self) -> Option<Vec<String>> {
        let r = self
            .client
            .get(self.endpoint("/openapi.json"))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        let doc: Value = r.json().await.ok()?;
        let props = doc["components"]["schemas"]["Input"]["properties"].as_object()?;
        Some(props.keys().cloned().collect())
    }

    /// One prediction, waiting for its result. One that does not finish
    /// (past the timeout, or its task stopped: shutdown, abort) is
    /// cancelled in the container.
    async fn predict(&self, id: &str, input: Map<String, Value>) -> Result<Value, TaskFailure> {
        let who = self.name;
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| TaskFailure::retryable(format!("engine {who}: no slot")))?;
        let mut unfinished = CancelOnDrop {
            client: self.client.clone(),
            url: self.endpoint(&format!("/predictions/{id}/cancel")),
            runtime: self.runtime.clone(),
            armed: true,
        };
        let call = async {
            // A busy container (`409`: its own slots are taken, e.g. by
            // another worker) is backpressure, not a failure: the same
            // prediction is offered again until the timeout.
            let mut pause = Duration::from_millis(50);
            loop {
                let resp = self
                    .client
                    .put(self.endpoint(&format!("/predictions/{id}")))
                    .json(&json!({"id": id, "input": input}))
                    .send()
                    .await
                    .map_err(|e| {
                        TaskFailure::retryable(format!(
                            "engine {who} unreachable: {}",
                            if e.is_connect() {
                                "connection failed"
                            } else {
                                "request failed"
                            }
                        ))
                    })?;
                let status = resp.status();
                let body = read_limited(resp, MAX_REPLY_BYTES).await.map_err(|e| {
                    TaskFailure::retryable(format!("engine {who}: reading the answer failed: {e}"))
                })?;
                return match status.as_u16() {
                    200..=299 => serde_json::from_slice::<Value>(&body).map_err(|e| {
                        TaskFailure::retryable(format!("engine {who} answered no prediction: {e}"))
                    }),
                    409 => {
                        metrics::counter!("atelier_generator_busy_total", "engine" => who)
                            .increment(1);
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                        continue;
                    }
                    429 | 500..=599 => Err(TaskFailure::retryable(format!(
                        "engine {who} answered {status}"
                    ))),
                    _ => Err(TaskFailure::permanent(format!(
                        "engine {who} rejected the prediction ({status}): {}",
                        short(&String::from_utf8_lossy(&body))
                    ))),
                };
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => {
                // Only a prediction known to have ended is left alone; after
                // any failure (the request may have reached the container)
                // the guard cancels it, which is harmless if it never ran.
                let ended = r.as_ref().is_ok_and(|p| {
                    matches!(
                        p["status"].as_str(),
                        Some("succeeded" | "failed" | "canceled")
                    )
                });
                if ended {
                    unfinished.armed = false;
                }
                r
            }
            Err(_) => Err(TaskFailure::retryable(format!(
                "engine {who}: the prediction took longer than {} s and was cancelled",
                self.timeout.as_secs()
            ))),
        }
    }

    /// The image a succeeded prediction produced, or why there is none.
    async fn output_image(&self, prediction: &Value) -> Result<Vec<u8>, TaskFailure> {
        let who = self.name;
        match prediction["status"].as_str() {
            Some("succeeded") => {}
            Some("failed") => {
                let reason = prediction["error"].as_str().unwrap_or("no reason given");
                let lower = reason.to_ascii_lowercase();
                return Err(if REFUSAL_MARKERS.iter().any(|m| lower.contains(m)) {
                    TaskFailure::refused(format!(
                        "engine {who} refused the content: {}",
                        short(reason)
                    ))
                } else {
                    TaskFailure::permanent(format!("engine {who} failed: {}", short(reason)))
                });
            }
            Some("canceled") => {
                return Err(TaskFailure::retryable(format!(
                    "engine {who}: the prediction was cancelled"
                )));
            }
            other => {
                return Err(TaskFailure::retryable(format!(
                    "engine {who} answered a prediction in state {other:?}"
                )));
            }
        }
        let first = match &prediction["output"] {
            Value::String(s) => Some(s.as_str()),
            Value::Array(items) => items.iter().find_map(Value::as_str),
            _ => None,
        }
        .ok_or_else(|| TaskFailure::permanent(format!("engine {who} returned no image")))?;
        if let Some(data) = first.strip_prefix("data:") {
            let (_, b64) = data.split_once(";base64,").ok_or_else(|| {
                TaskFailure::permanent(format!("engine {who} returned a data URL without base64"))
            })?;
            return base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| {
                    TaskFailure::permanent(format!("engine {who} returned undecodable base64: {e}"))
                });
        }
        // A URL: only the container's own origin (its file server) is
        // fetched; anything else is not where this route points.
        let url = reqwest::Url::parse(first).map_err(|_| {
            TaskFailure::permanent(format!(
                "engine {who} returned neither a data URL nor a URL"
            ))
        })?;
        if url.origin() != self.base.origin() {
            return Err(TaskFailure::permanent(format!(
                "engine {who} returned a URL outside its own origin ({})",
                url.origin().ascii_serialization()
            )));
        }
        let resp = self.client.get(url).send().await.map_err(|_| {
            TaskFailure::retryable(format!("engine {who}: fetching its output failed"))
        })?;
        if !resp.status().is_success() {
            return Err(TaskFailure::retryable(format!(
                "engine {who}: its output URL answered {}",
                resp.status()
            )));
        }
        read_limited(resp, MAX_REPLY_BYTES)
            .await
            .map_err(|e| TaskFailure::retryable(format!("engine {who}: reading its output: {e}")))
    }
}

/// Cancels its prediction in the container unless disarmed: a prediction
/// whose call is dropped unfinished (timeout, shutdown, abort) does not
/// keep the container's slot busy.
struct CancelOnDrop {
    client: reqwest::Client,
    url: String,
    runtime: tokio::runtime::Handle,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let (client, url) = (self.client.clone(), std::mem::take(&mut self.url));
            self.runtime.spawn(async move {
                if let Err(e) = client.post(&url).send().await {
                    tracing::warn!(error = %e.without_url(), "cannot cancel an unfinished prediction");
                }
            });
        }
    }
}

/// What a generator drew for one output.
pub struct Generated {
    pub image: image::DynamicImage,
    /// `"<engine> (cog)"`: the route that drew the pixels.
    pub model_used: String,
    /// `engine`, `route`, `prediction_id`, `predict_time` (the container's
    /// own figure), `round_trip` (seconds, as the worker saw it) and
    /// `returned_size`; kinds add their own keys.
    pub description: Map<String, Value>,
}

impl CogEngine {
    /// The engine name this route serves under.
    pub fn engine_name(&self) -> &'static str {
        self.name
    }

    /// Whether this route has a mapping for `kind`.
    pub fn serves(&self, kind: JobType) -> bool {
        self.inputs.contains_key(&kind)
    }

    /// One prediction for one output of `kind`: the kind's `fields` mapped
    /// onto the container's inputs, its answer decoded by the guarded
    /// decoder. Each call is a new prediction (a retried output never
    /// re-attaches to an earlier one).
    pub async fn generate(
        &self,
        kind: JobType,
        fields: &Map<String, Value>,
    ) -> Result<Generated, TaskFailure> {
        let who = self.name;
        let mapping = self.inputs.get(&kind).ok_or_else(|| {
            TaskFailure::permanent(format!(
                "engine {who} has no mapping for {kind} (engines.routes.{who}.inputs.{kind})"
            ))
        })?;
        let input = container_inputs(mapping, fields)?;
        let id = format!("atl-{}", ulid::Ulid::new().to_string().to_lowercase());
        let started = Instant::now();
        let prediction = self.predict(&id, input).await?;
        let bytes = self.output_image(&prediction).await?;
        let round_trip = started.elapsed().as_secs_f64();
        let got =
            tokio::task::spawn_blocking(move || imaging::decode_limited(&bytes, MAX_REPLY_PIXELS))
                .await
                .map_err(|_| TaskFailure::retryable("decoding the engine's image panicked"))?
                .map_err(|f| {
                    TaskFailure::permanent(format!(
                        "engine {who} returned an unusable image: {}",
                        f.message
                    ))
                })?;
        let predict_time = prediction["metrics"]["predict_time"].as_f64();
        if let Some(p) = predict_time {
            metrics::histogram!("atelier_generator_seconds", "engine" => who, "type" => kind.as_str(), "part" => "predict")
                .record(p);
            metrics::histogram!("atelier_generator_seconds", "engine" => who, "type" => kind.as_str(), "part" => "overhead")
                .record((round_trip - p).max(0.0));
        }
        let mut description = Map::new();
        description.insert("engine".into(), json!(who));
        description.insert("route".into(), json!("cog"));
        description.insert("prediction_id".into(), json!(id));
        description.insert("predict_time".into(), json!(predict_time));
        description.insert("round_trip".into(), json!(round_trip));
        description.insert("returned_size".into(), json!([got.width(), got.height()]));
        Ok(Generated {
            image: got,
            model_used: format!("{who} (cog)"),
            description,
        })
    }
}

fn short(s: &str) -> String {
    let mut out: String = s.chars().take(300).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|_| "the connection failed".to_string())?
    {
        if out.len() + chunk.len() > limit {
            return Err(format!("larger than {} MiB", limit >> 20));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The `image/jpeg` data URL of an image.
fn data_url(img: &image::DynamicImage) -> Result<String, TaskFailure> {
    let jpeg = imaging::encode(&img.to_rgba8(), ImageFormat::Jpg)?;
    Ok(format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(jpeg)
    ))
}

/// The packshot fields of one output a mapping can name (the kind's
/// `GENERATOR_FIELDS`).
fn packshot_fields(req: &RenderRequest<'_>) -> Result<Map<String, Value>, TaskFailure> {
    let ins = req.instruction()?;
    let src = req.source()?;
    let mut f = Map::new();
    f.insert("image".into(), Value::String(data_url(&src.image)?));
    let mut all = Vec::with_capacity(req.inputs.len());
    for i in req.inputs {
        all.push(Value::String(data_url(&i.image)?));
    }
    f.insert("images".into(), Value::Array(all));
    f.insert("prompt".into(), Value::String(prompt_for(ins)));
    f.insert("client_prompt".into(), Value::String(ins.prompt.clone()));
    f.insert("seed".into(), json!(req.seed(ins)));
    f.insert("width".into(), json!(ins.output.width));
    f.insert("height".into(), json!(ins.output.height));
    f.insert("style".into(), json!(ins.style));
    f.insert("variation".into(), json!(req.variation_index));
    f.insert("format".into(), json!(ins.output.format));
    Ok(f)
}

/// The container's inputs for one output: mapped fields and constants.
fn container_inputs(
    mapping: &BTreeMap<String, CogInput>,
    fields: &Map<String, Value>,
) -> Result<Map<String, Value>, TaskFailure> {
    let mut out = Map::new();
    for (input, value) in mapping {
        let v = match value {
            CogInput::Constant(v) => v.clone(),
            CogInput::Field(f) => fields.get(f).cloned().ok_or_else(|| {
                TaskFailure::permanent(format!("the route maps unknown field ${f}"))
            })?,
        };
        out.insert(input.clone(), v);
    }
    Ok(out)
}

impl Engine for CogEngine {
    fn name(&self) -> &'static str {
        self.name
    }

    fn render(&self, req: &RenderRequest<'_>) -> Result<Rendered, TaskFailure> {
        let ins = req.instruction()?;
        let src = req.source()?;
        let stop = req.stop.clone().unwrap_or_default();
        if stop.is_cancelled() {
            return Err(TaskFailure::retryable(
                "the task was stopped before its prediction",
            ));
        }
        let fields = packshot_fields(req)?;
        let got = self.runtime.block_on(async {
            tokio::select! {
                biased;
                _ = stop.cancelled() => Err(TaskFailure::retryable(
                    "the task was stopped; the prediction was cancelled",
                )),
                // Dropping the prediction's future cancels it in the container.
                r = self.generate(JobType::CreatePackshot, &fields) => r,
            }
        })?;
        let image = imaging::fit(
            &got.image,
            ins.output.width,
            ins.output.height,
            BasicEngine::background(ins.style),
        )?;
        let mut description = got.description;
        description.insert("source_file_id".into(), json!(src.file_id));
        description.insert("style".into(), json!(ins.style));
        description.insert("seed".into(), json!(req.seed(ins)));
        Ok(Rendered {
            image,
            model_used: got.model_used,
            description: Value::Object(description),
            post: PostContext::whole_source(&src.image),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_shared::domain::JobKind;
    use atelier_shared::domain::packshot::CreatePackshot;

    #[test]
    fn every_declared_packshot_field_is_filled_and_mapped() {
        let spec = crate::engines::atelier::tests::spec(serde_json::json!({
            "project_id": "p", "images": ["a"],
            "instructions": [{"style": "white_cutout", "prompt": "crisp", "num_variations": 2}],
        }));
        let inputs = [crate::engines::Input {
            file_id: "a".into(),
            image: image::DynamicImage::new_rgb8(8, 8),
        }];
        let req = RenderRequest {
            spec: &spec,
            instruction_index: 0,
            variation_index: 1,
            version: 0,
            inputs: &inputs,
            stop: None,
        };
        let fields = packshot_fields(&req).expect("fields");
        let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
        names.sort_unstable();
        let mut declared = CreatePackshot::GENERATOR_FIELDS.to_vec();
        declared.sort_unstable();
        assert_eq!(names, declared);
        let mapping: BTreeMap<String, CogInput> = [
            ("image".to_string(), CogInput::Field("image".into())),
            ("seed".to_string(), CogInput::Field("seed".into())),
            ("steps".to_string(), CogInput::Constant(json!(4))),
        ]
        .into();
        let out = container_inputs(&mapping, &fields).expect("mapped");
        assert!(
            out["image"]
                .as_str()
                .is_some_and(|s| s.starts_with("data:image/jpeg;base64,"))
        );
        assert_eq!(out["seed"], json!(spec.instructions[0].variation_seed(1)));
        assert_eq!(out["steps"], json!(4));
        assert_eq!(out.len(), 3);
    }
}
