//! The HTTP API: HTTP/1.1 on a Unix socket (and optionally TCP) in front of a [`Service`].
//!
//! # Layers
//!
//! A request goes through four small steps, each in its own file, and the HTTP layer knows
//! nothing of VMs:
//!
//! 1. **Listen** ([`serve`], this file): accept on the Unix socket (see [`bind_unix`]) and, if
//!    configured, a TCP socket; one task per connection running hyper's HTTP/1 server with a
//!    header read timeout, bounded header and buffer sizes, and a cap on open connections.
//! 2. **Route** (`routes.rs`): the path is matched against the templates of [`ROUTES`], the one
//!    routing table (a test checks it equals `api/openapi.yaml`), then the method against the
//!    rows of that template: unknown path → 404, known path with another method → 405 with
//!    `Allow`. Names may contain `/` (`feature/x`), so templates match on their literal prefix
//!    and suffix (`/pause`, `/console`, ...) with the longest suffix winning; the name between
//!    them is percent-decoded and checked with [`crate::names::validate`] (400) before the
//!    service sees it. Query parameters are parsed per route; unknown or repeated ones are 400.
//! 3. **Handle** (`handlers.rs`): authorize (TCP only), route, parse the body, call the one
//!    matching [`Service`] method, and serialize its answer. Bodies are JSON of exactly the
//!    model type (serde's message on failure, 400), `Content-Type: application/json` (415),
//!    at most [`MAX_BODY`] bytes counted while reading (413), within a timeout (408). Routes
//!    without a body refuse a non-empty one.
//! 4. **Answer** (`body.rs`): every error, ours or the service's, becomes
//!    `{"error": {"code", "message"}}` with the [`ApiError`]'s status in one function; 5xx
//!    only come from the service. The two open-ended answers (`streams.rs`) are tasks feeding
//!    a channel-backed body: server-sent events from [`Service::subscribe`] and a followed
//!    console polling [`Service::console`]; they end when the client disconnects, the source
//!    ends, or the server shuts down.
//!
//! # Access
//!
//! The Unix socket needs no credentials: [`bind_unix`] creates it with mode 0600 so only the
//! daemon's user can connect. Every request over TCP must carry
//! `Authorization: Bearer <token>` ([`BearerToken`], compared in constant time), else 401,
//! before any routing (an unauthenticated client learns nothing about routes).
//!
//! # What hyper answers itself
//!
//! Requests whose head cannot be parsed, or is larger than [`MAX_HEAD`], are answered by hyper
//! (400, 414 or 431, without a JSON body) and the connection closed; a client that sends no
//! complete head within [`ServeOptions::header_read_timeout`] is disconnected. These never
//! reach the router and are not counted in `grove_api_requests_total`.
//!
//! # Shutdown
//!
//! When the `shutdown` future resolves, [`serve`] stops accepting, asks every connection to
//! finish its current request and close, ends every stream, waits up to
//! [`ServeOptions::shutdown_grace`] and then drops what is left.

mod auth;
mod bind;
mod body;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod handlers;
mod metrics;
mod routes;
mod streams;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

pub use auth::{BearerToken, InvalidToken, MIN_TOKEN_LEN};
pub use bind::bind_unix;
pub use body::MAX_BODY;
pub use routes::{MAX_CONSOLE_CHUNK, ROUTES};

#[cfg(doc)]
use crate::error::ApiError;
use crate::service::Service;
use handlers::{Shared, Transport};

/// The largest request head (request line and headers) accepted; hyper answers 431 past it.
pub const MAX_HEAD: usize = 16 * 1024;

/// Where [`serve`] listens: a Unix socket, a TCP socket with its token, or both.
#[derive(Debug)]
pub struct Listeners {
    unix: Option<UnixListener>,
    tcp: Option<(TcpListener, BearerToken)>,
}

impl Listeners {
    /// The Unix socket only (the default set-up).
    pub fn unix(listener: UnixListener) -> Self {
        Self {
            unix: Some(listener),
            tcp: None,
        }
    }

    /// TCP only; every request must carry `token`.
    pub fn tcp(listener: TcpListener, token: BearerToken) -> Self {
        Self {
            unix: None,
            tcp: Some((listener, token)),
        }
    }

    /// Adds (or replaces) the TCP listener.
    pub fn with_tcp(mut self, listener: TcpListener, token: BearerToken) -> Self {
        self.tcp = Some((listener, token));
        self
    }
}

/// Timeouts and limits of [`serve_with`]. [`Default`] is what the daemon uses; tests shorten
/// the intervals.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A connection must send a complete request head within this time of the server waiting
    /// for one, else it is closed.
    pub header_read_timeout: Duration,
    /// A request body must arrive within this time (408).
    pub body_read_timeout: Duration,
    /// Period of the keep-alive comment on `GET /v1/events`.
    pub keep_alive_interval: Duration,
    /// How often a followed console asks the service for new bytes.
    pub console_poll_interval: Duration,
    /// Open connections at most; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            keep_alive_interval: Duration::from_secs(15),
            console_poll_interval: Duration::from_millis(200),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl ServeOptions {
    fn validate(&self) -> io::Result<()> {
        let zero = [
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
            ("keep_alive_interval", self.keep_alive_interval),
            ("console_poll_interval", self.console_poll_interval),
        ]
        .into_iter()
        .find(|(_, d)| d.is_zero());
        if let Some((what, _)) = zero {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ServeOptions::{what} must not be zero"),
            ));
        }
        if self.max_connections == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ServeOptions::max_connections must not be zero",
            ));
        }
        Ok(())
    }
}

/// Serves the API for `service` on `listeners` with [`ServeOptions::default`] until
/// `shutdown` resolves. See [`serve_with`].
pub async fn serve<S: Service>(
    service: Arc<S>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(service, listeners, ServeOptions::default(), shutdown).await
}

/// Serves the API for `service` on `listeners` until `shutdown` resolves, then shuts down
/// gracefully (see the module docs) and returns `Ok`.
///
/// Fails only on invalid `options` (`InvalidInput`); errors accepting a connection are logged
/// and retried after a short pause, so running out of file descriptors does not end the
/// daemon. The listeners are closed on return; removing a Unix socket's file is the caller's.
pub async fn serve_with<S: Service>(
    service: Arc<S>,
    listeners: Listeners,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    options.validate()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let Listeners { unix, tcp } = listeners;
    let (tcp, token) = match tcp {
        Some((listener, token)) => (Some(listener), Some(token)),
        None => (None, None),
    };
    let shared = Arc::new(Shared {
        service,
        token,
        options: options.clone(),
        metrics: Default::default(),
        stop: stop_rx,
    });
    let builder = http1_builder(&options);
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);

    'accept: loop {
        // Wait for a free slot before accepting, so excess clients queue in the backlog.
        let slot = tokio::select! {
            () = &mut shutdown => break 'accept,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break 'accept, // never closed
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => break 'accept,
            accepted = accept_unix(unix.as_ref()) => accepted,
            accepted = accept_tcp(tcp.as_ref()) => accepted,
        };
        match accepted {
            Ok(Accepted::Unix(stream)) => {
                let conn = connection(&builder, &shared, stream, Transport::Unix);
                connections.spawn(async move {
                    conn.await;
                    drop(slot);
                });
            }
            Ok(Accepted::Tcp(stream)) => {
                // Small JSON answers: do not wait for Nagle.
                let _ = stream.set_nodelay(true);
                let conn = connection(&builder, &shared, stream, Transport::Tcp);
                connections.spawn(async move {
                    conn.await;
                    drop(slot);
                });
            }
            Err(e) => {
                log::warn!("accepting an API connection: {e}");
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) {
                    // Out of descriptors or memory: give the others time to finish.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        while connections.try_join_next().is_some() {}
    }

    drop(unix);
    drop(tcp);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(options.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        log::warn!(
            "{} API connections still open after {:?}; closing them",
            connections.len(),
            options.shutdown_grace
        );
        connections.shutdown().await;
    }
    Ok(())
}

fn http1_builder(options: &ServeOptions) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_header_size(MAX_HEAD)
        // hyper's read buffer: a head, or a slice of a body, never more.
        .max_buf_size(MAX_HEAD + MAX_BODY)
        .keep_alive(true);
    builder
}

/// Drives one connection until it closes, or until the server stops (then gracefully).
fn connection<S: Service, I>(
    builder: &http1::Builder,
    shared: &Arc<Shared<S>>,
    io: I,
    transport: Transport,
) -> impl Future<Output = ()> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let for_requests = Arc::clone(shared);
    let service =
        service_fn(move |req| handlers::handle(Arc::clone(&for_requests), transport, req));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut stop = shared.stop.clone();
    async move {
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = async { let _ = stop.wait_for(|stopping| *stopping).await; } => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            // Clients that vanish, send garbage or time out: theirs, not ours.
            log::debug!("API connection ({transport:?}): {e}");
        }
    }
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept_unix(listener: Option<&UnixListener>) -> io::Result<Accepted> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        None => std::future::pending().await,
    }
}

async fn accept_tcp(listener: Option<&TcpListener>) -> io::Result<Accepted> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        None => std::future::pending().await,
    }
}
