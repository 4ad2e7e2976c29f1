//! The policy as written in a file or built in code: plain serde types.
//!
//! Everything here may still be wrong (a zero limit, a key in a workspace that does
//! not exist); [`Policy::new`](crate::Policy::new) checks it all and reports every
//! problem at once. Numbers are signed on purpose, so a negative limit reaches the
//! validator and is reported with its path instead of failing to parse.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::period::BudgetPeriod;

/// A whole policy: the org, its price table, workspaces and API keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// The account everything rolls up into.
    pub org: OrgSpec,
    /// Values used when nothing more specific is set.
    #[serde(default)]
    pub defaults: DefaultsSpec,
    /// The price table: every model that may be called.
    #[serde(default)]
    pub models: Vec<ModelSpec>,
    /// The org's workspaces.
    #[serde(default)]
    pub workspaces: Vec<WorkspaceSpec>,
    /// API keys, each in one workspace.
    #[serde(default)]
    pub keys: Vec<KeySpec>,
}

/// The org (account): wallet, org-wide budget and caps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgSpec {
    /// Stable id.
    pub id: String,
    /// Prepaid balance in USD; spend beyond it is refused. `None`: no wallet check.
    #[serde(default, deserialize_with = "exact_decimal::optional")]
    pub wallet: Option<Decimal>,
    /// Spend budget across all workspaces.
    #[serde(default)]
    pub budget: Option<BudgetSpec>,
    /// More budgets across all workspaces, each with its own period (e.g. $10 a day
    /// beside $200 a month); a request must fit every one. See [`MAX_BUDGETS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetSpec>,
    /// Limits raised or lowered until a given time, after which the base values
    /// return by themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporary: Option<TemporarySpec>,
    /// Most workspaces the org may have (default 20).
    #[serde(default = "default_cap")]
    pub max_workspaces: i64,
    /// Most keys one workspace may have (default 20).
    #[serde(default = "default_cap")]
    pub max_keys_per_workspace: i64,
    /// Id of the default workspace, which may call every priced model.
    #[serde(default)]
    pub default_workspace: Option<String>,
}

fn default_cap() -> i64 {
    20
}

impl OrgSpec {
    /// An org with default caps, no wallet and no budget.
    #[must_use]
    pub fn new(id: impl Into<String>) -> Self {
        OrgSpec {
            id: id.into(),
            wallet: None,
            budget: None,
            budgets: Vec::new(),
            temporary: None,
            max_workspaces: default_cap(),
            max_keys_per_workspace: default_cap(),
            default_workspace: None,
        }
    }
}

impl Default for OrgSpec {
    fn default() -> Self {
        OrgSpec::new("org")
    }
}

/// Fallbacks for values a request or scope does not set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSpec {
    /// Output tokens assumed (and reserved) when a request names no `max_tokens`.
    #[serde(default = "default_max_output")]
    pub max_output_tokens: i64,
}

fn default_max_output() -> i64 {
    4096
}

impl Default for DefaultsSpec {
    fn default() -> Self {
        DefaultsSpec {
            max_output_tokens: default_max_output(),
        }
    }
}

/// One model's price, in USD per million tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The model name requests use, e.g. `gpt-4o-mini`.
    pub name: String,
    /// Other names requests may use for this model, e.g. `gpt-4o-latest` for `gpt-4o`.
    /// A request naming an alias is this model in every respect: its price, its grants,
    /// its limits and its counters. Grants, `model_limits` and a key's `models` may name
    /// an alias too. Each must be unique across every model name and alias.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// USD per million input tokens (at most 6 decimals, at most 1000).
    #[serde(deserialize_with = "exact_decimal::required")]
    pub input_per_million: Decimal,
    /// USD per million output tokens (at most 6 decimals, at most 1000).
    #[serde(deserialize_with = "exact_decimal::required")]
    pub output_per_million: Decimal,
    /// Output tokens assumed for this model when a request names none.
    #[serde(default)]
    pub default_max_output_tokens: Option<i64>,
    /// The encoding input is counted with (feature `openai`): one of
    /// [`TOKENIZERS`](crate::TOKENIZERS), e.g. `o200k_base`. Unset: chosen by the
    /// model's name (`o200k_base` for GPT-4o, 4.1, 5 and the o-series, `cl100k_base`
    /// for GPT-4, 3.5 and the embeddings models, `o200k_base` for names it does not
    /// know).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Input tokens counted for each image (feature `openai`), instead of OpenAI's
    /// tile formula: for models that price images otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tokens: Option<i64>,
    /// Input tokens counted for each audio input (feature `openai`). Unset: a request
    /// with audio cannot be estimated and is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_tokens: Option<i64>,
    /// Input tokens counted for each attached file (feature `openai`). Unset: a request
    /// with a file cannot be estimated and is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_tokens: Option<i64>,
}

/// The encodings a model's `tokenizer` may name: OpenAI's, as tiktoken calls them.
pub const TOKENIZERS: &[&str] = &[
    "o200k_base",
    "cl100k_base",
    "p50k_base",
    "r50k_base",
    "o200k_harmony",
];

impl ModelSpec {
    /// A priced model.
    #[must_use]
    pub fn new(
        name: impl Into<String>,
        input_per_million: Decimal,
        output_per_million: Decimal,
    ) -> Self {
        ModelSpec {
            name: name.into(),
            aliases: Vec::new(),
            input_per_million,
            output_per_million,
            default_max_output_tokens: None,
            tokenizer: None,
            image_tokens: None,
            audio_tokens: None,
            file_tokens: None,
        }
    }

    /// Add another name requests may use for this model.
    #[must_use]
    pub fn alias(mut self, alias: impl Into<String>) -> Self {
        self.aliases.push(alias.into());
        self
    }
}

/// Which tokens a token limit counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenCount {
    /// Input plus output tokens (the default).
    #[default]
    Total,
    /// Input (prompt) tokens only.
    Input,
    /// Output (completion) tokens only.
    Output,
}

/// Rate limits of one scope. Unset means unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Requests per minute.
    #[serde(default)]
    pub rpm: Option<i64>,
    /// Requests per day (a rolling 24 hours).
    #[serde(default)]
    pub rpd: Option<i64>,
    /// Tokens per minute.
    #[serde(default)]
    pub tpm: Option<i64>,
    /// Which tokens `tpm` counts.
    #[serde(default)]
    pub tpm_counts: TokenCount,
    /// Requests in flight at once.
    #[serde(default)]
    pub max_concurrent: Option<i64>,
}

/// A spend budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    /// USD per period (at most 12 decimals).
    #[serde(deserialize_with = "exact_decimal::required")]
    pub limit: Decimal,
    /// When spend starts again from zero.
    #[serde(default)]
    pub period: BudgetPeriod,
    /// Percentages of the limit at which to alert, each within 0–100.
    #[serde(default)]
    pub alert_thresholds: Vec<i64>,
    /// A soft budget only alerts (its thresholds, and an exhausted alert at 100 %)
    /// and never refuses a request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub soft: bool,
}

impl BudgetSpec {
    /// A budget of `limit` USD per `period`, alerting at 50, 80 and 100 %.
    #[must_use]
    pub fn new(limit: Decimal, period: BudgetPeriod) -> Self {
        BudgetSpec {
            limit,
            period,
            alert_thresholds: vec![50, 80, 100],
            soft: false,
        }
    }

    /// The same budget, alerting only: it never refuses a request.
    #[must_use]
    pub fn soft(mut self) -> Self {
        self.soft = true;
        self
    }
}

/// Most budgets one scope may have (`budget` and `budgets` together).
pub const MAX_BUDGETS: usize = 4;

/// Limits that replace a scope's own until `until` (RFC 3339), then lapse by
/// themselves: the base values apply again without a policy edit. Each field set
/// replaces the base value (raising or lowering it); unset fields keep it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemporarySpec {
    /// The instant the override ends.
    pub until: DateTime<Utc>,
    /// Requests per minute while the override lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<i64>,
    /// Requests per day while the override lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpd: Option<i64>,
    /// Tokens per minute while the override lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<i64>,
    /// Requests in flight at once while the override lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<i64>,
    /// The limit of the scope's first budget (USD per its period) while the override
    /// lasts; the scope must have a budget.
    #[serde(
        default,
        deserialize_with = "exact_decimal::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub budget: Option<Decimal>,
    /// Why, for people reading the policy or a usage report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl TemporarySpec {
    /// An override until `until` that changes nothing yet.
    #[must_use]
    pub fn until(until: DateTime<Utc>) -> Self {
        TemporarySpec {
            until,
            rpm: None,
            rpd: None,
            tpm: None,
            max_concurrent: None,
            budget: None,
            reason: None,
        }
    }
}

/// Deployment stage of a workspace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    /// Live traffic (the default).
    #[default]
    Production,
    /// Pre-production.
    Staging,
    /// Experiments.
    Sandbox,
}

/// Whether a workspace may make requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceStatus {
    /// Requests are served (the default).
    #[default]
    Active,
    /// Held for review: requests are refused with 403.
    Review,
    /// Suspended: requests are refused with 403.
    Suspended,
}

/// Per-model limits inside a workspace.
///
/// Each model gets the most specific entry that matches it: its name or an alias
/// beats any pattern, and a longer pattern beats a shorter one. Two entries equally
/// specific for one model are refused as ambiguous.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLimitSpec {
    /// The model these limits apply to: a name, an alias, or a pattern ending in `*`
    /// (`gpt-4o*`: every priced model whose name starts with `gpt-4o`; `*`: all),
    /// which gives each model it matches limits of its own, not one shared limit.
    pub model: String,
    /// Requests per minute for this model in this workspace.
    #[serde(default)]
    pub rpm: Option<i64>,
    /// Tokens per minute for this model in this workspace.
    #[serde(default)]
    pub tpm: Option<i64>,
    /// Which tokens `tpm` counts.
    #[serde(default)]
    pub tpm_counts: TokenCount,
    /// Spend budget for this model in this scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,
}

impl ModelLimitSpec {
    /// No limits yet for `model`.
    #[must_use]
    pub fn new(model: impl Into<String>) -> Self {
        ModelLimitSpec {
            model: model.into(),
            ..ModelLimitSpec::default()
        }
    }
}

/// A workspace: a product and environment with its own keys, grants and limits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// Stable id.
    pub id: String,
    /// Display name, at most 30 characters of `A-Z a-z 0-9 - _`, e.g. `chatbot-production`.
    pub name: String,
    /// Deployment stage.
    #[serde(default)]
    pub environment: Environment,
    /// Where its traffic is served, free text such as `eu-west`.
    #[serde(default)]
    pub region: String,
    /// Whether it may make requests.
    #[serde(default)]
    pub status: WorkspaceStatus,
    /// Models this workspace may call (the default workspace may call all): names,
    /// aliases, or patterns ending in `*` (`gpt-4o*`: every priced model whose name
    /// starts with `gpt-4o`; `*`: all), each of which must match some priced model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Workspace-wide rate limits.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Per-model rate limits.
    #[serde(default)]
    pub model_limits: Vec<ModelLimitSpec>,
    /// Spend budget; rolls up into the org's.
    #[serde(default)]
    pub budget: Option<BudgetSpec>,
    /// More budgets, each with its own period; a request must fit every one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetSpec>,
    /// Limits raised or lowered until a given time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporary: Option<TemporarySpec>,
    /// Output tokens assumed when neither request, key nor model says.
    #[serde(default)]
    pub default_max_output_tokens: Option<i64>,
    /// What a distributed backend does when its counter store cannot answer.
    #[serde(default)]
    pub on_store_error: StoreFailureMode,
    /// The member id of the workspace's owner; must be one of `members`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// People who may administer this workspace, each with a role that applies here
    /// only. A member id may belong to several workspaces, with the same secret
    /// digest everywhere it appears (one credential per person).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberSpec>,
    /// `http://` URLs that receive this workspace's own events (budget alerts, key
    /// and workspace changes), at most [`MAX_WEBHOOKS`] of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<String>,
    /// Limits applied to each distinct end user (a request's
    /// [`end_user`](crate::Request::end_user)) the workspace sees, on top of the key's
    /// and the workspace's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_user_limits: Option<EndUserLimitsSpec>,
}

/// The default of [`EndUserLimitsSpec::max_tracked`].
pub const DEFAULT_MAX_TRACKED_END_USERS: i64 = 10_000;
/// The largest [`EndUserLimitsSpec::max_tracked`] accepted.
pub const MAX_TRACKED_END_USERS: i64 = 10_000_000;
/// The default of [`EndUserLimitsSpec::idle_secs`] (one hour).
pub const DEFAULT_END_USER_IDLE_SECS: i64 = 3_600;
/// The shortest [`EndUserLimitsSpec::idle_secs`] accepted (one minute: a minute's
/// rate windows must not be forgotten while they still count).
pub const MIN_END_USER_IDLE_SECS: i64 = 60;
/// The longest [`EndUserLimitsSpec::idle_secs`] accepted (400 days).
pub const MAX_END_USER_IDLE_SECS: i64 = 400 * 86_400;

/// Limits every end user of a workspace gets, each its own: counters are created the
/// first time an end user is seen.
///
/// In memory a workspace tracks at most `max_tracked` end users; to make room for a
/// new one, end users idle for `idle_secs` are forgotten first, then the least
/// recently seen one with no request in flight. A forgotten end user's windows and
/// budget start afresh when it comes back. In Redis an end user's counters expire
/// after `idle_secs` without a request. See the README's "End-user limits".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndUserLimitsSpec {
    /// Rate limits of each end user (`rpm`, `rpd`, `tpm`, `tpm_counts`,
    /// `max_concurrent`).
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Spend budget of each end user.
    #[serde(default)]
    pub budget: Option<BudgetSpec>,
    /// Most end users tracked in memory at once by one workspace (default
    /// [`DEFAULT_MAX_TRACKED_END_USERS`], 16 to [`MAX_TRACKED_END_USERS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tracked: Option<i64>,
    /// Seconds without a request after which an end user may be forgotten (default
    /// [`DEFAULT_END_USER_IDLE_SECS`], [`MIN_END_USER_IDLE_SECS`] to
    /// [`MAX_END_USER_IDLE_SECS`]); in Redis, its counters' idle TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_secs: Option<i64>,
}

impl EndUserLimitsSpec {
    /// Each end user limited by `limits`, with the default cap and idle time.
    #[must_use]
    pub fn new(limits: LimitsSpec) -> Self {
        EndUserLimitsSpec {
            limits,
            budget: None,
            max_tracked: None,
            idle_secs: None,
        }
    }

    /// Give each end user a spend budget.
    #[must_use]
    pub fn budget(mut self, budget: BudgetSpec) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Track at most `max` end users in memory per workspace.
    #[must_use]
    pub fn max_tracked(mut self, max: i64) -> Self {
        self.max_tracked = Some(max);
        self
    }

    /// Forget end users idle for `seconds` (in Redis: their counters' idle TTL).
    #[must_use]
    pub fn idle_secs(mut self, seconds: i64) -> Self {
        self.idle_secs = Some(seconds);
        self
    }
}

/// Most webhook URLs one workspace may list.
pub const MAX_WEBHOOKS: usize = 8;

/// Most members one workspace may have.
pub const MAX_MEMBERS: usize = 100;

/// What a workspace member may do in that workspace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    /// Everything in the workspace: its settings and its keys.
    Admin,
    /// Change the workspace's settings, limits, budgets and grants; read everything.
    Editor,
    /// Read only (the default).
    #[default]
    Viewer,
}

impl MemberRole {
    /// The role as written in a policy: `admin`, `editor` or `viewer`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            MemberRole::Admin => "admin",
            MemberRole::Editor => "editor",
            MemberRole::Viewer => "viewer",
        }
    }
}

/// A person's membership of one workspace. Only the SHA-256 digest of the member's
/// secret is kept, as for keys.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    /// Stable id (not secret), e.g. `alice@example.com` or `u_123`.
    pub id: String,
    /// What the member may do in this workspace.
    pub role: MemberRole,
    /// Lower- or upper-case hex SHA-256 of the member's secret; see
    /// [`KeySpec::digest_of`].
    pub secret_sha256: String,
}

impl MemberSpec {
    /// A member `id` with `role`, for `secret` (which is hashed here and not kept).
    #[must_use]
    pub fn new(id: impl Into<String>, role: MemberRole, secret: &str) -> Self {
        MemberSpec {
            id: id.into(),
            role,
            secret_sha256: KeySpec::digest_of(secret),
        }
    }
}

/// What a distributed backend (Redis) does for a workspace while its counter store is
/// unreachable. The in-memory engine has no such failure and ignores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreFailureMode {
    /// Deny with `store_unavailable` (HTTP 503): no request goes unmetered. The default.
    #[default]
    Closed,
    /// Admit against a local in-memory limiter whose limits and budgets are the
    /// policy's divided by the expected number of gateway instances: traffic keeps
    /// flowing, bounded per instance, and the spend it makes is counted locally only.
    Open,
}

impl WorkspaceSpec {
    /// An active production workspace with no grants and no limits.
    #[must_use]
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        WorkspaceSpec {
            id: id.into(),
            name: name.into(),
            ..WorkspaceSpec::default()
        }
    }

    /// Grant a model (a name, an alias or a pattern ending in `*`).
    #[must_use]
    pub fn grant(mut self, model: impl Into<String>) -> Self {
        self.models.push(model.into());
        self
    }

    /// Set the workspace rate limits.
    #[must_use]
    pub fn limits(mut self, limits: LimitsSpec) -> Self {
        self.limits = limits;
        self
    }

    /// Set the spend budget.
    #[must_use]
    pub fn budget(mut self, budget: BudgetSpec) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Add a budget beside the first (see [`WorkspaceSpec::budgets`]).
    #[must_use]
    pub fn also_budget(mut self, budget: BudgetSpec) -> Self {
        self.budgets.push(budget);
        self
    }

    /// Add per-model limits.
    #[must_use]
    pub fn model_limit(mut self, limit: ModelLimitSpec) -> Self {
        self.model_limits.push(limit);
        self
    }

    /// Override limits until a given time.
    #[must_use]
    pub fn temporary(mut self, temporary: TemporarySpec) -> Self {
        self.temporary = Some(temporary);
        self
    }

    /// Set what a distributed backend does while its store is unreachable.
    #[must_use]
    pub fn on_store_error(mut self, mode: StoreFailureMode) -> Self {
        self.on_store_error = mode;
        self
    }

    /// Add a member.
    #[must_use]
    pub fn member(mut self, member: MemberSpec) -> Self {
        self.members.push(member);
        self
    }

    /// Set the owner (a member id).
    #[must_use]
    pub fn owner(mut self, member: impl Into<String>) -> Self {
        self.owner = Some(member.into());
        self
    }

    /// Add a webhook URL for this workspace's events.
    #[must_use]
    pub fn webhook(mut self, url: impl Into<String>) -> Self {
        self.webhooks.push(url.into());
        self
    }

    /// Limit each end user of this workspace (see [`EndUserLimitsSpec`]).
    #[must_use]
    pub fn end_user_limits(mut self, limits: EndUserLimitsSpec) -> Self {
        self.end_user_limits = Some(limits);
        self
    }
}

/// Whether a key may be used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// Usable (the default).
    #[default]
    Active,
    /// Refused with 401.
    Revoked,
}

/// An API key. Only the SHA-256 digest of its secret is kept.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Stable id (not secret), e.g. `key_live_01`.
    pub id: String,
    /// Id of the workspace the key belongs to.
    pub workspace: String,
    /// Lower- or upper-case hex SHA-256 of the secret; see [`KeySpec::digest_of`].
    pub secret_sha256: String,
    /// Whether the key may be used.
    #[serde(default)]
    pub status: KeyStatus,
    /// The key is refused from this instant on (RFC 3339).
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// The key's own rate limits, on top of its workspace's.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// The key's own spend budget, on top of its workspace's.
    #[serde(default)]
    pub budget: Option<BudgetSpec>,
    /// More budgets of the key's own, each with its own period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetSpec>,
    /// Limits of this key for one model (RPM, TPM, budget), on top of the key's own
    /// and its workspace's limits for that model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_limits: Vec<ModelLimitSpec>,
    /// Limits raised or lowered until a given time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporary: Option<TemporarySpec>,
    /// Output tokens assumed for this key when a request names none.
    #[serde(default)]
    pub default_max_output_tokens: Option<i64>,
    /// The digest of the secret a rotation replaced, still accepted until
    /// `previous_secret_expires_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret_sha256: Option<String>,
    /// End of the previous secret's grace period (RFC 3339); set with
    /// `previous_secret_sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    /// The only models this key may call: names, aliases or patterns ending in `*`,
    /// each naming (or matching) models its workspace grants. Empty: every model its
    /// workspace grants.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

impl KeySpec {
    /// An active key for `secret` (which is hashed here and not kept).
    #[must_use]
    pub fn new(id: impl Into<String>, workspace: impl Into<String>, secret: &str) -> Self {
        KeySpec {
            id: id.into(),
            workspace: workspace.into(),
            secret_sha256: Self::digest_of(secret),
            ..KeySpec::default()
        }
    }

    /// Set the key's rate limits.
    #[must_use]
    pub fn limits(mut self, limits: LimitsSpec) -> Self {
        self.limits = limits;
        self
    }

    /// Set the key's first budget.
    #[must_use]
    pub fn budget(mut self, budget: BudgetSpec) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Add a budget beside the first.
    #[must_use]
    pub fn also_budget(mut self, budget: BudgetSpec) -> Self {
        self.budgets.push(budget);
        self
    }

    /// Add limits of this key for one model.
    #[must_use]
    pub fn model_limit(mut self, limit: ModelLimitSpec) -> Self {
        self.model_limits.push(limit);
        self
    }

    /// Override limits until a given time.
    #[must_use]
    pub fn temporary(mut self, temporary: TemporarySpec) -> Self {
        self.temporary = Some(temporary);
        self
    }

    /// Restrict the key to a model (a name, an alias or a pattern ending in `*`) among
    /// those its workspace grants; call again to allow more.
    #[must_use]
    pub fn allow_model(mut self, model: impl Into<String>) -> Self {
        self.models.push(model.into());
        self
    }

    /// The lower-case hex SHA-256 of a secret, as `secret_sha256` expects.
    #[must_use]
    pub fn digest_of(secret: &str) -> String {
        hex::encode(Sha256::digest(secret.as_bytes()))
    }
}

impl PolicyDocument {
    /// A document for `org` with nothing else in it.
    #[must_use]
    pub fn new(org: OrgSpec) -> Self {
        PolicyDocument {
            org,
            ..PolicyDocument::default()
        }
    }

    /// Add a model to the price table.
    #[must_use]
    pub fn model(mut self, model: ModelSpec) -> Self {
        self.models.push(model);
        self
    }

    /// Add a workspace.
    #[must_use]
    pub fn workspace(mut self, workspace: WorkspaceSpec) -> Self {
        self.workspaces.push(workspace);
        self
    }

    /// Add a key.
    #[must_use]
    pub fn key(mut self, key: KeySpec) -> Self {
        self.keys.push(key);
        self
    }
}

/// Money read from files without any rounding.
///
/// `rust_decimal`'s own `Deserialize` silently rounds text with more than 28
/// significant digits; here such text is an error, so the validator sees exactly what
/// was written. Numbers written as floats (TOML `0.075`) go through their shortest
/// round-trip text, which is the literal as written.
mod exact_decimal {
    use std::fmt;

    use rust_decimal::Decimal;
    use serde::de::{self, Deserializer, Visitor};

    struct Exact;

    impl Visitor<'_> for Exact {
        type Value = Decimal;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a decimal amount such as \"0.075\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Decimal, E> {
            Decimal::from_str_exact(text.trim()).map_err(|e| {
                E::custom(format_args!("{text:?} is not an exact decimal amount: {e}"))
            })
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Decimal, E> {
            if !v.is_finite() {
                return Err(E::custom(format_args!("{v} is not an amount of money")));
            }
            self.visit_str(&v.to_string())
        }
    }

    pub(super) fn required<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        d.deserialize_any(Exact)
    }

    pub(super) fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
        struct Maybe;
        impl<'de> Visitor<'de> for Maybe {
            type Value = Option<Decimal>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                Exact.expecting(f)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
                required(d).map(Some)
            }
        }
        d.deserialize_option(Maybe)
    }
}
