//! The control plane on the Redis backend: the same operations as the in-memory
//! engine, on the policy document every instance shares (`policy_store::redis`).
//!
//! A change edits the newest stored version, is stored by compare-and-set, and every
//! instance applies the new version (`policy_sync`). Revocations and deletions are
//! also flags in Redis that the reserve function checks, so every instance refuses a
//! revoked key or a deleted workspace's keys from the moment the operation returns,
//! even before it has applied the new version. The flags live in the workspace's
//! `flags` hash, which never expires. A deleted workspace's counters are dropped from
//! Redis, and its generation moves on: its reservations still in flight settle at
//! the org level only, so a re-created workspace starts from zero.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::control::{next_policy, successor, Change, IssuedKey, NewKey, WorkspaceUpdate};
use crate::denial::{Error, StoreError, StoreErrorKind};
use crate::policy::rules::LevelRules;
use crate::policy::{KeyStatus, Policy, WorkspaceSpec};
use crate::policy_store::redis::{self as store, Cas};
use crate::redis::error::classify;
use crate::redis::keys::extra_budget;
use crate::redis::scripts::{self, Function};
use crate::redis::{calls, RedisEngine};
use crate::snapshot::Snapshot;

/// How many times a change is re-applied on top of other instances' changes before
/// it gives up (each attempt is two or three round trips).
const MAX_ATTEMPTS: u64 = 64;

/// What a scope's counters follow of its rules: the three rate intervals (0: no
/// limit) and the budget period.
fn rule_signature(rules: &LevelRules) -> [u64; 5] {
    let interval = |rule: Option<&crate::bucket::RateRule>| rule.map_or(0, |r| r.interval);
    let (kind, seconds) = calls::period_args(rules.span);
    [
        interval(rules.rpm.as_ref()),
        interval(rules.rpd.as_ref()),
        interval(rules.tpm.as_ref().map(|t| &t.rate)),
        u64::from(kind),
        seconds,
    ]
}

impl RedisEngine {
    /// Replace the shared policy, for every instance (see
    /// [`crate::Engine::apply_policy`]).
    ///
    /// # Errors
    /// [`Error::Store`] if Redis could not store it; then nothing changed anywhere.
    pub async fn apply_policy(&self, policy: Policy) -> Result<(), Error> {
        self.change(Change::Replace(policy.document().clone()), None)
            .await
            .map(drop)
    }

    /// Load a policy file and apply it.
    ///
    /// # Errors
    /// The file's read, parse or validation errors, or [`Error::Store`].
    pub async fn apply_policy_file(
        &self,
        path: impl AsRef<Path>,
        actor: Option<&str>,
    ) -> Result<(), Error> {
        let policy = Policy::from_path(path)?;
        self.change(Change::Replace(policy.document().clone()), actor)
            .await
            .map(drop)
    }

    /// Add a workspace (see [`crate::Engine::create_workspace`]).
    ///
    /// # Errors
    /// [`Error::Policy`] naming the field and value, or [`Error::Store`].
    pub async fn create_workspace(
        &self,
        spec: WorkspaceSpec,
        actor: Option<&str>,
    ) -> Result<(), Error> {
        self.change(Change::CreateWorkspace(Box::new(spec)), actor)
            .await
            .map(drop)
    }

    /// Change a workspace's settings (see [`crate::Engine::update_workspace`]).
    ///
    /// # Errors
    /// [`Error::Policy`] or [`Error::Store`].
    pub async fn update_workspace(
        &self,
        id: &str,
        update: WorkspaceUpdate,
        actor: Option<&str>,
    ) -> Result<(), Error> {
        self.change(
            Change::UpdateWorkspace(id.to_owned(), Box::new(update)),
            actor,
        )
        .await
        .map(drop)
    }

    /// Delete a workspace: its keys are refused by every instance at once and its
    /// counters are dropped from Redis.
    ///
    /// # Errors
    /// [`Error::Policy`] or [`Error::Store`].
    pub async fn delete_workspace(&self, id: &str, actor: Option<&str>) -> Result<(), Error> {
        self.change(Change::DeleteWorkspace(id.to_owned()), actor)
            .await
            .map(drop)
    }

    /// Create a key with a fresh secret, returned once.
    ///
    /// # Errors
    /// [`Error::Policy`] or [`Error::Store`].
    pub async fn create_key(&self, key: NewKey, actor: Option<&str>) -> Result<IssuedKey, Error> {
        let issued = self.change(Change::CreateKey(key), actor).await?;
        Ok(issued.expect("creating a key issues a secret"))
    }

    /// Give a key a new secret; the old one works for `grace` on every instance
    /// (measured on Redis `TIME`).
    ///
    /// # Errors
    /// [`Error::Policy`] or [`Error::Store`].
    pub async fn rotate_key(
        &self,
        id: &str,
        grace: Duration,
        actor: Option<&str>,
    ) -> Result<IssuedKey, Error> {
        let change = Change::RotateKey {
            id: id.to_owned(),
            grace,
        };
        let issued = self.change(change, actor).await?;
        Ok(issued.expect("rotating a key issues a secret"))
    }

    /// Revoke a key: every instance refuses it from the moment this returns.
    ///
    /// # Errors
    /// [`Error::Policy`] or [`Error::Store`].
    pub async fn revoke_key(&self, id: &str, actor: Option<&str>) -> Result<(), Error> {
        self.change(Change::RevokeKey(id.to_owned()), actor)
            .await
            .map(drop)
    }

    /// Apply one change to the shared policy: on top of the newest stored version,
    /// validated, stored by compare-and-set on that version (if another instance's
    /// change landed first: re-read, re-apply, re-validate, try again), then what it
    /// implies written to Redis, then run here and reported (once: other instances
    /// apply the new version without reporting it). A change that fails validation,
    /// or that Redis does not take, changes nothing anywhere.
    async fn change(
        &self,
        change: Change,
        actor: Option<&str>,
    ) -> Result<Option<IssuedKey>, Error> {
        let inner = &self.inner;
        let _writer = inner.apply_lock.lock().await;
        let (key, channel) = (inner.layout.policy(), inner.layout.policy_channel());
        let mut connection = inner.connection.clone();
        let mut attempt = 0;
        loop {
            let previous = inner.sync_policy().await?;
            let version = inner.policy_version.load(Ordering::Acquire);
            let (policy, applied) = next_policy(&previous, change.clone())?;
            let versions = (version, version + 1);
            let stored = store::compare_and_set(
                &mut connection,
                &key,
                &channel,
                versions,
                policy.document(),
            )
            .await?;
            let Cas::Written(stamp) = stored else {
                attempt += 1;
                if attempt >= MAX_ATTEMPTS {
                    return Err(Error::Store(StoreError {
                        kind: StoreErrorKind::Transient,
                        message: format!(
                            "policy change: the shared policy changed under it {MAX_ATTEMPTS} \
                             times in a row; try again"
                        ),
                    }));
                }
                // Spread the retries of instances that lost to the same winner.
                let jitter = u64::from(getrandom::u32().unwrap_or(0)) % (attempt * 2 + 1);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
                continue;
            };
            let next = successor(&previous, policy);
            // The document in Redis already holds the change, so it is acknowledged
            // (a created key's secret must reach the caller) even if these follow-up
            // writes fail: the failure is kept for `last_store_error`, and every
            // instance still applies the new document (its statuses) within the
            // propagation time.
            let follow_up = async {
                self.publish_flags(&previous, &next).await?;
                self.follow_rules(&previous, &next).await
            };
            if let Err(error) = follow_up.await {
                inner.record_error(error);
            }
            let now = next.clock.now();
            let events = next.events.clone();
            inner.install(stamp, next);
            crate::telemetry::policy_changed(&applied.event, actor);
            if let Some(events) = events {
                events.emit(now, actor, applied.event);
            }
            return Ok(applied.issued);
        }
    }

    /// Bring the counters of every scope whose rate limits or budget period changed
    /// to the new rules now, as the in-memory engine does when it applies a policy
    /// (one `follow` call per hash tag): a reservation that settles before the next
    /// reserve then settles into the new rules too.
    async fn follow_rules(&self, previous: &Snapshot, next: &Snapshot) -> Result<(), StoreError> {
        let layout = &self.inner.layout;
        let (old, new) = (&previous.policy, &next.policy);
        // Per hash tag: the scope hashes and their new rules.
        let mut tags: Vec<(Vec<String>, Vec<String>)> = Vec::new();
        let add = |tag: &mut (Vec<String>, Vec<String>),
                   key: String,
                   was: &LevelRules,
                   now: &LevelRules| {
            let signature = rule_signature(now);
            if rule_signature(was) != signature {
                tag.0.push(key);
                tag.1.extend(signature.map(|x| x.to_string()));
            }
        };
        for (w, ws) in new.workspaces.iter().enumerate() {
            let Some(old_w) = previous.workspace_index(&ws.id) else {
                continue;
            };
            let old_ws = &old.workspaces[old_w as usize];
            let mut tag = (Vec::new(), Vec::new());
            add(&mut tag, layout.workspace(&ws.id), &old_ws.rules, &ws.rules);
            for (m, model) in new.models.iter().enumerate() {
                if let Some(old_m) = previous.model_index(&model.name) {
                    add(
                        &mut tag,
                        layout.model(&ws.id, &model.name),
                        &old_ws.model_rules[old_m as usize],
                        &ws.model_rules[m],
                    );
                }
            }
            for key in new.keys.iter().filter(|k| k.workspace as usize == w) {
                let Some(old_k) = previous.key_index(&key.id) else {
                    continue;
                };
                let old_key = &old.keys[old_k as usize];
                if old_key.workspace != old_w {
                    continue;
                }
                let was = old_key.rules.as_deref().unwrap_or(&old_ws.plain_key_rules);
                let now = key.rules.as_deref().unwrap_or(&ws.plain_key_rules);
                add(&mut tag, layout.key(&ws.id, &key.id), was, now);
            }
            tags.push(tag);
        }
        let mut org = (Vec::new(), Vec::new());
        add(
            &mut org,
            layout.org(&new.org.id),
            &old.org.rules,
            &new.org.rules,
        );
        tags.push(org);
        let mut connection = self.inner.connection.clone();
        for (keys, args) in tags.into_iter().filter(|(keys, _)| !keys.is_empty()) {
            scripts::call(&mut connection, Function::Follow, &keys, &args).await?;
        }
        Ok(())
    }

    /// Write the revocations, reactivations, deletions and re-creations between two
    /// policies to Redis, in the workspace's flags hash (which never expires, unlike
    /// counters).
    async fn publish_flags(&self, previous: &Snapshot, next: &Snapshot) -> Result<(), StoreError> {
        let layout = &self.inner.layout;
        let (old, new) = (&previous.policy, &next.policy);
        let mut commands = Vec::new();
        let revoked = |key: &str| format!("revoked:{key}");
        for key in &new.keys {
            let ws = &new.workspaces[key.workspace as usize].id;
            let was_revoked = previous
                .key_index(&key.id)
                .map(|k| old.keys[k as usize].status == KeyStatus::Revoked);
            let is_revoked = key.status == KeyStatus::Revoked;
            if is_revoked && was_revoked != Some(true) {
                commands.push(
                    redis::cmd("HSET")
                        .arg(layout.workspace_flags(ws))
                        .arg(revoked(&key.id))
                        .arg("1")
                        .clone(),
                );
            } else if !is_revoked && was_revoked == Some(true) {
                commands.push(
                    redis::cmd("HDEL")
                        .arg(layout.workspace_flags(ws))
                        .arg(revoked(&key.id))
                        .clone(),
                );
            }
        }
        for ws in &old.workspaces {
            if next.workspace_index(&ws.id).is_some() {
                continue;
            }
            // Gone. First the tombstone every instance checks, and a new generation,
            // so the reservations in flight settle nothing on its levels (a
            // re-created workspace starts from zero); then its counters are dropped.
            let flags = layout.workspace_flags(&ws.id);
            commands.push(
                redis::cmd("HSET")
                    .arg(&flags)
                    .arg("deleted")
                    .arg("1")
                    .clone(),
            );
            commands.push(redis::cmd("HINCRBY").arg(&flags).arg("gen").arg(1).clone());
            let w = previous.workspace_index(&ws.id).expect("listed") as usize;
            let keys = || old.keys.iter().filter(|k| k.workspace as usize == w);
            let mut forget = redis::cmd("HDEL");
            forget.arg(&flags);
            for key in keys() {
                forget.arg(revoked(&key.id));
            }
            if keys().next().is_some() {
                commands.push(forget);
            }
            let mut del = redis::cmd("DEL");
            let ws_hash = layout.workspace(&ws.id);
            for id in old.workspaces[w].rules.extra_budget_ids() {
                del.arg(extra_budget(&ws_hash, id));
            }
            del.arg(ws_hash)
                .arg(format!("{}:holds", layout.workspace_tag(&ws.id)));
            for key in keys() {
                let key_hash = layout.key(&ws.id, &key.id);
                let rules = key
                    .rules
                    .as_deref()
                    .unwrap_or(&old.workspaces[w].plain_key_rules);
                for id in rules.extra_budget_ids() {
                    del.arg(extra_budget(&key_hash, id));
                }
                del.arg(key_hash);
                for (m, _) in &*key.model_rules {
                    del.arg(layout.key_model(&ws.id, &key.id, &old.models[*m as usize].name));
                }
            }
            for model in &old.models {
                del.arg(layout.model(&ws.id, &model.name));
            }
            commands.push(del);
        }
        for ws in &new.workspaces {
            if previous.workspace_index(&ws.id).is_none() {
                commands.push(
                    redis::cmd("HDEL")
                        .arg(layout.workspace_flags(&ws.id))
                        .arg("deleted")
                        .clone(),
                );
            }
        }
        let mut connection = self.inner.connection.clone();
        for command in commands {
            command
                .query_async::<redis::Value>(&mut connection)
                .await
                .map_err(|e| classify("control", &e))?;
        }
        Ok(())
    }
}
