//! Entry points for the fuzz targets of `integration/fuzz` (see `docs/fuzzing.md`), behind the
//! `fuzzing` feature. Each takes the raw fuzzer input and must return normally for every input:
//! a panic (or a sanitizer report) is a bug in the code under test. The same functions replay
//! the committed corpora in `integration/tests/fuzz_corpus.rs`, so every crash found stays a
//! regression test under plain `cargo test`.
//!
//! Inputs are read with [`arbitrary::Unstructured`]: a target that runs out of input stops
//! there, so every byte string is a valid (if short) case.

mod files;
mod virtio;
mod vsock;

pub use crate::control::server::fuzz_control_server as control_server;
pub use files::{qcow2_image, snapshot_state};
pub use virtio::{block_requests, mmio_registers, virtio_queue};
pub use vsock::vsock_packets;

/// Control protocol, both directions: frames a client sends to the VMM's control server (through
/// the server's own connection code, see [`control_server`]), and frames the daemon's client
/// reads back from a VMM it does not trust.
pub fn control_protocol(data: &[u8]) {
    use crate::control::protocol::{self, ResponseEnvelope};
    let mut reader = data;
    // Each read consumes at least the prefix, so this ends.
    while let Ok(body) = protocol::read_frame(&mut reader) {
        let _ = protocol::decode::<ResponseEnvelope>(&body);
    }
    control_server(data);
}
