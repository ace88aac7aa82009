//! Reading one backend: connect, discover agents and keys by SCAN, page through ranges.
//!
//! Owns the Redis I/O of the read side (SCAN, TYPE, XRANGE paging, XREAD, MGET — on a Redis
//! Cluster, XREAD per hash slot and GET pipelines instead of commands across slots) and how much
//! of it is in flight: an agent's buckets are read [`BUCKETS_AHEAD`] at a time, each in its own
//! task, a full one in ID slices read at once. Everything goes through one connection per
//! backend (what [`spawn_readers`] and [`discover`] take), so a backend of several nodes is one
//! call per node. What the writer stored is decoded by its layout ([`crate::layout`]: key
//! names, bucket entries of either kind, key values); a record a layout does not recognise is
//! skipped, and a packed entry that does not decode is counted in [`Progress`]. It never
//! writes to Redis.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::connect::cluster::hash_slot;
use crate::connect::Conn;
use redis::aio::ConnectionLike;
use redis::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    cmd::tail::TailEvent, reads_schema, retention_floor_us, Failure, Filter, Progress, Row, Window,
    PAGE,
};
use crate::config::{BackendConfig, Schema};
use crate::connect::{ConnectError, Timeouts};
use crate::layout::entry::{self, EntryDecoder, Item, Skipped};
use crate::layout::stream::{entries, parse_bucket_rest, xread_streams, Listen};
use crate::layout::{keys, stream, Decoded};
use crate::record::now_us;

/// Time allowed to connect to a backend.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for one answer (a page, a SCAN step, an XREAD BLOCK).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one XREAD of a tail blocks.
const TAIL_BLOCK_MS: u64 = 500;
/// How long a tail follows a Redis Cluster's redirects (reconnecting, reading its topology
/// again) before it reports the backend down.
const REDIRECTS_QUIET: Duration = Duration::from_secs(5);
/// How long a tail of a Redis Cluster waits after finding nothing new on any primary (its
/// XREADs do not block: see `Follower::read_new`).
const TAIL_POLL_MS: u64 = 100;

/// Why a backend did not (fully) answer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// It could not be connected to: unreachable (not running, wrong URL, firewall), a wrong
    /// password, TLS, or a bad configuration — the message says which.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// It was reached but a read failed part way (connection lost, timeout, error reply).
    #[error("read failed: {0}")]
    Read(redis::RedisError),
    /// A reader task ended abnormally (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl BackendError {
    /// Whether a Redis Cluster redirected a read (a resharding or failover in progress): not a
    /// failure, a reconnect.
    pub fn is_redirect(&self) -> bool {
        matches!(self, BackendError::Read(e) if crate::connect::cluster::is_redirect(e))
    }
}

/// Which keys a read looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Key prefix (`redtap`).
    pub prefix: String,
    /// Only this agent; every agent when `None`.
    pub agent: Option<String>,
    /// Only this layout; both when `None`.
    pub schema: Option<Schema>,
}

/// A keys-schema record known by its name only: `<prefix>:ev:<agent>:<ts_us>:<seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyName {
    /// Capture time, µs.
    pub ts_us: u64,
    /// Index into [`Holdings::key_agents`].
    pub agent: u32,
    /// Sequence within `ts_us`.
    pub seq: u64,
}

/// What a backend holds for a [`Selection`].
#[derive(Debug, Clone, Default)]
pub struct Holdings {
    /// Stream schema: (agent, its stream keys in capture order — the single stream of earlier
    /// versions, then its per-second buckets inside the discovery window, oldest first).
    pub streams: Vec<(Arc<str>, Vec<String>)>,
    /// Stream schema: bucket keys seen outside the discovery window.
    pub buckets_outside: Vec<String>,
    /// Keys schema: records whose name puts them inside the discovery window, unordered.
    pub keys: Vec<KeyName>,
    /// Agent names [`KeyName::agent`] points into.
    pub key_agents: Vec<Arc<str>>,
    /// Keys schema: records seen outside the discovery window.
    pub keys_outside: u64,
}

/// Connect to `b` with bounded connect and answer times, through the same
/// [`crate::connect::connect_backend`] as the writer (so `rediss://` with `tls_ca`/`tls_cert`/`tls_key`
/// works for reads too, and a wrong password reads as such).
///
/// A Redis Cluster backend connects to every primary: [`discover`] SCANs each
/// ([`Conn::nodes`]), and every other read is routed by its key to the primary that holds it.
pub async fn connect(b: &BackendConfig) -> Result<Conn, BackendError> {
    let t = Timeouts {
        connect: CONNECT_TIMEOUT,
        response: RESPONSE_TIMEOUT,
    };
    Ok(crate::connect::connect_backend(b, t).await?)
}

/// `s` with glob characters escaped for SCAN MATCH.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Find the streams and keys of `sel`. Keys-schema names outside `window` (when given) are
/// only counted. One SCAN of the keyspace at most, plus a TYPE per stream candidate.
pub async fn discover(
    conn: &mut Conn,
    sel: &Selection,
    window: Option<Window>,
    progress: &Progress,
) -> Result<Holdings, BackendError> {
    let streams_on = reads_schema(sel.schema, Schema::Stream);
    let keys_on = reads_schema(sel.schema, Schema::Keys);
    let prefix = glob_escape(&sel.prefix);
    let mut h = Holdings::default();
    let mut agents: HashMap<String, u32> = HashMap::new();
    let mut candidates: Vec<String> = Vec::new();

    let mut patterns = Vec::new();
    match (&sel.agent, streams_on, keys_on) {
        (Some(a), _, _) => {
            if streams_on {
                candidates.push(stream::stream_key(&sel.prefix, a));
                // `{a}:…`, and on a Redis Cluster its stripes `{a/<k>}:…`.
                patterns.push(format!("{prefix}:events:{{{}[}}/]*", glob_escape(a)));
            }
            if keys_on {
                patterns.push(format!("{prefix}:ev:{}:*", glob_escape(a)));
            }
        }
        (None, true, true) => patterns.push(format!("{prefix}:ev*")), // both `ev:` and `events:`
        (None, true, false) => patterns.push(format!("{prefix}:events:*")),
        (None, false, _) => patterns.push(format!("{prefix}:ev:*")),
    };
    let events = format!("{}:events:", sel.prefix);
    let ev = format!("{}:ev:", sel.prefix);
    // (agent, bucket second, key)
    let mut buckets: Vec<(Arc<str>, u64, String)> = Vec::new();
    let mut scans = Vec::new();
    for (_, c) in conn.nodes() {
        for p in &patterns {
            scans.push((c.clone(), p.clone()));
        }
    }
    for (mut node, pattern) in scans {
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut node)
                .await
                .map_err(BackendError::Read)?;
            progress.add_keys(batch.len() as u64);
            for key in batch {
                if let Some(rest) = key.strip_prefix(&events) {
                    if !streams_on {
                        continue;
                    }
                    if let Some((agent, sec)) = parse_bucket_rest(rest) {
                        if sel.agent.as_deref().is_some_and(|a| a != agent) {
                            continue;
                        }
                        let inside = window.is_none_or(|w| {
                            (sec + 1).saturating_mul(1_000_000) > w.from_us
                                && sec.saturating_mul(1_000_000) <= w.to_us
                        });
                        if inside {
                            buckets.push((agent.into(), sec, key));
                        } else {
                            h.buckets_outside.push(key);
                        }
                    } else if sel.agent.is_none() && !rest.contains(':') {
                        candidates.push(key);
                    }
                } else if let Some(rest) = key.strip_prefix(&ev) {
                    if !keys_on {
                        continue;
                    }
                    let Some((agent, ts_us, seq)) = keys::parse_key_rest(rest) else {
                        continue;
                    };
                    if window.is_some_and(|w| !w.contains(ts_us)) {
                        h.keys_outside += 1;
                        continue;
                    }
                    let idx = match agents.get(agent) {
                        Some(&i) => i,
                        None => {
                            let i = h.key_agents.len() as u32;
                            h.key_agents.push(agent.into());
                            agents.insert(agent.to_string(), i);
                            i
                        }
                    };
                    h.keys.push(KeyName {
                        ts_us,
                        agent: idx,
                        seq,
                    });
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    candidates.sort();
    candidates.dedup();
    let mut per_agent: BTreeMap<Arc<str>, Vec<String>> = BTreeMap::new();
    for key in candidates {
        let t: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(conn)
            .await
            .map_err(BackendError::Read)?;
        if t == "stream" {
            let agent: Arc<str> = key[events.len()..].into();
            per_agent.entry(agent).or_default().push(key);
        }
    }
    buckets.sort();
    buckets.dedup();
    for (agent, _, key) in buckets {
        per_agent.entry(agent).or_default().push(key);
    }
    h.streams = per_agent.into_iter().collect();
    Ok(h)
}

/// Start one reader task per agent's streams and one for all of the keys; each sends pages of
/// rows that pass `window` and `filter`, in capture order, ending its channel when done or
/// after an error.
#[allow(clippy::too_many_arguments)]
pub fn spawn_readers(
    conn: Conn,
    backend: Arc<str>,
    sel: &Selection,
    mut holdings: Holdings,
    window: Window,
    filter: Filter,
    progress: Arc<Progress>,
    ahead: usize,
) -> Vec<mpsc::Receiver<Result<Vec<Row>, BackendError>>> {
    let mut out = Vec::new();
    let filter = Arc::new(filter);
    for (agent, keys) in holdings.streams {
        let (tx, rx) = mpsc::channel(ahead);
        out.push(rx);
        let ctx = Arc::new(Ctx {
            conn: conn.clone(),
            backend: backend.clone(),
            agent,
            window,
            filter: filter.clone(),
            progress: progress.clone(),
        });
        tokio::spawn(streams(ctx, keys, tx));
    }
    if !holdings.keys.is_empty() {
        // Order by time, then agent name, then sequence.
        let names = &holdings.key_agents;
        holdings.keys.sort_unstable_by(|a, b| {
            (a.ts_us, &names[a.agent as usize], a.seq).cmp(&(
                b.ts_us,
                &names[b.agent as usize],
                b.seq,
            ))
        });
        let (tx, rx) = mpsc::channel(ahead);
        out.push(rx);
        let r = KeysReader {
            conn,
            backend,
            window,
            filter,
            progress,
            tx,
        };
        tokio::spawn(r.keys(sel.prefix.clone(), holdings.keys, holdings.key_agents));
    }
    out
}

/// Seconds of one agent read at once (a second: one bucket, or on a cluster one per stripe),
/// each its own task: while the merge takes one second's rows, the next ones are fetched and
/// decoded (on another core when there is one). Memory holds this many seconds of one agent's
/// records.
pub const BUCKETS_AHEAD: usize = 4;

/// A bucket that fills its first page is read in up to this many ID ranges at once, each paged
/// on its own: pipelined round trips instead of one page after the other.
const SLICES: u64 = 8;

/// What every read of one agent's streams shares.
struct Ctx {
    conn: Conn,
    backend: Arc<str>,
    agent: Arc<str>,
    window: Window,
    filter: Arc<Filter>,
    progress: Arc<Progress>,
}

type Tx = mpsc::Sender<Result<Vec<Row>, BackendError>>;

/// The capture second of a bucket key (`…}:<second>`); `None` for the single stream of earlier
/// versions (whose name cannot end so: an agent name has no `:`).
fn bucket_second(key: &str) -> Option<u64> {
    key.rsplit_once("}:")?.1.parse().ok()
}

/// Read an agent's streams in capture order: the single stream of earlier versions page by
/// page, then the buckets, [`BUCKETS_AHEAD`] at a time.
async fn streams(ctx: Arc<Ctx>, keys: Vec<String>, tx: Tx) {
    let (buckets, single): (Vec<String>, Vec<String>) =
        keys.into_iter().partition(|k| bucket_second(k).is_some());
    for key in single {
        if !single_stream(&ctx, &key, &tx).await {
            return;
        }
    }
    // One agent's second is one bucket, or on a Redis Cluster one per stripe its pipelines took
    // in that second (the keys come sorted by second): read together, handed on as one.
    let mut seconds: Vec<Vec<String>> = Vec::new();
    for key in buckets {
        match seconds.last_mut() {
            Some(last) if bucket_second(&last[0]) == bucket_second(&key) => last.push(key),
            _ => seconds.push(vec![key]),
        }
    }
    let mut todo = seconds.into_iter();
    let mut running = std::collections::VecDeque::new();
    loop {
        while running.len() < BUCKETS_AHEAD {
            let Some(keys) = todo.next() else { break };
            running.push_back(tokio::spawn(read_second(ctx.clone(), keys)));
        }
        let Some(task) = running.pop_front() else {
            return;
        };
        let sent = match task.await {
            Ok(Ok(rows)) => rows.is_empty() || tx.send(Ok(rows)).await.is_ok(),
            Ok(Err(e)) => {
                let _ = tx.send(Err(BackendError::Read(e))).await;
                false
            }
            Err(e) => {
                let _ = tx.send(Err(BackendError::Internal(e.to_string()))).await;
                false
            }
        };
        if !sent {
            // An error, or the merge stopped (limit reached): nothing more is wanted.
            running.iter().for_each(|t| t.abort());
            return;
        }
    }
}

/// Decode an XRANGE answer read from `key` into `rows` (those inside the window that pass the
/// filter); the number of entries and the last ID.
fn decode_page<'v>(
    ctx: &Ctx,
    key: &str,
    reply: &'v Value,
    listen: Option<Listen>,
    dec: &mut EntryDecoder,
    rows: &mut Vec<Row>,
) -> (usize, Option<&'v str>) {
    let es = entries(reply);
    let mut read = 0u64;
    for &(id, fields) in &es {
        let r = dec.decode(id, fields, listen, |i| {
            read += 1;
            if ctx.window.contains(i.ts_us) {
                let row = row_of(i, &ctx.backend, &ctx.agent);
                if ctx.filter.matches(&row) {
                    rows.push(row);
                }
            }
        });
        if let Err(Skipped::Packed(e)) = r {
            ctx.progress.skip(key, id, &e);
        }
    }
    ctx.progress.add_records(read);
    (es.len(), es.last().map(|e| e.0))
}

/// Page through one stream of earlier versions with XRANGE over the window's entry IDs (its
/// IDs are capture ms). `false` when reading should stop (an error was sent, or nobody
/// listens).
async fn single_stream(ctx: &Ctx, key: &str, tx: &Tx) -> bool {
    let mut conn = ctx.conn.clone();
    let mut dec = EntryDecoder::default();
    let first: Result<Value, _> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await;
    let listen = match first {
        Ok(v) => entry::bucket_listen(&v),
        Err(e) => {
            let _ = tx.send(Err(BackendError::Read(e))).await;
            return false;
        }
    };
    let mut start = (ctx.window.from_us / 1000).to_string();
    let end = (ctx.window.to_us / 1000).to_string();
    loop {
        let reply: Value = match xrange(&mut conn, key, &start, &end).await {
            Ok(v) => v,
            Err(e) => {
                let _ = tx.send(Err(BackendError::Read(e))).await;
                return false;
            }
        };
        let mut rows = Vec::new();
        let (n, last) = decode_page(ctx, key, &reply, listen, &mut dec, &mut rows);
        let Some(last) = last else {
            return true;
        };
        start = format!("({last}");
        if !rows.is_empty() && tx.send(Ok(rows)).await.is_err() {
            return false; // the merge stopped (limit reached)
        }
        if n < PAGE {
            return true;
        }
    }
}

/// `XRANGE key start end COUNT PAGE`.
async fn xrange(
    conn: &mut Conn,
    key: &str,
    start: &str,
    end: &str,
) -> Result<Value, redis::RedisError> {
    redis::cmd("XRANGE")
        .arg(key)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(PAGE)
        .query_async(conn)
        .await
}

/// Read the buckets of one second, `keys` (several on a cluster: one per stripe), into one list
/// in capture order. Their reads are dropped (aborted) with this task: an error in one, or the
/// merge stopping, ends them all.
async fn read_second(ctx: Arc<Ctx>, mut keys: Vec<String>) -> Result<Vec<Row>, redis::RedisError> {
    if keys.len() == 1 {
        return read_bucket(ctx, keys.pop().expect("one")).await;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for k in keys {
        tasks.spawn(read_bucket(ctx.clone(), k));
    }
    let mut rows = Vec::new();
    while let Some(t) = tasks.join_next().await {
        match t {
            Ok(r) => rows.extend(r?),
            Err(e) => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::ClientError,
                    "reader task failed",
                    e.to_string(),
                )))
            }
        }
    }
    // The stripes interleave in time. (A single bucket is handed on in ID order, which is
    // capture order but for the few entries given a fresh ID after the clock went back.)
    rows.sort_by_key(|r| r.ts_us);
    Ok(rows)
}

/// Read one bucket whole (a second of one agent's records; the window is applied to each
/// record's capture time, which in a packed entry need not match the entry ID). The first page
/// names the bucket's listen address; if more follow, the rest of the bucket's ID range is
/// cut into [`SLICES`] read at once.
async fn read_bucket(ctx: Arc<Ctx>, key: String) -> Result<Vec<Row>, redis::RedisError> {
    let mut conn = ctx.conn.clone();
    let first = xrange(&mut conn, &key, "-", "+").await?;
    let listen = entry::bucket_listen(&first);
    let mut dec = EntryDecoder::default();
    let mut rows = Vec::new();
    let (n, last) = decode_page(&ctx, &key, &first, listen, &mut dec, &mut rows);
    let Some(last) = last.and_then(stream::parse_stream_id).filter(|_| n == PAGE) else {
        return Ok(rows);
    };
    // The ID range after the first page, cut at millisecond bounds up to the bucket's end; the
    // last slice runs to `+` (an ID may lie past its second when the clock went back).
    let lo = last.major;
    let hi = bucket_second(&key).map_or(lo, |s| ((s + 1) * 1000).saturating_sub(1).max(lo));
    let mut cuts: Vec<u64> = (1..SLICES).map(|i| lo + (hi - lo) * i / SLICES).collect();
    cuts.dedup();
    cuts.retain(|&c| c > lo);
    let mut ranges = Vec::new();
    let mut start = format!("({}-{}", last.major, last.seq);
    for c in cuts {
        ranges.push((start, format!("{c}-{}", u64::MAX)));
        start = format!("({c}-{}", u64::MAX);
    }
    ranges.push((start, "+".to_string()));
    let tasks: Vec<_> = ranges
        .into_iter()
        .map(|(start, end)| {
            let (ctx, key) = (ctx.clone(), key.clone());
            tokio::spawn(async move { read_range(&ctx, &key, start, &end, listen).await })
        })
        .collect();
    let mut failed = None;
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => rows.extend(r),
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(e) => {
                failed = failed.or(Some(redis::RedisError::from((
                    redis::ErrorKind::ClientError,
                    "reader task failed",
                    e.to_string(),
                ))))
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(rows),
    }
}

/// Page through `(start, end]` of one stream (`start` exclusive, `(`-prefixed).
async fn read_range(
    ctx: &Ctx,
    key: &str,
    mut start: String,
    end: &str,
    listen: Option<Listen>,
) -> Result<Vec<Row>, redis::RedisError> {
    let mut conn = ctx.conn.clone();
    let mut dec = EntryDecoder::default();
    let mut rows = Vec::new();
    loop {
        let reply = xrange(&mut conn, key, &start, end).await?;
        let (n, last) = decode_page(ctx, key, &reply, listen, &mut dec, &mut rows);
        match last {
            Some(id) if n == PAGE => start = format!("({id}"),
            _ => return Ok(rows),
        }
    }
}

/// The keys-schema reader's state.
struct KeysReader {
    conn: Conn,
    backend: Arc<str>,
    window: Window,
    filter: Arc<Filter>,
    progress: Arc<Progress>,
    tx: Tx,
}

impl KeysReader {
    /// Fetch keys by name, in the given order ([`get_many`]). Expired keys come back nil.
    async fn keys(mut self, prefix: String, names: Vec<KeyName>, agents: Vec<Arc<str>>) {
        for page in names.chunks(PAGE) {
            let names: Vec<String> = page
                .iter()
                .map(|k| {
                    format!(
                        "{prefix}:ev:{}:{}:{}",
                        agents[k.agent as usize], k.ts_us, k.seq
                    )
                })
                .collect();
            let values = match get_many(&mut self.conn, &names).await {
                Ok(v) => v,
                Err(e) => {
                    let _ = self.tx.send(Err(BackendError::Read(e))).await;
                    return;
                }
            };
            self.progress.add_records(page.len() as u64);
            let rows: Vec<Row> = page
                .iter()
                .zip(values)
                .filter_map(|(k, v)| row_from_json(&v?, &self.backend, &agents[k.agent as usize]))
                .filter(|r| self.window.contains(r.ts_us) && self.filter.matches(r))
                .collect();
            if !rows.is_empty() && self.tx.send(Ok(rows)).await.is_err() {
                return;
            }
        }
    }
}

/// The values of `keys`, nil for a key that is gone (expired). One server: one `MGET`. A
/// cluster refuses an `MGET` whose keys lie in several slots (`CROSSSLOT`), and a keys-schema
/// name has no hash tag, so each is its own `GET`, pipelined: the cluster connection sends each
/// primary its part at once.
async fn get_many(
    conn: &mut Conn,
    keys: &[String],
) -> Result<Vec<Option<Vec<u8>>>, redis::RedisError> {
    match conn {
        Conn::Single(_) => redis::cmd("MGET").arg(keys).query_async(conn).await,
        Conn::Cluster(_) => {
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.get(k);
            }
            pipe.query_async(conn).await
        }
    }
}

/// A decoded record → a row of `backend` and `agent`.
pub fn row(d: Decoded, backend: &Arc<str>, agent: &Arc<str>) -> Row {
    Row {
        ts_us: d.ts_us,
        src: d.src,
        sport: d.sport,
        dst: d.dst,
        dport: d.dport,
        kind: d.kind.into(),
        len: d.len,
        backend: backend.clone(),
        agent: agent.clone(),
    }
}

/// A record read from a stream entry → a row of `backend` and `agent`.
fn row_of(i: Item, backend: &Arc<str>, agent: &Arc<str>) -> Row {
    Row {
        ts_us: i.ts_us,
        src: i.src,
        sport: i.sport,
        dst: i.dst,
        dport: i.dport,
        kind: i.kind,
        len: i.len,
        backend: backend.clone(),
        agent: agent.clone(),
    }
}

/// The listen address a bucket's first entry names, which its other entries may leave out.
async fn bucket_listen(conn: &mut Conn, key: &str) -> Result<Option<Listen>, redis::RedisError> {
    let first: Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(entry::bucket_listen(&first))
}

/// A keys-layout value → a row; `None` if it is not one of ours.
fn row_from_json(v: &[u8], backend: &Arc<str>, agent: &Arc<str>) -> Option<Row> {
    keys::decode(v).map(|d| row(d, backend, agent))
}

/// What `stats` learns from one backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldStats {
    /// Records held, including any past retention.
    pub held: u64,
    /// Records inside retention, per agent.
    pub agents: BTreeMap<String, u64>,
    /// Oldest capture inside retention, µs.
    pub oldest_us: Option<u64>,
    /// Newest capture, µs.
    pub newest_us: Option<u64>,
    /// `used_memory` from INFO memory.
    pub used_memory: Option<u64>,
}

/// Count one backend's records: inside retention (captured at or after `floor_us`) and held.
pub async fn backend_stats(
    conn: &mut Conn,
    sel: &Selection,
    floor_us: u64,
    progress: &Progress,
) -> Result<HeldStats, BackendError> {
    let window = Window {
        from_us: floor_us,
        to_us: u64::MAX,
    };
    let h = discover(conn, sel, Some(window), progress).await?;
    let mut s = HeldStats::default();
    let floor_ms = floor_us / 1000;
    let first_ts = |v: &Value| entries(v).first().and_then(|(id, f)| stream::ts_of(id, f));
    let mut streams: Vec<(Arc<str>, String)> = Vec::new();
    for (agent, keys) in &h.streams {
        for key in keys {
            streams.push((agent.clone(), key.clone()));
        }
    }
    let mut dec = EntryDecoder::default();
    for key in &h.buckets_outside {
        // XLEN counts entries; a packed entry holds many records.
        if has_packed(conn, key).await? {
            s.held += scan_stream(conn, key, floor_us, progress, &mut dec)
                .await?
                .0;
        } else {
            s.held += q::<u64>(conn, redis::cmd("XLEN").arg(key)).await?;
        }
    }
    for (agent, key) in &streams {
        if has_packed(conn, key).await? {
            let (held, inside, oldest, newest) =
                scan_stream(conn, key, floor_us, progress, &mut dec).await?;
            s.held += held;
            *s.agents.entry(agent.to_string()).or_default() += inside;
            merge_min(&mut s.oldest_us, oldest);
            merge_max(&mut s.newest_us, newest);
            continue;
        }
        let len: u64 = q(conn, redis::cmd("XLEN").arg(key)).await?;
        // Entries before the floor that expiry (or, in an old single stream, trimming) has not
        // removed yet.
        let mut stale = 0u64;
        let mut start = "-".to_string();
        loop {
            let v: Value = q(
                conn,
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg(&start)
                    .arg(format!("({floor_ms}"))
                    .arg("COUNT")
                    .arg(PAGE),
            )
            .await?;
            let e = entries(&v);
            stale += e.len() as u64;
            match e.last() {
                Some((id, _)) if e.len() == PAGE => start = format!("({id}"),
                _ => break,
            }
        }
        let (oldest, newest) = ends(conn, key, &floor_ms.to_string()).await?;
        s.held += len;
        *s.agents.entry(agent.to_string()).or_default() += len.saturating_sub(stale);
        merge_min(&mut s.oldest_us, first_ts(&oldest));
        merge_max(&mut s.newest_us, first_ts(&newest));
    }
    s.held += h.keys.len() as u64 + h.keys_outside;
    for k in &h.keys {
        *s.agents
            .entry(h.key_agents[k.agent as usize].to_string())
            .or_default() += 1;
        merge_min(&mut s.oldest_us, Some(k.ts_us));
        merge_max(&mut s.newest_us, Some(k.ts_us));
    }
    let info: String = q(conn, redis::cmd("INFO").arg("memory")).await?;
    s.used_memory = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok());
    Ok(s)
}

/// A stream's oldest and newest entry from ID `from` on (`XRANGE`/`XREVRANGE … COUNT 1`).
async fn ends(conn: &mut Conn, key: &str, from: &str) -> Result<(Value, Value), BackendError> {
    let oldest = q(
        conn,
        redis::cmd("XRANGE")
            .arg(key)
            .arg(from)
            .arg("+")
            .arg("COUNT")
            .arg(1),
    )
    .await?;
    let newest = q(
        conn,
        redis::cmd("XREVRANGE")
            .arg(key)
            .arg("+")
            .arg(from)
            .arg("COUNT")
            .arg(1),
    )
    .await?;
    Ok((oldest, newest))
}

/// Whether a stream's first or last entry is packed: then XLEN (entries) is not its record
/// count. A bucket changes kind at most once (an upgrade or a downgrade within its second).
async fn has_packed(conn: &mut Conn, key: &str) -> Result<bool, BackendError> {
    let (first, last) = ends(conn, key, "-").await?;
    let packed = |v: &Value| {
        entries(v)
            .first()
            .is_some_and(|(_, f)| entry::packed_value(f).is_some())
    };
    Ok(packed(&first) || packed(&last))
}

/// Count a stream's records by reading it whole: (held, captured at or after `floor_us`,
/// oldest of those, newest). Entries that do not decode are counted in `progress`.
async fn scan_stream(
    conn: &mut Conn,
    key: &str,
    floor_us: u64,
    progress: &Progress,
    dec: &mut EntryDecoder,
) -> Result<(u64, u64, Option<u64>, Option<u64>), BackendError> {
    let first: Value = q(
        conn,
        redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1),
    )
    .await?;
    let listen = entry::bucket_listen(&first);
    let (mut held, mut inside, mut oldest, mut newest) = (0, 0, None, None);
    let mut start = "-".to_string();
    loop {
        let v: Value = q(
            conn,
            redis::cmd("XRANGE")
                .arg(key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(PAGE),
        )
        .await?;
        let e = entries(&v);
        for &(id, fields) in &e {
            let r = dec.decode(id, fields, listen, |i| {
                held += 1;
                if i.ts_us >= floor_us {
                    inside += 1;
                    merge_min(&mut oldest, Some(i.ts_us));
                    merge_max(&mut newest, Some(i.ts_us));
                }
            });
            match r {
                Ok(()) => {}
                Err(Skipped::Packed(err)) => progress.skip(key, id, &err),
                // Not ours: still an entry Redis holds, as XLEN would count it.
                Err(Skipped::NotOurs) => held += 1,
            }
        }
        match e.last() {
            Some((id, _)) if e.len() == PAGE => start = format!("({id}"),
            _ => break,
        }
    }
    Ok((held, inside, oldest, newest))
}

async fn q<T: redis::FromRedisValue>(conn: &mut Conn, cmd: &redis::Cmd) -> Result<T, BackendError> {
    cmd.query_async(conn).await.map_err(BackendError::Read)
}

fn merge_min(a: &mut Option<u64>, b: Option<u64>) {
    *a = match (*a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
}

fn merge_max(a: &mut Option<u64>, b: Option<u64>) {
    *a = match (*a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
}

/// Follow one backend for `tail` until `stop`: report rows, and when it goes down or comes
/// back. Reconnects with backoff.
#[allow(clippy::too_many_arguments)]
pub async fn follow(
    b: BackendConfig,
    sel: Selection,
    retention: Duration,
    filter: Filter,
    start_us: u64,
    discover_every: Duration,
    keys_lag: Duration,
    tx: mpsc::Sender<TailEvent>,
    stop: CancellationToken,
) {
    let mut f = Follower {
        backend: b.name.as_str().into(),
        sel,
        retention,
        filter,
        start_us,
        keys_lag_us: keys_lag.as_micros() as u64,
        streams: HashMap::new(),
        listens: HashMap::new(),
        seen_keys: HashSet::new(),
        first_look: true,
        decoder: EntryDecoder::default(),
        tx,
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = f.run(&b, discover_every) => {}
    }
}

/// A tail's memory of one backend.
struct Follower {
    backend: Arc<str>,
    sel: Selection,
    retention: Duration,
    filter: Filter,
    start_us: u64,
    keys_lag_us: u64,
    /// Stream key → (agent, last ID read).
    streams: HashMap<String, (Arc<str>, String)>,
    /// Stream key → the listen address its first entry names, once looked up.
    listens: HashMap<String, Option<Listen>>,
    /// Keys-schema records already shown, inside the lag window: (agent, ts µs, seq).
    seen_keys: HashSet<(Arc<str>, u64, u64)>,
    /// Whether no discovery has succeeded yet.
    first_look: bool,
    /// Reused for every entry.
    decoder: EntryDecoder,
    tx: mpsc::Sender<TailEvent>,
}

impl Follower {
    async fn run(&mut self, b: &BackendConfig, discover_every: Duration) {
        let mut backoff = Duration::from_millis(200);
        let mut down = false;
        // Since when reads keep being redirected (a reshard or failover in progress).
        let mut redirected_since: Option<tokio::time::Instant> = None;
        loop {
            let err = match connect(b).await {
                Ok(mut conn) => {
                    backoff = Duration::from_millis(200);
                    if down && self.tx.send(TailEvent::Up(b.name.clone())).await.is_err() {
                        return;
                    }
                    let started = tokio::time::Instant::now();
                    match self.follow_conn(&mut conn, discover_every).await {
                        Some(e) => {
                            if started.elapsed() >= REDIRECTS_QUIET {
                                redirected_since = None;
                            }
                            e
                        }
                        None => return, // nobody listens any more
                    }
                }
                Err(e) => e,
            };
            // A redirect is the cluster moving slots, not an outage: reconnect (reading the
            // topology again) without a word, unless redirects go on for long.
            if err.is_redirect() {
                let since = *redirected_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() < REDIRECTS_QUIET {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            down = true;
            let ev = TailEvent::Down(Failure {
                backend: b.name.clone(),
                url: b.redacted_url(),
                error: err.to_string(),
            });
            if self.tx.send(ev).await.is_err() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Follow over one connection: `Some(error)` when it fails, `None` when the receiver is gone.
    async fn follow_conn(
        &mut self,
        conn: &mut Conn,
        discover_every: Duration,
    ) -> Option<BackendError> {
        let mut last_discover: Option<tokio::time::Instant> = None;
        let progress = Progress::default();
        loop {
            if last_discover.is_none_or(|t| t.elapsed() >= discover_every) {
                last_discover = Some(tokio::time::Instant::now());
                // The first look shows every key since the start; later ones only keys at
                // most `keys_lag` old (older ones were seen, or arrived too late to follow).
                let floor = if self.first_look {
                    self.start_us
                } else {
                    self.start_us.max(now_us().saturating_sub(self.keys_lag_us))
                };
                let window = Window {
                    from_us: floor,
                    to_us: u64::MAX,
                };
                let mut h = match discover(conn, &self.sel, Some(window), &progress).await {
                    Ok(h) => h,
                    Err(e) => return Some(e),
                };
                // From the start of the capture second of `--since`, not its millisecond: a
                // packed entry's ID is not its records' times (rows are cut at `start_us` when
                // sent), and every entry of a second's bucket has an ID in or after it.
                let start_ms = self.start_us / 1_000_000 * 1000;
                let start_id = format!("{}-{}", start_ms.saturating_sub(1), u64::MAX);
                // Buckets that left the window (expired, or older than the lag) are no longer
                // followed. One still inside it stays followed from its last ID even if this
                // look missed it: on a cluster a key moving between primaries during a reshard
                // can be missed by SCANs of both, and found again later would be read again
                // from the start.
                let found: HashSet<&String> =
                    h.streams.iter().flat_map(|(_, keys)| keys.iter()).collect();
                let keep = |k: &String| {
                    found.contains(k)
                        || bucket_second(k)
                            .is_some_and(|s| (s + 1).saturating_mul(1_000_000) > floor)
                };
                self.streams.retain(|k, _| keep(k));
                self.listens.retain(|k, _| keep(k));
                for (agent, keys) in std::mem::take(&mut h.streams) {
                    for key in keys {
                        self.streams
                            .entry(key)
                            .or_insert_with(|| (agent.clone(), start_id.clone()));
                    }
                }
                self.seen_keys.retain(|k| k.1 >= floor);
                if let Err(e) = self.new_keys(conn, h).await? {
                    return Some(e);
                }
                self.first_look = false;
            }
            if self.streams.is_empty() {
                tokio::time::sleep(discover_every / 2).await;
                continue;
            }
            let replies = match self.read_new(conn).await {
                Ok(v) => v,
                Err(e) => return Some(BackendError::Read(e)),
            };
            let mut rows = Vec::new();
            // The last ID read in each stream, recorded only once its rows are handed on: a
            // read that fails part way (a bucket's listen address lookup meeting a redirect)
            // sends nothing, and the next attempt reads the same entries again.
            let mut read_up_to: Vec<(&str, &str)> = Vec::new();
            for (key, entries_v) in replies.iter().flat_map(xread_streams) {
                let es = entries(entries_v);
                if es.is_empty() {
                    continue;
                }
                let listen = match self.listens.get(key) {
                    Some(l) => *l,
                    None => match bucket_listen(conn, key).await {
                        Ok(l) => *self.listens.entry(key.to_string()).or_insert(l),
                        Err(e) => return Some(BackendError::Read(e)),
                    },
                };
                let Some((agent, _)) = self.streams.get(key) else {
                    continue;
                };
                if let Some((id, _)) = es.last() {
                    read_up_to.push((key, id));
                }
                for (id, f) in es {
                    let r = self.decoder.decode(id, f, listen, |i| {
                        rows.push(row_of(i, &self.backend, agent));
                    });
                    if let Err(Skipped::Packed(e)) = r {
                        // A tail has no end to report at: say it as it happens.
                        eprintln!(
                            "redtap: a packed entry ({key} {id}) could not be read and its \
                             records are missing: {e}; a newer redtap may read it"
                        );
                    }
                }
            }
            if !self.send_rows(rows).await {
                return None;
            }
            for (key, id) in read_up_to {
                if let Some((_, last)) = self.streams.get_mut(key) {
                    *last = id.to_string();
                }
            }
        }
    }

    /// The entries after the last ID seen in every followed stream: one `XREAD` answer per
    /// group of streams read together.
    ///
    /// One server: a single `XREAD BLOCK` naming every stream, which returns as soon as any
    /// has something new.
    ///
    /// A cluster: one `XREAD` per hash slot (a cluster refuses a command whose keys lie in
    /// several slots, even on one node — and an agent's stripes are in different slots), all
    /// sent as one pipeline, which [`crate::connect::cluster`] splits by primary and sends to
    /// every primary at once. They do not block: Redis answers one client's commands in
    /// order, so several `BLOCK`s on one primary's connection would wait one after the other,
    /// and a quiet stripe would hold back a busy one by the block time. When nothing was new
    /// anywhere, it sleeps [`TAIL_POLL_MS`] before returning, so a quiet cluster costs each
    /// primary a few small reads a second and a new row waits at most that long. A redirect
    /// (`MOVED`/`ASK`) or any other error answer fails the whole read: the tail reconnects
    /// (reading the topology again; a redirect quietly, see [`REDIRECTS_QUIET`], anything else
    /// reported as the backend down) and goes on from the same IDs.
    async fn read_new(&self, conn: &mut Conn) -> Result<Vec<Value>, redis::RedisError> {
        let mut groups: BTreeMap<u16, Vec<&String>> = BTreeMap::new();
        for k in self.streams.keys() {
            let slot = match conn {
                Conn::Single(_) => 0,
                Conn::Cluster(_) => hash_slot(k.as_bytes()),
            };
            groups.entry(slot).or_default().push(k);
        }
        let xread = |keys: &[&String], block: Option<u64>| {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(PAGE);
            if let Some(ms) = block {
                cmd.arg("BLOCK").arg(ms);
            }
            cmd.arg("STREAMS");
            for k in keys {
                cmd.arg(*k);
            }
            for k in keys {
                cmd.arg(&self.streams[*k].1);
            }
            cmd
        };
        if let Conn::Single(_) = conn {
            let keys: Vec<&String> = groups.into_values().flatten().collect();
            let reply: Value = xread(&keys, Some(TAIL_BLOCK_MS)).query_async(conn).await?;
            return Ok(vec![reply]);
        }
        let mut pipe = redis::pipe();
        for keys in groups.values() {
            pipe.add_command(xread(keys, None));
        }
        let replies = conn
            .req_packed_commands(&pipe, 0, pipe.len())
            .await?
            .into_iter()
            .map(Value::extract_error)
            .collect::<Result<Vec<Value>, _>>()?;
        if replies.iter().all(|r| xread_streams(r).is_empty()) {
            tokio::time::sleep(Duration::from_millis(TAIL_POLL_MS)).await;
        }
        Ok(replies)
    }

    /// Fetch and send keys-schema records not shown yet. Outer `None`: the receiver is gone.
    async fn new_keys(&mut self, conn: &mut Conn, h: Holdings) -> Option<Result<(), BackendError>> {
        let mut fresh: Vec<KeyName> = h
            .keys
            .into_iter()
            .filter(|k| {
                let agent = &h.key_agents[k.agent as usize];
                !self.seen_keys.contains(&(agent.clone(), k.ts_us, k.seq))
            })
            .collect();
        fresh.sort_unstable();
        for page in fresh.chunks(PAGE) {
            let names: Vec<String> = page
                .iter()
                .map(|k| {
                    format!(
                        "{}:ev:{}:{}:{}",
                        self.sel.prefix, h.key_agents[k.agent as usize], k.ts_us, k.seq
                    )
                })
                .collect();
            let values = match get_many(conn, &names).await {
                Ok(v) => v,
                Err(e) => return Some(Err(BackendError::Read(e))),
            };
            let mut rows = Vec::new();
            for (k, v) in page.iter().zip(values) {
                let agent = &h.key_agents[k.agent as usize];
                self.seen_keys.insert((agent.clone(), k.ts_us, k.seq));
                if let Some(r) = v.and_then(|v| row_from_json(&v, &self.backend, agent)) {
                    rows.push(r);
                }
            }
            if !self.send_rows(rows).await {
                return None;
            }
        }
        Some(Ok(()))
    }

    /// Filter, order and send; `false` when the receiver is gone.
    async fn send_rows(&self, mut rows: Vec<Row>) -> bool {
        let floor = retention_floor_us(self.retention, now_us()).max(self.start_us);
        rows.retain(|r| r.ts_us >= floor && self.filter.matches(r));
        if rows.is_empty() {
            return true;
        }
        rows.sort_by(|a, b| a.ts_us.cmp(&b.ts_us).then_with(|| a.agent.cmp(&b.agent)));
        self.tx.send(TailEvent::Rows(rows)).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::layout::keys::parse_key_rest;

    #[test]
    fn key_names_parse() {
        assert_eq!(
            parse_key_rest("agent-1:1700000000000123:4"),
            Some(("agent-1", 1_700_000_000_000_123, 4))
        );
        assert_eq!(parse_key_rest("a:b:1:2"), None);
        assert_eq!(parse_key_rest(":1:2"), None);
        assert_eq!(parse_key_rest("a:x:2"), None);
    }

    #[test]
    fn bucket_names_parse() {
        assert_eq!(
            parse_bucket_rest("{web-1}:1700000000"),
            Some(("web-1", 1_700_000_000))
        );
        assert_eq!(parse_bucket_rest("web-1"), None);
        assert_eq!(parse_bucket_rest("{a}:x"), None);
        assert_eq!(parse_bucket_rest("{}:1"), None);
    }

    #[test]
    fn glob_is_escaped() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn both_record_kinds_parse() {
        let b: Arc<str> = "A".into();
        let a: Arc<str> = "x".into();
        let r = row_from_json(
            br#"{"src":"10.0.0.1","dst":"10.0.0.2","sport":5,"dport":80,"ts":7,"kind":"PA","len":1460}"#,
            &b,
            &a,
        )
        .unwrap();
        assert_eq!((&*r.kind, r.len), ("PA", Some(1460)));
        let fields = Value::Array(
            [
                "src", "::1", "dst", "::1", "sport", "1", "dport", "2", "ts", "3", "kind", "conn",
            ]
            .iter()
            .map(|s| Value::BulkString(s.as_bytes().to_vec()))
            .collect(),
        );
        let i = EntryDecoder::default().items("3-0", &fields, None).unwrap();
        let r = row_of(i[0].clone(), &b, &a);
        assert_eq!((&*r.kind, r.len, r.ts_us), ("conn", None, 3));
    }
}
