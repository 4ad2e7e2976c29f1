//! Streamed chat completions (server-sent events), embeddings, and forwarding to a
//! real OpenAI-compatible upstream: what each is charged, on either backend.
//!
//! The upstream is a second hyper server on loopback playing the provider: the
//! gateway talks HTTP to it exactly as it would to a real one.

use std::convert::Infallible;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tollgate::{Decimal, Engine, Policy, ScopeUsage, UsageSnapshot};

use crate::app::App;
use crate::backend::Backend;
use crate::provider::{mock_vector, Provider, SseParser, UpstreamProvider, MOCK_FAILURE};
use crate::support::{start, start_with, Options, POLICY};

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// POST `body` to the gateway at `url` with bearer `key`; the response unread.
pub(crate) async fn post(
    client: &HttpClient,
    url: &str,
    path: &str,
    key: &str,
    body: &Value,
) -> Response<Incoming> {
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{url}{path}"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    client.request(request).await.expect("gateway answers")
}

pub(crate) async fn json_of(response: Response<Incoming>) -> Value {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).expect("a JSON body")
}

pub(crate) fn header<'a>(response: &'a Response<Incoming>, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A streamed response read event by event, checking the framing: every event is one
/// `data: ` line and a blank line.
struct Events {
    body: Incoming,
    buf: String,
    /// Everything received, as received.
    raw: String,
}

impl Events {
    fn new(response: Response<Incoming>) -> Self {
        Events {
            body: response.into_body(),
            buf: String::new(),
            raw: String::new(),
        }
    }

    /// The next event's data; `None` at the end of the body.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data = event
                    .strip_prefix("data: ")
                    .and_then(|e| e.strip_suffix("\n\n"))
                    .unwrap_or_else(|| panic!("not a data event: {event:?}"));
                assert!(!data.contains('\n'), "one line per event: {event:?}");
                return Some(data.to_owned());
            }
            match self.body.frame().await {
                None => {
                    assert!(
                        self.buf.is_empty(),
                        "a partial event at the end: {:?}",
                        self.buf
                    );
                    return None;
                }
                Some(frame) => {
                    if let Ok(data) = frame.expect("the stream reads").into_data() {
                        let text = std::str::from_utf8(&data).expect("UTF-8").to_owned();
                        self.raw.push_str(&text);
                        self.buf.push_str(&text);
                    }
                }
            }
        }
    }

    /// Every remaining event: JSON chunks, and whether `[DONE]` came last.
    async fn rest(&mut self) -> (Vec<Value>, bool) {
        let mut chunks = Vec::new();
        let mut done = false;
        while let Some(data) = self.next().await {
            assert!(!done, "an event after [DONE]: {data}");
            if data == "[DONE]" {
                done = true;
            } else {
                chunks.push(serde_json::from_str(&data).expect("a JSON chunk"));
            }
        }
        (chunks, done)
    }
}

/// The content chunks' text, in order.
fn content(chunks: &[Value]) -> Vec<String> {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

pub(crate) fn workspace(usage: &UsageSnapshot, id: &str) -> ScopeUsage {
    usage
        .workspaces
        .iter()
        .find(|w| w.id == id)
        .unwrap_or_else(|| panic!("no workspace {id}"))
        .usage
        .current
}

/// Poll `usage` until `done` holds, or fail after a deadline.
pub(crate) async fn wait_for<F, Fut>(
    what: &str,
    usage: F,
    done: impl Fn(&UsageSnapshot) -> bool,
) -> UsageSnapshot
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = UsageSnapshot>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snapshot = usage().await;
        if done(&snapshot) {
            return snapshot;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn chat_body(content: &str, max_tokens: Option<u32>, stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": content}],
    });
    if let Some(max) = max_tokens {
        body["max_tokens"] = json!(max);
    }
    if stream {
        body["stream"] = json!(true);
    }
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

#[tokio::test]
async fn a_streamed_completion_is_server_sent_events_charged_exactly() {
    let gw = start().await;
    let body = chat_body("Hello", None, true, true);
    let response = post(
        &gw.client,
        &gw.url,
        "/v1/chat/completions",
        "sk-demo-prod",
        &body,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&response, "cache-control"), Some("no-cache"));
    assert_eq!(header(&response, "x-ratelimit-limit-requests"), Some("600"));
    assert_eq!(
        header(&response, "x-ratelimit-remaining-requests"),
        Some("599")
    );
    assert!(header(&response, "ratelimit-policy").is_some());

    let mut events = Events::new(response);
    let (chunks, done) = events.rest().await;
    assert!(done, "the stream ends with [DONE]");
    assert!(
        events.raw.ends_with("}\n\ndata: [DONE]\n\n"),
        "{:?}",
        events.raw
    );

    // 40 one-token chunks, a finish chunk, the usage chunk.
    assert_eq!(chunks.len(), 42);
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["model"], "gpt-4o-mini");
    }
    let words = content(&chunks);
    assert_eq!(words.len(), 40);
    assert_eq!(words.concat(), vec!["mock"; 40].join(" "));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    for chunk in &chunks[..41] {
        // With include_usage, every chunk but the last says `"usage": null`.
        assert_eq!(chunk["usage"], Value::Null);
        assert!(chunk.as_object().unwrap().contains_key("usage"));
    }
    for chunk in &chunks[..40] {
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
    }
    assert_eq!(chunks[40]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[40]["choices"][0]["delta"], json!({}));

    let last = &chunks[41];
    assert_eq!(last["choices"], json!([]));
    // "Hello": 3 framing + "user" + "Hello" + 3 priming = 8 in; 40 out.
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 8, "completion_tokens": 40, "total_tokens": 48})
    );
    // 8 × 0.15/M + 40 × 0.60/M
    assert_eq!(last["x_tollgate"]["cost_usd"], "0.0000252");

    // Committed before the usage chunk was sent: no waiting.
    let ws = workspace(&gw.usage().await, "ws-prod");
    assert_eq!((ws.requests, ws.input_tokens, ws.output_tokens), (1, 8, 40));
    assert_eq!(ws.cost, dec("0.0000252"));
    assert_eq!(ws.held, Decimal::ZERO);
}

#[tokio::test]
async fn without_include_usage_the_stream_has_no_usage_chunk_and_is_still_charged() {
    let gw = start().await;
    let body = chat_body("Hello", Some(5), true, false);
    let response = post(
        &gw.client,
        &gw.url,
        "/v1/chat/completions",
        "sk-demo-prod",
        &body,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (chunks, done) = Events::new(response).rest().await;
    assert!(done);
    assert_eq!(
        content(&chunks),
        ["mock ", "mock ", "mock ", "mock ", "mock"]
    );
    assert_eq!(chunks.len(), 6);
    // Cut short by max_tokens, as OpenAI says it.
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "length");
    for chunk in &chunks {
        assert!(chunk.get("usage").is_none(), "{chunk}");
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
    }
    let ws = workspace(&gw.usage().await, "ws-prod");
    assert_eq!((ws.requests, ws.input_tokens, ws.output_tokens), (1, 8, 5));
    // 8 × 0.15/M + 5 × 0.60/M
    assert_eq!(ws.cost, dec("0.0000042"));
    assert_eq!(ws.held, Decimal::ZERO);
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_pays_for_what_it_was_sent() {
    // Ten tokens over 2.5 s: a chunk every 250 ms, far longer than a hang-up takes to
    // reach the gateway, so the chunks sent are exactly the chunks read.
    let gw = start_with(Options {
        mock_delay: Duration::from_millis(2500),
        ..Options::default()
    })
    .await;
    let body = chat_body("Hello", Some(10), true, true);
    let response = post(
        &gw.client,
        &gw.url,
        "/v1/chat/completions",
        "sk-demo-prod",
        &body,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    // Streaming: the hold is there, nothing is charged yet.
    let ws = workspace(&gw.usage().await, "ws-prod");
    assert_eq!(ws.requests, 0);
    assert!(ws.held > Decimal::ZERO);
    let mut events = Events::new(response);
    for n in 0..3 {
        let data = events.next().await.expect("a chunk");
        let chunk: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(content(&[chunk]).len(), 1, "chunk {n} carries a token");
    }
    drop(events); // hang up, right after the third chunk

    let usage = wait_for(
        "the partial commit",
        || gw.usage(),
        |u| workspace(u, "ws-prod").requests == 1,
    )
    .await;
    let ws = workspace(&usage, "ws-prod");
    // The prompt and the three chunks produced, nothing more.
    assert_eq!((ws.input_tokens, ws.output_tokens), (8, 3));
    // 8 × 0.15/M + 3 × 0.60/M
    assert_eq!(ws.cost, dec("0.000003"));
    assert_eq!(ws.held, Decimal::ZERO);
    assert_eq!(usage.org.current.held, Decimal::ZERO);
    let key = usage.keys.iter().find(|k| k.id == "key-prod").unwrap();
    assert_eq!(key.usage.current.output_tokens, 3);
    assert_eq!(key.usage.current.held, Decimal::ZERO);
}

#[tokio::test]
async fn a_provider_failure_before_the_first_chunk_charges_nothing() {
    let gw = start().await;
    let failing = format!("Hello {MOCK_FAILURE}");
    for stream in [true, false] {
        let body = chat_body(&failing, None, stream, stream);
        let response = post(
            &gw.client,
            &gw.url,
            "/v1/chat/completions",
            "sk-demo-prod",
            &body,
        )
        .await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_GATEWAY,
            "stream: {stream}"
        );
        assert_eq!(header(&response, "content-type"), Some("application/json"));
        let answer = json_of(response).await;
        assert_eq!(answer["error"]["code"], "provider_error");
        assert_eq!(answer["error"]["type"], "server_error");
    }
    // Dropped holds are released (on Redis, in the background).
    let usage = wait_for(
        "the releases",
        || gw.usage(),
        |u| workspace(u, "ws-prod").held == Decimal::ZERO && u.org.current.held == Decimal::ZERO,
    )
    .await;
    let ws = workspace(&usage, "ws-prod");
    assert_eq!((ws.requests, ws.input_tokens, ws.output_tokens), (0, 0, 0));
    assert_eq!(ws.cost, Decimal::ZERO);
    assert_eq!(usage.org.current.cost, Decimal::ZERO);
}

#[tokio::test]
async fn embeddings_are_admitted_and_charged_their_input_tokens() {
    let gw = start().await;
    let body = json!({"model": "text-embedding-3-small", "input": ["Hello world", "tollgate"]});
    let response = post(&gw.client, &gw.url, "/v1/embeddings", "sk-demo-prod", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "x-ratelimit-remaining-requests"),
        Some("599")
    );
    let answer = json_of(response).await;
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["model"], "text-embedding-3-small");
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (index, (item, text)) in data.iter().zip(["Hello world", "tollgate"]).enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], index);
        assert_eq!(item["embedding"], json!(mock_vector(text)));
        assert_eq!(item["embedding"].as_array().unwrap().len(), 8);
    }
    // 11 characters: 3 tokens; 8 characters: 2.
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": 5, "total_tokens": 5})
    );
    // 5 × 0.02/M
    assert_eq!(answer["x_tollgate"]["cost_usd"], "0.0000001");

    let one = json!({"model": "text-embedding-3-small", "input": "abcd"});
    let answer =
        json_of(post(&gw.client, &gw.url, "/v1/embeddings", "sk-demo-prod", &one).await).await;
    assert_eq!(answer["usage"]["prompt_tokens"], 1);
    assert_eq!(answer["data"].as_array().unwrap().len(), 1);

    let usage = gw.usage().await;
    let ws = workspace(&usage, "ws-prod");
    assert_eq!((ws.requests, ws.input_tokens, ws.output_tokens), (2, 6, 0));
    assert_eq!(ws.cost, dec("0.00000012"));
    assert_eq!(ws.held, Decimal::ZERO);

    // Refusals: a bad input, a model the workspace may not call.
    let empty = json!({"model": "text-embedding-3-small", "input": []});
    let response = post(
        &gw.client,
        &gw.url,
        "/v1/embeddings",
        "sk-demo-prod",
        &empty,
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = post(
        &gw.client,
        &gw.url,
        "/v1/embeddings",
        "sk-demo-staging",
        &body,
    )
    .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        json_of(response).await["error"]["code"],
        "model_not_allowed"
    );
    assert_eq!(workspace(&gw.usage().await, "ws-prod").requests, 2);
}

#[test]
fn server_sent_events_parse_however_the_bytes_are_cut() {
    let stream =
        b"data: {\"a\":1}\r\n\r\n: comment\n\nevent: x\ndata: two\ndata: lines\n\ndata: [DONE]\n\n";
    let whole = SseParser::default().feed(stream);
    assert_eq!(whole, ["{\"a\":1}", "two\nlines", "[DONE]"]);
    for cut in 0..stream.len() {
        let mut parser = SseParser::default();
        let mut events = parser.feed(&stream[..cut]);
        events.extend(parser.feed(&stream[cut..]));
        events.extend(parser.finish());
        assert_eq!(events, whole, "cut at {cut}");
    }
    let mut parser = SseParser::default();
    assert!(parser.feed(b"data: unterminated").is_empty());
    assert_eq!(parser.finish(), ["unterminated"]);
}

// ---------------------------------------------------------------------------------
// A real upstream

const UPSTREAM_KEY: &str = "sk-upstream-test";

/// One request the upstream saw.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    authorization: Option<String>,
    body: Value,
}

/// A provider on loopback: answers by the first message's content or the input (`"fail"`: 500,
/// `"reject"`: 400, `"cut"`: a stream that stops after two chunks), with fixed usage
/// numbers the gateway cannot have guessed.
struct Upstream {
    url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Vec<Seen>>,
    /// Streams that stalled and whose connection the gateway then dropped.
    cancelled: AtomicUsize,
}

/// A streamed body that sends what it has, then waits for ever: a provider still
/// thinking. Counts itself cancelled when the connection goes.
struct Stall {
    first: Option<Bytes>,
    shared: Arc<Shared>,
}

impl Body for Stall {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.first.take() {
            Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            None => Poll::Pending,
        }
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared::default());
        let log = Arc::clone(&shared);
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = Arc::clone(&log);
                let service = service_fn(move |request| {
                    let log = Arc::clone(&log);
                    async move { Ok::<_, Infallible>(Upstream::answer(request, &log).await) }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            url,
            shared,
            server,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    async fn answer(
        request: Request<Incoming>,
        shared: &Arc<Shared>,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let path = request.uri().path().to_owned();
        let authorization = request
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        shared.seen.lock().unwrap().push(Seen {
            path: path.clone(),
            authorization,
            body: body.clone(),
        });
        let reply = |status: u16, content_type: &str, body: String| {
            Response::builder()
                .status(status)
                .header("content-type", content_type)
                .body(Full::new(Bytes::from(body)).boxed())
                .unwrap()
        };
        let said = body["messages"][0]["content"]
            .as_str()
            .or(body["input"].as_str())
            .unwrap_or("");
        match (path.as_str(), said) {
            (_, "fail") => reply(500, "text/plain", "upstream broke".into()),
            (_, "reject") => reply(
                400,
                "application/json",
                json!({"error": {"message": "bad temperature", "type": "invalid_request_error",
                       "code": "invalid_value"}})
                .to_string(),
            ),
            ("/v1/embeddings", _) => reply(
                200,
                "application/json",
                json!({"object": "list", "model": body["model"],
                       "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.5]}],
                       "usage": {"prompt_tokens": 4, "total_tokens": 4}})
                .to_string(),
            ),
            ("/v1/chat/completions", _) if body["stream"] == true => {
                let chunk = |delta: Value, finish: Value| {
                    json!({"id": "chatcmpl-up", "object": "chat.completion.chunk",
                           "created": 1, "model": body["model"], "usage": null,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                };
                let mut events = vec![
                    chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                    chunk(json!({"content": "Hel"}), Value::Null),
                    chunk(json!({"content": "lo"}), Value::Null),
                ];
                let cut = said == "cut";
                if said == "stall" {
                    events.push(chunk(json!({"content": "!"}), Value::Null));
                    let text: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
                    let stall = Stall {
                        first: Some(Bytes::from(text)),
                        shared: Arc::clone(shared),
                    };
                    return Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(stall.boxed())
                        .unwrap();
                }
                if !cut {
                    events.push(chunk(json!({"content": "!"}), Value::Null));
                    events.push(chunk(json!({}), json!("stop")));
                    events.push(json!({"id": "chatcmpl-up", "object": "chat.completion.chunk",
                        "created": 1, "model": body["model"], "choices": [],
                        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}));
                }
                let mut text: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
                if !cut {
                    text.push_str("data: [DONE]\n\n");
                }
                reply(200, "text/event-stream", text)
            }
            ("/v1/chat/completions", _) => reply(
                200,
                "application/json",
                json!({"id": "chatcmpl-up", "object": "chat.completion", "created": 1,
                       "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "Hi from upstream"}}],
                       "usage": {"prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28}})
                .to_string(),
            ),
            _ => reply(404, "application/json", json!({"error": {"message": "no"}}).to_string()),
        }
    }
}

/// The gateway with `Provider::Upstream`, on the backend the suite runs on.
pub(crate) struct Gateway {
    pub(crate) url: String,
    app: Arc<App>,
    pub(crate) client: HttpClient,
    server: tokio::task::JoinHandle<()>,
    _stop: oneshot::Sender<()>,
    #[cfg(feature = "redis")]
    _redis: Option<crate::redis_server::RedisServer>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Gateway {
    async fn start(upstream: &str) -> Gateway {
        Gateway::start_with(upstream, Policy::from_path(POLICY).unwrap()).await
    }

    /// The gateway forwarding to `upstream` under `policy`.
    pub(crate) async fn start_with(upstream: &str, policy: Policy) -> Gateway {
        let redis = std::env::var("TOLLGATE_GATEWAY_BACKEND").is_ok_and(|b| b == "redis");
        #[cfg(feature = "redis")]
        let (backend, redis) = if redis {
            assert!(crate::redis_server::require_redis(), "needs redis-server");
            let server = crate::redis_server::RedisServer::start();
            let engine = tollgate::RedisEngine::connect(
                &server.url(),
                policy,
                tollgate::RedisConfig::default(),
            )
            .await
            .expect("Redis is up");
            (Backend::Redis(engine), Some(server))
        } else {
            (Backend::Memory(Engine::new(policy)), None)
        };
        #[cfg(not(feature = "redis"))]
        let backend = {
            assert!(
                !redis,
                "TOLLGATE_GATEWAY_BACKEND=redis needs --features redis"
            );
            Backend::Memory(Engine::new(policy))
        };
        let provider = UpstreamProvider::new(upstream, Some(UPSTREAM_KEY.into())).unwrap();
        let app = Arc::new(App {
            backend,
            provider: Provider::Upstream(provider),
            admin: crate::admin::AdminKeys::default(),
            audit: crate::audit::Audit::default(),
            counters: None,
            limits: crate::connections::Limits::default(),
            connections: Arc::default(),
            background: Arc::default(),
            requests: Arc::new(crate::requests::RequestLog::in_memory()),
            #[cfg(feature = "metrics")]
            metrics: crate::metrics::recorder().1,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(crate::connections::serve(
            listener,
            Arc::clone(&app),
            async {
                let _ = stopped.await;
            },
        ));
        Gateway {
            url,
            app,
            client: Client::builder(TokioExecutor::new()).build_http(),
            server,
            _stop: stop,
            #[cfg(feature = "redis")]
            _redis: redis,
        }
    }

    pub(crate) async fn post(&self, path: &str, key: &str, body: &Value) -> Response<Incoming> {
        post(&self.client, &self.url, path, key, body).await
    }

    pub(crate) async fn usage(&self) -> UsageSnapshot {
        self.app.backend.usage().await.expect("usage")
    }
}

#[tokio::test]
async fn a_completion_is_forwarded_upstream_with_its_key_and_charged_what_it_reports() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url).await;
    let body = json!({
        "model": "gpt-4o-mini",
        "temperature": 0.2,
        "messages": [{"role": "user", "content": "Hello there"}],
    });
    let response = gw.post("/v1/chat/completions", "sk-demo-prod", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "x-ratelimit-remaining-requests"),
        Some("599")
    );
    let answer = json_of(response).await;

    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    // The upstream's key, never the client's.
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer sk-upstream-test")
    );
    // As sent, with the output capped at what was held (the policy's default of
    // 1024), since the client set no limit.
    let mut expected = body.clone();
    expected["max_completion_tokens"] = json!(1024);
    assert_eq!(seen[0].body, expected);

    assert_eq!(answer["id"], "chatcmpl-up");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Hi from upstream"
    );
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28})
    );
    // 21 × 0.15/M + 7 × 0.60/M
    assert_eq!(answer["x_tollgate"]["cost_usd"], "0.00000735");
    let ws = workspace(&gw.usage().await, "ws-prod");
    // The upstream's count (21), not the gateway's estimate (7).
    assert_eq!((ws.requests, ws.input_tokens, ws.output_tokens), (1, 21, 7));
    assert_eq!(ws.cost, dec("0.00000735"));
    assert_eq!(ws.held, Decimal::ZERO);
}

#[tokio::test]
async fn a_stream_is_forwarded_upstream_and_charged_its_usage_chunk() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url).await;
    // The client does not ask for the usage chunk; the gateway asks upstream for it.
    let body = chat_body("Hello", None, true, false);
    let response = gw.post("/v1/chat/completions", "sk-demo-prod", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "content-type"), Some("text/event-stream"));
    assert_eq!(
        header(&response, "x-ratelimit-remaining-requests"),
        Some("599")
    );
    let mut events = Events::new(response);
    let (chunks, done) = events.rest().await;
    assert!(done);
    assert!(events.raw.ends_with("data: [DONE]\n\n"));

    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer sk-upstream-test")
    );
    let mut expected = body.clone();
    expected["stream_options"] = json!({"include_usage": true});
    expected["max_completion_tokens"] = json!(1024);
    assert_eq!(seen[0].body, expected);

    assert_eq!(content(&chunks), ["Hel", "lo", "!"]);
    assert_eq!(
        chunks.len(),
        5,
        "role, three tokens, finish; no usage chunk"
    );
    for chunk in &chunks {
        assert_eq!(chunk["id"], "chatcmpl-up");
        assert!(chunk.get("usage").is_none());
    }
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    let ws = workspace(&gw.usage().await, "ws-prod");
    assert_eq!((ws.requests, ws.input_tokens, ws.output_tokens), (1, 12, 3));
    // 12 × 0.15/M + 3 × 0.60/M
    assert_eq!(ws.cost, dec("0.0000036"));
    assert_eq!(ws.held, Decimal::ZERO);

    // Asked for, the usage chunk carries the upstream's numbers.
    let body = chat_body("Hello", None, true, true);
    let response = gw.post("/v1/chat/completions", "sk-demo-prod", &body).await;
    let (chunks, done) = Events::new(response).rest().await;
    assert!(done);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15})
    );
    assert_eq!(last["x_tollgate"]["cost_usd"], "0.0000036");
    assert_eq!(
        workspace(&gw.usage().await, "ws-prod").cost,
        dec("0.0000072")
    );
}

#[tokio::test]
async fn upstream_failures_charge_nothing_and_its_refusals_pass_through() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url).await;
    for stream in [false, true] {
        let response = gw
            .post(
                "/v1/chat/completions",
                "sk-demo-prod",
                &chat_body("fail", None, stream, stream),
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_GATEWAY,
            "stream: {stream}"
        );
        let answer = json_of(response).await;
        assert_eq!(answer["error"]["code"], "provider_error");

        let response = gw
            .post(
                "/v1/chat/completions",
                "sk-demo-prod",
                &chat_body("reject", None, stream, false),
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "stream: {stream}"
        );
        assert_eq!(json_of(response).await["error"]["code"], "invalid_value");
    }
    let embed = json!({"model": "text-embedding-3-small", "input": "fail"});
    let response = gw.post("/v1/embeddings", "sk-demo-prod", &embed).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(upstream.seen().len(), 5);

    let usage = wait_for(
        "the releases",
        || gw.usage(),
        |u| workspace(u, "ws-prod").held == Decimal::ZERO && u.org.current.held == Decimal::ZERO,
    )
    .await;
    let ws = workspace(&usage, "ws-prod");
    assert_eq!((ws.requests, ws.input_tokens, ws.output_tokens), (0, 0, 0));
    assert_eq!(ws.cost, Decimal::ZERO);
}

#[tokio::test]
async fn an_upstream_stream_cut_short_is_charged_what_was_sent() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url).await;
    let response = gw
        .post(
            "/v1/chat/completions",
            "sk-demo-prod",
            &chat_body("cut", None, true, true),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut events = Events::new(response);
    let mut chunks = Vec::new();
    while let Some(data) = events.next().await {
        assert_ne!(data, "[DONE]", "a broken stream does not end with [DONE]");
        chunks.push(serde_json::from_str::<Value>(&data).unwrap());
    }
    assert_eq!(content(&chunks), ["Hel", "lo"]);
    let last = chunks.last().unwrap();
    assert_eq!(last["error"]["code"], "provider_error");
    // No usage from upstream: the gateway's prompt estimate ("cut": 3 + 1 + 1 + 3) and the two
    // chunks sent.
    let ws = workspace(&gw.usage().await, "ws-prod");
    assert_eq!((ws.requests, ws.input_tokens, ws.output_tokens), (1, 8, 2));
    // 8 × 0.15/M + 2 × 0.60/M
    assert_eq!(ws.cost, dec("0.0000024"));
    assert_eq!(ws.held, Decimal::ZERO);
}

#[tokio::test]
async fn embeddings_are_forwarded_upstream_and_charged_its_count() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url).await;
    let body = json!({"model": "text-embedding-3-small", "input": "Hello world"});
    let response = gw.post("/v1/embeddings", "sk-demo-prod", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer = json_of(response).await;
    let seen = upstream.seen();
    assert_eq!(seen[0].path, "/v1/embeddings");
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer sk-upstream-test")
    );
    assert_eq!(seen[0].body, body);
    assert_eq!(answer["data"][0]["embedding"], json!([0.5, -0.5]));
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": 4, "total_tokens": 4})
    );
    // 4 × 0.02/M: the upstream's 4, not the gateway's estimate of 3.
    assert_eq!(answer["x_tollgate"]["cost_usd"], "0.00000008");
    let ws = workspace(&gw.usage().await, "ws-prod");
    assert_eq!((ws.requests, ws.input_tokens, ws.output_tokens), (1, 4, 0));
    assert_eq!(ws.cost, dec("0.00000008"));
    assert_eq!(ws.held, Decimal::ZERO);
}

#[tokio::test]
async fn a_client_that_leaves_an_upstream_stream_pays_for_what_it_was_sent() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream.url).await;
    let response = gw
        .post(
            "/v1/chat/completions",
            "sk-demo-prod",
            &chat_body("stall", None, true, true),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut events = Events::new(response);
    let mut chunks = Vec::new();
    // The role chunk and three tokens; then the upstream sends nothing more.
    while content(&chunks).len() < 3 {
        let data = events.next().await.expect("a chunk");
        chunks.push(serde_json::from_str::<Value>(&data).unwrap());
    }
    assert_eq!(content(&chunks), ["Hel", "lo", "!"]);
    assert_eq!(workspace(&gw.usage().await, "ws-prod").requests, 0);
    drop(events); // hang up

    let usage = wait_for(
        "the partial commit",
        || gw.usage(),
        |u| workspace(u, "ws-prod").requests == 1,
    )
    .await;
    let ws = workspace(&usage, "ws-prod");
    // The gateway's prompt estimate ("stall": 3 + 1 + 1 + 3) and the three chunks
    // received.
    assert_eq!((ws.input_tokens, ws.output_tokens), (8, 3));
    // 8 × 0.15/M + 3 × 0.60/M
    assert_eq!(ws.cost, dec("0.000003"));
    assert_eq!(ws.held, Decimal::ZERO);
    assert_eq!(usage.org.current.held, Decimal::ZERO);
    // And the upstream request is cancelled, not left generating.
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.shared.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the upstream stream was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
