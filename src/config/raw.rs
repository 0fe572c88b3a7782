//! The file: whole-line `//` comments, JSON with every key given once, and
//! the serde shapes of each block with the seed's defaults. Nothing here
//! checks a value beyond its JSON type; the sections do.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};

/// Blanks lines whose first non-blank characters are `//`, so a config file
/// can explain itself. A JSON string cannot hold a raw line break, so such a
/// line is never inside a string; blanking (not removing) keeps the line
/// numbers of parse errors right.
pub(super) fn blank_comment_lines(text: &str) -> String {
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

/// Parses JSON like `serde_json::from_str`, but a key given twice in one
/// object is an error naming it (serde_json keeps the last silently, so
/// the first value an operator reads would not be the one in effect).
pub(super) fn strict_json(text: &str) -> Result<Value, serde_json::Error> {
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

/// serde's words for types (`u16`, `struct RawRelay`, `sequence`) in the
/// words of a JSON config file.
pub(super) fn plain_words(message: &str) -> String {
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) postgres: RawPostgres,
    pub(super) rabbitmq: RawRabbit,
    pub(super) listener: RawListener,
    #[serde(default)]
    pub(super) relay: RawRelay,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) retention: RawRetention,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPostgres {
    #[serde(default = "default_host")]
    pub(super) host: String,
    #[serde(default = "default_pg_port")]
    pub(super) port: RawPorts,
    pub(super) database: String,
    pub(super) user: String,
    #[serde(default)]
    pub(super) password: Option<String>,
    #[serde(default = "default_ssl_mode")]
    pub(super) ssl_mode: String,
    #[serde(default)]
    pub(super) ssl_root_cert: Option<String>,
    #[serde(default = "default_schema")]
    pub(super) schema: String,
    #[serde(default = "default_true")]
    pub(super) auto_migrate: bool,
    #[serde(default = "default_name")]
    pub(super) application_name: String,
    #[serde(default = "default_connect_timeout")]
    pub(super) connect_timeout_sec: f64,
    #[serde(default = "default_query_timeout")]
    pub(super) query_timeout_ms: u64,
    #[serde(default = "default_pooler")]
    pub(super) pooler: String,
}

fn default_pooler() -> String {
    "none".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRabbit {
    #[serde(default)]
    pub(super) url: Option<String>,
    #[serde(default)]
    pub(super) urls: Option<Vec<String>>,
    #[serde(default = "default_true")]
    pub(super) shuffle_urls: bool,
    #[serde(default = "default_name")]
    pub(super) connection_name: String,
    #[serde(default)]
    pub(super) ca_file: Option<String>,
    pub(super) queue: RawQueue,
    #[serde(default)]
    pub(super) retry: RawRetry,
    #[serde(default)]
    pub(super) exchange: String,
    #[serde(default)]
    pub(super) routing_key: Option<String>,
    #[serde(default)]
    pub(super) queues: Vec<RawQueue>,
    #[serde(default)]
    pub(super) exchanges: Vec<RawExchange>,
    #[serde(default)]
    pub(super) bindings: Vec<RawBinding>,
    #[serde(default)]
    pub(super) routes: BTreeMap<String, RawRoute>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRetry {
    pub(super) buffer_size: usize,
    pub(super) retry_delay_sec: f64,
    pub(super) idle_sleep_ms: u64,
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
pub(super) struct RawRetention {
    pub(super) transferred_after_sec: f64,
    pub(super) batch_size: usize,
    pub(super) interval_sec: f64,
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
pub(super) struct RawAdmin {
    /// `None` when neither the file nor the environment sets it.
    pub(super) listen: Option<String>,
    pub(super) stall_after_sec: f64,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: None,
            stall_after_sec: 60.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) format: String,
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
pub(super) struct RawListener {
    pub(super) channels: Vec<String>,
    #[serde(default)]
    pub(super) host: Option<String>,
    #[serde(default)]
    pub(super) port: Option<RawPorts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRelay {
    pub(super) batch_size: usize,
    /// `None`: `relay::DEFAULT_MAX_WORKERS`,
    /// or the window's batches when more.
    pub(super) max_workers: Option<usize>,
    pub(super) confirm_timeout_ms: u64,
    pub(super) shutdown_grace_ms: u64,
    pub(super) max_retry_delay_sec: f64,
    pub(super) max_attempts: u32,
    pub(super) attempt_delay_ms: u64,
    pub(super) max_message_bytes: u64,
    pub(super) max_batch_bytes: u64,
}

impl Default for RawRelay {
    fn default() -> Self {
        Self {
            batch_size: 128,
            max_workers: None,
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
pub(super) struct RawPorts(pub(super) Vec<u16>);

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

pub(super) fn default_true() -> bool {
    true
}

fn default_connect_timeout() -> f64 {
    10.0
}

fn default_query_timeout() -> u64 {
    30_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub(super) name: String,
    #[serde(default = "default_true")]
    pub(super) durable: bool,
    #[serde(default)]
    pub(super) auto_delete: bool,
    #[serde(default)]
    pub(super) exclusive: bool,
    #[serde(default)]
    pub(super) no_wait: bool,
    #[serde(default)]
    pub(super) passive: bool,
    #[serde(default)]
    pub(super) allow_unsafe: bool,
    #[serde(default)]
    pub(super) arguments: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExchange {
    pub(super) name: String,
    #[serde(rename = "type", default = "default_exchange_type")]
    pub(super) kind: String,
    #[serde(default = "default_true")]
    pub(super) durable: bool,
    #[serde(default)]
    pub(super) auto_delete: bool,
    #[serde(default)]
    pub(super) internal: bool,
    #[serde(default)]
    pub(super) passive: bool,
    #[serde(default)]
    pub(super) arguments: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBinding {
    pub(super) queue: String,
    pub(super) exchange: String,
    #[serde(default)]
    pub(super) routing_key: String,
    #[serde(default)]
    pub(super) arguments: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    #[serde(default)]
    pub(super) exchange: Option<String>,
    #[serde(default)]
    pub(super) routing_key: Option<String>,
}

fn default_exchange_type() -> String {
    "direct".to_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use crate::config::tests::{SEED, edit, err, parse};

    #[test]
    fn whole_line_comments_are_allowed_and_errors_keep_their_line() {
        let text = "// the relay's config\n{\n  // where the outbox lives\n  \"postgres\": {\"database\": \"d\", \"user\": \"u\", \"password\": \"a//b\"},\n  \"rabbitmq\": {\"url\": \"amqp://h/\", \"queue\": {\"name\": \"q\"}},\n  \"listener\": {\"channels\": [\"c\"]}\n}";
        let c = parse(text, &[]).unwrap();
        assert_eq!(c.postgres.password.unwrap().expose(), "a//b");
        let e = err("// comment\n{\n  \"postgres\": nope\n}", &[]);
        assert!(e.contains("line 3"), "{e}");
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
}
