//! Fault injection against real redis-server processes: each test drives a known number of
//! records and checks that every one is stored exactly once, or accounted as dropped with the
//! reason the test expects.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{connect_many, eventually, paced_connections, Daemon, RedisServer};

const STREAM: &str = "redtap:events:t";

fn backend(name: &str, r: &RedisServer, w: u32) -> String {
    format!("{name}={}@{w}", r.url())
}

/// Every (src, sport, ts) stored in the test stream of each server; panics on a duplicate.
fn stored_ids(servers: &[&RedisServer]) -> HashSet<(String, String, String)> {
    let mut ids = HashSet::new();
    for r in servers {
        for (_, fields) in r.xrange(STREAM) {
            let get = |k: &str| fields.iter().find(|(f, _)| f == k).unwrap().1.clone();
            let id = (get("src"), get("sport"), get("ts"));
            assert!(ids.insert(id.clone()), "record stored twice: {id:?}");
        }
    }
    ids
}

fn metric(d: &Daemon, name: &str) -> f64 {
    d.metric(name)
}

fn is_up(d: &Daemon, i: usize) -> bool {
    d.backends()[i]["up"].as_bool().unwrap()
}

#[test]
fn kill9_one_backend_then_restart_loses_nothing_and_stores_nothing_twice() {
    let mut a = RedisServer::start_durable();
    let mut b = RedisServer::start_durable();
    let d = Daemon::connections(&[("A", &a, 30), ("B", &b, 70)], &[]);
    let load = paced_connections(d.listen, 6000, 20, Duration::from_millis(20));
    eventually(Duration::from_secs(20), "1000 records captured", || {
        metric(&d, "redtap_records_captured_total") >= 1000.0
    });
    let killed = Instant::now();
    b.kill9();
    eventually(Duration::from_secs(3), "B marked down", || !is_up(&d, 1));
    eprintln!("kill -9 detected in {:?}", killed.elapsed());
    // While B is down, every new record goes to A: B's routed count stands still.
    let routed = |i: usize| d.backends()[i]["records_routed"].as_u64().unwrap();
    let (a0, b0) = (routed(0), routed(1));
    eventually(Duration::from_secs(10), "A takes 500 more records", || {
        routed(0) >= a0 + 500
    });
    assert_eq!(routed(1), b0, "nothing routed to B while it is down");
    b.restart();
    eventually(Duration::from_secs(5), "B up again", || is_up(&d, 1));
    let b_after_restart = d.backends()[1]["records_written"].as_u64().unwrap();
    let connected = load.join().unwrap();
    assert_eq!(connected, 6000);
    eventually(Duration::from_secs(20), "every record stored", || {
        a.xlen(STREAM) + b.xlen(STREAM) >= 6000
    });
    let ids = stored_ids(&[&a, &b]);
    assert_eq!(ids.len(), 6000, "every record stored once");
    assert_eq!(metric(&d, "redtap_records_captured_total"), 6000.0);
    assert!(
        d.backends()[1]["records_written"].as_u64().unwrap() > b_after_restart,
        "B takes records again after its return"
    );
    // Exact weighting resumes: the next 1000 records split 300/700 (±1).
    let (a0, b0) = (routed(0), routed(1));
    assert_eq!(connect_many(d.listen, 1000, 4), 1000);
    eventually(Duration::from_secs(10), "1000 more routed", || {
        routed(0) + routed(1) == a0 + b0 + 1000
    });
    let (da, db) = (routed(0) - a0, routed(1) - b0);
    assert!(
        (299..=301).contains(&da) && (699..=701).contains(&db),
        "{da}/{db}"
    );
    let _ = &mut a;
}

#[test]
fn sigstop_one_backend_is_detected_and_nothing_is_lost() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let d = Daemon::connections(&[("A", &a, 50), ("B", &b, 50)], &[]);
    let load = paced_connections(d.listen, 4000, 40, Duration::from_millis(25));
    eventually(Duration::from_secs(20), "500 records captured", || {
        metric(&d, "redtap_records_captured_total") >= 500.0
    });
    let stopped = Instant::now();
    b.signal("STOP");
    // Defaults: 2 failures × 750 ms timeout → down in about 1.6 s.
    eventually(Duration::from_secs(3), "hung B marked down", || {
        !is_up(&d, 1)
    });
    let detected = stopped.elapsed();
    eprintln!("SIGSTOP detected in {detected:?}");
    std::thread::sleep(Duration::from_secs(5).saturating_sub(stopped.elapsed()));
    b.signal("CONT");
    eventually(Duration::from_secs(5), "B up again", || is_up(&d, 1));
    assert_eq!(load.join().unwrap(), 4000);
    eventually(Duration::from_secs(20), "every record stored", || {
        a.xlen(STREAM) + b.xlen(STREAM) >= 4000
    });
    std::thread::sleep(Duration::from_millis(500)); // a late duplicate would show now
    assert_eq!(stored_ids(&[&a, &b]).len(), 4000);
    assert_eq!(a.xlen(STREAM) + b.xlen(STREAM), 4000);
}

#[test]
fn every_backend_down_then_back_buffers_and_expires_by_capture_time() {
    let mut a = RedisServer::start_durable();
    let mut b = RedisServer::start_durable();
    let d = Daemon::connections(&[("A", &a, 30), ("B", &b, 70)], &["--retention", "8s"]);
    a.kill9();
    b.kill9();
    let down_at = Instant::now();
    eventually(Duration::from_secs(5), "both down", || {
        !is_up(&d, 0) && !is_up(&d, 1)
    });
    // Wave 1 will be past retention when the backends return; wave 2 will not.
    assert_eq!(connect_many(d.listen, 500, 4), 500);
    std::thread::sleep(Duration::from_secs(5));
    let wave2_from = common_now_us();
    assert_eq!(connect_many(d.listen, 500, 4), 500);
    // Capture time is accept time, which may follow the client's connect() by a little.
    eventually(Duration::from_secs(2), "wave 2 captured", || {
        metric(&d, "redtap_records_captured_total") == 1000.0
    });
    let wave2_to = common_now_us();
    eventually(Duration::from_secs(2), "wave 2 buffered", || {
        metric(&d, "redtap_buffered_records") >= 500.0
    });
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed()));
    a.restart();
    b.restart();
    eventually(Duration::from_secs(10), "wave 2 delivered", || {
        a.xlen(STREAM) + b.xlen(STREAM) == 500
    });
    assert_eq!(
        metric(&d, "redtap_records_dropped_total{reason=\"expired\"}"),
        500.0
    );
    for r in [&a, &b] {
        for (_, fields) in r.xrange(STREAM) {
            let ts: u64 = fields
                .iter()
                .find(|f| f.0 == "ts")
                .unwrap()
                .1
                .parse()
                .unwrap();
            assert!(
                (wave2_from..=wave2_to).contains(&ts),
                "only wave 2 is stored: ts {ts} outside {wave2_from}..={wave2_to}"
            );
        }
    }
    // Delivered late, they still leave at capture time + retention (+1 s), not write time.
    let gone_by_us = wave2_to + 9_000_000;
    while a.xlen(STREAM) + b.xlen(STREAM) > 0 {
        assert!(
            common_now_us() < gone_by_us,
            "records outlived capture + retention"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        common_now_us() >= wave2_from + 7_000_000,
        "records left before capture + retention − 1 s"
    );
}

fn common_now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[test]
fn backend_at_maxmemory_is_failing_not_silently_dropped() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    // B runs out of memory once redtap runs (it holds its lease there): its writes are refused.
    let d = Daemon::connections(&[("A", &a, 50), ("B", &b, 50)], &[]);
    let mut c = b.conn().unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(b.used_memory().to_string())
        .query(&mut c)
        .unwrap();
    assert_eq!(connect_many(d.listen, 1000, 4), 1000);
    eventually(Duration::from_secs(10), "B's write errors counted", || {
        metric(&d, "redtap_write_errors_total{backend=\"B\"}") > 0.0
    });
    eventually(
        Duration::from_secs(10),
        "B down, and says it is out of memory",
        || d.backends()[1]["down_cause_code"] == "oom",
    );
    // While down, its probe (a small expiring write) is refused too, counted by cause.
    eventually(
        Duration::from_secs(5),
        "B's probes counted as refused for OOM",
        || {
            d.metrics().contains(
                "redtap_backend_command_errors_total{backend=\"B\",command=\"SET\",cause=\"oom\"}",
            )
        },
    );
    assert!(d.log().contains("OOM"), "the OOM refusal is logged");
    // Out of memory, B still answers PING; the write probe keeps it down instead of flapping.
    eventually(Duration::from_secs(5), "B marked down", || !is_up(&d, 1));
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert!(!is_up(&d, 1), "B flapped back up while still out of memory");
        std::thread::sleep(Duration::from_millis(50));
    }
    // B's records wait for it; none is dropped.
    let dropped: f64 = ["expired", "overflow", "shutdown"]
        .iter()
        .map(|r| {
            metric(
                &d,
                &format!("redtap_records_dropped_total{{reason=\"{r}\"}}"),
            )
        })
        .sum();
    assert_eq!(dropped, 0.0);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query(&mut c)
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "all delivered once memory frees",
        || a.xlen(STREAM) + b.xlen(STREAM) == 1000,
    );
    assert_eq!(stored_ids(&[&a, &b]).len(), 1000);
}

#[test]
fn sigterm_then_restart_loses_nothing_and_keeps_api_weights() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let (ba, bb) = (backend("A", &a, 30), backend("B", &b, 70));
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let admin = format!("127.0.0.1:{}", common::free_port());
    let args = [
        "--capture",
        "connections",
        "--agent",
        "t",
        "--backend",
        &ba,
        "--backend",
        &bb,
    ];
    let mut d = Daemon::start_in(dir.path(), &listen, &admin, &args);
    let (status, body) = d.put_weights(r#"{"A":50,"B":50}"#);
    assert_eq!(status, 200, "{body}");
    let load = paced_connections(d.listen, 3000, 30, Duration::from_millis(10));
    eventually(Duration::from_secs(20), "500 captured", || {
        metric(&d, "redtap_records_captured_total") >= 500.0
    });
    assert!(d.stop(Duration::from_secs(10)).success());
    let s = d.summary();
    assert_eq!(s.written, s.captured, "{s:?}");
    assert_eq!(a.xlen(STREAM) + b.xlen(STREAM), s.captured);
    let connected_before_restart = load.join().unwrap();
    assert!(connected_before_restart as u64 >= s.captured);

    let d2 = Daemon::start_in(dir.path(), &listen, &admin, &args);
    let v = d2.backends();
    assert_eq!(v[0]["weight"], 50, "API weights survive the restart");
    assert_eq!(v[1]["weight"], 50);
    let started = d2.log();
    let line = started
        .lines()
        .find(|l| l.contains("redtap running"))
        .unwrap();
    assert!(
        line.contains("@50 ") && line.contains("restored from the state file"),
        "the start-up line shows the weights in force: {line}"
    );
    assert!(line.contains("capture=connections"), "{line}");
    assert_eq!(connect_many(d2.listen, 100, 2), 100);
    eventually(Duration::from_secs(10), "new records stored", || {
        a.xlen(STREAM) + b.xlen(STREAM) == s.captured + 100
    });
    assert_eq!(
        stored_ids(&[&a, &b]).len() as u64,
        s.captured + 100,
        "IDs continue after the restart without clashing"
    );
}

#[test]
fn idle_connections_past_the_cap_and_a_gigabyte_client_keep_memory_bounded() {
    use std::io::Write;
    let r = RedisServer::start();
    let d = Daemon::connections(
        &[("A", &r, 1)],
        &["--max-connections", "20", "--idle-timeout", "2s"],
    );
    let rss_start = d.rss_kib();
    // 100 idle clients: 20 are served, the rest wait in the backlog until idle ones time out.
    let idle: Vec<_> = (0..100)
        .map(|i| {
            common::connect_from(
                std::net::Ipv4Addr::new(127, 0, 3, 1 + (i % 200) as u8).into(),
                d.listen,
            )
            .unwrap()
        })
        .collect();
    eventually(Duration::from_secs(5), "20 served", || {
        metric(&d, "redtap_records_captured_total") == 20.0
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        metric(&d, "redtap_records_captured_total"),
        20.0,
        "the cap holds"
    );
    eventually(Duration::from_secs(20), "all 100 served in turn", || {
        metric(&d, "redtap_records_captured_total") == 100.0
    });
    drop(idle);

    // One client sends 1 GiB: read and discarded without buffering.
    let mut s = std::net::TcpStream::connect(d.listen).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut peak = 0;
    for i in 0..1024 {
        s.write_all(&chunk).unwrap();
        if i % 64 == 0 {
            peak = peak.max(d.rss_kib());
        }
    }
    drop(s);
    peak = peak.max(d.rss_kib());
    eprintln!("RSS: {rss_start} KiB at start, peak {peak} KiB during 100 idle clients + 1 GiB");
    assert!(
        peak < rss_start + 32 * 1024,
        "RSS grew from {rss_start} KiB to {peak} KiB"
    );
    // Service continues.
    assert_eq!(connect_many(d.listen, 10, 2), 10);
    eventually(Duration::from_secs(5), "all stored", || {
        r.xlen(STREAM) == 111
    });
}

#[test]
fn admin_api_beyond_loopback_requires_a_token() {
    let r = RedisServer::start();
    let br = backend("A", &r, 1);
    // Refused at start without a token.
    let out = std::process::Command::new(common::redtap_bin())
        .args(["run", "--listen", "127.0.0.1:1", "--admin", "0.0.0.0:1"])
        .args(["--backend", &br])
        .env_remove("REDTAP_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin-token"));

    let token = "0123456789abcdef-secret";
    let d = Daemon::start(&[
        "--capture",
        "connections",
        "--agent",
        "t",
        "--admin-token",
        token,
        "--backend",
        &br,
    ]);
    let (status, _) = common::http_get(&format!("{}/v1/backends", d.admin)).unwrap();
    assert_eq!(status, 401);
    let (status, _) = d.put_weights(r#"{"A":5}"#);
    assert_eq!(status, 401);
    assert_eq!(
        common::http_get(&format!("{}/healthz", d.admin)).unwrap().0,
        200
    );
    let out = std::process::Command::new(common::redtap_bin())
        .args([
            "weights", "set", "A=7", "--admin", &d.admin, "--token", token,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.log().contains(token), "the token never appears in logs");
}

#[test]
fn redis_password_is_used_and_never_shown() {
    let pass = "s3cr3t-Pa55word";
    let r = RedisServer::start_with(&["--requirepass", pass]);
    let url = format!("A=redis://:{pass}@127.0.0.1:{}@1", r.port);
    let d = Daemon::start(&[
        "--capture",
        "connections",
        "--agent",
        "t",
        "--backend",
        &url,
    ]);
    assert_eq!(connect_many(d.listen, 50, 2), 50);
    let mut c = redis::Client::open(format!("redis://:{pass}@127.0.0.1:{}", r.port))
        .unwrap()
        .get_connection()
        .unwrap();
    eventually(Duration::from_secs(10), "stored with AUTH", || {
        common::xlen_on(&mut c, STREAM).unwrap() == 50
    });
    let api = serde_json::to_string(&d.backends()).unwrap();
    assert!(api.contains(":***@"), "{api}");
    for (what, text) in [("API", api), ("metrics", d.metrics()), ("log", d.log())] {
        assert!(!text.contains(pass), "password shown in the {what}");
    }
}

#[test]
fn out_of_file_descriptors_backs_off_without_spinning() {
    let r = RedisServer::start();
    let br = backend("A", &r, 1);
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let admin = format!("127.0.0.1:{}", common::free_port());
    // 64 descriptors: the runtime, Redis and the admin API take some; clients take the rest.
    let d = Daemon::start_wrapped(
        &["prlimit", "--nofile=64", "--"],
        dir.path(),
        &listen,
        &admin,
        &["--capture", "connections", "--agent", "t", "--backend", &br],
    );
    let clients: Vec<_> = (0..100)
        .map(|i| {
            common::connect_from(
                std::net::Ipv4Addr::new(127, 0, 4, 1 + i as u8).into(),
                d.listen,
            )
            .unwrap()
        })
        .collect();
    eventually(Duration::from_secs(5), "accept fails with EMFILE", || {
        d.log().contains("accept failed")
    });
    let before = d.cpu_ticks();
    std::thread::sleep(Duration::from_secs(2));
    let used = d.cpu_ticks() - before;
    // A busy loop would burn about 200 ticks (2 s); backing off uses a few.
    assert!(
        used < 50,
        "{used} CPU ticks in 2 s while out of descriptors"
    );
    drop(clients);
    eventually(
        Duration::from_secs(15),
        "every client recorded once descriptors free up",
        || r.xlen(STREAM) == 100,
    );
    assert_eq!(connect_many(d.listen, 10, 2), 10);
    eventually(Duration::from_secs(5), "service continues", || {
        r.xlen(STREAM) == 110
    });
}

#[test]
fn hold_mode_keeps_the_weighting_and_delivers_when_the_backend_returns() {
    let a = RedisServer::start();
    let mut b = RedisServer::start_durable();
    let d = Daemon::connections(
        &[("A", &a, 50), ("B", &b, 50)],
        &["--on-backend-down", "hold"],
    );
    b.kill9();
    assert_eq!(connect_many(d.listen, 1000, 4), 1000);
    eventually(Duration::from_secs(5), "B marked down", || !is_up(&d, 1));
    eventually(Duration::from_secs(10), "A's half stored", || {
        a.xlen(STREAM) == 500
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.xlen(STREAM), 500, "A never takes B's share in hold mode");
    assert!(
        metric(&d, "redtap_buffered_records") > 0.0,
        "B's records wait"
    );
    b.restart();
    eventually(Duration::from_secs(10), "B's half delivered", || {
        b.xlen(STREAM) == 500
    });
    assert_eq!(stored_ids(&[&a, &b]).len(), 1000);
}

#[test]
fn shutdown_with_every_backend_down_and_a_full_buffer_ends_within_grace() {
    let mut a = RedisServer::start();
    let mut d = Daemon::connections(
        &[("A", &a, 1)],
        &["--buffer-max", "2KiB", "--batch-size", "8", "--grace", "1s"],
    );
    a.kill9();
    eventually(Duration::from_secs(5), "A down", || !is_up(&d, 0));
    // More than the buffer holds (2 KiB ≈ 21 records; it takes 8 at a time while it has room
    // for them, so it settles between 14 and 21): accepting stalls, clients wait in the backlog.
    let addr = d.listen;
    let load = std::thread::spawn(move || connect_many(addr, 300, 4));
    eventually(Duration::from_secs(5), "the buffer fills", || {
        metric(&d, "redtap_buffered_records") >= 12.0
    });
    let t0 = Instant::now();
    assert!(d.stop(Duration::from_secs(10)).success());
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "shutdown took {took:?} with a 1 s grace"
    );
    let s = d.summary();
    assert_eq!(s.written, 0);
    assert_eq!(
        s.dropped_shutdown + s.dropped_expired + s.dropped_overflow,
        s.captured,
        "every captured record accounted for: {s:?}"
    );
    assert_eq!(
        s.dropped_overflow, 0,
        "connections mode waits instead of dropping"
    );
    load.join().unwrap();
}

#[test]
fn hold_mode_with_a_small_buffer_waits_instead_of_growing() {
    let a = RedisServer::start();
    let mut b = RedisServer::start_durable();
    let d = Daemon::connections(
        &[("A", &a, 50), ("B", &b, 50)],
        &[
            "--on-backend-down",
            "hold",
            "--buffer-max",
            "4KiB",
            "--batch-size",
            "8",
            "--queue-capacity",
            "64",
        ],
    );
    b.kill9();
    eventually(Duration::from_secs(5), "B marked down", || !is_up(&d, 1));
    let addr = d.listen;
    let load = std::thread::spawn(move || connect_many(addr, 2000, 4));
    // B's share waits within the budget (4 KiB ≈ 42 records), never more; past it and the
    // queues (64 records to the balancer, 16 batches of 8 per writer), accepting stalls and the
    // rest of the clients wait in the kernel's backlog.
    eventually(Duration::from_secs(5), "the buffer fills", || {
        metric(&d, "redtap_buffered_records") >= 30.0
    });
    std::thread::sleep(Duration::from_millis(300));
    let buffered = metric(&d, "redtap_buffered_records");
    assert!(buffered <= 42.0 + 8.0, "buffer grew to {buffered} records");
    let captured = metric(&d, "redtap_records_captured_total");
    assert!(captured < 600.0, "capture was not held back: {captured}");

    b.restart();
    assert_eq!(load.join().unwrap(), 2000);
    eventually(Duration::from_secs(20), "everything delivered", || {
        a.xlen(STREAM) + b.xlen(STREAM) == 2000
    });
    assert_eq!(stored_ids(&[&a, &b]).len(), 2000);
    assert_eq!(
        metric(&d, "redtap_records_dropped_total{reason=\"overflow\"}"),
        0.0
    );
}
