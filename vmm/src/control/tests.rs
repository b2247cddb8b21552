//! The control server on a real `EventManager` thread, driven by real clients, with a mock
//! handler. No KVM involved.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};

use super::client::{ClientError, ControlClient};
use super::protocol::*;
use super::server::{ControlError, ControlServer, MAX_CONNECTIONS};
use super::ControlHandler;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct MockHandler {
    calls: Mutex<Vec<Request>>,
}

impl MockHandler {
    fn calls(&self) -> Vec<Request> {
        self.calls.lock().unwrap().clone()
    }
}

fn status_info() -> StatusInfo {
    StatusInfo {
        state: VmRunState::Running,
        vcpus: 2,
        memory_mib: 128,
        boot_time_ms: Some(42.5),
        uptime_ms: 1234,
        disks: Vec::new(),
        vsock: None,
        vmgenid: None,
    }
}

/// The one vsock connection the mock knows.
const MOCK_PORT: u32 = 1 << 30;

fn mock_connection() -> VsockConnectionInfo {
    VsockConnectionInfo {
        host_port: MOCK_PORT,
        guest_port: 52,
        open: false,
        guest_wait_us: 1234,
        lifetime_us: 5678,
        packets_to_guest: 3,
        packets_from_guest: 4,
        bytes_to_guest: 100,
        bytes_from_guest: 200,
    }
}

impl ControlHandler for MockHandler {
    fn handle(&self, request: Request) -> Response {
        self.calls.lock().unwrap().push(request.clone());
        match request {
            Request::Status => Response::Status(status_info()),
            Request::Resume => Response::error(ErrorCode::InvalidState, "already running"),
            Request::MemoryDigest => Response::MemoryDigest {
                algorithm: "sha256".into(),
                digest: "ab".repeat(32),
            },
            Request::Snapshot(s) => Response::Snapshot(SnapshotInfo {
                dir: s.dir,
                kind: s.kind,
                pause_ms: 1.5,
                frozen_layers: Vec::new(),
                disk_branch_ms: 0.0,
                total_ms: 3.0,
                memory_bytes: 1 << 20,
                mode: s.mode,
                precopy: None,
            }),
            Request::Pause | Request::Shutdown => Response::Ok,
            Request::VsockConnection(r) if r.host_port == MOCK_PORT => {
                Response::VsockConnection(mock_connection())
            }
            Request::VsockConnection(_) => Response::error(ErrorCode::NotFound, "no such port"),
        }
    }
}

/// A temporary directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "grove-ctl-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("ctl.sock")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server running on its own event-loop thread.
struct Harness {
    path: PathBuf,
    handler: Arc<MockHandler>,
    server: Arc<Mutex<ControlServer>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _scratch: Scratch,
}

impl Harness {
    fn start() -> Self {
        let scratch = Scratch::new();
        let path = scratch.sock();
        let handler = Arc::new(MockHandler::default());
        let server = ControlServer::bind(&path, handler.clone()).unwrap();
        let server = Arc::new(Mutex::new(server));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (server, stop) = (server.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut manager = EventManager::<Arc<Mutex<ControlServer>>>::new().unwrap();
                manager.add_subscriber(server);
                while !stop.load(Ordering::SeqCst) {
                    manager.run_with_timeout(10).unwrap();
                }
            })
        };
        Self {
            path,
            handler,
            server,
            stop,
            thread: Some(thread),
            _scratch: scratch,
        }
    }

    fn client(&self) -> ControlClient {
        ControlClient::connect_with_timeout(&self.path, Some(TIMEOUT)).unwrap()
    }

    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s
    }

    fn connections(&self) -> usize {
        self.server.lock().unwrap().connection_count()
    }

    fn wait_for_connections(&self, n: usize) {
        let start = Instant::now();
        while self.connections() != n {
            assert!(
                start.elapsed() < TIMEOUT,
                "{} connections",
                self.connections()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn read_response(stream: &mut UnixStream) -> ResponseEnvelope {
    decode(&read_frame(stream).unwrap()).unwrap()
}

fn assert_closed(stream: &mut UnixStream) {
    let mut b = [0u8; 1];
    match stream.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("connection still open: {other:?}"),
    }
}

fn error_code(response: &Response) -> ErrorCode {
    match response {
        Response::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn status_round_trip() {
    let h = Harness::start();
    let mut c = h.client();
    assert_eq!(
        c.request(Request::Status).unwrap(),
        Response::Status(status_info())
    );
    let snap = SnapshotRequest {
        dir: "/snap".into(),
        kind: SnapshotKind::Diff,
        parent: Some("/base".into()),
        resume: false,
        mode: SnapshotMode::Live,
    };
    match c.request(Request::Snapshot(snap.clone())).unwrap() {
        Response::Snapshot(info) => assert_eq!(info.dir, PathBuf::from("/snap")),
        other => panic!("{other:?}"),
    }
    let resume = c.request(Request::Resume).unwrap();
    assert_eq!(error_code(&resume), ErrorCode::InvalidState);
    assert_eq!(
        h.handler.calls(),
        [Request::Status, Request::Snapshot(snap), Request::Resume]
    );
}

#[test]
fn ids_are_echoed() {
    let h = Harness::start();
    let mut s = h.raw();
    for (id, json) in [
        (
            Some(42),
            r#"{"version":1,"id":42,"request":{"type":"status"}}"#,
        ),
        (None, r#"{"version":1,"request":{"type":"pause"}}"#),
        (
            Some(u64::MAX),
            r#"{"version":1,"id":18446744073709551615,"request":{"type":"status"}}"#,
        ),
        // Even an error answer carries the id if it could be read.
        (Some(7), r#"{"version":1,"id":7,"request":{"type":"nope"}}"#),
        (
            Some(8),
            r#"{"version":9,"id":8,"request":{"type":"status"}}"#,
        ),
    ] {
        s.write_all(&frame(json.as_bytes())).unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.id, id, "{json}");
        assert_eq!(r.version, PROTOCOL_VERSION);
    }
    // The client numbers its requests and checks the answers.
    let mut c = h.client();
    for _ in 0..3 {
        assert!(matches!(
            c.request(Request::Status),
            Ok(Response::Status(_))
        ));
    }
}

#[test]
fn two_clients_interleaved() {
    let h = Harness::start();
    let mut a = h.raw();
    let mut b = h.raw();
    let req = |id: u64| {
        frame(format!(r#"{{"version":1,"id":{id},"request":{{"type":"status"}}}}"#).as_bytes())
    };
    // Each sends half a frame, then the other half, crosswise.
    let (fa, fb) = (req(1), req(2));
    a.write_all(&fa[..10]).unwrap();
    b.write_all(&fb[..3]).unwrap();
    b.write_all(&fb[3..]).unwrap();
    assert_eq!(read_response(&mut b).id, Some(2));
    a.write_all(&fa[10..]).unwrap();
    assert_eq!(read_response(&mut a).id, Some(1));
    let mut ca = h.client();
    let mut cb = h.client();
    for _ in 0..10 {
        assert!(matches!(
            ca.request(Request::Status),
            Ok(Response::Status(_))
        ));
        assert!(matches!(cb.request(Request::Pause), Ok(Response::Ok)));
    }
}

#[test]
fn frame_sent_byte_by_byte() {
    let h = Harness::start();
    let mut s = h.raw();
    let f = frame(br#"{"version":1,"id":3,"request":{"type":"memory_digest"}}"#);
    for byte in &f {
        s.write_all(std::slice::from_ref(byte)).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = read_response(&mut s);
    assert_eq!(r.id, Some(3));
    assert!(matches!(r.response, Response::MemoryDigest { .. }));
}

#[test]
fn malformed_requests_get_errors_and_the_connection_survives() {
    let h = Harness::start();
    let mut s = h.raw();
    let cases: [(&[u8], ErrorCode); 9] = [
        (b"{not json", ErrorCode::BadRequest),
        (b"\xff\xfe\x00garbage", ErrorCode::BadRequest),
        (b"[1,2,3]", ErrorCode::BadRequest),
        (
            br#"{"version":1,"request":{"type":"reboot"}}"#,
            ErrorCode::BadRequest,
        ),
        (
            br#"{"version":1,"request":{"type":"status","force":true}}"#,
            ErrorCode::BadRequest,
        ),
        (
            br#"{"version":1,"request":{"type":"snapshot","dir":"/s","x":1}}"#,
            ErrorCode::BadRequest,
        ),
        (
            br#"{"version":1,"request":{"type":"status"},"extra":0}"#,
            ErrorCode::BadRequest,
        ),
        (br#"{"request":{"type":"status"}}"#, ErrorCode::BadRequest),
        (
            br#"{"version":2,"request":{"type":"teleport"}}"#,
            ErrorCode::UnsupportedVersion,
        ),
    ];
    for (body, code) in cases {
        s.write_all(&frame(body)).unwrap();
        let r = read_response(&mut s);
        assert_eq!(
            error_code(&r.response),
            code,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    assert!(
        h.handler.calls().is_empty(),
        "the handler saw a bad request"
    );
    // A huge bad value does not make a huge answer.
    let long = format!(
        r#"{{"version":1,"request":{{"type":"{}"}}}}"#,
        "x".repeat(100_000)
    );
    s.write_all(&frame(long.as_bytes())).unwrap();
    let r = read_response(&mut s);
    match r.response {
        Response::Error(e) => assert!(e.message.len() < 1024, "{} bytes", e.message.len()),
        other => panic!("{other:?}"),
    }
    // Same connection, good request.
    s.write_all(&frame(
        br#"{"version":1,"id":5,"request":{"type":"status"}}"#,
    ))
    .unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.id, Some(5));
    assert_eq!(r.response, Response::Status(status_info()));
    assert_eq!(h.handler.calls(), [Request::Status]);
}

#[test]
fn bad_length_prefix_closes_only_that_connection() {
    let h = Harness::start();
    let mut other = h.client();
    assert!(other.request(Request::Status).is_ok());
    for (prefix, code) in [
        ([0xff, 0xff, 0xff, 0xff], ErrorCode::TooLarge),
        (
            (MAX_MESSAGE_BYTES as u32 + 1).to_be_bytes(),
            ErrorCode::TooLarge,
        ),
        ([0, 0, 0, 0], ErrorCode::BadRequest),
    ] {
        let mut s = h.raw();
        s.write_all(&prefix).unwrap();
        let r = read_response(&mut s);
        assert_eq!(error_code(&r.response), code);
        assert_eq!(r.id, None);
        assert_closed(&mut s);
    }
    assert!(matches!(
        other.request(Request::Status),
        Ok(Response::Status(_))
    ));
    assert_eq!(h.handler.calls().len(), 2);
    // A message of exactly the limit is read (and rejected only for its content).
    let mut s = h.raw();
    let mut body = br#"{"version":1,"request":{"type":"status"}}"#.to_vec();
    body.resize(MAX_MESSAGE_BYTES, b' ');
    s.write_all(&frame(&body)).unwrap();
    assert_eq!(
        read_response(&mut s).response,
        Response::Status(status_info())
    );
}

#[test]
fn client_disconnecting_mid_frame_is_dropped_quietly() {
    let h = Harness::start();
    let mut keep = h.client();
    assert!(keep.request(Request::Status).is_ok());
    {
        let mut s = h.raw();
        let f = frame(br#"{"version":1,"request":{"type":"shutdown"}}"#);
        s.write_all(&f[..f.len() / 2]).unwrap();
        h.wait_for_connections(2);
    }
    {
        let mut s = h.raw();
        s.write_all(&[0, 0]).unwrap();
    }
    h.wait_for_connections(1);
    assert!(!h.handler.calls().contains(&Request::Shutdown));
    assert!(matches!(
        keep.request(Request::Status),
        Ok(Response::Status(_))
    ));
}

#[test]
fn pipelined_requests_then_half_close_all_get_answers() {
    let h = Harness::start();
    let mut s = h.raw();
    // One write holding more requests than the server handles per wake-up.
    let mut burst = Vec::new();
    for id in 0..50 {
        let body = format!(r#"{{"version":1,"id":{id},"request":{{"type":"pause"}}}}"#);
        burst.extend_from_slice(&frame(body.as_bytes()));
    }
    s.write_all(&burst).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    for id in 0..50 {
        let r = read_response(&mut s);
        assert_eq!((r.id, r.response), (Some(id), Response::Ok));
    }
    assert_closed(&mut s);
    h.wait_for_connections(0);
    assert_eq!(h.handler.calls().len(), 50);
}

#[test]
fn a_client_that_does_not_read_is_throttled_not_others() {
    let h = Harness::start();
    const N: u64 = 20_000;
    let mut s = h.raw();
    let mut writer = s.try_clone().unwrap();
    // Far more responses than the socket buffers hold: the server must stop reading this
    // client instead of buffering without bound.
    let sender = std::thread::spawn(move || {
        for id in 0..N {
            let body = format!(r#"{{"version":1,"id":{id},"request":{{"type":"status"}}}}"#);
            writer.write_all(&frame(body.as_bytes())).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut c = h.client();
    assert!(matches!(
        c.request(Request::Status),
        Ok(Response::Status(_))
    ));
    for id in 0..N {
        assert_eq!(read_response(&mut s).id, Some(id));
    }
    sender.join().unwrap();
}

#[test]
fn seventeenth_connection_is_refused() {
    let h = Harness::start();
    let mut clients: Vec<_> = (0..MAX_CONNECTIONS).map(|_| h.client()).collect();
    for c in &mut clients {
        assert!(c.request(Request::Status).is_ok());
    }
    h.wait_for_connections(MAX_CONNECTIONS);
    let mut extra = h.raw();
    let r = read_response(&mut extra);
    assert_eq!(error_code(&r.response), ErrorCode::Failed);
    assert_closed(&mut extra);
    // Through the client the refusal reads as an error answer, not a broken pipe.
    let mut extra = h.client();
    match extra.request(Request::Status) {
        Ok(Response::Error(e)) => assert!(e.message.contains("too many"), "{}", e.message),
        Err(ClientError::Closed) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(h.connections(), MAX_CONNECTIONS);
    for c in &mut clients {
        assert!(matches!(
            c.request(Request::Status),
            Ok(Response::Status(_))
        ));
    }
    // A freed slot is available again.
    clients.pop();
    h.wait_for_connections(MAX_CONNECTIONS - 1);
    let mut again = h.client();
    assert!(matches!(
        again.request(Request::Status),
        Ok(Response::Status(_))
    ));
}

#[test]
fn socket_is_private_and_removed_on_drop() {
    let scratch = Scratch::new();
    let path = scratch.sock();
    let server = ControlServer::bind(&path, Arc::new(MockHandler::default())).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // No temporary bind directory is left next to it.
    let entries: Vec<_> = std::fs::read_dir(&scratch.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["ctl.sock"]);
    drop(server);
    assert!(!path.exists());
    assert!(scratch.0.exists());
}

#[test]
fn drop_leaves_a_socket_that_replaced_ours() {
    let scratch = Scratch::new();
    let path = scratch.sock();
    let server = ControlServer::bind(&path, Arc::new(MockHandler::default())).unwrap();
    std::fs::remove_file(&path).unwrap();
    let _other = UnixListener::bind(&path).unwrap();
    drop(server);
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_socket());
}

#[test]
fn stale_socket_file_is_replaced() {
    let scratch = Scratch::new();
    let path = scratch.sock();
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "std leaves the socket file behind");
    let server = ControlServer::bind(&path, Arc::new(MockHandler::default())).unwrap();
    assert_eq!(server.path(), path);
    assert!(UnixStream::connect(&path).is_ok());
}

#[test]
fn live_socket_is_not_taken_over() {
    let scratch = Scratch::new();
    let path = scratch.sock();
    let live = UnixListener::bind(&path).unwrap();
    let err = ControlServer::bind(&path, Arc::new(MockHandler::default()))
        .err()
        .unwrap();
    assert!(matches!(err, ControlError::InUse(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "control socket {} is in use by another process",
            path.display()
        )
    );
    // The other process still owns its socket.
    let _c = UnixStream::connect(&path).unwrap();
    assert!(live.accept().is_ok());
}

#[test]
fn other_files_at_the_path_are_left_untouched() {
    let scratch = Scratch::new();
    let check = |path: &Path| {
        let err = ControlServer::bind(path, Arc::new(MockHandler::default()))
            .err()
            .unwrap();
        assert!(matches!(err, ControlError::NotASocket(_)), "{err:?}");
    };
    let file = scratch.0.join("file");
    std::fs::write(&file, b"precious").unwrap();
    check(&file);
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    let dir = scratch.0.join("dir");
    std::fs::create_dir(&dir).unwrap();
    check(&dir);
    assert!(dir.is_dir());
    // A symlink, even to a stale socket, is not followed or replaced.
    let stale = scratch.0.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let link = scratch.0.join("link");
    std::os::unix::fs::symlink(&stale, &link).unwrap();
    check(&link);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn long_paths_bind_in_place() {
    let scratch = Scratch::new();
    // Short enough for a socket address, too long for the temporary one beside it.
    let depth = 95usize
        .saturating_sub(scratch.0.as_os_str().len() + 1)
        .max(1);
    let dir = scratch.0.join("d".repeat(depth));
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("s");
    assert!(path.as_os_str().len() < 108);
    let server = ControlServer::bind(&path, Arc::new(MockHandler::default())).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(UnixStream::connect(&path).is_ok());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    drop(server);
    assert!(!path.exists());
}

#[test]
fn client_reports_a_vanished_server() {
    let h = Harness::start();
    let mut c = h.client();
    let path = h.path.clone();
    drop(h);
    assert!(matches!(
        c.request(Request::Status),
        Err(ClientError::Closed)
    ));
    assert!(matches!(
        c.request(Request::Status),
        Err(ClientError::Unusable)
    ));
    assert!(matches!(
        ControlClient::connect(&path),
        Err(ClientError::Connect { .. })
    ));
}

#[test]
fn client_times_out() {
    let scratch = Scratch::new();
    let path = scratch.sock();
    let _silent = UnixListener::bind(&path).unwrap();
    let mut c =
        ControlClient::connect_with_timeout(&path, Some(Duration::from_millis(50))).unwrap();
    assert!(matches!(
        c.request(Request::Status),
        Err(ClientError::TimedOut)
    ));
}

#[test]
fn vsock_connection_figures_round_trip() {
    let h = Harness::start();
    let mut c = h.client();
    let ask = |port| Request::VsockConnection(VsockConnectionRequest { host_port: port });
    assert_eq!(
        c.request(ask(MOCK_PORT)).unwrap(),
        Response::VsockConnection(mock_connection())
    );
    assert_eq!(
        error_code(&c.request(ask(MOCK_PORT + 1)).unwrap()),
        ErrorCode::NotFound
    );
    assert_eq!(h.handler.calls(), [ask(MOCK_PORT), ask(MOCK_PORT + 1)]);
}
