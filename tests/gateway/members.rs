//! Workspace members over real HTTP: a member's role applies in its workspaces and
//! nowhere else, every member action is audited with the member and the workspace,
//! a workspace's webhooks get that workspace's events and no other's (a real hyper
//! listener on loopback), and the summary matches the policy and the usage.

use std::str::FromStr;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tollgate::{Decimal, KeySpec};

use crate::admin_api::{temp_path, webhook_receiver, Received};
use crate::support::{start, start_with, Answer, Options, Running};

const ADMIN: &str = "sk-admin-demo";
const VIC: &str = "sk-member-vic-viewer";
const EDDIE: &str = "sk-member-eddie-editor";
const ADA: &str = "sk-member-ada-admin";

fn member(id: &str, role: &str, secret: &str) -> Value {
    json!({"id": id, "role": role, "secret_sha256": KeySpec::digest_of(secret)})
}

/// ws-prod: vic (viewer), eddie (editor), ada (admin, owner); ws-staging: ada (viewer).
async fn with_members(gw: &Running) {
    gw.admin(
        Method::PATCH,
        "/admin/workspaces/ws-prod",
        ADMIN,
        Some(json!({
            "owner": "ada",
            "members": [member("vic", "viewer", VIC), member("eddie", "editor", EDDIE),
                        member("ada", "admin", ADA)],
        })),
    )
    .await;
    gw.admin(
        Method::PATCH,
        "/admin/workspaces/ws-staging",
        ADMIN,
        Some(json!({"members": [member("ada", "viewer", ADA)]})),
    )
    .await;
}

/// A 403 naming the member, its role there (null: none), the action and workspace.
fn assert_refused(answer: &Answer, actor: &str, role: Option<&str>, action: &str, ws: &str) {
    assert_eq!(
        answer.status,
        StatusCode::FORBIDDEN,
        "{actor} {action} {ws}: {}",
        answer.body
    );
    let error = &answer.body["error"];
    assert_eq!(error["code"], "admin_forbidden");
    assert_eq!(error["actor"], actor);
    assert_eq!(error["role"], json!(role));
    assert_eq!(error["action"], action);
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(actor) && message.contains(action),
        "{message}"
    );
    if !ws.is_empty() {
        assert_eq!(error["workspace"], ws);
        assert!(message.contains(ws), "{message}");
    }
}

fn ids(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v[field].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_viewer_reads_its_workspace_and_nothing_else() {
    let gw = start().await;
    with_members(&gw).await;

    let ws = gw
        .admin(Method::GET, "/admin/workspaces/ws-prod", VIC, None)
        .await;
    assert_eq!(ws["owner"], "ada");
    assert_eq!(ws["members"][0], json!({"id": "vic", "role": "viewer"}));
    assert!(
        !ws.to_string().contains(&KeySpec::digest_of(VIC)),
        "a member's digest is shown: {ws}"
    );
    gw.admin(Method::GET, "/admin/workspaces/ws-prod/requests", VIC, None)
        .await;
    let list = gw.admin(Method::GET, "/admin/workspaces", VIC, None).await;
    assert_eq!(ids(&list["data"], "id"), ["ws-prod"]);
    let usage = gw.admin(Method::GET, "/admin/usage", VIC, None).await;
    assert_eq!(ids(&usage["workspaces"], "id"), ["ws-prod"]);
    assert_eq!(ids(&usage["keys"], "id"), ["key-prod"]);
    assert!(usage.get("org").is_none() && usage.get("wallet_spent").is_none());

    for (path, action) in [
        ("/admin/workspaces/ws-staging", "workspace.read"),
        ("/admin/workspaces/ws-staging/requests", "requests.read"),
    ] {
        let answer = gw.send(Method::GET, path, VIC, None).await;
        assert_refused(&answer, "vic", None, action, "ws-staging");
    }
    // Every write, even in its own workspace.
    let writes = [
        (
            Method::PATCH,
            "/admin/workspaces/ws-prod",
            Some(json!({"limits": {"rpm": 1}})),
            "workspace.update",
        ),
        (
            Method::POST,
            "/admin/keys",
            Some(json!({"id": "k-vic", "workspace": "ws-prod"})),
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
        let answer = gw.send(method, path, VIC, body).await;
        assert_refused(&answer, "vic", Some("viewer"), action, "ws-prod");
    }
    let create = gw
        .send(
            Method::POST,
            "/admin/workspaces",
            VIC,
            Some(json!({"id": "ws-vic", "name": "vic"})),
        )
        .await;
    assert_refused(&create, "vic", None, "workspace.create", "");
    let delete = gw
        .send(Method::DELETE, "/admin/workspaces/ws-prod", VIC, None)
        .await;
    assert_refused(&delete, "vic", None, "workspace.delete", "ws-prod");
    // Nothing changed.
    let policy = gw.app.backend.policy();
    let doc = policy.document();
    assert_eq!(doc.workspaces.len(), 3);
    assert_eq!(doc.workspaces[0].limits.rpm, Some(600));
    assert_eq!(doc.keys.len(), 3);
    assert_eq!(
        doc.keys[0].secret_sha256,
        KeySpec::digest_of("sk-demo-prod")
    );
    let unknown = gw
        .send(Method::GET, "/admin/usage", "sk-member-nobody", None)
        .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_editor_updates_limits_in_its_workspace_only() {
    let gw = start().await;
    with_members(&gw).await;
    let updated = gw
        .admin(
            Method::PATCH,
            "/admin/workspaces/ws-prod",
            EDDIE,
            Some(json!({"limits": {"rpm": 100, "tpm": 50000}})),
        )
        .await;
    assert_eq!(updated["limits"]["rpm"], 100);
    assert_eq!(
        gw.app.backend.policy().document().workspaces[0].limits.tpm,
        Some(50000)
    );
    let other = gw
        .send(
            Method::PATCH,
            "/admin/workspaces/ws-staging",
            EDDIE,
            Some(json!({"limits": {"rpm": 100}})),
        )
        .await;
    assert_refused(&other, "eddie", None, "workspace.update", "ws-staging");
    assert_eq!(
        gw.app.backend.policy().document().workspaces[1].limits.rpm,
        Some(3)
    );
    // Who administers the workspace is for its admins.
    let promote = gw
        .send(
            Method::PATCH,
            "/admin/workspaces/ws-prod",
            EDDIE,
            Some(json!({"members": [member("eddie", "admin", EDDIE)]})),
        )
        .await;
    assert_refused(
        &promote,
        "eddie",
        Some("editor"),
        "workspace.members",
        "ws-prod",
    );
    let key = gw
        .send(
            Method::POST,
            "/admin/keys",
            EDDIE,
            Some(json!({"id": "k-eddie", "workspace": "ws-prod"})),
        )
        .await;
    assert_refused(&key, "eddie", Some("editor"), "key.create", "ws-prod");
}

#[tokio::test]
async fn a_workspace_admin_manages_keys_in_its_workspace_only_and_is_audited() {
    let path = temp_path("members-audit");
    let mut gw = start_with(Options {
        audit_log: Some(path.clone()),
        ..Options::default()
    })
    .await;
    with_members(&gw).await;

    let issued = gw
        .admin(
            Method::POST,
            "/admin/keys",
            ADA,
            Some(json!({"id": "k-ada", "workspace": "ws-prod"})),
        )
        .await;
    let secret = issued["secret"].as_str().unwrap().to_owned();
    assert_eq!(gw.chat(&secret, "gpt-4o-mini", Some(8)).await.status, 200);
    let rotated = gw
        .admin(Method::POST, "/admin/keys/key-prod/rotate", ADA, None)
        .await;
    assert_eq!(rotated["id"], "key-prod");
    assert_eq!(
        gw.chat("sk-demo-prod", "gpt-4o-mini", Some(8)).await.status,
        401,
        "the old secret is refused after a rotation without grace"
    );
    // Where ada is a viewer, and where it is nothing.
    let staging = gw
        .send(
            Method::POST,
            "/admin/keys",
            ADA,
            Some(json!({"id": "k-ada-2", "workspace": "ws-staging"})),
        )
        .await;
    assert_refused(&staging, "ada", Some("viewer"), "key.create", "ws-staging");
    let rotate = gw
        .send(Method::POST, "/admin/keys/key-staging/rotate", ADA, None)
        .await;
    assert_refused(&rotate, "ada", Some("viewer"), "key.rotate", "ws-staging");
    let revoke = gw
        .send(Method::POST, "/admin/keys/key-playground/revoke", ADA, None)
        .await;
    assert_refused(&revoke, "ada", None, "key.revoke", "ws-playground");
    gw.admin(Method::GET, "/admin/workspaces/ws-staging", ADA, None)
        .await;
    let list = gw.admin(Method::GET, "/admin/workspaces", ADA, None).await;
    assert_eq!(ids(&list["data"], "id"), ["ws-prod", "ws-staging"]);
    // And an admin of its workspace may change who administers it.
    gw.admin(
        Method::PATCH,
        "/admin/workspaces/ws-prod",
        ADA,
        Some(json!({"members": [member("ada", "admin", ADA)], "owner": "ada"})),
    )
    .await;
    let gone = gw
        .send(Method::GET, "/admin/workspaces/ws-prod", VIC, None)
        .await;
    assert_eq!(
        gone.status,
        StatusCode::UNAUTHORIZED,
        "vic is no member any more"
    );

    gw.shut_down().await;
    let text = std::fs::read_to_string(&path).expect("the audit log exists");
    std::fs::remove_file(&path).ok();
    assert!(
        !text.contains(&secret) && !text.contains(ADA),
        "a secret in the log"
    );
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let find = |wanted: Value| {
        let wanted = wanted.as_object().unwrap();
        lines
            .iter()
            .find(|line| wanted.iter().all(|(k, v)| &line[k] == v))
            .unwrap_or_else(|| panic!("no line with {wanted:?} in\n{text}"))
    };
    find(
        json!({"source": "admin", "actor": "ada", "credential": "member", "role": "admin",
                "workspace": "ws-prod", "action": "key.create", "target": "k-ada",
                "outcome": "ok"}),
    );
    find(
        json!({"source": "admin", "actor": "ada", "credential": "member", "role": "admin",
                "workspace": "ws-prod", "action": "key.rotate", "target": "key-prod",
                "outcome": "ok"}),
    );
    let refused = find(
        json!({"actor": "ada", "role": "viewer", "workspace": "ws-staging",
                "action": "key.create", "outcome": "refused", "status": 403}),
    );
    assert!(refused["reason"].as_str().unwrap().contains("ws-staging"));
    find(
        json!({"actor": "ada", "role": null, "workspace": "ws-playground",
                "action": "key.revoke", "outcome": "refused"}),
    );
    find(
        json!({"actor": "ada", "role": "viewer", "workspace": "ws-staging",
                "action": "workspace.read", "outcome": "ok"}),
    );
    find(
        json!({"actor": "ada", "role": "admin", "workspace": "ws-prod",
                "action": "workspace.members", "outcome": "ok"}),
    );
    find(
        json!({"actor": "demo-admin", "credential": "admin_key", "role": "admin",
                "workspace": "ws-prod", "action": "workspace.members", "outcome": "ok"}),
    );
    // The engine's reports name the member too.
    find(
        json!({"source": "engine", "action": "key_created", "actor": "ada",
                "workspace": "ws-prod", "target": "k-ada"}),
    );
}

/// Receive until `done` holds for what was received, or fail after 10 s.
async fn receive_until(
    received: &mut mpsc::UnboundedReceiver<Received>,
    got: &mut Vec<Value>,
    done: impl Fn(&[Value]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, received.recv()).await {
            Ok(Some(r)) => {
                assert_eq!(r.body["type"], r.event.as_str());
                got.push(r.body);
            }
            _ => panic!("webhooks still missing; got {got:?}"),
        }
    }
}

fn types(got: &[Value]) -> Vec<&str> {
    got.iter().map(|b| b["type"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_workspace_webhook_gets_its_workspace_events_and_none_of_another() {
    let (url_a, mut at_a) = webhook_receiver(0).await;
    let (url_b, mut at_b) = webhook_receiver(0).await;
    let gw = start().await;
    // One request of 0.0000252 crosses 50 % of each budget.
    let budget = json!({"limit": "0.0000504", "period": "day", "alert_thresholds": [50]});
    for (id, url) in [("ws-a", &url_a), ("ws-b", &url_b)] {
        gw.admin(
            Method::POST,
            "/admin/workspaces",
            ADMIN,
            Some(
                json!({"id": id, "name": id, "models": ["gpt-4o-mini"], "budget": budget,
                        "webhooks": [url]}),
            ),
        )
        .await;
    }
    // B's URL is added to A's list only later: B's receiver gets nothing of A's before.
    let mut secrets = Vec::new();
    for (key, ws) in [("key-b", "ws-b"), ("key-a", "ws-a")] {
        let issued = gw
            .admin(
                Method::POST,
                "/admin/keys",
                ADMIN,
                Some(json!({"id": key, "workspace": ws})),
            )
            .await;
        secrets.push(issued["secret"].as_str().unwrap().to_owned());
    }
    for secret in &secrets {
        assert_eq!(gw.chat(secret, "gpt-4o-mini", Some(40)).await.status, 200);
    }
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    receive_until(&mut at_a, &mut got_a, |got| {
        types(got).contains(&"budget_threshold")
    })
    .await;
    receive_until(&mut at_b, &mut got_b, |got| {
        types(got).contains(&"budget_threshold")
    })
    .await;
    // Both sinks have everything they will get: delivered counts them all.
    let hooks = &gw.events.webhooks;
    let deadline = Instant::now() + Duration::from_secs(5);
    while hooks.delivered() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    while let Ok(r) = at_a.try_recv() {
        got_a.push(r.body);
    }
    while let Ok(r) = at_b.try_recv() {
        got_b.push(r.body);
    }
    assert_eq!(
        types(&got_a),
        ["key_created", "budget_threshold"],
        "{got_a:?}"
    );
    assert_eq!(
        types(&got_b),
        ["key_created", "budget_threshold"],
        "{got_b:?}"
    );
    for (got, ws, key) in [(&got_a, "ws-a", "key-a"), (&got_b, "ws-b", "key-b")] {
        assert_eq!(
            got[0]["scope"],
            json!({"org": "acme", "workspace": ws, "key": key})
        );
        assert_eq!(got[0]["actor"], "demo-admin");
        assert_eq!(got[1]["scope"], json!({"org": "acme", "workspace": ws}));
        assert_eq!(
            (&got[1]["percent"], &got[1]["spent"]),
            (&json!(50), &json!("0.0000252"))
        );
    }
    assert_eq!(hooks.delivered(), 4);

    // A change to the list takes effect without a restart: A's URL now also gets B's.
    gw.admin(
        Method::PATCH,
        "/admin/workspaces/ws-b",
        ADMIN,
        Some(json!({"webhooks": [url_b, url_a]})),
    )
    .await;
    gw.admin(Method::POST, "/admin/keys/key-b/revoke", ADMIN, None)
        .await;
    let mut later = Vec::new();
    receive_until(&mut at_a, &mut later, |got| {
        types(got).contains(&"key_revoked")
    })
    .await;
    let revoked = later.iter().find(|b| b["type"] == "key_revoked").unwrap();
    assert_eq!(revoked["scope"]["key"], "key-b");
    assert!(
        later.iter().all(|b| b["scope"]["workspace"] == "ws-b"),
        "{later:?}"
    );
}

#[tokio::test]
async fn the_summary_matches_the_policy_and_the_usage() {
    let gw = start().await;
    with_members(&gw).await;
    assert_eq!(
        gw.chat("sk-demo-prod", "gpt-4o", Some(100)).await.status,
        200
    );
    assert_eq!(
        gw.chat("sk-demo-staging", "gpt-4o-mini", Some(100))
            .await
            .status,
        200
    );
    gw.admin(
        Method::POST,
        "/admin/keys/key-playground/revoke",
        ADMIN,
        None,
    )
    .await;

    let usage = gw.usage().await;
    let spent = |id: &str| {
        usage
            .workspaces
            .iter()
            .find(|w| w.id == id)
            .unwrap()
            .usage
            .current
            .cost
    };
    assert!(spent("ws-prod") > Decimal::ZERO && spent("ws-staging") > Decimal::ZERO);
    let dec = |v: &Value| Decimal::from_str(v.as_str().unwrap()).unwrap();

    let all = gw.admin(Method::GET, "/admin/summary", ADMIN, None).await;
    assert_eq!(all["workspaces"], 3);
    assert_eq!(all["production_workspaces"], 1);
    assert_eq!(all["active_keys"], 2, "key-playground is revoked");
    // ws-prod's 50 a month; ws-playground's budget is per day, ws-staging has none.
    assert_eq!(dec(&all["monthly_budget"]), Decimal::from(50));
    assert_eq!(all["workspaces_without_monthly_budget"], 2);
    assert_eq!(
        dec(&all["spend_this_period"]),
        spent("ws-prod") + spent("ws-staging") + spent("ws-playground")
    );
    assert_eq!(
        ids(&all["data"], "id"),
        ["ws-prod", "ws-staging", "ws-playground"]
    );
    assert_eq!(all["data"][0]["owner"], "ada");
    assert_eq!(all["data"][0]["members"], 3);
    assert_eq!(
        dec(&all["data"][1]["spent_this_period"]),
        spent("ws-staging")
    );

    // A member sees its own workspaces only.
    let vic = gw.admin(Method::GET, "/admin/summary", VIC, None).await;
    assert_eq!(vic["workspaces"], 1);
    assert_eq!(vic["active_keys"], 1);
    assert_eq!(dec(&vic["spend_this_period"]), spent("ws-prod"));
    assert_eq!(dec(&vic["monthly_budget"]), Decimal::from(50));
    let ada = gw.admin(Method::GET, "/admin/summary", ADA, None).await;
    assert_eq!(ids(&ada["data"], "id"), ["ws-prod", "ws-staging"]);
    assert_eq!(ada["production_workspaces"], 1);
    assert_eq!(
        dec(&ada["spend_this_period"]),
        spent("ws-prod") + spent("ws-staging")
    );
}

#[tokio::test]
async fn a_url_both_global_and_a_workspace_s_gets_each_event_once() {
    let (url, mut received) = webhook_receiver(0).await;
    let gw = start_with(Options {
        webhooks: vec![url.clone()],
        ..Options::default()
    })
    .await;
    gw.admin(
        Method::POST,
        "/admin/workspaces",
        ADMIN,
        Some(
            json!({"id": "ws-a", "name": "ws-a", "models": ["gpt-4o-mini"], "webhooks": [url],
                    "budget": {"limit": "0.0000504", "period": "day", "alert_thresholds": [50]}}),
        ),
    )
    .await;
    let issued = gw
        .admin(
            Method::POST,
            "/admin/keys",
            ADMIN,
            Some(json!({"id": "key-a", "workspace": "ws-a"})),
        )
        .await;
    let secret = issued["secret"].as_str().unwrap();
    assert_eq!(gw.chat(secret, "gpt-4o-mini", Some(40)).await.status, 200);
    let mut got = Vec::new();
    receive_until(&mut received, &mut got, |got| {
        types(got).contains(&"budget_threshold")
    })
    .await;
    let hooks = &gw.events.webhooks;
    let deadline = Instant::now() + Duration::from_secs(5);
    while hooks.delivered() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    while let Ok(r) = received.try_recv() {
        got.push(r.body);
    }
    assert_eq!(types(&got), ["key_created", "budget_threshold"], "{got:?}");
    assert_eq!(hooks.delivered(), 2);
}
