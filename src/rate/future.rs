//! The rate limiter's response future.

use crate::core::{self, RejectMode, Rejection};

use super::{Policy, RateLimitReject};

/// The response future of [`RateLimit`](super::RateLimit): the core future of a layer that decides in `call`.
pub type ResponseFuture<F, C, M> = core::ResponseFuture<F, C, PolicyMode<M>>;

/// A reject mode carrying the limiter's [`Policy`], so rejections can advertise it (see [`RateLimitReject`]).
/// Copying it per request costs a few bytes: no allocation, no reference count.
#[derive(Debug, Clone, Copy)]
pub struct PolicyMode<M> {
    mode: M,
    policy: Policy,
}

impl<M> PolicyMode<M> {
    pub(crate) fn new(mode: M, policy: Policy) -> Self {
        PolicyMode { mode, policy }
    }

    /// The wrapped reject mode.
    pub fn mode(&self) -> &M {
        &self.mode
    }

    /// The advertised policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
}

impl<Res, E, M> RejectMode<Res, E> for PolicyMode<M>
where
    M: RateLimitReject<Res, E>,
{
    type Error = M::Error;

    fn inner_error(&self, error: E) -> M::Error {
        self.mode.inner_error(error)
    }

    fn reject(&self, rejection: Rejection) -> Result<Res, M::Error> {
        self.mode.reject_rate_limited(rejection, &self.policy)
    }
}
