//! The request path allocates nothing once warm: admitting, committing, dropping,
//! every kind of refusal, and rendering rate-limit headers, watched by a counting
//! global allocator.
//!
//! The harness runs tests on several threads at once, so the allocator counts per
//! thread: each test sees only its own allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use tollgate::*;

struct Counting;

thread_local! {
    // Const-initialised and without a destructor, so using it from inside the
    // allocator never allocates or registers anything itself.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: a thread being torn down may still allocate after its locals are gone.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_so_far() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Allocations made by `f` on this thread over many runs, after a few runs of
/// warm-up (thread-local state of the engine's dependencies is set up lazily).
/// Many runs, so an allocation that happens only now and then is caught too.
fn allocations_in(mut f: impl FnMut()) -> u64 {
    for _ in 0..3 {
        f();
    }
    let before = allocations_so_far();
    for _ in 0..200 {
        f();
    }
    allocations_so_far() - before
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Every level limited: key, workspace and workspace × model rates, concurrency,
/// key, workspace and org budgets, and the wallet. Extra keys exist to be refused.
fn policy(wallet: Decimal) -> PolicyDocument {
    let plenty = || Some(BudgetSpec::new(dec("1000"), BudgetPeriod::Month));
    let roomy = LimitsSpec {
        rpm: Some(100_000),
        rpd: Some(1_000_000),
        tpm: Some(100_000_000),
        tpm_counts: TokenCount::Total,
        max_concurrent: Some(1_000),
    };
    let mut ws = WorkspaceSpec::new("ws", "chatbot-production")
        .grant("m")
        .limits(roomy.clone());
    ws.budget = plenty();
    ws.model_limits.push(ModelLimitSpec {
        budget: None,
        model: "m".into(),
        rpm: Some(100_000),
        tpm: Some(100_000_000),
        tpm_counts: TokenCount::Output,
    });
    // Every end user limited too (requests that name one).
    ws.end_user_limits = Some(EndUserLimitsSpec {
        budget: plenty(),
        ..EndUserLimitsSpec::new(roomy.clone())
    });
    // End users of this one get one request a minute, to be refused.
    let strict = WorkspaceSpec::new("strict", "strict")
        .grant("m")
        .end_user_limits(EndUserLimitsSpec::new(LimitsSpec {
            rpm: Some(1),
            ..LimitsSpec::default()
        }));
    let key = |id: &str, limits: LimitsSpec, budget: Option<BudgetSpec>| KeySpec {
        limits,
        budget,
        ..KeySpec::new(id, "ws", &format!("sk-{id}"))
    };
    PolicyDocument::new(OrgSpec {
        wallet: Some(wallet),
        budget: plenty(),
        ..OrgSpec::new("org")
    })
    .model(ModelSpec::new("m", dec("1.5"), dec("6")))
    .model(ModelSpec::new("other", dec("1"), dec("1")))
    .workspace(ws)
    .workspace(strict)
    .key(key(
        "k",
        LimitsSpec {
            tpm: Some(1_000_000),
            ..roomy.clone()
        },
        plenty(),
    ))
    .key(key(
        "one-per-minute",
        LimitsSpec {
            rpm: Some(1),
            ..roomy.clone()
        },
        plenty(),
    ))
    .key(key(
        "one-at-a-time",
        LimitsSpec {
            max_concurrent: Some(1),
            ..roomy.clone()
        },
        plenty(),
    ))
    .key(key(
        "broke",
        roomy.clone(),
        Some(BudgetSpec::new(Decimal::ZERO, BudgetPeriod::Month)),
    ))
    .key(KeySpec {
        status: KeyStatus::Revoked,
        ..key("revoked", roomy, plenty())
    })
    .key(KeySpec::new("strict-key", "strict", "sk-strict"))
}

fn engine(wallet: &str) -> Engine {
    let clock = Arc::new(ManualClock::at(
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap(),
    ));
    Engine::builder(Policy::new(policy(dec(wallet))).expect("valid policy"))
        .clock(clock)
        .build()
}

fn request(credential: Credential<'_>) -> Request<'_> {
    Request::new(credential, "m")
        .input_tokens(500)
        .max_output_tokens(200)
}

fn denial(engine: &Engine, request: &Request<'_>) -> Denial {
    match engine.check_and_reserve(request) {
        Ok(_) => panic!("expected a denial"),
        Err(d) => d,
    }
}

/// Reads every header name and value, so rendering cannot be skipped; returns how
/// many headers there were.
fn read_all(headers: &RateLimitHeaders) -> usize {
    let mut count = 0;
    let mut bytes = 0;
    for (name, value) in headers.iter() {
        count += 1;
        bytes += name.len() + value.as_str().len() + value.as_ref().len();
    }
    black_box(bytes);
    count
}

#[test]
fn the_counter_sees_allocations() {
    let vec_push = allocations_in(|| {
        let mut v: Vec<u8> = black_box(Vec::new());
        v.push(black_box(1));
        black_box(v);
    });
    assert_eq!(
        vec_push, 200,
        "one allocation per Vec::push into an empty Vec"
    );

    // And inside the crate: a usage snapshot is documented to allocate.
    let e = engine("1000");
    let usage = allocations_in(|| {
        black_box(e.usage());
    });
    assert!(usage >= 200, "usage() allocated only {usage} times");
}

#[test]
fn admit_and_commit_by_secret_allocates_nothing() {
    let e = engine("1000");
    let n = allocations_in(|| {
        let r = e
            .check_and_reserve(&request(Credential::Secret("sk-k")))
            .expect("admitted");
        let receipt = e.commit_usage(r, Usage::new(480, 150)).expect("committed");
        black_box(receipt.cost());
    });
    assert_eq!(n, 0, "allocations in check_and_reserve + commit_usage");
    assert_eq!(e.usage().keys[0].usage.current.requests, 203);
}

#[test]
fn admit_and_commit_by_key_id_allocates_nothing() {
    let e = engine("1000");
    let n = allocations_in(|| {
        let r = e
            .check_and_reserve(&request(Credential::KeyId("k")))
            .expect("admitted");
        // Usage beyond the reservation takes the debt path as well.
        let receipt = e.commit_usage(r, Usage::new(600, 250)).expect("committed");
        black_box(receipt.overage());
    });
    assert_eq!(n, 0, "allocations in check_and_reserve + commit_usage");
    assert_eq!(e.usage().keys[0].usage.current.requests, 203);
}

#[test]
fn a_known_end_user_allocates_nothing_a_new_one_does() {
    let e = engine("1000");
    // The first request of "alice" (in the warm-up runs) creates her counters; every
    // later one finds them without allocating, admitted, committed or dropped.
    let n = allocations_in(|| {
        let r = e
            .check_and_reserve(&request(Credential::KeyId("k")).end_user("alice"))
            .expect("admitted");
        assert!(r.is_end_user_limited());
        let receipt = e.commit_usage(r, Usage::new(480, 150)).expect("committed");
        black_box(receipt.cost());
        let r = e
            .check_and_reserve(&request(Credential::KeyId("k")).end_user("alice"))
            .expect("admitted");
        drop(r);
    });
    assert_eq!(n, 0, "allocations for a known end user");
    assert_eq!(
        e.end_user_usage("ws", "alice").unwrap().current.requests,
        203
    );
    // A refusal at the end-user level allocates nothing either (bob's one request a
    // minute is committed first).
    let r = e
        .check_and_reserve(&request(Credential::KeyId("strict-key")).end_user("bob"))
        .expect("admitted");
    e.commit_usage(r, Usage::new(1, 1)).expect("committed");
    let n = allocations_in(|| {
        let d = denial(
            &e,
            &request(Credential::KeyId("strict-key")).end_user("bob"),
        );
        assert_eq!(
            (d.scope, d.reason),
            (Scope::EndUser, DenialReason::RequestsPerMinute)
        );
        let d = denial(&e, &request(Credential::KeyId("k")).end_user("bad\nid"));
        assert_eq!(d.reason, DenialReason::InvalidEndUser);
    });
    assert_eq!(n, 0, "allocations in end-user denials");
    // First sight allocates (documented): the id and the counters.
    let ids: Vec<String> = (0..50).map(|i| format!("new-{i}")).collect();
    let before = allocations_so_far();
    for id in &ids {
        let r = e
            .check_and_reserve(&request(Credential::KeyId("k")).end_user(id))
            .expect("admitted");
        drop(r);
    }
    assert!(
        allocations_so_far() - before >= 50,
        "a new end user allocates"
    );
}

#[test]
fn admit_and_drop_allocates_nothing() {
    let e = engine("1000");
    let n = allocations_in(|| {
        let r = e
            .check_and_reserve(&request(Credential::KeyId("k")))
            .expect("admitted");
        black_box(r.reserved_cost());
        drop(r);
    });
    assert_eq!(n, 0, "allocations in check_and_reserve + drop");
    let usage = e.usage().keys[0].usage;
    assert_eq!((usage.current.requests, usage.in_flight), (0, 0));
}

#[test]
fn denials_allocate_nothing() {
    let e = engine("1000");
    // Take the one request a minute and the one slot, so those keys are refused.
    e.commit_usage(
        e.check_and_reserve(&request(Credential::KeyId("one-per-minute")))
            .unwrap(),
        Usage::new(1, 1),
    )
    .unwrap();
    let _slot = e
        .check_and_reserve(&request(Credential::KeyId("one-at-a-time")))
        .unwrap();
    let broke_wallet = engine("0");

    let too_big = Request::with_key_id("k", "m")
        .input_tokens(900_000)
        .max_output_tokens(200_000);
    let cases: [(&str, &Engine, Request<'_>, DenialReason); 9] = [
        (
            "unknown secret",
            &e,
            request(Credential::Secret("sk-nobody")),
            DenialReason::UnknownKey,
        ),
        (
            "unknown key id",
            &e,
            request(Credential::KeyId("nobody")),
            DenialReason::UnknownKey,
        ),
        (
            "revoked key",
            &e,
            request(Credential::Secret("sk-revoked")),
            DenialReason::KeyRevoked,
        ),
        (
            "unknown model",
            &e,
            Request::with_key_id("k", "no-such-model"),
            DenialReason::UnknownModel,
        ),
        (
            "model not granted",
            &e,
            Request::with_key_id("k", "other"),
            DenialReason::ModelNotGranted,
        ),
        (
            "requests per minute",
            &e,
            request(Credential::Secret("sk-one-per-minute")),
            DenialReason::RequestsPerMinute,
        ),
        (
            "tokens per minute",
            &e,
            too_big,
            DenialReason::TokensPerMinute,
        ),
        (
            "concurrency",
            &e,
            request(Credential::KeyId("one-at-a-time")),
            DenialReason::Concurrency,
        ),
        (
            "key budget",
            &e,
            request(Credential::KeyId("broke")),
            DenialReason::Budget,
        ),
    ];
    let mut allocating = Vec::new();
    for (name, engine, req, reason) in cases {
        assert_eq!(denial(engine, &req).reason, reason, "{name}");
        let n = allocations_in(|| {
            black_box(denial(engine, &req));
        });
        if n != 0 {
            allocating.push((name, n));
        }
    }
    // The wallet is the last level: every other level is taken, then given back.
    let req = request(Credential::KeyId("k"));
    assert_eq!(denial(&broke_wallet, &req).reason, DenialReason::Wallet);
    let n = allocations_in(|| {
        black_box(denial(&broke_wallet, &req));
    });
    if n != 0 {
        allocating.push(("wallet", n));
    }
    assert!(allocating.is_empty(), "allocating denials: {allocating:?}");
}

#[test]
fn rate_limit_headers_allocate_nothing() {
    let e = engine("1000");
    let held = e
        .check_and_reserve(&request(Credential::KeyId("k")))
        .unwrap();
    let n = allocations_in(|| {
        let headers = RateLimitHeaders::for_reservation(&held);
        assert_eq!(read_all(&headers), 8);
        let remaining = headers.get("x-ratelimit-remaining-tokens").unwrap();
        black_box(remaining.as_str());
    });
    assert_eq!(n, 0, "allocations rendering an admitted request's headers");

    // A rate-limit denial carries Retry-After; a budget denial carries no rate limit.
    e.commit_usage(
        e.check_and_reserve(&request(Credential::KeyId("one-per-minute")))
            .unwrap(),
        Usage::new(1, 1),
    )
    .unwrap();
    let rate_limited = denial(&e, &request(Credential::KeyId("one-per-minute")));
    let broke = denial(&e, &request(Credential::KeyId("broke")));
    assert_eq!(broke.reason, DenialReason::Budget);
    let n = allocations_in(|| {
        let headers = RateLimitHeaders::for_denial(&rate_limited);
        assert_eq!(read_all(&headers), 6);
        black_box(headers.get("retry-after").unwrap().as_str());
        let headers = RateLimitHeaders::for_denial(&broke);
        black_box(read_all(&headers));
        black_box(headers.get("retry-after"));
    });
    assert_eq!(n, 0, "allocations rendering a denial's headers");
}

/// With the `metrics` feature and a real recorder (a Prometheus one, given to the
/// engine), admitting and committing still allocate nothing: the handles were
/// registered when the policy was applied, and incrementing one is an atomic add.
/// (Without a recorder, the tests above run with the features compiled in: CI runs
/// this file with `--features tracing,metrics` too.)
#[cfg(feature = "metrics")]
#[test]
fn admit_commit_and_deny_with_a_metrics_recorder_allocate_nothing() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let clock = Arc::new(ManualClock::at(
        Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap(),
    ));
    let e = Engine::builder(Policy::new(policy(dec("1000"))).expect("valid policy"))
        .clock(clock)
        .metrics_recorder(Arc::new(recorder))
        .build();
    let n = allocations_in(|| {
        let r = e
            .check_and_reserve(&request(Credential::KeyId("k")))
            .expect("admitted");
        let receipt = e.commit_usage(r, Usage::new(480, 150)).expect("committed");
        black_box(receipt.cost());
        let dropped = e
            .check_and_reserve(&request(Credential::KeyId("k")))
            .expect("admitted");
        drop(dropped);
        black_box(denial(&e, &request(Credential::KeyId("broke"))));
    });
    assert_eq!(n, 0, "allocations with a recorder installed");
    let text = handle.render();
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
            .to_owned()
    };
    assert_eq!(
        line("tollgate_requests_admitted_total{workspace=\"ws\",model=\"m\"}"),
        "tollgate_requests_admitted_total{workspace=\"ws\",model=\"m\"} 406"
    );
    assert_eq!(
        line("tollgate_requests_denied_total{scope=\"key\",reason=\"budget\"}"),
        "tollgate_requests_denied_total{scope=\"key\",reason=\"budget\"} 203"
    );
    // 203 commits of 480 × 1.5 + 150 × 6 = 1,620 micro-dollars each.
    assert_eq!(
        line("tollgate_spend_picodollars_total{workspace=\"ws\",model=\"m\"}"),
        format!(
            "tollgate_spend_picodollars_total{{workspace=\"ws\",model=\"m\"}} {}",
            203u64 * 1_620_000_000
        )
    );
    assert_eq!(
        line("tollgate_reservations_in_flight{workspace=\"ws\"}"),
        "tollgate_reservations_in_flight{workspace=\"ws\"} 0"
    );
}

#[test]
fn aliases_and_a_keys_own_models_allocate_nothing() {
    let doc = PolicyDocument::new(OrgSpec::new("org"))
        .model(ModelSpec::new("m", dec("1.5"), dec("6")).alias("m-latest"))
        .model(ModelSpec::new("other", dec("1"), dec("1")))
        .workspace(WorkspaceSpec::new("ws", "chatbot-production").grant("*"))
        .key(KeySpec::new("k", "ws", "sk-k").allow_model("m"));
    let e = Engine::builder(Policy::new(doc).expect("valid policy"))
        .clock(Arc::new(ManualClock::at(
            Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap(),
        )))
        .build();
    let by_alias = Request::with_key_id("k", "m-latest")
        .input_tokens(500)
        .max_output_tokens(200);
    let n = allocations_in(|| {
        let r = e.check_and_reserve(&by_alias).expect("admitted");
        let receipt = e.commit_usage(r, Usage::new(480, 150)).expect("committed");
        black_box(receipt.cost());
    });
    assert_eq!(n, 0, "allocations admitting and committing by an alias");
    assert_eq!(
        e.usage().workspaces[0].models[0].usage.current.requests,
        203
    );

    let outside = Request::with_key_id("k", "other");
    assert_eq!(denial(&e, &outside).reason, DenialReason::ModelNotGranted);
    let n = allocations_in(|| {
        black_box(denial(&e, &outside));
    });
    assert_eq!(n, 0, "allocations refusing a model outside the key's own");
}
