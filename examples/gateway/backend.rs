//! Where the gateway's counters live: tollgate's in-memory engine, or Redis shared by
//! every gateway instance (`--redis URL`, feature `redis`). One enum, so the rest of
//! the gateway is written once for both.

use std::time::Duration;

use tollgate::{
    Denial, Engine, Error, IssuedKey, NewKey, Policy, RateLimitHeaders, Receipt, Request,
    Reservation, Usage, UsageSnapshot, WorkspaceSpec, WorkspaceUpdate,
};
#[cfg(feature = "redis")]
use tollgate::{RedisEngine, RedisReservation};

pub enum Backend {
    Memory(Engine),
    #[cfg(feature = "redis")]
    Redis(RedisEngine),
}

/// An admitted request's hold, on whichever backend admitted it.
// One lives on each request handler's stack for the request's lifetime; boxing the
// larger variant would only add an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Held {
    Memory(Reservation),
    #[cfg(feature = "redis")]
    Redis(RedisReservation),
}

impl Held {
    /// The key and workspace the request was admitted for.
    pub fn owner(&self) -> (&str, &str) {
        match self {
            Held::Memory(r) => (r.key_id(), r.workspace_id()),
            #[cfg(feature = "redis")]
            Held::Redis(r) => (r.key_id(), r.workspace_id()),
        }
    }

    /// The rate-limit headers for the response.
    pub fn headers(&self) -> RateLimitHeaders {
        match self {
            Held::Memory(r) => RateLimitHeaders::from_status(r.rate_limits()),
            #[cfg(feature = "redis")]
            Held::Redis(r) => RateLimitHeaders::from_status(r.rate_limits()),
        }
    }

    /// The output tokens held, for all of the request's outputs together.
    pub fn reserved_output_tokens(&self) -> u64 {
        match self {
            Held::Memory(r) => r.reserved_tokens().1,
            #[cfg(feature = "redis")]
            Held::Redis(r) => r.reserved_tokens().1,
        }
    }
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Memory(_) => "in-memory engine",
            #[cfg(feature = "redis")]
            Backend::Redis(_) => "Redis backend",
        }
    }

    pub async fn check_and_reserve(&self, request: &Request<'_>) -> Result<Held, Denial> {
        match self {
            Backend::Memory(e) => e.check_and_reserve(request).map(Held::Memory),
            #[cfg(feature = "redis")]
            Backend::Redis(e) => e.check_and_reserve(request).await.map(Held::Redis),
        }
    }

    pub async fn commit_usage(&self, held: Held, usage: Usage) -> Result<Receipt, Error> {
        match (self, held) {
            (Backend::Memory(e), Held::Memory(r)) => e.commit_usage(r, usage),
            #[cfg(feature = "redis")]
            (Backend::Redis(e), Held::Redis(r)) => e.commit_usage(r, usage).await,
            #[cfg(feature = "redis")]
            _ => unreachable!("a hold is committed on the backend that took it"),
        }
    }

    pub fn policy(&self) -> Policy {
        match self {
            Backend::Memory(e) => e.policy(),
            #[cfg(feature = "redis")]
            Backend::Redis(e) => e.policy(),
        }
    }

    pub async fn usage(&self) -> Result<UsageSnapshot, Error> {
        match self {
            Backend::Memory(e) => Ok(e.usage()),
            #[cfg(feature = "redis")]
            Backend::Redis(e) => e.usage().await,
        }
    }

    pub async fn create_workspace(&self, spec: WorkspaceSpec, actor: &str) -> Result<(), Error> {
        match self {
            Backend::Memory(e) => Ok(e.create_workspace(spec, Some(actor))?),
            #[cfg(feature = "redis")]
            Backend::Redis(e) => e.create_workspace(spec, Some(actor)).await,
        }
    }

    pub async fn update_workspace(
        &self,
        id: &str,
        update: WorkspaceUpdate,
        actor: &str,
    ) -> Result<(), Error> {
        match self {
            Backend::Memory(e) => Ok(e.update_workspace(id, update, Some(actor))?),
            #[cfg(feature = "redis")]
            Backend::Redis(e) => e.update_workspace(id, update, Some(actor)).await,
        }
    }

    pub async fn delete_workspace(&self, id: &str, actor: &str) -> Result<(), Error> {
        match self {
            Backend::Memory(e) => Ok(e.delete_workspace(id, Some(actor))?),
            #[cfg(feature = "redis")]
            Backend::Redis(e) => e.delete_workspace(id, Some(actor)).await,
        }
    }

    pub async fn create_key(&self, key: NewKey, actor: &str) -> Result<IssuedKey, Error> {
        match self {
            Backend::Memory(e) => Ok(e.create_key(key, Some(actor))?),
            #[cfg(feature = "redis")]
            Backend::Redis(e) => e.create_key(key, Some(actor)).await,
        }
    }

    pub async fn rotate_key(
        &self,
        id: &str,
        grace: Duration,
        actor: &str,
    ) -> Result<IssuedKey, Error> {
        match self {
            Backend::Memory(e) => Ok(e.rotate_key(id, grace, Some(actor))?),
            #[cfg(feature = "redis")]
            Backend::Redis(e) => e.rotate_key(id, grace, Some(actor)).await,
        }
    }

    pub async fn revoke_key(&self, id: &str, actor: &str) -> Result<(), Error> {
        match self {
            Backend::Memory(e) => Ok(e.revoke_key(id, Some(actor))?),
            #[cfg(feature = "redis")]
            Backend::Redis(e) => e.revoke_key(id, Some(actor)).await,
        }
    }

    /// Settle the leases (`--lease`), then replay commits Redis has not acknowledged
    /// yet (a blip answered them `pending`), so a shutdown does not lose their charges;
    /// how many are still queued after.
    pub async fn flush_pending(&self) -> usize {
        match self {
            Backend::Memory(_) => 0,
            #[cfg(feature = "redis")]
            Backend::Redis(e) => {
                e.close_leases().await;
                if let Err(e) = e.flush_pending().await {
                    eprintln!("shutdown: replaying pending commits: {e}");
                }
                e.pending_commits()
            }
        }
    }

    /// Save the in-memory engine's counters (Redis keeps its own).
    pub fn save_counters(&self, path: &std::path::Path) -> Result<(), tollgate::PersistError> {
        match self {
            Backend::Memory(e) => e.save_counters(path),
            #[cfg(feature = "redis")]
            Backend::Redis(_) => Ok(()),
        }
    }
}
