//! Packets capture end to end: real packets on loopback (hping3, real TCP clients, frames
//! injected with a packet socket), the real `redtap` binary, real redis-server processes.
//!
//! These need CAP_NET_RAW (CI runs as root); without it each test says so and returns.
//! Traffic goes only to 127.0.0.1 and ::1. Every load is bounded in count and time.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, free_port, Daemon, RedisServer};

const STREAM: &str = "redtap:events:t";

/// Whether this process may open packet sockets; prints why a test is skipped if not.
fn privileged(test: &str) -> bool {
    let uid = Command::new("id").arg("-u").output().map(|o| o.stdout);
    let root = uid.is_ok_and(|u| String::from_utf8_lossy(&u).trim() == "0");
    if !root {
        eprintln!("SKIPPED {test}: needs root or CAP_NET_RAW (CI runs as root)");
    }
    root
}

fn backend(name: &str, r: &RedisServer, w: u32) -> String {
    format!("{name}={}@{w}", r.url())
}

/// One stored segment record's fields by name.
type Fields = BTreeMap<String, String>;

fn records(r: &RedisServer) -> Vec<Fields> {
    r.xrange(STREAM)
        .into_iter()
        .map(|(_, f)| f.into_iter().collect())
        .collect()
}

/// TCP flags from their letters, in redtap's (`PA`) or tcpdump's (`P.`) spelling.
fn flags_byte(s: &str) -> u8 {
    s.chars()
        .map(|c| match c {
            'F' => 0x01,
            'S' => 0x02,
            'R' => 0x04,
            'P' => 0x08,
            'A' | '.' => 0x10,
            'U' => 0x20,
            'E' => 0x40,
            'W' => 0x80,
            _ => panic!("unknown flag letter {c:?} in {s:?}"),
        })
        .fold(0, |a, b| a | b)
}

/// (sport, flags, payload length) of each record, sorted: a multiset.
fn segments(recs: &[Fields]) -> Vec<(u16, u8, u32)> {
    let mut v: Vec<_> = recs
        .iter()
        .map(|f| {
            (
                f["sport"].parse().unwrap(),
                flags_byte(&f["kind"]),
                f["len"].parse().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// A client that connects, sends `data`, closes its side and reads until the server closes.
fn client_session(addr: SocketAddr, data: &[u8]) -> u16 {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let port = s.local_addr().unwrap().port();
    s.write_all(data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    port
}

/// Send `n` SYNs to 127.0.0.1:`port` with hping3, paced at most 20,000 a second; bounded
/// at 60 s. Panics unless hping3 reports all `n` sent.
fn hping3_syns(port: u16, n: u64) {
    // hping3 counts its source port up from a base: keep the range clear of the port itself,
    // or the SYN from port P to port P and the RST answering it are two segments to P.
    let base = if u64::from(port) >= 1024 + n {
        1024
    } else {
        port + 1
    };
    assert!(u64::from(base) + n <= 65536, "no room for {n} source ports");
    let out = Command::new("timeout")
        .args(["60", "hping3", "-q", "-S", "-p", &port.to_string()])
        .args(["-s", &base.to_string()])
        .args(["-c", &n.to_string(), "-i", "u50", "127.0.0.1"])
        .output()
        .expect("hping3 not found: apt-get install hping3");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        report.contains(&format!("{n} packets transmitted")),
        "hping3 did not send {n}: {report}"
    );
}

#[test]
fn syns_from_hping3_to_a_closed_port_are_stored_exactly_once_by_weight() {
    if !privileged("hping3 SYNs") {
        return;
    }
    syns_stored_exactly_once_by_weight(&[]);
}

#[test]
fn with_two_capture_threads_each_syn_is_stored_once_by_weight_and_both_threads_read() {
    if !privileged("two capture threads") {
        return;
    }
    let mut d = syns_stored_exactly_once_by_weight(&["--capture-threads", "2"]);
    let threads = thread_names(d.pid());
    for name in ["redtap-cap-0", "redtap-cap-1"] {
        assert!(threads.iter().any(|t| t == name), "{name} in {threads:?}");
    }
    d.stop(Duration::from_secs(30));
    // hping3's SYNs come from 30,000 source ports: each thread's share of the flows, by hash,
    // is about half; a thread that read nothing would mean no fanout.
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("packets capture stopped"))
        .unwrap_or_else(|| {
            panic!(
                "no summary line:
{log}"
            )
        });
    let per_thread: Vec<u64> = line
        .split("frames_per_thread=[")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .unwrap_or_else(|| panic!("no frames_per_thread in {line}"))
        .split(", ")
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(per_thread.len(), 2, "{line}");
    assert_eq!(per_thread.iter().sum::<u64>(), 30_000, "{line}");
    assert!(per_thread.iter().all(|&n| n > 5_000), "{line}");
}

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

/// 30,000 SYNs from hping3 at a closed port, to `redtap run` with `extra` flags in front of A
/// (weight 30) and B (70): each is stored once, and the shares are exact.
fn syns_stored_exactly_once_by_weight(extra: &[&str]) -> Daemon {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let (ba, bb) = (backend("A", &a, 30), backend("B", &b, 70));
    // Nobody accepts on this port: each SYN gets an RST from the kernel and nothing more is
    // sent to the port, so records must equal SYNs sent.
    let port = free_port();
    let mut args = vec![
        "--serve",
        "none",
        "--agent",
        "t",
        "--backend",
        &ba,
        "--backend",
        &bb,
    ];
    args.extend_from_slice(extra);
    let d = Daemon::start_on(&format!("127.0.0.1:{port}"), &args);
    let n: u64 = 30_000;
    hping3_syns(port, n);
    eventually(Duration::from_secs(60), "every SYN stored", || {
        a.xlen(STREAM) + b.xlen(STREAM) >= n
    });
    let (ra, rb) = (records(&a), records(&b));
    let mut per_sport: BTreeMap<&str, Vec<&Fields>> = BTreeMap::new();
    for f in ra.iter().chain(&rb) {
        per_sport.entry(f["sport"].as_str()).or_default().push(f);
    }
    let odd: Vec<_> = per_sport.values().filter(|v| v.len() > 1).take(5).collect();
    assert_eq!(
        ra.len() as u64 + rb.len() as u64,
        n,
        "exactly one record per SYN; sports seen more than once: {odd:?}",
    );
    // Exact weighting: N·w/W ± 1.
    let (wa, wb) = (n * 30 / 100, n * 70 / 100);
    assert!(
        ra.len() as u64 + 1 >= wa && ra.len() as u64 <= wa + 1,
        "A holds {}",
        ra.len()
    );
    assert!(
        rb.len() as u64 + 1 >= wb && rb.len() as u64 <= wb + 1,
        "B holds {}",
        rb.len()
    );
    for f in ra.iter().chain(&rb) {
        assert_eq!(f["kind"], "S");
        assert_eq!(f["len"], "0");
        assert_eq!(f["dport"], port.to_string());
        assert_eq!(f["src"], "127.0.0.1");
    }
    assert_eq!(d.metric("redtap_kernel_drops_total{cause=\"ring\"}"), 0.0);
    assert_eq!(d.metric("redtap_frames_malformed_total"), 0.0);
    d
}

#[test]
fn capture_threads_started_during_a_flood_store_no_segment_twice() {
    if !privileged("fanout at start") {
        return;
    }
    // Each member of a fanout group sees every packet until it has joined: one started naively
    // in the middle of traffic stores some packets twice. hping3 sends from a new source port
    // each time, so a source port stored twice is a packet stored twice.
    let r = RedisServer::start();
    let port = free_port();
    let flood = Command::new("timeout")
        .args(["60", "hping3", "-q", "-S", "-p", &port.to_string()])
        .args(["-s", "1024", "-c", "40000", "-i", "u50", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("hping3 not found: apt-get install hping3");
    let d = Daemon::start_on(
        &format!("127.0.0.1:{port}"),
        &[
            "--serve",
            "none",
            "--capture-threads",
            "2",
            "--agent",
            "t",
            "--backend",
            &backend("A", &r, 1),
        ],
    );
    // Long enough for the daemon's start to fall inside the flood: stop it once the daemon
    // answers, plus a little more traffic after.
    std::thread::sleep(Duration::from_millis(300));
    let mut flood = flood;
    let _ = Command::new("kill")
        .args(["-INT", &flood.id().to_string()])
        .status();
    flood.wait().unwrap();
    // Then a last burst from other ports: once it is all stored, the flood's records are too.
    let out = Command::new("timeout")
        .args(["60", "hping3", "-q", "-S", "-p", &port.to_string()])
        .args(["-s", "50000", "-c", "1000", "-i", "u50", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    eventually(Duration::from_secs(30), "the last burst stored", || {
        records(&r)
            .iter()
            .filter(|f| f["sport"].parse::<u16>().is_ok_and(|p| p >= 50_000))
            .count()
            >= 1000
    });
    let recs = records(&r);
    let mut seen = std::collections::HashSet::new();
    let twice: Vec<&String> = recs
        .iter()
        .map(|f| &f["sport"])
        .filter(|p| !seen.insert(*p))
        .take(10)
        .collect();
    assert!(twice.is_empty(), "source ports stored twice: {twice:?}");
    assert!(recs.len() > 1000, "{} records", recs.len());
    drop(d);
}

#[test]
fn two_daemons_with_two_capture_threads_each_see_every_syn() {
    if !privileged("fanout groups per process") {
        return;
    }
    // Each process's fanout group is its own: two redtaps tapping one port do not split the
    // packets between them, each stores all of them.
    let (r1, r2) = (RedisServer::start(), RedisServer::start());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let start = |r: &RedisServer| {
        Daemon::start_on(
            &listen,
            &[
                "--serve",
                "none",
                "--capture-threads",
                "2",
                "--agent",
                "t",
                "--backend",
                &backend("A", r, 1),
            ],
        )
    };
    let (_d1, _d2) = (start(&r1), start(&r2));
    let n = 2_000;
    hping3_syns(port, n);
    for r in [&r1, &r2] {
        eventually(Duration::from_secs(30), "every SYN stored by each", || {
            r.xlen(STREAM) >= n
        });
        let sports: std::collections::HashSet<String> =
            records(r).into_iter().map(|f| f["sport"].clone()).collect();
        assert_eq!((r.xlen(STREAM), sports.len() as u64), (n, n));
    }
}

#[test]
fn capture_threads_out_of_range_exit_64_and_name_the_range() {
    for bad in ["0", "65"] {
        let out = Command::new(common::redtap_bin())
            .args(["run", "--listen", "127.0.0.1:9", "--admin", "off"])
            .args(["--backend", "A=redis://127.0.0.1:1@1"])
            .args(["--capture-threads", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bad}: {stderr}");
        assert!(
            stderr.contains("--capture-threads") && stderr.contains("1 to 64"),
            "{stderr}"
        );
    }
}

#[test]
fn every_interface_captures_both_families_once_each() {
    if !privileged("[::] on the any device") {
        return;
    }
    let r = RedisServer::start();
    let port = free_port();
    // The `any` device sees loopback traffic both leaving and arriving: stored once.
    let d = Daemon::start_on(
        &format!("[::]:{port}"),
        &[
            "--serve",
            "none",
            "--agent",
            "t",
            "--backend",
            &backend("A", &r, 1),
        ],
    );
    let n = 2_000;
    hping3_syns(port, n);
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let ipv6 = TcpListener::bind("[::1]:0").is_ok();
    if ipv6 {
        for _ in 0..3 {
            // Refused: one SYN each, answered by an RST to the client.
            assert!(TcpStream::connect_timeout(&v6, Duration::from_secs(5)).is_err());
        }
    }
    let want = n + if ipv6 { 3 } else { 0 };
    // Another test running at the same time may have drawn the same free port and sent its own
    // traffic to it: count ours, hping3's SYNs from 127.0.0.1 (their source ports lie below the
    // ephemeral range), anything from the port itself (which would be a bug), and the refused
    // connects from ::1.
    let ours = || -> Vec<Fields> {
        records(&r)
            .into_iter()
            .filter(|f| {
                let sport: u16 = f["sport"].parse().unwrap_or(0);
                (f["src"] == "127.0.0.1" && (sport < 32768 || sport == port)) || f["src"] == "::1"
            })
            .collect()
    };
    eventually(Duration::from_secs(30), "every SYN stored", || {
        ours().len() as u64 >= want
    });
    let recs = ours();
    assert_eq!(recs.len() as u64, want, "each SYN once");
    let sports: std::collections::HashSet<_> = recs
        .iter()
        .filter(|f| f["src"] == "127.0.0.1")
        .map(|f| f["sport"].clone())
        .collect();
    assert_eq!(sports.len() as u64, n, "each of hping3's source ports once");
    assert!(recs.iter().all(|f| f["kind"] == "S"));
    let from_v6 = recs.iter().filter(|f| f["src"] == "::1").count();
    assert_eq!(from_v6, if ipv6 { 3 } else { 0 });
    assert!(d.log().contains("device=any"), "{}", d.log());
}

/// A tcpdump writing every packet as it comes (`-U`) to a file, stopped on drop.
struct Tcpdump {
    child: std::process::Child,
    file: tempfile::NamedTempFile,
    log: tempfile::NamedTempFile,
}

impl Tcpdump {
    fn start(device: &str, filter: &str) -> Tcpdump {
        let file = tempfile::NamedTempFile::new().unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("tcpdump")
            // A big buffer and a short snap length: with its defaults (2 MiB, a 64 KiB slot a
            // frame on loopback in immediate mode) tcpdump itself drops frames in bursts.
            .args(["-i", device, "-nn", "-U", "--immediate-mode", "-Z", "root"])
            .args(["-s", "256", "-B", "65536", "-w"])
            .arg(file.path())
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("tcpdump not found: apt-get install tcpdump");
        let t = Tcpdump { child, file, log };
        eventually(Duration::from_secs(10), "tcpdump listening", || {
            std::fs::read_to_string(t.log.path()).is_ok_and(|l| l.contains("listening on"))
        });
        t
    }

    /// (sport, flags, payload length) of every packet captured so far, sorted.
    fn segments(&self) -> Vec<(u16, u8, u32)> {
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(self.file.path())
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let mut v: Vec<_> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                // 03:37:29.519674 IP 127.0.0.1.45678 > 127.0.0.1.9000: Flags [P.], seq …, length 5
                let src = l.split_whitespace().nth(2).unwrap();
                let sport = src.rsplit('.').next().unwrap().parse().unwrap();
                let flags = l
                    .split("Flags [")
                    .nth(1)
                    .unwrap()
                    .split(']')
                    .next()
                    .unwrap();
                let after = l.split(", length ").nth(1).unwrap();
                let digits = after
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(after.len());
                let len = after[..digits].parse().unwrap();
                (sport, flags_byte(flags), len)
            })
            .collect();
        v.sort();
        v
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn connect_send_close_records_match_tcpdump() {
    if !privileged("tcpdump comparison") {
        return;
    }
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let (ba, bb) = (backend("A", &a, 1), backend("B", &b, 1));
    let d = Daemon::start(&["--agent", "t", "--backend", &ba, "--backend", &bb]);
    let filter = format!("tcp dst port {} and dst host 127.0.0.1", d.listen.port());
    let dump = Tcpdump::start("lo", &filter);
    for i in 0..40usize {
        // Some sessions send more than one segment's worth.
        let data = vec![b'x'; 1 + i * 3000];
        client_session(d.listen, &data);
    }
    let stored = || segments(&[records(&a), records(&b)].concat());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (seen, got) = (dump.segments(), stored());
        if !seen.is_empty() && seen == got {
            break;
        }
        if Instant::now() > deadline {
            let only = |x: &[(u16, u8, u32)], y: &[(u16, u8, u32)]| {
                let mut y = y.to_vec();
                x.iter()
                    .filter(|s| match y.iter().position(|t| t == *s) {
                        Some(i) => {
                            y.remove(i);
                            false
                        }
                        None => true,
                    })
                    .copied()
                    .collect::<Vec<_>>()
            };
            panic!(
                "redtap and tcpdump differ after 30 s: only tcpdump saw {:?}; only redtap \
                 stored {:?}; tcpdump log: {}; redtap metrics:\n{}",
                only(&seen, &got),
                only(&got, &seen),
                std::fs::read_to_string(dump.log.path()).unwrap_or_default(),
                d.metrics()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = dump.segments();
    // Every session's SYN, data and FIN are there.
    let count = |f: u8| seen.iter().filter(|s| s.1 & f != 0).count();
    assert_eq!(count(0x02), 40, "one SYN per session");
    assert!(count(0x01) >= 40, "a FIN per session");
    assert!(seen.iter().any(|s| s.2 > 0), "data segments");
}

#[test]
fn ipv6_loopback_segments_are_recorded() {
    if !privileged("IPv6") {
        return;
    }
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED IPv6: no IPv6 loopback here");
        return;
    }
    let r = RedisServer::start();
    let port = free_port();
    let d = Daemon::start_on(
        &format!("[::1]:{port}"),
        &["--agent", "t", "--backend", &backend("A", &r, 1)],
    );
    let sports: Vec<u16> = (0..5).map(|_| client_session(d.listen, b"hi v6")).collect();
    eventually(Duration::from_secs(20), "a FIN from each client", || {
        let recs = records(&r);
        sports.iter().all(|p| {
            recs.iter()
                .any(|f| f["sport"] == p.to_string() && flags_byte(&f["kind"]) & 0x01 != 0)
        })
    });
    let recs = records(&r);
    for p in &sports {
        let mine: Vec<_> = recs
            .iter()
            .filter(|f| f["sport"] == p.to_string())
            .collect();
        assert!(mine.iter().any(|f| f["kind"] == "S"), "SYN of {p}");
        assert!(
            mine.iter().any(|f| f["kind"] == "PA" && f["len"] == "5"),
            "data of {p}"
        );
    }
    for f in &recs {
        assert_eq!((f["src"].as_str(), f["dst"].as_str()), ("::1", "::1"));
        assert_eq!(f["dport"], port.to_string());
    }
}

/// A server run by the test: accepts on `l` and reads each connection to its end.
fn serve(l: TcpListener) {
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
}

#[test]
fn passive_tap_beside_another_server_records_only_its_port() {
    if !privileged("--serve none") {
        return;
    }
    let tapped = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let (tapped_addr, other_addr) = (tapped.local_addr().unwrap(), other.local_addr().unwrap());
    serve(tapped);
    serve(other);
    let r = RedisServer::start();
    // redtap must not bind: the port is the test server's (binding would fail to start).
    let d = Daemon::start_on(
        &tapped_addr.to_string(),
        &[
            "--serve",
            "none",
            "--agent",
            "t",
            "--backend",
            &backend("A", &r, 1),
        ],
    );
    // Traffic to the other port first, then to the tapped one: once the tapped port's last
    // FIN is stored, anything captured from the other port would be stored too.
    for _ in 0..5 {
        client_session(other_addr, b"not for redtap");
    }
    let sports: Vec<u16> = (0..5)
        .map(|_| client_session(tapped_addr, b"tapped"))
        .collect();
    eventually(
        Duration::from_secs(20),
        "every tapped session's FIN",
        || {
            let recs = records(&r);
            sports.iter().all(|p| {
                recs.iter()
                    .any(|f| f["sport"] == p.to_string() && flags_byte(&f["kind"]) & 0x01 != 0)
            })
        },
    );
    let recs = records(&r);
    assert!(recs
        .iter()
        .all(|f| f["dport"] == tapped_addr.port().to_string()));
    assert!(recs
        .iter()
        .all(|f| sports.contains(&f["sport"].parse().unwrap())));
    assert!(d.log().contains("packets capture running"));
}

/// An Ethernet frame as loopback carries it: IPv4 127.0.0.1 → 127.0.0.1, TCP to `dport`.
fn frame(dport: u16, sport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([0; 6], [0; 6])
        .ipv4([127, 0, 0, 1], [127, 0, 0, 1], 64)
        .tcp(sport, dport, 1, 1024)
        .syn()
        .write(&mut f, &[])
        .unwrap();
    f
}

#[test]
fn malformed_frames_are_counted_and_capture_goes_on() {
    if !privileged("malformed frames") {
        return;
    }
    let r = RedisServer::start();
    let d = Daemon::start(&["--agent", "t", "--backend", &backend("A", &r, 1)]);
    let port = d.listen.port();
    // Each passes the kernel filter (TCP to the port, to 127.0.0.1) and is broken after that.
    let mut bad = Vec::new();
    // IP total length shorter than its IP + TCP headers.
    let mut f = frame(port, 1001);
    f[14 + 2..14 + 4].copy_from_slice(&30u16.to_be_bytes());
    bad.push(f);
    // TCP data offset 2 (less than its 20-byte minimum).
    let mut f = frame(port, 1002);
    f[14 + 20 + 12] = 0x20;
    bad.push(f);
    // Cut 8 bytes into the TCP header, IP length to match.
    let mut f = frame(port, 1003);
    f.truncate(14 + 20 + 8);
    f[14 + 2..14 + 4].copy_from_slice(&28u16.to_be_bytes());
    bad.push(f);
    // IP length beyond the frame.
    let mut f = frame(port, 1004);
    f[14 + 2..14 + 4].copy_from_slice(&1400u16.to_be_bytes());
    bad.push(f);

    let mut inject = pcap::Capture::from_device("lo").unwrap().open().unwrap();
    for f in &bad {
        inject.sendpacket(&f[..]).unwrap();
    }
    eventually(
        Duration::from_secs(10),
        "4 malformed frames counted",
        || d.metric("redtap_frames_malformed_total") == 4.0,
    );
    // A well-formed frame injected the same way, and a real session, are stored.
    inject.sendpacket(&frame(port, 1005)[..]).unwrap();
    let sport = client_session(d.listen, b"still here");
    eventually(Duration::from_secs(10), "good traffic stored", || {
        let recs = records(&r);
        recs.iter()
            .any(|f| f["sport"] == "1005" && f["kind"] == "S")
            && recs
                .iter()
                .any(|f| f["sport"] == sport.to_string() && f["kind"] == "PA")
    });
    let recs = records(&r);
    assert!(
        !recs
            .iter()
            .any(|f| ["1001", "1002", "1003", "1004"].contains(&f["sport"].as_str())),
        "no record from a malformed frame"
    );
}

#[test]
fn without_cap_net_raw_exits_64_and_says_how_to_grant_it() {
    if !privileged("no CAP_NET_RAW") {
        return;
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    // Root without CAP_NET_RAW / CAP_NET_ADMIN in its bounding set.
    let out = Command::new("setpriv")
        .args(["--bounding-set", "-net_raw,-net_admin", "--"])
        .arg(common::redtap_bin())
        .args(["run", "--listen", &listen, "--admin", &admin])
        .args(["--backend", "A=redis://127.0.0.1:1@1"])
        .output()
        .expect("setpriv (util-linux) not found");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for needle in [
        "setcap cap_net_raw,cap_net_admin+ep",
        "--capture connections",
        "root",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    // Nothing was bound.
    TcpListener::bind(&listen).unwrap();
    TcpListener::bind(&admin).unwrap();

    // A filter that does not compile is a usage error too.
    let out = Command::new(common::redtap_bin())
        .args(["run", "--listen", &listen, "--admin", &admin])
        .args([
            "--backend",
            "A=redis://127.0.0.1:1@1",
            "--filter",
            "port ((",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--filter"), "{stderr}");
    TcpListener::bind(&listen).unwrap();
}

#[test]
fn every_segment_is_stored_or_counted_as_lost() {
    if !privileged("loss accounting") {
        return;
    }
    let r = RedisServer::start();
    let port = free_port();
    // A small ring and a tiny queue, so a burst may overflow either: whatever happens, each
    // SYN is either stored or counted in exactly one loss metric.
    let d = Daemon::start_on(
        &format!("127.0.0.1:{port}"),
        &[
            "--serve",
            "none",
            "--ring-size",
            "1MiB",
            "--queue-capacity",
            "64",
            "--batch-size",
            "16",
            "--agent",
            "t",
            "--backend",
            &backend("A", &r, 1),
        ],
    );
    let n = 20_000;
    let out = Command::new("timeout")
        .args(["60", "hping3", "-q", "-S", "-p", &port.to_string()])
        .args(["-s", "1024", "-c", &n.to_string(), "-i", "u1", "127.0.0.1"])
        .output()
        .expect("hping3 not found: apt-get install hping3");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        report.contains(&format!("{n} packets transmitted")),
        "{report}"
    );
    let accounted = || {
        r.xlen(STREAM) as f64
            + d.metric("redtap_records_dropped_total{reason=\"queue_full\"}")
            + d.metric("redtap_kernel_drops_total{cause=\"ring\"}")
    };
    eventually(
        Duration::from_secs(30),
        "stored + queue_full + kernel drops = SYNs sent",
        || accounted() == n as f64,
    );
    eprintln!(
        "{n} SYNs: stored {}, queue_full {}, kernel ring drops {}",
        r.xlen(STREAM),
        d.metric("redtap_records_dropped_total{reason=\"queue_full\"}"),
        d.metric("redtap_kernel_drops_total{cause=\"ring\"}")
    );
}
