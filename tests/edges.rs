//! Edges that could defeat a clean shutdown or widen what is recorded: SIGHUP, an abused admin
//! API, `--filter`, a capture whose interface goes down, a non-loopback listen address, and the
//! frames left in the ring at SIGTERM. The real `redtap` binary and real redis-server processes.
//!
//! The packet tests need root (CI runs as root); the interface tests also make their own
//! network namespace joined to this one by a veth pair, with addresses from 198.18.0.0/15 (the
//! range set aside for such tests), and say so and return where that is not possible. Traffic
//! goes only to loopback and to those namespaces. Every load is bounded in count and time.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{eventually, free_port, http_get, Daemon, RedisServer};

const STREAM: &str = "redtap:events:t";

fn backend(name: &str, r: &RedisServer, w: u32) -> String {
    format!("{name}={}@{w}", r.url())
}

/// Whether this process is root; prints why a test is skipped if not.
fn privileged(test: &str) -> bool {
    let uid = Command::new("id").arg("-u").output().map(|o| o.stdout);
    let root = uid.is_ok_and(|u| String::from_utf8_lossy(&u).trim() == "0");
    if !root {
        eprintln!("SKIPPED {test}: needs root (CI runs as root)");
    }
    root
}

/// Every stored record's fields by name.
fn records(r: &RedisServer) -> Vec<std::collections::BTreeMap<String, String>> {
    r.xrange(STREAM)
        .into_iter()
        .map(|(_, f)| f.into_iter().collect())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// SIGHUP

#[test]
fn sighup_without_a_config_file_is_logged_and_the_daemon_keeps_running() {
    let r = RedisServer::start();
    let mut d = Daemon::connections(&[("A", &r, 1)], &[]);
    d.signal("HUP");
    eventually(Duration::from_secs(5), "the SIGHUP logged", || {
        d.log().contains("nothing to reload")
    });
    // Still serving, still recording.
    assert_eq!(http_get(&format!("{}/healthz", d.admin)).unwrap().0, 200);
    let n = common::connect_many(d.listen, 20, 2);
    assert_eq!(n, 20);
    eventually(Duration::from_secs(10), "20 records stored", || {
        r.xlen(STREAM) == 20
    });
    d.signal("HUP");
    eventually(Duration::from_secs(5), "the second SIGHUP logged", || {
        d.log().matches("nothing to reload").count() == 2
    });
    let status = d.stop(Duration::from_secs(15));
    assert!(status.success(), "{status}:\n{}", d.log());
    let s = d.summary();
    assert_eq!((s.captured, s.written), (20, 20));
}

// ---------------------------------------------------------------------------------------------
// Admin API under abuse

/// Open a connection to the admin API and send `bytes`, keeping it open.
fn open_admin(d: &Daemon, bytes: &[u8]) -> TcpStream {
    let addr = d.admin.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    s
}

/// Whether the server closed `s` (EOF or reset) within `within`, reading whatever it sent.
fn closed_within(s: &mut TcpStream, within: Duration) -> (bool, String) {
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let closed = match s.read_to_end(&mut got) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    (closed, String::from_utf8_lossy(&got).into_owned())
}

#[test]
fn a_slowloris_client_is_cut_off_and_does_not_delay_shutdown() {
    let r = RedisServer::start();
    let mut d = Daemon::connections(&[("A", &r, 1)], &["--grace", "2s"]);
    // Headers started and never finished, and a connection that never sends anything.
    let mut slow: Vec<TcpStream> = (0..3)
        .map(|_| open_admin(&d, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"))
        .collect();
    let mut idle = open_admin(&d, b"");
    // Meanwhile, normal requests are answered.
    for _ in 0..5 {
        assert_eq!(http_get(&format!("{}/healthz", d.admin)).unwrap().0, 200);
    }
    assert!(d.metrics().contains("redtap_capture_up 1"));
    // The header-read timeout (5 s) closes both kinds.
    for s in slow.iter_mut().chain([&mut idle]) {
        let (closed, _) = closed_within(s, Duration::from_secs(20));
        assert!(closed, "a client that never finishes its headers is closed");
    }

    // New slowloris clients, and SIGTERM right away: the daemon exits within the grace period
    // (plus start-up slack), not when the clients give up.
    let _slow: Vec<TcpStream> = (0..3)
        .map(|_| open_admin(&d, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"))
        .collect();
    let _idle: Vec<TcpStream> = (0..3).map(|_| open_admin(&d, b"")).collect();
    let status = d.stop(Duration::from_secs(4));
    assert!(status.success(), "{status}:\n{}", d.log());
    d.summary();
}

#[test]
fn connections_past_the_admin_cap_are_refused_and_shutdown_is_not_delayed() {
    let r = RedisServer::start();
    let mut d = Daemon::connections(&[("A", &r, 1)], &["--grace", "2s"]);
    let cap = redtap::admin::MAX_CONNECTIONS;
    // Fill the cap with idle connections; wait until the server holds each one (a normal
    // request would then be refused), then open 10 more.
    let mut held: Vec<TcpStream> = (0..cap).map(|_| open_admin(&d, b"")).collect();
    eventually(Duration::from_secs(10), "the cap reached", || {
        http_get(&format!("{}/healthz", d.admin)).is_ok_and(|(code, _)| code == 503)
    });
    let mut extra: Vec<TcpStream> = (0..10).map(|_| open_admin(&d, b"")).collect();
    for s in &mut extra {
        let (closed, said) = closed_within(s, Duration::from_secs(3));
        assert!(
            closed,
            "a connection past the cap is closed at once, not queued"
        );
        assert!(
            said.is_empty() || said.starts_with("HTTP/1.1 503"),
            "{said}"
        );
    }
    // Counted; and with one held connection closed, a new one is served again.
    drop(held.pop());
    eventually(
        Duration::from_secs(10),
        "served again below the cap",
        || http_get(&format!("{}/healthz", d.admin)).is_ok_and(|(code, _)| code == 200),
    );
    // (Polled: the slot the health check just used may not be free yet, and a scrape that
    // lands on the cap is itself refused.)
    eventually(Duration::from_secs(5), "the refusals counted", || {
        d.try_metric_sum("redtap_admin_connections_refused_total")
            .is_some_and(|n| n >= 10.0)
    });
    held.push(open_admin(&d, b""));
    // Held connections do not delay shutdown.
    let status = d.stop(Duration::from_secs(4));
    assert!(status.success(), "{status}:\n{}", d.log());
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// --filter

#[test]
fn a_filter_that_does_not_stand_alone_is_refused_with_64() {
    if !privileged("--filter check") {
        return;
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    for bad in ["tcp) or (tcp", "tcp dst port 1) or (udp"] {
        // Bounded: a daemon that accepted the filter would run until killed.
        let out = Command::new("timeout")
            .args(["10", common::redtap_bin()])
            .args(["run", "--listen", &listen, "--admin", &admin])
            .args(["--backend", "A=redis://127.0.0.1:1@1", "--filter", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bad}: {stderr}");
        assert!(
            stderr.contains("--filter") && stderr.contains("on its own"),
            "{stderr}"
        );
        // Nothing was bound.
        TcpListener::bind(&listen).unwrap();
        TcpListener::bind(&admin).unwrap();
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

/// Connect, send, close, wait for the server to close: returns the client port.
fn session(addr: SocketAddr, data: &[u8]) -> u16 {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let port = s.local_addr().unwrap().port();
    s.write_all(data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = s.read_to_end(&mut Vec::new());
    port
}

#[test]
fn a_broad_filter_cannot_record_traffic_to_another_port() {
    if !privileged("broad --filter") {
        return;
    }
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_addr = other.local_addr().unwrap();
    serve(other);
    let r = RedisServer::start();
    // Valid on its own and wider than the built-in condition: it can only narrow it.
    let d = Daemon::start(&[
        "--filter",
        &format!("tcp or udp or port {}", other_addr.port()),
        "--agent",
        "t",
        "--backend",
        &backend("A", &r, 1),
    ]);
    for _ in 0..5 {
        session(other_addr, b"not for redtap");
    }
    let mine = session(d.listen, b"for redtap");
    eventually(Duration::from_secs(20), "the tapped session's FIN", || {
        records(&r)
            .iter()
            .any(|f| f["sport"] == mine.to_string() && f["kind"].contains('F'))
    });
    let recs = records(&r);
    assert!(!recs.is_empty());
    for f in &recs {
        assert_eq!(f["dport"], d.listen.port().to_string(), "{f:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// IPv6 extension headers

/// An Ethernet frame as loopback carries it: IPv6 ::1 → ::1, a SYN from `sport` to `dport`,
/// behind one 8-byte extension header of type `ext` (0 hop-by-hop, 60 destination options).
fn ipv6_frame_with_extension(ext: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2([0; 6], [0; 6])
        .ipv6(
            std::net::Ipv6Addr::LOCALHOST.octets(),
            std::net::Ipv6Addr::LOCALHOST.octets(),
            64,
        )
        .tcp(sport, dport, 1, 1024)
        .syn()
        .write(&mut f, &[])
        .unwrap();
    assert_eq!(u16::from_be_bytes([f[12], f[13]]), 0x86dd);
    let ip = 14;
    // Next header: the extension, which points at TCP (6); length 0 = 8 bytes; a PadN option.
    let next = f[ip + 6];
    assert_eq!(next, 6);
    f[ip + 6] = ext;
    let payload = u16::from_be_bytes([f[ip + 4], f[ip + 5]]) + 8;
    f[ip + 4..ip + 6].copy_from_slice(&payload.to_be_bytes());
    let header = [6u8, 0, 1, 4, 0, 0, 0, 0];
    f.splice(ip + 40..ip + 40, header);
    f
}

#[test]
fn ipv6_segments_behind_extension_headers_are_recorded_for_the_port_only() {
    if !privileged("IPv6 extension headers") {
        return;
    }
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED IPv6 extension headers: no IPv6 loopback here");
        return;
    }
    let r = RedisServer::start();
    let port = free_port();
    let other = free_port();
    let d = Daemon::start_on(
        &format!("[::1]:{port}"),
        &[
            "--serve",
            "none",
            "--agent",
            "t",
            "--backend",
            &backend("A", &r, 1),
        ],
    );
    let mut inject = pcap::Capture::from_device("lo").unwrap().open().unwrap();
    // To another port first: once the last one to the port is stored, these would be too.
    inject
        .sendpacket(&ipv6_frame_with_extension(0, 2003, other)[..])
        .unwrap();
    inject
        .sendpacket(&ipv6_frame_with_extension(60, 2004, other)[..])
        .unwrap();
    inject
        .sendpacket(&ipv6_frame_with_extension(0, 2001, port)[..])
        .unwrap();
    inject
        .sendpacket(&ipv6_frame_with_extension(60, 2002, port)[..])
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "both SYNs to the port stored",
        || {
            let recs = records(&r);
            ["2001", "2002"]
                .iter()
                .all(|p| recs.iter().any(|f| f["sport"] == *p && f["kind"] == "S"))
        },
    );
    eventually(Duration::from_secs(10), "the other port's counted", || {
        d.metric("redtap_frames_not_to_listen_total") == 2.0
    });
    let recs = records(&r);
    assert_eq!(recs.len(), 2, "{recs:?}");
    for f in &recs {
        assert_eq!(f["dport"], port.to_string());
        assert_eq!((f["src"].as_str(), f["dst"].as_str()), ("::1", "::1"));
    }
    assert_eq!(d.metric("redtap_frames_malformed_total"), 0.0);
}

// ---------------------------------------------------------------------------------------------
// Frames in the ring at SIGTERM

#[test]
fn frames_already_in_the_ring_at_sigterm_are_recorded_or_counted() {
    if !privileged("ring drain") {
        return;
    }
    let r = RedisServer::start();
    let port = free_port();
    let mut d = Daemon::start_on(
        &format!("127.0.0.1:{port}"),
        &[
            "--serve",
            "none",
            "--ring-size",
            "32MiB",
            "--agent",
            "t",
            "--backend",
            &backend("A", &r, 1),
        ],
    );
    // Stopped, redtap reads nothing: the SYNs wait in its ring. SIGTERM is then delivered
    // with the ring full of frames.
    d.signal("STOP");
    let n: u64 = 5_000;
    let out = Command::new("timeout")
        .args(["60", "hping3", "-q", "-S", "-p", &port.to_string()])
        .args(["-s", "1024", "-c", &n.to_string(), "-i", "u50", "127.0.0.1"])
        .output();
    // Let it run again whatever happened, or the guard's SIGKILL is the only way out.
    d.signal("TERM");
    d.signal("CONT");
    let out = out.expect("hping3 not found: apt-get install hping3");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        report.contains(&format!("{n} packets transmitted")),
        "{report}"
    );
    let status = d.wait(Duration::from_secs(20));
    assert!(status.success(), "{status}:\n{}", d.log());
    let s = d.summary();
    assert_eq!(
        s.captured + s.kernel_drops,
        n,
        "each SYN in the ring recorded or counted: {s:?}"
    );
    assert_eq!(
        s.written + s.dropped_shutdown + s.dropped_queue_full + s.dropped_overflow,
        s.captured,
        "{s:?}"
    );
    assert_eq!(r.xlen(STREAM), s.written);
}

// ---------------------------------------------------------------------------------------------
// A network namespace of the test's own

/// A network namespace joined to this one by a veth pair: this side 198.18.X.(4k+1)/30, the
/// namespace's side .(4k+2). Deleted (with its pairs) on drop.
struct Netns {
    name: String,
    /// The address on this side.
    host_ip: String,
    /// The address in the namespace.
    ns_ip: String,
}

/// One veth pair between this namespace and a [`Netns`].
struct Pair {
    host_if: String,
    ns_if: String,
    host_ip: String,
    ns_ip: String,
}

impl Netns {
    /// `None` (and a message) where namespaces cannot be made here.
    fn create(test: &str, k: u8) -> Option<Netns> {
        if !privileged(test) {
            return None;
        }
        let name = format!("redtap-test-{}-{k}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("ip (iproute2)");
        if !out.status.success() {
            eprintln!(
                "SKIPPED {test}: cannot make a network namespace here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let mut ns = Netns {
            name,
            host_ip: String::new(),
            ns_ip: String::new(),
        };
        let pair = ns.pair(k);
        (ns.host_ip, ns.ns_ip) = (pair.host_ip, pair.ns_ip);
        let out = ns.ip("link set lo up");
        assert!(out.status.success(), "{out:?}");
        Some(ns)
    }

    /// Make veth pair `k` (0..=62) with its addresses, both ends up.
    fn pair(&self, k: u8) -> Pair {
        let pid = std::process::id();
        let x = pid % 250;
        let p = Pair {
            host_if: format!("rt{pid}h{k}"),
            ns_if: format!("rt{pid}n{k}"),
            host_ip: format!("198.18.{x}.{}", 4 * k + 1),
            ns_ip: format!("198.18.{x}.{}", 4 * k + 2),
        };
        let here = [
            format!(
                "link add {} type veth peer name {} netns {}",
                p.host_if, p.ns_if, self.name
            ),
            format!("addr add {}/30 dev {}", p.host_ip, p.host_if),
            format!("link set {} up", p.host_if),
        ];
        for step in here {
            let out = Command::new("ip").args(step.split(' ')).output().unwrap();
            assert!(out.status.success(), "ip {step}: {out:?}");
        }
        for step in [
            format!("addr add {}/30 dev {}", p.ns_ip, p.ns_if),
            format!("link set {} up", p.ns_if),
        ] {
            let out = self.ip(&step);
            assert!(out.status.success(), "ip {step}: {out:?}");
        }
        p
    }

    /// `ip ARGS` inside the namespace.
    fn ip(&self, args: &str) -> Output {
        self.exec(&format!("ip {args}"))
    }

    /// A shell command inside the namespace, bounded at 20 s.
    fn exec(&self, script: &str) -> Output {
        Command::new("ip")
            .args([
                "netns", "exec", &self.name, "timeout", "20", "sh", "-c", script,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// The command prefix that runs a program inside the namespace.
    fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// A client session inside the namespace: connect to `addr`, send a line, close.
    fn session(&self, addr: &str, port: u16) {
        // /dev/tcp is bash's.
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "timeout", "20", "bash", "-c"])
            .arg(format!(
                "exec 3<>/dev/tcp/{addr}/{port} && echo hello >&3 && exec 3>&-"
            ))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "session to {addr}:{port}: {out:?}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and so the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A redis-server this side, reachable from the namespace.
fn redis_for(ns: &Netns) -> RedisServer {
    RedisServer::start_with(&["--bind", "127.0.0.1", &ns.host_ip, "--protected-mode", "no"])
}

const TOKEN: &str = "edges-test-token-0123456789";

/// `GET path` on the admin API with the bearer token: (status, body).
fn admin_get(d: &Daemon, path: &str) -> std::io::Result<(u16, String)> {
    let host = d.admin.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Authorization: Bearer {TOKEN}\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, resp))
}

/// The value of one metric line, if the admin API answers.
fn metric(d: &Daemon, name: &str) -> Option<f64> {
    let (_, body) = admin_get(d, "/metrics").ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_non_loopback_address_records_clients_on_this_host_and_from_outside() {
    let Some(ns) = Netns::create("non-loopback address", 0) else {
        return;
    };
    let r = redis_for(&ns);
    let port = 9000;
    let admin = format!("{}:9900", ns.ns_ip);
    let url = format!("A=redis://{}:{}@1", ns.host_ip, r.port);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_wrapped(
        &ns.wrapper(),
        dir.path(),
        &format!("{}:{port}", ns.ns_ip),
        &admin,
        &["--agent", "t", "--admin-token", TOKEN, "--backend", &url],
    );
    // The address's interface and loopback.
    assert!(d.log().contains(",lo filter="), "{}", d.log());
    // From outside, over the veth pair; from inside the namespace, over its loopback.
    let addr: SocketAddr = format!("{}:{port}", ns.ns_ip).parse().unwrap();
    for _ in 0..3 {
        session(addr, b"from outside");
        ns.session(&ns.ns_ip, port);
    }
    let syns = |src: &str| {
        records(&r)
            .iter()
            .filter(|f| f["src"] == src && f["kind"] == "S")
            .count()
    };
    eventually(Duration::from_secs(20), "3 SYNs from each side", || {
        syns(&ns.host_ip) >= 3 && syns(&ns.ns_ip) >= 3
    });
    // Once each: the loopback copy leaving and the one arriving are one segment.
    let fins = |src: &str| {
        records(&r)
            .iter()
            .filter(|f| f["src"] == src && f["kind"].contains('F'))
            .count()
    };
    eventually(Duration::from_secs(20), "3 FINs from each side", || {
        fins(&ns.host_ip) >= 3 && fins(&ns.ns_ip) >= 3
    });
    assert_eq!((syns(&ns.host_ip), syns(&ns.ns_ip)), (3, 3));
    for f in records(&r) {
        assert_eq!(f["dst"], ns.ns_ip);
        assert_eq!(f["dport"], port.to_string());
    }
    let status = d.stop(Duration::from_secs(15));
    assert!(status.success(), "{status}:\n{}", d.log());
}

#[test]
fn capture_reopens_after_its_interface_disappears_and_healthz_says_so() {
    let Some(ns) = Netns::create("capture reopen", 1) else {
        return;
    };
    let r = redis_for(&ns);
    // Captured: the address of a second pair, which the test deletes and makes again. The
    // admin API and Redis are on the first pair, reachable throughout.
    let tapped = ns.pair(2);
    let port = 9000;
    let admin = format!("{}:9900", ns.ns_ip);
    let url = format!("A=redis://{}:{}@1", ns.host_ip, r.port);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_wrapped(
        &ns.wrapper(),
        dir.path(),
        &format!("{}:{port}", tapped.ns_ip),
        &admin,
        &[
            "--serve",
            "none",
            "--agent",
            "t",
            "--admin-token",
            TOKEN,
            "--backend",
            &url,
        ],
    );
    let target: SocketAddr = format!("{}:{port}", tapped.ns_ip).parse().unwrap();
    // Nothing listens there: one SYN, refused.
    let syn = || assert!(TcpStream::connect_timeout(&target, Duration::from_secs(5)).is_err());
    let syns = || {
        records(&r)
            .iter()
            .filter(|f| f["src"] == tapped.host_ip && f["kind"] == "S")
            .count()
    };
    let health = || admin_get(&d, "/healthz").map(|(c, _)| c).unwrap_or(0);
    syn();
    eventually(Duration::from_secs(20), "the first SYN stored", || {
        syns() == 1
    });
    assert_eq!(metric(&d, "redtap_capture_up"), Some(1.0));

    // An interface taken down: libpcap says nothing and reads nothing; redtap says so.
    let out = ns.ip("link set lo down");
    assert!(out.status.success(), "{out:?}");
    eventually(
        Duration::from_secs(20),
        "healthz 503 while lo is down",
        || health() == 503,
    );
    assert_eq!(metric(&d, "redtap_capture_up"), Some(0.0));
    let out = ns.ip("link set lo up");
    assert!(out.status.success(), "{out:?}");
    eventually(Duration::from_secs(20), "healthz ok with lo up", || {
        health() == 200
    });

    // The interface removed: a read error; the capture is reopened once it is back.
    let out = Command::new("ip")
        .args(["link", "del", &tapped.host_if])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    eventually(
        Duration::from_secs(20),
        "healthz 503 while it is gone",
        || health() == 503,
    );
    assert_eq!(metric(&d, "redtap_capture_up"), Some(0.0));
    // healthz says so as soon as the device is gone; the read error (and its log line) comes
    // when libpcap next wakes up.
    eventually(
        Duration::from_secs(20),
        "the capture failure logged",
        || d.log().contains("capture failed; reopening it"),
    );
    let again = ns.pair(2);
    assert_eq!(again.ns_ip, tapped.ns_ip);
    eventually(Duration::from_secs(30), "healthz ok again", || {
        health() == 200
    });
    assert_eq!(metric(&d, "redtap_capture_up"), Some(1.0));
    assert!(metric(&d, "redtap_capture_reopens_total").unwrap() >= 1.0);
    assert!(d.log().contains("packets capture reopened"), "{}", d.log());
    // Recording again.
    syn();
    eventually(Duration::from_secs(20), "the next SYN stored", || {
        syns() == 2
    });
    let status = d.stop(Duration::from_secs(15));
    assert!(status.success(), "{status}:\n{}", d.log());
    drop(again);
}

#[test]
fn a_log_setting_that_would_silence_errors_is_refused() {
    let out = std::process::Command::new(common::redtap_bin())
        .args([
            "run",
            "--capture",
            "connections",
            "--admin",
            "off",
            "--state-file",
            "off",
        ])
        .args(["--listen", &format!("127.0.0.1:{}", common::free_port())])
        .args(["--backend", "A=redis://127.0.0.1:1@1"])
        .env("REDTAP_LOG", "nonsense")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("not a log level"), "{err}");
}

#[test]
fn a_client_that_never_reads_does_not_keep_its_slot() {
    let r = RedisServer::start();
    let d = Daemon::connections(&[("A", &r, 1)], &[]);
    let addr = d.admin.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // Pipeline /metrics requests until the server stops taking them (its answers fill both
    // socket buffers and hyper's own), never reading.
    let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let len = d.metrics().len();
    let want = (40usize << 20) / len + 1;
    let mut sent = 0usize;
    while sent < want && s.write_all(req).is_ok() {
        sent += 1;
    }
    eprintln!("{sent} requests written before the server stopped reading");
    // Past the write-stall limit (10 s) and the request timeout (10 s).
    std::thread::sleep(Duration::from_secs(12));
    // Still open: answers keep coming once we read.
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break "EOF".to_string(),
            Err(e) => break e.to_string(),
            Ok(n) => total += n,
        }
    };
    eprintln!("{sent} requests of a {len}-byte answer; read {total} bytes after 12 s, then {end}");
    // Closed at the timeouts, only what sat in the socket buffers (a few MiB) can be read.
    assert!(
        total < sent * len / 2,
        "the connection was still served after 12 s: {total} of {} bytes read",
        sent * len
    );
}

/// `redtap ARGS…` in `dir`, which is also its state directory: (exit code, stdout, stderr).
fn redtap_in(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(common::redtap_bin())
        .args(args)
        .current_dir(dir)
        .env("STATE_DIRECTORY", dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The line of `redtap check`'s report about `what`.
fn check_line<'a>(report: &'a str, what: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(&format!("{what} ")))
        .unwrap_or_else(|| panic!("no line for {what} in:\n{report}"))
}

#[test]
fn readers_say_authentication_failed_for_a_wrong_or_missing_password() {
    let r = RedisServer::start_with(&["--requirepass", "right"]);
    let dir = tempfile::tempdir().unwrap();
    for url in [
        format!("redis://:wrong@127.0.0.1:{}", r.port),
        format!("redis://127.0.0.1:{}", r.port),
    ] {
        let spec = format!("A={url}@1");
        for cmd in ["query", "top", "stats"] {
            let (code, _, err) = redtap_in(dir.path(), &[cmd, "--backend", &spec]);
            assert_eq!(code, Some(2), "{cmd} {url}: {err}");
            assert!(err.contains("authentication failed"), "{cmd} {url}: {err}");
            assert!(!err.contains("unreachable"), "{cmd} {url}: {err}");
        }
    }
    // The right password reads.
    let spec = format!("A=redis://:right@127.0.0.1:{}@1", r.port);
    let (code, _, err) = redtap_in(dir.path(), &["stats", "--backend", &spec]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn check_passes_a_working_setup_and_names_each_problem() {
    let a = RedisServer::start();
    let locked = RedisServer::start_with(&["--requirepass", "right"]);
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let good = backend("A", &a, 1);
    let check = |extra: &[&str]| {
        let mut args = vec!["check", "--capture", "connections", "--agent", "t"];
        args.extend(["--listen", &listen, "--admin", &admin]);
        args.extend_from_slice(extra);
        redtap_in(dir.path(), &args)
    };

    // All well: exit 0, every item ok, and the check's key gone (it also expires by itself).
    let (code, out, err) = check(&["--backend", &good]);
    assert_eq!(code, Some(0), "{out}{err}");
    for what in ["backend A", "capture", "listen", "admin", "state file"] {
        assert!(check_line(&out, what).contains(" ok "), "{out}");
    }
    assert!(check_line(&out, "backend A").contains("redis "), "{out}");
    assert!(a.keys("redtap:check:*").is_empty());

    // A dead backend: exit 1, named, and the working one still ok.
    let dead = format!("D=redis://127.0.0.1:{}@1", free_port());
    let (code, out, err) = check(&["--backend", &good, "--backend", &dead]);
    assert_eq!(code, Some(1), "{out}{err}");
    let line = check_line(&out, "backend D");
    assert!(
        line.contains("FAIL") && line.contains("connection refused"),
        "{out}"
    );
    assert!(check_line(&out, "backend A").contains(" ok "), "{out}");
    assert!(out.contains("1 problem"), "{out}");

    // A wrong password, and none where one is required: authentication, not unreachable.
    for url in [
        format!("redis://:wrong@127.0.0.1:{}", locked.port),
        format!("redis://127.0.0.1:{}", locked.port),
    ] {
        let spec = format!("W={url}@1");
        let (code, out, err) = check(&["--backend", &spec]);
        assert_eq!(code, Some(1), "{out}{err}");
        let line = check_line(&out, "backend W");
        assert!(
            line.contains("FAIL") && line.contains("authentication failed"),
            "{out}"
        );
    }

    // A bad configuration: 64, the same message as `run`, and nothing checked.
    let bad = ["--backend", "A=redis://127.0.0.1:1@20000"];
    let (code, out, err) = check(&bad);
    assert_eq!(code, Some(64), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    let mut run_args = vec!["run", "--capture", "connections", "--listen", &listen];
    run_args.extend_from_slice(&bad);
    let (run_code, _, run_err) = redtap_in(dir.path(), &run_args);
    assert_eq!((run_code, run_err.as_str()), (Some(64), err.as_str()));

    // The admin address in use: exit 1, with the way out.
    let taken = TcpListener::bind(&admin).unwrap();
    let (code, out, err) = check(&["--backend", &good]);
    assert_eq!(code, Some(1), "{out}{err}");
    let line = check_line(&out, "admin");
    assert!(
        line.contains("FAIL") && line.contains("--admin off"),
        "{out}"
    );
    drop(taken);
}

#[test]
fn check_in_packets_mode_opens_the_capture() {
    if !privileged("check_in_packets_mode_opens_the_capture") {
        return;
    }
    let a = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let good = backend("A", &a, 1);
    let (code, out, err) = redtap_in(
        dir.path(),
        &[
            "check",
            "--capture",
            "packets",
            "--listen",
            &listen,
            "--admin",
            &admin,
            "--backend",
            &good,
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        check_line(&out, "capture").contains("libpcap opens"),
        "{out}"
    );
}

#[test]
fn a_weight_change_that_cannot_be_saved_applies_and_says_so() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    let state = state_dir.join("state.json");
    let (sa, sb) = (backend("A", &a, 30), backend("B", &b, 70));
    let d = Daemon::start_in(
        dir.path(),
        &format!("127.0.0.1:{}", free_port()),
        &format!("127.0.0.1:{}", free_port()),
        &[
            "--capture",
            "connections",
            "--agent",
            "t",
            "--backend",
            &sa,
            "--backend",
            &sb,
            "--state-file",
            state.to_str().unwrap(),
        ],
    );
    // A saved change: no warning.
    let (status, body) = d.put_weights(r#"{"A":40}"#);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v[0]["unsaved"].is_null(), "{body}");

    // The state file's directory becomes unwritable (a file now stands where it was: root
    // ignores permission bits, not that).
    std::fs::remove_dir_all(&state_dir).unwrap();
    std::fs::write(&state_dir, "not a directory").unwrap();
    let (status, body) = d.put_weights(r#"{"A":50,"B":50}"#);
    assert_eq!(status, 200, "the change is in force: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let why = v[0]["unsaved"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(
        why.contains("not saved") && why.contains("state.json"),
        "{why}"
    );
    let now = d.backends();
    assert_eq!(
        (now[0]["weight"].as_u64(), now[1]["weight"].as_u64()),
        (Some(50), Some(50))
    );
    assert_eq!(now[1]["unsaved"].as_str(), Some(why), "GET says it too");

    // `redtap weights set` prints the warning and succeeds: the change is in force.
    let out = Command::new(common::redtap_bin())
        .args(["weights", "set", "A=60", "--admin", &d.admin])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("not saved"),
        "{err}"
    );
    assert_eq!(d.backends()[0]["weight"], 60);

    // Writable again: the next change is saved and the warning is gone.
    std::fs::remove_file(&state_dir).unwrap();
    std::fs::create_dir(&state_dir).unwrap();
    let (status, body) = d.put_weights(r#"{"A":70}"#);
    assert_eq!(status, 200, "{body}");
    assert!(d.backends()[0]["unsaved"].is_null());
    assert!(std::fs::read_to_string(&state).unwrap().contains("70"));
}

#[test]
fn a_port_in_use_at_start_is_said_once_with_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let free = || format!("127.0.0.1:{}", free_port());
    for (listen, admin, what, hint) in [
        (busy.clone(), free(), "cannot listen on", "--listen"),
        (
            free(),
            busy.clone(),
            "cannot start the admin API on",
            "--admin off",
        ),
    ] {
        let (code, _, err) = redtap_in(
            dir.path(),
            &[
                "run",
                "--capture",
                "connections",
                "--listen",
                &listen,
                "--admin",
                &admin,
                "--backend",
                "A=redis://127.0.0.1:1@1",
            ],
        );
        assert_eq!(code, Some(1), "{err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains(what)).collect();
        assert_eq!(lines.len(), 1, "said once:\n{err}");
        assert!(lines[0].contains(&busy) && lines[0].contains(hint), "{err}");
    }
}

#[test]
fn a_weight_change_whose_body_never_arrives_gets_408_and_changes_nothing() {
    // `PUT /v1/weights` is exempt from the whole-request timeout once its change begins; its
    // body is still bounded, so a client that stalls mid-body holds nothing.
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let d = Daemon::connections(&[("A", &a, 30), ("B", &b, 70)], &[]);
    let before = d.backends();
    let mut s = open_admin(
        &d,
        b"PUT /v1/weights HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 20\r\n\r\n{\"A\":",
    );
    let (closed, answer) = closed_within(&mut s, Duration::from_secs(30));
    assert!(closed, "{answer}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("nothing changed"), "{answer}");
    assert_eq!(d.backends(), before);
}

// ---------------------------------------------------------------------------------------------
// Configuration: every message names what the operator typed, where

/// `redtap run ARGS` in `env`, expected to refuse at once (bounded: anything still running after
/// 20 s is killed): its exit code and stderr.
fn refused_run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new("timeout")
        .args(["20", common::redtap_bin(), "run"])
        .args(args)
        .env_remove("REDTAP_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// A config file in a fresh directory: the directory (kept alive) and the file's path.
fn config_file(toml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redtap.toml");
    std::fs::write(&path, toml).unwrap();
    let path = path.to_str().unwrap().to_string();
    (dir, path)
}

#[test]
fn a_bad_value_in_the_config_file_names_the_key_and_the_file() {
    let listen = format!("127.0.0.1:{}", free_port());
    for (line, expected) in [
        (
            "retention = \"5x\"",
            "retention = \"5x\" in {FILE}: not a duration",
        ),
        (
            "max_connections = 0",
            "max_connections = 0 in {FILE}: out of range: use 1 to 1000000",
        ),
        (
            "ring_size = \"1KiB\"",
            "ring_size = \"1KiB\" in {FILE}: out of range: use 1MiB to 2GiB",
        ),
        (
            "admin = \"0.0.0.0:9900\"",
            "admin = \"0.0.0.0:9900\" in {FILE}: is reachable from other hosts",
        ),
    ] {
        let (_dir, path) = config_file(&format!(
            "listen = \"{listen}\"\ncapture = \"connections\"\n{line}\n\n[[backend]]\nname = \"A\"\n\
             url = \"redis://127.0.0.1:1\"\nweight = 1\n"
        ));
        let (code, err) = refused_run(&["--config", &path, "--state-file", "off"], &[]);
        assert_eq!(code, Some(64), "{line}: {err}");
        let expected = format!("redtap: {}", expected.replace("{FILE}", &path));
        assert!(
            err.starts_with(&expected),
            "{line}:\n{err}\nshould start\n{expected}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        // Nothing was bound.
        TcpListener::bind(&listen).unwrap();
    }
}

#[test]
fn a_bad_flag_names_the_flag_even_when_the_file_sets_it_too() {
    let listen = format!("127.0.0.1:{}", free_port());
    let (_dir, path) = config_file(&format!(
        "listen = \"{listen}\"\nretention = \"1m\"\nmax_connections = 10\n[[backend]]\n\
         name = \"A\"\nurl = \"redis://127.0.0.1:1\"\nweight = 1\n"
    ));
    let base = ["--config", &path, "--capture", "connections"];
    for (flag, value, expected) in [
        (
            "--retention",
            "5x",
            "redtap: --retention 5x: not a duration",
        ),
        (
            "--max-connections",
            "0",
            "redtap: --max-connections 0: out of range: use 1 to 1000000",
        ),
        (
            "--listen",
            "localhost:9000",
            "redtap: --listen localhost:9000: not an IP:port",
        ),
        (
            "--filter",
            "src net 10.0.0.0/8",
            "redtap: --filter \"src net 10.0.0.0/8\": needs packets capture: --capture \
             connections has no packet filter",
        ),
    ] {
        let mut args = base.to_vec();
        args.extend([flag, value, "--state-file", "off"]);
        let (code, err) = refused_run(&args, &[]);
        assert_eq!(code, Some(64), "{flag} {value}: {err}");
        assert!(err.starts_with(expected), "{flag} {value}: {err}");
    }
    // A token from the environment is named as such, and never repeated.
    let (code, err) = refused_run(
        &[&base[..], &["--state-file", "off"]].concat(),
        &[("REDTAP_ADMIN_TOKEN", "too short")],
    );
    assert_eq!(code, Some(64), "{err}");
    assert_eq!(
        err,
        "redtap: REDTAP_ADMIN_TOKEN: must be at least 16 characters, without spaces"
    );
}

#[test]
fn a_url_error_shows_the_url_as_typed_without_its_password() {
    let listen = format!("127.0.0.1:{}", free_port());
    let (code, err) = refused_run(
        &["--listen", &listen, "--state-file", "off"]
            .into_iter()
            .chain(["--backend", "A=127.0.0.1:6379@1"])
            .collect::<Vec<_>>(),
        &[],
    );
    assert_eq!(code, Some(64), "{err}");
    assert_eq!(
        err,
        "redtap: --backend \"A\": \"127.0.0.1:6379\" is not a Redis URL: write \
         redis://127.0.0.1:6379"
    );
    let (_dir, path) = config_file(&format!(
        "listen = \"{listen}\"\n[[backend]]\nname = \"B\"\n\
         url = \"redis://user:secret@127.0.0.1:badport\"\nweight = 1\n"
    ));
    let (code, err) = refused_run(&["--config", &path, "--state-file", "off"], &[]);
    assert_eq!(code, Some(64), "{err}");
    assert_eq!(
        err,
        format!(
            "redtap: backend \"B\" in {path}: \"redis://user:***@127.0.0.1:badport\" is not a \
             Redis URL: invalid port number"
        )
    );
}

#[test]
fn a_type_error_in_the_config_file_is_said_in_plain_words_with_an_example() {
    for (toml, expected) in [
        (
            "listen = \"127.0.0.1:9000\"\nmax_connections = \"many\"\n",
            "max_connections = \"many\" in {FILE} (line 2): expected a whole number, e.g. \
             max_connections = 1024",
        ),
        (
            "listen = 9000\n",
            "listen = 9000 in {FILE} (line 1): expected text in quotes, e.g. listen = \
             \"127.0.0.1:9000\"",
        ),
        (
            "capture = \"pcap\"\n",
            "capture = \"pcap\" in {FILE} (line 1): expected one of \"packets\" or \
             \"connections\", e.g. capture = \"packets\"",
        ),
        (
            "[[backend]]\nname = \"A\"\nurl = \"redis://127.0.0.1:1\"\nweight = \"30\"\n",
            "weight = \"30\" in {FILE} (line 4): expected a whole number, e.g. weight = 30",
        ),
        (
            "listen = \"127.0.0.1:9000\"\nretension = \"5m\"\n",
            "retension = \"5m\" in {FILE} (line 2): not a setting of redtap run; the keys here \
             are listen, retention,",
        ),
    ] {
        let (_dir, path) = config_file(toml);
        let (code, err) = refused_run(&["--config", &path], &[]);
        assert_eq!(code, Some(64), "{toml}: {err}");
        let expected = format!("redtap: {}", expected.replace("{FILE}", &path));
        assert!(
            err.starts_with(&expected),
            "{toml}:\n{err}\nshould start\n{expected}"
        );
        assert!(!err.contains("u32") && !err.contains("usize"), "{err}");
    }
}

#[test]
fn the_default_state_file_lands_in_the_state_directory_made_0700() {
    use std::os::unix::fs::PermissionsExt;
    let r = RedisServer::start();
    // tests/common runs every daemon with STATE_DIRECTORY=<its dir>/state, which does not exist
    // yet: redtap makes it.
    let mut d = Daemon::connections(&[("A", &r, 1)], &[]);
    let state_dir = d.dir.join("state");
    let mode = std::fs::metadata(&state_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    assert_eq!(d.put_weights(r#"{"A":7}"#).0, 200);
    let file = state_dir.join("redtap-state-t.json");
    eventually(Duration::from_secs(10), "the state file written", || {
        std::fs::read_to_string(&file)
            .is_ok_and(|s| s.contains("\"A\": 7") || s.contains("\"A\":7"))
    });
    assert!(
        !d.dir.join("redtap-state-t.json").exists(),
        "nothing in the working directory any more"
    );
    assert!(d.stop(Duration::from_secs(10)).success(), "{}", d.log());

    // An upgrade from a version that kept the file in the working directory: a file found
    // there (and none in the state directory) is still used, with a warning naming where it
    // belongs now.
    std::fs::rename(&file, d.dir.join("redtap-state-t.json")).unwrap();
    std::fs::remove_dir(&state_dir).unwrap();
    let spec = backend("A", &r, 1);
    let mut old = Daemon::start_in(
        &d.dir,
        &format!("127.0.0.1:{}", free_port()),
        &format!("127.0.0.1:{}", free_port()),
        &[
            "--capture",
            "connections",
            "--agent",
            "t",
            "--backend",
            &spec,
        ],
    );
    assert_eq!(old.backends()[0]["weight"], 7, "{}", old.log());
    let log = old.log();
    assert!(
        log.contains("the state file is in the working directory")
            && log.contains(&state_dir.join("redtap-state-t.json").display().to_string()),
        "{log}"
    );
    assert!(old.stop(Duration::from_secs(10)).success(), "{}", old.log());

    // A state directory that cannot be made is refused at start, naming it and the way out.
    let (code, err) = refused_run(
        &[
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--capture",
            "connections",
            "--backend",
            &backend("A", &r, 1),
        ],
        &[("STATE_DIRECTORY", "/proc/redtap-cannot-be-here")],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.starts_with("redtap: cannot create the state directory /proc/redtap-cannot-be-here:")
            && err.contains("--state-file"),
        "{err}"
    );
}

#[test]
fn the_readme_configuration_reference_lists_exactly_the_settings_with_their_defaults() {
    use redtap::config::settings::{Fallback, SPECS};
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let section = readme
        .split("## Configuration reference")
        .nth(1)
        .expect("README has a configuration reference")
        .split("\n## ")
        .next()
        .unwrap();
    // Rows `| `--flag` / `key` | default | meaning |`: each key with its default cell.
    let mut documented = std::collections::BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let Some((flags, keys)) = cells[0].trim_start_matches("| ").split_once(" / ") else {
            panic!("README row without a TOML key: {row}");
        };
        if keys.contains("[[backend]]") || keys.starts_with("per backend") {
            continue;
        }
        let key = keys.trim_matches('`');
        assert_eq!(
            flags.split_whitespace().next().unwrap().trim_matches('`'),
            format!("--{}", key.replace('_', "-")),
            "{row}"
        );
        documented.insert(key.to_string(), cells[1].to_string());
    }
    let specs: std::collections::BTreeMap<String, _> =
        SPECS.iter().map(|s| (s.key.to_string(), s)).collect();
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        specs.keys().collect::<Vec<_>>(),
        "README's configuration reference and the settings differ"
    );
    for (key, cell) in &documented {
        if let Fallback::Value(v) = specs[key].fallback {
            assert_eq!(cell, &format!("`{v}`"), "README's default of {key}");
        }
    }
}
