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
    /// Batches in flight at once; each holds one database connection and
    /// one AMQP channel. `buffer_size / batch_size`, at least 1.
    pub workers: usize,
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

/// The most batches in flight at once, whatever `buffer_size` says: each
/// holds a database connection.
const MAX_WORKERS: usize = 16;

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
        // At most half the window, so at least two batches overlap.
        let batch_size = relay.batch_size.min((retry.buffer_size / 2).max(1));
        let workers = (retry.buffer_size / batch_size).clamp(1, MAX_WORKERS);
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
}
