//! Refundable rate limits (GCRA on one atomic word) and concurrency slots.
//!
//! A bucket is its theoretical arrival time (TAT): the instant at which it would be
//! full again. Taking `n` units pushes the TAT `n × interval` later; a take is
//! admitted while the TAT stays within `tolerance` (= `limit × interval`) of now.
//! Unlike governor's buckets, a take can be given back: the reservation records the
//! nanoseconds it added and subtracts exactly those, never past "full".

use std::num::NonZeroU64;
use std::time::Duration;

use crate::clock::duration_nanos;
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// `limit` units per `window`, with its GCRA constants precomputed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RateRule {
    pub(crate) limit: u64,
    pub(crate) window: Duration,
    /// Nanoseconds one unit occupies, rounded up so the sustained rate never exceeds
    /// `limit` per `window`.
    pub(crate) interval: u64,
    /// `limit × interval`: exactly `limit` units fit in a full bucket.
    pub(crate) tolerance: u64,
}

impl RateRule {
    pub(crate) fn new(limit: NonZeroU64, window: Duration) -> Self {
        let limit = limit.get();
        let interval = duration_nanos(window).div_ceil(limit).max(1);
        RateRule {
            limit,
            window,
            interval,
            tolerance: limit.saturating_mul(interval),
        }
    }
}

/// What an admitted take did, for rollback and for the rate-limit headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Taken {
    pub(crate) added_nanos: u64,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
}

/// Why a take was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
    /// `None` when waiting cannot help: the request is larger than the whole bucket.
    pub(crate) retry_after: Option<Duration>,
}

/// One refundable GCRA bucket.
#[derive(Debug, Default)]
pub(crate) struct Gcra {
    tat: AtomicU64,
}

impl Gcra {
    /// Take `units` if they fit now.
    pub(crate) fn try_take(&self, rule: &RateRule, units: u64, now: u64) -> Result<Taken, Refused> {
        let horizon = now.saturating_add(rule.tolerance);
        let mut tat = self.tat.load(Ordering::Acquire);
        if units > rule.limit {
            return Err(Refused {
                remaining: remaining(rule, tat, horizon),
                reset: reset(tat, now),
                retry_after: None,
            });
        }
        // `units ≤ limit`, so this is at most `tolerance`: no overflow.
        let added = units * rule.interval;
        loop {
            let new_tat = tat.max(now).saturating_add(added);
            if new_tat > horizon {
                return Err(Refused {
                    remaining: remaining(rule, tat, horizon),
                    reset: reset(tat, now),
                    retry_after: Some(Duration::from_nanos(new_tat - horizon)),
                });
            }
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(Taken {
                        added_nanos: added,
                        remaining: remaining(rule, new_tat, horizon),
                        reset: reset(new_tat, now),
                    })
                }
                Err(actual) => tat = actual,
            }
        }
    }

    /// Give back `nanos` of a take; a bucket never refills past full.
    pub(crate) fn refund(&self, nanos: u64, now: u64) {
        if nanos == 0 {
            return;
        }
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            if tat <= now {
                return; // already full
            }
            let new_tat = tat.saturating_sub(nanos).max(now);
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => tat = actual,
            }
        }
    }

    /// Charge `nanos` whether or not they fit: usage beyond a reservation is debt,
    /// which later takes must wait out. Saturates rather than wraps.
    pub(crate) fn force_take(&self, nanos: u64, now: u64) {
        if nanos == 0 {
            return;
        }
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let new_tat = tat.max(now).saturating_add(nanos);
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => tat = actual,
            }
        }
    }

    /// Re-express the backlog for a new interval, so the units already taken count the
    /// same against the new limit (a GCRA backlog is time: left alone, a lower limit
    /// would see past requests as fewer).
    pub(crate) fn rescale(&self, old_interval: u64, new_interval: u64, now: u64) {
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let backlog = u128::from(tat.saturating_sub(now));
            let scaled = backlog * u128::from(new_interval) / u128::from(old_interval.max(1));
            let new_tat = now.saturating_add(u64::try_from(scaled).unwrap_or(u64::MAX));
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => tat = actual,
            }
        }
    }

    /// Forget the backlog: a limit that did not exist counted nothing.
    pub(crate) fn clear(&self) {
        self.tat.store(0, Ordering::Release);
    }

    /// Units that would fit right now.
    #[cfg(any(test, loom))]
    pub(crate) fn remaining(&self, rule: &RateRule, now: u64) -> u64 {
        remaining(
            rule,
            self.tat.load(Ordering::Acquire),
            now.saturating_add(rule.tolerance),
        )
    }

    /// Nanoseconds of the bucket in use at `now` (0 when full); used by tests and
    /// invariants to see that every hold was given back.
    #[cfg(any(test, loom))]
    pub(crate) fn occupied_nanos(&self, now: u64) -> u64 {
        self.tat.load(Ordering::Acquire).saturating_sub(now)
    }
}

fn remaining(rule: &RateRule, tat: u64, horizon: u64) -> u64 {
    (horizon.saturating_sub(tat) / rule.interval).min(rule.limit)
}

fn reset(tat: u64, now: u64) -> Duration {
    Duration::from_nanos(tat.saturating_sub(now))
}

/// A cap on requests in flight at once.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    in_use: AtomicU32,
}

impl Slots {
    /// Take a slot if fewer than `max` are in use; `Ok(free after)` or `Err(in use)`.
    pub(crate) fn try_acquire(&self, max: u32) -> Result<u32, u32> {
        let mut in_use = self.in_use.load(Ordering::Acquire);
        loop {
            if in_use >= max {
                return Err(in_use);
            }
            match self.in_use.compare_exchange_weak(
                in_use,
                in_use + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(max - in_use - 1),
                Err(actual) => in_use = actual,
            }
        }
    }

    pub(crate) fn release(&self) {
        self.in_use.fetch_sub(1, Ordering::AcqRel);
    }

    pub(crate) fn in_use(&self) -> u32 {
        self.in_use.load(Ordering::Acquire)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn per_minute(limit: u64) -> RateRule {
        RateRule::new(NonZeroU64::new(limit).unwrap(), Duration::from_secs(60))
    }

    #[test]
    fn exactly_limit_units_fit_even_when_the_interval_rounds() {
        let rule = per_minute(7); // 60 s / 7 is not a whole number of nanoseconds
        let bucket = Gcra::default();
        let now = 1_000 * SEC;
        for i in 0..7 {
            let taken = bucket.try_take(&rule, 1, now).unwrap();
            assert_eq!(taken.remaining, 6 - i);
        }
        let refused = bucket.try_take(&rule, 1, now).unwrap_err();
        assert_eq!(refused.remaining, 0);
        let wait = refused.retry_after.unwrap();
        assert!(
            wait > Duration::from_secs(8) && wait <= Duration::from_secs(9),
            "{wait:?}"
        );
        // After waiting exactly that long, one unit fits again.
        assert!(bucket
            .try_take(&rule, 1, now + duration_nanos(wait))
            .is_ok());
    }

    #[test]
    fn refund_restores_capacity_but_never_beyond_full() {
        let rule = per_minute(100);
        let bucket = Gcra::default();
        let now = 1_000 * SEC;
        let taken = bucket.try_take(&rule, 60, now).unwrap();
        assert_eq!(taken.remaining, 40);
        bucket.refund(taken.added_nanos / 2, now);
        assert_eq!(bucket.remaining(&rule, now), 70);
        bucket.refund(taken.added_nanos * 10, now);
        assert_eq!(bucket.remaining(&rule, now), 100);
        assert_eq!(bucket.occupied_nanos(now), 0);
    }

    #[test]
    fn oversized_request_is_refused_without_retry() {
        let rule = per_minute(10);
        let refused = Gcra::default().try_take(&rule, 11, SEC).unwrap_err();
        assert_eq!(refused.retry_after, None);
        assert_eq!(refused.remaining, 10);
    }

    #[test]
    fn forced_debt_blocks_until_paid_and_saturates() {
        let rule = per_minute(60); // one unit per second
        let bucket = Gcra::default();
        let now = 1_000 * SEC;
        bucket.force_take(120 * rule.interval, now);
        let refused = bucket.try_take(&rule, 1, now).unwrap_err();
        assert_eq!(refused.retry_after, Some(Duration::from_secs(61)));
        bucket.force_take(u64::MAX, now);
        assert_eq!(bucket.occupied_nanos(now), u64::MAX - now);
    }

    #[test]
    fn slots_cap_in_flight() {
        let slots = Slots::default();
        assert_eq!(slots.try_acquire(2), Ok(1));
        assert_eq!(slots.try_acquire(2), Ok(0));
        assert_eq!(slots.try_acquire(2), Err(2));
        slots.release();
        assert_eq!(slots.try_acquire(2), Ok(0));
    }
}
