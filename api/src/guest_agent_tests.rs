//! The daemon's agent calls against a stand-in for the VMM's vsock socket that hands
//! accepted connections to the real request handlers (`agent::server::Agent`) with a
//! recording system, so nothing on the host changes.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use agent::server::Agent;
use agent::system::System;

use super::*;
use crate::backend::{CloneSteps, GuestIdentity};

/// What the agent was asked to change, in order.
#[derive(Default, Clone)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Recorder {
    fn push(&self, what: String) -> std::io::Result<()> {
        self.0.lock().expect("lock").push(what);
        Ok(())
    }

    fn calls(&self) -> Vec<String> {
        self.0.lock().expect("lock").clone()
    }
}

impl System for Recorder {
    fn set_hostname(&self, name: &str) -> std::io::Result<()> {
        self.push(format!("hostname {name}"))
    }
    fn add_entropy(&self, entropy: &[u8]) -> std::io::Result<()> {
        self.push(format!("entropy {}", entropy.len()))
    }
    fn set_clock(&self, _unix_nanos: u64) -> std::io::Result<()> {
        self.push("clock".to_owned())
    }
    fn set_address(&self, _: &str, _: Ipv4Addr, _: u8, _: Ipv4Addr) -> std::io::Result<()> {
        self.push("address".to_owned())
    }
}

/// How the stand-in VMM treats each connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Vmm {
    /// Refuses the first `n` (the agent is not listening yet), then serves.
    RefuseFirst(usize),
    /// Answers `OK`, then closes (the guest reset the connection after accepting it, as
    /// when it handles the transport reset of a restore late): `n` times, then serves.
    AcceptThenClose(usize),
    /// Serves, but the agent is gone after taking the connection: it answers
    /// `report_timing` and then the connection ends.
    LostAfterTaken,
    /// Accepts nothing for this long, then serves every client (a VMM whose guest has not
    /// set up its vsock driver yet leaves clients waiting in its socket's backlog).
    SilentFor(Duration),
}

struct Fixture {
    dir: PathBuf,
    socket: PathBuf,
    recorder: Recorder,
    /// Connections the VMM saw.
    connections: Arc<AtomicUsize>,
    /// What the first accepted connection carried before the VMM answered `OK`: the
    /// `CONNECT` line and the bytes after it in the same write.
    first_write: Arc<Mutex<Vec<u8>>>,
    _vmm: JoinHandle<()>,
}

impl Fixture {
    fn start(name: &str, vmm: Vmm, with_system: bool) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "grove-guest-agent-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/etc")).expect("root");
        let socket = dir.join("vsock.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let recorder = Recorder::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let first_write = Arc::new(Mutex::new(Vec::new()));
        let agent = Arc::new(Agent::new(
            dir.join("root"),
            with_system.then(|| Box::new(recorder.clone()) as Box<dyn System>),
        ));
        let vmm_thread = {
            let (connections, first_write) = (Arc::clone(&connections), Arc::clone(&first_write));
            std::thread::spawn(move || {
                if let Vmm::SilentFor(silence) = vmm {
                    std::thread::sleep(silence);
                }
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { return };
                    let n = connections.fetch_add(1, Ordering::SeqCst);
                    match vmm {
                        Vmm::RefuseFirst(refused) if n < refused => drop(stream),
                        Vmm::AcceptThenClose(closed) if n < closed => {
                            // After the client's whole first write, as the VMM answers only
                            // once it has read the line.
                            std::thread::sleep(Duration::from_millis(50));
                            let _ = stream.set_nonblocking(true);
                            let _ = stream.read(&mut [0u8; 65536]);
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.write_all(b"OK 1073741824\n");
                        }
                        Vmm::LostAfterTaken => {
                            std::thread::sleep(Duration::from_millis(50));
                            let _ = stream.set_nonblocking(true);
                            let _ = stream.read(&mut [0u8; 65536]);
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.write_all(b"OK 1073741824\n");
                            let _ = agent::protocol::send_response(
                                &mut stream,
                                &agent::protocol::Response::Ok {},
                            );
                        }
                        Vmm::RefuseFirst(_) | Vmm::SilentFor(_) | Vmm::AcceptThenClose(_) => {
                            // The client's first write, whole: everything it sends before
                            // waiting for `OK`.
                            std::thread::sleep(Duration::from_millis(50));
                            stream.set_nonblocking(true).expect("nonblocking");
                            let mut early = vec![0u8; 65536];
                            let len = stream.read(&mut early).expect("read");
                            stream.set_nonblocking(false).expect("blocking");
                            early.truncate(len);
                            let line = early.iter().position(|&b| b == b'\n').expect("line");
                            let rest = early.split_off(line + 1);
                            // Like the VMM: a client gone by the time the guest accepted is
                            // dropped when `OK` cannot be written, and the guest gets nothing.
                            if stream.write_all(b"OK 1073741824\n").is_err() {
                                continue;
                            }
                            let mut first = first_write.lock().expect("lock");
                            if first.is_empty() {
                                first.clone_from(&early);
                                first.extend_from_slice(&rest);
                            }
                            drop(first);
                            let agent = Arc::clone(&agent);
                            std::thread::spawn(move || {
                                let _ = agent.serve(Prefixed(rest, stream));
                            });
                        }
                    }
                }
            })
        };
        Self {
            dir,
            socket,
            recorder,
            connections,
            first_write,
            _vmm: vmm_thread,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A stream whose first bytes were already read off it.
struct Prefixed(Vec<u8>, UnixStream);

impl Read for Prefixed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() {
            return self.1.read(buf);
        }
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0.drain(..n);
        Ok(n)
    }
}

impl Write for Prefixed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.1.flush()
    }
}

impl std::os::fd::AsFd for Prefixed {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.1.as_fd()
    }
}

/// A stand-in for the VMM's control socket: answers one connection's request with each of
/// `answers` in turn and returns the requests.
fn fake_control(
    path: &std::path::Path,
    answers: Vec<ControlResponse>,
) -> JoinHandle<Vec<ControlRequest>> {
    use vmm::control::protocol::{self as control, RequestEnvelope, ResponseEnvelope};
    let listener = UnixListener::bind(path).expect("bind control");
    std::thread::spawn(move || {
        let mut requests = Vec::new();
        for answer in answers {
            let (mut stream, _) = listener.accept().expect("accept control");
            let body = control::read_frame(&mut stream).expect("frame");
            let request: RequestEnvelope = control::decode(&body).expect("request");
            let reply = ResponseEnvelope {
                version: request.version,
                id: request.id,
                response: answer,
            };
            control::write_frame(&mut stream, &reply).expect("answer");
            requests.push(request.request);
        }
        requests
    })
}

fn figures(host_port: u32, guest_wait_us: u64) -> ControlResponse {
    ControlResponse::VsockConnection(vmm::control::protocol::VsockConnectionInfo {
        host_port,
        guest_port: 52,
        open: true,
        guest_wait_us,
        lifetime_us: guest_wait_us + 100,
        packets_to_guest: 2,
        packets_from_guest: 3,
        bytes_to_guest: 300,
        bytes_from_guest: 200,
    })
}

fn prep(clone: bool, timeout: Duration) -> Prepare {
    Prepare {
        identity: GuestIdentity {
            hostname: "feature-x".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
        },
        clone: clone.then(|| CloneSteps {
            entropy: vec![9; 64],
        }),
        timeout,
    }
}

#[test]
fn a_clone_is_prepared_in_one_write_after_refusals_with_the_guests_time() {
    let fixture = Fixture::start("clone", Vmm::RefuseFirst(2), true);
    let prepared =
        prepare(&fixture.socket, None, &prep(true, Duration::from_secs(10))).expect("ready");
    assert_eq!(prepared.hooks, Vec::new());
    assert!(prepared.guest_us.is_some(), "the agent timed its work");
    assert_eq!(
        fixture.recorder.calls(),
        ["entropy 64", "clock", "hostname feature-x"]
    );
    assert_eq!(fixture.connections.load(Ordering::SeqCst), 3);
    // The CONNECT line and every request went out in the first write.
    let first = fixture.first_write.lock().expect("lock").clone();
    assert!(first.starts_with(b"CONNECT 52\n"));
    let mut rest = &first[b"CONNECT 52\n".len()..];
    let mut ops = Vec::new();
    while let Some(body) = agent::protocol::read_frame(&mut rest).expect("frame") {
        let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
        ops.push(value["op"].as_str().expect("op").to_owned());
    }
    assert_eq!(
        ops,
        ["report_timing", "reseed", "clock", "identity", "run_hooks"]
    );
}

#[test]
fn a_handshake_the_vmm_does_not_answer_is_abandoned_and_made_again() {
    // Early in a boot: the first clients time out in the VMM's backlog (300 ms in tests),
    // are closed, and a later one is served. The dead ones deliver nothing.
    let fixture = Fixture::start("silent", Vmm::SilentFor(Duration::from_millis(700)), true);
    let prepared =
        prepare(&fixture.socket, None, &prep(true, Duration::from_secs(10))).expect("ready");
    assert!(prepared.guest_us.is_some());
    assert!(fixture.connections.load(Ordering::SeqCst) >= 2);
    assert_eq!(
        fixture.recorder.calls(),
        ["entropy 64", "clock", "hostname feature-x"],
        "applied once"
    );
}

#[test]
fn a_boot_gets_its_identity_only() {
    let fixture = Fixture::start("boot", Vmm::RefuseFirst(0), true);
    let prepared =
        prepare(&fixture.socket, None, &prep(false, Duration::from_secs(10))).expect("ready");
    assert!(prepared.guest_us.is_some());
    assert_eq!(fixture.recorder.calls(), ["hostname feature-x"]);
}

#[test]
fn an_agent_error_is_reported_with_its_code() {
    let fixture = Fixture::start("refusing", Vmm::RefuseFirst(0), false);
    match prepare(&fixture.socket, None, &prep(true, Duration::from_secs(10))) {
        Err(AgentError::Guest { code, .. }) => assert_eq!(code, "unsupported"),
        other => panic!("{other:?}"),
    }
    assert_eq!(fixture.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn a_connection_ended_before_the_agent_took_it_is_made_again() {
    // After a restore: accepted, then ended by the guest's transport reset, twice.
    let fixture = Fixture::start("reset", Vmm::AcceptThenClose(2), true);
    let prepared =
        prepare(&fixture.socket, None, &prep(true, Duration::from_secs(10))).expect("ready");
    assert!(prepared.guest_us.is_some());
    assert_eq!(fixture.connections.load(Ordering::SeqCst), 3);
    assert_eq!(
        fixture.recorder.calls(),
        ["entropy 64", "clock", "hostname feature-x"],
        "applied once"
    );
}

#[test]
fn a_connection_lost_after_the_agent_took_it_is_not_tried_again() {
    // The steps may have been applied (hooks must not run twice): an error, one connection.
    let fixture = Fixture::start("lost", Vmm::LostAfterTaken, true);
    match prepare(&fixture.socket, None, &prep(true, Duration::from_secs(10))) {
        Err(AgentError::Unavailable(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(fixture.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn waiting_for_an_agent_backs_off_and_gives_up_in_time() {
    let fixture = Fixture::start("absent", Vmm::RefuseFirst(usize::MAX), true);
    let started = Instant::now();
    match prepare(
        &fixture.socket,
        None,
        &prep(true, Duration::from_millis(250)),
    ) {
        Err(AgentError::Unavailable(message)) => {
            assert!(message.contains("refused"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Pauses of 1, 2, 4, 8, 16, 32 and then 50 ms: attempts at 0, 1, 3, 7, 15, 31, 63, 113,
    // 163, 213 ms and a last one past the deadline, at most 11 (a fixed 10 ms pause would
    // make about 26).
    let attempts = fixture.connections.load(Ordering::SeqCst);
    assert!((2..=11).contains(&attempts), "{attempts} attempts");

    // No socket at all: the same, as a connect error.
    let missing = fixture.dir.join("missing.sock");
    match connect(&missing, Duration::from_millis(50)) {
        Err(AgentError::Unavailable(message)) => {
            assert!(message.contains("still, after"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_vmm_says_how_long_it_waited_on_the_guest_for_the_connection() {
    let fixture = Fixture::start("wait", Vmm::RefuseFirst(0), true);
    let control = fixture.dir.join("control.sock");
    let vmm = fake_control(&control, vec![figures(1 << 30, 4321)]);
    let prepared = prepare(
        &fixture.socket,
        Some(&control),
        &prep(true, Duration::from_secs(10)),
    )
    .expect("ready");
    assert_eq!(prepared.guest_wait_us, Some(4321));
    // Asked for the port of the `OK` line.
    assert_eq!(
        vmm.join().expect("control"),
        [ControlRequest::VsockConnection(VsockConnectionRequest {
            host_port: 1 << 30
        })]
    );
}

#[test]
fn the_wait_on_connections_the_guest_ended_counts_as_the_guests() {
    // After a restore: two connections accepted and then ended by the transport reset, the
    // third served. The VMM's wait on all three is the guest's.
    let fixture = Fixture::start("ended-wait", Vmm::AcceptThenClose(2), true);
    let control = fixture.dir.join("control.sock");
    let vmm = fake_control(
        &control,
        vec![
            figures(1 << 30, 100_000),
            figures(1 << 30, 200_000),
            figures(1 << 30, 4321),
        ],
    );
    let prepared = prepare(
        &fixture.socket,
        Some(&control),
        &prep(true, Duration::from_secs(10)),
    )
    .expect("ready");
    assert_eq!(prepared.guest_wait_us, Some(304_321));
    assert_eq!(vmm.join().expect("control").len(), 3);
}

#[test]
fn readiness_does_not_depend_on_the_vmms_figures() {
    // No control socket, an error answer, figures of another connection: no wait, ready all
    // the same.
    let fixture = Fixture::start("nowait", Vmm::RefuseFirst(0), true);
    let absent = fixture.dir.join("absent.sock");
    let prepared = prepare(
        &fixture.socket,
        Some(&absent),
        &prep(false, Duration::from_secs(10)),
    )
    .expect("ready");
    assert_eq!(prepared.guest_wait_us, None);
    for (i, answer) in [
        ControlResponse::error(
            vmm::control::protocol::ErrorCode::BadRequest,
            "unknown type",
        ),
        figures(7, 4321),
    ]
    .into_iter()
    .enumerate()
    {
        let control = fixture.dir.join(format!("control{i}.sock"));
        let vmm = fake_control(&control, vec![answer]);
        let prepared = prepare(
            &fixture.socket,
            Some(&control),
            &prep(false, Duration::from_secs(10)),
        )
        .expect("ready");
        assert_eq!(prepared.guest_wait_us, None);
        vmm.join().expect("control");
    }
}
