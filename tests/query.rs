//! Reading back: `redtap query | top | tail | stats` against real redis-server processes holding
//! known records, written here exactly as the daemon lays them out (docs/redis-schema.md).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{connect_many, eventually, free_port, redtap_bin, Daemon, RedisServer, Tail};
use serde_json::Value;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A record to store.
#[derive(Clone, Debug)]
struct Rec {
    ts_us: u64,
    src: String,
    sport: u16,
    dst: String,
    dport: u16,
    kind: &'static str,
    len: Option<u32>,
}

fn rec(ts_us: u64, src: &str, sport: u16, dport: u16) -> Rec {
    Rec {
        ts_us,
        src: src.into(),
        sport,
        dst: "192.0.2.1".into(),
        dport,
        kind: "conn",
        len: None,
    }
}

/// Store `recs` (in capture order) in `<prefix>:events:<agent>` with IDs `<ms>-<seq>`.
fn put_stream(r: &RedisServer, agent: &str, recs: &[Rec]) {
    let mut pipe = redis::pipe();
    let mut last = (0u64, 0u64);
    for x in recs {
        let ms = x.ts_us / 1000;
        let id = if ms > last.0 {
            (ms, 0)
        } else {
            (last.0, last.1 + 1)
        };
        last = id;
        let cmd = pipe
            .cmd("XADD")
            .arg(format!("redtap:events:{agent}"))
            .arg(format!("{}-{}", id.0, id.1))
            .arg("src")
            .arg(&x.src)
            .arg("dst")
            .arg(&x.dst)
            .arg("sport")
            .arg(x.sport)
            .arg("dport")
            .arg(x.dport)
            .arg("ts")
            .arg(x.ts_us)
            .arg("kind")
            .arg(x.kind);
        if let Some(len) = x.len {
            cmd.arg("len").arg(len);
        }
        cmd.ignore();
    }
    pipe.exec(&mut r.conn().unwrap()).unwrap();
}

/// Store `recs` as `<prefix>:ev:<agent>:<ts_us>:<seq>` JSON strings expiring at capture + retention.
fn put_keys(r: &RedisServer, agent: &str, recs: &[Rec], retention_ms: u64) {
    let mut pipe = redis::pipe();
    for (i, x) in recs.iter().enumerate() {
        let mut v = serde_json::json!({
            "src": x.src, "dst": x.dst, "sport": x.sport, "dport": x.dport,
            "ts": x.ts_us, "kind": x.kind,
        });
        if let Some(len) = x.len {
            v["len"] = len.into();
        }
        pipe.cmd("SET")
            .arg(format!("redtap:ev:{agent}:{}:{}", x.ts_us, i % 3))
            .arg(v.to_string())
            .arg("PXAT")
            .arg(x.ts_us / 1000 + retention_ms)
            .ignore();
    }
    pipe.exec(&mut r.conn().unwrap()).unwrap();
}

/// Run `redtap <args>`: (exit code, stdout, stderr).
fn redtap(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(redtap_bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn be(name: &str, r: &RedisServer, w: u32) -> String {
    format!("{name}={}@{w}", r.url())
}

/// `redtap query … --format json` parsed: the records, one object each.
fn query_json(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["query", "--format", "json"];
    all.extend_from_slice(args);
    let (code, out, err) = redtap(&all);
    assert_eq!(code, 0, "query {args:?} failed:\n{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ts_of(rows: &[Value]) -> Vec<u64> {
    rows.iter().map(|r| r["ts_us"].as_u64().unwrap()).collect()
}

#[test]
fn merges_backends_in_time_order_with_exact_counts() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let t0 = now_us() - 60_000_000;
    // 400 records a second apart in time order alternate between A and B, 3 per ms sometimes.
    let all: Vec<Rec> = (0..400u64)
        .map(|i| {
            rec(
                t0 + i * 100_000 + (i % 3),
                "10.0.0.1",
                40000 + i as u16,
                9000,
            )
        })
        .collect();
    let (to_a, to_b): (Vec<_>, Vec<_>) = all.iter().cloned().partition(|r| r.sport % 2 == 0);
    put_stream(&a, "x", &to_a);
    put_stream(&b, "x", &to_b);
    let (ba, bb) = (be("A", &a, 1), be("B", &b, 1));

    let rows = query_json(&["--backend", &ba, "--backend", &bb]);
    assert_eq!(rows.len(), 400);
    assert_eq!(
        ts_of(&rows),
        all.iter().map(|r| r.ts_us).collect::<Vec<_>>()
    );
    for (row, want) in rows.iter().zip(&all) {
        let backend = if want.sport % 2 == 0 { "A" } else { "B" };
        assert_eq!(row["backend"], backend);
        assert_eq!(row["sport"], want.sport);
        assert_eq!(row["agent"], "x");
        assert_eq!(row["kind"], "conn");
        assert_eq!(row["len"], Value::Null);
    }

    let first = query_json(&["--backend", &ba, "--backend", &bb, "--limit", "7"]);
    assert_eq!(ts_of(&first), ts_of(&rows)[..7]);

    // CSV and the table carry the same records.
    let (code, csv, _) = redtap(&[
        "query",
        "--backend",
        &ba,
        "--backend",
        &bb,
        "--format",
        "csv",
    ]);
    assert_eq!(code, 0);
    assert_eq!(csv.lines().count(), 401);
    assert!(csv.starts_with("ts,ts_us,src,sport,dst,dport,kind,len,backend,agent\n"));
    let (code, table, _) = redtap(&["query", "--backend", &ba, "--backend", &bb]);
    assert_eq!(code, 0);
    assert!(table.lines().all(|l| l.len() <= 80), "{table}");
    assert!(table.ends_with("-- 400 records\n"), "{table}");
}

#[test]
fn cidr_port_and_time_filters() {
    let a = RedisServer::start();
    let t0 = now_us() - 100_000_000;
    let mut recs = Vec::new();
    for i in 0..100u64 {
        let src = match i % 4 {
            0 => "10.1.0.5",
            1 => "10.1.200.9",
            2 => "10.2.0.5",
            _ => "2001:db8::7",
        };
        let mut r = rec(t0 + i * 1_000_000, src, 50000 + (i % 10) as u16, 443);
        if i % 5 == 0 {
            r.dport = 22;
            r.dst = "192.0.2.99".into();
        }
        if i == 42 {
            r.sport = 22; // a source port 22 counts for --port 22
        }
        recs.push(r);
    }
    put_stream(&a, "f", &recs);
    let ba = be("A", &a, 1);
    let q = |extra: &[&str]| {
        let mut args = vec!["--backend", ba.as_str()];
        args.extend_from_slice(extra);
        query_json(&args)
    };
    assert_eq!(q(&[]).len(), 100);
    assert_eq!(q(&["--src", "10.1.0.0/16"]).len(), 50);
    assert_eq!(q(&["--src", "10.0.0.0/8"]).len(), 75);
    assert_eq!(q(&["--src", "2001:db8::/32"]).len(), 25);
    assert_eq!(q(&["--src", "10.2.0.5"]).len(), 25);
    assert_eq!(q(&["--dst", "192.0.2.99/32"]).len(), 20);
    assert_eq!(
        q(&["--port", "22"]).len(),
        21,
        "dport 22 (20) or sport 22 (1)"
    );
    assert_eq!(q(&["--port", "50003"]).len(), 10);
    assert_eq!(q(&["--port", "22", "--src", "10.1.0.0/16"]).len(), 10);

    // Time bounds: records at t0 + i s; "now" is ~100 s after t0.
    let since = |s: u64| {
        humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(s)).to_string()
    };
    let rows = q(&[
        "--since",
        &since(t0 + 10_000_000),
        "--until",
        &since(t0 + 19_000_000),
    ]);
    assert_eq!(
        ts_of(&rows),
        (10..20).map(|i| t0 + i * 1_000_000).collect::<Vec<_>>()
    );
    // Durations ago: everything but the first ~30 s, then nothing newer than 1h ago.
    let n = q(&["--since", "70s"]).len();
    assert!((68..=72).contains(&n), "{n}");
    assert!(q(&["--until", "1h"]).is_empty());

    let (code, _, err) = redtap(&["query", "--backend", &ba, "--src", "10.0.0/8"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--src"), "{err}");
    let (code, _, err) = redtap(&["query", "--backend", &ba, "--until", "yesterday"]);
    assert_eq!(code, 64, "{err}");
}

#[test]
fn both_layouts_are_read_and_merged() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let t0 = now_us() - 30_000_000;
    let recs: Vec<Rec> = (0..60u64)
        .map(|i| {
            let mut r = rec(t0 + i * 250_000, "198.51.100.4", 1000 + i as u16, 80);
            if i % 2 == 1 {
                r.kind = "PA";
                r.len = Some(100 + i as u32);
            }
            r
        })
        .collect();
    let (keys, stream): (Vec<_>, Vec<_>) = recs.iter().cloned().partition(|r| r.sport % 3 == 0);
    put_keys(&a, "k", &keys, 300_000);
    put_stream(&b, "s", &stream);
    let (ba, bb) = (be("A", &a, 1), be("B", &b, 1));

    let rows = query_json(&["--backend", &ba, "--backend", &bb]);
    assert_eq!(
        ts_of(&rows),
        recs.iter().map(|r| r.ts_us).collect::<Vec<_>>()
    );
    for (row, want) in rows.iter().zip(&recs) {
        assert_eq!(row["kind"], want.kind);
        assert_eq!(row["len"].as_u64(), want.len.map(u64::from));
        assert_eq!(row["agent"], if want.sport % 3 == 0 { "k" } else { "s" });
    }
    assert_eq!(
        query_json(&["--backend", &ba, "--backend", &bb, "--schema", "keys"]).len(),
        20
    );
    assert_eq!(
        query_json(&["--backend", &ba, "--backend", &bb, "--schema", "stream"]).len(),
        40
    );
}

#[test]
fn records_past_retention_are_never_shown() {
    let a = RedisServer::start();
    let now = now_us();
    let old: Vec<Rec> = (0..10u64)
        .map(|i| rec(now - 600_000_000 + i, "10.9.9.9", 1, 2))
        .collect();
    let fresh: Vec<Rec> = (0..5u64)
        .map(|i| rec(now - 5_000_000 + i, "10.8.8.8", 1, 2))
        .collect();
    // Still in Redis: the stream was never trimmed, the keys expire in an hour.
    put_stream(&a, "r", &[old.clone(), fresh.clone()].concat());
    put_keys(&a, "rk", &old, 3_600_000);
    assert_eq!(a.xlen("redtap:events:r"), 15);
    let ba = be("A", &a, 1);

    let rows = query_json(&["--backend", &ba]);
    assert_eq!(rows.len(), 5, "only the fresh records");
    assert!(rows.iter().all(|r| r["src"] == "10.8.8.8"));
    // An explicit --since before the retention window does not reach past it.
    assert_eq!(query_json(&["--backend", &ba, "--since", "1h"]).len(), 5);
    // With a longer retention they are readable: they were there all along.
    assert_eq!(
        query_json(&["--backend", &ba, "--retention", "1h"]).len(),
        25
    );
    // The retention can come from the config file.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("redtap.toml");
    std::fs::write(
        &cfg,
        format!(
            "retention = \"20m\"\n[[backend]]\nname = \"A\"\nurl = \"{}\"\nweight = 1\n",
            a.url()
        ),
    )
    .unwrap();
    assert_eq!(query_json(&["--config", cfg.to_str().unwrap()]).len(), 25);

    // top and stats follow the same rule.
    let (_, out, _) = redtap(&["top", "--backend", &ba, "--format", "json"]);
    let top: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(top["total"], 5);
    let (_, out, _) = redtap(&["stats", "--backend", &ba, "--format", "json"]);
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["backends"][0]["records"], 5);
    assert_eq!(stats["backends"][0]["held"], 25);
}

#[test]
fn several_agents_on_the_same_backends() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let t0 = now_us() - 20_000_000;
    let mk = |agent: u64, n: u64| -> Vec<Rec> {
        (0..n)
            .map(|i| {
                rec(
                    t0 + i * 10_000 + agent,
                    &format!("10.0.{agent}.1"),
                    1000,
                    9000,
                )
            })
            .collect()
    };
    let (x, y) = (mk(1, 30), mk(2, 50));
    put_stream(&a, "x", &x[..10]);
    put_stream(&b, "x", &x[10..]);
    put_stream(&a, "y", &y[..25]);
    put_keys(&b, "y", &y[25..], 300_000);
    let (ba, bb) = (be("A", &a, 1), be("B", &b, 3));

    let rows = query_json(&["--backend", &ba, "--backend", &bb]);
    assert_eq!(rows.len(), 80);
    let ts = ts_of(&rows);
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "time order");
    let only_x = query_json(&["--backend", &ba, "--backend", &bb, "--agent", "x"]);
    assert_eq!(only_x.len(), 30);
    assert!(only_x.iter().all(|r| r["agent"] == "x"));
    assert_eq!(
        query_json(&["--backend", &ba, "--backend", &bb, "--agent", "y"]).len(),
        50
    );

    let (code, out, err) = redtap(&[
        "stats",
        "--backend",
        &ba,
        "--backend",
        &bb,
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["total"], 80);
    assert_eq!(s["backends"][0]["records"], 35);
    assert_eq!(s["backends"][0]["agents"]["x"], 10);
    assert_eq!(s["backends"][0]["agents"]["y"], 25);
    assert_eq!(s["backends"][1]["records"], 45);
    assert_eq!(s["backends"][1]["target_share"], 0.75);
    assert_eq!(s["backends"][1]["share"], 45.0 / 80.0);
    assert!(s["backends"][0]["used_memory"].as_u64().unwrap() > 0);
    assert_eq!(
        s["backends"][0]["oldest"],
        humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(x[0].ts_us))
            .to_string()
    );
    let (code, table, _) = redtap(&["stats", "--backend", &ba, "--backend", &bb]);
    assert_eq!(code, 0);
    assert!(table.lines().all(|l| l.len() <= 80), "{table}");
    assert!(table.contains("-- agents: x (30), y (50)"), "{table}");
}

#[test]
fn one_backend_down_gives_the_rest_and_exit_2() {
    let a = RedisServer::start();
    let t0 = now_us() - 10_000_000;
    put_stream(
        &a,
        "d",
        &(0..12u64)
            .map(|i| rec(t0 + i, "10.0.0.1", 1, 2))
            .collect::<Vec<_>>(),
    );
    let ba = be("A", &a, 1);
    let dead = format!("B=redis://127.0.0.1:{}@1", free_port());

    let (code, out, err) = redtap(&[
        "query",
        "--backend",
        &ba,
        "--backend",
        &dead,
        "--format",
        "json",
    ]);
    assert_eq!(code, 2, "partial answer exits 2:\n{err}");
    assert_eq!(out.lines().count(), 12, "A's records are printed");
    assert!(err.contains("backend B (redis://127.0.0.1:"), "{err}");
    assert!(err.contains("unreachable"), "{err}");
    assert!(err.contains("partial"), "{err}");

    let (code, out, _) = redtap(&["query", "--backend", &ba, "--backend", &dead]);
    assert_eq!(code, 2);
    assert!(
        out.contains("-- 12 records\n-- PARTIAL: no answer from backend B"),
        "{out}"
    );

    let (code, out, _) = redtap(&[
        "top",
        "--backend",
        &ba,
        "--backend",
        &dead,
        "--format",
        "json",
    ]);
    assert_eq!(code, 2);
    let t: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (t["partial"].clone(), t["total"].clone()),
        (true.into(), 12.into())
    );
    assert_eq!(t["failures"][0]["backend"], "B");

    let (code, out, _) = redtap(&[
        "stats",
        "--backend",
        &ba,
        "--backend",
        &dead,
        "--format",
        "json",
    ]);
    assert_eq!(code, 2);
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["backends"][0]["records"], 12);
    assert_eq!(s["backends"][1]["reachable"], false);
    assert!(s["backends"][1]["error"]
        .as_str()
        .unwrap()
        .contains("unreachable"));

    // A hung server (stopped, its port still open) is reported after the connect timeout.
    let hung = RedisServer::start();
    hung.signal("STOP");
    let bh = be("H", &hung, 1);
    let (code, out, err) = redtap(&[
        "query",
        "--backend",
        &ba,
        "--backend",
        &bh,
        "--format",
        "json",
    ]);
    hung.signal("CONT");
    assert_eq!(code, 2, "{err}");
    assert_eq!(out.lines().count(), 12);
    assert!(
        err.contains("backend H") && err.contains("timed out"),
        "{err}"
    );

    // Every backend down: still a clear message and exit 2, with an empty answer.
    let (code, out, err) = redtap(&["query", "--backend", &dead, "--format", "json"]);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
}

#[test]
fn top_counts_talkers() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let t0 = now_us() - 40_000_000;
    let mut recs = Vec::new();
    for (src, n, dport) in [
        ("10.0.0.3", 7u64, 80),
        ("10.0.0.1", 12, 443),
        ("10.0.0.2", 7, 80),
    ] {
        for i in 0..n {
            recs.push(rec(t0 + recs.len() as u64 * 1000 + i, src, 2000, dport));
        }
    }
    recs.sort_by_key(|r| r.ts_us);
    put_stream(&a, "t", &recs[..13]);
    put_keys(&b, "t", &recs[13..], 300_000);
    let (ba, bb) = (be("A", &a, 1), be("B", &b, 1));
    let top = |extra: &[&str]| -> Value {
        let mut args = vec![
            "top",
            "--backend",
            &ba,
            "--backend",
            &bb,
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = redtap(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let t = top(&["-n", "2"]);
    assert_eq!(t["total"], 26);
    assert_eq!(t["groups"], 3);
    assert_eq!(t["by"], "src");
    let got: Vec<(String, u64)> = t["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["key"].as_str().unwrap().to_string(),
                x["count"].as_u64().unwrap(),
            )
        })
        .collect();
    // Ties (7 and 7) break by key.
    assert_eq!(
        got,
        [("10.0.0.1".to_string(), 12), ("10.0.0.2".to_string(), 7)]
    );
    let t = top(&["--by", "dst"]);
    assert_eq!(t["top"][0]["key"], "192.0.2.1:80");
    assert_eq!(t["top"][0]["count"], 14);
    let t = top(&["--by", "pair", "--port", "443"]);
    assert_eq!(t["top"][0]["key"], "10.0.0.1 > 192.0.2.1:443");
    assert_eq!(t["total"], 12);

    let (code, table, _) = redtap(&["top", "--backend", &ba, "--backend", &bb, "--by", "pair"]);
    assert_eq!(code, 0);
    assert!(table.lines().all(|l| l.len() <= 80), "{table}");
    assert!(
        table.contains("-- 26 records from 3 groups; top 3 shown"),
        "{table}"
    );
}

#[test]
fn tail_follows_new_records_in_both_layouts_until_ctrl_c() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    // Something old that tail must not print.
    put_stream(&a, "old", &[rec(now_us() - 1_000_000, "10.0.0.9", 1, 2)]);
    let (ba, bb) = (be("A", &a, 1), be("B", &b, 1));
    let dead = format!("C=redis://127.0.0.1:{}@1", free_port());
    let tail = Tail::start(&[
        "--backend",
        &ba,
        "--backend",
        &bb,
        "--backend",
        &dead,
        "--format",
        "json",
        "--src",
        "10.5.0.0/16",
    ]);
    eventually(Duration::from_secs(10), "the dead backend reported", || {
        tail.has_line("backend C")
    });

    // Stream records from an agent that starts after the tail, and keys.
    let mut want = Vec::new();
    for round in 0..3u64 {
        let t = now_us();
        let s = rec(t, "10.5.0.1", 100 + round as u16, 80);
        let k = rec(t + 1, "10.5.0.2", 200 + round as u16, 80);
        let other = rec(t + 2, "10.6.0.1", 300, 80); // filtered out
        put_stream(&a, "new", &[s.clone(), other.clone()]);
        put_keys(&b, "kk", &[k.clone(), other], 300_000);
        want.extend([s.sport, k.sport]);
        let n = want.len();
        eventually(Duration::from_secs(10), "new records printed", || {
            tail.records().len() >= n
        });
    }
    let got: Vec<u64> = tail
        .records()
        .iter()
        .map(|r| r["sport"].as_u64().unwrap())
        .collect();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    assert_eq!(
        got_sorted,
        [100, 101, 102, 200, 201, 202],
        "each new record once: {got:?}"
    );

    let mut tail = tail;
    common_kill(&tail.child, "INT");
    let status = tail.child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "a backend was down during the tail");
}

fn common_kill(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn reads_back_what_the_daemon_captured() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let (ba, bb) = (be("A", &a, 30), be("B", &b, 70));
    let d = Daemon::start(&[
        "--capture",
        "connections",
        "--agent",
        "live",
        "--backend",
        &ba,
        "--backend",
        &bb,
    ]);
    assert_eq!(connect_many(d.listen, 200, 4), 200);
    eventually(Duration::from_secs(20), "all stored", || {
        a.xlen("redtap:events:live") + b.xlen("redtap:events:live") == 200
    });
    let rows = query_json(&[
        "--backend",
        &ba,
        "--backend",
        &bb,
        "--port",
        &d.listen.port().to_string(),
    ]);
    assert_eq!(rows.len(), 200);
    assert!(ts_of(&rows).windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(rows.iter().filter(|r| r["backend"] == "A").count(), 60);

    let (code, out, _) = redtap(&[
        "stats",
        "--backend",
        &ba,
        "--backend",
        &bb,
        "--format",
        "json",
    ]);
    assert_eq!(code, 0);
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["backends"][0]["records"], 60);
    assert_eq!(s["backends"][0]["share"], 0.3);
    assert_eq!(s["backends"][1]["target_share"], 0.7);
}

#[test]
fn tail_since_shows_earlier_records_once_then_new_ones() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let t = now_us() - 30_000_000;
    put_stream(&a, "s", &[rec(t, "10.0.0.1", 1, 80)]);
    put_keys(&b, "k", &[rec(t + 1, "10.0.0.2", 2, 80)], 300_000);
    let (ba, bb) = (be("A", &a, 1), be("B", &b, 1));
    let tail = Tail::start(&[
        "--backend",
        &ba,
        "--backend",
        &bb,
        "--since",
        "1m",
        "--format",
        "json",
    ]);
    eventually(Duration::from_secs(10), "the earlier records", || {
        tail.records().len() >= 2
    });
    put_keys(&b, "k", &[rec(now_us(), "10.0.0.3", 3, 80)], 300_000);
    eventually(Duration::from_secs(10), "the new record", || {
        tail.records().iter().any(|r| r["sport"] == 3)
    });
    let sports: Vec<u64> = tail
        .records()
        .iter()
        .map(|r| r["sport"].as_u64().unwrap())
        .collect();
    assert_eq!(sports.len(), 3, "each record once: {sports:?}");
}

#[test]
fn a_backend_dying_mid_read_keeps_what_was_read_and_exits_2() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let t0 = now_us() - 100_000_000;
    let many: Vec<Rec> = (0..50_000u64)
        .map(|i| rec(t0 + i * 1000, "10.0.0.1", (i % 60000) as u16, 80))
        .collect();
    put_stream(&a, "big", &many);
    let few: Vec<Rec> = (0..100u64)
        .map(|i| rec(t0 + i * 500_000 + 1, "10.0.0.2", 7, 80))
        .collect();
    put_stream(&b, "small", &few);
    let (ba, bb) = (be("A", &a, 1), be("B", &b, 1));
    let mut child = Command::new(redtap_bin())
        .args([
            "query",
            "--format",
            "json",
            "--backend",
            &ba,
            "--backend",
            &bb,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    // The query now waits on the full stdout pipe, far from done with A's 50 000 records.
    a.signal("KILL");
    let rest: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("backend A") && err.contains("read failed"),
        "{err}"
    );
    let from_a = rest.iter().filter(|r| r["backend"] == "A").count();
    assert!(from_a + 1 < many.len(), "A was cut short ({from_a})");
    assert_eq!(rest.iter().filter(|r| r["backend"] == "B").count(), 100);
    assert!(ts_of(&rest).windows(2).all(|w| w[0] <= w[1]));
}

/// One entry of a bucket written by hand: a readable record (with or without its own
/// destination), a packed batch, or raw bytes in the packed field.
enum Entry {
    Readable(redtap::record::Record, bool),
    Packed(Vec<redtap::record::Record>, Option<std::net::SocketAddr>),
    Raw(Vec<u8>),
}

/// Store `entries` in bucket `sec` of `agent` as the daemon lays them out (IDs from capture
/// ms, a sequence within one ms; the key expiring with its second plus an hour).
fn put_bucket(r: &RedisServer, agent: &str, sec: u64, entries: &[Entry]) {
    use redtap::record::Kind;
    let key = format!("redtap:events:{{{agent}}}:{sec}");
    let mut pipe = redis::pipe();
    let mut last = (0u64, 0u64);
    let mut next_id = |ms: u64| {
        last = if ms > last.0 {
            (ms, 0)
        } else {
            (last.0, last.1 + 1)
        };
        last
    };
    for e in entries {
        let cmd = pipe.cmd("XADD").arg(&key);
        match e {
            Entry::Readable(x, own_dst) => {
                let (ms, seq) = next_id(x.ts_us / 1000);
                cmd.arg(format!("{ms}-{seq}"))
                    .arg("src")
                    .arg(x.src.ip().to_string())
                    .arg("sport")
                    .arg(x.src.port())
                    .arg("us")
                    .arg(x.ts_us as i64 - ms as i64 * 1000);
                if let Kind::Segment { flags, len } = x.kind {
                    cmd.arg("flags").arg(flags).arg("len").arg(len);
                }
                if *own_dst {
                    cmd.arg("dst")
                        .arg(x.dst.ip().to_string())
                        .arg("dport")
                        .arg(x.dst.port());
                }
            }
            Entry::Packed(recs, listen) => {
                let (ms, seq) = next_id(recs[0].ts_us / 1000);
                let v = redtap::layout::packed::encode(recs, ms, *listen);
                cmd.arg(format!("{ms}-{seq}")).arg("p").arg(v);
            }
            Entry::Raw(v) => {
                let (ms, seq) = next_id(0); // the next sequence after the last ID
                cmd.arg(format!("{ms}-{seq}")).arg("p").arg(&v[..]);
            }
        }
        cmd.ignore();
    }
    pipe.cmd("PEXPIREAT")
        .arg(&key)
        .arg((sec + 1) * 1000 + 3_600_000)
        .ignore();
    pipe.exec(&mut r.conn().unwrap()).unwrap();
}

/// A record as `query --format json` shows it: (ts_us, src, sport, dst, dport, kind, len).
type Shown = (u64, String, u64, String, u64, String, Option<u64>);

fn shown(rows: &[Value]) -> Vec<Shown> {
    rows.iter()
        .map(|r| {
            (
                r["ts_us"].as_u64().unwrap(),
                r["src"].as_str().unwrap().to_string(),
                r["sport"].as_u64().unwrap(),
                r["dst"].as_str().unwrap().to_string(),
                r["dport"].as_u64().unwrap(),
                r["kind"].as_str().unwrap().to_string(),
                r["len"].as_u64(),
            )
        })
        .collect()
}

fn expect(recs: &[redtap::record::Record]) -> Vec<Shown> {
    let mut v: Vec<Shown> = recs
        .iter()
        .map(|x| {
            let d = redtap::layout::Decoded::of(x);
            (
                d.ts_us,
                d.src.to_string(),
                u64::from(d.sport),
                d.dst.to_string(),
                u64::from(d.dport),
                d.kind,
                d.len.map(u64::from),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn packed_and_readable_entries_in_the_same_buckets_read_as_one() {
    use redtap::record::{Kind, Record};
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let sec = now_us() / 1_000_000 - 20;
    let listen: std::net::SocketAddr = "192.0.2.1:9000".parse().unwrap();
    // Distinct capture times: A's records on even 100 µs steps, B's on odd ones.
    let at = |i: u64, odd: u64| sec * 1_000_000 + (2 * i + odd) * 100;
    let seg = Kind::Segment {
        flags: 0x18,
        len: 1460,
    };
    let v4 = |i: u64, odd: u64, kind: Kind| Record {
        ts_us: at(i, odd),
        src: format!("10.1.{}.{}:{}", i % 7, i % 250, 1024 + i)
            .parse()
            .unwrap(),
        dst: listen,
        kind,
    };
    let v6 = |i: u64, odd: u64, kind: Kind| Record {
        ts_us: at(i, odd),
        src: format!("[2001:db8::{:x}]:{}", i % 11 + 1, 2048 + i)
            .parse()
            .unwrap(),
        dst: format!("[2001:db8:ffff::{:x}]:443", i % 3 + 1)
            .parse()
            .unwrap(),
        kind,
    };

    // A, bucket `sec`: a packed entry first (its header names the listen address the readable
    // entries after it leave out), more than a page of readable entries, packed IPv6 at the end.
    let mut all_a = Vec::new();
    let first: Vec<Record> = (0..300).map(|i| v4(i, 0, seg)).collect();
    let readable: Vec<Record> = (300..1800)
        .map(|i| {
            v4(
                i,
                0,
                Kind::Segment {
                    flags: 0x02,
                    len: 0,
                },
            )
        })
        .collect();
    let last: Vec<Record> = (1800..2200).map(|i| v6(i, 0, seg)).collect();
    let mut entries = vec![Entry::Packed(first.clone(), Some(listen))];
    entries.extend(readable.iter().map(|r| Entry::Readable(*r, false)));
    entries.push(Entry::Packed(last.clone(), None));
    put_bucket(&a, "pk", sec, &entries);
    all_a.extend(first.into_iter().chain(readable).chain(last));
    // A, bucket `sec + 1`: readable IPv6 with their own destinations, then a malformed packed
    // value and one of a future version.
    let next: Vec<Record> = (0..1200)
        .map(|i| Record {
            ts_us: at(i, 0) + 1_000_000,
            ..v6(i, 0, Kind::Conn)
        })
        .collect();
    let mut entries: Vec<Entry> = next.iter().map(|r| Entry::Readable(*r, true)).collect();
    let good = redtap::layout::packed::encode(&next[..3], 0, None);
    entries.push(Entry::Raw(good[..good.len() - 2].to_vec()));
    let mut future = good.clone();
    future[0] = 2;
    entries.push(Entry::Raw(future));
    put_bucket(&a, "pk", sec + 1, &entries);
    all_a.extend(next);
    // B, the same second: packed only, connections of both families.
    let all_b: Vec<Record> = (0..1500)
        .map(|i| {
            if i % 2 == 0 {
                v4(i, 1, Kind::Conn)
            } else {
                v6(i, 1, Kind::Conn)
            }
        })
        .collect();
    let entries: Vec<Entry> = all_b
        .chunks(500)
        .map(|c| Entry::Packed(c.to_vec(), Some(listen)))
        .collect();
    put_bucket(&b, "pk", sec, &entries);

    let (ba, bb) = (be("A", &a, 1), be("B", &b, 1));
    let src = ["--backend", &ba, "--backend", &bb];
    let mut args = vec!["query", "--format", "json", "--since", "2m"];
    args.extend(src);
    let (code, out, err) = redtap(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("2 packed entries could not be read"),
        "the skipped entries are reported: {err}"
    );
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ts = ts_of(&rows);
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "capture order");
    let mut got = shown(&rows);
    got.sort();
    let all: Vec<Record> = all_a.iter().chain(&all_b).copied().collect();
    assert_eq!(got, expect(&all));

    // The window cuts inside a packed entry: records are kept by their own capture time.
    let from = at(1000, 0) + 50;
    let since = jiff::Timestamp::from_microsecond(from as i64)
        .unwrap()
        .to_string();
    let mut args = vec!["--since", &since];
    args.extend(src);
    let rows = query_json(&args);
    let want: Vec<Record> = all.iter().filter(|r| r.ts_us >= from).copied().collect();
    let mut got = shown(&rows);
    got.sort();
    assert_eq!(got, expect(&want), "since {since}");

    let mut args = vec![
        "top", "--by", "src", "-n", "3", "--format", "json", "--since", "2m",
    ];
    args.extend(src);
    let (code, out, err) = redtap(&args);
    assert_eq!(code, 0, "{err}");
    let top: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(top["total"], all.len() as u64);

    let mut args = vec!["stats", "--format", "json"];
    args.extend(src);
    let (code, out, err) = redtap(&args);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("2 packed entries could not be read"), "{err}");
    let stats: Value = serde_json::from_str(&out).unwrap();
    let records: Vec<u64> = stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["records"].as_u64().unwrap())
        .collect();
    assert_eq!(records, [all_a.len() as u64, all_b.len() as u64]);

    let tail = Tail::start(&[
        "--backend",
        &ba,
        "--backend",
        &bb,
        "--since",
        "2m",
        "--format",
        "json",
    ]);
    eventually(Duration::from_secs(20), "every record tailed", || {
        tail.records().len() >= all.len()
    });
    eventually(Duration::from_secs(10), "the skipped entries said", || {
        tail.has_line("could not be read")
    });
    let mut got = shown(&tail.records());
    got.sort();
    assert_eq!(got, expect(&all), "each record once");
    let mut tail = tail;
    common_kill(&tail.child, "INT");
    assert_eq!(tail.child.wait().unwrap().code(), Some(0));
}
