//! Model-based property test: the real [`Engine`] and a deliberately plain, sequential
//! reference model run the same random sequences of reservations, commits, drops,
//! clock advances and policy changes, and must agree on every decision (admitted, or
//! denied with the same reason and scope), every receipt (to the pico-dollar) and every
//! current-period counter that `Engine::usage` reports.
//!
//! The model is written for clarity, not speed: its own GCRA buckets, budgets, holds
//! and periods, with plain integers (`i128` for money, so it never saturates) and no
//! atomics. The policy is tiny (one org with a budget and a wallet, two workspaces, two
//! priced models and a third unknown one, three keys and a fourth unknown one) and its
//! limits are small, so every kind of denial happens often.
//!
//! `PROPTEST_CASES` sets the number of cases (256 by default; CI runs 2000).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{TestCaseError, TestRunner};
use tollgate::*;

const SEC: u64 = 1_000_000_000;
const MINUTE: u64 = 60 * SEC;
const DAY: u64 = 86_400 * SEC;

/// 2026-11-30 20:00 UTC: the day and the month both end four hours in.
fn start() -> u64 {
    Utc.with_ymd_and_hms(2026, 11, 30, 20, 0, 0)
        .unwrap()
        .timestamp_nanos_opt()
        .unwrap() as u64
}

// ---------------------------------------------------------------------------------
// The fixed part of the policy: names, prices, periods and output defaults.
// ---------------------------------------------------------------------------------

const MODELS: [&str; 2] = ["m-lite", "m-max"];
/// Prices per million tokens as written in the policy, and the same in pico-dollars per
/// token as the model computes with (worked out by hand, so a conversion slip shows).
const INPUT_PER_MILLION: [&str; 2] = ["0.15", "2.5"];
const OUTPUT_PER_MILLION: [&str; 2] = ["0.6", "10"];
const INPUT_PICOS: [i128; 2] = [150_000, 2_500_000];
const OUTPUT_PICOS: [i128; 2] = [600_000, 10_000_000];

const WORKSPACES: [&str; 2] = ["ws-a", "ws-b"];
const WORKSPACE_PERIOD: [BudgetPeriod; 2] =
    [BudgetPeriod::Day, BudgetPeriod::Custom { seconds: 5_400 }];

const KEYS: [&str; 3] = ["k-a1", "k-a2", "k-b"];
const SECRETS: [&str; 3] = ["sk-a1", "sk-a2", "sk-b"];
const KEY_WORKSPACE: [usize; 3] = [0, 0, 1];
/// Every key's budget period equals the span its counters would have without one (its
/// workspace's), except `k-a1`, whose budget is never removed: so no policy change ever
/// moves a scope to a different span, a case the rollover rule leaves open (workspaces
/// and the org always have a budget for the same reason).
const KEY_PERIOD: [BudgetPeriod; 3] = [
    BudgetPeriod::Custom { seconds: 3_600 },
    BudgetPeriod::Day,
    BudgetPeriod::Custom { seconds: 5_400 },
];

/// Chosen so each step of the output fallback (request, key, model, workspace, org) is
/// the one that decides for some key and model.
const KEY_DEFAULT_OUTPUT: [Option<u32>; 3] = [Some(150), None, None];
const MODEL_DEFAULT_OUTPUT: [Option<u32>; 2] = [None, Some(500)];
const WORKSPACE_DEFAULT_OUTPUT: [Option<u32>; 2] = [None, Some(250)];
const ORG_DEFAULT_OUTPUT: u32 = 400;

/// A budget or wallet that never refuses ordinary requests (one million USD), in µUSD.
const HUGE: u64 = 1_000_000_000_000;

// ---------------------------------------------------------------------------------
// The random part of the policy.
// ---------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Limits {
    rpm: Option<i64>,
    rpd: Option<i64>,
    tpm: Option<i64>,
    counts: TokenCount,
    max_concurrent: Option<i64>,
}

#[derive(Clone, Debug)]
struct ModelLimits {
    rpm: Option<i64>,
    tpm: Option<i64>,
    counts: TokenCount,
}

#[derive(Clone, Debug)]
struct WorkspaceParams {
    status: WorkspaceStatus,
    grants: [bool; 2],
    limits: Limits,
    model_limits: [ModelLimits; 2],
    /// µUSD per period.
    budget: u64,
}

#[derive(Clone, Debug)]
struct KeyParams {
    /// Absent keys are unknown; one that comes back gets fresh counters.
    present: bool,
    revoked: bool,
    /// Expiry, in seconds after [`start`].
    expires_after: Option<u64>,
    limits: Limits,
    /// µUSD per period.
    budget: Option<u64>,
}

#[derive(Clone, Debug)]
struct Params {
    /// µUSD per month.
    org_budget: u64,
    /// µUSD, never reset.
    wallet: Option<u64>,
    default_workspace: Option<usize>,
    workspaces: [WorkspaceParams; 2],
    keys: [KeyParams; 3],
}

fn usd(micros: u64) -> Decimal {
    Decimal::new(micros as i64, 6)
}

fn picos(micros: u64) -> i128 {
    i128::from(micros) * 1_000_000
}

fn limits_spec(l: &Limits) -> LimitsSpec {
    LimitsSpec {
        rpm: l.rpm,
        rpd: l.rpd,
        tpm: l.tpm,
        tpm_counts: l.counts,
        max_concurrent: l.max_concurrent,
    }
}

fn policy(p: &Params) -> Policy {
    let mut doc = PolicyDocument::new(OrgSpec {
        wallet: p.wallet.map(usd),
        budget: Some(BudgetSpec::new(usd(p.org_budget), BudgetPeriod::Month)),
        default_workspace: p.default_workspace.map(|w| WORKSPACES[w].to_owned()),
        ..OrgSpec::new("org")
    });
    doc.defaults.max_output_tokens = i64::from(ORG_DEFAULT_OUTPUT);
    for m in 0..2 {
        doc.models.push(ModelSpec {
            default_max_output_tokens: MODEL_DEFAULT_OUTPUT[m].map(i64::from),
            ..ModelSpec::new(
                MODELS[m],
                INPUT_PER_MILLION[m].parse().unwrap(),
                OUTPUT_PER_MILLION[m].parse().unwrap(),
            )
        });
    }
    for (w, wp) in p.workspaces.iter().enumerate() {
        doc.workspaces.push(WorkspaceSpec {
            status: wp.status,
            models: (0..2)
                .filter(|&m| wp.grants[m])
                .map(|m| MODELS[m].to_owned())
                .collect(),
            limits: limits_spec(&wp.limits),
            model_limits: (0..2)
                .map(|m| ModelLimitSpec {
                    model: MODELS[m].to_owned(),
                    rpm: wp.model_limits[m].rpm,
                    tpm: wp.model_limits[m].tpm,
                    tpm_counts: wp.model_limits[m].counts,
                })
                .collect(),
            budget: Some(BudgetSpec::new(usd(wp.budget), WORKSPACE_PERIOD[w])),
            default_max_output_tokens: WORKSPACE_DEFAULT_OUTPUT[w].map(i64::from),
            ..WorkspaceSpec::new(WORKSPACES[w], WORKSPACES[w])
        });
    }
    for (k, kp) in p.keys.iter().enumerate() {
        if !kp.present {
            continue;
        }
        doc.keys.push(KeySpec {
            status: if kp.revoked {
                KeyStatus::Revoked
            } else {
                KeyStatus::Active
            },
            expires_at: kp
                .expires_after
                .map(|s| DateTime::from_timestamp_nanos((start() + s * SEC) as i64)),
            limits: limits_spec(&kp.limits),
            budget: kp.budget.map(|b| BudgetSpec::new(usd(b), KEY_PERIOD[k])),
            default_max_output_tokens: KEY_DEFAULT_OUTPUT[k].map(i64::from),
            ..KeySpec::new(KEYS[k], WORKSPACES[KEY_WORKSPACE[k]], SECRETS[k])
        });
    }
    Policy::new(doc).expect("generated policies are valid")
}

// ---------------------------------------------------------------------------------
// Operations.
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum KeyPick {
    A1,
    A2,
    B,
    Ghost,
}

impl KeyPick {
    fn index(self) -> Option<usize> {
        match self {
            KeyPick::A1 => Some(0),
            KeyPick::A2 => Some(1),
            KeyPick::B => Some(2),
            KeyPick::Ghost => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum ModelPick {
    Lite,
    Max,
    Ghost,
}

impl ModelPick {
    fn index(self) -> Option<usize> {
        match self {
            ModelPick::Lite => Some(0),
            ModelPick::Max => Some(1),
            ModelPick::Ghost => None,
        }
    }

    fn name(self) -> &'static str {
        self.index().map_or("m-ghost", |m| MODELS[m])
    }
}

/// Grids of period boundaries: hourly keys, 90-minute workspaces, days (and months).
#[derive(Clone, Copy, Debug)]
enum Grid {
    Hour,
    NinetyMinutes,
    Day,
}

impl Grid {
    fn step(self) -> u64 {
        match self {
            Grid::Hour => 3_600 * SEC,
            Grid::NinetyMinutes => 5_400 * SEC,
            Grid::Day => DAY,
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Reserve {
        key: KeyPick,
        model: ModelPick,
        /// Authenticate by key id instead of by secret.
        by_id: bool,
        input: u32,
        max_output: Option<u32>,
    },
    /// Commit the `nth` outstanding reservation (modulo their number).
    Commit {
        nth: usize,
        input: u32,
        output: u32,
    },
    /// Drop the `nth` outstanding reservation (modulo their number).
    Drop {
        nth: usize,
    },
    Advance {
        millis: u64,
    },
    /// Move to the next boundary of `grid`, plus `offset_nanos` (no move if that is
    /// not later than now).
    AdvanceTo {
        grid: Grid,
        offset_nanos: i64,
    },
    Apply(Box<Params>),
    CheckUsage,
}

// ---------------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------------

fn sometimes<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Option<T>> {
    prop_oneof![3 => Just(None), 2 => s.prop_map(Some)].boxed()
}

fn counts() -> impl Strategy<Value = TokenCount> {
    prop_oneof![
        2 => Just(TokenCount::Total),
        1 => Just(TokenCount::Input),
        1 => Just(TokenCount::Output),
    ]
}

/// µUSD. Whole thousands half the time: a thousand µUSD is exactly 100 output tokens of
/// `m-max`, so requests of round sizes fill a budget to the last pico-dollar and the
/// edge of "spent + held + cost ≤ limit" is tested, not just its neighbourhood.
fn money(lo: u64, hi: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => lo..=hi,
        3 => (lo / 1_000..=hi / 1_000).prop_map(|k| k.max(1) * 1_000),
        1 => Just(HUGE),
    ]
}

fn limits() -> impl Strategy<Value = Limits> {
    (
        sometimes(1..=5i64),
        sometimes(2..=10i64),
        sometimes(400..=4_000i64),
        counts(),
        sometimes(1..=3i64),
    )
        .prop_map(|(rpm, rpd, tpm, counts, max_concurrent)| Limits {
            rpm,
            rpd,
            tpm,
            counts,
            max_concurrent,
        })
}

fn model_limits() -> impl Strategy<Value = ModelLimits> {
    (sometimes(1..=4i64), sometimes(300..=2_500i64), counts())
        .prop_map(|(rpm, tpm, counts)| ModelLimits { rpm, tpm, counts })
}

fn workspace() -> impl Strategy<Value = WorkspaceParams> {
    (
        prop_oneof![
            30 => Just(WorkspaceStatus::Active),
            1 => Just(WorkspaceStatus::Review),
            1 => Just(WorkspaceStatus::Suspended),
        ],
        [prop::bool::weighted(0.93), prop::bool::weighted(0.93)],
        limits(),
        [model_limits(), model_limits()],
        money(5_000, 80_000),
    )
        .prop_map(
            |(status, grants, limits, model_limits, budget)| WorkspaceParams {
                status,
                grants,
                limits,
                model_limits,
                budget,
            },
        )
}

fn key(always_budgeted: bool) -> impl Strategy<Value = KeyParams> {
    let budget = if always_budgeted {
        money(2_000, 40_000).prop_map(Some).boxed()
    } else {
        sometimes(money(2_000, 40_000))
    };
    (
        prop::bool::weighted(0.96),
        prop::bool::weighted(0.06),
        expiry(),
        limits(),
        budget,
    )
        .prop_map(
            |(present, revoked, expires_after, limits, budget)| KeyParams {
                present,
                revoked,
                expires_after,
                limits,
                budget,
            },
        )
}

/// Seconds after [`start`]. Often on the hour, where `Op::AdvanceTo` lands exactly,
/// so the instant of expiry itself is tested and not just either side of it.
fn expiry() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![
        14 => Just(None),
        1 => Just(Some(3_600)),
        1 => Just(Some(7_200)),
        1 => (1..=40 * 3_600u64).prop_map(Some),
    ]
}

fn params() -> impl Strategy<Value = Params> {
    (
        money(40_000, 500_000),
        prop_oneof![1 => Just(None), 3 => money(40_000, 600_000).prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => (0..2usize).prop_map(Some)],
        [workspace(), workspace()],
        [key(true), key(false), key(false)],
    )
        .prop_map(
            |(org_budget, wallet, default_workspace, workspaces, keys)| Params {
                org_budget,
                wallet,
                default_workspace,
                workspaces,
                keys,
            },
        )
}

fn tokens() -> impl Strategy<Value = u32> {
    prop_oneof![
        12 => 0..=800u32,
        8 => (0..=8u32).prop_map(|h| h * 100),
        1 => Just(u32::MAX),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let key = prop_oneof![
        5 => Just(KeyPick::A1),
        5 => Just(KeyPick::A2),
        5 => Just(KeyPick::B),
        1 => Just(KeyPick::Ghost),
    ];
    let model = prop_oneof![
        10 => Just(ModelPick::Lite),
        9 => Just(ModelPick::Max),
        1 => Just(ModelPick::Ghost),
    ];
    let reserve = (
        key,
        model,
        any::<bool>(),
        tokens(),
        prop_oneof![1 => Just(None), 3 => tokens().prop_map(Some)],
    )
        .prop_map(|(key, model, by_id, input, max_output)| Op::Reserve {
            key,
            model,
            by_id,
            input,
            max_output,
        });
    let grid = prop_oneof![Just(Grid::Hour), Just(Grid::NinetyMinutes), Just(Grid::Day)];
    let offset = prop_oneof![
        2 => Just(0i64),
        1 => Just(-1i64),
        2 => -2_000_000_000..=2_000_000_000i64,
    ];
    prop_oneof![
        12 => reserve,
        5 => (0..8usize, tokens(), tokens())
            .prop_map(|(nth, input, output)| Op::Commit { nth, input, output }),
        2 => (0..8usize).prop_map(|nth| Op::Drop { nth }),
        3 => (0..=3_000u64).prop_map(|millis| Op::Advance { millis }),
        2 => (0..=120_000u64).prop_map(|millis| Op::Advance { millis }),
        1 => (0..=30 * 3_600_000u64).prop_map(|millis| Op::Advance { millis }),
        2 => (grid, offset).prop_map(|(grid, offset_nanos)| Op::AdvanceTo { grid, offset_nanos }),
        1 => params().prop_map(|p| Op::Apply(Box::new(p))),
        2 => Just(Op::CheckUsage),
    ]
}

// ---------------------------------------------------------------------------------
// The reference model.
// ---------------------------------------------------------------------------------

/// What a scope's usage counters cover.
#[derive(Clone, Copy, Debug)]
enum Span {
    Seconds(u64),
    Day,
    Month,
    Forever,
}

impl From<BudgetPeriod> for Span {
    fn from(period: BudgetPeriod) -> Self {
        match period {
            BudgetPeriod::Day => Span::Day,
            BudgetPeriod::Month => Span::Month,
            BudgetPeriod::Custom { seconds } => Span::Seconds(seconds),
        }
    }
}

/// `[start, end)` of the period of `span` containing `t`, in UTC.
fn bounds(span: Span, t: u64) -> (u64, u64) {
    let aligned = |length: u64| (t - t % length, t - t % length + length);
    match span {
        Span::Forever => (0, u64::MAX),
        Span::Day => aligned(DAY),
        Span::Seconds(seconds) => aligned(seconds * SEC),
        Span::Month => {
            let date = DateTime::from_timestamp_nanos(t as i64).date_naive();
            let (year, month) = (date.year(), date.month());
            let (next_year, next_month) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
            let midnight = |y, m| {
                Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
                    .unwrap()
                    .timestamp_nanos_opt()
                    .unwrap() as u64
            };
            (midnight(year, month), midnight(next_year, next_month))
        }
    }
}

/// A GCRA rate: `limit` units per `window`, one unit every `interval` nanoseconds
/// (rounded up), at most `limit` units' worth of intervals ahead of now.
#[derive(Clone, Copy, Debug)]
struct Rate {
    limit: u64,
    interval: u64,
    tolerance: u64,
}

impl Rate {
    fn new(limit: i64, window: u64) -> Self {
        let limit = limit as u64;
        let interval = window.div_ceil(limit).max(1);
        Rate {
            limit,
            interval,
            tolerance: limit * interval,
        }
    }
}

/// One admitted take from a bucket: the nanoseconds it pushed the theoretical arrival
/// time (TAT) forward, and the TAT right after it (the end of its slot in the schedule).
#[derive(Clone, Copy, Debug)]
struct Take {
    added: u64,
    end: u64,
}

/// Take `units` from the bucket whose TAT is `tat`, if they fit now.
fn take(tat: &mut u64, rate: Rate, units: u64, now: u64) -> Option<Take> {
    if units > rate.limit {
        return None;
    }
    let added = units * rate.interval;
    let new_tat = (*tat).max(now) + added;
    if new_tat > now + rate.tolerance {
        return None;
    }
    *tat = new_tat;
    Some(Take {
        added,
        end: new_tat,
    })
}

/// Give back up to `nanos` of a take, but only the part of it that has not drained yet
/// (its slot ends at `take.end`; what lies before now is gone), and never past full.
fn give_back(tat: &mut u64, take: Take, nanos: u64, now: u64) {
    let undrained = take.end.saturating_sub(now);
    let amount = nanos.min(take.added).min(undrained);
    if *tat > now {
        *tat = tat.saturating_sub(amount).max(now);
    }
}

/// Usage beyond a take is debt: it pushes the TAT on whether or not it fits.
fn charge(tat: &mut u64, nanos: u64, now: u64) {
    if nanos > 0 {
        *tat = (*tat).max(now).saturating_add(nanos);
    }
}

fn pick(counts: TokenCount, input: u64, output: u64) -> u64 {
    match counts {
        TokenCount::Total => input + output,
        TokenCount::Input => input,
        TokenCount::Output => output,
    }
}

/// Every limit one level enforces for one request.
#[derive(Clone, Debug, Default)]
struct Rules {
    rpm: Option<Rate>,
    rpd: Option<Rate>,
    tpm: Option<(Rate, TokenCount)>,
    max_concurrent: Option<u32>,
    /// Pico-dollars.
    budget: Option<i128>,
}

impl Rules {
    fn of(limits: &Limits, budget: Option<u64>) -> Self {
        Rules {
            rpm: limits.rpm.map(|l| Rate::new(l, MINUTE)),
            rpd: limits.rpd.map(|l| Rate::new(l, DAY)),
            tpm: limits.tpm.map(|l| (Rate::new(l, MINUTE), limits.counts)),
            max_concurrent: limits.max_concurrent.map(|m| m as u32),
            budget: budget.map(picos),
        }
    }
}

/// All counters of one scope (key, workspace, workspace × model, org, wallet).
#[derive(Clone, Debug)]
struct Counters {
    span: Span,
    rpm_tat: u64,
    rpd_tat: u64,
    tpm_tat: u64,
    in_flight: u32,
    start: u64,
    end: u64,
    spent: i128,
    held: i128,
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
}

impl Counters {
    fn new(span: Span, now: u64) -> Self {
        let (start, end) = bounds(span, now);
        Counters {
            span,
            rpm_tat: 0,
            rpd_tat: 0,
            tpm_tat: 0,
            in_flight: 0,
            start,
            end,
            spent: 0,
            held: 0,
            requests: 0,
            input_tokens: 0,
            output_tokens: 0,
        }
    }
}

/// THE PERIOD RULE, kept in this one function so it is easy to adapt. Every access to a
/// scope's counters at time `t` (a reservation reaching the level, a commit or drop
/// settling on it, a usage report) first moves the scope to the period containing `t`.
/// The period that ended is left behind (its totals are the engine's `previous`, which
/// is not compared); the new one starts with nothing spent, requested or used, but the
/// money held by outstanding reservations is carried over into it, so their commits
/// and drops settle against the period they happen in.
fn roll(c: &mut Counters, t: u64) {
    if t < c.end {
        return;
    }
    (c.start, c.end) = bounds(c.span, t);
    c.spent = 0;
    c.requests = 0;
    c.input_tokens = 0;
    c.output_tokens = 0;
}

/// Requests per minute, per day, tokens, a concurrency slot and the worst-case cost, in
/// that order, each recorded in `hold` as it is taken.
fn take_each(
    c: &mut Counters,
    hold: &mut LevelHold,
    rules: &Rules,
    ask: Ask,
    now: u64,
) -> Result<(), DenialReason> {
    if let Some(rate) = rules.rpm {
        let t = take(&mut c.rpm_tat, rate, 1, now).ok_or(DenialReason::RequestsPerMinute)?;
        hold.rpm = Some(t);
    }
    if let Some(rate) = rules.rpd {
        let t = take(&mut c.rpd_tat, rate, 1, now).ok_or(DenialReason::RequestsPerDay)?;
        hold.rpd = Some(t);
    }
    if let Some((rate, counts)) = rules.tpm {
        let units = pick(counts, ask.input, ask.output);
        let t = take(&mut c.tpm_tat, rate, units, now).ok_or(DenialReason::TokensPerMinute)?;
        hold.tokens = Some((t, rate.interval, counts));
    }
    if let Some(max) = rules.max_concurrent {
        if c.in_flight >= max {
            return Err(DenialReason::Concurrency);
        }
        c.in_flight += 1;
        hold.slot = true;
    }
    // Held on every level, budget or not, so usage shows what is in flight and a
    // budget set by a later policy counts it.
    if rules
        .budget
        .is_some_and(|limit| c.spent + c.held + ask.cost > limit)
    {
        return Err(DenialReason::Budget);
    }
    c.held += ask.cost;
    hold.held = ask.cost;
    Ok(())
}

/// What one level holds for one admitted request.
#[derive(Clone, Debug)]
struct LevelHold {
    scope: usize,
    rpm: Option<Take>,
    rpd: Option<Take>,
    /// The take, and the interval and counting of the token limit it was taken under
    /// (a policy change in between does not change how it is settled).
    tokens: Option<(Take, u64, TokenCount)>,
    slot: bool,
    held: i128,
}

/// The worst case a request asks for.
#[derive(Clone, Copy, Debug)]
struct Ask {
    input: u64,
    output: u64,
    cost: i128,
}

#[derive(Clone, Debug)]
struct ModelReservation {
    levels: Vec<LevelHold>,
    ask: Ask,
    model: usize,
    /// When it was taken.
    at: u64,
}

type Refusal = (DenialReason, Scope);

struct Model {
    now: u64,
    params: Params,
    /// Counters by scope; a scope whose id leaves the policy stays here (reservations
    /// taken from it still settle against it) but is no longer reachable by id.
    scopes: Vec<Counters>,
    keys: [Option<usize>; 3],
    workspaces: [usize; 2],
    workspace_models: [[usize; 2]; 2],
    org: usize,
    wallet: usize,
}

fn key_rules(params: &Params, k: usize) -> Rules {
    let kp = &params.keys[k];
    Rules::of(&kp.limits, kp.budget)
}

fn workspace_rules(params: &Params, w: usize) -> Rules {
    let wp = &params.workspaces[w];
    Rules::of(&wp.limits, Some(wp.budget))
}

fn model_rules(params: &Params, w: usize, m: usize) -> Rules {
    let ml = &params.workspaces[w].model_limits[m];
    Rules {
        rpm: ml.rpm.map(|l| Rate::new(l, MINUTE)),
        tpm: ml.tpm.map(|l| (Rate::new(l, MINUTE), ml.counts)),
        ..Rules::default()
    }
}

fn key_span(k: usize) -> Span {
    KEY_PERIOD[k].into()
}

fn workspace_span(w: usize) -> Span {
    WORKSPACE_PERIOD[w].into()
}

impl Model {
    fn new(params: Params, now: u64) -> Self {
        let mut model = Model {
            now,
            params: params.clone(),
            scopes: Vec::new(),
            keys: [None; 3],
            workspaces: [0; 2],
            workspace_models: [[0; 2]; 2],
            org: 0,
            wallet: 0,
        };
        for w in 0..2 {
            model.workspaces[w] = model.new_scope(workspace_span(w));
            for m in 0..2 {
                model.workspace_models[w][m] = model.new_scope(workspace_span(w));
            }
        }
        model.org = model.new_scope(Span::Month);
        model.wallet = model.new_scope(Span::Forever);
        model.apply(params);
        model
    }

    fn new_scope(&mut self, span: Span) -> usize {
        self.scopes.push(Counters::new(span, self.now));
        self.scopes.len() - 1
    }

    /// Counters of ids that persist are kept; a key that left and comes back starts
    /// afresh.
    fn apply(&mut self, params: Params) {
        // Rate limits that persist keep the units already taken: a changed interval
        // rescales the backlog; a limit added starts full.
        let now = self.now;
        let adapt = |c: &mut Counters, old: &Rules, new: &Rules| {
            let rates = [
                (&mut c.rpm_tat, old.rpm, new.rpm),
                (&mut c.rpd_tat, old.rpd, new.rpd),
                (&mut c.tpm_tat, old.tpm.map(|t| t.0), new.tpm.map(|t| t.0)),
            ];
            for (tat, old, new) in rates {
                match (old, new) {
                    (Some(o), Some(n)) if o.interval != n.interval => {
                        let backlog = u128::from(tat.saturating_sub(now));
                        let scaled = backlog * u128::from(n.interval) / u128::from(o.interval);
                        *tat = now.saturating_add(u64::try_from(scaled).unwrap_or(u64::MAX));
                    }
                    (None, Some(_)) => *tat = 0,
                    _ => {}
                }
            }
        };
        for k in 0..3 {
            if let (Some(scope), true) = (self.keys[k], params.keys[k].present) {
                adapt(
                    &mut self.scopes[scope],
                    &key_rules(&self.params, k),
                    &key_rules(&params, k),
                );
            }
        }
        for w in 0..2 {
            let scope = self.workspaces[w];
            adapt(
                &mut self.scopes[scope],
                &workspace_rules(&self.params, w),
                &workspace_rules(&params, w),
            );
            for m in 0..2 {
                let scope = self.workspace_models[w][m];
                adapt(
                    &mut self.scopes[scope],
                    &model_rules(&self.params, w, m),
                    &model_rules(&params, w, m),
                );
            }
        }
        for k in 0..3 {
            if !params.keys[k].present {
                self.keys[k] = None;
            } else if self.keys[k].is_none() {
                self.keys[k] = Some(self.new_scope(key_span(k)));
            }
        }
        self.params = params;
    }

    fn reserve(
        &mut self,
        key: KeyPick,
        model: ModelPick,
        input: u32,
        max_output: Option<u32>,
    ) -> Result<ModelReservation, Refusal> {
        let now = self.now;
        let Some(k) = key.index().filter(|&k| self.params.keys[k].present) else {
            return Err((DenialReason::UnknownKey, Scope::Key));
        };
        let kp = &self.params.keys[k];
        if kp.revoked {
            return Err((DenialReason::KeyRevoked, Scope::Key));
        }
        if kp.expires_after.is_some_and(|s| now >= start() + s * SEC) {
            return Err((DenialReason::KeyExpired, Scope::Key));
        }
        let w = KEY_WORKSPACE[k];
        let wp = &self.params.workspaces[w];
        if wp.status != WorkspaceStatus::Active {
            return Err((
                DenialReason::WorkspaceNotActive(wp.status),
                Scope::Workspace,
            ));
        }
        let Some(m) = model.index() else {
            return Err((DenialReason::UnknownModel, Scope::WorkspaceModel));
        };
        if !wp.grants[m] && self.params.default_workspace != Some(w) {
            return Err((DenialReason::ModelNotGranted, Scope::WorkspaceModel));
        }

        let output = max_output
            .or(KEY_DEFAULT_OUTPUT[k])
            .or(MODEL_DEFAULT_OUTPUT[m])
            .or(WORKSPACE_DEFAULT_OUTPUT[w])
            .unwrap_or(ORG_DEFAULT_OUTPUT);
        let ask = Ask {
            input: u64::from(input),
            output: u64::from(output),
            cost: i128::from(input) * INPUT_PICOS[m] + i128::from(output) * OUTPUT_PICOS[m],
        };

        let levels = [
            (
                Scope::Key,
                self.keys[k].unwrap(),
                Some(key_rules(&self.params, k)),
            ),
            (
                Scope::Workspace,
                self.workspaces[w],
                Some(workspace_rules(&self.params, w)),
            ),
            (
                Scope::WorkspaceModel,
                self.workspace_models[w][m],
                Some(model_rules(&self.params, w, m)),
            ),
            (
                Scope::Org,
                self.org,
                Some(Rules {
                    budget: Some(picos(self.params.org_budget)),
                    ..Rules::default()
                }),
            ),
            (
                Scope::Org,
                self.wallet,
                self.params.wallet.map(|w| Rules {
                    budget: Some(picos(w)),
                    ..Rules::default()
                }),
            ),
        ];

        let mut taken = Vec::new();
        for (level, (scope, index, rules)) in levels.into_iter().enumerate() {
            let Some(rules) = rules else { continue };
            match self.take_level(index, &rules, ask) {
                Ok(hold) => taken.push(hold),
                Err(reason) => {
                    for hold in taken {
                        self.release(hold);
                    }
                    let reason = match reason {
                        DenialReason::Budget if level == 4 => DenialReason::Wallet,
                        reason => reason,
                    };
                    return Err((reason, scope));
                }
            }
        }
        Ok(ModelReservation {
            levels: taken,
            ask,
            model: m,
            at: now,
        })
    }

    /// Take this level's share; on refusal give back whatever of it was taken.
    fn take_level(
        &mut self,
        index: usize,
        rules: &Rules,
        ask: Ask,
    ) -> Result<LevelHold, DenialReason> {
        let now = self.now;
        let c = &mut self.scopes[index];
        roll(c, now);
        let mut hold = LevelHold {
            scope: index,
            rpm: None,
            rpd: None,
            tokens: None,
            slot: false,
            held: 0,
        };
        match take_each(c, &mut hold, rules, ask, now) {
            Ok(()) => Ok(hold),
            Err(reason) => {
                self.release(hold);
                Err(reason)
            }
        }
    }

    /// The request did not happen: give everything back.
    fn release(&mut self, hold: LevelHold) {
        let now = self.now;
        let c = &mut self.scopes[hold.scope];
        roll(c, now);
        if let Some(t) = hold.rpm {
            give_back(&mut c.rpm_tat, t, u64::MAX, now);
        }
        if let Some(t) = hold.rpd {
            give_back(&mut c.rpd_tat, t, u64::MAX, now);
        }
        if let Some((t, _, _)) = hold.tokens {
            give_back(&mut c.tpm_tat, t, u64::MAX, now);
        }
        if hold.slot {
            c.in_flight -= 1;
        }
        c.held -= hold.held;
    }

    /// A dropped reservation gives everything back on every level.
    fn drop_reservation(&mut self, reservation: ModelReservation) {
        for hold in reservation.levels {
            self.release(hold);
        }
    }

    /// Replace the holds by real usage; returns the cost in pico-dollars.
    fn commit(&mut self, reservation: ModelReservation, input: u32, output: u32) -> i128 {
        let now = self.now;
        let (input, output) = (u64::from(input), u64::from(output));
        let cost = i128::from(input) * INPUT_PICOS[reservation.model]
            + i128::from(output) * OUTPUT_PICOS[reservation.model];
        let ask = reservation.ask;
        for hold in reservation.levels {
            let c = &mut self.scopes[hold.scope];
            roll(c, now);
            if let Some((t, interval, counts)) = hold.tokens {
                let reserved = pick(counts, ask.input, ask.output);
                let used = pick(counts, input, output);
                if used < reserved {
                    give_back(
                        &mut c.tpm_tat,
                        t,
                        (reserved - used).saturating_mul(interval),
                        now,
                    );
                } else {
                    charge(
                        &mut c.tpm_tat,
                        (used - reserved).saturating_mul(interval),
                        now,
                    );
                }
            }
            // Requests are not given back: the request happened.
            if hold.slot {
                c.in_flight -= 1;
            }
            c.held -= hold.held;
            c.spent += cost;
            c.requests += 1;
            c.input_tokens += input;
            c.output_tokens += output;
        }
        cost
    }

    fn report(&mut self, index: usize) -> Seen {
        let now = self.now;
        let c = &mut self.scopes[index];
        roll(c, now);
        // The engine's counters saturate at i64::MAX pico-dollars and the model's do not:
        // the generated sizes keep far below it, so both mean the same thing.
        assert!(c.spent < i128::from(i64::MAX) && c.held < i128::from(i64::MAX));
        Seen {
            period: (utc(c.start), utc(c.end)),
            requests: c.requests,
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
            cost: decimal(c.spent),
            held: decimal(c.held),
            in_flight: c.in_flight,
        }
    }
}

fn decimal(picos: i128) -> Decimal {
    Decimal::from_i128_with_scale(picos, 12).normalize()
}

fn utc(nanos: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(nanos as i64)
}

/// The compared part of one scope's usage: its current period and what is in flight.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    period: (DateTime<Utc>, DateTime<Utc>),
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost: Decimal,
    held: Decimal,
    in_flight: u32,
}

impl From<&ScopeReport> for Seen {
    fn from(r: &ScopeReport) -> Self {
        let c = &r.current;
        Seen {
            period: (
                utc(c.period_start.as_unix_nanos()),
                utc(c.period_end.as_unix_nanos()),
            ),
            requests: c.requests,
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
            cost: c.cost.normalize(),
            held: c.held.normalize(),
            in_flight: r.in_flight,
        }
    }
}

// ---------------------------------------------------------------------------------
// Driving both.
// ---------------------------------------------------------------------------------

/// What a run saw, so a test can check the generator reaches every kind of outcome.
#[derive(Default)]
struct Outcomes {
    /// Denials, counted by `(reason, scope)`.
    denials: BTreeMap<String, usize>,
    admitted: usize,
    overages: usize,
    refunds: usize,
    /// Clock moves across a period boundary of some scope.
    rollovers: usize,
    /// Commits and drops of reservations taken before a period boundary since passed.
    settled_across_a_boundary: usize,
}

impl Outcomes {
    fn settled(&mut self, reservation: &ModelReservation, now: u64) {
        if now >= next_boundary(reservation.at) {
            self.settled_across_a_boundary += 1;
        }
    }

    fn add(&mut self, other: Outcomes) {
        for (denial, n) in other.denials {
            *self.denials.entry(denial).or_default() += n;
        }
        self.admitted += other.admitted;
        self.overages += other.overages;
        self.refunds += other.refunds;
        self.rollovers += other.rollovers;
        self.settled_across_a_boundary += other.settled_across_a_boundary;
    }
}

/// The first period boundary of any scope after `t`: days and months are on both grids.
fn next_boundary(t: u64) -> u64 {
    [Grid::Hour, Grid::NinetyMinutes]
        .into_iter()
        .map(|g| (t / g.step() + 1) * g.step())
        .min()
        .unwrap()
}

fn check_usage(engine: &Engine, model: &mut Model, when: &str) -> Result<(), TestCaseError> {
    let usage = engine.usage();
    prop_assert_eq!(usage.taken_at.as_unix_nanos(), model.now);
    let want = model.report(model.org);
    prop_assert_eq!(Seen::from(&usage.org), want, "org, {}", when);
    let want = model.report(model.wallet).cost;
    prop_assert_eq!(usage.wallet_spent.normalize(), want, "wallet, {}", when);
    prop_assert_eq!(usage.workspaces.len(), 2);
    for (w, ws) in usage.workspaces.iter().enumerate() {
        prop_assert_eq!(&ws.id, WORKSPACES[w]);
        let want = model.report(model.workspaces[w]);
        prop_assert_eq!(Seen::from(&ws.usage), want, "{}, {}", &ws.id, when);
        prop_assert_eq!(ws.models.len(), 2);
        for (m, mu) in ws.models.iter().enumerate() {
            prop_assert_eq!(&mu.model, MODELS[m]);
            let want = model.report(model.workspace_models[w][m]);
            prop_assert_eq!(
                Seen::from(&mu.usage),
                want,
                "{} × {}, {}",
                &ws.id,
                &mu.model,
                when
            );
        }
    }
    let present: Vec<usize> = (0..3).filter(|&k| model.keys[k].is_some()).collect();
    let ids: Vec<&str> = usage.keys.iter().map(|k| k.id.as_str()).collect();
    let want_ids: Vec<&str> = present.iter().map(|&k| KEYS[k]).collect();
    prop_assert_eq!(ids, want_ids, "keys, {}", when);
    for (key, &k) in usage.keys.iter().zip(&present) {
        prop_assert_eq!(&key.workspace, WORKSPACES[KEY_WORKSPACE[k]]);
        let want = model.report(model.keys[k].unwrap());
        prop_assert_eq!(Seen::from(&key.usage), want, "{}, {}", &key.id, when);
    }
    Ok(())
}

fn request(
    key: KeyPick,
    model: ModelPick,
    by_id: bool,
    input: u32,
    max_output: Option<u32>,
) -> Request<'static> {
    let mut request = if by_id {
        Request::with_key_id(key.index().map_or("k-ghost", |k| KEYS[k]), model.name())
    } else {
        Request::with_secret(key.index().map_or("sk-ghost", |k| SECRETS[k]), model.name())
    }
    .input_tokens(input);
    request.max_output_tokens = max_output;
    request
}

fn run(initial: &Params, ops: &[Op]) -> Result<Outcomes, TestCaseError> {
    let clock = Arc::new(ManualClock::new(Timestamp::from_unix_nanos(start())));
    let engine = Engine::builder(policy(initial))
        .clock(clock.clone())
        .build();
    let mut model = Model::new(initial.clone(), start());
    let mut outstanding: Vec<(Reservation, ModelReservation)> = Vec::new();
    let mut seen = Outcomes::default();

    for (step, op) in ops.iter().enumerate() {
        let what = || format!("step {step}: {op:?}");
        match *op {
            Op::Reserve {
                key,
                model: m,
                by_id,
                input,
                max_output,
            } => {
                let got = engine.check_and_reserve(&request(key, m, by_id, input, max_output));
                match (got, model.reserve(key, m, input, max_output)) {
                    (Ok(reservation), Ok(held)) => {
                        let want = decimal(held.ask.cost);
                        prop_assert_eq!(reservation.reserved_cost(), want, "{}", what());
                        let want = (held.ask.input, held.ask.output);
                        prop_assert_eq!(reservation.reserved_tokens(), want, "{}", what());
                        seen.admitted += 1;
                        outstanding.push((reservation, held));
                    }
                    (Err(denial), Err(refusal)) => {
                        prop_assert_eq!((denial.reason, denial.scope), refusal, "{}", what());
                        *seen.denials.entry(format!("{refusal:?}")).or_default() += 1;
                    }
                    (got, want) => {
                        return Err(TestCaseError::fail(format!(
                            "{}: engine {:?}, model {:?}",
                            what(),
                            got.map_err(|d| (d.reason, d.scope)),
                            want.map(|r| r.ask),
                        )))
                    }
                }
            }
            Op::Commit { nth, input, output } => {
                if outstanding.is_empty() {
                    continue;
                }
                let (reservation, held) = outstanding.remove(nth % outstanding.len());
                seen.settled(&held, model.now);
                let reserved = held.ask.cost;
                let receipt = engine
                    .commit_usage(reservation, Usage::new(input, output))
                    .map_err(|e| TestCaseError::fail(format!("{}: {e}", what())))?;
                let cost = model.commit(held, input, output);
                prop_assert_eq!(receipt.cost(), decimal(cost), "{}", what());
                prop_assert_eq!(receipt.reserved_cost(), decimal(reserved), "{}", what());
                let overage = decimal((cost - reserved).max(0));
                prop_assert_eq!(receipt.overage(), overage, "{}", what());
                let tokens = (receipt.input_tokens(), receipt.output_tokens());
                prop_assert_eq!(tokens, (input, output), "{}", what());
                if cost > reserved {
                    seen.overages += 1;
                } else {
                    seen.refunds += 1;
                }
            }
            Op::Drop { nth } => {
                if outstanding.is_empty() {
                    continue;
                }
                let (reservation, held) = outstanding.remove(nth % outstanding.len());
                seen.settled(&held, model.now);
                drop(reservation);
                model.drop_reservation(held);
            }
            Op::Advance { millis } => {
                let to = model.now + millis * 1_000_000;
                advance(&clock, &mut model, to, &mut seen);
            }
            Op::AdvanceTo { grid, offset_nanos } => {
                let boundary = (model.now / grid.step() + 1) * grid.step();
                let to = boundary.saturating_add_signed(offset_nanos);
                advance(&clock, &mut model, to, &mut seen);
            }
            Op::Apply(ref params) => {
                engine.apply_policy(policy(params));
                model.apply((**params).clone());
            }
            Op::CheckUsage => check_usage(&engine, &mut model, &format!("after step {step}"))?,
        }
    }
    check_usage(&engine, &mut model, "at the end")?;

    for (reservation, held) in outstanding.drain(..) {
        drop(reservation);
        model.drop_reservation(held);
    }
    check_usage(&engine, &mut model, "after dropping every reservation")?;
    // Whatever the model says, nothing may stay held or in flight once all is dropped.
    let usage = engine.usage();
    let scopes = usage
        .workspaces
        .iter()
        .flat_map(|ws| std::iter::once(&ws.usage).chain(ws.models.iter().map(|m| &m.usage)))
        .chain(usage.keys.iter().map(|k| &k.usage))
        .chain(std::iter::once(&usage.org));
    for report in scopes {
        prop_assert_eq!((report.current.held, report.in_flight), (Decimal::ZERO, 0));
    }
    Ok(seen)
}

/// Move both clocks to `to` (never back).
fn advance(clock: &ManualClock, model: &mut Model, to: u64, seen: &mut Outcomes) {
    let now = model.now;
    let to = to.max(now);
    if to >= next_boundary(now) {
        seen.rollovers += 1;
    }
    clock.advance(Duration::from_nanos(to - now));
    model.now = to;
}

fn cases() -> impl Strategy<Value = (Params, Vec<Op>)> {
    (params(), vec(op(), 1..120))
}

proptest! {
    // A failure prints the shrunk operation sequence, which is the reproduction; the
    // regression file proptest would write cannot be placed for a test outside `src/`
    // (it only warns), so it is not asked for.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_agrees_with_the_model((initial, ops) in cases()) {
        run(&initial, &ops)?;
    }
}

/// A guard on the generator rather than the engine: every kind of denial at every
/// scope it can come from, admissions, overage, refunds and period rollovers all turn
/// up, often, in a fixed sample of cases. Without it a change to the policy or the
/// operations could make some outcome rare and the property above would silently stop
/// testing it.
#[test]
fn the_generator_reaches_every_outcome() {
    let mut runner = TestRunner::deterministic();
    let mut all = Outcomes::default();
    for _ in 0..150 {
        let (initial, ops) = cases().new_tree(&mut runner).unwrap().current();
        all.add(run(&initial, &ops).unwrap_or_else(|e| panic!("{e}")));
    }
    let expected = [
        (DenialReason::UnknownKey, Scope::Key),
        (DenialReason::KeyRevoked, Scope::Key),
        (DenialReason::KeyExpired, Scope::Key),
        (
            DenialReason::WorkspaceNotActive(WorkspaceStatus::Review),
            Scope::Workspace,
        ),
        (
            DenialReason::WorkspaceNotActive(WorkspaceStatus::Suspended),
            Scope::Workspace,
        ),
        (DenialReason::UnknownModel, Scope::WorkspaceModel),
        (DenialReason::ModelNotGranted, Scope::WorkspaceModel),
        (DenialReason::RequestsPerMinute, Scope::Key),
        (DenialReason::RequestsPerMinute, Scope::Workspace),
        (DenialReason::RequestsPerMinute, Scope::WorkspaceModel),
        (DenialReason::RequestsPerDay, Scope::Key),
        (DenialReason::RequestsPerDay, Scope::Workspace),
        (DenialReason::TokensPerMinute, Scope::Key),
        (DenialReason::TokensPerMinute, Scope::Workspace),
        (DenialReason::TokensPerMinute, Scope::WorkspaceModel),
        (DenialReason::Concurrency, Scope::Key),
        (DenialReason::Concurrency, Scope::Workspace),
        (DenialReason::Budget, Scope::Key),
        (DenialReason::Budget, Scope::Workspace),
        (DenialReason::Budget, Scope::Org),
        (DenialReason::Wallet, Scope::Org),
    ];
    let rare: Vec<_> = expected
        .iter()
        .map(|e| format!("{e:?}"))
        .filter(|e| all.denials.get(e).copied().unwrap_or(0) < 10)
        .collect();
    assert!(
        rare.is_empty(),
        "rarely or never denied: {rare:?} (seen: {:#?})",
        all.denials
    );
    assert!(all.admitted >= 500, "admitted {}", all.admitted);
    assert!(all.overages >= 100, "overages {}", all.overages);
    assert!(all.refunds >= 100, "refunds {}", all.refunds);
    assert!(all.rollovers >= 100, "rollovers {}", all.rollovers);
    assert!(
        all.settled_across_a_boundary >= 100,
        "settled across a boundary {}",
        all.settled_across_a_boundary
    );
}
