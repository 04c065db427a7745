//! The IsoCell cell lifecycle as a library: plan → admit (measure, policy) → start (jail, VMM,
//! launch receipt) → agent ready → `put` / `exec` / `get` → delete (teardown checked, exit
//! receipt). `isocell run`, `isocell surface` and the benchmark drive cells through it.
//!
//! Nothing here reads the environment, installs signal handlers or writes to this process's
//! stdout or stderr: the host configuration is given ([`HostConfig`]), cancellation is a token
//! ([`Cancel`]) and output goes to a sink ([`OutputSink`]). Errors are typed ([`CellError`],
//! [`PlanError`]); callers choose their exit or HTTP statuses.

pub mod agent_link;
pub mod cancel;
pub mod cell;
pub mod config;
pub mod confine;
pub mod error;
pub mod evidence;
pub mod locate;
pub mod plan;
pub mod run;
pub mod sink;
pub mod state;
pub mod transfer;
pub mod vmm_process;

pub use cancel::{Cancel, CancelReason};
pub use cell::{Admitted, Cell, Ended, Termination, Verdict};
pub use config::HostConfig;
pub use error::{CellError, ExecFailure, PlanError};
pub use plan::{CellImage, CellPlan, CellRequest, ContainerImage};
pub use run::{run, Phases, RunOutcome, RunRequest};
pub use sink::OutputSink;
