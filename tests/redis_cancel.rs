//! Redis backend under cancellation, lost replies, restarts and killed instances: what
//! an abandoned call leaves held, what a live stream keeps, what a crash costs.
//!
//! Run with `cargo test --features redis --test redis_cancel`. Needs `redis-server`
//! and `redis-cli` (see `support/redis_server.rs`); `TOLLGATE_SKIP_REDIS=1` skips.
//!
//! Waits poll Redis against deadlines. Two tests hold a reservation for a few
//! one-second TTLs on purpose (that is what they test); the rest never wait out a TTL:
//! their TTL is a minute, and they must be done well within it.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis_server::{require_redis, RedisServer};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use tollgate::{
    BudgetPeriod, BudgetSpec, DenialReason, KeySpec, LeaseConfig, LimitsSpec, ModelSpec, OrgSpec,
    Policy, PolicyDocument, RedisConfig, RedisEngine, Request, StoreErrorKind, StoreFailureMode,
    Usage, WorkspaceSpec,
};

/// Pause between two polls of a wait.
const POLL: Duration = Duration::from_millis(10);
/// A TTL no test may wait out: holds must come back long before it.
const LONG_TTL: Duration = Duration::from_secs(60);

const WS: &str = "tollgate:v2:{ws:ws1}:ws";
const KEY: &str = "tollgate:v2:{ws:ws1}:key:k1";
const MODEL: &str = "tollgate:v2:{ws:ws1}:model:m";
const ORG: &str = "tollgate:v2:{org:acme}:org";
const WS_HOLDS: &str = "tollgate:v2:{ws:ws1}:holds";
const ORG_HOLDS: &str = "tollgate:v2:{org:acme}:holds";
/// Every scope hash a request of key k1 for model m touches.
const SCOPES: [&str; 4] = [KEY, WS, MODEL, ORG];

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Money as Redis stores it (pico-dollars), from USD.
fn picos(usd: Decimal) -> i64 {
    let scaled = usd * Decimal::from(1_000_000_000_000_i64);
    assert!(scaled.fract().is_zero(), "{usd} is not whole pico-dollars");
    scaled.to_i64().unwrap()
}

/// An integer field of a hash; absent is 0.
fn int(server: &RedisServer, key: &str, field: &str) -> i64 {
    let raw = server.cli(&["hget", key, field]);
    if raw.is_empty() {
        return 0;
    }
    raw.parse()
        .unwrap_or_else(|e| panic!("{key} {field} = {raw:?}: {e}"))
}

fn zcard(server: &RedisServer, key: &str) -> u64 {
    server.cli(&["zcard", key]).parse().unwrap()
}

/// Every reservation record left, on any tag.
fn records(server: &RedisServer) -> Vec<String> {
    server
        .cli(&["keys", "tollgate:v2:*:resv:*"])
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

fn hold_ids(server: &RedisServer, holds: &str) -> Vec<String> {
    server
        .cli(&["zrange", holds, "0", "-1"])
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

/// What is still held in Redis, empty when nothing is: hold entries, records, and
/// `held` and `conc` of every scope.
fn leftovers(server: &RedisServer) -> Vec<String> {
    let mut left = Vec::new();
    for holds in [WS_HOLDS, ORG_HOLDS] {
        let n = zcard(server, holds);
        if n != 0 {
            left.push(format!("{holds}: {n} holds"));
        }
    }
    let records = records(server);
    if !records.is_empty() {
        left.push(format!("{} records, e.g. {}", records.len(), records[0]));
    }
    for scope in SCOPES {
        for field in ["held", "conc"] {
            let n = int(server, scope, field);
            if n != 0 {
                left.push(format!("{scope} {field} = {n}"));
            }
        }
    }
    left
}

/// Poll `probe` until it yields a value, panicking with `what` after `deadline`.
async fn poll_until<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// One model at $1 per million input and $2 per million output tokens; org "acme"
/// with `org_budget` a month; workspace "ws1" with `limits` and `ws_budget` a month,
/// failing closed; key "k1" in it.
fn policy(limits: LimitsSpec, ws_budget: &str, org_budget: &str) -> Policy {
    let mut org = OrgSpec::new("acme");
    org.budget = Some(BudgetSpec::new(dec(org_budget), BudgetPeriod::Month));
    Policy::new(
        PolicyDocument::new(org)
            .model(ModelSpec::new("m", dec("1"), dec("2")))
            .workspace(
                WorkspaceSpec::new("ws1", "one")
                    .grant("m")
                    .limits(limits)
                    .budget(BudgetSpec::new(dec(ws_budget), BudgetPeriod::Month))
                    .on_store_error(StoreFailureMode::Closed),
            )
            .key(KeySpec::new("k1", "ws1", "sk-1")),
    )
    .unwrap()
}

/// What a usage costs under [`policy`], in pico-dollars.
fn cost(input: u32, output: u32) -> i64 {
    i64::from(input) * 1_000_000 + i64::from(output) * 2_000_000
}

async fn connect(server: &RedisServer, policy: Policy, ttl: Duration) -> RedisEngine {
    RedisEngine::connect(
        &server.url(),
        policy,
        RedisConfig {
            reservation_ttl: ttl,
            ..RedisConfig::default()
        },
    )
    .await
    .unwrap()
}

fn request(input: u32, max_output: u32) -> Request<'static> {
    Request::with_key_id("k1", "m")
        .input_tokens(input)
        .max_output_tokens(max_output)
}

/// What the storm of abandoned calls did, by the test's own count.
#[derive(Default)]
struct Tally {
    /// Reserve futures dropped before they completed.
    reserves_dropped: u64,
    /// Commit futures dropped before they completed (or before they were polled).
    commits_dropped: u64,
    /// Futures dropped while a `CLIENT PAUSE` was on (so their calls were in flight).
    dropped_while_paused: u64,
    /// Every commit sent: each must be charged exactly once.
    commits: u64,
    charged: i64,
    /// Commits awaited to the end; those whose receipt was pending.
    awaited: u64,
    pending: u64,
    /// Reserves refused while Redis was paused past the response timeout.
    unavailable: u64,
    /// Reservation ids seen, and how many admissions had one seen before (admitted
    /// from a lease that had admitted another).
    ids: std::collections::HashSet<String>,
    from_leases: u64,
}

impl Tally {
    fn dropped(&self) -> u64 {
        self.reserves_dropped + self.commits_dropped
    }

    /// 1,000 futures dropped, at least 300 of each kind; with leasing at least 30
    /// reserves (most are admitted from a lease without waiting on anything, so no
    /// timeout can interrupt them: only those that reserve a lease or go alone can be).
    fn enough(&self, leasing: bool) -> bool {
        let reserves = if leasing { 30 } else { 300 };
        self.dropped() >= 1_000 && self.reserves_dropped >= reserves && self.commits_dropped >= 300
    }
}

/// 1,000 reserve and commit futures dropped at random points, on a multi-thread
/// runtime, with Redis paused (`CLIENT PAUSE`) at random moments so calls are in flight
/// when dropped, some past the response timeout. Afterwards, within a second (the
/// reservation TTL is a minute): no hold, no record, nothing held, no concurrency slot
/// taken, and exactly the commits that were sent charged, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_reserves_and_commits_leave_nothing_held() {
    storm(false).await;
}

/// The same storm with quota leasing (`RedisConfig::lease`; no concurrency limit, which
/// is never leased): lease reserves dropped while in flight, leased requests dropped
/// and committed, lease settles lost to pauses and replayed. Once the leases are
/// closed, within a second: nothing held, and every commit sent charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_leased_reserves_and_commits_leave_nothing_held() {
    storm(true).await;
}

async fn storm(leasing: bool) {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = Arc::new(RedisServer::start());
    let limits = LimitsSpec {
        rpm: Some(1_000_000),
        tpm: Some(100_000_000),
        max_concurrent: (!leasing).then_some(100_000),
        ..LimitsSpec::default()
    };
    let engine = RedisEngine::connect(
        &server.url(),
        policy(limits, "1000", "1000"),
        RedisConfig {
            reservation_ttl: LONG_TTL,
            lease: leasing.then(LeaseConfig::default),
            ..RedisConfig::default()
        },
    )
    .await
    .unwrap();
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");

    // Pause Redis's writes (scripts) now and then: 50–300 ms, one in eight 700 ms
    // (past the 500 ms response timeout: replies lost, calls landed later).
    let storm = Arc::new(AtomicBool::new(true));
    let paused = Arc::new(AtomicBool::new(false));
    let pauses = Arc::new(AtomicU64::new(0));
    let pauser = {
        let (server, storm, paused, pauses) = (
            Arc::clone(&server),
            Arc::clone(&storm),
            Arc::clone(&paused),
            Arc::clone(&pauses),
        );
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9);
            while storm.load(Ordering::SeqCst) {
                let ms: u64 = if rng.random_ratio(1, 8) {
                    700
                } else {
                    rng.random_range(50..300)
                };
                assert_eq!(
                    server.cli(&["client", "pause", &ms.to_string(), "write"]),
                    "OK"
                );
                pauses.fetch_add(1, Ordering::SeqCst);
                paused.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(ms));
                paused.store(false, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(rng.random_range(0..100)));
            }
        })
    };

    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let (engine, tally, paused, pauses) = (
            engine.clone(),
            Arc::clone(&tally),
            Arc::clone(&paused),
            Arc::clone(&pauses),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(t));
            // Bounded, whatever happens: the storm ends once enough was dropped, over
            // several pauses.
            for _ in 0..20_000 {
                if tally.lock().unwrap().enough(leasing) && pauses.load(Ordering::SeqCst) >= 5 {
                    return;
                }
                let input = rng.random_range(1..2_000u32);
                let max_output = rng.random_range(1..2_000u32);
                let ask = request(input, max_output);
                // Half the reserves get a tiny deadline, the rest see their answer.
                let deadline = if rng.random_bool(0.5) {
                    Duration::from_micros(rng.random_range(0..3_000))
                } else {
                    Duration::from_secs(5)
                };
                let reservation =
                    match tokio::time::timeout(deadline, engine.check_and_reserve(&ask)).await {
                        Err(_) => {
                            let mut tally = tally.lock().unwrap();
                            tally.reserves_dropped += 1;
                            tally.dropped_while_paused += u64::from(paused.load(Ordering::SeqCst));
                            continue;
                        }
                        Ok(Err(denial)) => {
                            // Only a pause past the response timeout may refuse.
                            assert_eq!(
                                denial.reason,
                                DenialReason::StoreUnavailable(StoreErrorKind::Transient),
                                "{denial:?}"
                            );
                            tally.lock().unwrap().unavailable += 1;
                            continue;
                        }
                        Ok(Ok(reservation)) => reservation,
                    };
                assert!(!reservation.is_local());
                {
                    let mut tally = tally.lock().unwrap();
                    let id = reservation.id().unwrap().to_owned();
                    tally.from_leases += u64::from(!tally.ids.insert(id));
                }
                if rng.random_ratio(1, 8) {
                    drop(reservation); // the upstream failed: released
                    continue;
                }
                let output = rng.random_range(0..=max_output);
                let expected = cost(input, output);
                let commit = engine.commit_usage(reservation, Usage::new(input, output));
                {
                    let mut tally = tally.lock().unwrap();
                    tally.commits += 1;
                    tally.charged += expected;
                }
                let how = rng.random_range(0..4);
                if how == 0 {
                    // Dropped before it was ever polled.
                    drop(commit);
                    tally.lock().unwrap().commits_dropped += 1;
                    continue;
                }
                let deadline = if how == 1 {
                    Duration::from_secs(5)
                } else {
                    Duration::from_micros(rng.random_range(0..3_000))
                };
                match tokio::time::timeout(deadline, commit).await {
                    Err(_) => {
                        let mut tally = tally.lock().unwrap();
                        tally.commits_dropped += 1;
                        tally.dropped_while_paused += u64::from(paused.load(Ordering::SeqCst));
                    }
                    Ok(Ok(receipt)) => {
                        assert_eq!(
                            picos(receipt.cost()),
                            expected,
                            "{receipt:?} for {input} in, {output} out"
                        );
                        let mut tally = tally.lock().unwrap();
                        tally.awaited += 1;
                        tally.pending += u64::from(receipt.is_pending());
                    }
                    Ok(Err(error)) => panic!("commit failed: {error:?}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    storm.store(false, Ordering::SeqCst);
    tokio::task::spawn_blocking(move || pauser.join().unwrap())
        .await
        .unwrap();
    assert_eq!(server.cli(&["client", "unpause"]), "OK");
    let storm_took = started.elapsed();

    // Within a second: leases closed and settled (as a gateway's shutdown would),
    // commits queued by lost replies replayed (the queue is flushed as a gateway's next
    // commit would), releases acknowledged, nothing held.
    let settled = Instant::now();
    engine.close_leases().await;
    poll_until(
        "every hold released and every commit charged",
        Duration::from_secs(1),
        || async {
            if engine.pending_commits() != 0 {
                let _ = engine.flush_pending().await;
            }
            (engine.pending_commits() == 0 && leftovers(&server).is_empty()).then_some(())
        },
    )
    .await;
    let settle_took = settled.elapsed();

    let tally = tally.lock().unwrap();
    eprintln!(
        "{} reserves and {} commits dropped ({} while paused), {} commits sent ({} awaited, \
         {} pending), {} refused as unavailable, {} pauses, {} admitted from leases; storm \
         {storm_took:?}, settled in {settle_took:?}",
        tally.reserves_dropped,
        tally.commits_dropped,
        tally.dropped_while_paused,
        tally.commits,
        tally.awaited,
        tally.pending,
        tally.unavailable,
        pauses.load(Ordering::SeqCst),
        tally.from_leases
    );
    assert!(tally.enough(leasing), "not enough dropped");
    assert!(tally.dropped_while_paused > 0, "nothing dropped in flight");
    if leasing {
        assert!(tally.from_leases > 0, "no request admitted from a lease");
    } else {
        assert_eq!(tally.from_leases, 0, "a reservation id used twice");
    }
    // Every commit sent was charged, once: the awaited ones, the ones dropped before
    // they were polled, the ones dropped in flight, the ones whose reply was lost.
    for scope in [KEY, WS, MODEL, ORG] {
        assert_eq!(int(&server, scope, "spent"), tally.charged, "{scope} spent");
        assert_eq!(int(&server, scope, "used"), tally.charged, "{scope} used");
        assert_eq!(
            int(&server, scope, "req"),
            i64::try_from(tally.commits).unwrap(),
            "{scope} requests"
        );
    }
    assert_eq!(engine.failed_commits(), 0);
    assert_eq!(engine.dropped_commits(), 0);
    assert_eq!(engine.releases_in_flight(), 0);
}

/// A reservation dropped while Redis is down: its release is retried until Redis is
/// back (restarted from its snapshot, with the hold), and lands long before the
/// reservation TTL. Another instance's reservation, abandoned without a release
/// (crashed), shows the snapshot did bring the holds back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_retried_across_a_redis_restart() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let mut server = RedisServer::start();
    let limits = LimitsSpec {
        max_concurrent: Some(10),
        ..LimitsSpec::default()
    };
    let ask = request(1_000, 1_000); // $0.003
    let crashed = connect(&server, policy(limits.clone(), "100", "1000"), LONG_TTL).await;
    let lost = crashed.check_and_reserve(&ask).await.unwrap();
    let lost_id = lost.id().unwrap().to_owned();
    std::mem::forget(lost);
    drop(crashed);

    let engine = connect(&server, policy(limits, "100", "1000"), LONG_TTL).await;
    let reservation = engine.check_and_reserve(&ask).await.unwrap();
    let id = reservation.id().unwrap().to_owned();
    assert_eq!(int(&server, WS, "held"), 2 * picos(dec("0.003")));
    assert_eq!(int(&server, WS, "conc"), 2);
    assert_eq!(server.cli(&["save"]), "OK");

    server.kill();
    drop(reservation);
    // Both groups' releases fail (connection refused) and are retried.
    poll_until(
        "the releases to be retried",
        Duration::from_secs(5),
        || async { (engine.releases_in_flight() == 2).then_some(()) },
    )
    .await;

    server.restart();
    let restarted = Instant::now();
    poll_until(
        "the release to land after the restart",
        Duration::from_secs(5),
        || async {
            (engine.releases_in_flight() == 0 && !hold_ids(&server, WS_HOLDS).contains(&id))
                .then_some(())
        },
    )
    .await;
    let took = restarted.elapsed();
    assert!(took < LONG_TTL / 4, "released after {took:?}");
    eprintln!("released {took:?} after the restart");
    // Only the crashed instance's hold is left, on both tags (it expires after its TTL).
    for holds in [WS_HOLDS, ORG_HOLDS] {
        assert_eq!(hold_ids(&server, holds), vec![lost_id.clone()], "{holds}");
    }
    assert_eq!(records(&server).len(), 2, "{:?}", records(&server));
    for scope in SCOPES {
        assert_eq!(int(&server, scope, "held"), picos(dec("0.003")), "{scope}");
    }
    assert_eq!(int(&server, WS, "conc"), 1);
    assert_eq!(int(&server, WS, "spent"), 0);
}

/// A workspace budget of $0.01 and a stream holding $0.006 (1,000 tokens in, up to
/// 2,500 out): a second request for $0.006 must be refused while the stream lives.
fn stream_policy() -> Policy {
    policy(LimitsSpec::default(), "0.01", "1000")
}

fn stream_request() -> Request<'static> {
    request(1_000, 2_500)
}

/// While the stream `id` lives, for `how_long`: its hold is in both holds zsets with an
/// expiry still ahead of Redis's clock, and `other` (another instance) is refused for
/// the budget the stream holds.
async fn assert_held_for(server: &RedisServer, other: &RedisEngine, id: &str, how_long: Duration) {
    let until = Instant::now() + how_long;
    let mut checks = 0;
    while Instant::now() < until {
        let denial = other
            .check_and_reserve(&stream_request())
            .await
            .expect_err("admitted while the stream holds the budget");
        assert_eq!(denial.reason, DenialReason::Budget, "{denial:?}");
        for holds in [WS_HOLDS, ORG_HOLDS] {
            let score = server.cli(&["zscore", holds, id]);
            assert!(!score.is_empty(), "the stream's hold left {holds}");
            let expiry: f64 = score.parse().unwrap();
            assert!(
                expiry > server.time_ms(),
                "the stream's hold in {holds} has expired"
            );
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Several looks across the whole span; each spawns `redis-cli` four times, which a
    // loaded machine makes slow, so the count is a floor, not the ideal twenty.
    assert!(checks >= 3, "only {checks} checks in {how_long:?}");
}

/// A stream held for three reservation TTLs (1 s) keeps its hold, renewed in the
/// background: a competing request from another instance is refused for budget all
/// along. Its commit then settles the hold exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_held_for_three_ttls_keeps_its_hold() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let ttl = Duration::from_secs(1);
    let engine = connect(&server, stream_policy(), ttl).await;
    let other = connect(&server, stream_policy(), ttl).await;
    let stream = engine.check_and_reserve(&stream_request()).await.unwrap();
    let id = stream.id().unwrap().to_owned();
    assert_eq!(int(&server, WS, "held"), picos(dec("0.006")));

    assert_held_for(&server, &other, &id, 3 * ttl + ttl / 5).await;

    let receipt = engine
        .commit_usage(stream, Usage::new(1_000, 1_200))
        .await
        .unwrap();
    assert!(!receipt.is_pending());
    assert_eq!(receipt.cost(), dec("0.0034"));
    for scope in SCOPES {
        assert_eq!(
            int(&server, scope, "spent"),
            picos(dec("0.0034")),
            "{scope}"
        );
        assert_eq!(int(&server, scope, "used"), picos(dec("0.0034")), "{scope}");
        assert_eq!(int(&server, scope, "req"), 1, "{scope}");
    }
    assert_eq!(leftovers(&server), Vec::<String>::new());
    // The budget's rest is free again: $0.0034 spent + $0.006 held fits in $0.01.
    let r = other.check_and_reserve(&stream_request()).await.unwrap();
    drop(r);
}

/// A reservation whose hold expired anyway (its renewals could not reach Redis for a
/// TTL: here its expiry is set in the past by hand, and another instance's call gives
/// it back) is not renewed back to life, and its commit still charges the usage in
/// full, as debt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_whose_hold_expired_still_commits() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    // Renewed every second, checked every half second: none before the purge below.
    let ttl = Duration::from_secs(3);
    let engine = connect(&server, stream_policy(), ttl).await;
    let other = connect(&server, stream_policy(), ttl).await;
    let stream = engine.check_and_reserve(&stream_request()).await.unwrap();
    let reserved = Instant::now();
    let id = stream.id().unwrap().to_owned();
    for holds in [WS_HOLDS, ORG_HOLDS] {
        assert_eq!(server.cli(&["zadd", holds, "xx", "ch", "0", &id]), "1");
        // Calls sweep a tag's holds only from its `sweep` time (the earliest expiry
        // they know of): tell it this one is due, as a reserve that set it would.
        server.cli(&["hset", &holds.replace(":holds", ":flags"), "sweep", "0"]);
    }
    // The other instance's reserve purges it: its $0.006 fits only without the hold.
    let competing = other.check_and_reserve(&stream_request()).await.unwrap();
    assert!(records(&server).iter().all(|r| !r.ends_with(&id)));
    // Past the first renewal (at most half a TTL after the reserve): it finds the hold
    // gone and brings nothing back.
    let until = reserved + ttl / 2 + ttl / 10;
    while Instant::now() < until {
        for holds in [WS_HOLDS, ORG_HOLDS] {
            assert!(!hold_ids(&server, holds).contains(&id), "{holds}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(records(&server).iter().all(|r| !r.ends_with(&id)));

    let receipt = engine
        .commit_usage(stream, Usage::new(1_000, 1_200))
        .await
        .unwrap();
    assert!(!receipt.is_pending());
    assert_eq!(receipt.cost(), dec("0.0034"));
    let competed = other
        .commit_usage(competing, Usage::new(1_000, 500))
        .await
        .unwrap();
    let total = picos(receipt.cost() + competed.cost());
    for scope in SCOPES {
        assert_eq!(int(&server, scope, "spent"), total, "{scope}");
        assert_eq!(int(&server, scope, "used"), total, "{scope}");
        assert_eq!(int(&server, scope, "req"), 2, "{scope}");
    }
    assert_eq!(leftovers(&server), Vec::<String>::new());
}

/// The child process of [`a_killed_instance_holds_come_back_within_one_ttl`]: holds a
/// stream's reservation (renewed) until it is killed. Does nothing unless started by
/// that test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started as a child process by a_killed_instance_holds_come_back_within_one_ttl"]
async fn child_holds_a_stream_until_killed() {
    let Ok(url) = std::env::var("TOLLGATE_CANCEL_CHILD_REDIS") else {
        return;
    };
    let engine = RedisEngine::connect(
        &url,
        stream_policy(),
        RedisConfig {
            reservation_ttl: Duration::from_secs(1),
            ..RedisConfig::default()
        },
    )
    .await
    .unwrap();
    let stream = engine.check_and_reserve(&stream_request()).await.unwrap();
    println!("HOLDING {}", stream.id().unwrap());
    // The parent kills this process long before; bounded all the same.
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(stream);
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A gateway instance killed (SIGKILL) mid-stream: while it lived its hold was
/// renewed past its TTL; once it is dead, the hold comes back within one TTL (1 s),
/// given back by the next call on the workspace, here another instance's request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_holds_come_back_within_one_ttl() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let ttl = Duration::from_secs(1);
    let mut child = Child(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_holds_a_stream_until_killed",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("TOLLGATE_CANCEL_CHILD_REDIS", server.url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (lines, holding) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest may print "test <name> ... " ahead of it on the same line.
            if let Some((_, id)) = line.split_once("HOLDING ") {
                let _ = lines.send(id.trim().to_owned());
            }
        }
    });
    let id = tokio::task::spawn_blocking(move || holding.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the child did not reserve within 30 s");

    // While it lives, its hold outlives its TTL.
    let other = connect(&server, stream_policy(), ttl).await;
    assert_held_for(&server, &other, &id, 2 * ttl).await;

    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let killed = Instant::now();
    let reservation = poll_until(
        "the killed instance's hold to come back",
        3 * ttl,
        || async { other.check_and_reserve(&stream_request()).await.ok() },
    )
    .await;
    let took = killed.elapsed();
    eprintln!("the killed instance's hold came back {took:?} after the kill");
    assert!(
        took <= ttl + Duration::from_millis(300),
        "came back {took:?} after the kill, TTL {ttl:?}"
    );
    for holds in [WS_HOLDS, ORG_HOLDS] {
        assert!(!hold_ids(&server, holds).contains(&id), "{holds}");
    }
    // What it cost: nothing was charged for its stream (the instance that counted
    // its output is gone); only the new request holds.
    assert_eq!(int(&server, WS, "spent"), 0);
    assert_eq!(int(&server, WS, "held"), picos(dec("0.006")));
    drop(reservation);
}

/// Two instances, 64 tasks each, 2,000 requests per task on a tiny budget, Redis
/// healthy: no request refused as unavailable (503) and no commit failed or left
/// pending; spend within the budget; Redis's books equal the receipts; nothing held at
/// the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_a_tiny_budget_never_answer_503() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    const TASKS: u64 = 64;
    const REQUESTS: u64 = 2_000;
    let server = RedisServer::start();
    let limits = LimitsSpec {
        max_concurrent: Some(32),
        ..LimitsSpec::default()
    };
    // $0.05 a month: about 170 requests' worst case, 256,000 requests in all.
    let budget = dec("0.05");
    let policy = || policy(limits.clone(), "0.05", "1000");
    let engines = [
        connect(&server, policy(), LONG_TTL).await,
        connect(&server, policy(), LONG_TTL).await,
    ];

    #[derive(Default)]
    struct Counts {
        admitted: u64,
        budget: u64,
        concurrency: u64,
        charged: i64,
        unavailable: Vec<String>,
        failed: Vec<String>,
        pending: u64,
    }
    let counts = Arc::new(Mutex::new(Counts::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (e, engine) in engines.iter().enumerate() {
        for t in 0..TASKS {
            let (engine, counts) = (engine.clone(), Arc::clone(&counts));
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64((e as u64) << 32 | t);
                let mut mine = Counts::default();
                for _ in 0..REQUESTS {
                    let input = rng.random_range(1..500u32);
                    let max_output = rng.random_range(1..500u32);
                    match engine.check_and_reserve(&request(input, max_output)).await {
                        Ok(reservation) => {
                            mine.admitted += 1;
                            tokio::task::yield_now().await;
                            let output = rng.random_range(0..=max_output);
                            match engine
                                .commit_usage(reservation, Usage::new(input, output))
                                .await
                            {
                                Ok(receipt) => {
                                    mine.charged += picos(receipt.cost());
                                    mine.pending += u64::from(receipt.is_pending());
                                }
                                Err(error) => mine.failed.push(error.to_string()),
                            }
                        }
                        Err(denial) => match denial.reason {
                            DenialReason::Budget => mine.budget += 1,
                            DenialReason::Concurrency => mine.concurrency += 1,
                            _ => mine.unavailable.push(format!("{denial:?}")),
                        },
                    }
                }
                let mut counts = counts.lock().unwrap();
                counts.admitted += mine.admitted;
                counts.budget += mine.budget;
                counts.concurrency += mine.concurrency;
                counts.charged += mine.charged;
                counts.pending += mine.pending;
                counts.unavailable.append(&mut mine.unavailable);
                counts.failed.append(&mut mine.failed);
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let took = started.elapsed();
    let counts = std::mem::take(&mut *counts.lock().unwrap());
    let total = 2 * TASKS * REQUESTS;
    eprintln!(
        "{total} requests in {took:?} ({:.0}/s): {} admitted, {} refused for budget, {} for \
         concurrency, {} unavailable, {} commits failed, {} pending",
        total as f64 / took.as_secs_f64(),
        counts.admitted,
        counts.budget,
        counts.concurrency,
        counts.unavailable.len(),
        counts.failed.len(),
        counts.pending
    );
    assert!(
        counts.unavailable.is_empty(),
        "{} refused as unavailable, e.g. {:?}",
        counts.unavailable.len(),
        counts.unavailable.first()
    );
    assert!(
        counts.failed.is_empty(),
        "{} commits failed, e.g. {:?}",
        counts.failed.len(),
        counts.failed.first()
    );
    assert_eq!(counts.pending, 0, "commits left pending with Redis healthy");
    assert!(counts.budget > 0, "the budget never ran out");
    assert!(
        counts.charged <= picos(budget),
        "spent {} > budget",
        counts.charged
    );
    poll_until("nothing held", Duration::from_secs(1), || async {
        leftovers(&server).is_empty().then_some(())
    })
    .await;
    for scope in SCOPES {
        assert_eq!(int(&server, scope, "spent"), counts.charged, "{scope}");
        assert_eq!(
            int(&server, scope, "req"),
            i64::try_from(counts.admitted).unwrap(),
            "{scope}"
        );
    }
    for engine in &engines {
        assert_eq!(engine.pending_commits(), 0);
        assert_eq!(engine.releases_in_flight(), 0);
    }
}
