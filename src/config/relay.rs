//! The `relay` block: batches and the in-flight window, timeouts, attempts
//! and size limits. The window and the sweep interval are the seed's
//! `rabbitmq.retry.buffer_size` and `idle_sleep_ms`.

use std::time::Duration;

use super::check::{positive_ms, positive_secs};
use super::error::ConfigError;
use super::raw::{RawRelay, RawRetry};

/// Relay tuning.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The most messages in flight (claimed, not yet confirmed).
    pub buffer_size: usize,
    /// Rows claimed per batch: `relay.batch_size`, but at most half of
    /// `buffer_size`, so that at least two batches are in flight.
    pub batch_size: usize,
    /// Batches in flight at once on a near network; each holds one
    /// database connection and one AMQP channel. `buffer_size /
    /// batch_size`, at least 1, at most `max_workers`.
    pub workers: usize,
    /// The most batches in flight when the measured round trip calls for
    /// more than `workers` (`relay.max_workers`, at least `workers`): each
    /// of them is a claim session, opened when first needed, and together
    /// they may hold `max_workers * batch_size` messages, past
    /// `buffer_size`.
    pub max_workers: usize,
    /// How often pending rows are swept when no notification arrives.
    pub idle_sleep: Duration,
    /// How long to wait for the broker to confirm a batch.
    pub confirm_timeout: Duration,
    /// How long a stop may take to finish in-flight batches.
    pub shutdown_grace: Duration,
    /// The cap of every reconnection back-off.
    pub max_retry_delay: Duration,
    /// Failed attempts (bad input, unroutable) after which a row is parked.
    pub max_attempts: u32,
    /// Delay after a row's first failed attempt; it doubles with every
    /// further failure, up to `max_retry_delay`.
    pub attempt_delay: Duration,
    /// Bodies larger than this are parked, never published (the broker's
    /// `max_message_size`: 128 MiB on RabbitMQ 3.x, 16 MiB on 4.x).
    pub max_message_bytes: u64,
    /// Body bytes one batch may hold in memory; rows past it wait for the
    /// next batch (a batch always takes at least one row).
    pub max_batch_bytes: u64,
}

/// The most batches in flight at once, whatever `buffer_size` and
/// `relay.max_workers` say: each holds a database connection.
const MAX_WORKERS: usize = 16;

/// `relay.max_workers` unless set (or the window's batches, when more):
/// enough for the defaults' 2 batches to drain about as fast 5 ms away
/// (docs/benchmarks.md, Distance), and few sessions for a pool.
pub(super) const DEFAULT_MAX_WORKERS: usize = 8;

/// Checks the block. `retry` is the seed's `rabbitmq.retry`, checked with
/// the rabbitmq section, and `retry_delay` its reconnection delay, which
/// `relay.max_retry_delay_sec` must not undercut.
impl TryFrom<(RawRelay, RawRetry, Duration)> for RelayConfig {
    type Error = ConfigError;

    fn try_from(
        (relay, retry, retry_delay): (RawRelay, RawRetry, Duration),
    ) -> Result<Self, ConfigError> {
        if relay.batch_size == 0 {
            return Err(ConfigError::new("key relay.batch_size: must be at least 1"));
        }
        if relay.max_workers == Some(0) {
            return Err(ConfigError::new(
                "key relay.max_workers: must be at least 1 (each batch in flight is a claim session)",
            ));
        }
        // At most half the window, so at least two batches overlap.
        let batch_size = relay.batch_size.min((retry.buffer_size / 2).max(1));
        let window = (retry.buffer_size / batch_size).clamp(1, MAX_WORKERS);
        // Unset, it never takes batches from the window; set, it caps them.
        let max_workers = relay
            .max_workers
            .unwrap_or(DEFAULT_MAX_WORKERS.max(window))
            .min(MAX_WORKERS);
        let workers = window.min(max_workers);
        let confirm_timeout = positive_ms("relay.confirm_timeout_ms", relay.confirm_timeout_ms)?;
        let shutdown_grace = positive_ms("relay.shutdown_grace_ms", relay.shutdown_grace_ms)?;
        let max_retry_delay =
            positive_secs("relay.max_retry_delay_sec", relay.max_retry_delay_sec)?;
        if relay.max_attempts == 0 {
            return Err(ConfigError::new(
                "key relay.max_attempts: must be at least 1 (failed attempts before a row is parked)",
            ));
        }
        let attempt_delay = positive_ms("relay.attempt_delay_ms", relay.attempt_delay_ms)?;
        if relay.max_message_bytes == 0 || relay.max_batch_bytes == 0 {
            return Err(ConfigError::new(
                "keys relay.max_message_bytes and relay.max_batch_bytes: must be at least 1",
            ));
        }
        if max_retry_delay < retry_delay {
            return Err(ConfigError::new(
                "key relay.max_retry_delay_sec: must not be below rabbitmq.retry.retry_delay_sec",
            ));
        }
        Ok(Self {
            buffer_size: retry.buffer_size,
            batch_size,
            workers,
            max_workers,
            idle_sleep: Duration::from_millis(retry.idle_sleep_ms),
            confirm_timeout,
            shutdown_grace,
            max_retry_delay,
            max_attempts: relay.max_attempts,
            attempt_delay,
            max_message_bytes: relay.max_message_bytes,
            max_batch_bytes: relay.max_batch_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{edit, parse};

    #[test]
    fn batch_size_never_exceeds_half_the_in_flight_window() {
        let text = edit(|v| {
            v["rabbitmq"]["retry"]["buffer_size"] = 30.into();
            v["relay"] = serde_json::json!({"batch_size": 500});
        });
        let c = parse(&text, &[]).unwrap();
        assert_eq!((c.relay.batch_size, c.relay.workers), (15, 2));
    }

    #[test]
    fn max_workers_caps_the_sessions_the_window_and_the_distance_ask_for() {
        let parsed = |max_workers: u64| {
            parse(
                &edit(|v| v["relay"] = serde_json::json!({"max_workers": max_workers})),
                &[],
            )
        };
        let c = parse(&edit(|_| ()), &[]).unwrap().relay;
        assert_eq!(
            (c.workers, c.max_workers),
            (2, 8),
            "the seed's window of 100 in batches of 50"
        );
        let wide = edit(|v| v["relay"] = serde_json::json!({"batch_size": 10}));
        let c = parse(&wide, &[]).unwrap().relay;
        assert_eq!(
            (c.workers, c.max_workers),
            (10, 10),
            "unset, it takes no batch from the window"
        );
        let c = parsed(4).unwrap().relay;
        assert_eq!((c.workers, c.max_workers), (2, 4));
        let c = parsed(1).unwrap().relay;
        assert_eq!((c.workers, c.max_workers), (1, 1));
        let c = parsed(100).unwrap().relay;
        assert_eq!(c.max_workers, 16, "never more sessions than MAX_WORKERS");
        let e = parsed(0).unwrap_err().to_string();
        assert!(
            e.contains("key relay.max_workers: must be at least 1"),
            "{e}"
        );
    }
}
