//! virtio-rng tests: filling buffers and the event-loop path.

use std::fs::File;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::handler::{EntropySource, MAX_BYTES_PER_REQUEST};
use super::*;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{VirtioDevice, INT_VRING, TYPE_RNG};
use crate::vstate::memory::GuestMemoryMmap;

fn serve(mem: &GuestMemoryMmap, descs: &[virtio_queue::desc::RawDescriptor]) -> u32 {
    let mut drv = Driver::new(mem, 16);
    drv.add_chain(descs);
    let mut q = drv.queue();
    let chain = q.pop_descriptor_chain(mem).unwrap();
    let mut src = EntropySource::new(File::open("/dev/urandom").unwrap());
    src.process_chain(mem, chain)
}

fn is_filled(mem: &GuestMemoryMmap, addr: u64, len: usize) -> bool {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    // 4 KiB of zeros from a CSPRNG has probability 2^-32768.
    buf.iter().any(|&b| b != 0)
}

#[test]
fn fills_writable_buffers() {
    let mem = guest_mem();
    let descs = [
        desc(DATA_BASE, 4096, true),
        desc(DATA_BASE + 0x2000, 4096, true),
    ];
    assert_eq!(serve(&mem, &descs), 8192);
    assert!(is_filled(&mem, DATA_BASE, 4096));
    assert!(is_filled(&mem, DATA_BASE + 0x2000, 4096));
}

#[test]
fn requests_are_bounded_and_readable_buffers_untouched() {
    let mem = guest_mem();
    let big = 2 * MAX_BYTES_PER_REQUEST as u32;
    let descs = [
        desc(DATA_BASE, 4096, false),
        desc(DATA_BASE + 0x1000, big, true),
    ];
    assert_eq!(serve(&mem, &descs), MAX_BYTES_PER_REQUEST as u32);
    assert!(!is_filled(&mem, DATA_BASE, 4096));
    let tail = DATA_BASE + 0x1000 + MAX_BYTES_PER_REQUEST as u64;
    assert!(!is_filled(&mem, tail, 4096));
}

#[test]
fn bad_buffers_are_returned_empty() {
    let mem = guest_mem();
    let outside = MEM_SIZE as u64 - 16;
    assert_eq!(serve(&mem, &[desc(outside, 64, true)]), 0);
    assert_eq!(serve(&mem, &[desc(u64::MAX, 1, true)]), 0);
    assert_eq!(serve(&mem, &[desc(DATA_BASE, 64, false)]), 0);
}

#[test]
fn event_loop_serves_requests_and_interrupts() {
    let mem = guest_mem();
    let rng = Rng::new().unwrap();
    assert_eq!(rng.device_type(), TYPE_RNG);
    let rng = Arc::new(Mutex::new(rng));
    let mut em = EventManager::<Arc<Mutex<Rng>>>::new().unwrap();
    em.add_subscriber(rng.clone());

    let mut drv = Driver::new(&mem, 16);
    drv.add_chain(&[desc(DATA_BASE, 256, true)]);
    let (ctx, irq) = activate_ctx(&mem, drv.queue());
    rng.lock().unwrap().activate(ctx).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used(0), (0, 256));
    assert_eq!(irq.status(), INT_VRING);
    assert_eq!(irq.eventfd().read().unwrap(), 1);

    let head = drv.add_chain(&[desc(DATA_BASE + 0x1000, 32, true)]);
    rng.lock().unwrap().queue_events()[0].write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(drv.used(1), (u32::from(head), 32));
}
