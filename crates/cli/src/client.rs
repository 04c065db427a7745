//! `isocell cell ...`: the command line as a client of the daemon `isocelld`.
//!
//! Requests are HTTP/1.1 on the daemon's Unix socket (JSON in, JSON out); the daemon knows the
//! client by its peer credentials. `cell exec` is the daemon's streaming exec: a WebSocket on
//! `GET /v1/cells/{id}/exec` whose first message is the request, then binary frames (0 stdin
//! from here, 1 stdout and 2 stderr from the daemon) and JSON control messages.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::exit;

/// Writes a line to stdout; a stdout that cannot be written is ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Where the daemon listens unless `--host` or `ISOCELL_HOST` say otherwise.
pub const DEFAULT_HOST: &str = "unix:///run/isocell/isocelld.sock";

/// The most bytes an answer (other than the exec stream) may have.
const MAX_ANSWER: usize = 64 << 20;

/// `isocell cell`: long-lived cells through the daemon.
#[derive(Args, Debug)]
pub struct CellArgs {
    /// The daemon, as unix:///PATH [default: $ISOCELL_HOST, else
    /// unix:///run/isocell/isocelld.sock].
    #[arg(long, global = true, value_name = "URL")]
    host: Option<String>,
    #[command(subcommand)]
    command: CellCmd,
}

/// What to do with cells.
#[derive(Subcommand, Debug)]
pub enum CellCmd {
    /// Create a cell and wait until it runs; prints its id.
    Create(CreateArgs),
    /// List your cells.
    Ls {
        /// The daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One cell, as JSON.
    Inspect {
        /// The cell.
        id: String,
    },
    /// Delete cells: their commands end, they are torn down, their exit receipts are signed.
    Rm {
        /// The cells.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
    /// The last 64 KiB of a running cell's console (its kernel's and agent's messages).
    Logs {
        /// The cell.
        id: String,
    },
    /// Run a command in a running cell, streaming its output; exits with its status.
    #[command(after_help = exit::TABLE)]
    Exec(ExecArgs),
    /// A cell's command sessions.
    Sessions {
        /// The cell.
        id: String,
        /// The daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `isocell cell create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The image: a registry reference (debian:12, registry.example:5000/team/app:1.4,
    /// app@sha256:...) or a stored image (sha256:...) [default: the host's base image].
    #[arg(value_name = "IMAGE")]
    image: Option<String>,
    /// vCPUs (1-32) [default: 1].
    #[arg(long)]
    cpus: Option<u64>,
    /// Guest memory: MiB, or a size such as 512M or 2G [default: 256M].
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// The longest the cell may live, in seconds (enforced by its VMM).
    #[arg(long, value_name = "SECS")]
    max_lifetime: Option<u64>,
    /// Delete the cell after this many seconds without activity (0: never) [default: the
    /// daemon's].
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// Makes a retried create return the cell the first one made.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Print the daemon's JSON for the cell instead of its id.
    #[arg(long)]
    json: bool,
}

/// `isocell cell exec`.
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Forward standard input to the command.
    #[arg(short, long)]
    interactive: bool,
    /// Run the command on a terminal (this one's size; raw mode here while it runs).
    #[arg(short, long)]
    tty: bool,
    /// Environment variable for the command, K=V (K alone: its value here). Repeat for more.
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory of the command in the cell (absolute).
    #[arg(short, long, value_name = "DIR")]
    workdir: Option<String>,
    /// User (and group) to run as: a name or UID, optionally :GROUP or :GID.
    #[arg(short, long)]
    user: Option<String>,
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// The cell.
    #[arg(value_name = "ID")]
    id: String,
    /// The command and its arguments (after `--` if they start with `-`).
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<String>,
}

/// Why a command failed, and the exit status that says so.
#[derive(Debug)]
struct Failure {
    /// `isocell`'s exit status.
    status: u8,
    /// What went wrong.
    message: String,
    /// Figures that go with it (capacity errors), shown as JSON.
    details: Option<Value>,
}

impl Failure {
    /// A failure of `isocell` itself (125).
    fn new(message: impl Into<String>) -> Failure {
        Failure { status: exit::ISOCELL_FAILED, message: message.into(), details: None }
    }

    /// Prints it and returns the exit status.
    fn report(self) -> u8 {
        tell!("isocell: error: {}", self.message);
        if let Some(d) = self.details {
            tell!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
        }
        self.status
    }
}

/// The exit status for an error `code` of the daemon.
fn status_for_code(code: &str) -> u8 {
    match code {
        "denied" => exit::DENIED,
        "not_found_in_cell" => exit::NOT_FOUND,
        "cannot_execute" => exit::CANNOT_EXECUTE,
        _ => exit::ISOCELL_FAILED,
    }
}

/// The daemon's error answer `body` (with HTTP `status`) as a [`Failure`].
fn api_failure(status: StatusCode, body: &[u8]) -> Failure {
    #[derive(Deserialize)]
    struct Body {
        error: Detail,
    }
    #[derive(Deserialize)]
    struct Detail {
        code: String,
        message: String,
        #[serde(default)]
        details: Option<Value>,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(Body { error }) => Failure {
            status: status_for_code(&error.code),
            details: if error.code == "capacity" { error.details } else { None },
            message: error.message,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(500).collect();
            Failure::new(if text.is_empty() {
                format!("the daemon answered {status}")
            } else {
                format!("the daemon answered {status}: {text}")
            })
        }
    }
}

/// The socket that `--host` (else `ISOCELL_HOST`, else the default) names.
fn socket_path(host: Option<&str>) -> Result<PathBuf, Failure> {
    let from_env = std::env::var("ISOCELL_HOST").ok().filter(|s| !s.is_empty());
    let url = host.or(from_env.as_deref()).unwrap_or(DEFAULT_HOST);
    if let Some(path) = url.strip_prefix("unix://") {
        if path.starts_with('/') {
            return Ok(PathBuf::from(path));
        }
        return Err(Failure::new(format!(
            "--host {url}: give the socket's absolute path, as unix:///run/isocell/isocelld.sock"
        )));
    }
    if url.starts_with("https://") {
        return Err(Failure::new(format!(
            "--host {url}: TLS client support is not there yet; use the daemon's Unix socket \
             (unix:///PATH) on its host"
        )));
    }
    Err(Failure::new(format!(
        "--host {url}: give unix:///PATH (only the daemon's Unix socket is supported for now)"
    )))
}

/// `s` as one URL path segment.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The daemon at a Unix socket.
struct Daemon {
    socket: PathBuf,
}

impl Daemon {
    /// A new connection to it.
    async fn connect(&self) -> Result<UnixStream, Failure> {
        UnixStream::connect(&self.socket).await.map_err(|e| {
            let at = self.socket.display();
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                Failure::new(format!(
                    "the daemon's socket {at}: permission denied; it is for root and the \
                     `isocell` group (usermod -aG isocell $USER, then log in again)"
                ))
            } else {
                Failure::new(format!(
                    "the daemon is not reachable at {at} ({e}); start it with `systemctl start \
                     isocelld` (or `isocelld &`), or point --host or ISOCELL_HOST at its socket"
                ))
            }
        })
    }

    /// `method path` with an optional JSON `body`; the answer's body if it is a success.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Bytes, Failure> {
        let stream = self.connect().await?;
        let lost = |e: &dyn std::fmt::Display| {
            Failure::new(format!("the daemon at {}: {e}", self.socket.display()))
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| lost(&e))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        for (name, value) in headers {
            if hyper::header::HeaderValue::from_str(value).is_err() {
                return Err(Failure::new(format!("{name} {value:?}: give printable ASCII")));
            }
            req = req.header(*name, *value);
        }
        let payload = match body {
            Some(v) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req =
            req.body(Full::new(payload)).map_err(|e| Failure::new(format!("request: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| lost(&e))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| lost(&e))?
            .to_bytes();
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(api_failure(status, &bytes))
        }
    }

    /// Like [`Daemon::call`], the answer as JSON.
    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Value, Failure> {
        let bytes = self.call(method, path, body, headers).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Failure::new(format!("the daemon's answer to {path} is not JSON: {e}")))
    }
}

/// Runs `isocell cell ...`; returns the exit status.
pub fn cell(args: CellArgs) -> u8 {
    let socket = match socket_path(args.host.as_deref()) {
        Ok(s) => s,
        Err(f) => return f.report(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return exit::fail(&format!("async runtime: {e}")),
    };
    let daemon = Daemon { socket };
    match runtime.block_on(dispatch(&daemon, args.command)) {
        Ok(status) => status,
        Err(f) => f.report(),
    }
}

async fn dispatch(daemon: &Daemon, command: CellCmd) -> Result<u8, Failure> {
    match command {
        CellCmd::Create(a) => {
            let body = create_body(&a);
            let key: Vec<(&str, &str)> =
                a.idempotency_key.as_deref().map(|k| ("Idempotency-Key", k)).into_iter().collect();
            let cell = daemon.json(Method::POST, "/v1/cells", Some(&body), &key).await?;
            if a.json {
                print_json(&cell);
            } else {
                say!("{}", cell["id"].as_str().unwrap_or_default());
            }
            Ok(0)
        }
        CellCmd::Ls { json } => {
            let list = daemon.json(Method::GET, "/v1/cells", None, &[]).await?;
            if json {
                print_json(&list);
            } else {
                let cells: Vec<CellRow> = parse_list(&list, "cells")?;
                out(&cells_table(&cells, now_ms()));
            }
            Ok(0)
        }
        CellCmd::Inspect { id } => {
            let cell = daemon.json(Method::GET, &cell_path(&id, ""), None, &[]).await?;
            print_json(&cell);
            Ok(0)
        }
        CellCmd::Rm { ids } => {
            let mut status = 0;
            for id in ids {
                match daemon.json(Method::DELETE, &cell_path(&id, ""), None, &[]).await {
                    Ok(cell) => {
                        let outcome = cell["outcome"].as_str().or(cell["state"].as_str());
                        say!("{id}\t{}", outcome.unwrap_or("deleted"));
                    }
                    Err(f) => status = f.report(),
                }
            }
            Ok(status)
        }
        CellCmd::Logs { id } => {
            let text = daemon.call(Method::GET, &cell_path(&id, "/logs"), None, &[]).await?;
            out(&text);
            Ok(0)
        }
        CellCmd::Exec(a) => exec(daemon, a).await,
        CellCmd::Sessions { id, json } => {
            let list = daemon.json(Method::GET, &cell_path(&id, "/sessions"), None, &[]).await?;
            if json {
                print_json(&list);
            } else {
                let sessions: Vec<SessionRow> = parse_list(&list, "sessions")?;
                out(&sessions_table(&sessions, now_ms()));
            }
            Ok(0)
        }
    }
}

/// `/v1/cells/{id}` and `rest`.
fn cell_path(id: &str, rest: &str) -> String {
    format!("/v1/cells/{}{rest}", segment(id))
}

/// The body of `cell create`: only the fields given.
fn create_body(a: &CreateArgs) -> Value {
    let mut m = Map::new();
    if let Some(i) = &a.image {
        m.insert("image".into(), json!(i));
    }
    if let Some(c) = a.cpus {
        m.insert("cpus".into(), json!(c));
    }
    if let Some(mem) = &a.memory {
        m.insert("memory".into(), json!(mem));
    }
    if let Some(s) = a.max_lifetime {
        m.insert("max_lifetime_secs".into(), json!(s));
    }
    if let Some(s) = a.idle_timeout {
        m.insert("idle_timeout_secs".into(), json!(s));
    }
    Value::Object(m)
}

fn print_json(v: &Value) {
    say!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Writes bytes to stdout as they are.
fn out(bytes: &[u8]) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(bytes);
    let _ = o.flush();
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The list under `key` of a list answer.
fn parse_list<T: for<'de> Deserialize<'de>>(list: &Value, key: &str) -> Result<Vec<T>, Failure> {
    Vec::<T>::deserialize(&list[key])
        .map_err(|e| Failure::new(format!("the daemon's list of {key} is not as expected: {e}")))
}

/// A cell as the daemon shows it (the fields the table needs).
#[derive(Debug, Deserialize)]
struct CellRow {
    id: String,
    state: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    cpus: u32,
    #[serde(default)]
    memory_mib: u64,
    #[serde(default)]
    created_ms: u64,
    #[serde(default)]
    outcome: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// A session as the daemon shows it.
#[derive(Debug, Deserialize)]
struct SessionRow {
    id: u64,
    #[serde(default)]
    program: String,
    #[serde(default)]
    tty: bool,
    state: String,
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    signal: Option<i32>,
    #[serde(default)]
    started_ms: u64,
}

/// How long ago `then_ms` was, shortly: 42s, 5m, 3h, 2d.
fn age(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn memory(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{}G", mib / 1024)
    } else {
        format!("{mib}M")
    }
}

/// Text shortened to `n` characters on one line.
fn short(text: &str, n: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() > n || line.len() < text.trim_end().len() {
        let mut s: String = line.chars().take(n.saturating_sub(3)).collect();
        s.push_str("...");
        s
    } else {
        line.to_owned()
    }
}

/// Rows under headers, columns padded to their widest cell (the last one is not padded).
fn table(headers: &[&str], rows: &[Vec<String>]) -> Vec<u8> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let head: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&head).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   "));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text.into_bytes()
}

fn cells_table(cells: &[CellRow], now: u64) -> Vec<u8> {
    let rows: Vec<Vec<String>> = cells
        .iter()
        .map(|c| {
            let last = match c.state.as_str() {
                "ended" => c.outcome.clone().unwrap_or_else(|| "-".into()),
                "failed" => short(c.error.as_deref().or(c.outcome.as_deref()).unwrap_or("-"), 60),
                _ => age(now, c.created_ms),
            };
            let image = if c.image.is_empty() { "(base)".to_owned() } else { c.image.clone() };
            vec![
                c.id.clone(),
                c.state.clone(),
                image,
                c.cpus.to_string(),
                memory(c.memory_mib),
                last,
            ]
        })
        .collect();
    table(&["ID", "STATE", "IMAGE", "CPUS", "MEMORY", "AGE/OUTCOME"], &rows)
}

fn sessions_table(sessions: &[SessionRow], now: u64) -> Vec<u8> {
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            let status = match (s.exit_code, s.signal) {
                (Some(c), _) => format!("exit {c}"),
                (None, Some(n)) => format!("signal {n}"),
                (None, None) => "-".into(),
            };
            vec![
                s.id.to_string(),
                s.state.clone(),
                status,
                if s.tty { "yes" } else { "no" }.into(),
                age(now, s.started_ms),
                s.program.clone(),
            ]
        })
        .collect();
    table(&["SESSION", "STATE", "STATUS", "TTY", "STARTED", "PROGRAM"], &rows)
}

// ---- streaming exec ----

/// The exec request for `a`, with the terminal's size if one is asked for.
fn exec_request(a: &ExecArgs, size: Option<(u16, u16)>) -> Result<Value, Failure> {
    let mut env = BTreeMap::new();
    for item in &a.env {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => match std::env::var(item) {
                Ok(v) => (item.clone(), v),
                Err(_) => {
                    return Err(Failure::new(format!(
                        "--env {item:?}: expected NAME=VALUE (or the NAME of a variable set here)"
                    )))
                }
            },
        };
        if k.is_empty() || k.contains('\0') || v.contains('\0') {
            return Err(Failure::new(format!("--env {item:?}: expected NAME=VALUE")));
        }
        env.insert(k, v);
    }
    if let Some(w) = &a.workdir {
        if !w.starts_with('/') {
            return Err(Failure::new(format!(
                "--workdir {w:?}: must be an absolute path in the cell"
            )));
        }
    }
    let mut m = Map::new();
    m.insert("argv".into(), json!(a.command));
    if !env.is_empty() {
        m.insert("env".into(), json!(env));
    }
    if let Some(w) = &a.workdir {
        m.insert("cwd".into(), json!(w));
    }
    if let Some(u) = &a.user {
        m.insert("user".into(), json!(u));
    }
    if let Some((rows, cols)) = size {
        m.insert("tty".into(), json!({ "rows": rows, "cols": cols }));
    }
    if a.interactive {
        m.insert("stdin".into(), json!(true));
    }
    if let Some(t) = a.timeout {
        m.insert("timeout_secs".into(), json!(t));
    }
    Ok(Value::Object(m))
}

/// `isocell`'s exit status for the daemon's `{"type":"exit",...}` message.
fn exit_status(msg: &Value) -> u8 {
    if msg["timed_out"].as_bool() == Some(true) {
        return exit::TIMED_OUT;
    }
    if let Some(code) = msg["exit_code"].as_i64() {
        return u8::try_from(code.rem_euclid(256)).unwrap_or(exit::ISOCELL_FAILED);
    }
    if let Some(sig) = msg["signal"].as_i64() {
        return u8::try_from(128 + sig.clamp(0, 127)).unwrap_or(exit::ISOCELL_FAILED);
    }
    exit::ISOCELL_FAILED
}

/// The size of the terminal on stdout, else stdin.
fn terminal_size() -> Option<(u16, u16)> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO] {
        // SAFETY: an all-zero winsize is valid plain data.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize to the valid pointer we pass; fd is one of our
        // standard descriptors, and on a non-terminal the call only fails.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if r == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

/// The local terminal in raw mode; dropping it restores the settings it had.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Puts the terminal on stdin in raw mode; with `keep_signals`, Ctrl-C and the like still
    /// raise signals here.
    fn enter(keep_signals: bool) -> Option<RawMode> {
        // SAFETY: an all-zero termios is valid plain data that tcgetattr overwrites.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios to the valid pointer we pass.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only changes the termios we pass.
        unsafe { libc::cfmakeraw(&mut raw) };
        if keep_signals {
            raw.c_lflag |= libc::ISIG;
        }
        // SAFETY: tcsetattr reads one termios from the valid pointer we pass.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSADRAIN, &raw) } != 0 {
            return None;
        }
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads one termios from the valid pointer we pass.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSADRAIN, &self.saved) };
    }
}

/// Reads stdin on a thread of its own (a terminal or pipe read cannot be cancelled); the
/// channel closes at end of input.
fn read_stdin() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(8);
    let spawned = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    if spawned.is_err() {
        // No thread: the receiver's sender is gone, which reads as end of input.
        let (_, rx) = mpsc::channel(1);
        return rx;
    }
    rx
}

fn listen(kind: SignalKind) -> Result<Signal, Failure> {
    signal(kind).map_err(|e| Failure::new(format!("signal handler: {e}")))
}

/// Waits for `s` if there is one, else never.
async fn next_signal(s: &mut Option<Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Writes a notice to stderr while the session runs (with a carriage return in raw mode).
fn notice(raw: bool, text: &str) {
    let mut e = std::io::stderr().lock();
    let _ = write!(e, "isocell: {text}{}", if raw { "\r\n" } else { "\n" });
}

/// `isocell cell exec`.
async fn exec(daemon: &Daemon, a: ExecArgs) -> Result<u8, Failure> {
    let size = if a.tty { Some(terminal_size().unwrap_or((24, 80))) } else { None };
    let request = exec_request(&a, size)?;
    let mut interrupt = listen(SignalKind::interrupt())?;
    let mut terminate = listen(SignalKind::terminate())?;
    let mut hangup = listen(SignalKind::hangup())?;
    let mut winch = if a.tty { Some(listen(SignalKind::window_change())?) } else { None };

    let stream = daemon.connect().await?;
    let url = format!("ws://localhost{}", cell_path(&a.id, "/exec"));
    let connected = tokio::select! {
        c = tokio_tungstenite::client_async(url, stream) => c,
        _ = interrupt.recv() => return Ok(130),
    };
    let (ws, _) = connected.map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            api_failure(resp.status(), resp.body().as_deref().unwrap_or_default())
        }
        other => Failure::new(format!(
            "the daemon at {}: the exec connection: {other}",
            daemon.socket.display()
        )),
    })?;
    let (mut tx, mut rx) = ws.split();
    let lost = |e: &dyn std::fmt::Display| {
        Failure::new(format!("the exec connection to the daemon broke: {e}"))
    };
    tx.send(Message::text(request.to_string())).await.map_err(|e| lost(&e))?;

    // The terminal goes back to how it was when this is dropped, on every way out.
    let raw_mode =
        if a.tty && std::io::stdin().is_terminal() { RawMode::enter(!a.interactive) } else { None };
    let raw = raw_mode.is_some();
    let mut stdin = if a.interactive { Some(read_stdin()) } else { None };
    let mut session: Option<u64> = None;
    let mut interrupts = 0u32;
    let mut last_size = size;
    let detached = |session: Option<u64>| match session {
        Some(n) => format!("detached; session {n} goes on in cell {}", a.id),
        None => format!("detached; the command may go on in cell {}", a.id),
    };
    loop {
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => match b.first() {
                    Some(1) => {
                        let mut o = std::io::stdout().lock();
                        let _ = o.write_all(&b[1..]);
                        let _ = o.flush();
                    }
                    Some(2) => {
                        let mut e = std::io::stderr().lock();
                        let _ = e.write_all(&b[1..]);
                        let _ = e.flush();
                    }
                    _ => {}
                },
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    match v["type"].as_str() {
                        Some("started") => session = v["session"].as_u64(),
                        Some("exit") => return Ok(exit_status(&v)),
                        Some("error") => {
                            let code = v["code"].as_str().unwrap_or("internal");
                            let message = v["message"].as_str().unwrap_or("the exec failed");
                            // A control message the daemon did not take; the command goes on.
                            if session.is_some() && code == "bad_request" {
                                notice(raw, &format!("warning: {message}"));
                                continue;
                            }
                            return Err(Failure {
                                status: status_for_code(code),
                                message: message.to_owned(),
                                details: None,
                            });
                        }
                        _ => {}
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(lost(&e)),
                None => {
                    return Err(Failure::new(
                        "the daemon closed the exec connection before the command ended",
                    ))
                }
            },
            input = async {
                match stdin.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => match input {
                Some(mut bytes) => {
                    bytes.insert(0, 0);
                    tx.send(Message::binary(bytes)).await.map_err(|e| lost(&e))?;
                }
                None => {
                    stdin = None;
                    let eof = json!({ "type": "stdin_eof" }).to_string();
                    tx.send(Message::text(eof)).await.map_err(|e| lost(&e))?;
                }
            },
            _ = interrupt.recv() => {
                interrupts += 1;
                if interrupts >= 3 {
                    notice(raw, &detached(session));
                    return Ok(130);
                }
                let sig = json!({ "type": "signal", "signal": libc::SIGINT }).to_string();
                tx.send(Message::text(sig)).await.map_err(|e| lost(&e))?;
                if interrupts == 2 {
                    notice(raw, "sent SIGINT again; press Ctrl-C once more to detach (the \
                                 command goes on in the cell)");
                }
            }
            _ = next_signal(&mut winch) => {
                let now = terminal_size();
                if now.is_some() && now != last_size {
                    last_size = now;
                    if let Some((rows, cols)) = now {
                        let msg = json!({ "type": "resize", "rows": rows, "cols": cols });
                        tx.send(Message::text(msg.to_string())).await.map_err(|e| lost(&e))?;
                    }
                }
            }
            _ = terminate.recv() => {
                notice(raw, &detached(session));
                return Ok(128 + libc::SIGTERM as u8);
            }
            _ = hangup.recv() => {
                return Ok(128 + libc::SIGHUP as u8);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Subcommand, Debug)]
    enum Top {
        Cell(CellArgs),
    }

    fn parse(args: &[&str]) -> CellArgs {
        let mut all = vec!["isocell", "cell"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).unwrap().cmd {
            Top::Cell(c) => c,
        }
    }

    #[test]
    fn host_urls() {
        assert_eq!(
            socket_path(Some("unix:///run/x/d.sock")).unwrap(),
            PathBuf::from("/run/x/d.sock")
        );
        let tls = socket_path(Some("https://cells.example:8443")).unwrap_err();
        assert_eq!(tls.status, 125);
        assert!(tls.message.contains("TLS client support is not there yet"), "{}", tls.message);
        assert!(socket_path(Some("unix://relative.sock")).is_err());
        assert!(socket_path(Some("tcp://127.0.0.1:1")).is_err());
        assert!(DEFAULT_HOST.starts_with("unix:///"));
    }

    #[test]
    fn host_is_global_and_exec_takes_the_command() {
        let c = parse(&["exec", "-it", "--host", "unix:///s", "abc", "--", "sh", "-c", "echo hi"]);
        assert_eq!(c.host.as_deref(), Some("unix:///s"));
        let CellCmd::Exec(e) = c.command else { panic!("not exec") };
        assert!(e.interactive && e.tty);
        assert_eq!(e.id, "abc");
        assert_eq!(e.command, ["sh", "-c", "echo hi"]);
        // Without `--`, flags after the command belong to it.
        let c = parse(&["exec", "abc", "ls", "-l"]);
        let CellCmd::Exec(e) = c.command else { panic!("not exec") };
        assert_eq!(e.command, ["ls", "-l"]);
        assert!(Cli::try_parse_from(["isocell", "cell", "exec", "abc"]).is_err());
    }

    #[test]
    fn create_sends_only_what_was_given() {
        let c = parse(&["create", "debian:12", "--memory", "1G", "--idle-timeout", "0"]);
        let CellCmd::Create(a) = c.command else { panic!("not create") };
        assert_eq!(
            create_body(&a),
            json!({ "image": "debian:12", "memory": "1G", "idle_timeout_secs": 0 })
        );
        let c = parse(&["create", "--cpus", "2", "--max-lifetime", "60"]);
        let CellCmd::Create(a) = c.command else { panic!("not create") };
        assert_eq!(create_body(&a), json!({ "cpus": 2, "max_lifetime_secs": 60 }));
    }

    #[test]
    fn exec_request_fields() {
        let c = parse(&[
            "exec",
            "-i",
            "-e",
            "A=1",
            "-w",
            "/tmp",
            "-u",
            "app",
            "--timeout",
            "5",
            "x",
            "id",
        ]);
        let CellCmd::Exec(e) = c.command else { panic!("not exec") };
        let r = exec_request(&e, Some((40, 120))).unwrap();
        assert_eq!(
            r,
            json!({ "argv": ["id"], "env": { "A": "1" }, "cwd": "/tmp", "user": "app",
                    "tty": { "rows": 40, "cols": 120 }, "stdin": true, "timeout_secs": 5 })
        );
        let c = parse(&["exec", "-w", "tmp", "x", "id"]);
        let CellCmd::Exec(e) = c.command else { panic!("not exec") };
        assert!(exec_request(&e, None).is_err());
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(&json!({ "type": "exit", "exit_code": 0, "signal": null })), 0);
        assert_eq!(exit_status(&json!({ "type": "exit", "exit_code": 3 })), 3);
        assert_eq!(exit_status(&json!({ "type": "exit", "exit_code": null, "signal": 9 })), 137);
        assert_eq!(exit_status(&json!({ "exit_code": null, "signal": 9, "timed_out": true })), 124);
        assert_eq!(exit_status(&json!({ "type": "exit" })), 125);
        assert_eq!(status_for_code("not_found_in_cell"), 127);
        assert_eq!(status_for_code("cannot_execute"), 126);
        assert_eq!(status_for_code("denied"), 77);
        assert_eq!(status_for_code("conflict"), 125);
    }

    #[test]
    fn error_answers() {
        let body = br#"{"error":{"code":"capacity","message":"not enough memory","details":{"free_mib":10}}}"#;
        let f = api_failure(StatusCode::SERVICE_UNAVAILABLE, body);
        assert_eq!((f.status, f.message.as_str()), (125, "not enough memory"));
        assert_eq!(f.details, Some(json!({ "free_mib": 10 })));
        let f =
            api_failure(StatusCode::FORBIDDEN, br#"{"error":{"code":"denied","message":"no"}}"#);
        assert_eq!((f.status, f.details), (77, None));
        let f = api_failure(StatusCode::BAD_GATEWAY, b"upstream down");
        assert!(f.message.contains("502") && f.message.contains("upstream down"), "{}", f.message);
    }

    #[test]
    fn tables_and_paths() {
        let cells: Vec<CellRow> = serde_json::from_value(json!([
            { "id": "c1", "state": "running", "image": "debian:12", "cpus": 2, "memory_mib": 2048,
              "created_ms": 1_000, "outcome": null },
            { "id": "c2", "state": "ended", "image": "", "cpus": 1, "memory_mib": 256,
              "created_ms": 0, "outcome": "deleted" },
        ]))
        .unwrap();
        let text = String::from_utf8(cells_table(&cells, 301_000)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID") && lines[0].ends_with("AGE/OUTCOME"));
        assert!(
            lines[1].contains("debian:12") && lines[1].contains("2G") && lines[1].ends_with("5m")
        );
        assert!(lines[2].contains("(base)") && lines[2].ends_with("deleted"));
        assert_eq!(cell_path("ab/../x", "/logs"), "/v1/cells/ab%2F..%2Fx/logs");
        assert_eq!(age(0, 0), "0s");
        assert_eq!(age(90_000_000_000, 0), "1041d");
    }
}
