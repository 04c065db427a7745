//! A cell's life in phases: [`Admitted`] (measured, allowed by policy, nothing running yet) →
//! [`Cell`] (VMM started, launch receipt signed) → ready (the agent said hello) → operations
//! (`put`, `exec`, `get`) → [`Cell::delete`] (shutdown, teardown checked, exit receipt).
//! Every phase writes its audit entries; every wait honours a [`Cancel`] token.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use isocell_evidence::measure::{DigestCache, LaunchMeasurement};
use isocell_evidence::policy::{AdmissionDecision, Policies};
use isocell_image::runconfig::Process;
use isocell_proto::net::{DNS_PORT, EGRESS_PORT};
use isocell_proto::{ExitStatus, Message};
use serde_json::{json, Value};

use crate::agent_link::{deadline_in, AgentLink};
use crate::command;
use crate::evidence::{ms_since, CellEvidence, Costs, EvidenceError};
use crate::network;
use crate::plan::SnapshotUse;
use crate::state::Host;
use crate::transfer::{self, OutputBudget};
use crate::vmm_process::{self, TeardownChecks, Vmm};
use crate::{Cancel, CancelReason, CellError, CellPlan, HostConfig, OutputSink};

/// How long a cell's VMM is given to stop once asked, before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// It exited or was killed by a signal inside the cell; the status is the agent's.
    Exited(ExitStatus),
    /// It ran past its time limit and was killed.
    TimedOut,
    /// It was cancelled from outside (and killed).
    Cancelled(CancelReason),
}

/// What the exit receipt records about how the cell's work ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The command's exit status by the shell's convention (N, or 128 + signal), when it had
    /// one.
    pub exit_code: Option<i32>,
    /// `exited`, `timed_out`, `interrupted`, `not_found`, `cannot_execute`, `failed`,
    /// `no_exit_status`; for long-lived cells also how they ended (`deleted`, `idle_timeout`,
    /// `vmm_killed`, ...).
    pub outcome: &'static str,
}

/// A cell that was measured and admitted; nothing runs yet.
pub struct Admitted {
    plan: CellPlan,
    ev: CellEvidence,
    measurement: LaunchMeasurement,
    decision: AdmissionDecision,
}

/// Records a failure in the cell's audit log (a denial is already there as its decision).
fn logged<T>(ev: &mut CellEvidence, r: Result<T, CellError>) -> Result<T, CellError> {
    if let Err(e) = &r {
        if !matches!(e, CellError::Denied(_)) {
            let _ = ev.log("error", json!({ "message": e.to_string() }));
        }
    }
    r
}

/// Opens the state directory and the audit log for cell `id`.
pub fn open_evidence(host: &HostConfig, id: &str) -> Result<CellEvidence, CellError> {
    let state = Host::load_or_init(&host.state_dir).map_err(EvidenceError::from)?;
    Ok(CellEvidence::open(state, id)?)
}

/// Plans cell `id` (see [`CellPlan::new`]); a refused plan is recorded in its audit log.
pub fn plan(
    host: &HostConfig,
    id: &str,
    request: crate::CellRequest,
    ev: &mut CellEvidence,
) -> Result<CellPlan, CellError> {
    logged(ev, CellPlan::new(host, id, request).map_err(CellError::from))
}

/// The admission policies (the state directory's, the default and the caller's files), parsed on
/// a thread of their own from [`PolicyLoad::start`] while the cell is planned and measured.
/// Cedar's parse and the set-up of its first evaluation are some 5 M instructions (about 30 ms
/// of every start under emulation), longer than planning and measuring together. Nothing is
/// decided on that thread: the decision waits for it (see [`Admitted::new`]).
pub struct PolicyLoad(Loading);

enum Loading {
    Thread(std::thread::JoinHandle<Result<Policies, String>>),
    /// Loaded on the caller's thread: no thread could be started.
    Done(Box<Result<Policies, String>>),
}

impl PolicyLoad {
    /// Starts parsing the policies of the state directory `state_dir` and `files`.
    pub fn start(state_dir: &Path, files: &[PathBuf]) -> PolicyLoad {
        let dir = state_dir.join("policies");
        let files = files.to_vec();
        // Cedar's one-time set-up of evaluation runs beside the parse, on a thread of its own.
        let _ = std::thread::Builder::new().name("cedar-warm-up".into()).spawn(Policies::warm_up);
        let load = move || Policies::load_standard(&dir, &files);
        let thread = std::thread::Builder::new().name("policies".into()).spawn(load.clone());
        PolicyLoad(match thread {
            Ok(handle) => Loading::Thread(handle),
            Err(_) => Loading::Done(Box::new(load())),
        })
    }

    /// The parsed policies, once the thread is done.
    fn wait(self) -> Result<Policies, String> {
        match self.0 {
            Loading::Thread(handle) => handle
                .join()
                .unwrap_or_else(|_| Err("the admission policies could not be loaded".into())),
            Loading::Done(result) => *result,
        }
    }
}

impl Admitted {
    /// Measures the launch and asks the admission `policies` (see [`PolicyLoad`]), before
    /// anything exists. A denial is [`CellError::Denied`]; every failure is in the audit log.
    /// `client` is who asks (a daemon's client); `None` is the host's operator.
    pub fn new(
        plan: CellPlan,
        mut ev: CellEvidence,
        policies: PolicyLoad,
        client: Option<&str>,
    ) -> Result<Admitted, CellError> {
        let decided = Self::decide(&plan, &mut ev, policies, client);
        let (measurement, decision) = logged(&mut ev, decided)?;
        Ok(Admitted { plan, ev, measurement, decision })
    }

    fn decide(
        plan: &CellPlan,
        ev: &mut CellEvidence,
        policies: PolicyLoad,
        client: Option<&str>,
    ) -> Result<(LaunchMeasurement, AdmissionDecision), CellError> {
        let t = Instant::now();
        let cache = DigestCache::new(ev.host.dir.join("digests"));
        let measurement = plan.measure(Some(&cache))?;
        ev.costs.measure_ms += ms_since(t);
        if let SnapshotUse::Restore { name, components, .. } = &plan.request.snapshot {
            crate::snapshot::check_components(name, components, &measurement.components)?;
        }
        // What the start waited for the policies, not what parsing them took.
        let t = Instant::now();
        let policies = policies.wait();
        ev.costs.policy_ms += ms_since(t);
        let request = plan.admission_request(&ev.host.profile, &measurement, client);
        let decision = ev.admit(policies, &request, &measurement)?;
        if !decision.allowed {
            return Err(CellError::Denied(decision.explain()));
        }
        Ok((measurement, decision))
    }

    /// The launch digest.
    pub fn launch_digest(&self) -> &str {
        &self.measurement.launch_digest
    }

    /// The measured components (kernel, initrd, image, VMM, ...) by name.
    pub fn components(&self) -> &std::collections::BTreeMap<String, String> {
        &self.measurement.components
    }

    /// Checks that this host can run the cell, then starts its VMM (jailed if planned so) and
    /// signs the launch receipt naming `command`. On failure the error is in the audit log.
    pub fn start(mut self, host: &HostConfig, command: &[String]) -> Result<Cell, CellError> {
        let published =
            network::bind_published(&self.plan.request.network).map_err(CellError::Host);
        let published = logged(&mut self.ev, published)?;
        let vmm = self.start_vmm(host);
        let mut vmm = logged(&mut self.ev, vmm)?;
        let net = &self.plan.request.network;
        let service = (!net.is_none()).then(|| {
            network::Service::start(network::Start {
                network: net.clone(),
                cell: self.plan.id.clone(),
                client: self.ev.client().map(str::to_owned),
                audit: self.ev.audit_writer(),
                egress: vmm.take_listener(EGRESS_PORT),
                dns: vmm.take_listener(DNS_PORT),
                published,
                vsock_path: vmm.vsock_path(),
                resolve: network::dns::host_lookup,
            })
        });
        let mut cell = Cell {
            plan: self.plan,
            ev: self.ev,
            vmm,
            network: service,
            link: None,
            measurement: self.measurement,
            launch_receipt: PathBuf::new(),
            vmm_pid: None,
        };
        let pid = cell.vmm.vmm_pid(Duration::from_secs(5));
        cell.vmm_pid = pid;
        let identity = cell.plan.image_identity();
        let start = cell.plan.start_identity();
        let receipt =
            cell.ev.launched(&cell.measurement, &self.decision, command, pid, &identity, &start);
        // On failure the cell's VMM goes with `cell` (its Drop tears down).
        cell.launch_receipt = logged(&mut cell.ev, receipt.map_err(CellError::from))?;
        Ok(cell)
    }

    fn start_vmm(&mut self, host: &HostConfig) -> Result<Vmm, CellError> {
        let memory = self.plan.request.memory.mib();
        if let Some(total) = isocell_vmm_model::config::host_memory_mib() {
            if memory > total {
                return Err(CellError::Host(format!(
                    "--memory {memory} MiB is more than this host's {total} MiB; give less"
                )));
            }
        }
        if let Err(e) = isocell_vmm_model::host_check::check() {
            return Err(CellError::Host(format!(
                "{e}\nOn such a host run cells in an isocell machine: `isocell machine init` (once), \
                 then `isocell machine start`; `isocell run` then uses it"
            )));
        }
        for stale in vmm_process::sweep_stale(&host.run_dir) {
            let _ = self.ev.log("cleanup", json!({ "stale_cell": stale }));
        }
        // The cell's egress and DNS services listen on host vsock ports, only with egress rules.
        let ports: &[u32] = if self.plan.request.network.egress.is_empty() {
            &[]
        } else {
            &[EGRESS_PORT, DNS_PORT]
        };
        // A jailed VMM has the snapshot's arguments in its jail spec already.
        let mut vmm_args = self.plan.vmm_args.clone();
        if let Some(kind) = &host.seccomp_probe {
            vmm_args.extend(["--seccomp-probe".to_owned(), kind.clone()]);
        }
        Vmm::start(
            &host.run_dir,
            &self.plan.id,
            &host.vmm,
            &self.plan.config,
            self.plan.jail.as_ref(),
            ports,
            &vmm_args,
        )
        .map_err(CellError::Start)
    }
}

/// A started cell: its VMM runs; once [`Cell::wait_ready`] returns, its agent answers.
pub struct Cell {
    plan: CellPlan,
    ev: CellEvidence,
    vmm: Vmm,
    /// The cell's network service (egress, DNS, published ports), if it has a network.
    network: Option<network::Service>,
    link: Option<AgentLink>,
    measurement: LaunchMeasurement,
    launch_receipt: PathBuf,
    vmm_pid: Option<u32>,
}

/// What [`Cell::delete`] leaves: the exit receipt and what teardown verified.
pub struct Ended {
    /// The signed exit receipt.
    pub exit_receipt: PathBuf,
    /// The launch receipt.
    pub launch_receipt: PathBuf,
    /// Each teardown fact, checked.
    pub checks: TeardownChecks,
    /// The VMM's own report (boot phases, memory), if it wrote one.
    pub vmm_report: Option<Value>,
    /// The launch digest.
    pub launch_digest: String,
    /// What the evidence cost.
    pub costs: Costs,
}

impl Cell {
    /// The cell's id.
    pub fn id(&self) -> &str {
        &self.plan.id
    }

    /// The launch digest.
    pub fn launch_digest(&self) -> &str {
        &self.measurement.launch_digest
    }

    /// The cell's plan.
    pub fn plan(&self) -> &CellPlan {
        &self.plan
    }

    /// A descriptor that becomes readable when the cell's VMM exits (for a supervisor's poll).
    pub fn vmm_exit_fd(&self) -> Option<std::os::fd::RawFd> {
        self.vmm.exit_fd()
    }

    /// The VMM's exit status, once it has exited (never blocks).
    pub fn vmm_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.vmm.exited()
    }

    /// The VMM's process id on this host, as the launch receipt names it.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm_pid
    }

    /// Sends `signal` to the cell's VMM through its pidfd.
    pub fn signal_vmm(&self, signal: i32) -> std::io::Result<()> {
        self.vmm.signal_vmm(signal)
    }

    /// Where the cell takes session connections.
    pub fn sessions(&self, host: &HostConfig) -> crate::session::SessionSocket {
        crate::session::SessionSocket::of(&host.run_dir, &self.plan.id)
    }

    /// Records an audit event for this cell.
    pub fn log(&mut self, kind: &str, data: Value) -> Result<(), CellError> {
        Ok(self.ev.log(kind, data)?)
    }

    /// Waits, at most `timeout`, for the agent to connect and complete the handshake.
    /// Returns the agent's name.
    pub fn wait_ready(&mut self, timeout: Duration, cancel: &Cancel) -> Result<String, CellError> {
        let started = Instant::now();
        let stream = match self.vmm.wait_for_agent(timeout, || cancel.is_cancelled()) {
            Ok(s) => s,
            Err(e) => {
                return Err(match cancel.reason() {
                    Some(r) => CellError::Cancelled(r),
                    None => CellError::Boot(e),
                })
            }
        };
        let boot_ms = ms_since(started);
        let mut start = json!({ "boot_ms": boot_ms.round() as u64 });
        let agent = match &self.plan.request.snapshot {
            // The restored VMM handed us the connection the agent made to the host that took
            // the snapshot (it said hello there): the first request is the reseed.
            SnapshotUse::Restore { name, agent, .. } => {
                let (name, agent) = (name.clone(), agent.clone());
                self.link =
                    Some(AgentLink::resumed(stream).map_err(|e| CellError::Agent(e.to_string()))?);
                self.reseed(timeout)
                    .map_err(|e| CellError::Agent(format!("{e}{}", self.vmm.diagnostics())))?;
                // One audit entry for the start says both (each entry is four syncs).
                start["snapshot"] = json!(name);
                start["reseeded"] = json!(true);
                agent
            }
            _ => {
                let (link, agent) = AgentLink::handshake(stream, timeout)
                    .map_err(|e| CellError::Agent(format!("{e}{}", self.vmm.diagnostics())))?;
                self.link = Some(link);
                agent
            }
        };
        start["agent"] = json!(agent);
        self.log("start", start)?;
        Ok(agent)
    }

    /// A cell restored from a snapshot shares its RNG state and stopped clock with every
    /// other copy: before anything runs, the agent mixes in fresh entropy from this host,
    /// reseeds, and sets the clock.
    fn reseed(&mut self, timeout: Duration) -> Result<(), CellError> {
        let mut entropy = vec![0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut entropy))
            .map_err(|e| CellError::Host(format!("cannot read this host's entropy: {e}")))?;
        let unix_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        match self.ask(&Message::Reseed { entropy, unix_time_ns }, timeout, "the reseed answer")? {
            Message::Done => Ok(()),
            Message::Error { message } => {
                Err(CellError::Agent(format!("the restored cell could not reseed: {message}")))
            }
            other => Err(CellError::Agent(format!("unexpected answer to reseed: {other:?}"))),
        }
    }

    /// Sends `msg` to the agent and waits at most `limit` for its answer (`what`, in the error
    /// when none comes).
    fn ask(&mut self, msg: &Message, limit: Duration, what: &str) -> Result<Message, CellError> {
        let link = self.link()?;
        link.send(msg).map_err(|e| CellError::Agent(e.to_string()))?;
        link.expect(limit, what).map_err(|e| CellError::Agent(e.to_string()))
    }

    /// Asks the agent of a cell that has run nothing to get ready to be saved: it answers,
    /// then only waits for its connection to break (see `Message::PrepareSnapshot`).
    pub fn prepare_snapshot(&mut self, timeout: Duration) -> Result<(), CellError> {
        match self.ask(&Message::PrepareSnapshot, timeout, "the snapshot answer")? {
            Message::Done => Ok(()),
            other => Err(CellError::Agent(format!("the agent will not be saved: {other:?}"))),
        }
    }

    /// Waits up to `timeout` for the VMM to exit by itself (killing it after), keeping the
    /// agent connection open until then. Returns its status.
    pub fn wait_vmm_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let status = self.vmm.stop(timeout);
        self.link = None;
        status
    }

    /// The VMM's own report, once it has exited.
    pub fn vmm_report(&self) -> Option<Value> {
        self.vmm.vmm_report()
    }

    fn link(&mut self) -> Result<&mut AgentLink, CellError> {
        self.link
            .as_mut()
            .ok_or_else(|| CellError::Agent("the cell's agent is not connected".into()))
    }

    /// Copies `host` (a file or a tree) to `guest` in the cell, by `deadline`.
    pub fn put(&mut self, host: &Path, guest: &str, deadline: Instant) -> Result<(), CellError> {
        Ok(transfer::put(self.link()?, host, guest, deadline)?)
    }

    /// Makes `guest` (something already copied in) read-only for everything in the cell: the
    /// agent bind-mounts it read-only over itself, as a runtime mounts a read-only volume. The
    /// agent has `limit` to answer.
    pub fn make_read_only(&mut self, guest: &str, limit: Duration) -> Result<(), CellError> {
        let msg = Message::MakeReadOnly { path: guest.to_owned() };
        match self.ask(&msg, limit, "the read-only answer")? {
            Message::Done => Ok(()),
            Message::Error { message } => {
                Err(CellError::Agent(format!("{guest} could not be made read-only: {message}")))
            }
            other => {
                Err(CellError::Agent(format!("unexpected answer to make-read-only: {other:?}")))
            }
        }
    }

    /// Copies `guest` (a file or a tree) out of the cell to `host`, within `budget`. Nothing
    /// half-copied is left. After a refused copy the connection is out of step: the cell
    /// takes no more copies or commands.
    pub fn get(
        &mut self,
        guest: &str,
        host: &Path,
        budget: &mut OutputBudget,
    ) -> Result<(), CellError> {
        let r = transfer::get(self.link()?, guest, host, budget);
        if let Err(e) = &r {
            let _ = self.log("output_refused", json!({ "output": guest, "reason": e.to_string() }));
            self.link = None;
        }
        Ok(r?)
    }

    /// Runs `process` in the cell, its output to `sink` as it comes, `stdin` (if any)
    /// forwarded until it ends. Stops it (SIGKILL to its process group) past `timeout` or
    /// when `cancel` fires.
    pub fn exec(
        &mut self,
        process: &Process,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut dyn OutputSink,
        timeout: Option<Duration>,
        cancel: &Cancel,
    ) -> Result<Termination, CellError> {
        let argv_digest = isocell_evidence::canonical::sha256_hex(
            serde_json::to_string(&process.argv).unwrap_or_default().as_bytes(),
        );
        self.log("exec", json!({ "program": process.argv.first(), "argv_sha256": argv_digest }))?;
        self.exec_inner(process, stdin, sink, timeout, cancel)
    }

    fn exec_inner(
        &mut self,
        process: &Process,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut dyn OutputSink,
        timeout: Option<Duration>,
        cancel: &Cancel,
    ) -> Result<Termination, CellError> {
        let link = self.link()?;
        command::start(link, &Message::Exec(command::request(process, stdin.is_some())))?;
        if let Some(input) = stdin {
            command::forward_stdin(input, link.writer());
        }
        command::stream(link, sink, timeout, cancel)
    }

    /// Ends the cell: asks the VMM to stop (SIGTERM: it stops the vCPUs and writes its report;
    /// the guest is not asked to shut itself down, since nothing in it outlives the cell: a
    /// command still running ends with it, and output it has not yet sent is dropped), kills
    /// it if it has not within a grace period, removes the cgroup and directory, checks each
    /// is gone, and signs the exit receipt with `verdict`. Warnings (an unclean shutdown, a
    /// failed check) go to `sink`.
    pub fn delete(
        mut self,
        verdict: &Verdict,
        sink: &mut dyn OutputSink,
    ) -> Result<Ended, CellError> {
        if self.vmm.signal_vmm(libc::SIGTERM).is_err() {
            // No pidfd for the VMM (its pid never came): the agent powers the guest off.
            if let Some(link) = &self.link {
                let _ = link.send(&Message::Shutdown);
            }
        }
        let status = self.vmm.stop(SHUTDOWN_GRACE);
        // With the VMM gone every relayed connection has ended; their events are written
        // before the exit receipt, which carries the totals.
        let network = self.network.take().map(network::Service::stop);
        if !status.is_some_and(|s| s.success()) {
            sink.notice(&format!(
                "warning: the cell did not shut down cleanly (VMM {}){}",
                status.map_or("killed".into(), |s| s.to_string()),
                self.vmm.diagnostics()
            ));
        }
        let Cell { plan, mut ev, vmm, measurement, launch_receipt, .. } = self;
        let vmm_report = vmm.vmm_report();
        let (checks, oom_kills) = vmm.teardown();
        let checks_json = serde_json::to_value(&checks).unwrap_or_default();
        if checks_json.as_object().is_some_and(|o| o.values().any(|v| v != &Value::Bool(true))) {
            sink.notice(&format!("warning: a teardown check failed: {checks_json}"));
        }
        let negotiated = vmm_report.as_ref().and_then(|r| r.get("negotiated_features"));
        let surface = plan.surface(negotiated);
        let result = (|| {
            let surface_path = ev.write_record("surface.json", &surface)?;
            let facts = json!({
                "surface": surface_path,
                "surface_sha256": isocell_evidence::canonical::sha256_hex(
                    isocell_evidence::canonical::to_canonical_string(&surface).as_bytes(),
                ),
                "oom_kills": oom_kills,
                "network": network,
            });
            ev.ended(verdict.exit_code, verdict.outcome, &checks_json, facts)
        })();
        let exit_receipt = result?;
        Ok(Ended {
            exit_receipt,
            launch_receipt,
            checks,
            vmm_report,
            launch_digest: measurement.launch_digest,
            costs: ev.costs,
        })
    }
}

/// A deadline `wait` from now (saturating).
pub fn deadline(wait: Duration) -> Instant {
    deadline_in(wait)
}
