//! The gateway's HTTP side: OpenAI-compatible routes in front of the tollgate engine.
//!
//! Per request: authenticate by bearer key, estimate input tokens, `check_and_reserve`,
//! call the provider, `commit_usage` with what it reports. A provider error drops the
//! reservation, which gives everything back. Every response carries the rate-limit
//! headers; a denial is an OpenAI-style JSON error with its status and `Retry-After`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tollgate::{Engine, RateLimitHeaders, Request, Usage};

use crate::mock::MockProvider;

/// Requests bigger than this are refused before parsing.
const MAX_BODY: usize = 1 << 20;

/// What every connection shares.
pub struct Gateway {
    pub engine: Engine,
    pub provider: MockProvider,
}

type Reply = Response<Full<Bytes>>;

/// Accept connections until the task is dropped or aborted.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let gateway = Arc::clone(&gateway);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let gateway = Arc::clone(&gateway);
                async move { Ok::<_, Infallible>(gateway.handle(request).await) }
            });
            // A client that hangs up mid-request is not the gateway's error.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Gateway {
    async fn handle(&self, request: HttpRequest<Incoming>) -> Reply {
        match (request.method(), request.uri().path()) {
            (&Method::POST, "/v1/chat/completions") => self.chat(request).await,
            (&Method::GET, "/v1/models") => self.models(&request),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        }
    }

    fn models(&self, request: &HttpRequest<Incoming>) -> Reply {
        let Some(secret) = bearer(request) else {
            return missing_key();
        };
        let policy = self.engine.policy();
        let models: Vec<Value> = policy
            .document()
            .models
            .iter()
            .filter(|model| {
                // A model is listed if this key may call it right now.
                let probe = Request::with_secret(secret, &model.name).max_output_tokens(0);
                match self.engine.check_and_reserve(&probe) {
                    Ok(_reservation) => true, // dropped: gives its hold back
                    Err(denial) => denial.is_rate_limit(),
                }
            })
            .map(|model| json!({"id": model.name, "object": "model", "owned_by": "tollgate-demo"}))
            .collect();
        json_reply(StatusCode::OK, &json!({"object": "list", "data": models}))
    }

    async fn chat(&self, request: HttpRequest<Incoming>) -> Reply {
        let Some(secret) = bearer(&request).map(str::to_owned) else {
            return missing_key();
        };
        let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    "body too large",
                )
            }
        };
        let Ok(body) = serde_json::from_slice::<Value>(&body) else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "body is not JSON",
            );
        };
        let Some(model) = body["model"].as_str() else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "`model` is required",
            );
        };
        let max_tokens = body["max_tokens"]
            .as_u64()
            .or_else(|| body["max_completion_tokens"].as_u64())
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        let prompt_tokens = estimate_prompt_tokens(&body["messages"]);

        let mut ask = Request::with_secret(&secret, model).input_tokens(prompt_tokens);
        if let Some(max) = max_tokens {
            ask = ask.max_output_tokens(max);
        }
        let reservation = match self.engine.check_and_reserve(&ask) {
            Ok(reservation) => reservation,
            Err(denial) => {
                let status = StatusCode::from_u16(denial.http_status())
                    .unwrap_or(StatusCode::TOO_MANY_REQUESTS);
                let mut reply = error(status, denial.code(), &denial.to_string());
                add_headers(&mut reply, &RateLimitHeaders::for_denial(&denial));
                return reply;
            }
        };
        let headers = RateLimitHeaders::for_reservation(&reservation);
        let answer = self.provider.complete(prompt_tokens, max_tokens).await;
        let usage = Usage::new(answer.prompt_tokens, answer.completion_tokens);
        let receipt = match self.engine.commit_usage(reservation, usage) {
            Ok(receipt) => receipt,
            Err(err) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    &err.to_string(),
                )
            }
        };
        let mut reply = json_reply(
            StatusCode::OK,
            &json!({
                "object": "chat.completion",
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": "stop",
                }],
                "usage": {
                    "prompt_tokens": receipt.input_tokens(),
                    "completion_tokens": receipt.output_tokens(),
                    "total_tokens": receipt.input_tokens() + receipt.output_tokens(),
                },
                "x_tollgate": {"cost_usd": receipt.cost().to_string()},
            }),
        );
        add_headers(&mut reply, &headers);
        reply
    }
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

fn bearer(request: &HttpRequest<Incoming>) -> Option<&str> {
    request
        .headers()
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn missing_key() -> Reply {
    error(
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
        "missing bearer key",
    )
}

fn add_headers(reply: &mut Reply, headers: &RateLimitHeaders) {
    for (name, value) in headers.iter() {
        if let Ok(value) = HeaderValue::from_str(value.as_str()) {
            reply.headers_mut().insert(name, value);
        }
    }
}

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(body.to_string())));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    reply
}

/// OpenAI's error shape: `{"error": {"message", "type", "code"}}`.
fn error(status: StatusCode, code: &str, message: &str) -> Reply {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        402 | 429 => "rate_limit_error",
        403 => "permission_error",
        404 => "not_found_error",
        _ => "invalid_request_error",
    };
    json_reply(
        status,
        &json!({"error": {"message": message, "type": kind, "code": code}}),
    )
}
