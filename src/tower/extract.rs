//! What the layer needs to know about a request, and how an extractor refuses one.

use http::header::AUTHORIZATION;
use http::StatusCode;

use crate::request::{Credential, Request};

/// The key, model and token estimate of one HTTP request, owned (the request itself
/// moves on to the inner service).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extracted {
    credential: Owned,
    model: String,
    input_tokens: u32,
    max_output_tokens: Option<u32>,
    outputs: u32,
    end_user: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Owned {
    Secret(String),
    KeyId(String),
}

impl Extracted {
    /// A request authenticated by the secret the client presented.
    #[must_use]
    pub fn secret(secret: impl Into<String>, model: impl Into<String>) -> Self {
        Self::new(Owned::Secret(secret.into()), model.into())
    }

    /// A request for a key id the service authenticated itself.
    #[must_use]
    pub fn key_id(key_id: impl Into<String>, model: impl Into<String>) -> Self {
        Self::new(Owned::KeyId(key_id.into()), model.into())
    }

    fn new(credential: Owned, model: String) -> Self {
        Extracted {
            credential,
            model,
            input_tokens: 0,
            max_output_tokens: None,
            outputs: 1,
            end_user: None,
        }
    }

    /// The input-token estimate.
    #[must_use]
    pub fn input_tokens(mut self, tokens: u32) -> Self {
        self.input_tokens = tokens;
        self
    }

    /// The request's `max_tokens`; without it the policy's default is held.
    #[must_use]
    pub fn max_output_tokens(mut self, tokens: u32) -> Self {
        self.max_output_tokens = Some(tokens);
        self
    }

    /// How many outputs the request asks for (OpenAI's `n`): the output worst case
    /// is held this many times.
    #[must_use]
    pub fn outputs(mut self, outputs: u32) -> Self {
        self.outputs = outputs;
        self
    }

    /// The end user the request is made for (see [`Request::end_user`]).
    #[must_use]
    pub fn end_user(mut self, id: impl Into<String>) -> Self {
        self.end_user = Some(id.into());
        self
    }

    /// The [`Request`] to reserve for.
    #[must_use]
    pub fn request(&self) -> Request<'_> {
        let credential = match &self.credential {
            Owned::Secret(secret) => Credential::Secret(secret),
            Owned::KeyId(id) => Credential::KeyId(id),
        };
        Request {
            credential,
            model: &self.model,
            input_tokens: self.input_tokens,
            max_output_tokens: self.max_output_tokens,
            outputs: self.outputs,
            end_user: self.end_user.as_deref(),
        }
    }
}

/// An extractor's refusal: answered as an OpenAI-style JSON error with this status
/// and code, before anything is reserved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The HTTP status.
    pub status: StatusCode,
    /// The machine-readable `code`.
    pub code: &'static str,
    /// The human-readable `message`.
    pub message: String,
}

impl Rejection {
    /// A refusal with this status, code and message.
    #[must_use]
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            status,
            code,
            message: message.into(),
        }
    }

    /// 401 `invalid_api_key`: no usable credential.
    #[must_use]
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_api_key", message)
    }

    /// 400 `invalid_request_error`: e.g. no model named.
    #[must_use]
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
}

/// Tells the layer what to reserve for a request.
///
/// Implemented for every `Fn(&http::Request<B>) -> Result<Extracted, Rejection>`.
pub trait Extract<B>: Send + Sync + 'static {
    /// The key, model and estimate of `request`, or why it cannot be served.
    ///
    /// # Errors
    /// A [`Rejection`], answered as is.
    fn extract(&self, request: &http::Request<B>) -> Result<Extracted, Rejection>;
}

impl<B, F> Extract<B> for F
where
    F: Fn(&http::Request<B>) -> Result<Extracted, Rejection> + Send + Sync + 'static,
{
    fn extract(&self, request: &http::Request<B>) -> Result<Extracted, Rejection> {
        self(request)
    }
}

/// The token of an `Authorization: Bearer …` header, the scheme in any case.
///
/// ```
/// let request = http::Request::builder()
///     .header("authorization", "bearer sk-123")
///     .body(())
///     .unwrap();
/// assert_eq!(tollgate::tower::bearer_token(&request), Some("sk-123"));
/// let basic = http::Request::builder().header("authorization", "Basic abc").body(()).unwrap();
/// assert_eq!(tollgate::tower::bearer_token(&basic), None);
/// ```
#[must_use]
pub fn bearer_token<B>(request: &http::Request<B>) -> Option<&str> {
    crate::request::bearer_token(request.headers().get(AUTHORIZATION)?.to_str().ok()?)
}
