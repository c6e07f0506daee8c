//! The deadline a request carries: the hook through which deadline, queue and limiter layers cooperate.

use std::future::Future;
use std::time::Duration;

use tokio::task::futures::TaskLocalFuture;
use tokio::time::Instant;

tokio::task_local! {
    static CURRENT: Deadline;
}

/// The absolute instant by which a request must be answered.
///
/// A deadline travels in the request's extensions (`req.extensions().get::<Deadline>()`) and, around the handler
/// future, in a task-local scope, so code deep in a handler finds it with [`Deadline::current`] and outbound calls
/// inherit it without plumbing. Time comes from `tokio::time`, so paused-time tests are deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline at `instant`.
    pub const fn at(instant: Instant) -> Self {
        Deadline(instant)
    }

    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Self {
        Deadline(Instant::now() + budget)
    }

    /// The instant.
    pub const fn instant(self) -> Instant {
        self.0
    }

    /// Time left from now; zero once passed.
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Time left at `now`; zero once passed.
    pub fn remaining_at(self, now: Instant) -> Duration {
        self.0.saturating_duration_since(now)
    }

    /// Whether the deadline has passed.
    pub fn is_expired(self) -> bool {
        Instant::now() >= self.0
    }

    /// The earlier of two deadlines.
    #[must_use]
    pub fn earliest(self, other: Deadline) -> Deadline {
        self.min(other)
    }

    /// The deadline of the current task-local scope, if any.
    pub fn current() -> Option<Deadline> {
        CURRENT.try_with(|d| *d).ok()
    }

    /// Runs `future` with this deadline as [`Deadline::current`]. Nested scopes keep the earliest deadline: an
    /// inner scope can shorten the budget, never extend it.
    pub fn scope<F: Future>(self, future: F) -> TaskLocalFuture<Deadline, F> {
        let effective = Deadline::current().map_or(self, |outer| outer.earliest(self));
        CURRENT.scope(effective, future)
    }

    /// Like [`Deadline::scope`] for a deadline the caller already made no later than [`Deadline::current`], which
    /// is therefore not read again.
    #[cfg(feature = "http")]
    pub(crate) fn scope_earliest<F: Future>(self, future: F) -> TaskLocalFuture<Deadline, F> {
        debug_assert!(Deadline::current().is_none_or(|outer| self <= outer));
        CURRENT.scope(self, future)
    }

    /// The deadline a request carries in its extensions.
    #[cfg(feature = "http")]
    pub fn of<B>(request: &http::Request<B>) -> Option<Deadline> {
        request.extensions().get::<Deadline>().copied()
    }

    /// Whether work expected to take `expected` can still finish before this deadline at `now`. Layers use it to
    /// shed doomed requests (those whose remaining budget is smaller than the expected service time).
    pub fn can_finish(self, now: Instant, expected: Duration) -> bool {
        self.remaining_at(now) > expected
    }
}
