//! Why a runtime monitor could not start.

use std::fmt;

/// [`RuntimeMonitor::start`](super::RuntimeMonitor::start) failed: there is no tokio runtime to probe, the runtime
/// was built without timers, or this monitor's probe task is already running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError {
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NoRuntime,
    TimersDisabled,
    AlreadyRunning,
}

impl StartError {
    pub(crate) fn no_runtime() -> Self {
        StartError {
            kind: Kind::NoRuntime,
        }
    }

    pub(crate) fn timers_disabled() -> Self {
        StartError {
            kind: Kind::TimersDisabled,
        }
    }

    pub(crate) fn already_running() -> Self {
        StartError {
            kind: Kind::AlreadyRunning,
        }
    }

    /// Whether the monitor was already running.
    pub fn is_already_running(&self) -> bool {
        self.kind == Kind::AlreadyRunning
    }

    /// Whether the runtime was built without timers (no `enable_time` or `enable_all` on its builder): the probe
    /// sleeps between samples, so it needs them.
    pub fn is_timers_disabled(&self) -> bool {
        self.kind == Kind::TimersDisabled
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::NoRuntime => "runtime monitor must be started from within a tokio runtime",
            Kind::TimersDisabled => {
                "runtime monitor needs a tokio runtime with timers enabled (`enable_time` on its builder)"
            }
            Kind::AlreadyRunning => "runtime monitor already running",
        })
    }
}

impl std::error::Error for StartError {}
