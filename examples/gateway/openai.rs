//! The OpenAI-compatible routes: chat completions, embeddings, models.
//!
//! Per request: authenticate by bearer key, estimate input tokens, `check_and_reserve`,
//! call the provider, `commit_usage` with what it reports. A provider error drops the
//! reservation, which gives everything back. Every response carries the rate-limit
//! headers; a denial is an OpenAI-style JSON error with its status and `Retry-After`.
//!
//! An answer is delivered exactly when it is charged. A commit that Redis did not
//! acknowledge (a timeout, a failover) still returns a receipt, marked pending: it is
//! queued and charged once when Redis answers, so the answer is delivered, with
//! `"x_tollgate": {"commit": "pending"}`. Only a commit Redis refused for good (corrupt
//! data at its keys) is an error: nothing is charged, and the client gets a 503.
//!
//! A streamed chat completion (`"stream": true`) answers server-sent events in
//! OpenAI's format, the rate-limit headers on the response head. Its reservation is
//! held while it streams and committed at the end with the provider's usage. A client
//! that hangs up mid-stream is charged its prompt and the chunks it was sent, and the
//! rest is given back; a provider that fails before the first chunk costs nothing.
//!
//! Embeddings reserve their input tokens and no output, and are charged the input
//! tokens the provider counts.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request as HttpRequest, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tollgate::{Receipt, Request, Usage};

use crate::app::App;
use crate::backend::Held;
use crate::http::{add_headers, bearer, denied, error, json_reply, missing_key, read_json, Reply};
use crate::provider::{Chat, Event, ProviderError, TokenStream};
use crate::requests::Trace;

pub async fn models(app: &App, request: &HttpRequest<Incoming>) -> Reply {
    let trace = Trace::of(request);
    let Some(secret) = bearer(request) else {
        return missing_key();
    };
    let policy = app.backend.policy();
    let mut models = Vec::new();
    for model in &policy.document().models {
        // A model is listed if this key may call it right now.
        let probe = Request::with_secret(secret, &model.name).max_output_tokens(0);
        let listed = match app.backend.check_and_reserve(&probe).await {
            Ok(held) => {
                let (key, workspace) = held.owner();
                trace.admitted(key, workspace);
                true // `held` is dropped: gives its hold back
            }
            // An unknown, revoked or expired key is refused whatever the model.
            Err(denial) if denial.http_status() == 401 => {
                trace.denied(&denial, secret, &policy);
                return denied(&denial);
            }
            Err(denial) => denial.is_rate_limit(),
        };
        if listed {
            models.push(json!({"id": model.name, "object": "model", "owned_by": "tollgate-demo"}));
        }
    }
    json_reply(StatusCode::OK, &json!({"object": "list", "data": models}))
}

/// The caller's bearer key and the request's JSON body, or the error to answer with.
async fn authenticated_body(
    app: &App,
    request: HttpRequest<Incoming>,
) -> Result<(String, Value), Reply> {
    let secret = bearer(&request)
        .map(str::to_owned)
        .ok_or_else(missing_key)?;
    Ok((secret, read_json(request, app.limits.body_timeout).await?))
}

/// The body's `model`, required by every OpenAI route that takes a body.
// The error is the reply itself, as `read_json`'s is: boxing it would only add a step.
#[allow(clippy::result_large_err)]
fn required_model(body: &Value) -> Result<&str, Reply> {
    body["model"].as_str().ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "`model` is required",
        )
    })
}

pub async fn chat(app: &Arc<App>, request: HttpRequest<Incoming>) -> Reply {
    let trace = Trace::of(&request);
    let (secret, body) = match authenticated_body(app, request).await {
        Ok(read) => read,
        Err(reply) => return reply,
    };
    let model = match required_model(&body) {
        Ok(model) => model,
        Err(reply) => return reply,
    };
    trace.model(model);
    let max_tokens = body["max_tokens"]
        .as_u64()
        .or_else(|| body["max_completion_tokens"].as_u64())
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    let prompt_tokens = estimate_prompt_tokens(&body["messages"]);

    let mut ask = Request::with_secret(&secret, model).input_tokens(prompt_tokens);
    if let Some(max) = max_tokens {
        ask = ask.max_output_tokens(max);
    }
    let held = match reserve(app, &ask, &trace).await {
        Ok(held) => held,
        Err(reply) => return reply,
    };
    let headers = held.headers();
    let call = Chat {
        body: &body,
        model,
        prompt_tokens,
        max_tokens,
    };
    if body["stream"].as_bool() == Some(true) {
        let include_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
        trace.streaming();
        let mut reply = match stream_chat(app, held, &call, include_usage, trace).await {
            Ok(reply) => reply,
            Err(reply) => return reply,
        };
        add_headers(&mut reply, &headers);
        return reply;
    }
    let answer = match app.provider.complete(&call).await {
        Ok(answer) => answer,
        // `held` is dropped on the way out: the request is not charged.
        Err(failure) => return provider_failed(&failure),
    };
    let usage = Usage::new(answer.prompt_tokens, answer.completion_tokens);
    let receipt = match app.backend.commit_usage(held, usage).await {
        Ok(receipt) => receipted(receipt, "chat completion"),
        Err(err) => return store_failed(&err),
    };
    trace.charged(&receipt);
    let mut body = answer.body;
    body["usage"] = usage_json(&receipt);
    body["x_tollgate"] = tollgate_json(&receipt);
    let mut reply = json_reply(StatusCode::OK, &body);
    add_headers(&mut reply, &headers);
    reply
}

/// A streamed chat completion as server-sent events. The provider's first event is
/// awaited before answering, so a provider that fails at once is a 502 and the hold is
/// dropped (nothing charged); after that the stream is pumped by its own task, which
/// holds the reservation until it commits.
async fn stream_chat(
    app: &Arc<App>,
    held: Held,
    call: &Chat<'_>,
    include_usage: bool,
    trace: Trace,
) -> Result<Reply, Reply> {
    let mut stream = app
        .provider
        .stream(call)
        .await
        .map_err(|e| provider_failed(&e))?;
    let first = match stream.next().await {
        Some(Ok(event)) => event,
        Some(Err(failure)) => return Err(provider_failed(&failure)),
        None => {
            return Err(provider_failed(&ProviderError::failed(
                "the provider's stream was empty",
            )))
        }
    };
    let (tx, rx) = mpsc::channel(8);
    let delivered = Arc::new(AtomicU32::new(0));
    let pump = Pump {
        app: Arc::clone(app),
        tx,
        delivered: Arc::clone(&delivered),
        prompt_tokens: call.prompt_tokens,
        include_usage,
        trace,
    };
    tokio::spawn(pump.run(held, stream, first));
    let mut reply = Response::new(SseBody { rx, delivered }.boxed());
    let headers = reply.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(reply)
}

/// One server-sent event for the client; `token` when it carries generated output.
struct Sse {
    data: Bytes,
    token: bool,
}

impl Sse {
    fn json(value: &Value, token: bool) -> Self {
        Sse {
            data: Bytes::from(format!("data: {value}\n\n")),
            token,
        }
    }
}

/// The response body of a stream: the events the pump sends, in order. Counts the
/// output chunks it hands to the connection, so a client that hangs up is charged for
/// exactly those. Dropped when the client goes, which the pump sees.
struct SseBody {
    rx: mpsc::Receiver<Sse>,
    delivered: Arc<AtomicU32>,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                if event.token {
                    self.delivered.fetch_add(1, Ordering::SeqCst);
                }
                Poll::Ready(Some(Ok(Frame::data(event.data))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Moves a provider's stream to the client and charges for it.
struct Pump {
    app: Arc<App>,
    tx: mpsc::Sender<Sse>,
    delivered: Arc<AtomicU32>,
    prompt_tokens: u32,
    include_usage: bool,
    /// The request's log line, written once this pump has committed and is dropped.
    trace: Trace,
}

/// How a stream ended.
enum End {
    /// The provider finished.
    Complete,
    /// The provider failed part way.
    Failed(ProviderError),
    /// The client went away.
    Gone,
}

impl Pump {
    async fn run(self, held: Held, mut stream: TokenStream, first: Event) {
        let mut reported: Option<Usage> = None;
        let mut produced: u32 = 0;
        // id, created and model of the last chunk, for the usage chunk.
        let mut last = json!({});
        let mut next = Some(Some(Ok(first)));
        let end = loop {
            let event = match next.take() {
                Some(event) => event,
                None => tokio::select! {
                    biased;
                    () = self.tx.closed() => break End::Gone,
                    event = stream.next() => event,
                },
            };
            match event {
                None => break End::Complete,
                Some(Err(failure)) => break End::Failed(failure),
                Some(Ok(Event::Usage(usage))) => reported = Some(usage),
                Some(Ok(Event::Chunk { mut chunk, token })) => {
                    for field in ["id", "created", "model"] {
                        last[field] = chunk[field].clone();
                    }
                    if self.include_usage {
                        chunk["usage"] = Value::Null;
                    }
                    if self.tx.send(Sse::json(&chunk, token)).await.is_err() {
                        break End::Gone;
                    }
                    produced += u32::from(token);
                }
            }
        };
        let usage = match (&end, reported) {
            (End::Complete, Some(usage)) => usage,
            (End::Complete | End::Failed(_), _) => Usage::new(self.prompt_tokens, produced),
            // What reached the client: the body counted it before it was dropped.
            (End::Gone, _) => Usage::new(self.prompt_tokens, self.delivered.load(Ordering::SeqCst)),
        };
        let receipt = match self.app.backend.commit_usage(held, usage).await {
            Ok(receipt) => {
                self.trace.charged(&receipt);
                Some(receipted(receipt, "streamed completion"))
            }
            Err(err) => {
                eprintln!("streamed completion: could not commit {usage:?}: {err}");
                None
            }
        };
        match end {
            End::Gone => {}
            End::Failed(failure) => {
                let kind = json!({"error": {
                    "message": failure.message,
                    "type": "server_error",
                    "code": "provider_error",
                }});
                let _ = self.tx.send(Sse::json(&kind, false)).await;
            }
            End::Complete => {
                if self.include_usage {
                    let mut chunk = last;
                    chunk["object"] = json!("chat.completion.chunk");
                    chunk["choices"] = json!([]);
                    chunk["usage"] = match &receipt {
                        Some(receipt) => usage_json(receipt),
                        None => json!({
                            "prompt_tokens": usage.input_tokens,
                            "completion_tokens": usage.output_tokens,
                            "total_tokens": usage.input_tokens + usage.output_tokens,
                        }),
                    };
                    if let Some(receipt) = &receipt {
                        chunk["x_tollgate"] = tollgate_json(receipt);
                    }
                    let _ = self.tx.send(Sse::json(&chunk, false)).await;
                }
                let done = Sse {
                    data: Bytes::from_static(b"data: [DONE]\n\n"),
                    token: false,
                };
                let _ = self.tx.send(done).await;
            }
        }
    }
}

pub async fn embeddings(app: &App, request: HttpRequest<Incoming>) -> Reply {
    let trace = Trace::of(&request);
    let (secret, body) = match authenticated_body(app, request).await {
        Ok(read) => read,
        Err(reply) => return reply,
    };
    let model = match required_model(&body) {
        Ok(model) => model,
        Err(reply) => return reply,
    };
    trace.model(model);
    let Some(input_tokens) = estimate_input_tokens(&body["input"]) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "`input` must be a non-empty string, array of strings, or array of token arrays",
        );
    };
    let ask = Request::with_secret(&secret, model)
        .input_tokens(input_tokens)
        .max_output_tokens(0);
    let held = match reserve(app, &ask, &trace).await {
        Ok(held) => held,
        Err(reply) => return reply,
    };
    let headers = held.headers();
    let answer = match app.provider.embed(&body, model, input_tokens).await {
        Ok(answer) => answer,
        Err(failure) => return provider_failed(&failure),
    };
    let receipt = match app
        .backend
        .commit_usage(held, Usage::new(answer.prompt_tokens, 0))
        .await
    {
        Ok(receipt) => receipted(receipt, "embeddings"),
        Err(err) => return store_failed(&err),
    };
    trace.charged(&receipt);
    let mut body = answer.body;
    body["usage"] = json!({
        "prompt_tokens": receipt.input_tokens(),
        "total_tokens": receipt.input_tokens(),
    });
    body["x_tollgate"] = tollgate_json(&receipt);
    let mut reply = json_reply(StatusCode::OK, &body);
    add_headers(&mut reply, &headers);
    reply
}

/// `check_and_reserve`, with the outcome noted in the request's log line; a denial
/// is the reply to send.
async fn reserve(app: &App, ask: &Request<'_>, trace: &Trace) -> Result<Held, Reply> {
    match app.backend.check_and_reserve(ask).await {
        Ok(held) => {
            let (key, workspace) = held.owner();
            trace.admitted(key, workspace);
            Ok(held)
        }
        Err(denial) => {
            let secret = match ask.credential {
                tollgate::Credential::Secret(secret) => secret,
                _ => "",
            };
            trace.denied(&denial, secret, &app.backend.policy());
            Err(denied(&denial))
        }
    }
}

/// A commit's receipt, logged when it is pending (Redis has not acknowledged it: it
/// is queued and charged once when Redis answers). Pending or not, the answer goes out.
fn receipted(receipt: Receipt, what: &str) -> Receipt {
    if receipt.is_pending() {
        eprintln!("{what}: commit pending (Redis did not answer), queued for replay: {receipt:?}");
    }
    receipt
}

/// The `x_tollgate` extension of an answer: its cost, and `"commit": "pending"` when
/// the store has not acknowledged the charge yet.
fn tollgate_json(receipt: &Receipt) -> Value {
    let mut extension = json!({"cost_usd": receipt.cost().to_string()});
    if receipt.is_pending() {
        extension["commit"] = json!("pending");
    }
    extension
}

fn usage_json(receipt: &Receipt) -> Value {
    json!({
        "prompt_tokens": receipt.input_tokens(),
        "completion_tokens": receipt.output_tokens(),
        "total_tokens": receipt.input_tokens() + receipt.output_tokens(),
    })
}

/// A provider that did not answer: its refusal of the request as it gave it, or 502.
fn provider_failed(failure: &ProviderError) -> Reply {
    match &failure.rejected {
        Some((status, body)) => json_reply(*status, body),
        None => error(StatusCode::BAD_GATEWAY, "provider_error", &failure.message),
    }
}

/// A commit the store refused for good: the usage could not be recorded, so the
/// answer is not delivered either.
fn store_failed(err: &tollgate::Error) -> Reply {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        &err.to_string(),
    )
}

/// Input tokens of an embeddings `input`: about four characters a token for text, the
/// count for token arrays. `None` when it is missing, empty, or not one of OpenAI's
/// shapes.
pub fn estimate_input_tokens(input: &Value) -> Option<u32> {
    fn text(s: &str) -> Option<usize> {
        (!s.is_empty()).then(|| s.len().div_ceil(4))
    }
    fn token_ids(items: &[Value]) -> Option<usize> {
        (!items.is_empty() && items.iter().all(Value::is_u64)).then_some(items.len())
    }
    let tokens = match input {
        Value::String(s) => text(s)?,
        Value::Array(items) if items.is_empty() => return None,
        Value::Array(items) if items[0].is_u64() => token_ids(items)?,
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => text(s),
                Value::Array(ids) => token_ids(ids),
                _ => None,
            })
            .sum::<Option<usize>>()?,
        _ => return None,
    };
    Some(u32::try_from(tokens).unwrap_or(u32::MAX))
}

/// About four characters per token, plus a few per message for the chat framing: an
/// over-estimate is refunded at commit, an under-estimate is charged as debt.
pub fn estimate_prompt_tokens(messages: &Value) -> u32 {
    let Some(messages) = messages.as_array() else {
        return 0;
    };
    let tokens: usize = messages
        .iter()
        .map(|message| 4 + message["content"].as_str().map_or(0, str::len).div_ceil(4))
        .sum();
    u32::try_from(tokens).unwrap_or(u32::MAX)
}
