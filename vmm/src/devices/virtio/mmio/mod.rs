//! The virtio-MMIO transport, modern layout only (Version = 2, virtio spec 1.2 section 4.2.2).
//!
//! [`MmioTransport`] is the guest-visible register file of one virtio device: it negotiates
//! features, collects the queue configuration the driver writes, and hands validated queues to
//! the [`VirtioDevice`] when the driver sets DRIVER_OK. It knows nothing about device types.
//!
//! Every value here comes from the guest, so the transport trusts none of it: accesses of the
//! wrong size are ignored, status transitions out of order are refused, queue registers are
//! frozen once the device runs, and queues are checked against guest memory before any device
//! sees them.
//!
//! `tests.rs` covers the register protocol; `persist.rs` saves and restores a transport,
//! re-activating a running device on its saved queues.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{status, ActivateContext, ActivateError, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

mod persist;

pub use persist::{
    MmioRestoreError, MmioTransportRestoreArgs, MmioTransportState, QueueRegsState, VirtqueueState,
};

/// Size of the MMIO window of one device: registers below 0x100, config space above.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify. The device manager registers a KVM ioeventfd here per queue, with
/// the queue index as datamatch, so notifications normally never reach [`MmioTransport`].
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// "virt" in little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-MMIO layout.
const MMIO_VERSION: u32 = 2;
/// Vendor ID: the bytes "GROV" as the guest sees them in memory (little-endian), following
/// QEMU's 0x554d4551 ("QEMU"). Drivers only display it.
pub const VENDOR_ID: u32 = 0x564f_5247;

/// Register offsets (virtio spec 1.2, section 4.2.2).
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// The status bits the driver sets, in the only order the transport accepts them.
const INIT_SEQUENCE: [u32; 4] = [
    status::ACKNOWLEDGE,
    status::DRIVER,
    status::FEATURES_OK,
    status::DRIVER_OK,
];

/// Errors creating the transport or activating its device.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot create the interrupt eventfd")]
    Interrupt(#[source] io::Error),
    #[error("device type {0} does not offer VIRTIO_F_VERSION_1, required by virtio-MMIO v2")]
    NoVersion1(u32),
    #[error("device type {device_type} has {queues} queues but {events} queue eventfds")]
    QueueEvents {
        device_type: u32,
        queues: usize,
        events: usize,
    },
    #[error("queue {index}: maximum size {max_size} is not a power of two in 1..=32768")]
    QueueMaxSize { index: usize, max_size: u16 },
    #[error("queue {index}: the driver's configuration is invalid")]
    QueueConfig {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("queue {index}: size {size} is not a power of two within the maximum")]
    QueueSize { index: usize, size: u32 },
    #[error("queue {index}: rings lie outside guest memory")]
    QueueMemory { index: usize },
    #[error("the device refused activation")]
    Activate(#[source] ActivateError),
}

/// What the driver wrote for one queue. Kept raw and turned into a [`Queue`] only at
/// DRIVER_OK, so a rejected value (misaligned ring, bad size) fails activation instead of
/// silently leaving an older value in place.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Builds the queue; a queue the driver did not enable is handed over not ready.
    fn to_queue(self, index: usize, mem: &GuestMemoryMmap) -> Result<Queue, MmioError> {
        let config = |source| MmioError::QueueConfig { index, source };
        let mut queue = Queue::new(self.max_size).map_err(|_| MmioError::QueueMaxSize {
            index,
            max_size: self.max_size,
        })?;
        if !self.ready {
            return Ok(queue);
        }
        u16::try_from(self.size)
            .ok()
            .and_then(|size| queue.try_set_size(size).ok())
            .ok_or(MmioError::QueueSize {
                index,
                size: self.size,
            })?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(config)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(config)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(config)?;
        queue.set_ready(true);
        // Checked here first: virtio-queue's own check logs every failure at error level,
        // without a rate limit, and a guest can fail activation in a loop.
        if !rings_in_memory(&queue, mem) || !queue.is_valid(mem) {
            return Err(MmioError::QueueMemory { index });
        }
        Ok(queue)
    }
}

/// Whether the descriptor table, available ring and used ring of `queue` (at its configured
/// size) lie wholly inside guest memory: 16, 2 and 8 bytes per entry, after a 4-byte header
/// and with a 2-byte event field for the rings (virtio spec 1.2, section 2.7).
fn rings_in_memory(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    use vm_memory::{GuestMemory, Permissions};
    let size = usize::from(queue.size());
    let rings = [
        (queue.desc_table(), 16 * size, Permissions::Read),
        (queue.avail_ring(), 6 + 2 * size, Permissions::Read),
        (queue.used_ring(), 6 + 8 * size, Permissions::Write),
    ];
    rings
        .into_iter()
        .all(|(addr, len, access)| mem.check_range(GuestAddress(addr), len, access))
}

/// Builds queue 0 from register values exactly as activation does, for the fuzz targets,
/// whose queues must be the ones a driver can get past the transport.
#[cfg(feature = "fuzzing")]
pub(crate) fn queue_from_regs(
    max_size: u16,
    size: u32,
    desc: u64,
    driver: u64,
    device: u64,
    mem: &GuestMemoryMmap,
) -> Result<Queue, MmioError> {
    let regs = QueueRegs {
        max_size,
        size,
        ready: true,
        desc,
        driver,
        device,
    };
    regs.to_queue(0, mem)
}

/// Replaces the low or high 32 bits of `addr`.
fn set_half(addr: &mut u64, value: u32, high: bool) {
    *addr = if high {
        (*addr & 0xffff_ffff) | (u64::from(value) << 32)
    } else {
        (*addr & !0xffff_ffff) | u64::from(value)
    };
}

/// `e` and its causes, for a one-line log message.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    msg
}

/// One virtio device behind a virtio-MMIO register window.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<IrqTrigger>,
    /// Device status register (`status::*` bits).
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    /// ConfigGeneration: no device changes its configuration space behind the driver's back
    /// yet, so it stays 0; it is a field (and saved) so that a device that does cannot be
    /// restored with a stale value.
    config_generation: u32,
}

impl MmioTransport {
    /// Wraps `device`, whose queues will live in `mem`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let queues = {
            let dev = device.lock().unwrap_or_else(PoisonError::into_inner);
            let device_type = dev.device_type();
            if dev.avail_features() & VIRTIO_F_VERSION_1 == 0 {
                return Err(MmioError::NoVersion1(device_type));
            }
            let sizes = dev.queue_max_sizes();
            if sizes.len() != dev.queue_events().len() {
                return Err(MmioError::QueueEvents {
                    device_type,
                    queues: sizes.len(),
                    events: dev.queue_events().len(),
                });
            }
            for (index, &max_size) in sizes.iter().enumerate() {
                // The same checks Queue::new applies at activation, reported early.
                Queue::new(max_size).map_err(|_| MmioError::QueueMaxSize { index, max_size })?;
            }
            sizes.iter().map(|&m| QueueRegs::new(m)).collect()
        };
        let interrupt = Arc::new(IrqTrigger::new().map_err(MmioError::Interrupt)?);
        Ok(Self {
            mem,
            device,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
        })
    }

    /// The interrupt line: its eventfd is registered as a KVM irqfd for the device's GSI.
    pub fn interrupt(&self) -> &Arc<IrqTrigger> {
        &self.interrupt
    }

    /// The device behind the transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device status register as the driver sees it: what the driver wrote, plus
    /// DEVICE_NEEDS_RESET when activation failed or the device stopped trusting a ring.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn lock_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn has_status(&self, set: u32, clear: u32) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    /// The selected queue, if it exists and its registers may still be written: after
    /// FEATURES_OK, before DRIVER_OK (queues belong to the device once it runs).
    fn writable_queue(&mut self) -> Option<&mut QueueRegs> {
        if !self.has_status(status::FEATURES_OK, status::DRIVER_OK | status::FAILED) {
            debug!(
                "virtio-mmio: queue register write in status {:#x}",
                self.status
            );
            return None;
        }
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    fn selected_queue(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.lock_device().device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = self.lock_device().avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            // No shared memory regions: length and base of every region read as -1.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.writable_queue() {
                    q.size = value;
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.writable_queue() {
                    q.ready = value == 1;
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                if let Some(q) = self.writable_queue() {
                    set_half(&mut q.desc, value, offset == reg::QUEUE_DESC_HIGH);
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                if let Some(q) = self.writable_queue() {
                    set_half(&mut q.driver, value, offset == reg::QUEUE_DRIVER_HIGH);
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.writable_queue() {
                    set_half(&mut q.device, value, offset == reg::QUEUE_DEVICE_HIGH);
                }
            }
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            _ => debug!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }

    /// Accepts the selected 32-bit page of driver features, keeping only offered bits.
    fn write_driver_features(&mut self, value: u32) {
        if !self.has_status(status::DRIVER, status::FEATURES_OK | status::FAILED) {
            debug!(
                "virtio-mmio: DriverFeatures write in status {:#x}",
                self.status
            );
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            sel => {
                debug!("virtio-mmio: DriverFeatures write to page {sel}, no such features");
                return;
            }
        };
        let page = 0xffff_ffff_u64 << shift;
        let mut dev = self.lock_device();
        let acked = (dev.acked_features() & !page) | ((u64::from(value) << shift) & page);
        let offered = dev.avail_features();
        dev.set_acked_features(acked & offered);
    }

    /// QueueNotify fallback for when no ioeventfd caught the write: signal the queue's eventfd.
    fn notify(&self, value: u32) {
        let dev = self.lock_device();
        let evt = usize::try_from(value)
            .ok()
            .and_then(|i| dev.queue_events().get(i));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: cannot signal queue {value}: {e}");
                }
            }
            None => debug!("virtio-mmio: notification for unknown queue {value}"),
        }
    }

    /// The driver-status state machine (virtio spec 1.2, sections 2.1 and 3.1.1).
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & status::FAILED != 0 {
            // The driver gave up: keep everything as is, only record it.
            self.status |= status::FAILED;
            return;
        }
        // DEVICE_NEEDS_RESET belongs to the device: the driver can neither set nor clear it.
        let requested =
            (value & !status::DEVICE_NEEDS_RESET) | (self.status & status::DEVICE_NEEDS_RESET);
        let old = self.status;
        let init_bits = INIT_SEQUENCE.iter().fold(0, |acc, bit| acc | bit);
        let valid = requested & !init_bits == old & !init_bits
            && requested & old == old
            && INIT_SEQUENCE
                .iter()
                .scan(0, |acc, bit| {
                    *acc |= bit;
                    Some(*acc)
                })
                .any(|prefix| requested & init_bits == prefix);
        if !valid {
            debug!("virtio-mmio: refused status transition {old:#x} -> {value:#x}");
            return;
        }
        let added = requested & !old;
        let mut new = requested;
        if added & status::FEATURES_OK != 0
            && self.lock_device().acked_features() & VIRTIO_F_VERSION_1 == 0
        {
            self.interrupt.guest_warn(format_args!(
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1; FEATURES_OK refused"
            ));
            new &= !(status::FEATURES_OK | status::DRIVER_OK);
        }
        self.status = new;
        if new & added & status::DRIVER_OK != 0 {
            if let Err(e) = self.activate() {
                let device_type = self.lock_device().device_type();
                self.interrupt.guest_warn(format_args!(
                    "virtio-mmio: device type {device_type}: activation failed: {}; \
                     DEVICE_NEEDS_RESET until the driver resets it",
                    error_chain(&e)
                ));
                self.interrupt.set_needs_reset();
            }
        }
    }

    /// Builds and validates the queues and starts the device.
    fn activate(&mut self) -> Result<(), MmioError> {
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, regs)| regs.to_queue(index, &self.mem))
            .collect::<Result<Vec<_>, _>>()?;
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
        };
        self.lock_device()
            .activate(ctx)
            .map_err(MmioError::Activate)
    }

    /// Writing 0 to Status: the device, the queues and the interrupt status start over.
    fn reset(&mut self) {
        {
            let mut dev = self.lock_device();
            dev.reset();
            dev.set_acked_features(0);
        }
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.interrupt.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.lock_device().read_config(offset - reg::CONFIG, data);
            } else {
                debug!("virtio-mmio: {}-byte config read ignored", data.len());
                data.fill(0);
            }
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(bytes) if offset.is_multiple_of(4) => *bytes = self.read_reg(offset).to_le_bytes(),
            _ => {
                debug!(
                    "virtio-mmio: {}-byte read at {offset:#x} ignored",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.lock_device().write_config(offset - reg::CONFIG, data);
            } else {
                debug!("virtio-mmio: {}-byte config write ignored", data.len());
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_reg(offset, u32::from_le_bytes(bytes))
            }
            _ => debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests;
