use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Outcome;

/// The owner of admitted requests: a layer's shared state.
///
/// It is told exactly once per [`Permit`] that a request has finished, with the outcome, the latency from
/// admission to the end of the response, and the tag the layer gave the permit.
pub trait Release: Send + Sync + 'static {
    /// Called once per permit, when the request it admitted is finished.
    fn release(&self, outcome: Outcome, latency: Duration, tag: u64);
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
/// | dropped while the thread unwinds from a panic (inner service panicked) | [`Outcome::Failure`] |
///
/// Creating a permit reads the clock once; finishing reads it once more. Neither allocates: the owner is an
/// `Arc` the layer already holds.
pub struct Permit {
    owner: Option<Arc<dyn Release>>,
    /// `None` for an untimed permit.
    admitted_at: Option<Instant>,
    tag: u64,
}

impl Permit {
    /// Admits a request now on behalf of `owner`. `tag` is handed back to the owner on release (a probe flag, a
    /// priority, a generation: whatever the layer needs to know about this request then).
    pub fn new(owner: Arc<dyn Release>, tag: u64) -> Self {
        Self::admitted_at(owner, tag, Instant::now())
    }

    /// Like [`Permit::new`] with an admission instant the caller already read.
    pub fn admitted_at(owner: Arc<dyn Release>, tag: u64, admitted_at: Instant) -> Self {
        Permit {
            owner: Some(owner),
            admitted_at: Some(admitted_at),
            tag,
        }
    }

    /// Like [`Permit::new`] without reading the clock, for owners and observers that need no latency: neither
    /// creating nor finishing it reads the clock, and [`Release::release`] is told a latency of zero. A clock
    /// read costs from ~30 ns to ~100 ns depending on the machine, more than the rest of a lock-free admission.
    #[inline]
    pub fn untimed(owner: Arc<dyn Release>, tag: u64) -> Self {
        Permit {
            owner: Some(owner),
            admitted_at: None,
            tag,
        }
    }

    /// When the request was admitted (for an untimed permit, which never read the clock: now).
    pub fn admission(&self) -> Instant {
        self.admitted_at.unwrap_or_else(Instant::now)
    }

    /// The tag given at admission.
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Finishes the request with `outcome`.
    #[inline]
    pub fn complete(self, outcome: Outcome) {
        // Finished here, so `Drop` has nothing left to do: skip it. The owner is taken out by `finish`, and the
        // other fields own nothing, so nothing leaks.
        let mut this = std::mem::ManuallyDrop::new(self);
        this.finish(outcome);
    }

    #[inline]
    fn finish(&mut self, outcome: Outcome) {
        if let Some(owner) = self.owner.take() {
            let latency = self.admitted_at.map_or(Duration::ZERO, |at| at.elapsed());
            owner.release(outcome, latency, self.tag);
        }
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        // Completed already (the common case): nothing left to do.
        if self.owner.is_none() {
            return;
        }
        // A panic in the inner service unwinds through the future holding us: that is the service's fault, not a
        // caller that went away.
        let outcome = if std::thread::panicking() {
            Outcome::Failure
        } else {
            Outcome::Ignored
        };
        self.finish(outcome);
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("active", &self.owner.is_some())
            .field("admitted_at", &self.admitted_at)
            .field("tag", &self.tag)
            .finish()
    }
}
