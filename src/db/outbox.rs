//! The outbox tables as the relay sees them: their column types, read from
//! the catalog, and every statement that claims or marks rows.
//!
//! The seed lets `message_id` be `uuid` or text and `message_body` be
//! `bytea`, `jsonb` or text, so the statements are built once per start from
//! the real column types. Text-like bodies become bytes with
//! `convert_to(..::text, 'UTF8')`, never `::bytea`, which would decode
//! backslash escapes.
//!
//! The types can change under a running relay (`ALTER TABLE … ALTER
//! message_body TYPE …`). PostgreSQL re-analyses a prepared statement after
//! such a change, so an expression built for the old type would silently
//! read the new one (a bytea body through `::text` is its hex text). Every
//! statement that reads bodies therefore also returns a column typed as
//! `message_body` itself ([`BODY_PROBE`]): a retyped column changes the
//! statement's result type, which PostgreSQL refuses to execute
//! (`cached plan must not change result type`, SQLSTATE 0A000), and
//! [`Outbox::prepare`] checks that column against the inspected type, so a
//! body is never decoded by a stale type. The worker then reads the types
//! again and prepares again.
//!
//! Every column the relay reads or writes is checked
//! against the types it supports ([`check_types`]), so an unusable table
//! is refused at start-up with the column named, not by a failing claim.
//! The relay's indexes are described here by definition ([`IndexSpec`]),
//! and [`index_state`] compares an existing index with one.

use std::time::Duration;

use bytes::BytesMut;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, accepts, to_sql_checked};
use tokio_postgres::{Client, GenericClient, Row, Statement, Transaction};
use tracing::debug;

use super::quote_ident;
use crate::routing::{HEADERS_FETCH_LIMIT, MessageFields};

/// The status table of the seed.
pub const LOG_TABLE: &str = "message_queue_log";
/// The body table of the seed.
pub const DATA_TABLE: &str = "message_queue_log_data";
/// Partial index that makes a claim an index lookup instead of a scan of
/// the whole transferred history, in the order claims take rows
/// ([`CLAIM_ORDER`]).
pub const PENDING_INDEX: &str = "message_queue_log_pending_enqueued_idx";
/// Pending indexes of earlier releases, which `migrate` drops once
/// [`PENDING_INDEX`] is built, but only where the definition is exactly
/// what a release made (those releases left no comment on them): the first
/// one's on `message_id` where `transferred IS NOT TRUE`, the next one's
/// with [`PENDING_PREDICATE`]. An index of the same name and any other
/// definition is the user's and stays.
pub const SUPERSEDED_INDEXES: [IndexSpec; 2] = [
    IndexSpec {
        name: "message_queue_log_pending_idx",
        table: LOG_TABLE,
        keys: &["message_id"],
        predicate: Some("transferred IS NOT TRUE"),
    },
    IndexSpec {
        name: "message_queue_log_pending_idx",
        table: LOG_TABLE,
        keys: &["message_id"],
        predicate: Some(PENDING_PREDICATE),
    },
];
/// The relay's indexes, as `migrate` makes them.
pub const INDEXES: [IndexSpec; 5] = [
    IndexSpec {
        name: PENDING_INDEX,
        table: LOG_TABLE,
        keys: &CLAIM_ORDER,
        predicate: Some(PENDING_PREDICATE),
    },
    IndexSpec {
        name: DATA_INDEX,
        table: DATA_TABLE,
        keys: &["message_id"],
        predicate: None,
    },
    IndexSpec {
        name: TRANSFERRED_INDEX,
        table: LOG_TABLE,
        keys: &["transfer_time"],
        predicate: Some(TRANSFERRED_PREDICATE),
    },
    IndexSpec {
        name: PARKED_INDEX,
        table: LOG_TABLE,
        keys: &["relay_parked_at"],
        predicate: Some(PARKED_PREDICATE),
    },
    IndexSpec {
        name: ORDERING_INDEX,
        table: LOG_TABLE,
        keys: &["ordering_key", "relay_enqueued_at", "message_id"],
        predicate: Some(KEYED_PREDICATE),
    },
];
/// How the comment `migrate` puts on each index it makes starts: the mark
/// that tells the relay's indexes from the user's (it drops only its own).
pub const INDEX_COMMENT_MARK: &str = "pushoccurrence:";
/// The order claims take pending rows in, and the key of [`PENDING_INDEX`]:
/// oldest first. Rows are appended to the heap as they are written, so
/// consecutive rows in this order share heap pages, and a batch reads and
/// marks a few pages instead of one page per row (as `message_id` order
/// did: uuids are random). A NULL `relay_enqueued_at` (only a producer that
/// writes the column itself can leave one) sorts first, so such rows are
/// taken at the start of every pass instead of never.
pub const CLAIM_ORDER: [&str; 2] = ["relay_enqueued_at NULLS FIRST", "message_id"];
/// The default `migrate` gives `relay_enqueued_at` once the column exists:
/// the time of the insert itself, not of its transaction's start, so rows
/// written by one transaction keep their insert order in [`CLAIM_ORDER`].
/// (The column is added with `DEFAULT now()`, which, unlike a volatile
/// default, does not rewrite the table.)
pub const ENQUEUED_AT_DEFAULT: &str = "clock_timestamp()";
/// Index on the body table's `message_id`: the seed declares none, and
/// every claim joins on it.
pub const DATA_INDEX: &str = "message_queue_log_data_message_id_idx";
/// Partial index on the transfer time of transferred rows, in the order
/// retention deletes them: a retention run reads the expired rows and
/// stops at the first row that is not, instead of scanning the history.
pub const TRANSFERRED_INDEX: &str = "message_queue_log_transfer_time_idx";
/// Partial index on parked rows (few, outside the pending index): `status`
/// and the `parked` listing count and read them without a scan of the
/// history. No cost to the relay's marks: a transferred row is not in it.
pub const PARKED_INDEX: &str = "message_queue_log_parked_idx";
/// Partial index on the keyed rows not yet transferred (parked ones
/// included: they hold their key), in each key's order: a claim asks it
/// whether a keyed row is its key's head (no earlier row of the key is left),
/// and finds the rows that follow a head.
pub const ORDERING_INDEX: &str = "message_queue_log_ordering_key_idx";
/// Keyed rows not yet transferred: the predicate of [`ORDERING_INDEX`].
pub const KEYED_PREDICATE: &str = "ordering_key IS NOT NULL AND transferred IS NOT TRUE";
/// The column a producer sets to have the rows of one key delivered in
/// their insert order; NULL (the default) leaves a row unordered. With its
/// SQL type and the type names accepted in an existing table.
pub const ORDERING_COLUMN: (&str, &str, &[&str]) = ("ordering_key", "text", TEXT);
/// How many rows past the cursor a claim looks at, at first, for every row
/// it may take: the rows of a key behind its head are not claimable, so a
/// claim looks further than its batch, but never through a whole backlog of
/// one key at once (the heads it finds there are few, and each costs an
/// index probe). After claims that took nothing the window grows (the
/// worker's claim cursor).
pub const CLAIM_WINDOW_FACTOR: i64 = 2;
/// The most keys a worker's next claim continues from its last batch:
/// keys whose rows it published in a run, so a key with a deep backlog
/// goes on at once instead of when a pass of the backlog comes back to it.
pub const MAX_CONTINUED_KEYS: usize = 16;
/// Parked rows: given up on, not transferred. The predicate of
/// [`PARKED_INDEX`] and of the statements that read them.
pub const PARKED_PREDICATE: &str = "relay_parked_at IS NOT NULL AND transferred IS NOT TRUE";
/// The predicate of [`TRANSFERRED_INDEX`] and of every statement that
/// reads the transferred history through it.
pub const TRANSFERRED_PREDICATE: &str = "transferred IS TRUE";
/// The producer helper function `migrate` installs.
pub const PRODUCER_FUNCTION: &str = "push_occurrence";
/// The relay's own columns on the status table: additive, nullable or
/// defaulted, so producers never need to know them.
pub const RELAY_COLUMNS: [(&str, &str); 5] = [
    // When the row was written (rows older than the column get the time it
    // was added): the age of the backlog.
    ("relay_enqueued_at", "timestamptz DEFAULT now()"),
    ("relay_attempts", "integer NOT NULL DEFAULT 0"),
    ("relay_next_attempt_at", "timestamptz"),
    ("relay_last_error", "text"),
    ("relay_parked_at", "timestamptz"),
];
/// The type (`pg_type.typname`) each of [`RELAY_COLUMNS`] must have.
const RELAY_COLUMN_TYPES: [(&str, &str); 5] = [
    ("relay_enqueued_at", "timestamptz"),
    ("relay_attempts", "int4"),
    ("relay_next_attempt_at", "timestamptz"),
    ("relay_last_error", "text"),
    ("relay_parked_at", "timestamptz"),
];
/// Optional per-message columns on the status table, all nullable: where a
/// message goes and the AMQP properties it carries. NULL means "as the
/// config says" (see `routing`), so seed producers never need them.
/// Each is `(name, SQL type, type names accepted in an existing table)`.
pub const MESSAGE_COLUMNS: [(&str, &str, &[&str]); 10] = [
    ("exchange", "text", TEXT),
    ("routing_key", "text", TEXT),
    ("headers", "jsonb", &["jsonb", "json"]),
    ("content_type", "text", TEXT),
    ("correlation_id", "text", TEXT),
    ("reply_to", "text", TEXT),
    ("message_type", "text", TEXT),
    ("expiration_ms", "bigint", INTEGER),
    ("priority", "smallint", INTEGER),
    ("notify_channel", "text", TEXT),
];
const TEXT: &[&str] = &["text", "varchar", "bpchar"];
const INTEGER: &[&str] = &["int2", "int4", "int8"];
/// The most doublings of `relay.attempt_delay_ms` a retry delay is computed
/// with; any realistic cap (`relay.max_retry_delay_sec`) is reached long
/// before, and `2^62` times any delay stays far inside float8.
pub const MAX_DOUBLINGS: i32 = 62;
/// `transfer_time` as the instant it names. The column is a `timestamp`
/// without time zone that the relay writes as `now()` in its session's
/// `TimeZone` (as the seed did), so it is local time in that zone, and the
/// cast reads it back in the same zone. Comparing it as local time (with
/// `localtimestamp`) is off by an hour across a daylight-saving change. In
/// the hour the clocks repeat PostgreSQL reads a local time as the later
/// of its two instants, so a row may look younger than it is, never older.
pub const TRANSFER_INSTANT: &str = "transfer_time::timestamptz";
/// A btree index by its definition: what `migrate` compares an existing
/// index of the same name with, never trusting the name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexSpec {
    /// The index's name, in the outbox's schema.
    pub name: &'static str,
    /// The table it is on, in the same schema.
    pub table: &'static str,
    /// The key columns in order, as `pg_get_indexdef` writes them
    /// (`relay_enqueued_at NULLS FIRST`).
    pub keys: &'static [&'static str],
    /// The partial index's predicate, if any.
    pub predicate: Option<&'static str>,
}

/// What holds an index's name in the outbox's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexState {
    /// Nothing: the name is free.
    Absent,
    /// A relation that is not an index (a table, a view, a sequence...).
    NotAnIndex {
        /// What it is, in words.
        kind: &'static str,
    },
    /// An index.
    Index {
        /// It has exactly the definition asked about.
        matches: bool,
        /// Usable by queries (not left invalid by an interrupted build).
        valid: bool,
        /// It carries the relay's comment ([`INDEX_COMMENT_MARK`]).
        ours: bool,
        /// `pg_get_indexdef`, for messages.
        definition: String,
    },
}

impl IndexState {
    /// Whether it is a valid index with the definition asked about.
    pub fn ready(&self) -> bool {
        matches!(
            self,
            Self::Index {
                matches: true,
                valid: true,
                ..
            }
        )
    }
}

/// Reads what holds `spec.name` in `schema` and compares it with `spec` by
/// definition (`pg_index`): the table, btree, not unique, no expressions
/// or included columns, the key columns in order with their ordering, and
/// the predicate (compared without parentheses, which `pg_get_expr` adds).
///
/// # Errors
/// The catalog could not be read.
pub async fn index_state(
    client: &Client,
    schema: &str,
    spec: &IndexSpec,
) -> Result<IndexState, tokio_postgres::Error> {
    let row = client
        .query_typed_opt(
            "SELECT c.relkind::text,
                    i.indisvalid AND i.indisready,
                    coalesce(obj_description(c.oid, 'pg_class'), ''),
                    t.relname::text = $3::text
                        AND am.amname = 'btree' AND NOT i.indisunique AND i.indexprs IS NULL
                        AND i.indnatts = i.indnkeyatts,
                    (SELECT array_agg(coalesce(a.attname::text, '?')
                              || CASE WHEN k.o & 1 = 1 THEN ' DESC' ELSE '' END
                              || CASE WHEN (k.o & 2 = 2) <> (k.o & 1 = 1)
                                      THEN CASE WHEN k.o & 2 = 2 THEN ' NULLS FIRST' ELSE ' NULLS LAST' END
                                      ELSE '' END
                              ORDER BY k.ord)
                       FROM unnest(i.indkey::int2[], i.indoption::int2[]) WITH ORDINALITY k(attnum, o, ord)
                       LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum),
                    pg_get_expr(i.indpred, i.indrelid),
                    CASE WHEN i.indexrelid IS NOT NULL THEN pg_get_indexdef(c.oid) END
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_index i ON i.indexrelid = c.oid
               LEFT JOIN pg_class t ON t.oid = i.indrelid -- always in the index's schema
               LEFT JOIN pg_am am ON am.oid = c.relam
              WHERE n.nspname::text = $1::text AND c.relname::text = $2::text",
            &[
                (&schema, Type::TEXT),
                (&spec.name, Type::TEXT),
                (&spec.table, Type::TEXT),
            ],
        )
        .await?;
    let Some(row) = row else {
        return Ok(IndexState::Absent);
    };
    let relkind: String = row.get(0);
    if relkind != "i" {
        return Ok(IndexState::NotAnIndex {
            kind: match relkind.as_str() {
                "r" => "table",
                "p" => "partitioned table",
                "I" => "partitioned index",
                "S" => "sequence",
                "v" => "view",
                "m" => "materialized view",
                "f" => "foreign table",
                "c" => "composite type",
                _ => "relation",
            },
        });
    }
    let shape: Option<bool> = row.get(3);
    let keys: Option<Vec<String>> = row.get(4);
    let predicate: Option<String> = row.get(5);
    let matches = shape == Some(true)
        && keys.is_some_and(|keys| {
            keys.iter()
                .map(String::as_str)
                .eq(spec.keys.iter().copied())
        })
        && predicate.as_deref().map(normalize_predicate) == spec.predicate.map(normalize_predicate);
    let comment: String = row.get(2);
    Ok(IndexState::Index {
        matches,
        valid: row.get::<_, Option<bool>>(1) == Some(true),
        ours: comment.starts_with(INDEX_COMMENT_MARK),
        definition: row.get::<_, Option<String>>(6).unwrap_or_default(),
    })
}

/// A predicate without parentheses, in lower case, single-spaced: the form
/// in which `pg_get_expr`'s output and the relay's text compare. (The
/// relay's predicates are conjunctions of simple tests, so grouping
/// cannot differ.)
fn normalize_predicate(predicate: &str) -> String {
    predicate
        .replace(['(', ')'], " ")
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The predicate of rows the relay may claim (and of the partial index).
/// `transferred` is nullable in the seed, so pending is `IS NOT TRUE`.
pub const PENDING_PREDICATE: &str = "transferred IS NOT TRUE AND relay_parked_at IS NULL";

/// What `check` and `run` say about an outbox whose `message_id` has no
/// unique constraint (followed by the fix, [`Outbox::unique_ids_sql`]).
/// Retention is safe with repeated ids (it deletes rows by row identity
/// and keeps a body while any row has its id); the rest of the relay is
/// not.
pub const REPEATABLE_IDS_WARNING: &str = "message_id has no unique constraint, so ids can repeat: \
     a mark or a failed attempt then applies to every row with that id, and an id with bodies \
     from several events is parked as ambiguous; make it unique once no id repeats";

/// How a body column turns into message bytes, and the content type it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    /// Raw bytes, published as they are.
    Bytea,
    /// `text`, `varchar` or `char`: UTF-8 text.
    Text,
    /// `json`: the stored text.
    Json,
    /// `jsonb`: PostgreSQL's canonical text of the document.
    Jsonb,
}

impl BodyType {
    fn from_type_name(name: &str) -> Option<Self> {
        match name {
            "bytea" => Some(Self::Bytea),
            "text" | "varchar" | "bpchar" => Some(Self::Text),
            "json" => Some(Self::Json),
            "jsonb" => Some(Self::Jsonb),
            _ => None,
        }
    }

    /// The AMQP `content_type` of messages with this body type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Bytea => "application/octet-stream",
            Self::Text => "text/plain; charset=utf-8",
            Self::Json | Self::Jsonb => "application/json",
        }
    }

    /// The expression that yields the body of data row `d` as `bytea`.
    fn bytes_expr(self) -> &'static str {
        match self {
            Self::Bytea => "d.message_body",
            Self::Text | Self::Json | Self::Jsonb => "convert_to(d.message_body::text, 'UTF8')",
        }
    }
}

/// The outbox of one schema, with the types found in the catalog.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// The schema, unquoted.
    pub schema: String,
    /// `message_id`'s type as SQL spells it (`uuid`, `text`, `character varying(64)`).
    pub id_type: String,
    /// How ids of that type are made.
    pub id_kind: IdKind,
    /// `message_body`'s type.
    pub body_type: BodyType,
    /// `message_body`'s type as SQL spells it.
    pub body_type_sql: String,
    /// `message_body`'s type name in `pg_type` (`bytea`, `varchar`), as
    /// the driver names a result column's type.
    pub body_type_name: String,
    /// `message_body`'s type without its length (`character varying`):
    /// what `send` casts to, since a cast to `varchar(n)` cuts the text.
    pub body_type_base: String,
}

/// What an operator does with parked rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Back into the stream, attempts counted anew (after a fix).
    Requeue,
    /// Given up for good: marked transferred without being sent, so the
    /// rows behind it in its ordering key go on.
    Discard,
}

/// How `message_id` values are compared and made, from its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// `uuid`: the helper makes one with `gen_random_uuid()`.
    Uuid,
    /// `text`, `varchar(n)` or `char(n)` (`max_chars` is n): the helper
    /// makes a uuid's text, where it fits ([`GENERATED_ID_CHARS`]).
    Text {
        /// The declared length, if any.
        max_chars: Option<i32>,
    },
    /// `smallint`, `integer` or `bigint`: the helper takes the column's
    /// default (a sequence or identity), and needs an id without one.
    Integer {
        /// The status table's `message_id` has a default or is an identity.
        has_default: bool,
    },
}

/// The length of the ids the producer helper makes for text columns: a
/// uuid's text.
pub const GENERATED_ID_CHARS: i32 = 36;

/// The id types the relay supports, in words, for messages.
const SUPPORTED_ID_TYPES: &str = "uuid, text, varchar, char, smallint, integer and bigint";

impl IdKind {
    fn of(column: &Column) -> Option<Self> {
        match column.type_name.as_str() {
            "uuid" => Some(Self::Uuid),
            "text" | "varchar" | "bpchar" => Some(Self::Text {
                max_chars: column.max_chars,
            }),
            "int2" | "int4" | "int8" => Some(Self::Integer {
                has_default: column.has_default,
            }),
            _ => None,
        }
    }
}

/// One column of the outbox tables, as the catalog describes it.
#[derive(Debug, Clone)]
pub struct Column {
    /// Its table's name.
    pub table: String,
    /// The column's name.
    pub name: String,
    /// Its type as SQL spells it (`character varying(64)`).
    pub sql_type: String,
    /// `pg_type.typname` (`varchar`).
    pub type_name: String,
    /// Its type without length or precision (`character varying`).
    pub base_type: String,
    /// The declared length of a `varchar(n)` or `char(n)`.
    pub max_chars: Option<i32>,
    /// It has a default, or is an identity column.
    pub has_default: bool,
}

/// The columns of whichever outbox tables exist in `schema`.
///
/// # Errors
/// The catalog could not be read.
pub async fn read_columns(
    client: &(impl GenericClient + Sync),
    schema: &str,
) -> Result<Vec<Column>, SchemaError> {
    let rows = client
        .query_typed(
            "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod), t.typname::text,
                    format_type(a.atttypid, NULL),
                    CASE WHEN t.typname IN ('varchar', 'bpchar') AND a.atttypmod >= 4 THEN a.atttypmod - 4 END,
                    a.atthasdef OR a.attidentity <> ''
               FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_type t ON t.oid = a.atttypid
              WHERE n.nspname = $1 AND c.relname IN ($2, $3) AND c.relkind IN ('r', 'p')
                AND a.attnum > 0 AND NOT a.attisdropped",
            &[
                (&schema, Type::TEXT),
                (&LOG_TABLE, Type::TEXT),
                (&DATA_TABLE, Type::TEXT),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Column {
            table: r.get(0),
            name: r.get(1),
            sql_type: r.get(2),
            type_name: r.get(3),
            base_type: r.get(4),
            max_chars: r.get(5),
            has_default: r.get(6),
        })
        .collect())
}

/// Column `name` of `table`, if it exists.
pub fn find<'a>(columns: &'a [Column], table: &str, name: &str) -> Option<&'a Column> {
    columns.iter().find(|c| c.table == table && c.name == name)
}

/// Checks the types of those columns the relay reads or writes that exist
/// (so `migrate` can refuse tables before it adds to them): each names
/// the column, its type and what is supported.
///
/// # Errors
/// [`SchemaError::Unsupported`] for the first column of a type the relay
/// cannot use.
pub fn check_types(schema: &str, columns: &[Column]) -> Result<(), SchemaError> {
    let refuse = |column: &Column, why: &str| {
        Err(SchemaError::Unsupported(format!(
            "{schema}.{}.{} is {}; {why}",
            column.table, column.name, column.sql_type
        )))
    };
    if let Some(c) = find(columns, LOG_TABLE, "transferred")
        && c.type_name != "bool"
    {
        return refuse(
            c,
            "the relay sets it to true once a message is confirmed, so it must be boolean (the seed's type): \
             alter the column",
        );
    }
    if let Some(c) = find(columns, LOG_TABLE, "transfer_time")
        && !matches!(c.type_name.as_str(), "timestamp" | "timestamptz")
    {
        return refuse(
            c,
            "the relay writes the database clock into it, so it must be timestamp (the seed's type) \
             or timestamp with time zone: alter the column",
        );
    }
    for table in [LOG_TABLE, DATA_TABLE] {
        if let Some(c) = find(columns, table, "message_id")
            && IdKind::of(c).is_none()
        {
            return refuse(
                c,
                &format!("supported id types are {SUPPORTED_ID_TYPES}, the same in both tables"),
            );
        }
    }
    if let (Some(log), Some(data)) = (
        find(columns, LOG_TABLE, "message_id"),
        find(columns, DATA_TABLE, "message_id"),
    ) && log.sql_type != data.sql_type
    {
        return Err(SchemaError::Unsupported(format!(
            "{schema}.{LOG_TABLE}.message_id is {} but {schema}.{DATA_TABLE}.message_id is {}; \
             the seed requires the same type in both tables",
            log.sql_type, data.sql_type
        )));
    }
    if let Some(c) = find(columns, DATA_TABLE, "message_body")
        && BodyType::from_type_name(&c.type_name).is_none()
    {
        return refuse(
            c,
            "supported types are bytea, jsonb, json and text (varchar, char)",
        );
    }
    // The relay's own columns, as migrate adds them: a column of the same
    // name and another type (the user's) would fail every claim or mark.
    for (name, accepted) in RELAY_COLUMN_TYPES {
        if let Some(c) = find(columns, LOG_TABLE, name)
            && c.type_name != accepted
        {
            let sql_type = RELAY_COLUMNS
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("", |(_, ty)| ty);
            return Err(SchemaError::Unsupported(format!(
                "{schema}.{LOG_TABLE}.{name} is {}, but the relay keeps its bookkeeping in it as {sql_type}; \
                 rename that column, then run `pushoccurrence migrate`",
                c.sql_type
            )));
        }
    }
    for (name, sql_type, accepted) in MESSAGE_COLUMNS.into_iter().chain([ORDERING_COLUMN]) {
        if let Some(c) = find(columns, LOG_TABLE, name)
            && !accepted.contains(&c.type_name.as_str())
        {
            return Err(SchemaError::Unsupported(format!(
                "{schema}.{LOG_TABLE}.{name} is {}, but the relay reads it as {sql_type}; \
                 alter or rename that column, then run `pushoccurrence migrate`",
                c.sql_type
            )));
        }
    }
    Ok(())
}

/// Why the outbox cannot be used as it is.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A table or column is missing.
    #[error(
        "{0}; run `pushoccurrence migrate` (or enable postgres.auto_migrate) to create the outbox"
    )]
    Missing(String),
    /// Columns exist with types the relay cannot use.
    #[error("{0}")]
    Unsupported(String),
    /// The catalog could not be read.
    #[error("cannot read the outbox's columns: {}", super::describe(.0))]
    Query(#[from] tokio_postgres::Error),
    /// The columns changed between reading their types and preparing the
    /// statements (an `ALTER TABLE` in between); both are done again.
    #[error("{0}")]
    Changed(String),
}

impl Outbox {
    /// Reads the outbox's column types from the catalog and checks them.
    ///
    /// # Errors
    /// [`SchemaError`] saying what is missing or wrong and how to fix it.
    pub async fn inspect(
        client: &(impl GenericClient + Sync),
        schema: &str,
    ) -> Result<Self, SchemaError> {
        let columns = read_columns(client, schema).await?;
        for table in [LOG_TABLE, DATA_TABLE] {
            if !columns.iter().any(|c| c.table == table) {
                return Err(SchemaError::Missing(format!(
                    "table {schema}.{table} does not exist"
                )));
            }
        }
        let column = |table: &str, name: &str| -> Result<&Column, SchemaError> {
            find(&columns, table, name).ok_or_else(|| {
                SchemaError::Missing(format!("column {schema}.{table}.{name} does not exist"))
            })
        };
        for name in ["message_id", "transferred", "transfer_time"]
            .into_iter()
            .chain(RELAY_COLUMNS.map(|(name, _)| name))
            .chain(MESSAGE_COLUMNS.map(|(name, _, _)| name))
            .chain([ORDERING_COLUMN.0])
        {
            column(LOG_TABLE, name)?;
        }
        column(DATA_TABLE, "message_id")?;
        column(DATA_TABLE, "message_body")?;
        check_types(schema, &columns)?;
        let id = column(LOG_TABLE, "message_id")?;
        let body = column(DATA_TABLE, "message_body")?;
        Ok(Self {
            schema: schema.to_owned(),
            id_type: id.sql_type.clone(),
            // Both checked by check_types.
            id_kind: IdKind::of(id).unwrap_or(IdKind::Text { max_chars: None }),
            body_type: BodyType::from_type_name(&body.type_name).unwrap_or(BodyType::Bytea),
            body_type_sql: body.sql_type.clone(),
            body_type_base: body.base_type.clone(),
            body_type_name: body.type_name.clone(),
        })
    }

    /// What the producer helper cannot do with this id type, in words with
    /// the fix: make an id for a `varchar(n)` shorter than a uuid's text,
    /// or for an integer id without a default. `None` when it can.
    pub fn helper_limit(&self) -> Option<String> {
        let problem = match self.id_kind {
            IdKind::Text { max_chars: Some(n) } if n < GENERATED_ID_CHARS => {
                "too short for the ids it makes"
            }
            IdKind::Integer { has_default: false } => "without a default",
            _ => return None,
        };
        Some(format!(
            "push_occurrence() and `send` need an id from the caller: message_id is {} {problem}",
            self.id_type
        ))
    }

    /// The privileges the relay uses that the session's role lacks, in
    /// words (empty when it has them all): SELECT on both tables, UPDATE of
    /// the columns it writes, and DELETE on both when `retention` is on.
    ///
    /// # Errors
    /// The catalog could not be read.
    pub async fn missing_privileges(
        &self,
        client: &Client,
        retention: bool,
    ) -> Result<Vec<String>, tokio_postgres::Error> {
        let log = self.table(LOG_TABLE);
        let data = self.table(DATA_TABLE);
        let mut needed: Vec<(String, Option<&str>, &str)> = vec![
            (log.clone(), None, "SELECT"),
            (data.clone(), None, "SELECT"),
        ];
        for column in ["transferred", "transfer_time"].into_iter().chain(
            RELAY_COLUMNS
                .iter()
                .map(|(name, _)| *name)
                .filter(|n| *n != "relay_enqueued_at"),
        ) {
            needed.push((log.clone(), Some(column), "UPDATE"));
        }
        if retention {
            needed.push((log.clone(), None, "DELETE"));
            needed.push((data, None, "DELETE"));
        }
        let mut missing = Vec::new();
        for (table, column, privilege) in needed {
            let granted: bool = match column {
                None => {
                    client
                        .query_typed_one(
                            "SELECT has_table_privilege($1, $2)",
                            &[(&table, Type::TEXT), (&privilege, Type::TEXT)],
                        )
                        .await?
                }
                Some(column) => {
                    client
                        .query_typed_one(
                            "SELECT has_column_privilege($1, $2, $3)",
                            &[
                                (&table, Type::TEXT),
                                (&column, Type::TEXT),
                                (&privilege, Type::TEXT),
                            ],
                        )
                        .await?
                }
            }
            .get(0);
            if !granted {
                missing.push(match column {
                    None => format!("{privilege} on {table}"),
                    Some(column) => format!("{privilege} ({column}) on {table}"),
                });
            }
        }
        Ok(missing)
    }

    /// Whether [`PENDING_INDEX`] exists, is valid and has the definition
    /// claims need. Without it (an outbox
    /// `migrate` has not brought up to this release) claims still work, but
    /// sort every pending row to find the oldest.
    ///
    /// # Errors
    /// The catalog could not be read.
    pub async fn pending_index_ready(
        &self,
        client: &Client,
    ) -> Result<bool, tokio_postgres::Error> {
        // By definition, not by name: an index of the user's under that
        // name, on other columns, would leave every claim scanning.
        Ok(index_state(client, &self.schema, &INDEXES[0])
            .await?
            .ready())
    }

    /// Whether `message_id` of the status table is unique: a valid unique
    /// index (a primary key, a unique constraint) on that column alone and
    /// without a predicate. Without one a producer may repeat an id, and
    /// marks, failed attempts and bodies go by id (see
    /// [`REPEATABLE_IDS_WARNING`]).
    ///
    /// # Errors
    /// The catalog could not be read.
    pub async fn ids_unique(&self, client: &Client) -> Result<bool, tokio_postgres::Error> {
        Ok(client
            .query_typed_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attname = 'message_id'
                  WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indisvalid
                    AND i.indpred IS NULL AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum)",
                &[(&self.table(LOG_TABLE), Type::TEXT)],
            )
            .await?
            .get(0))
    }

    /// How many ids more than one status row has. It reads the whole
    /// table: for `check`, and only when [`Outbox::ids_unique`] is false.
    ///
    /// # Errors
    /// The server's error.
    pub async fn repeated_ids(&self, client: &Client) -> Result<i64, tokio_postgres::Error> {
        Ok(client
            .query_typed_one(
                &format!(
                    "SELECT count(*) FROM (SELECT message_id FROM {} GROUP BY message_id HAVING count(*) > 1) r",
                    self.table(LOG_TABLE)
                ),
                &[],
            )
            .await?
            .get(0))
    }

    /// The statement that makes `message_id` unique without blocking
    /// producers (it fails while an id repeats).
    pub fn unique_ids_sql(&self) -> String {
        format!(
            "CREATE UNIQUE INDEX CONCURRENTLY ON {} (message_id)",
            self.table(LOG_TABLE)
        )
    }

    /// `schema.table`, quoted.
    pub fn table(&self, table: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(table))
    }

    /// Locks up to `$1` claimable rows (skipping rows other sessions hold,
    /// parked rows and rows waiting out a retry delay) and returns one row
    /// per data row, in [`CLAIM_ORDER`], decoded by [`Claim::decode`]:
    /// `(keyed bool, the window's last row: enqueued at, id text; id text,
    /// relay_enqueued_at, has_data bool, size int4, ordering_key text,
    /// in_run bool, body bytea, ` then the message columns as
    /// [`Outbox::bodies_sql`] returns them`, the id in its own type, the
    /// body probe)`. A row without a data row comes back once with
    /// `has_data = false`; a claim that takes nothing returns one row of
    /// NULLs after the first three. `keyed`: the claim took keyed rows, or
    /// its window held some where the claim read it (its first `$1` rows;
    /// all of it for a short claim); after a claim that met none, the
    /// relay claims with [`Outbox::unkeyed_claim_sql`]. (An `EXISTS` probe
    /// of [`ORDERING_INDEX`] would answer for the whole outbox, but it
    /// steps over the index entries of every keyed row sent since the last
    /// VACUUM: 4 to 22 ms a claim after 100 000 of them.)
    ///
    /// The body comes along only while it fits: at most `$2` bytes, and
    /// within `$3` bytes counted from the first row (whose body always
    /// comes). So one statement claims and reads a whole batch, while an
    /// oversized body, or one past the batch's budget, never leaves the
    /// database. The budget here counts every body; the planner's `plan`
    /// counts only those it publishes, so a planned body this withheld is
    /// fetched apart (the planner's `take_bodies`, then
    /// [`Statements::bodies`]).
    ///
    /// Which rows, in three steps:
    /// * **The window.** At most the next `$5` (a few times `$1`)
    ///   pending rows that are due in [`CLAIM_ORDER`], through the partial
    ///   index, read only until the claim has its rows (rows waiting out a
    ///   retry delay are passed over in the scan, so a backlog of them never
    ///   fills a window and keeps a new row from its claim); with
    ///   `after_cursor` only rows after the position (`$6` enqueued at, `$7`
    ///   id), so claims walk the backlog round-robin and no row waits longer
    ///   than one pass, however large the backlog, nor behind rows that
    ///   commit late. The heads of the keys in `$4` (the keys the relay's
    ///   workers' last claims took in a run) come first, and the window passes over
    ///   the other rows of those keys without probing them. A claim short of
    ///   `$1` rows also returns the window's last row, if the backlog reaches
    ///   that far: the next claim starts past it.
    /// * **Heads.** Of those, up to `$1` rows that are due and unkeyed, or
    ///   the head of their key: no earlier row of the key (in
    ///   `(relay_enqueued_at NULLS FIRST, message_id)`) is left untransferred,
    ///   parked or in another relay's batch alike, in the statement's
    ///   snapshot. Locked `SKIP LOCKED`.
    /// * **Runs.** The batch's room left is shared among its keyed heads:
    ///   each takes the rows of its key that follow it, in order, as long as
    ///   they are due and not parked, and up to the first one this
    ///   statement cannot lock (`in_run`). A run is published after its head
    ///   on the same channel.
    pub fn claim_sql(&self, after_cursor: bool) -> String {
        let cursor = self.after_cursor_sql(after_cursor, 6);
        let columns = claim_columns;
        let log = self.table(LOG_TABLE);
        // An earlier row of l's key, NULL times first: the row comparison
        // is an index condition, and rows without a time are few. The
        // probe for an earlier timed row walks the index backwards from l
        // (a scalar subquery: PostgreSQL drops the ORDER BY and LIMIT of
        // an EXISTS, whose scan goes forwards from the key's first entry).
        // Forwards, it stepped over every row of the key transferred since
        // the last vacuum, whose entries stay in the partial index, once
        // per window row: a hot key's claim grew with the drain, to 250 ms
        // after 4 000 rows. Backwards, the row just before l answers.
        let is_head = format!(
            "(l.ordering_key IS NULL
              OR (SELECT true FROM {log} e
                   WHERE e.ordering_key = l.ordering_key AND e.transferred IS NOT TRUE
                     AND (e.relay_enqueued_at, e.message_id) < (l.relay_enqueued_at, l.message_id)
                   ORDER BY e.relay_enqueued_at DESC, e.message_id DESC LIMIT 1) IS NULL
                 AND NOT EXISTS (SELECT 1 FROM {log} e
                              WHERE e.ordering_key = l.ordering_key AND e.transferred IS NOT TRUE
                                AND e.relay_enqueued_at IS NULL
                                AND (l.relay_enqueued_at IS NOT NULL OR e.message_id < l.message_id)))"
        );
        format!(
            "WITH continued AS MATERIALIZED (
                 SELECT l.ctid AS row_id, {l_columns}
                   FROM unnest($4::text[]) k(key)
                  CROSS JOIN LATERAL (
                        SELECT e.ctid AS row_id FROM {log} e
                         WHERE e.ordering_key = k.key AND e.transferred IS NOT TRUE
                         ORDER BY e.relay_enqueued_at, e.message_id LIMIT 1) h
                   JOIN {log} l ON l.ctid = h.row_id
                  WHERE {l_claimable} AND {is_head}
                    FOR UPDATE OF l SKIP LOCKED),
                  looked_at AS MATERIALIZED (
                 SELECT {l_columns}
                   FROM (SELECT l.ctid AS row_id, l.message_id, l.relay_enqueued_at FROM {log} l
                          WHERE {l_pending} {cursor} AND {l_due}
                          ORDER BY {l_order}
                          LIMIT $5::int8) w
                   JOIN {log} l ON l.ctid = w.row_id
                  WHERE {l_claimable}
                    -- A continued key's head is taken above; its other rows
                    -- follow that head, so they are no heads (no probe needed).
                    AND (l.ordering_key IS NULL OR l.ordering_key <> ALL ($4::text[]))
                    AND {is_head}
                  ORDER BY {w_order}
                  LIMIT greatest($1 - (SELECT count(*) FROM continued), 0)
                    FOR UPDATE OF l SKIP LOCKED),
                  heads AS (
                 SELECT {names} FROM continued UNION ALL SELECT * FROM looked_at),
                  room AS (
                 SELECT $1 - count(*) AS rows, greatest(count(ordering_key), 1) AS keys FROM heads),
                  followers AS (
                 SELECT f.message_id, h.message_id AS head_id, f.ready,
                        row_number() OVER (PARTITION BY h.message_id ORDER BY f.relay_enqueued_at, f.message_id) AS place
                   FROM heads h CROSS JOIN room r
                  CROSS JOIN LATERAL (
                        SELECT e.message_id, e.relay_enqueued_at,
                               e.relay_parked_at IS NULL AND {e_due} AS ready
                          FROM {log} e
                         WHERE e.ordering_key = h.ordering_key AND e.transferred IS NOT TRUE
                           AND (e.relay_enqueued_at, e.message_id) > (h.relay_enqueued_at, h.message_id)
                         ORDER BY e.relay_enqueued_at, e.message_id
                         LIMIT r.rows / r.keys) f
                  WHERE h.ordering_key IS NOT NULL AND r.rows > 0),
                  ready AS (
                 -- Each head's followers up to the first that is parked or not due.
                 SELECT * FROM (
                        SELECT f.*, min(f.place) FILTER (WHERE NOT f.ready) OVER (PARTITION BY f.head_id) AS stop
                          FROM followers f) f
                  WHERE f.stop IS NULL OR f.place < f.stop),
                  locked AS MATERIALIZED (
                 SELECT {l_columns}, r.head_id, r.place
                   FROM ready r JOIN {log} l ON l.message_id = r.message_id
                  WHERE {l_claimable}
                    FOR UPDATE OF l SKIP LOCKED),
                  run AS (
                 -- Up to the first follower another session holds: the places
                 -- locked are 1, 2, 3... until one is missing.
                 SELECT {names} FROM (
                        SELECT k.*, row_number() OVER (PARTITION BY k.head_id ORDER BY k.place) AS nth
                          FROM locked k) k
                  WHERE k.nth = k.place),
                  claimed AS MATERIALIZED (
                 SELECT *, false AS in_run FROM heads UNION ALL SELECT *, true FROM run),
                  {sized},
                  window_rows AS MATERIALIZED (
                 -- The window again, for keyed rows a claim that took none
                 -- passed over (only then: the OR below stops at a claimed
                 -- keyed row), such as rows another batch holds: as far as
                 -- a full claim surely read it (its first $1 rows), all of
                 -- it for a short claim, whose last row it also gives.
                 SELECT l.relay_enqueued_at, l.message_id, l.ordering_key IS NOT NULL AS keyed
                   FROM {log} l
                  WHERE {l_pending} {cursor} AND {l_due}
                  ORDER BY {l_order}
                  LIMIT CASE WHEN (SELECT count(*) FROM claimed) < $1 THEN $5::int8 ELSE $1::int8 END),
                  edge AS (
                 SELECT w.relay_enqueued_at, w.message_id FROM window_rows w
                  WHERE (SELECT count(*) FROM claimed) < $1
                  ORDER BY {w_order}
                 OFFSET $5::int8 - 1 LIMIT 1)
             SELECT (SELECT count(ordering_key) > 0 FROM claimed)
                    OR EXISTS (SELECT 1 FROM window_rows WHERE keyed),
                    e.relay_enqueued_at, e.message_id::text, f.*
               FROM (SELECT) k
               LEFT JOIN edge e ON true
               LEFT JOIN ({claimed_rows}) f ON true
              ORDER BY f.claim_at NULLS FIRST, f.claim_id",
            names = columns(""),
            l_order = claim_order_sql("l"),
            w_order = claim_order_sql("w"),
            l_columns = columns("l."),
            l_claimable = claimable_sql("l"),
            e_due = due_sql("e."),
            l_due = due_sql("l."),
            l_pending = pending_sql("l"),
            sized = self.sized_sql(),
            claimed_rows = claimed_rows_sql(),
        )
    }

    /// The claim of an outbox without keyed rows (the last keyed claim met
    /// none):
    /// up to `$1` due rows in [`CLAIM_ORDER`], after the position (`$4`
    /// enqueued at, `$5` id) with `after_cursor`, locked `SKIP LOCKED`;
    /// the unkeyed ones come back with their bodies as
    /// [`Outbox::claim_sql`] brings them and in its columns (no window: its
    /// last row is NULL). None of the keyed machinery runs: it cost an
    /// outbox without keys about 0.5 ms of PostgreSQL's time per claim of
    /// 128 rows. Keyed rows written since are locked with the rest but
    /// never returned, so never published out of their key's order, and
    /// they stay pending; the first column (`keyed`) says the claim met
    /// some, which sends the next claim to [`Outbox::claim_sql`].
    pub fn unkeyed_claim_sql(&self, after_cursor: bool) -> String {
        let cursor = self.after_cursor_sql(after_cursor, 4);
        format!(
            "WITH locked AS MATERIALIZED (
                 SELECT {columns}, false AS in_run FROM {log} l
                  WHERE {claimable} {cursor}
                  ORDER BY {order}
                  LIMIT $1
                    FOR UPDATE SKIP LOCKED),
                  claimed AS (
                 SELECT * FROM locked WHERE {ordering} IS NULL),
                  {sized}
             SELECT k.keyed, NULL::timestamptz, NULL::text, f.*
               FROM (SELECT count({ordering}) > 0 AS keyed FROM locked) k
               LEFT JOIN ({claimed_rows}) f ON true
              ORDER BY f.claim_at NULLS FIRST, f.claim_id",
            columns = claim_columns("l."),
            log = self.table(LOG_TABLE),
            claimable = claimable_sql("l"),
            ordering = ORDERING_COLUMN.0,
            order = claim_order_sql("l"),
            sized = self.sized_sql(),
            claimed_rows = claimed_rows_sql(),
        )
    }

    /// With `after_cursor`, the condition that keeps a claim's rows (`l`)
    /// after the position in parameters `$first` (enqueued at) and the next
    /// (id); nothing without.
    fn after_cursor_sql(&self, after_cursor: bool, first: usize) -> String {
        if !after_cursor {
            return String::new();
        }
        format!(
            "AND (l.relay_enqueued_at, l.message_id) > (${first}::timestamptz, ${}::text::{})",
            first + 1,
            self.id_type
        )
    }

    /// The claim's `sized` step: each claimed row (from `claimed`) with its
    /// data rows' bodies and their size.
    fn sized_sql(&self) -> String {
        format!(
            "sized AS (
                 -- OFFSET 0 keeps the body expression evaluated once per row.
                 SELECT c.*, d.message_id IS NOT NULL AS has_data, {body} AS bytes,
                        {BODY_PROBE} AS body_probe
                   FROM claimed c LEFT JOIN {data} d ON d.message_id = c.message_id
                 OFFSET 0)",
            data = self.table(DATA_TABLE),
            body = self.body_type.bytes_expr(),
        )
    }

    /// The bodies of the ids (as text) in `$1`, one row per data row, with
    /// the status row's message columns ([`Fetched::from_row`] reads them):
    /// for the rare planned id whose body the claim withheld.
    pub fn bodies_sql(&self) -> String {
        format!(
            "SELECT d.message_id::text, {body},
                    {fields},
                    {BODY_PROBE}
               FROM {data} d JOIN {log} l ON l.message_id = d.message_id
              WHERE d.message_id = ANY($1::text[]::{id}[])",
            data = self.table(DATA_TABLE),
            log = self.table(LOG_TABLE),
            body = self.body_type.bytes_expr(),
            id = self.id_type,
            fields = fields_sql("l"),
        )
    }

    /// Marks the rows whose ids (as text) are in `$1` transferred, with the
    /// database clock, and returns the ids it marked: a `BEFORE UPDATE`
    /// trigger returning NULL, a rule or a row-level security policy can
    /// skip a row without an error, and a row left pending that way would be
    /// published again and again.
    pub fn mark_sql(&self) -> String {
        format!(
            "UPDATE {log} SET transferred = true, transfer_time = now()
              WHERE message_id = ANY($1::text[]::{id}[])
          RETURNING message_id::text",
            log = self.table(LOG_TABLE),
            id = self.id_type,
        )
    }

    /// Records one failed attempt for each id in `$1` with the reason in
    /// `$2`: the next attempt waits `$3` ms doubled per earlier failure, up
    /// to `$4` ms; the attempt that reaches `$5` parks the row. Returns
    /// `(id, parked, attempts)` per row. The delay counts from the
    /// statement's clock, not the transaction's start: a batch that had to
    /// isolate a refused message may have been open longer than the delay.
    ///
    /// The doubling is computed with the exponent clamped to
    /// [`MAX_DOUBLINGS`]: `power(2, n)` is float8 and overflows (an error,
    /// which would roll back the whole batch, forever) past about 1023
    /// attempts, which a large `relay.max_attempts` allows.
    pub fn fail_sql(&self) -> String {
        format!(
            "UPDATE {log} l
                SET relay_attempts = l.relay_attempts + 1,
                    relay_last_error = f.reason,
                    relay_next_attempt_at = clock_timestamp()
                        + least($3::float8 * power(2::float8, least(greatest(l.relay_attempts, 0), {MAX_DOUBLINGS})), $4::float8)
                          * interval '1 millisecond',
                    relay_parked_at = CASE WHEN l.relay_attempts + 1 >= $5::int4 THEN now() END
               FROM unnest($1::text[], $2::text[]) AS f(id, reason)
              WHERE l.message_id = f.id::{id}
          RETURNING l.message_id::text, l.relay_parked_at IS NOT NULL, l.relay_attempts",
            log = self.table(LOG_TABLE),
            id = self.id_type,
        )
    }

    /// The backlog: `(pending rows int8, age of the oldest in seconds float8,
    /// claimable rows int8)`, parked rows excluded, through the partial
    /// indexes. Claimable rows are those a claim may take now: unkeyed rows
    /// whose next attempt is due (the claim's own condition), and one per
    /// ordering key whose first untransferred row is due and not parked
    /// (rows behind it wait for it, and a run may take them with it; read in
    /// [`ORDERING_INDEX`]'s order, which puts a key's rows without a time
    /// last, not first as claims do).
    pub fn backlog_sql(&self) -> String {
        format!(
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(relay_enqueued_at)), 0)::float8,
                    count(*) FILTER (WHERE ordering_key IS NULL AND {due})
                    + (SELECT count(*) FROM (
                         SELECT DISTINCT ON (ordering_key) relay_parked_at, relay_next_attempt_at
                           FROM {log} WHERE {KEYED_PREDICATE}
                          ORDER BY ordering_key, relay_enqueued_at, message_id) h
                        WHERE h.relay_parked_at IS NULL AND {h_due})
               FROM {log} WHERE {PENDING_PREDICATE}",
            log = self.table(LOG_TABLE),
            due = due_sql(""),
            h_due = due_sql("h."),
        )
    }

    /// For `status`: `(parked rows, ordering keys held by a parked row,
    /// transferred in the last minute, in the last hour)`, all int8, read
    /// through [`PARKED_INDEX`] and
    /// [`TRANSFERRED_INDEX`]: the cost follows the parked and the recent
    /// rows, never the history.
    ///
    /// `transfer_time` is compared as the instant it names
    /// ([`TRANSFER_INSTANT`]), not as local time, so the counts stay right
    /// when daylight saving time begins or ends within the hour. The index
    /// range is the last hour as local time with three hours to spare
    /// (daylight saving moves a clock by two hours at most), so the rows
    /// whose instant is within the hour are all in it.
    pub fn history_sql(&self) -> String {
        format!(
            "SELECT (SELECT count(*) FROM {log} WHERE {PARKED_PREDICATE}),
                    (SELECT count(DISTINCT ordering_key) FROM {log} WHERE {PARKED_PREDICATE}),
                    count(*) FILTER (WHERE {TRANSFER_INSTANT} > now() - interval '1 minute'),
                    count(*) FILTER (WHERE {TRANSFER_INSTANT} > now() - interval '1 hour')
               FROM {log}
              WHERE {TRANSFERRED_PREDICATE}
                AND transfer_time > (now() - interval '4 hours')::timestamp",
            log = self.table(LOG_TABLE),
        )
    }

    /// For `send`: one event through the producer helper, with the body
    /// given as text in `$1` (converted to the body column's type), the
    /// channel in `$2`, and an optional exchange and routing key in `$3` and
    /// `$4`; returns the new id as text.
    pub fn send_sql(&self) -> String {
        let body = match self.body_type {
            BodyType::Bytea => "convert_to($1::text, 'UTF8')".to_owned(),
            // Never to the length-limited type: a cast cuts the text
            // silently, where storing it into the column refuses (22001).
            _ => format!("$1::text::{}", self.body_type_base),
        };
        format!(
            "SELECT {schema}.{f}({body}, p_channel => $2::text, p_exchange => $3::text, p_routing_key => $4::text)::text",
            schema = quote_ident(&self.schema),
            f = quote_ident(PRODUCER_FUNCTION),
        )
    }

    /// Retention, one batch in one statement: deletes up to `$2` rows
    /// transferred more than `$1` seconds ago (float8), oldest first,
    /// skipping rows anyone holds, with the bodies no remaining row shares;
    /// the statement's row count is the number of status rows deleted.
    ///
    /// * Rows are found through [`TRANSFERRED_INDEX`]: the range
    ///   `transfer_time < local time of the cutoff` lets the scan stop at
    ///   the first row that is not expired, and [`TRANSFER_INSTANT`] then
    ///   keeps only rows whose instant is before the cutoff. Across a
    ///   daylight-saving change the two differ: a row stamped in the hour
    ///   the clocks repeat waits up to an hour longer; none goes early.
    /// * Status rows are deleted by their row identity (`tableoid` and
    ///   `ctid`: a `ctid` alone repeats across the partitions of a
    ///   partitioned table; a row this statement locked cannot move under
    ///   it) and re-checked as transferred, never by `message_id`: an
    ///   outbox without a unique constraint may hold a pending row with
    ///   the same id.
    /// * The body table has no transferred flag, so a body goes only when
    ///   no status row other than the deleted ones has its id. All three
    ///   parts read one snapshot; the foreign key of the seed's body table
    ///   is checked at the statement's end, when both deletions are done.
    /// * Ids and row identities go through arrays (`= ANY`) and hashed
    ///   subplans, which keeps every lookup an index or TID lookup and the
    ///   batch linear in its size, whatever the planner estimates.
    pub fn retention_sql(&self) -> String {
        format!(
            "WITH expired AS MATERIALIZED (
                 SELECT tableoid AS table_id, ctid AS row_id, message_id FROM {log}
                  WHERE {TRANSFERRED_PREDICATE}
                    AND transfer_time < (now() - $1::float8 * interval '1 second')::timestamp
                    AND {TRANSFER_INSTANT} < now() - $1::float8 * interval '1 second'
                  ORDER BY transfer_time
                  LIMIT $2
                    FOR UPDATE SKIP LOCKED),
                  bodies AS (
                 DELETE FROM {data} d
                  WHERE d.message_id = ANY (ARRAY(SELECT message_id FROM expired))
                    AND d.message_id <> ALL (ARRAY(
                        SELECT kept.message_id FROM {log} kept
                         WHERE kept.message_id = ANY (ARRAY(SELECT message_id FROM expired))
                           AND (kept.tableoid, kept.ctid) NOT IN (SELECT table_id, row_id FROM expired))))
             DELETE FROM {log} l
              WHERE l.ctid = ANY (ARRAY(SELECT row_id FROM expired))
                AND (l.tableoid, l.ctid) IN (SELECT table_id, row_id FROM expired)
                AND l.{TRANSFERRED_PREDICATE}",
            log = self.table(LOG_TABLE),
            data = self.table(DATA_TABLE),
        )
    }

    /// Lists up to `$1` parked rows: `(id, attempts, parked_at text, reason,
    /// ordering_key, rows of the key behind it int8)`. The rows behind are
    /// counted through [`ORDERING_INDEX`].
    pub fn parked_sql(&self) -> String {
        format!(
            "SELECT l.message_id::text, l.relay_attempts, l.relay_parked_at::text, l.relay_last_error,
                    l.ordering_key::text,
                    CASE WHEN l.ordering_key IS NOT NULL THEN
                      (SELECT count(*) FROM {log} e
                        WHERE e.ordering_key = l.ordering_key AND e.transferred IS NOT TRUE
                          AND ((e.relay_enqueued_at, e.message_id) > (l.relay_enqueued_at, l.message_id)
                               -- A row without a time comes first in its key (NULLS FIRST),
                               -- before every row with one.
                               OR l.relay_enqueued_at IS NULL
                                  AND (e.relay_enqueued_at IS NOT NULL OR e.message_id > l.message_id)))
                    END
               FROM {log} l WHERE l.{parked}
              ORDER BY l.relay_parked_at LIMIT $1",
            log = self.table(LOG_TABLE),
            parked = PARKED_PREDICATE.replace(" AND ", " AND l."),
        )
    }

    /// Settles the parked rows whose ids are in `$1` (every parked row when
    /// `$2` is true) as `settle` says, and returns their ids. The ids must
    /// have gone through [`Outbox::canonical_id`].
    pub fn settle_parked_sql(&self, settle: Settle) -> String {
        let change = match settle {
            // The last error stays as history.
            Settle::Requeue => {
                "relay_parked_at = NULL, relay_attempts = 0, relay_next_attempt_at = NULL"
            }
            // Transferred without being sent; relay_parked_at stays set, which
            // tells a discarded row from a sent one.
            Settle::Discard => {
                "transferred = true, transfer_time = now(),
                 relay_last_error = 'discarded by an operator; ' || coalesce(relay_last_error, '')"
            }
        };
        format!(
            "UPDATE {log} SET {change}
              WHERE {PARKED_PREDICATE}
                AND ($2 OR {matches})
          RETURNING message_id::text",
            log = self.table(LOG_TABLE),
            matches = self.id_in_param(),
        )
    }

    /// The rows whose ids are in `$1`: `(id, transferred, parked)`, to say
    /// why an id was not requeued.
    pub fn id_states_sql(&self) -> String {
        format!(
            "SELECT message_id::text, transferred IS TRUE, relay_parked_at IS NOT NULL
               FROM {log} WHERE {matches}",
            log = self.table(LOG_TABLE),
            matches = self.id_in_param(),
        )
    }

    /// `message_id` is one of the `text[]` in `$1`, compared in the
    /// column's type: a uuid column matches any spelling PostgreSQL reads
    /// as the same uuid. Other types compare as text (a cast to
    /// `varchar(n)` would truncate, and match the wrong row).
    fn id_in_param(&self) -> String {
        if self.id_type == "uuid" {
            "message_id = ANY($1::text[]::uuid[])".to_owned()
        } else {
            "message_id::text = ANY($1::text[])".to_owned()
        }
    }

    /// An id as an operator typed it, in the form [`Outbox::settle_parked_sql`]
    /// compares, or why it cannot be an id of this outbox. For a uuid
    /// column, upper case, braces and missing hyphens are the same uuid
    /// (as PostgreSQL reads them), and the result is the canonical form.
    ///
    /// # Errors
    /// The id cannot be a `message_id` of this column's type.
    pub fn canonical_id(&self, raw: &str) -> Result<String, String> {
        if let IdKind::Integer { .. } = self.id_kind {
            // As int2in/int4in/int8in read it: blanks around, an optional
            // sign, decimal digits, within the type's range.
            let (low, high) = match self.id_type.as_str() {
                "smallint" => (i64::from(i16::MIN), i64::from(i16::MAX)),
                "integer" => (i64::from(i32::MIN), i64::from(i32::MAX)),
                _ => (i64::MIN, i64::MAX),
            };
            return raw
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|n| (low..=high).contains(n))
                .map(|n| n.to_string())
                .ok_or_else(|| {
                    format!(
                        "not a whole number from {low} to {high} (message_id is {})",
                        self.id_type
                    )
                });
        }
        if self.id_type != "uuid" {
            return if raw.is_empty() {
                Err("an empty id".to_owned())
            } else {
                Ok(raw.to_owned())
            };
        }
        let inner = raw
            .trim()
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .unwrap_or(raw.trim());
        // PostgreSQL's uuid_in: 32 hex digits, a hyphen allowed after any
        // group of four (never first, last or doubled).
        let mut hex = String::with_capacity(32);
        let mut hyphens_ok = !inner.ends_with('-');
        let mut after_hyphen = false;
        for c in inner.chars() {
            if c == '-' {
                hyphens_ok &= !hex.is_empty() && hex.len().is_multiple_of(4) && !after_hyphen;
                after_hyphen = true;
            } else {
                hex.push(c);
                after_hyphen = false;
            }
        }
        if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) || !hyphens_ok {
            return Err(
                "not a uuid (message_id is uuid), e.g. 5f0c6e1e-2a4b-4c7d-9e8f-0123456789ab"
                    .to_owned(),
            );
        }
        let hex = hex.to_ascii_lowercase();
        Ok(format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        ))
    }

    /// How many rows are parked.
    pub fn parked_count_sql(&self) -> String {
        format!(
            "SELECT count(*) FROM {log} WHERE {PARKED_PREDICATE}",
            log = self.table(LOG_TABLE),
        )
    }

    /// Prepares the claim and mark statements on a worker's session, and
    /// checks that the statements reading bodies were prepared for the
    /// body type this outbox was inspected with (see the module's docs).
    /// Run inside the transaction `tx` (see [`Outbox::prepare_free_names`]);
    /// the statements outlive it, on the server session that ran it, whose
    /// process id is kept in [`Statements::server`] so every claim
    /// transaction can check that it runs there.
    ///
    /// # Errors
    /// The server's error, e.g. when the tables were dropped;
    /// [`SchemaError::Changed`] when `message_body` changed type since
    /// [`Outbox::inspect`].
    pub async fn prepare(
        &self,
        tx: &(impl GenericClient + Sync),
    ) -> Result<Statements, SchemaError> {
        let sql = self.statements_sql();
        let prepared = self.prepare_free_names(tx, &sql).await?;
        let server = tx.query_typed_one(SERVER_SESSION_SQL, &[]).await?.get(0);
        Ok(Statements::of(prepared.map(Query::Named), Some(server)))
    }

    /// Like [`Outbox::prepare`], for a session behind a transaction pooler,
    /// where a statement prepared by name in one transaction may be missing
    /// (or another client's) in the next: the statements are prepared inside
    /// the transaction `tx` only to learn and check their types, closed again before `tx`
    /// ends (dropping a statement queues its `Close` ahead of the `COMMIT`),
    /// and then run as unnamed statements with those types
    /// ([`Query::Unnamed`]), which live within one round trip.
    ///
    /// # Errors
    /// As [`Outbox::prepare`].
    pub async fn prepare_unnamed(
        &self,
        tx: &(impl GenericClient + Sync),
    ) -> Result<Statements, SchemaError> {
        let sql = self.statements_sql();
        let prepared = self.prepare_free_names(tx, &sql).await?;
        let mut types = prepared.iter().map(|statement| statement.params().to_vec());
        let queries = sql.map(|sql| Query::Unnamed {
            sql,
            types: types.next().expect("one prepared statement per text"),
        });
        Ok(Statements::of(queries, None))
    }

    /// [`Outbox::prepare_checked`] inside the transaction `tx`, on names no
    /// other client took on this server session. A pooled server session
    /// may carry another client's statements under the names this client
    /// gives its own (`s0`, `s1`, …: one counter per process, so every
    /// process starts at `s0`): a transaction pooler's, or a session
    /// pooler's whose `server_reset_query` does not deallocate them. A name
    /// taken (42P05) is skipped by preparing again, under a savepoint since
    /// the failure aborts the transaction. The counter has moved on by
    /// then, so each attempt tries new names.
    async fn prepare_free_names(
        &self,
        tx: &(impl GenericClient + Sync),
        sql: &[String; STATEMENTS],
    ) -> Result<[Statement; STATEMENTS], SchemaError> {
        let mut attempts = 0;
        let prepared = loop {
            tx.batch_execute(PREPARE_SAVEPOINT).await?;
            match self.prepare_checked(tx, sql).await {
                Err(SchemaError::Query(e))
                    if e.code() == Some(&SqlState::DUPLICATE_PSTATEMENT)
                        && attempts < PREPARE_NAME_ATTEMPTS =>
                {
                    attempts += 1;
                    tx.batch_execute(PREPARE_ROLLBACK).await?;
                }
                result => break result?,
            }
        };
        if attempts > 0 {
            debug!(
                skipped = attempts,
                "statement names taken on the pooled server session (another client's) were skipped"
            );
        }
        Ok(prepared)
    }

    /// The texts of a claim session's statements, in the order
    /// [`Statements`] keeps them: claim from the start, claim after a
    /// cursor, the same two for an outbox without keyed rows, bodies, mark,
    /// fail.
    pub fn statements_sql(&self) -> [String; STATEMENTS] {
        [
            self.claim_sql(false),
            self.claim_sql(true),
            self.unkeyed_claim_sql(false),
            self.unkeyed_claim_sql(true),
            self.bodies_sql(),
            self.mark_sql(),
            self.fail_sql(),
        ]
    }

    /// Prepares the statements of `sql` ([`Outbox::statements_sql`]) and
    /// checks the body type of those reading bodies (all but the last two).
    async fn prepare_checked(
        &self,
        client: &(impl GenericClient + Sync),
        sql: &[String; STATEMENTS],
    ) -> Result<[Statement; STATEMENTS], SchemaError> {
        let mut statements = Vec::with_capacity(STATEMENTS);
        for text in sql {
            statements.push(client.prepare(text).await?);
        }
        let statements: [Statement; STATEMENTS] = statements
            .try_into()
            .expect("one prepared statement per text");
        for statement in &statements[..STATEMENTS - 2] {
            let found = statement.columns().last().map(|c| c.type_().name());
            if found != Some(self.body_type_name.as_str()) {
                return Err(SchemaError::Changed(format!(
                    "{}.{DATA_TABLE}.message_body changed type while the relay read it (it was {}, \
                     the statements see {}); its type is read again",
                    self.schema,
                    self.body_type_name,
                    found.unwrap_or("nothing"),
                )));
            }
        }
        Ok(statements)
    }
}

/// How many statements a claim session prepares ([`Outbox::statements_sql`]).
pub const STATEMENTS: usize = 7;

/// Set before the statements of [`Outbox::prepare_free_names`] are
/// prepared, and returned to when a name was taken.
const PREPARE_SAVEPOINT: &str = "SAVEPOINT relay_prepare";
const PREPARE_ROLLBACK: &str = "ROLLBACK TO SAVEPOINT relay_prepare";
/// How many taken statement names [`Outbox::prepare_free_names`] skips
/// before it gives up (the batch then fails, and the next session tries
/// on from there).
const PREPARE_NAME_ATTEMPTS: u32 = 256;

/// The server session a statement runs on: its backend's process id, the
/// same for every transaction of a session unless a transaction pooler
/// hands the transactions to different server sessions.
pub const SERVER_SESSION_SQL: &str = "SELECT pg_backend_pid()";

/// Sets a savepoint inside the claim transaction before statements that
/// update claimed rows: one row the database refuses to update (a
/// constraint, a trigger) must not abort the transaction, which holds the
/// batch's row locks, so the rows are then updated one by one.
pub const SAVEPOINT: &str = "SAVEPOINT relay_rows";
/// Undoes what a statement did since [`SAVEPOINT`] after the server refused it.
pub const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT relay_rows";

/// [`CLAIM_ORDER`] for the table aliased `alias`.
fn claim_order_sql(alias: &str) -> String {
    CLAIM_ORDER.map(|c| format!("{alias}.{c}")).join(", ")
}

/// [`PENDING_PREDICATE`] for the table aliased `alias`.
fn pending_sql(alias: &str) -> String {
    format!(
        "{alias}.{}",
        PENDING_PREDICATE.replace(" AND ", &format!(" AND {alias}."))
    )
}

/// A row of the table aliased `alias` that a claim may take: pending, and
/// due.
fn claimable_sql(alias: &str) -> String {
    format!(
        "{} AND {}",
        pending_sql(alias),
        due_sql(&format!("{alias}."))
    )
}

/// A row whose next attempt is due (its retry delay, if any, is over), for
/// the row named by `prefix` (`""`, or an alias and a dot: `"l."`).
fn due_sql(prefix: &str) -> String {
    format!("({prefix}relay_next_attempt_at IS NULL OR {prefix}relay_next_attempt_at <= now())")
}

/// A column typed as `message_body` and always NULL, returned last by the
/// statements that read bodies: it ties their result type to the column's
/// type (see the module's docs). Costs nothing: it is folded to a constant.
const BODY_PROBE: &str = "CASE WHEN false THEN d.message_body END";

/// The status row's message columns (from table alias `t`) as
/// [`decode_fields`] reads them. Headers whose JSON is over
/// [`HEADERS_FETCH_LIMIT`] bytes stay in the database; only their size
/// comes back.
fn fields_sql(t: &str) -> String {
    format!(
        "{t}.exchange::text, {t}.routing_key::text,
         CASE WHEN octet_length({t}.headers::text) <= {HEADERS_FETCH_LIMIT} THEN {t}.headers::text END,
         octet_length({t}.headers::text),
         {t}.content_type::text, {t}.correlation_id::text, {t}.reply_to::text, {t}.message_type::text,
         {t}.expiration_ms::int8, {t}.priority::int4, {t}.notify_channel::text"
    )
}

/// The status row's columns a claim carries, after `prefix` (`""`, or an
/// alias and a dot).
fn claim_columns(prefix: &str) -> String {
    ["message_id", "relay_enqueued_at", ORDERING_COLUMN.0]
        .into_iter()
        .chain(MESSAGE_COLUMNS.map(|(name, _, _)| name))
        .map(|c| format!("{prefix}{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The claim's rows as [`ClaimedRow::decode`] reads them, from `sized`:
/// each body only while it fits `$2` and, counted from the first row, `$3`.
fn claimed_rows_sql() -> String {
    format!(
        "SELECT s.message_id::text, s.relay_enqueued_at AS claim_at, s.has_data, octet_length(s.bytes),
                s.ordering_key::text, s.in_run,
                CASE WHEN octet_length(s.bytes) <= $2::int8
                      AND (sum(octet_length(s.bytes)) FILTER (WHERE octet_length(s.bytes) <= $2::int8) OVER w <= $3::int8
                           OR row_number() OVER w = 1)
                     THEN s.bytes END,
                {fields},
                s.message_id AS claim_id,
                s.body_probe
           FROM sized s
         WINDOW w AS (ORDER BY {order} ROWS UNBOUNDED PRECEDING)",
        fields = fields_sql("s"),
        order = claim_order_sql("s"),
    )
}

/// One of the relay's statements, as a session runs it.
#[derive(Debug, Clone)]
pub enum Query {
    /// Prepared once per session by name (a direct connection or a
    /// session pooler): parsed and planned once.
    Named(Statement),
    /// Its text and parameter types, sent as an unnamed statement with
    /// every execution (behind a transaction pooler, where no named
    /// statement outlives a transaction): parse, bind and execute in one
    /// round trip, as libpq's `PQexecParams` does.
    Unnamed {
        /// The statement's SQL.
        sql: String,
        /// Its parameters' types, as the server inferred them.
        types: Vec<Type>,
    },
}

impl Query {
    /// Runs the statement in `tx` with `params`.
    async fn run(
        &self,
        tx: &Transaction<'_>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        match self {
            Self::Named(statement) => tx.query(statement, params).await,
            Self::Unnamed { sql, types } => {
                let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
                    .iter()
                    .zip(types)
                    .map(|(value, ty)| (*value, ty.clone()))
                    .collect();
                tx.query_typed(sql, &typed).await
            }
        }
    }
}

/// The statements of one claim session, run with typed arguments: each
/// binds its own parameters.
#[derive(Debug, Clone)]
pub struct Statements {
    /// See [`Outbox::claim_sql`], from the lowest id.
    claim_first: Query,
    /// See [`Outbox::claim_sql`], after a cursor.
    claim_after: Query,
    /// See [`Outbox::unkeyed_claim_sql`], from the lowest id.
    unkeyed_first: Query,
    /// See [`Outbox::unkeyed_claim_sql`], after a cursor.
    unkeyed_after: Query,
    /// See [`Outbox::bodies_sql`].
    bodies: Query,
    /// See [`Outbox::mark_sql`].
    mark: Query,
    /// See [`Outbox::fail_sql`].
    fail: Query,
    /// The server session (backend process id) named statements were
    /// prepared on; `None` for unnamed ones. A transaction pooler the
    /// config does not name may run a claim transaction on another server
    /// session, where the same names can be another client's statements
    /// (another outbox's relay prepares its own as `s0`, `s1`, …): running
    /// those would claim and mark that client's rows. So every claim
    /// transaction checks it runs here before it publishes anything.
    server: Option<i32>,
}

impl Statements {
    /// The statements of [`Outbox::statements_sql`], in its order, and the
    /// server session named ones were prepared on.
    fn of(queries: [Query; STATEMENTS], server: Option<i32>) -> Self {
        let [
            claim_first,
            claim_after,
            unkeyed_first,
            unkeyed_after,
            bodies,
            mark,
            fail,
        ] = queries;
        Self {
            claim_first,
            claim_after,
            unkeyed_first,
            unkeyed_after,
            bodies,
            mark,
            fail,
            server,
        }
    }

    /// The server session named statements were prepared on, which every
    /// claim transaction must run on; `None` for unnamed statements.
    pub fn prepared_on(&self) -> Option<i32> {
        self.server
    }

    /// Locks up to `limits.rows` claimable rows, in [`CLAIM_ORDER`] from the
    /// start or `after` a position, with the bodies that fit `limits`: with
    /// `keyed`, in each key's order (see [`Outbox::claim_sql`]); without,
    /// unkeyed rows only ([`Outbox::unkeyed_claim_sql`], which ignores
    /// `window` and `continued_keys`).
    ///
    /// # Errors
    /// The server's or the connection's error, or a row that does not
    /// decode (the claim query changed).
    pub async fn claim(
        &self,
        tx: &Transaction<'_>,
        limits: &ClaimLimits,
        keyed: bool,
        window: i64,
        after: Option<&ClaimPosition>,
        continued_keys: &[String],
    ) -> Result<Claim, tokio_postgres::Error> {
        let rows = i64::try_from(limits.rows).unwrap_or(i64::MAX);
        let max_message = i64::try_from(limits.max_message_bytes).unwrap_or(i64::MAX);
        let max_batch = i64::try_from(limits.max_batch_bytes).unwrap_or(i64::MAX);
        let returned = match after {
            None if !keyed => {
                let params: [&(dyn ToSql + Sync); 3] = [&rows, &max_message, &max_batch];
                self.unkeyed_first.run(tx, &params).await?
            }
            Some(after) if !keyed => {
                let params: [&(dyn ToSql + Sync); 5] = [
                    &rows,
                    &max_message,
                    &max_batch,
                    &after.enqueued_at,
                    &after.id,
                ];
                self.unkeyed_after.run(tx, &params).await?
            }
            None => {
                let params: [&(dyn ToSql + Sync); 5] =
                    [&rows, &max_message, &max_batch, &continued_keys, &window];
                self.claim_first.run(tx, &params).await?
            }
            Some(after) => {
                let params: [&(dyn ToSql + Sync); 7] = [
                    &rows,
                    &max_message,
                    &max_batch,
                    &continued_keys,
                    &window,
                    &after.enqueued_at,
                    &after.id,
                ];
                self.claim_after.run(tx, &params).await?
            }
        };
        Claim::decode(&returned)
    }

    pub async fn bodies(
        &self,
        tx: &Transaction<'_>,
        ids: &[String],
    ) -> Result<Vec<Fetched>, tokio_postgres::Error> {
        self.bodies
            .run(tx, &[&ids])
            .await?
            .iter()
            .map(Fetched::from_row)
            .collect()
    }

    /// Marks the rows of `ids` transferred and returns the ids it marked
    /// (see [`Outbox::mark_sql`]).
    ///
    /// # Errors
    /// The server's or the connection's error.
    pub async fn mark(
        &self,
        tx: &Transaction<'_>,
        ids: &[&str],
    ) -> Result<Vec<String>, tokio_postgres::Error> {
        self.mark
            .run(tx, &[&ids])
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect()
    }

    /// Records one failed attempt per `(id, reason)` under `rule` and
    /// returns what it recorded, one entry per status row it updated (see
    /// [`Outbox::fail_sql`]).
    ///
    /// # Errors
    /// The server's or the connection's error.
    pub async fn record_failures(
        &self,
        tx: &Transaction<'_>,
        failures: &[(&str, &str)],
        rule: &AttemptRule,
    ) -> Result<Vec<RecordedFailure>, tokio_postgres::Error> {
        let ids: Vec<&str> = failures.iter().map(|(id, _)| *id).collect();
        let reasons: Vec<&str> = failures.iter().map(|(_, reason)| *reason).collect();
        let delay_ms = rule.delay.as_secs_f64() * 1000.0;
        let cap_ms = rule.max_delay.as_secs_f64() * 1000.0;
        let max_attempts = i32::try_from(rule.max_attempts).unwrap_or(i32::MAX);
        self.fail
            .run(tx, &[&ids, &reasons, &delay_ms, &cap_ms, &max_attempts])
            .await?
            .iter()
            .map(|row| {
                Ok(RecordedFailure {
                    id: row.try_get(0)?,
                    parked: row.try_get(1)?,
                    attempts: row.try_get(2)?,
                })
            })
            .collect()
    }
}

/// How much one claim takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimLimits {
    /// At most this many status rows (`relay.batch_size`).
    pub rows: usize,
    /// A body over this many bytes stays in the database
    /// (`relay.max_message_bytes`).
    pub max_message_bytes: u64,
    /// Bodies come along while their sum stays within this many bytes, the
    /// first one always (`relay.max_batch_bytes`).
    pub max_batch_bytes: u64,
}

/// The rule a row's failed attempts follow: the next attempt waits `delay`,
/// doubled per earlier failure up to `max_delay`; the attempt that reaches
/// `max_attempts` parks the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptRule {
    /// The wait after the first failure (`relay.attempt_delay_ms`).
    pub delay: Duration,
    /// The longest wait (`relay.max_retry_delay_sec`).
    pub max_delay: Duration,
    /// The attempt that parks the row (`relay.max_attempts`).
    pub max_attempts: u32,
}

/// One failed attempt as [`Statements::record_failures`] wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedFailure {
    /// `message_id` as text.
    pub id: String,
    /// The attempt parked the row.
    pub parked: bool,
    /// The row's attempts, this one included.
    pub attempts: i32,
}

/// What one claim returned: one entry per data row, in claim order.
#[derive(Debug, Default)]
pub struct Claim {
    /// The claimed rows, one per data row, in claim order.
    pub rows: Vec<ClaimedRow>,
    /// The body each row brought along, where it did.
    pub bodies: Vec<Option<Fetched>>,
    /// The window's last row, for a short claim whose window was full.
    pub window_end: Option<ClaimPosition>,
    /// The claim met keyed rows: it took some, its window held some where
    /// it read it ([`Outbox::claim_sql`]), or it locked and passed over
    /// some ([`Outbox::unkeyed_claim_sql`]).
    pub keyed: bool,
}

/// One row of the claim query: a claimed id and one of its data rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedRow {
    /// `message_id` as text.
    pub id: String,
    /// `relay_enqueued_at`, to resume claiming after this row.
    pub enqueued_at: Option<EnqueuedAt>,
    /// Whether a data row exists for this id.
    pub has_data: bool,
    /// The body's size in bytes; `None` for a NULL body or no data row.
    pub size: Option<i32>,
    /// The row's `ordering_key`; `None` for an unordered row.
    pub ordering_key: Option<String>,
    /// The row follows its key's head in the same claim (not a head itself).
    pub in_run: bool,
}

impl Claim {
    /// A short claim's window was full: the backlog goes on past it. (A
    /// short claim whose window was not full reached the backlog's end; a
    /// full claim does not look.)
    pub fn window_full(&self) -> bool {
        self.window_end.is_some()
    }

    /// Decodes the claim query's rows ([`Outbox::claim_sql`]).
    ///
    /// # Errors
    /// A type mismatch, which would mean the claim query changed.
    pub fn decode(returned: &[Row]) -> Result<Self, tokio_postgres::Error> {
        let mut claim = Self::default();
        if let Some(first) = returned.first() {
            claim.keyed = first.try_get(0)?;
            let end: Option<EnqueuedAt> = first.try_get(1)?;
            let end_id: Option<String> = first.try_get(2)?;
            claim.window_end = end
                .zip(end_id)
                .map(|(enqueued_at, id)| ClaimPosition { enqueued_at, id });
        }
        for row in returned {
            if let Some((claimed, body)) = ClaimedRow::decode(row)? {
                claim.rows.push(claimed);
                claim.bodies.push(body);
            }
        }
        Ok(claim)
    }
}

impl ClaimedRow {
    /// Decodes one row of the claim query: the claimed row, and its body
    /// with the message columns when the claim brought the body along;
    /// `None` for the one row of a claim that took nothing.
    ///
    /// # Errors
    /// A type mismatch, which would mean the claim query changed.
    pub fn decode(row: &Row) -> Result<Option<(Self, Option<Fetched>)>, tokio_postgres::Error> {
        // After whether the claim met keyed rows and the window's last row.
        const FIRST: usize = 3;
        let Some(id) = row.try_get::<_, Option<String>>(FIRST)? else {
            return Ok(None);
        };
        let claimed = Self {
            id,
            enqueued_at: row.try_get(FIRST + 1)?,
            has_data: row.try_get(FIRST + 2)?,
            size: row.try_get(FIRST + 3)?,
            ordering_key: row.try_get(FIRST + 4)?,
            in_run: row.try_get(FIRST + 5)?,
        };
        let body: Option<Vec<u8>> = row.try_get(FIRST + 6)?;
        let fetched = match body {
            Some(body) => Some(Fetched {
                id: claimed.id.clone(),
                body,
                fields: decode_fields(row, FIRST + 7)?,
            }),
            None => None,
        };
        Ok(Some((claimed, fetched)))
    }
}

/// One fetched data row: its body and its status row's message columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// `message_id` as text.
    pub id: String,
    /// The body bytes.
    pub body: Vec<u8>,
    /// Routing and properties (the same for every data row of an id).
    pub fields: MessageFields,
}

/// A row's place in the order claims take rows in
/// ([`CLAIM_ORDER`]), where the next claim starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPosition {
    /// The row's `relay_enqueued_at`.
    pub enqueued_at: EnqueuedAt,
    /// The row's `message_id` as text.
    pub id: String,
}

impl ClaimPosition {
    /// Whether this position comes after `other` in claim order. Ids of
    /// the same instant compare as text, which for integer ids is not
    /// their order: the cursor only decides where claims look first, never
    /// what they may take, so such a rare misjudgement costs a look, not
    /// correctness.
    pub fn is_after(&self, other: &Self) -> bool {
        (self.enqueued_at.micros(), &self.id) > (other.enqueued_at.micros(), &other.id)
    }
}

/// A `relay_enqueued_at` value exactly as PostgreSQL sent it, to be sent
/// back as a claim's cursor: no clock type or text format in between that
/// could round it, shift its time zone or fail on `infinity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnqueuedAt(pub(crate) Vec<u8>);

impl EnqueuedAt {
    /// Microseconds since 2000-01-01 (PostgreSQL's binary `timestamptz`:
    /// eight big-endian bytes).
    fn micros(&self) -> i64 {
        self.0
            .as_slice()
            .try_into()
            .map_or(i64::MIN, i64::from_be_bytes)
    }
}

impl<'a> FromSql<'a> for EnqueuedAt {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Self(raw.to_vec()))
    }

    accepts!(TIMESTAMPTZ);
}

impl ToSql for EnqueuedAt {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    accepts!(TIMESTAMPTZ);
    to_sql_checked!();
}

impl Fetched {
    /// Decodes one row of [`Outbox::bodies_sql`].
    ///
    /// # Errors
    /// A type mismatch, which would mean the query changed.
    pub fn from_row(row: &Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            id: row.try_get(0)?,
            body: row.try_get(1)?,
            fields: decode_fields(row, 2)?,
        })
    }
}

/// Reads the columns [`fields_sql`] selects, starting at column `first`.
fn decode_fields(row: &Row, first: usize) -> Result<MessageFields, tokio_postgres::Error> {
    Ok(MessageFields {
        exchange: row.try_get(first)?,
        routing_key: row.try_get(first + 1)?,
        headers: row.try_get(first + 2)?,
        headers_size: row.try_get(first + 3)?,
        content_type: row.try_get(first + 4)?,
        correlation_id: row.try_get(first + 5)?,
        reply_to: row.try_get(first + 6)?,
        message_type: row.try_get(first + 7)?,
        expiration_ms: row.try_get(first + 8)?,
        priority: row.try_get(first + 9)?,
        notify_channel: row.try_get(first + 10)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(body_type: BodyType) -> Outbox {
        Outbox {
            schema: "Data".into(),
            id_type: "uuid".into(),
            id_kind: IdKind::Uuid,
            body_type,
            body_type_sql: "jsonb".into(),
            body_type_name: "jsonb".into(),
            body_type_base: "jsonb".into(),
        }
    }

    #[test]
    fn a_cursor_position_compares_by_time_first_then_id() {
        let at = |micros: i64, id: &str| ClaimPosition {
            enqueued_at: EnqueuedAt(micros.to_be_bytes().to_vec()),
            id: id.into(),
        };
        assert!(at(2, "a").is_after(&at(1, "b")));
        assert!(at(1, "b").is_after(&at(1, "a")));
        assert!(!at(1, "a").is_after(&at(1, "a")));
        // Before 2000-01-01 the microseconds are negative.
        assert!(at(1, "a").is_after(&at(-5, "z")));
    }

    #[test]
    fn a_uuid_id_is_read_in_every_spelling_postgresql_reads() {
        let o = outbox(BodyType::Bytea);
        let canonical = "5f0c6e1e-2a4b-4c7d-9e8f-0123456789ab";
        for spelling in [
            canonical,
            "5F0C6E1E-2A4B-4C7D-9E8F-0123456789AB",
            "{5f0c6e1e-2a4b-4c7d-9e8f-0123456789ab}",
            "5f0c6e1e2a4b4c7d9e8f0123456789ab",
            "5f0c-6e1e-2a4b-4c7d-9e8f-0123-4567-89ab",
        ] {
            assert_eq!(
                o.canonical_id(spelling).as_deref(),
                Ok(canonical),
                "{spelling}"
            );
        }
        for bad in [
            "no-such-id",
            "",
            "5f0c6e1e-2a4b-4c7d-9e8f-0123456789a",
            "5f0c6e1e-2a4b-4c7d-9e8f-0123456789abc",
            "-5f0c6e1e2a4b4c7d9e8f0123456789ab",
            "5f0c6e1e--2a4b4c7d9e8f0123456789ab",
            "5f0c6e1-e2a4b4c7d9e8f0123456789ab",
            "5f0c6e1e-2a4b-4c7d-9e8f-0123456789ag",
        ] {
            assert!(o.canonical_id(bad).is_err(), "{bad}");
        }
        let text = Outbox {
            id_type: "text".into(),
            ..o
        };
        assert_eq!(text.canonical_id("Order-7").as_deref(), Ok("Order-7"));
    }

    #[test]
    fn an_integer_id_is_read_as_postgresql_reads_it_and_anything_else_is_malformed() {
        for (id_type, max) in [
            ("smallint", "32767"),
            ("integer", "2147483647"),
            ("bigint", "9223372036854775807"),
        ] {
            let o = Outbox {
                id_type: id_type.into(),
                id_kind: IdKind::Integer { has_default: true },
                ..outbox(BodyType::Bytea)
            };
            for (spelling, canonical) in [("42", "42"), (" 007 ", "7"), ("+5", "5"), ("-3", "-3")] {
                assert_eq!(
                    o.canonical_id(spelling).as_deref(),
                    Ok(canonical),
                    "{id_type} {spelling}"
                );
            }
            assert_eq!(o.canonical_id(max).as_deref(), Ok(max));
            for bad in ["abc", "", "4.2", "1e3", "0x10", &format!("{max}0")] {
                let why = o.canonical_id(bad).unwrap_err();
                assert!(
                    why.contains(&format!("message_id is {id_type}")),
                    "{id_type} {bad}: {why}"
                );
            }
        }
    }

    #[test]
    fn statements_quote_the_schema_and_follow_the_types() {
        let o = outbox(BodyType::Jsonb);
        let claim = o.claim_sql(true);
        assert!(
            claim.contains(
                "(l.relay_enqueued_at, l.message_id) > ($6::timestamptz, $7::text::uuid)"
            ),
            "{claim}"
        );
        assert!(
            claim.contains("ORDER BY l.relay_enqueued_at NULLS FIRST, l.message_id"),
            "{claim}"
        );
        assert!(!o.claim_sql(false).contains("$6"));
        assert!(
            claim.contains("\"Data\".\"message_queue_log\" l"),
            "{claim}"
        );
        assert!(
            claim.contains("convert_to(d.message_body::text, 'UTF8')"),
            "{claim}"
        );
        assert!(
            claim.contains("l.transferred IS NOT TRUE AND l.relay_parked_at IS NULL"),
            "{claim}"
        );
        assert!(claim.contains("FOR UPDATE OF l SKIP LOCKED"), "{claim}");
        let unkeyed = o.unkeyed_claim_sql(true);
        assert!(
            unkeyed.contains(
                "<= now()) AND (l.relay_enqueued_at, l.message_id) > ($4::timestamptz, $5::text::uuid)"
            ),
            "{unkeyed}"
        );
        assert!(
            unkeyed.contains("SELECT * FROM locked WHERE ordering_key IS NULL"),
            "{unkeyed}"
        );
        assert!(!o.unkeyed_claim_sql(false).contains("$4"));
        for claim in [claim, unkeyed] {
            assert!(!claim.contains(KEYED_PREDICATE), "no probe: {claim}");
        }
        assert!(o.mark_sql().contains("ANY($1::text[]::uuid[])"));
        assert!(
            o.fail_sql()
                .contains("power(2::float8, least(greatest(l.relay_attempts, 0), 62))"),
            "the delay's exponent is clamped: {}",
            o.fail_sql()
        );
        let bytea = outbox(BodyType::Bytea);
        assert!(bytea.claim_sql(false).contains("d.message_body AS bytes"));
        assert!(
            bytea
                .bodies_sql()
                .contains("SELECT d.message_id::text, d.message_body,")
        );
    }

    #[test]
    fn every_relay_column_has_its_checked_type() {
        let checked: Vec<&str> = RELAY_COLUMN_TYPES.iter().map(|(n, _)| *n).collect();
        let added: Vec<&str> = RELAY_COLUMNS.iter().map(|(n, _)| *n).collect();
        assert_eq!(checked, added);
    }

    #[test]
    fn predicates_compare_without_the_parentheses_postgres_adds() {
        assert_eq!(
            normalize_predicate("((transferred IS NOT TRUE) AND (relay_parked_at IS NULL))"),
            normalize_predicate(PENDING_PREDICATE)
        );
        assert_ne!(
            normalize_predicate("(transferred IS NOT TRUE)"),
            normalize_predicate(PENDING_PREDICATE)
        );
    }

    #[test]
    fn content_types_follow_the_column() {
        assert_eq!(
            BodyType::from_type_name("bytea").unwrap().content_type(),
            "application/octet-stream"
        );
        assert_eq!(
            BodyType::from_type_name("jsonb").unwrap().content_type(),
            "application/json"
        );
        assert_eq!(
            BodyType::from_type_name("varchar").unwrap().content_type(),
            "text/plain; charset=utf-8"
        );
        assert!(BodyType::from_type_name("int4").is_none());
    }
}
