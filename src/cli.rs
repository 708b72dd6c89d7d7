//! Command line: `atelier [--config FILE] <command>`; `serve` by default.

use crate::app::{self, Roles};
use anyhow::Context;
use atelier_shared::config::Config;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "atelier",
    version,
    about = "Self-hostable platform for AI fashion imagery jobs",
    after_help = "User commands (packshot, swap, jobs, identities) exit with 0 when done, 1 when a \
job or output failed, 2 on bad usage or a local file problem, 3 when the API refused a request, \
4 when the server could not be reached, 5 when --timeout passed."
)]
pub struct Cli {
    /// TOML configuration file (defaults → this file → ATELIER_* environment).
    #[arg(long, global = true, env = "ATELIER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every role in one process (the default).
    Serve,
    /// Only the HTTP API.
    Api,
    /// Only the scheduler (outbox relay, dispatch, settlement).
    Scheduler,
    /// Only a worker.
    Worker,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the effective configuration with secrets redacted.
    Config,
    /// Operator commands: accounts, API keys, groups, credits.
    #[command(subcommand)]
    Admin(crate::admin::AdminCommand),
    /// Model files shared through the object store.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Create packshots of garment photos, follow them and save the results
    /// (a client of the API: ATELIER_URL, ATELIER_API_KEY).
    Packshot(crate::client::commands::PackshotArgs),
    /// Put an identity into photos of worn garments and save the results.
    Swap(crate::client::commands::SwapArgs),
    /// Your jobs: ls, status, results, watch, abort, download.
    Jobs(crate::client::commands::JobsArgs),
    /// Your identities: ls, upload, rm.
    Identities(crate::client::commands::IdentitiesArgs),
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Upload the model files this configuration loads from `models.dir` to
    /// the object store's `models/` prefix, where workers pull them from.
    Push,
    /// List the model files this configuration loads and where they are.
    List,
}

async fn models(cfg: &Config, cmd: ModelsCommand) -> anyhow::Result<()> {
    use atelier_worker::model_store;
    let objects = app::open_objects(&cfg.targets()?.storage).await?;
    let files = model_store::needed_files(cfg);
    match cmd {
        ModelsCommand::Push => {
            let done = model_store::push(objects.as_ref(), &cfg.models.dir, &files).await?;
            for (f, n) in &done {
                println!("pushed {}{f} ({n} bytes)", model_store::PREFIX);
            }
            let missing: Vec<_> = files
                .iter()
                .filter(|f| !done.iter().any(|(d, _)| d == *f))
                .collect();
            if !missing.is_empty() {
                println!("not under {}: {missing:?}", cfg.models.dir.display());
            }
        }
        ModelsCommand::List => {
            for f in &files {
                let local = cfg.models.dir.join(f).exists();
                let stored = objects
                    .size(&format!("{}{f}", model_store::PREFIX))
                    .await?
                    .is_some();
                println!("{f}\tlocal: {local}\tobject store: {stored}");
            }
        }
    }
    Ok(())
}

pub async fn main(cli: Cli) -> anyhow::Result<()> {
    use crate::client::commands;
    // The user commands are clients: no server configuration.
    let command = match cli.command.unwrap_or(Command::Serve) {
        Command::Packshot(a) => return commands::packshot(a).await,
        Command::Swap(a) => return commands::swap(a).await,
        Command::Jobs(a) => return commands::jobs(a).await,
        Command::Identities(a) => return commands::identities(a).await,
        other => other,
    };
    let cfg = Config::load(cli.config.as_deref())?;
    if matches!(command, Command::Config) {
        print!(
            "{}",
            toml::to_string_pretty(&cfg.redacted()).context("cannot render the configuration")?
        );
        return Ok(());
    }
    let service = match command {
        Command::Api => "atelier-api",
        Command::Scheduler => "atelier-scheduler",
        Command::Worker => "atelier-worker",
        _ => "atelier",
    };
    // Flushes buffered spans when main returns.
    let _traces = atelier_shared::telemetry::init_tracing(&cfg.log, service);
    let roles = match command {
        Command::Serve => Roles::ALL,
        Command::Api => Roles::API,
        Command::Scheduler => Roles::SCHEDULER,
        Command::Worker => Roles::WORKER,
        Command::Migrate => {
            let store = atelier_shared::db::Store::connect(&cfg.database_url(), 2).await?;
            store.migrate().await?;
            println!("migrations applied");
            return Ok(());
        }
        Command::Admin(a) => return crate::admin::run(&cfg, a).await,
        Command::Models(m) => return models(&cfg, m).await,
        Command::Config
        | Command::Packshot(_)
        | Command::Swap(_)
        | Command::Jobs(_)
        | Command::Identities(_) => unreachable!("handled above"),
    };
    let shutdown = CancellationToken::new();
    let running = app::start(cfg, roles, shutdown.clone()).await?;
    println!("atelier listening on http://{}", running.addr);
    if let Some(admin) = running.admin_addr {
        println!("atelier operations (/healthz, /metrics) on http://{admin}");
    }
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; draining");
        signal.cancel();
    });
    running.wait().await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
