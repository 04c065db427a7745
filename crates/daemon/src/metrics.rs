//! `/metrics` for Prometheus: cells by state, boot and exec latency, admission decisions, and
//! how cells ended.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    /// The cell state.
    pub state: String,
}

/// A `decision` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Decision {
    /// `allow` or `deny`.
    pub decision: String,
}

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// How the cell (and its VMM) ended.
    pub reason: String,
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    /// Cells by state (set from the database at each scrape).
    pub cells: Family<State, Gauge>,
    /// Seconds from create to the agent's hello.
    pub boot_seconds: Histogram,
    /// Seconds from an exec request to the command's start in the cell.
    pub exec_start_seconds: Histogram,
    /// Admission decisions.
    pub admissions: Family<Decision, Counter>,
    /// Cells (and their VMMs) that ended, by reason.
    pub vmm_exits: Family<Reason, Counter>,
}

/// Bucket bounds, seconds: 1 ms to ~65 s.
fn buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17)
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("isocell");
        let cells = Family::<State, Gauge>::default();
        let boot_seconds = Histogram::new(buckets());
        let exec_start_seconds = Histogram::new(buckets());
        let admissions = Family::<Decision, Counter>::default();
        let vmm_exits = Family::<Reason, Counter>::default();
        registry.register("cells", "Cells by state", cells.clone());
        registry.register("boot_seconds", "Cell create to agent ready", boot_seconds.clone());
        registry.register(
            "exec_start_seconds",
            "Exec request to the command's start in the cell",
            exec_start_seconds.clone(),
        );
        registry.register("admissions", "Admission decisions", admissions.clone());
        registry.register("vmm_exits", "Cells whose VMM ended, by reason", vmm_exits.clone());
        Metrics { registry, cells, boot_seconds, exec_start_seconds, admissions, vmm_exits }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
