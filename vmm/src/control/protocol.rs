//! Wire types and framing of the control protocol (see `docs/control-protocol.md`).
//!
//! Each message is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
//! Every message type rejects unknown fields: a peer that does not understand part of a
//! message says so instead of silently doing less than asked. This module knows nothing
//! about KVM or the event loop, so the daemon and tests can use it as it is.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks; every envelope carries it.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest JSON body of one message, in bytes. Requests and responses are small; the
/// limit exists so a broken or hostile peer cannot make the other side allocate without
/// bound.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Size of the length prefix of each frame.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Errors encoding, decoding, reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge(usize),
    #[error("empty message (length prefix 0)")]
    Empty,
    #[error("cannot encode the message as JSON")]
    Encode(#[source] serde_json::Error),
    #[error("invalid message")]
    Decode(#[source] serde_json::Error),
    #[error("control socket I/O failed")]
    Io(#[source] io::Error),
}

/// A request with its protocol version and an optional id, echoed in the response so a
/// client can match answers to questions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestEnvelope {
    pub version: u32,
    #[serde(default)]
    pub id: Option<u64>,
    pub request: Request,
}

/// A response with the protocol version and the id of the request it answers (`None` if
/// the request carried none or could not be read far enough to find it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseEnvelope {
    pub version: u32,
    #[serde(default)]
    pub id: Option<u64>,
    pub response: Response,
}

/// What a client asks of the VMM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", from = "RequestRepr")]
pub enum Request {
    /// Run state and size of the VM.
    Status,
    /// Stop all vCPUs (and device processing) until `Resume`.
    Pause,
    /// Let a paused VM run again.
    Resume,
    /// Write a snapshot of the VM to a directory.
    Snapshot(SnapshotRequest),
    /// Stop the VM and end the VMM process.
    Shutdown,
    /// A digest of guest memory, to check that a restored VM has the memory it was saved
    /// with.
    MemoryDigest,
    /// The figures of one host-initiated vsock connection (open or recently closed): how
    /// long the VMM waited on the guest for it, and what went each way.
    VsockConnection(VsockConnectionRequest),
}

/// Which vsock connection: the host port of its `OK <port>` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConnectionRequest {
    pub host_port: u32,
}

/// How `Request` is read. serde ignores unknown fields next to the tag of a unit variant
/// even with `deny_unknown_fields`, so the wire form uses empty struct variants, which do
/// reject them, and converts to the unit variants of the public type.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum RequestRepr {
    Status {},
    Pause {},
    Resume {},
    Snapshot(SnapshotRequest),
    Shutdown {},
    MemoryDigest {},
    VsockConnection(VsockConnectionRequest),
}

impl From<RequestRepr> for Request {
    fn from(repr: RequestRepr) -> Self {
        match repr {
            RequestRepr::Status {} => Self::Status,
            RequestRepr::Pause {} => Self::Pause,
            RequestRepr::Resume {} => Self::Resume,
            RequestRepr::Snapshot(s) => Self::Snapshot(s),
            RequestRepr::Shutdown {} => Self::Shutdown,
            RequestRepr::MemoryDigest {} => Self::MemoryDigest,
            RequestRepr::VsockConnection(r) => Self::VsockConnection(r),
        }
    }
}

/// Parameters of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Directory the snapshot is written to.
    pub dir: PathBuf,
    /// Full memory or only what changed since `parent`.
    #[serde(default)]
    pub kind: SnapshotKind,
    /// The snapshot a diff snapshot is relative to.
    #[serde(default)]
    pub parent: Option<PathBuf>,
    /// Resume the VM afterwards if it was running before the request.
    #[serde(default = "default_true")]
    pub resume: bool,
    /// Stop-and-copy, or pre-copy while the guest runs.
    #[serde(default)]
    pub mode: SnapshotMode,
}

/// How a running VM's memory is copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Pause, copy memory, resume: the pause lasts the whole copy.
    #[default]
    Paused,
    /// Copy memory while the guest runs, then copy again the pages it dirtied meanwhile
    /// (KVM dirty log), until few remain; pause only for those and the device state. Needs
    /// dirty page tracking. For a VM that is already paused it is the same as `paused`.
    Live,
}

fn default_true() -> bool {
    true
}

/// Which memory a snapshot contains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the pages written since the parent snapshot.
    Diff,
}

/// What the VMM answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", from = "ResponseRepr")]
pub enum Response {
    Status(StatusInfo),
    /// The request was carried out and there is nothing to report.
    Ok,
    Snapshot(SnapshotInfo),
    MemoryDigest {
        /// Name of the digest algorithm, e.g. `sha256`.
        algorithm: String,
        /// The digest in lower-case hex.
        digest: String,
    },
    VsockConnection(VsockConnectionInfo),
    Error(ErrorInfo),
}

/// How `Response` is read; see [`RequestRepr`] for why this exists.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ResponseRepr {
    Status(StatusInfo),
    Ok {},
    Snapshot(SnapshotInfo),
    MemoryDigest { algorithm: String, digest: String },
    VsockConnection(VsockConnectionInfo),
    Error(ErrorInfo),
}

impl From<ResponseRepr> for Response {
    fn from(repr: ResponseRepr) -> Self {
        match repr {
            ResponseRepr::Status(s) => Self::Status(s),
            ResponseRepr::Ok {} => Self::Ok,
            ResponseRepr::Snapshot(s) => Self::Snapshot(s),
            ResponseRepr::MemoryDigest { algorithm, digest } => {
                Self::MemoryDigest { algorithm, digest }
            }
            ResponseRepr::VsockConnection(c) => Self::VsockConnection(c),
            ResponseRepr::Error(e) => Self::Error(e),
        }
    }
}

impl Response {
    /// An error response.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error(ErrorInfo {
            code,
            message: message.into(),
        })
    }
}

/// Answer to `Status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusInfo {
    pub state: VmRunState,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Time from VMM start to the guest's boot-complete signal, if it has arrived.
    pub boot_time_ms: Option<f64>,
    pub uptime_ms: u64,
    /// The disks in attachment order.
    #[serde(default)]
    pub disks: Vec<DiskStatus>,
    /// The vsock device, if the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockStatus>,
    /// The VM generation ID the guest reads now (ACPI VMGenID; docs/acpi.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmgenid: Option<VmGenIdStatus>,
}

/// The vsock device as the host reaches it (docs/vsock.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockStatus {
    pub guest_cid: u32,
    /// Where host clients connect (`CONNECT <port>`); guest connections to host port P go
    /// to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// The VM generation ID and where the guest finds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmGenIdStatus {
    /// The 16 bytes in lower-case hex, in guest-memory order.
    pub id: String,
    /// Guest-physical address of the first byte.
    pub addr: u64,
}

/// Answer to `VsockConnection` (`docs/vsock.md`, "Connection figures").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConnectionInfo {
    pub host_port: u32,
    pub guest_port: u32,
    /// Whether the connection is still open (else it is one of the last few closed).
    pub open: bool,
    /// Microseconds the VMM waited on the guest: from handing it the REQUEST or data to its
    /// last answer before the next hand-over, summed.
    pub guest_wait_us: u64,
    /// Microseconds from the `CONNECT` line to the close, or to now while open.
    pub lifetime_us: u64,
    pub packets_to_guest: u64,
    pub packets_from_guest: u64,
    /// Payload bytes each way.
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
}

/// One disk as the VM uses it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskStatus {
    /// The id the guest reads.
    pub id: String,
    pub read_only: bool,
    /// Every layer, the active one first.
    pub chain: Vec<crate::disk::LayerRecord>,
}

/// Run state of the VM as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRunState {
    Running,
    Paused,
    Exited,
}

/// Answer to `Snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    pub kind: SnapshotKind,
    /// How long the vCPUs were paused for the snapshot.
    pub pause_ms: f64,
    /// The layers the disks were frozen into (one per writable qcow2 disk), in disk order.
    #[serde(default)]
    pub frozen_layers: Vec<PathBuf>,
    /// How long branching the disks took, within the pause.
    #[serde(default)]
    pub disk_branch_ms: f64,
    /// How long the whole request took.
    pub total_ms: f64,
    /// Bytes of guest memory written.
    pub memory_bytes: u64,
    /// How memory was copied.
    #[serde(default)]
    pub mode: SnapshotMode,
    /// For a live snapshot of a running VM: the copy passes made while the guest ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy: Option<PrecopyInfo>,
}

/// What a live snapshot copied while the guest ran, and in the pause.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrecopyInfo {
    /// One entry per pass while the guest ran: the first copies all memory (for a diff,
    /// the pages written since the parent), each later one the pages dirtied during the
    /// pass before.
    pub passes: Vec<PassInfo>,
    /// Pages copied in the pause (dirtied during the last pass).
    pub final_pages: u64,
    /// From the request to the pause.
    pub precopy_ms: f64,
    /// After the resume: syncing and hashing the memory file and writing the state.
    pub finish_ms: f64,
}

/// One pre-copy pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassInfo {
    /// 4 KiB pages copied (for the first pass of a full snapshot: all of them).
    pub pages: u64,
    pub ms: f64,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    /// For people: what went wrong, and if possible what to do.
    pub message: String,
}

/// Machine-readable class of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message is not valid JSON or not a known request (unknown type or field).
    BadRequest,
    /// The envelope's `version` is not one this VMM speaks.
    UnsupportedVersion,
    /// The length prefix exceeds [`MAX_MESSAGE_BYTES`]; the connection is closed.
    TooLarge,
    /// The request is valid but not in the VM's current state (e.g. resume while running).
    InvalidState,
    /// The request was tried and failed.
    Failed,
    /// What the request names does not exist (e.g. an unknown vsock connection).
    NotFound,
}

/// Encodes `msg` as one frame: length prefix and JSON body.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut frame = vec![0u8; FRAME_HEADER_BYTES];
    serde_json::to_writer(&mut frame, msg).map_err(ProtocolError::Encode)?;
    let len = frame.len() - FRAME_HEADER_BYTES;
    if len > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::TooLarge(len));
    }
    let prefix = u32::try_from(len).map_err(|_| ProtocolError::TooLarge(len))?;
    frame[..FRAME_HEADER_BYTES].copy_from_slice(&prefix.to_be_bytes());
    Ok(frame)
}

/// Decodes a frame body (without its length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(body).map_err(ProtocolError::Decode)
}

/// The body length announced by a length prefix, checked against the limits.
pub fn body_len(prefix: [u8; FRAME_HEADER_BYTES]) -> Result<usize, ProtocolError> {
    let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    match len {
        0 => Err(ProtocolError::Empty),
        n if n > MAX_MESSAGE_BYTES => Err(ProtocolError::TooLarge(n)),
        n => Ok(n),
    }
}

/// Reads one frame from a blocking reader and returns its body. An end of stream before
/// the first byte is `Io(UnexpectedEof)`, like one in the middle.
pub fn read_frame<R: Read + ?Sized>(reader: &mut R) -> Result<Vec<u8>, ProtocolError> {
    let mut prefix = [0u8; FRAME_HEADER_BYTES];
    reader.read_exact(&mut prefix).map_err(ProtocolError::Io)?;
    let len = body_len(prefix)?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).map_err(ProtocolError::Io)?;
    Ok(body)
}

/// Encodes `msg` and writes it as one frame to a blocking writer.
pub fn write_frame<W: Write + ?Sized, T: Serialize>(
    writer: &mut W,
    msg: &T,
) -> Result<(), ProtocolError> {
    let frame = encode(msg)?;
    writer.write_all(&frame).map_err(ProtocolError::Io)?;
    writer.flush().map_err(ProtocolError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_request(v: serde_json::Value) -> Result<RequestEnvelope, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::Status,
            Request::Pause,
            Request::Resume,
            Request::Shutdown,
            Request::MemoryDigest,
            Request::VsockConnection(VsockConnectionRequest { host_port: 1 << 30 }),
            Request::Snapshot(SnapshotRequest {
                dir: "/tmp/s".into(),
                kind: SnapshotKind::Diff,
                parent: Some("/tmp/p".into()),
                resume: false,
                mode: Default::default(),
            }),
        ];
        for (i, request) in requests.into_iter().enumerate() {
            let env = RequestEnvelope {
                version: PROTOCOL_VERSION,
                id: Some(i as u64),
                request,
            };
            let frame = encode(&env).unwrap();
            let body = read_frame(&mut &frame[..]).unwrap();
            assert_eq!(decode::<RequestEnvelope>(&body).unwrap(), env);
        }
    }

    #[test]
    fn responses_round_trip() {
        let responses = [
            Response::Ok,
            Response::Status(StatusInfo {
                state: VmRunState::Paused,
                vcpus: 2,
                memory_mib: 256,
                boot_time_ms: Some(12.5),
                uptime_ms: 1000,
                disks: vec![DiskStatus {
                    id: "disk0".into(),
                    read_only: false,
                    chain: vec![crate::disk::LayerRecord {
                        path: "/d/vm.qcow2".into(),
                        format: crate::disk::DiskFormat::Qcow2,
                    }],
                }],
                vsock: Some(VsockStatus {
                    guest_cid: 3,
                    uds_path: "/run/v.sock".into(),
                }),
                vmgenid: Some(VmGenIdStatus {
                    id: "00112233445566778899aabbccddeeff".into(),
                    addr: 0xef000,
                }),
            }),
            Response::Snapshot(SnapshotInfo {
                dir: "/tmp/s".into(),
                kind: SnapshotKind::Full,
                frozen_layers: vec!["/d/vm@s.qcow2".into()],
                disk_branch_ms: 0.5,
                pause_ms: 1.0,
                total_ms: 2.0,
                memory_bytes: 4096,
                mode: SnapshotMode::Live,
                precopy: Some(PrecopyInfo {
                    passes: vec![PassInfo {
                        pages: 1024,
                        ms: 3.5,
                    }],
                    final_pages: 3,
                    precopy_ms: 4.0,
                    finish_ms: 1.0,
                }),
            }),
            Response::MemoryDigest {
                algorithm: "sha256".into(),
                digest: "00ff".into(),
            },
            Response::VsockConnection(VsockConnectionInfo {
                host_port: 1 << 30,
                guest_port: 52,
                open: true,
                guest_wait_us: 314_000,
                lifetime_us: 320_000,
                packets_to_guest: 3,
                packets_from_guest: 4,
                bytes_to_guest: 512,
                bytes_from_guest: 256,
            }),
            Response::error(ErrorCode::InvalidState, "not paused"),
            Response::error(ErrorCode::NotFound, "no such connection"),
        ];
        for response in responses {
            let env = ResponseEnvelope {
                version: PROTOCOL_VERSION,
                id: None,
                response,
            };
            let mut out = Vec::new();
            write_frame(&mut out, &env).unwrap();
            let body = read_frame(&mut &out[..]).unwrap();
            assert_eq!(decode::<ResponseEnvelope>(&body).unwrap(), env);
        }
    }

    #[test]
    fn wire_form_is_as_documented() {
        let env = RequestEnvelope {
            version: 1,
            id: Some(7),
            request: Request::Status,
        };
        assert_eq!(
            serde_json::to_value(&env).unwrap(),
            json!({"version": 1, "id": 7, "request": {"type": "status"}})
        );
        let ok = serde_json::to_value(Response::Ok).unwrap();
        assert_eq!(ok, json!({"type": "ok"}));
        let err = serde_json::to_value(Response::error(ErrorCode::TooLarge, "x")).unwrap();
        assert_eq!(
            err,
            json!({"type": "error", "code": "too_large", "message": "x"})
        );
        let req = parse_request(json!({
            "version": 1,
            "request": {"type": "vsock_connection", "host_port": 1073741824u32}
        }))
        .unwrap();
        assert_eq!(
            req.request,
            Request::VsockConnection(VsockConnectionRequest { host_port: 1 << 30 })
        );
        let err = serde_json::to_value(Response::error(ErrorCode::NotFound, "x")).unwrap();
        assert_eq!(err["code"], "not_found");
        let frame = encode(&Response::Ok).unwrap();
        assert_eq!(&frame[..4], &[0, 0, 0, 13]);
        assert_eq!(&frame[4..], br#"{"type":"ok"}"#);
    }

    #[test]
    fn snapshot_defaults_apply() {
        let env = parse_request(json!({
            "version": 1,
            "request": {"type": "snapshot", "dir": "/s"}
        }))
        .unwrap();
        assert_eq!(env.id, None);
        assert_eq!(
            env.request,
            Request::Snapshot(SnapshotRequest {
                dir: "/s".into(),
                kind: SnapshotKind::Full,
                parent: None,
                resume: true,
                mode: Default::default(),
            })
        );
    }

    #[test]
    fn unknown_fields_and_types_are_rejected() {
        let bad = [
            json!({"version": 1, "request": {"type": "status", "x": 1}}),
            json!({"version": 1, "request": {"type": "snapshot", "dir": "/s", "x": 1}}),
            json!({"version": 1, "request": {"type": "reboot"}}),
            json!({"version": 1, "request": {"type": "status"}, "extra": true}),
            json!({"version": 1, "request": {"type": "vsock_connection"}}),
            json!({"version": 1, "request": {"type": "vsock_connection", "host_port": -1}}),
            json!({"version": 1, "request": {"type": "vsock_connection", "host_port": 1, "x": 0}}),
            json!({"version": 1, "request": {"type": "snapshot", "dir": "/s", "kind": "half"}}),
            json!({"version": 1}),
            json!({"request": {"type": "status"}}),
        ];
        for v in bad {
            assert!(parse_request(v.clone()).is_err(), "{v} was accepted");
        }
        let bad_response = json!({"type": "ok", "extra": 1});
        assert!(serde_json::from_value::<Response>(bad_response).is_err());
    }

    #[test]
    fn length_prefix_limits() {
        assert!(matches!(body_len([0, 0, 0, 0]), Err(ProtocolError::Empty)));
        assert!(matches!(
            body_len([0xff, 0xff, 0xff, 0xff]),
            Err(ProtocolError::TooLarge(_))
        ));
        assert_eq!(body_len([0, 0x10, 0, 0]).unwrap(), MAX_MESSAGE_BYTES);
        assert!(matches!(
            body_len([0, 0x10, 0, 1]),
            Err(ProtocolError::TooLarge(_))
        ));
        let huge = "x".repeat(MAX_MESSAGE_BYTES);
        assert!(matches!(encode(&huge), Err(ProtocolError::TooLarge(_))));
        // A truncated frame is an error, not a short message.
        let frame = encode(&Response::Ok).unwrap();
        assert!(matches!(
            read_frame(&mut &frame[..frame.len() - 1]),
            Err(ProtocolError::Io(_))
        ));
    }
}
