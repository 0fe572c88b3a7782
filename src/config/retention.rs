//! The `retention` block: whether transferred rows are deleted, after how
//! long, and how gently.

use std::time::Duration;

use super::check::positive_secs;
use super::error::ConfigError;
use super::raw::RawRetention;

/// Which transferred rows are deleted, and how gently.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Rows transferred longer ago than this are deleted, with their bodies.
    pub transferred_after: Duration,
    /// Rows deleted per transaction.
    pub batch_size: i64,
    /// Pause between deletion runs.
    pub interval: Duration,
}

/// `None` when `retention.transferred_after_sec` is 0: rows are kept forever.
impl TryFrom<RawRetention> for Option<RetentionConfig> {
    type Error = ConfigError;

    fn try_from(retention: RawRetention) -> Result<Self, ConfigError> {
        if retention.transferred_after_sec > 0.0 {
            if retention.batch_size == 0 {
                return Err(ConfigError::new(
                    "key retention.batch_size: must be at least 1 (rows deleted per transaction)",
                ));
            }
            Ok(Some(RetentionConfig {
                // Days or weeks, so not bounded like the other durations.
                transferred_after: Duration::try_from_secs_f64(retention.transferred_after_sec)
                    .map_err(|_| {
                        ConfigError::new(
                            "key retention.transferred_after_sec: too large; give seconds, e.g. 604800 for a week",
                        )
                    })?,
                batch_size: i64::try_from(retention.batch_size).unwrap_or(i64::MAX),
                interval: positive_secs("retention.interval_sec", retention.interval_sec)?,
            }))
        } else if retention.transferred_after_sec < 0.0 {
            Err(ConfigError::new(
                "key retention.transferred_after_sec: must not be negative (0 keeps rows forever)",
            ))
        } else {
            Ok(None)
        }
    }
}
