//! A reservation held in Redis (or, for a fail-open workspace during an outage, by
//! the local limiter).

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rust_decimal::Decimal;

use crate::decide::Admission;
use crate::denial::Error;
use crate::money::{picos_to_decimal, usage_cost};
use crate::redis::calls::{self, Used};
use crate::redis::keys::Group;
use crate::redis::{Inner, PendingCommit, RedisEngine};
use crate::request::Usage;
use crate::reservation::{LimitWindow, RateLimitStatus, Receipt, Reservation};
use crate::snapshot::Snapshot;
use crate::store::Tightest;

/// Worst-case tokens and cost held in Redis for one admitted request.
///
/// Commit it with [`RedisEngine::commit_usage`]. Dropping it instead releases the
/// hold in the background (on the current tokio runtime); if that cannot reach Redis,
/// the hold expires after the configured reservation TTL.
#[must_use = "dropping a reservation releases it; commit it with the real usage"]
pub struct RedisReservation {
    kind: Kind,
}

// Boxing `Remote`, the common case, would allocate on every request; `Local` (only
// while Redis is down, for a fail-open workspace) is the one boxed.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Remote(Remote),
    /// Admitted by the local limiter of a fail-open workspace while Redis was down.
    Local(Box<Reservation>),
}

struct Remote {
    engine: Arc<Inner>,
    snapshot: Arc<Snapshot>,
    id: String,
    admission: Admission,
    /// The key names the reservation was taken under, for its commit or release.
    groups: [Group; 2],
    tightest: Tightest,
    settled: bool,
}

impl RedisReservation {
    pub(crate) fn remote(
        engine: Arc<Inner>,
        snapshot: Arc<Snapshot>,
        id: String,
        admission: Admission,
        groups: [Group; 2],
        tightest: Tightest,
    ) -> Self {
        RedisReservation {
            kind: Kind::Remote(Remote {
                engine,
                snapshot,
                id,
                admission,
                groups,
                tightest,
                settled: false,
            }),
        }
    }

    pub(crate) fn local(reservation: Reservation) -> Self {
        RedisReservation {
            kind: Kind::Local(Box::new(reservation)),
        }
    }

    /// True when the local limiter admitted this request (a fail-open workspace while
    /// Redis was unreachable): its spend is counted on this instance only.
    #[must_use]
    pub fn is_local(&self) -> bool {
        matches!(self.kind, Kind::Local(_))
    }

    /// The reservation's id in Redis (`None` for a local one).
    #[must_use]
    pub fn id(&self) -> Option<&str> {
        match &self.kind {
            Kind::Remote(r) => Some(&r.id),
            Kind::Local(_) => None,
        }
    }

    /// The worst-case cost held, in USD.
    #[must_use]
    pub fn reserved_cost(&self) -> Decimal {
        match &self.kind {
            Kind::Remote(r) => picos_to_decimal(r.admission.ask.cost),
            Kind::Local(r) => r.reserved_cost(),
        }
    }

    /// The input and output tokens held.
    #[must_use]
    pub fn reserved_tokens(&self) -> (u64, u64) {
        match &self.kind {
            Kind::Remote(r) => (r.admission.ask.input_tokens, r.admission.ask.output_tokens),
            Kind::Local(r) => r.reserved_tokens(),
        }
    }

    /// Where the tightest limits stand after this admission, for response headers.
    #[must_use]
    pub fn rate_limits(&self) -> RateLimitStatus {
        match &self.kind {
            Kind::Remote(r) => RateLimitStatus {
                requests: r.tightest.requests.map(LimitWindow::from),
                tokens: r.tightest.tokens.map(LimitWindow::from),
            },
            Kind::Local(r) => r.rate_limits(),
        }
    }

    pub(crate) async fn commit(self, engine: &RedisEngine, usage: Usage) -> Result<Receipt, Error> {
        let mut remote = match self.kind {
            Kind::Local(local) => return Ok(local.commit(usage)),
            Kind::Remote(remote) => remote,
        };
        remote.settled = true;
        let input = u64::from(usage.input_tokens);
        let output = u64::from(usage.output_tokens);
        let used = Used {
            cost: usage_cost(
                input,
                output,
                remote.admission.input_price,
                remote.admission.output_price,
            ),
            input_tokens: input,
            output_tokens: output,
        };
        let inner = &remote.engine;
        let groups = std::mem::take(&mut remote.groups);
        let calls = groups.each_ref().map(|group| {
            calls::commit(
                &remote.snapshot,
                remote.admission.route,
                group,
                &remote.id,
                remote.admission.ask,
                used,
                inner.ttls,
            )
        });
        let receipt = Receipt::new(used.cost, remote.admission.ask.cost, usage);
        let commit = PendingCommit {
            snapshot: Arc::clone(&remote.snapshot),
            route: remote.admission.route,
            groups,
            calls,
            first_sent: Instant::now(),
        };
        match engine.run_commit(&commit).await {
            Ok(()) => {
                // Redis answers again: replay what an outage left queued.
                if engine.pending_commits() != 0 {
                    let engine = engine.clone();
                    tokio::spawn(async move {
                        // A failure leaves them queued for the next attempt.
                        let _ = engine.flush_pending().await;
                    });
                }
                Ok(receipt)
            }
            Err(error) => {
                engine.record_error(error.clone());
                if error.is_transient() {
                    inner.pending.lock().push(commit);
                } else {
                    inner.failed_commits.fetch_add(1, Ordering::Relaxed);
                }
                Err(Error::Store(error))
            }
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // No runtime to release on: the hold expires after its TTL.
        };
        let engine = RedisEngine {
            inner: Arc::clone(&self.engine),
        };
        let groups = std::mem::take(&mut self.groups);
        let id = std::mem::take(&mut self.id);
        runtime.spawn(async move {
            for group in &groups {
                engine.release_group(group, &id).await;
            }
        });
    }
}

impl fmt::Debug for RedisReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisReservation")
            .field("id", &self.id())
            .field("cost", &self.reserved_cost())
            .field("local", &self.is_local())
            .finish_non_exhaustive()
    }
}
