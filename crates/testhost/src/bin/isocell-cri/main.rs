//! `isocell-cri`: the calls kubelet makes for a pod, against a CRI socket, for the shim's
//! end-to-end tests in the test host (Debian has no crictl). `pod` runs one pod of one
//! container the way kubelet does (RunPodSandbox, CreateContainer, StartContainer,
//! ContainerStatus, ExecSync, ContainerStats, StopContainer, RemoveContainer, StopPodSandbox,
//! RemovePodSandbox) and prints what it saw as `key=value` lines; the first call that fails
//! prints `failed_at=CALL` and its message, and ends the run after removing the pod.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatsRequest,
    ContainerStatusRequest, CreateContainerRequest, DnsConfig, ExecSyncRequest, ImageSpec,
    KeyValue, LinuxContainerConfig, LinuxContainerResources, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Parser)]
struct Args {
    /// containerd's socket (its CRI service).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    socket: String,
    /// The runtime handler (`isocell`).
    #[arg(long)]
    handler: String,
    /// The container's image.
    #[arg(long)]
    image: String,
    /// The pod's name, namespace and UID.
    #[arg(long, default_value = "web")]
    name: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(long, default_value = "uid-1")]
    uid: String,
    /// Pod annotations, KEY=VALUE.
    #[arg(long = "annotation")]
    annotations: Vec<String>,
    /// The pod's log directory.
    #[arg(long)]
    log_dir: String,
    /// A host directory mounted read-only at /config (as kubelet mounts a ConfigMap).
    #[arg(long)]
    config_dir: Option<String>,
    /// The container's command.
    #[arg(last = true)]
    command: Vec<String>,
}

fn say(key: &str, value: impl std::fmt::Display) {
    println!("{key}={value}");
}

async fn connect(socket: String) -> Result<RuntimeServiceClient<Channel>> {
    // The URI is a placeholder: every connection goes to the Unix socket.
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let s = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .context("connecting to the CRI socket")?;
    Ok(RuntimeServiceClient::new(channel))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut rt = connect(args.socket.clone()).await?;
    let v = rt.version(VersionRequest { version: "v1".into() }).await?.into_inner();
    say("cri_runtime", &v.runtime_name);
    say("cri_api", &v.runtime_api_version);
    let annotations: HashMap<String, String> = args
        .annotations
        .iter()
        .filter_map(|a| a.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let pod_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: args.name.clone(),
            uid: args.uid.clone(),
            namespace: args.namespace.clone(),
            attempt: 0,
        }),
        hostname: args.name.clone(),
        log_directory: args.log_dir.clone(),
        dns_config: Some(DnsConfig { servers: vec!["127.0.0.1".into()], ..Default::default() }),
        annotations,
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Pod as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let started = Instant::now();
    let pod = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: args.handler.clone(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    say("pod", &pod);
    let result = run_container(&mut rt, &args, &pod, &pod_config, started).await;
    if let Err(e) = &result {
        say("failed", format!("{e:#}").replace('\n', " "));
    }
    let stopped = rt.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await;
    say("stop_pod", if stopped.is_ok() { "ok" } else { "failed" });
    let removed = rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod }).await;
    say("remove_pod", if removed.is_ok() { "ok" } else { "failed" });
    Ok(())
}

async fn run_container(
    rt: &mut RuntimeServiceClient<Channel>,
    args: &Args,
    pod: &str,
    pod_config: &PodSandboxConfig,
    started: Instant,
) -> Result<()> {
    let mounts = args
        .config_dir
        .iter()
        .map(|d| Mount {
            container_path: "/config".into(),
            host_path: d.clone(),
            readonly: true,
            ..Default::default()
        })
        .collect();
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata { name: "app".into(), attempt: 0 }),
        image: Some(ImageSpec { image: args.image.clone(), ..Default::default() }),
        command: args.command.clone(),
        envs: vec![KeyValue { key: "GREETING".into(), value: "hi".into() }],
        mounts,
        log_path: "app.log".into(),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 150_000,
                memory_limit_in_bytes: 128 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.to_owned(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest { container_id: id.clone() })
        .await
        .context("StartContainer")?;
    say("pod_to_running_ms", started.elapsed().as_millis());
    let status = |rt: &mut RuntimeServiceClient<Channel>| {
        let req = ContainerStatusRequest { container_id: id.clone(), verbose: false };
        let mut rt = rt.clone();
        async move {
            let s = rt.container_status(req).await?.into_inner().status.unwrap_or_default();
            Ok::<_, tonic::Status>(s)
        }
    };
    let s = status(rt).await.context("ContainerStatus")?;
    say("state", ContainerState::try_from(s.state).map_or("unknown", |s| s.as_str_name()));
    let exec = |rt: &mut RuntimeServiceClient<Channel>, cmd: &[&str]| {
        let req = ExecSyncRequest {
            container_id: id.clone(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: 60,
        };
        let mut rt = rt.clone();
        async move { Ok::<_, tonic::Status>(rt.exec_sync(req).await?.into_inner()) }
    };
    let e = exec(rt, &["sh", "-c", "echo exec-$GREETING; cat /config/setting 2>&1"])
        .await
        .context("ExecSync")?;
    say(
        "exec_stdout",
        String::from_utf8_lossy(&e.stdout).split_whitespace().collect::<Vec<_>>().join(","),
    );
    say("exec_exit", e.exit_code);
    // The ConfigMap-like volume is read-only, as kubelet asks.
    let write = "{ echo changed > /config/setting; } 2>&1; cat /config/setting";
    let e = exec(rt, &["sh", "-c", write]).await.context("ExecSync")?;
    let out = String::from_utf8_lossy(&e.stdout);
    let refused = out.contains("Read-only file system");
    say("config_write", if refused { "refused_read_only" } else { "not_refused" });
    say("config_after_write", out.lines().last().unwrap_or_default());
    let e = exec(rt, &["sh", "-c", "exit 4"]).await.context("ExecSync")?;
    say("exec_exit_4", e.exit_code);
    let stats = rt
        .container_stats(ContainerStatsRequest { container_id: id.clone() })
        .await
        .context("ContainerStats")?
        .into_inner()
        .stats
        .unwrap_or_default();
    say(
        "stats_memory_bytes",
        stats.memory.and_then(|m| m.working_set_bytes).map_or(0, |v| v.value),
    );
    rt.stop_container(StopContainerRequest { container_id: id.clone(), timeout: 10 })
        .await
        .context("StopContainer")?;
    let mut s = status(rt).await.context("ContainerStatus")?;
    for _ in 0..100 {
        if s.state == ContainerState::ContainerExited as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = status(rt).await.context("ContainerStatus")?;
    }
    say("stopped_state", ContainerState::try_from(s.state).map_or("unknown", |s| s.as_str_name()));
    say("exit_code", s.exit_code);
    say("log_path", &s.log_path);
    rt.remove_container(RemoveContainerRequest { container_id: id })
        .await
        .context("RemoveContainer")?;
    say("removed", "ok");
    Ok(())
}
