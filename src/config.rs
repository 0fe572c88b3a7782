//! Configuration: the seed's `config/config.json`, optional extensions with
//! defaults, environment overrides, and validation into typed settings.
//!
//! Loading goes by phase, a file each. The file is read into JSON
//! ([`raw`]: whole-line comments, every key once), environment variables
//! from [`ENV_KEYS`] are laid over it ([`env`]: typed values, `_FILE`
//! secrets, Kubernetes service links set aside), and the result is
//! deserialized into `Raw*` structs that reject unknown keys ([`raw`]).
//! Each section then checks its own values into its typed settings, one
//! `TryFrom` next to each type: [`postgres`], [`listener`], [`rabbitmq`]
//! (with the declared [`topology`]), [`relay`], [`logging`], [`admin`] and
//! [`retention`], sharing the checks of [`check`]. [`Config::from_raw`]
//! puts the sections together.
//!
//! Every error ([`ConfigError`]) names the key (and the environment
//! variable when one was involved); passwords are held in [`Secret`] and
//! never printed. No error quotes a secret, for any input: a secret key of
//! the wrong type gets a message without its value, URLs are redacted
//! over-eagerly ([`redact_url`]), and every message is scrubbed of the
//! secret values in effect ([`secret`]), in case a library's text quotes
//! one.
//!
//! Unknown `PUSHOCCURRENCE_*` variables never stop the relay: Kubernetes
//! injects service links (`PUSHOCCURRENCE_PORT=tcp://…`,
//! `PUSHOCCURRENCE_SERVICE_HOST`, …) for a Service named `pushoccurrence`,
//! and those are ignored; anything else unknown is a warning, except a
//! likely misspelling of a real setting, which is an error naming the
//! setting meant (the operator thinks it took effect).
//!
//! This is the only module that reads the process environment, and it
//! depends on no other module of the relay but the ones below it ([`tls`]
//! to read root certificates, [`amqp`] for the broker's limits).
//!
//! [`tls`]: crate::tls
//! [`amqp`]: crate::amqp

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::Path;

mod admin;
mod check;
mod env;
mod error;
mod listener;
mod logging;
mod postgres;
mod rabbitmq;
mod raw;
mod relay;
mod retention;
mod secret;
mod topology;

pub use admin::{AdminConfig, DEFAULT_ADMIN_LISTEN};
pub use env::{
    ENV_CONFIG_PATH, ENV_KEYS, ENV_PREFIX, ENV_WORKER_THREADS, EnvKind, EnvNotes, env_name,
    worker_threads,
};
pub use error::ConfigError;
pub use logging::LogFormat;
pub use postgres::{PgServer, Pooler, PostgresConfig};
pub use rabbitmq::{BrokerNode, RabbitConfig};
pub use relay::RelayConfig;
pub use retention::RetentionConfig;
pub use secret::{Secret, redact_url};
pub use topology::{BindingConfig, ExchangeConfig, QueueConfig, Route};

use env::{Source, apply_env, is_at_or_under, read_process_env, secrets_in};
use listener::Listener;
use raw::{RawConfig, blank_comment_lines, plain_words, strict_json};
use secret::{SECRET_KEYS, secret_values};

/// Default config file path, as in the seed.
pub const DEFAULT_CONFIG_PATH: &str = "config/config.json";

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
    /// The admin endpoint.
    pub admin: AdminConfig,
    /// Deletion of old transferred rows; `None` keeps them forever.
    pub retention: Option<RetentionConfig>,
    /// What the environment held that is not a setting (logged once
    /// logging is set up, which needs the config first).
    pub env_notes: EnvNotes,
    /// The async runtime's worker threads (`TOKIO_WORKER_THREADS`); `None`
    /// leaves the relay's default, one.
    pub worker_threads: Option<NonZeroUsize>,
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
        let (env, unreadable) = read_process_env()?;
        let mut config = Self::parse(&text, &env, &path.display().to_string())?;
        config.env_notes.warnings.extend(unreadable);
        config.worker_threads = worker_threads()?;
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
        let mut secrets = secrets_in(env);
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
                        let item = path.starts_with(&format!("{key}["));
                        ConfigError::new(format!(
                            "{}: expected a string; put the value in quotes",
                            source.of(if item { &path } else { key })
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

    /// Checks the raw values section by section into typed settings. A
    /// section that needs another's values comes after it: the listener's
    /// address goes with the PostgreSQL settings, the routes are keyed by
    /// the listener's channels, and the relay's window is the seed's
    /// `rabbitmq.retry.buffer_size`.
    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let RawConfig {
            postgres,
            rabbitmq,
            listener,
            relay,
            log,
            admin,
            retention,
        } = raw;
        let retention = Option::<RetentionConfig>::try_from(retention)?;
        let admin = AdminConfig::try_from(admin)?;
        let log_format = LogFormat::try_from(log)?;
        let postgres = PostgresConfig::try_from((postgres, &listener))?;
        let listener = Listener::try_from(listener)?;
        let retry = rabbitmq.retry;
        let rabbitmq = RabbitConfig::try_from((rabbitmq, listener.channels.as_slice()))?;
        let relay = RelayConfig::try_from((relay, retry, rabbitmq.retry_delay))?;
        Ok(Self {
            postgres,
            rabbitmq,
            channels: listener.channels,
            relay,
            log_format,
            admin,
            retention,
            env_notes: EnvNotes::default(),
            worker_threads: None,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::tls::SslMode;

    /// The seed's example config, parsed.
    pub(crate) fn seed() -> Config {
        parse(SEED, &[]).unwrap()
    }

    /// The seed's example config.
    pub(crate) const SEED: &str = r#"{
      "postgres": {"host": "localhost", "port": 5432, "database": "your_db_name",
                   "user": "your_db_user", "password": "your_db_password", "ssl_mode": "disable"},
      "rabbitmq": {"url": "amqp://guest:guest@localhost:5672/",
                   "queue": {"name": "your_queue_name", "durable": true, "auto_delete": false,
                             "exclusive": false, "no_wait": false},
                   "retry": {"buffer_size": 100, "retry_delay_sec": 5, "idle_sleep_ms": 100}},
      "listener": {"channels": ["your_notify_channel"]}
    }"#;

    /// `text` parsed as `config.json` with the environment `env`.
    pub(crate) fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::parse(text, &env, "config.json")
    }

    /// The seed's config, changed by `f`.
    pub(crate) fn edit(f: impl FnOnce(&mut Value)) -> String {
        let mut v: Value = serde_json::from_str(SEED).unwrap();
        f(&mut v);
        v.to_string()
    }

    /// The error `text` and `env` make.
    pub(crate) fn err(text: &str, env: &[(&str, &str)]) -> String {
        parse(text, env).unwrap_err().to_string()
    }

    /// A CA certificate for tests that need a readable PEM file.
    pub(crate) const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBoTCCAUegAwIBAgIUOm8ri7SKVuox4NEK0ozQgmK0tQAwCgYIKoZIzj0EAwIw\nJTEjMCEGA1UEAwwacHVzaG9jY3VycmVuY2UgY29uZmlnIHRlc3QwIBcNMjYxMTI1\nMTMxMTAyWhgPMjEyNjExMDExMzExMDJaMCUxIzAhBgNVBAMMGnB1c2hvY2N1cnJl\nbmNlIGNvbmZpZyB0ZXN0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEeOldJW+p\nP3TuojcieGXC7z1hzDw3RFaY+qHld5bNQNj1IpuDmXcU99qFU5DJQwdlSzkNr3bu\nNpkjpNTWI7fd0aNTMFEwHQYDVR0OBBYEFLaVCytwkj3Adufwccy7/dV0JQJ3MB8G\nA1UdIwQYMBaAFLaVCytwkj3Adufwccy7/dV0JQJ3MA8GA1UdEwEB/wQFMAMBAf8w\nCgYIKoZIzj0EAwIDSAAwRQIgWjLVEEzFLMAjfn2YPxDc7nSeGPgXPppl7Lz/fgjm\nx8kCIQCvfodb6LVP7JdaubWKKfHkDTpcELessdKvbQc2BupGyw==\n-----END CERTIFICATE-----\n";

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
}
