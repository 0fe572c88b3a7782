//! The declared topology, the broker side of the config beyond the seed:
//! the queues, exchanges and bindings declared on every connect, and the
//! routes messages take when their row names none (`rabbitmq.exchange`,
//! `rabbitmq.routing_key`, `rabbitmq.routes` by NOTIFY channel).

use std::collections::BTreeMap;

use lapin::ExchangeKind;
use lapin::types::FieldTable;
use serde_json::{Map, Value};

use super::check::non_empty;
use super::error::ConfigError;
use super::raw::{RawBinding, RawExchange, RawQueue, RawRoute};
use crate::amqp::{AMQP_MAX_SHORT_STRING, table};

/// A queue the relay declares (or, when passive, only checks) on connect.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Queue name.
    pub name: String,
    /// Survives a broker restart; messages are then published persistent.
    pub durable: bool,
    /// Deleted when its last consumer leaves.
    pub auto_delete: bool,
    /// Owned by the declaring connection.
    pub exclusive: bool,
    /// Declare without waiting for the broker's reply.
    pub no_wait: bool,
    /// Only check that the queue exists; never create or change it.
    pub passive: bool,
    /// Declaration arguments (`x-queue-type`, `x-max-length`, ...).
    pub arguments: FieldTable,
}

/// An exchange the relay declares (or, when passive, only checks) on connect.
#[derive(Debug, Clone)]
pub struct ExchangeConfig {
    /// Exchange name.
    pub name: String,
    /// `direct`, `topic`, `fanout`, `headers`, or a plugin's `x-` type.
    pub kind: ExchangeKind,
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Only other exchanges may publish to it.
    pub internal: bool,
    /// Only check that the exchange exists.
    pub passive: bool,
    /// Declaration arguments (`alternate-exchange`, ...).
    pub arguments: FieldTable,
}

/// A queue binding declared on connect.
#[derive(Debug, Clone)]
pub struct BindingConfig {
    /// The bound queue.
    pub queue: String,
    /// The source exchange.
    pub exchange: String,
    /// Binding key (a pattern for topic exchanges).
    pub routing_key: String,
    /// Binding arguments (`x-match` and the header values for headers exchanges).
    pub arguments: FieldTable,
}

/// Where a message goes: an exchange (`""` is the default exchange) and a
/// routing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Exchange name.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
}

/// The exchange types RabbitMQ ships; plugins add `x-` types.
const EXCHANGE_TYPES: [(&str, ExchangeKind); 4] = [
    ("direct", ExchangeKind::Direct),
    ("topic", ExchangeKind::Topic),
    ("fanout", ExchangeKind::Fanout),
    ("headers", ExchangeKind::Headers),
];

fn short_string(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.len() > AMQP_MAX_SHORT_STRING {
        return Err(ConfigError::new(format!(
            "key {key}: {} bytes long; AMQP allows at most {AMQP_MAX_SHORT_STRING}",
            value.len()
        )));
    }
    Ok(())
}

/// Whether queue arguments set a length limit that, when reached, drops
/// messages from the head of the queue: RabbitMQ's default overflow
/// behaviour (`drop-head`), for classic and quorum queues alike. Only
/// `reject-publish` (and `reject-publish-dlx`) make a full queue nack new
/// messages instead, which leaves their rows pending.
fn drops_head(arguments: &Map<String, Value>) -> bool {
    let limited = ["x-max-length", "x-max-length-bytes"]
        .iter()
        .any(|k| arguments.contains_key(*k));
    let rejects = matches!(
        arguments.get("x-overflow").and_then(Value::as_str),
        Some("reject-publish" | "reject-publish-dlx")
    );
    limited && !rejects
}

fn arguments(key: &str, raw: &Map<String, Value>) -> Result<FieldTable, ConfigError> {
    table::from_json(raw)
        .map_err(|reason| ConfigError::new(format!("key {key}.arguments: {reason}")))
}

/// Validates one queue block (`rabbitmq.queue` or `rabbitmq.queues[i]`).
pub(super) fn queue(key: &str, raw: RawQueue) -> Result<QueueConfig, ConfigError> {
    non_empty(&format!("{key}.name"), &raw.name)?;
    short_string(&format!("{key}.name"), &raw.name)?;
    if raw.name.starts_with("amq.") && !raw.passive {
        return Err(ConfigError::new(format!(
            "key {key}.name: names starting with 'amq.' are reserved by the broker"
        )));
    }
    if !raw.allow_unsafe && !raw.passive {
        let unsafe_reason = if !raw.durable {
            Some("durable is false: a broker restart would lose confirmed messages")
        } else if raw.exclusive {
            Some("exclusive is true: the queue dies with the relay's own connection")
        } else if raw.auto_delete {
            Some(
                "auto_delete is true: the queue and its messages vanish when the last consumer leaves",
            )
        } else if drops_head(&raw.arguments) {
            Some(
                "arguments set a length limit (x-max-length or x-max-length-bytes) without \
                 \"x-overflow\": \"reject-publish\": a full queue drops its oldest messages, \
                 confirmed ones included; add \"x-overflow\": \"reject-publish\" (full queue: rows wait)",
            )
        } else {
            None
        };
        if let Some(reason) = unsafe_reason {
            return Err(ConfigError::new(format!(
                "key {key}: {reason}, so a publisher confirm would not mean the message is safe; \
                 fix the queue settings, or set {key}.allow_unsafe to true to accept the risk"
            )));
        }
    }
    Ok(QueueConfig {
        arguments: arguments(key, &raw.arguments)?,
        name: raw.name,
        durable: raw.durable,
        auto_delete: raw.auto_delete,
        exclusive: raw.exclusive,
        no_wait: raw.no_wait,
        passive: raw.passive,
    })
}

/// Validates `rabbitmq.exchanges`.
pub(super) fn exchanges(raw: Vec<RawExchange>) -> Result<Vec<ExchangeConfig>, ConfigError> {
    let mut out: Vec<ExchangeConfig> = Vec::with_capacity(raw.len());
    for (i, x) in raw.into_iter().enumerate() {
        let key = format!("rabbitmq.exchanges[{i}]");
        non_empty(&format!("{key}.name"), &x.name)?;
        short_string(&format!("{key}.name"), &x.name)?;
        if x.name.starts_with("amq.") && !x.passive {
            return Err(ConfigError::new(format!(
                "key {key}.name: '{}' is one of the broker's own exchanges; set passive to true to use it as it is",
                x.name
            )));
        }
        let kind = match EXCHANGE_TYPES.iter().find(|(name, _)| *name == x.kind) {
            Some((_, kind)) => kind.clone(),
            None if x.kind.starts_with("x-") => ExchangeKind::Custom(x.kind),
            None => {
                return Err(ConfigError::new(format!(
                    "key {key}.type: unknown exchange type '{}'; expected one of {}, or a plugin's x- type",
                    x.kind,
                    EXCHANGE_TYPES.map(|(name, _)| name).join(", ")
                )));
            }
        };
        if out.iter().any(|e| e.name == x.name) {
            return Err(ConfigError::new(format!(
                "key {key}.name: exchange '{}' is listed twice",
                x.name
            )));
        }
        out.push(ExchangeConfig {
            arguments: arguments(&key, &x.arguments)?,
            name: x.name,
            kind,
            durable: x.durable,
            auto_delete: x.auto_delete,
            internal: x.internal,
            passive: x.passive,
        });
    }
    Ok(out)
}

/// Validates `rabbitmq.bindings`.
pub(super) fn bindings(raw: Vec<RawBinding>) -> Result<Vec<BindingConfig>, ConfigError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, b)| {
            let key = format!("rabbitmq.bindings[{i}]");
            non_empty(&format!("{key}.queue"), &b.queue)?;
            non_empty(&format!("{key}.exchange"), &b.exchange)?;
            short_string(&format!("{key}.queue"), &b.queue)?;
            short_string(&format!("{key}.exchange"), &b.exchange)?;
            short_string(&format!("{key}.routing_key"), &b.routing_key)?;
            Ok(BindingConfig {
                arguments: arguments(&key, &b.arguments)?,
                queue: b.queue,
                exchange: b.exchange,
                routing_key: b.routing_key,
            })
        })
        .collect()
}

/// The default route and the routes by NOTIFY channel. A route's missing
/// parts fall back to the default route's.
pub(super) fn routes(
    exchange: String,
    routing_key: Option<String>,
    seed_queue: &str,
    raw: BTreeMap<String, RawRoute>,
    channels: &[String],
) -> Result<(Route, BTreeMap<String, Route>), ConfigError> {
    short_string("rabbitmq.exchange", &exchange)?;
    let default = Route {
        exchange,
        // The seed publishes to its queue through the default exchange.
        routing_key: routing_key.unwrap_or_else(|| seed_queue.to_owned()),
    };
    short_string("rabbitmq.routing_key", &default.routing_key)?;
    let mut routes = BTreeMap::new();
    for (channel, route) in raw {
        let key = format!("rabbitmq.routes.{channel}");
        if !channels.contains(&channel) {
            return Err(ConfigError::new(format!(
                "key {key}: '{channel}' is not in listener.channels; add it there or fix the name"
            )));
        }
        let route = Route {
            exchange: route.exchange.unwrap_or_else(|| default.exchange.clone()),
            routing_key: route
                .routing_key
                .unwrap_or_else(|| default.routing_key.clone()),
        };
        short_string(&format!("{key}.exchange"), &route.exchange)?;
        short_string(&format!("{key}.routing_key"), &route.routing_key)?;
        routes.insert(channel, route);
    }
    Ok((default, routes))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use crate::config::tests::{edit, err, parse, seed};

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
}
