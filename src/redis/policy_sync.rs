//! One policy for every instance: each `RedisEngine` runs the version of the shared
//! document (`policy_store::redis`) it last applied, and follows new versions.
//!
//! At start an instance loads the stored document (or seeds an empty Redis with the
//! policy it was given). Then a background task waits for an announcement on the
//! policy channel (pub/sub, on its own connection, resubscribed after a failure) or
//! for the poll interval, whichever comes first, and applies any newer version. A
//! subscription can miss a message (a reconnect, a Redis restart): the poll catches
//! it. Applying a version read from Redis only swaps this instance's snapshot: the
//! instance that made the change already wrote what it implies (revocation flags,
//! counters following changed rules) and reported its event.
//!
//! The engine's clock is aligned to Redis `TIME` at start, so every instance
//! measures rotation grace (and key expiry) on one clock, within half a round trip.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::PubSubStream;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::control::successor;
use crate::denial::{Error, StoreError, StoreErrorKind};
use crate::policy::Policy;
use crate::policy_store::redis::{self as store, Cas, Stamp};
use crate::redis::conn::Connection;
use crate::redis::error::classify;
use crate::redis::keys::Layout;
use crate::redis::{fallback, Inner};
use crate::snapshot::Snapshot;

/// A clock that reads Redis `TIME` now (corrected by half the round trip) and then
/// advances monotonically on this machine's counter.
pub(crate) async fn redis_clock(connection: &mut Connection) -> Result<Arc<dyn Clock>, Error> {
    let sent = Instant::now();
    let (seconds, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(connection)
        .await
        .map_err(|e| classify("time", &e))?;
    let half_trip = sent.elapsed() / 2;
    let wall = Duration::from_secs(seconds) + Duration::from_micros(micros) + half_trip;
    let wall = Timestamp::EPOCH.saturating_add(wall);
    Ok(Arc::new(SystemClock::anchored(wall)))
}

/// The shared policy and its stamp; when Redis holds none yet, `seed` becomes
/// version 1 (if two instances seed at once, one wins and both run its document).
pub(crate) async fn load_or_seed(
    connection: &mut Connection,
    layout: &Layout,
    seed: Policy,
) -> Result<(Stamp, Policy), Error> {
    let key = layout.policy();
    loop {
        if let Some(stored) = store::read(connection, &key).await? {
            return Ok(stored);
        }
        let channel = layout.policy_channel();
        match store::compare_and_set(connection, &key, &channel, (0, 1), seed.document()).await? {
            Cas::Written(stamp) => return Ok((stamp, seed)),
            Cas::Lost => continue,
        }
    }
}

/// Start the task that applies new versions as they are announced or polled. It
/// stops when the engine's last handle is dropped. Subscribed before it returns, so
/// every change made after the engine is started is announced to it.
pub(crate) async fn follow(inner: &Arc<Inner>, subscriber: Option<redis::Client>) {
    let weak = Arc::downgrade(inner);
    let channel = inner.layout.policy_channel();
    let poll = inner.config.policy_poll_interval;
    let connect_timeout = inner.config.connection_timeout;
    let mut subscription = match &subscriber {
        Some(client) => subscribe(client, &channel, connect_timeout).await,
        None => None,
    };
    tokio::spawn(async move {
        loop {
            if let (None, Some(client)) = (&subscription, &subscriber) {
                subscription = subscribe(client, &channel, connect_timeout).await;
            }
            match &mut subscription {
                Some(announcements) => tokio::select! {
                    announced = announcements.next() => if announced.is_none() {
                        subscription = None; // the connection dropped: resubscribe
                    },
                    () = tokio::time::sleep(poll) => {}
                },
                None => tokio::time::sleep(poll).await,
            }
            if !follow_once(&weak).await {
                return;
            }
        }
    });
}

/// A subscription to the policy channel, or `None` if Redis cannot be reached now.
async fn subscribe(
    client: &redis::Client,
    channel: &str,
    timeout: Duration,
) -> Option<PubSubStream> {
    let subscribing = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub.into_on_message())
    };
    match tokio::time::timeout(timeout, subscribing).await {
        Ok(Ok(stream)) => Some(stream),
        _ => None,
    }
}

/// Apply a newer stored version if there is one; false when the engine is gone.
async fn follow_once(weak: &Weak<Inner>) -> bool {
    let Some(inner) = weak.upgrade() else {
        return false;
    };
    if inner.handles.strong_count() == 0 {
        return false;
    }
    let mut connection = inner.connection.clone();
    match store::head(&mut connection, &inner.layout.policy()).await {
        // Another version (newer, or Redis lost ours: `sync_policy` sorts it out).
        Ok(stored) if stored != *inner.running.lock() => {
            let _writer = inner.apply_lock.lock().await;
            if let Err(error) = inner.sync_policy().await {
                inner.record_error(as_store_error(error));
            }
        }
        Ok(_) => {}
        Err(error) => inner.record_error(error),
    }
    true
}

/// A policy that cannot be applied, recorded as the store error it is.
fn as_store_error(error: Error) -> StoreError {
    match error {
        Error::Store(error) => error,
        other => StoreError {
            kind: StoreErrorKind::Corrupt,
            message: other.to_string(),
        },
    }
}

impl Inner {
    /// Bring this instance and Redis to one version, and return the snapshot this
    /// instance runs now. The caller holds `apply_lock`.
    ///
    /// - Redis holds a newer version, or the same number with another document (the
    ///   number was issued again after Redis lost writes): Redis is the truth, apply it.
    /// - Redis holds an older version, or none, although this instance runs a stored
    ///   one: Redis lost writes (restarted without persistence, restored, failed over
    ///   to a replica that lagged). The instance writes back the document it runs,
    ///   under its version, so the fleet carries on from the newest version an
    ///   instance saw rather than from a seed or a stale copy.
    pub(crate) async fn sync_policy(&self) -> Result<Arc<Snapshot>, Error> {
        let mut connection = self.connection.clone();
        let key = self.layout.policy();
        let running = self.running.lock().clone();
        let stored = store::head(&mut connection, &key).await?;
        if stored.version < running.version {
            let current = self.snapshot.load_full();
            let channel = self.layout.policy_channel();
            let back = (stored.version, running.version);
            // Written, or another instance wrote first: the next poll sees which.
            store::compare_and_set(
                &mut connection,
                &key,
                &channel,
                back,
                current.policy.document(),
            )
            .await?;
        } else if stored != running {
            if let Some((stamp, policy)) = store::read(&mut connection, &key).await? {
                if stamp.version >= running.version && stamp != running {
                    let previous = self.snapshot.load_full();
                    self.install(stamp, successor(&previous, policy));
                }
            }
        }
        Ok(self.snapshot.load_full())
    }

    /// Run `next` as the shared policy's version `stamp`, from the next request on.
    /// The caller holds `apply_lock`.
    pub(crate) fn install(&self, stamp: Stamp, next: Snapshot) {
        self.fallback.store(Arc::new(fallback::local_share(
            &next.policy,
            self.config.expected_instances,
            self.config.meter_source(),
        )));
        self.snapshot.store(Arc::new(next));
        let version = stamp.version;
        *self.running.lock() = stamp;
        self.policy_version.store(version, Ordering::Release);
        self.versions.send_replace(version);
    }
}
