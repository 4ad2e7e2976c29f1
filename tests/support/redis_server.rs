//! Test support: throwaway `redis-server` processes (a single server or a small
//! cluster) on loopback ports, each in its own temporary directory.
//!
//! Include it from an integration test with
//!
//! ```ignore
//! #[path = "support/redis_server.rs"]
//! mod redis_server;
//! ```
//!
//! and start every Redis test with
//!
//! ```ignore
//! if !redis_server::require_redis() {
//!     eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
//!     return;
//! }
//! ```
//!
//! Binaries: `TOLLGATE_REDIS_SERVER` (a path to `redis-server`) wins when it
//! names an existing file, otherwise `redis-server` is looked up on `PATH`.
//! `redis-cli` is taken from `TOLLGATE_REDIS_CLI`, else from the directory of
//! `TOLLGATE_REDIS_SERVER`, else from `PATH`.
//!
//! Only `std` is used. Every wait has a deadline; processes are SIGKILLed and
//! temporary directories removed on drop (also when a test panics).

#![allow(dead_code)]

use std::collections::HashSet;
use std::env;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a single server may take to answer `PING` after being spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for a server to become ready.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long a freshly created cluster may take to converge.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound on any single `redis-cli` invocation.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on `redis-cli --cluster create`.
const CLUSTER_CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts to start a server when its port turns out to be taken.
const BIND_ATTEMPTS: usize = 5;
/// Offset of the cluster bus port from the client port (fixed by Redis).
const CLUSTER_BUS_OFFSET: u16 = 10_000;

const LOOPBACK: &str = "127.0.0.1";

// ---------------------------------------------------------------------------
// Gate
// ---------------------------------------------------------------------------

/// Whether Redis tests should run. Same as [`require_redis`].
pub fn redis_available() -> bool {
    require_redis()
}

/// Decides whether Redis-backed tests run, so that CI never skips them silently.
///
/// * `redis-server` and `redis-cli` found → `true`.
/// * not found and `CI` is `true`/`1` → panics (CI must install Redis).
/// * not found and `TOLLGATE_SKIP_REDIS` is set (any value) → `false`; the
///   caller prints "skipping" and returns.
/// * not found otherwise → panics, telling the developer to install
///   `redis-server` or set `TOLLGATE_SKIP_REDIS=1`.
pub fn require_redis() -> bool {
    let missing = match (redis_server_binary(), redis_cli_binary()) {
        (Some(_), Some(_)) => return true,
        (None, _) => "redis-server",
        (Some(_), None) => "redis-cli",
    };
    let ci = env::var("CI")
        .map(|v| {
            let v = v.trim();
            v.eq_ignore_ascii_case("true") || v == "1"
        })
        .unwrap_or(false);
    if ci {
        panic!(
            "\n\n========================================================================\n\
             redis-server not found; CI must install it (apt-get install -y redis-server)\n\
             (missing binary: {missing}; looked at $TOLLGATE_REDIS_SERVER / $TOLLGATE_REDIS_CLI and PATH)\n\
             ========================================================================\n"
        );
    }
    if env::var_os("TOLLGATE_SKIP_REDIS").is_some() {
        return false;
    }
    panic!(
        "\n\n{missing} not found on PATH (and TOLLGATE_REDIS_SERVER is unset or does not name a file).\n\
         Install Redis to run these tests (Debian/Ubuntu: `sudo apt-get install -y redis-server`,\n\
         macOS: `brew install redis`), point TOLLGATE_REDIS_SERVER at a redis-server binary,\n\
         or set TOLLGATE_SKIP_REDIS=1 to skip the Redis tests.\n"
    );
}

/// Path of the `redis-server` binary, if any: `$TOLLGATE_REDIS_SERVER` when it
/// names an existing file, else `redis-server` on `PATH`.
pub fn redis_server_binary() -> Option<PathBuf> {
    if let Some(p) = env::var_os("TOLLGATE_REDIS_SERVER").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if is_executable_file(&p) {
            return Some(p);
        }
    }
    find_on_path("redis-server")
}

/// Path of the `redis-cli` binary, if any: `$TOLLGATE_REDIS_CLI`, else a
/// `redis-cli` next to `$TOLLGATE_REDIS_SERVER`, else `redis-cli` on `PATH`.
pub fn redis_cli_binary() -> Option<PathBuf> {
    if let Some(p) = env::var_os("TOLLGATE_REDIS_CLI").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if is_executable_file(&p) {
            return Some(p);
        }
    }
    if let Some(server) = env::var_os("TOLLGATE_REDIS_SERVER").filter(|p| !p.is_empty()) {
        if let Some(dir) = Path::new(&server).parent() {
            let p = dir.join(exe_name("redis-cli"));
            if is_executable_file(&p) {
                return Some(p);
            }
        }
    }
    find_on_path("redis-cli")
}

fn exe_name(name: &str) -> OsString {
    let mut s = OsString::from(name);
    s.push(env::consts::EXE_SUFFIX);
    s
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    let file = exe_name(name);
    env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(&file))
        .find(|p| is_executable_file(p))
}

fn is_executable_file(p: &Path) -> bool {
    let Ok(meta) = fs::metadata(p) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        true
    }
}

fn server_bin() -> PathBuf {
    redis_server_binary().expect("redis-server not found (call require_redis() first)")
}

fn cli_bin() -> PathBuf {
    redis_cli_binary().expect("redis-cli not found (call require_redis() first)")
}

// ---------------------------------------------------------------------------
// Temporary directories and ports
// ---------------------------------------------------------------------------

/// A directory under `std::env::temp_dir()`, removed (recursively) on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let base = env::temp_dir();
        for _ in 0..100 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let path = base.join(format!("{prefix}-{}-{n}-{nanos}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create temp dir {}: {e}", path.display()),
            }
        }
        panic!("cannot create a unique temp dir under {}", base.display());
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Ports handed out by this process, never handed out twice (parallel tests
/// in one binary would otherwise race for the same just-freed port).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that is free right now (bind to port 0, read it, drop the
/// listener). With `cluster_bus`, `port + 10000` must be free as well.
fn free_port(cluster_bus: bool) -> u16 {
    for _ in 0..500 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        let _bus = if cluster_bus {
            let Some(bus) = port.checked_add(CLUSTER_BUS_OFFSET) else {
                continue;
            };
            match TcpListener::bind((Ipv4Addr::LOCALHOST, bus)) {
                Ok(l) => Some(l),
                Err(_) => continue,
            }
        } else {
            None
        };
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        let set = guard.get_or_insert_with(HashSet::new);
        if set.contains(&port) || (cluster_bus && set.contains(&(port + CLUSTER_BUS_OFFSET))) {
            continue;
        }
        set.insert(port);
        if cluster_bus {
            set.insert(port + CLUSTER_BUS_OFFSET);
        }
        return port;
    }
    panic!("could not find a free loopback port");
}

// ---------------------------------------------------------------------------
// One redis-server process
// ---------------------------------------------------------------------------

/// Why a spawn attempt did not produce a ready server.
enum StartFailure {
    /// The process exited; `addr_in_use` when its log says the port was taken.
    Exited { addr_in_use: bool, detail: String },
    /// Still running but not answering within the deadline.
    Timeout { detail: String },
}

/// A `redis-server` child on a fixed port and directory; restartable.
struct Node {
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn new(port: u16, dir: PathBuf, extra_args: Vec<String>) -> Node {
        let log = dir.join("redis.log");
        Node {
            port,
            dir,
            log,
            extra_args,
            child: None,
        }
    }

    fn spawn(&mut self) -> Child {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        let log2 = log.try_clone().expect("clone log file handle");
        let port = self.port.to_string();
        let mut cmd = Command::new(server_bin());
        cmd.arg("--port")
            .arg(&port)
            .arg("--bind")
            .arg(LOOPBACK)
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--daemonize")
            .arg("no")
            .arg("--protected-mode")
            .arg("no")
            .args(&self.extra_args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", server_bin().display()))
    }

    fn log_len(&self) -> u64 {
        fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    fn read_log_from(&self, offset: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            let start = (offset as usize).min(buf.len());
            text = String::from_utf8_lossy(&buf[start..]).into_owned();
        }
        text
    }

    /// Spawns the server and waits until it answers `PING` (and is really this
    /// child, not some other process on the port).
    fn try_start(&mut self) -> Result<(), StartFailure> {
        assert!(self.child.is_none(), "redis-server already running");
        let offset = self.log_len();
        self.child = Some(self.spawn());
        let pid = self.child.as_ref().map(Child::id).unwrap_or(0);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let log = self.read_log_from(offset);
                return Err(StartFailure::Exited {
                    addr_in_use: log.contains("Address already in use"),
                    detail: format!(
                        "redis-server on port {} exited early ({status}); log {}:\n{log}",
                        self.port,
                        self.log.display()
                    ),
                });
            }
            if ping_pid(self.port, Duration::from_millis(500)) == Some(pid) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = self.read_log_from(offset);
                return Err(StartFailure::Timeout {
                    detail: format!(
                        "redis-server on port {} not ready after {:?}; log {}:\n{log}",
                        self.port,
                        READY_TIMEOUT,
                        self.log.display()
                    ),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Starts on the node's port, retrying a few times if the port is busy.
    fn start_same_port(&mut self) {
        let mut last = String::new();
        for attempt in 0..BIND_ATTEMPTS {
            match self.try_start() {
                Ok(()) => return,
                Err(StartFailure::Exited {
                    addr_in_use: true,
                    detail,
                }) => {
                    last = detail;
                    thread::sleep(Duration::from_millis(200 * (attempt as u64 + 1)));
                }
                Err(StartFailure::Exited { detail, .. })
                | Err(StartFailure::Timeout { detail }) => {
                    self.kill();
                    panic!("{detail}");
                }
            }
        }
        panic!(
            "port {} stayed busy after {BIND_ATTEMPTS} attempts; {last}",
            self.port
        );
    }

    /// Starts the node, moving to a fresh port if the chosen one turned out to
    /// be taken (another process grabbed it between probing and binding).
    fn start_any_port(&mut self, cluster_bus: bool) {
        let mut last = String::new();
        for _ in 0..BIND_ATTEMPTS {
            match self.try_start() {
                Ok(()) => return,
                Err(StartFailure::Exited {
                    addr_in_use: true,
                    detail,
                }) => {
                    last = detail;
                    self.port = free_port(cluster_bus);
                }
                Err(StartFailure::Exited { detail, .. })
                | Err(StartFailure::Timeout { detail }) => {
                    self.kill();
                    panic!("{detail}");
                }
            }
        }
        panic!("no usable port after {BIND_ATTEMPTS} attempts; {last}");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL on unix
            let _ = child.wait();
        }
    }

    fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn url(&self) -> String {
        format!("redis://{LOOPBACK}:{}/", self.port)
    }

    fn try_cli(&self, extra: &[&str], args: &[&str]) -> Result<String, String> {
        // `HGET <scope> <number>`: tollgate packs a scope's numbers into one field,
        // `n`; read the named one from there, so tests speak of logical fields.
        let index;
        let decoded: [&str; 6];
        let args = match args {
            [hget, key, field] if hget.eq_ignore_ascii_case("hget") => {
                match PACKED_NUMBERS.iter().position(|n| n == field) {
                    Some(at) => {
                        index = (at + 1).to_string();
                        decoded = ["eval", UNPACK_ONE, "1", key, &index, field];
                        &decoded[..]
                    }
                    None => args,
                }
            }
            _ => args,
        };
        let mut cmd = Command::new(cli_bin());
        cmd.arg("-h")
            .arg(LOOPBACK)
            .arg("-p")
            .arg(self.port.to_string())
            .args(extra)
            .args(args);
        let out = run_bounded(cmd, CLI_TIMEOUT)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "redis-cli -p {} {:?} failed ({}): stderr: {} stdout: {}",
                self.port,
                args,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        }
    }
}

/// The numbers tollgate packs into a scope hash's field `n` (24 little-endian
/// doubles, in this order: see `src/redis/scripts/tollgate.lua`).
const PACKED_NUMBERS: [&str; 24] = [
    "rpm", "rpm@", "rpm#", "rpm^", "rpm-", "rpd", "rpd@", "rpd#", "rpd^", "rpd-", "tpm", "tpm@",
    "tpm#", "tpm^", "tpm-", "conc", "ps", "pe", "pk", "pks", "req", "in", "out", "alerted",
];

/// Reads number ARGV[1] of KEYS[1]'s packed field `n` as an integer string; nothing
/// when the scope has no `n` yet (as `HGET` of an absent field).
const UNPACK_ONE: &str = "local p = redis.call('HGET', KEYS[1], 'n') \
    if not p then return false end \
    local t = { struct.unpack('<' .. string.rep('d', 24), p) } \
    return string.format('%d', t[tonumber(ARGV[1])])";

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects to `port`, sends `PING` (expects `+PONG`) and `INFO server`, and
/// returns the server's `process_id`. `None` on any failure.
fn ping_pid(port: u16, timeout: Duration) -> Option<u32> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    let mut writer = stream.try_clone().ok()?;
    let mut reader = BufReader::new(stream);

    writer.write_all(b"PING\r\n").ok()?;
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    if !line.starts_with("+PONG") {
        return None;
    }

    writer.write_all(b"INFO server\r\n").ok()?;
    line.clear();
    reader.read_line(&mut line).ok()?;
    let len: usize = line.trim_end().strip_prefix('$')?.parse().ok()?;
    let mut body = vec![0u8; len + 2];
    reader.read_exact(&mut body).ok()?;
    let body = String::from_utf8_lossy(&body[..len]);
    body.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs `cmd` with piped output, killing it if it outlives `timeout`.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {desc}: {e}"))?;
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out_reader.join().unwrap_or_default();
                let stderr = err_reader.join().unwrap_or_default();
                return Err(format!(
                    "{desc} timed out after {timeout:?}; stdout: {} stderr: {}",
                    String::from_utf8_lossy(&stdout).trim(),
                    String::from_utf8_lossy(&stderr).trim()
                ));
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("wait for {desc}: {e}"));
            }
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

// ---------------------------------------------------------------------------
// RedisServer
// ---------------------------------------------------------------------------

/// A standalone `redis-server` on `127.0.0.1` and a free port, with no
/// persistence, in its own temporary directory. Killed and cleaned up on drop.
pub struct RedisServer {
    // Field order matters: the process is killed before its directory goes.
    node: Node,
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server and waits (up to ~10 s) until it answers `PING`.
    /// Panics with the server log if it does not come up.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Like [`RedisServer::start`], with extra `redis-server` arguments (after the
    /// defaults, so they override them), kept across restarts: e.g.
    /// `["--appendonly", "yes", "--appendfsync", "always"]` for a server whose data
    /// survives [`RedisServer::restart`] (in its directory).
    pub fn start_with(args: &[&str]) -> RedisServer {
        let dir = TempDir::new("tollgate-redis");
        let extra = args.iter().map(|a| (*a).to_owned()).collect();
        let mut server = RedisServer {
            node: Node::new(free_port(false), dir.path().to_path_buf(), extra),
            dir,
        };
        server.node.start_any_port(false);
        server
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        self.node.url()
    }

    /// The TCP port the server listens on (unchanged across restarts).
    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// The server's working directory (holds `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's combined stdout/stderr log so far.
    pub fn log(&self) -> String {
        self.node.read_log_from(0)
    }

    /// Whether the child process is alive.
    pub fn is_running(&mut self) -> bool {
        self.node.is_running()
    }

    /// SIGKILLs the server and waits for it to exit. Port and directory are
    /// kept, for [`RedisServer::restart`]. No-op if it is not running.
    pub fn kill(&mut self) {
        self.node.kill();
    }

    /// Starts the server again on the same port and directory (killing it
    /// first if it is still running) and waits until it answers `PING`.
    /// Retries a few times if the port is briefly busy. Data is not kept,
    /// unless the server was started with persistence (`start_with`).
    pub fn restart(&mut self) {
        self.node.kill();
        self.node.start_same_port();
    }

    /// Runs `redis-cli -h 127.0.0.1 -p PORT <args>` and returns its trimmed
    /// stdout. Panics (with stderr) if redis-cli exits non-zero, e.g. when the
    /// server is down. Note that redis-cli exits 0 on error *replies*
    /// (`ERR ...` is then returned as text).
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`RedisServer::cli`] but returns the failure instead of panicking.
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        self.node.try_cli(&[], args)
    }

    /// `FCALL`s the server ran since it started or the last `CONFIG RESETSTAT`.
    pub fn fcalls(&self) -> u64 {
        self.cli(&["info", "commandstats"])
            .lines()
            .find_map(|line| line.strip_prefix("cmdstat_fcall:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |calls| calls.parse().unwrap())
    }

    /// The server's clock (`TIME`), in ms: the clock of holds and their expiries.
    pub fn time_ms(&self) -> f64 {
        let out = self.cli(&["time"]);
        let mut lines = out.lines().map(|l| l.trim().parse::<f64>().unwrap());
        let (seconds, micros) = (lines.next().unwrap(), lines.next().unwrap());
        seconds * 1000.0 + micros / 1000.0
    }
}

// ---------------------------------------------------------------------------
// RedisCluster
// ---------------------------------------------------------------------------

/// A Redis Cluster of `masters` masters (no replicas), each its own
/// `redis-server` on `127.0.0.1` in a subdirectory of one temporary directory.
/// Killed and cleaned up on drop.
pub struct RedisCluster {
    // Field order matters: the processes are killed before the directory goes.
    nodes: Vec<Node>,
    root: TempDir,
}

impl RedisCluster {
    /// Starts `masters` (at least 3) cluster-enabled servers, joins them with
    /// `redis-cli --cluster create`, and waits (up to ~20 s) until every node
    /// reports `cluster_state:ok` and `cluster_slots_assigned:16384`.
    pub fn start(masters: usize) -> RedisCluster {
        assert!(
            masters >= 3,
            "Redis Cluster needs at least 3 masters (got {masters})"
        );
        let root = TempDir::new("tollgate-redis-cluster");
        let mut cluster = RedisCluster {
            nodes: Vec::with_capacity(masters),
            root,
        };
        for i in 0..masters {
            let dir = cluster.root.path().join(format!("node{i}"));
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            let extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            cluster.nodes.push(Node::new(free_port(true), dir, extra));
            cluster.nodes[i].start_any_port(true);
        }

        let mut cmd = Command::new(cli_bin());
        cmd.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            cmd.arg(format!("{LOOPBACK}:{}", node.port));
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = run_bounded(cmd, CLUSTER_CREATE_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        if !out.status.success() {
            panic!(
                "redis-cli --cluster create failed ({}):\nstdout: {}\nstderr: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                cluster.logs()
            );
        }

        cluster.wait_converged(CLUSTER_TIMEOUT);
        cluster
    }

    /// Waits until every running node reports `cluster_state:ok` and
    /// `cluster_slots_assigned:16384`; panics with the last answers and the
    /// node logs after `timeout`.
    pub fn wait_converged(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut last = Vec::new();
            let mut ok = true;
            for node in &self.nodes {
                if node.child.is_none() {
                    continue;
                }
                match node.try_cli(&[], &["cluster", "info"]) {
                    Ok(info) => {
                        let good = info.lines().any(|l| l.trim() == "cluster_state:ok")
                            && info
                                .lines()
                                .any(|l| l.trim() == "cluster_slots_assigned:16384");
                        ok &= good;
                        last.push(format!("port {}: {}", node.port, info.replace("\r\n", " ")));
                    }
                    Err(e) => {
                        ok = false;
                        last.push(e);
                    }
                }
            }
            if ok {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "cluster did not converge within {timeout:?}:\n{}\n{}",
                    last.join("\n"),
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `redis://127.0.0.1:PORT/` for every node, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// Every node's port, in node order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Runs `redis-cli -c -h 127.0.0.1 -p PORT(node) <args>` (following
    /// MOVED/ASK redirects) and returns trimmed stdout; panics on failure.
    pub fn cli(&self, node: usize, args: &[&str]) -> String {
        self.try_cli(node, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`RedisCluster::cli`] but returns the failure instead of panicking.
    pub fn try_cli(&self, node: usize, args: &[&str]) -> Result<String, String> {
        self.nodes[node].try_cli(&["-c"], args)
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let out = self.cli(0, &["cluster", "keyslot", key]);
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("cluster keyslot {key:?}: {out:?}: {e}"))
    }

    /// Index of the node serving `key`'s slot, per node 0's `CLUSTER NODES`.
    pub fn node_for_key(&self, key: &str) -> usize {
        let slot = self.keyslot(key);
        let nodes = self.cli(0, &["cluster", "nodes"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 || !fields[2].contains("master") {
                continue;
            }
            // "127.0.0.1:7000@17000" (the host part may be empty for myself
            // before the cluster meets).
            let port: Option<u16> = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok());
            let owns = fields[8..].iter().any(|range| {
                if range.starts_with('[') {
                    return false; // migrating/importing marker
                }
                let mut it = range.splitn(2, '-');
                let lo: u16 = match it.next().and_then(|s| s.parse().ok()) {
                    Some(v) => v,
                    None => return false,
                };
                let hi: u16 = it.next().and_then(|s| s.parse().ok()).unwrap_or(lo);
                (lo..=hi).contains(&slot)
            });
            if owns {
                if let Some(i) = port.and_then(|p| self.nodes.iter().position(|n| n.port == p)) {
                    return i;
                }
            }
        }
        panic!("no node owns slot {slot} of {key:?}; cluster nodes:\n{nodes}");
    }

    /// SIGKILLs node `node` (port and directory are kept).
    pub fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    /// Restarts node `node` on its port and directory (it rejoins from its
    /// `nodes.conf`); waits until it answers `PING`, not for convergence.
    pub fn restart(&mut self, node: usize) {
        self.nodes[node].kill();
        self.nodes[node].start_same_port();
    }

    /// Every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            s.push_str(&format!(
                "--- node {i} (port {}) log {} ---\n{}\n",
                node.port,
                node.log.display(),
                node.read_log_from(0)
            ));
        }
        s
    }
}
