//! The virtio-net device: the TAP, features, configuration space (the MAC) and event-loop
//! wiring.

use std::io;
use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};
use virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_MAC;
use vmm_sys_util::eventfd::EventFd;

use super::handler::{NetStats, Rx, RxStop, Tx};
use super::tap::{Tap, TapError};
use super::{MacAddr, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::device_state::{
    read_config_bytes, DeviceState, PauseGate, Wakeup, MAX_CHAINS_PER_WAKEUP,
};
use crate::devices::virtio::{
    ActivateContext, ActivateError, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// How to build a network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDeviceConfig {
    /// The TAP to attach to (created if it does not exist) in the VMM's network namespace.
    pub tap: String,
    /// The guest's MAC address (configuration space).
    pub mac: MacAddr,
    /// The device's name in snapshots and `--net-override` (`net0`, ...).
    pub id: String,
}

/// Errors building a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create the device eventfds")]
    EventFd(#[source] io::Error),
}

/// A virtio-net device on a TAP, served on the event-loop thread.
pub struct Net {
    state: DeviceState,
    tap: Tap,
    mac: MacAddr,
    id: String,
    rx: Rx,
    tx: Tx,
    stats: NetStats,
    /// The VM's pause gate (the same one `state` holds): no frame moves while it is closed.
    gate: PauseGate,
}

impl Net {
    /// Attaches to the TAP `config.tap` in this thread's network namespace.
    pub fn new(config: NetDeviceConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap)?;
        let features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | (1 << VIRTIO_NET_F_MAC);
        let state =
            DeviceState::new(features, &[QUEUE_SIZE, QUEUE_SIZE]).map_err(NetError::EventFd)?;
        Ok(Self {
            state,
            tap,
            mac: config.mac,
            id: config.id,
            rx: Rx::new(),
            tx: Tx::new(),
            stats: NetStats::default(),
            // Open, like DeviceState's own, until the device manager hands the VM's over.
            gate: {
                let gate = PauseGate::default();
                gate.set_closed(false);
                gate
            },
        })
    }

    /// The TAP's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Frame counters since the device was created.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The eventfd the event loop watches for activation and reset.
    pub fn activate_event(&self) -> &EventFd {
        self.state.activate_event()
    }

    /// Moves waiting frames from the TAP into guest buffers. With the budget spent, the
    /// receive queue's own eventfd brings the event loop back (the TAP is edge-triggered:
    /// frames already waiting raise no new event).
    fn process_rx(&mut self) {
        if self.gate.is_closed() {
            return;
        }
        let Self {
            state,
            tap,
            rx,
            stats,
            ..
        } = self;
        let stop = state.with_queue(RX_QUEUE, |mem, queue, irq| {
            rx.process(mem, queue, irq, tap, stats, MAX_CHAINS_PER_WAKEUP)
        });
        if stop == Some(RxStop::Budget) {
            if let Some(kick) = self.state.queue_events().get(RX_QUEUE) {
                if let Err(e) = kick.write(1) {
                    warn!("virtio-net: cannot re-signal the receive queue: {e}");
                }
            }
        }
    }

    /// Sends what the guest posted on the transmit queue.
    fn process_tx(&mut self) {
        let Self {
            state,
            tap,
            tx,
            stats,
            ..
        } = self;
        state.process_queue(TX_QUEUE, |mem, chain| tx.send_chain(mem, chain, tap, stats));
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    crate::devices::virtio::delegate_to_device_state!();

    /// `struct virtio_net_config`: only `mac` (bytes 0-5) is offered; the rest reads as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac.0, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // A VERSION_1 driver never writes the network configuration space.
        debug!(
            "virtio-net: ignored {}-byte config write at {offset:#x}",
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
        self.state.reset();
        // A frame kept for the old queues belongs to the driver that just went away.
        self.rx = Rx::new();
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.init(ops);
        let events = Events::new(&self.tap, EventSet::IN | EventSet::EDGE_TRIGGERED);
        if let Err(e) = ops.add(events) {
            warn!("virtio-net: cannot watch TAP {}: {e}", self.tap.name());
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.tap.as_raw_fd() {
            if events
                .event_set()
                .intersects(EventSet::ERROR | EventSet::HANG_UP)
            {
                warn!("virtio-net: TAP {} reports an error", self.tap.name());
            }
            if self.state.is_activated() {
                self.process_rx();
            }
            return;
        }
        match self.state.handle_event(&events, ops) {
            Wakeup::Nothing => {}
            Wakeup::AllQueues => {
                self.process_rx();
                self.process_tx();
            }
            Wakeup::Queue(RX_QUEUE) => self.process_rx(),
            Wakeup::Queue(TX_QUEUE) => self.process_tx(),
            Wakeup::Queue(_) => {}
        }
    }
}
