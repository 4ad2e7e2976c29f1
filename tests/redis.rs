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
    BudgetPeriod, BudgetSpec, DenialReason, Held, KeySpec, KeyStatus, Limiter, LimitsSpec,
    ModelSpec, OrgSpec, Policy, PolicyDocument, RedisConfig, RedisEngine, RedisReservation,
    Request, Reservation, Scope, ScopeReport, Usage, UsageSnapshot, WorkspaceSpec,
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
    // An admitted request's window also says how far apart in time the two engines
    // read it (its reset): what drained in between may differ too, on a busy machine
    // more than five tokens of a fast limit.
    let window = |a: Option<LimitWindow>, b: Option<LimitWindow>| match (a, b) {
        (Some(a), Some(b)) => {
            let apart = if a.reset > b.reset {
                a.reset - b.reset
            } else {
                b.reset - a.reset
            };
            let per_unit = a.window.as_nanos() / u128::from(a.limit.max(1));
            let drained =
                u64::try_from(apart.as_nanos().div_ceil(per_unit.max(1))).unwrap_or(u64::MAX);
            a.limit == b.limit
                && a.window == b.window
                && (close(a.remaining, b.remaining)
                    || a.remaining.abs_diff(b.remaining) <= drained.saturating_add(1))
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

// ---------------------------------------------------------------------------------
// Policy edits with requests in flight (issue 12), on both backends in lockstep.
// ---------------------------------------------------------------------------------

/// The policy the edits test runs, as its steps change it: org "acme" ($1 a month,
/// $0.50 wallet), model "m" at $1 per million input and $2 per million output tokens;
/// "ws1" with `rpm`, `tpm` and a $0.10 budget per `period`, keys "k1" and "k2";
/// "ws2" (at most 2 in flight, 3,000 tokens a minute, $0.05 a month) with key "k3".
#[derive(Clone, Copy)]
struct Edited {
    rpm: i64,
    tpm: i64,
    period: BudgetPeriod,
    k2: bool,
    k2_revoked: bool,
    ws2: bool,
    k3: bool,
}

fn ws2_spec() -> WorkspaceSpec {
    WorkspaceSpec::new("ws2", "two")
        .grant("m")
        .limits(LimitsSpec {
            tpm: Some(3_000),
            max_concurrent: Some(2),
            ..LimitsSpec::default()
        })
        .budget(BudgetSpec::new(dec("0.05"), BudgetPeriod::Month))
}

impl Edited {
    fn policy(self) -> Policy {
        let mut org = OrgSpec::new("acme");
        org.budget = Some(BudgetSpec::new(dec("1"), BudgetPeriod::Month));
        org.wallet = Some(dec("0.5"));
        let mut k2 = KeySpec::new("k2", "ws1", "sk-e2");
        if self.k2_revoked {
            k2.status = KeyStatus::Revoked;
        }
        let k1 = KeySpec::new("k1", "ws1", "sk-e1");
        let mut doc = PolicyDocument::new(org)
            .model(ModelSpec::new("m", dec("1"), dec("2")))
            .workspace(
                WorkspaceSpec::new("ws1", "one")
                    .grant("m")
                    .limits(LimitsSpec {
                        rpm: Some(self.rpm),
                        tpm: Some(self.tpm),
                        ..LimitsSpec::default()
                    })
                    .budget(BudgetSpec::new(dec("0.1"), self.period)),
            )
            .key(k1);
        if self.k2 {
            doc = doc.key(k2);
        }
        if self.ws2 {
            doc = doc.workspace(ws2_spec());
            if self.k3 {
                doc = doc.key(KeySpec::new("k3", "ws2", "sk-e3"));
            }
        }
        Policy::new(doc).unwrap()
    }
}

/// What a step did on one backend.
fn outcome<R: Held>(result: &Result<R, tollgate::Denial>) -> Outcome {
    match result {
        Ok(r) => Outcome::Admitted {
            held: r.reserved_cost(),
            limits: r.rate_limits(),
        },
        Err(d) => Outcome::Denied {
            reason: d.reason,
            scope: d.scope,
            quota: d.quota,
            status: d.http_status(),
        },
    }
}

/// One scope's current period as both backends report it.
type Book = (
    tollgate::Timestamp,
    tollgate::Timestamp,
    u64,
    u64,
    u64,
    Decimal,
    Decimal,
    u32,
);

fn book(r: &ScopeReport) -> Book {
    let c = &r.current;
    (
        c.period_start,
        c.period_end,
        c.requests,
        c.input_tokens,
        c.output_tokens,
        c.cost,
        c.held,
        r.in_flight,
    )
}

/// Every scope's book, by id, in a fixed order.
fn books(u: &UsageSnapshot) -> (Book, Decimal, Vec<(String, Book)>) {
    let mut scopes = Vec::new();
    for ws in &u.workspaces {
        scopes.push((ws.id.clone(), book(&ws.usage)));
        for m in &ws.models {
            scopes.push((format!("{} × {}", ws.id, m.model), book(&m.usage)));
        }
    }
    for k in &u.keys {
        scopes.push((format!("key {}", k.id), book(&k.usage)));
    }
    scopes.sort_by(|a, b| a.0.cmp(&b.0));
    (book(&u.org), u.wallet_spent, scopes)
}

/// The in-memory engine and the Redis engine, driven step by step through the same
/// requests and policy edits, each step on one right after the other so both see the
/// same instants (token windows drain in real time: a few tokens' drift is allowed,
/// as in the script above).
struct Lockstep<'s> {
    server: &'s RedisServer,
    memory: tollgate::Engine,
    redis: RedisEngine,
    policy: Edited,
    /// Outstanding reservations by name, with their workspace.
    held: Vec<(&'static str, &'static str, Reservation, RedisReservation)>,
    /// Receipts, with the workspace each request was admitted in.
    receipts: Vec<(&'static str, tollgate::Receipt)>,
}

impl<'s> Lockstep<'s> {
    async fn start(server: &'s RedisServer, policy: Edited) -> Self {
        Lockstep {
            server,
            memory: tollgate::Engine::new(policy.policy()),
            redis: RedisEngine::connect(&server.url(), policy.policy(), RedisConfig::default())
                .await
                .unwrap(),
            policy,
            held: Vec::new(),
            receipts: Vec::new(),
        }
    }

    /// Reserve on both; both must decide alike. Keeps the reservations as `name`.
    async fn reserve(&mut self, name: &'static str, key: &str, input: u32, output: u32) -> bool {
        let request = Request::with_key_id(key, "m")
            .input_tokens(input)
            .max_output_tokens(output);
        let memory = self.memory.check_and_reserve(&request);
        let redis = self.redis.check_and_reserve(&request).await;
        let (m, r) = (outcome(&memory), outcome(&redis));
        eprintln!("{name}: memory {m:?}\n{name}: redis {r:?}");
        assert_same_outcomes(std::slice::from_ref(&r), std::slice::from_ref(&m));
        match (memory, redis) {
            (Ok(memory), Ok(redis)) => {
                let ws = if key == "k3" { "ws2" } else { "ws1" };
                self.held.push((name, ws, memory, redis));
                true
            }
            _ => false,
        }
    }

    fn take(&mut self, name: &str) -> (&'static str, Reservation, RedisReservation) {
        let i = self
            .held
            .iter()
            .position(|h| h.0 == name)
            .unwrap_or_else(|| panic!("{name} is not held"));
        let (_, ws, memory, redis) = self.held.remove(i);
        (ws, memory, redis)
    }

    async fn commit(&mut self, name: &str, input: u32, output: u32) {
        let (ws, memory, redis) = self.take(name);
        let m = self
            .memory
            .commit_usage(memory, Usage::new(input, output))
            .unwrap();
        let r = self
            .redis
            .commit_usage(redis, Usage::new(input, output))
            .await
            .unwrap();
        assert_eq!(r, m, "receipts of {name}");
        self.receipts.push((ws, m));
    }

    /// Drop on both, and wait until Redis has released the hold in the background.
    async fn drop(&mut self, name: &str) {
        let (ws, memory, redis) = self.take(name);
        let id = redis.id().unwrap().to_owned();
        drop(memory);
        drop(redis);
        let records = [
            format!("tollgate:v2:{{ws:{ws}}}:resv:{id}"),
            format!("tollgate:v2:{{org:acme}}:resv:{id}"),
        ];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while records
            .iter()
            .any(|r| self.server.cli(&["exists", r]) == "1")
        {
            assert!(std::time::Instant::now() < deadline, "{name} not released");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn apply(&mut self, policy: Edited) {
        self.policy = policy;
        self.memory.apply_policy(policy.policy()).unwrap();
        self.redis.apply_policy(policy.policy()).await.unwrap();
    }

    async fn revoke(&mut self, key: &str) {
        self.policy.k2_revoked |= key == "k2";
        self.memory.revoke_key(key, None).unwrap();
        self.redis.revoke_key(key, None).await.unwrap();
    }

    async fn delete_ws2(&mut self) {
        (self.policy.ws2, self.policy.k3) = (false, false);
        self.memory.delete_workspace("ws2", None).unwrap();
        self.redis.delete_workspace("ws2", None).await.unwrap();
    }

    async fn create_ws2(&mut self) {
        self.policy.ws2 = true;
        self.memory.create_workspace(ws2_spec(), None).unwrap();
        self.redis.create_workspace(ws2_spec(), None).await.unwrap();
    }

    /// Both backends' books agree, scope by scope.
    async fn same_books(&self, when: &str) -> UsageSnapshot {
        let memory = self.memory.usage();
        let redis = self.redis.usage().await.unwrap();
        assert_eq!(books(&redis), books(&memory), "redis, then memory: {when}");
        memory
    }

    /// What the receipts of requests admitted in `ws` (all of them: `None`) cost.
    fn charged(&self, ws: Option<&str>) -> Decimal {
        self.receipts
            .iter()
            .filter(|(w, _)| ws.map_or(true, |ws| ws == *w))
            .map(|(_, r)| r.cost())
            .sum()
    }
}

/// Sleep until `offset` after the next whole multiple of `period` on the system clock
/// (which Redis `TIME` reads too).
async fn sleep_past_boundary(period: std::time::Duration, offset: std::time::Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let period_ns = period.as_nanos();
    let next = (now.as_nanos() / period_ns + 1) * period_ns;
    let wait = std::time::Duration::from_nanos((next - now.as_nanos()) as u64) + offset;
    tokio::time::sleep(wait).await;
}

/// Issue 12 on both backends: rate limits raised and lowered under holds in flight, a
/// budget's period kind changed under a hold, a key revoked and a workspace deleted
/// and re-created while their requests are in flight. Every decision, receipt and
/// book (spend, held, requests and tokens per scope, period bounds, in flight) must be
/// the same in memory and in Redis; spend must add up to the receipts.
#[tokio::test(flavor = "current_thread")]
async fn redis_and_memory_agree_when_rules_change_under_requests_in_flight() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let start = Edited {
        rpm: 10,
        tpm: 6_000,
        period: BudgetPeriod::Month,
        k2: true,
        k2_revoked: false,
        ws2: true,
        k3: true,
    };
    let mut both = Lockstep::start(&server, start).await;

    // Rate limits raised, then lowered, with holds in flight: refunds in units at the
    // interval in force (at most what can be undrained), overage at the new interval.
    // Redis brings a bucket to a changed rule at its next reserve (commits and
    // releases use the rule it stores), so every edit here is followed by a request
    // reaching ws1's buckets before anything settles: then both count alike.
    assert!(both.reserve("r1", "k1", 1_000, 1_000).await);
    assert!(both.reserve("r2", "k1", 1_500, 500).await);
    both.apply(Edited {
        rpm: 20,
        tpm: 12_000,
        ..both.policy
    })
    .await;
    assert!(both.reserve("r3", "k2", 2_000, 2_000).await);
    both.drop("r1").await; // one rescale (a raise) since its take
    both.same_books("after a raise and a drop").await;
    both.apply(Edited {
        rpm: 5,
        tpm: 3_000,
        ..both.policy
    })
    .await;
    // 6,000 tokens of backlog against 3,000 a minute: refused, the buckets rescaled.
    assert!(!both.reserve("touch", "k1", 1, 0).await);
    both.commit("r2", 500, 100).await; // two rescales since its take: nothing back
    both.commit("r3", 4_500, 0).await; // one rescale since; 500 tokens of overage
                                       // The lowered bucket is deep in debt: refused on both.
    assert!(!both.reserve("refused", "k1", 100, 100).await);
    both.same_books("after lowering").await;

    // A budget's period kind changed under a hold (bug 3): a hold taken under a
    // 2-second period settles after its boundary into the monthly period the policy
    // says now, without starting the month again.
    // (Redis moves a scope to a changed period kind at its next reserve too, so again
    // a request follows each edit.)
    both.apply(Edited {
        rpm: 60,
        tpm: 100_000,
        ..both.policy
    })
    .await;
    assert!(both.reserve("t1", "k1", 1, 0).await);
    let seconds = |s| std::time::Duration::from_secs(s);
    sleep_past_boundary(seconds(2), std::time::Duration::from_millis(20)).await;
    both.apply(Edited {
        period: BudgetPeriod::Custom { seconds: 2 },
        ..both.policy
    })
    .await;
    assert!(both.reserve("r4", "k1", 200, 200).await);
    both.apply(Edited {
        period: BudgetPeriod::Month,
        ..both.policy
    })
    .await;
    assert!(both.reserve("t2", "k1", 1, 0).await);
    sleep_past_boundary(seconds(2), std::time::Duration::from_millis(100)).await;
    both.commit("r4", 300, 100).await;
    both.commit("t1", 1, 0).await;
    both.commit("t2", 1, 0).await;
    let usage = both.same_books("after a period kind change").await;
    let ws1 = usage.workspaces.iter().find(|w| w.id == "ws1").unwrap();
    let ws1 = &ws1.usage.current;
    assert_eq!(ws1.cost, both.charged(Some("ws1")), "ws1 kept its month");
    assert_eq!(ws1.requests, 5);

    // A key revoked while its request is in flight: refused at once, the request in
    // flight still settles.
    assert!(both.reserve("r5", "k2", 100, 100).await);
    both.revoke("k2").await;
    assert!(!both.reserve("revoked", "k2", 1, 1).await);
    both.commit("r5", 100, 50).await;
    both.same_books("after a revocation").await;

    // A workspace deleted and re-created while its request is in flight: the late
    // commit is charged to the org and wallet, and the new workspace starts from zero.
    assert!(both.reserve("r6", "k3", 1_000, 1_000).await);
    assert!(both.reserve("r7", "k3", 500, 500).await);
    both.delete_ws2().await;
    assert!(!both.reserve("deleted", "k3", 1, 1).await);
    both.commit("r6", 1_000, 200).await;
    both.create_ws2().await;
    both.apply(Edited {
        k3: true,
        ..both.policy
    })
    .await;
    both.drop("r7").await;
    let usage = both.same_books("after re-creating a workspace").await;
    let ws2 = usage.workspaces.iter().find(|w| w.id == "ws2").unwrap();
    assert_eq!(
        (
            ws2.usage.current.cost,
            ws2.usage.current.held,
            ws2.usage.in_flight
        ),
        (Decimal::ZERO, Decimal::ZERO, 0),
        "a re-created workspace starts from zero"
    );
    // Two in flight at once again in the new workspace (its limit is 2).
    assert!(both.reserve("r8", "k3", 10, 10).await);
    assert!(both.reserve("r9", "k3", 10, 10).await);
    assert!(!both.reserve("third", "k3", 10, 10).await);
    both.commit("r8", 10, 10).await;
    both.commit("r9", 10, 10).await;

    let usage = both.same_books("at the end").await;
    assert_eq!(usage.org.current.cost, both.charged(None));
    assert_eq!(usage.wallet_spent, both.charged(None));
    assert_eq!(usage.org.current.held, Decimal::ZERO);
    assert!(both.held.is_empty());
}

const EDITED: Edited = Edited {
    rpm: 60,
    tpm: 6_000,
    period: BudgetPeriod::Month,
    k2: true,
    k2_revoked: false,
    ws2: true,
    k3: true,
};

// The four tests below are places where Redis once counted differently from the
// in-memory engine under changed rules (found by the lockstep test above). The first
// three now agree; the last (a key removed and put back while its request is in
// flight) is ignored until Redis keeps a generation per key; run it with
// `cargo test --features redis --test redis -- --ignored`.

/// A hold taken before a limit was lowered and refunded after it: both engines
/// convert the units left at the bucket's interval now (an earlier Redis converted
/// them at the faster of the two intervals, giving back half: 2,000 tokens refunded
/// as 1,000 against 3,000 a minute).
#[tokio::test(flavor = "current_thread")]
async fn a_hold_refunded_after_a_lowered_limit_gives_back_the_same_on_both() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let mut both = Lockstep::start(&server, EDITED).await;
    assert!(both.reserve("held", "k1", 2_000, 0).await);
    both.apply(Edited {
        tpm: 3_000,
        ..both.policy
    })
    .await;
    // Brings Redis's buckets to the new limit before anything settles.
    assert!(both.reserve("touch", "k2", 1, 0).await);
    both.commit("held", 0, 0).await;
    assert!(both.reserve("probe", "k1", 100, 0).await);
}

/// A budget's period kind changed while a request is in flight, and no request
/// reaches the workspace before the old kind's boundary: both engines move to the
/// new kind when the policy is applied (Redis by its `follow` function), so the late
/// commit cannot roll the period by the old kind (bug 3 in that window, when Redis
/// moved only at the workspace's next reserve).
#[tokio::test(flavor = "current_thread")]
async fn a_period_kind_change_applies_at_once_on_both() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let two_seconds = Edited {
        period: BudgetPeriod::Custom { seconds: 2 },
        ..EDITED
    };
    let mut both = Lockstep::start(&server, two_seconds).await;
    let seconds = std::time::Duration::from_secs(2);
    sleep_past_boundary(seconds, std::time::Duration::from_millis(20)).await;
    assert!(both.reserve("spent", "k1", 1_000, 0).await);
    both.commit("spent", 1_000, 0).await;
    assert!(both.reserve("in flight", "k1", 500, 0).await);
    both.apply(Edited {
        period: BudgetPeriod::Month,
        ..both.policy
    })
    .await;
    sleep_past_boundary(seconds, std::time::Duration::from_millis(100)).await;
    both.commit("in flight", 500, 0).await;
    let usage = both.same_books("after the late commit").await;
    let ws1 = usage.workspaces.iter().find(|w| w.id == "ws1").unwrap();
    assert_eq!(ws1.usage.current.cost, both.charged(Some("ws1")));
}

/// A budget's period kind changed after the old kind's period ended with no request
/// since: both engines close the ended period first (its spend is the previous
/// period's) and start the new kind's from zero, rather than carrying the ended
/// period's spend into the new one (as Redis once did).
#[tokio::test(flavor = "current_thread")]
async fn a_period_kind_change_after_an_ended_period_starts_alike_on_both() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let two_seconds = Edited {
        period: BudgetPeriod::Custom { seconds: 2 },
        ..EDITED
    };
    let mut both = Lockstep::start(&server, two_seconds).await;
    let seconds = std::time::Duration::from_secs(2);
    sleep_past_boundary(seconds, std::time::Duration::from_millis(20)).await;
    assert!(both.reserve("spent", "k1", 1_000, 0).await);
    both.commit("spent", 1_000, 0).await;
    sleep_past_boundary(seconds, std::time::Duration::from_millis(100)).await;
    both.apply(Edited {
        period: BudgetPeriod::Month,
        ..both.policy
    })
    .await;
    assert!(both.reserve("after", "k1", 10, 0).await);
    both.commit("after", 10, 0).await;
    both.same_books("after the kind change").await;
}

/// A key taken out of the policy while its request is in flight, then put back: the
/// in-memory engine gives the key fresh counters (the late commit settles on the old
/// ones, which no report shows); Redis keeps the key's counters under the same name,
/// so the key comes back with its old spend plus the late commit. (A deleted and
/// re-created workspace starts from zero on both.)
#[tokio::test(flavor = "current_thread")]
#[ignore = "Redis keeps a removed key's counters for when it comes back; memory starts it afresh"]
async fn a_key_removed_and_put_back_starts_alike_on_both() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let mut both = Lockstep::start(&server, EDITED).await;
    assert!(both.reserve("spent", "k2", 1_000, 0).await);
    both.commit("spent", 1_000, 0).await;
    assert!(both.reserve("in flight", "k2", 1_000, 0).await);
    both.apply(Edited {
        k2: false,
        ..both.policy
    })
    .await;
    both.apply(Edited {
        k2: true,
        ..both.policy
    })
    .await;
    both.commit("in flight", 1_000, 0).await;
    both.same_books("after the key came back").await;
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
