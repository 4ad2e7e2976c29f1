//! What the engines tell `tracing` and `metrics` (the features of those names).
//!
//! Without the features every hook here is an empty inline function. With them, the
//! admitted path touches only metric handles registered when the policy was applied
//! (no key, label or `String` is built per request, so nothing is allocated with or
//! without a recorder), and `tracing` events are emitted only off that path: denials,
//! store errors, fail-open admissions, policy changes and dropped events.

#[cfg(feature = "metrics")]
mod meters;
#[cfg(feature = "metrics")]
pub mod names;
mod trace;

#[cfg(all(feature = "metrics", feature = "redis"))]
pub(crate) use meters::StoreMeters;
#[cfg(feature = "metrics")]
pub(crate) use meters::{MeterSource, Meters};
#[cfg(all(not(feature = "metrics"), feature = "redis"))]
pub(crate) use off::StoreMeters;
#[cfg(not(feature = "metrics"))]
pub(crate) use off::{MeterSource, Meters};
pub(crate) use trace::{event_dropped, policy_changed};
#[cfg(feature = "redis")]
pub(crate) use trace::{fail_open, store_error};

use crate::denial::Denial;

/// A request was refused: counted by scope and reason, and a `tracing` event at
/// `debug` level. Off the admitted path, and allocation-free without a subscriber.
#[cold]
#[inline(never)]
pub(crate) fn denied(meters: &Meters, denial: &Denial) {
    meters.denied(denial);
    trace::denied(denial);
}

/// The hooks without the `metrics` feature: nothing, inlined away.
#[cfg(not(feature = "metrics"))]
mod off {
    use crate::denial::Denial;
    #[cfg(feature = "redis")]
    use crate::denial::StoreErrorKind;
    use crate::policy::Policy;
    use crate::request::Usage;
    use crate::snapshot::Route;

    /// Not a unit struct, so it is built with `default()` with the feature or without.
    #[derive(Clone, Default)]
    pub(crate) struct MeterSource(());

    #[derive(Default)]
    pub(crate) struct Meters;

    impl Meters {
        pub(crate) fn register(_: &Policy, _: &MeterSource) -> Self {
            Meters
        }
        #[inline(always)]
        pub(crate) fn admitted(&self, _: Route) {}
        #[inline(always)]
        pub(crate) fn held(&self, _: Route) {}
        #[inline(always)]
        pub(crate) fn released(&self, _: Route) {}
        #[inline(always)]
        pub(crate) fn committed(&self, _: Route, _: i64, _: Usage) {}
        #[inline(always)]
        pub(crate) fn denied(&self, _: &Denial) {}
        #[cfg(feature = "redis")]
        #[inline(always)]
        pub(crate) fn fail_open(&self, _: Route) {}
    }

    #[cfg(feature = "redis")]
    pub(crate) struct StoreMeters;

    #[cfg(feature = "redis")]
    impl StoreMeters {
        pub(crate) fn register(_: &MeterSource, _: &[&'static str]) -> Self {
            StoreMeters
        }
        #[inline(always)]
        pub(crate) fn error(&self, _: StoreErrorKind) {}
        #[allow(dead_code)]
        #[inline(always)]
        pub(crate) fn call(&self, _: usize, _: std::time::Duration) {}
    }
}
