//! Model 2: a budget under concurrent holds, commits and drop-releases.
//!
//! The admission word is one CAS-updated counter, so two holds can never jointly
//! pass the limit, and commits and releases are additions that none may lose.

use loom::sync::atomic::{AtomicI64, Ordering};
use loom::thread;

use crate::budget::{PeriodCell, Settlement};
use crate::clock::Timestamp;
use crate::period::Span;
use crate::sync::Arc;

const LIMIT: i64 = 100;

fn spend(cost: i64) -> Settlement {
    Settlement {
        cost,
        input_tokens: 1,
        output_tokens: 1,
    }
}

/// Holds `amount`, then commits `cost` (or releases, when `cost` is `None`).
/// `Some(cost)` if admitted and committed, `Some(0)` if admitted and released.
///
/// `outstanding` is the test's own tally of money the engine has admitted: raised
/// only after a hold succeeds and lowered before the engine gives it back, so it
/// never exceeds what a correct engine holds, and it passing the limit proves
/// the engine admitted more than the budget.
fn hold_then(
    cell: &PeriodCell,
    outstanding: &AtomicI64,
    amount: i64,
    cost: Option<i64>,
) -> Option<i64> {
    cell.try_hold(amount, LIMIT).ok()?;
    let before = outstanding.fetch_add(amount, Ordering::SeqCst);
    assert!(
        before + amount <= LIMIT,
        "admitted {} against a budget of {LIMIT}",
        before + amount
    );
    match cost {
        Some(cost) => {
            // Commits never exceed the hold here, so the tally can drop to the cost
            // before the engine replaces the hold by it.
            outstanding.fetch_sub(amount - cost, Ordering::SeqCst);
            cell.settle(amount, spend(cost), true);
            Some(cost)
        }
        None => {
            outstanding.fetch_sub(amount, Ordering::SeqCst);
            cell.release(amount);
            Some(0)
        }
    }
}

#[test]
fn holds_commits_and_releases_never_overspend_and_spend_adds_up() {
    super::check("budget/hold, commit, release", || {
        let now = Timestamp::from_unix_nanos(1_000);
        let cell = Arc::new(PeriodCell::new(Span::Forever, now, false));
        let outstanding = Arc::new(AtomicI64::new(0));

        let spawn = |amount, cost| {
            let cell = Arc::clone(&cell);
            let outstanding = Arc::clone(&outstanding);
            thread::spawn(move || hold_then(&cell, &outstanding, amount, cost))
        };
        let committer = spawn(60, Some(50));
        let dropper = spawn(60, None);
        let small = hold_then(&cell, &outstanding, 30, Some(30));

        let results = [committer.join().unwrap(), dropper.join().unwrap(), small];
        let committed: i64 = results.iter().flatten().sum();
        let commits = [results[0], results[2]].iter().flatten().count() as u64;

        let (totals, _) = cell.totals(now);
        assert_eq!(totals.spent, committed, "spend equals the sum of commits");
        assert_eq!(totals.held, 0, "every hold was committed or released");
        assert_eq!(totals.requests, commits);
        assert_eq!(outstanding.load(Ordering::SeqCst), committed);
    });
}

#[test]
fn a_debt_pinned_at_the_bound_never_reads_as_room_to_a_racing_hold() {
    super::check("budget/overage at the bound races a hold", || {
        let now = Timestamp::from_unix_nanos(1_000);
        let cell = Arc::new(PeriodCell::new(Span::Forever, now, false));
        // Almost the most spend a counter can say, then an absurd overage: the
        // admission word must pin at i64::MAX, never wrap to a large credit that a
        // concurrent hold could read as room (a `fetch_add` then a pin did).
        cell.settle(0, spend(i64::MAX - 10), true);
        let debtor = {
            let cell = Arc::clone(&cell);
            thread::spawn(move || cell.settle(0, spend(1_000), true))
        };
        let admitted = cell.try_hold(5, LIMIT).is_ok();
        debtor.join().unwrap();

        assert!(!admitted, "a hold was admitted against a debt of i64::MAX");
        let (totals, _) = cell.totals(now);
        assert_eq!(totals.spent, i64::MAX);
    });
}

#[test]
fn an_absurd_overage_racing_an_ordinary_commit_ends_pinned() {
    super::check("budget/an ordinary add races a saturating add", || {
        let now = Timestamp::from_unix_nanos(1_000);
        let cell = Arc::new(PeriodCell::new(Span::Forever, now, false));
        // One absurd overage (pinned at i64::MAX) and an ordinary commit racing it:
        // whichever lands first, the counter ends pinned, never wrapped (an ordinary
        // add that read the counter small, then landed after the pin, once left it
        // wrapped for good; it now pins it again).
        let debtor = {
            let cell = Arc::clone(&cell);
            thread::spawn(move || cell.settle(0, spend(i64::MAX), true))
        };
        cell.settle(0, spend(1_000), true);
        debtor.join().unwrap();
        let (totals, _) = cell.totals(now);
        assert_eq!(totals.spent, i64::MAX, "spend wrapped");
        assert!(
            cell.try_hold(5, LIMIT).is_err(),
            "a wrapped debt read as room"
        );
    });
}
