//! The server side of the control socket, run as a subscriber of the VMM's event loop.
//!
//! Everything is non-blocking and bounded per connection: a client that sends garbage gets
//! an error response, one that sends too much is disconnected, one that stops reading its
//! responses stops being read (back-pressure), and none of this touches other clients.
//! Requests are handled on the event-loop thread on purpose: while the handler runs, no
//! device processes guest I/O, so a snapshot sees quiescent devices.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::Value;
use vmm_sys_util::epoll::EventSet;

use super::protocol::{
    self, ErrorCode, ProtocolError, RequestEnvelope, Response, ResponseEnvelope,
    FRAME_HEADER_BYTES, PROTOCOL_VERSION,
};
use super::ControlHandler;

/// Connections served at once. More are accepted only to be told so and closed, so a
/// runaway client cannot exhaust the VMM's file descriptors.
pub const MAX_CONNECTIONS: usize = 16;

/// Unsent output a connection may hold before it is dropped. The server handles the next
/// request of a connection only once the previous response is fully sent, so a
/// connection holds at most one response; this bound only catches a broken invariant.
pub const MAX_PENDING_OUTPUT: usize = FRAME_HEADER_BYTES + protocol::MAX_MESSAGE_BYTES;

/// Bytes read from one connection per wake-up, so one busy client cannot keep the event
/// loop from devices and other clients; epoll is level-triggered and wakes us again.
const READ_BUDGET: usize = 64 * 1024;

/// Requests handled for one connection per wake-up, for the same reason. When a client
/// has pipelined more, the connection waits for "writable" instead of "readable": its
/// socket is writable at once, so the rest is handled on the next turn of the loop, after
/// the other ready descriptors.
const FRAME_BUDGET: usize = 16;

/// Connections accepted per wake-up, for the same reason.
const ACCEPT_BUDGET: usize = 32;

/// Longest error message sent back. serde's messages quote the offending input, which a
/// client controls; the cap keeps error responses small whatever it sent.
const MAX_ERROR_MESSAGE: usize = 512;

/// Size of `sockaddr_un.sun_path` on Linux, including the terminating NUL.
const SUN_PATH_LEN: usize = 108;

/// Errors creating the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {} is in use by another process", .0.display())]
    InUse(PathBuf),
    #[error("{} exists and is not a socket; refusing to replace it with the control socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot check the existing file at control socket path {}", path.display())]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale control socket {}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the control socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The listening control socket and its connections.
pub struct ControlServer {
    path: PathBuf,
    /// Device and inode of the socket file we created, so `Drop` removes only our own file
    /// and never one another process put at the same path since.
    identity: Option<(u64, u64)>,
    listener: UnixListener,
    handler: Arc<dyn ControlHandler>,
    connections: HashMap<RawFd, Connection>,
}

impl ControlServer {
    /// Creates the socket at `path` with mode 0600, replacing a stale socket file that
    /// nobody listens on; a live socket or any other kind of file is left alone and is an
    /// error. The socket is served once the server is added to an event loop.
    pub fn bind(path: &Path, handler: Arc<dyn ControlHandler>) -> Result<Self, ControlError> {
        clear_stale(path)?;
        let listener = bind_private(path)?;
        let bind_err = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        let identity = match fs::symlink_metadata(path) {
            Ok(m) => (m.dev(), m.ino()),
            Err(e) => {
                let _ = fs::remove_file(path);
                return Err(bind_err(e));
            }
        };
        let server = Self {
            path: path.to_owned(),
            identity: Some(identity),
            listener,
            handler,
            connections: HashMap::new(),
        };
        // From here on, `Drop` removes the file if something below fails.
        server.listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(server)
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connections currently served.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    fn accept(&mut self, ops: &mut EventOps) {
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream, ops),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    log::warn!("control socket: accept failed: {e}");
                    break;
                }
            }
        }
    }

    fn admit(&mut self, stream: UnixStream, ops: &mut EventOps) {
        if self.connections.len() >= MAX_CONNECTIONS {
            refuse(stream);
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("control socket: cannot make a connection non-blocking: {e}");
            return;
        }
        if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
            log::warn!("control socket: cannot watch a connection: {e:?}");
            return;
        }
        self.connections
            .insert(stream.as_raw_fd(), Connection::new(stream));
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(conn) = self.connections.remove(&fd) {
            // Unregister before the descriptor is closed (when `conn` drops): event-manager
            // keeps its own fd table and would refuse a new connection reusing the number.
            if let Err(e) = ops.remove(Events::empty(&conn.stream)) {
                log::warn!("control socket: cannot stop watching a connection: {e:?}");
            }
        }
    }
}

impl MutEventSubscriber for ControlServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!(
                "cannot watch the control socket {}: {e:?}",
                self.path.display()
            );
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        let handler = self.handler.as_ref();
        let Some(conn) = self.connections.get_mut(&fd) else {
            return;
        };
        match conn.service(events.event_set(), handler) {
            Next::Close => self.close(fd, ops),
            Next::Wait(interest) if interest != conn.interest => {
                match ops.modify(Events::new(&conn.stream, interest)) {
                    Ok(()) => conn.interest = interest,
                    Err(e) => {
                        log::warn!("control socket: cannot change a connection's events: {e:?}");
                        self.close(fd, ops);
                    }
                }
            }
            Next::Wait(_) => {}
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .map(|m| Some((m.dev(), m.ino())) == self.identity)
            .unwrap_or(false);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                log::warn!(
                    "cannot remove the control socket {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// What a connection waits for after being serviced.
#[derive(Debug, PartialEq)]
enum Next {
    Wait(EventSet),
    Close,
}

/// One client connection and its buffers.
struct Connection {
    stream: UnixStream,
    /// Received bytes not yet handled: at most one partial frame plus one read budget.
    input: Vec<u8>,
    /// Encoded responses not yet accepted by the socket.
    output: Vec<u8>,
    /// The events currently registered for the stream.
    interest: EventSet,
    /// The client closed its sending side.
    peer_closed: bool,
    /// A framing error ended the conversation: send what is queued, then close.
    closing: bool,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            interest: EventSet::IN,
            peer_closed: false,
            closing: false,
        }
    }

    /// Reads what is available, handles complete frames, sends responses, and says what to
    /// wait for next. Any I/O error ends the connection quietly: the client is gone.
    fn service(&mut self, events: EventSet, handler: &dyn ControlHandler) -> Next {
        if events.contains(EventSet::ERROR) {
            return Next::Close;
        }
        if events.contains(EventSet::IN) && self.read_available().is_err() {
            return Next::Close;
        }
        if events.contains(EventSet::HANG_UP) && !events.contains(EventSet::IN) {
            return Next::Close;
        }
        let more = match self.handle_frames(handler) {
            Ok(more) => more,
            Err(_) => return Next::Close,
        };
        if !self.output.is_empty() || more {
            // Back-pressure: no more reading until the client takes its responses (or
            // until the next turn of the loop, when the frame budget ran out).
            Next::Wait(EventSet::OUT)
        } else if self.closing || self.peer_closed {
            // Everything complete has been answered; a partial frame is dropped with the
            // connection.
            Next::Close
        } else {
            Next::Wait(EventSet::IN)
        }
    }

    fn read_available(&mut self) -> io::Result<()> {
        if self.closing || self.peer_closed {
            return Ok(());
        }
        let mut buf = [0u8; 16 * 1024];
        let mut budget = READ_BUDGET;
        while budget > 0 {
            match self.stream.read(&mut buf[..budget.min(16 * 1024)]) {
                Ok(0) => {
                    self.peer_closed = true;
                    break;
                }
                Ok(n) => {
                    self.input.extend_from_slice(&buf[..n]);
                    budget -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Handles complete frames one at a time, each only once the previous response has
    /// been sent in full. Returns whether the frame budget ran out with input left over.
    fn handle_frames(&mut self, handler: &dyn ControlHandler) -> io::Result<bool> {
        let mut handled = 0;
        loop {
            self.flush()?;
            if !self.output.is_empty() || self.closing {
                return Ok(false);
            }
            if handled == FRAME_BUDGET {
                return Ok(!self.input.is_empty());
            }
            match take_frame(&mut self.input) {
                Ok(Some(body)) => {
                    handled += 1;
                    let response = respond(&body, handler);
                    self.queue(&response)?;
                }
                Ok(None) => return Ok(false),
                Err(e) => {
                    // The stream cannot be resynchronised after a bad length: answer and
                    // hang up.
                    let (code, what) = match e {
                        ProtocolError::TooLarge(_) => (ErrorCode::TooLarge, "message too large"),
                        _ => (ErrorCode::BadRequest, "bad frame"),
                    };
                    log::debug!("control socket: {what}, closing the connection: {e}");
                    self.input = Vec::new();
                    self.closing = true;
                    self.queue(&envelope(None, Response::error(code, e.to_string())))?;
                }
            }
        }
    }

    fn queue(&mut self, response: &ResponseEnvelope) -> io::Result<()> {
        let frame = protocol::encode(response).or_else(|e| {
            let message = format!("the response could not be sent: {e}");
            protocol::encode(&envelope(
                response.id,
                Response::error(ErrorCode::Failed, message),
            ))
        });
        let frame = frame.map_err(io::Error::other)?;
        if self.output.len() + frame.len() > MAX_PENDING_OUTPUT {
            return Err(io::Error::other("too much unsent output"));
        }
        self.output.extend_from_slice(&frame);
        Ok(())
    }

    /// Writes queued output until done or the socket is full.
    fn flush(&mut self) -> io::Result<()> {
        let mut sent = 0;
        while sent < self.output.len() {
            match self.stream.write(&self.output[sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.output.drain(..sent);
        Ok(())
    }
}

/// Removes and returns the body of the first complete frame in `input`, if there is one.
fn take_frame(input: &mut Vec<u8>) -> Result<Option<Vec<u8>>, ProtocolError> {
    let Some(prefix) = input.first_chunk::<FRAME_HEADER_BYTES>() else {
        return Ok(None);
    };
    let len = protocol::body_len(*prefix)?;
    if input.len() < FRAME_HEADER_BYTES + len {
        return Ok(None);
    }
    let body = input[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len].to_vec();
    input.drain(..FRAME_HEADER_BYTES + len);
    Ok(Some(body))
}

/// The response to one frame body. Only a well-formed request of this protocol version
/// reaches the handler.
fn respond(body: &[u8], handler: &dyn ControlHandler) -> ResponseEnvelope {
    // Parse loosely first: the id and version are wanted even when the rest is wrong, and
    // a request of another version may not parse as one of this version at all.
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_request(None, &format!("invalid JSON: {e}")),
    };
    let id = value.get("id").and_then(Value::as_u64);
    if let Some(version) = value.get("version").and_then(Value::as_u64) {
        if version != u64::from(PROTOCOL_VERSION) {
            let message = format!(
                "protocol version {version} is not supported; this VMM speaks version {PROTOCOL_VERSION}"
            );
            return envelope(id, Response::error(ErrorCode::UnsupportedVersion, message));
        }
    }
    match serde_json::from_value::<RequestEnvelope>(value) {
        Ok(request) => envelope(request.id, handler.handle(request.request)),
        Err(e) => bad_request(id, &format!("invalid request: {e}")),
    }
}

fn bad_request(id: Option<u64>, message: &str) -> ResponseEnvelope {
    log::debug!("control socket: {message}");
    let message = truncate(message, MAX_ERROR_MESSAGE);
    envelope(id, Response::error(ErrorCode::BadRequest, message))
}

fn envelope(id: Option<u64>, response: Response) -> ResponseEnvelope {
    ResponseEnvelope {
        version: PROTOCOL_VERSION,
        id,
        response,
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Fuzz entry point (`fuzzing` feature, docs/fuzzing.md): `input` is what one client sends,
/// fed through a socket pair to the connection code the server runs (reading, framing,
/// parsing, answering, back-pressure) as fast as the socket takes it, with a handler that
/// answers every well-formed request with an error echoing it.
#[cfg(feature = "fuzzing")]
pub fn fuzz_control_server(input: &[u8]) {
    struct Echo;
    impl ControlHandler for Echo {
        fn handle(&self, request: protocol::Request) -> Response {
            Response::error(ErrorCode::Failed, format!("{request:?}"))
        }
    }
    let Ok((server_end, mut client)) = UnixStream::pair() else {
        return;
    };
    if server_end.set_nonblocking(true).is_err() || client.set_nonblocking(true).is_err() {
        return;
    }
    let mut conn = Connection::new(server_end);
    let mut sent = 0;
    let mut events = EventSet::IN;
    let mut sink = vec![0u8; 64 * 1024];
    // Every round moves input or output along, or the connection ends: this bound is far above
    // what the largest input needs.
    for _ in 0..input.len() / 1024 + 64 {
        if sent < input.len() {
            if let Ok(n) = client.write(&input[sent..]) {
                sent += n;
            }
        } else {
            let _ = client.shutdown(std::net::Shutdown::Write);
        }
        match conn.service(events, &Echo) {
            Next::Close => return,
            Next::Wait(next) => events = next,
        }
        while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// Tells a connection over the limit why it is closed. Best effort: a new socket's buffer
/// takes the small frame without blocking, and if not, the client just sees the close.
fn refuse(stream: UnixStream) {
    log::debug!("control socket: refusing a connection, {MAX_CONNECTIONS} already open");
    let message =
        format!("too many control connections (at most {MAX_CONNECTIONS}); try again later");
    if stream.set_nonblocking(true).is_ok() {
        if let Ok(frame) =
            protocol::encode(&envelope(None, Response::error(ErrorCode::Failed, message)))
        {
            let _ = (&stream).write(&frame);
        }
    }
}

/// Makes room at `path`: nothing there is fine; a socket file nobody listens on (left by a
/// VMM that crashed) is removed; anything else is an error and is not touched.
fn clear_stale(path: &Path) -> Result<(), ControlError> {
    let probe_err = |source| ControlError::Probe {
        path: path.to_owned(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(probe_err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ControlError::InUse(path.to_owned())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            log::info!("removing stale control socket {}", path.display());
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ControlError::RemoveStale {
                    path: path.to_owned(),
                    source,
                }),
            }
        }
        Err(e) => Err(probe_err(e)),
    }
}

/// Binds a listening socket at `path` that only our user can ever connect to.
///
/// `bind` creates the file with the umask's mode and std's `UnixListener::bind` listens at
/// once, so chmod-after-bind leaves a moment in which a permissive umask lets others
/// connect. Instead the socket is bound inside a fresh 0700 directory next to `path`, made
/// 0600, then hard-linked into place: the link fails rather than replaces if something
/// appeared at `path` meanwhile. Where that cannot work (the temporary path is too long
/// for a socket address, or the filesystem has no hard links) the socket is bound in place
/// and chmod-ed at once.
fn bind_private(path: &Path) -> Result<UnixListener, ControlError> {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let bind_err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = parent.join(format!(
        ".grove-control-{}-{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = dir.join("s");
    if path.file_name().is_none() || temp.as_os_str().len() >= SUN_PATH_LEN {
        return bind_in_place(path);
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(bind_err)?;
    let _cleanup = TempDir(&dir);
    let listener = UnixListener::bind(&temp).map_err(bind_err)?;
    fs::set_permissions(&temp, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    match fs::hard_link(&temp, path) {
        Ok(()) => Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(ControlError::InUse(path.to_owned()))
        }
        Err(e) => {
            log::debug!("cannot hard-link the control socket ({e}); binding it in place");
            drop(listener);
            bind_in_place(path)
        }
    }
}

fn bind_in_place(path: &Path) -> Result<UnixListener, ControlError> {
    let listener = UnixListener::bind(path).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => ControlError::InUse(path.to_owned()),
        _ => ControlError::Bind {
            path: path.to_owned(),
            source,
        },
    })?;
    if let Err(source) = fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
        let _ = fs::remove_file(path);
        return Err(ControlError::Bind {
            path: path.to_owned(),
            source,
        });
    }
    Ok(listener)
}

/// Removes the temporary bind directory (and the socket name in it) on every path out.
struct TempDir<'a>(&'a Path);

impl Drop for TempDir<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.0.join("s"));
        if let Err(e) = fs::remove_dir(self.0) {
            log::warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}
