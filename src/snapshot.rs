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
    /// Every alias as (model position, position in its model's `aliases`); indexed by
    /// `model_by_alias`, which is consulted only for names that are no model's.
    aliases: Vec<(u32, u32)>,
    model_by_alias: Index,
    pub(crate) keys: Vec<Arc<ScopeState>>,
    /// Counters of each key's budgets beyond the first (empty for most keys).
    pub(crate) key_budgets: Vec<Box<[Arc<ScopeState>]>>,
    /// Key × model counters, by key index then position in the key's `model_rules`.
    pub(crate) key_models: Vec<Box<[Arc<ScopeState>]>>,
    // Counters that many requests write are padded to their own cache lines: scopes
    // allocated one after another (workspace 0, workspace 1) would otherwise share a
    // line and make two cores serving different workspaces contend. Keys are not
    // padded: there are many, any two are rarely hot at once, and memory per key counts.
    pub(crate) workspaces: Vec<Arc<Padded<ScopeState>>>,
    /// Workspace × model counters, by workspace index then model index.
    pub(crate) workspace_models: Vec<Box<[Arc<Padded<ScopeState>>]>>,
    /// Counters of each workspace's budgets beyond the first.
    pub(crate) workspace_budgets: Vec<Box<[Arc<ScopeState>]>>,
    pub(crate) org: Arc<Padded<ScopeState>>,
    /// Counters of the org's budgets beyond the first.
    pub(crate) org_budgets: Box<[Arc<ScopeState>]>,
    pub(crate) wallet: Arc<Padded<ScopeState>>,
    /// End-user tables by workspace index, for workspaces with `end_user_limits`;
    /// handed on to the next snapshot by workspace id.
    pub(crate) end_users: Vec<Option<EndUserLevel>>,
    /// The engine's event sink, if it has one; carried from snapshot to snapshot.
    pub(crate) events: Option<StdArc<Events>>,
    /// The engine publishing this snapshot, told when a reservation settles after
    /// `next_change` so that counters adapt at the instant an override ends, before
    /// that settlement touches them (see [`Lapses`]). Carried from snapshot to
    /// snapshot; `None` where no engine publishes snapshots in turn (Redis).
    pub(crate) lapses: Option<std::sync::Weak<dyn Lapses>>,
    /// `next_change` of the newest snapshot built by the engine, shared by all its
    /// snapshots: a reservation settles on the snapshot it was admitted under, which
    /// may predate the override that has since ended. Read-mostly, so one load.
    lapse_at: StdArc<std::sync::atomic::AtomicU64>,
    /// Metric handles for this policy's workspaces and models (feature `metrics`).
    pub(crate) meters: Meters,
    /// Where `meters` came from; carried from snapshot to snapshot.
    pub(crate) meter_source: MeterSource,
    /// When a temporary override in this snapshot's policy starts or stops being in
    /// force (nanoseconds since the epoch; `u64::MAX`: never): the engine builds a
    /// new snapshot then, as for a policy change.
    pub(crate) next_change: u64,
}

/// Counters for budgets beyond a scope's first: reused from `old` (the previous
/// snapshot's counters and rules of the same scope) for a budget of the same identity
/// (see [`LevelRules::extra_budget_ids`]), or fresh.
fn extra_budgets(
    old: Option<(&[Arc<ScopeState>], &LevelRules)>,
    rules: &LevelRules,
    now: crate::clock::Timestamp,
) -> Box<[Arc<ScopeState>]> {
    rules
        .extra_budget_ids()
        .map(|id| {
            let found = old.and_then(|(cells, old_rules)| {
                let position = old_rules
                    .extra_budget_ids()
                    .position(|old_id| old_id == id)?;
                cells.get(position)
            });
            match found {
                Some(state) => Arc::clone(state),
                None => Arc::new(ScopeState::new(&LevelRules::unlimited(id.0), now, false)),
            }
        })
        .collect()
}

impl Snapshot {
    pub(crate) fn build(
        policy: Policy,
        previous: Option<&Snapshot>,
        clock: StdArc<dyn Clock>,
    ) -> Snapshot {
        let now = clock.now();
        Self::build_at(policy, previous, clock, now)
    }

    /// The snapshot that follows this one at its `next_change` (a temporary override
    /// starting or ending): the same policy, built as of that instant.
    pub(crate) fn at_next_change(&self) -> Snapshot {
        Self::build_at(
            self.policy.clone(),
            Some(self),
            StdArc::clone(&self.clock),
            Timestamp::from_unix_nanos(self.next_change),
        )
    }

    /// [`Snapshot::build`] as of `now`: the instant the policy takes effect (for a
    /// temporary override that starts or ends, that instant rather than the first
    /// request to notice it, so counters adapt as they would have then).
    pub(crate) fn build_at(
        mut policy: Policy,
        previous: Option<&Snapshot>,
        clock: StdArc<dyn Clock>,
        now: Timestamp,
    ) -> Snapshot {
        let next_change = policy.put_in_force(now);
        let lapse_at = previous.map_or_else(
            || StdArc::new(std::sync::atomic::AtomicU64::new(u64::MAX)),
            |p| StdArc::clone(&p.lapse_at),
        );
        lapse_at.store(
            next_change.map_or(u64::MAX, Timestamp::as_unix_nanos),
            std::sync::atomic::Ordering::Release,
        );
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
        let aliases: Vec<(u32, u32)> = (0..policy.models.len() as u32)
            .flat_map(|m| (0..policy.models[m as usize].aliases.len() as u32).map(move |a| (m, a)))
            .collect();
        let model_by_alias = Index::build(aliases.len(), |i| {
            let (m, a) = aliases[i as usize];
            &*policy.models[m as usize].aliases[a as usize]
        });
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
        let mut workspace_budgets = Vec::with_capacity(policy.workspaces.len());
        for ws in &policy.workspaces {
            let old = previous.and_then(|p| Some((p, p.workspace_index(&ws.id)? as usize)));
            workspaces.push(reuse_padded(
                old.map(|(p, i)| &p.workspaces[i]),
                &ws.rules,
                false,
            ));
            workspace_budgets.push(extra_budgets(
                old.map(|(p, i)| (&*p.workspace_budgets[i], &p.policy.workspaces[i].rules)),
                &ws.rules,
                now,
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
        let mut key_budgets = Vec::with_capacity(policy.keys.len());
        let mut key_models = Vec::with_capacity(policy.keys.len());
        for key in &policy.keys {
            let old = previous.and_then(|p| Some((p, p.key_index(&key.id)? as usize)));
            let rules = key
                .rules
                .as_deref()
                .unwrap_or(&policy.workspaces[key.workspace as usize].plain_key_rules);
            keys.push(reuse(old.map(|(p, k)| &p.keys[k]), rules));
            key_budgets.push(extra_budgets(
                old.map(|(p, k)| {
                    let old_key = &p.policy.keys[k];
                    let old_ws = &p.policy.workspaces[old_key.workspace as usize];
                    let old_rules = old_key.rules.as_deref().unwrap_or(&old_ws.plain_key_rules);
                    (&*p.key_budgets[k], old_rules)
                }),
                rules,
                now,
            ));
            // Key × model counters persist by model name.
            let models = key
                .model_rules
                .iter()
                .map(|(m, rules)| {
                    let found = old.and_then(|(p, k)| {
                        let name = &policy.models[*m as usize].name;
                        let old_m = p.model_index(name)?;
                        let pos = p.policy.keys[k].model_position(old_m)?;
                        p.key_models[k].get(pos as usize)
                    });
                    reuse(found, rules)
                })
                .collect();
            key_models.push(models);
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
        let org_budgets = extra_budgets(
            previous.map(|p| (&*p.org_budgets, &p.policy.org.rules)),
            &policy.org.rules,
            now,
        );
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
            aliases,
            model_by_alias,
            keys,
            key_budgets,
            key_models,
            workspaces,
            workspace_models,
            workspace_budgets,
            org,
            org_budgets,
            wallet,
            end_users,
            events: previous.and_then(|p| p.events.clone()),
            lapses: previous.and_then(|p| p.lapses.clone()),
            lapse_at,
            meters,
            meter_source,
            next_change: next_change.map_or(u64::MAX, Timestamp::as_unix_nanos),
        }
    }

    /// Take metric handles from `source` from now on (snapshots built from this one
    /// inherit it).
    pub(crate) fn set_meter_source(&mut self, source: MeterSource) {
        self.meters = Meters::register(&self.policy, &source);
        self.meter_source = source;
    }
}

/// The counters of a level's budgets beyond its first (`cells[i]`). They are rare:
/// looked up (one more load per level) only when the level's rules have some.
#[inline(always)]
fn extras_of<'a>(
    rules: &LevelRules,
    cells: &'a [Box<[Arc<ScopeState>]>],
    i: usize,
) -> &'a [Arc<ScopeState>] {
    if rules.more_budgets.is_empty() {
        &[]
    } else {
        &cells[i]
    }
}

/// What publishes snapshots in turn: puts temporary overrides that have ended (or
/// started) by `now` in or out of force, each as of its own instant.
pub(crate) trait Lapses: Send + Sync {
    fn put_temporary_in_force(&self, now: Timestamp);
}

impl Snapshot {
    /// Before settling at `now` on this snapshot's counters: if an override of the
    /// engine's newest policy has ended, have the engine adapt the counters first.
    #[inline]
    pub(crate) fn follow_lapses(&self, now: Timestamp) {
        let due = self.lapse_at.load(std::sync::atomic::Ordering::Acquire);
        if now.as_unix_nanos() >= due {
            self.follow_lapses_slow(now);
        }
    }

    #[cold]
    fn follow_lapses_slow(&self, now: Timestamp) {
        if let Some(engine) = self.lapses.as_ref().and_then(std::sync::Weak::upgrade) {
            engine.put_temporary_in_force(now);
        }
    }
}

/// The levels a request is checked against, in order: key, key × model, workspace,
/// workspace × model, org, wallet.
pub(crate) const LEVELS: usize = 6;
/// Index of the wallet in the level order.
pub(crate) const WALLET_LEVEL: usize = LEVELS - 1;
/// Index of the workspace in the level order.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) const WORKSPACE_LEVEL: usize = 2;

/// Where one request's counters are in a snapshot.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Route {
    pub(crate) key: u32,
    pub(crate) workspace: u32,
    pub(crate) model: u32,
    /// Position of the model in the key's `model_rules`, or `NO_KEY_MODEL`.
    pub(crate) key_model: u32,
}

/// `Route::key_model` of a key without limits for the model.
pub(crate) const NO_KEY_MODEL: u32 = u32::MAX;

/// One level of a request: the scope it reports as, its counters, its rules
/// (`None` when the level does not apply, e.g. an org without a wallet), and the
/// counters of its budgets beyond the first (parallel to `rules.more_budgets`).
#[derive(Clone, Copy)]
pub(crate) struct Level<'a> {
    pub(crate) scope: Scope,
    pub(crate) state: &'a ScopeState,
    pub(crate) rules: Option<&'a LevelRules>,
    pub(crate) extras: &'a [Arc<ScopeState>],
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

    /// The position of the model with this name (not alias): what counters are
    /// carried over by from one snapshot to the next, so that a new model named like
    /// an old alias starts counters of its own.
    #[inline]
    pub(crate) fn model_index(&self, name: &str) -> Option<u32> {
        self.model_by_name
            .get(name, |m| &*self.policy.models[m as usize].name)
    }

    /// The position of the model a request names, by its name or one of its aliases.
    #[inline]
    pub(crate) fn requested_model_index(&self, name: &str) -> Option<u32> {
        self.model_index(name)
            .or_else(|| self.model_index_by_alias(name))
    }

    fn model_index_by_alias(&self, alias: &str) -> Option<u32> {
        let models = &self.policy.models;
        let alias_of = |i: u32| {
            let (m, a) = self.aliases[i as usize];
            &*models[m as usize].aliases[a as usize]
        };
        let i = self.model_by_alias.get(alias, alias_of)?;
        Some(self.aliases[i as usize].0)
    }

    /// Level `level` of a request's route (see [`LEVELS`]). Reserving and settling
    /// both go through here, so they can never disagree.
    #[inline(always)]
    pub(crate) fn level(&self, level: usize, route: Route) -> Level<'_> {
        let policy = &self.policy;
        let (k, w, m) = (
            route.key as usize,
            route.workspace as usize,
            route.model as usize,
        );
        let ws = &policy.workspaces[w];
        let plain = |scope, state, rules| Level {
            scope,
            state,
            rules,
            extras: &[],
        };
        match level {
            0 => {
                let key = &policy.keys[k];
                let rules = key.rules.as_deref().unwrap_or(&ws.plain_key_rules);
                Level {
                    scope: Scope::Key,
                    state: &self.keys[k],
                    rules: Some(rules),
                    extras: extras_of(rules, &self.key_budgets, k),
                }
            }
            1 => match route.key_model {
                NO_KEY_MODEL => plain(Scope::KeyModel, &self.keys[k], None),
                p => plain(
                    Scope::KeyModel,
                    &self.key_models[k][p as usize],
                    Some(&policy.keys[k].model_rules[p as usize].1),
                ),
            },
            2 => Level {
                scope: Scope::Workspace,
                state: &self.workspaces[w],
                rules: Some(&ws.rules),
                extras: extras_of(&ws.rules, &self.workspace_budgets, w),
            },
            3 => plain(
                Scope::WorkspaceModel,
                &self.workspace_models[w][m],
                Some(&ws.model_rules[m]),
            ),
            4 => Level {
                scope: Scope::Org,
                state: &self.org,
                rules: Some(&policy.org.rules),
                extras: &self.org_budgets,
            },
            _ => plain(Scope::Org, &self.wallet, policy.org.wallet.as_ref()),
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
