//! The LISTEN loop: turns notifications into wake-ups of the workers.
//!
//! A notification is only a hint: its payload is never trusted and never
//! used to find a row. The listener owns one session of its own (LISTEN is
//! session state), pings it so a half-open socket is noticed, reconnects
//! with back-off on a fresh session, LISTENs again, and wakes the workers
//! right after every (re)connect, because notifications sent while it was
//! away are gone and only a sweep finds their rows.
//!
//! A session that LISTENs does not always hear: through a transaction
//! pooler (PgBouncer `pool_mode = transaction`) the LISTEN lands on whichever
//! server session ran that transaction, and notifications for it go nowhere
//! useful. So the listener proves it hears: it also LISTENs on a private
//! channel and NOTIFYs it from another session (the relay's regular address),
//! at every (re)connect and then at every ping. When the probe does not come
//! back it warns once, naming the fix (a direct connection for the listener:
//! `listener.host` / `listener.port`), sets `listener_deaf`, and the sweep
//! (every `rabbitmq.retry.idle_sleep_ms`) carries delivery meanwhile.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{SessionKind, describe, quote_ident, quote_literal};
use crate::amqp::AMQP_MAX_SHORT_STRING;
use crate::backoff::Backoff;
use crate::config::PostgresConfig;
use crate::metrics::Metrics;

/// How often the idle listener session is pinged and probed.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long a probe notification may take to come back. A session that
/// hears gets it within milliseconds; this only bounds the wait for one
/// that does not.
const PROBE_WAIT: Duration = Duration::from_secs(5);

/// A channel name of this process's own, for the probe: unique per process
/// and per listener, well under PostgreSQL's 63-byte identifier limit.
fn probe_channel() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("pushoccurrence_probe_{}_{nanos:x}_{n}", std::process::id())
}

/// Why a listener session (or a probe, or `status`'s check) failed, with
/// the driver's error as the source.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// No server could be connected to.
    #[error("connect: {}", describe(.0))]
    Connect(#[source] tokio_postgres::Error),
    /// `LISTEN` failed.
    #[error("LISTEN: {}", describe(.0))]
    Listen(#[source] tokio_postgres::Error),
    /// `LISTEN` got no answer in time.
    #[error("LISTEN: no answer within {0:?}")]
    ListenTimeout(Duration),
    /// The idle session's ping failed.
    #[error("ping: {}", describe(.0))]
    Ping(#[source] tokio_postgres::Error),
    /// The idle session's ping got no answer in time.
    #[error("ping got no answer within {0:?}")]
    PingTimeout(Duration),
    /// The session failed, or a statement on it (the probe's NOTIFY).
    #[error("{}", describe(.0))]
    Session(#[source] tokio_postgres::Error),
    /// A statement got no answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server ended the session.
    #[error("server closed the session")]
    Closed,
    /// The task polling the session ended abnormally.
    #[error("driver task failed: {0}")]
    Driver(#[source] tokio::task::JoinError),
}

/// What the last probe showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hearing {
    /// Not probed yet.
    Unknown,
    /// The probe came back.
    Hears,
    /// The probe did not come back.
    Deaf,
}

/// Sends the probe `nonce` on `channel` from `notifier` (a session other than
/// the listener's), opening it on `pg` when needed; `Err` when the probe
/// could not even be sent (the database is unreachable), which says nothing
/// about the listener.
async fn send_probe(
    notifier: &mut Option<tokio_postgres::Client>,
    pg: &PostgresConfig,
    channel: &str,
    nonce: &str,
) -> Result<(), ListenerError> {
    let limit = pg.query_timeout;
    if notifier
        .as_ref()
        .is_none_or(tokio_postgres::Client::is_closed)
    {
        *notifier = None;
        let client = super::connect(pg, SessionKind::Plain)
            .await
            .map_err(ListenerError::Connect)?;
        *notifier = Some(client);
    }
    let client = notifier.as_ref().expect("opened above");
    // The simple protocol: no prepared statement, so it works through any pooler.
    let sql = format!("NOTIFY {}, {}", quote_ident(channel), quote_literal(nonce));
    match tokio::time::timeout(limit, client.batch_execute(&sql)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            *notifier = None;
            Err(ListenerError::Session(e))
        }
        Err(_) => {
            *notifier = None;
            Err(ListenerError::Timeout(limit))
        }
    }
}

/// Waits (up to [`PROBE_WAIT`]) for `nonce` on `heard`; older nonces are
/// skipped.
async fn probe_heard(heard: &mut mpsc::UnboundedReceiver<String>, nonce: &str) -> bool {
    tokio::time::timeout(PROBE_WAIT, async {
        while let Some(payload) = heard.recv().await {
            if payload == nonce {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

/// Whether a session on `listen` hears a notification sent through
/// `notify` (for `pushoccurrence status`): `Ok(true)` when it does,
/// `Ok(false)` when it LISTENs but the probe never arrives.
///
/// # Errors
/// A session could not be opened or a statement failed.
pub async fn hears(
    listen: &PostgresConfig,
    notify: &PostgresConfig,
) -> Result<bool, ListenerError> {
    let (client, mut connection) = super::open_first_writable(listen)
        .await
        .map_err(ListenerError::Connect)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _sent = tx.send(n.payload().to_owned());
            }
        }
    });
    let channel = probe_channel();
    let result = async {
        client
            .batch_execute(&format!("LISTEN {}", quote_ident(&channel)))
            .await
            .map_err(ListenerError::Listen)?;
        let mut notifier = None;
        send_probe(&mut notifier, notify, &channel, "status").await?;
        Ok(probe_heard(&mut rx, "status").await)
    }
    .await;
    driver.abort();
    result
}

/// Owns the LISTEN session.
#[derive(Debug)]
pub struct Listener {
    /// Where the LISTEN session connects (`listener.host`/`listener.port`).
    pg: PostgresConfig,
    /// The relay's regular address, from which probes are sent.
    notify_pg: PostgresConfig,
    channels: Vec<String>,
    wake: Arc<Notify>,
    backoff: Backoff,
    /// `true` while LISTEN is in effect on a live session.
    listening: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    /// The sweep interval, for the warning of a deaf listener.
    idle_sleep: Duration,
    probe_channel: String,
    probes_sent: u64,
    hearing: Hearing,
    /// The session probes are sent from.
    notifier: Option<tokio_postgres::Client>,
}

impl Listener {
    /// A listener for `channels` that wakes `wake` on every notification;
    /// it connects where `pg` says for the listener ([`PostgresConfig::for_listener`])
    /// and probes from `pg`'s regular address.
    pub fn new(
        pg: &PostgresConfig,
        channels: Vec<String>,
        wake: Arc<Notify>,
        backoff: Backoff,
        listening: watch::Sender<bool>,
        metrics: Arc<Metrics>,
        idle_sleep: Duration,
    ) -> Self {
        Self {
            pg: pg.for_listener(),
            notify_pg: pg.clone(),
            channels,
            wake,
            backoff,
            listening,
            metrics,
            idle_sleep,
            probe_channel: probe_channel(),
            probes_sent: 0,
            hearing: Hearing::Unknown,
            notifier: None,
        }
    }

    /// Proves the session hears: NOTIFYs the probe channel from another
    /// session and waits for it on `heard`. Reports a change of state once
    /// (a warning naming the fix when deaf, a line when it hears again).
    async fn probe(&mut self, heard: &mut mpsc::UnboundedReceiver<String>) {
        self.probes_sent += 1;
        let nonce = self.probes_sent.to_string();
        if let Err(reason) = send_probe(
            &mut self.notifier,
            &self.notify_pg,
            &self.probe_channel,
            &nonce,
        )
        .await
        {
            // Says nothing about the listener: the state stays as it was.
            debug!(%reason, "cannot send the listener's probe notification");
            return;
        }
        let now = if probe_heard(heard, &nonce).await {
            Hearing::Hears
        } else {
            Hearing::Deaf
        };
        self.metrics
            .listener_deaf
            .set(i64::from(now == Hearing::Deaf));
        if now == self.hearing {
            return;
        }
        match now {
            Hearing::Deaf => warn!(
                listener = %self.pg.servers_text(),
                sweep_every = ?self.idle_sleep,
                "the listener does not hear notifications (its probe NOTIFY did not come back within {PROBE_WAIT:?}): \
                 LISTEN does not work through a transaction pooler; the relay is polling, so events wait up to \
                 rabbitmq.retry.idle_sleep_ms. Give the listener a direct connection to PostgreSQL: \
                 set listener.host and listener.port"
            ),
            Hearing::Hears if self.hearing == Hearing::Deaf => {
                info!("the listener hears notifications again");
            }
            _ => debug!("the listener hears its probe notification"),
        }
        self.hearing = now;
    }

    /// Listens until `token` is cancelled, reconnecting as often as needed.
    pub async fn run(mut self, token: CancellationToken) {
        let listen_sql: String = self
            .channels
            .iter()
            .chain([&self.probe_channel])
            .map(|c| format!("LISTEN {};", quote_ident(c)))
            .collect();
        while !token.is_cancelled() {
            match self.listen_once(&listen_sql, &token).await {
                Ok(()) => return,
                Err(reason) => {
                    self.listening.send_replace(false);
                    let delay = self.backoff.next_delay();
                    warn!(%reason, retry_in = ?delay, attempt = self.backoff.attempts(), "listener session lost");
                    tokio::select! {
                        () = token.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One session: connect, LISTEN, wake the workers, then forward
    /// notifications until the session fails (`Err`) or `token` is cancelled.
    async fn listen_once(
        &mut self,
        listen_sql: &str,
        token: &CancellationToken,
    ) -> Result<(), ListenerError> {
        let (probe_tx, mut probe_rx) = mpsc::unbounded_channel();
        let probe_channel = self.probe_channel.clone();
        // Bounded: a peer that accepts and never answers costs each server
        // its connect timeout, never the listener.
        let (client, mut connection) = tokio::select! {
            () = token.cancelled() => return Ok(()),
            res = super::open_first_writable(&self.pg) => res.map_err(ListenerError::Connect)?,
        };
        let limit = self.pg.query_timeout;
        // The driver must be polled for queries to progress; it never blocks
        // on the workers, because a `Notify` holds at most one permit.
        let wake = self.wake.clone();
        let mut driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) if n.channel() == probe_channel => {
                        let _sent = probe_tx.send(n.payload().to_owned());
                    }
                    Ok(AsyncMessage::Notification(n)) => {
                        // The payload is never used to find a row (anyone can
                        // NOTIFY), but a malformed one is worth a debug line.
                        let payload = n.payload();
                        if payload.is_empty() || payload.len() > AMQP_MAX_SHORT_STRING {
                            debug!(
                                channel = n.channel(),
                                len = payload.len(),
                                "notification payload is not a message id; sweeping anyway"
                            );
                        }
                        wake.notify_one();
                    }
                    Ok(_) => {}
                    Err(e) => return ListenerError::Session(e),
                }
            }
            ListenerError::Closed
        });
        let result = async {
            tokio::time::timeout(limit, client.batch_execute(listen_sql))
                .await
                .map_err(|_| ListenerError::ListenTimeout(limit))?
                .map_err(ListenerError::Listen)?;
            self.listening.send_replace(true);
            self.backoff.reset();
            info!(channels = ?self.channels, "listening");
            // Notifications sent before LISTEN took effect are lost: sweep.
            self.wake.notify_one();
            tokio::select! {
                () = token.cancelled() => return Ok(()),
                () = self.probe(&mut probe_rx) => {}
            }
            loop {
                tokio::select! {
                    () = token.cancelled() => return Ok(()),
                    reason = &mut driver => {
                        return Err(reason.unwrap_or_else(ListenerError::Driver));
                    }
                    () = tokio::time::sleep(PING_INTERVAL) => {
                                                match tokio::time::timeout(limit, client.simple_query("SELECT 1")).await {
                            Ok(Ok(_)) => tokio::select! {
                                () = token.cancelled() => return Ok(()),
                                () = self.probe(&mut probe_rx) => {}
                            },
                            Ok(Err(e)) => return Err(ListenerError::Ping(e)),
                            Err(_) => return Err(ListenerError::PingTimeout(limit)),
                        }
                    }
                }
            }
        }
        .await;
        driver.abort();
        result
    }
}
