//! Reading records back: `redtap query`, `top`, `tail` and `stats`, across every backend.
//!
//! Owns: what a read-back [`Row`] is, the time window and filters a read applies, the merge of
//! many backends (and many agents per backend) into one time-ordered sequence, and the
//! per-backend accounting of `stats`. It only reads; it never writes, trims or expires anything,
//! and it shares nothing with the capture pipeline except the layout in [`crate::sink::schema`].
//!
//! Layout:
//! - [`read`]: one backend: connect, discover agents (SCAN), page through a stream by entry ID
//!   or through keys by name, parse entries into [`Row`]s.
//! - this module: [`Sources`] (what to read), [`Window`] and [`Filter`], the k-way merge
//!   ([`read_merged`]), [`top`], [`stats`] and [`tail`].
//! - [`output`]: tables, JSON and CSV. Formatting never touches Redis.
//! - [`cli`]: the clap arguments and the glue the binary calls.
//!
//! Retention is enforced here, not trusted to Redis: a record captured at `t` is shown only while
//! `now < t + retention`, even if the stream has not been trimmed yet or a key has not expired.
//! A backend that fails is reported in [`Outcome::failures`]; the others still answer.

pub mod cli;
pub mod output;
pub mod read;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendConfig, Schema};
use crate::record::now_us;
use read::{BackendError, Holdings, Selection};

/// Records a reader task fetches per round trip (XRANGE COUNT, MGET size).
pub const PAGE: usize = 1000;
/// Pages a reader may fetch ahead of the merge: with [`PAGE`], the memory bound per source.
const PAGES_AHEAD: usize = 2;

/// One record as read back from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Capture time, µs since the Unix epoch.
    pub ts_us: u64,
    /// The sender's IP.
    pub src: IpAddr,
    /// The sender's port.
    pub sport: u16,
    /// The address the sender reached.
    pub dst: IpAddr,
    /// The port the sender reached.
    pub dport: u16,
    /// `conn`, or TCP flags such as `S`, `PA` (packets capture).
    pub kind: String,
    /// TCP payload length, for packet records.
    pub len: Option<u32>,
    /// The backend it was read from.
    pub backend: Arc<str>,
    /// The agent that wrote it.
    pub agent: Arc<str>,
}

/// What to read: the backends and where in them.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Every backend, in configured order (that order breaks ties in the merge).
    pub backends: Vec<BackendConfig>,
    /// Key prefix, agent and schema narrowing.
    pub selection: Selection,
    /// Records captured longer ago than this are never shown.
    pub retention: Duration,
}

/// A closed time range of capture times, µs since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Earliest capture time shown.
    pub from_us: u64,
    /// Latest capture time shown.
    pub to_us: u64,
}

impl Window {
    /// `[since, until]` cut to what retention still allows at `now_us`: a record captured at
    /// `t` is visible while `now < t + retention` (the writer's rule, in whole milliseconds).
    pub fn new(since_us: u64, until_us: u64, retention: Duration, now_us: u64) -> Window {
        Window {
            from_us: since_us.max(retention_floor_us(retention, now_us)),
            to_us: until_us,
        }
    }

    /// Whether `ts_us` lies inside.
    pub fn contains(&self, ts_us: u64) -> bool {
        self.from_us <= ts_us && ts_us <= self.to_us
    }

    /// Whether nothing can lie inside.
    pub fn is_empty(&self) -> bool {
        self.from_us > self.to_us
    }
}

/// The earliest capture time (µs) still inside retention at `now_us`.
pub fn retention_floor_us(retention: Duration, now_us: u64) -> u64 {
    let now_ms = now_us / 1000;
    (now_ms + 1).saturating_sub(retention.as_millis() as u64) * 1000
}

/// Which records to show, besides the time window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Source address within this network.
    pub src: Option<IpNet>,
    /// Destination address within this network.
    pub dst: Option<IpNet>,
    /// Source *or* destination port equal to this (like tcpdump's `port N`).
    pub port: Option<u16>,
}

impl Filter {
    /// Whether `row` passes. IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) match IPv4 networks.
    pub fn matches(&self, row: &Row) -> bool {
        let net_has = |net: &Option<IpNet>, ip: IpAddr| match net {
            None => true,
            Some(n) => n.contains(&ip) || n.contains(&ip.to_canonical()),
        };
        net_has(&self.src, row.src)
            && net_has(&self.dst, row.dst)
            && self.port.is_none_or(|p| row.sport == p || row.dport == p)
    }
}

/// A backend that did not (fully) answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Its name.
    pub backend: String,
    /// Its URL, password redacted.
    pub url: String,
    /// What went wrong, for the operator.
    pub error: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backend {} ({}): {}", self.backend, self.url, self.error)
    }
}

impl Failure {
    fn new(b: &BackendConfig, e: &BackendError) -> Self {
        Failure {
            backend: b.name.clone(),
            url: b.redacted_url(),
            error: e.to_string(),
        }
    }
}

/// How a read ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Rows handed to the caller.
    pub rows: u64,
    /// Backends that failed; empty when the answer is complete.
    pub failures: Vec<Failure>,
}

impl Outcome {
    /// Whether some backend's records may be missing.
    pub fn is_partial(&self) -> bool {
        !self.failures.is_empty()
    }

    fn fail(&mut self, f: Failure) {
        if !self.failures.iter().any(|x| x.backend == f.backend) {
            self.failures.push(f);
        }
    }
}

/// Counters a long read updates, for a progress line.
#[derive(Debug, Default)]
pub struct Progress {
    /// Keys visited by SCAN.
    pub keys_scanned: AtomicU64,
    /// Records fetched from Redis (before filtering).
    pub records_read: AtomicU64,
}

impl Progress {
    fn add_keys(&self, n: u64) {
        self.keys_scanned.fetch_add(n, Ordering::Relaxed);
    }
    fn add_records(&self, n: u64) {
        self.records_read.fetch_add(n, Ordering::Relaxed);
    }
}

/// One ordered source of rows: a page receiver fed by a reader task.
struct Cursor {
    backend: usize,
    rx: mpsc::Receiver<Result<Vec<Row>, BackendError>>,
    buf: VecDeque<Row>,
}

/// Read every backend in `window`, merge in capture-time order and hand each row that passes
/// `filter` to `emit` until it breaks. Ties break by backend order, then agent.
///
/// Memory is bounded by sources × [`PAGE`] × [`PAGES_AHEAD`] rows (plus, in the keys schema,
/// 24 bytes per key name in the window: key names come unordered from SCAN and must be sorted).
pub async fn read_merged(
    sources: &Sources,
    window: Window,
    filter: &Filter,
    progress: &Arc<Progress>,
    mut emit: impl FnMut(Row) -> ControlFlow<()>,
) -> Outcome {
    let mut outcome = Outcome::default();
    if window.is_empty() {
        return outcome;
    }
    let mut cursors = Vec::new();
    for (i, found) in discover_all(sources, Some(window), progress).await {
        let b = &sources.backends[i];
        match found {
            Err(e) => outcome.fail(Failure::new(b, &e)),
            Ok((conn, holdings)) => {
                for rx in read::spawn_readers(
                    conn,
                    b.name.as_str().into(),
                    &sources.selection,
                    holdings,
                    window,
                    filter.clone(),
                    progress.clone(),
                    PAGES_AHEAD,
                ) {
                    cursors.push(Cursor {
                        backend: i,
                        rx,
                        buf: VecDeque::new(),
                    });
                }
            }
        }
    }

    let mut heap = BinaryHeap::new();
    for (c, cursor) in cursors.iter_mut().enumerate() {
        if let Some(ts) = refill(cursor, sources, &mut outcome).await {
            heap.push(Reverse((ts, c)));
        }
    }
    while let Some(Reverse((_, c))) = heap.pop() {
        let cursor = &mut cursors[c];
        let row = cursor
            .buf
            .pop_front()
            .expect("a cursor in the heap has a row");
        outcome.rows += 1;
        if emit(row).is_break() {
            break;
        }
        let next = match cursor.buf.front() {
            Some(r) => Some(r.ts_us),
            None => refill(cursor, sources, &mut outcome).await,
        };
        if let Some(ts) = next {
            heap.push(Reverse((ts, c)));
        }
    }
    outcome
}

/// Wait for the cursor's next page; the timestamp of its first row, or `None` at its end.
async fn refill(cursor: &mut Cursor, sources: &Sources, outcome: &mut Outcome) -> Option<u64> {
    match cursor.rx.recv().await {
        Some(Ok(page)) => {
            cursor.buf.extend(page);
            cursor.buf.front().map(|r| r.ts_us)
        }
        Some(Err(e)) => {
            outcome.fail(Failure::new(&sources.backends[cursor.backend], &e));
            None
        }
        None => None,
    }
}

/// Connect to and discover every backend at once; results in backend order.
async fn discover_all(
    sources: &Sources,
    window: Option<Window>,
    progress: &Arc<Progress>,
) -> Vec<(
    usize,
    Result<(redis::aio::MultiplexedConnection, Holdings), BackendError>,
)> {
    let mut tasks = Vec::new();
    for b in &sources.backends {
        let (b, sel, progress) = (b.clone(), sources.selection.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = read::connect(&b).await?;
            let holdings = read::discover(&mut conn, &sel, window, &progress).await?;
            Ok((conn, holdings))
        }));
    }
    let mut out = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t
            .await
            .unwrap_or_else(|e| Err(BackendError::Internal(e.to_string())));
        out.push((i, r));
    }
    out
}

/// What `top` groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopBy {
    /// The sender's IP.
    Src,
    /// The address and port reached (`IP:port`).
    Dst,
    /// Sender IP and the address:port it reached.
    Pair,
}

/// One line of `top`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Talker {
    /// The group: `10.0.0.1`, `10.0.0.2:9000` or `10.0.0.1 > 10.0.0.2:9000`.
    pub key: String,
    /// Records in the window.
    pub count: u64,
    /// Earliest capture, µs.
    pub first_us: u64,
    /// Latest capture, µs.
    pub last_us: u64,
}

/// The answer of `top`.
#[derive(Debug, Clone, PartialEq)]
pub struct Top {
    /// Records that passed the filter, all groups.
    pub total: u64,
    /// Distinct groups.
    pub groups: u64,
    /// The busiest `n` groups, most records first, ties by key.
    pub talkers: Vec<Talker>,
    /// How the read went.
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Group {
    Src(IpAddr),
    Dst(IpAddr, u16),
    Pair(IpAddr, IpAddr, u16),
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Group::Src(ip) => write!(f, "{ip}"),
            Group::Dst(ip, port) => write!(f, "{}", std::net::SocketAddr::new(*ip, *port)),
            Group::Pair(s, ip, port) => {
                write!(f, "{s} > {}", std::net::SocketAddr::new(*ip, *port))
            }
        }
    }
}

/// Count records per group over `window` and keep the `n` busiest. Memory: one entry per group.
pub async fn top(
    sources: &Sources,
    window: Window,
    filter: &Filter,
    by: TopBy,
    n: usize,
    progress: &Arc<Progress>,
) -> Top {
    let mut counts: HashMap<Group, (u64, u64, u64)> = HashMap::new();
    let outcome = read_merged(sources, window, filter, progress, |r| {
        let g = match by {
            TopBy::Src => Group::Src(r.src),
            TopBy::Dst => Group::Dst(r.dst, r.dport),
            TopBy::Pair => Group::Pair(r.src, r.dst, r.dport),
        };
        let e = counts.entry(g).or_insert((0, u64::MAX, 0));
        e.0 += 1;
        e.1 = e.1.min(r.ts_us);
        e.2 = e.2.max(r.ts_us);
        ControlFlow::Continue(())
    })
    .await;
    let groups = counts.len() as u64;
    let mut all: Vec<(Group, (u64, u64, u64))> = counts.into_iter().collect();
    all.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(&b.0)));
    all.truncate(n);
    Top {
        total: outcome.rows,
        groups,
        talkers: all
            .into_iter()
            .map(|(g, (count, first_us, last_us))| Talker {
                key: g.to_string(),
                count,
                first_us,
                last_us,
            })
            .collect(),
        outcome,
    }
}

/// What one backend holds, for `stats`.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendStats {
    /// Backend name.
    pub name: String,
    /// URL, password redacted.
    pub url: String,
    /// Configured weight.
    pub weight: u32,
    /// weight / sum of weights.
    pub target_share: f64,
    /// Whether it answered.
    pub reachable: bool,
    /// Why not, when it did not.
    pub error: Option<String>,
    /// Records still inside retention, all agents.
    pub records: u64,
    /// Records Redis holds, including any past retention not yet trimmed or expired.
    pub held: u64,
    /// records / records of all reachable backends; `None` when there are none.
    pub share: Option<f64>,
    /// Capture time of the oldest record inside retention, µs.
    pub oldest_us: Option<u64>,
    /// Capture time of the newest record, µs.
    pub newest_us: Option<u64>,
    /// `INFO memory` `used_memory`, bytes (the whole Redis instance, not only redtap's keys).
    pub used_memory: Option<u64>,
    /// Records inside retention per agent.
    pub agents: BTreeMap<String, u64>,
}

/// The answer of `stats`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// When it was taken, µs.
    pub now_us: u64,
    /// One entry per configured backend, in order.
    pub backends: Vec<BackendStats>,
    /// Records inside retention, all reachable backends.
    pub total: u64,
    /// How the read went.
    pub outcome: Outcome,
}

/// Count what every backend holds. Streams are counted with XLEN (minus entries past
/// retention); keys with SCAN.
pub async fn stats(sources: &Sources, progress: &Arc<Progress>) -> Stats {
    let now = now_us();
    let floor = retention_floor_us(sources.retention, now);
    let weight_sum: u64 = sources.backends.iter().map(|b| b.weight as u64).sum();
    let mut tasks = Vec::new();
    for b in &sources.backends {
        let (b, sel, progress) = (b.clone(), sources.selection.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = read::connect(&b).await?;
            read::backend_stats(&mut conn, &sel, floor, &progress).await
        }));
    }
    let mut outcome = Outcome::default();
    let mut backends = Vec::new();
    for (b, t) in sources.backends.iter().zip(tasks) {
        let r = t
            .await
            .unwrap_or_else(|e| Err(BackendError::Internal(e.to_string())));
        let mut s = BackendStats {
            name: b.name.clone(),
            url: b.redacted_url(),
            weight: b.weight,
            target_share: if weight_sum == 0 {
                0.0
            } else {
                b.weight as f64 / weight_sum as f64
            },
            reachable: r.is_ok(),
            error: None,
            records: 0,
            held: 0,
            share: None,
            oldest_us: None,
            newest_us: None,
            used_memory: None,
            agents: BTreeMap::new(),
        };
        match r {
            Ok(h) => {
                s.records = h.agents.values().sum();
                s.held = h.held;
                s.oldest_us = h.oldest_us;
                s.newest_us = h.newest_us;
                s.used_memory = h.used_memory;
                s.agents = h.agents;
            }
            Err(e) => {
                let f = Failure::new(b, &e);
                s.error = Some(f.error.clone());
                outcome.fail(f);
            }
        }
        backends.push(s);
    }
    let total: u64 = backends.iter().map(|b| b.records).sum();
    for b in &mut backends {
        if b.reachable && total > 0 {
            b.share = Some(b.records as f64 / total as f64);
        }
    }
    outcome.rows = total;
    Stats {
        now_us: now,
        backends,
        total,
        outcome,
    }
}

/// What a tail reports besides rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailEvent {
    /// New records from one backend, in capture order.
    Rows(Vec<Row>),
    /// A backend stopped answering; it is retried.
    Down(Failure),
    /// A backend that was down answers again.
    Up(String),
}

/// How often a tail looks for new agents (streams) and new keys.
const TAIL_DISCOVER_EVERY: Duration = Duration::from_secs(1);
/// Keys schema: how late after its capture a key may appear and still be shown by a tail.
pub const TAIL_KEYS_LAG: Duration = Duration::from_secs(10);

/// Follow every backend from `start_us` until `shutdown`, handing events to `on_event` as they
/// come (rows in capture order per backend and batch; across backends, in arrival order).
///
/// Streams are followed with `XREAD BLOCK` from the last ID seen in each; keys by SCAN for names
/// not seen yet. Memory: the last ID per stream, and the keys seen in the last
/// [`TAIL_KEYS_LAG`].
pub async fn tail(
    sources: &Sources,
    filter: &Filter,
    start_us: u64,
    shutdown: CancellationToken,
    mut on_event: impl FnMut(TailEvent) -> ControlFlow<()>,
) -> Outcome {
    let (tx, mut rx) = mpsc::channel(64);
    let stop = shutdown.child_token();
    for b in &sources.backends {
        tokio::spawn(read::follow(
            b.clone(),
            sources.selection.clone(),
            sources.retention,
            filter.clone(),
            start_us,
            TAIL_DISCOVER_EVERY,
            TAIL_KEYS_LAG,
            tx.clone(),
            stop.clone(),
        ));
    }
    drop(tx);
    let mut outcome = Outcome::default();
    let mut down: HashSet<String> = HashSet::new();
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = rx.recv() => match ev { Some(ev) => ev, None => break },
        };
        match &ev {
            TailEvent::Rows(rows) => outcome.rows += rows.len() as u64,
            TailEvent::Down(f) => {
                if !down.insert(f.backend.clone()) {
                    continue; // already reported
                }
                outcome.fail(f.clone());
            }
            TailEvent::Up(name) => {
                if !down.remove(name) {
                    continue;
                }
            }
        }
        if on_event(ev).is_break() {
            break;
        }
    }
    stop.cancel();
    outcome
}

/// Which schemas a selection reads.
pub fn reads_schema(sel: Option<Schema>, s: Schema) -> bool {
    sel.is_none_or(|x| x == s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(src: &str, sport: u16, dst: &str, dport: u16) -> Row {
        Row {
            ts_us: 0,
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
            kind: "conn".into(),
            len: None,
            backend: "A".into(),
            agent: "a".into(),
        }
    }

    #[test]
    fn filter_by_cidr_and_either_port() {
        let r = row("10.1.2.3", 40000, "192.0.2.1", 9000);
        let f = |src: Option<&str>, dst: Option<&str>, port: Option<u16>| Filter {
            src: src.map(|s| s.parse().unwrap()),
            dst: dst.map(|s| s.parse().unwrap()),
            port,
        };
        assert!(f(None, None, None).matches(&r));
        assert!(f(Some("10.0.0.0/8"), None, None).matches(&r));
        assert!(!f(Some("10.2.0.0/16"), None, None).matches(&r));
        assert!(f(None, Some("192.0.2.0/24"), Some(9000)).matches(&r));
        assert!(f(None, None, Some(40000)).matches(&r), "source port too");
        assert!(!f(None, None, Some(9001)).matches(&r));
        let mapped = row("::ffff:10.1.2.3", 1, "::1", 2);
        assert!(f(Some("10.1.0.0/16"), None, None).matches(&mapped));
    }

    #[test]
    fn window_respects_retention_in_whole_ms() {
        let now = 1_000_000_000; // µs: 1_000_000 ms
        let w = Window::new(0, now, Duration::from_secs(1), now);
        // Captured at 999_001 ms: expires at 1_000_001 ms > now: visible.
        assert_eq!(w.from_us, 999_001_000);
        assert!(w.contains(999_001_000) && !w.contains(999_000_999));
        let w = Window::new(999_500_000, now, Duration::from_secs(1), now);
        assert_eq!(w.from_us, 999_500_000);
    }
}
