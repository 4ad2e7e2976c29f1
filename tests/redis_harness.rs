//! Self-test of the Redis test harness in `tests/support/redis_server.rs`:
//! a standalone server survives kill/restart on the same port, and a
//! three-master cluster forms and routes keys across nodes.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use redis_server::{RedisCluster, RedisServer};

#[test]
fn server_kill_and_restart_on_same_port() {
    if !redis_server::require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let mut server = RedisServer::start();
    let port = server.port();
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}/"));
    assert_eq!(server.cli(&["set", "k", "v"]), "OK");
    assert_eq!(server.cli(&["get", "k"]), "v");

    server.kill();
    assert!(!server.is_running());
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "port {port} still accepts connections after kill"
    );
    assert!(server.try_cli(&["ping"]).is_err());

    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(server.cli(&["ping"]), "PONG");
    // No persistence: the key is gone after the restart.
    assert_eq!(server.cli(&["exists", "k"]), "0");
}

#[test]
fn cluster_of_three_masters_routes_keys() {
    if !redis_server::require_redis() {
        eprintln!("skipping: TOLLGATE_SKIP_REDIS set");
        return;
    }
    let cluster = RedisCluster::start(3);
    assert_eq!(cluster.urls().len(), 3);
    assert_eq!(cluster.ports().len(), 3);
    let info = cluster.cli(0, &["cluster", "info"]);
    assert!(info.contains("cluster_state:ok"), "{info}");

    assert_eq!(cluster.cli(0, &["-c", "set", "foo", "bar"]), "OK");
    assert_eq!(cluster.cli(1, &["-c", "get", "foo"]), "bar");
    assert_eq!(cluster.cli(2, &["get", "foo"]), "bar");

    // Hash tags put both keys in one slot; different tags usually differ.
    assert_eq!(cluster.keyslot("{a}x"), cluster.keyslot("{a}y"));
    let owner = cluster.node_for_key("foo");
    assert!(owner < 3);
}
