//! Policy building and key tables shared by the benches and `examples/bench_table.rs`.
//!
//! Every bench request touches every level: the key, its workspace and the workspace ×
//! model each have an RPM and a TPM limit, the key, the workspace and the org each
//! have a monthly budget, and the org has a wallet. Limits sit near the validator's
//! cap (one unit per 100 ns: 600,000,000 per minute) and requests are tiny (one input
//! and one output token at 0.01 USD per million), so no bench request is ever refused:
//! every admission is checked with `expect`, so a denial would show as a panic.
//!
//! Keys are spread 20 to a workspace (the default cap), so a policy of 1,000,000
//! keys has 50,000 workspaces and a random key also means a random (cold) workspace.
//! Keys are visited in a random order fixed up front (`KeyTable`); the ids and secrets
//! are laid out in that visiting order, so reading the id a gateway already holds is
//! a sequential (cache-friendly) read, while the engine's lookup of that key's
//! counters is a random one, as it is in production.

#![allow(dead_code)]

use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tollgate::{
    BudgetPeriod, BudgetSpec, Decimal, Engine, KeySpec, LimitsSpec, ModelLimitSpec, ModelSpec,
    OrgSpec, Policy, PolicyDocument, Request, TemporarySpec, Usage, WorkspaceSpec,
};

/// The one model every bench request asks for.
pub const MODEL: &str = "gpt-bench";
/// Keys per workspace in the key-count benches (the default cap).
pub const KEYS_PER_WORKSPACE: usize = 20;
/// Near the validator's cap of one unit per 100 ns of a one-minute window.
pub const RATE: i64 = 590_000_000;
/// Fixed seed: every run visits keys in the same order.
pub const SEED: u64 = 0x7011_6a7e;

/// What a bench request reports back: 1 input and 1 output token.
pub const USAGE: Usage = Usage {
    input_tokens: 1,
    output_tokens: 1,
};

/// A decimal from text.
pub fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).expect("decimal")
}

/// A key id: fixed width so every id has the same length.
pub fn key_id(i: usize) -> String {
    format!("key-{i:07}")
}

/// A key's secret: fixed width.
pub fn secret(i: usize) -> String {
    format!("sk-bench-{i:07}")
}

/// A workspace id.
pub fn workspace_id(w: usize) -> String {
    format!("ws-{w:06}")
}

/// Which levels a bench policy sets.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Number of keys.
    pub keys: usize,
    /// Number of workspaces; key `i` belongs to workspace `i % workspaces`.
    pub workspaces: usize,
    /// Whether the org has a budget and a wallet (the org level is still taken for
    /// usage roll-up without them: the engine holds cost on every level).
    pub org_money: bool,
    /// Whether keys have their own limits and budget.
    pub key_limits: bool,
    /// Whether the rules of issue 18 are used too: key × model limits with a budget, a
    /// second (soft) budget on keys, workspaces and the org, and a temporary override
    /// in force on every workspace.
    pub every_rule: bool,
}

impl Shape {
    /// `keys` keys, 20 to a workspace, every level limited.
    pub fn keys(keys: usize) -> Self {
        Shape {
            keys,
            workspaces: keys.div_ceil(KEYS_PER_WORKSPACE).max(1),
            org_money: true,
            key_limits: true,
            every_rule: false,
        }
    }

    /// The same, with every further rule in use (see [`Shape::every_rule`]).
    pub fn with_every_rule(self) -> Self {
        Shape {
            every_rule: true,
            ..self
        }
    }
}

fn day_budget_soft() -> BudgetSpec {
    BudgetSpec::new(dec("1000000"), BudgetPeriod::Day).soft()
}

fn rate_limits() -> LimitsSpec {
    LimitsSpec {
        rpm: Some(RATE),
        tpm: Some(RATE),
        ..LimitsSpec::default()
    }
}

fn month_budget() -> BudgetSpec {
    BudgetSpec::new(dec("1000000"), BudgetPeriod::Month)
}

/// The policy document for `shape`.
pub fn document(shape: Shape) -> PolicyDocument {
    let keys_per_ws = shape.keys.div_ceil(shape.workspaces.max(1)).max(1);
    let mut org = OrgSpec::new("bench-org");
    org.max_workspaces = shape.workspaces.max(1) as i64;
    org.max_keys_per_workspace = keys_per_ws.max(20) as i64;
    if shape.org_money {
        org.wallet = Some(dec("1000000"));
        org.budget = Some(month_budget());
    }
    if shape.every_rule {
        org.budgets.push(day_budget_soft());
    }
    let mut doc = PolicyDocument::new(org).model(ModelSpec::new(MODEL, dec("0.01"), dec("0.01")));
    doc.workspaces.reserve(shape.workspaces);
    for w in 0..shape.workspaces {
        let mut ws = WorkspaceSpec::new(workspace_id(w), format!("bench-{w}"))
            .grant(MODEL)
            .limits(rate_limits())
            .budget(month_budget());
        ws.model_limits.push(ModelLimitSpec {
            budget: None,
            model: MODEL.into(),
            rpm: Some(RATE),
            tpm: Some(RATE),
            ..ModelLimitSpec::default()
        });
        if shape.every_rule {
            ws.budgets.push(day_budget_soft());
            let mut raised = TemporarySpec::until(chrono::DateTime::<chrono::Utc>::MAX_UTC);
            raised.rpm = Some(RATE);
            ws.temporary = Some(raised);
        }
        doc.workspaces.push(ws);
    }
    doc.keys.reserve(shape.keys);
    for i in 0..shape.keys {
        let mut key = KeySpec::new(key_id(i), workspace_id(i % shape.workspaces), &secret(i));
        if shape.key_limits {
            key.limits = rate_limits();
            key.budget = Some(month_budget());
        }
        if shape.every_rule {
            key.budgets.push(day_budget_soft());
            let mut limit = ModelLimitSpec::new(MODEL);
            limit.rpm = Some(RATE);
            limit.tpm = Some(RATE);
            limit.budget = Some(month_budget());
            key.model_limits.push(limit);
        }
        doc.keys.push(key);
    }
    doc
}

/// The validated policy for `shape`.
pub fn policy(shape: Shape) -> Policy {
    Policy::new(document(shape)).expect("valid bench policy")
}

/// An engine on the system clock for `shape`.
pub fn engine(shape: Shape) -> Engine {
    Engine::new(policy(shape))
}

/// Key ids and secrets in a fixed random visiting order, laid out contiguously.
pub struct KeyTable {
    ids: String,
    secrets: String,
    id_len: usize,
    secret_len: usize,
    len: usize,
}

impl KeyTable {
    /// `len` visits (a power of two) drawn uniformly from `keys` (key `i` for `i` in
    /// `keys`), in a fixed random order.
    pub fn random(keys: impl Fn(usize) -> usize, key_count: usize, len: usize) -> Self {
        assert!(len.is_power_of_two());
        let mut rng = StdRng::seed_from_u64(SEED ^ key_count as u64 ^ (len as u64) << 32);
        let order: Vec<usize> = (0..len)
            .map(|_| keys(rng.random_range(0..key_count)))
            .collect();
        Self::from_order(&order)
    }

    /// A table that visits keys in exactly this order (length a power of two).
    pub fn from_order(order: &[usize]) -> Self {
        assert!(order.len().is_power_of_two());
        let id_len = key_id(0).len();
        let secret_len = secret(0).len();
        let mut ids = String::with_capacity(order.len() * id_len);
        let mut secrets = String::with_capacity(order.len() * secret_len);
        for &k in order {
            ids.push_str(&key_id(k));
            secrets.push_str(&secret(k));
        }
        KeyTable {
            ids,
            secrets,
            id_len,
            secret_len,
            len: order.len(),
        }
    }

    /// Visits of keys `0..keys`: 2^20 visits for large policies (so a cycle does
    /// not fit in cache), fewer for small ones.
    pub fn for_keys(keys: usize) -> Self {
        let len = (keys * 4).next_power_of_two().clamp(1 << 12, 1 << 20);
        Self::random(|k| k, keys, len)
    }

    /// Number of visits in one cycle.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The key id of visit `j` (taken modulo the table length).
    #[inline]
    pub fn id(&self, j: usize) -> &str {
        let j = j & (self.len - 1);
        &self.ids[j * self.id_len..(j + 1) * self.id_len]
    }

    /// The secret of visit `j` (taken modulo the table length).
    #[inline]
    pub fn secret(&self, j: usize) -> &str {
        let j = j & (self.len - 1);
        &self.secrets[j * self.secret_len..(j + 1) * self.secret_len]
    }
}

/// The request a gateway that has already authenticated the key sends.
#[inline]
pub fn by_id(id: &str) -> Request<'_> {
    Request::with_key_id(id, MODEL)
        .input_tokens(1)
        .max_output_tokens(1)
}

/// The request carrying the client's secret (hashed with SHA-256 per call).
#[inline]
pub fn by_secret(secret: &str) -> Request<'_> {
    Request::with_secret(secret, MODEL)
        .input_tokens(1)
        .max_output_tokens(1)
}

/// One full admitted request: reserve on every level, then commit the usage.
#[inline]
pub fn reserve_commit(engine: &Engine, request: &Request<'_>) -> tollgate::Receipt {
    let reservation = engine.check_and_reserve(request).expect("admitted");
    engine.commit_usage(reservation, USAGE).expect("committed")
}

/// Criterion settings shared by every bench: short, so `cargo bench` stays well under
/// ten minutes on two cores.
pub fn criterion() -> criterion::Criterion {
    criterion::Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(1000))
        .measurement_time(std::time::Duration::from_millis(4000))
        .sample_size(100)
        .noise_threshold(0.03)
}
