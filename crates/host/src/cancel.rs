//! Cancelling a cell's wait or command from outside: a signal handler, a client that went
//! away, a delete. The lifecycle looks at the token at every wait; it never installs signal
//! handlers itself.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

/// Why a cell's work was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// A terminating signal reached the process driving the cell (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
    /// The cell was deleted while something waited on it.
    Deleted,
    /// Whoever watched a session's output went away; the session's command goes on.
    Detached,
}

/// A shared flag; clones see the same state. The first reason given wins.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicI32>);

/// Stored for [`CancelReason::Deleted`] and [`CancelReason::Detached`]; signals are stored as
/// their (positive) number.
const DELETED: i32 = -1;
const DETACHED: i32 = -2;

impl Cancel {
    /// A token nobody has cancelled yet.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Cancels with `reason`, unless already cancelled. Async-signal-safe (one atomic store).
    pub fn cancel(&self, reason: CancelReason) {
        let v = match reason {
            CancelReason::Signal(s) => s.max(1),
            CancelReason::Deleted => DELETED,
            CancelReason::Detached => DETACHED,
        };
        let _ = self.0.compare_exchange(0, v, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Why it was cancelled, if it was.
    pub fn reason(&self) -> Option<CancelReason> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            DELETED => Some(CancelReason::Deleted),
            DETACHED => Some(CancelReason::Detached),
            s => Some(CancelReason::Signal(s)),
        }
    }

    /// Whether it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.reason().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins_and_clones_share_it() {
        let c = Cancel::new();
        let d = c.clone();
        assert_eq!(c.reason(), None);
        d.cancel(CancelReason::Signal(libc::SIGTERM));
        c.cancel(CancelReason::Deleted);
        assert_eq!(c.reason(), Some(CancelReason::Signal(libc::SIGTERM)));
    }
}
