//! Timestamps of the boot phases, relative to the VMM process start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

const UNSET: u64 = u64::MAX;

/// Phase timestamps in microseconds since the process started. Written from any thread.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    config_checked: AtomicU64,
    vm_built: AtomicU64,
    guest_init: AtomicU64,
    exited: AtomicU64,
}

/// A snapshot of [`Timeline`] for the report; `None` for phases not reached.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Phases {
    /// Configuration and host checked.
    pub config_checked_us: Option<u64>,
    /// Memory, devices, kernel and vCPUs set up; vCPUs about to run.
    pub vm_built_us: Option<u64>,
    /// The guest wrote the boot-timer magic (its init is running).
    pub guest_init_us: Option<u64>,
    /// The VM stopped.
    pub exit_us: Option<u64>,
}

/// The phases the VMM marks.
#[derive(Clone, Copy, Debug)]
pub enum Phase {
    /// See [`Phases::config_checked_us`].
    ConfigChecked,
    /// See [`Phases::vm_built_us`].
    VmBuilt,
    /// See [`Phases::guest_init_us`].
    GuestInit,
    /// See [`Phases::exit_us`].
    Exited,
}

impl Timeline {
    /// Starts the clock; call first thing in `main`.
    pub fn new(start: Instant) -> Self {
        Timeline {
            start,
            config_checked: AtomicU64::new(UNSET),
            vm_built: AtomicU64::new(UNSET),
            guest_init: AtomicU64::new(UNSET),
            exited: AtomicU64::new(UNSET),
        }
    }

    fn slot(&self, phase: Phase) -> &AtomicU64 {
        match phase {
            Phase::ConfigChecked => &self.config_checked,
            Phase::VmBuilt => &self.vm_built,
            Phase::GuestInit => &self.guest_init,
            Phase::Exited => &self.exited,
        }
    }

    /// Records `phase` now, unless it was already recorded. Returns whether it was recorded.
    pub fn mark(&self, phase: Phase) -> bool {
        let now = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(UNSET - 1);
        self.slot(phase).compare_exchange(UNSET, now, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The recorded phases.
    pub fn phases(&self) -> Phases {
        let get = |p| match self.slot(p).load(Ordering::Acquire) {
            UNSET => None,
            v => Some(v),
        };
        Phases {
            config_checked_us: get(Phase::ConfigChecked),
            vm_built_us: get(Phase::VmBuilt),
            guest_init_us: get(Phase::GuestInit),
            exit_us: get(Phase::Exited),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_mark_wins() {
        let t = Timeline::new(Instant::now());
        assert!(t.mark(Phase::GuestInit));
        let first = t.phases().guest_init_us;
        assert!(!t.mark(Phase::GuestInit));
        assert_eq!(t.phases().guest_init_us, first);
        assert_eq!(t.phases().exit_us, None);
    }
}
