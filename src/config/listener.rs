//! The `listener` block: the NOTIFY channels to LISTEN on, and the address
//! of the listener's own session (`listener.host`, `listener.port`), which
//! [`PostgresConfig`](super::PostgresConfig) carries, since that session is
//! a PostgreSQL session like the others.

use super::check::{check_identifier, non_empty};
use super::error::ConfigError;
use super::raw::RawListener;

/// A checked `listener` block: its channels (its address went to the
/// PostgreSQL settings).
pub(super) struct Listener {
    /// The NOTIFY channels, each a PostgreSQL identifier.
    pub(super) channels: Vec<String>,
}

impl TryFrom<RawListener> for Listener {
    type Error = ConfigError;

    fn try_from(listener: RawListener) -> Result<Self, ConfigError> {
        if let Some(host) = &listener.host {
            non_empty("listener.host", host)?;
        }
        if listener.channels.is_empty() {
            return Err(ConfigError::new(
                "key listener.channels: list at least one NOTIFY channel",
            ));
        }
        for (i, channel) in listener.channels.iter().enumerate() {
            check_identifier(&format!("listener.channels[{i}]"), channel)?;
        }
        Ok(Self {
            channels: listener.channels,
        })
    }
}
