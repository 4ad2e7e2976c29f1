//! The one place the engine's shared-state primitives come from.
//!
//! Normally these are std atomics and `arc-swap`; under `--cfg loom` they are loom's
//! instrumented versions, so the same engine code is model-checked unchanged
//! (the pattern tokio and bytes use).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;

/// How many ways counters that every request writes are split (see [`thread_share`]).
#[cfg(not(loom))]
pub(crate) const SHARES: usize = 16;
/// One share under loom: every extra atomic is a branch point for the model checker.
#[cfg(loom)]
pub(crate) const SHARES: usize = 1;

/// Which share of a split counter this thread uses: threads are dealt out in turn on
/// first use, so a handful of busy threads land on different cache lines.
#[cfg(not(loom))]
pub(crate) fn thread_share() -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARE: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SHARES;
    }
    SHARE.with(|share| *share)
}

/// Under loom every thread uses share 0: the models check the counting, and a std
/// thread-local would hide threads from the model checker.
#[cfg(loom)]
pub(crate) fn thread_share() -> usize {
    0
}

/// Wait a moment for another thread to finish a short critical step (a bucket's
/// rule change). Under loom a yield, so the model checker lets the other thread run.
#[inline]
pub(crate) fn spin_wait() {
    #[cfg(not(loom))]
    std::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// A value on its own pair of cache lines (x86's adjacent-line prefetch pairs them),
/// so writes to it do not contend with its neighbours'.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// A lock for rare writers (rollover, policy changes), never taken per request.
///
/// `parking_lot`'s normally; loom's under `--cfg loom`, so the model checker explores
/// the paths that take it too.
pub(crate) struct Mutex<T> {
    #[cfg(not(loom))]
    inner: parking_lot::Mutex<T>,
    #[cfg(loom)]
    inner: loom::sync::Mutex<T>,
}

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            #[cfg(not(loom))]
            inner: parking_lot::Mutex::new(value),
            #[cfg(loom)]
            inner: loom::sync::Mutex::new(value),
        }
    }

    #[cfg(not(loom))]
    pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, T> {
        self.inner.lock()
    }

    #[cfg(loom)]
    pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        // A poisoned lock means a test thread already panicked; that panic is the report.
        self.inner.lock().unwrap()
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

/// An `Arc<T>` that readers load without locking and writers replace atomically.
///
/// Backed by `arc_swap::ArcSwap`; under loom by a loom mutex, because arc-swap's
/// internals are not loom-instrumented. Readers only ever see a whole old or a whole
/// new value in both.
pub(crate) struct SwapCell<T> {
    #[cfg(not(loom))]
    inner: arc_swap::ArcSwap<T>,
    #[cfg(loom)]
    inner: loom::sync::Mutex<Arc<T>>,
}

impl<T> SwapCell<T> {
    pub(crate) fn new(value: Arc<T>) -> Self {
        Self {
            #[cfg(not(loom))]
            inner: arc_swap::ArcSwap::new(value),
            #[cfg(loom)]
            inner: loom::sync::Mutex::new(value),
        }
    }

    /// A cheap borrow of the current value (no reference-count write on the fast path).
    #[cfg(not(loom))]
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<T>> {
        self.inner.load()
    }

    /// A borrow of the current value.
    #[cfg(loom)]
    pub(crate) fn load(&self) -> Arc<T> {
        self.inner.lock().unwrap().clone()
    }

    /// An owned handle to the current value.
    pub(crate) fn load_full(&self) -> Arc<T> {
        #[cfg(not(loom))]
        return self.inner.load_full();
        #[cfg(loom)]
        return self.inner.lock().unwrap().clone();
    }

    /// Replace the value unconditionally.
    pub(crate) fn store(&self, value: Arc<T>) {
        #[cfg(not(loom))]
        self.inner.store(value);
        #[cfg(loom)]
        {
            *self.inner.lock().unwrap() = value;
        }
    }
}

/// Adds `delta` to `cell`, pinning at the `i64` range instead of wrapping, so an
/// absurd overage can never turn a large debt into a large credit.
///
/// An add that is small, onto a counter far from the bound (every ordinary commit), is
/// one `fetch_add`: the admission words of the org and the wallet take one from every
/// request, and a compare-and-swap loop there retried so often under two threads that
/// they served fewer requests than one. Anything else is a compare-and-swap loop, so an
/// absurd add never stores a wrapped value. The one case left: an ordinary add that
/// read the counter far from the bound while an absurd one pinned it, landing just
/// after; it finds the wrap (its previous value was at the bound) and pins the counter
/// again at once. Only between those two steps can a reader see a wrapped value, and
/// only while an absurd overage (millions of dollars of debt) is being charged.
pub(crate) fn saturating_add_i64(cell: &AtomicI64, delta: i64) {
    const FAST_DELTA: u64 = 1 << 40;
    const FAST_VALUE: u64 = 1 << 62;
    let mut current = cell.load(Ordering::Acquire);
    if delta.unsigned_abs() < FAST_DELTA && current.unsigned_abs() < FAST_VALUE {
        let before = cell.fetch_add(delta, Ordering::AcqRel);
        if before.checked_add(delta).is_some() {
            return;
        }
        // Wrapped: an absurd add pinned the counter in between. The true value is past
        // the bound, so the counter is pinned there again, whatever landed on the
        // wrapped value meanwhile (a counter at its bound stays there).
        let pinned = if delta > 0 { i64::MAX } else { i64::MIN };
        cell.store(pinned, Ordering::Release);
        return;
    }
    loop {
        let next = current.saturating_add(delta);
        match cell.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(actual) => current = actual,
        }
    }
}

/// Adds `delta` to `cell`, pinning at `u64::MAX` instead of wrapping. One
/// `fetch_add` while both are far from the bound (always, for request and token
/// counts: 2^22 adds of at most 2^40 would have to be in flight at once to cross
/// 2^62 to 2^64), else a compare-and-swap loop.
pub(crate) fn saturating_add_u64(cell: &AtomicU64, delta: u64) {
    const FAST_DELTA: u64 = 1 << 40;
    const FAST_VALUE: u64 = 1 << 62;
    let mut current = cell.load(Ordering::Acquire);
    if delta < FAST_DELTA && current < FAST_VALUE {
        cell.fetch_add(delta, Ordering::AcqRel);
        return;
    }
    loop {
        let next = current.saturating_add(delta);
        match cell.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(actual) => current = actual,
        }
    }
}
