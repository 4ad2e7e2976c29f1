//! Model 3: the multi-level reserve is all or nothing, through the real engine.
//!
//! Two keys of one workspace race for a workspace × model limit of one request per
//! minute. That is the third of five levels, so the loser has already taken its key
//! and workspace levels when it is refused and must give both back while the winner
//! keeps its own holds on the same workspace.

use loom::thread;
use rust_decimal::Decimal;

use crate::{
    DenialReason, KeySpec, LimitsSpec, ModelLimitSpec, ModelSpec, OrgSpec, Policy, PolicyDocument,
    Request, Scope, ScopeReport, Usage, UsageSnapshot, WorkspaceSpec,
};

const KEYS: [&str; 2] = ["k0", "k1"];

/// 100 in + 100 out at $1 per million tokens each way.
fn cost() -> Decimal {
    Decimal::new(2, 4)
}

fn request(key: &str) -> Request<'_> {
    Request::with_key_id(key, "m")
        .input_tokens(100)
        .max_output_tokens(100)
}

/// Every level holds something observable: the keys one request per minute each,
/// the workspace a concurrency slot (two, so both requests get past it), the
/// workspace × model the one contested request, and every level the held cost.
fn policy() -> Policy {
    let mut workspace = WorkspaceSpec::new("ws", "chatbot-production").grant("m");
    workspace.limits = LimitsSpec {
        max_concurrent: Some(2),
        ..LimitsSpec::default()
    };
    workspace.model_limits = vec![ModelLimitSpec {
        model: "m".into(),
        rpm: Some(1),
        ..ModelLimitSpec::default()
    }];
    let mut document = PolicyDocument::new(OrgSpec::new("org"))
        .model(ModelSpec::new("m", Decimal::ONE, Decimal::ONE))
        .workspace(workspace);
    for (n, id) in KEYS.into_iter().enumerate() {
        let mut key = KeySpec::new(id, "ws", &format!("sk-{n}"));
        key.limits.rpm = Some(1);
        document = document.key(key);
    }
    Policy::new(document).unwrap()
}

/// Held cost and slots of every level, in level order: the two keys, the workspace,
/// its model, the org.
fn holds(usage: &UsageSnapshot) -> [(Decimal, u32); 5] {
    let of = |r: &ScopeReport| (r.current.held, r.in_flight);
    let ws = &usage.workspaces[0];
    [
        of(&usage.keys[0].usage),
        of(&usage.keys[1].usage),
        of(&ws.usage),
        of(&ws.models[0].usage),
        of(&usage.org),
    ]
}

#[test]
fn a_request_refused_at_a_later_level_gives_back_the_earlier_ones() {
    let policy = policy();
    super::check("reserve/two keys race for ws x model rpm=1", move || {
        let engine = super::frozen_engine(policy.clone());
        let racer = {
            let engine = engine.clone();
            thread::spawn(move || engine.check_and_reserve(&request(KEYS[1])))
        };
        let mine = engine.check_and_reserve(&request(KEYS[0]));
        let theirs = racer.join().unwrap();

        // The levels before the contested one have room for both, so a transient
        // hold of the loser can never make the winner fail too.
        let (winner, loser, reservation, denial) = match (mine, theirs) {
            (Ok(r), Err(d)) => (0, 1, r, d),
            (Err(d), Ok(r)) => (1, 0, r, d),
            both => panic!("exactly one request fits the workspace x model: {both:?}"),
        };
        assert_eq!(
            (denial.scope, denial.reason),
            (Scope::WorkspaceModel, DenialReason::RequestsPerMinute)
        );

        let usage = engine.usage();
        let mut expected = [
            (cost(), 0),
            (cost(), 0),
            (cost(), 1),
            (cost(), 0),
            (cost(), 0),
        ];
        expected[loser] = (Decimal::ZERO, 0);
        assert_eq!(holds(&usage), expected, "only the winner holds anything");
        assert!(usage.keys.iter().all(|k| k.usage.current.requests == 0));

        // Had the loser's key kept its one request per minute, this would be refused
        // at the key; it gets as far as the contested level again instead.
        let again = engine.check_and_reserve(&request(KEYS[loser])).unwrap_err();
        assert_eq!(again.scope, Scope::WorkspaceModel);

        drop(reservation);
        let fresh = engine
            .check_and_reserve(&request(KEYS[loser]))
            .expect("the loser's key and the winner's dropped holds are free again");
        engine.commit_usage(fresh, Usage::new(100, 50)).unwrap();
        let usage = engine.usage();
        assert_eq!(holds(&usage), [(Decimal::ZERO, 0); 5]);
        assert_eq!(usage.keys[loser].usage.current.requests, 1);
        assert_eq!(usage.keys[winner].usage.current.requests, 0);
        assert_eq!(usage.workspaces[0].usage.current.requests, 1);
    });
}
