//! Coalescing on the Redis backend (`RedisConfig::coalesce`, on by default on a
//! standalone server): concurrent reserves and commits of one instance share function
//! calls, and every request is still decided exactly, in order, as separate calls
//! would decide it; a request that fails inside a batch fails alone.
//!
//! Run with `cargo test --features redis --test redis_coalesce`. Needs `redis-server`
//! and `redis-cli` (see `support/redis_server.rs`): with `CI` set a missing server
//! fails these tests; elsewhere `TOLLGATE_SKIP_REDIS=1` skips them.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::str::FromStr;

use redis_server::{require_redis, RedisServer};
use rust_decimal::Decimal;
use tollgate::{
    BudgetPeriod, BudgetSpec, DenialReason, KeySpec, LimitsSpec, ModelSpec, OrgSpec, Policy,
    PolicyDocument, RedisConfig, RedisEngine, RedisReservation, Request, StoreErrorKind, Usage,
    WorkspaceSpec,
};

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Model "m" at $1 per million tokens. Workspace "ws1" has a $0.010 monthly budget
/// (ten requests of 1,000 tokens); workspace "ws2" 7 requests a minute; key "k1" in
/// ws1, "k2" in ws2.
fn policy() -> Policy {
    Policy::new(
        PolicyDocument::new(OrgSpec::new("acme"))
            .model(ModelSpec::new("m", dec("1"), dec("1")))
            .workspace(
                WorkspaceSpec::new("ws1", "one")
                    .grant("m")
                    .budget(BudgetSpec::new(dec("0.010"), BudgetPeriod::Month)),
            )
            .workspace(
                WorkspaceSpec::new("ws2", "two")
                    .grant("m")
                    .limits(LimitsSpec {
                        rpm: Some(7),
                        ..LimitsSpec::default()
                    }),
            )
            .key(KeySpec::new("k1", "ws1", "sk-1"))
            .key(KeySpec::new("k2", "ws2", "sk-2")),
    )
    .unwrap()
}

fn ask(key: &str) -> Request<'_> {
    Request::with_key_id(key, "m")
        .input_tokens(1_000)
        .max_output_tokens(0)
}

async fn connect(server: &RedisServer, coalesce: bool) -> RedisEngine {
    RedisEngine::connect(
        &server.url(),
        policy(),
        RedisConfig {
            coalesce,
            ..RedisConfig::default()
        },
    )
    .await
    .unwrap()
}

/// `count` reserves of `key` at once, each on its own task; what each answered.
async fn burst(
    engine: &RedisEngine,
    keys: &[&'static str],
    count: usize,
) -> Vec<(&'static str, Result<RedisReservation, DenialReason>)> {
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let engine = engine.clone();
            let key = keys[i % keys.len()];
            tokio::spawn(async move {
                let answer = engine
                    .check_and_reserve(&ask(key))
                    .await
                    .map_err(|denial| denial.reason);
                (key, answer)
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(count);
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// 64 reserves at once on a $0.010 budget (10 fit) and a 7-per-minute limit: with
/// coalescing exactly what fits is admitted, as without it, in fewer calls than
/// requests; the commits settle to the cent and leave nothing held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coalesced_burst_admits_exactly_what_fits_in_fewer_calls() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    for coalesce in [true, false] {
        let server = RedisServer::start();
        let engine = connect(&server, coalesce).await;
        assert_eq!(server.cli(&["config", "resetstat"]), "OK");
        let answers = burst(&engine, &["k1", "k2"], 64).await;
        let calls = server.fcalls();

        let admitted = |key: &str| {
            answers
                .iter()
                .filter(|(k, a)| *k == key && a.is_ok())
                .count()
        };
        assert_eq!(admitted("k1"), 10, "budget, coalesce {coalesce}");
        assert_eq!(admitted("k2"), 7, "rpm, coalesce {coalesce}");
        for (key, answer) in &answers {
            if let Err(reason) = answer {
                let expected = if *key == "k1" {
                    DenialReason::Budget
                } else {
                    DenialReason::RequestsPerMinute
                };
                assert_eq!(*reason, expected, "{key}, coalesce {coalesce}");
            }
        }
        if coalesce {
            assert!(calls < 64, "64 reserves in {calls} calls: none shared");
        } else {
            assert_eq!(calls, 64, "one call per reserve without coalescing");
        }

        // Commit every admitted request at once (coalesced too), each for what it held.
        let commits: Vec<_> = answers
            .into_iter()
            .filter_map(|(_, answer)| answer.ok())
            .map(|reservation| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    engine
                        .commit_usage(reservation, Usage::new(1_000, 0))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut charged = Decimal::ZERO;
        for commit in commits {
            charged += commit.await.unwrap().cost();
        }
        assert_eq!(charged, dec("0.017"), "coalesce {coalesce}");
        let usage = engine.usage().await.unwrap();
        let ws1 = usage.workspaces.iter().find(|w| w.id == "ws1").unwrap();
        let ws2 = usage.workspaces.iter().find(|w| w.id == "ws2").unwrap();
        assert_eq!(ws1.usage.current.cost, dec("0.010"), "coalesce {coalesce}");
        assert_eq!(ws1.usage.current.requests, 10);
        assert_eq!(ws2.usage.current.requests, 7);
        for ws in [ws1, ws2] {
            assert_eq!(
                ws.usage.current.held,
                Decimal::ZERO,
                "{} coalesce {coalesce}",
                ws.id
            );
        }
        assert_eq!(usage.org.current.cost, dec("0.017"));
        assert_eq!(usage.org.current.held, Decimal::ZERO);
    }
}

/// A request whose counters are corrupt fails inside a shared call without taking the
/// others down: every request of the healthy key is admitted and settled, every one
/// of the corrupt key fails as corrupt (naming the key), and it held nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_that_fails_inside_a_shared_call_fails_alone() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let engine = connect(&server, true).await;
    // Key k2's counters: a packed field of the wrong length.
    let k2 = "tollgate:v2:{ws:ws2}:key:k2";
    server.cli(&["hset", k2, "n", "garbage"]);
    assert_eq!(server.cli(&["config", "resetstat"]), "OK");

    // k1's budget fits all 10 of its requests, k2's requests all meet the corruption.
    let answers = burst(&engine, &["k1", "k2"], 20).await;
    // A failed reserve is released by id in the background (its reply is not trusted
    // to say nothing was taken): one `release` call per hash tag, 2 × 10. Wait for them.
    let mut calls = server.fcalls();
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let now = server.fcalls();
        if now == calls && now >= 20 {
            break;
        }
        calls = now;
    }
    let reserve_calls = calls - 20;
    assert!(
        reserve_calls < 20,
        "20 reserves in {reserve_calls} calls: none shared"
    );
    let mut held = Vec::new();
    for (key, answer) in answers {
        match (key, answer) {
            ("k1", Ok(reservation)) => held.push(reservation),
            ("k2", Err(reason)) => assert_eq!(
                reason,
                DenialReason::StoreUnavailable(StoreErrorKind::Corrupt)
            ),
            (key, answer) => panic!("{key}: {:?}", answer.map(|r| r.reserved_cost())),
        }
    }
    assert_eq!(held.len(), 10);
    let error = engine.last_store_error().expect("the corrupt key's error");
    assert!(error.message.contains(k2), "names the key: {error:?}");

    for reservation in held {
        engine
            .commit_usage(reservation, Usage::new(1_000, 0))
            .await
            .unwrap();
    }
    // Nothing of k2's failed requests is held anywhere (its workspace, the org).
    for key in ["tollgate:v2:{ws:ws2}:ws", "tollgate:v2:{org:acme}:org"] {
        let held = server.cli(&["hget", key, "held"]);
        assert!(held.is_empty() || held == "0", "{key} held {held}");
    }
    assert_eq!(
        server.cli(&["hget", "tollgate:v2:{ws:ws1}:ws", "spent"]),
        "10000000000"
    );
}

/// Every `reserve` answer of a burst sent while Redis is paused, within `bound`.
async fn burst_while_paused(
    engine: &RedisEngine,
    count: usize,
    bound: std::time::Duration,
) -> Vec<Result<RedisReservation, DenialReason>> {
    let answers = tokio::time::timeout(bound, burst(engine, &["k1"], count))
        .await
        .unwrap_or_else(|_| panic!("{count} requests not all answered within {bound:?}"));
    answers.into_iter().map(|(_, answer)| answer).collect()
}

/// While Redis stalls, coalesced requests fail within about the response timeout, as
/// uncoalesced ones do: a request still queued when its patience runs out is taken
/// out of the queue (never sent) instead of waiting behind batch after batch timing
/// out. Once Redis answers again, nothing is left held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_server_fails_queued_requests_within_the_response_timeout() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let engine = connect(&server, true).await;
    // 2,000 requests would need 16 rounds of 4 batches of 32, each timing out after
    // 500 ms, if they queued: 8 s, and those sent after the pause would be admitted.
    // Each fails within about 1 s (500 ms queued at most, then its call's 500 ms); the
    // bound leaves room for a loaded machine, and the pause outlasts it.
    assert_eq!(server.cli(&["client", "pause", "8000", "all"]), "OK");
    let answers = burst_while_paused(&engine, 2000, std::time::Duration::from_secs(5)).await;
    for answer in &answers {
        assert_eq!(
            answer.as_ref().err(),
            Some(&DenialReason::StoreUnavailable(StoreErrorKind::Transient))
        );
    }
    // Only requests that were sent may have taken something: only theirs are released
    // by id (one release per hash tag), not the many taken out of the queue unsent.
    let releases = engine.releases_in_flight();
    eprintln!("releases in flight after the burst: {releases}");
    assert!(releases <= 1024, "{releases} releases for 2,000 requests");
    assert_eq!(server.cli(&["client", "unpause"]), "OK");
    // The calls that were in flight land now and are released by id in the background.
    let mut held = String::new();
    for _ in 0..250 {
        held = server.cli(&["hget", "tollgate:v2:{ws:ws1}:ws", "held"]);
        if engine.releases_in_flight() == 0 && (held.is_empty() || held == "0") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        held.is_empty() || held == "0",
        "workspace still holds {held}"
    );
    assert_eq!(engine.releases_in_flight(), 0);
    // And requests are served again.
    let r = engine.check_and_reserve(&ask("k1")).await.unwrap();
    engine.commit_usage(r, Usage::new(1_000, 0)).await.unwrap();
}

/// A caller whose runtime stops being polled (a sync wrapper whose `block_on` got its
/// answer and returned) does not strand other callers' requests: batches are sent from
/// the runtime the engine was connected on, not from whichever runtime asked first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_idle_runtime_does_not_strand_other_requests() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let engine = connect(&server, true).await;
    assert_eq!(server.cli(&["client", "pause", "300", "all"]), "OK");
    // A thread with a runtime of its own asks first (its call is sent and waits on the
    // paused server), gets its answer, and then keeps its runtime alive but idle.
    let (finish, finished) = std::sync::mpsc::channel::<()>();
    let lone = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let answer = runtime.block_on(engine.check_and_reserve(&ask("k1")));
            let admitted = answer.is_ok();
            drop(answer);
            finished.recv().unwrap();
            admitted
        })
    };
    // (Real tasks against a real server: a moment for the lone call to be sent.)
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let answers = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        burst(&engine, &["k1"], 64),
    )
    .await
    .expect("the burst was not answered");
    finish.send(()).unwrap();
    assert!(lone.join().unwrap(), "the lone request");
    // The budget fits 10; every other request is refused on its merits, none lost.
    let admitted = answers.iter().filter(|(_, a)| a.is_ok()).count();
    assert_eq!(
        admitted, 9,
        "with the lone request, exactly the 10 that fit"
    );
    for (_, answer) in &answers {
        if let Err(reason) = answer {
            assert_eq!(*reason, DenialReason::Budget);
        }
    }
}
