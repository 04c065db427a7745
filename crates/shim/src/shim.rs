//! The shim's own lifecycle under containerd: `start` (one shim process per pod, found again
//! by the pod's sandbox id, or per container outside a pod), the long-running task server, and
//! `delete`, which containerd runs when a shim is gone, to clean up what it left.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::write_str_to_file;
use containerd_shim::{api, Config, Error, Flags, StartOpts};
use containerd_shim_protos::protobuf::MessageField;
use isocell_host::HostConfig;

use crate::container::{cell_id, KILLED};
use crate::events::{timestamp, Events};
use crate::service::Service;

/// The shim.
pub struct IsoShim {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
}

/// The shim grouping key of the container whose bundle is `bundle`: a pod's containers share
/// its sandbox's shim.
fn grouping(bundle: &Path, id: &str) -> String {
    crate::oci::read_spec(bundle)
        .ok()
        .and_then(|s| s.annotations.get(crate::oci::SANDBOX_ID).cloned())
        .filter(|g| !g.is_empty())
        .unwrap_or_else(|| id.to_owned())
}

#[async_trait]
impl Shim for IsoShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        IsoShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // containerd runs `start` in the bundle.
        let group = grouping(Path::new("."), &opts.id);
        let address = spawn(opts, &group, Vec::new()).await?;
        // containerd finds a running shim again from this file after it restarts.
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        // The shim that ran this container is gone: end its cell (the VMM and everything in
        // its cgroup), sign the exit receipt, unmount the root.
        crate::rootfs::unmount(Path::new("rootfs"));
        if let Ok(host) = HostConfig::discover(false) {
            let id = cell_id(&self.namespace, &self.id);
            if let Err(e) = isocell_host::supervisor::reconcile_lost(&host, &id) {
                log::warn!("cleaning up cell {id}: {e}");
            }
        }
        Ok(api::DeleteResponse {
            exit_status: KILLED,
            exited_at: MessageField::some(timestamp(SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        let events = Events::start(publisher, self.namespace.clone());
        Service::new(self.namespace.clone(), events, self.exit.clone())
    }
}
