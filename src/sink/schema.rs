//! The Redis data layouts (documented for users in docs/redis-schema.md — keep the two in step).
//!
//! Owns key names, entry IDs, bucket expiries, the commands that store and read back records,
//! and how their answers read ([`Answer`]). It builds commands only; it never talks to Redis.

use std::fmt::Write as _;

use redis::Pipeline;

use crate::config::Schema;
use crate::record::{Kind, Record};

/// Where a record goes inside one backend: a stream entry ID, or a key name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    /// Stream: entry ID milliseconds. Keys: capture time in µs.
    pub major: u64,
    /// Sequence within `major`.
    pub seq: u64,
}

/// Names and commands for one agent's records in one backend.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Which layout.
    pub schema: Schema,
    /// Stream schema: the bucket key prefix up to the capture second,
    /// `<prefix>:events:{<agent>}:`. Keys schema: the key-name prefix up to the timestamp.
    pub key: String,
    /// `<prefix>:probe:<agent>`: written (with a 2 s expiry) to test a down backend, since a
    /// Redis that refuses writes (OOM, read-only) still answers PING.
    pub probe_key: String,
    /// Retention in milliseconds.
    pub retention_ms: u64,
    /// The last slot handed out; slots only grow, so a retried write reuses its slot and a new
    /// record never takes an old one.
    last: Slot,
}

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

/// The key-name prefix of an agent in the keys schema: `<prefix>:ev:<agent>:`.
pub fn keys_prefix(prefix: &str, agent: &str) -> String {
    format!("{prefix}:ev:{agent}:")
}

/// The bucket (capture second, Unix time) a record goes to.
pub fn bucket_of(rec: &Record) -> u64 {
    rec.ts_us / 1_000_000
}

/// When a bucket's key expires: the end of its second plus retention, so no record in it
/// outlives its capture + retention by more than one second, and none goes before.
pub fn bucket_expire_at_ms(bucket: u64, retention_ms: u64) -> u64 {
    (bucket + 1) * 1000 + retention_ms
}

/// What a command of the writer's pipeline asks Redis, as far as its answer is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Store a record (XADD, the bucket-creating script, or SET … NX).
    Store,
    /// What is stored at this slot? (`XRANGE key id id`; keys schema: `GET key`)
    Check,
    /// The newest entry of a bucket (`XREVRANGE key + - COUNT 1`).
    Top,
}

/// Redis's answer to one command, reduced to what the exactly-once rules need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Stored (an entry ID, or `OK`).
    Done,
    /// A nil: XADD NOMKSTREAM found no key; SET … NX found the key taken.
    Nil,
    /// XADD refused the ID as not above the stream's top.
    NotAbove,
    /// Any other error reply (OOM, READONLY, LOADING, MISCONF, …): nothing was written.
    Refused(String),
    /// A check's answer: the capture time (µs) and source port of the entry at that ID, if
    /// there is one — so an entry of someone else (an earlier run) at the same ID is told apart.
    Found(Option<(u64, u16)>),
    /// A top's answer: the newest entry's ID, if any.
    Top(Option<Slot>),
}

/// The error XADD gives for an ID at or below the stream's top.
const XADD_NOT_ABOVE: &str = "equal or smaller than the target stream top item";

impl Answer {
    /// Read Redis's reply `v` to a command asking `ask`.
    pub fn from_value(ask: Ask, v: &redis::Value) -> Answer {
        use redis::Value;
        if let Value::ServerError(e) = v {
            return if e.details().is_some_and(|d| d.contains(XADD_NOT_ABOVE)) {
                Answer::NotAbove
            } else {
                // `OOM command not allowed…`: the code first, as Redis wrote it, so the cause
                // can be read from it (`health::Cause::from_reply`).
                Answer::Refused(match e.details() {
                    Some(d) => format!("{} {d}", e.code()),
                    None => e.code().to_string(),
                })
            };
        }
        match ask {
            Ask::Store => match v {
                Value::Nil => Answer::Nil,
                _ => Answer::Done,
            },
            Ask::Check => Answer::Found(match v {
                // Keys schema: GET → the JSON value.
                Value::BulkString(json) => Some(json_ts_sport(json)),
                Value::Nil => None,
                _ => entry_ts_sport(v),
            }),
            Ask::Top => Answer::Top(newest_stream_id(v)),
        }
    }
}

/// The `ts` and `sport` of a keys-schema value; (0, 0), which matches no record, if it is not
/// one of ours.
fn json_ts_sport(json: &[u8]) -> (u64, u16) {
    #[derive(serde::Deserialize)]
    struct TsSport {
        ts: u64,
        sport: u16,
    }
    serde_json::from_slice::<TsSport>(json)
        .map(|v| (v.ts, v.sport))
        .unwrap_or((0, 0))
}

/// A Redis string reply as text (RESP2 bulk or RESP3 simple string).
pub fn text(v: &redis::Value) -> Option<&str> {
    match v {
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok(),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// A stream entry's fields as (name, value) pairs, from a flat array (RESP2) or a map (RESP3);
/// `None` if it is neither. Fields that are not text are skipped.
pub fn entry_fields(fields: &redis::Value) -> Option<Vec<(&str, &str)>> {
    use redis::Value;
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

/// The `ts` and `sport` fields of the first entry of an XRANGE answer.
fn entry_ts_sport(v: &redis::Value) -> Option<(u64, u16)> {
    use redis::Value;
    let Value::Array(entries) = v else {
        return None;
    };
    let Value::Array(entry) = entries.first()? else {
        return None;
    };
    let pairs = entry_fields(entry.get(1)?)?;
    let field = |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    // An entry without these fields is not one of ours: (0, 0) matches no record.
    Some((
        field("ts").and_then(|t| t.parse().ok()).unwrap_or(0),
        field("sport").and_then(|p| p.parse().ok()).unwrap_or(0),
    ))
}

/// The ID of the single entry in an `XREVRANGE … COUNT 1` answer.
fn newest_stream_id(v: &redis::Value) -> Option<Slot> {
    use redis::Value;
    let Value::Array(entries) = v else {
        return None;
    };
    let Value::Array(entry) = entries.first()? else {
        return None;
    };
    match entry.first()? {
        Value::BulkString(id) => parse_stream_id(std::str::from_utf8(id).ok()?),
        Value::SimpleString(id) => parse_stream_id(id),
        _ => None,
    }
}

impl Layout {
    /// The layout for `agent` under `prefix`.
    pub fn new(schema: Schema, prefix: &str, agent: &str, retention_ms: u64) -> Self {
        let key = match schema {
            Schema::Stream => bucket_prefix(prefix, agent),
            Schema::Keys => keys_prefix(prefix, agent),
        };
        Layout {
            schema,
            key,
            probe_key: format!("{prefix}:probe:{agent}"),
            retention_ms,
            last: Slot { major: 0, seq: 0 },
        }
    }

    /// Continue numbering after `slot` (e.g. the newest entry already in a bucket).
    pub fn resume_after(&mut self, slot: Slot) {
        if slot > self.last {
            self.last = slot;
        }
    }

    /// The next slot for `rec`: its capture millisecond (stream) or µs (keys), or — if the clock
    /// went back or several records share it — the last slot's time with the next sequence.
    pub fn next_slot(&mut self, rec: &Record) -> Slot {
        let major = match self.schema {
            Schema::Stream => rec.ts_ms(),
            Schema::Keys => rec.ts_us,
        };
        let slot = if major > self.last.major {
            Slot { major, seq: 0 }
        } else {
            match self.last.seq.checked_add(1) {
                Some(seq) => Slot {
                    major: self.last.major,
                    seq,
                },
                // A top at the last sequence (anyone may XADD `ms-18446744073709551615`): the
                // next millisecond, where IDs still grow.
                None => Slot {
                    major: self.last.major.saturating_add(1),
                    seq: 0,
                },
            }
        };
        self.last = slot;
        slot
    }

    /// The key of bucket `bucket` (stream schema).
    pub fn bucket_key(&self, bucket: u64) -> String {
        let mut key = String::with_capacity(self.key.len() + 12);
        let _ = write!(key, "{}{bucket}", self.key);
        key
    }

    /// Queue the command that stores `rec` at `slot`. Stream schema: `create` sends the
    /// bucket-creating script ([`CREATE_BUCKET_LUA`]), else `XADD … NOMKSTREAM`, which never
    /// makes a key without an expiry (a nil answer: the bucket is missing). A second copy at the
    /// same slot is never stored: XADD refuses an ID not above the stream's top, and SET … NX
    /// keeps the first value.
    pub fn push_store(&self, pipe: &mut Pipeline, rec: &Record, slot: Slot, create: bool) {
        // Formatted on the stack: this runs once per record, and heap strings were the largest
        // cost of building a batch (see BENCHMARKS.md).
        let mut src = StackBuf::new();
        let mut dst = StackBuf::new();
        let _ = write!(src, "{}", rec.src.ip());
        let _ = write!(dst, "{}", rec.dst.ip());
        let mut flags = StackBuf::new();
        let kind: &str = match rec.kind {
            Kind::Conn => "conn",
            Kind::Segment { flags: f, .. } => {
                crate::record::write_flags(&mut flags, f);
                flags.as_str()
            }
        };
        match self.schema {
            Schema::Stream => {
                let mut id = StackBuf::new();
                let _ = write!(id, "{}-{}", slot.major, slot.seq);
                let bucket = bucket_of(rec);
                // Sized up front: one allocation per command instead of a string of reallocs.
                let mut cmd = redis::Cmd::with_capacity(20, self.key.len() + 160);
                if create {
                    cmd.arg("EVAL")
                        .arg(CREATE_BUCKET_LUA)
                        .arg(1)
                        .arg(self.bucket_key(bucket))
                        .arg(bucket_expire_at_ms(bucket, self.retention_ms));
                } else {
                    cmd.arg("XADD")
                        .arg(self.bucket_key(bucket))
                        .arg("NOMKSTREAM");
                }
                cmd.arg(id.as_str())
                    .arg("src")
                    .arg(src.as_str())
                    .arg("dst")
                    .arg(dst.as_str())
                    .arg("sport")
                    .arg(rec.src.port())
                    .arg("dport")
                    .arg(rec.dst.port())
                    .arg("ts")
                    .arg(rec.ts_us)
                    .arg("kind")
                    .arg(kind);
                if let Kind::Segment { len, .. } = rec.kind {
                    cmd.arg("len").arg(len);
                }
                pipe.add_command(cmd);
            }
            Schema::Keys => {
                let mut value = String::with_capacity(128);
                let _ = write!(
                    value,
                    r#"{{"src":"{}","dst":"{}","sport":{},"dport":{},"ts":{},"kind":"{kind}""#,
                    src.as_str(),
                    dst.as_str(),
                    rec.src.port(),
                    rec.dst.port(),
                    rec.ts_us,
                );
                if let Kind::Segment { len, .. } = rec.kind {
                    let _ = write!(value, r#","len":{len}"#);
                }
                value.push('}');
                pipe.cmd("SET")
                    .arg(self.key_name(slot))
                    .arg(value)
                    .arg("PXAT")
                    .arg(self.expire_at_ms(rec))
                    .arg("NX");
            }
        }
    }

    /// The key name of `slot` (keys schema).
    pub fn key_name(&self, slot: Slot) -> String {
        let mut key = String::with_capacity(self.key.len() + 24);
        let _ = write!(key, "{}{}:{}", self.key, slot.major, slot.seq);
        key
    }

    /// Queue a read of what is stored at `rec`'s `slot`: `XRANGE key id id` (stream schema),
    /// `GET key` (keys schema).
    pub fn push_check(&self, pipe: &mut Pipeline, rec: &Record, slot: Slot) {
        match self.schema {
            Schema::Stream => {
                let id = format!("{}-{}", slot.major, slot.seq);
                pipe.cmd("XRANGE")
                    .arg(self.bucket_key(bucket_of(rec)))
                    .arg(&id)
                    .arg(&id);
            }
            Schema::Keys => {
                pipe.cmd("GET").arg(self.key_name(slot));
            }
        }
    }

    /// Queue a read of bucket `bucket`'s newest entry (stream schema).
    pub fn push_top(&self, pipe: &mut Pipeline, bucket: u64) {
        pipe.cmd("XREVRANGE")
            .arg(self.bucket_key(bucket))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
    }

    /// When `rec` must stop being readable, in ms since the epoch.
    pub fn expire_at_ms(&self, rec: &Record) -> u64 {
        rec.ts_ms() + self.retention_ms
    }

    /// Whether `rec` is already past retention at `now_ms`.
    pub fn is_expired(&self, rec: &Record, now_ms: u64) -> bool {
        now_ms >= self.expire_at_ms(rec)
    }
}

/// A small string formatted on the stack (IP addresses, IDs, flags: at most 64 bytes).
pub struct StackBuf {
    buf: [u8; 64],
    len: usize,
}

impl StackBuf {
    /// Empty.
    pub fn new() -> Self {
        StackBuf {
            buf: [0; 64],
            len: 0,
        }
    }

    /// The text written so far.
    pub fn as_str(&self) -> &str {
        // Only `write_str` fills the buffer, and it copies whole `&str`s.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl Default for StackBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(std::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Parse a stream entry ID `ms-seq`.
pub fn parse_stream_id(id: &str) -> Option<Slot> {
    let (ms, seq) = id.split_once('-')?;
    Some(Slot {
        major: ms.parse().ok()?,
        seq: seq.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ts_us: u64) -> Record {
        Record {
            ts_us,
            src: "10.0.0.1:5000".parse().unwrap(),
            dst: "10.0.0.2:9000".parse().unwrap(),
            kind: Kind::Conn,
        }
    }

    #[test]
    fn a_top_at_the_last_sequence_moves_to_the_next_millisecond() {
        let mut l = Layout::new(Schema::Stream, "redtap", "a", 1000);
        l.resume_after(Slot {
            major: 9000,
            seq: u64::MAX,
        });
        assert_eq!(
            l.next_slot(&rec(5_000_000)),
            Slot {
                major: 9001,
                seq: 0
            }
        );
    }

    #[test]
    fn slots_grow_even_when_the_clock_goes_back() {
        let mut l = Layout::new(Schema::Stream, "redtap", "a", 1000);
        assert_eq!(
            l.next_slot(&rec(5_000_000)),
            Slot {
                major: 5000,
                seq: 0
            }
        );
        assert_eq!(
            l.next_slot(&rec(5_000_900)),
            Slot {
                major: 5000,
                seq: 1
            }
        );
        assert_eq!(
            l.next_slot(&rec(4_000_000)),
            Slot {
                major: 5000,
                seq: 2
            }
        );
        assert_eq!(
            l.next_slot(&rec(6_000_000)),
            Slot {
                major: 6000,
                seq: 0
            }
        );
        l.resume_after(Slot {
            major: 9000,
            seq: 4,
        });
        assert_eq!(
            l.next_slot(&rec(6_000_000)),
            Slot {
                major: 9000,
                seq: 5
            }
        );
    }

    fn answer(ask: Ask, resp: &str) -> Answer {
        Answer::from_value(ask, &redis::parse_redis_value(resp.as_bytes()).unwrap())
    }

    #[test]
    fn replies_read_as_the_exactly_once_rules_need() {
        assert_eq!(answer(Ask::Store, "$5\r\n5-0-0\r\n"), Answer::Done);
        assert_eq!(answer(Ask::Store, "+OK\r\n"), Answer::Done);
        assert_eq!(answer(Ask::Store, "$-1\r\n"), Answer::Nil);
        // As the bucket-creating script returns it.
        let not_above = "-ERR The ID specified in XADD is equal or smaller than the target \
                         stream top item script: 27b3, on @user_script:1.\r\n";
        assert_eq!(answer(Ask::Store, not_above), Answer::NotAbove);
        for e in [
            "OOM command not allowed",
            "READONLY You can't write",
            "LOADING",
            "MISCONF",
        ] {
            assert!(matches!(
                answer(Ask::Store, &format!("-{e}\r\n")),
                Answer::Refused(_)
            ));
        }
        let entry = "*1\r\n*2\r\n$5\r\n9-0-0\r\n*4\r\n$5\r\nsport\r\n$4\r\n5000\r\n\
                     $2\r\nts\r\n$7\r\n1234567\r\n";
        assert_eq!(
            answer(Ask::Check, entry),
            Answer::Found(Some((1_234_567, 5000)))
        );
        assert_eq!(answer(Ask::Check, "*0\r\n"), Answer::Found(None));
        let json = r#"{"src":"::1","dst":"::1","sport":7,"dport":9,"ts":42,"kind":"conn"}"#;
        let get = format!("${}\r\n{json}\r\n", json.len());
        assert_eq!(answer(Ask::Check, &get), Answer::Found(Some((42, 7))));
        assert_eq!(answer(Ask::Check, "$-1\r\n"), Answer::Found(None));
        let top = "*1\r\n*2\r\n$6\r\n1700-3\r\n*0\r\n";
        assert_eq!(
            answer(Ask::Top, top),
            Answer::Top(Some(Slot {
                major: 1700,
                seq: 3
            }))
        );
        assert_eq!(answer(Ask::Top, "*0\r\n"), Answer::Top(None));
    }

    #[test]
    fn buckets_expire_a_second_at_most_after_their_records() {
        let l = Layout::new(Schema::Stream, "p", "a", 3000);
        for ts_us in [5_000_000, 5_000_001, 5_999_999] {
            let r = rec(ts_us);
            let exp = bucket_expire_at_ms(bucket_of(&r), l.retention_ms);
            assert!(exp >= l.expire_at_ms(&r) && exp <= r.ts_ms() + 3000 + 1000);
        }
        assert_eq!(l.bucket_key(5), "p:events:{a}:5");
    }

    #[test]
    fn stream_ids_parse() {
        assert_eq!(
            parse_stream_id("1700000000000-3"),
            Some(Slot {
                major: 1_700_000_000_000,
                seq: 3
            })
        );
        assert_eq!(parse_stream_id("junk"), None);
    }
}
