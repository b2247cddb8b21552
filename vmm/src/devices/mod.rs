//! Emulated devices: legacy PC devices and virtio devices, reached through [`bus::Bus`].

pub mod bus;
pub mod legacy;
pub mod virtio;
