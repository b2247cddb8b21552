//! Both directions of bodies: reading a request body under the size limit, and the response
//! body type (a whole buffer, or a channel a streaming task feeds), with the helpers that
//! build JSON, text and error responses.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::ApiError;

/// The largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// A response body: all at once, or streamed from a channel. Ends when the buffer is sent or
/// every sender is gone; hyper drops it when the client goes away, which a streaming task sees
/// as [`mpsc::Sender::closed`].
#[derive(Debug)]
pub(crate) struct ResponseBody(Inner);

#[derive(Debug)]
enum Inner {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Bytes>),
}

impl ResponseBody {
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        Self(Inner::Full(Some(bytes.into())))
    }

    pub(crate) fn empty() -> Self {
        Self(Inner::Full(None))
    }

    /// A streamed body and the sender that feeds it.
    pub(crate) fn channel(capacity: usize) -> (mpsc::Sender<Bytes>, Self) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Self(Inner::Channel(rx)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().0 {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Channel(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.0, Inner::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Channel(_) => SizeHint::default(),
        }
    }
}

pub(crate) type HttpResponse = Response<ResponseBody>;

/// A response with `status`, one `content-type` and `body`.
pub(crate) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: ResponseBody,
) -> HttpResponse {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// `value` as JSON, or a 500 if it cannot be serialized (which the model types cannot fail).
pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> HttpResponse {
    match serde_json::to_vec(value) {
        Ok(bytes) => response(status, "application/json", ResponseBody::full(bytes)),
        Err(e) => error(&ApiError::internal(format!(
            "could not serialize the answer: {e}"
        ))),
    }
}

/// 204 without body.
pub(crate) fn no_content() -> HttpResponse {
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// The one place an [`ApiError`] becomes a response: its status (a 500 if it is not a valid
/// 4xx or 5xx) and `ApiError::body()` as JSON; a 401 also says which scheme it wants.
pub(crate) fn error(err: &ApiError) -> HttpResponse {
    let status = StatusCode::from_u16(err.status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error());
    let Some(status) = status else {
        log::error!(
            "the service answered an error with status {}: {err}",
            err.status
        );
        return error(&ApiError::internal(format!(
            "{} (with the invalid status {})",
            err.message, err.status
        )));
    };
    let mut response = json(status, &err.body());
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// Reads the whole body, failing with 413 as soon as it passes `limit` (never holding more
/// than `limit` bytes plus one of hyper's reads), with 408 after `timeout`, and with 400 if
/// the client breaks the framing.
pub(crate) async fn read_limited(
    mut body: Incoming,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(ApiError::too_large(limit));
    }
    let read = async {
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request(format!("could not read the request body: {e}"))
            })?;
            if let Ok(data) = frame.into_data() {
                if buf.len().saturating_add(data.len()) > limit {
                    return Err(ApiError::too_large(limit));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                408,
                "request_timeout",
                format!("the request body did not arrive within {timeout:?}"),
            ))
        })
}

/// Reads a JSON body into `T`: 415 unless the body is `application/json`, 413 past
/// [`MAX_BODY`], 400 with serde's message if it is not exactly a `T`.
pub(crate) async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Incoming,
    timeout: Duration,
) -> Result<T, ApiError> {
    if body.is_end_stream() {
        return Err(ApiError::bad_request("this route needs a JSON body"));
    }
    if !is_json(headers) {
        return Err(ApiError::unsupported_media_type());
    }
    let bytes = read_limited(body, MAX_BODY, timeout).await?;
    // serde also reads a struct from a JSON array of its fields in order; the API's bodies
    // are objects only.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid JSON body: expected a JSON object",
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Reads the body of a route that takes none: 400 unless it is empty.
pub(crate) async fn read_none(body: Incoming, timeout: Duration) -> Result<(), ApiError> {
    if body.is_end_stream() {
        return Ok(());
    }
    let bytes = read_limited(body, MAX_BODY, timeout).await?;
    if bytes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::bad_request("this route takes no request body"))
    }
}

/// One `content-type` whose media type is `application/json` (parameters such as `charset`
/// are allowed).
fn is_json(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let media_type = value.as_bytes().split(|&b| b == b';').next().unwrap_or(b"");
    media_type
        .trim_ascii()
        .eq_ignore_ascii_case(b"application/json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        let check = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::CONTENT_TYPE, HeaderValue::from_static(v));
            }
            is_json(&headers)
        };
        assert!(check(&["application/json"]));
        assert!(check(&["Application/JSON; charset=utf-8"]));
        assert!(check(&[" application/json ;x=y"]));
        assert!(!check(&[]));
        assert!(!check(&["text/plain"]));
        assert!(!check(&["application/jsonx"]));
        assert!(!check(&["application/json", "application/json"]));
    }

    #[test]
    fn errors_keep_their_status_and_bad_statuses_become_500() {
        let r = error(&ApiError::conflict("busy"));
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert_eq!(error(&ApiError::new(200, "odd", "x")).status(), 500);
        assert_eq!(error(&ApiError::new(9999, "odd", "x")).status(), 500);
        let r = error(&ApiError::unauthorized());
        assert_eq!(
            r.headers()
                .get(header::WWW_AUTHENTICATE)
                .map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        );
    }
}
