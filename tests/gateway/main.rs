#![allow(dead_code)] // the example's modules are compiled in whole; tests use parts
//! End to end: the example gateway in-process on a loopback port, driven by a real
//! HTTP client. The gateway's own modules are compiled in, so the tests serve exactly
//! what `cargo run --example gateway` serves, with the example's demo policy.
//!
//! The in-memory engine by default; `TOLLGATE_GATEWAY_BACKEND=redis` (with
//! `--features redis`) runs the same suite on the Redis backend against a real
//! `redis-server` the tests start. With `--features metrics`, `GET /metrics` is
//! tested too.

#[path = "../../examples/gateway/access.rs"]
mod access;
#[path = "../../examples/gateway/admin.rs"]
mod admin;
#[path = "../../examples/gateway/app.rs"]
mod app;
#[path = "../../examples/gateway/audit.rs"]
mod audit;
#[path = "../../examples/gateway/backend.rs"]
mod backend;
#[path = "../../examples/gateway/caller.rs"]
mod caller;
#[path = "../../examples/gateway/connections.rs"]
mod connections;
#[path = "../../examples/gateway/http.rs"]
mod http;
#[path = "../../examples/gateway/jsonl.rs"]
mod jsonl;
#[cfg(feature = "metrics")]
#[path = "../../examples/gateway/metrics.rs"]
mod metrics;
#[path = "../../examples/gateway/openai.rs"]
mod openai;
#[path = "../../examples/gateway/provider.rs"]
mod provider;
#[path = "../../examples/gateway/requests.rs"]
mod requests;
#[path = "../../examples/gateway/summary.rs"]
mod summary;
#[path = "../../examples/gateway/webhooks.rs"]
mod webhooks;

#[cfg(feature = "redis")]
#[path = "../support/redis_server.rs"]
mod redis_server;

mod admin_api;
mod chat;
mod estimate;
mod hygiene;
#[cfg(feature = "redis")]
mod lease;
mod members;
#[cfg(feature = "metrics")]
mod metrics_endpoint;
mod process;
mod request_log;
mod restart;
mod signals;
mod stream;
mod support;
#[cfg(feature = "redis")]
mod two_gateways;
