//! Usage snapshots: requests, tokens and spend per key, workspace, model and org.

use rust_decimal::Decimal;
use serde::Serialize;

use crate::budget::PeriodTotals;
use crate::clock::Timestamp;
use crate::engine::Engine;
use crate::money::picos_to_decimal;
use crate::store::ScopeState;

/// One scope's usage over one period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ScopeUsage {
    /// Start of the period (inclusive).
    pub period_start: Timestamp,
    /// End of the period (exclusive).
    pub period_end: Timestamp,
    /// Committed requests.
    pub requests: u64,
    /// Committed input tokens.
    pub input_tokens: u64,
    /// Committed output tokens.
    pub output_tokens: u64,
    /// Committed spend in USD.
    pub cost: Decimal,
    /// Worst-case cost held by requests in flight, in USD.
    pub held: Decimal,
}

impl From<PeriodTotals> for ScopeUsage {
    fn from(t: PeriodTotals) -> Self {
        ScopeUsage {
            period_start: t.start,
            period_end: t.end,
            requests: t.requests,
            input_tokens: t.input_tokens,
            output_tokens: t.output_tokens,
            cost: picos_to_decimal(t.spent),
            held: picos_to_decimal(t.held),
        }
    }
}

/// One scope's usage in the current and the previous period, and what it has in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ScopeReport {
    /// The period containing the snapshot's time.
    pub current: ScopeUsage,
    /// The period before it (all zero if it saw no traffic or never existed).
    pub previous: ScopeUsage,
    /// Concurrency slots held by requests in flight (counted only where a
    /// `max_concurrent` limit applies).
    pub in_flight: u32,
}

fn report(state: &ScopeState, now: Timestamp) -> ScopeReport {
    let (current, previous) = state.periods.totals(now);
    ScopeReport {
        current: current.into(),
        previous: previous.into(),
        in_flight: state.slots.in_use(),
    }
}

/// Usage of one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyUsage {
    /// Key id.
    pub id: String,
    /// Id of its workspace.
    pub workspace: String,
    /// Its usage.
    pub usage: ScopeReport,
}

/// Usage of one model within one workspace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelUsage {
    /// Model name.
    pub model: String,
    /// Its usage in the workspace.
    pub usage: ScopeReport,
}

/// Usage of one workspace, with its per-model breakdown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkspaceUsage {
    /// Workspace id.
    pub id: String,
    /// Its usage.
    pub usage: ScopeReport,
    /// Per model (every model in the price table, used or not).
    pub models: Vec<ModelUsage>,
    /// End users whose counters are tracked in memory now (at most the workspace's
    /// `end_user_limits.max_tracked`); `None` when the workspace sets no end-user
    /// limits, and from the Redis engine, whose end users expire in Redis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_users_tracked: Option<usize>,
}

/// Usage of everything in an engine at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UsageSnapshot {
    /// When the snapshot was taken.
    pub taken_at: Timestamp,
    /// The org's usage, over the org budget's period.
    pub org: ScopeReport,
    /// Everything ever charged against the wallet, in USD.
    pub wallet_spent: Decimal,
    /// Per workspace.
    pub workspaces: Vec<WorkspaceUsage>,
    /// Per key.
    pub keys: Vec<KeyUsage>,
}

impl Engine {
    /// Usage of every key, workspace, workspace × model and the org, for the current
    /// and the previous period. Allocates; meant for dashboards and tests, not the
    /// request path.
    #[must_use]
    pub fn usage(&self) -> UsageSnapshot {
        let snap = self.snapshot();
        let now = self.now();
        let policy = &snap.policy;
        let workspaces = policy
            .workspaces
            .iter()
            .enumerate()
            .map(|(w, ws)| WorkspaceUsage {
                id: ws.id.to_string(),
                usage: report(&snap.workspaces[w], now),
                models: policy
                    .models
                    .iter()
                    .enumerate()
                    .map(|(m, model)| ModelUsage {
                        model: model.name.to_string(),
                        usage: report(&snap.workspace_models[w][m], now),
                    })
                    .collect(),
                end_users_tracked: snap.end_users[w].as_ref().map(|level| level.tracked()),
            })
            .collect();
        let keys = policy
            .keys
            .iter()
            .enumerate()
            .map(|(k, key)| {
                let ws = &policy.workspaces[key.workspace as usize];
                KeyUsage {
                    id: key.id.to_string(),
                    workspace: ws.id.to_string(),
                    usage: report(&snap.keys[k], now),
                }
            })
            .collect();
        UsageSnapshot {
            taken_at: now,
            org: report(&snap.org, now),
            wallet_spent: report(&snap.wallet, now).current.cost,
            workspaces,
            keys,
        }
    }

    /// Usage of one end user of a workspace with `end_user_limits`, over its budget's
    /// period; `None` when the workspace is unknown, sets no end-user limits, or does
    /// not track this end user now (never seen, or forgotten). Does not count as
    /// seeing the end user.
    #[must_use]
    pub fn end_user_usage(&self, workspace: &str, end_user: &str) -> Option<ScopeReport> {
        let snap = self.snapshot();
        let w = snap.workspace_index(workspace)? as usize;
        let state = snap.end_users[w].as_ref()?.peek(end_user)?;
        Some(report(&state, self.now()))
    }
}
