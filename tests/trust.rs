//! Can the operator trust what redtap says and does? One Redis one writer, health that says why,
//! bounded settings, secrets kept out of errors — against real redis-server processes and the
//! real `redtap` binary.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{connect_many, eventually, free_port, Daemon, RedisServer};

/// `redtap run` with `args` on free ports, for a command that is expected to exit at once.
fn run_refused(args: &[&str]) -> Output {
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(common::redtap_bin())
        .args(["run", "--listen", &listen, "--admin", &admin])
        .args(["--capture", "connections", "--state-file", "off"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a refusal is immediate; anything still running after 20 s is a failure.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} still running after 20 s:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn backend(name: &str, r: &RedisServer, w: u32) -> String {
    format!("{name}={}@{w}", r.url())
}

#[test]
fn every_numeric_setting_is_bounded_and_never_panics() {
    let r = RedisServer::start();
    let b = backend("A", &r, 1);
    let max = u64::MAX.to_string();
    let huge = "100000000000000000000000";
    let refused: Vec<(&str, &str)> = vec![
        ("--retention", "0s"),
        ("--retention", "1000000000d"),
        ("--retention", "100000000000000000000d"),
        ("--idle-timeout", "0s"),
        ("--idle-timeout", "1000000000d"),
        ("--grace", "1000000000d"),
        ("--grace", "-1s"),
        ("--health-timeout", "0ms"),
        ("--health-timeout", "1000000000d"),
        ("--down-after", "0"),
        ("--down-after", &max),
        ("--up-after", "0"),
        ("--up-after", "4294967295"),
        ("--max-connections", "0"),
        ("--max-connections", &max),
        ("--queue-capacity", "0"),
        ("--queue-capacity", &max),
        ("--queue-capacity", huge),
        ("--batch-size", "0"),
        ("--batch-size", &max),
        ("--buffer-max", "0"),
        ("--buffer-max", "16EiB"),
        ("--buffer-max", &max),
        ("--ring-size", "0"),
        ("--ring-size", &max),
    ];
    for (flag, value) in &refused {
        let out = run_refused(&["--backend", &b, &format!("{flag}={value}")]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{flag} {value}: {err}");
        assert!(!err.contains("panicked"), "{flag} {value}: {err}");
        assert!(
            err.contains(flag),
            "{flag} {value}: message names the flag: {err}"
        );
    }

    // The extremes that are accepted run and stop cleanly.
    for extremes in [
        vec![
            "--retention",
            "30d",
            "--idle-timeout",
            "1d",
            "--grace",
            "1h",
            "--health-timeout",
            "60s",
            "--down-after",
            "1000",
            "--up-after",
            "1000",
            "--max-connections",
            "1000000",
            "--queue-capacity",
            "16777216",
            "--batch-size",
            "100000",
            "--buffer-max",
            "64GiB",
        ],
        vec![
            "--retention",
            "1s",
            "--idle-timeout",
            "100ms",
            "--grace",
            "0s",
            "--health-timeout",
            "10ms",
            "--down-after",
            "1",
            "--up-after",
            "1",
            "--max-connections",
            "1",
            "--queue-capacity",
            "1",
            "--batch-size",
            "1",
            "--buffer-max",
            "1KiB",
        ],
    ] {
        let mut args = vec!["--backend", &b, "--state-file", "off"];
        args.extend(extremes.iter().copied());
        let mut d = Daemon::connections(&[], &args);
        assert_eq!(connect_many(d.listen, 20, 2), 20);
        eventually(Duration::from_secs(10), "20 records written", || {
            r.xlen("redtap:events:t") >= 20
        });
        assert!(d.stop(Duration::from_secs(10)).success(), "{}", d.log());
        assert!(!d.log().contains("panicked"), "{}", d.log());
        redis::cmd("FLUSHALL")
            .query::<()>(&mut r.conn().unwrap())
            .unwrap();
    }
}

#[test]
fn an_invalid_backend_never_echoes_its_password() {
    for bad in [
        "A=redis://u:secret@host:badport@50",
        "A=redis://:secret@@50",
        "A=redis://u:secret@127.0.0.1:6379@fifty",
        "A=redis://u:secret@127.0.0.1:6379@-1",
        "A=redis://u:secret@127.0.0.1:6379",
        "A=redis://u:secr@et",
        "redis://u:secret@127.0.0.1:6379@50",
        "A=redis://u:secret@[::1@50",
        "A=rediss://u:secret@127.0.0.1:6379/x@50",
    ] {
        let out = run_refused(&["--backend", bad]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{bad}: {err}");
        assert!(!err.contains("secret"), "{bad}: password echoed: {err}");
        assert!(!err.contains("secr"), "{bad}: password echoed: {err}");
    }
}

#[test]
fn two_names_for_one_redis_are_refused_at_start() {
    let r = RedisServer::start();
    let a = format!("A=redis://127.0.0.1:{}@50", r.port);
    let b = format!("B=redis://localhost:{}@50", r.port);
    let out = run_refused(&["--backend", &a, "--backend", &b]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("\"A\" and \"B\" are the same Redis server"),
        "{err}"
    );
    // Another database of the same server is another keyspace: accepted.
    let b1 = format!("B=redis://localhost:{}/1@50", r.port);
    let mut d = Daemon::connections(&[], &["--backend", &a, "--backend", &b1]);
    assert!(d.stop(Duration::from_secs(10)).success());
}

#[test]
fn a_duplicate_reached_late_is_excluded_and_says_why() {
    let r = RedisServer::start_with(&["--requirepass", "pw"]);
    // B's user does not exist yet: B cannot be reached (or identified) at start.
    let a = format!("A=redis://:pw@127.0.0.1:{}@50", r.port);
    let b = format!("B=redis://late:latepw@localhost:{}@50", r.port);
    let d = Daemon::connections(&[], &["--backend", &a, "--backend", &b]);
    eventually(Duration::from_secs(10), "B down: auth", || {
        d.backends()[1]["down_cause_code"] == "auth"
    });
    assert!(d.log().contains("authentication failed"), "{}", d.log());
    let mut c = redis::Client::open(format!("redis://:pw@127.0.0.1:{}", r.port))
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("ACL")
        .arg(&["SETUSER", "late", "on", ">latepw", "~*", "+@all"])
        .query::<()>(&mut c)
        .unwrap();
    eventually(Duration::from_secs(10), "B excluded as A's server", || {
        let v = d.backends();
        v[1]["excluded"] == true && v[1]["down_cause"] == "same server as backend A"
    });
    // Every record now goes to A; B takes none.
    let before = d.backends()[1]["records_routed"].as_u64().unwrap();
    assert_eq!(connect_many(d.listen, 50, 2), 50);
    eventually(Duration::from_secs(10), "50 more records to A", || {
        d.backends()[0]["records_written"].as_u64().unwrap() >= 50
    });
    assert_eq!(d.backends()[1]["records_routed"].as_u64().unwrap(), before);
    assert!(
        d.metrics()
            .contains("redtap_backend_down_cause{backend=\"B\",cause=\"same_server\"} 1"),
        "{}",
        d.metrics()
    );
}

#[test]
fn the_same_agent_twice_is_refused_naming_the_holder() {
    let r = RedisServer::start();
    let b = backend("A", &r, 1);
    let mut first = Daemon::connections(&[], &["--backend", &b]);
    let lease = || -> Option<String> {
        redis::cmd("GET")
            .arg("redtap:lease:t")
            .query(&mut r.conn().unwrap())
            .unwrap()
    };
    let held = lease().expect("the first agent holds its lease");
    assert!(held.contains(&format!(" {} ", first.pid())), "{held}");

    let out = run_refused(&["--agent", "t", "--backend", &b]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("already runs on backend \"A\""), "{err}");
    assert!(err.contains(&format!("pid {}", first.pid())), "{err}");
    // Another agent name on the same backend is fine.
    let mut other = Daemon::start(&["--capture", "connections", "--agent", "u", "--backend", &b]);
    assert!(other.stop(Duration::from_secs(10)).success());

    // A clean stop releases the lease.
    assert!(first.stop(Duration::from_secs(10)).success());
    assert_eq!(lease(), None);

    // A holder killed without releasing (SIGKILL) is gone: its lease is taken over at once.
    let killed = Daemon::connections(&[], &["--backend", &b]);
    let pid = killed.pid();
    drop(killed); // SIGKILL
    assert!(lease().is_some_and(|v| v.contains(&format!(" {pid} "))));
    let mut next = Daemon::connections(&[], &["--backend", &b]);
    assert!(next.log().contains("took over the lease"), "{}", next.log());
    assert!(lease().is_some_and(|v| v.contains(&format!(" {} ", next.pid()))));
    assert!(next.stop(Duration::from_secs(10)).success());
}

#[test]
fn health_says_why_a_backend_is_down() {
    let good = RedisServer::start();
    let locked = RedisServer::start_with(&["--requirepass", "right"]);
    let nothing = free_port();
    let d = Daemon::connections(
        &[],
        &[
            "--backend",
            &format!("P=redis://127.0.0.1:{nothing}@1"),
            "--backend",
            &format!("W=redis://:hunter2xyz@127.0.0.1:{}@1", locked.port),
            "--backend",
            &backend("G", &good, 1),
        ],
    );
    // At start, each is named with its own cause.
    let log = d.log();
    let line = |name: &str| {
        log.lines()
            .find(|l| l.contains(&format!("backend={name}")) && l.contains("at start"))
            .unwrap_or_else(|| panic!("no start-up line for {name}:\n{log}"))
            .to_string()
    };
    assert!(line("P").contains("connection refused"), "{}", line("P"));
    assert!(line("W").contains("authentication failed"), "{}", line("W"));
    assert!(line("G").contains("backend up at start"), "{}", line("G"));
    assert!(!log.contains("hunter2xyz"), "password in the log:\n{log}");

    eventually(Duration::from_secs(10), "P and W down with causes", || {
        let v = d.backends();
        v[0]["down_cause"] == "connection refused"
            && v[1]["down_cause_code"] == "auth"
            && v[2]["up"] == true
            && v[2]["down_cause"].is_null()
    });
    let m = d.metrics();
    assert!(
        m.contains("redtap_backend_down_cause{backend=\"P\",cause=\"refused\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("redtap_backend_down_cause{backend=\"W\",cause=\"auth\"} 1"),
        "{m}"
    );

    // Out of memory: writes fail, and the cause says so (and the failed probe is counted).
    redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "1"])
        .query::<()>(&mut good.conn().unwrap())
        .unwrap();
    let addr = d.listen;
    eventually(Duration::from_secs(15), "G down: OOM", || {
        connect_many(addr, 3, 1);
        d.backends()[2]["down_cause_code"] == "oom"
    });
    assert!(d.log().contains("out of memory (OOM)"), "{}", d.log());
    eventually(Duration::from_secs(5), "OOM probe counted", || {
        d.metrics().lines().any(|l| {
            l.starts_with("redtap_backend_command_errors_total{")
                && l.contains("backend=\"G\"")
                && l.contains("cause=\"oom\"")
                && !l.ends_with(" 0")
        })
    });
}

#[test]
fn in_hold_mode_a_stalled_backend_never_stalls_the_other() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        eprintln!("SKIPPED: packets mode needs root or CAP_NET_RAW (CI runs as root)");
        return;
    }
    let a = RedisServer::start();
    let b = RedisServer::start();
    let port = free_port();
    // A small capture queue and small batches: a balancer that waited on B's full writer queue
    // would fill the capture queue within a few hundred segments and drop (`queue_full`).
    let d = Daemon::start_on(
        &format!("127.0.0.1:{port}"),
        &[
            "--serve",
            "none",
            "--on-backend-down",
            "hold",
            "--queue-capacity",
            "64",
            "--batch-size",
            "16",
            "--agent",
            "t",
            "--backend",
            &backend("A", &a, 50),
            "--backend",
            &backend("B", &b, 50),
        ],
    );
    b.signal("STOP");
    let n = 4000;
    let out = Command::new("timeout")
        .args(["60", "hping3", "-q", "-S", "-p", &port.to_string()])
        .args([
            "-s",
            "1024",
            "-c",
            &n.to_string(),
            "-i",
            "u200",
            "127.0.0.1",
        ])
        .output()
        .expect("hping3 not found: apt-get install hping3");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        report.contains(&format!("{n} packets transmitted")),
        "{report}"
    );
    let routed = |i: usize| d.backends()[i]["records_routed"].as_u64().unwrap();
    // While B is stopped, A stores its whole share.
    eventually(Duration::from_secs(20), "every SYN routed", || {
        routed(0) + routed(1) == n
    });
    eventually(
        Duration::from_secs(20),
        "A stored its share while B is stopped",
        || a.xlen("redtap:events:t") == routed(0),
    );
    assert_eq!(
        d.metric("redtap_records_dropped_total{reason=\"queue_full\"}"),
        0.0
    );
    // B comes back and catches up; nothing was dropped on the way.
    b.signal("CONT");
    eventually(Duration::from_secs(30), "B caught up", || {
        b.xlen("redtap:events:t") == routed(1)
    });
    assert_eq!(a.xlen("redtap:events:t") + b.xlen("redtap:events:t"), n);
    for reason in ["queue_full", "overflow", "expired"] {
        assert_eq!(
            d.metric(&format!(
                "redtap_records_dropped_total{{reason=\"{reason}\"}}"
            )),
            0.0,
            "{reason}"
        );
    }
}

#[test]
fn the_lease_is_renewed_and_a_lease_lost_to_another_agent_excludes_the_backend() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let d = Daemon::connections(&[("A", &a, 1), ("B", &b, 1)], &[]);
    let pttl = |r: &RedisServer| -> i64 {
        redis::cmd("PTTL")
            .arg("redtap:lease:t")
            .query(&mut r.conn().unwrap())
            .unwrap()
    };
    // Renewed every 5 s back to 15 s: seen running down, then back up.
    let mut ran_down = false;
    eventually(Duration::from_secs(12), "A's lease renewed", || {
        let left = pttl(&a);
        ran_down |= (0..13_500).contains(&left);
        ran_down && left > 14_000
    });

    // Another agent (on another host, so never judged dead from here) takes B's lease.
    redis::cmd("SET")
        .arg(&["redtap:lease:t", "elsewhere 4242 1 pid:[1]", "PX", "60000"])
        .query::<()>(&mut b.conn().unwrap())
        .unwrap();
    eventually(Duration::from_secs(10), "B excluded: lease held", || {
        let v = d.backends();
        v[1]["excluded"] == true
            && v[1]["down_cause"] == "agent lease held by host elsewhere pid 4242"
            && v[0]["up"] == true
    });
    // Its lease is left alone; A's is still ours.
    let held: String = redis::cmd("GET")
        .arg("redtap:lease:t")
        .query(&mut b.conn().unwrap())
        .unwrap();
    assert_eq!(held, "elsewhere 4242 1 pid:[1]");
    assert!(pttl(&a) > 0);
}
