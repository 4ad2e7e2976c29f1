//! Why a request was refused, in a form a gateway can act on and a client can read.

use std::fmt;
use std::time::Duration;

use rust_decimal::Decimal;

use crate::policy::WorkspaceStatus;

/// The level whose limit refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The API key itself.
    Key,
    /// The key's own limits for the requested model.
    KeyModel,
    /// The request's end user (see [`Request::end_user`](crate::Request::end_user)):
    /// the workspace's per-end-user limits.
    EndUser,
    /// The key's workspace.
    Workspace,
    /// The workspace's limits for the requested model.
    WorkspaceModel,
    /// The org: its budget or wallet.
    Org,
}

/// Which rule refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DenialReason {
    /// No key has this secret or id.
    UnknownKey,
    /// The key was revoked.
    KeyRevoked,
    /// The key's expiry has passed.
    KeyExpired,
    /// The workspace is not active.
    WorkspaceNotActive(WorkspaceStatus),
    /// The model is not in the price table.
    UnknownModel,
    /// The workspace may not call this model.
    ModelNotGranted,
    /// Requests per minute.
    RequestsPerMinute,
    /// Requests per day.
    RequestsPerDay,
    /// Tokens per minute.
    TokensPerMinute,
    /// Requests in flight at once.
    Concurrency,
    /// A spend budget (key, workspace or org) is used up.
    Budget,
    /// The org's prepaid wallet is used up.
    Wallet,
    /// The request's end-user id is empty, longer than
    /// [`MAX_END_USER_LEN`](crate::MAX_END_USER_LEN) bytes, or holds a control
    /// character (HTTP 400).
    InvalidEndUser,
    /// A distributed backend's counter store failed: a transient error while the
    /// workspace fails closed, or a permanent or corrupt-data error (never admitted
    /// unmetered). The engine's `last_store_error` has the store's message.
    StoreUnavailable(StoreErrorKind),
}

/// The numbers of the limit that refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quota {
    /// A request-count limit over a window.
    Requests {
        /// Requests allowed per window.
        limit: u64,
        /// Requests that would be admitted now.
        remaining: u64,
        /// The window.
        window: Duration,
    },
    /// A token limit over a window.
    Tokens {
        /// Tokens allowed per window.
        limit: u64,
        /// Tokens that would be admitted now.
        remaining: u64,
        /// The window.
        window: Duration,
        /// Tokens this request asked for.
        requested: u64,
    },
    /// A cap on requests in flight.
    Concurrent {
        /// Requests allowed in flight.
        limit: u32,
        /// Requests in flight now.
        in_flight: u32,
    },
    /// A spend budget or wallet, in USD.
    Money {
        /// The budget or balance.
        limit: Decimal,
        /// What is left of it (spend and holds subtracted); never negative.
        remaining: Decimal,
        /// The worst-case cost of this request.
        requested: Decimal,
    },
}

/// A refused request: which scope and rule refused, the numbers, and when to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denial {
    /// Why.
    pub reason: DenialReason,
    /// Whose limit.
    pub scope: Scope,
    /// The numbers of the limit that refused, when it is a limit.
    pub quota: Option<Quota>,
    /// When the limit has room again; `None` when waiting will not help (a budget
    /// spent for the period, a request bigger than the whole limit, a bad key).
    pub retry_after: Option<Duration>,
    /// When the limit is back to full (rate limits) or the budget period ends.
    pub reset_after: Option<Duration>,
    pub(crate) budget_status: u16,
}

impl Denial {
    pub(crate) fn new(reason: DenialReason, scope: Scope) -> Self {
        Denial {
            reason,
            scope,
            quota: None,
            retry_after: None,
            reset_after: None,
            budget_status: 402,
        }
    }

    /// The HTTP status to answer with: 401 bad key, 403 not allowed, 402 (or the
    /// engine's configured status) for money, 429 for rate limits.
    #[must_use]
    pub fn http_status(&self) -> u16 {
        match self.reason {
            DenialReason::UnknownKey | DenialReason::KeyRevoked | DenialReason::KeyExpired => 401,
            DenialReason::WorkspaceNotActive(_) | DenialReason::ModelNotGranted => 403,
            DenialReason::UnknownModel => 404,
            DenialReason::InvalidEndUser => 400,
            DenialReason::Budget | DenialReason::Wallet => self.budget_status,
            DenialReason::StoreUnavailable(_) => 503,
            DenialReason::RequestsPerMinute
            | DenialReason::RequestsPerDay
            | DenialReason::TokensPerMinute
            | DenialReason::Concurrency => 429,
        }
    }

    /// A stable machine-readable code, distinct for money and rate limits so clients
    /// know not to retry a spent budget in a loop.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self.reason {
            DenialReason::UnknownKey => "invalid_api_key",
            DenialReason::KeyRevoked => "api_key_revoked",
            DenialReason::KeyExpired => "api_key_expired",
            DenialReason::WorkspaceNotActive(WorkspaceStatus::Review) => "workspace_in_review",
            DenialReason::WorkspaceNotActive(_) => "workspace_suspended",
            DenialReason::UnknownModel => "model_not_found",
            DenialReason::ModelNotGranted => "model_not_allowed",
            DenialReason::InvalidEndUser => "invalid_end_user",
            DenialReason::RequestsPerMinute
            | DenialReason::RequestsPerDay
            | DenialReason::TokensPerMinute
            | DenialReason::Concurrency => "rate_limited",
            DenialReason::Budget => "budget_exceeded",
            DenialReason::Wallet => "insufficient_funds",
            DenialReason::StoreUnavailable(_) => "store_unavailable",
        }
    }

    /// True for request, token and concurrency limits (HTTP 429).
    #[must_use]
    pub fn is_rate_limit(&self) -> bool {
        self.code() == "rate_limited"
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scope = match self.scope {
            Scope::Key => "key",
            Scope::KeyModel => "key model",
            Scope::EndUser => "end user",
            Scope::Workspace => "workspace",
            Scope::WorkspaceModel => "workspace model",
            Scope::Org => "org",
        };
        match self.reason {
            DenialReason::UnknownKey => f.write_str("unknown API key"),
            DenialReason::KeyRevoked => f.write_str("API key revoked"),
            DenialReason::KeyExpired => f.write_str("API key expired"),
            DenialReason::WorkspaceNotActive(status) => {
                write!(f, "workspace is {status:?}, not active")
            }
            DenialReason::UnknownModel => f.write_str("model not found"),
            DenialReason::ModelNotGranted => f.write_str("model not allowed for this workspace"),
            DenialReason::InvalidEndUser => {
                f.write_str("invalid end user: 1 to 256 bytes without control characters expected")
            }
            DenialReason::StoreUnavailable(kind) => {
                write!(
                    f,
                    "rate-limit store unavailable ({kind} error); request not admitted"
                )
            }
            _ => {
                let what = match self.reason {
                    DenialReason::RequestsPerMinute => "requests per minute",
                    DenialReason::RequestsPerDay => "requests per day",
                    DenialReason::TokensPerMinute => "tokens per minute",
                    DenialReason::Concurrency => "concurrent requests",
                    DenialReason::Wallet => "wallet balance",
                    _ => "budget",
                };
                write!(f, "{scope} limit reached: {what}")?;
                match self.quota {
                    Some(Quota::Requests {
                        limit, remaining, ..
                    }) => {
                        write!(f, " (limit {limit}, remaining {remaining})")
                    }
                    Some(Quota::Tokens {
                        limit,
                        remaining,
                        requested,
                        ..
                    }) => {
                        write!(
                            f,
                            " (limit {limit}, remaining {remaining}, requested {requested})"
                        )
                    }
                    Some(Quota::Concurrent { limit, in_flight }) => {
                        write!(f, " (limit {limit}, in flight {in_flight})")
                    }
                    Some(Quota::Money {
                        limit,
                        remaining,
                        requested,
                    }) => {
                        write!(
                            f,
                            " (limit ${limit}, remaining ${remaining}, requested ${requested})"
                        )
                    }
                    None => Ok(()),
                }
            }
        }
    }
}

impl std::error::Error for Denial {}

/// OpenAI's error `type` for an HTTP status (`{"error": {"message", "type", "code"}}`):
/// `authentication_error` (401), `rate_limit_error` (402, 429), `permission_error`
/// (403), `not_found_error` (404), `server_error` (5xx), else `invalid_request_error`.
///
/// ```
/// assert_eq!(tollgate::openai_error_type(429), "rate_limit_error");
/// ```
#[must_use]
pub fn openai_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 | 429 => "rate_limit_error",
        403 => "permission_error",
        404 => "not_found_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

/// An error that is not a decision about the request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A policy could not be loaded or applied.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// A distributed counter store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A distributed counter store's failure, classified so a caller knows whether
/// retrying can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} store error: {message}")]
pub struct StoreError {
    /// Transient, permanent or corrupt data.
    pub kind: StoreErrorKind,
    /// What the store said, with the operation and the key where known.
    pub message: String,
}

/// How a store failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// Connection refused or dropped, a timeout, a failover, `LOADING`, `TRYAGAIN`,
    /// `CLUSTERDOWN`: retrying later can succeed. Commits are idempotent, so retrying
    /// one charges once.
    Transient,
    /// The server refused the operation itself (a script error, `WRONGTYPE`, a denied
    /// permission): retrying will fail the same way.
    Permanent,
    /// A counter held something that is not what tollgate writes there (a corrupted
    /// or foreign value), or a reply had an unexpected shape.
    Corrupt,
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreErrorKind::Transient => "transient",
            StoreErrorKind::Permanent => "permanent",
            StoreErrorKind::Corrupt => "corrupt-data",
        })
    }
}

impl StoreError {
    /// True when retrying can help.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        self.kind == StoreErrorKind::Transient
    }
}
