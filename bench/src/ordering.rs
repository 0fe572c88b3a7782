//! The ordered scenarios of issue 14 (`--ordering`), each against its
//! unordered counterpart from the same run, since the machine's speed
//! drifts over minutes:
//!
//! * drains, in rounds of three: the unordered drain, the same drain with
//!   its rows spread over `--ordering-keys` keys, and with every row of one
//!   hot key; each round's keyed drains are compared with its unordered one;
//! * live latency at `--ordering-rate` events/s, in pairs: without keys,
//!   then with a key per event drawn from `--ordering-keys`.

use std::path::Path;

use crate::harness::Bench;
use crate::scenarios::{Drain, DrainSetup, Latency};

/// The ordered scenarios' results.
pub(crate) struct OrderingRun {
    /// Distinct keys of the many-keys drain and of the keyed latency.
    pub(crate) keys: u32,
    /// Rows per drain.
    pub(crate) rows: usize,
    pub(crate) rounds: Vec<OrderedRound>,
    /// Seconds per latency measurement.
    pub(crate) secs: u64,
    /// `(without keys, with keys)` per pair, in run order.
    pub(crate) latency: Vec<(Latency, Latency)>,
}

/// One round's three drains of the same size.
pub(crate) struct OrderedRound {
    pub(crate) unordered: Drain,
    pub(crate) many_keys: Drain,
    pub(crate) hot_key: Drain,
}

impl OrderedRound {
    /// `(many keys, hot key)` as ratios to the round's unordered drain.
    pub(crate) fn ratios(&self) -> (f64, f64) {
        (
            self.many_keys.rate / self.unordered.rate,
            self.hot_key.rate / self.unordered.rate,
        )
    }
}

impl Bench {
    /// `rounds` rounds of drains of `rows` rows (unordered, over `keys`
    /// keys, one hot key), then `rounds` pairs of live latency at `rate`
    /// events/s for `secs` each (without keys, with keys).
    pub(crate) async fn ordering(
        &self,
        bin: &Path,
        rows: usize,
        keys: u32,
        rounds: usize,
        rate: u32,
        secs: u64,
    ) -> anyhow::Result<OrderingRun> {
        let setup = |keys| DrainSetup {
            idle: false,
            keys,
            ..DrainSetup::default()
        };
        let mut run = OrderingRun {
            keys,
            rows,
            rounds: Vec::new(),
            secs,
            latency: Vec::new(),
        };
        for _ in 0..rounds {
            let unordered = self.drain(bin, rows, setup(None)).await?;
            println!("  unordered: {unordered}");
            let many_keys = self.drain(bin, rows, setup(Some(keys))).await?;
            println!(
                "  {keys} keys: {many_keys} ({:.2}x unordered)",
                many_keys.rate / unordered.rate
            );
            let hot_key = self.drain(bin, rows, setup(Some(1))).await?;
            println!(
                "  one hot key: {hot_key} ({:.2}x unordered)",
                hot_key.rate / unordered.rate
            );
            run.rounds.push(OrderedRound {
                unordered,
                many_keys,
                hot_key,
            });
        }
        for _ in 0..rounds {
            let plain = self.live_latency(bin, rate, secs, None).await?;
            println!("  without keys: {plain}");
            let keyed = self.live_latency(bin, rate, secs, Some(keys)).await?;
            println!(
                "  with {keys} keys: {keyed} (p99 {:.2}x without)",
                keyed.p99 / plain.p99
            );
            run.latency.push((plain, keyed));
        }
        Ok(run)
    }
}

/// The median of `values` (the lower middle one of an even number).
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values
        .get((values.len().max(1) - 1) / 2)
        .copied()
        .unwrap_or(f64::NAN)
}
