//! The engine: `check_and_reserve` and `commit_usage`, and applying a new policy.
//!
//! This module holds the decision logic: which levels apply to a request, in which
//! order, and what a refusal tells the client. Counters live behind `store`.

use std::sync::Arc as StdArc;

use parking_lot::Mutex;

use std::time::Duration;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::control::{next_policy, successor, Change, IssuedKey, NewKey, WorkspaceUpdate};
use crate::decide::{admit, denial, refused, Admission};
use crate::denial::{Denial, DenialReason, Error, Scope};
use crate::end_users::{Full, END_USER_AFTER};
use crate::events::{EventSink, Events};
use crate::persist::{self, PersistError};
use crate::policy::rules::LevelRules;
use crate::policy::{Policy, PolicyError, WorkspaceSpec};
use crate::policy_store::PolicyStore;
use crate::request::{Request, Usage};
use crate::reservation::EndUserHold;
use crate::reservation::{Receipt, Reservation};
use crate::snapshot::{Lapses, Level, Published, Snapshot, LEVELS, WALLET_LEVEL};
use crate::store::{reserve_level, Refusal, ScopeState, Tightest};
use crate::sync::{Arc, SwapCell};
use crate::telemetry::{self, MeterSource};

/// The HTTP status a budget or wallet denial answers with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BudgetStatus {
    /// 402 Payment Required (the default, as OpenRouter does).
    #[default]
    PaymentRequired,
    /// 429 Too Many Requests, for clients that only understand that.
    TooManyRequests,
}

impl BudgetStatus {
    pub(crate) fn code(self) -> u16 {
        match self {
            BudgetStatus::PaymentRequired => 402,
            BudgetStatus::TooManyRequests => 429,
        }
    }
}

/// Enforces a policy's rate limits and budgets, in memory.
///
/// Cheap to clone: clones share counters. Safe to call from any number of threads.
///
/// ```
/// use rust_decimal::Decimal;
/// use tollgate::*;
///
/// let policy = Policy::new(
///     PolicyDocument::new(OrgSpec::new("acme"))
///         .model(ModelSpec::new("gpt-4o-mini", Decimal::new(15, 2), Decimal::new(60, 2)))
///         .workspace(
///             WorkspaceSpec::new("ws1", "chatbot-production")
///                 .grant("gpt-4o-mini")
///                 .limits(LimitsSpec { rpm: Some(60), tpm: Some(100_000), ..LimitsSpec::default() })
///                 .budget(BudgetSpec::new(Decimal::new(100, 0), BudgetPeriod::Month)),
///         )
///         .key(KeySpec::new("k1", "ws1", "sk-secret")),
/// )?;
/// let engine = Engine::new(policy);
///
/// let request = Request::with_secret("sk-secret", "gpt-4o-mini").input_tokens(500).max_output_tokens(200);
/// let reservation = engine.check_and_reserve(&request).expect("admitted");
/// let receipt = engine.commit_usage(reservation, Usage::new(480, 150))?;
/// assert_eq!(receipt.cost(), Decimal::new(162, 6)); // 480 × 0.15/M + 150 × 0.60/M
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Engine {
    inner: StdArc<Inner>,
}

struct Inner {
    snapshot: SwapCell<Published>,
    /// Serialises policy changes so none is lost; requests only ever try it (to put a
    /// temporary override out of force), never wait for it.
    apply_lock: Mutex<()>,
    budget_status: u16,
    /// Where every accepted change is saved before it is published.
    store: Option<StdArc<dyn PolicyStore>>,
}

/// Give back what a reservation being built has taken so far (all or nothing): its
/// levels' holds and its end user's.
fn give_back(reservation: &Reservation, levels: &[Level<'_>], now: Timestamp) {
    let at = now.as_unix_nanos();
    for (hold, level) in reservation.levels.iter().zip(levels) {
        if let Some(hold) = hold {
            hold.release(level.state, level.extras, reservation.ask.cost, at, now);
        }
    }
    if let Some(end_user) = &reservation.end_user {
        end_user
            .hold
            .release(&end_user.state, &[], reservation.ask.cost, at, now);
    }
}

impl Lapses for Inner {
    /// Publish a snapshot with the rules in force at `now`, built as of the instant
    /// each override ended (as a policy change made then would have been: counters
    /// adapt to the new limits at that time). Nothing is saved: the policy document
    /// has not changed.
    fn put_temporary_in_force(&self, now: Timestamp) {
        if now.as_unix_nanos() < self.snapshot.load().next_change {
            return; // done already
        }
        // Requests, commits and drops come here: they never wait for a policy change
        // (which may be saving to disk, or delivering events that call back into the
        // engine on this thread). A change being applied lapses overrides first itself.
        let Some(_writer) = self.apply_lock.try_lock() else {
            return;
        };
        self.lapse_locked(now);
    }
}

impl Inner {
    /// [`Lapses::put_temporary_in_force`], with `apply_lock` held.
    fn lapse_locked(&self, now: Timestamp) {
        let mut current = self.snapshot.load_full();
        // Several overrides may have ended since: one snapshot per instant, in order.
        while now.as_unix_nanos() >= current.next_change {
            let next = current.at_next_change();
            self.snapshot.store(Arc::new(Published::new(next)));
            current = self.snapshot.load_full();
        }
    }
}

/// Sets up an [`Engine`].
#[must_use]
pub struct EngineBuilder {
    policy: Policy,
    clock: StdArc<dyn Clock>,
    budget_status: BudgetStatus,
    events: Option<StdArc<dyn EventSink>>,
    store: Option<StdArc<dyn PolicyStore>>,
    meter_source: MeterSource,
}

impl EngineBuilder {
    /// Save every accepted policy change to `store` before applying and
    /// acknowledging it (e.g. a [`FilePolicyStore`](crate::FilePolicyStore), so a
    /// restart keeps every key created, rotated or revoked). A change the store cannot
    /// save is refused with [`PolicyError::Persist`] and changes nothing. The engine
    /// does not save the policy it starts with: start it with the store's own.
    pub fn policy_store(mut self, store: StdArc<dyn PolicyStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Record metrics (feature `metrics`) with this recorder rather than the global
    /// one: e.g. one `metrics-exporter-prometheus` recorder per engine, rendered by
    /// its own handle. Without it, handles come from the global recorder installed
    /// when the engine is built or a policy applied (the no-op recorder if none is),
    /// so install a global recorder before building the engine. The metric names are
    /// in [`metric_names`](crate::metric_names).
    #[cfg(feature = "metrics")]
    pub fn metrics_recorder(
        mut self,
        recorder: StdArc<dyn metrics::Recorder + Send + Sync>,
    ) -> Self {
        self.meter_source = MeterSource(Some(recorder));
        self
    }

    #[cfg(feature = "redis")]
    pub(crate) fn meter_source(mut self, source: MeterSource) -> Self {
        self.meter_source = source;
        self
    }

    /// Report events (budget thresholds, key and workspace changes, sampled denials)
    /// to `sink`. Without one, the engine tracks nothing for events and pays nothing.
    pub fn events(mut self, sink: StdArc<dyn EventSink>) -> Self {
        self.events = Some(sink);
        self
    }

    /// Use this clock instead of the system clock (e.g. a `ManualClock` in tests).
    pub fn clock(mut self, clock: StdArc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The status budget and wallet denials answer with.
    pub fn budget_status(mut self, status: BudgetStatus) -> Self {
        self.budget_status = status;
        self
    }

    /// Start the engine with the counters saved by [`Engine::save_counters`].
    ///
    /// # Errors
    /// [`PersistError`] if the file cannot be read, is torn or corrupt (checksum or
    /// parse), or belongs to another org: never a silent start from zero.
    pub fn restore_counters(
        self,
        path: impl AsRef<std::path::Path>,
    ) -> Result<Engine, PersistError> {
        let engine = self.build();
        let snap = engine.snapshot();
        persist::restore(&snap, snap.clock.now(), path.as_ref())?;
        Ok(engine)
    }

    /// Start the engine.
    #[must_use]
    pub fn build(self) -> Engine {
        let mut snapshot = Snapshot::build(self.policy, None, self.clock);
        snapshot.events = self.events.map(|sink| StdArc::new(Events::new(sink)));
        snapshot.set_meter_source(self.meter_source);
        Engine {
            inner: StdArc::new_cyclic(|inner: &std::sync::Weak<Inner>| {
                let lapses: std::sync::Weak<dyn Lapses> = inner.clone();
                snapshot.lapses = Some(lapses);
                Inner {
                    snapshot: SwapCell::new(Arc::new(Published::new(snapshot))),
                    apply_lock: Mutex::new(()),
                    budget_status: self.budget_status.code(),
                    store: self.store,
                }
            }),
        }
    }
}

impl Engine {
    /// An engine on the system clock.
    #[must_use]
    pub fn new(policy: Policy) -> Self {
        Self::builder(policy).build()
    }

    /// An engine with options.
    pub fn builder(policy: Policy) -> EngineBuilder {
        EngineBuilder {
            policy,
            clock: StdArc::new(SystemClock::new()),
            budget_status: BudgetStatus::default(),
            events: None,
            store: None,
            meter_source: MeterSource::default(),
        }
    }

    /// The engine's clock.
    #[must_use]
    pub fn clock(&self) -> StdArc<dyn Clock> {
        StdArc::clone(&self.inner.snapshot.load().clock)
    }

    /// May this key call this model now? If so, hold the request's worst case on every
    /// level (key, end user, workspace, workspace × model, org budget, wallet), all or
    /// nothing.
    ///
    /// Allocates nothing and takes no lock, except for a request naming an end user in
    /// a workspace with `end_user_limits`: it takes that end user's shard lock briefly,
    /// and the first request of a new end user allocates its counters.
    ///
    /// # Errors
    /// A [`Denial`] naming the scope and limit that refused; nothing stays held.
    pub fn check_and_reserve(&self, request: &Request<'_>) -> Result<Reservation, Denial> {
        let mut published = self.inner.snapshot.load();
        let mut now = published.clock.now();
        if now.as_unix_nanos() >= published.next_change {
            self.put_temporary_in_force();
            published = self.inner.snapshot.load();
            now = published.clock.now();
        }
        let snap: &Snapshot = &published;
        let result = self.reserve(&published, request, now);
        match &result {
            Ok(reservation) => {
                snap.meters.admitted(reservation.route);
                snap.meters.held(reservation.route);
            }
            Err(denial) => {
                telemetry::denied(&snap.meters, denial);
                if let Some(events) = &snap.events {
                    events.denied(denial, now);
                }
            }
        }
        result
    }

    #[inline]
    fn reserve(
        &self,
        published: &Published,
        request: &Request<'_>,
        now: Timestamp,
    ) -> Result<Reservation, Denial> {
        let snap: &Snapshot = published;
        let budget_status = self.inner.budget_status;
        let Admission {
            route,
            ask,
            input_price,
            output_price,
        } = admit(snap, request, now, budget_status)?;

        // The end user's counters, found (or created) before anything is taken: a
        // full table refuses without holding anything.
        let end_user = match end_user_counters(snap, route, request, now) {
            Ok(found) => found,
            Err(full) => {
                let refusal = Refusal::Concurrency {
                    limit: full.cap,
                    in_flight: full.in_flight,
                };
                return Err(refused(
                    Scope::EndUser,
                    false,
                    refusal,
                    ask,
                    now,
                    budget_status,
                ));
            }
        };

        // Spelled out rather than `array::from_fn`, which left a call per level.
        let levels: [_; LEVELS] = [
            snap.level(0, route),
            snap.level(1, route),
            snap.level(2, route),
            snap.level(3, route),
            snap.level(4, route),
            snap.level(5, route),
        ];
        // Built first and filled in place: a reservation is large, and building its
        // holds apart and moving them in cost two copies of them per request. Marked
        // settled until everything is taken, so a refusal's early return drops it
        // without a second release.
        let mut reservation = Reservation {
            snapshot: published.share(),
            taken_at: now.as_unix_nanos(),
            route,
            levels: [None; LEVELS],
            end_user: None,
            settled: true,
            ask,
            input_price,
            output_price,
            tightest: Tightest::default(),
        };
        let (mut end_user_state, end_user_rules) = match end_user {
            Some((state, rules)) => (Some(state), Some(rules)),
            None => (None, None),
        };
        for (index, level) in levels.iter().enumerate() {
            // The end user's level comes right after the key × model level.
            if index == END_USER_AFTER + 1 {
                if let (Some(state), Some(rules)) = (end_user_state.take(), end_user_rules) {
                    match reserve_level(&state, rules, &[], ask, now, &mut reservation.tightest) {
                        Ok(hold) => reservation.end_user = Some(EndUserHold { state, hold }),
                        Err(refusal) => {
                            give_back(&reservation, &levels, now);
                            return Err(refused(
                                Scope::EndUser,
                                false,
                                refusal,
                                ask,
                                now,
                                budget_status,
                            ));
                        }
                    }
                }
            }
            let Some(rules) = level.rules else { continue };
            match reserve_level(
                level.state,
                rules,
                level.extras,
                ask,
                now,
                &mut reservation.tightest,
            ) {
                Ok(hold) => reservation.levels[index] = Some(hold),
                Err(refusal) => {
                    give_back(&reservation, &levels, now);
                    let wallet = index == WALLET_LEVEL;
                    return Err(refused(
                        level.scope,
                        wallet,
                        refusal,
                        ask,
                        now,
                        budget_status,
                    ));
                }
            }
        }
        // Revoked while this request was past lookup: refuse it too.
        if levels[0].state.revoked() {
            give_back(&reservation, &levels, now);
            return Err(denial(DenialReason::KeyRevoked, Scope::Key, budget_status));
        }
        reservation.settled = false;
        Ok(reservation)
    }

    /// Replace a reservation by what the request really used. Consumes the
    /// reservation, so usage is charged exactly once.
    ///
    /// # Errors
    /// Never for the in-memory engine; the `Result` leaves room for stores that can
    /// fail (a distributed store's transient errors).
    pub fn commit_usage(&self, reservation: Reservation, usage: Usage) -> Result<Receipt, Error> {
        Ok(reservation.commit(usage))
    }

    /// Apply a new policy to the running engine. Counters of keys, workspaces and
    /// models whose ids persist are kept; changed limits apply from the next request;
    /// in-flight reservations settle against the counters they were taken from; keys
    /// revoked or gone are refused at once, also by requests already past lookup.
    ///
    /// # Errors
    /// [`PolicyError::Persist`] if the engine's policy store could not save it; the
    /// running policy is unchanged. Without a store, never.
    pub fn apply_policy(&self, policy: Policy) -> Result<(), PolicyError> {
        self.change(Change::Replace(policy.document().clone()), None)
            .map(drop)
    }

    /// Load a policy file and apply it (see [`Engine::apply_policy`]).
    ///
    /// # Errors
    /// The file's read, parse or validation errors; the running policy is unchanged.
    pub fn apply_policy_file(
        &self,
        path: impl AsRef<std::path::Path>,
        actor: Option<&str>,
    ) -> Result<(), PolicyError> {
        let policy = Policy::from_path(path)?;
        self.change(Change::Replace(policy.document().clone()), actor)
            .map(drop)
    }

    /// Add a workspace (id unique, name rules and the org's workspace cap enforced).
    ///
    /// # Errors
    /// [`PolicyError::Invalid`] naming the field and value; nothing changes.
    pub fn create_workspace(
        &self,
        spec: WorkspaceSpec,
        actor: Option<&str>,
    ) -> Result<(), PolicyError> {
        self.change(Change::CreateWorkspace(Box::new(spec)), actor)
            .map(drop)
    }

    /// Change a workspace's settings (not its id or name). Limits apply from the next
    /// request; its counters are kept.
    ///
    /// # Errors
    /// [`PolicyError::Invalid`] for an unknown workspace or invalid settings.
    pub fn update_workspace(
        &self,
        id: &str,
        update: WorkspaceUpdate,
        actor: Option<&str>,
    ) -> Result<(), PolicyError> {
        self.change(
            Change::UpdateWorkspace(id.to_owned(), Box::new(update)),
            actor,
        )
        .map(drop)
    }

    /// Delete a workspace for good: its keys are refused at once and its counters
    /// (and its keys') are dropped.
    ///
    /// # Errors
    /// [`PolicyError::Invalid`] for an unknown workspace, or when the policy would no
    /// longer validate (e.g. it is the org's default workspace).
    pub fn delete_workspace(&self, id: &str, actor: Option<&str>) -> Result<(), PolicyError> {
        self.change(Change::DeleteWorkspace(id.to_owned()), actor)
            .map(drop)
    }

    /// Create a key with a fresh secret, returned once; only its digest is kept.
    ///
    /// # Errors
    /// [`PolicyError::Invalid`] for a duplicate id, an unknown workspace, a workspace
    /// at its key cap, or invalid limits.
    pub fn create_key(&self, key: NewKey, actor: Option<&str>) -> Result<IssuedKey, PolicyError> {
        self.change(Change::CreateKey(key), actor)
            .map(|issued| issued.expect("creating a key issues a secret"))
    }

    /// Give a key a new secret, returned once. The old secret keeps working for
    /// `grace` (zero: refused at once), then is refused as unknown.
    ///
    /// # Errors
    /// [`PolicyError::Invalid`] for an unknown key.
    pub fn rotate_key(
        &self,
        id: &str,
        grace: Duration,
        actor: Option<&str>,
    ) -> Result<IssuedKey, PolicyError> {
        self.change(
            Change::RotateKey {
                id: id.to_owned(),
                grace,
            },
            actor,
        )
        .map(|issued| issued.expect("rotating a key issues a secret"))
    }

    /// Revoke a key: refused from the moment this returns, including requests that
    /// had already looked it up but not yet reserved. Its counters are kept.
    ///
    /// # Errors
    /// [`PolicyError::Invalid`] for an unknown key.
    pub fn revoke_key(&self, id: &str, actor: Option<&str>) -> Result<(), PolicyError> {
        self.change(Change::RevokeKey(id.to_owned()), actor)
            .map(drop)
    }

    /// A temporary override has started or ended: see [`Lapses`].
    #[cold]
    fn put_temporary_in_force(&self) {
        let now = self.inner.snapshot.load().clock.now();
        self.inner.put_temporary_in_force(now);
    }

    /// Apply one change atomically: validate the edited policy, save it, publish it,
    /// report it.
    fn change(
        &self,
        change: Change,
        actor: Option<&str>,
    ) -> Result<Option<IssuedKey>, PolicyError> {
        let _writer = self.inner.apply_lock.lock();
        // Overrides that ended before this change end first, at their own instants.
        self.inner.lapse_locked(self.now());
        let previous = self.inner.snapshot.load_full();
        let (policy, applied) = next_policy(&previous, change)?;
        // Saved before anything changes here: a change the store refuses leaves the
        // counters and revoked flags as they were.
        if let Some(store) = &self.inner.store {
            store.save(policy.document())?;
        }
        let next = successor(&previous, policy);
        let now = next.clock.now();
        let events = next.events.clone();
        self.inner.snapshot.store(Arc::new(Published::new(next)));
        telemetry::policy_changed(&applied.event, actor);
        if let Some(events) = events {
            events.emit(now, actor, applied.event);
        }
        Ok(applied.issued)
    }

    /// Save every scope's spend, requests and tokens (current and previous period) to
    /// `path`, atomically (temp file, sync, rename, sync the directory). Load them on start with
    /// [`EngineBuilder::restore_counters`].
    ///
    /// # Errors
    /// [`PersistError::Io`] if the file cannot be written; the old file is left whole.
    pub fn save_counters(&self, path: impl AsRef<std::path::Path>) -> Result<(), PersistError> {
        let snap = self.snapshot();
        persist::save(&snap, snap.clock.now(), path.as_ref())
    }

    /// The policy the engine runs now.
    #[must_use]
    pub fn policy(&self) -> Policy {
        self.inner.snapshot.load_full().policy.clone()
    }

    /// The snapshot in force now (with any temporary override that has ended since
    /// the last request put out of force first), for reports and saves.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        let published = self.inner.snapshot.load();
        if published.clock.now().as_unix_nanos() >= published.next_change {
            drop(published);
            self.put_temporary_in_force();
            return Arc::clone(self.inner.snapshot.load().snapshot());
        }
        Arc::clone(published.snapshot())
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.inner.snapshot.load().clock.now()
    }
}

/// The counters and rules of the request's end user, when it names one and its
/// workspace sets `end_user_limits`; `Full` when a new end user finds no room.
#[inline]
fn end_user_counters<'s>(
    snap: &'s Snapshot,
    route: crate::snapshot::Route,
    request: &Request<'_>,
    now: Timestamp,
) -> Result<Option<(Arc<ScopeState>, &'s LevelRules)>, Full> {
    let Some(id) = request.end_user else {
        return Ok(None);
    };
    let w = route.workspace as usize;
    let (Some(rules), Some(level)) = (
        snap.policy.workspaces[w].end_users.as_deref(),
        snap.end_users[w].as_ref(),
    ) else {
        return Ok(None);
    };
    let state = level.counters(id, rules, now)?;
    Ok(Some((state, &rules.rules)))
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("policy", &self.inner.snapshot.load_full().policy)
            .finish()
    }
}
