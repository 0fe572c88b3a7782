//! The environment overlay: the `PUSHOCCURRENCE_*` variables of
//! [`ENV_KEYS`] laid over the file's JSON (typed, so a numeric password
//! stays a string), secrets from files named by `<VAR>_FILE`, Kubernetes
//! service links and other unknown variables set aside, and errors blamed
//! on the variable or the file that set the value ([`Source`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::num::NonZeroUsize;

use serde_json::Value;

use super::error::ConfigError;
use super::secret::{SECRET_KEYS, url_secrets};

/// Prefix of every environment variable the relay reads.
pub const ENV_PREFIX: &str = "PUSHOCCURRENCE_";

/// tokio's own variable for the runtime's worker threads, read here with
/// the rest of the environment (see [`worker_threads`]).
pub const ENV_WORKER_THREADS: &str = "TOKIO_WORKER_THREADS";

/// Environment variable naming the config file (read by the CLI).
pub const ENV_CONFIG_PATH: &str = "PUSHOCCURRENCE_CONFIG";

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
    pub(super) fn is_secret(self) -> bool {
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
    ("relay.max_workers", EnvKind::Number),
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

/// `PUSHOCCURRENCE_*` variables that are not settings and were left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvNotes {
    /// Unknown variables, each with why it is ignored: logged as WARN.
    pub warnings: Vec<String>,
    /// Kubernetes service links and the like: logged at DEBUG.
    pub ignored: Vec<String>,
}

/// Whether serde's error path `path` is `key` or inside it.
pub(super) fn is_at_or_under(path: &str, key: &str) -> bool {
    path.strip_prefix(key)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// What [`apply_env`] did: which keys the environment set (by variable),
/// and the variables it left alone.
pub(super) struct Applied {
    pub(super) from_env: BTreeMap<String, String>,
    pub(super) notes: EnvNotes,
}

/// Lays the `PUSHOCCURRENCE_*` variables over the file's JSON.
pub(super) fn apply_env(
    json: &mut Value,
    env: &BTreeMap<String, String>,
) -> Result<Applied, ConfigError> {
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
pub(super) fn read_env(
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
pub(super) struct Source<'a> {
    pub(super) origin: &'a str,
    pub(super) from_env: &'a BTreeMap<String, String>,
}

impl Source<'_> {
    /// `environment variable X (key k)` or `<file>: key k`, for a key path
    /// as serde or a validation message names it (`rabbitmq.queues[0].name`).
    pub(super) fn of(&self, path: &str) -> String {
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
    pub(super) fn attribute(&self, error: ConfigError) -> ConfigError {
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

/// Every secret value the environment sets (each item of a list too), in
/// every form a message could quote it.
pub(super) fn secrets_in(env: &BTreeMap<String, String>) -> Vec<String> {
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
    secrets
}

/// The `PUSHOCCURRENCE_*` variables of this process, as [`read_env`] takes
/// them.
// The one read of the process's variables: every setting goes through
// ENV_KEYS, so it has a key, a documented variable and a check.
#[allow(clippy::disallowed_methods)]
pub(super) fn read_process_env() -> Result<(BTreeMap<String, String>, Vec<String>), ConfigError> {
    read_env(std::env::vars_os())
}

/// The runtime's worker threads as `TOKIO_WORKER_THREADS` sets them, or
/// `None` when it is unset. Read here rather than by tokio, so that a bad
/// value is a config error naming the variable.
///
/// # Errors
/// The variable is set to anything but a whole number of at least 1.
// The one read of tokio's variable, beside the relay's own.
#[allow(clippy::disallowed_methods)]
pub fn worker_threads() -> Result<Option<NonZeroUsize>, ConfigError> {
    parse_worker_threads(std::env::var_os(ENV_WORKER_THREADS))
}

fn parse_worker_threads(value: Option<OsString>) -> Result<Option<NonZeroUsize>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    value.parse().map(Some).map_err(|_| {
        ConfigError::new(format!(
            "environment variable {ENV_WORKER_THREADS}: expected a whole number of threads, at least 1, got '{value}'"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{SEED, edit, err, parse};

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
    fn worker_threads_are_a_positive_number_when_set() {
        let threads = |v: &str| parse_worker_threads(Some(v.into()));
        assert_eq!(parse_worker_threads(None).unwrap(), None);
        assert_eq!(threads("4").unwrap(), NonZeroUsize::new(4));
        for bad in ["0", "-1", "two", ""] {
            assert_eq!(
                threads(bad).unwrap_err().to_string(),
                format!(
                    "environment variable TOKIO_WORKER_THREADS: expected a whole number of threads, at least 1, got '{bad}'"
                )
            );
        }
    }

    #[test]
    fn the_readme_documents_every_key_and_variable() {
        let readme = include_str!("../../README.md");
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
}
