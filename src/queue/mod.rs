//! The queue-depth shedder: a short, bounded, managed wait queue in front of a concurrency limit.
//!
//! # Why
//!
//! A bare concurrency limit (tower's `ConcurrencyLimit` + `LoadShed`) rejects every request beyond the limit,
//! even in a 20 ms burst the service would have absorbed; tower's `ConcurrencyLimit` alone (or a `Buffer`) waits
//! without bound, so under sustained overload the queue grows until every client has timed out and the service
//! works only on requests nobody waits for. This layer sits in between:
//!
//! - **Bounded**: at most `max_depth` requests wait; a full queue rejects at once (reason queue-full), and a
//!   request never waits longer than `max_wait` (queue-timeout).
//! - **CoDel** (after Facebook's "Fail at Scale"; target 5 ms, interval 100 ms): a queue that has not been empty
//!   for a whole interval is *standing*, and its queued requests may then wait at most the target; otherwise up
//!   to `max_wait`. A burst that drains within the interval is served in full; a standing queue is cut down to
//!   the target instead of growing latency for everyone. "Not empty" is measured as a share of time (at least
//!   90 % of the interval), so a standing queue that the cut empties for an instant is not mistaken for a
//!   drained one. The verdict is judged at each interval's end and, in between, follows the queue as it goes:
//!   a run without a break for 90 % of an interval starts it, and a single break of over 10 % of one ends it.
//!   When the limit comes from an adaptive limiter, which knows the expected latency, the target is at least
//!   half of it (at most `max_wait`): a wait shorter than half a service time is not a queue worth cutting, and
//!   a fixed 5 ms target would shed the ordinary bursts of a busy 40 ms service.
//! - **Adaptive LIFO** (on by default): while a queue stands, its newest request is served first (the oldest
//!   ones' clients have probably given up); FIFO otherwise.
//! - Both act **per priority level, lowest first**: each level's queue is judged on its own, and a level is cut
//!   and reordered only while no lower level stands. While a flood of sheddable requests stands in the queue,
//!   critical requests keep their FIFO order and their full `max_wait`, even when their own queue is rarely
//!   empty; when everything is critical, CoDel and LIFO act on the critical level.
//! - **Priorities**: [`Priority`] `critical_plus`, `critical`, `sheddable_plus`, `sheddable` (the SRE book's
//!   criticality), read by a [`Prioritize`]r: with `.http()`/`.grpc()`, [`HeaderPriority`] reads a [`Priority`]
//!   request extension, a user extractor, or the `x-priority` header ([`PRIORITY_HEADER`], the one the
//!   simulator sends); absent or malformed values are `critical` ([`Priority::DEFAULT`]), never an error. Higher
//!   levels are served first; when the queue is full a higher arrival displaces the oldest request of the lowest
//!   queued level (rejected queue-full); `sheddable` may fill only half the queue and `sheddable_plus` three
//!   quarters. Optionally a share of the limit is reserved for critical levels, binding only at saturation
//!   ([`QueueBuilder::critical_reserve`]).
//! - **Deadline-aware**: a request whose [`Deadline`](crate::core::Deadline) cannot be met given the limit
//!   source's [`expected_latency`](crate::core::LimitSource::expected_latency) is rejected deadline-exceeded on
//!   arrival, while queued and at dequeue, instead of being served late. A queued request's timer is set for when
//!   its wait runs out or, by the expected latency of that moment, it becomes doomed; when it fires the queue
//!   judges the deadline again by the expected latency of then, so a request for which that latency has since
//!   fallen waits on (up to its wait). One that a risen expected latency dooms earlier leaves when its timer fires
//!   or when it reaches the head of the queue, whichever comes first: never later than its deadline.
//!   The deadline comes from a [`DeadlineSource`](crate::core::DeadlineSource), as for the adaptive limiter: by
//!   default the current one (which a [`DeadlineLayer`](crate::deadline::DeadlineLayer) outside sets around this
//!   layer's `call`); with `.http()`/`.grpc()` also one stored in the request's extensions, which is all a queue
//!   behind a tower `Buffer` (called on the buffer's task, outside the deadline's scope) has to go by, if the
//!   deadline layer stores it there (`request_extension(true)`); or your own ([`QueueBuilder::deadline_source`]).
//!
//! The limit is any [`LimitSource`](crate::core::LimitSource): a fixed `usize`, or the adaptive limiter's handle.
//! It is read live, so a raised limit is used at the next arrival or release, or at the latest when a waiter's
//! wait runs out.
//!
//! Admission happens in `call`, never in `poll_ready`. Below the limit with nobody queued, admission is one
//! atomic compare-and-swap: no lock, no allocation. Only the queueing path takes a small mutex around the wait
//! queue, and boxes the queued request's state (one allocation, freed when it leaves the queue), so that the
//! response future every admitted request moves stays small; a released permit wakes the next waiter in O(1). A
//! queued request whose future is dropped leaves the queue at once, and a slot handed to it just before passes on
//! to the next waiter.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{Service, ServiceExt};
//! use tower_backpressure::core::error::QueueFull;
//! use tower_backpressure::queue::QueueLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // One request at a time, one more may wait.
//! let layer = QueueLayer::builder().limit(1).max_depth(1).build().unwrap();
//! let handle = layer.handle();
//! let mut svc = tower::ServiceBuilder::new().layer(layer).service_fn(|ms: u64| async move {
//!     tokio::time::sleep(Duration::from_millis(ms)).await;
//!     Ok::<_, std::convert::Infallible>(ms)
//! });
//!
//! let first = svc.ready().await.unwrap().call(10);   // runs
//! let second = svc.ready().await.unwrap().call(10);  // waits for the first
//! let third = svc.ready().await.unwrap().call(10);   // queue full: rejected at once
//! assert!(third.await.unwrap_err().is::<QueueFull>());
//! assert_eq!(handle.snapshot().depth, 1);
//!
//! assert_eq!(first.await.unwrap(), 10);
//! assert_eq!(second.await.unwrap(), 10);
//! let snapshot = handle.snapshot();
//! assert_eq!((snapshot.in_flight, snapshot.depth, snapshot.completed), (0, 0, 2));
//! # }
//! ```

pub mod future;
mod layer;
mod priority;
mod service;
mod shared;

use std::fmt;
use std::sync::Arc;

pub use self::layer::{QueueBuilder, QueueLayer};
#[cfg(feature = "http")]
pub use self::priority::{HeaderPriority, PRIORITY_HEADER};
pub use self::priority::{ParsePriorityError, Prioritize, Priority, Uniform};
pub use self::service::Queue;

/// A cheap, cloneable handle on a queue layer's shared state.
///
/// [`QueueHandle::snapshot`] briefly takes the wait queue's lock, under which the layer also calls its observer:
/// do not take a snapshot from inside the same layer's observer.
#[derive(Clone)]
pub struct QueueHandle {
    shared: Arc<dyn Inspect>,
}

trait Inspect: Send + Sync + 'static {
    fn snapshot(&self) -> QueueSnapshot;
}

impl<L: crate::core::LimitSource, O: crate::core::Observer> Inspect for shared::Shared<L, O> {
    fn snapshot(&self) -> QueueSnapshot {
        shared::Shared::snapshot(self)
    }
}

impl QueueHandle {
    fn new<L: crate::core::LimitSource, O: crate::core::Observer>(
        shared: Arc<shared::Shared<L, O>>,
    ) -> Self {
        QueueHandle { shared }
    }

    /// The current figures.
    pub fn snapshot(&self) -> QueueSnapshot {
        self.shared.snapshot()
    }
}

impl fmt::Debug for QueueHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueHandle")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

/// A queue layer's figures at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueSnapshot {
    /// Requests admitted and not yet finished.
    pub in_flight: usize,
    /// The limit now.
    pub limit: usize,
    /// Requests waiting.
    pub depth: usize,
    /// Requests waiting per level, most important first (the order of [`Priority::ALL`]).
    pub depth_by_priority: [usize; 4],
    /// Requests admitted since the start (at once or after waiting).
    pub admitted: u64,
    /// Requests that entered the queue.
    pub queued: u64,
    /// Admitted requests that finished.
    pub completed: u64,
    /// Queued requests whose caller went away before they were served.
    pub cancelled: u64,
    /// Rejected because the queue (or their level's share of it) was full, or displaced by a higher level.
    pub rejected_queue_full: u64,
    /// Rejected after waiting `max_wait`, or the CoDel target under a standing queue.
    pub rejected_queue_timeout: u64,
    /// Rejected because their deadline had passed or could not be met.
    pub rejected_deadline: u64,
}
