//! The Redis backend (feature `redis`): every counter in Redis, so all gateway
//! instances enforce the same limits and budgets.
//!
//! A request resolves its key, workspace and model locally, exactly as the in-memory
//! engine does (`decide`), then reserves in one Lua script per hash tag: the
//! workspace's levels (key, workspace, workspace × model) under `{ws:<id>}`, the
//! org's budget and wallet under `{org:<id>}`. The two calls go out together on one
//! multiplexed connection, so a reservation costs one round trip of latency; each
//! is atomic on its own shard. If one group refuses, the other's hold is released;
//! in between it only over-holds, which can refuse a request but never overspend.
//! See `keys` for the layout.

mod calls;
mod conn;
mod control;
mod error;
mod fallback;
mod keys;
mod reservation;
mod scripts;
mod usage;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use redis::aio::ConnectionManagerConfig;
use redis::cluster::ClusterClientBuilder;
use redis::Value;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::decide::{admit, denial, refused, Admission};
use crate::denial::{Denial, DenialReason, Error, Scope, StoreError, StoreErrorKind};
use crate::engine::{BudgetStatus, Engine};
use crate::events::{EventSink, Events};
use crate::policy::{Policy, StoreFailureMode};
use crate::request::{Request, Usage};
use crate::reservation::Receipt;
use crate::snapshot::{Route, Snapshot, WALLET_LEVEL};
use crate::store::Tightest;

use calls::{Call, Reserved, Ttls};
use conn::Connection;
use error::classify;
use keys::{Group, Layout};
use scripts::Function;

pub use reservation::RedisReservation;

/// Settings of a [`RedisEngine`]. Every field has a production default.
#[derive(Clone)]
pub struct RedisConfig {
    /// Prepended to every key, so deployments can share a server. Default `tollgate`.
    pub prefix: String,
    /// How long a reservation holds if its instance never commits or releases it
    /// (crashed, partitioned): longer than your slowest upstream call. Default 10 min.
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
    /// The status budget and wallet denials answer with.
    pub budget_status: BudgetStatus,
    /// Where events go (budget alerts, key and workspace changes, sampled denials).
    /// Budget alerts fire once per threshold per period across all instances.
    pub events: Option<Arc<dyn EventSink>>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            prefix: "tollgate".to_owned(),
            reservation_ttl: Duration::from_secs(600),
            idle_ttl: Duration::from_secs(40 * 86_400),
            commit_marker_ttl: Duration::from_secs(86_400),
            expected_instances: NonZeroU32::MIN,
            response_timeout: Duration::from_millis(500),
            connection_timeout: Duration::from_millis(250),
            budget_status: BudgetStatus::default(),
            events: None,
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
}

pub(crate) struct Inner {
    connection: Connection,
    layout: Layout,
    ttls: Ttls,
    config: RedisConfig,
    clock: Arc<dyn Clock>,
    snapshot: ArcSwap<Snapshot>,
    /// This instance's share of the policy, for workspaces that fail open.
    fallback: ArcSwap<Option<Engine>>,
    /// Serialises policy changes (held across their Redis writes).
    apply_lock: tokio::sync::Mutex<()>,
    /// Commits that failed with a transient error, retried by `flush_pending`.
    pending: Mutex<Vec<PendingCommit>>,
    last_error: Mutex<Option<StoreError>>,
    failed_commits: AtomicU64,
    dropped_commits: AtomicU64,
    instance: u64,
    sequence: AtomicU64,
}

/// A commit that Redis has not acknowledged: both groups' calls, replayable because
/// commits are idempotent by reservation id.
pub(crate) struct PendingCommit {
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) route: Route,
    pub(crate) groups: [Group; 2],
    pub(crate) calls: [Call; 2],
    /// When the commit was first sent: it cannot have landed (and set its commit
    /// marker) before.
    pub(crate) first_sent: Instant,
}

impl RedisEngine {
    /// Connect to one Redis server (`redis://host:port/db`). The connection
    /// reconnects by itself after failures.
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
        let manager = redis::aio::ConnectionManager::new_with_config(client, manager_config)
            .await
            .map_err(|e| classify("connect", &e))?;
        Self::start(Connection::Single(manager), policy, config).await
    }

    /// Connect to a Redis Cluster through any of its nodes.
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
        Self::start(Connection::Cluster(connection), policy, config).await
    }

    /// Load the function library (so the first request does not pay for it, and a
    /// server older than Redis 7 is refused now, by name), then start.
    async fn start(
        mut connection: Connection,
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
        Ok(Self::started(connection, policy, config))
    }

    fn started(connection: Connection, policy: Policy, config: RedisConfig) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let fallback = fallback::local_share(&policy, config.expected_instances);
        let mut snapshot = Snapshot::build(policy, None, Arc::clone(&clock));
        snapshot.events = config
            .events
            .clone()
            .map(|sink| Arc::new(Events::new(sink)));
        RedisEngine {
            inner: Arc::new(Inner {
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
                pending: Mutex::new(Vec::new()),
                last_error: Mutex::new(None),
                failed_commits: AtomicU64::new(0),
                dropped_commits: AtomicU64::new(0),
                instance: instance_id(),
                sequence: AtomicU64::new(0),
            }),
        }
    }

    /// May this key call this model now? If so, hold the request's worst case on every
    /// level in Redis, all or nothing. One round trip.
    ///
    /// # Errors
    /// A [`Denial`] naming the scope and limit that refused, or
    /// [`DenialReason::StoreUnavailable`] when Redis failed and the workspace fails
    /// closed (a fail-open workspace is admitted by its local limiter instead).
    pub async fn check_and_reserve(
        &self,
        request: &Request<'_>,
    ) -> Result<RedisReservation, Denial> {
        let snap = self.inner.snapshot.load_full();
        let now = self.inner.clock.now();
        let result = self.reserve(&snap, request, now).await;
        if let (Err(denial), Some(events)) = (&result, &snap.events) {
            events.denied(denial, now);
        }
        result
    }

    async fn reserve(
        &self,
        snap: &Arc<Snapshot>,
        request: &Request<'_>,
        now: Timestamp,
    ) -> Result<RedisReservation, Denial> {
        let inner = &self.inner;
        let status = inner.config.budget_status.code();
        let admission = admit(snap, request, now, status)?;
        let Admission { route, ask, .. } = admission;

        let id = self.next_id();
        let mut groups = inner.layout.groups(snap, route);
        let calls = groups
            .each_ref()
            .map(|group| calls::reserve(snap, route, group, &id, ask, inner.ttls));
        let (ws_reply, org_reply) =
            tokio::join!(self.run_reserve(&calls[0]), self.run_reserve(&calls[1]));

        let mut tightest = Tightest::default();
        let mut outcome = |group: &Group, reply: Result<Value, StoreError>| {
            reply.and_then(|reply| {
                calls::read_reserve(snap, route, group, ask, &reply, &mut tightest)
            })
        };
        let ws = outcome(&groups[0], ws_reply);
        let org = outcome(&groups[1], org_reply);

        // Give back what a group holds when the request as a whole is not admitted.
        let admitted = |o: &Result<Reserved, StoreError>| matches!(o, Ok(Reserved::Admitted(_)));
        if !(admitted(&ws) && admitted(&org)) {
            for (group, o) in groups.iter().zip([&ws, &org]) {
                if admitted(o) {
                    self.release_group(group, &id).await;
                }
            }
        }
        let workspace = &snap.policy.workspaces[route.workspace as usize];
        match (ws, org) {
            (Ok(Reserved::Admitted(ws_generation)), Ok(Reserved::Admitted(org_generation))) => {
                groups[0].generation = ws_generation;
                groups[1].generation = org_generation;
                Ok(RedisReservation::remote(
                    Arc::clone(&self.inner),
                    Arc::clone(snap),
                    id,
                    admission,
                    groups,
                    tightest,
                ))
            }
            // Only the workspace group checks the key's and workspace's flags.
            (Ok(Reserved::Gone(reason)), _)
            | (Ok(Reserved::Admitted(_)), Ok(Reserved::Gone(reason))) => {
                Err(denial(reason, Scope::Key, status))
            }
            // The workspace's levels come first in level order: report them first.
            (Ok(Reserved::Refused { level, refusal }), _)
            | (Ok(Reserved::Admitted(_)), Ok(Reserved::Refused { level, refusal })) => {
                let (scope, _, _) = snap.level(level, route);
                Err(refused(
                    scope,
                    level == WALLET_LEVEL,
                    refusal,
                    ask,
                    now,
                    status,
                ))
            }
            (Err(error), _) | (_, Err(error)) => {
                let kind = error.kind;
                self.record_error(error);
                if kind == StoreErrorKind::Transient
                    && workspace.on_store_error == StoreFailureMode::Open
                {
                    if let Some(local) = inner.fallback.load().as_ref() {
                        return local
                            .check_and_reserve(request)
                            .map(RedisReservation::local);
                    }
                }
                Err(denial(
                    DenialReason::StoreUnavailable(kind),
                    Scope::Workspace,
                    status,
                ))
            }
        }
    }

    /// Replace a reservation by what the request really used, in one round trip.
    ///
    /// # Errors
    /// [`Error::Store`] if Redis did not acknowledge the commit. After a transient
    /// error nothing is lost: the commit is queued and replayed after the next commit
    /// that succeeds (or by [`RedisEngine::flush_pending`]), and commits are idempotent
    /// by reservation id, so a commit that did land is not charged twice. A permanent
    /// or corrupt-data error is not queued (it would fail again): it is counted in
    /// [`RedisEngine::failed_commits`], and the script wrote nothing.
    pub async fn commit_usage(
        &self,
        reservation: RedisReservation,
        usage: Usage,
    ) -> Result<Receipt, Error> {
        reservation.commit(self, usage).await
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
        let queued = std::mem::take(&mut *self.inner.pending.lock());
        let mut first_error = None;
        let mut left = Vec::new();
        let window = self.inner.config.commit_marker_ttl / 2;
        for pending in queued {
            if pending.first_sent.elapsed() >= window {
                self.inner.dropped_commits.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Err(error) = self.run_commit(&pending).await {
                self.record_error(error.clone());
                if error.is_transient() {
                    left.push(pending);
                } else {
                    self.inner.failed_commits.fetch_add(1, Ordering::Relaxed);
                }
                first_error.get_or_insert(error);
            }
        }
        let mut queue = self.inner.pending.lock();
        left.append(&mut queue);
        *queue = left;
        let remaining = queue.len();
        drop(queue);
        match first_error {
            Some(error) => Err(Error::Store(error)),
            None => Ok(remaining),
        }
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

    /// The last error Redis returned, for logs and health checks.
    #[must_use]
    pub fn last_store_error(&self) -> Option<StoreError> {
        self.inner.last_error.lock().clone()
    }

    /// The policy the engine runs now.
    #[must_use]
    pub fn policy(&self) -> Policy {
        self.inner.snapshot.load().policy.clone()
    }

    /// The Redis key of a workspace's counters (see the README's key layout).
    #[must_use]
    pub fn workspace_key(&self, workspace: &str) -> String {
        format!("{}:ws", self.inner.layout.workspace_tag(workspace))
    }

    /// The Redis key of the org's budget counters.
    #[must_use]
    pub fn org_key(&self) -> String {
        let org = &self.inner.snapshot.load().policy.org.id;
        format!("{}:org", self.inner.layout.org_tag(org))
    }

    fn next_id(&self) -> String {
        let n = self.inner.sequence.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{n:016x}", self.inner.instance)
    }

    fn record_error(&self, error: StoreError) {
        *self.inner.last_error.lock() = Some(error);
    }

    async fn run(&self, function: Function, call: &Call) -> Result<Value, StoreError> {
        let mut connection = self.inner.connection.clone();
        scripts::call(&mut connection, function, &call.keys, &call.args).await
    }

    async fn run_reserve(&self, call: &Call) -> Result<Value, StoreError> {
        self.run(Function::Reserve, call).await
    }

    /// Both groups' commits, concurrently, then the budget alerts they reached; the
    /// first error if either failed (commits are idempotent: replaying both is safe).
    pub(crate) async fn run_commit(&self, commit: &PendingCommit) -> Result<(), StoreError> {
        let (ws, org) = tokio::join!(
            self.run(Function::Commit, &commit.calls[0]),
            self.run(Function::Commit, &commit.calls[1])
        );
        let reached = [
            calls::read_commit(&commit.groups[0], &ws?)?,
            calls::read_commit(&commit.groups[1], &org?)?,
        ];
        if let Some(events) = &commit.snapshot.events {
            let now = self.inner.clock.now();
            for r in reached.iter().flatten() {
                events.budget_reached(
                    &commit.snapshot,
                    commit.route,
                    r.level,
                    r.crossed,
                    r.spent,
                    now,
                );
            }
        }
        Ok(())
    }

    async fn release_group(&self, group: &Group, id: &str) {
        let call = calls::release(group, id);
        if let Err(error) = self.run(Function::Release, &call).await {
            // The hold expires after the reservation TTL; nothing more to do.
            self.record_error(error);
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
            .field("budget_status", &self.budget_status)
            .field("events", &self.events.is_some())
            .finish()
    }
}
