//! The generator routes of one worker (model containers over Cog's HTTP
//! API), per job kind: the `auto` order tried on refusals, and the routes
//! clients may name. The packshot [`super::Pipeline`] holds the same routes
//! as engines, so a container's slots are shared by every kind it draws.

use super::cog::CogEngine;
use crate::failure::TaskFailure;
use atelier_shared::config::{AutoEngine, EngineTargets};
use atelier_shared::domain::JobType;
use atelier_shared::domain::packshot::EngineChoice;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone, Default)]
pub struct Generators {
    routes: Vec<(EngineChoice, Arc<CogEngine>)>,
    auto: BTreeMap<JobType, Vec<Arc<CogEngine>>>,
}

impl Generators {
    /// The routes `connected` (every Cog route of the configuration), in
    /// the kinds' `auto` orders of `targets`.
    pub fn new(connected: Vec<(EngineChoice, Arc<CogEngine>)>, targets: &EngineTargets) -> Self {
        let mut auto = BTreeMap::new();
        for kind in JobType::ALL.iter().copied() {
            let order: Vec<Arc<CogEngine>> = targets
                .auto_for(kind)
                .iter()
                .filter_map(|a| match a {
                    AutoEngine::Builtin => None,
                    AutoEngine::Route(c) => connected
                        .iter()
                        .find(|(n, e)| n == c && e.serves(kind))
                        .map(|(_, e)| e.clone()),
                })
                .collect();
            if !order.is_empty() {
                auto.insert(kind, order);
            }
        }
        Generators {
            routes: connected,
            auto,
        }
    }

    /// Whether any generator is connected.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Route names and the kinds each draws, for the start-up log.
    pub fn describe(&self) -> Vec<String> {
        self.routes
            .iter()
            .map(|(c, e)| {
                let kinds: Vec<&str> = JobType::ALL
                    .iter()
                    .filter(|k| e.serves(**k))
                    .map(|k| k.as_str())
                    .collect();
                format!("{}=[{}]", c.as_str(), kinds.join(","))
            })
            .collect()
    }

    /// The route that draws this attempt of an output of `kind`: the one
    /// the client named, or entry `engine_index` of the kind's `auto`
    /// order (the scheduler moves an output on after a refusal).
    pub fn pick(
        &self,
        kind: JobType,
        model: EngineChoice,
        engine_index: u32,
        previous_refusal: Option<&str>,
    ) -> Result<Arc<CogEngine>, TaskFailure> {
        if model != EngineChoice::Auto {
            if engine_index > 0 {
                // A named engine has no fallback: its refusal is final.
                return Err(TaskFailure::permanent(format!(
                    "engine {} refused this content{}",
                    model.as_str(),
                    previous_refusal
                        .map(|w| format!(": {w}"))
                        .unwrap_or_default()
                )));
            }
            return self
                .routes
                .iter()
                .find(|(c, e)| *c == model && e.serves(kind))
                .map(|(_, e)| e.clone())
                .ok_or_else(|| {
                    TaskFailure::permanent(format!(
                        "engine {} does not draw {kind} on this worker (engines.routes.{}.inputs.{kind})",
                        model.as_str(),
                        model.as_str()
                    ))
                });
        }
        let order = self.auto.get(&kind).map(Vec::as_slice).unwrap_or_default();
        if order.is_empty() {
            return Err(TaskFailure::permanent(format!(
                "no generator draws {kind} on this worker (engines.auto.{kind})"
            )));
        }
        order.get(engine_index as usize).cloned().ok_or_else(|| {
            TaskFailure::permanent(match previous_refusal {
                Some(why) => {
                    format!("every configured engine refused this content; last refusal: {why}")
                }
                None => "no engine left to try for this output".to_string(),
            })
        })
    }
}
