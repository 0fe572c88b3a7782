//! Whether the relay makes progress, for `/readyz`: connections can all be
//! up while nothing moves (behind a connection pooler every claim failed
//! for minutes while the relay reported ready).
//!
//! The relay is *stalled* when, for `admin.stall_after_sec`,
//!
//! * rows were claimable (pending, not parked, their next attempt due: what
//!   the backlog sample counts) and no batch committed, or
//! * every batch failed (its claim, its claim session's connect, its
//!   publish), since the last commit.
//!
//! It is also not ready when the backlog sample itself has failed for
//! `admin.stall_after_sec` (a revoked grant, a dropped schema): a relay that
//! cannot see its outbox cannot tell idle from stuck, and its gauges read
//! NaN.
//!
//! An idle relay (nothing claimable) is not stalled, however long since its
//! last commit; nor are rows waiting out a retry delay, parked, or held
//! behind a parked row of their ordering key. Since a
//! batch that finds nothing to claim also counts as one that worked, a
//! relay whose claims work stays ready until the sample shows rows it leaves
//! waiting. The claimable count is sampled (every few seconds), so a stall
//! shows up to one sample interval late; a failed sample forgets it, so a
//! stale count cannot make an idle relay look stalled.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// What the workers and the backlog sampler report, and the verdict.
#[derive(Debug)]
pub struct Progress {
    stall_after: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    last_commit: Option<Instant>,
    /// The first batch failure since the last commit or batch that worked.
    failing_since: Option<Instant>,
    /// Claimable rows in the latest sample, and since when every sample
    /// showed some; `None` when unknown or none.
    claimable: Option<(u64, Instant)>,
    /// The first failed backlog sample since the last one that worked.
    sample_failing_since: Option<Instant>,
}

impl Progress {
    /// Stalled after `stall_after` without progress.
    pub fn new(stall_after: Duration) -> Self {
        Self {
            stall_after,
            state: Mutex::new(State::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// A batch committed at `now`.
    pub fn committed(&self, now: Instant) {
        self.with(|s| {
            s.last_commit = Some(now);
            s.failing_since = None;
        });
    }

    /// A batch worked (whether or not it found rows to claim).
    pub fn batch_worked(&self) {
        self.with(|s| s.failing_since = None);
    }

    /// A batch (its claim, its session's connect, ...) failed at `now`.
    pub fn batch_failed(&self, now: Instant) {
        self.with(|s| {
            s.failing_since.get_or_insert(now);
        });
    }

    /// The backlog sample at `now` found `claimable` rows; `None` when the
    /// sample failed.
    pub fn sampled(&self, claimable: Option<u64>, now: Instant) {
        self.with(|s| {
            if claimable.is_some() {
                s.sample_failing_since = None;
            } else {
                s.sample_failing_since.get_or_insert(now);
            }
            s.claimable = match (claimable, s.claimable) {
                (Some(0) | None, _) => None,
                (Some(n), Some((_, since))) => Some((n, since)),
                (Some(n), None) => Some((n, now)),
            };
        });
    }

    /// Why the relay is stalled at `now`, in words; empty when it is not.
    pub fn stalled(&self, now: Instant) -> Vec<String> {
        let s = self.with(|s| *s);
        let limit = self.stall_after.as_secs_f64();
        let mut why = Vec::new();
        if let Some((rows, since)) = s.claimable {
            // Rows that became claimable after the last commit wait since
            // they were first seen, not since that commit.
            let waiting = s.last_commit.map_or(since, |c| c.max(since));
            let secs = now.saturating_duration_since(waiting).as_secs_f64();
            if secs >= limit {
                why.push(format!(
                    "{rows} rows claimable and no batch committed for {secs:.0}s (admin.stall_after_sec {limit})"
                ));
            }
        }
        if let Some(since) = s.sample_failing_since {
            let secs = now.saturating_duration_since(since).as_secs_f64();
            if secs >= limit {
                why.push(format!(
                    "the outbox's backlog cannot be read for {secs:.0}s (admin.stall_after_sec {limit}; see the log)"
                ));
            }
        }
        if let Some(since) = s.failing_since {
            let secs = now.saturating_duration_since(since).as_secs_f64();
            if secs >= limit {
                why.push(format!(
                    "every batch has failed for {secs:.0}s (admin.stall_after_sec {limit}; see the log)"
                ));
            }
        }
        why
    }
}

/// Seconds since the Unix epoch, for timestamp metrics.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(60);

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn idle_is_not_stalled() {
        let p = Progress::new(STALL);
        let t = Instant::now();
        p.committed(t);
        p.sampled(Some(0), at(t, 10));
        p.batch_worked();
        assert!(p.stalled(at(t, 3600)).is_empty());
    }

    #[test]
    fn claimable_rows_without_a_commit_stall_after_the_limit_from_when_they_were_seen() {
        let p = Progress::new(STALL);
        let t = Instant::now();
        p.committed(t);
        // An hour idle, then rows appear: they have waited since seen.
        p.sampled(Some(5), at(t, 3600));
        assert!(p.stalled(at(t, 3630)).is_empty());
        p.sampled(Some(7), at(t, 3655));
        let why = p.stalled(at(t, 3660));
        assert_eq!(
            why,
            ["7 rows claimable and no batch committed for 60s (admin.stall_after_sec 60)"]
        );
        // A commit is progress, and an empty sample ends the wait.
        p.committed(at(t, 3661));
        assert!(p.stalled(at(t, 3700)).is_empty());
        assert!(!p.stalled(at(t, 3721)).is_empty());
        p.sampled(Some(0), at(t, 3722));
        assert!(p.stalled(at(t, 9999)).is_empty());
    }

    #[test]
    fn a_failed_sample_forgets_the_claimable_rows_and_stalls_once_it_keeps_failing() {
        let p = Progress::new(STALL);
        let t = Instant::now();
        p.sampled(Some(5), t);
        p.sampled(None, at(t, 5));
        assert!(p.stalled(at(t, 64)).is_empty());
        p.sampled(None, at(t, 60));
        assert_eq!(
            p.stalled(at(t, 65)),
            ["the outbox's backlog cannot be read for 60s (admin.stall_after_sec 60; see the log)"]
        );
        p.sampled(Some(0), at(t, 66));
        assert!(p.stalled(at(t, 999)).is_empty());
    }

    #[test]
    fn failing_batches_stall_until_one_works_or_commits() {
        let p = Progress::new(STALL);
        let t = Instant::now();
        p.batch_failed(t);
        p.batch_failed(at(t, 30));
        assert!(p.stalled(at(t, 59)).is_empty());
        assert_eq!(
            p.stalled(at(t, 61)),
            ["every batch has failed for 61s (admin.stall_after_sec 60; see the log)"]
        );
        p.batch_worked();
        assert!(p.stalled(at(t, 200)).is_empty());
        p.batch_failed(at(t, 200));
        p.committed(at(t, 201));
        assert!(p.stalled(at(t, 400)).is_empty());
    }
}
