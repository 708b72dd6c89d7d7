//! The user commands: what each one asks of the API and how it reports.

use super::{Client, Connection, Failure};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// `atelier packshot`.
#[derive(Debug, clap::Args)]
pub struct PackshotArgs {
    /// Garment photos (.jpg, .jpeg, .png, .webp). One job per photo, unless
    /// --together makes them views of one product in one job (up to 10).
    #[arg(required = true, value_name = "PHOTO")]
    pub photos: Vec<PathBuf>,
    /// flat_lay, ghost_mannequin, marketing_ready, white_cutout or free.
    #[arg(long, default_value = "white_cutout")]
    pub style: String,
    /// Output size class: 1K, 2K or 4K (the plan may forbid some).
    #[arg(long)]
    pub size: Option<String>,
    /// Aspect ratio, e.g. 1:1, 4:5, 3:4.
    #[arg(long)]
    pub ar: Option<String>,
    /// Output format: jpg or png.
    #[arg(long)]
    pub format: Option<String>,
    /// Variations of each photo (1–4).
    #[arg(long, default_value_t = 1)]
    pub variations: u32,
    /// Background, in words (e.g. "light grey").
    #[arg(long)]
    pub background: Option<String>,
    /// Surface of a flat lay, in words (e.g. "white linen").
    #[arg(long)]
    pub surface: Option<String>,
    /// A create_packshot preset's code; the flags above override its fields.
    #[arg(long)]
    pub preset: Option<String>,
    /// All photos are views of one product: one job, one set of results.
    #[arg(long)]
    pub together: bool,
    /// Project (name or id) the uploads and jobs are filed under; created
    /// when missing.
    #[arg(long, default_value = "atelier-cli")]
    pub project: String,
    /// Directory the results are saved in (created when missing).
    #[arg(long, default_value = "atelier-results")]
    pub out: PathBuf,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub conn: Connection,
}

/// How long to follow jobs.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Print the job ids and return without waiting or downloading.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds (exit 5; the jobs go on).
    #[arg(long, default_value_t = 3600, value_name = "SECS")]
    pub timeout: u64,
}

/// `atelier swap`.
#[derive(Debug, clap::Args)]
pub struct SwapArgs {
    /// The identity to put in the photos (its code; `atelier identities ls`).
    pub identity: String,
    /// Photos of garments worn by a model (.jpg, .jpeg, .png, .webp); one
    /// output each, 10 per job.
    #[arg(required = true, value_name = "PHOTO")]
    pub photos: Vec<PathBuf>,
    /// Swap engine: auto, onda or nano_banana_pro.
    #[arg(long)]
    pub model: Option<String>,
    /// Project (name or id); created when missing.
    #[arg(long, default_value = "atelier-cli")]
    pub project: String,
    /// Directory the results are saved in.
    #[arg(long, default_value = "atelier-results")]
    pub out: PathBuf,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[command(flatten)]
    pub conn: Connection,
}

/// `atelier jobs`.
#[derive(Debug, clap::Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub command: JobsCommand,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// Your jobs, newest first.
    Ls {
        /// Only jobs in this state: pending, processing, completed, failed, aborted.
        #[arg(long)]
        status: Option<String>,
        /// Only jobs of this kind: create_packshot, model_swap, flat_2_model, …
        #[arg(long = "type")]
        job_type: Option<String>,
        /// Only jobs of this project (its id).
        #[arg(long)]
        project: Option<String>,
        /// Page (1-based).
        #[arg(long, default_value_t = 1)]
        page: u32,
        /// Jobs per page (1–100).
        #[arg(long, default_value_t = 20)]
        per_page: u32,
    },
    /// A job's state and progress.
    Status {
        /// The job's id.
        job: String,
    },
    /// A job's outputs with their state, engine and signed URLs.
    Results {
        /// The job's id.
        job: String,
    },
    /// Follow jobs with progress bars until they end.
    Watch {
        /// Job ids.
        #[arg(required = true)]
        jobs: Vec<String>,
        /// Give up after this many seconds (exit 5).
        #[arg(long, default_value_t = 3600, value_name = "SECS")]
        timeout: u64,
    },
    /// Abort a job: outputs not finished are cancelled and their credits released.
    Abort {
        /// The job's id.
        job: String,
    },
    /// Save a job's finished outputs (or its ZIP archive with --zip).
    Download {
        /// The job's id.
        job: String,
        /// Directory to save into.
        #[arg(long, default_value = "atelier-results")]
        out: PathBuf,
        /// Save the job's ZIP archive (images and manifest.json) instead.
        #[arg(long)]
        zip: bool,
    },
}

/// `atelier identities`.
#[derive(Debug, clap::Args)]
pub struct IdentitiesArgs {
    #[command(subcommand)]
    pub command: IdentitiesCommand,
    #[command(flatten)]
    pub conn: Connection,
}

#[derive(Debug, clap::Subcommand)]
pub enum IdentitiesCommand {
    /// Identities you can use: yours, your groups' and the platform's.
    Ls {
        /// Only names containing this text.
        #[arg(long)]
        search: Option<String>,
    },
    /// Create an identity from a photo of one face (50 credits).
    Upload {
        /// The photo (.jpg, .jpeg, .png, .webp).
        photo: PathBuf,
        /// Its name (unique among yours; default: the file's stem).
        #[arg(long)]
        name: Option<String>,
        /// A free label.
        #[arg(long)]
        tag: Option<String>,
        /// Wait until preprocessing ends.
        #[arg(long)]
        wait: bool,
    },
    /// Delete one of your identities.
    Rm {
        /// Its code.
        identity: String,
    },
}

pub async fn packshot(a: PackshotArgs) -> anyhow::Result<()> {
    let client = Client::connect(&a.conn)?;
    for p in &a.photos {
        super::check_photo(p)?;
    }
    if a.together && a.photos.len() > 10 {
        return Err(Failure::Usage("--together takes at most 10 photos (one job)".into()).into());
    }
    let (project_id, project_name) = client.project(&a.project).await?;
    let report = Report::new(client.json);
    let mut file_ids = Vec::new();
    for p in &a.photos {
        report.say(&format!("uploading {}", p.display()));
        file_ids.push(client.upload(p, &project_name).await?);
    }
    let mut options = serde_json::Map::new();
    for (k, v) in [("size", &a.size), ("ar", &a.ar), ("format", &a.format)] {
        if let Some(v) = v {
            options.insert(k.into(), json!(v));
        }
    }
    let mut instruction = json!({"style": a.style, "num_variations": a.variations});
    for (k, v) in [
        ("background", &a.background),
        ("surface", &a.surface),
        ("preset_code", &a.preset),
    ] {
        if let Some(v) = v {
            instruction[k] = json!(v);
        }
    }
    if !options.is_empty() {
        instruction["options"] = Value::Object(options);
    }
    let groups: Vec<Vec<usize>> = if a.together {
        vec![(0..a.photos.len()).collect()]
    } else {
        (0..a.photos.len()).map(|i| vec![i]).collect()
    };
    let stems = unique_stems(&a.photos);
    let mut jobs = Vec::new();
    for g in groups {
        let images: Vec<&String> = g.iter().map(|i| &file_ids[*i]).collect();
        let accepted = client
            .post(
                "/create-packshot",
                &json!({"project_id": project_id, "images": images, "instructions": [instruction]}),
            )
            .await?;
        let id = job_id(&accepted)?;
        let label = group_label(&g.iter().map(|i| stems[*i].clone()).collect::<Vec<_>>());
        let style = a.style.clone();
        jobs.push(Tracked::new(id, label.clone(), move |_, variation| {
            format!("{label}_{style}_{}", variation + 1)
        }));
    }
    finish(&client, jobs, &a.wait, &a.out, report).await
}

pub async fn swap(a: SwapArgs) -> anyhow::Result<()> {
    let client = Client::connect(&a.conn)?;
    for p in &a.photos {
        super::check_photo(p)?;
    }
    let (project_id, project_name) = client.project(&a.project).await?;
    let report = Report::new(client.json);
    let stems = unique_stems(&a.photos);
    let mut jobs = Vec::new();
    for (n, chunk) in a.photos.chunks(10).enumerate() {
        let mut files = Vec::new();
        for p in chunk {
            report.say(&format!("uploading {}", p.display()));
            files.push(client.upload(p, &project_name).await?);
        }
        let mut body =
            json!({"project_id": project_id, "identity_code": a.identity, "images": files});
        if let Some(m) = &a.model {
            body["swap_options"] = json!({"model": m});
        }
        let id = job_id(&client.post("/model-swap", &body).await?)?;
        let names: Vec<String> = stems[n * 10..n * 10 + chunk.len()].to_vec();
        let label = group_label(&names);
        jobs.push(Tracked::new(id, label, move |image, _| {
            let stem = usize::try_from(image)
                .ok()
                .and_then(|i| names.get(i))
                .cloned()
                .unwrap_or_else(|| format!("image{image}"));
            format!("{stem}_swap")
        }));
    }
    finish(&client, jobs, &a.wait, &a.out, report).await
}

pub async fn jobs(a: JobsArgs) -> anyhow::Result<()> {
    let client = Client::connect(&a.conn)?;
    match a.command {
        JobsCommand::Ls {
            status,
            job_type,
            project,
            page,
            per_page,
        } => {
            let mut path = format!("/jobs?page={page}&per_page={per_page}");
            for (k, v) in [
                ("status", status),
                ("job_type", job_type),
                ("project_id", project),
            ] {
                if let Some(v) = v {
                    path.push_str(&format!("&{k}={}", super::encode(&v)));
                }
            }
            let list = client.get(&path).await?;
            if client.json {
                println!("{list}");
                return Ok(());
            }
            println!(
                "{:<28} {:<16} {:<11} {:>9}  {:<20} PROJECT",
                "JOB", "TYPE", "STATUS", "OUTPUTS", "CREATED"
            );
            for j in list["jobs"].as_array().into_iter().flatten() {
                println!(
                    "{:<28} {:<16} {:<11} {:>9}  {:<20} {}",
                    text(&j["job_id"]),
                    text(&j["job_type"]),
                    text(&j["status"]),
                    format!("{}/{}", j["processed_images"], j["total_images"]),
                    text(&j["created_at"]).chars().take(19).collect::<String>(),
                    text(&j["project_text"]),
                );
            }
            let p = &list["pagination"];
            println!("page {} of {} ({} jobs)", p["page"], p["pages"], p["total"]);
        }
        JobsCommand::Status { job } => {
            let s = client.job(&job, "status").await?;
            if client.json {
                println!("{s}");
            } else {
                println!(
                    "{} {} {}: {}/{} outputs done ({}%)",
                    text(&s["job_id"]),
                    text(&s["job_type"]),
                    text(&s["status"]),
                    s["processed_images"],
                    s["total_images"],
                    s["progress"]
                );
                if let Some(e) = s["error_message"].as_str() {
                    println!("error: {e}");
                }
            }
            if matches!(s["status"].as_str(), Some("failed" | "aborted")) {
                return Err(Failure::JobsFailed(format!("{job} {}", text(&s["status"]))).into());
            }
        }
        JobsCommand::Results { job } => {
            let r = client.job(&job, "results").await?;
            if client.json {
                println!("{r}");
            } else {
                println!(
                    "{} {}, credits used {}",
                    text(&r["job_id"]),
                    text(&r["status"]),
                    r["credits_used"]
                );
                for o in r["results"].as_array().into_iter().flatten() {
                    println!(
                        "  #{}.{} v{} {:<10} {:<14} {}",
                        o["image_index"],
                        o["group_index"],
                        o["version"],
                        text(&o["status"]),
                        o["model_used"].as_str().unwrap_or("-"),
                        o["output"]["full_size"]
                            .as_str()
                            .or(o["error_message"].as_str())
                            .unwrap_or("")
                    );
                }
            }
        }
        JobsCommand::Watch { jobs, timeout } => {
            let tracked = jobs
                .iter()
                .map(|id| Tracked::new(id.clone(), id.clone(), |i, v| format!("{i}_{v}")))
                .collect();
            let report = Report::new(client.json);
            let wait = WaitArgs {
                no_wait: false,
                timeout,
            };
            let done = watch(&client, tracked, &wait, &report).await?;
            report.done();
            summarise(&client, &done, None).await?;
        }
        JobsCommand::Abort { job } => {
            let r = client
                .post(&format!("/jobs/{}/abort", super::encode(&job)), &json!({}))
                .await?;
            if client.json {
                println!("{r}");
            } else {
                println!(
                    "{job}: {}",
                    r["message"].as_str().unwrap_or("abort requested")
                );
            }
        }
        JobsCommand::Download { job, out, zip } => {
            std::fs::create_dir_all(&out)
                .map_err(|e| Failure::Usage(format!("cannot create {}: {e}", out.display())))?;
            let mut saved = Vec::new();
            if zip {
                let link = client.post("/download", &json!({"job_id": job})).await?;
                let url = link["download_url"].as_str().unwrap_or_default();
                let dest = out.join(format!("{job}.zip"));
                client.download(url, &dest).await?;
                saved.push(dest);
            } else {
                let r = client.job(&job, "results").await?;
                for o in r["results"].as_array().into_iter().flatten() {
                    if let (Some(url), Some(name)) = (
                        o["output"]["full_size"].as_str(),
                        o["download_filename"].as_str(),
                    ) {
                        let dest = out.join(safe_name(name));
                        client.download(url, &dest).await?;
                        saved.push(dest);
                    }
                }
            }
            if client.json {
                println!("{}", json!({"job_id": job, "files": saved}));
            } else {
                for f in &saved {
                    println!("saved {}", f.display());
                }
                if saved.is_empty() {
                    println!("{job}: no finished outputs yet");
                }
            }
        }
    }
    Ok(())
}

pub async fn identities(a: IdentitiesArgs) -> anyhow::Result<()> {
    let client = Client::connect(&a.conn)?;
    match a.command {
        IdentitiesCommand::Ls { search } => {
            let mut all = Vec::new();
            for page in 1..=50 {
                let mut path = format!("/identity?per_page=100&page={page}");
                if let Some(s) = &search {
                    path.push_str(&format!("&search={}", super::encode(s)));
                }
                let list = client.get(&path).await?;
                all.extend(list["identities"].as_array().cloned().unwrap_or_default());
                if list["pagination"]["has_next"] != true {
                    break;
                }
            }
            if client.json {
                println!("{}", json!({"identities": all}));
                return Ok(());
            }
            println!(
                "{:<14} {:<24} {:<11} {:<8} VISIBILITY",
                "CODE", "NAME", "STATUS", "QUALITY"
            );
            for i in &all {
                println!(
                    "{:<14} {:<24} {:<11} {:<8} {}",
                    text(&i["identity_code"]),
                    text(&i["name"]),
                    text(&i["preprocessing_status"]),
                    i["quality_score"]
                        .as_f64()
                        .map_or("-".into(), |q| format!("{q:.2}")),
                    text(&i["visibility"]),
                );
            }
        }
        IdentitiesCommand::Upload {
            photo,
            name,
            tag,
            wait,
        } => {
            let bytes = super::read_photo(&photo)?;
            let mut fields = Vec::new();
            if let Some(n) = name {
                fields.push(("name", n));
            }
            if let Some(t) = tag {
                fields.push(("tag", t));
            }
            let mut identity = client
                .post_file("/identity/upload", "image", &photo, bytes, &fields)
                .await?;
            let code = identity["identity_code"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if wait {
                let spinner = Report::new(client.json).spinner(&format!("identity {code}"));
                loop {
                    let s = client
                        .get(&format!("/identity/{}/status", super::encode(&code)))
                        .await?;
                    let status = text(&s["preprocessing_status"]).to_string();
                    if let Some(sp) = &spinner {
                        sp.set_message(status.clone());
                    }
                    if status == "completed" || status == "failed" {
                        identity = client
                            .get(&format!("/identity/{}", super::encode(&code)))
                            .await?;
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if let Some(sp) = spinner {
                    sp.finish_and_clear();
                }
            }
            if client.json {
                println!("{identity}");
            } else {
                println!(
                    "identity {} ({}): {}",
                    code,
                    text(&identity["name"]),
                    text(&identity["preprocessing_status"])
                );
            }
            if identity["preprocessing_status"] == "failed" {
                return Err(Failure::JobsFailed(format!(
                    "identity {code} failed: {}",
                    identity["error_message"]
                        .as_str()
                        .unwrap_or("preprocessing failed")
                ))
                .into());
            }
        }
        IdentitiesCommand::Rm { identity } => {
            client
                .delete(&format!("/identity/{}", super::encode(&identity)))
                .await?;
            if client.json {
                println!("{}", json!({"deleted": identity}));
            } else {
                println!("deleted identity {identity}");
            }
        }
    }
    Ok(())
}

fn job_id(accepted: &Value) -> Result<String, Failure> {
    accepted["job_id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| {
            Failure::Unreachable(format!("unexpected answer to a job creation: {accepted}"))
        })
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// What a job of several photos is called: the first one's stem, `+N`.
fn group_label(stems: &[String]) -> String {
    match stems {
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first}+{}", rest.len()),
        [] => String::new(),
    }
}

/// File stems of the photos, made unique (`shirt`, `shirt-2`, …).
fn unique_stems(photos: &[PathBuf]) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    photos
        .iter()
        .map(|p| {
            let stem = safe_name(
                &p.file_stem()
                    .map(|s| s.to_string_lossy())
                    .unwrap_or_default(),
            );
            let n = seen.entry(stem.clone()).or_insert(0);
            *n += 1;
            if *n == 1 { stem } else { format!("{stem}-{n}") }
        })
        .collect()
}

/// A file name without path separators or control characters.
fn safe_name(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches('.').to_string();
    if cleaned.is_empty() {
        "output".into()
    } else {
        cleaned
    }
}

/// A job being followed, with its bars and how its outputs are named.
struct Tracked {
    id: String,
    label: String,
    status: String,
    total: u64,
    processed: u64,
    error: Option<String>,
    bar: Option<ProgressBar>,
    /// Latest state of every output by (image_index, group_index).
    outputs: BTreeMap<(i64, i64), OutputState>,
    name: Box<dyn Fn(i64, i64) -> String + Send>,
}

struct OutputState {
    status: String,
    model_used: Option<String>,
    bar: Option<ProgressBar>,
}

impl Tracked {
    fn new(
        id: String,
        label: String,
        name: impl Fn(i64, i64) -> String + Send + 'static,
    ) -> Tracked {
        Tracked {
            id,
            label,
            status: "pending".into(),
            total: 0,
            processed: 0,
            error: None,
            bar: None,
            outputs: BTreeMap::new(),
            name: Box::new(name),
        }
    }

    fn terminal(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "aborted")
    }
}

/// Where progress goes: bars on a terminal, lines on a pipe, nothing with
/// --json.
struct Report {
    multi: Option<MultiProgress>,
    lines: bool,
}

impl Report {
    fn new(json: bool) -> Report {
        let tty = std::io::stderr().is_terminal();
        Report {
            multi: (!json && tty)
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            lines: !json && !tty,
        }
    }

    fn say(&self, line: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None if self.lines => eprintln!("{line}"),
            None => {}
        }
    }

    fn spinner(&self, prefix: &str) -> Option<ProgressBar> {
        let m = self.multi.as_ref()?;
        let sp = m.add(ProgressBar::new_spinner());
        sp.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        sp.set_prefix(prefix.to_string());
        sp.enable_steady_tick(Duration::from_millis(120));
        Some(sp)
    }

    fn job_bar(&self, job: &mut Tracked) {
        if let Some(m) = &self.multi
            && job.bar.is_none()
        {
            let bar = m.add(ProgressBar::new(job.total.max(1)));
            bar.set_style(
                ProgressStyle::with_template("{prefix:<24} [{bar:30.cyan/blue}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(job.label.clone());
            job.bar = Some(bar);
        }
    }

    fn job_changed(&self, job: &mut Tracked) {
        self.job_bar(job);
        if let Some(bar) = &job.bar {
            bar.set_length(job.total.max(1));
            bar.set_position(job.processed);
            bar.set_message(format!("{} {}", job.status, job.id));
            if job.terminal() {
                bar.finish();
            }
        } else if self.lines {
            eprintln!(
                "{} {}: {} {}/{}",
                job.label, job.id, job.status, job.processed, job.total
            );
        }
    }

    fn output_changed(&self, job: &mut Tracked, key: (i64, i64)) {
        self.job_bar(job);
        // Below the job's bar, in output order.
        let anchor = job
            .outputs
            .range(..key)
            .rev()
            .find_map(|(_, o)| o.bar.clone())
            .or_else(|| job.bar.clone());
        let Some(o) = job.outputs.get_mut(&key) else {
            return;
        };
        let mark = match o.status.as_str() {
            "completed" => "done",
            "failed" => "FAILED",
            s => s,
        };
        let line = format!(
            "{} #{}.{} {}{}",
            job.label,
            key.0,
            key.1,
            mark,
            o.model_used
                .as_deref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        );
        if let Some(m) = &self.multi {
            let bar = o.bar.get_or_insert_with(|| {
                let sp = match &anchor {
                    Some(a) => m.insert_after(a, ProgressBar::new_spinner()),
                    None => m.add(ProgressBar::new_spinner()),
                };
                sp.set_style(
                    ProgressStyle::with_template("  {spinner} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                sp.enable_steady_tick(Duration::from_millis(120));
                sp
            });
            bar.set_message(line);
            if matches!(o.status.as_str(), "completed" | "failed") {
                bar.finish();
            }
        } else if self.lines {
            eprintln!("  {line}");
        }
    }

    fn done(&self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

/// Applies a job state (a `batch_edit` payload, a status or results
/// answer) to `job`; true when something changed.
fn apply_job(job: &mut Tracked, v: &Value) -> bool {
    let before = (job.status.clone(), job.processed, job.total);
    if let Some(s) = v["status"].as_str() {
        job.status = s.to_string();
    }
    if let Some(n) = v["processed_images"].as_u64() {
        job.processed = n;
    }
    if let Some(n) = v["total_images"].as_u64() {
        job.total = n;
    }
    if let Some(e) = v["error_message"].as_str() {
        job.error = Some(e.to_string());
    }
    before != (job.status.clone(), job.processed, job.total)
}

/// Applies an output state (`image_result` payload or a results entry).
fn apply_output(job: &mut Tracked, v: &Value) -> Option<(i64, i64)> {
    let key = (v["image_index"].as_i64()?, v["group_index"].as_i64()?);
    let status = v["status"].as_str()?.to_string();
    let model = v["model_used"].as_str().map(str::to_string);
    let o = job.outputs.entry(key).or_insert(OutputState {
        status: String::new(),
        model_used: None,
        bar: None,
    });
    if o.status == status && o.model_used == model {
        return None;
    }
    o.status = status;
    o.model_used = model;
    Some(key)
}

/// Follows `jobs` (events, and a poll every few seconds in case events are
/// missed) until every one ends or the timeout passes.
async fn watch(
    client: &Client,
    mut jobs: Vec<Tracked>,
    wait: &WaitArgs,
    report: &Report,
) -> Result<Vec<Tracked>, Failure> {
    let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    let (tx, mut rx) = mpsc::channel::<Value>(256);
    let follower = {
        let client = client.clone();
        let ids = ids.clone();
        tokio::spawn(async move { super::events::follow(&client, &ids, tx).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.timeout);
    let mut poll = tokio::time::interval(Duration::from_secs(3));
    let outcome = 'watch: loop {
        if jobs.iter().all(Tracked::terminal) {
            break Ok(());
        }
        tokio::select! {
            Some(n) = rx.recv() => {
                let data = &n["data"];
                let Some(job) = data["job_id"]
                    .as_str()
                    .or(data["id_task"].as_str())
                    .and_then(|id| jobs.iter_mut().find(|j| j.id == id))
                else {
                    continue;
                };
                match n["name"].as_str() {
                    Some("batch_edit") => {
                        if apply_job(job, data) {
                            report.job_changed(job);
                        }
                    }
                    Some("image_result") => {
                        if let Some(key) = apply_output(job, data) {
                            report.output_changed(job, key);
                        }
                    }
                    _ => {}
                }
            }
            _ = poll.tick() => {
                for job in jobs.iter_mut().filter(|j| !j.terminal()) {
                    let r = match client.job(&job.id, "results").await {
                        Ok(r) => r,
                        Err(Failure::Unreachable(_)) => continue,
                        Err(e) => break 'watch Err(e),
                    };
                    for o in r["results"].as_array().into_iter().flatten() {
                        if let Some(key) = apply_output(job, o) {
                            report.output_changed(job, key);
                        }
                    }
                    if apply_job(job, &r) || job.bar.is_none() && report.multi.is_some() {
                        report.job_changed(job);
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                break Err(Failure::TimedOut(format!(
                    "gave up after {} s; still running: {}",
                    wait.timeout,
                    jobs.iter().filter(|j| !j.terminal()).map(|j| j.id.as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
    };
    follower.abort();
    outcome.map(|()| jobs)
}

/// Waits for `jobs` (unless --no-wait), saves their finished outputs in
/// `out` and reports; an error when any job or output did not complete.
async fn finish(
    client: &Client,
    jobs: Vec<Tracked>,
    wait: &WaitArgs,
    out: &Path,
    report: Report,
) -> anyhow::Result<()> {
    if wait.no_wait {
        if client.json {
            let list: Vec<Value> = jobs
                .iter()
                .map(|j| json!({"job_id": j.id, "label": j.label}))
                .collect();
            println!("{}", json!({"jobs": list}));
        } else {
            for j in &jobs {
                println!("{}\t{}", j.id, j.label);
            }
        }
        return Ok(());
    }
    let done = watch(client, jobs, wait, &report).await?;
    report.done();
    summarise(client, &done, Some(out)).await?;
    Ok(())
}

/// Prints (and with `out`, downloads) the results of finished jobs.
async fn summarise(client: &Client, jobs: &[Tracked], out: Option<&Path>) -> Result<(), Failure> {
    if let Some(out) = out {
        std::fs::create_dir_all(out)
            .map_err(|e| Failure::Usage(format!("cannot create {}: {e}", out.display())))?;
    }
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for job in jobs {
        let r = client.job(&job.id, "results").await?;
        let mut outputs = Vec::new();
        for o in r["results"].as_array().into_iter().flatten() {
            let (image, group) = (
                o["image_index"].as_i64().unwrap_or(0),
                o["group_index"].as_i64().unwrap_or(0),
            );
            let mut file = Value::Null;
            if let (Some(out), Some(url), "completed") =
                (out, o["output"]["full_size"].as_str(), text(&o["status"]))
            {
                let ext = o["output_format"].as_str().unwrap_or("jpg");
                let dest = out.join(format!("{}.{ext}", safe_name(&(job.name)(image, group))));
                client.download(url, &dest).await?;
                file = json!(dest);
            }
            if o["status"] != "completed" {
                failed.push(format!(
                    "{} #{image}.{group}: {}",
                    job.id,
                    o["error_message"].as_str().unwrap_or(text(&o["status"]))
                ));
            }
            outputs.push(json!({
                "image_result_id": o["image_result_id"],
                "image_index": image,
                "group_index": group,
                "status": o["status"],
                "model_used": o["model_used"],
                "credits": o["credits"],
                "error_message": o["error_message"],
                "file": file,
            }));
        }
        if r["status"] != "completed" {
            failed.push(format!(
                "{} {}{}",
                job.id,
                text(&r["status"]),
                r["error_message"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
        summary.push(json!({
            "job_id": job.id,
            "label": job.label,
            "status": r["status"],
            "credits_used": r["credits_used"],
            "outputs": outputs,
        }));
    }
    if client.json {
        println!("{}", json!({"jobs": summary}));
    } else {
        for j in &summary {
            println!(
                "{} {} {}: credits used {}",
                text(&j["label"]),
                text(&j["job_id"]),
                text(&j["status"]),
                j["credits_used"]
            );
            for o in j["outputs"].as_array().into_iter().flatten() {
                println!(
                    "  #{}.{} {} {}{}",
                    o["image_index"],
                    o["group_index"],
                    text(&o["status"]),
                    o["model_used"].as_str().unwrap_or("-"),
                    o["file"]
                        .as_str()
                        .map(|f| format!(" -> {f}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::JobsFailed(format!(
            "not everything completed: {}",
            failed.join("; ")
        )))
    }
}
