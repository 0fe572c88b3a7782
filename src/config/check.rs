//! Checks several sections share: text that must not be empty, PostgreSQL
//! identifiers, durations in range, optional file paths. Each error names
//! the key it was given.

use std::path::PathBuf;
use std::time::Duration;

use super::error::ConfigError;

/// The longest identifier PostgreSQL keeps (NAMEDATALEN - 1).
const PG_MAX_IDENTIFIER: usize = 63;

pub(super) fn non_empty(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::new(format!("key {key}: must not be empty")));
    }
    Ok(())
}

pub(super) fn check_identifier(key: &str, value: &str) -> Result<(), ConfigError> {
    non_empty(key, value)?;
    if value.len() > PG_MAX_IDENTIFIER {
        return Err(ConfigError::new(format!(
            "key {key}: '{value}' is {} bytes long; PostgreSQL identifiers hold at most {PG_MAX_IDENTIFIER}",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(ConfigError::new(format!(
            "key {key}: must not contain a NUL character"
        )));
    }
    Ok(())
}

pub(super) fn positive_secs(key: &str, secs: f64) -> Result<Duration, ConfigError> {
    if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
        return Err(ConfigError::new(format!(
            "key {key}: {secs} is out of range; expected seconds above 0 and at most 86400"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub(super) fn positive_ms(key: &str, ms: u64) -> Result<Duration, ConfigError> {
    if ms == 0 {
        return Err(ConfigError::new(format!(
            "key {key}: must be at least 1 millisecond"
        )));
    }
    Ok(Duration::from_millis(ms))
}

/// A file path key: absent or blank means none.
pub(super) fn optional_path(value: Option<String>) -> Option<PathBuf> {
    value.filter(|p| !p.trim().is_empty()).map(PathBuf::from)
}
