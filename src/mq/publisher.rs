//! One AMQP channel in confirm mode, owned by one worker: publishes a batch
//! and reports, per message, whether the broker took responsibility for it.
//!
//! Only a bare `basic.ack` counts. lapin resolves an unroutable mandatory
//! publish as `Ack(Some(returned))` and may attach the returned message to a
//! different confirm of the same `multiple` ack, so returns are matched to
//! messages by their `message_id`, never by which future carried them. The
//! channel carries one batch at a time, so every return it sees belongs to
//! that batch.
//!
//! A message the broker refuses by closing the channel (a body over its
//! `max_message_size`, a publish to an exchange that is missing or
//! forbidden) takes the rest of its batch down with it. [`Publisher::isolate`]
//! publishes the batch's unsettled messages again one by one on fresh
//! channels, so the refusal is pinned on the one message that caused it.
//! Messages are always persistent: a confirm of a transient message means
//! nothing once the broker restarts.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::AMQPError;
use lapin::types::ShortString;
use lapin::{Channel, Confirmation, Connection};

use super::{BrokerError, exchange_exists};
use crate::amqp::{AMQP_MAX_SHORT_STRING, channel_error};
use crate::routing::Destination;

/// A message ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The row's `message_id` as text; also the AMQP `message_id`.
    pub id: String,
    /// The body bytes.
    pub body: Vec<u8>,
    /// Exchange, routing key and the row's properties.
    pub destination: Destination,
    /// The row's ordering key: messages of one key go out in the order
    /// given, and none goes out again ahead of an earlier one that was not
    /// confirmed ([`Publisher::isolate`]).
    pub ordering_key: Option<String>,
}

/// What became of one published message.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// Acked and not returned: the broker is responsible for it now.
    Confirmed,
    /// Returned as unroutable (`basic.return`), then acked.
    Returned {
        /// AMQP reply code, 312 for NO_ROUTE.
        code: u16,
        /// The broker's text.
        text: String,
    },
    /// The broker refused responsibility (`basic.nack`).
    Nacked,
    /// Not known: the channel failed or the confirm did not come in time.
    Unknown(String),
    /// Not published: the id does not fit an AMQP short string.
    IdTooLong,
    /// Published alone, the message made the broker close the channel (a
    /// channel-level error such as 406 for a body over its size limit, or
    /// 404 / 403 for its exchange).
    Refused(AMQPError),
}

/// Why a batch's channel can no longer be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChannelFailure {
    /// The broker closed the channel with a channel-level error; the
    /// connection is fine.
    #[error("channel closed by the broker: {}", .0.get_message())]
    Closed(AMQPError),
    /// The connection failed (or the channel, by other than a
    /// channel-level error).
    #[error("{0}")]
    Failed(#[source] Box<lapin::Error>),
    /// The messages were not handed to the broker in time (the channel is
    /// closed, so none can slip out later).
    #[error("messages not written within {0:?}")]
    NotWritten(Duration),
    /// The broker did not confirm in time (the channel is closed, so no
    /// late confirm can be mistaken for another batch's).
    #[error("no confirm within {0:?}")]
    NotConfirmed(Duration),
}

impl ChannelFailure {
    fn of(error: &lapin::Error) -> Self {
        match channel_error(error) {
            Some(e) => Self::Closed(e.clone()),
            None => Self::Failed(Box::new(error.clone())),
        }
    }
}

/// The result of publishing one batch.
#[derive(Debug)]
pub struct BatchReport {
    /// One entry per message, in the order given.
    pub deliveries: Vec<Delivery>,
    /// Why the channel can no longer be used, if it cannot.
    pub channel_failure: Option<ChannelFailure>,
}

impl BatchReport {
    /// Ids of the messages the broker confirmed.
    pub fn confirmed<'a>(&self, messages: &'a [Message]) -> Vec<&'a str> {
        messages
            .iter()
            .zip(&self.deliveries)
            .filter(|(_, d)| **d == Delivery::Confirmed)
            .map(|(m, _)| m.id.as_str())
            .collect()
    }
}

/// A confirm-mode channel, with the exchanges rows named that were found to
/// exist on its connection.
#[derive(Debug)]
pub struct Publisher {
    connection: Arc<Connection>,
    channel: Channel,
    known_exchanges: HashSet<String>,
}

/// AMQP delivery mode 2: the broker writes the message to disk in a durable
/// queue before it confirms.
const PERSISTENT: u8 = 2;

impl Publisher {
    /// Opens a channel on `connection` and enables publisher confirms.
    ///
    /// # Errors
    /// The broker or connection error.
    pub async fn open(connection: Arc<Connection>) -> lapin::Result<Self> {
        let channel = confirm_channel(&connection).await?;
        Ok(Self {
            connection,
            channel,
            known_exchanges: HashSet::new(),
        })
    }

    /// Replaces a channel the broker closed with a new one on the same
    /// connection. The exchanges found to exist are still known: a channel
    /// closes for one message's sake, not because the topology changed.
    async fn reopen(&mut self) -> lapin::Result<()> {
        self.channel = confirm_channel(&self.connection).await?;
        Ok(())
    }

    /// The exchanges named by rows in `messages` that do not exist.
    /// Publishing to one would close the channel and fail the whole batch,
    /// so their rows are failed before the batch is published. Exchanges
    /// found are remembered for the life of this channel (a channel closed
    /// by a publish to a since-deleted exchange is replaced, and with it
    /// this memory).
    ///
    /// # Errors
    /// The broker could not be asked.
    pub async fn missing_exchanges(
        &mut self,
        messages: &[Message],
    ) -> Result<HashSet<String>, BrokerError> {
        let mut missing = HashSet::new();
        for message in messages {
            let d = &message.destination;
            let name = d.exchange.as_str();
            if !d.exchange_from_row
                || name.is_empty()
                || self.known_exchanges.contains(name)
                || missing.contains(name)
            {
                continue;
            }
            if exchange_exists(&self.connection, name).await? {
                self.known_exchanges.insert(name.to_owned());
            } else {
                missing.insert(name.to_owned());
            }
        }
        Ok(missing)
    }

    /// Whether the channel is still open.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes every message (mandatory, with its id, a timestamp and the
    /// content type) and waits up to `confirm_timeout` for all confirms.
    /// While `paused()` is true (the broker blocked publishing) the deadline
    /// is extended, to one whole `confirm_timeout` after the alarm clears: a
    /// blocked broker is slow, not lost, and giving up would only republish
    /// the batch. On a timeout the channel is closed before
    /// returning, so no late confirm can be mistaken for this batch's.
    ///
    /// While paused, `keep_alive` runs once per `confirm_timeout` (it keeps
    /// the claim transaction from being ended as idle); when it fails, the
    /// wait ends as a timeout would.
    pub async fn publish_batch<K: Future<Output = bool>>(
        &self,
        messages: &[Message],
        confirm_timeout: Duration,
        paused: impl Fn() -> bool,
        mut keep_alive: impl FnMut() -> K,
    ) -> BatchReport {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };

        let mut deliveries = vec![Delivery::Confirmed; messages.len()];
        let mut sent = Vec::with_capacity(messages.len());
        let mut publishes = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            let Ok(id) = ShortString::try_new(message.id.as_str()) else {
                deliveries[i] = Delivery::IdTooLong;
                continue;
            };
            debug_assert!(id.as_str().len() <= AMQP_MAX_SHORT_STRING);
            sent.push(i);
            // Polled in order by join_all, so delivery tags follow this order.
            let d = &message.destination;
            let properties = d
                .properties
                .clone()
                .with_delivery_mode(PERSISTENT)
                .with_timestamp(timestamp)
                .with_message_id(id);
            publishes.push(self.channel.basic_publish(
                d.exchange.clone(),
                d.routing_key.clone(),
                options,
                &message.body,
                properties,
            ));
        }

        // lapin writes nothing while the broker blocks the connection, so
        // even handing the messages over waits out an alarm.
        let Some(written) = wait_unless_stalled(
            join_all(publishes),
            confirm_timeout,
            &paused,
            &mut keep_alive,
        )
        .await
        else {
            let failure = ChannelFailure::NotWritten(confirm_timeout);
            return self.give_up(failure, &sent, deliveries).await;
        };
        let mut channel_failure = None;
        let mut confirms = Vec::with_capacity(sent.len());
        let mut confirm_slots = Vec::with_capacity(sent.len());
        for (i, published) in sent.iter().zip(written) {
            match published {
                Ok(confirm) => {
                    confirms.push(confirm);
                    confirm_slots.push(*i);
                }
                Err(e) => {
                    channel_failure.get_or_insert_with(|| ChannelFailure::of(&e));
                    deliveries[*i] = Delivery::Unknown(format!("publish failed: {e}"));
                }
            }
        }

        let results = wait_unless_stalled(
            join_all(confirms),
            confirm_timeout,
            &paused,
            &mut keep_alive,
        )
        .await;
        let Some(results) = results else {
            let failure = ChannelFailure::NotConfirmed(confirm_timeout);
            return self.give_up(failure, &confirm_slots, deliveries).await;
        };

        let mut returned: Vec<(String, u16, String)> = Vec::new();
        let mut unattributed_return = false;
        for (i, result) in confirm_slots.iter().zip(results) {
            let (delivery, carried) = match result {
                Ok(Confirmation::Ack(carried)) => (Delivery::Confirmed, carried),
                Ok(Confirmation::Nack(carried)) => (Delivery::Nacked, carried),
                Ok(Confirmation::NotRequested) => (
                    Delivery::Unknown("channel is not in confirm mode".into()),
                    None,
                ),
                Err(e) => {
                    channel_failure.get_or_insert_with(|| ChannelFailure::of(&e));
                    (Delivery::Unknown(format!("confirm failed: {e}")), None)
                }
            };
            deliveries[*i] = delivery;
            if let Some(message) = carried {
                match message.delivery.properties.message_id() {
                    Some(id) => returned.push((
                        id.to_string(),
                        message.reply_code,
                        message.reply_text.to_string(),
                    )),
                    None => unattributed_return = true,
                }
            }
        }
        let returned_ids: HashSet<&str> = returned.iter().map(|(id, _, _)| id.as_str()).collect();
        for (message, delivery) in messages.iter().zip(deliveries.iter_mut()) {
            if returned_ids.contains(message.id.as_str()) {
                let (_, code, text) = returned
                    .iter()
                    .find(|(id, _, _)| *id == message.id)
                    .expect("id is in the returned set");
                *delivery = Delivery::Returned {
                    code: *code,
                    text: text.clone(),
                };
            } else if unattributed_return && *delivery == Delivery::Confirmed {
                // A return we cannot place could be any acked message's.
                *delivery = Delivery::Unknown("a returned message carried no message_id".into());
            }
        }
        BatchReport {
            deliveries,
            channel_failure,
        }
    }

    /// Ends a batch whose messages at `slots` were not settled in time:
    /// closes the channel first, so no late confirm can be mistaken for
    /// this batch's and no late publish slips out after the rows are
    /// released.
    async fn give_up(
        &self,
        failure: ChannelFailure,
        slots: &[usize],
        mut deliveries: Vec<Delivery>,
    ) -> BatchReport {
        let _closed = self.channel.close(200, "batch timed out".into()).await;
        let reason = failure.to_string();
        for i in slots {
            deliveries[*i] = Delivery::Unknown(reason.clone());
        }
        BatchReport {
            deliveries,
            channel_failure: Some(failure),
        }
    }

    /// After the broker closed the channel on a batch (a channel-level
    /// error), publishes each message whose fate is unknown again, alone, on
    /// a fresh channel, and records what became of it: the message that
    /// makes the broker close the channel again is [`Delivery::Refused`],
    /// the others settle as they would have. Messages published before the
    /// refused one may have reached their queue already; publishing them
    /// again is the at-least-once duplicate the contract allows for a
    /// channel closed by another message's error.
    ///
    /// A message whose ordering key has an earlier message in the batch
    /// that was not confirmed is not published again: it stays unknown
    /// (pending, uncharged), so it never overtakes that one.
    ///
    /// Stops, leaving the rest unknown, when the connection fails or a
    /// confirm does not come in time; `report.channel_failure` then says so.
    /// Clears it when every message was settled.
    pub async fn isolate<K: Future<Output = bool>>(
        &mut self,
        messages: &[Message],
        report: &mut BatchReport,
        confirm_timeout: Duration,
        paused: impl Fn() -> bool,
        mut keep_alive: impl FnMut() -> K,
    ) {
        if !matches!(report.channel_failure, Some(ChannelFailure::Closed(_))) {
            return;
        }
        // Keys with a message not confirmed: their later messages stay
        // unpublished, so none overtakes it.
        let mut stopped_keys: HashSet<&str> = HashSet::new();
        for (i, message) in messages.iter().enumerate() {
            let key = message.ordering_key.as_deref();
            if !matches!(report.deliveries[i], Delivery::Unknown(_)) {
                if report.deliveries[i] != Delivery::Confirmed {
                    stopped_keys.extend(key);
                }
                continue;
            }
            if let Some(key) = key
                && stopped_keys.contains(key)
            {
                report.deliveries[i] = Delivery::Unknown(format!(
                    "not published again: an earlier message of ordering key '{key}' was not confirmed"
                ));
                continue;
            }
            if !self.is_open()
                && let Err(e) = self.reopen().await
            {
                report.channel_failure = Some(ChannelFailure::of(&e));
                return;
            }
            let alone = self
                .publish_batch(
                    std::slice::from_ref(message),
                    confirm_timeout,
                    &paused,
                    &mut keep_alive,
                )
                .await;
            report.deliveries[i] =
                match (alone.deliveries.into_iter().next(), alone.channel_failure) {
                    (Some(Delivery::Unknown(_)), Some(ChannelFailure::Closed(e))) => {
                        Delivery::Refused(e)
                    }
                    (
                        _,
                        Some(
                            broken @ (ChannelFailure::Failed(_)
                            | ChannelFailure::NotWritten(_)
                            | ChannelFailure::NotConfirmed(_)),
                        ),
                    ) => {
                        report.channel_failure = Some(broken);
                        return;
                    }
                    (Some(delivery), _) => delivery,
                    (None, _) => unreachable!("one message in, one delivery out"),
                };
            if report.deliveries[i] != Delivery::Confirmed {
                stopped_keys.extend(key);
            }
        }
        report.channel_failure = None;
    }
}

/// Waits for `work`, giving up `limit` after the later of its start and the
/// moment `paused()` (the broker blocked publishing) was last seen turn
/// false, so an alarm extends the wait for as long as it lasts and one
/// whole `limit` after it clears, even one that began and ended between two
/// deadlines (`paused()` is looked at every [`PAUSE_POLL`] at most). While paused,
/// `keep_alive` runs once per `limit`; when it fails, the wait gives up.
/// `None` when it gave up.
async fn wait_unless_stalled<T, K: Future<Output = bool>>(
    work: impl Future<Output = T>,
    limit: Duration,
    paused: &impl Fn() -> bool,
    keep_alive: &mut impl FnMut() -> K,
) -> Option<T> {
    let mut work = std::pin::pin!(work);
    let poll = limit.min(PAUSE_POLL);
    let start = tokio::time::Instant::now();
    let mut give_up_at = start + limit;
    let mut keep_alive_at = start + limit;
    let mut was_paused = false;
    loop {
        if let Ok(done) = tokio::time::timeout(poll, &mut work).await {
            return Some(done);
        }
        let now = tokio::time::Instant::now();
        let is_paused = paused();
        if is_paused || was_paused {
            give_up_at = now + limit;
        }
        was_paused = is_paused;
        if is_paused {
            if now >= keep_alive_at {
                if !keep_alive().await {
                    return None;
                }
                keep_alive_at = now + limit;
            }
        } else if now >= give_up_at {
            return None;
        }
    }
}

/// How often a confirm wait looks whether the broker blocks publishing.
const PAUSE_POLL: Duration = Duration::from_millis(100);

/// A new channel on `connection` in confirm mode.
async fn confirm_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::time::Duration;

    use tokio::time::{Instant, sleep_until};

    use super::wait_unless_stalled;

    const LIMIT: Duration = Duration::from_secs(1);

    /// A wait that the broker blocked during `blocked` and whose work is
    /// done at `done_at`, both from the start; whether it gave up.
    async fn waited(blocked: Range<Duration>, done_at: Duration) -> Option<&'static str> {
        let start = Instant::now();
        let paused = || blocked.contains(&start.elapsed());
        let mut keep_alive = || async { true };
        let work = async move {
            sleep_until(start + done_at).await;
            "confirmed"
        };
        wait_unless_stalled(work, LIMIT, &paused, &mut keep_alive).await
    }

    const NEVER: Range<Duration> = Duration::ZERO..Duration::ZERO;

    #[tokio::test(start_paused = true)]
    async fn work_done_within_the_limit_is_returned() {
        assert_eq!(waited(NEVER, LIMIT / 2).await, Some("confirmed"));
    }

    #[tokio::test(start_paused = true)]
    async fn work_past_the_limit_of_an_unblocked_broker_is_given_up() {
        assert_eq!(waited(NEVER, LIMIT * 2).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_broker_extends_the_wait() {
        assert_eq!(
            waited(Duration::ZERO..LIMIT * 5, LIMIT * 5 + LIMIT / 2).await,
            Some("confirmed")
        );
    }

    /// The alarm clears just before a deadline: the confirms of messages the
    /// broker only now reads get a whole limit, not what is left of one.
    #[tokio::test(start_paused = true)]
    async fn an_alarm_cleared_just_before_a_deadline_leaves_a_whole_limit_after_it() {
        let cleared = LIMIT * 3 - Duration::from_millis(10);
        let confirmed = cleared + LIMIT - Duration::from_millis(10);
        let alarm = Duration::ZERO..cleared;
        assert_eq!(waited(alarm.clone(), confirmed).await, Some("confirmed"));
        // And past that whole limit it is given up.
        assert_eq!(waited(alarm, cleared + LIMIT * 2).await, None);
    }

    /// `connection.blocked` comes after the publish, so an alarm usually
    /// begins inside a wait; one shorter than the limit is never in force
    /// at a deadline, and still leaves a whole limit after it.
    #[tokio::test(start_paused = true)]
    async fn an_alarm_between_two_deadlines_still_leaves_a_whole_limit_after_it() {
        let alarm = LIMIT / 5..LIMIT * 19 / 20;
        let confirmed = LIMIT * 23 / 20;
        assert_eq!(waited(alarm, confirmed).await, Some("confirmed"));
    }

    /// The claim transaction is kept alive while blocked; when that fails
    /// the wait gives up (its rows would be released to other relays).
    #[tokio::test(start_paused = true)]
    async fn a_failed_keep_alive_ends_a_blocked_wait() {
        let kept = std::cell::Cell::new(0);
        let paused = || true;
        let mut keep_alive = || {
            kept.set(kept.get() + 1);
            let alive = kept.get() < 3;
            async move { alive }
        };
        let work = std::future::pending::<()>();
        let waited = wait_unless_stalled(work, LIMIT, &paused, &mut keep_alive).await;
        assert_eq!((waited, kept.get()), (None, 3));
    }
}
