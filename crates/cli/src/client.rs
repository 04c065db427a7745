//! `isocell cell ...`: the command line as a client of the daemon `isocelld`.
//!
//! Requests are HTTP/1.1 (JSON in, JSON out) on the daemon's Unix socket, where the daemon knows
//! the client by its peer credentials, or over TLS to its TCP listener (`--host https://...`),
//! where the client's certificate (`--tls-cert`/`--tls-key`) is its identity. `cell exec` is the daemon's streaming exec: a WebSocket on
//! `GET /v1/cells/{id}/exec` whose first message is the request, then binary frames (0 stdin
//! from here, 1 stdout and 2 stderr from the daemon) and JSON control messages.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
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
    /// The daemon, as unix:///PATH or https://HOST[:PORT] (port 7443 unless given) [default:
    /// $ISOCELL_HOST, else unix:///run/isocell/isocelld.sock].
    #[arg(long, global = true, value_name = "URL")]
    host: Option<String>,
    /// With https://: this client's certificate (PEM), whose subject is its identity
    /// [default: $ISOCELL_TLS_CERT].
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// With https://: the private key of --tls-cert (PEM) [default: $ISOCELL_TLS_KEY].
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// With https://: the CA certificate(s) (PEM) the daemon's certificate must chain to
    /// [default: $ISOCELL_TLS_CA].
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
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
    /// Copy a file or directory tree into a running cell, or out of one.
    #[command(after_help = CP_HELP)]
    Cp(CpArgs),
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
    /// Where the cell may connect (repeatable): HOST:PORT, *.DOMAIN:PORT, A.B.C.D[/LEN]:PORT
    /// [default: nowhere].
    #[arg(long = "egress", value_name = "RULE")]
    egress: Vec<String>,
    /// Forward a port of the daemon's host into the cell (repeatable): [HOST_IP:]HOST_PORT:GUEST_PORT.
    #[arg(long = "publish", value_name = "[IP:]PORT:PORT")]
    publish: Vec<String>,
    /// Start the cell from this snapshot (`isocell snapshot create`) instead of booting it; its
    /// image, vCPUs and memory are the snapshot's.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["image", "cpus", "memory", "egress", "publish"])]
    snapshot: Option<String>,
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
    pub(crate) interactive: bool,
    /// Run the command on a terminal (this one's size; raw mode here while it runs).
    #[arg(short, long)]
    pub(crate) tty: bool,
    /// Environment variable for the command, K=V (K alone: its value here). Repeat for more.
    #[arg(short, long = "env", value_name = "K=V")]
    pub(crate) env: Vec<String>,
    /// Working directory of the command in the cell (absolute).
    #[arg(short, long, value_name = "DIR")]
    pub(crate) workdir: Option<String>,
    /// User (and group) to run as: a name or UID, optionally :GROUP or :GID.
    #[arg(short, long)]
    pub(crate) user: Option<String>,
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    pub(crate) timeout: Option<u64>,
    /// The cell.
    #[arg(value_name = "ID")]
    pub(crate) id: String,
    /// The command and its arguments (after `--` if they start with `-`).
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub(crate) command: Vec<String>,
}

/// `isocell cell cp`.
#[derive(Args, Debug)]
pub struct CpArgs {
    /// What to copy: a file or directory here, or ID:/PATH in a cell.
    #[arg(value_name = "SRC")]
    src: String,
    /// Where to copy it: ID:/DIR in a cell (created if missing), or an existing directory here.
    #[arg(value_name = "DST")]
    dst: String,
}

/// The end of `isocell cell cp --help`.
const CP_HELP: &str = "\
Exactly one of SRC and DST is in a cell, written ID:/PATH (an absolute path); the other is
here (write a local name that has a colon as ./NAME). SRC keeps its name under DST:
  isocell cell cp ./app ID:/srv              makes /srv/app in the cell (a file or a tree)
  isocell cell cp ID:/var/log/app.log .      makes ./app.log here
Only regular files and directories are copied; other files in a tree sent to a cell are
skipped with a warning. Files arrive with mode 0644, or 0755 if they are executable;
directories with 0755.";

/// Why a command failed, and the exit status that says so.
#[derive(Debug)]
pub(crate) struct Failure {
    /// `isocell`'s exit status.
    status: u8,
    /// What went wrong.
    message: String,
    /// Figures that go with it (capacity errors), shown as JSON.
    details: Option<Value>,
}

impl Failure {
    /// A failure of `isocell` itself (125).
    pub(crate) fn new(message: impl Into<String>) -> Failure {
        Failure { status: exit::ISOCELL_FAILED, message: message.into(), details: None }
    }

    /// Prints it and returns the exit status.
    pub(crate) fn report(self) -> u8 {
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

/// Where the daemon listens.
#[derive(Debug, PartialEq)]
enum Endpoint {
    /// Its Unix socket.
    Unix(PathBuf),
    /// Its TLS listener: host name or address (as the certificate names it) and port.
    Tls { host: String, port: u16 },
}

/// The port of `https://HOST` without one.
const DEFAULT_TLS_PORT: u16 = 7443;

/// The endpoint that `--host` (else `ISOCELL_HOST`, else the default) names.
fn endpoint(host: Option<&str>) -> Result<Endpoint, Failure> {
    let from_env = std::env::var("ISOCELL_HOST").ok().filter(|s| !s.is_empty());
    let url = host.or(from_env.as_deref()).unwrap_or(DEFAULT_HOST);
    if let Some(path) = url.strip_prefix("unix://") {
        if path.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        return Err(Failure::new(format!(
            "--host {url}: give the socket's absolute path, as unix:///run/isocell/isocelld.sock"
        )));
    }
    if let Some(rest) = url.strip_prefix("https://") {
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let bad = || {
            Failure::new(format!(
                "--host {url}: give https://HOST or https://HOST:PORT (an IPv6 address in \
                 brackets), without a path"
            ))
        };
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (addr, after) = v6.split_once(']').ok_or_else(bad)?;
                (addr, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
            None => DEFAULT_TLS_PORT,
        };
        if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad());
        }
        return Ok(Endpoint::Tls { host: host.to_owned(), port });
    }
    if url.starts_with("http://") {
        return Err(Failure::new(format!(
            "--host {url}: the daemon's TCP listener speaks only TLS; use https://"
        )));
    }
    Err(Failure::new(format!("--host {url}: give unix:///PATH or https://HOST[:PORT]")))
}

/// The client side of TLS: the daemon's CA and this client's certificate and key, from the
/// flags or else `ISOCELL_TLS_CA`, `ISOCELL_TLS_CERT` and `ISOCELL_TLS_KEY`.
fn tls_client(args: &CellArgs) -> Result<Arc<rustls::ClientConfig>, Failure> {
    let file = |flag: &Option<PathBuf>, name: &str, env: &str| {
        flag.clone()
            .or_else(|| std::env::var_os(env).filter(|v| !v.is_empty()).map(PathBuf::from))
            .ok_or_else(|| {
                Failure::new(format!(
                    "an https:// daemon needs --tls-{name} FILE (or {env}): the daemon accepts \
                     only clients with a certificate its client CA signed"
                ))
            })
    };
    let ca = file(&args.tls_ca, "ca", "ISOCELL_TLS_CA")?;
    let cert = file(&args.tls_cert, "cert", "ISOCELL_TLS_CERT")?;
    let key = file(&args.tls_key, "key", "ISOCELL_TLS_KEY")?;
    tls_config(&ca, &cert, &key)
}

/// A TLS client configuration from a CA file, a certificate chain and its key (PEM).
fn tls_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<rustls::ClientConfig>, Failure> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = |path: &Path, flag: &str| {
        CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| Failure::new(format!("--{flag} {}: {e}", path.display())))
            .and_then(|c| {
                if c.is_empty() {
                    Err(Failure::new(format!("--{flag} {}: no PEM certificate", path.display())))
                } else {
                    Ok(c)
                }
            })
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca, "tls-ca")? {
        roots.add(c).map_err(|e| Failure::new(format!("--tls-ca {}: {e}", ca.display())))?;
    }
    let chain = certs(cert, "tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Failure::new(format!("--tls-key {}: {e}", key.display())))?;
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| Failure::new(format!("--tls-cert with --tls-key: {e}")))?;
    Ok(Arc::new(config))
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

/// A connection to the daemon: a Unix socket or a TLS stream.
trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Conn for T {}

/// The daemon.
pub(crate) struct Daemon {
    endpoint: Endpoint,
    /// It is the `isocell machine`'s (image names on this host's loopback are renamed).
    machine: bool,
    /// With a TLS endpoint: the client's TLS configuration.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Daemon {
    /// Where it is, for messages.
    fn name(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => p.display().to_string(),
            Endpoint::Tls { host, port } if host.contains(':') => {
                format!("https://[{host}]:{port}")
            }
            Endpoint::Tls { host, port } => format!("https://{host}:{port}"),
        }
    }

    /// The Host header of requests.
    fn authority(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(_) => "localhost".into(),
            Endpoint::Tls { .. } => self.name().trim_start_matches("https://").to_owned(),
        }
    }

    /// A new connection to it.
    async fn connect(&self) -> Result<Box<dyn Conn>, Failure> {
        match (&self.endpoint, &self.tls) {
            (Endpoint::Unix(socket), _) => self.connect_unix(socket).await,
            (Endpoint::Tls { host, port }, Some(config)) => {
                let tcp =
                    tokio::net::TcpStream::connect((host.as_str(), *port)).await.map_err(|e| {
                        Failure::new(format!(
                            "the daemon is not reachable at {} ({e}); is its [tls] listener on?",
                            self.name()
                        ))
                    })?;
                let _ = tcp.set_nodelay(true);
                let server = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| Failure::new(format!("--host {}: {e}", self.name())))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(server, tcp)
                    .await
                    .map_err(|e| {
                        Failure::new(format!(
                            "the daemon at {}: TLS: {e} (the daemon's certificate must chain to \
                             --tls-ca and name this host; yours must be signed by its client CA)",
                            self.name()
                        ))
                    })?;
                Ok(Box::new(tls))
            }
            (Endpoint::Tls { .. }, None) => {
                Err(Failure::new(format!("{}: no TLS configuration", self.name())))
            }
        }
    }

    async fn connect_unix(&self, socket: &Path) -> Result<Box<dyn Conn>, Failure> {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            let at = socket.display();
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
        })?;
        Ok(Box::new(stream))
    }

    /// A failure talking to the daemon.
    fn lost(&self, e: &dyn std::fmt::Display) -> Failure {
        Failure::new(format!("the daemon at {}: {e}", self.name()))
    }

    /// Sends `req` on a new connection; the answer (its body still to read) and the task that
    /// drives the connection (abort it to drop the request's body early).
    async fn send<B>(
        &self,
        req: Request<B>,
    ) -> Result<(Response<Incoming>, tokio::task::JoinHandle<()>), Failure>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.lost(&e))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        match sender.send_request(req).await {
            Ok(resp) => Ok((resp, conn)),
            Err(e) => {
                conn.abort();
                Err(self.lost(&e))
            }
        }
    }

    /// `method path` with an optional JSON `body`; the answer's body if it is a success.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Bytes, Failure> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.authority())
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
        let (resp, _conn) = self.send(req).await?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| self.lost(&e))?
            .to_bytes();
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(api_failure(status, &bytes))
        }
    }

    /// Like [`Daemon::call`], the answer as JSON.
    pub(crate) async fn json(
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

/// The daemon of the running `isocell machine`, over its forwarded loopback port.
pub(crate) fn machine_daemon(api: &isocell_machine::Api) -> Result<Daemon, Failure> {
    Ok(Daemon {
        endpoint: Endpoint::Tls { host: "127.0.0.1".into(), port: api.port },
        machine: true,
        tls: Some(tls_config(&api.ca, &api.cert, &api.key)?),
    })
}

/// The daemon `isocell cell` talks to: `--host` or `ISOCELL_HOST` if given; else the local
/// socket, unless there is none and this host cannot run cells, where the running machine's
/// daemon is used (said once on stderr).
fn daemon_for(args: &CellArgs) -> Result<Daemon, Failure> {
    let named = args.host.is_some() || std::env::var("ISOCELL_HOST").is_ok_and(|h| !h.is_empty());
    let endpoint = endpoint(args.host.as_deref())?;
    if let (false, Endpoint::Unix(socket)) = (named, &endpoint) {
        if !socket.exists() {
            if let Err(why) = isocell_machine::hardware_virtualization() {
                let machine = isocell_machine::Machine::at(isocell_machine::default_dir());
                let api = machine.api().map_err(|e| {
                    Failure::new(format!(
                        "no isocelld here ({} does not exist), and this host cannot run cells itself ({why}): {e}",
                        socket.display()
                    ))
                })?;
                tell!("isocell: no hardware virtualization here; using the isocell machine's daemon (https://127.0.0.1:{})", api.port);
                return machine_daemon(&api);
            }
        }
    }
    let tls = match endpoint {
        Endpoint::Tls { .. } => Some(tls_client(args)?),
        Endpoint::Unix(_) => None,
    };
    Ok(Daemon { endpoint, machine: false, tls })
}

/// Runs `isocell cell ...`; returns the exit status.
pub fn cell(args: CellArgs) -> u8 {
    let daemon = match daemon_for(&args) {
        Ok(d) => d,
        Err(f) => return f.report(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return exit::fail(&format!("async runtime: {e}")),
    };
    match runtime.block_on(dispatch(&daemon, args.command)) {
        Ok(status) => status,
        Err(f) => f.report(),
    }
}

async fn dispatch(daemon: &Daemon, command: CellCmd) -> Result<u8, Failure> {
    match command {
        CellCmd::Create(mut a) => {
            if daemon.machine {
                if let Some(there) = a.image.as_deref().and_then(crate::machine::image_for_machine)
                {
                    tell!(
                        "isocell: image {} is {there} from inside the isocell machine",
                        a.image.as_deref().unwrap_or_default()
                    );
                    a.image = Some(there);
                }
            }
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
        CellCmd::Cp(a) => match cp_plan(&a.src, &a.dst)? {
            Transfer::In { host, id, dir } => upload(daemon, &host, &id, &dir).await,
            Transfer::Out { id, path, host } => download(daemon, &id, &path, &host).await,
        },
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
pub(crate) fn cell_path(id: &str, rest: &str) -> String {
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
    if !a.egress.is_empty() {
        m.insert("egress".into(), json!(a.egress));
    }
    if !a.publish.is_empty() {
        m.insert("publish".into(), json!(a.publish));
    }
    if let Some(s) = &a.snapshot {
        m.insert("snapshot".into(), json!(s));
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
pub(crate) async fn exec(daemon: &Daemon, a: ExecArgs) -> Result<u8, Failure> {
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
        other => {
            Failure::new(format!("the daemon at {}: the exec connection: {other}", daemon.name()))
        }
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

// ---- cp ----

/// What `cell cp SRC DST` is to do.
#[derive(Debug, PartialEq, Eq)]
enum Transfer {
    /// `host` (a file or a tree) into the directory `dir` of cell `id`.
    In { host: PathBuf, id: String, dir: String },
    /// `path` of cell `id` into the existing directory `host`.
    Out { id: String, path: String, host: PathBuf },
}

/// `s` as `ID:/PATH`, if it is one: an id without `/`, then an absolute path.
fn cell_side(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    (!id.is_empty() && !id.contains('/') && path.starts_with('/')).then_some((id, path))
}

/// Which way `cell cp SRC DST` copies.
fn cp_plan(src: &str, dst: &str) -> Result<Transfer, Failure> {
    let no_nul = |s: &str| {
        if s.contains('\0') {
            Err(Failure::new(format!("{s:?}: a path cannot contain a NUL byte")))
        } else {
            Ok(())
        }
    };
    no_nul(src)?;
    no_nul(dst)?;
    let local = |s: &str| {
        if s.is_empty() {
            Err(Failure::new("give a path here, not an empty one"))
        } else {
            Ok(PathBuf::from(s))
        }
    };
    match (cell_side(src), cell_side(dst)) {
        (None, Some((id, dir))) => {
            Ok(Transfer::In { host: local(src)?, id: id.to_owned(), dir: dir.to_owned() })
        }
        (Some((id, path)), None) => {
            Ok(Transfer::Out { id: id.to_owned(), path: path.to_owned(), host: local(dst)? })
        }
        (Some(_), Some(_)) => Err(Failure::new(
            "both sides are in a cell; copy out to a directory here, then into the other cell",
        )),
        (None, None) => Err(Failure::new(format!(
            "{src} {dst}: give one side as ID:/PATH in a cell (an absolute path), as in \
             `isocell cell cp ./app ID:/srv` or `isocell cell cp ID:/var/log/app.log .`"
        ))),
    }
}

/// `/v1/cells/{id}/files?path=...`.
fn files_path(id: &str, path: &str) -> String {
    format!("{}?path={}", cell_path(id, "/files"), segment(path))
}

/// The mode a copied file gets: 0755 if any execute bit is set, else 0644.
fn file_mode(mode: u32) -> u32 {
    if mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// One file or directory of an upload.
#[derive(Debug)]
struct Item {
    /// Where it is here.
    host: PathBuf,
    /// Its name in the archive (no trailing `/`).
    name: PathBuf,
    /// A directory (else a regular file).
    dir: bool,
    /// A file's size when it was listed.
    size: u64,
    /// Any execute bit set.
    exec: bool,
    /// Modification time, seconds since the epoch.
    mtime: u64,
}

impl Item {
    fn new(host: PathBuf, name: PathBuf, meta: &std::fs::Metadata) -> Item {
        use std::os::unix::fs::MetadataExt as _;
        Item {
            host,
            name,
            dir: meta.is_dir(),
            size: if meta.is_dir() { 0 } else { meta.len() },
            exec: meta.mode() & 0o111 != 0,
            mtime: u64::try_from(meta.mtime()).unwrap_or(0),
        }
    }
}

/// What an upload of `src` sends, parents before what is in them; warns on stderr about what
/// it skips (anything in a tree that is not a regular file or directory).
fn upload_items(src: &Path) -> Result<Vec<Item>, Failure> {
    let at = |p: &Path, e: &dyn std::fmt::Display| Failure::new(format!("{}: {e}", p.display()));
    // The path given is followed if it is a symbolic link (it keeps its own name); nothing
    // inside a tree is.
    let meta = std::fs::metadata(src).map_err(|e| at(src, &e))?;
    let root = if std::fs::symlink_metadata(src).map_err(|e| at(src, &e))?.is_symlink() {
        std::fs::canonicalize(src).map_err(|e| at(src, &e))?
    } else {
        src.to_path_buf()
    };
    let base = match src.file_name() {
        Some(n) => n.to_owned(),
        None => std::fs::canonicalize(src)
            .map_err(|e| at(src, &e))?
            .file_name()
            .map(|n| n.to_owned())
            .ok_or_else(|| at(src, &"has no name to copy it under; name a directory in it"))?,
    };
    if !meta.is_dir() && !meta.is_file() {
        return Err(at(src, &"not a regular file or directory"));
    }
    if base.to_str().is_none() {
        return Err(at(src, &"the name is not UTF-8; cells take UTF-8 names only"));
    }
    let mut items = vec![Item::new(root.clone(), PathBuf::from(&base), &meta)];
    if !meta.is_dir() {
        return Ok(items);
    }
    let mut dirs = vec![(root, PathBuf::from(&base))];
    while let Some((host, name)) = dirs.pop() {
        let mut entries = Vec::new();
        for e in std::fs::read_dir(&host).map_err(|e| at(&host, &e))? {
            let e = e.map_err(|e| at(&host, &e))?;
            let path = e.path();
            // Not followed: DirEntry::metadata is lstat's.
            let m = e.metadata().map_err(|e| at(&path, &e))?;
            entries.push((e.file_name(), path, m));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut subdirs = Vec::new();
        for (file_name, path, m) in entries {
            if file_name.to_str().is_none() {
                return Err(at(&path, &"the name is not UTF-8; cells take UTF-8 names only"));
            }
            let ft = m.file_type();
            if ft.is_dir() {
                items.push(Item::new(path.clone(), name.join(&file_name), &m));
                subdirs.push((path, name.join(&file_name)));
            } else if ft.is_file() {
                items.push(Item::new(path, name.join(&file_name), &m));
            } else {
                tell!("isocell: skipping {}: not a regular file or directory", path.display());
            }
        }
        dirs.extend(subdirs.into_iter().rev());
    }
    Ok(items)
}

/// The most bytes of archive one upload may have (the daemon's limit).
const MAX_UPLOAD_BYTES: u64 = 4 << 30;
/// The most files and directories one upload may have (the daemon's limit).
const MAX_UPLOAD_ENTRIES: usize = 100_000;

/// The size of the tar archive of `items`, bytes.
fn archive_size(items: &[Item]) -> u64 {
    let blocks = |n: u64| n.div_ceil(512) * 512;
    let mut total = 1024; // the end of the archive
    for item in items {
        total += 512 + blocks(item.size);
        let name_len = item.name.as_os_str().len() as u64 + u64::from(item.dir);
        if name_len > 100 {
            total += 512 + blocks(name_len + 1); // a GNU long name
        }
    }
    total
}

/// Refuses an upload bigger than the daemon takes, before anything is sent.
fn check_upload_size(host: &Path, items: &[Item]) -> Result<(), Failure> {
    if items.len() > MAX_UPLOAD_ENTRIES {
        return Err(Failure::new(format!(
            "{}: {} files and directories; one copy into a cell may have at most \
             {MAX_UPLOAD_ENTRIES}; copy it in parts",
            host.display(),
            items.len()
        )));
    }
    let size = archive_size(items);
    if size > MAX_UPLOAD_BYTES {
        return Err(Failure::new(format!(
            "{}: {size} bytes as a tar archive; one copy into a cell may be at most \
             {MAX_UPLOAD_BYTES} bytes (4 GiB); copy it in parts",
            host.display()
        )));
    }
    Ok(())
}

/// A writer that refuses everything once `broken` is set (so that a `tar::Builder` dropped
/// after an error does not end a cut-short archive as if it were whole).
struct Guarded<W> {
    inner: W,
    broken: bool,
}

impl<W: std::io::Write> std::io::Write for Guarded<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.broken {
            return Err(std::io::Error::other("the archive was abandoned"));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.broken {
            return Err(std::io::Error::other("the archive was abandoned"));
        }
        self.inner.flush()
    }
}

/// Reads exactly `left` bytes of a file, failing if it has fewer.
struct Exact<'a> {
    inner: std::io::Take<std::fs::File>,
    left: u64,
    path: &'a Path,
}

impl std::io::Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{}: it shrank while being read", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Appends one item to `b`.
fn append_item<W: std::io::Write>(b: &mut tar::Builder<W>, item: &Item) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut h = tar::Header::new_gnu();
    h.set_mtime(item.mtime);
    h.set_uid(0);
    h.set_gid(0);
    if item.dir {
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        let mut name = item.name.clone().into_os_string();
        name.push("/");
        return b.append_data(&mut h, name, std::io::empty());
    }
    let at =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", item.host.display()));
    // Not through a symbolic link, and without blocking on something that has become a FIFO.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&item.host)
        .map_err(at)?;
    if !f.metadata().map_err(at)?.is_file() {
        return Err(at(std::io::Error::other("it is no longer a regular file")));
    }
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(item.size);
    h.set_mode(file_mode(if item.exec { 0o755 } else { 0o644 }));
    let data =
        Exact { inner: std::io::Read::take(f, item.size), left: item.size, path: &item.host };
    b.append_data(&mut h, &item.name, data)
}

/// Writes the tar archive of `items` to `w`: relative names, regular files and directories,
/// owner 0, modes 0644/0755.
fn write_upload<W: std::io::Write>(items: &[Item], w: W) -> std::io::Result<W> {
    let mut b = tar::Builder::new(Guarded { inner: w, broken: false });
    for item in items {
        if let Err(e) = append_item(&mut b, item) {
            b.get_mut().broken = true;
            return Err(e);
        }
    }
    Ok(b.into_inner()?.inner)
}

/// An upload's bytes on their way to the request body.
type Chunk = std::io::Result<Bytes>;

/// A writer that sends what it is given down a channel, in chunks (from a blocking thread).
struct ChannelWriter {
    tx: mpsc::Sender<Chunk>,
    buf: Vec<u8>,
}

/// The size of a chunk of an upload.
const CHUNK: usize = 256 << 10;

impl ChannelWriter {
    fn push(&mut self) -> std::io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(Ok(Bytes::from(chunk))).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the daemon stopped taking the archive",
            )
        })
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.push()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.push()?;
        }
        Ok(())
    }
}

/// A request body fed by a channel; an error in it aborts the request.
struct ChannelBody {
    rx: mpsc::Receiver<Chunk>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|c| c.map(|r| r.map(Frame::data)))
    }
}

/// Writes the archive of `items` to `tx` (on a blocking thread). `Err(Some(_))`: it failed
/// here, and the body was ended with an error; `Err(None)`: the other end stopped reading.
fn send_tar(items: &[Item], tx: mpsc::Sender<Chunk>) -> Result<(), Option<String>> {
    let w = ChannelWriter { tx: tx.clone(), buf: Vec::with_capacity(CHUNK) };
    let result = write_upload(items, w).and_then(|mut w| std::io::Write::flush(&mut w));
    match result {
        Ok(()) => Ok(()),
        Err(_) if tx.is_closed() => Err(None),
        Err(e) => {
            let message = e.to_string();
            let _ = tx.blocking_send(Err(e));
            Err(Some(message))
        }
    }
}

/// `PUT /v1/cells/{id}/files?path=DIR` with the tar archive `body`; the answer's status and
/// body.
async fn put_files<B>(
    daemon: &Daemon,
    id: &str,
    dir: &str,
    body: B,
) -> Result<(StatusCode, Bytes), Failure>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let req = Request::builder()
        .method(Method::PUT)
        .uri(files_path(id, dir))
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::CONTENT_TYPE, "application/x-tar")
        .body(body)
        .map_err(|e| Failure::new(format!("request: {e}")))?;
    let (resp, conn) = daemon.send(req).await?;
    let status = resp.status();
    let answer = Limited::new(resp.into_body(), MAX_ANSWER).collect().await;
    // Whatever of the archive is still unsent goes nowhere now.
    conn.abort();
    answer.map(|b| (status, b.to_bytes())).map_err(|e| daemon.lost(&e))
}

/// `isocell cell cp HOSTPATH ID:/DIR`.
pub(crate) async fn upload(
    daemon: &Daemon,
    host: &Path,
    id: &str,
    dir: &str,
) -> Result<u8, Failure> {
    upload_as(daemon, host, None, id, dir).await
}

/// [`upload`], the top entry named `name` in the cell instead of its own name.
pub(crate) async fn upload_as(
    daemon: &Daemon,
    host: &Path,
    name: Option<&str>,
    id: &str,
    dir: &str,
) -> Result<u8, Failure> {
    let mut items = upload_items(host)?;
    if let Some(name) = name {
        let own = items.first().map(|i| i.name.clone()).unwrap_or_default();
        for item in &mut items {
            let rest = item.name.strip_prefix(&own).map(Path::to_path_buf).unwrap_or_default();
            item.name = if rest.as_os_str().is_empty() {
                PathBuf::from(name)
            } else {
                Path::new(name).join(rest)
            };
        }
    }
    check_upload_size(host, &items)?;
    let (tx, rx) = mpsc::channel::<Chunk>(4);
    let builder = tokio::task::spawn_blocking(move || send_tar(&items, tx));
    let answer = put_files(daemon, id, dir, ChannelBody { rx }).await;
    let built = builder
        .await
        .map_err(|e| Failure::new(format!("the archive of {}: {e}", host.display())))?;
    match (answer, built) {
        (Ok((status, body)), _) if !status.is_success() => Err(api_failure(status, &body)),
        (Ok(_), Ok(())) => Ok(0),
        (_, Err(Some(message))) => Err(Failure::new(format!("copying into cell {id}: {message}"))),
        (Ok(_), Err(None)) => Err(Failure::new(format!(
            "the daemon answered before it had taken the whole archive of {}",
            host.display()
        ))),
        (Err(f), _) => {
            // A daemon that refuses the copy may answer and close before it has read the
            // archive, and the connection can then break on the archive's way out before its
            // answer is read. Asking again with an empty archive gets that answer (an empty
            // archive only makes the directory).
            let empty = write_upload(&[], Vec::new())
                .map_err(|e| Failure::new(format!("an empty archive: {e}")))?;
            match put_files(daemon, id, dir, Full::new(Bytes::from(empty))).await {
                Ok((status, body)) if !status.is_success() => Err(api_failure(status, &body)),
                _ => Err(f),
            }
        }
    }
}

/// A reader of what a channel brings (on a blocking thread).
struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    cur: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// What a tar entry type is, in words.
fn kind_name(t: tar::EntryType) -> String {
    match t {
        tar::EntryType::Symlink => "symbolic link".into(),
        tar::EntryType::Link => "hard link".into(),
        tar::EntryType::Char => "character device".into(),
        tar::EntryType::Block => "block device".into(),
        tar::EntryType::Fifo => "FIFO".into(),
        tar::EntryType::GNUSparse => "sparse file".into(),
        other => format!("entry of type {:?}", char::from(other.as_byte())),
    }
}

/// An entry's name as a relative path without `.` components; absolute names and `..` are
/// refused.
fn safe_name(name: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::CurDir => {}
            std::path::Component::RootDir | std::path::Component::Prefix(_) => {
                return Err(format!("{}: an absolute name; refused", name.display()))
            }
            std::path::Component::ParentDir => {
                return Err(format!("{}: a name with `..`; refused", name.display()))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("{:?}: an empty name; refused", name.display().to_string()));
    }
    Ok(out)
}

/// Checks the way from `dest` to `dest/rel`: no symbolic link on it (not even at its end), and
/// directories before its end. The first part of it that does not exist yet, if any.
fn check_way(dest: &Path, rel: &Path) -> Result<Option<PathBuf>, String> {
    let parts: Vec<_> = rel.components().collect();
    let mut p = dest.to_path_buf();
    for (i, c) in parts.iter().enumerate() {
        p.push(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "{}: a symbolic link; refusing to write through it",
                    p.display()
                ))
            }
            Ok(m) if i + 1 < parts.len() && !m.is_dir() => {
                return Err(format!("{}: not a directory", p.display()))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(p)),
            Err(e) => return Err(format!("{}: {e}", p.display())),
        }
    }
    Ok(None)
}

/// Extracts the tar archive `reader` under the directory `dest`: regular files and directories
/// only, no absolute names or `..`, never through a symbolic link; files 0644 or 0755,
/// directories 0755. On an error, what it created is removed. Returns the number of entries.
fn extract<R: std::io::Read>(reader: R, dest: &Path) -> Result<u64, String> {
    let mut created = Vec::new();
    let result = extract_into(reader, dest, &mut created);
    if result.is_err() {
        for p in created.iter().rev() {
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => {
                    let _ = std::fs::remove_dir_all(p);
                }
                Ok(_) => {
                    let _ = std::fs::remove_file(p);
                }
                Err(_) => {}
            }
        }
    }
    result.map_err(|e| {
        if created.is_empty() {
            e
        } else {
            format!("{e} (what this copy had written is removed)")
        }
    })
}

fn extract_into<R: std::io::Read>(
    reader: R,
    dest: &Path,
    created: &mut Vec<PathBuf>,
) -> Result<u64, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let bad = |e: &dyn std::fmt::Display| format!("the archive from the cell: {e}");
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(false);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut count = 0u64;
    for entry in archive.entries().map_err(|e| bad(&e))? {
        let mut entry = entry.map_err(|e| bad(&e))?;
        let name = entry.path().map_err(|e| bad(&e))?.into_owned();
        let kind = entry.header().entry_type();
        let dir = if kind.is_dir() {
            true
        } else if kind.is_file() {
            false
        } else {
            return Err(bad(&format!(
                "{}: a {}; only regular files and directories are copied",
                name.display(),
                kind_name(kind)
            )));
        };
        let rel = safe_name(&name).map_err(|e| bad(&e))?;
        let target = dest.join(&rel);
        let first_new = check_way(dest, &rel)?;
        count += 1;
        if dir && first_new.is_none() && target.is_dir() {
            continue; // already there; its mode is left alone
        }
        if let Some(p) = first_new {
            created.push(p);
        }
        let mode = if dir { 0o755 } else { file_mode(entry.header().mode().unwrap_or(0)) };
        match entry.unpack_in(dest) {
            Ok(true) => {}
            Ok(false) => return Err(bad(&format!("{}: refused", name.display()))),
            Err(e) => return Err(format!("{}: {e}", target.display())),
        }
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", target.display()))?;
    }
    if count == 0 {
        return Err(bad(&"it is empty"));
    }
    Ok(count)
}

/// `isocell cell cp ID:/PATH HOSTDIR`.
pub(crate) async fn download(
    daemon: &Daemon,
    id: &str,
    path: &str,
    host: &Path,
) -> Result<u8, Failure> {
    match std::fs::metadata(host) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Failure::new(format!(
                "{}: not a directory; give an existing directory to copy into",
                host.display()
            )))
        }
        Err(e) => return Err(Failure::new(format!("{}: {e}", host.display()))),
    }
    let req = Request::builder()
        .method(Method::GET)
        .uri(files_path(id, path))
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::ACCEPT, "application/x-tar, application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| Failure::new(format!("request: {e}")))?;
    let (resp, conn) = daemon.send(req).await?;
    let status = resp.status();
    if !status.is_success() {
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| daemon.lost(&e))?
            .to_bytes();
        return Err(api_failure(status, &body));
    }
    let content_type = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if let Some(t) = content_type.filter(|t| !t.starts_with("application/x-tar")) {
        conn.abort();
        return Err(Failure::new(format!("the daemon answered with {t}, not a tar archive")));
    }
    let (tx, rx) = mpsc::channel::<Chunk>(8);
    let dest = host.to_path_buf();
    let extractor = tokio::task::spawn_blocking(move || {
        extract(ChannelReader { rx, cur: Bytes::new() }, &dest)
    });
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    if tx.send(Ok(data)).await.is_err() {
                        break; // the extraction ended (done, or failed)
                    }
                }
            }
            Err(e) => {
                let e = std::io::Error::other(format!("the daemon's stream broke off: {e}"));
                let _ = tx.send(Err(e)).await;
                break;
            }
        }
    }
    drop(tx);
    drop(body);
    conn.abort();
    extractor
        .await
        .map_err(|e| Failure::new(format!("extracting into {}: {e}", host.display())))?
        .map_err(|e| Failure::new(format!("copying out of cell {id}: {e}")))?;
    Ok(0)
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
            endpoint(Some("unix:///run/x/d.sock")).unwrap(),
            Endpoint::Unix(PathBuf::from("/run/x/d.sock"))
        );
        let tls = |host: &str, port| Endpoint::Tls { host: host.into(), port };
        assert_eq!(
            endpoint(Some("https://cells.example:8443")).unwrap(),
            tls("cells.example", 8443)
        );
        assert_eq!(endpoint(Some("https://cells.example/")).unwrap(), tls("cells.example", 7443));
        assert_eq!(endpoint(Some("https://127.0.0.1:9")).unwrap(), tls("127.0.0.1", 9));
        assert_eq!(endpoint(Some("https://[::1]:9")).unwrap(), tls("::1", 9));
        for bad in [
            "unix://relative.sock",
            "tcp://127.0.0.1:1",
            "https://",
            "https://h:0",
            "https://h:99999",
            "https://h:1/v1",
            "https://[::1",
            "https://u@h:1",
        ] {
            let f = endpoint(Some(bad)).unwrap_err();
            assert_eq!(f.status, 125, "{bad}");
        }
        let plain = endpoint(Some("http://127.0.0.1:1")).unwrap_err();
        assert!(plain.message.contains("only TLS"), "{}", plain.message);
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
        let c = parse(&["create", "--snapshot", "base"]);
        let CellCmd::Create(a) = c.command else { panic!("not create") };
        assert_eq!(create_body(&a), json!({ "snapshot": "base" }));
        assert!(Cli::try_parse_from([
            "isocell",
            "cell",
            "create",
            "--snapshot",
            "b",
            "--cpus",
            "2"
        ])
        .is_err());
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

    // ---- cp ----

    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn cp_sides() {
        assert_eq!(
            cp_plan("./app", "c1:/srv").unwrap(),
            Transfer::In { host: "./app".into(), id: "c1".into(), dir: "/srv".into() }
        );
        assert_eq!(
            cp_plan("c1:/var/log/a:b.log", ".").unwrap(),
            Transfer::Out { id: "c1".into(), path: "/var/log/a:b.log".into(), host: ".".into() }
        );
        // A local name with a colon, written with a `/` before it.
        assert_eq!(
            cp_plan("./x:/y", "c1:/d").unwrap(),
            Transfer::In { host: "./x:/y".into(), id: "c1".into(), dir: "/d".into() }
        );
        assert!(cp_plan("c1:/a", "c2:/b").is_err());
        assert!(cp_plan("a", "b").is_err());
        assert!(cp_plan("a", "c1:relative").is_err());
        assert!(cp_plan("", "c1:/d").is_err());
        assert!(cp_plan("a\0b", "c1:/d").is_err());
        let c = parse(&["cp", "./app", "c1:/srv"]);
        let CellCmd::Cp(a) = c.command else { panic!("not cp") };
        assert_eq!((a.src.as_str(), a.dst.as_str()), ("./app", "c1:/srv"));
        assert_eq!(files_path("c1", "/srv/my app"), "/v1/cells/c1/files?path=%2Fsrv%2Fmy%20app");
    }

    fn write(p: &Path, data: &[u8], mode: u32) {
        std::fs::write(p, data).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// A tree with files, directories, a symbolic link and a FIFO.
    fn sample_tree(root: &Path) -> PathBuf {
        let top = root.join("top");
        std::fs::create_dir_all(top.join("sub/deep")).unwrap();
        std::fs::create_dir(top.join("bin")).unwrap();
        std::fs::create_dir(top.join("empty")).unwrap();
        write(&top.join("a.txt"), b"hello", 0o600);
        write(&top.join("bin/run"), b"#!/bin/sh\n", 0o700);
        write(&top.join("sub/deep/f"), b"deep", 0o444);
        std::os::unix::fs::symlink("a.txt", top.join("link")).unwrap();
        let fifo =
            std::ffi::CString::new(top.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path we pass.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        top
    }

    /// (name, is a directory, mode, data) of each entry of `archive`.
    fn entries(archive: &[u8]) -> Vec<(String, bool, u32, Vec<u8>)> {
        let mut a = tar::Archive::new(archive);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
                let h = e.header().clone();
                assert!(h.entry_type().is_dir() || h.entry_type().is_file(), "{name}");
                assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                (name, h.entry_type().is_dir(), h.mode().unwrap(), data)
            })
            .collect()
    }

    #[test]
    fn upload_tar_has_only_files_and_dirs_under_the_basename() {
        let tmp = tempfile::tempdir().unwrap();
        let top = sample_tree(tmp.path());
        let items = upload_items(&top).unwrap();
        let archive = write_upload(&items, Vec::new()).unwrap();
        let got = entries(&archive);
        let names: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "top/",
                "top/a.txt",
                "top/bin/",
                "top/empty/",
                "top/sub/",
                "top/bin/run",
                "top/sub/deep/",
                "top/sub/deep/f"
            ]
        );
        for (name, dir, mode, data) in &got {
            let want = match name.as_str() {
                "top/a.txt" => (false, 0o644, &b"hello"[..]),
                "top/bin/run" => (false, 0o755, &b"#!/bin/sh\n"[..]),
                "top/sub/deep/f" => (false, 0o644, &b"deep"[..]),
                _ => (true, 0o755, &b""[..]),
            };
            assert_eq!((*dir, *mode, data.as_slice()), want, "{name}");
        }

        // One file: its name alone. A trailing `/.` still names the directory.
        let one = write_upload(&upload_items(&top.join("bin/run")).unwrap(), Vec::new()).unwrap();
        let got = entries(&one);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.as_str(), got[0].1, got[0].2), ("run", false, 0o755));
        assert_eq!(upload_items(&top.join("sub/.")).unwrap()[0].name, PathBuf::from("sub"));

        // The path given may be a symbolic link (followed, keeping its name); a FIFO may not.
        std::os::unix::fs::symlink(top.join("sub"), tmp.path().join("alias")).unwrap();
        let items = upload_items(&tmp.path().join("alias")).unwrap();
        let names: Vec<_> = items.iter().map(|i| i.name.clone()).collect();
        assert_eq!(names, [PathBuf::from("alias"), "alias/deep".into(), "alias/deep/f".into()]);
        // The size estimate is the archive's size, long names included.
        let long = top.join("x".repeat(150));
        std::fs::create_dir(&long).unwrap();
        write(&long.join("y".repeat(120)), &[1; 1000], 0o644);
        let just = top.join("z".repeat(96)); // "top/zzz...": 100 bytes, the most a header holds
        write(&just, b"z", 0o644);
        let items = upload_items(&top).unwrap();
        let archive = write_upload(&items, Vec::new()).unwrap();
        assert_eq!(archive_size(&items), archive.len() as u64);
        assert_eq!(entries(&archive).len(), 11);
        assert!(check_upload_size(&top, &items).is_ok());
        let mut huge = upload_items(&top.join("a.txt")).unwrap();
        huge[0].size = MAX_UPLOAD_BYTES;
        assert!(check_upload_size(&top, &huge).unwrap_err().message.contains("4 GiB"));
        std::fs::remove_dir_all(&long).unwrap();
        std::fs::remove_file(&just).unwrap();
        // Names that are not UTF-8 are refused (the daemon takes UTF-8 names only).
        let odd = tmp.path().join("odd");
        std::fs::create_dir(&odd).unwrap();
        let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"bad\xff");
        std::fs::write(odd.join(name), b"").unwrap();
        assert!(upload_items(&odd).unwrap_err().message.contains("not UTF-8"));
        let e = upload_items(&top.join("fifo")).unwrap_err();
        assert!(e.message.contains("not a regular file or directory"), "{}", e.message);
        assert!(upload_items(&tmp.path().join("missing")).is_err());
    }

    #[test]
    fn upload_fails_on_a_file_that_shrank_without_ending_the_archive() {
        let tmp = tempfile::tempdir().unwrap();
        let top = sample_tree(tmp.path());
        let items = upload_items(&top).unwrap();
        write(&top.join("bin/run"), b"#!", 0o700);
        let mut out = Vec::new();
        let e = write_upload(&items, &mut out).unwrap_err();
        assert!(e.to_string().contains("shrank"), "{e}");
        // The archive stops inside the cut-short entry: no padding, no end-of-archive blocks.
        assert_eq!(out.len() % 512, 2);
    }

    #[test]
    fn upload_and_extract_through_channels() {
        let tmp = tempfile::tempdir().unwrap();
        let top = sample_tree(tmp.path());
        let dest = tmp.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let items = upload_items(&top).unwrap();
        let (tx, rx) = mpsc::channel::<Chunk>(2);
        let sender = std::thread::spawn(move || send_tar(&items, tx));
        let n = extract(ChannelReader { rx, cur: Bytes::new() }, &dest).unwrap();
        sender.join().unwrap().unwrap();
        assert_eq!(n, 8);
        assert_eq!(std::fs::read(dest.join("top/a.txt")).unwrap(), b"hello");
        assert_eq!(std::fs::read(dest.join("top/sub/deep/f")).unwrap(), b"deep");
        assert_eq!(mode_of(&dest.join("top/a.txt")), 0o644);
        assert_eq!(mode_of(&dest.join("top/bin/run")), 0o755);
        assert_eq!(mode_of(&dest.join("top/sub/deep/f")), 0o644);
        assert_eq!(mode_of(&dest.join("top/empty")), 0o755);
        assert!(!dest.join("top/link").exists() && !dest.join("top/fifo").exists());
    }

    /// Appends an entry with a name written as it is (no checks).
    fn raw(
        b: &mut tar::Builder<Vec<u8>>,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        if kind == tar::EntryType::Symlink {
            h.set_link_name("/etc/passwd").unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    /// An archive with a directory and a file, then `last`.
    fn archive_then(last: (&str, tar::EntryType)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        raw(&mut b, "name/", tar::EntryType::Directory, 0o700, b"");
        raw(&mut b, "name/ok", tar::EntryType::Regular, 0o4777, b"ok");
        raw(&mut b, last.0, last.1, 0o644, if last.1.is_file() { b"bad" } else { b"" });
        b.into_inner().unwrap()
    }

    #[test]
    fn extraction_takes_files_and_dirs_with_fixed_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = archive_then(("name/plain", tar::EntryType::Regular));
        assert_eq!(extract(&archive[..], tmp.path()).unwrap(), 3);
        assert_eq!(mode_of(&tmp.path().join("name")), 0o755);
        assert_eq!(mode_of(&tmp.path().join("name/ok")), 0o755);
        assert_eq!(mode_of(&tmp.path().join("name/plain")), 0o644);
        assert_eq!(std::fs::read(tmp.path().join("name/plain")).unwrap(), b"bad");
        // Again over what is there: files are replaced, an existing directory keeps its mode.
        std::fs::set_permissions(tmp.path().join("name"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        assert_eq!(extract(&archive[..], tmp.path()).unwrap(), 3);
        assert_eq!(mode_of(&tmp.path().join("name")), 0o750);
    }

    #[test]
    fn extraction_refuses_escapes_and_links_and_leaves_nothing() {
        for (last, why) in [
            (("../x", tar::EntryType::Regular), "`..`"),
            (("name/../../x", tar::EntryType::Regular), "`..`"),
            (("/abs", tar::EntryType::Regular), "absolute"),
            (("name/link", tar::EntryType::Symlink), "symbolic link"),
            (("name/hard", tar::EntryType::Link), "hard link"),
            (("name/dev", tar::EntryType::Char), "character device"),
            (("name/pipe", tar::EntryType::Fifo), "FIFO"),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let dest = tmp.path().join("dest");
            std::fs::create_dir(&dest).unwrap();
            std::fs::write(dest.join("mine"), b"keep").unwrap();
            let e = extract(&archive_then(last)[..], &dest).unwrap_err();
            assert!(e.contains(why), "{}: {e}", last.0);
            assert!(e.contains("removed"), "{}: {e}", last.0);
            let left: Vec<_> =
                std::fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(left, ["mine"], "{}", last.0);
            assert_eq!(std::fs::read(dest.join("mine")).unwrap(), b"keep");
            assert!(!tmp.path().join("x").exists() && !Path::new("/abs").exists());
        }
        // A bad first entry: nothing was created.
        let mut b = tar::Builder::new(Vec::new());
        raw(&mut b, "/abs", tar::EntryType::Regular, 0o644, b"x");
        let tmp = tempfile::tempdir().unwrap();
        let e = extract(&b.into_inner().unwrap()[..], tmp.path()).unwrap_err();
        assert!(e.contains("absolute") && !e.contains("removed"), "{e}");
        // An empty archive is an error too.
        let empty = tar::Builder::new(Vec::new()).into_inner().unwrap();
        assert!(extract(&empty[..], tmp.path()).unwrap_err().contains("empty"));
    }

    #[test]
    fn extraction_never_goes_through_a_symlink_in_the_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&dest).unwrap();
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::create_dir(dest.join("inside")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dest.join("name")).unwrap();
        std::os::unix::fs::symlink(dest.join("inside"), dest.join("in")).unwrap();
        for archive in [
            archive_then(("name/plain", tar::EntryType::Regular)),
            {
                let mut b = tar::Builder::new(Vec::new());
                raw(&mut b, "in/f", tar::EntryType::Regular, 0o644, b"x");
                b.into_inner().unwrap()
            },
            {
                let mut b = tar::Builder::new(Vec::new());
                raw(&mut b, "in", tar::EntryType::Regular, 0o644, b"x");
                b.into_inner().unwrap()
            },
        ] {
            let e = extract(&archive[..], &dest).unwrap_err();
            assert!(e.contains("symbolic link"), "{e}");
        }
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(dest.join("inside")).unwrap().count(), 0);
        assert!(std::fs::symlink_metadata(dest.join("name")).unwrap().is_symlink());
        assert!(std::fs::symlink_metadata(dest.join("in")).unwrap().is_symlink());
    }

    /// Takes one request on `listener`: its head and (if `read_body`) body; then
    /// answers `answer` and closes.
    async fn serve_one(
        listener: &tokio::net::UnixListener,
        read_body: bool,
        answer: Vec<u8>,
    ) -> (String, Vec<u8>) {
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
        let (stream, _) = listener.accept().await.unwrap();
        let mut r = tokio::io::BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let mut body = Vec::new();
        let length = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().unwrap())
        });
        if let (true, Some(n)) = (read_body, length) {
            body.resize(n, 0);
            r.read_exact(&mut body).await.unwrap();
        } else if read_body {
            assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
            loop {
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                let n = usize::from_str_radix(line.trim(), 16).unwrap();
                let mut chunk = vec![0; n + 2];
                r.read_exact(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        }
        r.get_mut().write_all(&answer).await.unwrap();
        r.get_mut().shutdown().await.unwrap();
        (head, body)
    }

    fn answer(status: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
        let mut a = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        a.extend_from_slice(body);
        a
    }

    #[test]
    fn cp_against_a_fake_daemon() {
        let tmp = tempfile::tempdir().unwrap();
        let top = sample_tree(tmp.path());
        // Big enough that the archive cannot sit in the channel and socket buffers.
        write(&top.join("big"), &vec![7u8; 8 << 20], 0o644);
        let socket = tmp.path().join("d.sock");
        let dest = tmp.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let listener = tokio::net::UnixListener::bind(&socket).unwrap();
            let daemon =
                Daemon { endpoint: Endpoint::Unix(socket.clone()), machine: false, tls: None };
            let cp = |src: &Path, dst: &str| {
                CellCmd::Cp(CpArgs { src: src.display().to_string(), dst: dst.to_owned() })
            };

            // Upload: the whole archive as a chunked body; 204.
            let server = async {
                serve_one(&listener, true, b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()).await
            };
            let (status, (head, body)) =
                tokio::join!(dispatch(&daemon, cp(&top, "c1:/srv/my dir")), server);
            assert_eq!(status.unwrap(), 0);
            assert!(head.starts_with("PUT /v1/cells/c1/files?path=%2Fsrv%2Fmy%20dir HTTP/1.1"));
            assert!(head.to_ascii_lowercase().contains("content-type: application/x-tar"));
            let got = entries(&body);
            assert_eq!(got.len(), 9);
            assert!(got.iter().any(|e| e.0 == "top/big" && e.3.len() == 8 << 20));

            // Download: that archive back, extracted under `dest`.
            let server = serve_one(&listener, false, answer("200 OK", "application/x-tar", &body));
            let to = dest.display().to_string();
            let (status, (head, _)) = tokio::join!(
                dispatch(&daemon, CellCmd::Cp(CpArgs { src: "c1:/srv/top".into(), dst: to })),
                server
            );
            assert_eq!(status.unwrap(), 0);
            assert!(head.starts_with("GET /v1/cells/c1/files?path=%2Fsrv%2Ftop HTTP/1.1"));
            assert_eq!(std::fs::read(dest.join("top/big")).unwrap().len(), 8 << 20);
            assert_eq!(mode_of(&dest.join("top/bin/run")), 0o755);

            // A refusal before the body is read: the daemon's error, and no hang.
            // (Its connection may break on the archive's way out before the answer is read;
            // then isocell asks again with an empty archive.)
            let denied = br#"{"error":{"code":"denied","message":"not your cell"}}"#;
            let server = async {
                loop {
                    serve_one(
                        &listener,
                        false,
                        answer("403 Forbidden", "application/json", denied),
                    )
                    .await;
                }
            };
            let status = tokio::select! {
                s = dispatch(&daemon, cp(&top, "c1:/srv")) => s,
                () = server => unreachable!(),
            };
            let f = status.unwrap_err();
            assert_eq!((f.status, f.message.as_str()), (77, "not your cell"));
            // The daemon closing without an answer, then answering the empty archive.
            let server = async {
                let (_, body) = serve_one(&listener, false, Vec::new()).await;
                assert!(body.is_empty());
                let a = answer("403 Forbidden", "application/json", denied);
                let (head, body) = serve_one(&listener, true, a).await;
                assert!(head.starts_with("PUT /v1/cells/c1/files?path=%2Fsrv "), "{head}");
                assert_eq!(body, [0u8; 1024]);
            };
            let (status, ()) = tokio::join!(dispatch(&daemon, cp(&top, "c1:/srv")), server);
            let f = status.unwrap_err();
            assert_eq!((f.status, f.message.as_str()), (77, "not your cell"));

            // A download error, and a bad archive that leaves nothing behind.
            let missing = br#"{"error":{"code":"not_found","message":"no such path"}}"#;
            let server =
                serve_one(&listener, false, answer("404 Not Found", "application/json", missing));
            let to = tmp.path().join("empty");
            std::fs::create_dir(&to).unwrap();
            let down =
                || CellCmd::Cp(CpArgs { src: "c1:/x".into(), dst: to.display().to_string() });
            let (status, _) = tokio::join!(dispatch(&daemon, down()), server);
            let f = status.unwrap_err();
            assert_eq!((f.status, f.message.as_str()), (125, "no such path"));
            let bad = archive_then(("name/link", tar::EntryType::Symlink));
            let server = serve_one(&listener, false, answer("200 OK", "application/x-tar", &bad));
            let (status, _) = tokio::join!(dispatch(&daemon, down()), server);
            assert!(status.unwrap_err().message.contains("symbolic link"));
            assert_eq!(std::fs::read_dir(&to).unwrap().count(), 0);
        });
    }
}
