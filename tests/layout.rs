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
use redtap::layout::{packed, Decoded};
use redtap::record::{Kind, Record};
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

/// `rows` (JSON records as `redtap query` prints them) are exactly the connections from `src`
/// on `ports` to `listen`, each captured between `t0` and `t1` (µs).
fn connections_read_back(
    rows: &[Value],
    ports: &BTreeSet<u16>,
    src: IpAddr,
    listen: SocketAddr,
    (t0, t1): (u64, u64),
) {
    assert_eq!(rows.len(), ports.len(), "{rows:?}");
    let seen: BTreeSet<u16> = rows
        .iter()
        .map(|r| r["sport"].as_u64().unwrap() as u16)
        .collect();
    assert_eq!(&seen, ports);
    for row in rows {
        assert_eq!(row["src"], src.to_string(), "{row}");
        assert_eq!(row["dst"], listen.ip().to_string(), "{row}");
        assert_eq!(row["dport"], listen.port(), "{row}");
        assert_eq!(row["kind"], "conn", "{row}");
        let ts = row["ts_us"].as_u64().unwrap();
        assert!((t0..=t1).contains(&ts), "{ts} outside {t0}..={t1}");
    }
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
    connections_read_back(&rows, &ports, src, d.listen, (t0, t1));
    for row in &rows {
        assert!(row.get("len").is_none_or(Value::is_null), "{row}");
        assert_eq!(row["agent"], agent.as_str(), "{row}");
    }
    if schema == "stream" {
        // As stored: the destination once per bucket (in `listen`), never per entry.
        for key in r.keys(&format!("redtap:events:{{{agent}}}:*")) {
            let entries = r.xrange_raw(&key);
            let names =
                |i: usize| -> Vec<&str> { entries[i].1.iter().map(|(k, _)| k.as_str()).collect() };
            assert_eq!(names(0), ["src", "sport", "us", "listen"], "{key}");
            assert_eq!(entries[0].1[3].1, d.listen.to_string());
            for i in 1..entries.len() {
                let n = names(i);
                assert!(n == ["src", "sport", "us"] || n == names(0), "{key}: {n:?}");
            }
        }
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

#[test]
fn the_packed_layout_reads_back_what_run_wrote_over_ipv4() {
    let listen = format!("127.0.0.1:{}", free_port());
    written_by_run_read_by_query("packed", &listen, "127.0.0.1".parse().unwrap());
}

#[test]
fn the_packed_layout_reads_back_what_run_wrote_over_ipv6() {
    let listen = format!("[::1]:{}", free_port());
    written_by_run_read_by_query("packed", &listen, "::1".parse().unwrap());
}

/// A row as (ts_us, src, sport, dst, dport, kind, len).
type Flat = (u64, String, u64, String, u64, String, Option<u64>);

/// XADD `fields` at `id` to `key`.
fn xadd(c: &mut redis::Connection, key: &str, id: &str, fields: &[(&str, &str)]) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg(id);
    for (k, v) in fields {
        cmd.arg(k).arg(v);
    }
    let _: String = cmd.query(c).unwrap();
}

#[test]
fn buckets_of_earlier_versions_and_mixed_buckets_still_read() {
    let r = RedisServer::start();
    let mut c = r.conn().unwrap();
    let sec = now_us() / 1_000_000 - 30;
    let ms = sec * 1000;
    let (b1, b2, b3) = (
        format!("redtap:events:{{up}}:{sec}"),
        format!("redtap:events:{{up}}:{}", sec + 1),
        format!("redtap:events:{{up}}:{}", sec + 2),
    );
    // Written by an earlier version: every field in every entry.
    let ts1 = (ms + 5) * 1000 + 17;
    let ts1s = ts1.to_string();
    xadd(
        &mut c,
        &b1,
        &format!("{}-0", ms + 5),
        &[
            ("src", "10.0.0.1"),
            ("dst", "10.0.0.2"),
            ("sport", "5000"),
            ("dport", "9000"),
            ("ts", &ts1s),
            ("kind", "conn"),
        ],
    );
    let ts2 = (ms + 6) * 1000 + 999;
    let ts2s = ts2.to_string();
    xadd(
        &mut c,
        &b1,
        &format!("{}-0", ms + 6),
        &[
            ("src", "::1"),
            ("dst", "::2"),
            ("sport", "5001"),
            ("dport", "443"),
            ("ts", &ts2s),
            ("kind", "PA"),
            ("len", "1460"),
        ],
    );
    // Created by an earlier version in the second this one took over: its first entry names
    // the destination the newer entries leave out.
    let ts3 = (ms + 1000) * 1000 + 1;
    let ts3s = ts3.to_string();
    xadd(
        &mut c,
        &b2,
        &format!("{}-0", ms + 1000),
        &[
            ("src", "10.0.0.3"),
            ("dst", "10.0.0.2"),
            ("sport", "5002"),
            ("dport", "9000"),
            ("ts", &ts3s),
            ("kind", "conn"),
        ],
    );
    xadd(
        &mut c,
        &b2,
        &format!("{}-0", ms + 1001),
        &[
            ("src", "10.0.0.4"),
            ("sport", "5003"),
            ("us", "250"),
            ("flags", "2"),
            ("len", "0"),
        ],
    );
    // This version's: the listen address once; an entry to another address says so; the ID
    // moved past a taken one, so `us` is over 999.
    xadd(
        &mut c,
        &b3,
        &format!("{}-0", ms + 2000),
        &[
            ("src", "10.0.0.5"),
            ("sport", "5004"),
            ("us", "3"),
            ("listen", "10.0.0.2:9000"),
        ],
    );
    xadd(
        &mut c,
        &b3,
        &format!("{}-0", ms + 2001),
        &[
            ("src", "10.0.0.6"),
            ("sport", "5005"),
            ("us", "-1500"),
            ("dst", "10.9.9.9"),
            ("dport", "22"),
        ],
    );
    let rows = query_json(&r, &["--schema", "stream"]);
    let got: Vec<Flat> = rows
        .iter()
        .map(|r| {
            (
                r["ts_us"].as_u64().unwrap(),
                r["src"].as_str().unwrap().to_string(),
                r["sport"].as_u64().unwrap(),
                r["dst"].as_str().unwrap().to_string(),
                r["dport"].as_u64().unwrap(),
                r["kind"].as_str().unwrap().to_string(),
                r.get("len").and_then(Value::as_u64),
            )
        })
        .collect();
    let row = |ts: u64, src: &str, sport, dst: &str, dport, kind: &str, len| {
        (
            ts,
            src.to_string(),
            sport,
            dst.to_string(),
            dport,
            kind.to_string(),
            len,
        )
    };
    let mut want = vec![
        row(ts1, "10.0.0.1", 5000, "10.0.0.2", 9000, "conn", None),
        row(ts2, "::1", 5001, "::2", 443, "PA", Some(1460)),
        row(ts3, "10.0.0.3", 5002, "10.0.0.2", 9000, "conn", None),
        row(
            (ms + 1001) * 1000 + 250,
            "10.0.0.4",
            5003,
            "10.0.0.2",
            9000,
            "S",
            Some(0),
        ),
        row(
            (ms + 2000) * 1000 + 3,
            "10.0.0.5",
            5004,
            "10.0.0.2",
            9000,
            "conn",
            None,
        ),
        row(
            (ms + 2001) * 1000 - 1500,
            "10.0.0.6",
            5005,
            "10.9.9.9",
            22,
            "conn",
            None,
        ),
    ];
    want.sort();
    let mut got = got;
    got.sort();
    assert_eq!(got, want);
}

/// Records of one capture second starting at `sec`: `n`, 50 µs apart, from 10.0.x.y (every
/// 7th from an IPv6 source, every 11th to another destination than 10.0.0.2:9000).
fn second_of(sec: u64, n: u64, kind: Kind) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            ts_us: sec * 1_000_000 + i * 50 + i % 13,
            src: if i % 7 == 3 {
                format!("[2001:db8::{i:x}]:{}", 1024 + i).parse().unwrap()
            } else {
                SocketAddr::new(
                    std::net::Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8).into(),
                    (1024 + i * 7) as u16,
                )
            },
            dst: if i % 11 == 5 {
                "[::1]:22".parse().unwrap()
            } else {
                "10.0.0.2:9000".parse().unwrap()
            },
            kind,
        })
        .collect()
}

/// Store `recs` as packed entries of at most `per_entry` records (one bucket, IDs from the
/// first record's ms); the bucket key.
fn store_packed(c: &mut redis::Connection, recs: &[Record], per_entry: usize) -> String {
    let key = format!("redtap:events:{{pk}}:{}", recs[0].ts_us / 1_000_000);
    for (n, batch) in recs.chunks(per_entry).enumerate() {
        let ms = batch[0].ts_ms();
        let v = packed::encode(batch, ms, Some("10.0.0.2:9000".parse().unwrap()));
        let _: String = redis::cmd("XADD")
            .arg(&key)
            .arg(format!("{ms}-{n}"))
            .arg("p")
            .arg(v)
            .query(c)
            .unwrap();
    }
    key
}

/// The decoder docs/redis-schema.md shows, as a file to run.
fn documented_decoder(dir: &std::path::Path) -> std::path::PathBuf {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/redis-schema.md"))
        .unwrap();
    let start = doc
        .find("<!-- packed-decoder:start -->")
        .expect("start marker");
    let end = doc.find("<!-- packed-decoder:end -->").expect("end marker");
    let block = &doc[start..end];
    let code = block
        .split_once("```python\n")
        .and_then(|(_, rest)| rest.rsplit_once("```"))
        .expect("a python block")
        .0;
    let path = dir.join("decode.py");
    std::fs::write(&path, code).unwrap();
    path
}

#[test]
fn the_documented_python_decoder_reads_the_packed_format() {
    let r = RedisServer::start();
    let mut c = r.conn().unwrap();
    let sec = now_us() / 1_000_000 - 10;
    let tmp = tempfile::tempdir().unwrap();
    let script = documented_decoder(tmp.path());
    let port = r
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    for (sec, kind) in [
        (sec, Kind::Conn),
        (
            sec + 1,
            Kind::Segment {
                flags: 0x18,
                len: 1460,
            },
        ),
    ] {
        let recs = second_of(sec, 300, kind);
        let key = store_packed(&mut c, &recs, 128);
        let out = Command::new("python3")
            .arg(&script)
            .args(["127.0.0.1", &port, &key])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Vec<Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got.len(), recs.len());
        for (g, rec) in got.iter().zip(&recs) {
            let d = Decoded::of(rec);
            assert_eq!(g["ts_us"], d.ts_us, "{g}");
            assert_eq!(g["src"], d.src.to_string(), "{g}");
            assert_eq!(g["sport"], d.sport, "{g}");
            assert_eq!(g["dst"], d.dst.to_string(), "{g}");
            assert_eq!(g["dport"], d.dport, "{g}");
            match rec.kind {
                Kind::Conn => assert_eq!(g["kind"], "conn", "{g}"),
                Kind::Segment { flags, len } => {
                    assert_eq!(g["flags"], flags, "{g}");
                    assert_eq!(g["len"], len, "{g}");
                }
            }
        }
    }
}

/// `redtap run --schema packed` writes entries of one field `p` that the documented Python
/// decoder reads back as exactly the connections made, and `redtap query` as the same records.
#[test]
fn the_packed_layout_written_by_run_reads_back_with_the_documented_decoder() {
    let r = RedisServer::start();
    let backend = format!("A={}@1", r.url());
    let listen = format!("127.0.0.1:{}", free_port());
    let mut d = Daemon::start_on(
        &listen,
        &[
            "--capture",
            "connections",
            "--agent",
            "lay-packed",
            "--schema",
            "packed",
            "--backend",
            &backend,
        ],
    );
    let src: IpAddr = "127.0.0.1".parse().unwrap();
    let t0 = now_us();
    let ports = connect_n(src, d.listen, 40);
    eventually(
        Duration::from_secs(10),
        "every connection is stored",
        || r.xrange("redtap:events:lay-packed").len() >= ports.len(),
    );
    let t1 = now_us();
    assert!(d.stop(Duration::from_secs(10)).success());
    let tmp = tempfile::tempdir().unwrap();
    let script = documented_decoder(tmp.path());
    let port = r.port.to_string();
    let mut rows = Vec::new();
    for key in r.keys("redtap:events:{lay-packed}:*") {
        // (ID, [(field, value)]), the value as bytes.
        type Entries = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;
        let entries: Entries = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query(&mut r.conn().unwrap())
            .unwrap();
        for (_, fields) in entries {
            let names: Vec<&[u8]> = fields.iter().map(|(k, _)| k.as_slice()).collect();
            assert_eq!(names, [b"p"], "{key}: one field per entry");
        }
        let out = Command::new("python3")
            .arg(&script)
            .args(["127.0.0.1", &port, &key])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        rows.extend(
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()),
        );
    }
    connections_read_back(&rows, &ports, src, d.listen, (t0, t1));
    // `redtap query` reads the same records as the documented decoder.
    let key = |r: &Value| (r["ts_us"].as_u64().unwrap(), r["sport"].as_u64().unwrap());
    let mut by_python: Vec<_> = rows.iter().map(key).collect();
    let mut by_query: Vec<_> = query_json(&r, &[]).iter().map(key).collect();
    by_python.sort_unstable();
    by_query.sort_unstable();
    assert_eq!(by_query, by_python);
}

#[test]
fn a_packed_record_costs_at_most_16_bytes_of_redis_memory() {
    // Same measure as tests/writer.rs: used_memory delta / records, 200,000 records at 20,000
    // a second; here 512 records an entry, as one pipeline of a busy writer would carry.
    let r = RedisServer::start();
    let mut c = r.conn().unwrap();
    let before = r.used_memory();
    let sec = now_us() / 1_000_000 - 20;
    let kind = Kind::Segment {
        flags: 0x18,
        len: 1460,
    };
    for s in 0..10 {
        let recs: Vec<Record> = second_of(sec + s, 20_000, kind)
            .into_iter()
            .map(|mut r| {
                // All to the listen address, IPv4, as the stream layout's measure.
                r.dst = "10.0.0.2:9000".parse().unwrap();
                if r.src.is_ipv6() {
                    r.src = "10.1.2.3:4000".parse().unwrap();
                }
                r
            })
            .collect();
        store_packed(&mut c, &recs, 512);
    }
    let b = (r.used_memory() - before) as f64 / 200_000.0;
    println!("packed format, segment records, 512 an entry: {b:.1} B/record");
    assert!(b <= 16.0, "{b:.1} B/record");
}
