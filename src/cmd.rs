//! The subcommands' implementations: load the config, call the library,
//! and report in words an operator can act on.

use std::time::Duration;

use anyhow::Context as _;
use tokio_postgres::types::Type;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::db::outbox::{
    INDEXES, IndexState, Outbox, PENDING_INDEX, REPEATABLE_IDS_WARNING, SchemaError, Settle,
    index_state,
};
use crate::db::{self, SessionKind, describe, migrate};
use crate::{mq, service, shutdown};

/// A service could not be reached; exit code 69.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// The text of `error` for the operator: the error and each cause, each
/// said once. Several errors already write their cause into their own text
/// (`take the migration lock: deadlock detected`) and also return it as
/// their source, so printing the whole chain (anyhow's `{:#}`) said
/// everything twice or three times. A cause whose text is already written
/// is dropped with everything below it: the error that wrote it has said
/// what it knows of its own causes. A PostgreSQL error is said as
/// [`describe`] says it (the server's message and SQLSTATE), which is also
/// how the relay's own errors quote one, and ends the chain (its sources
/// are in that text).
pub fn error_text(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let pg = cause.downcast_ref::<tokio_postgres::Error>();
        let said = pg.map_or_else(|| cause.to_string(), describe);
        if text.contains(&said) {
            break;
        }
        text.push_str(": ");
        text.push_str(&said);
        if pg.is_some() {
            break;
        }
    }
    text
}

/// `run`: relays until a signal; a second signal exits at once.
///
/// # Errors
/// A config or start-up error.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let stop = async {
        match shutdown::signal().await {
            Ok(signal) => {
                info!(signal, "stop requested");
                tokio::spawn(async {
                    if let Ok(signal) = shutdown::signal().await {
                        warn!(
                            signal,
                            "second stop request; exiting now (in-flight rows stay pending)"
                        );
                        std::process::exit(130);
                    }
                });
            }
            Err(e) => {
                error!(error = %e, "cannot install signal handlers; stop the relay with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    };
    service::run(config, stop).await?;
    Ok(())
}

/// `migrate`: brings the outbox schema up to date.
///
/// # Errors
/// Unreachable database, or a failing migration step.
pub async fn migrate(config: Config) -> anyhow::Result<()> {
    let pg = &config.postgres;
    // Its advisory lock and CREATE INDEX CONCURRENTLY need one server
    // session throughout; through a transaction pooler the lock would stay
    // behind on a pooled session and block every later migration.
    if pg.pooler == crate::config::Pooler::Transaction && !pg.listener_is_direct() {
        return Err(db::outbox::SchemaError::Unsupported(
            "migrate needs a session of its own, which a transaction pooler (postgres.pooler) cannot give: \
             set listener.host and listener.port to PostgreSQL itself (migrate uses that address), \
             or run migrate with postgres.host and postgres.port pointing at PostgreSQL"
                .to_owned(),
        )
        .into());
    }
    let client = connect(&config).await?;
    let (report, outbox) =
        migrate::run(&client, &config.postgres.schema, &config.channels[0]).await?;
    let list = |names: &[&str], label: &str| {
        if names.is_empty() {
            String::new()
        } else {
            format!(", {label}: {}", names.join(", "))
        }
    };
    println!(
        "outbox {}: tables {}, indexes created: {}{}{}, message_id {}, message_body {}",
        outbox.schema,
        if report.created_tables {
            "created"
        } else {
            "already present"
        },
        if report.created_indexes.is_empty() {
            "none".to_owned()
        } else {
            report.created_indexes.join(", ")
        },
        list(&report.present_indexes, "already present"),
        list(&report.dropped_indexes, "dropped (superseded)"),
        outbox.id_type,
        outbox.body_type_sql,
    );
    if let Some(limit) = outbox.helper_limit() {
        println!("note: {limit}");
    }
    // Everything else is done; an index the relay could not make because
    // its name is taken needs the operator, so the run does not pass.
    if !report.conflicts.is_empty() {
        return Err(SchemaError::Unsupported(report.conflicts.join("; ")).into());
    }
    Ok(())
}

/// `check`: one line per check, stopping at the first failure.
///
/// # Errors
/// The first failed check, classified for the exit code.
pub async fn check(config: Config, config_origin: &str) -> anyhow::Result<()> {
    println!("ok    config: {config_origin}");
    let pg = &config.postgres;
    let (client, server) = match db::connect_plain_reporting(pg).await {
        Ok(session) => session,
        Err(e) => {
            let msg = format!(
                "postgres: cannot connect to {} database {} as {}: {}; check postgres.* and that the server is up (with several hosts, that one accepts writes)",
                pg.servers_text(),
                pg.database,
                pg.user,
                describe(&e)
            );
            println!("FAIL  {msg}");
            return Err(Unavailable(msg).into());
        }
    };
    let version: String = client
        .query_typed_one("SHOW server_version", &[])
        .await
        .context("read the server version")?
        .get(0);
    println!(
        "ok    postgres: {} database {} (server {version}{})",
        pg.servers_text(),
        pg.database,
        connected_to(server, pg)
    );

    let outbox = match Outbox::inspect(&client, &pg.schema).await {
        Ok(outbox) => outbox,
        Err(e) => {
            println!("FAIL  outbox schema {}: {e}", pg.schema);
            return Err(e.into());
        }
    };
    let pending_index = index_state(&client, &outbox.schema, &INDEXES[0])
        .await
        .context("look for the pending-rows index")?;
    let index_note = match pending_index {
        state if state.ready() => String::new(),
        IndexState::Absent | IndexState::Index { matches: true, .. } => {
            " (no pending-rows index: claims will scan; run `pushoccurrence migrate`)".to_owned()
        }
        IndexState::Index { .. } => format!(
            " (no pending-rows index: claims will scan; its name {PENDING_INDEX} is taken by an index \
             that is not the relay's: rename that index and run `pushoccurrence migrate`)"
        ),
        IndexState::NotAnIndex { kind } => format!(
            " (no pending-rows index: claims will scan; its name {PENDING_INDEX} is taken by a {kind}: \
             rename it and run `pushoccurrence migrate`)"
        ),
    };
    println!(
        "ok    outbox schema {}: message_id {}, message_body {}{index_note}{}",
        outbox.schema,
        outbox.id_type,
        outbox.body_type_sql,
        outbox
            .helper_limit()
            .map(|limit| format!(" ({limit})"))
            .unwrap_or_default()
    );

    let unique = outbox
        .ids_unique(&client)
        .await
        .context("look for a unique constraint on message_id")?;
    if !unique {
        let repeated = outbox
            .repeated_ids(&client)
            .await
            .context("count the ids that repeat")?;
        let found = match repeated {
            0 => "no id repeats yet".to_owned(),
            1 => "1 id already repeats".to_owned(),
            n => format!("{n} ids already repeat"),
        };
        println!(
            "WARN  outbox schema {}: {REPEATABLE_IDS_WARNING} ({found}): {}",
            outbox.schema,
            outbox.unique_ids_sql()
        );
    }

    let missing = outbox
        .missing_privileges(&client, config.retention.is_some())
        .await
        .context("check the role's privileges")?;
    if !missing.is_empty() {
        let msg = format!(
            "privileges: role {} lacks {}; grant them as in deploy/relay-role.sql",
            pg.user,
            missing.join(", ")
        );
        println!("FAIL  {msg}");
        return Err(Unavailable(msg).into());
    }
    println!(
        "ok    privileges: role {} may claim, mark and record rows",
        pg.user
    );

    // Every node, each on its own: a cluster with one node down still
    // relays (a warning), one with none reachable does not.
    let mq = &config.rabbitmq;
    let mut connection = None;
    let mut failures = Vec::new();
    for node in &mq.nodes {
        let attempt = tokio::time::timeout(Duration::from_secs(30), mq::connect_node(mq, node));
        match attempt.await {
            Ok(Ok(c)) => {
                println!("ok    rabbitmq: {}", node.redacted);
                if let Some(earlier) = connection.replace(c) {
                    let _closed: Result<(), _> = earlier.close(200, "check done".into()).await;
                }
            }
            Ok(Err(reason)) => failures.push(format!("rabbitmq: {reason}")),
            Err(_) => failures.push(format!(
                "rabbitmq: no answer from {} within 30s",
                node.redacted
            )),
        }
    }
    let Some(connection) = connection else {
        let msg = failures.join("; ");
        println!("FAIL  {msg}");
        return Err(Unavailable(msg).into());
    };
    for failure in &failures {
        println!("WARN  {failure}");
    }
    println!(
        "ok    queue {}: declared (durable {}, exclusive {}, auto_delete {})",
        mq.queue.name, mq.queue.durable, mq.queue.exclusive, mq.queue.auto_delete
    );
    println!(
        "ok    routing: {} exchange(s), {} more queue(s), {} binding(s) declared; \
         default route: exchange '{}', routing key '{}'; {} channel route(s)",
        mq.exchanges.len(),
        mq.queues.len(),
        mq.bindings.len(),
        mq.default_route.exchange,
        mq.default_route.routing_key,
        mq.routes.len()
    );
    let _closed = connection.close(200, "check done".into()).await;
    Ok(())
}

/// With several servers configured, which one the session went to (the
/// first one that answered and accepted writes), as `; writes go to
/// host:port` in the config's words; nothing for one.
fn connected_to(server: &crate::config::PgServer, pg: &crate::config::PostgresConfig) -> String {
    if pg.servers.len() < 2 {
        return String::new();
    }
    format!("; writes go to {}:{}", server.host, server.port)
}

/// Opens a plain session for a one-off command; unreachable is exit 69.
async fn connect(config: &Config) -> Result<tokio_postgres::Client, Unavailable> {
    db::connect(&config.postgres.for_session_work(), SessionKind::Plain)
        .await
        .map_err(|e| Unavailable(format!("connect to postgres: {}", describe(&e))))
}

/// Opens a plain session and reads the outbox, for the operator commands.
async fn open_outbox(config: &Config) -> anyhow::Result<(tokio_postgres::Client, Outbox)> {
    let client = connect(config).await?;
    let outbox = Outbox::inspect(&client, &config.postgres.schema).await?;
    Ok((client, outbox))
}

/// `status`: the outbox's backlog and recent throughput, one line each.
///
/// # Errors
/// Unreachable database or unusable schema.
pub async fn status(config: Config) -> anyhow::Result<()> {
    let (client, outbox) = open_outbox(&config).await?;
    let backlog = client
        .query_typed_one(&outbox.backlog_sql(), &[])
        .await
        .context("count pending rows")?;
    let history = client
        .query_typed_one(&outbox.history_sql(), &[])
        .await
        .context("count parked and transferred rows")?;
    let (pending, oldest): (i64, f64) = (backlog.get(0), backlog.get(1));
    let (parked, held_keys, last_minute, last_hour): (i64, i64, i64, i64) = (
        history.get(0),
        history.get(1),
        history.get(2),
        history.get(3),
    );
    println!("outbox                    {}", outbox.schema);
    println!("pending                   {pending}");
    println!("oldest pending age        {oldest:.1} s");
    println!("parked                    {parked}");
    println!(
        "held ordering keys        {held_keys}{}",
        if held_keys > 0 {
            " (a parked row holds back the rest of its key; see `pushoccurrence parked`)"
        } else {
            ""
        }
    );
    println!("transferred, last minute  {last_minute}");
    println!("transferred, last hour    {last_hour}");
    let listen = config.postgres.for_listener();
    let at = listen.servers_text();
    match crate::db::listener::hears(&listen, &config.postgres).await {
        Ok(true) => println!("notifications             heard by a session at {at}"),
        Ok(false) => println!(
            "notifications             NOT heard by a session at {at} (a transaction pooler?): \
             a relay there is polling every {} ms; give the listener a direct connection (listener.host, listener.port)",
            config.relay.idle_sleep.as_millis()
        ),
        Err(reason) => println!("notifications             unknown: {reason}"),
    }
    Ok(())
}

/// Where `send` routes its event; `None` leaves it to the config.
#[derive(Debug, Default)]
pub struct SendRoute {
    /// NOTIFY channel (default: the first configured).
    pub channel: Option<String>,
    /// Exchange.
    pub exchange: Option<String>,
    /// Routing key.
    pub routing_key: Option<String>,
}

/// `send`: one test event through the producer helper, in its own
/// transaction; prints the new id.
///
/// # Errors
/// Unreachable database, unusable schema, or a body the column refuses.
pub async fn send(config: Config, body: &str, route: SendRoute) -> anyhow::Result<()> {
    let (client, outbox) = open_outbox(&config).await?;
    let channel = route.channel.unwrap_or_else(|| config.channels[0].clone());
    let row = client
        .query_typed_one(
            &outbox.send_sql(),
            &[
                (&body, Type::TEXT),
                (&channel, Type::TEXT),
                (&route.exchange, Type::TEXT),
                (&route.routing_key, Type::TEXT),
            ],
        )
        .await
        .map_err(|e| anyhow::anyhow!("write the test event: {}", describe(&e)))?;
    let id: String = row.get(0);
    println!("{id}");
    Ok(())
}

/// `parked`: one line per parked row, oldest first, and how many more
/// there are. Values are escaped (`\n`, `\t`, `\\`) so one row stays one
/// line with tab-separated fields, whatever a reason or a text id holds.
///
/// # Errors
/// Unreachable database or unusable schema.
pub async fn parked(config: Config, limit: i64) -> anyhow::Result<()> {
    let (client, outbox) = open_outbox(&config).await?;
    let total: i64 = client
        .query_typed_one(&outbox.parked_count_sql(), &[])
        .await
        .context("count parked rows")?
        .get(0);
    let rows = client
        .query_typed(&outbox.parked_sql(), &[(&limit, Type::INT8)])
        .await
        .context("list parked rows")?;
    if total == 0 {
        println!("no parked rows in {}", outbox.schema);
    }
    for row in &rows {
        let id: String = row.get(0);
        let attempts: i32 = row.get(1);
        let parked_at: String = row.get(2);
        let reason: Option<String> = row.get(3);
        let key: Option<String> = row.get(4);
        let behind: Option<i64> = row.get(5);
        let ordering = match key {
            Some(key) => format!(
                "\tordering_key={}\tholds_back={}",
                one_line(&key),
                behind.unwrap_or_default()
            ),
            None => String::new(),
        };
        println!(
            "{}\tattempts={attempts}\tparked_at={parked_at}{ordering}\treason={}",
            one_line(&id),
            one_line(&reason.unwrap_or_default())
        );
    }
    let shown = i64::try_from(rows.len()).unwrap_or(i64::MAX);
    if total > shown {
        println!(
            "{} more parked row(s) not shown; raise --limit to see them",
            total - shown
        );
    }
    Ok(())
}

/// `text` with backslashes and control characters escaped, so it fits on
/// one line of tab-separated output.
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// None of the ids given named a parked row; exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("nothing {0}: no id given names a parked row")]
pub struct NothingSettled(&'static str);

/// `requeue` and `discard`: settles parked rows ([`Settle`]) and wakes
/// running relays (a requeued row goes out again; a discarded one lets the
/// rows behind it in its ordering key go). Each id that is not settled is
/// reported with why: malformed, not found, still pending (not parked) or
/// already transferred.
///
/// # Errors
/// Unreachable database or unusable schema; [`NothingSettled`] when ids
/// were given and none named a parked row.
pub async fn settle_parked(
    config: Config,
    ids: &[String],
    all: bool,
    settle: Settle,
) -> anyhow::Result<()> {
    let (done, doing) = match settle {
        Settle::Requeue => ("requeued", "requeue"),
        Settle::Discard => ("discarded", "discard"),
    };
    let (mut client, outbox) = open_outbox(&config).await?;
    let mut malformed = Vec::new();
    // (as typed, canonical)
    let mut wanted: Vec<(&String, String)> = Vec::new();
    for id in ids {
        match outbox.canonical_id(id) {
            Ok(canonical) => wanted.push((id, canonical)),
            Err(why) => malformed.push(format!("{} ({why})", one_line(id))),
        }
    }
    let canonical: Vec<&str> = wanted.iter().map(|(_, c)| c.as_str()).collect();
    let tx = client
        .transaction()
        .await
        .with_context(|| format!("begin the {doing}"))?;
    let settled: Vec<String> = tx
        .query_typed(
            &outbox.settle_parked_sql(settle),
            &[(&canonical, Type::TEXT_ARRAY), (&all, Type::BOOL)],
        )
        .await
        .with_context(|| format!("{doing} parked rows"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let states: Vec<(String, bool, bool)> = tx
        .query_typed(&outbox.id_states_sql(), &[(&canonical, Type::TEXT_ARRAY)])
        .await
        .with_context(|| format!("look up the ids not {done}"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    tx.commit()
        .await
        .with_context(|| format!("commit the {doing}"))?;
    // Wake every relay listening on the first channel; the payload is only a hint.
    if !settled.is_empty() {
        client
            .execute_typed(
                "SELECT pg_notify($1, '')",
                &[(&config.channels[0], Type::TEXT)],
            )
            .await
            .context("notify the relays")?;
    }
    println!("{done} {} row(s)", settled.len());
    let (mut pending, mut transferred, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for (typed, canonical) in &wanted {
        if settled.contains(canonical) {
            continue;
        }
        let shown = one_line(typed);
        match states.iter().find(|(id, _, _)| id == canonical) {
            None => missing.push(shown),
            Some((_, true, _)) => transferred.push(shown),
            Some((_, false, _)) => pending.push(shown),
        }
    }
    for (what, list) in [
        ("malformed, left alone", &malformed),
        (
            "not found in the outbox (check the id and postgres.schema)",
            &missing,
        ),
        (
            "not parked (still pending; the relay sends it), left alone",
            &pending,
        ),
        ("already transferred, left alone", &transferred),
    ] {
        if !list.is_empty() {
            println!("{what}: {}", list.join(", "));
        }
    }
    if !ids.is_empty() && settled.is_empty() {
        return Err(NothingSettled(done).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver error: says its kind, and its cause in its text.
    #[derive(Debug, thiserror::Error)]
    #[error("db error: ERROR: deadlock detected")]
    struct Driver;

    /// Like `MigrateError::Statement`: writes the cause into its own text
    /// and also returns it as the source.
    #[derive(Debug, thiserror::Error)]
    #[error("take the migration lock: deadlock detected (40P01)")]
    struct Step(#[source] Driver);

    /// Like `StartError::Migrate`.
    #[derive(Debug, thiserror::Error)]
    enum Start {
        #[error("migrate the outbox: {0}")]
        Migrate(#[from] Step),
    }

    #[test]
    fn each_cause_is_said_once() {
        let e = anyhow::Error::from(Start::from(Step(Driver)));
        assert_eq!(
            error_text(&e),
            "migrate the outbox: take the migration lock: deadlock detected (40P01)"
        );
        // A context that does not repeat its cause keeps it.
        let e = anyhow::Error::from(Driver).context("list parked rows");
        assert_eq!(
            error_text(&e),
            "list parked rows: db error: ERROR: deadlock detected"
        );
    }
}
