//! Loom models of the engine's concurrency.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --lib loom` (and a separate
//! `CARGO_TARGET_DIR`, since every crate is rebuilt under the cfg). Time never moves
//! inside a model: the engine's `ManualClock` is not loom-instrumented, so a frozen
//! clock keeps every execution deterministic and only the interleaving varies.

mod alerts;
mod bucket;
mod budget;
mod reserve;
mod rollover;
mod swap;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc as StdArc;
use std::time::Instant;

use chrono::{TimeZone, Utc};

use crate::{Engine, ManualClock, Policy};

/// Explores `model` under loom and prints how many executions it took, so the cost
/// of each model shows up with `--nocapture` before it grows out of budget.
fn check(name: &str, model: impl Fn() + Sync + Send + 'static) {
    // A plain std counter: loom must not see it, or it would become a branch point.
    let executions = StdArc::new(AtomicUsize::new(0));
    let counted = StdArc::clone(&executions);
    let started = Instant::now();
    loom::model(move || {
        counted.fetch_add(1, Ordering::Relaxed);
        model();
    });
    eprintln!(
        "loom {name}: {} executions in {:.2?}",
        executions.load(Ordering::Relaxed),
        started.elapsed()
    );
}

/// An engine whose clock stays at 2026-11-23 12:00 UTC, mid-month, so no budget
/// period or rate window moves while a model runs.
///
/// Must be called inside `loom::model`: the engine's counters are loom objects.
fn frozen_engine(policy: Policy) -> Engine {
    let at = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
    Engine::builder(policy)
        .clock(StdArc::new(ManualClock::at(at)))
        .build()
}
