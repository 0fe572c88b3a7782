//! What the relay counts and measures, in one explicit Prometheus registry,
//! and the task that follows the connections' states into it.
//!
//! Counters are added per batch, never per message, so the hot path pays a
//! few atomic adds. Labels never carry message ids, routing keys or error
//! texts (unbounded cardinality); the only label is the connection's name.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::mq::BrokerState;

/// The name every metric starts with.
pub const PREFIX: &str = "pushoccurrence";

/// Which long-lived connection a state or reconnection count is about.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabel {
    /// `rabbitmq` or `postgres_listener`.
    pub connection: &'static str,
}

const RABBITMQ: ConnectionLabel = ConnectionLabel {
    connection: "rabbitmq",
};
const LISTENER: ConnectionLabel = ConnectionLabel {
    connection: "postgres_listener",
};

/// Every metric of one relay.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Messages handed to the broker.
    pub published: Counter,
    /// Messages the broker confirmed (and whose rows were then marked).
    pub confirmed: Counter,
    /// Messages the broker nacked.
    pub nacked: Counter,
    /// Messages the broker returned as unroutable.
    pub returned: Counter,
    /// Failed attempts recorded on rows (bad input, unroutable).
    pub failed: Counter,
    /// Rows parked.
    pub parked: Counter,
    /// Batches committed.
    pub batches: Counter,
    /// Rows claimed per batch.
    pub batch_size: Histogram,
    /// Time from the start of a batch to its messages being ready.
    pub claim_seconds: Histogram,
    /// Time from publishing a batch to its last confirm.
    pub confirm_seconds: Histogram,
    /// Rows waiting to be relayed (sampled).
    pub pending_rows: Gauge,
    /// Age of the oldest waiting row (sampled).
    pub oldest_pending_seconds: Gauge<f64, AtomicU64>,
    /// 1 while a connection is up (the broker's: up and not blocked).
    pub connected: Family<ConnectionLabel, Gauge>,
    /// Times a connection came back after being lost.
    pub reconnects: Family<ConnectionLabel, Counter>,
    /// 1 while part of the configured topology is missing or refused.
    pub topology_broken: Gauge,
    /// Claim sessions replaced after an error.
    pub session_reconnects: Counter,
    /// Transferred rows deleted by retention.
    pub rows_deleted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered under [`PREFIX`].
    pub fn new() -> Self {
        let mut root = Registry::with_prefix(PREFIX);
        let r = &mut root;
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let published = counter(r, "messages_published", "Messages handed to the broker");
        let confirmed = counter(
            r,
            "messages_confirmed",
            "Messages the broker confirmed; their rows are marked transferred",
        );
        let nacked = counter(
            r,
            "messages_nacked",
            "Messages the broker refused with basic.nack; their rows stay pending",
        );
        let returned = counter(
            r,
            "messages_returned",
            "Messages the broker returned as unroutable",
        );
        let failed = counter(
            r,
            "rows_failed",
            "Failed attempts recorded on rows (bad input or unroutable)",
        );
        let parked = counter(
            r,
            "rows_parked",
            "Rows parked after relay.max_attempts failed attempts",
        );
        let batches = counter(r, "batches", "Batches committed");
        let rows_deleted = counter(
            r,
            "rows_deleted",
            "Transferred rows deleted by retention, with their bodies",
        );
        let session_reconnects = counter(
            r,
            "claim_session_reconnects",
            "Claim sessions replaced after an error",
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        r.register(
            "batch_size_messages",
            "Rows claimed per batch",
            batch_size.clone(),
        );
        let seconds = |r: &mut Registry, name: &str, help: &str| {
            // 0.5 ms to about 16 s.
            let h = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
            r.register_with_unit(name, help, Unit::Seconds, h.clone());
            h
        };
        let claim_seconds = seconds(
            r,
            "claim_duration",
            "Time to claim a batch and fetch its bodies",
        );
        let confirm_seconds = seconds(
            r,
            "confirm_duration",
            "Time from publishing a batch to its last confirm",
        );
        let pending_rows = Gauge::default();
        r.register(
            "pending_rows",
            "Rows waiting to be relayed, parked rows excluded (sampled)",
            pending_rows.clone(),
        );
        let oldest_pending_seconds = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "oldest_pending_age",
            "Age of the oldest waiting row (sampled)",
            Unit::Seconds,
            oldest_pending_seconds.clone(),
        );
        let connected = Family::<ConnectionLabel, Gauge>::default();
        r.register(
            "connection_up",
            "1 while the connection is up (rabbitmq: and not blocked)",
            connected.clone(),
        );
        let reconnects = Family::<ConnectionLabel, Counter>::default();
        r.register(
            "reconnections",
            "Times a connection came back after being lost",
            reconnects.clone(),
        );
        let topology_broken = Gauge::default();
        r.register(
            "topology_broken",
            "1 while part of the configured topology (a queue, an exchange) is missing or refused; rows wait, uncharged",
            topology_broken.clone(),
        );
        for label in [RABBITMQ, LISTENER] {
            // Every series exists from the start, so a scrape sees zeros.
            connected.get_or_create(&label).set(0);
            reconnects.get_or_create(&label).inc_by(0);
        }
        Self {
            registry: root,
            published,
            confirmed,
            nacked,
            returned,
            failed,
            parked,
            batches,
            batch_size,
            claim_seconds,
            confirm_seconds,
            pending_rows,
            oldest_pending_seconds,
            connected,
            reconnects,
            topology_broken,
            session_reconnects,
            rows_deleted,
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Follows the broker's and the listener's states into the metrics until
    /// `token` is cancelled.
    pub async fn follow_connections(
        self: Arc<Self>,
        mut broker: watch::Receiver<BrokerState>,
        mut listening: watch::Receiver<bool>,
        token: CancellationToken,
    ) {
        let mut broker_seen = false;
        let mut listener_seen = false;
        loop {
            let (broker_up, topology_broken) = {
                let state = broker.borrow_and_update();
                (state.usable().is_some(), state.topology_fault.is_some())
            };
            self.topology_broken.set(i64::from(topology_broken));
            let listener_up = *listening.borrow_and_update();
            self.track(&RABBITMQ, broker_up, &mut broker_seen);
            self.track(&LISTENER, listener_up, &mut listener_seen);
            tokio::select! {
                () = token.cancelled() => return,
                changed = broker.changed() => if changed.is_err() { return },
                changed = listening.changed() => if changed.is_err() { return },
            }
        }
    }

    fn track(&self, label: &ConnectionLabel, up: bool, seen_up: &mut bool) {
        let gauge = self.connected.get_or_create(label);
        let was_up = gauge.get() == 1;
        gauge.set(i64::from(up));
        if up && !was_up {
            if *seen_up {
                self.reconnects.get_or_create(label).inc();
            }
            *seen_up = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.published.inc_by(3);
        m.claim_seconds.observe(0.002);
        let text = m.encode();
        for line in [
            "pushoccurrence_messages_published_total 3",
            "# TYPE pushoccurrence_claim_duration_seconds histogram",
            "pushoccurrence_connection_up{connection=\"rabbitmq\"} 0",
            "pushoccurrence_reconnections_total{connection=\"postgres_listener\"} 0",
            "# UNIT pushoccurrence_oldest_pending_age_seconds seconds",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
    }

    #[test]
    fn only_a_comeback_counts_as_a_reconnection() {
        let m = Metrics::new();
        let mut seen = false;
        for up in [false, true, true, false, true] {
            m.track(&RABBITMQ, up, &mut seen);
        }
        assert_eq!(m.reconnects.get_or_create(&RABBITMQ).get(), 1);
        assert_eq!(m.connected.get_or_create(&RABBITMQ).get(), 1);
    }
}
