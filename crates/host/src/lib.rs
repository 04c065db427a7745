//! The IsoCell cell lifecycle as a library: plan → admit (measure, policy) → start (jail, VMM,
//! launch receipt) → agent ready → `put` / `exec` / `get` → delete (teardown checked, exit
//! receipt); sessions (many commands at once in a long-lived cell) and the per-cell supervisor
//! that `isocelld` starts. `isocell run`, `isocell surface`, the daemon and the benchmark drive
//! cells through it.
//!
//! Nothing here reads the environment (but [`HostConfig::discover`] and [`locate`], which the
//! binaries call), installs signal handlers or writes to this process's stdout or stderr: the
//! host configuration is given ([`HostConfig`]), cancellation is a token ([`Cancel`]) and output
//! goes to a sink ([`OutputSink`]). Errors are typed ([`CellError`], [`PlanError`]); callers
//! choose their exit or HTTP statuses. The VMM's pure model comes from `isocell-vmm-model`: this
//! crate links no KVM code.
pub mod agent_link;
pub mod cancel;
pub mod cell;
pub mod command;
pub mod config;
pub mod confine;
pub mod error;
pub mod evidence;
pub mod locate;
pub mod network;
pub mod plan;
pub mod run;
pub mod session;
pub mod sink;
pub mod snapshot;
pub mod state;
pub mod supervisor;
pub mod transfer;
pub mod vmm_process;

pub use cancel::{Cancel, CancelReason};
pub use cell::{Admitted, Cell, Ended, Termination, Verdict};
pub use config::HostConfig;
pub use error::{
    AgentLinkError, AskError, CellError, EvidenceError, ExecFailure, LocateError, PinError,
    PlanError, StateError, TransferError, VmmError,
};
pub use plan::{CellImage, CellPlan, CellRequest, ContainerImage};
pub use run::{run, Phases, RunOutcome, RunRequest};
pub use sink::OutputSink;
