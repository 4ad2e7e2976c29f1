//! Policy: what each org, workspace, key and model may do, loaded from TOML, JSON or
//! Rust builders and validated before an engine will run it.

mod document;
mod issue;
mod members;
pub(crate) mod rules;
mod validate;

use std::fmt;
use std::path::Path;

pub use document::{
    BudgetSpec, DefaultsSpec, EndUserLimitsSpec, Environment, KeySpec, KeyStatus, LimitsSpec,
    MemberRole, MemberSpec, ModelLimitSpec, ModelSpec, OrgSpec, PolicyDocument, StoreFailureMode,
    TemporarySpec, TokenCount, WorkspaceSpec, WorkspaceStatus, DEFAULT_END_USER_IDLE_SECS,
    DEFAULT_MAX_TRACKED_END_USERS, MAX_BUDGETS, MAX_END_USER_IDLE_SECS, MAX_MEMBERS,
    MAX_TRACKED_END_USERS, MAX_WEBHOOKS, MIN_END_USER_IDLE_SECS, TOKENIZERS,
};
pub use issue::{PolicyIssue, Problem};

use rules::{KeyPolicy, ModelPolicy, OrgPolicy, WorkspacePolicy};

/// A validated policy. It cannot hold an invalid limit: the only ways to get one
/// check everything first.
///
/// ```
/// use rust_decimal::Decimal;
/// use tollgate::{KeySpec, ModelSpec, OrgSpec, Policy, PolicyDocument, WorkspaceSpec};
///
/// let policy = Policy::new(
///     PolicyDocument::new(OrgSpec::new("acme"))
///         .model(ModelSpec::new("gpt-4o-mini", Decimal::new(15, 2), Decimal::new(60, 2)))
///         .workspace(WorkspaceSpec::new("ws1", "chatbot-production").grant("gpt-4o-mini"))
///         .key(KeySpec::new("k1", "ws1", "sk-secret")),
/// )?;
/// assert_eq!(policy.document().workspaces.len(), 1);
/// # Ok::<(), tollgate::PolicyError>(())
/// ```
#[derive(Clone)]
pub struct Policy {
    pub(crate) org: OrgPolicy,
    pub(crate) models: Vec<ModelPolicy>,
    pub(crate) workspaces: Vec<WorkspacePolicy>,
    pub(crate) keys: Vec<KeyPolicy>,
    document: PolicyDocument,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("org", &self.org.id)
            .field("models", &self.models.len())
            .field("workspaces", &self.workspaces.len())
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The text is not valid TOML or JSON of the policy's shape.
    #[error("policy is not valid {format}: {message}")]
    Parse {
        /// `TOML` or `JSON`.
        format: &'static str,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The policy parsed but breaks rules; every problem found is listed.
    #[error("policy has {} problem(s):\n{}", issues.len(), list(issues))]
    Invalid {
        /// Each problem, with its field path and value.
        issues: Vec<PolicyIssue>,
    },
    /// The policy store could not save a change (it was not applied) or load the
    /// stored policy.
    #[error(transparent)]
    Persist(#[from] crate::policy_store::PolicyStoreError),
}

fn list(issues: &[PolicyIssue]) -> String {
    issues.iter().map(|i| format!("  - {i}\n")).collect()
}

impl Policy {
    /// Validate a document.
    ///
    /// # Errors
    /// [`PolicyError::Invalid`] listing every problem found.
    pub fn new(document: PolicyDocument) -> Result<Self, PolicyError> {
        let compiled = validate::compile(&document)
            .map_err(|issues| PolicyError::Invalid { issues: issues.0 })?;
        Ok(Policy {
            org: compiled.org,
            models: compiled.models,
            workspaces: compiled.workspaces,
            keys: compiled.keys,
            document,
        })
    }

    /// Parse and validate a TOML policy.
    ///
    /// # Errors
    /// [`PolicyError::Parse`] or [`PolicyError::Invalid`].
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        let document = toml::from_str(text).map_err(|e| PolicyError::Parse {
            format: "TOML",
            message: e.to_string(),
        })?;
        Self::new(document)
    }

    /// Parse and validate a JSON policy.
    ///
    /// # Errors
    /// [`PolicyError::Parse`] or [`PolicyError::Invalid`].
    pub fn from_json_str(text: &str) -> Result<Self, PolicyError> {
        let document = serde_json::from_str(text).map_err(|e| PolicyError::Parse {
            format: "JSON",
            message: e.to_string(),
        })?;
        Self::new(document)
    }

    /// Load a policy file: JSON if its name ends in `.json`, TOML otherwise.
    ///
    /// # Errors
    /// [`PolicyError::Io`], [`PolicyError::Parse`] or [`PolicyError::Invalid`].
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        {
            Self::from_json_str(&text)
        } else {
            Self::from_toml_str(&text)
        }
    }

    /// Put each scope's temporary override in force at `now`, or its own rules back
    /// once the override has ended. Returns when that next changes, if ever.
    pub(crate) fn put_in_force(
        &mut self,
        now: crate::clock::Timestamp,
    ) -> Option<crate::clock::Timestamp> {
        let mut next: Option<crate::clock::Timestamp> = None;
        let mut apply = |rules: &mut rules::LevelRules,
                         temporary: &Option<Box<rules::Temporary>>| {
            if let Some(temporary) = temporary {
                *rules = temporary.at(now).clone();
                if now < temporary.until {
                    next = Some(next.map_or(temporary.until, |n| n.min(temporary.until)));
                }
            }
        };
        apply(&mut self.org.rules, &self.org.temporary);
        for ws in &mut self.workspaces {
            apply(&mut ws.rules, &ws.temporary);
        }
        for key in &mut self.keys {
            if let Some(rules) = key.rules.as_deref_mut() {
                apply(rules, &key.temporary);
            }
        }
        next
    }

    /// The document this policy was validated from.
    #[must_use]
    pub fn document(&self) -> &PolicyDocument {
        &self.document
    }
}
