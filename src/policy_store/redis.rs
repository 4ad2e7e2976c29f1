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

use crate::denial::{Error, StoreError};
use crate::policy::{Policy, PolicyDocument, PolicyError};
use crate::policy_store::PolicyStoreError;
use crate::redis::error::classify;
use crate::redis::scripts::{self, Function};

/// What a compare-and-set did.
pub(crate) enum Cas {
    /// Written: the new version.
    Written(u64),
    /// Someone else's change landed first.
    Lost,
}

/// The version of the stored document (0: none yet).
pub(crate) async fn version(
    connection: &mut impl ConnectionLike,
    key: &str,
) -> Result<u64, StoreError> {
    let raw: Option<String> = redis::cmd("HGET")
        .arg(key)
        .arg("version")
        .query_async(connection)
        .await
        .map_err(|e| classify("policy version", &e))?;
    match raw {
        None => Ok(0),
        Some(raw) => raw.parse().map_err(|_| StoreError {
            kind: crate::denial::StoreErrorKind::Corrupt,
            message: format!("policy version: {key} version={raw:?}"),
        }),
    }
}

/// The stored document and its version, validated; `None` if there is none yet.
///
/// # Errors
/// [`Error::Store`] if Redis failed; [`PolicyStoreError::CorruptInRedis`] (in
/// [`Error::Policy`]) if what is stored does not parse or validate.
pub(crate) async fn read(
    connection: &mut impl ConnectionLike,
    key: &str,
) -> Result<Option<(u64, Policy)>, Error> {
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
    let (version, document) = match (version, document) {
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
        serde_json::from_str(&document).map_err(|e| corrupt(format!("document: {e}")))?;
    let policy = Policy::new(document).map_err(|e| corrupt(e.to_string()))?;
    Ok(Some((version, policy)))
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
    let reply = scripts::call(
        connection,
        Function::PolicyCas,
        &[key.to_owned()],
        &[
            expected.to_string(),
            next.to_string(),
            json,
            channel.to_owned(),
        ],
    )
    .await?;
    let unexpected = || StoreError {
        kind: crate::denial::StoreErrorKind::Permanent,
        message: format!("policy_cas: unexpected reply {reply:?}"),
    };
    let Value::Array(items) = &reply else {
        return Err(unexpected());
    };
    match items.as_slice() {
        [Value::Int(1), Value::Int(v)] => {
            Ok(Cas::Written(u64::try_from(*v).map_err(|_| unexpected())?))
        }
        [Value::Int(0), Value::Int(_)] => Ok(Cas::Lost),
        _ => Err(unexpected()),
    }
}
