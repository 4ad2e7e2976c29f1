//! Redis backend under faults: a crashed instance, Redis killed and restarted, bad data.
//!
//! Run with `cargo test --features redis --test redis_faults`. Needs `redis-server`
//! and `redis-cli` (see `support/redis_server.rs`); `TOLLGATE_SKIP_REDIS=1` skips.
//!
//! No test sleeps for a fixed time to let something happen: every wait polls Redis
//! (its `TIME`, or the counters) against a deadline.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::future::Future;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::{Duration, Instant};

use redis_server::{require_redis, RedisServer};
use rust_decimal::Decimal;
use tollgate::{
    BudgetPeriod, BudgetSpec, Denial, DenialReason, Error, KeySpec, LimitsSpec, ModelSpec, OrgSpec,
    Policy, PolicyDocument, Quota, Receipt, RedisConfig, RedisEngine, RedisReservation, Request,
    Scope, StoreError, StoreErrorKind, StoreFailureMode, Usage, WorkspaceSpec,
};

/// Upper bound on any wait for Redis to come back or for its clock to pass a TTL.
const DEADLINE: Duration = Duration::from_secs(15);
/// Pause between two polls of a wait.
const POLL: Duration = Duration::from_millis(10);

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Pico-dollars (how Redis stores money) as USD.
fn usd(picos: i64) -> Decimal {
    Decimal::new(picos, 12)
}

/// A money field of a counter hash, in USD; an absent field is zero.
fn money(server: &RedisServer, key: &str, field: &str) -> Decimal {
    let raw = server.cli(&["hget", key, field]);
    if raw.is_empty() {
        return Decimal::ZERO;
    }
    usd(raw
        .parse()
        .unwrap_or_else(|e| panic!("{key} {field} = {raw:?}: {e}")))
}

fn hget(server: &RedisServer, key: &str, field: &str) -> String {
    server.cli(&["hget", key, field])
}

fn exists(server: &RedisServer, key: &str) -> bool {
    server.cli(&["exists", key]) == "1"
}

fn zcard(server: &RedisServer, key: &str) -> u64 {
    server.cli(&["zcard", key]).parse().unwrap()
}

fn total(receipts: &[Receipt]) -> Decimal {
    receipts.iter().map(Receipt::cost).sum()
}

/// Redis's own clock (`TIME`), in milliseconds: the clock the scripts expire holds by.
fn redis_now_ms(server: &RedisServer) -> u64 {
    let out = server.cli(&["time"]);
    let mut lines = out.lines().map(|l| l.trim().parse::<u64>().unwrap());
    let (seconds, micros) = (lines.next().unwrap(), lines.next().unwrap());
    seconds * 1000 + micros / 1000
}

/// The latest expiry (ms, Redis time) in a holds zset.
fn latest_expiry_ms(server: &RedisServer, holds: &str) -> u64 {
    let out = server.cli(&["zrange", holds, "0", "-1", "withscores"]);
    out.lines()
        .skip(1)
        .step_by(2)
        .map(|score| score.trim().parse::<f64>().unwrap() as u64)
        .max()
        .unwrap_or_else(|| panic!("{holds} is empty"))
}

/// Poll `probe` until it yields a value, panicking with `what` after [`DEADLINE`].
async fn poll_until<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// An engine on `server` for workspace "ws1" with `limits`, failing closed.
async fn connect_closed(server: &RedisServer, limits: LimitsSpec) -> RedisEngine {
    RedisEngine::connect(
        &server.url(),
        policy("ws1", limits, StoreFailureMode::Closed),
        RedisConfig::default(),
    )
    .await
    .unwrap()
}

/// Wait for Redis's clock (not ours) to pass the latest expiry of workspace "ws1"'s and
/// the org's holds.
async fn wait_for_holds_to_expire(server: &RedisServer) {
    let expiry =
        latest_expiry_ms(server, &ws_holds("ws1")).max(latest_expiry_ms(server, ORG_HOLDS));
    poll_until("Redis TIME to pass the holds' expiry", || async {
        (redis_now_ms(server) > expiry + 1).then_some(())
    })
    .await;
}

/// Retry `check_and_reserve` while Redis is coming back, until Redis itself admits
/// the request. Meanwhile a fail-closed workspace may only be refused as
/// unavailable; a fail-open one only admitted or refused by its local limiter.
async fn reserve_once_redis_is_back(
    engine: &RedisEngine,
    request: &Request<'_>,
    mode: StoreFailureMode,
) -> RedisReservation {
    let open = mode == StoreFailureMode::Open;
    poll_until("Redis to admit a request again", || async {
        match engine.check_and_reserve(request).await {
            Ok(r) if !r.is_local() => Some(r),
            // The local share, still answering while the connection comes back:
            // counted on this instance only.
            Ok(local) if open => {
                engine.commit_usage(local, Usage::new(0, 0)).await.unwrap();
                None
            }
            Err(d) if open && d.reason == DenialReason::RequestsPerMinute => None,
            Err(d)
                if !open
                    && d.reason == DenialReason::StoreUnavailable(StoreErrorKind::Transient) =>
            {
                None
            }
            other => panic!("unexpected answer while Redis comes back ({mode:?}): {other:?}"),
        }
    })
    .await
}

fn assert_store_denial(denial: &Denial, kind: StoreErrorKind) {
    assert_eq!(
        denial.reason,
        DenialReason::StoreUnavailable(kind),
        "{denial:?}"
    );
    assert_eq!(denial.scope, Scope::Workspace, "{denial:?}");
    assert_eq!(denial.http_status(), 503, "{denial:?}");
    assert_eq!(denial.code(), "store_unavailable", "{denial:?}");
}

fn last_error(engine: &RedisEngine) -> StoreError {
    engine
        .last_store_error()
        .expect("the engine recorded the store error")
}

/// One model at $1 per million input and $2 per million output tokens; org "acme"
/// with a monthly budget; workspace `ws` with `limits`, a monthly budget and
/// `mode`; key "k1" in it, with no limits of its own.
fn policy(ws: &str, limits: LimitsSpec, mode: StoreFailureMode) -> Policy {
    let mut org = OrgSpec::new("acme");
    org.budget = Some(BudgetSpec::new(dec("1000"), BudgetPeriod::Month));
    Policy::new(
        PolicyDocument::new(org)
            .model(ModelSpec::new("m", dec("1"), dec("2")))
            .workspace(
                WorkspaceSpec::new(ws, "one")
                    .grant("m")
                    .limits(limits)
                    .budget(BudgetSpec::new(dec("100"), BudgetPeriod::Month))
                    .on_store_error(mode),
            )
            .key(KeySpec::new("k1", ws, "sk-1")),
    )
    .unwrap()
}

fn key_key(ws: &str) -> String {
    format!("tollgate:v2:{{ws:{ws}}}:key:k1")
}

fn ws_holds(ws: &str) -> String {
    format!("tollgate:v2:{{ws:{ws}}}:holds")
}

fn ws_record(ws: &str, id: &str) -> String {
    format!("tollgate:v2:{{ws:{ws}}}:resv:{id}")
}

fn ws_done(ws: &str, id: &str) -> String {
    format!("tollgate:v2:{{ws:{ws}}}:done:{id}")
}

const ORG_HOLDS: &str = "tollgate:v2:{org:acme}:holds";

/// Overwrite a reservation record's level count (bytes 8..16 of the packed record)
/// with bytes that are no count: the record cannot say what it holds.
fn corrupt_record(server: &RedisServer, record: &str) {
    assert_ne!(
        server.cli(&["setrange", record, "8", "garbage!"]),
        "0",
        "{record}"
    );
}

fn org_record(id: &str) -> String {
    format!("tollgate:v2:{{org:acme}}:resv:{id}")
}

/// An instance that crashes mid-request leaves holds nobody will commit or release:
/// once Redis's clock passes the reservation TTL, the next call on the workspace
/// gives every one of them back — money, concurrency slots, token backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_instance_holds_expire_after_ttl() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    // 10,000 tokens a minute (a token every 6 ms of backlog), 3 in flight at once.
    let limits = LimitsSpec {
        rpm: Some(1000),
        tpm: Some(10_000),
        max_concurrent: Some(3),
        ..LimitsSpec::default()
    };
    let policy = || policy("ws1", limits.clone(), StoreFailureMode::Closed);
    let ws = "tollgate:v2:{ws:ws1}:ws";

    // Instance A: short TTL; holds three requests of 2,000 tokens / $0.003 each.
    let a = RedisEngine::connect(
        &server.url(),
        policy(),
        RedisConfig {
            reservation_ttl: Duration::from_millis(300),
            ..RedisConfig::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(a.workspace_key("ws1"), ws);
    let request = Request::with_key_id("k1", "m")
        .input_tokens(1000)
        .max_output_tokens(1000);
    let mut held = Vec::new();
    for _ in 0..3 {
        let r = a.check_and_reserve(&request).await.unwrap();
        assert_eq!(r.reserved_cost(), dec("0.003"));
        held.push(r);
    }
    // The concurrency cap is enforced in Redis: a fourth is refused.
    let denial = a.check_and_reserve(&request).await.unwrap_err();
    assert_eq!(denial.reason, DenialReason::Concurrency, "{denial:?}");

    let ids: Vec<String> = held.iter().map(|r| r.id().unwrap().to_owned()).collect();
    // A crashes: no commit, no release (a dropped reservation would release).
    for r in held {
        std::mem::forget(r);
    }
    drop(a);

    let model_key = "tollgate:v2:{ws:ws1}:model:m".to_owned();
    for key in [ws.to_owned(), key_key("ws1"), model_key.clone()] {
        assert_eq!(money(&server, &key, "held"), dec("0.009"), "{key}");
    }
    assert_eq!(
        money(&server, "tollgate:v2:{org:acme}:org", "held"),
        dec("0.009")
    );
    assert_eq!(hget(&server, ws, "conc"), "3");
    assert_eq!(zcard(&server, &ws_holds("ws1")), 3);
    assert_eq!(zcard(&server, ORG_HOLDS), 3);
    for id in &ids {
        assert!(exists(&server, &ws_record("ws1", id)), "{id}");
        assert!(exists(&server, &org_record(id)), "{id}");
    }
    let backlog: f64 = hget(&server, ws, "tpm").parse().unwrap();
    assert!(
        backlog > 30e9,
        "A's 6,000 tokens are in the TPM backlog: {backlog}"
    );

    wait_for_holds_to_expire(&server).await;

    // Instance B asks for the whole TPM limit (10,000 tokens) and a concurrency slot:
    // admitted only if every one of A's holds was given back.
    let b = RedisEngine::connect(&server.url(), policy(), RedisConfig::default())
        .await
        .unwrap();
    let whole = Request::with_key_id("k1", "m")
        .input_tokens(5000)
        .max_output_tokens(5000);
    let reservation = b
        .check_and_reserve(&whole)
        .await
        .unwrap_or_else(|d| panic!("A's expired holds still count: {d:?}"));
    let b_id = reservation.id().unwrap().to_owned();
    let receipt = b
        .commit_usage(reservation, Usage::new(5000, 1000))
        .await
        .unwrap();
    assert_eq!(receipt.cost(), dec("0.007"));

    for key in [ws.to_owned(), key_key("ws1"), model_key, b.org_key()] {
        assert_eq!(hget(&server, &key, "held"), "0", "{key}");
        assert_eq!(money(&server, &key, "spent"), receipt.cost(), "{key}");
        assert_eq!(money(&server, &key, "used"), receipt.cost(), "{key}");
        assert_eq!(hget(&server, &key, "req"), "1", "{key}");
    }
    assert_eq!(hget(&server, ws, "conc"), "0");
    assert_eq!(zcard(&server, &ws_holds("ws1")), 0);
    assert_eq!(zcard(&server, ORG_HOLDS), 0);
    for id in &ids {
        assert!(!exists(&server, &ws_record("ws1", id)), "{id}");
        assert!(!exists(&server, &org_record(id)), "{id}");
        assert!(
            !exists(&server, &ws_done("ws1", id)),
            "{id} was never committed"
        );
    }
    assert!(!exists(&server, &ws_record("ws1", &b_id)));
    assert!(exists(&server, &ws_done("ws1", &b_id)));
    // The backlog is B's 6,000 used tokens (36e9 ns) less what drained since.
    let backlog: f64 = hget(&server, ws, "tpm").parse().unwrap();
    assert!(
        backlog <= 36e9 && backlog > 36e9 - 10e9,
        "TPM backlog should be B's 6,000 tokens only: {backlog}"
    );
}

/// Rewrite a reservation record (one packed string) as the hash an older tollgate
/// wrote: fields `t`, `c`, `n`, `g`, then `k<i>` and `h<i>` per level.
const TO_LEGACY_RECORD: &str = "\
    local raw = redis.call('GET', KEYS[1]) \
    local t, n, g, cost_length, at = struct.unpack('<dddd', raw) \
    local fields = { 't', string.format('%d', t), 'n', string.format('%d', n), \
      'g', string.format('%d', g), 'c', string.sub(raw, at, at + cost_length - 1) } \
    at = at + cost_length \
    for i = 1, n do \
      local key_length \
      key_length, at = struct.unpack('<d', raw, at) \
      fields[#fields + 1] = 'k' .. i \
      fields[#fields + 1] = string.sub(raw, at, at + key_length - 1) \
      fields[#fields + 1] = 'h' .. i \
      fields[#fields + 1] = string.sub(raw, at + key_length, at + key_length + 127) \
      at = at + key_length + 128 \
    end \
    local ttl = redis.call('PTTL', KEYS[1]) \
    redis.call('DEL', KEYS[1]) \
    redis.call('HSET', KEYS[1], unpack(fields)) \
    redis.call('PEXPIRE', KEYS[1], ttl) \
    return n";

/// Holds taken by an older tollgate, whose reservation records were hashes, are
/// given back exactly when they expire after an upgrade (and a crash): money, slots
/// and token backlog, on every level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_recorded_by_an_older_version_are_given_back() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let limits = LimitsSpec {
        tpm: Some(10_000),
        max_concurrent: Some(1),
        ..LimitsSpec::default()
    };
    let policy = || policy("ws1", limits.clone(), StoreFailureMode::Closed);
    let old = RedisEngine::connect(
        &server.url(),
        policy(),
        RedisConfig {
            reservation_ttl: Duration::from_millis(300),
            ..RedisConfig::default()
        },
    )
    .await
    .unwrap();
    let whole = Request::with_key_id("k1", "m")
        .input_tokens(5000)
        .max_output_tokens(5000);
    let crashed = old.check_and_reserve(&whole).await.unwrap();
    let id = crashed.id().unwrap().to_owned();
    std::mem::forget(crashed);
    drop(old);
    for record in [ws_record("ws1", &id), org_record(&id)] {
        let levels = server.cli(&["eval", TO_LEGACY_RECORD, "1", &record]);
        assert!(levels == "3" || levels == "1", "{record}: {levels}");
        assert_eq!(server.cli(&["type", &record]), "hash");
    }
    let ws = "tollgate:v2:{ws:ws1}:ws";
    assert_eq!(money(&server, ws, "held"), dec("0.015"));
    wait_for_holds_to_expire(&server).await;

    // The whole TPM limit and the one concurrency slot: admitted only if the old hold
    // was read and given back on every level.
    let new = RedisEngine::connect(&server.url(), policy(), RedisConfig::default())
        .await
        .unwrap();
    let reservation = new
        .check_and_reserve(&whole)
        .await
        .unwrap_or_else(|d| panic!("the old record's holds still count: {d:?}"));
    let receipt = new
        .commit_usage(reservation, Usage::new(5000, 0))
        .await
        .unwrap();
    for key in [ws.to_owned(), key_key("ws1"), new.org_key()] {
        assert_eq!(hget(&server, &key, "held"), "0", "{key}");
        assert_eq!(money(&server, &key, "spent"), receipt.cost(), "{key}");
    }
    assert_eq!(hget(&server, ws, "conc"), "0");
    assert!(!exists(&server, &ws_record("ws1", &id)));
    assert!(!exists(&server, &org_record(&id)));
}

/// A fail-closed workspace refuses with 503 while Redis is down and is served
/// again once it is back, without a reconnect by the caller and without charging
/// anything twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_denies_while_redis_is_down_and_recovers() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let mut server = RedisServer::start();
    let limits = LimitsSpec {
        rpm: Some(1000),
        tpm: Some(1_000_000),
        ..LimitsSpec::default()
    };
    let engine = RedisEngine::connect(
        &server.url(),
        policy("ws1", limits, StoreFailureMode::Closed),
        RedisConfig::default(),
    )
    .await
    .unwrap();
    let ws = engine.workspace_key("ws1");
    let request = Request::with_key_id("k1", "m")
        .input_tokens(1000)
        .max_output_tokens(500);
    let r = engine.check_and_reserve(&request).await.unwrap();
    engine.commit_usage(r, Usage::new(1000, 300)).await.unwrap();
    assert_eq!(money(&server, &ws, "spent"), dec("0.0016"));

    server.kill();
    for _ in 0..3 {
        let denial = engine.check_and_reserve(&request).await.unwrap_err();
        assert_store_denial(&denial, StoreErrorKind::Transient);
        let error = last_error(&engine);
        assert!(error.is_transient(), "{error:?}");
        assert_eq!(error.kind, StoreErrorKind::Transient);
    }
    assert_eq!(engine.pending_commits(), 0);

    // Restarted without persistence: the counters start again from nothing.
    server.restart();
    let first = reserve_once_redis_is_back(&engine, &request, StoreFailureMode::Closed).await;
    let mut receipts = vec![engine
        .commit_usage(first, Usage::new(1000, 100))
        .await
        .unwrap()];
    for i in 0..5u32 {
        let r = engine.check_and_reserve(&request).await.unwrap();
        receipts.push(
            engine
                .commit_usage(r, Usage::new(900 + i, 50 * i))
                .await
                .unwrap(),
        );
    }
    assert_eq!(engine.pending_commits(), 0);
    let sum = total(&receipts);
    assert_eq!(
        sum,
        dec("0.0012") + dec("0.0045") + dec("0.00001") + dec("0.001")
    );
    for key in [ws, engine.org_key()] {
        assert_eq!(money(&server, &key, "spent"), sum, "{key}");
        assert_eq!(money(&server, &key, "used"), sum, "{key}");
        assert_eq!(hget(&server, &key, "held"), "0", "{key}");
        assert_eq!(hget(&server, &key, "req"), "6", "{key}");
    }
}

/// A fail-open workspace is admitted by the local limiter while Redis is down, up to
/// this instance's share (limit / expected instances) and no further; once Redis is
/// back, requests go to Redis again and Redis counts only what it admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_admits_within_the_local_share_and_recovers() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let mut server = RedisServer::start();
    let limits = LimitsSpec {
        rpm: Some(40),
        ..LimitsSpec::default()
    };
    let engine = RedisEngine::connect(
        &server.url(),
        policy("ws1", limits, StoreFailureMode::Open),
        RedisConfig {
            expected_instances: NonZeroU32::new(4).unwrap(),
            ..RedisConfig::default()
        },
    )
    .await
    .unwrap();
    let ws = engine.workspace_key("ws1");
    let request = Request::with_key_id("k1", "m")
        .input_tokens(1000)
        .max_output_tokens(500);
    let r = engine.check_and_reserve(&request).await.unwrap();
    assert!(!r.is_local());
    engine.commit_usage(r, Usage::new(1000, 500)).await.unwrap();

    server.kill();
    // 40 rpm over 4 instances: this one admits 10 on its own, not 11.
    let mut local = Vec::new();
    for i in 0..10 {
        let r = engine
            .check_and_reserve(&request)
            .await
            .unwrap_or_else(|d| panic!("local request {i} refused: {d:?}"));
        assert!(r.is_local(), "{r:?}");
        assert_eq!(r.id(), None);
        local.push(r);
    }
    let denial = engine.check_and_reserve(&request).await.unwrap_err();
    assert_eq!(denial.reason, DenialReason::RequestsPerMinute, "{denial:?}");
    assert_eq!(denial.scope, Scope::Workspace, "{denial:?}");
    assert_eq!(denial.http_status(), 429);
    assert!(
        matches!(
            denial.quota,
            Some(Quota::Requests {
                limit: 10,
                remaining: 0,
                ..
            })
        ),
        "{denial:?}"
    );
    assert!(last_error(&engine).is_transient());
    let mut local_receipts = Vec::new();
    for r in local {
        local_receipts.push(engine.commit_usage(r, Usage::new(1000, 200)).await.unwrap());
    }
    assert_eq!(total(&local_receipts), dec("0.014"));
    // Local commits never wait for Redis.
    assert_eq!(engine.pending_commits(), 0);

    server.restart();
    let first = reserve_once_redis_is_back(&engine, &request, StoreFailureMode::Open).await;
    let mut receipts = vec![engine
        .commit_usage(first, Usage::new(1000, 100))
        .await
        .unwrap()];
    for _ in 0..4 {
        let r = engine.check_and_reserve(&request).await.unwrap();
        assert!(!r.is_local(), "{r:?}");
        receipts.push(engine.commit_usage(r, Usage::new(500, 250)).await.unwrap());
    }
    let sum = total(&receipts);
    assert_eq!(sum, dec("0.0012") + dec("0.004"));
    for key in [ws, engine.org_key()] {
        assert_eq!(money(&server, &key, "spent"), sum, "{key}");
        assert_eq!(hget(&server, &key, "held"), "0", "{key}");
        assert_eq!(hget(&server, &key, "req"), "5", "{key}");
    }
}

/// Replays a queued commit until Redis answers (it may still be reconnecting).
async fn flush_once_redis_is_back(engine: &RedisEngine) -> usize {
    poll_until("flush_pending to reach Redis", || async {
        match engine.flush_pending().await {
            Ok(left) => Some(left),
            Err(Error::Store(e)) if e.is_transient() => None,
            Err(e) => panic!("flush_pending: {e:?}"),
        }
    })
    .await
}

/// A commit Redis never acknowledged is queued; once Redis is back (with the hold,
/// from its snapshot), replaying it charges it exactly once, and replaying again
/// charges nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_commit_is_charged_once() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let mut server = RedisServer::start();
    let limits = LimitsSpec {
        rpm: Some(1000),
        tpm: Some(1_000_000),
        max_concurrent: Some(10),
        ..LimitsSpec::default()
    };
    let engine = RedisEngine::connect(
        &server.url(),
        policy("ws1", limits, StoreFailureMode::Closed),
        RedisConfig::default(),
    )
    .await
    .unwrap();
    let ws = engine.workspace_key("ws1");
    let request = Request::with_key_id("k1", "m")
        .input_tokens(1000)
        .max_output_tokens(1000);
    let reservation = engine.check_and_reserve(&request).await.unwrap();
    let id = reservation.id().unwrap().to_owned();
    assert_eq!(money(&server, &ws, "held"), dec("0.003"));
    // Snapshot the hold, so the restarted server has it (`--save ""` only disables
    // automatic snapshots; the server loads `dump.rdb` from its directory at start).
    assert_eq!(server.cli(&["save"]), "OK");

    server.kill();
    // Not an error: the answer can be delivered, the commit is queued.
    let receipt = engine
        .commit_usage(reservation, Usage::new(1000, 200))
        .await
        .unwrap_or_else(|e| panic!("commit with Redis down: {e:?}"));
    assert!(receipt.is_pending(), "{receipt:?}");
    assert_eq!(receipt.cost(), dec("0.0014"));
    assert_eq!(engine.pending_commits(), 1);
    assert!(last_error(&engine).is_transient());

    server.restart();
    assert_eq!(
        money(&server, &ws, "held"),
        dec("0.003"),
        "the snapshot restored the hold"
    );
    assert_eq!(hget(&server, &ws, "conc"), "1");
    assert!(exists(&server, &ws_record("ws1", &id)));

    assert_eq!(flush_once_redis_is_back(&engine).await, 0);
    assert_eq!(engine.pending_commits(), 0);
    let cost = dec("0.0014"); // 1000 in at $1/M + 200 out at $2/M
    let check = |when: &str| {
        for key in [ws.clone(), key_key("ws1"), engine.org_key()] {
            assert_eq!(money(&server, &key, "spent"), cost, "{when}: {key}");
            assert_eq!(money(&server, &key, "used"), cost, "{when}: {key}");
            assert_eq!(hget(&server, &key, "held"), "0", "{when}: {key}");
            assert_eq!(hget(&server, &key, "req"), "1", "{when}: {key}");
        }
        assert_eq!(hget(&server, &ws, "conc"), "0", "{when}");
        assert!(exists(&server, &ws_done("ws1", &id)), "{when}");
        assert!(!exists(&server, &ws_record("ws1", &id)), "{when}");
        assert_eq!(zcard(&server, &ws_holds("ws1")), 0, "{when}");
    };
    check("after the replay");

    // Nothing left to replay: a second flush charges nothing.
    assert_eq!(engine.flush_pending().await.unwrap(), 0);
    check("after a second flush");

    // A later commit charges only itself.
    let r = engine.check_and_reserve(&request).await.unwrap();
    let receipt = engine.commit_usage(r, Usage::new(0, 500)).await.unwrap();
    assert_eq!(money(&server, &ws, "spent"), cost + receipt.cost());
}

/// A commit that reached Redis but whose reply came too late is reported as a
/// transient failure and queued; the commit itself lands when Redis gets to it.
/// Replaying it must then charge nothing: commits are idempotent by reservation id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_commit_that_landed_is_charged_once() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let limits = LimitsSpec {
        rpm: Some(1000),
        tpm: Some(1_000_000),
        ..LimitsSpec::default()
    };
    let engine = RedisEngine::connect(
        &server.url(),
        policy("ws1", limits, StoreFailureMode::Closed),
        RedisConfig {
            response_timeout: Duration::from_millis(100),
            ..RedisConfig::default()
        },
    )
    .await
    .unwrap();
    let ws = engine.workspace_key("ws1");
    let request = Request::with_key_id("k1", "m")
        .input_tokens(1000)
        .max_output_tokens(1000);
    // Warm up: the functions are loaded, so the delayed commit below is one FCALL
    // that runs as soon as the pause ends (not a NOSCRIPT answered too late).
    let r = engine.check_and_reserve(&request).await.unwrap();
    let warm = engine.commit_usage(r, Usage::new(1000, 0)).await.unwrap();
    assert_eq!(money(&server, &ws, "spent"), warm.cost());

    let reservation = engine.check_and_reserve(&request).await.unwrap();
    let id = reservation.id().unwrap().to_owned();
    // Scripts that write are held for 800 ms; the engine gives up after 100 ms.
    assert_eq!(server.cli(&["client", "pause", "800", "write"]), "OK");
    let started = Instant::now();
    let receipt = engine
        .commit_usage(reservation, Usage::new(1000, 200))
        .await
        .unwrap_or_else(|e| panic!("commit during CLIENT PAUSE: {e:?}"));
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "the commit should give up before the pause ends (took {:?})",
        started.elapsed()
    );
    assert!(receipt.is_pending(), "{receipt:?}");
    assert!(last_error(&engine).is_transient());
    assert_eq!(engine.pending_commits(), 1);

    // The commit lands once the pause ends, although the engine stopped waiting.
    let cost = dec("0.0014");
    poll_until("the timed-out commit to land", || async {
        exists(&server, &ws_done("ws1", &id)).then_some(())
    })
    .await;
    assert_eq!(money(&server, &ws, "spent"), warm.cost() + cost);

    // Replaying it finds the commit marker and charges nothing.
    assert_eq!(flush_once_redis_is_back(&engine).await, 0);
    assert_eq!(engine.pending_commits(), 0);
    for key in [ws.clone(), key_key("ws1"), engine.org_key()] {
        assert_eq!(money(&server, &key, "spent"), warm.cost() + cost, "{key}");
        assert_eq!(money(&server, &key, "used"), warm.cost() + cost, "{key}");
        assert_eq!(hget(&server, &key, "held"), "0", "{key}");
        assert_eq!(hget(&server, &key, "req"), "2", "{key}");
    }
}

/// Counters holding what tollgate never writes are typed store errors: the request
/// is refused with 503 (even on a fail-open workspace: bad data is not an outage),
/// a commit fails with `Error::Store`, and nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_counters_are_typed_errors_not_panics() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let limits = LimitsSpec {
        rpm: Some(1000),
        tpm: Some(1_000_000),
        max_concurrent: Some(10),
        ..LimitsSpec::default()
    };
    let engine = RedisEngine::connect(
        &server.url(),
        policy("ws1", limits, StoreFailureMode::Open),
        RedisConfig::default(),
    )
    .await
    .unwrap();
    let ws = engine.workspace_key("ws1");
    let org = engine.org_key();
    let request = Request::with_key_id("k1", "m")
        .input_tokens(1000)
        .max_output_tokens(1000);
    let r = engine.check_and_reserve(&request).await.unwrap();
    let receipt = engine
        .commit_usage(r, Usage::new(1000, 1000))
        .await
        .unwrap();
    let spent = hget(&server, &ws, "spent");

    // (a) A money field that is not a number.
    server.cli(&["hset", &ws, "used", "notanumber"]);
    let denial = engine.check_and_reserve(&request).await.unwrap_err();
    assert_store_denial(&denial, StoreErrorKind::Corrupt);
    let error = last_error(&engine);
    assert_eq!(error.kind, StoreErrorKind::Corrupt, "{error:?}");
    assert!(!error.is_transient());
    assert!(error.message.contains(&ws), "names the key: {error:?}");
    assert!(error.message.contains("used"), "names the field: {error:?}");
    assert!(error.message.contains("notanumber"), "{error:?}");
    // The org's half of the reservation was given back; nothing else was taken.
    assert_eq!(hget(&server, &org, "held"), "0");
    assert_eq!(money(&server, &org, "used"), receipt.cost());
    assert_eq!(hget(&server, &ws, "held"), "0");
    assert_eq!(hget(&server, &ws, "conc"), "0");
    assert_eq!(zcard(&server, &ws_holds("ws1")), 0);
    assert_eq!(zcard(&server, ORG_HOLDS), 0);
    // Repaired, the workspace is served again.
    server.cli(&["hset", &ws, "used", &spent]);
    let r = engine.check_and_reserve(&request).await.unwrap();
    assert!(!r.is_local());
    engine.commit_usage(r, Usage::new(0, 0)).await.unwrap();

    // (a2) The packed numbers cut short (or overwritten by something else): corrupt,
    // named, and nothing taken.
    let packed = server.cli(&["hget", &ws, "rules"]); // any string that is not 192 bytes
    server.cli(&["hset", &ws, "n", &packed]);
    let denial = engine.check_and_reserve(&request).await.unwrap_err();
    assert_store_denial(&denial, StoreErrorKind::Corrupt);
    let error = last_error(&engine);
    assert!(error.message.contains(&ws), "names the key: {error:?}");
    assert!(error.message.contains(" n="), "names the field: {error:?}");
    assert_eq!(hget(&server, &org, "held"), "0");
    assert_eq!(zcard(&server, &ws_holds("ws1")), 0);
    server.cli(&["del", &ws]);

    // (b) The workspace's hash replaced by a string: Redis refuses the operation
    // (WRONGTYPE); retrying cannot help, and the fail-open workspace is not
    // admitted unmetered.
    server.cli(&["del", &ws]);
    server.cli(&["set", &ws, "x"]);
    let denial = engine.check_and_reserve(&request).await.unwrap_err();
    assert_store_denial(&denial, StoreErrorKind::Permanent);
    let error = last_error(&engine);
    assert_eq!(error.kind, StoreErrorKind::Permanent, "{error:?}");
    assert!(!error.is_transient());
    assert!(error.message.contains("WRONGTYPE"), "{error:?}");
    assert_eq!(hget(&server, &org, "held"), "0");
    server.cli(&["del", &ws]);

    // (c) A reservation record corrupted between reserve and commit.
    let reservation = engine.check_and_reserve(&request).await.unwrap();
    let id = reservation.id().unwrap().to_owned();
    let record = ws_record("ws1", &id);
    corrupt_record(&server, &record);
    let error = match engine
        .commit_usage(reservation, Usage::new(1000, 1000))
        .await
    {
        Err(Error::Store(e)) => e,
        other => panic!("commit of a corrupted record: {other:?}"),
    };
    assert_eq!(error.kind, StoreErrorKind::Corrupt, "{error:?}");
    assert!(
        error.message.contains(&record),
        "names the record: {error:?}"
    );
    assert!(
        error.message.contains("record="),
        "names the field: {error:?}"
    );
    assert_eq!(last_error(&engine).kind, StoreErrorKind::Corrupt);
}

/// Overwrite the first number of a record's first hold (its concurrency slot) with a
/// NaN, leaving the record's shape intact.
const NAN_IN_HOLD: &str = "\
    local raw = redis.call('GET', KEYS[1]) \
    local t, n, g, cost_length, at = struct.unpack('<dddd', raw) \
    local key_length \
    key_length, at = struct.unpack('<d', raw, at + cost_length) \
    return redis.call('SETRANGE', KEYS[1], at + key_length - 1, struct.pack('<d', 0/0))";

/// A hold whose numbers are not numbers (a NaN in a record) is corrupt: the commit
/// fails naming the record and the level, before anything is settled; it does not
/// wipe a bucket's backlog or write a NaN into a counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_that_is_not_a_number_is_corrupt() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let limits = LimitsSpec {
        tpm: Some(1_000_000),
        ..LimitsSpec::default()
    };
    let engine = connect_closed(&server, limits).await;
    let request = Request::with_key_id("k1", "m")
        .input_tokens(1000)
        .max_output_tokens(1000);
    let reservation = engine.check_and_reserve(&request).await.unwrap();
    let record = ws_record("ws1", reservation.id().unwrap());
    server.cli(&["eval", NAN_IN_HOLD, "1", &record]);
    let before = books(&server);
    match engine
        .commit_usage(reservation, Usage::new(1000, 1000))
        .await
    {
        Err(Error::Store(e)) => {
            assert_eq!(e.kind, StoreErrorKind::Corrupt, "{e:?}");
            assert!(e.message.contains(&record), "names the record: {e:?}");
            assert!(e.message.contains("h1="), "names the level: {e:?}");
        }
        other => panic!("commit of a record holding a NaN: {other:?}"),
    }
    assert_eq!(books(&server), before, "a corrupt commit settled something");
}

/// Every counter field a script changes, per level of workspace "ws1" and the org.
fn books(server: &RedisServer) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for key in [
        key_key("ws1"),
        "tollgate:v2:{ws:ws1}:ws".to_owned(),
        "tollgate:v2:{ws:ws1}:model:m".to_owned(),
        "tollgate:v2:{org:acme}:org".to_owned(),
    ] {
        for field in ["spent", "held", "used", "req", "in", "out", "conc"] {
            out.push((key.clone(), field.to_owned(), hget(server, &key, field)));
        }
    }
    out
}

/// A commit Redis refused (here: a corrupted reservation record) is reported as
/// `Error::Store`. If it is queued for replay, replaying it must not apply again
/// whatever part of it Redis already applied: "retrying one charges once".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_failed_commit_does_not_charge_again() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let limits = LimitsSpec {
        tpm: Some(1_000_000),
        max_concurrent: Some(10),
        ..LimitsSpec::default()
    };
    let engine = connect_closed(&server, limits).await;
    let request = Request::with_key_id("k1", "m")
        .input_tokens(1000)
        .max_output_tokens(1000);
    let reservation = engine.check_and_reserve(&request).await.unwrap();
    let id = reservation.id().unwrap().to_owned();
    // Corrupt the org's record. On a standalone server one call commits both tags and
    // reads both before settling either: the workspace's tag is left as it was, its
    // hold still held (a cluster settles it in its own call).
    corrupt_record(&server, &org_record(&id));
    let before_commit = books(&server);
    match engine
        .commit_usage(reservation, Usage::new(1000, 1000))
        .await
    {
        Err(Error::Store(e)) => assert!(!e.is_transient(), "{e:?}"),
        other => panic!("commit of a corrupted record: {other:?}"),
    }
    let after_commit = books(&server);
    assert_eq!(after_commit, before_commit, "a failed commit settled a tag");
    assert!(
        exists(&server, &ws_record("ws1", &id)),
        "the workspace's hold"
    );

    for _ in 0..2 {
        // Fails again or is dropped; either way it must not charge anything again.
        let _ = engine.flush_pending().await;
        assert_eq!(
            books(&server),
            after_commit,
            "a replay of the failed commit changed the counters"
        );
    }
}

/// A reservation record corrupted and then expired: the purge that every call on
/// the workspace runs cannot release it. Failing is fine; giving the levels it did
/// reach back again on every call (driving `held` and `used` below zero, i.e. budget
/// headroom out of nothing) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_expired_record_is_not_refunded_again_on_every_call() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    let connect = || {
        RedisEngine::connect(
            &url,
            policy("ws1", LimitsSpec::default(), StoreFailureMode::Closed),
            RedisConfig {
                reservation_ttl: Duration::from_millis(200),
                ..RedisConfig::default()
            },
        )
    };
    let request = Request::with_key_id("k1", "m")
        .input_tokens(1000)
        .max_output_tokens(1000);
    // Its instance crashed: no commit, no release, and no renewal once its engine is
    // gone.
    let crashing = connect().await.unwrap();
    let crashed = crashing.check_and_reserve(&request).await.unwrap();
    let id = crashed.id().unwrap().to_owned();
    std::mem::forget(crashed);
    drop(crashing);
    let engine = connect().await.unwrap();
    corrupt_record(&server, &ws_record("ws1", &id));
    let expiry = latest_expiry_ms(&server, &ws_holds("ws1"));
    poll_until("Redis TIME to pass the hold's expiry", || async {
        (redis_now_ms(&server) > expiry + 1).then_some(())
    })
    .await;

    for attempt in 0..3 {
        if let Ok(r) = engine.check_and_reserve(&request).await {
            engine.commit_usage(r, Usage::new(0, 0)).await.unwrap();
        }
        for (key, field, value) in books(&server) {
            if matches!(field.as_str(), "held" | "used" | "conc") && !value.is_empty() {
                let n: i64 = value.parse().unwrap();
                assert!(
                    n >= 0,
                    "attempt {attempt}: {key} {field} = {n}: the crashed hold was given back more than once"
                );
            }
        }
    }
}

/// A commit that can never succeed (Redis refuses it on its merits) must not keep
/// the commits queued after it from being replayed: their spend would be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_cannot_succeed_does_not_block_the_queue() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let mut server = RedisServer::start();
    let engine = RedisEngine::connect(
        &server.url(),
        policy("ws1", LimitsSpec::default(), StoreFailureMode::Closed),
        RedisConfig::default(),
    )
    .await
    .unwrap();
    let request = Request::with_key_id("k1", "m")
        .input_tokens(1000)
        .max_output_tokens(1000);
    let bad = engine.check_and_reserve(&request).await.unwrap();
    let good = engine.check_and_reserve(&request).await.unwrap();
    let good_id = good.id().unwrap().to_owned();

    // The first commit meets a corrupted record (on the first level, so nothing of
    // it is applied in the workspace group).
    corrupt_record(&server, &ws_record("ws1", bad.id().unwrap()));
    match engine.commit_usage(bad, Usage::new(1000, 1000)).await {
        Err(Error::Store(e)) => assert_eq!(e.kind, StoreErrorKind::Corrupt, "{e:?}"),
        other => panic!("commit of a corrupted record: {other:?}"),
    }

    // The second fails transiently: Redis is down (it comes back from a snapshot
    // that still has the hold).
    assert_eq!(server.cli(&["save"]), "OK");
    server.kill();
    match engine.commit_usage(good, Usage::new(1000, 500)).await {
        Ok(receipt) => assert!(receipt.is_pending(), "{receipt:?}"),
        other => panic!("commit with Redis down: {other:?}"),
    }
    server.restart();
    assert!(exists(&server, &ws_record("ws1", &good_id)));

    // Replay until Redis answers (a non-transient answer included), then once more.
    let first = poll_until("flush_pending to reach Redis", || async {
        match engine.flush_pending().await {
            Err(Error::Store(e)) if e.is_transient() => None,
            answered => Some(answered),
        }
    })
    .await;
    let second = engine.flush_pending().await;
    assert!(
        exists(&server, &ws_done("ws1", &good_id)),
        "the transiently failed commit was never replayed: flush_pending answered {first:?}, \
         then {second:?}; {} commits still queued",
        engine.pending_commits()
    );
    assert_eq!(
        money(&server, &engine.workspace_key("ws1"), "spent"),
        dec("0.002")
    );
}
