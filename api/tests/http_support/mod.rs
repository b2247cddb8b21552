//! Shared by the `http_*` tests: an in-memory [`Service`], a server on a real Unix socket and
//! a real TCP port in a temporary directory, and clients (hyper's, and raw bytes).

#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use grove_api::error::ApiError;
use grove_api::http::{self, BearerToken, Listeners, ServeOptions};
use grove_api::model::{
    BranchTimings, CreateEnvironment, CreateImage, EnvState, Environment, EnvironmentCreated,
    Event, Image, Snapshot, SnapshotMode,
};
use grove_api::service::{Result, Service};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

pub const TOKEN: &str = "test-token-0123456789abcdef";

/// A directory under the system's temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("grove-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An in-memory [`Service`] with one image `base` and one running environment `main`.
/// Special names make it fail: creating an image or environment named `explode` is a 500.
pub struct FakeService {
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    /// How often `console` was called.
    pub console_calls: AtomicU64,
}

#[derive(Default)]
struct State {
    images: BTreeMap<String, Image>,
    environments: BTreeMap<String, Environment>,
    consoles: BTreeMap<String, Vec<u8>>,
    snapshots: u64,
}

fn env(name: &str, parent: Option<&str>, image: &str) -> Environment {
    Environment {
        name: name.into(),
        parent: parent.map(Into::into),
        image: image.into(),
        state: EnvState::Running,
        vcpus: 1,
        memory_mib: 128,
        created: 1_700_000_000,
        snapshot: parent.map(|p| format!("{p}@1")),
        exit_reason: None,
        pid: Some(4242),
        address: None,
        allow_outbound: None,
        ports: Vec::new(),
    }
}

impl FakeService {
    pub fn new() -> Arc<Self> {
        let mut state = State::default();
        state.images.insert(
            "base".into(),
            Image {
                name: "base".into(),
                kernel: "/images/vmlinux".into(),
                rootfs: "/images/rootfs.ext4".into(),
                initrd: None,
                created: 1_700_000_000,
            },
        );
        state
            .environments
            .insert("main".into(), env("main", None, "base"));
        state.consoles.insert("main".into(), b"boot ok\n".to_vec());
        let (events, _) = broadcast::channel(64);
        Arc::new(Self {
            state: Mutex::new(state),
            events,
            console_calls: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn append_console(&self, name: &str, bytes: &[u8]) {
        self.lock()
            .consoles
            .entry(name.into())
            .or_default()
            .extend_from_slice(bytes);
    }

    pub fn emit(&self, kind: &str, name: &str, action: &str, state: Option<EnvState>) {
        let _ = self.events.send(Event {
            kind: kind.into(),
            name: name.into(),
            action: action.into(),
            state,
            time: 1_700_000_001,
        });
    }

    pub fn subscribers(&self) -> usize {
        self.events.receiver_count()
    }

    fn set_state(&self, name: &str, from: EnvState, to: EnvState) -> Result<Environment> {
        let env = {
            let mut state = self.lock();
            let env = state
                .environments
                .get_mut(name)
                .ok_or_else(|| ApiError::not_found(format!("no environment {name:?}")))?;
            if env.state != from {
                return Err(ApiError::conflict(format!(
                    "{name:?} is {:?}, not {from:?}",
                    env.state
                )));
            }
            env.state = to;
            env.clone()
        };
        self.emit("environment", name, "state", Some(to));
        Ok(env)
    }
}

impl Service for FakeService {
    async fn list_images(&self) -> Result<Vec<Image>> {
        Ok(self.lock().images.values().cloned().collect())
    }

    async fn create_image(&self, req: CreateImage) -> Result<Image> {
        if req.name == "explode" {
            return Err(ApiError::internal("the fake exploded"));
        }
        let (kernel, rootfs) = match (req.kernel, req.rootfs, req.build.as_deref()) {
            (Some(k), Some(r), None) => (k, r),
            (None, None, Some("default")) => ("/cache/vmlinux".into(), "/cache/rootfs".into()),
            _ => {
                return Err(ApiError::bad_request(
                    "give kernel and rootfs, or build: \"default\"",
                ))
            }
        };
        let mut state = self.lock();
        if state.images.contains_key(&req.name) {
            return Err(ApiError::conflict(format!("image {:?} exists", req.name)));
        }
        let image = Image {
            name: req.name.clone(),
            kernel,
            rootfs,
            initrd: req.initrd,
            created: 1_700_000_002,
        };
        state.images.insert(req.name, image.clone());
        Ok(image)
    }

    async fn get_image(&self, name: &str) -> Result<Image> {
        self.lock()
            .images
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no image {name:?}")))
    }

    async fn delete_image(&self, name: &str) -> Result<()> {
        let mut state = self.lock();
        if state.environments.values().any(|e| e.image == name) {
            return Err(ApiError::conflict(format!(
                "environments use image {name:?}"
            )));
        }
        state
            .images
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| ApiError::not_found(format!("no image {name:?}")))
    }

    async fn list_environments(&self) -> Result<Vec<Environment>> {
        Ok(self.lock().environments.values().cloned().collect())
    }

    async fn create_environment(&self, req: CreateEnvironment) -> Result<EnvironmentCreated> {
        if req.name == "explode" {
            return Err(ApiError::internal("the fake exploded"));
        }
        let created = {
            let mut state = self.lock();
            if state.environments.contains_key(&req.name) {
                return Err(ApiError::conflict(format!(
                    "environment {:?} exists",
                    req.name
                )));
            }
            let created = match (&req.image, &req.from) {
                (Some(image), None) => {
                    if !state.images.contains_key(image) {
                        return Err(ApiError::not_found(format!("no image {image:?}")));
                    }
                    EnvironmentCreated {
                        environment: env(&req.name, None, image),
                        branch: None,
                        ready: None,
                    }
                }
                (None, Some(from)) => {
                    let parent = state
                        .environments
                        .get(from)
                        .ok_or_else(|| ApiError::not_found(format!("no environment {from:?}")))?;
                    EnvironmentCreated {
                        environment: env(&req.name, Some(from), &parent.image.clone()),
                        branch: Some(BranchTimings {
                            parent_pause_ms: 12.5,
                            snapshot_mode: req.snapshot_mode.unwrap_or(SnapshotMode::Live),
                            snapshot_ms: 20.0,
                            restore_ms: 30.0,
                            total_ms: 55.0,
                        }),
                        ready: None,
                    }
                }
                _ => return Err(ApiError::bad_request("give exactly one of image and from")),
            };
            state
                .environments
                .insert(req.name.clone(), created.environment.clone());
            state.consoles.insert(req.name.clone(), Vec::new());
            created
        };
        self.emit("environment", &req.name, "created", Some(EnvState::Running));
        Ok(created)
    }

    async fn get_environment(&self, name: &str) -> Result<Environment> {
        self.lock()
            .environments
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no environment {name:?}")))
    }

    async fn delete_environment(&self, name: &str, force: bool) -> Result<()> {
        {
            let mut state = self.lock();
            if !state.environments.contains_key(name) {
                return Err(ApiError::not_found(format!("no environment {name:?}")));
            }
            let has_children = state
                .environments
                .values()
                .any(|e| e.parent.as_deref() == Some(name));
            if has_children && !force {
                return Err(ApiError::conflict(format!(
                    "environments branched from {name:?} depend on it"
                )));
            }
            state.environments.remove(name);
            state.consoles.remove(name);
        }
        self.emit("environment", name, "deleted", None);
        Ok(())
    }

    async fn pause(&self, name: &str) -> Result<Environment> {
        self.set_state(name, EnvState::Running, EnvState::Paused)
    }

    async fn resume(&self, name: &str) -> Result<Environment> {
        self.set_state(name, EnvState::Paused, EnvState::Running)
    }

    async fn snapshot(&self, name: &str, mode: Option<SnapshotMode>) -> Result<Snapshot> {
        let mut state = self.lock();
        let env = state
            .environments
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no environment {name:?}")))?;
        state.snapshots += 1;
        Ok(Snapshot {
            id: format!("{name}@{}", state.snapshots),
            environment: name.into(),
            parent: env.snapshot,
            created: 1_700_000_003,
            // Distinct per mode, so tests see which one the query chose.
            pause_ms: match mode.unwrap_or(SnapshotMode::Live) {
                SnapshotMode::Live => 0.25,
                SnapshotMode::Paused => 7.25,
            },
        })
    }

    async fn sync(&self, name: &str, mode: Option<SnapshotMode>) -> Result<EnvironmentCreated> {
        let env = self.get_environment(name).await?;
        if env.parent.is_none() {
            return Err(ApiError::conflict(format!(
                "{name:?} has no parent to sync from"
            )));
        }
        Ok(EnvironmentCreated {
            environment: env,
            branch: Some(BranchTimings {
                parent_pause_ms: 1.0,
                snapshot_mode: mode.unwrap_or(SnapshotMode::Live),
                snapshot_ms: 2.0,
                restore_ms: 3.0,
                total_ms: 6.0,
            }),
            ready: None,
        })
    }

    async fn console(&self, name: &str, offset: u64, limit: usize) -> Result<Vec<u8>> {
        self.console_calls.fetch_add(1, Ordering::Relaxed);
        let state = self.lock();
        let log = state
            .consoles
            .get(name)
            .ok_or_else(|| ApiError::not_found(format!("no environment {name:?}")))?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(log.len());
        let end = start.saturating_add(limit).min(log.len());
        Ok(log[start..end].to_vec())
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn metrics(&self) -> String {
        let n = self.lock().environments.len();
        format!("# TYPE grove_vms gauge\ngrove_vms {n}\n")
    }
}

/// A server on a Unix socket and a TCP port, serving a [`FakeService`].
pub struct Server {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub tcp: SocketAddr,
    pub fake: Arc<FakeService>,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<io::Result<()>>>,
}

/// Options with short intervals, so tests do not wait.
pub fn quick_options() -> ServeOptions {
    ServeOptions {
        header_read_timeout: Duration::from_secs(2),
        body_read_timeout: Duration::from_secs(2),
        keep_alive_interval: Duration::from_millis(200),
        console_poll_interval: Duration::from_millis(20),
        max_connections: 256,
        shutdown_grace: Duration::from_secs(2),
    }
}

impl Server {
    pub async fn start() -> Self {
        Self::start_with(quick_options()).await
    }

    pub async fn start_with(options: ServeOptions) -> Self {
        let dir = TempDir::new("http");
        let socket = dir.path().join("api.sock");
        let unix = http::bind_unix(&socket).expect("bind the API socket");
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a TCP port");
        let addr = tcp.local_addr().expect("TCP address");
        let token = BearerToken::new(TOKEN).expect("a valid token");
        let listeners = Listeners::unix(unix).with_tcp(tcp, token);
        let fake = FakeService::new();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(http::serve_with(
            Arc::clone(&fake),
            listeners,
            options,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            dir,
            socket,
            tcp: addr,
            fake,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the server and returns what `serve` returned.
    pub async fn stop(&mut self) -> io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("serve did not panic"),
            None => Ok(()),
        }
    }

    pub fn unix(&self) -> Target {
        Target::Unix(self.socket.clone())
    }

    pub fn tcp(&self) -> Target {
        Target::Tcp(self.tcp)
    }
}

#[derive(Debug, Clone)]
pub enum Target {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The error code of an error answer, after checking it is exactly an `ErrorBody`.
    pub fn error_code(&self) -> String {
        let body: grove_api::error::ErrorBody =
            serde_json::from_slice(&self.body).unwrap_or_else(|e| {
                panic!(
                    "status {}: not an error body ({e}): {:?}",
                    self.status,
                    String::from_utf8_lossy(&self.body)
                )
            });
        assert!(!body.error.message.is_empty());
        body.error.code
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends one request on a new connection and returns the response with its body unread.
pub async fn send(
    target: &Target,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response<Incoming> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "grove");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let body = Full::new(Bytes::copy_from_slice(body.unwrap_or_default()));
    let req = builder.body(body).expect("a valid test request");
    let mut sender = match target {
        Target::Unix(path) => {
            let stream = UnixStream::connect(path)
                .await
                .expect("connect to the socket");
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            sender
        }
        Target::Tcp(addr) => {
            let stream = TcpStream::connect(addr).await.expect("connect to TCP");
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            sender
        }
    };
    sender.send_request(req).await.expect("send the request")
}

/// Sends one request and reads the whole answer.
pub async fn request(
    target: &Target,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let response = send(target, method, path, headers, body).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("read the body")
        .to_bytes()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

/// `request` with a JSON body.
pub async fn post_json(target: &Target, path: &str, json: &str) -> Reply {
    request(
        target,
        "POST",
        path,
        &[("content-type", "application/json")],
        Some(json.as_bytes()),
    )
    .await
}

/// Reads body frames until `want` appears in what was read, or `timeout` passes; returns
/// everything read.
pub async fn read_until(body: &mut Incoming, want: &str, timeout: Duration) -> String {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !String::from_utf8_lossy(&seen).contains(want) {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    seen.extend_from_slice(&data);
                }
            }
            Ok(_) => break,
            Err(_) => panic!(
                "{want:?} not read within {timeout:?}; read {:?}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Writes raw bytes on a new Unix connection (then closes the writing half if `half_close`,
/// which tells the server nothing more comes) while reading the answer until its head is
/// complete or the server closes. `Ok(None)` when the server closed without a status line;
/// `Err` when neither happened within `timeout`.
pub async fn raw(
    socket: &Path,
    bytes: &[u8],
    half_close: bool,
    timeout: Duration,
) -> std::result::Result<Option<u16>, String> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut reader, mut writer) = stream.split();
    let write = async {
        // The server may answer and close before reading everything (413, 431): a failed
        // write is not the test's concern, the answer is.
        if writer.write_all(bytes).await.is_ok() && half_close {
            let _ = writer.shutdown().await;
        }
    };
    let read = async {
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        answer
    };
    let ((), answer) = tokio::time::timeout(timeout, async { tokio::join!(write, read) })
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?;
    Ok(status_of(&answer))
}

/// The status code of an HTTP/1.1 answer's first line.
pub fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code.parse().ok(),
        _ => None,
    }
}
