//! The hysteresis state machine behind every pressure signal.

use std::time::Duration;

use tokio::time::Instant;

/// One signal's thresholds: pressured once a sample goes above `trip`, healthy again only once samples have
/// stayed below `recover` (which is below `trip`) for `min_recovery`. The gap between the two, and the hold,
/// keep a signal hovering around one threshold from flapping the state on every sample.
#[derive(Debug, Clone)]
pub(crate) struct Trip {
    trip: u64,
    recover: u64,
    min_recovery: Duration,
    tripped: bool,
    below_since: Option<Instant>,
}

impl Trip {
    pub(crate) fn new(trip: u64, recover: u64, min_recovery: Duration) -> Self {
        debug_assert!(recover < trip);
        Trip {
            trip,
            recover,
            min_recovery,
            tripped: false,
            below_since: None,
        }
    }

    pub(crate) fn is_tripped(&self) -> bool {
        self.tripped
    }

    /// Feeds one sample taken at `now`; returns whether the signal is tripped afterwards.
    pub(crate) fn update(&mut self, value: u64, now: Instant) -> bool {
        if !self.tripped {
            self.tripped = value > self.trip;
        } else if value < self.recover {
            let since = *self.below_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= self.min_recovery {
                self.tripped = false;
                self.below_since = None;
            }
        } else {
            // Any sample at or above `recover` restarts the hold: recovery needs an unbroken calm stretch.
            self.below_since = None;
        }
        self.tripped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[tokio::test(start_paused = true)]
    async fn trips_above_trip_and_recovers_only_below_recover() {
        let mut t = Trip::new(50 * MS, 20 * MS, Duration::ZERO);
        assert!(
            !t.update(50 * MS, Instant::now()),
            "at the threshold is not above it"
        );
        assert!(t.update(51 * MS, Instant::now()));
        // Between the thresholds: stays tripped however long it lasts.
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(10)).await;
            assert!(t.update(30 * MS, Instant::now()));
        }
        assert!(
            t.update(20 * MS, Instant::now()),
            "at recover is not below it"
        );
        assert!(!t.update(19 * MS, Instant::now()));
        // Between the thresholds again, from healthy: stays healthy.
        assert!(!t.update(40 * MS, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn recovery_needs_an_unbroken_calm_stretch() {
        let mut t = Trip::new(50 * MS, 20 * MS, Duration::from_millis(100));
        assert!(t.update(80 * MS, Instant::now()));
        assert!(t.update(5 * MS, Instant::now()), "calm starts now");
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(t.update(5 * MS, Instant::now()));
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(
            t.update(25 * MS, Instant::now()),
            "a sample above recover breaks the stretch"
        );
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(t.update(5 * MS, Instant::now()), "calm starts again");
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(
            t.update(5 * MS, Instant::now()),
            "99 ms of calm is not enough"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!t.update(5 * MS, Instant::now()), "100 ms of calm is");
        assert!(!t.is_tripped());
    }
}
