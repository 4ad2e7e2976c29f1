//! A tower [`Layer`](tower_layer::Layer) (feature `tower`) that puts tollgate in front
//! of any `http` service: axum routers, hyper-util services, tonic.
//!
//! For each request, the layer asks an [`Extract`]or for the credential, model and
//! token estimate, calls [`Limiter::check_and_reserve`](crate::Limiter), and then:
//!
//! - **denied**: answers at once with the denial's status, an OpenAI-style JSON error
//!   (`{"error": {"message", "type", "code"}}`) and the rate-limit headers
//!   (`Retry-After`, `x-ratelimit-*`, `RateLimit`); override with
//!   [`TollgateLayer::on_denial`]. The inner service is not called.
//! - **admitted**: puts a [`Hold`] in the request's extensions (the handler reads the
//!   rate limits from it, reports streamed usage to it, or takes the reservation over)
//!   and calls the inner service. Its response gets the rate-limit headers, and:
//!   - a response carrying a [`Usage`](crate::Usage) extension is committed before it
//!     is returned (its [`Receipt`](crate::Receipt) is put in the response's
//!     extensions; a commit the store refused for good answers 503 instead);
//!   - otherwise the body is watched: when it ends, the usage reported through
//!     [`Hold::report_usage`] is committed (a streamed answer reports its usage as its
//!     last chunk is produced), and without any the reservation is released;
//!   - an error from the inner service, a body that fails, or a client that hangs up
//!     before the response releases the reservation; a client that hangs up mid-body
//!     is charged the usage reported so far (committed on the tokio runtime), or
//!     nothing if none was.
//!
//! The extractor is any `Fn(&http::Request<B>) -> Result<Extracted, Rejection>`. It sees
//! the head only; an estimate that needs the body (an OpenAI request body's input
//! tokens) comes from a layer in front that reads the body and leaves its estimate in
//! the request's extensions for the extractor to pick up.
//!
//! ```
//! use std::convert::Infallible;
//! use tollgate::tower::{bearer_token, Extracted, Rejection, TollgateLayer};
//! use tollgate::{Engine, Policy, Usage};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # let engine = Engine::new(Policy::from_toml_str(r#"
//! #     [org]
//! #     id = "acme"
//! #     [[models]]
//! #     name = "gpt-4o-mini"
//! #     input_per_million = "0.15"
//! #     output_per_million = "0.60"
//! #     [[workspaces]]
//! #     id = "ws"
//! #     name = "chat"
//! #     models = ["gpt-4o-mini"]
//! #     limits = { rpm = 60 }
//! #     [[keys]]
//! #     id = "k"
//! #     workspace = "ws"
//! #     secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! # "#)?);
//! let layer = TollgateLayer::new(engine.clone(), |request: &http::Request<String>| -> Result<_, Rejection> {
//!     let key = bearer_token(request).ok_or_else(|| Rejection::unauthorized("missing bearer key"))?;
//!     Ok(Extracted::secret(key, "gpt-4o-mini").input_tokens(500).max_output_tokens(200))
//! });
//! // The service answers with the usage the provider reported: the layer commits it.
//! let service = layer.layer(service_fn(|_request: http::Request<String>| async {
//!     let mut response = http::Response::new(http_body_util::Full::new(bytes::Bytes::from("hi")));
//!     response.extensions_mut().insert(Usage::new(480, 20));
//!     Ok::<_, Infallible>(response)
//! }));
//!
//! let request = http::Request::builder()
//!     .header("authorization", "Bearer test")
//!     .body(String::new())?;
//! let runtime = tokio::runtime::Builder::new_current_thread().build()?;
//! let response = runtime.block_on(service.oneshot(request))?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "59");
//! assert_eq!(engine.usage().org.current.input_tokens, 480);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod body;
mod extract;
mod hold;
mod layer;
mod reply;

pub use body::MeteredBody;
pub use extract::{bearer_token, Extract, Extracted, Rejection};
pub use hold::Hold;
pub use layer::{ResponseFuture, Tollgate, TollgateLayer};
pub use reply::{denial_response, DenialResponder};
