use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};
use tower_service::Service;

use crate::core::{Classify, Event, Observer, Reason, RejectMode, Rejection};

use super::clock::{TokioClock, TokioInstant};
use super::future::{PolicyMode, ResponseFuture};
use super::store::BoundedStore;
use super::{Global, KeyExtractor, RateLimitReject};

type Middleware = NoOpMiddleware<TokioInstant>;

enum Store {
    /// One GCRA cell in an `AtomicU64`: a compare-and-swap per request, no lock, no allocation.
    Global(RateLimiter<NotKeyed, InMemoryState, TokioClock, Middleware>),
    /// Keyed by a SipHash of the key, capped.
    Keyed {
        limiter: RateLimiter<u64, BoundedStore, TokioClock, Middleware>,
        hasher: RandomState,
        store: BoundedStore,
        max_keys: usize,
    },
}

/// What every clone of a rate-limited service shares.
pub(crate) struct Shared<O> {
    store: Store,
    admitted: AtomicU64,
    rejected: AtomicU64,
    observer: O,
}

impl<O> Shared<O> {
    pub(crate) fn new(quota: Quota, max_keys: Option<usize>, observer: O) -> Self {
        let store = match max_keys {
            None => Store::Global(RateLimiter::new(
                quota,
                InMemoryState::default(),
                TokioClock,
            )),
            Some(max_keys) => {
                let store = BoundedStore::new(max_keys);
                Store::Keyed {
                    limiter: RateLimiter::new(quota, store.clone(), TokioClock),
                    hasher: RandomState::new(),
                    store,
                    max_keys,
                }
            }
        };
        Shared {
            store,
            admitted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            observer,
        }
    }

    fn check<K: KeyExtractor<Req>, Req>(
        &self,
        key: &K,
        request: &Req,
    ) -> Result<(), NotUntil<TokioInstant>> {
        match &self.store {
            Store::Global(limiter) => limiter.check(),
            Store::Keyed {
                limiter, hasher, ..
            } => limiter.check_key(&hasher.hash_one(key.extract(request))),
        }
    }
}

/// The snapshot side of [`Shared`], without its observer type, so handles need no type parameters.
pub(crate) trait Stats: Send + Sync + 'static {
    fn counts(&self) -> (u64, u64);
    fn tracked_keys(&self) -> usize;
    fn max_keys(&self) -> Option<usize>;
}

impl<O: Observer> Stats for Shared<O> {
    fn counts(&self) -> (u64, u64) {
        (
            self.admitted.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
        )
    }

    fn tracked_keys(&self) -> usize {
        match &self.store {
            Store::Global(_) => 0,
            Store::Keyed { store, .. } => store.len(),
        }
    }

    fn max_keys(&self) -> Option<usize> {
        match &self.store {
            Store::Global(_) => None,
            Store::Keyed { max_keys, .. } => Some(*max_keys),
        }
    }
}

impl<O> Shared<O> {
    pub(crate) fn is_keyed(&self) -> bool {
        matches!(self.store, Store::Keyed { .. })
    }
}

/// Refuses requests beyond a GCRA rate limit, global or per key; created by [`RateLimitLayer`](super::RateLimitLayer).
///
/// Decides in `call`: admitted requests go straight to the inner service, refused ones are answered at once by
/// the reject mode. `poll_ready` only forwards the inner service's readiness. Clones share one budget.
pub struct RateLimit<S, K = Global, C = crate::core::AnyOk, M = crate::core::ErrorMode, O = ()> {
    inner: S,
    key: K,
    classify: C,
    mode: PolicyMode<M>,
    shared: Arc<Shared<O>>,
}

impl<S, K, C, M, O> RateLimit<S, K, C, M, O> {
    pub(crate) fn new(
        inner: S,
        key: K,
        classify: C,
        mode: PolicyMode<M>,
        shared: Arc<Shared<O>>,
    ) -> Self {
        RateLimit {
            inner,
            key,
            classify,
            mode,
            shared,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming the limiter.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, K: Clone, C: Clone, M: Clone, O> Clone for RateLimit<S, K, C, M, O> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            key: self.key.clone(),
            classify: self.classify.clone(),
            mode: self.mode.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, K, C, M, O> fmt::Debug for RateLimit<S, K, C, M, O>
where
    S: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("policy", self.mode.policy())
            .field("keyed", &self.shared.is_keyed())
            .finish_non_exhaustive()
    }
}

impl<S, K, C, M, O, Req> Service<Req> for RateLimit<S, K, C, M, O>
where
    S: Service<Req>,
    K: KeyExtractor<Req>,
    C: Classify<S::Response, S::Error>,
    M: RateLimitReject<C::Response, S::Error>,
    O: Observer,
{
    type Response = C::Response;
    type Error = M::Error;
    type Future = ResponseFuture<S::Future, C, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(
                RejectMode::<C::Response, S::Error>::inner_error(&self.mode, e),
            )),
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.shared.check(&self.key, &request) {
            Ok(()) => {
                self.shared.admitted.fetch_add(1, Ordering::Relaxed);
                ResponseFuture::admitted(
                    self.inner.call(request),
                    None,
                    self.classify.clone(),
                    self.mode.clone(),
                )
            }
            Err(not_until) => {
                // governor refuses only while the next cell lies ahead, but a second clock read can land past
                // it; a hint of zero would invite an immediate retry, so the least wait reported is 1 ns (which
                // `Retry-After` rounds up to 1 s).
                let wait = not_until
                    .wait_time_from(TokioClock.now())
                    .max(Duration::from_nanos(1));
                self.shared.rejected.fetch_add(1, Ordering::Relaxed);
                self.shared.observer.on_event(&Event::Rejected {
                    layer: "rate",
                    reason: Reason::RateLimited,
                    retry_after: Some(wait),
                });
                let rejection = Rejection::new(Reason::RateLimited).with_retry_after(Some(wait));
                ResponseFuture::rejected(rejection, self.mode.clone())
            }
        }
    }
}
