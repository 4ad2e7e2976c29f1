//! A reservation: what one admitted request holds until it is committed or dropped.

use std::fmt;
use std::time::Duration;

use rust_decimal::Decimal;

use crate::budget::Settlement;
use crate::clock::Timestamp;
use crate::money::{picos_to_decimal, usage_cost};
use crate::request::Usage;
use crate::snapshot::{Route, Share, LEVELS, WALLET_LEVEL};
use crate::store::{Ask, LevelHold, ScopeState, Tightest, Window};
use crate::sync::Arc;

/// Worst-case tokens and cost held for one admitted request on every level.
///
/// Commit it with [`Engine::commit_usage`](crate::Engine::commit_usage) (or
/// [`Reservation::commit`]) once the real usage is known. Dropping it instead (client
/// gone, upstream failed) gives everything back: request slots, tokens, concurrency
/// and money. Committing consumes it, so usage is charged exactly once.
#[must_use = "dropping a Reservation releases it; commit it with the real usage"]
pub struct Reservation {
    /// The snapshot the request was admitted under: it keeps the counters and the
    /// rules of every level alive and unchanged until this reservation settles, even
    /// if a new policy is applied meanwhile. One reference count for the whole
    /// request instead of one per level, taken on this thread's share of it.
    pub(crate) snapshot: Arc<Share>,
    /// When its levels took what they hold (nanoseconds since the Unix epoch).
    pub(crate) taken_at: u64,
    pub(crate) route: Route,
    /// What each level holds; `None` for levels that do not apply.
    pub(crate) levels: [Option<LevelHold>; LEVELS],
    /// What the end user's level holds, with its counters: kept here because the end
    /// user may be forgotten by its table before this settles.
    pub(crate) end_user: Option<EndUserHold>,
    /// Set once committed or released, so `Drop` gives nothing back twice.
    pub(crate) settled: bool,
    pub(crate) ask: Ask,
    pub(crate) input_price: u64,
    pub(crate) output_price: u64,
    pub(crate) tightest: Tightest,
}

/// An end user's share of a reservation.
pub(crate) struct EndUserHold {
    pub(crate) state: Arc<ScopeState>,
    pub(crate) hold: LevelHold,
}

/// What a committed request cost.
///
/// Amounts are kept in the engine's fixed-point unit and turned into `Decimal` only
/// when asked for, so committing builds no `Decimal` on the hot path.
///
/// A receipt means the request's usage is (or will be) charged exactly once, so the
/// provider's answer can be delivered. With the Redis backend it may be
/// [pending](Receipt::is_pending): computed here while Redis has not acknowledged the
/// commit yet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    cost: i64,
    reserved_cost: i64,
    input_tokens: u32,
    output_tokens: u32,
    pending: bool,
}

impl Receipt {
    /// A receipt for `usage` costing `cost` pico-dollars against a hold of `reserved`.
    pub(crate) fn new(cost: i64, reserved_cost: i64, usage: Usage) -> Self {
        Receipt {
            cost,
            reserved_cost,
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            pending: false,
        }
    }

    /// The same receipt, for a commit queued for replay.
    #[cfg(feature = "redis")]
    pub(crate) fn into_pending(self) -> Self {
        Receipt {
            pending: true,
            ..self
        }
    }

    /// True when the store has not acknowledged the commit yet: the Redis backend met a
    /// transient error (a timeout, a dropped connection, a failover) and queued the
    /// commit, to be replayed after the next commit that succeeds or by
    /// `RedisEngine::flush_pending`. Commits are idempotent by reservation id, so the
    /// usage is charged exactly once, whether or not the first attempt landed. The
    /// amounts are exact (computed locally from the same prices).
    ///
    /// Deliver the provider's answer either way: the request happened and will be
    /// charged. Never true for the in-memory engine.
    #[must_use]
    pub fn is_pending(&self) -> bool {
        self.pending
    }

    /// The real cost in USD, exact.
    #[must_use]
    pub fn cost(&self) -> Decimal {
        picos_to_decimal(self.cost)
    }

    /// The worst-case cost that was held, in USD.
    #[must_use]
    pub fn reserved_cost(&self) -> Decimal {
        picos_to_decimal(self.reserved_cost)
    }

    /// Cost beyond the reservation, charged as debt (zero when usage fit), in USD.
    #[must_use]
    pub fn overage(&self) -> Decimal {
        picos_to_decimal(self.cost.saturating_sub(self.reserved_cost).max(0))
    }

    /// Input tokens charged.
    #[must_use]
    pub fn input_tokens(&self) -> u32 {
        self.input_tokens
    }

    /// Output tokens charged.
    #[must_use]
    pub fn output_tokens(&self) -> u32 {
        self.output_tokens
    }
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receipt")
            .field("cost", &self.cost())
            .field("reserved_cost", &self.reserved_cost())
            .field("overage", &self.overage())
            .field("input_tokens", &self.input_tokens)
            .field("output_tokens", &self.output_tokens)
            .field("pending", &self.pending)
            .finish()
    }
}

/// Where the tightest request and token limits stand for an admitted request: the
/// numbers behind the `x-ratelimit-*` and `RateLimit` headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitStatus {
    /// The request-count limit with the fewest requests left, if any applies.
    pub requests: Option<LimitWindow>,
    /// The token limit with the fewest tokens left, if any applies.
    pub tokens: Option<LimitWindow>,
}

/// One rate limit's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitWindow {
    /// Allowed per window.
    pub limit: u64,
    /// Left now.
    pub remaining: u64,
    /// Time until the limit is fully replenished.
    pub reset: Duration,
    /// The window the limit is defined over.
    pub window: Duration,
}

impl From<Window> for LimitWindow {
    fn from(w: Window) -> Self {
        LimitWindow {
            limit: w.limit,
            remaining: w.remaining,
            reset: w.reset,
            window: w.window,
        }
    }
}

impl Reservation {
    /// The id of the key this request was admitted for (the policy's `[[keys]] id`,
    /// never the secret), for request logs and usage attribution.
    #[must_use]
    pub fn key_id(&self) -> &str {
        self.snapshot.key_id(&self.route)
    }

    /// The id of the workspace this request was admitted in.
    #[must_use]
    pub fn workspace_id(&self) -> &str {
        self.snapshot.workspace_id(&self.route)
    }

    /// The worst-case cost held, in USD.
    #[must_use]
    pub fn reserved_cost(&self) -> Decimal {
        picos_to_decimal(self.ask.cost)
    }

    /// Whether this request is also counted against its end user's limits (it named
    /// an end user and its workspace sets `end_user_limits`).
    #[must_use]
    pub fn is_end_user_limited(&self) -> bool {
        self.end_user.is_some()
    }

    /// The input and output tokens held.
    #[must_use]
    pub fn reserved_tokens(&self) -> (u64, u64) {
        (self.ask.input_tokens, self.ask.output_tokens)
    }

    /// Where the tightest limits stand after this admission, for response headers.
    #[must_use]
    pub fn rate_limits(&self) -> RateLimitStatus {
        RateLimitStatus {
            requests: self.tightest.requests.map(LimitWindow::from),
            tokens: self.tightest.tokens.map(LimitWindow::from),
        }
    }

    /// Replace the hold by the real usage. Unused tokens and money go back (never past
    /// a limit's capacity); usage beyond the reservation is charged as debt, never
    /// dropped, so the next request may be refused until it is paid down.
    pub fn commit(mut self, usage: Usage) -> Receipt {
        let now = self.snapshot.clock.now();
        self.snapshot.follow_lapses(now);
        let input = u64::from(usage.input_tokens);
        let output = u64::from(usage.output_tokens);
        let cost = usage_cost(input, output, self.input_price, self.output_price);
        let settlement = Settlement {
            cost,
            input_tokens: input,
            output_tokens: output,
        };
        self.settled = true;
        for (level, hold) in self.levels.iter().enumerate() {
            if let Some(hold) = hold {
                let at = self.snapshot.level(level, self.route);
                if let Some(rules) = at.rules {
                    // The wallet reports money only; requests and tokens are the org's.
                    let tally = level != WALLET_LEVEL;
                    hold.settle(
                        (at.state, at.extras),
                        rules,
                        self.ask.cost,
                        settlement,
                        self.taken_at,
                        now,
                        tally,
                    );
                }
            }
        }
        if let Some(EndUserHold { state, hold }) = &self.end_user {
            // The rules it was admitted under: its snapshot's.
            let rules = self.snapshot.policy.workspaces[self.route.workspace as usize]
                .end_users
                .as_deref();
            if let Some(rules) = rules {
                hold.settle(
                    (state, &[]),
                    &rules.rules,
                    self.ask.cost,
                    settlement,
                    self.taken_at,
                    now,
                    true,
                );
            }
        }
        if let Some(events) = &self.snapshot.events {
            events.check_budgets(&self.snapshot, self.route, now);
        }
        self.metered(cost, usage);
        Receipt::new(cost, self.ask.cost, usage)
    }
}

impl Reservation {
    /// Count a commit of `cost` pico-dollars in the metrics (feature `metrics`):
    /// spend, tokens, and the workspace's budget used.
    #[inline]
    fn metered(&self, cost: i64, usage: Usage) {
        let meters = &self.snapshot.meters;
        meters.committed(self.route, cost, usage);
        #[cfg(feature = "metrics")]
        {
            let at = self
                .snapshot
                .level(crate::snapshot::WORKSPACE_LEVEL, self.route);
            if let Some(budget) = at.rules.and_then(|r| r.budget.as_ref()) {
                let (spent, _) = at.state.periods.spent_in_period();
                meters.budget_used(self.route, spent, budget.limit);
            }
        }
    }

    /// Give back every level's hold: the request did not happen.
    pub(crate) fn release(&mut self, now: Timestamp) {
        self.snapshot.follow_lapses(now);
        self.settled = true;
        self.snapshot.meters.released(self.route);
        for (level, hold) in self.levels.iter().enumerate() {
            if let Some(hold) = hold {
                let at = self.snapshot.level(level, self.route);
                hold.release(at.state, at.extras, self.ask.cost, self.taken_at, now);
            }
        }
        if let Some(EndUserHold { state, hold }) = &self.end_user {
            hold.release(state, &[], self.ask.cost, self.taken_at, now);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            let now = self.snapshot.clock.now();
            self.release(now);
        }
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("input_tokens", &self.ask.input_tokens)
            .field("output_tokens", &self.ask.output_tokens)
            .field("cost", &self.reserved_cost())
            .finish_non_exhaustive()
    }
}
