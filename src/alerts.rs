//! Budget alerts: each configured percentage fires once per period per scope.
//!
//! Spend only grows within a period, so one word per scope suffices: the period and
//! budget it speaks of and the highest percentage already reported. A changed budget
//! limit starts over (its percentages are of a different amount). A commit that pushes spend
//! past one or more thresholds moves the word forward with one CAS; only the commit
//! whose CAS succeeds reports the thresholds it passed, so none fires twice, even
//! when many threads cross at once.

use crate::sync::{AtomicU64, Ordering};

/// The packed state: period start in seconds (34 bits, to the year 2514), a 22-bit
/// fingerprint of the budget limit, and `highest reported + 1` (8 bits).
#[derive(Debug, Default)]
pub(crate) struct Alerts {
    word: AtomicU64,
}

const PERCENT_BITS: u32 = 8;
const LIMIT_BITS: u32 = 22;

/// Thresholds newly crossed by one commit: percentages `(after, through]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Crossed {
    /// Highest percentage reported before this commit (`None`: none this period).
    pub(crate) after: Option<u8>,
    /// Highest percentage reached now.
    pub(crate) through: u8,
}

impl Crossed {
    /// Whether configured threshold `percent` is among those newly crossed.
    pub(crate) fn includes(self, percent: u8) -> bool {
        percent <= self.through && self.after.map_or(true, |after| percent > after)
    }
}

impl Alerts {
    /// Record that spend reached `percent` (capped at 100) of a budget of `limit` in the
    /// period starting at `period_start_nanos`; `Some` if that passes anything not yet
    /// reported for this period and limit.
    pub(crate) fn reach(
        &self,
        percent: u8,
        period_start_nanos: u64,
        limit: i64,
    ) -> Option<Crossed> {
        let fingerprint = (limit as u64 ^ (limit as u64 >> LIMIT_BITS) ^ (limit as u64 >> 44))
            & ((1 << LIMIT_BITS) - 1);
        let tag = ((period_start_nanos / 1_000_000_000) << LIMIT_BITS) | fingerprint;
        let percent = percent.min(100);
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let reported = if word >> PERCENT_BITS == tag {
                (word & 0xff) as u8 // highest reported + 1; 0: none yet
            } else {
                0 // a new period: nothing reported in it
            };
            if u16::from(percent) < u16::from(reported) {
                return None;
            }
            let next = (tag << PERCENT_BITS) | (u64::from(percent) + 1);
            match self
                .word
                .compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Some(Crossed {
                        after: reported.checked_sub(1),
                        through: percent,
                    })
                }
                Err(actual) => word = actual,
            }
        }
    }
}

/// `spent` as a whole percentage of `limit`, rounded down, capped at 100.
pub(crate) fn percent_of(spent: i64, limit: i64) -> u8 {
    if limit <= 0 {
        return 100;
    }
    let pct = (i128::from(spent.max(0)) * 100) / i128::from(limit);
    pct.min(100) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_percentage_is_reported_once_per_period() {
        let alerts = Alerts::default();
        let period = 1_000_000_000_000;
        let limit = 1_000_000;
        let first = Crossed {
            after: None,
            through: 10,
        };
        assert_eq!(alerts.reach(10, period, limit), Some(first));
        assert_eq!(alerts.reach(10, period, limit), None);
        assert_eq!(alerts.reach(5, period, limit), None);
        let crossed = alerts.reach(85, period, limit).unwrap();
        assert!(crossed.includes(50) && crossed.includes(80));
        assert!(!crossed.includes(10) && !crossed.includes(90));
        // A new period starts from nothing.
        let next = period + 86_400_000_000_000;
        let crossed = alerts.reach(50, next, limit).unwrap();
        assert!(crossed.includes(0) && crossed.includes(50));
        assert_eq!(alerts.reach(250, next, limit).unwrap().through, 100);
        assert_eq!(alerts.reach(100, next, limit), None);
        // So does a changed budget: its percentages are of another amount.
        assert_eq!(alerts.reach(55, next, 10 * limit).unwrap().through, 55);
    }

    #[test]
    fn percentages_round_down_and_cap() {
        assert_eq!(percent_of(79_999, 100_000), 79);
        assert_eq!(percent_of(80_000, 100_000), 80);
        assert_eq!(percent_of(i64::MAX, 1), 100);
        assert_eq!(percent_of(-5, 100), 0);
        assert_eq!(percent_of(0, 0), 100);
    }
}
