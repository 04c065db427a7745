//! IsoCell's test host: runs VMM scenarios on real KVM, directly where the machine has hardware
//! virtualization and inside a nested host under QEMU TCG everywhere else. Used by the
//! end-to-end tests, the benchmark, and the README's demo command; also the test images and a
//! real registry on 127.0.0.1 ([`registry`]) for the image tests and benchmark.

pub mod containerd;
pub mod guest_profile;
pub mod guest_tools;
pub mod host;
pub mod peer;
pub mod registry;
pub mod runner;
pub mod scenario;
pub mod stats;

pub use host::{HostKind, TestHost, TestHostError};
pub use scenario::{Scenario, Step, StepResult};
