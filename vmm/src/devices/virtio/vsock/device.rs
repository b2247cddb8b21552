//! The virtio-vsock device: features, configuration space (the guest CID), and the event-loop
//! side: queue notifications, the host sockets, a timer for connection deadlines, and the
//! transport-reset event a restored device owes its driver.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::handler::Handler;
use super::proto::EVENT_TRANSPORT_RESET;
use super::unix::Listener;
use super::{EVENT_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::config::{ConfigError, VsockConfig};
use crate::devices::virtio::device_state::{
    read_config_bytes, stop_queue, Activated, DeviceState, PauseGate, Wakeup, MAX_CHAINS_PER_WAKEUP,
};
use crate::devices::virtio::{
    ActivateContext, ActivateError, VirtioDevice, INT_VRING, TYPE_VSOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::vstate::memory::MemWriter;

/// How often running deadlines are checked (they are [`super::CONNECT_TIMEOUT`] long).
const DEADLINE_TICK: Duration = Duration::from_millis(250);

/// What the device offers: virtio 1.0 and event index. Not SEQPACKET (stream sockets only).
pub(super) const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

/// Errors building a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("invalid vsock configuration")]
    Config(#[source] ConfigError),
    #[error("vsock socket {} is in use by another process (a clone needs its own path)", .0.display())]
    InUse(PathBuf),
    #[error("{} exists and is not a socket; refusing to replace it with the vsock socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot create the vsock socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the device eventfds")]
    EventFd(#[source] io::Error),
    #[error("cannot create the vsock timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

/// A virtio-vsock device whose host side is a Unix socket, served on the event-loop thread.
pub struct Vsock {
    state: DeviceState,
    guest_cid: u32,
    handler: Handler,
    /// The VM's pause gate (the device state holds it too): sockets are not served while it
    /// is closed.
    gate: PauseGate,
    timer: TimerFd,
    timer_armed: bool,
    /// The driver must hear VIRTIO_VSOCK_EVENT_TRANSPORT_RESET once the VM runs (restore).
    reset_event_pending: bool,
}

impl Vsock {
    /// A device for `config`, listening on its socket at once (so a bad path fails the start,
    /// not the guest's first connection).
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        config.validate().map_err(VsockError::Config)?;
        let listener = Listener::bind(&config.uds_path)?;
        let gate = PauseGate::default();
        gate.set_closed(false);
        let mut state =
            DeviceState::new(AVAIL_FEATURES, &[QUEUE_SIZE; 3]).map_err(VsockError::EventFd)?;
        state.set_pause_gate(gate.clone());
        Ok(Self {
            state,
            guest_cid: config.guest_cid,
            handler: Handler::new(config.guest_cid, listener),
            gate,
            timer: TimerFd::new().map_err(VsockError::Timer)?,
            timer_armed: false,
            reset_event_pending: false,
        })
    }

    pub fn guest_cid(&self) -> u32 {
        self.guest_cid
    }

    /// The socket host clients connect to.
    pub fn uds_path(&self) -> &Path {
        self.handler.uds_path()
    }

    /// Connections open now.
    pub fn connection_count(&self) -> usize {
        self.handler.connection_count()
    }

    /// The figures of the host-initiated connection whose `OK` line named `host_port`, open
    /// or among the last [`super::CLOSED_KEPT`] closed (`docs/vsock.md`).
    pub fn connection_stats(&self, host_port: u32) -> Option<super::ConnectionStats> {
        self.handler.connection_stats(host_port)
    }

    /// The eventfd the event loop watches for activation and reset.
    pub fn activate_event(&self) -> &EventFd {
        self.state.activate_event()
    }

    /// Owe the driver a transport-reset event (set by a restore: the guest's connections
    /// ended with the VM it was saved from).
    pub(super) fn set_reset_event_pending(&mut self) {
        self.reset_event_pending = true;
    }

    /// Closes what missed its deadline as of `now`; see [`Handler::expire`].
    #[cfg(test)]
    pub(super) fn expire(&mut self, now: Instant) {
        self.handler.expire(now);
    }

    fn live(&self) -> bool {
        self.state.is_activated() && !self.gate.is_closed()
    }

    /// Serves the queues and whatever the sockets made owed, then updates the watch list.
    fn run_queues(&mut self, tx: bool, ops: &mut EventOps) {
        if self.live() {
            self.send_reset_event();
            if tx {
                let handler = &mut self.handler;
                self.state.process_queue(TX_QUEUE, |mem, chain| {
                    handler.handle_tx(mem, chain);
                    0
                });
            }
            self.fill_rx();
        }
        if !self.state.is_activated() {
            // A reset driver has forgotten every connection.
            self.handler.reset();
            self.reset_event_pending = false;
        }
        let live = self.live();
        self.handler.sync(ops, live);
        if !self.timer_armed && self.handler.has_deadlines() {
            match self.timer.reset(DEADLINE_TICK, Some(DEADLINE_TICK)) {
                Ok(()) => self.timer_armed = true,
                Err(e) => warn!("vsock: cannot arm the deadline timer: {e}"),
            }
        }
    }

    /// Moves owed packets into the guest's receive buffers, taking a buffer only for a packet.
    fn fill_rx(&mut self) {
        if !self.handler.has_rx() {
            return;
        }
        if let Some(active) = self.state.active_mut() {
            if fill_rx_queue(active, &mut self.handler) {
                // Budget spent: more on the next turn of the loop, after the other devices.
                if let Err(e) = self.state.queue_events()[RX_QUEUE].write(1) {
                    warn!("vsock: cannot re-signal the receive queue: {e}");
                }
            }
        }
    }

    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET into one event buffer, once, if owed: the driver
    /// then resets its connected sockets (listeners stay) and re-reads the CID. A buffer that
    /// cannot take the event (outside guest memory, read-only, too small) comes back with
    /// used length 0 and the event waits for the next one, as receive packets do.
    fn send_reset_event(&mut self) {
        if !self.reset_event_pending {
            return;
        }
        let Some(Activated {
            mem,
            queues,
            interrupt,
        }) = self.state.active_mut()
        else {
            return;
        };
        let Some(queue) = queues.get_mut(EVENT_QUEUE).filter(|q| q.ready()) else {
            return;
        };
        let mem = &*mem;
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let mut used = false;
        let mut resignal = false;
        // At most one queue's worth of buffers per wake-up.
        for _ in 0..queue.size() {
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    stop_queue(
                        queue,
                        interrupt,
                        format_args!("vsock: unusable event ring ({e})"),
                    );
                    return;
                }
            };
            let Some(chain) = chain else {
                // No buffer yet: ask for the driver's notification when it adds one (a
                // buffer added meanwhile is served by the kick of the next wake-up).
                resignal = matches!(queue.enable_notification(mem), Ok(true));
                break;
            };
            let head = chain.head_index();
            let writer: Result<MemWriter<'_>, _> = chain.writer(mem);
            let len = match writer {
                Ok(mut w) if w.available_bytes() >= event.len() => match w.write_all(&event) {
                    Ok(()) => event.len() as u32,
                    Err(e) => {
                        debug!("vsock: cannot write the event: {e}");
                        0
                    }
                },
                Ok(_) => {
                    debug!("vsock: event buffer {head} too small");
                    0
                }
                Err(e) => {
                    debug!("vsock: event buffer {head} outside guest memory: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                debug!("vsock: cannot return event buffer {head}: {e}");
                break;
            }
            used = true;
            if len != 0 {
                self.reset_event_pending = false;
                break;
            }
        }
        if used && queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = interrupt.trigger(INT_VRING) {
                warn!("vsock: cannot inject the interrupt: {e}");
            }
        }
        if resignal {
            if let Err(e) = self.state.queue_events()[EVENT_QUEUE].write(1) {
                warn!("vsock: cannot re-signal the event queue: {e}");
            }
        }
    }

    /// Whether the periodic deadline timer runs (tests).
    #[cfg(test)]
    pub(crate) fn timer_armed(&self) -> bool {
        self.timer_armed
    }

    fn on_timer(&mut self) {
        // Readable: the periodic timer expired (only this handler disarms it, after reading).
        let _ = self.timer.wait();
        if self.live() {
            self.handler.expire(Instant::now());
        }
        if !self.handler.has_deadlines() {
            match self.timer.clear() {
                Ok(()) => self.timer_armed = false,
                Err(e) => warn!("vsock: cannot disarm the deadline timer: {e}"),
            }
        }
    }
}

/// Fills receive buffers while packets are owed; returns whether the budget ran out first.
fn fill_rx_queue(active: &mut Activated, handler: &mut Handler) -> bool {
    let Activated {
        mem,
        queues,
        interrupt,
    } = active;
    let Some(queue) = queues.get_mut(RX_QUEUE).filter(|q| q.ready()) else {
        return false;
    };
    let mem = &*mem;
    let mut used = false;
    let mut budget = MAX_CHAINS_PER_WAKEUP;
    let mut exhausted = false;
    while handler.has_rx() {
        if budget == 0 {
            exhausted = true;
            break;
        }
        budget -= 1;
        let chain = match queue.iter(mem) {
            Ok(mut iter) => iter.next(),
            Err(e) => {
                stop_queue(
                    queue,
                    interrupt,
                    format_args!("vsock: unusable receive ring ({e})"),
                );
                break;
            }
        };
        let Some(chain) = chain else {
            // Out of buffers: the driver notifies the queue when it adds some (re-check for
            // one added meanwhile).
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                _ => break,
            }
        };
        let head = chain.head_index();
        match handler.fill_rx(mem, chain) {
            Some(len) => match queue.add_used(mem, head, len) {
                Ok(()) => used = true,
                Err(e) => debug!("vsock: cannot return receive buffer {head}: {e}"),
            },
            None => {
                queue.go_to_previous_position();
                break;
            }
        }
    }
    if used && queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = interrupt.trigger(INT_VRING) {
            warn!("vsock: cannot inject the interrupt: {e}");
        }
    }
    exhausted
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    crate::devices::virtio::delegate_to_device_state!();

    /// `struct virtio_vsock_config { le64 guest_cid; }`.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&u64::from(self.guest_cid).to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-vsock: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.state.activate(ctx)
    }

    fn set_pause_gate(&mut self, gate: PauseGate) {
        self.gate = gate.clone();
        self.state.set_pause_gate(gate);
    }

    fn reset(&mut self) {
        // Runs on a vCPU thread: the sockets are closed by the event loop when it sees the
        // reset (they must leave its watch list first).
        self.state.reset();
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.init(ops);
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            warn!("vsock: cannot watch the deadline timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let live = self.live();
        let mut tx = false;
        if fd == self.timer.as_raw_fd() {
            self.on_timer();
        } else if fd == self.handler.listener_fd() {
            if live {
                self.handler.accept();
            }
        } else if self.handler.owns(fd) {
            if live {
                self.handler.handle_socket(fd, events.event_set());
            }
        } else {
            match self.state.handle_event(&events, ops) {
                Wakeup::Nothing => {}
                Wakeup::AllQueues => tx = true,
                Wakeup::Queue(q) => tx = q == TX_QUEUE,
            }
        }
        self.run_queues(tx, ops);
    }
}
