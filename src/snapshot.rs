//! An immutable view of a policy joined to its counters, swapped as a whole.
//!
//! Ids are interned here when a policy is applied: requests resolve `&str` and
//! digests through hash maps to indices, and indices to counter `Arc`s, without
//! allocating or locking. Applying a new policy builds a new snapshot that reuses
//! the counters of every id that persists.

use std::collections::HashMap;
use std::sync::Arc as StdArc;

use foldhash::fast::RandomState;

use crate::clock::Clock;
use crate::denial::Scope;
use crate::period::Span;
use crate::policy::rules::LevelRules;
use crate::policy::Policy;
use crate::store::ScopeState;
use crate::sync::Arc;

type Map<K> = HashMap<K, u32, RandomState>;

pub(crate) struct Snapshot {
    pub(crate) policy: Policy,
    /// The engine's clock, here so that a reservation, which keeps its snapshot,
    /// needs no reference count of its own to read the time when it settles.
    pub(crate) clock: StdArc<dyn Clock>,
    pub(crate) key_by_digest: Map<[u8; 32]>,
    pub(crate) key_by_id: Map<Box<str>>,
    pub(crate) workspace_by_id: Map<Box<str>>,
    pub(crate) model_by_name: Map<Box<str>>,
    pub(crate) keys: Vec<Arc<ScopeState>>,
    pub(crate) workspaces: Vec<Arc<ScopeState>>,
    /// Workspace × model counters, by workspace index then model index.
    pub(crate) workspace_models: Vec<Box<[Arc<ScopeState>]>>,
    pub(crate) org: Arc<ScopeState>,
    pub(crate) wallet: Arc<ScopeState>,
}

impl Snapshot {
    pub(crate) fn build(
        policy: Policy,
        previous: Option<&Snapshot>,
        clock: StdArc<dyn Clock>,
    ) -> Snapshot {
        let now = clock.now();
        // Reuse a counter of the previous snapshot by id, or start a fresh one.
        let reuse = |found: Option<&Arc<ScopeState>>, rules: &LevelRules| {
            found.map_or_else(|| ScopeState::new(rules, now), Arc::clone)
        };

        let mut model_by_name =
            Map::with_capacity_and_hasher(policy.models.len(), RandomState::default());
        for (m, model) in policy.models.iter().enumerate() {
            model_by_name.insert(model.name.clone(), m as u32);
        }

        let mut workspace_by_id =
            Map::with_capacity_and_hasher(policy.workspaces.len(), RandomState::default());
        let mut workspaces = Vec::with_capacity(policy.workspaces.len());
        let mut workspace_models = Vec::with_capacity(policy.workspaces.len());
        for (w, ws) in policy.workspaces.iter().enumerate() {
            workspace_by_id.insert(ws.id.clone(), w as u32);
            let old =
                previous.and_then(|p| p.workspace_by_id.get(&ws.id).map(|&i| (p, i as usize)));
            workspaces.push(reuse(old.map(|(p, i)| &p.workspaces[i]), &ws.rules));
            let models = policy
                .models
                .iter()
                .zip(ws.model_rules.iter())
                .map(|(model, rules)| {
                    let found = old.and_then(|(p, i)| {
                        let m = *p.model_by_name.get(&model.name)? as usize;
                        p.workspace_models[i].get(m)
                    });
                    reuse(found, rules)
                })
                .collect();
            workspace_models.push(models);
        }

        let mut key_by_digest =
            Map::with_capacity_and_hasher(policy.keys.len(), RandomState::default());
        let mut key_by_id =
            Map::with_capacity_and_hasher(policy.keys.len(), RandomState::default());
        let mut keys = Vec::with_capacity(policy.keys.len());
        for (k, key) in policy.keys.iter().enumerate() {
            key_by_digest.insert(key.digest, k as u32);
            key_by_id.insert(key.id.clone(), k as u32);
            let found = previous.and_then(|p| Some(&p.keys[*p.key_by_id.get(&key.id)? as usize]));
            let rules = key
                .rules
                .as_deref()
                .unwrap_or(&policy.workspaces[key.workspace as usize].plain_key_rules);
            keys.push(reuse(found, rules));
        }

        let org = reuse(previous.map(|p| &p.org), &policy.org.rules);
        // The wallet never rolls over, whether or not this policy sets one yet.
        let wallet = reuse(
            previous.map(|p| &p.wallet),
            &LevelRules::unlimited(Span::Forever),
        );
        Snapshot {
            policy,
            clock,
            key_by_digest,
            key_by_id,
            workspace_by_id,
            model_by_name,
            keys,
            workspaces,
            workspace_models,
            org,
            wallet,
        }
    }
}

/// The levels a request is checked against, in order.
pub(crate) const LEVELS: usize = 5;
/// Index of the wallet in the level order.
pub(crate) const WALLET_LEVEL: usize = LEVELS - 1;

/// Where one request's counters are in a snapshot.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Route {
    pub(crate) key: u32,
    pub(crate) workspace: u32,
    pub(crate) model: u32,
}

impl Snapshot {
    /// Level `level` of a request's route: the scope it reports as, its counters, and
    /// its rules (`None` when the level does not apply, e.g. an org without a wallet).
    /// Reserving and settling both go through here, so they can never disagree.
    #[inline(always)]
    pub(crate) fn level(
        &self,
        level: usize,
        route: Route,
    ) -> (Scope, &ScopeState, Option<&LevelRules>) {
        let policy = &self.policy;
        let (k, w, m) = (
            route.key as usize,
            route.workspace as usize,
            route.model as usize,
        );
        let ws = &policy.workspaces[w];
        match level {
            0 => {
                let key = &policy.keys[k];
                let rules = key.rules.as_deref().unwrap_or(&ws.plain_key_rules);
                (Scope::Key, &self.keys[k], Some(rules))
            }
            1 => (Scope::Workspace, &self.workspaces[w], Some(&ws.rules)),
            2 => (
                Scope::WorkspaceModel,
                &self.workspace_models[w][m],
                Some(&ws.model_rules[m]),
            ),
            3 => (Scope::Org, &self.org, Some(&policy.org.rules)),
            _ => (Scope::Org, &self.wallet, policy.org.wallet.as_ref()),
        }
    }
}
