//! What systemd, Docker and Kubernetes do to a gateway process: SIGTERM, starting it
//! with an operator's own policy, and a long run whose memory must stay flat.

use std::time::Duration;

use hyper::StatusCode;
use serde_json::Value;
use tollgate::Decimal;

use crate::hygiene::tempdir;
use crate::process::Gateway;

const ADMIN: &str = "sk-ops-admin-secret";

fn cost(body: &Value) -> Decimal {
    body["x_tollgate"]["cost_usd"]
        .as_str()
        .expect("a charged answer")
        .parse()
        .unwrap()
}

/// The key's spend this period, as `/admin/usage` reports it.
async fn key_spend(gateway: &Gateway, key: &str) -> Decimal {
    let usage = gateway
        .send(hyper::Method::GET, "/admin/usage", ADMIN, None)
        .await;
    assert_eq!(usage.status, StatusCode::OK);
    let key = usage.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key)
        .expect("the key is in the usage report");
    key["usage"]["current"]["cost"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_and_saves_the_counters_for_the_next_start() {
    let dir = tempdir();
    let counters = dir.join("counters.json");
    let (audit, requests) = (dir.join("audit.jsonl"), dir.join("requests.jsonl"));
    let args = [
        "--admin-key",
        "ops:admin:sk-ops-admin-secret",
        "--mock-delay-ms",
        "600",
        "--counters",
        counters.to_str().unwrap(),
        "--audit-log",
        audit.to_str().unwrap(),
        "--request-log",
        requests.to_str().unwrap(),
    ];

    let mut first = Gateway::spawn(&args);
    let mut charged = Decimal::ZERO;
    for _ in 0..3 {
        let answer = first.chat("sk-demo-prod").await;
        assert_eq!(answer.status, StatusCode::OK);
        charged += cost(&answer.body);
    }
    // One more, still at the provider when SIGTERM arrives: it is finished and
    // charged, not cut off.
    let signal = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        first.signal("TERM");
    };
    let (answer, ()) = tokio::join!(first.chat("sk-demo-prod"), signal);
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "the request in flight is finished"
    );
    charged += cost(&answer.body);
    let exit = first.wait_exit();
    assert!(exit.success(), "a clean exit on SIGTERM: {exit:?}");
    assert!(
        first.output().contains("SIGTERM: shutting down"),
        "{}",
        first.output()
    );
    assert!(counters.exists(), "the counters were saved");
    let logged = std::fs::read_to_string(&requests).unwrap();
    assert_eq!(
        logged.lines().count(),
        4,
        "every request logged and flushed"
    );

    // After a restart the key's spend is what it was: budgets did not reset.
    let second = Gateway::spawn(&args);
    assert!(charged > Decimal::ZERO);
    assert_eq!(key_spend(&second, "key-prod").await, charged);
}

#[tokio::test]
async fn the_banner_shows_the_demo_keys_only_for_the_demo_policy() {
    let dir = tempdir();
    let own = dir.join("policy.toml");
    std::fs::copy(crate::support::POLICY, &own).unwrap();
    let (audit, requests) = (dir.join("audit.jsonl"), dir.join("requests.jsonl"));
    let logs = [
        "--audit-log",
        audit.to_str().unwrap(),
        "--request-log",
        requests.to_str().unwrap(),
    ];
    let banner_end = "to stop.";

    let demo = Gateway::spawn(&logs);
    assert!(demo.wait_for_line(banner_end, Duration::from_secs(10)));
    assert!(
        demo.output().contains("sk-demo-staging"),
        "{}",
        demo.output()
    );

    let mut args = logs.to_vec();
    args.extend(["--policy", own.to_str().unwrap()]);
    let other = Gateway::spawn(&args);
    assert!(other.wait_for_line(banner_end, Duration::from_secs(10)));
    let printed = other.output();
    assert!(
        !printed.contains("sk-demo-"),
        "no demo keys for another policy: {printed}"
    );
    assert!(printed.contains("YOUR_KEY"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_of_20000_requests_keeps_the_process_memory_flat() {
    // A process of its own, so other tests' allocations do not count.
    let gateway = Gateway::spawn(&["--mock-delay-ms", "0"]);
    let round = |n: usize| {
        let gateway = &gateway;
        async move {
            for i in 0..n {
                // Admitted, refused and malformed requests, and refused admin reads.
                let answer = match i % 4 {
                    0 => gateway.chat("sk-demo-prod").await,
                    1 => gateway.chat("sk-unknown").await,
                    2 => {
                        let empty = Some(serde_json::json!({}));
                        gateway
                            .send(
                                hyper::Method::POST,
                                "/v1/chat/completions",
                                "sk-demo-prod",
                                empty,
                            )
                            .await
                    }
                    _ => {
                        gateway
                            .send(hyper::Method::GET, "/admin/usage", "nope", None)
                            .await
                    }
                };
                assert!(answer.status != StatusCode::INTERNAL_SERVER_ERROR);
            }
        }
    };
    // Warm up: allocator pools, encodings, the per-workspace request ring (1,000
    // lines) filled.
    round(5_000).await;
    let before = gateway.resident_bytes();
    round(15_000).await;
    let after = gateway.resident_bytes();
    let grown = after.saturating_sub(before);
    eprintln!("soak: resident {before} → {after} bytes");
    // 15,000 more requests may not grow resident memory by more than 2 MiB, so a leak
    // of 140 bytes a request (one small log line) shows.
    assert!(
        grown < 2 << 20,
        "resident memory grew {grown} bytes over 15,000 requests ({before} → {after})"
    );
}
