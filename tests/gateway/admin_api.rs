//! The admin API over HTTP: roles, key lifecycle, live policy edits, validation
//! errors, the audit log (read back after a graceful shutdown) and budget webhooks
//! (received by a real hyper listener on loopback).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tollgate::{Decimal, Event, EventKind, KeySpec, ScopeRef, Timestamp};

use crate::admin::AdminKeys;
use crate::support::{start, start_with, Options, Running};
use crate::webhooks::{self, Webhooks};

const ADMIN: &str = "sk-admin-demo";
const EDITOR: &str = "sk-editor-demo";
const VIEWER: &str = "sk-viewer-demo";

/// A file name in the temporary directory no other test uses.
pub(crate) fn temp_path(what: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!(
        "tollgate-gateway-{what}-{}-{nanos}-{n}.jsonl",
        std::process::id()
    ))
}

/// Assert a 403 from the admin API naming `role` and `action`.
fn assert_forbidden(answer: &crate::support::Answer, role: &str, action: &str) {
    assert_eq!(
        answer.status,
        StatusCode::FORBIDDEN,
        "{action}: {}",
        answer.body
    );
    let error = &answer.body["error"];
    assert_eq!(error["code"], "admin_forbidden");
    assert_eq!(error["role"], role);
    assert_eq!(error["action"], action);
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(role) && message.contains(action),
        "{message}"
    );
}

impl Running {
    pub(crate) async fn admin(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> Value {
        let answer = self.send(method.clone(), path, key, body).await;
        assert!(
            answer.status.is_success(),
            "{method} {path}: {} {}",
            answer.status,
            answer.body
        );
        answer.body
    }
}

#[tokio::test]
async fn an_admin_creates_a_workspace_and_a_key_then_rotates_revokes_and_deletes() {
    let gw = start().await;
    let created = gw
        .send(
            Method::POST,
            "/admin/workspaces",
            ADMIN,
            Some(json!({
                "id": "ws-team",
                "name": "team-alpha",
                "environment": "staging",
                "models": ["gpt-4o-mini"],
                "limits": {"rpm": 100},
            })),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["id"], "ws-team");
    assert_eq!(created.body["environment"], "staging");
    assert_eq!(created.body["limits"]["rpm"], 100);
    assert_eq!(created.body["keys"], json!([]));

    let issued = gw
        .send(
            Method::POST,
            "/admin/keys",
            ADMIN,
            Some(json!({"id": "key-team", "workspace": "ws-team"})),
        )
        .await;
    assert_eq!(issued.status, StatusCode::CREATED, "{}", issued.body);
    assert_eq!(issued.body["id"], "key-team");
    assert_eq!(issued.body["workspace"], "ws-team");
    let first = issued.body["secret"].as_str().unwrap().to_owned();
    assert!(first.starts_with("sk-tg-"), "{first}");
    assert_eq!(
        gw.chat(&first, "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );

    // The secret is shown once: no read returns it (nor its digest).
    for path in [
        "/admin/workspaces",
        "/admin/workspaces/ws-team",
        "/admin/usage",
    ] {
        let read = gw.admin(Method::GET, path, VIEWER, None).await.to_string();
        assert!(!read.contains(&first), "{path} shows the secret");
        assert!(
            !read.contains(&KeySpec::digest_of(&first)),
            "{path} shows the digest"
        );
    }
    let listed = gw
        .admin(Method::GET, "/admin/workspaces/ws-team", VIEWER, None)
        .await;
    assert_eq!(listed["keys"][0]["id"], "key-team");
    assert_eq!(listed["keys"][0]["status"], "active");

    // Rotation with no grace: the old secret is refused at once, the new one works.
    let rotated = gw
        .admin(
            Method::POST,
            "/admin/keys/key-team/rotate",
            ADMIN,
            Some(json!({"grace_seconds": 0})),
        )
        .await;
    let second = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    assert_eq!(rotated["old_secret_valid_until"], Value::Null);
    let old = gw.chat(&first, "gpt-4o-mini", None).await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    assert_eq!(old.body["error"]["code"], "invalid_api_key");
    assert_eq!(
        gw.chat(&second, "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );

    // Rotation with a grace: both work until it ends. No body at all works too.
    let graced = gw
        .admin(
            Method::POST,
            "/admin/keys/key-team/rotate",
            ADMIN,
            Some(json!({"grace_seconds": 300})),
        )
        .await;
    let third = graced["secret"].as_str().unwrap().to_owned();
    assert!(graced["old_secret_valid_until"].is_string());
    assert_eq!(
        gw.chat(&second, "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        gw.chat(&third, "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );

    // Revocation refuses the key's secrets at once.
    let revoked = gw
        .admin(Method::POST, "/admin/keys/key-team/revoke", ADMIN, None)
        .await;
    assert_eq!(revoked, json!({"id": "key-team", "revoked": true}));
    for secret in [&second, &third] {
        let answer = gw.chat(secret, "gpt-4o-mini", None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.body);
    }
    let listed = gw
        .admin(Method::GET, "/admin/workspaces/ws-team", ADMIN, None)
        .await;
    assert_eq!(listed["keys"][0]["status"], "revoked");

    // Deleting the workspace removes it and its keys.
    gw.admin(Method::DELETE, "/admin/workspaces/ws-team", ADMIN, None)
        .await;
    let gone = gw
        .send(Method::GET, "/admin/workspaces/ws-team", ADMIN, None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    let usage = gw.admin(Method::GET, "/admin/usage", ADMIN, None).await;
    assert!(!usage.to_string().contains("ws-team"));
}

#[tokio::test]
async fn an_editor_changes_limits_budgets_and_grants_live_but_not_keys_or_workspaces() {
    let gw = start().await;
    assert_eq!(
        gw.chat("sk-demo-prod", "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );

    // Lowering rpm applies to the next request.
    let patched = gw
        .admin(
            Method::PATCH,
            "/admin/workspaces/ws-prod",
            EDITOR,
            Some(json!({"limits": {"rpm": 1}})),
        )
        .await;
    assert_eq!(patched["limits"]["rpm"], 1);
    assert_eq!(patched["limits"]["tpm"], Value::Null, "limits are replaced");
    let limited = gw.chat("sk-demo-prod", "gpt-4o-mini", None).await;
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        limited.body
    );
    assert_eq!(limited.header("x-ratelimit-limit-requests"), Some("1"));

    // A tiny budget applies to the next request; removing it lifts it.
    gw.admin(
        Method::PATCH,
        "/admin/workspaces/ws-prod",
        EDITOR,
        Some(json!({
            "limits": {"rpm": 600, "tpm": 200000},
            "budget": {"limit": "0.00001", "period": "day", "alert_thresholds": [80]},
        })),
    )
    .await;
    let broke = gw.chat("sk-demo-prod", "gpt-4o-mini", None).await;
    assert_eq!(broke.status, StatusCode::PAYMENT_REQUIRED, "{}", broke.body);
    assert_eq!(broke.body["error"]["code"], "budget_exceeded");
    let unbudgeted = gw
        .admin(
            Method::PATCH,
            "/admin/workspaces/ws-prod",
            EDITOR,
            Some(json!({"budget": null})),
        )
        .await;
    assert_eq!(unbudgeted["budget"], Value::Null);
    assert_eq!(
        gw.chat("sk-demo-prod", "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );

    // Grants: taking gpt-4o away refuses it.
    gw.admin(
        Method::PATCH,
        "/admin/workspaces/ws-prod",
        EDITOR,
        Some(json!({"models": ["gpt-4o-mini"]})),
    )
    .await;
    let refused = gw.chat("sk-demo-prod", "gpt-4o", None).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.body["error"]["code"], "model_not_allowed");

    // Not keys, not creating or deleting workspaces.
    let writes = [
        (
            Method::POST,
            "/admin/keys",
            Some(json!({"id": "k-ed", "workspace": "ws-prod"})),
            "key.create",
        ),
        (
            Method::POST,
            "/admin/keys/key-prod/rotate",
            None,
            "key.rotate",
        ),
        (
            Method::POST,
            "/admin/keys/key-prod/revoke",
            None,
            "key.revoke",
        ),
        (
            Method::DELETE,
            "/admin/workspaces/ws-staging",
            None,
            "workspace.delete",
        ),
        (
            Method::POST,
            "/admin/workspaces",
            Some(json!({"id": "ws-ed", "name": "editor-made"})),
            "workspace.create",
        ),
    ];
    for (method, path, body, action) in writes {
        let answer = gw.send(method, path, EDITOR, body).await;
        assert_forbidden(&answer, "editor", action);
    }
    assert_eq!(
        gw.chat("sk-demo-staging", "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        gw.chat("sk-demo-prod", "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_viewer_reads_usage_and_workspaces_but_every_write_is_403() {
    let gw = start().await;
    assert_eq!(
        gw.chat("sk-demo-prod", "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );
    let writes = [
        (
            Method::POST,
            "/admin/workspaces",
            Some(json!({"id": "ws-v", "name": "viewer-made"})),
            "workspace.create",
        ),
        (
            Method::PATCH,
            "/admin/workspaces/ws-prod",
            Some(json!({"status": "suspended"})),
            "workspace.update",
        ),
        (
            Method::DELETE,
            "/admin/workspaces/ws-staging",
            None,
            "workspace.delete",
        ),
        (
            Method::POST,
            "/admin/keys",
            Some(json!({"id": "k-v", "workspace": "ws-prod"})),
            "key.create",
        ),
        (
            Method::POST,
            "/admin/keys/key-prod/rotate",
            None,
            "key.rotate",
        ),
        (
            Method::POST,
            "/admin/keys/key-prod/revoke",
            None,
            "key.revoke",
        ),
    ];
    for (method, path, body, action) in writes {
        let answer = gw.send(method, path, VIEWER, body).await;
        assert_forbidden(&answer, "viewer", action);
    }
    // Nothing changed.
    assert_eq!(
        gw.chat("sk-demo-prod", "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );

    let usage = gw.send(Method::GET, "/admin/usage", VIEWER, None).await;
    assert_eq!(usage.status, StatusCode::OK);
    let prod = usage.body["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == "ws-prod")
        .unwrap();
    assert_eq!(prod["usage"]["current"]["requests"], 2);
    assert_eq!(prod["usage"]["current"]["cost"], "0.0000504");
    assert_eq!(prod["usage"]["previous"]["requests"], 0);
    let mini = prod["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "gpt-4o-mini")
        .unwrap();
    assert_eq!(mini["usage"]["current"]["requests"], 2);
    let key = usage.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == "key-prod")
        .unwrap();
    assert_eq!(key["workspace"], "ws-prod");
    assert_eq!(key["usage"]["current"]["output_tokens"], 80);
    assert!(usage.body["org"]["current"].is_object());

    let listed = gw
        .send(Method::GET, "/admin/workspaces", VIEWER, None)
        .await;
    assert_eq!(listed.status, StatusCode::OK);
    let ids: Vec<&str> = listed.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["ws-prod", "ws-staging", "ws-playground"]);
    assert_eq!(listed.body["default_workspace"], "ws-playground");
    assert_eq!(listed.body["data"][1]["limits"]["rpm"], 3);
}

#[tokio::test]
async fn a_suspended_workspace_is_refused_with_403_until_reactivated() {
    let gw = start().await;
    let suspended = gw
        .admin(
            Method::PATCH,
            "/admin/workspaces/ws-staging",
            EDITOR,
            Some(json!({"status": "suspended"})),
        )
        .await;
    assert_eq!(suspended["status"], "suspended");
    let refused = gw.chat("sk-demo-staging", "gpt-4o-mini", None).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "workspace_suspended");
    gw.admin(
        Method::PATCH,
        "/admin/workspaces/ws-staging",
        ADMIN,
        Some(json!({"status": "active"})),
    )
    .await;
    assert_eq!(
        gw.chat("sk-demo-staging", "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn unknown_admin_keys_are_401_and_unknown_routes_or_ids_404() {
    let gw = start().await;
    // No Authorization header at all.
    let request = Request::builder()
        .uri(format!("{}/admin/usage", gw.url))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let bare = gw.client.request(request).await.unwrap();
    assert_eq!(bare.status(), StatusCode::UNAUTHORIZED);
    assert!(bare.headers().contains_key("www-authenticate"));
    // An API key is not an admin key.
    for key in ["sk-demo-prod", "sk-admin-dem0", "sk-nobody"] {
        let answer = gw.send(Method::GET, "/admin/usage", key, None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{key}");
        assert_eq!(answer.body["error"]["code"], "invalid_admin_key");
    }
    let unknown_route = gw.send(Method::GET, "/admin/nothing", ADMIN, None).await;
    assert_eq!(unknown_route.status, StatusCode::NOT_FOUND);
    let trailing = gw
        .send(Method::GET, "/admin/workspaces/", ADMIN, None)
        .await;
    assert_eq!(trailing.status, StatusCode::NOT_FOUND);
    let wrong_method = gw.send(Method::GET, "/admin/keys", ADMIN, None).await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.header("allow"), Some("POST"));

    let unknown_ids = [
        (Method::GET, "/admin/workspaces/ws-nope", None),
        (
            Method::PATCH,
            "/admin/workspaces/ws-nope",
            Some(json!({"region": "eu"})),
        ),
        (Method::DELETE, "/admin/workspaces/ws-nope", None),
        (Method::POST, "/admin/keys/key-nope/rotate", None),
        (Method::POST, "/admin/keys/key-nope/revoke", None),
    ];
    for (method, path, body) in unknown_ids {
        let answer = gw.send(method.clone(), path, ADMIN, body).await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            answer.body
        );
        assert_eq!(answer.body["error"]["code"], "not_found");
    }
}

#[tokio::test]
async fn invalid_changes_are_refused_with_tollgates_policy_issues() {
    let gw = start().await;
    let invalid = gw
        .send(
            Method::POST,
            "/admin/workspaces",
            ADMIN,
            Some(json!({
                "id": "ws-bad",
                "name": "bad",
                "limits": {"rpm": -5},
                "budget": {"limit": "1.00", "alert_thresholds": [150]},
            })),
        )
        .await;
    assert_eq!(
        invalid.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        invalid.body
    );
    assert_eq!(invalid.body["error"]["code"], "invalid_policy");
    let issues = invalid.body["error"]["issues"].as_array().unwrap();
    let rpm = issues
        .iter()
        .find(|i| i["path"].as_str().unwrap().ends_with("limits.rpm"))
        .unwrap_or_else(|| panic!("no rpm issue in {issues:?}"));
    assert_eq!(rpm["value"], "-5");
    assert_eq!(rpm["problem"], "must be at least 1");
    assert!(
        issues.iter().any(
            |i| i["path"].as_str().unwrap().contains("alert_thresholds") && i["value"] == "150"
        ),
        "{issues:?}"
    );
    // Nothing was created.
    let missing = gw
        .send(Method::GET, "/admin/workspaces/ws-bad", ADMIN, None)
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);

    let duplicate = gw
        .send(
            Method::POST,
            "/admin/workspaces",
            ADMIN,
            Some(json!({"id": "ws-prod", "name": "again"})),
        )
        .await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT, "{}", duplicate.body);
    assert!(duplicate.body["error"]["issues"][0]["problem"]
        .as_str()
        .unwrap()
        .starts_with("duplicate"));

    let orphan = gw
        .send(
            Method::POST,
            "/admin/keys",
            ADMIN,
            Some(json!({"id": "key-orphan", "workspace": "ws-nope"})),
        )
        .await;
    assert_eq!(
        orphan.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        orphan.body
    );
    assert_eq!(
        orphan.body["error"]["issues"][0]["problem"],
        "no workspace has this id"
    );

    let negative_grace = gw
        .send(
            Method::POST,
            "/admin/keys/key-prod/rotate",
            ADMIN,
            Some(json!({"grace_seconds": -1})),
        )
        .await;
    assert_eq!(negative_grace.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        negative_grace.body["error"]["issues"][0]["path"],
        "grace_seconds"
    );
    assert_eq!(
        gw.chat("sk-demo-prod", "gpt-4o-mini", None).await.status,
        StatusCode::OK
    );

    // Bodies of the wrong shape are 400.
    let shapes = [
        (
            "/admin/workspaces",
            Method::POST,
            json!({"id": "x", "name": "y", "colour": "red"}),
        ),
        ("/admin/workspaces/ws-prod", Method::PATCH, json!({})),
        (
            "/admin/workspaces/ws-prod",
            Method::PATCH,
            json!({"name": "renamed"}),
        ),
        (
            "/admin/workspaces/ws-prod",
            Method::PATCH,
            json!({"status": "sleeping"}),
        ),
        ("/admin/keys", Method::POST, json!({"workspace": "ws-prod"})),
    ];
    for (path, method, body) in shapes {
        let answer = gw
            .send(method.clone(), path, ADMIN, Some(body.clone()))
            .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{method} {path} {body}: {}",
            answer.body
        );
    }
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{}/admin/workspaces", gw.url))
        .header("authorization", format!("Bearer {ADMIN}"))
        .body(Full::new(Bytes::from_static(b"{not json")))
        .unwrap();
    let not_json = gw.client.request(request).await.unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);

    // The default workspace cannot be deleted: the policy would not validate.
    let default = gw
        .send(
            Method::DELETE,
            "/admin/workspaces/ws-playground",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(
        default.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        default.body
    );
    assert!(!default.body["error"]["issues"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn configured_admin_keys_replace_the_demo_keys() {
    let gw = start_with(Options {
        admin_keys: vec![
            "ops:admin:ops-secret-0123456789".into(),
            format!(
                "auditor:viewer:sha256={}",
                KeySpec::digest_of("auditor-secret-42")
            ),
        ],
        ..Options::default()
    })
    .await;
    let demo = gw.send(Method::GET, "/admin/usage", ADMIN, None).await;
    assert_eq!(demo.status, StatusCode::UNAUTHORIZED);
    gw.admin(Method::GET, "/admin/usage", "ops-secret-0123456789", None)
        .await;
    gw.admin(Method::GET, "/admin/usage", "auditor-secret-42", None)
        .await;
    let write = gw
        .send(
            Method::POST,
            "/admin/keys/key-prod/revoke",
            "auditor-secret-42",
            None,
        )
        .await;
    assert_forbidden(&write, "viewer", "key.revoke");

    for (spec, complaint) in [
        ("x:root:long-enough-secret", "role"),
        ("x:admin:short", "at least"),
        ("x:admin", "NAME:ROLE:SECRET"),
        ("bad name:admin:long-enough-secret", "name"),
        ("x:admin:sha256=abc", "64 hex"),
    ] {
        let error = AdminKeys::parse(&[spec])
            .err()
            .unwrap_or_else(|| panic!("{spec} accepted"));
        assert!(error.contains(complaint), "{spec}: {error}");
        assert!(
            !error.contains("long-enough-secret"),
            "{error} shows the secret"
        );
    }
    let twice = AdminKeys::parse(&["a:admin:same-secret-123", "b:viewer:same-secret-123"]);
    assert!(twice.is_err());
}

#[tokio::test]
async fn the_audit_log_has_every_admin_action_and_refusal_and_is_flushed_on_shutdown() {
    let path = temp_path("audit");
    let mut gw = start_with(Options {
        audit_log: Some(path.clone()),
        ..Options::default()
    })
    .await;
    let issued = gw
        .admin(
            Method::POST,
            "/admin/keys",
            ADMIN,
            Some(json!({"id": "key-audit", "workspace": "ws-prod"})),
        )
        .await;
    let secret = issued["secret"].as_str().unwrap().to_owned();
    let refused = gw
        .send(Method::POST, "/admin/keys/key-prod/revoke", VIEWER, None)
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let unknown = gw
        .send(Method::GET, "/admin/usage", "sk-nobody", None)
        .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    gw.admin(
        Method::PATCH,
        "/admin/workspaces/ws-staging",
        EDITOR,
        Some(json!({"region": "eu-west"})),
    )
    .await;
    gw.admin(Method::GET, "/admin/usage", VIEWER, None).await;
    gw.admin(Method::POST, "/admin/keys/key-audit/revoke", ADMIN, None)
        .await;

    gw.shut_down().await;
    let text = std::fs::read_to_string(&path).expect("the audit log exists");
    std::fs::remove_file(&path).ok();
    assert!(!text.contains(&secret), "the audit log shows a secret");
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    for line in &lines {
        for field in ["time", "actor", "role", "action", "target", "outcome"] {
            assert!(line.get(field).is_some(), "{field} missing in {line}");
        }
        let time = line["time"].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(time).unwrap_or_else(|e| panic!("{time}: {e}"));
    }
    let find = |wanted: Value| {
        let wanted = wanted.as_object().unwrap();
        lines
            .iter()
            .find(|line| wanted.iter().all(|(k, v)| &line[k] == v))
            .unwrap_or_else(|| panic!("no line with {wanted:?} in\n{text}"))
    };
    find(
        json!({"source": "admin", "actor": "demo-admin", "role": "admin", "action": "key.create",
                "target": "key-audit", "outcome": "ok", "status": 201}),
    );
    let refusal = find(
        json!({"actor": "demo-viewer", "role": "viewer", "action": "key.revoke",
                              "target": "key-prod", "outcome": "refused", "status": 403}),
    );
    assert!(refusal["reason"].as_str().unwrap().contains("viewer"));
    find(
        json!({"actor": null, "role": null, "action": "usage.read", "outcome": "refused",
                "status": 401}),
    );
    find(
        json!({"actor": "demo-editor", "role": "editor", "action": "workspace.update",
                "target": "ws-staging", "outcome": "ok"}),
    );
    find(json!({"actor": "demo-viewer", "action": "usage.read", "outcome": "ok"}));
    // The engine's own reports of the key changes, with the admin key's name as actor.
    let created = find(
        json!({"source": "engine", "action": "key_created", "actor": "demo-admin",
                              "target": "key-audit", "outcome": "ok"}),
    );
    assert_eq!(created["event"]["scope"]["workspace"], "ws-prod");
    find(json!({"source": "engine", "action": "key_revoked", "target": "key-audit"}));
    find(
        json!({"source": "engine", "action": "workspace_updated", "actor": "demo-editor",
                "target": "ws-staging"}),
    );
    // Everything queued was written before the shutdown finished.
    assert_eq!(gw.app.audit.written(), lines.len() as u64);
    assert_eq!(gw.app.audit.dropped(), 0);
    assert_eq!(lines.len(), 9, "{text}");
}

/// One POST the webhook receiver got, and what it answered.
pub(crate) struct Received {
    pub(crate) path: String,
    pub(crate) event: String,
    pub(crate) delivery: String,
    pub(crate) attempt: u32,
    pub(crate) body: Value,
    pub(crate) answered: u16,
}

/// A webhook receiver on loopback that answers 503 to its first `fail_first`
/// requests and 200 after, reporting each request.
pub(crate) async fn webhook_receiver(
    fail_first: usize,
) -> (String, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/tollgate", listener.local_addr().unwrap());
    let (report, received) = mpsc::unbounded_channel();
    let seen = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (report, seen) = (report.clone(), Arc::clone(&seen));
            let service = service_fn(move |request: Request<Incoming>| {
                let (report, seen) = (report.clone(), Arc::clone(&seen));
                async move {
                    let header = |name: &str| {
                        request
                            .headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let (event, delivery) =
                        (header("x-tollgate-event"), header("x-tollgate-delivery"));
                    let attempt = header("x-tollgate-attempt").parse().unwrap_or(0);
                    let path = request.uri().path().to_owned();
                    let bytes = request.into_body().collect().await.unwrap().to_bytes();
                    let answered = if seen.fetch_add(1, Ordering::SeqCst) < fail_first {
                        503
                    } else {
                        200
                    };
                    let _ = report.send(Received {
                        path,
                        event,
                        delivery,
                        attempt,
                        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                        answered,
                    });
                    let mut response = Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = StatusCode::from_u16(answered).unwrap();
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, received)
}

#[tokio::test]
async fn a_budget_threshold_is_posted_to_the_webhook_and_a_failed_attempt_retried() {
    let (url, mut received) = webhook_receiver(1).await;
    let gw = start_with(Options {
        webhooks: vec![url],
        webhook_config: Some(webhooks::Config {
            backoff: Duration::from_millis(50),
            ..webhooks::Config::default()
        }),
        ..Options::default()
    })
    .await;
    // Two requests of 0.0000252 each spend the budget: 50 % after the first, 100 %
    // after the second.
    gw.admin(
        Method::POST,
        "/admin/workspaces",
        ADMIN,
        Some(json!({
            "id": "ws-alerts",
            "name": "alerts",
            "models": ["gpt-4o-mini"],
            "budget": {"limit": "0.0000504", "period": "day", "alert_thresholds": [50, 100]},
        })),
    )
    .await;
    let issued = gw
        .admin(
            Method::POST,
            "/admin/keys",
            ADMIN,
            Some(json!({"id": "key-alerts", "workspace": "ws-alerts"})),
        )
        .await;
    let secret = issued["secret"].as_str().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            gw.chat(secret, "gpt-4o-mini", Some(40))
                .await
                .status
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 402]);

    // Deliveries: the first is refused once (503) and retried; four in all succeed.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.iter().filter(|r: &&Received| r.answered == 200).count() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, received.recv()).await {
            Ok(Some(r)) => got.push(r),
            _ => panic!(
                "webhooks still missing; got {:?}",
                got.iter().map(|r| &r.body).collect::<Vec<_>>()
            ),
        }
    }
    assert_eq!((got[0].answered, got[0].attempt), (503, 1));
    assert_eq!((got[1].answered, got[1].attempt), (200, 2));
    assert_eq!(
        got[0].delivery, got[1].delivery,
        "a retry keeps its delivery id"
    );
    assert_eq!(got[0].body, got[1].body);
    for r in &got {
        assert_eq!(r.path, "/hooks/tollgate");
        assert_eq!(r.body["type"], r.event.as_str());
        assert_eq!(r.body["id"], r.delivery.as_str());
        assert_eq!(
            r.body["scope"],
            json!({"org": "acme", "workspace": "ws-alerts"})
        );
        assert_eq!(r.body["limit"], "0.0000504");
        let time = r.body["time"].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(time).unwrap();
    }
    let delivered: Vec<(String, Value, Value)> = got[1..]
        .iter()
        .map(|r| {
            (
                r.event.clone(),
                r.body["percent"].clone(),
                r.body["spent"].clone(),
            )
        })
        .collect();
    assert_eq!(
        delivered,
        [
            ("budget_threshold".into(), json!(50), json!("0.0000252")),
            ("budget_threshold".into(), json!(100), json!("0.0000504")),
            ("budget_exhausted".into(), Value::Null, json!("0.0000504")),
        ]
    );
    // The receiver reports before its answer reaches the gateway: wait for the count.
    let hooks = &gw.events.webhooks;
    while hooks.delivered() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        (
            hooks.delivered(),
            hooks.retried(),
            hooks.failed(),
            hooks.dropped()
        ),
        (3, 1, 0, 0)
    );
}

#[tokio::test]
async fn a_full_webhook_queue_drops_and_counts_events_without_waiting() {
    // A receiver that accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let hooks = Webhooks::start(
        &[url],
        webhooks::Config {
            capacity: 2,
            attempts: 1,
            timeout: Duration::from_secs(30),
            ..webhooks::Config::default()
        },
    )
    .unwrap();
    let event = Event {
        at: Timestamp::from_unix_nanos(1_700_000_000_000_000_000),
        actor: None,
        kind: EventKind::BudgetExhausted {
            scope: ScopeRef::workspace("acme", "ws-x"),
            limit: Decimal::ONE,
            spent: Decimal::ONE,
        },
    };
    let started = Instant::now();
    for _ in 0..50 {
        hooks.send(event.clone(), &[]);
    }
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    // At most two wait in the queue; the delivery task has not run yet.
    assert_eq!(hooks.dropped(), 48);
    // Give the task a turn: it takes one into flight, so one more fits.
    tokio::time::sleep(Duration::from_millis(50)).await;
    hooks.send(event.clone(), &[]);
    assert_eq!(hooks.dropped(), 48);
    assert_eq!(hooks.delivered(), 0);
    held.abort();

    assert!(Webhooks::start(&["https://example.com/hook"], webhooks::Config::default()).is_err());
    assert!(Webhooks::start(&["not a url"], webhooks::Config::default()).is_err());
}

#[tokio::test]
async fn the_admin_api_sets_several_budgets_overrides_and_a_keys_model_limits() {
    let gw = start().await;
    let created = gw
        .send(
            Method::POST,
            "/admin/workspaces",
            ADMIN,
            Some(json!({
                "id": "ws-breadth",
                "name": "breadth",
                "models": ["gpt-4o-mini", "gpt-4o"],
                "limits": {"rpm": 100},
            })),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);

    // A day budget beside a soft month budget, and a temporary RPM override.
    let patched = gw
        .send(
            Method::PATCH,
            "/admin/workspaces/ws-breadth",
            ADMIN,
            Some(json!({
                "budget": {"limit": "5.00", "period": "day"},
                "budgets": [{"limit": "100.00", "period": "month", "soft": true}],
                "temporary": {"until": "2099-01-01T00:00:00Z", "rpm": 500, "reason": "launch"},
            })),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    assert_eq!(patched.body["budgets"][0]["soft"], true);
    assert_eq!(patched.body["temporary"]["rpm"], 500);

    // A key that may call only gpt-4o, at most 2 a minute.
    let issued = gw
        .send(
            Method::POST,
            "/admin/keys",
            ADMIN,
            Some(json!({
                "id": "key-breadth",
                "workspace": "ws-breadth",
                "models": ["gpt-4o"],
                "model_limits": [{"model": "gpt-4o", "rpm": 2}],
            })),
        )
        .await;
    assert_eq!(issued.status, StatusCode::CREATED, "{}", issued.body);
    let secret = issued.body["secret"].as_str().unwrap().to_owned();
    let read = gw
        .admin(Method::GET, "/admin/workspaces/ws-breadth", ADMIN, None)
        .await;
    assert_eq!(read["keys"][0]["models"], json!(["gpt-4o"]));
    assert_eq!(read["keys"][0]["model_limits"][0]["rpm"], 2);

    let outside = gw.chat(&secret, "gpt-4o-mini", Some(10)).await;
    assert_eq!(outside.status, StatusCode::FORBIDDEN, "{}", outside.body);
    for _ in 0..2 {
        let ok = gw.chat(&secret, "gpt-4o", Some(10)).await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    }
    let limited = gw.chat(&secret, "gpt-4o", Some(10)).await;
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        limited.body
    );
    assert!(
        limited.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("key model"),
        "{}",
        limited.body
    );

    // Usage shows both budgets and the override in force.
    let usage = gw.usage().await;
    let ws = usage
        .workspaces
        .iter()
        .find(|w| w.id == "ws-breadth")
        .unwrap();
    assert_eq!(ws.budgets.len(), 2);
    assert!(ws.budgets[1].soft);
    assert!(ws.budgets[0].spent > Decimal::ZERO);
    assert!(ws.temporary.is_some());
    let key = usage.keys.iter().find(|k| k.id == "key-breadth").unwrap();
    assert_eq!(key.models[0].model, "gpt-4o");
    assert_eq!(key.models[0].usage.current.requests, 2);

    // Per-end-user limits, set live: OpenAI's `user` names the end user.
    let patched = gw
        .send(
            Method::PATCH,
            "/admin/workspaces/ws-breadth",
            ADMIN,
            Some(json!({"end_user_limits": {"limits": {"rpm": 1}}})),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    let plain = gw
        .admin(
            Method::POST,
            "/admin/keys",
            ADMIN,
            Some(json!({"id": "key-plain", "workspace": "ws-breadth"})),
        )
        .await;
    let plain = plain["secret"].as_str().unwrap().to_owned();
    chat_as(&gw, &plain, "alice", StatusCode::OK).await;
    let second = chat_as(&gw, &plain, "alice", StatusCode::TOO_MANY_REQUESTS).await;
    assert!(second.contains("end user"), "{second}");
    chat_as(&gw, &plain, "bob", StatusCode::OK).await;

    // Invalid new rules are refused with their path.
    let bad = gw
        .send(
            Method::PATCH,
            "/admin/workspaces/ws-breadth",
            ADMIN,
            Some(json!({"temporary": {"until": "2099-01-01T00:00:00Z"}})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    assert!(bad.body.to_string().contains("temporary"), "{}", bad.body);
}

/// A chat completion on gpt-4o-mini for end user `user`, expecting `status`; the body.
async fn chat_as(gw: &Running, secret: &str, user: &str, status: StatusCode) -> String {
    let answer = gw
        .send(
            Method::POST,
            "/v1/chat/completions",
            secret,
            Some(json!({
                "model": "gpt-4o-mini",
                "max_tokens": 10,
                "user": user,
                "messages": [{"role": "user", "content": "Hello"}],
            })),
        )
        .await;
    assert_eq!(answer.status, status, "{}", answer.body);
    answer.body.to_string()
}
