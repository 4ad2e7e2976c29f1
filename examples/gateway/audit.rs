//! The audit log: one JSON object per line, for every admin request (allowed or
//! refused) and every key, workspace or policy change the engine reports (including
//! keys presented after their expiry).
//!
//! Lines are written off the request path: [`Audit::admin`] and [`Audit::event`] hand
//! a line to a bounded channel with `try_send` and return at once; a writer thread
//! turns lines into JSON and writes them out. When the channel is full a line is
//! dropped and counted, and the next flush writes an `audit.dropped` line saying how
//! many were lost. [`Audit::flush`] (called by the graceful shutdown once requests
//! have drained) waits until everything queued before it is written and flushed.
//!
//! Every line has `time` (RFC 3339, UTC), `source` (`admin`, `engine` or `audit`),
//! `actor` and `role` (null when unknown), `action`, `target` (null when none) and
//! `outcome` (`ok`, `refused` for 401/403, `invalid` for other 4xx, `error` for 5xx).
//! Admin lines add the HTTP `status` and, when not `ok`, a `reason`; engine lines add
//! the engine's `event` as tollgate serialises it.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use hyper::StatusCode;
use serde::Serialize;
use tollgate::{Event, EventKind};

/// Lines that may wait for the writer; beyond this they are dropped and counted.
pub const QUEUE_LINES: usize = 4096;

/// The longest [`Audit::flush`] waits for the writer.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where audit lines go. Cloning gives another handle on the same writer.
/// `Audit::default()` discards everything (no writer).
#[derive(Clone, Default)]
pub struct Audit {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    queue: SyncSender<Message>,
    counts: Arc<Counts>,
    destination: String,
}

#[derive(Default)]
struct Counts {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

enum Message {
    Line(Box<Line>),
    /// Write and flush everything before this, then answer.
    Flush(SyncSender<()>),
}

/// One line of the log.
#[derive(Serialize)]
struct Line {
    time: String,
    source: &'static str,
    actor: Option<String>,
    role: Option<&'static str>,
    action: String,
    target: Option<String>,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<Event>,
}

/// What the admin API knows about one request, filled in as it is handled.
#[derive(Default)]
pub struct AdminRecord {
    /// The admin key's name, once authenticated.
    pub actor: Option<String>,
    /// Its role, once authenticated.
    pub role: Option<&'static str>,
    /// What was attempted, e.g. `key.create`.
    pub action: String,
    /// The workspace or key id it was about.
    pub target: Option<String>,
    /// Why it was refused or failed.
    pub reason: Option<String>,
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn now() -> String {
    rfc3339(DateTime::<Utc>::from(SystemTime::now()))
}

/// `ok`, `refused`, `invalid` or `error`, by HTTP status.
fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "ok",
        401 | 403 => "refused",
        400..=499 => "invalid",
        _ => "error",
    }
}

impl Audit {
    /// Append to the file at `path` (created if missing).
    pub fn to_file(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Self::to_writer(Box::new(file), path.display().to_string(), QUEUE_LINES)
    }

    /// Write to standard output.
    pub fn to_stdout() -> io::Result<Self> {
        Self::to_writer(Box::new(io::stdout()), "stdout".into(), QUEUE_LINES)
    }

    /// Write to `out` from a writer thread; at most `capacity` lines wait for it.
    pub fn to_writer(
        out: Box<dyn Write + Send>,
        destination: String,
        capacity: usize,
    ) -> io::Result<Self> {
        let (queue, lines) = sync_channel(capacity);
        let counts = Arc::new(Counts::default());
        let writer_counts = Arc::clone(&counts);
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || write_lines(lines, BufWriter::new(out), &writer_counts))?;
        Ok(Audit {
            inner: Some(Arc::new(Inner {
                queue,
                counts,
                destination,
            })),
        })
    }

    /// Where lines go: a path, `stdout`, or `off`.
    pub fn destination(&self) -> &str {
        self.inner
            .as_ref()
            .map_or("off", |i| i.destination.as_str())
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.count(|c| &c.written)
    }

    /// Lines dropped because the queue was full (or the writer gone).
    pub fn dropped(&self) -> u64 {
        self.count(|c| &c.dropped)
    }

    /// Lines the writer failed to write (an I/O error).
    pub fn failed(&self) -> u64 {
        self.count(|c| &c.failed)
    }

    fn count(&self, which: impl Fn(&Counts) -> &AtomicU64) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| which(&i.counts).load(Ordering::Relaxed))
    }

    /// Queue a line; never waits.
    fn push(&self, line: Line) {
        let Some(inner) = &self.inner else { return };
        match inner.queue.try_send(Message::Line(Box::new(line))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                inner.counts.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Record one admin request and the status it was answered with.
    pub fn admin(&self, record: AdminRecord, status: StatusCode) {
        let outcome = outcome(status);
        self.push(Line {
            time: now(),
            source: "admin",
            actor: record.actor,
            role: record.role,
            action: record.action,
            target: record.target,
            outcome,
            status: Some(status.as_u16()),
            reason: if outcome == "ok" { None } else { record.reason },
            event: None,
        });
    }

    /// Record an engine event if it is a key, workspace or policy change; other
    /// events (budget alerts, sampled denials) are not audit material.
    pub fn event(&self, event: &Event) {
        let (action, scope) = match &event.kind {
            EventKind::KeyCreated { scope } => ("key_created", Some(scope)),
            EventKind::KeyRotated { scope, .. } => ("key_rotated", Some(scope)),
            EventKind::KeyRevoked { scope } => ("key_revoked", Some(scope)),
            EventKind::KeyExpired { scope } => ("key_expired", Some(scope)),
            EventKind::WorkspaceCreated { scope } => ("workspace_created", Some(scope)),
            EventKind::WorkspaceUpdated { scope } => ("workspace_updated", Some(scope)),
            EventKind::WorkspaceDeleted { scope } => ("workspace_deleted", Some(scope)),
            EventKind::PolicyApplied { .. } => ("policy_applied", None),
            _ => return,
        };
        if self.inner.is_none() {
            return;
        }
        self.push(Line {
            time: rfc3339(event.at.to_datetime()),
            source: "engine",
            actor: event.actor.clone(),
            role: None,
            action: action.into(),
            target: scope.and_then(|s| s.key.clone().or_else(|| s.workspace.clone())),
            outcome: "ok",
            status: None,
            reason: None,
            event: Some(event.clone()),
        });
    }

    /// Wait (up to 10 s) until every line queued before this call is written and
    /// flushed. Blocks the calling thread: for shutdown, not for requests.
    pub fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let (done, finished) = sync_channel(1);
        let mut message = Message::Flush(done);
        // The queue may be full: wait for room rather than drop the flush.
        loop {
            match inner.queue.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    message = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => {
                    eprintln!("audit log: could not flush (writer busy or gone)");
                    return;
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if finished.recv_timeout(left).is_err() {
            eprintln!("audit log: flush did not finish within {FLUSH_TIMEOUT:?}");
        }
    }
}

/// The writer thread: lines until every handle is gone. Flushes whenever the queue
/// runs empty, and on request.
fn write_lines(
    lines: Receiver<Message>,
    mut out: BufWriter<Box<dyn Write + Send>>,
    counts: &Counts,
) {
    let mut reported_drops = 0;
    loop {
        let message = match lines.try_recv() {
            Ok(message) => message,
            Err(TryRecvError::Empty) => {
                let _ = out.flush();
                match lines.recv() {
                    Ok(message) => message,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        match message {
            Message::Line(line) => write_line(&mut out, &line, counts),
            Message::Flush(done) => {
                let dropped = counts.dropped.load(Ordering::Relaxed);
                if dropped > reported_drops {
                    let line = Line {
                        time: now(),
                        source: "audit",
                        actor: None,
                        role: None,
                        action: "audit.dropped".into(),
                        target: None,
                        outcome: "error",
                        status: None,
                        reason: Some(format!(
                            "{} line(s) dropped since the last report: the queue was full",
                            dropped - reported_drops
                        )),
                        event: None,
                    };
                    write_line(&mut out, &line, counts);
                    reported_drops = dropped;
                }
                if let Err(e) = out.flush() {
                    eprintln!("audit log: flush failed: {e}");
                }
                let _ = done.send(());
            }
        }
    }
    let _ = out.flush();
}

fn write_line(out: &mut impl Write, line: &Line, counts: &Counts) {
    let written = serde_json::to_writer(&mut *out, line)
        .map_err(io::Error::from)
        .and_then(|()| out.write_all(b"\n"));
    match written {
        Ok(()) => {
            counts.written.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            // Said once; the count tells the rest.
            if counts.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("audit log: write failed: {e}");
            }
        }
    }
}
