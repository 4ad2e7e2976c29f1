//! Turns criterion's saved estimates into the tables of `BENCHMARKS.md`, measures
//! memory per key and per workspace and allocations per request with a counting
//! allocator, and marks every goal met or not with its figure.
//!
//! ```text
//! cargo bench && cargo run --release --example bench_table
//! ```
//!
//! It reads `$CARGO_TARGET_DIR/criterion/**/new/{estimates,benchmark}.json` (default
//! `target/`), and rewrites only the part of `BENCHMARKS.md` between the
//! `bench_table:begin` and `bench_table:end` markers, so the hand-written analysis
//! around it stays. `--no-memory` skips the million-key memory measurement;
//! `--stdout` prints the generated part instead of writing the file.
//!
//! The Redis section needs a server during the bench run (`redis-server --port 6379
//! --save '' --daemonize yes`, then `cargo bench --features redis --bench redis`);
//! without its estimates it says it was not measured.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[path = "../benches/common/mod.rs"]
#[allow(missing_docs)]
mod common;

use common::{by_id, reserve_commit, KeyTable, Shape};
use tollgate::{Engine, Policy};

// ---------------------------------------------------------------------------------
// A counting allocator: live bytes and number of allocations.

struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> i64 {
    LIVE_BYTES.load(Ordering::Relaxed)
}

fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Resident set size of this process in bytes (Linux), for the allocator's overhead.
fn rss() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

// ---------------------------------------------------------------------------------
// Memory and allocation measurements.

const BIG: usize = 1_000_000;

/// Bytes kept by each step of loading one policy shape.
#[derive(Default)]
struct Load {
    document: i64,
    policy: i64,
    engine: i64,
    engine_allocations: u64,
    engine_rss: Option<i64>,
    policy_secs: f64,
    engine_secs: f64,
}

/// Build document, policy and engine for `shape`, counting what each keeps; the
/// result is dropped before returning.
fn load(shape: Shape) -> Load {
    let base = live();
    let doc = common::document(shape);
    let document = live() - base;
    let started = Instant::now();
    let policy = Policy::new(doc).expect("valid bench policy");
    let policy_secs = started.elapsed().as_secs_f64();
    let policy_bytes = live() - base;
    let before = live();
    let count = allocations();
    let rss_before = rss();
    let started = Instant::now();
    let engine = Engine::new(policy);
    let engine_secs = started.elapsed().as_secs_f64();
    let load = Load {
        document,
        policy: policy_bytes,
        engine: live() - before,
        engine_allocations: allocations() - count,
        engine_rss: rss().zip(rss_before).map(|(a, b)| a - b),
        policy_secs,
        engine_secs,
    };
    drop(engine);
    load
}

struct Memory {
    keys: usize,
    workspaces: usize,
    with_keys: Load,
    without_keys: Load,
}

impl Memory {
    fn per_key(&self, f: impl Fn(&Load) -> i64) -> f64 {
        (f(&self.with_keys) - f(&self.without_keys)) as f64 / self.keys as f64
    }

    fn per_workspace(&self, f: impl Fn(&Load) -> i64) -> f64 {
        f(&self.without_keys) as f64 / self.workspaces as f64
    }
}

fn measure_memory() -> Memory {
    let shape = Shape::keys(BIG);
    // The engine for the same workspaces without any key: what keys add is the
    // difference, what a workspace costs is this one divided by their number.
    let without_keys = load(Shape { keys: 0, ..shape });
    let with_keys = load(shape);
    Memory {
        keys: shape.keys,
        workspaces: shape.workspaces,
        with_keys,
        without_keys,
    }
}

/// Allocations per call, over many calls after a warm-up round over every key.
fn allocations_per_request() -> Vec<(&'static str, f64)> {
    const KEYS: usize = 1_000;
    const CALLS: usize = 200_000;
    let engine = common::engine(Shape::keys(KEYS));
    let table = KeyTable::for_keys(KEYS);
    for j in 0..table.len() {
        let _ = reserve_commit(&engine, &by_id(table.id(j)));
    }
    let per_call = |f: &dyn Fn(usize)| {
        let before = allocations();
        for j in 0..CALLS {
            f(j);
        }
        (allocations() - before) as f64 / CALLS as f64
    };
    let mut out = vec![
        (
            "check_and_reserve + commit_usage, by key id",
            per_call(&|j| {
                let _ = reserve_commit(&engine, &by_id(table.id(j)));
            }),
        ),
        (
            "check_and_reserve + commit_usage, by secret",
            per_call(&|j| {
                let _ = reserve_commit(&engine, &common::by_secret(table.secret(j)));
            }),
        ),
        (
            "check_and_reserve, reservation dropped",
            per_call(&|j| {
                drop(engine.check_and_reserve(&by_id(table.id(j))));
            }),
        ),
    ];
    let mut doc = common::document(Shape::keys(KEYS));
    doc.org.wallet = Some(common::dec("0"));
    let empty_wallet = Engine::new(Policy::new(doc).expect("valid"));
    out.push((
        "denial at the wallet (4 levels rolled back)",
        per_call(&|j| {
            let denied = empty_wallet.check_and_reserve(&by_id(table.id(j)));
            assert!(denied.is_err());
        }),
    ));
    out
}

// ---------------------------------------------------------------------------------
// Criterion's saved estimates.

struct Estimate {
    median_ns: f64,
    mad_ns: f64,
    elements: Option<u64>,
    modified: Option<SystemTime>,
}

impl Estimate {
    /// Requests per second, for a throughput bench (elements per iteration).
    fn per_second(&self) -> Option<f64> {
        self.elements.map(|n| n as f64 * 1e9 / self.median_ns)
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn read_estimates(root: &Path) -> BTreeMap<String, Estimate> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "new") {
                    if let Some((id, estimate)) = read_one(&path) {
                        out.insert(id, estimate);
                    }
                } else if path.file_name().is_some_and(|n| n != "report") {
                    stack.push(path);
                }
            }
        }
    }
    out
}

fn read_one(new: &Path) -> Option<(String, Estimate)> {
    let json = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(new.join(name)).ok()?).ok()
    };
    let benchmark = json("benchmark.json")?;
    let estimates = json("estimates.json")?;
    let id = benchmark.get("full_id")?.as_str()?.to_owned();
    let estimate = Estimate {
        median_ns: estimates.pointer("/median/point_estimate")?.as_f64()?,
        mad_ns: estimates
            .pointer("/median_abs_dev/point_estimate")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN),
        elements: benchmark
            .pointer("/throughput/Elements")
            .and_then(serde_json::Value::as_u64),
        modified: std::fs::metadata(new.join("estimates.json"))
            .and_then(|m| m.modified())
            .ok(),
    };
    Some((id, estimate))
}

// ---------------------------------------------------------------------------------
// Machine and run facts.

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn utc(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    chrono::DateTime::from_timestamp(secs as i64, 0).map_or_else(
        || "unknown".into(),
        |t| t.format("%Y-%m-%d %H:%M UTC").to_string(),
    )
}

// ---------------------------------------------------------------------------------
// Rendering.

fn ns(x: f64) -> String {
    if x >= 1_000_000.0 {
        format!("{:.2} ms", x / 1_000_000.0)
    } else if x >= 10_000.0 {
        format!("{:.1} µs", x / 1_000.0)
    } else if x >= 100.0 {
        format!("{x:.0} ns")
    } else {
        format!("{x:.1} ns")
    }
}

fn group_thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

struct Goal {
    what: &'static str,
    target: &'static str,
    figure: Option<(f64, String)>,
    met: fn(f64) -> bool,
}

impl Goal {
    /// The figure as shown, and whether it meets the target.
    fn verdict(&self) -> (String, &'static str) {
        match &self.figure {
            Some((x, shown)) => (
                shown.clone(),
                if (self.met)(*x) { "met" } else { "**NOT met**" },
            ),
            None => ("not measured".into(), "**NOT measured**"),
        }
    }
}

const BEGIN: &str = "<!-- bench_table:begin -->";
const END: &str = "<!-- bench_table:end -->";

/// The benches in table order: id, label.
const HOT_PATH: &[(&str, &str)] = &[
    (
        "hot_path/reserve_commit_by_id/1",
        "reserve + commit, 1 key, by key id",
    ),
    (
        "hot_path/reserve_commit_by_id/1000",
        "reserve + commit, 1,000 keys, by key id",
    ),
    (
        "hot_path/reserve_commit_by_id_every_rule/1000",
        "the same with every further rule in use (key × model limits and budget, second budgets, an override)",
    ),
    (
        "hot_path/reserve_commit_by_secret/1000",
        "reserve + commit, 1,000 keys, by secret (SHA-256 per call)",
    ),
    (
        "hot_path/reserve_commit_by_id/1000000",
        "reserve + commit, 1,000,000 keys, by key id",
    ),
    (
        "hot_path/reserve_drop_by_id/1000",
        "reserve, then drop without commit (1,000 keys)",
    ),
    (
        "hot_path/denied_at_key_by_id/1000",
        "denied at the first level (key RPD used up)",
    ),
    (
        "hot_path/denied_at_wallet_by_id/1000",
        "denied at the last level (wallet empty; 4 levels rolled back)",
    ),
    (
        "hot_path/headers_admitted",
        "render all headers of an admitted response (8 headers)",
    ),
    (
        "hot_path/headers_denied",
        "render all headers of a 429 (4 headers + Retry-After)",
    ),
];

const PEERS: &[(&str, &str)] = &[
    (
        "peers/tollgate_reserve_commit/1000",
        "**tollgate**: full multi-level reserve + commit (7 limits, 3 budgets, wallet)",
    ),
    (
        "peers/governor_check_key/1000",
        "governor keyed `check_key`",
    ),
    (
        "peers/governor_check_key_n/1000",
        "governor keyed `check_key_n` (n = 2)",
    ),
    (
        "peers/governor_direct_check",
        "governor direct `check` (no key)",
    ),
    (
        "peers/naive_mutex_hashmap/1000",
        "naive `Mutex<HashMap<String, TokenBucket>>`",
    ),
    (
        "peers/limitador_in_memory/1000",
        "limitador in-memory `check_rate_limited_and_update`",
    ),
    (
        "peers/governor_check_key/1000000",
        "governor keyed `check_key`, 1,000,000 keys",
    ),
];

const CONTENTION: &[(&str, &str)] = &[
    ("distinct", "distinct workspaces"),
    ("shared", "one shared workspace and model"),
    (
        "distinct_no_org_money",
        "distinct workspaces, no org budget or wallet",
    ),
];

/// `benches/redis.rs`, one request at a time (current-thread runtime).
const REDIS_LATENCY: &[(&str, &str)] = &[
    ("redis_latency/ping", "`PING` round trip"),
    (
        "redis_latency/evalsha_trivial",
        "`EVALSHA` of `return 1` (one key, one argument)",
    ),
    (
        "redis_latency/reserve",
        "`check_and_reserve` alone (one round trip, one call for the workspace and org tags)",
    ),
    (
        "redis_latency/reserve_commit",
        "`check_and_reserve` + `commit_usage` (two round trips)",
    ),
    (
        "redis_latency/reserve_leased",
        "`check_and_reserve` alone, quota leasing on (`RedisConfig::lease`, 1 s leases)",
    ),
    (
        "redis_latency/reserve_commit_leased",
        "`check_and_reserve` + `commit_usage`, quota leasing on",
    ),
];

/// `benches/redis.rs`, 64 tasks on one engine (multi-thread runtime).
const REDIS_THROUGHPUT: &[(&str, &str)] = &[
    (
        "redis_throughput/reserve_commit_64_tasks",
        "reserve + commit, 64 concurrent tasks on one engine (coalesced)",
    ),
    (
        "redis_throughput/reserve_commit_64_tasks_uncoalesced",
        "the same, `RedisConfig::coalesce` off (one call per request)",
    ),
    (
        "redis_throughput/reserve_commit_64_tasks_leased",
        "the same, quota leasing on (and coalesced)",
    ),
    (
        "redis_throughput/reserve_commit_64_tasks_one_workspace",
        "reserve + commit, 64 tasks on the 20 keys of one workspace (coalesced)",
    ),
    (
        "redis_throughput/reserve_commit_64_tasks_one_workspace_uncoalesced",
        "the same, `RedisConfig::coalesce` off",
    ),
    (
        "redis_throughput/evalsha_trivial_64_tasks",
        "trivial `EVALSHA`, 64 concurrent tasks on one connection",
    ),
];

/// The Redis server-time figures `benches/redis.rs` saves (flat JSON of numbers).
fn redis_server_time() -> Option<BTreeMap<String, f64>> {
    let text =
        std::fs::read_to_string(target_dir().join("criterion/redis_server_time.json")).ok()?;
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text).ok()?;
    Some(
        map.into_iter()
            .filter_map(|(k, v)| Some((k, v.as_f64()?)))
            .collect(),
    )
}

fn render(
    estimates: &BTreeMap<String, Estimate>,
    memory: Option<&Memory>,
    allocs: &[(&str, f64)],
) -> String {
    let get = |id: &str| estimates.get(id);
    let server = redis_server_time();
    let median = |id: &str| get(id).map(|e| e.median_ns);
    let per_second = |id: &str| get(id).and_then(Estimate::per_second);
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let mut md = String::new();

    let newest = estimates.values().filter_map(|e| e.modified).max();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let _ = writeln!(md, "{BEGIN}");
    let _ = writeln!(md, "<!-- Generated by `cargo run --release --example bench_table`; edits between these markers are overwritten. -->\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(
        md,
        "| machine | {} × {cores} cores (`nproc`: {}) |",
        cpu_model(),
        command_output("nproc", &[])
    );
    let _ = writeln!(
        md,
        "| criterion run | {} |",
        newest.map_or_else(|| "no estimates found".into(), utc)
    );
    let _ = writeln!(md, "| table generated | {} |", utc(SystemTime::now()));
    let _ = writeln!(
        md,
        "| toolchain | {} |",
        command_output("rustc", &["--version"])
    );
    let _ = writeln!(
        md,
        "| command | `cargo bench && cargo run --release --example bench_table` |"
    );
    let _ = writeln!(
        md,
        "| estimates | criterion median of {} benches read from `{}` |",
        estimates.len(),
        target_dir().join("criterion").display()
    );
    md.push('\n');

    // Goals first: the point of the page.
    let full_1k = median("hot_path/reserve_commit_by_id/1000");
    let goals = [
        Goal {
            what: "full multi-level reserve + commit, median (1,000 keys, by id)",
            target: "≤ 300 ns",
            figure: full_1k.map(|x| (x, ns(x))),
            met: |x| x <= 300.0,
        },
        Goal {
            what: "tollgate full decision ÷ governor keyed `check_key` (peers bench, same keys)",
            target: "≤ 5×",
            figure: ratio(
                median("peers/tollgate_reserve_commit/1000"),
                median("peers/governor_check_key/1000"),
            )
            .map(|r| (r, format!("{r:.2}×"))),
            met: |r| r <= 5.0,
        },
        Goal {
            what: "time at 1,000,000 keys ÷ time at 1,000 keys",
            target: "≤ 1.5×",
            figure: ratio(median("hot_path/reserve_commit_by_id/1000000"), full_1k)
                .map(|r| (r, format!("{r:.2}×"))),
            met: |r| r <= 1.5,
        },
        Goal {
            what: "engine state per key (bytes allocated by `Engine::new`, policy excluded)",
            target: "≤ 256 B",
            figure: memory.map(|m| {
                let b = m.per_key(|l| l.engine);
                (b, format!("{b:.0} B"))
            }),
            met: |b| b <= 256.0,
        },
        Goal {
            what: "2 threads ÷ 1 thread throughput, distinct workspaces",
            target: "≥ 1.6×",
            figure: ratio(
                per_second("contention/distinct/2"),
                per_second("contention/distinct/1"),
            )
            .map(|r| (r, format!("{r:.2}×"))),
            met: |r| r >= 1.6,
        },
        Goal {
            what: "2 threads ÷ 1 thread throughput, one shared workspace and model",
            target: "≥ 0.8×",
            figure: ratio(
                per_second("contention/shared/2"),
                per_second("contention/shared/1"),
            )
            .map(|r| (r, format!("{r:.2}×"))),
            met: |r| r >= 0.8,
        },
        Goal {
            what: "allocations per admitted request (reserve + commit)",
            target: "0",
            figure: allocs.first().map(|&(_, a)| (a, format!("{a}"))),
            met: |a| a == 0.0,
        },
    ];
    let _ = writeln!(
        md,
        "### Goals\n\n| goal | target | measured | |\n|---|---|---|---|"
    );
    for goal in &goals {
        let (figure, verdict) = goal.verdict();
        let _ = writeln!(
            md,
            "| {} | {} | {figure} | {verdict} |",
            goal.what, goal.target
        );
    }

    let _ = writeln!(md, "\n### Hot path, one thread (`benches/hot_path.rs`)\n\n| bench | median | ± MAD | id |\n|---|---:|---:|---|");
    for (id, label) in HOT_PATH {
        if let Some(e) = get(id) {
            let _ = writeln!(
                md,
                "| {label} | {} | {} | `{id}` |",
                ns(e.median_ns),
                ns(e.mad_ns)
            );
        }
    }

    let _ = writeln!(md, "\n### Peers, same run, same key distribution (`benches/peers.rs`)\n\n| bench | median | tollgate full ÷ this | id |\n|---|---:|---:|---|");
    let ours = median("peers/tollgate_reserve_commit/1000");
    for (id, label) in PEERS {
        if let Some(e) = get(id) {
            let versus = if id.ends_with("/1000000") {
                ratio(
                    median("hot_path/reserve_commit_by_id/1000000"),
                    Some(e.median_ns),
                )
                .map_or_else(String::new, |r| format!("{r:.2}× (vs tollgate at 1M keys)"))
            } else {
                ratio(ours, Some(e.median_ns)).map_or_else(String::new, |r| format!("{r:.2}×"))
            };
            let _ = writeln!(md, "| {label} | {} | {versus} | `{id}` |", ns(e.median_ns));
        }
    }
    if get("peers/limitador_in_memory/1000").is_none() {
        let _ = writeln!(md, "\nlimitador: no estimate found (see the notes below).");
    }

    let _ = writeln!(md, "\n### Throughput, reserve + commit on 1 and 2 threads (`benches/contention.rs`)\n\n| scenario | 1 thread | 2 threads | 2 ÷ 1 |\n|---|---:|---:|---:|");
    for (name, label) in CONTENTION {
        let one = per_second(&format!("contention/{name}/1"));
        let two = per_second(&format!("contention/{name}/2"));
        if one.is_none() && two.is_none() {
            continue;
        }
        let show = |x: Option<f64>| {
            x.map_or_else(|| "–".into(), |x| format!("{} req/s", group_thousands(x)))
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} |",
            show(one),
            show(two),
            ratio(two, one).map_or_else(|| "–".into(), |r| format!("{r:.2}×"))
        );
    }

    let _ = writeln!(
        md,
        "\n### Redis backend, one local `redis-server` (`benches/redis.rs`)\n"
    );
    let redis_ids = || REDIS_LATENCY.iter().chain(REDIS_THROUGHPUT);
    let redis_run = redis_ids()
        .filter_map(|(id, _)| get(id).and_then(|e| e.modified))
        .max();
    if redis_ids().all(|(id, _)| get(id).is_none()) {
        let _ = writeln!(md, "not measured (no Redis server during this run)");
    } else {
        let _ = writeln!(
            md,
            "Run with a server up: `redis-server --port 6379 --save '' --daemonize yes`, then \
             `cargo bench --features redis --bench redis` (estimates from {}).\n",
            redis_run.map_or_else(|| "an unknown time".into(), utc)
        );
        let trivial = median("redis_latency/evalsha_trivial");
        let _ = writeln!(
            md,
            "| bench | median | ± MAD | ÷ trivial `EVALSHA` | id |\n|---|---:|---:|---:|---|"
        );
        for (id, label) in REDIS_LATENCY {
            if let Some(e) = get(id) {
                let _ = writeln!(
                    md,
                    "| {label} | {} | {} | {} | `{id}` |",
                    ns(e.median_ns),
                    ns(e.mad_ns),
                    ratio(Some(e.median_ns), trivial)
                        .map_or_else(|| "–".into(), |r| format!("{r:.2}×"))
                );
            }
        }
        let server_figure = |key: &str| {
            server
                .as_ref()
                .and_then(|s| s.get(key).copied())
                .map(|us| (us, format!("{us:.1} µs")))
        };
        let throughput_share = |id: &str| {
            per_second(id)
                .zip(per_second("redis_throughput/evalsha_trivial_64_tasks"))
                .map(|(ours, trivial)| {
                    let share = 100.0 * ours / trivial;
                    (share, format!("{share:.1} %"))
                })
        };
        let goals = [
            Goal {
                what: "reserve within 2× of a trivial EVALSHA's median latency, every request exact",
                target: "≤ 2×",
                figure: ratio(median("redis_latency/reserve"), trivial)
                    .map(|r| (r, format!("{r:.2}×"))),
                met: |r| r <= 2.0,
            },
            Goal {
                what: "the same with quota leasing",
                target: "≤ 2×",
                figure: ratio(median("redis_latency/reserve_leased"), trivial)
                    .map(|r| (r, format!("{r:.2}×"))),
                met: |r| r <= 2.0,
            },
            Goal {
                what: "reserve + commit with 64 tasks at 25 % of trivial-script throughput or more, every request exact",
                target: "≥ 25 %",
                figure: throughput_share("redis_throughput/reserve_commit_64_tasks"),
                met: |share| share >= 25.0,
            },
            Goal {
                what: "the same with quota leasing",
                target: "≥ 25 %",
                figure: throughput_share("redis_throughput/reserve_commit_64_tasks_leased"),
                met: |share| share >= 25.0,
            },
            Goal {
                what: "Redis server time per admitted request (reserve + commit, all functions) of 40 µs or less, every request exact",
                target: "≤ 40 µs",
                figure: server_figure("per_request_us"),
                met: |us| us <= 40.0,
            },
            Goal {
                what: "the same with quota leasing (lease reserves and settles included)",
                target: "≤ 40 µs",
                figure: server_figure("per_request_leased_us"),
                met: |us| us <= 40.0,
            },
        ];
        for goal in &goals {
            let (figure, verdict) = goal.verdict();
            let _ = writeln!(
                md,
                "\nGoal: {} ({}): {verdict} ({figure})",
                goal.what, goal.target
            );
        }
        let _ = writeln!(
            md,
            "\n| throughput | operations per second | id |\n|---|---:|---|"
        );
        for (id, label) in REDIS_THROUGHPUT {
            let shown = per_second(id)
                .map_or_else(|| "–".into(), |x| format!("{} ops/s", group_thousands(x)));
            let _ = writeln!(md, "| {label} | {shown} | `{id}` |");
        }
        if let Some(server) = &server {
            let _ = writeln!(
                md,
                "\nRedis server time from `INFO commandstats` (one request at a time, 2,000 requests, \
                 unless the row says 64 tasks: 3,200 requests; a function's time includes every \
                 command it runs):\n\n| | µs |\n|---|---:|"
            );
            for (key, label) in [
                ("trivial_evalsha_us", "trivial `EVALSHA` (`return 1`)"),
                (
                    "reserve_us",
                    "`reserve` (workspace and org tags), per request",
                ),
                (
                    "commit_us",
                    "`commit` (workspace and org tags), per request",
                ),
                ("per_request_us", "per admitted request (reserve + commit)"),
                ("per_function_call_us", "per function call"),
                (
                    "per_request_64_tasks_us",
                    "per admitted request, 64 tasks, coalesced",
                ),
                (
                    "per_request_64_tasks_uncoalesced_us",
                    "per admitted request, 64 tasks, not coalesced",
                ),
                (
                    "per_request_leased_us",
                    "per admitted request, quota leasing on (50,000 requests after as many unmeasured; settles included)",
                ),
                (
                    "per_request_64_tasks_leased_us",
                    "per admitted request, 64 tasks, quota leasing on (the same counts)",
                ),
            ] {
                if let Some(us) = server.get(key) {
                    let _ = writeln!(md, "| {label} | {us:.1} |");
                }
            }
            if let (Some(coalesced), Some(alone)) = (
                server.get("calls_per_request_64_tasks"),
                server.get("calls_per_request_64_tasks_uncoalesced"),
            ) {
                let _ = writeln!(
                    md,
                    "\nFunction calls per admitted request with 64 tasks: {coalesced:.2} coalesced \
                     ({:.1} requests per call), {alone:.2} not.",
                    2.0 / coalesced.max(f64::MIN_POSITIVE)
                );
            }
            if let (Some(alone), Some(loaded)) = (
                server.get("calls_per_request_leased"),
                server.get("calls_per_request_64_tasks_leased"),
            ) {
                let _ = writeln!(
                    md,
                    "\nWith quota leasing: {alone:.3} function calls per admitted request one at a \
                     time, {loaded:.3} with 64 tasks (lease reserves and settles)."
                );
            }
        }
    }

    if let Some(m) = memory {
        let _ = writeln!(
            md,
            "\n### Memory, {} keys in {} workspaces (counting allocator; requested bytes, before malloc's own overhead)\n",
            group_thousands(m.keys as f64),
            group_thousands(m.workspaces as f64)
        );
        let _ = writeln!(md, "| | per key | per workspace |\n|---|---:|---:|");
        let row = |md: &mut String, label: &str, f: &dyn Fn(&Load) -> i64| {
            let _ = writeln!(
                md,
                "| {label} | {:.0} B | {:.0} B |",
                m.per_key(f),
                m.per_workspace(f)
            );
        };
        row(
            &mut md,
            "engine state (`Engine::new`: counters, id maps), policy excluded",
            &|l| l.engine,
        );
        row(
            &mut md,
            "validated `Policy` (compiled rules + the document it keeps)",
            &|l| l.policy,
        );
        row(&mut md, "  of which the `PolicyDocument`", &|l| l.document);
        row(&mut md, "engine state + validated `Policy`", &|l| {
            l.engine + l.policy
        });
        let _ = writeln!(
            md,
            "| allocations by `Engine::new` | {:.2} | {:.2} |",
            m.per_key(|l| l.engine_allocations as i64),
            m.per_workspace(|l| l.engine_allocations as i64)
        );
        if let (Some(a), Some(b)) = (m.with_keys.engine_rss, m.without_keys.engine_rss) {
            let _ = writeln!(
                md,
                "| resident memory added by `Engine::new` (RSS, includes malloc overhead) | {:.0} B | {:.0} B |",
                (a - b) as f64 / m.keys as f64,
                b as f64 / m.workspaces as f64
            );
        }
        let _ = writeln!(
            md,
            "\nLoading {} keys: `Policy::new` {:.2} s, `Engine::new` {:.2} s.",
            group_thousands(m.keys as f64),
            m.with_keys.policy_secs,
            m.with_keys.engine_secs
        );
    }

    if !allocs.is_empty() {
        let _ = writeln!(md, "\n### Allocations per call (counting allocator, 200,000 calls after a warm-up, 1,000 keys)\n\n| call | allocations per call |\n|---|---:|");
        for (label, a) in allocs {
            let _ = writeln!(md, "| {label} | {a} |");
        }
    }

    let unknown: Vec<&String> = estimates
        .keys()
        .filter(|id| {
            !HOT_PATH
                .iter()
                .chain(PEERS)
                .chain(REDIS_LATENCY)
                .chain(REDIS_THROUGHPUT)
                .any(|(known, _)| known == id)
                && !id.starts_with("contention/")
        })
        .collect();
    if !unknown.is_empty() {
        let _ = writeln!(
            md,
            "\n### Other estimates found\n\n| id | median |\n|---|---:|"
        );
        for id in unknown {
            let _ = writeln!(md, "| `{id}` | {} |", ns(estimates[id].median_ns));
        }
    }
    let _ = writeln!(md, "\n{END}");
    md
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().any(|a| a == f);

    let estimates = read_estimates(&target_dir().join("criterion"));
    if estimates.is_empty() {
        eprintln!(
            "no criterion estimates under {}: run `cargo bench` first",
            target_dir().join("criterion").display()
        );
    }
    eprintln!("counting allocations per request ...");
    let allocs = allocations_per_request();
    let memory = if flag("--no-memory") {
        None
    } else {
        eprintln!("measuring memory at {BIG} keys (takes a few seconds) ...");
        Some(measure_memory())
    };
    let generated = render(&estimates, memory.as_ref(), &allocs);

    if flag("--stdout") {
        print!("{generated}");
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    let updated = match (existing.find(BEGIN), existing.find(END)) {
        (Some(begin), Some(end)) if begin < end => {
            let after = &existing[end + END.len()..];
            format!("{}{}{}", &existing[..begin], generated.trim_end(), after)
        }
        _ => format!("# Benchmarks\n\n{generated}"),
    };
    std::fs::write(&path, updated).expect("write BENCHMARKS.md");
    eprintln!("wrote {}", path.display());
}
