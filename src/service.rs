//! Wiring and lifecycle: prepare the outbox, start the broker link, the
//! listener, the sweep timer and the workers, and stop them in order.
//!
//! Stop order matters. The workers stop first: each finishes the batch it
//! holds (confirmed and committed, or rolled back). Only then do the broker
//! link and the listener stop, so an in-flight batch never loses its
//! connection to the shutdown itself. The whole drain is bounded by
//! `relay.shutdown_grace_ms`; whatever is still open then is rolled back by
//! PostgreSQL when the process exits, and stays pending.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::db::listener::Listener;
use crate::db::outbox::Outbox;
use crate::db::{self, SessionKind, describe, migrate};
use crate::mq::{BrokerLink, BrokerState};
use crate::worker::{ClaimCursor, Worker};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The migrations failed.
    #[error("migrate the outbox: {0}")]
    Migrate(#[from] migrate::MigrateError),
    /// The outbox cannot be used as it is.
    #[error("outbox schema: {0}")]
    Schema(#[from] db::outbox::SchemaError),
}

/// Runs the relay until `shutdown` completes, then drains.
///
/// Start-up waits for PostgreSQL with back-off (a relay started before its
/// database is not an error); a schema it cannot use is.
///
/// # Errors
/// [`StartError`] when the outbox cannot be prepared.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let config = Arc::new(config);
    let stop = CancellationToken::new();
    let stop_on_signal = stop.clone();
    let mut shutdown = std::pin::pin!(shutdown);

    let outbox = tokio::select! {
        () = &mut shutdown => {
            info!("stopped before start-up finished");
            return Ok(());
        }
        outbox = prepare_outbox(&config) => outbox?,
    };
    let outbox = Arc::new(outbox);
    info!(
        schema = %outbox.schema,
        id_type = %outbox.id_type,
        body_type = %outbox.body_type_sql,
        workers = config.relay.workers,
        batch_size = config.relay.batch_size,
        "relay starting"
    );

    let backoff = || Backoff::new(config.rabbitmq.retry_delay, config.relay.max_retry_delay);
    let (broker_tx, broker_rx) = watch::channel(BrokerState::default());
    let (listening_tx, _listening_rx) = watch::channel(false);
    let wake = Arc::new(Notify::new());

    // Sources of work stop on `stop`; the links stop on `links` after the
    // workers are done with them.
    let links = CancellationToken::new();
    let link_tasks = TaskTracker::new();
    link_tasks.spawn(
        BrokerLink::new(config.rabbitmq.clone(), backoff(), broker_tx, wake.clone())
            .run(links.clone()),
    );
    link_tasks.spawn(
        Listener::new(
            config.postgres.clone(),
            config.channels.clone(),
            wake.clone(),
            backoff(),
            listening_tx,
        )
        .run(stop.clone()),
    );
    link_tasks.spawn(sweep(wake.clone(), config.relay.idle_sleep, stop.clone()));
    link_tasks.close();

    let workers = TaskTracker::new();
    let cursor = Arc::new(ClaimCursor::default());
    for index in 0..config.relay.workers {
        let worker = Worker::new(
            index,
            config.clone(),
            outbox.clone(),
            broker_rx.clone(),
            wake.clone(),
            backoff(),
            cursor.clone(),
        );
        let token = stop.clone();
        workers.spawn(async move {
            // A worker that panics must not leave the relay half-running.
            let guard = token.clone().drop_guard();
            worker.run(token).await;
            guard.disarm();
        });
    }
    workers.close();
    // Start-up sweep: rows written while no relay ran.
    wake.notify_one();

    tokio::select! {
        () = &mut shutdown => info!("stop requested; finishing in-flight batches"),
        () = stop_on_signal.cancelled() => error!("a worker stopped unexpectedly; shutting down"),
    }
    stop.cancel();
    let grace = config.relay.shutdown_grace;
    let drained = tokio::time::timeout(grace, workers.wait()).await.is_ok();
    crate::shutdown::mark_closing();
    links.cancel();
    let _links_closed =
        tokio::time::timeout(std::time::Duration::from_secs(3), link_tasks.wait()).await;
    if drained {
        info!("stopped cleanly");
    } else {
        warn!(
            ?grace,
            "in-flight batches did not finish within the grace period; their rows stay pending"
        );
    }
    Ok(())
}

/// Connects (waiting for the database with back-off), migrates if asked,
/// and reads the outbox's column types.
async fn prepare_outbox(config: &Config) -> Result<Outbox, StartError> {
    let mut backoff = Backoff::new(config.rabbitmq.retry_delay, config.relay.max_retry_delay);
    let client = loop {
        match db::connect(&config.postgres, SessionKind::Plain).await {
            Ok(client) => break client,
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %describe(&e), retry_in = ?delay, "cannot connect to postgres");
                tokio::time::sleep(delay).await;
            }
        }
    };
    let schema = &config.postgres.schema;
    if config.postgres.auto_migrate {
        let (_report, outbox) = migrate::run(&client, schema, &config.channels[0]).await?;
        Ok(outbox)
    } else {
        Ok(Outbox::inspect(&client, schema).await?)
    }
}

/// Wakes a worker every `interval`: the fallback that finds rows whose
/// notification was missed.
async fn sweep(wake: Arc<Notify>, interval: std::time::Duration, token: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = ticks.tick() => wake.notify_one(),
        }
    }
}
