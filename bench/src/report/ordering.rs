//! The ordered scenarios' part of the results (`--ordering`): their summary
//! lines and their section of `benchmarks.md`, which `--ordering-only`
//! puts into the file an earlier run wrote, in place of an older one.

use crate::ordering::{OrderingRun, median};

use super::Report;

/// The section's heading; `--ordering-only` replaces the section under it.
pub(crate) const HEADING: &str = "## Ordered drains";

/// Issue 14's targets: the many-keys drain and the hot key's, as ratios to
/// the unordered drain; keyed p99 latency as a ratio to unkeyed.
const MANY_KEYS_TARGET: f64 = 0.8;
const HOT_KEY_TARGET: f64 = 0.3;
const P99_TARGET: f64 = 2.0;

/// The figures the summary and the section print.
struct Figures {
    unordered: f64,
    many_keys: f64,
    hot_key: f64,
    many_keys_ratio: f64,
    hot_key_ratio: f64,
    p99_plain: f64,
    p99_keyed: f64,
    p99_ratio: f64,
}

impl Figures {
    /// Medians over the rounds (rates, and each round's ratios apart).
    fn of(run: &OrderingRun) -> Self {
        let of_rounds = |f: &dyn Fn(&crate::ordering::OrderedRound) -> f64| {
            median(run.rounds.iter().map(f).collect())
        };
        let of_pairs =
            |f: &dyn Fn(&(crate::scenarios::Latency, crate::scenarios::Latency)) -> f64| {
                median(run.latency.iter().map(f).collect())
            };
        Self {
            unordered: of_rounds(&|r| r.unordered.rate),
            many_keys: of_rounds(&|r| r.many_keys.rate),
            hot_key: of_rounds(&|r| r.hot_key.rate),
            many_keys_ratio: of_rounds(&|r| r.ratios().0),
            hot_key_ratio: of_rounds(&|r| r.ratios().1),
            p99_plain: of_pairs(&|(p, _)| p.p99),
            p99_keyed: of_pairs(&|(_, k)| k.p99),
            p99_ratio: of_pairs(&|(p, k)| k.p99 / p.p99),
        }
    }
}

fn met(yes: bool) -> &'static str {
    if yes { "yes" } else { "**no**" }
}

impl Report {
    pub(crate) fn print_ordering(&self) {
        let Some(run) = &self.ordering else { return };
        let f = Figures::of(run);
        println!(
            "ordered drains of {} rows: unordered {:.0} msg/s; {} keys {:.0} msg/s, {:.2}x (target {MANY_KEYS_TARGET}x); one hot key {:.0} msg/s, {:.2}x (target {HOT_KEY_TARGET}x); medians of {} rounds",
            run.rows,
            f.unordered,
            run.keys,
            f.many_keys,
            f.many_keys_ratio,
            f.hot_key,
            f.hot_key_ratio,
            run.rounds.len()
        );
        if let Some((plain, _)) = run.latency.first() {
            println!(
                "latency at {}/s: p99 {:.2} ms without keys, {:.2} ms with {} keys: {:.2}x (target within {P99_TARGET}x); medians of {} pairs",
                plain.offered,
                f.p99_plain,
                f.p99_keyed,
                run.keys,
                f.p99_ratio,
                run.latency.len()
            );
        }
    }

    /// The section of the ordered scenarios, when they ran, naming the day
    /// and the `machine` (`--ordering-only` puts it into a file another
    /// run wrote).
    pub(crate) fn ordering_markdown(&self, machine: &str) -> String {
        let Some(run) = &self.ordering else {
            return String::new();
        };
        let f = Figures::of(run);
        let every = |ratio: &dyn Fn(&crate::ordering::OrderedRound) -> f64| {
            run.rounds
                .iter()
                .map(|r| format!("{:.2}x", ratio(r)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut md = format!(
            "{HEADING}\n\n\
             Measured on {date}: {machine}; shared with other work, so only the ratios within this\n\
             section mean much.\n\n\
             Drains of {rows} rows with ordering keys (issue 14), in {n} rounds of three: the unordered drain,\n\
             the same rows spread over {keys} keys in turn (`k0`, `k1`, … `k{last}`, then `k0` again: each key's\n\
             rows lie {keys} rows apart), and every row of one hot key. Each keyed drain is compared with its\n\
             round's unordered drain; the figures are medians over the rounds.\n\n\
             | drain | messages/s | / unordered | every round's | target | met |\n\
             | --- | ---: | ---: | --- | ---: | --- |\n\
             | unordered | {:.0} | 1.00x | | | |\n\
             | {keys} keys | {:.0} | {:.2}x | {} | >= {MANY_KEYS_TARGET}x | {} |\n\
             | one hot key | {:.0} | {:.2}x | {} | >= {HOT_KEY_TARGET}x | {} |\n\n",
            f.unordered,
            f.many_keys,
            f.many_keys_ratio,
            every(&|r| r.ratios().0),
            met(f.many_keys_ratio >= MANY_KEYS_TARGET),
            f.hot_key,
            f.hot_key_ratio,
            every(&|r| r.ratios().1),
            met(f.hot_key_ratio >= HOT_KEY_TARGET),
            date = super::today(),
            rows = run.rows,
            n = run.rounds.len(),
            keys = run.keys,
            last = run.keys.saturating_sub(1),
        );
        if let Some((plain, _)) = run.latency.first() {
            md += &format!(
                "Live latency at {rate} events/s for {secs} s, as in [Live latency](#live-latency), in {n} pairs:\n\
                 without keys, then with an ordering key per event drawn at random from {keys} (a transaction's\n\
                 keys locked in sorted order). The p99 ratio is each pair's; target: within {P99_TARGET}x. The\n\
                 producers' achieved rate is shown per pair: on a loaded machine they fall short of the offered one.\n\n\
                 | pair | achieved /s without | p50 ms | p99 ms | achieved /s with keys | p50 ms | p99 ms | p99 with / without | kept up |\n\
                 | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
                rate = plain.offered,
                secs = run.secs,
                n = run.latency.len(),
                keys = run.keys,
            );
            for (i, (p, k)) in run.latency.iter().enumerate() {
                md += &format!(
                    "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2}x | {} |\n",
                    i + 1,
                    p.achieved,
                    p.p50,
                    p.p99,
                    k.achieved,
                    k.p50,
                    k.p99,
                    k.p99 / p.p99,
                    match (p.kept_up(), k.kept_up()) {
                        (true, true) => "both",
                        (true, false) => "without keys only",
                        (false, true) => "with keys only",
                        (false, false) => "neither",
                    }
                );
            }
            md += &format!(
                "\nMedian p99: {:.2} ms without keys, {:.2} ms with; median ratio **{:.2}x**; met: {}.\n\n",
                f.p99_plain,
                f.p99_keyed,
                f.p99_ratio,
                met(f.p99_ratio <= P99_TARGET)
            );
        }
        md
    }
}
