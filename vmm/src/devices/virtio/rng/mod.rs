//! virtio-rng, the entropy device (virtio spec 1.2, section 5.4): the guest posts
//! device-writable buffers and the device fills them with random bytes from the host.
//!
//! `device.rs` is the [`VirtioDevice`](super::VirtioDevice) and event-loop side; `handler.rs`
//! fills one request and is testable without KVM or an event loop; `persist.rs` saves the
//! negotiated features.

mod device;
pub mod handler;
mod persist;

pub use device::{Rng, RngError};
pub use persist::{RngRestoreError, RngState};

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;

#[cfg(test)]
mod tests;
