//! A client for groved's HTTP API, used by the `grove` CLI and by tests.
//!
//! # Design
//!
//! - **One route table.** [`Route`] names every route of the API with its arguments and knows
//!   its method, path and body; nothing else in this module builds a URL, and a test
//!   (`tests/cli_client.rs`) checks it against `api/openapi.yaml`. The typed
//!   methods of [`Client`] ([`Client::list_environments`], [`Client::create_environment`], ...)
//!   are one line each: send a route, decode the answer into a [`crate::model`] type.
//!   [`Client::request`] sends a route and returns the raw body, for callers that pass the
//!   API's JSON through untouched (`grove --json`).
//! - **One connection per request.** Each request opens a fresh connection (a Unix socket by
//!   default, or TCP), does an HTTP/1.1 handshake with hyper's low-level client, and the
//!   connection ends with the response. Requests to a local daemon cost microseconds to
//!   connect, and there is no pool to go stale while a daemon restarts. The connection's I/O is
//!   driven by a spawned tokio task, so the client must be used inside a tokio runtime.
//! - **No timeouts on requests**, only on TCP connects: building an image takes minutes and
//!   following a console never ends; callers that want a deadline wrap the future in
//!   `tokio::time::timeout`.
//! - **Streams are pulled.** [`Client::console_follow`] returns a [`ByteStream`] and
//!   [`Client::events`] an [`EventStream`]; each `next()` reads the response body as far as
//!   the next chunk or event. Reading is back-pressure: a slow reader slows the daemon's
//!   writes instead of filling a queue, and dropping the stream closes the connection.
//! - **Errors say who failed.** [`ClientError::Api`] is the daemon's own answer (4xx/5xx with
//!   its stable `code`); everything else is about reaching it or understanding it, and a
//!   failed connect names the endpoint and says what to check ("is groved running?").
//!   [`ClientError::is_api`] tells the two apart (the CLI's exit codes 1 and 2).
//!
//! Names may contain `/` (`feature/x`): in paths every byte of a name but the unreserved
//! characters and `/` is percent-encoded ([`encode_name`]), so `feature/x` becomes
//! `/v1/environments/feature/x`. The daemon picks the route by the longest literal suffix, so
//! an environment whose last part is an action (`a/pause`) is sent as `a%2Fpause` on the
//! routes that end with the name.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::error::ErrorBody;
pub use crate::model::MAX_FILE;
use crate::model::{
    CreateEnvironment, CreateImage, Environment, EnvironmentCreated, Event, ExecRequest,
    ExecResult, Image, Snapshot,
};

/// How long a TCP connect may take before the client gives up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest SSE line an [`EventStream`] buffers (an event is a few hundred bytes).
const MAX_EVENT_LINE: usize = 1 << 20;

/// The most bytes one console-input request carries (the daemon's limit);
/// [`Client::console_input`] sends longer input in several requests.
pub const MAX_CONSOLE_INPUT: usize = 4096;

/// At most this much of a non-JSON error body is kept in [`ClientError::Status`].
const MAX_ERROR_TEXT: usize = 500;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon could not be reached.
    #[error("cannot connect to groved at {endpoint} ({hint})")]
    Connect {
        endpoint: String,
        /// What to check, depending on the cause.
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("connecting to groved at {endpoint} timed out after {secs} s (is groved running and reachable?)")]
    ConnectTimeout { endpoint: String, secs: u64 },
    /// The HTTP exchange failed (the daemon closed the connection, a malformed response, ...).
    #[error("{method} {path} to groved at {endpoint} failed")]
    Transport {
        endpoint: String,
        method: Method,
        path: String,
        #[source]
        source: hyper::Error,
    },
    /// The daemon refused or failed the request, with its error body.
    #[error("{message} ({status} {code})")]
    Api {
        /// HTTP status, 4xx or 5xx.
        status: u16,
        /// The API's stable code, e.g. `not_found`.
        code: String,
        message: String,
    },
    /// A 4xx/5xx answer without the API's error body (something else answered?).
    #[error("{method} {path}: groved at {endpoint} answered HTTP {status}: {body}")]
    Status {
        endpoint: String,
        method: Method,
        path: String,
        status: u16,
        /// The start of the body, as text.
        body: String,
    },
    /// A success answer whose body is not what the route returns (a daemon of another version?).
    #[error("unexpected answer from groved to {method} {path}")]
    Decode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// An event stream line that is too long or not an event.
    #[error("unexpected event stream from groved: {0}")]
    EventStream(String),
    #[error("invalid URL {url:?}: {why}")]
    InvalidUrl { url: String, why: &'static str },
    #[error("the token cannot be sent in an HTTP header (it contains control characters)")]
    InvalidToken,
    /// A request body could not be encoded (does not happen with the model types).
    #[error("cannot encode the request body")]
    Encode(#[source] serde_json::Error),
    /// A request could not be built (does not happen with paths from [`Route`]).
    #[error("cannot build the request for {path}")]
    Request {
        path: String,
        #[source]
        source: hyper::http::Error,
    },
}

impl ClientError {
    /// Whether the daemon answered with an error (4xx/5xx), as opposed to not being reached or
    /// understood.
    pub fn is_api(&self) -> bool {
        matches!(self, ClientError::Api { .. } | ClientError::Status { .. })
    }

    /// The HTTP status of an answer from the daemon.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } | ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API's stable error code (`not_found`, `conflict`, ...), when it sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// The actions on an environment, the last part of their paths.
const ACTIONS: [&str; 7] = [
    "pause", "resume", "snapshot", "sync", "console", "exec", "files",
];

/// Every route of the API, with its arguments.
#[derive(Debug, Clone, Copy)]
pub enum Route<'a> {
    ListImages,
    CreateImage(&'a CreateImage),
    GetImage(&'a str),
    DeleteImage(&'a str),
    ListEnvironments,
    CreateEnvironment(&'a CreateEnvironment),
    GetEnvironment(&'a str),
    DeleteEnvironment {
        name: &'a str,
        force: bool,
    },
    Pause(&'a str),
    Resume(&'a str),
    Snapshot(&'a str),
    Sync(&'a str),
    Console {
        name: &'a str,
        offset: u64,
        follow: bool,
    },
    /// Bytes typed on the console, at most [`MAX_CONSOLE_INPUT`].
    ConsoleInput {
        name: &'a str,
        input: &'a [u8],
    },
    /// A command run in the guest through its agent.
    Exec {
        name: &'a str,
        req: &'a ExecRequest,
    },
    /// A guest file (absolute `path`).
    GetFile {
        name: &'a str,
        path: &'a str,
    },
    /// Writes a guest file, at most [`MAX_FILE`] bytes.
    PutFile {
        name: &'a str,
        path: &'a str,
        data: &'a [u8],
        mode: Option<u32>,
    },
    Events,
    Health,
    Metrics,
}

impl Route<'_> {
    pub fn method(&self) -> Method {
        match self {
            Route::ListImages
            | Route::GetImage(_)
            | Route::ListEnvironments
            | Route::GetEnvironment(_)
            | Route::Console { .. }
            | Route::GetFile { .. }
            | Route::Events
            | Route::Health
            | Route::Metrics => Method::GET,
            Route::CreateImage(_)
            | Route::CreateEnvironment(_)
            | Route::Pause(_)
            | Route::Resume(_)
            | Route::Snapshot(_)
            | Route::Sync(_)
            | Route::ConsoleInput { .. }
            | Route::Exec { .. } => Method::POST,
            Route::PutFile { .. } => Method::PUT,
            Route::DeleteImage(_) | Route::DeleteEnvironment { .. } => Method::DELETE,
        }
    }

    /// The path and query, names percent-encoded.
    pub fn path(&self) -> String {
        let env =
            |name: &str, action: &str| format!("/v1/environments/{}{action}", encode_name(name));
        // The daemon routes `/v1/environments/a/pause` to the pause of `a`: an environment
        // named `a/pause` is reached with its last `/` encoded.
        let bare = |name: &str, query: &str| match name.rsplit_once('/') {
            Some((head, last)) if ACTIONS.contains(&last) => format!(
                "/v1/environments/{}%2F{}{query}",
                encode_name(head),
                encode_name(last)
            ),
            _ => env(name, query),
        };
        match self {
            Route::ListImages | Route::CreateImage(_) => "/v1/images".to_string(),
            Route::GetImage(name) | Route::DeleteImage(name) => {
                format!("/v1/images/{}", encode_name(name))
            }
            Route::ListEnvironments | Route::CreateEnvironment(_) => "/v1/environments".to_string(),
            Route::GetEnvironment(name) => bare(name, ""),
            Route::DeleteEnvironment { name, force } => {
                bare(name, if *force { "?force=true" } else { "" })
            }
            Route::Pause(name) => env(name, "/pause"),
            Route::Resume(name) => env(name, "/resume"),
            Route::Snapshot(name) => env(name, "/snapshot"),
            Route::Sync(name) => env(name, "/sync"),
            Route::Console {
                name,
                offset,
                follow,
            } => {
                let follow = if *follow { "&follow=true" } else { "" };
                env(name, &format!("/console?offset={offset}{follow}"))
            }
            Route::ConsoleInput { name, .. } => env(name, "/console"),
            Route::Exec { name, .. } => env(name, "/exec"),
            Route::GetFile { name, path } => {
                env(name, &format!("/files?path={}", encode_query(path)))
            }
            Route::PutFile {
                name, path, mode, ..
            } => {
                let mode = mode.map_or(String::new(), |m| format!("&mode={m:o}"));
                env(name, &format!("/files?path={}{mode}", encode_query(path)))
            }
            Route::Events => "/v1/events".to_string(),
            Route::Health => "/healthz".to_string(),
            Route::Metrics => "/metrics".to_string(),
        }
    }

    /// The body and its content type, for the routes that take one.
    pub fn body(&self) -> Result<Option<(Vec<u8>, &'static str)>> {
        let json = match self {
            Route::CreateImage(req) => serde_json::to_vec(req),
            Route::CreateEnvironment(req) => serde_json::to_vec(req),
            Route::Exec { req, .. } => serde_json::to_vec(req),
            Route::ConsoleInput { input, .. } => {
                return Ok(Some((input.to_vec(), "application/octet-stream")))
            }
            Route::PutFile { data, .. } => {
                return Ok(Some((data.to_vec(), "application/octet-stream")))
            }
            _ => return Ok(None),
        };
        json.map(|body| Some((body, "application/json")))
            .map_err(ClientError::Encode)
    }
}

/// Percent-encodes a query value: every byte but the unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`) and `/`.
pub fn encode_query(value: &str) -> String {
    encode_name(value)
}

/// Percent-encodes a name for a path: every byte but the unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`) and `/`.
pub fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Endpoint {
    Unix(PathBuf),
    /// `host:port` (the URL's authority, also the `Host` header).
    Tcp(String),
}

/// A client for one daemon. Cheap to clone; holds no connection.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    /// `Bearer <token>`, for TCP.
    auth: Option<HeaderValue>,
}

impl Client {
    /// A client for the daemon listening on the Unix socket `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Client {
            endpoint: Endpoint::Unix(path.into()),
            auth: None,
        }
    }

    /// A client for the daemon at `url` (`http://host[:port][/]`), sending `token` as
    /// `Authorization: Bearer <token>` with every request.
    pub fn tcp(url: &str, token: Option<&str>) -> Result<Self> {
        let authority = parse_http_url(url)?;
        let auth = token
            .map(|t| {
                let mut value = HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| ClientError::InvalidToken)?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        Ok(Client {
            endpoint: Endpoint::Tcp(authority),
            auth,
        })
    }

    /// Where the daemon is: the socket path, or `http://host:port`.
    pub fn endpoint(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(path) => path.display().to_string(),
            Endpoint::Tcp(authority) => format!("http://{authority}"),
        }
    }

    /// The socket path, for a Unix-socket client.
    pub fn socket_path(&self) -> Option<&Path> {
        match &self.endpoint {
            Endpoint::Unix(path) => Some(path),
            Endpoint::Tcp(_) => None,
        }
    }

    pub async fn list_images(&self) -> Result<Vec<Image>> {
        self.json(Route::ListImages).await
    }

    /// Registers files, or builds the default set with `build: Some("default")` (which can take
    /// minutes).
    pub async fn create_image(&self, req: &CreateImage) -> Result<Image> {
        self.json(Route::CreateImage(req)).await
    }

    pub async fn get_image(&self, name: &str) -> Result<Image> {
        self.json(Route::GetImage(name)).await
    }

    pub async fn delete_image(&self, name: &str) -> Result<()> {
        self.request(Route::DeleteImage(name)).await.map(drop)
    }

    /// Every environment, parents before children.
    pub async fn list_environments(&self) -> Result<Vec<Environment>> {
        self.json(Route::ListEnvironments).await
    }

    /// Boots (`image`) or branches (`from`) an environment.
    pub async fn create_environment(&self, req: &CreateEnvironment) -> Result<EnvironmentCreated> {
        self.json(Route::CreateEnvironment(req)).await
    }

    pub async fn get_environment(&self, name: &str) -> Result<Environment> {
        self.json(Route::GetEnvironment(name)).await
    }

    /// Stops and removes an environment; `force` even while children depend on it.
    pub async fn delete_environment(&self, name: &str, force: bool) -> Result<()> {
        self.request(Route::DeleteEnvironment { name, force })
            .await
            .map(drop)
    }

    pub async fn pause(&self, name: &str) -> Result<Environment> {
        self.json(Route::Pause(name)).await
    }

    pub async fn resume(&self, name: &str) -> Result<Environment> {
        self.json(Route::Resume(name)).await
    }

    pub async fn snapshot(&self, name: &str) -> Result<Snapshot> {
        self.json(Route::Snapshot(name)).await
    }

    /// Re-clones the environment from its parent's current state.
    pub async fn sync(&self, name: &str) -> Result<EnvironmentCreated> {
        self.json(Route::Sync(name)).await
    }

    /// The console log from byte `offset` on, as much as the daemon sends in one answer.
    pub async fn console(&self, name: &str, offset: u64) -> Result<Bytes> {
        self.request(Route::Console {
            name,
            offset,
            follow: false,
        })
        .await
    }

    /// The console log from byte `offset` on, then what the guest writes, until the stream is
    /// dropped or the daemon ends it.
    pub async fn console_follow(&self, name: &str, offset: u64) -> Result<ByteStream> {
        self.stream(Route::Console {
            name,
            offset,
            follow: true,
        })
        .await
    }

    /// Types `input` on the console (the guest's serial input), in requests of at most
    /// [`MAX_CONSOLE_INPUT`] bytes.
    pub async fn console_input(&self, name: &str, input: &[u8]) -> Result<()> {
        for input in input.chunks(MAX_CONSOLE_INPUT) {
            self.request(Route::ConsoleInput { name, input }).await?;
        }
        Ok(())
    }

    /// Runs a command in the guest (its output comes back whole, base64).
    pub async fn exec(&self, name: &str, req: &ExecRequest) -> Result<ExecResult> {
        self.json(Route::Exec { name, req }).await
    }

    /// Reads a guest file.
    pub async fn read_file(&self, name: &str, path: &str) -> Result<Bytes> {
        self.request(Route::GetFile { name, path }).await
    }

    /// Writes a guest file (at most [`MAX_FILE`] bytes), created with `mode` or 0644.
    pub async fn write_file(
        &self,
        name: &str,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<()> {
        self.request(Route::PutFile {
            name,
            path,
            data,
            mode,
        })
        .await
        .map(drop)
    }

    /// State changes from now on.
    pub async fn events(&self) -> Result<EventStream> {
        Ok(EventStream::new(self.stream(Route::Events).await?))
    }

    /// `GET /healthz`: the body, as text.
    pub async fn health(&self) -> Result<String> {
        let body = self.request(Route::Health).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// `GET /metrics`: Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        let body = self.request(Route::Metrics).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Sends `route` and returns the body of a 2xx answer as it came (the API's JSON, or text
    /// for console, health and metrics); 4xx/5xx become errors.
    pub async fn request(&self, route: Route<'_>) -> Result<Bytes> {
        let method = route.method();
        let path = route.path();
        let response = self.send(route).await?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|source| self.transport(&method, &path, source))?
            .to_bytes();
        if status.is_success() {
            Ok(body)
        } else {
            Err(self.answer_error(method, path, status.as_u16(), &body))
        }
    }

    /// Sends `route` and returns its body as a stream of chunks once the daemon answered 2xx.
    pub async fn stream(&self, route: Route<'_>) -> Result<ByteStream> {
        let method = route.method();
        let path = route.path();
        let response = self.send(route).await?;
        let status = response.status();
        if !status.is_success() {
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|source| self.transport(&method, &path, source))?
                .to_bytes();
            return Err(self.answer_error(method, path, status.as_u16(), &body));
        }
        Ok(ByteStream {
            body: response.into_body(),
            endpoint: self.endpoint(),
            method,
            path,
        })
    }

    async fn json<T: DeserializeOwned>(&self, route: Route<'_>) -> Result<T> {
        let body = self.request(route).await?;
        serde_json::from_slice(&body).map_err(|source| ClientError::Decode {
            method: route.method(),
            path: route.path(),
            source,
        })
    }

    /// Opens a connection and sends one request on it.
    async fn send(&self, route: Route<'_>) -> Result<Response<Incoming>> {
        let method = route.method();
        let path = route.path();
        let body = route.body()?;
        let host = match &self.endpoint {
            Endpoint::Unix(_) => "localhost",
            Endpoint::Tcp(authority) => authority.as_str(),
        };
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path.as_str())
            .header(HOST, host);
        if let Some(auth) = &self.auth {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        let body = match body {
            Some((body, content_type)) => {
                builder = builder.header(CONTENT_TYPE, content_type);
                body
            }
            None => Vec::new(),
        };
        if matches!(route, Route::Events) {
            builder = builder.header(ACCEPT, "text/event-stream");
        }
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|source| ClientError::Request {
                path: path.clone(),
                source,
            })?;
        let mut sender = self.connect().await?;
        sender
            .send_request(request)
            .await
            .map_err(|source| self.transport(&method, &path, source))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let connect_error = |source: io::Error| ClientError::Connect {
            endpoint: self.endpoint(),
            hint: match source.kind() {
                io::ErrorKind::PermissionDenied => {
                    "permission denied: run grove as the user that runs groved"
                }
                _ => "is groved running?",
            },
            source,
        };
        let handshake_error = |source| ClientError::Transport {
            endpoint: self.endpoint(),
            method: Method::CONNECT,
            path: "(handshake)".to_string(),
            source,
        };
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = UnixStream::connect(path).await.map_err(connect_error)?;
                handshake(stream).await.map_err(handshake_error)
            }
            Endpoint::Tcp(authority) => {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
                    .await
                    .map_err(|_| ClientError::ConnectTimeout {
                        endpoint: self.endpoint(),
                        secs: CONNECT_TIMEOUT.as_secs(),
                    })?
                    .map_err(connect_error)?;
                // Requests are small and answered at once: do not wait to fill packets.
                stream.set_nodelay(true).map_err(connect_error)?;
                handshake(stream).await.map_err(handshake_error)
            }
        }
    }

    fn transport(&self, method: &Method, path: &str, source: hyper::Error) -> ClientError {
        ClientError::Transport {
            endpoint: self.endpoint(),
            method: method.clone(),
            path: path.to_string(),
            source,
        }
    }

    /// The error for a 4xx/5xx answer: the API's error body, or the start of whatever came.
    fn answer_error(&self, method: Method, path: String, status: u16, body: &[u8]) -> ClientError {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(ErrorBody { error }) => ClientError::Api {
                status,
                code: error.code,
                message: error.message,
            },
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let mut text: String = text.trim().chars().take(MAX_ERROR_TEXT).collect();
                if text.is_empty() {
                    text = "(empty body)".to_string();
                }
                ClientError::Status {
                    endpoint: self.endpoint(),
                    method,
                    path,
                    status,
                    body: text,
                }
            }
        }
    }
}

/// HTTP/1.1 handshake on a fresh stream; the connection is driven by a spawned task that ends
/// with the response (the `SendRequest` is used once and dropped).
async fn handshake<S>(stream: S) -> std::result::Result<SendRequest<Full<Bytes>>, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // An I/O error here also fails the response or its body, where the caller sees it.
        let _ = connection.await;
    });
    Ok(sender)
}

/// `http://host[:port][/]` → `host:port`.
fn parse_http_url(url: &str) -> Result<String> {
    let bad = |why| ClientError::InvalidUrl {
        url: url.to_string(),
        why,
    };
    let rest = if let Some(rest) = url.strip_prefix("http://") {
        rest
    } else if url.starts_with("https://") {
        return Err(bad(
            "https is not supported: groved serves plain HTTP (use an SSH tunnel or a TLS proxy)",
        ));
    } else {
        return Err(bad("it must start with http://"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err(bad("it has no host"));
    }
    if authority.contains(['/', '?', '#', '@']) || authority.chars().any(char::is_whitespace) {
        return Err(bad(
            "only http://host:port is accepted, without a path, query or user",
        ));
    }
    // A port is present when the part after the last ':' is outside an IPv6 literal's brackets.
    let has_port = authority
        .rfind(':')
        .is_some_and(|colon| !authority[colon..].contains(']'));
    if has_port {
        let port = authority.rsplit(':').next().unwrap_or_default();
        if port.parse::<u16>().is_err() {
            return Err(bad("the port is not a number from 0 to 65535"));
        }
        Ok(authority.to_string())
    } else {
        Ok(format!("{authority}:80"))
    }
}

/// A response body read chunk by chunk (`grove console --follow`).
#[derive(Debug)]
pub struct ByteStream {
    body: Incoming,
    endpoint: String,
    method: Method,
    path: String,
}

impl ByteStream {
    /// The next non-empty chunk; `None` when the daemon ended the stream.
    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        loop {
            match self.body.frame().await? {
                Ok(frame) => {
                    // Trailers carry no data: skip them like empty chunks.
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            return Some(Ok(data));
                        }
                    }
                }
                Err(source) => {
                    return Some(Err(ClientError::Transport {
                        endpoint: self.endpoint.clone(),
                        method: self.method.clone(),
                        path: self.path.clone(),
                        source,
                    }))
                }
            }
        }
    }
}

/// Server-sent events (`GET /v1/events`): `data:` lines, an event ending at a blank line.
/// `event:`, `id:`, `retry:` fields and `:` comments (keep-alives) are skipped.
#[derive(Debug)]
pub struct EventStream {
    bytes: ByteStream,
    parser: SseParser,
    ended: bool,
}

impl EventStream {
    fn new(bytes: ByteStream) -> Self {
        EventStream {
            bytes,
            parser: SseParser::default(),
            ended: false,
        }
    }

    /// The next event's data as the daemon sent it (the event's JSON); `None` at the end.
    pub async fn next_data(&mut self) -> Option<Result<String>> {
        loop {
            match self.parser.next_event() {
                Ok(Some(data)) => return Some(Ok(data)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if self.ended {
                return self.parser.finish().map(Ok);
            }
            match self.bytes.next().await {
                Some(Ok(chunk)) => self.parser.push(&chunk),
                Some(Err(e)) => return Some(Err(e)),
                None => self.ended = true,
            }
        }
    }

    /// The next event, decoded; `None` at the end.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        let data = match self.next_data().await? {
            Ok(data) => data,
            Err(e) => return Some(Err(e)),
        };
        Some(
            serde_json::from_str(&data).map_err(|source| ClientError::Decode {
                method: Method::GET,
                path: Route::Events.path(),
                source,
            }),
        )
    }
}

/// The SSE framing, apart from the I/O so it can be tested on split chunks.
#[derive(Debug, Default)]
struct SseParser {
    /// Bytes not yet ending in a newline.
    buf: BytesMut,
    /// `data:` lines of the event being read.
    data: Option<String>,
}

impl SseParser {
    fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event from the buffered lines.
    fn next_event(&mut self) -> Result<Option<String>> {
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line = self.buf.split_to(end + 1);
            let line = line.strip_suffix(b"\n").unwrap_or(&line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = std::str::from_utf8(line)
                .map_err(|_| ClientError::EventStream("a line is not UTF-8".to_string()))?;
            if line.is_empty() {
                if let Some(data) = self.data.take() {
                    return Ok(Some(data));
                }
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            if field == "data" {
                match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_string()),
                }
            }
        }
        if self.buf.len() > MAX_EVENT_LINE {
            return Err(ClientError::EventStream(format!(
                "a line is longer than {MAX_EVENT_LINE} bytes"
            )));
        }
        Ok(None)
    }

    /// An event cut short by the end of the stream (no blank line after its data).
    fn finish(&mut self) -> Option<String> {
        if !self.buf.is_empty() {
            // A last line without its newline still counts.
            self.buf.extend_from_slice(b"\n");
            if let Ok(Some(data)) = self.next_event() {
                return Some(data);
            }
        }
        self.data.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_percent_encoded_except_slashes() {
        assert_eq!(encode_name("feature/x"), "feature/x");
        assert_eq!(encode_name("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(encode_name("a b#?%"), "a%20b%23%3F%25");
        assert_eq!(encode_name("é"), "%C3%A9");
    }

    #[test]
    fn routes_have_their_paths() {
        assert_eq!(
            Route::Pause("feature/x").path(),
            "/v1/environments/feature/x/pause"
        );
        assert_eq!(
            Route::DeleteEnvironment {
                name: "a b",
                force: true
            }
            .path(),
            "/v1/environments/a%20b?force=true"
        );
        assert_eq!(
            Route::Console {
                name: "main",
                offset: 7,
                follow: true
            }
            .path(),
            "/v1/environments/main/console?offset=7&follow=true"
        );
        assert_eq!(Route::DeleteImage("x").method(), Method::DELETE);
        // A name ending like an action is not taken for the action.
        assert_eq!(
            Route::GetEnvironment("a/pause").path(),
            "/v1/environments/a%2Fpause"
        );
        assert_eq!(
            Route::DeleteEnvironment {
                name: "a/b/sync",
                force: true
            }
            .path(),
            "/v1/environments/a/b%2Fsync?force=true"
        );
        assert_eq!(Route::Sync("a/sync").path(), "/v1/environments/a/sync/sync");
        assert_eq!(Route::GetImage("a/pause").path(), "/v1/images/a/pause");
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:8080/").ok(),
            Some("127.0.0.1:8080".into())
        );
        assert_eq!(parse_http_url("http://host").ok(), Some("host:80".into()));
        assert_eq!(
            parse_http_url("http://[::1]:9").ok(),
            Some("[::1]:9".into())
        );
        assert_eq!(parse_http_url("http://[::1]").ok(), Some("[::1]:80".into()));
        for bad in [
            "https://h:1",
            "h:1",
            "http://",
            "http://h:x",
            "http://h:1/v1",
            "http://u@h",
        ] {
            assert!(parse_http_url(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            Client::tcp("http://h:1", Some("a\nb")),
            Err(ClientError::InvalidToken)
        ));
    }

    #[test]
    fn sse_events_across_split_chunks() {
        let mut p = SseParser::default();
        p.push(b": keep-alive\n\nda");
        assert_eq!(p.next_event().ok(), Some(None));
        p.push(b"ta: {\"a\":1}\r");
        assert_eq!(p.next_event().ok(), Some(None));
        p.push(b"\n\r\nevent: x\ndata:one\ndata: two\n\ndata: last");
        assert_eq!(p.next_event().ok(), Some(Some("{\"a\":1}".to_string())));
        assert_eq!(p.next_event().ok(), Some(Some("one\ntwo".to_string())));
        assert_eq!(p.next_event().ok(), Some(None));
        assert_eq!(p.finish(), Some("last".to_string()));
        assert_eq!(p.finish(), None);
    }

    #[test]
    fn sse_line_limit() {
        let mut p = SseParser::default();
        p.push(&vec![b'x'; MAX_EVENT_LINE + 1]);
        assert!(p.next_event().is_err());
    }
}
