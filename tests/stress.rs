//! Many threads of random traffic against one engine, then the books are checked: no
//! budget, wallet or rate limit was exceeded, no hold or concurrency slot is left,
//! and every usage counter equals what the threads saw admitted and committed, to
//! the last digit, and adds up across scopes.
//!
//! Time is a `ManualClock` that only moves between phases, while no request is in
//! flight, so rate windows and budget periods are exact and the limits can be
//! checked as hard bounds rather than statistically.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tollgate::*;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn tokens_cost(tokens: u64, per_million: Decimal) -> Decimal {
    Decimal::from(tokens) * per_million / Decimal::from(1_000_000)
}

fn picked(counts: TokenCount, input: u64, output: u64) -> u64 {
    match counts {
        TokenCount::Total => input + output,
        TokenCount::Input => input,
        TokenCount::Output => output,
    }
}

fn limits(f: impl FnOnce(&mut LimitsSpec)) -> LimitsSpec {
    let mut l = LimitsSpec::default();
    f(&mut l);
    l
}

/// What the test threads saw committed for one scope.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    requests: u64,
    input: u64,
    output: u64,
    cost: Decimal,
}

impl Tally {
    fn record(&mut self, input: u64, output: u64, cost: Decimal) {
        self.requests += 1;
        self.input += input;
        self.output += output;
        self.cost += cost;
    }

    fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.input += other.input;
        self.output += other.output;
        self.cost += other.cost;
    }

    fn of(usage: &ScopeUsage) -> Tally {
        Tally {
            requests: usage.requests,
            input: usage.input_tokens,
            output: usage.output_tokens,
            cost: usage.cost,
        }
    }

    fn sum<'a>(usages: impl IntoIterator<Item = &'a ScopeUsage>) -> Tally {
        let mut total = Tally::default();
        for usage in usages {
            total.add(&Tally::of(usage));
        }
        total
    }
}

/// The engine's figures for a period equal the threads' and nothing is held.
fn assert_books(label: &str, usage: &ScopeUsage, seen: &Tally) {
    assert_eq!(&Tally::of(usage), seen, "{label}: counters vs commits seen");
    assert_eq!(usage.held, Decimal::ZERO, "{label}: hold left behind");
}

/// A scope's committed spend never passes its budget (if it has one).
fn assert_within_budget(label: &str, current: &ScopeUsage, budget: Option<&BudgetSpec>) {
    if let Some(budget) = budget {
        assert!(
            current.cost <= budget.limit,
            "{label}: spent {} of {}",
            current.cost,
            budget.limit
        );
    }
}

fn assert_idle(label: &str, report: &ScopeReport) {
    assert_eq!(report.in_flight, 0, "{label}: concurrency slot left behind");
    assert_eq!(report.current.held, Decimal::ZERO, "{label}: hold left");
    assert_eq!(report.previous.held, Decimal::ZERO, "{label}: hold left");
}

/// Checks a scope's committed traffic in one fixed-clock phase against its per-minute
/// limits: at a fixed instant a GCRA bucket holds at most `limit` units, and commits
/// never give back their requests, nor tokens they used.
fn assert_within_minute(
    label: &str,
    phase: usize,
    seen: &Tally,
    rpm: Option<i64>,
    tpm: Option<i64>,
    counts: TokenCount,
) {
    if let Some(rpm) = rpm {
        assert!(
            seen.requests <= rpm as u64,
            "{label}: {} requests committed in phase {phase}, rpm {rpm}",
            seen.requests
        );
    }
    if let Some(tpm) = tpm {
        let used = picked(counts, seen.input, seen.output);
        assert!(
            used <= tpm as u64,
            "{label}: {used} tokens committed in phase {phase}, tpm {tpm}"
        );
    }
}

/// An admitted request a thread has not yet committed or dropped.
struct Open {
    reservation: Reservation,
    key: usize,
    model: usize,
}

/// Everything one thread saw.
struct Log {
    keys: Vec<Tally>,
    /// Workspace × model, flattened `w * models + m`.
    workspace_models: Vec<Tally>,
    /// Per org budget period.
    org_periods: Vec<Tally>,
    /// Per phase and key, flattened `phase * keys + k`.
    key_windows: Vec<Tally>,
    /// Per phase and workspace × model, flattened `(phase * workspaces + w) * models + m`.
    workspace_model_windows: Vec<Tally>,
    denials: HashMap<(DenialReason, Scope), u64>,
    requests: u64,
    committed: u64,
    dropped: u64,
}

/// Test-side count of reservations alive per scope. It goes up after the engine
/// admits and down before the reservation is given back, so it can never exceed the
/// engine's own slot count: if it passes `max_concurrent`, the engine over-admitted.
struct Live {
    keys: Vec<AtomicU32>,
    workspaces: Vec<AtomicU32>,
}

impl Live {
    fn new(doc: &PolicyDocument) -> Self {
        Live {
            keys: doc.keys.iter().map(|_| AtomicU32::new(0)).collect(),
            workspaces: doc.workspaces.iter().map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

/// Facts about the policy the threads and the checks look up by index.
struct Layout {
    doc: PolicyDocument,
    secrets: Vec<String>,
    /// Workspace index of each key.
    key_workspace: Vec<usize>,
    /// Indices of the models each workspace may call.
    grants: Vec<Vec<usize>>,
    /// Price per million input and output tokens of each model.
    prices: Vec<(Decimal, Decimal)>,
}

impl Layout {
    fn new(doc: PolicyDocument, secrets: Vec<String>) -> Self {
        let key_workspace = doc
            .keys
            .iter()
            .map(|k| {
                doc.workspaces
                    .iter()
                    .position(|w| w.id == k.workspace)
                    .unwrap()
            })
            .collect();
        let prices = doc
            .models
            .iter()
            .map(|m| (m.input_per_million, m.output_per_million))
            .collect();
        let grants = doc
            .workspaces
            .iter()
            .map(|w| {
                let models = doc.models.iter().enumerate();
                models
                    .filter(|(_, m)| w.models.contains(&m.name))
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        Layout {
            doc,
            secrets,
            key_workspace,
            grants,
            prices,
        }
    }

    fn cost(&self, model: usize, input: u64, output: u64) -> Decimal {
        let (in_price, out_price) = self.prices[model];
        tokens_cost(input, in_price) + tokens_cost(output, out_price)
    }

    fn granted(&self, workspace: usize, model: usize) -> bool {
        self.grants[workspace].contains(&model)
    }
}

/// How one run's traffic is shaped.
struct Traffic {
    threads: usize,
    phases: usize,
    requests_per_phase: usize,
    /// Length of a phase; the clock advances by this between phases.
    phase_length: Duration,
    /// Org budget period, in phases.
    org_period_phases: usize,
    max_input: u32,
    max_output: u32,
    /// Most reservations one thread holds open at once.
    max_open: usize,
    drop_probability: f64,
    /// Chance a commit uses the whole reservation, to push spend to the limits.
    full_use_probability: f64,
}

/// A barrier that a panicking worker opens for everyone, so one failed assertion
/// fails the test instead of leaving the other workers waiting forever.
struct Gate {
    threads: usize,
    /// Threads arrived in this round, rounds completed, and whether a worker failed.
    state: Mutex<(usize, u64, bool)>,
    turned: Condvar,
}

impl Gate {
    fn new(threads: usize) -> Self {
        Gate {
            threads,
            state: Mutex::new((0, 0, false)),
            turned: Condvar::new(),
        }
    }

    /// Waits for every worker; `true` for exactly one of them (the last to arrive).
    fn wait(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let round = state.1;
        state.0 += 1;
        let last = state.0 == self.threads;
        if last {
            state.0 = 0;
            state.1 += 1;
            self.turned.notify_all();
        }
        while state.1 == round && !state.2 {
            state = self
                .turned
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        assert!(!state.2, "another worker failed");
        last
    }
}

/// Opens the gate for good if its worker panics.
struct FailOpen<'a>(&'a Gate);

impl Drop for FailOpen<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.2 = true;
            self.0.turned.notify_all();
        }
    }
}

/// Runs `traffic` against `layout` from several threads and returns what each saw.
fn run(layout: &Layout, traffic: &Traffic, engine: &Engine, clock: &ManualClock) -> Vec<Log> {
    let live = Live::new(&layout.doc);
    let gate = Gate::new(traffic.threads);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..traffic.threads)
            .map(|t| {
                let (live, gate) = (&live, &gate);
                s.spawn(move || {
                    let _fail_open = FailOpen(gate);
                    worker(t, layout, traffic, engine, clock, live, gate)
                })
            })
            .collect();
        let joined = workers.into_iter().map(|w| w.join());
        joined
            .map(|log| log.unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    })
}

fn worker(
    thread: usize,
    layout: &Layout,
    traffic: &Traffic,
    engine: &Engine,
    clock: &ManualClock,
    live: &Live,
    gate: &Gate,
) -> Log {
    let doc = &layout.doc;
    let (keys, workspaces, models) = (doc.keys.len(), doc.workspaces.len(), doc.models.len());
    let periods = traffic.phases.div_ceil(traffic.org_period_phases);
    let mut rng = StdRng::seed_from_u64(0x7011_6a7e + thread as u64);
    let mut log = Log {
        keys: vec![Tally::default(); keys],
        workspace_models: vec![Tally::default(); workspaces * models],
        org_periods: vec![Tally::default(); periods],
        key_windows: vec![Tally::default(); traffic.phases * keys],
        workspace_model_windows: vec![Tally::default(); traffic.phases * workspaces * models],
        denials: HashMap::new(),
        requests: 0,
        committed: 0,
        dropped: 0,
    };
    let mut open: Vec<Open> = Vec::with_capacity(traffic.max_open + 1);

    for phase in 0..traffic.phases {
        let period = phase / traffic.org_period_phases;
        let settle = |o: Open, rng: &mut StdRng, log: &mut Log| {
            let w = layout.key_workspace[o.key];
            live.keys[o.key].fetch_sub(1, Ordering::SeqCst);
            live.workspaces[w].fetch_sub(1, Ordering::SeqCst);
            if rng.random_bool(traffic.drop_probability) {
                drop(o.reservation);
                log.dropped += 1;
                return;
            }
            let (held_in, held_out) = o.reservation.reserved_tokens();
            let (input, output) = if rng.random_bool(traffic.full_use_probability) {
                (held_in, held_out)
            } else {
                (
                    rng.random_range(0..=held_in),
                    rng.random_range(0..=held_out),
                )
            };
            let held_cost = o.reservation.reserved_cost();
            let usage = Usage::new(input as u32, output as u32);
            let receipt = engine.commit_usage(o.reservation, usage).unwrap();
            let cost = layout.cost(o.model, input, output);
            assert_eq!(receipt.cost(), cost, "receipt for {usage:?}");
            assert_eq!(receipt.reserved_cost(), held_cost);
            assert_eq!(receipt.overage(), Decimal::ZERO);
            assert_eq!(
                (receipt.input_tokens(), receipt.output_tokens()),
                (usage.input_tokens, usage.output_tokens)
            );
            log.keys[o.key].record(input, output, cost);
            log.workspace_models[w * models + o.model].record(input, output, cost);
            log.org_periods[period].record(input, output, cost);
            log.key_windows[phase * keys + o.key].record(input, output, cost);
            log.workspace_model_windows[(phase * workspaces + w) * models + o.model]
                .record(input, output, cost);
            log.committed += 1;
        };

        for _ in 0..traffic.requests_per_phase {
            let key = rng.random_range(0..keys);
            // Mostly granted models, so the limits behind the grant check see traffic.
            let granted = &layout.grants[layout.key_workspace[key]];
            let model = if rng.random_bool(0.05) {
                rng.random_range(0..models)
            } else {
                granted[rng.random_range(0..granted.len())]
            };
            let model_name = doc.models[model].name.as_str();
            let input = rng.random_range(0..=traffic.max_input);
            let mut request = if rng.random_bool(0.25) {
                Request::with_secret(&layout.secrets[key], model_name)
            } else {
                Request::with_key_id(&doc.keys[key].id, model_name)
            }
            .input_tokens(input);
            let output = if rng.random_bool(0.1) {
                // No max_tokens: the policy default is reserved.
                doc.defaults.max_output_tokens as u32
            } else {
                let output = rng.random_range(1..=traffic.max_output);
                request = request.max_output_tokens(output);
                output
            };
            log.requests += 1;
            match engine.check_and_reserve(&request) {
                Ok(reservation) => {
                    assert!(
                        layout.granted(layout.key_workspace[key], model),
                        "ungranted model admitted"
                    );
                    assert_eq!(
                        reservation.reserved_tokens(),
                        (u64::from(input), u64::from(output))
                    );
                    assert_eq!(
                        reservation.reserved_cost(),
                        layout.cost(model, input.into(), output.into())
                    );
                    let w = layout.key_workspace[key];
                    let key_live = live.keys[key].fetch_add(1, Ordering::SeqCst) + 1;
                    let ws_live = live.workspaces[w].fetch_add(1, Ordering::SeqCst) + 1;
                    if let Some(max) = doc.keys[key].limits.max_concurrent {
                        assert!(
                            i64::from(key_live) <= max,
                            "key {key}: {key_live} in flight"
                        );
                    }
                    if let Some(max) = doc.workspaces[w].limits.max_concurrent {
                        assert!(i64::from(ws_live) <= max, "ws {w}: {ws_live} in flight");
                    }
                    open.push(Open {
                        reservation,
                        key,
                        model,
                    });
                }
                Err(denial) => {
                    // The grant is checked before any limit, so it alone decides.
                    assert_eq!(
                        denial.reason == DenialReason::ModelNotGranted,
                        !layout.granted(layout.key_workspace[key], model),
                        "{denial:?}"
                    );
                    if let Some(Quota::Money {
                        limit,
                        remaining,
                        requested,
                    }) = denial.quota
                    {
                        assert_eq!(requested, layout.cost(model, input.into(), output.into()));
                        assert!(remaining < requested && remaining <= limit, "{denial:?}");
                    }
                    *log.denials
                        .entry((denial.reason, denial.scope))
                        .or_default() += 1;
                }
            }
            let keep = rng.random_range(0..=traffic.max_open);
            while open.len() > keep {
                let o = open.swap_remove(rng.random_range(0..open.len()));
                settle(o, &mut rng, &mut log);
            }
        }
        while let Some(o) = open.pop() {
            settle(o, &mut rng, &mut log);
        }
        // The clock moves only while every thread is between phases, so no request
        // straddles a rate window or a budget period it was not checked in.
        if gate.wait() && phase + 1 < traffic.phases {
            clock.advance(traffic.phase_length);
        }
        gate.wait();
    }
    log
}

/// How a run's requests were decided.
struct Outcome {
    requests: u64,
    committed: u64,
    dropped: u64,
    denials: HashMap<(DenialReason, Scope), u64>,
}

impl Outcome {
    fn denied(&self, reason: DenialReason, scope: Scope) -> u64 {
        self.denials.get(&(reason, scope)).copied().unwrap_or(0)
    }
}

/// Checks everything the threads saw against the engine's books and the policy's
/// limits.
fn audit(
    layout: &Layout,
    traffic: &Traffic,
    engine: &Engine,
    logs: &[Log],
    start: Timestamp,
) -> Outcome {
    let doc = &layout.doc;
    let (keys, workspaces, models) = (doc.keys.len(), doc.workspaces.len(), doc.models.len());
    let periods = traffic.phases.div_ceil(traffic.org_period_phases);

    let mut key_seen = vec![Tally::default(); keys];
    let mut wsm_seen = vec![Tally::default(); workspaces * models];
    let mut org_seen = vec![Tally::default(); periods];
    let mut key_windows = vec![Tally::default(); traffic.phases * keys];
    let mut wsm_windows = vec![Tally::default(); traffic.phases * workspaces * models];
    let mut denials: HashMap<(DenialReason, Scope), u64> = HashMap::new();
    let (mut requests, mut committed, mut dropped) = (0, 0, 0);
    for log in logs {
        for (sum, t) in key_seen.iter_mut().zip(&log.keys) {
            sum.add(t);
        }
        for (sum, t) in wsm_seen.iter_mut().zip(&log.workspace_models) {
            sum.add(t);
        }
        for (sum, t) in org_seen.iter_mut().zip(&log.org_periods) {
            sum.add(t);
        }
        for (sum, t) in key_windows.iter_mut().zip(&log.key_windows) {
            sum.add(t);
        }
        for (sum, t) in wsm_windows.iter_mut().zip(&log.workspace_model_windows) {
            sum.add(t);
        }
        for (&k, &n) in &log.denials {
            *denials.entry(k).or_default() += n;
        }
        requests += log.requests;
        committed += log.committed;
        dropped += log.dropped;
    }
    let denied: u64 = denials.values().sum();
    let admitted = committed + dropped;
    assert_eq!(requests, admitted + denied);
    assert_eq!(
        requests,
        (traffic.threads * traffic.phases * traffic.requests_per_phase) as u64
    );

    let usage = engine.usage();

    // Keys: exact books, nothing left held, budget kept.
    let mut ws_from_keys = vec![Tally::default(); workspaces];
    for (k, spec) in doc.keys.iter().enumerate() {
        let report = usage.keys.iter().find(|u| u.id == spec.id).unwrap();
        assert_eq!(report.workspace, doc.workspaces[layout.key_workspace[k]].id);
        let label = format!("key {}", spec.id);
        assert_idle(&label, &report.usage);
        assert_books(&label, &report.usage.current, &key_seen[k]);
        assert_books(&label, &report.usage.previous, &Tally::default());
        assert_within_budget(&label, &report.usage.current, spec.budget.as_ref());
        ws_from_keys[layout.key_workspace[k]].add(&key_seen[k]);
    }

    // Workspaces and workspace × model: exact books, and the engine's own figures add
    // up: keys of a workspace and models of a workspace each sum to the workspace.
    let mut org_total = Tally::default();
    let mut ws_engine_sum = Tally::default();
    for (w, spec) in doc.workspaces.iter().enumerate() {
        let report = usage.workspaces.iter().find(|u| u.id == spec.id).unwrap();
        let label = format!("workspace {}", spec.id);
        assert_idle(&label, &report.usage);
        assert_books(&label, &report.usage.current, &ws_from_keys[w]);
        assert_books(&label, &report.usage.previous, &Tally::default());
        assert_within_budget(&label, &report.usage.current, spec.budget.as_ref());
        let engine_keys = Tally::sum(
            usage
                .keys
                .iter()
                .filter(|k| k.workspace == spec.id)
                .map(|k| &k.usage.current),
        );
        assert_eq!(
            engine_keys,
            Tally::of(&report.usage.current),
            "{label}: Σ keys"
        );

        assert_eq!(report.models.len(), models);
        let mut from_models = Tally::default();
        for (m, model) in doc.models.iter().enumerate() {
            let mu = report
                .models
                .iter()
                .find(|u| u.model == model.name)
                .unwrap();
            let label = format!("{label} × {}", model.name);
            assert_idle(&label, &mu.usage);
            assert_books(&label, &mu.usage.current, &wsm_seen[w * models + m]);
            assert_books(&label, &mu.usage.previous, &Tally::default());
            if !layout.granted(w, m) {
                assert_eq!(mu.usage.current.requests, 0, "{label}: not granted");
            }
            from_models.add(&wsm_seen[w * models + m]);
        }
        assert_eq!(from_models, ws_from_keys[w], "{label}: Σ models seen");
        let engine_models = Tally::sum(report.models.iter().map(|m| &m.usage.current));
        assert_eq!(
            engine_models,
            Tally::of(&report.usage.current),
            "{label}: Σ models"
        );

        org_total.add(&ws_from_keys[w]);
        ws_engine_sum.add(&Tally::of(&report.usage.current));
    }

    // The org's budget periods: each within the budget and equal to what was committed
    // in it; together they are everything the workspaces spent.
    assert_idle("org", &usage.org);
    let org_budget = doc.org.budget.as_ref().unwrap();
    let org_periods = match periods {
        1 => {
            assert_books("org before the run", &usage.org.previous, &Tally::default());
            vec![&usage.org.current]
        }
        2 => vec![&usage.org.previous, &usage.org.current],
        n => panic!("a run may span at most two org periods, not {n}"),
    };
    for (p, period) in org_periods.into_iter().enumerate() {
        let label = format!("org period {p}");
        assert_books(&label, period, &org_seen[p]);
        assert!(
            period.cost <= org_budget.limit,
            "{label}: spent {} of {}",
            period.cost,
            org_budget.limit
        );
        if let BudgetPeriod::Custom { seconds } = org_budget.period {
            let length = Duration::from_secs(seconds);
            assert_eq!(period.period_start, start.saturating_add(length * p as u32));
            assert_eq!(
                period.period_end,
                start.saturating_add(length * (p as u32 + 1))
            );
        }
    }
    let mut org_engine = Tally::of(&usage.org.previous);
    org_engine.add(&Tally::of(&usage.org.current));
    assert_eq!(org_engine, ws_engine_sum, "org: Σ workspaces");
    assert_eq!(org_engine, org_total, "org vs commits seen");

    let wallet = doc.org.wallet.unwrap();
    assert_eq!(usage.wallet_spent, org_total.cost, "wallet vs commits seen");
    assert!(
        usage.wallet_spent <= wallet,
        "wallet: spent {} of {wallet}",
        usage.wallet_spent
    );

    // Rate limits, phase by phase (the clock is fixed within a phase).
    for phase in 0..traffic.phases {
        let mut ws_window = vec![Tally::default(); workspaces];
        for (k, spec) in doc.keys.iter().enumerate() {
            let seen = &key_windows[phase * keys + k];
            let l = &spec.limits;
            assert_within_minute(&spec.id, phase, seen, l.rpm, l.tpm, l.tpm_counts);
            ws_window[layout.key_workspace[k]].add(seen);
        }
        for (w, spec) in doc.workspaces.iter().enumerate() {
            let l = &spec.limits;
            assert_within_minute(&spec.id, phase, &ws_window[w], l.rpm, l.tpm, l.tpm_counts);
            for ml in &spec.model_limits {
                let m = doc.models.iter().position(|m| m.name == ml.model).unwrap();
                let seen = &wsm_windows[(phase * workspaces + w) * models + m];
                let label = format!("{} × {}", spec.id, ml.model);
                assert_within_minute(&label, phase, seen, ml.rpm, ml.tpm, ml.tpm_counts);
            }
        }
    }
    // A rolling day admits `rpd` plus what drains while the run lasts, no more.
    let elapsed = traffic.phase_length.as_nanos() * (traffic.phases as u128 - 1);
    let day = Duration::from_secs(86_400).as_nanos();
    for (w, spec) in doc.workspaces.iter().enumerate() {
        if let Some(rpd) = spec.limits.rpd {
            let rpd = rpd as u128;
            let bound = rpd + elapsed * rpd / day;
            assert!(
                u128::from(ws_from_keys[w].requests) <= bound,
                "{}: {} requests in the run, rpd {rpd}",
                spec.id,
                ws_from_keys[w].requests
            );
        }
    }
    Outcome {
        requests,
        committed,
        dropped,
        denials,
    }
}

/// A clock at a midnight, which is also a boundary of any custom period that
/// divides a day.
fn midnight_clock() -> (Arc<ManualClock>, Timestamp) {
    let at = Utc.with_ymd_and_hms(2026, 11, 10, 0, 0, 0).unwrap();
    (Arc::new(ManualClock::at(at)), Timestamp::from_datetime(at))
}

fn engine(doc: &PolicyDocument, clock: &Arc<ManualClock>) -> Engine {
    Engine::builder(Policy::new(doc.clone()).expect("valid policy"))
        .clock(clock.clone())
        .build()
}

/// Three workspaces, eight keys and three models, every kind of limit somewhere. The
/// org budget renews every 30 phases and the wallet holds less than two of them, so
/// the first period ends on the org budget and the second on the wallet.
fn many_scopes() -> (PolicyDocument, Vec<String>) {
    let month = |limit| Some(BudgetSpec::new(dec(limit), BudgetPeriod::Month));
    let mut doc = PolicyDocument::new(OrgSpec {
        wallet: Some(dec("7.5")),
        budget: Some(BudgetSpec::new(
            dec("4.5"),
            BudgetPeriod::Custom { seconds: 30 * 60 },
        )),
        ..OrgSpec::new("org")
    })
    .model(ModelSpec::new("mini", dec("0.0375"), dec("0.15")))
    .model(ModelSpec::new("std", dec("0.15"), dec("0.6")))
    .model(ModelSpec::new("max", dec("0.5"), dec("2")));
    doc.defaults.max_output_tokens = 512;

    let mut a = WorkspaceSpec::new("ws-a", "assistant-production")
        .grant("mini")
        .grant("std")
        .grant("max")
        .limits(limits(|l| {
            l.rpm = Some(150);
            l.tpm = Some(120_000);
            l.max_concurrent = Some(3);
        }));
    a.budget = month("1.2");
    a.model_limits.push(ModelLimitSpec {
        budget: None,
        model: "max".into(),
        rpm: Some(30),
        tpm: Some(8_000),
        tpm_counts: TokenCount::Output,
    });
    let mut b = WorkspaceSpec::new("ws-b", "search-staging")
        .grant("mini")
        .grant("std")
        .limits(limits(|l| {
            l.rpm = Some(120);
            // Low enough to be reached well before the wallet runs dry, whatever the
            // interleaving (at 2,500 some runs spent the wallet first).
            l.rpd = Some(1_500);
            l.tpm = Some(60_000);
            l.tpm_counts = TokenCount::Input;
        }));
    b.budget = month("100");
    let mut c = WorkspaceSpec::new("ws-c", "batch-sandbox")
        .grant("std")
        .grant("max");
    c.budget = month("100");
    c.model_limits.push(ModelLimitSpec {
        budget: None,
        model: "std".into(),
        rpm: Some(40),
        ..ModelLimitSpec::default()
    });
    doc = doc.workspace(a).workspace(b).workspace(c);

    let key = |id: &str, ws: &str, l: LimitsSpec, budget: Option<BudgetSpec>| KeySpec {
        limits: l,
        budget,
        ..KeySpec::new(id, ws, &format!("sk-{id}"))
    };
    let keys = [
        key(
            "a1",
            "ws-a",
            limits(|l| {
                l.rpm = Some(50);
                l.tpm = Some(40_000);
            }),
            month("0.6"),
        ),
        key("a2", "ws-a", LimitsSpec::default(), None),
        key(
            "a3",
            "ws-a",
            limits(|l| l.max_concurrent = Some(2)),
            month("0.05"),
        ),
        key("b1", "ws-b", limits(|l| l.rpm = Some(60)), None),
        key(
            "b2",
            "ws-b",
            limits(|l| {
                l.tpm = Some(30_000);
                l.tpm_counts = TokenCount::Output;
            }),
            month("0.02"),
        ),
        key("c1", "ws-c", LimitsSpec::default(), None),
        key("c2", "ws-c", limits(|l| l.rpm = Some(40)), month("1")),
        key("c3", "ws-c", limits(|l| l.max_concurrent = Some(1)), None),
    ];
    let secrets = keys.iter().map(|k| format!("sk-{}", k.id)).collect();
    for k in keys {
        doc = doc.key(k);
    }
    (doc, secrets)
}

#[test]
fn many_threads_many_scopes_never_overspend_and_books_balance() {
    let (doc, secrets) = many_scopes();
    let layout = Layout::new(doc, secrets);
    let traffic = Traffic {
        threads: 4,
        phases: 60,
        requests_per_phase: 450,
        phase_length: Duration::from_secs(60),
        org_period_phases: 30,
        max_input: 2_000,
        max_output: 1_000,
        max_open: 3,
        drop_probability: 0.3,
        full_use_probability: 0.15,
    };
    let (clock, start) = midnight_clock();
    let engine = engine(&layout.doc, &clock);
    let logs = run(&layout, &traffic, &engine, &clock);
    let outcome = audit(&layout, &traffic, &engine, &logs, start);

    // The run must have been mostly about the limits, yet busy: plenty committed and
    // dropped, and budgets (not only rate limits) refusing a large share.
    assert!(outcome.requests >= 100_000);
    assert!(
        outcome.committed >= 10_000,
        "{} committed",
        outcome.committed
    );
    assert!(outcome.dropped >= 4_000, "{} dropped", outcome.dropped);
    let for_money = [Scope::Key, Scope::Workspace, Scope::Org]
        .map(|scope| outcome.denied(DenialReason::Budget, scope))
        .iter()
        .sum::<u64>()
        + outcome.denied(DenialReason::Wallet, Scope::Org);
    assert!(
        for_money >= outcome.requests / 4,
        "only {for_money} budget denials of {}",
        outcome.requests
    );
    // Every limit this test claims to check must really have refused something.
    for (reason, scope) in [
        (DenialReason::Budget, Scope::Key),
        (DenialReason::Budget, Scope::Workspace),
        (DenialReason::Budget, Scope::Org),
        (DenialReason::Wallet, Scope::Org),
        (DenialReason::RequestsPerMinute, Scope::Key),
        (DenialReason::RequestsPerMinute, Scope::Workspace),
        (DenialReason::RequestsPerMinute, Scope::WorkspaceModel),
        (DenialReason::RequestsPerDay, Scope::Workspace),
        (DenialReason::TokensPerMinute, Scope::Key),
        (DenialReason::TokensPerMinute, Scope::Workspace),
        (DenialReason::TokensPerMinute, Scope::WorkspaceModel),
        (DenialReason::Concurrency, Scope::Key),
        (DenialReason::Concurrency, Scope::Workspace),
        (DenialReason::ModelNotGranted, Scope::WorkspaceModel),
    ] {
        assert!(
            outcome.denied(reason, scope) > 0,
            "no {reason:?} denial at {scope:?}: {:?}",
            outcome.denials
        );
    }
}

/// All threads on one key, one workspace and one model, with the same budget on every
/// level: every request races on the same counters. Releases run level by level, so
/// a later level can briefly hold more than the key and refuse; whichever refuses, no
/// level may end up over its budget.
#[test]
fn all_threads_on_one_key_never_overspend_and_books_balance() {
    const RPM: i64 = 1_000_000;
    const TPM: i64 = 100_000_000;
    let budget = || Some(BudgetSpec::new(dec("80"), BudgetPeriod::Month));
    let mut doc = PolicyDocument::new(OrgSpec {
        wallet: Some(dec("80")),
        budget: budget(),
        ..OrgSpec::new("org")
    })
    .model(ModelSpec::new("m", dec("1.25"), dec("5")));
    let mut ws = WorkspaceSpec::new("ws", "hot-path").grant("m");
    ws.budget = budget();
    doc = doc.workspace(ws).key(KeySpec {
        limits: limits(|l| {
            l.rpm = Some(RPM);
            l.tpm = Some(TPM);
            l.max_concurrent = Some(6);
        }),
        budget: budget(),
        ..KeySpec::new("k", "ws", "sk-k")
    });
    let layout = Layout::new(doc, vec!["sk-k".into()]);
    let traffic = Traffic {
        threads: 4,
        phases: 1,
        requests_per_phase: 25_000,
        phase_length: Duration::from_secs(60),
        org_period_phases: 1,
        max_input: 1_000,
        max_output: 1_000,
        max_open: 2,
        drop_probability: 0.5,
        full_use_probability: 0.2,
    };
    let (clock, start) = midnight_clock();
    let engine = engine(&layout.doc, &clock);
    let logs = run(&layout, &traffic, &engine, &clock);
    let outcome = audit(&layout, &traffic, &engine, &logs, start);

    assert!(
        outcome.committed >= 10_000,
        "{} committed",
        outcome.committed
    );
    assert!(outcome.dropped >= 10_000, "{} dropped", outcome.dropped);
    let budget = outcome.denied(DenialReason::Budget, Scope::Key);
    assert!(budget >= 1_000, "only {budget} budget denials");
    assert!(outcome.denied(DenialReason::Concurrency, Scope::Key) > 0);

    // The clock never moved, so the key's buckets hold exactly what was committed:
    // every dropped request and unused token went back, no more and no less.
    let key = engine.usage().keys[0].usage.current;
    let probe = engine
        .check_and_reserve(&Request::with_key_id("k", "m").max_output_tokens(0))
        .expect("a request costing nothing fits any budget not exceeded");
    let limits = probe.rate_limits();
    assert_eq!(
        limits.requests.unwrap().remaining,
        RPM as u64 - key.requests - 1,
        "requests left in the key's bucket"
    );
    assert_eq!(
        limits.tokens.unwrap().remaining,
        TPM as u64 - key.input_tokens - key.output_tokens,
        "tokens left in the key's bucket"
    );
}

/// End-user limits under threads (issue 18): 10,000 distinct end users, each with a
/// budget, in a workspace with a budget of its own; the manual clock stands still.
/// `max_tracked` decides whether end users are forgotten on the way.
struct EndUserRun {
    /// Committed input tokens (1 µ$ each) per end user.
    per_user: Vec<u64>,
    /// Committed tokens in all.
    total: u64,
    /// Most end users seen tracked by a worker's checks.
    most_tracked: usize,
    denials: HashMap<(Scope, DenialReason), u64>,
}

const END_USERS: usize = 10_000;
/// $0.004 per end user: 4,000 tokens at $1 per million.
const USER_BUDGET_TOKENS: u64 = 4_000;
/// $10 for the workspace: less than the end users' budgets add up to ($40).
const WORKSPACE_BUDGET_TOKENS: u64 = 10_000_000;

fn end_user_engine(max_tracked: i64) -> (Engine, Arc<ManualClock>) {
    let (clock, _) = midnight_clock();
    let doc = PolicyDocument::new(OrgSpec::new("org"))
        .model(ModelSpec::new("m", dec("1"), dec("1")))
        .workspace(
            WorkspaceSpec::new("ws", "end-users")
                .grant("m")
                .budget(BudgetSpec::new(dec("10"), BudgetPeriod::Month))
                .end_user_limits(
                    EndUserLimitsSpec::new(LimitsSpec::default())
                        .budget(BudgetSpec::new(dec("0.004"), BudgetPeriod::Month))
                        .max_tracked(max_tracked),
                ),
        )
        .key(KeySpec::new("k", "ws", "sk-k"));
    (engine(&doc, &clock), clock)
}

fn run_end_users(engine: &Engine, threads: usize, requests: usize) -> EndUserRun {
    let user_ids: Vec<String> = (0..END_USERS).map(|u| format!("user-{u}")).collect();
    let logs: Vec<EndUserRun> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let user_ids = &user_ids;
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(0xE5D0 + t as u64);
                    let mut log = EndUserRun {
                        per_user: vec![0; END_USERS],
                        total: 0,
                        most_tracked: 0,
                        denials: HashMap::new(),
                    };
                    for i in 0..requests {
                        // Every end user is seen: thread t starts at its own offset.
                        let user = if i < END_USERS / threads {
                            t * (END_USERS / threads) + i
                        } else {
                            rng.random_range(0..END_USERS)
                        };
                        let tokens = rng.random_range(1..=2_500u32);
                        let request = Request::with_key_id("k", "m")
                            .input_tokens(tokens)
                            .max_output_tokens(0)
                            .end_user(&user_ids[user]);
                        match engine.check_and_reserve(&request) {
                            Ok(r) => {
                                if rng.random_range(0..10) == 0 {
                                    drop(r);
                                } else {
                                    // Usage at most what was held.
                                    let used = rng.random_range(0..=tokens);
                                    engine.commit_usage(r, Usage::new(used, 0)).unwrap();
                                    log.per_user[user] += u64::from(used);
                                    log.total += u64::from(used);
                                }
                            }
                            Err(d) => *log.denials.entry((d.scope, d.reason)).or_default() += 1,
                        }
                        if i % 2_000 == 0 {
                            let tracked = engine.usage().workspaces[0].end_users_tracked.unwrap();
                            log.most_tracked = log.most_tracked.max(tracked);
                        }
                    }
                    log
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut run = EndUserRun {
        per_user: vec![0; END_USERS],
        total: 0,
        most_tracked: 0,
        denials: HashMap::new(),
    };
    for log in logs {
        for (sum, n) in run.per_user.iter_mut().zip(&log.per_user) {
            *sum += n;
        }
        run.total += log.total;
        run.most_tracked = run.most_tracked.max(log.most_tracked);
        for (k, n) in log.denials {
            *run.denials.entry(k).or_default() += n;
        }
    }
    run
}

fn micro(tokens: u64) -> Decimal {
    Decimal::new(tokens as i64, 6)
}

#[test]
fn ten_thousand_end_users_never_overspend_and_books_balance() {
    // Room for every end user: none is forgotten, so each one's books are exact.
    let (engine, _clock) = end_user_engine(16_384);
    let run = run_end_users(&engine, 4, 15_000);
    let usage = engine.usage();
    let ws = &usage.workspaces[0];
    assert_eq!(ws.usage.current.held, Decimal::ZERO);
    assert_eq!(ws.usage.current.cost, micro(run.total));
    assert!(run.total <= WORKSPACE_BUDGET_TOKENS, "workspace overspent");
    let tracked = ws.end_users_tracked.unwrap();
    assert_eq!(tracked, END_USERS, "every end user tracked, none forgotten");
    assert!(run.most_tracked <= 16_384);
    for (u, &spent) in run.per_user.iter().enumerate() {
        assert!(spent <= USER_BUDGET_TOKENS, "user-{u} spent {spent}");
        let report = engine.end_user_usage("ws", &format!("user-{u}")).unwrap();
        assert_eq!(report.current.cost, micro(spent), "user-{u}");
        assert_eq!(report.current.held, Decimal::ZERO, "user-{u}");
    }
    // Both budgets refused some requests, and nothing else did.
    for (scope, reason) in run.denials.keys() {
        assert_eq!(*reason, DenialReason::Budget);
        assert!(
            matches!(scope, Scope::EndUser | Scope::Workspace),
            "{scope:?}"
        );
    }
    assert!(run
        .denials
        .contains_key(&(Scope::EndUser, DenialReason::Budget)));
    assert!(run
        .denials
        .contains_key(&(Scope::Workspace, DenialReason::Budget)));
}

#[test]
fn ten_thousand_end_users_over_a_small_cap_stay_within_it() {
    // 1,024 places for 10,000 end users: the table turns over all the time. A
    // forgotten end user's budget starts afresh (documented), so per-user spend is not
    // bounded here; the workspace's budget and the cap are.
    let (engine, _clock) = end_user_engine(1_024);
    let run = run_end_users(&engine, 4, 15_000);
    let usage = engine.usage();
    let ws = &usage.workspaces[0];
    assert_eq!(ws.usage.current.held, Decimal::ZERO);
    assert_eq!(ws.usage.current.cost, micro(run.total));
    assert!(run.total <= WORKSPACE_BUDGET_TOKENS, "workspace overspent");
    assert!(ws.end_users_tracked.unwrap() <= 1_024);
    assert!(run.most_tracked <= 1_024);
    // Four threads hold at most four end users in flight: a shard (64 places) is never
    // all in flight, so no new end user was refused for room.
    assert!(!run
        .denials
        .contains_key(&(Scope::EndUser, DenialReason::Concurrency)));
}
