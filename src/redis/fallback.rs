//! Fail-open: the local in-memory limiter a workspace falls back to while Redis is
//! unreachable, with every limit and budget divided by the expected number of
//! gateway instances so the fleet as a whole stays near the policy's limits.

use std::num::NonZeroU32;

use rust_decimal::{Decimal, RoundingStrategy};

use crate::engine::Engine;
use crate::policy::{BudgetSpec, LimitsSpec, ModelLimitSpec, Policy, TemporarySpec};
use crate::telemetry::MeterSource;

fn share_count(value: &mut Option<i64>, instances: i64) {
    if let Some(v) = value {
        // At least 1: a limit of 0 is invalid, and one request per instance is the
        // least a limit can mean.
        *v = (*v / instances).max(1);
    }
}

fn share_limits(limits: &mut LimitsSpec, instances: i64) {
    share_count(&mut limits.rpm, instances);
    share_count(&mut limits.rpd, instances);
    share_count(&mut limits.tpm, instances);
    share_count(&mut limits.max_concurrent, instances);
}

fn share_money(amount: Decimal, instances: Decimal) -> Decimal {
    // Down, and to the policy's 12 decimals: never more than this instance's share.
    (amount / instances).round_dp_with_strategy(12, RoundingStrategy::ToZero)
}

fn share_budget(budget: &mut Option<BudgetSpec>, instances: Decimal) {
    if let Some(b) = budget {
        b.limit = share_money(b.limit, instances);
    }
}

/// A scope's further budgets and its temporary override, shared like its own limits.
fn share_more(
    budgets: &mut [BudgetSpec],
    temporary: &mut Option<TemporarySpec>,
    n: i64,
    n_money: Decimal,
) {
    for b in budgets {
        b.limit = share_money(b.limit, n_money);
    }
    if let Some(t) = temporary {
        share_count(&mut t.rpm, n);
        share_count(&mut t.rpd, n);
        share_count(&mut t.tpm, n);
        share_count(&mut t.max_concurrent, n);
        t.budget = t.budget.map(|limit| share_money(limit, n_money));
    }
}

fn share_model_limits(limits: &mut [ModelLimitSpec], n: i64, n_money: Decimal) {
    for model in limits {
        share_count(&mut model.rpm, n);
        share_count(&mut model.tpm, n);
        share_budget(&mut model.budget, n_money);
    }
}

/// This instance's share of `policy`, for workspaces that fail open.
/// Its metrics go where the Redis engine's do (`source`).
pub(crate) fn local_share(
    policy: &Policy,
    instances: NonZeroU32,
    source: MeterSource,
) -> Option<Engine> {
    let n = i64::from(instances.get());
    let n_money = Decimal::from(instances.get());
    let mut doc = policy.document().clone();
    share_budget(&mut doc.org.budget, n_money);
    share_more(&mut doc.org.budgets, &mut doc.org.temporary, n, n_money);
    doc.org.wallet = doc.org.wallet.map(|w| share_money(w, n_money));
    for ws in &mut doc.workspaces {
        share_limits(&mut ws.limits, n);
        share_budget(&mut ws.budget, n_money);
        share_more(&mut ws.budgets, &mut ws.temporary, n, n_money);
        if let Some(end_users) = &mut ws.end_user_limits {
            share_limits(&mut end_users.limits, n);
            share_budget(&mut end_users.budget, n_money);
        }
        share_model_limits(&mut ws.model_limits, n, n_money);
    }
    for key in &mut doc.keys {
        share_limits(&mut key.limits, n);
        share_budget(&mut key.budget, n_money);
        share_more(&mut key.budgets, &mut key.temporary, n, n_money);
        share_model_limits(&mut key.model_limits, n, n_money);
    }
    // The shared policy validated; its share can only fail on rounding a budget to
    // an amount validation refuses, and then the workspace fails closed instead.
    let policy = Policy::new(doc).ok()?;
    Some(Engine::builder(policy).meter_source(source).build())
}
