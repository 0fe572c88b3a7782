//! The LISTEN loop: turns notifications into wake-ups of the workers.
//!
//! A notification is only a hint: its payload is never trusted and never
//! used to find a row. The listener owns one session of its own (LISTEN is
//! session state), pings it so a half-open socket is noticed, reconnects
//! with back-off on a fresh session, LISTENs again, and wakes the workers
//! right after every (re)connect, because notifications sent while it was
//! away are gone and only a sweep finds their rows.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Notify, watch};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{SessionKind, describe, quote_ident, session_config};
use crate::backoff::Backoff;
use crate::config::{AMQP_MAX_SHORT_STRING, PostgresConfig};

/// How often the idle listener session is pinged.
const PING_INTERVAL: Duration = Duration::from_secs(10);

/// Owns the LISTEN session.
#[derive(Debug)]
pub struct Listener {
    pg: PostgresConfig,
    channels: Vec<String>,
    wake: Arc<Notify>,
    backoff: Backoff,
    /// `true` while LISTEN is in effect on a live session.
    listening: watch::Sender<bool>,
}

impl Listener {
    /// A listener for `channels` that wakes `wake` on every notification.
    pub fn new(
        pg: PostgresConfig,
        channels: Vec<String>,
        wake: Arc<Notify>,
        backoff: Backoff,
        listening: watch::Sender<bool>,
    ) -> Self {
        Self {
            pg,
            channels,
            wake,
            backoff,
            listening,
        }
    }

    /// Listens until `token` is cancelled, reconnecting as often as needed.
    pub async fn run(mut self, token: CancellationToken) {
        let listen_sql: String = self
            .channels
            .iter()
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
    ) -> Result<(), String> {
        let session = session_config(&self.pg, SessionKind::Plain);
        // A peer that accepts and never answers must not hang the listener.
        let limit = self.pg.query_timeout;
        let connect = tokio::time::timeout(limit, session.connect(self.pg.tls.0.clone()));
        let (client, mut connection) = tokio::select! {
            () = token.cancelled() => return Ok(()),
            res = connect => res
                .map_err(|_| format!("connect: no answer within {limit:?}"))?
                .map_err(|e| format!("connect: {}", describe(&e)))?,
        };
        // The driver must be polled for queries to progress; it never blocks
        // on the workers, because a `Notify` holds at most one permit.
        let wake = self.wake.clone();
        let mut driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
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
                    Err(e) => return describe(&e),
                }
            }
            "server closed the session".to_owned()
        });
        let result = async {
                        tokio::time::timeout(limit, client.batch_execute(listen_sql))
                .await
                .map_err(|_| format!("LISTEN: no answer within {limit:?}"))?
                .map_err(|e| format!("LISTEN: {}", describe(&e)))?;
            self.listening.send_replace(true);
            self.backoff.reset();
            info!(channels = ?self.channels, "listening");
            // Notifications sent before LISTEN took effect are lost: sweep.
            self.wake.notify_one();
            loop {
                tokio::select! {
                    () = token.cancelled() => return Ok(()),
                    reason = &mut driver => {
                        return Err(reason.unwrap_or_else(|e| format!("driver task failed: {e}")));
                    }
                    () = tokio::time::sleep(PING_INTERVAL) => {
                                                match tokio::time::timeout(limit, client.simple_query("SELECT 1")).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => return Err(format!("ping: {}", describe(&e))),
                            Err(_) => return Err(format!("ping got no answer within {limit:?}")),
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
