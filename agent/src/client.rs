//! The host side: a blocking client for one agent connection.
//!
//! [`Client::connect_uds`] goes through the VMM's vsock Unix socket (Firecracker's
//! convention: connect, write `CONNECT <port>\n`, read `OK <host port>\n`, then the stream is
//! the guest's). [`Client::connect_stream`] takes any connected byte stream (tests use a
//! socketpair). A client sends any number of requests on its connection, one after another;
//! each method returns when its request is fully answered. After an error response the
//! connection stays usable; after an I/O or protocol error it should be dropped.
//!
//! A [`Pipeline`] sends several requests at once and reads their answers with the agent's
//! handling time of each; [`Client::connect_uds_with`] sends it in the same write as the
//! `CONNECT` line, so the handshake and the requests cost one trip into the guest together.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{
    append_frame, encode_request, recv_answer, send_request, Answer, ClockRequest, ErrorCode,
    ErrorInfo, ExecRequest, ExitStatus, HookResult, IdentityRequest, Pong, ProtocolError,
    ReadFileRequest, Request, ReseedRequest, Response, RunHooksRequest, Stream, WriteFileRequest,
};

/// The longest handshake reply line accepted (`OK ` + a 32-bit port + newline fits easily).
const MAX_HANDSHAKE_LINE: usize = 64;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the vsock socket {}", .0.display())]
    Connect(PathBuf, #[source] io::Error),
    #[error(
        "the VMM refused the vsock connection to port {port} ({reply}): \
         is the agent running and listening there yet?"
    )]
    Refused {
        /// The guest port asked for.
        port: u32,
        /// What the VMM answered (or "connection closed").
        reply: String,
    },
    #[error("timed out waiting for the agent")]
    Timeout(#[source] io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the agent closed the connection before answering {0}")]
    Closed(&'static str),
    #[error("the agent answered {request} with an unexpected {response} frame")]
    Unexpected {
        request: &'static str,
        response: &'static str,
    },
    #[error("the agent refused {request}: {} ({:?})", .error.message, .error.code)]
    Agent {
        request: &'static str,
        error: ErrorInfo,
    },
}

impl ClientError {
    /// Whether the connection ended (closed or reset) rather than failed otherwise: after
    /// [`Client::taken`] failed this way, the agent carried out nothing of the pipeline.
    pub fn ended_early(&self) -> bool {
        match self {
            Self::Closed(_) | Self::Protocol(ProtocolError::Truncated { .. }) => true,
            Self::Protocol(ProtocolError::Io(e)) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }

    /// The agent's error response, if this is one.
    pub fn agent_error(&self) -> Option<&ErrorInfo> {
        match self {
            Self::Agent { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Maps a timed-out read or write to [`ClientError::Timeout`].
fn io_error(e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout(e),
        _ => ClientError::Protocol(ProtocolError::Io(e)),
    }
}

fn protocol_error(e: ProtocolError) -> ClientError {
    match e {
        ProtocolError::Io(e) => io_error(e),
        other => ClientError::Protocol(other),
    }
}

/// A connection to the agent.
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    /// The host port the VMM named in its `OK <port>` line (vsock connections only).
    host_port: Option<u32>,
}

impl Client<UnixStream> {
    /// Connects through the VMM's vsock Unix socket at `path` to guest port `port` (the
    /// agent's is [`crate::AGENT_PORT`]). `timeout` bounds the handshake and then every
    /// single read and write on the connection, i.e. the longest silence accepted from the
    /// agent (an `exec` of a program that prints nothing for longer fails with
    /// [`ClientError::Timeout`]); change it with [`Client::set_timeout`].
    pub fn connect_uds(path: &Path, port: u32, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_uds_with(path, port, timeout, &[])
    }

    /// [`Client::connect_uds`], writing `early` (e.g. [`Pipeline::bytes`]) in the same write
    /// as the `CONNECT` line: the VMM hands those bytes to the guest as soon as the
    /// connection is accepted, without waiting for the host to see `OK`. A refusal
    /// ([`ClientError::Refused`], [`ClientError::Connect`]) means the agent received none of
    /// them.
    pub fn connect_uds_with(
        path: &Path,
        port: u32,
        timeout: Duration,
        early: &[u8],
    ) -> Result<Self, ClientError> {
        let mut stream =
            UnixStream::connect(path).map_err(|e| ClientError::Connect(path.to_owned(), e))?;
        let set = |s: &UnixStream| -> io::Result<()> {
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))
        };
        set(&stream).map_err(|e| ClientError::Connect(path.to_owned(), e))?;
        let mut hello = format!("CONNECT {port}\n").into_bytes();
        hello.extend_from_slice(early);
        // A VMM that refuses closes the socket with our bytes unread, which Linux reports to
        // us as a reset (or a broken pipe) rather than an end of file: before `OK`, that is a
        // refusal like any other close.
        let refused = |e: io::Error| match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => ClientError::Refused {
                port,
                reply: "connection closed".to_owned(),
            },
            _ => io_error(e),
        };
        stream.write_all(&hello).map_err(refused)?;
        // Byte by byte: nothing after the newline may be consumed here.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match stream.read(&mut byte) {
                Ok(0) => {
                    return Err(ClientError::Refused {
                        port,
                        reply: "connection closed".to_owned(),
                    })
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if line.len() < MAX_HANDSHAKE_LINE => line.push(byte[0]),
                Ok(_) => {
                    return Err(ClientError::Refused {
                        port,
                        reply: format!("{}...", String::from_utf8_lossy(&line)),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(refused(e)),
            }
        }
        let reply = String::from_utf8_lossy(&line).into_owned();
        let Some(host_port) = reply
            .strip_prefix("OK ")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            return Err(ClientError::Refused { port, reply });
        };
        Ok(Self {
            stream,
            host_port: Some(host_port),
        })
    }

    /// Changes the read/write timeout of the connection (`None`: wait forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream
            .set_read_timeout(timeout)
            .and_then(|()| self.stream.set_write_timeout(timeout))
            .map_err(|e| ClientError::Protocol(ProtocolError::Io(e)))
    }
}

impl<S: Read + Write> Client<S> {
    /// A client on an already connected stream to the agent (no handshake).
    pub fn connect_stream(stream: S) -> Self {
        Self {
            stream,
            host_port: None,
        }
    }

    /// The host port of the connection, from the VMM's `OK <port>` line (`None` for a
    /// stream connected otherwise): what the VMM's control socket knows the connection by.
    pub fn host_port(&self) -> Option<u32> {
        self.host_port
    }

    /// The underlying stream.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Sends `request` and reads the next response frame.
    fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        send_request(&mut self.stream, request).map_err(protocol_error)?;
        self.next(request.op())
    }

    /// The next response frame to `op`; an `error` frame becomes [`ClientError::Agent`].
    fn next(&mut self, op: &'static str) -> Result<Response, ClientError> {
        self.next_answer(op).map(|answer| answer.response)
    }

    /// [`Client::next`] with the agent's handling time.
    fn next_answer(&mut self, op: &'static str) -> Result<Answer, ClientError> {
        match recv_answer(&mut self.stream).map_err(protocol_error)? {
            None => Err(ClientError::Closed(op)),
            Some(Answer {
                response: Response::Error(error),
                ..
            }) => Err(ClientError::Agent { request: op, error }),
            Some(answer) => Ok(answer),
        }
    }

    fn expect_ok(&mut self, request: &Request) -> Result<(), ClientError> {
        match self.call(request)? {
            Response::Ok {} => Ok(()),
            other => Err(unexpected(request, &other)),
        }
    }

    /// `ping`: the agent's protocol and crate version.
    pub fn ping(&mut self) -> Result<Pong, ClientError> {
        let request = Request::Ping {};
        match self.call(&request)? {
            Response::Pong(pong) => Ok(pong),
            other => Err(unexpected(&request, &other)),
        }
    }

    /// `exec`: runs a program, passing its output to `on_output` as it arrives, and returns
    /// how it ended.
    pub fn exec(
        &mut self,
        request: &ExecRequest,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, ClientError> {
        let request = Request::Exec(request.clone());
        let mut response = self.call(&request)?;
        loop {
            match response {
                Response::Output { stream, data } => on_output(stream, &data),
                Response::Exit(status) => return Ok(status),
                other => return Err(unexpected(&request, &other)),
            }
            response = self.next(request.op())?;
        }
    }

    /// `read_file`: the contents of an absolute guest path.
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, ClientError> {
        let request = Request::ReadFile(ReadFileRequest {
            path: path.to_owned(),
        });
        match self.call(&request)? {
            Response::File { data } => Ok(data),
            other => Err(unexpected(&request, &other)),
        }
    }

    /// `write_file`: creates or replaces an absolute guest path.
    pub fn write_file(
        &mut self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<(), ClientError> {
        self.expect_ok(&Request::WriteFile(WriteFileRequest {
            path: path.to_owned(),
            data: data.to_vec(),
            mode,
        }))
    }

    /// `identity`: hostname, machine-id and optionally the address.
    pub fn identity(&mut self, request: &IdentityRequest) -> Result<(), ClientError> {
        self.expect_ok(&Request::Identity(request.clone()))
    }

    /// `reseed`: mixes `entropy` into the guest kernel's pool and resets the seed files.
    pub fn reseed(&mut self, entropy: &[u8]) -> Result<(), ClientError> {
        self.expect_ok(&Request::Reseed(ReseedRequest {
            entropy: entropy.to_vec(),
        }))
    }

    /// `clock`: sets the guest's wall clock.
    pub fn clock(&mut self, unix_nanos: u64) -> Result<(), ClientError> {
        self.expect_ok(&Request::Clock(ClockRequest { unix_nanos }))
    }

    /// Sends every request of `requests` in one write before reading any answer (one round
    /// trip for all of them instead of one each; the agent answers in order), then reads one
    /// answer per request, with the agent's handling time of each (see [`Pipeline`]).
    pub fn pipeline(&mut self, requests: &[Request]) -> Result<Vec<Answer>, ClientError> {
        let pipeline = Pipeline::new(requests)?;
        self.stream
            .write_all(pipeline.bytes())
            .and_then(|()| self.stream.flush())
            .map_err(io_error)?;
        self.answers(&pipeline)
    }

    /// Reads the answers to `pipeline`, already sent on this connection (by
    /// [`Client::connect_uds_with`] or [`Client::pipeline`]). The first error answer to one
    /// of its requests ends it as [`ClientError::Agent`]; the connection should then be
    /// dropped.
    pub fn answers(&mut self, pipeline: &Pipeline) -> Result<Vec<Answer>, ClientError> {
        self.taken()?;
        self.step_answers(pipeline)
    }

    /// Reads the answer to a pipeline's leading `report_timing`, which the agent writes at
    /// once, before it carries out anything after it: once this returns, the agent has the
    /// connection. If the connection ends before ([`ClientError::ended_early`]), none of
    /// the pipeline's requests were carried out.
    pub fn taken(&mut self) -> Result<(), ClientError> {
        // An agent that predates `report_timing` rejects it as a bad request and answers the
        // rest without times.
        let timing = Request::ReportTiming {};
        match self.next_answer(timing.op()) {
            Ok(Answer {
                response: Response::Ok {},
                ..
            }) => Ok(()),
            Err(ClientError::Agent { error, .. }) if error.code == ErrorCode::BadRequest => Ok(()),
            Err(e) => Err(e),
            Ok(other) => Err(unexpected(&timing, &other.response)),
        }
    }

    /// Reads the answers to a pipeline's requests, after [`Client::taken`].
    pub fn step_answers(&mut self, pipeline: &Pipeline) -> Result<Vec<Answer>, ClientError> {
        pipeline.ops.iter().map(|op| self.next_answer(op)).collect()
    }

    /// `run_hooks`: runs the post-clone hooks (each limited to `timeout_ms`, default
    /// [`crate::protocol::DEFAULT_HOOK_TIMEOUT_MS`]) and returns every result in order.
    pub fn run_hooks(&mut self, timeout_ms: Option<u64>) -> Result<Vec<HookResult>, ClientError> {
        let request = Request::RunHooks(RunHooksRequest { timeout_ms });
        match self.call(&request)? {
            Response::Hooks { results } => Ok(results),
            other => Err(unexpected(&request, &other)),
        }
    }
}

/// Requests to send at once, encoded: `report_timing` (so every answer brings the agent's
/// handling time), then the requests in order. Only requests answered by a single frame
/// (not `exec`).
#[derive(Debug, Clone)]
pub struct Pipeline {
    ops: Vec<&'static str>,
    bytes: Vec<u8>,
}

impl Pipeline {
    /// Encodes `requests`; `exec` is refused ([`ClientError::Unexpected`]).
    pub fn new(requests: &[Request]) -> Result<Self, ClientError> {
        let mut bytes = Vec::new();
        let mut ops = Vec::with_capacity(requests.len());
        let frame = |bytes: &mut Vec<u8>, request: &Request| {
            encode_request(request)
                .and_then(|body| append_frame(bytes, &body))
                .map_err(ClientError::Protocol)
        };
        frame(&mut bytes, &Request::ReportTiming {})?;
        for request in requests {
            if matches!(request, Request::Exec(_)) {
                return Err(ClientError::Unexpected {
                    request: request.op(),
                    response: "pipeline (exec streams its answer)",
                });
            }
            frame(&mut bytes, request)?;
            ops.push(request.op());
        }
        Ok(Self { ops, bytes })
    }

    /// The frames, to write as they are.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// How many requests (`report_timing` not counted).
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there are no requests.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

fn unexpected(request: &Request, response: &Response) -> ClientError {
    ClientError::Unexpected {
        request: request.op(),
        response: response.op(),
    }
}
