//! virtio-net over a host TAP device (virtio spec 1.2, section 5.1).
//!
//! Two queues: receive (0, the device fills buffers the driver posts) and transmit (1, the
//! driver posts frames). Offered features: VERSION_1, MAC and EVENT_IDX; no offloads, no
//! control queue, no mergeable receive buffers. Every frame on either queue is a 12-byte
//! `virtio_net_hdr_v1` followed by an Ethernet frame; without offloads the header carries
//! nothing (flags and GSO type 0, `num_buffers` 1 on receive), so the device writes its own
//! header instead of passing one through.
//!
//! The TAP is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte vnet header (the
//! same layout as virtio's) and no offloads, non-blocking, and watched edge-triggered on the
//! event loop. A frame read from the TAP when the guest has no receive buffer is kept until
//! the driver posts one (it notifies the receive queue); the TAP is not read meanwhile, so the
//! kernel queues or drops further frames, as a NIC would.
//!
//! `device.rs` is the [`VirtioDevice`](super::VirtioDevice) and event-loop side; `tap.rs`
//! opens the TAP; `handler.rs` moves frames between descriptor chains and a [`FrameIo`]
//! (the TAP, or a test double) and is testable without KVM or an event loop; `persist.rs`
//! saves the device and reopens its TAP by name on restore.

mod device;
pub mod handler;
mod persist;
pub mod tap;

use std::fmt;
use std::str::FromStr;

pub use device::{Net, NetDeviceConfig, NetError};
pub use handler::{FrameIo, NetStats};
pub use persist::{NetRestoreError, NetState};
pub use tap::{Tap, TapError};

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Length of `struct virtio_net_hdr_v1` (with `num_buffers`), which VERSION_1 always uses;
/// also the TAP's vnet header size.
pub const VNET_HDR_LEN: usize = 12;
/// Length of an Ethernet header: a frame shorter than this is malformed.
pub const ETH_HLEN: usize = 14;
/// Longest Ethernet frame (without the vnet header) the device moves: the largest a 64 KiB
/// MTU allows, with a VLAN tag. Longer frames are dropped, never truncated.
pub const MAX_FRAME_LEN: usize = 65535 + ETH_HLEN + 4;

/// An Ethernet MAC address, written `xx:xx:xx:xx:xx:xx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// A string that is not a unicast MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacAddrError {
    #[error("{0:?} is not a MAC address (expected six hex bytes like 06:00:ac:10:00:02)")]
    Syntax(String),
    #[error("{0} is a multicast address; a NIC needs a unicast one (even first byte)")]
    Multicast(String),
}

impl MacAddr {
    /// A random locally administered unicast address.
    pub fn random() -> std::io::Result<Self> {
        use std::io::Read;
        let mut bytes = [0u8; 6];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        bytes[0] = (bytes[0] & 0xfc) | 0x02;
        Ok(Self(bytes))
    }
}

impl FromStr for MacAddr {
    type Err = MacAddrError;

    fn from_str(s: &str) -> Result<Self, MacAddrError> {
        let syntax = || MacAddrError::Syntax(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(syntax)?;
            // from_str_radix alone would take a sign ("+6").
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        if bytes[0] & 1 != 0 {
            return Err(MacAddrError::Multicast(s.to_string()));
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
