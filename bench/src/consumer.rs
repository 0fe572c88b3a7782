//! The live consumer every scenario runs on the bench queue: it counts
//! deliveries and, for the latency scenario, records when each id arrived.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use futures_util::StreamExt;
use lapin::Connection;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;

use crate::harness::{NAME, amqp_connect};

/// A live consumer on the bench queue (auto-ack), optionally recording when
/// each message id arrived.
pub(crate) struct Consumer {
    count: Arc<AtomicUsize>,
    /// When the first message arrived.
    first: Arc<OnceLock<Instant>>,
    pub(crate) arrivals: Arc<Mutex<HashMap<String, Instant>>>,
    /// Closed explicitly: a dropped lapin connection stays open and would
    /// keep consuming from the next scenario's queue.
    connection: Connection,
}

impl Consumer {
    pub(crate) async fn start(url: &str, record: bool) -> anyhow::Result<Self> {
        let connection = amqp_connect(url).await?;
        let channel = connection.create_channel().await?;
        let mut consumer = channel
            .basic_consume(
                NAME.into(),
                "bench".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let count = Arc::new(AtomicUsize::new(0));
        let arrivals = Arc::new(Mutex::new(HashMap::new()));
        let first = Arc::new(OnceLock::new());
        let (c, a, f) = (count.clone(), arrivals.clone(), first.clone());
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                f.get_or_init(Instant::now);
                if record {
                    let now = Instant::now();
                    if let Some(id) = delivery.properties.message_id() {
                        a.lock().unwrap().entry(id.to_string()).or_insert(now);
                    }
                }
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Self {
            count,
            first,
            arrivals,
            connection,
        })
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub(crate) fn first_at(&self) -> Option<Instant> {
        self.first.get().copied()
    }

    pub(crate) async fn close(self) {
        let _ = self.connection.close(200, "scenario done".into()).await;
    }

    pub(crate) fn received(&self, id: &str) -> Option<Instant> {
        self.arrivals.lock().unwrap().get(id).copied()
    }
}
