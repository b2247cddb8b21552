//! virtio-blk tests: request handling against a temp file, and the event-loop path.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::handler::Disk;
use super::*;
use crate::devices::virtio::mmio::{MmioTransport, MmioTransportState};
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{
    VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::disk::DiskError;
use crate::snapshot::Persist;
use crate::vstate::memory::GuestMemoryMmap;

const HDR: u64 = DATA_BASE;
const STATUS: u64 = DATA_BASE + 0x100;
const DATA: u64 = DATA_BASE + 0x1000;
/// Test disks are 64 sectors (32 KiB) unless a test needs more.
const SECTORS: u64 = 64;

/// Sector `s` of a test disk is filled with the byte `s`.
fn pattern(sectors: u64) -> Vec<u8> {
    (0..sectors)
        .flat_map(|s| std::iter::repeat_n(s as u8, 512))
        .collect()
}

fn disk(contents: &[u8], read_only: bool) -> (TempFile, Disk) {
    let tmp = TempFile::with_contents("blk", contents);
    let image = crate::disk::open(&crate::disk::OpenOptions::new(
        &tmp.0,
        crate::disk::DiskFormat::Raw,
        read_only,
    ))
    .unwrap();
    (tmp, Disk::new(image, b"grove-disk-0"))
}

fn write_header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

/// Serves `descs` as one chain and returns the used length.
fn serve(disk: &mut Disk, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> u32 {
    let mut drv = Driver::new(mem, 16);
    drv.add_chain(descs);
    serve_published(disk, mem, &drv)
}

fn serve_published(disk: &mut Disk, mem: &GuestMemoryMmap, drv: &Driver) -> u32 {
    let mut q = drv.queue();
    let chain = q.pop_descriptor_chain(mem).expect("a published chain");
    disk.process_chain(mem, chain)
}

/// Header, data and status descriptors of a well-formed request.
fn request(data_len: u32, data_writable: bool) -> Vec<RawDescriptor> {
    vec![
        desc(HDR, 16, false),
        desc(DATA, data_len, data_writable),
        desc(STATUS, 1, true),
    ]
}

#[test]
fn reads_sectors_into_guest_memory() {
    let mem = guest_mem();
    let (_tmp, mut d) = disk(&pattern(SECTORS), false);
    write_header(&mem, VIRTIO_BLK_T_IN, 3);
    let used = serve(&mut d, &mem, &request(1024, true));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used, 1025, "data plus the status byte");
    let mut buf = vec![0u8; 1024];
    mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 3) && buf[512..].iter().all(|&b| b == 4));
}

#[test]
fn writes_sectors_to_the_file() {
    let mem = guest_mem();
    let (tmp, mut d) = disk(&pattern(SECTORS), false);
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_OUT, 63);
    let used = serve(&mut d, &mem, &request(512, false));
    assert_eq!((status(&mem), used), (VIRTIO_BLK_S_OK as u8, 1));
    let file = std::fs::read(&tmp.0).unwrap();
    assert!(file[63 * 512..].iter().all(|&b| b == 0xab));
    assert_eq!(file[..63 * 512], pattern(63)[..]);
}

#[test]
fn large_transfers_cross_bounce_buffer_chunks() {
    let mem = guest_mem();
    let sectors = 1200; // 600 KiB: three chunks, the last one partial
    let (tmp, mut d) = disk(&pattern(sectors), false);
    let len = (sectors * 512) as u32;
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(serve(&mut d, &mem, &request(len, true)), len + 1);
    let mut buf = vec![0u8; len as usize];
    mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, pattern(sectors));

    let reversed: Vec<u8> = buf.iter().rev().copied().collect();
    mem.write_slice(&reversed, GuestAddress(DATA)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(serve(&mut d, &mem, &request(len, false)), 1);
    assert_eq!(std::fs::read(&tmp.0).unwrap(), reversed);
}

#[test]
fn header_and_data_may_share_descriptors() {
    // VIRTIO_F_VERSION_1 implies ANY_LAYOUT: header split in two, data and status in one.
    let mem = guest_mem();
    let (_tmp, mut d) = disk(&pattern(SECTORS), false);
    write_header(&mem, VIRTIO_BLK_T_IN, 5);
    let descs = [
        desc(HDR, 10, false),
        desc(HDR + 10, 6, false),
        desc(DATA, 513, true),
    ];
    assert_eq!(serve(&mut d, &mem, &descs), 513);
    let s: u8 = mem.read_obj(GuestAddress(DATA + 512)).unwrap();
    assert_eq!(s, VIRTIO_BLK_S_OK as u8);
    let b: u8 = mem.read_obj(GuestAddress(DATA + 511)).unwrap();
    assert_eq!(b, 5);
}

#[test]
fn flush_and_get_id() {
    let mem = guest_mem();
    let (_tmp, mut d) = disk(&pattern(SECTORS), false);
    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let descs = [desc(HDR, 16, false), desc(STATUS, 1, true)];
    assert_eq!(serve(&mut d, &mem, &descs), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    d.flush().unwrap();

    mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(serve(&mut d, &mem, &request(20, true)), 21);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..12], b"grove-disk-0");
    assert_eq!(id[12..], [0; 8], "NUL-padded");
}

#[test]
fn out_of_range_and_unaligned_requests_fail() {
    let mem = guest_mem();
    let (tmp, mut d) = disk(&pattern(SECTORS), false);
    for (t, sector, len) in [
        (VIRTIO_BLK_T_IN, SECTORS, 512),       // just past the end
        (VIRTIO_BLK_T_IN, SECTORS - 1, 1024),  // straddles the end
        (VIRTIO_BLK_T_OUT, SECTORS - 1, 1024), // same for writes
        (VIRTIO_BLK_T_IN, u64::MAX, 512),      // sector arithmetic overflows
        (VIRTIO_BLK_T_OUT, u64::MAX / 512 + 1, 512),
        (VIRTIO_BLK_T_IN, 0, 100), // not whole sectors
    ] {
        write_header(&mem, t, sector);
        let used = serve(&mut d, &mem, &request(len, t == VIRTIO_BLK_T_IN));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8, "{t} {sector} {len}");
        assert_eq!(used, 1);
    }
    assert_eq!(std::fs::read(&tmp.0).unwrap(), pattern(SECTORS));
}

#[test]
fn read_only_disk_refuses_writes() {
    let mem = guest_mem();
    let (tmp, mut d) = disk(&pattern(SECTORS), true);
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(serve(&mut d, &mem, &request(512, false)), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(std::fs::read(&tmp.0).unwrap(), pattern(SECTORS));
    // Reads still work.
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(serve(&mut d, &mem, &request(512, true)), 513);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let mem = guest_mem();
    let (_tmp, mut d) = disk(&pattern(SECTORS), false);
    write_header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(serve(&mut d, &mem, &request(16, false)), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn data_direction_must_match_the_request_type() {
    let mem = guest_mem();
    let (tmp, mut d) = disk(&pattern(SECTORS), false);
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(serve(&mut d, &mem, &request(512, false)), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
    write_header(&mem, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(serve(&mut d, &mem, &request(512, true)), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(std::fs::read(&tmp.0).unwrap(), pattern(SECTORS));
}

#[test]
fn malformed_chains_never_panic() {
    let mem = guest_mem();
    let (tmp, mut d) = disk(&pattern(SECTORS), false);
    let outside = MEM_SIZE as u64 - 256;
    // (chain, expected used length, expected status byte if one was written)
    let cases: Vec<(Vec<RawDescriptor>, u32, Option<u32>)> = vec![
        // No status descriptor: the last descriptor is device-readable.
        (vec![desc(HDR, 16, false), desc(DATA, 512, false)], 0, None),
        (vec![desc(HDR, 16, false)], 0, None),
        // Device-readable status descriptor after writable data: misordered.
        (
            vec![
                desc(HDR, 16, false),
                desc(DATA, 512, true),
                desc(STATUS, 1, false),
            ],
            0,
            None,
        ),
        // Zero-length status descriptor.
        (vec![desc(HDR, 16, false), desc(STATUS, 0, true)], 0, None),
        // Header too short.
        (
            vec![
                desc(HDR, 8, false),
                desc(DATA, 512, true),
                desc(STATUS, 1, true),
            ],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // Data buffer running off the end of guest memory.
        (
            vec![
                desc(HDR, 16, false),
                desc(outside, 512, true),
                desc(STATUS, 1, true),
            ],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // Header outside guest memory, and at an address that wraps.
        (
            vec![desc(u64::MAX - 7, 16, false), desc(STATUS, 1, true)],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // Status byte outside guest memory: nothing can be reported.
        (
            vec![
                desc(HDR, 16, false),
                desc(DATA, 512, true),
                desc(1 << 40, 1, true),
            ],
            0,
            None,
        ),
        (vec![desc(HDR, 16, false), desc(u64::MAX, 1, true)], 0, None),
    ];
    for (i, (descs, used, st)) in cases.into_iter().enumerate() {
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(serve(&mut d, &mem, &descs), used, "case {i}");
        let expected = st.map_or(0xff, |s| s as u8);
        assert_eq!(status(&mem), expected, "case {i}");
    }
    // A read-only status descriptor on a write request: the disk must stay untouched.
    write_header(&mem, VIRTIO_BLK_T_OUT, 0);
    let descs = [
        desc(HDR, 16, false),
        desc(DATA, 512, false),
        desc(STATUS, 1, false),
    ];
    assert_eq!(serve(&mut d, &mem, &descs), 0);
    assert_eq!(std::fs::read(&tmp.0).unwrap(), pattern(SECTORS));
}

#[test]
fn truncated_and_looping_chains_complete_without_status() {
    let mem = guest_mem();
    let (_tmp, mut d) = disk(&pattern(SECTORS), false);
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    let next =
        |addr, len, flags, next| RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
    let (n, w) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    // The second descriptor points past the 16-entry table.
    let mut drv = Driver::new(&mem, 16);
    drv.add_raw_chain(&[next(HDR, 16, n, 1), next(STATUS, 1, w | n, 200)]);
    assert_eq!(serve_published(&mut d, &mem, &drv), 0);
    // A loop: the chain ends when its length reaches the queue size.
    let mut drv = Driver::new(&mem, 16);
    drv.add_raw_chain(&[next(HDR, 16, n, 1), next(STATUS, 1, w | n, 1)]);
    assert_eq!(serve_published(&mut d, &mem, &drv), 0);
    assert_eq!(status(&mem), 0xff);
}

fn block_with(contents: &[u8], read_only: bool, id: &str) -> (TempFile, Result<Block, BlockError>) {
    let tmp = TempFile::with_contents("blkdev", contents);
    let cfg = BlockConfig::raw(tmp.0.clone(), read_only, id);
    (tmp, Block::new(cfg))
}

#[test]
fn new_checks_the_image_and_fills_the_config_space() {
    let (_tmp, b) = block_with(&pattern(8), true, "x");
    let b = b.unwrap();
    assert_eq!(b.capacity(), 8);
    assert!(b.is_read_only());
    let f = b.avail_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    let mut seg = [0u8; 4];
    b.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
    b.flush().unwrap();

    let (_tmp, rw) = block_with(&pattern(8), false, "x");
    assert_eq!(rw.unwrap().avail_features() & (1 << VIRTIO_BLK_F_RO), 0);

    let (tmp, e) = block_with(&[0u8; 1000], false, "x");
    let e = e.err().expect("unaligned size");
    assert!(matches!(
        e,
        BlockError::Disk(DiskError::UnalignedSize { size: 1000, .. })
    ));
    assert!(e.to_string().contains(&tmp.0.display().to_string()));

    let (_tmp, e) = block_with(&[0u8; 512], false, "this-id-is-longer-than-20");
    assert!(matches!(e, Err(BlockError::IdTooLong { .. })));

    let missing = temp_path("missing");
    let e = Block::new(BlockConfig::raw(missing.clone(), false, ""));
    let e = e.err().expect("missing file");
    assert!(matches!(e, BlockError::Disk(DiskError::Open { .. })));
    assert!(e.to_string().contains(&missing.display().to_string()));
}

#[test]
fn an_image_written_by_one_vm_is_locked_for_every_other() {
    let (tmp, first) = block_with(&pattern(8), false, "a");
    let first = first.unwrap();
    let open = |read_only| Block::new(BlockConfig::raw(tmp.0.clone(), read_only, ""));
    assert!(matches!(
        open(false),
        Err(BlockError::Disk(DiskError::Locked {
            read_only: false,
            ..
        }))
    ));
    let e = open(true).err().expect("read-only open of a written image");
    assert!(e.to_string().contains("in use by another VM"), "{e}");
    drop(first);
    // Released locks may linger while another test's child process starts.
    let reopen = |read_only| {
        crate::disk::retry_while_locked(
            || open(read_only),
            |e| matches!(e, BlockError::Disk(DiskError::Locked { .. })),
        )
    };
    // Read-only users share the image; a writer is then refused.
    let r1 = reopen(true).unwrap();
    let r2 = open(true).unwrap();
    assert!(matches!(
        open(false),
        Err(BlockError::Disk(DiskError::Locked { .. }))
    ));
    drop((r1, r2));
    reopen(false).unwrap();
}

/// A block device registered with a real event manager.
struct Loop {
    em: EventManager<Arc<Mutex<Block>>>,
    block: Arc<Mutex<Block>>,
}

impl Loop {
    fn new(block: Block) -> Self {
        let mut em = EventManager::new().unwrap();
        let block = Arc::new(Mutex::new(block));
        em.add_subscriber(block.clone());
        Self { em, block }
    }

    fn run(&mut self) {
        self.em.run_with_timeout(100).unwrap();
    }

    fn kick(&self) {
        self.block.lock().unwrap().queue_events()[0]
            .write(1)
            .unwrap();
    }
}

#[test]
fn event_loop_serves_requests_and_interrupts() {
    let mem = guest_mem();
    let (_tmp, b) = block_with(&pattern(SECTORS), false, "ev");
    let mut lp = Loop::new(b.unwrap());
    let mut drv = Driver::new(&mem, 16);
    write_header(&mem, VIRTIO_BLK_T_IN, 7);
    drv.add_chain(&request(512, true));

    // Requests published before DRIVER_OK are served as soon as the device starts.
    let (ctx, irq) = activate_ctx(&mem, drv.queue());
    lp.block.lock().unwrap().activate(ctx).unwrap();
    lp.run();
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used(0), (0, 513));
    assert_eq!(irq.status(), INT_VRING);
    assert_eq!(irq.eventfd().read().unwrap(), 1);
    let b: u8 = mem.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(b, 7);

    // A notification through the queue eventfd.
    irq.ack(INT_VRING);
    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let head = drv.add_chain(&[desc(HDR, 16, false), desc(STATUS, 1, true)]);
    lp.kick();
    lp.run();
    assert_eq!(drv.used_idx(), 2);
    assert_eq!(drv.used(1), (u32::from(head), 1));
    assert_eq!(irq.status(), INT_VRING);

    // Activating twice is refused.
    let (ctx, _) = activate_ctx(&mem, drv.queue());
    assert!(lp.block.lock().unwrap().activate(ctx).is_err());

    // After a reset, stale notifications are dropped, not served.
    lp.block.lock().unwrap().reset();
    assert!(!lp.block.lock().unwrap().is_activated());
    drv.add_chain(&request(512, true));
    lp.kick();
    lp.run();
    lp.run();
    assert_eq!(drv.used_idx(), 2);
}

#[test]
fn event_idx_suppresses_unwanted_interrupts() {
    let mem = guest_mem();
    let (_tmp, b) = block_with(&pattern(SECTORS), false, "idx");
    let mut lp = Loop::new(b.unwrap());
    let mut drv = Driver::new(&mem, 16);
    {
        let mut b = lp.block.lock().unwrap();
        let f = b.avail_features();
        b.set_acked_features(f);
    }
    // used_event = 1: the driver wants an interrupt only once the second entry is used.
    let used_event = GuestAddress(drv.vq.avail_addr().0 + 4 + 2 * 16);
    mem.write_obj(1u16, used_event).unwrap();
    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    drv.add_chain(&[desc(HDR, 16, false), desc(STATUS, 1, true)]);
    let (ctx, irq) = activate_ctx(&mem, drv.queue());
    lp.block.lock().unwrap().activate(ctx).unwrap();
    lp.run();
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(irq.status(), 0, "no interrupt before used_event is passed");

    drv.add_chain(&[desc(HDR, 16, false), desc(STATUS, 1, true)]);
    lp.kick();
    lp.run();
    assert_eq!(drv.used_idx(), 2);
    assert_eq!(irq.status(), INT_VRING);
}

#[test]
fn end_to_end_through_the_mmio_transport() {
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::{status as st, MmioTransport};
    use virtio_bindings::virtio_mmio::*;

    fn wr(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }
    fn rd(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    let mem = guest_mem();
    let (_tmp, b) = block_with(&pattern(SECTORS), false, "e2e");
    let mut lp = Loop::new(b.unwrap());
    let mut t = MmioTransport::new(mem.clone(), lp.block.clone()).unwrap();
    assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);

    wr(&mut t, VIRTIO_MMIO_STATUS, st::ACKNOWLEDGE);
    wr(&mut t, VIRTIO_MMIO_STATUS, st::ACKNOWLEDGE | st::DRIVER);
    for sel in 0..2 {
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
        let offered = rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, offered);
    }
    let features_ok = st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK;
    wr(&mut t, VIRTIO_MMIO_STATUS, features_ok);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), features_ok);

    let mut drv = Driver::new(&mem, 16);
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
    wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
    wr(
        &mut t,
        VIRTIO_MMIO_QUEUE_DESC_LOW,
        drv.vq.desc_table_addr().0 as u32,
    );
    wr(
        &mut t,
        VIRTIO_MMIO_QUEUE_AVAIL_LOW,
        drv.vq.avail_addr().0 as u32,
    );
    wr(
        &mut t,
        VIRTIO_MMIO_QUEUE_USED_LOW,
        drv.vq.used_addr().0 as u32,
    );
    wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    write_header(&mem, VIRTIO_BLK_T_IN, 9);
    drv.add_chain(&request(512, true));
    wr(&mut t, VIRTIO_MMIO_STATUS, features_ok | st::DRIVER_OK);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), features_ok | st::DRIVER_OK);

    lp.run();
    assert_eq!(drv.used(0), (0, 513));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), INT_VRING);
    wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING);

    // The QueueNotify fallback (no ioeventfd registered here).
    write_header(&mem, VIRTIO_BLK_T_IN, 10);
    drv.add_chain(&request(512, true));
    wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    lp.run();
    assert_eq!(drv.used_idx(), 2);
    let b: u8 = mem.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(b, 10);

    wr(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert!(!lp.block.lock().unwrap().is_activated());
    assert_eq!(lp.block.lock().unwrap().acked_features(), 0);
}

/// Saves `block` and `transport` as a snapshot does, through JSON. The block is locked only
/// while it saves: the transport locks it again to save its queues.
fn snapshot(block: &Mutex<Block>, transport: &MmioTransport) -> (BlockState, MmioTransportState) {
    let block = block.lock().unwrap().save();
    let json = serde_json::to_string(&(block, transport.save())).unwrap();
    serde_json::from_str(&json).unwrap()
}

#[test]
fn restored_block_serves_requests_posted_after_restore() {
    use crate::devices::virtio::mmio::MmioTransportRestoreArgs;

    let mem = guest_mem();
    let (tmp, b) = block_with(&pattern(SECTORS), false, "snap");
    let mut lp = Loop::new(b.unwrap());
    let mut t = MmioTransport::new(mem.clone(), lp.block.clone()).unwrap();
    let mut drv = Driver::new(&mem, 16);
    bring_up(&mut t, &drv, true);
    write_header(&mem, VIRTIO_BLK_T_IN, 3);
    drv.add_chain(&request(512, true));
    lp.kick();
    lp.run();
    assert_eq!(drv.used_idx(), 1);

    let (block_state, transport_state) = snapshot(&lp.block, &t);
    // The old VMM goes away (releasing the image lock); the guest, restored from the same
    // memory, posts its next request before the device is back.
    drop((t, lp));
    write_header(&mem, VIRTIO_BLK_T_IN, 5);
    let head = drv.add_chain(&request(512, true));

    let block = crate::disk::retry_while_locked(
        || Block::restore(BlockRestoreArgs::default(), &block_state),
        |e| {
            matches!(
                e,
                BlockRestoreError::Open(BlockError::Disk(DiskError::Locked { .. }))
            )
        },
    )
    .unwrap();
    assert_eq!(block.path(), tmp.0);
    let mut lp = Loop::new(block);
    let args = MmioTransportRestoreArgs {
        mem: mem.clone(),
        device: lp.block.clone(),
    };
    let mut t = MmioTransport::restore(args, &transport_state).unwrap();
    lp.run();
    assert_eq!(
        drv.used_idx(),
        2,
        "served without any notification from the guest"
    );
    assert_eq!(drv.used(1), (u32::from(head), 513));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    let b: u8 = mem.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(b, 5);

    // Later requests are notified as usual, here through the QueueNotify fallback.
    write_header(&mem, VIRTIO_BLK_T_IN, 6);
    drv.add_chain(&request(512, true));
    mmio_write(
        &mut t,
        virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY,
        0,
    );
    lp.run();
    assert_eq!(drv.used_idx(), 3);
    let b: u8 = mem.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(b, 6);
}

#[test]
fn restore_checks_the_disk_size_and_reopens_under_the_same_lock_rules() {
    let (tmp, b) = block_with(&pattern(SECTORS), false, "sz");
    let state = b.unwrap().save();
    assert_eq!(state.capacity, SECTORS);

    // A clone's own copy of the disk.
    let copy = TempFile::with_contents("blk-copy", &pattern(SECTORS));
    let args = BlockRestoreArgs {
        path_override: Some(copy.0.clone()),
    };
    let clone = Block::restore(args, &state).unwrap();
    assert_eq!(clone.path(), copy.0);
    assert_eq!(clone.save().path, copy.0);

    let bigger = TempFile::with_contents("blk-big", &pattern(SECTORS * 2));
    let args = BlockRestoreArgs {
        path_override: Some(bigger.0.clone()),
    };
    let e = Block::restore(args, &state).err().expect("size differs");
    assert!(
        matches!(e, BlockRestoreError::Capacity { saved: SECTORS, actual, .. } if actual == 2 * SECTORS),
        "{e}"
    );
    assert!(
        e.to_string().contains(&bigger.0.display().to_string()),
        "{e}"
    );

    // The image is still written by the original VM: the restore is refused.
    let (_tmp2, first) = block_with(&pattern(SECTORS), false, "busy");
    let first = first.unwrap();
    let busy = first.save();
    let e = Block::restore(BlockRestoreArgs::default(), &busy)
        .err()
        .expect("locked");
    assert!(
        matches!(
            e,
            BlockRestoreError::Open(BlockError::Disk(DiskError::Locked { .. }))
        ),
        "{e}"
    );
    drop(tmp);
}

#[test]
fn restore_refuses_unoffered_features_and_bad_ids() {
    let (_tmp, b) = block_with(&pattern(8), false, "f");
    let mut state = b.unwrap().save();
    state.acked_features = VIRTIO_F_VERSION_1 | (1 << 60);
    let e = Block::restore(BlockRestoreArgs::default(), &state)
        .err()
        .expect("unoffered");
    assert!(matches!(e, BlockRestoreError::Features(_)), "{e}");
    // Read-only is offered only to read-only disks.
    state.acked_features = VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_RO);
    assert!(Block::restore(BlockRestoreArgs::default(), &state).is_err());
    state.acked_features = 0;
    state.id = "x".repeat(21);
    let e = Block::restore(BlockRestoreArgs::default(), &state)
        .err()
        .expect("id");
    assert!(
        matches!(e, BlockRestoreError::Open(BlockError::IdTooLong { .. })),
        "{e}"
    );
}
