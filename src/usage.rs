//! Usage snapshots: requests, tokens and spend per key, workspace, model and org.

use rust_decimal::Decimal;
use serde::Serialize;

use crate::budget::PeriodTotals;
use crate::clock::Timestamp;
use crate::engine::Engine;
use crate::money::picos_to_decimal;
use crate::policy::rules::{LevelRules, Temporary};
use crate::store::ScopeState;
use crate::sync::Arc;

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

/// Where one budget of a scope stands in its current period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BudgetUsage {
    /// The limit in force, in USD (a temporary override's while it lasts).
    pub limit: Decimal,
    /// True for a soft budget, which alerts but never refuses.
    pub soft: bool,
    /// Start of its current period (inclusive).
    pub period_start: Timestamp,
    /// End of its current period (exclusive).
    pub period_end: Timestamp,
    /// Committed spend in the period, in USD.
    pub spent: Decimal,
    /// Worst-case cost held by requests in flight, in USD.
    pub held: Decimal,
}

/// A temporary override in force on a scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TemporaryUsage {
    /// When it ends and the scope's own limits return.
    pub until: Timestamp,
}

/// Every budget of a level, from the reports of the counters that count it: the
/// scope's own for the first, then one per further budget.
pub(crate) fn budgets_of(
    rules: &LevelRules,
    reports: impl IntoIterator<Item = ScopeReport>,
) -> Vec<BudgetUsage> {
    rules
        .budgets()
        .zip(reports)
        .map(|(budget, report)| BudgetUsage {
            limit: picos_to_decimal(budget.limit),
            soft: budget.soft,
            period_start: report.current.period_start,
            period_end: report.current.period_end,
            spent: report.current.cost,
            held: report.current.held,
        })
        .collect()
}

fn budgets(
    rules: &LevelRules,
    state: &ScopeState,
    extras: &[Arc<ScopeState>],
    now: Timestamp,
) -> Vec<BudgetUsage> {
    let cells = std::iter::once(state).chain(extras.iter().map(|c| &**c));
    budgets_of(rules, cells.map(|cell| report(cell, now)))
}

pub(crate) fn temporary(temporary: Option<&Temporary>, now: Timestamp) -> Option<TemporaryUsage> {
    temporary
        .filter(|t| now < t.until)
        .map(|t| TemporaryUsage { until: t.until })
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
    /// Each of its own budgets, in policy order.
    pub budgets: Vec<BudgetUsage>,
    /// Its usage of each model it has limits for.
    pub models: Vec<ModelUsage>,
    /// Its temporary override, while one is in force.
    pub temporary: Option<TemporaryUsage>,
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
    /// Each of its budgets, in policy order.
    pub budgets: Vec<BudgetUsage>,
    /// Its temporary override, while one is in force.
    pub temporary: Option<TemporaryUsage>,
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
    /// Each of the org's budgets, in policy order.
    pub org_budgets: Vec<BudgetUsage>,
    /// The org's temporary override, while one is in force.
    pub org_temporary: Option<TemporaryUsage>,
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
                budgets: budgets(
                    &ws.rules,
                    &snap.workspaces[w],
                    &snap.workspace_budgets[w],
                    now,
                ),
                temporary: temporary(ws.temporary.as_deref(), now),
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
                let rules = key.rules.as_deref().unwrap_or(&ws.plain_key_rules);
                KeyUsage {
                    id: key.id.to_string(),
                    workspace: ws.id.to_string(),
                    usage: report(&snap.keys[k], now),
                    budgets: budgets(rules, &snap.keys[k], &snap.key_budgets[k], now),
                    models: key
                        .model_rules
                        .iter()
                        .zip(&*snap.key_models[k])
                        .map(|((m, _), state)| ModelUsage {
                            model: policy.models[*m as usize].name.to_string(),
                            usage: report(state, now),
                        })
                        .collect(),
                    temporary: temporary(key.temporary.as_deref(), now),
                }
            })
            .collect();
        UsageSnapshot {
            taken_at: now,
            org: report(&snap.org, now),
            org_budgets: budgets(&policy.org.rules, &snap.org, &snap.org_budgets, now),
            org_temporary: temporary(policy.org.temporary.as_deref(), now),
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
