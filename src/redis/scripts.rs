//! The Lua library (`scripts/tollgate.lua`), run as Redis Functions (Redis 7+): loaded
//! once per server with `FUNCTION LOAD REPLACE` and called with `FCALL`, so its
//! helpers are compiled and defined once instead of on every call. A server that lost
//! it (restarted without persistence, a new cluster node) answers "Function not
//! found"; the engine then loads it again and retries the call once.

use redis::aio::ConnectionLike;
use redis::Value;

use crate::denial::StoreError;
use crate::redis::calls::Call;
use crate::redis::error::classify;

/// The library's source; its first line names it (`#!lua name=tollgate`).
pub(crate) const LIBRARY: &str = include_str!("scripts/tollgate.lua");

/// One function of the library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Function {
    Reserve,
    Commit,
    Release,
    Follow,
    Renew,
    PolicyCas,
}

impl Function {
    /// Every function's name, in the order of the enum (`function as usize`).
    pub(crate) const NAMES: [&'static str; 6] = [
        "reserve",
        "commit",
        "release",
        "follow",
        "renew",
        "policy_cas",
    ];

    pub(crate) fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// Load (or replace) the library on the server, or on every primary of a cluster.
pub(crate) async fn load(connection: &mut impl ConnectionLike) -> Result<(), StoreError> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .query_async::<Value>(connection)
        .await
        .map(drop)
        .map_err(|e| classify("load functions", &e))
}

/// Call `function` with `keys` and `args`; if the server does not have the library,
/// load it and call once more.
pub(crate) async fn call(
    connection: &mut impl ConnectionLike,
    function: Function,
    keys: &[String],
    args: &[String],
) -> Result<Value, StoreError> {
    let mut fcall = redis::cmd("FCALL");
    fcall
        .arg(function.name())
        .arg(keys.len())
        .arg(keys)
        .arg(args);
    send(connection, function, &fcall).await
}

/// Call a function that takes a batch of requests (`reserve`, `commit`): every
/// request's keys, then the number of requests and every request's arguments.
pub(crate) async fn call_batch(
    connection: &mut impl ConnectionLike,
    function: Function,
    requests: &[&Call],
) -> Result<Value, StoreError> {
    let mut fcall = redis::cmd("FCALL");
    fcall
        .arg(function.name())
        .arg(requests.iter().map(|call| call.keys.len()).sum::<usize>());
    for call in requests {
        fcall.arg(&call.keys);
    }
    fcall.arg(requests.len());
    for call in requests {
        fcall.arg(&call.args);
    }
    send(connection, function, &fcall).await
}

async fn send(
    connection: &mut impl ConnectionLike,
    function: Function,
    fcall: &redis::Cmd,
) -> Result<Value, StoreError> {
    match fcall.query_async::<Value>(connection).await {
        Err(e) if is_missing_library(&e) => {
            load(connection).await?;
            fcall.query_async(connection).await
        }
        other => other,
    }
    .map_err(|e| classify(function.name(), &e))
}

fn is_missing_library(error: &redis::RedisError) -> bool {
    error
        .detail()
        .is_some_and(|detail| detail.starts_with("Function not found"))
        || error.to_string().contains("Function not found")
}
