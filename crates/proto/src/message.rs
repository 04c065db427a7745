//! The messages host and agent exchange, and the values they carry.

/// One protocol message. The comment on each variant says who sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Agent → host, the first frame: the agent's protocol version and name.
    Hello {
        /// Protocol version the agent speaks.
        version: u16,
        /// Agent name and version, for logs.
        agent: String,
    },
    /// Host → agent, the reply to `Hello`.
    Welcome {
        /// Protocol version the host speaks.
        version: u16,
    },
    /// Host → agent: start a command.
    Exec(ExecRequest),
    /// Host → agent: bytes for the running command's stdin.
    Stdin(Vec<u8>),
    /// Host → agent: close the running command's stdin.
    StdinEof,
    /// Host → agent: send this signal to the running command.
    Signal(i32),
    /// Agent → host: bytes the command wrote to stdout.
    Stdout(Vec<u8>),
    /// Agent → host: bytes the command wrote to stderr.
    Stderr(Vec<u8>),
    /// Agent → host: the command is running.
    Started {
        /// Its process id inside the cell.
        pid: u32,
    },
    /// Agent → host: the command could not start.
    ExecFailed {
        /// The `errno` of the failed call.
        errno: i32,
        /// What failed, for people.
        message: String,
    },
    /// Agent → host: the command ended.
    Exited(ExitStatus),
    /// Host → agent: write a file; `Data` chunks follow, then `DataEnd`.
    PutFile {
        /// Absolute path inside the cell.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Total size of the data that follows, in bytes.
        size: u64,
    },
    /// Host → agent: create a directory.
    MakeDir {
        /// Absolute path inside the cell.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// Host → agent: make `path` (a file or directory tree the host put in the cell) read-only
    /// for everything in the cell: a read-only bind mount of it over itself, as a container
    /// runtime mounts a read-only volume. Reply: `Done` or `Error`.
    MakeReadOnly {
        /// Absolute path inside the cell.
        path: String,
    },
    /// Host → agent: send a file or directory tree back. Reply: `Entry` (files followed by
    /// `Data`* `DataEnd`) for each entry, then `Done`; or `Error`.
    GetPath {
        /// Absolute path inside the cell.
        path: String,
    },
    /// Agent → host: one entry of a `GetPath` reply; a file is followed by `Data`* `DataEnd`.
    Entry {
        /// Path of the entry inside the cell.
        path: String,
        /// File or directory.
        kind: EntryKind,
        /// Permission bits.
        mode: u32,
        /// Size in bytes (0 for directories).
        size: u64,
    },
    /// Either way: a chunk of file contents.
    Data(Vec<u8>),
    /// Either way: the end of a file's contents.
    DataEnd,
    /// Either way: generic success reply.
    Done,
    /// Either way: generic failure reply.
    Error {
        /// What failed, for people.
        message: String,
    },
    /// Host → agent: power the cell off.
    Shutdown,
    /// Host → agent, the first frame of a session connection (host-initiated, to
    /// [`SESSION_PORT`](crate::SESSION_PORT)): start a command as session `id`. Replies as for
    /// `Exec`. The command outlives the connection; its status stays with the agent for
    /// `WaitSession`.
    ExecSession {
        /// The host's id for the session (unique in the cell).
        id: u64,
        /// Run it on a new terminal of this size (stdout and stderr are then both the
        /// terminal's output, sent as `Stdout`).
        tty: Option<WindowSize>,
        /// The command.
        exec: ExecRequest,
    },
    /// Host → agent: this connection's session terminal changed size.
    Resize(WindowSize),
    /// Host → agent: reply with `Exited` once session `id` has ended (at once if it has), or
    /// `Error` if the agent knows no such session.
    WaitSession {
        /// The session.
        id: u64,
    },
    /// Host → agent: send `signal` to session `id`'s process group. Reply: `Done` or `Error`.
    SignalSession {
        /// The session.
        id: u64,
        /// The signal number.
        signal: i32,
    },
    /// Host → agent, to a cell that has run nothing: it is about to be saved as a snapshot.
    /// The agent replies `Done`; the VM is then saved and never resumes. Each copy restored
    /// from the snapshot goes on with this same connection (the VMM hands it to the copy's
    /// host, without a new `Hello`), and its host's first request is `Reseed`.
    PrepareSnapshot,
    /// Host → agent, the first request to a cell restored from a snapshot, before anything
    /// runs: mix `entropy` into the kernel's pool and reseed its RNG, so no two copies share
    /// random state, and set the wall clock to `unix_time_ns`. Reply: `Done` or `Error`.
    Reseed {
        /// Fresh random bytes from the host (at least 32).
        entropy: Vec<u8>,
        /// The host's wall-clock time, in nanoseconds since the Unix epoch.
        unix_time_ns: u64,
    },
}

/// A terminal's size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// A command to run in the cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// The whole environment, in order.
    pub env: Vec<(String, String)>,
    /// Working directory (none: the agent's default).
    pub cwd: Option<String>,
    /// User id to run as.
    pub uid: u32,
    /// Group id to run as.
    pub gid: u32,
    /// Supplementary group ids, set with `setgroups` (empty: none). At most
    /// [`MAX_GROUPS`](crate::MAX_GROUPS).
    pub groups: Vec<u32>,
    /// Whether the host will send `Stdin`; if not, stdin is `/dev/null`.
    pub stdin: bool,
    /// The capabilities and `no_new_privs` to run with (an OCI process's, as runc applies
    /// them); none: the agent's own, every capability, as `isocell run` gives its command.
    pub privileges: Option<Privileges>,
}

/// Linux capability sets (bit N is capability N, as in `linux/capability.h`) and
/// `no_new_privs` for a command. Bits above the guest kernel's last capability are ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Privileges {
    /// The bounding set: what the command and its children can ever gain.
    pub bounding: u64,
    /// The effective set.
    pub effective: u64,
    /// The permitted set.
    pub permitted: u64,
    /// The inheritable set.
    pub inheritable: u64,
    /// The ambient set (kept across `execve` by a user other than root).
    pub ambient: u64,
    /// Set `no_new_privs`: no set-id bit or file capability adds privilege.
    pub no_new_privs: bool,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal with this number killed it.
    Signal(i32),
}

impl ExitStatus {
    /// Shell convention: the exit code, or 128 + the signal number (saturating).
    pub fn shell_code(&self) -> i32 {
        match *self {
            Self::Code(code) => code,
            Self::Signal(signal) => signal.saturating_add(128),
        }
    }
}

/// The kind of a `GetPath` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
}

#[cfg(test)]
mod tests {
    use super::ExitStatus;

    #[test]
    fn shell_code_follows_the_shell() {
        assert_eq!(ExitStatus::Code(0).shell_code(), 0);
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert_eq!(ExitStatus::Signal(i32::MAX).shell_code(), i32::MAX);
    }
}
