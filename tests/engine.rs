//! The engine's decisions: every limit kind, every denial, rollover, money and bad input.

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

/// One workspace `ws` granted `m` (1.00 in / 2.00 out per million), key `k` with secret `sk-k`.
fn base() -> PolicyDocument {
    PolicyDocument::new(OrgSpec::new("org"))
        .model(ModelSpec::new("m", dec("1"), dec("2")))
        .model(ModelSpec::new("other", dec("1"), dec("1")))
        .workspace(WorkspaceSpec::new("ws", "chatbot-production").grant("m"))
        .key(KeySpec::new("k", "ws", "sk-k"))
}

fn req(output: u32) -> Request<'static> {
    Request::with_secret("sk-k", "m")
        .input_tokens(100)
        .max_output_tokens(output)
}

fn limits(f: impl FnOnce(&mut LimitsSpec)) -> LimitsSpec {
    let mut l = LimitsSpec::default();
    f(&mut l);
    l
}

fn denial(engine: &Engine, request: &Request<'_>) -> Denial {
    engine
        .check_and_reserve(request)
        .expect_err("should be denied")
}

fn ws_usage(engine: &Engine) -> ScopeReport {
    engine.usage().workspaces[0].usage
}

#[test]
fn admitted_request_is_charged_exactly_and_refunds_the_rest() {
    let clock = clock();
    let mut doc = base();
    doc.models[0] = ModelSpec::new("m", dec("0.075"), dec("0.3"));
    doc.workspaces[0].limits = limits(|l| l.tpm = Some(10_000));
    let engine = engine(doc, &clock);

    let r = engine.check_and_reserve(&req(900)).unwrap();
    // Worst case 100 × 0.075/M + 900 × 0.3/M, exactly.
    assert_eq!(r.reserved_cost(), dec("0.0002775"));
    assert_eq!(r.rate_limits().tokens.unwrap().remaining, 9_000);
    assert_eq!(ws_usage(&engine).current.held, dec("0.0002775"));

    let receipt = engine.commit_usage(r, Usage::new(97, 13)).unwrap();
    assert_eq!(
        receipt.cost(),
        dec("0.075") * dec("97") / dec("1000000") + dec("0.3") * dec("13") / dec("1000000")
    );
    assert_eq!(receipt.cost(), dec("0.000011175"));
    assert_eq!(receipt.overage(), Decimal::ZERO);
    let usage = ws_usage(&engine).current;
    assert_eq!(
        (usage.requests, usage.input_tokens, usage.output_tokens),
        (1, 97, 13)
    );
    assert_eq!(
        (usage.cost, usage.held),
        (dec("0.000011175"), Decimal::ZERO)
    );

    // Unused tokens went back: 110 of 10,000 are used.
    let next = engine.check_and_reserve(&req(0)).unwrap();
    assert_eq!(
        next.rate_limits().tokens.unwrap().remaining,
        10_000 - 110 - 100
    );
}

#[test]
fn each_rate_limit_kind_refuses_with_its_scope_and_numbers() {
    let clock = clock();
    let mut doc = base();
    doc.keys[0].limits = limits(|l| l.rpm = Some(2));
    let e = engine(doc, &clock);
    let _a = e.check_and_reserve(&req(1)).unwrap();
    let _b = e.check_and_reserve(&req(1)).unwrap();
    let d = denial(&e, &req(1));
    assert_eq!(
        (d.reason, d.scope, d.http_status(), d.code()),
        (
            DenialReason::RequestsPerMinute,
            Scope::Key,
            429,
            "rate_limited"
        )
    );
    assert_eq!(
        d.quota,
        Some(Quota::Requests {
            limit: 2,
            remaining: 0,
            window: Duration::from_secs(60)
        })
    );
    assert_eq!(d.retry_after, Some(Duration::from_secs(30)));
    clock.advance(Duration::from_secs(30));
    assert!(e.check_and_reserve(&req(1)).is_ok());

    let mut doc = base();
    doc.workspaces[0].limits = limits(|l| l.rpd = Some(1));
    let e = engine(doc, &clock);
    e.commit_usage(e.check_and_reserve(&req(1)).unwrap(), Usage::new(1, 1))
        .unwrap();
    let d = denial(&e, &req(1));
    assert_eq!(
        (d.reason, d.scope),
        (DenialReason::RequestsPerDay, Scope::Workspace)
    );
    assert_eq!(d.retry_after, Some(Duration::from_secs(86_400)));

    let mut doc = base();
    doc.workspaces[0].model_limits.push(ModelLimitSpec {
        budget: None,
        model: "m".into(),
        tpm: Some(1_000),
        ..Default::default()
    });
    let e = engine(doc, &clock);
    let _held = e.check_and_reserve(&req(700)).unwrap(); // 800 tokens
    let d = denial(&e, &req(150)); // 250 more do not fit in 200
    assert_eq!(
        (d.reason, d.scope),
        (DenialReason::TokensPerMinute, Scope::WorkspaceModel)
    );
    assert_eq!(
        d.quota,
        Some(Quota::Tokens {
            limit: 1_000,
            remaining: 200,
            window: Duration::from_secs(60),
            requested: 250
        })
    );
    assert_eq!(d.retry_after, Some(Duration::from_secs(3))); // 50 tokens at 1,000/min
    assert!(
        e.check_and_reserve(&req(100)).is_ok(),
        "200 tokens still fit"
    );
}

#[test]
fn a_request_larger_than_the_whole_token_limit_is_not_told_to_retry() {
    let clock = clock();
    let mut doc = base();
    doc.keys[0].limits = limits(|l| l.tpm = Some(1_000));
    let e = engine(doc, &clock);
    let d = denial(&e, &req(5_000));
    assert_eq!(d.reason, DenialReason::TokensPerMinute);
    assert_eq!(d.retry_after, None);
    assert!(RateLimitHeaders::for_denial(&d)
        .get("retry-after")
        .is_none());
}

#[test]
fn token_limits_count_input_output_or_total() {
    let clock = clock();
    for (counts, expect_remaining) in [
        (TokenCount::Input, 900),
        (TokenCount::Output, 950),
        (TokenCount::Total, 850),
    ] {
        let mut doc = base();
        doc.workspaces[0].limits = limits(|l| {
            l.tpm = Some(1_000);
            l.tpm_counts = counts;
        });
        let e = engine(doc, &clock);
        let r = e.check_and_reserve(&req(50)).unwrap();
        assert_eq!(
            r.rate_limits().tokens.unwrap().remaining,
            expect_remaining,
            "{counts:?}"
        );
    }
}

#[test]
fn concurrency_slots_free_on_commit_and_on_drop() {
    let clock = clock();
    let mut doc = base();
    doc.workspaces[0].limits = limits(|l| l.max_concurrent = Some(2));
    let e = engine(doc, &clock);
    let a = e.check_and_reserve(&req(1)).unwrap();
    let b = e.check_and_reserve(&req(1)).unwrap();
    assert_eq!(ws_usage(&e).in_flight, 2);
    let d = denial(&e, &req(1));
    assert_eq!(
        (d.reason, d.scope),
        (DenialReason::Concurrency, Scope::Workspace)
    );
    assert_eq!(
        d.quota,
        Some(Quota::Concurrent {
            limit: 2,
            in_flight: 2
        })
    );
    drop(a);
    let c = e.check_and_reserve(&req(1)).unwrap();
    e.commit_usage(b, Usage::new(1, 1)).unwrap();
    e.commit_usage(c, Usage::new(1, 1)).unwrap();
    assert_eq!(ws_usage(&e).in_flight, 0);
}

/// A named change to the base policy, and the denial it should cause.
type Case = (&'static str, fn(&mut PolicyDocument), Scope, DenialReason);

#[test]
fn budgets_refuse_at_every_level_with_402_and_no_retry() {
    let clock = clock();
    // Each request: 100 in + 400 out at 1/2 per million = 0.0009 worst case.
    let cases: [Case; 4] = [
        (
            "key",
            |d| d.keys[0].budget = Some(BudgetSpec::new(dec("0.001"), BudgetPeriod::Month)),
            Scope::Key,
            DenialReason::Budget,
        ),
        (
            "workspace",
            |d| d.workspaces[0].budget = Some(BudgetSpec::new(dec("0.001"), BudgetPeriod::Day)),
            Scope::Workspace,
            DenialReason::Budget,
        ),
        (
            "org",
            |d| d.org.budget = Some(BudgetSpec::new(dec("0.001"), BudgetPeriod::Month)),
            Scope::Org,
            DenialReason::Budget,
        ),
        (
            "wallet",
            |d| d.org.wallet = Some(dec("0.001")),
            Scope::Org,
            DenialReason::Wallet,
        ),
    ];
    for (name, set, scope, reason) in cases {
        let mut doc = base();
        set(&mut doc);
        let e = engine(doc, &clock);
        let first = e.check_and_reserve(&req(400)).unwrap();
        let d = denial(&e, &req(400));
        assert_eq!(
            (d.reason, d.scope, d.http_status(), d.retry_after),
            (reason, scope, 402, None),
            "{name}"
        );
        assert_eq!(
            d.quota,
            Some(Quota::Money {
                limit: dec("0.001"),
                remaining: dec("0.0001"),
                requested: dec("0.0009")
            }),
            "{name}"
        );
        match reason {
            DenialReason::Wallet => assert_eq!(
                (d.code(), d.reset_after),
                ("insufficient_funds", None),
                "{name}"
            ),
            _ => assert!(
                d.code() == "budget_exceeded" && d.reset_after.is_some(),
                "{name}"
            ),
        }
        // A smaller request still fits in what is left.
        drop(first);
        assert!(
            e.check_and_reserve(&req(400)).is_ok(),
            "{name}: the dropped hold was released"
        );
    }
}

#[test]
fn budget_denial_status_is_configurable() {
    let clock = clock();
    let mut doc = base();
    doc.org.wallet = Some(Decimal::ZERO);
    let e = Engine::builder(Policy::new(doc).unwrap())
        .clock(clock.clone())
        .budget_status(BudgetStatus::TooManyRequests)
        .build();
    let d = denial(&e, &req(1));
    assert_eq!((d.reason, d.http_status()), (DenialReason::Wallet, 429));
}

#[test]
fn month_budget_denial_resets_at_the_first_of_next_month() {
    let clock = clock();
    let mut doc = base();
    doc.workspaces[0].budget = Some(BudgetSpec::new(Decimal::ZERO, BudgetPeriod::Month));
    let e = engine(doc, &clock);
    let d = denial(&e, &req(1));
    // From 2026-11-23 12:00 to 2026-12-01 00:00.
    assert_eq!(
        d.reset_after,
        Some(Duration::from_secs(7 * 86_400 + 12 * 3_600))
    );
}

#[test]
fn identity_status_and_grant_denials() {
    let clock = clock();
    let mut doc = base();
    doc.org.default_workspace = Some("default".into());
    doc.workspaces
        .push(WorkspaceSpec::new("default", "default"));
    doc.workspaces.push(WorkspaceSpec {
        status: WorkspaceStatus::Suspended,
        ..WorkspaceSpec::new("susp", "suspended")
    });
    doc.workspaces.push(WorkspaceSpec {
        status: WorkspaceStatus::Review,
        ..WorkspaceSpec::new("rev", "in-review")
    });
    doc.keys.push(KeySpec {
        status: KeyStatus::Revoked,
        ..KeySpec::new("revoked", "ws", "sk-revoked")
    });
    doc.keys.push(KeySpec {
        expires_at: Some(Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 1).unwrap()),
        ..KeySpec::new("expiring", "ws", "sk-expiring")
    });
    doc.keys.push(KeySpec::new("dk", "default", "sk-default"));
    doc.keys.push(KeySpec::new("sk", "susp", "sk-susp"));
    doc.keys.push(KeySpec::new("rk", "rev", "sk-rev"));
    let e = engine(doc, &clock);
    let check = |secret: &str, model: &str| {
        e.check_and_reserve(&Request::with_secret(secret, model))
            .map(drop)
    };
    let outcome = |secret: &str, model: &str| {
        let d = check(secret, model).unwrap_err();
        (d.reason, d.scope, d.http_status(), d.code())
    };

    assert_eq!(
        outcome("sk-nope", "m"),
        (DenialReason::UnknownKey, Scope::Key, 401, "invalid_api_key")
    );
    assert_eq!(
        e.check_and_reserve(&Request::with_key_id("nope", "m"))
            .unwrap_err()
            .reason,
        DenialReason::UnknownKey
    );
    assert_eq!(
        outcome("sk-revoked", "m"),
        (DenialReason::KeyRevoked, Scope::Key, 401, "api_key_revoked")
    );
    assert!(check("sk-expiring", "m").is_ok());
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        outcome("sk-expiring", "m"),
        (DenialReason::KeyExpired, Scope::Key, 401, "api_key_expired")
    );
    assert_eq!(
        outcome("sk-susp", "m"),
        (
            DenialReason::WorkspaceNotActive(WorkspaceStatus::Suspended),
            Scope::Workspace,
            403,
            "workspace_suspended"
        )
    );
    assert_eq!(
        outcome("sk-rev", "m"),
        (
            DenialReason::WorkspaceNotActive(WorkspaceStatus::Review),
            Scope::Workspace,
            403,
            "workspace_in_review"
        )
    );
    assert_eq!(
        outcome("sk-k", "nope"),
        (
            DenialReason::UnknownModel,
            Scope::WorkspaceModel,
            404,
            "model_not_found"
        )
    );
    assert_eq!(
        outcome("sk-k", "other"),
        (
            DenialReason::ModelNotGranted,
            Scope::WorkspaceModel,
            403,
            "model_not_allowed"
        )
    );
    // The default workspace may call every priced model without grants.
    assert!(check("sk-default", "other").is_ok());
    assert!(check("sk-default", "m").is_ok());
    // A gateway that authenticated the caller itself may pass the key id.
    assert!(e.check_and_reserve(&Request::with_key_id("k", "m")).is_ok());
}

#[test]
fn a_refusal_at_a_later_level_gives_back_the_earlier_ones() {
    let clock = clock();
    let mut doc = base();
    doc.keys[0].limits = limits(|l| {
        l.rpm = Some(1);
        l.tpm = Some(1_000);
        l.max_concurrent = Some(1);
    });
    doc.keys[0].budget = Some(BudgetSpec::new(dec("1"), BudgetPeriod::Month));
    doc.org.wallet = Some(Decimal::ZERO); // the last level always refuses
    let e = engine(doc, &clock);
    for _ in 0..5 {
        assert_eq!(denial(&e, &req(500)).reason, DenialReason::Wallet);
    }
    let key = &e.usage().keys[0].usage;
    assert_eq!((key.current.held, key.in_flight), (Decimal::ZERO, 0));
    // The key's single request per minute and its tokens are still all there.
    let mut doc = e.policy().document().clone();
    doc.org.wallet = None;
    e.apply_policy(Policy::new(doc).unwrap()).unwrap();
    let r = e.check_and_reserve(&req(500)).unwrap();
    assert_eq!(r.rate_limits().tokens.unwrap().remaining, 400);
}

#[test]
fn dropping_a_reservation_releases_everything() {
    let clock = clock();
    let mut doc = base();
    doc.workspaces[0].limits = limits(|l| {
        l.rpm = Some(1);
        l.tpm = Some(1_000);
    });
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("0.001"), BudgetPeriod::Month));
    let e = engine(doc, &clock);
    for _ in 0..3 {
        let r = e.check_and_reserve(&req(400)).unwrap();
        assert_eq!(ws_usage(&e).current.held, dec("0.0009"));
        drop(r);
        let usage = ws_usage(&e).current;
        assert_eq!(
            (usage.held, usage.cost, usage.requests),
            (Decimal::ZERO, Decimal::ZERO, 0)
        );
    }
}

#[test]
fn overage_is_charged_as_debt_and_blocks_the_next_request() {
    let clock = clock();
    let mut doc = base();
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("0.01"), BudgetPeriod::Month));
    doc.workspaces[0].limits = limits(|l| l.tpm = Some(10_000));
    let e = engine(doc, &clock);
    let r = e.check_and_reserve(&req(100)).unwrap(); // holds 0.0003
    let receipt = e.commit_usage(r, Usage::new(100, 5_000)).unwrap(); // costs 0.0101
    assert_eq!(
        (receipt.cost(), receipt.overage()),
        (dec("0.0101"), dec("0.0098"))
    );
    assert_eq!(ws_usage(&e).current.cost, dec("0.0101"));
    let d = denial(&e, &req(0));
    assert_eq!(d.reason, DenialReason::Budget);
    assert_eq!(
        d.quota,
        Some(Quota::Money {
            limit: dec("0.01"),
            remaining: Decimal::ZERO,
            requested: dec("0.0001")
        })
    );
    // The token overage is debt too: 5,100 of 10,000 tokens are taken.
    let mut doc = e.policy().document().clone();
    doc.workspaces[0].budget = None;
    e.apply_policy(Policy::new(doc).unwrap()).unwrap();
    let r = e.check_and_reserve(&req(0)).unwrap();
    assert_eq!(
        r.rate_limits().tokens.unwrap().remaining,
        10_000 - 5_100 - 100
    );
}

#[test]
fn output_reservation_falls_back_from_request_to_key_model_workspace_org() {
    let clock = clock();
    let mut doc = base();
    doc.defaults.max_output_tokens = 11;
    let e = engine(doc.clone(), &clock);
    let ask = |e: &Engine, max: Option<u32>| {
        let mut r = Request::with_secret("sk-k", "m");
        r.max_output_tokens = max;
        e.check_and_reserve(&r).unwrap().reserved_tokens().1
    };
    assert_eq!(ask(&e, Some(7)), 7);
    assert_eq!(ask(&e, None), 11);
    doc.workspaces[0].default_max_output_tokens = Some(12);
    assert_eq!(ask(&engine(doc.clone(), &clock), None), 12);
    doc.models[0].default_max_output_tokens = Some(13);
    assert_eq!(ask(&engine(doc.clone(), &clock), None), 13);
    doc.keys[0].default_max_output_tokens = Some(14);
    assert_eq!(ask(&engine(doc, &clock), None), 14);
}

#[test]
fn a_hold_spanning_the_period_end_is_carried_over_and_its_commit_counts_in_the_new_period() {
    let clock = Arc::new(ManualClock::at(
        Utc.with_ymd_and_hms(2026, 11, 30, 23, 59, 59).unwrap(),
    ));
    let mut doc = base();
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("0.001"), BudgetPeriod::Month));
    let e = engine(doc, &clock);
    e.commit_usage(e.check_and_reserve(&req(0)).unwrap(), Usage::new(100, 0))
        .unwrap(); // 0.0001 spent in November
    let late = e.check_and_reserve(&req(400)).unwrap(); // holds 0.0009: November is full
    assert_eq!(denial(&e, &req(0)).reason, DenialReason::Budget);

    clock.advance(Duration::from_secs(2)); // December
                                           // November's spend is gone from the budget; the hold still in flight is not.
    assert_eq!(denial(&e, &req(400)).reason, DenialReason::Budget);
    let usage = ws_usage(&e);
    assert_eq!(
        (usage.previous.cost, usage.previous.requests),
        (dec("0.0001"), 1)
    );
    assert_eq!(
        usage.previous.period_end,
        Timestamp::from_datetime(Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap())
    );
    assert_eq!(
        (usage.current.cost, usage.current.held),
        (Decimal::ZERO, dec("0.0009"))
    );

    e.commit_usage(late, Usage::new(100, 100)).unwrap(); // 0.0003, counted in December
    let usage = ws_usage(&e);
    assert_eq!(
        (
            usage.current.cost,
            usage.current.held,
            usage.current.requests
        ),
        (dec("0.0003"), Decimal::ZERO, 1)
    );
    assert_eq!(usage.previous.cost, dec("0.0001"));
    // 0.0003 spent + 0.0003 asked fits in 0.001; 0.0003 + 0.0009 would not.
    assert_eq!(denial(&e, &req(400)).reason, DenialReason::Budget);
    assert!(e.check_and_reserve(&req(100)).is_ok());
}

#[test]
fn day_and_custom_periods_roll_over_on_their_boundaries() {
    for (period, step) in [
        (BudgetPeriod::Day, 86_400),
        (BudgetPeriod::Custom { seconds: 3_600 }, 3_600),
    ] {
        let clock = clock();
        let mut doc = base();
        doc.keys[0].budget = Some(BudgetSpec::new(dec("0.0009"), period));
        let e = engine(doc, &clock);
        e.commit_usage(
            e.check_and_reserve(&req(400)).unwrap(),
            Usage::new(100, 400),
        )
        .unwrap();
        assert_eq!(
            denial(&e, &req(400)).reason,
            DenialReason::Budget,
            "{period:?}"
        );
        clock.advance(Duration::from_secs(step));
        assert!(
            e.check_and_reserve(&req(400)).is_ok(),
            "{period:?}: a new period starts from zero"
        );
        let key = e.usage().keys[0].usage;
        assert_eq!(
            (key.previous.cost, key.current.cost),
            (dec("0.0009"), Decimal::ZERO),
            "{period:?}"
        );
    }
}

#[test]
fn extreme_token_counts_never_panic_or_wrap() {
    let clock = clock();
    let mut doc = base();
    doc.models[0] = ModelSpec::new("m", dec("1000"), dec("1000")); // the highest price accepted
    let e = engine(doc.clone(), &clock);
    let huge = Request::with_secret("sk-k", "m")
        .input_tokens(u32::MAX)
        .max_output_tokens(u32::MAX);
    let r = e.check_and_reserve(&huge).unwrap(); // no limit applies
    assert_eq!(r.reserved_cost(), dec("8589934.59"));
    let receipt = e.commit_usage(r, Usage::new(u32::MAX, u32::MAX)).unwrap();
    assert_eq!(receipt.cost(), dec("8589934.59"));
    // Ten more of them saturate the spend counter instead of wrapping negative.
    for _ in 0..10 {
        let r = e.check_and_reserve(&huge).unwrap();
        e.commit_usage(r, Usage::new(u32::MAX, u32::MAX)).unwrap();
    }
    assert_eq!(ws_usage(&e).current.cost, dec("9223372.036854775807"));

    doc.workspaces[0].limits = limits(|l| l.tpm = Some(1_000));
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("1"), BudgetPeriod::Month));
    let e = engine(doc, &clock);
    assert_eq!(denial(&e, &huge).reason, DenialReason::TokensPerMinute);
    // Usage far beyond the reservation is debt, not a panic or overflow.
    let r = e.check_and_reserve(&req(1)).unwrap();
    let receipt = e.commit_usage(r, Usage::new(u32::MAX, u32::MAX)).unwrap();
    assert_eq!(receipt.cost(), dec("8589934.59"));
    assert_eq!(denial(&e, &req(0)).reason, DenialReason::TokensPerMinute);
    clock.advance(Duration::from_secs(3_600 * 24 * 365));
    assert_eq!(
        denial(&e, &req(0)).reason,
        DenialReason::TokensPerMinute,
        "still paying off the token debt"
    );
}

#[test]
fn applying_a_policy_keeps_counters_of_ids_that_persist() {
    let clock = clock();
    let mut doc = base();
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("1"), BudgetPeriod::Month));
    doc.keys.push(KeySpec::new("k2", "ws", "sk-k2"));
    let e = engine(doc.clone(), &clock);
    e.commit_usage(
        e.check_and_reserve(&req(400)).unwrap(),
        Usage::new(100, 400),
    )
    .unwrap();
    let in_flight = e.check_and_reserve(&req(400)).unwrap();

    doc.keys[1].status = KeyStatus::Revoked;
    doc.keys.push(KeySpec::new("k3", "ws", "sk-k3"));
    doc.workspaces[0].budget = Some(BudgetSpec::new(dec("0.0018"), BudgetPeriod::Month));
    e.apply_policy(Policy::new(doc).unwrap()).unwrap();

    assert_eq!(
        e.check_and_reserve(&Request::with_secret("sk-k2", "m"))
            .unwrap_err()
            .reason,
        DenialReason::KeyRevoked
    );
    // The workspace kept its 0.0009 spent and 0.0009 held, so the new, lower budget is
    // full, for the new key k3 as for k.
    assert_eq!(
        denial(&e, &Request::with_secret("sk-k3", "m")).reason,
        DenialReason::Budget
    );
    assert_eq!(denial(&e, &req(400)).reason, DenialReason::Budget);
    e.commit_usage(in_flight, Usage::new(100, 400)).unwrap();
    let usage = e.usage();
    assert_eq!(usage.workspaces[0].usage.current.cost, dec("0.0018"));
    assert_eq!(
        usage
            .keys
            .iter()
            .find(|k| k.id == "k")
            .unwrap()
            .usage
            .current
            .requests,
        2
    );
}

#[test]
fn headers_report_the_tightest_limits() {
    let clock = clock();
    let mut doc = base();
    doc.keys[0].limits = limits(|l| {
        l.rpm = Some(100);
        l.tpm = Some(50_000);
    });
    doc.workspaces[0].limits = limits(|l| {
        l.rpm = Some(10);
        l.tpm = Some(100_000);
    });
    let e = engine(doc, &clock);
    let r = e.check_and_reserve(&req(900)).unwrap();
    let h = RateLimitHeaders::for_reservation(&r);
    let get = |name: &str| {
        h.get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(get("x-ratelimit-limit-requests"), "10");
    assert_eq!(get("x-ratelimit-remaining-requests"), "9");
    assert_eq!(get("x-ratelimit-reset-requests"), "6s");
    assert_eq!(get("x-ratelimit-limit-tokens"), "50000");
    assert_eq!(get("x-ratelimit-remaining-tokens"), "49000");
    assert_eq!(get("x-ratelimit-reset-tokens"), "1.2s");
    assert_eq!(
        get("ratelimit-policy"),
        "\"requests\";q=10;w=60, \"tokens\";q=50000;qu=\"x-llm-tokens\";w=60"
    );
    assert_eq!(
        get("ratelimit"),
        "\"requests\";r=9;t=6, \"tokens\";r=49000;t=2"
    );
    assert_eq!(get("retry-after"), "");
}

#[test]
fn a_reservation_names_its_key_and_workspace_not_the_secret() {
    let clock = clock();
    let doc = base()
        .workspace(WorkspaceSpec::new("ws2", "batch").grant("m"))
        .key(KeySpec::new("k2", "ws2", "sk-k2"));
    let engine = engine(doc, &clock);
    let first = engine.check_and_reserve(&req(10)).unwrap();
    let second = engine
        .check_and_reserve(&Request::with_secret("sk-k2", "m").max_output_tokens(10))
        .unwrap();
    assert_eq!((first.key_id(), first.workspace_id()), ("k", "ws"));
    assert_eq!((second.key_id(), second.workspace_id()), ("k2", "ws2"));
    // Through the backend-neutral trait too, as generic gateways read it.
    fn ids(held: &impl Held) -> (&str, &str) {
        (held.key_id(), held.workspace_id())
    }
    assert_eq!(ids(&second), ("k2", "ws2"));
}
