//! The limits beyond one budget and one set of rates per scope: several budgets per
//! scope, soft budgets, key × model limits and temporary overrides, on the in-memory
//! engine (`redis_parity.rs` runs them against Redis too).

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

/// Model `m` at $1 per million input and output tokens, so a request of N tokens in
/// total costs N µ$; `other` at the same price.
fn base() -> PolicyDocument {
    PolicyDocument::new(OrgSpec::new("org"))
        .model(ModelSpec::new("m", dec("1"), dec("1")))
        .model(ModelSpec::new("other", dec("1"), dec("1")))
        .workspace(
            WorkspaceSpec::new("ws", "chatbot-production")
                .grant("m")
                .grant("other"),
        )
        .key(KeySpec::new("k", "ws", "sk-k"))
}

/// 1,000 tokens in total: $0.001 held and spent.
fn req(model: &str) -> Request<'_> {
    Request::with_secret("sk-k", model)
        .input_tokens(500)
        .max_output_tokens(500)
}

fn usage() -> Usage {
    Usage::new(500, 500)
}

fn budget(limit: &str, period: BudgetPeriod) -> BudgetSpec {
    BudgetSpec::new(dec(limit), period)
}

fn spend(engine: &Engine, model: &str, n: usize) {
    for i in 0..n {
        let r = engine
            .check_and_reserve(&req(model))
            .unwrap_or_else(|d| panic!("request {i} refused: {d}"));
        engine.commit_usage(r, usage()).unwrap();
    }
}

#[test]
fn every_budget_of_a_scope_must_fit_each_over_its_own_period() {
    let clock = clock();
    let mut doc = base();
    // $0.003 a day and $0.005 a month: three a day, five a month.
    doc.workspaces[0].budget = Some(budget("0.003", BudgetPeriod::Day));
    doc.workspaces[0]
        .budgets
        .push(budget("0.005", BudgetPeriod::Month));
    let engine = engine(doc, &clock);

    spend(&engine, "m", 3);
    let refused = engine.check_and_reserve(&req("m")).unwrap_err();
    assert_eq!(refused.reason, DenialReason::Budget);
    assert_eq!(refused.scope, Scope::Workspace);

    // The next day the day budget has room, the month budget has two left.
    clock.advance(Duration::from_secs(86_400));
    spend(&engine, "m", 2);
    let refused = engine.check_and_reserve(&req("m")).unwrap_err();
    assert_eq!(refused.reason, DenialReason::Budget);
    match refused.quota {
        Some(Quota::Money {
            limit, remaining, ..
        }) => {
            assert_eq!(limit, dec("0.005"), "the month budget refused");
            assert_eq!(remaining, Decimal::ZERO);
        }
        other => panic!("expected a money quota, got {other:?}"),
    }

    let report = &engine.usage().workspaces[0];
    assert_eq!(report.budgets.len(), 2);
    assert_eq!(report.budgets[0].limit, dec("0.003"));
    assert_eq!(report.budgets[0].spent, dec("0.002"));
    assert_eq!(report.budgets[1].limit, dec("0.005"));
    assert_eq!(report.budgets[1].spent, dec("0.005"));
    assert_eq!(report.budgets[1].held, Decimal::ZERO);
}

#[test]
fn a_refusal_by_a_later_budget_gives_back_what_earlier_ones_held() {
    let clock = clock();
    let mut doc = base();
    doc.keys[0].budget = Some(budget("1", BudgetPeriod::Month));
    doc.keys[0]
        .budgets
        .push(budget("0.0015", BudgetPeriod::Day));
    let engine = engine(doc, &clock);

    let first = engine.check_and_reserve(&req("m")).unwrap();
    let refused = engine.check_and_reserve(&req("m")).unwrap_err();
    assert_eq!(refused.scope, Scope::Key);
    let key = &engine.usage().keys[0];
    // Only the admitted request is held, on both budgets.
    assert_eq!(key.budgets[0].held, dec("0.001"));
    assert_eq!(key.budgets[1].held, dec("0.001"));
    drop(first);
    let key = &engine.usage().keys[0];
    assert_eq!(key.budgets[0].held, Decimal::ZERO);
    assert_eq!(key.budgets[1].held, Decimal::ZERO);
    assert_eq!(key.budgets[1].spent, Decimal::ZERO);
}

#[test]
fn a_soft_budget_alerts_but_never_refuses() {
    let clock = clock();
    let mut doc = base();
    doc.workspaces[0].budget = Some(budget("0.002", BudgetPeriod::Month).soft());
    let (sink, events) = ChannelSink::new(64);
    let engine = Engine::builder(Policy::new(doc).unwrap())
        .clock(clock.clone())
        .events(Arc::new(sink))
        .build();

    spend(&engine, "m", 5);
    let report = &engine.usage().workspaces[0];
    assert!(report.budgets[0].soft);
    assert_eq!(report.budgets[0].spent, dec("0.005"));

    let kinds: Vec<EventKind> = events.try_iter().map(|e| e.kind).collect();
    let exhausted = kinds
        .iter()
        .filter(|k| matches!(k, EventKind::BudgetExhausted { .. }))
        .count();
    assert_eq!(exhausted, 1, "exhausted once per period: {kinds:?}");
    assert!(kinds
        .iter()
        .any(|k| matches!(k, EventKind::BudgetThreshold { percent: 50, .. })));
}

#[test]
fn key_model_limits_apply_to_that_key_and_model_only() {
    let clock = clock();
    let mut doc = base();
    let mut limit = ModelLimitSpec::new("m");
    limit.rpm = Some(2);
    limit.budget = Some(budget("0.0025", BudgetPeriod::Month));
    doc.keys[0].model_limits.push(limit);
    doc = doc.key(KeySpec::new("k2", "ws", "sk-k2"));
    let engine = engine(doc, &clock);

    spend(&engine, "m", 2);
    let refused = engine.check_and_reserve(&req("m")).unwrap_err();
    assert_eq!(refused.reason, DenialReason::RequestsPerMinute);
    assert_eq!(refused.scope, Scope::KeyModel);
    // The same key on another model, and another key on this model, are not limited.
    spend(&engine, "other", 3);
    let other_key = Request::with_secret("sk-k2", "m")
        .input_tokens(500)
        .max_output_tokens(500);
    for _ in 0..3 {
        let r = engine.check_and_reserve(&other_key).unwrap();
        engine.commit_usage(r, usage()).unwrap();
    }

    // After a minute the rate has room, but the key × model budget has $0.0005 left.
    clock.advance(Duration::from_secs(60));
    let refused = engine.check_and_reserve(&req("m")).unwrap_err();
    assert_eq!(refused.reason, DenialReason::Budget);
    assert_eq!(refused.scope, Scope::KeyModel);

    let key = &engine.usage().keys[0];
    assert_eq!(key.models.len(), 1);
    assert_eq!(key.models[0].model, "m");
    assert_eq!(key.models[0].usage.current.requests, 2);
    assert_eq!(key.models[0].usage.current.cost, dec("0.002"));
    assert_eq!(key.usage.current.requests, 5);
}

#[test]
fn key_model_counters_survive_a_policy_change() {
    let clock = clock();
    let mut doc = base();
    let mut limit = ModelLimitSpec::new("m");
    limit.rpm = Some(3);
    doc.keys[0].model_limits.push(limit);
    let engine = engine(doc.clone(), &clock);
    spend(&engine, "m", 2);
    // An unrelated edit: the key × model window keeps its two requests.
    doc.workspaces[0].region = "eu-west".into();
    engine.apply_policy(Policy::new(doc).unwrap()).unwrap();
    spend(&engine, "m", 1);
    let refused = engine.check_and_reserve(&req("m")).unwrap_err();
    assert_eq!(refused.scope, Scope::KeyModel);
}

#[test]
fn a_temporary_override_lapses_by_itself_at_its_end() {
    let clock = clock();
    let start = clock.now().to_datetime();
    let mut doc = base();
    doc.workspaces[0].limits.rpm = Some(2);
    let mut raised = TemporarySpec::until(start + chrono::Duration::minutes(10));
    raised.rpm = Some(5);
    raised.reason = Some("launch day".into());
    doc.workspaces[0].temporary = Some(raised);
    let engine = engine(doc, &clock);

    // Raised: five a minute.
    spend(&engine, "m", 5);
    assert_eq!(
        engine.check_and_reserve(&req("m")).unwrap_err().reason,
        DenialReason::RequestsPerMinute
    );
    let until = engine.usage().workspaces[0]
        .temporary
        .as_ref()
        .expect("in force")
        .until;
    assert_eq!(until.to_datetime(), start + chrono::Duration::minutes(10));

    // One nanosecond before the end it still applies.
    clock.advance(Duration::from_secs(600) - Duration::from_nanos(1));
    spend(&engine, "m", 5);
    // At the end the base limit is back, with no policy edit; the five requests of
    // the last minute count against it as they would after a policy change.
    clock.advance(Duration::from_nanos(1));
    let refused = engine.check_and_reserve(&req("m")).unwrap_err();
    assert_eq!(refused.reason, DenialReason::RequestsPerMinute);
    match refused.quota {
        Some(Quota::Requests { limit, .. }) => assert_eq!(limit, 2),
        other => panic!("expected a request quota, got {other:?}"),
    }
    assert!(engine.usage().workspaces[0].temporary.is_none());
    // Once that backlog has drained: two a minute.
    clock.advance(Duration::from_secs(180));
    spend(&engine, "m", 2);
    assert_eq!(
        engine.check_and_reserve(&req("m")).unwrap_err().reason,
        DenialReason::RequestsPerMinute
    );
    // The document still carries the override as written.
    assert!(engine.policy().document().workspaces[0].temporary.is_some());
}

#[test]
fn a_temporary_budget_override_raises_and_then_restores_the_limit() {
    let clock = clock();
    let start = clock.now().to_datetime();
    let mut doc = base();
    doc.keys[0].budget = Some(budget("0.002", BudgetPeriod::Month));
    let mut raised = TemporarySpec::until(start + chrono::Duration::hours(1));
    raised.budget = Some(dec("0.004"));
    doc.keys[0].temporary = Some(raised);
    let engine = engine(doc, &clock);

    spend(&engine, "m", 4);
    assert_eq!(engine.usage().keys[0].budgets[0].limit, dec("0.004"));
    assert_eq!(
        engine.check_and_reserve(&req("m")).unwrap_err().scope,
        Scope::Key
    );
    // Back to $0.002, with $0.004 spent this month: refused, and reported so.
    clock.advance(Duration::from_secs(3_600));
    let refused = engine.check_and_reserve(&req("m")).unwrap_err();
    assert_eq!(refused.reason, DenialReason::Budget);
    assert_eq!(engine.usage().keys[0].budgets[0].limit, dec("0.002"));
}

#[test]
fn a_reservation_taken_under_an_override_settles_after_it_ends() {
    let clock = clock();
    let start = clock.now().to_datetime();
    let mut doc = base();
    doc.workspaces[0].limits.tpm = Some(1_000);
    let mut raised = TemporarySpec::until(start + chrono::Duration::seconds(30));
    raised.tpm = Some(10_000);
    doc.workspaces[0].temporary = Some(raised);
    let engine = engine(doc, &clock);

    let held: Vec<_> = (0..5)
        .map(|_| engine.check_and_reserve(&req("m")).unwrap())
        .collect();
    clock.advance(Duration::from_secs(31));
    for r in held {
        engine.commit_usage(r, Usage::new(10, 10)).unwrap();
    }
    let report = engine.usage().workspaces[0].usage;
    assert_eq!(report.current.requests, 5);
    assert_eq!(report.current.held, Decimal::ZERO);
    assert_eq!(report.current.input_tokens, 50);
}

#[test]
fn bad_new_rules_are_named_with_their_path_and_value() {
    let start = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
    let mut doc = base();
    for period in [
        BudgetPeriod::Day,
        BudgetPeriod::Month,
        BudgetPeriod::Day,
        BudgetPeriod::Month,
    ] {
        doc.workspaces[0].budgets.push(budget("1", period));
    }
    doc.workspaces[0].budget = Some(budget("1", BudgetPeriod::Day));
    let mut limit = ModelLimitSpec::new("nope");
    limit.rpm = Some(0);
    doc.keys[0].model_limits.push(limit);
    let mut raised = TemporarySpec::until(start);
    raised.budget = Some(dec("5"));
    doc.keys[0].temporary = Some(raised);
    doc.org.temporary = Some(TemporarySpec::until(start));
    let mut negative = TemporarySpec::until(start);
    negative.tpm = Some(-3);
    doc.workspaces[0].temporary = Some(negative);

    let Err(PolicyError::Invalid { issues }) = Policy::new(doc) else {
        panic!("expected invalid");
    };
    let find = |path: &str| {
        issues
            .iter()
            .find(|i| i.path == path)
            .unwrap_or_else(|| panic!("no issue at {path}: {issues:#?}"))
    };
    assert!(matches!(
        find("workspaces[0].budgets").problem,
        Problem::CapExceeded { count: 5, cap: 4 }
    ));
    assert_eq!(
        find("keys[0].model_limits[0].model").problem,
        Problem::UnknownModel
    );
    assert_eq!(
        find("keys[0].model_limits[0].rpm").problem,
        Problem::NotPositive
    );
    let missing = find("keys[0].temporary.budget");
    assert_eq!(missing.value, "5");
    assert!(matches!(missing.problem, Problem::MissingCompanion { .. }));
    assert_eq!(find("org.temporary").problem, Problem::Empty);
    let tpm = find("workspaces[0].temporary.tpm");
    assert_eq!(tpm.value, "-3");
    assert_eq!(tpm.problem, Problem::NotPositive);
}

#[test]
fn the_new_rules_round_trip_through_toml_and_json() {
    let text = r#"
[org]
id = "acme"

[[org.budgets]]
limit = "100"
period = "day"
soft = true

[[models]]
name = "m"
input_per_million = "1"
output_per_million = "1"

[[workspaces]]
id = "ws"
name = "chatbot-production"
models = ["m"]
budget = { limit = "10", period = "day" }
budgets = [{ limit = "200", period = "month", alert_thresholds = [90] }]
temporary = { until = "2026-12-01T00:00:00Z", rpm = 600, reason = "launch" }

[[keys]]
id = "k"
workspace = "ws"
secret_sha256 = "1c4b3a5b2d0ac9f8a7cba0d5ba5bb6e53b6e5e7d8a7cfe2e5a2b6a7e3a3b0d1f"

[[keys.model_limits]]
model = "m"
rpm = 10
tpm = 20000
budget = { limit = "5", period = "month" }
"#;
    let policy = Policy::from_toml_str(text).expect("valid");
    let doc = policy.document();
    assert!(doc.org.budgets[0].soft);
    assert_eq!(doc.workspaces[0].budgets[0].alert_thresholds, vec![90]);
    assert_eq!(doc.workspaces[0].temporary.as_ref().unwrap().rpm, Some(600));
    assert_eq!(doc.keys[0].model_limits[0].rpm, Some(10));
    let json = serde_json::to_string(doc).unwrap();
    let again = Policy::from_json_str(&json).expect("valid");
    assert_eq!(again.document(), doc);
}
