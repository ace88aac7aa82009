//! Load synthetic records into one Redis backend, laid out exactly as `redtap run` writes them,
//! to measure the read commands (see docs/query.md, "Performance").
//!
//! `cargo run --release --example loadgen -- REDIS_URL AGENT COUNT [SPAN_SECS] [stream|keys]`
//!
//! Records are spread evenly over the last SPAN_SECS (default 200) seconds, from 65 536
//! sources in 10.0.0.0/16, to 192.0.2.1:9000; written with pipelines of 10 000 commands.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        eprintln!("usage: loadgen REDIS_URL AGENT COUNT [SPAN_SECS] [stream|keys]");
        std::process::exit(64);
    }
    let (url, agent, count): (&str, &str, u64) = (&a[1], &a[2], a[3].parse().unwrap());
    let span_us: u64 = a.get(4).map_or(200, |s| s.parse().unwrap()) * 1_000_000;
    let keys = a.get(5).is_some_and(|s| s == "keys");
    let retention_ms = 300_000;
    let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let start = now_us - span_us;
    let t = Instant::now();
    let mut last = (0u64, 0u64);
    let mut pipe = redis::pipe();
    for i in 0..count {
        let ts = start + i * span_us / count;
        let src = format!("10.0.{}.{}", (i >> 8) & 255, i & 255);
        let sport = 1024 + (i % 60000) as u16;
        if keys {
            let v = format!(
                r#"{{"src":"{src}","dst":"192.0.2.1","sport":{sport},"dport":9000,"ts":{ts},"kind":"conn"}}"#
            );
            pipe.cmd("SET")
                .arg(format!("redtap:ev:{agent}:{ts}:0"))
                .arg(v)
                .arg("PXAT")
                .arg(ts / 1000 + retention_ms)
                .ignore();
        } else {
            let ms = ts / 1000;
            last = if ms > last.0 {
                (ms, 0)
            } else {
                (last.0, last.1 + 1)
            };
            pipe.cmd("XADD")
                .arg(format!("redtap:events:{agent}"))
                .arg(format!("{}-{}", last.0, last.1))
                .arg("src")
                .arg(src)
                .arg("dst")
                .arg("192.0.2.1")
                .arg("sport")
                .arg(sport)
                .arg("dport")
                .arg(9000)
                .arg("ts")
                .arg(ts)
                .arg("kind")
                .arg("conn")
                .ignore();
        }
        if (i + 1) % 10_000 == 0 || i + 1 == count {
            pipe.exec(&mut conn).unwrap();
            pipe = redis::pipe();
        }
    }
    println!(
        "{count} records loaded into {url} in {:.2?} ({:.0}/s)",
        t.elapsed(),
        count as f64 / t.elapsed().as_secs_f64()
    );
}
