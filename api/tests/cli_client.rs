//! The client library and the `grove` binary against a fake daemon: a hyper server on a Unix
//! socket (or TCP) in a temporary directory that answers canned JSON for every route and
//! records the requests it got. No VMs, no real daemon: these tests check the wire (method,
//! path, percent-encoding, body, token), the decoding of answers and error bodies, and what
//! `grove` prints and exits with.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use grove_api::client::{Client, ClientError, Route, MAX_CONSOLE_INPUT};
use grove_api::model::{
    BranchTimings, CreateEnvironment, CreateImage, EnvState, Environment, EnvironmentCreated,
    Event, ExecRequest, Image, PublishedPort, Snapshot,
};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------------
// The fake daemon

/// One request as the fake daemon got it.
#[derive(Debug, Clone, PartialEq)]
struct Recorded {
    method: String,
    /// Path and query, as sent.
    path: String,
    body: String,
    auth: Option<String>,
    content_type: Option<String>,
}

type Log = Arc<Mutex<Vec<Recorded>>>;

/// A temporary directory with the fake daemon's socket; removed on drop.
struct Fake {
    dir: PathBuf,
    socket: PathBuf,
    log: Log,
}

impl Fake {
    async fn start() -> Fake {
        let dir = temp_dir();
        let socket = dir.join("groved.sock");
        let listener = UnixListener::bind(&socket).expect("bind the fake daemon's socket");
        let log = Log::default();
        let accept_log = log.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serve(TokioIo::new(stream), accept_log.clone());
            }
        });
        Fake { dir, socket, log }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.log.lock().expect("log lock").clone()
    }

    fn last(&self) -> Recorded {
        self.requests().pop().expect("a request was recorded")
    }

    fn paths(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }

    fn client(&self) -> Client {
        Client::unix(&self.socket)
    }

    /// Runs `grove --socket <fake> args...`.
    async fn grove(&self, args: &[&str]) -> Output {
        let socket = self.socket.to_str().expect("UTF-8 temp path");
        let mut all = vec!["--socket", socket];
        all.extend_from_slice(args);
        grove(&all, &[]).await
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_tcp() -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind TCP");
    let addr = listener.local_addr().expect("local address");
    let log = Log::default();
    let accept_log = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            serve(TokioIo::new(stream), accept_log.clone());
        }
    });
    (addr, log)
}

fn temp_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("grove-cli-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

fn serve<S>(io: TokioIo<S>, log: Log)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        let service = service_fn(move |req| answer(req, log.clone()));
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    });
}

/// A response body sent chunk by chunk, a few milliseconds apart, like a real stream.
struct Chunks(mpsc::Receiver<Bytes>);

impl Chunks {
    fn new(chunks: Vec<String>) -> Chunks {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            for chunk in chunks {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if tx.send(Bytes::from(chunk)).await.is_err() {
                    return;
                }
            }
        });
        Chunks(rx)
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

type Reply = Response<http_body_util::Either<http_body_util::Full<Bytes>, Chunks>>;

fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(http_body_util::Either::Left(http_body_util::Full::new(
            body.into(),
        )))
        .expect("valid response")
}

fn json(status: u16, value: &impl serde::Serialize) -> Reply {
    reply(
        status,
        "application/json",
        serde_json::to_vec(value).expect("serialize"),
    )
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    json(
        status,
        &serde_json::json!({"error": {"code": code, "message": message}}),
    )
}

fn stream(content_type: &str, chunks: &[&str]) -> Reply {
    Response::builder()
        .header("content-type", content_type)
        .body(http_body_util::Either::Right(Chunks::new(
            chunks.iter().map(|c| c.to_string()).collect(),
        )))
        .expect("valid response")
}

async fn answer(req: Request<Incoming>, log: Log) -> Result<Reply, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (auth, content_type) = (header("authorization"), header("content-type"));
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or(String::new(), |p| p.to_string());
    let body = req
        .into_body()
        .collect()
        .await
        .expect("request body")
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    log.lock().expect("log lock").push(Recorded {
        method: method.clone(),
        path: path.clone(),
        body: body.clone(),
        auth,
        content_type,
    });
    Ok(route(&method, &path, &body))
}

/// The canned answers.
fn route(method: &str, path: &str, body: &str) -> Reply {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let envs = environments();
    let find = |name: &str| envs.iter().find(|e| e.name == name).cloned();
    match (method, path) {
        ("GET", "/healthz") => reply(200, "application/json", "{\"status\":\"ok\"}"),
        ("GET", "/metrics") => reply(200, "text/plain", "grove_environments 6\n"),
        ("GET", "/v1/events") => events_reply(),
        ("GET", "/v1/images") => json(200, &vec![image("default")]),
        ("POST", "/v1/images") => {
            let req: CreateImage = match serde_json::from_str(body) {
                Ok(req) => req,
                Err(e) => return error(400, "bad_request", &e.to_string()),
            };
            let mut image = image(&req.name);
            if let (Some(kernel), Some(rootfs)) = (req.kernel, req.rootfs) {
                (image.kernel, image.rootfs, image.initrd) = (kernel, rootfs, req.initrd);
            }
            json(201, &image)
        }
        ("GET", "/v1/images/default") => json(200, &image("default")),
        ("DELETE", "/v1/images/default") => reply(204, "text/plain", ""),
        ("GET", "/v1/environments") => json(200, &envs),
        ("POST", "/v1/environments") => {
            let req: CreateEnvironment = match serde_json::from_str(body) {
                Ok(req) => req,
                Err(e) => return error(400, "bad_request", &e.to_string()),
            };
            if find(&req.name).is_some() {
                return error(
                    409,
                    "conflict",
                    &format!("environment {:?} exists", req.name),
                );
            }
            let mut env = env(&req.name, req.from.as_deref(), EnvState::Running);
            env.vcpus = req.vcpus.unwrap_or(env.vcpus);
            env.memory_mib = req.memory_mib.unwrap_or(env.memory_mib);
            env.ports = req
                .publish
                .iter()
                .map(|&guest_port| PublishedPort {
                    guest_port,
                    host_addr: format!("127.0.0.1:{}", 40000 + u32::from(guest_port)),
                })
                .collect();
            let branch = req.from.is_some().then(timings);
            json(
                201,
                &EnvironmentCreated {
                    environment: env,
                    branch,
                    ready: None,
                },
            )
        }
        ("GET", "/v1/environments/broken") => reply(502, "text/html", "<h1>Bad Gateway</h1>"),
        ("GET", "/v1/environments/garbled") => reply(200, "application/json", "{\"name\":"),
        ("DELETE", "/v1/environments/main") if query != "force=true" => error(
            409,
            "conflict",
            "feature/x and hotfix depend on main's layers; use force",
        ),
        _ => environment_route(method, path, query, find),
    }
}

fn environment_route(
    method: &str,
    path: &str,
    query: &str,
    find: impl Fn(&str) -> Option<Environment>,
) -> Reply {
    let Some(rest) = path.strip_prefix("/v1/environments/") else {
        return error(404, "not_found", &format!("no route {method} {path}"));
    };
    let actions = ["/pause", "/resume", "/snapshot", "/sync", "/console"];
    let (name, action) = actions
        .iter()
        .find_map(|a| rest.strip_suffix(a).map(|name| (name, *a)))
        .unwrap_or((rest, ""));
    let Some(mut env) = find(name) else {
        return error(404, "not_found", &format!("no environment named {name:?}"));
    };
    match (method, action) {
        ("GET", "") => json(200, &env),
        ("DELETE", "") | ("POST", "/console") => reply(204, "text/plain", ""),
        ("POST", "/pause") => {
            env.state = EnvState::Paused;
            json(200, &env)
        }
        ("POST", "/resume") => json(200, &env),
        ("POST", "/snapshot") => json(
            201,
            &Snapshot {
                id: format!("{name}@3"),
                environment: name.to_string(),
                parent: None,
                created: 1_700_000_000,
                pause_ms: 4.25,
            },
        ),
        ("POST", "/sync") => json(
            200,
            &EnvironmentCreated {
                environment: env,
                branch: Some(timings()),
                ready: None,
            },
        ),
        ("GET", "/console") if query.contains("follow=true") => {
            stream("text/plain", &["boot\r\n", "GROVE-INIT-", "READY\n"])
        }
        ("GET", "/console") if query == "offset=0" => reply(200, "text/plain", "boot\r\nlog "),
        ("GET", "/console") if query == "offset=10" => reply(200, "text/plain", "done\n"),
        ("GET", "/console") => reply(200, "text/plain", ""),
        _ => error(405, "method_not_allowed", "no such action"),
    }
}

fn events_reply() -> Reply {
    let first =
        serde_json::to_string(&event("main", "state", Some(EnvState::Paused))).expect("serialize");
    let second = serde_json::to_string(&event("feature/x", "deleted", None)).expect("serialize");
    let (a, b) = second.split_at(10);
    stream(
        "text/event-stream",
        &[
            ": keep-alive\n\n",
            &format!("data: {first}\n"),
            "\n",
            &format!("data: {a}"),
            &format!("{b}\n\n"),
        ],
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

fn image(name: &str) -> Image {
    Image {
        name: name.to_string(),
        kernel: "/var/lib/grove/images/1/vmlinux".into(),
        rootfs: "/var/lib/grove/images/1/rootfs.ext4".into(),
        initrd: None,
        created: 1_700_000_000,
    }
}

fn env(name: &str, parent: Option<&str>, state: EnvState) -> Environment {
    Environment {
        name: name.to_string(),
        parent: parent.map(str::to_string),
        image: "default".to_string(),
        state,
        vcpus: 2,
        memory_mib: 512,
        // Two minutes ago: `ls` shows "2m ago".
        created: now() - 120,
        snapshot: parent.map(|p| format!("{p}@1")),
        exit_reason: None,
        pid: (state == EnvState::Running).then_some(4242),
        address: None,
        allow_outbound: None,
        ports: Vec::new(),
    }
}

/// Parents before children, as the daemon lists them; `orphan`'s parent is gone.
fn environments() -> Vec<Environment> {
    let mut stopped = env("hotfix", Some("main"), EnvState::Stopped);
    stopped.exit_reason = Some("guest powered off".to_string());
    vec![
        env("main", None, EnvState::Running),
        env("feature/x", Some("main"), EnvState::Running),
        env("feature/x/deep", Some("feature/x"), EnvState::Paused),
        stopped,
        staging(),
        env("orphan", Some("gone"), EnvState::Failed),
    ]
}

/// An environment of a networked daemon with two published ports.
fn staging() -> Environment {
    let mut staging = env("staging", None, EnvState::Running);
    staging.address = Some("10.213.0.2".to_string());
    staging.allow_outbound = Some(false);
    staging.ports = [(8080, 41234), (5432, 41235)]
        .map(|(guest_port, host)| PublishedPort {
            guest_port,
            host_addr: format!("127.0.0.1:{host}"),
        })
        .to_vec();
    staging
}

fn timings() -> BranchTimings {
    BranchTimings {
        parent_pause_ms: 12.5,
        snapshot_mode: grove_api::model::SnapshotMode::Live,
        snapshot_ms: 20.0,
        restore_ms: 60.25,
        total_ms: 85.0,
    }
}

fn event(name: &str, action: &str, state: Option<EnvState>) -> Event {
    Event {
        kind: "environment".to_string(),
        name: name.to_string(),
        action: action.to_string(),
        state,
        time: 1_700_000_000,
    }
}

// ---------------------------------------------------------------------------------------------
// Running `grove`

async fn grove(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_grove"));
    cmd.args(args)
        .env_remove("GROVE_SOCKET")
        .env_remove("GROVE_TOKEN")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("grove finished in time")
        .expect("run grove")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "grove failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// Exit `code` with exactly one line on stderr, `grove: error: ...` containing `needle`.
#[track_caller]
fn assert_error(out: &Output, code: i32, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("grove: error: "), "{err:?}");
    assert!(err.contains(needle), "{err:?} should contain {needle:?}");
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(out));
}

// ---------------------------------------------------------------------------------------------
// The client

#[tokio::test]
async fn client_sends_every_route_and_parses_the_answers() {
    let fake = Fake::start().await;
    let c = fake.client();

    assert_eq!(c.list_images().await.ok(), Some(vec![image("default")]));
    assert_eq!(c.get_image("default").await.ok(), Some(image("default")));
    let build = CreateImage {
        name: "default".into(),
        kernel: None,
        rootfs: None,
        initrd: None,
        build: Some("default".into()),
    };
    assert_eq!(c.create_image(&build).await.ok(), Some(image("default")));
    let sent = fake.last();
    assert_eq!(sent.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        serde_json::from_str::<CreateImage>(&sent.body).ok(),
        Some(build)
    );
    assert!(c.delete_image("default").await.is_ok());

    let envs = c.list_environments().await.expect("list");
    assert_eq!(envs.len(), 6);
    assert_eq!(envs[1].parent.as_deref(), Some("main"));
    let got = c.get_environment("feature/x").await.expect("get");
    assert_eq!((got.name.as_str(), got.pid), ("feature/x", Some(4242)));

    let branch = CreateEnvironment {
        name: "feature/y".into(),
        image: None,
        from: Some("main".into()),
        vcpus: None,
        memory_mib: None,
        agent: None,
        publish: Vec::new(),
        allow_outbound: None,
        snapshot_mode: None,
    };
    let created = c.create_environment(&branch).await.expect("branch");
    assert_eq!(created.branch, Some(timings()));
    assert_eq!(created.environment.parent.as_deref(), Some("main"));
    assert_eq!(
        serde_json::from_str::<CreateEnvironment>(&fake.last().body).ok(),
        Some(branch)
    );

    let paused = c.pause("feature/x").await.expect("pause");
    assert_eq!(paused.state, EnvState::Paused);
    assert_eq!(
        c.resume("feature/x").await.map(|e| e.state).ok(),
        Some(EnvState::Running)
    );
    let snap = c.snapshot("main").await.expect("snapshot");
    assert_eq!((snap.id.as_str(), snap.pause_ms), ("main@3", 4.25));
    assert_eq!(
        c.sync("feature/x").await.ok().and_then(|s| s.branch),
        Some(timings())
    );
    assert!(c.delete_environment("feature/x", false).await.is_ok());
    assert!(c.delete_environment("main", true).await.is_ok());
    assert_eq!(
        c.console("main", 0).await.ok(),
        Some(Bytes::from("boot\r\nlog "))
    );
    assert_eq!(
        c.health().await.ok().as_deref(),
        Some("{\"status\":\"ok\"}")
    );
    assert_eq!(
        c.metrics().await.ok().as_deref(),
        Some("grove_environments 6\n")
    );

    assert_eq!(
        fake.paths(),
        [
            "GET /v1/images",
            "GET /v1/images/default",
            "POST /v1/images",
            "DELETE /v1/images/default",
            "GET /v1/environments",
            "GET /v1/environments/feature/x",
            "POST /v1/environments",
            "POST /v1/environments/feature/x/pause",
            "POST /v1/environments/feature/x/resume",
            "POST /v1/environments/main/snapshot",
            "POST /v1/environments/feature/x/sync",
            "DELETE /v1/environments/feature/x",
            "DELETE /v1/environments/main?force=true",
            "GET /v1/environments/main/console?offset=0",
            "GET /healthz",
            "GET /metrics",
        ]
    );
    // No token over a Unix socket, and no body on the routes that take none.
    let requests = fake.requests();
    assert!(requests.iter().all(|r| r.auth.is_none()));
    assert!(requests
        .iter()
        .filter(|r| r.method != "POST" || r.path.contains("/pause"))
        .all(|r| r.body.is_empty() && r.content_type.is_none()));
}

/// Every operation in `api/openapi.yaml` has a [`Route`], and every `Route` is in the spec.
#[test]
fn routes_match_the_openapi_spec() {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("read openapi.yaml");
    let mut in_spec = Vec::new();
    let mut path = "";
    for line in spec.lines() {
        if let Some(p) = line.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
            path = p;
        } else if let Some(method) = line.strip_prefix("    ").and_then(|m| m.strip_suffix(':')) {
            if ["get", "post", "put", "patch", "delete"].contains(&method) {
                in_spec.push(format!("{} /{path}", method.to_uppercase()));
            }
        }
    }
    let image = image("i");
    let create_image = CreateImage {
        name: "i".into(),
        kernel: Some(image.kernel),
        rootfs: Some(image.rootfs),
        initrd: None,
        build: None,
    };
    let create_env = CreateEnvironment {
        name: "e".into(),
        image: Some("i".into()),
        from: None,
        vcpus: None,
        memory_mib: None,
        agent: None,
        publish: Vec::new(),
        allow_outbound: None,
        snapshot_mode: None,
    };
    let exec = ExecRequest {
        argv: vec!["true".into()],
        env: Default::default(),
        cwd: None,
        stdin: None,
        timeout_ms: None,
    };
    let n = "{name}";
    let routes = [
        Route::Health,
        Route::Metrics,
        Route::Events,
        Route::ListImages,
        Route::CreateImage(&create_image),
        Route::GetImage(n),
        Route::DeleteImage(n),
        Route::ListEnvironments,
        Route::CreateEnvironment(&create_env),
        Route::GetEnvironment(n),
        Route::DeleteEnvironment {
            name: n,
            force: false,
        },
        Route::Pause(n),
        Route::Resume(n),
        Route::Snapshot(n),
        Route::Sync(n),
        Route::Console {
            name: n,
            offset: 0,
            follow: false,
        },
        Route::ConsoleInput {
            name: n,
            input: b"",
        },
        Route::Exec {
            name: n,
            req: &exec,
        },
        Route::GetFile {
            name: n,
            path: "/x",
        },
        Route::PutFile {
            name: n,
            path: "/x",
            data: b"",
            mode: Some(0o644),
        },
    ];
    let mut in_client: Vec<String> = routes
        .iter()
        .map(|r| {
            let path = r.path().replace("%7Bname%7D", "{name}");
            let path = path.split('?').next().unwrap_or_default().to_string();
            format!("{} {path}", r.method())
        })
        .collect();
    in_spec.sort();
    in_client.sort();
    assert_eq!(in_client, in_spec);
}

#[tokio::test]
async fn client_percent_encodes_names_but_not_slashes() {
    let fake = Fake::start().await;
    let c = fake.client();
    let _ = c.get_environment("we ird#1?%/ü").await;
    let _ = c.pause("feature/x").await;
    let _ = c.delete_image("a+b").await;
    // The daemon would take `a/pause` for the pause of `a`: its last `/` is encoded.
    let _ = c.get_environment("a/pause").await;
    assert_eq!(
        fake.paths(),
        [
            "GET /v1/environments/we%20ird%231%3F%25/%C3%BC",
            "POST /v1/environments/feature/x/pause",
            "DELETE /v1/images/a%2Bb",
            "GET /v1/environments/a%2Fpause",
        ]
    );
}

#[tokio::test]
async fn client_reports_api_errors_with_code_and_status() {
    let fake = Fake::start().await;
    let c = fake.client();

    let err = c.get_environment("nope").await.expect_err("404");
    assert!(err.is_api());
    assert_eq!((err.status(), err.code()), (Some(404), Some("not_found")));
    assert_eq!(
        err.to_string(),
        "no environment named \"nope\" (404 not_found)"
    );

    let err = c.delete_environment("main", false).await.expect_err("409");
    assert_eq!((err.status(), err.code()), (Some(409), Some("conflict")));

    // Not the API's error body: still an answer from the daemon's side, with the text kept.
    let err = c.get_environment("broken").await.expect_err("502");
    assert!(
        matches!(err, ClientError::Status { status: 502, .. }),
        "{err:?}"
    );
    assert!(err.is_api());
    assert!(err.to_string().contains("<h1>Bad Gateway</h1>"), "{err}");

    // A 2xx answer that is not the route's type.
    let err = c.get_environment("garbled").await.expect_err("decode");
    assert!(matches!(err, ClientError::Decode { .. }), "{err:?}");
    assert!(!err.is_api());
    assert_eq!(
        err.to_string(),
        "unexpected answer from groved to GET /v1/environments/garbled"
    );
}

#[tokio::test]
async fn client_streams_console_and_events() {
    let fake = Fake::start().await;
    let c = fake.client();

    let mut console = c.console_follow("main", 0).await.expect("follow");
    let mut text = Vec::new();
    while let Some(chunk) = console.next().await {
        text.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(text, b"boot\r\nGROVE-INIT-READY\n");
    assert_eq!(
        fake.last().path,
        "/v1/environments/main/console?offset=0&follow=true"
    );

    let mut events = c.events().await.expect("events");
    let mut got = Vec::new();
    while let Some(event) = events.next().await {
        got.push(event.expect("event"));
    }
    assert_eq!(
        got,
        [
            event("main", "state", Some(EnvState::Paused)),
            event("feature/x", "deleted", None)
        ]
    );

    // A stream route that fails answers with the error, not a stream.
    let err = c.console_follow("nope", 0).await.expect_err("404");
    assert_eq!(err.code(), Some("not_found"));
}

#[tokio::test]
async fn client_says_when_groved_is_not_running() {
    let dir = temp_dir();
    // A socket file nobody listens on any more: connection refused.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let missing = dir.join("missing.sock");
    for path in [&stale, &missing] {
        let err = Client::unix(path)
            .list_environments()
            .await
            .expect_err("no daemon");
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
        assert!(!err.is_api());
        let text = err.to_string();
        assert!(text.contains(path.to_str().expect("UTF-8")), "{text}");
        assert!(text.contains("is groved running?"), "{text}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn client_over_tcp_sends_the_bearer_token() {
    let (addr, log) = start_tcp().await;
    let c = Client::tcp(&format!("http://{addr}/"), Some("s3cret")).expect("valid URL");
    assert_eq!(c.endpoint(), format!("http://{addr}"));
    assert!(c.list_environments().await.is_ok());
    let sent = log.lock().expect("log").clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].auth.as_deref(), Some("Bearer s3cret"));

    // The CLI takes the token from the environment.
    let url = format!("http://{addr}");
    let out = grove(&["--url", &url, "health"], &[("GROVE_TOKEN", "t0k")]).await;
    assert_ok(&out);
    assert_eq!(stdout(&out), "ok\n");
    let last = log.lock().expect("log").last().cloned().expect("a request");
    assert_eq!(last.auth.as_deref(), Some("Bearer t0k"));
}

// ---------------------------------------------------------------------------------------------
// The `grove` binary

#[tokio::test]
async fn grove_ls_prints_the_tree() {
    let fake = Fake::start().await;
    let out = fake.grove(&["ls"]).await;
    assert_ok(&out);
    assert_eq!(
        stdout(&out),
        "\
NAME                  STATE    IMAGE    VCPUS  MEM      CREATED  PORTS
main                  running  default  2      512 MiB  2m ago   -
├─ feature/x          running  default  2      512 MiB  2m ago   -
│  └─ feature/x/deep  paused   default  2      512 MiB  2m ago   -
└─ hotfix             stopped  default  2      512 MiB  2m ago   -
staging               running  default  2      512 MiB  2m ago   8080→127.0.0.1:41234 5432→127.0.0.1:41235
orphan                failed   default  2      512 MiB  2m ago   -
"
    );
    assert!(out.stderr.is_empty());
}

#[tokio::test]
async fn grove_json_prints_the_apis_json() {
    let fake = Fake::start().await;
    let out = fake.grove(&["--json", "ls"]).await;
    assert_ok(&out);
    // The daemon serializes the model structs: their pretty form is the API's JSON, key
    // order included.
    let expected = serde_json::to_string_pretty(&environments()).expect("serialize");
    assert_eq!(stdout(&out), format!("{expected}\n"));

    // `--json` also works after the command.
    let out = fake.grove(&["show", "feature/x", "--json"]).await;
    assert_ok(&out);
    let expected = serde_json::to_string_pretty(&environments()[1]).expect("serialize");
    assert_eq!(stdout(&out), format!("{expected}\n"));

    let out = fake
        .grove(&["--json", "branch", "feature/y", "--from", "main"])
        .await;
    assert_ok(&out);
    let created: EnvironmentCreated = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(created.branch, Some(timings()));

    let out = fake.grove(&["--json", "health"]).await;
    assert_ok(&out);
    assert_eq!(stdout(&out), "{\n  \"status\": \"ok\"\n}\n");

    let out = fake.grove(&["--json", "rm", "hotfix"]).await;
    assert_ok(&out);
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn grove_prints_readable_answers() {
    let fake = Fake::start().await;
    let cases: &[(&[&str], &str)] = &[
        (
            &["images"],
            "NAME     CREATED              KERNEL                           ROOTFS                               INITRD\n\
             default  2023-11-14 22:13:20  /var/lib/grove/images/1/vmlinux  /var/lib/grove/images/1/rootfs.ext4  -\n",
        ),
        (
            &["create", "web", "--image", "default", "--vcpus", "4", "--memory", "1024"],
            "created web: running, 4 vCPUs, 1024 MiB, image default, pid 4242\n",
        ),
        (
            &["create", "web", "--image", "default", "--publish", "80"],
            "created web: running, 2 vCPUs, 512 MiB, image default, pid 4242\n  \
             port 80 on 127.0.0.1:40080\n",
        ),
        (
            &["branch", "feature/y", "--from", "main"],
            "branched feature/y from main: running, 2 vCPUs, 512 MiB, image default, pid 4242\n  \
             main paused for 12.5 ms\n  \
             feature/y running after 85.0 ms (snapshot 20.0 ms, restore 60.2 ms)\n",
        ),
        (&["pause", "main"], "main: paused\n"),
        (&["resume", "main"], "main: running\n"),
        (&["snapshot", "main"], "snapshot main@3 of main (main paused 4.2 ms)\n"),
        (
            &["sync", "feature/x"],
            "synced feature/x from main: running, 2 vCPUs, 512 MiB, image default, pid 4242\n  \
             main paused for 12.5 ms\n  \
             feature/x running after 85.0 ms (snapshot 20.0 ms, restore 60.2 ms)\n",
        ),
        (&["rm", "main", "--force"], "removed main\n"),
        (&["image", "rm", "default"], "removed image default\n"),
        (&["health"], "ok\n"),
        (&["metrics"], "grove_environments 6\n"),
        (&["console", "main"], "boot\r\nlog done\n"),
        (&["console", "main", "--follow"], "boot\r\nGROVE-INIT-READY\n"),
    ];
    for (args, expected) in cases {
        let out = fake.grove(args).await;
        assert_ok(&out);
        assert_eq!(&stdout(&out), expected, "grove {args:?}");
    }

    let out = fake.grove(&["show", "hotfix"]).await;
    assert_ok(&out);
    let text = stdout(&out);
    for line in [
        "name:        hotfix\n",
        "state:       stopped\n",
        "parent:      main\n",
        "memory:      512 MiB\n",
        "snapshot:    main@1\n",
        "exit reason: guest powered off\n",
    ] {
        assert!(text.contains(line), "{text}");
    }
    assert!(!text.contains("pid:"), "{text}");
    assert!(!text.contains("address:"), "{text}");

    let out = fake.grove(&["show", "staging"]).await;
    assert_ok(&out);
    let text = stdout(&out);
    for line in [
        "address:     10.213.0.2\n",
        "outbound:    denied\n",
        "port:        8080 on 127.0.0.1:41234\n",
        "port:        5432 on 127.0.0.1:41235\n",
    ] {
        assert!(text.contains(line), "{text}");
    }
}

#[tokio::test]
async fn grove_sends_what_the_command_says() {
    let fake = Fake::start().await;
    assert_ok(&fake.grove(&["create", "web", "--image", "default"]).await);
    let sent: serde_json::Value = serde_json::from_str(&fake.last().body).expect("JSON");
    assert_eq!(sent["name"], "web");
    assert_eq!(sent["image"], "default");
    assert_eq!(sent["from"], serde_json::Value::Null);
    assert_eq!(sent["publish"], serde_json::json!([]));
    assert_eq!(sent["allow_outbound"], serde_json::Value::Null);
    let args = [
        "create",
        "web2",
        "--image",
        "default",
        "--publish",
        "80",
        "--no-outbound",
    ];
    assert_ok(&fake.grove(&args).await);
    let sent: CreateEnvironment = serde_json::from_str(&fake.last().body).expect("JSON");
    assert_eq!((sent.publish, sent.allow_outbound), (vec![80], Some(false)));
    let args = [
        "branch",
        "b",
        "--from",
        "main",
        "--publish",
        "80",
        "--publish",
        "443",
        "--allow-outbound",
    ];
    assert_ok(&fake.grove(&args).await);
    let sent: CreateEnvironment = serde_json::from_str(&fake.last().body).expect("JSON");
    assert_eq!(
        (sent.publish, sent.allow_outbound),
        (vec![80, 443], Some(true))
    );
    assert_ok(&fake.grove(&["branch", "c", "--from", "main"]).await);
    let sent: CreateEnvironment = serde_json::from_str(&fake.last().body).expect("JSON");
    assert_eq!(
        sent.allow_outbound, None,
        "the daemon's default for branches"
    );

    // Relative paths become absolute: the daemon does not share our working directory.
    assert_ok(
        &fake
            .grove(&[
                "image", "add", "mine", "--kernel", "vmlinux", "--rootfs", "/r.ext4",
            ])
            .await,
    );
    let sent: CreateImage = serde_json::from_str(&fake.last().body).expect("JSON");
    let cwd = std::env::current_dir().expect("cwd");
    assert_eq!(sent.kernel, Some(cwd.join("vmlinux")));
    assert_eq!(sent.rootfs.as_deref(), Some(Path::new("/r.ext4")));
    assert_eq!(sent.build, None);

    // Console without --follow reads until the daemon has nothing more.
    assert_ok(&fake.grove(&["console", "main"]).await);
    let paths = fake.paths();
    assert_eq!(
        paths[paths.len() - 3..],
        [
            "GET /v1/environments/main/console?offset=0",
            "GET /v1/environments/main/console?offset=10",
            "GET /v1/environments/main/console?offset=15",
        ]
    );

    assert_ok(&fake.grove(&["rm", "feature/x"]).await);
    assert_eq!(
        fake.paths().last().map(String::as_str),
        Some("DELETE /v1/environments/feature/x")
    );
}

#[tokio::test]
async fn console_input_goes_in_pieces_the_daemon_accepts() {
    let fake = Fake::start().await;
    let input = vec![b'x'; MAX_CONSOLE_INPUT + 10];
    fake.client()
        .console_input("feature/x", &input)
        .await
        .expect("typed");
    let sent = fake.requests();
    assert_eq!(sent.len(), 2);
    for r in &sent {
        assert_eq!(r.path, "/v1/environments/feature/x/console");
        assert_eq!(r.content_type.as_deref(), Some("application/octet-stream"));
    }
    assert_eq!(
        (sent[0].body.len(), sent[1].body.len()),
        (MAX_CONSOLE_INPUT, 10)
    );

    // `grove type NAME TEXT...`: the words, a space apart, and a newline.
    assert_ok(&fake.grove(&["type", "main", "echo", "hi"]).await);
    assert_eq!(fake.last().body, "echo hi\n");
    assert_ok(&fake.grove(&["type", "-n", "main", "q"]).await);
    assert_eq!(fake.last().body, "q");

    // Without TEXT: standard input, as it is.
    let socket = fake.socket.to_str().expect("UTF-8");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_grove"))
        .args(["--socket", socket, "type", "main"])
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run grove");
    let mut stdin = child.stdin.take().expect("piped stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"ls /\r\n")
        .await
        .expect("write stdin");
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("in time")
        .expect("grove ran");
    assert!(status.success());
    assert_eq!(fake.last().body, "ls /\r\n");
}

#[tokio::test]
async fn grove_image_build_shows_progress_on_stderr() {
    let fake = Fake::start().await;
    let out = fake.grove(&["image", "build", "default"]).await;
    assert_ok(&out);
    assert_eq!(
        stdout(&out),
        "built image default\n  kernel  /var/lib/grove/images/1/vmlinux\n  rootfs  /var/lib/grove/images/1/rootfs.ext4\n"
    );
    // stderr is a pipe here: the plain form, no terminal escapes.
    let err = stderr(&out);
    assert!(err.starts_with("building image default"), "{err:?}");
    assert!(err.ends_with("s\n") && !err.contains('\x1b'), "{err:?}");
    let sent: CreateImage = serde_json::from_str(&fake.last().body).expect("JSON");
    assert_eq!(sent.build.as_deref(), Some("default"));

    let out = fake.grove(&["--json", "image", "build", "default"]).await;
    assert_ok(&out);
    let image: Image = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(image.name, "default");
}

#[tokio::test]
async fn grove_events_one_line_each() {
    let fake = Fake::start().await;
    let out = fake.grove(&["events"]).await;
    assert_ok(&out);
    assert_eq!(
        stdout(&out),
        "2023-11-14 22:13:20 environment main state paused\n\
         2023-11-14 22:13:20 environment feature/x deleted\n"
    );
    let out = fake.grove(&["events", "--json"]).await;
    assert_ok(&out);
    let lines: Vec<Event> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event a line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1], event("feature/x", "deleted", None));
}

#[tokio::test]
async fn grove_errors_are_one_line_with_exit_codes() {
    let fake = Fake::start().await;
    // The daemon's errors: exit 1, its message.
    let out = fake.grove(&["show", "nope"]).await;
    assert_error(
        &out,
        1,
        "grove: error: no environment named \"nope\" (404 not_found)",
    );
    let out = fake.grove(&["rm", "main"]).await;
    assert_error(&out, 1, "depend on main's layers; use force (409 conflict)");
    let out = fake
        .grove(&["--json", "create", "main", "--image", "default"])
        .await;
    assert_error(&out, 1, "environment \"main\" exists (409 conflict)");
    let out = fake.grove(&["show", "broken"]).await;
    assert_error(&out, 1, "HTTP 502");

    // Not understood: exit 2.
    let out = fake.grove(&["show", "garbled"]).await;
    assert_error(
        &out,
        2,
        "unexpected answer from groved to GET /v1/environments/garbled",
    );

    // Not reachable: exit 2, with the socket and what to check.
    let dir = temp_dir();
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let stale = stale.to_str().expect("UTF-8");
    let out = grove(&["--socket", stale, "ls"], &[]).await;
    assert_error(
        &out,
        2,
        &format!("cannot connect to groved at {stale} (is groved running?)"),
    );
    assert!(
        stderr(&out).contains("onnection refused"),
        "{}",
        stderr(&out)
    );
    let out = grove(&["ls"], &[("GROVE_SOCKET", stale)]).await;
    assert_error(&out, 2, stale);
    let _ = std::fs::remove_dir_all(dir);

    let out = grove(&["--url", "https://example.com", "ls"], &[]).await;
    assert_error(&out, 2, "https is not supported");
}

#[tokio::test]
async fn grove_usage_errors_exit_2_and_help_documents_exit_codes() {
    for args in [
        &["frobnicate"][..],
        &["create", "x"],
        &["--token", "t", "ls"],
        &["--socket", "/s", "--url", "http://h:1", "ls"],
    ] {
        let out = grove(args, &[]).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "grove {args:?}: {}",
            stderr(&out)
        );
    }
    let out = grove(&["--help"], &[]).await;
    assert_ok(&out);
    let help = stdout(&out);
    assert!(help.contains("Exit codes:"), "{help}");
    assert!(help.contains("1  groved answered with an error"), "{help}");
    assert!(help.contains("GROVE_SOCKET"), "{help}");
}

#[tokio::test]
async fn grove_uses_grove_socket() {
    let fake = Fake::start().await;
    let socket = fake.socket.to_str().expect("UTF-8");
    let out = grove(&["health"], &[("GROVE_SOCKET", socket)]).await;
    assert_ok(&out);
    assert_eq!(fake.paths(), ["GET /healthz"]);
}
