//! Model 1: the GCRA bucket under concurrent takes, refunds and forced debt.
//!
//! Every operation is a CAS loop on the theoretical arrival time, so the property
//! is that no update is lost: the bucket's occupancy at the end must equal exactly
//! what the admitted takes, refunds and debts add up to, whatever the interleaving.

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
        let bucket = Arc::new(Gcra::default());
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
        let bucket = Arc::new(Gcra::default());
        // Full: the take below fits only after at least one refund landed.
        bucket.try_take(&rule, 2, NOW).unwrap();
        let refunder = {
            let bucket = Arc::clone(&bucket);
            thread::spawn(move || bucket.refund(rule.interval, NOW))
        };
        // The take gets a thread of its own: run here after the spawns, loom never
        // explored it landing between the two refunds, and a `try_take` that lost
        // a refund (load + store instead of CAS) went unnoticed.
        let taker = {
            let bucket = Arc::clone(&bucket);
            thread::spawn(move || bucket.try_take(&rule, 1, NOW).is_ok())
        };
        bucket.refund(rule.interval, NOW);
        refunder.join().unwrap();
        let took = u64::from(taker.join().unwrap());

        // 2 taken − 2 refunded + whatever the racing take got.
        assert_eq!(bucket.occupied_nanos(NOW), took * rule.interval);
        assert_eq!(bucket.remaining(&rule, NOW), 2 - took);
    });
}

#[test]
fn debt_forced_while_a_hold_is_refunded_and_a_take_races_is_kept() {
    super::check("bucket/debt, refund and take race", || {
        let rule = per_minute(2);
        let bucket = Arc::new(Gcra::default());
        let hold = bucket.try_take(&rule, 1, NOW).unwrap();
        let debtor = {
            let bucket = Arc::clone(&bucket);
            thread::spawn(move || bucket.force_take(3 * rule.interval, NOW))
        };
        let refunder = {
            let bucket = Arc::clone(&bucket);
            thread::spawn(move || bucket.refund(hold.added_nanos, NOW))
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
