//! tollgate as a tower layer in front of an axum handler:
//! `cargo run --example axum --features tower`, then
//! `curl -i -X POST -H 'Authorization: Bearer sk-demo' localhost:3000/v1/chat/completions`
//! (the fourth call in a minute is refused with 429 and `Retry-After`).

use axum::body::Body;
use axum::http::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use tollgate::tower::{bearer_token, Extracted, Hold, Rejection, TollgateLayer};
use tollgate::{Engine, Policy, Reservation, Usage};

const POLICY: &str = r#"
[org]
id = "acme"

[[models]]
name = "gpt-4o-mini"
input_per_million = "0.15"
output_per_million = "0.60"

[[workspaces]]
id = "ws-demo"
name = "demo"
models = ["gpt-4o-mini"]
limits = { rpm = 3, tpm = 10000 }
budget = { limit = "1.00", period = "day" }

[[keys]]
id = "key-demo"
workspace = "ws-demo"
secret_sha256 = "f77894fdfa58e447c57e077eaa9708e8e009c84dc6aba2db80461275e9b85be7"
"#;

/// What to reserve for: the bearer key, the model, an input estimate and `max_tokens`.
/// (A real gateway estimates from the body, in a layer in front of this one.)
fn extract(request: &Request<Body>) -> Result<Extracted, Rejection> {
    let key = bearer_token(request).ok_or_else(|| Rejection::unauthorized("missing bearer key"))?;
    Ok(Extracted::secret(key, "gpt-4o-mini")
        .input_tokens(20)
        .max_output_tokens(100))
}

/// The handler sees its hold; the `Usage` it returns is committed by the layer.
async fn chat(Extension(hold): Extension<Hold<Reservation>>) -> Response {
    let reply = serde_json::json!({
        "choices": [{"message": {"role": "assistant", "content": "Hello!"}}],
        "usage": {"prompt_tokens": 18, "completion_tokens": 3},
        "held_usd": hold.reserved_cost().to_string(),
    });
    let mut response = Json(reply).into_response();
    response.extensions_mut().insert(Usage::new(18, 3));
    response
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::new(Policy::from_toml_str(POLICY)?);
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .layer(TollgateLayer::new(engine, extract));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://127.0.0.1:3000 (key: sk-demo)");
    axum::serve(listener, app).await?;
    Ok(())
}
