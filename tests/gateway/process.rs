//! The example gateway as a real process: built with cargo (the same features as this
//! test), started with flags, stopped with SIGINT (graceful) or SIGKILL (a crash), and
//! talked to over HTTP. For what only a real restart shows.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Method;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::support::{send, Answer};

/// The gateway example's executable, built once per test run (cargo rebuilds it only
/// if its sources changed).
pub fn binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let mut cargo = Command::new(env!("CARGO"));
            cargo
                .args(["build", "--example", "gateway", "--message-format=json"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .stderr(Stdio::inherit());
            // The same features as this test, so cargo reuses the library it built.
            let features: Vec<&str> = [
                ("redis", cfg!(feature = "redis")),
                ("metrics", cfg!(feature = "metrics")),
                ("tower", cfg!(feature = "tower")),
                ("tracing", cfg!(feature = "tracing")),
            ]
            .into_iter()
            .filter_map(|(name, on)| on.then_some(name))
            .collect();
            if !features.is_empty() {
                cargo.args(["--features", &features.join(",")]);
            }
            let out = cargo.output().expect("cargo runs");
            assert!(out.status.success(), "cargo build --example gateway failed");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "gateway")
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .expect("cargo reports the gateway's executable")
        })
        .clone()
}

/// A running gateway process; killed when dropped.
pub struct Gateway {
    child: Child,
    pub url: String,
    /// Everything it printed (stdout and stderr), line by line.
    output: Arc<Mutex<Vec<String>>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Collect `from`'s lines into `output`; report the listening URL on `url`.
fn collect(
    from: impl Read + Send + 'static,
    output: Arc<Mutex<Vec<String>>>,
    url: mpsc::Sender<String>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("tollgate example gateway on ") {
                let found = rest.split_whitespace().next().unwrap_or_default();
                let _ = url.send(found.to_owned());
            }
            output.lock().unwrap().push(line);
        }
    });
}

impl Gateway {
    /// Start `gateway ARGS --addr 127.0.0.1:0` and wait until it listens.
    pub fn spawn(args: &[&str]) -> Gateway {
        match Gateway::try_spawn(args) {
            Ok(gateway) => gateway,
            Err((status, output)) => panic!("the gateway did not start ({status:?}):\n{output}"),
        }
    }

    /// Start it; if it exits before listening, its exit status and output.
    pub fn try_spawn(args: &[&str]) -> Result<Gateway, (Option<ExitStatus>, String)> {
        // Logs the test did not place go to a directory of their own, not the repo.
        let logs = crate::hygiene::tempdir();
        let mut placed = Vec::new();
        for (flag, file) in [
            ("--audit-log", "audit.jsonl"),
            ("--request-log", "requests.jsonl"),
        ] {
            if !args.contains(&flag) {
                placed.extend([flag.to_owned(), logs.join(file).display().to_string()]);
            }
        }
        let mut child = Command::new(binary())
            .args(args)
            .args(placed)
            .args(["--addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the gateway starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        collect(
            child.stdout.take().unwrap(),
            Arc::clone(&output),
            tx.clone(),
        );
        collect(child.stderr.take().unwrap(), Arc::clone(&output), tx);
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            if let Ok(url) = rx.recv_timeout(Duration::from_millis(50)) {
                break url;
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Let the readers drain what it printed last.
                std::thread::sleep(Duration::from_millis(100));
                let text = output.lock().unwrap().join("\n");
                return Err((Some(status), text));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let text = output.lock().unwrap().join("\n");
                return Err((None, text));
            }
        };
        Ok(Gateway {
            child,
            url,
            output,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    pub async fn send(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> Answer {
        send(&self.client, &self.url, method, path, key, body).await
    }

    pub async fn chat(&self, key: &str) -> Answer {
        let body = serde_json::json!({
            "model": "gpt-4o-mini",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "Hello"}],
        });
        self.send(Method::POST, "/v1/chat/completions", key, Some(body))
            .await
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Wait (up to `timeout`) until a line it printed contains `needle`.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .output
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its resident memory, in bytes (Linux).
    pub fn resident_bytes(&self) -> u64 {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.child.id()))
            .expect("the gateway is running");
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// SIGKILL: a crash, nothing flushed or saved on the way out.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGINT (Ctrl-C): a graceful shutdown; its exit status.
    pub fn interrupt(&mut self) -> ExitStatus {
        self.signal("INT");
        self.wait_exit()
    }

    /// Send a signal (`INT`, `TERM`, ...) without waiting.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Wait for it to exit (up to 40 s: a graceful drain takes at most 30).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit 40 s after the signal");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}
