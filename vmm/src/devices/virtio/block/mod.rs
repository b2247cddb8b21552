//! virtio-blk over a raw disk image (virtio spec 1.2, section 5.2).
//!
//! `device.rs` is the [`VirtioDevice`](super::VirtioDevice) and event-loop side (features,
//! configuration space, activation); `handler.rs` parses and serves requests and is testable
//! without KVM or an event loop; `persist.rs` saves the device and reopens its image on
//! restore.

mod device;
pub mod handler;
mod persist;

pub use device::{Block, BlockConfig, BlockError};
pub use persist::{BlockRestoreArgs, BlockRestoreError, BlockState};

/// virtio-blk always counts in 512-byte sectors, whatever the image's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request offered through VIRTIO_BLK_F_SEG_MAX: the queue size minus the
/// header and status descriptors, so one request always fits the ring without indirect
/// descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

#[cfg(test)]
mod tests;
