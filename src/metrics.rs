//! What the relay counts and measures, in one explicit Prometheus registry,
//! and the task that follows the connections' states into it.
//!
//! Counters are added per batch, never per message, so the hot path pays a
//! few atomic adds. The workers report each batch's outcome through
//! [`Metrics::batch_committed`], [`Metrics::batch_worked`],
//! [`Metrics::batch_failed`] and [`Metrics::session_connect_failed`], which
//! also feed [`Progress`] (what `/readyz` reads). The sampled backlog gauges
//! read NaN until the first sample and after a failed one: a gauge that
//! could not be sampled must not read as an empty backlog. Labels never carry message ids, routing keys or error
//! texts (unbounded cardinality); the only label is the connection's name.

use std::sync::Arc;
use std::time::{Duration, Instant};

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
use crate::progress::{Progress, unix_now};

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
    /// Later messages of an ordering key confirmed while an earlier one of
    /// the same batch was not.
    pub ordering_breaks: Counter,
    /// Batches committed.
    pub batches: Counter,
    /// Batch attempts that failed (rows stay pending), those that could not
    /// connect their claim session included.
    pub batches_failed: Counter,
    /// Unix time of the last committed batch (0 before the first).
    pub last_batch_commit: Gauge<f64, AtomicU64>,
    /// Rows claimed per batch.
    pub batch_size: Histogram,
    /// Time from the start of a batch to its messages being ready.
    pub claim_seconds: Histogram,
    /// Time from publishing a batch to its last confirm.
    pub confirm_seconds: Histogram,
    /// Rows waiting to be relayed (sampled; NaN when unknown).
    pub pending_rows: Gauge<f64, AtomicU64>,
    /// Pending rows whose next attempt is due (sampled; NaN when unknown).
    pub claimable_rows: Gauge<f64, AtomicU64>,
    /// Backlog samples that failed.
    pub backlog_sample_failures: Counter,
    /// Age of the oldest waiting row (sampled; NaN when unknown).
    pub oldest_pending_seconds: Gauge<f64, AtomicU64>,
    /// 1 while a connection is up (blocked or not).
    pub connected: Family<ConnectionLabel, Gauge>,
    /// 1 while the broker blocks publishing (a memory or disk alarm).
    pub broker_blocked: Gauge,
    /// Times a connection came back after being lost.
    pub reconnects: Family<ConnectionLabel, Counter>,
    /// 1 while part of the configured topology is missing or refused.
    pub topology_broken: Gauge,
    /// 1 while the listener's session does not hear notifications (its probe
    /// did not come back: a transaction pooler?), so the relay is polling.
    pub listener_deaf: Gauge,
    /// Batches the relay keeps in flight (`relay.workers`, more while the
    /// measured round trip calls for it; `worker::Depth`).
    pub batches_in_flight: Gauge,
    /// Claim sessions replaced after an error.
    pub session_reconnects: Counter,
    /// Claim-session connects that failed.
    pub session_connect_failures: Counter,
    /// Whether batches still commit, for `/readyz`.
    pub progress: Progress,
    /// Transferred rows deleted by retention.
    pub rows_deleted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `admin.stall_after_sec`'s default.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);

impl Metrics {
    /// A registry with every metric registered under [`PREFIX`], stalled
    /// after [`DEFAULT_STALL_AFTER`].
    pub fn new() -> Self {
        Self::with_stall_after(DEFAULT_STALL_AFTER)
    }

    /// A registry with every metric registered under [`PREFIX`]; the relay
    /// counts as stalled after `stall_after` without progress.
    pub fn with_stall_after(stall_after: Duration) -> Self {
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
        let ordering_breaks = counter(
            r,
            "ordering_breaks",
            "Messages of an ordering key the broker confirmed while it returned, nacked or refused an earlier one of the key in the same batch",
        );
        let batches = counter(r, "batches", "Batches committed");
        let batches_failed = counter(
            r,
            "batches_failed",
            "Batch attempts that failed (claim, claim-session connect, publish); their rows stay pending",
        );
        let session_connect_failures = counter(
            r,
            "claim_session_connect_failures",
            "Claim-session connects that failed",
        );
        let backlog_sample_failures = counter(
            r,
            "backlog_sample_failures",
            "Backlog samples that failed; the backlog gauges read NaN until one works",
        );
        let last_batch_commit = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "last_batch_commit_timestamp",
            "Unix time of the last committed batch (0 before the first)",
            Unit::Seconds,
            last_batch_commit.clone(),
        );
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
        let pending_rows = Gauge::<f64, AtomicU64>::default();
        r.register(
            "pending_rows",
            "Rows waiting to be relayed, parked rows excluded (sampled; NaN when unknown)",
            pending_rows.clone(),
        );
        let claimable_rows = Gauge::<f64, AtomicU64>::default();
        r.register(
            "claimable_rows",
            "Pending rows a claim may take now: unkeyed rows whose next attempt is due, and one per ordering key whose next row is due (sampled; NaN when unknown)",
            claimable_rows.clone(),
        );
        let oldest_pending_seconds = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "oldest_pending_age",
            "Age of the oldest waiting row (sampled; NaN when unknown)",
            Unit::Seconds,
            oldest_pending_seconds.clone(),
        );
        let connected = Family::<ConnectionLabel, Gauge>::default();
        r.register(
            "connection_up",
            "1 while the connection is up (rabbitmq: also while it blocks publishing, see rabbitmq_blocked)",
            connected.clone(),
        );
        let broker_blocked = Gauge::default();
        r.register(
            "rabbitmq_blocked",
            "1 while RabbitMQ blocks publishing (a memory or disk alarm); the relay pauses",
            broker_blocked.clone(),
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
        let batches_in_flight = Gauge::default();
        r.register(
            "batches_in_flight",
            "Batches the relay keeps in flight, each on a claim session: relay.workers, up to relay.max_workers while the measured round trip calls for more",
            batches_in_flight.clone(),
        );
        let listener_deaf = Gauge::default();
        r.register(
            "listener_deaf",
            "1 while the listener does not hear its own probe notification (LISTEN through a transaction pooler?): the relay is polling every rabbitmq.retry.idle_sleep_ms; give the listener a direct connection (listener.host, listener.port)",
            listener_deaf.clone(),
        );
        for label in [RABBITMQ, LISTENER] {
            // Every series exists from the start, so a scrape sees zeros.
            connected.get_or_create(&label).set(0);
            reconnects.get_or_create(&label).inc_by(0);
        }
        for gauge in [&pending_rows, &claimable_rows, &oldest_pending_seconds] {
            gauge.set(f64::NAN);
        }
        Self {
            registry: root,
            published,
            confirmed,
            nacked,
            returned,
            failed,
            parked,
            ordering_breaks,
            batches,
            batches_failed,
            last_batch_commit,
            batch_size,
            claim_seconds,
            confirm_seconds,
            pending_rows,
            claimable_rows,
            backlog_sample_failures,
            oldest_pending_seconds,
            connected,
            broker_blocked,
            reconnects,
            topology_broken,
            listener_deaf,
            batches_in_flight,
            session_reconnects,
            session_connect_failures,
            progress: Progress::new(stall_after),
            rows_deleted,
        }
    }

    /// A batch committed (called right after its COMMIT).
    pub fn batch_committed(&self) {
        self.batches.inc();
        self.last_batch_commit.set(unix_now());
        self.progress.committed(Instant::now());
    }

    /// A batch attempt ended well, whether or not it found rows.
    pub fn batch_worked(&self) {
        self.progress.batch_worked();
    }

    /// A batch attempt failed; its rows stay pending.
    pub fn batch_failed(&self) {
        self.batches_failed.inc();
        self.progress.batch_failed(Instant::now());
    }

    /// A claim session could not be connected (the batch then fails too).
    pub fn session_connect_failed(&self) {
        self.session_connect_failures.inc();
        self.progress.batch_failed(Instant::now());
    }

    /// A backlog sample: pending rows, the oldest one's age, claimable rows.
    pub fn backlog_sampled(&self, pending: i64, oldest_seconds: f64, claimable: i64) {
        self.pending_rows.set(pending as f64);
        self.oldest_pending_seconds.set(oldest_seconds);
        self.claimable_rows.set(claimable as f64);
        self.progress
            .sampled(Some(u64::try_from(claimable).unwrap_or(0)), Instant::now());
    }

    /// A backlog sample failed: the gauges read NaN (unknown, not empty).
    pub fn backlog_sample_failed(&self) {
        self.backlog_sample_failures.inc();
        for gauge in [
            &self.pending_rows,
            &self.claimable_rows,
            &self.oldest_pending_seconds,
        ] {
            gauge.set(f64::NAN);
        }
        self.progress.sampled(None, Instant::now());
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
        let mut broker_seen = ConnectionSeen::default();
        let mut listener_seen = false;
        loop {
            let (broker_conn, blocked, topology_broken) = {
                let state = broker.borrow_and_update();
                // The connection itself, not whether it may publish: a
                // broker alarm (blocked) is not a lost connection.
                let conn = state
                    .connection
                    .as_ref()
                    .filter(|c| c.status().connected())
                    .map(|c| Arc::as_ptr(c) as usize);
                (conn, state.blocked, state.topology_fault.is_some())
            };
            self.topology_broken.set(i64::from(topology_broken));
            self.broker_blocked
                .set(i64::from(blocked && broker_conn.is_some()));
            let listener_up = *listening.borrow_and_update();
            self.track_broker(broker_conn, &mut broker_seen);
            self.track(&LISTENER, listener_up, &mut listener_seen);
            tokio::select! {
                () = token.cancelled() => return,
                changed = broker.changed() => if changed.is_err() { return },
                changed = listening.changed() => if changed.is_err() { return },
            }
        }
    }

    /// The broker connection `conn` (by identity) is up, or none is. A
    /// reconnection is a new connection after an earlier one, whether or
    /// not a state without one was observed in between.
    fn track_broker(&self, conn: Option<usize>, seen: &mut ConnectionSeen) {
        self.connected
            .get_or_create(&RABBITMQ)
            .set(i64::from(conn.is_some()));
        match conn {
            Some(id) => {
                if seen.last.is_some_and(|last| seen.lost || last != id) {
                    self.reconnects.get_or_create(&RABBITMQ).inc();
                }
                seen.last = Some(id);
                seen.lost = false;
            }
            None => seen.lost = seen.last.is_some(),
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

/// The broker connection last seen up, by identity (its `Arc`'s address),
/// and whether it was seen lost since. A new connection may reuse a dropped
/// one's address, so a loss observed counts as well as a changed address.
#[derive(Default)]
struct ConnectionSeen {
    last: Option<usize>,
    lost: bool,
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
    fn backlog_gauges_read_nan_until_sampled_and_after_a_failed_sample() {
        let m = Metrics::new();
        let nan_lines = |text: &str| {
            [
                "pending_rows",
                "claimable_rows",
                "oldest_pending_age_seconds",
            ]
            .iter()
            .filter(|g| text.contains(&format!("pushoccurrence_{g} NaN")))
            .count()
        };
        assert_eq!(nan_lines(&m.encode()), 3, "{}", m.encode());
        m.backlog_sampled(4, 1.5, 3);
        let text = m.encode();
        assert_eq!(nan_lines(&text), 0, "{text}");
        assert!(text.contains("pushoccurrence_pending_rows 4.0"), "{text}");
        m.backlog_sample_failed();
        let text = m.encode();
        assert_eq!(nan_lines(&text), 3, "{text}");
        assert!(
            text.contains("pushoccurrence_backlog_sample_failures_total 1"),
            "{text}"
        );
    }

    #[test]
    fn only_a_comeback_counts_as_a_reconnection() {
        let m = Metrics::new();
        let mut seen = false;
        for up in [false, true, true, false, true] {
            m.track(&LISTENER, up, &mut seen);
        }
        assert_eq!(m.reconnects.get_or_create(&LISTENER).get(), 1);
        assert_eq!(m.connected.get_or_create(&LISTENER).get(), 1);

        // The broker: by the connection's identity. The same connection
        // seen again (an alarm's blocked/unblocked) is no reconnection; a
        // new one is, also at a reused address once the old one was lost.
        let mut seen = ConnectionSeen::default();
        for conn in [
            None,
            Some(1),
            Some(1),
            Some(1),
            Some(2),
            None,
            Some(2),
            Some(3),
        ] {
            m.track_broker(conn, &mut seen);
        }
        assert_eq!(m.reconnects.get_or_create(&RABBITMQ).get(), 3);
        assert_eq!(m.connected.get_or_create(&RABBITMQ).get(), 1);
    }
}
