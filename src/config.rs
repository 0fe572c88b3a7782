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
    ("postgres.port", EnvKind::Number),
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

/// How to reach PostgreSQL and where the outbox lives.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
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
        let env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        Self::parse(&text, &env, &path.display().to_string())
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
        let mut json: Value = serde_json::from_str(&blank_comment_lines(text))
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
        let parsed = apply_env(&mut json, env).and_then(|()| {
            secrets.extend(secret_values(&json));
            let raw: RawConfig = serde_path_to_error::deserialize(json).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." {
                    ConfigError::new(format!("{origin}: {inner}"))
                } else if let Some(key) = SECRET_KEYS.iter().find(|k| is_at_or_under(&path, k)) {
                    // serde quotes the offending value ("invalid type:
                    // integer `73195046`"), which here is the secret.
                    ConfigError::new(format!(
                        "{origin}: key {key}: expected a string; put the value in quotes"
                    ))
                } else {
                    ConfigError::new(format!("{origin}: key {path}: {inner}"))
                }
            })?;
            Self::from_raw(raw)
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
        non_empty("postgres.database", &pg.database)?;
        non_empty("postgres.user", &pg.user)?;
        non_empty("postgres.application_name", &pg.application_name)?;
        if pg.port == 0 {
            return Err(ConfigError::new("key postgres.port: must be 1-65535"));
        }
        let connect_timeout =
            positive_secs("postgres.connect_timeout_sec", pg.connect_timeout_sec)?;
        let query_timeout = positive_ms("postgres.query_timeout_ms", pg.query_timeout_ms)?;

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
                host: pg.host,
                port: pg.port,
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

/// Lays the `PUSHOCCURRENCE_*` variables over the file's JSON.
fn apply_env(json: &mut Value, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    let mut known: Vec<String> = vec![ENV_CONFIG_PATH.to_owned()];
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
                (Some(v), None) => Some(v.clone()),
                (None, Some(file)) => Some(read_secret_file(&file_var, file)?),
                (None, None) => None,
            }
        } else {
            env.get(&var).cloned()
        };
        let Some(raw) = raw else { continue };
        let value = match kind {
            EnvKind::Text | EnvKind::Secret => Value::String(raw),
            EnvKind::Number => {
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
    }
    if let Some(unknown) = env.keys().find(|k| !known.contains(k)) {
        return Err(ConfigError::new(format!(
            "environment variable {unknown} is not a setting of this relay; the settings are {}",
            ENV_KEYS
                .iter()
                .map(|(k, _)| env_name(k))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
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
    port: u16,
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
fn default_pg_port() -> u16 {
    5432
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
            e.starts_with("key rabbitmq.url: 'relay:***@localhost:5672'"),
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
        assert!(e.starts_with("key rabbitmq.url: missing"), "{e}");
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
        assert!(e.starts_with("keys rabbitmq.url and rabbitmq.urls"), "{e}");
        let e = err(
            &edit(|v| {
                v["rabbitmq"].as_object_mut().unwrap().remove("url");
                v["rabbitmq"]["urls"] = serde_json::json!(["amqp://u:Sec9@a/", "http://u:Sec9@b/"]);
            }),
            &[],
        );
        assert!(
            e.starts_with("key rabbitmq.urls[1]: 'http://u:***@b/'"),
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
        assert!(e.starts_with("key rabbitmq.urls: list at least one"), "{e}");
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
        assert_eq!(c.postgres.port, 6543);
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
                e.starts_with(key) && e.contains("x-overflow") && e.contains("allow_unsafe"),
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
            assert!(e.starts_with(expected), "expected '{expected}' in: {e}");
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
            e.starts_with("key postgres.ssl_root_cert: ssl_mode 'verify-ca' checks"),
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
            e.starts_with("key postgres.ssl_root_cert: cannot read /nonexistent/ca.pem"),
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
            e.starts_with("key rabbitmq.ca_file: set, but rabbitmq.url is not amqps://"),
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
