//! One request: authorize, route, parse (query, name, body), call the [`Service`], and turn
//! the result into a response. Handlers do nothing else; errors become responses in
//! [`body::error`] only.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use tokio::sync::watch;

use super::auth::BearerToken;
use super::body::{self, HttpResponse, ResponseBody};
use super::metrics::Metrics;
use super::routes::{self, ConsoleParams, DeleteParams, FileParams, Op, Routed};
use super::{streams, ServeOptions};
use crate::error::ApiError;
use crate::model::{CreateEnvironment, CreateImage, ExecRequest, MAX_FILE};
use crate::names;
use crate::service::Service;

/// What every connection of one server shares.
pub(crate) struct Shared<S> {
    pub(crate) service: Arc<S>,
    /// The token TCP requests must carry (`None` when there is no TCP listener).
    pub(crate) token: Option<BearerToken>,
    pub(crate) options: ServeOptions,
    pub(crate) metrics: Metrics,
    /// Becomes `true` when the server shuts down; streams end on it.
    pub(crate) stop: watch::Receiver<bool>,
}

/// Where a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// The Unix socket: its file mode is the access control.
    Unix,
    /// TCP: every request needs the bearer token.
    Tcp,
}

/// hyper's service function: never fails, every problem is an error response.
pub(crate) async fn handle<S: Service>(
    shared: Arc<Shared<S>>,
    transport: Transport,
    req: Request<Incoming>,
) -> Result<HttpResponse, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = dispatch(&shared, transport, req)
        .await
        .unwrap_or_else(|e| body::error(&e));
    let status = response.status();
    if status.is_server_error() {
        log::warn!("{method} {path}: {status}");
    } else {
        log::debug!("{method} {path}: {status}");
    }
    shared.metrics.record(status.as_u16(), started.elapsed());
    Ok(response)
}

async fn dispatch<S: Service>(
    shared: &Arc<Shared<S>>,
    transport: Transport,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    if transport == Transport::Tcp {
        match &shared.token {
            Some(token) => token.check(req.headers())?,
            None => return Err(ApiError::unauthorized()),
        }
    }
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let (op, raw_name) = match routes::route(parts.method.as_str(), path) {
        Routed::Found { op, raw_name } => (op, raw_name),
        Routed::WrongMethod { allow } => return Ok(method_not_allowed(&parts.method, &allow)),
        Routed::NotFound => return Err(ApiError::not_found(format!("no route {}", shorten(path)))),
    };
    let query = parts.uri.query();
    let timeout = shared.options.body_read_timeout;
    let svc = &*shared.service;
    // Every name-taking route reads the name the same way; `kind` is for messages.
    let name = |kind: &str| match raw_name {
        Some(raw) => routes::decode_name(kind, raw),
        None => Err(ApiError::internal("route without a name")),
    };

    match op {
        Op::Healthz => {
            routes::no_query(query)?;
            body::read_none(body, timeout).await?;
            Ok(body::response(
                StatusCode::OK,
                "application/json",
                ResponseBody::full(&b"{\"status\":\"ok\"}"[..]),
            ))
        }
        Op::Metrics => {
            routes::no_query(query)?;
            body::read_none(body, timeout).await?;
            let mut text = svc.metrics();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&shared.metrics.render());
            Ok(body::response(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                ResponseBody::full(text),
            ))
        }
        Op::Events => {
            routes::no_query(query)?;
            body::read_none(body, timeout).await?;
            Ok(streams::events(shared))
        }
        Op::ListImages => {
            routes::no_query(query)?;
            body::read_none(body, timeout).await?;
            Ok(body::json(StatusCode::OK, &svc.list_images().await?))
        }
        Op::CreateImage => {
            routes::no_query(query)?;
            let req: CreateImage = body::read_json(&parts.headers, body, timeout).await?;
            names::validate("image", &req.name)?;
            let image = svc.create_image(req).await?;
            Ok(created(&image, "/v1/images/", &image.name))
        }
        Op::GetImage => {
            routes::no_query(query)?;
            let name = name("image")?;
            body::read_none(body, timeout).await?;
            Ok(body::json(StatusCode::OK, &svc.get_image(&name).await?))
        }
        Op::DeleteImage => {
            routes::no_query(query)?;
            let name = name("image")?;
            body::read_none(body, timeout).await?;
            svc.delete_image(&name).await?;
            Ok(body::no_content())
        }
        Op::ListEnvironments => {
            routes::no_query(query)?;
            body::read_none(body, timeout).await?;
            Ok(body::json(StatusCode::OK, &svc.list_environments().await?))
        }
        Op::CreateEnvironment => {
            let mode = routes::parse_mode(query)?;
            let mut req: CreateEnvironment = body::read_json(&parts.headers, body, timeout).await?;
            req.snapshot_mode = mode;
            names::validate("environment", &req.name)?;
            if let Some(image) = &req.image {
                names::validate("image", image)?;
            }
            if let Some(from) = &req.from {
                names::validate("environment", from)?;
            }
            let created_env = svc.create_environment(req).await?;
            let name = created_env.environment.name.clone();
            Ok(created(&created_env, "/v1/environments/", &name))
        }
        Op::GetEnvironment => {
            routes::no_query(query)?;
            let name = name("environment")?;
            body::read_none(body, timeout).await?;
            Ok(body::json(
                StatusCode::OK,
                &svc.get_environment(&name).await?,
            ))
        }
        Op::DeleteEnvironment => {
            let params = DeleteParams::parse(query)?;
            let name = name("environment")?;
            body::read_none(body, timeout).await?;
            svc.delete_environment(&name, params.force).await?;
            Ok(body::no_content())
        }
        Op::Pause | Op::Resume => {
            routes::no_query(query)?;
            let name = name("environment")?;
            body::read_none(body, timeout).await?;
            Ok(match op {
                Op::Pause => body::json(StatusCode::OK, &svc.pause(&name).await?),
                _ => body::json(StatusCode::OK, &svc.resume(&name).await?),
            })
        }
        Op::Snapshot | Op::Sync => {
            let mode = routes::parse_mode(query)?;
            let name = name("environment")?;
            body::read_none(body, timeout).await?;
            Ok(match op {
                Op::Snapshot => body::json(StatusCode::CREATED, &svc.snapshot(&name, mode).await?),
                _ => body::json(StatusCode::OK, &svc.sync(&name, mode).await?),
            })
        }
        Op::ConsoleInput => {
            routes::no_query(query)?;
            let name = name("environment")?;
            let is_text = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| {
                    let v = v.split(';').next().unwrap_or("").trim();
                    v.eq_ignore_ascii_case("text/plain")
                        || v.eq_ignore_ascii_case("application/octet-stream")
                });
            if !is_text {
                return Err(ApiError::new(
                    415,
                    "unsupported_media_type",
                    "console input must be text/plain or application/octet-stream",
                ));
            }
            let input = body::read_limited(body, MAX_CONSOLE_INPUT, timeout).await?;
            svc.console_input(&name, input.to_vec()).await?;
            Ok(body::no_content())
        }
        Op::Exec => {
            routes::no_query(query)?;
            let name = name("environment")?;
            let req: ExecRequest = body::read_json(&parts.headers, body, timeout).await?;
            Ok(body::json(StatusCode::OK, &svc.exec(&name, req).await?))
        }
        Op::GetFile => {
            let params = FileParams::parse(query, false)?;
            let name = name("environment")?;
            body::read_none(body, timeout).await?;
            let data = svc.read_file(&name, &params.path).await?;
            Ok(body::response(
                StatusCode::OK,
                "application/octet-stream",
                ResponseBody::full(data),
            ))
        }
        Op::PutFile => {
            let params = FileParams::parse(query, true)?;
            let name = name("environment")?;
            if !is_octet_stream(&parts.headers) {
                return Err(ApiError::new(
                    415,
                    "unsupported_media_type",
                    "a file's content must be application/octet-stream",
                ));
            }
            let data = body::read_limited(body, MAX_FILE, timeout).await?;
            svc.write_file(&name, &params.path, data.to_vec(), params.mode)
                .await?;
            Ok(body::no_content())
        }
        Op::Console => {
            let params = ConsoleParams::parse(query)?;
            let name = name("environment")?;
            body::read_none(body, timeout).await?;
            streams::console(shared, name, params).await
        }
    }
}

/// Whether the request's content type is `application/octet-stream`.
fn is_octet_stream(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/octet-stream")
        })
}

/// The most bytes one console-input request may carry.
pub const MAX_CONSOLE_INPUT: usize = 4096;

/// 201 with `value` and the new resource's `Location`.
fn created<T: serde::Serialize>(value: &T, collection: &str, name: &str) -> HttpResponse {
    let mut response = body::json(StatusCode::CREATED, value);
    // Valid names are URL-safe; a service answering with another name just gets no Location.
    if names::validate("resource", name).is_ok() {
        if let Ok(location) = HeaderValue::from_str(&format!("{collection}{name}")) {
            response.headers_mut().insert(header::LOCATION, location);
        }
    }
    response
}

/// 405 with the `Allow` header.
fn method_not_allowed(method: &hyper::Method, allow: &[&str]) -> HttpResponse {
    let allow = allow.join(", ");
    let mut response = body::error(&ApiError::method_not_allowed(format!(
        "{} is not allowed here; use {allow}",
        shorten(method.as_str())
    )));
    if let Ok(value) = HeaderValue::from_str(&allow) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

/// Caller text echoed in a message, cut to a readable length.
fn shorten(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}
