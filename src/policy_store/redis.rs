//! The policy document in Redis, shared by every `RedisEngine` on the same server and
//! prefix: one hash (`version`, `document` as JSON, secrets only as digests) that
//! never expires, changed only by the `policy_cas` function (a compare-and-set on the
//! version, which also announces the new version on a pub/sub channel).
//!
//! Redis is the truth: an instance applies a document only after Redis has it, and a
//! new instance starts from what Redis holds (the policy it was given only seeds an
//! empty Redis).

use redis::aio::ConnectionLike;
use redis::Value;

use sha2::{Digest, Sha256};

use crate::denial::{Error, StoreError, StoreErrorKind};
use crate::policy::{Policy, PolicyDocument, PolicyError};
use crate::policy_store::PolicyStoreError;
use crate::redis::error::classify;
use crate::redis::scripts::{self, Function};

/// A stored version: its number and the SHA-256 of its document's text. Two
/// documents with one number can exist only if Redis lost writes and the number was
/// issued again; the digest tells them apart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// 0: nothing stored.
    pub(crate) version: u64,
    pub(crate) digest: String,
}

fn digest(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// What a compare-and-set did.
pub(crate) enum Cas {
    /// Written: the new version.
    Written(Stamp),
    /// Someone else's change landed first.
    Lost,
}

/// The stamp of the stored document (version 0: none yet). One `HMGET`, without the
/// document: what an instance polls.
pub(crate) async fn head(
    connection: &mut impl ConnectionLike,
    key: &str,
) -> Result<Stamp, StoreError> {
    let (version, digest): (Option<String>, Option<String>) = redis::cmd("HMGET")
        .arg(key)
        .arg("version")
        .arg("sha256")
        .query_async(connection)
        .await
        .map_err(|e| classify("policy version", &e))?;
    let version = match version {
        None => 0,
        Some(raw) => raw.parse().map_err(|_| StoreError {
            kind: StoreErrorKind::Corrupt,
            message: format!("policy version: {key} version={raw:?}"),
        })?,
    };
    Ok(Stamp {
        version,
        digest: digest.unwrap_or_default(),
    })
}

/// The stored document and its stamp, validated; `None` if there is none yet.
///
/// # Errors
/// [`Error::Store`] if Redis failed; [`PolicyStoreError::CorruptInRedis`] (in
/// [`Error::Policy`]) if what is stored does not parse or validate.
pub(crate) async fn read(
    connection: &mut impl ConnectionLike,
    key: &str,
) -> Result<Option<(Stamp, Policy)>, Error> {
    let (version, document): (Option<String>, Option<String>) = redis::cmd("HMGET")
        .arg(key)
        .arg("version")
        .arg("document")
        .query_async(connection)
        .await
        .map_err(|e| classify("read policy", &e))?;
    let corrupt = |detail: String| {
        Error::Policy(PolicyError::Persist(PolicyStoreError::CorruptInRedis {
            key: key.to_owned(),
            detail,
        }))
    };
    let (version, text) = match (version, document) {
        (None, None) => return Ok(None),
        (Some(v), Some(d)) => (v, d),
        _ => {
            return Err(corrupt(
                "version without document or document without version".into(),
            ))
        }
    };
    let version = version
        .parse::<u64>()
        .map_err(|_| corrupt(format!("version {version:?}")))?;
    let document: PolicyDocument =
        serde_json::from_str(&text).map_err(|e| corrupt(format!("document: {e}")))?;
    let policy = Policy::new(document).map_err(|e| corrupt(e.to_string()))?;
    let stamp = Stamp {
        version,
        digest: digest(&text),
    };
    Ok(Some((stamp, policy)))
}

/// Store `document` as version `next` (above `expected`) if the stored version is
/// still `expected` (0: none stored), and announce it on `channel`.
pub(crate) async fn compare_and_set(
    connection: &mut impl ConnectionLike,
    key: &str,
    channel: &str,
    (expected, next): (u64, u64),
    document: &PolicyDocument,
) -> Result<Cas, StoreError> {
    let json = serde_json::to_string(document).expect("a policy document serialises");
    let written = Stamp {
        version: next,
        digest: digest(&json),
    };
    let reply = scripts::call(
        connection,
        Function::PolicyCas,
        &[key.to_owned()],
        &[
            expected.to_string(),
            next.to_string(),
            json,
            written.digest.clone(),
            channel.to_owned(),
        ],
    )
    .await?;
    match reply {
        Value::Int(1) => Ok(Cas::Written(written)),
        Value::Int(0) => Ok(Cas::Lost),
        other => Err(StoreError {
            kind: StoreErrorKind::Permanent,
            message: format!("policy_cas: unexpected reply {other:?}"),
        }),
    }
}
