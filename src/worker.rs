//! A worker: claim a batch, publish it, wait for the confirms, mark what was
//! confirmed, record what failed, commit. Several workers run at once, so
//! database round trips and broker confirms overlap.
//!
//! Each worker owns one PostgreSQL session and one AMQP channel. The claim
//! transaction's row locks are the lease: other sessions skip the rows, and
//! a crashed worker's locks vanish with its session. A row is marked
//! transferred only in the transaction that claimed it, and only after a
//! bare `basic.ack`. Bad input (no data row, NULL or ambiguous body, an
//! oversized body, an id too long for AMQP, an unroutable message, an
//! exchange that is missing or refused, a property the broker refuses) is
//! recorded on the row in the same transaction: the row waits out a
//! doubling delay and is parked after `relay.max_attempts`, so it never
//! blocks the stream. A message the broker refuses by closing the channel
//! is found by publishing the batch's unsettled messages one by one
//! ([`Publisher::isolate`]) and charged alone. Faults that are not the row's
//! (nack, timeout, lost connection, a configured queue or exchange gone)
//! leave rows pending untouched and back the worker off; a channel the
//! broker closed is replaced without touching the connection or the other
//! workers. A row the database refuses to mark (a constraint, a trigger) is
//! found by marking the batch's rows one by one, each under a savepoint
//! inside the claim transaction (which keeps the batch's locks), and is
//! charged like bad input while the others are marked once; a row whose
//! failure cannot be recorded either has its attempts kept in the relay's
//! memory ([`Unwritable`]) by the same rule. The worker never claims while
//! the broker is down or blocked, so
//! no transaction spans an outage, and it keeps its claim transaction alive
//! while a blocked broker holds back the confirms of a batch already sent.
//!
//! The batch itself, step by step, and what it reports are in `batch`;
//! this module keeps the loop, the session and channel a worker owns, its
//! back-off, and its reactions to a batch's outcome.

mod batch;
mod depth;
mod error;
mod unwritable;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::db::outbox::{Outbox, Statements};
use crate::db::{self, SessionKind};
use crate::metrics::Metrics;
use crate::mq::publisher::Publisher;
use crate::mq::{self, BrokerState};
use crate::routing::Router;
pub use batch::ClaimCursor;
use batch::{BatchOutcome, Steps};
pub use depth::Depth;
use error::{BatchError, BrokerFault, within, within_schema};
pub use unwritable::Unwritable;

/// Extra time a claim transaction may stay open beyond the confirm timeout
/// before the server ends it (and releases its locks).
const TRANSACTION_MARGIN: Duration = Duration::from_secs(30);

/// One claim-publish-mark loop.
pub struct Worker {
    index: usize,
    config: Arc<Config>,
    outbox: Arc<Outbox>,
    router: Router,
    broker: watch::Receiver<BrokerState>,
    /// Where a topology fault is reported (and cleared).
    broker_state: watch::Sender<BrokerState>,
    wake: Arc<Notify>,
    backoff: Backoff,
    session: Option<(Client, Statements)>,
    /// Behind a transaction pooler: the claim session's settings, set
    /// (`SET LOCAL`) in every claim transaction.
    transaction_settings: Option<String>,
    publisher: Option<Publisher>,
    /// Where this relay's next claim starts; shared by its workers.
    cursor: Arc<ClaimCursor>,
    /// Exchanges named by rows that the broker refused (closing the channel
    /// and failing the whole batch), with why and when.
    refused: HashMap<String, (String, Instant)>,
    metrics: Arc<Metrics>,
    unwritable: Arc<Unwritable>,
    /// Claims in a row that took nothing but saw the backlog go on.
    empty_windows: u32,
    /// How many of the relay's workers claim.
    depth: Arc<Depth>,
}

/// What a worker does after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Wait for a wake-up: nothing more is known to be claimable.
    Idle,
    /// Claim again at once, and wake another worker: more is waiting.
    More,
    /// Claim again at once, alone: the last claim took nothing, but the
    /// backlog goes on past what it looked at.
    LookFurther,
}

/// How many claims in a row that take nothing a worker makes per wake-up
/// while the backlog goes on past them.
const MAX_EMPTY_WINDOWS: u32 = 8;

/// What every worker of a relay is built with: the configuration and the
/// outbox, and the state the workers share (the broker's state, the wake-up,
/// the claim cursor, the metrics, the rows only memory can charge).
#[derive(Clone)]
pub struct WorkerContext {
    /// The configuration.
    pub config: Arc<Config>,
    /// The outbox's tables and statements.
    pub outbox: Arc<Outbox>,
    /// The broker link's state; workers add topology faults to it.
    pub broker: watch::Sender<BrokerState>,
    /// Wakes a worker: a notification, a sweep, a reconnection.
    pub wake: Arc<Notify>,
    /// Where the relay's next claim starts.
    pub cursor: Arc<ClaimCursor>,
    /// Where batches are counted.
    pub metrics: Arc<Metrics>,
    /// Rows whose failures the database refuses to record on the row.
    pub unwritable: Arc<Unwritable>,
    /// How many workers claim: the window's, more when far away.
    pub depth: Arc<Depth>,
}

impl Worker {
    /// Worker number `index` of a relay.
    pub fn new(index: usize, context: WorkerContext, backoff: Backoff) -> Self {
        let WorkerContext {
            config,
            outbox,
            broker,
            wake,
            cursor,
            metrics,
            unwritable,
            depth,
        } = context;
        let router = Router::new(&config.rabbitmq, outbox.body_type.content_type());
        Self {
            index,
            config,
            outbox,
            router,
            broker: broker.subscribe(),
            broker_state: broker,
            wake,
            backoff,
            session: None,
            transaction_settings: None,
            publisher: None,
            cursor,
            refused: HashMap::new(),
            metrics,
            unwritable,
            empty_windows: 0,
            depth,
        }
    }

    /// Relays batches whenever woken and wanted ([`Depth`]), until `token`
    /// is cancelled. A batch in flight is always finished (confirmed and
    /// committed, or rolled back).
    pub async fn run(mut self, token: CancellationToken) {
        loop {
            // An unwanted worker takes no wake-up, so none is lost on it.
            tokio::select! {
                () = token.cancelled() => return,
                () = self.depth.until_wanted(self.index) => {}
            }
            tokio::select! {
                () = token.cancelled() => return,
                () = self.wake.notified() => {}
            }
            while !token.is_cancelled() {
                match self
                    .relay_batch(&token)
                    .await
                    .and_then(|outcome| self.after_commit(outcome))
                {
                    Ok(next) => {
                        self.metrics.batch_worked();
                        self.backoff.reset();
                        match next {
                            Next::Idle => break,
                            // More is waiting: bring in another worker as well.
                            Next::More => self.wake.notify_one(),
                            Next::LookFurther => {}
                        }
                        if !self.depth.wants(self.index) {
                            self.cursor.hand_over(self.index).await;
                            break;
                        }
                    }
                    Err(BatchError::Stopping) => return,
                    Err(error) => {
                        self.metrics.batch_failed();
                        self.cursor.hand_over(self.index).await;
                        let delay = self.backoff.next_delay();
                        if matches!(error, BatchError::Topology(_)) {
                            // Reported once through the broker state.
                            debug!(worker = self.index, %error, retry_in = ?delay, "batch failed; its rows stay pending");
                        } else {
                            warn!(worker = self.index, %error, retry_in = ?delay, "batch failed; its rows stay pending");
                        }
                        tokio::select! {
                            () = token.cancelled() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                        self.wake.notify_one();
                        break;
                    }
                }
            }
        }
    }

    /// Reports what a batch did ([`BatchOutcome::report`]) and reacts to
    /// it, saying what the worker does next.
    fn after_commit(&mut self, outcome: BatchOutcome) -> Result<Next, BatchError> {
        outcome.report(self.index, &self.metrics);
        // Only full batches tell what a batch costs: a short one is a
        // backlog's tail or a trickle, where the depth does not matter.
        if outcome.claimed >= self.config.relay.batch_size {
            let timings = &outcome.timings;
            if let Some(depth) = self.depth.record(timings.committed, timings.began) {
                self.metrics
                    .batches_in_flight
                    .set(i64::try_from(depth).unwrap_or(i64::MAX));
                debug!(
                    depth,
                    "batches in flight changed with the measured round trip"
                );
            }
        }
        if let Some((exchange, reason)) = outcome.refused_exchange {
            warn!(%exchange, %reason, "the broker refused an exchange named by rows; those rows fail without being published for a while");
            self.refused.insert(exchange, (reason, Instant::now()));
        }
        if let Some(reason) = outcome.topology_fault {
            self.report_topology_fault(&reason);
            return Err(BatchError::Topology(reason));
        }
        if outcome.configured_route_confirmed {
            self.clear_topology_fault();
        }
        if let Some(failure) = outcome.channel_failure {
            self.publisher = None;
            return Err(BrokerFault::Channel(failure).into());
        }
        if outcome.nacked > 0 {
            return Err(BrokerFault::Nacked(outcome.nacked).into());
        }
        if outcome.claimed > 0 {
            self.empty_windows = 0;
        } else if outcome.advanced {
            // Nothing claimable in what the claim looked at (a deep backlog
            // of keys whose heads are in flight or parked): look further,
            // but only so far per wake-up, so such a backlog is walked at a
            // bounded pace instead of over and over.
            self.empty_windows += 1;
            if self.empty_windows >= MAX_EMPTY_WINDOWS {
                self.empty_windows = 0;
                return Ok(Next::Idle);
            }
            return Ok(Next::LookFurther);
        }
        Ok(
            if outcome.claimed >= self.config.relay.batch_size
                || outcome.deferred > 0
                || outcome.wrapped
                || outcome.advanced
            {
                Next::More
            } else {
                Next::Idle
            },
        )
    }

    /// Relays one batch ([`batch::Steps`]) on this worker's channel and
    /// claim session, which a failed batch gives up: a failed or timed-out
    /// statement may leave the session unusable.
    async fn relay_batch(&mut self, token: &CancellationToken) -> Result<BatchOutcome, BatchError> {
        self.ensure_publisher(token).await?;
        self.ensure_session().await?;
        let (Some(publisher), Some((client, statements))) =
            (&mut self.publisher, &mut self.session)
        else {
            unreachable!("ensured above");
        };
        let steps = Steps {
            relay: &self.config.relay,
            query_timeout: self.config.postgres.query_timeout,
            statements,
            transaction_settings: self.transaction_settings.as_deref(),
            router: &self.router,
            broker: &self.broker,
            cursor: &self.cursor,
            refused: &self.refused,
            unwritable: &self.unwritable,
            worker: self.index,
        };
        let result = steps.run(client, publisher).await;
        if result.is_err() {
            self.session = None;
        }
        result
    }

    /// Part of the configured topology is gone (`reason` says how that
    /// showed): reports it once (log, `/readyz`, metric) until a message on
    /// a configured route is confirmed again, and declares the topology
    /// again. Called at most once per failed batch, so the declarations
    /// follow the worker's back-off.
    fn report_topology_fault(&self, reason: &str) {
        let mut first = false;
        self.broker_state.send_modify(|state| {
            first = state.topology_fault.is_none();
            state.topology_fault = Some(reason.to_owned());
        });
        if first {
            error!(%reason, "the configured topology is broken; the rows stay pending, uncharged, until it is back");
        }
        let Some(connection) = self.broker.borrow().usable().cloned() else {
            return;
        };
        let config = self.config.clone();
        tokio::spawn(async move {
            match mq::declare_topology(&connection, &config.rabbitmq).await {
                Ok(()) => warn!("declared the configured exchanges, queues and bindings again"),
                Err(reason) => debug!(%reason, "cannot declare the configured topology again"),
            }
        });
    }

    /// A message on a configured route was confirmed: the topology is back.
    fn clear_topology_fault(&self) {
        let cleared = self
            .broker_state
            .send_if_modified(|state| state.topology_fault.take().is_some());
        if cleared {
            info!("the configured topology works again; resuming");
        }
    }

    /// Opens a channel on the current connection, waiting (without holding
    /// any row) while the broker is down or blocked.
    async fn ensure_publisher(&mut self, token: &CancellationToken) -> Result<(), BatchError> {
        if self.publisher.as_ref().is_some_and(Publisher::is_open)
            && self.broker.borrow().usable().is_some()
        {
            return Ok(());
        }
        self.publisher = None;
        let connection = tokio::select! {
            () = token.cancelled() => return Err(BatchError::Stopping),
            state = self.broker.wait_for(|s| s.usable().is_some()) => {
                let state = state.map_err(|_| BatchError::Stopping)?;
                state.usable().cloned().expect("checked by wait_for")
            }
        };
        let publisher = Publisher::open(connection)
            .await
            .map_err(|e| BrokerFault::OpenChannel(Box::new(e)))?;
        self.publisher = Some(publisher);
        Ok(())
    }

    /// Reads the outbox's column types on `client` (again with every
    /// session: a column retyped under the running relay (ALTER TABLE) shows
    /// as a failed batch (see `db::outbox`), which replaces the session, so
    /// the new statements are built for the new types), then prepares the
    /// statements inside the transaction `client`: by name, or `unnamed`
    /// behind a transaction pooler.
    async fn inspect_and_prepare(
        &mut self,
        client: &(impl tokio_postgres::GenericClient + Sync),
        unnamed: bool,
    ) -> Result<Statements, BatchError> {
        let limit = self.config.postgres.query_timeout;
        let outbox = within_schema(limit, Outbox::inspect(client, &self.outbox.schema)).await?;
        if (&outbox.id_type, &outbox.body_type_sql)
            != (&self.outbox.id_type, &self.outbox.body_type_sql)
        {
            warn!(
                worker = self.index,
                message_id = %format!("{} (was {})", outbox.id_type, self.outbox.id_type),
                message_body = %format!("{} (was {})", outbox.body_type_sql, self.outbox.body_type_sql),
                "the outbox's column types changed; statements prepared for the new types"
            );
            self.router = Router::new(&self.config.rabbitmq, outbox.body_type.content_type());
            self.outbox = Arc::new(outbox);
        }
        if unnamed {
            within_schema(limit, self.outbox.prepare_unnamed(client)).await
        } else {
            within_schema(limit, self.outbox.prepare(client)).await
        }
    }

    /// Connects this worker's claim session and prepares its statements.
    async fn ensure_session(&mut self) -> Result<(), BatchError> {
        if self.session.as_ref().is_some_and(|(c, _)| !c.is_closed()) {
            return Ok(());
        }
        self.session = None;
        let kind = SessionKind::Claim {
            idle_in_transaction: self.config.relay.confirm_timeout + TRANSACTION_MARGIN,
        };
        let limit = self.config.postgres.query_timeout;
        let mut client = db::connect(&self.config.postgres, kind)
            .await
            .map_err(BatchError::from)
            .inspect_err(|_| self.metrics.session_connect_failed())?;
        let unnamed = db::behind_transaction_pooler(&self.config.postgres);
        // Every statement inside one transaction: through a transaction
        // pooler, a named statement's parse and its use may otherwise meet
        // different server sessions, and the names are checked free on the
        // server session the statements stay on.
        let tx = within(limit, client.transaction()).await?;
        let statements = self.inspect_and_prepare(&tx, unnamed).await?;
        within(limit, tx.commit()).await?;
        if unnamed {
            let SessionKind::Claim {
                idle_in_transaction,
            } = kind
            else {
                unreachable!("a claim session")
            };
            self.transaction_settings = Some(db::claim_settings_sql(
                &self.config.postgres,
                idle_in_transaction,
                true,
            ));
        }
        if self.backoff.attempts() > 0 {
            info!(worker = self.index, "claim session reconnected");
            self.metrics.session_reconnects.inc();
        }
        self.session = Some((client, statements));
        Ok(())
    }
}
