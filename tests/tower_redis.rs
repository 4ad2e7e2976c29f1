//! The tower layer's scenarios (`tests/support/tower_app.rs`) over the Redis engine,
//! each against its own real `redis-server`: `cargo test --features redis,tower --test
//! tower_redis` (CI does).

#[path = "support/redis_server.rs"]
mod redis_server;
#[macro_use]
#[path = "support/tower_app.rs"]
mod tower_app;

use redis_server::{require_redis, RedisServer};
use tollgate::{RedisConfig, RedisEngine, UsageSnapshot};
use tower_app::Backend;

impl Backend for RedisEngine {
    async fn usage(&self) -> UsageSnapshot {
        RedisEngine::usage(self)
            .await
            .expect("usage read from Redis")
    }
}

/// A server and an engine on it, or `None` when Redis tests are skipped.
async fn engine() -> Option<(RedisServer, RedisEngine)> {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return None;
    }
    let server = RedisServer::start();
    let engine = RedisEngine::connect(&server.url(), tower_app::policy(), RedisConfig::default())
        .await
        .expect("connected");
    Some((server, engine))
}

scenarios!(engine());

/// Redis unreachable, the workspace failing closed: 503 `store_unavailable`, and the
/// handler is not called.
#[tokio::test]
async fn an_unreachable_store_answers_503() {
    let Some((mut server, engine)) = engine().await else {
        return;
    };
    let served = tower_app::serve(engine).await;
    server.kill();
    let reply = served.call("/json", Some("sk-k"), "m").await;
    assert_eq!(reply.status.as_u16(), 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "store_unavailable");
    assert_eq!(reply.json()["error"]["type"], "server_error");
    assert_eq!(reply.header("retry-after"), None);
}
