//! Where each message goes and what it carries, decided from its row alone:
//! each routing field is the row's column when set, else the route of the
//! NOTIFY channel recorded on the row (`rabbitmq.routes`), else the default
//! route (`rabbitmq.exchange`, `rabbitmq.routing_key`). Notifications
//! themselves are never read, because they are hints that can be lost; a
//! row routes the same way whoever wakes the relay.
//!
//! Properties a row sets are checked here, before anything is published: a
//! value the broker would refuse by closing the channel (an expiration that
//! is not a millisecond count, a priority over 255, a string over 255 bytes)
//! would fail the whole batch again and again, so it fails only its row.

use std::collections::{BTreeMap, HashSet};

use lapin::BasicProperties;
use lapin::types::ShortString;

use crate::amqp::{AMQP_MAX_SHORT_STRING, table};
use crate::config::{RabbitConfig, Route};

/// Headers whose JSON text is longer than this are not fetched at all.
pub const HEADERS_FETCH_LIMIT: i32 = 1024 * 1024;
/// RabbitMQ's largest per-message TTL (`expiration`), in milliseconds.
pub const MAX_EXPIRATION_MS: i64 = 4_294_967_295;

/// A row's optional message columns; `None` is SQL NULL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageFields {
    /// `exchange`.
    pub exchange: Option<String>,
    /// `routing_key`.
    pub routing_key: Option<String>,
    /// `headers` as JSON text, unless longer than [`HEADERS_FETCH_LIMIT`].
    pub headers: Option<String>,
    /// The length of `headers`' JSON text.
    pub headers_size: Option<i32>,
    /// `content_type`.
    pub content_type: Option<String>,
    /// `correlation_id`.
    pub correlation_id: Option<String>,
    /// `reply_to`.
    pub reply_to: Option<String>,
    /// `message_type`, the AMQP `type` property.
    pub message_type: Option<String>,
    /// `expiration_ms`, the AMQP `expiration` property.
    pub expiration_ms: Option<i64>,
    /// `priority`.
    pub priority: Option<i32>,
    /// `notify_channel`: the channel the producer notified.
    pub notify_channel: Option<String>,
}

/// Where one message goes and the properties its row gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    /// The exchange (`""` is the default exchange).
    pub exchange: ShortString,
    /// The routing key.
    pub routing_key: ShortString,
    /// Content type and the row's properties; the publisher adds the
    /// message id, timestamp and delivery mode.
    pub properties: BasicProperties,
    /// The exchange was named by the row, so it may not exist.
    pub exchange_from_row: bool,
    /// The message goes where the config sends messages: exchange and
    /// routing key came from the config, or the row named a pair the
    /// config also uses (a route, a binding, a declared queue through the
    /// default exchange). A return then means the configured topology is
    /// gone, not that the row is wrong.
    pub configured: bool,
}

/// Resolves rows to destinations with the configured routes.
#[derive(Debug, Clone)]
pub struct Router {
    default: Route,
    by_channel: BTreeMap<String, Route>,
    /// Every (exchange, routing key) the config itself routes by.
    configured: HashSet<(String, String)>,
    content_type: ShortString,
}

fn short(column: &str, value: &str) -> Result<ShortString, String> {
    ShortString::try_new(value).map_err(|_| {
        format!(
            "column {column} is {} bytes long; AMQP allows at most {AMQP_MAX_SHORT_STRING}",
            value.len()
        )
    })
}

impl Router {
    /// Routes from the config; `content_type` is used when a row sets none.
    pub fn new(cfg: &RabbitConfig, content_type: &str) -> Self {
        let routes = std::iter::once(&cfg.default_route).chain(cfg.routes.values());
        let queues = std::iter::once(&cfg.queue).chain(&cfg.queues);
        let configured = routes
            .map(|r| (r.exchange.clone(), r.routing_key.clone()))
            .chain(queues.map(|q| (String::new(), q.name.clone())))
            .chain(
                cfg.bindings
                    .iter()
                    .map(|b| (b.exchange.clone(), b.routing_key.clone())),
            )
            .collect();
        Self {
            default: cfg.default_route.clone(),
            by_channel: cfg.routes.clone(),
            configured,
            content_type: content_type.into(),
        }
    }

    /// The destination of a row, or why the row cannot be published.
    ///
    /// # Errors
    /// A reason naming the column at fault, stored on the row.
    pub fn resolve(&self, f: &MessageFields) -> Result<Destination, String> {
        let route = f
            .notify_channel
            .as_ref()
            .and_then(|channel| self.by_channel.get(channel))
            .unwrap_or(&self.default);
        let exchange = short("exchange", f.exchange.as_deref().unwrap_or(&route.exchange))?;
        let routing_key = short(
            "routing_key",
            f.routing_key.as_deref().unwrap_or(&route.routing_key),
        )?;
        let content_type = match &f.content_type {
            Some(ct) => short("content_type", ct)?,
            None => self.content_type.clone(),
        };
        let mut p = BasicProperties::default().with_content_type(content_type);
        if let Some(v) = &f.correlation_id {
            p = p.with_correlation_id(short("correlation_id", v)?);
        }
        if let Some(v) = &f.reply_to {
            p = p.with_reply_to(short("reply_to", v)?);
        }
        if let Some(v) = &f.message_type {
            p = p.with_type(short("message_type", v)?);
        }
        if let Some(ms) = f.expiration_ms {
            if !(0..=MAX_EXPIRATION_MS).contains(&ms) {
                return Err(format!(
                    "column expiration_ms is {ms}; RabbitMQ takes 0 to {MAX_EXPIRATION_MS} milliseconds"
                ));
            }
            p = p.with_expiration(ms.to_string().into());
        }
        if let Some(priority) = f.priority {
            let priority = u8::try_from(priority)
                .map_err(|_| format!("column priority is {priority}; AMQP takes 0 to 255"))?;
            p = p.with_priority(priority);
        }
        if let Some(size) = f.headers_size.filter(|s| *s > HEADERS_FETCH_LIMIT) {
            return Err(format!(
                "column headers holds {size} bytes of JSON; at most {} bytes of encoded headers fit in a message",
                table::MAX_TABLE_BYTES
            ));
        }
        if let Some(headers) = &f.headers {
            let headers = table::from_json_text(headers)
                .map_err(|reason| format!("column headers {reason}"))?;
            p = p.with_headers(headers);
        }
        let configured = (f.exchange.is_none() && f.routing_key.is_none())
            || self
                .configured
                .contains(&(exchange.to_string(), routing_key.to_string()));
        Ok(Destination {
            exchange_from_row: f.exchange.is_some(),
            configured,
            exchange,
            routing_key,
            properties: p,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::AMQPValue;

    fn router() -> Router {
        Router {
            default: Route {
                exchange: String::new(),
                routing_key: "seed".into(),
            },
            by_channel: BTreeMap::from([(
                "billing".to_owned(),
                Route {
                    exchange: "events".into(),
                    routing_key: "billing".into(),
                },
            )]),
            configured: HashSet::from([
                (String::new(), "seed".to_owned()),
                ("events".to_owned(), "billing".to_owned()),
            ]),
            content_type: "application/octet-stream".into(),
        }
    }

    #[test]
    fn a_row_naming_a_configured_route_itself_is_still_on_a_configured_route() {
        let d = router()
            .resolve(&MessageFields {
                routing_key: Some("seed".into()),
                ..MessageFields::default()
            })
            .unwrap();
        assert!(d.configured, "the seed queue, named by the row");
        let d = router()
            .resolve(&MessageFields {
                exchange: Some("events".into()),
                routing_key: Some("billing".into()),
                ..MessageFields::default()
            })
            .unwrap();
        assert!(d.configured && d.exchange_from_row);
    }

    #[test]
    fn a_row_without_fields_goes_where_the_config_says() {
        let d = router().resolve(&MessageFields::default()).unwrap();
        assert_eq!((d.exchange.as_str(), d.routing_key.as_str()), ("", "seed"));
        assert!(d.configured && !d.exchange_from_row);
        assert_eq!(
            d.properties.content_type().as_ref().unwrap().as_str(),
            "application/octet-stream"
        );
        assert!(d.properties.headers().is_none() && d.properties.priority().is_none());
    }

    #[test]
    fn each_field_falls_back_on_its_own_row_then_channel_then_default() {
        let r = router();
        let by_channel = r
            .resolve(&MessageFields {
                notify_channel: Some("billing".into()),
                ..MessageFields::default()
            })
            .unwrap();
        assert_eq!(
            (
                by_channel.exchange.as_str(),
                by_channel.routing_key.as_str()
            ),
            ("events", "billing")
        );
        assert!(by_channel.configured);
        let key_from_row = r
            .resolve(&MessageFields {
                notify_channel: Some("billing".into()),
                routing_key: Some("billing.refund".into()),
                ..MessageFields::default()
            })
            .unwrap();
        assert_eq!(
            (
                key_from_row.exchange.as_str(),
                key_from_row.routing_key.as_str()
            ),
            ("events", "billing.refund")
        );
        assert!(!key_from_row.configured && !key_from_row.exchange_from_row);
        let unknown_channel = r
            .resolve(&MessageFields {
                notify_channel: Some("other".into()),
                exchange: Some("audit".into()),
                ..MessageFields::default()
            })
            .unwrap();
        assert_eq!(
            (
                unknown_channel.exchange.as_str(),
                unknown_channel.routing_key.as_str()
            ),
            ("audit", "seed")
        );
        assert!(unknown_channel.exchange_from_row);
    }

    #[test]
    fn row_properties_are_carried_typed() {
        let d = router()
            .resolve(&MessageFields {
                content_type: Some("application/json".into()),
                correlation_id: Some("c-1".into()),
                reply_to: Some("replies".into()),
                message_type: Some("order.created".into()),
                expiration_ms: Some(MAX_EXPIRATION_MS),
                priority: Some(9),
                headers: Some(r#"{"n": 1, "tags": ["a"]}"#.into()),
                headers_size: Some(23),
                ..MessageFields::default()
            })
            .unwrap();
        let p = &d.properties;
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "c-1");
        assert_eq!(p.reply_to().as_ref().unwrap().as_str(), "replies");
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "order.created");
        assert_eq!(p.expiration().as_ref().unwrap().as_str(), "4294967295");
        assert_eq!(*p.priority(), Some(9));
        let headers = p.headers().as_ref().unwrap().inner();
        assert_eq!(headers["n"], AMQPValue::LongLongInt(1));
    }

    #[test]
    fn values_the_broker_would_refuse_fail_the_row_with_the_column() {
        let r = router();
        let cases = [
            (
                MessageFields {
                    priority: Some(256),
                    ..MessageFields::default()
                },
                "column priority is 256",
            ),
            (
                MessageFields {
                    expiration_ms: Some(-1),
                    ..MessageFields::default()
                },
                "column expiration_ms is -1",
            ),
            (
                MessageFields {
                    routing_key: Some("k".repeat(256)),
                    ..MessageFields::default()
                },
                "column routing_key is 256 bytes",
            ),
            (
                MessageFields {
                    headers: Some("[1]".into()),
                    headers_size: Some(3),
                    ..MessageFields::default()
                },
                "column headers must be a JSON object",
            ),
            (
                MessageFields {
                    headers: None,
                    headers_size: Some(HEADERS_FETCH_LIMIT + 1),
                    ..MessageFields::default()
                },
                "column headers holds",
            ),
        ];
        for (fields, expected) in cases {
            let err = r.resolve(&fields).unwrap_err();
            assert!(err.starts_with(expected), "{err}");
        }
    }
}
