//! The deadline a request carries: the hook through which deadline, queue and limiter layers cooperate.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::thread::LocalKey;
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;

thread_local! {
    // The deadline of the scope being polled on this thread. A `Copy` value in a `Cell` with a constant
    // initialiser: no lazy initialisation, no destructor to register, no borrow flag, so setting and restoring
    // it around a poll costs two plain thread-local accesses (`tokio::task_local!` keeps a `RefCell<Option<T>>`
    // and swaps it in and out through fallible accessors, several times the cost per poll).
    static CURRENT: Cell<Option<Deadline>> = const { Cell::new(None) };

    // While a deadline layer runs the inner service's `call` (`Deadline::enter_call`): the instant it read the
    // clock at. `None` otherwise, and in particular while futures are polled.
    static CALLED_AT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The clock, as a layer deciding in its `call` should read it: the instant a deadline layer outside read it, if
/// this runs inside that layer's call to its inner service, else `Instant::now()`.
///
/// `call`s run synchronously one inside the other, so the deadline layer's reading is as old as the few `call`s
/// in between (nanoseconds, unless a service blocks in `call`, which no service should); reading the clock again
/// would cost as much as the rest of a queue's admission. It is set only while the inner `call` runs, never while
/// futures are polled later.
#[inline]
pub(crate) fn now_in_call() -> Instant {
    match CALLED_AT.try_with(Cell::get) {
        Ok(Some(at)) => at,
        _ => Instant::now(),
    }
}

/// `budget` after `now`, or, for a budget too large to add to the clock, as far as it can go (see [`far_future`]):
/// never a panic.
pub(crate) fn instant_after(now: Instant, budget: Duration) -> Instant {
    now.checked_add(budget)
        .unwrap_or_else(|| far_future(now, budget))
}

/// The instant a budget too large to add to `now` stands for: the budget halved until it fits, so at least half as
/// far away as the furthest instant the clock can hold (centuries on any platform).
#[cold]
fn far_future(now: Instant, budget: Duration) -> Instant {
    let mut step = budget;
    loop {
        step /= 2;
        if let Some(at) = now.checked_add(step) {
            return at;
        }
    }
}

/// A thread-local `Cell<Option<T>>` that a [`Restore`] guard sets and puts back, named by a type so that the guard
/// holds nothing but the value it restores (a guard that kept the key too spent a store on it, and a register or
/// a stack slot across the inner `call`).
trait Slot: 'static {
    type Value: Copy + 'static;

    fn key() -> &'static LocalKey<Cell<Option<Self::Value>>>;
}

/// [`CURRENT`]: the deadline current on this thread.
struct Current;

impl Slot for Current {
    type Value = Deadline;

    #[inline(always)]
    fn key() -> &'static LocalKey<Cell<Option<Deadline>>> {
        &CURRENT
    }
}

/// [`CALLED_AT`]: the clock reading of the deadline layer whose inner `call` runs.
#[cfg(feature = "http")]
struct CalledAt;

#[cfg(feature = "http")]
impl Slot for CalledAt {
    type Value = Instant;

    #[inline(always)]
    fn key() -> &'static LocalKey<Cell<Option<Instant>>> {
        &CALLED_AT
    }
}

/// Sets a thread-local slot to a value until dropped, then restores the previous one (also while unwinding): the
/// scope of [`Deadline::current`] around a poll and of [`now_in_call`] around a `call`.
struct Restore<S: Slot> {
    previous: Option<S::Value>,
}

impl<S: Slot> Restore<S> {
    // Used by the deadline layers' `enter_call` only.
    #[cfg(feature = "http")]
    #[inline]
    fn set(value: S::Value) -> Self {
        // Never fails for a constant-initialised `Cell` without destructor; if it did, the scope would be empty.
        let previous = S::key().try_with(|c| c.replace(Some(value))).ok().flatten();
        Restore { previous }
    }
}

impl Restore<Current> {
    /// Makes `deadline` current, or leaves the current one if that is earlier: a scope polled (or dropped) inside
    /// another keeps the earlier deadline whichever was made first.
    #[inline]
    fn earliest(deadline: Deadline) -> Self {
        let previous = CURRENT
            .try_with(|c| {
                let previous = c.get();
                if previous.is_none_or(|outer| deadline < outer) {
                    c.set(Some(deadline));
                }
                previous
            })
            .ok()
            .flatten();
        Restore { previous }
    }
}

impl<S: Slot> Drop for Restore<S> {
    #[inline]
    fn drop(&mut self) {
        let _ = S::key().try_with(|c| c.set(self.previous));
    }
}

/// While alive, a deadline and a clock reading are current for the inner `call` of a deadline layer: made by
/// [`Deadline::enter_call`].
#[cfg(feature = "http")]
pub(crate) struct CallScope {
    _current: Restore<Current>,
    _called: Restore<CalledAt>,
}

/// While alive, a deadline is current (unless an earlier one already is), as around a poll of
/// [`DeadlineScope`]: made by [`Deadline::enter_poll`].
#[cfg(feature = "http")]
pub(crate) struct PollScope {
    _current: Restore<Current>,
}

/// The absolute instant by which a request must be answered.
///
/// Around the inner service's `call` and the handler future a deadline is current in a task-local scope, so code
/// deep in a handler finds it with [`Deadline::current`] and outbound calls inherit it without plumbing. The
/// deadline layers can also store it in the request's extensions (`req.extensions().get::<Deadline>()`), for code
/// that moves the request to another task before calling on it: see `request_extension` on their builders.
/// Time comes from `tokio::time`, so paused-time tests are deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline at `instant`.
    pub const fn at(instant: Instant) -> Self {
        Deadline(instant)
    }

    /// A deadline `budget` from now. A budget too large to add to the clock (`Duration::MAX`, say, from a
    /// configuration meaning "no limit") gives a deadline centuries away, which never constrains anything, rather
    /// than a panic.
    pub fn after(budget: Duration) -> Self {
        Deadline(instant_after(Instant::now(), budget))
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

    /// The deadline of the current task-local scope, if any: that of the innermost [`Deadline::scope`] whose
    /// future is being polled (or dropped) on this thread.
    #[inline]
    pub fn current() -> Option<Deadline> {
        CURRENT.try_with(Cell::get).ok().flatten()
    }

    /// Runs `future` with this deadline as [`Deadline::current`]. Nested scopes keep the earliest deadline: an
    /// inner scope can shorten the budget, never extend it. That holds for the scope current when `scope` is
    /// called and for any scope the returned future is later polled or dropped in (a future made first and
    /// awaited under a shorter deadline sees the shorter one).
    ///
    /// Like `tokio::task_local!`, the deadline is set while the future is polled and while it is dropped, and
    /// only then: a task spawned from inside does not inherit it, and two tasks on one thread never see each
    /// other's.
    pub fn scope<F: Future>(self, future: F) -> DeadlineScope<F> {
        let effective = Deadline::current().map_or(self, |outer| outer.earliest(self));
        DeadlineScope::new(effective, future)
    }

    /// Makes this deadline [`Deadline::current`] and `now` (the caller's clock reading) [`now_in_call`] until the
    /// returned guard is dropped, which restores both (also while unwinding). The caller makes sure the deadline
    /// is no later than the current one.
    ///
    /// A layer's `call` runs before its future is first polled, so outside any [`Deadline::scope`]: the deadline
    /// layers run the inner service's `call` under this guard, so that the layers inside them (a queue, a
    /// limiter) see the deadline when they decide, whether or not it is in the request's extensions, and judge it
    /// without reading the clock again. A guard rather than a closure: the request goes straight to the inner
    /// `call` instead of being moved into a closure first (a copy of a few hundred bytes).
    #[cfg(feature = "http")]
    #[inline]
    #[must_use = "the deadline is current only while the guard lives"]
    pub(crate) fn enter_call(self, now: Instant) -> CallScope {
        debug_assert!(Deadline::current().is_none_or(|outer| self <= outer));
        CallScope {
            _current: Restore::set(self),
            _called: Restore::set(now),
        }
    }

    /// Makes this deadline [`Deadline::current`] until the returned guard is dropped, unless an earlier one is
    /// current already, exactly as [`DeadlineScope`] does around each poll: for what is polled without being a
    /// future (a response body).
    #[cfg(feature = "http")]
    #[inline]
    #[must_use = "the deadline is current only while the guard lives"]
    pub(crate) fn enter_poll(self) -> PollScope {
        PollScope {
            _current: Restore::earliest(self),
        }
    }

    /// The deadline a request carries in its extensions.
    #[cfg(feature = "http")]
    #[inline]
    pub fn of<B>(request: &http::Request<B>) -> Option<Deadline> {
        request.extensions().get::<Deadline>().copied()
    }

    /// The deadline that applies to `request`: the earlier of the one in its extensions ([`Deadline::of`]) and
    /// [`Deadline::current`]. A service behind a [`DeadlineLayer`](crate::deadline::DeadlineLayer) finds the
    /// deadline here whether or not the layer stores it in the extensions (it does not by default); so does one
    /// on another task, if the layer does. The HTTP and gRPC deadline layers read it in `call`, and so do the
    /// queue and the adaptive limiter through [`RequestDeadline`].
    #[cfg(feature = "http")]
    #[inline]
    pub fn find<B>(request: &http::Request<B>) -> Option<Deadline> {
        Deadline::earlier(Deadline::of(request), Deadline::current())
    }

    /// The earlier of two deadlines either of which may be missing (`Option`'s own order puts `None` first).
    #[cfg(feature = "http")]
    #[inline]
    pub(crate) fn earlier(a: Option<Deadline>, b: Option<Deadline>) -> Option<Deadline> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.earliest(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether work expected to take `expected` can still finish before this deadline at `now`. Layers use it to
    /// shed doomed requests (those whose remaining budget is smaller than the expected service time).
    #[inline]
    pub fn can_finish(self, now: Instant, expected: Duration) -> bool {
        // The same as `self.remaining_at(now) > expected`, by adding to an instant rather than subtracting two: the
        // subtraction handles either order and the carry both ways, at three times the instructions, and the
        // queue and the limiter both ask on every request under a deadline. When `now + expected` is past what the
        // clock can hold, no deadline lies beyond it.
        now.checked_add(expected).is_some_and(|by| self.0 > by)
    }
}

pin_project! {
    /// A future run with a [`Deadline`] as [`Deadline::current`]: made by [`Deadline::scope`].
    ///
    /// The inner future is dropped inside the scope too, as soon as it has answered or when this future is
    /// dropped.
    #[must_use = "futures do nothing unless polled"]
    pub struct DeadlineScope<F> {
        deadline: Deadline,
        // `None` once the inner future has answered.
        #[pin]
        future: Option<F>,
    }

    impl<F> PinnedDrop for DeadlineScope<F> {
        // Inline: the common case (the inner future answered and is gone already) is one test; the rest is out of
        // line. A loop rather than an `if`, though it runs once at most: the compiler then knows the future is gone
        // when the drop glue comes to the field next, and leaves out the glue's own test and the inner future's
        // drop (which made the glue too large to inline into its caller's).
        #[inline]
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            while std::mem::needs_drop::<F>() && this.future.is_some() {
                drop_in_scope(*this.deadline, this.future.as_mut());
            }
        }
    }
}

/// Drops an unfinished inner future (or body) with its deadline current, as [`DeadlineScope`]'s drop does and the
/// deadline layers' response body's.
#[inline(never)]
pub(crate) fn drop_in_scope<F>(deadline: Deadline, mut future: Pin<&mut Option<F>>) {
    let _enter = Restore::earliest(deadline);
    future.set(None);
}

impl<F> DeadlineScope<F> {
    fn new(deadline: Deadline, future: F) -> Self {
        DeadlineScope {
            deadline,
            future: Some(future),
        }
    }

    /// The deadline this scope sets (while it is polled inside a scope with an earlier one, that one stays
    /// current).
    pub fn deadline(&self) -> Deadline {
        self.deadline
    }
}

impl<F: Future> Future for DeadlineScope<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        poll_in_scope(*this.deadline, this.future, cx)
            .expect("`DeadlineScope` polled after completion")
    }
}

/// Polls `future` with `deadline` current (unless an earlier one is), and drops it, still inside, once it has
/// answered: [`DeadlineScope`]'s poll, and the deadline layers' response futures' (whose inner future is not in a
/// `DeadlineScope`, see `deadline::future`). `None` if it has answered already.
#[inline]
pub(crate) fn poll_in_scope<F: Future>(
    deadline: Deadline,
    mut future: Pin<&mut Option<F>>,
    cx: &mut Context<'_>,
) -> Option<Poll<F::Output>> {
    let _enter = Restore::earliest(deadline);
    let output = future.as_mut().as_pin_mut()?.poll(cx);
    if output.is_ready() {
        // Dropped while the deadline is still current, as it would be had the caller dropped it.
        future.set(None);
    }
    Some(output)
}

impl<F> fmt::Debug for DeadlineScope<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadlineScope")
            .field("deadline", &self.deadline)
            .field("done", &self.future.is_none())
            .finish()
    }
}

/// Where a layer that judges deadlines finds a request's deadline: the adaptive limiter's
/// [`deadline_source`](crate::adaptive::AdaptiveConcurrencyBuilder::deadline_source) and the queue's
/// [`deadline_source`](crate::queue::QueueBuilder::deadline_source).
///
/// - [`CurrentDeadline`] (the default, any request type): [`Deadline::current`], which a deadline layer outside
///   sets around the inner `call`, as does [`Deadline::scope`] around a caller.
/// - [`RequestDeadline`] (feature `http`, what both layers' `.http()` and `.grpc()` pick): [`Deadline::find`],
///   the earlier of the current deadline and one stored in the request's extensions. It also finds a deadline
///   when the request was taken to another task before this `call` (behind tower's `Buffer`), where no scope is
///   current, if the deadline layer stores it there
///   ([`request_extension(true)`](crate::deadline::DeadlineLayerBuilder::request_extension)).
/// - A closure `Fn(&Req) -> Option<Deadline>`. What it returns is the deadline: it replaces the current one rather
///   than adding to it, so to keep a deadline layer's outside in force, take the earlier of the two (see the
///   example on `deadline_source`).
pub trait DeadlineSource<Req>: Clone + Send + Sync + 'static {
    /// The deadline `request` must be answered by, if it has one.
    fn deadline(&self, request: &Req) -> Option<Deadline>;
}

/// Reads [`Deadline::current`] for any request type: see [`DeadlineSource`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CurrentDeadline;

impl<Req> DeadlineSource<Req> for CurrentDeadline {
    #[inline(always)]
    fn deadline(&self, _request: &Req) -> Option<Deadline> {
        Deadline::current()
    }
}

/// Reads [`Deadline::find`] for HTTP requests (the current deadline, or an earlier one in the extensions): see
/// [`DeadlineSource`].
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestDeadline;

#[cfg(feature = "http")]
impl<B> DeadlineSource<http::Request<B>> for RequestDeadline {
    #[inline(always)]
    fn deadline(&self, request: &http::Request<B>) -> Option<Deadline> {
        Deadline::find(request)
    }
}

impl<F, Req> DeadlineSource<Req> for F
where
    F: Fn(&Req) -> Option<Deadline> + Clone + Send + Sync + 'static,
{
    #[inline]
    fn deadline(&self, request: &Req) -> Option<Deadline> {
        self(request)
    }
}

#[cfg(all(test, feature = "http"))]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_budget_too_large_for_the_clock_is_a_far_deadline_not_a_panic() {
        let deadline = Deadline::after(Duration::MAX);
        assert!(deadline.remaining() > Duration::from_secs(86_400 * 365 * 100));
        assert!(!deadline.is_expired());
    }

    #[tokio::test(start_paused = true)]
    async fn the_call_clock_is_the_callers_reading_only_during_the_call() {
        let read = Instant::now();
        let deadline = Deadline::at(read + Duration::from_secs(1));
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(now_in_call(), Instant::now());
        let seen = {
            let _call = deadline.enter_call(read);
            let inner = Deadline::at(read + Duration::from_millis(500));
            let nested = {
                let _call = inner.enter_call(read + Duration::from_millis(1));
                (now_in_call(), Deadline::current())
            };
            (now_in_call(), Deadline::current(), nested)
        };
        assert_eq!(
            seen,
            (
                read,
                Some(deadline),
                (
                    read + Duration::from_millis(1),
                    Some(Deadline::at(read + Duration::from_millis(500)))
                )
            )
        );
        assert_eq!(now_in_call(), Instant::now());
        assert_eq!(Deadline::current(), None);
        // Unwinding restores both.
        let unwound = std::panic::catch_unwind(|| {
            let _call = deadline.enter_call(read);
            panic!("in call")
        });
        assert!(unwound.is_err());
        assert_eq!((now_in_call(), Deadline::current()), (Instant::now(), None));
    }
}

#[cfg(test)]
mod can_finish_tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// `can_finish` adds to an instant instead of subtracting two: it answers as the remaining budget compared
        /// with the expected time does, on either side of the deadline, at it, and for times too long to add.
        #[test]
        fn can_finish_is_the_remaining_budget_against_the_expected_time(
            deadline_ns in 0u64..4_000_000_000,
            now_ns in 0u64..4_000_000_000,
            expected_ns in prop_oneof![0u64..4_000_000_000, Just(u64::MAX)],
            huge in any::<bool>(),
        ) {
            let base = Instant::now();
            let deadline = Deadline::at(base + Duration::from_nanos(deadline_ns));
            let now = base + Duration::from_nanos(now_ns);
            let expected = if huge { Duration::MAX } else { Duration::from_nanos(expected_ns) };
            prop_assert_eq!(deadline.can_finish(now, expected), deadline.remaining_at(now) > expected);
        }
    }

    #[test]
    fn can_finish_at_the_boundaries() {
        let now = Instant::now();
        let at = |ns| Deadline::at(now + Duration::from_nanos(ns));
        assert!(!at(0).can_finish(now, Duration::ZERO), "no time left");
        assert!(at(1).can_finish(now, Duration::ZERO));
        assert!(
            !at(5).can_finish(now, Duration::from_nanos(5)),
            "exactly the time left is not enough"
        );
        assert!(at(6).can_finish(now, Duration::from_nanos(5)));
        assert!(!at(u64::MAX).can_finish(now, Duration::MAX));
        let passed = Deadline::at(now);
        assert!(!passed.can_finish(now + Duration::from_secs(1), Duration::ZERO));
    }
}
