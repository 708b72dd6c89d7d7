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
    about = "Self-hostable platform for AI fashion imagery jobs"
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
    let cfg = Config::load(cli.config.as_deref())?;
    let command = cli.command.unwrap_or(Command::Serve);
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
        Command::Config => unreachable!("handled above"),
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
