//! The tower layer (feature `tower`) in front of a real axum router on a loopback
//! port, called by a real HTTP client, over the in-memory engine. The same
//! scenarios run over Redis in `tests/tower_redis.rs`.

#[macro_use]
#[path = "support/tower_app.rs"]
mod tower_app;

use tollgate::{Engine, UsageSnapshot};
use tower_app::Backend;

impl Backend for Engine {
    async fn usage(&self) -> UsageSnapshot {
        Engine::usage(self)
    }
}

async fn engine() -> Option<((), Engine)> {
    Some(((), Engine::new(tower_app::policy())))
}

scenarios!(engine());
