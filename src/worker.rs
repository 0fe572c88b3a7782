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

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::{Config, RelayConfig};
use crate::db::outbox::{self, ClaimedRow, Outbox, SchemaError, Statements};
use crate::db::{self, SessionKind, describe};
use crate::metrics::Metrics;
use crate::mq::publisher::{ChannelFailure, Delivery, Message, Publisher, soft_kind};
use crate::mq::{self, BrokerState};
use crate::relay::{ClaimPosition, Fetched, Hold, assemble, plan, take_bodies};
use crate::routing::Router;
use lapin::protocol::AMQPSoftError;

/// Extra time a claim transaction may stay open beyond the confirm timeout
/// before the server ends it (and releases its locks).
const TRANSACTION_MARGIN: Duration = Duration::from_secs(30);
/// How long rows naming an exchange the broker refused fail without being
/// published; after it, one more try shows whether the refusal still holds.
const REFUSAL_MEMORY: Duration = Duration::from_secs(60);

/// Why one batch attempt failed; its rows stay pending.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("postgres: {0}")]
    Database(String),
    #[error("rabbitmq: {0}")]
    Broker(String),
    /// Part of the configured topology is gone; reported through the
    /// broker state, not per batch.
    #[error("rabbitmq topology: {0}")]
    Topology(String),
    #[error("stopping")]
    Stopping,
}

impl From<tokio_postgres::Error> for BatchError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The only unsupported feature the relay's own prepared statements
        // can meet: a column they read changed type (`db::outbox`).
        if db::transaction_pooler_seen(&e) {
            return Self::Database(format!(
                "{}: the session's transactions run on different server sessions (a transaction pooler); \
                 the next session keeps nothing across transactions",
                describe(&e)
            ));
        }
        if e.code() == Some(&SqlState::FEATURE_NOT_SUPPORTED) {
            return Self::Database(format!(
                "the outbox's columns changed under the prepared statements ({}); \
                 their types are read again on a new session",
                describe(&e)
            ));
        }
        // A session fault: the batch fails (the session is always dropped
        // after a failed batch) and the new one goes to the writable server.
        if db::is_read_only(&e) {
            return Self::Database(format!(
                "the server is read-only, a standby or a demoted primary ({}); \
                 reconnecting to the server that accepts writes",
                describe(&e)
            ));
        }
        Self::Database(describe(&e))
    }
}

/// What one committed batch did.
#[derive(Debug, Default)]
struct BatchSummary {
    claimed: usize,
    deferred: usize,
    nacked: usize,
    /// Part of the configured topology is gone: a message on a configured
    /// route came back unroutable, or its exchange is missing or refused.
    topology_fault: Option<String>,
    /// A message on a configured route was confirmed: the topology works.
    configured_route_confirmed: bool,
    wrapped: bool,
    channel_failure: Option<ChannelFailure>,
    /// An exchange named by a row whose messages the broker refused, with
    /// the broker's words.
    refused_exchange: Option<(String, String)>,
}

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
}

/// What a relay's workers share.
#[derive(Clone)]
pub struct Shared {
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
}

/// Rows the database refuses any update of (a trigger or constraint that
/// fires on every UPDATE of the row): neither marking them transferred nor
/// recording their failure works, so they would be published again at every
/// claim, without delay, forever. Their attempts are kept here instead, by
/// the rule the table's bookkeeping follows (a doubling delay, held after
/// `relay.max_attempts`), for the life of the relay process: the table is
/// untouched, so the row stays pending there, and a restart (or another
/// instance) starts counting again.
#[derive(Debug, Default)]
pub struct Unwritable(std::sync::Mutex<HashMap<String, UnwritableRow>>);

/// One row in [`Unwritable`].
#[derive(Debug)]
struct UnwritableRow {
    attempts: u32,
    next_attempt: Instant,
    held: bool,
}

impl Unwritable {
    fn rows(&self) -> std::sync::MutexGuard<'_, HashMap<String, UnwritableRow>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `id` waits out a delay or is held: not to be published now.
    fn waiting(rows: &HashMap<String, UnwritableRow>, id: &str) -> bool {
        rows.get(id)
            .is_some_and(|r| r.held || r.next_attempt > Instant::now())
    }

    /// Charges one failed attempt to `id` under `relay`'s rule (its
    /// `attempt_delay`, `max_retry_delay` and `max_attempts`); returns
    /// `(attempts, held)`.
    fn charge(&self, id: &str, relay: &RelayConfig) -> (u32, bool) {
        let rule = (
            relay.attempt_delay,
            relay.max_retry_delay,
            relay.max_attempts,
        );
        self.charge_by(id, rule)
    }

    fn charge_by(
        &self,
        id: &str,
        (delay, cap, max_attempts): (Duration, Duration, u32),
    ) -> (u32, bool) {
        let mut rows = self.rows();
        let row = rows.entry(id.to_owned()).or_insert(UnwritableRow {
            attempts: 0,
            next_attempt: Instant::now(),
            held: false,
        });
        row.attempts = row.attempts.saturating_add(1);
        // The delay doubles per earlier attempt up to the cap, as on the table.
        let doublings = row.attempts.saturating_sub(1).min(31);
        row.next_attempt = Instant::now() + delay.saturating_mul(1u32 << doublings).min(cap);
        row.held = row.attempts >= max_attempts;
        (row.attempts, row.held)
    }

    /// Forgets the rows in `ids`: they were marked or recorded on the table.
    fn forget<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut rows = self.rows();
        if !rows.is_empty() {
            for id in ids {
                rows.remove(id);
            }
        }
    }
}

/// The position of a relay's claims in the backlog, shared by its workers.
/// Claims walk the pending rows in claim order (oldest first) from here and
/// wrap around at the end, so no row waits longer than one pass, however
/// large the backlog.
#[derive(Debug, Default)]
pub struct ClaimCursor(tokio::sync::Mutex<Option<ClaimPosition>>);

impl Worker {
    /// Worker number `index` of a relay.
    pub fn new(index: usize, shared: Shared, backoff: Backoff) -> Self {
        let Shared {
            config,
            outbox,
            broker,
            wake,
            cursor,
            metrics,
            unwritable,
        } = shared;
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
        }
    }

    /// Relays batches whenever woken, until `token` is cancelled. A batch in
    /// flight is always finished (confirmed and committed, or rolled back).
    pub async fn run(mut self, token: CancellationToken) {
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                () = self.wake.notified() => {}
            }
            while !token.is_cancelled() {
                match self
                    .relay_batch(&token)
                    .await
                    .and_then(|s| self.after_commit(s))
                {
                    Ok(more) => {
                        self.metrics.batch_worked();
                        self.backoff.reset();
                        if !more {
                            break;
                        }
                        // More is waiting: bring in another worker as well.
                        self.wake.notify_one();
                    }
                    Err(BatchError::Stopping) => return,
                    Err(error) => {
                        self.metrics.batch_failed();
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

    /// Reacts to what a committed batch reported; `Ok(true)` when more rows
    /// are known to be waiting.
    fn after_commit(&mut self, summary: BatchSummary) -> Result<bool, BatchError> {
        if let Some((exchange, reason)) = summary.refused_exchange {
            warn!(%exchange, %reason, "the broker refused an exchange named by rows; those rows fail without being published for a while");
            self.refused.insert(exchange, (reason, Instant::now()));
        }
        if let Some(reason) = summary.topology_fault {
            self.report_topology_fault(&reason);
            return Err(BatchError::Topology(reason));
        }
        if summary.configured_route_confirmed {
            self.clear_topology_fault();
        }
        if let Some(failure) = summary.channel_failure {
            self.publisher = None;
            return Err(BatchError::Broker(failure.to_string()));
        }
        if summary.nacked > 0 {
            return Err(BatchError::Broker(format!(
                "broker nacked {} messages (a queue limit with overflow reject-publish, or a broker fault)",
                summary.nacked
            )));
        }
        Ok(summary.claimed >= self.config.relay.batch_size
            || summary.deferred > 0
            || summary.wrapped)
    }

    /// Claims, publishes, marks and records one batch, then commits.
    async fn relay_batch(&mut self, token: &CancellationToken) -> Result<BatchSummary, BatchError> {
        self.ensure_publisher(token).await?;
        self.ensure_session().await?;
        let (Some(publisher), Some((client, statements))) =
            (&mut self.publisher, &mut self.session)
        else {
            unreachable!("ensured above");
        };
        let config = &self.config;
        let router = &self.router;
        let refused = &self.refused;
        let metrics = &self.metrics;
        let broker = &self.broker;
        let cursor = &self.cursor;
        let unwritable = &self.unwritable;
        let index = self.index;
        let limit = config.postgres.query_timeout;
        let settings = self.transaction_settings.as_deref();
        let result = async {
            let relay = &config.relay;
            let batch_size = i64::try_from(relay.batch_size).unwrap_or(i64::MAX);
            let max_message = i64::try_from(relay.max_message_bytes).unwrap_or(i64::MAX);
            let max_batch = i64::try_from(relay.max_batch_bytes).unwrap_or(i64::MAX);
            let started = Instant::now();
            let tx = within(limit, client.transaction()).await?;
            let (plan, wrapped, rows, bodies) = {
                // One claim at a time per relay: consecutive claims take
                // adjacent ranges instead of wading through each other's rows.
                let mut position = cursor.0.lock().await;
                let claim = async {
                    match position.as_ref() {
                        None => {
                            let params: [&(dyn ToSql + Sync); 3] = [&batch_size, &max_message, &max_batch];
                            statements.claim_first.run(&tx, &params).await
                        }
                        Some(after) => {
                            let params: [&(dyn ToSql + Sync); 5] =
                                [&batch_size, &max_message, &max_batch, &after.enqueued_at, &after.id];
                            statements.claim_after.run(&tx, &params).await
                        }
                    }
                };
                let rows = match settings {
                    // Behind a transaction pooler the session's settings
                    // last one transaction: set them with the claim, in the
                    // same round trip (both go out before either answer).
                    Some(settings) => {
                        within(limit, async {
                            let (set, rows) = tokio::join!(tx.batch_execute(settings), claim);
                            set.and(rows)
                        })
                        .await?
                    }
                    // Named statements: the claim must run on the server
                    // session they were prepared on (asked in the same
                    // round trip); on another, the same names may be
                    // another client's statements, and the transaction is
                    // rolled back before anything is published.
                    None => match statements.server {
                        Some(prepared_on) => {
                            within(limit, async {
                                let (server, rows) =
                                    tokio::join!(tx.query_typed_one(outbox::SERVER_SESSION_SQL, &[]), claim);
                                Ok((server?.get::<_, i32>(0), rows?))
                            })
                            .await
                            .and_then(|(server, rows)| {
                                if server == prepared_on {
                                    Ok(rows)
                                } else {
                                    Err(moved_server_session(prepared_on, server))
                                }
                            })?
                        }
                        None => within(limit, claim).await?,
                    },
                };
                let (rows, bodies): (Vec<ClaimedRow>, Vec<Option<Fetched>>) =
                    rows.iter().map(ClaimedRow::decode).collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
                let plan = plan(&rows, relay.max_message_bytes, relay.max_batch_bytes);
                // A short claim after a cursor reached the end of the
                // backlog: the next claim starts a new pass from the oldest.
                let wrapped = position.is_some() && plan.claimed < relay.batch_size;
                if wrapped {
                    *position = None;
                } else if plan.cursor.is_some() {
                    position.clone_from(&plan.cursor);
                }
                (plan, wrapped, rows, bodies)
            };
            let mut summary = BatchSummary {
                wrapped,
                claimed: plan.claimed,
                ..BatchSummary::default()
            };
            if plan.claimed == 0 {
                return Ok(summary);
            }
            let (mut fetched, withheld) = take_bodies(&plan, &rows, bodies);
            if !withheld.is_empty() {
                let rows = within(limit, statements.bodies.run(&tx, &[&withheld])).await?;
                for row in &rows {
                    fetched.push(Fetched::from_row(row)?);
                }
            }
            let claimed_at = started.elapsed();
            let mut batch = assemble(plan, fetched, router);
            // Exchanges named by rows that would close the channel: rows
            // naming them fail alone instead of failing the batch.
            // Bounded: a broker that blocks publishing holds these questions
            // back too, and nothing is published yet, so giving up is free.
            let missing = tokio::time::timeout(relay.confirm_timeout, publisher.missing_exchanges(&batch.messages))
                .await
                .map_err(|_| BatchError::Broker("no answer about the exchanges rows name".into()))?;
            let mut unusable: HashMap<String, Hold> = missing
                .map_err(BatchError::Broker)?
                .into_iter()
                .map(|x| (x.clone(), Hold::NoExchange(x)))
                .collect();
            for (exchange, (reason, at)) in refused {
                if at.elapsed() < REFUSAL_MEMORY {
                    unusable.entry(exchange.clone()).or_insert_with(|| Hold::RefusedExchange {
                        exchange: exchange.clone(),
                        reason: reason.clone(),
                    });
                }
            }
            if !unusable.is_empty() {
                let (held, publishable): (Vec<Message>, Vec<Message>) =
                    batch.messages.into_iter().partition(|m| {
                        m.destination.exchange_from_row
                            && unusable.contains_key(m.destination.exchange.as_str())
                    });
                batch.messages = publishable;
                batch.held.extend(held.into_iter().map(|m| {
                    let hold = unusable[m.destination.exchange.as_str()].clone();
                    (m.id, hold)
                }));
            }
            // Rows whose failures only this process remembers: not published
            // while they wait out their delay or are held.
            {
                let rows = unwritable.rows();
                if !rows.is_empty() {
                    batch.messages.retain(|m| !Unwritable::waiting(&rows, &m.id));
                    batch.held.retain(|(id, _)| !Unwritable::waiting(&rows, id));
                }
            }
            // While a blocked broker holds the confirms back, a statement
            // now and then keeps PostgreSQL from ending the claim session as
            // idle in transaction (and releasing rows already published).
            let paused = || broker.borrow().blocked;
            let keep_alive = || {
                let tx = &tx;
                async move { within(limit, tx.batch_execute("SELECT 1")).await.is_ok() }
            };
            let mut report = publisher
                .publish_batch(&batch.messages, relay.confirm_timeout, paused, keep_alive)
                .await;
            publisher
                .isolate(&batch.messages, &mut report, relay.confirm_timeout, paused, keep_alive)
                .await;
            let confirmed_at = started.elapsed();
            let confirmed = report.confirmed(&batch.messages);

            let mut failed: Vec<(&str, String)> = Vec::new();
            for (id, hold) in &batch.held {
                match hold {
                    Hold::Deferred => summary.deferred += 1,
                    _ => failed.push((id, hold.reason())),
                }
            }
            for (message, delivery) in batch.messages.iter().zip(&report.deliveries) {
                let d = &message.destination;
                match delivery {
                    // A configured route that routes nowhere: the queue is
                    // gone, not the row's fault. The row stays pending.
                    Delivery::Returned { code, text } if d.configured => {
                        summary.topology_fault.get_or_insert_with(|| format!(
                            "messages on the configured route (exchange '{}', routing key '{}') come back unroutable: {code} {text}; \
                             the queue it should reach is missing or unbound",
                            d.exchange, d.routing_key
                        ));
                    }
                    Delivery::Returned { code, text } => {
                        let reason = format!(
                            "returned by the broker as unroutable: {code} {text} (exchange '{}', routing key '{}')",
                            d.exchange, d.routing_key
                        );
                        failed.push((&message.id, reason));
                    }
                    Delivery::Refused(error) => {
                        let kind = soft_kind(error);
                        let about_exchange =
                            matches!(kind, Some(AMQPSoftError::NOTFOUND | AMQPSoftError::ACCESSREFUSED));
                        let words = error.get_message().to_string();
                        if about_exchange && !d.exchange_from_row {
                            summary.topology_fault.get_or_insert_with(|| format!(
                                "the broker refused publishing to the configured exchange '{}' ({words})",
                                d.exchange
                            ));
                        } else if about_exchange {
                            if kind == Some(&AMQPSoftError::ACCESSREFUSED) {
                                summary.refused_exchange = Some((d.exchange.to_string(), words.clone()));
                            }
                            let hold = Hold::RefusedExchange { exchange: d.exchange.to_string(), reason: words };
                            failed.push((&message.id, hold.reason()));
                        } else {
                            failed.push((&message.id, format!("the broker refused the message: {} {words}", error.get_id())));
                        }
                    }
                    Delivery::IdTooLong => failed.push((&message.id, Hold::IdTooLong.reason())),
                    Delivery::Nacked => summary.nacked += 1,
                    Delivery::Unknown(reason) => {
                        debug!(message_id = %message.id, %reason, "confirm unknown; the row stays pending");
                    }
                    Delivery::Confirmed => summary.configured_route_confirmed |= d.configured,
                }
            }

            let txr = &tx;
            let mut unmarked: Vec<&str> = Vec::new();
            if !confirmed.is_empty() {
                let mark = &statements.mark;
                let (marked, refused) = row_by_row(txr, limit, &confirmed, |ids: &[&&str]| {
                    let ids: Vec<&str> = ids.iter().map(|id| **id).collect();
                    async move { mark.run(txr, &[&ids]).await }
                })
                .await?;
                let marked: HashSet<String> = marked.iter().map(|r| r.get(0)).collect();
                for (id, words) in refused {
                    unmarked.push(id);
                    failed.push((id, format!(
                        "published and confirmed, but the database refused to mark it transferred: {words}; \
                         it is published again after a delay"
                    )));
                }
                // Skipped without an error (a BEFORE UPDATE trigger returning
                // NULL, a rule, a row-level security policy): the same rule.
                let skipped: Vec<&str> = confirmed
                    .iter()
                    .copied()
                    .filter(|id| !marked.contains(*id) && !unmarked.contains(id))
                    .collect();
                for id in skipped {
                    unmarked.push(id);
                    failed.push((id, "published and confirmed, but marking it transferred updated no row \
                         (a BEFORE UPDATE trigger returning NULL, a rule or a row-level security policy skips it); \
                         it is published again after a delay".to_owned()));
                }
            }
            let mut recorded: Vec<(String, bool, i32)> = Vec::new();
            // Rows whose failure the database refused to record either:
            // (id, the database's words, attempts, held), kept in memory.
            let mut remembered: Vec<(&str, String, u32, bool)> = Vec::new();
            if !failed.is_empty() {
                let delay_ms = relay.attempt_delay.as_secs_f64() * 1000.0;
                let cap_ms = relay.max_retry_delay.as_secs_f64() * 1000.0;
                let max_attempts = i32::try_from(relay.max_attempts).unwrap_or(i32::MAX);
                let fail = &statements.fail;
                let (rows, refused) = row_by_row(txr, limit, &failed, |rows: &[&(&str, String)]| {
                    let ids: Vec<&str> = rows.iter().map(|(id, _)| *id).collect();
                    let reasons: Vec<String> = rows.iter().map(|(_, r)| r.clone()).collect();
                    async move {
                        fail.run(txr, &[&ids, &reasons, &delay_ms, &cap_ms, &max_attempts]).await
                    }
                })
                .await?;
                recorded = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
                let skipped = failed.iter().filter(|(id, _)| {
                    !recorded.iter().any(|(r, _, _)| r == id) && !refused.iter().any(|((r, _), _)| r == id)
                });
                let skipped: Vec<(&(&str, String), String)> = skipped
                    .map(|row| (row, "the update recording it changed no row".to_owned()))
                    .collect();
                for ((id, _), words) in refused.into_iter().chain(skipped) {
                    let (attempts, held) = unwritable.charge(id, relay);
                    remembered.push((id, words, attempts, held));
                }
            }
            let marked_at = started.elapsed();
            within(limit, tx.commit()).await?;
            let committed_at = started.elapsed();
            unwritable.forget(
                confirmed
                    .iter()
                    .copied()
                    .filter(|id| !unmarked.contains(id))
                    .chain(recorded.iter().map(|(id, _, _)| id.as_str())),
            );

            let published = report.deliveries.iter().filter(|d| **d != Delivery::IdTooLong).count();
            let returned =
                report.deliveries.iter().filter(|d| matches!(d, Delivery::Returned { .. })).count();
            metrics.batch_committed();
            metrics.batch_size.observe(batch.claimed as f64);
            metrics.claim_seconds.observe(claimed_at.as_secs_f64());
            if published > 0 {
                metrics.confirm_seconds.observe((confirmed_at - claimed_at).as_secs_f64());
            }
            metrics.published.inc_by(published as u64);
            metrics.confirmed.inc_by(confirmed.len() as u64);
            metrics.nacked.inc_by(summary.nacked as u64);
            metrics.returned.inc_by(returned as u64);
            metrics.failed.inc_by(failed.len() as u64);
            metrics.parked.inc_by(recorded.iter().filter(|(_, parked, _)| *parked).count() as u64);
            metrics.parked.inc_by(remembered.iter().filter(|(_, _, _, held)| *held).count() as u64);

            for (id, reason) in &failed {
                if let Some((_, words, attempt, held)) = remembered.iter().find(|(r, ..)| r == id) {
                    if *held {
                        error!(
                            message_id = %id, %reason, recording_refused = %words, attempt,
                            "row held in memory after repeated failures: the database refuses any update of it, \
                             so it stays pending in the table; fix the trigger or constraint, then restart the relay"
                        );
                    } else {
                        warn!(
                            message_id = %id, %reason, recording_refused = %words, attempt,
                            "row failed and the database refuses to record that on the row; \
                             this relay counts its attempts in memory and retries it after a delay"
                        );
                    }
                    continue;
                }
                let (parked, attempt) = recorded
                    .iter()
                    .find(|(r, _, _)| r == id)
                    .map_or((false, 0), |(_, parked, attempts)| (*parked, *attempts));
                if parked {
                    error!(
                        message_id = %id, %reason, attempt,
                        "row parked after repeated failures; fix it and run `pushoccurrence requeue`"
                    );
                } else {
                    warn!(message_id = %id, %reason, attempt, "row failed; it will be retried after a delay");
                }
            }
            debug!(
                worker = index,
                claimed = batch.claimed,
                marked = confirmed.len() - unmarked.len(),
                failed = failed.len(),
                claim_ms = claimed_at.as_secs_f64() * 1e3,
                publish_confirm_ms = (confirmed_at - claimed_at).as_secs_f64() * 1e3,
                mark_ms = (marked_at - confirmed_at).as_secs_f64() * 1e3,
                commit_ms = (committed_at - marked_at).as_secs_f64() * 1e3,
                "batch committed"
            );
            summary.channel_failure = report.channel_failure;
            Ok(summary)
        }
        .await;
        if result.is_err() {
            // A failed or timed-out statement may leave the session unusable.
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
            .map_err(|e| BatchError::Broker(format!("open a confirm channel: {e}")))?;
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

/// Runs a statement that updates claimed rows (`run`, given the rows) for
/// all `rows` at once under a savepoint; when the server refuses it for a
/// reason of the rows' own ([`db::is_rows_own`]: a constraint, a trigger),
/// undoes it and runs it row by row, each under its own savepoint, so one
/// row the database refuses neither aborts the claim transaction (and its
/// locks) nor undoes the other rows. Returns what the statement returned
/// for the rows it updated, and the rows refused with the database's words.
/// Any other error (a lost session, a timeout, a passing condition), or one
/// the statement meets for no row at all (a revoked grant: the table's
/// fault, not a row's), fails the batch and charges nobody.
async fn row_by_row<'r, T, F, Fut>(
    tx: &tokio_postgres::Transaction<'_>,
    limit: Duration,
    rows: &'r [T],
    run: F,
) -> Result<(Vec<tokio_postgres::Row>, Vec<(&'r T, String)>), BatchError>
where
    F: Fn(&[&'r T]) -> Fut,
    Fut: Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>,
{
    // The savepoint and the statement go out together: no extra round trip
    // when nothing is refused (the usual case).
    let attempt = |subset: Vec<&'r T>| {
        let update = run(&subset);
        async move {
            let both = async {
                let (savepoint, rows) = tokio::join!(tx.batch_execute(outbox::SAVEPOINT), update);
                savepoint.and(rows)
            };
            tokio::time::timeout(limit, both)
                .await
                .map_err(|_| BatchError::Database(format!("no answer within {limit:?}")))
        }
    };
    let refused_by_row = |e: tokio_postgres::Error| {
        if db::is_rows_own(&e) {
            Ok(describe(&e))
        } else {
            Err(BatchError::from(e))
        }
    };
    match attempt(rows.iter().collect()).await? {
        Ok(returned) => return Ok((returned, Vec::new())),
        Err(e) => {
            let words = refused_by_row(e)?;
            within(limit, tx.batch_execute(outbox::ROLLBACK_TO_SAVEPOINT)).await?;
            // The statement for no row at all checks what is the table's,
            // not a row's: privileges (a revoked grant), column types. If it
            // fails too, the fault is the table's and no row is charged.
            if let Err(e) = attempt(Vec::new()).await? {
                within(limit, tx.batch_execute(outbox::ROLLBACK_TO_SAVEPOINT)).await?;
                return Err(BatchError::Database(format!(
                    "the database refuses the relay's update of the outbox itself, for any row: {}",
                    describe(&e)
                )));
            }
            if let [row] = rows {
                return Ok((Vec::new(), vec![(row, words)]));
            }
        }
    }
    let mut returned = Vec::new();
    let mut refused = Vec::new();
    for row in rows {
        match attempt(vec![row]).await? {
            Ok(r) => returned.extend(r),
            Err(e) => {
                refused.push((row, refused_by_row(e)?));
                within(limit, tx.batch_execute(outbox::ROLLBACK_TO_SAVEPOINT)).await?;
            }
        }
    }
    Ok((returned, refused))
}

/// [`within`] for calls that read or check the outbox's columns.
async fn within_schema<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, SchemaError>>,
) -> Result<T, BatchError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(SchemaError::Query(e))) => Err(e.into()),
        Ok(Err(e)) => Err(BatchError::Database(e.to_string())),
        Err(_) => Err(BatchError::Database(format!("no answer within {limit:?}"))),
    }
}

/// A claim transaction of a session with named statements ran on server
/// session `ran_on`, not on `prepared_on` where they were prepared: a
/// transaction pooler the config does not name ([`db::transaction_pooler_found`]).
fn moved_server_session(prepared_on: i32, ran_on: i32) -> BatchError {
    let sign = format!(
        "a claim transaction ran on server session {ran_on}, its statements were prepared on {prepared_on}"
    );
    db::transaction_pooler_found(&sign);
    BatchError::Database(format!(
        "{sign} (a transaction pooler): rolled back before anything was published, since the statements \
         of that name there may be another client's; the next session keeps nothing across transactions"
    ))
}

/// Runs one database call with a deadline: a stalled link must not hang the
/// worker (TCP keepalives cannot see a peer that acknowledges and never answers).
async fn within<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, BatchError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(BatchError::Database(format!("no answer within {limit:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_the_database_will_not_update_follow_the_attempt_rule_in_memory() {
        let memory = Unwritable::default();
        let rule = (Duration::from_secs(3600), Duration::from_secs(7200), 3);
        assert!(!Unwritable::waiting(&memory.rows(), "a"));
        assert_eq!(memory.charge_by("a", rule), (1, false));
        // Waiting out its delay: not published.
        assert!(Unwritable::waiting(&memory.rows(), "a"));
        assert!(!Unwritable::waiting(&memory.rows(), "b"));
        assert_eq!(memory.charge_by("a", rule), (2, false));
        assert_eq!(memory.charge_by("a", rule), (3, true));
        // Past any delay, a held row stays held; huge counts do not overflow.
        let now = (Duration::ZERO, Duration::ZERO, u32::MAX);
        assert_eq!(memory.charge_by("b", now), (1, false));
        assert!(!Unwritable::waiting(&memory.rows(), "b"));
        memory.rows().get_mut("b").unwrap().attempts = u32::MAX - 1;
        assert_eq!(memory.charge_by("b", now), (u32::MAX, true));
        assert!(Unwritable::waiting(&memory.rows(), "b"));
        // Marked or recorded on the table: forgotten.
        memory.forget(["a", "b"]);
        assert!(memory.rows().is_empty());
    }
}
