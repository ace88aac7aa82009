//! One writer on its own, against a real redis-server: what it does when it may not write, and
//! what each layout costs in Redis memory per record.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::RedisServer;
use redtap::buffer::{Budget, OnFull};
use redtap::config::Schema;
use redtap::health::{Board, Cause, HealthConfig};
use redtap::layout::Layout;
use redtap::metrics::Metrics;
use redtap::record::{now_us, Kind, Record};
use redtap::sink::{Writer, WriterContext};
use tokio_util::sync::CancellationToken;

fn writer(url: &str, board: &Arc<Board>) -> (Writer, Arc<Metrics>) {
    let layout = Layout::new(Schema::Stream, "redtap", "t", 3_600_000);
    writer_with(url, board, layout, 16)
}

fn writer_with(
    url: &str,
    board: &Arc<Board>,
    layout: Layout,
    batch_size: usize,
) -> (Writer, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(&["A".to_string()]));
    let ctx = WriterContext {
        metrics: metrics.clone(),
        board: board.clone(),
        budget: Arc::new(Budget::new(1 << 20)),
        on_full: OnFull::Wait,
        health: HealthConfig::default(),
        batch_size,
    };
    let client = redis::Client::open(url).unwrap();
    (Writer::new(0, "A".into(), client, layout, ctx), metrics)
}

fn records(n: u16) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            ts_us: now_us(),
            src: format!("10.0.0.1:{}", 5000 + i).parse().unwrap(),
            dst: "10.0.0.2:9000".parse().unwrap(),
            kind: Kind::Conn,
        })
        .collect()
}

/// CPU ticks (1/100 s) this process has used.
fn cpu_ticks() -> u64 {
    common::cpu_ticks(std::process::id())
}

#[tokio::test(flavor = "current_thread")]
async fn an_excluded_writer_holding_records_waits_without_spinning() {
    let board = Arc::new(Board::new(1));
    // Nothing listens there: the writer must not even try (excluded).
    let (w, metrics) = writer("redis://127.0.0.1:1/", &board);
    board.exclude(0, Cause::LeaseHeld("host x pid 1".into()));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(records(1)).await.unwrap();
    let abort = CancellationToken::new();
    let task = tokio::spawn(w.run(rx, abort.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks() - before;
    abort.cancel();
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(
        used < 30,
        "the writer burned {used} of 100 ticks in one idle second"
    );
    assert_eq!(metrics.backends[0].written.get(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_writer_writes_only_while_its_lease_clears_it() {
    let r = RedisServer::start();
    let board = Arc::new(Board::new(1));
    let (w, metrics) = writer(&r.url(), &board);
    // The guard has not taken (or could not renew) this agent's lease.
    board.clear_until(0, 0);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(records(10)).await.unwrap();
    let abort = CancellationToken::new();
    let task = tokio::spawn(w.run(rx, abort.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(r.xlen("redtap:events:t"), 0, "written without a lease");
    // The lease is taken: what waited goes out.
    board.clear_until(0, now_us() / 1000 + 60_000);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while r.xlen("redtap:events:t") < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "not written once cleared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    assert_eq!(metrics.backends[0].written.get(), 10);
    assert_eq!(r.xlen("redtap:events:t"), 10);
    abort.cancel();
}

/// Redis memory per record (`used_memory` delta / records) after one writer stored 200,000
/// records of `kind` with `schema`: 20,000 a second over the last 10 s, from 65,536 sources
/// (10.0.x.y, ports varying), all to the agent's listen address 10.0.0.2:9000, at most
/// `batch` records a pipeline (packed: an entry).
async fn bytes_per_record(schema: Schema, kind: Kind) -> f64 {
    bytes_per_record_in(schema, kind, 512).await
}

async fn bytes_per_record_in(schema: Schema, kind: Kind, batch: usize) -> f64 {
    const N: usize = 200_000;
    let r = RedisServer::start();
    let board = Arc::new(Board::new(1));
    board.clear_until(0, now_us() / 1000 + 600_000);
    let layout =
        Layout::new(schema, "redtap", "t", 3_600_000).with_listen("10.0.0.2:9000".parse().unwrap());
    let (w, metrics) = writer_with(&r.url(), &board, layout, batch);
    let before = r.used_memory();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let abort = CancellationToken::new();
    let task = tokio::spawn(w.run(rx, abort.clone()));
    let t0 = now_us() - 10_000_000;
    let recs: Vec<Record> = (0..N)
        .map(|i| Record {
            // 50 µs apart, plus a few µs of jitter as real captures have.
            ts_us: t0 + i as u64 * 50 + (i as u64 * 7919) % 13,
            src: std::net::SocketAddr::new(
                std::net::Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8).into(),
                1024 + (i as u16 % 60_000),
            ),
            dst: "10.0.0.2:9000".parse().unwrap(),
            kind,
        })
        .collect();
    for chunk in recs.chunks(batch) {
        tx.send(chunk.to_vec()).await.unwrap();
    }
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(120), task).await;
    abort.cancel();
    assert_eq!(
        metrics.backends[0].written.get(),
        N as u64,
        "not all written"
    );
    (r.used_memory() - before) as f64 / N as f64
}

const SEGMENT: Kind = Kind::Segment {
    flags: 0x18,
    len: 1460,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_record_costs_at_most_40_bytes_of_redis_memory() {
    for (what, kind) in [("connection", Kind::Conn), ("segment", SEGMENT)] {
        let b = bytes_per_record(Schema::Stream, kind).await;
        println!("stream layout, {what} records: {b:.1} B/record");
        assert!(b <= 40.0, "{what}: {b:.1} B/record");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_layout_cost_per_record_is_measured() {
    let b = bytes_per_record(Schema::Keys, Kind::Conn).await;
    println!("keys layout, connection records: {b:.1} B/record");
    // A key per record: its name, JSON value and expiry cost far more than a stream entry.
    assert!(b > 40.0, "{b:.1} B/record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packed_record_costs_at_most_16_bytes_of_redis_memory_when_the_writer_packs_it() {
    for (what, kind) in [("connection", Kind::Conn), ("segment", SEGMENT)] {
        let b = bytes_per_record(Schema::Packed, kind).await;
        println!("packed layout, {what} records, 512 an entry: {b:.1} B/record");
        assert!(b <= 16.0, "{what}: {b:.1} B/record");
    }
    // Small entries (a lightly loaded writer's pipelines) pay an entry's overhead over fewer
    // records, and still cost less than the stream layout's 40 B bound.
    for batch in [32, 8] {
        let b = bytes_per_record_in(Schema::Packed, SEGMENT, batch).await;
        println!("packed layout, segment records, {batch} an entry: {b:.1} B/record");
        assert!(b < 40.0, "{batch} an entry: {b:.1} B/record");
    }
}
