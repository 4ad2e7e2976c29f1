//! The in-memory engine's policy store: every accepted change is in the file before
//! it is acknowledged, the file loads back to the same policy, a change the file
//! cannot take is refused whole, and a torn or edited file is a typed error at load.
//! (`tests/gateway/restart.rs` restarts a real gateway process on it.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use tollgate::{
    ChannelSink, DenialReason, Engine, FilePolicyStore, ManualClock, NewKey, Policy, PolicyError,
    PolicyStoreError, Request, WorkspaceStatus, WorkspaceUpdate,
};

const POLICY: &str = r#"
    [org]
    id = "acme"

    [[models]]
    name = "m"
    input_per_million = "0.075"
    output_per_million = "0.3"

    [[workspaces]]
    id = "ws1"
    name = "one"
    models = ["m"]

    [[keys]]
    id = "k1"
    workspace = "ws1"
    secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" # "test"

    [[keys]]
    id = "k2"
    workspace = "ws1"
    secret_sha256 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752" # "test2"
"#;

/// A fresh directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-policy-store-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn seed() -> Result<Policy, PolicyError> {
    Policy::from_toml_str(POLICY)
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::at(
        Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0).unwrap(),
    ))
}

/// An engine on the store at `path` (seeded on first start).
fn open(path: &PathBuf, clock: &Arc<ManualClock>) -> Engine {
    let (store, policy) = FilePolicyStore::open_or_seed(path, seed).unwrap();
    Engine::builder(policy)
        .clock(clock.clone())
        .policy_store(Arc::new(store))
        .build()
}

fn decision(engine: &Engine, secret: &str) -> Result<(), DenialReason> {
    engine
        .check_and_reserve(&Request::with_secret(secret, "m").input_tokens(1))
        .map(drop)
        .map_err(|d| d.reason)
}

#[test]
fn every_change_is_in_the_file_before_it_is_acknowledged() {
    let dir = temp_dir("changes");
    let path = dir.join("policy.json");
    let clock = clock();
    let engine = open(&path, &clock);
    assert!(path.exists(), "the seed is saved on first start");

    engine.revoke_key("k1", Some("alice")).unwrap();
    let created = engine.create_key(NewKey::new("k3", "ws1"), None).unwrap();
    let rotated = engine
        .rotate_key("k2", Duration::from_secs(60), None)
        .unwrap();
    engine
        .update_workspace(
            "ws1",
            WorkspaceUpdate {
                region: Some("eu-west".into()),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();

    // Each acknowledged change is already in the file: a second store reading it now
    // (as a restarted process would) sees all of them, with the same document.
    let (store, reloaded) = FilePolicyStore::open_or_seed(&path, seed).unwrap();
    assert_eq!(store.version(), 5, "seed + four changes");
    assert_eq!(reloaded.document(), engine.policy().document());

    let restarted = Engine::builder(reloaded).clock(clock.clone()).build();
    assert_eq!(decision(&restarted, "test"), Err(DenialReason::KeyRevoked));
    assert_eq!(decision(&restarted, &created.secret), Ok(()));
    assert_eq!(decision(&restarted, &rotated.secret), Ok(()));
    assert_eq!(decision(&restarted, "test2"), Ok(()), "within the grace");
    clock.advance(Duration::from_secs(61));
    assert_eq!(
        decision(&restarted, "test2"),
        Err(DenialReason::UnknownKey),
        "the grace is an instant in the file, not a timer lost on restart"
    );
    assert_eq!(
        restarted.policy().document().workspaces[0].region,
        "eu-west"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_change_the_store_cannot_save_changes_nothing() {
    let dir = temp_dir("unsaved");
    let path = dir.join("policy.json");
    let clock = clock();
    let (sink, events) = ChannelSink::new(16);
    let (store, policy) = FilePolicyStore::open_or_seed(&path, seed).unwrap();
    let engine = Engine::builder(policy)
        .clock(clock.clone())
        .events(Arc::new(sink))
        .policy_store(Arc::new(store))
        .build();
    // The directory is gone: the temp file cannot be created.
    std::fs::remove_dir_all(&dir).unwrap();

    let before = engine.policy().document().clone();
    let error = engine.revoke_key("k1", None).unwrap_err();
    assert!(
        matches!(error, PolicyError::Persist(PolicyStoreError::Io { ref path, .. }) if path.ends_with("policy.json")),
        "{error:?}"
    );
    assert_eq!(engine.policy().document(), &before);
    assert_eq!(decision(&engine, "test"), Ok(()), "not revoked");
    assert!(events.try_recv().is_err(), "no event for a refused change");
    assert!(engine
        .create_key(NewKey::new("k3", "ws1"), None)
        .is_err_and(|e| matches!(e, PolicyError::Persist(_))));
    assert_eq!(engine.policy().document(), &before);
}

#[test]
fn a_torn_or_edited_file_is_a_typed_error_never_a_reset() {
    let dir = temp_dir("corrupt");
    let path = dir.join("policy.json");
    let engine = open(&path, &clock());
    engine.revoke_key("k1", None).unwrap();
    let whole = std::fs::read(&path).unwrap();

    let corrupt = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        let Err(error) = FilePolicyStore::open_or_seed(&path, seed) else {
            panic!("a damaged file loaded");
        };
        match error {
            PolicyError::Persist(PolicyStoreError::Corrupt { path: p, detail }) => {
                assert_eq!(p, path);
                detail
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    };
    // Torn: the first half of the file.
    let detail = corrupt(&whole[..whole.len() / 2]);
    assert!(detail.contains("not a policy state file"), "{detail}");
    // Edited: the revoked key made active again, checksum left as it was.
    let text = String::from_utf8(whole.clone()).unwrap();
    assert!(text.contains(r#"\"status\":\"revoked\""#), "{text}");
    let edited = text.replace(r#"\"status\":\"revoked\""#, r#"\"status\":\"active\""#);
    let detail = corrupt(edited.as_bytes());
    assert!(detail.contains("checksum mismatch"), "{detail}");
    // Empty (a crash before any byte was written would leave the old file, but a
    // truncating tool might not).
    corrupt(b"");
    // The file is left as found: nothing was reset to the seed.
    assert_eq!(std::fs::read(&path).unwrap(), b"");

    std::fs::write(&path, &whole).unwrap();
    let (_, policy) = FilePolicyStore::open_or_seed(&path, seed).unwrap();
    assert_eq!(policy.document(), engine.policy().document());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_full_policy_round_trips_through_the_file() {
    let dir = temp_dir("round-trip");
    let path = dir.join("policy.json");
    let full = || {
        Policy::from_path(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/policy.toml"
        ))
    };
    let (_, first) = FilePolicyStore::open_or_seed(&path, full).unwrap();
    let engine = Engine::builder(first.clone())
        .policy_store(Arc::new(FilePolicyStore::new(&path)))
        .build();
    engine
        .update_workspace(
            &first.document().workspaces[1].id,
            WorkspaceUpdate {
                status: Some(WorkspaceStatus::Suspended),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    let (_, second) = FilePolicyStore::open_or_seed(&path, || panic!("the file exists")).unwrap();
    assert_eq!(second.document(), engine.policy().document());
    assert_eq!(
        second.document().workspaces[1].status,
        WorkspaceStatus::Suspended
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
