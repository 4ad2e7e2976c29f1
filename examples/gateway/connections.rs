//! Connection hygiene: the accept loop, a cap on open connections, timeouts, and the
//! drain at shutdown.
//!
//! - Every connection must send a complete request head within `header_timeout` of
//!   opening, and of finishing its previous response: hyper starts that timer when it
//!   waits for a head, so the same limit closes slow senders (slowloris) and idle
//!   keep-alive connections.
//! - At most `max_connections` are open. At the cap, a new connection first makes room
//!   by closing the longest-open connection with no request in progress (a graceful
//!   close: one whose response is still being written finishes it); only when every
//!   connection is busy is the new one answered `503` and closed. So idle connections,
//!   however many, cannot lock ordinary clients out.
//! - An `accept` error (out of file descriptors, say) backs off, 5 ms doubling to 1 s,
//!   instead of retrying at once and spinning a core.
//! - At shutdown the listener is closed, every connection is asked to close once its
//!   request in progress is answered, and the drain waits up to a deadline.
//!
//! HTTP/2 is not served: hyper-util's auto builder would add h2c, but HTTP/2 keeps
//! idle connections open with pings and multiplexes streams, so the cap and the idle
//! rule above would need a second design. HTTP/1.1 is what OpenAI clients speak.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::app::App;

/// The connection limits, each a gateway flag.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; see the module docs for what happens beyond it.
    pub max_connections: usize,
    /// The longest wait for a complete request head, from opening or from the end of
    /// the previous response (so also the idle keep-alive timeout).
    pub header_timeout: Duration,
    /// The longest a request body may take to arrive, once its head has.
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// The peer of the connection a request came on, in the request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// How long a shutdown waits for requests in flight.
pub const DRAIN: Duration = Duration::from_secs(30);

/// Connections being answered 503 at once; beyond this, a refused connection is
/// closed without an answer so a flood cannot pile up writer tasks.
const MAX_REFUSING: usize = 256;

/// The refusal for a connection beyond the cap, written straight to the socket.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 101\r\n\r\n\
{\"error\":{\"message\":\"too many open connections\",\"type\":\"server_error\",\"code\":\"too_many_connections\"}}";

/// One open connection, as the cap sees it.
struct Open {
    id: u64,
    opened: Instant,
    /// Requests whose handler is running.
    active: Arc<AtomicUsize>,
    /// Asked to close (evicted, or shutting down).
    closing: Arc<AtomicBool>,
    close: Arc<Notify>,
}

/// The open connections and their counts.
pub struct Connections {
    open: Mutex<Vec<Open>>,
    next_id: AtomicU64,
    refusing: AtomicUsize,
    /// Connections refused (503 or closed) because every slot was busy.
    refused: AtomicU64,
    /// Idle connections closed to make room.
    evicted: AtomicU64,
    /// The number open, for the drain to wait on.
    count: watch::Sender<usize>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            open: Mutex::default(),
            next_id: AtomicU64::default(),
            refusing: AtomicUsize::default(),
            refused: AtomicU64::default(),
            evicted: AtomicU64::default(),
            count: watch::channel(0).0,
        }
    }
}

impl Connections {
    /// Connections open now.
    #[allow(dead_code)] // read by the end-to-end tests
    pub fn open(&self) -> usize {
        self.open.lock().len()
    }

    /// Connections refused because every slot was busy.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Idle connections closed to make room for new ones.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    fn publish(&self, open: usize) {
        self.count.send_replace(open);
    }

    /// Take a slot for a new connection, closing an idle one at the cap; `None` when
    /// every connection is busy.
    fn admit(self: &Arc<Self>, cap: usize) -> Option<Slot> {
        let mut open = self.open.lock();
        let closing = open
            .iter()
            .filter(|c| c.closing.load(Ordering::Relaxed))
            .count();
        if open.len() - closing >= cap {
            // The longest open is the likeliest idle keep-alive or slowloris.
            let victim = open
                .iter()
                .filter(|c| {
                    !c.closing.load(Ordering::Relaxed) && c.active.load(Ordering::Acquire) == 0
                })
                .min_by_key(|c| c.opened)?;
            victim.closing.store(true, Ordering::Relaxed);
            victim.close.notify_one();
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        // Evicted connections close at once unless they are mid-response; bound
        // those lingering so descriptors stay bounded too.
        if open.len() > cap + cap / 8 {
            return None;
        }
        let slot = Slot {
            connections: Arc::clone(self),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            active: Arc::new(AtomicUsize::new(0)),
            closing: Arc::new(AtomicBool::new(false)),
            close: Arc::new(Notify::new()),
        };
        open.push(Open {
            id: slot.id,
            opened: Instant::now(),
            active: Arc::clone(&slot.active),
            closing: Arc::clone(&slot.closing),
            close: Arc::clone(&slot.close),
        });
        self.publish(open.len());
        Some(slot)
    }

    /// Ask every connection to close once its request in progress is answered.
    fn close_all(&self) {
        for connection in self.open.lock().iter() {
            connection.closing.store(true, Ordering::Relaxed);
            connection.close.notify_one();
        }
    }

    /// Wait until no connection is open.
    async fn drained(&self) {
        let _ = self.count.subscribe().wait_for(|open| *open == 0).await;
    }

    /// Answer a connection beyond the cap with 503 and close it, off the accept loop.
    fn refuse(self: &Arc<Self>, mut stream: TcpStream) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if self.refusing.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
            self.refusing.fetch_sub(1, Ordering::AcqRel);
            return; // dropped: closed without an answer
        }
        let connections = Arc::clone(self);
        tokio::spawn(async move {
            let write = async {
                stream.write_all(BUSY).await?;
                stream.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
            connections.refusing.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// A connection's place among the open ones; dropping it frees the place, however
/// the connection ended.
struct Slot {
    connections: Arc<Connections>,
    id: u64,
    active: Arc<AtomicUsize>,
    closing: Arc<AtomicBool>,
    close: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock();
        open.retain(|c| c.id != self.id);
        self.connections.publish(open.len());
    }
}

/// Counts a request as in progress on its connection while its handler runs.
struct Active(Arc<AtomicUsize>);

impl Active {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Active(Arc::clone(count))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Work that outlives its connection: a forwarded completion whose client hung up
/// still runs to its end and commits. The drain waits for it too.
#[derive(Default)]
pub struct Background {
    running: AtomicUsize,
    count: watch::Sender<usize>,
}

/// One piece of background work; dropping it (however the task ends) counts it done.
pub struct Running(Arc<Background>);

impl Background {
    /// Count a task as running until the returned guard is dropped.
    pub fn start(self: &Arc<Self>) -> Running {
        let now = self.running.fetch_add(1, Ordering::AcqRel) + 1;
        self.count.send_replace(now);
        Running(Arc::clone(self))
    }

    async fn finished(&self) {
        let _ = self
            .count
            .subscribe()
            .wait_for(|running| *running == 0)
            .await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let now = self.0.running.fetch_sub(1, Ordering::AcqRel) - 1;
        self.0.count.send_replace(now);
    }
}

/// Pauses between failed `accept`s: 5 ms, doubling to 1 s.
pub struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MOST: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        Backoff(Self::FIRST)
    }

    pub fn next(&mut self) -> Duration {
        let pause = self.0;
        self.0 = (self.0 * 2).min(Self::MOST);
        pause
    }
}

/// Serve until `shutdown` completes, then stop accepting, let requests in flight and
/// background work finish (up to [`DRAIN`]), and call `App::finish`.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let connections = Arc::clone(&app.connections);
    let limits = app.limits;
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut backoff = Backoff::new();
    let mut last_error_said: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = Backoff::new();
                accepted
            }
            Err(e) => {
                // Out of descriptors, most often: wait for some to close. Said at
                // most once a second.
                if !last_error_said.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                    eprintln!("accept failed: {e}; backing off");
                    last_error_said = Some(Instant::now());
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff.next()) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        let Some(slot) = connections.admit(limits.max_connections) else {
            connections.refuse(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        let active = Arc::clone(&slot.active);
        let service = service_fn(move |mut request: Request<Incoming>| {
            let app = Arc::clone(&app);
            let active = Active::new(&active);
            request.extensions_mut().insert(Peer(peer));
            async move {
                let reply = app.route(request).await;
                drop(active);
                Ok::<_, Infallible>(reply)
            }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            tokio::pin!(connection);
            // A client that hangs up mid-request is not the gateway's error.
            tokio::select! {
                _ = connection.as_mut() => {}
                () = slot.close.notified() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    connections.close_all();
    let drained = async {
        connections.drained().await;
        // Then what clients left behind: their charges are still to be committed.
        app.background.finished().await;
    };
    tokio::select! {
        () = drained => {}
        () = tokio::time::sleep(DRAIN) => eprintln!("shutdown: requests still in flight after {DRAIN:?}"),
    }
    app.finish().await;
}
