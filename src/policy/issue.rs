//! What can be wrong with a policy, named precisely enough to fix.

use std::fmt;

/// One problem found in a policy: where, what value, and why it is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyIssue {
    /// Path of the offending field, e.g. `workspaces[1].limits.rpm`.
    pub path: String,
    /// The offending value as written.
    pub value: String,
    /// What is wrong with it.
    pub problem: Problem,
}

impl fmt::Display for PolicyIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.path, self.value, self.problem)
    }
}

/// The kinds of problem a policy can have.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// Two entries share an id or name that must be unique.
    #[error("duplicate: already used by {first}")]
    Duplicate {
        /// Path of the first entry with this id.
        first: String,
    },
    /// A key names a workspace that is not in the policy.
    #[error("no workspace has this id")]
    UnknownWorkspace,
    /// A grant, limit or reference names a model missing from the price table.
    #[error("not in the price table (`models`)")]
    UnknownModel,
    /// A model reference with a `*` anywhere but once at its end.
    #[error("'*' may only appear once, at the end of a model pattern")]
    BadModelPattern,
    /// A model pattern that matches no model in the price table.
    #[error("matches no model in the price table (`models`)")]
    NoModelMatches,
    /// Two `model_limits` entries equally specific for one model, so which applies is
    /// not said.
    #[error("ambiguous: as specific as {first} for model {model:?}")]
    AmbiguousModelLimits {
        /// Path of the other entry.
        first: String,
        /// A model both entries match.
        model: String,
    },
    /// A key's `models` names (or matches only) models its workspace does not grant.
    #[error("not granted to the key's workspace {workspace:?}")]
    NotGrantedToWorkspace {
        /// The key's workspace id.
        workspace: String,
    },
    /// A required text is empty.
    #[error("must not be empty")]
    Empty,
    /// A text is longer than allowed.
    #[error("longer than {max} characters")]
    TooLong {
        /// The most characters allowed.
        max: usize,
    },
    /// A text holds characters outside its allowed set.
    #[error("may only contain {allowed}")]
    BadCharacters {
        /// The allowed characters.
        allowed: &'static str,
    },
    /// More entries than a cap allows.
    #[error("{count} entries exceed the cap of {cap}")]
    CapExceeded {
        /// Entries present.
        count: usize,
        /// The cap.
        cap: u32,
    },
    /// A limit, cap or count that must be at least 1.
    #[error("must be at least 1")]
    NotPositive,
    /// A number above the largest supported value.
    #[error("must be at most {max}")]
    TooLarge {
        /// The largest accepted value.
        max: String,
    },
    /// A number below the smallest supported value.
    #[error("must be at least {min}")]
    TooSmall {
        /// The smallest accepted value.
        min: String,
    },
    /// A money amount below zero.
    #[error("must not be negative")]
    Negative,
    /// A money amount with more decimals than can be held exactly.
    #[error("has more than {max_decimals} decimal places, which cannot be held exactly")]
    TooPrecise {
        /// Decimal places allowed.
        max_decimals: u32,
    },
    /// An alert threshold outside 0–100 %.
    #[error("alert threshold must be a percentage within 0-100")]
    ThresholdOutOfRange,
    /// A secret digest that is not 64 hex digits.
    #[error("must be the 64 hex digits of a SHA-256 digest")]
    BadDigest,
    /// A field that only means something together with another one that is missing.
    #[error("needs {companion} too")]
    MissingCompanion {
        /// The field that must be set with this one.
        companion: &'static str,
    },
    /// An operation named a key that does not exist.
    #[error("no key has this id")]
    UnknownKey,
    /// A workspace's `owner` is not one of its `members`.
    #[error("not one of this workspace's members")]
    UnknownMember,
    /// One member id given different secret digests in different workspaces.
    #[error("differs from the digest given for the same member at {first}")]
    ConflictingDigest {
        /// Path of the first digest given for this member.
        first: String,
    },
    /// A webhook that is not a plain `http://HOST[:PORT][/PATH]` URL.
    #[error("must be an http://HOST[:PORT][/PATH] URL")]
    NotHttpUrl,
    /// A model's `tokenizer` names no known encoding.
    #[error("not a known tokenizer (one of {known})")]
    UnknownTokenizer {
        /// The names accepted.
        known: &'static str,
    },
}

/// Collects every issue instead of stopping at the first.
#[derive(Default)]
pub(crate) struct Issues(pub(crate) Vec<PolicyIssue>);

impl Issues {
    pub(crate) fn push(
        &mut self,
        path: impl Into<String>,
        value: impl fmt::Display,
        problem: Problem,
    ) {
        self.0.push(PolicyIssue {
            path: path.into(),
            value: value.to_string(),
            problem,
        });
    }
}
