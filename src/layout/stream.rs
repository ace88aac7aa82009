//! The stream layout (`schema = stream`): one Redis Stream per agent and capture second,
//! `<prefix>:events:{<agent>}:<unix second>`, created together with its fixed expiry.
//!
//! Owns the bucket key names, the commands that store a record (the bucket-creating script or
//! `XADD … NOMKSTREAM`), read one back and read a bucket's top, and the parsing of what XRANGE,
//! XREVRANGE and XREAD return into [`Decoded`] records. It never talks to Redis.
//!
//! An entry holds only what its bucket and ID do not already say (docs/redis-schema.md):
//! `src`, `sport`, `us` (capture µs minus the ID's ms × 1000: the sub-millisecond part), for a
//! TCP segment `flags` (the flags byte in decimal: letters cost 2.5 B more a record) and `len`
//! (neither: an accepted connection), and `dst`
//! `dport` only when they differ from the agent's listen address. The entries that may create
//! a bucket (the bucket-creating script's) carry that address as `listen`, so a bucket's first
//! entry always does. Entries of earlier versions (`src dst sport dport ts kind [len]`, each
//! complete) still read.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use redis::{Pipeline, Value};

use super::{bucket_expire_at_ms, text, Bucket, Decoded, Layout, Slot, StackBuf};
use crate::record::{Kind, Record};

/// Creates a bucket stream and fixes its expiry in one atomic step, so that a bucket key never
/// exists without its expiry even if redtap dies between two commands. `KEYS[1]` the bucket,
/// `ARGV[1]` its expiry (ms since the epoch), `ARGV[2]` the entry ID, then the fields. An XADD
/// error (ID not above the top, OOM) aborts the script before anything is written.
pub const CREATE_BUCKET_LUA: &str = "local id = redis.call('XADD', KEYS[1], unpack(ARGV, 2)) \
redis.call('PEXPIREAT', KEYS[1], ARGV[1]) return id";

/// The stream key of an agent in the single-stream layout of earlier versions:
/// `<prefix>:events:<agent>`. Still read by `redtap query`; no longer written.
pub fn stream_key(prefix: &str, agent: &str) -> String {
    format!("{prefix}:events:{agent}")
}

/// The prefix of an agent's bucket streams: `<prefix>:events:{<agent>}:`. The braces are a
/// Redis Cluster hash tag: every bucket of one agent maps to one slot, so a pipeline (which
/// may span a second boundary) stays on one node.
pub fn bucket_prefix(prefix: &str, agent: &str) -> String {
    format!("{prefix}:events:{{{agent}}}:")
}

/// `{<agent>}:<second>` (a bucket stream's key after `<prefix>:events:`) → its parts; on a
/// Redis Cluster the tag is a stripe of the agent's, `{<agent>/<k>}` (`Layout::for_cluster`).
pub fn parse_bucket_rest(rest: &str) -> Option<(&str, u64)> {
    let (agent, sec) = rest.strip_prefix('{')?.rsplit_once("}:")?;
    let agent = match agent.rsplit_once('/') {
        Some((a, k)) if !k.is_empty() && k.bytes().all(|c| c.is_ascii_digit()) => a,
        _ => agent,
    };
    let sec = sec.parse().ok()?;
    (!agent.is_empty() && !agent.contains(':') && !agent.contains('}')).then_some((agent, sec))
}

/// Queue the command that stores `rec` at `slot`: `create` sends the bucket-creating script
/// ([`CREATE_BUCKET_LUA`]), else `XADD … NOMKSTREAM`, which never makes a key without an
/// expiry (a nil answer: the bucket is missing).
pub fn push_store(
    layout: &Layout,
    pipe: &mut Pipeline,
    rec: &Record,
    bucket: Bucket,
    slot: Slot,
    create: bool,
) {
    // Formatted on the stack: this runs once per record, and heap strings were the largest
    // cost of building a batch (see BENCHMARKS.md).
    let mut src = StackBuf::new();
    let _ = write!(src, "{}", rec.src.ip());
    let mut id = StackBuf::new();
    let _ = write!(id, "{}-{}", slot.major, slot.seq);
    // Sized up front: one allocation per command instead of a string of reallocs.
    let mut cmd = redis::Cmd::with_capacity(20, layout.key.len() + 160);
    store_head(&mut cmd, layout, bucket, create);
    // The ID's ms is the capture ms unless the clock went back or the ID was taken: then the
    // offset is what keeps the capture time exact (negative, or 1000 and above).
    let us = rec.ts_us as i64 - (slot.major as i64).wrapping_mul(1000);
    cmd.arg(id.as_str())
        .arg("src")
        .arg(src.as_str())
        .arg("sport")
        .arg(rec.src.port())
        .arg("us")
        .arg(us);
    if let Kind::Segment { flags, len } = rec.kind {
        cmd.arg("flags").arg(flags).arg("len").arg(len);
    }
    if layout.listen != Some(rec.dst) {
        let mut dst = StackBuf::new();
        let _ = write!(dst, "{}", rec.dst.ip());
        cmd.arg("dst")
            .arg(dst.as_str())
            .arg("dport")
            .arg(rec.dst.port());
    }
    if let (true, Some(listen)) = (create, layout.listen) {
        let mut l = StackBuf::new();
        let _ = write!(l, "{listen}");
        cmd.arg("listen").arg(l.as_str());
    }
    pipe.add_command(cmd);
}

/// Queue `XRANGE key id id`: what is stored at `slot` of `bucket`.
pub fn push_check(layout: &Layout, pipe: &mut Pipeline, bucket: Bucket, slot: Slot) {
    let id = format!("{}-{}", slot.major, slot.seq);
    pipe.cmd("XRANGE")
        .arg(layout.bucket_key(bucket))
        .arg(&id)
        .arg(&id);
}

/// Queue `XREVRANGE key + - COUNT 1`: bucket `bucket`'s newest entry.
pub fn push_top(layout: &Layout, pipe: &mut Pipeline, bucket: Bucket) {
    pipe.cmd("XREVRANGE")
        .arg(layout.bucket_key(bucket))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1);
}

/// Parse a stream entry ID `ms-seq`.
pub fn parse_stream_id(id: &str) -> Option<Slot> {
    let (ms, seq) = id.split_once('-')?;
    Some(Slot {
        major: ms.parse().ok()?,
        seq: seq.parse().ok()?,
    })
}

/// A stream entry's fields as (name, value) pairs, from a flat array (RESP2) or a map (RESP3);
/// `None` if it is neither. Fields that are not text are skipped.
pub fn entry_fields(fields: &Value) -> Option<Vec<(&str, &str)>> {
    Some(match fields {
        Value::Array(flat) => flat
            .chunks_exact(2)
            .filter_map(|p| Some((text(&p[0])?, text(&p[1])?)))
            .collect(),
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
            .collect(),
        _ => return None,
    })
}

/// The entries of an XRANGE / XREVRANGE answer: (ID, field list).
pub fn entries(v: &Value) -> Vec<(&str, &Value)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|e| match e {
            Value::Array(pair) if pair.len() == 2 => Some((text(&pair[0])?, &pair[1])),
            _ => None,
        })
        .collect()
}

/// The (stream key, entries) pairs of an XREAD answer (RESP2 array or RESP3 map).
pub fn xread_streams(v: &Value) -> Vec<(&str, &Value)> {
    match v {
        Value::Array(items) => items
            .iter()
            .filter_map(|s| match s {
                Value::Array(p) if p.len() == 2 => Some((text(&p[0])?, &p[1])),
                _ => None,
            })
            .collect(),
        Value::Map(m) => m.iter().filter_map(|(k, e)| Some((text(k)?, e))).collect(),
        _ => Vec::new(),
    }
}

/// Where the records of a bucket were sent unless they say otherwise: the agent's listen
/// address.
pub type Listen = SocketAddr;

/// The `listen` an entry carries, if it does (a bucket's first entry does, when the agent
/// listened on a named address).
pub fn listen_of(fields: &Value) -> Option<Listen> {
    let pairs = entry_fields(fields)?;
    pairs.iter().find(|(k, _)| *k == "listen")?.1.parse().ok()
}

/// The listen address of the bucket whose first entry is `first` (the answer to
/// `XRANGE key - + COUNT 1`). A bucket an earlier version created (in the second this version
/// took over) names none: its first entry's own destination stands in, which is the same unless
/// the listen address changed in that very second.
pub fn bucket_listen(first: &Value) -> Option<Listen> {
    let fields = entries(first).first()?.1;
    listen_of(fields).or_else(|| {
        let pairs = entry_fields(fields)?;
        let field = |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        Some(SocketAddr::new(
            field("dst")?.parse().ok()?,
            field("dport")?.parse().ok()?,
        ))
    })
}

/// The capture time (µs) and source port of the entry at `id` with `pairs`: from `ts` (earlier
/// versions) or the ID's ms and `us`.
fn ts_sport(id: &str, pairs: &[(&str, &str)]) -> (Option<u64>, Option<u16>) {
    let (mut ts, mut us, mut sport) = (None, None, None);
    for &(k, v) in pairs {
        match k {
            "ts" => ts = v.parse::<u64>().ok(),
            "us" => us = v.parse::<i64>().ok(),
            "sport" => sport = v.parse::<u16>().ok(),
            _ => {}
        }
    }
    let ts = ts.or_else(|| {
        let ms = parse_stream_id(id)?.major;
        u64::try_from((ms as i128) * 1000 + us? as i128).ok()
    });
    (ts, sport)
}

/// The entry at `id` with `fields`, in a bucket sent to `listen` → the record it holds; `None`
/// if a required field is missing or malformed (not one of ours), or its destination is
/// unknown (neither the entry nor `listen` says it).
pub fn decode(id: &str, fields: &Value, listen: Option<Listen>) -> Option<Decoded> {
    let pairs = entry_fields(fields)?;
    let (ts, sport) = ts_sport(id, &pairs);
    let (mut src, mut dst, mut dport, mut kind, mut len) = (None, None, None, None, None);
    for (k, v) in pairs {
        match k {
            "src" => src = v.parse::<IpAddr>().ok(),
            "dst" => dst = v.parse::<IpAddr>().ok(),
            "dport" => dport = v.parse::<u16>().ok(),
            "kind" => kind = Some(v.to_string()),
            "flags" => kind = Some(crate::record::flags_str(v.parse().ok()?)),
            "len" => len = v.parse::<u32>().ok(),
            _ => {}
        }
    }
    let (dst, dport) = match (dst, dport) {
        (Some(d), Some(p)) => (d, p),
        _ => listen.map(|l| (l.ip(), l.port()))?,
    };
    Some(Decoded {
        ts_us: ts?,
        src: src?,
        sport: sport?,
        dst,
        dport,
        kind: kind.unwrap_or_else(|| "conn".to_string()),
        len,
    })
}

/// The capture time of the entry at `id` with `fields`, if it is one of ours.
pub fn ts_of(id: &str, fields: &Value) -> Option<u64> {
    ts_sport(id, &entry_fields(fields)?).0
}

/// The capture time and source port of the first entry of an XRANGE answer (a read-back).
pub fn check_answer(v: &Value) -> Option<(u64, u16)> {
    let (id, fields) = *entries(v).first()?;
    // A packed entry (one binary field `p`): what identifies it is its first record.
    if let Some(value) = super::packed::value_of(fields) {
        let ms = parse_stream_id(id).map_or(0, |s| s.major);
        let first = super::packed::decode(value, ms)
            .ok()
            .and_then(|d| d.into_iter().next());
        return Some(first.map_or((0, 0), |d| (d.ts_us, d.sport)));
    }
    // An entry without these fields is not one of ours: (0, 0) matches no record.
    let (ts, sport) = entry_fields(fields).map_or((None, None), |p| ts_sport(id, &p));
    Some((ts.unwrap_or(0), sport.unwrap_or(0)))
}

/// The ID of the single entry in an `XREVRANGE … COUNT 1` answer.
pub fn newest_id(v: &Value) -> Option<Slot> {
    parse_stream_id(entries(v).first()?.0)
}

/// The start of a command storing an entry in `bucket`: the script that creates the bucket with
/// its expiry when `create` ([`CREATE_BUCKET_LUA`]), else `XADD key NOMKSTREAM`; the ID and
/// fields follow. Shared by the readable and the packed layout, which use the same buckets.
pub(super) fn store_head(cmd: &mut redis::Cmd, layout: &Layout, bucket: Bucket, create: bool) {
    if create {
        cmd.arg("EVAL")
            .arg(CREATE_BUCKET_LUA)
            .arg(1)
            .arg(layout.bucket_key(bucket))
            .arg(bucket_expire_at_ms(bucket.sec, layout.retention_ms));
    } else {
        cmd.arg("XADD")
            .arg(layout.bucket_key(bucket))
            .arg("NOMKSTREAM");
    }
}
