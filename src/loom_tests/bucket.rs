//! Model 1: the GCRA bucket under concurrent takes, refunds, forced debt and rule
//! changes.
//!
//! Every operation is a CAS loop on the theoretical arrival time, so the property
//! is that no update is lost: the bucket's occupancy at the end must equal exactly
//! what the admitted takes, refunds and debts add up to, whatever the interleaving.
//! A rule change (a policy edit) racing a refund must land the refund in the units
//! it was taken in: the end state is one of the two sequential orders'.

use std::num::NonZeroU64;
use std::time::Duration;

use loom::thread;

use crate::bucket::{Gcra, RateRule};
use crate::sync::Arc;

/// A frozen instant far from zero, so `tat.max(now)` is exercised as in production.
const NOW: u64 = 1_000 * 1_000_000_000;

fn per_minute(limit: u64) -> RateRule {
    RateRule::new(NonZeroU64::new(limit).unwrap(), Duration::from_secs(60))
}

#[test]
fn three_takes_on_a_two_unit_bucket_admit_exactly_two() {
    super::check("bucket/three takes, two fit", || {
        let rule = per_minute(2);
        let bucket = Arc::new(Gcra::new(Some(&rule)));
        let others: Vec<_> = (0..2)
            .map(|_| {
                let bucket = Arc::clone(&bucket);
                thread::spawn(move || bucket.try_take(&rule, 1, NOW).is_ok())
            })
            .collect();
        let mine = bucket.try_take(&rule, 1, NOW).is_ok();
        let admitted = others
            .into_iter()
            .map(|t| t.join().unwrap())
            .chain([mine])
            .filter(|&ok| ok)
            .count();

        // Two, not three (over capacity) and not one (a take refused though it fit).
        assert_eq!(admitted, 2);
        // Each admitted take left its interval in the bucket: none was overwritten.
        assert_eq!(bucket.occupied_nanos(NOW), 2 * rule.interval);
        assert_eq!(bucket.remaining(&rule, NOW), 0);
    });
}

#[test]
fn refunds_racing_a_take_on_a_full_bucket_are_never_lost() {
    super::check("bucket/two refunds race a take", || {
        let rule = per_minute(2);
        let bucket = Arc::new(Gcra::new(Some(&rule)));
        // Full: the take below fits only after at least one refund landed.
        let held = bucket.try_take(&rule, 2, NOW).unwrap().hold;
        let refunder = {
            let bucket = Arc::clone(&bucket);
            thread::spawn(move || bucket.give_back(&held, 1, NOW, NOW))
        };
        // The take gets a thread of its own: run here after the spawns, loom never
        // explored it landing between the two refunds, and a `try_take` that lost
        // a refund (load + store instead of CAS) went unnoticed.
        let taker = {
            let bucket = Arc::clone(&bucket);
            thread::spawn(move || bucket.try_take(&rule, 1, NOW).is_ok())
        };
        bucket.give_back(&held, 1, NOW, NOW);
        refunder.join().unwrap();
        let took = u64::from(taker.join().unwrap());

        // 2 taken − 2 refunded + whatever the racing take got. (The second refund of
        // the same hold counts the first as possibly ahead of it, but nothing of a
        // hold drains while the clock stands still, so both give back in full.)
        assert_eq!(bucket.occupied_nanos(NOW), took * rule.interval);
        assert_eq!(bucket.remaining(&rule, NOW), 2 - took);
    });
}

#[test]
fn debt_forced_while_a_hold_is_refunded_and_a_take_races_is_kept() {
    super::check("bucket/debt, refund and take race", || {
        let rule = per_minute(2);
        let bucket = Arc::new(Gcra::new(Some(&rule)));
        let hold = bucket.try_take(&rule, 1, NOW).unwrap().hold;
        let debtor = {
            let bucket = Arc::clone(&bucket);
            thread::spawn(move || bucket.charge(3, NOW))
        };
        let refunder = {
            let bucket = Arc::clone(&bucket);
            thread::spawn(move || bucket.give_back(&hold, 1, NOW, NOW))
        };
        // Fits only while the debt has not landed yet.
        let took = u64::from(bucket.try_take(&rule, 1, NOW).is_ok());
        debtor.join().unwrap();
        refunder.join().unwrap();

        // 1 held − 1 refunded + 3 of debt + the take; the refund never clamps at
        // "full" here, so any other total means an update was lost or doubled.
        assert_eq!(bucket.occupied_nanos(NOW), (3 + took) * rule.interval);
        assert_eq!(bucket.remaining(&rule, NOW), 0);
    });
}

#[test]
fn a_refund_racing_a_raised_limit_lands_in_the_units_it_was_taken_in() {
    super::check("bucket/refund races a rule change", || {
        // TPM 10 raised to 100, with a 6-token hold and 2 more tokens taken.
        let before = per_minute(10);
        let after = per_minute(100);
        let bucket = Arc::new(Gcra::new(Some(&before)));
        let hold = bucket.try_take(&before, 6, NOW).unwrap().hold;
        bucket.try_take(&before, 2, NOW).unwrap();
        let refunder = {
            let bucket = Arc::clone(&bucket);
            thread::spawn(move || bucket.give_back(&hold, 6, NOW, NOW))
        };
        bucket.change_rule(Some(&after), NOW);
        refunder.join().unwrap();

        // Either order leaves the 2 tokens still taken, counted in the new interval:
        // refund first (6 × old interval off, then 2 old intervals rescaled to 2 new
        // ones) or rescale first (8 new intervals, then 6 new intervals off). A
        // refund applied in the wrong interval leaves 8 − 0.6 or 0 tokens instead.
        assert_eq!(bucket.occupied_nanos(NOW), 2 * after.interval);
        assert_eq!(bucket.remaining(&after, NOW), 98);
    });
}

#[test]
fn a_take_racing_a_lowered_limit_is_counted_and_given_back_whole() {
    super::check("bucket/take races a rule change", || {
        // RPM 4 lowered to 2 while a request that looked up the old rule takes one
        // unit: the bucket ends holding exactly that take, in whichever interval it
        // landed, and the take gives back exactly what it added.
        let before = per_minute(4);
        let after = per_minute(2);
        let bucket = Arc::new(Gcra::new(Some(&before)));
        let taker = {
            let bucket = Arc::clone(&bucket);
            thread::spawn(move || bucket.try_take(&before, 1, NOW).map(|t| t.hold))
        };
        bucket.change_rule(Some(&after), NOW);
        let new = taker.join().unwrap().expect("one unit of four fits");

        // Taken before the change: one new interval (rescaled); after it: one old
        // interval, which is what it added.
        let occupied = bucket.occupied_nanos(NOW);
        assert!(
            occupied == after.interval || occupied == before.interval,
            "{occupied}"
        );
        bucket.give_back(&new, 1, NOW, NOW);
        assert_eq!(bucket.occupied_nanos(NOW), 0);
    });
}

#[test]
fn a_refund_that_read_the_old_rule_never_lands_after_the_change() {
    super::check(
        "bucket/refund, rule change, take back to the same arrival time",
        || {
            // TPM 10, full (6 tokens held, 4 more taken), raised to TPM 100; after the
            // change a take of 90 fills the bucket to the very same arrival time as
            // before it. A refund that read the bucket under the old rule must not land
            // then (its six old intervals would give back 36 s instead of 3.6 s).
            let before = per_minute(10);
            let after = per_minute(100);
            let bucket = Arc::new(Gcra::new(Some(&before)));
            let hold = bucket.try_take(&before, 6, NOW).unwrap().hold;
            bucket.try_take(&before, 4, NOW).unwrap();
            let refunder = {
                let bucket = Arc::clone(&bucket);
                thread::spawn(move || bucket.give_back(&hold, 6, NOW, NOW))
            };
            bucket.change_rule(Some(&after), NOW);
            let took = bucket.try_take(&after, 90, NOW).is_ok();
            refunder.join().unwrap();
            // Every sequential order leaves 4 (+ 90) tokens of TPM 100 taken.
            let want = if took { 94 } else { 4 } * after.interval;
            assert_eq!(bucket.occupied_nanos(NOW), want, "took={took}");
        },
    );
}
