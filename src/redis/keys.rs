//! Where counters live in Redis: key names, hash tags, and which levels share a tag.
//!
//! ```text
//! <prefix>:v2:{ws:<workspace>}:key:<key id>      key level
//! <prefix>:v2:{ws:<workspace>}:user:<sha256>     end-user level (hex SHA-256 of the
//!                                                end-user id; idle TTL `idle_secs`)
//! <prefix>:v2:{ws:<workspace>}:ws                workspace level
//! <prefix>:v2:{ws:<workspace>}:keymodel:<key id>/<model>  key × model level
//! <prefix>:v2:{ws:<workspace>}:model:<model>     workspace × model level
//! <scope hash>/budget-<period>-<n>               a budget beyond a scope's first
//!                                                (period `day`, `month` or `<s>s`; n-th
//!                                                such budget of that period): money only
//! <prefix>:v2:{org:<org>}:org                    org budget and totals
//! <prefix>:v2:{org:<org>}:wallet                 org wallet (never expires)
//! <tag>:holds                                    zset: reservation id → expiry (ms)
//! <tag>:resv:<id>                                string: what one reservation holds (packed)
//! <tag>:done:<id>                                commit marker (idempotency)
//! <tag>:flags                                    hash, never expires: `revoked:<key id>`,
//!                                                `deleted`, `gen` (workspace generation),
//!                                                `sweep` (no hold expires before it, ms)
//! <prefix>:v2:{policy}:doc                       hash, never expires: the shared policy,
//!                                                `version`, `document` (JSON), `sha256`
//! <prefix>:v2:policy-versions                    pub/sub channel: each new version number
//! ```
//!
//! Flags that must outlive counters live in `<tag>:flags`, which no script ever gives a
//! TTL: counter hashes expire when idle, and late commits re-arm their TTLs.
//!
//! Everything one call touches on a cluster shares one hash tag, so it runs there:
//! a workspace's levels live under its workspace tag (workspaces spread over the
//! cluster's slots) and the org's budget and wallet under the org's tag.

use crate::end_users::{END_USER_AFTER, END_USER_LEVEL};
use crate::period::{BudgetPeriod, Span};
use crate::snapshot::{Route, Snapshot, LEVELS};

/// The version in every key name: a layout change gets a new one, so an old and a
/// new deployment never read each other's counters.
const VERSION: &str = "v2";

/// Levels under the workspace's tag (key, key × model, workspace, workspace × model);
/// the rest are under the org's.
const WORKSPACE_LEVELS: usize = 4;

/// The levels of one request that share a hash tag: one call each on a cluster (a
/// standalone server takes a request's groups in one call).
#[derive(Clone, Debug, Default)]
pub(crate) struct Group {
    pub(crate) tag: String,
    /// The workspace's group: the key whose revocation (and whose workspace's
    /// deletion) the reserve script checks. Its first level is the key, its second
    /// the workspace.
    pub(crate) key_id: Option<String>,
    /// The tag's generation when the reservation was taken (from the reserve's reply):
    /// a commit of a reservation from before the workspace was deleted settles nothing
    /// on its levels. Empty before the reserve.
    pub(crate) generation: String,
    /// Every level that applies, and every budget of a level beyond its first.
    pub(crate) levels: Vec<Member>,
}

/// One scope hash a group's call touches.
#[derive(Clone, Debug, Default)]
pub(crate) struct Member {
    /// The level it belongs to (see [`LEVELS`]).
    pub(crate) level: usize,
    /// 0 for the level's own hash (its limits and first budget); `i` for the hash of
    /// its budget `i` beyond the first, which holds only money.
    pub(crate) budget: usize,
    pub(crate) key: String,
}

impl Group {
    pub(crate) fn holds(&self) -> String {
        format!("{}:holds", self.tag)
    }

    pub(crate) fn record_base(&self) -> String {
        format!("{}:resv:", self.tag)
    }

    pub(crate) fn record(&self, id: &str) -> String {
        format!("{}:resv:{id}", self.tag)
    }

    pub(crate) fn done(&self, id: &str) -> String {
        format!("{}:done:{id}", self.tag)
    }

    pub(crate) fn flags(&self) -> String {
        format!("{}:flags", self.tag)
    }

    /// Holds zset, record, commit marker and flags, then the scope hashes in level
    /// order.
    pub(crate) fn keys(&self, id: &str) -> Vec<String> {
        let mut keys = vec![self.holds(), self.record(id), self.done(id), self.flags()];
        keys.extend(self.levels.iter().map(|member| member.key.clone()));
        keys
    }
}

/// The hash of a scope's budget beyond its first, named by the budget's identity (see
/// `LevelRules::extra_budget_ids`) so that editing the list of budgets keeps each
/// one's spend, after a `/`, which no id contains, so no other scope can share it.
pub(crate) fn extra_budget(scope: &str, (span, before): (Span, usize)) -> String {
    let period = match span {
        Span::Forever => "forever".to_owned(),
        Span::Period(BudgetPeriod::Day) => "day".to_owned(),
        Span::Period(BudgetPeriod::Month) => "month".to_owned(),
        Span::Period(BudgetPeriod::Custom { seconds }) => format!("{seconds}s"),
    };
    format!("{scope}/budget-{period}-{before}")
}

/// Key names under a configurable prefix, so deployments can share a server.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    prefix: String,
}

impl Layout {
    pub(crate) fn new(prefix: &str) -> Self {
        Layout {
            prefix: prefix.to_owned(),
        }
    }

    /// The shared policy document and its version.
    pub(crate) fn policy(&self) -> String {
        format!("{}:{VERSION}:{{policy}}:doc", self.prefix)
    }

    /// Where new policy versions are announced.
    pub(crate) fn policy_channel(&self) -> String {
        format!("{}:{VERSION}:policy-versions", self.prefix)
    }

    pub(crate) fn workspace_tag(&self, workspace: &str) -> String {
        format!("{}:{VERSION}:{{ws:{workspace}}}", self.prefix)
    }

    pub(crate) fn org_tag(&self, org: &str) -> String {
        format!("{}:{VERSION}:{{org:{org}}}", self.prefix)
    }

    /// The counters of key `key` of `workspace`.
    pub(crate) fn key(&self, workspace: &str, key: &str) -> String {
        format!("{}:key:{key}", self.workspace_tag(workspace))
    }

    /// The counters of key `key` of `workspace` for `model`.
    pub(crate) fn key_model(&self, workspace: &str, key: &str, model: &str) -> String {
        // Key ids never contain `/`, so the key and model parts cannot run together.
        format!("{}:keymodel:{key}/{model}", self.workspace_tag(workspace))
    }

    /// The counters of end user `end_user` of `workspace`. The id is the caller's
    /// (OpenAI's `user` may be an e-mail address): its SHA-256 keeps it out of key
    /// names and makes any text a safe, fixed-length key part.
    pub(crate) fn end_user(&self, workspace: &str, end_user: &str) -> String {
        use sha2::{Digest, Sha256};
        format!(
            "{}:user:{}",
            self.workspace_tag(workspace),
            hex::encode(Sha256::digest(end_user.as_bytes()))
        )
    }

    /// The workspace's own counters.
    pub(crate) fn workspace(&self, workspace: &str) -> String {
        format!("{}:ws", self.workspace_tag(workspace))
    }

    /// The counters of `model` within `workspace`.
    pub(crate) fn model(&self, workspace: &str, model: &str) -> String {
        format!("{}:model:{model}", self.workspace_tag(workspace))
    }

    /// The flags of `workspace` (revoked keys, deletion, generation): never expire.
    pub(crate) fn workspace_flags(&self, workspace: &str) -> String {
        format!("{}:flags", self.workspace_tag(workspace))
    }

    /// The org's budget counters.
    pub(crate) fn org(&self, org: &str) -> String {
        format!("{}:org", self.org_tag(org))
    }

    /// The org's wallet.
    pub(crate) fn wallet(&self, org: &str) -> String {
        format!("{}:wallet", self.org_tag(org))
    }

    /// The workspace group and the org group of a request's levels. `end_user` is the
    /// end user's scope hash ([`Layout::end_user`]) when that level applies: it goes
    /// right after the key × model level, in the workspace's group.
    pub(crate) fn groups(
        &self,
        snap: &Snapshot,
        route: Route,
        mut end_user: Option<String>,
    ) -> [Group; 2] {
        let policy = &snap.policy;
        let ws = &policy.workspaces[route.workspace as usize];
        let ws_tag = self.workspace_tag(&ws.id);
        let org_tag = self.org_tag(&policy.org.id);
        let mut workspace = Group {
            tag: ws_tag.clone(),
            key_id: Some(policy.keys[route.key as usize].id.to_string()),
            generation: String::new(),
            levels: Vec::with_capacity(WORKSPACE_LEVELS + 1),
        };
        let mut org = Group {
            tag: org_tag.clone(),
            key_id: None,
            generation: String::new(),
            levels: Vec::with_capacity(LEVELS - WORKSPACE_LEVELS),
        };
        for level in 0..LEVELS {
            // The end user's hash comes where the in-memory engine checks it: right
            // before the workspace's level.
            if level == END_USER_AFTER + 1 {
                if let Some(key) = end_user.take() {
                    workspace.levels.push(Member {
                        level: END_USER_LEVEL,
                        budget: 0,
                        key,
                    });
                }
            }
            let Some(rules) = snap.level(level, route).rules else {
                continue;
            };
            let key = match level {
                0 => self.key(&ws.id, &policy.keys[route.key as usize].id),
                1 => self.key_model(
                    &ws.id,
                    &policy.keys[route.key as usize].id,
                    &policy.models[route.model as usize].name,
                ),
                2 => self.workspace(&ws.id),
                3 => self.model(&ws.id, &policy.models[route.model as usize].name),
                4 => self.org(&policy.org.id),
                _ => self.wallet(&policy.org.id),
            };
            let group = if level < WORKSPACE_LEVELS {
                &mut workspace
            } else {
                &mut org
            };
            // Budgets beyond the first: one money-only hash each, under the same tag,
            // checked after the level's own (as the in-memory engine does).
            let extras: Vec<Member> = rules
                .extra_budget_ids()
                .enumerate()
                .map(|(i, id)| Member {
                    level,
                    budget: i + 1,
                    key: extra_budget(&key, id),
                })
                .collect();
            group.levels.push(Member {
                level,
                budget: 0,
                key,
            });
            group.levels.extend(extras);
        }
        [workspace, org]
    }
}
