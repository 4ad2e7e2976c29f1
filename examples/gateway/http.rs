//! HTTP plumbing shared by the gateway's routes: reply bodies, JSON and OpenAI-style
//! errors, bearer keys, rate-limit headers.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tollgate::{Denial, RateLimitHeaders};

/// Requests bigger than this are refused before parsing.
pub const MAX_BODY: usize = 1 << 20;

/// Every reply: a whole body or a stream (server-sent events).
pub type Reply = Response<BoxBody<Bytes, Infallible>>;

pub fn full(bytes: impl Into<Bytes>) -> BoxBody<Bytes, Infallible> {
    Full::new(bytes.into()).boxed()
}

pub fn json_reply(status: StatusCode, body: &Value) -> Reply {
    let mut reply = Response::new(full(body.to_string()));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    reply
}

/// An error reply's `code`, also in the reply's extensions for the request log.
#[derive(Clone, Debug)]
pub struct ErrorCode(pub String);

/// OpenAI's error shape: `{"error": {"message", "type", "code"}}`.
pub fn error(status: StatusCode, code: &str, message: &str) -> Reply {
    let kind = tollgate::openai_error_type(status.as_u16());
    let mut reply = json_reply(
        status,
        &json!({"error": {"message": message, "type": kind, "code": code}}),
    );
    reply.extensions_mut().insert(ErrorCode(code.to_owned()));
    reply
}

/// A denial as the client sees it: its status, code, message and rate-limit headers.
pub fn denied(denial: &Denial) -> Reply {
    let status =
        StatusCode::from_u16(denial.http_status()).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let mut reply = error(status, denial.code(), &denial.to_string());
    add_headers(&mut reply, &RateLimitHeaders::for_denial(denial));
    reply
}

pub fn add_headers(reply: &mut Reply, headers: &RateLimitHeaders) {
    for (name, value) in headers.iter() {
        if let Ok(value) = HeaderValue::from_str(value.as_str()) {
            reply.headers_mut().insert(name, value);
        }
    }
}

/// The token of an `Authorization: Bearer TOKEN` header. The scheme is matched
/// without regard to case, as RFC 9110 says (`bearer` and `BEARER` too).
pub fn bearer(request: &Request<Incoming>) -> Option<&str> {
    tollgate::bearer_token(request.headers().get(AUTHORIZATION)?.to_str().ok()?)
}

pub fn missing_key() -> Reply {
    error(
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
        "missing bearer key",
    )
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// Over [`MAX_BODY`] bytes.
    TooLarge,
    /// Not all there within the body timeout.
    TimedOut,
    /// The connection failed mid-body.
    Broken,
}

impl BodyError {
    /// The status, code and message to answer with: 413, 408 or 400.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            BodyError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body too large",
            ),
            BodyError::TimedOut => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time",
            ),
            BodyError::Broken => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "the request body was cut off",
            ),
        }
    }

    /// The error reply.
    pub fn reply(&self) -> Reply {
        let (status, code, message) = self.parts();
        error(status, code, message)
    }
}

/// The whole request body: at most [`MAX_BODY`] bytes, arriving within `timeout`.
pub async fn read_body(request: Request<Incoming>, timeout: Duration) -> Result<Bytes, BodyError> {
    let read = Limited::new(request.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(BodyError::TimedOut),
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Ok(Err(_)) => Err(BodyError::Broken),
    }
}

/// The request's body as JSON, or the error reply to send.
pub async fn read_json(request: Request<Incoming>, timeout: Duration) -> Result<Value, Reply> {
    let body = read_body(request, timeout).await.map_err(|e| e.reply())?;
    serde_json::from_slice::<Value>(&body).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body is not JSON",
        )
    })
}
