//! Which engines draw which job kinds on this server, as admission sees it:
//! the names a client may send in `options.model` for a kind, and whether
//! `model: auto` has anything to try. Built once at start from the
//! configuration's engine targets (`Config::targets`).

use super::kinds::JobType;
use super::packshot::{EngineChoice, FieldError};
use std::collections::BTreeMap;

/// The engines of one job kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindEngines {
    /// Engines clients may name for this kind (`options.model`).
    pub named: Vec<EngineChoice>,
    /// What `model: auto` tries, in order, by name (`atelier` is the
    /// built-in engine).
    pub auto: Vec<String>,
}

/// The engines of every kind this server can draw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineAvailability {
    kinds: BTreeMap<JobType, KindEngines>,
}

impl EngineAvailability {
    pub fn new(kinds: BTreeMap<JobType, KindEngines>) -> EngineAvailability {
        EngineAvailability { kinds }
    }

    /// Packshots drawn by the built-in engine, plus the routes `named`:
    /// what a server without generator routes offers (tests, tools).
    pub fn builtin_packshots(named: Vec<EngineChoice>) -> EngineAvailability {
        let mut kinds = BTreeMap::new();
        kinds.insert(
            JobType::CreatePackshot,
            KindEngines {
                named,
                auto: vec![crate::config::BUILTIN_ENGINE.to_string()],
            },
        );
        EngineAvailability { kinds }
    }

    /// The engines of `kind` (none configured: empty).
    pub fn of(&self, kind: JobType) -> KindEngines {
        self.kinds.get(&kind).cloned().unwrap_or_default()
    }

    /// Checks the engine a request names for `kind` (`field` is where the
    /// request put it): a name this server does not run for the kind, or
    /// `auto` when nothing draws the kind here, is a 400 that names what is
    /// missing. Admission refuses such a job before it is charged.
    pub fn check(&self, kind: JobType, model: EngineChoice, field: &str) -> Option<FieldError> {
        let engines = self.of(kind);
        let known = kind.engine_names();
        if model == EngineChoice::Auto {
            if engines.auto.is_empty() {
                return Some(FieldError::new(
                    field,
                    format!(
                        "no engine draws {kind} outputs on this server: the operator has not \
                         configured one (a generator route with inputs.{kind}, README \
                         \"Model containers (Cog)\")"
                    ),
                ));
            }
            return None;
        }
        if !known.contains(&model) {
            let names: Vec<&str> = std::iter::once("auto")
                .chain(known.iter().map(|e| e.as_str()))
                .collect();
            return Some(FieldError::new(
                field,
                format!(
                    "engine {} does not draw {kind} outputs; use one of: {}",
                    model.as_str(),
                    names.join(", ")
                ),
            ));
        }
        if !engines.named.contains(&model) {
            return Some(FieldError::new(
                field,
                format!(
                    "engine {} is not configured for {kind} on this server{}",
                    model.as_str(),
                    if engines.auto.is_empty() {
                        String::new()
                    } else {
                        "; use auto".to_string()
                    }
                ),
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_names_the_kind_and_the_engine() {
        let mut kinds = BTreeMap::new();
        kinds.insert(
            JobType::Flat2Model,
            KindEngines {
                named: vec![EngineChoice::Seedream],
                auto: vec!["seedream".into()],
            },
        );
        let a = EngineAvailability::new(kinds);
        assert_eq!(
            a.check(JobType::Flat2Model, EngineChoice::Auto, "options.model"),
            None
        );
        assert_eq!(
            a.check(JobType::Flat2Model, EngineChoice::Seedream, "options.model"),
            None
        );
        let e = a
            .check(
                JobType::Flat2Model,
                EngineChoice::NanoBananaPro,
                "options.model",
            )
            .expect("not configured");
        assert!(
            e.message
                .contains("nano_banana_pro is not configured for flat_2_model")
        );
        let e = a
            .check(JobType::Flat2Model, EngineChoice::Orbita, "options.model")
            .expect("not a flat-2-model engine");
        assert!(
            e.message
                .contains("use one of: auto, nano_banana_pro, seedream"),
            "{e:?}"
        );
        let e = a
            .check(JobType::CreatePackshot, EngineChoice::Auto, "options.model")
            .expect("nothing draws packshots in this set");
        assert!(
            e.message.contains("no engine draws create_packshot"),
            "{e:?}"
        );
        let b = EngineAvailability::builtin_packshots(vec![]);
        assert_eq!(
            b.check(JobType::CreatePackshot, EngineChoice::Auto, "options.model"),
            None
        );
    }
}
