//! A reservation held in Redis (or, for a fail-open workspace during an outage, by
//! the local limiter).

use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rust_decimal::Decimal;

use crate::decide::Admission;
use crate::denial::Error;
use crate::money::{picos_to_decimal, usage_cost};
use crate::redis::background::{self, Detach, Hold};
use crate::redis::calls::{self, Used};
use crate::redis::lease::Share;
use crate::redis::{Inner, PendingCommit};
use crate::request::Usage;
use crate::reservation::{LimitWindow, RateLimitStatus, Receipt, Reservation};
use crate::snapshot::Snapshot;
use crate::store::Tightest;

/// Worst-case tokens and cost held in Redis for one admitted request.
///
/// Commit it with [`RedisEngine::commit_usage`](crate::RedisEngine::commit_usage).
/// While it lives, its holds' expiry in Redis is renewed in the background (every
/// third of `RedisConfig::reservation_ttl`), so a long stream keeps its hold. Dropping
/// it instead releases the hold in the background (on the current tokio runtime),
/// retried until Redis acknowledges it; if Redis stays unreachable for a whole
/// reservation TTL, the hold expires there and the next script on its workspace or
/// org gives it back.
#[must_use = "dropping a reservation releases it; commit it with the real usage"]
pub struct RedisReservation {
    kind: Kind,
}

// Boxing `Remote`, the common case, would allocate on every request; `Local` (only
// while Redis is down, for a fail-open workspace) is the one boxed.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Remote(Remote),
    /// Admitted from this instance's lease on its key and model (see
    /// `RedisConfig::lease`).
    Leased(Share),
    /// Admitted by the local limiter of a fail-open workspace while Redis was down
    /// (boxed: it is the rare case, and much the larger).
    Local(Box<Reservation>),
}

struct Remote {
    engine: Arc<Inner>,
    snapshot: Arc<Snapshot>,
    /// Its id and the key names it was taken under, for its renewal, commit or
    /// release.
    hold: Arc<Hold>,
    /// Its entry in the engine's renewals.
    renewal: u64,
    admission: Admission,
    tightest: Tightest,
    settled: bool,
    /// Counted in the engine's meters (a lease's own hold is not: its requests are).
    metered: bool,
}

impl RedisReservation {
    /// A reservation both groups admitted, renewed from now on; `taken` is when the
    /// reserve's replies arrived (the holds expire one TTL after some moment before).
    pub(crate) fn remote(
        engine: Arc<Inner>,
        snapshot: Arc<Snapshot>,
        hold: Arc<Hold>,
        admission: Admission,
        tightest: Tightest,
        taken: Instant,
        metered: bool,
    ) -> Self {
        let renewal = engine.renewals.register(&engine, &hold, taken);
        if metered {
            snapshot.meters.held(admission.route);
        }
        RedisReservation {
            kind: Kind::Remote(Remote {
                engine,
                snapshot,
                hold,
                renewal,
                admission,
                tightest,
                settled: false,
                metered,
            }),
        }
    }

    pub(crate) fn leased(share: Share) -> Self {
        RedisReservation {
            kind: Kind::Leased(share),
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

    /// The reservation's id in Redis (`None` for a local one). A request admitted
    /// from a lease (`RedisConfig::lease`) has its lease's id, shared with the other
    /// requests of that lease.
    #[must_use]
    pub fn id(&self) -> Option<&str> {
        match &self.kind {
            Kind::Remote(r) => Some(&r.hold.id),
            Kind::Leased(s) => Some(s.lease_id()),
            Kind::Local(_) => None,
        }
    }

    /// The id of the key this request was admitted for (never the secret).
    #[must_use]
    pub fn key_id(&self) -> &str {
        match &self.kind {
            Kind::Remote(r) => r.snapshot.key_id(&r.admission.route),
            Kind::Leased(s) => s.snapshot().key_id(&s.admission().route),
            Kind::Local(r) => r.key_id(),
        }
    }

    /// The id of the workspace this request was admitted in.
    #[must_use]
    pub fn workspace_id(&self) -> &str {
        match &self.kind {
            Kind::Remote(r) => r.snapshot.workspace_id(&r.admission.route),
            Kind::Leased(s) => s.snapshot().workspace_id(&s.admission().route),
            Kind::Local(r) => r.workspace_id(),
        }
    }

    /// The worst-case cost held, in USD.
    #[must_use]
    pub fn reserved_cost(&self) -> Decimal {
        match &self.kind {
            Kind::Remote(r) => picos_to_decimal(r.admission.ask.cost),
            Kind::Leased(s) => picos_to_decimal(s.admission().ask.cost),
            Kind::Local(r) => r.reserved_cost(),
        }
    }

    /// The input and output tokens held.
    #[must_use]
    pub fn reserved_tokens(&self) -> (u64, u64) {
        match &self.kind {
            Kind::Remote(r) => (r.admission.ask.input_tokens, r.admission.ask.output_tokens),
            Kind::Leased(s) => (
                s.admission().ask.input_tokens,
                s.admission().ask.output_tokens,
            ),
            Kind::Local(r) => r.reserved_tokens(),
        }
    }

    /// Where the tightest limits stand after this admission, for response headers. For
    /// a request admitted from a lease: where they stood when its lease was taken
    /// (counting the whole lease as taken, against three quarters of each limit), so
    /// `remaining` errs low.
    #[must_use]
    pub fn rate_limits(&self) -> RateLimitStatus {
        match &self.kind {
            Kind::Remote(r) => RateLimitStatus {
                requests: r.tightest.requests.map(LimitWindow::from),
                tokens: r.tightest.tokens.map(LimitWindow::from),
            },
            Kind::Leased(s) => s.rate_limits(),
            Kind::Local(r) => r.rate_limits(),
        }
    }

    /// Send the commit: see [`RedisEngine::commit_usage`](crate::RedisEngine::commit_usage).
    pub(crate) fn commit(
        self,
        usage: Usage,
    ) -> impl Future<Output = Result<Receipt, Error>> + Send + 'static {
        let remote = match self.kind {
            Kind::Local(local) => {
                let receipt = local.commit(usage);
                return Detach::new(async move { Ok(receipt) });
            }
            Kind::Leased(share) => {
                let receipt = share.commit(usage);
                return Detach::new(async move { Ok(receipt) });
            }
            Kind::Remote(remote) => remote,
        };
        let admission = remote.admission;
        let used = Used::of(&admission, usage);
        let receipt = Receipt::new(used.cost, admission.ask.cost, usage);
        let sent = remote.send_commit(used, Some(usage));
        Detach::new(async move {
            match sent.await? {
                Landed::Yes => Ok(receipt),
                Landed::Queued => Ok(receipt.into_pending()),
            }
        })
    }

    /// Give a lease's whole hold back now (it served nothing); a release that fails
    /// transiently is retried in the background until Redis acknowledges it.
    pub(crate) async fn release_now(self) {
        let Kind::Remote(mut remote) = self.kind else {
            return;
        };
        remote.settled = true;
        remote.engine.renewals.forget(remote.renewal);
        if remote.metered {
            remote.snapshot.meters.released(remote.admission.route);
        }
        for group in 0..2 {
            background::release_now(&remote.engine, &remote.hold, group).await;
        }
    }

    /// Settle a lease's own hold: charge what its requests used together (`used`),
    /// give back the rest. Not metered: each of its requests was.
    pub(crate) fn settle(self, used: Used) -> impl Future<Output = Result<(), Error>> + Send {
        let sent = match self.kind {
            Kind::Remote(remote) => Some(remote.send_commit(used, None)),
            Kind::Leased(_) | Kind::Local(_) => None,
        };
        async move {
            match sent {
                Some(sent) => sent.await.map(drop),
                None => Ok(()),
            }
        }
    }
}

/// Whether a commit reached Redis, or is queued for replay after a transient error.
enum Landed {
    Yes,
    Queued,
}

impl Used {
    /// What `usage` of an admitted request costs at its model's prices.
    pub(crate) fn of(admission: &Admission, usage: Usage) -> Used {
        let input = u64::from(usage.input_tokens);
        let output = u64::from(usage.output_tokens);
        Used {
            cost: usage_cost(input, output, admission.input_price, admission.output_price),
            input_tokens: input,
            output_tokens: output,
            requests: 1,
        }
    }
}

impl Remote {
    /// Send the commit of `used`; `usage` is what the meters count (none for a lease).
    fn send_commit(mut self, used: Used, usage: Option<Usage>) -> Detach<Result<Landed, Error>> {
        self.settled = true;
        let inner = Arc::clone(&self.engine);
        inner.renewals.forget(self.renewal);
        let calls = calls::group_calls(&self.hold.groups, inner.together, |groups| {
            calls::commit(
                &self.snapshot,
                self.admission.route,
                groups,
                &self.hold.id,
                self.admission.ask,
                used,
                inner.ttls,
            )
        });
        let usage = usage.filter(|_| self.metered);
        let (snapshot, route) = (Arc::clone(&self.snapshot), self.admission.route);
        let commit = QueueOnDrop {
            inner: Arc::clone(&inner),
            commit: Some(PendingCommit {
                snapshot: Arc::clone(&self.snapshot),
                route: self.admission.route,
                hold: Arc::clone(&self.hold),
                calls,
                first_sent: Instant::now(),
            }),
        };
        Detach::new(async move {
            let mut commit = commit;
            let sent = commit.commit.as_ref().expect("not yet taken");
            let result = inner.run_commit(sent).await;
            let sent = commit.commit.take().expect("not yet taken");
            match result {
                Ok(()) => {
                    if let Some(usage) = usage {
                        snapshot.meters.committed(route, used.cost, usage);
                    }
                    // Redis answers again: replay what an outage left queued.
                    if !inner.pending.lock().is_empty() {
                        let inner = Arc::clone(&inner);
                        tokio::spawn(async move {
                            // A failure leaves them queued for the next attempt.
                            let _ = inner.flush_pending().await;
                        });
                    }
                    Ok(Landed::Yes)
                }
                Err(error) => {
                    let transient = error.is_transient();
                    inner.record_error(error.clone());
                    if transient {
                        // It may have landed; if not, the replay charges it, once.
                        if let Some(usage) = usage {
                            snapshot.meters.committed(route, used.cost, usage);
                        }
                        inner.pending.lock().push(sent);
                        Ok(Landed::Queued)
                    } else {
                        inner.failed_commits.fetch_add(1, Ordering::Relaxed);
                        if usage.is_some() {
                            snapshot.meters.released(route);
                        }
                        Err(Error::Store(error))
                    }
                }
            }
        })
    }
}

/// A commit in flight: queued for replay if its future is dropped before the store
/// answered (the runtime shut down under it), so it is never lost while the process
/// lives.
struct QueueOnDrop {
    inner: Arc<Inner>,
    commit: Option<PendingCommit>,
}

impl Drop for QueueOnDrop {
    fn drop(&mut self) {
        if let Some(commit) = self.commit.take() {
            self.inner.pending.lock().push(commit);
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.engine.renewals.forget(self.renewal);
        if self.metered {
            self.snapshot.meters.released(self.admission.route);
        }
        for group in 0..2 {
            background::release(&self.engine, &self.hold, group);
        }
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
