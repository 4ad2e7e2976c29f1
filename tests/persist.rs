//! Saving and restoring the in-memory engine's counters.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;
use tollgate::{Engine, ManualClock, PersistError, Policy, Request, Usage, UsageSnapshot};

const POLICY: &str = r#"
    [org]
    id = "acme"
    wallet = "1000"
    budget = { limit = "500", period = "month" }

    [[models]]
    name = "m"
    input_per_million = "0.075"
    output_per_million = "0.3"

    [[workspaces]]
    id = "ws1"
    name = "one"
    models = ["m"]
    budget = { limit = "100", period = "day" }

    [[keys]]
    id = "k1"
    workspace = "ws1"
    secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"#;

fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tollgate-{}-{name}.json", std::process::id()))
}

fn engine(clock: &Arc<ManualClock>) -> Engine {
    Engine::builder(Policy::from_toml_str(POLICY).unwrap())
        .clock(clock.clone())
        .build()
}

fn spend(engine: &Engine, n: u32) {
    for i in 1..=n {
        let request = Request::with_key_id("k1", "m")
            .input_tokens(1000 * i)
            .max_output_tokens(333);
        let reservation = engine.check_and_reserve(&request).unwrap();
        engine
            .commit_usage(reservation, Usage::new(1000 * i, 7 * i))
            .unwrap();
    }
}

/// Everything but the snapshot's own timestamp.
fn books(usage: &UsageSnapshot) -> String {
    let mut usage = usage.clone();
    usage.taken_at = tollgate::Timestamp::EPOCH;
    serde_json::to_string(&usage).unwrap()
}

#[test]
fn save_and_restore_round_trip_exactly() {
    let clock = Arc::new(ManualClock::at(
        Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap(),
    ));
    let before = engine(&clock);
    spend(&before, 25);
    // Yesterday's spend becomes the previous day's for the workspace.
    clock.advance(Duration::from_secs(86_400));
    spend(&before, 3);
    let path = temp_file("round-trip");
    before.save_counters(&path).unwrap();

    let after = Engine::builder(Policy::from_toml_str(POLICY).unwrap())
        .clock(clock.clone())
        .restore_counters(&path)
        .unwrap();
    let (saved, restored) = (before.usage(), after.usage());
    assert_eq!(books(&restored), books(&saved));
    let ws = &restored.workspaces[0].usage;
    assert!(ws.previous.cost > Decimal::ZERO && ws.current.cost > Decimal::ZERO);
    assert_eq!(ws.current.requests, 3);
    assert_eq!(restored.org.current.requests, 28);
    assert_eq!(restored.wallet_spent, saved.org.current.cost);
    // The restored spend counts against the budget: 100 − spent is what is left.
    let left = Decimal::from(100) - ws.current.cost;
    assert!(left < Decimal::from(100));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_restart_in_a_new_period_keeps_the_old_one_as_previous() {
    let clock = Arc::new(ManualClock::at(
        Utc.with_ymd_and_hms(2026, 11, 23, 23, 0, 0).unwrap(),
    ));
    let before = engine(&clock);
    spend(&before, 4);
    let path = temp_file("new-period");
    before.save_counters(&path).unwrap();
    let day_spend = before.usage().workspaces[0].usage.current;

    clock.advance(Duration::from_secs(2 * 3600)); // past midnight
    let after = Engine::builder(Policy::from_toml_str(POLICY).unwrap())
        .clock(clock.clone())
        .restore_counters(&path)
        .unwrap();
    let ws = after.usage().workspaces[0].usage;
    assert_eq!(ws.current.cost, Decimal::ZERO);
    assert_eq!(ws.previous.cost, day_spend.cost);
    assert_eq!(ws.previous.requests, 4);
    // The org's month has not ended: its spend is still current.
    assert_eq!(after.usage().org.current.cost, day_spend.cost);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn torn_edited_or_foreign_files_are_errors_not_resets() {
    let clock = Arc::new(ManualClock::at(
        Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap(),
    ));
    let before = engine(&clock);
    spend(&before, 2);
    let path = temp_file("corrupt");
    before.save_counters(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let restore = || {
        Engine::builder(Policy::from_toml_str(POLICY).unwrap())
            .clock(clock.clone())
            .restore_counters(&path)
    };

    // Torn: the second half of the file is missing.
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    assert!(matches!(restore(), Err(PersistError::Corrupt { .. })));

    // Edited: a digit of the spend changed, the checksum no longer matches.
    let edited = text.replacen("\\\"requests\\\":2", "\\\"requests\\\":9", 1);
    assert_ne!(edited, text, "the edit must hit the body");
    std::fs::write(&path, &edited).unwrap();
    match restore() {
        Err(PersistError::Corrupt { detail, .. }) => {
            assert!(detail.contains("checksum"), "{detail}")
        }
        other => panic!("{other:?}"),
    }

    // Another org's file.
    std::fs::write(&path, &text).unwrap();
    let other = POLICY.replace("id = \"acme\"", "id = \"globex\"");
    let result = Engine::builder(Policy::from_toml_str(&other).unwrap())
        .clock(clock.clone())
        .restore_counters(&path);
    assert!(matches!(result, Err(PersistError::WrongOrg { .. })));

    // Missing.
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(restore(), Err(PersistError::Io { .. })));
}
