//! The job-kind seam. Every kind of job (a packshot, a model swap, an
//! identity's preprocessing, …) is one type implementing [`JobKind`], next
//! to its typed spec, and one line of [`job_kinds!`] below. From that line
//! come [`JobType`] (the name in rows, views and metrics), [`JobSpec`] (the
//! spec decoded once, at the edge: the HTTP body, the `jobs.spec` column or
//! a task message) and the dispatch of every per-kind rule. Strings exist
//! only at the edges; past them a kind is a type.
//!
//! What a kind declares, and who uses it:
//!
//! | item | used by |
//! |---|---|
//! | [`JobKind::NAME`] | rows (`jobs.job_type`), views, metrics |
//! | [`JobKind::QUEUE`] | the scheduler, which dispatches its outputs there; workers serving that queue |
//! | [`JobKind::plan`] (price rule) | admission: one output row per planned output, its cost reserved |
//! | [`JobKind::requirements`] (admission checks) | admission: files the caller must own, the identity it needs or builds |
//! | [`JobKind::COUNTS_AGAINST_CAP`] | admission and finalisation (the active-job slot) |
//! | the worker's handler | `atelier-worker`'s `jobs/` (one file per kind) |
//! | the HTTP route and result view | `atelier-api`'s `routes/` and `views` |

use super::credits::{Credits, PriceTable};
use super::packshot::{EngineChoice, ImageFormat, OutputSpec};
use super::task::WorkQueue;
use serde::de::{DeserializeOwned, Error as _};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt::Debug;

/// One kind of job. Implemented by a unit type next to the kind's spec.
pub trait JobKind: 'static {
    /// The kind's name on the wire and in rows (`create_packshot`).
    const NAME: &'static str;
    /// The work queue its tasks travel on.
    const QUEUE: WorkQueue;
    /// Whether its jobs hold one of the account's active-job slots while
    /// pending or processing (contract §1.9).
    const COUNTS_AGAINST_CAP: bool = true;
    /// Whether the platform runs it on its own behalf (tagging an upload):
    /// no notification or webhook tells of it and the caller's job list
    /// leaves it out.
    const QUIET: bool = false;
    /// The normalised, validated job: stored as `jobs.spec`, shown as
    /// `processing_options`, carried to the worker in every task.
    type Spec: Serialize + DeserializeOwned + Clone + Debug + PartialEq + Send + Sync;

    /// The price rule: every output the spec asks for, with its cost.
    fn plan(spec: &Self::Spec, prices: &PriceTable) -> Vec<PlannedOutput>;

    /// What admission checks and resolves inside the creating transaction.
    fn requirements(spec: &Self::Spec) -> Requirements<'_>;

    /// Whether the client asked for the post-processing pass.
    fn post_process(spec: &Self::Spec) -> bool;

    /// Whether an engine's refusal moves the output on to the next engine
    /// (the client let the server choose: `model: auto`) rather than
    /// failing it.
    fn engine_fallback(_spec: &Self::Spec) -> bool {
        false
    }

    /// The fields of one output a generator engine can be given (a Cog
    /// route maps them onto its container's inputs); empty for kinds no
    /// generator serves.
    const GENERATOR_FIELDS: &'static [&'static str] = &[];

    /// The engine names clients may send in `options.model` for this kind
    /// (besides `auto`).
    const ENGINE_NAMES: &'static [EngineChoice] = &[];

    /// Whether the built-in engine (`atelier` in `engines.auto`) draws
    /// this kind.
    const BUILTIN_ENGINE: bool = false;
}

/// One output a spec asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedOutput {
    pub instruction_index: u32,
    pub variation_index: u32,
    pub cost: Credits,
    pub format: ImageFormat,
}

/// The price rule of the instruction kinds: every instruction's
/// `num_variations` outputs, each priced by its size class (contract §3.4).
pub fn per_variation<'a>(
    instructions: impl IntoIterator<Item = (u32, &'a OutputSpec)>,
    prices: &PriceTable,
) -> Vec<PlannedOutput> {
    let mut v = Vec::new();
    for (i, (variations, output)) in instructions.into_iter().enumerate() {
        for var in 0..variations {
            v.push(PlannedOutput {
                instruction_index: i as u32,
                variation_index: var,
                cost: prices.price(output.size),
                format: output.format,
            });
        }
    }
    v
}

/// How a job relates to an identity (recorded in `jobs.identity_code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityUse<'a> {
    /// The job needs this identity of the caller, preprocessed: checked
    /// inside the admitting transaction with the identity row locked, so a
    /// concurrent delete either sees this job or makes admission fail. The
    /// face it has then is the one the job uses, whatever replaces it later.
    Ready(&'a str),
    /// The job preprocesses this identity (its row is written by the caller
    /// in the same transaction).
    Builds(&'a str),
}

impl<'a> IdentityUse<'a> {
    pub fn code(self) -> &'a str {
        match self {
            IdentityUse::Ready(c) | IdentityUse::Builds(c) => c,
        }
    }
}

/// The admission checks of a spec.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Requirements<'a> {
    /// Uploaded files that must be the caller's, in the order the job reads
    /// them; their object keys travel with every task.
    pub files: Vec<&'a str>,
    pub identity: Option<IdentityUse<'a>>,
    /// Profiles the job names (Studio): each must be the caller's and
    /// READY; their faces travel with every task.
    pub profiles: Vec<&'a str>,
}

/// Registers the kinds. One line per kind: `Variant => path::Kind`.
macro_rules! job_kinds {
    ($($variant:ident => $kind:ty),* $(,)?) => {
        /// The kind of a job, by name (`jobs.job_type`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum JobType {
            $($variant),*
        }

        impl JobType {
            pub const ALL: &'static [JobType] = &[$(JobType::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(JobType::$variant => <$kind as JobKind>::NAME),*
                }
            }

            /// The work queue that carries this kind's tasks.
            pub fn queue(self) -> WorkQueue {
                match self {
                    $(JobType::$variant => <$kind as JobKind>::QUEUE),*
                }
            }

            /// What a generator engine can be given for one output.
            pub fn generator_fields(self) -> &'static [&'static str] {
                match self {
                    $(JobType::$variant => <$kind as JobKind>::GENERATOR_FIELDS),*
                }
            }

            /// The engine names clients may send for this kind.
            pub fn engine_names(self) -> &'static [EngineChoice] {
                match self {
                    $(JobType::$variant => <$kind as JobKind>::ENGINE_NAMES),*
                }
            }

            /// Whether the built-in engine draws this kind.
            pub fn builtin_engine(self) -> bool {
                match self {
                    $(JobType::$variant => <$kind as JobKind>::BUILTIN_ENGINE),*
                }
            }

            /// Whether the platform runs this kind on its own behalf
            /// (nothing notifies of it; job lists leave it out).
            pub fn quiet(self) -> bool {
                match self {
                    $(JobType::$variant => <$kind as JobKind>::QUIET),*
                }
            }

            /// Whether jobs of this kind count against the account's
            /// active-job cap (contract §1.9, §11 #5).
            pub fn counts_against_cap(self) -> bool {
                match self {
                    $(JobType::$variant => <$kind as JobKind>::COUNTS_AGAINST_CAP),*
                }
            }
        }

        /// A job's typed spec, one variant per kind.
        #[derive(Debug, Clone, PartialEq)]
        pub enum JobSpec {
            $($variant(<$kind as JobKind>::Spec)),*
        }

        $(
            impl From<<$kind as JobKind>::Spec> for JobSpec {
                fn from(spec: <$kind as JobKind>::Spec) -> JobSpec {
                    JobSpec::$variant(spec)
                }
            }
        )*

        impl JobSpec {
            pub fn job_type(&self) -> JobType {
                match self {
                    $(JobSpec::$variant(_) => JobType::$variant),*
                }
            }

            /// Decodes the stored spec of a job of kind `t`.
            pub fn from_value(t: JobType, v: serde_json::Value) -> Result<JobSpec, serde_json::Error> {
                Ok(match t {
                    $(JobType::$variant => JobSpec::$variant(serde_json::from_value(v)?)),*
                })
            }

            /// The spec alone, as stored in `jobs.spec` and shown as
            /// `processing_options`.
            pub fn to_value(&self) -> Result<serde_json::Value, serde_json::Error> {
                match self {
                    $(JobSpec::$variant(s) => serde_json::to_value(s)),*
                }
            }

            pub fn plan(&self, prices: &PriceTable) -> Vec<PlannedOutput> {
                match self {
                    $(JobSpec::$variant(s) => <$kind as JobKind>::plan(s, prices)),*
                }
            }

            pub fn requirements(&self) -> Requirements<'_> {
                match self {
                    $(JobSpec::$variant(s) => <$kind as JobKind>::requirements(s)),*
                }
            }

            pub fn post_process(&self) -> bool {
                match self {
                    $(JobSpec::$variant(s) => <$kind as JobKind>::post_process(s)),*
                }
            }

            pub fn engine_fallback(&self) -> bool {
                match self {
                    $(JobSpec::$variant(s) => <$kind as JobKind>::engine_fallback(s)),*
                }
            }

            fn serialize_spec<S: SerializeStruct>(&self, m: &mut S) -> Result<(), S::Error> {
                match self {
                    $(JobSpec::$variant(s) => m.serialize_field("spec", s)),*
                }
            }
        }
    };
}

job_kinds! {
    CreatePackshot => super::packshot::CreatePackshot,
    ModelSwap => super::swap::ModelSwap,
    IdentityPreprocessing => super::identity::IdentityPreprocessing,
    Flat2Model => super::flat::Flat2Model,
    IdentityCreation => super::drafts::IdentityCreation,
    Studio => super::studio::Studio,
    StudioRestore => super::studio::StudioRestore,
    Training => super::training::Training,
    Prediction => super::prediction::Prediction,
    PresetExtraction => super::extraction::PresetExtraction,
    AssetTagging => super::assets::AssetTagging,
}

impl JobType {
    pub fn parse(s: &str) -> Option<JobType> {
        JobType::ALL.iter().copied().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for JobType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reading an unknown kind from a row is an error, never a default.
impl TryFrom<String> for JobType {
    type Error = super::UnknownName;

    fn try_from(s: String) -> Result<JobType, Self::Error> {
        JobType::parse(&s).ok_or(super::UnknownName {
            what: "job type",
            name: s,
        })
    }
}

impl Serialize for JobType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for JobType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<JobType, D::Error> {
        let s = String::deserialize(d)?;
        JobType::try_from(s).map_err(D::Error::custom)
    }
}

/// In the OpenAPI document: the names of the registered kinds.
impl utoipa::PartialSchema for JobType {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("The job's kind"))
            .enum_values(Some(JobType::ALL.iter().map(|t| t.as_str())))
            .into()
    }
}

impl utoipa::ToSchema for JobType {}

/// In task messages: `{"job_type": "model_swap", "spec": {…}}`.
impl Serialize for JobSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_struct("JobSpec", 2)?;
        m.serialize_field("job_type", &self.job_type())?;
        self.serialize_spec(&mut m)?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for JobSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<JobSpec, D::Error> {
        #[derive(Deserialize)]
        struct Tagged {
            job_type: JobType,
            spec: serde_json::Value,
        }
        let t = Tagged::deserialize(d)?;
        JobSpec::from_value(t.job_type, t.spec).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let mut names: Vec<&str> = JobType::ALL.iter().map(|t| t.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), JobType::ALL.len());
        for t in JobType::ALL {
            assert_eq!(JobType::try_from(t.as_str().to_string()), Ok(*t));
            assert_eq!(
                serde_json::from_value::<JobType>(serde_json::json!(t.as_str())).ok(),
                Some(*t)
            );
        }
        assert!(JobType::try_from("create_packshots".to_string()).is_err());
    }
}
