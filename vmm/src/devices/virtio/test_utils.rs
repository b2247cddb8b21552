//! Helpers shared by the virtio unit tests: mock guest memory, descriptor chains written the
//! way a driver would, and reading the used ring back.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::GuestAddress;

use super::{ActivateContext, IrqTrigger};
use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

pub use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

/// Size of the mock guest RAM: 1 MiB, rings at 0, data buffers from [`DATA_BASE`].
pub const MEM_SIZE: usize = 0x10_0000;
/// Where tests place request buffers, well past the rings of a 16-entry queue.
pub const DATA_BASE: u64 = 0x1_0000;

pub fn guest_mem() -> GuestMemoryMmap {
    crate::vstate::memory::create_anonymous(MEM_SIZE as u64).unwrap()
}

/// A descriptor the device reads (`writable == false`) or writes.
pub fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
    let flags = if writable { VRING_DESC_F_WRITE } else { 0 };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
}

/// A driver's view of one split queue in mock guest memory.
pub struct Driver<'a> {
    pub vq: MockSplitQueue<'a, GuestMemoryMmap>,
    pub size: u16,
    next_desc: u16,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, 0, size)
    }

    /// A queue whose rings start at guest address `addr` (16-byte aligned).
    pub fn at(mem: &'a GuestMemoryMmap, addr: u64, size: u16) -> Self {
        Self {
            vq: MockSplitQueue::create(mem, GuestAddress(addr), size),
            size,
            next_desc: 0,
        }
    }

    /// A queue as the transport would hand it over after DRIVER_OK.
    pub fn queue(&self) -> Queue {
        self.vq.create_queue::<Queue>().unwrap()
    }

    /// Publishes one chain made of `descs` (NEXT flags and indices are filled in).
    pub fn add_chain(&mut self, descs: &[RawDescriptor]) -> u16 {
        let head = self.next_desc;
        let n = descs.len() as u16;
        let linked: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = SplitDescriptor::from(*d);
                let last = i + 1 == descs.len();
                let flags = if last {
                    d.flags() & !(VRING_DESC_F_NEXT as u16)
                } else {
                    d.flags() | VRING_DESC_F_NEXT as u16
                };
                let next = if last { 0 } else { head + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next))
            })
            .collect();
        self.vq.add_desc_chains(&linked, head).unwrap();
        self.next_desc += n;
        head
    }

    /// Publishes a raw descriptor table entry as a one-entry chain, flags untouched.
    pub fn add_raw_chain(&mut self, descs: &[RawDescriptor]) -> u16 {
        let head = self.next_desc;
        self.vq.add_desc_chains(&descs[..1], head).unwrap();
        for (i, d) in descs.iter().enumerate().skip(1) {
            self.vq.desc_table().store(head + i as u16, *d).unwrap();
        }
        self.next_desc += descs.len() as u16;
        head
    }

    /// Number of used entries the device has published.
    pub fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// Used entry `i`: (chain head, used length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let e = self.vq.used().ring().ref_at(usize::from(i)).unwrap().load();
        (e.id(), e.len())
    }
}

/// A 32-bit register write to a virtio-MMIO transport, as a driver does it.
pub fn mmio_write(t: &mut dyn BusDevice, offset: u32, value: u32) {
    t.write(u64::from(offset), &value.to_le_bytes());
}

/// A 32-bit register read from a virtio-MMIO transport.
pub fn mmio_read(t: &mut dyn BusDevice, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(offset), &mut b);
    u32::from_le_bytes(b)
}

/// Does what a driver does to start a device: accepts every offered feature, sets queue 0 up
/// on `drv`'s rings and, with `driver_ok`, sets DRIVER_OK (which activates the device).
pub fn bring_up(t: &mut dyn BusDevice, drv: &Driver, driver_ok: bool) {
    use super::status as st;
    use virtio_bindings::virtio_mmio::*;

    mmio_write(t, VIRTIO_MMIO_STATUS, st::ACKNOWLEDGE);
    mmio_write(t, VIRTIO_MMIO_STATUS, st::ACKNOWLEDGE | st::DRIVER);
    for sel in 0..2 {
        mmio_write(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
        let offered = mmio_read(t, VIRTIO_MMIO_DEVICE_FEATURES);
        mmio_write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        mmio_write(t, VIRTIO_MMIO_DRIVER_FEATURES, offered);
    }
    let features_ok = st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK;
    mmio_write(t, VIRTIO_MMIO_STATUS, features_ok);
    let split = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
    let (desc_lo, desc_hi) = split(drv.vq.desc_table_addr());
    let (avail_lo, avail_hi) = split(drv.vq.avail_addr());
    let (used_lo, used_hi) = split(drv.vq.used_addr());
    mmio_write(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    mmio_write(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(drv.size));
    mmio_write(t, VIRTIO_MMIO_QUEUE_DESC_LOW, desc_lo);
    mmio_write(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, desc_hi);
    mmio_write(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail_lo);
    mmio_write(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, avail_hi);
    mmio_write(t, VIRTIO_MMIO_QUEUE_USED_LOW, used_lo);
    mmio_write(t, VIRTIO_MMIO_QUEUE_USED_HIGH, used_hi);
    mmio_write(t, VIRTIO_MMIO_QUEUE_READY, 1);
    if driver_ok {
        mmio_write(t, VIRTIO_MMIO_STATUS, features_ok | st::DRIVER_OK);
    }
}

pub fn activate_ctx(mem: &GuestMemoryMmap, queue: Queue) -> (ActivateContext, Arc<IrqTrigger>) {
    let irq = Arc::new(IrqTrigger::new().unwrap());
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues: vec![queue],
        interrupt: irq.clone(),
    };
    (ctx, irq)
}

/// A path under the system temp directory unique to this process and call.
pub fn temp_path(tag: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("grove-{tag}-{}-{n}.img", std::process::id()))
}

/// Deletes the file when dropped, also when a test fails.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn with_contents(tag: &str, contents: &[u8]) -> Self {
        let path = temp_path(tag);
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
