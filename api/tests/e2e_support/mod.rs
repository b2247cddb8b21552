//! What the end-to-end tests share: a real `groved` on a temporary data directory, raw HTTP
//! over its socket, and cleanup of every VMM it started (also when a test fails).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::Output;

use base64::Engine as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const WAIT: Duration = Duration::from_secs(240);

/// One HTTP/1.1 request over the daemon's socket: (status, body).
pub fn http(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    ctype: &str,
) -> (u16, Vec<u8>) {
    let mut s = UnixStream::connect(sock).expect("connect to groved");
    s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: grove\r\nConnection: close\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = out[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
    out
}

pub fn json_req(sock: &Path, method: &str, path: &str, body: Value) -> (u16, Value) {
    let text = body.to_string();
    let (status, out) = http(
        sock,
        method,
        path,
        Some(text.as_bytes()),
        "application/json",
    );
    (status, serde_json::from_slice(&out).unwrap_or(Value::Null))
}

pub fn get(sock: &Path, path: &str) -> (u16, Value) {
    let (status, out) = http(sock, "GET", path, None, "application/json");
    (status, serde_json::from_slice(&out).unwrap_or(Value::Null))
}

pub fn console(sock: &Path, env: &str) -> String {
    let (_, out) = http(
        sock,
        "GET",
        &format!("/v1/environments/{env}/console"),
        None,
        "text/plain",
    );
    String::from_utf8_lossy(&out).into_owned()
}

pub fn wait_console(sock: &Path, env: &str, needle: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = console(sock, env);
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{env}: no {needle:?} within {WAIT:?}; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn type_line(sock: &Path, env: &str, line: &str) {
    let (status, out) = http(
        sock,
        "POST",
        &format!("/v1/environments/{env}/console"),
        Some(format!("{line}\n").as_bytes()),
        "text/plain",
    );
    assert_eq!(status, 204, "{}", String::from_utf8_lossy(&out));
}

pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    pub fn start(data: &Path, sock: &Path) -> Self {
        Self::start_with(data, sock, &[])
    }

    /// A daemon with `extra` arguments (`--network`, ...).
    pub fn start_with(data: &Path, sock: &Path, extra: &[&str]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_groved"))
            .arg("--data-dir")
            .arg(data)
            .arg("--socket")
            .arg(sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start groved");
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < deadline, "groved did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child }
    }

    pub fn stop(mut self) {
        // SAFETY: kill takes a pid and a signal number; nothing is borrowed.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// grove-vmm processes whose command line mentions `data`.
pub fn vmms_under(data: &Path) -> Vec<u32> {
    let needle = data.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains(&needle) && c.contains("grove-vmm")
                })
                .unwrap_or(false)
        })
        .collect()
}

/// One process per VM under `data`: a jailed VMM is three processes (the starter, the init
/// of its PID namespace and the VMM itself), of which this keeps the outermost.
pub fn vms_under(data: &Path) -> Vec<u32> {
    let all = vmms_under(data);
    let parent = |pid: u32| -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()
    };
    all.iter()
        .copied()
        .filter(|pid| parent(*pid).is_none_or(|p| !all.contains(&p)))
        .collect()
}

/// Kills the VMMs under the data directory and removes it, also when the test fails (the
/// VMMs run in their own process groups and would outlive it).
pub struct Cleanup(pub PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in vmms_under(&self.0) {
            // SAFETY: kill takes a pid and a signal number; nothing is borrowed.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// A daemon on a fresh data directory with the default image registered as `default`.
pub struct World {
    pub data: PathBuf,
    pub sock: PathBuf,
    pub daemon: Option<Daemon>,
    /// Last: kills the VMMs and removes the directory after the daemon is gone.
    pub cleanup: Cleanup,
}

impl World {
    pub fn start(tag: &str) -> Self {
        Self::start_with(tag, &[])
    }

    /// The same with a daemon started with `extra` arguments.
    pub fn start_with(tag: &str, extra: &[&str]) -> Self {
        assert!(
            Path::new("/dev/kvm").exists(),
            "this test needs KVM: /dev/kvm is missing on this host"
        );
        let cache = grove_images::default_cache_dir().unwrap();
        let set = grove_images::locate_default(&cache)
            .or_else(|_| grove_images::build_default(&cache))
            .expect("the default images");
        let tmp = std::env::temp_dir().join(format!("grove-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let cleanup = Cleanup(tmp.clone());
        let data = tmp.join("data");
        let sock = tmp.join("groved.sock");
        let daemon = Daemon::start_with(&data, &sock, extra);
        let (status, body) = json_req(
            &sock,
            "POST",
            "/v1/images",
            json!({"name": "default", "kernel": set.vmlinux, "rootfs": set.rootfs}),
        );
        assert_eq!(status, 201, "{body}");
        Self {
            data,
            sock,
            daemon: Some(daemon),
            cleanup,
        }
    }
}

/// `grove --socket SOCK ARGS...` with `stdin` on its standard input.
pub fn grove(sock: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_grove"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run grove");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write grove's stdin");
    child.wait_with_output().expect("grove's output")
}

/// Runs `argv` in `env` through the API: (exit code, stdout bytes).
pub fn exec(sock: &Path, env: &str, argv: &[&str]) -> (Option<i64>, Vec<u8>) {
    let (status, body) = json_req(
        sock,
        "POST",
        &format!("/v1/environments/{env}/exec"),
        json!({ "argv": argv }),
    );
    assert_eq!(status, 200, "exec {argv:?} in {env}: {body}");
    let stdout = base64::engine::general_purpose::STANDARD
        .decode(body["stdout"].as_str().expect("stdout"))
        .expect("base64 stdout");
    (body["exit_code"].as_i64(), stdout)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The control-socket `status` of the VMM with process id `pid` (found through the
/// `--control PATH` on its command line).
pub fn vmm_status(pid: u64) -> vmm::control::protocol::StatusInfo {
    use vmm::control::client::ControlClient;
    use vmm::control::protocol::{Request, Response};
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the VMM's cmdline");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let control = args
        .iter()
        .position(|a| a == "--control")
        .and_then(|i| args.get(i + 1))
        .expect("the VMM has a control socket");
    let mut client = ControlClient::connect(control).expect("connect to the control socket");
    match client.request(Request::Status).expect("status") {
        Response::Status(info) => info,
        other => panic!("status answered {other:?}"),
    }
}
