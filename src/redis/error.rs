//! Telling a Redis failure that retrying can fix from one it cannot.

use redis::{RedisError, RetryMethod};

use crate::denial::{StoreError, StoreErrorKind};

/// The error code the scripts raise when a counter holds something tollgate never
/// writes there.
const CORRUPT: &str = "CORRUPT";

/// Classify a Redis error: connection, timeout, failover, `LOADING`, `TRYAGAIN`,
/// `CLUSTERDOWN` and redirects are transient; everything the server refused on its
/// merits (script errors, `WRONGTYPE`, permissions) is permanent.
pub(crate) fn classify(operation: &str, err: &RedisError) -> StoreError {
    let kind = if err.code() == Some(CORRUPT) {
        StoreErrorKind::Corrupt
    } else if err.is_timeout()
        || err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || !matches!(err.retry_method(), RetryMethod::NoRetry)
    {
        StoreErrorKind::Transient
    } else {
        StoreErrorKind::Permanent
    };
    StoreError {
        kind,
        message: format!("{operation}: {err}"),
    }
}

/// A reply of a shape the scripts never produce.
pub(crate) fn corrupt_reply(operation: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError {
        kind: StoreErrorKind::Corrupt,
        message: format!("{operation}: unexpected reply: {what}"),
    }
}
