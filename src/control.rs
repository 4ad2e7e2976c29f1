//! Changes to a running engine's policy: workspaces and keys created, edited,
//! rotated, revoked and deleted, or a whole policy replaced.
//!
//! Every change edits a copy of the policy document and validates the result with
//! the same checks (and the same typed errors) as loading a policy, then publishes it
//! as one new snapshot: a change applies entirely or, when refused, not at all.
//! Counters of ids that persist are kept; those of deleted ids are dropped.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use std::sync::Arc;

use crate::clock::Timestamp;
use crate::events::{EventKind, ScopeRef};
use crate::policy::{
    BudgetSpec, EndUserLimitsSpec, Environment, KeySpec, KeyStatus, LimitsSpec, MemberSpec,
    ModelLimitSpec, Policy, PolicyDocument, PolicyError, PolicyIssue, Problem, StoreFailureMode,
    TemporarySpec, WorkspaceSpec, WorkspaceStatus,
};
use crate::snapshot::Snapshot;

/// A key's secret, shown once when the key is created or rotated and never stored
/// (the engine keeps only its SHA-256 digest). `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
#[must_use = "the secret is shown only once"]
pub struct IssuedKey {
    /// The key's id.
    pub id: String,
    /// The plaintext secret for the client's `Authorization: Bearer` header.
    pub secret: String,
}

impl fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A key to create; the engine generates its secret.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewKey {
    /// Stable id.
    pub id: String,
    /// Its workspace.
    pub workspace: String,
    /// Refused from this instant on.
    pub expires_at: Option<DateTime<Utc>>,
    /// Its own rate limits.
    pub limits: LimitsSpec,
    /// Its own budget.
    pub budget: Option<BudgetSpec>,
    /// Its further budgets, each with its own period.
    pub budgets: Vec<BudgetSpec>,
    /// The models it may call (names, aliases or patterns), a subset of its
    /// workspace's grants; empty: all of them.
    pub models: Vec<String>,
    /// Its limits per model.
    pub model_limits: Vec<ModelLimitSpec>,
    /// A temporary override of its limits.
    pub temporary: Option<TemporarySpec>,
}

impl NewKey {
    /// A key `id` in `workspace` with no limits of its own.
    #[must_use]
    pub fn new(id: impl Into<String>, workspace: impl Into<String>) -> Self {
        NewKey {
            id: id.into(),
            workspace: workspace.into(),
            ..NewKey::default()
        }
    }
}

/// New settings for a workspace; `None` leaves a setting unchanged. Its id and name
/// are fixed at creation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkspaceUpdate {
    /// Active, review or suspended.
    pub status: Option<WorkspaceStatus>,
    /// Deployment stage.
    pub environment: Option<Environment>,
    /// Region.
    pub region: Option<String>,
    /// Granted models (replaces the list).
    pub models: Option<Vec<String>>,
    /// Workspace rate limits (replaces them).
    pub limits: Option<LimitsSpec>,
    /// Per-model limits (replaces the list).
    pub model_limits: Option<Vec<ModelLimitSpec>>,
    /// Spend budget: `Some(None)` removes it.
    pub budget: Option<Option<BudgetSpec>>,
    /// Further budgets (replaces the list).
    pub budgets: Option<Vec<BudgetSpec>>,
    /// A temporary override of its limits: `Some(None)` removes it.
    pub temporary: Option<Option<TemporarySpec>>,
    /// Limits for each of its end users: `Some(None)` removes them.
    pub end_user_limits: Option<Option<EndUserLimitsSpec>>,
    /// What a distributed backend does while its store is down.
    pub on_store_error: Option<StoreFailureMode>,
    /// The owner (a member id): `Some(None)` removes it.
    pub owner: Option<Option<String>>,
    /// Members and their roles (replaces the list).
    pub members: Option<Vec<MemberSpec>>,
    /// Webhook URLs for the workspace's events (replaces the list).
    pub webhooks: Option<Vec<String>>,
}

/// One change to a policy document.
#[derive(Clone)]
pub(crate) enum Change {
    CreateWorkspace(Box<WorkspaceSpec>),
    UpdateWorkspace(String, Box<WorkspaceUpdate>),
    DeleteWorkspace(String),
    CreateKey(NewKey),
    RotateKey { id: String, grace: Duration },
    RevokeKey(String),
    Replace(PolicyDocument),
}

/// What a change did: the secret it issued, if any, and the event to report.
pub(crate) struct Applied {
    pub(crate) issued: Option<IssuedKey>,
    pub(crate) event: EventKind,
}

fn refused(path: impl Into<String>, value: impl fmt::Display, problem: Problem) -> PolicyError {
    PolicyError::Invalid {
        issues: vec![PolicyIssue {
            path: path.into(),
            value: value.to_string(),
            problem,
        }],
    }
}

fn workspace_position(doc: &PolicyDocument, id: &str) -> Result<usize, PolicyError> {
    doc.workspaces
        .iter()
        .position(|w| w.id == id)
        .ok_or_else(|| refused("workspaces", format!("{id:?}"), Problem::UnknownWorkspace))
}

fn key_position(doc: &PolicyDocument, id: &str) -> Result<usize, PolicyError> {
    doc.keys
        .iter()
        .position(|k| k.id == id)
        .ok_or_else(|| refused("keys", format!("{id:?}"), Problem::UnknownKey))
}

/// A fresh secret: 24 bytes from the operating system's CSPRNG, hex-encoded.
fn new_secret() -> Result<String, PolicyError> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| PolicyError::Io {
        path: "<operating system random source>".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(format!("sk-tg-{}", hex::encode(bytes)))
}

/// Apply `change` to `doc` (a copy: the caller validates it and publishes it, or
/// throws it away).
pub(crate) fn edit(
    doc: &mut PolicyDocument,
    change: Change,
    now: Timestamp,
) -> Result<Applied, PolicyError> {
    let org = doc.org.id.clone();
    let done = |event| {
        Ok(Applied {
            issued: None,
            event,
        })
    };
    match change {
        Change::CreateWorkspace(spec) => {
            if workspace_position(doc, &spec.id).is_ok() {
                return Err(refused(
                    "workspaces",
                    format!("{:?}", spec.id),
                    Problem::Duplicate {
                        first: format!("workspace {:?}", spec.id),
                    },
                ));
            }
            let scope = ScopeRef::workspace(&org, &spec.id);
            doc.workspaces.push(*spec);
            done(EventKind::WorkspaceCreated { scope })
        }
        Change::UpdateWorkspace(id, update) => {
            let w = workspace_position(doc, &id)?;
            let ws = &mut doc.workspaces[w];
            let WorkspaceUpdate {
                status,
                environment,
                region,
                models,
                limits,
                model_limits,
                budget,
                budgets,
                temporary,
                end_user_limits,
                on_store_error,
                owner,
                members,
                webhooks,
            } = *update;
            if let Some(v) = status {
                ws.status = v;
            }
            if let Some(v) = environment {
                ws.environment = v;
            }
            if let Some(v) = region {
                ws.region = v;
            }
            if let Some(v) = models {
                ws.models = v;
            }
            if let Some(v) = limits {
                ws.limits = v;
            }
            if let Some(v) = model_limits {
                ws.model_limits = v;
            }
            if let Some(v) = budget {
                ws.budget = v;
            }
            if let Some(v) = budgets {
                ws.budgets = v;
            }
            if let Some(v) = temporary {
                ws.temporary = v;
            }
            if let Some(v) = end_user_limits {
                ws.end_user_limits = v;
            }
            if let Some(v) = on_store_error {
                ws.on_store_error = v;
            }
            if let Some(v) = owner {
                ws.owner = v;
            }
            if let Some(v) = members {
                ws.members = v;
            }
            if let Some(v) = webhooks {
                ws.webhooks = v;
            }
            done(EventKind::WorkspaceUpdated {
                scope: ScopeRef::workspace(&org, &id),
            })
        }
        Change::DeleteWorkspace(id) => {
            let w = workspace_position(doc, &id)?;
            doc.workspaces.remove(w);
            doc.keys.retain(|k| k.workspace != id);
            done(EventKind::WorkspaceDeleted {
                scope: ScopeRef::workspace(&org, &id),
            })
        }
        Change::CreateKey(new) => {
            if key_position(doc, &new.id).is_ok() {
                return Err(refused(
                    "keys",
                    format!("{:?}", new.id),
                    Problem::Duplicate {
                        first: format!("key {:?}", new.id),
                    },
                ));
            }
            workspace_position(doc, &new.workspace)?;
            let secret = new_secret()?;
            let scope = ScopeRef::key(&org, &new.workspace, &new.id);
            doc.keys.push(KeySpec {
                expires_at: new.expires_at,
                limits: new.limits,
                budget: new.budget,
                budgets: new.budgets,
                models: new.models,
                model_limits: new.model_limits,
                temporary: new.temporary,
                ..KeySpec::new(new.id.clone(), new.workspace, &secret)
            });
            Ok(Applied {
                issued: Some(IssuedKey { id: new.id, secret }),
                event: EventKind::KeyCreated { scope },
            })
        }
        Change::RotateKey { id, grace } => {
            let k = key_position(doc, &id)?;
            let secret = new_secret()?;
            let until = now.saturating_add(grace);
            let key = &mut doc.keys[k];
            let old = std::mem::replace(&mut key.secret_sha256, KeySpec::digest_of(&secret));
            // A grace of zero refuses the old secret at once.
            (key.previous_secret_sha256, key.previous_secret_expires_at) = if grace.is_zero() {
                (None, None)
            } else {
                (Some(old), Some(until.to_datetime()))
            };
            let scope = ScopeRef::key(&org, &key.workspace, &id);
            Ok(Applied {
                issued: Some(IssuedKey { id, secret }),
                event: EventKind::KeyRotated {
                    scope,
                    old_secret_until: until,
                },
            })
        }
        Change::RevokeKey(id) => {
            let k = key_position(doc, &id)?;
            let key = &mut doc.keys[k];
            key.status = KeyStatus::Revoked;
            key.previous_secret_sha256 = None;
            key.previous_secret_expires_at = None;
            done(EventKind::KeyRevoked {
                scope: ScopeRef::key(&org, &key.workspace, &id),
            })
        }
        Change::Replace(next) => {
            *doc = next;
            done(EventKind::PolicyApplied {
                workspaces: doc.workspaces.len(),
                keys: doc.keys.len(),
            })
        }
    }
}

/// The policy after `change`, validated, and what the change did. Nothing is
/// published or touched here (not even counters): on error nothing changed, and a
/// caller may still refuse it (a store that could not save it).
pub(crate) fn next_policy(
    previous: &Snapshot,
    change: Change,
) -> Result<(Policy, Applied), PolicyError> {
    let now = previous.clock.now();
    let mut doc = previous.policy.document().clone();
    let applied = edit(&mut doc, change, now)?;
    Ok((Policy::new(doc)?, applied))
}

/// The snapshot of `policy`, reusing the counters of `previous`. Building it adapts
/// shared counters to the new rules and sets revoked flags: call it only for a
/// policy that will be published.
pub(crate) fn successor(previous: &Snapshot, policy: Policy) -> Snapshot {
    Snapshot::build(policy, Some(previous), Arc::clone(&previous.clock))
}
