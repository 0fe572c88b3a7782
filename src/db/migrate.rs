//! `migrate`: creates the seed's schema and tables when absent and adds
//! what the relay needs, all of it additive and idempotent.
//!
//! * The seed's two tables, exactly as the seed defines them (a `uuid` id and
//!   a `bytea` body), only if the status table does not exist yet. A body
//!   table that exists alone decides the status table's id type. What is
//!   created is checked ([`Outbox::inspect`]) before it is committed, so a
//!   run that fails leaves nothing behind; existing columns of types the
//!   relay cannot use stop the run before it changes anything.
//! * A partial index on pending rows, an index on the body table's
//!   `message_id` and a partial index on the transfer time of transferred
//!   rows (for retention). On a fresh table they are built in the creating
//!   transaction; on an existing one `CONCURRENTLY`, so producers keep
//!   writing (such a build waits for every older transaction of the
//!   database, so it first logs which those are). Indexes are checked by definition, never by name alone, and
//!   the relay's carry a comment ([`INDEX_COMMENT_MARK`]): an index it did
//!   not make is never dropped or taken for its own (its name taken is
//!   reported with the fix), and one left invalid by an interrupted build
//!   is rebuilt only when it is the relay's.
//! * The relay's bookkeeping columns and the optional message columns
//!   (routing and AMQP properties), all nullable or defaulted. `ALTER
//!   TABLE` needs the status table ACCESS EXCLUSIVE, and while it waits for
//!   that lock every producer's INSERT queues behind it: so it waits at
//!   most [`ALTER_LOCK_TIMEOUT`] at a time, and tries again with back-off,
//!   logging who holds the lock.
//! * The producer helper `push_occurrence(body, id, channel, routing fields...)`,
//!   typed after the real columns, which makes an id when none is given as
//!   the id type allows, and otherwise says why.
//!
//! A session advisory lock serialises concurrent migrations of one schema
//! (several relays starting together). It is taken by polling
//! `pg_try_advisory_lock`, never by waiting inside `pg_advisory_lock`: a
//! session waiting inside a statement holds a snapshot, and the lock
//! holder's `CREATE INDEX CONCURRENTLY` waits for every older snapshot to
//! end, so the two would wait for each other until PostgreSQL's deadlock
//! detector failed one of them (40P01).
//!
//! [`MigrateError::is_transient`] tells a failure that may pass on its own
//! (deadlock, serialization, lock timeout, server shutting down, lost
//! session) from one that needs the operator (privileges, unusable tables),
//! by SQLSTATE; `run`'s start-up retries the former.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tracing::{debug, info, warn};

use super::outbox::{
    Column, DATA_INDEX, DATA_TABLE, ENQUEUED_AT_DEFAULT, GENERATED_ID_CHARS, INDEX_COMMENT_MARK,
    INDEXES, IdKind, IndexSpec, IndexState, LOG_TABLE, MESSAGE_COLUMNS, ORDERING_COLUMN,
    ORDERING_INDEX, Outbox, PARKED_INDEX, PENDING_INDEX, PRODUCER_FUNCTION, RELAY_COLUMNS,
    SUPERSEDED_INDEXES, SchemaError, TRANSFERRED_INDEX, check_types, find, index_state,
    read_columns,
};
use super::{quote_ident, quote_literal};
use crate::backoff::Backoff;

/// What one migration run did, for the operator.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The tables were created by this run.
    pub created_tables: bool,
    /// The relay's columns were added by this run.
    pub added_columns: bool,
    /// Indexes created (or rebuilt) by this run.
    pub created_indexes: Vec<&'static str>,
    /// The relay's indexes found in place, with their definitions.
    pub present_indexes: Vec<&'static str>,
    /// Indexes of earlier releases dropped by this run.
    pub dropped_indexes: Vec<&'static str>,
    /// Indexes not made because their name is taken by something of the
    /// user's, each in words with the fix. The relay works without them,
    /// more slowly.
    pub conflicts: Vec<String>,
}

/// Errors of a migration run.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A statement failed; the text says which step.
    #[error("{step}: {source}", source = super::describe(.source))]
    Statement {
        /// What the failing statement was for.
        step: &'static str,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The existing tables cannot be used.
    #[error(transparent)]
    Schema(#[from] SchemaError),
}

impl MigrateError {
    /// Whether the same migration may succeed if tried again (on a new
    /// session when this one is gone): see [`super::is_transient`]. Schema
    /// problems and refusals such as a missing privilege are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Statement { source, .. } | Self::Schema(SchemaError::Query(source)) => {
                super::is_transient(source)
            }
            Self::Schema(_) => false,
        }
    }
}

/// How long a migration waiting for another instance's sleeps between
/// tries of the lock: short next to a migration, long next to a try.
const LOCK_POLL: Duration = Duration::from_millis(100);

fn step(step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> MigrateError {
    move |source| MigrateError::Statement { step, source }
}

/// Brings `schema` up to date; `default_channel` becomes the producer
/// helper's default NOTIFY channel.
///
/// # Errors
/// [`MigrateError`] naming the step that failed (often a missing privilege).
pub async fn run(
    client: &Client,
    schema: &str,
    default_channel: &str,
) -> Result<(Report, Outbox), MigrateError> {
    let lock_key = format!("pushoccurrence:migrate:{schema}");
    // Polled, so that no session of ours sits inside a statement while the
    // holder builds an index concurrently (see the module's doc).
    let mut waiting = false;
    loop {
        let taken: bool = client
            .query_typed_one(
                "SELECT pg_try_advisory_lock(hashtext($1))",
                &[(&lock_key, Type::TEXT)],
            )
            .await
            .map_err(step("take the migration lock"))?
            .get(0);
        if taken {
            break;
        }
        if !waiting {
            info!(
                schema,
                "waiting for another instance's migration of this schema"
            );
            waiting = true;
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
    let result = migrate_locked(client, schema, default_channel).await;
    // The lock also ends with the session, so a failed unlock loses nothing.
    let _unlocked = client
        .execute_typed(
            "SELECT pg_advisory_unlock(hashtext($1))",
            &[(&lock_key, Type::TEXT)],
        )
        .await;
    result
}

async fn migrate_locked(
    client: &Client,
    schema: &str,
    default_channel: &str,
) -> Result<(Report, Outbox), MigrateError> {
    let s = quote_ident(schema);
    let log = format!("{s}.{}", quote_ident(LOG_TABLE));
    // Changing a default never rewrites the table.
    let enqueued_at_default = format!(
        "ALTER TABLE {log} ALTER COLUMN relay_enqueued_at SET DEFAULT {ENQUEUED_AT_DEFAULT}"
    );
    let columns: Vec<(&str, &str)> = RELAY_COLUMNS
        .into_iter()
        .chain(MESSAGE_COLUMNS.map(|(name, ty, _)| (name, ty)))
        .chain([(ORDERING_COLUMN.0, ORDERING_COLUMN.1)])
        .collect();
    let add_columns = format!(
        "ALTER TABLE {log} {}",
        columns
            .iter()
            .map(|(name, ty)| format!("ADD COLUMN IF NOT EXISTS {name} {ty}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut report = Report::default();

    // Decide from what exists before changing anything: a column of a
    // type the relay cannot use stops the run before it adds to the table.
    let existing = read_columns(client, schema).await?;
    check_types(schema, &existing)?;
    let has = |table: &str| existing.iter().any(|c| c.table == table);
    if has(LOG_TABLE) && !has(DATA_TABLE) {
        // Not `SchemaError::Missing`, whose fix is to run `migrate`: this
        // is `migrate` saying what it will not guess (the body table's
        // types and keys are the user's choice once the status table is).
        let id_type = find(&existing, LOG_TABLE, "message_id")
            .map_or("<the type of message_id>", |c| c.sql_type.as_str());
        return Err(SchemaError::Unsupported(format!(
            "{schema}.{LOG_TABLE} exists but {schema}.{DATA_TABLE} does not; create it with the same \
             message_id type, e.g. CREATE TABLE {s}.{DATA_TABLE} (message_id {id_type}, message_body bytea), \
             and run migrate again",
            s = quote_ident(schema),
        ))
        .into());
    }
    if !has(LOG_TABLE) {
        create_tables(
            client,
            schema,
            &existing,
            &add_columns,
            &enqueued_at_default,
        )
        .await?;
        report.created_tables = true;
        report.added_columns = true;
        report.created_indexes.push(PENDING_INDEX);
        if !has(DATA_TABLE) {
            report.created_indexes.push(DATA_INDEX);
        }
        report.created_indexes.push(TRANSFERRED_INDEX);
        report.created_indexes.push(PARKED_INDEX);
        report.created_indexes.push(ORDERING_INDEX);
    } else {
        // ALTER TABLE takes an exclusive lock, even with IF NOT EXISTS: only
        // when a column is really missing. A column with a constant default
        // is added without rewriting the table.
        if columns
            .iter()
            .any(|(name, _)| find(&existing, LOG_TABLE, name).is_none())
        {
            alter_status_table(
                client,
                &log,
                &add_columns,
                "add the relay's columns to the status table",
            )
            .await?;
            report.added_columns = true;
        }
        let default: Option<String> = client
            .query_typed_one(
                "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a
                   LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                  WHERE a.attrelid = $1::text::regclass AND a.attname = 'relay_enqueued_at'",
                &[(&log, Type::TEXT)],
            )
            .await
            .map_err(step("read the default of relay_enqueued_at"))?
            .get(0);
        if default.as_deref() != Some(ENQUEUED_AT_DEFAULT) {
            alter_status_table(
                client,
                &log,
                &enqueued_at_default,
                "set the default of relay_enqueued_at",
            )
            .await?;
        }
    }
    // Existing tables may be large and busy: build without blocking writers.
    for spec in &INDEXES {
        ensure_index(client, schema, spec, &mut report).await?;
    }
    // Only once the index that replaces them is valid: until then the
    // old one keeps claims off a scan of the history.
    let pending_ready = index_state(client, schema, &INDEXES[0])
        .await
        .map_err(step("check the outbox indexes"))?
        .ready();
    for spec in SUPERSEDED_INDEXES.iter().filter(|_| pending_ready) {
        let state = index_state(client, schema, spec)
            .await
            .map_err(step("check the outbox indexes"))?;
        // Exactly what an earlier release made (they left no comment), or
        // marked as the relay's: any other index of that name is the user's.
        if let IndexState::Index { matches, ours, .. } = state
            && (matches || ours)
        {
            drop_index(client, schema, spec.name)
                .await
                .map_err(step("drop an index of an earlier release"))?;
            report.dropped_indexes.push(spec.name);
        }
    }

    let outbox = Outbox::inspect(client, schema).await?;
    client
        .batch_execute(&producer_function_sql(&outbox, default_channel))
        .await
        .map_err(step("install the producer function"))?;
    for conflict in &report.conflicts {
        warn!(schema, "{conflict}");
    }
    info!(
        schema,
        created_tables = report.created_tables,
        added_columns = report.added_columns,
        created_indexes = ?report.created_indexes,
        present_indexes = ?report.present_indexes,
        dropped_indexes = ?report.dropped_indexes,
        "outbox schema is up to date{}",
        if report.conflicts.is_empty() { "" } else { ", but for the indexes whose names are taken" }
    );
    Ok((report, outbox))
}

/// Creates the status table, and the body table unless it exists (its
/// `message_id` type then decides the status table's), with the relay's
/// columns and indexes, in one transaction that is rolled back if the
/// result is not an outbox the relay can use: a failed run leaves nothing
/// behind. A body table that existed alone gets no foreign key (adding one
/// would lock and scan it).
async fn create_tables(
    client: &Client,
    schema: &str,
    existing: &[Column],
    add_columns: &str,
    enqueued_at_default: &str,
) -> Result<(), MigrateError> {
    let s = quote_ident(schema);
    let log = format!("{s}.{}", quote_ident(LOG_TABLE));
    let data = format!("{s}.{}", quote_ident(DATA_TABLE));
    let data_exists = existing.iter().any(|c| c.table == DATA_TABLE);
    let id_type = match find(existing, DATA_TABLE, "message_id") {
        Some(column) => column.sql_type.clone(),
        None if data_exists => {
            return Err(SchemaError::Missing(format!(
                "column {schema}.{DATA_TABLE}.message_id does not exist"
            ))
            .into());
        }
        None => "uuid".to_owned(),
    };
    let data_table = if data_exists {
        String::new()
    } else {
        format!(
            "CREATE TABLE {data} (
                 message_id {id_type} REFERENCES {log}(message_id),
                 message_body BYTEA);
             {};
             {};",
            create_index_sql(schema, &INDEXES[1], false),
            comment_index_sql(schema, &INDEXES[1]),
        )
    };
    let ddl = format!(
        "BEGIN;
         SET LOCAL client_min_messages = warning; -- no notice for an existing schema
         CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE {log} (
             message_id {id_type} PRIMARY KEY,
             transferred BOOLEAN DEFAULT FALSE,
             transfer_time TIMESTAMP);
         {data_table}
         {add_columns};
         {enqueued_at_default};
         {};
         {};
         {};
         {};
         {};
         {};
         {};
         {};",
        create_index_sql(schema, &INDEXES[0], false),
        comment_index_sql(schema, &INDEXES[0]),
        create_index_sql(schema, &INDEXES[2], false),
        comment_index_sql(schema, &INDEXES[2]),
        create_index_sql(schema, &INDEXES[3], false),
        comment_index_sql(schema, &INDEXES[3]),
        create_index_sql(schema, &INDEXES[4], false),
        comment_index_sql(schema, &INDEXES[4]),
    );
    if let Err(e) = client.batch_execute(&ddl).await {
        // An error inside BEGIN leaves the transaction open and aborted.
        let _rolled_back = client.batch_execute("ROLLBACK").await;
        return Err(step("create the outbox schema and tables")(e));
    }
    // Checked before COMMIT, so that tables the relay cannot use are not
    // left behind.
    if let Err(e) = Outbox::inspect(client, schema).await {
        let _rolled_back = client.batch_execute("ROLLBACK").await;
        return Err(e.into());
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(step("create the outbox schema and tables"))
}

/// `CREATE INDEX [CONCURRENTLY] name ON schema.table (keys) [WHERE predicate]`.
fn create_index_sql(schema: &str, spec: &IndexSpec, concurrently: bool) -> String {
    format!(
        "CREATE INDEX {}{} ON {}.{} ({}){}",
        if concurrently { "CONCURRENTLY " } else { "" },
        quote_ident(spec.name),
        quote_ident(schema),
        quote_ident(spec.table),
        spec.keys.join(", "),
        spec.predicate
            .map(|p| format!(" WHERE {p}"))
            .unwrap_or_default()
    )
}

/// The comment that marks an index as the relay's ([`INDEX_COMMENT_MARK`]):
/// `migrate` drops or rebuilds only indexes that carry it (or that have
/// exactly the definition a release made).
fn comment_index_sql(schema: &str, spec: &IndexSpec) -> String {
    format!(
        "COMMENT ON INDEX {}.{} IS {}",
        quote_ident(schema),
        quote_ident(spec.name),
        quote_literal(&format!(
            "{INDEX_COMMENT_MARK} made by `pushoccurrence migrate`, which rebuilds it when it is invalid"
        ))
    )
}

/// Makes sure the relay's index `spec` exists with its definition, and
/// reports truthfully: created (or rebuilt), already present, or its name
/// taken by something of the user's, which is left alone.
async fn ensure_index(
    client: &Client,
    schema: &str,
    spec: &IndexSpec,
    report: &mut Report,
) -> Result<(), MigrateError> {
    let state = index_state(client, schema, spec)
        .await
        .map_err(step("check the outbox indexes"))?;
    let rename = |what: &str, kind: &str| {
        format!(
            "index {schema}.{name}: the name is taken by {what}; the relay's index on {schema}.{table} is missing \
             until it is free: rename that {kind} (ALTER {} {}.{} RENAME TO ...) and run `pushoccurrence migrate` again",
            kind.to_uppercase(),
            quote_ident(schema),
            quote_ident(spec.name),
            name = spec.name,
            table = spec.table,
        )
    };
    match state {
        IndexState::Index {
            matches: true,
            valid: true,
            ours,
            ..
        } => {
            // An earlier release made it without the mark.
            if !ours {
                client
                    .batch_execute(&comment_index_sql(schema, spec))
                    .await
                    .map_err(step("mark an outbox index as the relay's"))?;
            }
            if !report.created_indexes.contains(&spec.name) {
                report.present_indexes.push(spec.name);
            }
            return Ok(());
        }
        IndexState::Index { matches, ours, .. } if matches || ours => {
            // Left invalid by an interrupted build, or the relay's own
            // with another definition: rebuilt.
            drop_index(client, schema, spec.name)
                .await
                .map_err(step("drop an index left invalid by an interrupted build"))?;
        }
        IndexState::Index { definition, .. } => {
            report.conflicts.push(rename(
                &format!("an index that is not the relay's ({definition})"),
                "index",
            ));
            return Ok(());
        }
        IndexState::NotAnIndex { kind } => {
            report.conflicts.push(rename(&format!("a {kind}"), kind));
            return Ok(());
        }
        IndexState::Absent => {}
    }
    // A concurrent build waits, inside its statement, for every
    // transaction of the database older than it: say which, so a build
    // that seems to hang (and a relay start-up that waits on it) names
    // what it waits for.
    match older_transactions(client).await {
        Ok(Some(older)) => info!(
            index = spec.name,
            waits_for = %older,
            "building an outbox index CONCURRENTLY: it waits until these transactions of the database have ended"
        ),
        Ok(None) => {}
        Err(e) => {
            debug!(error = %super::describe(&e), "cannot list the transactions an index build waits for")
        }
    }
    client
        .batch_execute(&create_index_sql(schema, spec, true))
        .await
        .map_err(step("create an outbox index"))?;
    // Should this run end here, the next one finds the index unmarked but
    // of exactly the relay's definition, and marks it then.
    client
        .batch_execute(&comment_index_sql(schema, spec))
        .await
        .map_err(step("mark an outbox index as the relay's"))?;
    report.created_indexes.push(spec.name);
    Ok(())
}

/// How long an `ALTER TABLE` of the status table waits for its lock before
/// it gives up and tries again later. While it waits in the lock queue,
/// every producer's INSERT queues behind it, so the wait is short.
pub const ALTER_LOCK_TIMEOUT: &str = "1s";

/// Runs `sql` (an `ALTER TABLE` of the status table `log`) under
/// [`ALTER_LOCK_TIMEOUT`], trying again with back-off while another
/// session's lock is in the way, and logging who holds it each time.
async fn alter_status_table(
    client: &Client,
    log: &str,
    sql: &str,
    what: &'static str,
) -> Result<(), MigrateError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let Err(e) = client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '{ALTER_LOCK_TIMEOUT}'; {sql}; COMMIT;"
            ))
            .await
        else {
            return Ok(());
        };
        // An error inside BEGIN leaves the transaction open and aborted.
        let _rolled_back = client.batch_execute("ROLLBACK").await;
        if e.code() != Some(&SqlState::LOCK_NOT_AVAILABLE) {
            return Err(step(what)(e));
        }
        let holders = lock_holders(client, log)
            .await
            .unwrap_or_else(|e| format!("unknown ({})", super::describe(&e)));
        let delay = backoff.next_delay();
        warn!(
            table = %log.replace('"', ""),
            step = what,
            held_by = %holders,
            retry_in = ?delay,
            "waiting for a lock on the status table: ALTER TABLE needs it ACCESS EXCLUSIVE and the sessions in \
             held_by hold it; each try gives up after {ALTER_LOCK_TIMEOUT} so that producers never queue behind \
             it, and migrate goes on once those transactions end"
        );
        tokio::time::sleep(delay).await;
    }
}

/// The sessions holding a lock on table `table` (quoted), in words: pid,
/// lock modes, application name, user, state and how long their
/// transaction has been open. Never their query text, which may hold data.
async fn lock_holders(client: &Client, table: &str) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_typed_one(
            "SELECT coalesce(string_agg(h, '; '), 'no session holds it any more')
               FROM (SELECT format('pid %s (%s, application_name %L, user %s, %s, transaction open %s s)',
                                   a.pid, string_agg(DISTINCT l.mode, ' and '), a.application_name,
                                   a.usename, a.state,
                                   round(extract(epoch FROM clock_timestamp() - a.xact_start))::int8) AS h
                       FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                      WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()
                        AND l.relation = to_regclass($1)
                      GROUP BY a.pid, a.application_name, a.usename, a.state, a.xact_start) s",
            &[(&table, Type::TEXT)],
        )
        .await?
        .get(0))
}

/// The other sessions of this database in a transaction that holds an id
/// or a snapshot (those a concurrent index build waits for), in words as
/// [`lock_holders`] gives them; `None` when there are none.
async fn older_transactions(client: &Client) -> Result<Option<String>, tokio_postgres::Error> {
    client
        .query_typed_one(
            "SELECT string_agg(format('pid %s (application_name %L, user %s, %s, transaction open %s s)',
                                      pid, application_name, usename, state,
                                      round(extract(epoch FROM clock_timestamp() - xact_start))::int8), '; '
                               ORDER BY xact_start)
               FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()
                AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)",
            &[],
        )
        .await
        .map(|row| row.get(0))
}

/// Drops index `name` of `schema` without blocking writers.
async fn drop_index(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "DROP INDEX CONCURRENTLY IF EXISTS {}.{}",
            quote_ident(schema),
            quote_ident(name)
        ))
        .await
}

/// `schema.push_occurrence(body, id, channel, routing_key, exchange, headers,
/// content_type, correlation_id, reply_to, message_type, expiration_ms,
/// priority, ordering_key)`, every argument after the body optional: inserts
/// both rows, records the channel on the row (routes follow it), sends the
/// NOTIFY in the caller's transaction, and returns the id (a new UUID when
/// none is given). The versions of earlier releases (the seed-era three
/// arguments, then twelve) are dropped in the same transaction, so calls
/// never see two candidates or none; calls that name their arguments work
/// with every version.
fn producer_function_sql(outbox: &Outbox, default_channel: &str) -> String {
    let id = &outbox.id_type;
    let body = &outbox.body_type_sql;
    let s = quote_ident(&outbox.schema);
    let f = quote_ident(PRODUCER_FUNCTION);
    let channel = quote_literal(default_channel);
    let function_body = producer_function_body(outbox);
    let tag = dollar_quote_tag(&function_body);
    format!(
        "BEGIN;
         SET LOCAL client_min_messages = warning; -- no notice when there is nothing to drop
         DROP FUNCTION IF EXISTS {s}.{f}({body}, {id}, text);
         DROP FUNCTION IF EXISTS {s}.{f}({body}, {id}, text, text, text, jsonb, text, text, text, text, bigint, smallint);
         CREATE OR REPLACE FUNCTION {s}.{f}(
             p_message_body {body},
             p_message_id {id} DEFAULT NULL,
             p_channel text DEFAULT {channel},
             p_routing_key text DEFAULT NULL,
             p_exchange text DEFAULT NULL,
             p_headers jsonb DEFAULT NULL,
             p_content_type text DEFAULT NULL,
             p_correlation_id text DEFAULT NULL,
             p_reply_to text DEFAULT NULL,
             p_message_type text DEFAULT NULL,
             p_expiration_ms bigint DEFAULT NULL,
             p_priority smallint DEFAULT NULL,
             p_ordering_key text DEFAULT NULL)
         RETURNS {id} LANGUAGE plpgsql AS {tag}{function_body}{tag};
         COMMENT ON FUNCTION {s}.{f}({body}, {id}, text, text, text, jsonb, text, text, text, text, bigint, smallint, text) IS
             'Writes one outbox event (status row + body row) and notifies the relay; call it inside the business transaction. Arguments after the body are optional; name them, e.g. p_routing_key => ''order.created''.';
         COMMIT;"
    )
}

/// A UUIDv7 (RFC 9562: 48 bits of unix milliseconds, then the version,
/// then random bits), built from a random v4 uuid, since PostgreSQL 15 has
/// no `uuidv7()`: the first six bytes become the statement clock's
/// milliseconds and the version nibble 0100 becomes 0111 (bits 52 and 53).
/// Time-ordered ids put each new event's index entries (the status table's
/// primary key, the body table's index, both written and read for every
/// event) on the newest index pages; random v4 ids put them anywhere in an
/// index as large as the history, so the cost of every event grew with the
/// history (see docs/benchmarks.md).
pub const UUIDV7_SQL: &str = "encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) \
     placing substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::int8) FROM 3) \
     FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid";

/// The seed of the hash that names a key's producer lock (any constant:
/// it keeps the locks apart from hashes of the same text elsewhere).
const ORDERING_LOCK_SEED: i64 = 0x5075_7368_4f63;

/// The longest `ordering_key` the producer helper accepts, in bytes. A key
/// is an entry of [`ORDERING_INDEX`](super::outbox::ORDERING_INDEX) with
/// the row's time and id, and a btree entry holds at most 2704 bytes: a
/// longer key that does not compress would fail the insert with an error
/// about an index row size. 1024 leaves room for an id of any length the
/// relay publishes (255 bytes).
pub const MAX_ORDERING_KEY_BYTES: i32 = 1024;

/// The producer helper's PL/pgSQL body, which names the tables (so the
/// schema, a name chosen by the operator). An id the caller gives is used
/// as it is (stored with the column's own checks: a value too long for a
/// `varchar(n)` is refused, never cut). Without one, the helper makes one
/// as the id type allows ([`IdKind`]) or says why it cannot, with the fix.
fn producer_function_body(outbox: &Outbox) -> String {
    let id = &outbox.id_type;
    let log = outbox.table(LOG_TABLE);
    let data = outbox.table(DATA_TABLE);
    let status_table = format!("{}.{LOG_TABLE}", outbox.schema);
    let columns = "notify_channel, routing_key, exchange, headers, content_type, correlation_id, \
                   reply_to, message_type, expiration_ms, priority, ordering_key";
    let values = "p_channel, p_routing_key, p_exchange, p_headers, p_content_type, p_correlation_id, \
                  p_reply_to, p_message_type, p_expiration_ms, p_priority, p_ordering_key";
    // Serialises the producers of one key from this call to their commit,
    // so rows of a key commit in the order they were written: a
    // transaction that wrote first can no longer commit last, after the
    // relay published a later row. The lock is one 64-bit hash of the
    // schema and the key: another key shares it only by a hash collision,
    // which serialises the two keys' producers and orders nothing wrongly.
    let key_lock = format!(
        "IF octet_length(p_ordering_key) > {MAX_ORDERING_KEY_BYTES} THEN
                 RAISE EXCEPTION 'ordering_key is % bytes long; at most {MAX_ORDERING_KEY_BYTES} bytes are allowed', octet_length(p_ordering_key)
                     USING ERRCODE = 'string_data_right_truncation',
                           HINT = 'use a shorter key, or a hash of it, such as md5(key)';
             END IF;
             IF p_ordering_key IS NOT NULL THEN
                 PERFORM pg_advisory_xact_lock(hashtextextended({} || p_ordering_key, {ORDERING_LOCK_SEED}));
             END IF;",
        quote_literal(&format!("{}:", outbox.schema))
    );
    let insert_with_id =
        format!("INSERT INTO {log} (message_id, {columns}) VALUES (v_id, {values});");
    // The fix goes into the message itself: many clients show no hint.
    let refuse = |errcode: &str, problem: String, fix: &str| {
        format!(
            "RAISE EXCEPTION USING ERRCODE = '{errcode}', MESSAGE = {};",
            quote_literal(&format!("{problem}: {fix}"))
        )
    };
    let without_id = match outbox.id_kind {
        IdKind::Uuid => format!("v_id := {UUIDV7_SQL};\n{insert_with_id}"),
        // Assigned, not cast: a cast to varchar(n) would cut the text.
        IdKind::Text { max_chars } if max_chars.is_none_or(|n| n >= GENERATED_ID_CHARS) => {
            format!("v_id := ({UUIDV7_SQL})::text;\n{insert_with_id}")
        }
        IdKind::Text { .. } => refuse(
            "22001",
            format!(
                "{status_table}.message_id is {id}, too short for the ids push_occurrence() makes \
                 (a uuid's text, {GENERATED_ID_CHARS} characters)"
            ),
            "pass p_message_id, or widen the column",
        ),
        IdKind::Integer { has_default: true } => format!(
            "INSERT INTO {log} ({columns}) VALUES ({values}) RETURNING message_id INTO v_id;"
        ),
        IdKind::Integer { has_default: false } => refuse(
            "23502",
            format!(
                "{status_table}.message_id is {id} and has no default, so push_occurrence() cannot make an id"
            ),
            "pass p_message_id, or give the column a default (ALTER TABLE ... ALTER COLUMN message_id \
             ADD GENERATED BY DEFAULT AS IDENTITY)",
        ),
    };
    format!(
        "
         DECLARE
             v_id {id};
         BEGIN
             {key_lock}
             IF p_message_id IS NOT NULL THEN
                 v_id := p_message_id;
                 {insert_with_id}
             ELSE
                 {without_id}
             END IF;
             INSERT INTO {data} (message_id, message_body) VALUES (v_id, p_message_body);
             PERFORM pg_notify(p_channel, v_id::text);
             RETURN v_id;
         END
         "
    )
}

/// A dollar-quote tag (`$fn$`, else `$fn1$`, `$fn2$`, ...) that does not
/// occur in `body`, so no name inside the body (a schema may be called
/// `a$fn$b`) can end the quoted text early.
fn dollar_quote_tag(body: &str) -> String {
    std::iter::once("$fn$".to_owned())
        .chain((1..).map(|n| format!("$fn{n}$")))
        .find(|tag| !body.contains(tag.as_str()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(id_type: &str, id_kind: IdKind) -> Outbox {
        Outbox {
            schema: "s".into(),
            id_type: id_type.into(),
            id_kind,
            body_type: crate::db::outbox::BodyType::Bytea,
            body_type_sql: "bytea".into(),
            body_type_base: "bytea".into(),
            body_type_name: "bytea".into(),
        }
    }

    #[test]
    fn the_helper_makes_an_id_only_where_it_fits_and_never_casts_one_shorter() {
        let uuid = producer_function_body(&outbox("uuid", IdKind::Uuid));
        assert!(uuid.contains(&format!("v_id := {UUIDV7_SQL};")), "{uuid}");
        let text = producer_function_body(&outbox(
            "character varying(64)",
            IdKind::Text {
                max_chars: Some(64),
            },
        ));
        assert!(
            text.contains(&format!("v_id := ({UUIDV7_SQL})::text;")),
            "{text}"
        );
        assert!(!text.contains("::character varying"), "{text}");
        let short = producer_function_body(&outbox(
            "character varying(8)",
            IdKind::Text { max_chars: Some(8) },
        ));
        assert!(!short.contains("gen_random_uuid"), "{short}");
        assert!(short.contains("ERRCODE = '22001'"), "{short}");
        let serial =
            producer_function_body(&outbox("bigint", IdKind::Integer { has_default: true }));
        assert!(
            serial.contains("RETURNING message_id INTO v_id"),
            "{serial}"
        );
        let bare =
            producer_function_body(&outbox("bigint", IdKind::Integer { has_default: false }));
        assert!(
            bare.contains("s.message_queue_log.message_id is bigint and has no default"),
            "{bare}"
        );
    }

    #[test]
    fn index_statements_follow_the_spec() {
        assert_eq!(
            create_index_sql("S", &INDEXES[0], true),
            "CREATE INDEX CONCURRENTLY \"message_queue_log_pending_enqueued_idx\" ON \"S\".\"message_queue_log\" \
             (relay_enqueued_at NULLS FIRST, message_id) WHERE transferred IS NOT TRUE AND relay_parked_at IS NULL"
        );
        assert_eq!(
            create_index_sql("S", &INDEXES[1], false),
            "CREATE INDEX \"message_queue_log_data_message_id_idx\" ON \"S\".\"message_queue_log_data\" (message_id)"
        );
        assert!(
            comment_index_sql("S", &INDEXES[1]).contains(&format!("IS '{INDEX_COMMENT_MARK} "))
        );
    }

    #[test]
    fn the_dollar_quote_tag_never_occurs_in_the_body() {
        assert_eq!(dollar_quote_tag("INSERT INTO \"s\".t"), "$fn$");
        assert_eq!(dollar_quote_tag("INSERT INTO \"a$fn$b\".t"), "$fn1$");
        assert_eq!(dollar_quote_tag("\"$fn$\".t, \"$fn1$\".t"), "$fn2$");
        let body = producer_function_body(&Outbox {
            schema: "x$fn$y".into(),
            id_type: "uuid".into(),
            id_kind: IdKind::Uuid,
            body_type: crate::db::outbox::BodyType::Bytea,
            body_type_sql: "bytea".into(),
            body_type_base: "bytea".into(),
            body_type_name: "bytea".into(),
        });
        let tag = dollar_quote_tag(&body);
        assert!(!body.contains(&tag), "{tag}");
    }
}
