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

use std::time::Duration;

/// The runtime name containerd knows this shim by.
const RUNTIME: &str = "io.containerd.isocell.v2";

fn main() {
    // Nothing the shim serves may end it: a panic ends the process (release builds abort), and
    // its stderr goes nowhere once it serves, so the message goes to containerd's log.
    std::panic::set_hook(Box::new(|info| log::error!("containerd-shim-isocell-v2: {info}")));
    // Cells start on tokio's blocking threads, and a jailer dies with the thread that forked it
    // (PR_SET_PDEATHSIG follows the parent thread), taking its VMM along: blocking threads
    // must never retire while their cells run (tokio retires idle ones after 10 s). Several
    // workers whatever the CPU count: containerd's calls are answered while others wait.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_keep_alive(Duration::from_secs(365 * 24 * 3600))
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{RUNTIME}: cannot start: {e}");
            std::process::exit(1);
        }
    };
    // The cell lifecycle waits for its own VMM processes: the crate's reaper must not take
    // their exit statuses, and orphans go to init rather than to a shim that would not reap
    // them.
    let config =
        containerd_shim::Config { no_reaper: true, no_sub_reaper: true, ..Default::default() };
    runtime.block_on(containerd_shim::asynchronous::run::<shim::IsoShim>(RUNTIME, Some(config)));
}
