//! Peers measured side by side with tollgate, in the same run and on the same key
//! distribution (the same `KeyTable`: same ids, same random visiting order).
//!
//! tollgate's figure is a full multi-level decision: key, workspace and
//! workspace × model rate limits (RPM and TPM each), key, workspace and org budgets
//! and the wallet, reserved and then committed. Each peer's figure is one
//! single-limit check:
//! - governor's keyed limiter (`DashMap` keyed by `&str`, SipHash): `check_key`, and
//!   `check_key_n` (2 units, as a token limit would take);
//! - governor's direct limiter (`check`): no key lookup at all;
//! - a naive `parking_lot::Mutex<HashMap<String, TokenBucket>>` (std SipHash,
//!   `Instant::now` under the lock);
//! - limitador's in-memory limiter (`check_rate_limited_and_update`, one limit with a
//!   `key` variable; default features off, so no RocksDB or Redis).
//!
//! Run: `cargo bench --bench peers`.

#![allow(missing_docs)]

mod common;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Instant;

use common::{by_id, reserve_commit, KeyTable, Shape};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;

const KEYS: usize = 1_000;

fn quota() -> Quota {
    Quota::per_minute(NonZeroU32::new(u32::MAX).expect("non-zero"))
}

/// A token bucket as one would write it in an afternoon.
struct TokenBucket {
    tokens: f64,
    capacity: f64,
    per_nano: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(per_minute: f64) -> Self {
        TokenBucket {
            tokens: per_minute,
            capacity: per_minute,
            per_nano: per_minute / 60e9,
            last: Instant::now(),
        }
    }

    fn try_take(&mut self, n: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_nanos() as f64;
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_nano).min(self.capacity);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

fn tollgate(c: &mut Criterion, table: &KeyTable) {
    let engine = common::engine(Shape::keys(KEYS));
    let mut j = 0usize;
    c.benchmark_group("peers").bench_function(
        BenchmarkId::new("tollgate_reserve_commit", KEYS),
        |b| {
            b.iter(|| {
                j = j.wrapping_add(1);
                reserve_commit(&engine, &by_id(table.id(j)))
            })
        },
    );
}

fn governor_keyed(c: &mut Criterion, keys: usize, table: &KeyTable, with_n: bool) {
    let ids: Vec<String> = (0..keys).map(common::key_id).collect();
    let limiter = RateLimiter::keyed(quota());
    for id in &ids {
        limiter.check_key(&id.as_str()).expect("admitted");
    }
    let mut group = c.benchmark_group("peers");
    let mut j = 0usize;
    group.bench_function(BenchmarkId::new("governor_check_key", keys), |b| {
        b.iter(|| {
            j = j.wrapping_add(1);
            limiter.check_key(&table.id(j)).expect("admitted")
        })
    });
    if with_n {
        let two = NonZeroU32::new(2).expect("non-zero");
        group.bench_function(BenchmarkId::new("governor_check_key_n", keys), |b| {
            b.iter(|| {
                j = j.wrapping_add(1);
                limiter
                    .check_key_n(&table.id(j), two)
                    .expect("fits")
                    .expect("admitted")
            })
        });
    }
    group.finish();
}

fn governor_direct(c: &mut Criterion) {
    let limiter = RateLimiter::direct(quota());
    c.benchmark_group("peers")
        .bench_function("governor_direct_check", |b| {
            b.iter(|| limiter.check().expect("admitted"))
        });
}

fn naive_mutex(c: &mut Criterion, table: &KeyTable) {
    let map: Mutex<HashMap<String, TokenBucket>> = Mutex::new(
        (0..KEYS)
            .map(|k| (common::key_id(k), TokenBucket::new(f64::from(u32::MAX))))
            .collect(),
    );
    let mut j = 0usize;
    c.benchmark_group("peers")
        .bench_function(BenchmarkId::new("naive_mutex_hashmap", KEYS), |b| {
            b.iter(|| {
                j = j.wrapping_add(1);
                let id = table.id(j);
                let mut map = map.lock();
                let bucket = map.get_mut(id).expect("known key");
                assert!(bucket.try_take(1.0, Instant::now()), "admitted");
            })
        });
}

fn limitador(c: &mut Criterion, table: &KeyTable) {
    use limitador::limit::{Context, Limit};

    let limiter = limitador::RateLimiter::new(KEYS as u64 * 2);
    limiter.add_limit(Limit::new(
        "bench",
        u64::MAX,
        60,
        Vec::new(),
        vec!["key".try_into().expect("variable")],
    ));
    let namespace = "bench".into();
    // One context per visit, built up front: building it is the caller's cost.
    let contexts: Vec<Context> = (0..table.len())
        .map(|j| HashMap::from([("key".to_string(), table.id(j).to_string())]).into())
        .collect();
    for ctx in &contexts {
        let first = limiter
            .check_rate_limited_and_update(&namespace, ctx, 1)
            .expect("in memory");
        assert!(!first.limited);
    }
    let mut j = 0usize;
    c.benchmark_group("peers")
        .bench_function(BenchmarkId::new("limitador_in_memory", KEYS), |b| {
            b.iter(|| {
                j = j.wrapping_add(1);
                let result = limiter
                    .check_rate_limited_and_update(&namespace, &contexts[j % contexts.len()], 1)
                    .expect("in memory");
                assert!(!result.limited, "admitted");
                result
            })
        });
}

fn peers(c: &mut Criterion) {
    let table = KeyTable::for_keys(KEYS);
    tollgate(c, &table);
    governor_keyed(c, KEYS, &table, true);
    governor_direct(c);
    naive_mutex(c, &table);
    limitador(c, &table);
    // governor at a million keys, against hot_path/reserve_commit_by_id/1000000
    // (the same key table).
    if std::env::args().any(|a| a == "--bench") {
        let big = KeyTable::for_keys(1_000_000);
        governor_keyed(c, 1_000_000, &big, false);
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = peers
}
criterion_main!(benches);
