//! HTTP plumbing shared by the gateway's routes: reply bodies, JSON and OpenAI-style
//! errors, bearer keys, rate-limit headers.

use std::convert::Infallible;

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

/// OpenAI's error shape: `{"error": {"message", "type", "code"}}`.
pub fn error(status: StatusCode, code: &str, message: &str) -> Reply {
    let kind = tollgate::openai_error_type(status.as_u16());
    json_reply(
        status,
        &json!({"error": {"message": message, "type": kind, "code": code}}),
    )
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

pub fn bearer(request: &Request<Incoming>) -> Option<&str> {
    request
        .headers()
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

pub fn missing_key() -> Reply {
    error(
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
        "missing bearer key",
    )
}

/// The request's body as JSON, or the error reply to send.
pub async fn read_json(request: Request<Incoming>) -> Result<Value, Reply> {
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body too large",
            ))
        }
    };
    serde_json::from_slice::<Value>(&body).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body is not JSON",
        )
    })
}
