//! `migrate`: creates the seed's schema and tables when absent and adds
//! what the relay needs, all of it additive and idempotent.
//!
//! * The seed's two tables, exactly as the seed defines them (a `uuid` id and
//!   a `bytea` body), only if the status table does not exist yet.
//! * A partial index on pending rows, an index on the body table's
//!   `message_id` and a partial index on the transfer time of transferred
//!   rows (for retention). On a fresh table they are built in the creating
//!   transaction; on an existing one `CONCURRENTLY`, so producers keep
//!   writing, and an index left invalid by an interrupted build is rebuilt.
//! * The relay's bookkeeping columns and the optional message columns
//!   (routing and AMQP properties), all nullable or defaulted.
//! * The producer helper `push_occurrence(body, id, channel, routing fields...)`,
//!   typed after the real columns.
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
use tracing::info;

use super::outbox::{
    CLAIM_ORDER, DATA_INDEX, DATA_TABLE, ENQUEUED_AT_DEFAULT, LOG_TABLE, MESSAGE_COLUMNS, Outbox,
    PENDING_INDEX, PENDING_PREDICATE, PRODUCER_FUNCTION, RELAY_COLUMNS, SUPERSEDED_INDEXES,
    SchemaError, TRANSFERRED_INDEX, TRANSFERRED_PREDICATE,
};
use super::{quote_ident, quote_literal};

/// What one migration run did, for the operator.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The tables were created by this run.
    pub created_tables: bool,
    /// The relay's columns were added by this run.
    pub added_columns: bool,
    /// Indexes created (or rebuilt) by this run.
    pub created_indexes: Vec<&'static str>,
    /// Indexes of earlier releases dropped by this run.
    pub dropped_indexes: Vec<&'static str>,
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
            .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&lock_key])
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
        .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock_key])
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
    let data = format!("{s}.{}", quote_ident(DATA_TABLE));
    let pending_index = format!(
        "{} ON {log} ({}) WHERE {PENDING_PREDICATE}",
        quote_ident(PENDING_INDEX),
        CLAIM_ORDER.join(", ")
    );
    // Changing a default never rewrites the table; the lock is brief.
    let enqueued_at_default = format!(
        "ALTER TABLE {log} ALTER COLUMN relay_enqueued_at SET DEFAULT {ENQUEUED_AT_DEFAULT}"
    );
    let columns: Vec<(&str, &str)> = RELAY_COLUMNS
        .into_iter()
        .chain(MESSAGE_COLUMNS.map(|(name, ty, _)| (name, ty)))
        .collect();
    let add_columns = format!(
        "ALTER TABLE {log} {}",
        columns
            .iter()
            .map(|(name, ty)| format!("ADD COLUMN IF NOT EXISTS {name} {ty}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let data_index = format!("{} ON {data} (message_id)", quote_ident(DATA_INDEX));
    let transferred_index = format!(
        "{} ON {log} (transfer_time) WHERE {TRANSFERRED_PREDICATE}",
        quote_ident(TRANSFERRED_INDEX)
    );
    let mut report = Report::default();

    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&log])
        .await
        .map_err(step("look for the outbox tables"))?
        .get(0);
    if exists {
        let data_exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&data])
            .await
            .map_err(step("look for the body table"))?
            .get(0);
        if !data_exists {
            return Err(SchemaError::Missing(format!(
                "{schema}.{LOG_TABLE} exists but {schema}.{DATA_TABLE} does not; create it with the same message_id type"
            ))
            .into());
        }
        // ALTER TABLE takes an exclusive lock, even with IF NOT EXISTS: only
        // when a column is really missing. A column with a constant default
        // is added without rewriting the table.
        let present: i64 = client
            .query_one(
                "SELECT count(*) FROM information_schema.columns
                  WHERE table_schema = $1 AND table_name = $2 AND column_name = ANY($3)",
                &[
                    &schema,
                    &LOG_TABLE,
                    &columns.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
                ],
            )
            .await
            .map_err(step("look for the relay's columns"))?
            .get(0);
        if usize::try_from(present) != Ok(columns.len()) {
            client
                .batch_execute(&add_columns)
                .await
                .map_err(step("add the relay's columns to the status table"))?;
            report.added_columns = true;
        }
        let default: Option<String> = client
            .query_one(
                "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a
                   LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                  WHERE a.attrelid = $1::text::regclass AND a.attname = 'relay_enqueued_at'",
                &[&log],
            )
            .await
            .map_err(step("read the default of relay_enqueued_at"))?
            .get(0);
        if default.as_deref() != Some(ENQUEUED_AT_DEFAULT) {
            client
                .batch_execute(&enqueued_at_default)
                .await
                .map_err(step("set the default of relay_enqueued_at"))?;
        }
        // Existing tables may be large and busy: build without blocking writers.
        for (name, definition) in [
            (PENDING_INDEX, &pending_index),
            (DATA_INDEX, &data_index),
            (TRANSFERRED_INDEX, &transferred_index),
        ] {
            let invalid: bool = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                      JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relname = $2 AND NOT i.indisvalid)",
                    &[&schema, &name],
                )
                .await
                .map_err(step("check the outbox indexes"))?
                .get(0);
            if invalid {
                drop_index(client, schema, name)
                    .await
                    .map_err(step("drop an index left invalid by an interrupted build"))?;
            }
            if !index_exists(client, schema, name).await? {
                client
                    .batch_execute(&format!(
                        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {definition}"
                    ))
                    .await
                    .map_err(step("create an outbox index"))?;
                report.created_indexes.push(name);
            }
        }
        // Only once the index that replaces them is valid: until then the
        // old one keeps claims off a scan of the history.
        for name in SUPERSEDED_INDEXES {
            if index_exists(client, schema, name).await? {
                drop_index(client, schema, name)
                    .await
                    .map_err(step("drop an index of an earlier release"))?;
                report.dropped_indexes.push(name);
            }
        }
    } else {
        client
            .batch_execute(&format!(
                "BEGIN;
                 CREATE SCHEMA IF NOT EXISTS {s};
                 CREATE TABLE IF NOT EXISTS {log} (
                     message_id UUID PRIMARY KEY,
                     transferred BOOLEAN DEFAULT FALSE,
                     transfer_time TIMESTAMP);
                                  CREATE TABLE IF NOT EXISTS {data} (
                     message_id UUID REFERENCES {log}(message_id),
                     message_body BYTEA);
                 {add_columns};
                 {enqueued_at_default};
                 CREATE INDEX IF NOT EXISTS {pending_index};
                 CREATE INDEX IF NOT EXISTS {data_index};
                 CREATE INDEX IF NOT EXISTS {transferred_index};
                 COMMIT;"
            ))
            .await
            .map_err(step("create the outbox schema and tables"))?;
        report.created_tables = true;
        report.added_columns = true;
        report.created_indexes = vec![PENDING_INDEX, DATA_INDEX, TRANSFERRED_INDEX];
    }

    let outbox = Outbox::inspect(client, schema).await?;
    client
        .batch_execute(&producer_function_sql(&outbox, default_channel))
        .await
        .map_err(step("install the producer function"))?;
    info!(
        schema,
                created_tables = report.created_tables,
        added_columns = report.added_columns,
        created_indexes = ?report.created_indexes,
        dropped_indexes = ?report.dropped_indexes,
        "outbox schema is up to date"
    );
    Ok((report, outbox))
}

/// Whether index `name` exists in `schema`.
async fn index_exists(client: &Client, schema: &str, name: &str) -> Result<bool, MigrateError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'i')",
            &[&schema, &name],
        )
        .await
        .map_err(step("check the outbox indexes"))?
        .get(0))
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
/// priority)`, every argument after the body optional: inserts both rows,
/// records the channel on the row (routes follow it), sends the NOTIFY in
/// the caller's transaction, and returns the id (a new UUID when none is
/// given). The seed-era three-argument version is dropped in the same
/// transaction, so calls never see two candidates or none.
fn producer_function_sql(outbox: &Outbox, default_channel: &str) -> String {
    let id = &outbox.id_type;
    let body = &outbox.body_type_sql;
    let s = quote_ident(&outbox.schema);
    let f = quote_ident(PRODUCER_FUNCTION);
    let channel = quote_literal(default_channel);
    let function_body =
        producer_function_body(id, &outbox.table(LOG_TABLE), &outbox.table(DATA_TABLE));
    let tag = dollar_quote_tag(&function_body);
    format!(
        "BEGIN;
         SET LOCAL client_min_messages = warning; -- no notice when there is nothing to drop
         DROP FUNCTION IF EXISTS {s}.{f}({body}, {id}, text);
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
             p_priority smallint DEFAULT NULL)
         RETURNS {id} LANGUAGE plpgsql AS {tag}{function_body}{tag};
         COMMENT ON FUNCTION {s}.{f}({body}, {id}, text, text, text, jsonb, text, text, text, text, bigint, smallint) IS
             'Writes one outbox event (status row + body row) and notifies the relay; call it inside the business transaction. Arguments after the body are optional; name them, e.g. p_routing_key => ''order.created''.';
         COMMIT;"
    )
}

/// The producer helper's PL/pgSQL body, which names the tables (so the
/// schema, a name chosen by the operator).
fn producer_function_body(id: &str, log: &str, data: &str) -> String {
    format!(
        "
         DECLARE
             v_id {id} := coalesce(p_message_id, gen_random_uuid()::text::{id});
         BEGIN
             INSERT INTO {log} (message_id, notify_channel, routing_key, exchange, headers,
                                content_type, correlation_id, reply_to, message_type,
                                expiration_ms, priority)
             VALUES (v_id, p_channel, p_routing_key, p_exchange, p_headers,
                     p_content_type, p_correlation_id, p_reply_to, p_message_type,
                     p_expiration_ms, p_priority);
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

    #[test]
    fn the_dollar_quote_tag_never_occurs_in_the_body() {
        assert_eq!(dollar_quote_tag("INSERT INTO \"s\".t"), "$fn$");
        assert_eq!(dollar_quote_tag("INSERT INTO \"a$fn$b\".t"), "$fn1$");
        assert_eq!(dollar_quote_tag("\"$fn$\".t, \"$fn1$\".t"), "$fn2$");
        let body = producer_function_body("uuid", "\"x$fn$y\".\"log\"", "\"x$fn$y\".\"data\"");
        let tag = dollar_quote_tag(&body);
        assert!(!body.contains(&tag), "{tag}");
    }
}
