//! The tower layer's tests, shared by both engines (`tests/tower.rs` in memory,
//! `tests/tower_redis.rs` on a real redis-server): an axum router behind the layer,
//! served on a loopback port and called by a real hyper client.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{Request as HttpRequest, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rust_decimal::Decimal;
use serde_json::Value;
use tokio::sync::mpsc;
use tollgate::tower::{bearer_token, Extracted, Hold, Rejection, TollgateLayer};
use tollgate::{
    BudgetPeriod, BudgetSpec, Held, KeySpec, Limiter, LimitsSpec, ModelSpec, OrgSpec, Policy,
    PolicyDocument, ScopeReport, Usage, UsageSnapshot, WorkspaceSpec,
};

/// One `#[tokio::test]` per scenario below, each on a fresh limiter from `$setup`
/// (an async call giving `Option<(guard, limiter)>`; `None` skips, the guard lives as
/// long as the test).
macro_rules! scenarios {
    ($setup:expr) => {
        scenarios!(@each $setup;
            admitted_commits_the_response_extension,
            denials_answer_with_status_code_and_headers,
            a_handler_error_releases,
            a_client_hanging_up_releases,
            a_streamed_body_commits_at_its_end,
            a_hang_up_mid_stream_charges_what_was_sent,
            denials_can_be_answered_otherwise,
        );
    };
    (@each $setup:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let Some((_guard, limiter)) = $setup.await else { return };
            tower_app::$name(limiter).await;
        }
    )*};
}

/// A backend under test: a limiter whose usage the tests can read.
pub trait Backend: Limiter + Clone + 'static {
    fn usage(&self) -> impl Future<Output = UsageSnapshot> + Send;
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Model `m` at $1 per million input and $2 per million output tokens; `other` is
/// priced but not granted. Keys: `sk-k` (roomy), `sk-rpm` (one request a minute),
/// `sk-broke` (a zero budget).
pub fn policy() -> Policy {
    let roomy = LimitsSpec {
        rpm: Some(1_000),
        tpm: Some(1_000_000),
        max_concurrent: Some(10),
        ..LimitsSpec::default()
    };
    Policy::new(
        PolicyDocument::new(OrgSpec::new("acme"))
            .model(ModelSpec::new("m", dec("1"), dec("2")))
            .model(ModelSpec::new("other", dec("1"), dec("1")))
            .workspace(
                WorkspaceSpec::new("ws1", "one")
                    .grant("m")
                    .limits(roomy.clone()),
            )
            .key(KeySpec {
                limits: roomy.clone(),
                ..KeySpec::new("k", "ws1", "sk-k")
            })
            .key(KeySpec {
                limits: LimitsSpec {
                    rpm: Some(1),
                    ..roomy.clone()
                },
                ..KeySpec::new("rpm", "ws1", "sk-rpm")
            })
            .key(KeySpec {
                budget: Some(BudgetSpec::new(Decimal::ZERO, BudgetPeriod::Month)),
                ..KeySpec::new("broke", "ws1", "sk-broke")
            }),
    )
    .expect("valid policy")
}

/// The bearer key; model from `x-model` (default `m`); 100 input tokens held and
/// `max_tokens` 50.
fn extract(request: &HttpRequest<Body>) -> Result<Extracted, Rejection> {
    let key = bearer_token(request).ok_or_else(|| Rejection::unauthorized("missing bearer key"))?;
    let model = request
        .headers()
        .get("x-model")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("m");
    Ok(Extracted::secret(key, model)
        .input_tokens(100)
        .max_output_tokens(50))
}

/// What the handlers tell the test: a request reached them.
#[derive(Clone)]
struct Reached(mpsc::UnboundedSender<&'static str>);

/// Answers with its usage in a response extension: committed by the layer.
async fn json<R: Held + 'static>(Extension(hold): Extension<Hold<R>>) -> Response {
    let mut response = axum::Json(serde_json::json!({
        "answer": "hi",
        "reserved": hold.reserved_cost().to_string(),
    }))
    .into_response();
    response.extensions_mut().insert(Usage::new(90, 30));
    response
}

/// Fails: the reservation is released.
async fn fail(State(reached): State<Reached>) -> Result<&'static str, StatusCode> {
    let _ = reached.0.send("fail");
    Err(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Never answers: the test hangs up while it waits.
async fn hang(State(reached): State<Reached>) -> &'static str {
    let _ = reached.0.send("hang");
    std::future::pending::<()>().await;
    "never"
}

/// Streams three chunks, reporting the usage so far with each; `forever` then keeps
/// the stream open (the client hangs up mid-body).
async fn stream<R: Held + 'static>(
    State(reached): State<Reached>,
    Extension(hold): Extension<Hold<R>>,
    forever: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        for n in 1..=3u32 {
            hold.report_usage(Usage::new(80, 10 * n));
            if tx.send(Bytes::from(format!("chunk {n}\n"))).await.is_err() {
                return;
            }
        }
        let _ = reached.0.send("streamed");
        if forever {
            tx.closed().await;
        }
    });
    Response::new(Body::new(ChannelBody(rx)))
}

/// A body fed chunk by chunk through a channel; it ends when the sender is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// The app: `/json`, `/fail`, `/hang`, `/stream`, `/stream-forever` behind the layer.
pub struct Served {
    pub url: String,
    pub client: Client<HttpConnector, Full<Bytes>>,
    reached: mpsc::UnboundedReceiver<&'static str>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub async fn serve<L: Backend>(limiter: L) -> Served {
    serve_with(TollgateLayer::new(limiter, extract)).await
}

pub async fn serve_with<L, E>(layer: TollgateLayer<L, E>) -> Served
where
    L: Backend,
    E: tollgate::tower::Extract<Body>,
{
    let (tx, reached) = mpsc::unbounded_channel();
    let app = Router::new()
        .route("/json", post(json::<L::Reservation>))
        .route("/fail", post(fail))
        .route("/hang", post(hang))
        .route(
            "/stream",
            post(|s, h| stream::<L::Reservation>(s, h, false)),
        )
        .route(
            "/stream-forever",
            post(|s, h| stream::<L::Reservation>(s, h, true)),
        )
        .with_state(Reached(tx))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Served {
        url,
        client: Client::builder(TokioExecutor::new()).build_http(),
        reached,
        server,
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

impl Served {
    fn request(&self, path: &str, key: Option<&str>, model: &str) -> HttpRequest<Full<Bytes>> {
        let mut request = HttpRequest::post(format!("{}{path}", self.url)).header("x-model", model);
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        request.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
    }

    pub async fn call(&self, path: &str, key: Option<&str>, model: &str) -> Reply {
        let response = self
            .client
            .request(self.request(path, key, model))
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }

    /// Wait until a handler says it was reached with `what`.
    pub async fn reached(&mut self, what: &str) {
        let got = tokio::time::timeout(Duration::from_secs(10), self.reached.recv())
            .await
            .expect("the handler was reached")
            .expect("channel open");
        assert_eq!(got, what);
    }
}

/// The key `k`'s usage.
pub async fn key_usage<L: Backend>(limiter: &L, id: &str) -> ScopeReport {
    let usage = limiter.usage().await;
    usage
        .keys
        .iter()
        .find(|k| k.id == id)
        .unwrap_or_else(|| panic!("no key {id}"))
        .usage
}

/// Polls (with a deadline) until the key's usage satisfies `done`: settling after a
/// hang-up happens on the server's side, after the client has gone.
pub async fn eventually<L: Backend>(
    limiter: &L,
    id: &str,
    done: impl Fn(&ScopeReport) -> bool,
) -> ScopeReport {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let usage = key_usage(limiter, id).await;
        if done(&usage) {
            return usage;
        }
        assert!(Instant::now() < deadline, "never settled: {usage:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn settled(usage: &ScopeReport) -> bool {
    usage.in_flight == 0 && usage.current.held == Decimal::ZERO
}

// The scenarios, each on a fresh limiter.

/// Admitted: 200, the rate-limit headers, and the usage the response extension
/// carried committed exactly (90 in × $1/M + 30 out × $2/M).
pub async fn admitted_commits_the_response_extension<L: Backend>(limiter: L) {
    let served = serve(limiter.clone()).await;
    let reply = served.call("/json", Some("sk-k"), "m").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // Held: 100 in + 50 out = $0.0002.
    assert_eq!(reply.json()["reserved"], "0.0002");
    assert_eq!(reply.header("x-ratelimit-limit-requests"), Some("1000"));
    assert_eq!(reply.header("x-ratelimit-remaining-requests"), Some("999"));
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("1000000"));
    assert!(reply.header("ratelimit-policy").is_some());
    let usage = key_usage(&limiter, "k").await;
    assert_eq!(usage.current.requests, 1);
    assert_eq!(
        (usage.current.input_tokens, usage.current.output_tokens),
        (90, 30)
    );
    assert_eq!(usage.current.cost, dec("0.00015"));
    assert!(settled(&usage), "{usage:?}");
}

/// Every denial answers with its status, OpenAI-style code and headers, and never
/// reaches the handler.
pub async fn denials_answer_with_status_code_and_headers<L: Backend>(limiter: L) {
    let served = serve(limiter.clone()).await;
    let cases = [
        (None, "m", 401, "invalid_api_key"),
        (Some("sk-nobody"), "m", 401, "invalid_api_key"),
        (Some("sk-k"), "other", 403, "model_not_allowed"),
        (Some("sk-k"), "no-such-model", 404, "model_not_found"),
        (Some("sk-broke"), "m", 402, "budget_exceeded"),
    ];
    for (key, model, status, code) in cases {
        let reply = served.call("/json", key, model).await;
        assert_eq!(
            reply.status.as_u16(),
            status,
            "{key:?} {model}: {}",
            reply.body
        );
        let error = &reply.json()["error"];
        assert_eq!(error["code"], code, "{}", reply.body);
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{code}"
        );
        assert_eq!(reply.header("retry-after"), None, "{code}: no retry");
    }
    assert_eq!(
        served.call("/json", Some("sk-k"), "other").await.json()["error"]["type"],
        "permission_error"
    );
    // One request a minute: the second is rate limited, with when to retry.
    assert_eq!(served.call("/json", Some("sk-rpm"), "m").await.status, 200);
    let reply = served.call("/json", Some("sk-rpm"), "m").await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        reply.body
    );
    assert_eq!(reply.json()["error"]["code"], "rate_limited");
    assert_eq!(reply.json()["error"]["type"], "rate_limit_error");
    let retry: u64 = reply
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "retry after {retry}");
    assert_eq!(reply.header("x-ratelimit-limit-requests"), Some("1"));
    assert_eq!(reply.header("x-ratelimit-remaining-requests"), Some("0"));
    // Only the one admitted request was charged.
    assert_eq!(key_usage(&limiter, "rpm").await.current.requests, 1);
    assert_eq!(key_usage(&limiter, "k").await.current.requests, 0);
}

/// A handler error (a 500 without usage) releases the reservation: nothing charged.
pub async fn a_handler_error_releases<L: Backend>(limiter: L) {
    let mut served = serve(limiter.clone()).await;
    let reply = served.call("/fail", Some("sk-k"), "m").await;
    served.reached("fail").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    // Headers still tell the client where its limits stand.
    assert!(reply.header("x-ratelimit-remaining-requests").is_some());
    let usage = eventually(&limiter, "k", settled).await;
    assert_eq!(usage.current.requests, 0);
    assert_eq!(usage.current.cost, Decimal::ZERO);
}

/// A client that hangs up before the answer releases the reservation.
pub async fn a_client_hanging_up_releases<L: Backend>(limiter: L) {
    let mut served = serve(limiter.clone()).await;
    let request = served.request("/hang", Some("sk-k"), "m");
    let client = served.client.clone();
    let call = tokio::spawn(async move { client.request(request).await });
    served.reached("hang").await;
    let held = key_usage(&limiter, "k").await;
    assert_eq!(held.in_flight, 1, "held while the handler waits: {held:?}");
    call.abort();
    let _ = call.await;
    let usage = eventually(&limiter, "k", settled).await;
    assert_eq!(usage.current.requests, 0);
}

/// A streamed body commits the usage reported by its end, once it has ended.
pub async fn a_streamed_body_commits_at_its_end<L: Backend>(limiter: L) {
    let mut served = serve(limiter.clone()).await;
    let reply = served.call("/stream", Some("sk-k"), "m").await;
    served.reached("streamed").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "chunk 1\nchunk 2\nchunk 3\n");
    assert!(reply.header("x-ratelimit-remaining-tokens").is_some());
    // Committed before the body's end reached the client.
    let usage = key_usage(&limiter, "k").await;
    assert_eq!(usage.current.requests, 1, "{usage:?}");
    assert_eq!(
        (usage.current.input_tokens, usage.current.output_tokens),
        (80, 30)
    );
    assert_eq!(usage.current.cost, dec("0.00014"));
    assert!(settled(&usage), "{usage:?}");
}

/// A client that hangs up mid-stream is charged what was reported as sent.
pub async fn a_hang_up_mid_stream_charges_what_was_sent<L: Backend>(limiter: L) {
    let mut served = serve(limiter.clone()).await;
    let response = served
        .client
        .request(served.request("/stream-forever", Some("sk-k"), "m"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"chunk 1\n");
    served.reached("streamed").await;
    drop(body);
    let usage = eventually(&limiter, "k", |u| settled(u) && u.current.requests == 1).await;
    assert_eq!(
        (usage.current.input_tokens, usage.current.output_tokens),
        (80, 30)
    );
}

/// `on_denial` replaces the answer to a denial.
pub async fn denials_can_be_answered_otherwise<L: Backend>(limiter: L) {
    let layer = TollgateLayer::new(limiter, extract).on_denial(|denial| {
        let mut response = axum::http::Response::new(Bytes::from(denial.code()));
        *response.status_mut() = StatusCode::from_u16(denial.http_status()).unwrap();
        response
    });
    let served = serve_with(layer).await;
    let reply = served.call("/json", Some("sk-broke"), "m").await;
    assert_eq!(reply.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(reply.body, "budget_exceeded");
}
