//! The windows over which failure and slow-call rates are measured. Both have a memory bound fixed at build time
//! and lock-free updates: O(1) for the count window; for the time window O(1) while no failure or slow call is in
//! the window, O(buckets) otherwise (see `TimeWindow`).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::state::Padded;

/// Counts read from a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

/// Which window a breaker measures over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WindowKind {
    Count(usize),
    Time { buckets: usize, width: Duration },
}

// One per breaker, inside its `Arc`: the padding is the point, and boxing it would add a pointer chase per call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    pub(crate) fn new(kind: WindowKind, base: Instant) -> Self {
        match kind {
            WindowKind::Count(size) => Window::Count(CountWindow::new(size)),
            WindowKind::Time { buckets, width } => {
                Window::Time(TimeWindow::new(buckets, width, base))
            }
        }
    }

    /// Records one counted call and returns the window's counts right after it, for the caller to judge the rate
    /// rules on. `None` when they cannot be judged now: a concurrent update left them momentarily inconsistent
    /// (see [`CountWindow::record`]); or, for the time window, the caller does not `judge` them, or the window
    /// holds no failure and no slow call, so no rate rule can be reached (see [`TimeWindow::record`]).
    pub(crate) fn record(&self, failure: bool, slow: bool, judge: bool) -> Option<Counts> {
        match self {
            Window::Count(w) => w.record(failure, slow),
            Window::Time(w) => w.record(failure, slow, judge, Instant::now()),
        }
    }

    pub(crate) fn counts(&self) -> Counts {
        match self {
            Window::Count(w) => w.counts().unwrap_or_default(),
            Window::Time(w) => w.counts(Instant::now()),
        }
    }

    pub(crate) fn clear(&self) {
        match self {
            Window::Count(w) => w.clear(),
            Window::Time(w) => w.clear(),
        }
    }
}

// A ring slot holds the last outcome written to it.
const SLOT_EMPTY: u8 = 0;
const SLOT_CALL: u8 = 1;
const SLOT_FAILURE: u8 = 2;
const SLOT_SLOW: u8 = 4;

// The three counts of the ring live in one word, 21 bits each, so one `fetch_add` updates them together and one
// load reads a consistent triple.
const FIELD_BITS: u32 = 21;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;
const FAILURE_UNIT: u64 = 1 << FIELD_BITS;
const SLOW_UNIT: u64 = 1 << (2 * FIELD_BITS);

/// The largest count window: every count must fit its 21-bit field with room to spare.
pub(crate) const MAX_COUNT_WINDOW: usize = 1 << 20;

fn slot_weight(slot: u8) -> u64 {
    let mut w = 0;
    if slot & SLOT_CALL != 0 {
        w += 1;
    }
    if slot & SLOT_FAILURE != 0 {
        w += FAILURE_UNIT;
    }
    if slot & SLOT_SLOW != 0 {
        w += SLOW_UNIT;
    }
    w
}

/// A true sliding window over the last `N` calls: a ring of `N` one-byte slots, and the counts kept incrementally
/// (each write swaps a slot and adds the difference between the new and the old outcome).
#[derive(Debug)]
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    cursor: Padded<Cursor>,
    packed: Padded<AtomicU64>,
}

/// The ring's write position, and how many writers are between taking a slot and adding their difference to
/// the counts: on one cache line, which every writer takes for writing anyway.
#[derive(Debug, Default)]
struct Cursor {
    next: AtomicU64,
    writing: AtomicU64,
}

/// Marks a writer as in progress until dropped.
struct Writing<'a>(&'a AtomicU64);

impl<'a> Writing<'a> {
    fn start(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Writing(count)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CountWindow {
    fn new(size: usize) -> Self {
        CountWindow {
            slots: (0..size).map(|_| AtomicU8::new(SLOT_EMPTY)).collect(),
            cursor: Padded(Cursor::default()),
            packed: Padded(AtomicU64::new(0)),
        }
    }

    /// Two writers exactly `N` calls apart can hit the same slot at once; if the later one's difference lands
    /// first, a field is briefly below zero (the borrow shows as a field larger than the window). The counts are
    /// right again as soon as both differences have landed, so such a reading is reported as `None` and the
    /// caller skips that one evaluation rather than act on it.
    #[inline]
    fn record(&self, failure: bool, slow: bool) -> Option<Counts> {
        let mut slot = SLOT_CALL;
        if failure {
            slot |= SLOT_FAILURE;
        }
        if slow {
            slot |= SLOT_SLOW;
        }
        if slot == SLOT_CALL {
            // A window full of plain successes is left exactly as it is by one more: write nothing, not even the
            // cursor. Which slot the next outcome lands in does not matter while all slots are alike, so the
            // window still holds the last N outcomes, and a failure still leaves it N calls after it came. In a
            // healthy steady state this makes recording a read of two lines nobody writes.
            //
            // The counts alone can read "all successes" while a failure is being written (its slot taken, its
            // difference not yet added, and an older failure evicted meanwhile), so no writer may be in progress.
            // A writer that starts after the first read comes after this success; one that completes between
            // the two reads is the same race two writers `N` calls apart already have: one outcome lands on
            // the other's turn, for one call.
            let packed = self.packed.load(Ordering::SeqCst);
            if packed == self.slots.len() as u64 && self.cursor.writing.load(Ordering::SeqCst) == 0
            {
                return self.decode(packed);
            }
        }
        self.write(slot)
    }

    /// [`CountWindow::record`] when the outcome has to go into the ring.
    #[inline(never)]
    fn write(&self, slot: u8) -> Option<Counts> {
        let _writing = Writing::start(&self.cursor.writing);
        let index = self.cursor.next.fetch_add(1, Ordering::Relaxed) % self.slots.len() as u64;
        let cell = &self.slots[index as usize];
        // A steady stream of one outcome finds its own value in the slot: leave it, and write nothing. (A writer N
        // calls away racing us for this slot is the case `record` already describes: whichever lands last wins.)
        if cell.load(Ordering::Acquire) == slot {
            return self.decode(self.packed.load(Ordering::Acquire));
        }
        let old = cell.swap(slot, Ordering::AcqRel);
        let delta = slot_weight(slot).wrapping_sub(slot_weight(old));
        if delta == 0 {
            return self.decode(self.packed.load(Ordering::Acquire));
        }
        let before = self.packed.fetch_add(delta, Ordering::AcqRel);
        self.decode(before.wrapping_add(delta))
    }

    fn counts(&self) -> Option<Counts> {
        self.decode(self.packed.load(Ordering::Acquire))
    }

    fn decode(&self, packed: u64) -> Option<Counts> {
        let counts = Counts {
            calls: packed & FIELD_MASK,
            failures: (packed >> FIELD_BITS) & FIELD_MASK,
            slow: (packed >> (2 * FIELD_BITS)) & FIELD_MASK,
        };
        let consistent = packed >> (3 * FIELD_BITS) == 0
            && counts.calls <= self.slots.len() as u64
            && counts.failures <= counts.calls
            && counts.slow <= counts.calls;
        consistent.then_some(counts)
    }

    fn clear(&self) {
        // Swapping each slot out (rather than zeroing the counts) keeps counts and slots in step with writers
        // that race the clear.
        for slot in self.slots.iter() {
            let old = slot.swap(SLOT_EMPTY, Ordering::AcqRel);
            let w = slot_weight(old);
            if w != 0 {
                self.packed.fetch_sub(w, Ordering::AcqRel);
            }
        }
    }
}

/// A window over the last `buckets × width` of time: a fixed ring of buckets, each counting one `width`-long
/// epoch. Every count carries its epoch in its own word (epoch in the high bits, count in the low bits), so a
/// writer that finds an old epoch restarts the count with one compare-and-swap, and a reader ignores counts
/// from epochs that have left the window. No bucket is ever cleaned up in the background.
///
/// The counts after a call decide a trip, and reading them means reading every bucket back: O(buckets), at most
/// 1000. But a rate rule is only reached with failures or slow calls in the window (thresholds are above 0 %),
/// so the window also keeps the epoch of its latest failure or slow call, and a call recorded while that epoch
/// has left the window reads nothing back. A healthy dependency's calls therefore cost O(1); a failing one's
/// O(buckets), until the breaker opens and stops recording.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    buckets: Box<[Bucket]>,
    width_nanos: u128,
    base: Instant,
    // Bits of a word that hold the count: 24 (16.7 million calls a bucket) for buckets up to a second wide, one
    // more for each doubling beyond, so that no bucket saturates below 16.7 million calls a second. The rest
    // hold the epoch, which wraps only after 2^40 widths for a bucket up to a second wide (34 years at the
    // narrowest, 1 ms), and after no less than 2^39 seconds for a wider one.
    count_bits: u32,
    // One more than the unwrapped epoch of the latest failure or slow call recorded; 0 for none yet. Raised with
    // `fetch_max`, so that a writer held up since an older epoch cannot lower it.
    last_bad: AtomicU64,
}

#[derive(Debug, Default)]
struct Bucket {
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

impl TimeWindow {
    fn new(buckets: usize, width: Duration, base: Instant) -> Self {
        let seconds = width.as_secs_f64().max(1.0);
        TimeWindow {
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
            width_nanos: width.as_nanos().max(1),
            base,
            count_bits: (24 + seconds.log2().ceil() as u32).min(56),
            last_bad: AtomicU64::new(0),
        }
    }

    fn count_mask(&self) -> u64 {
        (1 << self.count_bits) - 1
    }

    fn epoch_mask(&self) -> u64 {
        u64::MAX >> self.count_bits
    }

    /// The number of whole widths from the window's base to `now`, unwrapped (it fits 64 bits for 584 years at
    /// the narrowest width).
    fn unwrapped_epoch(&self, now: Instant) -> u64 {
        let epoch = now.saturating_duration_since(self.base).as_nanos() / self.width_nanos;
        u64::try_from(epoch).unwrap_or(u64::MAX)
    }

    fn epoch(&self, now: Instant) -> u64 {
        // Epochs wrap (see `count_bits`); comparisons below use wrapping differences.
        self.unwrapped_epoch(now) & self.epoch_mask()
    }

    /// How many epochs `later` comes after `earlier`, modulo the epoch's range.
    fn age(&self, later: u64, earlier: u64) -> u64 {
        later.wrapping_sub(earlier) & self.epoch_mask()
    }

    /// Records one call at `now`; then, if the caller will `judge` the rate rules and the window holds a failure
    /// or a slow call (this one, or the latest one's epoch has not left the window), the counts right after it.
    fn record(&self, failure: bool, slow: bool, judge: bool, now: Instant) -> Option<Counts> {
        let unwrapped = self.unwrapped_epoch(now);
        let epoch = unwrapped & self.epoch_mask();
        let bucket = &self.buckets[(epoch % self.buckets.len() as u64) as usize];
        self.bump(&bucket.calls, epoch);
        if failure {
            self.bump(&bucket.failures, epoch);
        }
        if slow {
            self.bump(&bucket.slow, epoch);
        }
        if failure || slow {
            self.last_bad
                .fetch_max(unwrapped.saturating_add(1), Ordering::AcqRel);
        } else if judge {
            let last = self.last_bad.load(Ordering::Acquire);
            // A later epoch than ours (another writer's clock ran ahead) counts as inside the window.
            if last == 0 || unwrapped.saturating_sub(last - 1) >= self.buckets.len() as u64 {
                return None;
            }
        }
        judge.then(|| self.sum(epoch))
    }

    fn counts(&self, now: Instant) -> Counts {
        self.sum(self.epoch(now))
    }

    fn sum(&self, epoch: u64) -> Counts {
        let live = |word: &AtomicU64| {
            let w = word.load(Ordering::Acquire);
            if self.age(epoch, w >> self.count_bits) < self.buckets.len() as u64 {
                w & self.count_mask()
            } else {
                0
            }
        };
        let mut counts = Counts::default();
        for b in self.buckets.iter() {
            counts.calls += live(&b.calls);
            counts.failures += live(&b.failures);
            counts.slow += live(&b.slow);
        }
        counts
    }

    fn bump(&self, word: &AtomicU64, epoch: u64) {
        let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            let word_epoch = w >> self.count_bits;
            if word_epoch == epoch {
                // A bucket saturates rather than carry into its epoch tag.
                ((w & self.count_mask()) < self.count_mask()).then_some(w + 1)
            } else if self.age(word_epoch, epoch) <= self.epoch_mask() / 2 {
                // A writer delayed by a window turn or more (a bucket only ever holds epochs a whole number of
                // turns apart): the bucket already counts a later epoch, and ours has left the window.
                None
            } else {
                // An older epoch (an idle bucket's tag may be any distance behind, up to half the epoch range:
                // 2^39 widths, 17 years at the narrowest bucket, before it would be taken for a later one).
                Some((epoch << self.count_bits) | 1)
            }
        });
    }

    fn clear(&self) {
        // Epoch tags are kept so that a clear cannot resurrect an old bucket; only the counts go.
        let tags = !self.count_mask();
        for b in self.buckets.iter() {
            for word in [&b.calls, &b.failures, &b.slow] {
                let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| Some(w & tags));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_only_the_last_n() {
        let w = CountWindow::new(3);
        w.record(true, false);
        w.record(true, true);
        w.record(false, false);
        assert_eq!(
            w.counts(),
            Some(Counts {
                calls: 3,
                failures: 2,
                slow: 1
            })
        );
        w.record(false, false);
        w.record(false, false);
        assert_eq!(
            w.counts(),
            Some(Counts {
                calls: 3,
                failures: 0,
                slow: 0
            })
        );
        w.clear();
        assert_eq!(w.counts(), Some(Counts::default()));
    }

    #[test]
    fn a_full_window_of_successes_writes_nothing_and_still_slides() {
        let n = 4;
        let w = CountWindow::new(n);
        for _ in 0..n {
            w.record(false, false);
        }
        let cursor = w.cursor.next.load(Ordering::Relaxed);
        for _ in 0..10 {
            w.record(false, false);
        }
        assert_eq!(
            w.cursor.next.load(Ordering::Relaxed),
            cursor,
            "a success into a full healthy window moves nothing"
        );
        // A failure is kept for exactly the n - 1 calls after it, and gone at the n-th.
        w.record(true, false);
        for i in 1..n {
            w.record(false, false);
            assert_eq!(
                w.counts().map(|c| c.failures),
                Some(1),
                "after {i} successes"
            );
        }
        w.record(false, false);
        assert_eq!(
            w.counts(),
            Some(Counts {
                calls: n as u64,
                failures: 0,
                slow: 0
            })
        );
        // A window not yet full keeps counting successes.
        let w = CountWindow::new(n);
        w.record(false, false);
        w.record(false, false);
        assert_eq!(w.counts().map(|c| c.calls), Some(2));
    }

    #[test]
    fn successes_are_counted_while_a_failure_is_being_written() {
        // A failure has taken its slot but not yet added its difference (the state a preempted writer leaves),
        // and a success has meanwhile evicted an older failure, so the counts read "all successes".
        let w = CountWindow::new(2);
        w.record(false, false);
        w.record(true, false);
        let stalled = Writing::start(&w.cursor.writing);
        let index = w.cursor.next.fetch_add(1, Ordering::Relaxed) % 2;
        let old = w.slots[index as usize].swap(SLOT_CALL | SLOT_FAILURE, Ordering::AcqRel);
        assert_eq!(old, SLOT_CALL);
        w.record(false, false);
        assert_eq!(w.counts().map(|c| (c.calls, c.failures)), Some((2, 0)));
        // Successes keep moving the ring while the writer is stalled, so they push its failure out in turn...
        for _ in 0..1_000 {
            w.record(false, false);
        }
        // ...and once its difference lands, the window holds the last two outcomes: successes.
        let delta = slot_weight(SLOT_CALL | SLOT_FAILURE).wrapping_sub(slot_weight(old));
        w.packed.fetch_add(delta, Ordering::AcqRel);
        drop(stalled);
        assert_eq!(w.counts().map(|c| (c.calls, c.failures)), Some((2, 0)));
        assert!(w
            .slots
            .iter()
            .all(|s| s.load(Ordering::Relaxed) == SLOT_CALL));
    }

    #[test]
    fn a_borrowed_field_reads_as_inconsistent() {
        let w = CountWindow::new(4);
        assert_eq!(w.decode(0u64.wrapping_sub(FAILURE_UNIT)), None);
        assert_eq!(w.decode(5), None);
    }

    /// A writer that read the clock a whole window turn ago (held up between its clock read and its write) must
    /// not wipe the bucket the current turn counts in; a writer a long idle spell later starts it afresh.
    #[test]
    fn a_writer_a_window_turn_late_leaves_the_live_bucket_alone() {
        let base = Instant::now();
        let w = TimeWindow::new(3, Duration::from_secs(1), base);
        let now = base + Duration::from_secs(3);
        for _ in 0..5 {
            w.record(true, false, true, now);
        }
        // Epoch 0: the same bucket as epoch 3, one turn behind.
        w.record(false, false, true, base);
        let c = w.counts(now);
        assert_eq!((c.calls, c.failures), (5, 5));
        let much_later = now + Duration::from_secs(1 << 33);
        w.record(false, false, false, much_later);
        let c = w.counts(much_later);
        assert_eq!((c.calls, c.failures), (1, 0));
    }

    #[test]
    fn buckets_expire_by_epoch() {
        let base = Instant::now();
        let w = TimeWindow::new(3, Duration::from_secs(1), base);
        w.record(true, false, true, base);
        w.record(false, true, true, base + Duration::from_millis(1500));
        assert_eq!(w.counts(base + Duration::from_millis(2999)).calls, 2);
        let c = w.counts(base + Duration::from_secs(3));
        assert_eq!((c.calls, c.failures, c.slow), (1, 0, 1));
        assert_eq!(w.counts(base + Duration::from_secs(4)).calls, 0);
        // A write to a recycled bucket starts from zero.
        w.record(false, false, true, base + Duration::from_secs(3));
        assert_eq!(w.counts(base + Duration::from_secs(3)).failures, 0);
    }

    /// While no failure and no slow call is in the window, a success reads nothing back (no rate rule can be
    /// reached); with one in the window, every call reads the counts, until it leaves the window.
    #[test]
    fn only_a_window_with_a_failure_or_a_slow_call_is_read_back() {
        let base = Instant::now();
        let s = Duration::from_secs(1);
        let w = TimeWindow::new(3, s, base);
        for _ in 0..4 {
            assert_eq!(w.record(false, false, true, base), None);
        }
        let c = w
            .record(true, false, true, base + s)
            .expect("a failure reads the counts");
        assert_eq!((c.calls, c.failures), (5, 1));
        let c = w
            .record(false, false, true, base + 3 * s)
            .expect("the failure is still in the window");
        assert_eq!((c.calls, c.failures, c.slow), (2, 1, 0));
        assert_eq!(
            w.record(false, false, false, base + 3 * s),
            None,
            "not judged: nothing read"
        );
        let c = w
            .record(false, true, true, base + 4 * s)
            .expect("a slow call reads the counts");
        assert_eq!((c.calls, c.failures, c.slow), (3, 0, 1));
        assert!(w.record(false, false, true, base + 6 * s).is_some());
        // The slow call's epoch (4) has left the window of epochs 5 to 7.
        assert_eq!(w.record(false, false, true, base + 7 * s), None);
        assert_eq!(
            w.counts(base + 7 * s).calls,
            2,
            "the calls are still counted"
        );
        // A writer held up since an older epoch does not lower the latest one.
        w.record(true, false, true, base + 8 * s);
        w.record(false, true, true, base + 6 * s);
        assert!(w.record(false, false, true, base + 10 * s).is_some());
        assert_eq!(w.record(false, false, true, base + 11 * s), None);
    }
}
