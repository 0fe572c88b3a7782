//! What the relay is measured against: a bare publisher with lapin (the
//! relay's client) and with amqprs, each with the relay's confirms in
//! flight, and the seed's algorithm, one message per transaction and
//! confirm.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation, Connection};
use tokio::sync::Semaphore;

use crate::consumer::Consumer;
use crate::harness::{Bench, NAME, amqp_connect, pg_connect, wait_until};
use crate::procstat::CpuSplit;

impl Bench {
    /// Baseline: lapin publishing `n` messages with `window` confirms in flight.
    pub(crate) async fn bare_lapin(&self, n: usize, window: usize) -> anyhow::Result<Bare> {
        self.bare_lapin_via(&self.amqp_url, n, window).await
    }

    /// [`Bench::bare_lapin`] publishing to the broker at `url` (a delay
    /// proxy); the consumer stays on the bench's own connection.
    pub(crate) async fn bare_lapin_via(
        &self,
        url: &str,
        n: usize,
        window: usize,
    ) -> anyhow::Result<Bare> {
        self.reset().await?;
        let consumer = Consumer::start(&self.amqp_url, false).await?;
        let (conn, ch) = confirm_channel(url).await?;
        let cpu_before = CpuSplit::read(None);
        let started = Instant::now();
        let mut in_flight = FuturesUnordered::new();
        for i in 0..n {
            if in_flight.len() >= window {
                check_lapin(in_flight.next().await)?;
            }
            let properties = properties_lapin(i);
            in_flight.push(
                ch.basic_publish("".into(), NAME.into(), MANDATORY, &self.body, properties)
                    .await?,
            );
        }
        while let Some(confirm) = in_flight.next().await {
            check_lapin(Some(confirm))?;
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        wait_until(Duration::from_secs(60), || async { consumer.count() >= n }).await?;
        let cpu = CpuSplit::read(None).per_10k_since(&cpu_before, n);
        consumer.close().await;
        conn.close(200, "done".into()).await?;
        Ok(Bare { rate, cpu })
    }

    /// Baseline: amqprs publishing `n` messages with `window` confirms in flight.
    pub(crate) async fn bare_amqprs(&self, n: usize, window: usize) -> anyhow::Result<Bare> {
        use amqprs::channel::{BasicPublishArguments, ConfirmSelectArguments};
        use amqprs::connection::{Connection as AmqprsConnection, OpenConnectionArguments};
        self.reset().await?;
        let consumer = Consumer::start(&self.amqp_url, false).await?;
        let port = self
            .amqp_url
            .rsplit(':')
            .next()
            .and_then(|p| p.split('/').next())
            .and_then(|p| p.parse().ok());
        let conn = AmqprsConnection::open(&OpenConnectionArguments::new(
            "127.0.0.1",
            port.unwrap_or(5672),
            "guest",
            "guest",
        ))
        .await?;
        let ch = conn.open_channel(None).await?;
        let permits = Arc::new(Semaphore::new(window));
        let acked = Arc::new(AtomicUsize::new(0));
        ch.register_callback(AckCounter {
            permits: permits.clone(),
            acked: acked.clone(),
            pending: BTreeSet::new(),
            next_tag: 1,
        })
        .await?;
        ch.confirm_select(ConfirmSelectArguments::default()).await?;
        let cpu_before = CpuSplit::read(None);
        let started = Instant::now();
        for i in 0..n {
            permits.acquire().await?.forget();
            let mut properties = amqprs::BasicProperties::default();
            properties
                .with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT)
                .with_content_type("application/octet-stream")
                .with_message_id(&format!("bench-{i}"))
                .with_timestamp(unix_secs());
            let args = BasicPublishArguments::new("", NAME)
                .mandatory(true)
                .finish();
            ch.basic_publish(properties, self.body.clone(), args)
                .await?;
        }
        wait_until(Duration::from_secs(120), || async {
            acked.load(Ordering::Relaxed) >= n
        })
        .await?;
        let rate = n as f64 / started.elapsed().as_secs_f64();
        wait_until(Duration::from_secs(60), || async { consumer.count() >= n }).await?;
        let cpu = CpuSplit::read(None).per_10k_since(&cpu_before, n);
        consumer.close().await;
        let _ = ch.close().await;
        let _ = conn.close().await;
        Ok(Bare { rate, cpu })
    }

    /// Baseline: the seed's algorithm, one message per transaction and confirm.
    pub(crate) async fn seed_algorithm(&self, n: usize) -> anyhow::Result<f64> {
        self.reset().await?;
        self.fill(NAME, n, None, None).await?;
        let ids = self.ids_in_order().await?;
        let consumer = Consumer::start(&self.amqp_url, false).await?;
        let mut pg = pg_connect(self.pg_port).await?;
        let lock = pg
            .prepare(&format!(
                "SELECT message_id FROM {NAME}.message_queue_log WHERE message_id = $1::text::uuid AND transferred IS NOT TRUE FOR UPDATE"
            ))
            .await?;
        let read = pg
            .prepare(&format!("SELECT message_body FROM {NAME}.message_queue_log_data WHERE message_id = $1::text::uuid"))
            .await?;
        let mark = pg
            .prepare(&format!(
                "UPDATE {NAME}.message_queue_log SET transferred = true, transfer_time = now() WHERE message_id = $1::text::uuid"
            ))
            .await?;
        let (conn, ch) = confirm_channel(&self.amqp_url).await?;
        let started = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            let tx = pg.transaction().await?;
            tx.query_one(&lock, &[id]).await?;
            let body: Vec<u8> = tx.query_one(&read, &[id]).await?.get(0);
            let confirm = ch
                .basic_publish(
                    "".into(),
                    NAME.into(),
                    MANDATORY,
                    &body,
                    properties_lapin(i),
                )
                .await?
                .await?;
            check_lapin(Some(Ok(confirm)))?;
            tx.execute(&mark, &[id]).await?;
            tx.commit().await?;
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        wait_until(Duration::from_secs(60), || async { consumer.count() >= n }).await?;
        consumer.close().await;
        conn.close(200, "done".into()).await?;
        Ok(rate)
    }
}

/// Mandatory, as the relay publishes.
const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

/// A lapin connection with one channel in confirm mode.
async fn confirm_channel(url: &str) -> anyhow::Result<(Connection, lapin::Channel)> {
    let conn = amqp_connect(url).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

fn properties_lapin(i: usize) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/octet-stream".into())
        .with_message_id(ShortString::from(format!("bench-{i}")))
        .with_timestamp(unix_secs())
}

fn check_lapin(confirm: Option<lapin::Result<Confirmation>>) -> anyhow::Result<()> {
    match confirm {
        Some(Ok(Confirmation::Ack(None))) => Ok(()),
        other => bail!("unexpected confirm: {other:?}"),
    }
}

/// Counts amqprs publisher acks (single or multiple) and frees window permits.
struct AckCounter {
    permits: Arc<Semaphore>,
    acked: Arc<AtomicUsize>,
    pending: BTreeSet<u64>,
    next_tag: u64,
}

impl AckCounter {
    fn settle(&mut self, tag: u64, multiple: bool) {
        // Tags are handed out in publish order; track every unsettled one.
        while self.next_tag <= tag {
            self.pending.insert(self.next_tag);
            self.next_tag += 1;
        }
        let settled: Vec<u64> = if multiple {
            self.pending.range(..=tag).copied().collect()
        } else {
            vec![tag]
        };
        for t in &settled {
            self.pending.remove(t);
        }
        self.acked.fetch_add(settled.len(), Ordering::Relaxed);
        self.permits.add_permits(settled.len());
    }
}

/// amqprs's callbacks return its own error type.
type Result<T> = std::result::Result<T, amqprs::error::Error>;

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for AckCounter {
    async fn close(&mut self, _: &amqprs::channel::Channel, _: amqprs::CloseChannel) -> Result<()> {
        Ok(())
    }
    async fn cancel(&mut self, _: &amqprs::channel::Channel, _: amqprs::Cancel) -> Result<()> {
        Ok(())
    }
    async fn flow(&mut self, _: &amqprs::channel::Channel, active: bool) -> Result<bool> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &amqprs::channel::Channel, ack: amqprs::Ack) {
        self.settle(ack.delivery_tag(), ack.mutiple());
    }
    async fn publish_nack(&mut self, _: &amqprs::channel::Channel, nack: amqprs::Nack) {
        eprintln!("amqprs: nack for tag {}", nack.delivery_tag());
    }
    async fn publish_return(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Return,
        _: amqprs::BasicProperties,
        _: Vec<u8>,
    ) {
        eprintln!("amqprs: message returned");
    }
}

/// A bare publisher's rate and what the machine spent on it.
pub(crate) struct Bare {
    pub(crate) rate: f64,
    pub(crate) cpu: CpuSplit,
}

impl std::fmt::Display for Bare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0} msg/s; {}", self.rate, self.cpu)
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
