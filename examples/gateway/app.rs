//! The gateway as a whole: what every request shares, the routes, and what a graceful
//! shutdown does once requests have drained (flush the logs, save counters). Serving
//! connections is `connections.rs`.

use std::path::PathBuf;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};

use crate::admin::AdminKeys;
use crate::connections::{Connections, Limits};
use crate::audit::Audit;
use crate::backend::Backend;
use crate::http::{error, Reply};
use crate::openai;
use crate::provider::Provider;

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
}

impl App {
    pub async fn route(self: Arc<Self>, request: Request<Incoming>) -> Reply {
        let path = request.uri().path().to_owned();
        match (request.method(), path.as_str()) {
            (&Method::POST, "/v1/chat/completions") => openai::chat(&self, request).await,
            (&Method::POST, "/v1/embeddings") => openai::embeddings(&self, request).await,
            (&Method::GET, "/v1/models") => openai::models(&self, &request).await,
            (_, p) if p.starts_with("/admin/") => crate::admin::handle(&self, request).await,
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        }
    }

    /// What a shutdown does once requests have drained.
    pub fn finish(&self) {
        self.audit.flush();
        if let Some(path) = &self.counters {
            if let Err(e) = self.backend.save_counters(path) {
                eprintln!("could not save counters: {e}");
            }
        }
    }
}
