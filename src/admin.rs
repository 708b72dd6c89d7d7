//! `atelier admin …`: operator commands over the store. Output is one JSON
//! object per command on stdout, for scripts.

use anyhow::{Context, anyhow, bail};
use atelier_shared::config::Config;
use atelier_shared::db::Store;
use atelier_shared::db::accounts::{Account, NewAccount};
use atelier_shared::domain::{Credits, Plan};
use atelier_shared::queue::dead;
use clap::Subcommand;
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Accounts: list, create, change the policy of, show.
    #[command(subcommand, alias = "accounts")]
    Account(AccountCmd),
    /// API keys: list (never the secret), create, revoke.
    #[command(subcommand, alias = "keys")]
    Key(KeyCmd),
    /// Jobs: everything the store knows about one.
    #[command(subcommand, alias = "job")]
    Jobs(JobsCmd),
    /// Messages dead-lettered after too many deliveries (`<queue>.dead`):
    /// look at them, put them back.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCmd),
    /// Credits.
    #[command(subcommand)]
    Credits(CreditsCmd),
    /// Groups (sharing and shared billing).
    #[command(subcommand)]
    Group(GroupCmd),
    /// System presets and categories (readable by every account).
    #[command(subcommand)]
    Presets(PresetsCmd),
    /// Platform (`default`) identities.
    #[command(subcommand)]
    Identities(IdentitiesCmd),
    /// Check the credit invariants (reservations, ledger, active-job counts).
    Audit,
}

#[derive(Debug, Subcommand)]
pub enum PresetsCmd {
    /// Creates or replaces the system presets and categories of a JSON or
    /// TOML file (`presets/system.toml` is a starter set), by their stable
    /// `code` and `id`; each preset is checked like one sent to the API.
    Import {
        /// The JSON or TOML file.
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentitiesCmd {
    /// Offers an identity (uploaded and preprocessed by any account,
    /// usually the operator's) to every account whose plan reaches
    /// `--tier`, as a platform identity (`visibility: default`), with the
    /// person's description for the list filters. It can no longer be
    /// deleted or shared through the API.
    Platform {
        /// The identity's code.
        identity_code: String,
        /// The lowest plan that sees it (`standard`, `enterprise`).
        #[arg(long, value_parser = plan_arg)]
        tier: Plan,
        /// The person's gender, as the list filter matches it.
        #[arg(long)]
        gender: Option<String>,
        /// The person's age, as the list filters match it.
        #[arg(long)]
        age: Option<u16>,
    },
    /// Makes a platform identity its owner's own again.
    Unplatform {
        /// The identity's code.
        identity_code: String,
    },
}

/// `--plan`: a plan name (`standard`, `enterprise`).
fn plan_arg(s: &str) -> Result<Plan, String> {
    Plan::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Plan::ALL.iter().map(|p| p.as_str()).collect();
        format!("must be one of {}", names.join(", "))
    })
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCmd {
    /// How many messages each queue's dead-letter queue holds, and the
    /// first of them (reason, original queue, the task's job, output and
    /// attempt). They stay where they are.
    Ls {
        /// One queue (`packshot`, `swap`, `identity`, `generate`,
        /// `training`, `outcomes`, `scheduler`); default: every one.
        #[arg(long)]
        queue: Option<String>,
        /// Messages shown per queue at most.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Moves dead-lettered messages back to their queue, delivery count
    /// reset. A task whose attempt was superseded meanwhile is dropped by
    /// the worker that takes it; a report is applied as usual (every report
    /// is idempotent).
    Replay {
        /// The queue whose dead letters are replayed.
        #[arg(long)]
        queue: String,
        /// Messages replayed at most; default: all.
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCmd {
    /// The job, each of its outputs (every version, its attempt, lease and
    /// last error), its ledger rows and its trace id.
    Show {
        /// The job id (`job_…`).
        job_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountCmd {
    /// Every account, oldest first: plan, credits, reserved credits and
    /// active jobs.
    Ls {
        /// Accounts listed at most.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Accounts skipped first.
        #[arg(long, default_value_t = 0)]
        offset: u32,
    },
    /// Creates an account.
    Create {
        /// A unique name.
        #[arg(long)]
        name: String,
        /// `standard` or `enterprise`.
        #[arg(long, default_value_t = Plan::Standard, value_parser = plan_arg)]
        plan: Plan,
        /// Credits granted at creation.
        #[arg(long, default_value_t = 0.0)]
        credits: f64,
        /// Largest output size; default: `limits.default_max_size`.
        #[arg(long, value_parser = ["1K", "2K", "4K"])]
        max_size: Option<String>,
        /// Allow custom width/height (OUTPUT_CUSTOM_DIMENSIONS).
        #[arg(long)]
        custom_dimensions: bool,
        /// May call operator endpoints (POST /admin/credits/grants).
        #[arg(long)]
        operator: bool,
        /// Also issue an API key and print it (once).
        #[arg(long)]
        with_key: bool,
    },
    /// Changes an account's plan, largest size or custom dimensions.
    Policy {
        /// Account id or name.
        #[arg(long)]
        account: String,
        /// The new plan (`standard`, `enterprise`).
        #[arg(long, value_parser = plan_arg)]
        plan: Option<Plan>,
        /// The new largest output size.
        #[arg(long, value_parser = ["1K", "2K", "4K"])]
        max_size: Option<String>,
        /// Whether custom width/height are allowed.
        #[arg(long)]
        custom_dimensions: Option<bool>,
    },
    /// One account.
    Show {
        /// Account id or name.
        #[arg(long)]
        account: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Every key of an account, live, expired and revoked (ids, names and
    /// dates: a secret is never stored, so never shown).
    Ls {
        /// Account id or name.
        #[arg(long)]
        account: String,
    },
    /// Issues a key and prints it once.
    Create {
        /// Account id or name.
        #[arg(long)]
        account: String,
        /// A label for the key.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Lifetime in days; none: no expiry.
        #[arg(long)]
        expires_days: Option<u32>,
    },
    /// Revokes a key: new requests with it are refused at once, and its
    /// open event streams end within `notifications.auth_recheck_secs`.
    Revoke {
        /// Account id or name.
        #[arg(long)]
        account: String,
        /// The key's id (from `keys ls`).
        #[arg(long)]
        key_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCmd {
    /// Add (or, negative, remove) credits; recorded in the ledger.
    Grant {
        /// Account id or name.
        #[arg(long)]
        account: String,
        /// Credits to add; negative removes (never below what running jobs
        /// hold).
        #[arg(long, allow_hyphen_values = true)]
        amount: f64,
        /// Why, kept in the ledger.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Creates a group (for sharing identities and presets, and optionally
    /// billing).
    Create {
        /// A unique name.
        #[arg(long)]
        name: String,
        /// The owning account (id or name).
        #[arg(long)]
        owner: String,
        /// Members spend the owner's credits.
        #[arg(long)]
        shared_billing: bool,
    },
    /// Adds an account to a group.
    AddMember {
        /// The group's name.
        #[arg(long)]
        group: String,
        /// Account id or name.
        #[arg(long)]
        account: String,
    },
}

async fn find(store: &Store, id_or_name: &str) -> anyhow::Result<Account> {
    if let Some(a) = store.account(id_or_name).await? {
        return Ok(a);
    }
    store
        .account_by_name(id_or_name)
        .await?
        .ok_or_else(|| anyhow!("no account with id or name {id_or_name:?}"))
}

fn known_queue(name: &str) -> anyhow::Result<&'static str> {
    dead::known(name).map_err(anyhow::Error::msg)
}

/// The configured queue (`queue.url`): the broker, or the embedded queue in
/// the database.
async fn open_queue(
    cfg: &Config,
    store: &Store,
) -> anyhow::Result<atelier_shared::queue::DynQueue> {
    use atelier_shared::config::QueueTarget;
    let stop = tokio_util::sync::CancellationToken::new();
    Ok(match cfg.targets()?.queue {
        QueueTarget::Embedded => std::sync::Arc::new(
            atelier_shared::queue::embedded::EmbeddedQueue::new(store.clone(), stop),
        ),
        QueueTarget::Amqp { url, namespace } => std::sync::Arc::new(
            atelier_shared::queue::rabbitmq::RabbitQueue::connect(&url, &namespace, stop)
                .await
                .context("cannot reach the broker")?,
        ),
    })
}

/// A store timestamp (ms) as ISO 8601, or null.
fn iso(ms: Option<i64>) -> serde_json::Value {
    ms.map_or(serde_json::Value::Null, |ms| {
        json!(atelier_shared::time::iso8601(ms))
    })
}

/// `admin jobs show`: the job, its outputs and its ledger rows.
async fn job_report(store: &Store, job_id: &str) -> anyhow::Result<serde_json::Value> {
    let job = store
        .job(job_id)
        .await?
        .ok_or_else(|| anyhow!("no job {job_id:?}"))?;
    let outputs: Vec<_> = store
        .all_outputs(job_id)
        .await?
        .into_iter()
        .map(|o| {
            json!({
                "output_id": o.id, "instruction": o.instruction_index, "variation": o.variation_index,
                "version": o.version, "queue": o.queue.as_str(), "status": o.status.as_str(),
                "attempt": o.attempt, "max_attempts": o.max_attempts, "engine_index": o.engine_index,
                "model_used": o.model_used, "credits": Credits(o.cost).as_f64(),
                "lease_expires_at": iso(o.lease_expires_at), "processing_ms": o.processing_ms,
                "last_error": o.last_error, "error_message": o.error_message,
                "created_at": iso(Some(o.created_at)), "finalized_at": iso(o.finalized_at),
            })
        })
        .collect();
    let ledger: Vec<_> = store
        .job_ledger(job_id)
        .await?
        .into_iter()
        .map(|l| {
            json!({
                "id": l.id, "account_id": l.account_id, "output_id": l.output_id, "kind": l.kind,
                "credits": Credits(l.amount).as_f64(), "reason": l.reason,
                "at": iso(Some(l.created_at)),
            })
        })
        .collect();
    let trace_id = job
        .traceparent
        .as_deref()
        .and_then(atelier_shared::domain::trace::TraceParent::parse)
        .map(|t| t.trace_id_hex());
    Ok(json!({
        "job": {
            "job_id": job.id, "type": job.job_type.as_str(), "status": job.status.as_str(),
            "account_id": job.account_id, "billing_account_id": job.billing_account_id,
            "project_id": job.project_id, "outputs": job.total_outputs,
            "completed_outputs": job.completed_outputs, "failed_outputs": job.failed_outputs,
            "error_message": job.error_message,
            "credits_held": Credits(job.credits_held).as_f64(),
            "credits_charged": Credits(job.credits_charged).as_f64(),
            "waits_for": job.waits_for, "trace_id": trace_id,
            "created_at": iso(Some(job.created_at)), "finalized_at": iso(job.finalized_at),
        },
        "outputs": outputs,
        "ledger": ledger,
    }))
}

fn show(a: &Account) -> serde_json::Value {
    json!({
        "id": a.id, "name": a.name, "plan": a.plan, "max_size": a.max_size,
        "custom_dimensions": a.custom_dimensions == 1, "operator": a.is_operator == 1,
        "credits": Credits(a.balance).as_f64(), "reserved": Credits(a.reserved).as_f64(), "active_jobs": a.active_jobs,
    })
}

pub async fn run(cfg: &Config, cmd: AdminCommand) -> anyhow::Result<()> {
    let store = Store::connect(&cfg.database_url(), 2)
        .await
        .context("cannot open the database")?;
    store.migrate().await?;
    let out = match cmd {
        AdminCommand::Account(AccountCmd::Create {
            name,
            plan,
            credits,
            max_size,
            custom_dimensions,
            operator,
            with_key,
        }) => {
            let max_size = max_size.unwrap_or_else(|| cfg.limits.default_max_size.clone());
            let a = store
                .create_account(NewAccount {
                    name: &name,
                    plan,
                    max_size: &max_size,
                    custom_dimensions,
                    is_operator: operator,
                })
                .await
                .map_err(|e| match e {
                    atelier_shared::db::StoreError::Conflict(_) => {
                        anyhow!("an account named {name:?} already exists")
                    }
                    other => other.into(),
                })?;
            let amount = Credits::from_f64(credits)
                .ok_or_else(|| anyhow!("--credits must be a finite number"))?;
            if amount.0 < 0 {
                bail!("--credits must not be negative");
            }
            let a = if amount.0 > 0 {
                store
                    .grant_credits(&a.id, amount, "initial grant")
                    .await?
                    .unwrap_or(a)
            } else {
                a
            };
            let mut v = show(&a);
            if with_key {
                let (key_id, token) = store.create_api_key(&a.id, "cli", None, None).await?;
                v["key_id"] = json!(key_id);
                v["api_key"] = json!(token);
            }
            v
        }
        AdminCommand::Account(AccountCmd::Policy {
            account,
            plan,
            max_size,
            custom_dimensions,
        }) => {
            let a = find(&store, &account).await?;
            show(
                &store
                    .set_account_policy(&a.id, plan, max_size.as_deref(), custom_dimensions)
                    .await?,
            )
        }
        AdminCommand::Account(AccountCmd::Show { account }) => show(&find(&store, &account).await?),
        AdminCommand::Account(AccountCmd::Ls { limit, offset }) => {
            let accounts = store
                .accounts_page(i64::from(limit), i64::from(offset))
                .await?;
            json!({"accounts": accounts.iter().map(show).collect::<Vec<_>>()})
        }
        AdminCommand::Key(KeyCmd::Ls { account }) => {
            let a = find(&store, &account).await?;
            let now = atelier_shared::time::now_ms();
            let keys: Vec<_> = store
                .keys_of(&a.id)
                .await?
                .into_iter()
                .map(|k| {
                    let state = if k.revoked_at.is_some() {
                        "revoked"
                    } else if k.expires_at.is_some_and(|e| e <= now) {
                        "expired"
                    } else {
                        "live"
                    };
                    json!({
                        "key_id": k.id, "name": k.name, "state": state,
                        "created_at": iso(Some(k.created_at)), "expires_at": iso(k.expires_at),
                        "revoked_at": iso(k.revoked_at),
                    })
                })
                .collect();
            json!({"account_id": a.id, "keys": keys})
        }
        AdminCommand::Jobs(JobsCmd::Show { job_id }) => job_report(&store, &job_id).await?,
        AdminCommand::DeadLetters(DeadLettersCmd::Ls { queue, limit }) => {
            let q = open_queue(cfg, &store).await?;
            let names = match queue {
                Some(name) => vec![known_queue(&name)?],
                None => dead::queues(),
            };
            let mut queues = Vec::new();
            for name in names {
                let (depth, first) = dead::look(&q, name, limit).await?;
                queues.push(json!({"queue": name, "dead": depth, "first": first}));
            }
            json!({"queues": queues})
        }
        AdminCommand::DeadLetters(DeadLettersCmd::Replay { queue, limit }) => {
            let name = known_queue(&queue)?;
            let q = open_queue(cfg, &store).await?;
            let replayed = dead::replay(&q, name, limit).await?;
            json!({"queue": name, "replayed": replayed})
        }
        AdminCommand::Key(KeyCmd::Create {
            account,
            name,
            expires_days,
        }) => {
            let a = find(&store, &account).await?;
            let exp =
                expires_days.map(|d| atelier_shared::time::now_ms() + i64::from(d) * 86_400_000);
            let (key_id, token) = store.create_api_key(&a.id, &name, None, exp).await?;
            json!({"account_id": a.id, "key_id": key_id, "api_key": token, "note": "shown once; only a hash is stored"})
        }
        AdminCommand::Key(KeyCmd::Revoke { account, key_id }) => {
            let a = find(&store, &account).await?;
            if !store.revoke_api_key(&a.id, &key_id).await? {
                bail!("no live key {key_id} on account {}", a.name);
            }
            json!({"revoked": key_id})
        }
        AdminCommand::Credits(CreditsCmd::Grant {
            account,
            amount,
            reason,
        }) => {
            let a = find(&store, &account).await?;
            let amount = Credits::from_f64(amount)
                .ok_or_else(|| anyhow!("--amount must be a finite number"))?;
            let after = store
                .grant_credits(&a.id, amount, &reason)
                .await?
                .ok_or_else(|| {
                    anyhow!(
                        "refused: the balance would fall below the credits reserved by running jobs"
                    )
                })?;
            show(&after)
        }
        AdminCommand::Group(GroupCmd::Create {
            name,
            owner,
            shared_billing,
        }) => {
            let o = find(&store, &owner).await?;
            let id = store.create_group(&name, &o.id, shared_billing).await?;
            json!({"group_id": id, "name": name, "owner": o.id, "shared_billing": shared_billing})
        }
        AdminCommand::Group(GroupCmd::AddMember { group, account }) => {
            let a = find(&store, &account).await?;
            store
                .add_group_member(&group, &a.id)
                .await
                .map_err(|e| match e {
                    atelier_shared::db::StoreError::NotFound => anyhow!("no group named {group:?}"),
                    other => other.into(),
                })?;
            json!({"group": group, "member": a.id})
        }
        AdminCommand::Presets(PresetsCmd::Import { file }) => {
            import_presets(cfg, &store, &file).await?
        }
        AdminCommand::Identities(IdentitiesCmd::Platform {
            identity_code,
            tier,
            gender,
            age,
        }) => {
            let gender = gender
                .map(|g| g.trim().to_lowercase())
                .filter(|g| !g.is_empty());
            if !store
                .set_platform_identity(
                    &identity_code,
                    Some(tier.as_str()),
                    gender.as_deref(),
                    age.map(i64::from),
                )
                .await?
            {
                bail!("no identity {identity_code}");
            }
            json!({"identity_code": identity_code, "visibility": "default", "tier": tier.as_str(), "gender": gender, "age": age})
        }
        AdminCommand::Identities(IdentitiesCmd::Unplatform { identity_code }) => {
            if !store
                .set_platform_identity(&identity_code, None, None, None)
                .await?
            {
                bail!("no identity {identity_code}");
            }
            json!({"identity_code": identity_code, "visibility": "private"})
        }
        AdminCommand::Audit => {
            let problems = store.audit_credits().await?;
            let ok = problems.is_empty();
            println!("{}", json!({"ok": ok, "problems": problems}));
            if !ok {
                bail!("credit invariants violated");
            }
            return Ok(());
        }
    };
    println!("{out}");
    Ok(())
}

/// The import file: `[[categories]]` and `[[presets]]`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetFile {
    #[serde(default)]
    categories: Vec<ImportCategory>,
    #[serde(default)]
    presets: Vec<ImportPreset>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportCategory {
    id: String,
    name: String,
    description: Option<String>,
    thumbnail_url: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportPreset {
    code: String,
    name: String,
    #[serde(rename = "type")]
    preset_type: String,
    description: Option<String>,
    #[serde(default)]
    categories: Vec<String>,
    instruction_data: serde_json::Value,
}

async fn import_presets(
    cfg: &Config,
    store: &Store,
    file: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    use atelier_shared::domain::presets::{Checks, PresetType, check_instruction};
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let parsed: PresetFile = if file.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a preset file", file.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("{} is not a preset file", file.display()))?
    };
    let engines =
        atelier_shared::domain::engines::EngineAvailability::builtin_packshots(Vec::new());
    let policy = atelier_shared::domain::policy::ContentPolicy::new(&cfg.identity.blocked_terms);
    let checks = Checks {
        catalogue: &cfg.catalogue,
        engines: &engines,
        policy: &policy,
    };
    let ids: Vec<&str> = parsed.categories.iter().map(|c| c.id.as_str()).collect();
    // Everything is checked before anything is written.
    for p in &parsed.presets {
        let t = PresetType::parse(&p.preset_type)
            .ok_or_else(|| anyhow!("preset {}: unknown type {:?}", p.code, p.preset_type))?;
        if let Err(errs) = check_instruction(t, &p.instruction_data, &checks) {
            let why: Vec<String> = errs
                .iter()
                .map(|e| format!("{}: {}", e.field.as_deref().unwrap_or("-"), e.message))
                .collect();
            bail!("preset {}: {}", p.code, why.join("; "));
        }
        if let Some(c) = p.categories.iter().find(|c| !ids.contains(&c.as_str())) {
            bail!(
                "preset {} names category {c}, which the file does not define",
                p.code
            );
        }
    }
    let now = atelier_shared::time::now_ms();
    for c in &parsed.categories {
        store
            .put_system_category(&atelier_shared::db::presets::CategoryRow {
                id: c.id.clone(),
                owner_id: None,
                name: c.name.clone(),
                description: c.description.clone(),
                thumbnail_url: c.thumbnail_url.clone(),
                created_at: now,
                updated_at: now,
            })
            .await?;
    }
    for p in &parsed.presets {
        store
            .put_system_preset(
                &atelier_shared::db::presets::PresetRow {
                    code: p.code.clone(),
                    owner_id: None,
                    name: p.name.clone(),
                    description: p.description.clone(),
                    preset_type: p.preset_type.clone(),
                    instruction_data: p.instruction_data.to_string(),
                    created_at: now,
                    updated_at: now,
                },
                &p.categories,
            )
            .await?;
    }
    Ok(json!({"categories": parsed.categories.len(), "presets": parsed.presets.len()}))
}
