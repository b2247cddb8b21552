//! The two answers that stay open: server-sent events and a followed console. Each is a task
//! feeding a [`ResponseBody::channel`]; the task ends when the client goes away (hyper drops
//! the body, the channel closes), when the server shuts down, or when its source ends.

use std::sync::Arc;

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::StatusCode;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::{self, MissedTickBehavior};

use super::body::{self, HttpResponse, ResponseBody};
use super::handlers::Shared;
use super::routes::ConsoleParams;
use crate::error::ApiError;
use crate::service::Service;

/// Console bytes asked for per poll while following.
const FOLLOW_CHUNK: usize = 64 * 1024;

/// `GET /v1/events`: `data: <Event JSON>` per event, a `: keep-alive` comment every
/// `keep_alive_interval`, and a `: missed N events` comment if this client fell behind.
/// Subscribes before answering, so nothing that happens after the answer is missed.
pub(crate) fn events<S: Service>(shared: &Arc<Shared<S>>) -> HttpResponse {
    let mut events = shared.service.subscribe();
    let (tx, body) = ResponseBody::channel(16);
    let mut stop = shared.stop.clone();
    let period = shared.options.keep_alive_interval;
    tokio::spawn(async move {
        let mut keep_alive = time::interval_at(time::Instant::now() + period, period);
        keep_alive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let chunk = tokio::select! {
                () = tx.closed() => break,
                () = stopped(&mut stop) => break,
                _ = keep_alive.tick() => Bytes::from_static(b": keep-alive\n\n"),
                event = events.recv() => match event {
                    Ok(event) => match serde_json::to_string(&event) {
                        Ok(json) => Bytes::from(format!("data: {json}\n\n")),
                        Err(e) => {
                            log::error!("could not serialize an event: {e}");
                            continue;
                        }
                    },
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        Bytes::from(format!(": missed {n} events\n\n"))
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            };
            if !send(&tx, &mut stop, chunk).await {
                break;
            }
        }
    });
    let mut response = body::response(StatusCode::OK, "text/event-stream", body);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /v1/environments/{name}/console`: the bytes from `offset` (at most `limit`), or with
/// `follow` everything from `offset` on, polling the service every `console_poll_interval`
/// until the client goes away or the environment does (the service answers an error). The
/// first read happens before answering, so an unknown environment is a 404, not an empty
/// stream.
pub(crate) async fn console<S: Service>(
    shared: &Arc<Shared<S>>,
    name: String,
    params: ConsoleParams,
) -> Result<HttpResponse, ApiError> {
    let limit = if params.follow {
        FOLLOW_CHUNK
    } else {
        params.limit
    };
    let first = shared.service.console(&name, params.offset, limit).await?;
    let next = params.offset.saturating_add(first.len() as u64);
    if !params.follow {
        let mut response = body::response(StatusCode::OK, "text/plain", ResponseBody::full(first));
        response
            .headers_mut()
            .insert("grove-next-offset", HeaderValue::from(next));
        return Ok(response);
    }

    let (tx, body) = ResponseBody::channel(4);
    let service = Arc::clone(&shared.service);
    let mut stop = shared.stop.clone();
    let poll = shared.options.console_poll_interval;
    tokio::spawn(async move {
        let mut offset = next;
        let mut chunk = first;
        loop {
            // A full chunk means there is probably more: ask again at once.
            let full = chunk.len() >= FOLLOW_CHUNK;
            if !chunk.is_empty() && !send(&tx, &mut stop, Bytes::from(chunk)).await {
                break;
            }
            if !full {
                tokio::select! {
                    () = tx.closed() => break,
                    () = stopped(&mut stop) => break,
                    () = time::sleep(poll) => {}
                }
            }
            chunk = match service.console(&name, offset, FOLLOW_CHUNK).await {
                Ok(bytes) => bytes,
                Err(e) => {
                    log::debug!("console of {name:?}: stream ends: {e}");
                    break;
                }
            };
            let Some(after) = offset.checked_add(chunk.len() as u64) else {
                break;
            };
            offset = after;
        }
    });
    let mut response = body::response(StatusCode::OK, "text/plain", body);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// Sends `chunk` unless the client went away or the server stops first; false if it did not.
async fn send(tx: &mpsc::Sender<Bytes>, stop: &mut watch::Receiver<bool>, chunk: Bytes) -> bool {
    tokio::select! {
        sent = tx.send(chunk) => sent.is_ok(),
        () = stopped(stop) => false,
    }
}

/// Resolves once the server is stopping (or gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the server dropped its sender: it is gone, which also means stop.
    let _ = stop.wait_for(|stopping| *stopping).await;
}
