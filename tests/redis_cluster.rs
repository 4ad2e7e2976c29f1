//! Redis backend on a real 3-master Redis Cluster and many instances at once.
//!
//! Several `RedisEngine`s, each with its own connection (one per gateway instance),
//! race many tasks against one budget. Whatever the interleaving, the books in Redis
//! must equal the receipts to the pico-dollar, no budget may be overspent, and every
//! hold must be given back.
//!
//! Run with `cargo test --features redis --test redis_cluster`. Needs `redis-server`
//! and `redis-cli` on PATH (`TOLLGATE_SKIP_REDIS=1` skips locally).

#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_server::{require_redis, RedisCluster, RedisServer};
use rust_decimal::Decimal;
use tollgate::{
    BudgetPeriod, BudgetSpec, DenialReason, KeySpec, LimitsSpec, ModelSpec, OrgSpec, Policy,
    PolicyDocument, Receipt, RedisConfig, RedisEngine, Request, Scope, Usage, WorkspaceSpec,
};

/// Gateway instances (engines, each with its own connection).
const ENGINES: usize = 4;
/// Concurrent tasks per engine.
const TASKS: usize = 8;
/// A task stops after this many budget denials...
const BUDGET_DENIALS_TO_STOP: u32 = 3;
/// ...or, if something is wrong, after this many attempts or at the deadline.
const MAX_ATTEMPTS: u32 = 50_000;
const DEADLINE: Duration = Duration::from_secs(30);

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Pico-dollars (as Redis stores them) as dollars.
fn picos(field: &str, raw: &str) -> Decimal {
    let n: i64 = raw
        .parse()
        .unwrap_or_else(|e| panic!("{field} = {raw:?} is not an integer: {e}"));
    Decimal::new(n, 12)
}

/// The engines' config: a generous response timeout, so a loaded CI machine cannot
/// turn a slow reply into a store error (not what these tests are about).
fn config() -> RedisConfig {
    RedisConfig {
        response_timeout: Duration::from_secs(10),
        connection_timeout: Duration::from_secs(5),
        ..RedisConfig::default()
    }
}

/// Deterministic pseudo-random numbers: Knuth's MMIX LCG, high bits.
struct Lcg(u64);

impl Lcg {
    fn new(seed: u64) -> Self {
        let mut lcg = Lcg(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03);
        lcg.next();
        lcg
    }

    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as u32
    }

    /// Uniform-ish in `lo..=hi`.
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// What one load task is allowed to do.
struct Load {
    /// The keys to spread requests over, with the index of each key's workspace.
    keys: Vec<(String, usize)>,
    /// The only scope a budget denial may come from.
    budget_scope: Scope,
    /// The budget that binds, and what the tasks have committed so far: once that is
    /// over the budget, every task stops (the final checks then fail at once).
    budget: Decimal,
    committed: Mutex<Decimal>,
    overspent: AtomicBool,
    /// Drop one admitted reservation in this many (released in the background)
    /// instead of committing it.
    drop_one_in: u32,
    deadline: Instant,
}

/// One committed request.
struct Committed {
    /// Index into `Load::keys`.
    key: usize,
    workspace: usize,
    receipt: Receipt,
}

/// A scope hash in Redis and the receipts that must add up to its counters.
struct Level {
    key: String,
    receipts: Vec<Receipt>,
}

/// What one load task saw.
#[derive(Default)]
struct Tally {
    committed: Vec<Committed>,
    admitted: u32,
    dropped: u32,
    budget_denials: u32,
    tpm_denials: u32,
    attempts: u32,
}

/// Requests of 100–2000 input tokens and 100–1000 max output tokens until this task
/// has seen `BUDGET_DENIALS_TO_STOP` budget denials. Admitted requests are committed
/// with the input asked and a random output at most the maximum (never above the
/// reservation), or sometimes dropped. Any denial other than a budget one in
/// `load.budget_scope` or a tokens-per-minute one fails the test.
async fn hammer(engine: RedisEngine, load: Arc<Load>, seed: u64) -> Tally {
    let mut rng = Lcg::new(seed);
    let mut tally = Tally::default();
    while tally.budget_denials < BUDGET_DENIALS_TO_STOP
        && tally.attempts < MAX_ATTEMPTS
        && Instant::now() < load.deadline
        && !load.overspent.load(Ordering::Relaxed)
    {
        tally.attempts += 1;
        let key_index = rng.next() as usize % load.keys.len();
        let (key, workspace) = &load.keys[key_index];
        let input = rng.range(100, 2000);
        let max_output = rng.range(100, 1000);
        let request = Request::with_key_id(key, "m")
            .input_tokens(input)
            .max_output_tokens(max_output);
        match engine.check_and_reserve(&request).await {
            Ok(reservation) => {
                tally.admitted += 1;
                assert!(!reservation.is_local(), "admitted by the local fallback");
                assert_eq!(
                    reservation.reserved_tokens(),
                    (u64::from(input), u64::from(max_output))
                );
                // Let other tasks run while this one holds: the "upstream call".
                tokio::task::yield_now().await;
                if rng.next() % load.drop_one_in == 0 {
                    tally.dropped += 1;
                    drop(reservation);
                    continue;
                }
                let reserved = reservation.reserved_cost();
                let output = rng.range(0, max_output);
                let receipt = engine
                    .commit_usage(reservation, Usage::new(input, output))
                    .await
                    .unwrap_or_else(|e| panic!("commit failed: {e}"));
                assert!(receipt.cost() <= reserved, "{receipt:?} > {reserved}");
                assert_eq!(receipt.overage(), Decimal::ZERO);
                let mut committed = load.committed.lock().unwrap();
                *committed += receipt.cost();
                if *committed > load.budget {
                    load.overspent.store(true, Ordering::Relaxed);
                }
                drop(committed);
                tally.committed.push(Committed {
                    key: key_index,
                    workspace: *workspace,
                    receipt,
                });
            }
            Err(denial) => match denial.reason {
                DenialReason::Budget => {
                    assert_eq!(denial.scope, load.budget_scope, "{denial:?}");
                    tally.budget_denials += 1;
                }
                DenialReason::TokensPerMinute => {
                    tally.tpm_denials += 1;
                    tokio::task::yield_now().await;
                }
                _ => panic!(
                    "unexpected denial {denial:?}; last store error {:?}",
                    engine.last_store_error()
                ),
            },
        }
    }
    tally
}

/// Start `TASKS` load tasks on every engine; the tallies by engine.
async fn run_load(engines: &[RedisEngine], load: &Arc<Load>) -> Vec<Vec<Tally>> {
    let mut handles = Vec::new();
    for (e, engine) in engines.iter().enumerate() {
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let seed = (e * 1000 + t) as u64;
            tasks.push(tokio::spawn(hammer(engine.clone(), Arc::clone(load), seed)));
        }
        handles.push(tasks);
    }
    let mut tallies = Vec::new();
    for tasks in handles {
        let mut per_engine = Vec::new();
        for task in tasks {
            per_engine.push(task.await.expect("load task panicked"));
        }
        tallies.push(per_engine);
    }
    tallies
}

/// Every task must have stopped because the budget refused it, not at a cap, and
/// every engine must have had requests admitted.
fn assert_reached_the_budget(tallies: &[Vec<Tally>]) {
    for (e, per_engine) in tallies.iter().enumerate() {
        let admitted: u32 = per_engine.iter().map(|t| t.admitted).sum();
        assert!(admitted > 0, "engine {e} admitted nothing");
        for (t, tally) in per_engine.iter().enumerate() {
            assert_eq!(
                tally.budget_denials, BUDGET_DENIALS_TO_STOP,
                "engine {e} task {t} stopped after {} attempts without reaching the budget",
                tally.attempts
            );
        }
    }
}

/// Poll until `done` holds or `timeout` passes (background releases of dropped
/// reservations are still landing); panics with `what` and the last state.
fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match done() {
            Ok(()) => return,
            Err(state) if Instant::now() >= deadline => {
                panic!("{what} not reached within {timeout:?}: {state}")
            }
            Err(_) => std::thread::yield_now(),
        }
    }
}

/// One model at $1 per million tokens in and out: a request's cost in dollars is
/// exactly its tokens × 10⁻⁶, so a budget is also a token count.
fn model() -> ModelSpec {
    ModelSpec::new("m", dec("1"), dec("1"))
}

/// The workspace budget of the single-server test (worth 500,000 tokens) and its
/// tokens-per-minute limit. The limit is a little below the budget, so it binds
/// first, and the budget is reached only after about 30,000 tokens have drained from
/// the bucket (some 4 s at 470,000 a minute). Had the limit not held, the budget
/// would be spent much sooner, which the final check on tokens against elapsed time
/// catches.
const WS_BUDGET: &str = "0.5";
const WS_TPM: u64 = 470_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_instance_single_server_never_overspends() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let server = RedisServer::start();
    let policy = Policy::new(
        PolicyDocument::new(OrgSpec::new("acme"))
            .model(model())
            .workspace(
                WorkspaceSpec::new("ws1", "one")
                    .grant("m")
                    .limits(LimitsSpec {
                        tpm: Some(i64::try_from(WS_TPM).unwrap()),
                        ..LimitsSpec::default()
                    })
                    .budget(BudgetSpec::new(dec(WS_BUDGET), BudgetPeriod::Month)),
            )
            .key(KeySpec::new("k1", "ws1", "sk-1")),
    )
    .unwrap();
    let mut engines = Vec::new();
    for _ in 0..ENGINES {
        engines.push(
            RedisEngine::connect(&server.url(), policy.clone(), config())
                .await
                .unwrap(),
        );
    }
    let load = Arc::new(Load {
        keys: vec![("k1".to_owned(), 0)],
        budget_scope: Scope::Workspace,
        budget: dec(WS_BUDGET),
        committed: Mutex::new(Decimal::ZERO),
        overspent: AtomicBool::new(false),
        drop_one_in: 10,
        deadline: Instant::now() + DEADLINE,
    });

    let started = Instant::now();
    let tallies = run_load(&engines, &load).await;
    let elapsed = started.elapsed();

    let all: Vec<&Tally> = tallies.iter().flatten().collect();
    let receipts: Vec<Receipt> = all
        .iter()
        .flat_map(|t| t.committed.iter().map(|c| c.receipt))
        .collect();
    let total: Decimal = receipts.iter().map(Receipt::cost).sum();
    let input: u64 = receipts.iter().map(|r| u64::from(r.input_tokens())).sum();
    let output: u64 = receipts.iter().map(|r| u64::from(r.output_tokens())).sum();
    let count = |f: fn(&Tally) -> u32| all.iter().map(|t| f(t)).sum::<u32>();
    eprintln!(
        "{} attempts, {} admitted, {} committed, {} dropped, {} budget and {} TPM denials; \
         spent ${total} of ${WS_BUDGET} ({input} + {output} tokens) in {elapsed:?}",
        count(|t| t.attempts),
        count(|t| t.admitted),
        receipts.len(),
        count(|t| t.dropped),
        count(|t| t.budget_denials),
        count(|t| t.tpm_denials),
    );
    assert!(total <= dec(WS_BUDGET), "overspent: ${total}");
    assert_reached_the_budget(&tallies);

    let hget = |key: &str, field: &str| server.cli(&["hget", key, field]);
    let ws = engines[0].workspace_key("ws1");
    let org = engines[0].org_key();
    assert_eq!(ws, "tollgate:v2:{ws:ws1}:ws");
    assert_eq!(org, "tollgate:v2:{org:acme}:org");
    let levels = [
        ws.clone(),
        org.clone(),
        "tollgate:v2:{ws:ws1}:key:k1".to_owned(),
        "tollgate:v2:{ws:ws1}:model:m".to_owned(),
    ];
    let holds = ["tollgate:v2:{ws:ws1}:holds", "tollgate:v2:{org:acme}:holds"];

    // Dropped reservations are released in the background: wait for the last ones.
    wait_until(Duration::from_secs(10), "every hold released", || {
        let mut state = Vec::new();
        let mut released = true;
        for key in &levels {
            let held = hget(key, "held");
            released &= held == "0";
            state.push(format!("{key} held={held:?}"));
        }
        for key in holds {
            let left = server.cli(&["zcard", key]);
            released &= left == "0";
            state.push(format!("{key} zcard={left:?}"));
        }
        if released {
            Ok(())
        } else {
            Err(state.join(", "))
        }
    });

    // The books equal the receipts exactly, on every level.
    for key in &levels {
        let spent = picos(key, &hget(key, "spent"));
        assert_eq!(spent, total, "{key} spent");
        assert_eq!(picos(key, &hget(key, "used")), total, "{key} used");
        assert_eq!(hget(key, "held"), "0", "{key} held");
        assert_eq!(hget(key, "req"), receipts.len().to_string(), "{key} req");
        assert_eq!(hget(key, "in"), input.to_string(), "{key} in");
        assert_eq!(hget(key, "out"), output.to_string(), "{key} out");
    }
    for key in holds {
        assert_eq!(server.cli(&["zcard", key]), "0", "{key}");
    }
    assert_eq!(
        server.cli(&["keys", "tollgate:*:resv:*"]),
        "",
        "records left"
    );

    // The TPM limit held across instances: the bucket never held more than the
    // limit, and the tokens committed in the run are at most a full bucket plus what
    // drained while it ran (refunds of unused tokens only lower the count). 100 ms
    // of drain covers the difference between Redis's clock and ours.
    let interval = 60_000_000_000u64.div_ceil(WS_TPM);
    let tolerance = WS_TPM * interval;
    let level: u64 = hget(&ws, "tpm").parse().unwrap();
    assert!(level <= tolerance, "tpm backlog {level} > {tolerance}");
    let drained =
        u64::try_from((elapsed + Duration::from_millis(100)).as_nanos()).unwrap() / interval;
    assert!(
        input + output <= WS_TPM + drained,
        "{} tokens committed in {elapsed:?}: more than {WS_TPM} + {drained}",
        input + output
    );
}

/// The org budget of the cluster test; workspace budgets are absent or larger.
const ORG_BUDGET: &str = "0.3";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_multi_instance_org_budget_spans_slots() {
    if !require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let cluster = RedisCluster::start(3);
    let ws_key = |id: &str| format!("tollgate:v2:{{ws:{id}}}:ws");

    // One workspace per node, as far as the candidates go: at least two nodes.
    let mut workspaces: Vec<(String, usize)> = Vec::new();
    for c in 'a'..='z' {
        let id = format!("ws-{c}");
        let node = cluster.node_for_key(&ws_key(&id));
        if workspaces.iter().all(|(_, n)| *n != node) {
            workspaces.push((id, node));
        }
        if workspaces.len() == cluster.len() {
            break;
        }
    }
    let nodes: BTreeSet<usize> = workspaces.iter().map(|(_, n)| *n).collect();
    assert!(
        nodes.len() >= 2,
        "workspaces all on one node: {workspaces:?}"
    );
    let org_key = "tollgate:v2:{org:acme}:org";
    let org_node = cluster.node_for_key(org_key);
    assert!(org_node < cluster.len());
    assert_eq!(
        cluster.node_for_key("tollgate:v2:{org:acme}:holds"),
        org_node
    );
    eprintln!("workspaces (id, node): {workspaces:?}; org on node {org_node}");

    let mut document = PolicyDocument::new(OrgSpec {
        budget: Some(BudgetSpec::new(dec(ORG_BUDGET), BudgetPeriod::Month)),
        ..OrgSpec::new("acme")
    })
    .model(model());
    let mut keys = Vec::new();
    for (w, (id, _)) in workspaces.iter().enumerate() {
        let mut spec = WorkspaceSpec::new(id.as_str(), format!("workspace-{w}")).grant("m");
        if w == 0 {
            // Larger than the org's: never the one that binds.
            spec = spec.budget(BudgetSpec::new(dec("1"), BudgetPeriod::Month));
        }
        document = document.workspace(spec);
        for k in 0..2 {
            let key = format!("{id}-k{k}");
            document = document.key(KeySpec::new(key.as_str(), id.as_str(), &key));
            keys.push((key, w));
        }
    }
    let policy = Policy::new(document).unwrap();

    // Each instance bootstraps through a different node.
    let urls = cluster.urls();
    let mut engines = Vec::new();
    for e in 0..ENGINES {
        let mut seeds = urls.clone();
        seeds.rotate_left(e % urls.len());
        engines.push(
            RedisEngine::connect_cluster(&seeds, policy.clone(), config())
                .await
                .unwrap(),
        );
    }
    assert_eq!(engines[0].org_key(), org_key);
    for (id, _) in &workspaces {
        assert_eq!(engines[0].workspace_key(id), ws_key(id));
    }
    let load = Arc::new(Load {
        keys: keys.clone(),
        budget_scope: Scope::Org,
        budget: dec(ORG_BUDGET),
        committed: Mutex::new(Decimal::ZERO),
        overspent: AtomicBool::new(false),
        drop_one_in: 10,
        deadline: Instant::now() + DEADLINE,
    });

    let started = Instant::now();
    let tallies = run_load(&engines, &load).await;
    let elapsed = started.elapsed();

    let committed: Vec<&Committed> = tallies
        .iter()
        .flatten()
        .flat_map(|t| t.committed.iter())
        .collect();
    let total: Decimal = committed.iter().map(|c| c.receipt.cost()).sum();
    let all: Vec<&Tally> = tallies.iter().flatten().collect();
    let count = |f: fn(&Tally) -> u32| all.iter().map(|t| f(t)).sum::<u32>();
    eprintln!(
        "{} attempts, {} admitted, {} committed, {} dropped, {} budget denials; \
         spent ${total} of ${ORG_BUDGET} in {elapsed:?}",
        count(|t| t.attempts),
        count(|t| t.admitted),
        committed.len(),
        count(|t| t.dropped),
        count(|t| t.budget_denials),
    );
    assert!(total <= dec(ORG_BUDGET), "overspent: ${total}");
    assert_reached_the_budget(&tallies);

    // Read each key on the node that owns its hash tag's slot.
    let node_of = |key: &str| {
        if key.contains("{org:acme}") {
            return org_node;
        }
        workspaces
            .iter()
            .find(|(id, _)| key.contains(&format!("{{ws:{id}}}")))
            .map(|(_, node)| *node)
            .unwrap_or_else(|| panic!("no tag of ours in {key}"))
    };
    let hget = |key: &str, field: &str| cluster.cli(node_of(key), &["hget", key, field]);
    let zcard = |key: &str| cluster.cli(node_of(key), &["zcard", key]);

    // Every level, with the receipts that count on it.
    let mut levels = vec![Level {
        key: org_key.to_owned(),
        receipts: committed.iter().map(|c| c.receipt).collect(),
    }];
    let mut holds = vec!["tollgate:v2:{org:acme}:holds".to_owned()];
    for (w, (id, _)) in workspaces.iter().enumerate() {
        let mine: Vec<Receipt> = committed
            .iter()
            .filter(|c| c.workspace == w)
            .map(|c| c.receipt)
            .collect();
        assert!(!mine.is_empty(), "nothing committed in {id}");
        let tag = format!("tollgate:v2:{{ws:{id}}}");
        levels.push(Level {
            key: ws_key(id),
            receipts: mine.clone(),
        });
        levels.push(Level {
            key: format!("{tag}:model:m"),
            receipts: mine,
        });
        holds.push(format!("{tag}:holds"));
    }
    for (k, (key, w)) in keys.iter().enumerate() {
        let receipts: Vec<Receipt> = committed
            .iter()
            .filter(|c| c.key == k)
            .map(|c| c.receipt)
            .collect();
        assert!(!receipts.is_empty(), "nothing committed with {key}");
        levels.push(Level {
            key: format!("tollgate:v2:{{ws:{}}}:key:{key}", workspaces[*w].0),
            receipts,
        });
    }

    wait_until(Duration::from_secs(10), "every hold released", || {
        let mut state = Vec::new();
        let mut released = true;
        for level in &levels {
            let held = hget(&level.key, "held");
            released &= held == "0";
            state.push(format!("{} held={held:?}", level.key));
        }
        for key in &holds {
            let left = zcard(key);
            released &= left == "0";
            state.push(format!("{key} zcard={left:?}"));
        }
        if released {
            Ok(())
        } else {
            Err(state.join(", "))
        }
    });

    for level in &levels {
        let key = &level.key;
        let sum: Decimal = level.receipts.iter().map(Receipt::cost).sum();
        let input: u64 = level
            .receipts
            .iter()
            .map(|r| u64::from(r.input_tokens()))
            .sum();
        let output: u64 = level
            .receipts
            .iter()
            .map(|r| u64::from(r.output_tokens()))
            .sum();
        assert_eq!(picos(key, &hget(key, "spent")), sum, "{key} spent");
        assert_eq!(picos(key, &hget(key, "used")), sum, "{key} used");
        assert_eq!(hget(key, "held"), "0", "{key} held");
        assert_eq!(
            hget(key, "req"),
            level.receipts.len().to_string(),
            "{key} req"
        );
        assert_eq!(hget(key, "in"), input.to_string(), "{key} in");
        assert_eq!(hget(key, "out"), output.to_string(), "{key} out");
    }
    for key in &holds {
        assert_eq!(zcard(key), "0", "{key}");
    }
    // The counters really live on different nodes: each tag's slot holds keys on the
    // node chosen for it (COUNTKEYSINSLOT counts only the node's own keys).
    let mut tags: Vec<(String, usize)> = workspaces
        .iter()
        .map(|(id, node)| (ws_key(id), *node))
        .collect();
    tags.push((org_key.to_owned(), org_node));
    for (key, node) in &tags {
        let slot = cluster.keyslot(key).to_string();
        let here: u64 = cluster
            .cli(*node, &["cluster", "countkeysinslot", &slot])
            .parse()
            .unwrap();
        assert!(here > 0, "no keys of {key} in slot {slot} on node {node}");
    }
    for node in 0..cluster.len() {
        assert_eq!(
            cluster.cli(node, &["keys", "tollgate:*:resv:*"]),
            "",
            "records left on node {node}"
        );
    }
}
