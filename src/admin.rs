//! `atelier admin …`: operator commands over the store. Output is one JSON
//! object per command on stdout, for scripts.

use anyhow::{Context, anyhow, bail};
use atelier_shared::config::Config;
use atelier_shared::db::Store;
use atelier_shared::db::accounts::{Account, NewAccount};
use atelier_shared::domain::{Credits, Plan};
use clap::Subcommand;
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Accounts.
    #[command(subcommand)]
    Account(AccountCmd),
    /// API keys.
    #[command(subcommand)]
    Key(KeyCmd),
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
        identity_code: String,
        #[arg(long, value_parser = plan_arg)]
        tier: Plan,
        #[arg(long)]
        gender: Option<String>,
        #[arg(long)]
        age: Option<u16>,
    },
    /// Makes a platform identity its owner's own again.
    Unplatform { identity_code: String },
}

/// `--plan`: a plan name (`standard`, `enterprise`).
fn plan_arg(s: &str) -> Result<Plan, String> {
    Plan::parse(s).ok_or_else(|| {
        let names: Vec<&str> = Plan::ALL.iter().map(|p| p.as_str()).collect();
        format!("must be one of {}", names.join(", "))
    })
}

#[derive(Debug, Subcommand)]
pub enum AccountCmd {
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = Plan::Standard, value_parser = plan_arg)]
        plan: Plan,
        /// Credits granted at creation.
        #[arg(long, default_value_t = 0.0)]
        credits: f64,
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
    Policy {
        /// Account id or name.
        #[arg(long)]
        account: String,
        #[arg(long, value_parser = plan_arg)]
        plan: Option<Plan>,
        #[arg(long, value_parser = ["1K", "2K", "4K"])]
        max_size: Option<String>,
        #[arg(long)]
        custom_dimensions: Option<bool>,
    },
    Show {
        #[arg(long)]
        account: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    Create {
        #[arg(long)]
        account: String,
        #[arg(long, default_value = "cli")]
        name: String,
        /// Lifetime in days; none: no expiry.
        #[arg(long)]
        expires_days: Option<u32>,
    },
    Revoke {
        #[arg(long)]
        account: String,
        #[arg(long)]
        key_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCmd {
    /// Add (or, negative, remove) credits; recorded in the ledger.
    Grant {
        #[arg(long)]
        account: String,
        #[arg(long, allow_hyphen_values = true)]
        amount: f64,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        owner: String,
        /// Members spend the owner's credits.
        #[arg(long)]
        shared_billing: bool,
    },
    AddMember {
        #[arg(long)]
        group: String,
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
        AdminCommand::Presets(PresetsCmd::Import { file }) => import_presets(cfg, &store, &file).await?,
        AdminCommand::Identities(IdentitiesCmd::Platform {
            identity_code,
            tier,
            gender,
            age,
        }) => {
            let gender = gender.map(|g| g.trim().to_lowercase()).filter(|g| !g.is_empty());
            if !store
                .set_platform_identity(&identity_code, Some(tier.as_str()), gender.as_deref(), age.map(i64::from))
                .await?
            {
                bail!("no identity {identity_code}");
            }
            json!({"identity_code": identity_code, "visibility": "default", "tier": tier.as_str(), "gender": gender, "age": age})
        }
        AdminCommand::Identities(IdentitiesCmd::Unplatform { identity_code }) => {
            if !store.set_platform_identity(&identity_code, None, None, None).await? {
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
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let parsed: PresetFile = if file.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("{} is not a preset file", file.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("{} is not a preset file", file.display()))?
    };
    let engines = atelier_shared::domain::engines::EngineAvailability::builtin_packshots(Vec::new());
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
            bail!("preset {} names category {c}, which the file does not define", p.code);
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
