//! The single-thread hot path: one request that touches every level (key, workspace
//! and workspace × model rate limits; key, workspace and org budgets; the org wallet),
//! reserved and committed, for policies of 1, 1,000 and 1,000,000 keys; the denial
//! path; a reservation dropped without commit; rendering the rate-limit headers.
//!
//! Runs on the real `SystemClock`, so the clock's cost is in every figure. Keys are
//! visited in a fixed random order (see `common::KeyTable`) so caches are honest.
//! The path allocates nothing per request: `tests/no_alloc.rs` asserts it, and
//! `cargo run --release --example bench_table` counts allocations per request again
//! for BENCHMARKS.md.
//!
//! Run: `cargo bench --bench hot_path`. The features `tracing` and `metrics` are
//! compiled in or not, so their cost is the difference between two runs:
//! `cargo bench --bench hot_path` and `cargo bench --bench hot_path --features
//! tracing,metrics` (each engine then meters through handles from the no-op
//! recorder); the second also runs `reserve_commit_by_id_prometheus`, the same
//! request recorded by a real Prometheus recorder.

#![allow(missing_docs)]

mod common;

use std::hint::black_box;

use common::{by_id, by_secret, reserve_commit, KeyTable, Shape};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tollgate::{Engine, Policy, RateLimitHeaders};

/// Full reserve + commit of one admitted request, by key id, at 1, 1k and 1M keys;
/// and by secret (SHA-256 per call) at 1k keys.
fn reserve_commit_by_size(c: &mut Criterion) {
    let mut group = c.benchmark_group("hot_path");
    // `cargo test --benches` runs each bench once in debug: skip building a million keys.
    let full = std::env::args().any(|a| a == "--bench");
    for keys in [1usize, 1_000, 1_000_000] {
        if keys == 1_000_000 && !full {
            continue;
        }
        let engine = common::engine(Shape::keys(keys));
        let table = KeyTable::for_keys(keys);
        let mut j = 0usize;
        group.bench_function(BenchmarkId::new("reserve_commit_by_id", keys), |b| {
            b.iter(|| {
                j = j.wrapping_add(1);
                reserve_commit(&engine, &by_id(table.id(j)))
            })
        });
        if keys == 1_000 {
            // The same requests with every further level and budget in use.
            let every = common::engine(Shape::keys(keys).with_every_rule());
            group.bench_function(
                BenchmarkId::new("reserve_commit_by_id_every_rule", keys),
                |b| {
                    b.iter(|| {
                        j = j.wrapping_add(1);
                        reserve_commit(&every, &by_id(table.id(j)))
                    })
                },
            );
            group.bench_function(BenchmarkId::new("reserve_commit_by_secret", keys), |b| {
                b.iter(|| {
                    j = j.wrapping_add(1);
                    reserve_commit(&engine, &by_secret(table.secret(j)))
                })
            });
            group.bench_function(BenchmarkId::new("reserve_drop_by_id", keys), |b| {
                b.iter(|| {
                    j = j.wrapping_add(1);
                    drop(black_box(
                        engine
                            .check_and_reserve(&by_id(table.id(j)))
                            .expect("admitted"),
                    ))
                })
            });
        }
    }
    group.finish();
}

/// Denials at 1k keys: refused at the first level (the key's requests-per-day limit
/// is used up), and at the last one (the wallet is empty: key, workspace,
/// workspace × model and org holds are taken, then all given back).
fn denials(c: &mut Criterion) {
    const KEYS: usize = 1_000;
    let table = KeyTable::for_keys(KEYS);
    let mut group = c.benchmark_group("hot_path");

    let mut doc = common::document(Shape::keys(KEYS));
    for key in &mut doc.keys {
        key.limits.rpd = Some(1);
    }
    let engine = Engine::new(Policy::new(doc).expect("valid"));
    for k in 0..KEYS {
        let _ = reserve_commit(&engine, &by_id(&common::key_id(k)));
    }
    let mut j = 0usize;
    group.bench_function(BenchmarkId::new("denied_at_key_by_id", KEYS), |b| {
        b.iter(|| {
            j = j.wrapping_add(1);
            engine
                .check_and_reserve(&by_id(table.id(j)))
                .expect_err("denied")
        })
    });

    let mut doc = common::document(Shape::keys(KEYS));
    doc.org.wallet = Some(common::dec("0"));
    let engine = Engine::new(Policy::new(doc).expect("valid"));
    group.bench_function(BenchmarkId::new("denied_at_wallet_by_id", KEYS), |b| {
        b.iter(|| {
            j = j.wrapping_add(1);
            engine
                .check_and_reserve(&by_id(table.id(j)))
                .expect_err("denied")
        })
    });
    group.finish();
}

/// Rendering every rate-limit header of an admitted and of a denied response.
fn headers(c: &mut Criterion) {
    let engine = common::engine(Shape::keys(1));
    let reservation = engine
        .check_and_reserve(&by_id(&common::key_id(0)))
        .expect("admitted");
    let mut group = c.benchmark_group("hot_path");
    group.bench_function("headers_admitted", |b| {
        b.iter(|| {
            let headers = RateLimitHeaders::for_reservation(black_box(&reservation));
            headers
                .iter()
                .map(|(name, value)| name.len() + value.as_str().len())
                .sum::<usize>()
        })
    });

    let mut doc = common::document(Shape::keys(1));
    doc.keys[0].limits.rpm = Some(1);
    let limited = Engine::new(Policy::new(doc).expect("valid"));
    let _held = limited
        .check_and_reserve(&by_id(&common::key_id(0)))
        .expect("admitted");
    let denial = limited
        .check_and_reserve(&by_id(&common::key_id(0)))
        .expect_err("denied");
    group.bench_function("headers_denied", |b| {
        b.iter(|| {
            let headers = RateLimitHeaders::for_denial(black_box(&denial));
            headers
                .iter()
                .map(|(name, value)| name.len() + value.as_str().len())
                .sum::<usize>()
        })
    });
    group.finish();
    drop(reservation);
}

/// With the `metrics` feature: reserve + commit at 1k keys with a Prometheus recorder
/// given to the engine, beside `reserve_commit_by_id/1000` (no recorder) in the same run.
#[cfg(feature = "metrics")]
fn metered(c: &mut Criterion) {
    const KEYS: usize = 1_000;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let engine = Engine::builder(common::policy(Shape::keys(KEYS)))
        .metrics_recorder(std::sync::Arc::new(recorder))
        .build();
    let table = KeyTable::for_keys(KEYS);
    let mut j = 0usize;
    let mut group = c.benchmark_group("hot_path");
    group.bench_function(
        BenchmarkId::new("reserve_commit_by_id_prometheus", KEYS),
        |b| {
            b.iter(|| {
                j = j.wrapping_add(1);
                reserve_commit(&engine, &by_id(table.id(j)))
            })
        },
    );
    group.finish();
}

#[cfg(not(feature = "metrics"))]
criterion_group! {
    name = benches;
    config = common::criterion();
    targets = reserve_commit_by_size, denials, headers
}
#[cfg(feature = "metrics")]
criterion_group! {
    name = benches;
    config = common::criterion();
    targets = reserve_commit_by_size, metered, denials, headers
}
criterion_main!(benches);
