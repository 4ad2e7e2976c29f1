//! Responses the layer writes itself: denials, extractor rejections, failed commits.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};

use crate::denial::{openai_error_type, Denial};
use crate::headers::RateLimitHeaders;

/// Turns a [`Denial`] into the response sent instead of calling the service.
pub type DenialResponder = Arc<dyn Fn(&Denial) -> http::Response<Bytes> + Send + Sync>;

/// The default answer to a denial: its status, an OpenAI-style JSON error
/// (`{"error": {"message", "type", "code"}}`) and the rate-limit headers.
#[must_use]
pub fn denial_response(denial: &Denial) -> http::Response<Bytes> {
    let status =
        StatusCode::from_u16(denial.http_status()).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let mut response = error_response(status, denial.code(), &denial.to_string());
    add_rate_limit_headers(
        response.headers_mut(),
        &RateLimitHeaders::for_denial(denial),
    );
    response
}

/// An OpenAI-style JSON error.
pub(crate) fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
) -> http::Response<Bytes> {
    let body = serde_json::json!({
        "error": {"message": message, "type": openai_error_type(status.as_u16()), "code": code}
    });
    let mut response = http::Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn add_rate_limit_headers(headers: &mut HeaderMap, rate_limits: &RateLimitHeaders) {
    for (name, value) in rate_limits.iter() {
        if let Ok(value) = HeaderValue::from_str(value.as_str()) {
            headers.insert(name, value);
        }
    }
}
