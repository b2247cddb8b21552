//! Emulated devices: legacy PC devices and virtio devices, reached through [`bus::Bus`].

pub mod bus;
pub mod legacy;
#[cfg(test)]
pub(crate) mod persist_tests;
pub mod virtio;
pub mod vmgenid;
