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
use crate::sync::{
    saturating_add_i64, saturating_add_u64, thread_share, AtomicI64, AtomicU64, Mutex, Ordering,
    Padded, SHARES,
};

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
    /// What the period counted, for reports; in `spread` too for a shared scope.
    tallies: Tallies,
    /// More tallies, on their own cache lines, for a scope that every request writes
    /// (the org, its wallet): each thread adds to one of them, so two cores do not
    /// pass the same line back and forth for counts that only `usage()` reads. The
    /// admission word stays single, so budgets stay exact.
    spread: Option<Box<[Padded<Tallies>]>>,
    /// The period before the current one and the span periods follow now; the lock
    /// also serialises rollovers.
    rollover: Mutex<Rollover>,
}

/// What only a rollover or a change of period kind reads and writes.
#[derive(Debug)]
struct Rollover {
    previous: PeriodTotals,
    /// The period kind in force: set by the policy, never by a reservation settling
    /// under the rules it was admitted with.
    span: Span,
}

/// Committed spend and usage of one period (or one share of it).
#[derive(Debug, Default)]
struct Tallies {
    spent: AtomicI64,
    requests: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
}

impl Tallies {
    fn add(&self, usage: Settlement, tally: bool) {
        saturating_add_i64(&self.spent, usage.cost);
        if tally {
            saturating_add_u64(&self.requests, 1);
            saturating_add_u64(&self.input_tokens, usage.input_tokens);
            saturating_add_u64(&self.output_tokens, usage.output_tokens);
        }
    }

    /// Take everything counted so far, leaving zeros.
    fn take(&self) -> PeriodTotals {
        PeriodTotals {
            spent: self.spent.swap(0, Ordering::AcqRel),
            requests: self.requests.swap(0, Ordering::AcqRel),
            input_tokens: self.input_tokens.swap(0, Ordering::AcqRel),
            output_tokens: self.output_tokens.swap(0, Ordering::AcqRel),
            ..PeriodTotals::default()
        }
    }

    fn read(&self) -> PeriodTotals {
        PeriodTotals {
            spent: self.spent.load(Ordering::Acquire),
            requests: self.requests.load(Ordering::Acquire),
            input_tokens: self.input_tokens.load(Ordering::Acquire),
            output_tokens: self.output_tokens.load(Ordering::Acquire),
            ..PeriodTotals::default()
        }
    }
}

impl PeriodTotals {
    fn plus(self, other: PeriodTotals) -> PeriodTotals {
        PeriodTotals {
            spent: self.spent.saturating_add(other.spent),
            requests: self.requests.saturating_add(other.requests),
            input_tokens: self.input_tokens.saturating_add(other.input_tokens),
            output_tokens: self.output_tokens.saturating_add(other.output_tokens),
            ..self
        }
    }
}

impl PeriodCell {
    /// Counters for one scope. `shared`: every request writes this scope (the org,
    /// the wallet), so spread its tallies over several cache lines.
    pub(crate) fn new(span: Span, now: Timestamp, shared: bool) -> Self {
        let (start, end) = bounds(span, now);
        PeriodCell {
            start: AtomicU64::new(start.as_unix_nanos()),
            end: AtomicU64::new(end.as_unix_nanos()),
            committed_and_held: AtomicI64::new(0),
            tallies: Tallies::default(),
            spread: shared.then(|| (1..SHARES).map(|_| Padded::default()).collect()),
            rollover: Mutex::new(Rollover {
                previous: empty_period_before(span, start),
                span,
            }),
        }
    }

    fn all_tallies(&self) -> impl Iterator<Item = &Tallies> {
        std::iter::once(&self.tallies).chain(
            self.spread
                .iter()
                .flat_map(|spread| spread.iter().map(|padded| &padded.0)),
        )
    }

    /// Make the period containing `now` (of the kind in force) the current one. A
    /// load and a compare unless a boundary has passed.
    #[inline]
    pub(crate) fn roll(&self, now: Timestamp) {
        if now.as_unix_nanos() >= self.end.load(Ordering::Acquire) {
            self.roll_over(&mut self.rollover.lock(), now);
        }
    }

    #[cold]
    fn roll_over(&self, rollover: &mut Rollover, now: Timestamp) {
        let span = rollover.span;
        let end = self.end.load(Ordering::Acquire);
        if now.as_unix_nanos() < end {
            return; // another thread rolled over while this one waited
        }
        let start = self.start.load(Ordering::Acquire);
        // Swap the ended period's counts out before lowering the admission word:
        // in between, a concurrent hold sees too much spend (a spurious refusal at
        // the boundary instant), never too little.
        let ended = self
            .all_tallies()
            .map(Tallies::take)
            .fold(PeriodTotals::default(), PeriodTotals::plus);
        saturating_add_i64(&self.committed_and_held, ended.spent.saturating_neg());

        let (next_start, next_end) = bounds(span, now);
        rollover.previous = if next_start.as_unix_nanos() == end {
            PeriodTotals {
                start: Timestamp::from_unix_nanos(start),
                end: Timestamp::from_unix_nanos(end),
                ..ended
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
        let share = match &self.spread {
            Some(spread) => match thread_share() {
                0 => &self.tallies,
                i => &spread[i - 1].0,
            },
            None => &self.tallies,
        };
        share.add(usage, tally);
    }

    /// Committed spend of the current period and the period's start, for alerts.
    /// One load per tally share (sixteen for a shared scope).
    pub(crate) fn spent_in_period(&self) -> (i64, u64) {
        let spent = self
            .all_tallies()
            .map(|t| t.spent.load(Ordering::Acquire))
            .fold(0i64, i64::saturating_add);
        (spent, self.start.load(Ordering::Acquire))
    }

    /// Follow the policy's period kind. When it changed, the period containing `now`
    /// under the new kind becomes the current one at once, carrying what the current
    /// one counted (spend is never forgotten by an edit; the next boundary starts
    /// from zero). A period of the old kind that had already ended is closed first.
    pub(crate) fn follow(&self, span: Span, now: Timestamp) {
        let mut rollover = self.rollover.lock();
        if rollover.span == span {
            return;
        }
        if now.as_unix_nanos() >= self.end.load(Ordering::Acquire) {
            self.roll_over(&mut rollover, now);
        }
        rollover.span = span;
        let (start, end) = bounds(span, now);
        self.start.store(start.as_unix_nanos(), Ordering::Release);
        self.end.store(end.as_unix_nanos(), Ordering::Release);
    }

    /// Load counts saved by an earlier process into fresh counters: the saved current
    /// period's counts if it is still current at `now` (else it becomes the previous
    /// period, if it was the one just before), and the saved previous period.
    pub(crate) fn restore(
        &self,
        now: Timestamp,
        saved_current: PeriodTotals,
        saved_previous: PeriodTotals,
    ) {
        self.roll(now);
        let mut rollover = self.rollover.lock();
        let previous = &mut rollover.previous;
        let start = Timestamp::from_unix_nanos(self.start.load(Ordering::Acquire));
        if saved_current.start == start {
            let t = &self.tallies;
            saturating_add_i64(&t.spent, saved_current.spent);
            saturating_add_u64(&t.requests, saved_current.requests);
            saturating_add_u64(&t.input_tokens, saved_current.input_tokens);
            saturating_add_u64(&t.output_tokens, saved_current.output_tokens);
            saturating_add_i64(&self.committed_and_held, saved_current.spent);
            if saved_previous.end == start {
                *previous = saved_previous;
            }
        } else if saved_current.end == start {
            *previous = PeriodTotals {
                held: 0,
                ..saved_current
            };
        }
    }

    /// The end of the current period.
    pub(crate) fn end(&self) -> Timestamp {
        Timestamp::from_unix_nanos(self.end.load(Ordering::Acquire))
    }

    /// Totals of the current and the previous period as of `now`.
    pub(crate) fn totals(&self, now: Timestamp) -> (PeriodTotals, PeriodTotals) {
        self.roll(now);
        // Under the rollover lock, so the pair is never torn by a rollover.
        let rollover = self.rollover.lock();
        let counted = self
            .all_tallies()
            .map(Tallies::read)
            .fold(PeriodTotals::default(), PeriodTotals::plus);
        let current = PeriodTotals {
            start: Timestamp::from_unix_nanos(self.start.load(Ordering::Acquire)),
            end: self.end(),
            held: self
                .committed_and_held
                .load(Ordering::Acquire)
                .saturating_sub(counted.spent),
            ..counted
        };
        (current, rollover.previous)
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
        let cell = PeriodCell::new(Span::Forever, day(0), false);
        assert_eq!(cell.try_hold(60, 100), Ok(40));
        assert_eq!(cell.try_hold(50, 100), Err(40));
        cell.settle(60, cost(130), true);
        // 130 spent of 100: in debt, even a zero-cost hold is refused.
        assert_eq!(cell.try_hold(0, 100), Err(0));
        let (totals, _) = cell.totals(day(0));
        assert_eq!((totals.spent, totals.held, totals.requests), (130, 0, 1));
    }

    #[test]
    fn a_hold_spanning_the_boundary_is_carried_over_and_charged_when_committed() {
        let cell = PeriodCell::new(DAY, day(0), false);
        cell.settle(0, cost(100), true);
        assert_eq!(cell.try_hold(500, 1_000), Ok(400));

        let next = day(1).saturating_add(Duration::from_secs(5));
        cell.roll(next);
        // The ended day's spend left; the hold in flight did not.
        assert_eq!(cell.try_hold(600, 1_000), Err(500));
        cell.settle(500, cost(300), true);

        let (current, previous) = cell.totals(next);
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
        let cell = PeriodCell::new(DAY, day(0), false);
        cell.settle(0, cost(100), true);
        let (current, previous) = cell.totals(day(3));
        assert_eq!((current.start, current.spent), (day(3), 0));
        assert_eq!(
            (previous.start, previous.end, previous.spent),
            (day(2), day(3), 0)
        );
    }

    #[test]
    fn a_shared_scope_counts_every_thread_and_rolls_all_its_tallies_over() {
        let cell = std::sync::Arc::new(PeriodCell::new(DAY, day(0), true));
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let cell = std::sync::Arc::clone(&cell);
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        assert!(cell.try_hold(5, i64::MAX).is_ok());
                        cell.settle(5, cost(3), true);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // Twenty threads are more than the inline tallies plus the spread: some share.
        let (current, _) = cell.totals(day(0));
        assert_eq!(
            (current.spent, current.held, current.requests),
            (6_000, 0, 2_000)
        );
        assert_eq!(
            (current.input_tokens, current.output_tokens),
            (2_000, 4_000)
        );

        let (current, previous) = cell.totals(day(1));
        assert_eq!((current.spent, current.requests, current.held), (0, 0, 0));
        assert_eq!((previous.spent, previous.requests), (6_000, 2_000));
        // The admission word lost exactly the ended period's spend.
        assert_eq!(cell.try_hold(i64::MAX, i64::MAX), Ok(0));
    }
}
