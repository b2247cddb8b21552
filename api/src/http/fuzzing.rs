//! Entry point for the HTTP fuzz target of `integration/fuzz` (see `docs/fuzzing.md`), behind
//! the `fuzzing` feature; its corpus is replayed by `integration/tests/fuzz_corpus.rs`.
//!
//! The input's bytes are what one client sends on one connection. They go through the same
//! connection code as a real socket (hyper's HTTP/1 server with our limits, authorization,
//! routing, body parsing, handlers, error answers) over an in-memory pipe, on a runtime
//! whose clock only moves when everything is idle: timeouts fire at once instead of after
//! seconds, and a request that waits forever ends the run instead of hanging it.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};

use super::handlers::{Shared, Transport};
use super::{connection, http1_builder, BearerToken, ServeOptions};
use crate::error::ApiError;
use crate::model::{
    CreateEnvironment, CreateImage, Environment, EnvironmentCreated, Event, Image, Snapshot,
    SnapshotMode,
};
use crate::service::{Result, Service};

/// The bearer token of the fuzzed TCP connections (a corpus entry that carries it gets past
/// authorization).
pub const FUZZ_TOKEN: &str = "grove-fuzz-token-0123456789abcdef";

/// A service that knows nothing: every request that reaches it is answered with 404 (lists
/// are empty), so the run exercises everything in front of the service.
struct NullService;

fn none<T>() -> Result<T> {
    Err(ApiError::not_found("nothing here"))
}

impl Service for NullService {
    async fn list_images(&self) -> Result<Vec<Image>> {
        Ok(Vec::new())
    }
    async fn create_image(&self, _req: CreateImage) -> Result<Image> {
        none()
    }
    async fn get_image(&self, _name: &str) -> Result<Image> {
        none()
    }
    async fn delete_image(&self, _name: &str) -> Result<()> {
        none()
    }
    async fn list_environments(&self) -> Result<Vec<Environment>> {
        Ok(Vec::new())
    }
    async fn create_environment(&self, _req: CreateEnvironment) -> Result<EnvironmentCreated> {
        none()
    }
    async fn get_environment(&self, _name: &str) -> Result<Environment> {
        none()
    }
    async fn delete_environment(&self, _name: &str, _force: bool) -> Result<()> {
        none()
    }
    async fn pause(&self, _name: &str) -> Result<Environment> {
        none()
    }
    async fn resume(&self, _name: &str) -> Result<Environment> {
        none()
    }
    async fn snapshot(&self, _name: &str, _mode: Option<SnapshotMode>) -> Result<Snapshot> {
        none()
    }
    async fn sync(&self, _name: &str, _mode: Option<SnapshotMode>) -> Result<EnvironmentCreated> {
        none()
    }
    async fn console(&self, name: &str, offset: u64, limit: usize) -> Result<Vec<u8>> {
        // Some bytes, so a followed console has something to stream.
        let text = format!("{name}@{offset}\n").into_bytes();
        Ok(text.into_iter().take(limit).collect())
    }
    fn subscribe(&self) -> broadcast::Receiver<Event> {
        // The sender is dropped: an event stream ends at once.
        broadcast::channel(1).1
    }
    fn metrics(&self) -> String {
        String::new()
    }
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// One connection: the first input byte picks the transport (even: the Unix socket; odd: TCP,
/// which needs `Authorization: Bearer` [`FUZZ_TOKEN`]), the rest is sent as it is.
pub fn http_requests(data: &[u8]) {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let transport = if flags & 1 == 0 {
        Transport::Unix
    } else {
        Transport::Tcp
    };
    RUNTIME.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .ok();
        }
        if let Some(runtime) = cell.as_ref() {
            runtime.block_on(one_connection(transport, bytes));
        }
    });
}

async fn one_connection(transport: Transport, bytes: &[u8]) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        service: Arc::new(NullService),
        token: BearerToken::new(FUZZ_TOKEN).ok(),
        options: ServeOptions::default(),
        metrics: Default::default(),
        stop: stop_rx,
    });
    let (client, server) = tokio::io::duplex(64 * 1024);
    let conn = tokio::spawn(connection(
        &http1_builder(&shared.options),
        &shared,
        server,
        transport,
    ));
    let (mut rd, mut wr) = tokio::io::split(client);
    let send = async {
        let _ = wr.write_all(bytes).await;
        // The client keeps its side open: the server's timeouts end the connection.
    };
    let receive = async {
        let mut sink = Vec::new();
        let _ = rd.read_to_end(&mut sink).await;
    };
    // Virtual time: ample for every timeout of ServeOptions to fire.
    let _ = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(send, receive)
    })
    .await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
}
