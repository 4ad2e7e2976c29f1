//! What happened, told to the platform off the request path: budget thresholds,
//! key and workspace changes, policy swaps, and denials in aggregate.
//!
//! A sink must never block a request: [`ChannelSink`] hands events to a bounded
//! channel with `try_send` and counts what it had to drop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::Serialize;

use crate::alerts::{percent_of, Crossed};
use crate::clock::Timestamp;
use crate::denial::Denial;
use crate::money::picos_to_decimal;
use crate::snapshot::{Route, Snapshot, LEVELS};
use crate::store::KEY_EXPIRY_REPORTED;

/// One event, serialisable to JSON.
///
/// ```
/// use tollgate::{Event, EventKind, ScopeRef, Timestamp};
/// let event = Event {
///     at: Timestamp::from_unix_nanos(1_700_000_000_000_000_000),
///     actor: Some("alice".into()),
///     kind: EventKind::KeyRevoked { scope: ScopeRef::key("acme", "ws1", "k1") },
/// };
/// let json = serde_json::to_string(&event).unwrap();
/// assert!(json.contains(r#""type":"key_revoked""#), "{json}");
/// assert!(json.contains(r#""actor":"alice""#));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// When it happened (engine clock), nanoseconds since the Unix epoch.
    pub at: Timestamp,
    /// Who caused it, when the caller of the operation said so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Which scope an event is about: the org always, then as much as applies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ScopeRef {
    /// Org id.
    pub org: String,
    /// Workspace id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Model name (a workspace × model scope).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// True for the org's wallet rather than its budget.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub wallet: bool,
    /// Which of the scope's budgets, in the order the policy lists them (`budget`
    /// first, then `budgets`): 0 for the first.
    #[serde(skip_serializing_if = "is_zero")]
    pub budget: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl ScopeRef {
    /// The org itself.
    #[must_use]
    pub fn org(org: &str) -> Self {
        ScopeRef {
            org: org.to_owned(),
            ..ScopeRef::default()
        }
    }

    /// A workspace.
    #[must_use]
    pub fn workspace(org: &str, workspace: &str) -> Self {
        ScopeRef {
            workspace: Some(workspace.to_owned()),
            ..ScopeRef::org(org)
        }
    }

    /// A key of a workspace.
    #[must_use]
    pub fn key(org: &str, workspace: &str, key: &str) -> Self {
        ScopeRef {
            key: Some(key.to_owned()),
            ..ScopeRef::workspace(org, workspace)
        }
    }
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// Committed spend reached a configured percentage of a budget (once per
    /// threshold per period per scope).
    BudgetThreshold {
        /// Whose budget.
        scope: ScopeRef,
        /// The threshold, in percent.
        percent: u8,
        /// The budget, USD.
        limit: Decimal,
        /// Spent in the period when the threshold was crossed, USD.
        spent: Decimal,
    },
    /// Committed spend reached the whole budget (once per period per scope).
    BudgetExhausted {
        /// Whose budget.
        scope: ScopeRef,
        /// The budget, USD.
        limit: Decimal,
        /// Spent in the period, USD.
        spent: Decimal,
    },
    /// A key was created.
    KeyCreated {
        /// The key.
        scope: ScopeRef,
    },
    /// A key got a new secret; the old one works until `old_secret_until`.
    KeyRotated {
        /// The key.
        scope: ScopeRef,
        /// End of the old secret's grace period.
        old_secret_until: Timestamp,
    },
    /// A key was revoked.
    KeyRevoked {
        /// The key.
        scope: ScopeRef,
    },
    /// A request presented a key past its expiry (reported once per key).
    KeyExpired {
        /// The key.
        scope: ScopeRef,
    },
    /// A workspace was created.
    WorkspaceCreated {
        /// The workspace.
        scope: ScopeRef,
    },
    /// A workspace's settings changed.
    WorkspaceUpdated {
        /// The workspace.
        scope: ScopeRef,
    },
    /// A workspace was deleted, with its keys and counters.
    WorkspaceDeleted {
        /// The workspace.
        scope: ScopeRef,
    },
    /// A whole policy was applied.
    PolicyApplied {
        /// Workspaces in the new policy.
        workspaces: usize,
        /// Keys in the new policy.
        keys: usize,
    },
    /// Requests were denied. Sampled so that a flood does not flood the sink: sent at
    /// the 1st, 2nd, 4th, 8th, … denial of each code, with the running count.
    RequestsDenied {
        /// The denial's code, e.g. `rate_limited`, `budget_exceeded`.
        code: &'static str,
        /// Denials of this code since the engine started.
        count: u64,
    },
}

/// Where events go. Called on the thread that caused the event, sometimes inside a
/// request: implementations must return at once and never block.
pub trait EventSink: Send + Sync {
    /// Take one event.
    fn deliver(&self, event: Event);
}

/// A bounded channel of events: [`ChannelSink::new`] gives the sink for the engine and
/// the receiver for a consumer thread or task. When the channel is full, events are
/// dropped and counted, never waited for.
pub struct ChannelSink {
    sender: SyncSender<Event>,
    dropped: AtomicU64,
}

impl ChannelSink {
    /// A sink holding at most `capacity` undelivered events.
    #[must_use]
    pub fn new(capacity: usize) -> (Self, Receiver<Event>) {
        let (sender, receiver) = sync_channel(capacity);
        (
            ChannelSink {
                sender,
                dropped: AtomicU64::new(0),
            },
            receiver,
        )
    }

    /// Events dropped because the channel was full or its receiver gone.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl EventSink for ChannelSink {
    fn deliver(&self, event: Event) {
        match self.sender.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                crate::telemetry::event_dropped(dropped);
            }
        }
    }
}

impl std::fmt::Debug for ChannelSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSink")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

/// Sampled denial counts, one per denial code.
#[derive(Debug, Default)]
pub(crate) struct DenialSampler {
    counts: [AtomicU64; DENIAL_CODES.len()],
}

/// Every code `Denial::code` returns, in a fixed order.
const DENIAL_CODES: [&str; 11] = [
    "invalid_api_key",
    "api_key_revoked",
    "api_key_expired",
    "workspace_in_review",
    "workspace_suspended",
    "model_not_found",
    "model_not_allowed",
    "rate_limited",
    "budget_exceeded",
    "insufficient_funds",
    "store_unavailable",
];

impl DenialSampler {
    /// Count a denial; an event when the count reaches a power of two.
    pub(crate) fn count(&self, code: &'static str) -> Option<EventKind> {
        let slot = DENIAL_CODES.iter().position(|c| *c == code)?;
        let count = self.counts[slot].fetch_add(1, Ordering::Relaxed) + 1;
        count
            .is_power_of_two()
            .then_some(EventKind::RequestsDenied { code, count })
    }
}

/// An engine's event plumbing: its sink and its denial sampler. Shared by every
/// snapshot of the engine.
pub(crate) struct Events {
    sink: Arc<dyn EventSink>,
    denials: DenialSampler,
}

impl Events {
    pub(crate) fn new(sink: Arc<dyn EventSink>) -> Self {
        Events {
            sink,
            denials: DenialSampler::default(),
        }
    }

    pub(crate) fn emit(&self, at: Timestamp, actor: Option<&str>, kind: EventKind) {
        self.sink.deliver(Event {
            at,
            actor: actor.map(str::to_owned),
            kind,
        });
    }

    /// Count a denial; every power-of-two count of its code is reported.
    #[cold]
    pub(crate) fn denied(&self, denial: &Denial, at: Timestamp) {
        if let Some(kind) = self.denials.count(denial.code()) {
            self.emit(at, None, kind);
        }
    }

    /// Report a key presented after its expiry, once per key.
    #[cold]
    pub(crate) fn key_expired(&self, snap: &Snapshot, key: u32, at: Timestamp) {
        let state = &snap.keys[key as usize];
        if state.flags.fetch_or(KEY_EXPIRY_REPORTED, Ordering::AcqRel) & KEY_EXPIRY_REPORTED == 0 {
            let key = &snap.policy.keys[key as usize];
            let ws = &snap.policy.workspaces[key.workspace as usize];
            self.emit(
                at,
                None,
                EventKind::KeyExpired {
                    scope: ScopeRef::key(&snap.policy.org.id, &ws.id, &key.id),
                },
            );
        }
    }

    /// After a commit: report every budget threshold of the request's levels that
    /// committed spend has newly reached. Allocates only when one fires.
    pub(crate) fn check_budgets(&self, snap: &Snapshot, route: Route, at: Timestamp) {
        for level in 0..LEVELS {
            let at_level = snap.level(level, route);
            let Some(rules) = at_level.rules else {
                continue;
            };
            let cells = std::iter::once(at_level.state).chain(at_level.extras.iter().map(|c| &**c));
            for (index, (budget, state)) in rules.budgets().zip(cells).enumerate() {
                let lowest = budget.thresholds.first().copied().unwrap_or(100);
                let (spent, period_start) = state.periods.spent_in_period();
                let percent = percent_of(spent, budget.limit);
                if percent < lowest {
                    continue;
                }
                if let Some(crossed) = state.alerts.reach(percent, period_start, budget.limit) {
                    self.budget_reached(snap, route, (level, index), crossed, spent, at);
                }
            }
        }
    }

    /// Report the thresholds (and exhaustion) of budget `index` of level `level` that
    /// `crossed` passed, with that budget's spend in its period.
    pub(crate) fn budget_reached(
        &self,
        snap: &Snapshot,
        route: Route,
        (level, index): (usize, usize),
        crossed: Crossed,
        spent: i64,
        at: Timestamp,
    ) {
        let rules = snap.level(level, route).rules;
        let Some(budget) = rules.and_then(|r| r.budgets().nth(index)) else {
            return;
        };
        let scope = || ScopeRef {
            budget: index,
            ..scope_ref(snap, level, route)
        };
        let (limit, spent) = (picos_to_decimal(budget.limit), picos_to_decimal(spent));
        for &threshold in budget.thresholds.iter().filter(|&&t| crossed.includes(t)) {
            self.emit(
                at,
                None,
                EventKind::BudgetThreshold {
                    scope: scope(),
                    percent: threshold,
                    limit,
                    spent,
                },
            );
        }
        if crossed.includes(100) {
            self.emit(
                at,
                None,
                EventKind::BudgetExhausted {
                    scope: scope(),
                    limit,
                    spent,
                },
            );
        }
    }
}

/// The ids naming level `level` of a request's route.
fn scope_ref(snap: &Snapshot, level: usize, route: Route) -> ScopeRef {
    let policy = &snap.policy;
    let org = &policy.org.id;
    let ws = &policy.workspaces[route.workspace as usize].id;
    let key = || ScopeRef::key(org, ws, &policy.keys[route.key as usize].id);
    let model = || Some(policy.models[route.model as usize].name.to_string());
    match level {
        0 => key(),
        1 => ScopeRef {
            model: model(),
            ..key()
        },
        2 => ScopeRef::workspace(org, ws),
        3 => ScopeRef {
            model: model(),
            ..ScopeRef::workspace(org, ws)
        },
        4 => ScopeRef::org(org),
        _ => ScopeRef {
            wallet: true,
            ..ScopeRef::org(org)
        },
    }
}
