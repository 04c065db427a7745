//! Where a virtio device does its work: on a worker thread of its own, never on a vCPU thread.
//!
//! Every device's worker has the same loop: one epoll set holding an eventfd per queue (KVM
//! signals it when the guest writes that queue's index to `QueueNotify`: an ioeventfd, so a
//! notify never leaves the kernel), a control eventfd (commands from the transport: activate,
//! reset, save, restore) and, if the device has one, its backend's descriptor. Used buffers are
//! announced through the device's irqfd, so interrupts need no vCPU thread either.
//!
//! The worker owns the device and, while the driver has it set up, the queues; the transport
//! (on the vCPU threads) keeps only the register file. So a slow disk or socket stalls the
//! device, never a vCPU, and a device never shares a lock with the vCPUs.
//!
//! [`DeviceWorker`] is the state machine; [`spawn`] runs it on a thread. Tests and fuzz targets
//! drive a [`DeviceWorker`] in line instead, which makes them deterministic.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceState, QueueSnapshot, RestoreError, VirtioDevice};

/// Where a worker sends the device's state and its queues' progress.
pub type SaveReply = SyncSender<(DeviceState, Option<Vec<QueueSnapshot>>)>;

/// What the transport asks of the worker.
pub enum Command {
    /// The driver set `DRIVER_OK`: work on these queues with these features.
    Activate {
        /// The queues as the driver configured them (or as a snapshot left them).
        queues: Vec<Queue>,
        /// The features the driver accepted.
        features: u64,
    },
    /// The driver wrote 0 to the status register; answer once nothing of the old setup is
    /// left, so no used buffer lands in rings the driver has freed.
    Reset(SyncSender<()>),
    /// Send back the device's state and its queues' progress.
    Save(SaveReply),
    /// Take back saved device state.
    Restore(DeviceState, SyncSender<Result<(), RestoreError>>),
    /// Send back the state as [`Command::Save`] does, then never touch guest memory or the
    /// backend again: the VM is being saved as a snapshot and never resumes, so nothing may
    /// change after its state was taken.
    SaveAndStop(SaveReply),
}

/// A device and what it works on.
pub struct DeviceWorker {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: EventFd,
    interrupt_status: Arc<AtomicU32>,
    /// The queues, while the driver has the device set up.
    queues: Option<Vec<Queue>>,
    /// Set by [`Command::SaveAndStop`]: the worker does nothing more.
    stopped: bool,
}

impl DeviceWorker {
    /// A worker for `device`, whose interrupts go to `irq` with their cause in
    /// `interrupt_status` (which the transport shows the guest).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
        interrupt_status: Arc<AtomicU32>,
    ) -> Self {
        DeviceWorker { device, mem, irq, interrupt_status, queues: None, stopped: false }
    }

    /// The device (for its kind and backend while setting up the thread).
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Carries out one command.
    pub fn handle(&mut self, command: Command) {
        if self.stopped {
            return;
        }
        match command {
            Command::Activate { queues, features } => self.activate(queues, features),
            Command::Reset(done) => {
                self.reset();
                let _ = done.send(());
            }
            Command::Save(reply) => {
                let _ = reply.send(self.save());
            }
            Command::Restore(state, reply) => {
                let _ = reply.send(self.device.restore(&state));
            }
            Command::SaveAndStop(reply) => {
                self.stopped = true;
                let _ = reply.send(self.save());
            }
        }
    }

    fn activate(&mut self, mut queues: Vec<Queue>, features: u64) {
        self.device.activate(features);
        // Buffers the driver made available before DRIVER_OK are taken now.
        let mut used = false;
        for index in 0..queues.len() {
            if queues.get(index).is_some_and(|q| q.ready()) {
                used |= self.device.process_queue(index, &mut queues, &self.mem);
            }
        }
        self.queues = Some(queues);
        self.signal_used(used);
    }

    fn reset(&mut self) {
        self.queues = None;
        self.device.reset();
    }

    /// The device's state and, while it is set up, its queues.
    fn save(&self) -> (DeviceState, Option<Vec<QueueSnapshot>>) {
        let queues = self.queues.as_ref().map(|qs| qs.iter().map(|q| q.state().into()).collect());
        (self.device.save(), queues)
    }

    /// The guest notified queue `index`.
    pub fn queue_event(&mut self, index: usize) {
        if self.stopped {
            return;
        }
        let Some(queues) = self.queues.as_mut() else { return };
        if !queues.get(index).is_some_and(|q| q.ready()) {
            return;
        }
        let used = self.device.process_queue(index, queues, &self.mem);
        self.signal_used(used);
    }

    /// The backend has work (or its timer ran out).
    pub fn backend_event(&mut self) {
        if self.stopped {
            return;
        }
        let queues = self.queues.as_deref_mut();
        let used = self.device.process_backend(queues, &self.mem);
        self.signal_used(used);
    }

    fn signal_used(&mut self, used: bool) {
        // Without EVENT_IDX every used buffer is worth an interrupt (virtio-queue says so even
        // when the driver set NO_INTERRUPT, which the spec allows); a malformed ring gets one
        // too, and the driver looks.
        let Some(queues) = self.queues.as_mut().filter(|_| used) else { return };
        let mem = &self.mem;
        let wanted = queues
            .iter_mut()
            .filter(|q| q.ready())
            .any(|q| q.needs_notification(mem).unwrap_or(true));
        if wanted {
            self.interrupt_status.fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
            // Failing to signal only delays the guest; nothing to do about it here.
            let _ = self.irq.write(1);
        }
    }
}

/// The transport's side of a worker thread.
pub struct WorkerHandle {
    commands: Sender<Command>,
    wake: EventFd,
    /// The thread's word on its seccomp filter, until [`WorkerHandle::confirm`] takes it.
    installed: Option<(String, Receiver<Result<(), crate::seccomp::SeccompError>>)>,
}

/// How long a reset may take before the vCPU stops waiting for it (one request in flight on a
/// very slow disk, at worst).
const RESET_PATIENCE: Duration = Duration::from_secs(10);

impl WorkerHandle {
    /// Waits until the thread has installed its seccomp filter (or says why it could not).
    /// Only the first call waits.
    pub fn confirm(&mut self) -> std::io::Result<()> {
        let Some((name, installed)) = self.installed.take() else { return Ok(()) };
        match installed.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(std::io::Error::other(format!("{name} thread: {e}"))),
            Err(_) => {
                Err(std::io::Error::other(format!("the {name} thread ended before its filter")))
            }
        }
    }

    /// Queues `command` and wakes the worker.
    pub fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            let _ = self.wake.write(1);
        }
    }

    /// Asks for something and waits for the answer (`None`: the worker is gone or took longer
    /// than [`RESET_PATIENCE`]). A reset answers once the old queues are let go.
    pub fn ask<T>(&self, make: impl FnOnce(SyncSender<T>) -> Command) -> Option<T> {
        let (reply, answer) = sync_channel(1);
        self.send(make(reply));
        answer.recv_timeout(RESET_PATIENCE).ok()
    }
}

const CONTROL: u64 = 0;
const BACKEND: u64 = 1;
const FIRST_QUEUE: u64 = 2;

/// Starts the worker thread of `worker`, named `name`, waiting on `queue_events` (one per
/// queue, in queue order). The thread installs its seccomp filter before it touches a queue or
/// a command; this returns at once, so the workers compile and install their filters together
/// while the VM is built, and [`WorkerHandle::confirm`] waits for the outcome.
pub fn spawn(
    worker: DeviceWorker,
    queue_events: Vec<EventFd>,
    name: String,
) -> std::io::Result<WorkerHandle> {
    let wake = EventFd::new(EFD_NONBLOCK)?;
    let epoll = Epoll::new()?;
    epoll.ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, CONTROL))?;
    if let Some(fd) = worker.device().backend_fd() {
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, BACKEND))?;
    }
    for (i, evt) in queue_events.iter().enumerate() {
        let ev = EpollEvent::new(EventSet::IN, FIRST_QUEUE + i as u64);
        epoll.ctl(ControlOperation::Add, evt.as_raw_fd(), ev)?;
    }
    let (commands, received) = channel();
    let thread_wake = wake.try_clone()?;
    let kind = worker.device().thread_kind();
    let (installed_tx, installed) = sync_channel(1);
    let builder = std::thread::Builder::new().name(name.clone());
    builder.stack_size(crate::vstate::vm::THREAD_STACK).spawn(move || {
        let filter = crate::seccomp::install(kind);
        let failed = filter.is_err();
        let _ = installed_tx.send(filter);
        if !failed {
            run(worker, &epoll, &thread_wake, &queue_events, &received);
        }
    })?;
    Ok(WorkerHandle { commands, wake, installed: Some((name, installed)) })
}

/// The worker loop: commands first on every wake-up (an activation always precedes the
/// notifies that follow it), then whatever became ready.
fn run(
    mut worker: DeviceWorker,
    epoll: &Epoll,
    wake: &EventFd,
    queue_events: &[EventFd],
    commands: &Receiver<Command>,
) {
    let mut events = [EpollEvent::default(); 8];
    loop {
        let timeout = worker
            .device()
            .backend_timeout()
            .map_or(-1, |d| i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX));
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        // The wake-up is consumed before the channel is read, never after: a command sent
        // meanwhile leaves the eventfd set for the next round instead of being lost.
        let _ = wake.read();
        loop {
            match commands.try_recv() {
                Ok(command) => worker.handle(command),
                Err(TryRecvError::Empty) => break,
                // The transport is gone: the VM is being torn down.
                Err(TryRecvError::Disconnected) => return,
            }
        }
        if worker.stopped {
            return;
        }
        // The device's timer ran out, whether or not anything else woke the worker.
        if n == 0 || worker.device().backend_timeout() == Some(Duration::ZERO) {
            worker.backend_event();
        }
        for ev in &events[..n] {
            match ev.data() {
                CONTROL => {}
                BACKEND => worker.backend_event(),
                token => {
                    let index = (token - FIRST_QUEUE) as usize;
                    if let Some(evt) = queue_events.get(index) {
                        let _ = evt.read();
                        worker.queue_event(index);
                    }
                }
            }
        }
    }
}
