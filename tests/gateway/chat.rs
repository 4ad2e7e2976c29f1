//! Chat completions and models over HTTP: headers, charges, every denial status, and
//! a concurrency check on one small budget.

use std::str::FromStr;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde_json::json;
use tollgate::Decimal;

use crate::support::start;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[tokio::test]
async fn an_admitted_request_is_answered_with_headers_and_charged_exactly() {
    let gw = start().await;
    let answer = gw.chat("sk-demo-prod", "gpt-4o-mini", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("x-ratelimit-limit-requests"), Some("600"));
    assert_eq!(answer.header("x-ratelimit-remaining-requests"), Some("599"));
    assert_eq!(answer.header("x-ratelimit-limit-tokens"), Some("200000"));
    assert!(answer.header("ratelimit-policy").is_some());
    // "Hello": 3 framing + "user" (1) + "Hello" (1) + 3 reply priming in (o200k_base);
    // the mock answers 40 tokens.
    assert_eq!(answer.body["usage"]["prompt_tokens"], 8);
    assert_eq!(answer.body["usage"]["completion_tokens"], 40);
    // 8 × 0.15/M + 40 × 0.60/M
    assert_eq!(answer.body["x_tollgate"]["cost_usd"], "0.0000252");
    let usage = gw.usage().await;
    let ws = usage.workspaces.iter().find(|w| w.id == "ws-prod").unwrap();
    assert_eq!(ws.usage.current.cost, dec("0.0000252"));
    assert_eq!(ws.usage.current.held, Decimal::ZERO);
    assert_eq!(
        (
            ws.usage.current.input_tokens,
            ws.usage.current.output_tokens
        ),
        (8, 40)
    );
}

#[tokio::test]
async fn the_fourth_request_in_a_minute_is_429_with_retry_after() {
    let gw = start().await;
    for _ in 0..3 {
        let answer = gw.chat("sk-demo-staging", "gpt-4o-mini", None).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let answer = gw.chat("sk-demo-staging", "gpt-4o-mini", None).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.body["error"]["code"], "rate_limited");
    assert_eq!(answer.body["error"]["type"], "rate_limit_error");
    let retry: u64 = answer.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "retry-after {retry}");
    assert_eq!(answer.header("x-ratelimit-remaining-requests"), Some("0"));
}

#[tokio::test]
async fn the_playground_budget_runs_out_with_402() {
    let gw = start().await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(gw.chat("sk-demo-default", "gpt-4o", Some(50)).await.status);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 402].map(|s| StatusCode::from_u16(s).unwrap())
    );
    let answer = gw.chat("sk-demo-default", "gpt-4o", Some(50)).await;
    assert_eq!(answer.body["error"]["code"], "budget_exceeded");
    assert_eq!(answer.header("retry-after"), None);
}

#[tokio::test]
async fn identity_and_grant_denials_have_their_statuses() {
    let gw = start().await;
    let cases = [
        ("sk-nobody", "gpt-4o-mini", 401, "invalid_api_key"),
        ("sk-demo-staging", "gpt-4o", 403, "model_not_allowed"),
        ("sk-demo-prod", "gpt-9", 404, "model_not_found"),
    ];
    for (key, model, status, code) in cases {
        let answer = gw.chat(key, model, None).await;
        assert_eq!(answer.status.as_u16(), status, "{key} {model}");
        assert_eq!(answer.body["error"]["code"], code, "{key} {model}");
    }
    let listed = gw
        .send(Method::GET, "/v1/models", "sk-demo-staging", None)
        .await;
    assert_eq!(
        listed.body["data"],
        json!([{"id": "gpt-4o-mini", "object": "model", "owned_by": "tollgate-demo"}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_never_pass_the_budget() {
    let gw = Arc::new(start().await);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let gw = Arc::clone(&gw);
            tokio::spawn(async move { gw.chat("sk-demo-default", "gpt-4o", Some(50)).await })
        })
        .collect();
    let mut admitted = Decimal::ZERO;
    let mut refused = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        match answer.status.as_u16() {
            200 => admitted += dec(answer.body["x_tollgate"]["cost_usd"].as_str().unwrap()),
            402 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    // Each call holds 0.00052 and costs 0.00042: at most 4 fit in 0.002.
    assert!(admitted <= dec("0.002"), "spent {admitted}");
    assert!(refused >= 196, "refused {refused}");
    let usage = gw.usage().await;
    let ws = usage
        .workspaces
        .iter()
        .find(|w| w.id == "ws-playground")
        .unwrap();
    assert_eq!(ws.usage.current.cost, admitted);
    assert_eq!(ws.usage.current.held, Decimal::ZERO);
}

/// An answer whose commit Redis did not acknowledge (its writes paused past the
/// response timeout while the provider answered) is delivered all the same, marked
/// pending, and charged exactly once when Redis answers again. Redis backend only.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_commit_redis_did_not_acknowledge_is_delivered() {
    use std::time::{Duration, Instant};

    use crate::backend::Backend;
    use crate::support::{start_with, Options};

    let gw = start_with(Options {
        mock_delay: Duration::from_millis(600),
        ..Options::default()
    })
    .await;
    let (Some(redis), Backend::Redis(engine)) = (gw.redis.as_ref(), &gw.app.backend) else {
        eprintln!("skipping: the Redis backend only (TOLLGATE_GATEWAY_BACKEND=redis)");
        return;
    };
    async fn poll(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let holds = [
        "tollgate:v2:{ws:ws-prod}:holds",
        "tollgate:v2:{org:acme}:holds",
    ];
    // Warm up, so the commit below is one EVALSHA that runs when the pause ends (not a
    // NOSCRIPT answered after the gateway stopped waiting: that one would land with the
    // replay instead).
    let first = gw.chat("sk-demo-prod", "gpt-4o-mini", None).await;
    assert_eq!(first.status, StatusCode::OK);
    let asked = gw.chat("sk-demo-prod", "gpt-4o-mini", None);
    let pause = async {
        // Once the reservation has landed (while the provider thinks), Redis stops
        // running scripts for 1.5 s: the commit's reply will not come within 500 ms.
        poll("the reservation to land", || {
            holds.iter().all(|h| redis.cli(&["zcard", h]) == "1")
        })
        .await;
        assert_eq!(redis.cli(&["client", "pause", "1500", "write"]), "OK");
    };
    let (answer, ()) = tokio::join!(asked, pause);
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body["usage"]["completion_tokens"], 40);
    assert_eq!(answer.body["x_tollgate"]["cost_usd"], "0.0000252");
    assert_eq!(answer.body["x_tollgate"]["commit"], "pending");
    assert_eq!(engine.pending_commits(), 1);

    // The commit lands when the pause ends; the next commit replays the queue, which
    // finds it done and charges nothing again.
    let ws = |usage: &tollgate::UsageSnapshot| {
        let ws = usage.workspaces.iter().find(|w| w.id == "ws-prod").unwrap();
        (ws.usage.current.cost, ws.usage.current.requests)
    };
    poll("the commit to land when the pause ends", || {
        redis.cli(&["zcard", holds[0]]) == "0"
    })
    .await;
    assert_eq!(ws(&gw.usage().await), (dec("0.0000504"), 2));
    let third = gw.chat("sk-demo-prod", "gpt-4o-mini", None).await;
    assert_eq!(third.status, StatusCode::OK);
    assert!(third.body["x_tollgate"].get("commit").is_none());
    poll("the queued commit to be replayed", || {
        engine.pending_commits() == 0
    })
    .await;
    assert_eq!(ws(&gw.usage().await), (dec("0.0000756"), 3));
}

/// A commit still pending when the gateway shuts down is replayed by the shutdown,
/// not lost with the process. Redis backend only.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_replays_commits_redis_has_not_acknowledged() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::backend::Backend;
    use crate::support::{start_with, Options};

    let mut gw = start_with(Options {
        mock_delay: Duration::from_millis(600),
        ..Options::default()
    })
    .await;
    let app = Arc::clone(&gw.app);
    let Backend::Redis(engine) = &app.backend else {
        eprintln!("skipping: the Redis backend only (TOLLGATE_GATEWAY_BACKEND=redis)");
        return;
    };
    let redis = gw.redis.as_ref().unwrap();
    let hold = "tollgate:v2:{ws:ws-prod}:holds";
    assert_eq!(
        gw.chat("sk-demo-prod", "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );
    let asked = gw.chat("sk-demo-prod", "gpt-4o-mini", None);
    let pause = async {
        let deadline = Instant::now() + Duration::from_secs(5);
        while redis.cli(&["zcard", hold]) != "1" {
            assert!(Instant::now() < deadline, "the reservation never landed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(redis.cli(&["client", "pause", "1500", "write"]), "OK");
    };
    let (answer, ()) = tokio::join!(asked, pause);
    assert_eq!(answer.body["x_tollgate"]["commit"], "pending");
    assert_eq!(engine.pending_commits(), 1);
    // No request comes after it to replay the queue: the shutdown does.
    gw.shut_down().await;
    assert_eq!(
        engine.pending_commits(),
        0,
        "replayed before the process would exit"
    );
    let usage = engine.usage().await.unwrap();
    let ws = usage.workspaces.iter().find(|w| w.id == "ws-prod").unwrap();
    assert_eq!(
        (ws.usage.current.cost, ws.usage.current.requests),
        (dec("0.0000504"), 2)
    );
}

/// A client that hangs up while its reservation is on its way to Redis (Redis's writes
/// paused, so the reserve cannot land yet) leaves nothing held once Redis answers:
/// within seconds, not a reservation TTL (30 s), however far the gateway got with the
/// request; and it is charged at most once. Redis backend only.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_during_reserve_leaves_nothing_held() {
    use std::time::{Duration, Instant};

    use crate::backend::Backend;
    use crate::support::start;

    let gw = start().await;
    let (Some(redis), Backend::Redis(_)) = (gw.redis.as_ref(), &gw.app.backend) else {
        eprintln!("skipping: the Redis backend only (TOLLGATE_GATEWAY_BACKEND=redis)");
        return;
    };
    let holds = [
        "tollgate:v2:{ws:ws-prod}:holds",
        "tollgate:v2:{org:acme}:holds",
    ];
    let spent = |usage: &tollgate::UsageSnapshot| {
        let ws = usage.workspaces.iter().find(|w| w.id == "ws-prod").unwrap();
        (ws.usage.current.cost, ws.usage.current.held)
    };
    let first = gw.chat("sk-demo-prod", "gpt-4o-mini", None).await;
    assert_eq!(first.status, StatusCode::OK);
    let (before, _) = spent(&gw.usage().await);

    for _ in 0..5 {
        assert_eq!(redis.cli(&["client", "pause", "700", "write"]), "OK");
        // The request is sent, its reserve waits on the paused server, and the client
        // gives up after 150 ms: its connection closes.
        let gave_up = tokio::time::timeout(
            Duration::from_millis(150),
            gw.chat("sk-demo-prod", "gpt-4o-mini", None),
        )
        .await;
        if let Ok(answer) = gave_up {
            panic!("answered during the pause: {}", answer.status);
        }
    }
    // A write waits out the pause (reads do not: a hold count read during the pause
    // says nothing); then the reserves that were waiting run.
    assert_eq!(redis.cli(&["set", "pause-probe", "1"]), "OK");
    // Once Redis answers again, every hold taken for those requests is given back
    // (or committed, if the gateway got that far): none is left to expire. Twice in a
    // row, so a reserve still landing cannot pass for a release.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut zero_seen = 0;
    while zero_seen < 2 {
        let left: Vec<String> = holds.iter().map(|h| redis.cli(&["zcard", h])).collect();
        zero_seen = if left.iter().all(|n| n == "0") {
            zero_seen + 1
        } else {
            0
        };
        assert!(Instant::now() < deadline, "holds left: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (after, held) = spent(&gw.usage().await);
    assert_eq!(held, Decimal::ZERO);
    // Each abandoned request is charged once if the gateway answered it, else not at
    // all: never more than one request's cost each (0.0000252 USD here).
    assert!(after >= before && after - before <= dec("0.0000252") * Decimal::from(5));
}
