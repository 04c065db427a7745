//! `--input` and `--output`: copying files and directory trees into a cell before the command
//! and out of it afterwards.
//!
//! What comes out of a cell is hostile. Outputs are written into a staging directory that
//! `isocell` creates next to the destination, every entry is opened beneath it without
//! following any link (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`) and created
//! exclusively, modes come from a fixed policy, the cell is held to the sizes it declares and to
//! caps on bytes, entries and time, and only a complete copy is renamed into place. On any
//! failure the staging directory is removed: nothing partial is left in the destination.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use isocell_proto::{EntryKind, Message, MAX_CHUNK};

use crate::agent_link::{deadline_in, AgentLink, AgentLinkError};

/// Why a copy into or out of a cell failed. The texts of `--output` failures start with
/// `--output `.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The connection to the agent failed.
    #[error(transparent)]
    Agent(#[from] AgentLinkError),
    /// A host file named by `flag` cannot be opened or looked at.
    #[error("{flag} {}: {source}", path.display())]
    HostFile {
        /// The option that named it (`--input`, ...).
        flag: String,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A host file named by `flag` is a device, FIFO or socket.
    #[error(
        "{flag} {}: not a regular file (devices, FIFOs and sockets are refused)",
        path.display()
    )]
    NotRegular {
        /// The option that named it.
        flag: String,
        /// The file.
        path: PathBuf,
    },
    /// An input tree holds a name that is not UTF-8.
    #[error("--input: {} has a name that is not UTF-8", path.display())]
    NotUtf8 {
        /// The entry.
        path: PathBuf,
    },
    /// An input file changed size while it was copied.
    #[error("--input {}: the file changed while it was copied", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// Reading the data to send failed.
    #[error("{what}: {source}")]
    Read {
        /// What was read.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Fewer bytes were there to send than announced.
    #[error("{guest}: {sent} of {size} bytes were there to copy")]
    Short {
        /// The file in the cell.
        guest: String,
        /// Bytes sent.
        sent: u64,
        /// Bytes announced.
        size: u64,
    },
    /// The agent refused an operation.
    #[error("in the cell: {0}")]
    InCell(String),
    /// The agent answered an operation with something else than `Done` or `Error`.
    #[error("unexpected reply {reply} for {what}")]
    UnexpectedReply {
        /// The reply, described briefly.
        reply: String,
        /// The path the operation was on.
        what: String,
    },
    /// The cell sent a path with `..`, a root or a NUL (truncated).
    #[error("the cell sent an unsafe path {0:?}; refused")]
    UnsafePath(String),
    /// A host path holds a NUL.
    #[error("{}: path has a NUL", path.display())]
    Nul {
        /// The path.
        path: PathBuf,
    },
    /// The staging directory of an output cannot be created.
    #[error("--output {}: cannot create {}: {source}", dest.display(), dir.display())]
    Staging {
        /// The output's destination.
        dest: PathBuf,
        /// The staging directory.
        dir: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A host path of an output cannot be opened or renamed.
    #[error("--output {}: {source}", path.display())]
    Output {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The destination is a directory that is not empty.
    #[error("--output {}: exists and is not empty; give a new path or remove it", dest.display())]
    NotEmpty {
        /// The destination.
        dest: PathBuf,
    },
    /// The destination is of another kind than the copy (a file for a tree, or the reverse).
    #[error(
        "--output {}: exists as another kind of file; give a new path or remove it",
        dest.display()
    )]
    OtherKind {
        /// The destination.
        dest: PathBuf,
    },
    /// Copying the outputs took longer than `--copy-timeout`.
    #[error("--output {guest}: copying outputs took longer than --copy-timeout {secs} s; stopped")]
    Timeout {
        /// The path in the cell.
        guest: String,
        /// The bound.
        secs: u64,
    },
    /// The cell began an entry before it ended a file.
    #[error("--output {guest}: the cell began an entry inside a file")]
    EntryInFile {
        /// The path in the cell.
        guest: String,
    },
    /// More entries than `--output-max-entries`.
    #[error(
        "--output {guest}: more than --output-max-entries {max} files and directories; stopped"
    )]
    MaxEntries {
        /// The path in the cell.
        guest: String,
        /// The cap.
        max: u64,
    },
    /// The first entry was not the root, or the root came again.
    #[error("--output {guest}: the cell sent entries out of order ({path:?})")]
    OutOfOrder {
        /// The path in the cell.
        guest: String,
        /// The entry's path (truncated).
        path: String,
    },
    /// An entry cannot be created in the staging directory.
    #[error("--output {guest}: {path}: {source}")]
    Create {
        /// The path in the cell.
        guest: String,
        /// The entry's path (truncated).
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file would pass `--output-max-bytes`.
    #[error("--output {guest}: {path} would pass --output-max-bytes {max}; stopped")]
    MaxBytes {
        /// The path in the cell.
        guest: String,
        /// The entry's path (truncated).
        path: String,
        /// The cap.
        max: u64,
    },
    /// A file is larger than the free space of the destination's filesystem.
    #[error(
        "--output {guest}: {path} ({size} bytes) does not fit on the destination's filesystem"
    )]
    NoSpace {
        /// The path in the cell.
        guest: String,
        /// The entry's path (truncated).
        path: String,
        /// Its declared size.
        size: u64,
    },
    /// Data came outside a file.
    #[error("--output {guest}: the cell sent data outside a file")]
    DataOutsideFile {
        /// The path in the cell.
        guest: String,
    },
    /// A file got more data than its declared size.
    #[error(
        "--output {guest}: the cell sent more than the {declared} bytes it declared for {}; \
         stopped",
        file.display()
    )]
    TooMuchData {
        /// The path in the cell.
        guest: String,
        /// The file.
        file: PathBuf,
        /// Its declared size.
        declared: u64,
    },
    /// Writing a file in the staging directory failed.
    #[error("--output {guest}: writing {}: {source}", file.display())]
    Write {
        /// The path in the cell.
        guest: String,
        /// The file.
        file: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file ended that never began.
    #[error("--output {guest}: the cell ended a file it never began")]
    EndWithoutBegin {
        /// The path in the cell.
        guest: String,
    },
    /// A file ended short of its declared size.
    #[error(
        "--output {guest}: the cell sent {written} bytes for {}, not the {declared} it declared",
        file.display()
    )]
    SizeMismatch {
        /// The path in the cell.
        guest: String,
        /// The file.
        file: PathBuf,
        /// Bytes received.
        written: u64,
        /// Its declared size.
        declared: u64,
    },
    /// The copy ended inside a file.
    #[error("--output {guest}: the cell stopped in the middle of a file")]
    Unfinished {
        /// The path in the cell.
        guest: String,
    },
    /// The copy ended before any entry.
    #[error("--output {guest}: the cell sent nothing")]
    Nothing {
        /// The path in the cell.
        guest: String,
    },
    /// The agent reported an error (its message, truncated).
    #[error("--output {guest}: {message}")]
    Refused {
        /// The path in the cell.
        guest: String,
        /// The agent's message.
        message: String,
    },
    /// The cell sent a message that has no place in a copy.
    #[error("--output {guest}: unexpected message {message} from the cell")]
    UnexpectedMessage {
        /// The path in the cell.
        guest: String,
        /// The message, described briefly.
        message: String,
    },
    /// The directory an output goes into does not exist.
    #[error("directory {} does not exist", path.display())]
    NoDirectory {
        /// The directory.
        path: PathBuf,
    },
}

/// Default cap on the files and directories all `--output`s of one run may create.
pub const DEFAULT_OUTPUT_MAX_ENTRIES: u64 = 100_000;
/// Default bound on copying all inputs, and separately all outputs.
pub const DEFAULT_COPY_TIMEOUT_SECS: u64 = 600;

/// Mode of every file copied out (0755 if the cell marked it executable).
const FILE_MODE: u32 = 0o644;
/// Mode of every directory copied out.
const DIR_MODE: u32 = 0o755;

/// What the outputs of one run may still use, and until when.
#[derive(Debug)]
pub struct OutputBudget {
    /// Bytes left.
    pub bytes: u64,
    /// Entries (files and directories) left.
    pub entries: u64,
    /// The configured caps, for messages.
    pub max_bytes: u64,
    /// See `max_bytes`.
    pub max_entries: u64,
    /// When copying out must have ended.
    pub deadline: Instant,
    /// The configured bound, for messages.
    pub timeout: Duration,
}

impl OutputBudget {
    /// A budget of `max_bytes` and `max_entries`, ending `timeout` from now.
    pub fn new(max_bytes: u64, max_entries: u64, timeout: Duration) -> Self {
        OutputBudget {
            bytes: max_bytes,
            entries: max_entries,
            max_bytes,
            max_entries,
            deadline: deadline_in(timeout),
            timeout,
        }
    }
}

/// Copies `host` (a file or a directory tree) to `guest` in the cell, by `deadline`.
pub fn put(
    link: &mut AgentLink,
    host: &Path,
    guest: &str,
    deadline: Instant,
) -> Result<(), TransferError> {
    let meta = fs::metadata(host).map_err(input(host))?;
    if meta.is_dir() {
        put_dir(link, host, guest, deadline)
    } else {
        put_file(link, host, guest, deadline)
    }
}

fn put_dir(
    link: &mut AgentLink,
    host: &Path,
    guest: &str,
    deadline: Instant,
) -> Result<(), TransferError> {
    let mode = fs::metadata(host).map(|m| m.mode() & 0o7777).unwrap_or(0o755);
    link.send(&Message::MakeDir { path: guest.to_owned(), mode })?;
    reply(link, guest, deadline)?;
    let mut entries: Vec<_> =
        fs::read_dir(host).map_err(input(host))?.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            return Err(TransferError::NotUtf8 { path: e.path() });
        };
        let child = format!("{}/{name}", guest.trim_end_matches('/'));
        let meta = fs::metadata(e.path()).map_err(input(&e.path()))?;
        if meta.is_dir() {
            put_dir(link, &e.path(), &child, deadline)?;
        } else if meta.is_file() {
            put_file(link, &e.path(), &child, deadline)?;
        }
        // FIFOs, sockets and devices inside a tree are not copied: reading one could block
        // forever or never end.
    }
    Ok(())
}

/// [`TransferError::HostFile`] for `path`, named by `flag`, for `map_err`.
fn host_file<'a>(
    flag: &'a str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> TransferError + 'a {
    move |source| TransferError::HostFile { flag: flag.to_owned(), path: path.to_owned(), source }
}

/// [`host_file`] for `--input`.
fn input(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
    host_file("--input", path)
}

/// Opens a host file named by `flag` without blocking (a FIFO put in its place after the
/// options were checked must not hang us) and checks that what was opened is a regular file.
pub fn open_regular(flag: &str, path: &Path) -> Result<(File, fs::Metadata), TransferError> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(host_file(flag, path))?;
    let meta = f.metadata().map_err(host_file(flag, path))?;
    if !meta.is_file() {
        return Err(TransferError::NotRegular { flag: flag.to_owned(), path: path.to_owned() });
    }
    Ok((f, meta))
}

fn put_file(
    link: &mut AgentLink,
    host: &Path,
    guest: &str,
    deadline: Instant,
) -> Result<(), TransferError> {
    let (f, meta) = open_regular("--input", host)?;
    let size = meta.len();
    let what = format!("--input {}", host.display());
    let sent = send_file(link, f, size, meta.mode(), guest, &what)?;
    if sent != size {
        return Err(TransferError::Changed { path: host.to_owned() });
    }
    reply(link, guest, deadline)
}

/// Sends `PutFile` and up to `size` bytes of `data` as `Data` chunks, then `DataEnd`; returns
/// how many bytes there were. Read errors name `what`.
fn send_file(
    link: &mut AgentLink,
    mut data: impl Read,
    size: u64,
    mode: u32,
    guest: &str,
    what: &str,
) -> Result<u64, TransferError> {
    link.send(&Message::PutFile { path: guest.to_owned(), mode: mode & 0o7777, size })?;
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut sent = 0u64;
    while sent < size {
        let want = usize::try_from(size - sent).unwrap_or(usize::MAX).min(buf.len());
        let n = data
            .read(&mut buf[..want])
            .map_err(|source| TransferError::Read { what: what.to_owned(), source })?;
        if n == 0 {
            break;
        }
        sent += n as u64;
        link.send(&Message::Data(buf[..n].to_vec()))?;
    }
    link.send(&Message::DataEnd)?;
    Ok(sent)
}

/// Writes `size` bytes from `data` to the file `guest` in the cell (mode `mode`; parents are
/// made), by `deadline`. For callers whose data is not a host file (an uploaded tar entry).
pub fn put_reader(
    link: &mut AgentLink,
    data: impl Read,
    size: u64,
    mode: u32,
    guest: &str,
    deadline: Instant,
) -> Result<(), TransferError> {
    let sent = send_file(link, data, size, mode, guest, guest)?;
    if sent != size {
        return Err(TransferError::Short { guest: guest.to_owned(), sent, size });
    }
    reply(link, guest, deadline)
}

/// Makes directory `guest` (and its parents) in the cell with `mode`, by `deadline`.
pub fn make_dir(
    link: &mut AgentLink,
    guest: &str,
    mode: u32,
    deadline: Instant,
) -> Result<(), TransferError> {
    link.send(&Message::MakeDir { path: guest.to_owned(), mode: mode & 0o7777 })?;
    reply(link, guest, deadline)
}

fn reply(link: &mut AgentLink, what: &str, deadline: Instant) -> Result<(), TransferError> {
    match link.expect_by(deadline, what)? {
        Message::Done => Ok(()),
        Message::Error { message } => Err(TransferError::InCell(message)),
        other => {
            Err(TransferError::UnexpectedReply { reply: describe(&other), what: what.to_owned() })
        }
    }
}

/// A short description of a message from the cell (never its whole payload).
fn describe(m: &Message) -> String {
    match m {
        Message::Data(d) => format!("Data ({} bytes)", d.len()),
        Message::Stdout(d) | Message::Stderr(d) | Message::Stdin(d) => {
            format!("output ({} bytes)", d.len())
        }
        other => {
            let mut s = format!("{other:?}");
            s.truncate(120);
            s
        }
    }
}

/// Checks a relative path from the cell: no `..`, no root, nothing odd.
fn safe_relative(rel: &str) -> Result<PathBuf, TransferError> {
    let p = Path::new(rel);
    let ok = p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && !rel.contains('\0');
    if ok && !rel.is_empty() {
        Ok(p.components().filter(|c| matches!(c, Component::Normal(_))).collect())
    } else {
        Err(TransferError::UnsafePath(truncated(rel).to_owned()))
    }
}

fn truncated(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn cstring(p: &Path) -> Result<CString, TransferError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| TransferError::Nul { path: p.to_owned() })
}

/// Opens `rel` beneath the directory `dir` without following any link, `..` or mount crossing
/// out of it. `flags` are open(2) flags.
fn open_beneath(dir: RawFd, rel: &Path, flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
    let path = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data; all-zero is valid and the fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.mode = u64::from(mode);
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `path` is a NUL-terminated string and `how` a fully initialised open_how that
    // both outlive the call; the size passed is that of `how`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat2 just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates the directory `rel` beneath `dir` (its parent must exist there, reached without
/// following links).
fn mkdir_beneath(dir: RawFd, rel: &Path) -> std::io::Result<()> {
    let (parent, name) = split(rel)?;
    let parent_fd = match parent {
        Some(p) => Some(open_beneath(dir, p, libc::O_PATH | libc::O_DIRECTORY, 0)?),
        None => None,
    };
    let at = parent_fd.as_ref().map_or(dir, AsRawFd::as_raw_fd);
    let name = CString::new(name.as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: mkdirat with a directory descriptor we hold and a NUL-terminated name.
    if unsafe { libc::mkdirat(at, name.as_ptr(), DIR_MODE) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn split(rel: &Path) -> std::io::Result<(Option<&Path>, &std::ffi::OsStr)> {
    let name = rel.file_name().ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
    Ok((parent, name))
}

/// Free bytes on the filesystem of `fd`, if the kernel says.
fn free_bytes(fd: RawFd) -> Option<u64> {
    // SAFETY: statvfs is plain data; zeroed is a valid value that fstatvfs overwrites.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs writes into `st`, which lives across the call.
    if unsafe { libc::fstatvfs(fd, &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Where one output goes: a staging directory beside the destination, and the final name.
struct Staging {
    /// The staging directory (`DEST_PARENT/.isocell-output-ID`), created by us, mode 0700.
    dir: PathBuf,
    fd: OwnedFd,
    /// Where the copy goes once complete.
    dest: PathBuf,
    done: bool,
}

/// Name of the copy inside the staging directory.
const STAGED: &str = "data";

impl Staging {
    fn new(dest: PathBuf) -> Result<Staging, TransferError> {
        let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let dir = parent.join(format!(".isocell-output-{}", crate::vmm_process::new_id()));
        if let Err(source) = fs::DirBuilder::new().mode(0o700).create(&dir) {
            return Err(TransferError::Staging { dest, dir, source });
        }
        let fd = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&dir)
        {
            Ok(f) => OwnedFd::from(f),
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                return Err(TransferError::Output { path: dir, source: e });
            }
        };
        Ok(Staging { dir, fd, dest, done: false })
    }

    /// Moves the complete copy into place. A file replaces an existing file (or link: the
    /// link itself, never its target); a directory takes the place of nothing or of an empty
    /// directory, never merges into a full one.
    fn commit(mut self) -> Result<(), TransferError> {
        let from = cstring(&self.dir.join(STAGED))?;
        let to = cstring(&self.dest)?;
        // SAFETY: rename with two NUL-terminated paths that outlive the call.
        if unsafe { libc::rename(from.as_ptr(), to.as_ptr()) } != 0 {
            let err = std::io::Error::last_os_error();
            let dest = self.dest.clone();
            return Err(match err.raw_os_error() {
                Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => TransferError::NotEmpty { dest },
                Some(libc::EISDIR) | Some(libc::ENOTDIR) => TransferError::OtherKind { dest },
                _ => TransferError::Output { path: dest, source: err },
            });
        }
        self.done = true;
        let _ = fs::remove_dir(&self.dir);
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            // remove_dir_all does not follow links; everything inside was created by us.
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The file being received.
struct Incoming {
    file: File,
    rel: PathBuf,
    declared: u64,
    written: u64,
}

/// Copies `guest` (file or tree) out of the cell to `host`, within `budget`. On error the
/// connection is out of step: the caller must not use it for anything but `Shutdown`.
pub fn get(
    link: &mut AgentLink,
    guest: &str,
    host: &Path,
    budget: &mut OutputBudget,
) -> Result<(), TransferError> {
    // A single file copied onto an existing directory lands inside it (decided on the first
    // entry, when the kind is known).
    let into_dir = fs::metadata(host).is_ok_and(|m| m.is_dir());
    let guest_name = Path::new(guest).file_name().map(PathBuf::from);
    link.send(&Message::GetPath { path: guest.to_owned() })?;
    let mut staging: Option<Staging> = None;
    let mut current: Option<Incoming> = None;
    let g = || guest.to_owned();
    loop {
        let msg = link.expect_by(budget.deadline, guest).map_err(|e| {
            if Instant::now() >= budget.deadline {
                TransferError::Timeout { guest: g(), secs: budget.timeout.as_secs() }
            } else {
                e.into()
            }
        })?;
        match msg {
            Message::Entry { path, kind, mode, size } => {
                if current.is_some() {
                    return Err(TransferError::EntryInFile { guest: g() });
                }
                budget.entries = budget.entries.checked_sub(1).ok_or_else(|| {
                    TransferError::MaxEntries { guest: g(), max: budget.max_entries }
                })?;
                let rel = safe_relative(&path)?;
                let is_root = rel.as_os_str().is_empty();
                let short = || truncated(&path).to_owned();
                if staging.is_none() != is_root {
                    return Err(TransferError::OutOfOrder { guest: g(), path: short() });
                }
                if is_root {
                    let dest = match (&guest_name, kind) {
                        (Some(name), EntryKind::File) if into_dir => host.join(name),
                        _ => host.to_owned(),
                    };
                    staging = Some(Staging::new(dest)?);
                }
                let Some(stage) = &staging else { continue };
                let at = if is_root { PathBuf::from(STAGED) } else { Path::new(STAGED).join(&rel) };
                match kind {
                    EntryKind::Dir => {
                        mkdir_beneath(stage.fd.as_raw_fd(), &at).map_err(|source| {
                            TransferError::Create { guest: g(), path: short(), source }
                        })?
                    }
                    EntryKind::File => {
                        if size > budget.bytes {
                            return Err(TransferError::MaxBytes {
                                guest: g(),
                                path: short(),
                                max: budget.max_bytes,
                            });
                        }
                        if free_bytes(stage.fd.as_raw_fd()).is_some_and(|free| size > free) {
                            return Err(TransferError::NoSpace { guest: g(), path: short(), size });
                        }
                        let file_mode = if mode & 0o111 != 0 { 0o755 } else { FILE_MODE };
                        let fd =
                            open_beneath(
                                stage.fd.as_raw_fd(),
                                &at,
                                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                                file_mode,
                            )
                            .map_err(|source| {
                                TransferError::Create { guest: g(), path: short(), source }
                            })?;
                        // The root of a single-file output is named after the cell's path.
                        let rel = if is_root { PathBuf::from(guest) } else { rel };
                        current = Some(Incoming {
                            file: File::from(fd),
                            rel,
                            declared: size,
                            written: 0,
                        });
                    }
                }
            }
            Message::Data(bytes) => {
                let Some(cur) = &mut current else {
                    return Err(TransferError::DataOutsideFile { guest: g() });
                };
                let n = bytes.len() as u64;
                if cur.written.saturating_add(n) > cur.declared {
                    return Err(TransferError::TooMuchData {
                        guest: g(),
                        file: cur.rel.clone(),
                        declared: cur.declared,
                    });
                }
                if let Err(source) = cur.file.write_all(&bytes) {
                    return Err(TransferError::Write { guest: g(), file: cur.rel.clone(), source });
                }
                cur.written += n;
                budget.bytes = budget.bytes.saturating_sub(n);
            }
            Message::DataEnd => {
                let Some(cur) = current.take() else {
                    return Err(TransferError::EndWithoutBegin { guest: g() });
                };
                if cur.written != cur.declared {
                    return Err(TransferError::SizeMismatch {
                        guest: g(),
                        file: cur.rel,
                        written: cur.written,
                        declared: cur.declared,
                    });
                }
            }
            Message::Done => {
                if current.is_some() {
                    return Err(TransferError::Unfinished { guest: g() });
                }
                return match staging {
                    Some(s) => s.commit(),
                    None => Err(TransferError::Nothing { guest: g() }),
                };
            }
            Message::Error { message } => {
                return Err(TransferError::Refused {
                    guest: g(),
                    message: truncated(&message).to_owned(),
                })
            }
            other => {
                return Err(TransferError::UnexpectedMessage {
                    guest: g(),
                    message: describe(&other),
                })
            }
        }
    }
}

/// The host path an output goes to, checked before anything starts: its directory must exist.
pub fn check_output_dest(host: &Path) -> Result<(), TransferError> {
    let parent = host.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(TransferError::NoDirectory { path: parent.to_owned() });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_from_the_cell_stay_inside() {
        assert!(safe_relative("a/b.txt").is_ok());
        assert_eq!(safe_relative(".").ok(), Some(PathBuf::new()));
        assert_eq!(safe_relative("./a/./b").ok(), Some(PathBuf::from("a/b")));
        assert!(safe_relative("../etc/passwd").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a/../../x").is_err());
        assert!(safe_relative("").is_err());
    }

    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    use isocell_proto::{read_frame, write_frame, PROTOCOL_VERSION};

    /// A scratch directory removed at the end of the test.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new() -> Self {
            let d =
                std::env::temp_dir().join(format!("isocell-xfer-{}", crate::vmm_process::new_id()));
            fs::create_dir_all(&d).unwrap();
            Scratch(d)
        }
        /// Everything in the directory, by name.
        fn names(&self, sub: &str) -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(self.0.join(sub))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A hostile agent: says hello, waits for the host's request, sends `script`, then keeps
    /// the connection open and silent until the host goes away.
    fn hostile_agent(script: Vec<Message>) -> AgentLink {
        let (host, agent) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut agent = agent;
            write_frame(
                &mut agent,
                &Message::Hello { version: PROTOCOL_VERSION, agent: "x".into() },
            )
            .unwrap();
            let mut reader = std::io::BufReader::new(agent.try_clone().unwrap());
            let _welcome = read_frame(&mut reader);
            let _request = read_frame(&mut reader);
            for m in script {
                if write_frame(&mut agent, &m).is_err() {
                    return;
                }
            }
            // Silence until the host closes its end.
            while let Ok(Some(_)) = read_frame(&mut reader) {}
        });
        AgentLink::handshake(host, Duration::from_secs(10)).unwrap().0
    }

    fn entry(path: &str, kind: EntryKind, mode: u32, size: u64) -> Message {
        Message::Entry { path: path.into(), kind, mode, size }
    }

    fn budget() -> OutputBudget {
        OutputBudget::new(1 << 30, 1000, Duration::from_secs(30))
    }

    #[test]
    fn output_never_follows_links_in_the_destination() {
        let t = Scratch::new();
        fs::write(t.0.join("victim"), "keep").unwrap();
        fs::create_dir(t.0.join("victim-dir")).unwrap();
        fs::create_dir(t.0.join("dst")).unwrap();
        std::os::unix::fs::symlink(t.0.join("victim"), t.0.join("dst/f")).unwrap();
        std::os::unix::fs::symlink(t.0.join("victim-dir"), t.0.join("dst/sub")).unwrap();
        let script = vec![
            entry(".", EntryKind::Dir, 0o755, 0),
            entry("f", EntryKind::File, 0o644, 5),
            Message::Data(b"owned".to_vec()),
            Message::DataEnd,
            entry("sub", EntryKind::Dir, 0o755, 0),
            entry("sub/planted", EntryKind::File, 0o644, 1),
            Message::Data(b"x".to_vec()),
            Message::DataEnd,
            Message::Done,
        ];
        // Into the existing directory full of links: refused, nothing written through them.
        let err = get(&mut hostile_agent(script.clone()), "/o", &t.0.join("dst"), &mut budget())
            .unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        assert_eq!(fs::read_to_string(t.0.join("victim")).unwrap(), "keep");
        assert!(t.names("victim-dir").is_empty());
        // Into a new path: the copy is complete and holds plain files only.
        get(&mut hostile_agent(script), "/o", &t.0.join("new"), &mut budget()).unwrap();
        assert_eq!(fs::read_to_string(t.0.join("new/f")).unwrap(), "owned");
        assert!(fs::symlink_metadata(t.0.join("new/sub")).unwrap().is_dir());
        assert_eq!(t.names(""), ["dst", "new", "victim", "victim-dir"]);
        // A single file onto a link replaces the link, never writes its target.
        std::os::unix::fs::symlink(t.0.join("victim"), t.0.join("link")).unwrap();
        let one = vec![
            entry(".", EntryKind::File, 0o644, 3),
            Message::Data(b"new".to_vec()),
            Message::DataEnd,
            Message::Done,
        ];
        get(&mut hostile_agent(one), "/o/file", &t.0.join("link"), &mut budget()).unwrap();
        assert_eq!(fs::read_to_string(t.0.join("victim")).unwrap(), "keep");
        assert!(fs::symlink_metadata(t.0.join("link")).unwrap().is_file());
    }

    #[test]
    fn modes_come_from_policy_not_from_the_cell() {
        let t = Scratch::new();
        let script = vec![
            entry(".", EntryKind::Dir, 0o777, 0),
            entry("a", EntryKind::File, 0o6777, 0),
            Message::DataEnd,
            entry("b", EntryKind::File, 0o666, 0),
            Message::DataEnd,
            Message::Done,
        ];
        get(&mut hostile_agent(script), "/o", &t.0.join("d"), &mut budget()).unwrap();
        let mode = |p: &str| fs::metadata(t.0.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("d/a") & !0o022, 0o755);
        assert_eq!(mode("d/b") & !0o022, 0o644);
        assert_eq!(mode("d") & 0o7000, 0);
    }

    /// Each hostile reply fails the copy and leaves nothing in the destination directory.
    #[test]
    fn hostile_replies_fail_and_leave_nothing() {
        let big = || Message::Data(vec![0; MAX_CHUNK]);
        let cases: Vec<(&str, Vec<Message>, OutputBudget)> = vec![
            (
                "more than the 1 bytes it declared",
                vec![entry(".", EntryKind::File, 0o644, 1)]
                    .into_iter()
                    .chain(std::iter::repeat_with(big).take(20))
                    .collect(),
                budget(),
            ),
            (
                "not the",
                vec![
                    entry(".", EntryKind::File, 0o644, 10),
                    Message::Data(vec![1; 3]),
                    Message::DataEnd,
                    Message::Done,
                ],
                budget(),
            ),
            (
                "--output-max-bytes",
                vec![
                    entry(".", EntryKind::Dir, 0o755, 0),
                    entry("a", EntryKind::File, 0o644, 4096),
                    Message::Data(vec![1; 4096]),
                    Message::DataEnd,
                    entry("b", EntryKind::File, 0o644, 4096),
                ],
                OutputBudget::new(6000, 1000, Duration::from_secs(30)),
            ),
            (
                "--output-max-entries",
                std::iter::once(entry(".", EntryKind::Dir, 0o755, 0))
                    .chain((0..50).map(|i| entry(&format!("d{i}"), EntryKind::Dir, 0o755, 0)))
                    .collect(),
                OutputBudget::new(1 << 30, 10, Duration::from_secs(30)),
            ),
            (
                "--copy-timeout",
                vec![entry(".", EntryKind::File, 0o644, 10), Message::Data(vec![1; 3])],
                OutputBudget::new(1 << 30, 10, Duration::from_millis(300)),
            ),
            (
                "unsafe path",
                vec![
                    entry(".", EntryKind::Dir, 0o755, 0),
                    entry("../escape", EntryKind::File, 0, 0),
                ],
                budget(),
            ),
            ("out of order", vec![entry("x", EntryKind::File, 0o644, 0)], budget()),
            ("outside a file", vec![Message::Data(vec![1])], budget()),
            ("unexpected", vec![Message::Exited(isocell_proto::ExitStatus::Code(0))], budget()),
        ];
        for (expect, script, mut b) in cases {
            let t = Scratch::new();
            let err = get(&mut hostile_agent(script), "/o", &t.0.join("out"), &mut b).unwrap_err();
            assert!(err.to_string().contains(expect), "expected {expect:?}, got {err}");
            assert!(t.names("").is_empty(), "{expect}: left {:?}", t.names(""));
        }
    }

    /// Any message the cell may send during a copy, with paths an attacker would pick.
    fn any_reply() -> impl proptest::strategy::Strategy<Value = Message> {
        use proptest::prelude::*;
        let path = prop_oneof![
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("../x".to_owned()),
            Just("/etc/x".to_owned()),
            Just("a/../../x".to_owned()),
            Just("".to_owned()),
            "[a-c]{1,2}(/[a-c]{1,2}){0,2}",
        ];
        let kind = prop_oneof![Just(EntryKind::File), Just(EntryKind::Dir)];
        prop_oneof![
            (path, kind, any::<u32>(), 0u64..5000)
                .prop_map(|(path, kind, mode, size)| Message::Entry { path, kind, mode, size }),
            proptest::collection::vec(any::<u8>(), 0..3000).prop_map(Message::Data),
            Just(Message::DataEnd),
            Just(Message::Done),
            ".{0,40}".prop_map(|message| Message::Error { message }),
            Just(Message::Stdout(vec![1, 2, 3])),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]
        /// Whatever the cell replies, `get` ends (within its budget), writes nothing outside
        /// the destination's directory, and leaves either a complete copy or nothing.
        #[test]
        fn any_reply_sequence_is_contained(
            script in proptest::collection::vec(any_reply(), 0..40),
            max_bytes in 0u64..20_000,
        ) {
            let t = Scratch::new();
            fs::create_dir(t.0.join("dest-parent")).unwrap();
            let mut b = OutputBudget::new(max_bytes, 30, Duration::from_millis(200));
            let dest = t.0.join("dest-parent/out");
            let result = get(&mut hostile_agent(script), "/o", &dest, &mut b);
            // Nothing beside the destination's directory, nothing staged left behind.
            proptest::prop_assert_eq!(t.names(""), vec!["dest-parent".to_owned()]);
            let left = t.names("dest-parent");
            match result {
                Ok(()) => {
                    proptest::prop_assert_eq!(left, vec!["out".to_owned()]);
                    // A complete copy holds plain files and directories within the byte cap.
                    fn bytes(p: &Path) -> u64 {
                        let m = fs::symlink_metadata(p).unwrap();
                        assert!(m.is_file() || m.is_dir(), "{} is neither", p.display());
                        if m.is_dir() {
                            fs::read_dir(p).unwrap().map(|e| bytes(&e.unwrap().path())).sum()
                        } else {
                            m.len()
                        }
                    }
                    proptest::prop_assert!(bytes(&dest) <= max_bytes);
                }
                Err(_) => proptest::prop_assert!(left.is_empty(), "left {:?}", left),
            }
        }
    }

    #[test]
    fn input_refuses_devices_and_fifos() {
        assert!(open_regular("--input", Path::new("/dev/zero"))
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));
        let t = Scratch::new();
        let fifo = cstring(&t.0.join("fifo")).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // Opened without blocking, and refused.
        assert!(open_regular("--input", &t.0.join("fifo"))
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));
    }

    #[test]
    fn opening_beneath_refuses_links_and_escapes() {
        let dir =
            std::env::temp_dir().join(format!("isocell-beneath-{}", crate::vmm_process::new_id()));
        fs::create_dir_all(dir.join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.join("flink")).unwrap();
        let root = OwnedFd::from(File::open(&dir).unwrap());
        let create = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        assert!(open_beneath(root.as_raw_fd(), Path::new("real/f"), create, 0o644).is_ok());
        // Exclusive: an existing file is not opened again.
        assert!(open_beneath(root.as_raw_fd(), Path::new("real/f"), create, 0o644).is_err());
        assert!(open_beneath(root.as_raw_fd(), Path::new("link/planted"), create, 0o644).is_err());
        assert!(open_beneath(root.as_raw_fd(), Path::new("flink"), libc::O_WRONLY, 0).is_err());
        assert!(mkdir_beneath(root.as_raw_fd(), Path::new("link/sub")).is_err());
        assert!(mkdir_beneath(root.as_raw_fd(), Path::new("real/sub")).is_ok());
        assert!(!Path::new("/etc/planted").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
