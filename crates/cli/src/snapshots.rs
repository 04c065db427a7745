//! `isocell snapshot`: cells saved once their agent is ready, before they ran anything, and
//! started again with `isocell run --snapshot NAME` (see `isocell_host::snapshot`).

use std::path::PathBuf;

use clap::Subcommand;
use isocell_host::snapshot;
use isocell_host::{CellImage, CellRequest, ContainerImage, HostConfig};
use isocell_spec::MemorySize;

use crate::run::{cancel_on_signals, error_status, Terminal};
use crate::{exit, images, locate, need_root};

/// One line on stdout (a closed stdout is not an error of ours).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Snapshots on this host.
#[allow(clippy::large_enum_variant)] // parsed once, from the command line
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Boot a fresh cell, wait until its agent is ready, and save it (memory and complete VM
    /// state, root's alone) as NAME. The saved cell never resumes; each `isocell run
    /// --snapshot NAME` starts a copy of it.
    Create {
        /// The snapshot's name: lowercase letters, digits, '.', '_', '-'.
        name: String,
        /// vCPUs (1-32).
        #[arg(long, default_value_t = 1)]
        cpus: u8,
        /// Guest memory (a size: 256M, 1G).
        #[arg(long, default_value = "256M", value_parser = crate::parse_memory)]
        memory: MemorySize,
        /// The image, as `isocell run` takes it [default: ISOCELL_IMAGE, or this project's
        /// base image].
        #[arg(long)]
        image: Option<String>,
        /// Cell kernel (default: ISOCELL_KERNEL, or build/guest/vmlinux of this project).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Extra kernel command-line arguments.
        #[arg(long, value_name = "ARGS")]
        kernel_args: Option<String>,
        /// Give up if the cell's agent is not up after this many seconds.
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        boot_timeout: u64,
        /// Run the VMM without its jail (as `isocell run --no-jail`).
        #[arg(long)]
        no_jail: bool,
        #[command(flatten)]
        fetch: images::FetchArgs,
    },
    /// The snapshots on this host, as JSON lines.
    List,
    /// Remove a snapshot.
    Rm {
        /// Its name.
        name: String,
    },
}

/// Runs a `snapshot` command and gives the exit status.
pub fn snapshot(cmd: SnapshotCmd) -> u8 {
    match cmd {
        SnapshotCmd::Create {
            name,
            cpus,
            memory,
            image,
            kernel,
            kernel_args,
            boot_timeout,
            no_jail,
            fetch,
        } => {
            let setup = (|| {
                if !(isocell_spec::vm::MIN_VCPUS..=isocell_spec::vm::MAX_VCPUS).contains(&cpus) {
                    return Err(format!("--cpus {cpus}: a cell has 1 to 32 vCPUs"));
                }
                if !(1..=3600).contains(&boot_timeout) {
                    return Err(format!("--boot-timeout {boot_timeout}: give 1 to 3600 seconds"));
                }
                let parsed = image.as_deref().map(isocell_image::ImageRef::parse).transpose()?;
                let image = match parsed {
                    None => CellImage::Block(locate::image(None).map_err(|e| e.to_string())?),
                    Some(isocell_image::ImageRef::Raw(p)) => {
                        CellImage::Block(locate::image(Some(&p)).map_err(|e| e.to_string())?)
                    }
                    Some(r) => {
                        let resolved = images::resolve(&r, &fetch, false)?;
                        let pinned = r.pinned_digest().is_some();
                        CellImage::Container(Box::new(ContainerImage { resolved, pinned }))
                    }
                };
                let kernel = locate::kernel(kernel.as_deref()).map_err(|e| e.to_string())?;
                if !no_jail {
                    need_root()?;
                }
                let host = HostConfig::discover(!no_jail).map_err(|e| e.to_string())?;
                let request = CellRequest {
                    kernel,
                    image,
                    cpus,
                    memory,
                    kernel_args: kernel_args.unwrap_or_default(),
                    max_lifetime_secs: Some(boot_timeout + 300),
                    constraints: Default::default(),
                    network: Default::default(),
                    snapshot: Default::default(),
                    workload: None,
                };
                Ok((host, request))
            })();
            let (host, request) = match setup {
                Ok(v) => v,
                Err(e) => return exit::fail(&e),
            };
            let cancel = cancel_on_signals();
            let timeout = std::time::Duration::from_secs(boot_timeout);
            match snapshot::create(&host, &name, request, timeout, &cancel, &mut Terminal) {
                Ok(m) => {
                    say(&snapshot::describe(&m).to_string());
                    0
                }
                Err(e) => error_status(&e),
            }
        }
        SnapshotCmd::List => match HostConfig::discover(false) {
            Ok(host) => {
                for m in snapshot::list(&host) {
                    say(&snapshot::describe(&m).to_string());
                }
                0
            }
            Err(e) => exit::fail(&e.to_string()),
        },
        SnapshotCmd::Rm { name } => match HostConfig::discover(false) {
            Ok(host) => match snapshot::remove(&host, &name) {
                Ok(()) => 0,
                Err(e) => error_status(&e),
            },
            Err(e) => exit::fail(&e.to_string()),
        },
    }
}
