//! Capped exponential back-off with full jitter, shared by every reconnect
//! loop and by a worker that hits an error.
//!
//! Full jitter (a random delay between half the step and the step) keeps
//! several relay instances from reconnecting in lock step after an outage.

use std::time::Duration;

/// The delays of one retry sequence: `base`, `2 * base`, ... up to `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A sequence starting at `base` and never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The next delay, jittered into `[step / 2, step]`.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step();
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        half + step.mul_f64(fastrand::f64() * 0.5)
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts again from `base`, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    fn step(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        self.base.saturating_mul(factor).min(self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_doubling_and_stays_under_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        let steps = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
        for (d, step) in delays.iter().zip(steps) {
            let step = Duration::from_millis(step);
            assert!(
                *d >= step / 2 && *d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
        }
        assert_eq!(b.attempts(), 8);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(60));
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
    }
}
