//! `pushoccurrence-bench`: measures the relay against baselines in one run,
//! on this machine, with one message shape (1 KiB persistent messages,
//! mandatory, with a message id, into a durable queue with a live consumer).
//!
//! Scenarios ([`scenarios`]):
//! 1. backlog drain: the relay binary drains N pending rows;
//! 2. live latency: producers insert + NOTIFY at fixed rates while the relay
//!    runs; latency from each producer's commit to the consumer's receipt.
//!
//! Scale scenarios ([`scale`]), each only when asked for, since the large
//! sizes take minutes to hours:
//! 3. history (`--history 1000000,3000000`): drains of `--rows` rows over a
//!    history of transferred rows grown to each size in turn, against drains
//!    over an empty history in alternating pairs; `--ids v7,v4` runs it per
//!    kind of ids;
//! 4. backlog (`--backlog 100000,1000000`): drains of each size, in rounds:
//!    rate against the smallest, start-up, the relay's peak memory;
//! 5. distance (`--rtt-ms 1,5`): the relay reaches PostgreSQL and RabbitMQ
//!    through delay proxies ([`proxy`]), against lapin's bare publisher
//!    through the same delay, in alternating pairs per round trip.
//!
//! Ordered scenarios ([`ordering`]), only when asked for (`--ordering`,
//! or `--ordering-only` to run them alone and put their section into the
//! `benchmarks.md` an earlier run wrote):
//! 6. drains with `--ordering-keys` keys and with one hot key, each against
//!    the unordered drain of its round; live latency at `--ordering-rate`
//!    with keys against without.
//!
//! Baselines ([`baselines`]): a bare publisher with lapin and with amqprs,
//! each with the relay's in-flight window, and the seed's algorithm (per
//! message: lock, read, publish, wait for the confirm, mark, commit).
//!
//! The drain and lapin's bare publisher run in alternating pairs, and the
//! ratio reported is the median pair's: the machine's speed drifts over
//! minutes, and a drain measured minutes apart from its baseline would show
//! the drift as much as the relay.
//!
//! It prints every figure and the ratios, and rewrites `docs/benchmarks.md`
//! and `docs/latency.svg` ([`report`]), keeping the sections of scenarios
//! it was not asked to run from the earlier file. Run it with the README's bench
//! command.
//!
//! # Layout
//!
//! * [`harness`]: the bench's outbox, queue and relay process, shared by
//!   every scenario and baseline; [`consumer`] the live consumer.
//! * [`scenarios`]: the relay's backlog drain and live latency.
//! * [`scale`]: the history, backlog and distance scenarios; [`proxy`] the
//!   delay proxy.
//! * [`ordering`]: the ordered drains and latency.
//! * [`baselines`]: bare lapin and amqprs publishers, the seed's algorithm.
//! * [`procstat`]: CPU seconds and memory per process, from `/proc`.
//! * [`report`]: the summary, `benchmarks.md`; [`report::scale`] the scale
//!   scenarios' sections; [`report::svg`] the charts.

#![allow(clippy::let_underscore_must_use)] // clean-up between scenarios is best effort

mod baselines;
mod consumer;
mod harness;
mod ordering;
mod procstat;
mod proxy;
mod report;
mod scale;
mod scenarios;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Parser;

use harness::{Bench, Ids};
use report::{Report, machine_description};

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
    /// Sizes of history (transferred rows) to drain `--rows` rows over, as
    /// the history grows in one run; none by default.
    #[arg(long, value_delimiter = ',')]
    history: Vec<u64>,
    /// Ids of the rows the bench writes: v7 (time-ordered, as
    /// `push_occurrence()` makes them) or v4 (random). The history scenario
    /// runs once per kind given; every other scenario uses the first.
    #[arg(long, value_delimiter = ',', default_value = "v7")]
    ids: Vec<Ids>,
    /// Backlog sizes to drain, in `--pairs` rounds; none by default.
    #[arg(long, value_delimiter = ',')]
    backlog: Vec<usize>,
    /// Round trips (ms) the delay proxies add in front of PostgreSQL and
    /// RabbitMQ, each measured after none; none by default.
    #[arg(long, value_delimiter = ',')]
    rtt_ms: Vec<f64>,
    /// Runs the ordered scenarios too: drains of `--rows` rows over
    /// `--ordering-keys` keys and over one hot key, each against an
    /// unordered drain in `--pairs` rounds, and keyed latency at
    /// `--ordering-rate` against unkeyed.
    #[arg(long)]
    ordering: bool,
    /// Runs only the ordered scenarios, and puts their section into the
    /// `benchmarks.md` in `--out` in place of an older one, leaving the
    /// rest of the file (and the charts) as an earlier run wrote them.
    #[arg(long)]
    ordering_only: bool,
    /// Distinct ordering keys of the ordered scenarios.
    #[arg(long, default_value_t = 10_000)]
    ordering_keys: u32,
    /// Offered rate (events/s) of the ordered scenarios' latency pairs.
    #[arg(long, default_value_t = 2000)]
    ordering_rate: u32,
    /// `RUST_LOG` of the relay processes the bench starts.
    #[arg(long, env = "BENCH_RELAY_LOG", default_value = "warn")]
    relay_log: String,
}

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

    if args.ordering_only {
        return ordering_only(&bench, &relay_bin, &args).await;
    }

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
        let latency = bench
            .live_latency(&relay_bin, rate, args.secs, None)
            .await?;
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

    run_scale(&bench, &relay_bin, &args, &mut report).await?;
    if args.ordering {
        report.ordering = Some(run_ordering(&bench, &relay_bin, &args).await?);
    }

    bench.cleanup().await;
    let machine = machine_description(&bench.pg).await;
    report.print(&bench, &machine);
    if !args.out.is_empty() {
        let dir = Path::new(&args.out);
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("latency.svg"), report.latency_svg())?;
        let path = dir.join("benchmarks.md");
        let earlier = std::fs::read_to_string(&path).unwrap_or_default();
        std::fs::write(
            &path,
            report::sections::carry_unmeasured(&report.markdown(&bench, &machine, &args), &earlier),
        )?;
        println!(
            "wrote {}/benchmarks.md and {}/latency.svg",
            args.out, args.out
        );
        for (name, svg) in [
            ("history.svg", report.history_svg()),
            ("distance.svg", report.distance_svg()),
        ] {
            if let Some(svg) = svg {
                std::fs::write(dir.join(name), svg)?;
                println!("wrote {}/{name}", args.out);
            }
        }
    }
    Ok(())
}

/// The scale scenarios asked for: backlog, distance, then history, whose
/// outbox of millions of rows is dropped when it ends.
async fn run_scale(
    bench: &Bench,
    relay_bin: &Path,
    args: &Args,
    report: &mut Report,
) -> anyhow::Result<()> {
    let rounds = args.pairs.max(1);
    let mut backlog = args.backlog.clone();
    backlog.sort_unstable();
    backlog.dedup();
    if !backlog.is_empty() {
        println!("backlog drains of {backlog:?} rows, {rounds} rounds");
        report.backlog = bench.backlogs(relay_bin, &backlog, rounds).await?;
    }
    let mut rtts: Vec<f64> = args.rtt_ms.iter().copied().filter(|&r| r > 0.0).collect();
    rtts.sort_by(f64::total_cmp);
    rtts.dedup();
    if !rtts.is_empty() {
        let window = bench.config.relay.buffer_size;
        println!(
            "distance: drains of {} rows and lapin's bare publisher through delay proxies adding 0 and {rtts:?} ms of round trip, {rounds} pairs each",
            args.rows
        );
        report.distance = bench
            .distance(relay_bin, &rtts, args.rows, window, rounds)
            .await?;
    }
    let mut sizes: Vec<u64> = args.history.iter().copied().filter(|&h| h > 0).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut kinds: Vec<Ids> = Vec::new();
    for &ids in &args.ids {
        if !kinds.contains(&ids) {
            kinds.push(ids);
        }
    }
    for ids in kinds.into_iter().filter(|_| !sizes.is_empty()) {
        println!(
            "history: drains of {} rows over {sizes:?} transferred rows ({} ids), each after one over an empty history, {rounds} pairs each",
            args.rows,
            ids.name()
        );
        report.history.push(
            bench
                .history(relay_bin, ids, &sizes, args.rows, rounds)
                .await?,
        );
    }
    Ok(())
}

/// The ordered scenarios, as `args` size them.
async fn run_ordering(
    bench: &Bench,
    relay_bin: &Path,
    args: &Args,
) -> anyhow::Result<ordering::OrderingRun> {
    let rounds = args.pairs.max(1);
    println!(
        "ordered drains of {} rows (unordered, {} keys, one hot key), {rounds} rounds; then latency at {}/s for {} s without and with keys, {rounds} pairs",
        args.rows, args.ordering_keys, args.ordering_rate, args.secs
    );
    bench
        .ordering(
            relay_bin,
            args.rows,
            args.ordering_keys,
            rounds,
            args.ordering_rate,
            args.secs,
        )
        .await
}

/// `--ordering-only`: the ordered scenarios alone, their summary, and their
/// section put into the existing `benchmarks.md`.
async fn ordering_only(bench: &Bench, relay_bin: &Path, args: &Args) -> anyhow::Result<()> {
    let mut report = Report::default();
    report.ordering = Some(run_ordering(bench, relay_bin, args).await?);
    bench.cleanup().await;
    let machine = machine_description(&bench.pg).await;
    println!("\n== summary ({machine}) ==");
    report.print_ordering();
    if !args.out.is_empty() {
        let path = Path::new(&args.out).join("benchmarks.md");
        let existing = std::fs::read_to_string(&path).unwrap_or_default();
        std::fs::write(
            &path,
            report::sections::put(
                &existing,
                report::ordering::HEADING,
                &report.ordering_markdown(&machine),
            ),
        )?;
        println!("wrote the ordered drains' section of {}", path.display());
    }
    Ok(())
}

/// The `pushoccurrence` binary built beside this one.
fn relay_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("pushoccurrence");
    if !path.exists() {
        bail!(
            "{} not found; build both binaries: cargo build --release --workspace",
            path.display()
        );
    }
    Ok(path)
}
