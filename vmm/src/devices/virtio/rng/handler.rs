//! Filling one virtio-rng request.

use std::fs::File;
use std::io::{Read, Write};

use crate::vstate::memory::MemWriter as Writer;
use log::{debug, warn};

use crate::devices::virtio::device_state::Chain;
use crate::vstate::memory::GuestMemoryMmap;

/// Bytes of entropy served per request at most. The driver gets a shorter buffer back and
/// asks again; this keeps one request from occupying the event loop for long.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// The host entropy source behind one virtio-rng device.
#[derive(Debug)]
pub struct EntropySource {
    /// Opened once at construction, so the device keeps working after the VMM is jailed.
    source: File,
    buf: Vec<u8>,
}

impl EntropySource {
    pub fn new(source: File) -> Self {
        Self {
            source,
            buf: Vec::new(),
        }
    }

    /// Fills the device-writable part of `chain` (up to [`MAX_BYTES_PER_REQUEST`]); returns
    /// the number of bytes written. Device-readable descriptors carry nothing for this device
    /// and are ignored.
    pub fn process_chain(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        let mut writer: Writer<'_> = match chain.writer(mem) {
            Ok(w) => w,
            Err(e) => {
                debug!("virtio-rng: buffer outside guest memory: {e}");
                return 0;
            }
        };
        let n = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        let buf = &mut self.buf[..n];
        if let Err(e) = self.source.read_exact(buf) {
            warn!("virtio-rng: cannot read host entropy: {e}");
            return 0;
        }
        if let Err(e) = writer.write_all(buf) {
            debug!("virtio-rng: cannot fill the guest buffer: {e}");
            return 0;
        }
        // n <= MAX_BYTES_PER_REQUEST.
        n as u32
    }
}
