//! The user CLI (`atelier packshot|swap|jobs|identities`): a client of the
//! public HTTP API, so it can do nothing the API would refuse a script.
//!
//! Where it connects: `--url`/`ATELIER_URL` and `--api-key`/`ATELIER_API_KEY`,
//! else a profile of the profiles file (`--profile`/`ATELIER_PROFILE`, the
//! `default` table otherwise). Creating requests carry an `Idempotency-Key`
//! and are retried with it when the server cannot be reached or is
//! overloaded, so a retry never creates (or charges for) a second job.
//!
//! Exit codes: 0 done; 1 a job or an output failed or was aborted; 2 bad
//! usage or a local file problem; 3 the API refused a request (the message
//! names why); 4 the server could not be reached or failed; 5 gave up
//! waiting (`--timeout`) while jobs still ran.

pub mod commands;
mod events;

use futures::StreamExt;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a client command ended unsuccessfully; each kind is an exit code.
#[derive(Debug)]
pub enum Failure {
    /// A job or an output failed or was aborted (1).
    JobsFailed(String),
    /// Bad usage or a local file problem (2).
    Usage(String),
    /// The API answered 4xx (3).
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    /// No answer, or a 5xx (4).
    Unreachable(String),
    /// `--timeout` passed with jobs still running (5).
    TimedOut(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::JobsFailed(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Refused { .. } => 3,
            Failure::Unreachable(_) => 4,
            Failure::TimedOut(_) => 5,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::JobsFailed(m) | Failure::Usage(m) | Failure::TimedOut(m) => f.write_str(m),
            Failure::Refused {
                status,
                code,
                message,
            } => write!(
                f,
                "the API refused the request ({status} {code}): {message}"
            ),
            Failure::Unreachable(m) => write!(f, "the server cannot be used: {m}"),
        }
    }
}

impl std::error::Error for Failure {}

/// The exit status for an error of a command (1 when it is not a
/// [`Failure`]).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<Failure>().map_or(1, Failure::exit_code)
}

/// Where and as whom to connect; shared by every client command.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Base URL of the Atelier API (e.g. https://atelier.example.com).
    #[arg(long, env = "ATELIER_URL", global = true)]
    pub url: Option<String>,
    /// API key (`atl_…`). Prefer the environment or a profile to the flag:
    /// flags show in the process list.
    #[arg(long, env = "ATELIER_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Profile to read from the profiles file (default: the `default` table).
    #[arg(long, env = "ATELIER_PROFILE", global = true)]
    pub profile: Option<String>,
    /// Profiles file: TOML tables `[name]` with `url` and `api_key`
    /// (default: $XDG_CONFIG_HOME/atelier/profiles.toml, else
    /// ~/.config/atelier/profiles.toml).
    #[arg(long, env = "ATELIER_PROFILES", global = true)]
    pub profiles_file: Option<PathBuf>,
    /// Print one JSON document on stdout instead of text and progress bars.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    url: Option<String>,
    api_key: Option<String>,
}

fn profiles_path(c: &Connection) -> Option<PathBuf> {
    if let Some(p) = &c.profiles_file {
        return Some(p.clone());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("atelier").join("profiles.toml"))
}

fn profile(c: &Connection) -> Result<Profile, Failure> {
    let Some(path) = profiles_path(c) else {
        return Ok(Profile::default());
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        // Only a named profile or an explicit file must exist.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && c.profile.is_none()
                && c.profiles_file.is_none() =>
        {
            return Ok(Profile::default());
        }
        Err(e) => {
            return Err(Failure::Usage(format!(
                "cannot read the profiles file {}: {e}",
                path.display()
            )));
        }
    };
    let mut all: BTreeMap<String, Profile> = toml::from_str(&text).map_err(|e| {
        Failure::Usage(format!(
            "the profiles file {} is not valid: {e}",
            path.display()
        ))
    })?;
    let name = c.profile.as_deref().unwrap_or("default");
    match all.remove(name) {
        Some(p) => Ok(p),
        None if c.profile.is_none() => Ok(Profile::default()),
        None => Err(Failure::Usage(format!(
            "no profile [{name}] in {}",
            path.display()
        ))),
    }
}

/// A connection to the API.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
    pub json: bool,
}

/// Attempts of a request that could not reach the server (or found it
/// overloaded) before giving up.
const ATTEMPTS: u32 = 4;

impl Client {
    pub fn connect(c: &Connection) -> Result<Client, Failure> {
        let p = profile(c)?;
        let base = c
            .url
            .clone()
            .or(p.url)
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Failure::Usage(format!(
                "the API URL {base:?} must start with http:// or https://"
            )));
        }
        let key = c.api_key.clone().or(p.api_key).ok_or_else(|| {
            Failure::Usage(
                "no API key: set ATELIER_API_KEY, pass --api-key or add api_key to a profile"
                    .into(),
            )
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("atelier-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::Unreachable(format!("cannot build an HTTP client: {e}")))?;
        Ok(Client {
            http,
            base,
            key,
            json: c.json,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends the request built by `build` (again on a connection failure,
    /// 502/503/504 or 429, with the same idempotency key); the JSON body of
    /// its 2xx answer.
    async fn send(
        &self,
        method: Method,
        path: &str,
        build: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Value, Failure> {
        let idempotency =
            matches!(method, Method::POST | Method::PUT).then(|| uuid::Uuid::new_v4().to_string());
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
            let mut rb = self
                .http
                .request(method.clone(), self.url(path))
                .bearer_auth(&self.key)
                .timeout(Duration::from_secs(120));
            if let Some(k) = &idempotency {
                rb = rb.header("Idempotency-Key", k);
            }
            let answer = match build(rb).send().await {
                Ok(a) => a,
                Err(e) => {
                    last = format!("{method} {path}: {e}");
                    continue;
                }
            };
            let status = answer.status();
            let retry_after = answer
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let body = answer.bytes().await.unwrap_or_default();
            let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if status.is_success() {
                return Ok(json);
            }
            if matches!(
                status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
                    | StatusCode::TOO_MANY_REQUESTS
            ) && attempt + 1 < ATTEMPTS
            {
                last = format!("{method} {path}: {status}");
                if let Some(s) = retry_after.filter(|s| *s <= 30) {
                    tokio::time::sleep(Duration::from_secs(s)).await;
                }
                continue;
            }
            return Err(refusal(status, &json, &body));
        }
        Err(Failure::Unreachable(last))
    }

    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.send(Method::GET, path, |r| r).await
    }

    /// `GET /jobs/{id}/{what}` (`status` or `results`).
    pub async fn job(&self, id: &str, what: &str) -> Result<Value, Failure> {
        self.get(&format!("/jobs/{}/{what}", encode(id))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        self.send(Method::POST, path, |r| r.json(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, Failure> {
        self.send(Method::DELETE, path, |r| r).await
    }

    /// A multipart POST of one file and some text fields.
    pub async fn post_file(
        &self,
        path: &str,
        field: &str,
        file: &Path,
        bytes: Vec<u8>,
        text: &[(&str, String)],
    ) -> Result<Value, Failure> {
        let filename = file_name(file);
        let mime = content_type(file)?;
        self.send(Method::POST, path, |r| {
            let part = reqwest::multipart::Part::bytes(bytes.clone())
                .file_name(filename.clone())
                .mime_str(mime)
                .unwrap_or_else(|_| reqwest::multipart::Part::bytes(bytes.clone()));
            let mut form = reqwest::multipart::Form::new().part(field.to_string(), part);
            for (k, v) in text {
                form = form.text(k.to_string(), v.clone());
            }
            r.multipart(form)
        })
        .await
    }

    /// Uploads a photo through a signed upload slot (contract §2.4, §2.5);
    /// its `file_id`.
    pub async fn upload(&self, photo: &Path, project_name: &str) -> Result<String, Failure> {
        let bytes = read_photo(photo)?;
        let slot = self
            .post(
                "/upload",
                &serde_json::json!({"filename": file_name(photo), "project_name": project_name}),
            )
            .await?;
        let (Some(url), Some(file_id), Some(ct)) = (
            slot["upload_url"].as_str(),
            slot["file_id"].as_str(),
            slot["content_type"].as_str(),
        ) else {
            return Err(Failure::Unreachable(format!(
                "unexpected answer to POST /upload: {slot}"
            )));
        };
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
            // The slot's URL carries its own signature: no key is sent.
            match self
                .http
                .put(url)
                .header("Content-Type", ct)
                .timeout(Duration::from_secs(300))
                .body(bytes.clone())
                .send()
                .await
            {
                Ok(a) if a.status().is_success() => return Ok(file_id.to_string()),
                Ok(a) if a.status().is_server_error() => {
                    last = format!("PUT upload: {}", a.status())
                }
                Ok(a) => {
                    let status = a.status();
                    let body = a.bytes().await.unwrap_or_default();
                    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    return Err(refusal(status, &json, &body));
                }
                Err(e) => last = format!("PUT upload: {e}"),
            }
        }
        Err(Failure::Unreachable(last))
    }

    /// Saves a signed result URL to `dest` (through a temporary file, so an
    /// interrupted download leaves no partial image); the bytes written.
    pub async fn download(&self, url: &str, dest: &Path) -> Result<u64, Failure> {
        let url = if url.starts_with('/') {
            self.url(url)
        } else {
            url.to_string()
        };
        let answer = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .map_err(|e| Failure::Unreachable(format!("GET {url}: {e}")))?;
        if !answer.status().is_success() {
            let status = answer.status();
            let body = answer.bytes().await.unwrap_or_default();
            let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
            return Err(refusal(status, &json, &body));
        }
        let partial = dest.with_extension("part");
        let local =
            |e: std::io::Error| Failure::Usage(format!("cannot write {}: {e}", dest.display()));
        let mut file = tokio::fs::File::create(&partial).await.map_err(local)?;
        let mut stream = answer.bytes_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Failure::Unreachable(format!("GET {url}: {e}")))?;
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(local)?;
            written += chunk.len() as u64;
        }
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(local)?;
        drop(file);
        tokio::fs::rename(&partial, dest).await.map_err(local)?;
        Ok(written)
    }

    /// The project named (or with the id) `name`, created when missing.
    pub async fn project(&self, name: &str) -> Result<(String, String), Failure> {
        match self.get(&format!("/project/{}", encode(name))).await {
            Ok(p) => return Ok(project_of(&p)),
            Err(Failure::Refused { status: 404, .. }) => {}
            Err(e) => return Err(e),
        }
        match self
            .post("/project", &serde_json::json!({"project_name": name}))
            .await
        {
            Ok(p) => Ok(project_of(&p)),
            // It exists: the 409 names it.
            Err(Failure::Refused { status: 409, .. }) => {
                let list = self
                    .get(&format!("/project?per_page=100&search={}", encode(name)))
                    .await?;
                list["projects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["project_name"] == name)
                    .map(project_of)
                    .ok_or_else(|| Failure::Unreachable(format!("project {name:?} vanished")))
            }
            Err(e) => Err(e),
        }
    }
}

fn project_of(p: &Value) -> (String, String) {
    (
        p["project_id"].as_str().unwrap_or_default().to_string(),
        p["project_name"].as_str().unwrap_or_default().to_string(),
    )
}

/// The API's error envelope (contract §1.4) as a [`Failure`].
fn refusal(status: StatusCode, json: &Value, raw: &[u8]) -> Failure {
    let mut message = json["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&raw[..raw.len().min(300)]).into_owned());
    for d in json["detail"].as_array().into_iter().flatten() {
        match (d["field"].as_str(), d["message"].as_str()) {
            (Some(f), Some(m)) => message.push_str(&format!("; {f}: {m}")),
            (None, Some(m)) => message.push_str(&format!("; {m}")),
            _ => {}
        }
    }
    if status.is_server_error() {
        return Failure::Unreachable(format!("{status}: {message}"));
    }
    Failure::Refused {
        status: status.as_u16(),
        code: json["code"].as_str().unwrap_or("error").to_string(),
        message,
    }
}

pub(crate) fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "photo.jpg".into())
}

fn content_type(p: &Path) -> Result<&'static str, Failure> {
    let ext = p
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => Ok("image/jpeg"),
        "png" => Ok("image/png"),
        "webp" => Ok("image/webp"),
        _ => Err(Failure::Usage(format!(
            "{}: only .jpg, .jpeg, .png and .webp photos are accepted",
            p.display()
        ))),
    }
}

/// Checks, before anything is uploaded, that `p` is a file of an accepted
/// kind (its bytes are read when it is sent).
pub(crate) fn check_photo(p: &Path) -> Result<(), Failure> {
    content_type(p)?;
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Failure::Usage(format!("{} is not a file", p.display()))),
        Err(e) => Err(Failure::Usage(format!("cannot read {}: {e}", p.display()))),
    }
}

/// A photo's bytes, checked to be a file of an accepted kind.
pub(crate) fn read_photo(p: &Path) -> Result<Vec<u8>, Failure> {
    content_type(p)?;
    std::fs::read(p).map_err(|e| Failure::Usage(format!("cannot read {}: {e}", p.display())))
}
