//! A worker: claim a batch, publish it, wait for the confirms, mark what was
//! confirmed, commit. Several workers run at once, so database round trips
//! and broker confirms overlap.
//!
//! Each worker owns one PostgreSQL session and one AMQP channel. The claim
//! transaction's row locks are the lease: other sessions skip the rows, and
//! a crashed worker's locks vanish with its session. A row is marked
//! transferred only in the transaction that claimed it, and only after a
//! bare `basic.ack`; anything else (nack, return, timeout, lost connection)
//! leaves it pending for a later claim. The worker never claims while the
//! broker is down or blocked, so no transaction spans an outage.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::db::outbox::{ClaimedRow, Outbox, Statements};
use crate::db::{self, SessionKind, describe};
use crate::mq::BrokerState;
use crate::mq::publisher::{Delivery, Publisher};
use crate::relay::assemble;

/// Extra time a claim transaction may stay open beyond the confirm timeout
/// before the server ends it (and releases its locks).
const TRANSACTION_MARGIN: Duration = Duration::from_secs(30);

/// Why one batch attempt failed; the rows stay pending.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("postgres: {0}")]
    Database(String),
    #[error("rabbitmq: {0}")]
    Broker(String),
    #[error("stopping")]
    Stopping,
}

impl From<tokio_postgres::Error> for BatchError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Database(describe(&e))
    }
}

/// One claim-publish-mark loop.
pub struct Worker {
    index: usize,
    config: Arc<Config>,
    outbox: Arc<Outbox>,
    broker: watch::Receiver<BrokerState>,
    wake: Arc<Notify>,
    backoff: Backoff,
    session: Option<(Client, Statements)>,
    publisher: Option<Publisher>,
}

impl Worker {
    /// Worker number `index`, woken through `wake`.
    pub fn new(
        index: usize,
        config: Arc<Config>,
        outbox: Arc<Outbox>,
        broker: watch::Receiver<BrokerState>,
        wake: Arc<Notify>,
        backoff: Backoff,
    ) -> Self {
        Self {
            index,
            config,
            outbox,
            broker,
            wake,
            backoff,
            session: None,
            publisher: None,
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
                match self.relay_batch(&token).await {
                    Ok(claimed) => {
                        self.backoff.reset();
                        if claimed < self.config.relay.batch_size {
                            break;
                        }
                        // A full batch means more is waiting: bring in another worker.
                        self.wake.notify_one();
                    }
                    Err(BatchError::Stopping) => return,
                    Err(error) => {
                        let delay = self.backoff.next_delay();
                        warn!(worker = self.index, %error, retry_in = ?delay, "batch failed; its rows stay pending");
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

    /// Claims, publishes and marks one batch; returns how many rows it claimed.
    async fn relay_batch(&mut self, token: &CancellationToken) -> Result<usize, BatchError> {
        self.ensure_publisher(token).await?;
        self.ensure_session().await?;
        let (Some(publisher), Some((client, statements))) = (&self.publisher, &mut self.session)
        else {
            unreachable!("ensured above");
        };
        let result = async {
            let batch_size = i64::try_from(self.config.relay.batch_size).unwrap_or(i64::MAX);
            let tx = client.transaction().await?;
            let rows = tx.query(&statements.claim, &[&batch_size]).await?;
            if rows.is_empty() {
                return Ok((0, None));
            }
            let rows = rows
                .iter()
                .map(ClaimedRow::from_row)
                .collect::<Result<Vec<_>, _>>()?;
            let batch = assemble(rows);
            for (id, hold) in &batch.held {
                warn!(message_id = %id, reason = hold.reason(), "row held back; it stays pending");
            }
            let report = publisher
                .publish_batch(&batch.messages, self.config.relay.confirm_timeout)
                .await;
            let confirmed = report.confirmed(&batch.messages);
            if !confirmed.is_empty() {
                tx.execute(&statements.mark, &[&confirmed]).await?;
            }
            tx.commit().await?;
            for (message, delivery) in batch.messages.iter().zip(&report.deliveries) {
                match delivery {
                    Delivery::Confirmed => {}
                    Delivery::Returned { code, text } => {
                        warn!(message_id = %message.id, code, %text, "broker returned the message as unroutable; it stays pending");
                    }
                    Delivery::Nacked => warn!(message_id = %message.id, "broker nacked the message; it stays pending"),
                    Delivery::Unknown(reason) => debug!(message_id = %message.id, %reason, "confirm unknown; the row stays pending"),
                    Delivery::IdTooLong => warn!(message_id = %message.id, "message_id is longer than 255 bytes and cannot be an AMQP message id; it stays pending"),
                }
            }
            debug!(worker = self.index, claimed = batch.claimed, marked = confirmed.len(), "batch done");
            Ok((batch.claimed, report.channel_failure))
        }
        .await;
        match result {
            Ok((claimed, channel_failure)) => {
                if let Some(reason) = channel_failure {
                    self.publisher = None;
                    return Err(BatchError::Broker(reason));
                }
                Ok(claimed)
            }
            Err(e) => {
                // A failed statement may leave the session unusable; start afresh.
                self.session = None;
                Err(e)
            }
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
        let queue = &self.config.rabbitmq.queue;
        let publisher = Publisher::open(
            &connection,
            &queue.name,
            queue.durable,
            self.outbox.body_type.content_type(),
        )
        .await
        .map_err(|e| BatchError::Broker(format!("open a confirm channel: {e}")))?;
        self.publisher = Some(publisher);
        Ok(())
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
        let client = db::connect(&self.config.postgres, kind).await?;
        let statements = self.outbox.prepare(&client).await?;
        if self.backoff.attempts() > 0 {
            info!(worker = self.index, "claim session reconnected");
        }
        self.session = Some((client, statements));
        Ok(())
    }
}
