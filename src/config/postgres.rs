//! The `postgres` block: the servers, the login, TLS, where the outbox
//! lives, timeouts, and what stands between the relay and PostgreSQL.

use std::time::Duration;

use super::check::{check_identifier, non_empty, optional_path, positive_ms, positive_secs};
use super::error::ConfigError;
use super::raw::{RawListener, RawPostgres};
use super::secret::Secret;
use crate::tls::{Roots, SslMode};

/// One PostgreSQL server the relay may open sessions to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgServer {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// How to reach PostgreSQL and where the outbox lives.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// The servers of `postgres.host` and `postgres.port`, in the configured
    /// order; every session goes to the first that accepts writes (libpq's
    /// `target_session_attrs=read-write`), so after a failover the relay
    /// follows the new primary.
    pub servers: Vec<PgServer>,
    /// Database name.
    pub database: String,
    /// Login role.
    pub user: String,
    /// Password, if the server asks for one.
    pub password: Option<Secret>,
    /// TLS mode.
    pub ssl_mode: SslMode,
    /// The CA certificates of `postgres.ssl_root_cert`, which the server's
    /// certificate must chain to; read when the config is loaded.
    pub ssl_root_cert: Option<Roots>,
    /// Schema holding the two outbox tables.
    pub schema: String,
    /// Whether `run` applies the migrations at start.
    pub auto_migrate: bool,
    /// `application_name` of every session the relay opens.
    pub application_name: String,
    /// Limit on establishing one connection.
    pub connect_timeout: Duration,
    /// Limit on any one statement's round trip; a stalled link is dropped
    /// and replaced after it.
    pub query_timeout: Duration,
    /// What stands between the relay and PostgreSQL (`postgres.pooler`).
    pub pooler: Pooler,
    /// Where the listener connects when not through `host`/`port`
    /// (`listener.host`, `listener.port`): LISTEN needs a session of its
    /// own, which a transaction pooler cannot give. Several servers as for
    /// `host` (a primary and its standby), tried in order for the one that
    /// accepts writes.
    pub listener_servers: Option<Vec<PgServer>>,
}

impl PostgresConfig {
    /// The configuration of the listener's session: `listener.host` and
    /// `listener.port` where given (a direct connection past a pooler).
    /// `listener.host` names its servers as `host` does (each on
    /// `listener.port`, one for all or one per host, else on the first
    /// server's port); `listener.port` alone moves the servers to that
    /// port (or to one port each).
    pub fn for_listener(&self) -> Self {
        let mut pg = self.clone();
        if let Some(servers) = &self.listener_servers {
            pg.servers.clone_from(servers);
        }
        pg
    }

    /// Where session-level work connects (migrations with their advisory
    /// lock, the start-up catalog reads, retention, operator commands):
    /// behind a transaction pooler, the listener's direct connection when
    /// one is configured; the regular address otherwise.
    pub fn for_session_work(&self) -> Self {
        if self.pooler == Pooler::Transaction && self.listener_is_direct() {
            self.for_listener()
        } else {
            self.clone()
        }
    }

    /// Whether the listener has a connection of its own (`listener.host`
    /// or `listener.port`).
    pub fn listener_is_direct(&self) -> bool {
        self.listener_servers.is_some()
    }

    /// The servers as `host:port` separated by commas, for messages.
    pub fn servers_text(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("{}:{}", s.host, s.port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What stands between the relay and PostgreSQL, as `postgres.pooler` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooler {
    /// A direct connection (or a pooler in session mode: the same to the relay).
    None,
    /// A pooler that gives each client a server session for its whole
    /// connection (PgBouncer `pool_mode = session`).
    Session,
    /// A pooler that gives each transaction any server session (PgBouncer
    /// `pool_mode = transaction`): no session state survives a
    /// transaction, so the claim session's settings are set in every
    /// transaction and no statement is prepared by name.
    Transaction,
}

impl Pooler {
    /// The word `postgres.pooler` takes for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

/// Checks the block. The listener's address comes along (`listener.host`,
/// `listener.port`: where the LISTEN session and session work go past a
/// transaction pooler), and decides whether migrations can run at start.
impl TryFrom<(RawPostgres, &RawListener)> for PostgresConfig {
    type Error = ConfigError;

    fn try_from((pg, listener): (RawPostgres, &RawListener)) -> Result<Self, ConfigError> {
        let ssl_mode = match pg.ssl_mode.as_str() {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConfigError::new(format!(
                    "key postgres.ssl_mode: unknown mode '{other}'; expected one of disable, prefer, require, verify-ca, verify-full"
                )));
            }
        };
        let ssl_root_cert = optional_path(pg.ssl_root_cert);
        if ssl_root_cert.is_none() && matches!(ssl_mode, SslMode::VerifyCa | SslMode::VerifyFull) {
            return Err(ConfigError::new(format!(
                "key postgres.ssl_root_cert: ssl_mode '{}' checks the server's certificate against a CA; give the CA's PEM file",
                pg.ssl_mode
            )));
        }
        let ssl_root_cert = ssl_root_cert
            .as_deref()
            .map(Roots::read)
            .transpose()
            .map_err(|e| ConfigError::new(format!("key postgres.ssl_root_cert: {e}")))?;
        check_identifier("postgres.schema", &pg.schema)?;
        non_empty("postgres.host", &pg.host)?;
        let servers = pg_servers(("postgres.host", &pg.host), ("postgres.port", &pg.port.0))?;
        non_empty("postgres.database", &pg.database)?;
        non_empty("postgres.user", &pg.user)?;
        non_empty("postgres.application_name", &pg.application_name)?;
        let connect_timeout =
            positive_secs("postgres.connect_timeout_sec", pg.connect_timeout_sec)?;
        let query_timeout = positive_ms("postgres.query_timeout_ms", pg.query_timeout_ms)?;
        let pooler = match pg.pooler.as_str() {
            "none" => Pooler::None,
            "session" => Pooler::Session,
            "transaction" => Pooler::Transaction,
            other => {
                return Err(ConfigError::new(format!(
                    "key postgres.pooler: unknown mode '{other}'; expected none, session or transaction \
                     (PgBouncer's pool_mode)"
                )));
            }
        };
        if pooler == Pooler::Transaction
            && pg.auto_migrate
            && listener.host.is_none()
            && listener.port.is_none()
        {
            return Err(ConfigError::new(
                "key postgres.auto_migrate: migrations need a session of their own (an advisory lock, \
                 CREATE INDEX CONCURRENTLY), which postgres.pooler 'transaction' cannot give; \
                 give the relay a direct connection (listener.host, listener.port), or set \
                 postgres.auto_migrate to false and run `pushoccurrence migrate` against PostgreSQL directly",
            ));
        }
        let listener_servers = match (&listener.host, &listener.port) {
            (Some(hosts), ports) => {
                let ports = ports
                    .as_ref()
                    .map_or_else(|| vec![servers[0].port], |p| p.0.clone());
                Some(pg_servers(
                    ("listener.host", hosts),
                    ("listener.port", &ports),
                )?)
            }
            (None, Some(ports)) => {
                // The regular hosts, on the listener's port(s).
                let hosts: Vec<&str> = servers.iter().map(|s| s.host.as_str()).collect();
                Some(pg_servers(
                    ("postgres.host", &hosts.join(",")),
                    ("listener.port", &ports.0),
                )?)
            }
            (None, None) => None,
        };
        Ok(Self {
            servers,
            database: pg.database,
            user: pg.user,
            password: pg.password.map(Secret),
            ssl_mode,
            ssl_root_cert,
            schema: pg.schema,
            auto_migrate: pg.auto_migrate,
            application_name: pg.application_name,
            connect_timeout,
            query_timeout,
            pooler,
            listener_servers,
        })
    }
}

/// The servers named by a host key (`postgres.host`, `listener.host`: one
/// host, or several separated by commas, as libpq reads a connection
/// string's `host`) and a port key (one port for every host, or one per
/// host in the same order); errors name the keys.
fn pg_servers(
    (host_key, hosts): (&str, &str),
    (port_key, ports): (&str, &[u16]),
) -> Result<Vec<PgServer>, ConfigError> {
    let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
    if hosts.iter().any(|h| h.is_empty()) {
        return Err(ConfigError::new(format!(
            "key {host_key}: '{}' has an empty host name; name one host, or several separated by commas (db1,db2)",
            hosts.join(",")
        )));
    }
    if ports.is_empty() {
        return Err(ConfigError::new(format!(
            "key {port_key}: list at least one port"
        )));
    }
    if ports.contains(&0) {
        return Err(ConfigError::new(format!("key {port_key}: must be 1-65535")));
    }
    if ports.len() != 1 && ports.len() != hosts.len() {
        return Err(ConfigError::new(format!(
            "keys {host_key} and {port_key}: {} hosts but {} ports; give one port for all hosts, or one per host in the same order",
            hosts.len(),
            ports.len()
        )));
    }
    Ok(hosts
        .iter()
        .enumerate()
        .map(|(i, host)| PgServer {
            host: (*host).to_owned(),
            port: if ports.len() == 1 { ports[0] } else { ports[i] },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{SEED, edit, err, parse};

    #[test]
    fn several_postgres_hosts_take_one_port_each_or_one_for_all() {
        let servers = |text: &str, env: &[(&str, &str)]| -> Vec<(String, u16)> {
            parse(text, env)
                .unwrap()
                .postgres
                .servers
                .into_iter()
                .map(|s| (s.host, s.port))
                .collect()
        };
        let pair = |h: &str, p: u16| (h.to_owned(), p);
        // The seed's single host and numeric port, unchanged.
        assert_eq!(servers(SEED, &[]), [pair("localhost", 5432)]);
        // One port for every host.
        let text = edit(|v| v["postgres"]["host"] = "db1, db2".into());
        assert_eq!(servers(&text, &[]), [pair("db1", 5432), pair("db2", 5432)]);
        // One port per host: libpq's text, or a list.
        let text = edit(|v| {
            v["postgres"]["host"] = "127.0.0.1,127.0.0.1".into();
            v["postgres"]["port"] = "5432, 5433".into();
        });
        assert_eq!(
            servers(&text, &[]),
            [pair("127.0.0.1", 5432), pair("127.0.0.1", 5433)]
        );
        let text = edit(|v| {
            v["postgres"]["host"] = "db1,db2".into();
            v["postgres"]["port"] = serde_json::json!([6432, 6433]);
        });
        assert_eq!(servers(&text, &[]), [pair("db1", 6432), pair("db2", 6433)]);
        // The same from the environment.
        let env = [
            ("PUSHOCCURRENCE_POSTGRES_HOST", "db1,db2"),
            ("PUSHOCCURRENCE_POSTGRES_PORT", "7001,7002"),
        ];
        assert_eq!(servers(SEED, &env), [pair("db1", 7001), pair("db2", 7002)]);
        let env = [("PUSHOCCURRENCE_POSTGRES_PORT", "7001")];
        assert_eq!(servers(SEED, &env), [pair("localhost", 7001)]);

        // Mistakes name the key and the fix.
        let text = edit(|v| {
            v["postgres"]["host"] = "db1,db2".into();
            v["postgres"]["port"] = "1,2,3".into();
        });
        assert_eq!(
            err(&text, &[]),
            "config.json: keys postgres.host and postgres.port: 2 hosts but 3 ports; give one port for all hosts, or one per host in the same order"
        );
        let e = err(&edit(|v| v["postgres"]["host"] = "db1,,db2".into()), &[]);
        assert!(
            e.starts_with("config.json: key postgres.host: 'db1,,db2' has an empty host name"),
            "{e}"
        );
        let e = err(&edit(|v| v["postgres"]["port"] = "5432,x".into()), &[]);
        assert!(
            e.starts_with("config.json: key postgres.port: invalid value"),
            "{e}"
        );
        assert!(
            e.contains("one per host as a list or separated by commas"),
            "{e}"
        );
        let e = err(
            &edit(|v| v["postgres"]["port"] = serde_json::json!([5432, 0])),
            &[],
        );
        assert_eq!(e, "config.json: key postgres.port: must be 1-65535");
        let e = err(
            &edit(|v| v["postgres"]["port"] = serde_json::json!([])),
            &[],
        );
        assert_eq!(e, "config.json: key postgres.port: list at least one port");
        let e = err(SEED, &[("PUSHOCCURRENCE_POSTGRES_PORT", "5432,70000")]);
        assert!(
            e.starts_with("environment variable PUSHOCCURRENCE_POSTGRES_PORT (key postgres.port): invalid value"),
            "{e}"
        );
    }

    #[test]
    fn pooler_and_listener_address_are_read_and_checked() {
        let c = parse(SEED, &[]).unwrap();
        assert_eq!(c.postgres.pooler, Pooler::None);
        assert!(!c.postgres.listener_is_direct());
        assert_eq!(c.postgres.for_listener().servers, c.postgres.servers);
        let env = [
            ("PUSHOCCURRENCE_POSTGRES_POOLER", "transaction"),
            ("PUSHOCCURRENCE_LISTENER_HOST", "db-primary"),
            ("PUSHOCCURRENCE_LISTENER_PORT", "5433"),
        ];
        let c = parse(SEED, &env).unwrap();
        assert_eq!(c.postgres.pooler, Pooler::Transaction);
        let listen = c.postgres.for_listener();
        assert_eq!(listen.servers_text(), "db-primary:5433");
        assert_eq!(
            c.postgres.for_session_work().servers_text(),
            "db-primary:5433"
        );
        let e = err(SEED, &[("PUSHOCCURRENCE_POSTGRES_POOLER", "statement")]);
        assert!(
            e.contains("postgres.pooler") && e.contains("'statement'"),
            "{e}"
        );
        // Migrations need a session, which a transaction pooler cannot give.
        let e = err(SEED, &[("PUSHOCCURRENCE_POSTGRES_POOLER", "transaction")]);
        assert!(
            e.contains("postgres.auto_migrate") && e.contains("listener.host"),
            "{e}"
        );
        let env = [
            ("PUSHOCCURRENCE_POSTGRES_POOLER", "transaction"),
            ("PUSHOCCURRENCE_POSTGRES_AUTO_MIGRATE", "false"),
        ];
        let c = parse(SEED, &env).unwrap();
        assert_eq!(c.postgres.for_session_work().servers, c.postgres.servers);
        let e = err(SEED, &[("PUSHOCCURRENCE_LISTENER_PORT", "0")]);
        assert!(e.contains("listener.port"), "{e}");
        // Several listener hosts, as postgres.host takes them.
        let env = [
            ("PUSHOCCURRENCE_LISTENER_HOST", "db-1, db-2"),
            ("PUSHOCCURRENCE_LISTENER_PORT", "5433,5434"),
        ];
        let c = parse(SEED, &env).unwrap();
        assert_eq!(
            c.postgres.for_listener().servers_text(),
            "db-1:5433,db-2:5434"
        );
        let c = parse(SEED, &[("PUSHOCCURRENCE_LISTENER_HOST", "db-1,db-2")]).unwrap();
        assert_eq!(
            c.postgres.for_listener().servers_text(),
            "db-1:5432,db-2:5432"
        );
        let e = err(
            SEED,
            &[
                ("PUSHOCCURRENCE_LISTENER_HOST", "db-1,db-2,db-3"),
                ("PUSHOCCURRENCE_LISTENER_PORT", "5433,5434"),
            ],
        );
        assert!(
            e.contains("keys listener.host and listener.port: 3 hosts but 2 ports"),
            "{e}"
        );
        let e = err(SEED, &[("PUSHOCCURRENCE_LISTENER_HOST", "db-1,")]);
        assert!(
            e.contains("(key listener.host): 'db-1,' has an empty host name"),
            "{e}"
        );
    }

    #[test]
    fn tls_settings_are_checked_when_loaded() {
        let e = err(
            &edit(|v| v["postgres"]["ssl_mode"] = "verify-ca".into()),
            &[],
        );
        assert!(
            e.starts_with("config.json: key postgres.ssl_root_cert: ssl_mode 'verify-ca' checks"),
            "{e}"
        );
        let e = err(
            SEED,
            &[(
                "PUSHOCCURRENCE_POSTGRES_SSL_ROOT_CERT",
                "/nonexistent/ca.pem",
            )],
        );
        assert!(
            e.starts_with("environment variable PUSHOCCURRENCE_POSTGRES_SSL_ROOT_CERT (key postgres.ssl_root_cert): cannot read /nonexistent/ca.pem"),
            "{e}"
        );
    }
}
