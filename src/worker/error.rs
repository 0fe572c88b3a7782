//! Why a batch failed, by side (the database's or the broker's) and kind,
//! with the driver's or the client's error kept as the source; and the
//! deadline every database call of a worker runs under.

use std::future::Future;
use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::db::outbox::SchemaError;
use crate::db::{self, describe};
use crate::mq;
use crate::mq::publisher::ChannelFailure;

/// Why one batch attempt failed; its rows stay pending.
#[derive(Debug, thiserror::Error)]
pub(super) enum BatchError {
    #[error("postgres: {0}")]
    Database(#[from] DatabaseFault),
    #[error("rabbitmq: {0}")]
    Broker(#[from] BrokerFault),
    /// Part of the configured topology is gone; reported through the
    /// broker state, not per batch.
    #[error("rabbitmq topology: {0}")]
    Topology(String),
    #[error("stopping")]
    Stopping,
}

/// A batch's fault on the database's side, sorted by SQLSTATE when the
/// server sent one.
#[derive(Debug, thiserror::Error)]
pub(super) enum DatabaseFault {
    /// A statement prepared by name met another server session: PostgreSQL
    /// is behind a transaction pooler ([`db::transaction_pooler_seen`]).
    #[error(
        "{}: the session's transactions run on different server sessions (a transaction pooler); \
         the next session keeps nothing across transactions",
        describe(.0)
    )]
    TransactionPooler(#[source] tokio_postgres::Error),
    /// A claim transaction of a session with named statements ran on
    /// another server session than the one they were prepared on: a
    /// transaction pooler the config does not name
    /// ([`db::transaction_pooler_found`]). Found in the claim's own round
    /// trip, before anything is published, and rolled back: the same names
    /// there may be another client's statements.
    #[error(
        "a claim transaction ran on server session {ran_on}, its statements were prepared on {prepared_on} \
         (a transaction pooler): rolled back before anything was published, since the statements of that \
         name there may be another client's; the next session keeps nothing across transactions"
    )]
    MovedServerSession {
        /// The backend the statements were prepared on.
        prepared_on: i32,
        /// The backend the claim ran on.
        ran_on: i32,
    },
    /// `feature_not_supported` (0A000): the only one the relay's own
    /// prepared statements can meet is a column they read changing type
    /// (see `db::outbox`).
    #[error(
        "the outbox's columns changed under the prepared statements ({}); \
         their types are read again on a new session",
        describe(.0)
    )]
    ColumnsRetyped(#[source] tokio_postgres::Error),
    /// A session fault: the session is dropped after the failed batch and
    /// the new one goes to the server that accepts writes.
    #[error(
        "the server is read-only, a standby or a demoted primary ({}); \
         reconnecting to the server that accepts writes",
        describe(.0)
    )]
    ReadOnly(#[source] tokio_postgres::Error),
    /// Any other error of the server or the session.
    #[error("{}", describe(.0))]
    Query(#[source] tokio_postgres::Error),
    /// An update of the outbox refused for no row at all (a revoked grant):
    /// the table's fault, so no row is charged.
    #[error(
        "the database refuses the relay's update of the outbox itself, for any row: {}",
        describe(.0)
    )]
    OutboxRefused(#[source] tokio_postgres::Error),
    /// The outbox's columns cannot be used as they are (or changed while
    /// they were read).
    #[error(transparent)]
    Schema(SchemaError),
    /// A statement got no answer in time (`postgres.query_timeout_ms`).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A batch's fault on the broker's side.
#[derive(Debug, thiserror::Error)]
pub(super) enum BrokerFault {
    /// The batch's channel cannot be used again.
    #[error(transparent)]
    Channel(ChannelFailure),
    /// The broker nacked messages.
    #[error(
        "broker nacked {0} messages (a queue limit with overflow reject-publish, or a broker fault)"
    )]
    Nacked(usize),
    /// No confirm-mode channel could be opened.
    #[error("open a confirm channel: {0}")]
    OpenChannel(#[source] Box<lapin::Error>),
    /// The broker did not say in time whether the exchanges rows name exist.
    #[error("no answer about the exchanges rows name")]
    NoExchangeAnswer,
    /// Asking whether the exchanges rows name exist failed.
    #[error(transparent)]
    ExchangeCheck(mq::BrokerError),
}

impl From<tokio_postgres::Error> for BatchError {
    fn from(e: tokio_postgres::Error) -> Self {
        let fault = if db::transaction_pooler_seen(&e) {
            DatabaseFault::TransactionPooler(e)
        } else if e.code() == Some(&SqlState::FEATURE_NOT_SUPPORTED) {
            DatabaseFault::ColumnsRetyped(e)
        } else if db::is_read_only(&e) {
            DatabaseFault::ReadOnly(e)
        } else {
            DatabaseFault::Query(e)
        };
        Self::Database(fault)
    }
}

/// [`within`] for calls that read or check the outbox's columns.
pub(super) async fn within_schema<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, SchemaError>>,
) -> Result<T, BatchError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(SchemaError::Query(e))) => Err(e.into()),
        Ok(Err(e)) => Err(DatabaseFault::Schema(e).into()),
        Err(_) => Err(DatabaseFault::Timeout(limit).into()),
    }
}

/// Runs one database call with a deadline: a stalled link must not hang the
/// worker (TCP keepalives cannot see a peer that acknowledges and never answers).
pub(super) async fn within<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, BatchError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(DatabaseFault::Timeout(limit).into()),
    }
}
