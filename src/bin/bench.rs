//! `pushoccurrence-bench`: measures the relay against baselines in one run,
//! on this machine, with one message shape (1 KiB persistent messages,
//! mandatory, with a message id, into a durable queue with a live consumer).
//!
//! Scenarios:
//! 1. backlog drain: the relay binary drains N pending rows;
//! 2. live latency: producers insert + NOTIFY at fixed rates while the relay
//!    runs; latency from each producer's commit to the consumer's receipt;
//! 3. baselines: a bare publisher with lapin and with amqprs, each with the
//!    relay's in-flight window, and the seed's algorithm (per message: lock,
//!    read, publish, wait for the confirm, mark, commit).
//!
//! The drain and lapin's bare publisher run in alternating pairs, and the
//! ratio reported is the median pair's: the machine's speed drifts over
//! minutes, and a drain measured minutes apart from its baseline would show
//! the drift as much as the relay.
//!
//! It prints every figure and the ratios, and rewrites `docs/benchmarks.md`
//! and `docs/latency.svg`. Run it with the README's bench command.

#![allow(clippy::let_underscore_must_use)] // clean-up between scenarios is best effort
#![allow(clippy::disallowed_methods)] // a tool: reads its own BENCH_* variables

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_postgres::{Client, NoTls};

use pushoccurrence::config::Config;
use pushoccurrence::db::migrate;

/// Benchmarks the relay and its baselines against the local services.
#[derive(Debug, Parser)]
struct Args {
    /// Rows in the backlog-drain scenario and messages per bare publisher.
    #[arg(long, default_value_t = 100_000)]
    rows: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    body: usize,
    /// Offered rates (events/s) of the live-latency scenario.
    #[arg(long, value_delimiter = ',', default_value = "500,2000,5000")]
    rates: Vec<u32>,
    /// Seconds each offered rate runs.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Messages sent with the seed's algorithm (it is slow).
    #[arg(long, default_value_t = 5_000)]
    seed_rows: usize,
    /// Where to write benchmarks.md and latency.svg; empty to skip.
    #[arg(long, default_value = "docs")]
    out: String,
    /// PostgreSQL port on 127.0.0.1 (user postgres, database test).
    #[arg(long, default_value_t = 5432)]
    pg_port: u16,
    /// RabbitMQ URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Overrides the relay's `rabbitmq.retry.buffer_size` (default: the relay's default).
    #[arg(long)]
    buffer_size: Option<usize>,
    /// Overrides the relay's `relay.batch_size` (default: the relay's default).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Alternating relay-drain / bare-lapin pairs; the median pair's ratio
    /// is reported.
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Skips the baselines and the sweep (for tuning the relay alone).
    #[arg(long)]
    relay_only: bool,
    /// `batch_size/buffer_size` pairs whose drain the sweep measures, to
    /// choose the defaults by.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "64/256,128/256,256/512,128/512,256/1024"
    )]
    sweep: Vec<String>,
    /// Drains per sweep pair (0 skips the sweep).
    #[arg(long, default_value_t = 2)]
    sweep_runs: usize,
}

const NAME: &str = "po_bench";

/// On the relay's runtime (one worker thread unless `TOKIO_WORKER_THREADS`
/// says otherwise), so the bare publishers and the consumer get what the
/// relay gets.
fn main() -> anyhow::Result<()> {
    pushoccurrence::service::runtime(pushoccurrence::config::worker_threads()?)?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let relay_bin = relay_binary()?;
    let bench = Bench::new(&args).await?;
    let mut report = Report::default();

    let window = bench.config.relay.buffer_size;
    println!(
        "backlog drain of {} rows of {} B, then lapin's bare publisher with {window} confirms in flight: {} pairs",
        args.rows,
        args.body,
        args.pairs.max(1)
    );
    let mut pairs = Vec::new();
    for _ in 0..args.pairs.max(1) {
        let drain = bench.relay_drain(&relay_bin, args.rows).await?;
        println!("  relay: {drain}");
        if args.relay_only {
            return Ok(());
        }
        let bare = bench.bare_lapin(args.rows, window).await?;
        println!(
            "  lapin: {bare} (relay / lapin {:.2}x)",
            drain.rate / bare.rate
        );
        pairs.push((drain, bare));
    }
    report.keep_median_pair(pairs);
    println!("bare amqprs: {} messages", args.rows);
    report.bare_amqprs = Some(bench.bare_amqprs(args.rows, window).await?);
    println!("  amqprs: {}", report.bare_amqprs.as_ref().unwrap());

    println!("seed algorithm: {} messages, one at a time", args.seed_rows);
    report.seed = Some(bench.seed_algorithm(args.seed_rows).await?);
    println!("  seed: {:.0} msg/s", report.seed.unwrap());

    for &rate in &args.rates {
        println!("live latency at {rate} events/s for {} s", args.secs);
        let latency = bench.live_latency(&relay_bin, rate, args.secs).await?;
        println!("  {latency}");
        report.latency.push(latency);
    }

    if args.sweep_runs > 0 {
        println!(
            "sweep: {} drains of {} rows per batch_size/buffer_size pair",
            args.sweep_runs, args.rows
        );
    }
    for pair in args.sweep.iter().filter(|_| args.sweep_runs > 0) {
        let (batch, buffer) = pair
            .split_once('/')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .with_context(|| format!("--sweep takes batch_size/buffer_size pairs, not {pair}"))?;
        let mut drains = Vec::new();
        for _ in 0..args.sweep_runs {
            let drain = bench
                .relay_drain_with(&relay_bin, args.rows, Some((batch, buffer)))
                .await?;
            println!("  {batch}/{buffer}: {drain}");
            drains.push(drain);
        }
        report.sweep.push((batch, buffer, drains));
    }

    bench.cleanup().await;
    let machine = machine_description(&bench.pg).await;
    report.print(&bench, &machine);
    if !args.out.is_empty() {
        let dir = Path::new(&args.out);
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("latency.svg"), report.latency_svg())?;
        std::fs::write(
            dir.join("benchmarks.md"),
            report.markdown(&bench, &machine, &args),
        )?;
        println!(
            "wrote {}/benchmarks.md and {}/latency.svg",
            args.out, args.out
        );
    }
    Ok(())
}

/// The `pushoccurrence` binary built beside this one.
fn relay_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("pushoccurrence");
    if !path.exists() {
        bail!(
            "{} not found; build both binaries: cargo build --release --features bench --bins",
            path.display()
        );
    }
    Ok(path)
}

struct Bench {
    pg: Client,
    amqp_url: String,
    pg_port: u16,
    body: Vec<u8>,
    config: Config,
    config_json: serde_json::Value,
    dir: tempfile::TempDir,
}

impl Bench {
    async fn new(args: &Args) -> anyhow::Result<Self> {
        let pg = pg_connect(args.pg_port).await?;
        // Two runs at once would share the schema and queue and spoil both.
        let others: i64 = pg
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name IN ($1, 'po-bench') AND pid <> pg_backend_pid()", &[&NAME])
            .await?
            .get(0);
        if others > 0 {
            bail!(
                "another benchmark (or its relay) is still connected to the database; stop it first"
            );
        }
        // The relay's defaults, with only the names and endpoints set.
        let mut config_json = json!({
            "postgres": {"host": "127.0.0.1", "port": args.pg_port, "database": "test", "user": "postgres",
                         "schema": NAME, "application_name": NAME},
            "rabbitmq": {"url": args.amqp_url, "connection_name": NAME, "queue": {"name": NAME}},
            "listener": {"channels": [NAME]},
            // Any free port: a relay running beside the bench keeps its own.
            "admin": {"listen": "127.0.0.1:0"}
        });
        if let Some(n) = args.buffer_size {
            config_json["rabbitmq"]["retry"] = json!({"buffer_size": n});
        }
        if let Some(n) = args.batch_size {
            config_json["relay"] = json!({"batch_size": n});
        }
        let config = Config::parse(
            &config_json.to_string(),
            &Default::default(),
            "bench config",
        )?;
        let body = (0..args.body).map(|i| (i % 251) as u8).collect();
        Ok(Self {
            pg,
            amqp_url: args.amqp_url.clone(),
            pg_port: args.pg_port,
            body,
            config,
            config_json,
            dir: tempfile::tempdir()?,
        })
    }

    /// A fresh, empty outbox and an empty queue.
    async fn reset(&self) -> anyhow::Result<()> {
        self.pg
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {NAME} CASCADE"))
            .await?;
        migrate::run(&self.pg, NAME, NAME).await?;
        let conn = amqp_connect(&self.amqp_url).await?;
        let ch = conn.create_channel().await?;
        ch.queue_declare(
            NAME.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_purge(NAME.into(), QueuePurgeOptions::default())
            .await?;
        conn.close(200, "reset".into()).await?;
        Ok(())
    }

    /// Inserts `n` pending rows with bodies of the configured size.
    async fn fill(&self, n: usize) -> anyhow::Result<Vec<String>> {
        let rows = self
            .pg
            .query(
                &format!(
                    "WITH ids AS (INSERT INTO {NAME}.message_queue_log (message_id)
                                  SELECT gen_random_uuid() FROM generate_series(1, $1::int) RETURNING message_id),
                          bodies AS (INSERT INTO {NAME}.message_queue_log_data (message_id, message_body)
                                  SELECT message_id, $2::bytea FROM ids)
                     SELECT message_id::text FROM ids"
                ),
                &[&(n as i32), &self.body],
            )
            .await?;
        self.pg
            .batch_execute(&format!("VACUUM ANALYZE {NAME}.message_queue_log"))
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Whether no row is left to claim: cheap through the partial index,
    /// for polling while the clock runs.
    async fn none_claimable(&self) -> anyhow::Result<bool> {
        Ok(self
            .pg
            .query_one(
                &format!(
                    "SELECT NOT EXISTS (SELECT 1 FROM {NAME}.message_queue_log
                                         WHERE transferred IS NOT TRUE AND relay_parked_at IS NULL)"
                ),
                &[],
            )
            .await?
            .get(0))
    }

    /// Rows not marked transferred, parked or not: a scan of the table.
    async fn pending(&self) -> anyhow::Result<i64> {
        Ok(self
            .pg
            .query_one(
                &format!(
                    "SELECT count(*) FROM {NAME}.message_queue_log WHERE transferred IS NOT TRUE"
                ),
                &[],
            )
            .await?
            .get(0))
    }

    /// Starts the relay with the bench's config, or with `window`'s
    /// `(batch_size, buffer_size)` instead of the defaults.
    fn spawn_relay(
        &self,
        bin: &Path,
        window: Option<(usize, usize)>,
    ) -> anyhow::Result<tokio::process::Child> {
        let mut config = self.config_json.clone();
        if let Some((batch, buffer)) = window {
            config["relay"] = json!({"batch_size": batch});
            config["rabbitmq"]["retry"] = json!({"buffer_size": buffer});
        }
        let path = self.dir.path().join("config.json");
        std::fs::write(&path, config.to_string())?;
        Ok(tokio::process::Command::new(bin)
            .arg("--config")
            .arg(&path)
            .arg("run")
            .env(
                "RUST_LOG",
                std::env::var("BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .spawn()?)
    }

    /// Scenario 1: the relay drains a backlog of `n` rows.
    async fn relay_drain(&self, bin: &Path, n: usize) -> anyhow::Result<Drain> {
        self.relay_drain_with(bin, n, None).await
    }

    /// [`Bench::relay_drain`] with another `(batch_size, buffer_size)`.
    async fn relay_drain_with(
        &self,
        bin: &Path,
        n: usize,
        window: Option<(usize, usize)>,
    ) -> anyhow::Result<Drain> {
        self.reset().await?;
        self.fill(n).await?;
        let consumer = Consumer::start(&self.amqp_url, false).await?;
        let cpu_before = CpuSplit::read(None);
        let started = Instant::now();
        let mut relay = self.spawn_relay(bin, window)?;
        let pid = relay.id().context("relay pid")?;
        wait_until(Duration::from_secs(600), || async { consumer.count() >= n }).await?;
        wait_until(Duration::from_secs(60), || async {
            self.none_claimable().await.unwrap_or(false)
        })
        .await?;
        let done = Instant::now();
        // Like the bare publishers' clocks, which start once connected, the
        // drain's starts at the first message: start-up is shown apart.
        let first = consumer.first_at().context("no message arrived")?;
        let pending = self.pending().await?;
        if pending != 0 {
            bail!("{pending} rows are still not marked transferred after the drain");
        }
        let (cpu, peak_rss) = process_usage(pid)?;
        let cpu_split = CpuSplit::read(Some(pid)).per_10k_since(&cpu_before, n);
        // Idle: no notifications, only the sweep timer.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (cpu_after, _) = process_usage(pid)?;
        stop(&mut relay).await;
        let received = consumer.count();
        consumer.close().await;
        Ok(Drain {
            rate: n as f64 / (done - first).as_secs_f64(),
            startup_ms: (first - started).as_secs_f64() * 1e3,
            cpu: cpu_split,
            peak_rss_mib: peak_rss as f64 / 1024.0,
            idle_cpu_percent: (cpu_after - cpu) / 5.0 * 100.0,
            received,
        })
    }

    /// Baseline: lapin publishing `n` messages with `window` confirms in flight.
    async fn bare_lapin(&self, n: usize, window: usize) -> anyhow::Result<Bare> {
        self.reset().await?;
        let consumer = Consumer::start(&self.amqp_url, false).await?;
        let (conn, ch) = confirm_channel(&self.amqp_url).await?;
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
    async fn bare_amqprs(&self, n: usize, window: usize) -> anyhow::Result<Bare> {
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
    async fn seed_algorithm(&self, n: usize) -> anyhow::Result<f64> {
        self.reset().await?;
        let ids = self.fill(n).await?;
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

    /// Scenario 2: producers at `rate` events/s for `secs` while the relay runs.
    async fn live_latency(&self, bin: &Path, rate: u32, secs: u64) -> anyhow::Result<Latency> {
        self.reset().await?;
        let consumer = Consumer::start(&self.amqp_url, true).await?;
        let mut relay = self.spawn_relay(bin, None)?;
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
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..producers as usize {
            let pg = pg_connect(self.pg_port).await?;
            let body = self.body.clone();
            tasks.push(tokio::spawn(async move {
                let statement = pg
                    .prepare(&format!(
                        "SELECT {NAME}.push_occurrence($1::bytea)::text FROM generate_series(1, $2::int)"
                    ))
                    .await?;
                let mut commits = Vec::with_capacity(total_per_producer);
                for i in 0..total_per_producer {
                    let due = started + Duration::from_secs_f64(i as f64 / per_producer);
                    tokio::time::sleep_until(due.into()).await;
                    let rows = pg.query(&statement, &[&body, &per_tx]).await?;
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

    async fn cleanup(&self) {
        let _ = self
            .pg
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {NAME} CASCADE"))
            .await;
        if let Ok(conn) = amqp_connect(&self.amqp_url).await {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch.queue_delete(NAME.into(), Default::default()).await;
            }
            let _ = conn.close(200, "bye".into()).await;
        }
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

/// A live consumer on the bench queue (auto-ack), optionally recording when
/// each message id arrived.
struct Consumer {
    count: Arc<AtomicUsize>,
    /// When the first message arrived.
    first: Arc<OnceLock<Instant>>,
    arrivals: Arc<Mutex<HashMap<String, Instant>>>,
    /// Closed explicitly: a dropped lapin connection stays open and would
    /// keep consuming from the next scenario's queue.
    connection: Connection,
}

impl Consumer {
    async fn start(url: &str, record: bool) -> anyhow::Result<Self> {
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

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn first_at(&self) -> Option<Instant> {
        self.first.get().copied()
    }

    async fn close(self) {
        let _ = self.connection.close(200, "scenario done".into()).await;
    }

    fn received(&self, id: &str) -> Option<Instant> {
        self.arrivals.lock().unwrap().get(id).copied()
    }
}

struct Drain {
    /// Messages per second from the consumer's first message to the last
    /// row marked.
    rate: f64,
    /// From starting the relay's process to the consumer's first message.
    startup_ms: f64,
    cpu: CpuSplit,
    peak_rss_mib: f64,
    idle_cpu_percent: f64,
    received: usize,
}

impl std::fmt::Display for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} msg/s (first message {:.0} ms after start), peak RSS {:.1} MiB, idle CPU {:.2} %, received {}; {}",
            self.rate,
            self.startup_ms,
            self.peak_rss_mib,
            self.idle_cpu_percent,
            self.received,
            self.cpu
        )
    }
}

/// A bare publisher's rate and what the machine spent on it.
struct Bare {
    rate: f64,
    cpu: CpuSplit,
}

impl std::fmt::Display for Bare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0} msg/s; {}", self.rate, self.cpu)
    }
}

struct Latency {
    offered: u32,
    achieved: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    drained_after_ms: f64,
}

impl Latency {
    /// The relay kept up: producers reached 95 % of the offered rate and the
    /// last event arrived within a second of the last commit.
    fn kept_up(&self) -> bool {
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

/// A chart line: its name, colour and which percentile it plots.
type Series = (&'static str, &'static str, fn(&Latency) -> f64);

#[derive(Default)]
struct Report {
    /// The drain and bare lapin run of the median pair.
    drain: Option<Drain>,
    bare_lapin: Option<Bare>,
    /// relay / bare lapin of every pair, in run order.
    pair_ratios: Vec<f64>,
    bare_amqprs: Option<Bare>,
    seed: Option<f64>,
    latency: Vec<Latency>,
    /// Drains per `(batch_size, buffer_size)` pair.
    sweep: Vec<(usize, usize, Vec<Drain>)>,
}

impl Report {
    /// Keeps the pair whose ratio is the median (the lower middle one of an
    /// even number), and every pair's ratio.
    fn keep_median_pair(&mut self, mut pairs: Vec<(Drain, Bare)>) {
        self.pair_ratios = pairs.iter().map(|(d, b)| d.rate / b.rate).collect();
        pairs.sort_by(|(d1, b1), (d2, b2)| (d1.rate / b1.rate).total_cmp(&(d2.rate / b2.rate)));
        if !pairs.is_empty() {
            let (drain, bare) = pairs.swap_remove((pairs.len() - 1) / 2);
            self.drain = Some(drain);
            self.bare_lapin = Some(bare);
        }
    }

    fn pair_ratios(&self) -> String {
        self.pair_ratios
            .iter()
            .map(|r| format!("{r:.2}x"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn rate(bare: Option<&Bare>) -> f64 {
        bare.map_or(0.0, |b| b.rate)
    }

    fn ratios(&self) -> (f64, f64) {
        let relay = self.drain.as_ref().map_or(0.0, |d| d.rate);
        (
            relay / Self::rate(self.bare_lapin.as_ref()),
            relay / self.seed.unwrap_or(f64::NAN),
        )
    }

    fn print(&self, bench: &Bench, machine: &str) {
        let (vs_bare, vs_seed) = self.ratios();
        println!("\n== summary ({machine}) ==");
        println!("relay settings: {}", settings(bench));
        if let Some(d) = &self.drain {
            println!("relay backlog drain: {d}");
        }
        println!(
            "bare lapin: {:.0} msg/s; bare amqprs: {:.0} msg/s; seed algorithm: {:.0} msg/s",
            Self::rate(self.bare_lapin.as_ref()),
            Self::rate(self.bare_amqprs.as_ref()),
            self.seed.unwrap_or(0.0)
        );
        println!(
            "relay / bare publisher (lapin): {vs_bare:.2}x (the median of pairs at {}); relay / seed algorithm: {vs_seed:.1}x",
            self.pair_ratios()
        );
        for l in &self.latency {
            println!("latency: {l}");
        }
    }

    fn markdown(&self, bench: &Bench, machine: &str, args: &Args) -> String {
        let (vs_bare, vs_seed) = self.ratios();
        let d = self.drain.as_ref();
        let mut md = format!(
            "# Benchmarks\n\n\
             Generated by `pushoccurrence-bench` on {date}; rerun with the README's bench command\n\
             (it rewrites this file and `latency.svg`). Every figure below comes from one run on one\n\
             machine, so only the ratios between them mean much: these machines are shared and noisy.\n\n\
             **Machine:** {machine}.\n\n\
             **Message shape:** {body} B bodies (`bytea`), persistent, `mandatory`, with a `message_id`,\n\
             into a durable classic queue with a live consumer (auto-ack), publisher confirms on.\n\n\
             **Relay settings:** the defaults ({settings}).\n\n\
             ## Throughput\n\n\
             | scenario | messages/s | notes |\n| --- | ---: | --- |\n",
            date = today(),
            body = args.body,
            settings = settings(bench),
        );
        if let Some(d) = d {
            md += &format!(
                "| relay: backlog drain of {} rows | {:.0} | from the consumer's first message (the relay's start-up before it: {:.0} ms) until every row is marked transferred |\n",
                args.rows, d.rate, d.startup_ms
            );
        }
        md += &format!(
            "| bare publisher, lapin, {w} confirms in flight | {:.0} | the broker's limit with the relay's client; connected, from the first publish to the last confirm |\n\
             | bare publisher, amqprs, {w} confirms in flight | {:.0} | the other maintained Rust client |\n\
             | seed algorithm (lock, read, publish, wait, mark, commit per message) | {:.0} | the floor; {} messages |\n\n\
             **Ratios:** relay / bare publisher = **{vs_bare:.2}x**; relay / seed algorithm = **{vs_seed:.1}x**.\n\n\
             The drain and lapin's bare publisher ran in {n} alternating pairs, because the machine's speed\n\
             drifts over minutes; the figures above are the median pair's. Every pair's relay / bare ratio,\n\
             in run order: {ratios}.\n\n",
            Self::rate(self.bare_lapin.as_ref()),
            Self::rate(self.bare_amqprs.as_ref()),
            self.seed.unwrap_or(0.0),
            args.seed_rows,
            w = bench.config.relay.buffer_size,
            n = self.pair_ratios.len(),
            ratios = self.pair_ratios(),
        );
        if let Some(d) = d {
            md += &format!(
                "**Relay resources during the drain:** peak RSS {:.1} MiB; {:.2} CPU seconds per 10 000 messages; \
                 {:.2} % of one core when idle afterwards (sweeps every {} ms, no notifications).\n\n",
                d.peak_rss_mib,
                d.cpu.relay,
                d.idle_cpu_percent,
                bench.config.relay.idle_sleep.as_millis()
            );
        }
        md += "## Where the CPU goes\n\n\
               CPU seconds per 10 000 messages, read from `/proc` for every process on the machine\n\
               during each scenario. Everything shares the same two cores, so the machine's\n\
               throughput is bounded by the total: the relay is faster than a bare publisher only if\n\
               its whole path (its own work, PostgreSQL's and the broker's) costs less per message.\n\n\
               | scenario | relay | PostgreSQL | RabbitMQ | bench process | total |\n\
               | --- | ---: | ---: | ---: | ---: | ---: |\n";
        let rows = [
            ("relay: backlog drain (bench = consumer)", d.map(|d| d.cpu)),
            (
                "bare lapin (bench = publisher + consumer)",
                self.bare_lapin.as_ref().map(|b| b.cpu),
            ),
            (
                "bare amqprs (bench = publisher + consumer)",
                self.bare_amqprs.as_ref().map(|b| b.cpu),
            ),
        ];
        for (name, cpu) in rows {
            if let Some(c) = cpu {
                md += &format!(
                    "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                    c.relay,
                    c.postgres,
                    c.rabbitmq,
                    c.bench,
                    c.total()
                );
            }
        }
        if let (Some(d), Some(bare)) = (d, self.bare_lapin.as_ref()) {
            md += &format!(
                "\nIn this run the relay's whole path cost {:.2} CPU seconds per 10 000 messages and lapin's bare\n\
                 publisher's {:.2}. PostgreSQL's part, {:.2} (claiming, reading and marking every row), is work the\n\
                 bare publisher never does. Against that, the relay's own process (publisher and\n\
                 PostgreSQL client) cost {:.2} against about {:.2} for the bare publisher (the bench process\n\
                 less the consumer's share in the drain), and the broker spent {:.2} per 10 000 against {:.2}.\n",
                d.cpu.total(),
                bare.cpu.total(),
                d.cpu.postgres,
                d.cpu.relay,
                bare.cpu.bench - d.cpu.bench,
                d.cpu.rabbitmq,
                bare.cpu.rabbitmq,
            );
        }
        md += "\n";
        if !self.sweep.is_empty() {
            md += &format!(
                "## Choosing the defaults\n\n\
                 Drains of {} rows with other `relay.batch_size` / `rabbitmq.retry.buffer_size` pairs, in\n\
                 the same run (means of {} drains each). The broker's CPU per message grows with the number of\n\
                 confirms in flight. Pairs within about 10 % of each other are within this machine's noise;\n\
                 the defaults are the smallest of the fastest pairs, since fewer confirms in flight cost the\n\
                 broker less and hold less memory.\n\n\
                 | batch_size | buffer_size | batches in flight | messages/s | RabbitMQ CPU s / 10k | total CPU s / 10k |\n\
                 | ---: | ---: | ---: | ---: | ---: | ---: |\n",
                args.rows, args.sweep_runs
            );
            for (batch, buffer, drains) in &self.sweep {
                let mean = |f: &dyn Fn(&Drain) -> f64| {
                    drains.iter().map(f).sum::<f64>() / drains.len().max(1) as f64
                };
                md += &format!(
                    "| {batch} | {buffer} | {} | {:.0} | {:.2} | {:.2} |\n",
                    buffer / batch,
                    mean(&|d| d.rate),
                    mean(&|d| d.cpu.rabbitmq),
                    mean(&|d| d.cpu.total()),
                );
            }
            md += "\n";
        }
        md += "## Live latency\n\nProducers insert + NOTIFY through `push_occurrence()` on a fixed schedule (one event per\n\
               transaction up to 1 000 events/s, then several: PostgreSQL serializes NOTIFYing commits, about\n\
               2 000 per second on this machine); latency runs from each producer's commit to the consumer's receipt.\n\n\
               | offered /s | achieved /s | p50 ms | p99 ms | p99.9 ms | max ms | kept up |\n\
               | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n";
        for l in &self.latency {
            md += &format!(
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
                l.offered,
                l.achieved,
                l.p50,
                l.p99,
                l.p999,
                l.max,
                if l.kept_up() { "yes" } else { "no" }
            );
        }
        md += "\n![latency against offered rate](latency.svg)\n\n\
               \"Kept up\" means the producers reached 95 % of the offered rate and the last event arrived\n\
               within one second of the last commit.\n";
        md += &format!(
            "\n## Choosing the AMQP client\n\n\
             In this run amqprs published {:.1}x as fast as lapin with the same window. The relay still uses\n\
             lapin: amqprs 2.1 hard-codes its client capabilities without `connection.blocked`, so RabbitMQ never\n\
             tells it about a memory or disk alarm; publishing would look like a stall, confirms would time out\n\
             and batches would be republished into a blocked broker (see\n\
             `tests/it/faults.rs::a_blocked_broker_pauses_the_relay_without_republishing`). lapin also gives a\n\
             confirm future per message, which maps onto \"mark after ack\" directly. The relay reaches\n\
             {vs_bare:.2}x lapin's bare publisher while also claiming and marking every row in PostgreSQL on the\n\
             same two cores; switching to amqprs is worth it once it can receive `connection.blocked`.\n\n",
            Self::rate(self.bare_amqprs.as_ref()) / Self::rate(self.bare_lapin.as_ref()),
        );
        md
    }

    /// A line chart of p50 / p99 / p99.9 latency against the offered rate.
    fn latency_svg(&self) -> String {
        let (w, h, left, bottom, top, right) = (640.0, 360.0, 60.0, 40.0, 30.0, 130.0);
        let max_rate = self
            .latency
            .iter()
            .map(|l| f64::from(l.offered))
            .fold(1.0, f64::max);
        let max_ms = self
            .latency
            .iter()
            .map(|l| l.p999)
            .fold(1.0, f64::max)
            .ceil();
        let x = |r: f64| left + r / max_rate * (w - left - right);
        let y = |ms: f64| h - bottom - ms / max_ms * (h - bottom - top);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">Relay latency, producer commit to consumer receipt</text>\n\
             <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
             <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">offered rate (events/s)</text>\n\
             <text x=\"15\" y=\"{}\" transform=\"rotate(-90 15 {})\" text-anchor=\"middle\">latency (ms)</text>\n",
            (w - right + left) / 2.0,
            h - bottom,
            w - right,
            h - bottom,
            h - bottom,
            (w - right + left) / 2.0,
            h - 8.0,
            (h - bottom + top) / 2.0,
            (h - bottom + top) / 2.0,
        );
        for i in 0..=4 {
            let ms = max_ms * f64::from(i) / 4.0;
            svg += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{ms:.1}</text><line x1=\"{left}\" y1=\"{y0}\" x2=\"{}\" y2=\"{y0}\" stroke=\"#ddd\"/>\n",
                left - 5.0,
                y(ms) + 4.0,
                w - right,
                y0 = y(ms)
            );
        }
        for l in &self.latency {
            svg += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                x(f64::from(l.offered)),
                h - bottom + 15.0,
                l.offered
            );
        }
        let series: [Series; 3] = [
            ("p50", "#2a7", |l| l.p50),
            ("p99", "#d72", |l| l.p99),
            ("p99.9", "#a22", |l| l.p999),
        ];
        for (i, (name, color, pick)) in series.iter().enumerate() {
            let points: Vec<String> = self
                .latency
                .iter()
                .map(|l| format!("{:.1},{:.1}", x(f64::from(l.offered)), y(pick(l))))
                .collect();
            svg += &format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
                points.join(" ")
            );
            for p in &points {
                let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
                svg += &format!("<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{color}\"/>\n");
            }
            let ly = top + 20.0 * i as f64 + 10.0;
            svg += &format!(
                "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
                w - right + 15.0,
                w - right + 35.0,
                w - right + 40.0,
                ly + 4.0
            );
        }
        svg + "</svg>\n"
    }
}

fn settings(bench: &Bench) -> String {
    let r = &bench.config.relay;
    format!(
        "buffer_size {}, batch_size {}, {} batches in flight, idle_sleep_ms {}",
        r.buffer_size,
        r.batch_size,
        r.workers,
        r.idle_sleep.as_millis()
    )
}

async fn pg_connect(port: u16) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=test application_name=po-bench"),
        NoTls,
    )
    .await
    .context("connect to PostgreSQL")?;
    tokio::spawn(connection);
    Ok(client)
}

/// Connects as the relay does, so `--amqp-url` takes the seed's
/// `amqp://…:5672/` form too (an empty path is the vhost `/`).
async fn amqp_connect(url: &str) -> anyhow::Result<Connection> {
    let uri = pushoccurrence::amqp::parse_uri(url)
        .map_err(|e| anyhow::anyhow!("--amqp-url is not an AMQP URL: {e}"))?;
    Connection::connect_uri(uri, ConnectionProperties::default())
        .await
        .context("connect to RabbitMQ")
}

async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            bail!("gave up after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

async fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
}

/// CPU seconds (user + system) and peak RSS (KiB) of a process, from /proc.
fn process_usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let times = CpuTimes::read(pid).with_context(|| format!("no process {pid}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Ok((times.own, hwm))
}

/// A process's name and CPU seconds, from `/proc/<pid>/stat`.
struct CpuTimes {
    comm: String,
    /// User and system time of the process itself.
    own: f64,
    /// User and system time of its exited, reaped children.
    children: f64,
}

impl CpuTimes {
    fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let fields: Vec<f64> = stat[close + 1..]
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        // utime, stime, cutime, cstime are fields 14-17 of stat, 11-14
        // after the name; CLK_TCK is 100 on Linux.
        Some(Self {
            comm: stat[open + 1..close].to_owned(),
            own: (fields.get(11)? + fields.get(12)?) / 100.0,
            children: (fields.get(13)? + fields.get(14)?) / 100.0,
        })
    }
}

/// CPU seconds the processes sharing the machine have used so far, by role.
/// Subtracting two readings gives what a scenario cost each of them.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSplit {
    postgres: f64,
    rabbitmq: f64,
    /// This process: the consumer, and the publisher in the bare runs.
    bench: f64,
    relay: f64,
}

impl CpuSplit {
    /// Reads /proc. PostgreSQL's and RabbitMQ's exited children count through
    /// their parents' `cutime`; the relay and this process count alone.
    fn read(relay: Option<u32>) -> Self {
        let mut split = Self::default();
        let me = std::process::id();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return split;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(t) = CpuTimes::read(pid) else {
                continue;
            };
            if pid == me {
                split.bench += t.own;
            } else if Some(pid) == relay {
                split.relay += t.own;
            } else if t.comm == "postgres" {
                split.postgres += t.own + t.children;
            } else if t.comm == "beam.smp" {
                split.rabbitmq += t.own + t.children;
            }
        }
        split
    }

    /// What was used between `before` and `self`, per 10 000 of `n` messages.
    fn per_10k_since(&self, before: &Self, n: usize) -> Self {
        let scale = 10_000.0 / n as f64;
        Self {
            postgres: (self.postgres - before.postgres) * scale,
            rabbitmq: (self.rabbitmq - before.rabbitmq) * scale,
            bench: (self.bench - before.bench) * scale,
            relay: (self.relay - before.relay) * scale,
        }
    }

    fn total(&self) -> f64 {
        self.postgres + self.rabbitmq + self.bench + self.relay
    }
}

impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPU s per 10k messages: relay {:.2}, PostgreSQL {:.2}, RabbitMQ {:.2}, bench {:.2}, total {:.2}",
            self.relay,
            self.postgres,
            self.rabbitmq,
            self.bench,
            self.total()
        )
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn today() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

async fn machine_description(pg: &Client) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let pg_version: String = pg
        .query_one("SHOW server_version", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or_default();
    let rabbit = std::process::Command::new("rabbitmqctl")
        .args(["-q", "version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {mem_gib:.0} GiB RAM, PostgreSQL {pg_version}, RabbitMQ {rabbit}, all on one host"
    )
}
