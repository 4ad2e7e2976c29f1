//! `GET /admin/summary`: the workspaces a caller may see, in the figures a workspace
//! overview page shows (workspaces, production workspaces, active keys, the monthly
//! budget across workspaces, spend this period), with one row per workspace.
//!
//! The monthly budget is the sum of the budgets whose period is a calendar month;
//! budgets per day or per custom period are not converted into months (a month has
//! 28 to 31 days, so any conversion would be a guess) and neither are workspaces
//! without a budget: both are counted in `workspaces_without_monthly_budget`. Spend is
//! each workspace's committed spend in its own current budget period (a calendar
//! month when it has no budget of its own and the org's budget is monthly).

use rust_decimal::Decimal;
use serde_json::{json, Value};
use tollgate::{BudgetPeriod, Environment, KeyStatus, PolicyDocument, UsageSnapshot};

/// The summary of the workspaces of `doc` for which `visible` holds.
pub fn summarize(
    doc: &PolicyDocument,
    usage: &UsageSnapshot,
    visible: impl Fn(&str) -> bool,
) -> Value {
    let now = usage.taken_at.to_datetime();
    let (mut monthly, mut spent) = (Decimal::ZERO, Decimal::ZERO);
    let (mut production, mut keys_active, mut without_monthly) = (0usize, 0usize, 0usize);
    let mut rows = Vec::new();
    for ws in doc.workspaces.iter().filter(|ws| visible(&ws.id)) {
        let active = doc
            .keys
            .iter()
            .filter(|k| k.workspace == ws.id && k.status == KeyStatus::Active)
            .filter(|k| k.expires_at.map_or(true, |at| at > now))
            .count();
        let ws_spent = usage
            .workspaces
            .iter()
            .find(|w| w.id == ws.id)
            .map_or(Decimal::ZERO, |w| w.usage.current.cost);
        match &ws.budget {
            Some(budget) if budget.period == BudgetPeriod::Month => monthly += budget.limit,
            _ => without_monthly += 1,
        }
        if ws.environment == Environment::Production {
            production += 1;
        }
        keys_active += active;
        spent += ws_spent;
        rows.push(json!({
            "id": ws.id,
            "name": ws.name,
            "environment": ws.environment,
            "status": ws.status,
            "owner": ws.owner,
            "members": ws.members.len(),
            "active_keys": active,
            "budget": ws.budget.as_ref().map(|b| json!({"limit": b.limit, "period": b.period})),
            "spent_this_period": ws_spent,
        }));
    }
    json!({
        "object": "summary",
        "workspaces": rows.len(),
        "production_workspaces": production,
        "active_keys": keys_active,
        "monthly_budget": monthly,
        "workspaces_without_monthly_budget": without_monthly,
        "spend_this_period": spent,
        "data": rows,
    })
}
