//! The relay's own scenarios: draining a backlog (throughput, start-up,
//! CPU, memory, idle cost; the outbox's buffer traffic when asked) and live
//! latency at fixed offered rates. [`Bench::drain`] is the drain every
//! scenario runs, set up by [`DrainSetup`].

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::consumer::Consumer;
use crate::harness::{Bench, Ids, NAME, RelaySetup, pg_connect, stop, wait_until};
use crate::procstat::{CpuSplit, process_usage};

/// What a drain is run with, apart from its size.
#[derive(Clone, Copy)]
pub(crate) struct DrainSetup<'a> {
    pub(crate) relay: RelaySetup<'a>,
    /// Whether the outbox (`relay.schema`) is emptied first: the bench's
    /// own is, the history's keeps its rows and only gets the pending ones.
    pub(crate) fresh_outbox: bool,
    /// Whether to watch the idle relay for 5 s afterwards (its CPU).
    pub(crate) idle: bool,
    /// Whether to count the outbox's buffer traffic (PostgreSQL's block
    /// statistics of its tables) during the drain.
    pub(crate) blocks: bool,
    /// The pending rows' ids, when not the bench's.
    pub(crate) ids: Option<Ids>,
    /// Ordering keys the rows take in turn ([`Bench::fill`]); none by
    /// default.
    pub(crate) keys: Option<u32>,
}

impl Default for DrainSetup<'_> {
    /// The backlog drain as the default run measures it.
    fn default() -> Self {
        Self {
            relay: RelaySetup::default(),
            fresh_outbox: true,
            idle: true,
            blocks: false,
            ids: None,
            keys: None,
        }
    }
}

impl Bench {
    /// Scenario 1: the relay drains a backlog of `n` rows.
    pub(crate) async fn relay_drain(&self, bin: &Path, n: usize) -> anyhow::Result<Drain> {
        self.drain(bin, n, DrainSetup::default()).await
    }

    /// [`Bench::relay_drain`] with another `(batch_size, buffer_size)`.
    pub(crate) async fn relay_drain_with(
        &self,
        bin: &Path,
        n: usize,
        window: Option<(usize, usize)>,
    ) -> anyhow::Result<Drain> {
        let mut setup = DrainSetup::default();
        setup.relay.window = window;
        self.drain(bin, n, setup).await
    }

    /// The relay drains `n` new rows, set up as `setup` says.
    pub(crate) async fn drain(
        &self,
        bin: &Path,
        n: usize,
        setup: DrainSetup<'_>,
    ) -> anyhow::Result<Drain> {
        let schema = setup.relay.schema;
        if setup.fresh_outbox {
            self.reset_outbox(schema).await?;
        }
        self.reset_queue().await?;
        self.fill(schema, n, setup.ids, setup.keys).await?;
        let blocks_before = match setup.blocks {
            true => Some(Blocks::read(self, schema).await?),
            false => None,
        };
        let consumer = Consumer::start(&self.amqp_url, false).await?;
        let cpu_before = CpuSplit::read(None);
        let started = Instant::now();
        let mut relay = self.spawn_relay(bin, setup.relay)?;
        let pid = relay.id().context("relay pid")?;
        // A second per 500 rows at the least: big backlogs on slow days.
        let limit = Duration::from_secs(600.max(n as u64 / 500));
        wait_until(limit, || async { consumer.count() >= n }).await?;
        wait_until(Duration::from_secs(60), || async {
            self.none_claimable(schema).await.unwrap_or(false)
        })
        .await?;
        let done = Instant::now();
        // Like the bare publishers' clocks, which start once connected, the
        // drain's starts at the first message: start-up is shown apart.
        let first = consumer.first_at().context("no message arrived")?;
        let pending = self.pending(schema).await?;
        if pending != 0 {
            bail!("{pending} rows are still not marked transferred after the drain");
        }
        let (cpu, peak_rss) = process_usage(pid)?;
        let cpu_split = CpuSplit::read(Some(pid)).per_10k_since(&cpu_before, n);
        let idle_cpu_percent = if setup.idle {
            // Idle: no notifications, only the sweep timer.
            tokio::time::sleep(Duration::from_secs(5)).await;
            let (cpu_after, _) = process_usage(pid)?;
            Some((cpu_after - cpu) / 5.0 * 100.0)
        } else {
            None
        };
        stop(&mut relay).await;
        let received = consumer.count();
        consumer.close().await;
        let blocks = match blocks_before {
            Some(before) => Some(Blocks::read(self, schema).await? - before),
            None => None,
        };
        Ok(Drain {
            rate: n as f64 / (done - first).as_secs_f64(),
            startup_ms: (first - started).as_secs_f64() * 1e3,
            cpu: cpu_split,
            peak_rss_mib: peak_rss as f64 / 1024.0,
            idle_cpu_percent,
            blocks,
            received,
        })
    }

    /// Scenario 2: producers at `rate` events/s for `secs` while the relay
    /// runs. With `keys`, each event gets one of that many ordering keys at
    /// random (a transaction's keys in sorted order, so producers that
    /// lock the same two keys cannot deadlock).
    pub(crate) async fn live_latency(
        &self,
        bin: &Path,
        rate: u32,
        secs: u64,
        keys: Option<u32>,
    ) -> anyhow::Result<Latency> {
        self.reset().await?;
        let consumer = Consumer::start(&self.amqp_url, true).await?;
        let mut relay = self.spawn_relay(bin, RelaySetup::default())?;
        // Ready when a probe event makes the round trip.
        let probe: String = self
            .pg
            .query_one(
                &format!("SELECT {NAME}.push_occurrence($1::bytea)::text"),
                &[&self.body],
            )
            .await?
            .get(0);
        wait_until(Duration::from_secs(30), || async {
            consumer.received(&probe).is_some()
        })
        .await?;

        // Open loop: each producer connection commits on a fixed schedule, so
        // a slow relay cannot slow the offered load down. PostgreSQL
        // serializes NOTIFYing commits (about 2 000/s here), so above
        // 1 000 events/s producers commit several events per transaction.
        let per_tx = rate.div_ceil(1000).max(1);
        let tx_rate = f64::from(rate) / f64::from(per_tx);
        let producers = (tx_rate / 250.0).ceil().max(1.0);
        let per_producer = tx_rate / producers;
        let total_per_producer = (per_producer * secs as f64) as usize;
        let per_tx = i32::try_from(per_tx).unwrap_or(1);
        let keys = i32::try_from(keys.unwrap_or(0))?;
        let sql = match keys {
            0 => format!(
                "SELECT {NAME}.push_occurrence($1::bytea)::text FROM generate_series(1, $2::int)"
            ),
            _ => format!(
                "SELECT {NAME}.push_occurrence($1::bytea, p_ordering_key => k)::text
                   FROM (SELECT 'k' || floor(random() * $3::int)::int AS k
                           FROM generate_series(1, $2::int) ORDER BY 1) keys"
            ),
        };
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..producers as usize {
            let pg = pg_connect(self.pg_port).await?;
            let body = self.body.clone();
            let sql = sql.clone();
            tasks.push(tokio::spawn(async move {
                let statement = pg.prepare(&sql).await?;
                let mut commits = Vec::with_capacity(total_per_producer);
                for i in 0..total_per_producer {
                    let due = started + Duration::from_secs_f64(i as f64 / per_producer);
                    tokio::time::sleep_until(due.into()).await;
                    let rows = match keys {
                        0 => pg.query(&statement, &[&body, &per_tx]).await?,
                        _ => pg.query(&statement, &[&body, &per_tx, &keys]).await?,
                    };
                    let committed = Instant::now();
                    commits.extend(rows.iter().map(|r| (r.get::<_, String>(0), committed)));
                }
                anyhow::Ok(commits)
            }));
        }
        let mut commits = Vec::new();
        for task in tasks {
            commits.extend(task.await??);
        }
        let produce_time = started.elapsed();
        let sent = commits.len();
        let caught_up = wait_until(Duration::from_secs(30), || async {
            commits
                .iter()
                .all(|(id, _)| consumer.received(id).is_some())
        })
        .await;
        let behind = started.elapsed() - produce_time;
        stop(&mut relay).await;
        caught_up?;
        let consumer_arrivals = consumer.arrivals.clone();
        consumer.close().await;
        let received = |id: &str| consumer_arrivals.lock().unwrap().get(id).copied();
        let mut latencies: Vec<f64> = commits
            .iter()
            .filter_map(|(id, commit)| {
                received(id)
                    .map(|got| got.saturating_duration_since(*commit).as_secs_f64() * 1000.0)
            })
            .collect();
        latencies.sort_by(f64::total_cmp);
        let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
        Ok(Latency {
            offered: rate,
            achieved: sent as f64 / produce_time.as_secs_f64(),
            p50: pick(0.5),
            p99: pick(0.99),
            p999: pick(0.999),
            max: *latencies.last().unwrap_or(&0.0),
            drained_after_ms: behind.as_secs_f64() * 1000.0,
        })
    }
}

pub(crate) struct Drain {
    /// Messages per second from the consumer's first message to the last
    /// row marked.
    pub(crate) rate: f64,
    /// From starting the relay's process to the consumer's first message.
    pub(crate) startup_ms: f64,
    pub(crate) cpu: CpuSplit,
    pub(crate) peak_rss_mib: f64,
    /// The idle relay's CPU after the drain, when watched.
    pub(crate) idle_cpu_percent: Option<f64>,
    /// The outbox's buffer traffic during the drain, when counted.
    pub(crate) blocks: Option<Blocks>,
    received: usize,
}

impl std::fmt::Display for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} msg/s (first message {:.0} ms after start), peak RSS {:.1} MiB, ",
            self.rate, self.startup_ms, self.peak_rss_mib,
        )?;
        if let Some(idle) = self.idle_cpu_percent {
            write!(f, "idle CPU {idle:.2} %, ")?;
        }
        write!(f, "received {}; {}", self.received, self.cpu)?;
        if let Some(blocks) = &self.blocks {
            write!(f, "; {blocks}")?;
        }
        Ok(())
    }
}

/// Blocks of an outbox's two tables (heap and indexes) that PostgreSQL read
/// from outside its shared buffers (the operating system's cache or the
/// disk) and found in them, from `pg_statio_user_tables`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Blocks {
    pub(crate) heap_read: i64,
    pub(crate) heap_hit: i64,
    pub(crate) index_read: i64,
    pub(crate) index_hit: i64,
}

impl Blocks {
    /// The counters so far. The bench's own session flushes its pending
    /// statistics first (PostgreSQL 15 keeps them up to a second, then
    /// sends them while a drain runs); the relay's sessions flush theirs as
    /// they end, which [`stop`] waits for only as far as the process, so
    /// a reading after a drain waits a moment longer.
    async fn read(bench: &Bench, schema: &str) -> anyhow::Result<Self> {
        bench
            .pg
            .batch_execute("SELECT pg_stat_force_next_flush()")
            .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let row = bench
            .pg
            .query_one(
                "SELECT coalesce(sum(heap_blks_read), 0)::int8, coalesce(sum(heap_blks_hit), 0)::int8,
                        coalesce(sum(idx_blks_read), 0)::int8, coalesce(sum(idx_blks_hit), 0)::int8
                   FROM pg_statio_user_tables WHERE schemaname = $1",
                &[&schema],
            )
            .await?;
        Ok(Self {
            heap_read: row.get(0),
            heap_hit: row.get(1),
            index_read: row.get(2),
            index_hit: row.get(3),
        })
    }
}

impl std::ops::Sub for Blocks {
    type Output = Self;

    fn sub(self, before: Self) -> Self {
        Self {
            heap_read: self.heap_read - before.heap_read,
            heap_hit: self.heap_hit - before.heap_hit,
            index_read: self.index_read - before.index_read,
            index_hit: self.index_hit - before.index_hit,
        }
    }
}

impl std::fmt::Display for Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "blocks read from outside shared buffers: heap {}, index {} (found in them: heap {}, index {})",
            self.heap_read, self.index_read, self.heap_hit, self.index_hit
        )
    }
}

pub(crate) struct Latency {
    pub(crate) offered: u32,
    pub(crate) achieved: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
    drained_after_ms: f64,
}

impl Latency {
    /// The relay kept up: producers reached 95 % of the offered rate and the
    /// last event arrived within a second of the last commit.
    pub(crate) fn kept_up(&self) -> bool {
        self.achieved >= 0.95 * f64::from(self.offered) && self.drained_after_ms < 1000.0
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "offered {}/s, achieved {:.0}/s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; last event {:.0} ms after the last commit; kept up: {}",
            self.offered,
            self.achieved,
            self.p50,
            self.p99,
            self.p999,
            self.max,
            self.drained_after_ms,
            if self.kept_up() { "yes" } else { "no" }
        )
    }
}
