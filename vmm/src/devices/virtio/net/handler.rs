//! Moving frames between virtio-net's queues and the host: receive (host → guest buffers) and
//! transmit (guest chains → host), over any [`FrameIo`] (the TAP, or a test double).
//!
//! Nothing in a chain is trusted. A transmit chain that is not a plausible frame (shorter than
//! a vnet header and an Ethernet header, longer than [`MAX_FRAME_LEN`], or outside guest
//! memory) is dropped and returned with used length 0, like every transmit chain. A receive
//! chain that cannot hold the frame (too small, not writable, outside guest memory) is
//! returned with used length 0 and the frame is dropped; a frame that arrives while the guest
//! has posted no receive buffer is kept until it does.

use std::io::{self, Read, Write};

use log::{debug, warn};
use virtio_bindings::bindings::virtio_net::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{ETH_HLEN, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::devices::virtio::device_state::{stop_queue, Chain};
use crate::devices::virtio::{IrqTrigger, INT_VRING};
use crate::vstate::memory::{GuestMemoryMmap, MemReader as Reader, MemWriter as Writer};

/// The host end of a network device: whole frames, each behind a 12-byte vnet header.
pub trait FrameIo {
    /// Reads one frame with its vnet header into `buf`; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame with its vnet header; a short write means the frame was not sent.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
}

/// Frame counters of one device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered into guest buffers.
    pub rx_frames: u64,
    /// Frames from the host the guest never got (malformed, too large, no fitting buffer).
    pub rx_dropped: u64,
    /// Frames the guest sent that reached the host.
    pub tx_frames: u64,
    /// Frames the guest sent that were dropped (malformed, or the host would not take them).
    pub tx_dropped: u64,
}

/// Why a receive pass stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxStop {
    /// The host has no more frames waiting.
    Drained,
    /// A frame is waiting and the guest has no receive buffer for it: it is kept, and the
    /// driver's next notification of the receive queue resumes delivery.
    NoBuffers,
    /// The per-pass budget ran out with frames possibly waiting: the caller must come back.
    Budget,
    /// The queue is not usable (not ready, or its ring cannot be trusted).
    QueueUnusable,
}

/// Replaces the vnet header at the start of `frame` with the one the device sends to a
/// driver that negotiated no offloads: everything zero, `num_buffers` 1. Refuses frames the
/// host handed over with offload state (a partial checksum or a GSO type), which such a
/// driver cannot take; with offloads disabled on the TAP the kernel sends none.
fn fix_rx_header(frame: &mut [u8]) -> bool {
    let Some(hdr) = frame.get_mut(..VNET_HDR_LEN) else {
        return false;
    };
    let flags = u32::from(hdr[0]);
    let gso_type = u32::from(hdr[1]);
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 || gso_type != VIRTIO_NET_HDR_GSO_NONE {
        return false;
    }
    hdr.fill(0);
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
    true
}

/// The receive side: one frame buffer, holding the frame that waits for a guest buffer.
pub struct Rx {
    buf: Vec<u8>,
    /// Length of the frame in `buf` not yet delivered.
    pending: Option<usize>,
}

impl Default for Rx {
    fn default() -> Self {
        Self::new()
    }
}

impl Rx {
    pub fn new() -> Self {
        Self {
            buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN],
            pending: None,
        }
    }

    /// Whether a frame waits for a guest buffer.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Delivers frames from `io` into the receive queue's buffers, at most `budget` of them,
    /// and interrupts the driver if it asked to be told. Stops when `io` has no more frames,
    /// when the guest has no buffer (the frame is kept), or at the budget.
    pub fn process(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        irq: &IrqTrigger,
        io: &mut dyn FrameIo,
        stats: &mut NetStats,
        budget: usize,
    ) -> RxStop {
        if !queue.ready() {
            return RxStop::QueueUnusable;
        }
        let mut used_any = false;
        let mut delivered = 0;
        let stop = loop {
            if delivered == budget {
                break RxStop::Budget;
            }
            let len = match self.pending {
                Some(len) => len,
                None => match self.read_one(io, stats) {
                    Some(len) => len,
                    None => break RxStop::Drained,
                },
            };
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    stop_queue(
                        queue,
                        irq,
                        format_args!("virtio-net: unusable receive ring ({e})"),
                    );
                    break RxStop::QueueUnusable;
                }
            };
            let Some(chain) = chain else {
                // No buffer: ask the driver to notify when it posts one, then look again in
                // case it did in between.
                match queue.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => break RxStop::NoBuffers,
                    Err(e) => {
                        debug!("virtio-net: cannot enable receive notifications: {e}");
                        break RxStop::NoBuffers;
                    }
                }
            };
            let head = chain.head_index();
            let used = match write_chain(mem, chain, &self.buf[..len]) {
                Ok(n) => {
                    stats.rx_frames += 1;
                    n
                }
                Err(reason) => {
                    debug!("virtio-net: receive buffer {head}: {reason}; frame dropped");
                    stats.rx_dropped += 1;
                    0
                }
            };
            self.pending = None;
            delivered += 1;
            match queue.add_used(mem, head, used) {
                Ok(()) => used_any = true,
                Err(e) => debug!("virtio-net: cannot return receive buffer {head}: {e}"),
            }
        };
        if let Some(len) = self.pending {
            debug!("virtio-net: {len}-byte frame waits for a receive buffer");
        }
        if used_any && queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = irq.trigger(INT_VRING) {
                warn!("virtio-net: cannot inject the interrupt: {e}");
            }
        }
        stop
    }

    /// Reads frames from `io` until one is deliverable; `None` when none is waiting.
    fn read_one(&mut self, io: &mut dyn FrameIo, stats: &mut NetStats) -> Option<usize> {
        loop {
            match io.read_frame(&mut self.buf) {
                Ok(n) if n >= VNET_HDR_LEN + ETH_HLEN && fix_rx_header(&mut self.buf[..n]) => {
                    self.pending = Some(n);
                    return Some(n);
                }
                Ok(0) => return None,
                Ok(n) => {
                    debug!("virtio-net: dropped a malformed {n}-byte frame from the host");
                    stats.rx_dropped += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("virtio-net: cannot read from the host: {e}");
                    return None;
                }
            }
        }
    }
}

/// Why a receive chain could not take a frame.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("descriptor outside guest memory")]
    GuestMemory(#[source] virtio_queue::Error),
    #[error("{available} writable bytes for a {needed}-byte frame")]
    TooSmall { available: usize, needed: usize },
    #[error("cannot copy into guest memory")]
    Copy(#[source] io::Error),
    #[error("{0}-byte frame")]
    BadLength(usize),
}

fn write_chain(mem: &GuestMemoryMmap, chain: Chain<'_>, frame: &[u8]) -> Result<u32, ChainError> {
    let mut writer: Writer<'_> = chain.writer(mem).map_err(ChainError::GuestMemory)?;
    if writer.available_bytes() < frame.len() {
        return Err(ChainError::TooSmall {
            available: writer.available_bytes(),
            needed: frame.len(),
        });
    }
    writer.write_all(frame).map_err(ChainError::Copy)?;
    u32::try_from(frame.len()).map_err(|_| ChainError::BadLength(frame.len()))
}

/// The transmit side: one bounce buffer for the frame being sent.
pub struct Tx {
    buf: Vec<u8>,
}

impl Default for Tx {
    fn default() -> Self {
        Self::new()
    }
}

impl Tx {
    pub fn new() -> Self {
        Self {
            buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN],
        }
    }

    /// Sends the frame in one transmit chain to `io`; returns the used length (always 0:
    /// the device writes nothing into transmit buffers).
    pub fn send_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: Chain<'_>,
        io: &mut dyn FrameIo,
        stats: &mut NetStats,
    ) -> u32 {
        let head = chain.head_index();
        match self.read_chain(mem, chain) {
            Ok(len) => match io.write_frame(&self.buf[..len]) {
                Ok(n) if n == len => stats.tx_frames += 1,
                Ok(n) => {
                    debug!("virtio-net: the host took {n} of {len} bytes; frame dropped");
                    stats.tx_dropped += 1;
                }
                Err(e) => {
                    // WouldBlock: the host's queue is full; like a NIC, drop.
                    debug!("virtio-net: cannot send a {len}-byte frame: {e}");
                    stats.tx_dropped += 1;
                }
            },
            Err(reason) => {
                debug!("virtio-net: transmit chain {head}: {reason}; dropped");
                stats.tx_dropped += 1;
            }
        }
        0
    }

    /// Copies the chain's readable bytes (vnet header and frame) into the bounce buffer and
    /// replaces the header with an empty one; returns the length.
    fn read_chain(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Result<usize, ChainError> {
        let mut reader: Reader<'_> = chain.reader(mem).map_err(ChainError::GuestMemory)?;
        let len = reader.available_bytes();
        if !(VNET_HDR_LEN + ETH_HLEN..=VNET_HDR_LEN + MAX_FRAME_LEN).contains(&len) {
            return Err(ChainError::BadLength(len.saturating_sub(VNET_HDR_LEN)));
        }
        let frame = &mut self.buf[..len];
        reader.read_exact(frame).map_err(ChainError::Copy)?;
        // No offload was offered, so the driver's header must be empty; sending our own keeps
        // a header the kernel would act on (a partial checksum, a GSO type) out of the TAP.
        frame[..VNET_HDR_LEN].fill(0);
        Ok(len)
    }
}

#[cfg(test)]
pub(crate) mod test_io {
    //! A [`FrameIo`] that records what was sent and serves queued frames.

    use std::collections::VecDeque;
    use std::io;

    use super::FrameIo;

    #[derive(Default)]
    pub struct MemFrames {
        pub incoming: VecDeque<Vec<u8>>,
        pub sent: Vec<Vec<u8>>,
        /// Answer writes with WouldBlock (a full host queue).
        pub full: bool,
    }

    impl FrameIo for MemFrames {
        fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let frame = self.incoming.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
            let n = frame.len().min(buf.len());
            buf[..n].copy_from_slice(&frame[..n]);
            Ok(n)
        }

        fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
            if self.full {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.sent.push(frame.to_vec());
            Ok(frame.len())
        }
    }
}
