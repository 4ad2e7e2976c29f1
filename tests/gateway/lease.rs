//! Two example gateway processes with quota leasing (`--lease`) on one real
//! `redis-server`: a graceful shutdown settles every lease, so Redis's books equal
//! what the answers said they cost; a crash (SIGKILL) leaves leases whose holds come
//! back within one reservation TTL, and loses at most the charges they served.

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::Value;
use tollgate::Decimal;

use crate::process::Gateway;
use crate::redis_server::{require_redis, RedisServer};
use crate::support::POLICY;

const ADMIN: &str = "sk-admin-lease";

fn spawn(redis: &RedisServer, extra: &[&str]) -> Gateway {
    let admin_key = format!("ops:admin:{ADMIN}");
    let url = redis.url();
    let mut args = vec![
        "--policy",
        POLICY,
        "--redis",
        &url,
        "--admin-key",
        &admin_key,
        "--mock-delay-ms",
        "0",
    ];
    args.extend_from_slice(extra);
    Gateway::spawn(&args)
}

/// 120 chats on the demo production key, 8 at a time: what their answers say they
/// cost together.
async fn traffic(gateway: &Gateway) -> Decimal {
    let mut charged = Decimal::ZERO;
    for _ in 0..15 {
        let answers = eight_chats(gateway).await;
        for answer in answers {
            assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
            charged += answer.body["x_tollgate"]["cost_usd"]
                .as_str()
                .expect("a charged answer")
                .parse::<Decimal>()
                .unwrap();
        }
    }
    charged
}

async fn eight_chats(gateway: &Gateway) -> Vec<crate::support::Answer> {
    let (a, b, c, d) = tokio::join!(
        gateway.chat("sk-demo-prod"),
        gateway.chat("sk-demo-prod"),
        gateway.chat("sk-demo-prod"),
        gateway.chat("sk-demo-prod")
    );
    let (e, f, g, h) = tokio::join!(
        gateway.chat("sk-demo-prod"),
        gateway.chat("sk-demo-prod"),
        gateway.chat("sk-demo-prod"),
        gateway.chat("sk-demo-prod")
    );
    vec![a, b, c, d, e, f, g, h]
}

/// The production workspace's spend, requests and holds this period, from
/// `/admin/usage` of `gateway`.
async fn workspace_usage(gateway: &Gateway) -> (Decimal, u64, Decimal) {
    let usage = gateway.send(Method::GET, "/admin/usage", ADMIN, None).await;
    assert_eq!(usage.status, StatusCode::OK);
    let ws = usage.body["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == "ws-prod")
        .cloned()
        .unwrap_or(Value::Null);
    let current = &ws["usage"]["current"];
    let money = |v: &Value| v.as_str().unwrap_or("0").parse::<Decimal>().unwrap();
    (
        money(&current["cost"]),
        current["requests"].as_u64().unwrap_or(0),
        money(&current["held"]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_settles_every_lease() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let redis = RedisServer::start();
    let mut leasing = spawn(&redis, &["--lease"]);
    let charged = traffic(&leasing).await;
    // Exact, 120 requests take 240 calls and more; from leases, a fraction.
    let calls = redis.fcalls();
    assert!(
        calls < 120,
        "{calls} calls: requests were not served from leases"
    );
    let exit = leasing.interrupt();
    assert!(exit.success(), "{exit:?}\n{}", leasing.output());

    let other = spawn(&redis, &[]);
    let (spent, requests, held) = workspace_usage(&other).await;
    assert_eq!(requests, 120, "every answered request counted");
    assert_eq!(spent, charged, "books = answers");
    assert_eq!(held, Decimal::ZERO, "nothing held after the shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leasing_gateway_holds_nothing_after_one_ttl() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let redis = RedisServer::start();
    let mut leasing = spawn(&redis, &["--lease", "--reservation-ttl-secs", "1"]);
    let charged = traffic(&leasing).await;
    leasing.kill();
    let killed = Instant::now();

    // What reached Redis from the killed gateway: its settled leases and its requests
    // decided alone; never more than its answers said. Its open leases still hold.
    let other = spawn(&redis, &[]);
    let (spent, requests, held) = workspace_usage(&other).await;
    assert!(spent <= charged, "{spent} charged for {charged} answered");
    assert!(requests <= 120, "{requests}");
    assert!(held > Decimal::ZERO, "no lease was open at the kill");
    // The other gateway's requests on the workspace sweep expired holds.
    loop {
        assert_eq!(other.chat("sk-demo-prod").await.status, StatusCode::OK);
        let (_, _, held) = workspace_usage(&other).await;
        if held.is_zero() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "still {held} held {:?} after the kill",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "a killed leasing gateway: {spent} of {charged} charged, holds back after {:?}",
        killed.elapsed()
    );
}
