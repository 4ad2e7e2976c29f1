//! The admitted request's reservation, shared between the layer and the handler.

use std::sync::Arc;

use parking_lot::Mutex;
use rust_decimal::Decimal;

use crate::limiter::Held;
use crate::request::Usage;
use crate::reservation::RateLimitStatus;

/// An admitted request's reservation, in the request's extensions
/// (`Extension<Hold<Reservation>>` in axum; `Hold<RedisReservation>` on Redis).
///
/// Clones share one reservation. The layer settles it when the response is done: it
/// commits the usage the response carries (a [`Usage`] response extension) or the
/// handler reported here, and releases it otherwise. A handler that wants to commit
/// itself [takes](Hold::take) it.
pub struct Hold<R> {
    shared: Arc<Shared<R>>,
}

struct Shared<R> {
    reservation: Mutex<Option<R>>,
    usage: Mutex<Option<Usage>>,
    rate_limits: RateLimitStatus,
    reserved_cost: Decimal,
}

impl<R: Held> Hold<R> {
    pub(crate) fn new(reservation: R) -> Self {
        Hold {
            shared: Arc::new(Shared {
                rate_limits: reservation.rate_limits(),
                reserved_cost: reservation.reserved_cost(),
                reservation: Mutex::new(Some(reservation)),
                usage: Mutex::new(None),
            }),
        }
    }

    /// Where the tightest limits stood when the request was admitted.
    #[must_use]
    pub fn rate_limits(&self) -> RateLimitStatus {
        self.shared.rate_limits
    }

    /// The worst-case cost held, in USD.
    #[must_use]
    pub fn reserved_cost(&self) -> Decimal {
        self.shared.reserved_cost
    }

    /// What the request has used so far: committed when the response body ends, or
    /// when the client hangs up mid-body. A streaming handler reports as it streams
    /// (the last report counts), so a hang-up is charged for what was sent.
    pub fn report_usage(&self, usage: Usage) {
        *self.shared.usage.lock() = Some(usage);
    }

    /// The usage last reported.
    #[must_use]
    pub fn reported_usage(&self) -> Option<Usage> {
        *self.shared.usage.lock()
    }

    /// Take the reservation over (to commit it yourself); the layer then settles
    /// nothing. `None` if it was already taken or settled.
    #[must_use = "dropping the taken reservation releases it"]
    pub fn take(&self) -> Option<R> {
        self.shared.reservation.lock().take()
    }
}

impl<R> Clone for Hold<R> {
    fn clone(&self) -> Self {
        Hold {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<R> std::fmt::Debug for Hold<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("rate_limits", &self.shared.rate_limits)
            .field("reserved_cost", &self.shared.reserved_cost)
            .field("usage", &*self.shared.usage.lock())
            .finish_non_exhaustive()
    }
}
