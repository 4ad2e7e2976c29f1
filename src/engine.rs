//! The engine: `check_and_reserve` and `commit_usage`, and applying a new policy.
//!
//! This module holds the decision logic: which levels apply to a request, in which
//! order, and what a refusal tells the client. Counters live behind `store`.

use std::sync::Arc as StdArc;

use parking_lot::Mutex;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::decide::{admit, refused, Admission};
use crate::denial::{Denial, Error};
use crate::policy::Policy;
use crate::request::{Request, Usage};
use crate::reservation::{Receipt, Reservation};
use crate::snapshot::{Published, Snapshot, LEVELS, WALLET_LEVEL};
use crate::store::{reserve_level, Tightest};
use crate::sync::{Arc, SwapCell};

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
    /// Serialises policy changes so none is lost; requests never take it.
    apply_lock: Mutex<()>,
    budget_status: u16,
}

/// Sets up an [`Engine`].
#[must_use]
pub struct EngineBuilder {
    policy: Policy,
    clock: StdArc<dyn Clock>,
    budget_status: BudgetStatus,
}

impl EngineBuilder {
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

    /// Start the engine.
    #[must_use]
    pub fn build(self) -> Engine {
        Engine {
            inner: StdArc::new(Inner {
                snapshot: SwapCell::new(Arc::new(Published::new(Snapshot::build(
                    self.policy,
                    None,
                    self.clock,
                )))),
                apply_lock: Mutex::new(()),
                budget_status: self.budget_status.code(),
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
        }
    }

    /// The engine's clock.
    #[must_use]
    pub fn clock(&self) -> StdArc<dyn Clock> {
        StdArc::clone(&self.inner.snapshot.load().clock)
    }

    /// May this key call this model now? If so, hold the request's worst case on every
    /// level (key, workspace, workspace × model, org budget, wallet), all or nothing.
    ///
    /// Allocates nothing and takes no lock.
    ///
    /// # Errors
    /// A [`Denial`] naming the scope and limit that refused; nothing stays held.
    pub fn check_and_reserve(&self, request: &Request<'_>) -> Result<Reservation, Denial> {
        let published = self.inner.snapshot.load();
        let snap: &Snapshot = &published;
        let now = snap.clock.now();
        let budget_status = self.inner.budget_status;
        let Admission {
            route,
            ask,
            input_price,
            output_price,
        } = admit(snap, request, now, budget_status)?;

        // Spelled out rather than `array::from_fn`, which left a call per level.
        let levels: [_; LEVELS] = [
            snap.level(0, route),
            snap.level(1, route),
            snap.level(2, route),
            snap.level(3, route),
            snap.level(4, route),
        ];
        let mut tightest = Tightest::default();
        let mut holds: [Option<_>; LEVELS] = [None; LEVELS];
        for (level, &(scope, state, rules)) in levels.iter().enumerate() {
            let Some(rules) = rules else { continue };
            match reserve_level(state, rules, ask, now, &mut tightest) {
                Ok(hold) => holds[level] = Some(hold),
                Err(refusal) => {
                    // All or nothing: give back the levels already taken.
                    for (hold, &(_, state, _)) in holds.iter().zip(&levels).take(level) {
                        if let Some(hold) = hold {
                            hold.release(state, now);
                        }
                    }
                    let wallet = level == WALLET_LEVEL;
                    return Err(refused(scope, wallet, refusal, ask, now, budget_status));
                }
            }
        }

        Ok(Reservation {
            snapshot: published.share(),
            route,
            levels: holds,
            settled: false,
            ask,
            input_price,
            output_price,
            tightest,
        })
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
    /// in-flight reservations settle against the counters they were taken from.
    pub fn apply_policy(&self, policy: Policy) {
        let _writer = self.inner.apply_lock.lock();
        let previous = self.inner.snapshot.load_full();
        let previous: &Snapshot = &previous;
        let next = Snapshot::build(policy, Some(previous), StdArc::clone(&previous.clock));
        self.inner.snapshot.store(Arc::new(Published::new(next)));
    }

    /// The policy the engine runs now.
    #[must_use]
    pub fn policy(&self) -> Policy {
        self.inner.snapshot.load_full().policy.clone()
    }

    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(self.inner.snapshot.load().snapshot())
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.inner.snapshot.load().clock.now()
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("policy", &self.inner.snapshot.load_full().policy)
            .finish()
    }
}
