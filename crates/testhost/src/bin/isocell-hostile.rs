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
//! The VMM's device tests (scenario init `reset` and `devbench`, which unpack it from a disk)
//! use it as a guest-side client of the host over vsock, and as its host-side server:
//!
//! - `vsock-echo PORT BYTES` (guest): connects to the host's PORT, sends BYTES pseudo-random
//!   bytes while reading the echo back, compares; prints one JSON object;
//! - `vsock-send PORT BYTES` (guest): sends BYTES to the host's PORT, then waits for the host's
//!   count; prints one JSON object with the time taken;
//! - `vsock-hold PORT` (guest): connects, checks a short echo, prints `{"established": true}`,
//!   then waits for the connection to end (reset, eof or a timeout) and prints how;
//! - `clock` (guest): CLOCK_MONOTONIC in microseconds (busybox `date` has no sub-second
//!   format);
//! - `unix-echo PATH CONNECTIONS` (host): listens at PATH (the VMM's vsock `uds_path` + `_PORT`),
//!   echoes CONNECTIONS connections, each in its own thread, logging when each is accepted and
//!   ends; exits when all have ended;
//! - `unix-sink PATH` (host): listens at PATH, reads one connection to its end and answers with
//!   the byte count; exits.
//!
//! The network tests use it as an attacker of the cell's egress proxy:
//!
//! - `net-abuse ALLOWED` (guest, a cell with egress to `ALLOWED`, `a.b.c.d:port`, a server
//!   that sends a lot): malformed and oversized request lines straight on the host's egress
//!   vsock port, a flood of redirected connections to a denied address, more silent streams
//!   than the host allows at once, a connection to `ALLOWED` that never reads, and then one
//!   ordinary connection to `ALLOWED`, which must still work; prints `key=value` lines.
//!
//! - `http-serve PORT FILE` (guest): a small HTTP/1.0 server on PORT that answers every request
//!   with FILE, a thread per connection and a listen backlog of 128 (busybox httpd's is 9, too
//!   few for the network test's 100 clients at once under emulation); runs until killed.
//! - `http-get-half-closed ADDR PATH` (host): an HTTP/1.0 client that shuts its socket for
//!   writing once its request is sent, as many clients do, then writes the response body to
//!   stdout; fails if the body is shorter than its `Content-Length`.
//!
//! The benchmark uses it to time a VMM from outside, the same way for ours and its peer:
//!
//! - `time-boot GUEST_MIB REPORT -- VMM ARGS...` (host): runs the VMM with its console on a
//!   pipe, passing the console through; notes when the guest's init marker appears and what the
//!   VMM's memory is then (guest mappings apart), and when it exits; writes one JSON object to
//!   REPORT and exits with 0 only if the VMM exited 0 and the marker came.
//!
//! The host-side modes exit by themselves after `HELPER_LIFETIME`, so one whose guest never
//! came cannot outlive its test.
//!
//! It is a test tool: it is built like every binary of the project (static), never shipped in
//! an image.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use isocell_proto::{encode, EntryKind, ExitStatus, FrameBuffer, Message};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["protocol", mode] => protocol(mode),
        ["mmio"] => mmio(),
        ["unmapped", count] => count.parse().map_err(|e| format!("count: {e}")).and_then(unmapped),
        ["vsock-echo", port, bytes] => number(port).and_then(|p| vsock_echo(p, number(bytes)?)),
        ["vsock-send", port, bytes] => number(port).and_then(|p| vsock_send(p, number(bytes)?)),
        ["vsock-hold", port] => number(port).and_then(vsock_hold),
        ["clock"] => clock(),
        ["net-abuse", allowed] => net_abuse(allowed),
        ["http-serve", port, file] => number(port).and_then(|p| http_serve(p, file)),
        ["http-get-half-closed", addr, path] => http_get_half_closed(addr, path),
        ["unix-echo", path, connections] => number(connections).and_then(|n| unix_echo(path, n)),
        ["unix-sink", path] => unix_sink(path),
        ["time-boot", mib, report, "--", vmm @ ..] if !vmm.is_empty() => {
            number(mib).and_then(|m| time_boot(m, report, vmm))
        }
        _ => Err("usage: isocell-hostile protocol MODE | mmio | unmapped COUNT | \
                  vsock-echo PORT BYTES | vsock-send PORT BYTES | vsock-hold PORT | clock | net-abuse ADDR | http-serve PORT FILE | \
                  http-get-half-closed ADDR PATH | \
                  unix-echo PATH CONNECTIONS | unix-sink PATH | \
                  time-boot GUEST_MIB REPORT -- VMM ARGS..."
            .into()),
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

/// A copy of the agent's connection to the host: the first of its sockets that is
/// connected to the host (the agent also holds the session listener, which is not).
fn steal_agent_socket() -> Result<UnixStream, String> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, 1, 0) } as i32;
    if raw < 0 {
        return Err(os_err("pidfd_open 1"));
    }
    // SAFETY: a fresh descriptor owned by nothing else here.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut fds: Vec<i32> = fs::read_dir("/proc/1/fd")
        .map_err(|e| format!("/proc/1/fd: {e}"))?
        .flatten()
        .filter(|e| {
            fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    fds.sort();
    for target in fds {
        // SAFETY: pidfd_getfd duplicates the agent's descriptor into this process.
        let fd =
            unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) } as i32;
        if fd < 0 {
            // Closed since the listing: try the next.
            continue;
        }
        // SAFETY: a fresh descriptor owned by nothing else here; OwnedFd closes it if unused.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if peer_is_host(&owned) {
            // A vsock stream reads and writes like a Unix stream; only read/write are used.
            return Ok(UnixStream::from(owned));
        }
    }
    Err("the agent holds no socket connected to the host".into())
}

/// Whether `fd` is a vsock stream to the host's agent port (session streams come from other
/// host ports).
fn peer_is_host(fd: &OwnedFd) -> bool {
    // SAFETY: sockaddr_vm is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: getpeername writes at most `len` bytes into `addr`, which is that large.
    let rc =
        unsafe { libc::getpeername(fd.as_raw_fd(), std::ptr::addr_of_mut!(addr).cast(), &mut len) };
    rc == 0
        && addr.svm_family == libc::AF_VSOCK as libc::sa_family_t
        && addr.svm_cid == 2
        && addr.svm_port == isocell_proto::AGENT_PORT
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

fn number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("{s:?} is not a number"))
}

/// Size of each read and write of the vsock and Unix-socket modes.
const CHUNK: usize = 64 * 1024;
/// How long a guest-side mode waits on a stalled connection before giving up.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a host-side mode lives at most: past any step that runs it.
const HELPER_LIFETIME: Duration = Duration::from_secs(900);

/// Byte `i` of the stream the vsock modes send: pseudo-random (splitmix64 of `i / 8`), the same
/// every run, with no period a misplaced chunk could hide in.
fn pattern_byte(i: u64) -> u8 {
    let mut x = (i >> 3).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> ((i & 7) * 8)) as u8
}

fn fill_pattern(buf: &mut [u8], start: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(start + k as u64);
    }
}

/// A stream connection to `port` of the host (CID 2), with read and write timeouts.
fn vsock_connect(port: u32) -> Result<UnixStream, String> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_err("socket(AF_VSOCK)"));
    }
    // SAFETY: a fresh descriptor, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_vm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: libc::VMADDR_CID_HOST,
        svm_zero: [0; 4],
    };
    // SAFETY: `addr` is a complete sockaddr_vm and its exact size is passed.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os_err(&format!("connect to host port {port}")));
    }
    // A vsock stream reads, writes, shuts down and times out like a Unix stream: only those
    // calls (all plain socket calls) are made on it.
    let sock = UnixStream::from(fd);
    sock.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    sock.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
    Ok(sock)
}

/// Reads until end of file or an error; `each` sees every chunk. Returns the bytes read and
/// how the stream ended ("eof", or the error).
fn read_to_end_with(sock: &mut UnixStream, mut each: impl FnMut(u64, &[u8])) -> (u64, String) {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return (total, "eof".into()),
            Ok(n) => {
                each(total, &buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (total, e.to_string()),
        }
    }
}

/// Sends `bytes` of the pattern from a second thread while this one reads the echo back, so
/// neither side can stall on a full buffer; prints what came back.
fn vsock_echo(port: u32, bytes: u64) -> Result<(), String> {
    let start = Instant::now();
    let mut sock = vsock_connect(port)?;
    let mut writer = sock.try_clone().map_err(|e| format!("dup: {e}"))?;
    let sender = std::thread::spawn(move || -> Result<(), String> {
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(CHUNK as u64) as usize;
            fill_pattern(&mut buf[..n], sent);
            writer.write_all(&buf[..n]).map_err(|e| format!("send after {sent} bytes: {e}"))?;
            sent += n as u64;
        }
        writer.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))
    });
    let mut first_mismatch = None;
    let (received, ended) = read_to_end_with(&mut sock, |at, chunk| {
        if first_mismatch.is_none() {
            first_mismatch =
                chunk.iter().zip(at..).find(|(b, i)| **b != pattern_byte(*i)).map(|(_, i)| i);
        }
    });
    let sent = match sender.join() {
        Ok(r) => r,
        Err(_) => Err("the sending thread panicked".into()),
    };
    let ok = sent.is_ok() && received == bytes && first_mismatch.is_none() && ended == "eof";
    println!(
        "{}",
        serde_json::json!({
            "ok": ok,
            "port": port,
            "bytes": bytes,
            "received": received,
            "first_mismatch": first_mismatch,
            "ended": ended,
            "send_error": sent.err(),
            "us": start.elapsed().as_micros() as u64,
        })
    );
    if ok {
        Ok(())
    } else {
        Err("the echo did not match".into())
    }
}

/// Sends `bytes` (a pattern chunk, repeated) and waits for the host's count of what it got:
/// the time runs from before the connection to the count, so every byte reached the host.
fn vsock_send(port: u32, bytes: u64) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    fill_pattern(&mut buf, 0);
    let start = Instant::now();
    let mut sock = vsock_connect(port)?;
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        sock.write_all(&buf[..n]).map_err(|e| format!("send after {sent} bytes: {e}"))?;
        sent += n as u64;
    }
    sock.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
    let mut answer = Vec::new();
    let (_, ended) = read_to_end_with(&mut sock, |_, chunk| {
        if answer.len() < 64 {
            answer.extend_from_slice(chunk);
        }
    });
    let us = start.elapsed().as_micros() as u64;
    let acked: Option<u64> = std::str::from_utf8(&answer).ok().and_then(|s| s.trim().parse().ok());
    let ok = acked == Some(bytes) && ended == "eof";
    println!(
        "{}",
        serde_json::json!({
            "ok": ok,
            "port": port,
            "bytes": bytes,
            "acked": acked,
            "ended": ended,
            "us": us,
            "mb_per_s": bytes as f64 / us.max(1) as f64,
        })
    );
    if ok {
        Ok(())
    } else {
        Err("the host did not count every byte".into())
    }
}

/// Holds a connection open across whatever the guest does next (a device reset) and says how
/// it ended.
fn vsock_hold(port: u32) -> Result<(), String> {
    let mut sock = vsock_connect(port)?;
    sock.write_all(b"hold\n").map_err(|e| format!("send: {e}"))?;
    let mut echo = [0u8; 5];
    sock.read_exact(&mut echo).map_err(|e| format!("echo: {e}"))?;
    if &echo != b"hold\n" {
        return Err(format!("echo: got {echo:?}"));
    }
    println!("{}", serde_json::json!({ "established": true }));
    let _ = std::io::stdout().flush();
    let mut byte = [0u8; 1];
    let ended = loop {
        match sock.read(&mut byte) {
            Ok(0) => break "eof".to_owned(),
            Ok(_) => break "data".to_owned(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break "timeout".to_owned()
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break "reset".to_owned(),
            Err(e) => break e.to_string(),
        }
    };
    println!("{}", serde_json::json!({ "ended": ended }));
    Ok(())
}

fn clock() -> Result<(), String> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the kernel to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(os_err("clock_gettime"));
    }
    println!("{}", ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000);
    Ok(())
}

/// Ends this process after [`HELPER_LIFETIME`], whatever it is waiting for.
fn start_lifetime() {
    std::thread::spawn(|| {
        std::thread::sleep(HELPER_LIFETIME);
        let _ = writeln!(std::io::stderr(), "isocell-hostile: lifetime over, exiting");
        std::process::exit(3);
    });
}

fn listen(path: &str) -> Result<UnixListener, String> {
    UnixListener::bind(path).map_err(|e| format!("listening at {path}: {e}"))
}

/// Echoes `connections` connections at `path`, each in its own thread, so one the VMM keeps
/// open cannot hold up the next; the log says in which order they came and went.
fn unix_echo(path: &str, connections: u32) -> Result<(), String> {
    start_lifetime();
    let listener = listen(path)?;
    let mut workers = Vec::new();
    for k in 1..=connections {
        let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        println!("unix-echo: connection {k} accepted");
        workers.push(std::thread::spawn(move || {
            let mut writer = match conn.try_clone() {
                Ok(w) => w,
                Err(e) => return println!("unix-echo: connection {k} ended (dup: {e})"),
            };
            let mut write_error = None;
            let (echoed, ended) = read_to_end_with(&mut conn, |_, chunk| {
                if write_error.is_none() {
                    write_error = writer.write_all(chunk).err();
                }
            });
            let ended = write_error.map_or(ended, |e| format!("write: {e}"));
            println!("unix-echo: connection {k} ended ({ended}) after echoing {echoed} bytes");
        }));
    }
    for w in workers {
        let _ = w.join();
    }
    let _ = fs::remove_file(path);
    println!("unix-echo: done");
    Ok(())
}

/// Reads one connection at `path` to its end and answers with the number of bytes read.
fn unix_sink(path: &str) -> Result<(), String> {
    start_lifetime();
    let listener = listen(path)?;
    let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let (received, ended) = read_to_end_with(&mut conn, |_, _| {});
    let answered = conn.write_all(format!("{received}\n").as_bytes());
    let _ = fs::remove_file(path);
    println!("unix-sink: received {received} bytes ({ended}), answer {answered:?}");
    println!("unix-sink: done");
    Ok(())
}

/// Runs `vmm` and times it from outside (see the module documentation).
fn time_boot(guest_mib: u64, report: &str, vmm: &[&str]) -> Result<(), String> {
    use isocell_testhost::peer::{split_rss, INIT_MARKER};
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    start_lifetime();
    let started = Instant::now();
    let mut cmd = std::process::Command::new(vmm[0]);
    cmd.args(&vmm[1..]).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped());
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the child only makes async-signal-safe calls: it asks for
    // SIGKILL when this process dies, and gives up if that already happened, so a VMM never
    // outlives its timer.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != parent
            {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", vmm[0]))?;
    let pid = child.id();
    let console = child.stdout.take().ok_or("no console pipe")?;
    let mut at_init = None;
    for line in std::io::BufReader::new(console).split(b'\n') {
        let Ok(line) = line else { break };
        let text = String::from_utf8_lossy(&line);
        if at_init.is_none() && text.contains(INIT_MARKER) {
            let us = started.elapsed().as_micros() as u64;
            let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
            at_init = Some((us, split_rss(&smaps, guest_mib << 20)));
        }
        println!("{}", text.trim_end_matches('\r'));
    }
    let status = child.wait().map_err(|e| format!("wait: {e}"))?;
    let full_cycle_us = started.elapsed().as_micros() as u64;
    let out = serde_json::json!({
        "full_cycle_us": full_cycle_us,
        "init_us": at_init.map(|a| a.0),
        "guest_rss_kib": at_init.map(|a| a.1.guest_kib),
        "vmm_overhead_kib": at_init.map(|a| a.1.other_kib),
        "guest_huge_kib": at_init.map(|a| a.1.guest_huge_kib),
        "exit_code": status.code(),
    });
    fs::write(report, out.to_string()).map_err(|e| format!("{report}: {e}"))?;
    match (status.success(), at_init) {
        (true, Some(_)) => Ok(()),
        (true, None) => Err(format!("the guest never printed {INIT_MARKER}")),
        (false, _) => Err(format!("{} exited with {status}", vmm[0])),
    }
}

/// The host's answer line on an egress stream, or how the stream ended without one.
fn answer_of(s: &mut UnixStream) -> String {
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    match isocell_proto::net::read_line(s) {
        Ok(line) => line,
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => "closed".into(),
        Err(e) => format!("error {e}"),
    }
}

fn net_abuse(allowed: &str) -> Result<(), String> {
    use isocell_proto::net::EGRESS_PORT;
    use std::net::TcpStream;
    let allowed: std::net::SocketAddr = allowed.parse().map_err(|e| format!("{allowed}: {e}"))?;

    // 1. Request lines no proxy should take, straight on the host's egress port.
    let bad: [&[u8]; 6] = [
        &[b'A'; 4096],
        b"CONNECT 1.2.3.4:99999\n",
        &[0xff; 100],
        b"CONNECT [::1]:80\n",
        b"GET / HTTP/1.1\nHost: x\n\n",
        b"CONNECT 1.2.3.4:80 CONNECT 5.6.7.8:80 CONNECT 9.9.9.9:80 CONNECT 1.1.1.1:80 CONNECT\n",
    ];
    let (mut denied, mut other) = (0, Vec::new());
    for i in 0..300 {
        let mut s = vsock_connect(EGRESS_PORT)?;
        let _ = s.write_all(bad[i % bad.len()]);
        let _ = s.write_all(b"\n");
        let a = answer_of(&mut s);
        if a.starts_with("DENIED") {
            denied += 1;
        } else if other.len() < 3 {
            other.push(a);
        }
    }
    println!("malformed_denied={denied}");
    println!("malformed_other={other:?}");

    // 2. A flood of redirected connections to an address no rule names: each must fail at
    // once (a reset or an end, never data and never a hang).
    let started = Instant::now();
    let flood: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(|| {
                let mut failed = 0;
                for _ in 0..125 {
                    let dest = std::net::SocketAddr::from(([192, 0, 2, 1], 80));
                    let ok = TcpStream::connect_timeout(&dest, Duration::from_secs(20))
                        .and_then(|mut c| {
                            c.set_read_timeout(Some(Duration::from_secs(20)))?;
                            let mut b = [0u8; 1];
                            c.read(&mut b)
                        })
                        .is_ok_and(|n| n > 0);
                    if !ok {
                        failed += 1;
                    }
                }
                failed
            })
        })
        .collect();
    let failed: usize = flood.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    println!("flood_failed={failed}");
    println!("flood_secs={}", started.elapsed().as_secs());

    // 3. More streams than the host serves at once (MAX_EGRESS), fewer than the VMM carries
    // (256), each asking for the allowed server at once: those within the budget are relayed
    // and stay open (no header timeout frees them, however slow this guest is), the rest and
    // one more asked after them are refused for that reason, not left waiting.
    // The flood's connections leave the VMM's table once the guest has closed them.
    std::thread::sleep(Duration::from_secs(3));
    let std::net::SocketAddr::V4(allowed4) = allowed else {
        return Err("IPv4 only".into());
    };
    let line = isocell_proto::net::connect_line(allowed4);
    let mut held: Vec<UnixStream> = (0..250)
        .filter_map(|_| vsock_connect(EGRESS_PORT).ok())
        .filter_map(|mut s| s.write_all(line.as_bytes()).ok().map(|()| s))
        .collect();
    println!("held={}", held.len());
    let answers: Vec<String> = held.iter_mut().map(answer_of).collect();
    let relayed = answers.iter().filter(|a| a.starts_with("OK")).count();
    let too_many = answers.iter().filter(|a| a.contains("too many")).count();
    println!("held_relayed={relayed}");
    println!("held_too_many={too_many}");
    // The refused streams go, so the VMM's table has room for the next one whatever the
    // flood left in it; the host still holds the relayed ones, so it must refuse it too.
    let held: Vec<UnixStream> = held
        .into_iter()
        .zip(&answers)
        .filter_map(|(s, a)| a.starts_with("OK").then_some(s))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let mut s = vsock_connect(EGRESS_PORT)?;
    let _ = s.write_all(line.as_bytes());
    println!("over_limit={}", answer_of(&mut s));
    drop(held);
    std::thread::sleep(Duration::from_secs(1));

    // 4. A connection whose server sends a lot that the cell never reads.
    let mut lazy = TcpStream::connect_timeout(&allowed, Duration::from_secs(20))
        .map_err(|e| format!("connect {allowed}: {e}"))?;
    let _ = lazy.write_all(b"GET /payload.bin HTTP/1.0\r\nHost: payload.test\r\n\r\n");
    std::thread::sleep(Duration::from_secs(5));
    drop(lazy);

    // 5. The cell's network still works.
    let mut c = TcpStream::connect_timeout(&allowed, Duration::from_secs(20))
        .map_err(|e| format!("connect {allowed}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    c.write_all(b"GET /small.txt HTTP/1.0\r\nHost: payload.test\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    let _ = c.read_to_string(&mut reply);
    println!("after_abuse={}", reply.lines().next().unwrap_or("nothing"));
    Ok(())
}

fn http_get_half_closed(addr: &str, path: &str) -> Result<(), String> {
    let mut c = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(300))).map_err(|e| e.to_string())?;
    c.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .and_then(|()| c.shutdown(Shutdown::Write))
        .map_err(|e| format!("request: {e}"))?;
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).map_err(|e| format!("after {} bytes: {e}", reply.len()))?;
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no response head")?;
    let head = String::from_utf8_lossy(&reply[..split]).into_owned();
    let body = &reply[split + 4..];
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_owned))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
    std::io::stdout().write_all(body).map_err(|e| e.to_string())?;
    if body.len() != length {
        return Err(format!("the body has {} of its {length} bytes", body.len()));
    }
    Ok(())
}

fn http_serve(port: u32, file: &str) -> Result<(), String> {
    let body = std::sync::Arc::new(fs::read(file).map_err(|e| format!("{file}: {e}"))?);
    let port = u16::try_from(port).map_err(|_| format!("port {port}"))?;
    let listener =
        std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind: {e}"))?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let body = body.clone();
        std::thread::spawn(move || {
            // The request head, up to its empty line (its contents do not matter here).
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                match conn.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => return,
                }
            }
            let header = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            let _ = conn.write_all(header.as_bytes()).and_then(|()| conn.write_all(&body));
        });
    }
    Ok(())
}
