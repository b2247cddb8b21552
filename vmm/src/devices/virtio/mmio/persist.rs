//! Saving and restoring a virtio-MMIO transport, including the queues of a running device.
//!
//! A transport is saved with everything the driver wrote (status, selectors, raw queue
//! registers) and, when the device runs, each queue as the device has advanced it
//! (`next_avail`, `next_used`). Restoring an activated transport activates the (already
//! restored) device again with queues rebuilt from those positions, without the driver's
//! involvement: the guest continues mid-I/O and never learns it was snapshotted. The
//! device's activation eventfd then makes the event loop register its queues and serve
//! whatever the guest posted meanwhile, exactly as after a DRIVER_OK.
//!
//! The state comes from a file, so every value is checked against the device it is restored
//! onto and against guest memory before any of it is used.

use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{MmioError, MmioTransport, QueueRegs, INIT_SEQUENCE};
use crate::devices::virtio::{
    status, ActivateContext, ActivateError, VirtioDevice, INT_CONFIG, INT_VRING,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::snapshot::Persist;
use crate::vstate::memory::GuestMemoryMmap;

/// The raw queue registers the driver wrote (QueueNum, QueueReady, the three ring addresses).
/// Kept raw, like in the transport: before DRIVER_OK they are unvalidated guest input and are
/// checked only when the driver sets DRIVER_OK.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueRegsState {
    pub size: u32,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// A running queue: virtio-queue's `QueueState`, which has no serde support of its own.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VirtqueueState {
    pub max_size: u16,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    /// False also for a queue the device disabled because the driver corrupted its ring.
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for VirtqueueState {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&VirtqueueState> for QueueState {
    fn from(q: &VirtqueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The saved state of one virtio-MMIO transport.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MmioTransportState {
    /// The virtio device type behind the transport; a restore onto another type is refused.
    pub device_type: u32,
    /// Device status register (`status::*` bits).
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    /// One entry per device queue.
    pub queues: Vec<QueueRegsState>,
    /// InterruptStatus (`INT_VRING` / `INT_CONFIG`) not yet acknowledged by the driver.
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// The queues of the running device, one per device queue; `None` when the device was
    /// not activated. The acked features are saved with the device, which owns them.
    pub active_queues: Option<Vec<VirtqueueState>>,
}

/// What restoring a transport needs besides its state.
pub struct MmioTransportRestoreArgs {
    /// Guest memory, already restored: queues are validated against it.
    pub mem: GuestMemoryMmap,
    /// The device behind the transport, already restored and not activated.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
}

/// Why a saved transport cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError {
    #[error("saved transport served device type {saved}, but the device is of type {actual}")]
    DeviceType { saved: u32, actual: u32 },
    #[error("saved transport has {saved} queues, but the device has {actual}")]
    QueueCount { saved: usize, actual: usize },
    #[error("the device is already activated; a restore needs a fresh device")]
    DeviceActive,
    #[error("saved device status {0:#x} is not a state the transport can reach")]
    Status(u32),
    #[error(
        "saved device status {status:#x} and the saved activation state disagree \
         (a running device needs DRIVER_OK without DEVICE_NEEDS_RESET)"
    )]
    Activation { status: u32 },
    #[error(
        "saved device status {0:#x} has FEATURES_OK, but the device did not ack VIRTIO_F_VERSION_1"
    )]
    NoVersion1(u32),
    #[error("saved interrupt status {0:#x} has bits other than VRING and CONFIG")]
    InterruptStatus(u32),
    #[error("queue {index}: saved maximum size {saved} differs from the device's {actual}")]
    QueueMaxSize {
        index: usize,
        saved: u16,
        actual: u16,
    },
    #[error("queue {index}: saved queue is invalid")]
    QueueState {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {index}: saved rings lie outside guest memory")]
    QueueMemory { index: usize },
    #[error("queue {index}: saved event-index setting contradicts the device's acked features")]
    QueueEventIdx { index: usize },
    #[error("queue {index}: the running queue differs from the queue registers the driver wrote")]
    QueueRegs { index: usize },
    #[error("cannot create the transport")]
    Transport(#[source] MmioError),
    #[error("the device refused re-activation")]
    Activate(#[source] ActivateError),
}

impl From<&QueueRegs> for QueueRegsState {
    fn from(q: &QueueRegs) -> Self {
        Self {
            size: q.size,
            ready: q.ready,
            desc: q.desc,
            driver: q.driver,
            device: q.device,
        }
    }
}

/// Whether `value` is a status the transport's state machine can reach: a prefix of the
/// init sequence, DEVICE_NEEDS_RESET only after DRIVER_OK (a failed activation), FAILED
/// anywhere, and no other bit.
fn is_reachable_status(value: u32) -> bool {
    let init_bits = INIT_SEQUENCE.iter().fold(0, |acc, bit| acc | bit);
    let known = init_bits | status::DEVICE_NEEDS_RESET | status::FAILED;
    let prefix_ok = std::iter::once(0)
        .chain(INIT_SEQUENCE.iter().scan(0, |acc, bit| {
            *acc |= bit;
            Some(*acc)
        }))
        .any(|prefix| value & init_bits == prefix);
    let needs_reset_ok = value & status::DEVICE_NEEDS_RESET == 0 || value & status::DRIVER_OK != 0;
    value & !known == 0 && prefix_ok && needs_reset_ok
}

/// Rebuilds queue `index` of a running device from its saved state, checking it against the
/// device, the device's features, the driver's registers and guest memory.
fn restore_queue(
    index: usize,
    saved: &VirtqueueState,
    regs: &QueueRegsState,
    max_size: u16,
    event_idx: bool,
    mem: &GuestMemoryMmap,
) -> Result<Queue, MmioRestoreError> {
    if saved.max_size != max_size {
        return Err(MmioRestoreError::QueueMaxSize {
            index,
            saved: saved.max_size,
            actual: max_size,
        });
    }
    // The device applies the negotiated event-index setting to every queue at activation.
    if saved.event_idx_enabled != event_idx {
        return Err(MmioRestoreError::QueueEventIdx { index });
    }
    let queue = Queue::try_from(QueueState::from(saved))
        .map_err(|source| MmioRestoreError::QueueState { index, source })?;
    if !saved.ready {
        // Never configured by the driver, or disabled by the device: rings are never read.
        return Ok(queue);
    }
    // A running queue can only come from the registers the driver wrote before DRIVER_OK.
    let same = regs.ready
        && regs.size == u32::from(saved.size)
        && regs.desc == saved.desc_table
        && regs.driver == saved.avail_ring
        && regs.device == saved.used_ring;
    if !same {
        return Err(MmioRestoreError::QueueRegs { index });
    }
    if !queue.is_valid(mem) {
        return Err(MmioRestoreError::QueueMemory { index });
    }
    Ok(queue)
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type RestoreArgs = MmioTransportRestoreArgs;
    type Error = MmioRestoreError;

    fn save(&self) -> MmioTransportState {
        let dev = self.lock_device();
        let active_queues = dev
            .is_activated()
            .then(|| dev.queues().iter().map(|q| q.state().into()).collect());
        MmioTransportState {
            device_type: dev.device_type(),
            status: self.status(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(QueueRegsState::from).collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            active_queues,
        }
    }

    fn restore(
        args: MmioTransportRestoreArgs,
        state: &MmioTransportState,
    ) -> Result<Self, MmioRestoreError> {
        let MmioTransportRestoreArgs { mem, device } = args;
        let queues = {
            let dev = device.lock().unwrap_or_else(PoisonError::into_inner);
            validate(state, &*dev, &mem)?
        };
        let mut transport = MmioTransport::new(mem, device).map_err(MmioRestoreError::Transport)?;
        transport.status = state.status;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.queue_sel = state.queue_sel;
        transport.config_generation = state.config_generation;
        for (regs, saved) in transport.queues.iter_mut().zip(&state.queues) {
            regs.size = saved.size;
            regs.ready = saved.ready;
            regs.desc = saved.desc;
            regs.driver = saved.driver;
            regs.device = saved.device;
        }
        transport.interrupt.restore_status(state.interrupt_status);
        if let Some(queues) = queues {
            let ctx = ActivateContext {
                mem: transport.mem.clone(),
                queues,
                interrupt: transport.interrupt.clone(),
            };
            transport
                .lock_device()
                .activate(ctx)
                .map_err(MmioRestoreError::Activate)?;
        }
        Ok(transport)
    }
}

impl MmioTransport {
    /// Injects the device's interrupt again if InterruptStatus has bits the driver has not
    /// acknowledged. A restore calls this once the interrupt controllers are restored: an
    /// interrupt raised just before the snapshot may not have reached the saved controller
    /// state, and a driver never told of a completion waits forever, while a spurious
    /// interrupt costs the driver one status read.
    pub fn reassert_interrupt(&self) -> std::io::Result<()> {
        if self.interrupt.status() != 0 {
            self.interrupt.eventfd().write(1)?;
        }
        Ok(())
    }
}

/// Checks `state` against `dev` and guest memory; returns the queues to activate the device
/// with, if it was running.
fn validate(
    state: &MmioTransportState,
    dev: &dyn VirtioDevice,
    mem: &GuestMemoryMmap,
) -> Result<Option<Vec<Queue>>, MmioRestoreError> {
    if state.device_type != dev.device_type() {
        return Err(MmioRestoreError::DeviceType {
            saved: state.device_type,
            actual: dev.device_type(),
        });
    }
    let max_sizes = dev.queue_max_sizes();
    if state.queues.len() != max_sizes.len() {
        return Err(MmioRestoreError::QueueCount {
            saved: state.queues.len(),
            actual: max_sizes.len(),
        });
    }
    if dev.is_activated() {
        return Err(MmioRestoreError::DeviceActive);
    }
    if !is_reachable_status(state.status) {
        return Err(MmioRestoreError::Status(state.status));
    }
    if state.status & status::FEATURES_OK != 0 && dev.acked_features() & VIRTIO_F_VERSION_1 == 0 {
        return Err(MmioRestoreError::NoVersion1(state.status));
    }
    if state.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
        return Err(MmioRestoreError::InterruptStatus(state.interrupt_status));
    }
    let driver_ok = state.status & status::DRIVER_OK != 0;
    let needs_reset = state.status & status::DEVICE_NEEDS_RESET != 0;
    let consistent = match &state.active_queues {
        // Never activated, or activation failed (DEVICE_NEEDS_RESET).
        None => !driver_ok || needs_reset,
        // Running; or stopped because it no longer trusts a ring, which it then disabled
        // (docs/hostile-guests.md).
        Some(active) => driver_ok && (!needs_reset || active.iter().any(|q| !q.ready)),
    };
    if !consistent {
        return Err(MmioRestoreError::Activation {
            status: state.status,
        });
    }
    let Some(active) = &state.active_queues else {
        return Ok(None);
    };
    if active.len() != max_sizes.len() {
        return Err(MmioRestoreError::QueueCount {
            saved: active.len(),
            actual: max_sizes.len(),
        });
    }
    let event_idx = dev.acked_features() & VIRTIO_RING_F_EVENT_IDX != 0;
    active
        .iter()
        .zip(&state.queues)
        .zip(max_sizes)
        .enumerate()
        .map(|(index, ((saved, regs), &max_size))| {
            restore_queue(index, saved, regs, max_size, event_idx, mem)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
#[path = "persist_tests.rs"]
mod tests;
