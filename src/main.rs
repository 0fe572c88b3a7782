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
use pushoccurrence::config::{Config, ConfigError};
use pushoccurrence::db::{migrate::MigrateError, outbox::SchemaError};
use pushoccurrence::service::StartError;

/// sysexits: a service is unavailable.
const EX_UNAVAILABLE: u8 = 69;
/// sysexits: configuration error.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(exit_code(&error))
        }
    }
}

async fn dispatch(cli: &Cli) -> anyhow::Result<()> {
    let config = Config::load(&cli.config)?;
    match cli.command {
        Command::Run => cmd::run(config).await,
        Command::Migrate => cmd::migrate(config).await,
        Command::Check => cmd::check(config, &cli.config.display().to_string()).await,
        Command::Parked { limit } => cmd::parked(config, limit).await,
        Command::Requeue { ref ids, all } => cmd::requeue(config, ids, all).await,
    }
}

fn exit_code(error: &anyhow::Error) -> u8 {
    if error.is::<ConfigError>()
        || error.is::<SchemaError>()
        || error.is::<MigrateError>()
        || error.is::<StartError>()
    {
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
/// DEBUG, and lapin logs returned messages with their body at WARN.
fn init_logging() {
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
            return *meta.level() <= Level::INFO && !pushoccurrence::shutdown::is_closing();
        }
        true
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(env.and(cap)),
        )
        .init();
}
