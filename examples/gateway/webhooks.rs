//! Webhooks for budget alerts, and the gateway's event sink.
//!
//! [`GatewayEvents`] is the [`EventSink`] the engine reports to: key, workspace and
//! policy changes go to the audit log, budget thresholds and exhaustion to every
//! webhook URL, sampled denials nowhere. It never blocks: each URL has its own
//! bounded queue (`try_send`; a full queue drops the event and counts it) and its own
//! delivery task, so a slow receiver delays only itself.
//!
//! A delivery is one `POST` of the event as JSON: tollgate's event fields (`type`,
//! `scope`, `percent`, `limit`, `spent`, …) plus `id` (the same on every attempt and
//! for every URL) and `time` (RFC 3339), with headers `x-tollgate-event`,
//! `x-tollgate-delivery` and `x-tollgate-attempt`. A 2xx answer delivers it; a
//! connection error, a timeout, 408, 429 or 5xx is retried with exponential backoff
//! up to `attempts` attempts in all; any other answer fails it at once. Plain
//! `http://` URLs only: this example has no TLS client. Events still queued at
//! shutdown are not waited for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::SecondsFormat;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
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

/// The webhook URLs and their delivery queues.
#[derive(Default)]
pub struct Webhooks {
    queues: Vec<mpsc::Sender<Arc<Queued>>>,
    urls: Vec<String>,
    counts: Arc<Counts>,
    sequence: AtomicU64,
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
    /// Start one delivery task per URL on the current tokio runtime.
    pub fn start<S: AsRef<str>>(urls: &[S], config: Config) -> Result<Self, String> {
        let uris = urls
            .iter()
            .map(|u| parse_url(u.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let runtime = if uris.is_empty() {
            None
        } else {
            Some(
                tokio::runtime::Handle::try_current()
                    .map_err(|_| "webhooks need a tokio runtime".to_owned())?,
            )
        };
        let counts = Arc::new(Counts::default());
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut queues = Vec::new();
        for uri in uris {
            let (queue, events) = mpsc::channel(config.capacity.max(1));
            let worker = deliver(uri, events, client.clone(), config, Arc::clone(&counts));
            if let Some(runtime) = &runtime {
                runtime.spawn(worker);
            }
            queues.push(queue);
        }
        Ok(Webhooks {
            queues,
            urls: urls.iter().map(|u| u.as_ref().to_owned()).collect(),
            counts,
            sequence: AtomicU64::new(0),
        })
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Queue `event` for every URL; never waits.
    pub fn send(&self, event: Event) {
        if self.queues.is_empty() {
            return;
        }
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let queued = Arc::new(Queued {
            id: format!("evt_{}_{sequence}", event.at.as_unix_nanos()),
            event,
        });
        for queue in &self.queues {
            if queue.try_send(Arc::clone(&queued)).is_err() {
                self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            }
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

fn event_type(event: &Event) -> &'static str {
    match event.kind {
        EventKind::BudgetThreshold { .. } => "budget_threshold",
        EventKind::BudgetExhausted { .. } => "budget_exhausted",
        _ => "other",
    }
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
        .header("x-tollgate-event", event_type(&queued.event))
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

/// The engine's event sink: changes to the audit log, budget alerts to webhooks.
pub struct GatewayEvents {
    pub audit: Audit,
    pub webhooks: Webhooks,
}

impl EventSink for GatewayEvents {
    fn deliver(&self, event: Event) {
        match event.kind {
            EventKind::BudgetThreshold { .. } | EventKind::BudgetExhausted { .. } => {
                self.webhooks.send(event);
            }
            EventKind::RequestsDenied { .. } => {}
            _ => self.audit.event(&event),
        }
    }
}
