//! One AMQP channel in confirm mode, owned by one worker: publishes a batch
//! and reports, per message, whether the broker took responsibility for it.
//!
//! Only a bare `basic.ack` counts. lapin resolves an unroutable mandatory
//! publish as `Ack(Some(returned))` and may attach the returned message to a
//! different confirm of the same `multiple` ack, so returns are matched to
//! messages by their `message_id`, never by which future carried them. The
//! channel carries one batch at a time, so every return it sees belongs to
//! that batch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{Channel, Confirmation, Connection};

use crate::config::AMQP_MAX_SHORT_STRING;
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
}

/// What became of one published message.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

/// The result of publishing one batch.
#[derive(Debug)]
pub struct BatchReport {
    /// One entry per message, in the order given.
    pub deliveries: Vec<Delivery>,
    /// Why the channel can no longer be used, if it cannot.
    pub channel_failure: Option<String>,
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
    delivery_mode: u8,
    known_exchanges: HashSet<String>,
}

impl Publisher {
    /// Opens a channel on `connection` and enables publisher confirms.
    ///
    /// # Errors
    /// The broker or connection error.
    pub async fn open(connection: Arc<Connection>, persistent: bool) -> lapin::Result<Self> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            connection,
            channel,
            delivery_mode: if persistent { 2 } else { 1 },
            known_exchanges: HashSet::new(),
        })
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
    ) -> Result<HashSet<String>, String> {
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
            if super::exchange_exists(&self.connection, name).await? {
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
    /// is extended: a blocked broker is slow, not lost, and giving up would
    /// only republish the batch. On a timeout the channel is closed before
    /// returning, so no late confirm can be mistaken for this batch's.
    pub async fn publish_batch(
        &self,
        messages: &[Message],
        confirm_timeout: Duration,
        paused: impl Fn() -> bool,
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
                .with_delivery_mode(self.delivery_mode)
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

        let mut channel_failure = None;
        let mut confirms = Vec::with_capacity(sent.len());
        let mut confirm_slots = Vec::with_capacity(sent.len());
        for (i, published) in sent.iter().zip(join_all(publishes).await) {
            match published {
                Ok(confirm) => {
                    confirms.push(confirm);
                    confirm_slots.push(*i);
                }
                Err(e) => {
                    channel_failure.get_or_insert_with(|| e.to_string());
                    deliveries[*i] = Delivery::Unknown(format!("publish failed: {e}"));
                }
            }
        }

        let mut all_confirms = join_all(confirms);
        let results = loop {
            match tokio::time::timeout(confirm_timeout, &mut all_confirms).await {
                Ok(results) => break Some(results),
                Err(_) if paused() => {}
                Err(_) => break None,
            }
        };
        let Some(results) = results else {
            let reason = format!("no confirm within {confirm_timeout:?}");
            let _closed = self.channel.close(200, "confirm timeout".into()).await;
            for i in confirm_slots {
                deliveries[i] = Delivery::Unknown(reason.clone());
            }
            return BatchReport {
                deliveries,
                channel_failure: Some(reason),
            };
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
                    channel_failure.get_or_insert_with(|| e.to_string());
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
}
