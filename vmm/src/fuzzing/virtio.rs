//! Virtio targets: a guest driver script against the queue walk, the block request parser and
//! the MMIO register file.
//!
//! A script (see [`Script`]) configures queues the way the MMIO transport builds them at
//! DRIVER_OK, then pokes guest memory and notifies queues in any order, so descriptor tables,
//! rings and indices can be anything a hostile driver writes, also between two notifications.

use std::fs::File;
use std::sync::{Arc, Mutex};

use arbitrary::Unstructured;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::bus::BusDevice;
use crate::devices::virtio::block::handler::Disk;
use crate::devices::virtio::device_state::{Chain, DeviceState};
use crate::devices::virtio::mmio::{queue_from_regs, MmioTransport};
use crate::devices::virtio::rng::handler::EntropySource;
use crate::devices::virtio::{
    ActivateContext, IrqTrigger, Rng, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::disk::{DiskFormat, OpenOptions};
use crate::vstate::memory::{self, GuestMemoryMmap};

/// Guest RAM of every virtio target: small, so that addresses from the input often land in
/// it and often just outside.
pub(crate) const MEM_SIZE: u64 = 0x1_0000;
/// Largest queue the targets offer (the size of the block and vsock queues).
const MAX_QUEUE_SIZE: u16 = 256;

pub(crate) fn guest_memory() -> Option<GuestMemoryMmap> {
    memory::create_anonymous(MEM_SIZE).ok()
}

/// What one step of a driver script does.
pub(crate) enum Step {
    /// Guest memory was written (descriptors, rings, buffers).
    Poked,
    /// The driver notified queue `n` (taken modulo the number of queues by the caller).
    Notify(usize),
    /// Target-specific event `n` (the vsock target: host socket activity).
    Other(u8),
}

/// Reads a driver script from the fuzzer input.
pub(crate) struct Script<'a> {
    pub u: Unstructured<'a>,
}

impl<'a> Script<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self {
            u: Unstructured::new(data),
        }
    }

    /// One queue as the transport hands it over at DRIVER_OK (the same validation): `None`
    /// when the transport would refuse the configuration, or the input ran out.
    pub fn queue(&mut self, mem: &GuestMemoryMmap) -> Option<Queue> {
        // Sizes are powers of two up to twice the maximum: the rest only fails the same check.
        let size = 1u32 << (self.u.arbitrary::<u8>().ok()? % 10);
        let desc = u64::from(self.u.arbitrary::<u16>().ok()?);
        let avail = u64::from(self.u.arbitrary::<u16>().ok()?);
        let used = u64::from(self.u.arbitrary::<u16>().ok()?);
        queue_from_regs(MAX_QUEUE_SIZE, size, desc, avail, used, mem).ok()
    }

    /// `n` queues and an interrupt line, as the device receives them.
    pub fn activate(&mut self, mem: &GuestMemoryMmap, n: usize) -> Option<ActivateContext> {
        let queues = (0..n)
            .map(|_| self.queue(mem))
            .collect::<Option<Vec<_>>>()?;
        Some(ActivateContext {
            mem: mem.clone(),
            queues,
            interrupt: Arc::new(IrqTrigger::new().ok()?),
        })
    }

    /// Whether the driver negotiated VIRTIO_RING_F_EVENT_IDX.
    pub fn features(&mut self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1;
        if self.u.arbitrary::<bool>().unwrap_or(false) {
            features |= VIRTIO_RING_F_EVENT_IDX;
        }
        features
    }

    /// The next step, or `None` at the end of the input.
    pub fn step(&mut self, mem: &GuestMemoryMmap) -> Option<Step> {
        if self.u.is_empty() {
            return None;
        }
        let step = match self.u.arbitrary::<u8>().ok()? % 4 {
            0 => {
                // A run of bytes anywhere, including across the end of RAM.
                let addr = u64::from(self.u.arbitrary::<u16>().ok()?);
                let len = usize::from(self.u.arbitrary::<u8>().ok()?).min(self.u.len());
                let bytes = self.u.bytes(len).ok()?;
                let _ = mem.write_slice(bytes, GuestAddress(addr));
                Step::Poked
            }
            1 => {
                // One 16-bit field: a ring index or a descriptor's flags or next.
                let addr = u64::from(self.u.arbitrary::<u16>().ok()?);
                let value = self.u.arbitrary::<u16>().ok()?;
                let _ = mem.write_obj(value, GuestAddress(addr));
                Step::Poked
            }
            2 => Step::Notify(usize::from(self.u.arbitrary::<u8>().ok()?)),
            _ => Step::Other(self.u.arbitrary::<u8>().ok()?),
        };
        Some(step)
    }
}

/// Runs a script against one single-queue device whose chains `handle` serves: the drain loop
/// of [`DeviceState::process_queue`] (budget, notification suppression, used ring). Every
/// script ends with a final notification.
fn run_single_queue<F>(data: &[u8], mut handle: F)
where
    F: FnMut(&GuestMemoryMmap, Chain<'_>) -> u32,
{
    let Some(mem) = guest_memory() else { return };
    let mut script = Script::new(data);
    let features = script.features();
    let Ok(mut state) = DeviceState::new(features, &[MAX_QUEUE_SIZE]) else {
        return;
    };
    state.set_acked_features(features);
    let Some(ctx) = script.activate(&mem, 1) else {
        return;
    };
    if state.activate(ctx).is_err() {
        return;
    }
    while let Some(step) = script.step(&mem) {
        if let Step::Notify(_) = step {
            state.process_queue(0, &mut handle);
        }
    }
    state.process_queue(0, &mut handle);
}

/// The queue walk (virtio-queue's descriptor chains from guest memory, the device-independent
/// drain loop) with the entropy device's handler, which writes every device-writable buffer.
pub fn virtio_queue(data: &[u8]) {
    // /dev/zero: the bytes written do not matter, and the run stays reproducible.
    let Ok(source) = File::open("/dev/zero") else {
        return;
    };
    let mut entropy = EntropySource::new(source);
    run_single_queue(data, |mem, chain| entropy.process_chain(mem, chain));
}

/// A temporary file removed when dropped.
pub(crate) struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub fn new(tag: &str, contents: &[u8]) -> Option<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("grove-fuzz-{tag}-{}-{n}", std::process::id()));
        // Owned before the write, so that a failed write (a full disk) leaves no file behind.
        let file = Self(path);
        std::fs::write(&file.0, contents).ok()?;
        Some(file)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Block requests: the script's chains parsed and served by the virtio-blk handler over a
/// 64 KiB raw disk (read-only when the first input byte says so).
pub fn block_requests(data: &[u8]) {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let Some(file) = TempFile::new("blk", &[0u8; 64 * 1024]) else {
        return;
    };
    let read_only = flags & 1 != 0;
    let Ok(image) = crate::disk::open(&OpenOptions::new(&file.0, DiskFormat::Raw, read_only))
    else {
        return;
    };
    let mut disk = Disk::new(image, b"fuzz");
    run_single_queue(data, |mem, chain| disk.process_chain(mem, chain));
}

/// The virtio-MMIO register file: reads and writes at any offset and width with any value,
/// in any order, over an entropy device. Writing DRIVER_OK activates the device with the
/// queues the script configured (validated against guest memory); writing 0 resets it.
pub fn mmio_registers(data: &[u8]) {
    let Some(mem) = guest_memory() else { return };
    let Ok(rng) = Rng::new() else { return };
    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(rng));
    let Ok(mut transport) = MmioTransport::new(mem, device) else {
        return;
    };
    let mut u = Unstructured::new(data);
    while !u.is_empty() {
        let Ok(op) = u.arbitrary::<u8>() else { return };
        // Mostly inside the 4 KiB window, registers at their 4-byte offsets; sometimes any
        // offset at all.
        let offset = match op >> 6 {
            0 => u64::from(u.arbitrary::<u16>().unwrap_or(0)),
            1 => u.arbitrary::<u64>().unwrap_or(0),
            _ => u64::from(u.arbitrary::<u8>().unwrap_or(0)) * 4,
        };
        // Widths 0..=8, 4 most of the time.
        let width = match (op >> 1) & 0xf {
            w @ 0..=8 => usize::from(w),
            _ => 4,
        };
        if op & 1 == 0 {
            let mut buf = [0u8; 8];
            transport.read(offset, &mut buf[..width]);
        } else {
            let mut buf = [0u8; 8];
            let n = width.min(u.len());
            if let Ok(bytes) = u.bytes(n) {
                buf[..n].copy_from_slice(bytes);
            }
            transport.write(offset, &buf[..width]);
        }
    }
}
