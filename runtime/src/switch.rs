//! Process-wide on/off switches for optimisations that are measured against their
//! absence in the same process (`BMC_BENCH_AB=… bmc bench …`): on unless the switch's
//! environment variable is `0` when it is first read, and settable at run time.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

/// One switch; a `static` where the optimisation lives.
pub(crate) struct Switch {
    on: AtomicBool,
    /// The environment variable that turns it off (`=0`).
    env: &'static str,
    read: Once,
}

impl Switch {
    pub(crate) const fn new(env: &'static str) -> Switch {
        Switch { on: AtomicBool::new(true), env, read: Once::new() }
    }

    /// Whether the optimisation is on.
    #[inline]
    pub(crate) fn on(&self) -> bool {
        self.read.call_once(|| {
            if std::env::var(self.env).is_ok_and(|v| v == "0") {
                self.on.store(false, Ordering::Relaxed);
            }
        });
        self.on.load(Ordering::Relaxed)
    }

    /// Turns it on or off from the next use on (after the environment was read, so
    /// that the environment cannot undo it).
    pub(crate) fn set(&self, on: bool) {
        self.read.call_once(|| {});
        self.on.store(on, Ordering::Relaxed);
    }
}
