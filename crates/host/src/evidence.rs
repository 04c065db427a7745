//! The evidence of one cell: the admission decision, the launch measurement and receipt, every
//! lifecycle event in the audit log, and the exit receipt with verified teardown checks. Each
//! step is timed, so the benchmark can show what evidence costs.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use isocell_evidence::audit::{AuditError, AuditLog};
use isocell_evidence::measure::LaunchMeasurement;
use isocell_evidence::policy::{AdmissionDecision, AdmissionRequest, Policies};
use isocell_evidence::receipt;
use serde::Serialize;
use serde_json::{json, Value};

use crate::state::{Host, StateError};

/// Why a cell's evidence (measurement, admission, audit entries, receipts) could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    /// The state directory or the host's profile.
    #[error(transparent)]
    State(#[from] StateError),
    /// The closing checkpoint could not be written.
    #[error("cannot checkpoint the audit log: {0}")]
    Checkpoint(#[source] AuditError),
    /// The launch could not be measured (a file could not be read).
    #[error("{0}")]
    Measure(String),
    /// The admission policies could not be loaded or evaluated.
    #[error("{0}")]
    Policy(String),
    /// A stored launch receipt is not JSON.
    #[error("{}: not JSON: {source}", path.display())]
    NotJson {
        /// The receipt.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
    /// A stored launch receipt does not verify.
    #[error("{}: {reason}", path.display())]
    BadReceipt {
        /// The receipt.
        path: PathBuf,
        /// Why it does not verify.
        reason: String,
    },
    /// A record could not be serialized.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A record could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The record.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Milliseconds spent on evidence, by kind.
#[derive(Debug, Default, Serialize)]
pub struct Costs {
    /// Launch measurement (file digests, mostly from the cache).
    pub measure_ms: f64,
    /// Evaluating the policies, and loading them where that was on the way: a cell's start
    /// counts only the wait for their parse, which runs beside planning and measuring
    /// ([`crate::cell::PolicyLoad`]).
    pub policy_ms: f64,
    /// Signing and writing both receipts.
    pub receipts_ms: f64,
    /// Audit log appends, each fsync'd, and the closing checkpoint.
    pub audit_ms: f64,
    /// Number of audit entries written.
    pub audit_entries: u32,
}

/// Milliseconds since `t`.
pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The evidence being gathered for one cell.
pub struct CellEvidence {
    /// This host.
    pub host: Host,
    audit: AuditLog,
    cell_id: String,
    /// Time spent, by kind.
    pub costs: Costs,
    launch_digest: Option<String>,
    started_ms: u64,
    /// `(seq, hash)` of the latest audit entry written for this cell.
    last_entry: Option<(u64, String)>,
    /// The daemon client the cell belongs to, named in each of its audit entries.
    client: Option<String>,
}

impl CellEvidence {
    /// Opens the host's audit log for cell `cell_id`.
    pub fn open(host: Host, cell_id: &str) -> Result<Self, EvidenceError> {
        let t = Instant::now();
        let audit = AuditLog::open(&host.dir.join("audit"), host.key.clone())
            .map_err(StateError::OpenAudit)?;
        let mut costs = Costs::default();
        costs.audit_ms += ms_since(t);
        Ok(CellEvidence {
            host,
            audit,
            cell_id: cell_id.to_owned(),
            costs,
            launch_digest: None,
            started_ms: now_ms(),
            last_entry: None,
            client: None,
        })
    }

    /// Names `client` (a daemon client's identity) in every later audit entry of this cell.
    pub fn set_client(&mut self, client: &str) {
        self.client = Some(client.to_owned());
    }

    /// The daemon client named in this cell's entries, if any.
    pub fn client(&self) -> Option<&str> {
        self.client.as_deref()
    }

    /// Another writer of the same audit log, for events written by other threads (the cell's
    /// network); the log's lock keeps every writer's entries whole and in one chain.
    pub fn audit_writer(&self) -> Option<AuditLog> {
        AuditLog::open(&self.host.dir.join("audit"), self.host.key.clone()).ok()
    }

    /// Reopens the evidence of a cell launched earlier (by a process that is gone): its launch
    /// digest and start time come from its signed launch receipt. `None` if it has none.
    pub fn resume(host: Host, cell_id: &str) -> Result<Option<Self>, EvidenceError> {
        let path = host.cell_record_dir(cell_id)?.join("launch.json");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
        let doc: Value = serde_json::from_str(&text)
            .map_err(|source| EvidenceError::NotJson { path: path.clone(), source })?;
        receipt::verify(&doc, &host.key.verifying_key())
            .map_err(|reason| EvidenceError::BadReceipt { path, reason })?;
        let body = &doc["receipt"];
        let mut ev = Self::open(host, cell_id)?;
        ev.launch_digest = body["launch_digest"].as_str().map(str::to_owned);
        ev.started_ms = body["started_at_ms"].as_u64().unwrap_or(ev.started_ms);
        Ok(Some(ev))
    }

    /// Appends a lifecycle event for this cell. A cell must not run without its record, so a
    /// failure here is an error for the caller.
    pub fn log(&mut self, kind: &str, mut data: Value) -> Result<(), EvidenceError> {
        if let (Some(c), Some(o)) = (&self.client, data.as_object_mut()) {
            o.insert("client".into(), Value::String(c.clone()));
        }
        let t = Instant::now();
        let r = self.audit.append(kind, Some(&self.cell_id), data);
        self.costs.audit_ms += ms_since(t);
        self.costs.audit_entries += 1;
        let entry = r.map_err(StateError::AppendAudit)?;
        self.last_entry = Some(entry);
        Ok(())
    }

    /// Where the cell's latest audit entry is, for its receipts: `{"entry_hash", "seq"}`, or
    /// null before the first. A receipt that names it lets `isocell audit verify` tell a log that
    /// was truncated or rolled back past it.
    fn audit_position(&self) -> Value {
        match &self.last_entry {
            Some((seq, hash)) => json!({ "seq": seq, "entry_hash": hash }),
            None => Value::Null,
        }
    }

    /// Evaluates the admission policies and logs the decision, allow or deny. `policies` is as
    /// [`Policies::load_standard`] returned it (its error is that crate's message).
    pub fn admit(
        &mut self,
        policies: Result<Policies, String>,
        req: &AdmissionRequest,
        measurement: &LaunchMeasurement,
    ) -> Result<AdmissionDecision, EvidenceError> {
        let t = Instant::now();
        let decision = policies.and_then(|p| p.decide(req));
        self.costs.policy_ms += ms_since(t);
        let decision = match decision {
            Ok(d) => d,
            Err(e) => {
                self.log("error", json!({ "stage": "admission", "message": e }))?;
                return Err(EvidenceError::Policy(e));
            }
        };
        self.log(
            "admission",
            json!({
                "decision": if decision.allowed { "allow" } else { "deny" },
                "reason": decision.explain(),
                "policies": decision.policies,
                "errored": decision.errored,
                "errors": decision.errors,
                "request": req,
                "launch_digest": measurement.launch_digest,
            }),
        )?;
        Ok(decision)
    }

    fn write_receipt(&mut self, name: &str, body: Value) -> Result<PathBuf, EvidenceError> {
        let t = Instant::now();
        let path = self.write_record(name, &receipt::sign(&body, &self.host.key))?;
        self.costs.receipts_ms += ms_since(t);
        Ok(path)
    }

    fn host_json(&self) -> Value {
        let p = &self.host.profile;
        let mut host = json!({ "id": p.host_id, "jurisdiction": p.jurisdiction, "zone": p.zone, "operator": p.operator });
        // A cell in an `isocell machine` runs nested on another host: the receipt says which.
        if let Some(m) = &p.machine {
            host["machine"] = json!(m);
        }
        host
    }

    /// Signs and stores the launch receipt, and logs the cell's creation.
    pub fn launched(
        &mut self,
        m: &LaunchMeasurement,
        decision: &AdmissionDecision,
        argv: &[String],
        vmm_pid: Option<u32>,
        image: &Value,
        start: &Value,
    ) -> Result<PathBuf, EvidenceError> {
        self.launch_digest = Some(m.launch_digest.clone());
        let command_digest = isocell_evidence::canonical::sha256_hex(
            serde_json::to_string(argv).unwrap_or_default().as_bytes(),
        );
        let body = json!({
            "kind": "launch",
            "version": 1,
            "cell": self.cell_id,
            "host": self.host_json(),
            "started_at_ms": self.started_ms,
            "launch_digest": m.launch_digest,
            "components": m.components,
            "image": image,
            "start": start,
            "admission": { "decision": "allow", "policies": decision.policies },
            "command_sha256": command_digest,
            "vmm_pid": vmm_pid,
            "audit": self.audit_position(),
        });
        let path = self.write_receipt("launch.json", body)?;
        self.log(
            "create",
            json!({ "launch_digest": m.launch_digest, "receipt": path, "vmm_pid": vmm_pid }),
        )?;
        Ok(path)
    }

    /// Stores `value` as `name` in the cell's record.
    pub fn write_record(&self, name: &str, value: &Value) -> Result<PathBuf, EvidenceError> {
        let path = self.host.cell_record_dir(&self.cell_id)?.join(name);
        let text = serde_json::to_string_pretty(value)?;
        // Durable before it is in place: a host that crashes (an `isocell machine` killed, a
        // power cut) keeps either no record or the whole one, never an empty file.
        let tmp = path.with_extension("json.tmp");
        let written = (|| {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all((text + "\n").as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if let Err(source) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(EvidenceError::Write { path, source });
        }
        Ok(path)
    }

    /// Signs and stores the exit receipt (with `facts` about the cell: its surface, OOM kills),
    /// logs the teardown and closes with a checkpoint.
    pub fn ended(
        &mut self,
        exit_code: Option<i32>,
        outcome: &str,
        checks: &Value,
        facts: Value,
    ) -> Result<PathBuf, EvidenceError> {
        let ended = now_ms();
        let body = json!({
            "kind": "exit",
            "version": 1,
            "cell": self.cell_id,
            "host": self.host_json(),
            "launch_digest": self.launch_digest,
            "started_at_ms": self.started_ms,
            "ended_at_ms": ended,
            "duration_ms": ended.saturating_sub(self.started_ms),
            "exit_code": exit_code,
            "outcome": outcome,
            "teardown_checks": checks,
            "facts": facts,
            "audit": self.audit_position(),
        });
        let path = self.write_receipt("exit.json", body)?;
        self.log("teardown", json!({ "exit_code": exit_code, "outcome": outcome, "checks": checks, "receipt": path }))?;
        let t = Instant::now();
        let r = self.audit.checkpoint();
        self.costs.audit_ms += ms_since(t);
        self.costs.audit_entries += 1;
        r.map_err(EvidenceError::Checkpoint)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use isocell_evidence::audit::{self, Expectations, HEAD_FILE, LOG_FILE};

    use super::*;

    /// The receipts `isocell run` writes name the cell's latest audit entry inside their signed
    /// body, and `isocell audit verify`'s cross-check catches a log rolled back past them.
    #[test]
    fn receipts_name_the_cells_latest_audit_entry() {
        let dir = std::env::temp_dir().join(format!("isocell-ev-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let host = Host::init(&dir, "EU", "z", "o", false).unwrap();
        let key = host.key.verifying_key();
        let mut ev = CellEvidence::open(host, "cell1").unwrap();
        ev.log("admission", json!({"decision": "allow"})).unwrap();
        let m =
            LaunchMeasurement { components: BTreeMap::new(), launch_digest: "sha256:00".into() };
        let decision = AdmissionDecision {
            allowed: true,
            policies: vec!["default:allow-cells".into()],
            errored: vec![],
            errors: vec![],
            egress_rule: None,
        };
        let launch = ev
            .launched(&m, &decision, &["true".into()], None, &json!({"kind": "raw"}), &json!({}))
            .unwrap();
        let old_log = std::fs::read(dir.join("audit").join(LOG_FILE)).unwrap();
        let old_head = std::fs::read(dir.join("audit").join(HEAD_FILE)).unwrap();
        ev.log("exit", json!({"exit_code": 0})).unwrap();
        let exit = ev.ended(Some(0), "exited", &json!({}), json!({})).unwrap();

        let entries = audit::read_entries(&dir.join("audit")).unwrap();
        let kinds: Vec<&str> = entries.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["genesis", "admission", "create", "exit", "teardown", "checkpoint"]);
        for (path, seq) in [(&launch, 1), (&exit, 3)] {
            let doc: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            receipt::verify(&doc, &key).unwrap();
            let want = (seq, entries[seq as usize]["hash"].as_str().unwrap().to_owned());
            assert_eq!(receipt::audit_position(&doc).unwrap(), Some(want), "{}", path.display());
        }

        let check = || {
            let scan = receipt::scan_cells(&dir.join("cells"), &key).unwrap();
            let expect = Expectations { anchors: scan.anchors, ..Expectations::default() };
            audit::verify_expecting(&dir.join("audit"), &key, &expect)
        };
        let report = check();
        assert!(report.ok() && report.anchors == 2, "{report:?}");
        // Cut back to just after the launch, with the head of that time.
        std::fs::write(dir.join("audit").join(LOG_FILE), old_log).unwrap();
        std::fs::write(dir.join("audit").join(HEAD_FILE), old_head).unwrap();
        let problem = check().problem.unwrap();
        assert!(problem.reason.contains("exit.json"), "{problem}");
        assert!(problem.reason.contains("truncated or rolled back"), "{problem}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
