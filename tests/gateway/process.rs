//! The gateway as a real process: what systemd, Docker and Kubernetes do to it.
//!
//! These tests run the example binary that `cargo test` builds beside the tests
//! (`target/<profile>/examples/gateway`), so they see exactly what
//! `cargo run --example gateway` runs, signals included.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate::Decimal;

use crate::hygiene::tempdir;

/// The example binary built by `cargo test` for this profile.
fn gateway_binary() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let profile_dir = deps.parent().and_then(Path::parent).unwrap();
    let binary = profile_dir.join("examples").join("gateway");
    assert!(
        binary.exists(),
        "{} is missing: `cargo test` builds it (or `cargo build --example gateway`)",
        binary.display()
    );
    binary
}

/// A gateway process, and everything it printed.
struct Process {
    child: Child,
    url: String,
    output: Arc<Mutex<String>>,
}

impl Process {
    fn start(args: &[&str]) -> Process {
        let mut child = Command::new(gateway_binary())
            .args([
                "--addr",
                "127.0.0.1:0",
                "--admin-key",
                "ops:admin:sk-ops-admin-secret",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the gateway starts");
        let output = Arc::new(Mutex::new(String::new()));
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let printed = Arc::clone(&output);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("tollgate example gateway on ") {
                    let url = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = url_tx.send(url);
                }
                let mut printed = printed.lock().unwrap();
                printed.push_str(&line);
                printed.push('\n');
            }
        });
        let url = url_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the gateway prints its address");
        Process { child, url, output }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Wait for the process to exit (up to 40 s: the drain is at most 30).
    fn wait(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(40),
                "the gateway did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn printed(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Everything printed up to the end of the start banner.
    fn banner(&self) -> String {
        let started = Instant::now();
        loop {
            let printed = self.printed();
            if printed.contains("to stop.") {
                return printed;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no banner: {printed}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn call(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: String,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let response = client.request(request).await.expect("the gateway answers");
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The key's spend this period, as `/admin/usage` reports it.
async fn key_spend(client: &Client<HttpConnector, Full<Bytes>>, url: &str, key: &str) -> Decimal {
    let (status, usage) = call(
        client,
        Method::GET,
        format!("{url}/admin/usage"),
        "sk-ops-admin-secret",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let key = usage["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key)
        .expect("the key is in the usage report");
    key["usage"]["current"]["cost"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_and_saves_the_counters_for_the_next_start() {
    let dir = tempdir();
    let counters = dir.join("counters.json");
    let (audit, requests) = (dir.join("audit.jsonl"), dir.join("requests.jsonl"));
    let args = [
        "--mock-delay-ms",
        "600",
        "--counters",
        counters.to_str().unwrap(),
        "--audit-log",
        audit.to_str().unwrap(),
        "--request-log",
        requests.to_str().unwrap(),
    ];
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let chat = json!({"model": "gpt-4o-mini", "max_tokens": 20,
                      "messages": [{"role": "user", "content": "Hello"}]});

    let mut first = Process::start(&args);
    let mut charged = Decimal::ZERO;
    for _ in 0..3 {
        let (status, body) = call(
            &client,
            Method::POST,
            format!("{}/v1/chat/completions", first.url),
            "sk-demo-prod",
            Some(chat.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        charged += body["x_tollgate"]["cost_usd"]
            .as_str()
            .unwrap()
            .parse::<Decimal>()
            .unwrap();
    }
    // One more, still at the provider when SIGTERM arrives: it is finished and
    // charged, not cut off.
    let in_flight = tokio::spawn({
        let client = client.clone();
        let url = format!("{}/v1/chat/completions", first.url);
        let chat = chat.clone();
        async move { call(&client, Method::POST, url, "sk-demo-prod", Some(chat)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.signal("TERM");
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK, "the request in flight is finished");
    charged += body["x_tollgate"]["cost_usd"]
        .as_str()
        .unwrap()
        .parse::<Decimal>()
        .unwrap();
    let exit = first.wait();
    assert!(exit.success(), "a clean exit on SIGTERM: {exit:?}");
    let printed = first.printed();
    assert!(printed.contains("SIGTERM: shutting down"), "{printed}");
    assert!(counters.exists(), "the counters were saved");
    let logged = std::fs::read_to_string(&requests).unwrap();
    assert_eq!(
        logged.lines().count(),
        4,
        "every request logged and flushed"
    );

    // After a restart the key's spend is what it was: budgets did not reset.
    let second = Process::start(&args);
    assert!(charged > Decimal::ZERO);
    assert_eq!(key_spend(&client, &second.url, "key-prod").await, charged);
}

#[tokio::test]
async fn the_banner_shows_the_demo_keys_only_for_the_demo_policy() {
    let dir = tempdir();
    let own = dir.join("policy.toml");
    std::fs::copy(crate::support::POLICY, &own).unwrap();
    let (audit, requests) = (dir.join("audit.jsonl"), dir.join("requests.jsonl"));
    let logs = [
        "--audit-log",
        audit.to_str().unwrap(),
        "--request-log",
        requests.to_str().unwrap(),
    ];

    let demo = Process::start(&logs);
    assert!(
        demo.banner().contains("sk-demo-staging"),
        "{}",
        demo.printed()
    );

    let mut args = logs.to_vec();
    args.extend(["--policy", own.to_str().unwrap()]);
    let other = Process::start(&args);
    let printed = other.banner();
    assert!(
        !printed.contains("sk-demo-"),
        "no demo keys for another policy: {printed}"
    );
    assert!(printed.contains("YOUR_KEY"), "{printed}");
}
