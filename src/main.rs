//! The `pushoccurrence` binary: parse the command line, set up logging,
//! run the subcommand, and turn its outcome into an exit code.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
use tracing_subscriber::prelude::*;

use pushoccurrence::cli::{Cli, Command};
use pushoccurrence::cmd::{self, Unavailable};
use pushoccurrence::config::{Config, LogFormat};
use pushoccurrence::db::migrate::MigrateError;
use pushoccurrence::db::outbox::{SchemaError, Settle};
use pushoccurrence::service::StartError;

/// sysexits: a service is unavailable.
const EX_UNAVAILABLE: u8 = 69;
/// sysexits: configuration error.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One crypto provider for every TLS connection (PostgreSQL and AMQP). It
    // fails only when a provider is already installed, which is as good.
    let _already_installed = rustls::crypto::ring::default_provider()
        .install_default()
        .is_err();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    init_logging(cli.log_format.unwrap_or(config.log_format));
    for warning in &config.env_notes.warnings {
        tracing::warn!("{warning}");
    }
    for ignored in &config.env_notes.ignored {
        tracing::debug!("{ignored}");
    }
    let runtime = match pushoccurrence::service::runtime(config.worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(&cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", cmd::error_text(&error));
            ExitCode::from(exit_code(&error))
        }
    }
}

async fn dispatch(cli: &Cli, config: Config) -> anyhow::Result<()> {
    match cli.command {
        Command::Run => cmd::run(config).await,
        Command::Migrate => cmd::migrate(config).await,
        Command::Check => cmd::check(config, &cli.config.display().to_string()).await,
        Command::Status => cmd::status(config).await,
        Command::Send {
            ref body,
            ref channel,
            ref exchange,
            ref routing_key,
        } => {
            let route = cmd::SendRoute {
                channel: channel.clone(),
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
            };
            cmd::send(config, body, route).await
        }
        Command::Parked { limit } => cmd::parked(config, limit).await,
        Command::Requeue { ref ids, all } => {
            cmd::settle_parked(config, ids, all, Settle::Requeue).await
        }
        Command::Discard { ref ids, all } => {
            cmd::settle_parked(config, ids, all, Settle::Discard).await
        }
    }
}

fn exit_code(error: &anyhow::Error) -> u8 {
    // Config errors never get here: the config is loaded (and exits 78)
    // before the command runs.
    if error.is::<SchemaError>() || error.is::<MigrateError>() || error.is::<StartError>() {
        EX_CONFIG
    } else if error.is::<Unavailable>() {
        EX_UNAVAILABLE
    } else {
        1
    }
}

/// Logs go to stderr, filtered by RUST_LOG (default `info`). The client
/// libraries are capped at INFO whatever RUST_LOG says: lapin logs the AMQP
/// password at TRACE, tokio-postgres logs statement parameters (bodies) at
/// DEBUG, and lapin logs returned messages with their body at WARN. Their
/// ERROR lines are dropped: lapin writes several for every failed reconnect
/// ("Connection closed", "... aborting recovery"), operators alert on
/// ERROR, and the relay logs each outage once itself.
fn init_logging(format: LogFormat) {
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let cap = filter_fn(|meta| {
        let target = meta.target();
        if target.starts_with("lapin::returned_messages") {
            return *meta.level() <= Level::ERROR;
        }
        if target.starts_with("lapin")
            || target.starts_with("amq_protocol")
            || target.starts_with("tokio_postgres")
        {
            // lapin reports our own orderly close as a connection error.
            return *meta.level() <= Level::INFO
                && *meta.level() > Level::ERROR
                && !pushoccurrence::shutdown::is_closing();
        }
        true
    });
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => layer.with_ansi(std::io::stderr().is_terminal()).boxed(),
        // Flattened, so a line reads {"timestamp", "level", "message", ...fields}.
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(env.and(cap)))
        .init();
}
