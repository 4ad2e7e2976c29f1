//! The control plane on a running engine: creating, editing, rotating, revoking and
//! deleting workspaces and keys, replacing the policy from a file, and the events all
//! of that reports (with budget thresholds and sampled denials), including under
//! concurrent traffic.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use rand::Rng;
use tollgate::*;

const ORG: &str = "acme";

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// 2026-11-23 12:00:00 UTC.
fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::at(
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap(),
    ))
}

/// Org `acme`; model `m` at 1000 USD per million tokens either way (0.001 per token,
/// so `n` tokens cost `n / 1000` USD); workspace `ws` granted `m`; key `k` (`sk-k`).
fn base() -> PolicyDocument {
    PolicyDocument::new(OrgSpec::new(ORG))
        .model(ModelSpec::new("m", dec("1000"), dec("1000")))
        .workspace(WorkspaceSpec::new("ws", "chatbot-production").grant("m"))
        .key(KeySpec::new("k", "ws", "sk-k"))
}

/// An engine on a manual clock reporting to a roomy channel sink.
struct Rig {
    engine: Engine,
    clock: Arc<ManualClock>,
    events: Receiver<Event>,
    sink: Arc<ChannelSink>,
}

fn rig(doc: PolicyDocument) -> Rig {
    rig_with(doc, clock(), 4096)
}

fn rig_with(doc: PolicyDocument, clock: Arc<ManualClock>, capacity: usize) -> Rig {
    let (sink, events) = ChannelSink::new(capacity);
    let sink = Arc::new(sink);
    let engine = Engine::builder(Policy::new(doc).expect("valid policy"))
        .clock(clock.clone())
        .events(sink.clone())
        .build();
    Rig {
        engine,
        clock,
        events,
        sink,
    }
}

impl Rig {
    fn drain(&self) -> Vec<Event> {
        self.events.try_iter().collect()
    }

    /// The one event the last operation sent.
    fn one_event(&self) -> Event {
        let events = self.drain();
        assert_eq!(events.len(), 1, "expected exactly one event: {events:?}");
        events.into_iter().next().unwrap()
    }

    fn assert_no_event(&self, context: &str) {
        match self.events.try_recv() {
            Err(TryRecvError::Empty) => {}
            other => panic!("{context}: expected no event, got {other:?}"),
        }
    }

    fn doc(&self) -> PolicyDocument {
        self.engine.policy().document().clone()
    }

    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Reserve `tokens` input tokens (and no output) with `secret`, commit them all.
    fn spend(&self, secret: &str, tokens: u32) -> Receipt {
        let r = self
            .engine
            .check_and_reserve(&req(secret, tokens, 0))
            .unwrap_or_else(|d| panic!("spend {tokens} with {secret:?} refused: {d:?}"));
        self.engine
            .commit_usage(r, Usage::new(tokens, 0))
            .expect("in-memory commit")
    }

    fn usage_of_workspace(&self, id: &str) -> ScopeReport {
        self.engine
            .usage()
            .workspaces
            .iter()
            .find(|w| w.id == id)
            .unwrap_or_else(|| panic!("no workspace {id:?} in usage"))
            .usage
    }

    fn usage_of_key(&self, id: &str) -> ScopeReport {
        self.engine
            .usage()
            .keys
            .iter()
            .find(|k| k.id == id)
            .unwrap_or_else(|| panic!("no key {id:?} in usage"))
            .usage
    }
}

fn req(secret: &str, input: u32, output: u32) -> Request<'_> {
    Request::with_secret(secret, "m")
        .input_tokens(input)
        .max_output_tokens(output)
}

fn denied(engine: &Engine, request: &Request<'_>) -> DenialReason {
    match engine.check_and_reserve(request) {
        Ok(r) => panic!("expected a denial, admitted {r:?} for {request:?}"),
        Err(d) => d.reason,
    }
}

fn admitted(engine: &Engine, request: &Request<'_>) {
    if let Err(d) = engine.check_and_reserve(request) {
        panic!("expected {request:?} admitted, denied: {d:?}");
    }
}

fn limits(f: impl FnOnce(&mut LimitsSpec)) -> LimitsSpec {
    let mut l = LimitsSpec::default();
    f(&mut l);
    l
}

/// The single issue of a `PolicyError::Invalid`.
fn single_issue(result: Result<impl std::fmt::Debug, PolicyError>) -> PolicyIssue {
    match result {
        Err(PolicyError::Invalid { mut issues }) => {
            assert_eq!(issues.len(), 1, "expected one issue: {issues:#?}");
            issues.remove(0)
        }
        other => panic!("expected PolicyError::Invalid, got {other:?}"),
    }
}

fn issue(path: &str, value: &str, problem: Problem) -> PolicyIssue {
    PolicyIssue {
        path: path.into(),
        value: value.into(),
        problem,
    }
}

/// A refused operation left the document as it was and reported nothing.
fn assert_unchanged(rig: &Rig, before: &PolicyDocument, context: &str) {
    assert_eq!(&rig.doc(), before, "{context}: the document changed");
    rig.assert_no_event(context);
}

fn json(event: &Event) -> serde_json::Value {
    serde_json::to_value(event).expect("events serialise")
}

// ---------------------------------------------------------------------------------
// 1. Each operation's success path.
// ---------------------------------------------------------------------------------

#[test]
fn create_workspace_adds_it_and_reports_who_did_it() {
    let rig = rig(base());
    let spec = WorkspaceSpec::new("ws2", "batch-jobs")
        .grant("m")
        .limits(limits(|l| l.rpm = Some(1)));
    rig.engine
        .create_workspace(spec.clone(), Some("alice"))
        .unwrap();

    let doc = rig.doc();
    assert_eq!(doc.workspaces.len(), 2);
    assert_eq!(doc.workspaces[1], spec, "the spec is stored as given");
    assert_eq!(doc.workspaces[0], base().workspaces[0], "others untouched");

    let event = rig.one_event();
    assert_eq!(
        event,
        Event {
            at: rig.now(),
            actor: Some("alice".into()),
            kind: EventKind::WorkspaceCreated {
                scope: ScopeRef::workspace(ORG, "ws2"),
            },
        }
    );
    let v = json(&event);
    assert_eq!(v["type"], "workspace_created", "{v}");
    assert_eq!(v["actor"], "alice", "{v}");
    assert_eq!(v["scope"]["org"], ORG, "{v}");
    assert_eq!(v["scope"]["workspace"], "ws2", "{v}");
    assert_eq!(v["at"], rig.now().as_unix_nanos(), "{v}");

    // The new workspace serves requests under its own limits.
    let key = rig
        .engine
        .create_key(NewKey::new("k2", "ws2"), None)
        .unwrap();
    rig.spend(&key.secret, 10);
    assert_eq!(
        denied(&rig.engine, &req(&key.secret, 10, 0)),
        DenialReason::RequestsPerMinute,
        "ws2's rpm = 1 applies"
    );
    // The old workspace is not limited by it.
    rig.spend("sk-k", 10);
    rig.spend("sk-k", 10);
    assert_eq!(rig.usage_of_workspace("ws2").current.requests, 1);
    assert_eq!(rig.usage_of_workspace("ws").current.requests, 2);
}

#[test]
fn update_workspace_changes_only_what_it_names_and_applies_to_the_next_request() {
    let mut doc = base();
    doc.workspaces[0].region = "eu-west".into();
    doc.workspaces[0].limits = limits(|l| l.tpm = Some(100_000));
    let rig = rig(doc);
    let before = rig.doc();
    admitted(&rig.engine, &req("sk-k", 10, 0));

    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                status: Some(WorkspaceStatus::Suspended),
                ..WorkspaceUpdate::default()
            },
            Some("alice"),
        )
        .unwrap();
    let ws = &rig.doc().workspaces[0];
    assert_eq!(ws.status, WorkspaceStatus::Suspended);
    assert_eq!(
        (&ws.region, &ws.limits, &ws.models, &ws.name),
        (
            &before.workspaces[0].region,
            &before.workspaces[0].limits,
            &before.workspaces[0].models,
            &before.workspaces[0].name
        ),
        "None leaves a setting unchanged"
    );
    assert_eq!(rig.doc().keys, before.keys);
    let d = rig
        .engine
        .check_and_reserve(&req("sk-k", 10, 0))
        .unwrap_err();
    assert_eq!(
        (d.reason, d.scope, d.http_status()),
        (
            DenialReason::WorkspaceNotActive(WorkspaceStatus::Suspended),
            Scope::Workspace,
            403
        )
    );
    let event = rig
        .drain()
        .into_iter()
        .find(|e| !matches!(e.kind, EventKind::RequestsDenied { .. }))
        .expect("an update event");
    assert_eq!(
        event,
        Event {
            at: rig.now(),
            actor: Some("alice".into()),
            kind: EventKind::WorkspaceUpdated {
                scope: ScopeRef::workspace(ORG, "ws"),
            },
        }
    );
    assert_eq!(json(&event)["type"], "workspace_updated");

    // Active again with new limits and a budget: all apply from the next request.
    rig.clock.advance(Duration::from_secs(1));
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                status: Some(WorkspaceStatus::Active),
                limits: Some(limits(|l| l.rpm = Some(1))),
                budget: Some(Some(BudgetSpec::new(dec("0.05"), BudgetPeriod::Day))),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    let event = rig.one_event();
    assert_eq!((event.at, event.actor.as_deref()), (rig.now(), None));
    assert!(!json(&event).as_object().unwrap().contains_key("actor"));
    let ws = &rig.doc().workspaces[0];
    assert_eq!(ws.status, WorkspaceStatus::Active);
    assert_eq!(ws.limits, limits(|l| l.rpm = Some(1)), "limits replaced");
    assert_eq!(ws.region, "eu-west");
    // 60 tokens = 0.06 > 0.05 budget.
    assert_eq!(
        denied(&rig.engine, &req("sk-k", 60, 0)),
        DenialReason::Budget
    );
    rig.spend("sk-k", 40);
    assert_eq!(
        denied(&rig.engine, &req("sk-k", 1, 0)),
        DenialReason::RequestsPerMinute
    );

    // `Some(None)` removes the budget; models replaced refuses the old grant.
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                budget: Some(None),
                limits: Some(LimitsSpec::default()),
                models: Some(vec![]),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(rig.doc().workspaces[0].budget, None);
    assert_eq!(
        denied(&rig.engine, &req("sk-k", 60, 0)),
        DenialReason::ModelNotGranted
    );
}

#[test]
fn delete_workspace_refuses_its_keys_and_drops_its_counters() {
    let mut doc = base();
    doc = doc
        .workspace(WorkspaceSpec::new("ws2", "batch-jobs").grant("m"))
        .key(KeySpec::new("k2", "ws2", "sk-k2"))
        .key(KeySpec::new("k3", "ws2", "sk-k3"));
    let rig = rig(doc);
    rig.spend("sk-k2", 100);
    rig.spend("sk-k", 7);
    // A request in flight when its workspace goes.
    let in_flight = rig.engine.check_and_reserve(&req("sk-k3", 50, 0)).unwrap();
    assert_eq!(rig.usage_of_workspace("ws2").current.cost, dec("0.1"));

    rig.engine.delete_workspace("ws2", Some("alice")).unwrap();

    let doc = rig.doc();
    assert_eq!(
        doc.workspaces.iter().map(|w| &w.id[..]).collect::<Vec<_>>(),
        ["ws"]
    );
    assert_eq!(
        doc.keys.iter().map(|k| &k.id[..]).collect::<Vec<_>>(),
        ["k"],
        "its keys went with it"
    );
    assert_eq!(
        rig.one_event(),
        Event {
            at: rig.now(),
            actor: Some("alice".into()),
            kind: EventKind::WorkspaceDeleted {
                scope: ScopeRef::workspace(ORG, "ws2"),
            },
        }
    );
    for secret in ["sk-k2", "sk-k3"] {
        let d = rig
            .engine
            .check_and_reserve(&req(secret, 1, 0))
            .unwrap_err();
        assert_eq!((d.reason, d.http_status()), (DenialReason::UnknownKey, 401));
    }
    assert_eq!(
        denied(&rig.engine, &Request::with_key_id("k2", "m")),
        DenialReason::UnknownKey
    );
    admitted(&rig.engine, &req("sk-k", 1, 0));
    // The reservation taken before still settles (against the counters it held).
    let receipt = rig
        .engine
        .commit_usage(in_flight, Usage::new(50, 0))
        .unwrap();
    assert_eq!(receipt.cost(), dec("0.05"));
    let usage = rig.engine.usage();
    assert!(usage.workspaces.iter().all(|w| w.id != "ws2"));
    assert!(usage.keys.iter().all(|k| k.workspace != "ws2"));
    // The org persists, and so does what it spent.
    assert_eq!(usage.org.current.cost, dec("0.157"));
    assert_eq!(usage.org.current.held, Decimal::ZERO);

    // Re-created with the same ids: from zero.
    rig.engine
        .create_workspace(WorkspaceSpec::new("ws2", "batch-jobs").grant("m"), None)
        .unwrap();
    let key = rig
        .engine
        .create_key(NewKey::new("k2", "ws2"), None)
        .unwrap();
    let ws2 = rig.usage_of_workspace("ws2");
    assert_eq!(
        (ws2.current.requests, ws2.current.cost, ws2.current.held),
        (0, Decimal::ZERO, Decimal::ZERO)
    );
    assert_eq!(rig.usage_of_key("k2").current.requests, 0);
    assert_eq!(
        denied(&rig.engine, &req("sk-k2", 1, 0)),
        DenialReason::UnknownKey,
        "the deleted key's secret does not come back"
    );
    rig.spend(&key.secret, 3);
    assert_eq!(rig.usage_of_workspace("ws2").current.cost, dec("0.003"));
}

#[test]
fn create_key_issues_a_fresh_secret_that_works_at_once() {
    let rig = rig(base());
    let before = rig.doc();
    let expires = Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap();
    let issued = rig
        .engine
        .create_key(
            NewKey {
                expires_at: Some(expires),
                limits: limits(|l| l.rpm = Some(1)),
                ..NewKey::new("k2", "ws")
            },
            Some("alice"),
        )
        .unwrap();
    assert_eq!(issued.id, "k2");
    let hex = issued
        .secret
        .strip_prefix("sk-tg-")
        .unwrap_or_else(|| panic!("secret {:?} lacks sk-tg-", issued.secret));
    assert!(
        hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{hex}"
    );
    assert!(
        !format!("{issued:?}").contains(&issued.secret),
        "Debug must not print the secret"
    );

    let doc = rig.doc();
    assert_eq!(doc.keys.len(), 2);
    assert_eq!(doc.keys[0], before.keys[0]);
    let key = &doc.keys[1];
    assert_eq!(
        (&key.id[..], &key.workspace[..], key.status, key.expires_at),
        ("k2", "ws", KeyStatus::Active, Some(expires))
    );
    assert_eq!(key.limits, limits(|l| l.rpm = Some(1)));
    assert_eq!(
        key.secret_sha256,
        KeySpec::digest_of(&issued.secret),
        "only the digest is kept"
    );
    assert!(!format!("{doc:?}").contains(&issued.secret));

    let event = rig.one_event();
    assert_eq!(
        event,
        Event {
            at: rig.now(),
            actor: Some("alice".into()),
            kind: EventKind::KeyCreated {
                scope: ScopeRef::key(ORG, "ws", "k2"),
            },
        }
    );
    let v = json(&event);
    assert_eq!(
        (&v["type"], &v["scope"]["key"]),
        (&"key_created".into(), &"k2".into())
    );

    // Works at once, by secret and by id, counted on the new key, under its limits.
    rig.spend(&issued.secret, 5);
    assert_eq!(rig.usage_of_key("k2").current.cost, dec("0.005"));
    assert_eq!(rig.usage_of_key("k").current.requests, 0);
    assert_eq!(
        denied(&rig.engine, &Request::with_key_id("k2", "m")),
        DenialReason::RequestsPerMinute
    );

    // Every key gets its own secret.
    let other = rig
        .engine
        .create_key(NewKey::new("k3", "ws"), None)
        .unwrap();
    assert_ne!(other.secret, issued.secret);
    rig.spend(&other.secret, 1);
    assert_eq!(rig.usage_of_key("k3").current.requests, 1);
}

#[test]
fn rotate_key_with_zero_grace_swaps_secrets_at_once_and_keeps_counters() {
    let rig = rig(base());
    rig.spend("sk-k", 10);
    let t = rig.now();

    let issued = rig
        .engine
        .rotate_key("k", Duration::ZERO, Some("alice"))
        .unwrap();
    assert_eq!(issued.id, "k");
    assert!(issued.secret.starts_with("sk-tg-"));

    let d = rig
        .engine
        .check_and_reserve(&req("sk-k", 1, 0))
        .unwrap_err();
    assert_eq!(
        (d.reason, d.http_status()),
        (DenialReason::UnknownKey, 401),
        "zero grace refuses the old secret at once"
    );
    rig.spend(&issued.secret, 20);
    let key = rig.usage_of_key("k");
    assert_eq!(
        (key.current.requests, key.current.cost),
        (2, dec("0.03")),
        "same key, same counters"
    );

    let doc = rig.doc();
    let k = &doc.keys[0];
    assert_eq!(k.secret_sha256, KeySpec::digest_of(&issued.secret));
    assert_eq!(
        (&k.previous_secret_sha256, k.previous_secret_expires_at),
        (&None, None)
    );
    let events: Vec<_> = rig
        .drain()
        .into_iter()
        .filter(|e| !matches!(e.kind, EventKind::RequestsDenied { .. }))
        .collect();
    assert_eq!(
        events,
        [Event {
            at: t,
            actor: Some("alice".into()),
            kind: EventKind::KeyRotated {
                scope: ScopeRef::key(ORG, "ws", "k"),
                old_secret_until: t,
            },
        }]
    );
    assert_eq!(json(&events[0])["type"], "key_rotated");

    // Rotating again retires the secret the first rotation issued.
    let again = rig.engine.rotate_key("k", Duration::ZERO, None).unwrap();
    assert_ne!(again.secret, issued.secret);
    assert_eq!(
        denied(&rig.engine, &req(&issued.secret, 1, 0)),
        DenialReason::UnknownKey
    );
    rig.spend(&again.secret, 1);
}

#[test]
fn revoke_key_refuses_at_once_and_keeps_counters() {
    let rig = rig(base().key(KeySpec::new("k2", "ws", "sk-k2")));
    rig.spend("sk-k", 10);
    rig.engine.revoke_key("k", Some("alice")).unwrap();

    for request in [req("sk-k", 1, 0), Request::with_key_id("k", "m")] {
        let d = rig.engine.check_and_reserve(&request).unwrap_err();
        assert_eq!(
            (d.reason, d.scope, d.http_status(), d.code()),
            (DenialReason::KeyRevoked, Scope::Key, 401, "api_key_revoked")
        );
    }
    // Other keys of the workspace are untouched.
    rig.spend("sk-k2", 1);

    let doc = rig.doc();
    assert_eq!(doc.keys[0].status, KeyStatus::Revoked);
    assert_eq!(doc.keys[1].status, KeyStatus::Active);
    let key = rig.usage_of_key("k");
    assert_eq!(
        (key.current.requests, key.current.cost),
        (1, dec("0.01")),
        "a revoked key's counters are kept"
    );
    let events: Vec<_> = rig
        .drain()
        .into_iter()
        .filter(|e| !matches!(e.kind, EventKind::RequestsDenied { .. }))
        .collect();
    assert_eq!(
        events,
        [Event {
            at: rig.now(),
            actor: Some("alice".into()),
            kind: EventKind::KeyRevoked {
                scope: ScopeRef::key(ORG, "ws", "k"),
            },
        }]
    );
    assert_eq!(json(&events[0])["type"], "key_revoked");

    // Still refused after unrelated changes rebuild the snapshot.
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                region: Some("us-east".into()),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(
        denied(&rig.engine, &req("sk-k", 1, 0)),
        DenialReason::KeyRevoked
    );
}

#[test]
fn apply_policy_replaces_the_policy_keeps_counters_and_reports_it() {
    let mut doc = base().key(KeySpec::new("gone", "ws", "sk-gone"));
    doc.workspaces[0].limits = limits(|l| l.rpm = Some(100));
    let rig = rig(doc);
    rig.spend("sk-k", 30);
    rig.spend("sk-gone", 5);

    let mut next = base()
        .workspace(WorkspaceSpec::new("ws2", "batch-jobs").grant("m"))
        .key(KeySpec::new("k2", "ws2", "sk-k2"));
    next.workspaces[0].limits = limits(|l| l.rpm = Some(1));
    let policy = Policy::new(next.clone()).unwrap();
    rig.engine.apply_policy(policy).unwrap();

    assert_eq!(rig.doc(), next);
    assert_eq!(
        rig.one_event(),
        Event {
            at: rig.now(),
            actor: None,
            kind: EventKind::PolicyApplied {
                workspaces: 2,
                keys: 2,
            },
        }
    );
    assert_eq!(
        denied(&rig.engine, &req("sk-gone", 1, 0)),
        DenialReason::UnknownKey
    );
    let ws = rig.usage_of_workspace("ws");
    assert_eq!(
        (ws.current.requests, ws.current.cost),
        (2, dec("0.035")),
        "the workspace's counters are kept"
    );
    assert_eq!(rig.usage_of_key("k").current.cost, dec("0.03"));
    // rpm = 1 with a request already made within the minute: refused.
    assert_eq!(
        denied(&rig.engine, &req("sk-k", 1, 0)),
        DenialReason::RequestsPerMinute
    );
    rig.spend("sk-k2", 1);
}

// ---------------------------------------------------------------------------------
// 2. Error paths: typed issues, nothing changes, nothing is reported.
// ---------------------------------------------------------------------------------

#[test]
fn create_workspace_errors_name_the_field_and_change_nothing() {
    let mut doc = base().workspace(WorkspaceSpec::new("ws2", "batch-jobs"));
    doc.org.max_workspaces = 2;
    let rig = rig(doc);
    let before = rig.doc();
    rig.spend("sk-k", 1);
    let usage_before = rig.usage_of_workspace("ws");

    let cases: Vec<(&str, WorkspaceSpec, PolicyIssue)> = vec![
        (
            "duplicate id",
            WorkspaceSpec::new("ws", "another-name"),
            issue(
                "workspaces",
                "\"ws\"",
                Problem::Duplicate {
                    first: "workspace \"ws\"".into(),
                },
            ),
        ),
        (
            "name too long",
            WorkspaceSpec::new("ws3", "a".repeat(31)),
            issue(
                "workspaces[2].name",
                &format!("{:?}", "a".repeat(31)),
                Problem::TooLong { max: 30 },
            ),
        ),
        (
            "name with bad characters",
            WorkspaceSpec::new("ws3", "chat bot!"),
            issue(
                "workspaces[2].name",
                "\"chat bot!\"",
                Problem::BadCharacters {
                    allowed: "letters, digits, '-' and '_'",
                },
            ),
        ),
        (
            "duplicate name",
            WorkspaceSpec::new("ws3", "batch-jobs"),
            issue(
                "workspaces[2].name",
                "\"batch-jobs\"",
                Problem::Duplicate {
                    first: "workspaces[1].name".into(),
                },
            ),
        ),
        (
            "ungranted model",
            WorkspaceSpec::new("ws3", "other").grant("nope"),
            issue("workspaces[2].models[0]", "\"nope\"", Problem::UnknownModel),
        ),
    ];
    // (All but the first also exceed the cap of 2; lift it for them.)
    for (name, spec, expected) in cases {
        let got = if name == "duplicate id" {
            single_issue(rig.engine.create_workspace(spec, Some("alice")))
        } else {
            let mut doc = rig.doc();
            doc.org.max_workspaces = 20;
            let roomy = self::rig(doc);
            let before = roomy.doc();
            let got = single_issue(roomy.engine.create_workspace(spec, Some("alice")));
            assert_unchanged(&roomy, &before, name);
            got
        };
        assert_eq!(got, expected, "{name}");
        assert_unchanged(&rig, &before, name);
    }

    let got = single_issue(
        rig.engine
            .create_workspace(WorkspaceSpec::new("ws3", "third"), Some("alice")),
    );
    assert_eq!(
        got,
        issue(
            "workspaces",
            "3 workspaces",
            Problem::CapExceeded { count: 3, cap: 2 }
        ),
        "over the org's cap"
    );
    assert_unchanged(&rig, &before, "over cap");
    // Requests and counters are untouched by the refusals.
    assert_eq!(rig.usage_of_workspace("ws"), usage_before);
    rig.spend("sk-k", 1);
}

#[test]
fn update_workspace_errors_name_the_field_and_change_nothing() {
    let mut doc = base();
    doc.workspaces[0].limits = limits(|l| l.rpm = Some(100));
    let rig = rig(doc);
    let before = rig.doc();

    let got = single_issue(rig.engine.update_workspace(
        "nope",
        WorkspaceUpdate {
            status: Some(WorkspaceStatus::Suspended),
            ..WorkspaceUpdate::default()
        },
        Some("alice"),
    ));
    assert_eq!(
        got,
        issue("workspaces", "\"nope\"", Problem::UnknownWorkspace)
    );
    assert_unchanged(&rig, &before, "unknown workspace");

    let cases: Vec<(&str, WorkspaceUpdate, PolicyIssue)> = vec![
        (
            "rpm zero",
            WorkspaceUpdate {
                // Valid changes alongside the invalid one must not apply either.
                status: Some(WorkspaceStatus::Suspended),
                limits: Some(limits(|l| l.rpm = Some(0))),
                ..WorkspaceUpdate::default()
            },
            issue("workspaces[0].limits.rpm", "0", Problem::NotPositive),
        ),
        (
            "negative tpm",
            WorkspaceUpdate {
                limits: Some(limits(|l| l.tpm = Some(-5))),
                ..WorkspaceUpdate::default()
            },
            issue("workspaces[0].limits.tpm", "-5", Problem::NotPositive),
        ),
        (
            "negative budget",
            WorkspaceUpdate {
                budget: Some(Some(BudgetSpec::new(dec("-1"), BudgetPeriod::Day))),
                ..WorkspaceUpdate::default()
            },
            issue("workspaces[0].budget.limit", "-1", Problem::Negative),
        ),
        (
            "threshold out of range",
            WorkspaceUpdate {
                budget: Some(Some(BudgetSpec {
                    alert_thresholds: vec![50, 101],
                    ..BudgetSpec::new(dec("1"), BudgetPeriod::Day)
                })),
                ..WorkspaceUpdate::default()
            },
            issue(
                "workspaces[0].budget.alert_thresholds[1]",
                "101",
                Problem::ThresholdOutOfRange,
            ),
        ),
        (
            "unknown model",
            WorkspaceUpdate {
                models: Some(vec!["m".into(), "nope".into()]),
                ..WorkspaceUpdate::default()
            },
            issue("workspaces[0].models[1]", "\"nope\"", Problem::UnknownModel),
        ),
    ];
    for (name, update, expected) in cases {
        let got = single_issue(rig.engine.update_workspace("ws", update, Some("alice")));
        assert_eq!(got, expected, "{name}");
        assert_unchanged(&rig, &before, name);
        // The old settings still apply: active, rpm 100.
        admitted(&rig.engine, &req("sk-k", 1, 0));
    }
}

#[test]
fn delete_workspace_errors_name_the_field_and_change_nothing() {
    let mut doc = base().workspace(WorkspaceSpec::new("main", "main-workspace"));
    doc.org.default_workspace = Some("main".into());
    let rig = rig(doc);
    let before = rig.doc();

    let got = single_issue(rig.engine.delete_workspace("nope", Some("alice")));
    assert_eq!(
        got,
        issue("workspaces", "\"nope\"", Problem::UnknownWorkspace)
    );
    assert_unchanged(&rig, &before, "unknown workspace");

    // The org's default workspace cannot go: the policy would not validate.
    let got = single_issue(rig.engine.delete_workspace("main", Some("alice")));
    assert_eq!(
        got,
        issue(
            "org.default_workspace",
            "\"main\"",
            Problem::UnknownWorkspace
        )
    );
    assert_unchanged(&rig, &before, "default workspace");
    rig.spend("sk-k", 1);
}

#[test]
fn create_key_errors_name_the_field_and_change_nothing() {
    let mut doc = base().key(KeySpec::new("k2", "ws", "sk-k2"));
    doc.org.max_keys_per_workspace = 2;
    let rig = rig(doc);
    let before = rig.doc();

    let got = single_issue(rig.engine.create_key(NewKey::new("k", "ws"), Some("alice")));
    assert_eq!(
        got,
        issue(
            "keys",
            "\"k\"",
            Problem::Duplicate {
                first: "key \"k\"".into()
            }
        ),
        "duplicate id"
    );
    assert_unchanged(&rig, &before, "duplicate key id");

    let got = single_issue(
        rig.engine
            .create_key(NewKey::new("k9", "nope"), Some("alice")),
    );
    assert_eq!(got.problem, Problem::UnknownWorkspace, "{got:?}");
    assert_eq!(got.value, "\"nope\"", "{got:?}");
    assert!(got.path.contains("workspace"), "{got:?}");
    assert_unchanged(&rig, &before, "unknown workspace");

    let got = single_issue(
        rig.engine
            .create_key(NewKey::new("k3", "ws"), Some("alice")),
    );
    assert_eq!(
        got,
        issue(
            "workspaces[0]",
            "\"ws\" has 3 keys",
            Problem::CapExceeded { count: 3, cap: 2 }
        ),
        "over max_keys_per_workspace"
    );
    assert_unchanged(&rig, &before, "over key cap");

    // Field checks of the new key itself (on a workspace with room).
    let roomy = self::rig(base());
    let roomy_before = roomy.doc();
    let cases: Vec<(&str, NewKey, PolicyIssue)> = vec![
        (
            "bad id",
            NewKey::new("bad id", "ws"),
            issue(
                "keys[1].id",
                "\"bad id\"",
                Problem::BadCharacters {
                    allowed: "letters, digits, '-', '_', '.' and ':'",
                },
            ),
        ),
        (
            "rpm zero",
            NewKey {
                limits: limits(|l| l.rpm = Some(0)),
                ..NewKey::new("k9", "ws")
            },
            issue("keys[1].limits.rpm", "0", Problem::NotPositive),
        ),
    ];
    for (name, key, expected) in cases {
        let got = single_issue(roomy.engine.create_key(key, Some("alice")));
        assert_eq!(got, expected, "{name}");
        assert_unchanged(&roomy, &roomy_before, name);
    }
    rig.spend("sk-k2", 1);
}

#[test]
fn rotate_and_revoke_of_unknown_keys_change_nothing() {
    let rig = rig(base());
    let before = rig.doc();
    let got = single_issue(
        rig.engine
            .rotate_key("nope", Duration::from_secs(60), Some("alice")),
    );
    assert_eq!(got, issue("keys", "\"nope\"", Problem::UnknownKey));
    assert_unchanged(&rig, &before, "rotate unknown");
    let got = single_issue(rig.engine.revoke_key("nope", Some("alice")));
    assert_eq!(got, issue("keys", "\"nope\"", Problem::UnknownKey));
    assert_unchanged(&rig, &before, "revoke unknown");
    rig.spend("sk-k", 1);
}

// ---------------------------------------------------------------------------------
// 3. Counters persist across changes; new limits apply on the next request.
// ---------------------------------------------------------------------------------

#[test]
fn workspace_edits_keep_counters_and_new_limits_apply_on_the_next_request() {
    let mut doc = base();
    doc.workspaces[0].limits = limits(|l| {
        l.rpm = Some(100);
        l.tpm = Some(10_000);
    });
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("10"), BudgetPeriod::Month));
    let rig = rig(doc);
    for _ in 0..3 {
        rig.spend("sk-k", 300);
    }
    let held = rig.engine.check_and_reserve(&req("sk-k", 100, 0)).unwrap();
    let before = rig.engine.usage();

    // Raise tpm only: counters are what they were.
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                limits: Some(limits(|l| {
                    l.rpm = Some(100);
                    l.tpm = Some(20_000);
                })),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    let after = rig.engine.usage();
    assert_eq!(after.workspaces, before.workspaces, "workspace usage kept");
    assert_eq!(after.keys, before.keys, "key usage kept");
    assert_eq!(after.org, before.org, "org usage kept");
    let ws = after.workspaces[0].usage.current;
    assert_eq!((ws.requests, ws.cost, ws.held), (3, dec("0.9"), dec("0.1")));

    // The hold taken under the old limits settles normally.
    rig.engine.commit_usage(held, Usage::new(100, 0)).unwrap();
    let ws = rig.usage_of_workspace("ws").current;
    assert_eq!(
        (ws.requests, ws.cost, ws.held),
        (4, dec("1.0"), Decimal::ZERO)
    );

    // Lower rpm to 1: four requests this minute already, so the next is refused
    // (a reset counter would admit it).
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                limits: Some(limits(|l| {
                    l.rpm = Some(1);
                    l.tpm = Some(20_000);
                })),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    let d = rig
        .engine
        .check_and_reserve(&req("sk-k", 1, 0))
        .unwrap_err();
    assert_eq!(
        (d.reason, d.scope),
        (DenialReason::RequestsPerMinute, Scope::Workspace)
    );

    // Lower tpm to 1,100 with 1,000 tokens used this minute: 1,000 more are refused
    // (fresh counters would admit them).
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                limits: Some(limits(|l| l.tpm = Some(1_100))),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    let d = rig
        .engine
        .check_and_reserve(&req("sk-k", 1_000, 0))
        .unwrap_err();
    assert_eq!(
        (d.reason, d.scope),
        (DenialReason::TokensPerMinute, Scope::Workspace)
    );
    admitted(&rig.engine, &req("sk-k", 50, 0));

    // Lower the budget below what was spent: refused; raise it: admitted again.
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                limits: Some(LimitsSpec::default()),
                budget: Some(Some(BudgetSpec::new(dec("1.05"), BudgetPeriod::Month))),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(
        denied(&rig.engine, &req("sk-k", 100, 0)),
        DenialReason::Budget,
        "1.00 spent + 0.10 > 1.05"
    );
    rig.spend("sk-k", 50);
    assert_eq!(rig.usage_of_workspace("ws").current.cost, dec("1.05"));
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                budget: Some(Some(BudgetSpec::new(dec("2"), BudgetPeriod::Month))),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    rig.spend("sk-k", 100);
    let ws = rig.usage_of_workspace("ws").current;
    assert_eq!((ws.requests, ws.cost), (6, dec("1.15")));
    assert_eq!(rig.engine.usage().org.current.cost, dec("1.15"));
}

// ---------------------------------------------------------------------------------
// 4. Rotation grace on the engine clock.
// ---------------------------------------------------------------------------------

#[test]
fn rotated_secret_works_until_exactly_now_plus_grace_on_the_engine_clock() {
    let rig = rig(base());
    rig.spend("sk-k", 1);
    let grace = Duration::from_secs(60);
    let t = rig.now();
    let until = t.saturating_add(grace);
    let issued = rig.engine.rotate_key("k", grace, Some("alice")).unwrap();

    assert_eq!(
        rig.one_event(),
        Event {
            at: t,
            actor: Some("alice".into()),
            kind: EventKind::KeyRotated {
                scope: ScopeRef::key(ORG, "ws", "k"),
                old_secret_until: until,
            },
        }
    );
    let k = &rig.doc().keys[0];
    assert_eq!(k.secret_sha256, KeySpec::digest_of(&issued.secret));
    assert_eq!(
        k.previous_secret_sha256.as_deref(),
        Some(&KeySpec::digest_of("sk-k")[..])
    );
    assert_eq!(k.previous_secret_expires_at, Some(until.to_datetime()));

    // Both work at once, on the same key and counters.
    rig.spend("sk-k", 10);
    rig.spend(&issued.secret, 100);
    // An unrelated change does not end the grace period.
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                region: Some("eu".into()),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    rig.clock.advance(Duration::from_secs(30));
    rig.spend("sk-k", 1000);
    // The last nanosecond of the grace period.
    rig.clock
        .set(Timestamp::from_unix_nanos(until.as_unix_nanos() - 1));
    rig.spend("sk-k", 10_000);
    let key = rig.usage_of_key("k").current;
    assert_eq!(
        (key.requests, key.cost),
        (5, dec("11.111")),
        "old and new secret charge the same key"
    );
    assert_eq!(rig.engine.usage().keys.len(), 1);

    // Over: refused as unknown; the new secret still works.
    rig.clock.set(until);
    let d = rig
        .engine
        .check_and_reserve(&req("sk-k", 1, 0))
        .unwrap_err();
    assert_eq!((d.reason, d.http_status()), (DenialReason::UnknownKey, 401));
    rig.clock.advance(Duration::from_secs(3600));
    assert_eq!(
        denied(&rig.engine, &req("sk-k", 1, 0)),
        DenialReason::UnknownKey
    );
    rig.spend(&issued.secret, 1);
    assert_eq!(rig.usage_of_key("k").current.requests, 6);
}

#[test]
fn revoking_during_grace_refuses_both_secrets() {
    let rig = rig(base());
    let issued = rig
        .engine
        .rotate_key("k", Duration::from_secs(600), None)
        .unwrap();
    rig.spend("sk-k", 1);
    rig.engine.revoke_key("k", None).unwrap();
    assert!(rig.engine.check_and_reserve(&req("sk-k", 1, 0)).is_err());
    assert_eq!(
        denied(&rig.engine, &req(&issued.secret, 1, 0)),
        DenialReason::KeyRevoked
    );
}

// ---------------------------------------------------------------------------------
// 5. Budget thresholds: once per threshold per period.
// ---------------------------------------------------------------------------------

/// Budget events only, as (percent or `None` for exhausted, scope, spent, limit).
type BudgetEvent = (Option<u8>, ScopeRef, Decimal, Decimal);

fn budget_events(rig: &Rig) -> Vec<BudgetEvent> {
    rig.drain()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::BudgetThreshold {
                scope,
                percent,
                limit,
                spent,
            } => {
                assert_eq!((e.at, e.actor.as_deref()), (rig.now(), None));
                Some((Some(percent), scope, spent, limit))
            }
            EventKind::BudgetExhausted {
                scope,
                limit,
                spent,
            } => {
                assert_eq!((e.at, e.actor.as_deref()), (rig.now(), None));
                Some((None, scope, spent, limit))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn budget_thresholds_fire_once_per_period_and_again_after_rollover() {
    let mut doc = base();
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("1"), BudgetPeriod::Day));
    let rig = rig(doc);
    let ws = || ScopeRef::workspace(ORG, "ws");
    let one = dec("1");

    rig.spend("sk-k", 550);
    assert_eq!(budget_events(&rig), [(Some(50), ws(), dec("0.55"), one)]);
    for tokens in [50, 100, 90] {
        rig.spend("sk-k", tokens); // 60 %, 70 %, 79 %
        assert!(budget_events(&rig).is_empty(), "at {tokens}");
    }
    rig.spend("sk-k", 60); // 85 %
    assert_eq!(budget_events(&rig), [(Some(80), ws(), dec("0.85"), one)]);
    rig.spend("sk-k", 100); // 95 %
    assert!(budget_events(&rig).is_empty());
    rig.spend("sk-k", 50); // 100 %
    assert_eq!(
        budget_events(&rig),
        [
            (Some(100), ws(), dec("1"), one),
            (None, ws(), dec("1"), one)
        ]
    );
    // Zero-cost commits at 100 %, then one over it: nothing new.
    for _ in 0..20 {
        rig.spend("sk-k", 0);
    }
    let r = rig.engine.check_and_reserve(&req("sk-k", 0, 0)).unwrap();
    let receipt = rig.engine.commit_usage(r, Usage::new(30, 0)).unwrap();
    assert_eq!(receipt.overage(), dec("0.03"));
    assert!(budget_events(&rig).is_empty());
    assert_eq!(
        denied(&rig.engine, &req("sk-k", 1, 0)),
        DenialReason::Budget
    );
    assert!(budget_events(&rig).is_empty());
    assert_eq!(rig.usage_of_workspace("ws").current.cost, dec("1.03"));

    // The next day starts from nothing: 50 % fires again, once.
    rig.clock.advance(Duration::from_secs(86_400));
    rig.spend("sk-k", 550);
    assert_eq!(budget_events(&rig), [(Some(50), ws(), dec("0.55"), one)]);
    rig.spend("sk-k", 100);
    rig.spend("sk-k", 100);
    assert!(budget_events(&rig).is_empty());
    let usage = rig.usage_of_workspace("ws");
    assert_eq!(
        (usage.current.cost, usage.previous.cost),
        (dec("0.75"), dec("1.03"))
    );
    rig.spend("sk-k", 60); // 81 %
    assert_eq!(budget_events(&rig), [(Some(80), ws(), dec("0.81"), one)]);
}

#[test]
fn thresholds_count_committed_spend_not_holds() {
    let mut doc = base();
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("1"), BudgetPeriod::Day));
    let rig = rig(doc);
    // 90 % held, nothing committed yet.
    let r = rig.engine.check_and_reserve(&req("sk-k", 900, 0)).unwrap();
    rig.spend("sk-k", 10);
    assert!(budget_events(&rig).is_empty(), "1 % committed");
    // Commit only 40 % of the 90 % held.
    rig.engine.commit_usage(r, Usage::new(400, 0)).unwrap();
    assert!(budget_events(&rig).is_empty(), "41 % committed");
    rig.spend("sk-k", 100);
    assert_eq!(
        budget_events(&rig),
        [(
            Some(50),
            ScopeRef::workspace(ORG, "ws"),
            dec("0.51"),
            dec("1")
        )]
    );
}

#[test]
fn one_commit_crossing_several_thresholds_fires_each_once() {
    // A key budget with its own thresholds; the workspace with the defaults.
    let mut doc = base();
    doc.keys[0].budget = Some(BudgetSpec {
        alert_thresholds: vec![75, 25, 50],
        ..BudgetSpec::new(dec("1"), BudgetPeriod::Day)
    });
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("2"), BudgetPeriod::Day));
    let rig = rig(doc);
    let key = || ScopeRef::key(ORG, "ws", "k");
    let ws = || ScopeRef::workspace(ORG, "ws");

    rig.spend("sk-k", 800); // key 80 %, workspace 40 %
    assert_eq!(
        budget_events(&rig),
        [
            (Some(25), key(), dec("0.8"), dec("1")),
            (Some(50), key(), dec("0.8"), dec("1")),
            (Some(75), key(), dec("0.8"), dec("1")),
        ]
    );
    // Reserve what is left, commit more: key 105 % (exhausted, no 100 % threshold
    // configured), workspace 52.5 % (its 50 %).
    let r = rig.engine.check_and_reserve(&req("sk-k", 200, 0)).unwrap();
    rig.engine.commit_usage(r, Usage::new(250, 0)).unwrap();
    let mut got = budget_events(&rig);
    got.sort_by_key(|(p, s, _, _)| (s.key.is_none(), *p));
    assert_eq!(
        got,
        [
            (None, key(), dec("1.05"), dec("1")),
            (Some(50), ws(), dec("1.05"), dec("2")),
        ]
    );

    // From nothing to over the whole budget in one commit: every threshold, then
    // exhausted, once each.
    let mut doc = base();
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("1"), BudgetPeriod::Day));
    let rig = self::rig(doc);
    let r = rig.engine.check_and_reserve(&req("sk-k", 1000, 0)).unwrap();
    rig.engine.commit_usage(r, Usage::new(1200, 0)).unwrap();
    let spent = dec("1.2");
    assert_eq!(
        budget_events(&rig),
        [
            (Some(50), ws(), spent, dec("1")),
            (Some(80), ws(), spent, dec("1")),
            (Some(100), ws(), spent, dec("1")),
            (None, ws(), spent, dec("1")),
        ]
    );
    for _ in 0..5 {
        let r = rig.engine.check_and_reserve(&req("sk-k", 0, 0));
        assert!(r.is_err(), "in debt: refused");
    }
    assert!(budget_events(&rig).is_empty());
}

#[test]
fn concurrent_commits_fire_each_threshold_exactly_once() {
    let mut doc = base();
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("1"), BudgetPeriod::Day));
    let rig = rig(doc);
    let engine = rig.engine.clone();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let engine = engine.clone();
            thread::spawn(move || {
                let mut committed = 0u32;
                // 10 tokens = 1 % each, until the budget refuses.
                while let Ok(r) = engine.check_and_reserve(&req("sk-k", 10, 0)) {
                    engine.commit_usage(r, Usage::new(10, 0)).unwrap();
                    committed += 1;
                }
                committed
            })
        })
        .collect();
    let total: u32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(total, 100);
    let events = budget_events(&rig);
    let count = |p: Option<u8>| events.iter().filter(|e| e.0 == p).count();
    assert_eq!(
        [
            count(Some(50)),
            count(Some(80)),
            count(Some(100)),
            count(None)
        ],
        [1, 1, 1, 1],
        "{events:?}"
    );
    assert_eq!(events.len(), 4);
}

// ---------------------------------------------------------------------------------
// 6. Denial sampling.
// ---------------------------------------------------------------------------------

fn denial_counts(rig: &Rig, code: &str) -> Vec<u64> {
    rig.drain()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::RequestsDenied { code: c, count } if c == code => {
                assert_eq!(e.actor, None);
                let v = json(&e);
                assert_eq!(v["type"], "requests_denied");
                Some(count)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn denials_are_reported_at_powers_of_two_per_code() {
    let rig = rig(base().key(KeySpec {
        status: KeyStatus::Revoked,
        ..KeySpec::new("r", "ws", "sk-r")
    }));
    for _ in 0..100 {
        assert_eq!(
            denied(&rig.engine, &req("sk-nope", 1, 0)),
            DenialReason::UnknownKey
        );
    }
    let events = rig.drain();
    let counts: Vec<_> = events
        .iter()
        .map(|e| match &e.kind {
            EventKind::RequestsDenied { code, count } => {
                assert_eq!(*code, "invalid_api_key");
                assert_eq!(e.at, rig.now());
                *count
            }
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    assert_eq!(counts, [1, 2, 4, 8, 16, 32, 64]);

    // Another code counts on its own.
    for _ in 0..10 {
        assert_eq!(
            denied(&rig.engine, &req("sk-r", 1, 0)),
            DenialReason::KeyRevoked
        );
    }
    assert_eq!(denial_counts(&rig, "api_key_revoked"), [1, 2, 4, 8]);
    // And the first code's count carries on: the 128th is reported.
    for _ in 0..28 {
        let _ = rig.engine.check_and_reserve(&req("sk-nope", 1, 0));
    }
    assert_eq!(denial_counts(&rig, "invalid_api_key"), [128]);
    // Admitted requests report nothing.
    rig.spend("sk-k", 1);
    assert!(rig.drain().is_empty());
}

// ---------------------------------------------------------------------------------
// 7. The channel sink never blocks.
// ---------------------------------------------------------------------------------

fn revoked_event(i: u64) -> Event {
    Event {
        at: Timestamp::from_unix_nanos(i),
        actor: None,
        kind: EventKind::KeyRevoked {
            scope: ScopeRef::key(ORG, "ws", &format!("k{i}")),
        },
    }
}

#[test]
fn channel_sink_drops_what_does_not_fit_and_never_blocks() {
    let (sink, events) = ChannelSink::new(2);
    let sink = Arc::new(sink);
    let (done_tx, done_rx) = mpsc::channel();
    let sender = Arc::clone(&sink);
    thread::spawn(move || {
        for i in 0..5 {
            sender.deliver(revoked_event(i));
        }
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("deliver blocked on a full channel");
    assert_eq!(sink.dropped(), 3);
    let got: Vec<_> = events.try_iter().collect();
    assert_eq!(got, [revoked_event(0), revoked_event(1)], "the first two");

    // Room again: delivered. Receiver gone: dropped, not blocked, not panicking.
    sink.deliver(revoked_event(5));
    assert_eq!(events.try_recv().unwrap(), revoked_event(5));
    drop(events);
    sink.deliver(revoked_event(6));
    assert_eq!(sink.dropped(), 4);
}

#[test]
fn engine_operations_complete_when_the_sink_is_full() {
    let rig = rig_with(base(), clock(), 2);
    let engine = rig.engine.clone();
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        for i in 0..5 {
            engine
                .create_workspace(
                    WorkspaceSpec::new(format!("w{i}"), format!("name{i}")),
                    None,
                )
                .unwrap();
        }
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("an operation blocked on a full sink");
    assert_eq!(rig.sink.dropped(), 3);
    let got: Vec<_> = rig.drain();
    assert_eq!(
        got.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
        [
            EventKind::WorkspaceCreated {
                scope: ScopeRef::workspace(ORG, "w0")
            },
            EventKind::WorkspaceCreated {
                scope: ScopeRef::workspace(ORG, "w1")
            },
        ]
    );
    assert_eq!(rig.doc().workspaces.len(), 6, "every change applied");
    // Requests too: denials with a full sink still return at once.
    let full = rig_with(base(), clock(), 1);
    for _ in 0..100 {
        let _ = full.engine.check_and_reserve(&req("sk-nope", 1, 0));
    }
    assert_eq!(full.sink.dropped(), 6, "7 sampled denials, 1 delivered");
}

// ---------------------------------------------------------------------------------
// 8. Policy files.
// ---------------------------------------------------------------------------------

/// A file in the temp directory, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "tollgate-control-{}-{nanos}-{}-{name}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn file_policy(rpm: &str) -> String {
    format!(
        r#"
[org]
id = "acme"

[[models]]
name = "m"
input_per_million = "1000"
output_per_million = "1000"

[[workspaces]]
id = "ws"
name = "chatbot-production"
models = ["m"]
limits = {{ rpm = {rpm} }}

[[workspaces]]
id = "ws-new"
name = "batch-jobs"
models = ["m"]

[[keys]]
id = "k"
workspace = "ws"
secret_sha256 = "{k}"

[[keys]]
id = "k-new"
workspace = "ws-new"
secret_sha256 = "{new}"
"#,
        k = KeySpec::digest_of("sk-k"),
        new = KeySpec::digest_of("sk-new"),
    )
}

#[test]
fn apply_policy_file_replaces_the_policy_and_keeps_counters() {
    let mut doc = base().key(KeySpec::new("gone", "ws", "sk-gone"));
    doc.workspaces[0].limits = limits(|l| l.rpm = Some(100));
    let rig = rig(doc);
    for _ in 0..3 {
        rig.spend("sk-k", 100);
    }
    rig.spend("sk-gone", 1);
    let text = file_policy("1");
    let file = TempFile::new("valid.toml", &text);

    rig.engine
        .apply_policy_file(&file.0, Some("alice"))
        .unwrap();

    assert_eq!(
        rig.doc(),
        Policy::from_toml_str(&text).unwrap().document().clone()
    );
    let event = rig.one_event();
    assert_eq!(
        event,
        Event {
            at: rig.now(),
            actor: Some("alice".into()),
            kind: EventKind::PolicyApplied {
                workspaces: 2,
                keys: 2,
            },
        }
    );
    let v = json(&event);
    assert_eq!(
        (&v["type"], &v["workspaces"], &v["keys"]),
        (&"policy_applied".into(), &2.into(), &2.into())
    );
    let ws = rig.usage_of_workspace("ws").current;
    assert_eq!((ws.requests, ws.cost), (4, dec("0.301")), "counters kept");
    assert_eq!(rig.usage_of_key("k").current.cost, dec("0.3"));
    assert_eq!(rig.engine.usage().org.current.cost, dec("0.301"));
    // rpm = 1 applies at once, on the kept counters.
    assert_eq!(
        denied(&rig.engine, &req("sk-k", 1, 0)),
        DenialReason::RequestsPerMinute
    );
    assert_eq!(
        denied(&rig.engine, &req("sk-gone", 1, 0)),
        DenialReason::UnknownKey
    );
    rig.spend("sk-new", 2);
    assert_eq!(rig.usage_of_workspace("ws-new").current.cost, dec("0.002"));
}

#[test]
fn apply_policy_file_errors_change_nothing() {
    let rig = rig(base());
    rig.spend("sk-k", 100);
    let before = rig.doc();
    let usage_before = rig.engine.usage();

    let bad_toml = TempFile::new("bad.toml", "[org\nid = ");
    match rig.engine.apply_policy_file(&bad_toml.0, Some("alice")) {
        Err(PolicyError::Parse { format, message }) => {
            assert_eq!(format, "TOML");
            assert!(!message.is_empty());
        }
        other => panic!("expected a TOML parse error, got {other:?}"),
    }
    assert_unchanged(&rig, &before, "bad TOML");

    let bad_json = TempFile::new("bad.json", "{\"org\": ");
    match rig.engine.apply_policy_file(&bad_json.0, Some("alice")) {
        Err(PolicyError::Parse { format, .. }) => assert_eq!(format, "JSON"),
        other => panic!("expected a JSON parse error, got {other:?}"),
    }
    assert_unchanged(&rig, &before, "bad JSON");

    let invalid = TempFile::new("invalid.toml", &file_policy("0"));
    let got = single_issue(rig.engine.apply_policy_file(&invalid.0, Some("alice")));
    assert_eq!(
        got,
        issue("workspaces[0].limits.rpm", "0", Problem::NotPositive)
    );
    assert_unchanged(&rig, &before, "invalid policy");

    let missing = std::env::temp_dir().join(format!(
        "tollgate-control-{}-missing.toml",
        std::process::id()
    ));
    match rig.engine.apply_policy_file(&missing, Some("alice")) {
        Err(PolicyError::Io { path, .. }) => assert!(path.contains("missing"), "{path}"),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert_unchanged(&rig, &before, "missing file");

    let mut after = rig.engine.usage();
    after.taken_at = usage_before.taken_at;
    assert_eq!(after, usage_before);
    // The running policy still serves: `sk-new` is unknown, `sk-k` has no rpm limit.
    assert_eq!(
        denied(&rig.engine, &req("sk-new", 1, 0)),
        DenialReason::UnknownKey
    );
    for _ in 0..3 {
        rig.spend("sk-k", 1);
    }
}

// ---------------------------------------------------------------------------------
// 9. Concurrent traffic while keys are rotated and revoked and limits edited.
// ---------------------------------------------------------------------------------

const STRESS_KEYS: usize = 8;
const STRESS_WORKERS: usize = 4;
const STRESS_REQUESTS: usize = 20_000;
/// Keys rotated with zero grace over and over.
const ROTATED: [usize; 3] = [0, 1, 4];
/// Keys revoked, in this order, as traffic reaches 20 %, 40 %, 60 % and 80 %.
const REVOKED: [usize; 4] = [2, 3, 4, 5];

#[derive(Default)]
struct WorkerLog {
    spent: Decimal,
    receipts: u64,
    dropped: u64,
    violations: Vec<String>,
    unknown: u64,
    revoked: u64,
    tokens: u64,
}

#[test]
fn traffic_during_rotation_revocation_and_limit_edits_keeps_every_promise() {
    let key_ids: Vec<String> = (0..STRESS_KEYS).map(|i| format!("key-{i}")).collect();
    let mut doc = PolicyDocument::new(OrgSpec::new(ORG))
        .model(ModelSpec::new("m", dec("1000"), dec("1000")))
        .workspace(
            WorkspaceSpec::new("ws", "chatbot-production")
                .grant("m")
                .limits(limits(|l| l.tpm = Some(600_000_000)))
                .budget(BudgetSpec::new(dec("1000000"), BudgetPeriod::Month)),
        );
    doc.org.budget = Some(BudgetSpec::new(dec("1000000"), BudgetPeriod::Month));
    for (i, id) in key_ids.iter().enumerate() {
        doc = doc.key(KeySpec::new(id.clone(), "ws", &format!("sk-initial-{i}")));
    }
    // A manual clock that only the control thread moves, by 1 s every third step (at
    // most 1,000 s from 2026-11-23 12:00: the month's budgets never roll over).
    let rig = rig(doc);
    let engine = rig.engine.clone();
    let clock = rig.clock.clone();
    let period_start = rig.usage_of_workspace("ws").current.period_start;

    let secrets: Arc<Vec<RwLock<String>>> = Arc::new(
        (0..STRESS_KEYS)
            .map(|i| RwLock::new(format!("sk-initial-{i}")))
            .collect(),
    );
    let revoked_done: Arc<Vec<AtomicBool>> =
        Arc::new((0..STRESS_KEYS).map(|_| AtomicBool::new(false)).collect());
    let progress = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let key_ids = Arc::new(key_ids);
    let started = Instant::now();

    let workers: Vec<_> = (0..STRESS_WORKERS)
        .map(|_| {
            let (engine, secrets, revoked_done, progress, key_ids) = (
                engine.clone(),
                Arc::clone(&secrets),
                Arc::clone(&revoked_done),
                Arc::clone(&progress),
                Arc::clone(&key_ids),
            );
            thread::spawn(move || {
                let mut rng = rand::rng();
                let mut log = WorkerLog::default();
                for n in 0..STRESS_REQUESTS / STRESS_WORKERS {
                    let k = rng.random_range(0..STRESS_KEYS);
                    let secret = secrets[k].read().unwrap().clone();
                    let input = rng.random_range(0..200u32);
                    let output = rng.random_range(0..200u32);
                    let by_id = rng.random_ratio(1, 5);
                    let request = if by_id {
                        Request::with_key_id(&key_ids[k], "m")
                    } else {
                        Request::with_secret(&secret, "m")
                    }
                    .input_tokens(input)
                    .max_output_tokens(output);
                    // Read before the request starts.
                    let revoked_before = revoked_done[k].load(Ordering::SeqCst);
                    match engine.check_and_reserve(&request) {
                        Ok(r) => {
                            if revoked_before {
                                log.violations.push(format!(
                                    "request {n} on {} (by id: {by_id}) admitted after its \
                                     revocation returned",
                                    key_ids[k]
                                ));
                            }
                            if rng.random_ratio(1, 20) {
                                drop(r);
                                log.dropped += 1;
                            } else {
                                let (ri, ro) = r.reserved_tokens();
                                let used = Usage::new(
                                    rng.random_range(0..=ri as u32),
                                    rng.random_range(0..=ro as u32),
                                );
                                let receipt = engine.commit_usage(r, used).unwrap();
                                assert_eq!(receipt.overage(), Decimal::ZERO);
                                log.spent += receipt.cost();
                                log.receipts += 1;
                            }
                        }
                        Err(d) => match d.reason {
                            DenialReason::UnknownKey => log.unknown += 1,
                            DenialReason::KeyRevoked => log.revoked += 1,
                            DenialReason::TokensPerMinute => log.tokens += 1,
                            other => log
                                .violations
                                .push(format!("unexpected denial {other:?}: {d:?}")),
                        },
                    }
                    progress.fetch_add(1, Ordering::SeqCst);
                }
                log
            })
        })
        .collect();

    let control = {
        let (engine, secrets, revoked_done, progress, finished, key_ids, clock) = (
            engine.clone(),
            Arc::clone(&secrets),
            Arc::clone(&revoked_done),
            Arc::clone(&progress),
            Arc::clone(&finished),
            Arc::clone(&key_ids),
            clock.clone(),
        );
        thread::spawn(move || {
            let mut next_revoke = 0;
            let mut steps = 0u32;
            let tpms = [600_000_000, 200_000, 5_000_000, 50_000, 50_000_000];
            while steps < 3_000 && !finished.load(Ordering::SeqCst) {
                // Revocations follow the traffic, so they land mid-run.
                let done = progress.load(Ordering::SeqCst);
                if next_revoke < REVOKED.len()
                    && done >= (next_revoke + 1) * STRESS_REQUESTS / (REVOKED.len() + 1)
                {
                    let k = REVOKED[next_revoke];
                    engine.revoke_key(&key_ids[k], Some("control")).unwrap();
                    revoked_done[k].store(true, Ordering::SeqCst);
                    next_revoke += 1;
                }
                match steps % 3 {
                    0 => {
                        let k = ROTATED[(steps as usize / 3) % ROTATED.len()];
                        let issued = engine
                            .rotate_key(&key_ids[k], Duration::ZERO, Some("control"))
                            .unwrap();
                        *secrets[k].write().unwrap() = issued.secret;
                    }
                    1 => {
                        let tpm = tpms[(steps as usize / 3) % tpms.len()];
                        engine
                            .update_workspace(
                                "ws",
                                WorkspaceUpdate {
                                    limits: Some(limits(|l| l.tpm = Some(tpm))),
                                    ..WorkspaceUpdate::default()
                                },
                                Some("control"),
                            )
                            .unwrap();
                    }
                    _ => clock.advance(Duration::from_secs(1)),
                }
                steps += 1;
                thread::sleep(Duration::from_micros(50));
            }
            // Whatever the timing, every planned revocation happens.
            for &k in &REVOKED[next_revoke..] {
                engine.revoke_key(&key_ids[k], Some("control")).unwrap();
                revoked_done[k].store(true, Ordering::SeqCst);
            }
            (steps, next_revoke)
        })
    };

    let logs: Vec<WorkerLog> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    finished.store(true, Ordering::SeqCst);
    let (steps, revoked_mid_run) = control.join().unwrap();
    let elapsed = started.elapsed();

    let violations: Vec<_> = logs.iter().flat_map(|l| l.violations.clone()).collect();
    assert!(
        violations.is_empty(),
        "{} violations, first: {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    let spent: Decimal = logs.iter().map(|l| l.spent).sum();
    let receipts: u64 = logs.iter().map(|l| l.receipts).sum();
    let sum = |f: fn(&WorkerLog) -> u64| logs.iter().map(f).sum::<u64>();
    let summary = format!(
        "{receipts} committed, {} dropped, {} unknown, {} revoked, {} tpm; \
         {steps} control steps, {revoked_mid_run} revoked mid-run, {elapsed:?}",
        sum(|l| l.dropped),
        sum(|l| l.unknown),
        sum(|l| l.revoked),
        sum(|l| l.tokens),
    );
    eprintln!("{summary}");

    let usage = engine.usage();
    let ws = &usage.workspaces[0];
    assert_eq!(ws.usage.current.cost, spent, "workspace books: {summary}");
    assert_eq!(usage.org.current.cost, spent, "org books: {summary}");
    assert_eq!(ws.usage.current.requests, receipts);
    assert_eq!(usage.org.current.requests, receipts);
    assert_eq!(ws.usage.current.period_start, period_start, "no rollover");
    let key_spend: Decimal = usage.keys.iter().map(|k| k.usage.current.cost).sum();
    assert_eq!(key_spend, spent, "keys' books");
    assert_eq!(ws.usage.current.held, Decimal::ZERO, "no hold left");
    assert_eq!(usage.org.current.held, Decimal::ZERO);
    for k in &usage.keys {
        assert_eq!(k.usage.current.held, Decimal::ZERO, "{}", k.id);
    }
    for m in &ws.models {
        assert_eq!(m.usage.current.held, Decimal::ZERO, "{}", m.model);
    }
    assert!(receipts > 1_000, "too little traffic admitted: {summary}");
    assert!(
        sum(|l| l.revoked) > 0,
        "no revoked-key denial seen: {summary}"
    );

    // Afterwards: revoked keys refused by id and secret, the rest served.
    for k in 0..STRESS_KEYS {
        let secret = secrets[k].read().unwrap().clone();
        for request in [
            Request::with_key_id(&key_ids[k], "m"),
            Request::with_secret(&secret, "m").max_output_tokens(0),
        ] {
            let outcome = engine.check_and_reserve(&request).map(drop);
            if REVOKED.contains(&k) {
                assert_eq!(
                    outcome.map_err(|d| d.reason),
                    Err(DenialReason::KeyRevoked),
                    "{}",
                    key_ids[k]
                );
            } else if let Err(d) = outcome {
                assert_eq!(
                    d.reason,
                    DenialReason::TokensPerMinute,
                    "{} with its current secret: {d:?}",
                    key_ids[k]
                );
            }
        }
    }
    assert!(
        elapsed < Duration::from_secs(30),
        "took too long: {summary}"
    );
}

// ---------------------------------------------------------------------------------
// Edits that change how counters must be read: a budget's period kind, its limit
// (alerts), and lowered rate limits (a GCRA backlog is time; it is rescaled).
// ---------------------------------------------------------------------------------

#[test]
fn changing_a_budget_period_takes_effect_from_the_next_request() {
    let mut doc = base();
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("100"), BudgetPeriod::Month));
    let rig = rig(doc);
    rig.spend("sk-k", 50_000); // 50 USD today, 2026-11-23
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                budget: Some(Some(BudgetSpec::new(dec("60"), BudgetPeriod::Day))),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    let midnight =
        |d| Timestamp::from_datetime(Utc.with_ymd_and_hms(2026, 11, d, 0, 0, 0).unwrap());
    let now = rig.usage_of_workspace("ws").current;
    assert_eq!(
        (now.period_start, now.period_end),
        (midnight(23), midnight(24)),
        "a daily budget counts today"
    );
    // The next day starts from nothing: 20 USD fit in 60.
    rig.clock.advance(Duration::from_secs(86_400));
    assert_eq!(rig.usage_of_workspace("ws").current.cost, Decimal::ZERO);
    rig.spend("sk-k", 20_000);
}

#[test]
fn raising_a_budget_mid_period_reports_the_new_budgets_thresholds() {
    let mut doc = base();
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("1"), BudgetPeriod::Day));
    let rig = rig(doc);
    let ws = || ScopeRef::workspace(ORG, "ws");
    rig.spend("sk-k", 850);
    assert_eq!(budget_events(&rig).len(), 2, "50 % and 80 % of 1 USD");
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                budget: Some(Some(BudgetSpec::new(dec("10"), BudgetPeriod::Day))),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    rig.drain();
    rig.spend("sk-k", 4_700); // 5.55 of 10 USD
    assert_eq!(
        budget_events(&rig),
        [(Some(50), ws(), dec("5.55"), dec("10"))],
        "committed spend reached 50 % of the new budget"
    );
    rig.spend("sk-k", 3_000); // 8.55 of 10 USD
    assert_eq!(
        budget_events(&rig),
        [(Some(80), ws(), dec("8.55"), dec("10"))]
    );
}

#[test]
fn lowering_rpm_below_the_requests_already_made_refuses_the_next_request() {
    let mut doc = base();
    doc.workspaces[0].limits = limits(|l| l.rpm = Some(100));
    let rig = rig(doc);
    for _ in 0..4 {
        rig.spend("sk-k", 1);
    }
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                limits: Some(limits(|l| l.rpm = Some(2))),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    // Four requests this minute already, under a limit of two per minute.
    assert_eq!(
        denied(&rig.engine, &req("sk-k", 1, 0)),
        DenialReason::RequestsPerMinute
    );
}

#[test]
fn lowering_tpm_below_the_tokens_already_used_refuses_what_does_not_fit() {
    let mut doc = base();
    doc.workspaces[0].limits = limits(|l| l.tpm = Some(10_000));
    let rig = rig(doc);
    rig.spend("sk-k", 1_000);
    rig.engine
        .update_workspace(
            "ws",
            WorkspaceUpdate {
                limits: Some(limits(|l| l.tpm = Some(1_100))),
                ..WorkspaceUpdate::default()
            },
            None,
        )
        .unwrap();
    // 1,000 tokens used this minute + 200 > 1,100.
    assert_eq!(
        denied(&rig.engine, &req("sk-k", 200, 0)),
        DenialReason::TokensPerMinute
    );
}
