//! What the test host runs (a [`Scenario`] of [`Step`]s) and what comes back ([`StepResult`]).
//! Both travel as JSON: the scenario into the nested host, one result line per step out of it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Prefix of a guest console line that carries one JSON object for the test.
pub const GUEST_RESULT_PREFIX: &str = "ISOCELL-RESULT ";

/// A batch of steps run in one test host, in order.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Scenario {
    /// The steps.
    pub steps: Vec<Step>,
    /// Host files or directories the steps need, by name: each becomes the placeholder
    /// `{name}`, the host path itself on a direct host, a copy inside the nested host (which
    /// has no access to this machine's files).
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

/// One command (normally the VMM) run on a host with real KVM.
///
/// Strings in `argv` and file paths may use placeholders that the runner replaces with paths on
/// the host it runs on: `{vmm}`, `{isocell}`, `{hostile}`, `{bzimage}`, `{vmlinux}`,
/// `{acpi_bzimage}`, `{rootfs}`, `{initrd}`, `{agent_initrd}` and `{work}` (an empty directory
/// of the step's own).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    /// Unique name.
    pub name: String,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Killed (SIGKILL) after this long; the result then says `timed_out`.
    pub timeout_secs: u64,
    /// Files to create before the run: path -> size in bytes (zero-filled).
    #[serde(default)]
    pub create_files: BTreeMap<String, u64>,
    /// Text files to write before the run: path -> contents (placeholders are replaced in both).
    #[serde(default)]
    pub write_files: BTreeMap<String, String>,
    /// Files whose SHA-256 the result reports after the run.
    #[serde(default)]
    pub hash_files: Vec<String>,
    /// A JSON file the command writes (such as the VMM's `--report`), returned in the result.
    #[serde(default)]
    pub report_file: Option<String>,
}

impl Step {
    /// A step that runs `argv` for at most `timeout_secs`, with no files to prepare, hash or
    /// read back (set those fields on the result where a step needs them).
    pub fn new<S: ToString>(name: impl Into<String>, argv: &[S], timeout_secs: u64) -> Step {
        Step {
            name: name.into(),
            argv: argv.iter().map(ToString::to_string).collect(),
            timeout_secs,
            create_files: BTreeMap::new(),
            write_files: BTreeMap::new(),
            hash_files: Vec::new(),
            report_file: None,
        }
    }
}

/// What happened to one step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepResult {
    /// The step's name.
    pub name: String,
    /// Exit status, if the process exited.
    pub exit_code: Option<i32>,
    /// Terminating signal, if it was killed.
    pub signal: Option<i32>,
    /// Whether the runner killed it at the timeout.
    pub timed_out: bool,
    /// Wall-clock microseconds from spawn to exit, measured by the runner.
    pub wall_us: u64,
    /// Standard output (the guest console, for the VMM), last 64 KiB.
    pub stdout: String,
    /// Standard error, last 64 KiB.
    pub stderr: String,
    /// The parsed `report_file`, if it was written.
    pub report: Option<serde_json::Value>,
    /// Objects from the guest's `ISOCELL-RESULT` console lines, in order.
    pub guest_results: Vec<serde_json::Value>,
    /// SHA-256 (hex) of each `hash_files` entry that existed.
    pub hashes: BTreeMap<String, String>,
    /// Where the step ran: "direct" or "nested".
    pub host: String,
    /// A runner-side failure (could not spawn, ...), if any.
    pub error: Option<String>,
}

impl StepResult {
    /// The first guest result object, or an empty object.
    pub fn guest_result(&self) -> serde_json::Value {
        self.guest_results.first().cloned().unwrap_or(serde_json::Value::Null)
    }

    /// A description of the run for assertion messages: status, stderr and the console tail.
    pub fn explain(&self) -> String {
        let tail: String = {
            let lines: Vec<&str> = self.stdout.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "step {:?} on the {} host: exit {:?}, signal {:?}, timed out {}, error {:?}\n--- stderr ---\n{}\n--- console (last 40 lines) ---\n{}",
            self.name, self.host, self.exit_code, self.signal, self.timed_out, self.error, self.stderr, tail
        )
    }
}

/// Collects the `ISOCELL-RESULT` objects from console text. Lines that do not parse are kept
/// as `{"unparsed": line}` so a test sees them rather than losing them.
pub fn guest_results(console: &str) -> Vec<serde_json::Value> {
    console
        .lines()
        .filter_map(|l| {
            let at = l.find(GUEST_RESULT_PREFIX)?;
            let json = l[at + GUEST_RESULT_PREFIX.len()..].trim();
            Some(
                serde_json::from_str(json)
                    .unwrap_or_else(|_| serde_json::json!({ "unparsed": json })),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_results() {
        let console = "boot\nISOCELL-RESULT {\"cpus\": 4}\r\nnoise ISOCELL-RESULT {bad\n";
        let r = guest_results(console);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0]["cpus"], 4);
        assert_eq!(r[1]["unparsed"], "{bad");
    }
}
