//! `GET /metrics` (build with `--features metrics`): tollgate's counters in Prometheus
//! text, from a recorder of this gateway's own (not a process-global one), so that
//! several gateways in one process each report only their own traffic.
//!
//! On the gateway's address it takes any admin key (`Authorization: Bearer …`, every
//! role may read); `--metrics-addr HOST:PORT` also serves it without a key on a
//! separate listener, for a scraper on a private interface.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::net::TcpListener;

use crate::app::App;
use crate::http::{bearer, error, full, Reply};

/// A recorder for one gateway's engine, and the handle that renders it.
pub fn recorder() -> (Arc<PrometheusRecorder>, PrometheusHandle) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    (Arc::new(recorder), handle)
}

/// The metrics as Prometheus text.
pub fn render(handle: &PrometheusHandle) -> Reply {
    let mut reply = Response::new(full(handle.render()));
    reply.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    reply
}

/// `GET /metrics` on the gateway's own address: for admin keys only.
pub fn handle(app: &App, request: &Request<Incoming>) -> Reply {
    if bearer(request)
        .and_then(|secret| app.admin.authenticate(secret))
        .is_none()
    {
        let mut reply = error(
            StatusCode::UNAUTHORIZED,
            "invalid_admin_key",
            "GET /metrics needs an admin key (Authorization: Bearer ...)",
        );
        reply.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tollgate-admin\""),
        );
        return reply;
    }
    render(&app.metrics)
}

/// Serve `GET /metrics`, and nothing else, on `listener`, without a key.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let reply = match (request.method(), request.uri().path()) {
                (&Method::GET, "/metrics") => render(&handle),
                _ => error(StatusCode::NOT_FOUND, "not_found", "only GET /metrics here"),
            };
            async move { Ok::<_, Infallible>(reply) }
        });
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
