//! One interface over every backend, so a gateway can be generic over where its
//! counters live.

use std::future::{ready, Future};

use rust_decimal::Decimal;

use crate::denial::{Denial, Error};
use crate::engine::Engine;
use crate::request::{Request, Usage};
use crate::reservation::{RateLimitStatus, Receipt, Reservation};

/// A hold on an admitted request's worst case, whatever the backend.
pub trait Held: Send {
    /// Where the tightest limits stand after this admission, for response headers.
    fn rate_limits(&self) -> RateLimitStatus;

    /// The worst-case cost held, in USD.
    fn reserved_cost(&self) -> Decimal;

    /// The id of the key the request was admitted for (never the secret).
    fn key_id(&self) -> &str;

    /// The id of the workspace the request was admitted in.
    fn workspace_id(&self) -> &str;
}

impl Held for Reservation {
    fn rate_limits(&self) -> RateLimitStatus {
        Reservation::rate_limits(self)
    }

    fn reserved_cost(&self) -> Decimal {
        Reservation::reserved_cost(self)
    }

    fn key_id(&self) -> &str {
        Reservation::key_id(self)
    }

    fn workspace_id(&self) -> &str {
        Reservation::workspace_id(self)
    }
}

/// `check_and_reserve` and `commit_usage`, in memory or in Redis, with the same
/// [`Denial`]s and [`Receipt`]s.
///
/// ```
/// use tollgate::{Limiter, Request, Usage};
///
/// async fn serve<L: Limiter>(limiter: &L, secret: &str) -> Result<String, tollgate::Denial> {
///     let reservation = limiter
///         .check_and_reserve(&Request::with_secret(secret, "gpt-4o-mini").input_tokens(900))
///         .await?;
///     // ... call the provider ...
///     match limiter.commit_usage(reservation, Usage::new(900, 120)).await {
///         // Pending: the store will record it (exactly once); deliver the answer.
///         Ok(receipt) if receipt.is_pending() => Ok(format!("cost ${}, pending", receipt.cost())),
///         Ok(receipt) => Ok(format!("cost ${}", receipt.cost())),
///         // The store refused it for good: nothing was charged.
///         Err(error) => Ok(format!("not charged: {error}")),
///     }
/// }
/// ```
pub trait Limiter: Send + Sync {
    /// What an admitted request holds until it is committed or dropped.
    type Reservation: Held;

    /// May this key call this model now? If so, hold its worst case on every level.
    fn check_and_reserve(
        &self,
        request: &Request<'_>,
    ) -> impl Future<Output = Result<Self::Reservation, Denial>> + Send;

    /// Replace a reservation by what the request really used. `Ok` means the usage is
    /// charged exactly once, now or (a [pending](Receipt::is_pending) receipt) when the
    /// store answers again: deliver the provider's answer. `Err` means it could not be
    /// recorded at all.
    fn commit_usage(
        &self,
        reservation: Self::Reservation,
        usage: Usage,
    ) -> impl Future<Output = Result<Receipt, Error>> + Send;
}

impl Limiter for Engine {
    type Reservation = Reservation;

    fn check_and_reserve(
        &self,
        request: &Request<'_>,
    ) -> impl Future<Output = Result<Reservation, Denial>> + Send {
        ready(Engine::check_and_reserve(self, request))
    }

    fn commit_usage(
        &self,
        reservation: Reservation,
        usage: Usage,
    ) -> impl Future<Output = Result<Receipt, Error>> + Send {
        ready(Engine::commit_usage(self, reservation, usage))
    }
}
