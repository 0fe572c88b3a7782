//! Configuration: the seed's `config/config.json`, optional extensions with
//! defaults, environment overrides, and validation into typed settings.
//!
//! Loading has two phases. The file is read into JSON, environment variables
//! from [`ENV_KEYS`] are laid over it, and the result is deserialized into
//! `Raw*` structs that reject unknown keys. [`Config::from_raw`] then checks
//! every value and produces the typed [`Config`] the rest of the relay uses.
//! Every error names the key (and the environment variable when one was
//! involved); passwords are held in [`Secret`] and never printed. No error
//! quotes a secret, for any input: a secret key of the wrong type gets a
//! message without its value, URLs are redacted over-eagerly
//! ([`redact_url`]), and every message is scrubbed of the secret values in
//! effect, in case a library's text quotes one.
//!
//! Unknown `PUSHOCCURRENCE_*` variables never stop the relay: Kubernetes
//! injects service links (`PUSHOCCURRENCE_PORT=tcp://…`,
//! `PUSHOCCURRENCE_SERVICE_HOST`, …) for a Service named `pushoccurrence`,
//! and those are ignored ([`is_service_link`]); anything else unknown is a
//! warning, except a likely misspelling of a real setting, which is an
//! error naming the setting meant (the operator thinks it took effect).
//!
//! This is the only module that reads the process environment.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

mod routing;

pub use routing::{BindingConfig, ExchangeConfig, QueueConfig, Route};

/// Prefix of every environment variable the relay reads.
pub const ENV_PREFIX: &str = "PUSHOCCURRENCE_";
/// Environment variable naming the config file (read by the CLI).
pub const ENV_CONFIG_PATH: &str = "PUSHOCCURRENCE_CONFIG";
/// Default config file path, as in the seed.
pub const DEFAULT_CONFIG_PATH: &str = "config/config.json";

/// The longest identifier PostgreSQL keeps (NAMEDATALEN - 1).
const PG_MAX_IDENTIFIER: usize = 63;
/// The longest AMQP short string (queue names, message ids).
pub const AMQP_MAX_SHORT_STRING: usize = 255;

/// How an environment value is turned into JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvKind {
    /// Taken as it is.
    Text,
    /// Taken as it is, and may also come from a file named by `<VAR>_FILE`.
    Secret,
    /// A JSON number.
    Number,
    /// A JSON number, or several separated by commas (kept as text, read by
    /// the key's own parser): `postgres.port` with one port per host.
    NumberOrList,
    /// `true` or `false`.
    Bool,
    /// A comma-separated list of strings.
    List,
    /// A comma-separated list of secrets, which may also come from a file
    /// named by `<VAR>_FILE`.
    SecretList,
}

impl EnvKind {
    fn is_secret(self) -> bool {
        matches!(self, Self::Secret | Self::SecretList)
    }
}

/// Every config key that can be set from the environment, with its kind.
/// The variable name is `PUSHOCCURRENCE_` + the key in upper case with `.`
/// replaced by `_` (see [`env_name`]).
pub const ENV_KEYS: &[(&str, EnvKind)] = &[
    ("postgres.host", EnvKind::Text),
    ("postgres.port", EnvKind::NumberOrList),
    ("postgres.database", EnvKind::Text),
    ("postgres.user", EnvKind::Text),
    ("postgres.password", EnvKind::Secret),
    ("postgres.ssl_mode", EnvKind::Text),
    ("postgres.ssl_root_cert", EnvKind::Text),
    ("postgres.schema", EnvKind::Text),
    ("postgres.auto_migrate", EnvKind::Bool),
    ("postgres.application_name", EnvKind::Text),
    ("postgres.connect_timeout_sec", EnvKind::Number),
    ("postgres.query_timeout_ms", EnvKind::Number),
    ("postgres.pooler", EnvKind::Text),
    ("rabbitmq.url", EnvKind::Secret),
    ("rabbitmq.urls", EnvKind::SecretList),
    ("rabbitmq.shuffle_urls", EnvKind::Bool),
    ("rabbitmq.connection_name", EnvKind::Text),
    ("rabbitmq.ca_file", EnvKind::Text),
    ("rabbitmq.queue.name", EnvKind::Text),
    ("rabbitmq.queue.durable", EnvKind::Bool),
    ("rabbitmq.queue.auto_delete", EnvKind::Bool),
    ("rabbitmq.queue.exclusive", EnvKind::Bool),
    ("rabbitmq.queue.no_wait", EnvKind::Bool),
    ("rabbitmq.queue.allow_unsafe", EnvKind::Bool),
    ("rabbitmq.queue.passive", EnvKind::Bool),
    ("rabbitmq.exchange", EnvKind::Text),
    ("rabbitmq.routing_key", EnvKind::Text),
    ("rabbitmq.retry.buffer_size", EnvKind::Number),
    ("rabbitmq.retry.retry_delay_sec", EnvKind::Number),
    ("rabbitmq.retry.idle_sleep_ms", EnvKind::Number),
    ("listener.channels", EnvKind::List),
    ("listener.host", EnvKind::Text),
    ("listener.port", EnvKind::NumberOrList),
    ("relay.batch_size", EnvKind::Number),
    ("relay.confirm_timeout_ms", EnvKind::Number),
    ("relay.shutdown_grace_ms", EnvKind::Number),
    ("relay.max_retry_delay_sec", EnvKind::Number),
    ("relay.max_attempts", EnvKind::Number),
    ("relay.attempt_delay_ms", EnvKind::Number),
    ("relay.max_message_bytes", EnvKind::Number),
    ("relay.max_batch_bytes", EnvKind::Number),
    ("log.format", EnvKind::Text),
    ("admin.listen", EnvKind::Text),
    ("admin.stall_after_sec", EnvKind::Number),
    ("retention.transferred_after_sec", EnvKind::Number),
    ("retention.batch_size", EnvKind::Number),
    ("retention.interval_sec", EnvKind::Number),
];

/// The environment variable that overrides `key`.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "_").to_uppercase())
}

/// A configuration problem; the message names the key and what is expected.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }

    /// The message with every occurrence of a secret replaced by `***`,
    /// longest first so a part never uncovers the rest of a whole.
    fn scrubbed(self, secrets: &[String]) -> Self {
        let mut secrets: Vec<&String> = secrets.iter().filter(|s| !s.is_empty()).collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut msg = self.0;
        for secret in secrets {
            if msg.contains(secret.as_str()) {
                msg = msg.replace(secret.as_str(), "***");
            }
        }
        Self(msg)
    }
}

/// The keys whose values are secret (and their environment forms).
const SECRET_KEYS: [&str; 3] = ["postgres.password", "rabbitmq.url", "rabbitmq.urls"];

/// Whether serde's error path `path` is `key` or inside it.
fn is_at_or_under(path: &str, key: &str) -> bool {
    path.strip_prefix(key)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// What must never be printed of the secret keys' values in `json`: each
/// value as the text serde would quote (any JSON type), and for a URL also
/// its user info's password, raw and percent-decoded.
fn secret_values(json: &Value) -> Vec<String> {
    fn leaves(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Null => {}
            Value::String(s) => out.extend(url_secrets(s)),
            Value::Array(items) => items.iter().for_each(|v| leaves(v, out)),
            Value::Object(map) => map.values().for_each(|v| leaves(v, out)),
            other => out.push(other.to_string()),
        }
    }
    let mut out = Vec::new();
    for key in SECRET_KEYS {
        let value = key.split('.').try_fold(json, |node, part| node.get(part));
        if let Some(value) = value {
            leaves(value, &mut out);
        }
    }
    out
}

/// A secret string and, when it looks like a URL with user info, the
/// password in it (what [`redact_url`] hides), raw and percent-decoded.
fn url_secrets(value: &str) -> Vec<String> {
    let mut out = vec![value.to_owned()];
    if let Some((_, _, password)) = split_userinfo(value) {
        out.push(password.to_owned());
        out.push(percent_decode(password));
    }
    out
}

/// A string that must never be printed: `Debug` and `Display` show `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret value, for the one place that hands it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL side.
    pub postgres: PostgresConfig,
    /// RabbitMQ side.
    pub rabbitmq: RabbitConfig,
    /// NOTIFY channels to LISTEN on.
    pub channels: Vec<String>,
    /// Batching, timeouts and the in-flight window.
    pub relay: RelayConfig,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Where the admin HTTP endpoint listens; `None` turns it off.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// `admin.listen` was set (file or environment), so an address that
    /// cannot be bound stops `run`. Unset, the default address is best
    /// effort: several instances on one host from the seed's file (which has
    /// no admin section) all relay, the first one serving the endpoint.
    pub admin_required: bool,
    /// How long claimable rows may wait with no batch committed (or every
    /// claim may fail) before `/readyz` reports the relay stalled.
    pub stall_after: Duration,
    /// Deletion of old transferred rows; `None` keeps them forever.
    pub retention: Option<RetentionConfig>,
    /// What the environment held that is not a setting (logged once
    /// logging is set up, which needs the config first).
    pub env_notes: EnvNotes,
}

/// `PUSHOCCURRENCE_*` variables that are not settings and were left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvNotes {
    /// Unknown variables, each with why it is ignored: logged as WARN.
    pub warnings: Vec<String>,
    /// Kubernetes service links and the like: logged at DEBUG.
    pub ignored: Vec<String>,
}

/// Which transferred rows are deleted, and how gently.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Rows transferred longer ago than this are deleted, with their bodies.
    pub transferred_after: Duration,
    /// Rows deleted per transaction.
    pub batch_size: i64,
    /// Pause between deletion runs.
    pub interval: Duration,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// One PostgreSQL server the relay may open sessions to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgServer {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// How to reach PostgreSQL and where the outbox lives.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// The servers of `postgres.host` and `postgres.port`, in the configured
    /// order; every session goes to the first that accepts writes (libpq's
    /// `target_session_attrs=read-write`), so after a failover the relay
    /// follows the new primary.
    pub servers: Vec<PgServer>,
    /// Database name.
    pub database: String,
    /// Login role.
    pub user: String,
    /// Password, if the server asks for one.
    pub password: Option<Secret>,
    /// TLS mode.
    pub ssl_mode: SslMode,
    /// The TLS connector built from `ssl_mode` and `postgres.ssl_root_cert`
    /// (the CA certificates the server's certificate must chain to).
    pub tls: crate::db::tls::Connector,
    /// Schema holding the two outbox tables.
    pub schema: String,
    /// Whether `run` applies the migrations at start.
    pub auto_migrate: bool,
    /// `application_name` of every session the relay opens.
    pub application_name: String,
    /// Limit on establishing one connection.
    pub connect_timeout: Duration,
    /// Limit on any one statement's round trip; a stalled link is dropped
    /// and replaced after it.
    pub query_timeout: Duration,
    /// What stands between the relay and PostgreSQL (`postgres.pooler`).
    pub pooler: Pooler,
    /// Where the listener connects when not through `host`/`port`
    /// (`listener.host`, `listener.port`): LISTEN needs a session of its
    /// own, which a transaction pooler cannot give. Several servers as for
    /// `host` (a primary and its standby), tried in order for the one that
    /// accepts writes.
    pub listener_servers: Option<Vec<PgServer>>,
}

impl PostgresConfig {
    /// The configuration of the listener's session: `listener.host` and
    /// `listener.port` where given (a direct connection past a pooler).
    /// `listener.host` names its servers as `host` does (each on
    /// `listener.port`, one for all or one per host, else on the first
    /// server's port); `listener.port` alone moves the servers to that
    /// port (or to one port each).
    pub fn for_listener(&self) -> Self {
        let mut pg = self.clone();
        if let Some(servers) = &self.listener_servers {
            pg.servers.clone_from(servers);
        }
        pg
    }

    /// Where session-level work connects (migrations with their advisory
    /// lock, the start-up catalog reads, retention, operator commands):
    /// behind a transaction pooler, the listener's direct connection when
    /// one is configured; the regular address otherwise.
    pub fn for_session_work(&self) -> Self {
        if self.pooler == Pooler::Transaction && self.listener_is_direct() {
            self.for_listener()
        } else {
            self.clone()
        }
    }

    /// Whether the listener has a connection of its own (`listener.host`
    /// or `listener.port`).
    pub fn listener_is_direct(&self) -> bool {
        self.listener_servers.is_some()
    }
}

/// What stands between the relay and PostgreSQL, as `postgres.pooler` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooler {
    /// A direct connection (or a pooler in session mode: the same to the relay).
    None,
    /// A pooler that gives each client a server session for its whole
    /// connection (PgBouncer `pool_mode = session`).
    Session,
    /// A pooler that gives each transaction any server session (PgBouncer
    /// `pool_mode = transaction`): no session state survives a
    /// transaction, so the claim session's settings are set in every
    /// transaction and no statement is prepared by name.
    Transaction,
}

impl Pooler {
    /// The word `postgres.pooler` takes for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

/// The libpq `sslmode` words the seed's `ssl_mode` key takes (see
/// `db::tls` for what each checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, plain TCP otherwise.
    Prefer,
    /// TLS always.
    Require,
    /// TLS, and the certificate chains to `ssl_root_cert`.
    VerifyCa,
    /// TLS, the certificate chains to `ssl_root_cert` and names the host.
    VerifyFull,
}

/// One broker node's AMQP URL.
#[derive(Debug, Clone)]
pub struct BrokerNode {
    /// The URL; it may hold a password.
    pub url: Secret,
    /// The URL with its password replaced by `***`, for logs.
    pub redacted: String,
}

/// How to reach RabbitMQ and what to declare there.
#[derive(Debug, Clone)]
pub struct RabbitConfig {
    /// The broker's nodes (`rabbitmq.url`, or each of `rabbitmq.urls`), in
    /// the configured order.
    pub nodes: Vec<BrokerNode>,
    /// Whether each connect tries the nodes in a new random order (so
    /// relays spread over a cluster and no node is always tried first) or
    /// in the configured order.
    pub shuffle_nodes: bool,
    /// Connection name shown in the management UI.
    pub connection_name: String,
    /// CA certificates (PEM) trusted for `amqps://` besides the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// The seed's queue: declared first, and the default routing key.
    pub queue: QueueConfig,
    /// Further queues to declare.
    pub queues: Vec<QueueConfig>,
    /// Exchanges to declare, before any queue.
    pub exchanges: Vec<ExchangeConfig>,
    /// Queue bindings to declare, after the queues.
    pub bindings: Vec<BindingConfig>,
    /// Where a message goes when neither its row nor its channel says.
    pub default_route: Route,
    /// Routes by the NOTIFY channel recorded on the row.
    pub routes: BTreeMap<String, Route>,
    /// Base delay of reconnection back-off.
    pub retry_delay: Duration,
}

/// Relay tuning.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The most messages in flight (claimed, not yet confirmed).
    pub buffer_size: usize,
    /// Rows claimed per batch: `relay.batch_size`, but at most half of
    /// `buffer_size`, so that at least two batches are in flight.
    pub batch_size: usize,
    /// Batches in flight at once; each holds one database connection and
    /// one AMQP channel. `buffer_size / batch_size`, at least 1.
    pub workers: usize,
    /// How often pending rows are swept when no notification arrives.
    pub idle_sleep: Duration,
    /// How long to wait for the broker to confirm a batch.
    pub confirm_timeout: Duration,
    /// How long a stop may take to finish in-flight batches.
    pub shutdown_grace: Duration,
    /// The cap of every reconnection back-off.
    pub max_retry_delay: Duration,
    /// Failed attempts (bad input, unroutable) after which a row is parked.
    pub max_attempts: u32,
    /// Delay after a row's first failed attempt; it doubles with every
    /// further failure, up to `max_retry_delay`.
    pub attempt_delay: Duration,
    /// Bodies larger than this are parked, never published (the broker's
    /// `max_message_size`: 128 MiB on RabbitMQ 3.x, 16 MiB on 4.x).
    pub max_message_bytes: u64,
    /// Body bytes one batch may hold in memory; rows past it wait for the
    /// next batch (a batch always takes at least one row).
    pub max_batch_bytes: u64,
}

impl Config {
    /// Reads `path`, applies the process environment and validates.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file, key or variable at fault.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(format!(
                "cannot read config file {}: {e} (pass --config PATH or set {ENV_CONFIG_PATH})",
                path.display()
            ))
        })?;
        let (env, unreadable) = read_env(std::env::vars_os())?;
        let mut config = Self::parse(&text, &env, &path.display().to_string())?;
        config.env_notes.warnings.extend(unreadable);
        Ok(config)
    }

    /// Parses config text with the given `PUSHOCCURRENCE_*` variables.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key or variable at fault.
    pub fn parse(
        text: &str,
        env: &BTreeMap<String, String>,
        origin: &str,
    ) -> Result<Self, ConfigError> {
        // Editors on Windows save UTF-8 with a byte order mark; JSON has none.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut json = strict_json(&blank_comment_lines(text))
            .map_err(|e| ConfigError::new(format!("{origin} is not valid JSON: {e}")))?;
        // Every secret value in effect, so that no message below can echo
        // one, whatever the input (a value of the wrong type, a library's
        // error text quoting it). The file's values that the environment
        // replaces are quoted by nothing.
        let mut secrets = Vec::new();
        for &(key, kind) in ENV_KEYS {
            if kind.is_secret() {
                secrets.extend(
                    env.get(&env_name(key))
                        .map(|v| url_secrets(v))
                        .into_iter()
                        .flatten(),
                );
            }
            if kind == EnvKind::SecretList {
                let items = env
                    .get(&env_name(key))
                    .into_iter()
                    .flat_map(|v| v.split(','));
                secrets.extend(items.flat_map(|v| url_secrets(v.trim())));
            }
        }
        let parsed = apply_env(&mut json, env).and_then(|applied| {
            secrets.extend(secret_values(&json));
            let source = Source {
                origin,
                from_env: &applied.from_env,
            };
            let raw: RawConfig = serde_path_to_error::deserialize(json).map_err(|e| {
                let path = e.path().to_string();
                let inner = plain_words(&e.into_inner().to_string());
                if path == "." {
                    ConfigError::new(format!("{origin}: {inner}"))
                } else if let Some(key) = SECRET_KEYS.iter().find(|k| is_at_or_under(&path, k)) {
                    // serde quotes the offending value ("invalid type:
                    // integer `73195046`"), which here is the secret.
                    if *key == "rabbitmq.urls" && path == *key {
                        ConfigError::new(format!(
                            "{}: expected a list of AMQP URLs, one per node, \
                             e.g. [\"amqp://user:password@rabbit-1:5672/\", \"amqp://user:password@rabbit-2:5672/\"]",
                            source.of(key)
                        ))
                    } else {
                        // The list's item (`rabbitmq.urls[1]`) when it is one.
                        ConfigError::new(format!(
                            "{}: expected a string; put the value in quotes",
                            source.of(if path.starts_with(&format!("{key}[")) { &path } else { key })
                        ))
                    }
                } else {
                    ConfigError::new(format!("{}: {inner}", source.of(&path)))
                }
            })?;
            let mut config = Self::from_raw(raw).map_err(|e| source.attribute(e))?;
            config.env_notes = applied.notes;
            Ok(config)
        });
        parsed.map_err(|e| e.scrubbed(&secrets))
    }

    /// Validates the raw values into typed settings.
    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let RawConfig {
            postgres: pg,
            rabbitmq: mq,
            listener,
            relay,
            log,
            admin,
            retention,
        } = raw;
        let retention = if retention.transferred_after_sec > 0.0 {
            if retention.batch_size == 0 {
                return Err(ConfigError::new(
                    "key retention.batch_size: must be at least 1 (rows deleted per transaction)",
                ));
            }
            Some(RetentionConfig {
                // Days or weeks, so not bounded like the other durations.
                transferred_after: Duration::try_from_secs_f64(retention.transferred_after_sec)
                    .map_err(|_| {
                        ConfigError::new(
                            "key retention.transferred_after_sec: too large; give seconds, e.g. 604800 for a week",
                        )
                    })?,
                batch_size: i64::try_from(retention.batch_size).unwrap_or(i64::MAX),
                interval: positive_secs("retention.interval_sec", retention.interval_sec)?,
            })
        } else if retention.transferred_after_sec < 0.0 {
            return Err(ConfigError::new(
                "key retention.transferred_after_sec: must not be negative (0 keeps rows forever)",
            ));
        } else {
            None
        };
        let admin_required = admin.listen.is_some();
        let admin_listen = admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
        let admin_listen = if admin_listen.trim().is_empty() {
            None
        } else {
            Some(admin_listen.trim().parse().map_err(|_| {
                ConfigError::new(format!(
                    "key admin.listen: '{admin_listen}' is not an address and port like 127.0.0.1:9780 (use \"\" to turn the endpoint off)"
                ))
            })?)
        };
        let stall_after = positive_secs("admin.stall_after_sec", admin.stall_after_sec)?;
        let log_format = match log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::new(format!(
                    "key log.format: unknown format '{other}'; expected text or json"
                )));
            }
        };

        let ssl_mode = match pg.ssl_mode.as_str() {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConfigError::new(format!(
                    "key postgres.ssl_mode: unknown mode '{other}'; expected one of disable, prefer, require, verify-ca, verify-full"
                )));
            }
        };
        let ssl_root_cert = optional_path(pg.ssl_root_cert);
        if ssl_root_cert.is_none() && matches!(ssl_mode, SslMode::VerifyCa | SslMode::VerifyFull) {
            return Err(ConfigError::new(format!(
                "key postgres.ssl_root_cert: ssl_mode '{}' checks the server's certificate against a CA; give the CA's PEM file",
                pg.ssl_mode
            )));
        }
        let tls = crate::db::tls::connector(ssl_mode, ssl_root_cert.as_deref())
            .map_err(|e| ConfigError::new(format!("key postgres.ssl_root_cert: {e}")))?;
        check_identifier("postgres.schema", &pg.schema)?;
        non_empty("postgres.host", &pg.host)?;
        let servers = pg_servers(("postgres.host", &pg.host), ("postgres.port", &pg.port.0))?;
        non_empty("postgres.database", &pg.database)?;
        non_empty("postgres.user", &pg.user)?;
        non_empty("postgres.application_name", &pg.application_name)?;
        let connect_timeout =
            positive_secs("postgres.connect_timeout_sec", pg.connect_timeout_sec)?;
        let query_timeout = positive_ms("postgres.query_timeout_ms", pg.query_timeout_ms)?;
        let pooler = match pg.pooler.as_str() {
            "none" => Pooler::None,
            "session" => Pooler::Session,
            "transaction" => Pooler::Transaction,
            other => {
                return Err(ConfigError::new(format!(
                    "key postgres.pooler: unknown mode '{other}'; expected none, session or transaction \
                     (PgBouncer's pool_mode)"
                )));
            }
        };
        if let Some(host) = &listener.host {
            non_empty("listener.host", host)?;
        }
        let listener_servers = match (&listener.host, &listener.port) {
            (Some(hosts), ports) => {
                let ports = ports
                    .as_ref()
                    .map_or_else(|| vec![servers[0].port], |p| p.0.clone());
                Some(pg_servers(
                    ("listener.host", hosts),
                    ("listener.port", &ports),
                )?)
            }
            (None, Some(ports)) => {
                // The regular hosts, on the listener's port(s).
                let hosts: Vec<&str> = servers.iter().map(|s| s.host.as_str()).collect();
                Some(pg_servers(
                    ("postgres.host", &hosts.join(",")),
                    ("listener.port", &ports.0),
                )?)
            }
            (None, None) => None,
        };
        if pooler == Pooler::Transaction
            && pg.auto_migrate
            && listener.host.is_none()
            && listener.port.is_none()
        {
            return Err(ConfigError::new(
                "key postgres.auto_migrate: migrations need a session of their own (an advisory lock, \
                 CREATE INDEX CONCURRENTLY), which postgres.pooler 'transaction' cannot give; \
                 give the relay a direct connection (listener.host, listener.port), or set \
                 postgres.auto_migrate to false and run `pushoccurrence migrate` against PostgreSQL directly",
            ));
        }

        let urls: Vec<(String, String)> = match (mq.url, mq.urls) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "keys rabbitmq.url and rabbitmq.urls: set one of them (urls lists the nodes of a cluster)",
                ));
            }
            (Some(url), None) => vec![("rabbitmq.url".to_owned(), url)],
            (None, Some(urls)) if urls.is_empty() => {
                return Err(ConfigError::new(
                    "key rabbitmq.urls: list at least one node's AMQP URL",
                ));
            }
            (None, Some(urls)) => urls
                .into_iter()
                .enumerate()
                .map(|(i, url)| (format!("rabbitmq.urls[{i}]"), url))
                .collect(),
            (None, None) => {
                return Err(ConfigError::new(
                    "key rabbitmq.url: missing; give the broker's AMQP URL, e.g. amqp://user:password@host:5672/ (or rabbitmq.urls for a cluster)",
                ));
            }
        };
        let mut nodes = Vec::with_capacity(urls.len());
        for (key, url) in urls {
            let redacted = redact_url(&url);
            amqp_uri(&url).map_err(|e| {
                ConfigError::new(format!(
                    "key {key}: '{redacted}' is not an AMQP URL ({e}); expected amqp://user:password@host:port/vhost"
                ))
            })?;
            nodes.push(BrokerNode {
                url: Secret(url),
                redacted,
            });
        }
        let ca_file = optional_path(mq.ca_file);
        if let Some(path) = &ca_file {
            if nodes
                .iter()
                .any(|n| !n.url.expose().starts_with("amqps://"))
            {
                return Err(ConfigError::new(
                    "key rabbitmq.ca_file: set, but rabbitmq.url is not amqps://, so no TLS would use it",
                ));
            }
            crate::db::tls::read_roots(path)
                .map_err(|e| ConfigError::new(format!("key rabbitmq.ca_file: {e}")))?;
        }
        let queue = routing::queue("rabbitmq.queue", mq.queue)?;
        let queues = mq
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| routing::queue(&format!("rabbitmq.queues[{i}]"), q))
            .collect::<Result<Vec<_>, _>>()?;
        let exchanges = routing::exchanges(mq.exchanges)?;
        let bindings = routing::bindings(mq.bindings)?;
        let retry = mq.retry;
        if retry.buffer_size == 0 {
            return Err(ConfigError::new(
                "key rabbitmq.retry.buffer_size: must be at least 1 (the most messages in flight)",
            ));
        }
        let retry_delay = positive_secs("rabbitmq.retry.retry_delay_sec", retry.retry_delay_sec)?;
        if retry.idle_sleep_ms == 0 {
            return Err(ConfigError::new(
                "key rabbitmq.retry.idle_sleep_ms: must be at least 1 (the sweep interval in milliseconds)",
            ));
        }

        if listener.channels.is_empty() {
            return Err(ConfigError::new(
                "key listener.channels: list at least one NOTIFY channel",
            ));
        }
        for (i, channel) in listener.channels.iter().enumerate() {
            check_identifier(&format!("listener.channels[{i}]"), channel)?;
        }
        let (default_route, routes) = routing::routes(
            mq.exchange,
            mq.routing_key,
            &queue.name,
            mq.routes,
            &listener.channels,
        )?;

        if relay.batch_size == 0 {
            return Err(ConfigError::new("key relay.batch_size: must be at least 1"));
        }
        // At most half the window, so at least two batches overlap.
        let batch_size = relay.batch_size.min((retry.buffer_size / 2).max(1));
        let workers = (retry.buffer_size / batch_size).clamp(1, MAX_WORKERS);
        let confirm_timeout = positive_ms("relay.confirm_timeout_ms", relay.confirm_timeout_ms)?;
        let shutdown_grace = positive_ms("relay.shutdown_grace_ms", relay.shutdown_grace_ms)?;
        let max_retry_delay =
            positive_secs("relay.max_retry_delay_sec", relay.max_retry_delay_sec)?;
        if relay.max_attempts == 0 {
            return Err(ConfigError::new(
                "key relay.max_attempts: must be at least 1 (failed attempts before a row is parked)",
            ));
        }
        let attempt_delay = positive_ms("relay.attempt_delay_ms", relay.attempt_delay_ms)?;
        if relay.max_message_bytes == 0 || relay.max_batch_bytes == 0 {
            return Err(ConfigError::new(
                "keys relay.max_message_bytes and relay.max_batch_bytes: must be at least 1",
            ));
        }
        if max_retry_delay < retry_delay {
            return Err(ConfigError::new(
                "key relay.max_retry_delay_sec: must not be below rabbitmq.retry.retry_delay_sec",
            ));
        }

        Ok(Config {
            postgres: PostgresConfig {
                servers,
                database: pg.database,
                user: pg.user,
                password: pg.password.map(Secret),
                ssl_mode,
                tls,
                schema: pg.schema,
                auto_migrate: pg.auto_migrate,
                application_name: pg.application_name,
                connect_timeout,
                query_timeout,
                pooler,
                listener_servers,
            },
            rabbitmq: RabbitConfig {
                nodes,
                shuffle_nodes: mq.shuffle_urls,
                connection_name: mq.connection_name,
                ca_file,
                queue,
                queues,
                exchanges,
                bindings,
                default_route,
                routes,
                retry_delay,
            },
            channels: listener.channels,
            log_format,
            admin_listen,
            admin_required,
            stall_after,
            retention,
            env_notes: EnvNotes::default(),
            relay: RelayConfig {
                buffer_size: retry.buffer_size,
                batch_size,
                workers,
                idle_sleep: Duration::from_millis(retry.idle_sleep_ms),
                confirm_timeout,
                shutdown_grace,
                max_retry_delay,
                max_attempts: relay.max_attempts,
                attempt_delay,
                max_message_bytes: relay.max_message_bytes,
                max_batch_bytes: relay.max_batch_bytes,
            },
        })
    }
}

/// The most batches in flight at once, whatever `buffer_size` says: each
/// holds a database connection.
const MAX_WORKERS: usize = 16;

/// A file path key: absent or blank means none.
fn optional_path(value: Option<String>) -> Option<std::path::PathBuf> {
    value
        .filter(|p| !p.trim().is_empty())
        .map(std::path::PathBuf::from)
}

/// Blanks lines whose first non-blank characters are `//`, so a config file
/// can explain itself. A JSON string cannot hold a raw line break, so such a
/// line is never inside a string; blanking (not removing) keeps the line
/// numbers of parse errors right.
fn blank_comment_lines(text: &str) -> String {
    text.lines()
        .map(|line| {
            if line.trim_start().starts_with("//") {
                ""
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Parses an AMQP URL as the seed's Go client (amqp091-go) reads it: an
/// empty path, as in the seed's `amqp://guest:guest@localhost:5672/`, is the
/// default vhost `/`. lapin reads that path as the vhost named `""`, which
/// RabbitMQ does not have (`NOT_ALLOWED - vhost  not found`, forever), and
/// no vhost can have that name, so nothing is lost by the rule. `%2f` and
/// named vhosts keep their meaning. Both the config's validation and the
/// broker link's `connect` parse through here.
///
/// # Errors
/// The parser's message; it never contains the URL (nor its password).
pub fn amqp_uri(url: &str) -> Result<lapin::uri::AMQPUri, String> {
    let mut uri: lapin::uri::AMQPUri = url.parse()?;
    if uri.vhost.is_empty() {
        uri.vhost = "/".to_owned();
    }
    Ok(uri)
}

/// Replaces the password of a URL's user info with `***`.
///
/// Over-eager by design: the user info runs from `://` (or the start, when
/// the scheme is missing) to the *last* `@`, so a password holding a raw
/// `/`, `?`, `#` or `@` is hidden whole, even though a URL parser would end
/// the authority earlier. Everything after the user name's first `:` is the
/// password. A URL with no `@` has no user info and is shown as it is.
pub fn redact_url(url: &str) -> String {
    match split_userinfo(url) {
        Some((before, user, _password)) => {
            let at = url.rfind('@').expect("split_userinfo found one");
            format!("{before}{user}:***{}", &url[at..])
        }
        None => url.to_owned(),
    }
}

/// `%XX` escapes decoded (invalid ones kept as they are, bytes that are not
/// UTF-8 replaced): the form in which a client library might quote a password.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `(scheme and "://", user, password)` of a URL whose user info holds a
/// password, read as [`redact_url`] reads it.
fn split_userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let at = url[start..].rfind('@')? + start;
    let (user, password) = url[start..at].split_once(':')?;
    Some((&url[..start], user, password))
}

/// The servers named by a host key (`postgres.host`, `listener.host`: one
/// host, or several separated by commas, as libpq reads a connection
/// string's `host`) and a port key (one port for every host, or one per
/// host in the same order); errors name the keys.
fn pg_servers(
    (host_key, hosts): (&str, &str),
    (port_key, ports): (&str, &[u16]),
) -> Result<Vec<PgServer>, ConfigError> {
    let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
    if hosts.iter().any(|h| h.is_empty()) {
        return Err(ConfigError::new(format!(
            "key {host_key}: '{}' has an empty host name; name one host, or several separated by commas (db1,db2)",
            hosts.join(",")
        )));
    }
    if ports.is_empty() {
        return Err(ConfigError::new(format!(
            "key {port_key}: list at least one port"
        )));
    }
    if ports.contains(&0) {
        return Err(ConfigError::new(format!("key {port_key}: must be 1-65535")));
    }
    if ports.len() != 1 && ports.len() != hosts.len() {
        return Err(ConfigError::new(format!(
            "keys {host_key} and {port_key}: {} hosts but {} ports; give one port for all hosts, or one per host in the same order",
            hosts.len(),
            ports.len()
        )));
    }
    Ok(hosts
        .iter()
        .enumerate()
        .map(|(i, host)| PgServer {
            host: (*host).to_owned(),
            port: if ports.len() == 1 { ports[0] } else { ports[i] },
        })
        .collect())
}

impl PostgresConfig {
    /// The servers as `host:port` separated by commas, for messages.
    pub fn servers_text(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("{}:{}", s.host, s.port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn non_empty(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::new(format!("key {key}: must not be empty")));
    }
    Ok(())
}

fn check_identifier(key: &str, value: &str) -> Result<(), ConfigError> {
    non_empty(key, value)?;
    if value.len() > PG_MAX_IDENTIFIER {
        return Err(ConfigError::new(format!(
            "key {key}: '{value}' is {} bytes long; PostgreSQL identifiers hold at most {PG_MAX_IDENTIFIER}",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(ConfigError::new(format!(
            "key {key}: must not contain a NUL character"
        )));
    }
    Ok(())
}

fn positive_secs(key: &str, secs: f64) -> Result<Duration, ConfigError> {
    if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
        return Err(ConfigError::new(format!(
            "key {key}: {secs} is out of range; expected seconds above 0 and at most 86400"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn positive_ms(key: &str, ms: u64) -> Result<Duration, ConfigError> {
    if ms == 0 {
        return Err(ConfigError::new(format!(
            "key {key}: must be at least 1 millisecond"
        )));
    }
    Ok(Duration::from_millis(ms))
}

/// What [`apply_env`] did: which keys the environment set (by variable),
/// and the variables it left alone.
struct Applied {
    from_env: BTreeMap<String, String>,
    notes: EnvNotes,
}

/// Lays the `PUSHOCCURRENCE_*` variables over the file's JSON.
fn apply_env(json: &mut Value, env: &BTreeMap<String, String>) -> Result<Applied, ConfigError> {
    let mut known: Vec<String> = vec![ENV_CONFIG_PATH.to_owned()];
    let mut applied = Applied {
        from_env: BTreeMap::new(),
        notes: EnvNotes::default(),
    };
    for &(key, kind) in ENV_KEYS {
        let var = env_name(key);
        let file_var = format!("{var}_FILE");
        known.push(var.clone());
        let raw = if kind.is_secret() {
            known.push(file_var.clone());
            match (env.get(&var), env.get(&file_var)) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(format!(
                        "environment: set either {var} or {file_var}, not both"
                    )));
                }
                (Some(v), None) => Some((var.clone(), v.clone())),
                (None, Some(file)) => Some((file_var.clone(), read_secret_file(&file_var, file)?)),
                (None, None) => None,
            }
        } else {
            env.get(&var).map(|v| (var.clone(), v.clone()))
        };
        let Some((var, raw)) = raw else { continue };
        // A Service named `pushoccurrence-postgres` makes Kubernetes set
        // PUSHOCCURRENCE_POSTGRES_PORT=tcp://10.0.0.5:5432: not a port the
        // operator chose, so the file's value stands.
        if is_service_link(&var, &raw) {
            applied.notes.ignored.push(format!(
                "{var}: a Kubernetes service link, not a value for {key}; ignored"
            ));
            continue;
        }
        let value = match kind {
            EnvKind::Text | EnvKind::Secret => Value::String(raw),
            EnvKind::NumberOrList if raw.contains(',') => Value::String(raw),
            EnvKind::Number | EnvKind::NumberOrList => {
                let n: serde_json::Number = raw.trim().parse().map_err(|_| {
                    ConfigError::new(format!(
                        "environment variable {var} (key {key}): expected a number, got '{raw}'"
                    ))
                })?;
                Value::Number(n)
            }
            EnvKind::Bool => match raw.trim() {
                "true" | "1" => Value::Bool(true),
                "false" | "0" => Value::Bool(false),
                _ => {
                    return Err(ConfigError::new(format!(
                        "environment variable {var} (key {key}): expected true or false, got '{raw}'"
                    )));
                }
            },
            EnvKind::List | EnvKind::SecretList => Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_owned()))
                    .collect(),
            ),
        };
        set_path(json, key, value)
            .map_err(|msg| ConfigError::new(format!("environment variable {var}: {msg}")))?;
        applied.from_env.insert(key.to_owned(), var);
    }
    // The broker's address set in the environment, as one URL or as a
    // cluster's list, replaces the file's in either form: the seed's file
    // always has `rabbitmq.url`, so `PUSHOCCURRENCE_RABBITMQ_URLS` could
    // otherwise never be used with it ("set one of them"). Both set in
    // the environment stay an error.
    for (set, replaced) in [
        ("rabbitmq.urls", "rabbitmq.url"),
        ("rabbitmq.url", "rabbitmq.urls"),
    ] {
        if applied.from_env.contains_key(set)
            && !applied.from_env.contains_key(replaced)
            && let Some(rabbitmq) = json.get_mut("rabbitmq").and_then(Value::as_object_mut)
        {
            rabbitmq.remove(&replaced["rabbitmq.".len()..]);
        }
    }
    for (name, value) in env.iter().filter(|(k, _)| !known.contains(k)) {
        if is_service_link(name, value) {
            applied
                .notes
                .ignored
                .push(format!("{name}: a Kubernetes service link; ignored"));
        } else if let Some(meant) = likely_meant(name, &known) {
            return Err(ConfigError::new(format!(
                "environment variable {name} is not a setting of this relay; did you mean {meant}? \
                 (the settings are listed in the README, section Configuration)"
            )));
        } else {
            applied.notes.warnings.push(format!(
                "environment variable {name} is not a setting of this relay; ignored"
            ));
        }
    }
    Ok(applied)
}

/// The `PUSHOCCURRENCE_*` variables of a process environment, and a
/// warning for each one that is not UTF-8 and not a setting (those are
/// skipped: `std::env::vars` would panic on them). A setting whose value
/// is not UTF-8 is an error: the operator meant it.
fn read_env(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<(BTreeMap<String, String>, Vec<String>), ConfigError> {
    let mut env = BTreeMap::new();
    let mut warnings = Vec::new();
    for (name, value) in vars {
        let Some(name) = name.to_str() else {
            let lossy = name.to_string_lossy();
            if lossy.starts_with(ENV_PREFIX) {
                warnings.push(format!(
                    "environment variable {lossy} has a name that is not UTF-8; ignored"
                ));
            }
            continue;
        };
        if !name.starts_with(ENV_PREFIX) {
            continue;
        }
        match value.into_string() {
            Ok(value) => {
                env.insert(name.to_owned(), value);
            }
            Err(_) if is_setting_var(name) => {
                return Err(ConfigError::new(format!(
                    "environment variable {name}: its value is not valid UTF-8; set it as UTF-8 text"
                )));
            }
            Err(_) => warnings.push(format!(
                "environment variable {name} is not a setting of this relay (and its value is not UTF-8); ignored"
            )),
        }
    }
    Ok((env, warnings))
}

/// Whether `name` is a variable the relay reads.
fn is_setting_var(name: &str) -> bool {
    name == ENV_CONFIG_PATH
        || ENV_KEYS.iter().any(|&(key, kind)| {
            let var = env_name(key);
            name == var || (kind == EnvKind::Secret && name.strip_suffix("_FILE") == Some(&var))
        })
}

/// Whether `name=value` is one of the variables Kubernetes sets for every
/// Service in the namespace: `<SVC>_SERVICE_HOST`, `<SVC>_SERVICE_PORT`,
/// `<SVC>_SERVICE_PORT_<NAME>`, `<SVC>_PORT=tcp://host:port` and
/// `<SVC>_PORT_<n>_<PROTO>[_ADDR|_PORT|_PROTO]`.
fn is_service_link(name: &str, value: &str) -> bool {
    let link_url = ["tcp://", "udp://", "sctp://"]
        .iter()
        .any(|scheme| value.starts_with(scheme));
    let parts: Vec<&str> = name.split('_').collect();
    let service = parts
        .windows(2)
        .any(|w| w[0] == "SERVICE" && (w[1] == "HOST" || w[1] == "PORT"));
    let port_proto = parts.windows(3).any(|w| {
        w[0] == "PORT"
            && !w[1].is_empty()
            && w[1].bytes().all(|b| b.is_ascii_digit())
            && matches!(w[2], "TCP" | "UDP" | "SCTP")
    });
    (link_url && name.ends_with("_PORT")) || service || port_proto
}

/// The setting an unknown variable most likely misspells: within a small
/// edit distance, or a real name with blocks left out
/// (`PUSHOCCURRENCE_QUEUE_NAME` for `PUSHOCCURRENCE_RABBITMQ_QUEUE_NAME`).
fn likely_meant(name: &str, known: &[String]) -> Option<String> {
    let short = name.strip_prefix(ENV_PREFIX)?;
    // A real setting's name with _FILE added: only secrets read files.
    if let Some(stem) = name.strip_suffix("_FILE")
        && known.iter().any(|k| k == stem)
    {
        return Some(format!(
            "{stem} (only {} can be read from a file)",
            SECRET_KEYS
                .map(env_name)
                .map(|v| format!("{v}_FILE"))
                .join(" and ")
        ));
    }
    let mut best: Option<(usize, &String)> = None;
    for candidate in known {
        let Some(real) = candidate.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let allowed = if short.len() >= 8 { 2 } else { 1 };
        let distance = edit_distance(short, real);
        let dropped_blocks = short.contains('_') && real.ends_with(&format!("_{short}"));
        if distance <= allowed || dropped_blocks {
            let score = if dropped_blocks { 0 } else { distance };
            if best.is_none_or(|(b, _)| score < b) {
                best = Some((score, candidate));
            }
        }
    }
    best.map(|(_, c)| c.clone())
}

/// Optimal string alignment distance: insertions, deletions, substitutions
/// and swaps of neighbours each cost one.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

/// Where a key's value came from, for error messages: the variable that
/// set it, or the file.
struct Source<'a> {
    origin: &'a str,
    from_env: &'a BTreeMap<String, String>,
}

impl Source<'_> {
    /// `environment variable X (key k)` or `<file>: key k`, for a key path
    /// as serde or a validation message names it (`rabbitmq.queues[0].name`).
    fn of(&self, path: &str) -> String {
        match self
            .from_env
            .iter()
            .find(|(key, _)| is_at_or_under(path, key))
        {
            Some((key, var)) if key == path => format!("environment variable {var} (key {key})"),
            Some((_, var)) => format!("environment variable {var} (key {path})"),
            None => {
                // A block (`rabbitmq.queue`) with parts from the environment.
                let inside: Vec<&str> = self
                    .from_env
                    .iter()
                    .filter(|(key, _)| is_at_or_under(key, path))
                    .map(|(_, var)| var.as_str())
                    .collect();
                if inside.is_empty() {
                    format!("{}: key {path}", self.origin)
                } else {
                    format!(
                        "{}: key {path} (with {} from the environment)",
                        self.origin,
                        inside.join(", ")
                    )
                }
            }
        }
    }

    /// A validation message `key k: …` (or `keys k and l: …`) with its
    /// source in front, so a value set in the environment is not blamed on
    /// the file.
    fn attribute(&self, error: ConfigError) -> ConfigError {
        let msg = &error.0;
        if let Some(rest) = msg.strip_prefix("key ")
            && let Some((path, tail)) = rest.split_once(": ")
            && !path.contains(' ')
        {
            return ConfigError::new(format!("{}: {tail}", self.of(path)));
        }
        if let Some(rest) = msg.strip_prefix("keys ") {
            let vars: Vec<&String> = self
                .from_env
                .iter()
                .filter(|(key, _)| {
                    rest.split(':')
                        .next()
                        .is_some_and(|keys| keys.contains(key.as_str()))
                })
                .map(|(_, var)| var)
                .collect();
            if !vars.is_empty() {
                let vars: Vec<&str> = vars.iter().map(|v| v.as_str()).collect();
                return ConfigError::new(format!(
                    "{msg} (set by environment variable {})",
                    vars.join(", ")
                ));
            }
            return ConfigError::new(format!("{}: {msg}", self.origin));
        }
        error
    }
}

/// serde's words for types (`u16`, `struct RawRelay`, `sequence`) in the
/// words of a JSON config file.
fn plain_words(message: &str) -> String {
    const WORDS: &[(&str, &str)] = &[
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected i32", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected a list"),
        ("expected a map", "expected an object"),
        ("invalid type: sequence", "invalid type: list"),
        ("invalid type: map", "invalid type: object"),
        ("invalid type: integer", "invalid type: number"),
        ("invalid type: floating point", "invalid type: number"),
    ];
    let mut out = message.to_owned();
    for (from, to) in WORDS {
        // Whole words only: `expected u16` must not also match `u160`.
        let mut rebuilt = String::new();
        let mut rest = out.as_str();
        while let Some(at) = rest.find(from) {
            let after = &rest[at + from.len()..];
            rebuilt.push_str(&rest[..at]);
            if after.starts_with(|c: char| c.is_ascii_alphanumeric()) {
                rebuilt.push_str(from);
            } else {
                rebuilt.push_str(to);
            }
            rest = after;
        }
        rebuilt.push_str(rest);
        out = rebuilt;
    }
    // `invalid value: integer `70000`, expected …`: the number as written.
    if let Some(at) = out.find("invalid value: integer `") {
        let start = at + "invalid value: ".len();
        let number = start + "integer `".len();
        if let Some(len) = out[number..].find('`') {
            let digits = out[number..number + len].to_owned();
            out.replace_range(start..number + len + 1, &digits);
        }
    }
    // `expected struct RawRelay` (a block given as something else).
    while let Some(at) = out.find("struct Raw") {
        let end = out[at + "struct ".len()..]
            .find(|c: char| !c.is_ascii_alphanumeric())
            .map_or(out.len(), |e| at + "struct ".len() + e);
        out.replace_range(at..end, "an object");
    }
    out
}

/// Parses JSON like `serde_json::from_str`, but a key given twice in one
/// object is an error naming it (serde_json keeps the last silently, so
/// the first value an operator reads would not be the one in effect).
fn strict_json(text: &str) -> Result<Value, serde_json::Error> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_str(text);
    let value = StrictJson {
        path: String::new(),
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// One JSON value at `path`, with duplicate keys refused.
struct StrictJson {
    path: String,
}

impl<'de> serde::de::DeserializeSeed<'de> for StrictJson {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StrictJson {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(StrictJson {
            path: format!("{}[{}]", self.path, items.len()),
        })? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "key {path} is given twice; keep one"
                )));
            }
            let value = map.next_value_seed(StrictJson { path })?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

fn read_secret_file(var: &str, path: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(format!(
            "environment variable {var}: cannot read {path}: {e}"
        ))
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

fn set_path(json: &mut Value, key: &str, value: Value) -> Result<(), String> {
    let mut node = json;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let Value::Object(map) = node else {
            return Err(format!(
                "cannot set {key}: its parent in the file is not an object"
            ));
        };
        if parts.peek().is_none() {
            map.insert(part.to_owned(), value);
            return Ok(());
        }
        node = map
            .entry(part.to_owned())
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    postgres: RawPostgres,
    rabbitmq: RawRabbit,
    listener: RawListener,
    #[serde(default)]
    relay: RawRelay,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    retention: RawRetention,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    #[serde(default = "default_host")]
    host: String,
    #[serde(default = "default_pg_port")]
    port: RawPorts,
    database: String,
    user: String,
    #[serde(default)]
    password: Option<String>,
    #[serde(default = "default_ssl_mode")]
    ssl_mode: String,
    #[serde(default)]
    ssl_root_cert: Option<String>,
    #[serde(default = "default_schema")]
    schema: String,
    #[serde(default = "default_true")]
    auto_migrate: bool,
    #[serde(default = "default_name")]
    application_name: String,
    #[serde(default = "default_connect_timeout")]
    connect_timeout_sec: f64,
    #[serde(default = "default_query_timeout")]
    query_timeout_ms: u64,
    #[serde(default = "default_pooler")]
    pooler: String,
}

fn default_pooler() -> String {
    "none".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRabbit {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    urls: Option<Vec<String>>,
    #[serde(default = "default_true")]
    shuffle_urls: bool,
    #[serde(default = "default_name")]
    connection_name: String,
    #[serde(default)]
    ca_file: Option<String>,
    queue: routing::RawQueue,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    exchange: String,
    #[serde(default)]
    routing_key: Option<String>,
    #[serde(default)]
    queues: Vec<routing::RawQueue>,
    #[serde(default)]
    exchanges: Vec<routing::RawExchange>,
    #[serde(default)]
    bindings: Vec<routing::RawBinding>,
    #[serde(default)]
    routes: BTreeMap<String, routing::RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetry {
    buffer_size: usize,
    retry_delay_sec: f64,
    idle_sleep_ms: u64,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            buffer_size: 256,
            retry_delay_sec: 5.0,
            idle_sleep_ms: 100,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetention {
    transferred_after_sec: f64,
    batch_size: usize,
    interval_sec: f64,
}

impl Default for RawRetention {
    fn default() -> Self {
        Self {
            transferred_after_sec: 0.0,
            batch_size: 1000,
            interval_sec: 60.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    /// `None` when neither the file nor the environment sets it.
    listen: Option<String>,
    stall_after_sec: f64,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: None,
            stall_after_sec: 60.0,
        }
    }
}

/// The admin endpoint's default address: local only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9780";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".to_owned(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    channels: Vec<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<RawPorts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRelay {
    batch_size: usize,
    confirm_timeout_ms: u64,
    shutdown_grace_ms: u64,
    max_retry_delay_sec: f64,
    max_attempts: u32,
    attempt_delay_ms: u64,
    max_message_bytes: u64,
    max_batch_bytes: u64,
}

impl Default for RawRelay {
    fn default() -> Self {
        Self {
            batch_size: 128,
            confirm_timeout_ms: 30_000,
            shutdown_grace_ms: 10_000,
            max_retry_delay_sec: 60.0,
            max_attempts: 10,
            attempt_delay_ms: 1000,
            max_message_bytes: 128 * 1024 * 1024,
            max_batch_bytes: 16 * 1024 * 1024,
        }
    }
}

fn default_host() -> String {
    "localhost".to_owned()
}
fn default_pg_port() -> RawPorts {
    RawPorts(vec![5432])
}

/// `postgres.port`, `listener.port`: one port (the seed's number), or one per host as a list
/// of numbers or a text of numbers separated by commas (libpq's form, and
/// what an environment variable can hold).
#[derive(Debug)]
struct RawPorts(Vec<u16>);

impl<'de> Deserialize<'de> for RawPorts {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{Error, IntoDeserializer, SeqAccess, Unexpected, Visitor};

        struct Ports;
        impl<'de> Visitor<'de> for Ports {
            type Value = RawPorts;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a port (a whole number from 1 to 65535), or one per host as a list or separated by commas",
                )
            }

            // A single number keeps the words of a plain port's errors.
            fn visit_u64<E: Error>(self, v: u64) -> Result<RawPorts, E> {
                u16::deserialize(v.into_deserializer()).map(|p| RawPorts(vec![p]))
            }

            fn visit_i64<E: Error>(self, v: i64) -> Result<RawPorts, E> {
                u16::deserialize(v.into_deserializer()).map(|p| RawPorts(vec![p]))
            }

            fn visit_str<E: Error>(self, v: &str) -> Result<RawPorts, E> {
                v.split(',')
                    .map(|p| p.trim().parse::<u16>())
                    .collect::<Result<Vec<_>, _>>()
                    .map(RawPorts)
                    .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawPorts, A::Error> {
                let mut ports = Vec::new();
                while let Some(port) = seq.next_element::<u16>()? {
                    ports.push(port);
                }
                Ok(RawPorts(ports))
            }
        }
        deserializer.deserialize_any(Ports)
    }
}
fn default_ssl_mode() -> String {
    "disable".to_owned()
}
fn default_schema() -> String {
    "data_exchange".to_owned()
}
fn default_name() -> String {
    "pushoccurrence".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_connect_timeout() -> f64 {
    10.0
}
fn default_query_timeout() -> u64 {
    30_000
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The seed's example config, parsed.
    pub(crate) fn seed() -> Config {
        parse(SEED, &[]).unwrap()
    }

    const SEED: &str = r#"{
      "postgres": {"host": "localhost", "port": 5432, "database": "your_db_name",
                   "user": "your_db_user", "password": "your_db_password", "ssl_mode": "disable"},
      "rabbitmq": {"url": "amqp://guest:guest@localhost:5672/",
                   "queue": {"name": "your_queue_name", "durable": true, "auto_delete": false,
                             "exclusive": false, "no_wait": false},
                   "retry": {"buffer_size": 100, "retry_delay_sec": 5, "idle_sleep_ms": 100}},
      "listener": {"channels": ["your_notify_channel"]}
    }"#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::parse(text, &env, "config.json")
    }

    fn edit(f: impl FnOnce(&mut Value)) -> String {
        let mut v: Value = serde_json::from_str(SEED).unwrap();
        f(&mut v);
        v.to_string()
    }

    fn err(text: &str, env: &[(&str, &str)]) -> String {
        parse(text, env).unwrap_err().to_string()
    }

    #[test]
    fn several_postgres_hosts_take_one_port_each_or_one_for_all() {
        let servers = |text: &str, env: &[(&str, &str)]| -> Vec<(String, u16)> {
            parse(text, env)
                .unwrap()
                .postgres
                .servers
                .into_iter()
                .map(|s| (s.host, s.port))
                .collect()
        };
        let pair = |h: &str, p: u16| (h.to_owned(), p);
        // The seed's single host and numeric port, unchanged.
        assert_eq!(servers(SEED, &[]), [pair("localhost", 5432)]);
        // One port for every host.
        let text = edit(|v| v["postgres"]["host"] = "db1, db2".into());
        assert_eq!(servers(&text, &[]), [pair("db1", 5432), pair("db2", 5432)]);
        // One port per host: libpq's text, or a list.
        let text = edit(|v| {
            v["postgres"]["host"] = "127.0.0.1,127.0.0.1".into();
            v["postgres"]["port"] = "5432, 5433".into();
        });
        assert_eq!(
            servers(&text, &[]),
            [pair("127.0.0.1", 5432), pair("127.0.0.1", 5433)]
        );
        let text = edit(|v| {
            v["postgres"]["host"] = "db1,db2".into();
            v["postgres"]["port"] = serde_json::json!([6432, 6433]);
        });
        assert_eq!(servers(&text, &[]), [pair("db1", 6432), pair("db2", 6433)]);
        // The same from the environment.
        let env = [
            ("PUSHOCCURRENCE_POSTGRES_HOST", "db1,db2"),
            ("PUSHOCCURRENCE_POSTGRES_PORT", "7001,7002"),
        ];
        assert_eq!(servers(SEED, &env), [pair("db1", 7001), pair("db2", 7002)]);
        let env = [("PUSHOCCURRENCE_POSTGRES_PORT", "7001")];
        assert_eq!(servers(SEED, &env), [pair("localhost", 7001)]);

        // Mistakes name the key and the fix.
        let text = edit(|v| {
            v["postgres"]["host"] = "db1,db2".into();
            v["postgres"]["port"] = "1,2,3".into();
        });
        assert_eq!(
            err(&text, &[]),
            "config.json: keys postgres.host and postgres.port: 2 hosts but 3 ports; give one port for all hosts, or one per host in the same order"
        );
        let e = err(&edit(|v| v["postgres"]["host"] = "db1,,db2".into()), &[]);
        assert!(
            e.starts_with("config.json: key postgres.host: 'db1,,db2' has an empty host name"),
            "{e}"
        );
        let e = err(&edit(|v| v["postgres"]["port"] = "5432,x".into()), &[]);
        assert!(
            e.starts_with("config.json: key postgres.port: invalid value"),
            "{e}"
        );
        assert!(
            e.contains("one per host as a list or separated by commas"),
            "{e}"
        );
        let e = err(
            &edit(|v| v["postgres"]["port"] = serde_json::json!([5432, 0])),
            &[],
        );
        assert_eq!(e, "config.json: key postgres.port: must be 1-65535");
        let e = err(
            &edit(|v| v["postgres"]["port"] = serde_json::json!([])),
            &[],
        );
        assert_eq!(e, "config.json: key postgres.port: list at least one port");
        let e = err(SEED, &[("PUSHOCCURRENCE_POSTGRES_PORT", "5432,70000")]);
        assert!(
            e.starts_with("environment variable PUSHOCCURRENCE_POSTGRES_PORT (key postgres.port): invalid value"),
            "{e}"
        );
    }

    #[test]
    fn the_seed_config_loads_with_its_values_and_defaults() {
        let c = parse(SEED, &[]).unwrap();
        assert_eq!(c.postgres.database, "your_db_name");
        assert_eq!(c.postgres.schema, "data_exchange");
        assert_eq!(c.postgres.application_name, "pushoccurrence");
        assert!(c.postgres.auto_migrate);
        assert_eq!(c.rabbitmq.queue.name, "your_queue_name");
        assert_eq!(c.rabbitmq.retry_delay, Duration::from_secs(5));
        assert_eq!(c.relay.buffer_size, 100, "the seed file sets 100");
        assert_eq!(c.relay.batch_size, 50);
        assert_eq!(c.relay.workers, 2);
        assert_eq!(c.relay.idle_sleep, Duration::from_millis(100));
        assert_eq!(c.channels, vec!["your_notify_channel"]);
    }

    #[test]
    fn pooler_and_listener_address_are_read_and_checked() {
        let c = parse(SEED, &[]).unwrap();
        assert_eq!(c.postgres.pooler, Pooler::None);
        assert!(!c.postgres.listener_is_direct());
        assert_eq!(c.postgres.for_listener().servers, c.postgres.servers);
        let env = [
            ("PUSHOCCURRENCE_POSTGRES_POOLER", "transaction"),
            ("PUSHOCCURRENCE_LISTENER_HOST", "db-primary"),
            ("PUSHOCCURRENCE_LISTENER_PORT", "5433"),
        ];
        let c = parse(SEED, &env).unwrap();
        assert_eq!(c.postgres.pooler, Pooler::Transaction);
        let listen = c.postgres.for_listener();
        assert_eq!(listen.servers_text(), "db-primary:5433");
        assert_eq!(
            c.postgres.for_session_work().servers_text(),
            "db-primary:5433"
        );
        let e = err(SEED, &[("PUSHOCCURRENCE_POSTGRES_POOLER", "statement")]);
        assert!(
            e.contains("postgres.pooler") && e.contains("'statement'"),
            "{e}"
        );
        // Migrations need a session, which a transaction pooler cannot give.
        let e = err(SEED, &[("PUSHOCCURRENCE_POSTGRES_POOLER", "transaction")]);
        assert!(
            e.contains("postgres.auto_migrate") && e.contains("listener.host"),
            "{e}"
        );
        let env = [
            ("PUSHOCCURRENCE_POSTGRES_POOLER", "transaction"),
            ("PUSHOCCURRENCE_POSTGRES_AUTO_MIGRATE", "false"),
        ];
        let c = parse(SEED, &env).unwrap();
        assert_eq!(c.postgres.for_session_work().servers, c.postgres.servers);
        let e = err(SEED, &[("PUSHOCCURRENCE_LISTENER_PORT", "0")]);
        assert!(e.contains("listener.port"), "{e}");
        // Several listener hosts, as postgres.host takes them.
        let env = [
            ("PUSHOCCURRENCE_LISTENER_HOST", "db-1, db-2"),
            ("PUSHOCCURRENCE_LISTENER_PORT", "5433,5434"),
        ];
        let c = parse(SEED, &env).unwrap();
        assert_eq!(
            c.postgres.for_listener().servers_text(),
            "db-1:5433,db-2:5434"
        );
        let c = parse(SEED, &[("PUSHOCCURRENCE_LISTENER_HOST", "db-1,db-2")]).unwrap();
        assert_eq!(
            c.postgres.for_listener().servers_text(),
            "db-1:5432,db-2:5432"
        );
        let e = err(
            SEED,
            &[
                ("PUSHOCCURRENCE_LISTENER_HOST", "db-1,db-2,db-3"),
                ("PUSHOCCURRENCE_LISTENER_PORT", "5433,5434"),
            ],
        );
        assert!(
            e.contains("keys listener.host and listener.port: 3 hosts but 2 ports"),
            "{e}"
        );
        let e = err(SEED, &[("PUSHOCCURRENCE_LISTENER_HOST", "db-1,")]);
        assert!(
            e.contains("(key listener.host): 'db-1,' has an empty host name"),
            "{e}"
        );
    }

    #[test]
    fn whole_line_comments_are_allowed_and_errors_keep_their_line() {
        let text = "// the relay's config\n{\n  // where the outbox lives\n  \"postgres\": {\"database\": \"d\", \"user\": \"u\", \"password\": \"a//b\"},\n  \"rabbitmq\": {\"url\": \"amqp://h/\", \"queue\": {\"name\": \"q\"}},\n  \"listener\": {\"channels\": [\"c\"]}\n}";
        let c = parse(text, &[]).unwrap();
        assert_eq!(c.postgres.password.unwrap().expose(), "a//b");
        let e = err("// comment\n{\n  \"postgres\": nope\n}", &[]);
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn secrets_never_print() {
        let c = parse(SEED, &[]).unwrap();
        let dump = format!("{c:?}");
        assert!(!dump.contains("your_db_password"), "{dump}");
        assert!(!dump.contains("guest:guest"), "{dump}");
        assert_eq!(
            c.rabbitmq.nodes[0].redacted,
            "amqp://guest:***@localhost:5672/"
        );
    }

    #[test]
    fn an_empty_vhost_path_means_the_default_vhost() {
        let vhost = |url: &str| amqp_uri(url).unwrap().vhost;
        assert_eq!(vhost("amqp://guest:guest@localhost:5672/"), "/");
        assert_eq!(vhost("amqp://guest:guest@localhost:5672"), "/");
        assert_eq!(vhost("amqp://h:5672/%2f"), "/");
        assert_eq!(vhost("amqp://h:5672/%2F?heartbeat=5"), "/");
        assert_eq!(vhost("amqp://h:5672/?heartbeat=5"), "/");
        assert_eq!(vhost("amqp://h:5672/orders"), "orders");
        assert_eq!(vhost("amqps://h/team%2forders"), "team/orders");
        let c = seed();
        assert_eq!(
            amqp_uri(c.rabbitmq.nodes[0].url.expose()).unwrap().vhost,
            "/"
        );
        // The repository's own file keeps the seed's form, so it stays tested.
        let c = parse(include_str!("../config/config.json"), &[]).unwrap();
        assert_eq!(
            c.rabbitmq.nodes[0].redacted,
            "amqp://guest:***@localhost:5672/"
        );
        assert_eq!(
            amqp_uri(c.rabbitmq.nodes[0].url.expose()).unwrap().vhost,
            "/"
        );
    }

    #[test]
    fn redact_url_hides_only_the_password() {
        assert_eq!(redact_url("amqp://u:p%40ss@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(redact_url("amqp://h:5672/%2f"), "amqp://h:5672/%2f");
        assert_eq!(redact_url("amqp://user@h/"), "amqp://user@h/");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn redact_url_hides_a_password_a_parser_would_cut_short() {
        assert_eq!(
            redact_url("amqp://guest:Zq9/kW7@127.0.0.1:5672/"),
            "amqp://guest:***@127.0.0.1:5672/"
        );
        assert_eq!(redact_url("amqp://u:a@b?c#d@h/v"), "amqp://u:***@h/v");
        assert_eq!(redact_url("guest:s3cret@h:5672"), "guest:***@h:5672");
        assert_eq!(redact_url("amqp://:s3cret@h/"), "amqp://:***@h/");
    }

    #[test]
    fn type_errors_of_secret_keys_never_echo_the_value() {
        let cases: [(&str, Value); 4] = [
            ("postgres.password", 73_195_046.into()),
            ("postgres.password", serde_json::json!({"v": "s3cret-obj"})),
            ("rabbitmq.url", 73_195_046.into()),
            ("rabbitmq.url", true.into()),
        ];
        for (key, value) in cases {
            let (block, field) = key.split_once('.').unwrap();
            let e = err(&edit(|v| v[block][field] = value.clone()), &[]);
            assert_eq!(
                e,
                format!("config.json: key {key}: expected a string; put the value in quotes")
            );
        }
    }

    #[test]
    fn no_error_message_quotes_a_secret() {
        // A URL a parser rejects whole, quoted by lapin's message.
        let e = err(
            SEED,
            &[("PUSHOCCURRENCE_RABBITMQ_URL", "relay:s3cret@localhost:5672")],
        );
        assert!(
            e.starts_with(
                "environment variable PUSHOCCURRENCE_RABBITMQ_URL (key rabbitmq.url): 'relay:***@localhost:5672'"
            ),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        // A message that would quote a secret for another reason.
        let e = ConfigError::new("x 'amqp://u:p%2Fw@h/' y p/w")
            .scrubbed(&url_secrets("amqp://u:p%2Fw@h/"));
        assert_eq!(e.to_string(), "x '***' y ***");
    }

    #[test]
    fn unknown_keys_are_reported_with_their_place() {
        let text = edit(|v| v["rabbitmq"]["queue"]["durabel"] = Value::Bool(true));
        let e = err(&text, &[]);
        assert!(e.contains("key rabbitmq.queue"), "{e}");
        assert!(e.contains("unknown field `durabel`"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let text = edit(|v| v["postgres"]["port"] = Value::String("5432x".into()));
        let e = err(&text, &[]);
        assert!(e.contains("key postgres.port"), "{e}");
    }

    #[test]
    fn missing_keys_name_the_block_and_field() {
        let text = edit(|v| {
            v["rabbitmq"].as_object_mut().unwrap().remove("queue");
        });
        let e = err(&text, &[]);
        assert!(
            e.contains("key rabbitmq") && e.contains("missing field `queue`"),
            "{e}"
        );
        let text = edit(|v| {
            v["rabbitmq"].as_object_mut().unwrap().remove("url");
        });
        let e = err(&text, &[]);
        assert!(
            e.starts_with("config.json: key rabbitmq.url: missing"),
            "{e}"
        );
    }

    #[test]
    fn a_cluster_is_given_as_a_list_of_nodes_each_checked_and_redacted() {
        let c = seed();
        assert_eq!(c.rabbitmq.nodes.len(), 1);
        assert!(c.rabbitmq.shuffle_nodes, "shuffled by default");
        let text = edit(|v| {
            v["rabbitmq"].as_object_mut().unwrap().remove("url");
            v["rabbitmq"]["urls"] =
                serde_json::json!(["amqp://u:Pw1@n1:5672/", "amqp://u:Pw1@n2:5673/%2f"]);
            v["rabbitmq"]["shuffle_urls"] = false.into();
        });
        let c = parse(&text, &[]).unwrap();
        let redacted: Vec<&str> = c
            .rabbitmq
            .nodes
            .iter()
            .map(|n| n.redacted.as_str())
            .collect();
        assert_eq!(
            redacted,
            ["amqp://u:***@n1:5672/", "amqp://u:***@n2:5673/%2f"]
        );
        assert!(!c.rabbitmq.shuffle_nodes);
        assert!(!format!("{c:?}").contains("Pw1"));
        let c = parse(
            SEED,
            &[
                ("PUSHOCCURRENCE_RABBITMQ_URL", ""),
                ("PUSHOCCURRENCE_RABBITMQ_URLS", "amqp://a/, amqp://b/"),
            ],
        );
        assert!(c.is_err(), "url and urls both set");
        let e = err(
            &edit(|v| v["rabbitmq"]["urls"] = serde_json::json!(["amqp://x/"])),
            &[],
        );
        assert!(
            e.starts_with("config.json: keys rabbitmq.url and rabbitmq.urls"),
            "{e}"
        );
        let e = err(
            &edit(|v| {
                v["rabbitmq"].as_object_mut().unwrap().remove("url");
                v["rabbitmq"]["urls"] = serde_json::json!(["amqp://u:Sec9@a/", "http://u:Sec9@b/"]);
            }),
            &[],
        );
        assert!(
            e.starts_with("config.json: key rabbitmq.urls[1]: 'http://u:***@b/'"),
            "{e}"
        );
        assert!(!e.contains("Sec9"), "{e}");
        let e = err(
            &edit(|v| {
                v["rabbitmq"].as_object_mut().unwrap().remove("url");
                v["rabbitmq"]["urls"] = serde_json::json!([]);
            }),
            &[],
        );
        assert!(
            e.starts_with("config.json: key rabbitmq.urls: list at least one"),
            "{e}"
        );
    }

    #[test]
    fn environment_overrides_every_kind() {
        let c = parse(
            SEED,
            &[
                ("PUSHOCCURRENCE_POSTGRES_PASSWORD", "12345"),
                ("PUSHOCCURRENCE_POSTGRES_PORT", "6543"),
                ("PUSHOCCURRENCE_RABBITMQ_QUEUE_DURABLE", "true"),
                ("PUSHOCCURRENCE_LISTENER_CHANNELS", "a, b"),
                ("PUSHOCCURRENCE_RELAY_BATCH_SIZE", "10"),
            ],
        )
        .unwrap();
        assert_eq!(c.postgres.password.unwrap().expose(), "12345");
        assert_eq!(c.postgres.servers[0].port, 6543);
        assert_eq!(c.channels, vec!["a", "b"]);
        assert_eq!(c.relay.batch_size, 10);
        assert_eq!(c.relay.workers, 10);
    }

    #[test]
    fn secrets_can_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let c = parse(
            SEED,
            &[(
                "PUSHOCCURRENCE_POSTGRES_PASSWORD_FILE",
                file.to_str().unwrap(),
            )],
        )
        .unwrap();
        assert_eq!(c.postgres.password.unwrap().expose(), "s3cret");
    }

    #[test]
    fn bad_environment_values_name_the_variable_and_key() {
        let e = err(SEED, &[("PUSHOCCURRENCE_POSTGRES_PORT", "many")]);
        assert!(
            e.contains("PUSHOCCURRENCE_POSTGRES_PORT") && e.contains("postgres.port"),
            "{e}"
        );
        let e = err(SEED, &[("PUSHOCCURRENCE_POSTGRES_PROT", "1")]);
        assert!(
            e.contains("PUSHOCCURRENCE_POSTGRES_PROT is not a setting"),
            "{e}"
        );
    }

    #[test]
    fn kubernetes_service_links_are_ignored_and_never_override_a_setting() {
        // What Kubernetes sets for Services named `pushoccurrence` and
        // `pushoccurrence-postgres` in the relay's namespace.
        let links = [
            ("PUSHOCCURRENCE_SERVICE_HOST", "10.0.0.1"),
            ("PUSHOCCURRENCE_SERVICE_PORT", "9780"),
            ("PUSHOCCURRENCE_SERVICE_PORT_METRICS", "9780"),
            ("PUSHOCCURRENCE_PORT", "tcp://10.0.0.1:9780"),
            ("PUSHOCCURRENCE_PORT_9780_TCP", "tcp://10.0.0.1:9780"),
            ("PUSHOCCURRENCE_PORT_9780_TCP_PROTO", "tcp"),
            ("PUSHOCCURRENCE_PORT_9780_TCP_PORT", "9780"),
            ("PUSHOCCURRENCE_PORT_9780_TCP_ADDR", "10.0.0.1"),
            ("PUSHOCCURRENCE_POSTGRES_SERVICE_HOST", "10.0.0.5"),
            ("PUSHOCCURRENCE_POSTGRES_SERVICE_PORT", "5432"),
            ("PUSHOCCURRENCE_POSTGRES_PORT", "tcp://10.0.0.5:5432"),
            ("PUSHOCCURRENCE_POSTGRES_PORT_5432_TCP_ADDR", "10.0.0.5"),
            (
                "PUSHOCCURRENCE_POSTGRES_PORT_5432_UDP",
                "udp://10.0.0.5:5432",
            ),
        ];
        let c = parse(SEED, &links).unwrap();
        assert_eq!(c.postgres.servers[0].port, 5432, "the file's port stands");
        assert_eq!(c.env_notes.warnings, Vec::<String>::new());
        assert_eq!(c.env_notes.ignored.len(), links.len(), "{:?}", c.env_notes);
        // A real port still overrides.
        let c = parse(SEED, &[("PUSHOCCURRENCE_POSTGRES_PORT", "6432")]).unwrap();
        assert_eq!(c.postgres.servers[0].port, 6432);
    }

    #[test]
    fn unknown_variables_are_warnings_and_likely_misspellings_are_errors() {
        let c = parse(SEED, &[("PUSHOCCURRENCE_TEAM", "payments")]).unwrap();
        assert_eq!(
            c.env_notes.warnings,
            ["environment variable PUSHOCCURRENCE_TEAM is not a setting of this relay; ignored"]
        );
        for (typo, meant) in [
            (
                "PUSHOCCURRENCE_POSTGRES_PROT",
                "PUSHOCCURRENCE_POSTGRES_PORT",
            ),
            (
                "PUSHOCCURRENCE_RELAY_BATCHSIZE",
                "PUSHOCCURRENCE_RELAY_BATCH_SIZE",
            ),
            (
                "PUSHOCCURRENCE_QUEUE_NAME",
                "PUSHOCCURRENCE_RABBITMQ_QUEUE_NAME",
            ),
            (
                "PUSHOCCURRENCE_RABBITMQ_URL_FLIE",
                "PUSHOCCURRENCE_RABBITMQ_URL_FILE",
            ),
            (
                "PUSHOCCURRENCE_POSTGRES_HOST_FILE",
                "PUSHOCCURRENCE_POSTGRES_HOST",
            ),
        ] {
            let e = err(SEED, &[(typo, "1")]);
            assert!(
                e.starts_with(&format!(
                    "environment variable {typo} is not a setting of this relay; did you mean {meant}"
                )),
                "{typo}: {e}"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_variable_that_is_not_utf8_never_panics() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let bad = || OsString::from_vec(vec![b'x', 0xff, b'y']);
        let vars = vec![
            (OsString::from("LANG_JUNK"), bad()),
            (OsString::from_vec(b"PUSHOCCURRENCE_\xff".to_vec()), bad()),
            (OsString::from("PUSHOCCURRENCE_TEAM"), bad()),
            (
                OsString::from("PUSHOCCURRENCE_LOG_FORMAT"),
                OsString::from("json"),
            ),
        ];
        let (env, warnings) = read_env(vars.into_iter()).unwrap();
        assert_eq!(
            env.keys().collect::<Vec<_>>(),
            ["PUSHOCCURRENCE_LOG_FORMAT"]
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        let e = read_env(vec![(OsString::from("PUSHOCCURRENCE_POSTGRES_HOST"), bad())].into_iter())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "environment variable PUSHOCCURRENCE_POSTGRES_HOST: its value is not valid UTF-8; set it as UTF-8 text"
        );
    }

    #[test]
    fn errors_blame_the_variable_or_the_file_that_set_the_value() {
        let e = err(SEED, &[("PUSHOCCURRENCE_POSTGRES_PORT", "70000")]);
        assert_eq!(
            e,
            "environment variable PUSHOCCURRENCE_POSTGRES_PORT (key postgres.port): invalid value: 70000, expected a whole number from 0 to 65535"
        );
        let e = err(SEED, &[("PUSHOCCURRENCE_RABBITMQ_RETRY_BUFFER_SIZE", "0")]);
        assert!(
            e.starts_with(
                "environment variable PUSHOCCURRENCE_RABBITMQ_RETRY_BUFFER_SIZE (key rabbitmq.retry.buffer_size): must be at least 1"
            ),
            "{e}"
        );
        let text = edit(|v| v["rabbitmq"]["retry"]["buffer_size"] = 0.into());
        let e = err(&text, &[]);
        assert!(
            e.starts_with("config.json: key rabbitmq.retry.buffer_size: must be at least 1"),
            "{e}"
        );
        let e = err(&edit(|v| v["relay"] = "fast".into()), &[]);
        assert_eq!(
            e,
            "config.json: key relay: invalid type: string \"fast\", expected an object"
        );
        let e = err(SEED, &[("PUSHOCCURRENCE_RABBITMQ_QUEUE_DURABLE", "false")]);
        assert!(
            e.starts_with(
                "config.json: key rabbitmq.queue (with PUSHOCCURRENCE_RABBITMQ_QUEUE_DURABLE from the environment): "
            ),
            "{e}"
        );
        let e = err(&edit(|v| v["postgres"]["port"] = (-1).into()), &[]);
        assert!(!e.contains("u16") && e.contains("0 to 65535"), "{e}");
    }

    #[test]
    fn a_byte_order_mark_is_accepted_and_a_key_given_twice_is_refused() {
        let c = parse(&format!("\u{feff}{SEED}"), &[]).unwrap();
        assert_eq!(c.postgres.servers[0].port, 5432);
        let twice = SEED.replacen(r#""port": 5432"#, r#""port": 5432, "port": 6432"#, 1);
        assert_ne!(twice, SEED);
        let e = err(&twice, &[]);
        assert!(
            e.starts_with(
                "config.json is not valid JSON: key postgres.port is given twice; keep one at line"
            ),
            "{e}"
        );
    }

    #[test]
    fn unsafe_queues_are_refused_unless_allowed() {
        let text = edit(|v| v["rabbitmq"]["queue"]["durable"] = Value::Bool(false));
        let e = err(&text, &[]);
        assert!(
            e.contains("durable is false") && e.contains("allow_unsafe"),
            "{e}"
        );
        let text = edit(|v| {
            v["rabbitmq"]["queue"]["exclusive"] = Value::Bool(true);
            v["rabbitmq"]["queue"]["allow_unsafe"] = Value::Bool(true);
        });
        assert!(parse(&text, &[]).is_ok());
    }

    #[test]
    fn queues_whose_length_limit_drops_confirmed_messages_are_refused_unless_allowed() {
        let with = |queue: &str, arguments: Value| {
            edit(|v| {
                if queue == "queue" {
                    v["rabbitmq"]["queue"]["arguments"] = arguments;
                } else {
                    v["rabbitmq"]["queues"] =
                        serde_json::json!([{"name": "more", "arguments": arguments}]);
                }
            })
        };
        for (queue, arguments, key) in [
            (
                "queue",
                serde_json::json!({"x-max-length": 1}),
                "key rabbitmq.queue:",
            ),
            (
                "queues",
                serde_json::json!({"x-max-length-bytes": 1024}),
                "key rabbitmq.queues[0]:",
            ),
            (
                "queue",
                serde_json::json!({"x-max-length": 1, "x-overflow": "drop-head"}),
                "key rabbitmq.queue:",
            ),
        ] {
            let e = err(&with(queue, arguments), &[]);
            assert!(
                e.starts_with(&format!("config.json: {key}"))
                    && e.contains("x-overflow")
                    && e.contains("allow_unsafe"),
                "{e}"
            );
        }
        for overflow in ["reject-publish", "reject-publish-dlx"] {
            let text = with(
                "queues",
                serde_json::json!({"x-max-length": 1, "x-overflow": overflow}),
            );
            assert!(parse(&text, &[]).is_ok(), "{overflow}");
        }
        let text = edit(|v| {
            v["rabbitmq"]["queue"]["arguments"] = serde_json::json!({"x-max-length": 1});
            v["rabbitmq"]["queue"]["allow_unsafe"] = Value::Bool(true);
        });
        assert!(parse(&text, &[]).is_ok());
    }

    #[test]
    fn out_of_range_values_are_refused() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| v["rabbitmq"]["retry"]["buffer_size"] = 0.into()),
                "rabbitmq.retry.buffer_size",
            ),
            (
                Box::new(|v| v["rabbitmq"]["retry"]["retry_delay_sec"] = (-1).into()),
                "rabbitmq.retry.retry_delay_sec",
            ),
            (
                Box::new(|v| v["listener"]["channels"] = Value::Array(vec![])),
                "listener.channels",
            ),
            (
                Box::new(|v| v["postgres"]["ssl_mode"] = "sometimes".into()),
                "postgres.ssl_mode",
            ),
            (
                Box::new(|v| v["postgres"]["schema"] = "x".repeat(64).into()),
                "postgres.schema",
            ),
            (
                Box::new(|v| v["rabbitmq"]["url"] = "http://x".into()),
                "rabbitmq.url",
            ),
            (
                Box::new(|v| v["rabbitmq"]["queue"]["name"] = "q".repeat(256).into()),
                "rabbitmq.queue.name",
            ),
        ];
        for (f, key) in cases {
            let e = err(&edit(f), &[]);
            assert!(e.contains(key), "expected {key} in: {e}");
        }
    }

    #[test]
    fn the_readme_documents_every_key_and_variable() {
        let readme = include_str!("../README.md");
        for (key, _) in ENV_KEYS {
            assert!(
                readme.contains(&format!("| `{key}` |")),
                "README lacks key {key}"
            );
            assert!(
                readme.contains(&env_name(key)),
                "README lacks {}",
                env_name(key)
            );
        }
    }

    #[test]
    fn routing_settings_are_read_with_their_defaults() {
        let c = seed();
        assert_eq!(c.rabbitmq.default_route.exchange, "");
        assert_eq!(c.rabbitmq.default_route.routing_key, "your_queue_name");
        assert!(c.rabbitmq.exchanges.is_empty() && c.rabbitmq.routes.is_empty());
        let text = edit(|v| {
            v["listener"]["channels"] = serde_json::json!(["your_notify_channel", "billing"]);
            v["rabbitmq"]["exchange"] = "events".into();
            v["rabbitmq"]["exchanges"] = serde_json::json!([{"name": "events", "type": "topic"}]);
            v["rabbitmq"]["queue"]["arguments"] = serde_json::json!({"x-queue-type": "quorum", "x-max-length": 1000, "x-overflow": "reject-publish"});
            v["rabbitmq"]["routes"] = serde_json::json!({"billing": {"routing_key": "billing"}});
        });
        let c = parse(&text, &[("PUSHOCCURRENCE_RABBITMQ_ROUTING_KEY", "all")]).unwrap();
        let mq = &c.rabbitmq;
        assert_eq!(
            (
                mq.default_route.exchange.as_str(),
                mq.default_route.routing_key.as_str()
            ),
            ("events", "all")
        );
        let billing = &mq.routes["billing"];
        assert_eq!(
            (billing.exchange.as_str(), billing.routing_key.as_str()),
            ("events", "billing")
        );
        assert_eq!(mq.exchanges[0].kind, lapin::ExchangeKind::Topic);
        assert!(mq.exchanges[0].durable);
        assert_eq!(
            mq.queue.arguments.inner()["x-max-length"],
            lapin::types::AMQPValue::LongLongInt(1000)
        );
    }

    #[test]
    fn bad_routing_settings_name_the_key() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|v| {
                    v["rabbitmq"]["exchanges"] =
                        serde_json::json!([{"name": "e", "type": "topick"}])
                }),
                "key rabbitmq.exchanges[0].type: unknown exchange type 'topick'",
            ),
            (
                Box::new(|v| {
                    v["rabbitmq"]["exchanges"] =
                        serde_json::json!([{"name": "amq.topic", "type": "topic"}])
                }),
                "key rabbitmq.exchanges[0].name: 'amq.topic' is one of the broker's own exchanges",
            ),
            (
                Box::new(|v| {
                    v["rabbitmq"]["queues"] = serde_json::json!([{"name": "q", "durable": false}])
                }),
                "key rabbitmq.queues[0]: durable is false",
            ),
            (
                Box::new(|v| {
                    v["rabbitmq"]["queue"]["arguments"] = serde_json::json!({"x-max-length": u64::MAX, "x-overflow": "reject-publish"})
                }),
                "key rabbitmq.queue.arguments: 'x-max-length'",
            ),
            (
                Box::new(|v| {
                    v["rabbitmq"]["routes"] = serde_json::json!({"nope": {"exchange": "e"}})
                }),
                "key rabbitmq.routes.nope: 'nope' is not in listener.channels",
            ),
            (
                Box::new(|v| {
                    v["rabbitmq"]["bindings"] = serde_json::json!([{"queue": "q", "exchange": ""}])
                }),
                "key rabbitmq.bindings[0].exchange: must not be empty",
            ),
            (
                Box::new(|v| v["rabbitmq"]["routing_key"] = "k".repeat(256).into()),
                "key rabbitmq.routing_key: 256 bytes long",
            ),
        ];
        for (f, expected) in cases {
            let e = err(&edit(f), &[]);
            assert!(
                e.starts_with(&format!("config.json: {expected}")),
                "expected '{expected}' in: {e}"
            );
        }
    }

    /// A CA certificate for tests that need a readable PEM file.
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBoTCCAUegAwIBAgIUOm8ri7SKVuox4NEK0ozQgmK0tQAwCgYIKoZIzj0EAwIw\nJTEjMCEGA1UEAwwacHVzaG9jY3VycmVuY2UgY29uZmlnIHRlc3QwIBcNMjYxMTI1\nMTMxMTAyWhgPMjEyNjExMDExMzExMDJaMCUxIzAhBgNVBAMMGnB1c2hvY2N1cnJl\nbmNlIGNvbmZpZyB0ZXN0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEeOldJW+p\nP3TuojcieGXC7z1hzDw3RFaY+qHld5bNQNj1IpuDmXcU99qFU5DJQwdlSzkNr3bu\nNpkjpNTWI7fd0aNTMFEwHQYDVR0OBBYEFLaVCytwkj3Adufwccy7/dV0JQJ3MB8G\nA1UdIwQYMBaAFLaVCytwkj3Adufwccy7/dV0JQJ3MA8GA1UdEwEB/wQFMAMBAf8w\nCgYIKoZIzj0EAwIDSAAwRQIgWjLVEEzFLMAjfn2YPxDc7nSeGPgXPppl7Lz/fgjm\nx8kCIQCvfodb6LVP7JdaubWKKfHkDTpcELessdKvbQc2BupGyw==\n-----END CERTIFICATE-----\n";

    #[test]
    fn the_example_production_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, TEST_CA).unwrap();
        let ca = ca.to_str().unwrap();
        let c = parse(
            include_str!("../deploy/config.production.json"),
            &[
                ("PUSHOCCURRENCE_POSTGRES_SSL_ROOT_CERT", ca),
                ("PUSHOCCURRENCE_RABBITMQ_CA_FILE", ca),
            ],
        )
        .unwrap();
        assert_eq!(c.postgres.ssl_mode, SslMode::VerifyFull);
        assert!(!c.postgres.auto_migrate);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.retention.unwrap().transferred_after,
            Duration::from_secs(7 * 24 * 3600)
        );
        assert_eq!(
            c.rabbitmq.queue.arguments.inner()["x-queue-type"],
            lapin::types::AMQPValue::LongString("quorum".into())
        );
    }

    #[test]
    fn tls_settings_are_checked_when_loaded() {
        let e = err(
            &edit(|v| v["postgres"]["ssl_mode"] = "verify-ca".into()),
            &[],
        );
        assert!(
            e.starts_with("config.json: key postgres.ssl_root_cert: ssl_mode 'verify-ca' checks"),
            "{e}"
        );
        let e = err(
            SEED,
            &[(
                "PUSHOCCURRENCE_POSTGRES_SSL_ROOT_CERT",
                "/nonexistent/ca.pem",
            )],
        );
        assert!(
            e.starts_with("environment variable PUSHOCCURRENCE_POSTGRES_SSL_ROOT_CERT (key postgres.ssl_root_cert): cannot read /nonexistent/ca.pem"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, TEST_CA).unwrap();
        let e = err(
            SEED,
            &[("PUSHOCCURRENCE_RABBITMQ_CA_FILE", ca.to_str().unwrap())],
        );
        assert!(
            e.starts_with("environment variable PUSHOCCURRENCE_RABBITMQ_CA_FILE (key rabbitmq.ca_file): set, but rabbitmq.url is not amqps://"),
            "{e}"
        );
    }

    #[test]
    fn only_an_admin_address_that_was_set_is_required() {
        let c = seed();
        assert_eq!(c.admin_listen, Some(DEFAULT_ADMIN_LISTEN.parse().unwrap()));
        assert!(!c.admin_required, "the seed's file has no admin section");
        let c = parse(&edit(|v| v["admin"] = serde_json::json!({})), &[]).unwrap();
        assert!(!c.admin_required);
        let c = parse(
            &edit(|v| v["admin"] = serde_json::json!({"listen": "127.0.0.1:9780"})),
            &[],
        )
        .unwrap();
        assert!(c.admin_required, "set in the file, even to the default");
        let c = parse(SEED, &[("PUSHOCCURRENCE_ADMIN_LISTEN", "127.0.0.1:9781")]).unwrap();
        assert!(c.admin_required);
        assert_eq!(c.admin_listen, Some("127.0.0.1:9781".parse().unwrap()));
        let c = parse(SEED, &[("PUSHOCCURRENCE_ADMIN_LISTEN", "")]).unwrap();
        assert_eq!(c.admin_listen, None);
    }

    #[test]
    fn batch_size_never_exceeds_half_the_in_flight_window() {
        let text = edit(|v| {
            v["rabbitmq"]["retry"]["buffer_size"] = 30.into();
            v["relay"] = serde_json::json!({"batch_size": 500});
        });
        let c = parse(&text, &[]).unwrap();
        assert_eq!((c.relay.batch_size, c.relay.workers), (15, 2));
    }
}
