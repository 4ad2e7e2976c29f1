//! Metric handles, registered once per policy so the request path only increments
//! them.
//!
//! `metrics` macros build a `Key` (name and labels, allocated when a label value is
//! not `'static`) and ask the recorder for a handle on every call, even when no
//! recorder is installed. Registering every handle when a policy is applied moves
//! that off the request path: per request, only `Counter::increment` and
//! `Gauge::increment` run, which do nothing for a handle from the no-op recorder and
//! one atomic add for a real one. Handles are taken from the engine's own recorder
//! if it was given one, else from the global recorder installed at the time the policy
//! is applied (so install a global recorder before building the engine).

use std::sync::Arc;
#[cfg(feature = "redis")]
use std::time::Duration;

#[cfg(feature = "redis")]
use metrics::Histogram;
use metrics::{Counter, Gauge, Recorder, Unit};

#[cfg(feature = "redis")]
use crate::denial::StoreErrorKind;
use crate::denial::{Denial, DenialReason, Scope};
use crate::policy::Policy;
use crate::request::Usage;
use crate::snapshot::Route;

use super::names::{
    ADMITTED, BUDGET_USED, DENIED, FAIL_OPEN, IN_FLIGHT, REDIS_CALL, SPEND, STORE_ERRORS, TOKENS,
};

/// Where handles come from: the engine's own recorder, or the current one (global,
/// or the no-op recorder when none is installed).
#[derive(Clone, Default)]
pub(crate) struct MeterSource(pub(crate) Option<Arc<dyn Recorder + Send + Sync>>);

impl MeterSource {
    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.0 {
            Some(recorder) => metrics::with_local_recorder(&**recorder, f),
            None => f(),
        }
    }
}

const SCOPES: [&str; 6] = [
    "key",
    "workspace",
    "workspace_model",
    "org",
    "key_model",
    "end_user",
];
const REASONS: [&str; 14] = [
    "unknown_key",
    "key_revoked",
    "key_expired",
    "workspace_not_active",
    "unknown_model",
    "model_not_granted",
    "rpm",
    "rpd",
    "tpm",
    "concurrency",
    "budget",
    "wallet",
    "store_unavailable",
    "invalid_end_user",
];

fn scope_index(scope: Scope) -> usize {
    match scope {
        Scope::Key => 0,
        Scope::Workspace => 1,
        Scope::WorkspaceModel => 2,
        Scope::Org => 3,
        Scope::KeyModel => 4,
        Scope::EndUser => 5,
    }
}

fn reason_index(reason: DenialReason) -> usize {
    match reason {
        DenialReason::UnknownKey => 0,
        DenialReason::KeyRevoked => 1,
        DenialReason::KeyExpired => 2,
        DenialReason::WorkspaceNotActive(_) => 3,
        DenialReason::UnknownModel => 4,
        DenialReason::ModelNotGranted => 5,
        DenialReason::RequestsPerMinute => 6,
        DenialReason::RequestsPerDay => 7,
        DenialReason::TokensPerMinute => 8,
        DenialReason::Concurrency => 9,
        DenialReason::Budget => 10,
        DenialReason::Wallet => 11,
        DenialReason::StoreUnavailable(_) => 12,
        DenialReason::InvalidEndUser => 13,
    }
}

/// One policy's handles. Series are named by workspace id and model name, so a
/// snapshot built from a changed policy registers the same series again and keeps
/// their values.
#[derive(Default)]
pub(crate) struct Meters {
    models: usize,
    /// By workspace × model (`workspace * models + model`): one request's handles
    /// side by side.
    pairs: Box<[PairMeters]>,
    workspaces: Box<[WorkspaceMeters]>,
    /// By scope × reason.
    denied: Box<[Counter]>,
}

struct PairMeters {
    admitted: Counter,
    spend: Counter,
    input_tokens: Counter,
    output_tokens: Counter,
}

struct WorkspaceMeters {
    in_flight: Gauge,
    budget_used: Gauge,
    #[cfg(feature = "redis")]
    fail_open: Counter,
}

impl Meters {
    pub(crate) fn register(policy: &Policy, source: &MeterSource) -> Self {
        source.with(|| {
            describe();
            let mut meters = Meters {
                models: policy.models.len(),
                ..Meters::default()
            };
            let mut pairs = Vec::with_capacity(policy.workspaces.len() * policy.models.len());
            for ws in &policy.workspaces {
                let w = ws.id.to_string();
                for model in &policy.models {
                    let m = model.name.to_string();
                    pairs.push(PairMeters {
                        admitted: metrics::counter!(ADMITTED, "workspace" => w.clone(), "model" => m.clone()),
                        spend: metrics::counter!(SPEND, "workspace" => w.clone(), "model" => m.clone()),
                        input_tokens: metrics::counter!(TOKENS, "workspace" => w.clone(), "model" => m.clone(), "direction" => "input"),
                        output_tokens: metrics::counter!(TOKENS, "workspace" => w.clone(), "model" => m, "direction" => "output"),
                    });
                }
            }
            meters.pairs = pairs.into();
            meters.workspaces = policy
                .workspaces
                .iter()
                .map(|ws| WorkspaceMeters {
                    in_flight: metrics::gauge!(IN_FLIGHT, "workspace" => ws.id.to_string()),
                    budget_used: metrics::gauge!(BUDGET_USED, "workspace" => ws.id.to_string()),
                    #[cfg(feature = "redis")]
                    fail_open: metrics::counter!(FAIL_OPEN, "workspace" => ws.id.to_string()),
                })
                .collect();
            meters.denied = SCOPES
                .iter()
                .flat_map(|&scope| {
                    REASONS
                        .iter()
                        .map(move |&reason| metrics::counter!(DENIED, "scope" => scope, "reason" => reason))
                })
                .collect();
            meters
        })
    }

    #[inline]
    fn pair(&self, route: Route) -> &PairMeters {
        &self.pairs[route.workspace as usize * self.models + route.model as usize]
    }

    #[inline]
    fn workspace(&self, route: Route) -> &WorkspaceMeters {
        &self.workspaces[route.workspace as usize]
    }

    /// Counted when a reservation is handed to the caller.
    #[inline]
    pub(crate) fn admitted(&self, route: Route) {
        self.pair(route).admitted.increment(1);
    }

    /// A reservation now exists, until it is committed or released. (Apart from
    /// `admitted`: a Redis reservation whose caller went away exists, and is released,
    /// without ever being handed to anyone.)
    #[inline]
    pub(crate) fn held(&self, route: Route) {
        self.workspace(route).in_flight.increment(1.0);
    }

    /// A reservation dropped without commit.
    #[inline]
    pub(crate) fn released(&self, route: Route) {
        self.workspace(route).in_flight.decrement(1.0);
    }

    /// A reservation committed at `cost` pico-dollars.
    #[inline]
    pub(crate) fn committed(&self, route: Route, cost: i64, usage: Usage) {
        let pair = self.pair(route);
        pair.spend.increment(u64::try_from(cost).unwrap_or(0));
        pair.input_tokens.increment(u64::from(usage.input_tokens));
        pair.output_tokens.increment(u64::from(usage.output_tokens));
        self.workspace(route).in_flight.decrement(1.0);
    }

    /// The workspace's committed spend in its period against its budget (pico-dollars).
    #[inline]
    pub(crate) fn budget_used(&self, route: Route, spent: i64, limit: i64) {
        // A ratio for a dashboard, not money: a float is what the gauge takes.
        #[allow(clippy::cast_precision_loss)]
        let ratio = if limit > 0 {
            spent as f64 / limit as f64
        } else {
            1.0
        };
        self.workspace(route).budget_used.set(ratio);
    }

    pub(crate) fn denied(&self, denial: &Denial) {
        let index = scope_index(denial.scope) * REASONS.len() + reason_index(denial.reason);
        self.denied[index].increment(1);
    }

    #[cfg(feature = "redis")]
    #[cold]
    pub(crate) fn fail_open(&self, route: Route) {
        self.workspace(route).fail_open.increment(1);
    }
}

fn describe() {
    metrics::describe_counter!(ADMITTED, Unit::Count, "Requests admitted");
    metrics::describe_counter!(DENIED, Unit::Count, "Requests denied");
    metrics::describe_counter!(SPEND, "Committed spend in pico-dollars (1e-12 USD)");
    metrics::describe_counter!(TOKENS, Unit::Count, "Committed tokens");
    metrics::describe_gauge!(IN_FLIGHT, Unit::Count, "Reservations in flight");
    metrics::describe_gauge!(BUDGET_USED, "Committed spend / budget, this period");
    metrics::describe_counter!(
        FAIL_OPEN,
        Unit::Count,
        "Requests admitted locally while Redis was unreachable"
    );
    metrics::describe_counter!(STORE_ERRORS, Unit::Count, "Counter store errors");
    metrics::describe_histogram!(REDIS_CALL, Unit::Seconds, "Redis function call latency");
}

/// A counter store's handles: errors by kind and call latency by function.
#[cfg(feature = "redis")]
pub(crate) struct StoreMeters {
    errors: [Counter; 3],
    calls: Box<[Histogram]>,
}

#[cfg(feature = "redis")]
impl StoreMeters {
    /// Handles for a store whose calls are named `functions`, in index order.
    pub(crate) fn register(source: &MeterSource, functions: &[&'static str]) -> Self {
        source.with(|| {
            describe();
            StoreMeters {
                errors: ["transient", "permanent", "corrupt-data"]
                    .map(|kind| metrics::counter!(STORE_ERRORS, "kind" => kind)),
                calls: functions
                    .iter()
                    .map(|&function| metrics::histogram!(REDIS_CALL, "function" => function))
                    .collect(),
            }
        })
    }

    pub(crate) fn error(&self, kind: StoreErrorKind) {
        let index = match kind {
            StoreErrorKind::Transient => 0,
            StoreErrorKind::Permanent => 1,
            StoreErrorKind::Corrupt => 2,
        };
        self.errors[index].increment(1);
    }

    /// One call of function `index` took `elapsed`.
    pub(crate) fn call(&self, index: usize, elapsed: Duration) {
        if let Some(histogram) = self.calls.get(index) {
            histogram.record(elapsed);
        }
    }
}
