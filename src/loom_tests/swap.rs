//! Model 5: a live policy swap racing a request on a key that persists.
//!
//! The applier revokes one key and halves the workspace's rate while the other key
//! reserves and commits. Whichever snapshot the request reserved under, its counters
//! must be the ones the new policy carries on: a commit settling into counters the
//! swap discarded would vanish from usage and from the rate limit.

use loom::thread;
use rust_decimal::Decimal;

use crate::{
    DenialReason, KeySpec, KeyStatus, LimitsSpec, ModelSpec, OrgSpec, Policy, PolicyDocument,
    Quota, Request, Scope, Usage, WorkspaceSpec,
};

fn request(key: &str) -> Request<'_> {
    Request::with_key_id(key, "m")
        .input_tokens(100)
        .max_output_tokens(100)
}

/// Keys `kept` and `revoked` in one workspace allowing `rpm` requests per minute.
fn policy(rpm: i64, revoked: KeyStatus) -> Policy {
    let workspace = WorkspaceSpec::new("ws", "chatbot-production")
        .grant("m")
        .limits(LimitsSpec {
            rpm: Some(rpm),
            ..LimitsSpec::default()
        });
    let mut gone = KeySpec::new("revoked", "ws", "sk-revoked");
    gone.status = revoked;
    Policy::new(
        PolicyDocument::new(OrgSpec::new("org"))
            .model(ModelSpec::new("m", Decimal::ONE, Decimal::ONE))
            .workspace(workspace)
            .key(KeySpec::new("kept", "ws", "sk-kept"))
            .key(gone),
    )
    .unwrap()
}

#[test]
fn a_swap_racing_reserve_and_commit_keeps_persisting_counters() {
    let before = policy(2, KeyStatus::Active);
    let after = policy(1, KeyStatus::Revoked);
    super::check("swap/apply races reserve+commit", move || {
        let engine = super::frozen_engine(before.clone());
        let applier = {
            let engine = engine.clone();
            let after = after.clone();
            thread::spawn(move || {
                engine.apply_policy(after).unwrap();
                let denial = engine.check_and_reserve(&request("revoked")).unwrap_err();
                assert_eq!(denial.reason, DenialReason::KeyRevoked);
            })
        };
        // Fits under either policy: both workspace buckets start empty.
        let reservation = engine.check_and_reserve(&request("kept")).unwrap();
        engine
            .commit_usage(reservation, Usage::new(10, 20))
            .unwrap();
        applier.join().unwrap();

        let usage = engine.usage();
        let spent = Decimal::new(30, 6);
        for (scope, report) in [
            ("key", &usage.keys[0].usage),
            ("workspace", &usage.workspaces[0].usage),
            ("workspace x model", &usage.workspaces[0].models[0].usage),
            ("org", &usage.org),
        ] {
            let c = &report.current;
            assert_eq!(
                (c.requests, c.input_tokens, c.output_tokens, c.cost, c.held),
                (1, 10, 20, spent, Decimal::ZERO),
                "{scope} lost the commit"
            );
        }
        let revoked = engine.check_and_reserve(&request("revoked")).unwrap_err();
        assert_eq!(revoked.reason, DenialReason::KeyRevoked);

        // The new limit of one applies to the bucket that already counted the request.
        let next = engine.check_and_reserve(&request("kept")).unwrap_err();
        assert_eq!(
            (next.scope, next.reason),
            (Scope::Workspace, DenialReason::RequestsPerMinute)
        );
        assert!(matches!(
            next.quota,
            Some(Quota::Requests {
                limit: 1,
                remaining: 0,
                ..
            })
        ));
    });
}
