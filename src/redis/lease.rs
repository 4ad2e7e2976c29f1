//! Quota leasing (`RedisConfig::lease`, off by default): a busy key and model takes a
//! chunk of every limit and budget on its path from Redis in one reserve (a *lease*
//! of `n` requests' worst case), admits its next requests from that chunk in memory,
//! and settles them together in one commit, giving back what they did not use.
//!
//! What it keeps exact: nothing is ever admitted beyond a limit or budget (a lease is
//! a hold like any reservation's, and a request admitted from it fits inside it); the
//! books add up (the settle charges exactly what the lease's requests used); a
//! crashed instance's lease comes back within one reservation TTL.
//!
//! A chain's requests that arrive while its lease is being reserved wait for that
//! reserve (at most twice the response timeout) rather than each going to Redis.
//!
//! What it gives up, bounded: a lease's unused part is headroom that other instances
//! (and other keys of the same workspace or org) cannot use until it is settled, at
//! most `max_age` after it was taken plus the longest request it admitted. A lease
//! takes at most `1 / max_share` of any limit or budget, and only while every limit
//! and budget on its path keeps [`KEEP_PERCENT`] free, so near a limit every request
//! is decided by Redis one by one, exactly as without leasing. Spend and usage reach
//! Redis when a lease settles. A policy change (a revoked key, a lowered limit) stops
//! an instance's leases when that instance applies it (at once on the one that made
//! it, by pub/sub on the others), or when they end, whichever comes first; a request
//! decided by Redis sees a revocation's flag at once.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::decide::Admission;
use crate::redis::calls::{Take, Used};
use crate::redis::{Inner, RedisReservation};
use crate::request::Usage;
use crate::reservation::{RateLimitStatus, Receipt};
use crate::snapshot::{Route, Snapshot, LEVELS};
use crate::store::Ask;

/// Percent of every limit and budget a lease must leave free: the last quarter of
/// any limit is always decided request by request, exactly.
pub(crate) const KEEP_PERCENT: u8 = 25;

/// Settings of quota leasing (see [`RedisConfig::lease`](crate::RedisConfig::lease)).
///
/// ```
/// use std::time::Duration;
/// use tollgate::{LeaseConfig, RedisConfig};
///
/// // Leases that admit requests for half a second, each at most 1/64 of any limit.
/// let config = RedisConfig {
///     lease: Some(LeaseConfig {
///         max_age: Duration::from_millis(500),
///         max_share: 64.try_into().unwrap(),
///         ..LeaseConfig::default()
///     }),
///     ..RedisConfig::default()
/// };
/// # let _ = config;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The most requests one lease holds. A lease holds twice what the key and
    /// model's last lease served, or what the gap between its last two requests says
    /// would come in `max_age`, whichever is more, up to this. Default 64.
    pub max_requests: NonZeroU32,
    /// A lease holds at most `1 / max_share` of any limit or budget on its path (a
    /// key and model whose limits are too small for 2 requests' share is never
    /// leased). Default 32.
    pub max_share: NonZeroU32,
    /// How long a lease admits requests. It is settled when its last request ends.
    /// Only a key and model whose last two requests came within this is leased.
    /// Default 250 ms.
    pub max_age: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            max_requests: NonZeroU32::new(64).expect("not zero"),
            max_share: NonZeroU32::new(32).expect("not zero"),
            max_age: Duration::from_millis(250),
        }
    }
}

/// What to do with one request.
pub(crate) enum Leasing {
    /// Admitted from the chain's lease.
    Share(Share),
    /// Reserve a lease of this many requests for the chain (this request is its
    /// first), under an [`Acquiring`] guard made with this sender: the chain's other
    /// requests wait for it to be dropped.
    Acquire(u32, tokio::sync::watch::Sender<()>),
    /// A lease for the chain is being reserved: wait until this receiver's sender is
    /// gone (the lease installed or refused), then ask again, without waiting twice.
    Await(tokio::sync::watch::Receiver<()>),
    /// Reserve this request alone.
    Exact,
}

/// What became of a lease reserve that landed.
pub(crate) enum Installed {
    /// Installed for its chain: its first request's share.
    Share(Share),
    /// `close_leases` ran since the reserve started: release this hold; the request
    /// goes alone.
    Closed(RedisReservation),
}

/// One key and model.
type ChainId = (u32, u32);

/// Shards of an engine's chains.
const SHARDS: usize = 16;

#[derive(Default)]
struct Chain {
    /// The lease admitting requests now.
    lease: Option<Arc<Lease>>,
    /// A lease is being reserved: the chain's other requests wait for it (until the
    /// reserve's guard, which holds the sender, is dropped).
    acquiring: Option<tokio::sync::watch::Receiver<()>>,
    last_seen: Option<Instant>,
    /// Requests the last lease served: the next one holds twice as many.
    demand: u32,
    /// A lease was refused: none is tried again before this.
    quiet_until: Option<Instant>,
}

/// An engine's leases, one chain per key and model.
pub(crate) struct Leases {
    config: LeaseConfig,
    /// By key and model, in shards so instances' tasks on different keys rarely
    /// wait for one another.
    shards: Box<[Mutex<HashMap<ChainId, Chain>>]>,
    settler: Arc<Settler>,
    acquisitions: Mutex<Acquisitions>,
}

/// How often `close_leases` looks whether the lease reserves it waits for have ended.
const ACQUIRE_POLL: Duration = Duration::from_millis(2);

/// Lease reserves in flight, by the close epoch (`close_leases` calls so far) they
/// started in.
#[derive(Default)]
struct Acquisitions {
    epoch: u64,
    in_flight: std::collections::BTreeMap<u64, usize>,
}

impl Acquisitions {
    fn in_flight_since(&self, epoch: u64) -> bool {
        self.in_flight.range(..=epoch).any(|(_, n)| *n > 0)
    }
}

impl Leases {
    pub(crate) fn new(config: LeaseConfig, runtime: tokio::runtime::Handle) -> Self {
        Leases {
            config,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            settler: Arc::new(Settler {
                runtime,
                running: Mutex::default(),
            }),
            acquisitions: Mutex::default(),
        }
    }

    fn shard(&self, route: Route) -> parking_lot::MutexGuard<'_, HashMap<ChainId, Chain>> {
        // Keys are numbered in policy order: consecutive keys land in different shards.
        let at = (route.key as usize).wrapping_add(route.model as usize) % SHARDS;
        self.shards[at].lock()
    }

    /// Admit `admission` from its chain's lease, or say how to reserve it.
    /// `eligible`: no end user's level applies (leases hold the policy's levels only).
    /// `may_wait`: it may wait for a lease being reserved (not after it did once).
    pub(crate) fn admit(
        &self,
        snap: &Arc<Snapshot>,
        admission: &Admission,
        eligible: bool,
        may_wait: bool,
        now: Instant,
    ) -> Leasing {
        if !eligible {
            return Leasing::Exact;
        }
        let route = admission.route;
        let mut shard = self.shard(route);
        let chain = shard.entry((route.key, route.model)).or_default();
        // The gap since the chain's last request, if it came within a lease's
        // lifetime: how many requests a lease would see.
        let gap = chain
            .last_seen
            .map(|seen| now.saturating_duration_since(seen))
            .filter(|gap| *gap < self.config.max_age);
        chain.last_seen = Some(now);
        if let Some(lease) = &chain.lease {
            if Arc::ptr_eq(&lease.snapshot, snap)
                && now.saturating_duration_since(lease.born) < self.config.max_age
            {
                if let Some(share) = Share::take(lease, admission) {
                    return Leasing::Share(share);
                }
            }
            // Spent, too old, or taken under another policy: it admits no more, and
            // is settled when its last request ends.
            let lease = chain.lease.take().expect("checked above");
            chain.demand = lease.close();
        }
        // (A reserve whose guard never came to be, its sender dropped early, holds
        // nobody up.)
        if chain
            .acquiring
            .as_ref()
            .is_some_and(|acquiring| acquiring.has_changed().is_err())
        {
            chain.acquiring = None;
        }
        if let Some(acquiring) = &chain.acquiring {
            return if may_wait {
                Leasing::Await(acquiring.clone())
            } else {
                Leasing::Exact
            };
        }
        let quiet = chain.quiet_until.is_some_and(|until| now < until);
        let Some(gap) = gap else {
            return Leasing::Exact;
        };
        if quiet {
            return Leasing::Exact;
        }
        // Twice what the last lease served, or what the rate the gap shows would
        // bring in one lifetime, whichever is more.
        let by_rate = self.config.max_age.as_nanos() / gap.as_nanos().max(1);
        let want = chain
            .demand
            .max(1)
            .saturating_mul(2)
            .max(u32::try_from(by_rate).unwrap_or(u32::MAX));
        match lease_size(snap, route, admission.ask, self.config, want) {
            Some(n) => {
                let (done, waiting) = tokio::sync::watch::channel(());
                chain.acquiring = Some(waiting);
                Leasing::Acquire(n, done)
            }
            None => Leasing::Exact,
        }
    }

    /// The lease `reservation` holds `n` requests of `admission`'s worst case, taken
    /// under `snap` by a reserve started in close epoch `epoch`: install it, and admit
    /// its first request from it; or, if `close_leases` ran since the reserve started,
    /// hand it back (to be released: the request goes alone).
    fn install(
        &self,
        snap: &Arc<Snapshot>,
        admission: &Admission,
        n: u32,
        reservation: RedisReservation,
        epoch: u64,
    ) -> Installed {
        let route = admission.route;
        // Under the chain's shard lock: `close_all` moves the epoch on before it takes
        // each shard's lock, so a lease installed here is either seen by it or not
        // installed at all.
        let mut shard = self.shard(route);
        let chain = shard.entry((route.key, route.model)).or_default();
        chain.acquiring = None;
        if self.acquisitions.lock().epoch != epoch {
            return Installed::Closed(reservation);
        }
        let ask = admission.ask;
        let id = reservation.id().unwrap_or_default().to_owned();
        let lease = Arc::new(Lease {
            snapshot: Arc::clone(snap),
            born: Instant::now(),
            id,
            settler: Arc::clone(&self.settler),
            rate_limits: reservation.rate_limits(),
            state: Mutex::new(State {
                reservation: Some(reservation),
                free: Pool::times(ask, n),
                served: Used {
                    cost: 0,
                    input_tokens: 0,
                    output_tokens: 0,
                    requests: 0,
                },
                outstanding: 0,
                open: true,
            }),
        });
        let share = Share::take(&lease, admission).expect("a new lease fits its first request");
        if let Some(old) = chain.lease.replace(Arc::clone(&lease)) {
            old.close();
        }
        drop(shard);
        // Close it when its time is up, even if no request comes to see that.
        let max_age = self.config.max_age;
        let weak = Arc::downgrade(&lease);
        drop(self.settler.runtime.spawn(async move {
            tokio::time::sleep(max_age).await;
            if let Some(lease) = weak.upgrade() {
                lease.close();
            }
        }));
        Installed::Share(share)
    }

    /// The chain's lease was refused (or failed): its requests go one by one for a
    /// while.
    fn refused(&self, route: Route) {
        let mut shard = self.shard(route);
        let chain = shard.entry((route.key, route.model)).or_default();
        chain.acquiring = None;
        chain.demand = 1;
        chain.quiet_until = Some(Instant::now() + self.config.max_age);
    }

    /// Stop every lease admitting requests (each is settled when its last request
    /// ends: at once for those with none in flight); wait for the lease reserves
    /// already in flight (one that lands now is released, not installed), then for
    /// every settle running, whoever started it.
    pub(crate) async fn close_all(&self) {
        let before = {
            let mut acquisitions = self.acquisitions.lock();
            acquisitions.epoch += 1;
            acquisitions.epoch - 1
        };
        for shard in &*self.shards {
            for chain in shard.lock().values_mut() {
                if let Some(lease) = chain.lease.take() {
                    chain.demand = lease.close();
                }
            }
        }
        // A reserve ends within its response timeouts; a hold it took is released
        // before it counts as ended.
        while self.acquisitions.lock().in_flight_since(before) {
            tokio::time::sleep(ACQUIRE_POLL).await;
        }
        self.settler.wait().await;
    }
}

/// A chain reserving a lease: see [`Leases::acquiring`].
///
/// It owns what it needs, so it can go with the lease's reserve into the task that
/// finishes it when the caller went away: a lease that lands is installed for the
/// chain's next requests even then. Dropped without installing one (refused, failed),
/// it sends the chain's requests one by one for a while.
pub(crate) struct Acquiring {
    inner: Arc<Inner>,
    route: Route,
    /// The close epoch it started in.
    epoch: u64,
    installed: bool,
    /// Dropped with the guard: wakes the chain's requests waiting for this lease.
    _done: tokio::sync::watch::Sender<()>,
}

impl Acquiring {
    /// The chain of `route` of `inner` (which leases) starts reserving a lease;
    /// `done` is the sender [`Leasing::Acquire`] gave.
    pub(crate) fn new(
        inner: Arc<Inner>,
        route: Route,
        done: tokio::sync::watch::Sender<()>,
    ) -> Self {
        let leases = inner
            .leases
            .as_ref()
            .expect("only an engine that leases acquires leases");
        let epoch = {
            let mut acquisitions = leases.acquisitions.lock();
            let epoch = acquisitions.epoch;
            *acquisitions.in_flight.entry(epoch).or_default() += 1;
            epoch
        };
        Acquiring {
            inner,
            route,
            epoch,
            installed: false,
            _done: done,
        }
    }

    fn leases(&self) -> &Leases {
        self.inner
            .leases
            .as_ref()
            .expect("only an engine that leases acquires leases")
    }

    /// The lease was reserved: see [`Leases::install`]. A lease handed back (leases
    /// were closed meanwhile) must be released before this guard is dropped, so that
    /// `close_leases` waits for it.
    pub(crate) fn install(
        &mut self,
        snap: &Arc<Snapshot>,
        admission: &Admission,
        n: u32,
        reservation: RedisReservation,
    ) -> Installed {
        self.installed = true;
        self.leases()
            .install(snap, admission, n, reservation, self.epoch)
    }
}

impl Drop for Acquiring {
    fn drop(&mut self) {
        let leases = self.leases();
        if !self.installed {
            leases.refused(self.route);
        }
        let mut acquisitions = leases.acquisitions.lock();
        if let Some(n) = acquisitions.in_flight.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                acquisitions.in_flight.remove(&self.epoch);
            }
        }
    }
}

/// The requests a lease of `want` requests of `ask` may hold on `route`'s levels: at
/// most `1 / max_share` of each limit and budget; `None` below 2 (or when a level
/// limits concurrency: a lease would hold that many slots).
fn lease_size(
    snap: &Snapshot,
    route: Route,
    ask: Ask,
    config: LeaseConfig,
    want: u32,
) -> Option<u32> {
    let share = u64::from(config.max_share.get());
    let mut n = u64::from(want.min(config.max_requests.get()));
    for level in 0..LEVELS {
        let Some(rules) = snap.level(level, route).rules else {
            continue;
        };
        if rules.max_concurrent.is_some() {
            return None;
        }
        for rate in [&rules.rpm, &rules.rpd].into_iter().flatten() {
            n = n.min(rate.limit / share);
        }
        if let Some(tpm) = &rules.tpm {
            let units = tpm.counts.pick(ask.input_tokens, ask.output_tokens);
            if let Some(fit) = (tpm.rate.limit / share).checked_div(units) {
                n = n.min(fit);
            }
        }
        for budget in rules.budgets().filter(|b| !b.soft) {
            let cost = u64::try_from(ask.cost).unwrap_or(0);
            let limit = u64::try_from(budget.limit).unwrap_or(0);
            if let Some(fit) = (limit / share).checked_div(cost) {
                n = n.min(fit);
            }
        }
    }
    (n >= 2).then(|| u32::try_from(n).unwrap_or(u32::MAX))
}

/// The worst case of `n` requests of `ask`, as one reserve's ask and take; `None` if
/// it does not fit the integers it is sent as.
pub(crate) fn lease_ask(ask: Ask, n: u32) -> Option<(Ask, Take)> {
    let ask = Ask {
        input_tokens: ask.input_tokens.checked_mul(u64::from(n))?,
        output_tokens: ask.output_tokens.checked_mul(u64::from(n))?,
        cost: ask.cost.checked_mul(i64::from(n))?,
    };
    Some((
        ask,
        Take {
            requests: n,
            keep: KEEP_PERCENT,
        },
    ))
}

/// What a lease has left to admit from: its hold less its requests' worst cases in
/// flight and what its settled requests used (which may exceed their worst case:
/// then less is left, never more).
#[derive(Clone, Copy, Debug)]
struct Pool {
    requests: i128,
    input_tokens: i128,
    output_tokens: i128,
    cost: i128,
}

impl Pool {
    fn times(ask: Ask, n: u32) -> Pool {
        let n = i128::from(n);
        Pool {
            requests: n,
            input_tokens: i128::from(ask.input_tokens) * n,
            output_tokens: i128::from(ask.output_tokens) * n,
            cost: i128::from(ask.cost) * n,
        }
    }

    fn fits(&self, ask: Ask) -> bool {
        self.requests >= 1
            && self.input_tokens >= i128::from(ask.input_tokens)
            && self.output_tokens >= i128::from(ask.output_tokens)
            && self.cost >= i128::from(ask.cost)
    }

    /// `sign` 1 gives `ask` back, -1 takes it.
    fn add(&mut self, ask: Ask, sign: i128) {
        self.input_tokens += sign * i128::from(ask.input_tokens);
        self.output_tokens += sign * i128::from(ask.output_tokens);
        self.cost += sign * i128::from(ask.cost);
    }
}

struct State {
    /// The hold in Redis, until the lease is settled.
    reservation: Option<RedisReservation>,
    free: Pool,
    /// What its committed requests used, together.
    served: Used,
    /// Its requests admitted and not yet committed or dropped.
    outstanding: u32,
    /// Still admitting requests.
    open: bool,
}

/// One lease: a reservation of several requests' worst case.
pub(crate) struct Lease {
    snapshot: Arc<Snapshot>,
    born: Instant,
    id: String,
    settler: Arc<Settler>,
    /// Where the tightest limits stood when it was taken.
    rate_limits: RateLimitStatus,
    state: Mutex<State>,
}

impl Lease {
    /// Admit no more; settle now if nothing is in flight. Returns the requests it
    /// served so far (the next lease's demand).
    fn close(&self) -> u32 {
        let mut state = self.state.lock();
        state.open = false;
        self.settle_if_done(&mut state);
        state.served.requests
    }

    /// Start the settle of a closed lease with nothing in flight, once. Started (and
    /// registered with the settler) before the state's lock is let go, so whoever
    /// finds the lease settled next also finds its settle to wait for.
    fn settle_if_done(&self, state: &mut State) {
        if state.open || state.outstanding > 0 {
            return;
        }
        if let Some(reservation) = state.reservation.take() {
            self.settler.start(Settle {
                reservation,
                served: state.served,
            });
        }
    }

    /// One of its requests ended: `used` if it was committed, `None` if dropped.
    fn finish(&self, ask: Ask, used: Option<Used>) {
        let mut state = self.state.lock();
        state.outstanding -= 1;
        state.free.add(ask, 1);
        match used {
            Some(used) => {
                state.free.add(
                    Ask {
                        input_tokens: used.input_tokens,
                        output_tokens: used.output_tokens,
                        cost: used.cost,
                    },
                    -1,
                );
                let served = &mut state.served;
                served.requests += 1;
                served.cost = served.cost.saturating_add(used.cost);
                served.input_tokens = served.input_tokens.saturating_add(used.input_tokens);
                served.output_tokens = served.output_tokens.saturating_add(used.output_tokens);
            }
            None => state.free.requests += 1,
        }
        self.settle_if_done(&mut state);
    }
}

/// Runs settles on the runtime the engine was connected on, and keeps track of them so
/// that `close_leases` can wait for every one.
struct Settler {
    runtime: tokio::runtime::Handle,
    running: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Settler {
    fn start(&self, settle: Settle) {
        let task = settle.run(&self.runtime);
        let mut running = self.running.lock();
        running.retain(|task| !task.is_finished());
        running.push(task);
    }

    /// Until no settle is running (those started meanwhile too).
    async fn wait(&self) {
        loop {
            let running = std::mem::take(&mut *self.running.lock());
            if running.is_empty() {
                return;
            }
            for task in running {
                // A settle task that panicked or was cancelled has nothing to report.
                let _ = task.await;
            }
        }
    }
}

/// A lease's settle: one commit of what its requests used, the rest given back.
struct Settle {
    reservation: RedisReservation,
    served: Used,
}

impl Settle {
    fn run(self, runtime: &tokio::runtime::Handle) -> tokio::task::JoinHandle<()> {
        let Settle {
            reservation,
            served,
        } = self;
        runtime.spawn(async move {
            if served.requests == 0 {
                // Nothing served: the whole hold goes back (retried in the background
                // until Redis acknowledges it, if it fails now).
                reservation.release_now().await;
            } else {
                // A transient failure queues it for replay; a permanent one is counted
                // in `failed_commits`.
                let _ = reservation.settle(served).await;
            }
        })
    }
}

/// One request admitted from a lease.
pub(crate) struct Share {
    lease: Arc<Lease>,
    admission: Admission,
    ended: bool,
}

impl Share {
    fn take(lease: &Arc<Lease>, admission: &Admission) -> Option<Share> {
        let mut state = lease.state.lock();
        if !state.open || !state.free.fits(admission.ask) {
            return None;
        }
        state.free.requests -= 1;
        state.free.add(admission.ask, -1);
        state.outstanding += 1;
        drop(state);
        lease.snapshot.meters.held(admission.route);
        Some(Share {
            lease: Arc::clone(lease),
            admission: *admission,
            ended: false,
        })
    }

    pub(crate) fn lease_id(&self) -> &str {
        &self.lease.id
    }

    pub(crate) fn snapshot(&self) -> &Snapshot {
        &self.lease.snapshot
    }

    pub(crate) fn admission(&self) -> &Admission {
        &self.admission
    }

    pub(crate) fn rate_limits(&self) -> RateLimitStatus {
        self.lease.rate_limits
    }

    /// Count what the request used against its lease; the receipt at once (the charge
    /// reaches Redis when the lease settles).
    pub(crate) fn commit(mut self, usage: Usage) -> Receipt {
        self.ended = true;
        let used = Used::of(&self.admission, usage);
        self.lease
            .snapshot
            .meters
            .committed(self.admission.route, used.cost, usage);
        self.lease.finish(self.admission.ask, Some(used));
        Receipt::new(used.cost, self.admission.ask.cost, usage)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if !self.ended {
            self.lease.snapshot.meters.released(self.admission.route);
            self.lease.finish(self.admission.ask, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_admits_what_fits_and_gets_back_what_was_not_used() {
        let ask = Ask {
            input_tokens: 100,
            output_tokens: 50,
            cost: 1_000,
        };
        let mut pool = Pool::times(ask, 2);
        assert!(pool.fits(ask));
        pool.requests -= 1;
        pool.add(ask, -1);
        assert!(pool.fits(ask));
        pool.requests -= 1;
        pool.add(ask, -1);
        assert!(!pool.fits(ask), "two requests' worst case is all it holds");
        // The first used more output than it held: less is left, not more.
        pool.add(ask, 1);
        pool.add(
            Ask {
                input_tokens: 100,
                output_tokens: 80,
                cost: 1_200,
            },
            -1,
        );
        pool.requests += 1; // (a dropped request gives its request back)
        assert!(!pool.fits(ask));
    }

    #[test]
    fn a_lease_ask_that_overflows_is_not_taken() {
        let ask = Ask {
            input_tokens: u64::MAX / 2,
            output_tokens: 1,
            cost: 1,
        };
        assert!(lease_ask(ask, 3).is_none());
        let (scaled, take) = lease_ask(
            Ask {
                input_tokens: 10,
                output_tokens: 20,
                cost: 30,
            },
            4,
        )
        .expect("fits");
        assert_eq!(
            (scaled.input_tokens, scaled.output_tokens, scaled.cost),
            (40, 80, 120)
        );
        assert_eq!(take.requests, 4);
        assert_eq!(take.keep, KEEP_PERCENT);
    }
}
