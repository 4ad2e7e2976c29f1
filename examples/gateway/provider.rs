//! Model providers: the built-in mock (the only mock tollgate ships: deterministic
//! answers and token counts, so the gateway runs with no account and no network, and
//! tests know what to expect), and a real OpenAI-compatible upstream (`--upstream URL`)
//! reached over plain HTTP.
//!
//! A provider answers a chat completion whole ([`Provider::complete`]) or as a stream
//! of OpenAI `chat.completion.chunk` objects ([`Provider::stream`]), and embeddings
//! ([`Provider::embed`]). Each reports the usage it counted; the routes charge that.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate::openai::Endpoint;
use tollgate::Usage;

/// One generation to answer: a chat completion, a Responses API response or a legacy
/// completion (`endpoint`).
pub struct Chat<'a> {
    pub endpoint: Endpoint,
    /// The client's request body, as sent (with the output cap the gateway set).
    pub body: &'a Value,
    pub model: &'a str,
    /// The gateway's estimate of the prompt's tokens.
    pub prompt_tokens: u32,
    pub max_tokens: Option<u32>,
}

/// A whole chat completion: the OpenAI `chat.completion` object and its usage.
pub struct Completion {
    pub body: Value,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// Embeddings: the OpenAI `list` object and the input tokens counted.
pub struct Embeddings {
    pub body: Value,
    pub prompt_tokens: u32,
}

/// Why a provider did not answer.
#[derive(Debug)]
pub struct ProviderError {
    pub message: String,
    /// An upstream refusal of the request itself (400, 404, 422...), to pass on to the
    /// client as it came: its status and JSON body.
    pub rejected: Option<(StatusCode, Value)>,
}

impl ProviderError {
    pub fn failed(message: impl Into<String>) -> Self {
        ProviderError {
            message: message.into(),
            rejected: None,
        }
    }
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// One thing a streamed completion produces.
#[derive(Debug)]
pub enum Event {
    /// An OpenAI `chat.completion.chunk` to pass on (without its `usage` field);
    /// `token` when it carries generated output (content, a refusal, a tool call),
    /// which the mock streams one token per chunk.
    Chunk { chunk: Value, token: bool },
    /// The provider's count for the whole completion.
    Usage(Usage),
}

/// Where completions come from.
pub enum Provider {
    Mock(MockProvider),
    Upstream(UpstreamProvider),
}

impl Provider {
    /// What the startup banner calls it.
    pub fn describe(&self) -> String {
        match self {
            Provider::Mock(_) => "mock provider".into(),
            Provider::Upstream(upstream) => format!("upstream {}", upstream.base),
        }
    }

    pub async fn complete(&self, call: &Chat<'_>) -> Result<Completion, ProviderError> {
        match self {
            Provider::Mock(mock) => mock.complete(call).await,
            Provider::Upstream(upstream) => upstream.complete(call).await,
        }
    }

    /// Start a streamed completion. An error here comes before any output.
    pub async fn stream(&self, call: &Chat<'_>) -> Result<TokenStream, ProviderError> {
        match self {
            Provider::Mock(mock) => mock.stream(call),
            Provider::Upstream(upstream) => upstream.stream(call).await,
        }
    }

    pub async fn embed(
        &self,
        body: &Value,
        model: &str,
        input_tokens: u32,
    ) -> Result<Embeddings, ProviderError> {
        match self {
            Provider::Mock(mock) => Ok(mock.embed(body, model, input_tokens).await),
            Provider::Upstream(upstream) => upstream.embed(body, input_tokens).await,
        }
    }
}

/// A streamed completion, read with [`TokenStream::next`].
pub struct TokenStream {
    source: Source,
}

enum Source {
    Mock(MockStream),
    Upstream(UpstreamStream),
}

impl TokenStream {
    /// The next event; `None` once the completion is complete. An error ends it.
    pub async fn next(&mut self) -> Option<Result<Event, ProviderError>> {
        match &mut self.source {
            Source::Mock(mock) => mock.next().await.map(Ok),
            Source::Upstream(upstream) => upstream.next().await,
        }
    }
}

/// A fresh completion id and creation time (Unix seconds), OpenAI style.
pub fn completion_id() -> (String, u64) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (format!("chatcmpl-{created:x}{n:06x}"), created)
}

// ---------------------------------------------------------------------------------
// The mock

/// Answers every chat completion with as many words ("mock") as the reply is long,
/// one token per word, and embeds every input as 8 numbers derived from its text.
pub struct MockProvider {
    /// The whole answer's latency, like a real model's: a whole answer (and
    /// embeddings) comes after it; a streamed one spreads it over its chunks, each
    /// after `delay / chunks`.
    pub delay: Duration,
}

/// Replies are at most this many tokens, fewer when `max_tokens` is lower.
pub const REPLY_TOKENS: u32 = 40;

/// A chat whose messages contain this fails in the mock before any output, as a
/// provider outage would (for tests and demos of the release path).
pub const MOCK_FAILURE: &str = "[mock:fail]";

/// Numbers per mock embedding.
pub const MOCK_DIMENSIONS: usize = 8;

impl MockProvider {
    fn reply_tokens(max_tokens: Option<u32>) -> (u32, &'static str) {
        match max_tokens {
            Some(max) if max < REPLY_TOKENS => (max, "length"),
            _ => (REPLY_TOKENS, "stop"),
        }
    }

    fn check(call: &Chat<'_>) -> Result<(), ProviderError> {
        let fails = call.body["messages"].as_array().is_some_and(|messages| {
            messages.iter().any(|m| {
                m["content"]
                    .as_str()
                    .is_some_and(|c| c.contains(MOCK_FAILURE))
            })
        });
        if fails {
            return Err(ProviderError::failed("the mock provider failed, as asked"));
        }
        Ok(())
    }

    pub async fn complete(&self, call: &Chat<'_>) -> Result<Completion, ProviderError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Self::check(call)?;
        let (completion_tokens, finish_reason) = Self::reply_tokens(call.max_tokens);
        let words: Vec<&str> = (0..completion_tokens).map(|_| "mock").collect();
        let (id, created) = completion_id();
        let body = match call.endpoint {
            Endpoint::Responses => json!({
                "id": id.replace("chatcmpl-", "resp_"),
                "object": "response",
                "created_at": created,
                "model": call.model,
                "status": "completed",
                "output": [{
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": words.join(" ")}],
                }],
                "usage": {
                    "input_tokens": call.prompt_tokens,
                    "output_tokens": completion_tokens,
                    "total_tokens": call.prompt_tokens + completion_tokens,
                },
            }),
            Endpoint::Completions => json!({
                "id": id.replace("chatcmpl-", "cmpl-"),
                "object": "text_completion",
                "created": created,
                "model": call.model,
                "choices": [{"index": 0, "text": words.join(" "), "finish_reason": finish_reason}],
                "usage": {
                    "prompt_tokens": call.prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": call.prompt_tokens + completion_tokens,
                },
            }),
            Endpoint::ChatCompletions | Endpoint::Embeddings => json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": call.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": words.join(" ")},
                    "finish_reason": finish_reason,
                }],
                "usage": {
                    "prompt_tokens": call.prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": call.prompt_tokens + completion_tokens,
                },
            }),
        };
        Ok(Completion {
            body,
            prompt_tokens: call.prompt_tokens,
            completion_tokens,
        })
    }

    /// The same answer as [`MockProvider::complete`], one token per chunk: "mock ",
    /// ..., "mock" (their concatenation is the whole answer's text), then a chunk
    /// with the finish reason, then the usage.
    pub fn stream(&self, call: &Chat<'_>) -> Result<TokenStream, ProviderError> {
        Self::check(call)?;
        let (tokens, finish_reason) = Self::reply_tokens(call.max_tokens);
        let (id, created) = completion_id();
        Ok(TokenStream {
            source: Source::Mock(MockStream {
                id,
                created,
                model: call.model.to_owned(),
                prompt_tokens: call.prompt_tokens,
                tokens,
                sent: 0,
                per_chunk: self.delay / tokens.max(1),
                finish_reason,
                step: MockStep::Tokens,
            }),
        })
    }

    pub async fn embed(&self, body: &Value, model: &str, input_tokens: u32) -> Embeddings {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let inputs: Vec<String> = match &body["input"] {
            Value::Array(items) if !items.iter().all(Value::is_number) => {
                items.iter().map(text_of).collect()
            }
            other => vec![text_of(other)],
        };
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(index, text)| {
                json!({"object": "embedding", "index": index, "embedding": mock_vector(text)})
            })
            .collect();
        Embeddings {
            body: json!({
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": input_tokens, "total_tokens": input_tokens},
            }),
            prompt_tokens: input_tokens,
        }
    }
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `MOCK_DIMENSIONS` numbers in [-1, 1) from the text's FNV-1a hash: the same text
/// always embeds the same. Multiples of 1/128, so they survive JSON exactly.
pub fn mock_vector(text: &str) -> Vec<f64> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash.to_le_bytes()
        .iter()
        .take(MOCK_DIMENSIONS)
        .map(|&b| f64::from(i8::from_le_bytes([b])) / 128.0)
        .collect()
}

struct MockStream {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: u32,
    tokens: u32,
    sent: u32,
    per_chunk: Duration,
    finish_reason: &'static str,
    step: MockStep,
}

#[derive(Clone, Copy)]
enum MockStep {
    Tokens,
    Usage,
    Done,
}

impl MockStream {
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    }

    async fn next(&mut self) -> Option<Event> {
        match self.step {
            MockStep::Tokens if self.sent < self.tokens => {
                if !self.per_chunk.is_zero() {
                    tokio::time::sleep(self.per_chunk).await;
                }
                self.sent += 1;
                let word = if self.sent == self.tokens {
                    "mock"
                } else {
                    "mock "
                };
                let delta = if self.sent == 1 {
                    json!({"role": "assistant", "content": word})
                } else {
                    json!({"content": word})
                };
                Some(Event::Chunk {
                    chunk: self.chunk(delta, None),
                    token: true,
                })
            }
            MockStep::Tokens => {
                self.step = MockStep::Usage;
                let delta = if self.tokens == 0 {
                    json!({"role": "assistant", "content": ""})
                } else {
                    json!({})
                };
                Some(Event::Chunk {
                    chunk: self.chunk(delta, Some(self.finish_reason)),
                    token: false,
                })
            }
            MockStep::Usage => {
                self.step = MockStep::Done;
                Some(Event::Usage(Usage::new(self.prompt_tokens, self.tokens)))
            }
            MockStep::Done => None,
        }
    }
}

// ---------------------------------------------------------------------------------
// A real upstream

/// How long an upstream may take to answer, or between two chunks of a stream.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(300);

/// The most of an upstream answer (or error) read whole.
const MAX_UPSTREAM_BODY: usize = 64 << 20;

/// An OpenAI-compatible provider over plain HTTP (no TLS connector in this example:
/// for an `https://` provider, put a local TLS-terminating proxy in front of it).
/// Requests go on as the client sent them, with the upstream's key instead of the
/// client's; usage is what the upstream reports.
pub struct UpstreamProvider {
    /// Base URL the API paths are appended to, e.g. `http://127.0.0.1:11434/v1`.
    pub base: String,
    key: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl UpstreamProvider {
    /// `url` is the provider's base URL as OpenAI's SDKs take it
    /// (`http://host:port/v1`); a bare `http://host:port` gets `/v1`. `key` is sent as
    /// `Authorization: Bearer KEY`.
    pub fn new(url: &str, key: Option<String>) -> Result<Self, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("--upstream {url}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "--upstream {url}: this example speaks plain HTTP only (no TLS crate); \
                     use a local TLS-terminating proxy"
                ))
            }
            _ => {
                return Err(format!(
                    "--upstream {url}: expected http://HOST[:PORT][/PATH]"
                ))
            }
        }
        if uri.host().is_none() {
            return Err(format!("--upstream {url}: no host"));
        }
        let mut base = url.trim_end_matches('/').to_owned();
        if matches!(uri.path(), "" | "/") {
            base.push_str("/v1");
        }
        if let Some(key) = &key {
            HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| "UPSTREAM_API_KEY is not a valid header value".to_owned())?;
        }
        Ok(UpstreamProvider {
            base,
            key,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// POST `body` to `path`; a non-success answer is an error.
    async fn post(&self, path: &str, body: &Value) -> Result<Response<Incoming>, ProviderError> {
        let mut request = hyper::Request::post(format!("{}{path}", self.base))
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream");
        if let Some(key) = &self.key {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| ProviderError::failed(format!("bad upstream request: {e}")))?;
        let response = tokio::time::timeout(UPSTREAM_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| ProviderError::failed("the upstream did not answer in time"))?
            .map_err(|e| ProviderError::failed(format!("the upstream is unreachable: {e}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = read_whole(response).await.unwrap_or(Value::Null);
        let message = format!("the upstream answered {status}");
        // The client's own mistakes go back to it as the upstream put them; the
        // upstream's failures, and refusals of the gateway's key, are a bad gateway.
        let passes = status.is_client_error()
            && !matches!(status.as_u16(), 401 | 403 | 407 | 429)
            && body.is_object();
        Err(ProviderError {
            message,
            rejected: passes.then_some((status, body)),
        })
    }

    async fn complete(&self, call: &Chat<'_>) -> Result<Completion, ProviderError> {
        let (path, input, output) = match call.endpoint {
            Endpoint::Responses => ("/responses", "input_tokens", "output_tokens"),
            Endpoint::Completions => ("/completions", "prompt_tokens", "completion_tokens"),
            Endpoint::ChatCompletions | Endpoint::Embeddings => {
                ("/chat/completions", "prompt_tokens", "completion_tokens")
            }
        };
        let response = self.post(path, call.body).await?;
        let body = tokio::time::timeout(UPSTREAM_TIMEOUT, read_whole(response))
            .await
            .map_err(|_| ProviderError::failed("the upstream did not answer in time"))??;
        let usage = &body["usage"];
        let prompt_tokens = count(&usage[input]).unwrap_or(call.prompt_tokens);
        let completion_tokens = count(&usage[output]).unwrap_or_else(|| {
            // No usage reported: about four characters a token of the first answer.
            let text = body["choices"][0]["message"]["content"]
                .as_str()
                .or(body["choices"][0]["text"].as_str())
                .or(body["output"][0]["content"][0]["text"].as_str());
            u32::try_from(text.map_or(0, str::len).div_ceil(4)).unwrap_or(u32::MAX)
        });
        Ok(Completion {
            body,
            prompt_tokens,
            completion_tokens,
        })
    }

    async fn stream(&self, call: &Chat<'_>) -> Result<TokenStream, ProviderError> {
        // Always ask for the usage chunk: it is what the request is charged.
        let mut body = call.body.clone();
        body["stream"] = json!(true);
        if !body["stream_options"].is_object() {
            body["stream_options"] = json!({});
        }
        body["stream_options"]["include_usage"] = json!(true);
        let response = self.post("/chat/completions", &body).await?;
        Ok(TokenStream {
            source: Source::Upstream(UpstreamStream {
                body: response.into_body(),
                parser: SseParser::default(),
                pending: VecDeque::new(),
                done: false,
                error: None,
                finished: false,
            }),
        })
    }

    async fn embed(&self, body: &Value, input_tokens: u32) -> Result<Embeddings, ProviderError> {
        let response = self.post("/embeddings", body).await?;
        let body = tokio::time::timeout(UPSTREAM_TIMEOUT, read_whole(response))
            .await
            .map_err(|_| ProviderError::failed("the upstream did not answer in time"))??;
        let prompt_tokens = count(&body["usage"]["prompt_tokens"]).unwrap_or(input_tokens);
        Ok(Embeddings {
            body,
            prompt_tokens,
        })
    }
}

fn count(value: &Value) -> Option<u32> {
    value.as_u64().map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

async fn read_whole(response: Response<Incoming>) -> Result<Value, ProviderError> {
    let bytes = Limited::new(response.into_body(), MAX_UPSTREAM_BODY)
        .collect()
        .await
        .map_err(|e| ProviderError::failed(format!("reading the upstream's answer: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|_| ProviderError::failed("the upstream's answer is not JSON"))
}

/// An upstream's server-sent events, as [`Event`]s.
struct UpstreamStream {
    body: Incoming,
    parser: SseParser,
    pending: VecDeque<Event>,
    /// `[DONE]` seen, the body ended, or an error returned.
    done: bool,
    /// The error to end with once `pending` is passed on.
    error: Option<ProviderError>,
    /// A finish reason or the usage seen: the completion is whole even if `[DONE]`
    /// never comes.
    finished: bool,
}

impl UpstreamStream {
    async fn next(&mut self) -> Option<Result<Event, ProviderError>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if let Some(error) = self.error.take() {
                self.done = true;
                return Some(Err(error));
            }
            if self.done {
                return None;
            }
            match tokio::time::timeout(UPSTREAM_TIMEOUT, self.body.frame()).await {
                Err(_) => self.fail("the upstream's stream stalled"),
                Ok(None) => {
                    for data in self.parser.finish() {
                        self.event(&data);
                    }
                    if !self.done && !self.finished {
                        self.fail("the upstream's stream ended before the completion did");
                    }
                    self.done = true;
                }
                Ok(Some(Err(e))) => self.fail(format!("reading the upstream's stream: {e}")),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        for data in self.parser.feed(&data) {
                            self.event(&data);
                        }
                    }
                }
            }
        }
    }

    /// End with an error once what came before it is passed on.
    fn fail(&mut self, message: impl Into<String>) {
        if self.error.is_none() && !self.done {
            self.error = Some(ProviderError::failed(message));
        }
    }

    /// One event's `data`, queued as what it means.
    fn event(&mut self, data: &str) {
        if self.done || self.error.is_some() {
            return; // nothing counts after [DONE] or an error
        }
        if data.trim() == "[DONE]" {
            self.done = true;
            return;
        }
        let Ok(mut chunk) = serde_json::from_str::<Value>(data) else {
            return self.fail("the upstream streamed something not JSON");
        };
        if let Some(error) = chunk.get("error") {
            let message = error["message"].as_str().unwrap_or("no message");
            return self.fail(format!("the upstream failed mid-stream: {message}"));
        }
        let usage = chunk
            .as_object_mut()
            .and_then(|o| o.remove("usage"))
            .filter(Value::is_object);
        let choices = chunk["choices"].as_array().map_or(&[][..], Vec::as_slice);
        if !choices.is_empty() {
            let token = choices.iter().any(|choice| {
                let delta = &choice["delta"];
                delta["content"].as_str().is_some_and(|s| !s.is_empty())
                    || delta["refusal"].as_str().is_some_and(|s| !s.is_empty())
                    || delta["tool_calls"]
                        .as_array()
                        .is_some_and(|t| !t.is_empty())
            });
            if choices
                .iter()
                .any(|choice| !choice["finish_reason"].is_null())
            {
                self.finished = true;
            }
            self.pending.push_back(Event::Chunk { chunk, token });
        }
        if let Some(usage) = usage {
            self.finished = true;
            self.pending.push_back(Event::Usage(Usage::new(
                count(&usage["prompt_tokens"]).unwrap_or(0),
                count(&usage["completion_tokens"]).unwrap_or(0),
            )));
        }
    }
}

/// Splits a byte stream of server-sent events into each event's `data` (its `data:`
/// lines joined by newlines), however the bytes are cut into frames.
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    /// Take in `bytes`; return the data of every event they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(end) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[start..start + end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(value) = line.strip_prefix(b"data:") {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                self.data.push(String::from_utf8_lossy(value).into_owned());
            }
            // Other fields (event:, id:, retry:) and comments are not used.
            start += end + 1;
        }
        self.buf.drain(..start);
        events
    }

    /// The stream ended: the data of an event left without its blank line, if any.
    pub fn finish(&mut self) -> Vec<String> {
        let mut events = self.feed(b"\n");
        if !self.data.is_empty() {
            events.push(self.data.join("\n"));
            self.data.clear();
        }
        events
    }
}
