//! Why a runtime monitor could not start.

use std::fmt;

/// [`RuntimeMonitor::start`](super::RuntimeMonitor::start) failed: there is no tokio runtime to probe, or this
/// monitor's probe task is already running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError {
    already_running: bool,
}

impl StartError {
    pub(crate) fn no_runtime() -> Self {
        StartError {
            already_running: false,
        }
    }

    pub(crate) fn already_running() -> Self {
        StartError {
            already_running: true,
        }
    }

    /// Whether the monitor was already running (rather than started outside a tokio runtime).
    pub fn is_already_running(&self) -> bool {
        self.already_running
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.already_running {
            "runtime monitor already running"
        } else {
            "runtime monitor must be started from within a tokio runtime"
        })
    }
}

impl std::error::Error for StartError {}
