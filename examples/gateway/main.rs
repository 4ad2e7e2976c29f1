//! An OpenAI-compatible gateway on tollgate: `cargo run --release --example gateway`,
//! then call it with the curl commands it prints.
//!
//! Flags (each also read from the environment variable in brackets):
//! - `--addr HOST:PORT` [`GATEWAY_ADDR`], default `127.0.0.1:8080`
//! - `--policy FILE` [`GATEWAY_POLICY`], default this example's `policy.toml`
//! - `--redis URL` [`GATEWAY_REDIS`]: counters in Redis (build with `--features redis`)
//! - `--mock-delay-ms N` [`MOCK_DELAY_MS`], default 50: the mock provider's latency
//! - `--counters FILE` [`GATEWAY_COUNTERS`]: restore the in-memory counters from this
//!   file on start and save them there on shutdown

mod admin;
mod app;
mod audit;
mod backend;
mod http;
mod openai;
mod provider;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tollgate::{Engine, Policy};

use crate::app::App;
use crate::backend::Backend;
use crate::provider::{MockProvider, Provider};

/// Command-line flags, falling back to environment variables.
struct Options {
    addr: String,
    policy: String,
    redis: Option<String>,
    mock_delay_ms: u64,
    counters: Option<PathBuf>,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let mut args = std::env::args().skip(1);
        let env = |name: &str| std::env::var(name).ok();
        let mut options = Options {
            addr: env("GATEWAY_ADDR").unwrap_or_else(|| "127.0.0.1:8080".into()),
            policy: env("GATEWAY_POLICY").unwrap_or_else(|| {
                concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway/policy.toml").into()
            }),
            redis: env("GATEWAY_REDIS"),
            mock_delay_ms: env("MOCK_DELAY_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(50),
            counters: env("GATEWAY_COUNTERS").map(PathBuf::from),
        };
        while let Some(flag) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--addr" => options.addr = value()?,
                "--policy" => options.policy = value()?,
                "--redis" => options.redis = Some(value()?),
                "--mock-delay-ms" => {
                    options.mock_delay_ms = value()?
                        .parse()
                        .map_err(|e| format!("--mock-delay-ms: {e}"))?;
                }
                "--counters" => options.counters = Some(value()?.into()),
                "--help" | "-h" => return Err(usage()),
                other => return Err(format!("unknown flag {other}\n{}", usage())),
            }
        }
        Ok(options)
    }
}

fn usage() -> String {
    "usage: gateway [--addr HOST:PORT] [--policy FILE] [--redis URL] [--mock-delay-ms N] \
     [--counters FILE]"
        .into()
}

async fn backend(options: &Options, policy: Policy) -> Result<Backend, Box<dyn std::error::Error>> {
    if let Some(url) = &options.redis {
        #[cfg(feature = "redis")]
        {
            let engine =
                tollgate::RedisEngine::connect(url, policy, tollgate::RedisConfig::default())
                    .await?;
            return Ok(Backend::Redis(engine));
        }
        #[cfg(not(feature = "redis"))]
        return Err(format!(
            "--redis {url}: this build has no Redis backend; run with --features redis"
        )
        .into());
    }
    let builder = Engine::builder(policy);
    let engine = match &options.counters {
        Some(path) if path.exists() => builder.restore_counters(path)?,
        _ => builder.build(),
    };
    Ok(Backend::Memory(engine))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let policy = Policy::from_path(&options.policy)?;
    let app = Arc::new(App {
        backend: backend(&options, policy).await?,
        provider: Provider::Mock(MockProvider {
            delay: Duration::from_millis(options.mock_delay_ms),
        }),
        admin: admin::AdminKeys::default(),
        audit: audit::Audit::default(),
        counters: options.counters.clone(),
    });
    let listener = tokio::net::TcpListener::bind(&options.addr).await?;
    let url = format!("http://{}", listener.local_addr()?);
    print_welcome(&url, &options.policy, app.backend.name());

    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("\nshutting down: finishing requests in flight");
    };
    app::serve(listener, app, shutdown).await;
    Ok(())
}

fn print_welcome(url: &str, policy_path: &str, backend: &str) {
    println!("tollgate example gateway on {url} ({backend}, mock provider)");
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
