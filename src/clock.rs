//! Time, injected: a monotonic system clock in production, a manual clock in tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};

/// A point in time: nanoseconds since the Unix epoch (UTC).
///
/// One type serves rate limits (which need monotonic time) and budget periods (which
/// roll over on calendar boundaries): [`SystemClock`] anchors to the wall clock once
/// and then advances monotonically, so a wall-clock step never refills a bucket.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp from nanoseconds since the Unix epoch.
    #[must_use]
    pub const fn from_unix_nanos(nanos: u64) -> Self {
        Timestamp(nanos)
    }

    /// Nanoseconds since the Unix epoch.
    #[must_use]
    pub const fn as_unix_nanos(self) -> u64 {
        self.0
    }

    /// A timestamp from a UTC date-time; instants before 1970 clamp to the epoch and
    /// instants after 2554 clamp to the last representable nanosecond.
    #[must_use]
    pub fn from_datetime(at: DateTime<Utc>) -> Self {
        match at.timestamp_nanos_opt() {
            Some(nanos) => Timestamp(u64::try_from(nanos).unwrap_or(0)),
            None if at.timestamp() < 0 => Timestamp(0),
            None => Timestamp(u64::MAX),
        }
    }

    /// This instant as a UTC date-time.
    #[must_use]
    pub fn to_datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_nanos(i64::try_from(self.0).unwrap_or(i64::MAX))
    }

    /// This instant plus `by`, saturating at the end of representable time.
    #[must_use]
    pub fn saturating_add(self, by: Duration) -> Self {
        Timestamp(self.0.saturating_add(duration_nanos(by)))
    }

    /// The time from `earlier` to `self`, or zero if `earlier` is later.
    #[must_use]
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// A duration in whole nanoseconds, saturating at `u64::MAX` (584 years).
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A source of time. Read once per engine call.
pub trait Clock: Send + Sync + 'static {
    /// The current instant. Must never go backwards.
    fn now(&self) -> Timestamp;
}

/// The production clock: wall time at creation, advanced by a monotonic counter.
///
/// The counter is `quanta`'s (the CPU's time-stamp counter, calibrated against the
/// OS clock, where it is invariant; the OS monotonic clock otherwise), because the
/// hot path reads the time twice per request and `Instant::now` is a `clock_gettime`
/// call, which costs a large share of a request's budget in a VM.
#[derive(Debug)]
pub struct SystemClock {
    anchor_wall: u64,
    counter: quanta::Clock,
    anchor_raw: u64,
}

impl SystemClock {
    /// A clock anchored to the current wall time.
    #[must_use]
    pub fn new() -> Self {
        let anchor_wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(duration_nanos)
            .unwrap_or(0);
        let counter = quanta::Clock::new();
        let anchor_raw = counter.raw();
        SystemClock {
            anchor_wall,
            counter,
            anchor_raw,
        }
    }
}

impl SystemClock {
    /// A clock that reads `wall` now (e.g. another machine's time, read a moment
    /// ago) and advances monotonically from there.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn anchored(wall: Timestamp) -> Self {
        let counter = quanta::Clock::new();
        let anchor_raw = counter.raw();
        SystemClock {
            anchor_wall: wall.0,
            counter,
            anchor_raw,
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let elapsed = self
            .counter
            .delta_as_nanos(self.anchor_raw, self.counter.raw());
        Timestamp(self.anchor_wall.saturating_add(elapsed))
    }
}

/// A clock that moves only when told to: exact, repeatable tests without sleeping.
///
/// ```
/// use std::time::Duration;
/// use tollgate::{Clock, ManualClock, Timestamp};
///
/// let clock = ManualClock::new(Timestamp::from_unix_nanos(1_000));
/// clock.advance(Duration::from_secs(1));
/// assert_eq!(clock.now().as_unix_nanos(), 1_000_001_000);
/// ```
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    /// A clock stopped at `at`.
    #[must_use]
    pub fn new(at: Timestamp) -> Self {
        ManualClock {
            nanos: AtomicU64::new(at.0),
        }
    }

    /// A clock stopped at a UTC date-time.
    #[must_use]
    pub fn at(at: DateTime<Utc>) -> Self {
        Self::new(Timestamp::from_datetime(at))
    }

    /// Move the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = duration_nanos(by);
        let _ = self
            .nanos
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add(by))
            });
    }

    /// Move the clock to `at`; a time earlier than now is ignored, because clocks
    /// never go backwards.
    pub fn set(&self, at: Timestamp) {
        self.nanos.fetch_max(at.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.nanos.load(Ordering::SeqCst))
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}
