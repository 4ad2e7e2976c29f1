//! A real restart of the gateway process with `--state-dir`: every admin change made
//! before a crash (SIGKILL: nothing saved on the way out) or a graceful stop holds
//! after it, and a damaged state file stops the gateway at start instead of
//! silently going back to the seed policy.

use std::path::PathBuf;

use hyper::{Method, StatusCode};
use serde_json::json;

use crate::process::Gateway;
use crate::support::POLICY;

const ADMIN: &str = "sk-admin-restart";

fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-gw-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn args(dir: &std::path::Path) -> Vec<String> {
    [
        "--policy",
        POLICY,
        "--state-dir",
        dir.to_str().unwrap(),
        "--admin-key",
        &format!("ops:admin:{ADMIN}"),
        "--audit-log",
        dir.join("audit.jsonl").to_str().unwrap(),
        "--mock-delay-ms",
        "0",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn start(dir: &std::path::Path) -> Gateway {
    let args = args(dir);
    Gateway::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The statuses the demo keys and the two issued secrets answer with.
async fn statuses(gw: &Gateway, created: &str, rotated: &str) -> [StatusCode; 5] {
    [
        gw.chat("sk-demo-prod").await.status,
        gw.chat(created).await.status,
        gw.chat("sk-demo-staging").await.status,
        gw.chat(rotated).await.status,
        gw.chat("sk-demo-default").await.status,
    ]
}

#[tokio::test(flavor = "current_thread")]
async fn admin_changes_hold_across_a_crash_and_a_graceful_restart() {
    let dir = state_dir("restart");
    let mut gw = start(&dir);
    assert_eq!(gw.chat("sk-demo-prod").await.status, StatusCode::OK);

    let admin = |method, path: &'static str, body| {
        let gw = &gw;
        async move { gw.send(method, path, ADMIN, body).await }
    };
    // Revoke, create, rotate (grace 0), update (suspend).
    let revoked = admin(Method::POST, "/admin/keys/key-prod/revoke", None).await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    let created = admin(
        Method::POST,
        "/admin/keys",
        Some(json!({"id": "key-new", "workspace": "ws-prod"})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let created = created.body["secret"].as_str().unwrap().to_owned();
    let rotated = admin(Method::POST, "/admin/keys/key-staging/rotate", None).await;
    assert_eq!(rotated.status, StatusCode::OK, "{:?}", rotated.body);
    let rotated = rotated.body["secret"].as_str().unwrap().to_owned();
    let suspended = admin(
        Method::PATCH,
        "/admin/workspaces/ws-playground",
        Some(json!({"status": "suspended"})),
    )
    .await;
    assert_eq!(suspended.status, StatusCode::OK, "{:?}", suspended.body);

    let expected = [
        StatusCode::UNAUTHORIZED, // revoked
        StatusCode::OK,           // created
        StatusCode::UNAUTHORIZED, // rotated out, grace 0
        StatusCode::OK,           // the rotated key's new secret
        StatusCode::FORBIDDEN,    // its workspace suspended
    ];
    assert_eq!(statuses(&gw, &created, &rotated).await, expected);

    // A crash: nothing is saved on the way out, so what holds was saved when each
    // change was acknowledged.
    gw.kill();
    let mut gw = start(&dir);
    assert!(gw.output().contains("version 5"), "{}", gw.output());
    assert_eq!(
        statuses(&gw, &created, &rotated).await,
        expected,
        "after a crash"
    );
    let ws = gw
        .send(Method::GET, "/admin/workspaces/ws-playground", ADMIN, None)
        .await;
    assert_eq!(ws.body["status"], "suspended", "{:?}", ws.body);

    // A graceful restart keeps them too, and saves the counters beside the policy.
    assert!(gw.interrupt().success(), "{}", gw.output());
    assert!(dir.join("counters.json").exists());
    let gw = start(&dir);
    assert_eq!(
        statuses(&gw, &created, &rotated).await,
        expected,
        "after a graceful restart"
    );
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "current_thread")]
async fn a_damaged_state_file_stops_the_gateway_at_start() {
    let dir = state_dir("damaged");
    let mut gw = start(&dir);
    let revoked = gw
        .send(Method::POST, "/admin/keys/key-prod/revoke", ADMIN, None)
        .await;
    assert_eq!(revoked.status, StatusCode::OK);
    gw.kill();

    let state = dir.join("policy.json");
    let whole = std::fs::read(&state).unwrap();
    std::fs::write(&state, &whole[..whole.len() - 40]).unwrap(); // torn
    let args = args(&dir);
    let Err((status, output)) =
        Gateway::try_spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())
    else {
        panic!("the gateway started on a torn state file");
    };
    assert!(status.is_some_and(|s| !s.success()), "{output}");
    assert!(
        output.contains("Corrupt") && output.contains("policy.json"),
        "{output}"
    );
    // Nothing was reset: the torn file is still there for the operator to inspect.
    assert_eq!(std::fs::read(&state).unwrap().len(), whole.len() - 40);
    let _ = std::fs::remove_dir_all(&dir);
}
