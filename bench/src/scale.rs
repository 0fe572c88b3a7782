//! The scale scenarios, each opt-in and each measured against a reference
//! from the same run, since the machine's speed drifts over minutes:
//!
//! * history (`--history`): drains over a history of transferred rows
//!   grown step by step, alternating with drains over an empty history;
//! * backlog (`--backlog`): drains of backlogs of several sizes, in rounds;
//! * distance (`--rtt-ms`): drains and lapin's bare publisher through
//!   [`DelayProxy`]s adding a round trip, alternating, and without them.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::baselines::Bare;
use crate::harness::{Bench, Endpoints, HISTORY_SCHEMA, Ids, RelaySetup};
use crate::proxy::{DelayProxy, amqp_url_via};
use crate::scenarios::{Drain, DrainSetup};

/// Transferred rows added to the history per statement.
pub(crate) const HISTORY_CHUNK: u64 = 500_000;

/// The history scenario with one kind of ids.
pub(crate) struct HistoryRun {
    pub(crate) ids: Ids,
    pub(crate) steps: Vec<HistoryStep>,
    /// PostgreSQL's `shared_buffers`, beyond which blocks are "read".
    pub(crate) shared_buffers: String,
}

/// Drains over one size of history, each paired with a drain over an
/// empty history run just before it.
pub(crate) struct HistoryStep {
    /// Transferred rows in the outbox when the step's first drain began.
    pub(crate) history: u64,
    /// `(empty history, this history)` per pair, in run order.
    pub(crate) pairs: Vec<(Drain, Drain)>,
}

/// Drains of one backlog size, one per round.
pub(crate) struct BacklogSize {
    pub(crate) rows: usize,
    pub(crate) drains: Vec<Drain>,
}

/// Drains and bare publishers through one added round trip.
pub(crate) struct DistanceStep {
    /// Added round trip; 0 is without proxies.
    pub(crate) rtt_ms: f64,
    /// `(relay drain, bare lapin)` per pair, in run order.
    pub(crate) pairs: Vec<(Drain, Bare)>,
}

/// What the scale scenarios' drains leave out: the idle relay is the
/// default run's business.
fn quick() -> DrainSetup<'static> {
    DrainSetup {
        idle: false,
        ..DrainSetup::default()
    }
}

impl Bench {
    /// Drains of `rows` rows with `ids` over a history grown to each of
    /// `sizes` in turn (the drained rows join it), each paired `pairs` times
    /// with a drain over an empty history.
    pub(crate) async fn history(
        &self,
        bin: &Path,
        ids: Ids,
        sizes: &[u64],
        rows: usize,
        pairs: usize,
    ) -> anyhow::Result<HistoryRun> {
        self.reset_outbox(HISTORY_SCHEMA).await?;
        let counted = DrainSetup {
            blocks: true,
            ids: Some(ids),
            ..quick()
        };
        let over_history = DrainSetup {
            relay: RelaySetup {
                schema: HISTORY_SCHEMA,
                ..RelaySetup::default()
            },
            fresh_outbox: false,
            ..counted
        };
        let mut history = 0;
        let mut steps = Vec::new();
        for &size in sizes {
            if size > history {
                let started = Instant::now();
                self.grow_history(ids, history, size).await?;
                history = size;
                println!(
                    "  history of {history} rows ({} ids) built in {:.0} s",
                    ids.name(),
                    started.elapsed().as_secs_f64()
                );
            }
            let mut step = HistoryStep {
                history,
                pairs: Vec::new(),
            };
            for _ in 0..pairs {
                let empty = self.drain(bin, rows, counted).await?;
                println!("  empty history: {empty}");
                let over = self.drain(bin, rows, over_history).await?;
                history += rows as u64;
                println!(
                    "  {} rows of history: {over} ({:.2}x the empty history's)",
                    step.history,
                    over.rate / empty.rate
                );
                step.pairs.push((empty, over));
            }
            steps.push(step);
        }
        // Gigabytes, and the next kind of ids builds its own.
        self.pg
            .batch_execute(&format!("DROP SCHEMA {HISTORY_SCHEMA} CASCADE"))
            .await?;
        let shared_buffers = self.pg.query_one("SHOW shared_buffers", &[]).await?.get(0);
        Ok(HistoryRun {
            ids,
            steps,
            shared_buffers,
        })
    }

    /// Adds transferred rows (bodies of the bench's size) to the history's
    /// outbox until it holds `to`, then vacuums, analyses and checkpoints,
    /// so the drains after it neither inherit the writes nor find the
    /// tables unvacuumed.
    async fn grow_history(&self, ids: Ids, from: u64, to: u64) -> anyhow::Result<()> {
        let s = HISTORY_SCHEMA;
        let mut have = from;
        while have < to {
            let chunk = (to - have).min(HISTORY_CHUNK);
            self.pg
                .execute(
                    &format!(
                        "WITH ids AS (
                           INSERT INTO {s}.message_queue_log (message_id, transferred, transfer_time, relay_enqueued_at)
                           SELECT {id}, true, localtimestamp - interval '1 day', clock_timestamp() - interval '1 day'
                             FROM generate_series(1, $1::int) RETURNING message_id)
                         INSERT INTO {s}.message_queue_log_data (message_id, message_body)
                         SELECT message_id, $2::bytea FROM ids",
                        id = ids.sql()
                    ),
                    &[&i32::try_from(chunk)?, &self.body],
                )
                .await?;
            have += chunk;
        }
        for statement in [
            format!("VACUUM ANALYZE {s}.message_queue_log"),
            format!("VACUUM ANALYZE {s}.message_queue_log_data"),
            "CHECKPOINT".to_owned(),
        ] {
            self.pg.batch_execute(&statement).await?;
        }
        Ok(())
    }

    /// Drains of each of `sizes`, smallest first, in `rounds` rounds.
    pub(crate) async fn backlogs(
        &self,
        bin: &Path,
        sizes: &[usize],
        rounds: usize,
    ) -> anyhow::Result<Vec<BacklogSize>> {
        let mut results: Vec<BacklogSize> = sizes
            .iter()
            .map(|&rows| BacklogSize {
                rows,
                drains: Vec::new(),
            })
            .collect();
        for _ in 0..rounds {
            for size in &mut results {
                let drain = self.drain(bin, size.rows, quick()).await?;
                println!("  {} rows: {drain}", size.rows);
                size.drains.push(drain);
            }
        }
        Ok(results)
    }

    /// For no added round trip and each of `rtts_ms`: `pairs` drains of
    /// `rows` rows, each followed by lapin's bare publisher with `window`
    /// confirms in flight, both through the same delay proxies.
    pub(crate) async fn distance(
        &self,
        bin: &Path,
        rtts_ms: &[f64],
        rows: usize,
        window: usize,
        pairs: usize,
    ) -> anyhow::Result<Vec<DistanceStep>> {
        let broker = pushoccurrence::amqp::parse_uri(&self.amqp_url)
            .map_err(|e| anyhow::anyhow!("--amqp-url is not an AMQP URL: {e}"))?;
        let broker = format!("{}:{}", broker.authority.host, broker.authority.port);
        let mut steps = Vec::new();
        for &rtt_ms in std::iter::once(&0.0).chain(rtts_ms) {
            let rtt = Duration::from_secs_f64(rtt_ms / 1e3);
            // Kept until the step ends: dropping them stops the proxies.
            let proxies = match rtt_ms > 0.0 {
                true => Some((
                    DelayProxy::start(&format!("127.0.0.1:{}", self.pg_port), rtt)
                        .context("PostgreSQL's delay proxy")?,
                    DelayProxy::start(&broker, rtt).context("RabbitMQ's delay proxy")?,
                )),
                false => None,
            };
            let via = match &proxies {
                Some((pg, mq)) => Some(Endpoints {
                    pg_port: pg.port(),
                    amqp_url: amqp_url_via(&self.amqp_url, mq.port())?,
                }),
                None => None,
            };
            let setup = DrainSetup {
                relay: RelaySetup {
                    via: via.as_ref(),
                    ..RelaySetup::default()
                },
                ..quick()
            };
            let url = via.as_ref().map_or(&self.amqp_url, |v| &v.amqp_url);
            let mut step = DistanceStep {
                rtt_ms,
                pairs: Vec::new(),
            };
            for _ in 0..pairs {
                let drain = self.drain(bin, rows, setup).await?;
                println!("  {rtt_ms} ms: relay: {drain}");
                let bare = self.bare_lapin_via(url, rows, window).await?;
                println!(
                    "  {rtt_ms} ms: lapin: {bare} (relay / lapin {:.2}x)",
                    drain.rate / bare.rate
                );
                step.pairs.push((drain, bare));
            }
            steps.push(step);
        }
        Ok(steps)
    }
}
