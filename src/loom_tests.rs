//! Loom models of the engine's concurrency.

#[test]
fn loom_placeholder() {
    loom::model(|| {});
}
