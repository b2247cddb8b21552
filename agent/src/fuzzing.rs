//! Entry point for the agent protocol fuzz target of `integration/fuzz` (see
//! `docs/fuzzing.md`), behind the `fuzzing` feature; its corpus is replayed by
//! `integration/tests/fuzz_corpus.rs`.

use std::cell::Cell;
use std::io::{self, Read, Write};

use crate::client::Client;
use crate::protocol::{self, ExecRequest};

/// A connection whose peer's bytes are the fuzzer input; what we send goes nowhere.
struct Scripted<'a> {
    input: &'a [u8],
    /// How much of `input` the client has read.
    pos: &'a Cell<usize>,
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = self.input.get(self.pos.get()..).unwrap_or_default();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos.set(self.pos.get() + n);
        Ok(n)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The input as a byte stream read by both ends of the protocol: the agent reading requests
/// (every decoded request must encode back to itself), and the host's client reading the
/// answers of an agent it does not trust (a guest may run anything on port 52).
pub fn agent_protocol(data: &[u8]) {
    let mut reader = data;
    // Each frame consumes at least its 4-byte header, so this ends.
    while let Ok(Some(body)) = protocol::read_frame(&mut reader) {
        if let Ok(request) = protocol::decode_request(&body) {
            let again = protocol::encode_request(&request)
                .and_then(|bytes| protocol::decode_request(&bytes));
            assert_eq!(again.ok().as_ref(), Some(&request), "request round trip");
        }
        if let Ok(response) = serde_json::from_slice::<protocol::Response>(&body) {
            let again = serde_json::to_vec(&response)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<protocol::Response>(&bytes).ok());
            assert_eq!(again.as_ref(), Some(&response), "response round trip");
        }
    }

    let pos = Cell::new(0);
    let mut client = Client::connect_stream(Scripted {
        input: data,
        pos: &pos,
    });
    let exec = ExecRequest::default();
    // Every round reads at least one byte or ends.
    loop {
        let before = pos.get();
        let _ = client.exec(&exec, |_, _| {});
        let _ = client.run_hooks(None);
        let _ = client.ping();
        if pos.get() == before || pos.get() >= data.len() {
            break;
        }
    }
}
