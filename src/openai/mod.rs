//! OpenAI request bodies turned into [`Request`]s with real token counts (feature
//! `openai`, on by default).
//!
//! A hold is only as good as its estimate. [`estimate`] reads a chat completions,
//! Responses API, embeddings or legacy completions body and counts its input with
//! the model's own encoding (tiktoken's `o200k_base` / `cl100k_base`, chosen by the
//! model's name or the policy's `tokenizer`): every text part, names, OpenAI's chat
//! framing, tool definitions, tool calls and results; images by OpenAI's tile rule or
//! the policy's `image_tokens`; audio and files by the policy's `audio_tokens` /
//! `file_tokens`, or a [`ShapeProblem::CannotEstimate`] error. The output worst case is
//! `max_tokens` / `max_completion_tokens` / `max_output_tokens`, times `n`.
//!
//! A body that is not an OpenAI shape (a `max_tokens` that is negative, fractional or a
//! string, `messages` that is not an array, `n` out of range, an unknown content part)
//! is a [`ShapeError`] naming the field: nothing is silently counted as 0.
//!
//! The estimate runs before [`Engine::check_and_reserve`](crate::Engine::check_and_reserve),
//! off its allocation-free path; it walks the JSON once and tokenizes each text once.
//!
//! ```
//! use serde_json::json;
//! use tollgate::openai::{self, Endpoint, EstimateOptions};
//! use tollgate::{Credential, Engine, Policy};
//!
//! # let policy = Policy::from_toml_str(r#"
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
//! #     [[keys]]
//! #     id = "key-1"
//! #     workspace = "ws"
//! #     secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! # "#)?;
//! let engine = Engine::new(policy);
//! let body = json!({"model": "gpt-4o-mini", "n": 2, "max_tokens": 50,
//!                   "messages": [{"role": "user", "content": "Hello"}]});
//! let options = EstimateOptions::from_policy(&engine.policy(), "gpt-4o-mini");
//! let estimate = openai::estimate(Endpoint::ChatCompletions, &body, &options)?;
//! let request = estimate.request(Credential::Secret("test"), "gpt-4o-mini");
//! assert_eq!((request.input_tokens, request.max_output_tokens, request.outputs), (8, Some(50), 2));
//! let reservation = engine.check_and_reserve(&request)?;
//! assert_eq!(reservation.reserved_tokens(), (8, 100));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod chat;
mod count;
mod error;
mod fields;
mod image;
mod prompt;
mod responses;
mod tokenizer;

use serde_json::Value;

use crate::policy::{ModelSpec, Policy};
use crate::request::{Credential, Request};

pub use chat::{estimate_chat, MAX_N};
pub use count::{REPLY_PRIMING, TOKENS_PER_MESSAGE, TOKENS_PER_NAME, TOKENS_PER_TOOL_CALL};
pub use error::{ShapeError, ShapeProblem};
pub use image::{data_url_size, image_tokens, ImageDetail, ImageRates, MAX_TILES};
pub use prompt::{estimate_completions, estimate_embeddings, COMPLETIONS_DEFAULT_MAX_TOKENS};
pub use responses::estimate_responses;
pub use tokenizer::Tokenizer;

/// Which OpenAI API a body is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/completions` (legacy).
    Completions,
}

impl Endpoint {
    /// The endpoint served at `path` (with or without the `/v1` prefix).
    #[must_use]
    pub fn from_path(path: &str) -> Option<Self> {
        match path.strip_prefix("/v1").unwrap_or(path) {
            "/chat/completions" => Some(Endpoint::ChatCompletions),
            "/responses" => Some(Endpoint::Responses),
            "/embeddings" => Some(Endpoint::Embeddings),
            "/completions" => Some(Endpoint::Completions),
            _ => None,
        }
    }

    /// The body field that limits each output's tokens, as the provider reads it
    /// (`None` for embeddings, which produce none).
    #[must_use]
    pub fn output_limit_field(self) -> Option<&'static str> {
        match self {
            Endpoint::ChatCompletions => Some("max_completion_tokens"),
            Endpoint::Responses => Some("max_output_tokens"),
            Endpoint::Completions => Some("max_tokens"),
            Endpoint::Embeddings => None,
        }
    }
}

/// How to count for one model: its encoding and the per-model values the policy sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EstimateOptions {
    /// The encoding text is counted with.
    pub tokenizer: Tokenizer,
    /// Image base and tile tokens for the tile rule.
    pub image_rates: ImageRates,
    /// Tokens of every image, instead of the tile rule.
    pub image_tokens: Option<u32>,
    /// Tokens of every audio input; `None`: audio cannot be estimated.
    pub audio_tokens: Option<u32>,
    /// Tokens of every attached file; `None`: files cannot be estimated.
    pub file_tokens: Option<u32>,
}

impl EstimateOptions {
    /// The defaults for a model's name: its family's encoding and image rates, no
    /// audio or file values.
    #[must_use]
    pub fn for_model(model: &str) -> Self {
        EstimateOptions {
            tokenizer: Tokenizer::for_model(model),
            image_rates: ImageRates::for_model(model),
            image_tokens: None,
            audio_tokens: None,
            file_tokens: None,
        }
    }

    /// A priced model's options: its name's defaults, overridden by what its
    /// `[[models]]` entry sets (`tokenizer`, `image_tokens`, `audio_tokens`,
    /// `file_tokens`). A validated policy names only known tokenizers.
    #[must_use]
    pub fn from_spec(spec: &ModelSpec) -> Self {
        let defaults = Self::for_model(&spec.name);
        let tokens = |value: Option<i64>| value.and_then(|v| u32::try_from(v).ok());
        EstimateOptions {
            tokenizer: spec
                .tokenizer
                .as_deref()
                .and_then(Tokenizer::from_name)
                .unwrap_or(defaults.tokenizer),
            image_tokens: tokens(spec.image_tokens),
            audio_tokens: tokens(spec.audio_tokens),
            file_tokens: tokens(spec.file_tokens),
            ..defaults
        }
    }

    /// The options of `model` (a name or an alias) in `policy`'s price table, or its
    /// name's defaults when the table does not have it (the engine will then refuse
    /// the request anyway).
    #[must_use]
    pub fn from_policy(policy: &Policy, model: &str) -> Self {
        policy
            .document()
            .models
            .iter()
            .find(|spec| spec.name == model || spec.aliases.iter().any(|a| a == model))
            .map_or_else(|| Self::for_model(model), Self::from_spec)
    }
}

/// One body's estimate: input tokens and the output worst case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Estimate {
    /// Input tokens, counted with the model's encoding (saturated at `u32::MAX`).
    pub input_tokens: u32,
    /// The body's limit on each output (`Some(0)` for embeddings); `None` when it set
    /// none, so the policy's default is held.
    pub max_output_tokens: Option<u32>,
    /// Outputs asked for (`n`; `max(n, best_of)` for legacy completions), at least 1.
    pub outputs: u32,
}

impl Estimate {
    /// The request to admit for `model` on behalf of `credential`.
    pub fn request<'a>(&self, credential: Credential<'a>, model: &'a str) -> Request<'a> {
        let request = Request::new(credential, model)
            .input_tokens(self.input_tokens)
            .outputs(self.outputs);
        match self.max_output_tokens {
            Some(max) => request.max_output_tokens(max),
            None => request,
        }
    }
}

/// Estimate `body` as a request to `endpoint`.
pub fn estimate(
    endpoint: Endpoint,
    body: &Value,
    options: &EstimateOptions,
) -> Result<Estimate, ShapeError> {
    match endpoint {
        Endpoint::ChatCompletions => estimate_chat(body, options),
        Endpoint::Responses => estimate_responses(body, options),
        Endpoint::Embeddings => estimate_embeddings(body, options),
        Endpoint::Completions => estimate_completions(body, options),
    }
}

/// Cap each output of a body about to be forwarded at `per_output` tokens, when the
/// client set no limit of its own: the provider then cannot produce more than was held.
/// `held_output_tokens` is what the reservation holds for all outputs (e.g.
/// `reservation.reserved_tokens().1`); it is divided by the estimate's outputs.
/// Returns the limit each output now has (the client's, or the one set), `None` for
/// embeddings.
///
/// ```
/// use serde_json::json;
/// use tollgate::openai::{cap_output, estimate_chat, Endpoint, EstimateOptions};
/// let mut body = json!({"n": 2, "messages": [{"role": "user", "content": "Hi"}]});
/// let estimate = estimate_chat(&body, &EstimateOptions::for_model("gpt-4o"))?;
/// // The policy's default of 1024 was held for each of the 2 outputs.
/// assert_eq!(cap_output(&mut body, Endpoint::ChatCompletions, &estimate, 2048), Some(1024));
/// assert_eq!(body["max_completion_tokens"], 1024);
/// # Ok::<(), tollgate::openai::ShapeError>(())
/// ```
pub fn cap_output(
    body: &mut Value,
    endpoint: Endpoint,
    estimate: &Estimate,
    held_output_tokens: u64,
) -> Option<u32> {
    let field = endpoint.output_limit_field()?;
    if let Some(max) = estimate.max_output_tokens {
        // Legacy completions without `max_tokens` were held at OpenAI's default (16);
        // an OpenAI-compatible upstream may default higher, so the default is sent.
        if endpoint == Endpoint::Completions {
            if let Some(object) = body.as_object_mut() {
                if matches!(object.get(field), None | Some(Value::Null)) {
                    object.insert(field.to_owned(), Value::from(max));
                }
            }
        }
        return Some(max);
    }
    let per_output = held_output_tokens / u64::from(estimate.outputs.max(1));
    let per_output = u32::try_from(per_output).unwrap_or(u32::MAX);
    if let Some(object) = body.as_object_mut() {
        object.insert(field.to_owned(), Value::from(per_output));
    }
    Some(per_output)
}
