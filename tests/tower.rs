//! The tower layer (feature `tower`) in front of a real axum router on a loopback
//! port, called by a real HTTP client, over the in-memory engine. The same
//! scenarios run over Redis in `tests/tower_redis.rs`.

#[path = "support/tower_app.rs"]
mod tower_app;

use tollgate::{Engine, UsageSnapshot};
use tower_app::Backend;

impl Backend for Engine {
    async fn usage(&self) -> UsageSnapshot {
        Engine::usage(self)
    }
}

fn engine() -> Engine {
    Engine::new(tower_app::policy())
}

#[tokio::test]
async fn admitted_commits_the_response_extension() {
    tower_app::admitted_commits_the_response_extension(engine()).await;
}

#[tokio::test]
async fn denials_answer_with_status_code_and_headers() {
    tower_app::denials_answer_with_status_code_and_headers(engine()).await;
}

#[tokio::test]
async fn a_handler_error_releases() {
    tower_app::a_handler_error_releases(engine()).await;
}

#[tokio::test]
async fn a_client_hanging_up_releases() {
    tower_app::a_client_hanging_up_releases(engine()).await;
}

#[tokio::test]
async fn a_streamed_body_commits_at_its_end() {
    tower_app::a_streamed_body_commits_at_its_end(engine()).await;
}

#[tokio::test]
async fn a_hang_up_mid_stream_charges_what_was_sent() {
    tower_app::a_hang_up_mid_stream_charges_what_was_sent(engine()).await;
}

#[tokio::test]
async fn denials_can_be_answered_otherwise() {
    tower_app::denials_can_be_answered_otherwise(engine()).await;
}
