//! A blocking client of the control socket, for tests, benchmarks and the daemon.
//!
//! One request at a time: `request` sends a frame and waits for its answer. Timeouts keep
//! a caller from hanging on a VMM that stopped answering; after any error other than an
//! error *response*, the stream may be out of step, so the client refuses further use.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{
    self, ProtocolError, Request, RequestEnvelope, Response, ResponseEnvelope, PROTOCOL_VERSION,
};

/// Errors talking to the control socket. A request the VMM rejected is not one of these:
/// it is `Ok(Response::Error(_))`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the control socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the control socket timeout")]
    SetTimeout(#[source] io::Error),
    #[error("control socket I/O failed")]
    Io(#[source] io::Error),
    #[error("timed out waiting for the VMM to answer")]
    TimedOut,
    #[error("the VMM closed the control connection")]
    Closed,
    #[error(transparent)]
    Protocol(ProtocolError),
    #[error(
        "the VMM answered with protocol version {0}; this client speaks version {PROTOCOL_VERSION}"
    )]
    Version(u32),
    #[error("the VMM answered request {got:?} while request {expected} was waiting")]
    IdMismatch { expected: u64, got: Option<u64> },
    #[error("this control connection failed earlier and cannot be used any more")]
    Unusable,
}

/// A connection to one VMM's control socket.
#[derive(Debug)]
pub struct ControlClient {
    stream: UnixStream,
    next_id: u64,
    broken: bool,
}

impl ControlClient {
    /// Read and write timeout used by [`ControlClient::connect`]. Generous, because a
    /// snapshot of a large VM is answered only when written.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    /// Connects with [`Self::DEFAULT_TIMEOUT`].
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::connect_with_timeout(path, Some(Self::DEFAULT_TIMEOUT))
    }

    /// Connects with the given read and write timeout (`None`: wait forever).
    pub fn connect_with_timeout(
        path: impl AsRef<Path>,
        timeout: Option<Duration>,
    ) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let client = Self {
            stream,
            next_id: 1,
            broken: false,
        };
        client.set_timeout(timeout)?;
        Ok(client)
    }

    /// Changes the read and write timeout (`None`: wait forever; zero is invalid).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream
            .set_read_timeout(timeout)
            .and_then(|()| self.stream.set_write_timeout(timeout))
            .map_err(ClientError::SetTimeout)
    }

    /// Sends `request` and waits for its response.
    pub fn request(&mut self, request: Request) -> Result<Response, ClientError> {
        if self.broken {
            return Err(ClientError::Unusable);
        }
        let result = self.exchange(request);
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn exchange(&mut self, request: Request) -> Result<Response, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let envelope = RequestEnvelope {
            version: PROTOCOL_VERSION,
            id: Some(id),
            request,
        };
        if let Err(e) = protocol::write_frame(&mut self.stream, &envelope) {
            // A VMM that refused the connection said why before closing it; show that
            // rather than a bare broken pipe.
            if is_closed(&e) {
                if let Ok(response @ Response::Error(_)) = self.read_response(id) {
                    return Ok(response);
                }
            }
            return Err(classify(e));
        }
        self.read_response(id)
    }

    fn read_response(&mut self, id: u64) -> Result<Response, ClientError> {
        let body = protocol::read_frame(&mut self.stream).map_err(classify)?;
        let envelope: ResponseEnvelope = protocol::decode(&body).map_err(classify)?;
        if envelope.version != PROTOCOL_VERSION {
            return Err(ClientError::Version(envelope.version));
        }
        match (envelope.id, envelope.response) {
            (Some(got), response) if got == id => Ok(response),
            // The VMM could not read the request far enough to learn its id (or refused
            // the connection): the error is still the answer to this request.
            (None, response @ Response::Error(_)) => Ok(response),
            (got, _) => Err(ClientError::IdMismatch { expected: id, got }),
        }
    }
}

fn is_closed(e: &ProtocolError) -> bool {
    matches!(e, ProtocolError::Io(io) if matches!(
        io.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    ))
}

fn classify(e: ProtocolError) -> ClientError {
    match e {
        ProtocolError::Io(io) => match io.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset => ClientError::Closed,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::TimedOut,
            _ => ClientError::Io(io),
        },
        other => ClientError::Protocol(other),
    }
}
