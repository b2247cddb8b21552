//! virtio-vsock (virtio spec 1.2, section 5.10) with a Unix socket per VM as the host side,
//! speaking Firecracker's host protocol (`docs/vsock.md`):
//!
//! - host-initiated: a client connects to `uds_path` and writes `CONNECT <port>\n`; the device
//!   asks the guest's listener on that port (REQUEST) and, once it accepts (RESPONSE), writes
//!   `OK <local port>\n` to the client and forwards bytes both ways;
//! - guest-initiated: a connection to host port P goes to the Unix socket `<uds_path>_<P>`.
//!
//! `device.rs` is the [`VirtioDevice`](super::VirtioDevice) and event-loop side (queues,
//! sockets, the timer, the pause gate); `handler.rs` turns guest packets into socket I/O and
//! socket I/O into guest packets over a table of connections, testable without KVM;
//! `connection.rs` is one connection's state, credit and buffer; `unix.rs` the listening
//! socket, the CONNECT handshake and the non-blocking connect; `persist.rs` the snapshot state;
//! `stats.rs` what each connection cost (packets, bytes, the time spent waiting on the guest).
//!
//! Every per-connection buffer and the number of connections are bounded; sockets are
//! non-blocking and registered with the event loop, which never waits on one.

mod connection;
mod device;
mod handler;
mod persist;
mod stats;
mod unix;

use std::time::Duration;

pub use device::{Vsock, VsockError};
pub use persist::{VsockRestoreArgs, VsockRestoreError, VsockState};
pub use stats::{ConnectionStats, CLOSED_KEPT};
pub use unix::parse_connect;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indexes (virtio spec 1.2, section 5.10.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;

/// The host's context id, the only destination this device serves.
pub const HOST_CID: u64 = 2;
/// Largest payload a guest packet may carry (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// The receive buffer each connection advertises to the guest (`buf_alloc`): guest bytes the
/// host socket has not taken yet wait here, and the guest may not send more than this ahead
/// of what the device has forwarded (`fwd_cnt`).
pub const CONN_BUF_SIZE: u32 = 128 * 1024;
/// Connections open at once; more are refused (RST to the guest, the client's socket closed).
pub const MAX_CONNECTIONS: usize = 128;
/// Host clients connected but still to send their `CONNECT` line; more are closed at once.
pub const MAX_HANDSHAKES: usize = 32;
/// How long a host client has to send its `CONNECT` line, and the guest to answer REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// RST packets for unknown connections waiting for a receive buffer; beyond this they are
/// dropped (a guest that posts no receive buffers only hurts itself).
pub const MAX_PENDING_RST: usize = 256;
/// Host ports of host-initiated connections start here, well above the ports people listen on.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Packet header constants (virtio spec 1.2, section 5.10.6).
pub mod proto {
    pub const TYPE_STREAM: u16 = 1;
    pub const OP_REQUEST: u16 = 1;
    pub const OP_RESPONSE: u16 = 2;
    pub const OP_RST: u16 = 3;
    pub const OP_SHUTDOWN: u16 = 4;
    pub const OP_RW: u16 = 5;
    pub const OP_CREDIT_UPDATE: u16 = 6;
    pub const OP_CREDIT_REQUEST: u16 = 7;
    /// SHUTDOWN flags: the sender will receive no more / send no more.
    pub const SHUTDOWN_RCV: u32 = 1;
    pub const SHUTDOWN_SEND: u32 = 2;
    /// The only event: the transport was reset (after a restore), connections are gone.
    pub const EVENT_TRANSPORT_RESET: u32 = 0;
    /// Feature bit: SOCK_SEQPACKET. Not offered: only stream sockets are implemented.
    pub const F_SEQPACKET: u64 = 1 << 1;
}

#[cfg(test)]
mod tests;
