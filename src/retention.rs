//! Retention (off by default): deletes rows transferred longer ago than
//! `retention.transferred_after_sec`, with their bodies, a small batch per
//! statement ([`Outbox::retention_sql`]). It locks only old transferred
//! rows, with `SKIP LOCKED`, so producers (who insert new rows) and
//! workers (who claim pending ones) never wait for it. It deletes rows by
//! row identity, never by id, so a pending row that repeats an expired
//! row's id stays; it compares `transfer_time` as an instant, so a
//! daylight-saving change never makes it early; and it finds expired rows
//! through an index on the transfer time, so a run reads what it deletes,
//! not the history.

use std::sync::Arc;

use tokio_postgres::Client;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, RetentionConfig};
use crate::db::outbox::Outbox;
use crate::db::{self, SessionKind, describe};
use crate::metrics::Metrics;

/// Deletes expired rows every `retention.interval` until `token` is cancelled.
pub async fn run(
    config: Arc<Config>,
    outbox: Arc<Outbox>,
    retention: RetentionConfig,
    metrics: Arc<Metrics>,
    token: CancellationToken,
) {
    let mut session: Option<Client> = None;
    loop {
        if session.as_ref().is_none_or(Client::is_closed) {
            session = db::connect(&config.postgres.for_session_work(), SessionKind::Plain)
                .await
                .ok();
        }
        if let Some(client) = &mut session {
            let run = delete_expired(client, &outbox, &retention, &metrics, &token);
            match tokio::time::timeout(config.postgres.query_timeout * 10, run).await {
                Ok(Ok(0)) => {}
                Ok(Ok(deleted)) => info!(deleted, "retention deleted transferred rows"),
                Ok(Err(e)) => {
                    warn!(error = %describe(&e), "retention failed; it tries again later");
                    session = None;
                }
                Err(_) => {
                    warn!("retention took too long; it tries again later");
                    session = None;
                }
            }
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(retention.interval) => {}
        }
    }
}

/// Deletes expired rows batch by batch until none is left (or the relay
/// stops); returns how many were deleted.
async fn delete_expired(
    client: &mut Client,
    outbox: &Outbox,
    retention: &RetentionConfig,
    metrics: &Metrics,
    token: &CancellationToken,
) -> Result<u64, tokio_postgres::Error> {
    let age = retention.transferred_after.as_secs_f64();
    let batch = outbox.retention_sql();
    let mut total = 0;
    while !token.is_cancelled() {
        // One statement is one transaction: the rows it locks are released
        // when it ends. Unnamed, as every statement outside the claims
        // (see `db::unnamed`).
        let deleted = client
            .execute_typed(
                &batch,
                &[(&age, Type::FLOAT8), (&retention.batch_size, Type::INT8)],
            )
            .await?;
        metrics.rows_deleted.inc_by(deleted);
        total += deleted;
        debug!(deleted, "retention batch committed");
        // A short batch is the last: the index walk reached rows that are
        // not expired (or rows others hold, which the next run retries).
        if deleted < u64::try_from(retention.batch_size).unwrap_or(u64::MAX) {
            break;
        }
    }
    Ok(total)
}
