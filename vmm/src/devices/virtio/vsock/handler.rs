//! The connection table between guest packets and host sockets (Firecracker calls it the
//! muxer): packets from the transmit queue become socket I/O and state changes, and what the
//! connections owe the guest becomes packets in receive buffers.
//!
//! Nothing from the guest is trusted: a packet that does not parse (short or missing
//! descriptors, a length over [`MAX_PKT_DATA`] or beyond its buffer, memory outside guest
//! RAM) is dropped, and resets its connection when its header names one; a packet from
//! another CID is dropped; one for another CID, of another socket type, with an unknown op or
//! out of place in its connection's state is answered with RST (never a RST for a RST).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use log::{debug, warn};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, VolatileSlice};

use super::connection::{owed, ConnError, ConnState, Connection, Read};
use super::proto::*;
use super::stats::{ClosedRing, ConnectionStats};
use super::unix::{connect_nonblocking, port_path, Handshake, HandshakeStep, Listener};
use super::{
    CONNECT_TIMEOUT, FIRST_LOCAL_PORT, HOST_CID, MAX_CONNECTIONS, MAX_HANDSHAKES, MAX_PENDING_RST,
    MAX_PKT_DATA,
};
use crate::devices::virtio::device_state::Chain;
use crate::vstate::memory::GuestMemoryMmap;

/// Clients accepted per wake-up, so a flood of them cannot hold the event loop.
const ACCEPT_BUDGET: usize = 16;
/// How long the listening socket is left alone after accepting failed (out of file
/// descriptors, say): it stays readable, and retrying at once would spin the event loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(500);

/// A connection seen from the host: its port here and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// A packet header, read once (the guest may change its memory meanwhile).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    fn of<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Self {
        Self {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// Decodes the little-endian wire layout (virtio spec 1.2, section 5.10.6).
    pub fn from_bytes(b: &[u8; PKT_HEADER_SIZE]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn write_to<B: BitmapSlice>(&self, pkt: &mut VsockPacket<'_, B>) {
        pkt.set_src_cid(self.src_cid)
            .set_dst_cid(self.dst_cid)
            .set_src_port(self.src_port)
            .set_dst_port(self.dst_port)
            .set_len(self.len)
            .set_type(self.type_)
            .set_op(self.op)
            .set_flags(self.flags)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
    }
}

/// The table of connections and host sockets of one vsock device.
pub(super) struct Handler {
    guest_cid: u64,
    listener: Listener,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Connections that owe the guest a packet, each at most once, in turn.
    rx_queue: VecDeque<ConnKey>,
    /// RSTs owed for packets that have no connection (reply headers, ready to write).
    rst_queue: VecDeque<Header>,
    /// Closed sockets still registered with the event loop: unregistered, then dropped, by
    /// the next [`sync`](Self::sync) (an fd must leave the epoll set before it is closed).
    graveyard: Vec<(UnixStream, EventSet)>,
    next_port: u32,
    /// Accepting failed: the listening socket is not watched until then.
    accept_backoff: Option<Instant>,
    /// The figures of recently closed host-initiated connections.
    closed: ClosedRing,
}

impl Handler {
    pub fn new(guest_cid: u32, listener: Listener) -> Self {
        Self {
            guest_cid: u64::from(guest_cid),
            listener,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            rx_queue: VecDeque::new(),
            rst_queue: VecDeque::new(),
            graveyard: Vec::new(),
            next_port: FIRST_LOCAL_PORT,
            accept_backoff: None,
            closed: ClosedRing::default(),
        }
    }

    pub fn uds_path(&self) -> &Path {
        self.listener.path()
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.listener.as_raw_fd()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The figures of the host-initiated connection with host port `host_port` (the port of
    /// its `OK` line): the open one, else the newest of the recently closed ones.
    pub fn connection_stats(&self, host_port: u32) -> Option<ConnectionStats> {
        let now = Instant::now();
        self.conns
            .iter()
            .find(|(key, conn)| conn.host_initiated && key.local_port == host_port)
            .map(|(key, conn)| conn.meter.stats(key.local_port, key.peer_port, now))
            .or_else(|| self.closed.find(host_port, now))
    }

    /// Whether `fd` is a client or connection socket of this handler.
    pub fn owns(&self, fd: RawFd) -> bool {
        self.by_fd.contains_key(&fd) || self.handshakes.contains_key(&fd)
    }

    /// Serves one transmit chain: one packet from the guest.
    pub fn handle_tx(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) {
        let head = chain.clone();
        let mut chain = chain;
        match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(pkt) => {
                let hdr = Header::of(&pkt);
                self.handle_packet(&hdr, pkt.data_slice());
            }
            Err(e) => {
                debug!("vsock: dropped a malformed packet: {e}");
                self.reset_malformed(mem, head);
            }
        }
    }

    /// A packet that did not parse resets the connection its header names, if any (silently
    /// dropping it would corrupt the stream).
    fn reset_malformed(&mut self, mem: &GuestMemoryMmap, mut head: Chain<'_>) {
        let Some(desc) = head.next() else { return };
        let mut raw = [0u8; PKT_HEADER_SIZE];
        if desc.is_write_only()
            || (desc.len() as usize) < PKT_HEADER_SIZE
            || mem.read_slice(&mut raw, desc.addr()).is_err()
        {
            return;
        }
        let hdr = Header::from_bytes(&raw);
        if hdr.src_cid == self.guest_cid && hdr.dst_cid == HOST_CID {
            let key = ConnKey {
                local_port: hdr.dst_port,
                peer_port: hdr.src_port,
            };
            if self.conns.contains_key(&key) {
                self.kill(key, true);
            }
        }
    }

    fn handle_packet<B: BitmapSlice>(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_, B>>) {
        if hdr.src_cid != self.guest_cid {
            debug!("vsock: dropped a packet from CID {}", hdr.src_cid);
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            self.refuse(hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(hdr, key),
                _ => self.refuse(hdr),
            }
            return;
        };
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        let data_len = match (hdr.op, data) {
            (OP_RW, Some(data)) => u32::try_from(data.len()).unwrap_or(u32::MAX),
            _ => 0,
        };
        conn.meter.received(Instant::now(), hdr.op, data_len);
        let result = match hdr.op {
            OP_RESPONSE => conn.on_response(key.local_port),
            OP_RW => match data {
                Some(data) => conn.on_data(data),
                None => Ok(()),
            },
            OP_SHUTDOWN => conn.on_shutdown(hdr.flags),
            OP_CREDIT_UPDATE => Ok(()),
            OP_CREDIT_REQUEST => {
                conn.pending |= owed::CREDIT_UPDATE;
                Ok(())
            }
            OP_RST => {
                self.kill(key, false);
                return;
            }
            OP_REQUEST => Err(ConnError::Protocol("REQUEST")),
            _ => Err(ConnError::Protocol("unknown op")),
        };
        match result {
            Err(e) => {
                debug!("vsock: resetting {}:{}: {e}", key.local_port, key.peer_port);
                self.kill(key, true);
            }
            Ok(()) if conn.is_done() => self.kill(key, true),
            Ok(()) => self.schedule(key),
        }
    }

    /// Owes the sender of `hdr` a RST, unless it is a RST itself.
    fn refuse(&mut self, hdr: &Header) {
        if hdr.op == OP_RST {
            return;
        }
        if self.rst_queue.len() >= MAX_PENDING_RST {
            debug!("vsock: too many RSTs waiting for receive buffers; one dropped");
            return;
        }
        self.rst_queue.push_back(Header {
            src_cid: hdr.dst_cid,
            dst_cid: hdr.src_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    /// The guest connects to host port `dst_port`: `<uds_path>_<dst_port>`.
    fn guest_connect(&mut self, hdr: &Header, key: ConnKey) {
        if self.conns.len() >= MAX_CONNECTIONS {
            debug!(
                "vsock: connection limit reached; refusing port {}",
                key.local_port
            );
            self.refuse(hdr);
            return;
        }
        let path = port_path(self.listener.path(), key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let mut conn = Connection::guest_initiated(stream);
                conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
                self.insert(key, conn);
            }
            Err(e) => {
                debug!("vsock: guest connection to {}: {e}", path.display());
                self.refuse(hdr);
            }
        }
    }

    fn insert(&mut self, key: ConnKey, conn: Connection) {
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    /// Queues `key` for the receive path if it owes the guest something.
    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if conn.pending != 0 && !conn.queued {
                conn.queued = true;
                self.rx_queue.push_back(key);
            }
        }
    }

    /// Ends a connection: its socket closes (after leaving the event loop), and with `rst`
    /// the guest is told.
    fn kill(&mut self, key: ConnKey, rst: bool) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        conn.meter.close(Instant::now());
        if conn.host_initiated {
            self.closed.push(key.local_port, key.peer_port, conn.meter);
        }
        self.by_fd.remove(&conn.stream.as_raw_fd());
        if conn.queued {
            self.rx_queue.retain(|k| *k != key);
        }
        if rst {
            self.refuse(&Header {
                src_cid: self.guest_cid,
                dst_cid: HOST_CID,
                src_port: key.peer_port,
                dst_port: key.local_port,
                ..Header::default()
            });
        }
        self.graveyard.push((conn.stream, conn.registered));
    }

    /// Drops every connection and waiting client (device reset): the guest forgot them.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.kill(key, false);
        }
        for (_, hs) in self.handshakes.drain() {
            self.graveyard.push((hs.stream, hs.registered));
        }
        self.rst_queue.clear();
        self.accept_backoff = None;
    }

    /// Accepts waiting clients; their `CONNECT` line comes later.
    pub fn accept(&mut self) {
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES {
                        debug!("vsock: too many clients in their handshake; one closed");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("vsock: cannot make a client socket non-blocking: {e}");
                        continue;
                    }
                    let hs = Handshake::new(stream, Instant::now() + CONNECT_TIMEOUT);
                    self.handshakes.insert(hs.stream.as_raw_fd(), hs);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    warn!("vsock: accept on {} failed: {e}", self.uds_path().display());
                    self.accept_backoff = Some(Instant::now() + ACCEPT_BACKOFF);
                    break;
                }
            }
        }
    }

    /// Readiness of a client or connection socket.
    pub fn handle_socket(&mut self, fd: RawFd, events: EventSet) {
        if self.handshakes.contains_key(&fd) {
            self.continue_handshake(fd);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::ERROR) {
            self.kill(key, true);
            return;
        }
        if events.contains(EventSet::IN) && conn.registered.contains(EventSet::IN) {
            conn.pending |= owed::DATA;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP) {
            if let Err(e) = conn.flush() {
                debug!("vsock: resetting {}:{}: {e}", key.local_port, key.peer_port);
                self.kill(key, true);
                return;
            }
        }
        if conn.is_done() {
            self.kill(key, true);
        } else {
            self.schedule(key);
        }
    }

    fn continue_handshake(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = match hs.read() {
            HandshakeStep::Pending => return,
            HandshakeStep::Connect(port) => Some(port),
            HandshakeStep::Failed(why) => {
                debug!("vsock: client dropped: {why}");
                None
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        match port {
            Some(port) if self.conns.len() < MAX_CONNECTIONS => {
                let key = self.free_key(port);
                let deadline = Instant::now() + CONNECT_TIMEOUT;
                let conn = Connection::host_initiated(hs.stream, deadline, hs.registered);
                self.insert(key, conn);
            }
            Some(port) => {
                debug!("vsock: connection limit reached; client for port {port} closed");
                self.graveyard.push((hs.stream, hs.registered));
            }
            None => self.graveyard.push((hs.stream, hs.registered)),
        }
    }

    /// A host port for a new connection to guest port `peer_port`.
    fn free_key(&mut self, peer_port: u32) -> ConnKey {
        loop {
            let key = ConnKey {
                local_port: self.next_port,
                peer_port,
            };
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            // At most MAX_CONNECTIONS keys are taken, so this ends.
            if !self.conns.contains_key(&key) {
                return key;
            }
        }
    }

    /// Whether a deadline is running (a client's handshake, a REQUEST's answer, a pause in
    /// accepting).
    pub fn has_deadlines(&self) -> bool {
        self.accept_backoff.is_some()
            || !self.handshakes.is_empty()
            || self
                .conns
                .values()
                .any(|c| matches!(c.state, ConnState::LocalInit { .. }))
    }

    /// Closes clients that sent no line in time and host-initiated connections the guest did
    /// not answer in time (telling the guest, in case its answer is still coming).
    pub fn expire(&mut self, now: Instant) {
        if self.accept_backoff.is_some_and(|t| t <= now) {
            self.accept_backoff = None;
        }
        let late: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, hs)| hs.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            if let Some(hs) = self.handshakes.remove(&fd) {
                debug!("vsock: client sent no CONNECT line in time");
                self.graveyard.push((hs.stream, hs.registered));
            }
        }
        let late: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(
                |(_, c)| matches!(c.state, ConnState::LocalInit { deadline } if deadline <= now),
            )
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            debug!("vsock: guest port {} did not answer in time", key.peer_port);
            self.kill(key, true);
        }
    }

    /// Whether anything waits for a receive buffer.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_queue.is_empty()
    }

    /// Writes the next packet owed to the guest into `chain`; returns its used length, or
    /// `None` when nothing was owed after all (the chain is left for later). A chain that is no
    /// receive buffer is returned empty.
    pub fn fill_rx(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Option<u32> {
        let mut chain = chain;
        let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
            Ok(pkt) => pkt,
            Err(e) => {
                debug!("vsock: unusable receive buffer: {e}");
                return Some(0);
            }
        };
        if let Some(rst) = self.rst_queue.pop_front() {
            rst.write_to(&mut pkt);
            return Some(PKT_HEADER_SIZE as u32);
        }
        // Each connection is tried at most once per buffer.
        for _ in 0..self.rx_queue.len() {
            let Some(key) = self.rx_queue.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let produced = self.produce(key, &mut pkt);
            self.schedule(key);
            if let Some(len) = produced {
                return Some(len);
            }
        }
        None
    }

    /// The next packet `key` owes the guest, written into `pkt`.
    fn produce<B: BitmapSlice>(
        &mut self,
        key: ConnKey,
        pkt: &mut VsockPacket<'_, B>,
    ) -> Option<u32> {
        let conn = self.conns.get_mut(&key)?;
        let mut hdr = Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            ..Header::default()
        };
        let take = |conn: &mut Connection, bit: u8| {
            let owed = conn.pending & bit != 0;
            conn.pending &= !bit;
            owed
        };
        if take(conn, owed::REQUEST) {
            hdr.op = OP_REQUEST;
        } else if take(conn, owed::RESPONSE) {
            hdr.op = OP_RESPONSE;
        } else if conn.pending & owed::DATA != 0 {
            match pkt.data_slice().map(|d| conn.read_into(d)) {
                Some(Ok(Read::Data(n))) => {
                    hdr.op = OP_RW;
                    hdr.len = n;
                }
                Some(Ok(Read::Nothing)) => {}
                // A buffer without room for data: try again with the next one.
                None => {}
                Some(Err(e)) => {
                    debug!("vsock: resetting {}:{}: {e}", key.local_port, key.peer_port);
                    conn.meter.sent(Instant::now(), OP_RST, 0);
                    self.kill(key, false);
                    hdr.op = OP_RST;
                    hdr.write_to(pkt);
                    return Some(PKT_HEADER_SIZE as u32);
                }
            }
        }
        if hdr.op == 0 {
            if take(conn, owed::SHUTDOWN) {
                hdr.op = OP_SHUTDOWN;
                hdr.flags = SHUTDOWN_SEND;
            } else if take(conn, owed::CREDIT_REQUEST) {
                hdr.op = OP_CREDIT_REQUEST;
            } else if conn.pending & owed::CREDIT_UPDATE != 0 {
                hdr.op = OP_CREDIT_UPDATE;
            } else {
                return None;
            }
        }
        (hdr.buf_alloc, hdr.fwd_cnt) = conn.credit_fields();
        conn.meter.sent(Instant::now(), hdr.op, hdr.len);
        hdr.write_to(pkt);
        Some(PKT_HEADER_SIZE as u32 + hdr.len)
    }

    /// Brings the event loop's watch list in line with what each socket waits for: nothing
    /// while the device cannot run (`live` false: paused, or not activated), so the loop never
    /// spins on a socket it will not serve; then closes the sockets that were ended.
    pub fn sync(&mut self, ops: &mut EventOps, live: bool) {
        let gate = |set: EventSet| if live { set } else { EventSet::empty() };
        let fd = self.listener.listener.as_raw_fd();
        let accepting = if self.accept_backoff.is_none() {
            gate(EventSet::IN)
        } else {
            EventSet::empty()
        };
        apply(ops, fd, &mut self.listener.registered, accepting);
        for (fd, hs) in &mut self.handshakes {
            apply(ops, *fd, &mut hs.registered, gate(EventSet::IN));
        }
        let mut broken = Vec::new();
        for (key, conn) in &mut self.conns {
            let fd = conn.stream.as_raw_fd();
            let want = gate(conn.interest());
            if !apply(ops, fd, &mut conn.registered, want) {
                broken.push(*key);
            }
        }
        for key in broken {
            self.kill(key, true);
        }
        for (stream, mut registered) in self.graveyard.drain(..) {
            apply(ops, stream.as_raw_fd(), &mut registered, EventSet::empty());
        }
    }
}

/// Changes the registration of `fd` from `registered` to `want`; false if the event loop
/// refused.
fn apply(ops: &mut EventOps, fd: RawFd, registered: &mut EventSet, want: EventSet) -> bool {
    if *registered == want {
        return true;
    }
    let result = if registered.is_empty() {
        ops.add(Events::with_data_raw(fd, 0, want))
    } else if want.is_empty() {
        ops.remove(Events::empty_raw(fd))
    } else {
        ops.modify(Events::with_data_raw(fd, 0, want))
    };
    match result {
        Ok(()) => {
            *registered = want;
            true
        }
        Err(e) => {
            warn!("vsock: cannot change the event-loop registration of a socket: {e:?}");
            false
        }
    }
}
