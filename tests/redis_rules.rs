//! Issue 12 on the Redis backend: counters stay exact when rules change under
//! requests in flight, and after deletions and late replays.
//!
//! Run with `cargo test --features redis --test redis_rules`. Needs `redis-server`
//! and `redis-cli` (see `support/redis_server.rs`); `TOLLGATE_SKIP_REDIS=1` skips.
//!
//! Redis `TIME` is the only clock inside the scripts, so a test that needs time to
//! pass waits for it for real (polling Redis against a deadline, or one short sleep
//! where the bucket must drain, said where it happens).

#[path = "support/redis_server.rs"]
mod redis_server;

use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, Instant};

use redis_server::{require_redis, RedisServer};
use rust_decimal::Decimal;
use tollgate::{
    BudgetPeriod, BudgetSpec, DenialReason, Error, KeySpec, LimitsSpec, ModelSpec, OrgSpec, Policy,
    PolicyDocument, RedisConfig, RedisEngine, RedisReservation, Request, Usage, WorkspaceSpec,
    WorkspaceUpdate,
};

/// Upper bound on any wait for Redis's clock to pass a TTL.
const DEADLINE: Duration = Duration::from_secs(15);
/// Pause between two polls of a wait.
const POLL: Duration = Duration::from_millis(10);
const DAY_US: i64 = 86_400_000_000;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Org "acme" ($1,000 a month), model "m" at $1 per million tokens in and out;
/// workspace "ws1" with `ws1` limits and a $100 monthly budget, keys "k1" and "k2";
/// workspace "ws2" with `ws2` limits and a $1 monthly budget, key "k3".
fn document(ws1: LimitsSpec, ws2: LimitsSpec) -> PolicyDocument {
    let mut org = OrgSpec::new("acme");
    org.budget = Some(BudgetSpec::new(dec("1000"), BudgetPeriod::Month));
    PolicyDocument::new(org)
        .model(ModelSpec::new("m", dec("1"), dec("1")))
        .workspace(
            WorkspaceSpec::new("ws1", "one")
                .grant("m")
                .limits(ws1)
                .budget(BudgetSpec::new(dec("100"), BudgetPeriod::Month)),
        )
        .workspace(
            WorkspaceSpec::new("ws2", "two")
                .grant("m")
                .limits(ws2)
                .budget(BudgetSpec::new(dec("1"), BudgetPeriod::Month)),
        )
        .key(KeySpec::new("k1", "ws1", "sk-1"))
        .key(KeySpec::new("k2", "ws1", "sk-2"))
        .key(KeySpec::new("k3", "ws2", "sk-3"))
}

fn policy(ws1: LimitsSpec, ws2: LimitsSpec) -> Policy {
    Policy::new(document(ws1, ws2)).unwrap()
}

fn tpm(limit: i64) -> LimitsSpec {
    LimitsSpec {
        tpm: Some(limit),
        ..LimitsSpec::default()
    }
}

async fn engine(server: &RedisServer, policy: Policy, config: RedisConfig) -> RedisEngine {
    RedisEngine::connect(&server.url(), policy, config)
        .await
        .unwrap()
}

/// `tokens` input tokens and no output on `key`.
fn ask(key: &str, tokens: u32) -> Request<'_> {
    Request::with_key_id(key, "m")
        .input_tokens(tokens)
        .max_output_tokens(0)
}

async fn reserve(engine: &RedisEngine, key: &str, tokens: u32) -> RedisReservation {
    engine
        .check_and_reserve(&ask(key, tokens))
        .await
        .unwrap_or_else(|d| panic!("{tokens} tokens on {key} refused: {d:?}"))
}

/// Why `tokens` on `key` are refused; panics (naming `why`) if they are admitted.
async fn refused(engine: &RedisEngine, key: &str, tokens: u32, why: &str) -> DenialReason {
    match engine.check_and_reserve(&ask(key, tokens)).await {
        Err(denial) => denial.reason,
        Ok(r) => {
            engine.commit_usage(r, Usage::new(0, 0)).await.unwrap();
            panic!("{tokens} tokens on {key} were admitted: {why}")
        }
    }
}

fn hget(server: &RedisServer, key: &str, field: &str) -> String {
    server.cli(&["hget", key, field])
}

fn int(server: &RedisServer, key: &str, field: &str) -> i64 {
    let raw = hget(server, key, field);
    if raw.is_empty() {
        return 0;
    }
    raw.parse()
        .unwrap_or_else(|e| panic!("{key} {field} = {raw:?}: {e}"))
}

fn exists(server: &RedisServer, key: &str) -> bool {
    server.cli(&["exists", key]) == "1"
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

/// Drop a reservation (which releases it in the background) and wait until Redis
/// has released both of its groups.
async fn release(server: &RedisServer, reservation: RedisReservation) {
    let id = reservation.id().unwrap().to_owned();
    drop(reservation);
    let records = [
        format!("tollgate:v2:{{ws:ws1}}:resv:{id}"),
        format!("tollgate:v2:{{org:acme}}:resv:{id}"),
    ];
    poll_until("the dropped reservation to be released", || async {
        records.iter().all(|r| !exists(server, r)).then_some(())
    })
    .await;
}

const WS1: &str = "tollgate:v2:{ws:ws1}:ws";
const WS2: &str = "tollgate:v2:{ws:ws2}:ws";
const ORG: &str = "tollgate:v2:{org:acme}:org";

/// Item 1: a TPM limit raised from 1,000 to 100,000 while a 1,000-token hold is in
/// flight. The hold is 1,000 tokens whatever the limit; committing it with 0 tokens
/// gives back (at most) those 1,000 tokens at the new rate, not the 60 seconds of
/// backlog they were worth under the old one (which would empty the bucket and
/// admit 99,000 + 100,000 tokens in one minute against 100,000).
#[tokio::test(flavor = "current_thread")]
async fn a_raised_limit_refunds_a_hold_in_its_units_not_its_old_nanoseconds() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let a = engine(
        &server,
        policy(tpm(1_000), LimitsSpec::default()),
        RedisConfig::default(),
    )
    .await;
    let held = reserve(&a, "k1", 1_000).await;
    let raise = WorkspaceUpdate {
        limits: Some(tpm(100_000)),
        ..WorkspaceUpdate::default()
    };
    a.update_workspace("ws1", raise, None).await.unwrap();
    // The 1,000 tokens in flight count against the new limit too.
    assert_eq!(
        refused(&a, "k1", 100_000, "1,000 tokens are in flight").await,
        DenialReason::TokensPerMinute
    );
    let big = reserve(&a, "k1", 99_000).await;
    a.commit_usage(big, Usage::new(99_000, 0)).await.unwrap();
    a.commit_usage(held, Usage::new(0, 0)).await.unwrap();
    // At most the 1,000 held tokens came back (and a few drained since): 50,000 more
    // do not fit in this minute.
    assert_eq!(
        refused(
            &a,
            "k1",
            50_000,
            "the hold's refund gave back more than the 1,000 tokens it took"
        )
        .await,
        DenialReason::TokensPerMinute
    );
}

/// Item 2: a release gives back only what of its hold has not drained yet. Two
/// holds A and B of 3,000 tokens fill a 6,000 TPM bucket (10 ms a token); A is
/// released, so B drains first from then on; after ~1 s, C (3,000) and D (50) are
/// taken and B is released. B has drained for that second: its refund is at most
/// 3,000 − 100 tokens, so 2,950 tokens fit afterwards, not 3,050 (the slot end
/// recorded at B's take, 60 s, says nothing of B having moved forward).
#[tokio::test(flavor = "current_thread")]
async fn a_release_never_gives_back_tokens_that_already_drained() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let a = engine(
        &server,
        policy(tpm(6_000), LimitsSpec::default()),
        RedisConfig::default(),
    )
    .await;
    let hold_a = reserve(&a, "k1", 3_000).await;
    let hold_b = reserve(&a, "k1", 3_000).await;
    release(&server, hold_a).await;
    // Redis TIME is the scripts' only clock: let B drain for real for a second
    // (100 tokens at 6,000 a minute), the margin this test separates by.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c = reserve(&a, "k1", 3_000).await;
    let d = reserve(&a, "k1", 50).await;
    release(&server, hold_b).await;
    // C and D hold 3,050 tokens: 2,950 are free now (plus what drains while the test
    // runs, a few tokens). Giving B back in full would leave ≥ 3,050 free.
    assert_eq!(
        refused(
            &a,
            "k1",
            3_000,
            "B's release gave back tokens that had drained in A's place"
        )
        .await,
        DenialReason::TokensPerMinute
    );
    let e = reserve(&a, "k1", 2_900).await;
    for r in [c, d, e] {
        a.commit_usage(r, Usage::new(0, 0)).await.unwrap();
    }
}

/// Item 3: only the current policy changes a budget's period kind. A reservation
/// taken under a monthly budget commits after the budget became daily (and a
/// request under the new rules started the day's period): the commit settles into
/// the day's period and leaves its bounds alone.
#[tokio::test(flavor = "current_thread")]
async fn a_commit_under_an_old_period_kind_keeps_the_new_period() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let a = engine(
        &server,
        policy(LimitsSpec::default(), LimitsSpec::default()),
        RedisConfig::default(),
    )
    .await;
    let monthly = reserve(&a, "k1", 1_000).await;
    let daily = WorkspaceUpdate {
        budget: Some(Some(BudgetSpec::new(dec("100"), BudgetPeriod::Day))),
        ..WorkspaceUpdate::default()
    };
    a.update_workspace("ws1", daily, None).await.unwrap();
    let r = reserve(&a, "k1", 1_000).await;
    a.commit_usage(r, Usage::new(1_000, 0)).await.unwrap();
    let period = |when: &str| {
        let (ps, pe) = (int(&server, WS1, "ps"), int(&server, WS1, "pe"));
        assert_eq!(ps % DAY_US, 0, "{when}: a day starts at midnight");
        assert_eq!(pe - ps, DAY_US, "{when}: the period is a day, [{ps}, {pe})");
    };
    period("after a request under the daily budget");
    a.commit_usage(monthly, Usage::new(1_000, 0)).await.unwrap();
    period("after the commit of a reservation taken under the monthly budget");
    let usage = a.usage().await.unwrap();
    let current = &usage.workspaces[0].usage.current;
    assert_eq!(current.cost, dec("0.002"));
    assert_eq!(
        current.period_end.as_unix_nanos() - current.period_start.as_unix_nanos(),
        86_400_000_000_000
    );
}

/// Every key with a TTL deleted: what an idle TTL does once it has run out (Redis
/// time cannot be fast-forwarded, and the shortest idle TTL is two budget periods).
fn expire_everything_with_a_ttl(server: &RedisServer) -> usize {
    let mut expired = 0;
    for key in server.cli(&["keys", "*"]).lines() {
        let key = key.trim();
        if key.is_empty() {
            continue;
        }
        if server.cli(&["pttl", key]).parse::<i64>().unwrap() >= 0 {
            server.cli(&["del", key]);
            expired += 1;
        }
    }
    expired
}

/// Item 4: a revoked key and a deleted workspace stay refused by every instance,
/// whatever idle TTLs run out, and late commits of their requests in flight change
/// nothing about that.
#[tokio::test(flavor = "current_thread")]
async fn revoked_and_deleted_flags_outlive_every_idle_ttl() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let p = || policy(LimitsSpec::default(), LimitsSpec::default());
    let a = engine(&server, p(), RedisConfig::default()).await;
    // B never applies the changes: its policy lists k1 as active and ws2 as present.
    let b = engine(&server, p(), RedisConfig::default()).await;
    let r = reserve(&b, "k1", 10).await;
    b.commit_usage(r, Usage::new(10, 0)).await.unwrap();
    let in_flight_k1 = reserve(&b, "k1", 10).await;
    let in_flight_k3 = reserve(&b, "k3", 10).await;

    a.revoke_key("k1", None).await.unwrap();
    a.delete_workspace("ws2", None).await.unwrap();
    // Requests in flight at the time finish later.
    b.commit_usage(in_flight_k1, Usage::new(10, 0))
        .await
        .unwrap();
    b.commit_usage(in_flight_k3, Usage::new(10, 0))
        .await
        .unwrap();
    assert_eq!(
        refused(&b, "k1", 1, "revoked").await,
        DenialReason::KeyRevoked
    );
    assert_eq!(
        refused(&b, "k3", 1, "workspace deleted").await,
        DenialReason::UnknownKey
    );

    assert!(expire_everything_with_a_ttl(&server) > 0);
    assert_eq!(
        refused(
            &b,
            "k1",
            1,
            "the revocation expired with the key's counters"
        )
        .await,
        DenialReason::KeyRevoked
    );
    assert_eq!(
        refused(
            &b,
            "k3",
            1,
            "the deletion expired with the workspace's counters"
        )
        .await,
        DenialReason::UnknownKey
    );
    // Untouched keys still work.
    let r = reserve(&b, "k2", 10).await;
    b.commit_usage(r, Usage::new(10, 0)).await.unwrap();
}

/// Item 5: a workspace deleted while a request is in flight and then created again
/// starts from zero: the late commit settles at the org level only and leaves no
/// negative concurrency or spend in the new workspace's counters.
#[tokio::test(flavor = "current_thread")]
async fn a_recreated_workspace_starts_from_zero() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let one_at_a_time = LimitsSpec {
        max_concurrent: Some(1),
        ..LimitsSpec::default()
    };
    let p = || policy(LimitsSpec::default(), one_at_a_time.clone());
    let a = engine(&server, p(), RedisConfig::default()).await;
    let in_flight = reserve(&a, "k3", 100_000).await;
    a.delete_workspace("ws2", None).await.unwrap();
    let receipt = a
        .commit_usage(in_flight, Usage::new(100_000, 0))
        .await
        .unwrap();
    assert_eq!(receipt.cost(), dec("0.1"));

    a.apply_policy(p()).await.unwrap();
    let first = reserve(&a, "k3", 10).await;
    assert_eq!(
        refused(
            &a,
            "k3",
            10,
            "two requests in flight with max_concurrent = 1"
        )
        .await,
        DenialReason::Concurrency
    );
    for field in ["conc", "held", "used"] {
        assert!(
            int(&server, WS2, field) >= 0,
            "{WS2} {field} = {}",
            hget(&server, WS2, field)
        );
    }
    assert_eq!(int(&server, WS2, "conc"), 1);
    assert_eq!(hget(&server, WS2, "used"), hget(&server, WS2, "held"));
    a.commit_usage(first, Usage::new(10, 0)).await.unwrap();
    // $1 budget: the deleted workspace's spend is not the new one's, and the new one
    // got no extra room from it either.
    let usage = a.usage().await.unwrap();
    let ws2 = &usage.workspaces[1].usage.current;
    assert_eq!(ws2.cost, dec("0.00001"));
    assert_eq!(ws2.held, Decimal::ZERO);
    assert_eq!(usage.workspaces[1].usage.in_flight, 0);
    // The org paid for the deleted workspace's last request.
    assert_eq!(usage.org.current.cost, dec("0.1") + dec("0.00001"));
    assert_eq!(int(&server, ORG, "held"), 0);
}

/// Item 6: a commit that landed but whose reply timed out is queued; replayed after
/// its commit marker expired, it must still not be charged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_later_than_the_commit_marker_never_charges_twice() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let a = engine(
        &server,
        policy(LimitsSpec::default(), LimitsSpec::default()),
        RedisConfig {
            response_timeout: Duration::from_millis(100),
            commit_marker_ttl: Duration::from_millis(300),
            ..RedisConfig::default()
        },
    )
    .await;
    // Warm up, so the commit below is one EVALSHA that runs when the pause ends.
    let r = reserve(&a, "k1", 1_000).await;
    a.commit_usage(r, Usage::new(1_000, 0)).await.unwrap();
    let r = reserve(&a, "k1", 1_000).await;
    let id = r.id().unwrap().to_owned();
    let done = format!("tollgate:v2:{{ws:ws1}}:done:{id}");
    // Writes are held for 500 ms; the engine gives up after 100 ms.
    assert_eq!(server.cli(&["client", "pause", "500", "write"]), "OK");
    match a.commit_usage(r, Usage::new(1_000, 0)).await {
        Ok(receipt) => assert!(receipt.is_pending(), "{receipt:?}"),
        other => panic!("commit during CLIENT PAUSE: {other:?}"),
    }
    assert_eq!(a.pending_commits(), 1);
    // It lands when the pause ends (the engine had stopped waiting).
    poll_until("the timed-out commit to land", || async {
        (int(&server, WS1, "spent") == 2_000_000_000).then_some(())
    })
    .await;
    poll_until("the commit marker to expire", || async {
        (!exists(&server, &done)).then_some(())
    })
    .await;

    let left = poll_until("flush_pending to reach Redis", || async {
        match a.flush_pending().await {
            Ok(left) => Some(left),
            Err(Error::Store(e)) if e.is_transient() => None,
            Err(e) => panic!("flush_pending: {e:?}"),
        }
    })
    .await;
    assert_eq!(left, 0);
    assert_eq!(a.pending_commits(), 0);
    assert_eq!(
        a.dropped_commits(),
        1,
        "the replay was dropped, and counted"
    );
    for key in [WS1, ORG] {
        assert_eq!(
            int(&server, key, "spent"),
            2_000_000_000,
            "{key}: charged twice"
        );
        assert_eq!(int(&server, key, "req"), 2, "{key}");
        assert_eq!(int(&server, key, "held"), 0, "{key}");
    }
}

/// Item 7: a commit that arrives after its hold expired (and was given back) is
/// charged as a fresh request would be: its tokens and money, and the request once
/// in RPM and RPD.
#[tokio::test(flavor = "current_thread")]
async fn a_commit_after_its_hold_expired_counts_the_request_in_rpm_and_rpd() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let limits = LimitsSpec {
        rpm: Some(2),
        rpd: Some(2),
        ..LimitsSpec::default()
    };
    let a = engine(
        &server,
        policy(limits, LimitsSpec::default()),
        RedisConfig::default(),
    )
    .await;
    let late = reserve(&a, "k1", 10).await;
    // A live reservation's holds are renewed; one whose renewals could not reach Redis
    // for a whole TTL expires. Expire it by hand (an expiry in the past), on both tags.
    let id = late.id().unwrap().to_owned();
    for holds in ["tollgate:v2:{ws:ws1}:holds", "tollgate:v2:{org:acme}:holds"] {
        assert_eq!(server.cli(&["zadd", holds, "xx", "ch", "0", &id]), "1");
        // Calls sweep a tag's holds only from its `sweep` time (the earliest expiry
        // they know of): tell it this one is due, as a reserve that set it would.
        server.cli(&["hset", &holds.replace(":holds", ":flags"), "sweep", "0"]);
    }
    // The commit finds the hold expired (and gives it back first): the request is
    // charged afresh.
    a.commit_usage(late, Usage::new(10, 0)).await.unwrap();
    let r = reserve(&a, "k1", 10).await;
    a.commit_usage(r, Usage::new(10, 0)).await.unwrap();
    assert_eq!(int(&server, WS1, "req"), 2);
    // Two requests this minute and this day: RPD holds two requests' worth (43,200 s
    // each), and a third request is refused.
    let rpd: i64 = int(&server, WS1, "rpd");
    assert!(
        rpd > 86_000_000_000_000,
        "RPD backlog {rpd} ns: the late commit was not counted"
    );
    assert_eq!(
        refused(&a, "k1", 10, "the late commit was not counted in RPM").await,
        DenialReason::RequestsPerMinute
    );
}
