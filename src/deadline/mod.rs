//! Deadline propagation.

pub mod codec;

pub use crate::core::Deadline;
