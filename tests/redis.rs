//! The Redis backend against real `redis-server` processes started by the tests.
//!
//! Run with `cargo test --features redis --test redis`. Needs `redis-server` and
//! `redis-cli` on PATH; `TOLLGATE_SKIP_REDIS=1` skips locally, and in CI
//! (`CI=true`) a missing binary fails the run.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::str::FromStr;

use redis_server::{require_redis, RedisServer};
use rust_decimal::Decimal;
use tollgate::{
    BudgetPeriod, BudgetSpec, DenialReason, KeySpec, LimitsSpec, ModelSpec, OrgSpec, Policy,
    PolicyDocument, RedisConfig, RedisEngine, Request, Scope, Usage, WorkspaceSpec,
};

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// One model at $1 per million input and $2 per million output tokens.
fn policy(ws_budget: &str, rpm: i64, tpm: i64) -> Policy {
    Policy::new(
        PolicyDocument::new(OrgSpec::new("acme"))
            .model(ModelSpec::new("m", dec("1"), dec("2")))
            .workspace(
                WorkspaceSpec::new("ws1", "one")
                    .grant("m")
                    .limits(LimitsSpec {
                        rpm: Some(rpm),
                        tpm: Some(tpm),
                        ..LimitsSpec::default()
                    })
                    .budget(BudgetSpec::new(dec(ws_budget), BudgetPeriod::Month)),
            )
            .key(KeySpec::new("k1", "ws1", "sk-1")),
    )
    .unwrap()
}

fn hget(server: &RedisServer, key: &str, field: &str) -> String {
    server.cli(&["hget", key, field])
}

#[tokio::test(flavor = "current_thread")]
async fn admits_commits_and_denies_like_the_in_memory_engine() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let engine = RedisEngine::connect(&server.url(), policy("0.01", 1000, 1_000_000), RedisConfig::default())
        .await
        .unwrap();

    // 1000 in + 500 out: $0.001 + $0.001 = $0.002 worst case.
    let request = Request::with_key_id("k1", "m").input_tokens(1000).max_output_tokens(500);
    let reservation = engine.check_and_reserve(&request).await.unwrap();
    assert_eq!(reservation.reserved_cost(), dec("0.002"));
    let ws = engine.workspace_key("ws1");
    assert_eq!(hget(&server, &ws, "held"), "2000000000");
    let receipt = engine.commit_usage(reservation, Usage::new(1000, 100)).await.unwrap();
    assert_eq!(receipt.cost(), dec("0.0012"));
    assert_eq!(hget(&server, &ws, "held"), "0");
    assert_eq!(hget(&server, &ws, "spent"), "1200000000");
    assert_eq!(hget(&server, &ws, "used"), "1200000000");
    assert_eq!(hget(&server, &ws, "req"), "1");
    assert_eq!(hget(&server, &engine.org_key(), "spent"), "1200000000");

    // $0.01 budget: 0.0012 spent; each worst case 0.002 → 4 more fit (0.0092), the 5th not.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(engine.check_and_reserve(&request).await.unwrap());
    }
    let denial = engine.check_and_reserve(&request).await.unwrap_err();
    assert_eq!(denial.reason, DenialReason::Budget);
    assert_eq!(denial.scope, Scope::Workspace);
    assert_eq!(denial.http_status(), 402);
    match denial.quota {
        Some(tollgate::Quota::Money { limit, remaining, requested }) => {
            assert_eq!(limit, dec("0.01"));
            assert_eq!(remaining, dec("0.0008"));
            assert_eq!(requested, dec("0.002"));
        }
        other => panic!("{other:?}"),
    }
    for r in held {
        engine.commit_usage(r, Usage::new(0, 0)).await.unwrap();
    }
    assert_eq!(hget(&server, &ws, "held"), "0");
    assert_eq!(hget(&server, &ws, "req"), "5");
}
