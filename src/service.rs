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
use std::num::NonZeroUsize;
use std::sync::Arc;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::admin::{self, AdminState};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::db::listener::Listener;
use crate::db::outbox::{Outbox, PENDING_INDEX, REPEATABLE_IDS_WARNING};
use crate::db::{self, SessionKind, describe, migrate};
use crate::metrics::Metrics;
use crate::mq::{BrokerLink, BrokerState};
use crate::worker::{ClaimCursor, Depth, Worker, WorkerContext};

/// The async runtime the relay runs on: one worker thread unless the
/// `TOKIO_WORKER_THREADS` environment variable says otherwise (read by the
/// config: [`Config::worker_threads`], [`crate::config::worker_threads`]).
/// The relay spends about 0.11 CPU seconds per 10 000 messages, so one
/// thread keeps up with several times what a queue takes, and on a host
/// shared with PostgreSQL and RabbitMQ a second one only adds thread
/// switches (drains measured about 3 % faster with one).
///
/// # Errors
/// The runtime could not be built (no threads or timers available).
pub fn runtime(worker_threads: Option<NonZeroUsize>) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.map_or(1, NonZeroUsize::get))
        .enable_all()
        .build()
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The migrations failed.
    #[error("migrate the outbox: {0}")]
    Migrate(#[from] migrate::MigrateError),
    /// The outbox cannot be used as it is.
    #[error("outbox schema: {0}")]
    Schema(#[from] db::outbox::SchemaError),
    /// The admin endpoint cannot listen.
    #[error(transparent)]
    Admin(admin::BindError),
}

/// How often the backlog (pending rows, oldest age) is sampled for metrics.
const BACKLOG_SAMPLE: std::time::Duration = std::time::Duration::from_secs(5);

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

    // The admin endpoint answers from the start, while the relay still waits
    // for its services (healthy, not ready), and stops last.
    let metrics = Arc::new(Metrics::with_stall_after(config.admin.stall_after));
    let (broker_tx, broker_rx) = watch::channel(BrokerState::default());
    let (listening_tx, listening_rx) = watch::channel(false);
    let admin_stop = CancellationToken::new();
    let admin_tasks = TaskTracker::new();
    if let Some(addr) = config.admin.listen {
        match admin::bind(addr).await {
            Ok(listener) => {
                let state = AdminState {
                    metrics: metrics.clone(),
                    broker: broker_rx.clone(),
                    listening: listening_rx.clone(),
                };
                admin_tasks.spawn(admin::serve(listener, state, admin_stop.clone()));
            }
            Err(e) if config.admin.required => return Err(StartError::Admin(e)),
            // The default address, unasked for: a second instance on the
            // host (the seed's file has no admin section) relays without it.
            Err(e) => warn!(
                error = %e,
                "admin endpoint not started: admin.listen is not set and its default address is taken \
                 (another instance on this host?); relaying without it"
            ),
        }
    }
    admin_tasks.spawn(metrics.clone().follow_connections(
        broker_rx.clone(),
        listening_rx,
        admin_stop.clone(),
    ));
    admin_tasks.close();

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
        max_workers = config.relay.max_workers,
        batch_size = config.relay.batch_size,
        "relay starting"
    );

    let backoff = || Backoff::new(config.rabbitmq.retry_delay, config.relay.max_retry_delay);
    let wake = Arc::new(Notify::new());

    // Sources of work stop on `stop`; the links stop on `links` after the
    // workers are done with them.
    let links = CancellationToken::new();
    let link_tasks = TaskTracker::new();
    link_tasks.spawn(
        BrokerLink::new(
            config.rabbitmq.clone(),
            backoff(),
            broker_tx.clone(),
            wake.clone(),
        )
        .run(links.clone()),
    );
    link_tasks.spawn(
        Listener::new(
            &config.postgres,
            config.channels.clone(),
            wake.clone(),
            backoff(),
            listening_tx,
            metrics.clone(),
            config.relay.idle_sleep,
        )
        .run(stop.clone()),
    );
    link_tasks.spawn(sweep(wake.clone(), config.relay.idle_sleep, stop.clone()));
    if let Some(retention) = config.retention.clone() {
        link_tasks.spawn(crate::retention::run(
            config.clone(),
            outbox.clone(),
            retention,
            metrics.clone(),
            stop.clone(),
        ));
    }
    link_tasks.spawn(sample_backlog(
        config.clone(),
        outbox.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    link_tasks.close();

    let workers = TaskTracker::new();
    let context = WorkerContext {
        config: config.clone(),
        outbox: outbox.clone(),
        broker: broker_tx,
        wake: wake.clone(),
        cursor: Arc::new(ClaimCursor::default()),
        metrics: metrics.clone(),
        unwritable: Arc::default(),
        depth: Arc::new(Depth::new(config.relay.workers, config.relay.max_workers)),
    };
    metrics
        .batches_in_flight
        .set(i64::try_from(config.relay.workers).unwrap_or(i64::MAX));
    // Workers past `relay.workers` wait, without a session, until the
    // measured round trip wants them.
    for index in 0..config.relay.max_workers {
        let worker = Worker::new(index, context.clone(), backoff());
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
    admin_stop.cancel();
    let _admin_closed =
        tokio::time::timeout(std::time::Duration::from_secs(1), admin_tasks.wait()).await;
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
/// and reads the outbox's column types. A failure that may pass on its own
/// (a deadlock with another instance's migration, a lock timeout, a lost
/// session: see [`db::is_transient`]) is retried with back-off, on a new
/// session when the old one is gone; any other failure stops the start.
async fn prepare_outbox(config: &Config) -> Result<Outbox, StartError> {
    let mut backoff = Backoff::new(config.rabbitmq.retry_delay, config.relay.max_retry_delay);
    let mut session: Option<tokio_postgres::Client> = None;
    loop {
        let client = match session.take() {
            Some(client) if !client.is_closed() => client,
            _ => match db::connect(&config.postgres.for_session_work(), SessionKind::Plain).await {
                Ok(client) => client,
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(error = %describe(&e), retry_in = ?delay, "cannot connect to postgres");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            },
        };
        match prepare_on(config, &client).await {
            Ok(outbox) => return Ok(outbox),
            Err(e) if e.is_transient() => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "cannot prepare the outbox yet; retrying");
                tokio::time::sleep(delay).await;
                session = Some(client);
            }
            Err(e) => return Err(e),
        }
    }
}

impl StartError {
    /// Whether trying again may succeed (see [`db::is_transient`]).
    fn is_transient(&self) -> bool {
        match self {
            Self::Migrate(e) => e.is_transient(),
            Self::Schema(db::outbox::SchemaError::Query(e)) => db::is_transient(e),
            Self::Schema(_) | Self::Admin(_) => false,
        }
    }
}

/// One attempt of [`prepare_outbox`] on `client`.
async fn prepare_on(
    config: &Config,
    client: &tokio_postgres::Client,
) -> Result<Outbox, StartError> {
    let schema = &config.postgres.schema;
    let outbox = if config.postgres.auto_migrate {
        let (_report, outbox) = migrate::run(client, schema, &config.channels[0]).await?;
        outbox
    } else {
        let outbox = Outbox::inspect(client, schema).await?;
        if !outbox.pending_index_ready(client).await.unwrap_or(true) {
            warn!(
                schema = %schema,
                index = PENDING_INDEX,
                "the outbox lacks the pending-rows index of this release, so every claim sorts the whole backlog; \
                 run `pushoccurrence migrate` as the tables' owner"
            );
        }
        outbox
    };
    // A catalog read that fails only costs the warning.
    if !outbox.ids_unique(client).await.unwrap_or(true) {
        warn!(
            schema = %schema,
            fix = %outbox.unique_ids_sql(),
            "{REPEATABLE_IDS_WARNING}"
        );
    }
    Ok(outbox)
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

/// Samples the backlog into the metrics every [`BACKLOG_SAMPLE`], on a
/// session of its own; a failed sample is retried at the next tick. A
/// failure is visible, never a stale or zero reading: it is counted, the
/// gauges read NaN until a sample works again, and the first failure of a
/// run of them is logged as a warning (the sample's count of claimable rows
/// is also what tells `/readyz` that rows wait while no batch commits).
async fn sample_backlog(
    config: Arc<Config>,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    token: CancellationToken,
) {
    let mut ticks = tokio::time::interval(BACKLOG_SAMPLE);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut session = None;
    let mut failing = false;
    let kind = SessionKind::Claim {
        idle_in_transaction: config.postgres.query_timeout,
    };
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let sample = async {
            if session
                .as_ref()
                .is_none_or(tokio_postgres::Client::is_closed)
            {
                session = None;
                let client = db::connect(&config.postgres, kind)
                    .await
                    .map_err(|e| format!("connect: {}", describe(&e)))?;
                session = Some(client);
            }
            let client = session.as_ref().expect("connected above");
            tokio::time::timeout(
                config.postgres.query_timeout,
                client.query_typed_one(&outbox.backlog_sql(), &[]),
            )
            .await
            .map_err(|_| "no answer in time".to_owned())?
            .map_err(|e| describe(&e))
        }
        .await;
        match sample {
            Ok(row) => {
                metrics.backlog_sampled(row.get(0), row.get(1), row.get(2));
                if failing {
                    info!("the backlog can be sampled again");
                }
                failing = false;
            }
            Err(error) => {
                metrics.backlog_sample_failed();
                if failing {
                    debug!(%error, "cannot sample the backlog");
                } else {
                    warn!(%error, "cannot sample the backlog; its gauges read NaN until a sample works");
                }
                failing = true;
                session = None;
            }
        }
    }
}
