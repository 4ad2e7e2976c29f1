//! The audit log: one JSON object per line, for every admin request (allowed or
//! refused) and every key, workspace or policy change the engine reports (including
//! keys presented after their expiry).
//!
//! Lines are written off the request path through a bounded queue and a writer thread
//! that rotates the file by size (`jsonl.rs`). When the queue is full a line is
//! dropped and counted, and the next flush writes an `audit.dropped` line saying how
//! many were lost. [`Audit::flush`] (called by the graceful shutdown once requests
//! have drained) waits until everything queued before it is written and flushed.
//!
//! Anyone can send admin requests without a key, so those refusals are kept from
//! flooding the log or crowding out real actions: a path is cut to
//! [`MAX_TARGET`] characters; each source address gets [`PER_SOURCE`] lines a minute,
//! and the rest are counted and reported in one `audit.suppressed` line per source
//! and minute (written when that source comes back after its minute, or at the next
//! flush); and such lines may take only half of the queue, so actions by admin keys,
//! and engine events, always find room.
//!
//! Every line has `time` (RFC 3339, UTC), `source` (`admin`, `engine` or `audit`),
//! `actor` and `role` (null when unknown), `action`, `target` (null when none),
//! `workspace` (the workspace the action was about, null when none) and `outcome`
//! (`ok`, `refused` for 401/403, `invalid` for other 4xx, `error` for 5xx). Admin lines
//! add the HTTP `status`, `credential` (`admin_key` or `member`, once authenticated)
//! and, when not `ok`, a `reason`; engine lines add the engine's `event` as tollgate
//! serialises it. A member's `actor` is its member id and its `role` the one it holds
//! in that `workspace` (null where it holds none).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use hyper::StatusCode;
use parking_lot::Mutex;
use serde::Serialize;
use tollgate::{Event, EventKind};

use crate::jsonl::{JsonLines, Rotation};

/// Lines that may wait for the writer; beyond this they are dropped and counted.
pub const QUEUE_LINES: usize = 4096;

/// Parts in 1,000 of the queue that unauthenticated refusals may take.
const REFUSED_SHARE: usize = 500;

/// The most of a refused request's path kept in its line.
pub const MAX_TARGET: usize = 128;

/// Lines a minute written for one source's unauthenticated refusals.
pub const PER_SOURCE: u32 = 20;

/// Sources tracked at once; beyond this, new sources share one count.
const MAX_SOURCES: usize = 1024;

/// Where audit lines go. Cloning gives another handle on the same writer.
/// `Audit::default()` discards everything (no writer).
#[derive(Clone, Default)]
pub struct Audit {
    lines: JsonLines<Line>,
    throttle: Arc<Throttle>,
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
    /// The workspace the action was about, when it was about one.
    workspace: Option<String>,
    /// `admin_key` or `member`, once authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    credential: Option<&'static str>,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<Event>,
    /// The client's address, for refusals of requests without a valid key.
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<IpAddr>,
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
    /// The workspace it was about (a key's workspace for a key), when known.
    pub workspace: Option<String>,
    /// How the caller authenticated: `admin_key` or `member`.
    pub credential: Option<&'static str>,
    /// Why it was refused or failed.
    pub reason: Option<String>,
    /// The client's address.
    pub peer: Option<IpAddr>,
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
    /// Append to the file at `path` (created if missing), rotated by `rotation`.
    pub fn to_file(path: &Path, rotation: Rotation) -> io::Result<Self> {
        Ok(Audit {
            lines: JsonLines::to_file(path, rotation, QUEUE_LINES, dropped_line)?,
            throttle: Arc::default(),
        })
    }

    /// Write to standard output.
    pub fn to_stdout() -> io::Result<Self> {
        Ok(Audit {
            lines: JsonLines::to_writer(
                Box::new(io::stdout()),
                "stdout".into(),
                QUEUE_LINES,
                dropped_line,
            )?,
            throttle: Arc::default(),
        })
    }

    /// Where lines go: a path, `stdout`, or `off`.
    pub fn destination(&self) -> &str {
        self.lines.destination()
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.lines.written()
    }

    /// Lines dropped because the queue was full (or the writer gone).
    pub fn dropped(&self) -> u64 {
        self.lines.dropped()
    }

    /// Lines the writer failed to write (an I/O error).
    pub fn failed(&self) -> u64 {
        self.lines.failed()
    }

    /// Unauthenticated refusals counted instead of written, so far.
    pub fn suppressed(&self) -> u64 {
        self.throttle
            .suppressed_total
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Record one admin request and the status it was answered with.
    pub fn admin(&self, record: AdminRecord, status: StatusCode) {
        if !self.lines.is_on() {
            return;
        }
        let outcome = outcome(status);
        // Without a valid key, the request is anyone's: throttled per source, and
        // kept to its share of the queue.
        let anonymous = record.actor.is_none();
        if anonymous {
            let source = record.peer.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let (write, summaries) = self.throttle.admit(source, Instant::now());
            for (source, count) in summaries {
                self.lines.push(suppressed_line(source, count));
            }
            if !write {
                return;
            }
        }
        let line = Line {
            time: now(),
            source: "admin",
            actor: record.actor,
            role: record.role,
            action: record.action,
            target: record.target.map(|t| cut(t, MAX_TARGET)),
            workspace: record.workspace.map(|w| cut(w, MAX_TARGET)),
            credential: record.credential,
            outcome,
            status: Some(status.as_u16()),
            reason: if outcome == "ok" {
                None
            } else {
                record.reason.map(|r| cut(r, 4 * MAX_TARGET))
            },
            event: None,
            peer: record.peer,
        };
        if anonymous {
            self.lines.push_within(line, REFUSED_SHARE);
        } else {
            self.lines.push(line);
        }
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
        if !self.lines.is_on() {
            return;
        }
        self.lines.push(Line {
            time: rfc3339(event.at.to_datetime()),
            source: "engine",
            actor: event.actor.clone(),
            role: None,
            action: action.into(),
            target: scope.and_then(|s| s.key.clone().or_else(|| s.workspace.clone())),
            workspace: scope.and_then(|s| s.workspace.clone()),
            credential: None,
            outcome: "ok",
            status: None,
            reason: None,
            event: Some(event.clone()),
            peer: None,
        });
    }

    /// Report what was suppressed, then wait (up to 10 s) until every line queued
    /// before this call is written and flushed. Blocks the calling thread: for
    /// shutdown, not for requests.
    pub fn flush(&self) {
        for (source, count) in self.throttle.take_all() {
            self.lines.push(suppressed_line(source, count));
        }
        self.lines.flush();
    }
}

/// `text`, cut to at most `max` bytes on a character boundary, with `…` when cut.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

fn dropped_line(count: u64) -> Line {
    Line {
        time: now(),
        source: "audit",
        actor: None,
        role: None,
        action: "audit.dropped".into(),
        target: None,
        workspace: None,
        credential: None,
        outcome: "error",
        status: None,
        reason: Some(format!(
            "{count} line(s) dropped since the last report: the queue was full"
        )),
        event: None,
        peer: None,
    }
}

fn suppressed_line(source: IpAddr, count: u64) -> Line {
    Line {
        time: now(),
        source: "audit",
        actor: None,
        role: None,
        action: "audit.suppressed".into(),
        target: None,
        workspace: None,
        credential: None,
        outcome: "refused",
        status: None,
        reason: Some(format!(
            "{count} more refused request(s) without a valid admin key from this source \
             within a minute; counted, not written one by one"
        )),
        event: None,
        peer: Some(source),
    }
}

/// Per-source counts of unauthenticated refusals, by minute.
#[derive(Default)]
struct Throttle {
    sources: Mutex<HashMap<IpAddr, Window>>,
    suppressed_total: std::sync::atomic::AtomicU64,
}

struct Window {
    started: Instant,
    written: u32,
    suppressed: u64,
}

/// The length of a source's window.
const WINDOW: Duration = Duration::from_secs(60);

impl Throttle {
    /// Whether to write this source's refusal now, and the suppressed counts of
    /// windows that have ended (this source's, or others' evicted to make room).
    fn admit(&self, source: IpAddr, now: Instant) -> (bool, Vec<(IpAddr, u64)>) {
        let mut sources = self.sources.lock();
        let mut ended = Vec::new();
        if !sources.contains_key(&source) && sources.len() >= MAX_SOURCES {
            // Make room from windows that are over; if none is, the newcomer shares
            // the catch-all entry.
            sources.retain(|&ip, w| {
                let over = now.duration_since(w.started) >= WINDOW;
                if over && w.suppressed > 0 {
                    ended.push((ip, w.suppressed));
                }
                !over
            });
        }
        let key = if sources.contains_key(&source) || sources.len() < MAX_SOURCES {
            source
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let window = sources.entry(key).or_insert(Window {
            started: now,
            written: 0,
            suppressed: 0,
        });
        if now.duration_since(window.started) >= WINDOW {
            if window.suppressed > 0 {
                ended.push((key, window.suppressed));
            }
            *window = Window {
                started: now,
                written: 0,
                suppressed: 0,
            };
        }
        let write = window.written < PER_SOURCE;
        if write {
            window.written += 1;
        } else {
            window.suppressed += 1;
            self.suppressed_total
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        (write, ended)
    }

    /// Every suppressed count not yet reported, which are then reset.
    fn take_all(&self) -> Vec<(IpAddr, u64)> {
        let mut sources = self.sources.lock();
        let mut counts = Vec::new();
        for (&ip, window) in sources.iter_mut() {
            if window.suppressed > 0 {
                counts.push((ip, window.suppressed));
                window.suppressed = 0;
            }
        }
        counts
    }
}
