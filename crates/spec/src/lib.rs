//! Types shared by every IsoCell component. No I/O happens here: a value of these types can be
//! built, serialised and validated anywhere, and `validate()` returns a typed error that names the
//! field at fault.

pub mod cell;
pub mod host;
pub mod memory;
pub mod network;
pub mod vm;

pub use cell::{CellSpec, Classification, Constraints};
pub use host::{HostProfile, MachineIdentity};
pub use memory::{MemorySize, MemorySizeError};
pub use network::{EgressRule, Network, NetworkError, Publish, Target};
pub use vm::{ConsoleConfig, DriveConfig, MmioPlacement, VmConfig, VmConfigError, VsockConfig};
