//! The in-memory counter store: per-scope atomics, and taking, settling and giving
//! back one level's share of a request.
//!
//! This is the only module that knows where counters live. The engine decides which
//! levels apply and in what order and turns a [`Refusal`] into a `Denial`; a
//! distributed store runs the same per-level steps (in a script) against its own
//! counters.

use std::time::Duration;

use crate::alerts::Alerts;
use crate::bucket::{Gcra, Hold, RateRule, Slots};
use crate::budget::{PeriodCell, Settlement};
use crate::clock::Timestamp;
use crate::policy::rules::{BudgetRule, LevelRules, TokenRule};
use crate::sync::{Arc, AtomicU32, Ordering};

/// All counters of one scope (a key, workspace, workspace × model, the org or its
/// wallet). Shared by `Arc` between snapshots, so a policy swap keeps them for ids
/// that persist; a reservation keeps its snapshot, so it settles against them even
/// after the scope is gone from the policy.
#[derive(Debug)]
pub(crate) struct ScopeState {
    pub(crate) rpm: Gcra,
    pub(crate) rpd: Gcra,
    pub(crate) tpm: Gcra,
    pub(crate) slots: Slots,
    pub(crate) periods: PeriodCell,
    /// Budget alerts already reported this period (only used with an event sink).
    pub(crate) alerts: Alerts,
    /// Key scopes only: `KEY_REVOKED` and `KEY_EXPIRY_REPORTED`.
    pub(crate) flags: AtomicU32,
}

/// Set on a key's counters when it is revoked or deleted, before the new policy is
/// published: a request that looked the key up in the old policy checks it after
/// reserving, so a revocation refuses requests already past lookup too.
pub(crate) const KEY_REVOKED: u32 = 1;
/// Set once a `KeyExpired` event has been sent for the key.
pub(crate) const KEY_EXPIRY_REPORTED: u32 = 2;

impl ScopeState {
    /// Carry these counters over to `rules` (a policy change): rate limits keep the
    /// amount already used (a limit added starts full), and a budget whose period
    /// kind changed starts its new period now. Each counter knows the rule it counts
    /// in, so holds in flight settle in the rules in force when they settle.
    pub(crate) fn adapt(&self, rules: &LevelRules, now: Timestamp) {
        let at = now.as_unix_nanos();
        self.rpm.change_rule(rules.rpm.as_ref(), at);
        self.rpd.change_rule(rules.rpd.as_ref(), at);
        self.tpm
            .change_rule(rules.tpm.as_ref().map(|t| &t.rate), at);
        self.periods.follow(rules.span, now);
    }

    /// Whether the key these counters belong to has been revoked or deleted.
    #[inline]
    pub(crate) fn revoked(&self) -> bool {
        self.flags.load(Ordering::SeqCst) & KEY_REVOKED != 0
    }

    /// Mark the key revoked (or active again).
    pub(crate) fn set_revoked(&self, revoked: bool) {
        if revoked {
            self.flags.fetch_or(KEY_REVOKED, Ordering::SeqCst);
        } else {
            self.flags.fetch_and(!KEY_REVOKED, Ordering::SeqCst);
        }
    }

    /// Fresh counters; `shared` for a scope every request writes (see `PeriodCell`).
    pub(crate) fn new(rules: &LevelRules, now: Timestamp, shared: bool) -> Self {
        ScopeState {
            rpm: Gcra::new(rules.rpm.as_ref()),
            rpd: Gcra::new(rules.rpd.as_ref()),
            tpm: Gcra::new(rules.tpm.as_ref().map(|t| &t.rate)),
            slots: Slots::default(),
            periods: PeriodCell::new(rules.span, now, shared),
            alerts: Alerts::default(),
            flags: AtomicU32::new(0),
        }
    }
}

/// What one level holds for a request. Plain data: the counters it refers to are
/// found again through the reservation's snapshot, and the rules it was taken under
/// are that snapshot's, so nothing here is reference-counted.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LevelHold {
    rpm: Hold,
    rpd: Hold,
    tokens: Hold,
    slot: bool,
    // No held cost: every level of a reservation holds the request's worst-case cost
    // (`Ask::cost`), passed in when the hold is given back or settled. A reservation
    // holds seven of these and is moved on every call, so its size is time.
}

/// The tokens and worst-case cost a request asks each level for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ask {
    pub(crate) input_tokens: u64,
    pub(crate) output_tokens: u64,
    pub(crate) cost: i64,
}

/// Which limit of a level refused, with its numbers.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Refusal {
    Requests {
        per_day: bool,
        rule: RateRule,
        remaining: u64,
        retry_after: Option<Duration>,
        reset: Duration,
    },
    Tokens {
        rule: RateRule,
        requested: u64,
        remaining: u64,
        retry_after: Option<Duration>,
        reset: Duration,
    },
    Concurrency {
        limit: u32,
        in_flight: u32,
    },
    Budget {
        limit: i64,
        remaining: i64,
        period_end: Timestamp,
    },
}

/// The tightest request and token windows seen while reserving, for headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tightest {
    pub(crate) requests: Option<Window>,
    pub(crate) tokens: Option<Window>,
}

/// Where one rate limit stands after an admitted take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
    pub(crate) window: Duration,
}

pub(crate) fn keep_tightest(slot: &mut Option<Window>, candidate: Window) {
    let tighter = match slot {
        None => true,
        Some(current) => {
            (candidate.remaining, candidate.limit) < (current.remaining, current.limit)
        }
    };
    if tighter {
        *slot = Some(candidate);
    }
}

/// Take everything `rules` asks of `state` (and of `extras`, the counters of its
/// budgets beyond the first) for one request, all or nothing.
pub(crate) fn reserve_level(
    state: &ScopeState,
    rules: &LevelRules,
    extras: &[Arc<ScopeState>],
    ask: Ask,
    now: Timestamp,
    tightest: &mut Tightest,
) -> Result<LevelHold, Refusal> {
    let at = now.as_unix_nanos();
    state.periods.roll(now);
    let mut hold = LevelHold::default();
    // On refusal the half-built hold gives back what it has taken so far.
    let refuse = |hold: LevelHold, held: i64, refusal: Refusal| {
        hold.release(state, &[], held, at, now);
        Err(refusal)
    };

    for (per_day, rule, bucket) in [
        (false, &rules.rpm, &state.rpm),
        (true, &rules.rpd, &state.rpd),
    ] {
        let Some(rule) = rule else { continue };
        match bucket.try_take(rule, 1, at) {
            Ok(taken) => {
                if per_day {
                    hold.rpd = taken.hold;
                } else {
                    hold.rpm = taken.hold;
                }
                keep_tightest(
                    &mut tightest.requests,
                    Window {
                        limit: rule.limit,
                        remaining: taken.remaining,
                        reset: taken.reset,
                        window: rule.window,
                    },
                );
            }
            Err(refused) => {
                return refuse(
                    hold,
                    0,
                    Refusal::Requests {
                        per_day,
                        rule: *rule,
                        remaining: refused.remaining,
                        retry_after: refused.retry_after,
                        reset: refused.reset,
                    },
                )
            }
        }
    }

    if let Some(TokenRule { rate, counts }) = &rules.tpm {
        let units = counts.pick(ask.input_tokens, ask.output_tokens);
        match state.tpm.try_take(rate, units, at) {
            Ok(taken) => {
                hold.tokens = taken.hold;
                keep_tightest(
                    &mut tightest.tokens,
                    Window {
                        limit: rate.limit,
                        remaining: taken.remaining,
                        reset: taken.reset,
                        window: rate.window,
                    },
                );
            }
            Err(refused) => {
                return refuse(
                    hold,
                    0,
                    Refusal::Tokens {
                        rule: *rate,
                        requested: units,
                        remaining: refused.remaining,
                        retry_after: refused.retry_after,
                        reset: refused.reset,
                    },
                )
            }
        }
    }

    if let Some(max) = rules.max_concurrent {
        match state.slots.try_acquire(max) {
            Ok(_) => hold.slot = true,
            Err(in_flight) => {
                return refuse(
                    hold,
                    0,
                    Refusal::Concurrency {
                        limit: max,
                        in_flight,
                    },
                )
            }
        }
    }

    // Hold the cost on every level, budget or not, so usage shows what is in flight
    // and a budget applied later counts holds already taken.
    let budget = rules.budget.as_ref();
    let limit = budget.map_or(i64::MAX, BudgetRule::enforced_limit);
    if let Err(remaining) = state.periods.try_hold(ask.cost, limit) {
        let period_end = state.periods.end();
        return refuse(
            hold,
            0,
            Refusal::Budget {
                limit,
                remaining,
                period_end,
            },
        );
    }
    for (taken, (budget, cell)) in rules.more_budgets.iter().zip(extras).enumerate() {
        cell.periods.roll(now);
        if let Err(remaining) = cell.periods.try_hold(ask.cost, budget.enforced_limit()) {
            for cell in &extras[..taken] {
                cell.periods.release(ask.cost);
            }
            return refuse(
                hold,
                ask.cost,
                Refusal::Budget {
                    limit: budget.limit,
                    remaining,
                    period_end: cell.periods.end(),
                },
            );
        }
    }
    Ok(hold)
}

impl LevelHold {
    /// Give back everything (taken at `taken_at`), on `state` and its extra budgets'
    /// `extras`: the request did not happen.
    pub(crate) fn release(
        self,
        state: &ScopeState,
        extras: &[Arc<ScopeState>],
        held: i64,
        taken_at: u64,
        now: Timestamp,
    ) {
        let now_nanos = now.as_unix_nanos();
        for (hold, bucket) in [
            (&self.rpm, &state.rpm),
            (&self.rpd, &state.rpd),
            (&self.tokens, &state.tpm),
        ] {
            bucket.give_back(hold, hold.units, taken_at, now_nanos);
        }
        if self.slot {
            state.slots.release();
        }
        state.periods.release(held);
        for cell in extras {
            cell.periods.release(held);
        }
    }

    /// Replace the hold by real usage: refund unused tokens and money, charge any
    /// overage as debt, count the request in the period containing `now` (its
    /// requests and tokens only if `tally`). `rules` are the ones the hold was taken
    /// under: they say which tokens it counted; the counters convert them with the
    /// rules in force now, and roll periods of the kind in force now. `counters` are
    /// the level's own and those of its budgets beyond the first.
    #[allow(clippy::too_many_arguments)] // `held` is here rather than in every hold
    pub(crate) fn settle(
        self,
        (state, extras): (&ScopeState, &[Arc<ScopeState>]),
        rules: &LevelRules,
        held: i64,
        used: Settlement,
        taken_at: u64,
        now: Timestamp,
        tally: bool,
    ) {
        let at = now.as_unix_nanos();
        if let Some(TokenRule { counts, .. }) = &rules.tpm {
            let reserved = self.tokens.units;
            let spent = counts.pick(used.input_tokens, used.output_tokens);
            if spent < reserved {
                state
                    .tpm
                    .give_back(&self.tokens, reserved - spent, taken_at, at);
            } else {
                state.tpm.charge(spent - reserved, at);
            }
        }
        if self.slot {
            state.slots.release();
        }
        state.periods.roll(now);
        state.periods.settle(held, used, tally);
        for cell in extras {
            cell.periods.roll(now);
            cell.periods.settle(held, used, tally);
        }
    }
}
