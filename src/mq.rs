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

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, Event};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::{QueueConfig, RabbitConfig};

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
            .finish()
    }
}

/// Opens a connection and declares the queue on a short-lived channel.
///
/// # Errors
/// A description of the failure that never contains the password.
pub async fn connect(cfg: &RabbitConfig) -> Result<Connection, String> {
    let mut uri: AMQPUri = cfg
        .url
        .expose()
        .parse()
        .map_err(|e| format!("invalid URL {}: {e}", cfg.url_redacted))?;
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    uri.query
        .connection_timeout
        .get_or_insert(DEFAULT_CONNECT_TIMEOUT_MS);
    let properties =
        ConnectionProperties::default().with_connection_name(cfg.connection_name.clone().into());
    let connection = Connection::connect_uri(uri, properties)
        .await
        .map_err(|e| format!("connect to {}: {e}", cfg.url_redacted))?;
    if let Err(e) = declare_queue(&connection, &cfg.queue).await {
        let _closed = connection
            .close(200, "queue declaration failed".into())
            .await;
        return Err(e);
    }
    Ok(connection)
}

/// Declares the configured queue, explaining a mismatch with an existing one.
///
/// # Errors
/// The broker's refusal, with the fix.
pub async fn declare_queue(connection: &Connection, queue: &QueueConfig) -> Result<(), String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("open a channel: {e}"))?;
    let options = QueueDeclareOptions {
        passive: false,
        durable: queue.durable,
        exclusive: queue.exclusive,
        auto_delete: queue.auto_delete,
        nowait: queue.no_wait,
    };
    match channel
        .queue_declare(queue.name.as_str().into(), options, FieldTable::default())
        .await
    {
        Ok(_) => {
            let _closed = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(e) => {
            let text = e.to_string();
            if text.contains("PRECONDITION_FAILED") {
                Err(format!(
                    "queue '{}' already exists with other settings ({text}); make rabbitmq.queue match it, or delete the queue so the relay can declare it",
                    queue.name
                ))
            } else if text.contains("ACCESS_REFUSED") {
                Err(format!(
                    "declaring queue '{}' was refused ({text}); grant the user configure rights on it",
                    queue.name
                ))
            } else {
                Err(format!("declare queue '{}': {text}", queue.name))
            }
        }
    }
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
    pub async fn run(mut self, token: CancellationToken) {
        let mut last_failure: Option<String> = None;
        loop {
            let outcome = tokio::select! {
                () = token.cancelled() => return,
                res = connect(&self.cfg) => res,
            };
            match outcome {
                Ok(connection) => {
                    self.backoff.reset();
                    last_failure = None;
                    let stop = self.serve(Arc::new(connection), &token).await;
                    self.state.send_replace(BrokerState::default());
                    if stop {
                        return;
                    }
                }
                Err(reason) => {
                    // Say it loudly once; repeats of the same reason are debug.
                    let attempt = self.backoff.attempts();
                    if last_failure.as_ref() == Some(&reason) {
                        debug!(%reason, attempt, "cannot connect to rabbitmq");
                    } else {
                        error!(%reason, attempt, "cannot connect to rabbitmq");
                        last_failure = Some(reason);
                    }
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
    async fn serve(&mut self, connection: Arc<Connection>, token: &CancellationToken) -> bool {
        let mut events = connection.events_listener();
        self.state.send_replace(BrokerState {
            connection: Some(connection.clone()),
            blocked: connection.status().blocked(),
        });
        info!(url = %self.cfg.url_redacted, queue = %self.cfg.queue.name, "connected to rabbitmq");
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
