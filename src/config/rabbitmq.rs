//! The `rabbitmq` block: the broker's nodes and the CA file for their TLS,
//! the declared topology and routes ([`super::topology`]), and the
//! reconnection delay of `rabbitmq.retry` (whose other two values size the
//! relay: [`super::RelayConfig`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::check::{optional_path, positive_secs};
use super::error::ConfigError;
use super::raw::RawRabbit;
use super::secret::{Secret, redact_url};
use super::topology::{self, BindingConfig, ExchangeConfig, QueueConfig, Route};
use crate::{amqp, tls};

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
    pub ca_file: Option<PathBuf>,
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

/// Checks the block; `channels` are the checked `listener.channels`, which
/// the routes are keyed by.
impl TryFrom<(RawRabbit, &[String])> for RabbitConfig {
    type Error = ConfigError;

    fn try_from((mq, channels): (RawRabbit, &[String])) -> Result<Self, ConfigError> {
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
            amqp::parse_uri(&url).map_err(|e| {
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
            tls::read_roots(path)
                .map_err(|e| ConfigError::new(format!("key rabbitmq.ca_file: {e}")))?;
        }
        let queue = topology::queue("rabbitmq.queue", mq.queue)?;
        let queues = mq
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| topology::queue(&format!("rabbitmq.queues[{i}]"), q))
            .collect::<Result<Vec<_>, _>>()?;
        let exchanges = topology::exchanges(mq.exchanges)?;
        let bindings = topology::bindings(mq.bindings)?;
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
        let (default_route, routes) = topology::routes(
            mq.exchange,
            mq.routing_key,
            &queue.name,
            mq.routes,
            channels,
        )?;
        Ok(Self {
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
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::amqp;
    use crate::config::Config;
    use crate::config::tests::{SEED, TEST_CA, edit, err, parse, seed};

    #[test]
    fn an_empty_vhost_path_means_the_default_vhost() {
        let vhost = |c: &Config| {
            amqp::parse_uri(c.rabbitmq.nodes[0].url.expose())
                .unwrap()
                .vhost
        };
        assert_eq!(vhost(&seed()), "/");
        // The repository's own file keeps the seed's form, so it stays tested.
        let c = parse(include_str!("../../config/config.json"), &[]).unwrap();
        assert_eq!(
            c.rabbitmq.nodes[0].redacted,
            "amqp://guest:***@localhost:5672/"
        );
        assert_eq!(vhost(&c), "/");
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
    fn a_ca_file_is_checked_when_loaded() {
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
}
