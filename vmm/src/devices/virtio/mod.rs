//! Virtio devices behind the in-tree virtio-MMIO transport.
//!
//! The transport ([`mmio::MmioTransport`]) knows no device types: it speaks the virtio-MMIO
//! register protocol and hands queues to a [`VirtioDevice`] when the driver sets DRIVER_OK.
//! Each device owns one `EventFd` per queue; the device manager registers them as KVM
//! ioeventfds on the QueueNotify register, so a guest notification wakes the event loop
//! without a userspace exit. Devices process their queues on the event-loop thread.
//!
//! Every device lives in a folder of the same shape: `device.rs` (the `VirtioDevice` and
//! event-loop side), `handler.rs` or `io.rs` (request processing, testable without KVM),
//! `persist.rs` (its snapshot state). The transport saves what the driver negotiated and,
//! through [`VirtioDevice::queues`], where the device stands in each ring (`mmio/persist.rs`).

pub mod block;
pub mod device_state;
pub mod log_limit;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;

pub use block::{Block, BlockConfig, BlockError};
pub use mmio::{MmioError, MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY_OFFSET};
pub use net::{Net, NetError};
pub use rng::{Rng, RngError};
pub use vsock::{Vsock, VsockError};

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

/// Virtio device type ids (virtio spec 1.2, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bit: the device complies with virtio 1.0+ (required for the modern MMIO layout).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: the driver and device use the `used_event` / `avail_event` ring fields to
/// suppress notifications (virtio spec 1.2, section 2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Interrupt status bit: a used buffer was added to a queue.
pub const INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG: u32 = 0x2;

/// Device status bits (virtio spec 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// The device-to-driver signals of one virtio-MMIO device, shared by the transport (which
/// reads and acknowledges them) and the device (which raises them): the InterruptStatus
/// register, the eventfd registered with KVM as an irqfd for the device's GSI, the
/// DEVICE_NEEDS_RESET status bit the device sets when it stops trusting a ring, and the rate
/// limit on log lines the guest causes (see docs/hostile-guests.md).
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
    needs_reset: AtomicBool,
    log_limit: Mutex<log_limit::LogLimiter>,
}

impl IrqTrigger {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            needs_reset: AtomicBool::new(false),
            log_limit: Mutex::new(log_limit::LogLimiter::default()),
        })
    }

    /// The device stopped trusting the driver's rings: DEVICE_NEEDS_RESET reads as set in
    /// the Status register until the driver resets the device, and the driver gets a
    /// configuration-change interrupt (virtio spec 1.2, section 2.1.2).
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        if let Err(e) = self.trigger(INT_CONFIG) {
            log::warn!("virtio: cannot inject the config interrupt: {e}");
        }
    }

    /// Whether the device asked the driver for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Logs a warning the guest caused, at most [`log_limit::MAX_LINES_PER_WINDOW`] per
    /// [`log_limit::WINDOW`] for this device; a line after dropped ones says how many.
    pub fn guest_warn(&self, args: std::fmt::Arguments<'_>) {
        let decision = self
            .log_limit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check(Instant::now());
        if let log_limit::LogDecision::Log { suppressed } = decision {
            if suppressed > 0 {
                log::warn!(
                    "virtio: {suppressed} more messages about this device's guest driver were suppressed"
                );
            }
            log::warn!("{args}");
        }
    }

    /// The eventfd to register as a KVM irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Sets `bits` (INT_VRING / INT_CONFIG) in InterruptStatus and injects the interrupt.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears all status bits and DEVICE_NEEDS_RESET (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Puts back a saved InterruptStatus without injecting anything: whether the guest still
    /// has to see the interrupt is part of the interrupt controller's saved state, not ours.
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    /// One queue per entry of `queue_max_sizes()`, configured and validated by the transport.
    pub queues: Vec<Queue>,
    pub interrupt: Arc<IrqTrigger>,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot signal the event loop")]
    Signal(#[source] std::io::Error),
    #[error("device is already active")]
    AlreadyActive,
}

/// The [`VirtioDevice`] methods that every device answers from its
/// [`device_state::DeviceState`] field `state`: queue sizes and eventfds, features, and the
/// activated queues. Used inside `impl VirtioDevice for ...`.
macro_rules! delegate_to_device_state {
    () => {
        fn queue_max_sizes(&self) -> &[u16] {
            self.state.queue_max_sizes()
        }

        fn queue_events(&self) -> &[vmm_sys_util::eventfd::EventFd] {
            self.state.queue_events()
        }

        fn avail_features(&self) -> u64 {
            self.state.avail_features()
        }

        fn acked_features(&self) -> u64 {
            self.state.acked_features()
        }

        fn set_acked_features(&mut self, features: u64) {
            self.state.set_acked_features(features);
        }

        fn is_activated(&self) -> bool {
            self.state.is_activated()
        }

        fn queues(&self) -> &[virtio_queue::Queue] {
            self.state.queues()
        }
    };
}
pub(crate) use delegate_to_device_state;

/// A virtio device type (block, rng, ...), independent of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device type id (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// Features offered to the driver (always including `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of `avail_features`).
    fn acked_features(&self) -> u64;
    /// Records the driver's accepted features; the transport has already masked them.
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; ignored where read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with its queues. Called on the vCPU thread that wrote DRIVER_OK:
    /// must not block; heavy work belongs on the event loop.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Whether `activate` succeeded and no reset happened since.
    fn is_activated(&self) -> bool;
    /// The queues the device runs on since activation (empty when not activated). Snapshots
    /// save their positions (`next_avail`, `next_used`) through this, so a restored device
    /// resumes the rings exactly where it stopped.
    fn queues(&self) -> &[Queue];
    /// Joins the VM's pause gate (see [`device_state::PauseGate`]).
    fn set_pause_gate(&mut self, gate: device_state::PauseGate);
    /// Returns to the pre-activation state (the driver wrote 0 to Status).
    fn reset(&mut self);
}
