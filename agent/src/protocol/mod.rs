//! Wire types and framing of the agent protocol (`docs/agent-protocol.md`).
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one JSON object, at
//! most [`MAX_FRAME_BYTES`]. Requests carry the protocol version in `"v"` and name their
//! operation in `"op"`; responses name theirs in `"op"`. Every type rejects unknown fields, so
//! a peer that does not understand part of a message says so instead of silently doing less.
//! Byte fields are standard base64 with padding ([`base64`]). This module knows nothing about
//! sockets or processes: the host client and the guest agent share it.

pub mod base64;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. A request with another `"v"` gets an error
/// response with code [`ErrorCode::VersionMismatch`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest frame body, in bytes. A larger length prefix is refused before anything is
/// allocated, and the connection is closed.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// The largest file `read_file` returns (its base64 text must fit in one frame).
pub const MAX_FILE_BYTES: usize = 512 * 1024;

/// The largest `data` of one `output` frame.
pub const MAX_OUTPUT_CHUNK_BYTES: usize = 32 * 1024;

/// The largest `entropy` of a `reseed` request.
pub const MAX_ENTROPY_BYTES: usize = 64 * 1024;

/// Size of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Errors reading, writing, encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    FrameTooLarge(usize),
    #[error("connection closed in the middle of a frame ({got} of {expected} bytes)")]
    Truncated { expected: usize, got: usize },
    #[error("cannot encode the message as JSON")]
    Encode(#[source] serde_json::Error),
    #[error("invalid message")]
    Decode(#[source] serde_json::Error),
    #[error("a request must be a JSON object")]
    NotAnObject,
    #[error("request has protocol version {got:?}, this agent speaks version {PROTOCOL_VERSION}")]
    VersionMismatch {
        /// The `"v"` the request carried (`None`: missing or not a number).
        got: Option<u64>,
    },
    #[error("agent connection I/O failed")]
    Io(#[source] io::Error),
}

/// What the host asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Readiness check; answered with [`Response::Pong`] without starting any process.
    Ping {},
    /// Run a program; answered with [`Response::Output`] frames and one [`Response::Exit`].
    Exec(ExecRequest),
    /// Read a whole file (at most [`MAX_FILE_BYTES`]); answered with [`Response::File`].
    ReadFile(ReadFileRequest),
    /// Create or replace a file; answered with [`Response::Ok`].
    WriteFile(WriteFileRequest),
    /// Apply a new hostname, machine-id and optionally address; answered with `ok`.
    Identity(IdentityRequest),
    /// Mix host entropy into the kernel pool, reseed, rewrite seed files; answered with `ok`.
    Reseed(ReseedRequest),
    /// Set the wall clock; answered with `ok`.
    Clock(ClockRequest),
    /// Run the post-clone hooks; answered with [`Response::Hooks`].
    RunHooks(RunHooksRequest),
    /// From this answer on, end every answer on this connection with
    /// [`HANDLED_US_FIELD`] (see [`Answer`]); answered with `ok`. An agent older than this
    /// request answers `bad_request` and reports no times: that is how a host tells.
    ReportTiming {},
}

impl Request {
    /// The operation name on the wire, for messages.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Ping {} => "ping",
            Self::Exec(_) => "exec",
            Self::ReadFile(_) => "read_file",
            Self::WriteFile(_) => "write_file",
            Self::Identity(_) => "identity",
            Self::Reseed(_) => "reseed",
            Self::Clock(_) => "clock",
            Self::RunHooks(_) => "run_hooks",
            Self::ReportTiming {} => "report_timing",
        }
    }
}

/// A program to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` without a `/` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables set on top of the agent's own environment
    /// (`PATH=/sbin:/usr/sbin:/bin:/usr/bin`, `HOME=/root` in the default image).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes written to the program's standard input, which is then closed (empty: stdin
    /// is `/dev/null`).
    #[serde(default, with = "base64")]
    pub stdin: Vec<u8>,
    /// Kill the program's process group after this long (default: no limit).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A file to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileRequest {
    /// Absolute path in the guest.
    pub path: String,
}

/// A file to write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileRequest {
    /// Absolute path in the guest; the parent directory must exist.
    pub path: String,
    /// The new contents.
    #[serde(with = "base64")]
    pub data: Vec<u8>,
    /// Permission bits (e.g. `0o755` = 493), applied also to an existing file; default: a new
    /// file gets 0644, an existing one keeps its mode.
    #[serde(default)]
    pub mode: Option<u32>,
}

/// The identity a clone takes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRequest {
    /// Host name (1-64 characters of `A-Z a-z 0-9 - .`, not starting with `-` or `.`):
    /// `sethostname(2)` and `/etc/hostname`.
    pub hostname: String,
    /// 32 lowercase hex digits, not all zero: `/etc/machine-id`.
    pub machine_id: String,
    /// An IPv4 address for `eth0` and its default route (default: leave the network alone).
    #[serde(default)]
    pub address: Option<Address>,
}

/// An IPv4 address with prefix and the default gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// Address and prefix length, e.g. `172.16.0.2/30`.
    pub cidr: String,
    /// Default gateway, e.g. `172.16.0.1`.
    pub gateway: String,
}

/// Entropy from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReseedRequest {
    /// 1 to [`MAX_ENTROPY_BYTES`] random bytes; credited in full to the kernel pool.
    #[serde(with = "base64")]
    pub entropy: Vec<u8>,
}

/// The wall-clock time to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockRequest {
    /// Nanoseconds since the Unix epoch (`CLOCK_REALTIME`).
    pub unix_nanos: u64,
}

/// Options of `run_hooks`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunHooksRequest {
    /// Time limit of each hook (default [`DEFAULT_HOOK_TIMEOUT_MS`]).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A hook's time limit when `run_hooks` names none.
pub const DEFAULT_HOOK_TIMEOUT_MS: u64 = 60_000;

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Answer to `ping`.
    Pong(Pong),
    /// A piece of a running program's output, in the order it was read.
    Output {
        stream: Stream,
        #[serde(with = "base64")]
        data: Vec<u8>,
    },
    /// The end of an `exec`: how the program ended.
    Exit(ExitStatus),
    /// Answer to `read_file`.
    File {
        #[serde(with = "base64")]
        data: Vec<u8>,
    },
    /// The request was carried out and there is nothing to report.
    Ok {},
    /// Answer to `run_hooks`: one result per hook, in the order they ran.
    Hooks { results: Vec<HookResult> },
    /// The request failed (or could not be read); the connection stays usable unless the
    /// frame itself was bad.
    Error(ErrorInfo),
}

impl Response {
    /// An error response.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error(ErrorInfo {
            code,
            message: message.into(),
        })
    }

    /// The operation name on the wire, for messages.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Pong(_) => "pong",
            Self::Output { .. } => "output",
            Self::Exit(_) => "exit",
            Self::File { .. } => "file",
            Self::Ok {} => "ok",
            Self::Hooks { .. } => "hooks",
            Self::Error(_) => "error",
        }
    }
}

/// Answer to `ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pong {
    /// The agent's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The agent's crate version.
    pub agent_version: String,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a program ended. Exactly one of `code` and `signal` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal ended it (9 after a timeout).
    pub signal: Option<i32>,
    /// It ran past its time limit and the agent killed its process group.
    pub timed_out: bool,
}

impl ExitStatus {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// The result of one hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookResult {
    /// File name in the hooks directory.
    pub name: String,
    /// Exit code, if it exited (`None`: killed by a signal or could not start).
    pub code: Option<i32>,
    /// Signal that ended it, if any.
    pub signal: Option<i32>,
    /// It ran past its time limit and was killed.
    pub timed_out: bool,
    /// The end (at most [`MAX_HOOK_OUTPUT_BYTES`]) of its stdout and stderr, interleaved as
    /// written, as UTF-8 (invalid sequences replaced); or why it could not start.
    pub output: String,
}

/// How much of a hook's output [`HookResult::output`] keeps.
pub const MAX_HOOK_OUTPUT_BYTES: usize = 4096;

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

/// Machine-readable class of an error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request's `"v"` is not [`PROTOCOL_VERSION`].
    VersionMismatch,
    /// The frame is not a valid request (bad JSON, unknown op or field, bad base64).
    BadRequest,
    /// The frame's length prefix exceeds [`MAX_FRAME_BYTES`]; the agent closes the connection.
    FrameTooLarge,
    /// A field has a value the operation cannot use (bad hostname, empty argv, ...).
    InvalidArgument,
    /// A file or directory does not exist.
    NotFound,
    /// The agent may not do it.
    PermissionDenied,
    /// The file is larger than [`MAX_FILE_BYTES`].
    TooLarge,
    /// The program could not be started.
    SpawnFailed,
    /// This agent cannot do it (e.g. system changes when it runs outside a guest).
    Unsupported,
    /// Any other I/O or system call failure.
    Io,
}

/// The field the agent adds to the last frame of each answer once a connection asked for
/// it with [`Request::ReportTiming`]: microseconds from the request's frame fully read to
/// the answer ready to send, i.e. the agent's own handling time.
pub const HANDLED_US_FIELD: &str = "handled_us";

/// A response with the agent's handling time, when it reported one.
///
/// `handled_us` lives next to `"op"` on the wire (like `"v"` in a request) rather than in
/// each response type, and is only sent to a host that asked for it: hosts older than the
/// field reject unknown fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub response: Response,
    /// Microseconds from the request's frame fully read to this answer ready to send; only
    /// on the last frame of an answer (not on `output`), and only after `report_timing`.
    pub handled_us: Option<u64>,
}

/// Reads one frame. `Ok(None)` means the peer closed the connection cleanly between
/// frames; a close inside a frame is [`ProtocolError::Truncated`]. Short reads are
/// continued; a length above [`MAX_FRAME_BYTES`] is refused before reading the body.
pub fn read_frame(reader: &mut impl Read) -> Result<Option<Vec<u8>>, ProtocolError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let mut got = 0;
    while got < header.len() {
        match reader.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(ProtocolError::Truncated {
                    expected: FRAME_HEADER_BYTES,
                    got,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(ProtocolError::FrameTooLarge(len));
    }
    // Grows as bytes arrive: a peer announcing 1 MiB and sending nothing costs nothing.
    let mut body = Vec::new();
    reader
        .take(len as u64)
        .read_to_end(&mut body)
        .map_err(ProtocolError::Io)?;
    if body.len() != len {
        return Err(ProtocolError::Truncated {
            expected: len,
            got: body.len(),
        });
    }
    Ok(Some(body))
}

/// Writes one frame (header and body in one write call where the stream allows).
pub fn write_frame(writer: &mut impl Write, body: &[u8]) -> Result<(), ProtocolError> {
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    append_frame(&mut frame, body)?;
    writer.write_all(&frame).map_err(ProtocolError::Io)?;
    writer.flush().map_err(ProtocolError::Io)
}

/// Appends one frame (header and body) to `out`, to be written later together with others.
pub fn append_frame(out: &mut Vec<u8>, body: &[u8]) -> Result<(), ProtocolError> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(ProtocolError::FrameTooLarge(body.len()));
    }
    // Cannot truncate: the length is at most MAX_FRAME_BYTES.
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// Whether `buffered` starts with a whole frame, or with a header whose length is already
/// known to be too large: reading the next frame from it needs no more input.
pub fn starts_with_frame(buffered: &[u8]) -> bool {
    let Some(header) = buffered.get(..FRAME_HEADER_BYTES) else {
        return false;
    };
    let mut len = [0u8; FRAME_HEADER_BYTES];
    len.copy_from_slice(header);
    let len = u32::from_be_bytes(len) as usize;
    len > MAX_FRAME_BYTES || buffered.len() - FRAME_HEADER_BYTES >= len
}

/// Sends any serialisable message as one frame.
pub fn send<T: Serialize>(writer: &mut impl Write, message: &T) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(message).map_err(ProtocolError::Encode)?;
    write_frame(writer, &body)
}

/// Receives one frame and decodes it as `T`; `Ok(None)` on a clean close.
pub fn recv<T: DeserializeOwned>(reader: &mut impl Read) -> Result<Option<T>, ProtocolError> {
    match read_frame(reader)? {
        Some(body) => serde_json::from_slice(&body)
            .map(Some)
            .map_err(ProtocolError::Decode),
        None => Ok(None),
    }
}

/// Encodes a request with its version: `{"v":1,"op":...}`.
pub fn encode_request(request: &Request) -> Result<Vec<u8>, ProtocolError> {
    let mut value = serde_json::to_value(request).map_err(ProtocolError::Encode)?;
    let object = value.as_object_mut().ok_or(ProtocolError::NotAnObject)?;
    object.insert("v".to_owned(), PROTOCOL_VERSION.into());
    serde_json::to_vec(&value).map_err(ProtocolError::Encode)
}

/// Decodes a request frame. The version is checked before the operation, so a request of
/// another version gets [`ProtocolError::VersionMismatch`] even if its op is unknown here.
pub fn decode_request(body: &[u8]) -> Result<Request, ProtocolError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(ProtocolError::Decode)?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(ProtocolError::NotAnObject);
    };
    let version = object.remove("v");
    let got = version.as_ref().and_then(serde_json::Value::as_u64);
    if got != Some(u64::from(PROTOCOL_VERSION)) {
        return Err(ProtocolError::VersionMismatch { got });
    }
    Request::deserialize(serde_json::Value::Object(object)).map_err(ProtocolError::Decode)
}

/// Sends a request (with its version).
pub fn send_request(writer: &mut impl Write, request: &Request) -> Result<(), ProtocolError> {
    write_frame(writer, &encode_request(request)?)
}

/// Receives a request; `Ok(None)` on a clean close.
pub fn recv_request(reader: &mut impl Read) -> Result<Option<Request>, ProtocolError> {
    match read_frame(reader)? {
        Some(body) => decode_request(&body).map(Some),
        None => Ok(None),
    }
}

/// Sends a response.
pub fn send_response(writer: &mut impl Write, response: &Response) -> Result<(), ProtocolError> {
    send(writer, response)
}

/// Encodes a response, with [`HANDLED_US_FIELD`] when `handled_us` is given.
pub fn encode_response(
    response: &Response,
    handled_us: Option<u64>,
) -> Result<Vec<u8>, ProtocolError> {
    let Some(handled_us) = handled_us else {
        return serde_json::to_vec(response).map_err(ProtocolError::Encode);
    };
    let mut value = serde_json::to_value(response).map_err(ProtocolError::Encode)?;
    let object = value.as_object_mut().ok_or(ProtocolError::NotAnObject)?;
    object.insert(HANDLED_US_FIELD.to_owned(), handled_us.into());
    serde_json::to_vec(&value).map_err(ProtocolError::Encode)
}

/// Decodes a response frame and the agent's handling time if it carries one (a
/// [`HANDLED_US_FIELD`] that is not a whole number is an error, like any bad field).
pub fn decode_answer(body: &[u8]) -> Result<Answer, ProtocolError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(ProtocolError::Decode)?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(ProtocolError::NotAnObject);
    };
    let handled_us = match object.remove(HANDLED_US_FIELD) {
        None => None,
        Some(value) => Some(u64::deserialize(value).map_err(ProtocolError::Decode)?),
    };
    let response =
        Response::deserialize(serde_json::Value::Object(object)).map_err(ProtocolError::Decode)?;
    Ok(Answer {
        response,
        handled_us,
    })
}

/// Receives a response with the agent's handling time, if any; `Ok(None)` on a clean close.
pub fn recv_answer(reader: &mut impl Read) -> Result<Option<Answer>, ProtocolError> {
    match read_frame(reader)? {
        Some(body) => decode_answer(&body).map(Some),
        None => Ok(None),
    }
}

/// Receives a response (a handling time on it is accepted and dropped); `Ok(None)` on a
/// clean close.
pub fn recv_response(reader: &mut impl Read) -> Result<Option<Response>, ProtocolError> {
    Ok(recv_answer(reader)?.map(|answer| answer.response))
}

#[cfg(test)]
mod tests;
