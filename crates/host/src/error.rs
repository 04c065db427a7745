//! Typed errors of the lifecycle. Each says what was wrong and what to do; the CLI maps them to
//! exit statuses and the daemon to HTTP statuses, so neither convention lives here. The errors
//! of each part ([`AgentLinkError`], [`EvidenceError`], [`StateError`], [`TransferError`],
//! [`VmmError`], [`PinError`], [`AskError`], [`LocateError`]) live beside it and are re-exported here.

pub use crate::agent_link::AgentLinkError;
pub use crate::confine::PinError;
pub use crate::evidence::EvidenceError;
pub use crate::locate::LocateError;
pub use crate::state::StateError;
pub use crate::supervisor::AskError;
pub use crate::transfer::TransferError;
pub use crate::vmm_process::VmmError;

/// A file system or process operation on one path failed: shared by [`StateError`] and
/// [`VmmError`].
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct PathError {
    /// What was being done ("create", "write", "listen on", "start", ...).
    pub action: &'static str,
    /// The file, directory or program.
    pub path: std::path::PathBuf,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

/// A [`PathError`] for `action` on `path`, for `map_err`.
pub(crate) fn io<'a>(
    action: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> PathError + 'a {
    move |source| PathError { action, path: path.to_owned(), source }
}

/// Why a cell could not be planned: the request or the host's files. Nothing exists yet.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A value in the request is out of range or malformed.
    #[error("{0}")]
    Invalid(String),
    /// A file the cell is built from cannot be used.
    #[error(transparent)]
    File(#[from] PinError),
    /// The devices cannot be placed (more disks than windows, overlaps).
    #[error("{0}")]
    Devices(String),
}

/// How a command failed to start in the cell (the agent's answer to `Exec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecFailure {
    /// No such program in the cell.
    NotFound,
    /// The program exists but cannot be executed (permissions, format, a directory).
    CannotExecute,
    /// Anything else the agent reported.
    Other,
}

/// Why a cell operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    /// The cell could not be planned.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The image could not be found, fetched or converted.
    #[error(transparent)]
    Image(#[from] isocell_image::StoreError),
    /// The admission policy said no; nothing was started.
    #[error("admission {0}; no cell was started")]
    Denied(String),
    /// This host cannot run the cell (no hardware virtualization, not enough memory).
    #[error("{0}")]
    Host(String),
    /// The state directory, audit log or receipts could not be written or read.
    #[error(transparent)]
    Evidence(#[from] EvidenceError),
    /// The cell's directory, cgroup, jail or VMM could not be set up.
    #[error(transparent)]
    Start(VmmError),
    /// The cell did not come up (VMM stopped, agent silent past the boot timeout).
    #[error(transparent)]
    Boot(VmmError),
    /// The agent broke the protocol or refused what was asked.
    #[error("{0}")]
    Agent(String),
    /// The connection to the agent failed: it went away, sent a bad frame or did not answer in
    /// time.
    #[error(transparent)]
    Link(#[from] AgentLinkError),
    /// A file or tree copy into or out of the cell failed (nothing half-copied is kept).
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The command did not start.
    #[error("{message}")]
    Exec {
        /// What kind of failure the agent reported.
        kind: ExecFailure,
        /// The agent's message.
        message: String,
    },
    /// The operation was cancelled before it finished.
    #[error("cancelled ({0:?})")]
    Cancelled(crate::CancelReason),
}
