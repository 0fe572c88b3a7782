//! RabbitMQ: the connection owner and the confirm-mode publisher.
//!
//! One task ([`BrokerLink`]) owns the AMQP connection. It connects with
//! capped, jittered back-off, declares the queue, and publishes its state in
//! a `tokio::sync::watch`, so every worker sees the latest value and no
//! reconnection signal can be taken by the wrong reader (the seed's `Connect`
//! race cannot happen). Each worker owns one channel in confirm mode
//! ([`publisher::Publisher`]); the relay never uses lapin's automatic
//! recovery, because the outbox table is the buffer: whatever was not
//! confirmed is simply claimed again.

pub mod publisher;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    Channel, Connection, ConnectionProperties, DefaultConnectionBuilder, Event, ExchangeKind,
};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::amqp::{self, channel_error, soft_kind};
use crate::backoff::Backoff;
use crate::config::{BrokerNode, ExchangeConfig, QueueConfig, RabbitConfig};

/// Heartbeat asked for when the URL sets none: a dead broker is noticed in
/// about two intervals.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// Connect timeout used when the URL sets none.
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
/// How often the owner double-checks the connection besides its events.
const STATUS_CHECK: Duration = Duration::from_secs(1);

/// What the workers need to know about the broker.
#[derive(Clone, Default)]
pub struct BrokerState {
    /// The live connection, if any.
    pub connection: Option<Arc<Connection>>,
    /// The broker blocked publishing (memory or disk alarm).
    pub blocked: bool,
    /// Part of the configured topology is gone (messages on a configured
    /// route come back unroutable, or its exchange is missing): what the
    /// workers saw, until a message on a configured route is confirmed.
    pub topology_fault: Option<String>,
}

impl BrokerState {
    /// A connection that may be published on right now.
    pub fn usable(&self) -> Option<&Arc<Connection>> {
        self.connection
            .as_ref()
            .filter(|c| !self.blocked && c.status().connected())
    }
}

impl std::fmt::Debug for BrokerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerState")
            .field("connected", &self.connection.is_some())
            .field("blocked", &self.blocked)
            .field("topology_fault", &self.topology_fault)
            .finish()
    }
}

/// What went wrong talking to the broker, in words an operator can act on,
/// with the client's error as the source. Nodes are named by their redacted
/// URLs: never a password.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A node's URL does not parse (config validation parses it first).
    #[error("invalid URL {node}: {source}")]
    InvalidUrl {
        /// The node, redacted.
        node: String,
        /// The parser's words.
        source: amqp::InvalidAmqpUrl,
    },
    /// `rabbitmq.ca_file` cannot be read.
    #[error("read rabbitmq.ca_file {}: {source}", .path.display())]
    ReadCaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The connection failed.
    #[error("connect to {node}: {source}")]
    Connect {
        /// The node, redacted.
        node: String,
        /// The client's error.
        source: Box<lapin::Error>,
    },
    /// The node accepted the connection and did not finish the handshake.
    #[error("connect to {node}: no AMQP handshake within {limit:?}")]
    NoHandshake {
        /// The node, redacted.
        node: String,
        /// How long it had.
        limit: Duration,
    },
    /// The node did not answer the declarations.
    #[error("declaring the topology on {node}: no answer within {limit:?}")]
    NoDeclareAnswer {
        /// The node, redacted.
        node: String,
        /// How long it had.
        limit: Duration,
    },
    /// A channel could not be opened.
    #[error("open a channel: {0}")]
    OpenChannel(#[source] Box<lapin::Error>),
    /// The broker refused to declare (or passively check) an exchange or a
    /// queue; the text says what to change, by the refusal's kind.
    #[error("{}", explain(.what, .key, .source))]
    Declare {
        /// `exchange 'x'`, `queue 'q'`.
        what: String,
        /// Where it is configured.
        key: String,
        /// The broker's refusal.
        source: Box<lapin::Error>,
    },
    /// The broker refused a configured binding.
    #[error(
        "binding queue '{queue}' to exchange '{exchange}' (rabbitmq.bindings[{index}]) failed: {source}; \
         both must be declared in the config or exist on the broker"
    )]
    Bind {
        /// The queue.
        queue: String,
        /// The exchange.
        exchange: String,
        /// Its place in `rabbitmq.bindings`.
        index: usize,
        /// The broker's refusal.
        source: Box<lapin::Error>,
    },
    /// A configured route names an exchange that is neither declared nor on
    /// the broker.
    #[error(
        "exchange '{exchange}' named by {key} does not exist; declare it in rabbitmq.exchanges"
    )]
    MissingExchange {
        /// The exchange.
        exchange: String,
        /// The route's key.
        key: String,
    },
    /// An exchange name too long to be asked about.
    #[error("exchange name of {0} bytes is too long for AMQP")]
    ExchangeNameTooLong(usize),
    /// Asking whether an exchange exists failed (other than "not found").
    #[error("check exchange '{name}': {source}")]
    CheckExchange {
        /// The exchange.
        name: String,
        /// The client's error.
        source: Box<lapin::Error>,
    },
    /// No node could be connected to: each node's failure, in the
    /// configured order (so the same outage reads the same whatever order
    /// the nodes were tried in).
    #[error("{}", join_failures(.0))]
    NoNode(Vec<BrokerError>),
}

/// The failures of several nodes, one after the other.
fn join_failures(failures: &[BrokerError]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Connects to the first of the broker's nodes that answers, tried in a new
/// random order each time unless `rabbitmq.shuffle_urls` is off, and
/// declares the topology. Returns the connection and the node's redacted
/// URL.
///
/// # Errors
/// Each node's failure, in the configured order (so the same outage reads
/// the same whatever order the nodes were tried in); never a password.
pub async fn connect(cfg: &RabbitConfig) -> Result<(Connection, String), BrokerError> {
    let mut order: Vec<(usize, &BrokerNode)> = cfg.nodes.iter().enumerate().collect();
    if cfg.shuffle_nodes {
        fastrand::shuffle(&mut order);
    }
    let mut failures = Vec::new();
    for (index, node) in order {
        match connect_node(cfg, node).await {
            Ok(connection) => return Ok((connection, node.redacted.clone())),
            Err(reason) => failures.push((index, reason)),
        }
    }
    failures.sort_by_key(|(index, _)| *index);
    Err(BrokerError::NoNode(
        failures.into_iter().map(|(_, reason)| reason).collect(),
    ))
}

/// Opens a connection to one node and declares the topology on a
/// short-lived channel.
///
/// # Errors
/// A description of the failure that never contains the password.
pub async fn connect_node(
    cfg: &RabbitConfig,
    node: &BrokerNode,
) -> Result<Connection, BrokerError> {
    let name = || node.redacted.clone();
    let mut uri: AMQPUri =
        amqp::parse_uri(node.url.expose()).map_err(|source| BrokerError::InvalidUrl {
            node: name(),
            source,
        })?;
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    let limit = Duration::from_millis(
        *uri.query
            .connection_timeout
            .get_or_insert(DEFAULT_CONNECT_TIMEOUT_MS),
    );
    let properties =
        ConnectionProperties::default().with_connection_name(cfg.connection_name.clone().into());
    // amqps:// trusts the system's CAs, and rabbitmq.ca_file's when given
    // (read at every connect, so a rotated file is picked up).
    let tls = match &cfg.ca_file {
        Some(path) => OwnedTLSConfig {
            identity: None,
            cert_chain: Some(std::fs::read_to_string(path).map_err(|source| {
                BrokerError::ReadCaFile {
                    path: path.clone(),
                    source,
                }
            })?),
        },
        None => OwnedTLSConfig::default(),
    };
    // lapin's connection_timeout covers only the TCP connect: a node that
    // accepts the connection and never speaks AMQP would hold this connect,
    // and every node after it, forever. The whole handshake gets the limit,
    // and so does the declaration.
    let connect_failed = |source| BrokerError::Connect {
        node: name(),
        source: Box::new(source),
    };
    let builder = DefaultConnectionBuilder::new()
        .map_err(connect_failed)?
        .with_uri(uri)
        .with_properties(properties)
        .with_tls_config(tls);
    let connection = tokio::time::timeout(limit, builder.connect())
        .await
        .map_err(|_| BrokerError::NoHandshake {
            node: name(),
            limit,
        })?
        .map_err(connect_failed)?;
    let declared = tokio::time::timeout(limit, declare_topology(&connection, cfg))
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::NoDeclareAnswer {
                node: name(),
                limit,
            })
        });
    if let Err(e) = declared {
        let _closed =
            tokio::time::timeout(limit, connection.close(200, "declaration failed".into())).await;
        return Err(e);
    }
    Ok(connection)
}

/// Declares what the config lists, in dependency order: exchanges, the
/// seed's queue and the further queues, bindings; then checks that every
/// exchange a configured route names exists, so a route can never point at
/// nothing (publishing to a missing exchange closes the channel).
///
/// # Errors
/// The first refusal, with the fix.
pub async fn declare_topology(
    connection: &Connection,
    cfg: &RabbitConfig,
) -> Result<(), BrokerError> {
    // A refusal closes the channel, and the first refusal ends the run.
    let channel = open_channel(connection).await?;
    for (i, exchange) in cfg.exchanges.iter().enumerate() {
        declare_exchange(&channel, exchange, &format!("rabbitmq.exchanges[{i}]")).await?;
    }
    declare_queue(&channel, &cfg.queue, "rabbitmq.queue").await?;
    for (i, queue) in cfg.queues.iter().enumerate() {
        declare_queue(&channel, queue, &format!("rabbitmq.queues[{i}]")).await?;
    }
    for (i, binding) in cfg.bindings.iter().enumerate() {
        channel
            .queue_bind(
                binding.queue.as_str().into(),
                binding.exchange.as_str().into(),
                binding.routing_key.as_str().into(),
                QueueBindOptions::default(),
                binding.arguments.clone(),
            )
            .await
            .map_err(|source| BrokerError::Bind {
                queue: binding.queue.clone(),
                exchange: binding.exchange.clone(),
                index: i,
                source: Box::new(source),
            })?;
    }
    let routes = std::iter::once(("rabbitmq.exchange".to_owned(), &cfg.default_route)).chain(
        cfg.routes
            .iter()
            .map(|(ch, r)| (format!("rabbitmq.routes.{ch}"), r)),
    );
    for (key, route) in routes {
        let declared = cfg.exchanges.iter().any(|x| x.name == route.exchange);
        if route.exchange.is_empty() || declared {
            continue;
        }
        if !exchange_exists(connection, &route.exchange).await? {
            return Err(BrokerError::MissingExchange {
                exchange: route.exchange.clone(),
                key,
            });
        }
    }
    let _closed = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Whether an exchange exists, asked with a passive declare on a channel of
/// its own (the broker closes the channel when the answer is no).
///
/// # Errors
/// Any failure other than "not found".
pub async fn exchange_exists(connection: &Connection, name: &str) -> Result<bool, BrokerError> {
    let name =
        ShortString::try_new(name).map_err(|_| BrokerError::ExchangeNameTooLong(name.len()))?;
    let channel = open_channel(connection).await?;
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    match channel
        .exchange_declare(
            name.clone(),
            ExchangeKind::Direct,
            options,
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => {
            let _closed = channel.close(200, "checked".into()).await;
            Ok(true)
        }
        Err(e) if channel_error(&e).and_then(soft_kind) == Some(&AMQPSoftError::NOTFOUND) => {
            Ok(false)
        }
        Err(source) => Err(BrokerError::CheckExchange {
            name: name.to_string(),
            source: Box::new(source),
        }),
    }
}

async fn open_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    connection
        .create_channel()
        .await
        .map_err(|e| BrokerError::OpenChannel(Box::new(e)))
}

/// A refused declaration of `what` (`exchange 'x'`, `queue 'q'`),
/// configured at `key`, as an operator can act on it: by the refusal's
/// kind, never its text.
fn explain(what: &str, key: &str, error: &lapin::Error) -> String {
    let text = error.to_string();
    match channel_error(error).and_then(soft_kind) {
        Some(AMQPSoftError::PRECONDITIONFAILED) => format!(
            "{what} already exists with other settings ({text}); make {key} match it, or delete the {what} so the relay can declare it"
        ),
        Some(AMQPSoftError::ACCESSREFUSED) => format!(
            "declaring {what} was refused ({text}); grant the user configure rights on it, or create it and set {key}.passive to true"
        ),
        Some(AMQPSoftError::NOTFOUND) => format!(
            "{what} does not exist ({text}); create it, or set {key}.passive to false so the relay declares it"
        ),
        _ => format!("declaring {what} ({key}): {text}"),
    }
}

/// Declares (or passively checks) one exchange.
async fn declare_exchange(
    channel: &Channel,
    exchange: &ExchangeConfig,
    key: &str,
) -> Result<(), BrokerError> {
    let options = ExchangeDeclareOptions {
        passive: exchange.passive,
        durable: exchange.durable,
        auto_delete: exchange.auto_delete,
        internal: exchange.internal,
        nowait: false,
    };
    channel
        .exchange_declare(
            exchange.name.as_str().into(),
            exchange.kind.clone(),
            options,
            exchange.arguments.clone(),
        )
        .await
        .map_err(|source| BrokerError::Declare {
            what: format!("exchange '{}'", exchange.name),
            key: key.to_owned(),
            source: Box::new(source),
        })
}

/// Declares (or passively checks) one queue.
async fn declare_queue(
    channel: &Channel,
    queue: &QueueConfig,
    key: &str,
) -> Result<(), BrokerError> {
    let options = QueueDeclareOptions {
        passive: queue.passive,
        durable: queue.durable,
        exclusive: queue.exclusive,
        auto_delete: queue.auto_delete,
        nowait: queue.no_wait,
    };
    channel
        .queue_declare(queue.name.as_str().into(), options, queue.arguments.clone())
        .await
        .map(|_| ())
        .map_err(|source| BrokerError::Declare {
            what: format!("queue '{}'", queue.name),
            key: key.to_owned(),
            source: Box::new(source),
        })
}

/// Owns the AMQP connection and publishes its state.
#[derive(Debug)]
pub struct BrokerLink {
    cfg: RabbitConfig,
    backoff: Backoff,
    state: watch::Sender<BrokerState>,
    /// Woken whenever publishing becomes possible again, so rows that waited
    /// through an outage go out at once instead of at the next sweep.
    wake: Arc<Notify>,
}

impl BrokerLink {
    /// A link that reports through `state` and wakes `wake` on (re)connect.
    pub fn new(
        cfg: RabbitConfig,
        backoff: Backoff,
        state: watch::Sender<BrokerState>,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            cfg,
            backoff,
            state,
            wake,
        }
    }

    /// Keeps a connection up until `token` is cancelled, then closes it.
    ///
    /// An outage is logged at ERROR once, at its first failed attempt; a
    /// later attempt failing for another reason is a WARN, the same reason
    /// again is DEBUG (operators alert on ERROR).
    ///
    /// A connection lost after it had been up for a while is replaced at
    /// once, without the back-off: on a cluster another node usually
    /// answers straight away (a node stopped for maintenance), and only a
    /// connect that fails waits.
    pub async fn run(mut self, token: CancellationToken) {
        let mut last_failure: Option<String> = None;
        loop {
            let outcome = tokio::select! {
                () = token.cancelled() => return,
                res = connect(&self.cfg) => res,
            };
            match outcome {
                Ok((connection, node)) => {
                    self.backoff.reset();
                    last_failure = None;
                    let up_since = std::time::Instant::now();
                    let stop = self.serve(Arc::new(connection), &node, &token).await;
                    self.state.send_replace(BrokerState::default());
                    if stop {
                        return;
                    }
                    if up_since.elapsed() >= self.cfg.retry_delay {
                        info!("reconnecting to rabbitmq at once");
                        continue;
                    }
                }
                Err(failure) => {
                    // Compared by its words: the same outage reads the same.
                    let reason = failure.to_string();
                    let attempt = self.backoff.attempts();
                    match &last_failure {
                        None => error!(%reason, attempt, "cannot connect to rabbitmq"),
                        Some(last) if *last == reason => {
                            debug!(%reason, attempt, "cannot connect to rabbitmq");
                        }
                        Some(_) => warn!(%reason, attempt, "cannot connect to rabbitmq"),
                    }
                    last_failure = Some(reason);
                }
            }
            let delay = self.backoff.next_delay();
            info!(retry_in = ?delay, "reconnecting to rabbitmq");
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Publishes `connection` and follows its events until it fails (returns
    /// `false`) or `token` is cancelled (closes it and returns `true`).
    async fn serve(
        &mut self,
        connection: Arc<Connection>,
        node: &str,
        token: &CancellationToken,
    ) -> bool {
        let mut events = connection.events_listener();
        self.state.send_replace(BrokerState {
            connection: Some(connection.clone()),
            blocked: connection.status().blocked(),
            topology_fault: None,
        });
        info!(url = %node, queue = %self.cfg.queue.name, "connected to rabbitmq");
        self.wake.notify_one();
        let mut status_check = tokio::time::interval(STATUS_CHECK);
        loop {
            tokio::select! {
                () = token.cancelled() => {
                    let close = connection.close(200, "relay stopping".into());
                    let _closed = tokio::time::timeout(Duration::from_secs(2), close).await;
                    return true;
                }
                event = events.next() => match event {
                    Some(Event::ConnectionBlocked(reason)) => {
                        warn!(%reason, "rabbitmq blocked publishing; pausing");
                        self.state.send_modify(|s| s.blocked = true);
                    }
                    Some(Event::ConnectionUnblocked) => {
                        info!("rabbitmq unblocked publishing; resuming");
                        self.state.send_modify(|s| s.blocked = false);
                        self.wake.notify_one();
                    }
                    // A channel-level error closed one channel; its owner
                    // replaces it, and the connection carries on.
                    Some(Event::Error(e)) if channel_error(&e).is_some() => {
                        debug!(error = %e, "the broker closed a channel");
                    }
                    Some(Event::Error(e)) => {
                        warn!(error = %e, "rabbitmq connection lost");
                        return false;
                    }
                    Some(_) => {}
                    None => {
                        warn!("rabbitmq connection events ended");
                        return false;
                    }
                },
                _ = status_check.tick() => {
                    if !connection.status().connected() {
                        warn!("rabbitmq connection is no longer open");
                        return false;
                    }
                }
            }
        }
    }
}
