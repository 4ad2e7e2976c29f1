//! Quota leasing on the Redis backend (`RedisConfig::lease`): a busy key and model
//! takes a chunk of its limits and budgets in one call and admits from it in memory.
//! What must hold: never more admitted than a limit or budget allows (across
//! instances too), the books equal the receipts once leases are settled, nothing stays
//! held, small budgets are decided exactly (never leased), and a policy change stops
//! an old lease at once.
//!
//! Run with `cargo test --features redis --test redis_lease`. Needs `redis-server`
//! and `redis-cli` (see `support/redis_server.rs`): with `CI` set a missing server
//! fails these tests; elsewhere `TOLLGATE_SKIP_REDIS=1` skips them.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, Instant};

use redis_server::{require_redis, RedisCluster, RedisServer};
use rust_decimal::Decimal;
use tollgate::{
    BudgetPeriod, BudgetSpec, DenialReason, KeySpec, LeaseConfig, LimitsSpec, ModelSpec, OrgSpec,
    Policy, PolicyDocument, RedisConfig, RedisEngine, Request, Usage, UsageSnapshot, WorkspaceSpec,
};

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Model "m" at $1 per million tokens; org "acme" with `org_budget` a month;
/// workspace "ws1" with `ws_budget` a month and `rpm` requests a minute; keys "k1"
/// and "k2" in it.
fn policy(ws_budget: &str, org_budget: &str, rpm: i64) -> Policy {
    let mut org = OrgSpec::new("acme");
    org.budget = Some(BudgetSpec::new(dec(org_budget), BudgetPeriod::Month));
    Policy::new(
        PolicyDocument::new(org)
            .model(ModelSpec::new("m", dec("1"), dec("1")))
            .workspace(
                WorkspaceSpec::new("ws1", "one")
                    .grant("m")
                    .budget(BudgetSpec::new(dec(ws_budget), BudgetPeriod::Month))
                    .limits(LimitsSpec {
                        rpm: Some(rpm),
                        ..LimitsSpec::default()
                    }),
            )
            .key(KeySpec::new("k1", "ws1", "sk-1"))
            .key(KeySpec::new("k2", "ws1", "sk-2")),
    )
    .unwrap()
}

/// 1,000 tokens at most: $0.001 held per request.
fn ask(key: &str) -> Request<'_> {
    Request::with_key_id(key, "m")
        .input_tokens(600)
        .max_output_tokens(400)
}

fn leasing() -> RedisConfig {
    RedisConfig {
        lease: Some(LeaseConfig {
            // Long enough that the tests, not the clock, decide when leases end.
            max_age: Duration::from_secs(30),
            ..LeaseConfig::default()
        }),
        ..RedisConfig::default()
    }
}

async fn connect(server: &RedisServer, policy: Policy) -> RedisEngine {
    RedisEngine::connect(&server.url(), policy, leasing())
        .await
        .unwrap()
}

/// Poll `probe` until it yields a value, panicking after 10 s.
async fn poll_until<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Close `engine`'s leases and wait until Redis holds nothing for the org.
async fn settled(engine: &RedisEngine) -> UsageSnapshot {
    engine.close_leases().await;
    poll_until("leases to settle", || async {
        let usage = engine.usage().await.unwrap();
        let held = usage.org.current.held + usage.workspaces[0].usage.current.held;
        (held.is_zero() && engine.releases_in_flight() == 0).then_some(usage)
    })
    .await
}

/// Usage of request `i`: between half and all of its worst case.
fn usage_of(i: u64) -> Usage {
    let input = 300 + u32::try_from(i * 37 % 301).unwrap();
    let output = 200 + u32::try_from(i * 53 % 201).unwrap();
    Usage::new(input, output)
}

/// `n` requests one after another, taking turns over `keys`: every `drop_every`-th
/// dropped (a client that hung up), the others committed with `usage_of(i)`. What the
/// receipts charged, and for how many requests.
async fn serve(engine: &RedisEngine, keys: &[&str], n: u64, drop_every: u64) -> (Decimal, u64) {
    let (mut cost, mut requests) = (Decimal::ZERO, 0u64);
    for i in 0..n {
        let key = keys[usize::try_from(i).unwrap() % keys.len()];
        let reservation = engine.check_and_reserve(&ask(key)).await.unwrap();
        if i % drop_every == 0 {
            drop(reservation);
            continue;
        }
        cost += engine
            .commit_usage(reservation, usage_of(i))
            .await
            .unwrap()
            .cost();
        requests += 1;
    }
    (cost, requests)
}

/// 300 requests one after another on one key: served from leases in a small
/// fraction of the calls exact reserves and commits would take (600), and as soon as
/// `close_leases` returns (it waits for the settles) Redis's books equal the
/// receipts: requests, tokens and cost, with nothing held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_key_is_served_from_leases_and_the_books_equal_the_receipts() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let engine = connect(&server, policy("100", "1000", 100_000)).await;
    assert_eq!(server.cli(&["config", "resetstat"]), "OK");
    let (mut cost, mut input, mut output) = (Decimal::ZERO, 0u64, 0u64);
    for i in 0..300 {
        let reservation = engine.check_and_reserve(&ask("k1")).await.unwrap();
        let usage = usage_of(i);
        let receipt = engine.commit_usage(reservation, usage).await.unwrap();
        assert!(!receipt.is_pending());
        cost += receipt.cost();
        input += u64::from(usage.input_tokens);
        output += u64::from(usage.output_tokens);
    }
    // Writes paused: the settles wait in Redis's queue while reads go on, so only a
    // `close_leases` that waits for them sees them land.
    assert_eq!(server.cli(&["client", "pause", "300", "write"]), "OK");
    engine.close_leases().await;
    for scope in ["tollgate:v2:{ws:ws1}:ws", "tollgate:v2:{org:acme}:org"] {
        assert_eq!(server.cli(&["hget", scope, "held"]), "0", "{scope}");
    }
    let usage = engine.usage().await.unwrap();
    let calls = server.fcalls();
    assert!(calls < 60, "300 leased requests took {calls} calls");
    for scope in [&usage.workspaces[0].usage.current, &usage.org.current] {
        assert_eq!(scope.requests, 300);
        assert_eq!(scope.cost, cost);
        assert_eq!(scope.input_tokens, input);
        assert_eq!(scope.output_tokens, output);
        assert_eq!(scope.held, Decimal::ZERO);
    }
}

/// A budget of ten requests is too small to lease (a lease takes at most 1/32 of a
/// budget): 64 reserves at once admit exactly the ten that fit, as without leasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_budget_is_never_leased_and_admits_exactly_what_fits() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let engine = connect(&server, policy("0.010", "1000", 100_000)).await;
    // Make the key busy first: leases are tried only for requests close together.
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.check_and_reserve(&ask("k1")).await })
        })
        .collect();
    let mut admitted = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(reservation) => admitted.push(reservation),
            Err(denial) => assert_eq!(denial.reason, DenialReason::Budget),
        }
    }
    assert_eq!(admitted.len(), 10);
    let ids: std::collections::HashSet<_> = admitted.iter().map(|r| r.id().unwrap()).collect();
    assert_eq!(ids.len(), 10, "each decided alone, none from a lease");
    for reservation in admitted {
        engine
            .commit_usage(reservation, Usage::new(600, 400))
            .await
            .unwrap();
    }
    let usage = settled(&engine).await;
    assert_eq!(usage.workspaces[0].usage.current.cost, dec("0.010"));
    assert_eq!(usage.workspaces[0].usage.current.requests, 10);
}

/// Two leasing instances, 32 tasks each, on a budget of exactly 400 requests (each
/// uses its whole worst case), leased while the budget is far and decided one by one
/// near its end: at most 400 admitted, Redis's books equal the receipts of both,
/// nothing held at the end, leases used (fewer reservation ids than requests), and
/// most of the budget served (the unused part of a lease is given back, not lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_leasing_instances_never_overspend_and_the_books_add_up() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let budget = dec("0.400");
    let engines = [
        connect(&server, policy("0.400", "1000", 1_000_000)).await,
        connect(&server, policy("0.400", "1000", 1_000_000)).await,
    ];
    let mut tasks = Vec::new();
    for engine in &engines {
        for t in 0..32u64 {
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                let (mut cost, mut ids) = (Decimal::ZERO, Vec::new());
                for i in 0..40u64 {
                    let key = if (t + i) % 2 == 0 { "k1" } else { "k2" };
                    match engine.check_and_reserve(&ask(key)).await {
                        Ok(reservation) => {
                            ids.push(reservation.id().unwrap().to_owned());
                            let receipt = engine
                                .commit_usage(reservation, Usage::new(600, 400))
                                .await
                                .unwrap();
                            cost += receipt.cost();
                        }
                        Err(denial) => assert_eq!(denial.reason, DenialReason::Budget),
                    }
                }
                (cost, ids)
            }));
        }
    }
    let (mut cost, mut ids) = (Decimal::ZERO, Vec::new());
    for task in tasks {
        let (c, i) = task.await.unwrap();
        cost += c;
        ids.extend(i);
    }
    let requests = ids.len() as u64;
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    settled(&engines[0]).await;
    let usage = settled(&engines[1]).await;
    let ws = usage.workspaces[0].usage.current;
    assert!(requests <= 400, "{requests} admitted on a budget of 400");
    assert!(ws.cost <= budget, "spent {} of {budget}", ws.cost);
    assert_eq!(ws.cost, cost, "books = receipts");
    assert_eq!(ws.requests, requests);
    assert_eq!(usage.org.current.cost, cost);
    assert!(
        distinct.len() < ids.len(),
        "no request was admitted from a lease"
    );
    assert!(requests >= 200, "only {requests} of 400 served");
}

/// Requests admitted from a lease and then dropped (a client that hung up) are not
/// charged; the lease settles what the committed ones used, and gives back the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_leased_requests_are_not_charged() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let engine = connect(&server, policy("100", "1000", 100_000)).await;
    let (cost, committed) = serve(&engine, &["k1"], 120, 3).await;
    let usage = settled(&engine).await;
    let ws = usage.workspaces[0].usage.current;
    assert_eq!(ws.requests, committed);
    assert_eq!(ws.cost, cost);
    assert_eq!(usage.org.current.cost, cost);
}

/// A lease taken under one policy admits nothing once the policy changes: a budget
/// lowered below what is spent refuses the very next request, although the old
/// lease had room left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_stops_a_lease_at_once() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let engine = connect(&server, policy("100", "1000", 100_000)).await;
    // Both keys busy, each with a lease with room left.
    let mut ids = std::collections::HashSet::new();
    for i in 0..20 {
        for key in ["k1", "k2"] {
            let reservation = engine.check_and_reserve(&ask(key)).await.unwrap();
            ids.insert(reservation.id().unwrap().to_owned());
            engine.commit_usage(reservation, usage_of(i)).await.unwrap();
        }
    }
    assert!(ids.len() < 40, "no lease taken");
    engine
        .apply_policy(policy("0.001", "1000", 100_000))
        .await
        .unwrap();
    let denial = engine.check_and_reserve(&ask("k1")).await.unwrap_err();
    assert_eq!(denial.reason, DenialReason::Budget);
    engine.revoke_key("k2", None).await.unwrap();
    let denial = engine.check_and_reserve(&ask("k2")).await.unwrap_err();
    assert_eq!(denial.reason, DenialReason::KeyRevoked);
    let usage = settled(&engine).await;
    assert_eq!(usage.workspaces[0].usage.current.requests, 40);
}

/// A leased request that streams for three reservation TTLs (1 s) keeps its lease's
/// hold in Redis, renewed in the background although the lease stopped admitting
/// requests after 100 ms; its commit then settles the lease, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_stream_keeps_its_lease_held_past_the_ttl() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let ttl = Duration::from_secs(1);
    let engine = RedisEngine::connect(
        &server.url(),
        policy("100", "1000", 100_000),
        RedisConfig {
            reservation_ttl: ttl,
            lease: Some(LeaseConfig {
                max_age: Duration::from_millis(100),
                ..LeaseConfig::default()
            }),
            ..RedisConfig::default()
        },
    )
    .await
    .unwrap();
    // The first request goes alone; the second, close behind, takes a lease.
    let mut cost = Decimal::ZERO;
    let first = engine.check_and_reserve(&ask("k1")).await.unwrap();
    cost += engine
        .commit_usage(first, usage_of(1))
        .await
        .unwrap()
        .cost();
    let second = engine.check_and_reserve(&ask("k1")).await.unwrap();
    let stream = engine.check_and_reserve(&ask("k1")).await.unwrap();
    let lease = stream.id().unwrap().to_owned();
    assert_eq!(second.id(), Some(lease.as_str()), "both from one lease");
    cost += engine
        .commit_usage(second, usage_of(2))
        .await
        .unwrap()
        .cost();

    let until = Instant::now() + 3 * ttl + ttl / 5;
    let mut checks = 0;
    while Instant::now() < until {
        for holds in ["tollgate:v2:{ws:ws1}:holds", "tollgate:v2:{org:acme}:holds"] {
            let score = server.cli(&["zscore", holds, &lease]);
            assert!(!score.is_empty(), "the lease's hold left {holds}");
            let expiry: f64 = score.parse().unwrap();
            assert!(expiry > server.time_ms(), "the lease's hold expired");
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(checks >= 3, "only {checks} checks");

    cost += engine
        .commit_usage(stream, usage_of(3))
        .await
        .unwrap()
        .cost();
    let usage = settled(&engine).await;
    let ws = usage.workspaces[0].usage.current;
    assert_eq!(ws.requests, 3);
    assert_eq!(ws.cost, cost);
    assert_eq!(usage.org.current.cost, cost);
    assert!(server
        .cli(&["zscore", "tollgate:v2:{ws:ws1}:holds", &lease])
        .is_empty());
}

/// A lease gives back the requests it did not serve: with 320 requests a day (a
/// lease holds at most 10), one request served alone and one from a lease of 10,
/// once the lease is settled exactly 318 more fit (another instance, request by
/// request), not 310.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_lease_gives_back_the_requests_it_did_not_serve() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let per_day = || {
        let mut org = OrgSpec::new("acme");
        org.budget = Some(BudgetSpec::new(dec("1000"), BudgetPeriod::Month));
        Policy::new(
            PolicyDocument::new(org)
                .model(ModelSpec::new("m", dec("1"), dec("1")))
                .workspace(
                    WorkspaceSpec::new("ws1", "one")
                        .grant("m")
                        .limits(LimitsSpec {
                            rpd: Some(320),
                            ..LimitsSpec::default()
                        }),
                )
                .key(KeySpec::new("k1", "ws1", "sk-1")),
        )
        .unwrap()
    };
    let engine = connect(&server, per_day()).await;
    let alone = engine.check_and_reserve(&ask("k1")).await.unwrap();
    let leased = engine.check_and_reserve(&ask("k1")).await.unwrap();
    assert_ne!(alone.id(), leased.id());
    for reservation in [alone, leased] {
        engine
            .commit_usage(reservation, Usage::new(600, 400))
            .await
            .unwrap();
    }
    settled(&engine).await;

    let exact = RedisEngine::connect(&server.url(), per_day(), RedisConfig::default())
        .await
        .unwrap();
    let mut held = Vec::new();
    loop {
        match exact.check_and_reserve(&ask("k1")).await {
            Ok(reservation) => held.push(reservation),
            Err(denial) => {
                assert_eq!(denial.reason, DenialReason::RequestsPerDay);
                break;
            }
        }
        assert!(held.len() <= 320, "more than the day's requests admitted");
    }
    assert_eq!(held.len(), 318);
}

/// Leasing on a 3-master cluster (the workspace's and the org's tags on their own
/// shards, one call each): books equal the receipts once the leases are settled, and
/// nothing is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_on_a_cluster_settle_exactly() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let cluster = RedisCluster::start(3);
    let engine =
        RedisEngine::connect_cluster(&cluster.urls(), policy("100", "1000", 100_000), leasing())
            .await
            .unwrap();
    let (cost, requests) = serve(&engine, &["k1", "k2"], 200, 5).await;
    let usage = settled(&engine).await;
    for scope in [&usage.workspaces[0].usage.current, &usage.org.current] {
        assert_eq!(scope.requests, requests);
        assert_eq!(scope.cost, cost);
        assert_eq!(scope.held, Decimal::ZERO);
    }
}

/// One key on a budget of exactly 1,000 requests (each uses its whole worst case),
/// requests one after another until refused: leased while the budget is far, decided
/// one by one in its last quarter (no two requests there share a reservation), and
/// every one of the 1,000 served: a lease strands nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_a_limit_requests_are_decided_one_by_one_and_the_whole_budget_is_served() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let engine = connect(&server, policy("1.000", "1000", 1_000_000)).await;
    let mut ids = Vec::new();
    loop {
        match engine.check_and_reserve(&ask("k1")).await {
            Ok(reservation) => {
                ids.push(reservation.id().unwrap().to_owned());
                engine
                    .commit_usage(reservation, Usage::new(600, 400))
                    .await
                    .unwrap();
            }
            Err(denial) => {
                assert_eq!(denial.reason, DenialReason::Budget);
                break;
            }
        }
        assert!(ids.len() <= 1_000, "more admitted than the budget holds");
    }
    assert_eq!(ids.len(), 1_000);
    let distinct = |range: std::ops::Range<usize>| {
        ids[range]
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    assert!(distinct(0..700) < 700, "no lease while the budget was far");
    assert_eq!(distinct(760..1_000), 240, "a lease in the last quarter");
    let usage = settled(&engine).await;
    assert_eq!(usage.workspaces[0].usage.current.cost, dec("1.000"));
}

/// A key revoked on another instance: this instance's lease on it stops admitting
/// once the new policy reaches it (pub/sub), well within a second, although the lease
/// (30 s) has room left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_on_another_instance_stops_its_lease_within_a_second() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let leasing = connect(&server, policy("100", "1000", 100_000)).await;
    let other = connect(&server, policy("100", "1000", 100_000)).await;
    let mut ids = std::collections::HashSet::new();
    for i in 0..10 {
        let reservation = leasing.check_and_reserve(&ask("k1")).await.unwrap();
        ids.insert(reservation.id().unwrap().to_owned());
        leasing
            .commit_usage(reservation, usage_of(i))
            .await
            .unwrap();
    }
    assert!(ids.len() < 10, "no lease taken");
    other.revoke_key("k1", None).await.unwrap();
    let revoked = Instant::now();
    let denial = poll_until("the revocation to stop the lease", || async {
        match leasing.check_and_reserve(&ask("k1")).await {
            Ok(reservation) => {
                leasing
                    .commit_usage(reservation, Usage::new(600, 400))
                    .await
                    .unwrap();
                None
            }
            Err(denial) => Some(denial),
        }
    })
    .await;
    let took = revoked.elapsed();
    assert_eq!(denial.reason, DenialReason::KeyRevoked);
    assert!(took < Duration::from_secs(1), "admitted for {took:?}");
    let usage = settled(&leasing).await;
    assert_eq!(usage.org.current.held, Decimal::ZERO);
}

/// 64 requests at once on a busy key: the first reserves a lease and the others wait
/// for it rather than each going to Redis alone, so the burst takes a few calls, not
/// 64; the books equal the receipts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_on_a_busy_key_waits_for_the_lease_being_reserved() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let engine = connect(&server, policy("100", "1000", 100_000)).await;
    let first = engine.check_and_reserve(&ask("k1")).await.unwrap();
    let mut cost = engine
        .commit_usage(first, Usage::new(600, 400))
        .await
        .unwrap()
        .cost();
    assert_eq!(server.cli(&["config", "resetstat"]), "OK");
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let reservation = engine.check_and_reserve(&ask("k1")).await.unwrap();
                engine
                    .commit_usage(reservation, Usage::new(600, 400))
                    .await
                    .unwrap()
                    .cost()
            })
        })
        .collect();
    for task in tasks {
        cost += task.await.unwrap();
    }
    let calls = server.fcalls();
    // Without the wait: 18 calls (the 63 others coalesced, each decided alone).
    assert!(calls <= 4, "the burst took {calls} calls");
    let usage = settled(&engine).await;
    assert_eq!(usage.workspaces[0].usage.current.requests, 65);
    assert_eq!(usage.workspaces[0].usage.current.cost, cost);
}
