//! Evidence of what happened to every cell: canonical JSON for anything that is hashed or signed,
//! the host's append-only, hash-chained audit log with signed heads and checkpoints, the launch
//! measurement, signed receipts, and the Cedar admission policy.

pub mod audit;
pub mod canonical;
pub mod measure;
pub mod policy;
pub mod receipt;
