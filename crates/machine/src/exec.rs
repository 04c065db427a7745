//! `isocell machine exec`: commands in the machine itself (not in a cell), for debugging, and
//! the machine's control requests (ready? stop).
//!
//! Inside the machine `isocell machine serve` listens on [`GUEST_EXEC_PORT`](crate::GUEST_EXEC_PORT),
//! which QEMU forwards from a loopback port of this host. A connection sends one JSON line,
//! `{"token":..,"op":"exec"|"ping"|"shutdown","argv":[..],"stdin":bool}`, then (for exec with
//! stdin) the command's input until it half-closes. The answer is frames: a tag byte, a 32-bit
//! big-endian length and the bytes; 1 stdout, 2 stderr, 3 the exit status (i32, 128+N for
//! signal N), 4 an error message. The token is a 256-bit secret that `init` made and only the
//! machine directory's owner can read; a wrong one gets an error and nothing runs.

use std::io::{BufRead as _, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::MachineError;

const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const EXIT: u8 = 3;
const ERROR: u8 = 4;

/// The longest request line.
const MAX_REQUEST: u64 = 64 * 1024;
/// The largest frame a client accepts.
const MAX_FRAME: u32 = 1 << 20;

/// One request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    token: String,
    op: String,
    #[serde(default)]
    argv: Vec<String>,
    #[serde(default)]
    stdin: bool,
}

fn frame(out: &mut impl Write, tag: u8, data: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&len.to_be_bytes());
    out.write_all(&head)?;
    out.write_all(&data[..len as usize])?;
    out.flush()
}

fn read_frame(input: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    input.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("a frame of {len} bytes is too large")));
    }
    let mut data = vec![0u8; len as usize];
    input.read_exact(&mut data)?;
    Ok((head[0], data))
}

/// Equal without telling, by timing, how much of a guess was right.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---- this host's side ----

fn connect(
    port: u16,
    token: &str,
    op: &str,
    argv: &[String],
    stdin: bool,
) -> Result<TcpStream, MachineError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| {
        MachineError::NotRunning(format!("its exec port 127.0.0.1:{port} does not answer: {e}"))
    })?;
    let req = Request { token: token.to_owned(), op: op.to_owned(), argv: argv.to_vec(), stdin };
    let mut line = serde_json::to_vec(&req).unwrap_or_default();
    line.push(b'\n');
    s.write_all(&line).map_err(|e| MachineError::Failed(format!("sending to the machine: {e}")))?;
    Ok(s)
}

/// The answer's exit status, other frames to `each`.
fn finish(s: &mut TcpStream, mut each: impl FnMut(u8, &[u8])) -> Result<i32, MachineError> {
    loop {
        let (tag, data) = read_frame(s).map_err(|e| {
            MachineError::Failed(format!(
                "the machine closed the connection before answering ({e})"
            ))
        })?;
        match tag {
            EXIT => {
                let b: [u8; 4] =
                    data.get(..4).and_then(|b| b.try_into().ok()).unwrap_or([0, 0, 0, 1]);
                return Ok(i32::from_be_bytes(b));
            }
            ERROR => {
                return Err(MachineError::Failed(format!(
                    "the machine: {}",
                    String::from_utf8_lossy(&data)
                )))
            }
            t => each(t, &data),
        }
    }
}

/// Whether the machine answers, and whether its daemon is up.
pub fn ping(port: u16, token: &str) -> Result<bool, MachineError> {
    let mut s = connect(port, token, "ping", &[], false)?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.shutdown(std::net::Shutdown::Write);
    Ok(finish(&mut s, |_, _| {})? == 0)
}

/// Asks the machine to stop its daemon and cells, unmount its disk and power off.
pub fn shutdown(port: u16, token: &str) -> Result<(), MachineError> {
    let mut s = connect(port, token, "shutdown", &[], false)?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.shutdown(std::net::Shutdown::Write);
    finish(&mut s, |_, _| {}).map(|_| ())
}

/// Runs `argv` in the machine with our stdout and stderr (and stdin if `stdin`); its status.
pub fn run(port: u16, token: &str, argv: &[String], stdin: bool) -> Result<i32, MachineError> {
    let mut s = connect(port, token, "exec", argv, stdin)?;
    if stdin {
        let mut w = s.try_clone().map_err(|e| MachineError::Failed(e.to_string()))?;
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut w);
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
    } else {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    finish(&mut s, |tag, data| {
        let _ = match tag {
            STDOUT => std::io::stdout().write_all(data).and_then(|()| std::io::stdout().flush()),
            _ => std::io::stderr().write_all(data),
        };
    })
}

/// Runs `argv` in the machine; its status, stdout and stderr.
pub fn capture(
    port: u16,
    token: &str,
    argv: &[String],
) -> Result<(i32, Vec<u8>, Vec<u8>), MachineError> {
    let mut s = connect(port, token, "exec", argv, false)?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = finish(&mut s, |tag, data| match tag {
        STDOUT => out.extend_from_slice(data),
        _ => err.extend_from_slice(data),
    })?;
    Ok((code, out, err))
}

// ---- the machine's side ----

/// What the server needs to know.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The token file.
    pub token: PathBuf,
    /// The daemon's socket: the machine is ready when it accepts.
    pub daemon_socket: PathBuf,
    /// The state disk's mount point, unmounted before power-off.
    pub state_dir: PathBuf,
    /// The daemon's TCP listener in the machine: it too must accept before the machine is
    /// ready (the daemon binds it after its socket).
    pub daemon_port: u16,
}

/// The file that marks a machine: `serve` powers the computer off on request, so it refuses to
/// run anywhere else.
pub const MACHINE_MARK: &str = "/isocell/etc/machine.toml";

/// Serves exec, ping and shutdown requests until the machine powers off.
pub fn serve(c: &ServeConfig) -> Result<(), String> {
    if !Path::new(MACHINE_MARK).is_file() {
        return Err(format!(
            "`isocell machine serve` runs only inside an isocell machine, started by its init \
             ({MACHINE_MARK} is missing)"
        ));
    }
    serve_here(c)
}

/// [`serve`] without the check that this is a machine (for the tests).
fn serve_here(c: &ServeConfig) -> Result<(), String> {
    let token = std::fs::read_to_string(&c.token)
        .map_err(|e| format!("{}: {e}", c.token.display()))?
        .trim()
        .to_owned();
    if token.len() < 32 {
        return Err(format!("{}: the token is too short", c.token.display()));
    }
    let listener =
        TcpListener::bind(c.listen).map_err(|e| format!("listening on {}: {e}", c.listen))?;
    let token = Arc::new(token);
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let token = token.clone();
        let c = c.clone();
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            if let Err(e) = handle(conn, &token, &c) {
                eprintln!("isocell machine serve: {e}");
            }
        });
    }
    Ok(())
}

fn handle(conn: TcpStream, token: &str, c: &ServeConfig) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    (&mut reader).take(MAX_REQUEST).read_until(b'\n', &mut line)?;
    let req: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => return frame(&mut out, ERROR, format!("a bad request: {e}").as_bytes()),
    };
    if !same(&req.token, token) {
        return frame(
            &mut out,
            ERROR,
            b"wrong token (this machine's token is in its directory's exec.token)",
        );
    }
    reader.get_ref().set_read_timeout(None)?;
    match req.op.as_str() {
        "ping" => {
            let up = std::os::unix::net::UnixStream::connect(&c.daemon_socket).is_ok()
                && TcpStream::connect_timeout(
                    &SocketAddr::from(([127, 0, 0, 1], c.daemon_port)),
                    Duration::from_secs(1),
                )
                .is_ok();
            frame(&mut out, EXIT, &i32::from(!up).to_be_bytes())
        }
        "shutdown" => {
            frame(&mut out, EXIT, &0i32.to_be_bytes())?;
            power_off(&c.state_dir);
            Ok(())
        }
        "exec" => exec(reader, out, &req),
        other => frame(&mut out, ERROR, format!("unknown op {other:?}").as_bytes()),
    }
}

fn exec(
    mut reader: BufReader<TcpStream>,
    mut out: TcpStream,
    req: &Request,
) -> std::io::Result<()> {
    let Some((program, args)) = req.argv.split_first() else {
        return frame(&mut out, ERROR, b"no command");
    };
    let mut child = match Command::new(program)
        .args(args)
        .stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return frame(&mut out, ERROR, format!("cannot run {program}: {e}").as_bytes()),
    };
    if let Some(mut stdin) = child.stdin.take() {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut stdin);
        });
    }
    let shared = Arc::new(Mutex::new(out));
    let pump = |mut from: Box<dyn Read + Send>, tag: u8| {
        let to = shared.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let Ok(mut o) = to.lock() else { break };
                        if frame(&mut *o, tag, &buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        })
    };
    let mut pumps = Vec::new();
    if let Some(o) = child.stdout.take() {
        pumps.push(pump(Box::new(o), STDOUT));
    }
    if let Some(e) = child.stderr.take() {
        pumps.push(pump(Box::new(e), STDERR));
    }
    let status = child.wait()?;
    for p in pumps {
        let _ = p.join();
    }
    use std::os::unix::process::ExitStatusExt as _;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    let mut o = shared.lock().map_err(|_| std::io::Error::other("poisoned"))?;
    frame(&mut *o, EXIT, &code.to_be_bytes())
}

/// Ends everything in the machine but its init, writes its disk out and powers it off.
fn power_off(state_dir: &Path) {
    // Tells the init script not to restart the daemon.
    let _ = std::fs::write("/run/isocell-machine.stopping", b"");
    // SAFETY: kill(-1) signals every process but init and this one; the machine is stopping.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: as above, for whatever ignored SIGTERM.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: sync() has no preconditions.
    unsafe { libc::sync() };
    if let Ok(path) = std::ffi::CString::new(state_dir.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2 with a valid NUL-terminated path; a failure leaves a journal to replay.
        if unsafe { libc::umount2(path.as_ptr(), 0) } != 0 {
            eprintln!(
                "isocell machine: unmounting {}: {}",
                state_dir.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    // SAFETY: as above.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) takes no pointers; powering the machine off is the point.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn server(dir: &Path) -> u16 {
        let token = dir.join("token");
        std::fs::write(&token, "t".repeat(64)).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let c = ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            token,
            daemon_socket: dir.join("no-daemon.sock"),
            state_dir: dir.to_owned(),
            daemon_port: 1,
        };
        std::thread::spawn(move || serve_here(&c));
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        port
    }

    #[test]
    fn exec_streams_output_and_status_and_a_wrong_token_runs_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let port = server(tmp.path());
        let good = "t".repeat(64);
        let argv: Vec<String> =
            ["sh", "-c", "echo out; echo err >&2; exit 7"].iter().map(|s| s.to_string()).collect();
        let (code, out, err) = capture(port, &good, &argv).unwrap();
        assert_eq!((code, out.as_slice(), err.as_slice()), (7, &b"out\n"[..], &b"err\n"[..]));
        let marker = tmp.path().join("ran");
        let touch = vec!["touch".to_owned(), marker.display().to_string()];
        let e = capture(port, &"x".repeat(64), &touch).unwrap_err().to_string();
        assert!(e.contains("wrong token"), "{e}");
        assert!(!marker.exists());
        // No daemon socket: the machine answers but is not ready.
        assert!(!ping(port, &good).unwrap());
        let e = capture(port, &good, &["/nonexistent".to_owned()]).unwrap_err().to_string();
        assert!(e.contains("cannot run /nonexistent"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever the other end sends, reading a frame ends in a frame or an error, and never
        /// allocates past the bound.
        #[test]
        fn any_bytes_read_as_a_frame_or_an_error(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            if let Ok((_, data)) = read_frame(&mut bytes.as_slice()) {
                proptest::prop_assert!(data.len() <= MAX_FRAME as usize);
                proptest::prop_assert_eq!(&bytes[5..5 + data.len()], data.as_slice());
            }
        }

        #[test]
        fn frames_round_trip(
            tag in proptest::prelude::any::<u8>(),
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
        ) {
            let mut wire = Vec::new();
            frame(&mut wire, tag, &data).unwrap();
            proptest::prop_assert_eq!(read_frame(&mut wire.as_slice()).unwrap(), (tag, data));
        }
    }

    /// Hostile request lines (not JSON, wrong types, unknown fields, huge, no newline, a wrong
    /// token) get an error frame or a closed connection, and run nothing.
    #[test]
    fn hostile_requests_run_nothing() {
        use proptest::strategy::{Strategy as _, ValueTree as _};
        let tmp = tempfile::tempdir().unwrap();
        let port = server(tmp.path());
        let marker = tmp.path().join("ran");
        let touch = format!("[\"touch\",\"{}\"]", marker.display());
        let mut fixed: Vec<Vec<u8>> = vec![
            b"\n".to_vec(),
            b"{}\n".to_vec(),
            b"[]\n".to_vec(),
            b"{\"token\":1}\n".to_vec(),
            format!("{{\"token\":\"{}\",\"op\":\"exec\",\"argv\":{touch}}}\n", "y".repeat(64))
                .into_bytes(),
            format!("{{\"token\":\"\",\"op\":\"exec\",\"argv\":{touch}}}\n").into_bytes(),
            format!(
                "{{\"token\":\"{}\",\"op\":\"exec\",\"argv\":{touch},\"x\":1}}\n",
                "t".repeat(64)
            )
            .into_bytes(),
            format!("{{\"token\":\"{}\",\"op\":\"exec\",\"argv\":{touch}}}\n", "t".repeat(63))
                .into_bytes(),
            vec![b'{'; MAX_REQUEST as usize + 10],
        ];
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let bytes = proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256);
        for _ in 0..64 {
            fixed.push(bytes.new_tree(&mut runner).unwrap().current());
        }
        for req in fixed {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let _ = s.write_all(&req);
            let _ = s.shutdown(std::net::Shutdown::Write);
            match read_frame(&mut s) {
                Ok((tag, _)) => assert_eq!(tag, ERROR, "{:?}", String::from_utf8_lossy(&req)),
                Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "no answer"),
            }
        }
        assert!(!marker.exists());
    }

    #[test]
    fn serve_refuses_to_run_outside_a_machine() {
        let tmp = tempfile::tempdir().unwrap();
        let c = ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: tmp.path().join("token"),
            daemon_socket: tmp.path().join("sock"),
            state_dir: tmp.path().to_owned(),
            daemon_port: 1,
        };
        let e = serve(&c).unwrap_err();
        assert!(e.contains("only inside an isocell machine"), "{e}");
    }
}
