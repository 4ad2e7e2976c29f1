//! The Redis backend (feature `redis`) against a real `redis-server`: latency of one
//! request, set beside the round trips it is made of, and throughput of one instance
//! with 64 requests in flight.
//!
//! - `redis_latency` (current-thread tokio runtime, one request at a time):
//!   - `ping`: a `PING` round trip;
//!   - `evalsha_trivial`: `EVALSHA` of `return 1` with one key and one argument;
//!   - `reserve`: `check_and_reserve` alone (the commit that follows is not timed);
//!   - `reserve_commit`: `check_and_reserve` then `commit_usage`.
//! - `redis_throughput` (multi-thread runtime, one engine, 64 tasks): one iteration is
//!   64 × 4 operations, reported in elements (operations) per second:
//!   - `reserve_commit_64_tasks`: each task reserves and commits in a loop (the
//!     engine coalesces concurrent reserves, and commits, into shared calls);
//!   - `reserve_commit_64_tasks_uncoalesced`: the same with `RedisConfig::coalesce`
//!     off: one call per request, pipelined on the connection;
//!   - `reserve_commit_64_tasks_one_workspace` and `…_one_workspace_uncoalesced`: the
//!     same two, every task on the 20 keys of one workspace (one tenant's burst: a
//!     batch shares the workspace, its model, the org and the wallet);
//!   - `evalsha_trivial_64_tasks`: each task runs the trivial script in a loop.
//!
//! Every figure goes through the same kind of connection the engine uses: a
//! `ConnectionManager` (one multiplexed connection; concurrent calls pipeline on it),
//! configured with `RedisConfig`'s default timeouts. A reservation is one round trip
//! carrying one function call (the workspace's levels and the org's, each group under
//! its own hash tag, in one call on a standalone server), a commit another; so
//! `reserve ÷ evalsha_trivial` is what the Lua work and the client-side decision add
//! to one round trip.
//!
//! After the criterion groups, `INFO commandstats` gives Redis's own time per admitted
//! request: one request at a time, and with 64 tasks (coalesced and not).
//!
//! Requests are those of the other benches (`common`: 1,000 keys visited in a fixed
//! random order, every level limited, limits and budgets far from reach, so every
//! admission is checked with `expect`). Counters live under the prefix `bench-<pid>`,
//! deleted at the end of the run; nothing else on the server is touched. Commit
//! markers get a 10-minute TTL (default 24 h; the cost of the `SET` is the same) so an
//! interrupted run leaves little behind.
//!
//! Needs a server: `TOLLGATE_REDIS_URL` (default `redis://127.0.0.1:6379/`); without
//! one the bench prints why and exits successfully.
//!
//! Run: `redis-server --port 6379 --save '' --daemonize yes`, then
//! `cargo bench --features redis --bench redis` (about 40 s).

#![allow(missing_docs)]

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{by_id, KeyTable, Shape, KEYS_PER_WORKSPACE, USAGE};
use criterion::{criterion_group, Criterion, SamplingMode, Throughput};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tollgate::{LeaseConfig, RedisConfig, RedisEngine};

const DEFAULT_URL: &str = "redis://127.0.0.1:6379/";
/// Keys in the bench policy (as in `hot_path` and `peers`).
const KEYS: usize = 1_000;
/// Concurrent tasks in the throughput benches.
const TASKS: usize = 64;
/// Operations per task per criterion iteration in the throughput benches.
const PER_TASK: u64 = 4;
/// How long the reachability check may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

fn url() -> String {
    std::env::var("TOLLGATE_REDIS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

fn prefix() -> String {
    format!("bench-{}", std::process::id())
}

fn config() -> RedisConfig {
    RedisConfig {
        prefix: prefix(),
        commit_marker_ttl: Duration::from_secs(600),
        ..RedisConfig::default()
    }
}

/// A blocking connection with short timeouts, for the probe and the clean-up.
fn blocking_connection(url: &str) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(url)?;
    let connection = client.get_connection_with_timeout(PROBE_TIMEOUT)?;
    connection.set_read_timeout(Some(PROBE_TIMEOUT))?;
    connection.set_write_timeout(Some(PROBE_TIMEOUT))?;
    Ok(connection)
}

/// Whether a server answers `PING` at `url`, and if not, why.
fn probe(url: &str) -> Result<(), String> {
    let mut connection = blocking_connection(url).map_err(|e| e.to_string())?;
    redis::cmd("PING")
        .query::<String>(&mut connection)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The same kind of connection `RedisEngine::connect` makes, with the same timeouts.
async fn manager(url: &str) -> ConnectionManager {
    let defaults = RedisConfig::default();
    let client = redis::Client::open(url).expect("valid Redis URL");
    let manager_config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(defaults.response_timeout))
        .set_connection_timeout(Some(defaults.connection_timeout));
    ConnectionManager::new_with_config(client, manager_config)
        .await
        .expect("connect to Redis")
}

async fn engine(url: &str) -> RedisEngine {
    engine_with(url, config()).await
}

/// An engine that sends one call per request (no coalescing).
async fn uncoalesced_engine(url: &str) -> RedisEngine {
    engine_with(
        url,
        RedisConfig {
            coalesce: false,
            ..config()
        },
    )
    .await
}

/// An engine with quota leasing (`RedisConfig::lease`). Its leases last 1 s rather
/// than the default 250 ms: the bench spreads its requests over 1,000 keys, so at
/// the rate of exact calls (~2,000 a second) a key sees a request about every 0.5 s,
/// and a key is leased only when its requests come within one lease lifetime.
async fn leased_engine(url: &str) -> RedisEngine {
    engine_with(
        url,
        RedisConfig {
            lease: Some(LeaseConfig {
                max_age: Duration::from_secs(1),
                ..LeaseConfig::default()
            }),
            ..config()
        },
    )
    .await
}

async fn engine_with(url: &str, config: RedisConfig) -> RedisEngine {
    RedisEngine::connect(url, common::policy(Shape::keys(KEYS)), config)
        .await
        .expect("connect to Redis")
}

/// The trivial script: one key and one argument in, `1` out.
struct Trivial {
    script: redis::Script,
    key: String,
}

impl Trivial {
    fn new() -> Self {
        Trivial {
            script: redis::Script::new("return 1"),
            key: format!("{}:trivial", prefix()),
        }
    }

    /// One `EVALSHA`, on a clone of the connection as the engine's calls are.
    async fn call(&self, connection: &ConnectionManager) -> i64 {
        let mut connection = connection.clone();
        self.script
            .key(&self.key)
            .arg(1)
            .invoke_async(&mut connection)
            .await
            .expect("EVALSHA")
    }
}

/// One full admitted request, as `common::reserve_commit` for the in-memory engine.
async fn reserve_commit(
    engine: &RedisEngine,
    request: &tollgate::Request<'_>,
) -> tollgate::Receipt {
    let reservation = engine.check_and_reserve(request).await.expect("admitted");
    engine
        .commit_usage(reservation, USAGE)
        .await
        .expect("committed")
}

fn latency(c: &mut Criterion) {
    let url = url();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (connection, engine, leased) = runtime.block_on(async {
        (
            manager(&url).await,
            engine(&url).await,
            leased_engine(&url).await,
        )
    });
    let trivial = Trivial::new();
    let table = KeyTable::for_keys(KEYS);
    let mut j = 0usize;
    // Leases grow as they are used: measure the leasing engine in its steady state.
    runtime.block_on(async {
        for i in 0..50 * KEYS {
            black_box(reserve_commit(&leased, &by_id(table.id(i))).await);
        }
    });

    let mut group = c.benchmark_group("redis_latency");
    group.bench_function("ping", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut connection = connection.clone();
                    let pong: String = redis::cmd("PING")
                        .query_async(&mut connection)
                        .await
                        .expect("PING");
                    black_box(pong);
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("evalsha_trivial", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(trivial.call(&connection).await);
                }
                start.elapsed()
            })
        })
    });
    for (suffix, engine) in [("", &engine), ("_leased", &leased)] {
        group.bench_function(format!("reserve{suffix}"), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let mut reserving = Duration::ZERO;
                    for _ in 0..iters {
                        j = j.wrapping_add(1);
                        let request = by_id(table.id(j));
                        let start = Instant::now();
                        let reservation =
                            engine.check_and_reserve(&request).await.expect("admitted");
                        reserving += start.elapsed();
                        engine
                            .commit_usage(reservation, USAGE)
                            .await
                            .expect("committed");
                    }
                    reserving
                })
            })
        });
        group.bench_function(format!("reserve_commit{suffix}"), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        j = j.wrapping_add(1);
                        black_box(reserve_commit(engine, &by_id(table.id(j))).await);
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// Run `per_task` operations on each of `TASKS` tasks at once; the time until all
/// have finished. `op(t, i)` is task `t`'s operation number `i`.
fn run_tasks<F, Fut>(runtime: &tokio::runtime::Runtime, per_task: u64, op: F) -> Duration
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    runtime.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let op = op.clone();
                tokio::spawn(async move {
                    for i in 0..per_task {
                        op(t, i).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("bench task");
        }
        start.elapsed()
    })
}

fn throughput(c: &mut Criterion) {
    let url = url();
    // The connections' driver tasks run on this runtime's workers, as in a gateway.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (connection, engine, uncoalesced, leased) = runtime.block_on(async {
        (
            manager(&url).await,
            engine(&url).await,
            uncoalesced_engine(&url).await,
            leased_engine(&url).await,
        )
    });
    let trivial = Arc::new(Trivial::new());
    let table = Arc::new(KeyTable::for_keys(KEYS));
    // Workspace 0's keys (key `i` is in workspace `i % workspaces`), in random order.
    let workspaces = KEYS / KEYS_PER_WORKSPACE;
    let one_workspace = Arc::new(KeyTable::random(
        |i| i * workspaces,
        KEYS_PER_WORKSPACE,
        1 << 12,
    ));
    // Each task starts at its own place in the visiting order.
    let stride = table.len() / TASKS;

    let mut group = c.benchmark_group("redis_throughput");
    group
        .throughput(Throughput::Elements(TASKS as u64 * PER_TASK))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(4));
    for (id, engine) in [
        ("reserve_commit_64_tasks", &engine),
        ("reserve_commit_64_tasks_leased", &leased),
        ("reserve_commit_64_tasks_uncoalesced", &uncoalesced),
    ] {
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let (engine, table) = (engine.clone(), Arc::clone(&table));
                run_tasks(&runtime, iters * PER_TASK, move |t, i| {
                    let (engine, table) = (engine.clone(), Arc::clone(&table));
                    async move {
                        let j = t * stride + i as usize;
                        black_box(reserve_commit(&engine, &by_id(table.id(j))).await);
                    }
                })
            })
        });
    }
    for (id, engine) in [
        ("reserve_commit_64_tasks_one_workspace", &engine),
        (
            "reserve_commit_64_tasks_one_workspace_uncoalesced",
            &uncoalesced,
        ),
    ] {
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let (engine, table) = (engine.clone(), Arc::clone(&one_workspace));
                let stride = table.len() / TASKS;
                run_tasks(&runtime, iters * PER_TASK, move |t, i| {
                    let (engine, table) = (engine.clone(), Arc::clone(&table));
                    async move {
                        let j = t * stride + i as usize;
                        black_box(reserve_commit(&engine, &by_id(table.id(j))).await);
                    }
                })
            })
        });
    }
    group.bench_function("evalsha_trivial_64_tasks", |b| {
        b.iter_custom(|iters| {
            let (connection, trivial) = (connection.clone(), Arc::clone(&trivial));
            run_tasks(&runtime, iters * PER_TASK, move |_, _| {
                let (connection, trivial) = (connection.clone(), Arc::clone(&trivial));
                async move {
                    black_box(trivial.call(&connection).await);
                }
            })
        })
    });
    group.finish();
}

/// Server time, from `INFO commandstats`: microseconds of Redis CPU per call (a
/// function's time includes every command it runs). Reset with `CONFIG RESETSTAT`
/// before each phase; phases run one request at a time.
async fn commandstats_usec(connection: &ConnectionManager, command: &str) -> (u64, u64) {
    let mut connection = connection.clone();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .expect("INFO commandstats");
    let prefix = format!("cmdstat_{command}:");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or((0, 0), |stats| {
            let field = |name: &str| -> u64 {
                stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(name))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            (field("calls="), field("usec="))
        })
}

async fn reset_stats(connection: &ConnectionManager) {
    let mut connection = connection.clone();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut connection)
        .await
        .expect("CONFIG RESETSTAT");
}

/// How long the settles of closed leases are given to land before the figures are
/// read (a settle is one call, sent at once).
const SETTLE_WAIT: Duration = Duration::from_millis(300);

/// `per_task` requests on each of `TASKS` tasks at once on `engine`.
async fn load(engine: &RedisEngine, table: &Arc<KeyTable>, per_task: usize) {
    let stride = table.len() / TASKS;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (engine, table) = (engine.clone(), Arc::clone(table));
            tokio::spawn(async move {
                for i in 0..per_task {
                    black_box(reserve_commit(&engine, &by_id(table.id(t * stride + i))).await);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("bench task");
    }
}

/// Redis time and function calls per admitted request with `TASKS` tasks reserving
/// and committing at once on `engine` (`per_task` requests each). With `leased`,
/// after an unmeasured round as long (leases grow as they are used), and counting
/// the settles of the leases it took (closed at the end).
async fn loaded_server_time(
    connection: &ConnectionManager,
    engine: &RedisEngine,
    table: &Arc<KeyTable>,
    per_task: usize,
    leased: bool,
) -> (f64, f64) {
    if leased {
        load(engine, table, per_task).await;
    }
    reset_stats(connection).await;
    load(engine, table, per_task).await;
    if leased {
        engine.close_leases().await;
        tokio::time::sleep(SETTLE_WAIT).await;
    }
    let (calls, usec) = commandstats_usec(connection, "fcall").await;
    let requests = (TASKS * per_task) as f64;
    (usec as f64 / requests, calls as f64 / requests)
}

/// Redis time and function calls per admitted request, one request at a time, on a
/// leasing engine: after `n` unmeasured requests, `n` measured ones and the settles
/// of every lease they used.
async fn leased_server_time(
    connection: &ConnectionManager,
    engine: &RedisEngine,
    table: &KeyTable,
    n: usize,
) -> (f64, f64) {
    for i in 0..n {
        black_box(reserve_commit(engine, &by_id(table.id(i))).await);
    }
    reset_stats(connection).await;
    for i in n..2 * n {
        black_box(reserve_commit(engine, &by_id(table.id(i))).await);
    }
    engine.close_leases().await;
    tokio::time::sleep(SETTLE_WAIT).await;
    let (calls, usec) = commandstats_usec(connection, "fcall").await;
    (usec as f64 / n as f64, calls as f64 / n as f64)
}

/// What Redis spends on one admitted request: the reserve functions (workspace and
/// org tags), the commit functions, and a trivial `EVALSHA` for scale; then the same
/// with 64 tasks at once, coalesced and not. Written to
/// `$CARGO_TARGET_DIR/criterion/redis_server_time.json` for `bench_table`.
fn server_time() {
    const PER_TASK_LOADED: usize = 50;
    const ROUNDS: usize = 20;
    const BATCH: usize = 100;
    let url = url();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let (connection, engine) = (manager(&url).await, engine(&url).await);
        let uncoalesced = uncoalesced_engine(&url).await;
        let trivial = Trivial::new();
        let table = Arc::new(KeyTable::for_keys(KEYS));
        reset_stats(&connection).await;
        for _ in 0..ROUNDS * BATCH {
            black_box(trivial.call(&connection).await);
        }
        let (trivial_calls, trivial_usec) = commandstats_usec(&connection, "evalsha").await;
        let (mut reserve_usec, mut commit_usec, mut requests, mut calls) = (0, 0, 0u64, 0);
        for round in 0..ROUNDS {
            reset_stats(&connection).await;
            let mut held = Vec::with_capacity(BATCH);
            for i in 0..BATCH {
                let request = by_id(table.id(round * BATCH + i));
                held.push(engine.check_and_reserve(&request).await.expect("admitted"));
            }
            let (reserve_calls, usec) = commandstats_usec(&connection, "fcall").await;
            reserve_usec += usec;
            calls += reserve_calls;
            reset_stats(&connection).await;
            for reservation in held {
                engine
                    .commit_usage(reservation, USAGE)
                    .await
                    .expect("committed");
            }
            let (commit_calls, usec) = commandstats_usec(&connection, "fcall").await;
            commit_usec += usec;
            calls += commit_calls;
            requests += BATCH as u64;
        }
        let per = |usec: u64, n: u64| usec as f64 / n.max(1) as f64;
        let (loaded_us, loaded_calls) =
            loaded_server_time(&connection, &engine, &table, PER_TASK_LOADED, false).await;
        let (uncoalesced_us, uncoalesced_calls) =
            loaded_server_time(&connection, &uncoalesced, &table, PER_TASK_LOADED, false).await;
        // Leases pay off over many requests per key: 50 per key of the 1,000.
        let leased = leased_engine(&url).await;
        let (leased_us, leased_calls) =
            leased_server_time(&connection, &leased, &table, 50 * KEYS).await;
        let (leased_64_us, leased_64_calls) =
            loaded_server_time(&connection, &leased, &table, 50 * KEYS / TASKS, true).await;
        let figures = [
            ("trivial_evalsha_us", per(trivial_usec, trivial_calls)),
            ("reserve_us", per(reserve_usec, requests)),
            ("commit_us", per(commit_usec, requests)),
            ("per_request_us", per(reserve_usec + commit_usec, requests)),
            (
                "per_function_call_us",
                per(reserve_usec + commit_usec, calls),
            ),
            ("per_request_64_tasks_us", loaded_us),
            ("calls_per_request_64_tasks", loaded_calls),
            ("per_request_64_tasks_uncoalesced_us", uncoalesced_us),
            ("calls_per_request_64_tasks_uncoalesced", uncoalesced_calls),
            ("per_request_leased_us", leased_us),
            ("calls_per_request_leased", leased_calls),
            ("per_request_64_tasks_leased_us", leased_64_us),
            ("calls_per_request_64_tasks_leased", leased_64_calls),
        ];
        let json = figures
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        println!("redis server time per admitted request (INFO commandstats): {{{json}}}");
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(
                || std::path::PathBuf::from("target"),
                std::path::PathBuf::from,
            )
            .join("criterion");
        let _ = std::fs::create_dir_all(&dir);
        let written = std::fs::write(
            dir.join("redis_server_time.json"),
            format!("{{{json}, \"measured_at\": {seconds}}}\n"),
        );
        if let Err(error) = written {
            eprintln!("could not save the server-time figures: {error}");
        }
    });
}

/// Delete every key this run created (`<prefix>:*`), nothing else.
fn clean_up(url: &str) {
    let result = (|| -> redis::RedisResult<usize> {
        let mut connection = blocking_connection(url)?;
        let pattern = format!("{}:*", prefix());
        let mut cursor = 0u64;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(10_000)
                .query(&mut connection)?;
            if !keys.is_empty() {
                deleted += redis::cmd("UNLINK")
                    .arg(&keys)
                    .query::<usize>(&mut connection)?;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    })();
    if let Err(error) = result {
        eprintln!(
            "could not delete the bench's keys ({}:*): {error}",
            prefix()
        );
    }
}

fn config_criterion() -> Criterion {
    common::criterion()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config_criterion();
    targets = latency, throughput
}

// `criterion_main!`, after checking that there is a server to measure.
fn main() {
    let url = url();
    if let Err(error) = probe(&url) {
        println!(
            "skipping Redis benches: no server at {url} (start one with \
             `redis-server --port 6379 --save ''` or set TOLLGATE_REDIS_URL): {error}"
        );
        return;
    }
    benches();
    server_time();
    clean_up(&url);
    Criterion::default().configure_from_args().final_summary();
}
