//! Model 4: a period rollover racing a reservation that spans it and a commit.
//!
//! The rollover swaps the ended period's counts out of the live counters while other
//! threads add to them; every addition must land whole in one period or the other,
//! and money held across the boundary must stay held.

use loom::thread;

use crate::budget::{PeriodCell, Settlement};
use crate::clock::Timestamp;
use crate::period::{BudgetPeriod, Span};
use crate::sync::Arc;

const DAY: Span = Span::Period(BudgetPeriod::Day);
const LIMIT: i64 = 100;

fn day(n: u64) -> Timestamp {
    Timestamp::from_unix_nanos(86_400 * 1_000_000_000 * (20_000 + n))
}

fn spend(cost: i64) -> Settlement {
    Settlement {
        cost,
        input_tokens: 1,
        output_tokens: 2,
    }
}

#[test]
fn rollover_racing_holds_and_commits_loses_and_doubles_nothing() {
    super::check("rollover/hold, commit, roll", || {
        let cell = Arc::new(PeriodCell::new(DAY, day(0), false));
        // Spent in day 0 before the race: must end up in the previous period only.
        cell.settle(0, spend(10), true);

        // A request reserved and committed by a thread whose clock still reads day 0
        // (threads read the time at slightly different moments), so its hold and its
        // commit race the other thread's rollover instead of waiting for it.
        let spanning = {
            let cell = Arc::clone(&cell);
            thread::spawn(move || {
                cell.roll(day(0));
                let admitted = cell.try_hold(60, LIMIT).is_ok();
                if admitted {
                    cell.settle(60, spend(40), true);
                }
                admitted
            })
        };
        // The first request of day 1: it rolls the period over and commits.
        cell.roll(day(1));
        let fresh = cell.try_hold(30, LIMIT).is_ok();
        if fresh {
            cell.settle(30, spend(30), true);
        }
        let spanning = spanning.join().unwrap();

        // Day 1 starts from zero spend, so 30 always fits; 60 fits on either day
        // (10 + 60 on day 0, at most 30 + 60 on day 1, as the hold is carried over).
        assert!(fresh && spanning);
        let (current, previous) = cell.totals(day(1));
        assert_eq!((current.start, previous.start), (day(1), day(0)));
        // Nothing lost, nothing counted twice, whichever side of the swap a commit
        // landed on; the day-0 spend never leaks into day 1 beyond that race.
        assert_eq!(current.spent + previous.spent, 10 + 40 + 30);
        assert_eq!(current.requests + previous.requests, 3);
        assert_eq!(current.input_tokens + previous.input_tokens, 3);
        assert_eq!(current.output_tokens + previous.output_tokens, 6);
        assert!(previous.spent >= 10 && current.spent >= 30);
        assert_eq!((current.held, previous.held), (0, 0), "no hold stranded");
        // The admission word matches the current period: nothing held, spend only.
        assert_eq!(cell.try_hold(LIMIT - current.spent, LIMIT), Ok(0));
        assert!(cell.try_hold(1, LIMIT).is_err());
    });
}
