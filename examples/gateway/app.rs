//! The gateway as a whole: what every request shares, the routes, and what a graceful
//! shutdown does once requests have drained (flush the logs, save counters). Serving
//! connections is `connections.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, StatusCode};

use crate::admin::AdminKeys;
use crate::audit::Audit;
use crate::backend::Backend;
use crate::connections::{Background, Connections, Limits};
use crate::http::{error, ErrorCode, Reply};
use crate::openai;
use crate::provider::Provider;
use crate::requests::RequestLog;
use crate::webhooks::GatewayEvents;

/// What every connection shares.
pub struct App {
    pub backend: Backend,
    pub provider: Provider,
    pub admin: AdminKeys,
    pub audit: Audit,
    /// Where the in-memory engine's counters are saved on shutdown, if anywhere.
    pub counters: Option<PathBuf>,
    /// Connection limits and timeouts.
    pub limits: Limits,
    /// The open connections.
    pub connections: Arc<Connections>,
    /// The request log.
    pub requests: Arc<RequestLog>,
    /// Forwarded work still running after its client left; the drain waits for it.
    pub background: Arc<Background>,
    /// Renders the engine's metrics for `GET /metrics`.
    #[cfg(feature = "metrics")]
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

impl App {
    pub async fn route(self: Arc<Self>, mut request: Request<Incoming>) -> Reply {
        let path = request.uri().path().to_owned();
        let api = match (request.method(), path.as_str()) {
            (&Method::POST, "/v1/chat/completions") => "chat.completions",
            (&Method::POST, "/v1/responses") => "responses",
            (&Method::POST, "/v1/completions") => "completions",
            (&Method::POST, "/v1/embeddings") => "embeddings",
            (&Method::GET, "/v1/models") => "models",
            #[cfg(feature = "metrics")]
            (&Method::GET, "/metrics") => return crate::metrics::handle(&self, &request),
            (_, p) if p.starts_with("/admin/") => {
                return crate::admin::handle(&self, request).await
            }
            _ => return error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        };
        // Every API request is logged, with an id the client sees.
        let trace = self.requests.start(api);
        request.extensions_mut().insert(trace.clone());
        let mut reply = match api {
            "chat.completions" => openai::chat(&self, request).await,
            "responses" => openai::responses(&self, request).await,
            "completions" => openai::completions(&self, request).await,
            "embeddings" => openai::embeddings(&self, request).await,
            _ => openai::models(&self, &request).await,
        };
        let code = reply.extensions().get::<ErrorCode>().map(|c| c.0.as_str());
        trace.answered(reply.status().as_u16(), code);
        if let Ok(id) = HeaderValue::from_str(&trace.request_id()) {
            reply.headers_mut().insert("x-request-id", id);
        }
        reply
    }

    /// The webhook URLs workspace `id` lists in the current policy.
    pub fn workspace_webhooks(&self, id: &str) -> Vec<String> {
        let policy = self.backend.policy();
        let found = policy.document().workspaces.iter().find(|w| w.id == id);
        found.map(|w| w.webhooks.clone()).unwrap_or_default()
    }

    /// Let `events` deliver workspace events to the URLs of the current policy. The
    /// app holds the engine, which holds `events`: a weak handle breaks the cycle.
    pub fn follow_webhooks(self: &Arc<Self>, events: &GatewayEvents) {
        let app = Arc::downgrade(self);
        let _ = events.workspace_urls.set(Box::new(move |id| {
            app.upgrade()
                .map(|app| app.workspace_webhooks(id))
                .unwrap_or_default()
        }));
    }

    /// What a shutdown does once requests have drained: commits Redis has not
    /// acknowledged are replayed (up to 10 s), logs flushed, counters saved.
    pub async fn finish(&self) {
        let replay = tokio::time::timeout(Duration::from_secs(10), self.backend.flush_pending());
        match replay.await {
            Ok(0) => {}
            Ok(left) => {
                eprintln!("shutdown: {left} commit(s) still pending: Redis is not answering")
            }
            Err(_) => eprintln!("shutdown: pending commits not replayed within 10 s"),
        }
        self.audit.flush();
        self.requests.flush();
        if let Some(path) = &self.counters {
            if let Err(e) = self.backend.save_counters(path) {
                eprintln!("could not save counters: {e}");
            }
        }
    }
}
