//! How many batches a relay keeps in flight. Near PostgreSQL and the broker
//! the window's `relay.workers` batches keep the machine busy; far from them
//! each batch mostly waits on round trips, so the relay adds batches in
//! proportion to that wait, up to `relay.max_workers`, and drops back when
//! the wait shrinks. The round trip is measured, never configured: it is
//! the batches' own BEGIN, a round trip in which the server does next to
//! nothing, as it typically goes (the median of the last batches). Workers
//! numbered at or past the depth wait (without a session until they first
//! run) instead of claiming.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

/// Round trips a batch waits on: four to PostgreSQL (BEGIN, the claim, the
/// mark with its savepoint, COMMIT) and one to the broker (the confirms),
/// which is taken to be as far as PostgreSQL.
const ROUND_TRIPS_PER_BATCH: u32 = 5;

/// Full batches each decision reads. A decision per this many batches
/// keeps the depth from following one slow batch; at 5 ms of round trip it
/// is about a tenth of a second of draining.
const DECISION_BATCHES: usize = 16;

/// The batches in flight a relay wants, shared by its workers.
#[derive(Debug)]
pub struct Depth {
    /// `relay.workers`: the depth on a near network, and the least.
    base: usize,
    /// `relay.max_workers`: the most.
    most: usize,
    wanted: watch::Sender<usize>,
    /// Full batches since the last decision: their whole time and their
    /// BEGIN's.
    samples: Mutex<VecDeque<(Duration, Duration)>>,
}

impl Depth {
    /// Starts at `base` batches in flight and may grow to `most`.
    pub fn new(base: usize, most: usize) -> Self {
        Self {
            base,
            most: most.max(base),
            wanted: watch::Sender::new(base),
            samples: Mutex::new(VecDeque::with_capacity(DECISION_BATCHES)),
        }
    }

    /// Whether worker `index` (from 0) should claim.
    pub fn wants(&self, index: usize) -> bool {
        index < *self.wanted.borrow()
    }

    /// Returns once worker `index` should claim.
    pub async fn until_wanted(&self, index: usize) {
        let mut wanted = self.wanted.subscribe();
        if wanted.wait_for(|&depth| index < depth).await.is_err() {
            unreachable!("the sender lives in `self`");
        }
    }

    /// Counts a full batch: it took `batch` from BEGIN to COMMIT, of which
    /// its BEGIN took `round_trip`. Every [`DECISION_BATCHES`] batches the
    /// depth is decided again; returns it when it changed.
    pub fn record(&self, batch: Duration, round_trip: Duration) -> Option<usize> {
        let decided = {
            let mut samples = self.samples.lock().expect("never held across a panic");
            samples.push_back((batch, round_trip));
            if samples.len() < DECISION_BATCHES {
                return None;
            }
            // The median batch and the median BEGIN: what a round trip
            // typically costs a batch, the time its bytes spend queued on
            // the way included (the quickest BEGIN saw a network far
            // quicker than the batch's other round trips did).
            let median = |pick: fn(&(Duration, Duration)) -> Duration| {
                let mut all: Vec<Duration> = samples.iter().map(pick).collect();
                all.sort_unstable();
                all[all.len() / 2]
            };
            let batch = median(|s| s.0);
            let round_trip = median(|s| s.1);
            samples.clear();
            depth_for(self.base, self.most, batch, round_trip)
        };
        self.wanted
            .send_if_modified(|depth| std::mem::replace(depth, decided) != decided)
            .then_some(decided)
    }
}

/// The batches in flight that keep a relay as busy as `base` keep it with
/// no round trip to wait on, for a batch that takes `batch` with
/// `round_trip` per round trip: while one batch waits on the network others
/// work, so the depth grows by `base` for each batch's worth of local work
/// the batch spends waiting (`base * waiting / working`, rounded), within
/// `base..=most`.
pub(super) fn depth_for(base: usize, most: usize, batch: Duration, round_trip: Duration) -> usize {
    let waiting = round_trip * ROUND_TRIPS_PER_BATCH;
    // A batch measured shorter than its round trips (a BEGIN slowed by
    // something else) is taken as all waiting, bounded by `most` below.
    let working = batch.saturating_sub(waiting).max(Duration::from_micros(1));
    let extra = base as f64 * waiting.as_secs_f64() / working.as_secs_f64();
    // Whole batches only; a float past usize saturates.
    (base.saturating_add(extra.round() as usize)).clamp(base, most.max(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: f64) -> Duration {
        Duration::from_secs_f64(ms / 1e3)
    }

    #[test]
    fn a_near_network_keeps_the_windows_batches_and_a_far_one_adds_for_the_wait() {
        // Localhost: a 0.1 ms BEGIN in an 8 ms batch.
        assert_eq!(depth_for(2, 8, ms(8.0), ms(0.1)), 2);
        // 1 ms away: 8 ms of work and 5 ms of waiting.
        assert_eq!(depth_for(2, 8, ms(13.0), ms(1.0)), 3);
        // 5 ms away: 8 ms of work and 25 ms of waiting wants 8 in flight.
        assert_eq!(depth_for(2, 16, ms(33.0), ms(5.0)), 8);
        assert_eq!(depth_for(2, 6, ms(33.0), ms(5.0)), 6, "never past the cap");
        assert_eq!(
            depth_for(1, 1, ms(33.0), ms(5.0)),
            1,
            "a cap of 1 turns it off"
        );
        assert_eq!(depth_for(2, 8, ms(1.0), ms(5.0)), 8, "all waiting");
        assert_eq!(
            depth_for(4, 2, ms(8.0), ms(0.1)),
            4,
            "never below the window"
        );
    }

    #[test]
    fn the_depth_is_decided_per_window_of_full_batches_and_drops_back() {
        let depth = Depth::new(2, 8);
        assert!(depth.wants(1) && !depth.wants(2));
        for _ in 1..DECISION_BATCHES {
            assert_eq!(depth.record(ms(33.0), ms(5.0)), None);
        }
        // The median batch (33 ms, not the mean 43: 4 in flight) and the
        // median BEGIN (5 ms, not the quickest 1: 2 in flight).
        assert_eq!(depth.record(ms(200.0), ms(1.0)), Some(8));
        assert!(depth.wants(7) && !depth.wants(8));
        for _ in 0..DECISION_BATCHES {
            depth.record(ms(8.0), ms(0.1));
        }
        assert!(depth.wants(1) && !depth.wants(2), "back to the window's 2");
    }

    #[tokio::test]
    async fn a_waiting_worker_starts_when_the_depth_reaches_it() {
        let depth = std::sync::Arc::new(Depth::new(2, 8));
        let third = tokio::spawn({
            let depth = depth.clone();
            async move { depth.until_wanted(2).await }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        for _ in 0..DECISION_BATCHES {
            depth.record(ms(13.0), ms(1.0));
        }
        tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("the third worker is wanted at 1 ms")
            .unwrap();
    }
}
