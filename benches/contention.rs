//! Throughput (requests per second) of full reserve + commit with 1 and 2 threads:
//! on distinct workspaces (each thread its own workspace and keys) and on one shared
//! workspace and model (each thread its own keys of it).
//!
//! The org budget and wallet are shared by every workspace by design, so even
//! "distinct workspaces" write common cache lines there; the `distinct_no_org_money`
//! variant drops the org budget and wallet to show what they cost. (The org level is
//! still taken without them: the engine holds cost on every level for usage roll-up.)
//!
//! One criterion iteration is one request on every thread at once, so the reported
//! time is per request per thread, and throughput = threads / time. Each thread times
//! itself from a common barrier (thread start-up is not counted); the slowest thread's
//! time is the sample's.
//!
//! Run: `cargo bench --bench contention`.

#![allow(missing_docs)]

mod common;

use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::{by_id, reserve_commit, KeyTable, Shape};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use tollgate::Engine;

/// Keys per workspace in these benches.
const KEYS_PER_WORKSPACE: usize = 500;
const THREADS: [usize; 2] = [1, 2];

/// Run `iters` requests on each of `tables.len()` threads; the slowest thread's time.
fn run(engine: &Engine, tables: &[KeyTable], iters: u64) -> Duration {
    let barrier = Barrier::new(tables.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = tables
            .iter()
            .map(|table| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for j in 0..iters as usize {
                        std::hint::black_box(reserve_commit(engine, &by_id(table.id(j))));
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .max()
            .unwrap_or_default()
    })
}

/// Key tables, one per thread: thread `t` visits, at random, the keys `k` of
/// `0..keys` for which `pick(t, k)` holds.
fn tables(threads: usize, keys: usize, pick: impl Fn(usize, usize) -> bool) -> Vec<KeyTable> {
    (0..threads)
        .map(|t| {
            let mine: Vec<usize> = (0..keys).filter(|&k| pick(t, k)).collect();
            KeyTable::random(|i| mine[i], mine.len(), 1 << 12)
        })
        .collect()
}

fn contention(c: &mut Criterion) {
    let mut group = c.benchmark_group("contention");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(40);

    // Distinct: two workspaces; key k belongs to workspace k % 2; thread t uses
    // workspace t's keys. With one thread, only workspace 0 is used.
    for (name, org_money) in [("distinct", true), ("distinct_no_org_money", false)] {
        let engine = common::engine(Shape {
            keys: 2 * KEYS_PER_WORKSPACE,
            workspaces: 2,
            org_money,
            key_limits: true,
            every_rule: false,
        });
        for threads in THREADS {
            let tables = tables(threads, 2 * KEYS_PER_WORKSPACE, |t, k| k % 2 == t);
            group.throughput(Throughput::Elements(threads as u64));
            group.bench_function(BenchmarkId::new(name, threads), |b| {
                b.iter_custom(|iters| run(&engine, &tables, iters))
            });
        }
    }

    // Shared: one workspace and model; thread t uses the keys k with k % threads == t.
    let engine = common::engine(Shape {
        keys: 2 * KEYS_PER_WORKSPACE,
        workspaces: 1,
        org_money: true,
        key_limits: true,
        every_rule: false,
    });
    for threads in THREADS {
        let tables = tables(threads, 2 * KEYS_PER_WORKSPACE, |t, k| k % threads == t);
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function(BenchmarkId::new("shared", threads), |b| {
            b.iter_custom(|iters| run(&engine, &tables, iters))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = contention
}
criterion_main!(benches);
