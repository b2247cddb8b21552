//! One vsock stream connection: its host socket, its state, the credit in each direction,
//! the guest bytes the host socket has not taken yet, and what it owes the guest.
//!
//! Credit (virtio spec 1.2, section 5.10.6.3): each side advertises a receive buffer
//! (`buf_alloc`) and how many bytes it has consumed (`fwd_cnt`); a sender may have at most
//! `buf_alloc - (sent - fwd_cnt)` bytes in flight. Towards the guest the device reads from the
//! host socket only what the guest has room for; from the guest it accepts at most
//! [`CONN_BUF_SIZE`] bytes the host has not taken, and a guest that sends more is reset.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use event_manager::EventSet;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::proto::{SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::stats::Meter;
use super::{CONN_BUF_SIZE, MAX_PKT_DATA};

/// What a connection has to tell the guest, as bits of [`Connection::pending`].
pub(super) mod owed {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    /// The host socket may have data for the guest.
    pub const DATA: u8 = 4;
    /// The host closed its sending side: SHUTDOWN(SEND).
    pub const SHUTDOWN: u8 = 8;
    pub const CREDIT_REQUEST: u8 = 16;
    pub const CREDIT_UPDATE: u8 = 32;
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    #[error("the guest sent {len} bytes beyond its credit")]
    Credit { len: u32 },
    #[error("{0} in this state")]
    Protocol(&'static str),
    #[error("host socket I/O failed")]
    Io(#[source] io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnState {
    /// Host-initiated: REQUEST sent (or queued), waiting for the guest's RESPONSE.
    LocalInit {
        deadline: Instant,
    },
    Established,
}

/// What reading the host socket into a guest buffer gave.
pub(super) enum Read {
    Data(u32),
    /// No data now, or no room for it in the guest.
    Nothing,
}

pub(super) struct Connection {
    pub stream: UnixStream,
    pub state: ConnState,
    /// [`owed`] bits.
    pub pending: u8,
    /// Whether the connection is in the handler's receive queue.
    pub queued: bool,
    /// The events registered with the event loop (empty: not registered).
    pub registered: EventSet,
    /// Whether a host client asked for it (`CONNECT`), rather than the guest.
    pub host_initiated: bool,
    /// Packets, bytes and the time spent waiting on the guest.
    pub meter: Meter,
    // Host to guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    host_eof: bool,
    // Guest to host.
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    host_write_shut: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: ConnState, pending: u8, registered: EventSet) -> Self {
        Self {
            stream,
            state,
            pending,
            queued: false,
            registered,
            host_initiated: matches!(state, ConnState::LocalInit { .. }),
            meter: Meter::new(Instant::now()),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_eof: false,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_shutdown: 0,
            host_write_shut: false,
        }
    }

    /// A host client asked for a guest port: REQUEST goes out, the answer is due by `deadline`.
    pub fn host_initiated(stream: UnixStream, deadline: Instant, registered: EventSet) -> Self {
        Self::new(
            stream,
            ConnState::LocalInit { deadline },
            owed::REQUEST,
            registered,
        )
    }

    /// The guest's REQUEST reached a host listener: RESPONSE goes out.
    pub fn guest_initiated(stream: UnixStream) -> Self {
        Self::new(
            stream,
            ConnState::Established,
            owed::RESPONSE,
            EventSet::empty(),
        )
    }

    /// Every guest packet carries its current receive buffer and consumption.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_credit() > 0 {
            self.pending &= !owed::CREDIT_REQUEST;
        }
    }

    /// Bytes the guest has room for; 0 when its counters make no sense.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// What the device's own receive window says in every packet header.
    pub fn credit_fields(&mut self) -> (u32, u32) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !owed::CREDIT_UPDATE;
        (CONN_BUF_SIZE, self.fwd_cnt.0)
    }

    /// The events to watch the host socket for: readable while the guest can take data and
    /// none is already waiting for a buffer, writable while guest bytes wait for the host.
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        let reading = self.state == ConnState::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.pending & owed::DATA == 0
            && self.peer_credit() > 0;
        if reading {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// The guest accepted a host-initiated connection: tell the client which port it got.
    pub fn on_response(&mut self, local_port: u32) -> Result<(), ConnError> {
        if !matches!(self.state, ConnState::LocalInit { .. }) {
            return Err(ConnError::Protocol("RESPONSE"));
        }
        self.state = ConnState::Established;
        // The client waits for this line before anything else, so the socket's buffer is
        // empty and a short line fits it whole; anything less is a broken client.
        let line = format!("OK {local_port}\n");
        match self.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => Ok(()),
            Ok(_) => Err(ConnError::Io(io::ErrorKind::WriteZero.into())),
            Err(e) => Err(ConnError::Io(e)),
        }
    }

    /// Guest data for the host: written at once as far as the socket takes it, the rest kept
    /// (within the credit the device advertised).
    pub fn on_data<B: BitmapSlice>(
        &mut self,
        data: &VolatileSlice<'_, B>,
    ) -> Result<(), ConnError> {
        if self.state != ConnState::Established || self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Err(ConnError::Protocol("RW"));
        }
        let len = data.len();
        if self.tx_buf.len() + len > CONN_BUF_SIZE as usize {
            return Err(ConnError::Credit { len: len as u32 });
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            written = match self.stream.write_volatile(data) {
                Ok(n) => n,
                Err(VolatileMemoryError::IOError(e)) if retry_later(&e) => 0,
                Err(VolatileMemoryError::IOError(e)) => return Err(ConnError::Io(e)),
                Err(e) => return Err(ConnError::Io(io::Error::other(e))),
            };
            self.fwd_cnt += written as u32;
        }
        if written < len {
            let rest = data
                .subslice(written, len - written)
                .map_err(|e| ConnError::Io(io::Error::other(e)))?;
            let mut bytes = vec![0u8; rest.len()];
            rest.copy_to(&mut bytes[..]);
            self.tx_buf.extend(bytes);
        }
        self.after_forwarding()
    }

    /// The host socket is writable: send what waits.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ConnError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if retry_later(&e) => break,
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        self.after_forwarding()
    }

    /// Passes the guest's SHUTDOWN on to the host once its bytes are out, and owes the guest a
    /// CREDIT_UPDATE when its idea of the free space runs low.
    fn after_forwarding(&mut self) -> Result<(), ConnError> {
        if self.tx_buf.is_empty()
            && self.peer_shutdown & SHUTDOWN_SEND != 0
            && !self.host_write_shut
        {
            self.host_write_shut = true;
            // The client may have gone already; the next read or write tells.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        let unannounced = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        let guest_view = CONN_BUF_SIZE
            .saturating_sub(self.tx_buf.len() as u32)
            .saturating_sub(unannounced);
        if unannounced > 0 && guest_view < MAX_PKT_DATA {
            self.pending |= owed::CREDIT_UPDATE;
        }
        Ok(())
    }

    /// The guest's SHUTDOWN.
    pub fn on_shutdown(&mut self, flags: u32) -> Result<(), ConnError> {
        self.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        if self.peer_shutdown & SHUTDOWN_RCV != 0 {
            self.pending &= !owed::DATA;
        }
        self.after_forwarding()
    }

    /// Both directions are finished from the guest's side and the host has all its bytes:
    /// the connection ends with a RST to the guest (as Linux's own peer would).
    pub fn is_done(&self) -> bool {
        self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && self.tx_buf.is_empty()
    }

    /// Reads host data into `buf` within the guest's credit. End of file owes the guest a
    /// SHUTDOWN; credit running out owes it a CREDIT_REQUEST.
    pub fn read_into<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<'_, B>,
    ) -> Result<Read, ConnError> {
        let cap = buf
            .len()
            .min(self.peer_credit() as usize)
            .min(MAX_PKT_DATA as usize);
        if cap == 0 {
            if !buf.is_empty() {
                // No credit: wait for the guest's update (the interest drops IN meanwhile).
                self.pending = (self.pending & !owed::DATA) | owed::CREDIT_REQUEST;
            }
            return Ok(Read::Nothing);
        }
        let mut dst = buf
            .subslice(0, cap)
            .map_err(|e| ConnError::Io(io::Error::other(e)))?;
        match self.stream.read_volatile(&mut dst) {
            Ok(0) => {
                self.host_eof = true;
                self.pending = (self.pending & !owed::DATA) | owed::SHUTDOWN;
                Ok(Read::Nothing)
            }
            Ok(n) => {
                self.rx_cnt += n as u32;
                if n < cap {
                    // Drained: the next readiness event brings the rest.
                    self.pending &= !owed::DATA;
                }
                if self.peer_credit() == 0 {
                    self.pending |= owed::CREDIT_REQUEST;
                }
                Ok(Read::Data(n as u32))
            }
            Err(VolatileMemoryError::IOError(e)) if retry_later(&e) => {
                self.pending &= !owed::DATA;
                Ok(Read::Nothing)
            }
            Err(VolatileMemoryError::IOError(e)) => Err(ConnError::Io(e)),
            Err(e) => Err(ConnError::Io(io::Error::other(e))),
        }
    }
}

fn retry_later(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}
