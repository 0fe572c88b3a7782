//! The command line: one binary, `pushoccurrence`, with a subcommand per job.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{DEFAULT_CONFIG_PATH, ENV_CONFIG_PATH, LogFormat};

/// Relays events from a PostgreSQL transactional outbox to RabbitMQ.
///
/// A row is marked transferred only after RabbitMQ confirms its message, so
/// nothing is lost through crashes, restarts or outages. Exit codes: 0 done,
/// 2 usage error, 69 a service is unavailable, 78 configuration or schema
/// error, 1 anything else.
#[derive(Debug, Parser)]
#[command(name = "pushoccurrence", version, about, long_about)]
pub struct Cli {
    /// The seed's JSON config file. Every key can be overridden by an
    /// environment variable PUSHOCCURRENCE_<KEY> (see the README).
    #[arg(long, global = true, env = ENV_CONFIG_PATH, default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log line format on stderr; overrides the config's log.format (and
    /// PUSHOCCURRENCE_LOG_FORMAT).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay events until SIGINT or SIGTERM. Applies the migrations first
    /// unless postgres.auto_migrate is false; waits for the services when
    /// they are down; on a signal finishes in-flight batches (bounded by
    /// relay.shutdown_grace_ms) and exits 0. A second signal exits at once.
    Run,
    /// Create the outbox schema, tables, indexes and the producer function
    /// push_occurrence() if absent; safe to run any number of times.
    Migrate,
    /// Validate the config, connect to both services, check the outbox
    /// schema and the queue declaration; one line per check, non-zero exit
    /// on the first failure.
    Check,
    /// Show the outbox's state: pending rows, the oldest one's age, parked
    /// rows, and rows transferred in the last minute and hour.
    Status,
    /// Write one test event through push_occurrence() (as a producer would,
    /// NOTIFY included) and print its id: a smoke test of the whole path.
    Send {
        /// The body, as text; converted to the body column's type.
        #[arg(default_value = r#"{"pushoccurrence": "test event"}"#)]
        body: String,
        /// The NOTIFY channel (default: the first of listener.channels).
        #[arg(long)]
        channel: Option<String>,
        /// The exchange (default: the configured route).
        #[arg(long)]
        exchange: Option<String>,
        /// The routing key (default: the configured route).
        #[arg(long)]
        routing_key: Option<String>,
    },
    /// List parked rows (bad input the relay gave up on): id, attempts,
    /// when it was parked and why, oldest first.
    Parked {
        /// The most rows to list (at least 1); the output says how many
        /// more there are.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
    /// Put parked rows back into the stream after fixing them; their
    /// attempt count starts again and running relays are woken. Each id
    /// not requeued is reported with why (malformed, not found, not
    /// parked, already transferred); exits 1 when none was requeued.
    Requeue {
        /// The message ids to requeue (a uuid in any spelling PostgreSQL
        /// reads: upper case, braces, without hyphens).
        #[arg(required_unless_present = "all")]
        ids: Vec<String>,
        /// Requeue every parked row.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Give up parked rows for good: each is marked transferred without
    /// being sent (it keeps its parked time and its last error, prefixed
    /// "discarded by an operator"), so the rows behind it in its ordering
    /// key go on. Each id not discarded is reported with why; exits 1 when
    /// none was discarded.
    Discard {
        /// The message ids to discard (a uuid in any spelling PostgreSQL
        /// reads).
        #[arg(required_unless_present = "all")]
        ids: Vec<String>,
        /// Discard every parked row.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}
