//! An OpenAI-compatible gateway on tollgate's in-memory engine, with a built-in mock
//! provider: `cargo run --release --example gateway`, then call it with curl.
//!
//! Options (environment): `GATEWAY_ADDR` (default `127.0.0.1:8080`), `GATEWAY_POLICY`
//! (default this example's `policy.toml`), `MOCK_DELAY_MS` (default 50).

mod mock;
mod server;

use std::sync::Arc;
use std::time::Duration;

use tollgate::{Engine, Policy};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("GATEWAY_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let policy_path = std::env::var("GATEWAY_POLICY").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway/policy.toml").into()
    });
    let delay = std::env::var("MOCK_DELAY_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(50);

    let policy = Policy::from_path(&policy_path)?;
    let gateway = Arc::new(server::Gateway {
        engine: Engine::new(policy),
        provider: mock::MockProvider {
            delay: Duration::from_millis(delay),
        },
    });
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let url = format!("http://{}", listener.local_addr()?);
    print_welcome(&url, &policy_path);

    tokio::select! {
        () = server::serve(listener, gateway) => {}
        _ = tokio::signal::ctrl_c() => println!("\nshutting down"),
    }
    Ok(())
}

fn print_welcome(url: &str, policy_path: &str) {
    println!("tollgate example gateway on {url} (in-memory engine, mock provider)");
    println!("policy: {policy_path}");
    println!();
    println!("demo keys:");
    println!("  sk-demo-prod     chatbot-production: gpt-4o-mini, gpt-4o");
    println!("  sk-demo-staging  chatbot-staging: gpt-4o-mini, 3 requests per minute");
    println!("  sk-demo-default  playground (default workspace): every model, 0.002 USD a day");
    println!();
    println!("try:");
    println!(
        "  curl -i {url}/v1/chat/completions -H 'Authorization: Bearer sk-demo-prod' \\\n    -H 'Content-Type: application/json' \\\n    -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'"
    );
    println!("  # run four times within a minute: the fourth answers 429 with Retry-After");
    println!(
        "  curl -i {url}/v1/chat/completions -H 'Authorization: Bearer sk-demo-staging' \\\n    -H 'Content-Type: application/json' \\\n    -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}]}}'"
    );
    println!("  # run five times: the fifth answers 402, the day's budget is spent");
    println!(
        "  curl -i {url}/v1/chat/completions -H 'Authorization: Bearer sk-demo-default' \\\n    -H 'Content-Type: application/json' \\\n    -d '{{\"model\":\"gpt-4o\",\"max_tokens\":50,\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}]}}'"
    );
    println!("  curl {url}/v1/models -H 'Authorization: Bearer sk-demo-staging'");
    println!();
    println!("Ctrl-C to stop.");
}
