//! The checked, typed form of a policy that the engine runs on.

use crate::bucket::RateRule;
use crate::clock::Timestamp;
use crate::period::Span;
use crate::policy::document::{
    Environment, KeyStatus, StoreFailureMode, TokenCount, WorkspaceStatus,
};

/// A token limit and which tokens it counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TokenRule {
    pub(crate) rate: RateRule,
    pub(crate) counts: TokenCount,
}

impl TokenCount {
    /// The tokens a limit of this kind counts out of an input and an output count.
    pub(crate) fn pick(self, input: u64, output: u64) -> u64 {
        match self {
            TokenCount::Total => input.saturating_add(output),
            TokenCount::Input => input,
            TokenCount::Output => output,
        }
    }
}

/// A spend limit in pico-dollars.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BudgetRule {
    pub(crate) limit: i64,
    pub(crate) thresholds: Box<[u8]>,
    /// Alerts only, never refuses.
    pub(crate) soft: bool,
    /// The periods this budget's spend is counted over.
    pub(crate) span: Span,
}

impl BudgetRule {
    /// What admission checks against: a soft budget admits whatever it holds.
    #[inline]
    pub(crate) fn enforced_limit(&self) -> i64 {
        if self.soft {
            i64::MAX
        } else {
            self.limit
        }
    }
}

/// Rules that replace a scope's own until `until`, and the scope's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Temporary {
    pub(crate) until: Timestamp,
    pub(crate) base: LevelRules,
    pub(crate) raised: LevelRules,
}

impl Temporary {
    /// The rules in force at `now`.
    pub(crate) fn at(&self, now: Timestamp) -> &LevelRules {
        if now < self.until {
            &self.raised
        } else {
            &self.base
        }
    }
}

/// Every limit one level (key, workspace, workspace × model, org, wallet) enforces,
/// and the span its usage counters cover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LevelRules {
    pub(crate) rpm: Option<RateRule>,
    pub(crate) rpd: Option<RateRule>,
    pub(crate) tpm: Option<TokenRule>,
    pub(crate) max_concurrent: Option<u32>,
    pub(crate) budget: Option<BudgetRule>,
    /// Budgets beyond the first, each counted over its own periods (by counters the
    /// snapshot keeps beside the scope's, in this order).
    pub(crate) more_budgets: Box<[BudgetRule]>,
    pub(crate) span: Span,
}

impl LevelRules {
    /// Every budget of the level, the first one first.
    pub(crate) fn budgets(&self) -> impl Iterator<Item = &BudgetRule> {
        self.budget.iter().chain(self.more_budgets.iter())
    }

    /// Each budget beyond the first with what identifies its counters across policy
    /// changes: its period, and how many of the budgets before it have the same
    /// period. Adding, removing or reordering budgets keeps each one's spend with the
    /// budget of that period, rather than with whichever now sits at its position.
    pub(crate) fn extra_budget_ids(&self) -> impl Iterator<Item = (Span, usize)> + '_ {
        self.more_budgets.iter().enumerate().map(|(i, budget)| {
            let before = self.more_budgets[..i]
                .iter()
                .filter(|other| other.span == budget.span)
                .count();
            (budget.span, before)
        })
    }

    pub(crate) fn unlimited(span: Span) -> Self {
        LevelRules {
            rpm: None,
            rpd: None,
            tpm: None,
            max_concurrent: None,
            budget: None,
            more_budgets: Box::new([]),
            span,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ModelPolicy {
    pub(crate) name: Box<str>,
    /// Other names requests may use for this model.
    pub(crate) aliases: Box<[Box<str>]>,
    /// Pico-dollars per input token.
    pub(crate) input_price: u64,
    /// Pico-dollars per output token.
    pub(crate) output_price: u64,
    pub(crate) default_max_output: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WorkspacePolicy {
    pub(crate) id: Box<str>,
    pub(crate) name: Box<str>,
    pub(crate) environment: Environment,
    pub(crate) region: Box<str>,
    pub(crate) status: WorkspaceStatus,
    /// Granted, by model index (all true for the default workspace).
    pub(crate) granted: Box<[bool]>,
    pub(crate) rules: LevelRules,
    /// An override of `rules` until a given time.
    pub(crate) temporary: Option<Box<Temporary>>,
    /// Workspace × model limits, by model index.
    pub(crate) model_rules: Box<[LevelRules]>,
    /// Rules of a key that sets none of its own: nothing to enforce, usage counted
    /// over the workspace's period.
    pub(crate) plain_key_rules: LevelRules,
    pub(crate) default_max_output: Option<u32>,
    pub(crate) on_store_error: StoreFailureMode,
    /// Limits of each end user, when the workspace sets them.
    pub(crate) end_users: Option<Box<EndUserRules>>,
}

/// A workspace's per-end-user limits and how many end users it tracks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EndUserRules {
    /// What each end user's counters enforce.
    pub(crate) rules: LevelRules,
    /// Most end users tracked in memory at once.
    pub(crate) max_tracked: u32,
    /// Idle time after which an end user may be forgotten (in memory) or expires (the
    /// Redis idle TTL of its counters), in nanoseconds.
    pub(crate) idle_nanos: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyPolicy {
    pub(crate) id: Box<str>,
    pub(crate) workspace: u32,
    pub(crate) digest: [u8; 32],
    /// A rotated-out secret's digest and the end of its grace period.
    pub(crate) previous: Option<([u8; 32], Timestamp)>,
    pub(crate) status: KeyStatus,
    pub(crate) expires_at: Option<Timestamp>,
    /// `None` for the common key without limits of its own, to keep keys small.
    pub(crate) rules: Option<Box<LevelRules>>,
    /// An override of `rules` until a given time.
    pub(crate) temporary: Option<Box<Temporary>>,
    /// Key × model limits: (model index, rules), sorted by model index; empty for
    /// most keys.
    pub(crate) model_rules: Box<[(u32, LevelRules)]>,
    /// The models the key may call, by model index, when it names its own subset of
    /// its workspace's grants; `None` (the common key) to keep keys small.
    pub(crate) granted: Option<Box<[bool]>>,
    pub(crate) default_max_output: Option<u32>,
}

impl KeyPolicy {
    /// Which of `model_rules` applies to `model`, if any.
    #[inline]
    pub(crate) fn model_position(&self, model: u32) -> Option<u32> {
        if self.model_rules.is_empty() {
            return None;
        }
        self.model_rules
            .binary_search_by_key(&model, |(m, _)| *m)
            .ok()
            .map(|p| p as u32)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OrgPolicy {
    pub(crate) id: Box<str>,
    pub(crate) rules: LevelRules,
    /// An override of `rules` until a given time.
    pub(crate) temporary: Option<Box<Temporary>>,
    pub(crate) wallet: Option<LevelRules>,
    pub(crate) default_max_output: u32,
    pub(crate) max_workspaces: u32,
    pub(crate) max_keys_per_workspace: u32,
}
