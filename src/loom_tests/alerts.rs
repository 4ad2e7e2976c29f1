//! Model 6: budget alerts under concurrent commits. Each configured percentage fires
//! exactly once per period, however the commits that cross it interleave; a new period
//! fires them again.

use loom::thread;

use crate::alerts::Alerts;
use crate::sync::Arc;

const THRESHOLDS: [u8; 3] = [50, 80, 100];
const LIMIT: i64 = 1_000;

/// The thresholds one commit reports after reaching `percent`.
fn fired(alerts: &Alerts, percent: u8, period: u64) -> Vec<u8> {
    alerts
        .reach(percent, period, LIMIT)
        .map(|crossed| {
            THRESHOLDS
                .into_iter()
                .filter(|&t| crossed.includes(t))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_threshold_fires_once_per_period() {
    super::check("alerts", || {
        let alerts = Arc::new(Alerts::default());
        let period = 1_000_000_000_000;
        // Three commits seen as 60 %, 85 % and 100 % of the budget, from three threads.
        let handles: Vec<_> = [60, 85, 100]
            .into_iter()
            .map(|percent| {
                let alerts = Arc::clone(&alerts);
                thread::spawn(move || fired(&alerts, percent, period))
            })
            .collect();
        let mut all: Vec<u8> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, THRESHOLDS, "each threshold exactly once");
        let next = period + 86_400_000_000_000;
        assert_eq!(fired(&alerts, 55, next), [50], "a new period starts over");
    });
}
