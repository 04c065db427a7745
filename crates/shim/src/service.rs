//! containerd's task API (v2) over the shim's containers: every RPC containerd 1.6 calls, with
//! runc's semantics for states, waits, kills and exit statuses. Pause, Resume, Checkpoint and
//! Update are refused as unimplemented (a cell's resources are fixed at boot).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::util::convert_to_any;
use containerd_shim::{api, TtrpcContext, TtrpcResult};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::{self, Code};
use containerd_shim_protos::types::task::{ProcessInfo, Status};
use isocell_host::HostConfig;

use crate::container::{Container, CreateRequest, KillError, Proc, ProcState, Stdio};
use crate::events::{timestamp, Event, Events};
use crate::rootfs::RootMount;

/// The task service of one shim process (one pod, or one container without a pod).
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    events: Events,
    exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

fn err(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn not_found(what: &str) -> ttrpc::Error {
    err(Code::NOT_FOUND, format!("{what} not found"))
}

/// Runs blocking cell work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> TtrpcResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| err(Code::INTERNAL, format!("the shim's worker failed: {e}")))
}

impl Service {
    /// A service publishing events for containerd namespace `namespace`.
    pub fn new(namespace: String, events: Events, exit: Arc<ExitSignal>) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace,
                events,
                exit,
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.inner.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.containers().get(id).cloned().ok_or_else(|| not_found(&format!("container {id:?}")))
    }

    fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<(Arc<Container>, Arc<Proc>)> {
        let c = self.container(id)?;
        let p =
            c.process(exec_id).ok_or_else(|| not_found(&format!("exec {exec_id:?} of {id:?}")))?;
        Ok((c, p))
    }
}

fn status_of(p: &Proc) -> (Status, u32, Option<SystemTime>) {
    match p.now() {
        ProcState::Created => (Status::CREATED, 0, None),
        ProcState::Running => (Status::RUNNING, 0, None),
        ProcState::Exited { status, at } => (Status::STOPPED, status, Some(at)),
    }
}

fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Stdio {
    Stdio {
        stdin: stdin.to_owned(),
        stdout: stdout.to_owned(),
        stderr: stderr.to_owned(),
        terminal,
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(err(Code::UNIMPLEMENTED, "cells are not restored from checkpoints"));
        }
        if self.containers().contains_key(&req.id) {
            return Err(err(Code::ALREADY_EXISTS, format!("container {:?} exists", req.id)));
        }
        let host = HostConfig::discover(true).map_err(|e| {
            err(Code::FAILED_PRECONDITION, format!("isocell is not installed: {e}"))
        })?;
        let create = CreateRequest {
            id: req.id.clone(),
            namespace: self.inner.namespace.clone(),
            bundle: PathBuf::from(&req.bundle),
            rootfs: req
                .rootfs
                .iter()
                .map(|m| RootMount {
                    kind: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            stdio: stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
        };
        let events = self.inner.events.clone();
        let c = blocking(move || Container::create(&host, create, events))
            .await?
            .map_err(|e| err(Code::FAILED_PRECONDITION, e))?;
        self.containers().insert(req.id.clone(), c.clone());
        self.inner.events.send(Event::create(&req.id, &req.bundle, &c.main.stdio, c.pid));
        Ok(api::CreateTaskResponse { pid: c.pid, ..Default::default() })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        let (c2, p2) = (c.clone(), p.clone());
        blocking(move || c2.start(&p2)).await?.map_err(|e| err(Code::FAILED_PRECONDITION, e))?;
        // An exit that came first is already queued; containerd orders them by its own events.
        if req.exec_id.is_empty() {
            self.inner.events.send(Event::start(&req.id, c.pid));
        } else {
            self.inner.events.send(Event::exec_started(&req.id, &req.exec_id, c.pid));
        }
        Ok(api::StartResponse { pid: c.pid, ..Default::default() })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        let (status, exit_status, at) = status_of(&p);
        Ok(api::StateResponse {
            id: if req.exec_id.is_empty() { req.id.clone() } else { req.exec_id.clone() },
            bundle: c.bundle.display().to_string(),
            pid: c.pid,
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status,
            exited_at: at.map(timestamp).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        if !req.exec_id.is_empty() {
            c.remove_exec(&req.exec_id).map_err(|e| err(Code::FAILED_PRECONDITION, e))?;
        } else {
            if p.now() == ProcState::Running {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("container {:?} is running: kill it first", req.id),
                ));
            }
            let c2 = c.clone();
            blocking(move || c2.finish()).await?;
            self.containers().remove(&req.id);
        }
        let (_, status, at) = status_of(&p);
        let at = at.unwrap_or_else(SystemTime::now);
        if req.exec_id.is_empty() {
            self.inner.events.send(Event::delete(&req.id, c.pid, status, at));
        }
        Ok(api::DeleteResponse {
            pid: c.pid,
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        // The host sees one process per cell, its VMM: the container's processes are the
        // guest's, in another kernel.
        let c = self.container(&req.id)?;
        let processes = vec![ProcessInfo { pid: c.pid, ..Default::default() }];
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(err(Code::UNIMPLEMENTED, "cells are not paused"))
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(Code::UNIMPLEMENTED, "cells are not paused"))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(Code::UNIMPLEMENTED, "cells are not checkpointed through containerd"))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        blocking(move || c.kill(&p, req.signal, req.all)).await?.map_err(|e| match e {
            KillError::Invalid(m) => err(Code::INVALID_ARGUMENT, m),
            KillError::Finished => err(Code::NOT_FOUND, "process already finished"),
            KillError::Cell(m) => err(Code::UNKNOWN, m),
        })?;
        Ok(api::Empty::default())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let spec: crate::oci::SpecProcess = serde_json::from_slice(&req.spec.value)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("the exec's process spec: {e}")))?;
        let io = stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        c.add_exec(&req.exec_id, &spec, io).map_err(|e| err(Code::FAILED_PRECONDITION, e))?;
        self.inner.events.send(Event::exec_added(&req.id, &req.exec_id));
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
        blocking(move || c.resize(&p, rows, cols))
            .await?
            .map_err(|e| err(Code::FAILED_PRECONDITION, e))?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            blocking(move || c.close_stdin(&p)).await?.map_err(|e| err(Code::UNKNOWN, e))?;
        }
        Ok(api::Empty::default())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        _req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(Code::UNIMPLEMENTED, "a cell's vCPUs and memory are fixed when it boots"))
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let (_, p) = self.process(&req.id, &req.exec_id)?;
        let mut rx = p.state.subscribe();
        let state = rx
            .wait_for(|s| matches!(s, ProcState::Exited { .. }))
            .await
            .map_err(|_| err(Code::UNKNOWN, "the process was lost"))?;
        let ProcState::Exited { status, at } = *state else {
            return Err(err(Code::UNKNOWN, "the process was lost"));
        };
        Ok(api::WaitResponse {
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let c = self.container(&req.id)?;
        let metrics = match c.cgroup_dir() {
            Some(dir) => crate::stats::metrics(&dir),
            None => Default::default(),
        };
        let any: Any = convert_to_any(Box::new(metrics))
            .map_err(|e| err(Code::INTERNAL, format!("encoding the figures: {e}")))?;
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.containers().get(&req.id).map(|c| c.pid).unwrap_or(0);
        log::info!("connect from containerd for {:?} (task pid {task_pid})", req.id);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        // A shim serving a pod stays while any of its containers is left.
        log::info!("shutdown asked; {} container(s) left", self.containers().len());
        if self.containers().is_empty() {
            self.inner.exit.signal();
        }
        Ok(api::Empty::default())
    }
}
