//! Request logs: one JSON line per API request (`/v1/…`), and the recent ones of each
//! workspace for `GET /admin/workspaces/{id}/requests`.
//!
//! A line has `seq` (increasing), `time` (RFC 3339, when the request arrived),
//! `request_id` (also the response's `x-request-id` header), `route`, `key_id` and
//! `workspace` (null when the key is unknown), `model`, `status`, `code` (the denial's
//! code, or the error's), `input_tokens`, `output_tokens` and `cost_usd` as charged
//! (null when nothing was), `latency_ms` (to the end of the answer: a stream's last
//! event) and `stream`.
//!
//! Each request carries a [`Trace`] in its extensions; the handlers fill it in as they
//! learn the facts, and the line is written when the last handle on it is dropped,
//! which for a stream is when its pump has committed. Writing goes through the same
//! bounded queue and rotating writer as the audit log (`jsonl.rs`), off the request
//! path. The most recent [`RECENT_PER_WORKSPACE`] lines of each workspace are also
//! kept in memory for the admin route.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use hyper::Request;
use parking_lot::Mutex;
use serde::Serialize;
use tollgate::{Decimal, Denial, Policy, Receipt};

use crate::jsonl::{JsonLines, Rotation};

/// Lines that may wait for the writer; beyond this they are dropped and counted.
pub const QUEUE_LINES: usize = 8192;

/// Lines kept in memory per workspace for the admin route.
pub const RECENT_PER_WORKSPACE: usize = 1000;

/// One request, as logged.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestLine {
    pub seq: u64,
    pub time: String,
    pub request_id: String,
    pub route: &'static str,
    pub key_id: Option<String>,
    pub workspace: Option<String>,
    pub model: Option<String>,
    pub status: u16,
    pub code: Option<String>,
    pub input_tokens: Option<u32>,
    pub output_tokens: Option<u32>,
    pub cost_usd: Option<Decimal>,
    pub latency_ms: u64,
    pub stream: bool,
}

/// Where request lines go, and the recent ones by workspace.
#[derive(Default)]
pub struct RequestLog {
    lines: JsonLines<RequestLine>,
    recent: Mutex<HashMap<String, VecDeque<Arc<RequestLine>>>>,
    next_seq: AtomicU64,
    /// Random per process, so request ids differ across restarts and instances.
    id_prefix: u32,
}

impl RequestLog {
    /// Lines kept in memory only.
    pub fn in_memory() -> Self {
        RequestLog {
            id_prefix: random_u32(),
            ..RequestLog::default()
        }
    }

    /// Lines appended to the file at `path` (rotated by `rotation`), `-` for standard
    /// output; and kept in memory.
    pub fn to_path(path: &str, rotation: Rotation) -> io::Result<Self> {
        let lines = match path {
            "-" => JsonLines::to_writer(
                Box::new(io::stdout()),
                "stdout".into(),
                QUEUE_LINES,
                dropped_line,
            )?,
            path => JsonLines::to_file(Path::new(path), rotation, QUEUE_LINES, dropped_line)?,
        };
        Ok(RequestLog {
            lines,
            ..RequestLog::in_memory()
        })
    }

    /// Where lines go: a path, `stdout`, or `off` (memory only).
    pub fn destination(&self) -> &str {
        self.lines.destination()
    }

    /// Lines written, and dropped because the queue was full.
    pub fn counts(&self) -> (u64, u64) {
        (self.lines.written(), self.lines.dropped())
    }

    /// Write everything queued (at shutdown).
    pub fn flush(&self) {
        self.lines.flush();
    }

    /// Start tracing a request on `route`.
    pub fn start(self: &Arc<Self>, route: &'static str) -> Trace {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed) + 1;
        Trace(Arc::new(Traced {
            log: Some(Arc::clone(self)),
            started: Instant::now(),
            line: Mutex::new(RequestLine {
                seq,
                time: DateTime::<Utc>::from(SystemTime::now())
                    .to_rfc3339_opts(SecondsFormat::Millis, true),
                request_id: format!("req_{:08x}{seq:012x}", self.id_prefix),
                route,
                ..RequestLine::default()
            }),
        }))
    }

    fn record(&self, line: RequestLine) {
        let line = Arc::new(line);
        if let Some(workspace) = &line.workspace {
            let mut recent = self.recent.lock();
            let lines = recent.entry(workspace.clone()).or_default();
            if lines.len() == RECENT_PER_WORKSPACE {
                lines.pop_front();
            }
            lines.push_back(Arc::clone(&line));
        }
        self.lines.push(Arc::unwrap_or_clone(line));
    }

    /// Up to `limit` of a workspace's recent lines, newest first, older than `before`
    /// (a `seq`) if given; and whether there are more beyond them.
    pub fn recent(
        &self,
        workspace: &str,
        limit: usize,
        before: Option<u64>,
    ) -> (Vec<Arc<RequestLine>>, bool) {
        let recent = self.recent.lock();
        let Some(lines) = recent.get(workspace) else {
            return (Vec::new(), false);
        };
        let mut older = lines
            .iter()
            .rev()
            .filter(|line| before.map_or(true, |before| line.seq < before));
        let page: Vec<_> = older.by_ref().take(limit).cloned().collect();
        let more = older.next().is_some();
        (page, more)
    }
}

fn dropped_line(count: u64) -> RequestLine {
    RequestLine {
        time: DateTime::<Utc>::from(SystemTime::now()).to_rfc3339_opts(SecondsFormat::Millis, true),
        route: "log.dropped",
        code: Some(format!(
            "{count} request line(s) dropped: the queue was full"
        )),
        ..RequestLine::default()
    }
}

fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    // Only for telling processes apart in request ids: a fixed prefix is harmless.
    let _ = getrandom::fill(&mut bytes);
    u32::from_le_bytes(bytes)
}

/// One request's line while it is being handled; cloned into whatever finishes the
/// request (a stream's pump). Written when the last clone is dropped.
#[derive(Clone)]
pub struct Trace(Arc<Traced>);

struct Traced {
    log: Option<Arc<RequestLog>>,
    started: Instant,
    line: Mutex<RequestLine>,
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Some(log) = &self.log {
            let mut line = std::mem::take(self.line.get_mut());
            if line.status == 0 {
                // Dropped before an answer was sent: the client hung up (nginx's 499).
                line.status = 499;
                line.code
                    .get_or_insert_with(|| "client_closed_request".into());
            }
            line.latency_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            log.record(line);
        }
    }
}

impl Trace {
    /// The request's trace, or one that records nothing if it has none.
    pub fn of<B>(request: &Request<B>) -> Trace {
        request
            .extensions()
            .get::<Trace>()
            .cloned()
            .unwrap_or_else(|| {
                Trace(Arc::new(Traced {
                    log: None,
                    started: Instant::now(),
                    line: Mutex::default(),
                }))
            })
    }

    /// The id sent back in `x-request-id`.
    pub fn request_id(&self) -> String {
        self.0.line.lock().request_id.clone()
    }

    /// The model the client asked for, cut to 128 characters: it is the client's text,
    /// kept in memory with the workspace's recent lines even when refused.
    pub fn model(&self, model: &str) {
        self.0.line.lock().model = Some(model.chars().take(128).collect());
    }

    /// Admitted for this key, in this workspace.
    pub fn admitted(&self, key_id: &str, workspace: &str) {
        let mut line = self.0.line.lock();
        line.key_id = Some(key_id.to_owned());
        line.workspace = Some(workspace.to_owned());
    }

    /// Refused: its code, and whose key it was if the policy knows the secret.
    pub fn denied(&self, denial: &Denial, secret: &str, policy: &Policy) {
        let owner = key_of(policy, secret);
        let mut line = self.0.line.lock();
        line.code = Some(denial.code().to_owned());
        if let Some((key, workspace)) = owner {
            line.key_id = Some(key);
            line.workspace = Some(workspace);
        }
    }

    /// Charged as this receipt says.
    pub fn charged(&self, receipt: &Receipt) {
        let mut line = self.0.line.lock();
        line.input_tokens = Some(receipt.input_tokens());
        line.output_tokens = Some(receipt.output_tokens());
        line.cost_usd = Some(receipt.cost());
    }

    pub fn streaming(&self) {
        self.0.line.lock().stream = true;
    }

    /// The response's status, and for an error its code if none is set yet.
    pub fn answered(&self, status: u16, code: Option<&str>) {
        let mut line = self.0.line.lock();
        line.status = status;
        if line.code.is_none() {
            line.code = code.map(str::to_owned);
        }
    }
}

/// The key id and workspace of the key with this secret (current or rotated out), if
/// any: only for requests already refused.
fn key_of(policy: &Policy, secret: &str) -> Option<(String, String)> {
    crate::caller::find_key(policy.document(), secret)
        .map(|key| (key.id.clone(), key.workspace.clone()))
}
