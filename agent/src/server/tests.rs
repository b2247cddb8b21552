//! The client against the real request handlers over a socketpair: everything the agent does
//! except listening on vsock, with real host programs and files in temporary directories.
//! System changes go to a recording [`System`], so the host is not modified.

use std::fs;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::*;
use crate::client::{Client, ClientError};
use crate::protocol::{
    read_frame, recv_response, write_frame, Address, ExecRequest, IdentityRequest, Stream,
    MAX_FILE_BYTES, MAX_FRAME_BYTES,
};

/// A temporary directory removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "grove-agent-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What the recording system was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Hostname(String),
    Entropy(Vec<u8>),
    Clock(u64),
    Address(String, Ipv4Addr, u8, Ipv4Addr),
}

#[derive(Default, Clone)]
struct Recorder(Arc<Mutex<Vec<Call>>>);

impl Recorder {
    fn calls(&self) -> Vec<Call> {
        self.0.lock().expect("lock").clone()
    }

    fn record(&self, call: Call) -> std::io::Result<()> {
        self.0.lock().expect("lock").push(call);
        Ok(())
    }
}

impl System for Recorder {
    fn set_hostname(&self, name: &str) -> std::io::Result<()> {
        self.record(Call::Hostname(name.to_owned()))
    }
    fn add_entropy(&self, entropy: &[u8]) -> std::io::Result<()> {
        self.record(Call::Entropy(entropy.to_vec()))
    }
    fn set_clock(&self, unix_nanos: u64) -> std::io::Result<()> {
        self.record(Call::Clock(unix_nanos))
    }
    fn set_address(
        &self,
        interface: &str,
        address: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> std::io::Result<()> {
        self.record(Call::Address(
            interface.to_owned(),
            address,
            prefix,
            gateway,
        ))
    }
}

/// An agent with its root in a temp dir (with `etc/`), serving one end of a socketpair
/// on a thread.
struct Fixture {
    temp: TempDir,
    recorder: Recorder,
    server: Option<JoinHandle<Result<(), ProtocolError>>>,
}

impl Fixture {
    fn start(with_system: bool) -> (Self, UnixStream) {
        let temp = TempDir::new("server");
        fs::create_dir_all(temp.path().join("etc")).expect("etc");
        let recorder = Recorder::default();
        let system: Option<Box<dyn System>> = if with_system {
            Some(Box::new(recorder.clone()))
        } else {
            None
        };
        let agent = Agent::new(temp.path(), system);
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let server = std::thread::spawn(move || agent.serve(theirs));
        (
            Self {
                temp,
                recorder,
                server: Some(server),
            },
            ours,
        )
    }

    fn root(&self) -> &Path {
        self.temp.path()
    }

    /// Waits for the server thread to end and returns its result.
    fn finish(&mut self) -> Result<(), ProtocolError> {
        self.server
            .take()
            .expect("server running")
            .join()
            .expect("server thread")
    }
}

fn exec_collect(
    client: &mut Client<UnixStream>,
    request: &ExecRequest,
) -> (
    Result<crate::protocol::ExitStatus, ClientError>,
    Vec<u8>,
    Vec<u8>,
) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = client.exec(request, |stream, data| match stream {
        Stream::Stdout => out.extend_from_slice(data),
        Stream::Stderr => err.extend_from_slice(data),
    });
    (status, out, err)
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn ping_and_exec_a_real_program_on_one_connection() {
    let (mut fixture, stream) = Fixture::start(false);
    let mut client = Client::connect_stream(stream);
    let pong = client.ping().expect("ping");
    assert_eq!(pong.version, PROTOCOL_VERSION);
    assert_eq!(pong.agent_version, crate::AGENT_VERSION);

    let work = fixture.root().join("work");
    fs::create_dir(&work).expect("work dir");
    let request = ExecRequest {
        argv: argv(&[
            "sh",
            "-c",
            "pwd; echo \"$GROVE_TEST_VAR\"; tr a-z A-Z; echo warn >&2; exit 7",
        ]),
        env: [("GROVE_TEST_VAR".to_owned(), "from-host".to_owned())].into(),
        cwd: Some(work.display().to_string()),
        stdin: b"stdin text\n".to_vec(),
        timeout_ms: Some(30_000),
    };
    let (status, out, err) = exec_collect(&mut client, &request);
    let status = status.expect("exec");
    assert_eq!(
        (status.code, status.signal, status.timed_out),
        (Some(7), None, false)
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("{}\nfrom-host\nSTDIN TEXT\n", work.display())
    );
    assert_eq!(err, b"warn\n");

    // Large binary output arrives complete, in several frames.
    let request = ExecRequest {
        argv: argv(&["head", "-c", "300000", "/dev/zero"]),
        ..ExecRequest::default()
    };
    let mut frames = 0;
    let mut total = 0;
    let status = client
        .exec(&request, |_, data| {
            frames += 1;
            total += data.len();
        })
        .expect("exec head");
    assert!(status.success());
    assert_eq!(total, 300_000);
    assert!(frames >= 10, "{frames} frames");

    // The same connection still answers.
    client.ping().expect("ping after exec");
    drop(client);
    fixture.finish().expect("clean close");
}

#[test]
fn exec_errors_keep_the_connection_usable() {
    let (_fixture, stream) = Fixture::start(false);
    let mut client = Client::connect_stream(stream);
    let (status, _, _) = exec_collect(
        &mut client,
        &ExecRequest {
            argv: argv(&["grove-no-such-program"]),
            ..ExecRequest::default()
        },
    );
    let error = status.expect_err("spawn failure");
    assert_eq!(
        error.agent_error().map(|e| e.code),
        Some(ErrorCode::SpawnFailed),
        "{error}"
    );
    let (status, _, _) = exec_collect(&mut client, &ExecRequest::default());
    assert_eq!(
        status
            .expect_err("empty argv")
            .agent_error()
            .map(|e| e.code),
        Some(ErrorCode::InvalidArgument)
    );
    let (status, out, _) = exec_collect(
        &mut client,
        &ExecRequest {
            argv: argv(&["sh", "-c", "echo hi; sleep 30"]),
            timeout_ms: Some(200),
            ..ExecRequest::default()
        },
    );
    let status = status.expect("timed out exec");
    assert!(status.timed_out);
    assert_eq!(status.signal, Some(libc::SIGKILL));
    assert_eq!(out, b"hi\n");
    client.ping().expect("still usable");
}

#[test]
fn files_round_trip_with_mode_and_limits() {
    let (fixture, stream) = Fixture::start(false);
    let mut client = Client::connect_stream(stream);
    let path = fixture.root().join("file.bin");
    let path_str = path.display().to_string();
    let data: Vec<u8> = (0..=255).cycle().take(70_000).collect();
    client
        .write_file(&path_str, &data, Some(0o751))
        .expect("write");
    assert_eq!(fs::read(&path).expect("on disk"), data);
    let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o751);
    assert_eq!(client.read_file(&path_str).expect("read"), data);
    // Replacing truncates, and keeps the mode when none is given.
    client
        .write_file(&path_str, b"short", None)
        .expect("rewrite");
    assert_eq!(client.read_file(&path_str).expect("read"), b"short");
    let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o751);

    let code =
        |r: Result<Vec<u8>, ClientError>| r.expect_err("error").agent_error().map(|e| e.code);
    assert_eq!(
        code(client.read_file(&format!("{path_str}.missing"))),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(client.read_file("relative/path")),
        Some(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        code(client.read_file(&fixture.root().display().to_string())),
        Some(ErrorCode::InvalidArgument)
    );
    let big = fixture.root().join("big");
    fs::write(&big, vec![1u8; MAX_FILE_BYTES + 1]).expect("big file");
    assert_eq!(
        code(client.read_file(&big.display().to_string())),
        Some(ErrorCode::TooLarge)
    );
    fs::write(&big, vec![1u8; MAX_FILE_BYTES]).expect("file at the limit");
    assert_eq!(
        client
            .read_file(&big.display().to_string())
            .expect("at the limit")
            .len(),
        MAX_FILE_BYTES
    );
    let error = client
        .write_file(&format!("{}/no-dir/x", fixture.root().display()), b"", None)
        .expect_err("no parent");
    assert_eq!(
        error.agent_error().map(|e| e.code),
        Some(ErrorCode::NotFound)
    );
    let error = client
        .write_file(&path_str, b"", Some(0o17777))
        .expect_err("bad mode");
    assert_eq!(
        error.agent_error().map(|e| e.code),
        Some(ErrorCode::InvalidArgument)
    );
}

fn identity(address: Option<Address>) -> IdentityRequest {
    IdentityRequest {
        hostname: "feature-x".to_owned(),
        machine_id: "00112233445566778899aabbccddeeff".to_owned(),
        address,
    }
}

#[test]
fn identity_applies_hostname_files_and_address_in_order() {
    let (fixture, stream) = Fixture::start(true);
    let mut client = Client::connect_stream(stream);
    client
        .identity(&identity(Some(Address {
            cidr: "172.16.0.2/30".to_owned(),
            gateway: "172.16.0.1".to_owned(),
        })))
        .expect("identity");
    assert_eq!(
        fixture.recorder.calls(),
        [
            Call::Hostname("feature-x".to_owned()),
            Call::Address(
                "eth0".to_owned(),
                Ipv4Addr::new(172, 16, 0, 2),
                30,
                Ipv4Addr::new(172, 16, 0, 1)
            ),
        ]
    );
    let read = |name: &str| fs::read_to_string(fixture.root().join(name)).expect(name);
    assert_eq!(read("etc/hostname"), "feature-x\n");
    assert_eq!(read("etc/machine-id"), "00112233445566778899aabbccddeeff\n");

    // Invalid values change nothing.
    for bad in [
        IdentityRequest {
            hostname: "bad name".to_owned(),
            ..identity(None)
        },
        IdentityRequest {
            machine_id: "xyz".to_owned(),
            ..identity(None)
        },
        identity(Some(Address {
            cidr: "172.16.0.2".to_owned(),
            gateway: "172.16.0.1".to_owned(),
        })),
        identity(Some(Address {
            cidr: "172.16.0.2/30".to_owned(),
            gateway: "gateway".to_owned(),
        })),
    ] {
        let error = client.identity(&bad).expect_err("invalid");
        assert_eq!(
            error.agent_error().map(|e| e.code),
            Some(ErrorCode::InvalidArgument)
        );
    }
    assert_eq!(fixture.recorder.calls().len(), 2, "nothing more applied");
}

#[test]
fn reseed_credits_entropy_and_rewrites_existing_seed_files() {
    let (fixture, stream) = Fixture::start(true);
    let mut client = Client::connect_stream(stream);
    let systemd = fixture.root().join("var/lib/systemd/random-seed");
    fs::create_dir_all(systemd.parent().expect("parent")).expect("dirs");
    let old = vec![0xabu8; 512];
    fs::write(&systemd, &old).expect("seed");
    client.reseed(&[9; 32]).expect("reseed");
    assert_eq!(fixture.recorder.calls(), [Call::Entropy(vec![9; 32])]);
    let new = fs::read(&systemd).expect("seed");
    assert_eq!(new.len(), 512);
    assert_ne!(new, old);
    // Absent seed files are not created.
    assert!(!fixture.root().join("var/lib/urandom/random-seed").exists());

    for bad in [Vec::new(), vec![0; crate::protocol::MAX_ENTROPY_BYTES + 1]] {
        let error = client.reseed(&bad).expect_err("bad size");
        assert_eq!(
            error.agent_error().map(|e| e.code),
            Some(ErrorCode::InvalidArgument)
        );
    }
    client.clock(1_767_225_600_000_000_001).expect("clock");
    assert_eq!(
        fixture.recorder.calls().last(),
        Some(&Call::Clock(1_767_225_600_000_000_001))
    );
}

#[test]
fn system_changes_are_refused_without_a_system() {
    let (fixture, stream) = Fixture::start(false);
    let mut client = Client::connect_stream(stream);
    for error in [
        client.identity(&identity(None)).expect_err("identity"),
        client.reseed(&[1; 16]).expect_err("reseed"),
        client.clock(1).expect_err("clock"),
    ] {
        assert_eq!(
            error.agent_error().map(|e| e.code),
            Some(ErrorCode::Unsupported)
        );
    }
    assert!(!fixture.root().join("etc/hostname").exists());
}

#[test]
fn run_hooks_reports_the_hooks_directory_in_order() {
    let (fixture, stream) = Fixture::start(false);
    let mut client = Client::connect_stream(stream);
    assert!(client.run_hooks(None).expect("no hooks dir").is_empty());
    let dir = fixture.root().join(HOOKS_DIR);
    fs::create_dir_all(&dir).expect("hooks dir");
    for (name, script) in [("20-b", "echo b; exit 1"), ("10-a", "echo a")] {
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("hook");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let results = client.run_hooks(Some(10_000)).expect("hooks");
    let summary: Vec<(&str, Option<i32>, &str)> = results
        .iter()
        .map(|r| (r.name.as_str(), r.code, r.output.as_str()))
        .collect();
    assert_eq!(
        summary,
        [("10-a", Some(0), "a\n"), ("20-b", Some(1), "b\n")]
    );
}

/// Reads one response frame from a raw stream.
fn raw_response(stream: &mut UnixStream) -> Response {
    recv_response(stream)
        .expect("response")
        .expect("a frame, not EOF")
}

#[test]
fn bad_frames_get_error_responses_and_the_connection_goes_on() {
    let (mut fixture, mut stream) = Fixture::start(false);
    let cases: [(&[u8], ErrorCode); 5] = [
        (b"not json", ErrorCode::BadRequest),
        (b"[1,2]", ErrorCode::BadRequest),
        (br#"{"v":1,"op":"ping","x":1}"#, ErrorCode::BadRequest),
        (br#"{"v":1,"op":"reboot"}"#, ErrorCode::BadRequest),
        (br#"{"v":7,"op":"ping"}"#, ErrorCode::VersionMismatch),
    ];
    for (body, code) in cases {
        write_frame(&mut stream, body).expect("send");
        match raw_response(&mut stream) {
            Response::Error(e) => assert_eq!(e.code, code, "{}", String::from_utf8_lossy(body)),
            other => panic!("{other:?}"),
        }
    }
    write_frame(&mut stream, br#"{"v":1,"op":"ping"}"#).expect("send");
    assert!(matches!(raw_response(&mut stream), Response::Pong(_)));
    drop(stream);
    fixture.finish().expect("clean close");
}

#[test]
fn oversized_frame_is_answered_and_the_connection_closed() {
    let (mut fixture, mut stream) = Fixture::start(false);
    let len = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
    stream.write_all(&len).expect("header");
    match raw_response(&mut stream) {
        Response::Error(e) => assert_eq!(e.code, ErrorCode::FrameTooLarge),
        other => panic!("{other:?}"),
    }
    assert_eq!(read_frame(&mut stream).expect("EOF"), None, "closed");
    assert!(matches!(
        fixture.finish(),
        Err(ProtocolError::FrameTooLarge(_))
    ));
}

#[test]
fn host_disconnecting_mid_frame_or_mid_exec_ends_only_that_connection() {
    // Mid-frame: half a header, then gone.
    let (mut fixture, mut stream) = Fixture::start(false);
    stream.write_all(&[0, 0]).expect("half header");
    drop(stream);
    assert!(matches!(
        fixture.finish(),
        Err(ProtocolError::Truncated { .. })
    ));

    // Mid-exec: the program is killed (its marker never appears) and serve returns.
    let (mut fixture, stream) = Fixture::start(false);
    let marker = fixture.root().join("survived");
    let script = format!("echo started; sleep 3; touch {}", marker.display());
    let mut stream = stream;
    crate::protocol::send_request(
        &mut stream,
        &Request::Exec(ExecRequest {
            argv: argv(&["sh", "-c", &script]),
            ..ExecRequest::default()
        }),
    )
    .expect("send exec");
    match raw_response(&mut stream) {
        Response::Output { data, .. } => assert_eq!(data, b"started\n"),
        other => panic!("{other:?}"),
    }
    drop(stream);
    assert!(
        fixture.finish().is_err(),
        "the connection ended with an error"
    );
    std::thread::sleep(Duration::from_millis(3500));
    assert!(!marker.exists(), "the program was killed");
}

/// A stand-in for the VMM's vsock muxer: accepts one connection on a Unix socket, expects
/// `CONNECT 52\n`, and either refuses (closes) or answers `OK` and hands the stream to an
/// in-process agent.
fn fake_vmm(path: &Path, accept: bool) -> JoinHandle<String> {
    let listener = UnixListener::bind(path).expect("bind");
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut line = Vec::new();
        let mut byte = [0u8];
        while stream.read(&mut byte).expect("read") == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        if accept {
            stream.write_all(b"OK 1073741824\n").expect("ok");
            let agent = Agent::new("/", None);
            agent.serve(stream).expect("serve");
        }
        line
    })
}

#[test]
fn connect_uds_does_the_vsock_handshake() {
    let temp = TempDir::new("uds");
    let path = temp.path().join("v.sock");
    let vmm = fake_vmm(&path, true);
    let mut client =
        Client::connect_uds(&path, crate::AGENT_PORT, Duration::from_secs(10)).expect("connect");
    assert_eq!(client.host_port(), Some(1 << 30), "the port of the OK line");
    assert_eq!(client.ping().expect("ping").version, PROTOCOL_VERSION);
    let (status, out, _) = exec_collect(
        &mut client,
        &ExecRequest {
            argv: argv(&["echo", "through the muxer"]),
            ..ExecRequest::default()
        },
    );
    assert!(status.expect("exec").success());
    assert_eq!(out, b"through the muxer\n");
    drop(client);
    assert_eq!(vmm.join().expect("vmm"), "CONNECT 52");

    let refused = temp.path().join("r.sock");
    let vmm = fake_vmm(&refused, false);
    let error = Client::connect_uds(&refused, 52, Duration::from_secs(10)).expect_err("refused");
    assert!(
        matches!(error, ClientError::Refused { port: 52, .. }),
        "{error}"
    );
    vmm.join().expect("vmm");

    let error = Client::connect_uds(&temp.path().join("absent.sock"), 52, Duration::from_secs(1))
        .expect_err("no socket");
    assert!(matches!(error, ClientError::Connect(..)), "{error}");
}

#[test]
fn connect_uds_times_out_on_a_silent_vmm() {
    let temp = TempDir::new("uds-silent");
    let path = temp.path().join("v.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let holder = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        std::thread::sleep(Duration::from_secs(2));
        drop(stream);
    });
    let error = Client::connect_uds(&path, 52, Duration::from_millis(200)).expect_err("timeout");
    assert!(matches!(error, ClientError::Timeout(_)), "{error}");
    holder.join().expect("holder");
}

#[test]
fn pipelined_requests_are_answered_in_order_with_handling_times() {
    use crate::protocol::{ClockRequest, ReseedRequest, Response, RunHooksRequest};
    let (fixture, stream) = Fixture::start(true);
    let mut client = Client::connect_stream(stream);
    let answers = client
        .pipeline(&[
            Request::Ping {},
            Request::Reseed(ReseedRequest {
                entropy: vec![7; 16],
            }),
            Request::Clock(ClockRequest { unix_nanos: 5 }),
            Request::Identity(identity(None)),
            Request::RunHooks(RunHooksRequest { timeout_ms: None }),
        ])
        .expect("pipeline");
    let responses: Vec<&Response> = answers.iter().map(|a| &a.response).collect();
    assert_eq!(answers.len(), 5);
    assert!(matches!(responses[0], Response::Pong(_)), "{answers:?}");
    assert!(matches!(responses[1], Response::Ok {}), "{answers:?}");
    assert!(matches!(responses[2], Response::Ok {}), "{answers:?}");
    assert!(matches!(responses[3], Response::Ok {}), "{answers:?}");
    assert!(
        matches!(responses[4], Response::Hooks { .. }),
        "{answers:?}"
    );
    assert!(
        answers.iter().all(|a| a.handled_us.is_some()),
        "{answers:?}"
    );
    let calls = fixture.recorder.calls();
    assert_eq!(calls[0], Call::Entropy(vec![7; 16]));
    assert_eq!(calls[1], Call::Clock(5));
    // Requests after the pipeline on the same connection keep working.
    client.ping().expect("ping after a pipeline");
    // An error answer ends the pipeline with that error.
    let error = client
        .pipeline(&[
            Request::Reseed(ReseedRequest {
                entropy: Vec::new(),
            }),
            Request::Ping {},
        ])
        .expect_err("empty entropy");
    assert_eq!(
        error.agent_error().map(|e| e.code),
        Some(ErrorCode::InvalidArgument)
    );
}

#[test]
fn handling_time_covers_the_work_and_only_the_last_frame_carries_it() {
    let (mut fixture, mut stream) = Fixture::start(false);
    // Not asked for: no time, so hosts that reject unknown fields are served as before.
    write_frame(&mut stream, br#"{"v":1,"op":"ping"}"#).expect("send");
    let body = read_frame(&mut stream).expect("read").expect("frame");
    assert!(
        serde_json::from_slice::<Response>(&body).is_ok(),
        "strict decode"
    );

    crate::protocol::send_request(&mut stream, &Request::ReportTiming {}).expect("send");
    let answer = crate::protocol::recv_answer(&mut stream)
        .expect("read")
        .expect("frame");
    assert_eq!(answer.response, Response::Ok {});
    assert!(answer.handled_us.is_some(), "from its own answer on");

    // A command that sleeps 300 ms: the exit carries at least that, the output nothing.
    crate::protocol::send_request(
        &mut stream,
        &Request::Exec(ExecRequest {
            argv: argv(&["sh", "-c", "echo hi; sleep 0.3"]),
            ..ExecRequest::default()
        }),
    )
    .expect("send exec");
    let mut times = Vec::new();
    loop {
        let answer = crate::protocol::recv_answer(&mut stream)
            .expect("read")
            .expect("frame");
        times.push((answer.response.op(), answer.handled_us));
        if answer.response.op() == "exit" {
            break;
        }
    }
    assert_eq!(times[0], ("output", None), "{times:?}");
    let (op, exit_us) = times[times.len() - 1];
    assert_eq!(op, "exit");
    assert!(exit_us.is_some_and(|us| us >= 300_000), "{times:?}");
    // Errors are answers too.
    write_frame(&mut stream, b"garbage").expect("send");
    let answer = crate::protocol::recv_answer(&mut stream)
        .expect("read")
        .expect("frame");
    assert!(
        matches!(answer.response, Response::Error(_)) && answer.handled_us.is_some(),
        "{answer:?}"
    );
    drop(stream);
    fixture.finish().expect("clean close");
}

/// A stream whose input is given up front and whose writes are recorded one by one; its
/// descriptor (for the hang-up watch) is a pipe that never hangs up.
struct Recorded {
    input: std::io::Cursor<Vec<u8>>,
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
    fd: std::os::fd::OwnedFd,
}

impl Read for Recorded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Recorded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writes.lock().expect("lock").push(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsFd for Recorded {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn recorded(input: Vec<u8>) -> (Recorded, Arc<Mutex<Vec<Vec<u8>>>>, UnixStream) {
    let (fd, keep) = UnixStream::pair().expect("pair");
    let writes = Arc::new(Mutex::new(Vec::new()));
    let stream = Recorded {
        input: std::io::Cursor::new(input),
        writes: Arc::clone(&writes),
        fd: fd.into(),
    };
    (stream, writes, keep)
}

fn frames_of(requests: &[Request]) -> Vec<u8> {
    let mut out = Vec::new();
    for request in requests {
        crate::protocol::send_request(&mut out, request).expect("encode");
    }
    out
}

#[test]
fn pipelined_answers_leave_in_one_write() {
    use crate::protocol::{ClockRequest, ReseedRequest};
    let input = frames_of(&[
        Request::ReportTiming {},
        Request::Ping {},
        Request::Reseed(ReseedRequest { entropy: vec![1] }),
        Request::Clock(ClockRequest { unix_nanos: 1 }),
        Request::Identity(identity(None)),
    ]);
    let (stream, writes, _keep) = recorded(input);
    Agent::new("/", Some(Box::new(Recorder::default())))
        .serve(stream)
        .expect("serve");
    let writes = writes.lock().expect("lock").clone();
    // report_timing's answer at once, then one write for the four others.
    assert_eq!(writes.len(), 2, "{writes:?}");
    let ops: Vec<Vec<&str>> = writes
        .iter()
        .map(|w| {
            let mut wire = std::io::Cursor::new(w.as_slice());
            let mut ops = Vec::new();
            while let Some(answer) = crate::protocol::recv_answer(&mut wire).expect("answer") {
                assert!(answer.handled_us.is_some(), "{answer:?}");
                ops.push(answer.response.op());
            }
            ops
        })
        .collect();
    assert_eq!(ops, [vec!["ok"], vec!["pong", "ok", "ok", "ok"]]);
}

#[test]
fn exec_output_streams_while_answers_wait_for_the_pipeline() {
    let input = frames_of(&[
        Request::Ping {},
        Request::Exec(ExecRequest {
            argv: argv(&["echo", "now"]),
            ..ExecRequest::default()
        }),
        Request::Ping {},
    ]);
    let (stream, writes, _keep) = recorded(input);
    Agent::new("/", None).serve(stream).expect("serve");
    let writes = writes.lock().expect("lock").clone();
    let ops: Vec<Vec<&str>> = writes
        .iter()
        .map(|w| {
            let mut wire = std::io::Cursor::new(w.as_slice());
            let mut ops = Vec::new();
            while let Some(r) = recv_response(&mut wire).expect("answer") {
                ops.push(r.op());
            }
            ops
        })
        .collect();
    // The pong waits for the output, which is written at once; exit and the last pong
    // leave together at the end.
    assert_eq!(ops, [vec!["pong", "output"], vec!["exit", "pong"]]);
}

#[test]
fn answers_are_not_held_back_while_the_next_request_is_incomplete() {
    let (mut fixture, mut stream) = Fixture::start(false);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // A ping and the first half of another, in one write.
    let mut bytes = frames_of(&[Request::Ping {}, Request::Ping {}]);
    let half = bytes.split_off(bytes.len() - 5);
    stream.write_all(&bytes).expect("send");
    assert!(matches!(raw_response(&mut stream), Response::Pong(_)));
    stream.write_all(&half).expect("rest");
    assert!(matches!(raw_response(&mut stream), Response::Pong(_)));
    drop(stream);
    fixture.finish().expect("clean close");
}

#[test]
fn a_host_pipeline_works_with_an_agent_that_reports_no_times() {
    // An agent from before `report_timing`: it rejects the op as a bad request and answers
    // the rest without times.
    let (ours, mut theirs) = UnixStream::pair().expect("pair");
    let old_agent = std::thread::spawn(move || {
        while let Some(body) = read_frame(&mut theirs).expect("frame") {
            let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
            let response = match value["op"].as_str() {
                Some("report_timing") => {
                    Response::error(ErrorCode::BadRequest, "unknown variant `report_timing`")
                }
                Some("ping") => Response::Pong(Pong {
                    version: 1,
                    agent_version: "0.0.1".into(),
                }),
                _ => Response::Ok {},
            };
            crate::protocol::send_response(&mut theirs, &response).expect("answer");
        }
    });
    let mut client = Client::connect_stream(ours);
    let answers = client
        .pipeline(&[
            Request::Ping {},
            Request::Clock(crate::protocol::ClockRequest { unix_nanos: 1 }),
        ])
        .expect("pipeline");
    assert_eq!(answers.len(), 2);
    assert!(matches!(answers[0].response, Response::Pong(_)));
    assert!(
        answers.iter().all(|a| a.handled_us.is_none()),
        "{answers:?}"
    );
    drop(client);
    old_agent.join().expect("old agent");
}

#[test]
fn connect_uds_with_sends_the_pipeline_with_the_connect_line() {
    let temp = TempDir::new("uds-early");
    let path = temp.path().join("v.sock");
    let vmm = fake_vmm(&path, true);
    let pipeline =
        crate::client::Pipeline::new(&[Request::Ping {}, Request::Ping {}]).expect("pipeline");
    assert_eq!(pipeline.len(), 2);
    let mut client = Client::connect_uds_with(
        &path,
        crate::AGENT_PORT,
        Duration::from_secs(10),
        pipeline.bytes(),
    )
    .expect("connect");
    let answers = client.answers(&pipeline).expect("answers");
    assert!(
        answers
            .iter()
            .all(|a| matches!(a.response, Response::Pong(_)) && a.handled_us.is_some()),
        "{answers:?}"
    );
    drop(client);
    assert_eq!(vmm.join().expect("vmm"), "CONNECT 52");
    let exec = crate::client::Pipeline::new(&[Request::Exec(ExecRequest::default())]);
    assert!(matches!(exec, Err(ClientError::Unexpected { .. })));
}
