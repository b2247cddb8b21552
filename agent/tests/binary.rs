//! The `grove-agent` binary on this host, listening on a Unix socket (`--listen-unix`)
//! instead of vsock: the same accept loop, threads and handlers as in the guest.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::client::{Client, ClientError};
use agent::protocol::{
    read_frame, recv_response, send_request, write_frame, ErrorCode, ExecRequest, IdentityRequest,
    Request, Response, Stream,
};

/// A running agent with its root in a temp dir; killed and cleaned up on drop.
struct RunningAgent {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl RunningAgent {
    fn start(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("grove-agent-bin-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("root/etc/grove/hooks.d")).expect("root");
        let socket = dir.join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_grove-agent"))
            .arg("--listen-unix")
            .arg(&socket)
            .arg("--root")
            .arg(dir.join("root"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start grove-agent");
        let agent = Self { child, dir, socket };
        // The socket file appears at bind(2), a moment before listen(2): wait until a
        // connection succeeds.
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&agent.socket).is_err() {
            assert!(Instant::now() < deadline, "grove-agent did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        agent
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    fn connect(&self) -> Client<UnixStream> {
        let stream = UnixStream::connect(&self.socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Client::connect_stream(stream)
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        timeout_ms: Some(30_000),
        ..ExecRequest::default()
    }
}

fn output_of(client: &mut Client<UnixStream>, script: &str) -> (Option<i32>, String) {
    let mut out = Vec::new();
    let status = client
        .exec(&sh(script), |stream, data| {
            if stream == Stream::Stdout {
                out.extend_from_slice(data);
            }
        })
        .expect("exec");
    (status.code, String::from_utf8_lossy(&out).into_owned())
}

fn hook(dir: &Path, name: &str, script: &str) {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("hook");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

#[test]
fn serves_requests_and_survives_bad_hosts() {
    let agent = RunningAgent::start("main");
    let mut client = agent.connect();
    assert_eq!(client.ping().expect("ping").version, 1);
    assert_eq!(
        output_of(&mut client, "echo hello; exit 5"),
        (Some(5), "hello\n".to_owned())
    );

    // Files, through the agent.
    let file = agent.root().join("note.txt");
    let file_arg = file.display().to_string();
    client
        .write_file(&file_arg, b"from the host\n", Some(0o600))
        .expect("write");
    assert_eq!(
        client.read_file(&file_arg).expect("read"),
        b"from the host\n"
    );

    // Hooks from <root>/etc/grove/hooks.d, in order.
    let hooks = agent.root().join("etc/grove/hooks.d");
    hook(&hooks, "50-second", "echo second");
    hook(&hooks, "10-first", "echo first; exit 2");
    let results = client.run_hooks(None).expect("hooks");
    let names: Vec<(&str, Option<i32>)> =
        results.iter().map(|r| (r.name.as_str(), r.code)).collect();
    assert_eq!(names, [("10-first", Some(2)), ("50-second", Some(0))]);

    // Without --system, system changes are refused and nothing is written.
    let error = client
        .identity(&IdentityRequest {
            hostname: "clone".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            address: None,
        })
        .expect_err("refused");
    assert_eq!(
        error.agent_error().map(|e| e.code),
        Some(ErrorCode::Unsupported)
    );
    assert!(!agent.root().join("etc/hostname").exists());

    // A malformed frame gets an error and the connection goes on.
    let mut stream = client.into_inner();
    write_frame(&mut stream, b"{\"v\":1,\"op\":").expect("send garbage");
    let reply = recv_response(&mut stream).expect("reply").expect("frame");
    assert!(
        matches!(&reply, Response::Error(e) if e.code == ErrorCode::BadRequest),
        "{reply:?}"
    );
    let mut client = Client::connect_stream(stream);
    client.ping().expect("ping after garbage");

    // A host that vanishes in the middle of a frame, or of a command, costs only its own
    // connection; the program it started is killed.
    let mut half = UnixStream::connect(&agent.socket).expect("connect");
    half.write_all(&[0, 0, 1]).expect("partial header");
    drop(half);
    let marker = agent.root().join("not-killed");
    let mut quitter = UnixStream::connect(&agent.socket).expect("connect");
    send_request(
        &mut quitter,
        &Request::Exec(sh(&format!("echo go; sleep 2; touch {}", marker.display()))),
    )
    .expect("exec");
    let first = recv_response(&mut quitter).expect("output").expect("frame");
    assert!(matches!(first, Response::Output { .. }), "{first:?}");
    drop(quitter);

    // An oversized frame closes only that connection.
    let mut big = UnixStream::connect(&agent.socket).expect("connect");
    big.write_all(&(2u32 << 20).to_be_bytes())
        .expect("huge length");
    let reply = recv_response(&mut big).expect("reply").expect("frame");
    assert!(
        matches!(&reply, Response::Error(e) if e.code == ErrorCode::FrameTooLarge),
        "{reply:?}"
    );
    assert_eq!(read_frame(&mut big).expect("closed"), None);

    // Connections are served concurrently: a command blocked on a FIFO does not hold up a
    // ping on another connection (which would otherwise time out).
    let fifo = agent.root().join("gate");
    let fifo_arg = fifo.display().to_string();
    assert_eq!(
        output_of(&mut client, &format!("mkfifo {fifo_arg}")).0,
        Some(0)
    );
    let mut blocked = agent.connect();
    let blocked_thread =
        std::thread::spawn(move || output_of(&mut blocked, &format!("cat {fifo_arg}")));
    let stream = UnixStream::connect(&agent.socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut fast = Client::connect_stream(stream);
    fast.ping().expect("ping while another command runs");
    fs::write(&fifo, "released\n").expect("open the gate");
    assert_eq!(
        blocked_thread.join().expect("blocked"),
        (Some(0), "released\n".to_owned())
    );

    std::thread::sleep(Duration::from_millis(2500));
    assert!(!marker.exists(), "the abandoned command was killed");
    client.ping().expect("the first connection still works");
    assert!(
        agent.connect().ping().is_ok(),
        "and new connections are accepted"
    );
}

#[test]
fn bad_arguments_exit_with_usage() {
    let output = Command::new(env!("CARGO_BIN_EXE_grove-agent"))
        .arg("--frobnicate")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("usage: grove-agent"), "{stderr}");
}

#[test]
fn client_reports_a_closed_agent() {
    let agent = RunningAgent::start("closed");
    let mut client = agent.connect();
    client.ping().expect("ping");
    drop(agent);
    let error = client.ping().expect_err("agent gone");
    assert!(
        matches!(error, ClientError::Closed(_) | ClientError::Protocol(_)),
        "{error}"
    );
}

#[test]
fn pipelines_get_handling_times_on_prestarted_workers() {
    let agent = RunningAgent::start("pipeline");
    // More connections at once than workers start ahead: each is served.
    let mut clients: Vec<_> = (0..4).map(|_| agent.connect()).collect();
    for client in &mut clients {
        let answers = client
            .pipeline(&[Request::Ping {}, Request::Ping {}])
            .expect("pipeline");
        assert_eq!(answers.len(), 2);
        assert!(
            answers
                .iter()
                .all(|a| matches!(a.response, Response::Pong(_)) && a.handled_us.is_some()),
            "{answers:?}"
        );
    }
}
