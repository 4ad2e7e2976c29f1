//! End-user limits (issue 18) on the Redis backend: each end user's counters in one
//! hash under its workspace's hash tag, exact, with the idle TTL `idle_secs`.
//!
//! Run with `cargo test --features redis --test end_users_redis`. Needs `redis-server`
//! and `redis-cli` (see `support/redis_server.rs`): with `CI` set a missing server
//! fails these tests; elsewhere `TOLLGATE_SKIP_REDIS=1` skips them.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::str::FromStr;

use redis_server::{require_redis, RedisServer};
use rust_decimal::Decimal;
use tollgate::{
    BudgetPeriod, BudgetSpec, DenialReason, EndUserLimitsSpec, KeySpec, LimitsSpec, ModelSpec,
    OrgSpec, Policy, PolicyDocument, RedisConfig, RedisEngine, Request, Scope, Usage,
    WorkspaceSpec,
};

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Workspace "ws1" ($1 per million tokens), key "k1"; each end user 3 requests a
/// minute and $0.001 a month, forgotten after 600 s idle.
fn policy() -> Policy {
    let end_users = EndUserLimitsSpec::new(LimitsSpec {
        rpm: Some(3),
        ..LimitsSpec::default()
    })
    .budget(BudgetSpec::new(dec("0.001"), BudgetPeriod::Month))
    .idle_secs(600);
    Policy::new(
        PolicyDocument::new(OrgSpec::new("acme"))
            .model(ModelSpec::new("m", dec("1"), dec("1")))
            .workspace(
                WorkspaceSpec::new("ws1", "one")
                    .grant("m")
                    .budget(BudgetSpec::new(dec("10"), BudgetPeriod::Month))
                    .end_user_limits(end_users),
            )
            .key(KeySpec::new("k1", "ws1", "sk-1")),
    )
    .unwrap()
}

fn ask(user: &str, tokens: u32) -> Request<'_> {
    Request::with_key_id("k1", "m")
        .input_tokens(tokens)
        .max_output_tokens(0)
        .end_user(user)
}

async fn spend(engine: &RedisEngine, user: &str, tokens: u32) {
    let r = engine
        .check_and_reserve(&ask(user, tokens))
        .await
        .unwrap_or_else(|d| panic!("{user} {tokens} refused: {d}"));
    engine.commit_usage(r, Usage::new(tokens, 0)).await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn end_users_are_limited_exactly_each_in_its_own_hash_with_an_idle_ttl() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let engine = RedisEngine::connect(&server.url(), policy(), RedisConfig::default())
        .await
        .unwrap();

    // Budget: exactly $0.001 each, alice's spend does not touch bob's.
    spend(&engine, "alice@example.com", 600).await;
    spend(&engine, "alice@example.com", 400).await;
    let denial = engine
        .check_and_reserve(&ask("alice@example.com", 1))
        .await
        .unwrap_err();
    assert_eq!(denial.scope, Scope::EndUser);
    assert_eq!(denial.reason, DenialReason::Budget);
    spend(&engine, "bob", 1000).await;
    let alice = engine
        .end_user_usage("ws1", "alice@example.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(alice.current.cost, dec("0.001"));
    assert_eq!(alice.current.requests, 2);
    assert_eq!(alice.current.held, dec("0"));

    // Rate: carol's third request in the minute is her last; dave is unaffected.
    for _ in 0..3 {
        spend(&engine, "carol", 1).await;
    }
    let denial = engine
        .check_and_reserve(&ask("carol", 1))
        .await
        .unwrap_err();
    assert_eq!(
        (denial.scope, denial.reason),
        (Scope::EndUser, DenialReason::RequestsPerMinute)
    );
    spend(&engine, "dave", 1).await;

    // A request without an end user is not limited at that level.
    for _ in 0..5 {
        let r = engine
            .check_and_reserve(&Request::with_key_id("k1", "m").max_output_tokens(0))
            .await
            .unwrap();
        engine.commit_usage(r, Usage::new(0, 0)).await.unwrap();
    }

    // Each end user's hash lives under the workspace's tag, named by the id's SHA-256
    // (no e-mail address in key names), with the idle TTL of `idle_secs`.
    let key = engine.end_user_key("ws1", "alice@example.com");
    assert!(key.starts_with("tollgate:v2:{ws:ws1}:user:"), "{key}");
    assert!(!key.contains("alice"));
    assert_eq!(server.cli(&["hget", &key, "spent"]), "1000000000");
    let pttl: i64 = server.cli(&["pttl", &key]).parse().unwrap();
    assert!(
        (590_000..=600_000).contains(&pttl),
        "end user hash PTTL {pttl} ms, expected about 600,000"
    );
    // The workspace's own hash keeps its long idle TTL.
    let ws_pttl: i64 = server
        .cli(&["pttl", &engine.workspace_key("ws1")])
        .parse()
        .unwrap();
    assert!(ws_pttl > 86_400_000, "workspace PTTL {ws_pttl}");

    // The workspace saw everything: 2,000 + 3 + 1 tokens.
    let usage = engine.usage().await.unwrap();
    assert_eq!(usage.workspaces[0].usage.current.cost, dec("0.002004"));
    assert_eq!(usage.workspaces[0].usage.current.held, dec("0"));
}

#[tokio::test(flavor = "current_thread")]
async fn a_dropped_end_user_reservation_gives_its_hold_back_and_bad_ids_are_refused() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let engine = RedisEngine::connect(&server.url(), policy(), RedisConfig::default())
        .await
        .unwrap();
    let held = engine.check_and_reserve(&ask("erin", 900)).await.unwrap();
    // 900 of 1,000 µ$ held: 200 more do not fit, 100 do.
    let denial = engine
        .check_and_reserve(&ask("erin", 200))
        .await
        .unwrap_err();
    assert_eq!(denial.scope, Scope::EndUser);
    let id = held.id().unwrap().to_owned();
    drop(held);
    // The release runs in the background: wait until erin's hold is gone.
    let key = engine.end_user_key("ws1", "erin");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while server.cli(&["hget", &key, "held"]) != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "release of {id} not seen"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    spend(&engine, "erin", 1000).await;

    let long = "x".repeat(tollgate::MAX_END_USER_LEN + 1);
    for bad in ["", "a\r\nb", long.as_str()] {
        let denial = engine.check_and_reserve(&ask(bad, 1)).await.unwrap_err();
        assert_eq!(denial.reason, DenialReason::InvalidEndUser);
        assert_eq!(denial.http_status(), 400);
    }
}
