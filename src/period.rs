//! Budget periods and their UTC boundaries.

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;

const NANOS_PER_SECOND: u64 = 1_000_000_000;
const NANOS_PER_DAY: u64 = 86_400 * NANOS_PER_SECOND;

/// When a spend budget starts again from zero.
///
/// In TOML: `period = "day"`, `period = "month"` or `period = { custom = { seconds = 3600 } }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BudgetPeriod {
    /// A calendar day, midnight to midnight UTC.
    Day,
    /// A calendar month, from the first at midnight UTC (the default).
    #[default]
    Month,
    /// A fixed number of seconds, with boundaries at whole multiples since the Unix
    /// epoch, so every instance agrees where a period starts.
    Custom {
        /// Length of the period in seconds; at least 1.
        seconds: u64,
    },
}

/// The span a counter covers: a budget period, or all time for a wallet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Span {
    Period(BudgetPeriod),
    Forever,
}

/// The half-open interval `[start, end)` of the span that contains `now`.
pub(crate) fn bounds(span: Span, now: Timestamp) -> (Timestamp, Timestamp) {
    let now_nanos = now.as_unix_nanos();
    let (start, end) = match span {
        Span::Forever => (0, u64::MAX),
        Span::Period(BudgetPeriod::Day) => aligned(now_nanos, NANOS_PER_DAY),
        Span::Period(BudgetPeriod::Custom { seconds }) => {
            aligned(now_nanos, seconds.max(1).saturating_mul(NANOS_PER_SECOND))
        }
        Span::Period(BudgetPeriod::Month) => month(now),
    };
    (
        Timestamp::from_unix_nanos(start),
        Timestamp::from_unix_nanos(end),
    )
}

fn aligned(now: u64, length: u64) -> (u64, u64) {
    let start = now - now % length;
    (start, start.saturating_add(length))
}

fn month(now: Timestamp) -> (u64, u64) {
    let date = now.to_datetime().date_naive();
    let first = NaiveDate::from_ymd_opt(date.year(), date.month(), 1);
    let next = if date.month() == 12 {
        NaiveDate::from_ymd_opt(date.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(date.year(), date.month() + 1, 1)
    };
    let to_nanos = |d: Option<NaiveDate>| {
        d.and_then(|d| d.and_hms_opt(0, 0, 0))
            .and_then(|t| t.and_utc().timestamp_nanos_opt())
            .and_then(|n| u64::try_from(n).ok())
    };
    // Dates outside chrono's nanosecond range (before 1970 or after 2262) fall back
    // to one span covering them, never to a panic.
    (
        to_nanos(first).unwrap_or(0),
        to_nanos(next).unwrap_or(u64::MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Timestamp {
        Timestamp::from_datetime(Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap())
    }

    #[test]
    fn month_bounds_cover_december_and_leap_february() {
        let (start, end) = bounds(
            Span::Period(BudgetPeriod::Month),
            at(2026, 12, 31, 23, 59, 59),
        );
        assert_eq!(start, at(2026, 12, 1, 0, 0, 0));
        assert_eq!(end, at(2027, 1, 1, 0, 0, 0));
        let (start, end) = bounds(Span::Period(BudgetPeriod::Month), at(2028, 2, 29, 12, 0, 0));
        assert_eq!(start, at(2028, 2, 1, 0, 0, 0));
        assert_eq!(end, at(2028, 3, 1, 0, 0, 0));
    }

    #[test]
    fn day_and_custom_bounds_are_half_open() {
        let midnight = at(2026, 11, 23, 0, 0, 0);
        assert_eq!(
            bounds(Span::Period(BudgetPeriod::Day), midnight),
            (midnight, at(2026, 11, 24, 0, 0, 0))
        );
        let hour = Span::Period(BudgetPeriod::Custom { seconds: 3600 });
        assert_eq!(
            bounds(hour, at(2026, 11, 23, 10, 59, 59)),
            (at(2026, 11, 23, 10, 0, 0), at(2026, 11, 23, 11, 0, 0))
        );
    }

    #[test]
    fn forever_never_ends() {
        let (start, end) = bounds(Span::Forever, at(2026, 1, 1, 0, 0, 0));
        assert_eq!(start, Timestamp::EPOCH);
        assert_eq!(end.as_unix_nanos(), u64::MAX);
    }
}
