//! Sessions: commands the host starts over connections it opens to [`SESSION_PORT`], any
//! number at once. A session's command outlives its connection (a host that restarts finds
//! it again by id); its exit status stays here until [`MAX_SESSIONS`] newer sessions push it
//! out, for `WaitSession` to collect.

use std::collections::{HashMap, VecDeque};
use std::io::BufReader;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use isocell_proto::{read_frame, ExecRequest, ExitStatus, Message, WindowSize, SESSION_PORT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vsock::{VsockListener, VsockStream, VMADDR_CID_ANY};

use crate::{exec, file_operation, log, Link};

/// Most sessions the agent remembers, running or ended; the oldest ended ones are forgotten
/// first. A new session is refused while this many are still running.
pub const MAX_SESSIONS: usize = 1024;

/// A session: its command's process group, and its status once it ended.
struct Session {
    pid: i32,
    status: Option<ExitStatus>,
}

#[derive(Default)]
struct Table {
    sessions: HashMap<u64, Session>,
    /// Ids in the order they started, for forgetting the oldest.
    order: VecDeque<u64>,
}

fn table() -> &'static (Mutex<Table>, Condvar) {
    static TABLE: OnceLock<(Mutex<Table>, Condvar)> = OnceLock::new();
    TABLE.get_or_init(|| (Mutex::new(Table::default()), Condvar::new()))
}

fn lock() -> std::sync::MutexGuard<'static, Table> {
    table().0.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks the cell for a snapshot (see [`crate::reseed::mark_for_snapshot`]) if no session has
/// ever run in it. Under the table's lock, so a session cannot start in between: either it
/// was reserved first and the snapshot is refused, or the mark came first and the session is.
pub fn prepare_snapshot() -> Result<(), String> {
    let t = lock();
    if !t.sessions.is_empty() {
        return Err("a session has run in this cell".into());
    }
    crate::reseed::mark_for_snapshot();
    Ok(())
}

/// Claims `id` for a new session; an error message if it cannot be.
fn reserve(id: u64) -> Result<(), String> {
    let mut t = lock();
    crate::reseed::require_reseeded()?;
    if t.sessions.contains_key(&id) {
        return Err(format!("session {id} already exists in this cell"));
    }
    if t.sessions.len() >= MAX_SESSIONS {
        let ended =
            t.order.iter().position(|i| t.sessions.get(i).is_some_and(|s| s.status.is_some()));
        match ended {
            Some(pos) => {
                if let Some(old) = t.order.remove(pos) {
                    t.sessions.remove(&old);
                }
            }
            None => {
                return Err(format!("{MAX_SESSIONS} sessions are running; wait for one to end"))
            }
        }
    }
    t.sessions.insert(id, Session { pid: 0, status: None });
    t.order.push_back(id);
    Ok(())
}

fn forget(id: u64) {
    let mut t = lock();
    t.sessions.remove(&id);
    t.order.retain(|i| *i != id);
}

fn started(id: u64, pid: i32) {
    if let Some(s) = lock().sessions.get_mut(&id) {
        s.pid = pid;
    }
}

fn ended(id: u64, status: ExitStatus) {
    if let Some(s) = lock().sessions.get_mut(&id) {
        s.status = Some(status);
    }
    table().1.notify_all();
}

/// Blocks until session `id` has ended; `None` if there is no such session.
fn wait(id: u64) -> Option<ExitStatus> {
    let mut t = lock();
    loop {
        match t.sessions.get(&id) {
            None => return None,
            Some(Session { status: Some(s), .. }) => return Some(*s),
            Some(_) => {}
        }
        t = table().1.wait(t).unwrap_or_else(|p| p.into_inner());
    }
}

fn signal(id: u64, signal: i32) -> Result<(), String> {
    let pid = match lock().sessions.get(&id) {
        None => return Err(format!("no session {id} in this cell")),
        Some(Session { status: Some(_), .. }) => return Err(format!("session {id} has ended")),
        Some(s) => s.pid,
    };
    let sig = Signal::try_from(signal).map_err(|_| format!("{signal} is not a signal"))?;
    if pid > 0 {
        let _ = kill(Pid::from_raw(-pid), sig);
    }
    Ok(())
}

/// Accepts session connections for the rest of the agent's life, each on its own thread.
pub fn listen() {
    let listener = match VsockListener::bind_with_cid_port(VMADDR_CID_ANY, SESSION_PORT) {
        Ok(l) => l,
        Err(e) => {
            log(&format!("cannot listen on vsock port {SESSION_PORT}: {e}; no sessions"));
            return;
        }
    };
    let _ = std::thread::Builder::new().name("sessions".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = std::thread::Builder::new().name("session".into()).spawn(move || {
                let _ = serve(stream);
            });
        }
    });
}

/// Serves one session connection.
fn serve(stream: VsockStream) -> Result<(), String> {
    let reader = stream.try_clone().map_err(|e| format!("vsock: {e}"))?;
    let mut reader = BufReader::with_capacity(128 * 1024, reader);
    let link = Arc::new(Link { writer: Mutex::new(stream) });
    loop {
        let msg = match read_frame(&mut reader) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => return Ok(()),
        };
        let reply = match msg {
            Message::ExecSession { id, tty, exec } => {
                return run(id, tty, &exec, &link, &mut reader);
            }
            Message::WaitSession { id } => Some(match wait(id) {
                Some(status) => Message::Exited(status),
                None => Message::Error { message: format!("no session {id} in this cell") },
            }),
            Message::SignalSession { id, signal: sig } => Some(match signal(id, sig) {
                Ok(()) => Message::Done,
                Err(message) => Message::Error { message },
            }),
            other => file_operation(other, &mut reader, &link),
        };
        if let Some(reply) = reply {
            if !link.send(&reply) {
                return Ok(());
            }
        }
    }
}

/// Runs session `id` and forwards the host's input to it until the connection ends; the
/// command keeps running after that.
fn run(
    id: u64,
    tty: Option<WindowSize>,
    req: &ExecRequest,
    link: &Arc<Link>,
    reader: &mut BufReader<VsockStream>,
) -> Result<(), String> {
    if let Err(message) = reserve(id) {
        link.send(&Message::Error { message });
        return Ok(());
    }
    let on_exit: exec::OnExit = Box::new(move |_, status| ended(id, status));
    let mut running = match exec::spawn(req, link, tty, Some(on_exit)) {
        Ok(r) => r,
        Err(e) => {
            forget(id);
            let program = req.argv.first().map_or("", String::as_str);
            link.send(&exec::failure_message(&e, program));
            return Ok(());
        }
    };
    started(id, running.pid());
    loop {
        match read_frame(reader) {
            Ok(Some(Message::Stdin(data))) => running.write_stdin(&data),
            Ok(Some(Message::StdinEof)) => running.close_stdin(),
            Ok(Some(Message::Signal(sig))) => running.signal(sig),
            Ok(Some(Message::Resize(size))) => running.resize(size),
            Ok(Some(other)) => {
                link.send(&Message::Error { message: format!("unexpected message {other:?}") });
            }
            // The host went away: the command goes on without its input.
            Ok(None) | Err(_) => {
                running.close_stdin();
                return Ok(());
            }
        }
    }
}
