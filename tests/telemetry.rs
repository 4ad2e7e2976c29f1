//! Features `tracing` and `metrics` on the in-memory engine: what is traced (denials,
//! policy changes, dropped events; never an admission), and what is metered
//! (admissions and denials by scope and reason, spend and tokens by workspace and
//! model, reservations in flight, budget used), through a recorder given to the engine
//! and through the global one. `tests/no_alloc.rs` proves all of it allocates nothing
//! on the request path.

#[path = "support/telemetry.rs"]
mod telemetry;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use telemetry::{series, Recording};
use tollgate::metric_names::{ADMITTED, BUDGET_USED, DENIED, IN_FLIGHT, SPEND, TOKENS};
use tollgate::*;
use tracing::Level;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Workspace `ws` with a $1 monthly budget and model `m` ($1/M in, $2/M out); key
/// `k`; workspace `other` with no budget.
fn document() -> PolicyDocument {
    PolicyDocument::new(OrgSpec::new("acme"))
        .model(ModelSpec::new("m", dec("1"), dec("2")))
        .workspace(
            WorkspaceSpec::new("ws", "one")
                .grant("m")
                .budget(BudgetSpec::new(dec("1"), BudgetPeriod::Month)),
        )
        .workspace(WorkspaceSpec::new("other", "two").grant("m"))
        .key(KeySpec::new("k", "ws", "sk-k"))
}

fn metered(builder: EngineBuilder) -> (Engine, PrometheusHandle) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    (builder.metrics_recorder(Arc::new(recorder)).build(), handle)
}

fn request() -> Request<'static> {
    Request::with_key_id("k", "m")
        .input_tokens(1_000)
        .max_output_tokens(500)
}

#[test]
fn denials_are_traced_and_admissions_are_not() {
    let recording = Recording::default();
    let engine = Engine::new(Policy::new(document()).unwrap());
    tracing::subscriber::with_default(recording.clone(), || {
        for _ in 0..10 {
            let r = engine.check_and_reserve(&request()).unwrap();
            engine.commit_usage(r, Usage::new(900, 100)).unwrap();
            drop(engine.check_and_reserve(&request()).unwrap());
        }
        assert!(
            recording.events().is_empty(),
            "admitted, committed, released: {:?}",
            recording.events()
        );
        let denial = engine
            .check_and_reserve(&Request::with_secret("sk-nobody", "m"))
            .unwrap_err();
        assert_eq!(denial.code(), "invalid_api_key");
    });
    let events = recording.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let denied = &events[0];
    assert_eq!(
        (denied.level, denied.target.as_str()),
        (Level::DEBUG, "tollgate")
    );
    assert_eq!(denied.field("code"), Some("invalid_api_key"));
    assert_eq!(denied.field("scope"), Some("Key"));
    assert_eq!(denied.field("reason"), Some("UnknownKey"));
    assert_eq!(denied.field("status"), Some("401"));
}

#[test]
fn policy_changes_and_dropped_events_are_traced() {
    let recording = Recording::default();
    // Room for one event: the second is dropped.
    let (sink, _receiver) = ChannelSink::new(1);
    let engine = Engine::builder(Policy::new(document()).unwrap())
        .events(Arc::new(sink))
        .build();
    tracing::subscriber::with_default(recording.clone(), || {
        engine.revoke_key("k", Some("alice")).unwrap();
        let _secret = engine.rotate_key("k", Duration::ZERO, Some("bob")).unwrap();
    });
    let events = recording.events();
    let changes: Vec<_> = events.iter().filter(|e| e.level == Level::INFO).collect();
    assert_eq!(changes.len(), 2, "{events:?}");
    assert_eq!(changes[0].field("actor"), Some("alice"));
    assert!(changes[0].field("change").unwrap().contains("KeyRevoked"));
    assert!(changes[1].field("change").unwrap().contains("KeyRotated"));
    let drops: Vec<_> = events.iter().filter(|e| e.level == Level::WARN).collect();
    assert_eq!(drops.len(), 1, "{events:?}");
    assert_eq!(drops[0].field("dropped"), Some("1"));
}

#[test]
fn admissions_denials_spend_and_holds_are_metered() {
    let (engine, handle) = metered(Engine::builder(Policy::new(document()).unwrap()));
    let held = engine.check_and_reserve(&request()).unwrap();
    let r = engine.check_and_reserve(&request()).unwrap();
    // 1,000 × $1/M + 200 × $2/M = $0.0014.
    engine.commit_usage(r, Usage::new(1_000, 200)).unwrap();
    let _ = engine.check_and_reserve(&Request::with_key_id("k", "nope"));
    let _ = engine.check_and_reserve(&Request::with_secret("sk-x", "m"));
    let _ = engine.check_and_reserve(&Request::with_secret("sk-y", "m"));

    let text = handle.render();
    let ws_m = [("workspace", "ws"), ("model", "m")];
    assert_eq!(series(&text, ADMITTED, &ws_m), Some(2.0), "{text}");
    assert_eq!(
        series(&text, ADMITTED, &[("workspace", "other"), ("model", "m")]),
        Some(0.0)
    );
    assert_eq!(series(&text, SPEND, &ws_m), Some(1_400_000_000.0));
    let tokens = |direction| {
        series(
            &text,
            TOKENS,
            &[
                ("workspace", "ws"),
                ("model", "m"),
                ("direction", direction),
            ],
        )
    };
    assert_eq!(
        (tokens("input"), tokens("output")),
        (Some(1_000.0), Some(200.0))
    );
    assert_eq!(series(&text, IN_FLIGHT, &[("workspace", "ws")]), Some(1.0));
    // $0.0014 of $1.
    let used = series(&text, BUDGET_USED, &[("workspace", "ws")]).unwrap();
    assert!((used - 0.0014).abs() < 1e-12, "{used}");
    let denied = |scope, reason| series(&text, DENIED, &[("scope", scope), ("reason", reason)]);
    assert_eq!(denied("key", "unknown_key"), Some(2.0));
    assert_eq!(denied("workspace_model", "unknown_model"), Some(1.0));
    assert_eq!(denied("org", "wallet"), Some(0.0));

    drop(held);
    let text = handle.render();
    assert_eq!(series(&text, IN_FLIGHT, &[("workspace", "ws")]), Some(0.0));
}

#[test]
fn series_keep_counting_across_a_policy_change() {
    let (engine, handle) = metered(Engine::builder(Policy::new(document()).unwrap()));
    let r = engine.check_and_reserve(&request()).unwrap();
    engine.commit_usage(r, Usage::new(10, 10)).unwrap();
    // Held across the change, committed after it.
    let in_flight = engine.check_and_reserve(&request()).unwrap();
    engine
        .create_workspace(WorkspaceSpec::new("new", "three").grant("m"), None)
        .unwrap();
    engine.commit_usage(in_flight, Usage::new(10, 10)).unwrap();
    let r = engine.check_and_reserve(&request()).unwrap();
    engine.commit_usage(r, Usage::new(10, 10)).unwrap();

    let text = handle.render();
    let ws_m = [("workspace", "ws"), ("model", "m")];
    assert_eq!(series(&text, ADMITTED, &ws_m), Some(3.0), "{text}");
    assert_eq!(series(&text, SPEND, &ws_m), Some(3.0 * 30_000_000.0));
    assert_eq!(series(&text, IN_FLIGHT, &[("workspace", "ws")]), Some(0.0));
    assert_eq!(
        series(&text, ADMITTED, &[("workspace", "new"), ("model", "m")]),
        Some(0.0),
        "the new workspace's series exist from the change on"
    );
}

/// Without a recorder of its own, an engine takes its handles from the global
/// recorder installed when it was built. (The only test here that installs one.)
#[test]
fn the_global_recorder_is_used_by_default() {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .expect("no other global recorder in this test binary");
    let engine = Engine::new(Policy::new(document()).unwrap());
    let r = engine.check_and_reserve(&request()).unwrap();
    engine.commit_usage(r, Usage::new(1, 1)).unwrap();
    let text = handle.render();
    assert_eq!(
        series(&text, ADMITTED, &[("workspace", "ws"), ("model", "m")]),
        Some(1.0),
        "{text}"
    );
}
