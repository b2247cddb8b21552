//! `grove-agent`: the guest agent of Grove's default image, and its host-side client.
//!
//! The agent runs inside the guest, listens on virtio-vsock port [`AGENT_PORT`] and answers
//! the requests of [`protocol`] (`docs/agent-protocol.md`): run commands, read and write
//! files, and make a fresh clone unique (hostname, machine-id, address, entropy, clock,
//! post-clone hooks). The host reaches it through the VMM's vsock Unix socket with
//! [`client::Client`].
//!
//! - [`protocol`]: wire types and framing, shared by both sides;
//! - [`client`]: the blocking host-side client;
//! - [`server`]: the request handlers ([`server::Agent`]), independent of the transport so
//!   they run on a host over any socket in tests;
//! - [`system`]: the privileged guest operations behind a trait;
//! - [`vsock`]: the `AF_VSOCK` listener of the guest binary;
//! - [`workers`]: the guest binary's pre-started connection threads.

pub mod client;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod protocol;
pub mod server;
pub mod system;
pub mod vsock;
pub mod workers;

/// The vsock port the agent listens on in the guest.
pub const AGENT_PORT: u32 = 52;

/// The agent's version, reported by `ping`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
