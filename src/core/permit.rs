use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use super::{Deadline, Outcome};

/// The owner of admitted requests: a layer's shared state.
///
/// It is told exactly once per [`Permit`] that a request has finished, with the outcome, the latency from
/// admission to the end of the response (to the microsecond; zero for an untimed permit), and the tag the layer
/// gave the permit. Permits reach it through a [`Releaser`].
pub trait Release: Send + Sync + 'static {
    /// Called once per permit, when the request it admitted is finished.
    fn release(&self, outcome: Outcome, latency: Duration, tag: u64);
}

/// The handle a [`Permit`] keeps its owner alive and reachable through: built once per layer, cloned per request.
///
/// It is a thin pointer (one word) to the owner's `Arc<dyn Release>`, so that a permit, and every response future
/// that holds one, stays two words smaller than a fat `Arc<dyn Release>` plus separate fields would make it.
/// Building one allocates once; cloning it is one reference-count increment and never allocates.
#[derive(Clone)]
pub struct Releaser(Arc<Apart>);

/// The owner, a cache line away from the reference count in front of it: every permit writes the count twice,
/// from whichever threads admit and finish requests, while the owner is only read, so kept apart it stays in
/// every core's cache instead of travelling with the count.
#[repr(align(128))]
struct Apart(Arc<dyn Release>);

impl Releaser {
    /// A handle on `owner`. Build it once (when the layer is built) and clone it for each permit: this call
    /// allocates.
    pub fn new(owner: Arc<dyn Release>) -> Self {
        Releaser(Arc::new(Apart(owner)))
    }
}

/// A layer's shared state and the [`Releaser`] its permits release into, as the layer holds them (derefs to
/// the state). Each service the layer makes gets an [`Instance`] of it.
pub(crate) struct Owner<T> {
    state: Arc<T>,
    releaser: Releaser,
}

impl<T: Release> Owner<T> {
    /// Shares `state` and builds its releaser: one allocation each, once per layer.
    pub(crate) fn new(state: T) -> Self {
        let state = Arc::new(state);
        Owner {
            releaser: Releaser::new(state.clone()),
            state,
        }
    }
}

impl<T> Owner<T> {
    /// The shared state's `Arc`, for handles.
    pub(crate) fn arc(&self) -> &Arc<T> {
        &self.state
    }

    /// What one service instance holds.
    pub(crate) fn instance(&self) -> Instance<T> {
        Instance {
            state: self.state.clone(),
            releaser: self.releaser.clone(),
            calls: 0,
        }
    }
}

impl<T> Clone for Owner<T> {
    fn clone(&self) -> Self {
        Owner {
            state: self.state.clone(),
            releaser: self.releaser.clone(),
        }
    }
}

impl<T> std::ops::Deref for Owner<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.state
    }
}

/// One service instance's share of a layer's [`Owner`] (derefs to the state): the state, and the [`Releaser`]
/// for its permits, which is the layer's at first and, from the instance's [`PRIVATE_AFTER`]-th request on,
/// one of its own.
///
/// Every permit writes its releaser's reference count twice. With one releaser per layer, two threads serving
/// requests through the same layer pass that count's cache line back and forth on every request, even when
/// nothing else they touch is shared. A service instance that serves many requests (a connection's service, in
/// hyper and tonic) is driven by one task at a time, so a releaser of its own keeps the count in that thread's
/// cache. It costs one allocation per instance, at its [`PRIVATE_AFTER`]-th request, and nothing per request;
/// instances cloned for a single request (axum clones a route's service per request) never reach it.
pub(crate) struct Instance<T> {
    state: Arc<T>,
    releaser: Releaser,
    calls: u32,
}

/// The number of requests after which a service instance gets a [`Releaser`] of its own.
pub(crate) const PRIVATE_AFTER: u32 = 64;

impl<T> Instance<T> {
    /// The shared state's `Arc`, for handles and for what outlives the call (a queued request's place).
    pub(crate) fn arc(&self) -> &Arc<T> {
        &self.state
    }

    /// The state, and the releaser for the next permit: call once per request (the queue calls it before it
    /// knows whether it admits, queues or refuses; any count of requests will do to tell a long-lived instance).
    #[inline]
    pub(crate) fn next(&mut self) -> (&T, &Releaser) {
        if self.calls < PRIVATE_AFTER {
            self.calls += 1;
            if self.calls == PRIVATE_AFTER {
                self.releaser = Releaser::new(self.releaser.0 .0.clone());
            }
        }
        (&self.state, &self.releaser)
    }

    /// The releaser the next permit would get, without counting a request.
    pub(crate) fn releaser(&self) -> &Releaser {
        &self.releaser
    }
}

// A clone starts over: it may be an instance made for one request.
impl<T> Clone for Instance<T> {
    fn clone(&self) -> Self {
        Instance {
            state: self.state.clone(),
            releaser: self.releaser.clone(),
            calls: 0,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Owner<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.state.fmt(f)
    }
}

impl<T: fmt::Debug> fmt::Debug for Instance<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.state.fmt(f)
    }
}

impl<T> std::ops::Deref for Instance<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.state
    }
}

impl fmt::Debug for Releaser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Releaser").finish_non_exhaustive()
    }
}

// A permit's word. Bit 63: timed. Bit 62: released already. A timed permit keeps its tag in bits 0..24 and its
// admission instant in bits 24..62, as microseconds since `EPOCH` modulo 2^38 (about 3.2 days); an untimed one
// keeps its tag in bits 0..62.
const TIMED: u64 = 1 << 63;
const DONE: u64 = 1 << 62;
const TIME_SHIFT: u32 = 24;
const TIME_BITS: u32 = 38;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;

const MAX_TIMED_TAG: u64 = (1 << TIME_SHIFT) - 1;
const MAX_UNTIMED_TAG: u64 = DONE - 1;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// `t` as microseconds since `EPOCH`, rounded down, modulo 2^38. Differences of two stamps are exact modulo 2^38
/// for whole microseconds, whichever side of the epoch either instant is on (paused test clocks of runtimes
/// created at different moments can be).
fn stamp(t: Instant) -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    let nanos = if t >= epoch {
        (t - epoch).as_nanos() as i128
    } else {
        -((epoch - t).as_nanos() as i128)
    };
    (nanos.div_euclid(1_000) as u64) & TIME_MASK
}

/// An RAII guard for one admitted request.
///
/// A layer creates a `Permit` when it admits a request and hands it to the response future (and, for HTTP, on to
/// the response body). Whatever happens next, the owner's [`Release::release`] runs exactly once:
///
/// | path | outcome recorded |
/// |---|---|
/// | [`Permit::complete`] | the given outcome |
/// | dropped without completing (caller went away, future or body dropped) | [`Outcome::Ignored`] |
/// | body dropped after a head that said `Failure` or `Dropped` (a 500 or 503 left unread) | that outcome |
/// | dropped without completing after the [current deadline](super::Deadline::current) | [`Outcome::Dropped`] |
/// | dropped while the thread unwinds from a panic (inner service panicked) | [`Outcome::Failure`] |
///
/// The second row is a deadline layer outside cutting the request off: it drops the inner future (or body) while
/// the deadline is still current. To a limiter or breaker inside, that is a timeout, as a 504 from below would
/// be, and not a caller that went away. (A caller that hangs up after the deadline, before the layer's timer has
/// fired, counts the same: its request had missed its deadline anyway.) Looking for it costs a thread-local read,
/// and a clock read when a deadline is current, on this path only.
///
/// A timed permit reads the clock at admission and when it finishes, and reports the latency to the
/// microsecond, for requests of up to about 1.6 days (see [`Permit::elapsed`]). An untimed one reads no clock.
/// Neither allocates: the owner is a [`Releaser`] the layer already holds. A permit is two words, and so is an
/// `Option<Permit>`.
pub struct Permit {
    owner: Releaser,
    word: u64,
}

impl Permit {
    /// The largest tag a timed permit keeps (24 bits).
    pub const MAX_TIMED_TAG: u64 = MAX_TIMED_TAG;
    /// The largest tag an untimed permit keeps (62 bits).
    pub const MAX_UNTIMED_TAG: u64 = MAX_UNTIMED_TAG;

    /// Admits a request now on behalf of `owner`. `tag` is handed back to the owner on release (a probe flag, a
    /// priority, a generation: whatever the layer needs to know about this request then); a timed permit keeps
    /// its low 24 bits ([`Permit::MAX_TIMED_TAG`]).
    pub fn new(owner: Releaser, tag: u64) -> Self {
        Self::admitted_at(owner, tag, Instant::now())
    }

    /// Like [`Permit::new`] with an admission instant the caller already read.
    pub fn admitted_at(owner: Releaser, tag: u64, admitted_at: Instant) -> Self {
        debug_assert!(tag <= MAX_TIMED_TAG, "a timed permit's tag has 24 bits");
        Permit {
            owner,
            word: TIMED | (stamp(admitted_at) << TIME_SHIFT) | (tag & MAX_TIMED_TAG),
        }
    }

    /// Like [`Permit::new`] without reading the clock, for owners and observers that need no latency: neither
    /// creating nor finishing it reads the clock, and [`Release::release`] is told a latency of zero. A clock
    /// read costs from ~30 ns to ~100 ns depending on the machine, more than the rest of a lock-free admission.
    /// The tag keeps its low 62 bits ([`Permit::MAX_UNTIMED_TAG`]).
    #[inline]
    pub fn untimed(owner: Releaser, tag: u64) -> Self {
        debug_assert!(
            tag <= MAX_UNTIMED_TAG,
            "an untimed permit's tag has 62 bits"
        );
        Permit {
            owner,
            word: tag & MAX_UNTIMED_TAG,
        }
    }

    /// How long ago the request was admitted, to the microsecond: zero for an untimed permit (which never read
    /// the clock) and for an admission instant after now. Good for up to 2^37 µs (about 1.6 days); the stamps
    /// are kept modulo 2^38 µs, and the upper half of that range reads as "before the admission".
    #[inline]
    pub fn elapsed(&self) -> Duration {
        if self.word & TIMED == 0 {
            return Duration::ZERO;
        }
        let at = (self.word >> TIME_SHIFT) & TIME_MASK;
        let micros = stamp(Instant::now()).wrapping_sub(at) & TIME_MASK;
        if micros > TIME_MASK >> 1 {
            return Duration::ZERO;
        }
        Duration::from_micros(micros)
    }

    /// The tag given at admission.
    #[inline]
    pub fn tag(&self) -> u64 {
        if self.word & TIMED == 0 {
            self.word & MAX_UNTIMED_TAG
        } else {
            self.word & MAX_TIMED_TAG
        }
    }

    /// Finishes the request with `outcome`.
    #[inline]
    pub fn complete(mut self, outcome: Outcome) {
        // `Drop` then finds it released and only lets go of the owner.
        self.finish(outcome);
    }

    /// Lets go of a request that was answered `answered` (by the response head) but not finished: its body was
    /// dropped. A caller that goes away after a failed answer (reads the status, drops the body) does not undo the
    /// answer, so a `Failure` or `Dropped` answer is recorded where a plain drop would record `Ignored`; a panic
    /// or an expired deadline decide as they do for any drop.
    #[cfg(feature = "http")]
    pub(crate) fn abandon(mut self, answered: Outcome) {
        let outcome = match unfinished_outcome() {
            Outcome::Ignored if answered.is_failure() => answered,
            outcome => outcome,
        };
        self.finish(outcome);
    }

    #[inline]
    fn finish(&mut self, outcome: Outcome) {
        let latency = self.elapsed();
        let tag = self.tag();
        self.word |= DONE;
        self.owner.0 .0.release(outcome, latency, tag);
    }
}

/// What a permit dropped before its request finished records.
#[cold]
fn unfinished_outcome() -> Outcome {
    if std::thread::panicking() {
        // A panic in the inner service unwinds through the future holding us: that is the service's fault, not a
        // caller that went away.
        Outcome::Failure
    } else if Deadline::current().is_some_and(Deadline::is_expired) {
        // A deadline layer outside dropped the request at its deadline (it drops the inner future while the
        // deadline is still current): a timeout, which tells a limiter or breaker inside as much as a 504 from
        // below would, not a caller that went away.
        Outcome::Dropped
    } else {
        Outcome::Ignored
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        // Completed already (the common case): nothing left to do.
        if self.word & DONE != 0 {
            return;
        }
        self.finish(unfinished_outcome());
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("active", &(self.word & DONE == 0))
            .field("timed", &(self.word & TIMED != 0))
            .field("tag", &self.tag())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permit_and_an_optional_one_are_two_words() {
        assert_eq!(std::mem::size_of::<Permit>(), 16);
        assert_eq!(std::mem::size_of::<Option<Permit>>(), 16);
    }

    #[test]
    fn stamps_differ_by_the_exact_whole_microseconds_on_either_side_of_the_epoch() {
        let epoch = *EPOCH.get_or_init(Instant::now);
        for offset_ns in [0u64, 1, 999, 1_000, 1_500, 123_456_789] {
            for lat_us in [0u64, 1, 7, 1_000_000] {
                let lat = Duration::from_micros(lat_us);
                let off = Duration::from_nanos(offset_ns);
                for t in [epoch + off, epoch.checked_sub(off).unwrap_or(epoch)] {
                    let d = stamp(t + lat).wrapping_sub(stamp(t)) & TIME_MASK;
                    assert_eq!(d, lat_us, "t {t:?}, latency {lat:?}");
                }
            }
        }
    }

    #[test]
    fn a_service_instance_gets_its_own_releaser_once_and_its_clones_start_over() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl Release for Count {
            fn release(&self, _: Outcome, _: Duration, _: u64) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let owner = Owner::new(Count(0.into()));
        let shared = owner.releaser.clone();
        let mut local = owner.instance();
        let same = |a: &Releaser, b: &Releaser| Arc::ptr_eq(&a.0, &b.0);
        for _ in 1..PRIVATE_AFTER {
            assert!(same(local.next().1, &shared));
        }
        let own = local.next().1.clone();
        assert!(
            !same(&own, &shared),
            "the {PRIVATE_AFTER}th request gets a releaser of its own"
        );
        for _ in 0..10 {
            assert!(same(local.next().1, &own), "made once");
        }
        let mut clone = local.clone();
        assert!(same(clone.releaser(), &own) && same(clone.next().1, &own));
        // Both release into the one owner, which the private releaser keeps alive.
        let state = owner.arc().clone();
        drop((owner, shared));
        Permit::untimed(own.clone(), 0).complete(Outcome::Success);
        drop(Permit::untimed(local.next().1.clone(), 0));
        assert_eq!(state.0.load(std::sync::atomic::Ordering::Relaxed), 2);
        drop((local, clone, own));
        assert_eq!(Arc::strong_count(&state), 1, "nothing else holds the state");
    }

    #[test]
    fn tags_keep_their_width() {
        struct Nobody;
        impl Release for Nobody {
            fn release(&self, _: Outcome, _: Duration, _: u64) {}
        }
        let owner = Releaser::new(Arc::new(Nobody));
        assert_eq!(
            Permit::untimed(owner.clone(), MAX_UNTIMED_TAG).tag(),
            MAX_UNTIMED_TAG
        );
        assert_eq!(
            Permit::new(owner.clone(), MAX_TIMED_TAG).tag(),
            MAX_TIMED_TAG
        );
        assert_eq!(Permit::untimed(owner.clone(), 0).elapsed(), Duration::ZERO);
        // An admission instant after now (another runtime's paused clock, or a caller's own instant) reads as
        // zero, not as days.
        let later = Instant::now() + Duration::from_millis(5);
        assert_eq!(
            Permit::admitted_at(owner, 0, later).elapsed(),
            Duration::ZERO
        );
    }
}
