//! redtap's benchmark harness: starts its own redis-server processes, runs redtap and the load,
//! and prints a table with the reference measured side by side in the same run.
//!
//! ```text
//! cargo bench --bench redtap-bench -- [--smoke] [sink|sink-stream|sink-keys|sink-packed|connections|packets|balance|cluster|fleet|reads]...
//!     [--count=N] [--capture-threads=1,2]     (packets)
//!     [--steps=N] [--layouts=readable,packed]  (reads: up to N million records; which layouts)
//! ```
//!
//! Scenarios (all by default):
//! - `sink` — records made in-process → balancer → writers → two Redis backends, per schema,
//!   against `redis-benchmark` sending the same commands with the same pipeline depth and one
//!   connection per server (packed: against the readable layout's XADD per record).
//! - `connections` — a load generator opening and closing TCP connections against
//!   `redtap run --capture connections`, and against a minimal accept-and-discard server; plus
//!   capture → visible-in-Redis latency at half the maximum rate.
//! - `packets` — a bounded `trafgen` SYN flood (`--count=N`, default 2,000,000) at a closed
//!   loopback port, captured by `redtap run` (packets mode, `--serve none`) once per
//!   `--capture-threads=1,2` setting, with `tcpdump -w /dev/null` on the same flood as the
//!   reference: sent, captured by each, kernel and queue drops, written, shares, per-thread CPU
//!   (needs root; falls back to hping3 without netsniff-ng).
//! - `balance` — share error after 1,000,000 records with the weights changed 100 times.
//! - `cluster` — the sink's records/s into one backend that is a three-primary Redis Cluster
//!   (`redis+cluster://`) against the same into one single server, same records, same run. The
//!   records' capture times span 8 s, so their per-second buckets rotate over the primaries.
//! - `fleet` — three agents following one control Redis (`--control`): the time from a
//!   `weights set --control` (the same call, in-process) until every agent serves the new
//!   version (`GET /v1/control`), median and max over 100 changes.
//! - `reads` — two Redis filled with 1M, 2M, then 3M records (10k a second of capture time,
//!   half on each), once in the readable stream layout (the layout's own commands, pipelined)
//!   and once packed (the codec, 1,000 records an entry): the wall time of `redtap top -n 5`
//!   and `redtap query > /dev/null` as a user runs them, against XRANGE-ing the same buckets
//!   from this process (one thread per server, pages of 1,000 parsed into `redis::Value`);
//!   `REDTAP_READS_BASE=PATH` times another `redtap` build on the same data beside it.
//!
//! `--smoke` runs everything small and fast, to prove the harness works (CI runs it).
//! Timing never appears in the test suite; it lives here.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redtap::balance::{Balance, OnDown, Router, Swrr};
use redtap::buffer::OnFull;
use redtap::config::{Config, FileConfig, RunArgs, Schema};
use redtap::health::Board;
use redtap::record::{now_us, Kind, Record};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("minimal-server") {
        return minimal_server(args[1].parse().expect("ADDR"));
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let mut scenarios: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if scenarios.is_empty() {
        scenarios = vec![
            "sink",
            "connections",
            "packets",
            "balance",
            "fleet",
            "reads",
        ];
    }
    println!(
        "redtap-bench {} on {} cores ({})",
        if smoke { "(smoke)" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        redis_version()
    );
    for s in scenarios {
        match s {
            "sink" => {
                for schema in [Schema::Stream, Schema::Keys, Schema::Packed] {
                    sink(schema, smoke);
                }
            }
            "sink-stream" => sink(Schema::Stream, smoke),
            "sink-keys" => sink(Schema::Keys, smoke),
            "sink-packed" => sink(Schema::Packed, smoke),
            "connections" => connections(smoke),
            "packets" => packets(&PacketsOpts::from_args(&args, smoke)),
            "balance" => balance(smoke),
            "fleet" => fleet(smoke),
            "cluster" => cluster(smoke),
            "reads" => reads(smoke, &args),
            other => {
                eprintln!(
                    "unknown scenario {other:?}: use sink, connections, packets, balance, \
                     cluster, fleet or reads"
                );
                std::process::exit(64);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers: the test harness (real redis-server and redtap processes) plus what only the
// benchmarks need.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{free_port, load_connections, Daemon, RedisCluster, RedisServer as Redis};

fn redis_version() -> String {
    Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .find_map(|w| w.strip_prefix("v="))
                .map_or("redis ?".into(), |v| format!("redis {v}"))
        })
        .unwrap_or_else(|_| "no redis-server".into())
}

/// (user + system) CPU seconds of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    common::cpu_ticks(pid) as f64 / 100.0
}

/// Peak resident set size of a process in MiB, from /proc.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap()
        / 1024.0
}

/// Records of one agent held by `r`, either schema.
fn count(r: &Redis, schema: Schema, agent: &str) -> u64 {
    match schema {
        Schema::Stream => r.xlen(&format!("redtap:events:{agent}")),
        Schema::Keys => redis::cmd("DBSIZE").query(&mut r.conn().unwrap()).unwrap(),
        // Each entry's records, decoded one bucket at a time (not all held at once).
        Schema::Packed => {
            let mut c = r.conn().unwrap();
            let mut n = 0;
            for key in r.stream_keys(&format!("redtap:events:{agent}")) {
                n += common::read_bucket(&mut c, &key).len() as u64;
            }
            n
        }
    }
}

fn config(backends: &[(&str, &Redis, u32)], schema: Schema, agent: &str, listen: u16) -> Config {
    let args = RunArgs {
        listen: Some(format!("127.0.0.1:{listen}")),
        backends: backends
            .iter()
            .map(|(n, r, w)| format!("{n}={}@{w}", r.url()))
            .collect(),
        schema: Some(schema),
        agent: Some(agent.into()),
        admin: Some("off".into()),
        state_file: Some("off".into()),
        ..Default::default()
    };
    Config::resolve(FileConfig::default(), &args).unwrap()
}

fn row(what: &str, value: String, note: &str) {
    println!("  {what:<44} {value:>16}  {note}");
}

// ---------------------------------------------------------------------------------------------
// sink: in-process records → balancer → writers → Redis, against redis-benchmark.

/// Run `cfg`'s pipeline in this process with `n` connection records from distinct sources,
/// record `i` captured at `ts(now, i)`, until all are written or dropped: its summary and the
/// pipelines its writers sent.
async fn produce(
    cfg: &Config,
    n: u64,
    ts: impl Fn(u64, u64) -> u64 + Send + 'static,
) -> (redtap::Summary, u64) {
    let pipeline = redtap::Pipeline::start(cfg, OnFull::Wait).unwrap();
    let queue = pipeline.queue.clone();
    let metrics = pipeline.metrics.clone();
    let producer = tokio::spawn(async move {
        let base = now_us();
        for i in 0..n {
            let rec = Record {
                ts_us: ts(base, i),
                src: SocketAddr::new(
                    Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8).into(),
                    40_000 + (i % 20_000) as u16,
                ),
                dst: "127.0.0.1:9000".parse().unwrap(),
                kind: Kind::Conn,
            };
            metrics.captured.inc();
            queue.send(rec).await.unwrap();
        }
    });
    let metrics = pipeline.metrics.clone();
    let summary = pipeline
        .finish(Duration::from_secs(600), async {
            producer.await.unwrap();
        })
        .await;
    let batches: u64 = metrics.backends.iter().map(|b| b.batches.get()).sum();
    (summary, batches)
}

fn sink(schema: Schema, smoke: bool) {
    let n: u64 = if smoke { 20_000 } else { 1_000_000 };
    let (a, b) = (Redis::start(), Redis::start());
    let cfg = config(&[("A", &a, 30), ("B", &b, 70)], schema, "bench", 9);
    let batch = cfg.batch_size;
    let mem_before = a.used_memory() + b.used_memory();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let pid = std::process::id();
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let (summary, batches) = rt.block_on(produce(&cfg, n, |base, i| base + i / 4));
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let stored = count(&a, schema, "bench") + count(&b, schema, "bench");
    let mem = (a.used_memory() + b.used_memory()).saturating_sub(mem_before);
    assert_eq!(summary.written, n, "sink lost records: {summary:?}");
    assert_eq!(stored, n, "Redis holds {stored} of {n}");
    let ours = n as f64 / elapsed;

    // The reference: redis-benchmark, same commands, one connection per server, same depth,
    // both servers at once, split 30/70 like the records.
    a.flushall();
    b.flushall();
    let ts = now_us();
    // Packed is compared with the readable layout's XADD per record: what it replaces.
    let cmd: Vec<String> = match schema {
        Schema::Stream | Schema::Packed => {
            "XADD bench:events * src 10.1.2.3 dst 127.0.0.1 sport 40000 dport 9000"
                .split(' ')
                .map(String::from)
                .chain(["ts".into(), ts.to_string(), "kind".into(), "conn".into()])
                .collect()
        }
        Schema::Keys => vec![
            "SET".into(),
            "bench:ev:__rand_int__".into(),
            format!(
                r#"{{"src":"10.1.2.3","dst":"127.0.0.1","sport":40000,"dport":9000,"ts":{ts},"kind":"conn"}}"#
            ),
            "PXAT".into(),
            (ts / 1000 + 300_000).to_string(),
            "NX".into(),
        ],
    };
    let t1 = Instant::now();
    let runs: Vec<Child> = [(&a, n * 3 / 10), (&b, n * 7 / 10)]
        .iter()
        .map(|(r, count)| {
            Command::new("redis-benchmark")
                .args(["-h", "127.0.0.1", "-p", &r.port.to_string(), "-c", "1"])
                .args(["-P", &batch.to_string(), "-n", &count.to_string()])
                .args(["-r", "100000000", "-q"])
                .args(&cmd)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-benchmark not found: apt-get install redis-tools")
        })
        .collect();
    for mut c in runs {
        c.wait().unwrap();
    }
    let reference = n as f64 / t1.elapsed().as_secs_f64();
    let ref_mem = (a.used_memory() + b.used_memory()).saturating_sub(mem_before);

    println!("\nsink, schema {schema:?}: {n} records → 2 backends at 30/70, batch {batch}");
    row("redtap records/s", format!("{ours:.0}"), "");
    row(
        "redis-benchmark records/s (same commands)",
        format!("{reference:.0}"),
        &format!("-c 1 -P {batch} per server, both at once"),
    );
    row(
        "ratio redtap / redis-benchmark",
        format!("{:.2}×", ours / reference),
        "",
    );
    row(
        "redtap records per pipeline",
        format!("{:.0}", n as f64 / batches as f64),
        &format!("{batches} pipelines"),
    );
    row(
        "redtap CPU per record",
        format!("{:.2} µs", cpu * 1e6 / n as f64),
        "(user+sys) of the bench process, producer included",
    );
    row(
        "peak RSS",
        format!("{:.1} MiB", peak_rss_mib(pid)),
        "bench process",
    );
    row(
        "Redis memory per record (redtap)",
        format!("{:.1} B", mem as f64 / n as f64),
        "used_memory delta / records",
    );
    row(
        "Redis memory per record (redis-benchmark)",
        format!("{:.1} B", ref_mem as f64 / n as f64),
        "",
    );
}

// ---------------------------------------------------------------------------------------------
// connections: redtap run --capture connections against a minimal accept-and-discard server.

/// A minimal accept-and-discard server: the same runtime and backlog as redtap, no records.
fn minimal_server(addr: SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let l = redtap::capture::connections::bind_listener(addr).unwrap();
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
}

/// The minimal server as a child process (this binary, `minimal-server ADDR`), killed on drop.
struct MinimalServer(Child);

impl MinimalServer {
    fn start(addr: SocketAddr) -> Self {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["minimal-server", &addr.to_string()])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the minimal server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        MinimalServer(child)
    }
}

impl Drop for MinimalServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redtap run` as agent `bench` with `args`, capturing on `listen`, in front of backends A
/// (weight 30) and B (70).
fn spawn_redtap(listen: SocketAddr, args: &[&str], (a, b): (&Redis, &Redis)) -> Daemon {
    let (spec_a, spec_b) = (format!("A={}@30", a.url()), format!("B={}@70", b.url()));
    let mut all = vec![
        "--agent",
        "bench",
        "--backend",
        &spec_a,
        "--backend",
        &spec_b,
    ];
    all.extend_from_slice(args);
    Daemon::start_on(&listen.to_string(), &all)
}

fn connections(smoke: bool) {
    let dur = Duration::from_secs(if smoke { 1 } else { 5 });
    let threads = 4;
    let (a, b) = (Redis::start(), Redis::start());

    // Reference first: the minimal server.
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let minimal = MinimalServer::start(addr);
    let ref_pid = minimal.0.id();
    let ref_cpu0 = cpu_seconds(ref_pid);
    let t0 = Instant::now();
    // Fresh source networks per run (see `load`): 127.0.<base..base+2>.x.
    let base = 12 + (std::process::id() % 80) as u8 * 3;
    let ref_n = load_connections(addr, base, threads, dur, None);
    let ref_rate = ref_n as f64 / t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let ref_cpu = cpu_seconds(ref_pid) - ref_cpu0;
    drop(minimal);

    // redtap.
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let redtap = spawn_redtap(addr, &["--capture", "connections"], (&a, &b));
    let pid = redtap.pid();
    let mem0 = a.used_memory() + b.used_memory();
    let cpu0 = cpu_seconds(pid);
    let redis_cpu = || cpu_seconds(a.pid()) + cpu_seconds(b.pid());
    let rcpu0 = redis_cpu();
    let t0 = Instant::now();
    let n = load_connections(addr, base + 1, threads, dur, None);
    let stored = || count(&a, Schema::Stream, "bench") + count(&b, Schema::Stream, "bench");
    // The probe connection above is a record too.
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored() < n {
        assert!(Instant::now() < deadline, "only {} of {n} stored", stored());
        std::thread::sleep(Duration::from_millis(5));
    }
    let rate = stored() as f64 / t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let rcpu = redis_cpu() - rcpu0;
    let mem = (a.used_memory() + b.used_memory()).saturating_sub(mem0);

    // Latency: capture → readable in Redis, at half the maximum rate.
    let pace = rate / 2.0;
    let lat = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = [a.port, b.port]
        .into_iter()
        .map(|port| {
            let (lat, stop) = (lat.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                    .unwrap()
                    .get_connection()
                    .unwrap();
                // Records go to one stream per capture second: follow the buckets of the
                // last, this and the next second, each from where it was last read (a bucket
                // first seen is read from the start of the latency phase).
                let start_ms = now_us() / 1000;
                let mut last: BTreeMap<u64, String> = BTreeMap::new();
                while !stop.load(Ordering::Relaxed) {
                    let sec = now_us() / 1_000_000;
                    last.retain(|&b, _| b + 1 >= sec);
                    for b in sec - 1..=sec + 1 {
                        last.entry(b).or_insert_with(|| start_ms.to_string());
                    }
                    let mut cmd = redis::cmd("XREAD");
                    cmd.arg("BLOCK").arg(100).arg("STREAMS");
                    for b in last.keys() {
                        cmd.arg(format!("redtap:events:{{bench}}:{b}"));
                    }
                    for id in last.values() {
                        cmd.arg(id);
                    }
                    let reply: redis::streams::StreamReadReply = match cmd.query(&mut c) {
                        Ok(r) => r,
                        Err(_) => continue,
                    };
                    let now = now_us();
                    for key in reply.keys {
                        let Some(b) = key.key.rsplit(':').next().and_then(|b| b.parse().ok())
                        else {
                            continue;
                        };
                        for id in key.ids {
                            // Capture time: the entry ID's ms plus the `us` field (the µs
                            // beyond it; docs/redis-schema.md).
                            let ms: Option<i64> =
                                id.id.split('-').next().and_then(|m| m.parse().ok());
                            let us: i64 = match id.map.get("us") {
                                Some(redis::Value::BulkString(us)) => {
                                    String::from_utf8_lossy(us).parse().unwrap_or(0)
                                }
                                _ => 0,
                            };
                            if let Some(ms) = ms {
                                let ts = (ms * 1000 + us) as u64;
                                lat.lock().unwrap().push(now.saturating_sub(ts));
                            }
                            last.insert(b, id.id);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    load_connections(addr, base + 2, threads, dur, Some(pace));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let mut lat = lat.lock().unwrap().clone();
    lat.sort_unstable();
    let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)));
    let rss = peak_rss_mib(pid);
    drop(redtap);

    println!("\nconnections: {threads} client threads, {dur:?}, redtap → 2 backends at 30/70");
    row(
        "minimal accept-and-discard server conn/s",
        format!("{ref_rate:.0}"),
        "",
    );
    row(
        "redtap records stored/s",
        format!("{rate:.0}"),
        &format!("{n} connections"),
    );
    row(
        "ratio redtap / minimal server",
        format!("{:.2}×", rate / ref_rate),
        "",
    );
    row(
        "redtap CPU per record",
        format!("{:.2} µs", cpu * 1e6 / n as f64),
        "(user+sys) of redtap, accept and close included",
    );
    row(
        "Redis CPU per record",
        format!("{:.2} µs", rcpu * 1e6 / n as f64),
        "both redis-servers",
    );
    row(
        "minimal server CPU per connection",
        format!("{:.2} µs", ref_cpu * 1e6 / ref_n as f64),
        "the kernel's accept/close share of the above",
    );
    row("redtap peak RSS", format!("{rss:.1} MiB"), "");
    row(
        "Redis memory per record",
        format!("{:.1} B", mem as f64 / n as f64),
        "stream schema",
    );
    if let (Some(p50), Some(p99)) = (pct(0.5), pct(0.99)) {
        row(
            "capture → visible latency p50 / p99",
            format!("{:.2} / {:.2} ms", *p50 as f64 / 1e3, *p99 as f64 / 1e3),
            &format!("{} records at {pace:.0}/s", lat.len()),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// packets: a bounded trafgen SYN flood at redtap's packet capture, tcpdump on the same flood.

/// `--count=N` SYNs (default 2,000,000; 20,000 with `--smoke`) and `--capture-threads=1,2`
/// (the settings to run, one flood each).
struct PacketsOpts {
    count: u64,
    threads: Vec<usize>,
}

impl PacketsOpts {
    fn from_args(args: &[String], smoke: bool) -> PacketsOpts {
        let value = |name: &str| {
            args.iter()
                .find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_string))
        };
        let count = value("count").map_or(if smoke { 20_000 } else { 2_000_000 }, |v| {
            v.parse().expect("--count=N")
        });
        let threads = value("capture-threads").map_or(vec![1, 2], |v| {
            v.split(',')
                .map(|t| t.parse().expect("--capture-threads=1,2"))
                .collect()
        });
        PacketsOpts { count, threads }
    }
}

/// (user + system) CPU seconds of each thread of `pid`, by thread name.
fn thread_cpu(pid: u32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        *out.entry(name).or_insert(0.0) += ticks as f64 / 100.0;
    }
    out
}

/// The machine's CPU time so far from /proc/stat, in seconds: (busy, softirq, total).
fn machine_cpu() -> (f64, f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 7 {
        return (0.0, 0.0, 0.0);
    }
    // user nice system idle iowait irq softirq steal…
    let total: f64 = f.iter().take(8).sum();
    let idle = f[3] + f[4];
    ((total - idle) / 100.0, f[6] / 100.0, total / 100.0)
}

/// `tcpdump -w /dev/null` on `lo` with redtap's own filter and ring size: the reference.
struct TcpdumpRef {
    child: Child,
    log: std::path::PathBuf,
}

impl TcpdumpRef {
    fn start(port: u16, dir: &std::path::Path) -> TcpdumpRef {
        let log = dir.join("tcpdump.log");
        let child = Command::new("tcpdump")
            .args([
                "-i",
                "lo",
                "-nn",
                "-s",
                "256",
                "-B",
                "65536",
                "-w",
                "/dev/null",
            ])
            .arg(format!("tcp dst port {port} and dst host 127.0.0.1"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("tcpdump not found: apt-get install tcpdump");
        let t = TcpdumpRef { child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&t.log).is_ok_and(|l| l.contains("listening on")) {
            assert!(Instant::now() < deadline, "tcpdump did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    /// Stop it (SIGINT, so it prints its counts): (captured, dropped by kernel).
    fn finish(mut self) -> (u64, u64) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let n = |what: &str| {
            log.lines()
                .find(|l| l.ends_with(what))
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (n("packets captured"), n("packets dropped by kernel"))
    }
}

/// The SYN flood: `trafgen` on `lo` (one CPU), `count` SYNs from 127.0.0.9 with random source
/// ports, IP ids and sequence numbers to 127.0.0.1:`port`; (sent, its CPU seconds). Falls back
/// to `hping3 --faster` (much slower) where netsniff-ng is not installed.
fn syn_flood(port: u16, count: u64, dir: &std::path::Path) -> (u64, f64, &'static str) {
    if Command::new("trafgen").arg("--version").output().is_ok() {
        let conf = dir.join("syn.cfg");
        std::fs::write(
            &conf,
            format!(
                "{{ 0,0,0,0,0,0, 0,0,0,0,0,0, 0x08,0x00, 0x45,0x00, const16(40), drnd(2), \
                 0x40,0x00, 64, 6, csumip(14, 33), 127,0,0,9, 127,0,0,1, drnd(2), \
                 const16({port}), drnd(4), const32(0), 0x50, 0x02, const16(512), \
                 csumtcp(14, 34), const16(0) }}\n"
            ),
        )
        .unwrap();
        let out = Command::new("timeout")
            .args(["300", "trafgen", "--dev", "lo", "--conf"])
            .arg(&conf)
            .args(["--num", &count.to_string(), "-P", "1", "--cpp"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let sent = text
            .lines()
            .find(|l| l.contains("packets outgoing"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        // "0 sec, 957 usec on CPU0 (1000 packets)"
        let cpu = text
            .lines()
            .find(|l| l.contains("usec on CPU"))
            .and_then(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                Some(w.first()?.parse::<f64>().ok()? + w.get(2)?.parse::<f64>().ok()? / 1e6)
            })
            .unwrap_or(0.0);
        return (sent, cpu, "trafgen");
    }
    // hping3 counts its source port up from 1024 and wraps; --faster is bounded by -c.
    let out = Command::new("timeout")
        .args([
            "300",
            "hping3",
            "-q",
            "-S",
            "--faster",
            "-p",
            &port.to_string(),
        ])
        .args(["-s", "1024", "-c", &count.to_string(), "127.0.0.1"])
        .output()
        .expect("neither trafgen (netsniff-ng) nor hping3 found");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let sent = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (sent, 0.0, "hping3")
}

fn packets(opts: &PacketsOpts) {
    if !Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
    {
        println!("\npackets: skipped: needs root (CAP_NET_RAW) to capture and to send");
        return;
    }
    for &threads in &opts.threads {
        packets_run(opts.count, threads);
    }
}

fn packets_run(syns: u64, threads: usize) {
    let (a, b) = (Redis::start(), Redis::start());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t_arg = threads.to_string();
    let redtap = spawn_redtap(
        listen,
        &[
            "--capture",
            "packets",
            "--serve",
            "none",
            "--capture-threads",
            &t_arg,
        ],
        (&a, &b),
    );
    let pid = redtap.pid();
    let dump = TcpdumpRef::start(port, dir.path());
    let mem0 = a.used_memory() + b.used_memory();
    let cpu0 = cpu_seconds(pid);
    let threads0 = thread_cpu(pid);
    let dump_cpu0 = cpu_seconds(dump.child.id());
    let redis_cpu0 = cpu_seconds(a.pid()) + cpu_seconds(b.pid());
    let machine0 = machine_cpu();
    let t0 = Instant::now();
    let (sent, gen_cpu, generator) = syn_flood(port, syns, dir.path());
    let flood = t0.elapsed().as_secs_f64();
    let machine1 = machine_cpu();
    let stored = || count_all(&a, &b);
    // Settled: nothing more stored for a second (bounded).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = u64::MAX;
    while stored() != last && Instant::now() < deadline {
        last = stored();
        std::thread::sleep(Duration::from_secs(1));
    }
    let n = stored();
    // Capture threads' CPU over the flood and what they read after it (they idle after).
    let threads1 = thread_cpu(pid);
    let (na, nb) = (
        count(&a, Schema::Stream, "bench"),
        count(&b, Schema::Stream, "bench"),
    );
    let cpu = cpu_seconds(pid) - cpu0;
    let dump_cpu = cpu_seconds(dump.child.id()) - dump_cpu0;
    let (dump_captured, dump_dropped) = dump.finish();
    let mem = (a.used_memory() + b.used_memory()).saturating_sub(mem0);
    let captured = redtap.metric("redtap_records_captured_total");
    let written = redtap.metric_sum("redtap_records_written_total");
    let kernel = redtap.metric_sum("redtap_kernel_drops_total");
    let queue_full = redtap.metric("redtap_records_dropped_total{reason=\"queue_full\"}");
    let rss = peak_rss_mib(pid);
    drop(redtap);

    println!(
        "\npackets: {generator} {syns} SYNs at 127.0.0.1:{port} on lo, redtap \
         --capture-threads {threads} --serve none → 2 backends at 30/70; tcpdump -w /dev/null \
         on the same flood"
    );
    row(
        &format!("SYNs sent ({generator})"),
        format!("{sent}"),
        &format!(
            "{:.0}/s over {flood:.2} s; {generator} CPU {gen_cpu:.2} s",
            sent as f64 / flood
        ),
    );
    row(
        "captured by tcpdump",
        format!("{dump_captured}"),
        &format!("dropped by kernel {dump_dropped}; tcpdump CPU {dump_cpu:.2} s"),
    );
    row(
        "captured by redtap (records made)",
        format!("{captured:.0}"),
        "",
    );
    row(
        "kernel drops / queue_full",
        format!("{kernel:.0} / {queue_full:.0}"),
        "",
    );
    row(
        "written to Redis",
        format!("{n}"),
        &format!("records_written {written:.0}"),
    );
    row(
        "ratio redtap / tcpdump",
        format!("{:.3}×", n as f64 / dump_captured.max(1) as f64),
        "written / tcpdump captured",
    );
    row(
        "loss",
        format!(
            "{:.3}%",
            100.0 * sent.saturating_sub(n) as f64 / sent.max(1) as f64
        ),
        "(sent − written) / sent",
    );
    let want_a = n as f64 * 0.3;
    row(
        "shares A / B (weights 30 / 70)",
        format!(
            "{:.3}% / {:.3}%",
            100.0 * na as f64 / n.max(1) as f64,
            100.0 * nb as f64 / n.max(1) as f64
        ),
        &format!("A − N·30/100 = {:+.1} records", na as f64 - want_a),
    );
    let capture_cpu: Vec<String> = threads1
        .iter()
        .filter(|(name, _)| name.starts_with("redtap-cap"))
        .map(|(name, t1)| {
            let busy = t1 - threads0.get(name).copied().unwrap_or(0.0);
            format!("{name} {busy:.2} s ({:.0}%)", 100.0 * busy / flood)
        })
        .collect();
    row(
        "capture threads CPU (% of the flood's time)",
        capture_cpu.join(", "),
        "",
    );
    let others: f64 = threads1
        .iter()
        .filter(|(name, _)| !name.starts_with("redtap-cap"))
        .map(|(name, t1)| t1 - threads0.get(name).copied().unwrap_or(0.0))
        .sum();
    row(
        "redtap's other threads, Redis CPU",
        format!(
            "{others:.2} s, {:.2} s",
            cpu_seconds(a.pid()) + cpu_seconds(b.pid()) - redis_cpu0
        ),
        "dispatcher and writers (tokio); both redis-servers",
    );
    row(
        "redtap CPU, whole run",
        format!("{cpu:.2} s"),
        &format!("{:.2} µs per record", cpu * 1e6 / n.max(1) as f64),
    );
    let (busy, softirq, total) = (
        machine1.0 - machine0.0,
        machine1.1 - machine0.1,
        machine1.2 - machine0.2,
    );
    row(
        "machine CPU during the flood",
        format!("{:.0}% busy", 100.0 * busy / total.max(0.01)),
        &format!(
            "of {} cores; softirq {:.0}% (kernel delivery, BPF, fanout)",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            100.0 * softirq / total.max(0.01)
        ),
    );
    row("redtap peak RSS", format!("{rss:.1} MiB"), "");
    row(
        "Redis memory per record",
        format!("{:.1} B", mem as f64 / n.max(1) as f64),
        "stream schema, with kind and len",
    );
}

fn count_all(a: &Redis, b: &Redis) -> u64 {
    count(a, Schema::Stream, "bench") + count(b, Schema::Stream, "bench")
}

// ---------------------------------------------------------------------------------------------
// balance: share error with weights changing during the run.

fn balance(smoke: bool) {
    let n: u64 = if smoke { 100_000 } else { 1_000_000 };
    let changes = 100;
    let names: Vec<String> = ["A", "B", "C"].iter().map(|s| s.to_string()).collect();
    let bal = Balance::new(names.clone(), vec![30, 70, 0]);
    let board = Arc::new(Board::new(3));
    let mut router = Router::new(bal.clone(), board, OnDown::Redistribute);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut worst: f64 = 0.0;
    let per = n / changes;
    let t0 = Instant::now();
    for _ in 0..changes {
        let mut weights: Vec<u32> = (0..3).map(|_| (rand() % 10_001) as u32).collect();
        if weights.iter().all(|&w| w == 0) {
            weights[0] = 1;
        }
        let map: BTreeMap<String, u32> = names.iter().cloned().zip(weights.clone()).collect();
        bal.set_weights(&map).unwrap();
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut counts = [0u64; 3];
        for step in 1..=per {
            counts[router.route().unwrap()] += 1;
            for i in 0..3 {
                let dev = (i128::from(total) * i128::from(counts[i])
                    - i128::from(step) * i128::from(weights[i]))
                .unsigned_abs() as f64
                    / total as f64;
                worst = worst.max(dev);
            }
        }
    }
    let elapsed = t0.elapsed();
    // The selector alone, without the checking above.
    let mut s = Swrr::new(&[30, 70, 1]);
    let t1 = Instant::now();
    let mut sink = 0usize;
    for _ in 0..n {
        sink = sink.wrapping_add(s.pick());
    }
    let pick_ns = t1.elapsed().as_nanos() as f64 / n as f64;
    std::hint::black_box(sink);
    println!("\nbalance: {n} records, 3 backends, weights changed {changes} times at random");
    row(
        "worst deviation from N·w/Σw, any backend",
        format!("{worst:.3} records"),
        "over every prefix of every segment",
    );
    row(
        "bound promised",
        "≤ 1 record".into(),
        "σ = 1 − 1/(2n−2) = 0.75 for 3",
    );
    row(
        "selector cost",
        format!("{pick_ns:.1} ns/record"),
        "Swrr::pick",
    );
    let _ = elapsed;
}

/// Three agents, one control Redis: `weights set --control` → applied on every agent.
fn fleet(smoke: bool) {
    let changes: u64 = if smoke { 5 } else { 100 };
    let (a, b, ctl) = (Redis::start(), Redis::start(), Redis::start());
    let (spec_a, spec_b) = (format!("A={}@30", a.url()), format!("B={}@70", b.url()));
    let agents: Vec<Daemon> = ["f1", "f2", "f3"]
        .iter()
        .map(|name| {
            Daemon::start(&[
                "--capture",
                "connections",
                "--agent",
                name,
                "--backend",
                &spec_a,
                "--backend",
                &spec_b,
                "--control",
                &ctl.url(),
            ])
        })
        .collect();
    let version_of = |d: &Daemon| -> u64 {
        common::http_get(&format!("{}/v1/control", d.admin))
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|v| v["version"].as_u64())
            .unwrap_or(0)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = redis::Client::open(ctl.url()).unwrap();
    let mut conn = rt
        .block_on(client.get_multiplexed_async_connection())
        .unwrap();
    let keys = redtap::control::Keys::new("redtap");
    let mut took: Vec<Duration> = Vec::new();
    for i in 0..changes {
        let weights = BTreeMap::from([("A".to_string(), (i % 10 + 1) as u32), ("B".into(), 5)]);
        let t0 = Instant::now();
        let fleet = rt
            .block_on(redtap::control::set(
                &mut conn,
                &keys,
                &weights,
                &BTreeMap::new(),
                "bench",
                |_| Ok(()),
            ))
            .unwrap();
        // Bounded: a change not applied everywhere within 10 s fails the run.
        for d in &agents {
            while version_of(d) < fleet.version {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "change {i} not applied"
                );
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        took.push(t0.elapsed());
    }
    took.sort();
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    println!("\nfleet: 3 agents, one control Redis, {changes} changes of the fleet weights");
    row(
        "set → applied on every agent, median",
        ms(took[took.len() / 2]),
        "CAS + nudge; polled through GET /v1/control",
    );
    row(
        "set → applied on every agent, max",
        ms(*took.last().unwrap()),
        "bound promised: 1 s (the poll if a nudge is lost)",
    );
}

// ---------------------------------------------------------------------------------------------
// cluster: the sink into a three-primary Redis Cluster against one single server.

/// Write `n` in-process records through the pipeline to the one backend `url`; records/s and
/// pipelines sent.
fn sink_into(url: &str, n: u64) -> (f64, u64) {
    let args = RunArgs {
        listen: Some("127.0.0.1:9".into()),
        backends: vec![format!("X={url}@1")],
        schema: Some(Schema::Stream),
        agent: Some("bench".into()),
        admin: Some("off".into()),
        state_file: Some("off".into()),
        ..Default::default()
    };
    let cfg = Config::resolve(FileConfig::default(), &args).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let t0 = Instant::now();
    // Over 8 s of capture time: eight buckets, on different primaries.
    let (summary, batches) = rt.block_on(produce(&cfg, n, move |base, i| base + i * 8_000_000 / n));
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    assert_eq!(summary.written, n, "sink lost records: {summary:?}");
    (rate, batches)
}

fn cluster(smoke: bool) {
    let n: u64 = if smoke { 20_000 } else { 1_000_000 };
    let c = RedisCluster::start(3, &[]);
    let single = Redis::start();
    let (ours, batches) = sink_into(&c.url(), n);
    let per_node: Vec<usize> = {
        let mut v = vec![0; c.nodes.len()];
        for (i, ..) in c.records("redtap") {
            v[i] += 1;
        }
        v
    };
    assert_eq!(
        per_node.iter().sum::<usize>() as u64,
        n,
        "the cluster holds every record"
    );
    let (one, one_batches) = sink_into(&single.url(), n);
    assert_eq!(count(&single, Schema::Stream, "bench"), n);
    println!("\ncluster: {n} records (capture times over 8 s) → one backend, schema stream");
    row(
        "records/s into a 3-primary cluster",
        format!("{ours:.0}"),
        &format!("{batches} pipelines; per primary {per_node:?}"),
    );
    row(
        "records/s into one server",
        format!("{one:.0}"),
        &format!("{one_batches} pipelines"),
    );
    row(
        "ratio cluster / one server",
        format!("{:.2}×", ours / one),
        "",
    );
}

// ---------------------------------------------------------------------------------------------
// reads: `redtap top` and `redtap query` over millions of records, against plain XRANGE.

/// The machine's 1-minute load average, from /proc.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The `i`th record of the reads scenario: 10k a second from `base_us`, 50,000 sources.
fn read_record(base_us: u64, i: u64) -> Record {
    let x = (i.wrapping_mul(2_654_435_761)) % 50_000;
    Record {
        ts_us: base_us + i * 100 + i % 7,
        src: SocketAddr::new(
            Ipv4Addr::new(10, (x >> 16) as u8, (x >> 8) as u8, x as u8).into(),
            1024 + (i % 60_000) as u16,
        ),
        dst: "10.0.0.2:9000".parse().unwrap(),
        kind: Kind::Segment {
            flags: 0x18,
            len: 100 + (i % 1000) as u16,
        },
    }
}

/// Store records `from..to` on `a` and `b` (even and odd), readable or packed.
fn fill_reads(
    (a, b): (&Redis, &Redis),
    layouts: &mut [redtap::layout::Layout; 2],
    buckets: &mut [u64; 2],
    base_us: u64,
    range: std::ops::Range<u64>,
    packed: bool,
) {
    let conns = [a, b];
    let listen: SocketAddr = "10.0.0.2:9000".parse().unwrap();
    const CHUNK: u64 = 20_000;
    let mut start = range.start;
    while start < range.end {
        let end = (start + CHUNK).min(range.end);
        for side in 0..2 {
            let recs: Vec<Record> = (start..end)
                .filter(|i| i % 2 == side as u64)
                .map(|i| read_record(base_us, i))
                .collect();
            let mut pipe = redis::pipe();
            if packed {
                // One entry per 1,000 records of one second, as a packed writer would batch.
                let mut by_sec: BTreeMap<u64, Vec<Record>> = BTreeMap::new();
                for r in recs {
                    by_sec.entry(r.ts_us / 1_000_000).or_default().push(r);
                }
                for (sec, recs) in by_sec {
                    let key = format!("redtap:events:{{bench}}:{sec}");
                    for batch in recs.chunks(1000) {
                        let id = layouts[side].next_slot(&batch[0]);
                        let v = redtap::layout::packed::encode(batch, id.major, Some(listen));
                        pipe.cmd("XADD")
                            .arg(&key)
                            .arg(format!("{}-{}", id.major, id.seq))
                            .arg("p")
                            .arg(v)
                            .ignore();
                    }
                    pipe.cmd("PEXPIREAT")
                        .arg(&key)
                        .arg((sec + 1) * 1000 + 3_600_000)
                        .ignore();
                }
            } else {
                for r in &recs {
                    let slot = layouts[side].next_slot(r);
                    let bucket = r.ts_us / 1_000_000;
                    let create = bucket != buckets[side];
                    buckets[side] = bucket;
                    layouts[side].push_store(
                        &mut pipe,
                        std::slice::from_ref(r),
                        &[],
                        slot,
                        0,
                        create,
                    );
                }
                // The pipeline's answers are IDs; only errors matter.
                let answers: Vec<redis::Value> =
                    pipe.query(&mut conns[side].conn().unwrap()).unwrap();
                assert!(
                    !answers
                        .iter()
                        .any(|v| matches!(v, redis::Value::ServerError(_))),
                    "a store failed"
                );
                continue;
            }
            pipe.exec(&mut conns[side].conn().unwrap()).unwrap();
        }
        start = end;
    }
}

/// XRANGE every bucket of `r` in pages of 1,000, parsing each page into `redis::Value`: what
/// reading alone costs. Entries read.
fn xrange_all(r: &Redis) -> u64 {
    let mut c = r.conn().unwrap();
    let keys: Vec<String> = r.keys("redtap:events:*");
    let mut n = 0u64;
    for key in keys {
        let mut start = "-".to_string();
        loop {
            let v: redis::Value = redis::cmd("XRANGE")
                .arg(&key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(1000)
                .query(&mut c)
                .unwrap();
            let redis::Value::Array(items) = &v else {
                break;
            };
            n += items.len() as u64;
            let last = items.last().and_then(|e| match e {
                redis::Value::Array(p) => match &p[0] {
                    redis::Value::BulkString(id) => Some(String::from_utf8_lossy(id).into_owned()),
                    _ => None,
                },
                _ => None,
            });
            match last {
                Some(id) if items.len() == 1000 => start = format!("({id}"),
                _ => break,
            }
        }
    }
    n
}

/// CPU seconds of this process, or of its waited-for children, from /proc/self/stat.
fn own_cpu(children: bool) -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let at = if children { 13 } else { 11 };
    (f[at].parse::<u64>().unwrap() + f[at + 1].parse::<u64>().unwrap()) as f64 / 100.0
}

/// One measurement: the fastest wall time of its runs, and the mean CPU seconds a run took in
/// redtap (the waited-for child; this process for the in-process reference) and in both Redis.
struct Timed {
    wall: f64,
    client_cpu: f64,
    redis_cpu: f64,
}

fn best_of(runs: usize, servers: (&Redis, &Redis), child: bool, mut f: impl FnMut()) -> Timed {
    let redis = || cpu_seconds(servers.0.pid()) + cpu_seconds(servers.1.pid());
    let (c0, r0) = (own_cpu(child), redis());
    let wall = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min);
    Timed {
        wall,
        client_cpu: (own_cpu(child) - c0) / runs as f64,
        redis_cpu: (redis() - r0) / runs as f64,
    }
}

fn reads(smoke: bool, args: &[String]) {
    let step: u64 = if smoke { 20_000 } else { 1_000_000 };
    // `--steps=N`: stop after N million records (3 by default); `--layouts=readable` or `packed`.
    let opt = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_string))
    };
    let steps: u64 = opt("steps").map_or(3, |s| s.parse().expect("--steps=N"));
    let layouts = opt("layouts").unwrap_or_else(|| "readable,packed".into());
    let runs = if smoke { 1 } else { 2 };
    println!(
        "\nreads: two Redis, 10k records a second of capture time, best of {runs}; load average \
         {} at the start",
        loadavg()
    );
    // Far enough back that 3M records (300 s) end before now, well inside the retention.
    let base_us = (now_us() - 20 * 60 * 1_000_000) / 1_000_000 * 1_000_000;
    for packed in [false, true] {
        if !layouts.contains(if packed { "packed" } else { "readable" }) {
            continue;
        }
        let (a, b) = (Redis::start(), Redis::start());
        let layout = redtap::layout::Layout::new(Schema::Stream, "redtap", "bench", 3_600_000)
            .with_listen("10.0.0.2:9000".parse().unwrap());
        let mut layouts = [layout.clone(), layout];
        let mut buckets = [0u64; 2];
        let src = [
            "--backend".to_string(),
            format!("A={}", a.url()),
            "--backend".to_string(),
            format!("B={}", b.url()),
            "--retention".to_string(),
            "1h".to_string(),
        ];
        let name = if packed { "packed" } else { "readable stream" };
        for k in 1..=steps {
            let n = k * step;
            let t = Instant::now();
            fill_reads(
                (&a, &b),
                &mut layouts,
                &mut buckets,
                base_us,
                (k - 1) * step..n,
                packed,
            );
            let fill = t.elapsed().as_secs_f64();
            let mut total = 0u64;
            let top = best_of(runs, (&a, &b), true, || {
                let out = Command::new(common::redtap_bin())
                    .args(["top", "-n", "5", "--format", "json"])
                    .args(&src)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                total = v["total"].as_u64().unwrap();
            });
            assert_eq!(total, n, "top counted every record");
            // `redtap query` by `bin`, output discarded.
            let time_query = |bin: &str| {
                best_of(runs, (&a, &b), true, || {
                    let st = Command::new(bin)
                        .arg("query")
                        .args(&src)
                        .stdout(Stdio::null())
                        .status()
                        .unwrap();
                    assert!(st.success());
                })
            };
            let query = time_query(common::redtap_bin());
            // `REDTAP_READS_BASE=PATH`: the same commands with another build (e.g. the one before
            // a change), readable layout only (an older build may not read packed entries).
            let base = std::env::var("REDTAP_READS_BASE").ok().filter(|_| !packed);
            let base_times = base.map(|bin| {
                let top = best_of(runs, (&a, &b), true, || {
                    let st = Command::new(&bin)
                        .args(["top", "-n", "5"])
                        .args(&src)
                        .stdout(Stdio::null())
                        .status()
                        .unwrap();
                    assert!(st.success());
                });
                (top, time_query(&bin))
            });
            let mut entries = 0;
            let xr = best_of(runs, (&a, &b), false, || {
                let (ra, rb) = std::thread::scope(|s| {
                    let ta = s.spawn(|| xrange_all(&a));
                    let tb = s.spawn(|| xrange_all(&b));
                    (ta.join().unwrap(), tb.join().unwrap())
                });
                entries = ra + rb;
            });
            let mem = (a.used_memory() + b.used_memory()) as f64 / n as f64;
            println!("\n  {name}, {n} records ({entries} entries, {mem:.1} B/record in Redis, filled in {fill:.1} s)");
            let line = |what: &str, t: &Timed, client: &str| {
                row(
                    what,
                    format!("{:.2} s", t.wall),
                    &format!(
                        "{:.0}k records/s; CPU {client} {:.2} s, Redis {:.2} s",
                        n as f64 / t.wall / 1e3,
                        t.client_cpu,
                        t.redis_cpu
                    ),
                )
            };
            line("redtap top -n 5", &top, "redtap");
            line("redtap query > /dev/null (table)", &query, "redtap");
            line("reference: XRANGE every bucket, 2 threads", &xr, "bench");
            if let Some((top, query)) = &base_times {
                line("before ($REDTAP_READS_BASE): top -n 5", top, "redtap");
                line("before ($REDTAP_READS_BASE): query", query, "redtap");
            }
        }
    }
    println!("  load average {} at the end", loadavg());
}
