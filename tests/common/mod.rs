//! Test harness: real `redis-server` processes and the real `redtap` binary, on free ports.
//!
//! - [`RedisServer`]: a redis-server on a free port in a temp dir, killed and reaped on drop; its
//!   log is printed if the test panics.
//! - [`Daemon`]: the `redtap` binary with given flags, its admin API on a free port; SIGKILLed on
//!   drop, stopped cleanly with [`Daemon::stop`].
//! - [`RedisCluster`]: a Redis Cluster of that many primaries (and optionally replicas of
//!   each), one [`RedisServer`] a node, slots spread by `redis-cli --cluster create`.
//! - [`Tail`]: a running `redtap tail`, its output lines collected as they come.
//! - [`eventually`]: poll a condition until a deadline instead of sleeping.

#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A free TCP port on 127.0.0.1 (bound then released; the OS does not reuse it at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `cond` every 20 ms until it holds or `within` passes; panic with `what` on timeout.
pub fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(cond(), "timed out after {within:?} waiting for: {what}");
}

/// [`RedisServer::xlen`] over any connection (e.g. with AUTH or TLS): entries of an agent's
/// stream name and of its per-second buckets.
pub fn xlen_on(c: &mut redis::Connection, key: &str) -> redis::RedisResult<u64> {
    let mut keys = vec![key.to_string()];
    if let Some((prefix, agent)) = key.split_once(":events:") {
        let pattern = format!("{prefix}:events:{{{agent}}}:*");
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(c)?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    let mut n = 0;
    for k in keys {
        n += redis::cmd("XLEN").arg(k).query::<u64>(c)?;
    }
    Ok(n)
}

/// A running redis-server.
pub struct RedisServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// Start a redis-server with persistence off on a free port and wait until it answers PING.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`start`](Self::start) with extra `redis-server` arguments (e.g. `--maxmemory 1mb`).
    pub fn start_with(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let child = spawn_redis(port, dir.path(), &extra);
            let mut server = RedisServer {
                child,
                port,
                dir,
                extra: extra.clone(),
            };
            if server.wait_ready() {
                return server;
            }
        }
        panic!("could not start redis-server");
    }

    /// Start with an append-only file fsynced on every write, so that what it acknowledged
    /// survives [`kill9`](Self::kill9) and [`restart`](Self::restart).
    pub fn start_durable() -> Self {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// SIGKILL the server and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start the server again on the same port and data directory.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.child = spawn_redis(self.port, self.dir.path(), &self.extra);
            if self.wait_ready() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until it answers as itself (its process id) and has loaded its data; false if it
    /// exited (port taken) or never answered. With `--requirepass` a NOAUTH answer counts as
    /// ready: the process id cannot be read without the password.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut c) = self.conn() {
                match redis::cmd("INFO")
                    .arg("server")
                    .arg("persistence")
                    .query::<String>(&mut c)
                {
                    // Ours, not another test's server that took the port first (ours then fails
                    // to bind and exits, and is started again on another port); and done loading
                    // its data (as PING would say).
                    Ok(info)
                        if info.contains(&format!("process_id:{}\r", self.child.id()))
                            && info.contains("loading:0\r") =>
                    {
                        return true
                    }
                    Ok(_) => {}
                    // Started with --requirepass: up, and refusing strangers.
                    Err(e) if e.code() == Some("NOAUTH") => return true,
                    Err(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A fresh synchronous connection.
    pub fn conn(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(2))
    }

    /// The keys holding what the writer stored under `key`: for an agent's stream name
    /// `<prefix>:events:<agent>`, its per-second buckets `<prefix>:events:{<agent>}:<second>`
    /// (oldest first) after the name itself; any other key as is.
    pub fn stream_keys(&self, key: &str) -> Vec<String> {
        let mut keys = vec![key.to_string()];
        if let Some((prefix, agent)) = key.split_once(":events:") {
            if !agent.contains(':') && !agent.contains('{') {
                let mut buckets: Vec<(u64, String)> = self
                    .keys(&format!("{prefix}:events:{{{agent}}}:*"))
                    .into_iter()
                    .filter_map(|k| Some((k.rsplit(':').next()?.parse().ok()?, k)))
                    .collect();
                buckets.sort();
                keys.extend(buckets.into_iter().map(|(_, k)| k));
            }
        }
        keys
    }

    /// Entries in a stream (0 if it does not exist); an agent's stream name counts its buckets
    /// too (see [`stream_keys`](Self::stream_keys)).
    pub fn xlen(&self, key: &str) -> u64 {
        let mut c = self.conn().unwrap();
        self.stream_keys(key)
            .iter()
            .map(|k| redis::cmd("XLEN").arg(k).query::<u64>(&mut c).unwrap())
            .sum()
    }

    /// Every entry of a stream as (id, fields), in ID order; an agent's stream name reads its
    /// buckets too. A record reads as the complete field set of earlier versions (`src dst sport
    /// dport ts kind [len]`), whichever version wrote it (decoded by `redtap::layout::stream`);
    /// a packed entry reads as one row per record, each with the entry's ID (decoded by
    /// `redtap::layout::packed`); [`xrange_raw`](Self::xrange_raw) shows the fields as stored.
    pub fn xrange(&self, key: &str) -> Vec<(String, Vec<(String, String)>)> {
        use redtap::layout::stream;
        fn row(d: redtap::layout::Decoded) -> Vec<(String, String)> {
            let mut f = vec![
                ("src".to_string(), d.src.to_string()),
                ("dst".to_string(), d.dst.to_string()),
                ("sport".to_string(), d.sport.to_string()),
                ("dport".to_string(), d.dport.to_string()),
                ("ts".to_string(), d.ts_us.to_string()),
                ("kind".to_string(), d.kind),
            ];
            if let Some(len) = d.len {
                f.push(("len".to_string(), len.to_string()));
            }
            f
        }
        let mut c = self.conn().unwrap();
        let mut out = Vec::new();
        for k in self.stream_keys(key) {
            let v: redis::Value = redis::cmd("XRANGE")
                .arg(&k)
                .arg("-")
                .arg("+")
                .query(&mut c)
                .unwrap();
            let listen = stream::bucket_listen(&v);
            for (id, fields) in stream::entries(&v) {
                if let Some(value) = redtap::layout::packed::value_of(fields) {
                    let ms = stream::parse_stream_id(id).expect("an entry ID").major;
                    let recs = redtap::layout::packed::decode(value, ms).expect("a packed value");
                    out.extend(recs.into_iter().map(|d| (id.to_string(), row(d))));
                    continue;
                }
                let f = match stream::decode(id, fields, listen) {
                    Some(d) => row(d),
                    None => stream::entry_fields(fields)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                };
                out.push((id.to_string(), f));
            }
        }
        let id = |s: &str| -> (u64, u64) {
            let (a, b) = s.split_once('-').unwrap_or((s, "0"));
            (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
        };
        out.sort_by_key(|e| id(&e.0));
        out
    }

    /// Every entry of one stream key as (id, fields) as stored, in ID order.
    pub fn xrange_raw(&self, key: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut c = self.conn().unwrap();
        redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query(&mut c)
            .unwrap()
    }

    /// Keys matching a pattern, by SCAN (which skips keys already expired).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut c = self.conn().unwrap();
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut c)
                .unwrap();
            out.extend(batch);
            if next == 0 {
                return out;
            }
            cursor = next;
        }
    }

    /// `used_memory` from `INFO memory`, in bytes.
    pub fn used_memory(&self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query(&mut self.conn().unwrap())
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("INFO memory has used_memory")
    }

    /// Empty every database (synchronously).
    pub fn flushall(&self) {
        let _: () = redis::cmd("FLUSHALL")
            .arg("SYNC")
            .query(&mut self.conn().unwrap())
            .unwrap();
    }

    /// Send a signal (e.g. "STOP", "CONT", "KILL") to the server process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

fn spawn_redis(port: u16, dir: &std::path::Path, extra: &[String]) -> Child {
    let log = dir.join("redis.log");
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--dir", dir.to_str().unwrap()])
        .args(["--logfile", log.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server not found: install it (apt-get install redis-server)")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- redis-server :{} log ---\n{}", self.port, self.log());
        }
    }
}

/// A Redis Cluster of real `redis-server` processes, each with its own directory (`nodes.conf`
/// kept there, so a node restarted on its port rejoins as itself).
pub struct RedisCluster {
    /// Every node, in the order given to `redis-cli --cluster create`: the primaries first, then
    /// their replicas (if any).
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Start `primaries` nodes with `extra` redis-server arguments, create the cluster and wait
    /// until every node says `cluster_state:ok`.
    pub fn start(primaries: usize, extra: &[&str]) -> Self {
        Self::start_with_replicas(primaries, 0, extra)
    }

    /// The same with `replicas` replicas of each primary.
    pub fn start_with_replicas(primaries: usize, replicas: usize, extra: &[&str]) -> Self {
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
        ];
        args.extend_from_slice(extra);
        let nodes: Vec<RedisServer> = (0..primaries * (1 + replicas))
            .map(|_| RedisServer::start_with(&args))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli not found: install redis-tools");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(Duration::from_secs(30));
        cluster
    }

    /// Wait until every node reports `cluster_state:ok` (and knows every other).
    pub fn wait_ok(&self, within: Duration) {
        eventually(within, "cluster_state:ok on every node", || {
            self.nodes.iter().all(|n| {
                n.conn()
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .is_ok_and(|i| {
                        i.contains("cluster_state:ok")
                            && i.contains(&format!("cluster_known_nodes:{}", self.nodes.len()))
                    })
            })
        });
    }

    /// Move `slots` hash slots (and the keys in them) from node `from` to node `to` with
    /// `redis-cli --cluster reshard`, while the cluster serves.
    pub fn reshard(&self, from: usize, to: usize, slots: u32) {
        let id = |i: usize| -> String {
            let mut c = self.nodes[i].conn().unwrap();
            redis::cmd("CLUSTER").arg("MYID").query(&mut c).unwrap()
        };
        let out = Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{}", self.nodes[from].port),
            ])
            .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "reshard failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The nodes that serve slots as primaries, in one node's view of the cluster (`CLUSTER
    /// NODES` from the first that answers): around a failover two nodes may each call itself
    /// primary for a moment, and counting both would count records twice.
    pub fn primaries(&self) -> Vec<usize> {
        for n in &self.nodes {
            let Ok(view) = n
                .conn()
                .and_then(|mut c| redis::cmd("CLUSTER").arg("NODES").query::<String>(&mut c))
            else {
                continue;
            };
            return view
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(' ').collect();
                    // <id> <ip:port@cport> <flags> <master> … <slots…>: a primary with slots,
                    // not failed.
                    let flags: Vec<&str> = f.get(2)?.split(',').collect();
                    let primary =
                        flags.contains(&"master") && !flags.contains(&"fail") && f.len() > 8;
                    let port: u16 = f
                        .get(1)?
                        .split('@')
                        .next()?
                        .rsplit(':')
                        .next()?
                        .parse()
                        .ok()?;
                    primary.then(|| self.nodes.iter().position(|n| n.port == port))?
                })
                .collect();
        }
        Vec::new()
    }

    /// Whether node `i` is a primary now (`ROLE`).
    pub fn is_primary(&self, i: usize) -> bool {
        self.nodes[i]
            .conn()
            .and_then(|mut c| redis::cmd("ROLE").query::<Vec<redis::Value>>(&mut c))
            .is_ok_and(|r| matches!(r.first(), Some(redis::Value::BulkString(b)) if b == b"master"))
    }

    /// `redis+cluster://127.0.0.1:<p1>,127.0.0.1:<p2>,…`.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// Every record of every stream under `<prefix>:events:` on each primary, decoded, as (node
    /// index, capture µs, source address, source port). A node's own keys only: SCAN runs on
    /// each.
    pub fn records(&self, prefix: &str) -> Vec<(usize, u64, std::net::IpAddr, u16)> {
        let mut out = Vec::new();
        let primaries = self.primaries();
        for (i, n) in self.nodes.iter().enumerate() {
            // A replica's copies are not records of their own.
            if !primaries.contains(&i) {
                continue;
            }
            let mut c = n.conn().unwrap();
            for key in n.keys(&format!("{prefix}:events:*")) {
                for (_, d) in read_bucket(&mut c, &key) {
                    out.push((i, d.ts_us, d.src, d.sport));
                }
            }
        }
        out
    }
}

/// Every redtap record of bucket stream `key` ([`bucket_records`] of its whole `XRANGE`).
pub fn read_bucket(c: &mut redis::Connection, key: &str) -> Vec<(String, redtap::layout::Decoded)> {
    let v: redis::Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(c)
        .unwrap();
    bucket_records(&v)
}

/// Every redtap record in one `XRANGE` answer of a bucket, readable and packed entries alike,
/// with the ID of the entry that holds it (a packed entry holds many). Entries that are not
/// redtap records are left out.
pub fn bucket_records(v: &redis::Value) -> Vec<(String, redtap::layout::Decoded)> {
    use redtap::layout::{packed, stream};
    let listen = stream::bucket_listen(v);
    let mut out = Vec::new();
    for (id, fields) in stream::entries(v) {
        if let Some(value) = packed::value_of(fields) {
            let ms = stream::parse_stream_id(id).expect("an entry ID").major;
            let recs = packed::decode(value, ms).expect("a packed value");
            out.extend(recs.into_iter().map(|d| (id.to_string(), d)));
        } else if let Some(d) = stream::decode(id, fields, listen) {
            out.push((id.to_string(), d));
        }
    }
    out
}

/// The sum of every series of metric `name` in the exposition text `m`.
fn metric_sum_in(m: &str, name: &str) -> f64 {
    m.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A running `redtap run`.
pub struct Daemon {
    child: Option<Child>,
    /// Where it captures.
    pub listen: SocketAddr,
    /// Its admin API, `http://127.0.0.1:<port>`.
    pub admin: String,
    log: PathBuf,
    /// The working directory; the state directory is `dir/state` (`STATE_DIRECTORY`).
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

/// Lines printed by a running `redtap tail` (stdout and stderr), collected by a thread each;
/// killed and reaped on drop.
pub struct Tail {
    /// The `redtap tail` process.
    pub child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Tail {
    /// Start `redtap tail` with `args`.
    pub fn start(args: &[&str]) -> Tail {
        use std::io::BufRead;
        let mut child = Command::new(redtap_bin())
            .arg("tail")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let l = lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines() {
                    l.lock().unwrap().push(line.unwrap());
                }
            });
        }
        Tail { child, lines }
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The lines printed so far that are JSON (records of `--format json`).
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect()
    }

    /// Whether some line printed so far contains `needle`.
    pub fn has_line(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of the built `redtap` binary.
pub fn redtap_bin() -> &'static str {
    // Cargo tells integration tests and benches where the binary is, not examples (which
    // include this file only for its load generators).
    match option_env!("CARGO_BIN_EXE_redtap") {
        Some(path) => path,
        None => panic!("redtap_bin() is for tests and benches"),
    }
}

impl Daemon {
    /// Start `redtap run` with `args` (without --listen/--admin, which are chosen here) and wait
    /// until its admin API answers.
    pub fn start(args: &[&str]) -> Self {
        Self::start_on(&format!("127.0.0.1:{}", free_port()), args)
    }

    /// `redtap run --capture connections --agent t` in front of `backends` (name, server,
    /// weight), plus `extra` flags: the daemon most tests need.
    pub fn connections(backends: &[(&str, &RedisServer, u32)], extra: &[&str]) -> Self {
        let specs: Vec<String> = backends
            .iter()
            .map(|(name, r, w)| format!("{name}={}@{w}", r.url()))
            .collect();
        let mut args = vec!["--capture", "connections", "--agent", "t"];
        args.extend_from_slice(extra);
        for spec in &specs {
            args.extend(["--backend", spec.as_str()]);
        }
        Self::start(&args)
    }

    /// Like [`start`](Self::start), capturing on `listen`.
    pub fn start_on(listen: &str, args: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut d = Self::start_in(&dir, listen, &format!("127.0.0.1:{}", free_port()), args);
        d._tmp = Some(tmp);
        d
    }

    /// Start in working directory `dir` (kept by the caller, e.g. across a restart), with the
    /// admin API on `admin`.
    pub fn start_in(dir: &std::path::Path, listen: &str, admin: &str, args: &[&str]) -> Self {
        Self::start_wrapped(&[], dir, listen, admin, args)
    }

    /// Like [`start_in`](Self::start_in), run through a wrapper command such as
    /// `["prlimit", "--nofile=64", "--"]`.
    pub fn start_wrapped(
        wrapper: &[&str],
        dir: &std::path::Path,
        listen: &str,
        admin: &str,
        args: &[&str],
    ) -> Self {
        let log = dir.join(format!("redtap-{}.log", now_nanos()));
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(redtap_bin());
                c
            }
            None => Command::new(redtap_bin()),
        };
        let child = cmd
            .arg("run")
            .args(["--listen", listen])
            .args(["--admin", admin])
            .args(args)
            .env("REDTAP_LOG", "info")
            // The default state file's directory, as systemd's StateDirectory= sets it: kept
            // across a restart in the same `dir`, never the tester's home.
            .env("STATE_DIRECTORY", dir.join("state"))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child: Some(child),
            listen: listen.parse().unwrap(),
            admin: format!("http://{admin}"),
            log,
            dir: dir.to_path_buf(),
            _tmp: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("redtap exited early ({status}):\n{}", d.log());
            }
            if http_get(&format!("{}/healthz", d.admin)).is_ok() {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "redtap did not start:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /v1/backends` as JSON.
    pub fn backends(&self) -> serde_json::Value {
        let body = http_get(&format!("{}/v1/backends", self.admin)).unwrap().1;
        serde_json::from_str(&body).unwrap()
    }

    /// `PUT /v1/weights` with a JSON body: (status, answer).
    pub fn put_weights(&self, body: &str) -> (u16, String) {
        http(
            "PUT",
            &format!("{}/v1/weights", self.admin),
            Some(body.as_bytes()),
        )
        .unwrap()
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> String {
        http_get(&format!("{}/metrics", self.admin)).unwrap().1
    }

    /// The value of one metric line, e.g. `redtap_records_captured_total`.
    pub fn metric(&self, name_and_labels: &str) -> f64 {
        let m = self.metrics();
        m.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name_and_labels} not found in:\n{m}"))
    }

    /// The sum of every line of metric `name`, whatever its labels.
    pub fn metric_sum(&self, name: &str) -> f64 {
        metric_sum_in(&self.metrics(), name)
    }

    /// The same, `None` if the scrape itself failed (e.g. refused at the admin API's connection
    /// cap).
    pub fn try_metric_sum(&self, name: &str) -> Option<f64> {
        let (_, m) = http_get(&format!("{}/metrics", self.admin)).ok()?;
        Some(metric_sum_in(&m, name))
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// CPU time (user + system) the daemon has used, in clock ticks (from /proc).
    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.pid())
    }

    /// Resident set size of the daemon, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// The counts of the daemon's summary line at exit.
    pub fn summary(&self) -> redtap::Summary {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("redtap stopped"))
            .unwrap_or_else(|| panic!("no summary in log:\n{log}"));
        let field = |k: &str| -> u64 {
            let at = line.find(&format!("{k}=")).unwrap() + k.len() + 1;
            line[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        redtap::Summary {
            captured: field("captured"),
            written: field("written"),
            dropped_expired: field("dropped_expired"),
            dropped_shutdown: field("dropped_shutdown"),
            dropped_overflow: field("dropped_overflow"),
            dropped_queue_full: field("dropped_queue_full"),
            dropped_unknown: field("dropped_unknown"),
            kernel_drops: field("kernel_drops"),
            frames_malformed: field("frames_malformed"),
        }
    }

    /// Send SIGTERM and wait for exit, at most `within`.
    pub fn stop(&mut self, within: Duration) -> ExitStatus {
        unsafe_free_kill(self.pid(), "TERM");
        self.wait(within)
    }

    /// Wait for exit (after a signal sent with [`signal`](Self::signal)), at most `within`.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("redtap did not exit within {within:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send a signal such as "HUP".
    pub fn signal(&self, sig: &str) {
        unsafe_free_kill(self.child.as_ref().expect("running").id(), sig);
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- redtap log ---\n{}", self.log());
        }
    }
}

/// `kill -SIG pid` through the kill(1) command (keeps the tests free of unsafe code).
fn unsafe_free_kill(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// A minimal blocking HTTP/1.1 client for the admin API: (status, body).
pub fn http(method: &str, url: &str, body: Option<&[u8]>) -> std::io::Result<(u16, String)> {
    use std::io::Write;
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or(b"");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP answer: {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((status, dechunk(&text, body)))
}

fn dechunk(head: &str, body: &str) -> String {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((len, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

/// `GET url`.
pub fn http_get(url: &str) -> std::io::Result<(u16, String)> {
    http("GET", url, None)
}

/// Open one TCP connection to `addr` from `src` (port chosen by the kernel).
pub fn connect_from(
    src: std::net::IpAddr,
    addr: SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    Ok(sock.into())
}

/// Open and close `n` TCP connections to `addr`, `concurrency` at a time. Returns how many
/// connected. Bounded: each connect has a 5 s timeout.
///
/// For an IPv4 loopback target each thread connects from its own source address in
/// 127.0.0.0/8 (127.0.1.x): the client closes first, and thousands of TIME_WAIT sockets on one
/// source address make every new connect() hunt for a free port (we measured 1 ms a connect).
pub fn connect_many(addr: SocketAddr, n: usize, concurrency: usize) -> usize {
    let per = n.div_ceil(concurrency);
    let handles: Vec<_> = (0..concurrency)
        .map(|t| {
            let count = per.min(n.saturating_sub(t * per));
            std::thread::spawn(move || {
                let src: std::net::IpAddr = match addr {
                    SocketAddr::V4(a) if a.ip().is_loopback() => {
                        std::net::Ipv4Addr::new(127, 0, 1, (t % 250) as u8 + 1).into()
                    }
                    SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
                };
                let mut ok = 0;
                for _ in 0..count {
                    if connect_from(src, addr).is_ok() {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

/// Open and close `total` connections to `addr` in a background thread, `per_tick` every
/// `tick` (bounded in count; each connect has a 5 s timeout). Joins to the number connected.
pub fn paced_connections(
    addr: SocketAddr,
    total: usize,
    per_tick: usize,
    tick: Duration,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut done = 0;
        let mut ok = 0;
        let mut next = Instant::now();
        while done < total {
            let n = per_tick.min(total - done);
            ok += connect_many(addr, n, n.min(4));
            done += n;
            next += tick;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        ok
    })
}

/// CPU time (user + system) process `pid` has used, in clock ticks (from /proc).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Open and close connections to `addr` from `threads` threads for `dur` (each connect has a
/// 5 s timeout), each thread from its own loopback source address `127.0.<net>.<thread+1>`;
/// returns how many connected. Use a fresh `net` per run: the client closes first, and a source
/// address full of TIME_WAIT sockets makes every connect() hunt for a free port. With `pace`, at
/// most that many connections a second in all.
pub fn load_connections(
    addr: SocketAddr,
    net: u8,
    threads: usize,
    dur: Duration,
    pace: Option<f64>,
) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    let done = std::sync::Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + dur;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let done = done.clone();
            std::thread::spawn(move || {
                let src = std::net::Ipv4Addr::new(127, 0, net, 1 + t as u8).into();
                let gap = pace.map(|p| Duration::from_secs_f64(threads as f64 / p));
                let mut next = Instant::now();
                while Instant::now() < stop {
                    if connect_from(src, addr).is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(gap) = gap {
                        next += gap;
                        if let Some(w) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(w);
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    done.load(Ordering::Relaxed)
}
