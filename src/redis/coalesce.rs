//! Coalescing: concurrent reserves (and commits) of one instance share one function
//! call on a standalone server, as Gubernator batches requests for one owner.
//!
//! A request is sent at once when no batch of its function is in flight; otherwise it
//! waits for the one in flight to be answered and goes with every request that arrived
//! meanwhile (at most [`MAX_BATCH`]). A lone request therefore waits for nothing, and
//! under load one call (one `FCALL`, one `TIME`, one load and one write of each scope
//! the batch touches: the org, its wallet, a busy workspace) serves many requests.
//! Redis decides the requests of a batch one after the other, each exactly on what the
//! ones before it left, as separate calls would; a request that fails alone (a corrupt
//! counter) fails alone.
//!
//! The batch is sent from a spawned task: a caller that goes away (its future dropped)
//! leaves the others' call running, and the reply for it is dropped by the task that
//! finishes its reserve or commit (see `Detach`), which releases or settles it.

use std::sync::Arc;

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

/// Batches of one function in flight at once: one being run while the next is sent,
/// so Redis does not wait for a round trip between batches.
const MAX_IN_FLIGHT: usize = 2;

struct Waiting {
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
    /// One queue per batched function: `reserve`, `commit`.
    queues: [Mutex<Queue>; 2],
}

impl Coalescer {
    pub(crate) fn new(connection: Connection) -> Arc<Self> {
        Arc::new(Coalescer {
            connection,
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
    /// the instance's concurrent requests of the same function.
    pub(crate) async fn call(
        self: &Arc<Self>,
        function: Function,
        call: Call,
    ) -> Result<Value, StoreError> {
        let (reply, answer) = oneshot::channel();
        let batch = {
            let mut queue = self.queue(function).lock();
            queue.waiting.push(Waiting { call, reply });
            if queue.in_flight < MAX_IN_FLIGHT {
                queue.in_flight += 1;
                Some(take_batch(&mut queue))
            } else {
                None
            }
        };
        if let Some(batch) = batch {
            let coalescer = Arc::clone(self);
            tokio::spawn(async move { coalescer.send(function, batch).await });
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError {
                kind: StoreErrorKind::Transient,
                message: format!("{}: the batch was dropped unsent", function.name()),
            })
        })
    }

    /// Send `batch`, answer its requests, then the batches that queued meanwhile,
    /// until none waits.
    async fn send(&self, function: Function, mut batch: Vec<Waiting>) {
        // However this task ends (a panic, its runtime shutting down), it is no longer
        // in flight: later requests must not wait for it.
        struct Sending<'a>(&'a Mutex<Queue>, bool);
        impl Drop for Sending<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.lock().in_flight -= 1;
                }
            }
        }
        let mut sending = Sending(self.queue(function), false);
        loop {
            let calls: Vec<&Call> = batch.iter().map(|waiting| &waiting.call).collect();
            let mut connection = self.connection.clone();
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
            let mut queue = sending.0.lock();
            if queue.waiting.is_empty() {
                queue.in_flight -= 1;
                sending.1 = true;
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
