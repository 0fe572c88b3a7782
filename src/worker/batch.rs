//! One batch as named steps, in one claim transaction: [`Steps::claim`]
//! (and plan, and move the shared cursor), [`Steps::read_bodies`], assemble
//! (the planner), [`Steps::screen`], hold the rest of a key behind a row not
//! published (the planner), [`Steps::publish`], [`classify`],
//! [`Steps::mark`], [`Steps::record_failures`], commit. What the batch did
//! comes out as a [`BatchOutcome`], which is counted and logged in one
//! place ([`BatchOutcome::report`]) and tells the worker what to react to.
//!
//! Nothing here decides alone what a row deserves: the planner holds bad
//! input, [`classify`] reads the broker's answers, and the database's
//! refusals are sorted by SQLSTATE ([`db::is_rows_own`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use lapin::protocol::AMQPSoftError;
use tokio::sync::watch;
use tokio_postgres::{Client, Transaction};
use tracing::{debug, error, warn};

use super::error::{BatchError, BrokerFault, DatabaseFault, within};
use super::unwritable::Unwritable;
use crate::amqp::soft_kind;
use crate::config::RelayConfig;
use crate::db::outbox::{
    self, AttemptRule, CLAIM_WINDOW_FACTOR, Claim, ClaimLimits, ClaimPosition, ClaimedRow, Fetched,
    MAX_CONTINUED_KEYS, RecordedFailure, SERVER_SESSION_SQL, Statements,
};
use crate::db::{self, describe};
use crate::metrics::Metrics;
use crate::mq::BrokerState;
use crate::mq::publisher::{BatchReport, ChannelFailure, Delivery, Message, Publisher};
use crate::planner::{Assembled, Hold, Plan, assemble, hold_behind_keys, plan, take_bodies};
use crate::routing::Router;

/// The target of the batch's log lines: the worker's (`pushoccurrence::worker`,
/// what its lines were logged under before the batch had a file of its own),
/// since operators filter and alert on it (JSON logs carry it as `target`).
const LOG_TARGET: &str = "pushoccurrence::worker";

/// How long rows naming an exchange the broker refused fail without being
/// published; after it, one more try shows whether the refusal still holds.
const REFUSAL_MEMORY: Duration = Duration::from_secs(60);

/// Where a relay's claims stand, shared by its workers. A keyed claim holds
/// it for its whole statement (one keyed claim at a time per relay, so the
/// continued keys and the window are the relay's, not a worker's); claims
/// of unkeyed rows only ([`Outbox::unkeyed_claim_sql`]) run side by side,
/// passing over each other's rows with `SKIP LOCKED`: far from PostgreSQL
/// a claim is mostly its round trip, and one at a time capped the relay at
/// one batch per round trip (at 5 ms, 12 400 msg/s where lapin's bare
/// publisher reached 21 000).
///
/// [`Outbox::unkeyed_claim_sql`]: crate::db::outbox::Outbox::unkeyed_claim_sql
#[derive(Debug, Default)]
pub struct ClaimCursor(tokio::sync::Mutex<CursorState>);

impl ClaimCursor {
    /// `worker` stops claiming for now (fewer batches wanted, or a failed
    /// batch's back-off), its batch ended: keyed rows its last claim met
    /// go with any worker's next claim instead of waiting for it.
    pub async fn hand_over(&self, worker: usize) {
        self.0.lock().await.hand_over(worker);
    }
}

#[derive(Debug, Default)]
struct CursorState {
    /// The position in the backlog. Claims walk the pending rows in claim
    /// order (oldest first) from here and wrap around at the end, so no row
    /// waits longer than one pass, however large the backlog.
    position: Option<ClaimPosition>,
    /// How many times the batch size the next claim's window is: doubled
    /// after each claim that took nothing from a full window (a deep
    /// backlog of rows behind their keys' heads is crossed in a few claims,
    /// not one window per wake-up), back to [`CLAIM_WINDOW_FACTOR`] once a
    /// claim takes rows or the backlog's end is reached.
    window_factor: i64,
    /// The keys each worker's last claim took in a run, which every claim
    /// continues ([`MAX_CONTINUED_KEYS`] in all).
    run_keys: HashMap<usize, Vec<String>>,
    /// The last claim in each key's order met no keyed row: claims take
    /// the cheaper claim of unkeyed rows until one meets a keyed row.
    /// False at first, so a relay's first claim finds out.
    no_keyed_rows: bool,
    /// Where each worker's next claim starts at the latest, in each key's
    /// order: a claim of unkeyed rows of that worker met keyed rows, which
    /// its batch holds until it commits, and other workers' claims may pass
    /// them meanwhile.
    start_over: HashMap<usize, Option<ClaimPosition>>,
    /// The start-over of a worker that stopped claiming for now (fewer
    /// batches wanted, a failed batch's back-off), for any worker's next
    /// claim: its batch has ended.
    handed_over: Option<Option<ClaimPosition>>,
    /// Counts the passes: a new one starts when a claim reaches the end of
    /// the backlog. A claim that started in an earlier pass than the
    /// current one (claims of unkeyed rows overlap) leaves the position as
    /// the newer claim set it.
    pass: u64,
}

/// What a claim started from: the cursor as it read it.
#[derive(Debug)]
struct ClaimStart {
    /// In each key's order ([`Outbox::claim_sql`]), under the cursor's lock.
    ///
    /// [`Outbox::claim_sql`]: crate::db::outbox::Outbox::claim_sql
    keyed: bool,
    /// The worker whose claim this is.
    worker: usize,
    /// It starts over where a claim of unkeyed rows met keyed rows: once
    /// it has settled, that start-over is done (a claim that fails leaves
    /// it for the next).
    started_over: bool,
    pass: u64,
    after: Option<ClaimPosition>,
    window_factor: i64,
    continued: Vec<String>,
}

/// Where a claim ended, as [`CursorState::settle`] reads it.
#[derive(Debug)]
struct ClaimEnd<'a> {
    /// It took a whole batch.
    full: bool,
    /// Rows it took.
    claimed: usize,
    /// Past its last row.
    next: Option<&'a ClaimPosition>,
    /// Its window's last row, for a short claim whose window was full.
    window_end: Option<&'a ClaimPosition>,
    /// It met keyed rows ([`Claim::keyed`]).
    ///
    /// [`Claim::keyed`]: crate::db::outbox::Claim::keyed
    keyed: bool,
}

/// How a claim moved the cursor.
#[derive(Debug, PartialEq, Eq)]
struct Moved {
    /// The next claim starts over: a new pass from the oldest row, or
    /// where a claim of unkeyed rows that met keyed rows started.
    wrapped: bool,
    /// The next claim looks past this one's window.
    advanced: bool,
}

/// The largest window, in batch sizes.
const MAX_WINDOW_FACTOR: i64 = 64;

/// The earlier of two positions; `None`, the backlog's start, is earliest.
fn earliest(a: Option<ClaimPosition>, b: Option<ClaimPosition>) -> Option<ClaimPosition> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.is_after(&a) { a } else { b }),
        _ => None,
    }
}

/// A start-over from `from`, joined with the one already waiting, if any:
/// the earlier of the two.
fn start_over_from(
    waiting: Option<Option<ClaimPosition>>,
    from: Option<ClaimPosition>,
) -> Option<ClaimPosition> {
    match waiting {
        Some(waiting) => earliest(waiting, from),
        None => from,
    }
}

impl CursorState {
    /// What the next claim starts from.
    fn begin(&self) -> ClaimStart {
        ClaimStart {
            keyed: !self.no_keyed_rows,
            worker: 0,
            started_over: false,
            pass: self.pass,
            after: self.position.clone(),
            window_factor: self.window_factor.max(CLAIM_WINDOW_FACTOR),
            continued: self.continued_keys(),
        }
    }

    /// What `worker`'s next claim starts from: as [`CursorState::begin`]
    /// says, or, in each key's order, earlier where a claim of unkeyed rows
    /// of this worker (or of one that stopped) met keyed rows: its batch
    /// has ended since, so they are free.
    fn begin_for(&mut self, worker: usize) -> ClaimStart {
        let mut start = self.begin();
        start.worker = worker;
        let own = self.start_over.get(&worker).cloned();
        let from = match own {
            Some(own) => Some(start_over_from(self.handed_over.clone(), own)),
            None => self.handed_over.clone(),
        };
        if let Some(from) = from {
            start.after = earliest(start.after, from);
            start.keyed = true;
            start.started_over = true;
        }
        start
    }

    /// Hands `worker`'s start-over to any worker's next claim: it stops
    /// claiming for now, after its batch ended.
    fn hand_over(&mut self, worker: usize) {
        if let Some(from) = self.start_over.remove(&worker) {
            self.handed_over = Some(start_over_from(self.handed_over.take(), from));
        }
    }

    /// Moves the cursor after a claim that started at `start` and ended at
    /// `end`, unless a newer pass began meanwhile.
    fn settle(&mut self, start: &ClaimStart, end: &ClaimEnd<'_>) -> Moved {
        if start.started_over {
            // A keyed claim: it held the cursor since it began, so these
            // are the start-overs it began from.
            self.start_over.remove(&start.worker);
            self.handed_over = None;
        }
        // A short claim whose window did not fill reached the end of the
        // backlog: the next claim starts a new pass from the oldest.
        let reached_end = !end.full && end.window_end.is_none();
        let wrapped = start.after.is_some() && reached_end;
        // A short claim whose window filled looked at rows it could not
        // take (the rows behind their keys' heads, rows other sessions
        // hold): the next claim looks past them.
        let advanced = !end.full && end.window_end.is_some();
        if !start.keyed && end.keyed {
            // A claim of unkeyed rows met keyed rows and handed on only the
            // unkeyed ones; it took fewer rows than it locked, so it says
            // nothing of the backlog's end, and the position stays. Claims
            // go in each key's order from now on, and this worker's next
            // claim, at once and after its batch has committed, starts where
            // this one did: the keyed rows go now, not after the pass. This
            // holds for a claim of an earlier pass too: nothing else would
            // notice the rows it met.
            self.no_keyed_rows = false;
            let from = start_over_from(self.start_over.remove(&start.worker), start.after.clone());
            self.start_over.insert(start.worker, from);
            return Moved {
                wrapped: true,
                advanced: false,
            };
        }
        if self.pass != start.pass {
            return Moved { wrapped, advanced };
        }
        if start.keyed {
            // A claim in each key's order that met no keyed row (none
            // taken, none passed over where it read its window, such as
            // rows a claim of unkeyed rows holds) hands the next claims to
            // the claim of unkeyed rows, from its position; not while keyed
            // rows a claim of unkeyed rows met wait for a start-over claim
            // (they may lie behind the position, where no claim looks).
            self.no_keyed_rows =
                !end.keyed && self.start_over.is_empty() && self.handed_over.is_none();
        }
        if wrapped {
            self.position = None;
            self.pass += 1;
        } else if end.full {
            // Only forward: the heads of continued keys sort before the
            // cursor, and a claim of those alone must not send the next
            // claims back over rows already looked at; nor may a claim of
            // unkeyed rows that ended before another that overlapped it.
            self.move_forward(end.next);
        } else {
            // Forward only too: a claim that started over from an earlier
            // position looked at rows the cursor has passed.
            self.move_forward(end.window_end);
        }
        self.window_factor = if advanced && end.claimed == 0 {
            (start.window_factor * 2).min(MAX_WINDOW_FACTOR)
        } else {
            CLAIM_WINDOW_FACTOR
        };
        Moved { wrapped, advanced }
    }

    /// Moves the position to `to`, if that is past it.
    fn move_forward(&mut self, to: Option<&ClaimPosition>) {
        if let Some(to) = to
            && self.position.as_ref().is_none_or(|at| to.is_after(at))
        {
            self.position = Some(to.clone());
        }
    }

    /// The keys the next claim continues: every worker's last runs.
    fn continued_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for key in self.run_keys.values().flatten() {
            if keys.len() == MAX_CONTINUED_KEYS {
                break;
            }
            if !keys.contains(key) {
                keys.push(key.clone());
            }
        }
        keys
    }
}

/// What the steps of one batch read, borrowed from the worker for the batch.
pub(super) struct Steps<'w> {
    /// `relay.*`: confirm timeout, batch size, byte limits.
    pub relay: &'w RelayConfig,
    /// How long any one statement may take (`postgres.query_timeout_ms`).
    pub query_timeout: Duration,
    /// The claim session's statements.
    pub statements: &'w Statements,
    /// Behind a transaction pooler: the claim session's settings, sent
    /// with every claim.
    pub transaction_settings: Option<&'w str>,
    /// Each message's exchange, routing key and properties.
    pub router: &'w Router,
    /// The broker link's state: whether an alarm holds the confirms back.
    pub broker: &'w watch::Receiver<BrokerState>,
    /// Where the relay's next claim starts.
    pub cursor: &'w ClaimCursor,
    /// Exchanges named by rows that the broker refused, with why and when.
    pub refused: &'w HashMap<String, (String, Instant)>,
    /// Rows whose failures only this process can count.
    pub unwritable: &'w Unwritable,
    /// The worker's number, under which the cursor keeps its runs' keys.
    pub worker: usize,
}

/// What one batch did: counted and logged by [`BatchOutcome::report`], and
/// what the worker reacts to once it committed.
#[derive(Debug, Default)]
pub(super) struct BatchOutcome {
    /// Distinct ids claimed; none means nothing was written or committed.
    pub claimed: usize,
    /// The claim reached the end of the backlog, or found keyed rows
    /// written since the last claim: the next one starts a new pass.
    pub wrapped: bool,
    /// The claim was short but the backlog goes on past what it looked at
    /// (rows behind their keys' heads, rows others hold): the next claim
    /// looks further.
    pub advanced: bool,
    /// Rows held back for the batch's byte budget (not a failure).
    pub deferred: usize,
    /// Rows held back behind an earlier row of their ordering key that the
    /// batch did not publish (not a failure).
    pub behind_key: usize,
    /// Later messages of a key confirmed while an earlier one was not.
    pub ordering_breaks: Vec<OrderingBreak>,
    /// Messages handed to the broker.
    pub published: usize,
    /// Messages the broker confirmed.
    pub confirmed: usize,
    /// Confirmed rows marked transferred.
    pub marked: usize,
    /// Messages returned as unroutable.
    pub returned: usize,
    /// Messages the broker nacked.
    pub nacked: usize,
    /// Rows charged a failed attempt (on the row or in memory).
    pub failed: usize,
    /// Rows parked (on the table) or held (in memory) by this batch.
    pub parked: usize,
    /// The rows with something to say, in the order they are logged.
    pub rows: Vec<(String, RowOutcome)>,
    /// When each step ended, from the batch's start.
    pub timings: Timings,
    /// Part of the configured topology is gone: a message on a configured
    /// route came back unroutable, or its exchange is missing or refused.
    pub topology_fault: Option<String>,
    /// A message on a configured route was confirmed: the topology works.
    pub configured_route_confirmed: bool,
    /// Why the publishing channel cannot be used again, if it cannot.
    pub channel_failure: Option<ChannelFailure>,
    /// An exchange named by a row whose messages the broker refused, with
    /// the broker's words.
    pub refused_exchange: Option<(String, String)>,
}

/// What became of a claimed row the batch did not transfer, when there is
/// something to log about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RowOutcome {
    /// Whether the broker took it is unknown (the channel failed, no
    /// confirm in time): pending and uncharged.
    Unsettled {
        /// Why it is unknown.
        reason: String,
    },
    /// Failed for a reason of its own; the attempt is recorded on the row.
    Failed {
        /// Why, as stored on the row.
        reason: String,
        /// The row's attempts, this one included.
        attempt: i32,
        /// This attempt parked it.
        parked: bool,
    },
    /// Failed, and the database refused to record that on the row: the
    /// relay counts its attempts in memory ([`Unwritable`]).
    FailedInMemory {
        /// Why it failed.
        reason: String,
        /// The database's words refusing the record.
        refused: String,
        /// Its attempts in this process.
        attempt: u32,
        /// Held in memory after `relay.max_attempts`.
        held: bool,
    },
}

/// When each step of a batch ended, from the batch's start.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Timings {
    /// BEGIN answered: one round trip to PostgreSQL, next to no work.
    pub began: Duration,
    /// The claim and the bodies read.
    pub claimed: Duration,
    /// Every message published and settled.
    pub confirmed: Duration,
    /// Marks and failures written.
    pub marked: Duration,
    /// Committed.
    pub committed: Duration,
}

/// Where a batch's claim went in the backlog, for its outcome.
struct Pass {
    claimed: usize,
    wrapped: bool,
    advanced: bool,
}

/// The keys whose rows a claim took in a run behind their head, at most
/// [`MAX_CONTINUED_KEYS`].
fn run_keys(rows: &[ClaimedRow]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for row in rows.iter().filter(|r| r.in_run) {
        if let Some(key) = &row.ordering_key
            && !keys.contains(key)
            && keys.len() < MAX_CONTINUED_KEYS
        {
            keys.push(key.clone());
        }
    }
    keys
}

/// A claim, planned.
struct Claimed {
    plan: Plan,
    claim: Claim,
    wrapped: bool,
    advanced: bool,
}

/// A later message of an ordering key confirmed while an earlier one of
/// the batch was not: the consumer may see them out of order. Runs of a key
/// go out together on one channel, so a broker answer that fails one
/// message and takes the next (a return as unroutable, a nack) can break
/// the order; it is counted and logged, never hidden.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OrderingBreak {
    /// The ordering key.
    pub key: String,
    /// The earlier message, not confirmed.
    pub earlier: String,
    /// What became of it, in words.
    pub fate: String,
    /// The later message, confirmed.
    pub later: String,
}

/// A delivery's fate in words, for logs.
fn describe_delivery(delivery: &Delivery) -> String {
    match delivery {
        Delivery::Confirmed => "confirmed".to_owned(),
        Delivery::Returned { code, text } => format!("returned as unroutable ({code} {text})"),
        Delivery::Nacked => "nacked by the broker".to_owned(),
        Delivery::Unknown(reason) => format!("unconfirmed ({reason})"),
        Delivery::IdTooLong => "not published (id too long)".to_owned(),
        Delivery::Refused(error) => format!("refused by the broker ({})", error.get_message()),
    }
}

/// What the planner's holds and the broker's answers mean for the rows of
/// a batch, before anything is written.
#[derive(Debug, Default, PartialEq)]
struct Classified {
    /// Ids of the confirmed messages, to be marked transferred.
    confirmed: Vec<String>,
    /// Rows to charge an attempt, with the reason.
    failed: Vec<(String, String)>,
    /// Messages whose confirm is unknown, with why.
    unsettled: Vec<(String, String)>,
    deferred: usize,
    /// Rows held behind an earlier row of their key.
    behind_key: usize,
    ordering_breaks: Vec<OrderingBreak>,
    published: usize,
    returned: usize,
    nacked: usize,
    topology_fault: Option<String>,
    configured_route_confirmed: bool,
    refused_exchange: Option<(String, String)>,
}

/// The failures of a batch as written.
#[derive(Debug, Default)]
struct Recorded {
    /// On the rows, one entry per status row the statement updated.
    on_rows: Vec<RecordedFailure>,
    /// In memory, for rows the database refused to record them on.
    in_memory: Vec<Remembered>,
}

/// A failed row charged in memory ([`Unwritable`]).
#[derive(Debug)]
struct Remembered {
    id: String,
    /// The database's words refusing the record on the row.
    refused: String,
    attempts: u32,
    held: bool,
}

impl Steps<'_> {
    /// Claims, publishes, marks and records one batch, then commits. An
    /// empty claim ends the batch at once (nothing to commit).
    ///
    /// # Errors
    /// A step failed; nothing is committed and the rows stay pending.
    pub(super) async fn run(
        &self,
        client: &mut Client,
        publisher: &mut Publisher,
    ) -> Result<BatchOutcome, BatchError> {
        let started = Instant::now();
        let tx = within(self.query_timeout, client.transaction()).await?;
        let began_at = started.elapsed();
        let Claimed {
            plan,
            claim,
            wrapped,
            advanced,
        } = self.claim(&tx).await?;
        let claimed = plan.claimed;
        if claimed == 0 {
            return Ok(BatchOutcome {
                wrapped,
                advanced,
                ..BatchOutcome::default()
            });
        }
        let fetched = self.read_bodies(&tx, &plan, claim).await?;
        let claimed_at = started.elapsed();
        let mut batch = assemble(plan, fetched, self.router);
        self.screen(publisher, &mut batch).await?;
        hold_behind_keys(&mut batch);
        let report = self.publish(&tx, publisher, &batch.messages).await;
        let confirmed_at = started.elapsed();
        let mut classified = classify(&batch, &report);
        let unmarked = self.mark(&tx, &mut classified).await?;
        let recorded = self.record_failures(&tx, &classified.failed).await?;
        let marked_at = started.elapsed();
        within(self.query_timeout, tx.commit()).await?;
        let committed_at = started.elapsed();
        self.unwritable.forget(
            classified
                .confirmed
                .iter()
                .map(String::as_str)
                .filter(|id| !unmarked.iter().any(|u| u == id))
                .chain(recorded.on_rows.iter().map(|r| r.id.as_str())),
        );
        let timings = Timings {
            began: began_at,
            claimed: claimed_at,
            confirmed: confirmed_at,
            marked: marked_at,
            committed: committed_at,
        };
        Ok(BatchOutcome::committed(
            Pass {
                claimed,
                wrapped,
                advanced,
            },
            classified,
            unmarked.len(),
            &recorded,
            report.channel_failure,
            timings,
        ))
    }

    /// Claims the next rows after the relay's cursor, plans them and moves
    /// the cursor past them. One keyed claim at a time per relay:
    /// consecutive claims take adjacent ranges instead of wading through
    /// each other's rows ([`ClaimCursor`]).
    async fn claim(&self, tx: &Transaction<'_>) -> Result<Claimed, BatchError> {
        let relay = self.relay;
        let limits = ClaimLimits {
            rows: relay.batch_size,
            max_message_bytes: relay.max_message_bytes,
            max_batch_bytes: relay.max_batch_bytes,
        };
        let mut cursor = self.cursor.0.lock().await;
        let start = cursor.begin_for(self.worker);
        // Claims of unkeyed rows run side by side (see ClaimCursor).
        let guard = start.keyed.then_some(cursor);
        let window = i64::try_from(relay.batch_size)
            .unwrap_or(i64::MAX)
            .saturating_mul(start.window_factor);
        let claim = self.statements.claim(
            tx,
            &limits,
            start.keyed,
            window,
            start.after.as_ref(),
            &start.continued,
        );
        let claim = match self.transaction_settings {
            // Behind a transaction pooler the session's settings last one
            // transaction: set them with the claim, in the same round trip
            // (both go out before either answer).
            Some(settings) => {
                within(self.query_timeout, async {
                    let (set, claim) = tokio::join!(tx.batch_execute(settings), claim);
                    set.and(claim)
                })
                .await?
            }
            // Named statements: the claim must run on the server session
            // they were prepared on (asked in the same round trip); on
            // another, the same names may be another client's statements,
            // and the transaction is rolled back before anything is
            // published.
            None => match self.statements.prepared_on() {
                Some(prepared_on) => {
                    let (ran_on, claim) = within(self.query_timeout, async {
                        let (server, claim) =
                            tokio::join!(tx.query_typed_one(SERVER_SESSION_SQL, &[]), claim);
                        Ok((server?.try_get::<_, i32>(0)?, claim?))
                    })
                    .await?;
                    if ran_on != prepared_on {
                        db::transaction_pooler_found(&format!(
                            "a claim transaction ran on server session {ran_on}, its statements were prepared on {prepared_on}"
                        ));
                        return Err(DatabaseFault::MovedServerSession {
                            prepared_on,
                            ran_on,
                        }
                        .into());
                    }
                    claim
                }
                None => within(self.query_timeout, claim).await?,
            },
        };
        let plan = plan(&claim.rows, relay.max_message_bytes, relay.max_batch_bytes);
        let mut cursor = match guard {
            Some(cursor) => cursor,
            None => self.cursor.0.lock().await,
        };
        let Moved { wrapped, advanced } = cursor.settle(
            &start,
            &ClaimEnd {
                full: plan.claimed >= relay.batch_size,
                claimed: plan.claimed,
                next: plan.cursor.as_ref(),
                window_end: claim.window_end.as_ref(),
                keyed: claim.keyed,
            },
        );
        let runs = run_keys(&claim.rows);
        if runs.is_empty() {
            cursor.run_keys.remove(&self.worker);
        } else {
            cursor.run_keys.insert(self.worker, runs);
        }
        drop(cursor);
        Ok(Claimed {
            plan,
            claim,
            wrapped,
            advanced,
        })
    }

    /// The bodies of the planned rows: those the claim brought along, and
    /// the rare ones it withheld, read apart.
    async fn read_bodies(
        &self,
        tx: &Transaction<'_>,
        plan: &Plan,
        claim: Claim,
    ) -> Result<Vec<Fetched>, BatchError> {
        let (mut fetched, withheld) = take_bodies(plan, &claim.rows, claim.bodies);
        if !withheld.is_empty() {
            let bodies = self.statements.bodies(tx, &withheld);
            fetched.extend(within(self.query_timeout, bodies).await?);
        }
        Ok(fetched)
    }

    /// Holds back, before anything is published, the messages that would
    /// close the channel or must wait: rows naming an exchange that is
    /// missing or that the broker refused lately fail alone instead of
    /// failing the batch; rows whose failures only this process remembers
    /// stay pending, untouched, while they wait out their delay or are held.
    async fn screen(
        &self,
        publisher: &mut Publisher,
        batch: &mut Assembled,
    ) -> Result<(), BatchError> {
        // Bounded: a broker that blocks publishing holds these questions
        // back too, and nothing is published yet, so giving up is free.
        let missing = tokio::time::timeout(
            self.relay.confirm_timeout,
            publisher.missing_exchanges(&batch.messages),
        )
        .await
        .map_err(|_| BrokerFault::NoExchangeAnswer)?;
        let mut unusable: HashMap<String, Hold> = missing
            .map_err(BrokerFault::ExchangeCheck)?
            .into_iter()
            .map(|x| (x.clone(), Hold::NoExchange(x)))
            .collect();
        for (exchange, (reason, at)) in self.refused {
            if at.elapsed() < REFUSAL_MEMORY {
                unusable
                    .entry(exchange.clone())
                    .or_insert_with(|| Hold::RefusedExchange {
                        exchange: exchange.clone(),
                        reason: reason.clone(),
                    });
            }
        }
        if !unusable.is_empty() {
            let (held, publishable): (Vec<Message>, Vec<Message>) =
                std::mem::take(&mut batch.messages)
                    .into_iter()
                    .partition(|m| {
                        m.destination.exchange_from_row
                            && unusable.contains_key(m.destination.exchange.as_str())
                    });
            batch.messages = publishable;
            batch.held.extend(held.into_iter().map(|m| {
                let hold = unusable[m.destination.exchange.as_str()].clone();
                (m.id, hold)
            }));
        }
        let rows = self.unwritable.rows();
        if !rows.is_empty() {
            batch
                .messages
                .retain(|m| !Unwritable::waiting(&rows, &m.id));
            batch.held.retain(|(id, _)| !Unwritable::waiting(&rows, id));
        }
        Ok(())
    }

    /// Publishes the messages and waits for their confirms; after a
    /// channel-closing refusal, finds the message it belongs to
    /// ([`Publisher::isolate`]). While a blocked broker holds the confirms
    /// back, a statement now and then keeps PostgreSQL from ending the
    /// claim session as idle in transaction (and releasing rows already
    /// published).
    async fn publish(
        &self,
        tx: &Transaction<'_>,
        publisher: &mut Publisher,
        messages: &[Message],
    ) -> BatchReport {
        let paused = || self.broker.borrow().blocked;
        let limit = self.query_timeout;
        let keep_alive =
            || async move { within(limit, tx.batch_execute("SELECT 1")).await.is_ok() };
        let timeout = self.relay.confirm_timeout;
        let mut report = publisher
            .publish_batch(messages, timeout, paused, keep_alive)
            .await;
        publisher
            .isolate(messages, &mut report, timeout, paused, keep_alive)
            .await;
        report
    }

    /// Marks the confirmed rows transferred. A row the database refuses to
    /// mark, or skips without an error, is published again after a delay:
    /// it joins the failed rows. Returns the ids not marked.
    async fn mark(
        &self,
        tx: &Transaction<'_>,
        classified: &mut Classified,
    ) -> Result<Vec<String>, BatchError> {
        let confirmed = &classified.confirmed;
        let mut unmarked: Vec<String> = Vec::new();
        if confirmed.is_empty() {
            return Ok(unmarked);
        }
        let statements = self.statements;
        let (marked, refused) =
            row_by_row(tx, self.query_timeout, confirmed, |ids: &[&String]| {
                let ids: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
                async move { statements.mark(tx, &ids).await }
            })
            .await?;
        let marked: HashSet<String> = marked.into_iter().collect();
        for (id, words) in refused {
            unmarked.push(id.clone());
            classified.failed.push((
                id.clone(),
                format!(
                    "published and confirmed, but the database refused to mark it transferred: {words}; \
                     it is published again after a delay"
                ),
            ));
        }
        // Skipped without an error (a BEFORE UPDATE trigger returning NULL,
        // a rule, a row-level security policy): the same rule.
        let skipped: Vec<&String> = confirmed
            .iter()
            .filter(|id| !marked.contains(*id) && !unmarked.contains(id))
            .collect();
        for id in skipped {
            unmarked.push(id.clone());
            classified.failed.push((
                id.clone(),
                "published and confirmed, but marking it transferred updated no row \
                 (a BEFORE UPDATE trigger returning NULL, a rule or a row-level security policy skips it); \
                 it is published again after a delay"
                    .to_owned(),
            ));
        }
        Ok(unmarked)
    }

    /// Records a failed attempt on each failed row (a doubling delay, parked
    /// after `relay.max_attempts`). A row the database refuses to record it
    /// on, or skips, is charged in memory by the same rule ([`Unwritable`]).
    async fn record_failures(
        &self,
        tx: &Transaction<'_>,
        failed: &[(String, String)],
    ) -> Result<Recorded, BatchError> {
        let mut recorded = Recorded::default();
        if failed.is_empty() {
            return Ok(recorded);
        }
        let rule = attempt_rule(self.relay);
        let statements = self.statements;
        let (on_rows, refused) = row_by_row(
            tx,
            self.query_timeout,
            failed,
            |rows: &[&(String, String)]| {
                let failures: Vec<(&str, &str)> = rows
                    .iter()
                    .map(|(id, reason)| (id.as_str(), reason.as_str()))
                    .collect();
                async move { statements.record_failures(tx, &failures, &rule).await }
            },
        )
        .await?;
        let skipped = failed.iter().filter(|(id, _)| {
            !on_rows.iter().any(|r| r.id == *id) && !refused.iter().any(|((r, _), _)| r == id)
        });
        let skipped: Vec<(&(String, String), String)> = skipped
            .map(|row| (row, "the update recording it changed no row".to_owned()))
            .collect();
        for ((id, _), words) in refused.into_iter().chain(skipped) {
            let (attempts, held) = self.unwritable.charge(id, &rule);
            recorded.in_memory.push(Remembered {
                id: id.clone(),
                refused: words,
                attempts,
                held,
            });
        }
        recorded.on_rows = on_rows;
        Ok(recorded)
    }
}

impl BatchOutcome {
    /// What a committed batch did, from where its claim went (`pass`), its
    /// rows as classified, the number of confirmed rows left `unmarked`, and
    /// the failures as `recorded`.
    fn committed(
        Pass {
            claimed,
            wrapped,
            advanced,
        }: Pass,
        classified: Classified,
        unmarked: usize,
        recorded: &Recorded,
        channel_failure: Option<ChannelFailure>,
        timings: Timings,
    ) -> Self {
        let parked = recorded.on_rows.iter().filter(|r| r.parked).count()
            + recorded.in_memory.iter().filter(|r| r.held).count();
        Self {
            claimed,
            wrapped,
            advanced,
            deferred: classified.deferred,
            behind_key: classified.behind_key,
            ordering_breaks: classified.ordering_breaks,
            published: classified.published,
            confirmed: classified.confirmed.len(),
            marked: classified.confirmed.len() - unmarked,
            returned: classified.returned,
            nacked: classified.nacked,
            failed: classified.failed.len(),
            parked,
            rows: row_outcomes(classified.unsettled, classified.failed, recorded),
            timings,
            topology_fault: classified.topology_fault,
            configured_route_confirmed: classified.configured_route_confirmed,
            channel_failure,
            refused_exchange: classified.refused_exchange,
        }
    }

    /// Counts what a committed batch did and logs its rows: every metric of
    /// a batch and every row's log line come from here. An empty claim
    /// committed nothing and reports nothing.
    pub(super) fn report(&self, worker: usize, metrics: &Metrics) {
        if self.claimed == 0 {
            return;
        }
        let timings = &self.timings;
        metrics.batch_committed();
        metrics.batch_size.observe(self.claimed as f64);
        metrics.claim_seconds.observe(timings.claimed.as_secs_f64());
        if self.published > 0 {
            metrics
                .confirm_seconds
                .observe((timings.confirmed - timings.claimed).as_secs_f64());
        }
        metrics.published.inc_by(self.published as u64);
        metrics.confirmed.inc_by(self.confirmed as u64);
        metrics.nacked.inc_by(self.nacked as u64);
        metrics.returned.inc_by(self.returned as u64);
        metrics.failed.inc_by(self.failed as u64);
        metrics.parked.inc_by(self.parked as u64);
        metrics
            .ordering_breaks
            .inc_by(self.ordering_breaks.len() as u64);
        for OrderingBreak {
            key,
            earlier,
            fate,
            later,
        } in &self.ordering_breaks
        {
            error!(
                target: LOG_TARGET,
                ordering_key = %key, message_id = %later, earlier_message_id = %earlier, earlier_fate = %fate,
                "a message of an ordering key was confirmed while an earlier one of the key was not: \
                 consumers may see the earlier one after it"
            );
        }

        for (id, row) in &self.rows {
            match row {
                RowOutcome::Unsettled { reason } => {
                    debug!(target: LOG_TARGET, message_id = %id, %reason, "confirm unknown; the row stays pending");
                }
                RowOutcome::FailedInMemory {
                    reason,
                    refused,
                    attempt,
                    held: true,
                } => error!(
                    target: LOG_TARGET,
                    message_id = %id, %reason, recording_refused = %refused, attempt,
                    "row held in memory after repeated failures: the database refuses any update of it, \
                     so it stays pending in the table; fix the trigger or constraint, then restart the relay"
                ),
                RowOutcome::FailedInMemory {
                    reason,
                    refused,
                    attempt,
                    held: false,
                } => warn!(
                    target: LOG_TARGET,
                    message_id = %id, %reason, recording_refused = %refused, attempt,
                    "row failed and the database refuses to record that on the row; \
                     this relay counts its attempts in memory and retries it after a delay"
                ),
                RowOutcome::Failed {
                    reason,
                    attempt,
                    parked: true,
                } => error!(
                    target: LOG_TARGET,
                    message_id = %id, %reason, attempt,
                    "row parked after repeated failures; fix it and run `pushoccurrence requeue`"
                ),
                RowOutcome::Failed {
                    reason,
                    attempt,
                    parked: false,
                } => {
                    warn!(target: LOG_TARGET, message_id = %id, %reason, attempt, "row failed; it will be retried after a delay")
                }
            }
        }
        debug!(
            target: LOG_TARGET,
            worker,
            claimed = self.claimed,
            marked = self.marked,
            failed = self.failed,
            behind_key = self.behind_key,
            claim_ms = timings.claimed.as_secs_f64() * 1e3,
            publish_confirm_ms = (timings.confirmed - timings.claimed).as_secs_f64() * 1e3,
            mark_ms = (timings.marked - timings.confirmed).as_secs_f64() * 1e3,
            commit_ms = (timings.committed - timings.marked).as_secs_f64() * 1e3,
            "batch committed"
        );
    }
}

/// The rule failed attempts follow, from `relay.*`.
pub(super) fn attempt_rule(relay: &RelayConfig) -> AttemptRule {
    AttemptRule {
        delay: relay.attempt_delay,
        max_delay: relay.max_retry_delay,
        max_attempts: relay.max_attempts,
    }
}

/// Sorts a published batch's rows by what the planner held and what the
/// broker answered: confirmed (to mark), failed for a reason of the row's
/// own (to charge), deferred, or left pending and uncharged (nacked,
/// unknown, or a topology fault: a configured route that routes nowhere,
/// a configured exchange that is missing or refused).
fn classify(batch: &Assembled, report: &BatchReport) -> Classified {
    let mut out = Classified::default();
    for (id, hold) in &batch.held {
        match hold {
            Hold::Deferred => out.deferred += 1,
            Hold::BehindKey { .. } => out.behind_key += 1,
            _ => out.failed.push((id.clone(), hold.reason())),
        }
    }
    // Per ordering key, the first message not confirmed and what became of it.
    let mut not_confirmed: HashMap<&str, (&str, &Delivery)> = HashMap::new();
    for (message, delivery) in batch.messages.iter().zip(&report.deliveries) {
        let d = &message.destination;
        let id = || message.id.clone();
        if let Some(key) = message.ordering_key.as_deref() {
            match not_confirmed.get(key) {
                Some((earlier, fate)) if *delivery == Delivery::Confirmed => {
                    out.ordering_breaks.push(OrderingBreak {
                        key: key.to_owned(),
                        earlier: (*earlier).to_owned(),
                        fate: describe_delivery(fate),
                        later: message.id.clone(),
                    });
                }
                None if *delivery != Delivery::Confirmed => {
                    not_confirmed.insert(key, (&message.id, delivery));
                }
                _ => {}
            }
        }
        if *delivery != Delivery::IdTooLong {
            out.published += 1;
        }
        match delivery {
            // A configured route that routes nowhere: the queue is gone, not
            // the row's fault. The row stays pending.
            Delivery::Returned { code, text } if d.configured => {
                out.returned += 1;
                out.topology_fault.get_or_insert_with(|| {
                    format!(
                        "messages on the configured route (exchange '{}', routing key '{}') come back unroutable: {code} {text}; \
                         the queue it should reach is missing or unbound",
                        d.exchange, d.routing_key
                    )
                });
            }
            Delivery::Returned { code, text } => {
                out.returned += 1;
                let reason = format!(
                    "returned by the broker as unroutable: {code} {text} (exchange '{}', routing key '{}')",
                    d.exchange, d.routing_key
                );
                out.failed.push((id(), reason));
            }
            Delivery::Refused(error) => {
                let kind = soft_kind(error);
                let about_exchange = matches!(
                    kind,
                    Some(AMQPSoftError::NOTFOUND | AMQPSoftError::ACCESSREFUSED)
                );
                let words = error.get_message().to_string();
                if about_exchange && !d.exchange_from_row {
                    out.topology_fault.get_or_insert_with(|| {
                        format!(
                            "the broker refused publishing to the configured exchange '{}' ({words})",
                            d.exchange
                        )
                    });
                } else if about_exchange {
                    if kind == Some(&AMQPSoftError::ACCESSREFUSED) {
                        out.refused_exchange = Some((d.exchange.to_string(), words.clone()));
                    }
                    let hold = Hold::RefusedExchange {
                        exchange: d.exchange.to_string(),
                        reason: words,
                    };
                    out.failed.push((id(), hold.reason()));
                } else {
                    out.failed.push((
                        id(),
                        format!("the broker refused the message: {} {words}", error.get_id()),
                    ));
                }
            }
            Delivery::IdTooLong => out.failed.push((id(), Hold::IdTooLong.reason())),
            Delivery::Nacked => out.nacked += 1,
            Delivery::Unknown(reason) => out.unsettled.push((id(), reason.clone())),
            Delivery::Confirmed => {
                out.configured_route_confirmed |= d.configured;
                out.confirmed.push(id());
            }
        }
    }
    out
}

/// The rows to log, in order: those whose confirm is unknown, then the
/// failed ones, each with how its failure was recorded.
fn row_outcomes(
    unsettled: Vec<(String, String)>,
    failed: Vec<(String, String)>,
    recorded: &Recorded,
) -> Vec<(String, RowOutcome)> {
    let unsettled = unsettled
        .into_iter()
        .map(|(id, reason)| (id, RowOutcome::Unsettled { reason }));
    let failed = failed.into_iter().map(|(id, reason)| {
        if let Some(remembered) = recorded.in_memory.iter().find(|r| r.id == id) {
            let row = RowOutcome::FailedInMemory {
                reason,
                refused: remembered.refused.clone(),
                attempt: remembered.attempts,
                held: remembered.held,
            };
            return (id, row);
        }
        let (parked, attempt) = recorded
            .on_rows
            .iter()
            .find(|r| r.id == id)
            .map_or((false, 0), |r| (r.parked, r.attempts));
        (
            id,
            RowOutcome::Failed {
                reason,
                attempt,
                parked,
            },
        )
    });
    unsettled.chain(failed).collect()
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
async fn row_by_row<'r, T, R, F, Fut>(
    tx: &Transaction<'_>,
    limit: Duration,
    rows: &'r [T],
    run: F,
) -> Result<(Vec<R>, Vec<(&'r T, String)>), BatchError>
where
    F: Fn(&[&'r T]) -> Fut,
    Fut: Future<Output = Result<Vec<R>, tokio_postgres::Error>>,
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
                .map_err(|_| BatchError::from(DatabaseFault::Timeout(limit)))
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
                return Err(DatabaseFault::OutboxRefused(e).into());
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

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPErrorKind};

    use super::*;
    use crate::routing::MessageFields;

    fn message(id: &str, exchange: Option<&str>) -> Message {
        let config = crate::config::tests::seed();
        let router = Router::new(&config.rabbitmq, "text/plain");
        let fields = MessageFields {
            exchange: exchange.map(str::to_owned),
            routing_key: exchange.map(|_| "elsewhere".to_owned()),
            ..MessageFields::default()
        };
        Message {
            id: id.into(),
            body: b"x".to_vec(),
            destination: router.resolve(&fields).unwrap(),
            ordering_key: None,
        }
    }

    fn at(micros: i64) -> ClaimPosition {
        ClaimPosition {
            enqueued_at: crate::db::outbox::EnqueuedAt(micros.to_be_bytes().to_vec()),
            id: format!("id{micros}"),
        }
    }

    fn ended(full: bool, next: Option<&ClaimPosition>) -> ClaimEnd<'_> {
        ClaimEnd {
            full,
            claimed: if full { 128 } else { 3 },
            next,
            window_end: None,
            keyed: false,
        }
    }

    /// Claims of unkeyed rows overlap: one that ends after a later one
    /// does not move the cursor back, and one that started before a wrap
    /// leaves the new pass alone.
    #[test]
    fn an_overlapping_claim_moves_the_cursor_only_forward_and_only_in_its_own_pass() {
        let mut cursor = CursorState {
            no_keyed_rows: true,
            ..CursorState::default()
        };
        let (first, second) = (cursor.begin(), cursor.begin());
        assert!(!first.keyed);
        let (p1, p2) = (at(1), at(2));
        cursor.settle(&second, &ended(true, Some(&p2)));
        cursor.settle(&first, &ended(true, Some(&p1)));
        assert_eq!(cursor.position, Some(p2.clone()));

        let (older, wrapping) = (cursor.begin(), cursor.begin());
        let moved = cursor.settle(&wrapping, &ended(false, None));
        assert_eq!(
            moved,
            Moved {
                wrapped: true,
                advanced: false
            }
        );
        assert_eq!(cursor.position, None);
        cursor.settle(&older, &ended(true, Some(&at(3))));
        assert_eq!(
            cursor.position, None,
            "the older pass's claim ended after the wrap"
        );
        cursor.settle(&cursor.begin(), &ended(true, Some(&at(4))));
        assert_eq!(cursor.position, Some(at(4)));
    }

    /// A claim of unkeyed rows that meets keyed rows switches to claims in
    /// each key's order at once: its worker's next claim starts where it
    /// started (once), the position stays for the others; a keyed claim
    /// that meets none goes back.
    #[test]
    fn keyed_rows_met_by_a_claim_of_unkeyed_rows_are_claimed_next_from_where_it_started() {
        let mut cursor = CursorState {
            no_keyed_rows: true,
            position: Some(at(5)),
            ..CursorState::default()
        };
        let start = cursor.begin_for(1);
        let next = at(9);
        let moved = cursor.settle(
            &start,
            &ClaimEnd {
                keyed: true,
                ..ended(false, Some(&next))
            },
        );
        assert!(moved.wrapped, "claims again at once");
        assert_eq!(cursor.position, Some(at(5)), "says nothing of the end");
        cursor.position = Some(at(7));
        assert_eq!(cursor.begin_for(0).after, Some(at(7)));
        let failed = cursor.begin_for(1);
        assert_eq!(failed.after, Some(at(5)));
        // That claim failed (never settled): the next one starts over too.
        let again = cursor.begin_for(1);
        assert!(again.keyed);
        assert_eq!(again.after, Some(at(5)));
        cursor.settle(&again, &ended(true, Some(&at(6))));
        assert_eq!(cursor.begin_for(1).after, Some(at(7)), "once settled");
        assert!(!cursor.begin().keyed, "a keyed claim met none");
        assert_eq!(cursor.position, Some(at(7)), "only forward");
    }

    /// While a start-over waits, claims stay in each key's order (the rows
    /// it was made for may lie behind the position), and the start-over
    /// claim is one whatever the mode; a worker that stops hands its
    /// start-over to the next claim of any worker.
    #[test]
    fn a_waiting_start_over_keeps_claims_in_each_keys_order_and_is_handed_over() {
        let mut cursor = CursorState {
            no_keyed_rows: true,
            position: Some(at(5)),
            ..CursorState::default()
        };
        let met = cursor.begin_for(1);
        cursor.settle(
            &met,
            &ClaimEnd {
                keyed: true,
                ..ended(false, None)
            },
        );
        let beside = cursor.begin_for(0);
        assert!(beside.keyed);
        let p9 = at(9);
        cursor.settle(&beside, &ended(true, Some(&p9)));
        assert!(cursor.begin().keyed, "worker 1's start-over waits");
        cursor.no_keyed_rows = true;
        let again = cursor.begin_for(1);
        assert!(again.keyed, "a start-over claim is keyed whatever the mode");
        assert_eq!(again.after, Some(at(5)));

        cursor.settle(
            &met,
            &ClaimEnd {
                keyed: true,
                ..ended(false, None)
            },
        );
        cursor.hand_over(1);
        assert!(cursor.start_over.is_empty());
        let other = cursor.begin_for(0);
        assert!(other.keyed);
        assert_eq!(other.after, Some(at(5)), "worker 0 takes it over");
        let p10 = at(10);
        cursor.settle(&other, &ended(true, Some(&p10)));
        assert!(!cursor.begin().keyed, "nothing waits any more");
    }

    /// Claims in each key's order last while they meet keyed rows; the
    /// first that meets none (a relay's first claim included) hands over to
    /// the claim of unkeyed rows, which goes on from its position.
    #[test]
    fn claims_in_each_keys_order_last_while_they_meet_keyed_rows() {
        let mut cursor = CursorState::default();
        assert!(cursor.begin().keyed, "a relay's first claim finds out");
        let (p1, p2) = (at(1), at(2));
        let start = cursor.begin_for(0);
        cursor.settle(
            &start,
            &ClaimEnd {
                keyed: true,
                ..ended(true, Some(&p1))
            },
        );
        assert!(cursor.begin().keyed);
        let start = cursor.begin_for(0);
        cursor.settle(&start, &ended(true, Some(&p2)));
        assert!(!cursor.begin().keyed);
        assert_eq!(cursor.position, Some(p2));
    }

    /// Claims of unkeyed rows overlap: one that met keyed rows after a newer
    /// pass began still switches, and its worker starts over from where it
    /// started.
    #[test]
    fn keyed_rows_met_by_a_claim_of_an_earlier_pass_are_still_claimed_next() {
        let mut cursor = CursorState {
            no_keyed_rows: true,
            position: Some(at(5)),
            ..CursorState::default()
        };
        let (older, wrapping) = (cursor.begin_for(1), cursor.begin_for(0));
        cursor.settle(&wrapping, &ended(false, None));
        assert_eq!(cursor.position, None);
        cursor.position = Some(at(8));
        let moved = cursor.settle(
            &older,
            &ClaimEnd {
                keyed: true,
                ..ended(false, None)
            },
        );
        assert!(moved.wrapped);
        let again = cursor.begin_for(1);
        assert!(again.keyed);
        assert_eq!(again.after, Some(at(5)));
        assert_eq!(
            earliest(Some(at(5)), None),
            None,
            "the backlog's start is earliest"
        );
    }

    fn refused(kind: AMQPSoftError, words: &str) -> Delivery {
        Delivery::Refused(AMQPError::new(AMQPErrorKind::Soft(kind), words.into()))
    }

    #[test]
    fn a_later_message_of_a_key_confirmed_after_an_earlier_one_failed_is_a_counted_break() {
        let keyed = |id: &str, key: &str, exchange: Option<&str>| Message {
            ordering_key: Some(key.into()),
            ..message(id, exchange)
        };
        let batch = Assembled {
            messages: vec![
                keyed("k1", "K", Some("x")),
                keyed("j1", "J", None),
                keyed("k2", "K", None),
                keyed("j2", "J", None),
                message("u", None),
                keyed("k3", "K", None),
            ],
            claimed: 6,
            ..Assembled::default()
        };
        let report = BatchReport {
            deliveries: vec![
                Delivery::Returned {
                    code: 312,
                    text: "NO_ROUTE".into(),
                },
                Delivery::Nacked,
                Delivery::Confirmed,
                Delivery::Unknown("no confirm within 1s".into()),
                Delivery::Confirmed,
                Delivery::Confirmed,
            ],
            channel_failure: None,
        };
        let c = classify(&batch, &report);
        let breaks: Vec<(&str, &str, &str)> = c
            .ordering_breaks
            .iter()
            .map(|b| (b.key.as_str(), b.earlier.as_str(), b.later.as_str()))
            .collect();
        // J's later message was not confirmed either: no break.
        assert_eq!(breaks, [("K", "k1", "k2"), ("K", "k1", "k3")]);
        assert_eq!(
            c.ordering_breaks[0].fate,
            "returned as unroutable (312 NO_ROUTE)"
        );
    }

    #[test]
    fn holds_and_broker_answers_sort_rows_into_marked_charged_and_left_pending() {
        let returned = Delivery::Returned {
            code: 312,
            text: "NO_ROUTE".into(),
        };
        let batch = Assembled {
            messages: vec![
                message("ok", None),
                message("lost", None),
                message("unrouted", Some("x")),
                message("forbidden", Some("x")),
                message("nacked", None),
                message("unknown", None),
                message("configured-gone", None),
            ],
            held: vec![
                ("late".into(), Hold::Deferred),
                ("empty".into(), Hold::NullBody),
            ],
            claimed: 9,
            keyed: Vec::new(),
        };
        let report = BatchReport {
            deliveries: vec![
                Delivery::Confirmed,
                returned.clone(),
                returned,
                refused(AMQPSoftError::ACCESSREFUSED, "ACCESS_REFUSED - no write"),
                Delivery::Nacked,
                Delivery::Unknown("no confirm within 1s".into()),
                refused(AMQPSoftError::NOTFOUND, "NOT_FOUND - no exchange"),
            ],
            channel_failure: None,
        };
        let c = classify(&batch, &report);
        assert_eq!(c.confirmed, ["ok"]);
        assert!(c.configured_route_confirmed);
        let failed: Vec<&str> = c.failed.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(failed, ["empty", "unrouted", "forbidden"]);
        assert_eq!(
            c.unsettled,
            [("unknown".to_owned(), "no confirm within 1s".to_owned())]
        );
        assert_eq!(
            (c.deferred, c.nacked, c.returned, c.published),
            (1, 1, 2, 7)
        );
        assert_eq!(
            c.refused_exchange,
            Some(("x".to_owned(), "ACCESS_REFUSED - no write".to_owned()))
        );
        // The first sign of a broken configured topology is the one reported;
        // it charges nobody.
        let fault = c.topology_fault.unwrap();
        assert!(
            fault.contains("come back unroutable: 312 NO_ROUTE"),
            "{fault}"
        );
    }
}
