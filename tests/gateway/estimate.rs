//! Holds that match the bill, end to end: the gateway forwards to an in-process
//! upstream that bills like a provider (prompt tokens counted from the body it
//! received with the model's encoding and OpenAI's framing; as many output tokens as
//! it is allowed per choice, times `n`). Content-part prompts cannot overspend a
//! budget, `n` is held n times, the output is capped at the hold, a client that hangs
//! up during a forwarded call is charged what the upstream reported and keeps its RPM
//! unit taken, and every bad shape is a 400.

use std::convert::Infallible;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tollgate::openai::{estimate_chat, EstimateOptions, Tokenizer};
use tollgate::{Decimal, KeySpec, Policy};

use crate::stream::{header, json_of, wait_for, workspace, Gateway};
use crate::support::start;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// What the upstream produces per choice when no output limit reaches it.
const UNCAPPED_OUTPUT: u64 = 2000;

/// A prompt containing this makes the upstream take 400 ms to answer.
const SLOW: &str = "[slow]";

/// A provider on loopback that bills what it was sent.
struct Billing {
    url: String,
    seen: Arc<Mutex<Vec<Value>>>,
    /// Completions it finished generating (answered in full).
    finished: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Billing {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Prompt tokens as a provider bills them: the model's encoding (tiktoken-rs
/// directly), 3 per message + role + every text part (+1 and the name for a name),
/// 3 to prime the reply.
fn billed_prompt(body: &Value) -> u64 {
    let bpe = tiktoken_rs::bpe_for_model(body["model"].as_str().unwrap()).unwrap();
    let count = |text: &str| bpe.encode_ordinary(text).len() as u64;
    let mut total = 3;
    for message in body["messages"].as_array().unwrap() {
        total += 3 + count(message["role"].as_str().unwrap());
        match &message["content"] {
            Value::String(text) => total += count(text),
            Value::Array(parts) => {
                for part in parts {
                    total += count(part["text"].as_str().unwrap());
                }
            }
            _ => {}
        }
        if let Some(name) = message["name"].as_str() {
            total += 1 + count(name);
        }
    }
    total
}

impl Billing {
    async fn start() -> Billing {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let finished = Arc::new(AtomicUsize::new(0));
        let (log, done) = (Arc::clone(&seen), Arc::clone(&finished));
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (log, done) = (Arc::clone(&log), Arc::clone(&done));
                let service = service_fn(move |request| {
                    let (log, done) = (Arc::clone(&log), Arc::clone(&done));
                    async move { Ok::<_, Infallible>(Billing::answer(request, &log, &done).await) }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Billing {
            url,
            seen,
            finished,
            server,
        }
    }

    async fn answer(
        request: Request<Incoming>,
        seen: &Mutex<Vec<Value>>,
        finished: &AtomicUsize,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let path = request.uri().path().to_owned();
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        seen.lock().unwrap().push(body.clone());
        if body.to_string().contains(SLOW) {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let reply = |answer: Value| {
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(answer.to_string())).boxed())
                .unwrap()
        };
        let bpe = tiktoken_rs::bpe_for_model(body["model"].as_str().unwrap()).unwrap();
        let count = |text: &str| bpe.encode_ordinary(text).len() as u64;
        match path.as_str() {
            "/v1/responses" => {
                // A string input is one user message: 3 + role + text, 3 priming.
                let input = 3 + count("user") + count(body["input"].as_str().unwrap()) + 3;
                let output = body["max_output_tokens"]
                    .as_u64()
                    .unwrap_or(UNCAPPED_OUTPUT);
                finished.fetch_add(1, Ordering::SeqCst);
                return reply(json!({"id": "resp_billing", "object": "response",
                    "output": [{"type": "message", "role": "assistant",
                                "content": [{"type": "output_text", "text": "word"}]}],
                    "usage": {"input_tokens": input, "output_tokens": output,
                              "total_tokens": input + output}}));
            }
            "/v1/completions" => {
                let prompt = count(body["prompt"].as_str().unwrap());
                let output =
                    body["max_tokens"].as_u64().unwrap_or(16) * body["n"].as_u64().unwrap_or(1);
                finished.fetch_add(1, Ordering::SeqCst);
                return reply(json!({"id": "cmpl-billing", "object": "text_completion",
                    "choices": [{"index": 0, "text": "word", "finish_reason": "length"}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": output,
                              "total_tokens": prompt + output}}));
            }
            _ => {}
        }
        let prompt = billed_prompt(&body);
        let per_choice = body["max_completion_tokens"]
            .as_u64()
            .or(body["max_tokens"].as_u64())
            .unwrap_or(UNCAPPED_OUTPUT);
        let n = body["n"].as_u64().unwrap_or(1);
        let choices: Vec<Value> = (0..n)
            .map(|i| {
                json!({"index": i, "finish_reason": "length",
                       "message": {"role": "assistant", "content": "word ".repeat(per_choice as usize)}})
            })
            .collect();
        let answer = json!({
            "id": "chatcmpl-billing", "object": "chat.completion", "created": 1,
            "model": body["model"], "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": per_choice * n,
                      "total_tokens": prompt + per_choice * n},
        });
        finished.fetch_add(1, Ordering::SeqCst);
        reply(answer)
    }

    fn seen(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }
}

const BUDGET_KEY: &str = "sk-budget-test";
const N_KEY: &str = "sk-n-test";

/// gpt-4o at 2.50 / 10.00 per million; 50 output tokens held when a request sets no
/// limit; a workspace with a $0.005 budget and one with 10 RPM and 100,000 TPM.
fn policy() -> Policy {
    Policy::from_toml_str(&format!(
        r#"
        [org]
        id = "acme"
        [defaults]
        max_output_tokens = 50
        [[models]]
        name = "gpt-4o"
        input_per_million = "2.50"
        output_per_million = "10.00"
        [[workspaces]]
        id = "ws-budget"
        name = "budget"
        models = ["gpt-4o"]
        budget = {{ limit = "0.005", period = "day" }}
        [[workspaces]]
        id = "ws-n"
        name = "many"
        models = ["gpt-4o"]
        limits = {{ rpm = 10, tpm = 100000 }}
        [[keys]]
        id = "key-budget"
        workspace = "ws-budget"
        secret_sha256 = "{}"
        [[keys]]
        id = "key-n"
        workspace = "ws-n"
        secret_sha256 = "{}"
        "#,
        KeySpec::digest_of(BUDGET_KEY),
        KeySpec::digest_of(N_KEY)
    ))
    .unwrap()
}

/// A chat body whose prompt is in content parts (the shape that used to count as 4
/// tokens), about 400 tokens in all.
fn content_parts_body() -> Value {
    let part = "Summarise the quarterly report on gateway latency and billing accuracy. ";
    json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
            {"role": "user", "content": [
                {"type": "text", "text": part.repeat(10)},
                {"type": "text", "text": part.repeat(15)},
            ]},
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_content_part_requests_spend_no_more_than_the_budget() {
    let upstream = Billing::start().await;
    let gw = Arc::new(Gateway::start_with(&upstream.url, policy()).await);
    let body = content_parts_body();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (gw, body) = (Arc::clone(&gw), body.clone());
            tokio::spawn(async move {
                let response = gw.post("/v1/chat/completions", BUDGET_KEY, &body).await;
                (response.status(), json_of(response).await)
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        let (status, answer) = task.await.unwrap();
        match status.as_u16() {
            200 => admitted += 1,
            402 => assert_eq!(answer["error"]["code"], "budget_exceeded"),
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert!(admitted >= 1);

    // The upstream billed what it was sent: its prompt count, and the output it was
    // allowed, which the gateway capped at the hold.
    let seen = upstream.seen();
    assert_eq!(seen.len(), admitted);
    for forwarded in &seen {
        assert_eq!(forwarded["max_completion_tokens"], 50, "{forwarded}");
    }
    let billed = billed_prompt(&body);
    assert!(billed > 300, "prompt of {billed} tokens");
    let estimate = estimate_chat(&body, &EstimateOptions::for_model("gpt-4o")).unwrap();
    let error = billed.abs_diff(u64::from(estimate.input_tokens));

    let usage = wait_for(
        "the commits",
        || gw.usage(),
        |u| workspace(u, "ws-budget").held == Decimal::ZERO,
    )
    .await;
    let ws = workspace(&usage, "ws-budget");
    assert_eq!(ws.requests as usize, admitted);
    assert_eq!(ws.input_tokens, billed * admitted as u64);
    assert_eq!(ws.output_tokens, 50 * admitted as u64);
    // At most the budget, plus one request's estimate error (priced as input).
    let slack = Decimal::from(error) * dec("0.0000025");
    assert!(
        ws.cost <= dec("0.005") + slack,
        "spent {} of a 0.005 budget in {admitted} requests",
        ws.cost
    );
}

#[tokio::test]
async fn n_outputs_are_held_n_times_and_capped_upstream() {
    let upstream = Billing::start().await;
    let gw = Gateway::start_with(&upstream.url, policy()).await;
    let mut body = json!({"model": "gpt-4o", "n": 8, "max_tokens": 100,
                          "messages": [{"role": "user", "content": "Name eight colours."}]});
    let input = estimate_chat(&body, &EstimateOptions::for_model("gpt-4o"))
        .unwrap()
        .input_tokens;
    let response = gw.post("/v1/chat/completions", N_KEY, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    // The hold on a full bucket: input + 8 × 100.
    let remaining: u64 = header(&response, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(remaining, 100_000 - (u64::from(input) + 800));
    let answer = json_of(response).await;
    assert_eq!(answer["choices"].as_array().unwrap().len(), 8);
    assert_eq!(answer["usage"]["completion_tokens"], 800);

    // Without a limit: the default (50) held for each of the 8, and sent upstream as
    // each choice's cap, so the provider cannot produce more than was held.
    body.as_object_mut().unwrap().remove("max_tokens");
    let response = gw.post("/v1/chat/completions", N_KEY, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json_of(response).await["usage"]["completion_tokens"], 400);
    assert_eq!(upstream.seen()[1]["max_completion_tokens"], 50);
    let ws = workspace(&gw.usage().await, "ws-n");
    assert_eq!(ws.output_tokens, 800 + 400);
    assert_eq!(ws.held, Decimal::ZERO);
}

#[tokio::test]
async fn a_client_that_hangs_up_during_a_forwarded_call_is_charged_what_the_upstream_reported() {
    let upstream = Billing::start().await;
    let gw = Gateway::start_with(&upstream.url, policy()).await;
    let body = json!({"model": "gpt-4o",
                      "messages": [{"role": "user", "content": format!("Write a poem {SLOW}")}]});
    // Build the encoding before the clock starts (a debug build takes a while).
    Tokenizer::O200kBase.prepare();
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{}/v1/chat/completions", gw.url))
        .header("authorization", format!("Bearer {N_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    // Hang up once the upstream has the request and is still working on it (it
    // takes 400 ms).
    let mut call = Box::pin(gw.client.request(request));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while upstream.seen().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never forwarded");
        tokio::select! {
            answer = &mut call => panic!("answered before the hang-up: {answer:?}"),
            () = tokio::time::sleep(Duration::from_millis(2)) => {}
        }
    }
    drop(call);
    assert_eq!(upstream.finished.load(Ordering::SeqCst), 0);

    let usage = wait_for(
        "the commit of the abandoned call",
        || gw.usage(),
        |u| workspace(u, "ws-n").requests == 1,
    )
    .await;
    assert_eq!(upstream.seen().len(), 1, "the call was forwarded");
    assert_eq!(upstream.finished.load(Ordering::SeqCst), 1);
    let ws = workspace(&usage, "ws-n");
    // Exactly the upstream's bill: its prompt count and the 50 tokens it was allowed.
    assert_eq!(
        (ws.input_tokens, ws.output_tokens),
        (billed_prompt(&body), 50)
    );
    // 2.50/M in, 10.00/M out.
    let cost = Decimal::from(ws.input_tokens) * dec("0.0000025") + dec("0.0005");
    assert_eq!(ws.cost, cost);
    assert_eq!(ws.held, Decimal::ZERO);

    // Its RPM unit stays taken: the next request sees 10 - 2 left.
    let next = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]});
    let response = gw.post("/v1/chat/completions", N_KEY, &next).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "x-ratelimit-remaining-requests"),
        Some("8")
    );
}

#[tokio::test]
async fn every_bad_shape_is_a_400_naming_its_field() {
    let gw = start().await;
    let hello = json!([{"role": "user", "content": "Hello"}]);
    let chat = |extra: Value| {
        let mut body = json!({"model": "gpt-4o-mini", "messages": hello});
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        body
    };
    let cases = [
        (
            chat(json!({"max_tokens": -1})),
            "max_tokens",
            "invalid_value",
        ),
        (
            chat(json!({"max_tokens": 1.5})),
            "max_tokens",
            "invalid_value",
        ),
        (
            chat(json!({"max_tokens": "100"})),
            "max_tokens",
            "invalid_value",
        ),
        (
            chat(json!({"max_completion_tokens": -7})),
            "max_completion_tokens",
            "invalid_value",
        ),
        (
            chat(json!({"messages": "Hello"})),
            "messages",
            "invalid_value",
        ),
        (chat(json!({"n": 0})), "n", "invalid_value"),
        (chat(json!({"n": 129})), "n", "invalid_value"),
        (chat(json!({"n": 2.5})), "n", "invalid_value"),
        (
            chat(json!({"messages": [{"role": "user", "content": [{"type": "hologram"}]}]})),
            "messages[0].content[0].type",
            "invalid_value",
        ),
        (
            chat(json!({"messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]})),
            "messages[0].content[0]",
            "cannot_estimate",
        ),
    ];
    for (body, param, code) in cases {
        let answer = gw
            .send(
                Method::POST,
                "/v1/chat/completions",
                "sk-demo-prod",
                Some(body.clone()),
            )
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        let error = &answer.body["error"];
        assert_eq!(error["type"], "invalid_request_error", "{body}");
        assert_eq!(error["param"], param, "{body}");
        assert_eq!(error["code"], code, "{body}");
        assert!(
            error["message"].as_str().unwrap().contains(param),
            "{error}"
        );
    }
    let embed = json!({"model": "text-embedding-3-small", "input": [1, "two"]});
    let answer = gw
        .send(Method::POST, "/v1/embeddings", "sk-demo-prod", Some(embed))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.body["error"]["param"], "input[1]");
    // Nothing was held or charged, and no request unit taken.
    let usage = gw.usage().await;
    let ws = usage.workspaces.iter().find(|w| w.id == "ws-prod").unwrap();
    assert_eq!(ws.usage.current.requests, 0);
    assert_eq!(ws.usage.current.held, Decimal::ZERO);
    let answer = gw.chat("sk-demo-prod", "gpt-4o-mini", None).await;
    assert_eq!(answer.header("x-ratelimit-remaining-requests"), Some("599"));
}

#[tokio::test]
async fn responses_and_legacy_completions_are_estimated_capped_and_charged_the_upstreams_bill() {
    let upstream = Billing::start().await;
    let gw = Gateway::start_with(&upstream.url, policy()).await;
    let model = EstimateOptions::for_model("gpt-4o");

    // Responses: no `max_output_tokens`, so the default of 50 is held and sent as the cap.
    let body = json!({"model": "gpt-4o", "input": "Tell me about token buckets."});
    let input = tollgate::openai::estimate_responses(&body, &model)
        .unwrap()
        .input_tokens;
    let response = gw.post("/v1/responses", N_KEY, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let remaining: u64 = header(&response, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(remaining, 100_000 - (u64::from(input) + 50));
    let answer = json_of(response).await;
    assert_eq!(answer["object"], "response");
    assert_eq!(
        answer["usage"],
        json!({"input_tokens": input, "output_tokens": 50, "total_tokens": input + 50})
    );
    assert_eq!(upstream.seen()[0]["max_output_tokens"], 50);

    // Legacy completions: OpenAI's default of 16 per completion, times best_of.
    let body = json!({"model": "gpt-4o", "prompt": "Once upon a time", "best_of": 3, "n": 1});
    let response = gw.post("/v1/completions", N_KEY, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer = json_of(response).await;
    assert_eq!(answer["object"], "text_completion");
    // The upstream here bills max_tokens × n (16): within the 48 held.
    assert_eq!(answer["usage"]["completion_tokens"], 16);

    let ws = workspace(&gw.usage().await, "ws-n");
    assert_eq!(ws.requests, 2);
    assert_eq!(ws.output_tokens, 50 + 16);
    assert_eq!(ws.held, Decimal::ZERO);

    // Bad shapes, and a stream this gateway does not serve here, are 400s.
    for (path, body, param) in [
        (
            "/v1/responses",
            json!({"model": "gpt-4o", "input": "x", "max_output_tokens": -1}),
            Some("max_output_tokens"),
        ),
        (
            "/v1/responses",
            json!({"model": "gpt-4o", "input": 5}),
            Some("input"),
        ),
        (
            "/v1/completions",
            json!({"model": "gpt-4o", "prompt": "x", "n": 200}),
            Some("n"),
        ),
        (
            "/v1/responses",
            json!({"model": "gpt-4o", "input": "x", "stream": true}),
            None,
        ),
    ] {
        let response = gw.post(path, N_KEY, &body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let error = json_of(response).await;
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        if let Some(param) = param {
            assert_eq!(error["error"]["param"], param, "{error}");
        }
    }
    assert_eq!(upstream.seen().len(), 2);
}
