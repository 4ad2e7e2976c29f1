//! Spend and usage counters of one scope, with a period rollover that loses nothing
//! in flight.
//!
//! The counters of the current period live inline (no `Arc` to clone or swap per
//! request: on the hot path a period costs one plain load of its end). When a period
//! ends, the first access after the boundary moves what the old period counted out
//! of the live counters into the `previous` totals, under a lock only rollover takes.
//! Money still held by reservations in flight stays in the live admission word: it is
//! carried into the new period, and such a reservation's commit is counted in the
//! period it is committed in. Every counter is only ever added to or swapped out, so
//! a commit racing the rollover lands whole in one period or the other, never in
//! neither and never in both.

use crate::clock::Timestamp;
use crate::period::{bounds, Span};
use crate::sync::{saturating_add_i64, saturating_add_u64, AtomicI64, AtomicU64, Mutex, Ordering};

/// What a commit adds to a period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Settlement {
    pub(crate) cost: i64,
    pub(crate) input_tokens: u64,
    pub(crate) output_tokens: u64,
}

/// A plain copy of one period's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PeriodTotals {
    pub(crate) start: Timestamp,
    pub(crate) end: Timestamp,
    pub(crate) spent: i64,
    pub(crate) held: i64,
    pub(crate) requests: u64,
    pub(crate) input_tokens: u64,
    pub(crate) output_tokens: u64,
}

/// The counters of one scope: the live period inline, the one before it as totals.
#[derive(Debug)]
pub(crate) struct PeriodCell {
    start: AtomicU64,
    /// Read on every access to spot the boundary; written last by a rollover.
    end: AtomicU64,
    /// Committed spend plus outstanding holds, in pico-dollars: the admission word.
    committed_and_held: AtomicI64,
    /// Committed spend only.
    spent: AtomicI64,
    requests: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    /// The period before the current one; its lock also serialises rollovers.
    previous: Mutex<PeriodTotals>,
}

impl PeriodCell {
    pub(crate) fn new(span: Span, now: Timestamp) -> Self {
        let (start, end) = bounds(span, now);
        PeriodCell {
            start: AtomicU64::new(start.as_unix_nanos()),
            end: AtomicU64::new(end.as_unix_nanos()),
            committed_and_held: AtomicI64::new(0),
            spent: AtomicI64::new(0),
            requests: AtomicU64::new(0),
            input_tokens: AtomicU64::new(0),
            output_tokens: AtomicU64::new(0),
            previous: Mutex::new(empty_period_before(span, start)),
        }
    }

    /// Make the period containing `now` the current one. A load and a compare unless
    /// a boundary has passed.
    #[inline]
    pub(crate) fn roll(&self, span: Span, now: Timestamp) {
        if now.as_unix_nanos() >= self.end.load(Ordering::Acquire) {
            self.roll_over(span, now);
        }
    }

    #[cold]
    fn roll_over(&self, span: Span, now: Timestamp) {
        let mut previous = self.previous.lock();
        let end = self.end.load(Ordering::Acquire);
        if now.as_unix_nanos() < end {
            return; // another thread rolled over while this one waited
        }
        let start = self.start.load(Ordering::Acquire);
        // Swap the ended period's counts out before lowering the admission word:
        // in between, a concurrent hold sees too much spend (a spurious refusal at
        // the boundary instant), never too little.
        let spent = self.spent.swap(0, Ordering::AcqRel);
        let requests = self.requests.swap(0, Ordering::AcqRel);
        let input_tokens = self.input_tokens.swap(0, Ordering::AcqRel);
        let output_tokens = self.output_tokens.swap(0, Ordering::AcqRel);
        saturating_add_i64(&self.committed_and_held, spent.saturating_neg());

        let (next_start, next_end) = bounds(span, now);
        *previous = if next_start.as_unix_nanos() == end {
            PeriodTotals {
                start: Timestamp::from_unix_nanos(start),
                end: Timestamp::from_unix_nanos(end),
                spent,
                held: 0,
                requests,
                input_tokens,
                output_tokens,
            }
        } else {
            // Whole periods passed with no access: the one just before `now` was empty.
            empty_period_before(span, next_start)
        };
        self.start
            .store(next_start.as_unix_nanos(), Ordering::Release);
        self.end.store(next_end.as_unix_nanos(), Ordering::Release);
    }

    /// Hold `amount` if spend plus holds stays within `limit`: one CAS, so concurrent
    /// holds can never jointly pass the limit. `Ok(left after)`, `Err(left before)`.
    pub(crate) fn try_hold(&self, amount: i64, limit: i64) -> Result<i64, i64> {
        let mut used = self.committed_and_held.load(Ordering::Acquire);
        loop {
            let next = used.saturating_add(amount);
            if next > limit {
                return Err(limit.saturating_sub(used).max(0));
            }
            match self.committed_and_held.compare_exchange_weak(
                used,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(limit - next),
                Err(actual) => used = actual,
            }
        }
    }

    /// Give back a hold that will not be committed.
    pub(crate) fn release(&self, held: i64) {
        if held != 0 {
            saturating_add_i64(&self.committed_and_held, held.saturating_neg());
        }
    }

    /// Replace a hold by real usage in the current period; overage beyond the hold
    /// stays as debt. `tally` also counts the request and its tokens, which a scope
    /// that only reports money (the wallet) skips: fewer writes to a line every
    /// request shares.
    pub(crate) fn settle(&self, held: i64, usage: Settlement, tally: bool) {
        let change = usage.cost.saturating_sub(held);
        if change != 0 {
            saturating_add_i64(&self.committed_and_held, change);
        }
        saturating_add_i64(&self.spent, usage.cost);
        if tally {
            saturating_add_u64(&self.requests, 1);
            saturating_add_u64(&self.input_tokens, usage.input_tokens);
            saturating_add_u64(&self.output_tokens, usage.output_tokens);
        }
    }

    /// The end of the current period.
    pub(crate) fn end(&self) -> Timestamp {
        Timestamp::from_unix_nanos(self.end.load(Ordering::Acquire))
    }

    /// Totals of the current and the previous period as of `now`.
    pub(crate) fn totals(&self, span: Span, now: Timestamp) -> (PeriodTotals, PeriodTotals) {
        self.roll(span, now);
        // Under the rollover lock, so the pair is never torn by a rollover.
        let previous = self.previous.lock();
        let spent = self.spent.load(Ordering::Acquire);
        let current = PeriodTotals {
            start: Timestamp::from_unix_nanos(self.start.load(Ordering::Acquire)),
            end: self.end(),
            spent,
            held: self
                .committed_and_held
                .load(Ordering::Acquire)
                .saturating_sub(spent),
            requests: self.requests.load(Ordering::Acquire),
            input_tokens: self.input_tokens.load(Ordering::Acquire),
            output_tokens: self.output_tokens.load(Ordering::Acquire),
        };
        (current, *previous)
    }
}

/// The period that ends where `start` begins, with nothing counted in it.
fn empty_period_before(span: Span, start: Timestamp) -> PeriodTotals {
    let just_before = Timestamp::from_unix_nanos(start.as_unix_nanos().saturating_sub(1));
    PeriodTotals {
        start: bounds(span, just_before).0,
        end: start,
        ..PeriodTotals::default()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::period::BudgetPeriod;
    use std::time::Duration;

    const DAY: Span = Span::Period(BudgetPeriod::Day);
    const SECOND: u64 = 1_000_000_000;

    fn day(n: u64) -> Timestamp {
        Timestamp::from_unix_nanos(86_400 * SECOND * (20_000 + n))
    }

    fn cost(cost: i64) -> Settlement {
        Settlement {
            cost,
            input_tokens: 1,
            output_tokens: 2,
        }
    }

    #[test]
    fn holds_never_pass_the_limit_and_debt_blocks() {
        let cell = PeriodCell::new(Span::Forever, day(0));
        assert_eq!(cell.try_hold(60, 100), Ok(40));
        assert_eq!(cell.try_hold(50, 100), Err(40));
        cell.settle(60, cost(130), true);
        // 130 spent of 100: in debt, even a zero-cost hold is refused.
        assert_eq!(cell.try_hold(0, 100), Err(0));
        let (totals, _) = cell.totals(Span::Forever, day(0));
        assert_eq!((totals.spent, totals.held, totals.requests), (130, 0, 1));
    }

    #[test]
    fn a_hold_spanning_the_boundary_is_carried_over_and_charged_when_committed() {
        let cell = PeriodCell::new(DAY, day(0));
        cell.settle(0, cost(100), true);
        assert_eq!(cell.try_hold(500, 1_000), Ok(400));

        let next = day(1).saturating_add(Duration::from_secs(5));
        cell.roll(DAY, next);
        // The ended day's spend left; the hold in flight did not.
        assert_eq!(cell.try_hold(600, 1_000), Err(500));
        cell.settle(500, cost(300), true);

        let (current, previous) = cell.totals(DAY, next);
        assert_eq!((current.start, current.end), (day(1), day(2)));
        assert_eq!((current.spent, current.held, current.requests), (300, 0, 1));
        assert_eq!((previous.start, previous.end), (day(0), day(1)));
        assert_eq!(
            (previous.spent, previous.held, previous.requests),
            (100, 0, 1)
        );
    }

    #[test]
    fn periods_with_no_access_show_as_an_empty_previous_period() {
        let cell = PeriodCell::new(DAY, day(0));
        cell.settle(0, cost(100), true);
        let (current, previous) = cell.totals(DAY, day(3));
        assert_eq!((current.start, current.spent), (day(3), 0));
        assert_eq!(
            (previous.start, previous.end, previous.spent),
            (day(2), day(3), 0)
        );
    }
}
