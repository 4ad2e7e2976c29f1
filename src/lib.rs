//! # tollgate
//!
//! Rate limits and spend budgets for LLM gateways, enforced on the hot path.
//!
//! A gateway asks [`Engine::check_and_reserve`] before forwarding a request (may
//! this key call this model now? hold the worst case) and [`Engine::commit_usage`]
//! when the provider has answered (here is what it really used). Every applicable
//! limit must admit the request: the key's, its workspace's, the workspace's limits
//! for the model, the org's budget and the org's wallet. Spend rolls up: a key's
//! spend is also its workspace's and its org's.
//!
//! ```
//! use tollgate::{Engine, Policy, Request, Usage};
//!
//! let policy = Policy::from_toml_str(r#"
//!     [org]
//!     id = "acme"
//!     budget = { limit = "100.00", period = "month" }
//!
//!     [[models]]
//!     name = "gpt-4o-mini"
//!     input_per_million = "0.15"
//!     output_per_million = "0.60"
//!
//!     [[workspaces]]
//!     id = "ws-chat"
//!     name = "chatbot-production"
//!     models = ["gpt-4o-mini"]
//!     limits = { rpm = 600, tpm = 200000 }
//!
//!     [[keys]]
//!     id = "key-1"
//!     workspace = "ws-chat"
//!     secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" # "test"
//! "#)?;
//! let engine = Engine::new(policy);
//!
//! match engine.check_and_reserve(&Request::with_secret("test", "gpt-4o-mini").input_tokens(900)) {
//!     Ok(reservation) => {
//!         // ... forward to the provider, then:
//!         let receipt = engine.commit_usage(reservation, Usage::new(900, 312))?;
//!         println!("cost ${}", receipt.cost());
//!     }
//!     Err(denial) => println!("{} {}", denial.http_status(), denial),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Features
//!
//! - `redis`: `RedisEngine`, counters shared by every gateway instance.
//! - `tower`: `tower::TollgateLayer`, a tower 0.5 layer reserving before an `http`
//!   service and committing after it, over any [`Limiter`].
//! - `tracing`: events (target `tollgate`) for denials, counter-store errors, fail-open
//!   admissions, policy changes and dropped events; none for an admitted request.
//! - `metrics`: counters, gauges and histograms through the `metrics` 0.24 facade (names
//!   in `metric_names`), by workspace and model, allocation-free on the request path.
#![deny(missing_docs)]

mod alerts;
mod bucket;
mod budget;
mod clock;
mod control;
mod decide;
mod denial;
mod durable;
mod end_users;
mod engine;
mod events;
mod headers;
mod index;
mod limiter;
#[cfg(all(test, loom))]
mod loom_tests;
mod money;
#[cfg(feature = "openai")]
pub mod openai;
mod period;
mod persist;
mod policy;
mod policy_store;
#[cfg(feature = "redis")]
mod redis;
mod request;
mod reservation;
mod snapshot;
mod store;
mod sync;
mod telemetry;
#[cfg(feature = "tower")]
pub mod tower;
mod usage;

pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use control::{IssuedKey, NewKey, WorkspaceUpdate};
pub use denial::{
    openai_error_type, Denial, DenialReason, Error, Quota, Scope, StoreError, StoreErrorKind,
};
pub use engine::{BudgetStatus, Engine, EngineBuilder};
pub use events::{ChannelSink, Event, EventKind, EventSink, ScopeRef};
pub use headers::{HeaderValue, RateLimitHeaders, TOKEN_QUOTA_UNIT};
pub use limiter::{Held, Limiter};
pub use period::BudgetPeriod;
pub use persist::PersistError;
pub use policy::{
    BudgetSpec, DefaultsSpec, EndUserLimitsSpec, Environment, KeySpec, KeyStatus, LimitsSpec,
    MemberRole, MemberSpec, ModelLimitSpec, ModelSpec, OrgSpec, Policy, PolicyDocument,
    PolicyError, PolicyIssue, Problem, StoreFailureMode, TemporarySpec, TokenCount, WorkspaceSpec,
    WorkspaceStatus, DEFAULT_END_USER_IDLE_SECS, DEFAULT_MAX_TRACKED_END_USERS, MAX_BUDGETS,
    MAX_END_USER_IDLE_SECS, MAX_MEMBERS, MAX_TRACKED_END_USERS, MAX_WEBHOOKS,
    MIN_END_USER_IDLE_SECS, TOKENIZERS,
};
pub use policy_store::{FilePolicyStore, PolicyStore, PolicyStoreError};
#[cfg(feature = "redis")]
pub use redis::{LeaseConfig, RedisConfig, RedisEngine, RedisReservation};
pub use request::{bearer_token, Credential, Request, Usage, MAX_END_USER_LEN};
pub use reservation::{LimitWindow, RateLimitStatus, Receipt, Reservation};
pub use usage::{
    BudgetUsage, KeyUsage, ModelUsage, ScopeReport, ScopeUsage, TemporaryUsage, UsageSnapshot,
    WorkspaceUsage,
};

pub use rust_decimal::Decimal;
#[cfg(feature = "metrics")]
pub use telemetry::names as metric_names;
