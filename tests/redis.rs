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
    assert_month_bounds(&server, &ws);

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
                    held: r.reserved_cost(),
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

/// Token windows drain while the script runs (a token of a 25,000-per-minute limit
/// every 2.4 ms), and the two backends run it at different speeds: token counts left
/// may differ by a few; everything else must be equal.
fn assert_same_outcomes(redis: &[Outcome], memory: &[Outcome]) {
    use tollgate::{LimitWindow, Quota};
    assert_eq!(redis.len(), memory.len(), "{redis:#?}\n{memory:#?}");
    let close = |a: u64, b: u64| a.abs_diff(b) <= 5;
    let window = |a: Option<LimitWindow>, b: Option<LimitWindow>| match (a, b) {
        (Some(a), Some(b)) => {
            a.limit == b.limit && a.window == b.window && close(a.remaining, b.remaining)
        }
        (a, b) => a == b,
    };
    for (r, m) in redis.iter().zip(memory) {
        let same = match (r, m) {
            (
                Outcome::Admitted {
                    held: h1,
                    limits: l1,
                },
                Outcome::Admitted {
                    held: h2,
                    limits: l2,
                },
            ) => {
                h1 == h2
                    && l1.requests.map(|w| (w.limit, w.remaining))
                        == l2.requests.map(|w| (w.limit, w.remaining))
                    && window(l1.tokens, l2.tokens)
            }
            (
                Outcome::Denied {
                    reason: r1,
                    scope: s1,
                    quota:
                        Some(Quota::Tokens {
                            limit: a,
                            remaining: b,
                            window: c,
                            requested: d,
                        }),
                    status: t1,
                },
                Outcome::Denied {
                    reason: r2,
                    scope: s2,
                    quota:
                        Some(Quota::Tokens {
                            limit: e,
                            remaining: f,
                            window: g,
                            requested: h,
                        }),
                    status: t2,
                },
            ) => (r1, s1, a, c, d, t1) == (r2, s2, e, g, h, t2) && close(*b, *f),
            (r, m) => r == m,
        };
        assert!(same, "redis {r:?}\nmemory {m:?}");
    }
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
    assert_same_outcomes(&redis_outcomes, &memory_outcomes);
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
    let wallet_spent = server.cli(&["hget", "tollgate:v2:{org:acme}:wallet", "spent"]);
    assert_eq!(Decimal::new(wallet_spent.parse().unwrap(), 12), total);
    for key in [
        redis.workspace_key("ws1"),
        redis.workspace_key("ws2"),
        redis.org_key(),
        "tollgate:v2:{ws:ws1}:key:k1".to_owned(),
        "tollgate:v2:{ws:ws1}:model:m".to_owned(),
    ] {
        assert_eq!(server.cli(&["hget", &key, "held"]), "0", "{key}");
    }
    assert_eq!(
        server.cli(&["hget", &redis.workspace_key("ws1"), "conc"]),
        "0"
    );
}

/// The scripts compute calendar-month bounds from Redis TIME in Lua; they must be the
/// first instants of this month and the next, in UTC.
fn assert_month_bounds(server: &RedisServer, key: &str) {
    use chrono::{Datelike, TimeZone, Utc};
    let micros = |field: &str| -> i64 { hget(server, key, field).parse().unwrap() };
    let (start, end) = (micros("ps"), micros("pe"));
    let time = server.cli(&["time"]);
    let now_s: i64 = time.lines().next().unwrap().trim().parse().unwrap();
    let now = Utc.timestamp_opt(now_s, 0).unwrap();
    let first = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .unwrap();
    let next = if now.month() == 12 {
        Utc.with_ymd_and_hms(now.year() + 1, 1, 1, 0, 0, 0).unwrap()
    } else {
        Utc.with_ymd_and_hms(now.year(), now.month() + 1, 1, 0, 0, 0)
            .unwrap()
    };
    assert_eq!(start, first.timestamp_micros(), "period start");
    assert_eq!(end, next.timestamp_micros(), "period end");
}

/// The scripts' calendar arithmetic (Lua, from Redis TIME) against chrono, at the
/// boundaries that break naive code: year ends, leap days, century years.
#[test]
fn lua_period_bounds_match_chrono() {
    use chrono::{DateTime, Datelike, TimeZone, Utc};
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    // The function library as a plain script (without its shebang line and its
    // registrations), with `bounds` called at a given `now`: `now` is a local of the
    // library, and the functions see a reassignment.
    let library: Vec<&str> = include_str!("../src/redis/scripts/tollgate.lua")
        .lines()
        .filter(|line| !line.starts_with("#!") && !line.starts_with("redis.register_function"))
        .collect();
    let script = format!("{}\nnow = tonumber(ARGV[1])\nlocal s, e = bounds(tonumber(ARGV[2]), tonumber(ARGV[3]))\nreturn {{string.format('%.0f', s), string.format('%.0f', e)}}", library.join("\n"));
    let month = |at: DateTime<Utc>| {
        let first = Utc
            .with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
            .unwrap();
        let next = if at.month() == 12 {
            Utc.with_ymd_and_hms(at.year() + 1, 1, 1, 0, 0, 0).unwrap()
        } else {
            Utc.with_ymd_and_hms(at.year(), at.month() + 1, 1, 0, 0, 0)
                .unwrap()
        };
        (first.timestamp_micros(), next.timestamp_micros())
    };
    let instants = [
        Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap(),
        Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap(),
        Utc.with_ymd_and_hms(2028, 2, 29, 12, 0, 0).unwrap(),
        Utc.with_ymd_and_hms(2028, 3, 1, 0, 0, 0).unwrap(),
        Utc.with_ymd_and_hms(2100, 2, 28, 23, 0, 0).unwrap(),
        Utc.with_ymd_and_hms(2000, 2, 29, 0, 0, 1).unwrap(),
        Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap(),
    ];
    for at in instants {
        let now = at.timestamp_micros().to_string();
        let run = |kind: &str, seconds: &str| -> (i64, i64) {
            let out = server.cli(&["eval", &script, "0", &now, kind, seconds]);
            let mut lines = out.lines().map(|l| l.trim().parse::<i64>().unwrap());
            (lines.next().unwrap(), lines.next().unwrap())
        };
        assert_eq!(run("2", "0"), month(at), "month of {at}");
        let day = Utc
            .with_ymd_and_hms(at.year(), at.month(), at.day(), 0, 0, 0)
            .unwrap()
            .timestamp_micros();
        assert_eq!(run("1", "0"), (day, day + 86_400_000_000), "day of {at}");
        let hour = at.timestamp_micros() - at.timestamp_micros() % 3_600_000_000;
        assert_eq!(
            run("3", "3600"),
            (hour, hour + 3_600_000_000),
            "hour of {at}"
        );
    }
}
