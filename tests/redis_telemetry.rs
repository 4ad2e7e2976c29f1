//! Features `tracing` and `metrics` on the Redis engine, against a real
//! `redis-server`: admissions and spend metered like the in-memory engine, each
//! function call's latency recorded, and while Redis is down, store errors and
//! fail-open admissions counted and traced.

#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/telemetry.rs"]
mod telemetry;

use std::str::FromStr;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;
use redis_server::{require_redis, RedisServer};
use telemetry::{series, Recording};
use tollgate::metric_names::{
    ADMITTED, DENIED, FAIL_OPEN, IN_FLIGHT, REDIS_CALL, SPEND, STORE_ERRORS,
};
use tollgate::*;
use tracing::Level;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn redis_calls_store_errors_and_fail_open_are_metered_and_traced() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let mut server = RedisServer::start();
    let policy = Policy::new(
        PolicyDocument::new(OrgSpec::new("acme"))
            .model(ModelSpec::new("m", dec("1"), dec("2")))
            .workspace(
                WorkspaceSpec::new("ws", "one")
                    .grant("m")
                    .limits(LimitsSpec {
                        max_concurrent: Some(5),
                        ..LimitsSpec::default()
                    })
                    .on_store_error(StoreFailureMode::Open),
            )
            .key(KeySpec::new("k", "ws", "sk-k")),
    )
    .unwrap();
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let config = RedisConfig {
        metrics_recorder: Some(Arc::new(recorder)),
        ..RedisConfig::default()
    };
    let engine = RedisEngine::connect(&server.url(), policy, config)
        .await
        .unwrap();
    let request = Request::with_key_id("k", "m")
        .input_tokens(1_000)
        .max_output_tokens(500);
    let r = engine.check_and_reserve(&request).await.unwrap();
    engine
        .commit_usage(r, Usage::new(1_000, 200))
        .await
        .unwrap();

    let held = engine.check_and_reserve(&request).await.unwrap();
    let text = handle.render();
    assert_eq!(series(&text, IN_FLIGHT, &[("workspace", "ws")]), Some(1.0));
    drop(held);

    let text = handle.render();
    let ws_m = [("workspace", "ws"), ("model", "m")];
    assert_eq!(series(&text, ADMITTED, &ws_m), Some(2.0), "{text}");
    assert_eq!(series(&text, SPEND, &ws_m), Some(1_400_000_000.0));
    assert_eq!(series(&text, IN_FLIGHT, &[("workspace", "ws")]), Some(0.0));
    // Two reserves and one commit: one call each, taking the workspace's and the
    // org's hash tags together on a standalone server (the dropped reservation's
    // release runs in the background).
    let calls = |function| {
        series(
            &text,
            &format!("{REDIS_CALL}_count"),
            &[("function", function)],
        )
    };
    assert_eq!(calls("reserve"), Some(2.0), "{text}");
    assert_eq!(calls("commit"), Some(1.0), "{text}");

    server.kill();
    let recording = Recording::default();
    let local = {
        let _guard = tracing::subscriber::set_default(recording.clone());
        engine.check_and_reserve(&request).await.unwrap()
    };
    assert!(local.is_local());
    let text = handle.render();
    assert_eq!(
        series(&text, FAIL_OPEN, &[("workspace", "ws")]),
        Some(1.0),
        "{text}"
    );
    let transient = series(&text, STORE_ERRORS, &[("kind", "transient")]).unwrap();
    assert!(transient >= 1.0, "{text}");
    // The local admission is counted as an admission too, where the engine's are.
    assert_eq!(series(&text, ADMITTED, &ws_m), Some(3.0), "{text}");
    let events = recording.events();
    let warnings: Vec<_> = events.iter().filter(|e| e.level == Level::WARN).collect();
    assert!(
        warnings.iter().all(|e| e.target == "tollgate"),
        "{events:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|e| e.field("kind") == Some("transient")),
        "a store error: {events:?}"
    );
    assert!(
        warnings.iter().any(|e| e.field("workspace") == Some("ws")),
        "a fail-open admission: {events:?}"
    );
    drop(local);

    // A request the local limiter refuses is counted once, by the local limiter.
    let before = series(
        &handle.render(),
        DENIED,
        &[("scope", "workspace_model"), ("reason", "unknown_model")],
    );
    assert_eq!(before, Some(0.0));
    let unknown = engine
        .check_and_reserve(&Request::with_key_id("k", "no-such-model"))
        .await
        .unwrap_err();
    assert_eq!(unknown.reason, DenialReason::UnknownModel);
    let text = handle.render();
    assert_eq!(
        series(
            &text,
            DENIED,
            &[("scope", "workspace_model"), ("reason", "unknown_model")]
        ),
        Some(1.0),
        "{text}"
    );
    // Requests over the local share are refused by it, and counted once each.
    let small = Request::with_key_id("k", "m")
        .input_tokens(1)
        .max_output_tokens(1);
    let mut held = Vec::new();
    while let Ok(r) = engine.check_and_reserve(&small).await {
        held.push(r);
    }
    let text = handle.render();
    assert_eq!(
        series(
            &text,
            DENIED,
            &[("scope", "workspace"), ("reason", "concurrency")]
        ),
        Some(1.0),
        "{text}"
    );
}
