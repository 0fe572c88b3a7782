//! The `admin` block: where the admin endpoint listens, and how long the
//! relay may make no progress before `/readyz` reports it stalled.

use std::net::SocketAddr;
use std::time::Duration;

use super::check::positive_secs;
use super::error::ConfigError;
use super::raw::RawAdmin;

/// The admin endpoint's default address: local only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9780";

/// The admin endpoint's settings.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where the admin HTTP endpoint listens; `None` turns it off.
    pub listen: Option<SocketAddr>,
    /// `admin.listen` was set (file or environment), so an address that
    /// cannot be bound stops `run`. Unset, the default address is best
    /// effort: several instances on one host from the seed's file (which has
    /// no admin section) all relay, the first one serving the endpoint.
    pub required: bool,
    /// How long claimable rows may wait with no batch committed (or every
    /// claim may fail) before `/readyz` reports the relay stalled.
    pub stall_after: Duration,
}

impl TryFrom<RawAdmin> for AdminConfig {
    type Error = ConfigError;

    fn try_from(admin: RawAdmin) -> Result<Self, ConfigError> {
        let required = admin.listen.is_some();
        let listen = admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
        let listen = if listen.trim().is_empty() {
            None
        } else {
            Some(listen.trim().parse().map_err(|_| {
                ConfigError::new(format!(
                    "key admin.listen: '{listen}' is not an address and port like 127.0.0.1:9780 (use \"\" to turn the endpoint off)"
                ))
            })?)
        };
        let stall_after = positive_secs("admin.stall_after_sec", admin.stall_after_sec)?;
        Ok(Self {
            listen,
            required,
            stall_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{SEED, edit, parse, seed};

    #[test]
    fn only_an_admin_address_that_was_set_is_required() {
        let c = seed();
        assert_eq!(c.admin.listen, Some(DEFAULT_ADMIN_LISTEN.parse().unwrap()));
        assert!(!c.admin.required, "the seed's file has no admin section");
        let c = parse(&edit(|v| v["admin"] = serde_json::json!({})), &[]).unwrap();
        assert!(!c.admin.required);
        let c = parse(
            &edit(|v| v["admin"] = serde_json::json!({"listen": "127.0.0.1:9780"})),
            &[],
        )
        .unwrap();
        assert!(c.admin.required, "set in the file, even to the default");
        let c = parse(SEED, &[("PUSHOCCURRENCE_ADMIN_LISTEN", "127.0.0.1:9781")]).unwrap();
        assert!(c.admin.required);
        assert_eq!(c.admin.listen, Some("127.0.0.1:9781".parse().unwrap()));
        let c = parse(SEED, &[("PUSHOCCURRENCE_ADMIN_LISTEN", "")]).unwrap();
        assert_eq!(c.admin.listen, None);
    }
}
