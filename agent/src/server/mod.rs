//! The agent's request handling, independent of the transport: [`Agent::serve`] runs one
//! connection over any stream (a vsock connection in the guest, a Unix socket in tests).
//!
//! A connection carries any number of requests, one after another: each request is answered
//! completely (for `exec`: all its `output` frames and its `exit`) before the next frame is
//! read. A frame that is not a valid request gets an `error` response and the connection
//! goes on; a length prefix above the frame limit gets an `error` response and the
//! connection is closed, because the rest of the stream can no longer be trusted.
//!
//! Every system call costs the emulated guest kernel of Grove's CI hosts about 0.4 ms, and
//! every packet out is a trip through the VMM. So a connection reads through a buffer (a
//! host's pipelined requests arrive in one read) and holds its answers back while another
//! whole request is already buffered, writing them together before it would wait for
//! input. `exec` output is written as it comes.

mod hooks;
mod ops;
mod process;
#[cfg(test)]
pub(crate) mod tests;

use std::io::{BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::protocol::{
    append_frame, decode_request, encode_response, read_frame, starts_with_frame, ErrorCode, Pong,
    ProtocolError, Request, Response, PROTOCOL_VERSION,
};
use crate::system::{LinuxSystem, System};

/// The hooks directory, relative to the agent's root.
pub const HOOKS_DIR: &str = "etc/grove/hooks.d";

/// The request handlers and the state they share.
pub struct Agent {
    /// The directory the agent's own files are under (`/` in the guest): the hooks
    /// directory, `/etc/hostname`, `/etc/machine-id` and the random seed files. Paths in
    /// `read_file`, `write_file` and `exec` are not relative to it.
    root: PathBuf,
    /// The system changes of `identity`, `reseed` and `clock`; without them those requests
    /// are refused with [`ErrorCode::Unsupported`].
    system: Option<Box<dyn System>>,
}

impl Agent {
    /// An agent whose files are under `root`, with or without system changes.
    pub fn new(root: impl Into<PathBuf>, system: Option<Box<dyn System>>) -> Self {
        Self {
            root: root.into(),
            system,
        }
    }

    /// The agent as it runs in the guest: root `/`, real system changes.
    pub fn guest() -> Self {
        Self::new("/", Some(Box::new(LinuxSystem)))
    }

    /// The directory whose executables `run_hooks` runs.
    pub fn hooks_dir(&self) -> PathBuf {
        self.root.join(HOOKS_DIR)
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn system(&self) -> Option<&dyn System> {
        self.system.as_deref()
    }

    /// Serves one connection until the peer closes it (`Ok`) or it fails. Errors here are
    /// the connection's, never the agent's: the caller just drops the connection.
    pub fn serve<S: Read + Write + AsFd>(&self, stream: S) -> Result<(), ProtocolError> {
        // A second descriptor of the connection, watched for a hang-up while a program runs
        // (the stream itself is borrowed by the replies meanwhile).
        let watch = stream
            .as_fd()
            .try_clone_to_owned()
            .map_err(ProtocolError::Io)?;
        let mut conn = Connection::new(stream);
        loop {
            let frame = conn.next_frame();
            // The agent's own handling time starts here, with the request's frame read.
            let started = Instant::now();
            let body = match frame {
                Ok(Some(body)) => body,
                Ok(None) => return conn.flush(),
                Err(error @ ProtocolError::FrameTooLarge(_)) => {
                    let reply = Response::error(ErrorCode::FrameTooLarge, error.to_string());
                    // The connection is closed either way.
                    let _ = conn.answer(&reply, started).and_then(|()| conn.flush());
                    return Err(error);
                }
                Err(error) => return Err(error),
            };
            match decode_request(&body) {
                Ok(Request::ReportTiming {}) => {
                    conn.timing = true;
                    conn.answer(&Response::Ok {}, started)?;
                    // Written at once: it tells the host that the agent has the connection
                    // before any request after it is carried out (a connection that ends
                    // before this answer arrives carried nothing out and may be retried).
                    conn.flush()?;
                }
                Ok(request) => self.handle(request, Some(watch.as_fd()), &mut |response| {
                    conn.answer(response, started)
                })?,
                Err(error) => {
                    let code = match error {
                        ProtocolError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
                        _ => ErrorCode::BadRequest,
                    };
                    conn.answer(&Response::error(code, describe(&error)), started)?;
                }
            }
        }
    }

    /// Handles one request, passing every response frame to `reply` (one, or for `exec` the
    /// output frames and the exit). An error from `reply` (the connection broke) is returned;
    /// everything that goes wrong with the request itself becomes an `error` response.
    /// While a program runs, a hang-up on `hangup` kills it.
    pub fn handle(
        &self,
        request: Request,
        hangup: Option<BorrowedFd<'_>>,
        reply: &mut dyn FnMut(&Response) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        let response = match request {
            Request::Ping {} => Response::Pong(Pong {
                version: PROTOCOL_VERSION,
                agent_version: crate::AGENT_VERSION.to_owned(),
            }),
            Request::Exec(request) => return ops::exec(&request, hangup, reply),
            Request::ReadFile(request) => ops::read_file(&request),
            Request::WriteFile(request) => ops::write_file(&request),
            Request::Identity(request) => ops::identity(self, &request),
            Request::Reseed(request) => ops::reseed(self, &request),
            Request::Clock(request) => ops::clock(self, &request),
            Request::RunHooks(request) => ops::run_hooks(self, &request),
            // The connection's timing is [`Agent::serve`]'s; here there is nothing to switch.
            Request::ReportTiming {} => Response::Ok {},
        };
        reply(&response)
    }
}

/// One connection's buffered input and held-back answers.
struct Connection<S> {
    reader: BufReader<S>,
    /// Answer frames not written yet.
    pending: Vec<u8>,
    /// The host asked for handling times ([`Request::ReportTiming`]).
    timing: bool,
}

impl<S: Read + Write> Connection<S> {
    fn new(stream: S) -> Self {
        Self {
            reader: BufReader::new(stream),
            pending: Vec::new(),
            timing: false,
        }
    }

    /// The next request frame. Answers held back are written first unless the next frame
    /// is already buffered whole: never wait for the host with its answers unsent.
    fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        if !starts_with_frame(self.reader.buffer()) {
            self.flush()?;
        }
        read_frame(&mut self.reader)
    }

    /// Queues one response frame of the request whose frame was read at `started`. The last
    /// frame of an answer (anything but `output`) carries the handling time if the host asked
    /// for it; `output` is written at once, as a program's output must stream.
    fn answer(&mut self, response: &Response, started: Instant) -> Result<(), ProtocolError> {
        let streaming = matches!(response, Response::Output { .. });
        let handled_us = (self.timing && !streaming)
            .then(|| u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        append_frame(&mut self.pending, &encode_response(response, handled_us)?)?;
        if streaming {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the held-back answers.
    fn flush(&mut self) -> Result<(), ProtocolError> {
        if !self.pending.is_empty() {
            let stream = self.reader.get_mut();
            stream
                .write_all(&self.pending)
                .and_then(|()| stream.flush())
                .map_err(ProtocolError::Io)?;
            self.pending.clear();
        }
        Ok(())
    }
}

/// An error and its causes, as one line.
pub(crate) fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
