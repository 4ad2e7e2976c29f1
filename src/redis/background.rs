//! What keeps Redis free of leaked holds when callers go away: store calls that finish
//! after their caller is dropped, releases retried until Redis acknowledges them, and
//! the renewal of live holds.
//!
//! - [`Detach`]: a store call's future runs in its caller's task, and if the caller
//!   drops it unfinished it is moved to a spawned task and finishes there, so a reserve
//!   that lands with nobody waiting is released (the reservation it yields is dropped),
//!   and a commit always completes.
//! - [`release`]: a release retried with backoff until Redis acknowledges it, or until
//!   one reservation TTL has passed since it was due (by then the hold has expired in
//!   Redis, and the next script on its tag gives it back).
//! - [`Renewals`]: every live reservation's holds get their expiry moved on every third
//!   of the reservation TTL, in one `renew` call per hash tag, until the
//!   reservation is committed or dropped, or its engine's last handle is dropped
//!   (nothing can commit it then). A crashed instance stops renewing, so its holds come
//!   back within one TTL.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::Value;

use crate::denial::StoreError;
use crate::redis::calls::{self, Call};
use crate::redis::error::corrupt_reply;
use crate::redis::keys::Group;
use crate::redis::scripts::Function;
use crate::redis::Inner;

/// One reservation's id and the key names it was taken under, shared by the
/// reservation, its renewal and its commit.
#[derive(Debug)]
pub(crate) struct Hold {
    pub(crate) id: String,
    /// The workspace's group, then the org's.
    pub(crate) groups: [Group; 2],
}

/// A future that is finished in a spawned task if it is dropped before it completes
/// (its caller went away): a store call, once started, always runs to its end, and its
/// result is dropped there (a reservation released, a commit queued or acknowledged).
/// Without a tokio runtime to spawn on, it is dropped instead.
pub(crate) struct Detach<T: Send + 'static> {
    future: Option<Pin<Box<dyn Future<Output = T> + Send + 'static>>>,
}

impl<T: Send + 'static> Detach<T> {
    pub(crate) fn new(future: impl Future<Output = T> + Send + 'static) -> Self {
        Detach {
            future: Some(Box::pin(future)),
        }
    }
}

impl<T: Send + 'static> Future for Detach<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(future) = self.future.as_mut() else {
            panic!("Detach polled after it completed");
        };
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.future = None;
        Poll::Ready(output)
    }
}

impl<T: Send + 'static> Drop for Detach<T> {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                drop(runtime.spawn(future));
            }
        }
    }
}

/// The first retry of a release waits this long, each next one twice as long...
const RELEASE_FIRST_RETRY: Duration = Duration::from_millis(20);
/// ... up to this.
const RELEASE_MAX_RETRY: Duration = Duration::from_millis(500);

/// One release of one group of `hold`: `Ok` once Redis acknowledged it (a hold already
/// committed, released, expired or never taken is acknowledged too: the script does
/// nothing then).
async fn release_once(inner: &Inner, hold: &Hold, group: usize) -> Result<(), StoreError> {
    let call = calls::release(&hold.groups[group], &hold.id);
    inner.run(Function::Release, &call).await.map(drop)
}

/// Counts a release in flight while it lives.
struct InFlight(Arc<Inner>);

impl InFlight {
    fn new(inner: &Arc<Inner>) -> Self {
        inner.releases_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(inner))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.releases_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Release one group of `hold`, retrying transient failures with backoff until Redis
/// acknowledges it or `deadline` passes; the first attempt is made at once.
async fn release_until(inner: Arc<Inner>, hold: Arc<Hold>, group: usize, deadline: Instant) {
    let _counted = InFlight::new(&inner);
    let mut wait = RELEASE_FIRST_RETRY;
    loop {
        match release_once(&inner, &hold, group).await {
            Ok(()) => return,
            Err(error) => {
                let transient = error.is_transient();
                inner.record_error(error);
                // A permanent failure (corrupt data at its keys) fails again; past the
                // deadline the hold has expired in Redis, which gives it back itself.
                if !transient || Instant::now() + wait >= deadline {
                    return;
                }
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RELEASE_MAX_RETRY);
    }
}

fn deadline(inner: &Inner) -> Instant {
    Instant::now() + inner.config.reservation_ttl
}

/// Release group `group` of `hold` in the background, retried until acknowledged or
/// one reservation TTL from now. Without a tokio runtime the hold is left to expire.
pub(crate) fn release(inner: &Arc<Inner>, hold: &Arc<Hold>, group: usize) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let task = release_until(Arc::clone(inner), Arc::clone(hold), group, deadline(inner));
        drop(runtime.spawn(task));
    }
}

/// Release group `group` of `hold` now, and if that fails transiently, keep retrying
/// in the background (as [`release`]).
pub(crate) async fn release_now(inner: &Arc<Inner>, hold: &Arc<Hold>, group: usize) {
    let due = deadline(inner);
    match release_once(inner, hold, group).await {
        Ok(()) => {}
        Err(error) if error.is_transient() => {
            inner.record_error(error);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let task = release_until(Arc::clone(inner), Arc::clone(hold), group, due);
                drop(runtime.spawn(task));
            }
        }
        Err(error) => inner.record_error(error),
    }
}

/// At most this many holds per the `renew` function call.
const RENEW_BATCH: usize = 128;

/// A live reservation, renewed until it is committed or dropped.
struct Live {
    hold: Arc<Hold>,
    /// When each group's hold was last known to expire one TTL later: the reserve
    /// (its reply came after the script set the expiry) or the last renewal's sending.
    renewed: [Instant; 2],
    /// Groups whose hold a renewal found gone (expired and given back): not renewed
    /// again; the commit charges such a hold's usage as debt.
    gone: [bool; 2],
}

/// The live reservations of one engine and the task renewing their holds.
pub(crate) struct Renewals {
    live: Mutex<HashMap<u64, Live>>,
    next: AtomicU64,
    /// Whether a renewal task is running (it clears this when it ends).
    running: AtomicBool,
    /// A hold is renewed once this long has passed since its last renewal...
    every: Duration,
    /// ... checked this often: a hold goes at most `every + tick` (half the TTL)
    /// without renewal while Redis answers.
    tick: Duration,
}

impl Renewals {
    pub(crate) fn new(ttl: Duration) -> Self {
        let every = (ttl / 3).max(Duration::from_millis(1));
        Renewals {
            live: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            running: AtomicBool::new(false),
            every,
            tick: (every / 2).max(Duration::from_millis(1)),
        }
    }

    /// Renew `hold` from now on; the token to [`Renewals::forget`] it with.
    pub(crate) fn register(&self, inner: &Arc<Inner>, hold: &Arc<Hold>, taken: Instant) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.live.lock().insert(
            token,
            Live {
                hold: Arc::clone(hold),
                renewed: [taken; 2],
                gone: [false; 2],
            },
        );
        if !self.running.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(renew_loop(Arc::downgrade(inner)))),
                Err(_) => self.running.store(false, Ordering::Release),
            }
        }
        token
    }

    /// Stop renewing a reservation (committed or dropped).
    pub(crate) fn forget(&self, token: u64) {
        self.live.lock().remove(&token);
    }
}

/// Clears `running` when the renewal task ends, or is dropped with its runtime, so
/// the next registration starts another.
struct Running(Weak<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.renewals.running.store(false, Ordering::Release);
        }
    }
}

async fn renew_loop(engine: Weak<Inner>) {
    let _running = Running(engine.clone());
    let Some(tick) = engine.upgrade().map(|inner| inner.renewals.tick) else {
        return;
    };
    loop {
        tokio::time::sleep(tick).await;
        let Some(inner) = engine.upgrade() else {
            return;
        };
        // Nothing can commit a reservation once every handle of its engine is gone:
        // its holds are left to expire, as a crashed instance's would.
        if inner.handles.strong_count() == 0 {
            return;
        }
        renew_due(&inner).await;
    }
}

/// One batch: (token, group) of each hold, in the call's order.
struct Batch {
    holds: Vec<(u64, usize)>,
    call: Call,
}

/// Renew every hold last renewed at least `every` ago, one call per hash tag (per
/// [`RENEW_BATCH`] holds), concurrently.
async fn renew_due(inner: &Arc<Inner>) {
    let renewals = &inner.renewals;
    let sent = Instant::now();
    let batches = {
        let live = renewals.live.lock();
        let mut by_tag: HashMap<&str, Vec<(u64, usize, &Hold)>> = HashMap::new();
        for (&token, entry) in live.iter() {
            for group in 0..2 {
                if !entry.gone[group] && sent.duration_since(entry.renewed[group]) >= renewals.every
                {
                    let tag = entry.hold.groups[group].tag.as_str();
                    by_tag
                        .entry(tag)
                        .or_default()
                        .push((token, group, &entry.hold));
                }
            }
        }
        let ttls = inner.ttls;
        let mut batches = Vec::new();
        for due in by_tag.values() {
            for chunk in due.chunks(RENEW_BATCH) {
                let (_, group, first) = chunk[0];
                let mut keys = Vec::with_capacity(chunk.len() + 1);
                keys.push(first.groups[group].holds());
                let mut args = Vec::with_capacity(chunk.len() + 2);
                args.push(ttls.reservation.to_string());
                args.push(ttls.record().to_string());
                for &(_, group, hold) in chunk {
                    keys.push(hold.groups[group].record(&hold.id));
                    args.push(hold.id.clone());
                }
                batches.push(Batch {
                    holds: chunk
                        .iter()
                        .map(|&(token, group, _)| (token, group))
                        .collect(),
                    call: Call { keys, args },
                });
            }
        }
        batches
    };
    if batches.is_empty() {
        return;
    }
    let mut calls = tokio::task::JoinSet::new();
    for batch in batches {
        let inner = Arc::clone(inner);
        calls.spawn(async move {
            let reply = inner
                .run(Function::Renew, &batch.call)
                .await
                .and_then(|reply| read_renew(&reply, batch.holds.len()));
            (batch.holds, reply)
        });
    }
    while let Some(joined) = calls.join_next().await {
        let Ok((holds, reply)) = joined else {
            continue; // The runtime is shutting down.
        };
        match reply {
            Ok(renewed) => {
                let mut live = renewals.live.lock();
                for ((token, group), renewed) in holds.into_iter().zip(renewed) {
                    if let Some(entry) = live.get_mut(&token) {
                        if renewed {
                            entry.renewed[group] = sent;
                        } else {
                            entry.gone[group] = true;
                        }
                    }
                }
            }
            // Retried at the next tick.
            Err(error) => inner.record_error(error),
        }
    }
}

/// the `renew` function's reply: whether each hold was renewed (else it was gone).
fn read_renew(reply: &Value, count: usize) -> Result<Vec<bool>, StoreError> {
    let Value::Array(items) = reply else {
        return Err(corrupt_reply("renew", format!("{reply:?}")));
    };
    if items.len() != count {
        return Err(corrupt_reply("renew", format!("{count} holds, {reply:?}")));
    }
    items
        .iter()
        .map(|item| match item {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            other => Err(corrupt_reply("renew", format!("{other:?}"))),
        })
        .collect()
}
