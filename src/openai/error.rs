//! What can be wrong with a request body, named precisely enough to answer a 400 with.

use std::fmt;

use serde_json::Value;

/// A request body the estimate refuses: the field, its value (shortened) and why.
///
/// Nothing is silently counted as 0: a field of the wrong type, a negative or
/// fractional limit, an unknown content part, or content whose size cannot be known
/// (audio, files, stored conversations without a policy value) is an error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` = {value}: {problem}")]
pub struct ShapeError {
    /// Path of the field, e.g. `messages[2].content[0].type` or `max_tokens`.
    pub field: String,
    /// The value found, as JSON, cut to at most 80 characters (`missing` when absent).
    pub value: String,
    /// What is wrong with it.
    pub problem: ShapeProblem,
}

impl ShapeError {
    /// True when the body is well formed but its input cannot be sized (audio, files,
    /// stored conversations): a policy value would let it be estimated.
    #[must_use]
    pub fn is_cannot_estimate(&self) -> bool {
        matches!(self.problem, ShapeProblem::CannotEstimate { .. })
    }
}

/// The kinds of bad shape.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeProblem {
    /// A required field is absent.
    #[error("is required")]
    Missing,
    /// The value has the wrong JSON type.
    #[error("must be {expected}")]
    WrongType {
        /// What is accepted, e.g. "an array of messages".
        expected: &'static str,
    },
    /// A count that must be a whole number has a fraction.
    #[error("must be a whole number")]
    NotWhole,
    /// A count below zero.
    #[error("must not be negative")]
    Negative,
    /// A count outside its range.
    #[error("must be within {min}..={max}")]
    OutOfRange {
        /// Smallest accepted.
        min: u64,
        /// Largest accepted.
        max: u64,
    },
    /// An array or text that must not be empty.
    #[error("must not be empty")]
    Empty,
    /// A content part or item of a type the estimate does not know.
    #[error("unknown type (known: {known})")]
    UnknownType {
        /// The types accepted here.
        known: &'static str,
    },
    /// Well formed, but its tokens cannot be known before the provider answers.
    #[error("cannot be estimated: {why}")]
    CannotEstimate {
        /// Why, and which policy setting would allow it, if any.
        why: &'static str,
    },
}

/// Where in the body a value is: a chain of keys and indexes on the stack, rendered
/// to a path only when an error is built (walking a valid body builds no string).
#[derive(Clone, Copy)]
pub(crate) struct At<'a> {
    parent: Option<&'a At<'a>>,
    step: Step<'a>,
}

#[derive(Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> At<'a> {
    /// A top-level field of the body.
    pub(crate) fn root(key: &'a str) -> Self {
        At {
            parent: None,
            step: Step::Key(key),
        }
    }

    /// A field of this object.
    pub(crate) fn key(&'a self, key: &'a str) -> At<'a> {
        At {
            parent: Some(self),
            step: Step::Key(key),
        }
    }

    /// An item of this array.
    pub(crate) fn index(&'a self, index: usize) -> At<'a> {
        At {
            parent: Some(self),
            step: Step::Index(index),
        }
    }

    /// The error `problem` about `value` found here.
    pub(crate) fn error(&self, value: Option<&Value>, problem: ShapeProblem) -> ShapeError {
        ShapeError {
            field: self.to_string(),
            value: value.map_or_else(|| "missing".to_owned(), shorten),
            problem,
        }
    }
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(parent) = self.parent {
            parent.fmt(f)?;
        }
        match self.step {
            Step::Key(key) if self.parent.is_some() => write!(f, ".{key}"),
            Step::Key(key) => f.write_str(key),
            Step::Index(i) => write!(f, "[{i}]"),
        }
    }
}

/// A value as JSON, cut to 80 characters so an error never echoes a whole prompt.
fn shorten(value: &Value) -> String {
    const MAX: usize = 80;
    let text = value.to_string();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}
