//! Per-thread stripes for counters that every request adds to, and for the adaptive limiter's parked admission
//! tokens.
//!
//! A counter shared by all threads makes every request an exclusive-ownership transfer of its cache line
//! between cores. Counters that are only *summed* now and then (a window's timed samples, drops, latency sum,
//! minimum) need no single home: each thread adds into its own cache-line-sized stripe, and the rare reader sums
//! the stripes. With one thread (the simulator's current-thread runtime) there is one stripe in use and the sums are
//! exactly what a single counter would hold.

use std::cell::Cell as ThreadCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// How many stripes a striped counter set has. Threads beyond this share stripes (round robin).
pub(crate) const STRIPES: usize = 8;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// [`SEQ`] before the thread has touched a striped figure.
const UNNUMBERED: usize = usize::MAX;

thread_local! {
    // This thread's number: threads are numbered in the order they first touch a striped figure, from 0. A plain
    // `Cell` with a constant initialiser and a sentinel, numbered on first use by `seq`, rather than a lazily
    // initialised value: no state flag to test on every access (a lazy thread-local tests it before each read), no
    // destructor, so it stays readable while the thread is torn down (a permit dropped from a TLS destructor).
    static SEQ: ThreadCell<usize> = const { ThreadCell::new(UNNUMBERED) };
}

/// This thread's number (see [`SEQ`]).
#[inline]
fn seq() -> usize {
    // Never fails for a constant-initialised `Cell` without destructor; if it did, the thread would be numbered
    // again next time, and a number is only ever used to pick a cell or a stripe.
    let n = SEQ.try_with(ThreadCell::get).unwrap_or(UNNUMBERED);
    if n != UNNUMBERED {
        return n;
    }
    // The first touch: numbered inline (an atomic addition and a store), since a call here made every caller
    // save registers around it on the common path too.
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let _ = SEQ.try_with(|seq| seq.set(n));
    n
}

/// This thread's stripe index in `0..STRIPES`, fixed for the thread's life.
#[inline]
pub(crate) fn index() -> usize {
    seq() % STRIPES
}

/// How many threads own a [`Counter`] cell: the first ones numbered.
const OWNED: usize = STRIPES;

/// A [`Counter`]'s cells: one for each owner, then [`STRIPES`] that all other threads share round robin.
const CELLS: usize = OWNED + STRIPES;

/// This thread's [`Counter`] cell, and whether the thread owns it. The first [`OWNED`] threads each own one for
/// life: nobody else ever writes it. Later threads (short-lived ones, such as a blocking pool's, come and go) write
/// the shared cells, round robin, as every thread wrote [`Striped`]'s.
#[inline]
fn counter_cell() -> (usize, bool) {
    // An owner is told by one comparison: the sentinel of a thread not numbered yet is above every owner's number,
    // so it is looked for only on the way to the shared cells.
    match SEQ.try_with(ThreadCell::get) {
        Ok(n) if n < OWNED => (n, true),
        _ => match seq() {
            n if n < OWNED => (n, true),
            n => (OWNED + n % STRIPES, false),
        },
    }
}

/// One thread's share of a window's figures, and of a limiter's admission tokens, alone on its cache lines.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Stripe {
    pub(crate) timed: AtomicU64,
    pub(crate) ignored: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) latency_sum: AtomicU64,
    pub(crate) latency_min: AtomicU64,
    /// Requests finished on this thread, ever (wraps): the window's completions are the growth of the sum.
    pub(crate) completed: AtomicU64,
    /// Admission tokens this thread holds for its next requests: taken from the shared count, not in use.
    pub(crate) parked: AtomicUsize,
    /// Requests admitted on this thread while timing is thinned out: their admission numbers.
    pub(crate) admits: AtomicU64,
}

/// One window's figures, summed over the stripes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Successes and failures that carry a latency: `latency_sum` and `latency_min` are over these.
    pub(crate) timed: u64,
    /// Requests finished as ignored (they count nowhere else in the window).
    pub(crate) ignored: u64,
    pub(crate) dropped: u64,
    pub(crate) latency_sum: u64,
    /// `u64::MAX` when there were no samples.
    pub(crate) latency_min: u64,
}

impl Totals {
    /// No figures yet: the starting point of a sum.
    const ZERO: Totals = Totals {
        timed: 0,
        ignored: 0,
        dropped: 0,
        latency_sum: 0,
        latency_min: u64::MAX,
    };
}

impl Stripe {
    const fn new() -> Self {
        Stripe {
            timed: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            latency_sum: AtomicU64::new(0),
            latency_min: AtomicU64::new(u64::MAX),
            completed: AtomicU64::new(0),
            parked: AtomicUsize::new(0),
            admits: AtomicU64::new(0),
        }
    }

    /// Adds a latency sample (a success or a failure) to this stripe.
    #[inline]
    pub(crate) fn sample(&self, latency: u64) {
        self.latency_sum.fetch_add(latency, Ordering::Relaxed);
        if latency < self.latency_min.load(Ordering::Relaxed) {
            self.latency_min.fetch_min(latency, Ordering::Relaxed);
        }
        self.timed.fetch_add(1, Ordering::Relaxed);
    }
}

/// A window's sample counters, striped per thread.
#[derive(Debug)]
pub(crate) struct Striped {
    stripes: [Stripe; STRIPES],
}

impl Default for Striped {
    fn default() -> Self {
        Striped {
            stripes: [const { Stripe::new() }; STRIPES],
        }
    }
}

impl Striped {
    /// This thread's stripe.
    #[inline]
    pub(crate) fn mine(&self) -> &Stripe {
        &self.stripes[index()]
    }

    /// Every stripe.
    pub(crate) fn all(&self) -> &[Stripe; STRIPES] {
        &self.stripes
    }

    /// Requests finished so far on every thread (wraps; see [`Stripe::completed`]).
    pub(crate) fn completed(&self) -> u64 {
        self.stripes.iter().fold(0u64, |sum, s| {
            sum.wrapping_add(s.completed.load(Ordering::Acquire))
        })
    }

    /// Admission tokens parked on every thread.
    pub(crate) fn parked(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.parked.load(Ordering::Acquire))
            .sum()
    }

    /// The figures recorded since the last [`Striped::take`], without resetting (the minimum is not read).
    pub(crate) fn peek(&self) -> Totals {
        self.stripes.iter().fold(Totals::ZERO, |t, s| Totals {
            timed: t.timed + s.timed.load(Ordering::Relaxed),
            ignored: t.ignored + s.ignored.load(Ordering::Relaxed),
            dropped: t.dropped + s.dropped.load(Ordering::Relaxed),
            ..t
        })
    }

    /// Sums and resets every stripe.
    pub(crate) fn take(&self) -> Totals {
        let mut totals = Totals::ZERO;
        for s in &self.stripes {
            totals.timed += s.timed.swap(0, Ordering::Relaxed);
            totals.ignored += s.ignored.swap(0, Ordering::Relaxed);
            totals.dropped += s.dropped.swap(0, Ordering::Relaxed);
            totals.latency_sum = totals
                .latency_sum
                .saturating_add(s.latency_sum.swap(0, Ordering::Relaxed));
            totals.latency_min = totals
                .latency_min
                .min(s.latency_min.swap(u64::MAX, Ordering::Relaxed));
        }
        totals
    }
}

/// One stripe of a [`Counter`], alone on its cache lines.
#[derive(Debug)]
#[repr(align(128))]
struct Cell(AtomicU64);

/// A counter that threads add to and subtract from without sharing a cache line; reading it sums the stripes.
///
/// For statistics (in flight, admitted) that no admission decision depends on. Each stripe wraps on its own (a
/// request may be added on one thread and subtracted on another), and the wrapping sum is exact: it is the
/// true count whenever that count fits in a `u64`. A sum taken while other threads update may mix instants.
/// Unlike [`Striped`], whose stripes threads share round robin, the first threads each own a cell and update it
/// without atomic read-modify-writes; later threads share the other cells (see [`Counter::add`]).
#[derive(Debug)]
pub(crate) struct Counter {
    cells: [Cell; CELLS],
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            cells: [const { Cell(AtomicU64::new(0)) }; CELLS],
        }
    }
}

/// Requests admitted and requests finished, each a striped [`Counter`]: in flight is their difference. One add on
/// each side of a request, for layers whose decisions do not depend on these figures.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    admitted: Counter,
    finished: Counter,
}

impl Tally {
    /// Counts an admitted request.
    #[inline]
    pub(crate) fn admit(&self) {
        self.admitted.add(1);
    }

    /// Counts a finished request.
    #[inline]
    pub(crate) fn finish(&self) {
        self.finished.add(1);
    }

    /// Requests admitted so far.
    pub(crate) fn admitted(&self) -> u64 {
        self.admitted.sum()
    }

    /// Requests admitted and not yet finished. Finished is read first: a request counted there was admitted
    /// before, so it is in the admitted sum read after (a sum taken while other threads update may still mix
    /// instants on weakly ordered CPUs; it then reads low, never below zero).
    pub(crate) fn in_flight(&self) -> usize {
        let finished = self.finished.sum();
        self.admitted.sum().saturating_sub(finished) as usize
    }
}

impl Counter {
    /// Adds `n` (wrapping) to this thread's cell.
    ///
    /// A cell the thread owns is written with a plain load and store: no other thread writes it, so no update
    /// can be lost, and a read-modify-write would cost a locked instruction (which also waits for every store
    /// before it to drain) on each of the two counts a request makes. A shared cell takes an atomic addition.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        let (i, owned) = counter_cell();
        let cell = &self.cells[i].0;
        if owned {
            cell.store(
                cell.load(Ordering::Relaxed).wrapping_add(n),
                Ordering::Relaxed,
            );
        } else {
            cell.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Subtracts `n` (wrapping) from this thread's cell: adds its two's complement.
    #[inline]
    pub(crate) fn sub(&self, n: u64) {
        self.add(n.wrapping_neg());
    }

    /// The count: the wrapping sum of the stripes. Read while a request's subtraction is visible but not yet its
    /// addition on another stripe (possible on weakly ordered CPUs), the sum would dip below zero: it reads 0.
    pub(crate) fn sum(&self) -> u64 {
        let sum = self
            .cells
            .iter()
            .fold(0u64, |sum, c| sum.wrapping_add(c.0.load(Ordering::Relaxed)));
        u64::try_from(sum as i64).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_across_threads_and_resets() {
        let striped = std::sync::Arc::new(Striped::default());
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let striped = striped.clone();
                std::thread::spawn(move || {
                    for i in 0..1000u64 {
                        let mine = striped.mine();
                        mine.sample(10 + t + i % 3);
                        if i % 10 == 0 {
                            mine.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        if i % 4 == 0 {
                            mine.ignored.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let peek = striped.peek();
        assert_eq!((peek.timed, peek.ignored, peek.dropped), (4000, 1000, 400));
        let totals = striped.take();
        assert_eq!(totals.ignored, 1000);
        assert_eq!(totals.timed, 4000);
        assert_eq!(totals.dropped, 400);
        let expected_sum: u64 = (0..4u64)
            .map(|t| (0..1000u64).map(|i| 10 + t + i % 3).sum::<u64>())
            .sum();
        assert_eq!(totals.latency_sum, expected_sum);
        assert_eq!(totals.latency_min, 10);
        assert_eq!(striped.peek().timed, 0);
        assert_eq!(striped.take().latency_min, u64::MAX);
    }

    #[test]
    fn a_counter_loses_no_update_with_more_threads_than_cells() {
        // Three times as many threads as cells, all counting at once: the owners of cells write them without
        // atomic read-modify-writes, and an update lost because two threads wrote one cell that way would show.
        const THREADS: usize = 3 * STRIPES;
        const EACH: u64 = 200_000;
        let counter = std::sync::Arc::new(Counter::default());
        let start = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (counter, start) = (counter.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for i in 0..EACH {
                        counter.add(2);
                        if (i + t as u64) % 2 == 0 {
                            counter.sub(1);
                        }
                    }
                    counter_cell()
                })
            })
            .collect();
        let cells: Vec<_> = threads.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(counter.sum(), THREADS as u64 * EACH * 3 / 2);
        // No two threads own one cell, and the others write only the shared cells.
        let mut owned: Vec<usize> = cells.iter().filter(|c| c.1).map(|c| c.0).collect();
        owned.sort_unstable();
        let count = owned.len();
        owned.dedup();
        assert_eq!(owned.len(), count);
        assert!(cells
            .iter()
            .all(|&(i, own)| i < CELLS && (i < OWNED) == own));
        assert!(
            cells.iter().any(|c| !c.1),
            "more threads than owned cells share some"
        );
    }

    #[test]
    fn a_counter_added_on_one_thread_and_subtracted_on_another_sums_exactly() {
        let counter = std::sync::Arc::new(Counter::default());
        let adds: Vec<_> = (0..3)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| counter.add(1)))
            })
            .collect();
        adds.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(counter.sum(), 3000);
        // Subtracted elsewhere: a stripe goes below zero (wraps), the sum stays right.
        let subs: Vec<_> = (0..2)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || (0..1200).for_each(|_| counter.sub(1)))
            })
            .collect();
        subs.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(counter.sum(), 600);
    }
}
