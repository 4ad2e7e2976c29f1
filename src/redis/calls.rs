//! The arguments each script takes and what its replies mean.
//!
//! Numbers cross as decimal strings: money is int64 pico-dollars that Lua must not
//! round through a double, so the functions add it exactly on decimal strings.

use std::ops::Range;
use std::time::Duration;

use redis::Value;

use crate::alerts::Crossed;
use crate::bucket::RateRule;
use crate::clock::Timestamp;
use crate::denial::DenialReason;
use crate::denial::{StoreError, StoreErrorKind};
use crate::end_users::END_USER_LEVEL;
use crate::period::{BudgetPeriod, Span};
use crate::policy::rules::{BudgetRule, EndUserRules, LevelRules, TokenRule};
use crate::redis::error::corrupt_reply;
use crate::redis::keys::{Group, Member};
use crate::snapshot::{Route, Snapshot, WALLET_LEVEL};
use crate::store::{keep_tightest, Ask, Refusal, Tightest, Window};

/// One script invocation's keys and arguments.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    pub(crate) keys: Vec<String>,
    pub(crate) args: Vec<String>,
}

/// One function call of a request and the groups it covers (indices into the
/// request's groups, in order): a standalone server takes every group in one call
/// (one round trip, one `TIME`, all or nothing across tags); a cluster needs one call
/// per group, as each group's keys hash to its own slot.
#[derive(Clone, Debug)]
pub(crate) struct GroupCall {
    pub(crate) groups: Range<usize>,
    pub(crate) call: Call,
}

/// The calls of one request: all of `groups` in one call when `together`, else one
/// call each; `call` builds a call for the groups it covers.
pub(crate) fn group_calls(
    groups: &[Group],
    together: bool,
    mut call: impl FnMut(&[Group]) -> Call,
) -> Vec<GroupCall> {
    if together {
        return vec![GroupCall {
            groups: 0..groups.len(),
            call: call(groups),
        }];
    }
    (0..groups.len())
        .map(|i| GroupCall {
            groups: i..i + 1,
            call: call(&groups[i..=i]),
        })
        .collect()
}

/// The replies of a batch call (see [`crate::redis::scripts::call_batch`]): one per
/// request, in order; a request that failed alone (`{-1, message}`: a corrupt record
/// or counter, a duplicate id) is its error.
pub(crate) fn unbatch(
    op: &str,
    reply: Value,
    count: usize,
) -> Result<Vec<Result<Value, StoreError>>, StoreError> {
    let Value::Array(replies) = reply else {
        return Err(corrupt_reply(op, format!("{reply:?}")));
    };
    if replies.len() != count {
        return Err(corrupt_reply(op, format!("{count} requests, {replies:?}")));
    }
    Ok(replies
        .into_iter()
        .map(|reply| match &reply {
            Value::Array(items) if matches!(items.first(), Some(Value::Int(-1))) => {
                let message = match items.get(1) {
                    Some(Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
                    Some(Value::SimpleString(text)) => text.clone(),
                    other => format!("{other:?}"),
                };
                Err(request_error(op, &message))
            }
            _ => Ok(reply),
        })
        .collect())
}

/// A request's own failure inside a batch, classified as a Redis error reply would be.
fn request_error(op: &str, message: &str) -> StoreError {
    StoreError {
        kind: if message.starts_with("CORRUPT") {
            StoreErrorKind::Corrupt
        } else {
            StoreErrorKind::Permanent
        },
        message: format!("{op}: {message}"),
    }
}

/// Every group's keys, in order: what the `reserve` and `commit` functions take.
fn keys_of(groups: &[Group], id: &str) -> Vec<String> {
    groups.iter().flat_map(|group| group.keys(id)).collect()
}

/// Lifetimes the scripts set, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ttls {
    pub(crate) reservation: u64,
    pub(crate) idle: u64,
    pub(crate) commit_marker: u64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Ttls {
    pub(crate) fn new(reservation: Duration, idle: Duration, commit_marker: Duration) -> Self {
        Ttls {
            reservation: millis(reservation),
            idle: millis(idle),
            commit_marker: millis(commit_marker),
        }
    }

    /// A record outlives its hold, so a late sweep can still read what to give back.
    pub(crate) fn record(self) -> u64 {
        self.idle.max(self.reservation.saturating_mul(2))
    }

    /// Idle counters expire, but never within two of their periods (a month's spend
    /// must survive a quiet week); all-time counters (the wallet) never expire.
    fn idle_for(self, span: Span) -> u64 {
        let period_ms = match span {
            Span::Forever => return 0,
            Span::Period(BudgetPeriod::Day) => 86_400_000,
            Span::Period(BudgetPeriod::Month) => 31 * 86_400_000,
            Span::Period(BudgetPeriod::Custom { seconds }) => seconds.saturating_mul(1000),
        };
        self.idle.max(period_ms.saturating_mul(2))
    }
}

pub(crate) fn period_args(span: Span) -> (u8, u64) {
    match span {
        Span::Forever => (0, 0),
        Span::Period(BudgetPeriod::Day) => (1, 0),
        Span::Period(BudgetPeriod::Month) => (2, 0),
        Span::Period(BudgetPeriod::Custom { seconds }) => (3, seconds.max(1)),
    }
}

fn push_rate(args: &mut Vec<String>, rule: Option<&RateRule>) {
    match rule {
        Some(rule) => {
            args.push(rule.interval.to_string());
            args.push(rule.limit.to_string());
        }
        None => {
            args.push("0".into());
            args.push("0".into());
        }
    }
}

/// What one scope hash of a group enforces: a level's limits and first budget, one
/// of its further budgets alone, or the request's end user's limits.
struct Part<'a> {
    rpm: Option<&'a RateRule>,
    rpd: Option<&'a RateRule>,
    tpm: Option<&'a TokenRule>,
    max_concurrent: Option<u32>,
    budget: Option<&'a BudgetRule>,
    span: Span,
    /// The hash's idle TTL when it is not the usual (see [`Part::idle_ms`]).
    idle_ms: Option<u64>,
}

impl Part<'_> {
    fn of(rules: &LevelRules) -> Part<'_> {
        Part {
            rpm: rules.rpm.as_ref(),
            rpd: rules.rpd.as_ref(),
            tpm: rules.tpm.as_ref(),
            max_concurrent: rules.max_concurrent,
            budget: rules.budget.as_ref(),
            span: rules.span,
            idle_ms: None,
        }
    }

    /// The idle TTL of the hash: an end user's is exactly its `idle_secs` (end users
    /// are many and come and go: their counters are not kept for two budget periods
    /// like the policy's scopes, and one that expires starts afresh, as one the
    /// in-memory table forgets does).
    fn idle_ms(&self, ttls: Ttls) -> u64 {
        match self.idle_ms {
            // Never shorter than two reservation TTLs (a hold's own lifetime before it
            // is renewed): one that expired under a request in flight would be
            // re-created by its commit with the hold taken out of nothing (negative
            // in-flight and spend). Scope hashes are not renewed with a long stream's
            // hold: hence the README's advice on `idle_secs`.
            Some(idle) => idle.max(ttls.reservation.saturating_mul(2)),
            None => ttls.idle_for(self.span),
        }
    }
}

fn part<'a>(snap: &'a Snapshot, route: Route, member: &Member) -> Part<'a> {
    if member.level == END_USER_LEVEL {
        let end_user = end_user_rules(snap, route);
        return Part {
            idle_ms: Some((end_user.idle_nanos / 1_000_000).max(1)),
            ..Part::of(&end_user.rules)
        };
    }
    let rules: &LevelRules = snap
        .level(member.level, route)
        .rules
        .expect("a group lists only levels whose rules apply");
    match member.budget {
        0 => Part::of(rules),
        i => {
            let budget = &rules.more_budgets[i - 1];
            Part {
                rpm: None,
                rpd: None,
                tpm: None,
                max_concurrent: None,
                budget: Some(budget),
                span: budget.span,
                idle_ms: None,
            }
        }
    }
}

fn end_user_rules(snap: &Snapshot, route: Route) -> &EndUserRules {
    snap.policy.workspaces[route.workspace as usize]
        .end_users
        .as_deref()
        .expect("a group lists the end user's level only when its rules apply")
}

/// How many requests a reserve takes at once, and what it must leave free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Take {
    /// 1, or a lease's requests (`ask` is then what they hold together).
    pub(crate) requests: u32,
    /// Percent of every limit and budget the take must leave free (0, or a lease's).
    pub(crate) keep: u8,
}

impl Take {
    /// One request, as far as its limits let it.
    pub(crate) const ONE: Take = Take {
        requests: 1,
        keep: 0,
    };
}

/// the `reserve` function for `groups`.
pub(crate) fn reserve(
    snap: &Snapshot,
    route: Route,
    groups: &[Group],
    id: &str,
    ask: Ask,
    take: Take,
    ttls: Ttls,
) -> Call {
    let mut args = vec![
        id.to_owned(),
        ttls.reservation.to_string(),
        ask.cost.to_string(),
        ttls.record().to_string(),
        take.requests.to_string(),
        take.keep.to_string(),
        groups.len().to_string(),
    ];
    for group in groups {
        reserve_group(snap, route, group, ask, take, ttls, &mut args);
    }
    Call {
        keys: keys_of(groups, id),
        args,
    }
}

fn reserve_group(
    snap: &Snapshot,
    route: Route,
    group: &Group,
    ask: Ask,
    take: Take,
    ttls: Ttls,
    args: &mut Vec<String>,
) {
    args.push(group.record_base());
    args.push(group.key_id.clone().unwrap_or_default());
    args.push(group.levels.len().to_string());
    for member in &group.levels {
        let rules = part(snap, route, member);
        push_rate(args, rules.rpm);
        push_rate(args, rules.rpd);
        push_rate(args, rules.tpm.map(|t| &t.rate));
        let units = rules
            .tpm
            .map_or(0, |t| t.counts.pick(ask.input_tokens, ask.output_tokens));
        args.push(units.to_string());
        args.push(rules.max_concurrent.unwrap_or(0).to_string());
        // Admitted while used ≤ limit − kept − cost: computed here, exactly, so the
        // script only compares. A soft budget never refuses: no headroom to check.
        args.push(
            rules
                .budget
                .filter(|b| !b.soft)
                .map_or_else(String::new, |b| {
                    let limit = i128::from(b.limit);
                    let kept = limit.max(0) * i128::from(take.keep) / 100;
                    (limit - kept - i128::from(ask.cost)).to_string()
                }),
        );
        let (kind, seconds) = period_args(rules.span);
        args.push(kind.to_string());
        args.push(seconds.to_string());
        args.push(rules.idle_ms(ttls).to_string());
    }
}

/// What a request really used, for the `commit` function.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Used {
    pub(crate) cost: i64,
    pub(crate) input_tokens: u64,
    pub(crate) output_tokens: u64,
    /// 1, or how many of a lease's requests were served (the rest are given back).
    pub(crate) requests: u32,
}

/// the `commit` function for `groups`.
pub(crate) fn commit(
    snap: &Snapshot,
    route: Route,
    groups: &[Group],
    id: &str,
    ask: Ask,
    used: Used,
    ttls: Ttls,
) -> Call {
    let mut args = vec![
        id.to_owned(),
        ttls.commit_marker.to_string(),
        ask.cost.to_string(),
        used.cost.to_string(),
        used.input_tokens.to_string(),
        used.output_tokens.to_string(),
        used.requests.to_string(),
        groups.len().to_string(),
    ];
    for group in groups {
        commit_group(snap, route, group, used, ttls, &mut args);
    }
    Call {
        keys: keys_of(groups, id),
        args,
    }
}

fn commit_group(
    snap: &Snapshot,
    route: Route,
    group: &Group,
    used: Used,
    ttls: Ttls,
    args: &mut Vec<String>,
) {
    args.push(group.record_base());
    args.push(group.generation.clone());
    args.push(group.levels.len().to_string());
    for member in &group.levels {
        let rules = part(snap, route, member);
        // The tokens the request used as the reservation's rule counts them; what
        // they cost in the bucket is the bucket's own (current) interval.
        args.push(
            rules
                .tpm
                .map_or(0, |tpm| {
                    tpm.counts.pick(used.input_tokens, used.output_tokens)
                })
                .to_string(),
        );
        let (kind, seconds) = period_args(rules.span);
        args.push(kind.to_string());
        args.push(seconds.to_string());
        // The wallet counts money only; requests and tokens are the org's.
        args.push(
            if member.level == WALLET_LEVEL {
                "0"
            } else {
                "1"
            }
            .into(),
        );
        args.push(rules.idle_ms(ttls).to_string());
        match rules.budget {
            Some(budget) => {
                args.push(budget.limit.to_string());
                args.push(
                    budget
                        .thresholds
                        .first()
                        .copied()
                        .unwrap_or(100)
                        .to_string(),
                );
            }
            None => args.extend([String::new(), "100".into()]),
        }
    }
}

/// the `release` function for one group.
pub(crate) fn release(group: &Group, id: &str) -> Call {
    Call {
        keys: vec![
            group.holds(),
            group.record(id),
            group.done(id),
            group.flags(),
        ],
        args: vec![id.to_owned(), group.record_base()],
    }
}

/// Element `i` of a reply's `items` as an integer; a reply cut short is corrupt.
fn item(op: &str, items: &[Value], i: usize) -> Result<i64, StoreError> {
    items
        .get(i)
        .ok_or_else(|| corrupt_reply(op, format!("short reply {items:?}")))
        .and_then(|v| integer(op, v))
}

/// A reply's duration in nanoseconds (negative: none left).
fn nanos(n: i64) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(0))
}

/// A reply's count (negative: none).
fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A reply element as an integer (the scripts send numbers as integers or strings).
fn integer(op: &str, value: &Value) -> Result<i64, StoreError> {
    match value {
        Value::Int(n) => Ok(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt_reply(op, format!("{value:?}"))),
        Value::SimpleString(s) => s.parse().map_err(|_| corrupt_reply(op, s)),
        other => Err(corrupt_reply(op, format!("{other:?}"))),
    }
}

fn items<'v>(op: &str, value: &'v Value) -> Result<&'v [Value], StoreError> {
    match value {
        Value::Array(items) if !items.is_empty() => Ok(items),
        other => Err(corrupt_reply(op, format!("{other:?}"))),
    }
}

/// What one call's reserve said for the groups it covers.
pub(crate) enum Reserved {
    /// Admitted, with each group's tag generation (see [`Group::generation`]), in order.
    Admitted(Vec<String>),
    /// Level `level` refused (nothing was taken on any group of the call).
    Refused { level: usize, refusal: Refusal },
    /// Another instance revoked the key or deleted its workspace.
    Gone(DenialReason),
}

const OP_RESERVE: &str = "reserve";

/// Read the `reserve` function's reply for `groups` (the groups its call covered); on
/// admission fold their windows into `tightest`.
pub(crate) fn read_reserve(
    snap: &Snapshot,
    route: Route,
    groups: &[Group],
    ask: Ask,
    reply: &Value,
    tightest: &mut Tightest,
) -> Result<Reserved, StoreError> {
    let top = items(OP_RESERVE, reply)?;
    let short = || corrupt_reply(OP_RESERVE, format!("short reply {top:?}"));
    let admitted = integer(OP_RESERVE, &top[0])? == 1;
    if admitted {
        let mut generations = Vec::with_capacity(groups.len());
        for (g, group) in groups.iter().enumerate() {
            let group_items = items(OP_RESERVE, top.get(1 + g).ok_or_else(short)?)?;
            generations.push(read_admitted(snap, route, group, group_items, tightest)?);
        }
        return Ok(Reserved::Admitted(generations));
    }
    let group = top
        .get(1)
        .map(|v| integer(OP_RESERVE, v))
        .transpose()?
        .and_then(|g| usize::try_from(g - 1).ok())
        .and_then(|g| groups.get(g))
        .ok_or_else(|| corrupt_reply(OP_RESERVE, format!("{top:?}")))?;
    let refusal = items(OP_RESERVE, top.get(2).ok_or_else(short)?)?;
    read_refusal(snap, route, group, ask, refusal)
}

/// One group's admission: its windows, then the tag's generation.
fn read_admitted(
    snap: &Snapshot,
    route: Route,
    group: &Group,
    items: &[Value],
    tightest: &mut Tightest,
) -> Result<String, StoreError> {
    let int = |i: usize| item(OP_RESERVE, items, i);
    for (position, member) in group.levels.iter().enumerate() {
        let rules = part(snap, route, member);
        let base = position * 6;
        let buckets = [
            (rules.rpm, true),
            (rules.rpd, true),
            (rules.tpm.map(|t| &t.rate), false),
        ];
        for (i, (rule, requests)) in buckets.into_iter().enumerate() {
            let Some(rule) = rule else { continue };
            let window = Window {
                limit: rule.limit,
                remaining: count(int(base + 2 * i)?),
                reset: nanos(int(base + 2 * i + 1)?),
                window: rule.window,
            };
            let slot = if requests {
                &mut tightest.requests
            } else {
                &mut tightest.tokens
            };
            keep_tightest(slot, window);
        }
    }
    Ok(int(group.levels.len() * 6)?.to_string())
}

/// One group's refusal: `{level, kind, ...}`.
fn read_refusal(
    snap: &Snapshot,
    route: Route,
    group: &Group,
    ask: Ask,
    items: &[Value],
) -> Result<Reserved, StoreError> {
    let int = |i: usize| item(OP_RESERVE, items, i);
    let position = usize::try_from(int(0)? - 1)
        .ok()
        .filter(|&p| p < group.levels.len())
        .ok_or_else(|| corrupt_reply(OP_RESERVE, format!("{items:?}")))?;
    let member = &group.levels[position];
    let level = member.level;
    let rules = part(snap, route, member);
    let missing = || corrupt_reply(OP_RESERVE, format!("refusal of a rule not set {items:?}"));
    let retry = |n: i64| (n >= 0).then(|| nanos(n));
    let refusal = match int(1)? {
        6 => return Ok(Reserved::Gone(DenialReason::KeyRevoked)),
        7 => return Ok(Reserved::Gone(DenialReason::UnknownKey)),
        kind @ (1 | 2) => Refusal::Requests {
            per_day: kind == 2,
            rule: *if kind == 2 { rules.rpd } else { rules.rpm }.ok_or_else(missing)?,
            remaining: count(int(2)?),
            reset: nanos(int(3)?),
            retry_after: retry(int(4)?),
        },
        3 => {
            let tpm = rules.tpm.ok_or_else(missing)?;
            Refusal::Tokens {
                rule: tpm.rate,
                requested: tpm.counts.pick(ask.input_tokens, ask.output_tokens),
                remaining: count(int(2)?),
                reset: nanos(int(3)?),
                retry_after: retry(int(4)?),
            }
        }
        4 => Refusal::Concurrency {
            limit: rules.max_concurrent.ok_or_else(missing)?,
            in_flight: u32::try_from(int(2)?).unwrap_or(u32::MAX),
        },
        5 => {
            let limit = rules.budget.ok_or_else(missing)?.limit;
            let used = int(2)?;
            let end_us = int(3)?;
            Refusal::Budget {
                limit,
                remaining: limit.saturating_sub(used).max(0),
                period_end: if end_us < 0 {
                    Timestamp::from_unix_nanos(u64::MAX)
                } else {
                    Timestamp::from_unix_nanos(
                        u64::try_from(end_us).unwrap_or(0).saturating_mul(1000),
                    )
                },
            }
        }
        other => return Err(corrupt_reply(OP_RESERVE, format!("refusal kind {other}"))),
    };
    Ok(Reserved::Refused { level, refusal })
}

/// Budget alert percentages one commit reached on one budget of one level.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reached {
    /// The level, and which of its budgets (0: the first).
    pub(crate) budget: (usize, usize),
    pub(crate) crossed: Crossed,
    /// Committed spend of the level's period after the commit, pico-dollars.
    pub(crate) spent: i64,
}

/// the `commit` function's reply for `groups` (the groups its call covered): one
/// reply per group, and the levels whose budgets reached new alert percentages.
pub(crate) fn read_commit(groups: &[Group], reply: &Value) -> Result<Vec<Reached>, StoreError> {
    let replies = items("commit", reply)?;
    if replies.len() != groups.len() {
        return Err(corrupt_reply("commit", format!("{replies:?}")));
    }
    let mut reached = Vec::new();
    for (group, reply) in groups.iter().zip(replies) {
        read_group_commit(group, reply, &mut reached)?;
    }
    Ok(reached)
}

fn read_group_commit(
    group: &Group,
    reply: &Value,
    reached: &mut Vec<Reached>,
) -> Result<(), StoreError> {
    let items = items("commit", reply)?;
    let code = integer("commit", &items[0])?;
    if !(1..=4).contains(&code) {
        return Err(corrupt_reply("commit", code));
    }
    if code == 2 || code == 4 {
        // Already committed (reported then), or the workspace was deleted since the
        // reserve (nothing settled on its levels).
        return Ok(());
    }
    for (position, member) in group.levels.iter().enumerate() {
        let value = |i: usize| item("commit", items, 1 + 3 * position + i);
        let (before, now) = (value(0)?, value(1)?);
        if now >= 0 {
            reached.push(Reached {
                budget: (member.level, member.budget),
                spent: value(2)?,
                crossed: Crossed {
                    after: u8::try_from(before).ok(),
                    through: u8::try_from(now.min(100)).unwrap_or(100),
                },
            });
        }
    }
    Ok(())
}
