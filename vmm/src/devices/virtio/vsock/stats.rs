//! What one connection cost, as the device saw it: packets and bytes each way, and how long
//! the host waited on the guest (`docs/vsock.md`, "Connection figures").
//!
//! The wait is a sum of intervals, on the monotonic clock:
//!
//! - an interval starts when the device hands the guest something to answer: the REQUEST of
//!   a host-initiated connection, or a packet of data (RW), unless one is running already;
//! - each *answer* of the guest for the connection (RESPONSE, RW, and SHUTDOWN or RST unless
//!   the host closed its side first) moves the interval's end to that packet: the interval
//!   lasts until the guest's last answer before the device hands it something again, so an
//!   answer in several pieces counts as guest time from the first hand-over to its last
//!   piece;
//! - the next hand-over after an answer closes the interval at that answer and starts another;
//!   the host's time between the answer and the hand-over is not counted;
//! - an interval with no answer yet adds nothing (the guest has not answered; no figure can
//!   say yet how long it will take). CREDIT_UPDATE and CREDIT_REQUEST are the transport's
//!   bookkeeping: they are counted as packets, but neither start nor answer anything.
//!
//! So the figure is the time the guest held the connection's next step, as far as the host
//! can see it: the guest kernel's interrupt and vsock work and the guest program's, together.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::proto::{OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN};

/// Closed host-initiated connections whose figures are kept, newest first, so a client can
/// ask for them right after it closed.
pub const CLOSED_KEPT: usize = 16;

/// The figures of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionStats {
    /// The host port (`OK <port>` of a host-initiated connection).
    pub host_port: u32,
    pub guest_port: u32,
    /// Whether the connection is still open.
    pub open: bool,
    /// Time the host waited on the guest (see the module documentation).
    pub guest_wait: Duration,
    /// From the connection's start (the `CONNECT` line read, or the guest's REQUEST) to its
    /// end, or to now while it is open.
    pub lifetime: Duration,
    pub packets_to_guest: u64,
    pub packets_from_guest: u64,
    /// Payload bytes (RW) each way.
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
}

/// The running figures of one connection.
#[derive(Debug, Clone)]
pub(super) struct Meter {
    accepted: Instant,
    closed: Option<Instant>,
    /// The running interval: its start, and the guest's last answer in it so far.
    interval: Option<(Instant, Option<Instant>)>,
    /// Closed intervals, summed.
    waited: Duration,
    /// The host sent SHUTDOWN or RST: the guest's closing packets answer that, not a request.
    host_closed: bool,
    packets_to_guest: u64,
    packets_from_guest: u64,
    bytes_to_guest: u64,
    bytes_from_guest: u64,
}

impl Meter {
    pub fn new(now: Instant) -> Self {
        Self {
            accepted: now,
            closed: None,
            interval: None,
            waited: Duration::ZERO,
            host_closed: false,
            packets_to_guest: 0,
            packets_from_guest: 0,
            bytes_to_guest: 0,
            bytes_from_guest: 0,
        }
    }

    /// The device put a packet with operation `op` and `len` payload bytes in a receive
    /// buffer at `now`.
    pub fn sent(&mut self, now: Instant, op: u16, len: u32) {
        if self.closed.is_some() {
            return;
        }
        self.packets_to_guest += 1;
        self.bytes_to_guest += u64::from(len);
        match op {
            OP_REQUEST | OP_RW => match self.interval {
                None => self.interval = Some((now, None)),
                // Still unanswered: the earlier hand-over's wait goes on.
                Some((_, None)) => {}
                Some((start, Some(answer))) => {
                    self.waited += answer.saturating_duration_since(start);
                    self.interval = Some((now, None));
                }
            },
            OP_SHUTDOWN | OP_RST => self.host_closed = true,
            _ => {}
        }
    }

    /// The guest sent the device a packet with operation `op` and `len` payload bytes for
    /// this connection at `now`.
    pub fn received(&mut self, now: Instant, op: u16, len: u32) {
        if self.closed.is_some() {
            return;
        }
        self.packets_from_guest += 1;
        self.bytes_from_guest += u64::from(len);
        let answers = match op {
            OP_RESPONSE | OP_RW => true,
            OP_SHUTDOWN | OP_RST => !self.host_closed,
            _ => false,
        };
        if answers {
            if let Some((_, last)) = &mut self.interval {
                *last = Some(now);
            }
        }
    }

    /// The connection ended at `now`; nothing after it is counted.
    pub fn close(&mut self, now: Instant) {
        if self.closed.is_none() {
            self.closed = Some(now);
        }
    }

    /// The wait so far: closed intervals, and the running one up to its last answer.
    pub fn guest_wait(&self) -> Duration {
        let running = match self.interval {
            Some((start, Some(answer))) => answer.saturating_duration_since(start),
            _ => Duration::ZERO,
        };
        self.waited + running
    }

    /// The figures as of `now`.
    pub fn stats(&self, host_port: u32, guest_port: u32, now: Instant) -> ConnectionStats {
        ConnectionStats {
            host_port,
            guest_port,
            open: self.closed.is_none(),
            guest_wait: self.guest_wait(),
            lifetime: self
                .closed
                .unwrap_or(now)
                .saturating_duration_since(self.accepted),
            packets_to_guest: self.packets_to_guest,
            packets_from_guest: self.packets_from_guest,
            bytes_to_guest: self.bytes_to_guest,
            bytes_from_guest: self.bytes_from_guest,
        }
    }
}

/// The figures of the last [`CLOSED_KEPT`] closed host-initiated connections.
#[derive(Debug, Default)]
pub(super) struct ClosedRing {
    /// Newest first: (host port, guest port, figures).
    entries: VecDeque<(u32, u32, Meter)>,
}

impl ClosedRing {
    pub fn push(&mut self, host_port: u32, guest_port: u32, meter: Meter) {
        if self.entries.len() >= CLOSED_KEPT {
            self.entries.pop_back();
        }
        self.entries.push_front((host_port, guest_port, meter));
    }

    /// The newest closed connection that had `host_port`.
    pub fn find(&self, host_port: u32, now: Instant) -> Option<ConnectionStats> {
        self.entries
            .iter()
            .find(|(port, _, _)| *port == host_port)
            .map(|(port, guest, meter)| meter.stats(*port, *guest, now))
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::{OP_CREDIT_REQUEST, OP_CREDIT_UPDATE};
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_request_and_its_answers_count_until_the_last_piece() {
        let t0 = Instant::now();
        let mut m = Meter::new(t0);
        m.sent(at(t0, 1), OP_REQUEST, 0);
        // No answer yet: nothing counted.
        assert_eq!(m.guest_wait(), Duration::ZERO);
        m.received(at(t0, 300), OP_RESPONSE, 0);
        assert_eq!(m.guest_wait(), Duration::from_millis(299));
        // The host's data 2 ms after the answer: the gap is the host's.
        m.sent(at(t0, 302), OP_RW, 100);
        m.sent(at(t0, 303), OP_RW, 50);
        m.received(at(t0, 310), OP_CREDIT_UPDATE, 0);
        assert_eq!(m.guest_wait(), Duration::from_millis(299));
        // An answer in two pieces, seconds apart, counts from the first data packet.
        m.received(at(t0, 400), OP_RW, 10);
        m.received(at(t0, 2400), OP_RW, 20);
        assert_eq!(m.guest_wait(), Duration::from_millis(299 + 2098));
        let s = m.stats(1 << 30, 52, at(t0, 2500));
        assert_eq!((s.packets_to_guest, s.packets_from_guest), (3, 4), "{s:?}");
        assert_eq!((s.bytes_to_guest, s.bytes_from_guest), (150, 30));
        assert!(s.open);
        assert_eq!(s.lifetime, Duration::from_millis(2500));
    }

    #[test]
    fn closing_packets_answer_only_before_the_host_closed() {
        let t0 = Instant::now();
        let mut m = Meter::new(t0);
        m.sent(at(t0, 0), OP_RW, 4);
        m.received(at(t0, 5), OP_RW, 4);
        // The host hangs up; the guest's reply to that is teardown, not an answer.
        m.sent(at(t0, 6), OP_SHUTDOWN, 0);
        m.received(at(t0, 50), OP_RST, 0);
        assert_eq!(m.guest_wait(), Duration::from_millis(5));

        let mut m = Meter::new(t0);
        m.sent(at(t0, 0), OP_RW, 4);
        m.received(at(t0, 7), OP_SHUTDOWN, 0);
        assert_eq!(m.guest_wait(), Duration::from_millis(7));
        m.received(at(t0, 8), OP_CREDIT_REQUEST, 0);
        assert_eq!(m.guest_wait(), Duration::from_millis(7));
    }

    #[test]
    fn nothing_counts_after_the_close_and_the_ring_is_bounded() {
        let t0 = Instant::now();
        let mut ring = ClosedRing::default();
        for i in 0..(CLOSED_KEPT as u32 + 4) {
            let mut m = Meter::new(t0);
            m.sent(at(t0, 0), OP_REQUEST, 0);
            m.received(at(t0, u64::from(i)), OP_RESPONSE, 0);
            m.close(at(t0, 100));
            m.received(at(t0, 200), OP_RW, 1);
            ring.push(1000 + i, 52, m);
        }
        assert_eq!(ring.entries.len(), CLOSED_KEPT);
        assert!(ring.find(1000, t0).is_none(), "the oldest is gone");
        let s = ring.find(1019, at(t0, 999)).unwrap();
        assert!(!s.open);
        assert_eq!(s.guest_wait, Duration::from_millis(19));
        assert_eq!(s.lifetime, Duration::from_millis(100));
        assert_eq!((s.packets_from_guest, s.bytes_from_guest), (1, 0));
        // A port used again: the newest wins.
        let mut m = Meter::new(t0);
        m.close(t0);
        ring.push(1019, 53, m);
        assert_eq!(ring.find(1019, t0).unwrap().guest_port, 53);
    }
}
