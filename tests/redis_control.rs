//! The control plane on the Redis backend: two instances share one server; what one
//! revokes or deletes, the other refuses at once; budget alerts fire once per
//! threshold across instances; usage read from Redis adds up.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::str::FromStr;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use redis_server::{require_redis, RedisServer};
use rust_decimal::Decimal;
use tollgate::{
    ChannelSink, DenialReason, Event, EventKind, NewKey, Policy, RedisConfig, RedisEngine, Request,
    Usage,
};

const POLICY: &str = r#"
    [org]
    id = "acme"

    [[models]]
    name = "m"
    input_per_million = "1"
    output_per_million = "1"

    [[workspaces]]
    id = "ws1"
    name = "one"
    models = ["m"]
    budget = { limit = "1", period = "month", alert_thresholds = [50, 80, 100] }

    [[workspaces]]
    id = "ws2"
    name = "two"
    models = ["m"]

    [[keys]]
    id = "k1"
    workspace = "ws1"
    secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

    [[keys]]
    id = "k2"
    workspace = "ws1"
    secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a09"

    [[keys]]
    id = "k3"
    workspace = "ws2"
    secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0a"
"#;

async fn instance(server: &RedisServer) -> (RedisEngine, Receiver<Event>) {
    let (sink, events) = ChannelSink::new(1024);
    let config = RedisConfig {
        events: Some(Arc::new(sink)),
        ..RedisConfig::default()
    };
    let engine = RedisEngine::connect(
        &server.url(),
        Policy::from_toml_str(POLICY).unwrap(),
        config,
    )
    .await
    .unwrap();
    (engine, events)
}

/// Spend `tokens` (at $1 per million) on `key` through `engine`.
async fn spend(engine: &RedisEngine, key: &str, tokens: u32) -> Decimal {
    let request = Request::with_key_id(key, "m")
        .input_tokens(tokens)
        .max_output_tokens(0);
    let reservation = engine.check_and_reserve(&request).await.unwrap();
    engine
        .commit_usage(reservation, Usage::new(tokens, 0))
        .await
        .unwrap()
        .cost()
}

fn with(secret: &str) -> Request<'_> {
    Request::with_secret(secret, "m")
        .input_tokens(1)
        .max_output_tokens(0)
}

async fn denied(engine: &RedisEngine, key: &str) -> DenialReason {
    let request = Request::with_key_id(key, "m")
        .input_tokens(1)
        .max_output_tokens(0);
    engine.check_and_reserve(&request).await.unwrap_err().reason
}

#[tokio::test(flavor = "current_thread")]
async fn revocation_and_deletion_reach_every_instance_at_once() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let (a, a_events) = instance(&server).await;
    let (b, _) = instance(&server).await;
    spend(&b, "k1", 10).await;
    spend(&b, "k3", 10).await;

    a.revoke_key("k1", Some("alice")).await.unwrap();
    // B may not have applied the new policy version yet: Redis refuses k1 anyway.
    assert_eq!(denied(&a, "k1").await, DenialReason::KeyRevoked);
    assert_eq!(denied(&b, "k1").await, DenialReason::KeyRevoked);
    spend(&b, "k2", 10).await; // the workspace's other key is untouched
    let event = a_events.try_recv().unwrap();
    assert_eq!(event.actor.as_deref(), Some("alice"));
    assert!(
        matches!(event.kind, EventKind::KeyRevoked { ref scope } if scope.key.as_deref() == Some("k1"))
    );

    let ws2 = a.workspace_key("ws2");
    assert_eq!(server.cli(&["hget", &ws2, "spent"]), "10000000");
    a.delete_workspace("ws2", None).await.unwrap();
    assert_eq!(denied(&a, "k3").await, DenialReason::UnknownKey);
    assert_eq!(denied(&b, "k3").await, DenialReason::UnknownKey);
    // Its counters are gone; only the tombstone is left, in the workspace's flags
    // (which never expire), with the workspace's next generation.
    assert_eq!(server.cli(&["exists", &ws2]), "0");
    assert_eq!(server.cli(&["exists", "tollgate:v2:{ws:ws2}:key:k3"]), "0");
    let flags = "tollgate:v2:{ws:ws2}:flags";
    assert_eq!(server.cli(&["hget", flags, "deleted"]), "1");
    assert_eq!(server.cli(&["hget", flags, "gen"]), "1");
    assert_eq!(server.cli(&["pttl", flags]), "-1");

    // Re-created, it starts from zero and its keys work again.
    a.apply_policy(Policy::from_toml_str(POLICY).unwrap())
        .await
        .unwrap();
    assert_eq!(server.cli(&["hget", flags, "deleted"]), "");
    assert_eq!(
        spend(&a, "k3", 5).await,
        Decimal::from_str("0.000005").unwrap()
    );
    assert_eq!(server.cli(&["hget", &ws2, "spent"]), "5000000");
    // The re-applied file says k1 is active again: reactivated everywhere.
    spend(&b, "k1", 1).await;
}

#[tokio::test(flavor = "current_thread")]
async fn keys_created_and_rotated_on_one_instance() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let (a, _) = instance(&server).await;
    let issued = a.create_key(NewKey::new("k9", "ws1"), None).await.unwrap();
    assert!(issued.secret.starts_with("sk-tg-"));
    let r = a.check_and_reserve(&with(&issued.secret)).await.unwrap();
    a.commit_usage(r, Usage::new(1, 0)).await.unwrap();

    let rotated = a.rotate_key("k9", Duration::ZERO, None).await.unwrap();
    assert_ne!(rotated.secret, issued.secret);
    let old = a
        .check_and_reserve(&with(&issued.secret))
        .await
        .unwrap_err();
    assert_eq!(old.reason, DenialReason::UnknownKey);
    let r = a.check_and_reserve(&with(&rotated.secret)).await.unwrap();
    a.commit_usage(r, Usage::new(1, 0)).await.unwrap();
    // Same key, same counters.
    assert_eq!(
        server.cli(&["hget", "tollgate:v2:{ws:ws1}:key:k9", "req"]),
        "2"
    );

    let grace = a
        .rotate_key("k9", Duration::from_secs(3600), None)
        .await
        .unwrap();
    // The old secret is still in its grace period; both are the same key.
    let old = a.check_and_reserve(&with(&rotated.secret)).await.unwrap();
    a.commit_usage(old, Usage::new(1, 0)).await.unwrap();
    let new = a.check_and_reserve(&with(&grace.secret)).await.unwrap();
    a.commit_usage(new, Usage::new(1, 0)).await.unwrap();
    assert_eq!(
        server.cli(&["hget", "tollgate:v2:{ws:ws1}:key:k9", "req"]),
        "4"
    );

    // Invalid operations are typed errors and change nothing.
    let before = a.policy().document().clone();
    assert!(a.create_key(NewKey::new("k9", "ws1"), None).await.is_err());
    assert!(a.revoke_key("nope", None).await.is_err());
    assert_eq!(a.policy().document(), &before);
}

#[tokio::test(flavor = "current_thread")]
async fn budget_alerts_fire_once_across_instances_and_usage_adds_up() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let (a, a_events) = instance(&server).await;
    let (b, b_events) = instance(&server).await;
    let mut total = Decimal::ZERO;
    // $1 budget: 0.3 + 0.3 (60 %: 50 fires), + 0.1 + 0.1 (80 fires), + 0.1 + 0.1 (100 %:
    // the threshold and exhaustion fire), on alternating instances.
    for (engine, key, tokens) in [
        (&a, "k1", 300_000),
        (&b, "k2", 300_000),
        (&a, "k1", 100_000),
        (&b, "k1", 100_000),
        (&a, "k2", 100_000),
        (&b, "k2", 100_000),
    ] {
        total += spend(engine, key, tokens).await;
    }
    let kinds: Vec<String> = a_events
        .try_iter()
        .chain(b_events.try_iter())
        .map(|e| match e.kind {
            EventKind::BudgetThreshold { percent, scope, .. } => {
                assert_eq!(scope.workspace.as_deref(), Some("ws1"));
                format!("threshold {percent}")
            }
            EventKind::BudgetExhausted { .. } => "exhausted".into(),
            other => format!("{other:?}"),
        })
        .collect();
    let mut sorted = kinds.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["exhausted", "threshold 100", "threshold 50", "threshold 80"],
        "{kinds:?}"
    );

    // Usage from Redis covers both instances' traffic and adds up across scopes.
    let usage = a.usage().await.unwrap();
    assert_eq!(
        usage,
        b.usage().await.unwrap().clone_with_time(usage.taken_at)
    );
    let ws1 = &usage.workspaces[0];
    assert_eq!(ws1.usage.current.cost, total);
    assert_eq!(ws1.usage.current.requests, 6);
    assert_eq!(ws1.usage.current.held, Decimal::ZERO);
    let keys: Decimal = usage.keys.iter().map(|k| k.usage.current.cost).sum();
    assert_eq!(keys, total);
    assert_eq!(ws1.models[0].usage.current.cost, total);
    assert_eq!(usage.org.current.cost, total);
    assert_eq!(usage.org.current.input_tokens, 1_000_000);
}

trait WithTime {
    fn clone_with_time(&self, at: tollgate::Timestamp) -> Self;
}

impl WithTime for tollgate::UsageSnapshot {
    fn clone_with_time(&self, at: tollgate::Timestamp) -> Self {
        let mut copy = self.clone();
        copy.taken_at = at;
        copy
    }
}

#[tokio::test(flavor = "current_thread")]
async fn lowered_limits_count_what_was_already_used() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let (a, _) = instance(&server).await;
    let limits = |rpm, tpm| tollgate::LimitsSpec {
        rpm: Some(rpm),
        tpm: Some(tpm),
        ..tollgate::LimitsSpec::default()
    };
    let update = |rpm, tpm| tollgate::WorkspaceUpdate {
        limits: Some(limits(rpm, tpm)),
        ..tollgate::WorkspaceUpdate::default()
    };
    a.update_workspace("ws2", update(100, 10_000), None)
        .await
        .unwrap();
    for _ in 0..4 {
        spend(&a, "k3", 250).await; // 4 requests, 1,000 tokens this minute
    }
    // rpm 100 → 3: four requests were made, so the next is refused (a GCRA backlog
    // left in the old limit's time would read as 0.12 requests and admit it).
    a.update_workspace("ws2", update(3, 10_000), None)
        .await
        .unwrap();
    assert_eq!(denied(&a, "k3").await, DenialReason::RequestsPerMinute);
    // tpm 10,000 → 1,100 with 1,000 used: 200 more do not fit, 50 do.
    a.update_workspace("ws2", update(100, 1_100), None)
        .await
        .unwrap();
    let big = Request::with_key_id("k3", "m")
        .input_tokens(200)
        .max_output_tokens(0);
    let refused = a.check_and_reserve(&big).await.unwrap_err();
    assert_eq!(refused.reason, DenialReason::TokensPerMinute);
    spend(&a, "k3", 50).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_changed_budget_period_starts_at_once_and_keeps_the_spend() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let (a, _) = instance(&server).await;
    let spent = spend(&a, "k1", 400_000).await; // $0.40 of the $1/month budget
    let update = tollgate::WorkspaceUpdate {
        budget: Some(Some(tollgate::BudgetSpec::new(
            Decimal::from_str("0.5").unwrap(),
            tollgate::BudgetPeriod::Day,
        ))),
        ..tollgate::WorkspaceUpdate::default()
    };
    a.update_workspace("ws1", update, None).await.unwrap();
    // $0.40 spent counts against today's $0.50: $0.20 more does not fit.
    let request = Request::with_key_id("k1", "m")
        .input_tokens(200_000)
        .max_output_tokens(0);
    let refused = a.check_and_reserve(&request).await.unwrap_err();
    assert_eq!(refused.reason, DenialReason::Budget);
    let ws = a.workspace_key("ws1");
    let field = |f: &str| server.cli(&["hget", &ws, f]).parse::<i64>().unwrap();
    let day = 86_400_000_000;
    assert_eq!(field("ps") % day, 0, "a day period starts at midnight");
    assert_eq!(field("pe") - field("ps"), day);
    assert_eq!(Decimal::new(field("spent"), 12), spent);
    let usage = a.usage().await.unwrap();
    assert_eq!(usage.workspaces[0].usage.current.cost, spent);
}

/// Traffic from two instances while one of them revokes keys and edits limits: no
/// request that started after a revocation returned is admitted on that key, and Redis
/// counts exactly the receipts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_during_revocations_and_edits_keeps_every_promise() {
    use std::sync::atomic::{AtomicBool, Ordering};
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let (a, _) = instance(&server).await;
    let (b, _) = instance(&server).await;
    let keys = ["k1", "k2", "k3"];
    let revoked: Arc<[AtomicBool; 3]> = Arc::new(Default::default());
    let mut workers = Vec::new();
    for (n, engine) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        let revoked = Arc::clone(&revoked);
        workers.push(tokio::spawn(async move {
            let (mut total, mut violations, mut admitted, mut refused) = (Decimal::ZERO, 0, 0, 0);
            for i in 0..150u32 {
                let k = (i as usize + n) % 3;
                let was_revoked = revoked[k].load(Ordering::SeqCst);
                let request = Request::with_key_id(keys[k], "m")
                    .input_tokens(10 + i % 7)
                    .max_output_tokens(20);
                match engine.check_and_reserve(&request).await {
                    Ok(r) => {
                        violations += usize::from(was_revoked);
                        admitted += 1;
                        let receipt = engine.commit_usage(r, Usage::new(10 + i % 7, i % 20)).await;
                        total += receipt.unwrap().cost();
                    }
                    Err(d) => {
                        refused += usize::from(d.reason == DenialReason::KeyRevoked);
                        assert!(
                            matches!(
                                d.reason,
                                DenialReason::KeyRevoked | DenialReason::TokensPerMinute
                            ),
                            "{d:?}"
                        );
                    }
                }
            }
            (total, violations, admitted, refused)
        }));
    }
    // Revoke k1 and k3 while traffic flows, and swing the workspace's TPM.
    for (step, key) in [(0, "k1"), (1, "k3")] {
        let update = tollgate::WorkspaceUpdate {
            limits: Some(tollgate::LimitsSpec {
                tpm: Some(if step == 0 { 5_000 } else { 1_000_000 }),
                ..tollgate::LimitsSpec::default()
            }),
            ..tollgate::WorkspaceUpdate::default()
        };
        a.update_workspace("ws1", update, None).await.unwrap();
        tokio::task::yield_now().await;
        a.revoke_key(key, None).await.unwrap();
        revoked[if key == "k1" { 0 } else { 2 }].store(true, Ordering::SeqCst);
    }
    let (mut total, mut violations, mut admitted, mut refused) = (Decimal::ZERO, 0, 0, 0);
    for worker in workers {
        let (t, v, n, r) = worker.await.unwrap();
        total += t;
        violations += v;
        admitted += n;
        refused += r;
    }
    assert_eq!(
        violations, 0,
        "admitted on a key after its revocation returned"
    );
    assert!(refused > 0, "the revocations landed while traffic flowed");
    assert!(admitted > 100, "only {admitted} admitted");
    let usage = a.usage().await.unwrap();
    assert_eq!(usage.org.current.cost, total);
    assert_eq!(usage.org.current.held, Decimal::ZERO);
    let ws: Decimal = usage.workspaces.iter().map(|w| w.usage.current.cost).sum();
    assert_eq!(ws, total);
    // Both instances refuse the revoked keys now, whatever their policy says.
    assert_eq!(denied(&b, "k1").await, DenialReason::KeyRevoked);
    assert_eq!(denied(&b, "k3").await, DenialReason::KeyRevoked);
}
