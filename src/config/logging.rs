//! The `log` block: how log lines are written.

use super::error::ConfigError;
use super::raw::RawLog;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl TryFrom<RawLog> for LogFormat {
    type Error = ConfigError;

    fn try_from(log: RawLog) -> Result<Self, ConfigError> {
        match log.format.as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(ConfigError::new(format!(
                "key log.format: unknown format '{other}'; expected text or json"
            ))),
        }
    }
}
