//! The trainer containers of one worker: operator-installed containers that
//! speak Cog's HTTP API in train mode (`--x-mode train`). Each runs one
//! training at a time; the worker hands each at most one.
//!
//! A training is started asynchronously (`PUT /trainings/{id}` with
//! `Prefer: respond-async` and a webhook on the API), so it does not depend
//! on the worker that started it: the trainer reports progress and its end
//! to the API, and the worker only watches the container
//! (`GET /health-check`: `BUSY` while it trains) until the API has recorded
//! the end. Cog treats a second `PUT` of a running id as the same training
//! but starts a new one once it has ended, so a worker never sends the
//! `PUT` again: a worker that re-attaches watches the container the claim
//! names.

use crate::failure::TaskFailure;
use atelier_shared::config::{CogInput, TrainingConfig};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What a container's `/health-check` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Idle: no training runs there.
    Ready,
    /// A training runs there.
    Busy,
    /// Starting, failed setup, …: the word it gave.
    Other(String),
    /// It did not answer.
    Unreachable,
}

struct Container {
    url: String,
    taken: AtomicBool,
}

pub struct Trainers {
    pool: Vec<Container>,
    inputs: BTreeMap<String, CogInput>,
    client: reqwest::Client,
    pub poll: Duration,
    pub lost_after: Duration,
    pub timeout: Duration,
}

/// One container of the pool, taken for one training; given back on drop.
pub struct Taken {
    trainers: Arc<Trainers>,
    index: usize,
}

impl Taken {
    pub fn url(&self) -> &str {
        &self.trainers.pool[self.index].url
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.trainers.pool[self.index]
            .taken
            .store(false, Ordering::Release);
    }
}

impl Trainers {
    /// Connects to every configured container: each must be READY within
    /// `training.startup_secs`.
    pub async fn connect(cfg: &TrainingConfig) -> Result<Trainers, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        let trainers = Trainers {
            pool: cfg
                .containers
                .iter()
                .map(|u| Container {
                    url: u.trim_end_matches('/').to_string(),
                    taken: AtomicBool::new(false),
                })
                .collect(),
            inputs: cfg.inputs.clone(),
            client,
            poll: Duration::from_millis(cfg.poll_ms.max(50)),
            lost_after: Duration::from_secs(cfg.lost_after_secs.max(1)),
            timeout: Duration::from_secs(cfg.timeout_secs.max(1)),
        };
        let until = Instant::now() + Duration::from_secs(cfg.startup_secs);
        for c in &trainers.pool {
            loop {
                match trainers.health(&c.url).await {
                    Health::Ready | Health::Busy => break,
                    other if Instant::now() >= until => {
                        return Err(format!(
                            "the trainer container at {} is not READY after {} s: {other:?}",
                            c.url, cfg.startup_secs
                        ));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        Ok(trainers)
    }

    pub fn len(&self) -> usize {
        self.pool.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pool.is_empty()
    }

    pub fn urls(&self) -> Vec<&str> {
        self.pool.iter().map(|c| c.url.as_str()).collect()
    }

    /// A container of the pool no training of this worker holds.
    pub fn take(self: &Arc<Self>) -> Option<Taken> {
        self.pool.iter().enumerate().find_map(|(index, c)| {
            c.taken
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .ok()
                .map(|_| Taken {
                    trainers: self.clone(),
                    index,
                })
        })
    }

    /// Takes the container at `url` when it is one of this worker's (a
    /// re-attaching worker holds it as its own while it watches).
    pub fn take_url(self: &Arc<Self>, url: &str) -> Option<Taken> {
        let index = self.pool.iter().position(|c| c.url == url)?;
        self.pool[index]
            .taken
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Taken {
                trainers: self.clone(),
                index,
            })
    }

    pub async fn health(&self, url: &str) -> Health {
        let r = self
            .client
            .get(format!("{url}/health-check"))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let Ok(r) = r else {
            return Health::Unreachable;
        };
        match r.json::<Value>().await {
            Ok(v) => match v["status"].as_str() {
                Some("READY") => Health::Ready,
                Some("BUSY") => Health::Busy,
                Some(other) => Health::Other(other.to_string()),
                None => Health::Other("no status".into()),
            },
            Err(_) => Health::Unreachable,
        }
    }

    /// The container inputs of a training: the mapped fields and constants.
    pub fn inputs(&self, fields: &Map<String, Value>) -> Result<Map<String, Value>, TaskFailure> {
        let mut out = Map::new();
        for (input, value) in &self.inputs {
            let v = match value {
                CogInput::Constant(v) => v.clone(),
                CogInput::Field(f) => fields.get(f).cloned().ok_or_else(|| {
                    TaskFailure::permanent(format!(
                        "training.inputs maps unknown field ${f} (known: {})",
                        fields.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                })?,
            };
            out.insert(input.clone(), v);
        }
        Ok(out)
    }

    /// Starts training `id` in the container at `url`, asynchronously:
    /// `Ok(true)` when the container took it, `Ok(false)` when it is busy
    /// with another one (`409`).
    pub async fn start(
        &self,
        url: &str,
        id: &str,
        input: Map<String, Value>,
        webhook: &str,
    ) -> Result<bool, TaskFailure> {
        let r = self
            .client
            .put(format!("{url}/trainings/{id}"))
            .header("Prefer", "respond-async")
            .json(&json!({
                "id": id,
                "input": input,
                "webhook": webhook,
                "webhook_events_filter": ["start", "output", "logs", "completed"],
            }))
            .send()
            .await
            .map_err(|_| TaskFailure::retryable(format!("trainer {url} unreachable")))?;
        match r.status().as_u16() {
            200..=299 => Ok(true),
            409 => Ok(false),
            429 | 500..=599 => Err(TaskFailure::retryable(format!(
                "trainer {url} answered {}",
                r.status()
            ))),
            _ => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                Err(TaskFailure::permanent(format!(
                    "trainer {url} rejected the training ({status}): {}",
                    body.chars().take(300).collect::<String>()
                )))
            }
        }
    }

    /// Cancels training `id` in the container at `url` (best effort: one
    /// that has ended or is unknown there is left as it is).
    pub async fn cancel(&self, url: &str, id: &str) {
        match self
            .client
            .post(format!("{url}/trainings/{id}/cancel"))
            .send()
            .await
        {
            Ok(r) => tracing::info!(%url, training = id, status = %r.status(), "trainer: cancel sent"),
            Err(e) => {
                tracing::warn!(%url, training = id, error = %e.without_url(), "trainer: cannot send the cancel")
            }
        }
    }
}
