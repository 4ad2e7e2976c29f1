//! Two gateway processes on one real `redis-server`: an admin change made through one
//! gateway's admin API takes effect on the other within a second (revoke, rotate
//! with grace 0, suspend a workspace, create a key), and each gateway logs the policy
//! versions it applies.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::json;

use crate::process::Gateway;
use crate::redis_server::{require_redis, RedisServer};
use crate::support::POLICY;

const ADMIN: &str = "sk-admin-two";

fn spawn(redis: &RedisServer, dir: &std::path::Path, name: &str) -> Gateway {
    let audit = dir.join(format!("{name}-audit.jsonl"));
    let admin_key = format!("ops:admin:{ADMIN}");
    let url = redis.url();
    Gateway::spawn(&[
        "--policy",
        POLICY,
        "--redis",
        &url,
        "--admin-key",
        &admin_key,
        "--audit-log",
        audit.to_str().unwrap(),
        "--mock-delay-ms",
        "0",
    ])
}

/// An admin call that must succeed; its answer's body.
async fn admin(
    gw: &Gateway,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let answer = gw.send(method, path, ADMIN, body).await;
    assert!(answer.status.is_success(), "{path}: {:?}", answer.body);
    answer.body
}

/// Poll `gw` until `secret` answers `expected`; fails after a second. How long it took.
async fn until(gw: &Gateway, secret: &str, expected: StatusCode, since: Instant) -> Duration {
    loop {
        let status = gw.chat(secret).await.status;
        if status == expected {
            return since.elapsed();
        }
        assert!(
            since.elapsed() <= Duration::from_secs(1),
            "{secret}: still {status}, not {expected}, a second after the change\n{}",
            gw.output()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_admin_change_on_one_gateway_takes_effect_on_the_other() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let redis = RedisServer::start();
    let dir: PathBuf =
        std::env::temp_dir().join(format!("tollgate-two-gateways-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = spawn(&redis, &dir, "a");
    let b = spawn(&redis, &dir, "b");
    assert!(
        b.output().contains("policy: version 1 from Redis"),
        "{}",
        b.output()
    );
    for secret in ["sk-demo-prod", "sk-demo-staging", "sk-demo-default"] {
        assert_eq!(b.chat(secret).await.status, StatusCode::OK);
    }
    // Revoke on A: refused on B.
    admin(&a, Method::POST, "/admin/keys/key-prod/revoke", None).await;
    let took = until(&b, "sk-demo-prod", StatusCode::UNAUTHORIZED, Instant::now()).await;
    eprintln!("revoke on A refused on B after {took:?}");

    // Rotate on A with grace 0: B refuses the old secret and admits the new one.
    let rotated = admin(&a, Method::POST, "/admin/keys/key-staging/rotate", None).await;
    let at = Instant::now();
    let secret = rotated["secret"].as_str().unwrap().to_owned();
    let took = until(&b, "sk-demo-staging", StatusCode::UNAUTHORIZED, at).await;
    eprintln!("rotation on A refused the old secret on B after {took:?}");
    until(&b, &secret, StatusCode::OK, at).await;

    // Suspend on A: B answers 403.
    let suspend = json!({"status": "suspended"});
    admin(
        &a,
        Method::PATCH,
        "/admin/workspaces/ws-playground",
        Some(suspend),
    )
    .await;
    let took = until(&b, "sk-demo-default", StatusCode::FORBIDDEN, Instant::now()).await;
    eprintln!("suspension on A answered 403 on B after {took:?}");

    // And the other way: a key created on B works on A.
    let created = json!({"id": "key-from-b", "workspace": "ws-prod"});
    let created = admin(&b, Method::POST, "/admin/keys", Some(created)).await;
    let secret = created["secret"].as_str().unwrap().to_owned();
    let took = until(&a, &secret, StatusCode::OK, Instant::now()).await;
    eprintln!("key created on B admitted on A after {took:?}");

    // Both run version 5 (seed + four changes), and say so.
    for gw in [&a, &b] {
        assert!(
            gw.wait_for_line("applied policy version 5", Duration::from_secs(1)),
            "{}",
            gw.output()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
