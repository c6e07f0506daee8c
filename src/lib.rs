#![doc = include_str!("../docs/crate.md")]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod adaptive;
pub mod breaker;
pub mod core;
pub mod deadline;
pub mod pressure;
pub mod queue;
pub mod rate;
#[cfg(feature = "sim")]
pub mod sim;
