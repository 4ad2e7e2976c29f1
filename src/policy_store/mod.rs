//! Where the truth of the policy lives, so an accepted admin change (a key created,
//! rotated or revoked, a workspace edited or deleted, a policy applied) is never lost
//! on restart and, with Redis, is the same on every instance.
//!
//! - In memory: the [`Engine`](crate::Engine) saves every accepted change through a
//!   [`PolicyStore`] before it publishes or acknowledges it. [`FilePolicyStore`]
//!   writes the document to one file atomically; a gateway loads it at start.
//! - Redis: the [`RedisEngine`](crate::RedisEngine) keeps the document in Redis,
//!   versioned (`redis` below): a change is a compare-and-set on the version, and
//!   every instance follows new versions.

mod file;
#[cfg(feature = "redis")]
pub(crate) mod redis;

use std::path::PathBuf;

pub use file::FilePolicyStore;

use crate::policy::PolicyDocument;

/// Durable storage for an in-memory engine's policy document.
///
/// [`Engine`](crate::Engine) calls [`PolicyStore::save`] with the whole validated
/// document after every accepted change, under its change lock, and acknowledges the
/// change only if it returns `Ok`: a change that cannot be saved is refused and not
/// applied. Never called on the request path.
pub trait PolicyStore: Send + Sync {
    /// Make `document` the stored policy, durably, before returning.
    ///
    /// # Errors
    /// [`PolicyStoreError`] when it could not be stored; the engine then keeps its
    /// previous policy.
    fn save(&self, document: &PolicyDocument) -> Result<(), PolicyStoreError>;
}

/// Why a stored policy could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyStoreError {
    /// Reading or writing the file failed.
    #[error("policy state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is not a whole policy state file written by tollgate, or the policy
    /// in it no longer validates.
    #[error("policy state file {path} is corrupt: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong: checksum mismatch, parse error with position, format
        /// version, or the validation problems.
        detail: String,
    },
    /// The policy document stored in Redis is not one tollgate wrote, or no longer
    /// validates. Nothing is applied from it.
    #[error("policy document in Redis at {key} is corrupt: {detail}")]
    CorruptInRedis {
        /// The Redis key.
        key: String,
        /// What is wrong: parse error with position, or the validation problems.
        detail: String,
    },
}
