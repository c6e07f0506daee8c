//! Deadline propagation.

pub mod codec;
#[cfg(feature = "http")]
pub mod future;
#[cfg(feature = "http")]
mod layer;
mod mode;
#[cfg(feature = "http")]
mod service;
#[cfg(feature = "http")]
mod shared;

pub use crate::core::Deadline;
pub use self::codec::{InvalidTimeout, GRPC_TIMEOUT_HEADER, TIMEOUT_MS_HEADER};
pub use self::mode::RejectInvalid;
#[cfg(feature = "http")]
pub use self::layer::{
    DeadlineLayer, DeadlineLayerBuilder, PropagateDeadlineLayer, PropagateDeadlineLayerBuilder, DEFAULT_MARGIN,
};
#[cfg(feature = "http")]
pub use self::service::{DeadlineService, PropagateDeadline};
#[cfg(feature = "http")]
pub use self::shared::{DeadlineHandle, DeadlineSnapshot};
