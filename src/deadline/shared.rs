//! State shared by all clones of one deadline layer: configuration, observer and counters.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::core::observer::{self, is_noop};
use crate::core::stripe::Tally;
use crate::core::{Event, Observer, Outcome, Permit, Reason, Release, Releaser};

#[derive(Debug, Default)]
struct Counters {
    // Touched by every admitted request and read only for figures: striped, so that two threads admitting
    // requests do not write one cache line.
    requests: Tally,
    rejected: AtomicU64,
    invalid: AtomicU64,
    dropped: AtomicU64,
}

pub(super) struct Shared<K, O> {
    pub(super) config: K,
    pub(super) observer: O,
    layer: &'static str,
    counters: Counters,
}

impl<K, O: Observer> Shared<K, O> {
    pub(super) fn new(layer: &'static str, config: K, observer: O) -> Self {
        Shared {
            config,
            observer,
            layer,
            counters: Counters::default(),
        }
    }

    pub(super) fn admitted(&self, permit: &Permit) {
        let requests = &self.counters.requests;
        requests.admit();
        observer::admitted(&self.observer, self.layer, permit, || requests.in_flight());
    }

    pub(super) fn rejected(&self) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        self.observer.on_event(&Event::Rejected {
            layer: self.layer,
            reason: Reason::DeadlineExceeded,
            retry_after: None,
        });
    }

    pub(super) fn invalid(&self) {
        self.counters.invalid.fetch_add(1, Ordering::Relaxed);
    }
}

impl<K: Send + Sync + 'static, O: Observer> Shared<K, O> {
    /// The permit of an admitted request: timed only when the observer will see the latency, since only the
    /// observer uses it and `()` ignores it. (Told by the observer's type, not a field: a constant folds the test
    /// away.)
    pub(super) fn permit(&self, releaser: &Releaser, now: Instant) -> Permit {
        if !is_noop::<O>() {
            Permit::admitted_at(releaser.clone(), 0, now)
        } else {
            Permit::untimed(releaser.clone(), 0)
        }
    }
}

impl<K: Send + Sync + 'static, O: Observer> Release for Shared<K, O> {
    fn release(&self, outcome: Outcome, latency: Duration, _tag: u64) {
        let requests = &self.counters.requests;
        requests.finish();
        if outcome == Outcome::Dropped {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        observer::completed(&self.observer, self.layer, outcome, latency, || {
            requests.in_flight()
        });
    }
}

trait Snapshot: Send + Sync + 'static {
    fn snapshot(&self) -> DeadlineSnapshot;
}

impl<K: Send + Sync + 'static, O: Observer> Snapshot for Shared<K, O> {
    fn snapshot(&self) -> DeadlineSnapshot {
        let c = &self.counters;
        DeadlineSnapshot {
            in_flight: c.requests.in_flight(),
            admitted: c.requests.admitted(),
            rejected: c.rejected.load(Ordering::Relaxed),
            invalid: c.invalid.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }
}

/// A cheap, cloneable view of a deadline layer's figures, shared by all services the layer made.
#[derive(Clone)]
pub struct DeadlineHandle {
    shared: Arc<dyn Snapshot>,
}

impl DeadlineHandle {
    pub(super) fn new<K: Send + Sync + 'static, O: Observer>(shared: Arc<Shared<K, O>>) -> Self {
        DeadlineHandle { shared }
    }

    /// The figures now.
    pub fn snapshot(&self) -> DeadlineSnapshot {
        self.shared.snapshot()
    }
}

impl fmt::Debug for DeadlineHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DeadlineHandle")
            .field(&self.snapshot())
            .finish()
    }
}

/// A deadline layer's figures. Requests without any deadline pass through uncounted (the layer does not even
/// read the clock for them).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadlineSnapshot {
    /// Requests running under a deadline now.
    pub in_flight: usize,
    /// Requests let through under a deadline.
    pub admitted: u64,
    /// Requests refused before the inner service was called: expired, or less than the minimum budget left.
    pub rejected: u64,
    /// Requests that carried a malformed timeout header (the header ignored, or, in strict mode, the request
    /// refused with no observer event: it is not a shed). Always 0 for the propagating layer.
    pub invalid: u64,
    /// Admitted requests whose outcome was [`Outcome::Dropped`]: the deadline expired in flight, or the inner
    /// service answered with an overload signal.
    pub dropped: u64,
}
