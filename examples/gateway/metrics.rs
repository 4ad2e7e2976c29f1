//! `GET /metrics` (build with `--features metrics`): tollgate's counters in Prometheus
//! text, from a recorder of this gateway's own (not a process-global one), so that
//! several gateways in one process each report only their own traffic.
//!
//! On the gateway's address it takes any admin key (`Authorization: Bearer …`, every
//! role may read); `--metrics-addr HOST:PORT` also serves it without a key on a
//! separate listener, for a scraper on a private interface.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::app::App;
use crate::audit::AdminRecord;
use crate::connections::{Backoff, Peer};
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

/// `GET /metrics` on the gateway's own address: for admin keys only, audited like
/// every admin request (refusals too, throttled per source), so keys cannot be
/// guessed here unseen.
pub fn handle(app: &App, request: &Request<Incoming>) -> Reply {
    let mut record = AdminRecord {
        action: "metrics.read".into(),
        peer: request.extensions().get::<Peer>().map(|p| p.0.ip()),
        ..AdminRecord::default()
    };
    let reply = match bearer(request).and_then(|secret| app.admin.authenticate(secret)) {
        Some(key) => {
            record.actor = Some(key.name.clone());
            record.role = Some(key.role.name());
            render(&app.metrics)
        }
        None => {
            let message = "GET /metrics needs an admin key (Authorization: Bearer ...)";
            record.reason = Some(message.into());
            let mut reply = error(StatusCode::UNAUTHORIZED, "invalid_admin_key", message);
            reply.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tollgate-admin\""),
            );
            reply
        }
    };
    app.audit.admin(record, reply.status());
    reply
}

/// Connections open at once on the metrics listener: a scraper needs one or two.
const METRICS_CONNECTIONS: usize = 16;

/// Serve `GET /metrics`, and nothing else, on `listener`, without a key: with the
/// main listener's header timeout and accept backoff, and at most a few connections
/// (more are closed at once), so it cannot take the process's descriptors.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, header_timeout: Duration) {
    let open = Arc::new(Semaphore::new(METRICS_CONNECTIONS));
    let mut backoff = Backoff::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = Backoff::new();
                stream
            }
            Err(_) => {
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&open).try_acquire_owned() else {
            continue; // dropped: closed
        };
        let handle = handle.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let reply = match (request.method(), request.uri().path()) {
                (&Method::GET, "/metrics") => render(&handle),
                _ => error(StatusCode::NOT_FOUND, "not_found", "only GET /metrics here"),
            };
            async move { Ok::<_, Infallible>(reply) }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
}
