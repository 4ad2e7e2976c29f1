//! The OpenAI-compatible routes: chat completions, the Responses API and legacy
//! completions (whole answers), embeddings, models.
//!
//! Per request: authenticate by bearer key, estimate the body with
//! `tollgate::openai` (real token counts with the model's encoding, images by the tile
//! rule, `n` outputs; a bad shape is a 400 naming the field), `check_and_reserve`,
//! cap the provider's output at what was held when the client set no limit, call the
//! provider, `commit_usage` with what it reports. A provider error drops the
//! reservation, which gives everything back. Every response carries the rate-limit
//! headers; a denial is an OpenAI-style JSON error with its status and `Retry-After`.
//!
//! An answer is delivered exactly when it is charged. A commit that Redis did not
//! acknowledge (a timeout, a failover) still returns a receipt, marked pending: it is
//! queued and charged once when Redis answers, so the answer is delivered, with
//! `"x_tollgate": {"commit": "pending"}`. Only a commit Redis refused for good (corrupt
//! data at its keys) is an error: nothing is charged, and the client gets a 503.
//!
//! Work the provider did is charged: a whole (non-streamed) completion runs to its end
//! in its own task and commits what the provider reports even if the client hangs up
//! meanwhile (its RPM unit stays taken).
//!
//! A streamed chat completion (`"stream": true`) answers server-sent events in
//! OpenAI's format, the rate-limit headers on the response head. Its reservation is
//! held while it streams and committed at the end with the provider's usage. When the
//! client hangs up mid-stream the gateway stops reading (dropping the upstream request)
//! and charges the usage the provider reported, else the prompt and the output chunks
//! received so far; the rest is given back. A provider that fails before the first
//! chunk costs nothing.
//!
//! Embeddings reserve their input tokens and no output, and are charged the input
//! tokens the provider counts.
//!
//! A body's `user` field (OpenAI's end-user id) is passed on as the request's end
//! user, so a workspace's `end_user_limits` apply to each of its end users; a bad one
//! (over 256 bytes, control characters) is a 400 `invalid_end_user`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request as HttpRequest, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tollgate::openai::{self, Endpoint, EstimateOptions, ShapeError};
use tollgate::{Credential, RateLimitHeaders, Receipt, Request, Usage};

use crate::app::App;
use crate::backend::Held;
use crate::caller;
use crate::http::{
    add_headers, bearer, denied, error, json_reply, missing_key, read_json, ErrorCode, Reply,
};
use crate::provider::{Chat, Event, ProviderError, TokenStream};
use crate::requests::Trace;

/// The models the caller's key may call now, from the policy: listing them reserves
/// nothing (a probe per model would count as admitted requests in the metrics).
pub async fn models(app: &App, request: &HttpRequest<Incoming>) -> Reply {
    let trace = Trace::of(request);
    let Some(secret) = bearer(request) else {
        return missing_key();
    };
    let policy = app.backend.policy();
    let document = policy.document();
    let (key, workspace) =
        match caller::identify(document, secret, DateTime::<Utc>::from(SystemTime::now())) {
            Ok(found) => found,
            Err(refused) => return confirm_refusal(app, secret, &trace, refused).await,
        };
    trace.admitted(&key.id, &key.workspace);
    let models: Vec<Value> = caller::callable_models(document, workspace)
        .into_iter()
        .map(|name| json!({"id": name, "object": "model", "owned_by": "tollgate-demo"}))
        .collect();
    json_reply(StatusCode::OK, &json!({"object": "list", "data": models}))
}

/// The caller's bearer key and the request's JSON body, or the error to answer with.
///
/// A key the policy does not know (or has revoked, or that expired) is refused before
/// its body is read: reading and tokenizing a megabyte is work only for callers who
/// may be served.
async fn authenticated_body(
    app: &App,
    request: HttpRequest<Incoming>,
) -> Result<(String, Value), Reply> {
    let secret = bearer(&request)
        .map(str::to_owned)
        .ok_or_else(missing_key)?;
    let now = DateTime::<Utc>::from(SystemTime::now());
    if let Err(refused) = caller::identify(app.backend.policy().document(), &secret, now) {
        let trace = Trace::of(&request);
        return Err(confirm_refusal(app, &secret, &trace, refused).await);
    }
    Ok((secret, read_json(request, app.limits.body_timeout).await?))
}

/// A key the policy lookup refused, refused by the engine itself: its answer (the
/// same 401) is what the client gets, and its denial is what the metrics and the
/// request log count. Nothing is reserved: the engine turns away an unusable key
/// before any limit. Should the engine admit it after all (the lookup is only a
/// filter), the lookup's refusal stands.
async fn confirm_refusal(app: &App, secret: &str, trace: &Trace, refused: Reply) -> Reply {
    let probe = Request::with_secret(secret, "").max_output_tokens(0);
    match app.backend.check_and_reserve(&probe).await {
        Err(denial) if denial.http_status() == 401 => {
            trace.denied(&denial, secret, &app.backend.policy());
            denied(&denial)
        }
        _ => refused,
    }
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
    generate(app, request, Endpoint::ChatCompletions).await
}

/// `POST /v1/responses`: whole responses (streaming is served for chat only).
pub async fn responses(app: &Arc<App>, request: HttpRequest<Incoming>) -> Reply {
    generate(app, request, Endpoint::Responses).await
}

/// `POST /v1/completions` (legacy): whole completions.
pub async fn completions(app: &Arc<App>, request: HttpRequest<Incoming>) -> Reply {
    generate(app, request, Endpoint::Completions).await
}

/// A generation at `endpoint`: estimate, reserve, cap the output, call, commit.
async fn generate(app: &Arc<App>, request: HttpRequest<Incoming>, endpoint: Endpoint) -> Reply {
    let trace = Trace::of(&request);
    let (secret, body) = match authenticated_body(app, request).await {
        Ok(read) => read,
        Err(reply) => return reply,
    };
    let model = match required_model(&body) {
        Ok(model) => model.to_owned(),
        Err(reply) => return reply,
    };
    trace.model(&model);
    let options = EstimateOptions::from_policy(&app.backend.policy(), &model);
    let (counted, mut body) =
        off_the_workers(body, move |body| openai::estimate(endpoint, body, &options)).await;
    let estimate = match counted {
        Ok(Ok(estimate)) => estimate,
        Ok(Err(shape)) => return bad_shape(&shape),
        Err(reply) => return reply,
    };
    let stream = body["stream"].as_bool() == Some(true);
    if stream && endpoint != Endpoint::ChatCompletions {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_value",
            "this gateway streams chat completions only; send `stream: false`",
        );
    }
    let end_user = end_user_of(&body);
    let ask = with_end_user(
        estimate.request(Credential::Secret(&secret), &model),
        end_user.as_deref(),
    );
    let held = match reserve(app, &ask, &trace).await {
        Ok(held) => held,
        Err(reply) => return reply,
    };
    let headers = held.headers();
    // The provider may produce no more than was held: without a limit of the
    // client's, each output is capped at its share of the hold.
    let max_tokens = openai::cap_output(
        &mut body,
        endpoint,
        &estimate,
        held.reserved_output_tokens(),
    );
    let include_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
    let work = Work {
        endpoint,
        body,
        model,
        prompt_tokens: estimate.input_tokens,
        max_tokens,
    };
    if stream {
        trace.streaming();
        let mut reply = match stream_chat(app, held, &work.call(), include_usage, trace).await {
            Ok(reply) => reply,
            Err(reply) => return reply,
        };
        add_headers(&mut reply, &headers);
        return reply;
    }
    // Once forwarded, the call is the provider's work and is charged, even if the
    // client hangs up; the request's RPM unit stays taken with the commit.
    let task_app = Arc::clone(app);
    forwarded(app, "completion", &headers, async move {
        let reply = complete_and_commit(&task_app, held, &work.call()).await;
        // The log line is the task's to finish: it is written with the charge even
        // when the client has gone.
        if let Some(receipt) = reply.extensions().get::<Receipt>() {
            trace.charged(receipt);
        }
        reply
    })
    .await
}

/// Forwarded work (the provider's call and its commit) run to its end in a task of
/// its own, which a client that hangs up does not cancel (hyper drops the handler
/// then, not the task), and which the shutdown drain waits for. Its reply gets the
/// rate-limit headers when it succeeded.
async fn forwarded(
    app: &App,
    what: &str,
    headers: &RateLimitHeaders,
    work: impl Future<Output = Reply> + Send + 'static,
) -> Reply {
    let running = app.background.start();
    let call = tokio::spawn(async move {
        let _running = running;
        work.await
    });
    let mut reply = match call.await {
        Ok(reply) => reply,
        Err(failed) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &format!("the {what} task failed: {failed}"),
        ),
    };
    if reply.status() == StatusCode::OK {
        add_headers(&mut reply, headers);
    }
    reply
}

/// What goes to the provider, owned, so a spawned task can carry it.
struct Work {
    endpoint: Endpoint,
    body: Value,
    model: String,
    prompt_tokens: u32,
    max_tokens: Option<u32>,
}

impl Work {
    fn call(&self) -> Chat<'_> {
        Chat {
            endpoint: self.endpoint,
            body: &self.body,
            model: &self.model,
            prompt_tokens: self.prompt_tokens,
            max_tokens: self.max_tokens,
        }
    }
}

/// Call the provider for a whole completion and commit what it reports. A provider
/// that fails drops `held`, which gives everything back.
async fn complete_and_commit(app: &App, held: Held, call: &Chat<'_>) -> Reply {
    let answer = match app.provider.complete(call).await {
        Ok(answer) => answer,
        // `held` is dropped on the way out: the request is not charged.
        Err(failure) => return provider_failed(&failure),
    };
    let usage = Usage::new(answer.prompt_tokens, answer.completion_tokens);
    let receipt = match app.backend.commit_usage(held, usage).await {
        Ok(receipt) => receipted(receipt, "completion"),
        Err(err) => return store_failed(&err),
    };
    let mut body = answer.body;
    body["usage"] = match call.endpoint {
        // The Responses API names its counts differently.
        Endpoint::Responses => json!({
            "input_tokens": receipt.input_tokens(),
            "output_tokens": receipt.output_tokens(),
            "total_tokens": u64::from(receipt.input_tokens()) + u64::from(receipt.output_tokens()),
        }),
        _ => usage_json(&receipt),
    };
    body["x_tollgate"] = tollgate_json(&receipt);
    let mut reply = json_reply(StatusCode::OK, &body);
    reply.extensions_mut().insert(receipt);
    reply
}

/// Run `count` on `body` on tokio's blocking pool: tokenizing a large body takes
/// milliseconds of CPU, which would stall every request sharing an async worker.
/// The body comes back for forwarding; a panic in the counting is a 500.
async fn off_the_workers<T: Send + 'static>(
    body: Value,
    count: impl FnOnce(&Value) -> T + Send + 'static,
) -> (Result<T, Reply>, Value) {
    let counted = tokio::task::spawn_blocking(move || {
        let counted = count(&body);
        (counted, body)
    })
    .await;
    match counted {
        Ok((counted, body)) => (Ok(counted), body),
        Err(failed) => (
            Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                &format!("estimating the request failed: {failed}"),
            )),
            Value::Null,
        ),
    }
}

/// OpenAI's `user` field (chat completions, completions, embeddings, responses): the
/// end user the request is for, limited by the workspace's `end_user_limits`. Absent,
/// empty or not a string: no end user. Copied out, since the body is edited later.
fn end_user_of(body: &Value) -> Option<String> {
    body["user"]
        .as_str()
        .filter(|user| !user.is_empty())
        .map(str::to_owned)
}

fn with_end_user<'a>(request: Request<'a>, end_user: Option<&'a str>) -> Request<'a> {
    match end_user {
        Some(user) => request.end_user(user),
        None => request,
    }
}

/// A body the estimate refused: 400 in OpenAI's shape, naming the field in `param`.
fn bad_shape(shape: &ShapeError) -> Reply {
    let code = if shape.is_cannot_estimate() {
        "cannot_estimate"
    } else {
        "invalid_value"
    };
    let mut reply = json_reply(
        StatusCode::BAD_REQUEST,
        &json!({"error": {
            "message": shape.to_string(),
            "type": "invalid_request_error",
            "param": shape.field,
            "code": code,
        }}),
    );
    reply.extensions_mut().insert(ErrorCode(code.into()));
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
    let pump = Pump {
        app: Arc::clone(app),
        tx,
        prompt_tokens: call.prompt_tokens,
        include_usage,
        trace,
    };
    let running = app.background.start();
    tokio::spawn(async move {
        let _running = running;
        pump.run(held, stream, first).await;
    });
    let mut reply = Response::new(SseBody { rx }.boxed());
    let headers = reply.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(reply)
}

/// One server-sent event for the client.
struct Sse {
    data: Bytes,
}

impl Sse {
    fn json(value: &Value) -> Self {
        Sse {
            data: Bytes::from(format!("data: {value}\n\n")),
        }
    }
}

/// The response body of a stream: the events the pump sends, in order. Dropped when
/// the client goes, which the pump sees.
struct SseBody {
    rx: mpsc::Receiver<Sse>,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => Poll::Ready(Some(Ok(Frame::data(event.data)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Moves a provider's stream to the client and charges for it.
struct Pump {
    app: Arc<App>,
    tx: mpsc::Sender<Sse>,
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
                    // Received is produced: the provider did the work, whether or
                    // not the client stays to read it.
                    produced += u32::from(token);
                    for field in ["id", "created", "model"] {
                        last[field] = chunk[field].clone();
                    }
                    if self.include_usage {
                        chunk["usage"] = Value::Null;
                    }
                    if self.tx.send(Sse::json(&chunk)).await.is_err() {
                        break End::Gone;
                    }
                }
            }
        };
        // What the provider reported, else what it was seen to produce: a client
        // that left stops the reading (the upstream request is dropped with
        // `stream`), not the charge for what was already generated.
        let usage = match (&end, reported) {
            (End::Complete | End::Gone, Some(usage)) => usage,
            (_, _) => Usage::new(self.prompt_tokens, produced),
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
                let _ = self.tx.send(Sse::json(&kind)).await;
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
                            "total_tokens": u64::from(usage.input_tokens) + u64::from(usage.output_tokens),
                        }),
                    };
                    if let Some(receipt) = &receipt {
                        chunk["x_tollgate"] = tollgate_json(receipt);
                    }
                    let _ = self.tx.send(Sse::json(&chunk)).await;
                }
                let done = Sse {
                    data: Bytes::from_static(b"data: [DONE]\n\n"),
                };
                let _ = self.tx.send(done).await;
            }
        }
    }
}

pub async fn embeddings(app: &Arc<App>, request: HttpRequest<Incoming>) -> Reply {
    let trace = Trace::of(&request);
    let (secret, body) = match authenticated_body(app, request).await {
        Ok(read) => read,
        Err(reply) => return reply,
    };
    let model = match required_model(&body) {
        Ok(model) => model.to_owned(),
        Err(reply) => return reply,
    };
    trace.model(&model);
    let options = EstimateOptions::from_policy(&app.backend.policy(), &model);
    let (counted, body) = off_the_workers(body, move |body| {
        openai::estimate_embeddings(body, &options)
    })
    .await;
    let estimate = match counted {
        Ok(Ok(estimate)) => estimate,
        Ok(Err(shape)) => return bad_shape(&shape),
        Err(reply) => return reply,
    };
    let input_tokens = estimate.input_tokens;
    let end_user = end_user_of(&body);
    let ask = with_end_user(
        estimate.request(Credential::Secret(&secret), &model),
        end_user.as_deref(),
    );
    let held = match reserve(app, &ask, &trace).await {
        Ok(held) => held,
        Err(reply) => return reply,
    };
    let headers = held.headers();
    // As with completions: once forwarded, the provider's work is charged even if the
    // client hangs up.
    let task_app = Arc::clone(app);
    forwarded(app, "embeddings", &headers, async move {
        let answer = match task_app.provider.embed(&body, &model, input_tokens).await {
            Ok(answer) => answer,
            Err(failure) => return provider_failed(&failure),
        };
        let receipt = match task_app
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
        json_reply(StatusCode::OK, &body)
    })
    .await
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
                Credential::Secret(secret) => secret,
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
        "total_tokens": u64::from(receipt.input_tokens()) + u64::from(receipt.output_tokens()),
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
