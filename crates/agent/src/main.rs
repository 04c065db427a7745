//! `isocell-agent`: PID 1 of every cell, started from the host's initramfs (as `/init`). It
//! tells the VMM's boot timer that init is running, mounts the cell image named on the kernel
//! command line read-only under a tmpfs overlay and switches into it, writes the cell's own
//! /etc files, sets up the cell's network (see `net`), connects to the host over vsock and
//! serves the host's requests (see `isocell-proto`), then powers the cell off. Whatever goes
//! wrong, it says so in one line on the console and stops the VM: a cell never outlives its
//! purpose.

mod boot;
mod exec;
mod files;
mod identity;
mod mounts;
mod net;
mod reseed;
mod session;

use std::fs::OpenOptions;
use std::io::BufReader;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isocell_proto::{read_frame, write_frame, Message, AGENT_PORT, PROTOCOL_VERSION};
use isocell_spec::vm::{BOOT_TIMER_ADDR, BOOT_TIMER_MAGIC, VSOCK_HOST_CID};
use vsock::VsockStream;

/// How long to keep trying to reach the host before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent's half of the connection to the host; frames are written whole under the lock,
/// so output from several threads never interleaves inside a frame.
pub struct Link {
    writer: Mutex<VsockStream>,
}

impl Link {
    /// Sends one message; `false` if the host is gone.
    pub fn send(&self, msg: &Message) -> bool {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *w, msg).is_ok()
    }
}

/// Says one line on the console.
pub fn log(msg: &str) {
    eprintln!("isocell-agent: {msg}");
}

/// Writes the magic byte to the VMM's boot-timer register through /dev/mem.
fn signal_boot_timer() {
    let Ok(mem) =
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_SYNC).open("/dev/mem")
    else {
        log("cannot open /dev/mem; boot time not recorded");
        return;
    };
    let Ok(offset) = libc::off_t::try_from(BOOT_TIMER_ADDR) else { return };
    // SAFETY: maps one page of the boot-timer's MMIO window, which nothing else in this process
    // references; the result is checked before use.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            offset,
        )
    };
    if page == libc::MAP_FAILED {
        log("cannot map the boot timer; boot time not recorded");
        return;
    }
    // SAFETY: `page` is a live, writable, page-sized mapping; one volatile byte store is one
    // MMIO write to the register, and the mapping is removed right after.
    unsafe {
        std::ptr::write_volatile(page.cast::<u8>(), BOOT_TIMER_MAGIC);
        libc::munmap(page, 4096);
    }
}

fn connect() -> Option<VsockStream> {
    let start = Instant::now();
    loop {
        match VsockStream::connect_with_cid_port(VSOCK_HOST_CID as u32, AGENT_PORT) {
            Ok(s) => return Some(s),
            Err(e) if start.elapsed() > CONNECT_TIMEOUT => {
                log(&format!("cannot reach the host on vsock port {AGENT_PORT}: {e}"));
                return None;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Serves the host until it asks for shutdown or goes away.
fn serve(stream: VsockStream) -> Result<(), String> {
    let reader = stream.try_clone().map_err(|e| format!("vsock: {e}"))?;
    let mut reader = BufReader::with_capacity(128 * 1024, reader);
    let link = Arc::new(Link { writer: Mutex::new(stream) });
    let agent = format!("isocell-agent {}", env!("CARGO_PKG_VERSION"));
    link.send(&Message::Hello { version: PROTOCOL_VERSION, agent });
    match read_frame(&mut reader) {
        Ok(Some(Message::Welcome { version })) if version == PROTOCOL_VERSION => {}
        Ok(Some(Message::Welcome { version })) => {
            return Err(format!("host speaks protocol {version}, agent {PROTOCOL_VERSION}"))
        }
        other => return Err(format!("no welcome from the host: {other:?}")),
    }

    let mut running: Option<exec::Running> = None;
    loop {
        let msg = match read_frame(&mut reader) {
            Ok(Some(m)) => m,
            Ok(None) => return Err("the host closed the connection".into()),
            Err(e) => return Err(format!("reading from the host: {e}")),
        };
        let reply = match msg {
            // Only a cell that has run nothing may be saved. The saved cell never resumes; each
            // copy goes on from here on this same connection, its new host's `Reseed` first.
            Message::PrepareSnapshot if running.is_none() => {
                Some(result_message(session::prepare_snapshot()))
            }
            Message::PrepareSnapshot => {
                Some(Message::Error { message: "this cell has run a command".into() })
            }
            Message::Reseed { entropy, unix_time_ns } => {
                Some(result_message(reseed::reseed(&entropy, unix_time_ns)))
            }
            Message::Exec(req) => {
                if running.as_ref().is_some_and(|r| !r.finished()) {
                    Some(Message::Error { message: "a command is already running".into() })
                } else {
                    match exec::spawn(&req, &link, None, None) {
                        Ok(r) => {
                            running = Some(r);
                            None
                        }
                        Err(e) => {
                            let program = req.argv.first().map_or("", String::as_str);
                            Some(exec::failure_message(&e, program))
                        }
                    }
                }
            }
            Message::Stdin(data) => {
                if let Some(r) = &mut running {
                    r.write_stdin(&data);
                }
                None
            }
            Message::StdinEof => {
                if let Some(r) = &mut running {
                    r.close_stdin();
                }
                None
            }
            Message::Signal(sig) => {
                if let Some(r) = &running {
                    r.signal(sig);
                }
                None
            }
            Message::Shutdown => {
                if let Some(r) = &mut running {
                    r.signal(libc::SIGKILL);
                    r.wait_sent();
                }
                return Ok(());
            }
            other => file_operation(other, &mut reader, &link),
        };
        if let Some(reply) = reply {
            if !link.send(&reply) {
                return Err("the host went away".into());
            }
        }
    }
}

/// Serves a file operation (the same on the control connection and on session connections);
/// anything else is answered with an error.
pub fn file_operation(
    msg: Message,
    reader: &mut impl std::io::Read,
    link: &Link,
) -> Option<Message> {
    if let Err(message) = reseed::require_reseeded() {
        if matches!(msg, Message::PutFile { .. }) {
            // Its data follows: read past it, so the connection stays in step.
            while let Ok(Some(Message::Data(_))) = read_frame(&mut *reader) {}
        }
        return Some(Message::Error { message });
    }
    Some(match msg {
        Message::PutFile { path, mode, size } => {
            let next = || read_frame(&mut *reader).ok().flatten();
            result_message(files::put_file(&path, mode, size, next))
        }
        Message::MakeDir { path, mode } => result_message(files::make_dir(&path, mode)),
        Message::GetPath { path } => result_message(files::get_path(&path, link)),
        Message::MakeReadOnly { path } => result_message(mounts::make_read_only(&path)),
        other => Message::Error { message: format!("unexpected message {other:?}") },
    })
}

fn result_message(r: Result<(), String>) -> Message {
    match r {
        Ok(()) => Message::Done,
        Err(message) => Message::Error { message },
    }
}

/// Stops the VM: the cell kernel has no ACPI, so "power off" is a reboot, which the VMM sees as
/// the guest's reset request and ends the VM with exit status 0.
fn power_off() -> ! {
    // What was said on the console goes out before the machine stops.
    // SAFETY: tcdrain only waits on a descriptor number (an error if it is no terminal).
    unsafe { libc::tcdrain(2) };
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reached if reboot failed (not PID 1, or no privilege): nothing sensible is left.
    std::process::exit(1)
}

fn main() {
    if std::process::id() != 1 {
        log("must run as PID 1 inside a cell");
        std::process::exit(2);
    }
    // First things: /dev and a console, then tell the boot timer that init is running.
    mounts::early();
    signal_boot_timer();
    let args = boot::BootArgs::parse(&mounts::kernel_cmdline());
    for w in &args.warnings {
        log(w);
    }
    if let Err(e) = mounts::set_up(&args) {
        log(&e);
        power_off();
    }
    for problem in identity::set_up(std::path::Path::new("/"), &args.hostname, args.net.egress) {
        log(&problem);
    }
    net::set_up(args.net);
    exec::start_reaper();
    session::listen();
    // One connection for the cell's life: a copy restored from a snapshot goes on with it, as
    // the VMM hands the guest's saved connection to its new host.
    if let Some(stream) = connect() {
        if let Err(e) = serve(stream) {
            log(&e);
        }
    }
    power_off();
}
