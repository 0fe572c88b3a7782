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

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
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
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!("key admin.listen: cannot listen on {addr}: {e}; pick another address, or set it to \"\" to turn the endpoint off")
    })
}

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
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(token.cancelled_owned())
        .await
    {
        warn!(error = %e, "admin endpoint stopped");
    }
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
