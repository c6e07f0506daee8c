//! The state one queue layer shares across its services: the in-flight count, the wait queue and the counters.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::time::Instant;

use super::priority::Priority;
use super::QueueSnapshot;
use crate::core::observer::{self, is_noop};
use crate::core::{
    Deadline, Event, LimitSource, Observer, Outcome, Permit, Reason, Release, Releaser,
};

const LAYER: &str = "queue";
const NIL: usize = usize::MAX;
const LEVELS: usize = 4;

/// The share of `max_depth` each level may fill (indexed by [`Priority::index`]): sheddable traffic may take half
/// the queue, sheddable_plus three quarters, critical levels all of it.
const LEVEL_SHARE: [f64; LEVELS] = [0.5, 0.75, 1.0, 1.0];

/// Validated settings.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) max_depth: usize,
    pub(crate) max_wait: Duration,
    /// Off: queued requests may always wait `max_wait` (the standing test still drives adaptive LIFO).
    pub(crate) codel: bool,
    pub(crate) target: Duration,
    pub(crate) interval: Duration,
    pub(crate) lifo: bool,
    pub(crate) critical_reserve: f64,
}

impl Config {
    fn level_cap(&self, level: usize) -> usize {
        let cap = (self.max_depth as f64 * LEVEL_SHARE[level]).floor() as usize;
        cap.clamp(1.min(self.max_depth), self.max_depth)
    }
}

/// A request's answer from the queue, once it leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Queued,
    Granted,
    Rejected(Reason),
}

#[derive(Debug)]
struct Node {
    prev: usize,
    next: usize,
    level: usize,
    enqueued: Instant,
    /// When its wait runs out: CoDel's target or `max_wait` after `enqueued`, as its level's queue stood then.
    until: Instant,
    deadline: Option<Deadline>,
    waker: Option<Waker>,
    slot: Slot,
}

#[derive(Debug, Clone, Copy)]
struct List {
    head: usize,
    tail: usize,
    len: usize,
}

const EMPTY: List = List {
    head: NIL,
    tail: NIL,
    len: 0,
};

/// CoDel's standing-queue test for one level, after Facebook's "Fail at Scale": a queue that has not been empty
/// for a whole interval is standing. Emptiness is measured as a share of time: the level stands while it was
/// non-empty for at least 90 % of the last interval (see `observe` for how that is judged between intervals'
/// ends: a single break of over 10 % of one ends it at once). Under overload, a queue cut down to the target
/// can touch empty for an instant; that must not reset it to a long FIFO wait. A moderately loaded level whose
/// queue keeps emptying (critical traffic passing through a flood of sheddable requests) never stands.
#[derive(Debug, Clone, Copy)]
struct Standing {
    interval_start: Instant,
    /// Time non-empty in the current interval before the run under way (if any).
    nonempty: Duration,
    /// Whether the level is empty or not, and since when.
    occupancy: Occupancy,
    /// The longest time the level stayed empty since the last `observe`.
    gap: Duration,
    standing: bool,
}

#[derive(Debug, Clone, Copy)]
enum Occupancy {
    Empty(Instant),
    /// Non-empty without a break since then.
    NonEmpty(Instant),
}

impl Standing {
    fn new(now: Instant) -> Self {
        Standing {
            interval_start: now,
            nonempty: Duration::ZERO,
            occupancy: Occupancy::Empty(now),
            gap: Duration::ZERO,
            standing: false,
        }
    }

    /// The part of the run under way that falls in the current interval.
    fn run_in_interval(&self, now: Instant) -> Duration {
        match self.occupancy {
            Occupancy::NonEmpty(since) => {
                now.saturating_duration_since(since.max(self.interval_start))
            }
            Occupancy::Empty(_) => Duration::ZERO,
        }
    }

    fn filled(&mut self, now: Instant) {
        if let Occupancy::Empty(since) = self.occupancy {
            self.gap = self.gap.max(now.saturating_duration_since(since));
        }
        self.occupancy = Occupancy::NonEmpty(now);
    }

    fn emptied(&mut self, now: Instant) {
        self.nonempty += self.run_in_interval(now);
        self.occupancy = Occupancy::Empty(now);
    }

    /// Standing means non-empty for at least 90 % of the last interval. Judged at intervals' ends alone, a
    /// verdict would hold for the whole next interval, up to one interval late either way; so in between, a
    /// single break longer than the 10 % allowed ends it at once (a burst after a drained queue is served in
    /// full), and a run without a break as long as the 90 % required starts it at once.
    fn observe(&mut self, now: Instant, interval: Duration) {
        let elapsed = now.saturating_duration_since(self.interval_start);
        if elapsed >= interval {
            self.standing = self.nonempty + self.run_in_interval(now) >= elapsed.mul_f64(0.9);
            self.nonempty = Duration::ZERO;
            self.interval_start = now;
        }
        let (empty_for, run) = match self.occupancy {
            Occupancy::Empty(since) => (now.saturating_duration_since(since), Duration::ZERO),
            Occupancy::NonEmpty(since) => (Duration::ZERO, now.saturating_duration_since(since)),
        };
        if empty_for.max(std::mem::take(&mut self.gap)) > interval / 10 {
            self.standing = false;
        }
        if run >= interval.mul_f64(0.9) {
            self.standing = true;
        }
    }
}

/// The wait queue: one intrusive doubly linked list per level over a slab of nodes, so pushing, popping either
/// end and unlinking a cancelled waiter are O(1), and memory is reused instead of growing.
#[derive(Debug)]
pub(crate) struct WaitQueue {
    nodes: Vec<Node>,
    free: Vec<usize>,
    lists: [List; LEVELS],
    len: usize,
    /// The standing-queue test of each level. Per level, because a flood of sheddable traffic stands in the
    /// queue while critical requests pass straight through: their short waits must not be cut on the flood's
    /// account.
    standing: [Standing; LEVELS],
}

impl WaitQueue {
    fn new() -> Self {
        WaitQueue {
            nodes: Vec::new(),
            free: Vec::new(),
            lists: [EMPTY; LEVELS],
            len: 0,
            standing: [Standing::new(Instant::now()); LEVELS],
        }
    }

    /// Closes the standing tests' measuring intervals that are over.
    fn observe(&mut self, now: Instant, config: &Config) {
        for standing in &mut self.standing {
            standing.observe(now, config.interval);
        }
    }

    /// Whether CoDel's cut and adaptive LIFO act on `level` now: its queue stands, and no lower level's does.
    /// Lower levels are shed first: while a flood of sheddable requests stands in the queue (even if the cut
    /// empties it for a moment), critical ones keep their FIFO order and their full `max_wait`.
    fn managed(&self, level: usize) -> bool {
        self.standing[level].standing && !self.standing[..level].iter().any(|s| s.standing)
    }

    fn push(
        &mut self,
        level: usize,
        enqueued: Instant,
        until: Instant,
        deadline: Option<Deadline>,
    ) -> usize {
        if self.lists[level].len == 0 {
            self.standing[level].filled(enqueued);
        }
        let node = Node {
            prev: self.lists[level].tail,
            next: NIL,
            level,
            enqueued,
            until,
            deadline,
            waker: None,
            slot: Slot::Queued,
        };
        let index = match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        let list = &mut self.lists[level];
        if list.tail == NIL {
            list.head = index;
        } else {
            self.nodes[list.tail].next = index;
        }
        list.tail = index;
        list.len += 1;
        self.len += 1;
        index
    }

    /// Takes a queued node out of its list and gives it its answer; the node stays allocated until its waiter
    /// collects the answer (or is dropped).
    fn unlink(&mut self, index: usize, slot: Slot, now: Instant) -> Option<Waker> {
        let (prev, next, level) = {
            let n = &self.nodes[index];
            (n.prev, n.next, n.level)
        };
        if prev == NIL {
            self.lists[level].head = next;
        } else {
            self.nodes[prev].next = next;
        }
        if next == NIL {
            self.lists[level].tail = prev;
        } else {
            self.nodes[next].prev = prev;
        }
        self.lists[level].len -= 1;
        self.len -= 1;
        if self.lists[level].len == 0 {
            self.standing[level].emptied(now);
        }
        let node = &mut self.nodes[index];
        node.slot = slot;
        node.prev = NIL;
        node.next = NIL;
        node.waker.take()
    }

    fn release_node(&mut self, index: usize) {
        self.nodes[index].waker = None;
        self.free.push(index);
    }

    fn top_level(&self) -> Option<usize> {
        (0..LEVELS).rev().find(|&l| self.lists[l].len > 0)
    }

    fn lowest_level(&self) -> Option<usize> {
        (0..LEVELS).find(|&l| self.lists[l].len > 0)
    }
}

/// Bit 0 of [`Slots::admitted`]: somebody waits in the queue.
const QUEUED: u64 = 1;
/// What one request adds to [`Slots::admitted`] and [`Slots::released`] (bit 0 of `admitted` is [`QUEUED`]).
const ONE: u64 = 2;

/// The in-flight count as two monotonic counters, so that an admission is one compare-and-swap and a release one
/// add, and neither needs a separate counter for the snapshot's figures.
///
/// `admitted` counts slots taken (in units of [`ONE`]) and carries the [`QUEUED`] flag, so the fast path's "nobody
/// waits and a slot is free" is decided by the very compare-and-swap that takes the slot: an arrival cannot slip
/// in ahead of a request queued between its check and its admission. `released` counts finished requests. In
/// flight = admitted - released; read `released` first, and a concurrent release can only make the figure
/// too high, never let the limit be exceeded. Both wrap together, so the difference stays exact.
#[derive(Debug)]
struct Slots {
    admitted: AtomicU64,
    released: AtomicU64,
}

/// The shared state of one queue layer.
pub(crate) struct Shared<L, O> {
    /// Written by every admission and release.
    slots: Slots,
    limit: L,
    reserving: bool,
    observer: O,
    config: Config,
    /// Requests of critical levels in flight; only kept when a share of the limit is reserved for them.
    critical_in_flight: AtomicUsize,
    queue: Mutex<WaitQueue>,
    queued: AtomicU64,
    cancelled: AtomicU64,
    rejected: [AtomicU64; 3],
}

/// Why `call` cannot run a request now.
pub(crate) enum NotNow {
    /// Wait in the queue at this node until `wake_at` at the latest.
    Queued { index: usize, wake_at: Instant },
    /// Refused.
    Rejected(Reason),
}

impl<L: LimitSource, O: Observer> Shared<L, O> {
    pub(crate) fn new(limit: L, observer: O, config: Config) -> Self {
        Shared {
            limit,
            observer,
            reserving: config.critical_reserve > 0.0,
            config,
            slots: Slots {
                admitted: AtomicU64::new(0),
                released: AtomicU64::new(0),
            },
            critical_in_flight: AtomicUsize::new(0),
            queue: Mutex::new(WaitQueue::new()),
            queued: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            rejected: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    fn lock(&self) -> MutexGuard<'_, WaitQueue> {
        // The queue's invariants hold between statements that cannot panic, so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reserving(&self) -> bool {
        self.reserving
    }

    /// Slots taken and requests finished so far, in units of [`ONE`] (both wrap). `released` is read first, so
    /// that a request finishing in between is counted in flight rather than lost.
    fn slot_counts(&self) -> (u64, u64) {
        let released = self.slots.released.load(Ordering::SeqCst);
        let admitted = self.slots.admitted.load(Ordering::SeqCst) & !QUEUED;
        (admitted, released)
    }

    /// Requests in flight now (admitted and not finished).
    fn in_flight(&self) -> usize {
        let (admitted, released) = self.slot_counts();
        (admitted.wrapping_sub(released) / ONE) as usize
    }

    /// Takes an in-flight slot if `level` may have one now. An arrival (`serving` false) takes none while somebody
    /// waits; the queue's own hand-over (`serving`, under the lock) serves the waiters.
    #[inline]
    fn try_acquire(&self, level: usize, serving: bool) -> bool {
        let limit = self.limit.limit();
        let critical = self.reserving() && Priority::from_index(level).is_critical();
        // Idle capacity is borrowed by every level; the reserve only binds once the limit is reached, where a
        // critical request may still enter while critical traffic holds less than its reserved share.
        let ceiling = if critical {
            let reserved = (limit as f64 * self.config.critical_reserve).ceil() as usize;
            if self.critical_in_flight.load(Ordering::SeqCst) < reserved {
                limit.saturating_add(reserved)
            } else {
                limit
            }
        } else {
            limit
        };
        loop {
            // `released` first: a release between the two loads makes the count too high, never too low.
            let released = self.slots.released.load(Ordering::SeqCst);
            let current = self.slots.admitted.load(Ordering::SeqCst);
            if current & QUEUED != 0 && !serving {
                return false;
            }
            let in_flight = (current & !QUEUED).wrapping_sub(released) / ONE;
            if in_flight >= ceiling as u64 {
                return false;
            }
            if self
                .slots
                .admitted
                .compare_exchange_weak(
                    current,
                    current.wrapping_add(ONE),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
            {
                if critical {
                    self.critical_in_flight.fetch_add(1, Ordering::SeqCst);
                }
                return true;
            }
        }
    }

    fn tag(&self, level: usize) -> u64 {
        let critical = self.reserving() && Priority::from_index(level).is_critical();
        level as u64 | (u64::from(critical) << 8)
    }

    /// Reports an admission (the slot was counted when it was taken). Called once the permit that gives the slot
    /// back exists, so that an observer that panics cannot keep the slot.
    fn note_admitted(&self, permit: &Permit) {
        observer::admitted(&self.observer, LAYER, permit, || self.in_flight());
    }

    fn permit(&self, owner: &Releaser, level: usize, now: Option<Instant>) -> Permit {
        let owner = owner.clone();
        let tag = self.tag(level);
        let permit = match now {
            Some(now) => Permit::admitted_at(owner, tag, now),
            // Latencies are worth a clock read only to an observer: `()` ignores them (a constant test).
            None if !is_noop::<O>() => Permit::new(owner, tag),
            None => Permit::untimed(owner, tag),
        };
        self.note_admitted(&permit);
        permit
    }

    fn count_rejection(&self, reason: Reason) {
        let i = match reason {
            Reason::QueueFull => 0,
            Reason::QueueTimeout => 1,
            _ => 2,
        };
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
        self.observer.on_event(&Event::Rejected {
            layer: LAYER,
            reason,
            retry_after: None,
        });
    }

    /// CoDel's target: the configured one, raised to half the expected latency when the limit source knows it.
    /// A queue that drains within half a service time is no standing queue worth cutting: with 40 ms services a
    /// fixed 5 ms target would shed Poisson bursts that a busy but healthy service absorbs. Never above
    /// `max_wait`, which bounds every wait anyway.
    fn target(&self) -> Duration {
        self.config
            .target
            .max(self.expected() / 2)
            .min(self.config.max_wait)
    }

    fn expected(&self) -> Duration {
        self.limit.expected_latency().unwrap_or(Duration::ZERO)
    }

    /// Decides a request's fate in `call`.
    #[inline]
    pub(crate) fn admit(
        &self,
        releaser: &Releaser,
        priority: Priority,
        deadline: Option<Deadline>,
    ) -> Result<Permit, NotNow> {
        let level = priority.index();
        if let Some(deadline) = deadline {
            // Behind a deadline layer, the instant it read the clock at: no second clock read.
            let now = crate::core::deadline::now_in_call();
            if !deadline.can_finish(now, self.expected()) {
                self.count_rejection(Reason::DeadlineExceeded);
                return Err(NotNow::Rejected(Reason::DeadlineExceeded));
            }
        }
        // Fast path: nobody waits (checked by the compare-and-swap that takes the slot), so taking a free slot
        // cannot jump the queue.
        if self.try_acquire(level, false) {
            return Ok(self.permit(releaser, level, None));
        }
        self.admit_slow(releaser, level, deadline)
    }

    #[cold]
    #[inline(never)]
    fn admit_slow(
        &self,
        releaser: &Releaser,
        level: usize,
        deadline: Option<Deadline>,
    ) -> Result<Permit, NotNow> {
        let now = Instant::now();
        let mut q = self.lock();
        self.drain(&mut q, now);
        if q.len == 0 && self.try_acquire(level, false) {
            drop(q);
            return Ok(self.permit(releaser, level, Some(now)));
        }
        if self.config.max_depth == 0 {
            drop(q);
            self.count_rejection(Reason::QueueFull);
            return Err(NotNow::Rejected(Reason::QueueFull));
        }
        let full = q.len >= self.config.max_depth || q.len >= self.config.level_cap(level);
        if full {
            // A higher-priority arrival displaces the oldest request of the lowest level queued below it.
            match q.lowest_level().filter(|&l| l < level) {
                Some(victim_level) => {
                    let victim = q.lists[victim_level].head;
                    self.leave(&mut q, victim, Slot::Rejected(Reason::QueueFull), now);
                }
                None => {
                    drop(q);
                    self.count_rejection(Reason::QueueFull);
                    return Err(NotNow::Rejected(Reason::QueueFull));
                }
            }
        }
        q.observe(now, &self.config);
        // `max_wait` may be `Duration::MAX`, for no limit.
        let until = crate::core::deadline::instant_after(now, self.wait_limit(q.managed(level)));
        let index = q.push(level, now, until, deadline);
        if q.len == 1 {
            // From here on arrivals queue behind this request. Set before the hand-over below reads `released`,
            // and a release reads it after adding to `released`: one of the two sees the other (no lost wake-up).
            self.slots.admitted.fetch_or(QUEUED, Ordering::SeqCst);
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.observer.on_event(&Event::QueueDepth {
            layer: LAYER,
            depth: q.len,
        });
        // The slot a release freed between our fast-path check and the push above is picked up here.
        self.drain(&mut q, now);
        let wake_at = wake_at(until, deadline, self.expected(), now);
        Err(NotNow::Queued { index, wake_at })
    }

    /// How long a request may wait: CoDel's target while its level's queue stands, `max_wait` otherwise.
    fn wait_limit(&self, standing: bool) -> Duration {
        if self.config.codel && standing {
            self.target().min(self.config.max_wait)
        } else {
            self.config.max_wait
        }
    }

    /// Unlinks a queued node with its answer, wakes its waiter and reports.
    fn leave(&self, q: &mut WaitQueue, index: usize, slot: Slot, now: Instant) {
        let enqueued = q.nodes[index].enqueued;
        let waker = q.unlink(index, slot, now);
        self.note_unlinked(q);
        self.observer.on_event(&Event::QueueWait {
            layer: LAYER,
            wait: now.saturating_duration_since(enqueued),
        });
        self.observer.on_event(&Event::QueueDepth {
            layer: LAYER,
            depth: q.len,
        });
        if let Slot::Rejected(reason) = slot {
            self.count_rejection(reason);
        }
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Sheds what CoDel and deadlines condemn, then hands free slots to waiters in priority order: FIFO within a
    /// level, or newest first while that level's queue stands (adaptive LIFO).
    fn drain(&self, q: &mut WaitQueue, now: Instant) {
        if q.len == 0 {
            return;
        }
        q.observe(now, &self.config);
        if self.config.codel {
            let target = self.target();
            // In a standing queue nobody may wait longer than the target; the oldest sit at the heads.
            if let Some(level) = (0..LEVELS).find(|&l| q.managed(l)) {
                while let Some(head) = Some(q.lists[level].head).filter(|&h| h != NIL) {
                    if now.saturating_duration_since(q.nodes[head].enqueued) <= target {
                        break;
                    }
                    self.leave(q, head, Slot::Rejected(Reason::QueueTimeout), now);
                }
            }
        }
        self.serve(q, now);
    }

    /// Hands free slots to waiters in priority order (FIFO within a level, newest first while it is managed),
    /// refusing on the way those whose deadline can no longer be met.
    fn serve(&self, q: &mut WaitQueue, now: Instant) {
        let expected = self.expected();
        while let Some(level) = q.top_level() {
            let list = q.lists[level];
            let lifo = self.config.lifo && q.managed(level);
            let index = if lifo { list.tail } else { list.head };
            if let Some(d) = q.nodes[index].deadline {
                if !d.can_finish(now, expected) {
                    self.leave(q, index, Slot::Rejected(Reason::DeadlineExceeded), now);
                    continue;
                }
            }
            if !self.try_acquire(level, true) {
                break;
            }
            self.leave(q, index, Slot::Granted, now);
        }
    }

    fn poll_waiter_inner(&self, index: usize, timed_out: bool, cx: &mut Context<'_>) -> Waiting {
        let now = Instant::now();
        let mut q = self.lock();
        if timed_out && q.nodes[index].slot == Slot::Queued {
            // A slot can free up without a release to hand it over: a live limit raised. Before this waiter is
            // judged out of time, free slots go to the waiters, in their order (perhaps to this one). Only the
            // hand-over: with no slot free it does nothing, and CoDel's verdicts stay those of arrivals and releases.
            self.serve(&mut q, now);
        }
        let mut rearm = None;
        match q.nodes[index].slot {
            Slot::Queued if timed_out => {
                // The timer was set for when the request would be doomed by the expected service time of then, if
                // that came before its wait runs out; judged by the expected time of now, as `drain` does, it may
                // still finish if that has fallen since.
                let node = &q.nodes[index];
                let (until, deadline) = (node.until, node.deadline);
                let expected = self.expected();
                let reason = if deadline.is_some_and(|d| !d.can_finish(now, expected)) {
                    Some(Reason::DeadlineExceeded)
                } else if now >= until {
                    Some(Reason::QueueTimeout)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    self.leave(&mut q, index, Slot::Rejected(reason), now);
                    q.release_node(index);
                    return Waiting::Answer(Err(reason));
                }
                // Still in time: later than `now`, since neither the wait nor the deadline has run out.
                rearm = Some(wake_at(until, deadline, expected, now));
            }
            Slot::Queued => {}
            Slot::Granted => {
                let level = q.nodes[index].level;
                q.release_node(index);
                drop(q);
                return Waiting::Answer(Ok(Granted {
                    tag: self.tag(level),
                    at: now,
                }));
            }
            Slot::Rejected(reason) => {
                q.release_node(index);
                return Waiting::Answer(Err(reason));
            }
        }
        let node = &mut q.nodes[index];
        match &mut node.waker {
            Some(w) => w.clone_from(cx.waker()),
            None => node.waker = Some(cx.waker().clone()),
        }
        match rearm {
            Some(at) => Waiting::Until(at),
            None => Waiting::Queued,
        }
    }

    fn cancel_waiter_inner(&self, index: usize) {
        let now = Instant::now();
        let mut q = self.lock();
        match q.nodes[index].slot {
            Slot::Queued => {
                let enqueued = q.nodes[index].enqueued;
                q.unlink(index, Slot::Rejected(Reason::QueueTimeout), now);
                self.note_unlinked(&q);
                self.cancelled.fetch_add(1, Ordering::Relaxed);
                self.observer.on_event(&Event::QueueWait {
                    layer: LAYER,
                    wait: now.saturating_duration_since(enqueued),
                });
                self.observer.on_event(&Event::QueueDepth {
                    layer: LAYER,
                    depth: q.len,
                });
            }
            Slot::Granted => {
                // Handed a slot it will never use: pass it on.
                self.cancelled.fetch_add(1, Ordering::Relaxed);
                let level = q.nodes[index].level;
                self.return_unused_slot(level);
                self.drain(&mut q, now);
            }
            Slot::Rejected(_) => {}
        }
        q.release_node(index);
    }

    /// After a node left the queue: clears [`QUEUED`] when it was the last, so arrivals take the fast path again.
    fn note_unlinked(&self, q: &WaitQueue) {
        if q.len == 0 {
            self.slots.admitted.fetch_and(!QUEUED, Ordering::SeqCst);
        }
    }

    fn release_critical(&self, level: usize) {
        if self.reserving() && Priority::from_index(level).is_critical() {
            self.critical_in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Gives back a slot handed to a waiter that went away before using it: it was never admitted.
    fn return_unused_slot(&self, level: usize) {
        self.release_critical(level);
        self.slots.admitted.fetch_sub(ONE, Ordering::SeqCst);
    }

    pub(crate) fn snapshot(&self) -> QueueSnapshot {
        let (depth, depth_by_priority) = {
            let q = self.lock();
            let mut by = [0; LEVELS];
            for (i, p) in Priority::ALL.iter().enumerate() {
                by[i] = q.lists[p.index()].len;
            }
            (q.len, by)
        };
        let r = |i: usize| self.rejected[i].load(Ordering::Relaxed);
        let (admitted, released) = self.slot_counts();
        QueueSnapshot {
            in_flight: (admitted.wrapping_sub(released) / ONE) as usize,
            limit: self.limit.limit(),
            depth,
            depth_by_priority,
            admitted: admitted / ONE,
            queued: self.queued.load(Ordering::Relaxed),
            completed: released / ONE,
            cancelled: self.cancelled.load(Ordering::Relaxed),
            rejected_queue_full: r(0),
            rejected_queue_timeout: r(1),
            rejected_deadline: r(2),
        }
    }
}

impl<L: LimitSource, O: Observer> Release for Shared<L, O> {
    fn release(&self, outcome: Outcome, latency: Duration, tag: u64) {
        let level = (tag & 0xff) as usize;
        self.release_critical(level);
        self.slots.released.fetch_add(ONE, Ordering::SeqCst);
        observer::completed(&self.observer, LAYER, outcome, latency, || self.in_flight());
        // Read after adding to `released`; an arrival that queues sets the flag before it reads `released`.
        if self.slots.admitted.load(Ordering::SeqCst) & QUEUED != 0 {
            let now = Instant::now();
            let mut q = self.lock();
            self.drain(&mut q, now);
        }
    }
}

/// When a queued request must be looked at again: when its wait runs out (`until`) or, by the expected service
/// time `expected`, when its deadline can no longer be met (at once, if already so at `now`).
fn wake_at(
    until: Instant,
    deadline: Option<Deadline>,
    expected: Duration,
    now: Instant,
) -> Instant {
    match deadline {
        Some(d) => until.min(d.instant().checked_sub(expected).unwrap_or(now).max(now)),
        None => until,
    }
}

/// What a waiter's poll finds.
pub(crate) enum Waiting {
    /// Admitted (a slot was handed to it), or refused.
    Answer(Result<Granted, Reason>),
    /// Still queued; its timer stands.
    Queued,
    /// Still queued, though its timer fired: set the timer to this instant, later than now, and poll it again.
    Until(Instant),
}

/// A waiter's admission: the permit's tag and the admission instant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Granted {
    pub(crate) tag: u64,
    pub(crate) at: Instant,
}

/// What a waiting response future needs from the shared state, without its type parameters.
pub(crate) trait WaitSlot: Send + Sync + 'static {
    /// A waiter asks for its answer. `timed_out`: its wait (or deadline) timer has fired.
    fn poll_waiter(&self, index: usize, timed_out: bool, cx: &mut Context<'_>) -> Waiting;

    /// A waiter's future was dropped before it collected its answer.
    fn cancel_waiter(&self, index: usize);

    /// A waiter collected its admission and holds `permit` for it: tells the observer.
    fn admitted(&self, permit: &Permit);
}

impl<L: LimitSource, O: Observer> WaitSlot for Shared<L, O> {
    fn poll_waiter(&self, index: usize, timed_out: bool, cx: &mut Context<'_>) -> Waiting {
        self.poll_waiter_inner(index, timed_out, cx)
    }

    fn cancel_waiter(&self, index: usize) {
        self.cancel_waiter_inner(index)
    }

    fn admitted(&self, permit: &Permit) {
        self.note_admitted(permit);
    }
}
