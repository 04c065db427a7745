//! `containerd-shim-isocell-v2`: containerd's runtime v2 shim for IsoCell, so that
//! `ctr run --runtime io.containerd.isocell.v2` and Kubernetes' `runtimeClassName: isocell`
//! run containers in cells, with the same image conversion, jail, seccomp filter, admission
//! and evidence as `isocell run`.
//!
//! One shim process serves one pod (or one container outside a pod). A pod's sandbox (pause)
//! container runs nothing; each of its containers is a cell of its own, since a pod's images
//! are not known when its sandbox starts and a cell's disks are fixed when it boots.

mod container;
mod events;
mod oci;
mod rootfs;
mod service;
mod shim;
mod stats;

/// The runtime name containerd knows this shim by.
const RUNTIME: &str = "io.containerd.isocell.v2";

#[tokio::main]
async fn main() {
    // The cell lifecycle waits for its own VMM processes: the crate's reaper must not take
    // their exit statuses, and orphans go to init rather than to a shim that would not reap
    // them.
    let config =
        containerd_shim::Config { no_reaper: true, no_sub_reaper: true, ..Default::default() };
    containerd_shim::asynchronous::run::<shim::IsoShim>(RUNTIME, Some(config)).await;
}
