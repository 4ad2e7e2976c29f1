//! Coalescing: concurrent reserves (and commits) of one instance share one function
//! call on a standalone server, as Gubernator batches requests for one owner.
//!
//! A request is sent at once when fewer than [`MAX_IN_FLIGHT`] calls of its function
//! are in flight; otherwise it waits for one of them to be answered and goes with every
//! request that arrived meanwhile (at most [`MAX_BATCH`]). A lone request therefore
//! waits for nothing, and under load one call (one `FCALL`, one `TIME`, one load and
//! one write of each scope the batch touches: the org, its wallet, a busy workspace)
//! serves many requests. Redis decides the requests of a batch one after the other,
//! each exactly on what the ones before it left, as separate calls would; a request
//! that fails alone (a corrupt counter) fails alone.
//!
//! Batches are sent from tasks spawned on the runtime the engine was connected on: a
//! caller that goes away (its future dropped) leaves the others' call running, and the
//! reply for it is dropped by the task that finishes its reserve or commit (see
//! `Detach`), which releases or settles it. A request waits in the queue at most
//! `response_timeout`: when Redis stalls, requests fail as fast as uncoalesced ones
//! would (a request not yet sent is taken out of the queue, so it never lands later and
//! needs no release), instead of queueing behind timed-out batches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::Value;
use tokio::sync::oneshot;

use crate::denial::{StoreError, StoreErrorKind};
use crate::redis::calls::{unbatch, Call};
use crate::redis::conn::Connection;
use crate::redis::scripts::{self, Function};

/// Most requests in one call: Redis runs a call to its end before any other client's
/// command, so a batch is kept short enough not to stall them (a few milliseconds).
pub(crate) const MAX_BATCH: usize = 32;

/// Batches of one function in flight at once: some being run while the next are
/// sent, so Redis does not wait for a round trip between batches.
const MAX_IN_FLIGHT: usize = 4;

/// A request's call that failed, and whether it may still have reached Redis (and
/// taken something there): a reserve that may have landed is released by id.
pub(crate) struct Failed {
    pub(crate) error: StoreError,
    pub(crate) maybe_landed: bool,
}

impl Failed {
    /// A call that was sent (or may have been): its reply is lost, not its effect.
    pub(crate) fn maybe_landed(error: StoreError) -> Self {
        Failed {
            error,
            maybe_landed: true,
        }
    }
}

struct Waiting {
    /// Tells this request apart in the queue (to take it out when it waited too long).
    ticket: u64,
    call: Call,
    reply: oneshot::Sender<Result<Value, StoreError>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    in_flight: usize,
}

/// The batching of one engine's `reserve` and `commit` calls.
pub(crate) struct Coalescer {
    connection: Connection,
    /// Where senders run: the runtime the engine was connected on, which drives its
    /// connection (a caller's own runtime may stop being polled while a sender that
    /// also carries other callers' requests still needs it).
    runtime: tokio::runtime::Handle,
    /// How long a request may wait to be sent (the connection's response timeout).
    patience: Duration,
    tickets: AtomicU64,
    /// One queue per batched function: `reserve`, `commit`.
    queues: [Mutex<Queue>; 2],
}

impl Coalescer {
    pub(crate) fn new(
        connection: Connection,
        runtime: tokio::runtime::Handle,
        patience: Duration,
    ) -> Arc<Self> {
        Arc::new(Coalescer {
            connection,
            runtime,
            patience,
            tickets: AtomicU64::new(0),
            queues: Default::default(),
        })
    }

    fn queue(&self, function: Function) -> &Mutex<Queue> {
        match function {
            Function::Reserve => &self.queues[0],
            Function::Commit => &self.queues[1],
            other => unreachable!("{other:?} is not batched"),
        }
    }

    /// Run one request's `call` of `function` (`reserve` or `commit`), in a batch with
    /// the instance's concurrent requests of the same function. A failure says whether
    /// the call may have reached Redis: one taken out of the queue unsent did not.
    pub(crate) async fn call(
        self: &Arc<Self>,
        function: Function,
        call: Call,
    ) -> Result<Value, Failed> {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let (reply, mut answer) = oneshot::channel();
        let batch = {
            let mut queue = self.queue(function).lock();
            queue.waiting.push(Waiting {
                ticket,
                call,
                reply,
            });
            if queue.in_flight < MAX_IN_FLIGHT {
                queue.in_flight += 1;
                // From here the slot is the sender's: whatever becomes of it (even a
                // task dropped unstarted), its guard gives the slot back.
                Some((
                    Sending {
                        coalescer: Arc::clone(self),
                        function,
                        finished: false,
                    },
                    take_batch(&mut queue),
                ))
            } else {
                None
            }
        };
        if let Some((sending, batch)) = batch {
            drop(self.runtime.spawn(sending.send(batch)));
        }
        let transient = |what: &str| StoreError {
            kind: StoreErrorKind::Transient,
            message: format!("{}: {what}", function.name()),
        };
        let answered = match tokio::time::timeout(self.patience, &mut answer).await {
            Ok(answered) => answered,
            Err(_) if self.withdraw(function, ticket) => {
                return Err(Failed {
                    error: transient(&format!(
                        "not sent within {:?} (Redis is slow to answer the calls before it)",
                        self.patience
                    )),
                    maybe_landed: false,
                });
            }
            // Already in a call, which its own response timeout ends: wait that long
            // again at most, so no caller waits without bound whatever the sender's
            // fate. A reply lost this way is handled as any lost reply (a reserve is
            // released by id, a commit queued).
            Err(_) => match tokio::time::timeout(self.patience, &mut answer).await {
                Ok(answered) => answered,
                Err(_) => Ok(Err(transient("no answer from the call carrying it"))),
            },
        };
        answered
            .unwrap_or_else(|_| Err(transient("the call carrying it was abandoned")))
            .map_err(Failed::maybe_landed)
    }

    /// Take request `ticket` out of the queue if it is still there (not yet sent).
    fn withdraw(&self, function: Function, ticket: u64) -> bool {
        let mut queue = self.queue(function).lock();
        let at = queue.waiting.iter().position(|w| w.ticket == ticket);
        at.map(|at| queue.waiting.remove(at)).is_some()
    }
}

/// A batch sender's slot among the `MAX_IN_FLIGHT`. However the sender ends (a
/// panic, its runtime shutting down, its task dropped before it ever ran), the slot is
/// given back; and if no other sender is left, nobody would send what waits: those
/// requests fail now (dropping a request's reply sender answers it with an error, and
/// its caller releases what it may hold) rather than wait for a later request to
/// start a sender.
struct Sending {
    coalescer: Arc<Coalescer>,
    function: Function,
    finished: bool,
}

impl Drop for Sending {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut queue = self.coalescer.queue(self.function).lock();
        queue.in_flight -= 1;
        if queue.in_flight == 0 {
            queue.waiting.clear();
        }
    }
}

impl Sending {
    /// Send `batch`, answer its requests, then the batches that queued meanwhile,
    /// until none waits.
    async fn send(mut self, mut batch: Vec<Waiting>) {
        let function = self.function;
        loop {
            let calls: Vec<&Call> = batch.iter().map(|waiting| &waiting.call).collect();
            let mut connection = self.coalescer.connection.clone();
            let replies = scripts::call_batch(&mut connection, function, &calls)
                .await
                .and_then(|reply| unbatch(function.name(), reply, batch.len()));
            match replies {
                Ok(replies) => {
                    for (waiting, reply) in batch.into_iter().zip(replies) {
                        // A caller that went away drops its answer: nothing to do here.
                        let _ = waiting.reply.send(reply);
                    }
                }
                Err(error) => {
                    for waiting in batch {
                        let _ = waiting.reply.send(Err(error.clone()));
                    }
                }
            }
            let mut queue = self.coalescer.queue(function).lock();
            if queue.waiting.is_empty() {
                queue.in_flight -= 1;
                drop(queue);
                self.finished = true;
                return;
            }
            batch = take_batch(&mut queue);
        }
    }
}

fn take_batch(queue: &mut Queue) -> Vec<Waiting> {
    let count = queue.waiting.len().min(MAX_BATCH);
    queue.waiting.drain(..count).collect()
}
