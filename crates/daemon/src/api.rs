//! The versioned REST API (`/v1`), its OpenAPI document (generated from the handlers), the
//! event stream, `/metrics` and `/healthz`. Every error is JSON with a stable code.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use isocell_evidence::policy::Policies;
use serde::Serialize;
use utoipa::OpenApi;

use crate::cells::{blocking, App, CreateCell, Event};
use crate::db::{CellRow, SessionRow};
use crate::error::{ApiError, ErrorBody};
use crate::exec::{ExecRequest, ExecResult};

/// Who is on the other end of a connection: `unix:uid=N` from a Unix socket's peer
/// credentials (`SO_PEERCRED`), `x509:SUBJECT` from a verified TLS client certificate.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The identity, if the kernel or the certificate said.
    pub client: Option<String>,
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        Peer { client: stream.io().peer_cred().ok().map(|c| format!("unix:uid={}", c.uid())) }
    }
}

impl Connected<axum::serve::IncomingStream<'_, crate::tls::TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        Peer { client: stream.remote_addr().clone() }
    }
}

/// The client's identity: the Cedar principal of its admissions and the owner of its cells.
pub struct Client(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        match parts.extensions.get::<ConnectInfo<Peer>>() {
            Some(ConnectInfo(Peer { client: Some(who) })) => Ok(Client(who.clone())),
            _ => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the client's identity is unknown (no peer credentials or client certificate)",
            )),
        }
    }
}

/// A JSON body whose every rejection is an [`ApiError`].
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(r) => {
                let code = match r.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                    _ => "bad_request",
                };
                Err(ApiError::new(
                    r.status(),
                    code,
                    format!("{}; see /v1/openapi.json", r.body_text()),
                ))
            }
        }
    }
}

/// The cell `id` if `client` may see it (another client's cell is "not found").
async fn visible(app: &Arc<App>, client: &str, id: &str) -> Result<CellRow, ApiError> {
    if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ApiError::no_cell(id));
    }
    let (db, i) = (app.db.clone(), id.to_owned());
    let row = blocking(move || db.cell(&i)).await??.ok_or_else(|| ApiError::no_cell(id))?;
    let policies = policies(app).await?;
    if policies.may_access(client, &row.id, &row.owner) {
        Ok(row)
    } else {
        Err(ApiError::no_cell(id))
    }
}

async fn policies(app: &Arc<App>) -> Result<Arc<Policies>, ApiError> {
    let dir = app.host.state_dir.join("policies");
    blocking(move || Policies::load_standard(&dir, &[]))
        .await?
        .map(Arc::new)
        .map_err(|e| ApiError::internal(format!("admission policies: {e}")))
}

async fn touch(app: &Arc<App>, id: &str) {
    let (db, i) = (app.db.clone(), id.to_owned());
    let _ = blocking(move || db.touch(&i)).await;
}

/// The cells a client sees.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CellList {
    /// Newest first.
    pub cells: Vec<CellRow>,
}

/// A cell's sessions.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SessionList {
    /// In the order they started.
    pub sessions: Vec<SessionRow>,
}

/// A signal for a session.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// The signal number (15 SIGTERM, 9 SIGKILL, 2 SIGINT, ...).
    pub signal: i32,
}

/// Creates a cell and waits until it runs. With `Idempotency-Key`, a retried create returns
/// the cell the first one made.
#[utoipa::path(post, path = "/v1/cells", request_body = CreateCell,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried create return the first one's cell")),
    responses(
        (status = 201, body = CellRow, description = "Created and running"),
        (status = 200, body = CellRow, description = "This client's earlier create with the same key"),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody, description = "Admission denied"),
        (status = 503, body = ErrorBody, description = "Not enough capacity (with the figures)")))]
async fn create_cell(
    State(app): State<Arc<App>>,
    Client(client): Client,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateCell>,
) -> Result<(StatusCode, Json<CellRow>), ApiError> {
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::bad_request("Idempotency-Key: give printable ASCII"))?
                .to_owned(),
        ),
        None => None,
    };
    let (status, row) = app.create(&client, body, key).await?;
    Ok((status, Json(row)))
}

/// Lists the cells this client may see.
#[utoipa::path(get, path = "/v1/cells", responses((status = 200, body = CellList)))]
async fn list_cells(
    State(app): State<Arc<App>>,
    Client(client): Client,
) -> Result<Json<CellList>, ApiError> {
    let db = app.db.clone();
    let rows = blocking(move || db.cells(None)).await??;
    let p = policies(&app).await?;
    let cells = rows.into_iter().filter(|r| p.may_access(&client, &r.id, &r.owner)).collect();
    Ok(Json(CellList { cells }))
}

/// One cell.
#[utoipa::path(get, path = "/v1/cells/{id}", params(("id" = String, Path)),
    responses((status = 200, body = CellRow), (status = 404, body = ErrorBody)))]
async fn get_cell(
    State(app): State<Arc<App>>,
    Client(client): Client,
    Path(id): Path<String>,
) -> Result<Json<CellRow>, ApiError> {
    Ok(Json(visible(&app, &client, &id).await?))
}

/// Deletes a cell: its command sessions end, it is torn down, its exit receipt is signed.
#[utoipa::path(delete, path = "/v1/cells/{id}", params(("id" = String, Path)),
    responses((status = 200, body = CellRow, description = "Ended (also for a cell that had ended)"), (status = 404, body = ErrorBody)))]
async fn delete_cell(
    State(app): State<Arc<App>>,
    Client(client): Client,
    Path(id): Path<String>,
) -> Result<Json<CellRow>, ApiError> {
    let row = visible(&app, &client, &id).await?;
    if row.state == "creating" {
        return Err(ApiError::conflict(format!(
            "cell {id} is still starting; delete it once it runs"
        )));
    }
    Ok(Json(app.delete(&id, "deleted").await?))
}

/// Runs a command to its end and returns its output and status (no stdin, no terminal; for
/// those use the streaming exec, `GET` with a WebSocket upgrade).
#[utoipa::path(post, path = "/v1/cells/{id}/exec", params(("id" = String, Path)), request_body = ExecRequest,
    responses((status = 200, body = ExecResult), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "The program is not in the cell or cannot run")))]
async fn exec_cell(
    State(app): State<Arc<App>>,
    Client(client): Client,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Json<ExecResult>, ApiError> {
    let row = visible(&app, &client, &id).await?;
    touch(&app, &id).await;
    Ok(Json(crate::exec::run(&app, &row, &req).await?))
}

/// Streaming exec over a WebSocket (see the `exec` module's documentation for the frames).
#[utoipa::path(get, path = "/v1/cells/{id}/exec", params(("id" = String, Path)),
    responses((status = 101, description = "Switching to the WebSocket protocol"), (status = 404, body = ErrorBody)))]
async fn exec_stream(
    State(app): State<Arc<App>>,
    Client(client): Client,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let row = visible(&app, &client, &id).await?;
    touch(&app, &id).await;
    Ok(ws.on_upgrade(move |socket| crate::exec::stream(app, row, socket)))
}

/// A cell's command sessions.
#[utoipa::path(get, path = "/v1/cells/{id}/sessions", params(("id" = String, Path)),
    responses((status = 200, body = SessionList), (status = 404, body = ErrorBody)))]
async fn list_sessions(
    State(app): State<Arc<App>>,
    Client(client): Client,
    Path(id): Path<String>,
) -> Result<Json<SessionList>, ApiError> {
    let row = visible(&app, &client, &id).await?;
    let db = app.db.clone();
    let sessions = blocking(move || db.sessions(Some(&row.id), None)).await??;
    Ok(Json(SessionList { sessions }))
}

fn session_id(s: &str) -> Result<u64, ApiError> {
    s.parse().map_err(|_| ApiError::bad_request(format!("session {s:?}: a session id is a number")))
}

/// One session: whether it runs, and its exit status once it ended (also after a daemon
/// restart).
#[utoipa::path(get, path = "/v1/cells/{id}/sessions/{session}", params(("id" = String, Path), ("session" = u64, Path)),
    responses((status = 200, body = SessionRow), (status = 404, body = ErrorBody)))]
async fn get_session(
    State(app): State<Arc<App>>,
    Client(client): Client,
    Path((id, session)): Path<(String, String)>,
) -> Result<Json<SessionRow>, ApiError> {
    let row = visible(&app, &client, &id).await?;
    let n = session_id(&session)?;
    let db = app.db.clone();
    blocking(move || db.session(&row.id, n)).await??.map(Json).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("cell {id} has no session {n}"))
    })
}

/// Sends a signal to a running session's processes.
#[utoipa::path(post, path = "/v1/cells/{id}/sessions/{session}/signal", params(("id" = String, Path), ("session" = u64, Path)),
    request_body = SignalRequest, responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn signal_session(
    State(app): State<Arc<App>>,
    Client(client): Client,
    Path((id, session)): Path<(String, String)>,
    ApiJson(req): ApiJson<SignalRequest>,
) -> Result<StatusCode, ApiError> {
    let row = visible(&app, &client, &id).await?;
    let n = session_id(&session)?;
    if row.state != "running" {
        return Err(ApiError::conflict(format!("cell {id} is {}", row.state)));
    }
    let socket = isocell_host::session::SessionSocket::of(&app.host.run_dir, &id);
    blocking(move || socket.signal(n, req.signal))
        .await?
        .map_err(|e| ApiError::conflict(e.to_string()))?;
    touch(&app, &id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Where a file operation points in the cell.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FilesQuery {
    /// An absolute path in the cell: the directory an upload is extracted under, or the file
    /// or directory a download packs.
    pub path: String,
}

fn files_query(q: Result<Query<FilesQuery>, QueryRejection>) -> Result<FilesQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("{}: give ?path=/ABSOLUTE/PATH", e.body_text())))
}

/// Uploads a tar stream (files and directories only), extracted under `path` in the cell.
#[utoipa::path(put, path = "/v1/cells/{id}/files", params(("id" = String, Path), FilesQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses((status = 204, description = "Copied"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn put_files(
    State(app): State<Arc<App>>,
    Client(client): Client,
    Path(id): Path<String>,
    q: Result<Query<FilesQuery>, QueryRejection>,
    body: axum::body::Body,
) -> Result<StatusCode, ApiError> {
    let q = files_query(q)?;
    let row = visible(&app, &client, &id).await?;
    let dest = crate::files::cell_path(&q.path)?;
    touch(&app, &id).await;
    crate::files::upload(&app, &row, &dest, body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Downloads a file or directory tree of the cell as a tar stream.
#[utoipa::path(get, path = "/v1/cells/{id}/files", params(("id" = String, Path), FilesQuery),
    responses((status = 200, content_type = "application/x-tar", body = Vec<u8>), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 502, body = ErrorBody, description = "The cell refused or sent something unsafe")))]
async fn get_files(
    State(app): State<Arc<App>>,
    Client(client): Client,
    Path(id): Path<String>,
    q: Result<Query<FilesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = files_query(q)?;
    let row = visible(&app, &client, &id).await?;
    let path = crate::files::cell_path(&q.path)?;
    touch(&app, &id).await;
    let body = crate::files::download(&app, &row, &path).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/x-tar")], body).into_response())
}

/// The last 64 KiB of a running cell's console (its kernel's and agent's messages).
#[utoipa::path(get, path = "/v1/cells/{id}/logs", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ErrorBody)))]
async fn cell_logs(
    State(app): State<Arc<App>>,
    Client(client): Client,
    Path(id): Path<String>,
) -> Result<String, ApiError> {
    let row = visible(&app, &client, &id).await?;
    let run = app.host.run_dir.clone();
    let bytes =
        blocking(move || isocell_host::vmm_process::console_tail(&run, &row.id, 64 * 1024)).await?;
    Ok(String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned())
}

/// Lifecycle changes of the cells this client may see, as server-sent events.
#[utoipa::path(get, path = "/v1/events", responses((status = 200, content_type = "text/event-stream", body = Event)))]
async fn events(
    State(app): State<Arc<App>>,
    Client(client): Client,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let p = policies(&app).await?;
    let rx = app.events.subscribe();
    let stream = futures_util::stream::unfold((rx, p, client), |(mut rx, p, client)| async move {
        loop {
            match rx.recv().await {
                Ok(e) if p.may_access(&client, &e.cell, &e.owner) => {
                    let ev = SseEvent::default().event("cell").json_data(&e).unwrap_or_default();
                    return Some((Ok(ev), (rx, p, client)));
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)))]
async fn metrics(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let db = app.db.clone();
    let rows = blocking(move || db.cells(None)).await??;
    for state in ["creating", "running", "deleting", "ended", "failed"] {
        let n = rows.iter().filter(|r| r.state == state).count();
        app.metrics
            .cells
            .get_or_create(&crate::metrics::State { state: state.into() })
            .set(n as i64);
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response())
}

/// Health.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// Cells that run now.
    pub running_cells: usize,
}

/// Whether the daemon answers and its database works.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
async fn healthz(State(app): State<Arc<App>>) -> Result<Json<Health>, ApiError> {
    let db = app.db.clone();
    let running = blocking(move || db.cells_in(&["running"])).await??.len();
    Ok(Json(Health { status: "ok".into(), running_cells: running }))
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "OpenAPI 3 document")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The OpenAPI document, generated from the handlers above.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "isocelld",
        description = "IsoCell host daemon: long-lived cells, commands in them, their evidence."
    ),
    paths(
        create_cell,
        list_cells,
        get_cell,
        delete_cell,
        exec_cell,
        exec_stream,
        list_sessions,
        get_session,
        signal_session,
        put_files,
        get_files,
        cell_logs,
        events,
        metrics,
        healthz,
        openapi
    ),
    components(schemas(
        CreateCell,
        CellRow,
        CellList,
        ExecRequest,
        ExecResult,
        SessionRow,
        SessionList,
        SignalRequest,
        Event,
        Health,
        ErrorBody
    ))
)]
pub struct ApiDoc;

/// Any path that is not in the API.
async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such endpoint; see /v1/openapi.json")
}

/// The router.
pub fn router(app: Arc<App>) -> Router {
    let limit = app.config.max_body_bytes;
    Router::new()
        .route("/v1/cells", post(create_cell).get(list_cells))
        .route("/v1/cells/{id}", get(get_cell).delete(delete_cell))
        .route("/v1/cells/{id}/exec", post(exec_cell).get(exec_stream))
        .route("/v1/cells/{id}/sessions", get(list_sessions))
        .route("/v1/cells/{id}/sessions/{session}", get(get_session))
        .route("/v1/cells/{id}/sessions/{session}/signal", post(signal_session))
        .route("/v1/cells/{id}/logs", get(cell_logs))
        .route(
            "/v1/cells/{id}/files",
            get(get_files).put(put_files).layer(DefaultBodyLimit::max(
                usize::try_from(crate::files::MAX_TRANSFER_BYTES).unwrap_or(usize::MAX),
            )),
        )
        .route("/v1/events", get(events))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::PathBuf;

    use axum::body::Body;
    use axum::http::{Method, Request as HttpRequest};
    use serde_json::{json, Value};
    use tower::ServiceExt;

    use super::*;
    use crate::config::DaemonConfig;
    use crate::db::{now_ms, Claim, Db};

    /// An app over a scratch state directory; no cell is ever started by these tests.
    fn app(dir: &std::path::Path) -> Arc<App> {
        let host = isocell_host::HostConfig {
            state_dir: dir.join("state"),
            run_dir: dir.join("run"),
            vmm: PathBuf::from("/nonexistent/isocell-vmm"),
            jailer: None,
            agent_initrd: PathBuf::from("/nonexistent/agent-initrd.cpio"),
            seccomp_probe: None,
        };
        std::fs::create_dir_all(&host.state_dir).unwrap();
        let db = Db::open(&host.state_dir.join("isocelld.db")).unwrap();
        Arc::new(App {
            db,
            host,
            kernel: PathBuf::from("/nonexistent/vmlinux"),
            base_image: PathBuf::from("/nonexistent/rootfs.ext4"),
            supervisor: PathBuf::from("/nonexistent/isocell-supervisor"),
            config: DaemonConfig { max_body_bytes: 4096, ..DaemonConfig::default() },
            metrics: crate::metrics::Metrics::new(),
            events: tokio::sync::broadcast::channel(16).0,
            host_memory_mib: 4096,
            host_cpus: 2,
        })
    }

    fn row(id: &str, owner: &str, state: &str) -> CellRow {
        CellRow {
            id: id.into(),
            owner: owner.into(),
            state: state.into(),
            image: "base".into(),
            cpus: 1,
            memory_mib: 256,
            idle_timeout_secs: 0,
            created_ms: now_ms(),
            last_active_ms: now_ms(),
            launch_digest: None,
            vmm_pid: None,
            boot_ms: None,
            outcome: None,
            exit_receipt: None,
            error: None,
            supervisor_pid: None,
            request: "{}".into(),
        }
    }

    fn insert(app: &App, r: &CellRow) {
        let claim = Claim {
            row: r,
            idempotency_key: None,
            memory_limit_mib: u64::MAX,
            cpu_limit: u64::MAX,
        };
        assert!(matches!(app.db.claim(&claim).unwrap(), crate::db::Claimed::New));
        if r.state != "creating" {
            app.db.set_state(&r.id, &r.state).unwrap();
        }
    }

    async fn call(
        app: &Arc<App>,
        method: Method,
        uri: &str,
        uid: u32,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let (status, resp) = respond(app, method, uri, uid, body).await;
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn respond(
        app: &Arc<App>,
        method: Method,
        uri: &str,
        uid: u32,
        body: Option<&str>,
    ) -> (StatusCode, Response) {
        let mut req = HttpRequest::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let mut req =
            req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned()))).unwrap();
        req.extensions_mut().insert(ConnectInfo(Peer { client: Some(format!("unix:uid={uid}")) }));
        let resp = router(app.clone()).oneshot(req).await.unwrap();
        (resp.status(), resp)
    }

    fn code(v: &Value) -> &str {
        v["error"]["code"].as_str().unwrap_or("")
    }

    #[tokio::test]
    async fn every_documented_operation_is_routed() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 10, "{paths:?}");
        let mut operations = 0;
        for (path, item) in paths {
            for method in item.as_object().unwrap().keys() {
                operations += 1;
                let uri = path.replace("{id}", "abc").replace("{session}", "1") + "?path=/x";
                let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                if path == "/v1/events" {
                    // An event stream does not end: its status is enough.
                    let (status, _) = respond(&app, m, &uri, 1000, None).await;
                    assert_eq!(status, StatusCode::OK);
                    continue;
                }
                let (status, body) = call(&app, m, &uri, 1000, Some("{}")).await;
                assert_ne!(code(&body), "no_route", "{method} {path} is documented but not routed");
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            }
        }
        assert_eq!(operations, 16, "operations documented");
        let (status, body) = call(&app, Method::GET, "/v1/nothing", 1000, None).await;
        assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "no_route"));
    }

    #[tokio::test]
    async fn bad_requests_get_clear_json_errors_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let cases: &[(&str, StatusCode, &str, &str)] = &[
            ("{", StatusCode::BAD_REQUEST, "bad_request", "EOF"),
            (
                "{\"cpus\": 1, \"colour\": \"red\"}",
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad_request",
                "colour",
            ),
            ("{\"cpus\": \"many\"}", StatusCode::UNPROCESSABLE_ENTITY, "bad_request", "cpus"),
            ("{\"memory\": \"lots\"}", StatusCode::UNPROCESSABLE_ENTITY, "bad_request", "lots"),
            ("{\"cpus\": 0}", StatusCode::BAD_REQUEST, "bad_request", "1 to 32"),
            (
                "{\"image\": \"/etc/shadow\"}",
                StatusCode::BAD_REQUEST,
                "bad_request",
                "not block image files",
            ),
            ("{\"image\": \"oci:/root/secret\"}", StatusCode::FORBIDDEN, "forbidden", "only root"),
            ("{\"max_lifetime_secs\": 0}", StatusCode::BAD_REQUEST, "bad_request", "at least 1"),
            (
                "{\"egress\": [\"api.example.eu\"]}",
                StatusCode::BAD_REQUEST,
                "bad_request",
                "no port",
            ),
            ("{\"publish\": [\"80\"]}", StatusCode::BAD_REQUEST, "bad_request", "such as 8080:80"),
            ("{\"egress\": \"x:1\"}", StatusCode::UNPROCESSABLE_ENTITY, "bad_request", "egress"),
            ("{\"snapshot\": \"base\"}", StatusCode::FORBIDDEN, "forbidden", "only root"),
        ];
        for (body, status, want, says) in cases {
            let (got, v) = call(&app, Method::POST, "/v1/cells", 1000, Some(body)).await;
            assert_eq!((got, code(&v)), (*status, *want), "{body}: {v}");
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains(says), "{body}: {message}");
        }
        // Root may start cells from snapshots, but not one that names what the snapshot fixes,
        // nor one that is not there.
        let root_cases: &[(&str, &str)] = &[
            ("{\"snapshot\": \"base\", \"cpus\": 2}", "the snapshot's"),
            ("{\"snapshot\": \"../x\"}", "../x"),
            ("{\"snapshot\": \"none\"}", "none"),
            ("{\"snapshot\": \"base\", \"idle_timeout_secs\": 99999999999}", "a year"),
        ];
        for (body, says) in root_cases {
            let (got, v) = call(&app, Method::POST, "/v1/cells", 0, Some(body)).await;
            assert_eq!((got, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"), "{body}: {v}");
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains(says), "{body}: {message}");
        }
        let huge = format!("{{\"image\": \"{}\"}}", "x".repeat(10_000));
        let (got, v) = call(&app, Method::POST, "/v1/cells", 1000, Some(&huge)).await;
        assert_eq!((got, code(&v)), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"), "{v}");
        let mut req = HttpRequest::post("/v1/cells").body(Body::from("{}")).unwrap();
        req.extensions_mut().insert(ConnectInfo(Peer { client: Some("unix:uid=1000".into()) }));
        let resp = router(app.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let mut req = HttpRequest::get("/v1/cells").body(Body::empty()).unwrap();
        req.extensions_mut().insert(ConnectInfo(Peer { client: None }));
        let resp = router(app.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(app.db.cells(None).unwrap().is_empty(), "a refused create left a row");
    }

    #[tokio::test]
    async fn a_client_cannot_see_or_touch_another_clients_cell() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        insert(&app, &row("theirs1", "unix:uid=2000", "running"));
        insert(&app, &row("mine1", "unix:uid=1000", "ended"));
        let before = app.db.cell("theirs1").unwrap().unwrap();
        let exec = json!({ "argv": ["cat", "/etc/shadow"] }).to_string();
        for (method, uri, body) in [
            (Method::GET, "/v1/cells/theirs1", None),
            (Method::DELETE, "/v1/cells/theirs1", None),
            (Method::POST, "/v1/cells/theirs1/exec", Some(exec.as_str())),
            (Method::GET, "/v1/cells/theirs1/sessions", None),
            (Method::GET, "/v1/cells/theirs1/logs", None),
            (Method::POST, "/v1/cells/theirs1/sessions/1/signal", Some("{\"signal\": 9}")),
        ] {
            let (status, v) = call(&app, method.clone(), uri, 1000, body).await;
            assert_eq!(
                (status, code(&v)),
                (StatusCode::NOT_FOUND, "not_found"),
                "{method} {uri}: {v}"
            );
        }
        let (_, list) = call(&app, Method::GET, "/v1/cells", 1000, None).await;
        let ids: Vec<&str> =
            list["cells"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["mine1"]);
        let after = app.db.cell("theirs1").unwrap().unwrap();
        assert_eq!((before.state, before.last_active_ms), (after.state, after.last_active_ms));
        // Its owner sees it.
        let (status, _) = call(&app, Method::GET, "/v1/cells/theirs1", 2000, None).await;
        assert_eq!(status, StatusCode::OK);
    }

    /// A CA, and certificates it signs (server: localhost and 127.0.0.1).
    struct Pki {
        dir: PathBuf,
        ca: rcgen::Certificate,
        ca_key: rcgen::KeyPair,
    }

    impl Pki {
        fn new(dir: &std::path::Path, name: &str) -> Pki {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            let ca = p.self_signed(&ca_key).unwrap();
            let dir = dir.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
            Pki { dir, ca, ca_key }
        }

        /// Signs a certificate; returns (cert, key) PEM files.
        fn issue(
            &self,
            file: &str,
            dn: &[(rcgen::DnType, &str)],
            names: &[&str],
        ) -> (PathBuf, PathBuf) {
            let key = rcgen::KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            let mut p = rcgen::CertificateParams::new(names).unwrap();
            p.distinguished_name = rcgen::DistinguishedName::new();
            for (t, v) in dn {
                p.distinguished_name.push(t.clone(), *v);
            }
            let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
            let (c, k) =
                (self.dir.join(format!("{file}.pem")), self.dir.join(format!("{file}.key")));
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        }
    }

    /// GET `path` over TLS as the client `cert` (if any); the answer's status line and body,
    /// or the error that ended the connection.
    async fn tls_get(
        port: u16,
        ca: &std::path::Path,
        cert: Option<&(PathBuf, PathBuf)>,
        path: &str,
    ) -> Result<String, String> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(ca).unwrap()).unwrap();
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = match cert {
            Some((c, k)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_file(c).unwrap()],
                    PrivateKeyDer::from_pem_file(k).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
        tls.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        if text.is_empty() {
            return Err("closed without an answer".into());
        }
        Ok(text)
    }

    #[tokio::test]
    async fn tls_clients_are_known_by_their_certificate_subject_and_need_one() {
        use rcgen::DnType;
        let dir = tempfile::tempdir().unwrap();
        let server_pki = Pki::new(dir.path(), "server-ca");
        let client_pki = Pki::new(dir.path(), "client-ca");
        let stranger_pki = Pki::new(dir.path(), "stranger-ca");
        let (cert, key) =
            server_pki.issue("server", &[(DnType::CommonName, "isocelld")], &["127.0.0.1"]);
        let alice = client_pki.issue(
            "alice",
            &[(DnType::CommonName, "alice"), (DnType::OrganizationName, "tenant-a")],
            &[],
        );
        let mallory = stranger_pki.issue("mallory", &[(DnType::CommonName, "alice")], &[]);
        let config = crate::tls::TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert,
            key,
            client_ca: client_pki.dir.join("ca.pem"),
        };
        let app = app(dir.path());
        insert(&app, &row("alices1", "x509:CN=alice,O=tenant-a", "running"));
        insert(&app, &row("uid1000", "unix:uid=1000", "running"));
        let listener = crate::tls::TlsListener::bind(&config).await.unwrap();
        let port = listener.local.port();
        let service = router(app.clone()).into_make_service_with_connect_info::<Peer>();
        tokio::spawn(async move { axum::serve(listener, service).await });
        let ca = server_pki.dir.join("ca.pem");

        // A client that connects and says nothing holds up no one.
        let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();

        // Alice sees her cell, named by her certificate's subject, and not the Unix client's.
        let answer = tls_get(port, &ca, Some(&alice), "/v1/cells").await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("\"alices1\""), "{answer}");
        assert!(!answer.contains("uid1000"), "{answer}");
        let answer = tls_get(port, &ca, Some(&alice), "/v1/cells/uid1000").await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

        // No certificate, or one from another CA with the same name: no answer at all.
        for who in [None, Some(&mallory)] {
            let refused = tls_get(port, &ca, who, "/v1/cells").await;
            assert!(refused.as_ref().is_err_and(|e| e.contains("alert")), "{refused:?}");
        }

        // Files that are not what they should be are named in the error.
        let bad = crate::tls::TlsConfig { key: config.client_ca.clone(), ..config.clone() };
        let e = crate::tls::server_config(&bad).err().unwrap();
        assert!(e.starts_with("tls.key "), "{e}");
        let bad = crate::tls::TlsConfig { client_ca: dir.path().join("none.pem"), ..config };
        let e = crate::tls::server_config(&bad).err().unwrap();
        assert!(e.starts_with("tls.client_ca "), "{e}");
    }

    #[tokio::test]
    async fn commands_go_only_into_running_cells() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        insert(&app, &row("gone1", "unix:uid=1000", "ended"));
        let exec = json!({ "argv": ["true"] }).to_string();
        let (status, v) = call(&app, Method::POST, "/v1/cells/gone1/exec", 1000, Some(&exec)).await;
        assert_eq!((status, code(&v)), (StatusCode::CONFLICT, "conflict"), "{v}");
        assert!(app.db.sessions(Some("gone1"), None).unwrap().is_empty());
        let bad = json!({ "argv": [] }).to_string();
        insert(&app, &row("live1", "unix:uid=1000", "running"));
        let (status, v) = call(&app, Method::POST, "/v1/cells/live1/exec", 1000, Some(&bad)).await;
        assert_eq!((status, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"), "{v}");
        // Deleting an ended cell again answers with its record.
        let (status, v) = call(&app, Method::DELETE, "/v1/cells/gone1", 1000, None).await;
        assert_eq!((status, v["state"].as_str()), (StatusCode::OK, Some("ended")), "{v}");
    }

    #[test]
    fn creates_never_overcommit_and_a_retried_create_finds_its_cell() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let limit = |r: &CellRow, key: Option<&'static str>| {
            let c = Claim { row: r, idempotency_key: key, memory_limit_mib: 600, cpu_limit: 8 };
            db.claim(&c).unwrap()
        };
        assert!(matches!(limit(&row("a1", "u", "creating"), Some("k1")), crate::db::Claimed::New));
        assert!(matches!(limit(&row("a2", "u", "creating"), None), crate::db::Claimed::New));
        match limit(&row("a3", "u", "creating"), None) {
            crate::db::Claimed::Full(memory, cpus) => assert_eq!((memory, cpus), (512, 2)),
            _ => panic!("a third 256 MiB cell fit in 600 MiB"),
        }
        match limit(&row("a4", "u", "creating"), Some("k1")) {
            crate::db::Claimed::Existing(r) => assert_eq!(r.id, "a1"),
            _ => panic!("the retried create made a new cell"),
        }
        // Another client's key is its own.
        assert!(matches!(
            limit(&row("b1", "v", "creating"), Some("k1")),
            crate::db::Claimed::Full(..)
        ));
        db.set_ended("a2", "deleted", None).unwrap();
        assert!(matches!(limit(&row("b2", "v", "creating"), Some("k1")), crate::db::Claimed::New));
    }
}
