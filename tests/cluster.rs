//! Redis Cluster backends (`redis+cluster://`): a real three-primary cluster started by the test,
//! the real daemon in connections mode, real connections. Every record is identified by its
//! (capture time, source address, source port) and counted across every primary and the single
//! server beside the cluster.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use common::{
    eventually, free_port, paced_connections, redtap_bin, Daemon, RedisCluster, RedisServer, Tail,
};

const PREFIX: &str = "redtap";

/// One stored record's identity.
type Id = (u64, IpAddr, u16);

/// `redtap run` in connections mode in front of the cluster (weight `wc`) and `single`
/// (weight `ws`), plus `extra` flags.
fn daemon(
    cluster: &RedisCluster,
    wc: u32,
    single: &RedisServer,
    ws: u32,
    extra: &[&str],
) -> Daemon {
    let c = format!("C={}@{wc}", cluster.url());
    let s = format!("S={}@{ws}", single.url());
    let mut args = vec!["--capture", "connections", "--agent", "t"];
    args.extend_from_slice(extra);
    args.extend(["--backend", &c, "--backend", &s]);
    Daemon::start(&args)
}

/// The records on the single server.
fn single_records(s: &RedisServer) -> Vec<Id> {
    s.xrange("redtap:events:t")
        .into_iter()
        .map(|(_, f)| {
            let get = |k: &str| f.iter().find(|(n, _)| n == k).unwrap().1.clone();
            (
                get("ts").parse().unwrap(),
                get("src").parse().unwrap(),
                get("sport").parse().unwrap(),
            )
        })
        .collect()
}

/// How many times each identity is stored, over the cluster and the single server.
fn counts(cluster: &RedisCluster, single: &RedisServer) -> (HashMap<Id, usize>, Vec<usize>, usize) {
    let mut seen = HashMap::new();
    let mut per_node = vec![0; cluster.nodes.len()];
    for (node, ts, src, sport) in cluster.records(PREFIX) {
        per_node[node] += 1;
        *seen.entry((ts, src, sport)).or_insert(0) += 1;
    }
    let on_single = single_records(single);
    for id in &on_single {
        *seen.entry(*id).or_insert(0) += 1;
    }
    (seen, per_node, on_single.len())
}

/// Wait until each of the `n` records is stored or counted as dropped, then check that none is
/// stored twice and none is missing uncounted: (stored per primary, stored on the single server,
/// dropped).
fn settled_once_each(
    cluster: &RedisCluster,
    single: &RedisServer,
    d: &Daemon,
    n: usize,
) -> (Vec<usize>, usize, usize) {
    eventually(
        Duration::from_secs(60),
        "every record stored or dropped",
        || {
            let stored = counts(cluster, single).0.len();
            stored + d.metric_sum("redtap_records_dropped_total") as usize >= n
        },
    );
    let (seen, per_node, on_single) = counts(cluster, single);
    let dropped = d.metric_sum("redtap_records_dropped_total") as usize;
    assert!(seen.values().all(|&c| c == 1), "no record stored twice");
    assert_eq!(
        seen.len() + dropped,
        n,
        "every record stored or counted as dropped"
    );
    (per_node, on_single, dropped)
}

/// Whether some capture second's records are stored on more than one primary: pipelines, not
/// seconds, rotate over the stripes.
fn spread_within_a_second(cluster: &RedisCluster) -> bool {
    let mut nodes: HashMap<u64, std::collections::HashSet<usize>> = HashMap::new();
    for (node, ts, _, _) in cluster.records(PREFIX) {
        nodes.entry(ts / 1_000_000).or_default().insert(node);
    }
    nodes.values().any(|n| n.len() > 1)
}

/// The keys-schema records on one server. Each key is its own record (no hash tag): identity
/// from its JSON value.
fn key_records(r: &RedisServer) -> Vec<Id> {
    let mut c = r.conn().unwrap();
    r.keys("redtap:ev:*")
        .iter()
        .map(|k| {
            let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
            let j: serde_json::Value = serde_json::from_str(&v).unwrap();
            (
                j["ts"].as_u64().unwrap(),
                j["src"].as_str().unwrap().parse().unwrap(),
                j["sport"].as_u64().unwrap() as u16,
            )
        })
        .collect()
}

/// `redtap query --format json --since 10m <args>`, which must succeed: its rows, and what it
/// said on stderr.
fn query_json(args: &[&str]) -> (Vec<serde_json::Value>, String) {
    let mut all = vec!["query", "--format", "json", "--since", "10m"];
    all.extend_from_slice(args);
    let (code, out, err) = redtap(&all);
    assert_eq!(code, 0, "{err}");
    let rows = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (rows, err)
}

fn redtap(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(redtap_bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn records_spread_over_every_primary_once_each_with_exact_shares_and_query_reads_them_all() {
    let cluster = RedisCluster::start(3, &[]);
    let single = RedisServer::start();
    let d = daemon(&cluster, 60, &single, 40, &[]);

    // Paced over about six seconds, many pipelines a second: a cluster backend's pipelines
    // rotate over the primaries.
    let n = 3000;
    let sent = paced_connections(d.listen, n, 50, Duration::from_millis(100))
        .join()
        .unwrap();
    assert_eq!(sent, n);
    eventually(Duration::from_secs(30), "every record stored", || {
        counts(&cluster, &single).0.len() >= n
    });
    let (seen, per_node, on_single) = counts(&cluster, &single);
    assert_eq!(seen.len(), n, "every record stored");
    assert!(seen.values().all(|&c| c == 1), "no record stored twice");
    let on_cluster: usize = per_node.iter().sum();
    assert!(
        (1799..=1801).contains(&on_cluster),
        "cluster holds {on_cluster}"
    );
    assert!(
        (1199..=1201).contains(&on_single),
        "single holds {on_single}"
    );
    assert!(
        per_node.iter().all(|&k| k > 0),
        "every primary holds a share: {per_node:?}"
    );
    assert_eq!(d.metric_sum("redtap_records_dropped_total"), 0.0);
    assert!(
        spread_within_a_second(&cluster),
        "one second's records went to several primaries (a stripe per pipeline)"
    );

    // Reading back over the cluster backend: SCAN on each primary, every record found.
    let c = format!("C={}@1", cluster.url());
    let s = format!("S={}@1", single.url());
    let (rows, err) = query_json(&["--backend", &c, "--backend", &s]);
    assert_eq!(rows.len(), n, "query returns every record once:\n{err}");
    // The agent filter finds its cluster stripes too.
    let (rows, err) = query_json(&["--agent", "t", "--backend", &c]);
    assert_eq!(rows.len(), on_cluster, "{err}");

    // `redtap check` reaches the cluster and names each primary.
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(redtap_bin())
        .current_dir(dir.path())
        .args(["check", "--capture", "connections", "--agent", "t2"])
        .args(["--listen", &listen, "--admin", &admin, "--backend", &c])
        .output()
        .unwrap();
    let (code, out, err) = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cluster of 3 primaries"), "{out}");
    for node in &cluster.nodes {
        assert!(out.contains(&format!("127.0.0.1:{}", node.port)), "{out}");
    }

    // One node named as a single server is a usage error that says how to name a cluster.
    let one = format!("A=redis://127.0.0.1:{}@1", cluster.nodes[0].port);
    let out = Command::new(redtap_bin())
        .current_dir(dir.path())
        .args(["check", "--capture", "connections", "--agent", "t2"])
        .args(["--listen", &listen, "--admin", &admin, "--backend", &one])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(
        text.contains("is a node of a Redis Cluster") && text.contains("redis+cluster://"),
        "{text}"
    );
}

#[test]
fn a_primary_restarted_mid_load_loses_and_doubles_nothing() {
    // Durable nodes: what a primary acknowledged before it was killed is still there after.
    let cluster = RedisCluster::start(3, &["--appendonly", "yes", "--appendfsync", "always"]);
    let single = RedisServer::start();
    let d = daemon(&cluster, 50, &single, 50, &["--on-backend-down", "hold"]);

    let n = 3000;
    let load = paced_connections(d.listen, n, 50, Duration::from_millis(100));
    let mut cluster = cluster;
    eventually(Duration::from_secs(20), "records on the cluster", || {
        !cluster.records(PREFIX).is_empty()
    });
    cluster.nodes[1].kill9();
    std::thread::sleep(Duration::from_secs(2)); // an outage while connections keep coming
    cluster.nodes[1].restart();
    cluster.wait_ok(Duration::from_secs(30));
    assert_eq!(load.join().unwrap(), n);

    let (per_node, on_single, dropped) = settled_once_each(&cluster, &single, &d, n);
    if dropped == 0 {
        let on_cluster: usize = per_node.iter().sum();
        assert!(
            (1499..=1501).contains(&on_cluster),
            "cluster holds {on_cluster}"
        );
        assert!(
            (1499..=1501).contains(&on_single),
            "single holds {on_single}"
        );
    }
    // The outage was felt: the cluster backend's writes failed while the primary was gone.
    assert!(
        d.metric("redtap_write_errors_total{backend=\"C\"}") > 0.0,
        "{}",
        d.log()
    );
    eprintln!("stored per primary {per_node:?}, single {on_single}, dropped {dropped}");
}

/// Connections made once a replica has taken over, so that the new primary surely takes writes.
const AFTER_FAILOVER: usize = 600;

/// What a failover mid-load left: the daemon, the records made, the replica now a primary,
/// and when (µs) it was seen to be one.
struct FailedOver {
    d: Daemon,
    n: usize,
    promoted: usize,
    promoted_at: u64,
}

impl FailedOver {
    /// Records captured after the promotion and stored on the new primary.
    fn on_new_primary(&self, cluster: &RedisCluster) -> usize {
        cluster
            .records(PREFIX)
            .iter()
            .filter(|r| r.0 == self.promoted && r.1 > self.promoted_at)
            .count()
    }
}

/// A daemon writing to `cluster` (50) and `single` (50), holding records for a down backend,
/// under a paced load; once records reach the cluster, `failover` makes a replica take over
/// and returns its index. Then more connections, so that the new primary takes writes.
fn failover_mid_load(
    cluster: &mut RedisCluster,
    single: &RedisServer,
    failover: impl FnOnce(&mut RedisCluster) -> usize,
) -> FailedOver {
    let d = daemon(cluster, 50, single, 50, &["--on-backend-down", "hold"]);
    let n = 3000;
    let load = paced_connections(d.listen, n, 50, Duration::from_millis(100));
    eventually(Duration::from_secs(20), "records on the cluster", || {
        !cluster.records(PREFIX).is_empty()
    });
    let promoted = failover(cluster);
    let promoted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    // (The first load may be over by then: a manual failover that times out is asked again.)
    let more = paced_connections(d.listen, AFTER_FAILOVER, 50, Duration::from_millis(100));
    assert_eq!(load.join().unwrap(), n);
    assert_eq!(more.join().unwrap(), AFTER_FAILOVER);
    FailedOver {
        d,
        n: n + AFTER_FAILOVER,
        promoted,
        promoted_at,
    }
}

#[test]
fn a_manual_failover_mid_load_is_followed_without_loss_or_doubles() {
    // Three primaries, a replica each; a replica takes over its primary's slots while records
    // keep coming (`CLUSTER FAILOVER`: the replica catches up first, so Redis loses nothing).
    let mut cluster = RedisCluster::start_with_replicas(3, 1, &[]);
    let single = RedisServer::start();
    let f = failover_mid_load(&mut cluster, &single, |cluster| {
        let replica = (3..6).find(|&i| !cluster.is_primary(i) && cluster.nodes[i].conn().is_ok());
        let replica = replica.expect("a replica");
        let mut c = cluster.nodes[replica].conn().unwrap();
        eventually(Duration::from_secs(20), "the replica in sync", || {
            redis::cmd("INFO")
                .arg("replication")
                .query::<String>(&mut c)
                .is_ok_and(|i| i.contains("master_link_status:up"))
        });
        // A manual failover gives up (after 5 s) if the primary does not answer in time:
        // asked again until it takes.
        for _ in 0..4 {
            let _: String = redis::cmd("CLUSTER").arg("FAILOVER").query(&mut c).unwrap();
            let until = std::time::Instant::now() + Duration::from_secs(8);
            while std::time::Instant::now() < until {
                if cluster.is_primary(replica) {
                    return replica;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("the replica never became a primary");
    });

    let (per_node, on_single, dropped) = settled_once_each(&cluster, &single, &f.d, f.n);
    assert_eq!(dropped, 0, "a failover loses nothing");
    let on_cluster: usize = per_node.iter().sum();
    assert!(
        on_cluster.abs_diff(f.n / 2) <= 1 && on_single.abs_diff(f.n / 2) <= 1,
        "cluster {on_cluster}, single {on_single}"
    );
    assert!(
        f.on_new_primary(&cluster) > 0,
        "the new primary took writes: {per_node:?}"
    );
    eprintln!(
        "per primary {per_node:?}; redirected or failed writes: {}",
        f.d.metric("redtap_write_errors_total{backend=\"C\"}")
    );
}

#[test]
fn a_primary_killed_is_failed_over_and_writes_resume_on_its_replica_without_doubles() {
    // Three primaries with a replica each, a short node timeout: the cluster itself promotes
    // the replica of a primary killed mid-load.
    let mut cluster = RedisCluster::start_with_replicas(
        3,
        1,
        &[
            "--cluster-node-timeout",
            "1000",
            // A replica takes over however long ago it last heard from its primary (the
            // default refuses after ten node timeouts, which a loaded test machine can reach).
            "--cluster-replica-validity-factor",
            "0",
        ],
    );
    let single = RedisServer::start();
    let f = failover_mid_load(&mut cluster, &single, |cluster| {
        let victim = (0..3).find(|&i| cluster.is_primary(i)).expect("a primary");
        let replicas: Vec<usize> = (3..6).filter(|&i| !cluster.is_primary(i)).collect();
        cluster.nodes[victim].kill9();
        let mut promoted = None;
        eventually(Duration::from_secs(30), "a replica promoted", || {
            promoted = replicas.iter().copied().find(|&i| cluster.is_primary(i));
            promoted.is_some()
        });
        promoted.expect("promoted")
    });
    let d = &f.d;

    // redtap settles every record: stored, or counted as dropped.
    let settled = || {
        d.metric_sum("redtap_records_written_total") + d.metric_sum("redtap_records_dropped_total")
    };
    eventually(Duration::from_secs(60), "every record settled", || {
        settled() as usize >= f.n
    });
    let written = d.metric_sum("redtap_records_written_total") as usize;
    let (seen, per_node, on_single) = counts(&cluster, &single);
    assert!(seen.values().all(|&c| c == 1), "no record stored twice");
    // What the dead primary acknowledged but had not yet replicated is Redis's loss (its
    // replication is asynchronous), never a record written twice or counted twice.
    assert!(
        seen.len() <= written,
        "{} stored, {written} written",
        seen.len()
    );
    assert!(
        f.on_new_primary(&cluster) > 0,
        "writes resumed on the promoted replica: {per_node:?}"
    );
    assert!(
        d.metric("redtap_write_errors_total{backend=\"C\"}") > 0.0,
        "the outage was felt"
    );
    eprintln!(
        "stored per node {per_node:?}, single {on_single}; written {written}, stored {}, \
         lost by the failover {}",
        seen.len(),
        written - seen.len()
    );
}

#[test]
fn slots_resharded_mid_load_are_followed_without_loss_or_doubles() {
    let cluster = RedisCluster::start(3, &[]);
    let single = RedisServer::start();
    let d = daemon(&cluster, 50, &single, 50, &["--on-backend-down", "hold"]);
    let n = 3000;
    let load = paced_connections(d.listen, n, 50, Duration::from_millis(100));
    eventually(Duration::from_secs(20), "records on the cluster", || {
        !cluster.records(PREFIX).is_empty()
    });
    // Move most of node 0's slots (and the keys in them) to node 1 while records keep coming:
    // the writer meets MOVED and ASK answers and must follow them.
    cluster.reshard(0, 1, 4000);
    assert_eq!(load.join().unwrap(), n);

    let (per_node, on_single, dropped) = settled_once_each(&cluster, &single, &d, n);
    assert_eq!(dropped, 0, "a reshard loses nothing");
    assert!(
        (1499..=1501).contains(&on_single),
        "single holds {on_single}"
    );
    eprintln!(
        "stored per primary {per_node:?}, single {on_single}; redirected or failed writes: {}",
        d.metric("redtap_write_errors_total{backend=\"C\"}")
    );
}

#[test]
fn keys_schema_records_spread_over_every_primary_once_each() {
    let cluster = RedisCluster::start(3, &[]);
    let single = RedisServer::start();
    let d = daemon(&cluster, 60, &single, 40, &["--schema", "keys"]);
    let n = 1000;
    assert_eq!(common::connect_many(d.listen, n, 8), n);

    let all = || -> (HashMap<Id, usize>, Vec<usize>) {
        let mut seen = HashMap::new();
        let mut per = Vec::new();
        for r in cluster.nodes.iter().chain([&single]) {
            let ids = key_records(r);
            per.push(ids.len());
            for id in ids {
                *seen.entry(id).or_insert(0) += 1;
            }
        }
        (seen, per)
    };
    eventually(Duration::from_secs(30), "every record stored", || {
        all().0.len() >= n
    });
    let (seen, per) = all();
    assert_eq!(seen.len(), n);
    assert!(seen.values().all(|&c| c == 1), "no record stored twice");
    let on_cluster: usize = per[..3].iter().sum();
    assert!(
        (599..=601).contains(&on_cluster),
        "cluster holds {on_cluster}: {per:?}"
    );
    assert!(
        per[..3].iter().all(|&k| k > 0),
        "every primary holds a share: {per:?}"
    );
}

#[test]
fn packed_entries_spread_over_every_primary_and_query_returns_them_in_order() {
    let cluster = RedisCluster::start(3, &[]);
    let single = RedisServer::start();
    let d = daemon(&cluster, 60, &single, 40, &["--schema", "packed"]);
    let n = 2000;
    let sent = paced_connections(d.listen, n, 50, Duration::from_millis(100))
        .join()
        .unwrap();
    assert_eq!(sent, n);
    let (per_node, on_single, dropped) = settled_once_each(&cluster, &single, &d, n);
    assert_eq!(dropped, 0);
    let on_cluster: usize = per_node.iter().sum();
    assert!(
        (1199..=1201).contains(&on_cluster) && (799..=801).contains(&on_single),
        "cluster {on_cluster}, single {on_single}"
    );
    assert!(
        per_node.iter().all(|&k| k > 0),
        "every primary holds a share: {per_node:?}"
    );
    assert!(spread_within_a_second(&cluster));

    // One second of the agent is several streams (one per stripe): read back whole, in capture
    // order.
    let c = format!("C={}@1", cluster.url());
    let (rows, err) = query_json(&["--schema", "packed", "--backend", &c]);
    let ts: Vec<u64> = rows.iter().map(|r| r["ts_us"].as_u64().unwrap()).collect();
    assert_eq!(ts.len(), on_cluster, "{err}");
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "rows in capture order");
}

/// `redtap run` in connections mode with the cluster as its only backend, plus `extra` flags.
fn cluster_daemon(cluster: &RedisCluster, extra: &[&str]) -> Daemon {
    let c = format!("C={}@1", cluster.url());
    let mut args = vec!["--capture", "connections", "--agent", "t"];
    args.extend_from_slice(extra);
    args.extend(["--backend", &c]);
    Daemon::start(&args)
}

/// `redtap tail --format json` of the cluster backend, from a minute ago: the daemon is newer,
/// so every record it captures is to be shown, however soon the tail takes its first look.
fn tail_of(cluster: &RedisCluster) -> Tail {
    let c = format!("C={}@1", cluster.url());
    Tail::start(&["--backend", &c, "--format", "json", "--since", "1m"])
}

/// How many times the tail printed each record.
fn printed(tail: &Tail) -> HashMap<Id, usize> {
    let mut seen = HashMap::new();
    for r in tail.records() {
        let id = (
            r["ts_us"].as_u64().unwrap(),
            r["src"].as_str().unwrap().parse().unwrap(),
            r["sport"].as_u64().unwrap() as u16,
        );
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

/// Wait until the tail has printed every record in `stored`, give a late double a moment to
/// show up, then check that it printed each exactly once and nothing else.
fn printed_once_each(tail: &Tail, stored: &HashMap<Id, usize>) {
    eventually(
        Duration::from_secs(30),
        "every stored record printed",
        || {
            let p = printed(tail);
            stored.keys().all(|id| p.contains_key(id))
        },
    );
    // Not a timing assert: a few of the tail's poll rounds, for a double to arrive if one would.
    std::thread::sleep(Duration::from_secs(1));
    let p = printed(tail);
    let twice: Vec<_> = p.iter().filter(|(_, &c)| c > 1).collect();
    assert!(twice.is_empty(), "records printed twice: {twice:?}");
    let unknown: Vec<_> = p.keys().filter(|id| !stored.contains_key(id)).collect();
    assert!(unknown.is_empty(), "printed but not stored: {unknown:?}");
    assert_eq!(p.len(), stored.len());
}

#[test]
fn tail_over_a_cluster_shows_every_new_record_once() {
    let cluster = RedisCluster::start(3, &[]);
    let d = cluster_daemon(&cluster, &[]);
    let tail = tail_of(&cluster);

    // Paced over six seconds: records keep arriving while the tail follows them.
    let n = 1200;
    let sent = paced_connections(d.listen, n, 20, Duration::from_millis(100))
        .join()
        .unwrap();
    assert_eq!(sent, n);
    eventually(Duration::from_secs(30), "every record stored", || {
        cluster.records(PREFIX).len() >= n
    });
    let mut stored = HashMap::new();
    let mut per_node = vec![0; cluster.nodes.len()];
    for (node, ts, src, sport) in cluster.records(PREFIX) {
        per_node[node] += 1;
        *stored.entry((ts, src, sport)).or_insert(0) += 1;
    }
    assert_eq!(stored.len(), n);
    assert!(
        per_node.iter().filter(|&&k| k > 0).count() >= 2,
        "records on more than one primary: {per_node:?}"
    );
    printed_once_each(&tail, &stored);
    assert!(
        !tail.has_line("backend C"),
        "no failure reported: {:?}",
        tail.lines()
    );
}

#[test]
fn tail_over_a_cluster_reports_a_killed_primary_and_goes_on_once_each_after_its_restart() {
    // Durable nodes: what a primary acknowledged before it was killed is still there after.
    let mut cluster = RedisCluster::start(3, &["--appendonly", "yes", "--appendfsync", "always"]);
    let d = cluster_daemon(&cluster, &["--on-backend-down", "hold"]);
    let tail = tail_of(&cluster);

    let n = 1600;
    let load = paced_connections(d.listen, n, 20, Duration::from_millis(100));
    eventually(Duration::from_secs(20), "the tail prints records", || {
        !tail.records().is_empty()
    });
    cluster.nodes[1].kill9();
    eventually(
        Duration::from_secs(20),
        "the tail reports the backend down",
        || tail.has_line("backend C"),
    );
    cluster.nodes[1].restart();
    cluster.wait_ok(Duration::from_secs(30));
    eventually(
        Duration::from_secs(30),
        "the tail says the backend answers again",
        || tail.has_line("backend C answers again"),
    );
    assert_eq!(load.join().unwrap(), n);

    eventually(
        Duration::from_secs(60),
        "every record stored or dropped",
        || {
            cluster.records(PREFIX).len() + d.metric_sum("redtap_records_dropped_total") as usize
                >= n
        },
    );
    let mut stored = HashMap::new();
    for (_, ts, src, sport) in cluster.records(PREFIX) {
        *stored.entry((ts, src, sport)).or_insert(0) += 1;
    }
    assert!(stored.values().all(|&c| c == 1), "no record stored twice");
    printed_once_each(&tail, &stored);
    eprintln!(
        "stored {}, dropped {}",
        stored.len(),
        d.metric_sum("redtap_records_dropped_total")
    );
}

#[test]
fn keys_schema_over_a_cluster_is_read_by_query_and_tail_once_each() {
    let cluster = RedisCluster::start(3, &[]);
    let d = cluster_daemon(&cluster, &["--schema", "keys"]);
    let tail = tail_of(&cluster);
    let n = 300;
    assert_eq!(common::connect_many(d.listen, n, 4), n);
    let stored = || -> HashMap<Id, usize> {
        let mut seen = HashMap::new();
        for r in &cluster.nodes {
            for id in key_records(r) {
                *seen.entry(id).or_insert(0) += 1;
            }
        }
        seen
    };
    eventually(Duration::from_secs(30), "every record stored", || {
        stored().len() >= n
    });
    let stored = stored();
    assert_eq!(stored.len(), n);

    // The keys spread over every slot: one MGET of them would be refused (CROSSSLOT).
    let c = format!("C={}@1", cluster.url());
    let (rows, err) = query_json(&["--backend", &c]);
    let mut queried: HashMap<Id, usize> = HashMap::new();
    for r in rows {
        let id = (
            r["ts_us"].as_u64().unwrap(),
            r["src"].as_str().unwrap().parse().unwrap(),
            r["sport"].as_u64().unwrap() as u16,
        );
        *queried.entry(id).or_insert(0) += 1;
    }
    assert_eq!(queried, stored, "query returns each record once:\n{err}");

    printed_once_each(&tail, &stored);
}

#[test]
fn tail_over_a_cluster_follows_a_reshard_without_loss_or_doubles() {
    let cluster = RedisCluster::start(3, &[]);
    let d = cluster_daemon(&cluster, &["--on-backend-down", "hold"]);
    let tail = tail_of(&cluster);
    let n = 1600;
    let load = paced_connections(d.listen, n, 20, Duration::from_millis(100));
    eventually(Duration::from_secs(20), "the tail prints records", || {
        !tail.records().is_empty()
    });
    // Move most of node 0's slots, with the buckets in them, to node 1 while records keep
    // coming and the tail reads: its XREADs meet MOVED and ASK answers.
    cluster.reshard(0, 1, 4000);
    assert_eq!(load.join().unwrap(), n);

    eventually(Duration::from_secs(60), "every record stored", || {
        cluster.records(PREFIX).len() >= n
    });
    assert_eq!(d.metric_sum("redtap_records_dropped_total"), 0.0);
    let mut stored = HashMap::new();
    for (_, ts, src, sport) in cluster.records(PREFIX) {
        *stored.entry((ts, src, sport)).or_insert(0) += 1;
    }
    assert_eq!(stored.len(), n);
    assert!(stored.values().all(|&c| c == 1), "no record stored twice");
    printed_once_each(&tail, &stored);
    // A reshard is not an outage: the tail follows the redirects without reporting one.
    let downs: Vec<String> = tail
        .lines()
        .into_iter()
        .filter(|l| l.contains("backend C ("))
        .collect();
    assert!(downs.is_empty(), "the tail reported an outage: {downs:?}");
}
