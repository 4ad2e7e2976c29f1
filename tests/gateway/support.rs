//! Starting the gateway for a test and talking to it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tollgate::{Engine, Event, EventSink, Policy, UsageSnapshot};

use crate::admin::AdminKeys;
use crate::app::App;
use crate::audit::Audit;
use crate::backend::Backend;
use crate::connections::{self, Limits};
use crate::jsonl::Rotation;
use crate::provider::{MockProvider, Provider};
use crate::requests::RequestLog;
use crate::webhooks::{self, GatewayEvents, Webhooks};

pub const POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway/policy.toml");

/// How to start a gateway; `Options::default()` is what the tests mostly use.
#[derive(Default)]
pub struct Options {
    pub mock_delay: Duration,
    pub counters: Option<PathBuf>,
    /// Admin keys as `NAME:ROLE:SECRET`; none: the three demo admin keys.
    pub admin_keys: Vec<String>,
    /// Write the audit log here; none: no audit log.
    pub audit_log: Option<PathBuf>,
    /// Webhook URLs for budget alerts.
    pub webhooks: Vec<String>,
    /// How webhooks are delivered; none: the gateway's defaults.
    pub webhook_config: Option<webhooks::Config>,
    /// Also hand every engine event to this sink.
    pub events: Option<Arc<dyn EventSink>>,
    /// Connection limits and timeouts; the gateway's defaults unless set.
    pub limits: Limits,
    /// How the logs rotate.
    pub rotation: Rotation,
    /// Write the request log here; none: kept in memory only.
    pub request_log: Option<PathBuf>,
}

/// The gateway's sink, and the test's own if it gave one.
struct Tee(Arc<GatewayEvents>, Option<Arc<dyn EventSink>>);

impl EventSink for Tee {
    fn deliver(&self, event: Event) {
        if let Some(extra) = &self.1 {
            extra.deliver(event.clone());
        }
        self.0.deliver(event);
    }
}

pub struct Running {
    pub url: String,
    pub app: Arc<App>,
    /// The engine's event sink: audit log and webhooks.
    pub events: Arc<GatewayEvents>,
    pub client: Client<HttpConnector, Full<Bytes>>,
    stop: Option<oneshot::Sender<()>>,
    pub server: Option<tokio::task::JoinHandle<()>>,
    /// The Redis server of the Redis backend (`TOLLGATE_GATEWAY_BACKEND=redis`).
    #[cfg(feature = "redis")]
    pub redis: Option<crate::redis_server::RedisServer>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            server.abort();
        }
    }
}

pub async fn start() -> Running {
    start_with(Options::default()).await
}

fn redis_requested() -> bool {
    std::env::var("TOLLGATE_GATEWAY_BACKEND").is_ok_and(|b| b == "redis")
}

pub async fn start_with(options: Options) -> Running {
    let policy = Policy::from_path(POLICY).expect("the example's policy is valid");
    let admin = if options.admin_keys.is_empty() {
        AdminKeys::demo()
    } else {
        AdminKeys::parse(&options.admin_keys).expect("valid admin keys")
    };
    let audit = match &options.audit_log {
        Some(path) => Audit::to_file(path, options.rotation).expect("the audit log opens"),
        None => Audit::default(),
    };
    let events = Arc::new(GatewayEvents::new(
        audit.clone(),
        Webhooks::start(
            &options.webhooks,
            options.webhook_config.unwrap_or_default(),
        )
        .expect("valid webhook URLs"),
    ));
    let sink: Arc<dyn EventSink> = Arc::new(Tee(Arc::clone(&events), options.events));
    // Each gateway records into its own recorder: tests run many in one process.
    #[cfg(feature = "metrics")]
    let (recorder, metrics) = crate::metrics::recorder();
    let memory = |policy, sink| {
        let builder = Engine::builder(policy).events(sink);
        #[cfg(feature = "metrics")]
        let builder = builder.metrics_recorder(recorder.clone());
        Backend::Memory(builder.build())
    };
    #[cfg(feature = "redis")]
    let (backend, redis) = if redis_requested() {
        assert!(
            crate::redis_server::require_redis(),
            "TOLLGATE_GATEWAY_BACKEND=redis needs redis-server"
        );
        let server = crate::redis_server::RedisServer::start();
        let config = tollgate::RedisConfig {
            events: Some(sink),
            #[cfg(feature = "metrics")]
            metrics_recorder: Some(recorder.clone()),
            ..tollgate::RedisConfig::default()
        };
        let engine = tollgate::RedisEngine::connect(&server.url(), policy, config)
            .await
            .expect("Redis is up");
        (Backend::Redis(engine), Some(server))
    } else {
        (memory(policy, sink), None)
    };
    #[cfg(not(feature = "redis"))]
    let backend = {
        assert!(
            !redis_requested(),
            "TOLLGATE_GATEWAY_BACKEND=redis needs --features redis"
        );
        memory(policy, sink)
    };
    let app = Arc::new(App {
        backend,
        provider: Provider::Mock(MockProvider {
            delay: options.mock_delay,
        }),
        admin,
        audit,
        counters: options.counters,
        limits: options.limits,
        connections: Arc::default(),
        background: Arc::default(),
        requests: Arc::new(match &options.request_log {
            Some(path) => RequestLog::to_path(path.to_str().unwrap(), options.rotation)
                .expect("the request log opens"),
            None => RequestLog::in_memory(),
        }),
        #[cfg(feature = "metrics")]
        metrics,
    });
    app.follow_webhooks(&events);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(connections::serve(listener, Arc::clone(&app), async {
        let _ = stopped.await;
    }));
    Running {
        url,
        app,
        events,
        client: Client::builder(TokioExecutor::new()).build_http(),
        stop: Some(stop),
        server: Some(server),
        #[cfg(feature = "redis")]
        redis,
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One request to the gateway at `url` with a bearer key: over a real HTTP client,
/// to an in-process gateway or a gateway process alike.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> Answer {
    let request = Request::builder()
        .method(method)
        .uri(format!("{url}{path}"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let response = client.request(request).await.expect("gateway answers");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

impl Running {
    pub async fn send(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> Answer {
        send(&self.client, &self.url, method, path, key, body).await
    }

    pub async fn chat(&self, key: &str, model: &str, max_tokens: Option<u32>) -> Answer {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": "Hello"}]});
        if let Some(max) = max_tokens {
            body["max_tokens"] = json!(max);
        }
        self.send(Method::POST, "/v1/chat/completions", key, Some(body))
            .await
    }

    /// Usage as the backend counts it.
    pub async fn usage(&self) -> UsageSnapshot {
        self.app.backend.usage().await.expect("usage")
    }

    /// Ask for a graceful shutdown and wait for it to finish.
    pub async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("the server task ends");
        }
    }
}
