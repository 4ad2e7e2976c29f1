//! Rules that change while requests are in flight: a hold gives back what it took, in
//! the units it took, converted with the limit in force when it settles; never the
//! part of it that already drained; and a reservation from before a change of budget
//! period settles into the period the policy says now.
//!
//! Each test is a sequence that broke one of these promises before holds recorded
//! units and counters remembered their own rules (issue 12).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use tollgate::*;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Org `acme`; model `m` at 1000 USD per million tokens either way (0.001 USD a
/// token); workspace `ws` granted `m` with `limits` and `budget`; key `k` (`sk-k`).
fn engine(
    limits: LimitsSpec,
    budget: Option<BudgetSpec>,
    at: chrono::DateTime<Utc>,
) -> (Engine, Arc<ManualClock>) {
    let mut ws = WorkspaceSpec::new("ws", "chatbot-production")
        .grant("m")
        .limits(limits);
    if let Some(budget) = budget {
        ws = ws.budget(budget);
    }
    let doc = PolicyDocument::new(OrgSpec::new("acme"))
        .model(ModelSpec::new("m", dec("1000"), dec("1000")))
        .workspace(ws)
        .key(KeySpec::new("k", "ws", "sk-k"));
    let clock = Arc::new(ManualClock::at(at));
    let engine = Engine::builder(Policy::new(doc).expect("valid policy"))
        .clock(clock.clone())
        .build();
    (engine, clock)
}

fn mid_month() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

/// A request holding exactly `tokens` tokens (all input, one of them output).
fn asking(tokens: u32) -> Request<'static> {
    Request::with_key_id("k", "m")
        .input_tokens(tokens - 1)
        .max_output_tokens(1)
}

fn set_limits(engine: &Engine, limits: LimitsSpec) {
    let update = WorkspaceUpdate {
        limits: Some(limits),
        ..WorkspaceUpdate::default()
    };
    engine.update_workspace("ws", update, None).unwrap();
}

/// Reserve `tokens`-token requests at this instant until one is refused; the tokens
/// admitted (the reservations stay held while counting).
fn admit_all(engine: &Engine, tokens: u32) -> u64 {
    let mut held = Vec::new();
    while let Ok(reservation) = engine.check_and_reserve(&asking(tokens)) {
        held.push(reservation);
        assert!(held.len() <= 1_000_000, "runaway admission");
    }
    held.len() as u64 * u64::from(tokens)
}

#[test]
fn a_raised_token_limit_admits_at_most_the_new_limit_while_older_holds_settle() {
    let tpm = |n| LimitsSpec {
        tpm: Some(n),
        ..LimitsSpec::default()
    };
    let (engine, _clock) = engine(tpm(1_000), None, mid_month());
    let in_flight = engine.check_and_reserve(&asking(1_000)).unwrap();
    set_limits(&engine, tpm(100_000));
    // The new limit's room is taken at once (the 1,000 held count against it)...
    let mut held = Vec::new();
    while let Ok(reservation) = engine.check_and_reserve(&asking(1_000)) {
        held.push(reservation);
    }
    assert_eq!(held.len(), 99);
    // ...then the old hold commits having used nothing: its 1,000 tokens come back
    // as 1,000 tokens of the new limit, not as 60 s of bucket (100,000 tokens).
    engine
        .commit_usage(in_flight, Usage::new(0, 0))
        .expect("committed");
    assert_eq!(admit_all(&engine, 1_000), 1_000);
    drop(held);
}

#[test]
fn a_raised_request_limit_admits_at_most_the_new_limit_while_older_holds_are_dropped() {
    let rpm = |n| LimitsSpec {
        rpm: Some(n),
        ..LimitsSpec::default()
    };
    let (engine, _clock) = engine(rpm(10), None, mid_month());
    let in_flight = engine.check_and_reserve(&asking(10)).unwrap();
    set_limits(&engine, rpm(1_000));
    let mut held = Vec::new();
    while let Ok(reservation) = engine.check_and_reserve(&asking(10)) {
        held.push(reservation);
    }
    assert_eq!(held.len(), 999);
    // Dropped: one request comes back, not 6 s of the old limit (100 new requests).
    drop(in_flight);
    assert_eq!(admit_all(&engine, 10) / 10, 1);
    drop(held);
}

#[test]
fn a_lowered_token_limit_counts_older_holds_in_the_new_limit() {
    let tpm = |n| LimitsSpec {
        tpm: Some(n),
        ..LimitsSpec::default()
    };
    let (engine, _clock) = engine(tpm(100_000), None, mid_month());
    let in_flight = engine.check_and_reserve(&asking(2_000)).unwrap();
    set_limits(&engine, tpm(10_000));
    // Still held: 2,000 of the new 10,000 are taken.
    assert_eq!(admit_all(&engine, 1_000), 8_000);
    // Committed using half (those counted above were dropped again): 1,000 come
    // back, in the new limit's units, and the 1,000 used stay counted.
    engine
        .commit_usage(in_flight, Usage::new(1_000, 0))
        .expect("committed");
    assert_eq!(admit_all(&engine, 1_000), 9_000);
}

#[test]
fn a_refund_gives_back_only_tokens_that_have_not_drained() {
    // TPM 100: 50 and 50 held, the first dropped; 20 s later 50 and 33 more, then the
    // second dropped. It held its place in the bucket for those 20 s (a third of the
    // minute): only its last 10 s, about 16 tokens, can come back, so the 50 + 33 just
    // admitted leave no room for another 50. Before the fix 133 were held at once.
    let (engine, clock) = engine(
        LimitsSpec {
            tpm: Some(100),
            ..LimitsSpec::default()
        },
        None,
        mid_month(),
    );
    let first = engine.check_and_reserve(&asking(50)).unwrap();
    let second = engine.check_and_reserve(&asking(50)).unwrap();
    drop(first);
    clock.advance(Duration::from_secs(20));
    let third = engine.check_and_reserve(&asking(50)).unwrap();
    let fourth = engine.check_and_reserve(&asking(33)).unwrap();
    drop(second);
    let denial = engine.check_and_reserve(&asking(50)).unwrap_err();
    assert_eq!(
        (denial.reason, denial.scope),
        (DenialReason::TokensPerMinute, Scope::Workspace)
    );
    assert_eq!(admit_all(&engine, 1), 17);
    drop((third, fourth));
}

#[test]
fn a_changed_budget_period_is_kept_when_older_reservations_settle() {
    // $10 a day, changed to $10 a month at 23:30 on January 31st while a $1 request
    // is in flight; it commits after midnight. February is one month: $10 in all.
    let (engine, clock) = engine(
        LimitsSpec::default(),
        Some(BudgetSpec::new(dec("10"), BudgetPeriod::Day)),
        Utc.with_ymd_and_hms(2027, 1, 31, 23, 0, 0).unwrap(),
    );
    let in_flight = engine.check_and_reserve(&asking(1_000)).unwrap();
    clock.advance(Duration::from_secs(30 * 60));
    let update = WorkspaceUpdate {
        budget: Some(Some(BudgetSpec::new(dec("10"), BudgetPeriod::Month))),
        ..WorkspaceUpdate::default()
    };
    engine.update_workspace("ws", update, None).unwrap();
    clock.set(Timestamp::from_datetime(
        Utc.with_ymd_and_hms(2027, 2, 1, 0, 30, 0).unwrap(),
    ));
    let receipt = engine
        .commit_usage(in_flight, Usage::new(999, 1))
        .expect("committed");
    assert_eq!(receipt.cost(), dec("1"));
    for _ in 0..9 {
        let r = engine.check_and_reserve(&asking(1_000)).unwrap();
        engine.commit_usage(r, Usage::new(999, 1)).unwrap();
    }

    // A day later it is still February: the month's $10 are spent.
    clock.set(Timestamp::from_datetime(
        Utc.with_ymd_and_hms(2027, 2, 2, 0, 30, 0).unwrap(),
    ));
    let denial = engine.check_and_reserve(&asking(1_000)).unwrap_err();
    assert_eq!(
        (denial.reason, denial.scope),
        (DenialReason::Budget, Scope::Workspace)
    );
    let usage = engine.usage();
    let ws = &usage.workspaces[0].usage;
    let february = (
        Timestamp::from_datetime(Utc.with_ymd_and_hms(2027, 2, 1, 0, 0, 0).unwrap()),
        Timestamp::from_datetime(Utc.with_ymd_and_hms(2027, 3, 1, 0, 0, 0).unwrap()),
    );
    assert_eq!((ws.current.period_start, ws.current.period_end), february);
    assert_eq!((ws.current.cost, ws.current.requests), (dec("10"), 10));
}

#[test]
fn a_lowered_limit_on_a_scope_in_saturated_token_debt_keeps_answering() {
    // An absurd commit pins the token debt at its bound; lowering the limit afterwards
    // must leave the bucket usable (it once stayed "changing" for good, and every
    // later request on the workspace spun forever).
    let tpm = |n| LimitsSpec {
        tpm: Some(n),
        ..LimitsSpec::default()
    };
    let (engine, _clock) = engine(tpm(20), None, mid_month());
    let r = engine.check_and_reserve(&asking(10)).unwrap();
    engine
        .commit_usage(r, Usage::new(u32::MAX, u32::MAX))
        .expect("committed");
    set_limits(&engine, tpm(10));
    set_limits(&engine, tpm(5));
    let denial = engine.check_and_reserve(&asking(1)).unwrap_err();
    assert_eq!(
        (denial.reason, denial.scope),
        (DenialReason::TokensPerMinute, Scope::Workspace)
    );
}
