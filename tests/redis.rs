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
    BudgetPeriod, BudgetSpec, DenialReason, Held, KeySpec, Limiter, LimitsSpec, ModelSpec, OrgSpec,
    Policy, PolicyDocument, RedisConfig, RedisEngine, Request, Scope, Usage, WorkspaceSpec,
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
    let engine = RedisEngine::connect(
        &server.url(),
        policy("0.01", 1000, 1_000_000),
        RedisConfig::default(),
    )
    .await
    .unwrap();

    // 1000 in + 500 out: $0.001 + $0.001 = $0.002 worst case.
    let request = Request::with_key_id("k1", "m")
        .input_tokens(1000)
        .max_output_tokens(500);
    let reservation = engine.check_and_reserve(&request).await.unwrap();
    assert_eq!(reservation.reserved_cost(), dec("0.002"));
    let ws = engine.workspace_key("ws1");
    assert_eq!(hget(&server, &ws, "held"), "2000000000");
    let receipt = engine
        .commit_usage(reservation, Usage::new(1000, 100))
        .await
        .unwrap();
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
        Some(tollgate::Quota::Money {
            limit,
            remaining,
            requested,
        }) => {
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

/// A policy exercising every level: key limits, workspace limits, a per-model limit,
/// concurrency, an org budget and a wallet.
fn every_limit_policy() -> Policy {
    Policy::from_toml_str(
        r#"
        [org]
        id = "acme"
        wallet = "0.035"
        budget = { limit = "0.1", period = "month" }

        [[models]]
        name = "m"
        input_per_million = "1"
        output_per_million = "2"

        [[models]]
        name = "other"
        input_per_million = "0.075"
        output_per_million = "0.3"

        [[workspaces]]
        id = "ws1"
        name = "one"
        models = ["m"]
        limits = { rpm = 8, tpm = 30000, max_concurrent = 3 }
        model_limits = [{ model = "m", tpm = 25000 }]

        [[workspaces]]
        id = "ws2"
        name = "two"
        models = ["m", "other"]
        limits = { rpd = 1000 }
        budget = { limit = "0.015", period = "day" }

        [[workspaces]]
        id = "ws3"
        name = "three"
        models = ["other"]

        [[keys]]
        id = "k4"
        workspace = "ws3"
        secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0b"

        [[keys]]
        id = "k1"
        workspace = "ws1"
        secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        limits = { rpm = 6 }

        [[keys]]
        id = "k2"
        workspace = "ws2"
        secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a09"

        [[keys]]
        id = "k3"
        workspace = "ws2"
        status = "revoked"
        secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0a"
    "#,
    )
    .unwrap()
}

/// What a step did, comparable across backends.
#[derive(Debug, PartialEq)]
enum Outcome {
    Admitted {
        held: Decimal,
        limits: tollgate::RateLimitStatus,
    },
    Denied {
        reason: DenialReason,
        scope: Scope,
        quota: Option<tollgate::Quota>,
        status: u16,
    },
}

/// Drive one backend through a fixed script of requests, commits and drops; the
/// in-memory engine and the Redis engine must answer every step identically.
async fn script<L: Limiter>(limiter: &L) -> (Vec<Outcome>, Vec<tollgate::Receipt>) {
    let steps: &[(&str, &str, u32, u32)] = &[
        ("k1", "m", 1000, 2000),
        ("k1", "m", 4000, 4000),
        ("k1", "m", 10000, 9000), // workspace × model TPM (25k) refuses
        ("k1", "m", 500, 500),
        ("k1", "m", 500, 500),          // max_concurrent 3 refuses (three held)
        ("k1", "other", 10, 10),        // not granted
        ("nope", "m", 10, 10),          // unknown key
        ("k3", "m", 10, 10),            // revoked
        ("k2", "nope", 10, 10),         // unknown model
        ("k2", "other", 100000, 20000), // 0.0075 + 0.006 = 0.0135 of ws2's 0.015
        ("k2", "m", 1000, 1000),        // ws2 budget refuses (0.003 > 0.0015 left)
    ];
    let mut outcomes = Vec::new();
    let mut held = Vec::new();
    for &(key, model, input, output) in steps {
        let request = Request::with_key_id(key, model)
            .input_tokens(input)
            .max_output_tokens(output);
        match limiter.check_and_reserve(&request).await {
            Ok(r) => {
                outcomes.push(Outcome::Admitted {
                    held: Decimal::ZERO,
                    limits: r.rate_limits(),
                });
                held.push((r, input, output));
            }
            Err(d) => outcomes.push(Outcome::Denied {
                reason: d.reason,
                scope: d.scope,
                quota: d.quota,
                status: d.http_status(),
            }),
        }
    }
    let mut receipts = Vec::new();
    for (i, (r, input, output)) in held.into_iter().enumerate() {
        if i == 1 {
            drop(r); // released, never charged
            continue;
        }
        receipts.push(
            limiter
                .commit_usage(r, Usage::new(input, output / 2))
                .await
                .unwrap(),
        );
    }
    // 0.0145 spent; the wallet (0.035) binds on the second 0.0135 request of ws3.
    for _ in 0..3 {
        let request = Request::with_key_id("k4", "other")
            .input_tokens(100000)
            .max_output_tokens(20000);
        match limiter.check_and_reserve(&request).await {
            Ok(r) => receipts.push(
                limiter
                    .commit_usage(r, Usage::new(100000, 20000))
                    .await
                    .unwrap(),
            ),
            Err(d) => outcomes.push(Outcome::Denied {
                reason: d.reason,
                scope: d.scope,
                quota: d.quota,
                status: d.http_status(),
            }),
        }
    }
    // Per-minute request limits: k1 allows 6 a minute; steps above kept 2 slots
    // (refusals and the dropped reservation gave theirs back).
    for _ in 0..5 {
        let request = Request::with_key_id("k1", "m")
            .input_tokens(1)
            .max_output_tokens(1);
        match limiter.check_and_reserve(&request).await {
            Ok(r) => receipts.push(limiter.commit_usage(r, Usage::new(1, 1)).await.unwrap()),
            Err(d) => outcomes.push(Outcome::Denied {
                reason: d.reason,
                scope: d.scope,
                quota: d.quota,
                status: d.http_status(),
            }),
        }
    }
    (outcomes, receipts)
}

/// Rate-limit windows drift by the microseconds between two calls; compare what
/// does not: limits, remaining counts and the window.
fn without_resets(outcomes: Vec<Outcome>) -> Vec<Outcome> {
    let strip = |w: Option<tollgate::LimitWindow>| {
        w.map(|w| tollgate::LimitWindow {
            reset: std::time::Duration::ZERO,
            ..w
        })
    };
    outcomes
        .into_iter()
        .map(|o| match o {
            Outcome::Admitted { held, limits } => Outcome::Admitted {
                held,
                limits: tollgate::RateLimitStatus {
                    requests: strip(limits.requests),
                    tokens: strip(limits.tokens),
                },
            },
            other => other,
        })
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn redis_decides_exactly_as_the_in_memory_engine() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let memory = tollgate::Engine::new(every_limit_policy());
    let redis = RedisEngine::connect(&server.url(), every_limit_policy(), RedisConfig::default())
        .await
        .unwrap();
    let (memory_outcomes, memory_receipts) = script(&memory).await;
    let (redis_outcomes, redis_receipts) = script(&redis).await;

    let denied = |o: &Vec<Outcome>| {
        o.iter()
            .filter(|o| matches!(o, Outcome::Denied { .. }))
            .count()
    };
    assert!(denied(&memory_outcomes) >= 10, "{memory_outcomes:#?}");
    assert_eq!(
        without_resets(redis_outcomes),
        without_resets(memory_outcomes)
    );
    assert_eq!(redis_receipts, memory_receipts);

    // Redis's books agree with the receipts to the pico-dollar.
    let total: Decimal = redis_receipts.iter().map(|r| r.cost()).sum();
    let org_spent = Decimal::new(
        server
            .cli(&["hget", &redis.org_key(), "spent"])
            .parse()
            .unwrap(),
        12,
    );
    assert_eq!(org_spent, total);
    let wallet_spent = server.cli(&["hget", "tollgate:v1:{org:acme}:wallet", "spent"]);
    assert_eq!(Decimal::new(wallet_spent.parse().unwrap(), 12), total);
    for key in [
        redis.workspace_key("ws1"),
        redis.workspace_key("ws2"),
        redis.org_key(),
        "tollgate:v1:{ws:ws1}:key:k1".to_owned(),
        "tollgate:v1:{ws:ws1}:model:m".to_owned(),
    ] {
        assert_eq!(server.cli(&["hget", &key, "held"]), "0", "{key}");
    }
    assert_eq!(
        server.cli(&["hget", &redis.workspace_key("ws1"), "conc"]),
        "0"
    );
}
