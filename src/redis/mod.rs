//! The Redis backend (feature `redis`): every counter in Redis, so all gateway
//! instances enforce the same limits and budgets.
//!
//! A request resolves its key, workspace and model locally, exactly as the in-memory
//! engine does (`decide`), then reserves with the library in `scripts/tollgate.lua`:
//! the workspace's levels (key, workspace, workspace × model) under `{ws:<id>}`, the
//! org's budget and wallet under `{org:<id>}`. A standalone server takes both groups
//! in one function call, all or nothing, and `coalesce` batches an instance's
//! concurrent requests into shared calls. A cluster needs one call per hash tag: the
//! two go out together on one multiplexed connection (one round trip of latency), each
//! atomic on its own shard; if one group refuses, the other's hold is released, and in
//! between it only over-holds, which can refuse a request but never overspend.
//! See `keys` for the layout, and `background` for what happens when a caller goes
//! away mid-call (store calls finish detached, releases are retried, live holds are
//! renewed).

mod background;
mod calls;
mod coalesce;
pub(crate) mod conn;
mod control;
pub(crate) mod error;
pub(crate) mod fallback;
pub(crate) mod keys;
mod lease;
mod policy_sync;
mod reservation;
pub(crate) mod scripts;
mod usage;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use redis::aio::ConnectionManagerConfig;
use redis::cluster::ClusterClientBuilder;
use redis::Value;

use crate::clock::{Clock, Timestamp};
use crate::decide::{admit, denial, refused, Admission};
use crate::denial::{Denial, DenialReason, Error, Scope, StoreError, StoreErrorKind};
use crate::end_users::END_USER_LEVEL;
use crate::engine::{BudgetStatus, Engine};
use crate::events::{EventSink, Events};
use crate::policy::{Policy, StoreFailureMode};
use crate::policy_store::redis as policy_store;
use crate::request::{Request, Usage};
use crate::reservation::Receipt;
use crate::snapshot::{Route, Snapshot, WALLET_LEVEL};
use crate::store::Tightest;
use crate::telemetry::{MeterSource, StoreMeters};

use background::{Detach, Hold, Renewals};
use calls::{Call, GroupCall, Reserved, Take, Ttls};
use coalesce::{Coalescer, Failed};
use conn::Connection;
use error::classify;
use keys::Layout;
use lease::{lease_ask, Acquiring, Installed, Leases, Leasing};
use scripts::Function;

pub use lease::LeaseConfig;
pub use reservation::RedisReservation;

/// Settings of a [`RedisEngine`]. Every field has a production default.
#[derive(Clone)]
pub struct RedisConfig {
    /// Prepended to every key, so deployments can share a server. Default `tollgate`.
    pub prefix: String,
    /// How long a hold lasts in Redis without renewal. A live reservation renews its
    /// holds every third of this (so a stream of any length keeps them), and a dropped
    /// one is released at once: this only bounds how long a crashed or partitioned
    /// instance's holds keep blocking limits and budgets. Default 30 s.
    pub reservation_ttl: Duration,
    /// Idle counters expire after this (never within two budget periods, and the
    /// wallet never). Default 40 days.
    pub idle_ttl: Duration,
    /// How long a commit is remembered so a retried one charges nothing. Default 24 h.
    /// A commit queued after a transient error is replayed only within half of this
    /// since it was first sent (so its marker, if it landed, is still there); an older
    /// one is dropped and counted by [`RedisEngine::dropped_commits`].
    pub commit_marker_ttl: Duration,
    /// Gateway instances sharing the limits: a fail-open workspace's local limiter
    /// gets `1 / expected_instances` of every limit and budget. Default 1.
    pub expected_instances: NonZeroU32,
    /// A call that takes longer fails as transient. Default 500 ms.
    pub response_timeout: Duration,
    /// A connection attempt that takes longer fails as transient. Default 250 ms.
    pub connection_timeout: Duration,
    /// Batch this instance's concurrent reserves (and commits) into one function call
    /// on a standalone server (a cluster always sends one call per hash tag and
    /// request). A lone request is sent at once; under load one call serves up to 32,
    /// each decided exactly, in order, as separate calls would be. Default `true`.
    pub coalesce: bool,
    /// Quota leasing, off by default (`None`): a key and model with requests coming
    /// close together takes a chunk of every limit and budget on its path in one call
    /// and admits its next requests from it in memory, settling them together in one
    /// commit; see [`LeaseConfig`]. It trades exactness away from limits (a chunk one
    /// instance holds is headroom others cannot use until it is settled, at most
    /// `max_age` plus its longest request later) for about one Redis call per lease
    /// instead of two per request. Near a limit (the last quarter of any limit or
    /// budget) requests are decided one by one, as without it.
    pub lease: Option<LeaseConfig>,
    /// The status budget and wallet denials answer with.
    pub budget_status: BudgetStatus,
    /// Where events go (budget alerts, key and workspace changes, sampled denials).
    /// Budget alerts fire once per threshold per period across all instances; a
    /// policy change is reported once, by the instance that made it.
    pub events: Option<Arc<dyn EventSink>>,
    /// How often an instance checks Redis for a new policy version when no
    /// announcement arrives (announcements come by pub/sub at once; this is the
    /// fallback when the subscription is down, and the only way on a cluster).
    /// Default 500 ms, so a change reaches every instance within a second.
    pub policy_poll_interval: Duration,
    /// Record metrics (feature `metrics`) with this recorder rather than the global
    /// one (see `EngineBuilder::metrics_recorder`).
    #[cfg(feature = "metrics")]
    pub metrics_recorder: Option<Arc<dyn metrics::Recorder + Send + Sync>>,
}

impl RedisConfig {
    fn meter_source(&self) -> MeterSource {
        #[cfg(feature = "metrics")]
        return MeterSource(self.metrics_recorder.clone());
        #[cfg(not(feature = "metrics"))]
        MeterSource::default()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            prefix: "tollgate".to_owned(),
            reservation_ttl: Duration::from_secs(30),
            idle_ttl: Duration::from_secs(40 * 86_400),
            commit_marker_ttl: Duration::from_secs(86_400),
            expected_instances: NonZeroU32::MIN,
            response_timeout: Duration::from_millis(500),
            connection_timeout: Duration::from_millis(250),
            coalesce: true,
            lease: None,
            budget_status: BudgetStatus::default(),
            events: None,
            policy_poll_interval: Duration::from_millis(500),
            #[cfg(feature = "metrics")]
            metrics_recorder: None,
        }
    }
}

/// Enforces a policy with counters in Redis, shared by every instance connected to
/// the same server or cluster. Same decisions, [`Denial`]s and [`Receipt`]s as the
/// in-memory [`Engine`]; async, on tokio.
///
/// Cheap to clone: clones share the connection.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tollgate::{Policy, RedisConfig, RedisEngine, Request, Usage};
///
/// let policy = Policy::from_path("policy.toml")?;
/// let engine = RedisEngine::connect("redis://127.0.0.1:6379/", policy, RedisConfig::default()).await?;
/// let request = Request::with_secret("sk-live-abc", "gpt-4o-mini").input_tokens(900);
/// match engine.check_and_reserve(&request).await {
///     Ok(reservation) => {
///         let receipt = engine.commit_usage(reservation, Usage::new(900, 312)).await?;
///         println!("cost ${}", receipt.cost());
///     }
///     Err(denial) => println!("{} {denial}", denial.http_status()),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisEngine {
    inner: Arc<Inner>,
    /// Counts the handles (clones) of this engine: background tasks hold `inner`
    /// only, and renewals stop when the last handle is gone.
    _handle: Arc<()>,
}

pub(crate) struct Inner {
    connection: Connection,
    /// A standalone server: a request's groups (workspace and org tags) go in one
    /// function call. A cluster needs one call per group (see [`calls::GroupCall`]).
    together: bool,
    /// Batches concurrent reserves and commits (standalone servers, see
    /// [`RedisConfig::coalesce`]).
    coalescer: Option<Arc<Coalescer>>,
    /// This instance's leases (see [`RedisConfig::lease`]).
    leases: Option<Leases>,
    layout: Layout,
    ttls: Ttls,
    config: RedisConfig,
    clock: Arc<dyn Clock>,
    snapshot: ArcSwap<Snapshot>,
    /// This instance's share of the policy, for workspaces that fail open.
    fallback: ArcSwap<Option<Engine>>,
    /// Serialises policy changes and the applying of versions read from Redis (held
    /// across their Redis calls).
    apply_lock: tokio::sync::Mutex<()>,
    /// The version of the shared policy document this instance runs (`snapshot`),
    /// for lock-free reads; `running` has it with its digest.
    policy_version: AtomicU64,
    running: Mutex<policy_store::Stamp>,
    /// Announces each version this instance applies.
    versions: tokio::sync::watch::Sender<u64>,
    /// Commits that failed with a transient error, retried by `flush_pending`.
    pending: Mutex<Vec<PendingCommit>>,
    last_error: Mutex<Option<StoreError>>,
    failed_commits: AtomicU64,
    dropped_commits: AtomicU64,
    instance: u64,
    sequence: AtomicU64,
    /// Counts the engine's handles (`RedisEngine::_handle`).
    handles: Weak<()>,
    /// Live reservations, whose holds are renewed.
    renewals: Renewals,
    /// Releases being retried in the background.
    releases_in_flight: AtomicUsize,
    /// Store errors and call latency (feature `metrics`).
    store_meters: StoreMeters,
}

/// A commit that Redis has not acknowledged: its calls (one, or one per group on a
/// cluster), replayable because commits are idempotent by reservation id.
pub(crate) struct PendingCommit {
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) route: Route,
    pub(crate) hold: Arc<Hold>,
    pub(crate) calls: Vec<GroupCall>,
    /// When the commit was first sent: it cannot have landed (and set its commit
    /// marker) before.
    pub(crate) first_sent: Instant,
}

impl RedisEngine {
    /// Connect to one Redis server (`redis://host:port/db`). The connection
    /// reconnects by itself after failures.
    ///
    /// The engine runs the policy stored in Redis, shared by every instance on the
    /// same server and prefix; `policy` only seeds a Redis that holds none yet (it
    /// becomes version 1). Changes made through any instance reach this one by
    /// pub/sub, or by polling every `policy_poll_interval` (see the README's "Where
    /// the truth of the policy lives").
    ///
    /// # Errors
    /// [`Error::Store`] if the URL is invalid or the server cannot be reached now.
    pub async fn connect(url: &str, policy: Policy, config: RedisConfig) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(|e| classify("connect", &e))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(config.connection_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let manager =
            redis::aio::ConnectionManager::new_with_config(client.clone(), manager_config)
                .await
                .map_err(|e| classify("connect", &e))?;
        Self::start(Connection::Single(manager), Some(client), policy, config).await
    }

    /// Connect to a Redis Cluster through any of its nodes. The policy is shared as
    /// with [`RedisEngine::connect`]; on a cluster, new versions are found by polling
    /// only.
    ///
    /// # Errors
    /// [`Error::Store`] if the URLs are invalid or no node can be reached now.
    pub async fn connect_cluster(
        urls: &[String],
        policy: Policy,
        config: RedisConfig,
    ) -> Result<Self, Error> {
        let client = ClusterClientBuilder::new(urls.to_vec())
            .connection_timeout(config.connection_timeout)
            .response_timeout(config.response_timeout)
            .retries(2)
            .build()
            .map_err(|e| classify("connect", &e))?;
        let connection = client
            .get_async_connection()
            .await
            .map_err(|e| classify("connect", &e))?;
        // No subscription on a cluster: instances poll for new policy versions.
        Self::start(Connection::Cluster(connection), None, policy, config).await
    }

    /// Load the function library (so the first request does not pay for it, and a
    /// server older than Redis 7 is refused now, by name), align the clock to Redis
    /// `TIME`, load the shared policy (or seed it with `policy`), then start and
    /// follow the policy's new versions.
    async fn start(
        mut connection: Connection,
        subscriber: Option<redis::Client>,
        policy: Policy,
        config: RedisConfig,
    ) -> Result<Self, Error> {
        scripts::load(&mut connection).await.map_err(|error| {
            if error.message.contains("unknown command") {
                Error::Store(StoreError {
                    message: format!(
                        "tollgate needs Redis 7.0 or later (Redis Functions): {}",
                        error.message
                    ),
                    ..error
                })
            } else {
                Error::Store(error)
            }
        })?;
        let clock = policy_sync::redis_clock(&mut connection).await?;
        let layout = Layout::new(&config.prefix);
        let (stamp, policy) = policy_sync::load_or_seed(&mut connection, &layout, policy).await?;
        let engine = Self::started(connection, policy, stamp, clock, config);
        policy_sync::follow(&engine.inner, subscriber).await;
        Ok(engine)
    }

    fn started(
        connection: Connection,
        policy: Policy,
        stamp: policy_store::Stamp,
        clock: Arc<dyn Clock>,
        config: RedisConfig,
    ) -> Self {
        let version = stamp.version;
        let config_ttl = config.reservation_ttl;
        let fallback =
            fallback::local_share(&policy, config.expected_instances, config.meter_source());
        let mut snapshot = Snapshot::build(policy, None, Arc::clone(&clock));
        snapshot.set_meter_source(config.meter_source());
        let store_meters = StoreMeters::register(&config.meter_source(), &Function::NAMES);
        snapshot.events = config
            .events
            .clone()
            .map(|sink| Arc::new(Events::new(sink)));
        let handle = Arc::new(());
        RedisEngine {
            inner: Arc::new(Inner {
                together: matches!(connection, Connection::Single(_)),
                coalescer: (config.coalesce && matches!(connection, Connection::Single(_))).then(
                    || {
                        Coalescer::new(
                            connection.clone(),
                            tokio::runtime::Handle::current(),
                            config.response_timeout,
                        )
                    },
                ),
                leases: config
                    .lease
                    .map(|lease| Leases::new(lease, tokio::runtime::Handle::current())),
                connection,
                layout: Layout::new(&config.prefix),
                ttls: Ttls::new(
                    config.reservation_ttl,
                    config.idle_ttl,
                    config.commit_marker_ttl,
                ),
                config,
                clock,
                snapshot: ArcSwap::from_pointee(snapshot),
                fallback: ArcSwap::from_pointee(fallback),
                apply_lock: tokio::sync::Mutex::new(()),
                policy_version: AtomicU64::new(version),
                running: Mutex::new(stamp),
                versions: tokio::sync::watch::Sender::new(version),
                pending: Mutex::new(Vec::new()),
                last_error: Mutex::new(None),
                failed_commits: AtomicU64::new(0),
                dropped_commits: AtomicU64::new(0),
                instance: instance_id(),
                sequence: AtomicU64::new(0),
                handles: Arc::downgrade(&handle),
                renewals: Renewals::new(config_ttl),
                releases_in_flight: AtomicUsize::new(0),
                store_meters,
            }),
            _handle: handle,
        }
    }

    /// May this key call this model now? If so, hold the request's worst case on every
    /// level in Redis, all or nothing. One round trip.
    ///
    /// Cancellation-safe: dropped at any point (a client that hangs up, a timeout
    /// around it), it leaves nothing held. Once the scripts are sent they run to their
    /// end in a spawned task, and a reservation that lands with nobody waiting for it
    /// is released there. A reserve whose reply is lost (a response timeout, a dropped
    /// connection) may still have landed: it is released in the background too.
    ///
    /// # Errors
    /// A [`Denial`] naming the scope and limit that refused, or
    /// [`DenialReason::StoreUnavailable`] when Redis failed and the workspace fails
    /// closed (a fail-open workspace is admitted by its local limiter instead).
    pub async fn check_and_reserve(
        &self,
        request: &Request<'_>,
    ) -> Result<RedisReservation, Denial> {
        let mut snap = self.inner.snapshot.load_full();
        let now = self.inner.clock.now();
        if now.as_unix_nanos() >= snap.next_change {
            snap = self.put_temporary_in_force(snap, now);
        }
        let result = self.reserve(&snap, request, now).await;
        if let (Err(denial), Some(events)) = (&result, &snap.events) {
            events.denied(denial, now);
        }
        result
    }

    /// A temporary override has started or ended: run a snapshot with the rules in
    /// force now. The reserve carries them to Redis, where each scope's buckets are
    /// re-expressed in the changed limit by the next reserve that touches that scope
    /// (not at the override's end itself, as in memory: Redis has no timer). Skipped
    /// while a policy change is being applied: the snapshot it installs is built at
    /// its own time.
    #[cold]
    fn put_temporary_in_force(&self, snap: Arc<Snapshot>, now: Timestamp) -> Arc<Snapshot> {
        let Ok(_writer) = self.inner.apply_lock.try_lock() else {
            return snap;
        };
        let mut current = self.inner.snapshot.load_full();
        // As of each override's end, in order, as the in-memory engine does.
        while now.as_unix_nanos() >= current.next_change {
            let next = Arc::new(current.at_next_change());
            self.inner.snapshot.store(Arc::clone(&next));
            current = next;
        }
        current
    }

    /// The snapshot in force now, with any override that has ended put out of force.
    pub(crate) fn snapshot_now(&self) -> Arc<Snapshot> {
        let snap = self.inner.snapshot.load_full();
        let now = self.inner.clock.now();
        if now.as_unix_nanos() >= snap.next_change {
            return self.put_temporary_in_force(snap, now);
        }
        snap
    }

    async fn reserve(
        &self,
        snap: &Arc<Snapshot>,
        request: &Request<'_>,
        now: Timestamp,
    ) -> Result<RedisReservation, Denial> {
        let inner = &self.inner;
        let status = inner.config.budget_status.code();
        // Metered and traced here, not by the caller: a fail-open workspace's local
        // limiter meters its own admissions and denials.
        let counted = |denial: Denial| {
            crate::telemetry::denied(&snap.meters, &denial);
            denial
        };
        let admission = admit(snap, request, now, status).map_err(counted)?;
        // The end user's hash, when its level applies (a request without one is not
        // limited at that level).
        let workspace = &snap.policy.workspaces[admission.route.workspace as usize];
        let end_user = request
            .end_user
            .filter(|_| workspace.end_users.is_some())
            .map(|id| inner.layout.end_user(&workspace.id, id));
        let mut outcome = None;
        if let Some(leases) = &inner.leases {
            let mut may_wait = true;
            loop {
                let eligible = end_user.is_none();
                match leases.admit(snap, &admission, eligible, may_wait, Instant::now()) {
                    Leasing::Share(share) => {
                        snap.meters.admitted(admission.route);
                        return Ok(RedisReservation::leased(share));
                    }
                    Leasing::Acquire(n, done) => {
                        outcome = self.acquire_lease(snap, admission, n, done, now).await;
                        break;
                    }
                    Leasing::Await(mut reserving) => {
                        // As long as that reserve may take (queued, then sent); then
                        // this request goes alone.
                        let patience = inner.config.response_timeout.saturating_mul(2);
                        let _ = tokio::time::timeout(patience, reserving.changed()).await;
                        may_wait = false;
                    }
                    Leasing::Exact => break,
                }
            }
        }
        let outcome = match outcome {
            Some(outcome) => outcome,
            None => {
                let remote = Inner::reserve(
                    Arc::clone(inner),
                    Arc::clone(snap),
                    admission,
                    end_user,
                    now,
                    Take::ONE,
                );
                Detach::new(remote).await
            }
        };
        match outcome {
            Reserve::Admitted(reservation) => {
                snap.meters.admitted(admission.route);
                Ok(reservation)
            }
            Reserve::Denied(denial) => Err(counted(denial)),
            Reserve::Failed(kind) => {
                let workspace = &snap.policy.workspaces[admission.route.workspace as usize];
                if kind == StoreErrorKind::Transient
                    && workspace.on_store_error == StoreFailureMode::Open
                {
                    if let Some(local) = inner.fallback.load().as_ref() {
                        let local = local.check_and_reserve(request);
                        if local.is_ok() {
                            snap.meters.fail_open(admission.route);
                            crate::telemetry::fail_open(&workspace.id);
                        }
                        return local.map(RedisReservation::local);
                    }
                }
                Err(counted(denial(
                    DenialReason::StoreUnavailable(kind),
                    Scope::Workspace,
                    status,
                )))
            }
        }
    }

    /// Reserve a lease of `n` requests for `admission`'s key and model, and admit
    /// this request from it. `None` if the lease was refused (the request is then
    /// reserved alone); a failure of Redis is the request's. If the caller goes away
    /// meanwhile, a lease that lands is still installed (its first request given back
    /// to it).
    async fn acquire_lease(
        &self,
        snap: &Arc<Snapshot>,
        admission: Admission,
        n: u32,
        done: tokio::sync::watch::Sender<()>,
        now: Timestamp,
    ) -> Option<Reserve> {
        let mut acquiring = Acquiring::new(Arc::clone(&self.inner), admission.route, done);
        let (ask, take) = lease_ask(admission.ask, n)?;
        let (inner, snap) = (Arc::clone(&self.inner), Arc::clone(snap));
        let (outcome, acquiring) = Detach::new(async move {
            let leased = Admission { ask, ..admission };
            let reserve = Inner::reserve(inner, Arc::clone(&snap), leased, None, now, take);
            let outcome = match reserve.await {
                Reserve::Admitted(reservation) => {
                    match acquiring.install(&snap, &admission, n, reservation) {
                        Installed::Share(share) => {
                            Some(Reserve::Admitted(RedisReservation::leased(share)))
                        }
                        Installed::Closed(closed) => {
                            closed.release_now().await;
                            None
                        }
                    }
                }
                Reserve::Denied(_) => None,
                Reserve::Failed(kind) => Some(Reserve::Failed(kind)),
            };
            // The guard goes with the outcome: when nobody waits for it, the first
            // request's share is dropped (and a settle it starts registered) before
            // the guard tells `close_leases` this reserve has ended.
            (outcome, acquiring)
        })
        .await;
        drop(acquiring);
        outcome
    }

    /// Stop this instance's leases admitting requests (see [`RedisConfig::lease`]),
    /// and settle them: those with no request in flight now, the others when their
    /// last request ends. Waits for every settle running (these and any started
    /// before). Call it before shutting down, once requests have drained, so the
    /// unused part of every lease is given back rather than held until its TTL and
    /// what its requests used is charged. A settle that fails transiently is queued
    /// like a commit ([`RedisEngine::flush_pending`]). Requests after it may take new
    /// leases. A no-op without leasing.
    pub async fn close_leases(&self) {
        if let Some(leases) = &self.inner.leases {
            leases.close_all().await;
        }
    }

    /// Replace a reservation by what the request really used, in one round trip.
    ///
    /// The commit is built when this is called and runs to its end even if the
    /// returned future is dropped, before or after it is first polled (the request
    /// happened: it is charged exactly once).
    ///
    /// A commit that meets a transient error (a timeout, a dropped connection, a
    /// failover) is not an error: it is queued and replayed after the next commit that
    /// succeeds (or by [`RedisEngine::flush_pending`]), and commits are idempotent by
    /// reservation id, so one that did land is not charged twice. The caller gets
    /// `Ok` with the receipt computed here, marked [pending](Receipt::is_pending):
    /// deliver the provider's answer.
    ///
    /// # Errors
    /// [`Error::Store`] if Redis refused the commit for good (corrupt or foreign data at
    /// its keys): it is not queued (it would fail again), it is counted in
    /// [`RedisEngine::failed_commits`], and the script wrote nothing.
    pub fn commit_usage(
        &self,
        reservation: RedisReservation,
        usage: Usage,
    ) -> impl std::future::Future<Output = Result<Receipt, Error>> + Send + 'static {
        reservation.commit(usage)
    }

    /// Replay commits that failed with a transient error, in order. Returns how many
    /// are still pending.
    ///
    /// A queued commit first sent more than half of `commit_marker_ttl` ago is
    /// dropped instead, and counted by [`RedisEngine::dropped_commits`]: if it did
    /// land, its commit marker may have expired, and replaying it would charge it
    /// again as a commit whose hold expired. A replay never charges twice.
    ///
    /// A replayed commit that fails again transiently stays queued; one that fails
    /// for good (corrupt or foreign data at its keys) leaves the queue, is counted in
    /// [`RedisEngine::failed_commits`] and reported by `last_store_error`, so it can
    /// never block the commits behind it.
    ///
    /// # Errors
    /// The first failure met; every other queued commit was still tried.
    pub async fn flush_pending(&self) -> Result<usize, Error> {
        self.inner.flush_pending().await
    }

    /// Commits that failed for good (not transiently): their usage could not be
    /// recorded in Redis. Each was reported as an error to its caller or by
    /// `flush_pending`, and by `last_store_error`.
    #[must_use]
    pub fn failed_commits(&self) -> u64 {
        self.inner.failed_commits.load(Ordering::Relaxed)
    }

    /// Queued commits dropped unreplayed because half of `commit_marker_ttl` had
    /// passed since they were first sent (see [`RedisEngine::flush_pending`]): their
    /// usage may or may not have been recorded in Redis, but never twice.
    #[must_use]
    pub fn dropped_commits(&self) -> u64 {
        self.inner.dropped_commits.load(Ordering::Relaxed)
    }

    /// Commits waiting for Redis.
    #[must_use]
    pub fn pending_commits(&self) -> usize {
        self.inner.pending.lock().len()
    }

    /// Releases Redis has not acknowledged yet, retried in the background with backoff
    /// (dropped reservations, the half of a request only one hash tag admitted, reserves
    /// whose reply was lost). Each is retried until acknowledged or until one
    /// `reservation_ttl` has passed, after which its hold has expired in Redis and the
    /// next script on its workspace or org gives it back. A graceful shutdown can wait
    /// for this to reach zero.
    #[must_use]
    pub fn releases_in_flight(&self) -> usize {
        self.inner.releases_in_flight.load(Ordering::Relaxed)
    }

    /// The last error Redis returned, for logs and health checks.
    #[must_use]
    pub fn last_store_error(&self) -> Option<StoreError> {
        self.inner.last_error.lock().clone()
    }

    /// The policy the engine runs now: the shared document's version
    /// [`RedisEngine::policy_version`].
    #[must_use]
    pub fn policy(&self) -> Policy {
        self.inner.snapshot.load().policy.clone()
    }

    /// The version of the shared policy document this instance runs. Versions count
    /// the changes made to the document in Redis, by any instance (1: the seed).
    #[must_use]
    pub fn policy_version(&self) -> u64 {
        self.inner.policy_version.load(Ordering::Acquire)
    }

    /// Follow the policy versions this instance applies, e.g. to log "applied policy
    /// version N": the receiver sees the current version, then each one applied, its
    /// own changes and those read from Redis alike.
    #[must_use]
    pub fn watch_policy_version(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.versions.subscribe()
    }

    /// Apply the shared policy's newest version now, without waiting for its
    /// announcement or the next poll; returns the version this instance runs.
    ///
    /// # Errors
    /// [`Error::Store`] if Redis failed; [`PolicyStoreError::CorruptInRedis`] (as
    /// [`Error::Policy`]) if the stored document is not one tollgate can run. The
    /// running policy is kept either way.
    ///
    /// [`PolicyStoreError::CorruptInRedis`]: crate::PolicyStoreError::CorruptInRedis
    pub async fn refresh_policy(&self) -> Result<u64, Error> {
        let _writer = self.inner.apply_lock.lock().await;
        self.inner.sync_policy().await?;
        Ok(self.policy_version())
    }

    /// The Redis key of a workspace's counters (see the README's key layout).
    #[must_use]
    pub fn workspace_key(&self, workspace: &str) -> String {
        format!("{}:ws", self.inner.layout.workspace_tag(workspace))
    }

    /// The Redis key of end user `end_user`'s counters in `workspace` (the hex SHA-256
    /// of the id, under the workspace's hash tag; see the README's key layout). It
    /// expires after the workspace's `end_user_limits.idle_secs` without a request.
    #[must_use]
    pub fn end_user_key(&self, workspace: &str, end_user: &str) -> String {
        self.inner.layout.end_user(workspace, end_user)
    }

    /// The Redis key of the org's budget counters.
    #[must_use]
    pub fn org_key(&self) -> String {
        let org = &self.inner.snapshot.load().policy.org.id;
        format!("{}:org", self.inner.layout.org_tag(org))
    }
}

/// What the store said to a reserve.
enum Reserve {
    Admitted(RedisReservation),
    Denied(Denial),
    /// Redis failed (the caller may fall back to the local limiter).
    Failed(StoreErrorKind),
}

impl Inner {
    fn next_id(&self) -> String {
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{n:016x}", self.instance)
    }

    fn record_error(&self, error: StoreError) {
        crate::telemetry::store_error(&error);
        self.store_meters.error(error.kind);
        *self.last_error.lock() = Some(error);
    }

    /// `call`'s result, its latency recorded under `function` (feature `metrics`).
    async fn metered<T>(
        &self,
        function: Function,
        call: impl std::future::Future<Output = T>,
    ) -> T {
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        let result = call.await;
        #[cfg(feature = "metrics")]
        self.store_meters.call(function as usize, started.elapsed());
        #[cfg(not(feature = "metrics"))]
        let _ = function;
        result
    }

    async fn run(&self, function: Function, call: &Call) -> Result<Value, StoreError> {
        let mut connection = self.connection.clone();
        self.metered(
            function,
            scripts::call(&mut connection, function, &call.keys, &call.args),
        )
        .await
    }

    /// Both groups' reserves and what they mean, owning everything it needs: it runs
    /// detached when its caller goes away. Whatever a group holds when the request as
    /// a whole is not admitted is released, and a reservation whose caller is gone is
    /// dropped (released) by whoever drops the result.
    async fn reserve(
        self: Arc<Self>,
        snap: Arc<Snapshot>,
        admission: Admission,
        end_user: Option<String>,
        now: Timestamp,
        take: Take,
    ) -> Reserve {
        let status = self.config.budget_status.code();
        let Admission { route, ask, .. } = admission;
        let id = self.next_id();
        let mut groups = self.layout.groups(&snap, route, end_user);
        let calls = calls::group_calls(&groups, self.together, |groups| {
            calls::reserve(&snap, route, groups, &id, ask, take, self.ttls)
        });
        let replies = self.run_calls(Function::Reserve, &calls).await;
        let taken = Instant::now();

        // Which calls may have taken something although their reply says nothing.
        let maybe_landed: Vec<bool> = replies
            .iter()
            .map(|reply| match reply {
                Ok(_) => true,
                Err(failed) => failed.maybe_landed,
            })
            .collect();
        let mut tightest = Tightest::default();
        let outcomes: Vec<Result<Reserved, StoreError>> = calls
            .iter()
            .zip(replies)
            .map(|(call, reply)| {
                reply.map_err(|failed| failed.error).and_then(|reply| {
                    calls::read_reserve(
                        &snap,
                        route,
                        &groups[call.groups.clone()],
                        ask,
                        &reply,
                        &mut tightest,
                    )
                })
            })
            .collect();

        if outcomes
            .iter()
            .all(|o| matches!(o, Ok(Reserved::Admitted(_))))
        {
            for (call, outcome) in calls.iter().zip(&outcomes) {
                if let Ok(Reserved::Admitted(generations)) = outcome {
                    for (group, generation) in
                        groups[call.groups.clone()].iter_mut().zip(generations)
                    {
                        group.generation.clone_from(generation);
                    }
                }
            }
            let hold = Arc::new(Hold { id, groups });
            return Reserve::Admitted(RedisReservation::remote(
                Arc::clone(&self),
                snap,
                hold,
                admission,
                tightest,
                taken,
                take == Take::ONE,
            ));
        }
        // Not admitted as a whole: give back what a call holds (a refused call took
        // nothing). A call whose reply was lost (or unreadable) may have landed:
        // released in the background (a harmless no-op if it did not). A call that
        // admitted is released before the denial is answered, retried in the
        // background if Redis fails meanwhile.
        let hold = Arc::new(Hold { id, groups });
        for ((call, o), maybe_landed) in calls.iter().zip(&outcomes).zip(maybe_landed) {
            // (A call taken out of the queue unsent took nothing: nothing to release.)
            if o.is_err() && maybe_landed {
                for group in call.groups.clone() {
                    background::release(&self, &hold, group);
                }
            }
        }
        for (call, o) in calls.iter().zip(&outcomes) {
            if matches!(o, Ok(Reserved::Admitted(_))) {
                for group in call.groups.clone() {
                    background::release_now(&self, &hold, group).await;
                }
            }
        }
        // The first call, in level order, that did not admit says why.
        let first = outcomes
            .into_iter()
            .find(|o| !matches!(o, Ok(Reserved::Admitted(_))))
            .expect("not every call admitted");
        match first {
            Ok(Reserved::Admitted(_)) => unreachable!("skipped above"),
            // Only the workspace group checks the key's and workspace's flags.
            Ok(Reserved::Gone(reason)) => Reserve::Denied(denial(reason, Scope::Key, status)),
            Ok(Reserved::Refused { level, refusal }) => {
                let scope = if level == END_USER_LEVEL {
                    Scope::EndUser
                } else {
                    snap.level(level, route).scope
                };
                Reserve::Denied(refused(
                    scope,
                    level == WALLET_LEVEL,
                    refusal,
                    ask,
                    now,
                    status,
                ))
            }
            Err(error) => {
                let kind = error.kind;
                self.record_error(error);
                Reserve::Failed(kind)
            }
        }
    }

    /// Each call of one request of a batched function (`reserve`, `commit`),
    /// concurrently (at most two: a cluster's workspace and org tags), replies in order.
    async fn run_calls(
        &self,
        function: Function,
        calls: &[GroupCall],
    ) -> Vec<Result<Value, Failed>> {
        match calls {
            [one] => vec![self.run_request(function, &one.call).await],
            [first, second] => {
                let (first, second) = tokio::join!(
                    self.run_request(function, &first.call),
                    self.run_request(function, &second.call)
                );
                vec![first, second]
            }
            more => {
                let mut replies = Vec::with_capacity(more.len());
                for call in more {
                    replies.push(self.run_request(function, &call.call).await);
                }
                replies
            }
        }
    }

    /// One request of a batched function: with the instance's concurrent ones when
    /// coalescing, else alone.
    async fn run_request(&self, function: Function, call: &Call) -> Result<Value, Failed> {
        self.metered(function, async {
            match &self.coalescer {
                Some(coalescer) => coalescer.call(function, call.clone()).await,
                None => {
                    let mut connection = self.connection.clone();
                    scripts::call_batch(&mut connection, function, &[call])
                        .await
                        .and_then(|reply| calls::unbatch(function.name(), reply, 1))
                        .and_then(|mut replies| replies.remove(0))
                        .map_err(Failed::maybe_landed)
                }
            }
        })
        .await
    }

    /// Every group's commit (one call, or one per group concurrently on a cluster),
    /// then the budget alerts they reached; the first error if any call failed
    /// (commits are idempotent: replaying every group is safe).
    pub(crate) async fn run_commit(&self, commit: &PendingCommit) -> Result<(), StoreError> {
        let replies = self.run_calls(Function::Commit, &commit.calls).await;
        let mut reached = Vec::with_capacity(replies.len());
        for (call, reply) in commit.calls.iter().zip(replies) {
            let reply = reply.map_err(|failed| failed.error)?;
            reached.push(calls::read_commit(
                &commit.hold.groups[call.groups.clone()],
                &reply,
            )?);
        }
        if let Some(events) = &commit.snapshot.events {
            let now = self.clock.now();
            // End users' budgets send no alerts: they are many, and not in the policy.
            for r in reached
                .iter()
                .flatten()
                .filter(|r| r.budget.0 != END_USER_LEVEL)
            {
                events.budget_reached(
                    &commit.snapshot,
                    commit.route,
                    r.budget,
                    r.crossed,
                    r.spent,
                    now,
                );
            }
        }
        Ok(())
    }

    /// See [`RedisEngine::flush_pending`].
    pub(crate) async fn flush_pending(&self) -> Result<usize, Error> {
        let queued = std::mem::take(&mut *self.pending.lock());
        let mut first_error = None;
        let mut left = Vec::new();
        let window = self.config.commit_marker_ttl / 2;
        for pending in queued {
            if pending.first_sent.elapsed() >= window {
                self.dropped_commits.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Err(error) = self.run_commit(&pending).await {
                self.record_error(error.clone());
                if error.is_transient() {
                    left.push(pending);
                } else {
                    self.failed_commits.fetch_add(1, Ordering::Relaxed);
                }
                first_error.get_or_insert(error);
            }
        }
        let mut queue = self.pending.lock();
        left.append(&mut queue);
        *queue = left;
        let remaining = queue.len();
        drop(queue);
        match first_error {
            Some(error) => Err(Error::Store(error)),
            None => Ok(remaining),
        }
    }
}

/// A random id for this engine instance, so reservation ids never collide across
/// instances sharing a server.
fn instance_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine")
            .field("prefix", &self.inner.config.prefix)
            .field("policy", &self.inner.snapshot.load().policy)
            .finish_non_exhaustive()
    }
}

impl crate::limiter::Held for RedisReservation {
    fn rate_limits(&self) -> crate::reservation::RateLimitStatus {
        RedisReservation::rate_limits(self)
    }

    fn reserved_cost(&self) -> rust_decimal::Decimal {
        RedisReservation::reserved_cost(self)
    }

    fn key_id(&self) -> &str {
        RedisReservation::key_id(self)
    }

    fn workspace_id(&self) -> &str {
        RedisReservation::workspace_id(self)
    }
}

impl crate::limiter::Limiter for RedisEngine {
    type Reservation = RedisReservation;

    fn check_and_reserve(
        &self,
        request: &Request<'_>,
    ) -> impl std::future::Future<Output = Result<RedisReservation, Denial>> + Send {
        RedisEngine::check_and_reserve(self, request)
    }

    fn commit_usage(
        &self,
        reservation: RedisReservation,
        usage: Usage,
    ) -> impl std::future::Future<Output = Result<Receipt, Error>> + Send {
        RedisEngine::commit_usage(self, reservation, usage)
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("prefix", &self.prefix)
            .field("reservation_ttl", &self.reservation_ttl)
            .field("idle_ttl", &self.idle_ttl)
            .field("commit_marker_ttl", &self.commit_marker_ttl)
            .field("expected_instances", &self.expected_instances)
            .field("response_timeout", &self.response_timeout)
            .field("connection_timeout", &self.connection_timeout)
            .field("coalesce", &self.coalesce)
            .field("lease", &self.lease)
            .field("budget_status", &self.budget_status)
            .field("events", &self.events.is_some())
            .field("policy_poll_interval", &self.policy_poll_interval)
            .finish_non_exhaustive()
    }
}
