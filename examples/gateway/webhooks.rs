//! Webhooks for budget alerts and workspace events, and the gateway's event sink.
//!
//! [`GatewayEvents`] is the [`EventSink`] the engine reports to: key, workspace and
//! policy changes go to the audit log; budget thresholds and exhaustion go to every
//! global webhook URL (`--webhook`); and a workspace's own events (its budget alerts
//! and its keys', keys created, rotated or revoked, the workspace updated) go to the
//! URLs that workspace lists in the policy (`webhooks = [...]`), and to no other
//! workspace's. Sampled denials go nowhere. A workspace's URLs are read from the
//! current policy when the event happens, so a change to the list takes effect at
//! once, without a restart.
//!
//! It never blocks: each URL has its own bounded queue (`try_send`; a full queue
//! drops the event and counts it) and its own delivery task, so a slow receiver
//! delays only itself. A workspace URL gets its queue and task the first time an
//! event is sent to it; at most [`MAX_WORKSPACE_URLS`] such queues exist at once
//! (beyond that, events for new URLs are dropped and counted).
//!
//! A delivery is one `POST` of the event as JSON: tollgate's event fields (`type`,
//! `scope`, `percent`, `limit`, `spent`, …) plus `id` (the same on every attempt and
//! for every URL), `time` (RFC 3339) and `actor` (who made a change, when known),
//! with headers `x-tollgate-event` (the `type`), `x-tollgate-delivery` and
//! `x-tollgate-attempt`. A 2xx answer delivers it; a connection error, a timeout,
//! 408, 429 or 5xx is retried with exponential backoff up to `attempts` attempts in
//! all; any other answer fails it at once. Plain `http://` URLs only: this example
//! has no TLS client. Events still queued at shutdown are not waited for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use chrono::SecondsFormat;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tollgate::{Event, EventKind, EventSink};

use crate::audit::Audit;

/// How webhooks are delivered.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Events waiting per URL; beyond this they are dropped and counted.
    pub capacity: usize,
    /// Attempts per event and URL, the first included.
    pub attempts: u32,
    /// Pause before the second attempt; doubled before each further one.
    pub backoff: Duration,
    /// The longest one attempt (connect, send, answer) may take.
    pub timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            capacity: 256,
            attempts: 3,
            backoff: Duration::from_millis(250),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Delivery counts, over every URL.
#[derive(Default)]
struct Counts {
    delivered: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// An event on its way, shared by the queues of every URL.
struct Queued {
    id: String,
    event: Event,
}

/// Workspace webhook URLs that may have a queue at once.
pub const MAX_WORKSPACE_URLS: usize = 256;

type Queue = mpsc::Sender<Arc<Queued>>;

/// The webhook URLs and their delivery queues.
#[derive(Default)]
pub struct Webhooks {
    /// The global URLs' queues, in the order of `urls`.
    queues: Vec<Queue>,
    urls: Vec<String>,
    /// Workspace URLs' queues, started on first use.
    workspace_queues: Mutex<HashMap<String, Queue>>,
    counts: Arc<Counts>,
    sequence: AtomicU64,
    config: Config,
    client: Option<Client<HttpConnector, Full<Bytes>>>,
    runtime: Option<tokio::runtime::Handle>,
}

/// `http://HOST[:PORT]/PATH`, or why not.
fn parse_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("webhook {url:?}: not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") if uri.authority().is_some() => Ok(uri),
        Some("https") => Err(format!(
            "webhook {url:?}: https is not supported by this example (no TLS client); \
             use http:// or a local relay"
        )),
        _ => Err(format!("webhook {url:?}: expected http://HOST[:PORT]/PATH")),
    }
}

impl Webhooks {
    /// Start one delivery task per global URL on the current tokio runtime; workspace
    /// URLs get theirs on that runtime when first used (none without a runtime).
    pub fn start<S: AsRef<str>>(urls: &[S], config: Config) -> Result<Self, String> {
        let uris = urls
            .iter()
            .map(|u| parse_url(u.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let runtime = tokio::runtime::Handle::try_current().ok();
        if runtime.is_none() && !uris.is_empty() {
            return Err("webhooks need a tokio runtime".to_owned());
        }
        let mut hooks = Webhooks {
            urls: urls.iter().map(|u| u.as_ref().to_owned()).collect(),
            config,
            client: Some(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>()),
            runtime,
            ..Webhooks::default()
        };
        hooks.queues = uris
            .into_iter()
            .filter_map(|uri| hooks.spawn(uri))
            .collect();
        Ok(hooks)
    }

    /// A queue and its delivery task for `uri`; none without a runtime.
    fn spawn(&self, uri: Uri) -> Option<Queue> {
        let (runtime, client) = (self.runtime.as_ref()?, self.client.as_ref()?);
        let (queue, events) = mpsc::channel(self.config.capacity.max(1));
        runtime.spawn(deliver(
            uri,
            events,
            client.clone(),
            self.config,
            Arc::clone(&self.counts),
        ));
        Some(queue)
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Queue `event` for every global URL and for `workspace_urls`; never waits.
    pub fn send(&self, event: Event, workspace_urls: &[String]) {
        if self.queues.is_empty() && workspace_urls.is_empty() {
            return;
        }
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let queued = Arc::new(Queued {
            id: format!("evt_{}_{sequence}", event.at.as_unix_nanos()),
            event,
        });
        let global = matches!(
            queued.event.kind,
            EventKind::BudgetThreshold { .. } | EventKind::BudgetExhausted { .. }
        );
        if global {
            for queue in &self.queues {
                self.offer(queue, &queued);
            }
        }
        if workspace_urls.is_empty() {
            return;
        }
        let mut started = self.workspace_queues.lock();
        for url in workspace_urls {
            // A URL that is also global already has this event.
            if global && self.urls.contains(url) {
                continue;
            }
            if !started.contains_key(url) && started.len() < MAX_WORKSPACE_URLS {
                // The policy validated it; a URL hyper still refuses is counted failed.
                match parse_url(url).ok().and_then(|uri| self.spawn(uri)) {
                    Some(queue) => {
                        started.insert(url.clone(), queue);
                    }
                    None => {
                        self.counts.failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            match started.get(url) {
                Some(queue) => self.offer(queue, &queued),
                None => {
                    self.counts.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn offer(&self, queue: &Queue, queued: &Arc<Queued>) {
        if queue.try_send(Arc::clone(queued)).is_err() {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Deliveries answered 2xx.
    pub fn delivered(&self) -> u64 {
        self.counts.delivered.load(Ordering::Relaxed)
    }

    /// Attempts that were retried.
    pub fn retried(&self) -> u64 {
        self.counts.retried.load(Ordering::Relaxed)
    }

    /// Deliveries given up after their last attempt.
    pub fn failed(&self) -> u64 {
        self.counts.failed.load(Ordering::Relaxed)
    }

    /// Deliveries dropped because a URL's queue was full.
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }
}

/// The JSON body: the event's fields, `time` instead of `at`, and the delivery id.
fn payload(queued: &Queued) -> Bytes {
    let mut body = serde_json::to_value(&queued.event).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut body {
        map.remove("at");
        let time = queued
            .event
            .at
            .to_datetime()
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        map.insert("time".into(), json!(time));
        map.insert("id".into(), json!(queued.id));
    }
    Bytes::from(body.to_string())
}

/// The event's `type` as serialized, e.g. `budget_threshold`, `key_created`.
fn event_type(body: &Bytes) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "other".into())
}

/// One URL's delivery task: each event in turn, with bounded retries.
async fn deliver(
    uri: Uri,
    mut events: mpsc::Receiver<Arc<Queued>>,
    client: Client<HttpConnector, Full<Bytes>>,
    config: Config,
    counts: Arc<Counts>,
) {
    while let Some(queued) = events.recv().await {
        let body = payload(&queued);
        let attempts = config.attempts.max(1);
        let mut backoff = config.backoff;
        for attempt in 1..=attempts {
            let outcome =
                tokio::time::timeout(config.timeout, post(&client, &uri, &queued, &body, attempt))
                    .await;
            let (retry, why) = match outcome {
                Ok(Ok(status)) if status.is_success() => {
                    counts.delivered.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(Ok(status)) => (
                    status.is_server_error()
                        || status == StatusCode::REQUEST_TIMEOUT
                        || status == StatusCode::TOO_MANY_REQUESTS,
                    format!("answered {status}"),
                ),
                Ok(Err(e)) => (true, e.to_string()),
                Err(_) => (true, format!("no answer within {:?}", config.timeout)),
            };
            if !retry || attempt == attempts {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "webhook {uri}: gave up on {} after {attempt} attempt(s): {why}",
                    queued.id
                );
                break;
            }
            counts.retried.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
        }
    }
}

async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &Uri,
    queued: &Queued,
    body: &Bytes,
    attempt: u32,
) -> Result<StatusCode, String> {
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri.clone())
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(USER_AGENT, HeaderValue::from_static("tollgate-gateway"))
        .header("x-tollgate-event", event_type(body))
        .header("x-tollgate-delivery", queued.id.as_str())
        .header("x-tollgate-attempt", attempt.to_string())
        .body(Full::new(body.clone()))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    // Read the answer (up to 64 KiB) so the connection can be reused.
    let _ = Limited::new(response.into_body(), 64 << 10).collect().await;
    Ok(status)
}

/// A workspace's webhook URLs as the current policy lists them.
pub type WorkspaceUrls = Box<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// The engine's event sink: changes to the audit log, budget alerts to the global
/// webhooks, a workspace's events to its own webhooks.
pub struct GatewayEvents {
    pub audit: Audit,
    pub webhooks: Webhooks,
    /// Looks up a workspace's URLs; set once the backend (and so its policy) exists.
    pub workspace_urls: OnceLock<WorkspaceUrls>,
}

impl GatewayEvents {
    pub fn new(audit: Audit, webhooks: Webhooks) -> Self {
        GatewayEvents {
            audit,
            webhooks,
            workspace_urls: OnceLock::new(),
        }
    }

    /// The URLs of the workspace `event` belongs to, if it is one a workspace's
    /// webhooks receive.
    fn urls_for(&self, event: &Event) -> Vec<String> {
        let scope = match &event.kind {
            EventKind::BudgetThreshold { scope, .. }
            | EventKind::BudgetExhausted { scope, .. }
            | EventKind::KeyCreated { scope }
            | EventKind::KeyRotated { scope, .. }
            | EventKind::KeyRevoked { scope }
            | EventKind::WorkspaceUpdated { scope } => scope,
            _ => return Vec::new(),
        };
        match (&scope.workspace, self.workspace_urls.get()) {
            (Some(workspace), Some(lookup)) => lookup(workspace),
            _ => Vec::new(),
        }
    }
}

impl EventSink for GatewayEvents {
    fn deliver(&self, event: Event) {
        let urls = self.urls_for(&event);
        match event.kind {
            EventKind::BudgetThreshold { .. } | EventKind::BudgetExhausted { .. } => {
                self.webhooks.send(event, &urls);
            }
            EventKind::RequestsDenied { .. } => {}
            _ => {
                self.audit.event(&event);
                self.webhooks.send(event, &urls);
            }
        }
    }
}
