//! The admin HTTP endpoint (`admin.listen`, local by default):
//!
//! * `/metrics`: every metric in the OpenMetrics text format.
//! * `/healthz`: 200 while the process answers. It never depends on
//!   PostgreSQL or RabbitMQ, so an outage of either cannot turn into a
//!   restart loop.
//! * `/readyz`: 200 when the broker connection is up and not blocked, the
//!   configured topology works, the listener is listening (which also
//!   shows PostgreSQL answers) and the relay makes progress
//!   ([`crate::progress`]: no rows left claimable, and not every batch
//!   failing, for `admin.stall_after_sec` without a commit); 503 naming
//!   what is missing otherwise. Idle is ready: nothing claimable is not a
//!   stall.
//!
//! The endpoint must never cost the relay its file descriptors: a flood of
//! half-open requests (headers never finished) once took a relay to its
//! file limit, after which the health checks and the AMQP client's
//! reconnects failed. So a request's headers must arrive within
//! [`HEADER_READ_TIMEOUT`], and at most [`MAX_CONNECTIONS`] connections are
//! open at once: past that the oldest is closed to make room, so a probe
//! that arrives during a flood is still served (a slot that waits for a
//! free one would queue it behind the flood).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::mq::BrokerState;

/// The content type Prometheus expects for the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    /// The relay's metrics.
    pub metrics: Arc<Metrics>,
    /// The broker link's state.
    pub broker: watch::Receiver<BrokerState>,
    /// Whether the listener is listening.
    pub listening: watch::Receiver<bool>,
}

/// Binds the endpoint's address.
///
/// # Errors
/// The address is taken or not local to this host; the text names the key.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Why the endpoint cannot listen on its address.
#[derive(Debug, thiserror::Error)]
#[error(
    "key admin.listen: cannot listen on {addr}: {source}; pick another address, or set it to \"\" to turn the endpoint off"
)]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// The system's refusal.
    pub source: std::io::Error,
}

/// How long a client may take to send a request's headers (and how long an
/// idle keep-alive connection stays open). Scrapers and probes send theirs
/// at once.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The most admin connections open at once.
pub const MAX_CONNECTIONS: usize = 256;

/// Serves the endpoint until `token` is cancelled.
pub async fn serve(listener: TcpListener, state: AdminState, token: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin endpoint listening: /metrics /healthz /readyz");
    }
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    let open = Arc::new(Mutex::new(OpenConnections::default()));
    let tracker = tokio_util::task::TaskTracker::new();
    let mut accept_failing = false;
    loop {
        let accepted = tokio::select! {
            () = token.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                accept_failing = false;
                stream
            }
            Err(e) => {
                // EMFILE and the like: the process is short of descriptors.
                // Wait a little rather than spin, and say so once.
                if !accept_failing {
                    warn!(error = %e, "admin endpoint cannot accept connections; retrying");
                    accept_failing = true;
                }
                tokio::select! {
                    () = token.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let evict = CancellationToken::new();
        let id = lock(&open).add(evict.clone());
        let stop = token.clone();
        let service = TowerToHyperService::new(app.clone());
        let open = Arc::clone(&open);
        tracker.spawn(async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                // Errors here are the client's (a reset, a timeout): nothing
                // to report.
                _ = connection.as_mut() => {}
                // Closed at once to make room: the descriptor is the point.
                () = evict.cancelled() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    // Bounded: a response in progress gets its moment.
                    let _finished =
                        tokio::time::timeout(HEADER_READ_TIMEOUT, connection).await;
                }
            }
            lock(&open).remove(id);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// The admin connections open now, oldest first, each with the token that
/// closes it at once.
#[derive(Default)]
struct OpenConnections {
    next_id: u64,
    open: VecDeque<(u64, CancellationToken)>,
}

impl OpenConnections {
    /// Registers a new connection, closing the oldest when full.
    fn add(&mut self, close: CancellationToken) -> u64 {
        while self.open.len() >= MAX_CONNECTIONS {
            if let Some((_, oldest)) = self.open.pop_front() {
                oldest.cancel();
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.open.push_back((id, close));
        id
    }

    fn remove(&mut self, id: u64) {
        self.open.retain(|(i, _)| *i != id);
    }
}

fn lock(open: &Mutex<OpenConnections>) -> std::sync::MutexGuard<'_, OpenConnections> {
    open.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS)],
        state.metrics.encode(),
    )
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let mut missing = not_ready(&state.broker.borrow(), *state.listening.borrow());
    missing.extend(state.metrics.progress.stalled(std::time::Instant::now()));
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join("; ")),
        )
    }
}

/// What keeps the relay from being ready, in words.
fn not_ready(broker: &BrokerState, listening: bool) -> Vec<String> {
    let mut missing = Vec::new();
    match &broker.connection {
        None => missing.push("rabbitmq not connected".to_owned()),
        Some(c) if !c.status().connected() => missing.push("rabbitmq not connected".to_owned()),
        Some(_) if broker.blocked => missing.push("rabbitmq blocked publishing".to_owned()),
        Some(_) => {}
    }
    if let Some(fault) = &broker.topology_fault {
        missing.push(format!("rabbitmq topology: {fault}"));
    }
    if !listening {
        missing.push("postgres listener not listening".to_owned());
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_missing() {
        assert_eq!(
            not_ready(&BrokerState::default(), false),
            ["rabbitmq not connected", "postgres listener not listening"]
        );
        assert_eq!(
            not_ready(&BrokerState::default(), true),
            ["rabbitmq not connected"]
        );
    }
}
