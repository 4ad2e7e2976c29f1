//! Usage read back from Redis, in the same shape as the in-memory engine's.

use crate::clock::Timestamp;
use crate::denial::{Error, StoreError};
use crate::money::picos_to_decimal;
use crate::period::{bounds, BudgetPeriod, Span};
use crate::policy::rules::LevelRules;
use crate::redis::error::{classify, corrupt_reply};
use crate::redis::keys::extra_budget;
use crate::redis::RedisEngine;
use crate::usage::{
    budgets_of, temporary, BudgetUsage, KeyUsage, ModelUsage, ScopeReport, ScopeUsage,
    UsageSnapshot, WorkspaceUsage,
};

/// The string fields of a scope hash a report reads; its numbers are packed in `n`.
const FIELDS: [&str; 8] = [
    "n", "spent", "held", "p_start", "p_spent", "p_req", "p_in", "p_out",
];

/// The numbers of a scope hash, packed in its field `n` by the function library: 24
/// little-endian doubles in this order (see `scripts/tollgate.lua`).
const NUM: [&str; 24] = [
    "rpm", "rpm@", "rpm#", "rpm^", "rpm-", "rpd", "rpd@", "rpd#", "rpd^", "rpd-", "tpm", "tpm@",
    "tpm#", "tpm^", "tpm-", "conc", "ps", "pe", "pk", "pks", "req", "in", "out", "alerted",
];

/// The packed numbers of a scope hash, by name; `None` for a field not in `n`.
pub(crate) fn unpack_numbers(packed: &[u8]) -> Option<impl Fn(&str) -> Option<i64> + '_> {
    (packed.len() == 8 * NUM.len()).then_some(move |name: &str| {
        let at = NUM.iter().position(|n| *n == name)?;
        let bytes: [u8; 8] = packed[8 * at..8 * at + 8].try_into().ok()?;
        let value = f64::from_le_bytes(bytes);
        // Every packed number is an integer below 2^53; anything else is corrupt.
        (value.fract() == 0.0 && value.abs() < 9_007_199_254_740_992.0).then_some(value as i64)
    })
}

impl RedisEngine {
    /// Usage of every key, workspace, workspace × model and the org, current and
    /// previous period, read from Redis (so it covers every instance's traffic).
    /// One `HMGET` per scope; meant for dashboards, not the request path.
    ///
    /// # Errors
    /// [`Error::Store`] if Redis fails or a counter is corrupt.
    pub async fn usage(&self) -> Result<UsageSnapshot, Error> {
        let snap = self.snapshot_now();
        let now = self.inner.clock.now();
        let layout = &self.inner.layout;
        let policy = &snap.policy;
        let mut workspaces = Vec::with_capacity(policy.workspaces.len());
        for ws in &policy.workspaces {
            let mut models = Vec::with_capacity(policy.models.len());
            for (m, model) in policy.models.iter().enumerate() {
                let key = layout.model(&ws.id, &model.name);
                models.push(ModelUsage {
                    model: model.name.to_string(),
                    usage: self.report(&key, ws.model_rules[m].span, now).await?,
                });
            }
            let hash = layout.workspace(&ws.id);
            let usage = self.report(&hash, ws.rules.span, now).await?;
            workspaces.push(WorkspaceUsage {
                id: ws.id.to_string(),
                budgets: self.budgets(&hash, &ws.rules, usage, now).await?,
                temporary: temporary(ws.temporary.as_deref(), now),
                usage,
                models,
                end_users_tracked: None,
            });
        }
        let mut keys = Vec::with_capacity(policy.keys.len());
        for key in &policy.keys {
            let ws = &policy.workspaces[key.workspace as usize];
            let rules = key.rules.as_deref().unwrap_or(&ws.plain_key_rules);
            let hash = layout.key(&ws.id, &key.id);
            let usage = self.report(&hash, rules.span, now).await?;
            let mut models = Vec::with_capacity(key.model_rules.len());
            for (m, model_rules) in &*key.model_rules {
                let model = &policy.models[*m as usize].name;
                let hash = layout.key_model(&ws.id, &key.id, model);
                models.push(ModelUsage {
                    model: model.to_string(),
                    usage: self.report(&hash, model_rules.span, now).await?,
                });
            }
            keys.push(KeyUsage {
                id: key.id.to_string(),
                workspace: ws.id.to_string(),
                budgets: self.budgets(&hash, rules, usage, now).await?,
                models,
                temporary: temporary(key.temporary.as_deref(), now),
                usage,
            });
        }
        let org_hash = layout.org(&policy.org.id);
        let org = self.report(&org_hash, policy.org.rules.span, now).await?;
        let org_budgets = self.budgets(&org_hash, &policy.org.rules, org, now).await?;
        let wallet = self
            .report(&layout.wallet(&policy.org.id), Span::Forever, now)
            .await?;
        Ok(UsageSnapshot {
            taken_at: now,
            org,
            org_budgets,
            org_temporary: temporary(policy.org.temporary.as_deref(), now),
            wallet_spent: wallet.current.cost,
            workspaces,
            keys,
        })
    }

    /// Every budget of the level whose scope hash is `hash` (and whose own report is
    /// `own`): its further budgets are counted in hashes named by `extra_budget`.
    async fn budgets(
        &self,
        hash: &str,
        rules: &LevelRules,
        own: ScopeReport,
        now: Timestamp,
    ) -> Result<Vec<BudgetUsage>, StoreError> {
        let mut reports = vec![own];
        for id in rules.extra_budget_ids() {
            reports.push(self.report(&extra_budget(hash, id), id.0, now).await?);
        }
        Ok(budgets_of(rules, reports))
    }

    /// Usage of one end user of a workspace with `end_user_limits`, read from Redis
    /// (every instance's traffic); `None` when the workspace is unknown or sets no
    /// end-user limits. An end user never seen, or whose counters expired, reports
    /// zeros.
    ///
    /// # Errors
    /// [`Error::Store`] if Redis fails or a counter is corrupt.
    pub async fn end_user_usage(
        &self,
        workspace: &str,
        end_user: &str,
    ) -> Result<Option<ScopeReport>, Error> {
        let snap = self.inner.snapshot.load_full();
        let Some(w) = snap.workspace_index(workspace) else {
            return Ok(None);
        };
        let Some(rules) = snap.policy.workspaces[w as usize].end_users.as_deref() else {
            return Ok(None);
        };
        let key = self.inner.layout.end_user(workspace, end_user);
        let now = self.inner.clock.now();
        Ok(Some(self.report(&key, rules.rules.span, now).await?))
    }

    /// One scope hash as a report. A scope Redis has not seen (or has expired) reports
    /// zeros for the period containing `now`; a period that has ended without traffic
    /// since is reported as the previous one. Periods follow the kind the hash stores
    /// (only a reserve under the current policy changes it), else `span`.
    async fn report(
        &self,
        key: &str,
        span: Span,
        now: Timestamp,
    ) -> Result<ScopeReport, StoreError> {
        let mut connection = self.inner.connection.clone();
        let values: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(key)
            .arg(&FIELDS[..])
            .query_async(&mut connection)
            .await
            .map_err(|e| classify("usage", &e))?;
        let corrupt = |field: &str, value: &[u8]| {
            corrupt_reply(
                "usage",
                format!("{key} {field}={:?}", String::from_utf8_lossy(value)),
            )
        };
        let packed = values[0].as_deref().unwrap_or(&[]);
        let numbers = if packed.is_empty() {
            None
        } else {
            Some(unpack_numbers(packed).ok_or_else(|| corrupt("n", packed))?)
        };
        let number = |name: &str| -> Result<i64, StoreError> {
            match &numbers {
                None => Ok(0),
                Some(get) => get(name).ok_or_else(|| corrupt(name, packed)),
            }
        };
        // A string field: FIELDS[i], absent is 0.
        let field = |i: usize| -> Result<i64, StoreError> {
            values[i].as_deref().map_or(Ok(0), |v| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| corrupt(FIELDS[i], v))
            })
        };
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        // A period end of 0: no period started yet (a forever span ends at -1).
        let seen = numbers.is_some() && number("pe")? != 0;
        let span = if seen {
            match number("pk")? {
                0 => Span::Forever,
                1 => Span::Period(BudgetPeriod::Day),
                2 => Span::Period(BudgetPeriod::Month),
                _ => Span::Period(BudgetPeriod::Custom {
                    seconds: count(number("pks")?).max(1),
                }),
            }
        } else {
            span
        };
        let micros =
            |v: i64| Timestamp::from_unix_nanos(u64::try_from(v).unwrap_or(0).saturating_mul(1000));
        let (start, end) = bounds(span, now);
        let stored_start = micros(number("ps")?);
        let held = picos_to_decimal(field(2)?);
        let stored = ScopeUsage {
            period_start: stored_start,
            period_end: if number("pe")? < 0 {
                Timestamp::from_unix_nanos(u64::MAX)
            } else {
                micros(number("pe")?)
            },
            requests: count(number("req")?),
            input_tokens: count(number("in")?),
            output_tokens: count(number("out")?),
            cost: picos_to_decimal(field(1)?),
            held,
        };
        let stored_previous = ScopeUsage {
            period_start: micros(field(3)?),
            period_end: stored_start,
            requests: count(field(5)?),
            input_tokens: count(field(6)?),
            output_tokens: count(field(7)?),
            cost: picos_to_decimal(field(4)?),
            held: rust_decimal::Decimal::ZERO,
        };
        let empty = |period_start, period_end| ScopeUsage {
            period_start,
            period_end,
            ..ScopeUsage::default()
        };
        let just_before = Timestamp::from_unix_nanos(start.as_unix_nanos().saturating_sub(1));
        let nothing_before = empty(bounds(span, just_before).0, start);
        // Holds carry over into new periods, as in memory.
        let fresh = ScopeUsage {
            held,
            ..empty(start, end)
        };
        let (current, previous) = if !seen {
            (fresh, nothing_before) // never seen, or expired while idle
        } else if span == Span::Forever || stored_start == start {
            let previous = if values[3].is_some() {
                stored_previous
            } else {
                nothing_before
            };
            (stored, previous)
        } else if stored.period_end == start {
            // The stored period ended and no request has rolled it over since.
            let ended = ScopeUsage {
                held: rust_decimal::Decimal::ZERO,
                ..stored
            };
            (fresh, ended)
        } else {
            (fresh, nothing_before)
        };
        Ok(ScopeReport {
            current,
            previous,
            in_flight: u32::try_from(number("conc")?).unwrap_or(0),
        })
    }
}
