//! Commands in running cells. Each is a session: a connection of its own to the cell's agent,
//! so many run at once, each with its own streams, exit status, signals and optional terminal.
//! A session outlives whoever watches it; its status is kept (and found again after a restart).
//!
//! Streaming exec is a WebSocket (`GET /v1/cells/{id}/exec`): one connection carries both
//! directions and terminal resizes, works over HTTP/1.1 on a Unix socket and through any proxy
//! that passes upgrades, and every language has a client (Kubernetes chose it for `kubectl
//! exec` for the same reasons). After the upgrade the client's first message is the request as
//! JSON text. Then: binary frames from the server start with 1 (stdout) or 2 (stderr), binary
//! frames from the client with 0 (stdin); text frames carry control as JSON: from the server
//! `{"type":"started","session":N,"pid":P}`, `{"type":"exit",...}` (last) or
//! `{"type":"error",...}`; from the client `{"type":"stdin_eof"}`,
//! `{"type":"resize","rows":R,"cols":C}` and `{"type":"signal","signal":N}`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message as Ws, WebSocket};
use futures_util::{SinkExt, StreamExt};
use isocell_host::session::{SessionInput, SessionSocket};
use isocell_host::supervisor::{self, Request};
use isocell_host::{Cancel, CancelReason, CellError, ExecFailure, OutputSink, Termination};
use isocell_image::runconfig::{self, Process};
use isocell_image::{ImageRef, PullPolicy, RegistryOptions, Store};
use isocell_proto::{ExitStatus, WindowSize};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use crate::cells::{blocking, App, CreateCell};
use crate::db::CellRow;
use crate::error::ApiError;
use axum::http::StatusCode;

/// A command to run in a cell.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments (the image's entrypoint is not prepended).
    pub argv: Vec<String>,
    /// Environment beyond the image's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the image's, else /).
    pub cwd: Option<String>,
    /// User: a name or uid, optionally `:group` (default: the image's, else root).
    pub user: Option<String>,
    /// Run on a terminal of this size (streaming exec only).
    pub tty: Option<TtySize>,
    /// Whether standard input will be sent (streaming exec only).
    #[serde(default)]
    pub stdin: bool,
    /// Kill the command after this many seconds.
    pub timeout_secs: Option<u64>,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// How a command ended (the non-streaming exec's answer).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecResult {
    /// The session's id in the cell.
    pub session: u64,
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Whether it was killed at `timeout_secs`.
    pub timed_out: bool,
    /// Its standard output (UTF-8, invalid bytes replaced), at most 16 MiB.
    pub stdout: String,
    /// Its standard error, likewise.
    pub stderr: String,
    /// Whether output beyond 16 MiB was dropped.
    pub truncated: bool,
}

/// Most output the non-streaming exec keeps per stream.
const MAX_COLLECT: usize = 16 << 20;

/// The process for `req` in cell `row`: the image's environment, working directory and user
/// database apply as `docker exec` applies them.
async fn process_for(app: &App, row: &CellRow, req: &ExecRequest) -> Result<Process, ApiError> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(ApiError::bad_request("argv: give the program and its arguments"));
    }
    if let Some(c) = &req.cwd {
        if !c.starts_with('/') {
            return Err(ApiError::bad_request(format!("cwd {c:?}: must be absolute")));
        }
    }
    let env: Vec<(String, String)> = req.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    if env
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0'))
    {
        return Err(ApiError::bad_request(
            "env: names are non-empty without = or NUL; values have no NUL",
        ));
    }
    let create: CreateCell = serde_json::from_str(&row.request).unwrap_or_default();
    let Some(name) = create.image else {
        let user = req.user.as_deref().unwrap_or("0:0");
        let (u, g) = user.split_once(':').unwrap_or((user, user));
        let (Ok(uid), Ok(gid)) = (u.parse(), g.parse()) else {
            return Err(ApiError::bad_request(format!(
                "user {user:?}: the base image has no user database; give UID or UID:GID"
            )));
        };
        return Ok(Process {
            argv: req.argv.clone(),
            env,
            cwd: req.cwd.clone().unwrap_or_else(|| "/".into()),
            uid,
            gid,
            groups: Vec::new(),
            privileges: None,
        });
    };
    let state = app.host.state_dir.clone();
    let req = req.clone();
    blocking(move || {
        let r = ImageRef::parse(&name).map_err(ApiError::bad_request)?;
        let store = Store::open(&state).map_err(|e| ApiError::internal(e.to_string()))?;
        let registry = RegistryOptions { insecure: Vec::new(), auth_file: None, progress: false };
        let resolved =
            isocell_image::resolve(&store, &r, PullPolicy::Missing, &registry, &Default::default())
                .map_err(|e| {
                    ApiError::internal(format!(
                        "the cell's image {name} is gone from the store: {e}"
                    ))
                })?;
        let (passwd, group) = Store::user_db(&resolved.dir);
        let overrides = runconfig::Overrides {
            entrypoint: Some(String::new()),
            command: req.argv.clone(),
            env,
            workdir: req.cwd.clone(),
            user: req.user.clone(),
        };
        runconfig::plan(
            &resolved.record.run_config,
            &overrides,
            passwd.as_deref(),
            group.as_deref(),
            isocell_host::plan::HOSTNAME,
        )
        .map_err(ApiError::bad_request)
    })
    .await?
}

/// Output of a session, from the blocking thread that reads the agent to the async side.
enum Out {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

struct ChannelSink(mpsc::Sender<Out>);

impl OutputSink for ChannelSink {
    fn stdout(&mut self, bytes: &[u8]) {
        let _ = self.0.blocking_send(Out::Stdout(bytes.to_vec()));
    }
    fn stderr(&mut self, bytes: &[u8]) {
        let _ = self.0.blocking_send(Out::Stderr(bytes.to_vec()));
    }
    fn notice(&mut self, _: &str) {}
}

/// A started session.
struct Started {
    session: u64,
    pid: u32,
    input: SessionInput,
    output: mpsc::Receiver<Out>,
    done: tokio::task::JoinHandle<Result<Termination, CellError>>,
    cancel: Cancel,
}

fn exec_error(e: CellError) -> ApiError {
    match e {
        CellError::Exec { kind: ExecFailure::NotFound, message } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "not_found_in_cell", message)
        }
        CellError::Exec { kind: ExecFailure::CannotExecute, message } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "cannot_execute", message)
        }
        other => ApiError::new(StatusCode::BAD_GATEWAY, "cell_failed", other.to_string()),
    }
}

/// Starts `req` as a new session of cell `row`.
async fn start(app: &Arc<App>, row: &CellRow, req: &ExecRequest) -> Result<Started, ApiError> {
    if row.state != "running" {
        return Err(ApiError::conflict(format!(
            "cell {} is {}; commands run only in running cells",
            row.id, row.state
        )));
    }
    if req.timeout_secs.is_some_and(|t| t == 0 || t > 365 * 86_400) {
        return Err(ApiError::bad_request("timeout_secs: give 1 second to a year"));
    }
    let process = process_for(app, row, req).await?;
    let (db, cell, program, tty) =
        (app.db.clone(), row.id.clone(), process.argv[0].clone(), req.tty.is_some());
    let session = blocking(move || db.new_session(&cell, &program, tty)).await??;
    let digest = isocell_evidence_digest(&process.argv);
    let (run, cell) = (app.host.run_dir.clone(), row.id.clone());
    let program = process.argv[0].clone();
    let _ = blocking(move || {
        let data = json!({ "session": session, "program": program, "argv_sha256": digest });
        supervisor::ask(
            &run,
            &cell,
            &Request::Log { kind: "exec".into(), data },
            Duration::from_secs(10),
        )
    })
    .await;
    let socket = SessionSocket::of(&app.host.run_dir, &row.id);
    let tty = req.tty.map(|t| WindowSize { rows: t.rows, cols: t.cols });
    let stdin = req.stdin;
    let began = Instant::now();
    let started = blocking(move || socket.exec(session, &process, tty, stdin)).await?;
    let (mut link, input, pid) = match started {
        Ok(s) => s,
        Err(e) => {
            let (db, cell) = (app.db.clone(), row.id.clone());
            let _ = blocking(move || db.session_ended(&cell, session, None, None)).await;
            return Err(exec_error(e));
        }
    };
    app.metrics.exec_start_seconds.observe(began.elapsed().as_secs_f64());
    let (tx, output) = mpsc::channel(64);
    let cancel = Cancel::new();
    let c = cancel.clone();
    let timeout = req.timeout_secs.map(Duration::from_secs);
    let done = tokio::task::spawn_blocking(move || {
        isocell_host::command::stream(&mut link, &mut ChannelSink(tx), timeout, &c)
    });
    Ok(Started { session, pid, input, output, done, cancel })
}

fn isocell_evidence_digest(argv: &[String]) -> String {
    isocell_evidence::canonical::sha256_hex(
        serde_json::to_string(argv).unwrap_or_default().as_bytes(),
    )
}

/// Records how session `session` of `cell` ended.
async fn ended(
    app: &Arc<App>,
    cell: &str,
    session: u64,
    t: &Termination,
) -> (Option<i32>, Option<i32>) {
    let (code, signal) = match t {
        Termination::Exited(ExitStatus::Code(c)) => (Some(*c), None),
        Termination::Exited(ExitStatus::Signal(s)) => (None, Some(*s)),
        Termination::TimedOut | Termination::Cancelled(_) => (None, Some(libc::SIGKILL)),
    };
    let (db, c) = (app.db.clone(), cell.to_owned());
    let _ = blocking(move || db.session_ended(&c, session, code, signal)).await;
    let (run, c) = (app.host.run_dir.clone(), cell.to_owned());
    let _ = blocking(move || {
        let data = json!({ "session": session, "exit_code": code, "signal": signal });
        supervisor::ask(
            &run,
            &c,
            &Request::Log { kind: "exit".into(), data },
            Duration::from_secs(10),
        )
    })
    .await;
    (code, signal)
}

/// Finds the exit status of a session nobody watches any more, in the background.
pub fn await_session(app: Arc<App>, cell: String, session: u64) {
    tokio::spawn(async move {
        let socket = SessionSocket::of(&app.host.run_dir, &cell);
        if let Ok(Ok(status)) = blocking(move || socket.wait(session)).await {
            ended(&app, &cell, session, &Termination::Exited(status)).await;
        }
    });
}

/// Runs `req` to its end and returns its output (the non-streaming exec).
pub async fn run(app: &Arc<App>, row: &CellRow, req: &ExecRequest) -> Result<ExecResult, ApiError> {
    if req.tty.is_some() || req.stdin {
        return Err(ApiError::bad_request(
            "tty and stdin need the streaming exec (GET /v1/cells/{id}/exec, a WebSocket)",
        ));
    }
    let mut s = start(app, row, req).await?;
    let (mut stdout, mut stderr, mut truncated) = (Vec::new(), Vec::new(), false);
    while let Some(out) = s.output.recv().await {
        let (buf, bytes) = match out {
            Out::Stdout(b) => (&mut stdout, b),
            Out::Stderr(b) => (&mut stderr, b),
        };
        let room = MAX_COLLECT.saturating_sub(buf.len());
        truncated |= bytes.len() > room;
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
    let t = s.done.await.map_err(|e| ApiError::internal(e.to_string()))?;
    let t = match t {
        Ok(t) => t,
        Err(e) => {
            await_session(app.clone(), row.id.clone(), s.session);
            return Err(exec_error(e));
        }
    };
    let (exit_code, signal) = ended(app, &row.id, s.session, &t).await;
    Ok(ExecResult {
        session: s.session,
        exit_code,
        signal,
        timed_out: t == Termination::TimedOut,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        truncated,
    })
}

/// A control message from a streaming client.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Control {
    StdinEof,
    Resize { rows: u16, cols: u16 },
    Signal { signal: i32 },
}

async fn send_json(
    ws: &mut futures_util::stream::SplitSink<WebSocket, Ws>,
    v: serde_json::Value,
) -> bool {
    ws.send(Ws::Text(v.to_string().into())).await.is_ok()
}

/// Serves one streaming exec on an upgraded WebSocket.
pub async fn stream(app: Arc<App>, row: CellRow, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let first = tokio::time::timeout(Duration::from_secs(30), rx.next()).await;
    let req: Result<ExecRequest, String> = match first {
        Ok(Some(Ok(Ws::Text(t)))) => {
            serde_json::from_str(&t).map_err(|e| format!("the exec request: {e}"))
        }
        Ok(_) => Err("send the exec request as the first (text) message".into()),
        Err(_) => Err("no exec request within 30 s".into()),
    };
    let started = match req {
        Ok(req) => start(&app, &row, &req).await,
        Err(m) => Err(ApiError::bad_request(m)),
    };
    let mut s = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = send_json(
                &mut tx,
                json!({ "type": "error", "code": e.code, "message": e.message }),
            )
            .await;
            let _ = tx.close().await;
            return;
        }
    };
    if !send_json(&mut tx, json!({ "type": "started", "session": s.session, "pid": s.pid })).await {
        s.cancel.cancel(CancelReason::Detached);
    }
    let mut watching = !s.cancel.is_cancelled();
    loop {
        tokio::select! {
            out = s.output.recv() => {
                let Some(out) = out else { break };
                let frame = match out {
                    Out::Stdout(mut b) => { b.insert(0, 1); b }
                    Out::Stderr(mut b) => { b.insert(0, 2); b }
                };
                if watching && tx.send(Ws::Binary(frame.into())).await.is_err() {
                    watching = false;
                    s.cancel.cancel(CancelReason::Detached);
                }
            }
            msg = rx.next(), if watching => {
                let input = s.input.clone();
                match msg {
                    Some(Ok(Ws::Binary(b))) if b.first() == Some(&0) => {
                        let data = b[1..].to_vec();
                        let _ = blocking(move || input.stdin(&data)).await;
                    }
                    Some(Ok(Ws::Text(t))) => {
                        let r = match serde_json::from_str::<Control>(&t) {
                            Ok(Control::StdinEof) => blocking(move || input.close_stdin()).await,
                            Ok(Control::Resize { rows, cols }) => {
                                blocking(move || input.resize(WindowSize { rows, cols })).await
                            }
                            Ok(Control::Signal { signal }) => blocking(move || input.signal(signal)).await,
                            Err(e) => {
                                let _ = send_json(&mut tx, json!({ "type": "error", "code": "bad_request", "message": format!("control message: {e}") })).await;
                                continue;
                            }
                        };
                        drop(r);
                    }
                    Some(Ok(Ws::Ping(_) | Ws::Pong(_))) => {}
                    Some(Ok(Ws::Binary(_))) => {
                        let _ = send_json(&mut tx, json!({ "type": "error", "code": "bad_request", "message": "binary frames from the client start with 0 (stdin)" })).await;
                    }
                    // The client went away: the command goes on.
                    _ => {
                        watching = false;
                        s.cancel.cancel(CancelReason::Detached);
                    }
                }
            }
        }
    }
    match s.done.await {
        Ok(Ok(t)) => {
            let (code, signal) = ended(&app, &row.id, s.session, &t).await;
            let _ = send_json(
                &mut tx,
                json!({ "type": "exit", "session": s.session, "exit_code": code, "signal": signal, "timed_out": t == Termination::TimedOut }),
            )
            .await;
        }
        Ok(Err(e)) => {
            await_session(app.clone(), row.id.clone(), s.session);
            if !matches!(e, CellError::Cancelled(CancelReason::Detached)) {
                let _ = send_json(
                    &mut tx,
                    json!({ "type": "error", "code": "cell_failed", "message": e.to_string() }),
                )
                .await;
            }
        }
        Err(e) => {
            let _ = send_json(
                &mut tx,
                json!({ "type": "error", "code": "internal", "message": e.to_string() }),
            )
            .await;
        }
    }
    let _ = tx.close().await;
}
