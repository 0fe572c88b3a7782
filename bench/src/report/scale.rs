//! The scale scenarios' part of the results: their summary lines, their
//! sections of `benchmarks.md` (history, backlog, distance; a scenario that
//! did not run has none) and the charts `history.svg` and `distance.svg`.

use crate::Args;
use crate::harness::Ids;
use crate::scale::{BacklogSize, DistanceStep, HistoryRun, HistoryStep};
use crate::scenarios::Drain;

use super::Report;
use super::svg::{Line, steps_chart};

/// Colours of the history chart's lines, per kind of ids.
const COLORS: [&str; 2] = ["#27a", "#d72"];

impl Report {
    pub(crate) fn print_scale(&self) {
        for run in &self.history {
            for (history, median) in history_rows(run) {
                println!(
                    "history of {} rows ({} ids): {:.0} msg/s, {:.2}x the empty history's in the same pairs",
                    history,
                    run.ids.name(),
                    median.over.rate,
                    median.ratio,
                );
            }
        }
        if let Some(smallest) = self.backlog.first() {
            for size in &self.backlog {
                let b = BacklogFigures::of(size, smallest);
                println!(
                    "backlog of {} rows: {:.0} msg/s, {:.2}x the {}-row backlog's; first message {:.0} ms after start, peak RSS {:.1} MiB (worst of {})",
                    size.rows,
                    b.rate,
                    b.ratio,
                    smallest.rows,
                    b.worst_startup_ms,
                    b.worst_rss_mib,
                    size.drains.len()
                );
            }
        }
        for step in &self.distance {
            let (drain, bare, ratio) = median_distance_pair(step);
            println!(
                "round trip +{} ms: relay {:.0} msg/s, bare lapin {:.0} msg/s: {ratio:.2}x",
                step.rtt_ms, drain.rate, bare.rate
            );
        }
    }

    /// The sections of the scale scenarios that ran.
    pub(crate) fn scale_markdown(&self, args: &Args, window: usize) -> String {
        let mut md = String::new();
        if !self.history.is_empty() {
            md += &self.history_markdown(args);
        }
        if !self.backlog.is_empty() {
            md += &self.backlog_markdown();
        }
        if !self.distance.is_empty() {
            md += &self.distance_markdown(window);
        }
        md
    }

    fn history_markdown(&self, args: &Args) -> String {
        let shared_buffers = self
            .history
            .first()
            .map_or("?", |r| r.shared_buffers.as_str());
        let mut md = format!(
            "## History\n\n\
             Drains of {rows} rows from an outbox that also holds a history of transferred rows ({body} B bodies),\n\
             grown in one run: built to the smallest size, drained, grown to the next, drained, and so on\n\
             ({chunk} rows per statement, then `VACUUM ANALYZE` and `CHECKPOINT`; none of it timed). The drained\n\
             rows join the history. Each drain over the history follows a drain over an empty outbox, and the\n\
             pair's ratio compares the two; the figures are the median pair's, of {pairs}. Both drains of a pair\n\
             have the same kind of ids, in the history and in the pending rows. Blocks read are the blocks of the\n\
             outbox's tables that the drain found outside PostgreSQL's shared buffers ({shared_buffers}): in the\n\
             operating system's cache or on disk. The target: at least 0.9x the empty history's rate at 3M and\n\
             10M rows of history.\n\n",
            rows = thousands(args.rows as u64),
            body = args.body,
            chunk = thousands(crate::scale::HISTORY_CHUNK),
            pairs = args.pairs.max(1),
        );
        for run in &self.history {
            md += &format!(
                "### {} ids\n\nIds in the history and the pending rows: {}.\n\n\
                 | transferred rows | drain msg/s | empty history msg/s (same pairs) | ratio | every pair | index blocks read | heap blocks read |\n\
                 | ---: | ---: | ---: | ---: | --- | ---: | ---: |\n",
                run.ids.name(),
                run.ids
            );
            if let Some(empty) = median_empty(run) {
                let blocks = empty.blocks.unwrap_or_default();
                md += &format!(
                    "| 0 | {:.0} | | | the median of all {} drains over an empty history | {} | {} |\n",
                    empty.rate,
                    run.steps.iter().map(|s| s.pairs.len()).sum::<usize>(),
                    blocks.index_read,
                    blocks.heap_read
                );
            }
            for (history, median) in history_rows(run) {
                let blocks = median.over.blocks.unwrap_or_default();
                md += &format!(
                    "| {} | {:.0} | {:.0} | **{:.2}x** | {} | {} | {} |\n",
                    thousands(history),
                    median.over.rate,
                    median.empty.rate,
                    median.ratio,
                    median.every,
                    blocks.index_read,
                    blocks.heap_read
                );
            }
            md += "\n";
        }
        md += &self.id_choice_note();
        md += "![drain rate against history](history.svg)\n\n";
        md
    }

    /// What a producer's own choice of ids costs, when both kinds ran: the
    /// two at the largest history.
    fn id_choice_note(&self) -> String {
        let largest = |ids: Ids| {
            let run = self.history.iter().find(|r| r.ids == ids)?;
            let (history, median) = history_rows(run).pop()?;
            Some((
                history,
                median.ratio,
                median.over.blocks.unwrap_or_default(),
            ))
        };
        match (largest(Ids::V7), largest(Ids::V4)) {
            (Some((h7, r7, b7)), Some((h4, r4, b4))) if h7 == h4 => format!(
                "**Ids.** Over {} rows of history, a drain of time-ordered ids ran at {r7:.2}x an empty\n\
                 history's, reading {} index and {} heap blocks from outside the shared buffers; one of random\n\
                 ids ran at {r4:.2}x, reading {} and {}. `push_occurrence()` makes time-ordered ids; a producer\n\
                 that passes its own ids chooses between these.\n\n",
                thousands(h7),
                b7.index_read,
                b7.heap_read,
                b4.index_read,
                b4.heap_read,
            ),
            _ => "Only one kind of ids ran; `--ids v7,v4` measures both, one after the other.\n\n"
                .to_owned(),
        }
    }

    fn backlog_markdown(&self) -> String {
        let Some(smallest) = self.backlog.first() else {
            return String::new();
        };
        let rounds = smallest.drains.len();
        let mut md = format!(
            "## Backlog\n\n\
             Drains of backlogs of several sizes, in rounds (here {rounds}; each round drains every size,\n\
             smallest first). The rate is the median round's; the ratio compares each size with the smallest in the same\n\
             round (median of the rounds); start-up (from starting the relay to the consumer's first message) and\n\
             the relay's peak RSS are the worst round's. The targets: a 1M-row backlog at least 0.9x a 100k one,\n\
             at most 50 MiB, the first message within 1 s.\n\n\
             | backlog rows | msg/s | ratio to {} rows | first message after start, ms | relay peak RSS, MiB |\n\
             | ---: | ---: | ---: | ---: | ---: |\n",
            thousands(smallest.rows as u64)
        );
        for size in &self.backlog {
            let b = BacklogFigures::of(size, smallest);
            md += &format!(
                "| {} | {:.0} | **{:.2}x** | {:.0} | {:.1} |\n",
                thousands(size.rows as u64),
                b.rate,
                b.ratio,
                b.worst_startup_ms,
                b.worst_rss_mib
            );
        }
        md + "\n"
    }

    fn distance_markdown(&self, window: usize) -> String {
        let pairs = self.distance.first().map_or(0, |s| s.pairs.len());
        let mut md = format!(
            "## Distance\n\n\
             The relay reaches PostgreSQL and RabbitMQ through delay proxies inside the bench, which hold every\n\
             byte for half the added round trip in each direction (keeping their order, many chunks on the way\n\
             at once); lapin's bare publisher ({window} confirms in flight) publishes through the same RabbitMQ\n\
             proxy. The consumer and the bench's own session connect directly. Each round trip ran alternating\n\
             pairs of a drain and a bare publisher (here {pairs}); the figures are the median pair's. The target:\n\
             at least 0.8x the bare publisher at 1 ms and 5 ms.\n\n\
             | added round trip, ms | relay drain msg/s | bare lapin msg/s | relay / lapin | every pair |\n\
             | ---: | ---: | ---: | ---: | --- |\n"
        );
        for step in &self.distance {
            let (drain, bare, ratio) = median_distance_pair(step);
            let every: Vec<String> = step
                .pairs
                .iter()
                .map(|(d, b)| format!("{:.2}x", d.rate / b.rate))
                .collect();
            md += &format!(
                "| {} | {:.0} | {:.0} | **{ratio:.2}x** | {} |\n",
                step.rtt_ms,
                drain.rate,
                bare.rate,
                every.join(", ")
            );
        }
        md + "\n![drain rate against round trip](distance.svg)\n\n"
    }

    /// Drain rates against the history, per kind of ids.
    pub(crate) fn history_svg(&self) -> Option<String> {
        let first = self.history.first()?;
        let mut ticks = vec!["0".to_owned()];
        ticks.extend(first.steps.iter().map(|s| short(s.history)));
        let mut lines = Vec::new();
        for (run, color) in self.history.iter().zip(COLORS) {
            let empty = median_empty(run).map_or(f64::NAN, |d| d.rate);
            let rows = history_rows(run);
            let mut over = vec![empty];
            over.extend(rows.iter().map(|(_, m)| m.over.rate));
            let mut reference = vec![empty];
            reference.extend(rows.iter().map(|(_, m)| m.empty.rate));
            lines.push(Line {
                name: format!("{} ids", run.ids.name()),
                color,
                dashed: false,
                values: over,
            });
            lines.push(Line {
                name: format!("{}, empty history", run.ids.name()),
                color,
                dashed: true,
                values: reference,
            });
        }
        Some(steps_chart(
            "Drain rate against the history of transferred rows",
            "transferred rows in the outbox",
            "messages/s",
            &ticks,
            &lines,
        ))
    }

    /// Drain and bare publisher rates against the added round trip.
    pub(crate) fn distance_svg(&self) -> Option<String> {
        if self.distance.is_empty() {
            return None;
        }
        let ticks: Vec<String> = self
            .distance
            .iter()
            .map(|s| format!("{} ms", s.rtt_ms))
            .collect();
        let medians: Vec<_> = self.distance.iter().map(median_distance_pair).collect();
        let lines = [
            Line {
                name: "relay drain".into(),
                color: COLORS[0],
                dashed: false,
                values: medians.iter().map(|(d, _, _)| d.rate).collect(),
            },
            Line {
                name: "bare lapin".into(),
                color: COLORS[1],
                dashed: true,
                values: medians.iter().map(|(_, b, _)| b.rate).collect(),
            },
        ];
        Some(steps_chart(
            "Drain rate against added round trip",
            "round trip added to PostgreSQL and RabbitMQ",
            "messages/s",
            &ticks,
            &lines,
        ))
    }
}

/// The median pair of a history step.
struct MedianPair<'a> {
    empty: &'a Drain,
    over: &'a Drain,
    ratio: f64,
    /// Every pair's ratio, in run order.
    every: String,
}

/// Each step's history and median pair.
fn history_rows(run: &HistoryRun) -> Vec<(u64, MedianPair<'_>)> {
    run.steps
        .iter()
        .filter_map(|step| Some((step.history, median_history_pair(step)?)))
        .collect()
}

fn median_history_pair(step: &HistoryStep) -> Option<MedianPair<'_>> {
    let ratios: Vec<f64> = step
        .pairs
        .iter()
        .map(|(empty, over)| over.rate / empty.rate)
        .collect();
    let (empty, over) = &step.pairs[median_index(&ratios)?];
    Some(MedianPair {
        empty,
        over,
        ratio: over.rate / empty.rate,
        every: ratios
            .iter()
            .map(|r| format!("{r:.2}x"))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The median-rate drain of every empty-history drain of a run.
fn median_empty(run: &HistoryRun) -> Option<&Drain> {
    let empties: Vec<&Drain> = run
        .steps
        .iter()
        .flat_map(|s| s.pairs.iter().map(|(empty, _)| empty))
        .collect();
    let rates: Vec<f64> = empties.iter().map(|d| d.rate).collect();
    median_index(&rates).map(|i| empties[i])
}

fn median_distance_pair(step: &DistanceStep) -> (&Drain, &crate::baselines::Bare, f64) {
    let ratios: Vec<f64> = step.pairs.iter().map(|(d, b)| d.rate / b.rate).collect();
    let (drain, bare) = &step.pairs[median_index(&ratios).unwrap_or(0)];
    (drain, bare, drain.rate / bare.rate)
}

/// A backlog size's figures across the rounds.
struct BacklogFigures {
    /// The median round's rate.
    rate: f64,
    /// Median over the rounds of the rate against the smallest size's in
    /// the same round.
    ratio: f64,
    worst_startup_ms: f64,
    worst_rss_mib: f64,
}

impl BacklogFigures {
    fn of(size: &BacklogSize, smallest: &BacklogSize) -> Self {
        let rates: Vec<f64> = size.drains.iter().map(|d| d.rate).collect();
        let ratios: Vec<f64> = size
            .drains
            .iter()
            .zip(&smallest.drains)
            .map(|(d, s)| d.rate / s.rate)
            .collect();
        let pick = |v: &[f64]| median_index(v).map_or(f64::NAN, |i| v[i]);
        Self {
            rate: pick(&rates),
            ratio: pick(&ratios),
            worst_startup_ms: size.drains.iter().map(|d| d.startup_ms).fold(0.0, f64::max),
            worst_rss_mib: size
                .drains
                .iter()
                .map(|d| d.peak_rss_mib)
                .fold(0.0, f64::max),
        }
    }
}

/// The index of the median of `values` (the lower middle one of an even
/// number), as the default run picks its median pair.
fn median_index(values: &[f64]) -> Option<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    order.get(values.len().checked_sub(1)? / 2).copied()
}

/// `n` with spaces between thousands, as the docs write numbers.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// `n` as a chart's tick: 200k, 1M, 2.5M.
fn short(n: u64) -> String {
    match n {
        1_000_000.. => format!("{}M", trim(n as f64 / 1e6)),
        1_000.. => format!("{}k", trim(n as f64 / 1e3)),
        _ => n.to_string(),
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map_or(s.clone(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_lower_middle() {
        assert_eq!(median_index(&[]), None);
        assert_eq!(median_index(&[3.0, 1.0, 2.0]), Some(2));
        assert_eq!(median_index(&[4.0, 1.0, 3.0, 2.0]), Some(3));
    }

    #[test]
    fn counts_are_written_as_the_docs_write_them() {
        assert_eq!(thousands(10_000_000), "10 000 000");
        assert_eq!(thousands(200), "200");
        assert_eq!(short(3_000_000), "3M");
        assert_eq!(short(2_500_000), "2.5M");
        assert_eq!(short(200_000), "200k");
    }
}
