//! Refundable rate limits (GCRA on one atomic word) and concurrency slots.
//!
//! A bucket is its theoretical arrival time (TAT): the instant at which it would be
//! full again. Taking `n` units pushes the TAT `n × interval` later; a take is
//! admitted while the TAT stays within `tolerance` (= `limit × interval`) of now.
//! Unlike governor's buckets, a take can be given back.
//!
//! Giving back is where rules that change under requests in flight bite, so a hold
//! records what it took in units (requests, tokens), never in nanoseconds of the rule
//! it was taken under, and the bucket keeps its own current interval: a refund
//! converts units with the interval in force when it lands. A refund is also capped
//! by what of *this* hold can still be undrained (see [`Hold`]), not by where its
//! slot ended when it was taken: releasing an earlier hold moves every later one's
//! slot earlier.

use std::num::NonZeroU64;
use std::time::Duration;

use crate::clock::duration_nanos;
use crate::sync::{spin_wait, AtomicU32, AtomicU64, Ordering};

/// The state word of a bucket whose rule is being changed: takes and refunds wait it
/// out, so none of them applies nanoseconds of one interval to a backlog kept in another.
const CHANGING: u64 = u64::MAX;
/// Low bits of the state word: the rule's epoch, modulo 4. Every rule change moves
/// them, so a take or refund that read the word under the old rule can never
/// compare-and-swap it afterwards, even if the arrival time comes back to the same
/// nanosecond (an ABA): its word still carries the old epoch.
const TAG_BITS: u32 = 2;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
/// The latest arrival time a state word can hold (nanoseconds since the Unix epoch:
/// the year 2116); debt saturates here, and no word reaches [`CHANGING`].
const MAX_TAT: u64 = (u64::MAX >> TAG_BITS) - 1;
/// Low bits of the rule word: the epoch, bumped by every rule change.
const EPOCH_BITS: u32 = 16;

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
        // Capped so the interval, an epoch and a flag share one word (2^47 ns is 1.6
        // days, longer than any window a policy can set).
        let interval = duration_nanos(window)
            .div_ceil(limit)
            .clamp(1, (1 << (64 - TAKEN_UNDER_SHIFT)) - 1);
        RateRule {
            limit,
            window,
            interval,
            tolerance: limit.saturating_mul(interval),
        }
    }
}

/// One admitted take, recorded in terms that survive a change of the bucket's rule.
///
/// What of it can still be given back is worked out when it is given back: the
/// bucket drains first in, first out, so the `ahead` nanoseconds queued before this
/// take drain first, less whatever of them was refunded since. Every refund since
/// the take counts as possibly ahead of it (capped at `ahead`), so a refund never
/// returns a nanosecond that already drained; it can keep more than strictly needed
/// when holds taken later were refunded first while the bucket was busy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Hold {
    /// Units taken (requests or tokens); 0: nothing taken.
    pub(crate) units: u64,
    /// Backlog queued before this take when it was taken, in nanoseconds.
    ahead: u64,
    /// The bucket's refund total when this take was admitted.
    seen: u64,
    /// The rule this take was admitted under, packed (a reservation holds fifteen of
    /// these and is moved on every call, so its size is time): the interval it was
    /// taken in, whether that was not the bucket's own (it raced a policy change), and
    /// the bucket's rule epoch then.
    taken_under: u64,
}

/// Bits of `Hold::taken_under` below the interval: the epoch (16) and the stale flag.
const STALE_BIT: u64 = 1 << EPOCH_BITS;
const TAKEN_UNDER_SHIFT: u32 = EPOCH_BITS + 1;

impl Hold {
    fn interval(&self) -> u64 {
        self.taken_under >> TAKEN_UNDER_SHIFT
    }

    fn epoch(&self) -> u16 {
        self.taken_under as u16
    }

    fn stale(&self) -> bool {
        self.taken_under & STALE_BIT != 0
    }

    /// Nanoseconds (in the bucket's `interval` now) that a refund of `units` of this
    /// hold, taken at `at`, may give back at `now`.
    fn refundable(&self, units: u64, rule: (u64, u16), refunded: u64, at: u64, now: u64) -> u64 {
        let (interval, epoch) = rule;
        if interval == 0 {
            return 0; // the limit is gone: nothing of it to give back
        }
        let elapsed = now.saturating_sub(at);
        match epoch.wrapping_sub(self.epoch()) {
            // The rule this take was counted in is still the bucket's: exact. (A take
            // admitted under a rule that was being replaced is counted in its own
            // interval: that is what it added.)
            0 => {
                let added = self.units.saturating_mul(self.interval());
                let ahead_refunded = refunded.wrapping_sub(self.seen).min(self.ahead);
                let drained = elapsed
                    .saturating_sub(self.ahead - ahead_refunded)
                    .min(added);
                units.saturating_mul(self.interval()).min(added - drained)
            }
            // Rescaled once since: each unit is now one new interval long, and at most
            // as many units drained as the faster of the two rules lets through.
            1 if !self.stale() => {
                let drained = elapsed.div_ceil(interval.min(self.interval()).max(1));
                units
                    .min(self.units.saturating_sub(drained))
                    .saturating_mul(interval)
            }
            // Rescaled twice, or the limit was removed or added since: the bucket no
            // longer knows where this take lies, so it gives nothing back.
            _ => 0,
        }
    }
}

/// What an admitted take did: the hold to give back later, and where the bucket stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Taken {
    pub(crate) hold: Hold,
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

/// One refundable GCRA bucket, with the rule it counts in.
#[derive(Debug)]
pub(crate) struct Gcra {
    /// `tat << TAG_BITS | epoch % 4`: the theoretical arrival time (ns) and the epoch
    /// of the rule it is kept in.
    word: AtomicU64,
    /// `interval << EPOCH_BITS | epoch`; interval 0: no limit.
    rule: AtomicU64,
    /// Nanoseconds of refunds begun and finished, ever. A refund counts itself as
    /// begun before it lands and as finished after, so a take (which reads
    /// `finished`) never counts a refund that lands after it, and a refund (which
    /// reads `begun` after the TAT) never misses one that landed before it.
    refunds_begun: AtomicU64,
    refunds_finished: AtomicU64,
}

/// A bucket's state word, decoded, with the rule it is kept in.
struct State {
    word: u64,
    tat: u64,
    interval: u64,
    epoch: u16,
}

impl Gcra {
    /// A full bucket counting in `rule`'s interval (no rule: nothing to count yet).
    pub(crate) fn new(rule: Option<&RateRule>) -> Self {
        Gcra {
            word: AtomicU64::new(0),
            rule: AtomicU64::new(pack(rule.map_or(0, |r| r.interval), 0)),
            refunds_begun: AtomicU64::new(0),
            refunds_finished: AtomicU64::new(0),
        }
    }

    /// The state word, its arrival time and the rule it is kept in, waiting out a rule
    /// change in progress (a policy edit: rare and short). The word's epoch tag and
    /// the rule's epoch agree, so the pair is one consistent state: any rule change
    /// after it also changes the word, and the compare-and-swap that follows fails.
    fn settled(&self) -> State {
        loop {
            let word = self.word.load(Ordering::SeqCst);
            if word != CHANGING {
                let (interval, epoch) = unpack(self.rule.load(Ordering::SeqCst));
                if u64::from(epoch) & TAG_MASK == word & TAG_MASK {
                    return State {
                        word,
                        tat: word >> TAG_BITS,
                        interval,
                        epoch,
                    };
                }
            }
            spin_wait();
        }
    }

    /// Replace the state `from` by the arrival time `tat`, in the same rule.
    fn replace(&self, from: &State, tat: u64) -> bool {
        let word = tat.min(MAX_TAT) << TAG_BITS | from.word & TAG_MASK;
        self.word
            .compare_exchange_weak(from.word, word, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Take `units` if they fit now.
    pub(crate) fn try_take(&self, rule: &RateRule, units: u64, now: u64) -> Result<Taken, Refused> {
        let seen = self.refunds_finished.load(Ordering::SeqCst);
        let horizon = now.saturating_add(rule.tolerance);
        let mut state = self.settled();
        if units > rule.limit {
            return Err(Refused {
                remaining: remaining(rule, state.tat, horizon),
                reset: reset(state.tat, now),
                retry_after: None,
            });
        }
        // `units ≤ limit`, so this is at most `tolerance`: no overflow.
        let added = units * rule.interval;
        loop {
            let tat = state.tat;
            let new_tat = tat.max(now).saturating_add(added).min(MAX_TAT);
            if new_tat > horizon {
                return Err(Refused {
                    remaining: remaining(rule, tat, horizon),
                    reset: reset(tat, now),
                    retry_after: Some(Duration::from_nanos(new_tat - horizon)),
                });
            }
            if self.replace(&state, new_tat) {
                return Ok(Taken {
                    hold: Hold {
                        units,
                        ahead: tat.saturating_sub(now),
                        seen,
                        taken_under: rule.interval << TAKEN_UNDER_SHIFT
                            | if state.interval == rule.interval {
                                0
                            } else {
                                STALE_BIT
                            }
                            | u64::from(state.epoch),
                    },
                    remaining: remaining(rule, new_tat, horizon),
                    reset: reset(new_tat, now),
                });
            }
            state = self.settled();
        }
    }

    /// Give back up to `units` of `hold` (taken at `at`): as much of it as can still
    /// be undrained, in the interval in force now, never past full.
    pub(crate) fn give_back(&self, hold: &Hold, units: u64, at: u64, now: u64) {
        if hold.units == 0 || units == 0 {
            return;
        }
        // Refunds this call counted as begun but did not land (a lost race): they
        // are not refunds that could lie ahead of its own hold.
        let mut own_misses = 0u64;
        loop {
            let state = self.settled();
            if state.tat <= now {
                return; // full: nothing left to give back
            }
            let refunded = self
                .refunds_begun
                .load(Ordering::SeqCst)
                .wrapping_sub(own_misses);
            let rule = (state.interval, state.epoch);
            let give = hold.refundable(units, rule, refunded, at, now);
            if give == 0 {
                return;
            }
            self.refunds_begun.fetch_add(give, Ordering::SeqCst);
            let landed = self.replace(&state, state.tat.saturating_sub(give).max(now));
            // A miss counts as finished too: it then reads to everyone as a refund
            // that may lie ahead of them, which can only make later refunds smaller.
            self.refunds_finished.fetch_add(give, Ordering::SeqCst);
            if landed {
                return;
            }
            own_misses = own_misses.wrapping_add(give);
        }
    }

    /// Charge `units` whether or not they fit, in the interval in force now: usage
    /// beyond a reservation is debt, which later takes must wait out. Saturates
    /// rather than wraps.
    pub(crate) fn charge(&self, units: u64, now: u64) {
        if units == 0 {
            return;
        }
        loop {
            let state = self.settled();
            if state.interval == 0 {
                return;
            }
            let new_tat = state
                .tat
                .max(now)
                .saturating_add(units.saturating_mul(state.interval));
            if self.replace(&state, new_tat) {
                return;
            }
        }
    }

    /// The limit changed to `rule` (`None`: removed). A changed interval re-expresses
    /// the backlog, so the units already taken count the same against the new limit
    /// (a GCRA backlog is time: left alone, a lower limit would see past requests as
    /// fewer); a limit added where there was none starts full. Holds taken before
    /// convert their units at the new interval when given back.
    pub(crate) fn change_rule(&self, rule: Option<&RateRule>, now: u64) {
        let interval = rule.map_or(0, |r| r.interval);
        // Policy changes are serialised by the engine; the loop only waits out takes
        // and refunds racing this one.
        let state = loop {
            let state = self.settled();
            if state.interval == interval {
                return;
            }
            if self
                .word
                .compare_exchange_weak(state.word, CHANGING, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                break state;
            }
        };
        let (old, tat) = (state.interval, state.tat);
        let backlog = tat.saturating_sub(now);
        let (next, epoch) = if old > 0 && interval > 0 {
            let scaled = u128::from(backlog) * u128::from(interval) / u128::from(old);
            let next = now
                .saturating_add(u64::try_from(scaled).unwrap_or(u64::MAX))
                .min(MAX_TAT);
            (
                if backlog > 0 { next } else { tat },
                state.epoch.wrapping_add(1),
            )
        } else {
            (0, state.epoch.wrapping_add(2))
        };
        self.rule.store(pack(interval, epoch), Ordering::SeqCst);
        // Published last, with the new epoch's tag: a word read under the old rule
        // can never match it again.
        self.word.store(
            next << TAG_BITS | u64::from(epoch) & TAG_MASK,
            Ordering::SeqCst,
        );
    }

    /// Units that would fit right now.
    #[cfg(any(test, loom))]
    pub(crate) fn remaining(&self, rule: &RateRule, now: u64) -> u64 {
        remaining(rule, self.settled().tat, now.saturating_add(rule.tolerance))
    }

    /// Nanoseconds of the bucket in use at `now` (0 when full); used by tests and
    /// invariants to see that every hold was given back.
    #[cfg(any(test, loom))]
    pub(crate) fn occupied_nanos(&self, now: u64) -> u64 {
        self.settled().tat.saturating_sub(now)
    }
}

fn pack(interval: u64, epoch: u16) -> u64 {
    interval << EPOCH_BITS | u64::from(epoch)
}

fn unpack(word: u64) -> (u64, u16) {
    (word >> EPOCH_BITS, word as u16)
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
        let bucket = Gcra::new(Some(&rule));
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
        let bucket = Gcra::new(Some(&rule));
        let now = 1_000 * SEC;
        let taken = bucket.try_take(&rule, 60, now).unwrap();
        assert_eq!(taken.remaining, 40);
        bucket.give_back(&taken.hold, 30, now, now);
        assert_eq!(bucket.remaining(&rule, now), 70);
        bucket.give_back(&taken.hold, 600, now, now);
        assert_eq!(bucket.remaining(&rule, now), 100);
        assert_eq!(bucket.occupied_nanos(now), 0);
    }

    #[test]
    fn oversized_request_is_refused_without_retry() {
        let rule = per_minute(10);
        let refused = Gcra::new(Some(&rule)).try_take(&rule, 11, SEC).unwrap_err();
        assert_eq!(refused.retry_after, None);
        assert_eq!(refused.remaining, 10);
    }

    #[test]
    fn forced_debt_blocks_until_paid_and_saturates() {
        let rule = per_minute(60); // one unit per second
        let bucket = Gcra::new(Some(&rule));
        let now = 1_000 * SEC;
        bucket.charge(120, now);
        let refused = bucket.try_take(&rule, 1, now).unwrap_err();
        assert_eq!(refused.retry_after, Some(Duration::from_secs(61)));
        bucket.charge(u64::MAX, now);
        assert_eq!(bucket.occupied_nanos(now), MAX_TAT - now);
    }

    #[test]
    fn a_hold_taken_before_a_raised_limit_gives_back_units_not_old_nanoseconds() {
        // TPM 1,000 raised to 100,000 with a 1,000-token hold in flight.
        let before = per_minute(1_000);
        let after = per_minute(100_000);
        let bucket = Gcra::new(Some(&before));
        let now = 1_000 * SEC;
        let hold = bucket.try_take(&before, 1_000, now).unwrap().hold;
        bucket.change_rule(Some(&after), now);
        // The backlog now reads as the 1,000 tokens taken, in the new interval.
        assert_eq!(bucket.remaining(&after, now), 99_000);
        // Committed with nothing used: 1,000 tokens back, not 1,000 old intervals
        // (which would read as 100,000 tokens of the new limit).
        bucket.give_back(&hold, 1_000, now, now);
        assert_eq!(bucket.remaining(&after, now), 100_000);
        assert!(bucket.try_take(&after, 100_000, now).is_ok());
        assert!(bucket.try_take(&after, 1, now).is_err());
    }

    #[test]
    fn a_refund_after_an_earlier_release_gives_back_only_what_has_not_drained() {
        // TPM 100: 50 and 50, the first dropped, 20 s later 50 and 33, the second
        // dropped. The second hold drained for 20 s after the first left: only its
        // last 10 s (16 tokens) can come back, so 50 more do not fit.
        let rule = per_minute(100);
        let bucket = Gcra::new(Some(&rule));
        let t0 = 1_000 * SEC;
        let first = bucket.try_take(&rule, 50, t0).unwrap().hold;
        let second = bucket.try_take(&rule, 50, t0).unwrap().hold;
        bucket.give_back(&first, 50, t0, t0);
        let t1 = t0 + 20 * SEC;
        assert!(bucket.try_take(&rule, 50, t1).is_ok());
        assert!(bucket.try_take(&rule, 33, t1).is_ok());
        bucket.give_back(&second, 50, t0, t1);
        assert_eq!(bucket.remaining(&rule, t1), 17);
        assert!(bucket.try_take(&rule, 50, t1).is_err());
    }

    #[test]
    fn holds_given_back_in_any_order_return_the_bucket_to_full_and_no_further() {
        let rule = per_minute(100);
        let bucket = Gcra::new(Some(&rule));
        let now = 1_000 * SEC;
        let holds: Vec<_> = [30, 20, 40]
            .iter()
            .map(|&n| bucket.try_take(&rule, n, now).unwrap().hold)
            .collect();
        for &i in &[1, 2, 0] {
            bucket.give_back(&holds[i], holds[i].units, now, now);
        }
        assert_eq!(bucket.occupied_nanos(now), 0);
        // Given back twice (a bug elsewhere): still never past full.
        bucket.give_back(&holds[0], holds[0].units, now, now);
        assert_eq!(bucket.remaining(&rule, now), 100);
    }

    #[test]
    fn a_limit_removed_and_added_again_forgets_holds_from_before() {
        let rule = per_minute(10);
        let bucket = Gcra::new(Some(&rule));
        let now = 1_000 * SEC;
        let old = bucket.try_take(&rule, 5, now).unwrap().hold;
        bucket.change_rule(None, now);
        bucket.change_rule(Some(&rule), now);
        assert_eq!(bucket.remaining(&rule, now), 10); // added: starts full
        let new = bucket.try_take(&rule, 10, now).unwrap().hold;
        // The old hold must not give back the new take's tokens.
        bucket.give_back(&old, 5, now, now);
        assert_eq!(bucket.remaining(&rule, now), 0);
        bucket.give_back(&new, 10, now, now);
        assert_eq!(bucket.remaining(&rule, now), 10);
    }

    #[test]
    fn a_lowered_limit_keeps_the_units_taken_and_refunds_them_in_the_new_interval() {
        let before = per_minute(100);
        let after = per_minute(10);
        let bucket = Gcra::new(Some(&before));
        let now = 1_000 * SEC;
        let hold = bucket.try_take(&before, 6, now).unwrap().hold;
        bucket.change_rule(Some(&after), now);
        assert_eq!(bucket.remaining(&after, now), 4);
        bucket.give_back(&hold, 6, now, now);
        assert_eq!(bucket.remaining(&after, now), 10);
    }

    #[test]
    fn a_lowered_limit_on_a_bucket_in_saturated_debt_stays_usable() {
        // Debt pinned at the latest arrival time, then the limit lowered: the
        // rescaled time pins there again. It must not read as a rule change in
        // progress (every later call would wait for it forever).
        let before = per_minute(20);
        let after = per_minute(10);
        let bucket = Gcra::new(Some(&before));
        let now = 1_000 * SEC;
        bucket.charge(u64::MAX, now);
        bucket.change_rule(Some(&after), now);
        bucket.change_rule(Some(&per_minute(5)), now);
        assert_eq!(bucket.occupied_nanos(now), MAX_TAT - now);
        assert!(bucket.try_take(&per_minute(5), 1, now).is_err());
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
