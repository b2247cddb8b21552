//! virtio-net tests: frames through mock queues against an in-memory host end, and the real
//! device on a real TAP in a network namespace of the test's own.
//!
//! The TAP tests need root (CAP_NET_ADMIN, to create a network namespace and a TAP) and
//! `/dev/net/tun`; they fail, saying so, where either is missing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::handler::test_io::MemFrames;
use super::handler::{Rx, RxStop, Tx};
use super::*;
use crate::device_manager::{
    apply_net_overrides, DevicesRestoreError, DevicesState, VirtioDeviceState, VirtioKindState,
};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{
    ActivateContext, IrqTrigger, VirtioDevice, INT_VRING, TYPE_NET, VIRTIO_F_VERSION_1,
};
use crate::snapshot::Persist;
use crate::vstate::memory::GuestMemoryMmap;

/// An experimental ethertype (IEEE 802 local use), so test frames are never confused with
/// anything the kernel sends by itself.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// An Ethernet frame to everyone with `payload` (padded to the 60-byte minimum).
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(payload);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// `frame` behind a vnet header as the host end gives it: empty.
fn from_host(frame: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(frame);
    f
}

/// The vnet header the device must put in front of every received frame.
fn rx_header() -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[10] = 1;
    h
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

#[test]
fn mac_addresses_parse_print_and_refuse_nonsense() {
    let mac: MacAddr = "06:00:ac:10:00:02".parse().unwrap();
    assert_eq!(mac.0, [6, 0, 0xac, 0x10, 0, 2]);
    assert_eq!(mac.to_string(), "06:00:ac:10:00:02");
    assert_eq!("06:00:AC:10:00:02".parse::<MacAddr>().unwrap(), mac);
    let json = serde_json::to_string(&mac).unwrap();
    assert_eq!(json, "\"06:00:ac:10:00:02\"");
    assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);
    for bad in [
        "",
        "06:00:ac:10:00",
        "06:00:ac:10:00:02:03",
        "06-00-ac-10-00-02",
        "6:0:ac:10:0:2",
        "06:00:ac:10:00:zz",
        "+6:00:ac:10:00:02",
    ] {
        assert!(
            matches!(bad.parse::<MacAddr>(), Err(MacAddrError::Syntax(_))),
            "{bad:?}"
        );
    }
    assert!(matches!(
        "01:00:5e:00:00:01".parse::<MacAddr>(),
        Err(MacAddrError::Multicast(_))
    ));
    assert!(serde_json::from_str::<MacAddr>("\"ff:ff:ff:ff:ff:ff\"").is_err());
    let random = MacAddr::random().unwrap();
    assert_eq!(random.0[0] & 0x03, 0x02, "locally administered unicast");
}

#[test]
fn interface_names_are_checked_like_the_kernel_does() {
    use super::tap::check_ifname;
    assert!(check_ifname("tap0").is_ok());
    assert!(check_ifname("a-very-long-nm").is_ok());
    for bad in ["", ".", "..", "a/b", "a:b", "a b", "sixteen-bytes-xx"] {
        assert!(check_ifname(bad).is_err(), "{bad:?}");
    }
    assert!(matches!(Tap::open("bad/name"), Err(TapError::Name { .. })));
}

// The receive side, against an in-memory host end.

struct RxSetup<'a> {
    mem: &'a GuestMemoryMmap,
    drv: Driver<'a>,
    queue: Queue,
    irq: IrqTrigger,
    rx: Rx,
    io: MemFrames,
    stats: NetStats,
}

impl<'a> RxSetup<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let drv = Driver::new(mem, 16);
        let queue = drv.queue();
        Self {
            mem,
            drv,
            queue,
            irq: IrqTrigger::new().unwrap(),
            rx: Rx::new(),
            io: MemFrames::default(),
            stats: NetStats::default(),
        }
    }

    fn run(&mut self, budget: usize) -> RxStop {
        self.rx.process(
            self.mem,
            &mut self.queue,
            &self.irq,
            &mut self.io,
            &mut self.stats,
            budget,
        )
    }
}

#[test]
fn received_frames_land_in_guest_buffers_behind_a_header() {
    let mem = guest_mem();
    let mut s = RxSetup::new(&mem);
    let f1 = frame(b"first");
    let f2 = frame(&[0x5a; 1500]);
    s.io.incoming.push_back(from_host(&f1));
    s.io.incoming.push_back(from_host(&f2));
    // The header and the frame may be split across descriptors as the driver likes.
    s.drv.add_chain(&[desc(DATA_BASE, 2048, true)]);
    s.drv.add_chain(&[
        desc(DATA_BASE + 0x1000, 10, true),
        desc(DATA_BASE + 0x2000, 2000, true),
    ]);
    assert_eq!(s.run(64), RxStop::Drained);
    assert_eq!(s.drv.used_idx(), 2);
    assert_eq!(s.drv.used(0), (0, (VNET_HDR_LEN + f1.len()) as u32));
    assert_eq!(s.drv.used(1), (1, (VNET_HDR_LEN + f2.len()) as u32));
    assert_eq!(read(&mem, DATA_BASE, VNET_HDR_LEN), rx_header());
    assert_eq!(read(&mem, DATA_BASE + VNET_HDR_LEN as u64, f1.len()), f1);
    let mut second = read(&mem, DATA_BASE + 0x1000, 10);
    second.extend(read(&mem, DATA_BASE + 0x2000, VNET_HDR_LEN - 10 + f2.len()));
    assert_eq!(second[..VNET_HDR_LEN], rx_header());
    assert_eq!(second[VNET_HDR_LEN..], f2[..]);
    assert_eq!(s.irq.status(), INT_VRING);
    assert_eq!(s.stats.rx_frames, 2);
}

#[test]
fn a_frame_without_a_guest_buffer_waits_for_one() {
    let mem = guest_mem();
    let mut s = RxSetup::new(&mem);
    let (f1, f2) = (frame(b"kept"), frame(b"behind"));
    s.io.incoming.push_back(from_host(&f1));
    s.io.incoming.push_back(from_host(&f2));
    assert_eq!(s.run(64), RxStop::NoBuffers);
    assert!(s.rx.has_pending());
    // Only the kept frame was read: the second one still waits at the host.
    assert_eq!(s.io.incoming.len(), 1);
    assert_eq!((s.drv.used_idx(), s.irq.status()), (0, 0));
    // Looking again without new buffers changes nothing.
    assert_eq!(s.run(64), RxStop::NoBuffers);
    assert_eq!(s.io.incoming.len(), 1);

    s.drv.add_chain(&[desc(DATA_BASE, 2048, true)]);
    assert_eq!(s.run(64), RxStop::NoBuffers);
    assert_eq!(s.drv.used(0), (0, (VNET_HDR_LEN + f1.len()) as u32));
    assert_eq!(read(&mem, DATA_BASE + VNET_HDR_LEN as u64, f1.len()), f1);
    s.drv.add_chain(&[desc(DATA_BASE + 0x1000, 2048, true)]);
    assert_eq!(s.run(64), RxStop::Drained);
    assert_eq!(
        read(&mem, DATA_BASE + 0x1000 + VNET_HDR_LEN as u64, f2.len()),
        f2
    );
    assert!(!s.rx.has_pending());
    assert_eq!((s.stats.rx_frames, s.stats.rx_dropped), (2, 0));
}

#[test]
fn unusable_receive_buffers_are_returned_empty_and_the_frame_dropped() {
    let mem = guest_mem();
    let mut s = RxSetup::new(&mem);
    let big = frame(&[7; 1000]);
    let small = frame(b"fits");
    s.io.incoming.push_back(from_host(&big));
    s.io.incoming.push_back(from_host(&small));
    s.io.incoming.push_back(from_host(&small));
    s.io.incoming.push_back(from_host(&small));
    // Too small for `big`; then read-only; then outside guest memory; then a good one.
    s.drv.add_chain(&[desc(DATA_BASE, 100, true)]);
    s.drv.add_chain(&[desc(DATA_BASE + 0x1000, 2048, false)]);
    s.drv.add_chain(&[desc(MEM_SIZE as u64 - 16, 2048, true)]);
    s.drv.add_chain(&[desc(DATA_BASE + 0x2000, 2048, true)]);
    assert_eq!(s.run(64), RxStop::Drained);
    assert_eq!(s.drv.used_idx(), 4);
    for i in 0..3 {
        assert_eq!(s.drv.used(i).1, 0, "chain {i}");
    }
    assert_eq!(s.drv.used(3).1, (VNET_HDR_LEN + small.len()) as u32);
    assert_eq!(read(&mem, DATA_BASE, 100), vec![0u8; 100]);
    assert_eq!((s.stats.rx_frames, s.stats.rx_dropped), (1, 3));
}

#[test]
fn malformed_host_frames_never_reach_the_guest() {
    let mem = guest_mem();
    let mut s = RxSetup::new(&mem);
    let mut partial_csum = from_host(&frame(b"csum"));
    partial_csum[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    let mut gso = from_host(&frame(b"gso"));
    gso[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    let good = frame(b"good");
    s.io.incoming.extend([
        vec![0u8; VNET_HDR_LEN + ETH_HLEN - 1],
        partial_csum,
        gso,
        from_host(&good),
    ]);
    s.drv.add_chain(&[desc(DATA_BASE, 2048, true)]);
    assert_eq!(s.run(64), RxStop::Drained);
    assert_eq!(s.drv.used_idx(), 1);
    assert_eq!(
        read(&mem, DATA_BASE + VNET_HDR_LEN as u64, good.len()),
        good
    );
    assert_eq!((s.stats.rx_frames, s.stats.rx_dropped), (1, 3));
}

#[test]
fn receive_is_bounded_per_pass_and_needs_a_ready_queue() {
    let mem = guest_mem();
    let mut s = RxSetup::new(&mem);
    for i in 0..5u8 {
        s.io.incoming.push_back(from_host(&frame(&[i])));
        s.drv
            .add_chain(&[desc(DATA_BASE + u64::from(i) * 0x1000, 2048, true)]);
    }
    assert_eq!(s.run(2), RxStop::Budget);
    assert_eq!(s.drv.used_idx(), 2);
    assert_eq!(s.run(64), RxStop::Drained);
    assert_eq!(s.drv.used_idx(), 5);

    s.queue.set_ready(false);
    s.io.incoming.push_back(from_host(&frame(b"x")));
    assert_eq!(s.run(64), RxStop::QueueUnusable);
    assert_eq!(s.io.incoming.len(), 1, "nothing read for an unusable queue");
}

#[test]
fn a_receive_ring_that_cannot_be_trusted_is_disabled() {
    let mem = guest_mem();
    let mut s = RxSetup::new(&mem);
    s.io.incoming.push_back(from_host(&frame(b"x")));
    s.drv.add_chain(&[desc(DATA_BASE, 2048, true)]);
    // avail.idx 100 entries ahead of a 16-entry ring.
    mem.write_obj(100u16, GuestAddress(s.drv.vq.avail_addr().0 + 2))
        .unwrap();
    assert_eq!(s.run(64), RxStop::QueueUnusable);
    assert!(!s.queue.ready());
    assert_eq!(s.drv.used_idx(), 0);
    // The driver is told to reset the device.
    assert!(s.irq.needs_reset());
}

// The transmit side.

fn send(
    mem: &GuestMemoryMmap,
    io: &mut MemFrames,
    descs: &[virtio_queue::desc::RawDescriptor],
) -> NetStats {
    let mut drv = Driver::new(mem, 16);
    drv.add_chain(descs);
    let mut q = drv.queue();
    let chain = q.pop_descriptor_chain(mem).unwrap();
    let mut stats = NetStats::default();
    assert_eq!(Tx::new().send_chain(mem, chain, io, &mut stats), 0);
    stats
}

#[test]
fn transmitted_frames_reach_the_host_with_an_empty_header() {
    let mem = guest_mem();
    let f = frame(b"from the guest");
    // A header the driver should not send (NEEDS_CSUM with offsets) must not reach the TAP.
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[0] = 1;
    hdr[6] = 34;
    hdr[8] = 16;
    mem.write_slice(&hdr, GuestAddress(DATA_BASE)).unwrap();
    mem.write_slice(&f, GuestAddress(DATA_BASE + 0x100))
        .unwrap();
    let mut io = MemFrames::default();
    let stats = send(
        &mem,
        &mut io,
        &[
            desc(DATA_BASE, VNET_HDR_LEN as u32, false),
            desc(DATA_BASE + 0x100, f.len() as u32, false),
        ],
    );
    assert_eq!(stats.tx_frames, 1);
    assert_eq!(io.sent, vec![from_host(&f)]);
    // Header and frame in one descriptor work the same.
    mem.write_slice(&from_host(&f), GuestAddress(DATA_BASE + 0x1000))
        .unwrap();
    let n = (VNET_HDR_LEN + f.len()) as u32;
    send(&mem, &mut io, &[desc(DATA_BASE + 0x1000, n, false)]);
    assert_eq!(io.sent[1], from_host(&f));
}

#[test]
fn malformed_transmit_chains_are_dropped() {
    let mem = guest_mem();
    let mut io = MemFrames::default();
    let short = (VNET_HDR_LEN + ETH_HLEN - 1) as u32;
    let long = (VNET_HDR_LEN + MAX_FRAME_LEN + 1) as u32;
    for descs in [
        vec![desc(DATA_BASE, short, false)],
        vec![desc(DATA_BASE, long, false)],
        vec![desc(MEM_SIZE as u64 - 16, 64, false)],
        vec![desc(u64::MAX - 8, 64, false)],
        // Only writable descriptors: nothing to send.
        vec![desc(DATA_BASE, 64, true)],
    ] {
        let stats = send(&mem, &mut io, &descs);
        assert_eq!((stats.tx_frames, stats.tx_dropped), (0, 1), "{descs:?}");
    }
    assert!(io.sent.is_empty());
    // A host that takes nothing: dropped, not retried.
    io.full = true;
    mem.write_slice(&from_host(&frame(b"x")), GuestAddress(DATA_BASE))
        .unwrap();
    let stats = send(&mem, &mut io, &[desc(DATA_BASE, 72, false)]);
    assert_eq!(stats.tx_dropped, 1);
}

#[test]
fn a_restore_refuses_a_bad_tap_name_before_touching_the_host() {
    let state = NetState {
        id: "net0".into(),
        tap: "../../etc".into(),
        mac: "06:00:ac:10:00:02".parse().unwrap(),
        acked_features: 0,
    };
    assert!(matches!(
        Net::restore((), &state),
        Err(NetRestoreError::TapName { .. })
    ));
}

// The real device on a real TAP.

/// Runs `f` on a thread of its own in a new, empty network namespace (discarded with the
/// thread, and everything in it with it).
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun (the tun module)"
    );
    std::thread::spawn(move || {
        // SAFETY: unshare takes flags and moves only this thread into a new namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "this test needs root (CAP_NET_ADMIN) to create a network namespace: {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// `ip ARGS` in this thread's network namespace.
fn ip(args: &str) {
    let status = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("run ip (iproute2)");
    assert!(status.success(), "ip {args} failed");
}

/// A raw packet socket on one interface: sends frames out of it and sees every frame it
/// receives or sends.
struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    fn bind(ifname: &str) -> Self {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket takes plain arguments and returns a new descriptor or -1.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the descriptor was just created and nothing else owns it.
        let sock = Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: if_nametoindex reads the NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: bind reads `addr`, whose size is passed, during the call.
        let rc = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        sock
    }

    fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: send reads `frame` during the call.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to two seconds for a frame of our ethertype that contains `marker`.
    fn expect(&self, marker: &[u8]) -> Vec<u8> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: recv writes at most `buf.len()` bytes into `buf` during the call.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                let f = &buf[..n as usize];
                if f.get(12..14) == Some(&ETHERTYPE[..])
                    && f.windows(marker.len()).any(|w| w == marker)
                {
                    return f.to_vec();
                }
                continue;
            }
            assert!(
                Instant::now() < deadline,
                "no frame with {marker:?} on the TAP"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The net device on `tap0` (up, IPv6 off so the kernel sends nothing by itself), activated
/// on an event loop with its receive queue at 0 and its transmit queue at 0x4000.
struct Rig {
    mem: GuestMemoryMmap,
    net: Arc<Mutex<Net>>,
    em: EventManager<Arc<Mutex<Net>>>,
    irq: Arc<IrqTrigger>,
}

const MAC: [u8; 6] = [6, 0, 0xac, 0x10, 0, 2];

impl Rig {
    fn new() -> Self {
        std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1").unwrap();
        let net = Net::new(NetDeviceConfig {
            tap: "tap0".into(),
            mac: MacAddr(MAC),
            id: "net0".into(),
        })
        .expect("open a TAP (needs root)");
        ip("link set dev tap0 up");
        let mem = guest_mem();
        let net = Arc::new(Mutex::new(net));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(net.clone());
        Self {
            mem,
            net,
            em,
            irq: Arc::new(IrqTrigger::new().unwrap()),
        }
    }

    fn activate(&mut self, rx: &Driver, tx: &Driver) {
        let mut net = self.net.lock().unwrap();
        net.set_acked_features(VIRTIO_F_VERSION_1 | (1 << 5));
        net.activate(ActivateContext {
            mem: self.mem.clone(),
            queues: vec![rx.queue(), tx.queue()],
            interrupt: self.irq.clone(),
        })
        .unwrap();
    }

    /// Runs the event loop until `done` or two seconds have passed.
    fn run_until(&mut self, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !done() {
            assert!(Instant::now() < deadline, "timed out");
            self.em.run_with_timeout(10).unwrap();
        }
    }
}

#[test]
fn frames_cross_a_real_tap_both_ways_and_wait_for_buffers() {
    in_fresh_netns(|| {
        let mut rig = Rig::new();
        let mem = rig.mem.clone();
        {
            let net = rig.net.lock().unwrap();
            assert_eq!(net.device_type(), TYPE_NET);
            assert_eq!(net.tap_name(), "tap0");
            let mut cfg = [0u8; 8];
            net.read_config(0, &mut cfg);
            assert_eq!(cfg[..6], MAC);
            assert_eq!(cfg[6..], [0, 0]);
        }
        let sock = PacketSocket::bind("tap0");
        let mut rx = Driver::at(&mem, 0, 16);
        let mut tx = Driver::at(&mem, 0x4000, 16);
        rx.add_chain(&[desc(DATA_BASE, 2048, true)]);
        rig.activate(&rx, &tx);
        rig.em.run_with_timeout(10).unwrap();

        // Host to guest.
        let down = frame(b"hello from the host");
        sock.send(&down);
        rig.run_until(|| rx.used_idx() == 1);
        assert_eq!(rx.used(0), (0, (VNET_HDR_LEN + down.len()) as u32));
        assert_eq!(read(&mem, DATA_BASE, VNET_HDR_LEN), rx_header());
        assert_eq!(
            read(&mem, DATA_BASE + VNET_HDR_LEN as u64, down.len()),
            down
        );
        assert_eq!(rig.irq.status() & INT_VRING, INT_VRING);

        // Guest to host.
        let up = frame(b"hello from the guest");
        mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(DATA_BASE + 0x8000))
            .unwrap();
        mem.write_slice(&up, GuestAddress(DATA_BASE + 0x8100))
            .unwrap();
        tx.add_chain(&[
            desc(DATA_BASE + 0x8000, VNET_HDR_LEN as u32, false),
            desc(DATA_BASE + 0x8100, up.len() as u32, false),
        ]);
        rig.net.lock().unwrap().queue_events()[TX_QUEUE]
            .write(1)
            .unwrap();
        rig.run_until(|| tx.used_idx() == 1);
        assert_eq!(sock.expect(b"hello from the guest"), up);

        // No receive buffer: the frame waits in the device, then lands once one is posted.
        let waiting = frame(b"waits for a buffer");
        sock.send(&waiting);
        let wait_until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < wait_until {
            rig.em.run_with_timeout(10).unwrap();
        }
        assert_eq!(rx.used_idx(), 1);
        rx.add_chain(&[desc(DATA_BASE + 0x1000, 2048, true)]);
        rig.net.lock().unwrap().queue_events()[RX_QUEUE]
            .write(1)
            .unwrap();
        rig.run_until(|| rx.used_idx() == 2);
        let got = read(
            &mem,
            DATA_BASE + 0x1000 + VNET_HDR_LEN as u64,
            waiting.len(),
        );
        assert_eq!(got, waiting);
        let stats = rig.net.lock().unwrap().stats();
        assert_eq!((stats.rx_frames, stats.tx_frames), (2, 1));
        assert_eq!((stats.rx_dropped, stats.tx_dropped), (0, 0));
    });
}

/// Frames both ways on a real TAP with the event loop's seccomp filter on the thread that
/// runs the device, as in a running VMM (set-up and activation come before, as there). A
/// call the filter lacks ends the whole test process with exit code 148 and a line naming
/// it.
#[test]
fn the_event_loop_filter_allows_everything_the_device_does() {
    in_fresh_netns(|| {
        let mut rig = Rig::new();
        let mem = rig.mem.clone();
        let sock = PacketSocket::bind("tap0");
        let mut rx = Driver::at(&mem, 0, 16);
        let mut tx = Driver::at(&mem, 0x4000, 16);
        rx.add_chain(&[desc(DATA_BASE, 2048, true)]);
        rig.activate(&rx, &tx);
        crate::seccomp::apply(crate::seccomp::ThreadKind::EventLoop).unwrap();
        rig.em.run_with_timeout(10).unwrap();

        let down = frame(b"down under seccomp");
        sock.send(&down);
        rig.run_until(|| rx.used_idx() == 1);
        assert_eq!(
            read(&mem, DATA_BASE + VNET_HDR_LEN as u64, down.len()),
            down
        );

        let up = frame(b"up under seccomp");
        mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(DATA_BASE + 0x8000))
            .unwrap();
        mem.write_slice(&up, GuestAddress(DATA_BASE + 0x8100))
            .unwrap();
        tx.add_chain(&[
            desc(DATA_BASE + 0x8000, VNET_HDR_LEN as u32, false),
            desc(DATA_BASE + 0x8100, up.len() as u32, false),
        ]);
        rig.net.lock().unwrap().queue_events()[TX_QUEUE]
            .write(1)
            .unwrap();
        rig.run_until(|| tx.used_idx() == 1);
        // Read the frame back without sleeping (the filter has no sleep): the loop's own
        // epoll timeout paces the polling.
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; 65536];
        let mut seen = false;
        rig.run_until(|| {
            // SAFETY: recv writes at most `buf.len()` bytes into `buf` during the call.
            let n =
                unsafe { libc::recv(sock.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            seen |= n > 0 && buf[..n as usize] == up[..];
            seen
        });
        let stats = rig.net.lock().unwrap().stats();
        assert_eq!((stats.rx_frames, stats.tx_frames), (1, 1));
    });
}

#[test]
fn a_paused_device_moves_no_frames() {
    in_fresh_netns(|| {
        let mut rig = Rig::new();
        let mem = rig.mem.clone();
        let gate = crate::devices::virtio::device_state::PauseGate::default();
        rig.net.lock().unwrap().set_pause_gate(gate.clone());
        let sock = PacketSocket::bind("tap0");
        let mut rx = Driver::at(&mem, 0, 16);
        let tx = Driver::at(&mem, 0x4000, 16);
        rx.add_chain(&[desc(DATA_BASE, 2048, true)]);
        rig.activate(&rx, &tx);
        let f = frame(b"while paused");
        sock.send(&f);
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            rig.em.run_with_timeout(10).unwrap();
        }
        assert_eq!(rx.used_idx(), 0, "a paused VM's memory is not touched");
        // Resume opens the gate and kicks every queue, as the runtime does.
        gate.set_closed(false);
        for evt in rig.net.lock().unwrap().queue_events() {
            evt.write(1).unwrap();
        }
        rig.run_until(|| rx.used_idx() == 1);
        assert_eq!(read(&mem, DATA_BASE + VNET_HDR_LEN as u64, f.len()), f);
    });
}

#[test]
fn a_restore_reopens_the_tap_by_name() {
    in_fresh_netns(|| {
        let mut net = Net::new(NetDeviceConfig {
            tap: "tap0".into(),
            mac: MacAddr(MAC),
            id: "net0".into(),
        })
        .expect("open a TAP (needs root)");
        net.set_acked_features(net.avail_features());
        let saved = net.save();
        let json = serde_json::to_string(&saved).unwrap();
        let decoded: NetState = serde_json::from_str(&json).unwrap();
        assert_eq!(decoded, saved);
        // A single-queue TAP has one owner: the original lets go first, as a VMM that
        // exits does.
        drop(net);
        let restored = Net::restore((), &decoded).unwrap();
        assert_eq!(restored.save(), saved);
        // --net-override: the same device on another TAP.
        let restored = Arc::new(Mutex::new(restored));
        let transport = MmioTransport::new(guest_mem(), restored.clone()).unwrap();
        let mut state = DevicesState {
            serial: None,
            i8042: None,
            boot_port: None,
            virtio: vec![VirtioDeviceState {
                kind: VirtioKindState::Net(decoded.clone()),
                transport: transport.save(),
                mmio_base: 0,
                irq: 0,
            }],
            vmgenid: None,
        };
        let overrides = [("net0".to_string(), "tap1".to_string())];
        apply_net_overrides(&mut state, &overrides).unwrap();
        let VirtioKindState::Net(moved) = &state.virtio[0].kind else {
            unreachable!("a net device was put there")
        };
        let other = Net::restore((), moved).unwrap();
        assert_eq!((other.tap_name(), other.mac()), ("tap1", MacAddr(MAC)));
        let unknown = [("net9".to_string(), "tap1".to_string())];
        assert!(matches!(
            apply_net_overrides(&mut state, &unknown),
            Err(DevicesRestoreError::UnknownNet(_))
        ));
        // Features the device never offered are refused.
        drop((transport, restored, other));
        let mut bad = decoded.clone();
        bad.acked_features |= 1 << 0; // VIRTIO_NET_F_CSUM
        assert!(matches!(
            Net::restore((), &bad),
            Err(NetRestoreError::Features(_))
        ));
    });
}
