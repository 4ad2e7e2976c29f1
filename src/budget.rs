//! Spend and usage counters per period, with rollover that loses nothing in flight.
//!
//! Each period's counters live in their own `Arc`. A reservation keeps the `Arc` of
//! the period it reserved in and settles or releases against exactly that one, so a
//! hold taken before a boundary can never be released into (and erase spend of) the
//! next period, and its commit is charged to the period it was admitted under.

use crate::clock::Timestamp;
use crate::period::{bounds, Span};
use crate::sync::{
    saturating_add_i64, saturating_add_u64, Arc, AtomicI64, AtomicU64, Ordering, SwapCell,
};

/// Counters for one scope in one period.
#[derive(Debug)]
pub(crate) struct PeriodCounters {
    pub(crate) start: Timestamp,
    pub(crate) end: Timestamp,
    /// Committed spend plus outstanding holds, in pico-dollars: the admission word.
    committed_and_held: AtomicI64,
    /// Committed spend only.
    spent: AtomicI64,
    requests: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
}

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

impl PeriodCounters {
    pub(crate) fn new(start: Timestamp, end: Timestamp) -> Self {
        PeriodCounters {
            start,
            end,
            committed_and_held: AtomicI64::new(0),
            spent: AtomicI64::new(0),
            requests: AtomicU64::new(0),
            input_tokens: AtomicU64::new(0),
            output_tokens: AtomicU64::new(0),
        }
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
            saturating_add_i64(&self.committed_and_held, -held);
        }
    }

    /// Replace a hold by real usage; overage beyond the hold stays as debt.
    pub(crate) fn settle(&self, held: i64, usage: Settlement) {
        saturating_add_i64(&self.committed_and_held, usage.cost.saturating_sub(held));
        saturating_add_i64(&self.spent, usage.cost);
        saturating_add_u64(&self.requests, 1);
        saturating_add_u64(&self.input_tokens, usage.input_tokens);
        saturating_add_u64(&self.output_tokens, usage.output_tokens);
    }

    pub(crate) fn totals(&self) -> PeriodTotals {
        let spent = self.spent.load(Ordering::Acquire);
        PeriodTotals {
            start: self.start,
            end: self.end,
            spent,
            held: self
                .committed_and_held
                .load(Ordering::Acquire)
                .saturating_sub(spent),
            requests: self.requests.load(Ordering::Acquire),
            input_tokens: self.input_tokens.load(Ordering::Acquire),
            output_tokens: self.output_tokens.load(Ordering::Acquire),
        }
    }
}

/// The current and the previous period of one scope.
pub(crate) struct PeriodCell {
    current: SwapCell<PeriodCounters>,
    previous: SwapCell<PeriodCounters>,
}

impl std::fmt::Debug for PeriodCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeriodCell")
            .field("current", &self.current.load_full().totals())
            .finish_non_exhaustive()
    }
}

impl PeriodCell {
    pub(crate) fn new(span: Span, now: Timestamp) -> Self {
        let (start, end) = bounds(span, now);
        PeriodCell {
            current: SwapCell::new(Arc::new(PeriodCounters::new(start, end))),
            previous: SwapCell::new(Arc::new(PeriodCounters::new(
                Timestamp::EPOCH,
                Timestamp::EPOCH,
            ))),
        }
    }

    /// The counters of the period containing `now`, starting a new period if the
    /// current one has ended. Allocates only on that rollover.
    pub(crate) fn current(&self, span: Span, now: Timestamp) -> Arc<PeriodCounters> {
        let current = self.current.load_full();
        if now < current.end {
            return current;
        }
        let (start, end) = bounds(span, now);
        let fresh = Arc::new(PeriodCounters::new(start, end));
        let installed = self.current.compare_and_swap(&current, Arc::clone(&fresh));
        if Arc::ptr_eq(&installed, &fresh) {
            // Only the thread that ended the period files it as the previous one.
            self.previous.store(current);
        }
        installed
    }

    /// Totals of the current and the previous period as of `now`.
    pub(crate) fn totals(&self, span: Span, now: Timestamp) -> (PeriodTotals, PeriodTotals) {
        let current = self.current(span, now);
        (current.totals(), self.previous.load_full().totals())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::period::BudgetPeriod;
    use std::time::Duration;

    const DAY: Span = Span::Period(BudgetPeriod::Day);

    #[test]
    fn holds_never_pass_the_limit_and_debt_blocks() {
        let period = PeriodCounters::new(Timestamp::EPOCH, Timestamp::from_unix_nanos(u64::MAX));
        assert_eq!(period.try_hold(60, 100), Ok(40));
        assert_eq!(period.try_hold(50, 100), Err(40));
        period.settle(
            60,
            Settlement {
                cost: 130,
                input_tokens: 1,
                output_tokens: 2,
            },
        );
        // 130 spent of 100: in debt, even a zero-cost hold is refused.
        assert_eq!(period.try_hold(0, 100), Err(0));
        let totals = period.totals();
        assert_eq!((totals.spent, totals.held, totals.requests), (130, 0, 1));
    }

    #[test]
    fn a_hold_from_the_old_period_settles_there_not_in_the_new_one() {
        let day0 = Timestamp::from_unix_nanos(86_400 * 1_000_000_000 * 10_000);
        let cell = PeriodCell::new(DAY, day0);
        let old = cell.current(DAY, day0);
        assert_eq!(old.try_hold(500, 1_000), Ok(500));

        let day1 = day0.saturating_add(Duration::from_secs(86_400));
        let new = cell.current(DAY, day1);
        assert!(!Arc::ptr_eq(&old, &new));
        assert_eq!(new.try_hold(900, 1_000), Ok(100));

        old.settle(
            500,
            Settlement {
                cost: 300,
                ..Settlement::default()
            },
        );
        let (current, previous) = cell.totals(DAY, day1);
        assert_eq!((current.spent, current.held), (0, 900));
        assert_eq!((previous.spent, previous.held), (300, 0));
    }
}
