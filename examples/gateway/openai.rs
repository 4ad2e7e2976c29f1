//! The OpenAI-compatible routes: chat completions, embeddings, models.
//!
//! Per request: authenticate by bearer key, estimate input tokens, `check_and_reserve`,
//! call the provider, `commit_usage` with what it reports. A provider error drops the
//! reservation, which gives everything back. Every response carries the rate-limit
//! headers; a denial is an OpenAI-style JSON error with its status and `Retry-After`.

use hyper::body::Incoming;
use hyper::{Request as HttpRequest, StatusCode};
use serde_json::{json, Value};
use tollgate::{Request, Usage};

use crate::app::App;
use crate::http::{add_headers, bearer, denied, error, json_reply, missing_key, read_json, Reply};
use crate::provider::Provider;

pub async fn models(app: &App, request: &HttpRequest<Incoming>) -> Reply {
    let Some(secret) = bearer(request) else {
        return missing_key();
    };
    let policy = app.backend.policy();
    let mut models = Vec::new();
    for model in &policy.document().models {
        // A model is listed if this key may call it right now.
        let probe = Request::with_secret(secret, &model.name).max_output_tokens(0);
        let listed = match app.backend.check_and_reserve(&probe).await {
            Ok(_held) => true, // dropped: gives its hold back
            Err(denial) => denial.is_rate_limit(),
        };
        if listed {
            models.push(json!({"id": model.name, "object": "model", "owned_by": "tollgate-demo"}));
        }
    }
    json_reply(StatusCode::OK, &json!({"object": "list", "data": models}))
}

pub async fn chat(app: &App, request: HttpRequest<Incoming>) -> Reply {
    let Some(secret) = bearer(&request).map(str::to_owned) else {
        return missing_key();
    };
    let body = match read_json(request).await {
        Ok(body) => body,
        Err(reply) => return reply,
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
    let held = match app.backend.check_and_reserve(&ask).await {
        Ok(held) => held,
        Err(denial) => return denied(&denial),
    };
    let headers = held.headers();
    let answer = match &app.provider {
        Provider::Mock(mock) => mock.complete(prompt_tokens, max_tokens).await,
    };
    let usage = Usage::new(answer.prompt_tokens, answer.completion_tokens);
    let receipt = match app.backend.commit_usage(held, usage).await {
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

pub async fn embeddings(_app: &App, _request: HttpRequest<Incoming>) -> Reply {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "embeddings are not served yet",
    )
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
