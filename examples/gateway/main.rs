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
//! - `--lease` [`GATEWAY_LEASE=1`] (Redis only): quota leasing with its defaults
//!   (`RedisConfig::lease`): busy keys are admitted from chunks taken from Redis in one
//!   call, settled together; see the README for what it trades
//! - `--mock-delay-ms N` [`MOCK_DELAY_MS`], default 50: the mock provider's latency
//!   (a streamed answer spreads it over its chunks)
//! - `--upstream URL` [`GATEWAY_UPSTREAM`]: forward to this OpenAI-compatible provider
//!   (plain `http://` only; base URL as OpenAI's SDKs take it, e.g.
//!   `http://127.0.0.1:11434/v1`) instead of the mock, with the key in `UPSTREAM_API_KEY`
//! - `--counters FILE` [`GATEWAY_COUNTERS`]: restore the in-memory counters from this
//!   file on start and save them there on shutdown
//! - `--state-dir DIR` [`GATEWAY_STATE_DIR`] (in-memory engine): keep the policy in
//!   `DIR/policy.json`, every admin change saved there before it is acknowledged, and
//!   the counters in `DIR/counters.json` (unless `--counters` says elsewhere). The
//!   first start seeds it from `--policy`; later starts load it and ignore `--policy`.
//!   With `--redis`, the policy lives in Redis instead (seeded from `--policy` if
//!   Redis has none)
//! - `--admin-key NAME:ROLE:SECRET` (repeatable) [`GATEWAY_ADMIN_KEYS`, comma-separated]:
//!   a key for the admin API under `/admin/`; ROLE is `admin`, `editor` or `viewer`;
//!   `NAME:ROLE:sha256=HEX` gives only the secret's digest. Only digests are kept.
//!   Without any, three demo keys are used and printed.
//! - `--audit-log PATH` [`GATEWAY_AUDIT_LOG`], default `gateway-audit.jsonl` in the
//!   current directory (appended to); `-` for standard output
//! - `--webhook URL` (repeatable) [`GATEWAY_WEBHOOKS`, comma-separated]: POST budget
//!   threshold and budget exhausted events to this `http://` URL
//! - `--request-log PATH` [`GATEWAY_REQUEST_LOG`], default `gateway-requests.jsonl`
//!   (appended to); `-` for standard output: one JSON line per API request; the
//!   recent ones of each workspace are served at `GET /admin/workspaces/{id}/requests`
//! - `--log-max-bytes N` [`GATEWAY_LOG_MAX_BYTES`], default 64 MiB: the audit and
//!   request logs rotate at this size, keeping three old files (`PATH.1` … `PATH.3`)
//! - `--max-connections N` [`GATEWAY_MAX_CONNECTIONS`], default 4096 (lowered to fit
//!   the open-files limit, which is first raised to its hard limit): beyond it an idle
//!   connection is closed to make room, or the new one answered 503
//! - `--header-timeout-secs N` [`GATEWAY_HEADER_TIMEOUT_SECS`], default 10: the
//!   longest wait for a request head, which also closes idle keep-alive connections
//! - `--body-timeout-secs N` [`GATEWAY_BODY_TIMEOUT_SECS`], default 30: the longest a
//!   request body may take to arrive (408 beyond)
//!
//! SIGTERM and SIGINT (Ctrl-C) both shut down gracefully: stop accepting, finish
//! requests in flight (up to 30 s), flush the logs, save the counters.
//! - `--metrics-addr HOST:PORT` [`GATEWAY_METRICS_ADDR`] (build with `--features
//!   metrics`): also serve `GET /metrics` there, without a key; on the main address
//!   `GET /metrics` takes an admin key

mod access;
mod admin;
mod app;
mod audit;
mod backend;
mod caller;
mod connections;
mod http;
mod jsonl;
#[cfg(feature = "metrics")]
mod metrics;
mod openai;
mod provider;
mod requests;
mod summary;
mod webhooks;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tollgate::{Engine, EventSink, FilePolicyStore, Policy, PolicyError};

use crate::app::App;
use crate::backend::Backend;
use crate::connections::Limits;
use crate::jsonl::Rotation;
use crate::provider::{MockProvider, Provider, UpstreamProvider};

/// Command-line flags, falling back to environment variables.
struct Options {
    addr: String,
    policy: String,
    redis: Option<String>,
    reservation_ttl_secs: Option<u64>,
    lease: bool,
    mock_delay_ms: u64,
    counters: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    admin_keys: Vec<String>,
    audit_log: String,
    webhooks: Vec<String>,
    upstream: Option<String>,
    limits: Limits,
    request_log: String,
    rotation: Rotation,
    metrics_addr: Option<String>,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let mut args = std::env::args().skip(1);
        let env = |name: &str| std::env::var(name).ok();
        let defaults = Limits::default();
        let limits = Limits {
            max_connections: env("GATEWAY_MAX_CONNECTIONS")
                .map(|v| positive("GATEWAY_MAX_CONNECTIONS", &v))
                .transpose()?
                .map_or(defaults.max_connections, |n| n as usize),
            header_timeout: env("GATEWAY_HEADER_TIMEOUT_SECS")
                .map(|v| positive("GATEWAY_HEADER_TIMEOUT_SECS", &v))
                .transpose()?
                .map_or(defaults.header_timeout, Duration::from_secs),
            body_timeout: env("GATEWAY_BODY_TIMEOUT_SECS")
                .map(|v| positive("GATEWAY_BODY_TIMEOUT_SECS", &v))
                .transpose()?
                .map_or(defaults.body_timeout, Duration::from_secs),
        };
        let mut options = Options {
            addr: env("GATEWAY_ADDR").unwrap_or_else(|| "127.0.0.1:8080".into()),
            policy: env("GATEWAY_POLICY").unwrap_or_else(|| DEMO_POLICY.into()),
            redis: env("GATEWAY_REDIS"),
            reservation_ttl_secs: env("GATEWAY_RESERVATION_TTL_SECS")
                .map(|v| ttl_secs(&v))
                .transpose()?,
            lease: env("GATEWAY_LEASE").is_some_and(|v| v == "1" || v == "true"),
            mock_delay_ms: env("MOCK_DELAY_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(50),
            counters: env("GATEWAY_COUNTERS").map(PathBuf::from),
            state_dir: env("GATEWAY_STATE_DIR").map(PathBuf::from),
            admin_keys: list(env("GATEWAY_ADMIN_KEYS")),
            audit_log: env("GATEWAY_AUDIT_LOG").unwrap_or_else(|| "gateway-audit.jsonl".into()),
            webhooks: list(env("GATEWAY_WEBHOOKS")),
            upstream: env("GATEWAY_UPSTREAM"),
            limits,
            request_log: env("GATEWAY_REQUEST_LOG")
                .unwrap_or_else(|| "gateway-requests.jsonl".into()),
            rotation: Rotation {
                max_bytes: env("GATEWAY_LOG_MAX_BYTES")
                    .map(|v| positive("GATEWAY_LOG_MAX_BYTES", &v))
                    .transpose()?
                    .unwrap_or(Rotation::default().max_bytes),
                ..Rotation::default()
            },
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
                "--lease" => options.lease = true,
                "--mock-delay-ms" => {
                    options.mock_delay_ms = value()?
                        .parse()
                        .map_err(|e| format!("--mock-delay-ms: {e}"))?;
                }
                "--counters" => options.counters = Some(value()?.into()),
                "--state-dir" => options.state_dir = Some(value()?.into()),
                "--admin-key" => admin_keys.push(value()?),
                "--audit-log" => options.audit_log = value()?,
                "--webhook" => webhooks.push(value()?),
                "--upstream" => options.upstream = Some(value()?),
                "--request-log" => options.request_log = value()?,
                "--log-max-bytes" => options.rotation.max_bytes = positive(&flag, &value()?)?,
                "--max-connections" => {
                    options.limits.max_connections = positive(&flag, &value()?)? as usize;
                }
                "--header-timeout-secs" => {
                    options.limits.header_timeout =
                        Duration::from_secs(positive(&flag, &value()?)?);
                }
                "--body-timeout-secs" => {
                    options.limits.body_timeout = Duration::from_secs(positive(&flag, &value()?)?);
                }
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
        if let (Some(dir), None, None) = (&options.state_dir, &options.counters, &options.redis) {
            options.counters = Some(dir.join("counters.json"));
        }
        Ok(options)
    }
}

/// A reservation TTL in whole seconds, at least 1.
fn ttl_secs(value: &str) -> Result<u64, String> {
    positive("--reservation-ttl-secs", value)
}

/// A whole number above 0 (and below a million million, so no duration overflows).
fn positive(flag: &str, value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(n) if n > 0 && n < 1_000_000_000_000 => Ok(n),
        _ => Err(format!("{flag}: {value:?} is not a whole number above 0")),
    }
}

/// Raise the soft open-files limit to the hard one, and lower the connection cap to
/// fit what is allowed, keeping room for files, Redis and upstream connections.
fn fit_connections(limits: &mut Limits) {
    const KEEP_FREE: u64 = 256;
    let allowed = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(allowed) => allowed,
        Err(e) => {
            eprintln!("could not read the open-files limit: {e}");
            return;
        }
    };
    let fits = allowed.saturating_sub(KEEP_FREE).max(16);
    if (limits.max_connections as u64) > fits {
        eprintln!(
            "--max-connections {} lowered to {fits}: the open-files limit is {allowed}",
            limits.max_connections
        );
        limits.max_connections = fits as usize;
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
     [--reservation-ttl-secs N] [--lease] [--mock-delay-ms N] \
     [--counters FILE] [--state-dir DIR] [--upstream URL] \
     [--admin-key NAME:ROLE:SECRET]... [--audit-log PATH|-] [--webhook URL]... \
     [--request-log PATH|-] [--log-max-bytes N] \
     [--max-connections N] [--header-timeout-secs N] [--body-timeout-secs N] \
     [--metrics-addr HOST:PORT]"
        .into()
}

/// The policy to start with, and the file every admin change is saved to: with
/// `--state-dir` (in memory), the saved one, seeded from `--policy` on first start.
fn load_policy(options: &Options) -> Result<(Policy, Option<FilePolicyStore>), PolicyError> {
    let seed = || Policy::from_path(&options.policy);
    match &options.state_dir {
        Some(dir) if options.redis.is_none() => {
            std::fs::create_dir_all(dir).map_err(|source| PolicyError::Io {
                path: dir.display().to_string(),
                source,
            })?;
            let (store, policy) = FilePolicyStore::open_or_seed(dir.join("policy.json"), seed)?;
            println!(
                "policy state: {} (version {}; every admin change is saved there)",
                store.path().display(),
                store.version()
            );
            Ok((policy, Some(store)))
        }
        Some(_) => {
            eprintln!("--state-dir: with --redis the policy lives in Redis; ignored");
            Ok((seed()?, None))
        }
        None => Ok((seed()?, None)),
    }
}

/// The engine's metrics recorder, when the build has metrics.
#[cfg(feature = "metrics")]
type Recorder = Option<Arc<metrics_exporter_prometheus::PrometheusRecorder>>;
#[cfg(not(feature = "metrics"))]
type Recorder = ();

async fn backend(
    options: &Options,
    (policy, store): (Policy, Option<FilePolicyStore>),
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
                lease: options.lease.then(tollgate::LeaseConfig::default),
                #[cfg(feature = "metrics")]
                metrics_recorder: recorder.map(|r| r as _),
                ..defaults
            };
            let engine = tollgate::RedisEngine::connect(url, policy, config).await?;
            log_policy_versions(&engine);
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
    if options.lease {
        eprintln!("--lease: only the Redis backend leases; ignored");
    }
    let mut builder = Engine::builder(policy).events(events);
    if let Some(store) = store {
        builder = builder.policy_store(Arc::new(store));
    }
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

/// Say which version of the shared policy this instance runs, at start and each time
/// it applies a new one (its own admin changes and other instances' alike).
#[cfg(feature = "redis")]
fn log_policy_versions(engine: &tollgate::RedisEngine) {
    let mut versions = engine.watch_policy_version();
    println!(
        "policy: version {} from Redis (shared by every instance; --policy only seeds an empty Redis)",
        *versions.borrow_and_update()
    );
    tokio::spawn(async move {
        while versions.changed().await.is_ok() {
            let version = *versions.borrow_and_update();
            println!("applied policy version {version}");
        }
    });
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut options = match Options::parse() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    fit_connections(&mut options.limits);
    let policy = load_policy(&options)?;
    // Each encoding the price table needs is built now, not on the first request
    // (a model added later builds its encoding on first use).
    for model in &policy.0.document().models {
        tollgate::openai::EstimateOptions::from_spec(model)
            .tokenizer
            .prepare();
    }
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
        path => audit::Audit::to_file(std::path::Path::new(path), options.rotation),
    }
    .map_err(|e| format!("--audit-log {}: {e}", options.audit_log))?;
    let events = Arc::new(webhooks::GatewayEvents::new(
        audit.clone(),
        webhooks::Webhooks::start(&options.webhooks, webhooks::Config::default())
            .unwrap_or_else(|message| exit(&message)),
    ));
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
        limits: options.limits,
        connections: Arc::default(),
        background: Arc::default(),
        requests: Arc::new(
            requests::RequestLog::to_path(&options.request_log, options.rotation)
                .map_err(|e| format!("--request-log {}: {e}", options.request_log))?,
        ),
        #[cfg(feature = "metrics")]
        metrics,
    });
    app.follow_webhooks(&events);
    serve_metrics(&options, &app).await?;
    let listener = tokio::net::TcpListener::bind(&options.addr).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let backend = match (app.backend.name(), options.lease && options.redis.is_some()) {
        (name, true) => format!("{name} with quota leasing"),
        (name, false) => name.to_owned(),
    };
    print_welcome(&url, &options.policy, &backend, &app.provider.describe());
    print_admin(&url, &app, !options.admin_keys.is_empty(), &events.webhooks);
    let limits = &options.limits;
    println!(
        "connections: at most {}, request head within {:?}, body within {:?}",
        limits.max_connections, limits.header_timeout, limits.body_timeout
    );
    println!("Ctrl-C or SIGTERM to stop.");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        let signal = tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        println!("\n{signal}: shutting down, finishing requests in flight");
    };
    connections::serve(listener, Arc::clone(&app), shutdown).await;
    let (audit, hooks) = (&app.audit, &events.webhooks);
    println!(
        "connections: {} refused at the cap, {} idle ones closed to make room",
        app.connections.refused(),
        app.connections.evicted()
    );
    let (logged, unlogged) = app.requests.counts();
    println!("request log: {logged} line(s) written, {unlogged} dropped");
    println!(
        "audit log: {} line(s) written, {} dropped, {} failed, {} refusals counted \
         not written; webhooks: {} delivered, {} retried, {} failed, {} dropped",
        audit.written(),
        audit.dropped(),
        audit.failed(),
        audit.suppressed(),
        hooks.delivered(),
        hooks.retried(),
        hooks.failed(),
        hooks.dropped()
    );
    Ok(())
}

/// The demo policy that ships with the example, whose keys the banner shows.
const DEMO_POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway/policy.toml");
/// `--metrics-addr`: `GET /metrics` on its own listener.
#[cfg(feature = "metrics")]
async fn serve_metrics(options: &Options, app: &App) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(addr) = &options.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("metrics: http://{}/metrics", listener.local_addr()?);
        tokio::spawn(metrics::serve(
            listener,
            app.metrics.clone(),
            app.limits.header_timeout,
        ));
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
    let is_demo =
        std::fs::canonicalize(policy_path).ok() == std::fs::canonicalize(DEMO_POLICY).ok();
    if !is_demo {
        // Another policy's keys are its owner's; the demo's would not work anyway.
        println!("call it with one of your policy's keys:");
        println!(
            "  curl -i {url}/v1/chat/completions -H 'Authorization: Bearer YOUR_KEY' \\\n    -H 'Content-Type: application/json' \\\n    -d '{{\"model\":\"MODEL\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'"
        );
        println!();
        return;
    }
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
    println!(
        "audit log: {}; request log: {} (recent ones: GET {url}/admin/workspaces/ID/requests)",
        app.audit.destination(),
        app.requests.destination()
    );
    #[cfg(feature = "metrics")]
    println!("metrics (Prometheus text): curl {url}/metrics -H 'Authorization: Bearer ADMIN_KEY'");
    match hooks.urls() {
        [] => println!(
            "webhooks: none global (--webhook URL for budget alerts); a workspace may list \
             its own (`webhooks` in the policy)"
        ),
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
