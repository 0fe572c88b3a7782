//! PostgreSQL: connections, the outbox's SQL, migrations and the listener.
//!
//! Every session carries the configured `application_name` (default
//! `pushoccurrence`) and TCP keepalives, so operators can find the relay's
//! sessions and a dead peer is noticed in seconds, not hours.

pub mod listener;
pub mod migrate;
pub mod outbox;

use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use tokio_postgres::Client;

use tracing::{debug, warn};

use crate::config::{PgServer, Pooler, PostgresConfig};
use crate::tls::{self, SslMode};

/// What a session is for; claim sessions get server-side timeouts that
/// release their row locks if the relay freezes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// One-off commands, migrations and the listener.
    Plain,
    /// A worker's claim-publish-mark transactions.
    Claim {
        /// Upper bound of one claim transaction (confirm timeout plus margin).
        idle_in_transaction: Duration,
    },
}

/// Opens a session and spawns the task that drives it. A claim session gets
/// its settings here (by `SET`), except behind a transaction pooler, where
/// each claim transaction sets them ([`claim_settings_sql`]). Bounded as a
/// whole: each server by `postgres.connect_timeout_sec`
/// ([`open_first_writable`]), the settings by `postgres.query_timeout_ms`,
/// so callers need no deadline of their own (one would cut short the walk
/// over several servers).
///
/// # Errors
/// The connection error, which never contains the password.
pub async fn connect(
    pg: &PostgresConfig,
    kind: SessionKind,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = open_first_writable(pg).await?;
    drive(connection);
    if let SessionKind::Claim {
        idle_in_transaction,
    } = kind
        && !behind_transaction_pooler(pg)
    {
        let settings = claim_settings_sql(pg, idle_in_transaction, false);
        tokio::time::timeout(pg.query_timeout, client.batch_execute(&settings))
            .await
            .unwrap_or_else(|_| Err(tokio_postgres::Error::__private_api_timeout()))?;
    }
    Ok(client)
}

/// A plain session ([`SessionKind::Plain`]), as [`connect`] opens it, and
/// the server of `pg.servers` it went to (the first that answered and
/// accepts writes): what `check` reports, since the server's own idea of
/// its address names neither a host name nor a pooler in between.
///
/// # Errors
/// As [`connect`].
pub async fn connect_plain_reporting(
    pg: &PostgresConfig,
) -> Result<(Client, &PgServer), tokio_postgres::Error> {
    let (client, connection, server) = open_first_writable_server(pg).await?;
    drive(connection);
    Ok((client, server))
}

/// Spawns the task that drives a session's connection.
fn drive(connection: Connection) {
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%error, "postgres session ended");
        }
    });
}

/// A session on the first of `pg.servers`, in order, that answers and
/// accepts writes. Each server gets `postgres.connect_timeout_sec` for the
/// whole of it (TCP, TLS, the startup exchange and the read-write check):
/// the driver's own timeout covers only the TCP connect, so a server that
/// accepts the connection and never answers (a frozen primary still
/// completes TCP handshakes) would otherwise hold the session, and every
/// host after it, forever.
pub(crate) async fn open_first_writable(
    pg: &PostgresConfig,
) -> Result<(Client, Connection), tokio_postgres::Error> {
    let (client, connection, _) = open_first_writable_server(pg).await?;
    Ok((client, connection))
}

/// [`open_first_writable`], with the server the session went to.
async fn open_first_writable_server(
    pg: &PostgresConfig,
) -> Result<(Client, Connection, &PgServer), tokio_postgres::Error> {
    let tls = tls::connector(pg.ssl_mode, pg.ssl_root_cert.as_ref());
    let mut last = None;
    for server in &pg.servers {
        let mut cfg = session_config(pg);
        cfg.host(&server.host).port(server.port);
        match tokio::time::timeout(pg.connect_timeout, cfg.connect(tls.0.clone())).await {
            Ok(Ok((client, connection))) => return Ok((client, connection, server)),
            Ok(Err(e)) => last = Some(e),
            // The driver's own error for a connect that timed out.
            Err(_) => last = Some(tokio_postgres::Error::__private_api_timeout()),
        }
    }
    Err(last.unwrap_or_else(tokio_postgres::Error::__private_api_timeout))
}

/// A session's connection, to be polled (spawned, or read for notifications).
pub(crate) type Connection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
        tokio_postgres::Socket,
    >>::Stream,
>;

/// The driver configuration for one session, without its host (see
/// [`open_first_writable`], which tries the servers one at a time).
pub fn session_config(pg: &PostgresConfig) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    // Every session must be able to write (claims lock and mark rows, the
    // listener must hear the primary's NOTIFYs: LISTEN on a standby works
    // but hears nothing). A server whose `transaction_read_only` is on is
    // refused at connect ("database does not allow writes"), as libpq's
    // `target_session_attrs=read-write` does, so `open_first_writable`
    // goes on to the next server and a reconnect after a failover finds
    // the promoted standby, instead of failing every batch.
    cfg.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite)
        .dbname(&pg.database)
        .user(&pg.user)
        .application_name(&pg.application_name)
        .connect_timeout(pg.connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
    if let Some(password) = &pg.password {
        cfg.password(password.expose());
    }
    // The driver knows three modes; what verify-* add is in the connector.
    cfg.ssl_mode(match pg.ssl_mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    // No `options` startup parameter: PgBouncer refuses it
    // (`unsupported startup parameter: options`, SQLSTATE 08P01). The claim
    // settings are sent by `SET` once the session is up ([`connect`]), or by
    // `SET LOCAL` in every transaction behind a transaction pooler.
    cfg
}

/// Set once a transaction pooler is detected ([`transaction_pooler_seen`]).
static TRANSACTION_POOLER_SEEN: AtomicBool = AtomicBool::new(false);

/// Whether claim sessions must keep nothing across transactions (settings
/// by `SET LOCAL`, unnamed statements): `postgres.pooler = "transaction"`
/// says so, or a transaction pooler was detected.
pub fn behind_transaction_pooler(pg: &PostgresConfig) -> bool {
    pg.pooler == Pooler::Transaction || TRANSACTION_POOLER_SEEN.load(Ordering::Relaxed)
}

/// Whether `error` shows a transaction pooler the config does not name: a
/// statement the session prepared by name is missing (26000), or another
/// statement stands under its name (PostgreSQL refused the bind message:
/// its statement takes another number of parameters than the one the client
/// prepared, e.g. another relay's of an earlier release, whose names are
/// `s0`, `s1`, … too), so its transactions run on different server sessions
/// ([`transaction_pooler_found`]). (A name found taken at prepare time,
/// 42P05, shows only that a pooled server session carries another client's
/// statements, which a session pooler can hand on too; it is skipped, see
/// `Outbox::prepare`.)
pub fn transaction_pooler_seen(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    let missing = error.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME);
    if !missing && !bind_refused(error) {
        return false;
    }
    transaction_pooler_found(&describe(error));
    true
}

/// PostgreSQL refused a bind message (08P01 from `exec_bind_message`, named
/// by the server; the message itself may be in the server's language). A
/// pooler reports errors of its own with 08P01 too (PgBouncer's
/// `query_timeout`, for one), without a server routine.
fn bind_refused(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|e| {
        *e.code() == tokio_postgres::error::SqlState::PROTOCOL_VIOLATION
            && e.routine() == Some(BIND_ROUTINE)
    })
}

/// The PostgreSQL routine that checks a bind message against its statement.
const BIND_ROUTINE: &str = "exec_bind_message";

/// Records that a claim session's transactions ran on different server
/// sessions, as `sign` shows: PostgreSQL is behind a transaction pooler the
/// config does not name. The first time, warns with the fix; claim sessions
/// opened from then on work as behind a transaction pooler, so the relay
/// carries on.
pub fn transaction_pooler_found(sign: &str) {
    if !TRANSACTION_POOLER_SEEN.swap(true, Ordering::Relaxed) {
        warn!(
            %sign,
            "a claim session's transactions ran on different server sessions: PostgreSQL is behind a \
             transaction pooler; claim sessions now set their settings in every transaction and prepare \
             no named statement. Set postgres.pooler to \"transaction\" to say so from the start"
        );
    }
}

/// The statements that give a claim session its settings: the server-side
/// timeouts that release a frozen relay's row locks, the planner rules of
/// [`CLAIM_SESSION_SETTINGS`] and, with `local` (every transaction behind a
/// transaction pooler, where no session state survives a transaction), the
/// `application_name` too. Simple-protocol SQL, so it goes out in one round
/// trip and needs no prepared statement.
pub fn claim_settings_sql(
    pg: &PostgresConfig,
    idle_in_transaction: Duration,
    local: bool,
) -> String {
    let set = if local { "SET LOCAL" } else { "SET" };
    let mut sql = format!(
        "{set} idle_in_transaction_session_timeout = {}; {set} lock_timeout = 5000;",
        idle_in_transaction.as_millis()
    );
    for (setting, value) in CLAIM_SESSION_SETTINGS {
        sql.push_str(&format!(" {set} {setting} = {value};"));
    }
    if local {
        sql.push_str(&format!(
            " SET LOCAL application_name = {};",
            quote_literal(&pg.application_name)
        ));
    }
    sql
}

/// Planner settings of claim sessions, which only run the relay's own short
/// statements, each touching a batch of rows through an index. Without
/// statistics (a fresh table filled in a burst, before autovacuum analyzes
/// it) the planner guesses 0.5 % selectivity for the body lookup: it may pick
/// a hash join over a full scan of the body table, and its cost estimate
/// crosses `jit_above_cost`, so every claim is JIT-compiled (measured: 146 ms
/// of compilation for a 0.5 ms statement), and the same inflated estimate
/// launches parallel workers for a 256-row fetch (measured: 10 ms instead of
/// 1.4 ms). Ruling out JIT, parallel plans, sequential scans and hash or
/// merge joins keeps every claim a handful of index lookups, whatever the
/// statistics say.
///
/// With those rules the plan no longer depends on the parameters, so the
/// prepared statements use their generic plan from the first execution:
/// otherwise PostgreSQL plans the claim afresh on every execution (a custom
/// plan each time, as `pg_prepared_statements` shows), which was about 6 %
/// of PostgreSQL's CPU in a backlog drain.
pub const CLAIM_SESSION_SETTINGS: [(&str, &str); 6] = [
    ("jit", "off"),
    ("max_parallel_workers_per_gather", "0"),
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    ("plan_cache_mode", "force_generic_plan"),
];

/// `name` as a quoted SQL identifier: case is kept and nothing is interpreted.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a SQL string literal, as PostgreSQL's own `quote_literal`
/// writes it: quotes doubled, and a text with backslashes written as an
/// `E'...'` literal with them doubled, so it means the same whatever the
/// server's `standard_conforming_strings` says.
pub fn quote_literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if text.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// Whether a failed statement or connection may succeed when tried again,
/// by SQLSTATE (never by message text): a transaction rollback (class 40:
/// deadlock, serialization failure), a connection exception (class 08),
/// `lock_not_available` (55P03), the server shutting down or starting
/// (57P01-57P03), `too_many_connections` (53300), a read-only server
/// (25006 `read_only_sql_transaction`: the session landed on a standby or a
/// primary demoted under it; a new session goes to the one that accepts
/// writes, see [`is_read_only`]); or no SQLSTATE at all because the session
/// is closed or its socket failed. Everything else (privileges, missing or
/// mistyped objects, bad SQL) needs a person.
pub fn is_transient(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match error.code() {
        Some(code) => {
            let class = code.code().get(..2);
            matches!(class, Some("40" | "08"))
                || [
                    SqlState::LOCK_NOT_AVAILABLE,
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::TOO_MANY_CONNECTIONS,
                    SqlState::READ_ONLY_SQL_TRANSACTION,
                ]
                .contains(code)
        }
        None => {
            if error.is_closed() {
                return true;
            }
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                if cause.is::<std::io::Error>() {
                    return true;
                }
                source = cause.source();
            }
            false
        }
    }
}

/// Whether the server refused a write because it is read-only (SQLSTATE
/// 25006): a fault of the session, not of any row, and never cured by
/// trying again on it, so the session is dropped and replaced (with
/// back-off) by one on the server that accepts writes.
pub fn is_read_only(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
}

/// Whether the server refused a statement about rows for a reason of those
/// rows (by SQLSTATE, never by message text): a constraint (class 23), a
/// trigger's exception (P0001) or its failing statement (a privilege it
/// lacks: 42501), a value out of range (class 22). Not: no server error at
/// all (a lost session, a timeout), or a passing or server-wide condition
/// ([`is_transient`]; insufficient resources, class 53; operator
/// intervention such as a statement timeout, class 57; a system or internal
/// error, classes 58 and XX; an object in use or locked, class 55; a
/// statement that must be prepared again, class 0A; an aborted
/// transaction, class 25; a prepared statement missing, class 26, as
/// behind a transaction pooler). Those fail the batch and charge no row.
pub fn is_rows_own(error: &tokio_postgres::Error) -> bool {
    let Some(db) = error.as_db_error() else {
        return false;
    };
    !is_transient(error)
        && !matches!(
            db.code().code().get(..2),
            Some("53" | "55" | "57" | "58" | "XX" | "0A" | "25" | "26")
        )
}

/// A one-line description of a driver error: its SQLSTATE and server text
/// when the server sent one.
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            // The driver's text names only the step ("error performing TLS
            // handshake"); the cause (which certificate check failed) is in
            // the sources.
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    text = format!("{text}: {cause_text}");
                }
                source = cause.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_settings_are_set_for_the_session_or_for_each_transaction() {
        let text = r#"{"postgres": {"database": "d", "user": "u"},
                        "rabbitmq": {"url": "amqp://h/", "queue": {"name": "q"}},
                        "listener": {"channels": ["c"]}}"#;
        let config = crate::config::Config::parse(text, &Default::default(), "test").unwrap();
        let pg = config.postgres;
        let session = claim_settings_sql(&pg, Duration::from_secs(40), false);
        assert!(session.starts_with("SET idle_in_transaction_session_timeout = 40000;"));
        assert!(!session.contains("LOCAL") && !session.contains("application_name"));
        let local = claim_settings_sql(&pg, Duration::from_secs(40), true);
        for (setting, value) in CLAIM_SESSION_SETTINGS {
            assert!(
                local.contains(&format!("SET LOCAL {setting} = {value};")),
                "{local}"
            );
        }
        assert!(local.contains("SET LOCAL lock_timeout = 5000;"));
        assert!(local.contains("SET LOCAL application_name = 'pushoccurrence';"));
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("MyChan"), "\"MyChan\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\'b"), r"E'a\\''b'");
    }
}
