//! The names of the metrics tollgate records (feature `metrics`), for dashboards,
//! alerts and tests. Labels are bounded by the policy: workspace ids and model names,
//! never keys.

/// Counter: requests admitted, by `workspace` and `model`.
pub const ADMITTED: &str = "tollgate_requests_admitted_total";
/// Counter: requests denied, by `scope` (`key`, `end_user`, `workspace`,
/// `workspace_model`, `org`) and `reason` (`unknown_key`, `key_revoked`,
/// `key_expired`, `workspace_not_active`, `unknown_model`, `model_not_granted`, `rpm`,
/// `rpd`, `tpm`, `concurrency`, `budget`, `wallet`, `store_unavailable`,
/// `invalid_end_user`).
pub const DENIED: &str = "tollgate_requests_denied_total";
/// Counter: committed spend in pico-dollars (10⁻¹² USD, exact), by `workspace` and
/// `model`. Divide by 1e12 for USD.
pub const SPEND: &str = "tollgate_spend_picodollars_total";
/// Counter: committed tokens, by `workspace`, `model` and `direction` (`input`,
/// `output`).
pub const TOKENS: &str = "tollgate_tokens_total";
/// Gauge: reservations admitted and not yet committed or released, by `workspace`.
pub const IN_FLIGHT: &str = "tollgate_reservations_in_flight";
/// Gauge: committed spend of the workspace's budget period as a fraction of its
/// budget (1.0 = spent), by `workspace`; set on each commit of a budgeted workspace.
pub const BUDGET_USED: &str = "tollgate_budget_used_ratio";
/// Counter: requests a fail-open workspace admitted through its local limiter while
/// Redis was unreachable, by `workspace`.
pub const FAIL_OPEN: &str = "tollgate_fail_open_total";
/// Counter: errors from the counter store (Redis), by `kind` (`transient`,
/// `permanent`, `corrupt-data`).
pub const STORE_ERRORS: &str = "tollgate_store_errors_total";
/// Histogram: seconds per Redis function call, by `function` (`reserve`, `commit`,
/// `release`, `follow`, `renew`).
pub const REDIS_CALL: &str = "tollgate_redis_call_seconds";
