//! Hostile and careless clients: idle connections past the cap, slow headers and
//! bodies, floods of refused admin requests, odd `Authorization` headers; and a soak
//! run that shows memory stays flat.

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::connections::Limits;
use crate::support::{start_with, Options, Running};

/// The longest any single step below may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

fn address(gw: &Running) -> String {
    gw.url.trim_start_matches("http://").to_owned()
}

/// Read until the peer closes (or the deadline): what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection in time")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

fn chat_request(key: &str) -> String {
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})
        .to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn idle_connections_past_the_cap_do_not_lock_out_an_ordinary_request() {
    let cap = 8;
    let gw = start_with(Options {
        limits: Limits {
            max_connections: cap,
            ..Limits::default()
        },
        ..Options::default()
    })
    .await;
    // Three times the cap, each connected and silent.
    let mut idle = Vec::new();
    for _ in 0..3 * cap {
        idle.push(TcpStream::connect(address(&gw)).await.unwrap());
    }
    // Let the gateway accept them all.
    let waited = Instant::now();
    while gw.app.connections.evicted() < (2 * cap) as u64 && waited.elapsed() < DEADLINE {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let answer = tokio::time::timeout(DEADLINE, gw.chat("sk-demo-prod", "gpt-4o-mini", None))
        .await
        .expect("an ordinary request is answered while idle connections sit at the cap");
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        gw.app.connections.evicted() >= (2 * cap) as u64,
        "idle connections were closed to make room: {} evicted",
        gw.app.connections.evicted()
    );
    assert!(
        gw.app.connections.open() <= cap + cap / 8 + 1,
        "open connections stay bounded: {}",
        gw.app.connections.open()
    );
    // The evicted ones were really closed: the oldest reads end-of-stream.
    let mut oldest = idle.remove(0);
    assert_eq!(read_to_close(&mut oldest).await, "");
}

#[tokio::test]
async fn when_every_connection_is_busy_a_new_one_is_answered_503_and_closed() {
    let gw = start_with(Options {
        mock_delay: Duration::from_millis(800),
        limits: Limits {
            max_connections: 2,
            ..Limits::default()
        },
        ..Options::default()
    })
    .await;
    // Two connections, each with a request in progress at the slow mock provider.
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(address(&gw)).await.unwrap();
        stream
            .write_all(chat_request("sk-demo-prod").as_bytes())
            .await
            .unwrap();
        busy.push(stream);
    }
    let started = Instant::now();
    while gw.app.connections.open() < 2 && started.elapsed() < DEADLINE {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Give the handlers time to start (the requests are then in progress).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(address(&gw)).await.unwrap();
    let refused = read_to_close(&mut third).await;
    assert!(
        refused.starts_with("HTTP/1.1 503"),
        "beyond the cap with every connection busy: {refused}"
    );
    assert!(refused.contains("too_many_connections"), "{refused}");
    // The busy ones were not disturbed.
    for mut stream in busy {
        let answer = read_to_close(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert_eq!(gw.app.connections.refused(), 1);
}

#[tokio::test]
async fn a_client_that_sends_its_headers_slowly_is_closed_after_the_header_timeout() {
    let timeout = Duration::from_millis(300);
    let gw = start_with(Options {
        limits: Limits {
            header_timeout: timeout,
            ..Limits::default()
        },
        ..Options::default()
    })
    .await;
    let mut slow = TcpStream::connect(address(&gw)).await.unwrap();
    let opened = Instant::now();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n")
        .await
        .unwrap();
    // One more header line, then silence: the head is never finished.
    tokio::time::sleep(timeout / 3).await;
    slow.write_all(b"x-slow: 1\r\n").await.unwrap();
    let answer = read_to_close(&mut slow).await;
    let took = opened.elapsed();
    assert!(took >= timeout, "closed only after the timeout: {took:?}");
    assert!(!answer.contains("200 OK"), "{answer}");

    // An idle keep-alive connection is closed the same way after its response.
    let mut idle = TcpStream::connect(address(&gw)).await.unwrap();
    idle.write_all(
        chat_request("sk-demo-prod")
            .replace("connection: close", "connection: keep-alive")
            .as_bytes(),
    )
    .await
    .unwrap();
    let answer = read_to_close(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_answered_408() {
    let gw = start_with(Options {
        limits: Limits {
            body_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
        ..Options::default()
    })
    .await;
    let mut slow = TcpStream::connect(address(&gw)).await.unwrap();
    slow.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer sk-demo-prod\r\n\
          content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let answer = read_to_close(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // Nothing was reserved or charged for it.
    let usage = gw.usage().await;
    assert_eq!(usage.org.current.requests, 0);
}

#[tokio::test]
async fn the_bearer_scheme_is_matched_in_any_case() {
    let gw = start_with(Options::default()).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let request = hyper::Request::builder()
            .method(Method::POST)
            .uri(format!("{}/v1/chat/completions", gw.url))
            .header("authorization", format!("{scheme} sk-demo-prod"))
            .body(http_body_util::Full::new(bytes::Bytes::from(
                json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})
                    .to_string(),
            )))
            .unwrap();
        let response = gw.client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "scheme {scheme}");
    }
    // Another scheme is no key at all.
    let request = hyper::Request::builder()
        .method(Method::GET)
        .uri(format!("{}/v1/models", gw.url))
        .header("authorization", "Basic sk-demo-prod")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = gw.client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn listing_models_with_an_unknown_key_is_401_not_an_empty_list() {
    let gw = start_with(Options::default()).await;
    let answer = gw.send(Method::GET, "/v1/models", "sk-nobody", None).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.body["error"]["code"], "invalid_api_key");
    let answer = gw
        .send(Method::GET, "/v1/models", "sk-demo-staging", None)
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["data"][0]["id"], "gpt-4o-mini");
}

#[tokio::test]
async fn ten_thousand_refused_admin_requests_add_a_bounded_number_of_audit_lines() {
    let dir = tempdir();
    let log = dir.join("audit.jsonl");
    let gw = start_with(Options {
        audit_log: Some(log.clone()),
        ..Options::default()
    })
    .await;
    let long_path = format!("/admin/workspaces/{}", "x".repeat(4000));
    let mut refused = 0;
    for round in 0..10_000 {
        let path = if round % 2 == 0 {
            long_path.as_str()
        } else {
            "/admin/usage"
        };
        let answer = gw.send(Method::GET, path, "not-an-admin-key", None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        refused += 1;
    }
    // A real admin action after the flood is written.
    let answer = gw
        .send(
            Method::POST,
            "/admin/keys/key-staging/revoke",
            "sk-admin-demo",
            None,
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    gw.app.audit.flush();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let refusals = lines
        .iter()
        .filter(|l| l["outcome"] == "refused" && l["source"] == "admin");
    assert_eq!(
        refusals.count(),
        crate::audit::PER_SOURCE as usize,
        "one source gets its quota of lines a minute"
    );
    let suppressed: u64 = lines
        .iter()
        .filter(|l| l["action"] == "audit.suppressed")
        .map(|l| {
            l["reason"]
                .as_str()
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        suppressed + u64::from(crate::audit::PER_SOURCE),
        refused,
        "every refusal is written or counted"
    );
    assert!(
        lines.len() < 40,
        "{} lines for 10,000 refusals",
        lines.len()
    );
    assert!(
        lines
            .iter()
            .any(|l| l["action"] == "key.revoke" && l["outcome"] == "ok"),
        "the real admin action is in the log"
    );
    for line in &lines {
        let target = line["target"].as_str().unwrap_or_default();
        assert!(
            target.len() <= crate::audit::MAX_TARGET + 3,
            "cut: {}",
            target.len()
        );
    }
}

#[tokio::test]
async fn the_audit_log_rotates_at_its_size_limit() {
    let dir = tempdir();
    let log = dir.join("audit.jsonl");
    let gw = start_with(Options {
        audit_log: Some(log.clone()),
        rotation: crate::jsonl::Rotation {
            max_bytes: 2_000,
            keep: 2,
        },
        ..Options::default()
    })
    .await;
    // Authenticated reads are never throttled: each is a line of a few hundred bytes.
    for _ in 0..60 {
        let answer = gw
            .send(Method::GET, "/admin/workspaces", "sk-viewer-demo", None)
            .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    gw.app.audit.flush();
    let size = |path: &std::path::Path| std::fs::metadata(path).map_or(0, |m| m.len());
    let rotated = [dir.join("audit.jsonl.1"), dir.join("audit.jsonl.2")];
    assert!(rotated.iter().all(|p| p.exists()), "two old files kept");
    assert!(!dir.join("audit.jsonl.3").exists(), "no third old file");
    for path in rotated.iter().chain([&log]) {
        assert!(
            size(path) < 2_000 + 1_000,
            "{} is {} bytes",
            path.display(),
            size(path)
        );
    }
    assert_eq!(gw.app.audit.written(), 60);
}

pub fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-gw-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_shutdown_waits_for_a_completion_whose_client_hung_up_and_it_is_charged() {
    let mut gw = start_with(Options {
        mock_delay: Duration::from_millis(400),
        ..Options::default()
    })
    .await;
    // The client gives up while the provider is still working.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        gw.chat("sk-demo-prod", "gpt-4o-mini", Some(20)),
    )
    .await;
    assert!(gave_up.is_err(), "the client left before the answer");
    // Shut down at once: no connection is open any more, but the completion is
    // still running in its own task, and the drain waits for it.
    gw.shut_down().await;
    let org = gw.usage().await.org.current;
    assert_eq!(org.requests, 1);
    assert!(
        org.cost > tollgate::Decimal::ZERO,
        "the provider's work is charged"
    );
    assert_eq!(org.held, tollgate::Decimal::ZERO, "nothing is left held");
}
