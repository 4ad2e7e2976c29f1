//! An OpenAI-compatible gateway on tollgate: `cargo run --release --example gateway`,
//! then call it with the curl commands it prints.
//!
//! Flags (each also read from the environment variable in brackets):
//! - `--addr HOST:PORT` [`GATEWAY_ADDR`], default `127.0.0.1:8080`
//! - `--policy FILE` [`GATEWAY_POLICY`], default this example's `policy.toml`
//! - `--redis URL` [`GATEWAY_REDIS`]: counters in Redis (build with `--features redis`)
//! - `--reservation-ttl-secs N` [`GATEWAY_RESERVATION_TTL_SECS`], default 30 (Redis
//!   only): how long a hold outlives its instance if that instance dies; live holds are
//!   renewed every third of it, so it does not limit how long a request may stream
//! - `--mock-delay-ms N` [`MOCK_DELAY_MS`], default 50: the mock provider's latency
//!   (a streamed answer spreads it over its chunks)
//! - `--upstream URL` [`GATEWAY_UPSTREAM`]: forward to this OpenAI-compatible provider
//!   (plain `http://` only; base URL as OpenAI's SDKs take it, e.g.
//!   `http://127.0.0.1:11434/v1`) instead of the mock, with the key in `UPSTREAM_API_KEY`
//! - `--counters FILE` [`GATEWAY_COUNTERS`]: restore the in-memory counters from this
//!   file on start and save them there on shutdown
//! - `--admin-key NAME:ROLE:SECRET` (repeatable) [`GATEWAY_ADMIN_KEYS`, comma-separated]:
//!   a key for the admin API under `/admin/`; ROLE is `admin`, `editor` or `viewer`;
//!   `NAME:ROLE:sha256=HEX` gives only the secret's digest. Only digests are kept.
//!   Without any, three demo keys are used and printed.
//! - `--audit-log PATH` [`GATEWAY_AUDIT_LOG`], default `gateway-audit.jsonl` in the
//!   current directory (appended to); `-` for standard output
//! - `--webhook URL` (repeatable) [`GATEWAY_WEBHOOKS`, comma-separated]: POST budget
//!   threshold and budget exhausted events to this `http://` URL
//! - `--metrics-addr HOST:PORT` [`GATEWAY_METRICS_ADDR`] (build with `--features
//!   metrics`): also serve `GET /metrics` there, without a key; on the main address
//!   `GET /metrics` takes an admin key

mod admin;
mod app;
mod audit;
mod backend;
mod http;
#[cfg(feature = "metrics")]
mod metrics;
mod openai;
mod provider;
mod webhooks;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tollgate::{Engine, EventSink, Policy};

use crate::app::App;
use crate::backend::Backend;
use crate::provider::{MockProvider, Provider, UpstreamProvider};

/// Command-line flags, falling back to environment variables.
struct Options {
    addr: String,
    policy: String,
    redis: Option<String>,
    reservation_ttl_secs: Option<u64>,
    mock_delay_ms: u64,
    counters: Option<PathBuf>,
    admin_keys: Vec<String>,
    audit_log: String,
    webhooks: Vec<String>,
    upstream: Option<String>,
    metrics_addr: Option<String>,
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
            reservation_ttl_secs: env("GATEWAY_RESERVATION_TTL_SECS")
                .map(|v| ttl_secs(&v))
                .transpose()?,
            mock_delay_ms: env("MOCK_DELAY_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(50),
            counters: env("GATEWAY_COUNTERS").map(PathBuf::from),
            admin_keys: list(env("GATEWAY_ADMIN_KEYS")),
            audit_log: env("GATEWAY_AUDIT_LOG").unwrap_or_else(|| "gateway-audit.jsonl".into()),
            webhooks: list(env("GATEWAY_WEBHOOKS")),
            upstream: env("GATEWAY_UPSTREAM"),
            metrics_addr: env("GATEWAY_METRICS_ADDR"),
        };
        // A repeatable flag replaces its environment variable's list.
        let (mut admin_keys, mut webhooks) = (Vec::new(), Vec::new());
        while let Some(flag) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--addr" => options.addr = value()?,
                "--policy" => options.policy = value()?,
                "--redis" => options.redis = Some(value()?),
                "--reservation-ttl-secs" => {
                    options.reservation_ttl_secs = Some(ttl_secs(&value()?)?);
                }
                "--mock-delay-ms" => {
                    options.mock_delay_ms = value()?
                        .parse()
                        .map_err(|e| format!("--mock-delay-ms: {e}"))?;
                }
                "--counters" => options.counters = Some(value()?.into()),
                "--admin-key" => admin_keys.push(value()?),
                "--audit-log" => options.audit_log = value()?,
                "--webhook" => webhooks.push(value()?),
                "--upstream" => options.upstream = Some(value()?),
                "--metrics-addr" => options.metrics_addr = Some(value()?),
                "--help" | "-h" => return Err(usage()),
                other => return Err(format!("unknown flag {other}\n{}", usage())),
            }
        }
        if !admin_keys.is_empty() {
            options.admin_keys = admin_keys;
        }
        if !webhooks.is_empty() {
            options.webhooks = webhooks;
        }
        Ok(options)
    }
}

/// A reservation TTL in whole seconds, at least 1.
fn ttl_secs(value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(secs) if secs > 0 => Ok(secs),
        _ => Err(format!(
            "--reservation-ttl-secs: {value:?} is not a whole number of seconds above 0"
        )),
    }
}

/// A bad flag: say why and stop.
fn exit(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(2);
}

/// A comma-separated environment variable's items.
fn list(value: Option<String>) -> Vec<String> {
    value
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

fn usage() -> String {
    "usage: gateway [--addr HOST:PORT] [--policy FILE] [--redis URL] \
     [--reservation-ttl-secs N] [--mock-delay-ms N] \
     [--counters FILE] [--upstream URL] \
     [--admin-key NAME:ROLE:SECRET]... [--audit-log PATH|-] [--webhook URL]... \
     [--metrics-addr HOST:PORT]"
        .into()
}

/// The engine's metrics recorder, when the build has metrics.
#[cfg(feature = "metrics")]
type Recorder = Option<Arc<metrics_exporter_prometheus::PrometheusRecorder>>;
#[cfg(not(feature = "metrics"))]
type Recorder = ();

async fn backend(
    options: &Options,
    policy: Policy,
    events: Arc<dyn EventSink>,
    recorder: Recorder,
) -> Result<Backend, Box<dyn std::error::Error>> {
    if let Some(url) = &options.redis {
        #[cfg(feature = "redis")]
        {
            let defaults = tollgate::RedisConfig::default();
            let config = tollgate::RedisConfig {
                events: Some(events),
                reservation_ttl: options
                    .reservation_ttl_secs
                    .map_or(defaults.reservation_ttl, Duration::from_secs),
                #[cfg(feature = "metrics")]
                metrics_recorder: recorder.map(|r| r as _),
                ..defaults
            };
            let engine = tollgate::RedisEngine::connect(url, policy, config).await?;
            return Ok(Backend::Redis(engine));
        }
        #[cfg(not(feature = "redis"))]
        return Err(format!(
            "--redis {url}: this build has no Redis backend; run with --features redis"
        )
        .into());
    }
    if options.reservation_ttl_secs.is_some() {
        eprintln!("--reservation-ttl-secs: only the Redis backend has reservation TTLs; ignored");
    }
    let builder = Engine::builder(policy).events(events);
    #[cfg(feature = "metrics")]
    let builder = match recorder {
        Some(recorder) => builder.metrics_recorder(recorder),
        None => builder,
    };
    #[cfg(not(feature = "metrics"))]
    let () = recorder;
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
    let provider = match &options.upstream {
        Some(url) => Provider::Upstream(UpstreamProvider::new(
            url,
            std::env::var("UPSTREAM_API_KEY").ok(),
        )?),
        None => Provider::Mock(MockProvider {
            delay: Duration::from_millis(options.mock_delay_ms),
        }),
    };
    let admin_keys = if options.admin_keys.is_empty() {
        admin::AdminKeys::demo()
    } else {
        admin::AdminKeys::parse(&options.admin_keys).unwrap_or_else(|message| exit(&message))
    };
    let audit = match options.audit_log.as_str() {
        "-" => audit::Audit::to_stdout(),
        path => audit::Audit::to_file(std::path::Path::new(path)),
    }
    .map_err(|e| format!("--audit-log {}: {e}", options.audit_log))?;
    let events = Arc::new(webhooks::GatewayEvents {
        audit: audit.clone(),
        webhooks: webhooks::Webhooks::start(&options.webhooks, webhooks::Config::default())
            .unwrap_or_else(|message| exit(&message)),
    });
    #[cfg(feature = "metrics")]
    let (recorder, metrics) = {
        let (recorder, handle) = metrics::recorder();
        (Some(recorder), handle)
    };
    #[cfg(not(feature = "metrics"))]
    let recorder = ();
    let sink = Arc::clone(&events) as Arc<dyn EventSink>;
    let app = Arc::new(App {
        backend: backend(&options, policy, sink, recorder).await?,
        provider,
        admin: admin_keys,
        audit,
        counters: options.counters.clone(),
        #[cfg(feature = "metrics")]
        metrics,
    });
    serve_metrics(&options, &app).await?;
    let listener = tokio::net::TcpListener::bind(&options.addr).await?;
    let url = format!("http://{}", listener.local_addr()?);
    print_welcome(
        &url,
        &options.policy,
        app.backend.name(),
        &app.provider.describe(),
    );
    print_admin(&url, &app, !options.admin_keys.is_empty(), &events.webhooks);
    println!("Ctrl-C to stop.");

    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        println!("\nshutting down: finishing requests in flight");
    };
    app::serve(listener, Arc::clone(&app), shutdown).await;
    let (audit, hooks) = (&app.audit, &events.webhooks);
    println!(
        "audit log: {} line(s) written, {} dropped, {} failed; webhooks: {} delivered, \
         {} retried, {} failed, {} dropped",
        audit.written(),
        audit.dropped(),
        audit.failed(),
        hooks.delivered(),
        hooks.retried(),
        hooks.failed(),
        hooks.dropped()
    );
    Ok(())
}

/// `--metrics-addr`: `GET /metrics` on its own listener.
#[cfg(feature = "metrics")]
async fn serve_metrics(options: &Options, app: &App) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(addr) = &options.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("metrics: http://{}/metrics", listener.local_addr()?);
        tokio::spawn(metrics::serve(listener, app.metrics.clone()));
    }
    Ok(())
}

#[cfg(not(feature = "metrics"))]
async fn serve_metrics(options: &Options, _: &App) -> Result<(), Box<dyn std::error::Error>> {
    match &options.metrics_addr {
        Some(addr) => Err(format!(
            "--metrics-addr {addr}: this build has no metrics; run with --features metrics"
        )
        .into()),
        None => Ok(()),
    }
}

fn print_welcome(url: &str, policy_path: &str, backend: &str, provider: &str) {
    println!("tollgate example gateway on {url} ({backend}, {provider})");
    println!("policy: {policy_path}");
    println!();
    println!("demo keys:");
    println!("  sk-demo-prod     chatbot-production: gpt-4o-mini, gpt-4o, text-embedding-3-small");
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
    println!("  # streamed, with the usage chunk at the end");
    println!(
        "  curl -N {url}/v1/chat/completions -H 'Authorization: Bearer sk-demo-prod' \\\n    -H 'Content-Type: application/json' \\\n    -d '{{\"model\":\"gpt-4o-mini\",\"stream\":true,\"stream_options\":{{\"include_usage\":true}},\"messages\":[{{\"role\":\"user\",\"content\":\"Hi\"}}]}}'"
    );
    println!(
        "  curl {url}/v1/embeddings -H 'Authorization: Bearer sk-demo-prod' \\\n    -H 'Content-Type: application/json' \\\n    -d '{{\"model\":\"text-embedding-3-small\",\"input\":[\"Hello\",\"world\"]}}'"
    );
    println!("  curl {url}/v1/models -H 'Authorization: Bearer sk-demo-staging'");
    println!();
}

fn print_admin(url: &str, app: &App, configured: bool, hooks: &webhooks::Webhooks) {
    if configured {
        println!("admin API on {url}/admin/, keys:");
        for key in app.admin.keys() {
            println!("  {:<16} {}", key.name, key.role.name());
        }
    } else {
        println!("admin API on {url}/admin/ with demo admin keys (replace with --admin-key):");
        for (name, role, secret) in admin::DEMO_KEYS {
            println!("  {secret:<16} {name:<12} {}", role.name());
        }
        println!("  curl {url}/admin/usage -H 'Authorization: Bearer sk-viewer-demo'");
        println!(
            "  curl -X PATCH {url}/admin/workspaces/ws-staging -H 'Authorization: Bearer sk-editor-demo' \\\n    -d '{{\"limits\":{{\"rpm\":10,\"tpm\":20000}}}}'"
        );
    }
    println!("audit log: {}", app.audit.destination());
    #[cfg(feature = "metrics")]
    println!("metrics (Prometheus text): curl {url}/metrics -H 'Authorization: Bearer ADMIN_KEY'");
    match hooks.urls() {
        [] => println!("webhooks: none (--webhook URL for budget alerts)"),
        urls => {
            println!("webhooks: {}", urls.join(", "));
            println!("  budgets alert at their alert_thresholds; give the playground some:");
            let editor = if configured {
                "EDITOR_KEY"
            } else {
                "sk-editor-demo"
            };
            println!(
                "  curl -X PATCH {url}/admin/workspaces/ws-playground -H 'Authorization: Bearer {editor}' \\\n    -d '{{\"budget\":{{\"limit\":\"0.002\",\"period\":\"day\",\"alert_thresholds\":[50,80,100]}}}}'"
            );
        }
    }
    println!();
}
