//! An immutable view of a policy joined to its counters, swapped as a whole.
//!
//! Ids are indexed here when a policy is applied: requests resolve `&str` and
//! digests through hash indices to positions, and positions to counters, without
//! allocating or locking. Applying a new policy builds a new snapshot that reuses
//! the counters of every id that persists.

use std::ops::Deref;
use std::sync::Arc as StdArc;

use crate::clock::{Clock, Timestamp};
use crate::denial::Scope;
use crate::end_users::EndUserLevel;
use crate::events::Events;
use crate::index::Index;
use crate::period::Span;
use crate::policy::rules::LevelRules;
use crate::policy::{KeyStatus, Policy};
use crate::store::ScopeState;
use crate::sync::{thread_share, Arc, Padded, SHARES};
use crate::telemetry::{MeterSource, Meters};

pub(crate) struct Snapshot {
    pub(crate) policy: Policy,
    /// The engine's clock, here so that a reservation, which keeps its snapshot,
    /// needs no reference count of its own to read the time when it settles.
    pub(crate) clock: StdArc<dyn Clock>,
    key_by_digest: Index,
    /// Keys with a rotated-out secret still in its grace period, by that digest:
    /// positions into `rotated`, which holds key positions.
    key_by_previous_digest: Index,
    rotated: Vec<u32>,
    key_by_id: Index,
    workspace_by_id: Index,
    model_by_name: Index,
    pub(crate) keys: Vec<Arc<ScopeState>>,
    // Counters that many requests write are padded to their own cache lines: scopes
    // allocated one after another (workspace 0, workspace 1) would otherwise share a
    // line and make two cores serving different workspaces contend. Keys are not
    // padded: there are many, any two are rarely hot at once, and memory per key counts.
    pub(crate) workspaces: Vec<Arc<Padded<ScopeState>>>,
    /// Workspace × model counters, by workspace index then model index.
    pub(crate) workspace_models: Vec<Box<[Arc<Padded<ScopeState>>]>>,
    pub(crate) org: Arc<Padded<ScopeState>>,
    pub(crate) wallet: Arc<Padded<ScopeState>>,
    /// End-user tables by workspace index, for workspaces with `end_user_limits`;
    /// handed on to the next snapshot by workspace id.
    pub(crate) end_users: Vec<Option<EndUserLevel>>,
    /// The engine's event sink, if it has one; carried from snapshot to snapshot.
    pub(crate) events: Option<StdArc<Events>>,
    /// Metric handles for this policy's workspaces and models (feature `metrics`).
    pub(crate) meters: Meters,
    /// Where `meters` came from; carried from snapshot to snapshot.
    pub(crate) meter_source: MeterSource,
}

impl Snapshot {
    pub(crate) fn build(
        policy: Policy,
        previous: Option<&Snapshot>,
        clock: StdArc<dyn Clock>,
    ) -> Snapshot {
        let now = clock.now();
        // Reuse a counter of the previous snapshot by id (adapted to the new rules),
        // or start a fresh one.
        let reuse = |found: Option<&Arc<ScopeState>>, rules: &LevelRules| match found {
            Some(state) => {
                state.adapt(rules, now);
                Arc::clone(state)
            }
            None => Arc::new(ScopeState::new(rules, now, false)),
        };
        let reuse_padded =
            |found: Option<&Arc<Padded<ScopeState>>>, rules: &LevelRules, shared| match found {
                Some(state) => {
                    state.adapt(rules, now);
                    Arc::clone(state)
                }
                None => Arc::new(Padded(ScopeState::new(rules, now, shared))),
            };

        let model_by_name = Index::build(policy.models.len(), |m| &*policy.models[m as usize].name);
        let workspace_by_id = Index::build(policy.workspaces.len(), |w| {
            &*policy.workspaces[w as usize].id
        });
        let key_by_id = Index::build(policy.keys.len(), |k| &*policy.keys[k as usize].id);
        let key_by_digest = Index::build(policy.keys.len(), |k| &policy.keys[k as usize].digest);
        let rotated: Vec<u32> = (0..policy.keys.len() as u32)
            .filter(|&k| policy.keys[k as usize].previous.is_some())
            .collect();
        let previous_digest = |r: u32| {
            let key = &policy.keys[rotated[r as usize] as usize];
            key.previous
                .as_ref()
                .map_or(&key.digest, |(digest, _)| digest)
        };
        let key_by_previous_digest = Index::build(rotated.len(), previous_digest);

        let mut workspaces = Vec::with_capacity(policy.workspaces.len());
        let mut workspace_models = Vec::with_capacity(policy.workspaces.len());
        for ws in &policy.workspaces {
            let old = previous.and_then(|p| Some((p, p.workspace_index(&ws.id)? as usize)));
            workspaces.push(reuse_padded(
                old.map(|(p, i)| &p.workspaces[i]),
                &ws.rules,
                false,
            ));
            let models = policy
                .models
                .iter()
                .zip(ws.model_rules.iter())
                .map(|(model, rules)| {
                    let found = old.and_then(|(p, i)| {
                        let m = p.model_index(&model.name)? as usize;
                        p.workspace_models[i].get(m)
                    });
                    reuse_padded(found, rules, false)
                })
                .collect();
            workspace_models.push(models);
        }

        let end_users = policy
            .workspaces
            .iter()
            .map(|ws| {
                let rules = ws.end_users.as_deref()?;
                let old = previous.and_then(|p| {
                    let i = p.workspace_index(&ws.id)? as usize;
                    let old_rules = p.policy.workspaces[i].end_users.as_deref()?;
                    Some((p.end_users[i].as_ref()?, old_rules))
                });
                Some(match old {
                    Some((level, old_rules)) => level.carried(old_rules.rules != rules.rules),
                    None => EndUserLevel::new(),
                })
            })
            .collect();

        let mut keys = Vec::with_capacity(policy.keys.len());
        for key in &policy.keys {
            let found = previous.and_then(|p| Some(&p.keys[p.key_index(&key.id)? as usize]));
            let rules = key
                .rules
                .as_deref()
                .unwrap_or(&policy.workspaces[key.workspace as usize].plain_key_rules);
            keys.push(reuse(found, rules));
        }

        // Published before the snapshot is: a request that looked a key up in the
        // previous policy checks this flag after reserving.
        for (state, key) in keys.iter().zip(&policy.keys) {
            state.set_revoked(key.status == KeyStatus::Revoked);
        }
        if let Some(previous) = previous {
            // Keys gone from the policy (deleted, or their workspace deleted).
            for (k, key) in previous.policy.keys.iter().enumerate() {
                let gone = key_by_id
                    .get(&*key.id, |i| &*policy.keys[i as usize].id)
                    .is_none();
                if gone {
                    previous.keys[k].set_revoked(true);
                }
            }
        }

        // Every request writes the org's and the wallet's counters: split their tallies.
        let org = reuse_padded(previous.map(|p| &p.org), &policy.org.rules, true);
        // The wallet never rolls over, whether or not this policy sets one yet.
        let forever = LevelRules::unlimited(Span::Forever);
        let wallet = reuse_padded(previous.map(|p| &p.wallet), &forever, true);
        let meter_source = previous.map(|p| p.meter_source.clone()).unwrap_or_default();
        let meters = Meters::register(&policy, &meter_source);
        Snapshot {
            policy,
            clock,
            key_by_digest,
            key_by_previous_digest,
            rotated,
            key_by_id,
            workspace_by_id,
            model_by_name,
            keys,
            workspaces,
            workspace_models,
            org,
            wallet,
            end_users,
            events: previous.and_then(|p| p.events.clone()),
            meters,
            meter_source,
        }
    }

    /// Take metric handles from `source` from now on (snapshots built from this one
    /// inherit it).
    pub(crate) fn set_meter_source(&mut self, source: MeterSource) {
        self.meters = Meters::register(&self.policy, &source);
        self.meter_source = source;
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
    /// The id of the key a request was admitted for.
    pub(crate) fn key_id(&self, route: &Route) -> &str {
        &self.policy.keys[route.key as usize].id
    }

    /// The id of the workspace a request was admitted in.
    pub(crate) fn workspace_id(&self, route: &Route) -> &str {
        &self.policy.workspaces[route.workspace as usize].id
    }

    /// The position of the key with this id.
    #[inline]
    pub(crate) fn key_index(&self, id: &str) -> Option<u32> {
        self.key_by_id
            .get(id, |k| &*self.policy.keys[k as usize].id)
    }

    /// The position of the key whose secret has this SHA-256 digest.
    #[inline]
    pub(crate) fn key_index_by_digest(&self, digest: &[u8; 32]) -> Option<u32> {
        self.key_by_digest
            .get(digest, |k| &self.policy.keys[k as usize].digest)
    }

    /// The position of the key whose rotated-out secret has this digest, if its
    /// grace period has not ended at `now`. Only reached for unknown digests.
    #[cold]
    pub(crate) fn key_index_by_previous_digest(
        &self,
        digest: &[u8; 32],
        now: Timestamp,
    ) -> Option<u32> {
        let keys = &self.policy.keys;
        let r = self.key_by_previous_digest.get(digest, |r| {
            let key = &keys[self.rotated[r as usize] as usize];
            key.previous
                .as_ref()
                .map_or(&key.digest, |(digest, _)| digest)
        })?;
        let k = self.rotated[r as usize];
        let (_, until) = keys[k as usize].previous?;
        (now < until).then_some(k)
    }

    /// The position of the workspace with this id.
    pub(crate) fn workspace_index(&self, id: &str) -> Option<u32> {
        self.workspace_by_id
            .get(id, |w| &*self.policy.workspaces[w as usize].id)
    }

    /// The position of the model with this name.
    #[inline]
    pub(crate) fn model_index(&self, name: &str) -> Option<u32> {
        self.model_by_name
            .get(name, |m| &*self.policy.models[m as usize].name)
    }

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

/// A snapshot as the engine publishes it, with reference-count shares for reservations.
///
/// Every admitted request keeps its snapshot alive until it settles. Counted on the
/// snapshot itself, that reference count would be one cache line that every request on
/// every core writes twice; instead a request takes its reference on its thread's
/// share: a separate allocation, on its own cache lines, holding one reference to the
/// snapshot.
pub(crate) struct Published {
    snapshot: Arc<Snapshot>,
    shares: Box<[Arc<Share>]>,
}

/// One thread's share of a snapshot's reference count.
#[repr(align(128))]
pub(crate) struct Share(Arc<Snapshot>);

impl Published {
    pub(crate) fn new(snapshot: Snapshot) -> Self {
        let snapshot = Arc::new(snapshot);
        let shares = (0..SHARES)
            .map(|_| Arc::new(Share(Arc::clone(&snapshot))))
            .collect();
        Published { snapshot, shares }
    }

    /// A reference to the snapshot for a reservation, counted on this thread's share.
    #[inline]
    pub(crate) fn share(&self) -> Arc<Share> {
        Arc::clone(&self.shares[thread_share()])
    }

    /// The snapshot itself.
    pub(crate) fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }
}

impl Deref for Published {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl Deref for Share {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.0
    }
}
