//! Retention is enforced by Redis itself: whether redtap keeps running, is stopped by SIGTERM,
//! is killed with SIGKILL, or its backend refuses writes, no record is readable after
//! capture + retention + 1 s, and every stored record is readable until
//! capture + retention − 1 s. Checked record by record, polling, with a 3 s retention, on two
//! bursts of records 1.5 s apart.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{connect_many, eventually, Daemon, RedisServer};

const RETENTION_MS: u64 = 3000;
const RECORDS: usize = 60;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// What happens to redtap (or its backend) once the records are stored.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Then {
    KeepRunning,
    Sigterm,
    Kill9,
    BackendRefusesWrites,
}

/// Every readable record as (source port, capture ms).
fn readable(r: &RedisServer, schema: &str) -> Vec<(u16, u64)> {
    let mut out = Vec::new();
    if schema != "keys" {
        for (_, fields) in r.xrange("redtap:events:t") {
            let get = |k: &str| fields.iter().find(|(f, _)| f == k).unwrap().1.clone();
            let ts: u64 = get("ts").parse().unwrap();
            out.push((get("sport").parse().unwrap(), ts / 1000));
        }
    } else {
        let keys = r.keys("redtap:ev:t:*");
        if keys.is_empty() {
            return out;
        }
        let mut c = r.conn().unwrap();
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut c).unwrap();
        for v in values.into_iter().flatten() {
            let v: serde_json::Value = serde_json::from_str(&v).unwrap();
            out.push((
                v["sport"].as_u64().unwrap() as u16,
                v["ts"].as_u64().unwrap() / 1000,
            ));
        }
    }
    out
}

fn retention_holds(schema: &str, then: Then) {
    let r = RedisServer::start();
    let mut d = Daemon::connections(&[("A", &r, 1)], &["--schema", schema, "--retention", "3s"]);
    // Two bursts 1.5 s apart: an expiry that follows the newest record (not each record's own
    // capture) would keep the first burst past its capture + retention + 1 s.
    assert_eq!(connect_many(d.listen, RECORDS / 2, 4), RECORDS / 2);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(connect_many(d.listen, RECORDS / 2, 4), RECORDS / 2);
    eventually(Duration::from_secs(2), "every record stored", || {
        readable(&r, schema).len() == RECORDS
    });
    let stored = readable(&r, schema);
    match then {
        Then::KeepRunning => {}
        Then::Sigterm => assert!(d.stop(Duration::from_secs(10)).success()),
        Then::Kill9 => d.signal("KILL"),
        Then::BackendRefusesWrites => {
            // Every write is refused from now on (NOREPLICAS); reads still work.
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("min-replicas-to-write")
                .arg(1)
                .query(&mut r.conn().unwrap())
                .unwrap();
            // More records arrive and are refused.
            assert_eq!(connect_many(d.listen, 20, 2), 20);
        }
    }
    let newest = stored.iter().map(|s| s.1).max().unwrap();
    let deadline = newest + RETENTION_MS + 1000;
    let mut polls = 0;
    let mut must_be_there = 0;
    loop {
        let before = now_ms();
        let seen = readable(&r, schema);
        let after = now_ms();
        polls += 1;
        for &(port, ts) in &seen {
            assert!(
                before <= ts + RETENTION_MS + 1000,
                "record :{port} captured at {ts} still readable at {before} ({then:?})"
            );
        }
        for &(port, ts) in &stored {
            if after < ts + RETENTION_MS - 1000 {
                must_be_there += 1;
                assert!(
                    seen.contains(&(port, ts)),
                    "record :{port} captured at {ts} gone at {after} ({then:?})"
                );
            }
        }
        if seen.is_empty() {
            break;
        }
        assert!(
            before <= deadline,
            "{} records readable past capture + retention + 1 s ({then:?})",
            seen.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The check ran while records had to be there, not only after they were gone.
    assert!(
        must_be_there > 0,
        "no poll before capture + retention − 1 s ({polls} polls)"
    );
    if schema != "keys" {
        assert_eq!(
            r.stream_keys("redtap:events:t").len(),
            1,
            "bucket keys left behind"
        );
    }
}

#[test]
fn retention_while_running_stream() {
    retention_holds("stream", Then::KeepRunning);
}

#[test]
fn retention_after_sigterm_stream() {
    retention_holds("stream", Then::Sigterm);
}

#[test]
fn retention_after_kill9_stream() {
    retention_holds("stream", Then::Kill9);
}

#[test]
fn retention_while_the_backend_refuses_writes_stream() {
    retention_holds("stream", Then::BackendRefusesWrites);
}

#[test]
fn retention_while_running_keys() {
    retention_holds("keys", Then::KeepRunning);
}

#[test]
fn retention_after_sigterm_keys() {
    retention_holds("keys", Then::Sigterm);
}

#[test]
fn retention_after_kill9_keys() {
    retention_holds("keys", Then::Kill9);
}

#[test]
fn retention_while_the_backend_refuses_writes_keys() {
    retention_holds("keys", Then::BackendRefusesWrites);
}

#[test]
fn retention_while_running_packed() {
    retention_holds("packed", Then::KeepRunning);
}

#[test]
fn retention_after_sigterm_packed() {
    retention_holds("packed", Then::Sigterm);
}

#[test]
fn retention_after_kill9_packed() {
    retention_holds("packed", Then::Kill9);
}

#[test]
fn retention_while_the_backend_refuses_writes_packed() {
    retention_holds("packed", Then::BackendRefusesWrites);
}
