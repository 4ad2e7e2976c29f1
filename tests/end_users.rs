//! End-user limits (issue 18) on the in-memory engine: each end user its own rates
//! and budget, created on first sight, bounded by `max_tracked` and `idle_secs`.
//! Time is the manual clock's, never slept on.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use tollgate::*;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// 2026-11-23 12:00:00 UTC.
fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::at(
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap(),
    ))
}

fn engine(doc: PolicyDocument, clock: &Arc<ManualClock>) -> Engine {
    Engine::builder(Policy::new(doc).expect("valid policy"))
        .clock(clock.clone())
        .build()
}

/// Workspace `ws` granted `m` ($1 per million tokens in and out) with `end_users`,
/// key `k` (secret `sk-k`); workspace `plain` without end-user limits, key `p`.
fn doc(end_users: EndUserLimitsSpec) -> PolicyDocument {
    PolicyDocument::new(OrgSpec::new("org"))
        .model(ModelSpec::new("m", dec("1"), dec("1")))
        .workspace(
            WorkspaceSpec::new("ws", "chatbot-production")
                .grant("m")
                .end_user_limits(end_users),
        )
        .workspace(WorkspaceSpec::new("plain", "plain").grant("m"))
        .key(KeySpec::new("k", "ws", "sk-k"))
        .key(KeySpec::new("p", "plain", "sk-p"))
}

fn rpm(n: i64) -> EndUserLimitsSpec {
    EndUserLimitsSpec::new(LimitsSpec {
        rpm: Some(n),
        ..LimitsSpec::default()
    })
}

/// `tokens` input tokens, no output, for end user `user`: costs `tokens` µ$.
fn ask(user: &str, tokens: u32) -> Request<'_> {
    Request::with_key_id("k", "m")
        .input_tokens(tokens)
        .max_output_tokens(0)
        .end_user(user)
}

fn admit(engine: &Engine, request: &Request<'_>) -> Reservation {
    engine
        .check_and_reserve(request)
        .unwrap_or_else(|d| panic!("{request:?} refused: {d}"))
}

fn spend(engine: &Engine, user: &str, tokens: u32) {
    let r = admit(engine, &ask(user, tokens));
    engine.commit_usage(r, Usage::new(tokens, 0)).unwrap();
}

fn tracked(engine: &Engine) -> usize {
    engine.usage().workspaces[0].end_users_tracked.unwrap()
}

#[test]
fn each_end_user_has_its_own_rate_limit() {
    let clock = clock();
    let engine = engine(doc(rpm(2)), &clock);
    for _ in 0..2 {
        spend(&engine, "alice", 1);
    }
    let denial = engine.check_and_reserve(&ask("alice", 1)).unwrap_err();
    assert_eq!(denial.scope, Scope::EndUser);
    assert_eq!(denial.reason, DenialReason::RequestsPerMinute);
    assert_eq!(denial.http_status(), 429);
    assert!(denial.to_string().starts_with("end user limit reached"));
    // Another end user, and a request naming none, are not held back by alice.
    spend(&engine, "bob", 1);
    spend(&engine, "bob", 1);
    let anonymous = Request::with_key_id("k", "m").max_output_tokens(0);
    for _ in 0..5 {
        let r = admit(&engine, &anonymous);
        assert!(!r.is_end_user_limited());
        engine.commit_usage(r, Usage::new(0, 0)).unwrap();
    }
    // A workspace without end-user limits ignores the end user.
    for _ in 0..5 {
        let r = admit(
            &engine,
            &Request::with_key_id("p", "m")
                .max_output_tokens(0)
                .end_user("alice"),
        );
        assert!(!r.is_end_user_limited());
        drop(r);
    }
    assert_eq!(tracked(&engine), 2);
    assert_eq!(engine.usage().workspaces[1].end_users_tracked, None);
    // A minute later alice has room again.
    clock.advance(Duration::from_secs(60));
    spend(&engine, "alice", 1);
}

#[test]
fn end_user_budget_is_exact_and_per_user() {
    let clock = clock();
    // $0.001 each: 1,000 tokens at $1 per million.
    let spec = EndUserLimitsSpec::new(LimitsSpec::default())
        .budget(BudgetSpec::new(dec("0.001"), BudgetPeriod::Month));
    let engine = engine(doc(spec), &clock);
    spend(&engine, "alice", 600);
    spend(&engine, "alice", 400); // exactly the budget
    let denial = engine.check_and_reserve(&ask("alice", 1)).unwrap_err();
    assert_eq!(denial.scope, Scope::EndUser);
    assert_eq!(denial.reason, DenialReason::Budget);
    assert_eq!(
        denial.quota,
        Some(Quota::Money {
            limit: dec("0.001"),
            remaining: dec("0"),
            requested: dec("0.000001"),
        })
    );
    // Bob's budget is his own.
    spend(&engine, "bob", 1000);
    let alice = engine.end_user_usage("ws", "alice").unwrap();
    assert_eq!(alice.current.cost, dec("0.001"));
    assert_eq!(alice.current.requests, 2);
    assert_eq!(alice.current.input_tokens, 1000);
    assert_eq!(
        engine.end_user_usage("ws", "bob").unwrap().current.cost,
        dec("0.001")
    );
    assert_eq!(engine.end_user_usage("ws", "carol"), None);
    assert_eq!(engine.end_user_usage("plain", "alice"), None);
    // The workspace saw all of it.
    assert_eq!(
        engine.usage().workspaces[0].usage.current.cost,
        dec("0.002")
    );
}

#[test]
fn a_refusal_at_a_later_level_gives_the_end_users_hold_back() {
    let clock = clock();
    let mut doc = doc(EndUserLimitsSpec::new(LimitsSpec::default())
        .budget(BudgetSpec::new(dec("1"), BudgetPeriod::Month)));
    doc.workspaces[0].limits.rpm = Some(1);
    let engine = engine(doc, &clock);
    let r = admit(&engine, &ask("alice", 500));
    assert_eq!(
        engine.end_user_usage("ws", "alice").unwrap().current.held,
        dec("0.0005")
    );
    // The workspace's rpm refuses after the end user's level took its share...
    let denial = engine.check_and_reserve(&ask("alice", 100)).unwrap_err();
    assert_eq!(denial.scope, Scope::Workspace);
    // ...which went back: only the first request is held.
    assert_eq!(
        engine.end_user_usage("ws", "alice").unwrap().current.held,
        dec("0.0005")
    );
    drop(r);
    assert_eq!(
        engine.end_user_usage("ws", "alice").unwrap().current.held,
        dec("0")
    );
}

#[test]
fn bad_end_user_ids_are_refused_not_panicked_on() {
    let clock = clock();
    let engine = engine(doc(rpm(10)), &clock);
    let long = "x".repeat(MAX_END_USER_LEN + 1);
    for bad in ["", "a\nb", "tab\there", long.as_str()] {
        for key in ["k", "p"] {
            let request = Request::with_key_id(key, "m").end_user(bad);
            let denial = engine.check_and_reserve(&request).unwrap_err();
            assert_eq!(denial.reason, DenialReason::InvalidEndUser, "{bad:?}");
            assert_eq!(denial.scope, Scope::EndUser);
            assert_eq!(denial.http_status(), 400);
            assert_eq!(denial.code(), "invalid_end_user");
        }
    }
    let longest = "y".repeat(MAX_END_USER_LEN);
    spend(&engine, &longest, 1);
    spend(&engine, "ünïcode@example.com", 1);
    assert_eq!(tracked(&engine), 2);
}

#[test]
fn the_cap_forgets_the_least_recently_seen_idle_end_user() {
    let clock = clock();
    // 16 end users: one per shard.
    let engine = engine(doc(rpm(1).max_tracked(16)), &clock);
    let users: Vec<String> = (0..2_000).map(|i| format!("user-{i}")).collect();
    for user in &users {
        spend(&engine, user, 1);
        clock.advance(Duration::from_millis(1));
        assert!(tracked(&engine) <= 16);
    }
    assert_eq!(tracked(&engine), 16);
    // The most recent end user is still tracked (its rpm is spent)...
    let last = users.last().unwrap();
    let denial = engine.check_and_reserve(&ask(last, 1)).unwrap_err();
    assert_eq!(denial.scope, Scope::EndUser);
    // ...the first was forgotten and starts afresh.
    assert_eq!(engine.end_user_usage("ws", &users[0]), None);
    spend(&engine, &users[0], 1);
}

#[test]
fn a_full_shard_of_end_users_in_flight_refuses_a_new_one() {
    let clock = clock();
    let engine = engine(doc(rpm(100).max_tracked(16)), &clock);
    // Hold a request for many end users: every shard fills with end users in flight.
    let mut held = Vec::new();
    let mut refused = None;
    for i in 0..1_000 {
        let user = format!("user-{i}");
        match engine.check_and_reserve(&ask(&user, 1)) {
            Ok(r) => held.push(r),
            Err(denial) => {
                refused = Some(denial);
                break;
            }
        }
    }
    let denial = refused.expect("a full shard refuses");
    assert_eq!(denial.scope, Scope::EndUser);
    assert_eq!(denial.reason, DenialReason::Concurrency);
    assert_eq!(
        denial.quota,
        Some(Quota::Concurrent {
            limit: 1,
            in_flight: 1
        })
    );
    assert!(held.len() <= 16);
    assert_eq!(tracked(&engine), held.len());
    // Once they settle, new end users find room again.
    for r in held {
        engine.commit_usage(r, Usage::new(1, 0)).unwrap();
    }
    for i in 1_000..1_100 {
        spend(&engine, &format!("user-{i}"), 1);
    }
    assert_eq!(tracked(&engine), 16);
}

#[test]
fn idle_end_users_are_forgotten_when_room_is_needed() {
    let clock = clock();
    // 8 end users per shard.
    let spec = rpm(1).max_tracked(128).idle_secs(600);
    let engine = engine(doc(spec), &clock);
    for i in 0..2_000 {
        spend(&engine, &format!("user-{i}"), 1);
    }
    assert_eq!(tracked(&engine), 128);
    // Nobody idle yet: a new end user displaces one, the least recently seen.
    spend(&engine, "newcomer-0", 1);
    assert_eq!(tracked(&engine), 128);
    // Past idle_secs: the next new end user's shard forgets all its idle end users
    // (8, the newcomer among them) at once, and the newcomer takes one place.
    clock.advance(Duration::from_secs(601));
    spend(&engine, "newcomer-1", 1);
    assert_eq!(tracked(&engine), 128 - 8 + 1);
    // A forgotten end user starts afresh; its old counters are gone.
    assert_eq!(
        engine
            .end_user_usage("ws", "newcomer-1")
            .unwrap()
            .current
            .requests,
        1
    );
}

#[test]
fn an_end_user_with_a_request_in_flight_is_not_forgotten() {
    let clock = clock();
    let spec = EndUserLimitsSpec::new(LimitsSpec {
        max_concurrent: Some(1),
        ..LimitsSpec::default()
    })
    .budget(BudgetSpec::new(dec("1"), BudgetPeriod::Month))
    .max_tracked(64) // 4 per shard
    .idle_secs(60);
    let engine = engine(doc(spec), &clock);
    // Alice holds a request, goes idle, and many new end users pass by.
    let held = admit(&engine, &ask("alice", 700));
    clock.advance(Duration::from_secs(120));
    for i in 0..500 {
        spend(&engine, &format!("user-{i}"), 1);
    }
    assert_eq!(tracked(&engine), 64);
    // Still tracked: her concurrency slot and hold are still counted.
    let alice = engine.end_user_usage("ws", "alice").unwrap();
    assert_eq!(alice.in_flight, 1);
    assert_eq!(alice.current.held, dec("0.0007"));
    let denial = engine.check_and_reserve(&ask("alice", 1)).unwrap_err();
    assert_eq!(denial.reason, DenialReason::Concurrency);
    let receipt = engine.commit_usage(held, Usage::new(500, 0)).unwrap();
    assert_eq!(receipt.cost(), dec("0.0005"));
    let alice = engine.end_user_usage("ws", "alice").unwrap();
    assert_eq!(alice.in_flight, 0);
    assert_eq!(alice.current.held, dec("0"));
    assert_eq!(alice.current.cost, dec("0.0005"));
}

#[test]
fn a_dropped_end_users_reservations_settle_on_the_counters_they_hold() {
    let clock = clock();
    let spec = EndUserLimitsSpec::new(LimitsSpec::default())
        .budget(BudgetSpec::new(dec("0.001"), BudgetPeriod::Month));
    let engine = engine(doc(spec.clone()), &clock);
    let committed = admit(&engine, &ask("alice", 700));
    let released = admit(&engine, &ask("alice", 300));
    // The budget is fully held: alice is refused.
    assert_eq!(
        engine
            .check_and_reserve(&ask("alice", 1))
            .unwrap_err()
            .scope,
        Scope::EndUser
    );
    // A policy without end-user limits drops the table, alice's counters with it...
    let mut plain = doc(spec.clone());
    plain.workspaces[0].end_user_limits = None;
    engine.apply_policy(Policy::new(plain).unwrap()).unwrap();
    // ...yet both reservations settle on the counters they hold, and the workspace's
    // accounts are exact.
    let receipt = engine.commit_usage(committed, Usage::new(600, 0)).unwrap();
    assert_eq!(receipt.cost(), dec("0.0006"));
    drop(released);
    let ws = engine.usage().workspaces[0].usage;
    assert_eq!(ws.current.held, dec("0"));
    assert_eq!(ws.current.cost, dec("0.0006"));
    // Limits back: a new table, alice starts afresh (documented).
    engine
        .apply_policy(Policy::new(doc(spec)).unwrap())
        .unwrap();
    assert_eq!(engine.end_user_usage("ws", "alice"), None);
    spend(&engine, "alice", 1000);
    assert_eq!(
        engine.end_user_usage("ws", "alice").unwrap().current.cost,
        dec("0.001")
    );
}

#[test]
fn settled_end_users_make_room_and_the_accounts_stay_exact() {
    let clock = clock();
    let spec = EndUserLimitsSpec::new(LimitsSpec::default())
        .budget(BudgetSpec::new(dec("1"), BudgetPeriod::Month))
        .max_tracked(64)
        .idle_secs(60);
    let engine = engine(doc(spec), &clock);
    let mut held = Vec::new();
    for i in 0..16 {
        held.push(admit(&engine, &ask(&format!("held-{i}"), 100)));
    }
    // Settle them one by one while new end users arrive: a settled end user may be
    // forgotten at once; the rest settle on their own counters.
    let mut spent = Decimal::ZERO;
    for (i, r) in held.into_iter().enumerate() {
        clock.advance(Duration::from_secs(61));
        if i % 2 == 0 {
            drop(r);
        } else {
            spent += engine.commit_usage(r, Usage::new(50, 0)).unwrap().cost();
        }
        for j in 0..40 {
            spend(&engine, &format!("new-{i}-{j}"), 1);
            spent += dec("0.000001");
        }
    }
    let ws = engine.usage().workspaces[0].usage;
    assert_eq!(ws.current.held, dec("0"));
    assert_eq!(ws.current.cost, spent);
    // Idle sweeps may have freed more places than the newcomers took.
    assert!(tracked(&engine) <= 64);
}

#[test]
fn end_user_counters_survive_a_policy_swap_and_follow_its_rules() {
    let clock = clock();
    let engine = engine(doc(rpm(2)), &clock);
    spend(&engine, "alice", 1);
    spend(&engine, "alice", 1);
    assert!(engine.check_and_reserve(&ask("alice", 1)).is_err());
    // The same limits with another cap: counters kept.
    engine
        .apply_policy(Policy::new(doc(rpm(2).max_tracked(1_000))).unwrap())
        .unwrap();
    assert!(engine.check_and_reserve(&ask("alice", 1)).is_err());
    assert_eq!(tracked(&engine), 1);
    // A higher limit applies to the counters kept: one more request fits.
    engine
        .apply_policy(Policy::new(doc(rpm(3))).unwrap())
        .unwrap();
    spend(&engine, "alice", 1);
    let denial = engine.check_and_reserve(&ask("alice", 1)).unwrap_err();
    assert_eq!(denial.scope, Scope::EndUser);
    assert_eq!(
        engine
            .end_user_usage("ws", "alice")
            .unwrap()
            .current
            .requests,
        3
    );
    // Limits removed: the end user is no longer limited, nor tracked.
    let mut plain = doc(rpm(3));
    plain.workspaces[0].end_user_limits = None;
    engine.apply_policy(Policy::new(plain).unwrap()).unwrap();
    spend(&engine, "alice", 1);
    assert_eq!(engine.usage().workspaces[0].end_users_tracked, None);
}

#[test]
fn a_reservation_taken_before_a_swap_settles_after_it() {
    let clock = clock();
    let spec = EndUserLimitsSpec::new(LimitsSpec::default())
        .budget(BudgetSpec::new(dec("0.001"), BudgetPeriod::Month));
    let engine = engine(doc(spec.clone()), &clock);
    let r = admit(&engine, &ask("alice", 800));
    engine
        .apply_policy(
            Policy::new(doc(
                spec.budget(BudgetSpec::new(dec("0.002"), BudgetPeriod::Month))
            ))
            .unwrap(),
        )
        .unwrap();
    engine.commit_usage(r, Usage::new(800, 0)).unwrap();
    let alice = engine.end_user_usage("ws", "alice").unwrap();
    assert_eq!(alice.current.cost, dec("0.0008"));
    assert_eq!(alice.current.held, dec("0"));
    spend(&engine, "alice", 1200); // the new budget: 0.002 in all
    assert!(engine.check_and_reserve(&ask("alice", 1)).is_err());
}

#[test]
fn end_user_limits_are_validated_with_their_paths() {
    let mut bad = rpm(0).max_tracked(3).idle_secs(5);
    bad.budget = Some(BudgetSpec::new(dec("-1"), BudgetPeriod::Month));
    let Err(PolicyError::Invalid { issues }) = Policy::new(doc(bad)) else {
        panic!("invalid end-user limits accepted");
    };
    let found: Vec<(String, String)> = issues
        .iter()
        .map(|i| (i.path.clone(), i.value.clone()))
        .collect();
    for (path, value) in [
        ("workspaces[0].end_user_limits.limits.rpm", "0"),
        ("workspaces[0].end_user_limits.budget.limit", "-1"),
        ("workspaces[0].end_user_limits.max_tracked", "3"),
        ("workspaces[0].end_user_limits.idle_secs", "5"),
    ] {
        assert!(
            found.contains(&(path.to_owned(), value.to_owned())),
            "{path} = {value} not in {found:?}"
        );
    }
    let too_many = rpm(1).max_tracked(MAX_TRACKED_END_USERS + 1);
    assert!(Policy::new(doc(too_many)).is_err());
    let too_long = rpm(1).idle_secs(MAX_END_USER_IDLE_SECS + 1);
    assert!(Policy::new(doc(too_long)).is_err());
}

#[test]
fn end_user_limits_read_from_toml() {
    let policy = Policy::from_toml_str(
        r#"
        [org]
        id = "acme"

        [[models]]
        name = "m"
        input_per_million = "1"
        output_per_million = "1"

        [[workspaces]]
        id = "ws"
        name = "chat"
        models = ["m"]

        [workspaces.end_user_limits]
        limits = { rpm = 20, tpm = 40000 }
        budget = { limit = "5.00", period = "day" }
        max_tracked = 50000
        idle_secs = 7200

        [[keys]]
        id = "k"
        workspace = "ws"
        secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    "#,
    )
    .unwrap();
    let spec = policy.document().workspaces[0]
        .end_user_limits
        .clone()
        .unwrap();
    assert_eq!(spec.limits.rpm, Some(20));
    assert_eq!(spec.max_tracked, Some(50_000));
    assert_eq!(spec.idle_secs, Some(7_200));
    assert_eq!(spec.budget.unwrap().limit, dec("5.00"));
}

#[test]
fn end_users_spend_survives_a_save_and_restore() {
    let clock = clock();
    let limits = EndUserLimitsSpec {
        budget: Some(BudgetSpec::new(dec("0.000010"), BudgetPeriod::Day)),
        ..rpm(100)
    };
    let engine = engine(doc(limits.clone()), &clock);
    spend(&engine, "alice/with a slash", 10);
    spend(&engine, "bob", 4);
    let path = std::env::temp_dir().join(format!(
        "tollgate-end-users-{}-{}.json",
        std::process::id(),
        clock.now().as_unix_nanos()
    ));
    engine.save_counters(&path).unwrap();

    // A restart: the same policy, counters restored. Alice's day budget is still
    // spent, Bob has 6 µ$ left, and both are tracked again.
    let restarted = Engine::builder(Policy::new(doc(limits)).unwrap())
        .clock(clock.clone())
        .restore_counters(&path)
        .unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(tracked(&restarted), 2);
    let alice = restarted
        .end_user_usage("ws", "alice/with a slash")
        .expect("restored");
    assert_eq!(alice.current.cost, dec("0.000010"));
    let refused = restarted
        .check_and_reserve(&ask("alice/with a slash", 1))
        .unwrap_err();
    assert_eq!(refused.scope, Scope::EndUser);
    assert_eq!(refused.reason, DenialReason::Budget);
    spend(&restarted, "bob", 6);
    assert_eq!(
        restarted
            .check_and_reserve(&ask("bob", 1))
            .unwrap_err()
            .reason,
        DenialReason::Budget
    );
}
