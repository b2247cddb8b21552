//! vsock tests. The guest is played through mock queues (headers and data written and read
//! the way Linux's virtio_transport lays them out), the host through real Unix sockets in a
//! temporary directory, and the device runs on an event manager as in the VMM.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::handler::Header;
use super::proto::*;
use super::*;
use crate::config::VsockConfig;
use crate::devices::virtio::device_state::PauseGate;
use crate::devices::virtio::test_utils::{desc, guest_mem, Driver, MEM_SIZE};
use crate::devices::virtio::{
    ActivateContext, IrqTrigger, VirtioDevice, INT_VRING, TYPE_VSOCK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::snapshot::Persist;
use crate::vstate::memory::GuestMemoryMmap;

const CID: u32 = 3;
/// The receive buffer the test guest advertises.
const GUEST_BUF: u32 = 64 * 1024;
/// Receive buffers are allocated upwards from here, transmit buffers cycle above.
const RX_AREA: u64 = 0x1_0000;
const TX_AREA: u64 = 0x8_0000;
const TX_AREA_END: u64 = MEM_SIZE as u64;
/// Used rings of the three queues, one page each. (The mock queue puts its used ring half
/// way into its available ring, which a test with more than size/2 chains would overwrite.)
const USED_RINGS: u64 = 0x6000;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("gv-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("v.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(path: &Path) -> VsockConfig {
    VsockConfig {
        guest_cid: CID,
        uds_path: path.to_path_buf(),
    }
}

fn to_bytes(h: &Header) -> [u8; 44] {
    let mut b = [0u8; 44];
    b[0..8].copy_from_slice(&h.src_cid.to_le_bytes());
    b[8..16].copy_from_slice(&h.dst_cid.to_le_bytes());
    b[16..20].copy_from_slice(&h.src_port.to_le_bytes());
    b[20..24].copy_from_slice(&h.dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&h.len.to_le_bytes());
    b[28..30].copy_from_slice(&h.type_.to_le_bytes());
    b[30..32].copy_from_slice(&h.op.to_le_bytes());
    b[32..36].copy_from_slice(&h.flags.to_le_bytes());
    b[36..40].copy_from_slice(&h.buf_alloc.to_le_bytes());
    b[40..44].copy_from_slice(&h.fwd_cnt.to_le_bytes());
    b
}

/// A packet from the guest (port `src`) to the host (port `dst`).
fn pkt(op: u16, src: u32, dst: u32) -> Header {
    Header {
        src_cid: u64::from(CID),
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        type_: TYPE_STREAM,
        op,
        buf_alloc: GUEST_BUF,
        ..Header::default()
    }
}

/// The guest side: the three queues in mock memory, the device on its event loop.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: Driver<'a>,
    tx: Driver<'a>,
    ev: Driver<'a>,
    /// Receive chain head -> (header address, data address).
    rx_bufs: HashMap<u16, (u64, u64)>,
    rx_seen: u16,
    ev_bufs: HashMap<u16, u64>,
    ev_seen: u16,
    rx_next: u64,
    tx_next: u64,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager<Arc<Mutex<Vsock>>>,
    irq: Arc<IrqTrigger>,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap, path: &Path) -> Self {
        Self::with_device(mem, Vsock::new(&config(path)).unwrap())
    }

    /// Activates `dev` as a driver would (acking VERSION_1).
    fn with_device(mem: &'a GuestMemoryMmap, mut dev: Vsock) -> Self {
        let (rx, tx, ev) = (
            Driver::at(mem, 0x0, QUEUE_SIZE),
            Driver::at(mem, 0x2000, QUEUE_SIZE),
            Driver::at(mem, 0x4000, QUEUE_SIZE),
        );
        let irq = Arc::new(IrqTrigger::new().unwrap());
        if dev.acked_features() == 0 {
            dev.set_acked_features(VIRTIO_F_VERSION_1);
        }
        let mut queues = vec![rx.queue(), tx.queue(), ev.queue()];
        for (i, q) in queues.iter_mut().enumerate() {
            q.set_used_ring_address(Some((USED_RINGS + 0x1000 * i as u64) as u32), Some(0));
        }
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues,
            interrupt: irq.clone(),
        })
        .unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut g = Self {
            mem,
            rx,
            tx,
            ev,
            rx_bufs: HashMap::new(),
            rx_seen: 0,
            ev_bufs: HashMap::new(),
            ev_seen: 0,
            rx_next: RX_AREA,
            tx_next: TX_AREA,
            dev,
            em,
            irq,
        };
        g.run();
        g
    }

    /// Runs the event loop until nothing is ready.
    fn run(&mut self) {
        for _ in 0..1000 {
            if self.em.run_with_timeout(5).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle");
    }

    /// Used entries the device published on `queue`.
    fn used_idx(&self, queue: usize) -> u16 {
        let addr = USED_RINGS + 0x1000 * queue as u64 + 2;
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Used entry `i` of `queue`: (chain head, used length).
    fn used(&self, queue: usize, i: u16) -> (u16, u32) {
        let addr = USED_RINGS + 0x1000 * queue as u64 + 4 + 8 * u64::from(i);
        let id: u32 = self.mem.read_obj(GuestAddress(addr)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(addr + 4)).unwrap();
        (id as u16, len)
    }

    fn kick(&mut self, queue: usize) {
        self.dev.lock().unwrap().queue_events()[queue]
            .write(1)
            .unwrap();
        self.run();
    }

    fn rx_alloc(&mut self, len: u64) -> u64 {
        let addr = self.rx_next;
        self.rx_next += len.next_multiple_of(16);
        assert!(self.rx_next <= TX_AREA, "test receive area exhausted");
        addr
    }

    /// `n` receive buffers as Linux 6.1 posts them: header and data in two descriptors.
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let hdr = self.rx_alloc(44);
            let data = self.rx_alloc(4096);
            let head = self
                .rx
                .add_chain(&[desc(hdr, 44, true), desc(data, 4096, true)]);
            self.rx_bufs.insert(head, (hdr, data));
        }
        self.kick(RX_QUEUE);
    }

    /// `n` receive buffers as Linux 6.2+ posts them: one descriptor, header then `data` bytes.
    fn post_rx_single(&mut self, n: usize, data: u32) {
        for _ in 0..n {
            let hdr = self.rx_alloc(44 + u64::from(data));
            let head = self.rx.add_chain(&[desc(hdr, 44 + data, true)]);
            self.rx_bufs.insert(head, (hdr, hdr + 44));
        }
        self.kick(RX_QUEUE);
    }

    fn tx_alloc(&mut self, len: u64) -> u64 {
        if self.tx_next + len > TX_AREA_END {
            self.tx_next = TX_AREA;
        }
        let addr = self.tx_next;
        self.tx_next += len.next_multiple_of(16);
        addr
    }

    /// Sends a packet as Linux 6.1 does: header and data in separate descriptors.
    fn send(&mut self, mut h: Header, data: &[u8]) {
        h.len = data.len() as u32;
        let hdr = self.tx_alloc(44);
        self.mem
            .write_slice(&to_bytes(&h), GuestAddress(hdr))
            .unwrap();
        if data.is_empty() {
            self.tx.add_chain(&[desc(hdr, 44, false)]);
        } else {
            let buf = self.tx_alloc(data.len() as u64);
            self.mem.write_slice(data, GuestAddress(buf)).unwrap();
            self.tx
                .add_chain(&[desc(hdr, 44, false), desc(buf, data.len() as u32, false)]);
        }
        self.kick(TX_QUEUE);
    }

    /// Sends a packet as Linux 6.2+ does: header and data in one descriptor.
    fn send_single(&mut self, mut h: Header, data: &[u8]) {
        h.len = data.len() as u32;
        let addr = self.tx_alloc(44 + data.len() as u64);
        self.mem
            .write_slice(&to_bytes(&h), GuestAddress(addr))
            .unwrap();
        self.mem.write_slice(data, GuestAddress(addr + 44)).unwrap();
        self.tx
            .add_chain(&[desc(addr, 44 + data.len() as u32, false)]);
        self.kick(TX_QUEUE);
    }

    /// Sends raw descriptors on the transmit queue.
    fn send_raw(&mut self, descs: &[virtio_queue::desc::RawDescriptor]) {
        self.tx.add_chain(descs);
        self.kick(TX_QUEUE);
    }

    /// The next packet the device put into a receive buffer.
    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        if self.used_idx(RX_QUEUE) == self.rx_seen {
            return None;
        }
        let (head, len) = self.used(RX_QUEUE, self.rx_seen);
        self.rx_seen += 1;
        let (hdr_addr, data_addr) = self.rx_bufs[&head];
        let mut raw = [0u8; 44];
        self.mem
            .read_slice(&mut raw, GuestAddress(hdr_addr))
            .unwrap();
        let hdr = Header::from_bytes(&raw);
        assert_eq!(len, 44 + hdr.len, "used length = header + payload");
        let mut data = vec![0u8; hdr.len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(data_addr))
            .unwrap();
        Some((hdr, data))
    }

    fn recv_all(&mut self) -> Vec<(Header, Vec<u8>)> {
        std::iter::from_fn(|| self.recv()).collect()
    }

    fn expect(&mut self, op: u16) -> (Header, Vec<u8>) {
        match self.recv() {
            Some((h, d)) if h.op == op => (h, d),
            other => panic!("expected op {op}, got {other:?}"),
        }
    }

    /// Connects guest port `src` to host port `port` (someone listens on `listener`).
    fn connect(&mut self, src: u32, port: u32, listener: &UnixListener) -> UnixStream {
        self.send(pkt(OP_REQUEST, src, port), &[]);
        let (h, _) = self.expect(OP_RESPONSE);
        assert_eq!(
            (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (HOST_CID, u64::from(CID), port, src)
        );
        assert_eq!(
            (h.type_, h.buf_alloc, h.fwd_cnt),
            (TYPE_STREAM, CONN_BUF_SIZE, 0)
        );
        let (stream, _) = listener.accept().unwrap();
        stream
    }

    fn post_event_buffer(&mut self) {
        let addr = self.rx_alloc(8);
        let head = self.ev.add_chain(&[desc(addr, 8, true)]);
        self.ev_bufs.insert(head, addr);
    }

    /// Events the device delivered since the last call: (id, used length).
    fn events(&mut self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        while self.used_idx(EVENT_QUEUE) != self.ev_seen {
            let (head, len) = self.used(EVENT_QUEUE, self.ev_seen);
            self.ev_seen += 1;
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(self.ev_bufs[&head]))
                .unwrap();
            out.push((id, len));
        }
        out
    }

    /// Runs the deadline check as the timer does, as of `now`.
    fn expire(&mut self, now: Instant) {
        self.dev.lock().unwrap().expire(now);
        self.kick(RX_QUEUE);
    }

    fn connections(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }
}

/// Reads exactly `n` bytes from a blocking host stream.
fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// Whether the host stream is at end of file (nothing more will come).
fn at_eof(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        // Closed with bytes it never read.
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn port_listener(dir: &TempDir, port: u32) -> UnixListener {
    UnixListener::bind(unix::port_path(&dir.sock(), port)).unwrap()
}

#[test]
fn device_identity_features_and_config() {
    let dir = TempDir::new("id");
    let dev = Vsock::new(&config(&dir.sock())).unwrap();
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(dev.queue_max_sizes(), [QUEUE_SIZE; 3]);
    assert_eq!(dev.queue_events().len(), 3);
    assert_eq!(
        dev.avail_features(),
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    );
    assert_eq!(dev.avail_features() & F_SEQPACKET, 0);
    let mut cfg = [0xffu8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), u64::from(CID));
    let mut hi = [0xffu8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    // The socket only its user can reach.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.sock()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn bad_cids_and_socket_paths_are_refused() {
    let dir = TempDir::new("bad");
    for cid in [0, 1, 2, u32::MAX] {
        let e = Vsock::new(&VsockConfig {
            guest_cid: cid,
            uds_path: dir.sock(),
        })
        .err()
        .expect("reserved CID");
        assert!(matches!(e, VsockError::Config(_)), "{e}");
    }
    let file = dir.0.join("file");
    std::fs::write(&file, b"x").unwrap();
    let e = Vsock::new(&config(&file)).err().expect("a regular file");
    assert!(matches!(e, VsockError::NotASocket(_)), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"x", "left alone");

    // A live socket is not taken over; a stale one is replaced; the file goes with the device.
    let first = Vsock::new(&config(&dir.sock())).unwrap();
    let e = Vsock::new(&config(&dir.sock())).err().expect("in use");
    assert!(matches!(e, VsockError::InUse(_)), "{e}");
    drop(first);
    assert!(!dir.sock().exists());
    drop(UnixListener::bind(dir.sock()).unwrap());
    assert!(dir.sock().exists(), "a stale socket file");
    let _second = Vsock::new(&config(&dir.sock())).unwrap();
}

#[test]
fn guest_connects_and_data_flows_both_ways() {
    let dir = TempDir::new("flow");
    let listener = port_listener(&dir, 1234);
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(8);
    let mut host = g.connect(5000, 1234, &listener);
    assert_eq!(g.connections(), 1);

    g.send(pkt(OP_RW, 5000, 1234), b"hello host");
    assert_eq!(read_n(&mut host, 10), b"hello host");

    host.write_all(b"hello guest").unwrap();
    g.run();
    let (h, data) = g.expect(OP_RW);
    assert_eq!(data, b"hello guest");
    assert_eq!(
        (h.src_port, h.dst_port, h.dst_cid),
        (1234, 5000, u64::from(CID))
    );
    assert_eq!(h.fwd_cnt, 10, "the device forwarded the guest's 10 bytes");
    assert_eq!(g.irq.status() & INT_VRING, INT_VRING);
    assert!(g.recv().is_none());

    // Two connections from the same guest port to different host ports stay apart.
    let other = port_listener(&dir, 99);
    let mut host2 = g.connect(5000, 99, &other);
    g.send(pkt(OP_RW, 5000, 99), b"two");
    g.send(pkt(OP_RW, 5000, 1234), b"one");
    assert_eq!(read_n(&mut host2, 3), b"two");
    assert_eq!(read_n(&mut host, 3), b"one");
}

#[test]
fn single_descriptor_packets_work() {
    let dir = TempDir::new("single");
    let listener = port_listener(&dir, 7);
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx_single(4, 4096);
    g.send_single(pkt(OP_REQUEST, 40, 7), &[]);
    g.expect(OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    g.send_single(pkt(OP_RW, 40, 7), b"abc");
    assert_eq!(read_n(&mut host, 3), b"abc");
    host.write_all(&[7u8; 5000]).unwrap();
    g.run();
    // 5000 bytes do not fit one 4096-byte buffer: two packets, in order.
    let (_, a) = g.expect(OP_RW);
    let (_, b) = g.expect(OP_RW);
    assert_eq!((a.len(), b.len()), (4096, 904));
}

#[test]
fn guest_connection_to_a_port_nobody_listens_on_is_reset() {
    let dir = TempDir::new("nolisten");
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(2);
    g.send(pkt(OP_REQUEST, 6000, 4321), &[]);
    let (h, _) = g.expect(OP_RST);
    assert_eq!((h.src_port, h.dst_port, h.src_cid), (4321, 6000, HOST_CID));
    assert_eq!(g.connections(), 0);
    // Data for a connection that does not exist is reset too; a RST is never answered.
    g.send(pkt(OP_RW, 6000, 4321), b"x");
    g.expect(OP_RST);
    g.send(pkt(OP_RST, 6000, 4321), &[]);
    assert!(g.recv().is_none());
}

/// A host client that connected and asked for guest port `port`; returns it and the REQUEST.
fn host_connect(g: &mut Guest, path: &Path, port: u32) -> (UnixStream, Header) {
    let mut client = UnixStream::connect(path).unwrap();
    client
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    g.run();
    let (req, _) = g.expect(OP_REQUEST);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, u64::from(CID), port)
    );
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    (client, req)
}

#[test]
fn host_connects_through_the_handshake() {
    let dir = TempDir::new("hostconn");
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(8);
    let (mut client, req) = host_connect(&mut g, &dir.sock(), 52);
    // The guest's listener accepts.
    g.send(pkt(OP_RESPONSE, 52, req.src_port), &[]);
    let ok = format!("OK {}\n", req.src_port);
    assert_eq!(read_n(&mut client, ok.len()), ok.as_bytes());

    client.write_all(b"ping").unwrap();
    g.run();
    let (h, data) = g.expect(OP_RW);
    assert_eq!((data.as_slice(), h.dst_port), (&b"ping"[..], 52));
    g.send(pkt(OP_RW, 52, req.src_port), b"pong");
    assert_eq!(read_n(&mut client, 4), b"pong");

    // A second client gets another local port.
    let (_c2, req2) = host_connect(&mut g, &dir.sock(), 52);
    assert_ne!(req2.src_port, req.src_port);
}

#[test]
fn host_connection_refused_or_unanswered_closes_the_client() {
    let dir = TempDir::new("refused");
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(8);
    let (mut client, req) = host_connect(&mut g, &dir.sock(), 80);
    g.send(pkt(OP_RST, 80, req.src_port), &[]);
    assert!(at_eof(&mut client));
    assert_eq!(g.connections(), 0);

    let (mut client, req) = host_connect(&mut g, &dir.sock(), 81);
    g.expire(Instant::now());
    assert_eq!(g.connections(), 1, "not late yet");
    g.expire(Instant::now() + CONNECT_TIMEOUT * 2);
    assert!(at_eof(&mut client));
    // The guest is told to forget the connection, in case its RESPONSE is on the way.
    let (h, _) = g.expect(OP_RST);
    assert_eq!((h.src_port, h.dst_port), (req.src_port, 81));
    // A late RESPONSE is reset.
    g.send(pkt(OP_RESPONSE, 81, req.src_port), &[]);
    g.expect(OP_RST);
}

#[test]
fn connect_lines_partial_garbage_overlong_and_silent() {
    assert_eq!(parse_connect(b"CONNECT 1234"), Ok(1234));
    assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Ok(u32::MAX));
    for bad in [
        &b"CONNECT 4294967296"[..],
        b"CONNECT",
        b"CONNECT ",
        b"CONNECT -1",
        b"CONNECT +1",
        b"CONNECT 1 2",
        b"connect 1",
        b"CONNECT\t1",
        b"HELLO 1",
        b"",
        b"CONNECT \xff",
    ] {
        assert!(parse_connect(bad).is_err(), "{bad:?}");
    }

    let dir = TempDir::new("lines");
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(8);
    // A line in pieces; bytes after the newline are data for the guest.
    let mut client = UnixStream::connect(dir.sock()).unwrap();
    client.write_all(b"CONN").unwrap();
    g.run();
    assert!(g.recv().is_none());
    client.write_all(b"ECT 9\r\nearly").unwrap();
    g.run();
    let (req, _) = g.expect(OP_REQUEST);
    assert_eq!(req.dst_port, 9);
    g.send(pkt(OP_RESPONSE, 9, req.src_port), &[]);
    let (_, data) = g.expect(OP_RW);
    assert_eq!(data, b"early");

    for line in [
        &b"HELLO 9\n"[..],
        &[b'7'; 200][..],
        b"CONNECT 99999999999\n",
    ] {
        let mut client = UnixStream::connect(dir.sock()).unwrap();
        client.write_all(line).unwrap();
        g.run();
        assert!(at_eof(&mut client), "{line:?}");
    }
    // A client that never sends its line is closed after the timeout.
    let mut silent = UnixStream::connect(dir.sock()).unwrap();
    g.run();
    g.expire(Instant::now() + CONNECT_TIMEOUT * 2);
    assert!(at_eof(&mut silent));
    assert!(g.recv().is_none());
}

#[test]
fn credit_limits_what_goes_to_the_guest() {
    let dir = TempDir::new("credit-rx");
    let listener = port_listener(&dir, 5);
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(16);
    let mut req = pkt(OP_REQUEST, 70, 5);
    req.buf_alloc = 100;
    g.send(req, &[]);
    g.expect(OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[1u8; 250]).unwrap();
    g.run();
    let (_, data) = g.expect(OP_RW);
    assert_eq!(data.len(), 100, "no more than the guest has room for");
    g.expect(OP_CREDIT_REQUEST);
    assert!(g.recv().is_none());

    // The guest consumed 100 bytes.
    let mut upd = pkt(OP_CREDIT_UPDATE, 70, 5);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    g.send(upd, &[]);
    let (_, data) = g.expect(OP_RW);
    assert_eq!(data.len(), 100);
    g.expect(OP_CREDIT_REQUEST);
    upd.fwd_cnt = 200;
    g.send(upd, &[]);
    let (_, data) = g.expect(OP_RW);
    assert_eq!(data.len(), 50);
    assert!(g.recv().is_none());
}

#[test]
fn credit_updates_follow_what_the_host_takes() {
    let dir = TempDir::new("credit-tx");
    let listener = port_listener(&dir, 5);
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(16);
    let mut host = g.connect(70, 5, &listener);
    let chunk = vec![9u8; MAX_PKT_DATA as usize];
    g.send(pkt(OP_RW, 70, 5), &chunk);
    assert!(g.recv().is_none(), "plenty of credit left");
    g.send(pkt(OP_RW, 70, 5), &chunk);
    let (h, _) = g.expect(OP_CREDIT_UPDATE);
    assert_eq!((h.fwd_cnt, h.buf_alloc), (2 * MAX_PKT_DATA, CONN_BUF_SIZE));
    assert_eq!(read_n(&mut host, 2 * MAX_PKT_DATA as usize).len(), 131072);
    // The guest asks, the device answers.
    g.send(pkt(OP_CREDIT_REQUEST, 70, 5), &[]);
    let (h, _) = g.expect(OP_CREDIT_UPDATE);
    assert_eq!(h.fwd_cnt, 2 * MAX_PKT_DATA);
}

#[test]
fn a_guest_ignoring_credit_is_reset() {
    let dir = TempDir::new("credit-bad");
    let listener = port_listener(&dir, 5);
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(16);
    let mut host = g.connect(70, 5, &listener);
    // The host never reads: the socket fills, then the connection's buffer, then it is reset.
    let chunk = vec![3u8; MAX_PKT_DATA as usize];
    let mut sent = 0u64;
    let rst = loop {
        assert!(sent < 100, "never reset");
        g.send(pkt(OP_RW, 70, 5), &chunk);
        sent += 1;
        let packets = g.recv_all();
        if let Some((h, _)) = packets.iter().find(|(h, _)| h.op == OP_RST) {
            break *h;
        }
    };
    assert_eq!((rst.src_port, rst.dst_port), (5, 70));
    assert!(sent * u64::from(MAX_PKT_DATA) > u64::from(CONN_BUF_SIZE));
    assert_eq!(g.connections(), 0);
    // The host gets what its socket took (the connection's buffer is dropped), then the end.
    let mut got = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.read_to_end(&mut got).unwrap();
    assert!(!got.is_empty() && (got.len() as u64) < sent * u64::from(MAX_PKT_DATA));
    assert!(got.iter().all(|&b| b == 3));
}

#[test]
fn shutdown_and_reset_in_both_directions() {
    let dir = TempDir::new("shut");
    let listener = port_listener(&dir, 8);
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(32);

    // The guest stops sending: the host reads the end, and can still send.
    let mut host = g.connect(100, 8, &listener);
    g.send(pkt(OP_RW, 100, 8), b"last");
    let mut shut = pkt(OP_SHUTDOWN, 100, 8);
    shut.flags = SHUTDOWN_SEND;
    g.send(shut, &[]);
    let mut got = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last");
    host.write_all(b"reply").unwrap();
    g.run();
    assert_eq!(g.expect(OP_RW).1, b"reply");
    // Then it closes fully: RST back, socket closed.
    shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    g.send(shut, &[]);
    g.expect(OP_RST);
    assert_eq!(g.connections(), 0);

    // The host closes: the guest gets SHUTDOWN(SEND) after the data.
    let mut host = g.connect(101, 8, &listener);
    host.write_all(b"bye").unwrap();
    drop(host);
    g.run();
    assert_eq!(g.expect(OP_RW).1, b"bye");
    let (h, _) = g.expect(OP_SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_SEND);
    assert_eq!(g.connections(), 1, "the guest may still send");
    // Writing to a closed host socket resets the connection.
    g.send(pkt(OP_RW, 101, 8), b"anyone?");
    g.expect(OP_RST);
    assert_eq!(g.connections(), 0);

    // The guest resets: the host socket closes, nothing is answered.
    let mut host = g.connect(102, 8, &listener);
    g.send(pkt(OP_RST, 102, 8), &[]);
    assert!(at_eof(&mut host));
    assert!(g.recv().is_none());
    assert_eq!(g.connections(), 0);
}

#[test]
fn malformed_packets_are_dropped_or_reset_never_panic() {
    let dir = TempDir::new("malformed");
    let listener = port_listener(&dir, 9);
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(32);
    let hdr_at = |g: &mut Guest, h: Header| {
        let a = g.tx_alloc(44);
        g.mem.write_slice(&to_bytes(&h), GuestAddress(a)).unwrap();
        a
    };

    // Descriptors that are no packet: too short, device-writable, outside guest memory.
    let a = hdr_at(&mut g, pkt(OP_REQUEST, 1, 9));
    g.send_raw(&[desc(a, 20, false)]);
    g.send_raw(&[desc(a, 44, true)]);
    g.send_raw(&[desc(MEM_SIZE as u64 - 8, 44, false)]);
    g.send_raw(&[desc(u64::MAX - 10, 44, false)]);
    assert!(g.recv().is_none());
    assert_eq!(g.connections(), 0);
    // Wrong source CID: dropped silently. Another destination CID, another socket type, an
    // unknown op: RST, addressed from where the guest sent it.
    let mut h = pkt(OP_REQUEST, 1, 9);
    h.src_cid = 4;
    g.send(h, &[]);
    assert!(g.recv().is_none());
    let mut h = pkt(OP_REQUEST, 1, 9);
    h.dst_cid = 5;
    g.send(h, &[]);
    let (r, _) = g.expect(OP_RST);
    assert_eq!((r.src_cid, r.dst_cid, r.src_port, r.dst_port), (5, 3, 9, 1));
    let mut h = pkt(OP_REQUEST, 1, 9);
    h.type_ = 2;
    g.send(h, &[]);
    g.expect(OP_RST);
    g.send(pkt(99, 1, 9), &[]);
    g.expect(OP_RST);
    assert_eq!(g.connections(), 0);

    // On an open connection, each of these resets it.
    let mut port = 10;
    let mut open = |g: &mut Guest| {
        port += 1;
        let host = g.connect(port, 9, &listener);
        (port, host)
    };
    // A length over the maximum.
    let (p, mut host) = open(&mut g);
    let mut h = pkt(OP_RW, p, 9);
    h.len = MAX_PKT_DATA + 1;
    let a = hdr_at(&mut g, h);
    let big = g.tx_alloc(u64::from(MAX_PKT_DATA) + 1);
    g.send_raw(&[desc(a, 44, false), desc(big, MAX_PKT_DATA + 1, false)]);
    g.expect(OP_RST);
    assert!(at_eof(&mut host));
    // A length beyond the data descriptor.
    let (p, mut host) = open(&mut g);
    let mut h = pkt(OP_RW, p, 9);
    h.len = 100;
    let a = hdr_at(&mut g, h);
    g.send_raw(&[desc(a, 44, false), desc(a, 50, false)]);
    g.expect(OP_RST);
    assert!(at_eof(&mut host));
    // Data outside guest memory.
    let (p, mut host) = open(&mut g);
    let mut h = pkt(OP_RW, p, 9);
    h.len = 100;
    let a = hdr_at(&mut g, h);
    g.send_raw(&[desc(a, 44, false), desc(MEM_SIZE as u64 - 50, 100, false)]);
    g.expect(OP_RST);
    assert!(at_eof(&mut host));
    // An unknown op, a second REQUEST, a RESPONSE to a guest-initiated connection.
    for op in [99, OP_REQUEST, OP_RESPONSE] {
        let (p, mut host) = open(&mut g);
        g.send(pkt(op, p, 9), &[]);
        g.expect(OP_RST);
        assert!(at_eof(&mut host), "op {op}");
    }
    assert_eq!(g.connections(), 0);
    // Every chain came back.
    assert_eq!(g.used_idx(TX_QUEUE), g.tx.vq.avail().idx().load());
    // Receive buffers that are no receive buffers are returned empty.
    let a = g.rx_alloc(44);
    g.rx.add_chain(&[desc(a, 44, false)]);
    g.kick(RX_QUEUE);
}

#[test]
fn restore_resets_the_transport_once_the_vm_runs_and_listens_again() {
    let dir = TempDir::new("restore");
    let listener = port_listener(&dir, 3);
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(4);
    let _host = g.connect(200, 3, &listener);
    g.dev
        .lock()
        .unwrap()
        .set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    let state = g.dev.lock().unwrap().save();
    let json = serde_json::to_string(&state).unwrap();
    let state: VsockState = serde_json::from_str(&json).unwrap();
    assert_eq!(
        state,
        VsockState {
            guest_cid: CID,
            uds_path: dir.sock(),
            acked_features: VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
        }
    );

    // The source still runs: its socket cannot be taken, a clone listens elsewhere.
    let e = Vsock::restore(VsockRestoreArgs::default(), &state)
        .err()
        .expect("source's socket in use");
    assert!(
        matches!(e, VsockRestoreError::Create(VsockError::InUse(_))),
        "{e}"
    );
    let clone_path = dir.0.join("clone.sock");
    let args = VsockRestoreArgs {
        uds_path_override: Some(clone_path.clone()),
    };
    let mut restored = Vsock::restore(args.clone(), &state).unwrap();
    assert_eq!(restored.acked_features(), state.acked_features);
    assert_eq!(restored.save().uds_path, clone_path);
    // Restored VMs start paused.
    let gate = PauseGate::default();
    restored.set_pause_gate(gate.clone());

    let mem2 = guest_mem();
    let mut c = Guest::with_device(&mem2, restored);
    c.post_rx(4);
    gate.set_closed(false);
    for q in 0..3 {
        c.kick(q);
    }
    assert!(c.events().is_empty(), "no event buffer yet");
    gate.set_closed(true);
    c.post_event_buffer();
    c.post_event_buffer();
    c.kick(EVENT_QUEUE);
    assert!(c.events().is_empty(), "not while paused");
    gate.set_closed(false);
    c.kick(EVENT_QUEUE);
    assert_eq!(c.events(), [(EVENT_TRANSPORT_RESET, 4)]);
    c.kick(EVENT_QUEUE);
    assert!(c.events().is_empty(), "only once");
    // Old connections are gone; the clone's socket serves new ones.
    assert_eq!(c.connections(), 0);
    c.send(pkt(OP_RW, 200, 3), b"old");
    c.expect(OP_RST);
    let (_client, req) = host_connect(&mut c, &clone_path, 77);
    assert_eq!(req.dst_port, 77);
    drop(c);
    assert!(!clone_path.exists(), "the clone's socket goes with it");

    // Restoring the source's own snapshot after it died (leaving its socket file behind)
    // takes the path back.
    drop(g);
    drop(UnixListener::bind(dir.sock()).unwrap());
    let _again = Vsock::restore(VsockRestoreArgs::default(), &state).unwrap();

    // Corrupt states are refused.
    let bad = VsockState {
        guest_cid: 1,
        ..state.clone()
    };
    let e = Vsock::restore(args.clone(), &bad).err().expect("bad CID");
    assert!(
        matches!(e, VsockRestoreError::Create(VsockError::Config(_))),
        "{e}"
    );
    let bad = VsockState {
        acked_features: VIRTIO_F_VERSION_1 | F_SEQPACKET,
        ..state.clone()
    };
    let e = Vsock::restore(args, &bad).err().expect("unoffered feature");
    assert!(matches!(e, VsockRestoreError::Features(_)), "{e}");
    let mut json: serde_json::Value = serde_json::to_value(&state).unwrap();
    json["connections"] = serde_json::json!([]);
    assert!(serde_json::from_value::<VsockState>(json).is_err());
}

#[test]
fn event_buffers_that_cannot_take_the_reset_event_come_back_empty_and_it_waits() {
    let dir = TempDir::new("event-bufs");
    let state = Vsock::new(&config(&dir.sock())).unwrap().save();
    let args = VsockRestoreArgs {
        uds_path_override: Some(dir.0.join("clone.sock")),
    };
    let restored = Vsock::restore(args, &state).unwrap();
    let mem = guest_mem();
    let mut c = Guest::with_device(&mem, restored);
    // Outside guest memory, read-only, too small (a loop is no error here: it only yields
    // a shorter buffer).
    let small = c.rx_alloc(8);
    let readonly = c.rx_alloc(8);
    c.ev.add_chain(&[desc(MEM_SIZE as u64 + 0x1000, 8, true)]);
    c.ev.add_chain(&[desc(readonly, 8, false)]);
    c.ev.add_chain(&[desc(small, 3, true)]);
    c.kick(EVENT_QUEUE);
    let bad: Vec<u32> = (0..3).map(|i| c.used(EVENT_QUEUE, i).1).collect();
    assert_eq!(bad, [0, 0, 0]);
    assert_eq!(c.used_idx(EVENT_QUEUE), 3);
    c.ev_seen = 3;
    // The event went to none of them: the next good buffer gets it, once.
    c.post_event_buffer();
    c.kick(EVENT_QUEUE);
    assert_eq!(c.events(), [(EVENT_TRANSPORT_RESET, 4)]);
    c.post_event_buffer();
    c.kick(EVENT_QUEUE);
    assert!(c.events().is_empty(), "only once");
    assert_eq!(c.mem.read_obj::<u64>(GuestAddress(readonly)).unwrap(), 0);
    assert!(!c.irq.needs_reset());
}

#[test]
fn a_driver_reset_closes_every_connection() {
    let dir = TempDir::new("reset");
    let listener = port_listener(&dir, 3);
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(4);
    let mut host = g.connect(1, 3, &listener);
    let mut client = UnixStream::connect(dir.sock()).unwrap();
    g.run();
    g.dev.lock().unwrap().reset();
    g.run();
    assert!(at_eof(&mut host));
    assert!(at_eof(&mut client));
    assert_eq!(g.connections(), 0);
    assert!(!g.dev.lock().unwrap().is_activated());
}

#[test]
fn nothing_moves_while_paused() {
    let dir = TempDir::new("paused");
    let listener = port_listener(&dir, 3);
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(4);
    let mut host = g.connect(1, 3, &listener);
    let gate = PauseGate::default();
    g.dev.lock().unwrap().set_pause_gate(gate.clone());
    host.write_all(b"while paused").unwrap();
    let mut client = UnixStream::connect(dir.sock()).unwrap();
    client.write_all(b"CONNECT 5\n").unwrap();
    g.run();
    assert!(g.recv().is_none());
    gate.set_closed(false);
    for q in 0..3 {
        g.kick(q);
    }
    let got = g.recv_all();
    let ops: Vec<u16> = got.iter().map(|(h, _)| h.op).collect();
    assert!(ops.contains(&OP_RW) && ops.contains(&OP_REQUEST), "{ops:?}");
}

#[test]
fn connections_are_limited() {
    let dir = TempDir::new("limit");
    let listener = port_listener(&dir, 3);
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx_single(MAX_CONNECTIONS + 2, 16);
    let mut hosts = Vec::new();
    for port in 0..MAX_CONNECTIONS as u32 {
        g.send_single(pkt(OP_REQUEST, 1000 + port, 3), &[]);
        assert_eq!(g.expect(OP_RESPONSE).0.dst_port, 1000 + port);
        hosts.push(listener.accept().unwrap().0);
    }
    assert_eq!(g.connections(), MAX_CONNECTIONS);
    g.send_single(pkt(OP_REQUEST, 5000, 3), &[]);
    assert_eq!(g.expect(OP_RST).0.dst_port, 5000);
    assert_eq!(g.connections(), MAX_CONNECTIONS);
}

/// The device's host side under the event loop's seccomp filter, as in a running VMM: a
/// guest connection with data both ways, a host connection through the handshake, the
/// periodic deadline timer armed, read and disarmed, and the host closing. A call the
/// filter lacks ends the whole test process with exit code 148 and a line naming it.
#[test]
fn the_event_loop_filter_allows_everything_the_device_does() {
    let dir = TempDir::new("seccomp");
    // Set-up (binding sockets) happens before the filter, as in the VMM.
    let listener = port_listener(&dir, 1234);
    let sock = dir.sock();
    let filtered = std::thread::spawn(move || {
        let mem = guest_mem();
        let mut g = Guest::new(&mem, &sock);
        crate::seccomp::apply(crate::seccomp::ThreadKind::EventLoop).unwrap();
        g.post_rx(16);
        // The device has written by the time `send`/`run` return, so the host side reads
        // without blocking (setting a read timeout would be a call the filter refuses).
        let read_now = |s: &mut UnixStream, n: usize| {
            s.set_nonblocking(true).unwrap();
            let mut buf = vec![0u8; n];
            s.read_exact(&mut buf).unwrap();
            buf
        };

        let mut host = g.connect(5000, 1234, &listener);
        g.send(pkt(OP_RW, 5000, 1234), b"to host");
        assert_eq!(read_now(&mut host, 7), b"to host");
        host.write_all(b"to guest").unwrap();
        g.run();
        assert_eq!(g.expect(OP_RW).1, b"to guest");

        // A pending host connection arms the deadline timer.
        let (mut client, req) = host_connect(&mut g, &sock, 52);
        g.send(pkt(OP_RESPONSE, 52, req.src_port), &[]);
        let ok = format!("OK {}\n", req.src_port);
        assert_eq!(read_now(&mut client, ok.len()), ok.as_bytes());
        // No deadline is left: the next tick reads the timer and disarms it.
        let tick = Instant::now();
        while tick.elapsed() < Duration::from_secs(2) {
            g.em.run_with_timeout(50).unwrap();
            if !g.dev.lock().unwrap().timer_armed() {
                break;
            }
        }
        assert!(
            !g.dev.lock().unwrap().timer_armed(),
            "the timer never ticked"
        );

        drop(client);
        drop(host);
        g.run();
        let ops: Vec<u16> = g.recv_all().iter().map(|(h, _)| h.op).collect();
        assert!(ops.contains(&OP_SHUTDOWN), "{ops:?}");
        // The VMM's main thread drops the device (removing its socket), not the loop.
        g.dev.clone()
    });
    let device = filtered.join().unwrap();
    drop(device);
}

#[test]
fn connection_figures_count_the_guests_time_not_the_hosts() {
    let dir = TempDir::new("stats");
    let mem = guest_mem();
    let mut g = Guest::new(&mem, &dir.sock());
    g.post_rx(16);
    let stats = |g: &Guest, port: u32| g.dev.lock().unwrap().connection_stats(port);

    let t_start = Instant::now();
    let (mut client, req) = host_connect(&mut g, &dir.sock(), 52);
    let port = req.src_port;
    let s = stats(&g, port).expect("an open connection has figures");
    assert_eq!((s.host_port, s.guest_port, s.open), (port, 52, true));
    assert_eq!(s.guest_wait, Duration::ZERO, "no answer yet");
    // The guest takes 20 ms to accept.
    std::thread::sleep(Duration::from_millis(20));
    g.send(pkt(OP_RESPONSE, 52, port), &[]);
    let t_response = Instant::now();
    let ok = format!("OK {port}\n");
    assert_eq!(read_n(&mut client, ok.len()), ok.as_bytes());
    // The host takes 40 ms to send its request: not the guest's time.
    std::thread::sleep(Duration::from_millis(40));
    let t_write = Instant::now();
    client.write_all(b"ping").unwrap();
    g.run();
    assert_eq!(g.expect(OP_RW).1, b"ping");
    // The guest answers in two pieces, 15 ms apart, 30 ms in all.
    std::thread::sleep(Duration::from_millis(15));
    g.send(pkt(OP_RW, 52, port), b"po");
    std::thread::sleep(Duration::from_millis(15));
    g.send(pkt(OP_RW, 52, port), b"ng");
    let t_end = Instant::now();
    assert_eq!(read_n(&mut client, 4), b"pong");

    let s = stats(&g, port).unwrap();
    assert!(s.guest_wait >= Duration::from_millis(50), "{s:?}");
    let bound = (t_response - t_start) + (t_end - t_write);
    assert!(s.guest_wait <= bound, "{s:?} beyond {bound:?}");
    assert_eq!((s.packets_to_guest, s.packets_from_guest), (2, 3), "{s:?}");
    assert_eq!((s.bytes_to_guest, s.bytes_from_guest), (4, 4));
    assert!(s.lifetime >= s.guest_wait);

    // The client closes: SHUTDOWN to the guest, whose RST in reply is not an answer; the
    // figures stay available after the close.
    drop(client);
    g.run();
    g.expect(OP_SHUTDOWN);
    std::thread::sleep(Duration::from_millis(30));
    g.send(pkt(OP_RST, 52, port), &[]);
    assert_eq!(g.connections(), 0);
    let closed = stats(&g, port).expect("a closed connection's figures are kept");
    assert!(!closed.open);
    assert_eq!(closed.guest_wait, s.guest_wait);
    assert_eq!((closed.packets_to_guest, closed.packets_from_guest), (3, 4));

    // Unknown ports, and guest-initiated connections, have no figures.
    assert!(stats(&g, port + 1000).is_none());
    let listener = port_listener(&dir, 8);
    let _host = g.connect(100, 8, &listener);
    assert!(stats(&g, 8).is_none());
}
