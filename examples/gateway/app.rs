//! The gateway as a whole: what every request shares, the routes, and serving with a
//! graceful shutdown (stop accepting, finish in-flight requests, flush the audit log,
//! save counters).

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::admin::AdminKeys;
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
    /// Renders the engine's metrics for `GET /metrics`.
    #[cfg(feature = "metrics")]
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// How long a shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(30);

impl App {
    async fn route(self: Arc<Self>, request: Request<Incoming>) -> Reply {
        let path = request.uri().path().to_owned();
        match (request.method(), path.as_str()) {
            (&Method::POST, "/v1/chat/completions") => openai::chat(&self, request).await,
            (&Method::POST, "/v1/embeddings") => openai::embeddings(&self, request).await,
            (&Method::GET, "/v1/models") => openai::models(&self, &request).await,
            #[cfg(feature = "metrics")]
            (&Method::GET, "/metrics") => crate::metrics::handle(&self, &request),
            (_, p) if p.starts_with("/admin/") => crate::admin::handle(&self, request).await,
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        }
    }

    /// What a shutdown does once requests have drained.
    fn finish(&self) {
        self.audit.flush();
        if let Some(path) = &self.counters {
            if let Err(e) = self.backend.save_counters(path) {
                eprintln!("could not save counters: {e}");
            }
        }
    }
}

/// Serve until `shutdown` completes, then stop accepting, let requests in flight
/// finish (up to 30 s), and flush what must not be lost.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let app = Arc::clone(&app);
                let service = service_fn(move |request| {
                    let app = Arc::clone(&app);
                    async move { Ok::<_, Infallible>(app.route(request).await) }
                });
                let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                // A client that hangs up mid-request is not the gateway's error.
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN) => eprintln!("shutdown: requests still in flight after {DRAIN:?}"),
    }
    app.finish();
}
