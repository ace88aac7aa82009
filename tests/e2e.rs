//! End to end: the real `redtap` binary, real redis-server processes, real TCP connections.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{connect_many, eventually, http, Daemon, RedisServer};

const STREAM: &str = "redtap:events:t";

fn backend(name: &str, r: &RedisServer, w: u32) -> String {
    format!("{name}={}@{w}", r.url())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A stored record: (ts µs, sport, every field).
type Stored = (u64, u16, Vec<(String, String)>);

/// Every record in the test stream of `r`.
fn records(r: &RedisServer) -> Vec<Stored> {
    r.xrange(STREAM)
        .into_iter()
        .map(|(_, fields)| {
            let get = |k: &str| fields.iter().find(|(f, _)| f == k).unwrap().1.clone();
            (
                get("ts").parse().unwrap(),
                get("sport").parse().unwrap(),
                fields,
            )
        })
        .collect()
}

#[test]
fn ten_thousand_connections_weighted_30_70_stored_exactly_once() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let d = Daemon::connections(&[("A", &a, 30), ("B", &b, 70)], &[]);
    let started_ms = now_ms();
    let n = 10_000;
    let t0 = Instant::now();
    assert_eq!(connect_many(d.listen, n, 16), n);
    eventually(Duration::from_secs(30), "all records stored", || {
        a.xlen(STREAM) + b.xlen(STREAM) >= n as u64
    });
    let elapsed = t0.elapsed();
    eprintln!(
        "{n} connections captured and stored in {elapsed:?} ({:.0} records/s)",
        n as f64 / elapsed.as_secs_f64()
    );

    let (ra, rb) = (records(&a), records(&b));
    assert_eq!(ra.len() + rb.len(), n, "stored exactly once in total");
    // Exact weighting: N·w/W ± 1.
    assert!((2999..=3001).contains(&ra.len()), "A holds {}", ra.len());
    assert!((6999..=7001).contains(&rb.len()), "B holds {}", rb.len());
    // No record in both backends, none twice.
    let ids: HashSet<(u64, u16, String)> = ra
        .iter()
        .chain(&rb)
        .map(|r| {
            (
                r.0,
                r.1,
                r.2.iter().find(|f| f.0 == "src").unwrap().1.clone(),
            )
        })
        .collect();
    assert_eq!(
        ids.len(),
        n,
        "every (ts, src, sport) appears once across backends"
    );
    // What a user reads back: the client's address, the address it reached, the capture time.
    let dport = d.listen.port().to_string();
    for (ts, _, fields) in ra.iter().chain(&rb) {
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).unwrap().1.as_str();
        assert!(get("src").starts_with("127.0.1."), "src {}", get("src"));
        assert_eq!(get("dst"), "127.0.0.1");
        assert_eq!(get("dport"), dport);
        assert_eq!(get("kind"), "conn");
        assert!(*ts / 1000 >= started_ms && *ts / 1000 <= now_ms());
    }

    let v = d.backends();
    assert_eq!(v[0]["name"], "A");
    assert_eq!(v[0]["records_written"], ra.len() as u64);
    assert_eq!(v[1]["records_written"], rb.len() as u64);
    assert_eq!(v[0]["target_share"], 0.3);
    assert_eq!(d.metric("redtap_records_captured_total"), n as f64);
    assert_eq!(
        d.metric("redtap_records_written_total{backend=\"B\"}"),
        rb.len() as f64
    );
}

#[test]
fn live_weight_change_applies_mid_stream() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let d = Daemon::connections(&[("A", &a, 30), ("B", &b, 70)], &[]);
    assert_eq!(connect_many(d.listen, 2000, 8), 2000);
    eventually(Duration::from_secs(20), "first 2000 stored", || {
        a.xlen(STREAM) + b.xlen(STREAM) == 2000
    });
    assert_eq!(a.xlen(STREAM), 600);

    let (status, body) = d.put_weights(r#"{"A":50,"B":50}"#);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer[0]["weight"], 50);
    assert_eq!(answer[1]["target_share"], 0.5);

    assert_eq!(connect_many(d.listen, 2000, 8), 2000);
    eventually(Duration::from_secs(20), "next 2000 stored", || {
        a.xlen(STREAM) + b.xlen(STREAM) == 4000
    });
    assert_eq!(a.xlen(STREAM), 600 + 1000);
    assert_eq!(b.xlen(STREAM), 1400 + 1000);
    let v = d.backends();
    assert_eq!(v[0]["records_routed_since_change"], 1000);
    assert_eq!(v[0]["actual_share_since_change"], 0.5);
    assert_eq!(v[0]["actual_share"], 0.4);
}

#[test]
fn invalid_weights_are_refused_and_change_nothing() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let d = Daemon::connections(&[("A", &a, 30), ("B", &b, 70)], &[]);
    let url = format!("{}/v1/weights", d.admin);
    let before = d.backends();
    let big = format!(r#"{{"A":1,"pad":"{}"}}"#, "x".repeat(70 * 1024));
    for (body, status, needle) in [
        (&br#"{"C":10}"#[..], 422, "unknown backend"),
        (br#"{"A":-5}"#, 400, "integer from 0 to 10000"),
        (br#"{"A":2.5}"#, 400, "integer from 0 to 10000"),
        (br#"{"A":10001}"#, 400, "integer from 0 to 10000"),
        (br#"{"A":0,"B":0}"#, 422, "non-zero"),
        (br#"{"A":50,"B":"#, 400, "not valid JSON"),
        (br#"[50,50]"#, 400, "JSON object"),
        (br#"{}"#, 422, "no weights"),
        (big.as_bytes(), 413, "limit"),
    ] {
        let (got, text) = http("PUT", &url, Some(body)).unwrap();
        assert_eq!(got, status, "{text}");
        let err: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            err["error"].as_str().unwrap().contains(needle),
            "{needle:?} not in {text}"
        );
        assert_eq!(d.backends(), before, "state changed after {text}");
    }
    // A mix of a valid and an invalid weight changes neither.
    let (got, _) = http("PUT", &url, Some(br#"{"A":50,"B":20000}"#)).unwrap();
    assert_eq!(got, 400);
    assert_eq!(d.backends()[0]["weight"], 30);
}

fn retention_two_seconds(schema: &str) {
    let r = RedisServer::start();
    let d = Daemon::connections(&[("A", &r, 1)], &["--schema", schema, "--retention", "2s"]);
    let count = |r: &RedisServer| -> u64 {
        if schema == "stream" {
            r.xlen(STREAM)
        } else {
            r.keys("redtap:ev:t:*").len() as u64
        }
    };
    let first_ms = now_ms();
    assert_eq!(connect_many(d.listen, 100, 4), 100);
    let last_ms = now_ms();
    eventually(Duration::from_secs(1), "100 records stored", || {
        count(&r) == 100
    });
    // Readable until capture + retention − 1 s = first capture + 1 s.
    let until = first_ms + 1000;
    assert!(now_ms() < until, "storing took too long to check at 1 s");
    std::thread::sleep(Duration::from_millis(until - now_ms()));
    assert_eq!(count(&r), 100, "records gone before capture + 1 s");
    // Gone by capture + retention + 1 s (= newest capture + 3 s), with no new records arriving.
    let gone_by = last_ms + 3000;
    while count(&r) > 0 {
        assert!(
            now_ms() < gone_by,
            "records still readable 3 s after capture"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    if schema == "stream" {
        // The stream keys themselves (one per capture second) expire with their records.
        let keys = r.stream_keys(STREAM);
        assert_eq!(keys, vec![STREAM.to_string()], "stream keys left: {keys:?}");
        let mut c = r.conn().unwrap();
        let exists: u64 = redis::cmd("EXISTS").arg(STREAM).query(&mut c).unwrap();
        assert_eq!(exists, 0, "nothing writes the old single stream");
    }
    assert_eq!(
        d.metric("redtap_records_dropped_total{reason=\"expired\"}"),
        0.0
    );
}

#[test]
fn retention_two_seconds_stream() {
    retention_two_seconds("stream");
}

#[test]
fn retention_two_seconds_keys() {
    retention_two_seconds("keys");
}

#[test]
fn sigterm_mid_stream_loses_nothing() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let mut d = Daemon::connections(&[("A", &a, 30), ("B", &b, 70)], &[]);
    let addr = d.listen;
    let load = std::thread::spawn(move || connect_many(addr, 20_000, 8));
    let admin = d.admin.clone();
    eventually(Duration::from_secs(20), "1000 records captured", || {
        common::http_get(&format!("{admin}/metrics"))
            .map(|(_, m)| {
                m.lines()
                    .find_map(|l| l.strip_prefix("redtap_records_captured_total "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
                    >= 1000.0
            })
            .unwrap_or(false)
    });
    let status = d.stop(Duration::from_secs(10));
    assert!(status.success(), "exit {status}\n{}", d.log());
    let connected = load.join().unwrap();
    let summary = d.summary();
    let (captured, written) = (summary.captured, summary.written);
    let stored = a.xlen(STREAM) + b.xlen(STREAM);
    assert!(captured >= 1000);
    assert_eq!(written, captured, "{summary:?}");
    assert_eq!(stored, captured, "every captured record is in Redis");
    assert_eq!(summary.dropped_shutdown, 0);
    assert!(
        stored <= connected as u64,
        "stored {stored} > connected {connected}"
    );
}

#[test]
fn bad_config_exits_64_with_one_line_and_binds_nothing() {
    let port = common::free_port();
    let admin = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let admin_s = format!("127.0.0.1:{admin}");
    let dir = tempfile::tempdir().unwrap();
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "listen = 5\n").unwrap();
    let bad_toml = bad_toml.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--backend", "A=redis://127.0.0.1:1@x"], "weight"),
        (vec!["--backend", "A=redis://127.0.0.1:1@0"], "non-zero"),
        (vec!["--backend", "A=mysql://h@1"], "redis://"),
        (
            vec!["--backend", "A=redis://h@1", "--retention", "forever"],
            "retention",
        ),
        (vec!["--config", "/nonexistent.toml"], "cannot read"),
        (vec!["--config", bad_toml], "line 1"),
        (vec!["--backend", "A=redis://h@1", "--bogus"], "--bogus"),
    ];
    for (args, needle) in cases {
        let out = std::process::Command::new(common::redtap_bin())
            .args(["run", "--listen", &listen, "--admin", &admin_s])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {needle:?} not in {stderr}"
        );
        if !args.contains(&"--bogus") {
            assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        }
        // Nothing was bound.
        std::net::TcpListener::bind(&listen).unwrap();
        std::net::TcpListener::bind(&admin_s).unwrap();
    }
}

/// A start-up failure of the host rather than of the command: exit 1 (not 64), the address on
/// stderr, and nothing left bound.
#[test]
fn a_listen_port_in_use_exits_1_and_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let admin_s = format!("127.0.0.1:{}", common::free_port());
    let out = std::process::Command::new(common::redtap_bin())
        .args(["run", "--capture", "connections", "--listen", &listen])
        .args(["--admin", &admin_s, "--backend", "A=redis://127.0.0.1:1@1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("redtap: cannot listen on {listen}")),
        "{stderr}"
    );
    std::net::TcpListener::bind(&admin_s).unwrap();
}

#[test]
fn weights_cli_shows_and_changes_weights() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let d = Daemon::connections(&[("A", &a, 30), ("B", &b, 70)], &[]);
    let cli = |args: &[&str]| {
        std::process::Command::new(common::redtap_bin())
            .arg("weights")
            .args(args)
            .args(["--admin", &d.admin])
            .output()
            .unwrap()
    };
    let out = cli(&[]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("BACKEND") && table.contains("30.0%"),
        "{table}"
    );

    let out = cli(&["set", "A=50", "B=50"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.backends()[0]["weight"], 50);
    // Nothing routed since the change yet: SINCE says so rather than 0.0%.
    let table = String::from_utf8_lossy(&out.stdout);
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("A "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!((row[3], row[5]), ("50.0%", "-"), "{table}");

    let out = cli(&["set", "A=50", "C=1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown backend"));
    let out = cli(&["set", "A=1.5"]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(d.backends()[0]["weight"], 50);
    let out = cli(&["set", "A=60", "A=70"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("given twice"));
    assert_eq!(d.backends()[0]["weight"], 50);
}

#[test]
fn weights_cli_takes_the_admin_address_as_run_does_or_from_the_config_file() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let d = Daemon::connections(&[("A", &a, 30), ("B", &b, 70)], &[]);
    let addr = d.admin.trim_start_matches("http://");
    let weights = |args: &[&str]| {
        let out = std::process::Command::new(common::redtap_bin())
            .arg("weights")
            .args(args)
            .env_remove("REDTAP_ADMIN")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, table) = weights(&["--admin", addr]);
    assert_eq!(code, Some(0), "{table}");
    assert!(table.contains("30.0%"), "{table}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("redtap.toml");
    std::fs::write(&file, format!("admin = \"{addr}\"\n")).unwrap();
    let (code, table) = weights(&["-c", file.to_str().unwrap(), "set", "A=40", "B=60"]);
    assert_eq!(code, Some(0), "{table}");
    assert_eq!(d.backends()[0]["weight"], 40);
}

#[test]
fn sighup_reloads_weights_from_the_config_file() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redtap.toml");
    let write = |wa: i64, wb: i64| {
        std::fs::write(
            &path,
            format!(
                "agent = \"t\"\n[[backend]]\nname = \"A\"\nurl = \"{}\"\nweight = {wa}\n\
                 [[backend]]\nname = \"B\"\nurl = \"{}\"\nweight = {wb}\n",
                a.url(),
                b.url()
            ),
        )
        .unwrap()
    };
    write(30, 70);
    let d = Daemon::start(&[
        "--capture",
        "connections",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert_eq!(d.backends()[1]["weight"], 70);
    write(10, 90);
    d.signal("HUP");
    eventually(Duration::from_secs(5), "weights reloaded", || {
        d.backends()[0]["weight"] == 10
    });
    eventually(Duration::from_secs(5), "the reload logged by name", || {
        d.log().contains("weights=A=10 B=90")
    });
    // A bad file changes nothing.
    write(-1, 90);
    d.signal("HUP");
    eventually(Duration::from_secs(5), "bad reload logged", || {
        d.log().contains("weights unchanged")
    });
    assert_eq!(d.backends()[0]["weight"], 10);
}

#[test]
fn ipv6_listen_records_ipv6_addresses() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    }
    let r = RedisServer::start();
    let br = backend("A", &r, 1);
    let port = common::free_port();
    let d = Daemon::start_on(
        &format!("[::1]:{port}"),
        &["--capture", "connections", "--agent", "t", "--backend", &br],
    );
    assert_eq!(connect_many(d.listen, 10, 2), 10);
    eventually(Duration::from_secs(10), "10 stored", || {
        r.xlen(STREAM) == 10
    });
    for (_, _, fields) in records(&r) {
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).unwrap().1.clone();
        assert_eq!(get("src"), "::1");
        assert_eq!(get("dst"), "::1");
        assert_eq!(get("dport"), port.to_string());
    }
}
