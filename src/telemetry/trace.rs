//! `tracing` events (feature `tracing`), all off the admitted path. With the feature
//! off, or no subscriber interested, each is a no-op that allocates nothing.

use crate::denial::Denial;
#[cfg(feature = "redis")]
use crate::denial::StoreError;
use crate::events::EventKind;

/// A request was refused: its scope, reason and code, at `debug` (a denial is an
/// answer, not a fault; a flood of them must not flood the logs at `info`).
#[inline]
pub(crate) fn denied(denial: &Denial) {
    #[cfg(feature = "tracing")]
    tracing::debug!(
        target: "tollgate",
        scope = ?denial.scope,
        reason = ?denial.reason,
        code = denial.code(),
        status = denial.http_status(),
        retry_after_ms = denial.retry_after.map(|d| d.as_millis() as u64),
        "request denied"
    );
    #[cfg(not(feature = "tracing"))]
    let _ = denial;
}

#[cfg(feature = "redis")]
/// The counter store failed: a `warn`, with its kind and message.
pub(crate) fn store_error(error: &StoreError) {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        target: "tollgate",
        kind = %error.kind,
        message = %error.message,
        "counter store error"
    );
    #[cfg(not(feature = "tracing"))]
    let _ = error;
}

#[cfg(feature = "redis")]
/// A fail-open workspace admitted a request through its local limiter.
pub(crate) fn fail_open(workspace: &str) {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        target: "tollgate",
        workspace,
        "counter store unreachable: admitted by the local fail-open limiter"
    );
    #[cfg(not(feature = "tracing"))]
    let _ = workspace;
}

/// A policy change was applied (what it was, and who asked).
pub(crate) fn policy_changed(kind: &EventKind, actor: Option<&str>) {
    #[cfg(feature = "tracing")]
    tracing::info!(target: "tollgate", change = ?kind, actor, "policy changed");
    #[cfg(not(feature = "tracing"))]
    let _ = (kind, actor);
}

/// An event sink was full (or closed) and dropped an event.
pub(crate) fn event_dropped(dropped: u64) {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        target: "tollgate",
        dropped,
        "event sink full: event dropped"
    );
    #[cfg(not(feature = "tracing"))]
    let _ = dropped;
}
