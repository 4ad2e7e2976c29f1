//! One policy for every instance: `RedisEngine` instances against one real
//! `redis-server` share one versioned policy document. A change made on one reaches
//! the others within a second (announced by pub/sub, polled as the fallback),
//! concurrent changes all land (compare-and-set, retried), an instance started later
//! runs the current version, an AOF-persisted Redis restarted loses no acknowledged
//! change, and while Redis is down changes are refused.
//!
//! Propagation is measured, not slept on: each test polls the other instance every
//! few milliseconds until the change shows, and fails if that takes over a second.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_server::{require_redis, RedisServer};
use tollgate::{
    ChannelSink, DenialReason, Error, Event, EventKind, MemberRole, MemberSpec, NewKey, Policy,
    PolicyError, Problem, RedisConfig, RedisEngine, Request, StoreErrorKind, WorkspaceStatus,
    WorkspaceUpdate,
};

const POLICY: &str = r#"
    [org]
    id = "acme"
    max_keys_per_workspace = 100

    [[models]]
    name = "m"
    input_per_million = "1"
    output_per_million = "1"

    [[workspaces]]
    id = "ws1"
    name = "one"
    models = ["m"]

    [[workspaces]]
    id = "ws2"
    name = "two"
    models = ["m"]

    [[keys]]
    id = "k1"
    workspace = "ws1"
    secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" # "test"

    [[keys]]
    id = "k2"
    workspace = "ws2"
    secret_sha256 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752" # "test2"
"#;

/// The longest a change may take to reach another instance.
const PROPAGATION: Duration = Duration::from_secs(1);

struct Instance {
    engine: RedisEngine,
    events: Receiver<Event>,
}

async fn instance(server: &RedisServer) -> Instance {
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
    Instance { engine, events }
}

async fn three(server: &RedisServer) -> [Instance; 3] {
    [
        instance(server).await,
        instance(server).await,
        instance(server).await,
    ]
}

/// What `engine` decides for a request with `secret` now (a hold taken is dropped).
async fn decide(engine: &RedisEngine, secret: &str) -> Result<(), DenialReason> {
    let request = Request::with_secret(secret, "m")
        .input_tokens(1)
        .max_output_tokens(0);
    engine
        .check_and_reserve(&request)
        .await
        .map(drop)
        .map_err(|d| d.reason)
}

/// Poll `engine` until it decides `expected` for `secret`; how long that took.
/// Fails if it takes longer than [`PROPAGATION`].
async fn until(
    engine: &RedisEngine,
    secret: &str,
    expected: Result<(), DenialReason>,
    since: Instant,
) -> Duration {
    loop {
        let decided = decide(engine, secret).await;
        if decided == expected {
            return since.elapsed();
        }
        assert!(
            since.elapsed() <= PROPAGATION,
            "not {expected:?} within {PROPAGATION:?}: still {decided:?} (policy version {})",
            engine.policy_version()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn skip() -> bool {
    if require_redis() {
        return false;
    }
    eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
    true
}

#[tokio::test(flavor = "current_thread")]
async fn a_key_created_on_a_authenticates_on_b_and_c_within_a_second() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let [a, b, c] = three(&server).await;
    let issued = a
        .engine
        .create_key(NewKey::new("k9", "ws1"), Some("alice"))
        .await
        .unwrap();
    let created = Instant::now();
    assert_eq!(decide(&a.engine, &issued.secret).await, Ok(()));
    let on_b = until(&b.engine, &issued.secret, Ok(()), created).await;
    let on_c = until(&c.engine, &issued.secret, Ok(()), created).await;
    eprintln!("a key created on A authenticated on B after {on_b:?}, on C after {on_c:?}");
    assert_eq!(b.engine.policy_version(), a.engine.policy_version());

    // Reported once, by A; B and C applied the version without reporting it.
    let event = a.events.try_recv().unwrap();
    assert_eq!(event.actor.as_deref(), Some("alice"));
    assert!(matches!(event.kind, EventKind::KeyCreated { .. }));
    let reported = |events: &Receiver<Event>| {
        events
            .try_iter()
            .filter(|e| matches!(e.kind, EventKind::KeyCreated { .. }))
            .count()
    };
    assert_eq!((reported(&b.events), reported(&c.events)), (0, 0));
    // Only the digest is in Redis.
    let stored = server.cli(&["hget", "tollgate:v2:{policy}:doc", "document"]);
    assert!(!stored.contains(&issued.secret));
    assert!(stored.contains(&tollgate::KeySpec::digest_of(&issued.secret)));
}

#[tokio::test(flavor = "current_thread")]
async fn a_rotated_key_s_old_secret_is_refused_everywhere_after_the_grace() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let [a, b, c] = three(&server).await;

    // Grace 0: the old secret is refused on B and C as soon as they apply it.
    let rotated = a
        .engine
        .rotate_key("k1", Duration::ZERO, None)
        .await
        .unwrap();
    let at = Instant::now();
    assert_eq!(
        decide(&a.engine, "test").await,
        Err(DenialReason::UnknownKey)
    );
    let on_b = until(&b.engine, "test", Err(DenialReason::UnknownKey), at).await;
    let on_c = until(&c.engine, "test", Err(DenialReason::UnknownKey), at).await;
    eprintln!("old secret refused on B after {on_b:?}, on C after {on_c:?}");
    assert_eq!(decide(&b.engine, &rotated.secret).await, Ok(()));
    assert_eq!(decide(&c.engine, &rotated.secret).await, Ok(()));

    // Grace 600 ms, measured on one clock (Redis TIME): B and C accept the old
    // secret while it lasts and refuse it after, at the same instant as A.
    let grace = Duration::from_millis(600);
    let again = a.engine.rotate_key("k1", grace, None).await.unwrap();
    let at = Instant::now();
    let on_b = until(&b.engine, &again.secret, Ok(()), at).await;
    assert!(
        on_b < grace,
        "B applied the rotation after the grace had passed"
    );
    assert_eq!(
        decide(&b.engine, &rotated.secret).await,
        Ok(()),
        "within the grace"
    );
    assert_eq!(
        decide(&c.engine, &rotated.secret).await,
        Ok(()),
        "within the grace"
    );
    let refused = loop {
        let (on_a, on_b, on_c) = (
            decide(&a.engine, &rotated.secret).await,
            decide(&b.engine, &rotated.secret).await,
            decide(&c.engine, &rotated.secret).await,
        );
        if on_b.is_err() || on_c.is_err() || on_a.is_err() {
            break at.elapsed();
        }
        assert!(
            at.elapsed() < grace * 2,
            "the old secret outlived its grace"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        refused + Duration::from_millis(50) >= grace,
        "refused after {refused:?}, before the {grace:?} grace"
    );
    // Moments later every instance refuses it (one clock, not three).
    tokio::time::sleep(Duration::from_millis(20)).await;
    for engine in [&a.engine, &b.engine, &c.engine] {
        assert_eq!(
            decide(engine, &rotated.secret).await,
            Err(DenialReason::UnknownKey)
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_workspace_suspended_on_b_is_refused_on_c() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let [a, b, c] = three(&server).await;
    let suspend = WorkspaceUpdate {
        status: Some(WorkspaceStatus::Suspended),
        ..WorkspaceUpdate::default()
    };
    b.engine
        .update_workspace("ws1", suspend, Some("bob"))
        .await
        .unwrap();
    let at = Instant::now();
    let on_c = until(
        &c.engine,
        "test",
        Err(DenialReason::WorkspaceNotActive(WorkspaceStatus::Suspended)),
        at,
    )
    .await;
    let on_a = until(
        &a.engine,
        "test",
        Err(DenialReason::WorkspaceNotActive(WorkspaceStatus::Suspended)),
        at,
    )
    .await;
    eprintln!("suspension on B reached C after {on_c:?}, A after {on_a:?}");
    let denial = c
        .engine
        .check_and_reserve(&Request::with_secret("test", "m").input_tokens(1))
        .await
        .unwrap_err();
    assert_eq!(denial.http_status(), 403);
    assert_eq!(decide(&c.engine, "test2").await, Ok(()), "ws2 untouched");
}

/// Owners, members and webhooks travel with the document: set on one instance, the
/// others run them, and an instance started afterwards loads them from Redis.
#[tokio::test(flavor = "current_thread")]
async fn members_and_webhooks_set_on_a_reach_b_and_a_late_instance() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let [a, b, _] = three(&server).await;
    let members = vec![
        MemberSpec::new("ada@example.com", MemberRole::Admin, "ada-secret"),
        MemberSpec::new("vic", MemberRole::Viewer, "vic-secret"),
    ];
    let update = WorkspaceUpdate {
        owner: Some(Some("ada@example.com".into())),
        members: Some(members.clone()),
        webhooks: Some(vec!["http://127.0.0.1:9/ws1".into()]),
        ..WorkspaceUpdate::default()
    };
    a.engine
        .update_workspace("ws1", update, Some("ops"))
        .await
        .unwrap();
    let at = Instant::now();
    let ws1 = |engine: &RedisEngine| engine.policy().document().workspaces[0].clone();
    while ws1(&b.engine).members != members {
        assert!(
            at.elapsed() <= PROPAGATION,
            "members not on B within a second"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let on_b = ws1(&b.engine);
    assert_eq!(on_b.owner.as_deref(), Some("ada@example.com"));
    assert_eq!(on_b.webhooks, ["http://127.0.0.1:9/ws1"]);
    assert_eq!(ws1(&instance(&server).await.engine), on_b);
    // A bad member is refused everywhere, and changes nothing.
    let bad = WorkspaceUpdate {
        owner: Some(Some("mallory".into())),
        ..WorkspaceUpdate::default()
    };
    let refused = b
        .engine
        .update_workspace("ws1", bad, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::Policy(PolicyError::Invalid { issues })
            if issues[0].path == "workspaces[0].owner" && issues[0].problem == Problem::UnknownMember),
        "{refused}"
    );
    assert_eq!(ws1(&a.engine), on_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_edits_over_three_instances_all_land() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let instances = three(&server).await;
    let engines: Vec<RedisEngine> = instances.iter().map(|i| i.engine.clone()).collect();
    let start = engines[0].policy_version();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..50 {
        let engine = engines[n % 3].clone();
        tasks.spawn(async move {
            let workspace = if n % 2 == 0 { "ws1" } else { "ws2" };
            engine
                .create_key(NewKey::new(format!("c{n}"), workspace), None)
                .await
                .map(|issued| (n, issued.secret))
        });
    }
    let mut secrets = Vec::new();
    while let Some(done) = tasks.join_next().await {
        secrets.push(done.unwrap().expect("every edit lands"));
    }
    // A fourth instance reads the final document: it holds each of the 50 keys, and
    // its version counts each edit once.
    let d = instance(&server).await;
    assert_eq!(d.engine.policy_version(), start + 50);
    let keys = d.engine.policy().document().keys.clone();
    for (n, secret) in &secrets {
        let key = keys.iter().find(|k| k.id == format!("c{n}"));
        assert!(key.is_some(), "edit c{n} was lost");
        assert_eq!(decide(&d.engine, secret).await, Ok(()));
    }
    assert_eq!(keys.len(), 52);
    // And every instance converges on it.
    let at = Instant::now();
    for engine in &engines {
        while engine.policy_version() != start + 50 {
            assert!(at.elapsed() <= PROPAGATION, "an instance did not converge");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(engine.policy().document(), d.engine.policy().document());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_instance_started_afterwards_runs_the_current_policy() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let a = instance(&server).await;
    a.engine.revoke_key("k1", None).await.unwrap();
    let issued = a
        .engine
        .create_key(NewKey::new("k9", "ws2"), None)
        .await
        .unwrap();
    // Started with the seed policy, where k1 is active and k9 does not exist: Redis
    // has the truth, and the seed is not applied.
    let late = instance(&server).await;
    assert_eq!(late.engine.policy_version(), a.engine.policy_version());
    assert_eq!(
        late.engine.policy().document(),
        a.engine.policy().document()
    );
    assert_eq!(
        decide(&late.engine, "test").await,
        Err(DenialReason::KeyRevoked)
    );
    assert_eq!(decide(&late.engine, &issued.secret).await, Ok(()));
    let mut versions = late.engine.watch_policy_version();
    assert_eq!(*versions.borrow_and_update(), 3, "seed, revoke, create");

    // It applies later versions, and says so.
    a.engine.revoke_key("k9", None).await.unwrap();
    tokio::time::timeout(PROPAGATION, versions.changed())
        .await
        .expect("version 4 applied within a second")
        .unwrap();
    assert_eq!(*versions.borrow(), 4);
}

#[tokio::test(flavor = "current_thread")]
async fn a_change_that_fails_validation_changes_nothing_anywhere() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let [a, b, _] = three(&server).await;
    let before = server.cli(&["hget", "tollgate:v2:{policy}:doc", "version"]);
    let error = a
        .engine
        .create_key(NewKey::new("k9", "no-such-workspace"), None)
        .await
        .unwrap_err();
    let Error::Policy(PolicyError::Invalid { issues }) = error else {
        panic!("expected a validation error, got {error:?}");
    };
    assert_eq!(issues[0].problem, Problem::UnknownWorkspace);
    assert_eq!(
        server.cli(&["hget", "tollgate:v2:{policy}:doc", "version"]),
        before
    );
    assert_eq!(b.engine.refresh_policy().await.unwrap(), 1);
    assert!(a.events.try_recv().is_err(), "nothing to report");
}

#[tokio::test(flavor = "current_thread")]
async fn a_redis_restart_with_aof_loses_no_acknowledged_change() {
    if skip() {
        return;
    }
    // What the README asks operators to run: AOF on, fsync on every write.
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let a = instance(&server).await;
    a.engine.revoke_key("k1", None).await.unwrap();
    let issued = a
        .engine
        .create_key(NewKey::new("k9", "ws1"), None)
        .await
        .unwrap();
    let acknowledged = a.engine.policy_version();

    server.kill(); // SIGKILL: nothing is flushed on the way out
    server.restart();

    let b = instance(&server).await;
    assert_eq!(b.engine.policy_version(), acknowledged);
    assert_eq!(
        decide(&b.engine, "test").await,
        Err(DenialReason::KeyRevoked)
    );
    assert_eq!(decide(&b.engine, &issued.secret).await, Ok(()));
    // A reconnects and keeps changing the same document.
    let mut tries = 0;
    while let Err(error) = a.engine.revoke_key("k9", None).await {
        tries += 1;
        assert!(tries < 50, "A never reconnected: {error}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.engine.policy_version(), acknowledged + 1);
    let at = Instant::now();
    until(&b.engine, &issued.secret, Err(DenialReason::KeyRevoked), at).await;
}

#[tokio::test(flavor = "current_thread")]
async fn while_redis_is_down_changes_are_refused_and_redis_gets_the_policy_back() {
    if skip() {
        return;
    }
    let mut server = RedisServer::start();
    let a = instance(&server).await;
    a.engine.revoke_key("k1", None).await.unwrap();
    let version = a.engine.policy_version();

    server.kill();
    let error = a.engine.revoke_key("k2", None).await.unwrap_err();
    assert!(
        matches!(&error, Error::Store(e) if e.kind == StoreErrorKind::Transient),
        "{error:?}"
    );
    assert_eq!(a.engine.policy_version(), version, "nothing changed");
    assert_eq!(
        decide(&a.engine, "test2").await,
        Err(DenialReason::StoreUnavailable(StoreErrorKind::Transient)),
        "Redis is down: fail closed"
    );

    // Redis comes back empty (no persistence): the instance writes back the policy
    // it runs, under its version, instead of anyone starting over from a seed.
    server.restart();
    let at = Instant::now();
    loop {
        let stored = server.cli(&["hget", "tollgate:v2:{policy}:doc", "version"]);
        if stored == version.to_string() {
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(5),
            "not written back: {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = instance(&server).await;
    assert_eq!(
        decide(&b.engine, "test").await,
        Err(DenialReason::KeyRevoked)
    );
    a.engine.revoke_key("k2", None).await.unwrap();
    assert_eq!(a.engine.policy_version(), version + 1);
}

#[tokio::test(flavor = "current_thread")]
async fn polling_catches_an_announcement_the_subscription_missed() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let [a, b, _] = three(&server).await;
    // Drop every subscriber's connection: the next announcement reaches nobody.
    // (A created key needs the new document: no Redis flag tells B about it.)
    server.cli(&["client", "kill", "type", "pubsub"]);
    let first = a
        .engine
        .create_key(NewKey::new("k8", "ws1"), None)
        .await
        .unwrap();
    let at = Instant::now();
    let on_b = until(&b.engine, &first.secret, Ok(()), at).await;
    eprintln!("a change announced to nobody reached B after {on_b:?} (poll or resubscription)");
    // Subscribed again: the next change is announced at once.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = a
        .engine
        .create_key(NewKey::new("k9", "ws1"), None)
        .await
        .unwrap();
    let at = Instant::now();
    let on_b = until(&b.engine, &second.secret, Ok(()), at).await;
    eprintln!("after resubscribing, a change reached B after {on_b:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_corrupt_document_in_redis_is_refused_never_run() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let a = instance(&server).await;
    // Someone writes a newer version that is not a policy tollgate can run.
    let doc = "tollgate:v2:{policy}:doc";
    server.cli(&["hset", doc, "version", "7", "document", "{\"org\": 12"]);

    // A keeps the version it runs, and says why.
    a.engine.refresh_policy().await.unwrap_err();
    assert_eq!(a.engine.policy_version(), 1);
    assert_eq!(decide(&a.engine, "test").await, Ok(()));
    let at = Instant::now();
    while a.engine.last_store_error().is_none() {
        assert!(at.elapsed() < PROPAGATION, "the follower never reported it");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A new instance refuses to start on it, by name.
    let error = RedisEngine::connect(
        &server.url(),
        Policy::from_toml_str(POLICY).unwrap(),
        RedisConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            &error,
            Error::Policy(PolicyError::Persist(tollgate::PolicyStoreError::CorruptInRedis { key, .. }))
                if key == doc
        ),
        "{error:?}"
    );
    // And a change on top of it is refused too: nothing is written over it.
    a.engine.revoke_key("k1", None).await.unwrap_err();
    assert_eq!(server.cli(&["hget", doc, "version"]), "7");
}

#[tokio::test(flavor = "current_thread")]
async fn redis_going_back_a_version_gets_the_newest_back_from_the_instances() {
    if skip() {
        return;
    }
    let server = RedisServer::start();
    let [a, b, _] = three(&server).await;
    let doc = "tollgate:v2:{policy}:doc";
    let field = |name: &str| server.cli(&["hget", doc, name]);
    a.engine.revoke_key("k1", None).await.unwrap(); // version 2
    let old = (field("version"), field("document"), field("sha256"));
    let issued = a
        .engine
        .create_key(NewKey::new("k9", "ws1"), None)
        .await
        .unwrap(); // version 3
    let newest = (field("version"), field("document"), field("sha256"));
    until(&b.engine, &issued.secret, Ok(()), Instant::now()).await;

    // A failover to a replica that had not seen version 3: Redis holds version 2.
    server.cli(&[
        "hset", doc, "version", &old.0, "document", &old.1, "sha256", &old.2,
    ]);
    let at = Instant::now();
    while (field("version"), field("document"), field("sha256")) != newest {
        assert!(
            at.elapsed() <= PROPAGATION,
            "version 3 was not written back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("version 3 written back after {:?}", at.elapsed());
    assert_eq!(decide(&b.engine, &issued.secret).await, Ok(()));

    // The same number issued again with another document (writes lost, then a new
    // change): Redis is the truth, every instance runs its document.
    server.cli(&[
        "hset", doc, "version", "3", "document", &old.1, "sha256", &old.2,
    ]);
    let at = Instant::now();
    until(&a.engine, &issued.secret, Err(DenialReason::UnknownKey), at).await;
    until(&b.engine, &issued.secret, Err(DenialReason::UnknownKey), at).await;
    assert_eq!(a.engine.policy_version(), 3);
}
