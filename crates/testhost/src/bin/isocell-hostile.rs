//! `isocell-hostile`: a hostile program for the end-to-end tests, run as root inside a cell
//! (passed in with `--input`). It does what an attacker in a cell can do, so the tests can check
//! that the host holds:
//!
//! - `protocol MODE`: freezes the agent (ptrace-interrupts every thread of PID 1), takes the
//!   agent's vsock connection (`pidfd_getfd`) and speaks the host protocol itself: `silence`
//!   (says the command exited, then nothing), `oversize` (declares a 1-byte output, sends
//!   20 MiB), `dotdot` (an output entry named `../escape`), `flood` (endless output),
//!   `no-status` (an exit status no command can have), `garbage` (a frame of 4 GiB);
//! - `mmio`: writes garbage to every register of every virtio-mmio window the kernel command
//!   line lists (queue addresses, notify, status, in any order);
//! - `unmapped COUNT`: reads COUNT distinct guest-physical addresses where nothing is mapped,
//!   each one an exit to the VMM.
//!
//! It is a test tool: it is built like every binary of the project (static), never shipped in
//! an image.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use isocell_proto::{encode, EntryKind, ExitStatus, FrameBuffer, Message};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["protocol", mode] => protocol(mode),
        ["mmio"] => mmio(),
        ["unmapped", count] => count.parse().map_err(|e| format!("count: {e}")).and_then(unmapped),
        _ => Err("usage: isocell-hostile protocol MODE | mmio | unmapped COUNT".into()),
    };
    if let Err(e) = result {
        let _ = writeln!(std::io::stderr(), "isocell-hostile: {e}");
        std::process::exit(2);
    }
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Stops every thread of the agent (PID 1) where it is, for as long as this process lives.
fn freeze_agent() -> Result<(), String> {
    let tasks = fs::read_dir("/proc/1/task").map_err(|e| format!("/proc/1/task: {e}"))?;
    for t in tasks.flatten() {
        let Ok(tid) = t.file_name().to_string_lossy().parse::<libc::pid_t>() else { continue };
        // SAFETY: ptrace requests on another process; no memory of ours is passed.
        unsafe {
            if libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) != 0 {
                return Err(os_err(&format!("PTRACE_SEIZE {tid}")));
            }
            if libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) != 0 {
                return Err(os_err(&format!("PTRACE_INTERRUPT {tid}")));
            }
        }
    }
    Ok(())
}

/// A copy of the agent's connection to the host: its first socket descriptor.
fn steal_agent_socket() -> Result<UnixStream, String> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, 1, 0) } as i32;
    if pidfd < 0 {
        return Err(os_err("pidfd_open 1"));
    }
    let mut fds: Vec<i32> = fs::read_dir("/proc/1/fd")
        .map_err(|e| format!("/proc/1/fd: {e}"))?
        .flatten()
        .filter(|e| {
            fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    fds.sort();
    let target = *fds.first().ok_or("the agent holds no socket")?;
    // SAFETY: pidfd_getfd duplicates the agent's descriptor into this process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0) } as i32;
    if fd < 0 {
        return Err(os_err("pidfd_getfd"));
    }
    // SAFETY: a fresh descriptor of a stream socket, owned by nothing else here. A vsock
    // stream reads and writes like a Unix stream; only read/write are used.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

fn send(sock: &mut UnixStream, m: &Message) -> Result<(), String> {
    sock.write_all(&encode(m)).map_err(|e| format!("send: {e}"))
}

/// Waits for the host's next message.
fn next(sock: &mut UnixStream, frames: &mut FrameBuffer) -> Result<Message, String> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(m) = frames.next_message().map_err(|e| format!("bad frame: {e}"))? {
            return Ok(m);
        }
        let n = sock.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the host closed the connection".into());
        }
        frames.push(&buf[..n]);
    }
}

/// Waits for the host's request for an output.
fn await_get_path(sock: &mut UnixStream, frames: &mut FrameBuffer) -> Result<(), String> {
    loop {
        if let Message::GetPath { .. } = next(sock, frames)? {
            return Ok(());
        }
    }
}

fn protocol(mode: &str) -> Result<(), String> {
    println!("hostile: taking over the agent ({mode})");
    let _ = std::io::stdout().flush();
    freeze_agent()?;
    let mut sock = steal_agent_socket()?;
    let mut frames = FrameBuffer::new();
    let exited = Message::Exited(ExitStatus::Code(0));
    match mode {
        "silence" => send(&mut sock, &exited)?,
        "oversize" => {
            send(&mut sock, &exited)?;
            await_get_path(&mut sock, &mut frames)?;
            send(
                &mut sock,
                &Message::Entry { path: ".".into(), kind: EntryKind::File, mode: 0o644, size: 1 },
            )?;
            for _ in 0..320 {
                send(&mut sock, &Message::Data(vec![0x5a; 64 * 1024]))?;
            }
            send(&mut sock, &Message::DataEnd)?;
            send(&mut sock, &Message::Done)?;
        }
        "dotdot" => {
            send(&mut sock, &exited)?;
            await_get_path(&mut sock, &mut frames)?;
            send(
                &mut sock,
                &Message::Entry { path: ".".into(), kind: EntryKind::Dir, mode: 0o755, size: 0 },
            )?;
            send(
                &mut sock,
                &Message::Entry {
                    path: "../escape".into(),
                    kind: EntryKind::File,
                    mode: 0o644,
                    size: 2,
                },
            )?;
            send(&mut sock, &Message::Data(b"x\n".to_vec()))?;
            send(&mut sock, &Message::DataEnd)?;
            send(&mut sock, &Message::Done)?;
        }
        "flood" => loop {
            send(&mut sock, &Message::Stdout(vec![b'f'; 64 * 1024]))?;
        },
        "no-status" => send(&mut sock, &Message::Exited(ExitStatus::Code(-1)))?,
        "garbage" => sock.write_all(&[0xff; 64]).map_err(|e| format!("send: {e}"))?,
        other => return Err(format!("unknown protocol mode {other}")),
    }
    // Hold the connection (and the frozen agent) until the host ends the cell.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// The virtio-mmio windows the kernel was told about: `virtio_mmio.device=4K@0xADDR:IRQ`.
fn mmio_windows() -> Result<Vec<(u64, u64)>, String> {
    let cmdline = fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))?;
    let mut v = Vec::new();
    for arg in cmdline.split_whitespace() {
        let Some(spec) = arg.strip_prefix("virtio_mmio.device=") else { continue };
        let (size, rest) = spec.split_once('@').ok_or("bad virtio_mmio.device")?;
        let addr = rest.split(':').next().unwrap_or_default();
        let size = match size.strip_suffix('K') {
            Some(k) => k.parse::<u64>().map_err(|e| e.to_string())? * 1024,
            None => size.parse::<u64>().map_err(|e| e.to_string())?,
        };
        let addr =
            u64::from_str_radix(addr.trim_start_matches("0x"), 16).map_err(|e| e.to_string())?;
        v.push((addr, size));
    }
    Ok(v)
}

/// Maps `len` bytes of guest-physical memory at `addr` through /dev/mem.
fn map_physical(mem: &OwnedFd, addr: u64, len: usize) -> Result<*mut u8, String> {
    // SAFETY: a new shared mapping of /dev/mem; the result is checked before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            addr as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err(&format!("mmap /dev/mem at {addr:#x}")));
    }
    Ok(p.cast())
}

fn open_mem() -> Result<OwnedFd, String> {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mem")
        .map_err(|e| format!("/dev/mem: {e}"))?;
    Ok(OwnedFd::from(f))
}

/// A small deterministic generator: the same garbage every run.
struct Garbage(u64);
impl Garbage {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 as u32
    }
}

fn mmio() -> Result<(), String> {
    let windows = mmio_windows()?;
    println!("hostile: writing garbage to {} virtio-mmio windows", windows.len());
    let _ = std::io::stdout().flush();
    let mem = open_mem()?;
    let mut g = Garbage(0x1234_5678_9abc_def1);
    let pages: Vec<*mut u8> = windows
        .iter()
        .map(|(a, s)| map_physical(&mem, *a, *s as usize))
        .collect::<Result<_, _>>()?;
    for round in 0..200 {
        for p in &pages {
            // Every register, in an order that changes each round; queue setup registers
            // (0x30-0xa4) and QueueNotify (0x50) get garbage addresses and indices.
            for i in 0..64u32 {
                let off = ((i * 4 + round * 12) % 0x100) as usize;
                let value = g.next();
                // SAFETY: `p` maps the whole window (at least 0x100 bytes); `off` is below
                // 0x100 and 4-aligned. Volatile: each access is one MMIO exit.
                unsafe {
                    std::ptr::write_volatile(p.add(off).cast::<u32>(), value);
                    let _ = std::ptr::read_volatile(p.add(off).cast::<u32>());
                }
            }
        }
    }
    println!("hostile: mmio done");
    Ok(())
}

fn unmapped(count: u64) -> Result<(), String> {
    // Far above the cell's RAM and devices; nothing is mapped there, so every access exits.
    const BASE: u64 = 0xe000_0000;
    const WINDOW: usize = 16 << 20;
    let mem = open_mem()?;
    let p = map_physical(&mem, BASE, WINDOW)?;
    let mut sum = 0u64;
    for i in 0..count {
        let off = ((i * 4) as usize) % WINDOW;
        // SAFETY: `off` is inside the WINDOW-byte mapping and 4-aligned.
        sum = sum
            .wrapping_add(u64::from(unsafe { std::ptr::read_volatile(p.add(off).cast::<u32>()) }));
    }
    println!("hostile: read {count} unmapped addresses (sum {sum:#x})");
    Ok(())
}
