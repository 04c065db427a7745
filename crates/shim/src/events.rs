//! The task events containerd expects, published in the order they happen: one queue, one
//! task that forwards it, so an exit is never published before the start it follows.

use std::time::SystemTime;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::context::Context;
use tokio::sync::mpsc;

/// One event for containerd.
pub struct Event {
    topic: &'static str,
    message: Box<dyn MessageDyn>,
}

/// Where events are queued; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Events(mpsc::UnboundedSender<Event>);

impl Events {
    /// Queues `event`. A shim whose publisher is gone drops it (containerd then learns the
    /// state from `State` and `Wait`).
    pub fn send(&self, event: Event) {
        let _ = self.0.send(event);
    }

    /// A queue whose events are published to containerd under `namespace` by a task of its own.
    pub fn start(publisher: RemotePublisher, namespace: String) -> Events {
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                if let Err(err) =
                    publisher.publish(Context::default(), e.topic, &namespace, e.message).await
                {
                    log::warn!("publishing {}: {err}", e.topic);
                }
            }
        });
        Events(tx)
    }
}

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    ts
}

impl Event {
    /// A container was created.
    pub fn create(id: &str, bundle: &str, stdio: &crate::container::Stdio, pid: u32) -> Event {
        let io = TaskIO {
            stdin: stdio.stdin.clone(),
            stdout: stdio.stdout.clone(),
            stderr: stdio.stderr.clone(),
            terminal: stdio.terminal,
            ..Default::default()
        };
        let e = TaskCreate {
            container_id: id.to_owned(),
            bundle: bundle.to_owned(),
            io: MessageField::some(io),
            pid,
            ..Default::default()
        };
        Event { topic: topics::TASK_CREATE_EVENT_TOPIC, message: Box::new(e) }
    }

    /// A container's own process started.
    pub fn start(id: &str, pid: u32) -> Event {
        let e = TaskStart { container_id: id.to_owned(), pid, ..Default::default() };
        Event { topic: topics::TASK_START_EVENT_TOPIC, message: Box::new(e) }
    }

    /// An exec was added.
    pub fn exec_added(id: &str, exec_id: &str) -> Event {
        let e = TaskExecAdded {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        Event { topic: topics::TASK_EXEC_ADDED_EVENT_TOPIC, message: Box::new(e) }
    }

    /// An exec started.
    pub fn exec_started(id: &str, exec_id: &str, pid: u32) -> Event {
        let e = TaskExecStarted {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            pid,
            ..Default::default()
        };
        Event { topic: topics::TASK_EXEC_STARTED_EVENT_TOPIC, message: Box::new(e) }
    }

    /// A process exited (`exec_id` empty: the container's own, whose id is the container's).
    pub fn exit(id: &str, exec_id: &str, pid: u32, status: u32, at: SystemTime) -> Event {
        let e = TaskExit {
            container_id: id.to_owned(),
            id: if exec_id.is_empty() { id.to_owned() } else { exec_id.to_owned() },
            pid,
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        };
        Event { topic: topics::TASK_EXIT_EVENT_TOPIC, message: Box::new(e) }
    }

    /// A container was deleted.
    pub fn delete(id: &str, pid: u32, status: u32, at: SystemTime) -> Event {
        let e = TaskDelete {
            container_id: id.to_owned(),
            id: id.to_owned(),
            pid,
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        };
        Event { topic: topics::TASK_DELETE_EVENT_TOPIC, message: Box::new(e) }
    }
}
