//! The Redis data layouts, one file each, each both writing and reading its format (documented
//! for users in docs/redis-schema.md — keep the two in step).
//!
//! Owns what every layout shares: the [`Layout`] handle (the dispatch on [`Schema`]), slots and
//! entry IDs, bucket naming and expiry, how the writer's answers read ([`Answer`]) and what a
//! stored record reads back as ([`Decoded`]). [`stream`], [`keys`] and [`packed`] own their
//! commands and the parsing of what Redis returns for them; [`entry`] reads a bucket entry of
//! either kind (readable fields or a [`packed`] batch) for the readers. It builds commands and
//! parses replies; it never talks to Redis (the writer in `sink` and the readers in
//! `query::read` do the I/O).

pub mod entry;
pub mod keys;
pub mod packed;
pub mod stream;

use std::fmt::Write as _;
use std::net::IpAddr;

use redis::Pipeline;

use crate::config::Schema;
use crate::record::Record;

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
    /// The agent's listen address when it names one (not `0.0.0.0` / `[::]`): the destination
    /// of (nearly) every record, which the stream layout then stores once per bucket instead
    /// of once per record ([`Layout::with_listen`]).
    pub listen: Option<std::net::SocketAddr>,
    /// Stream and packed schemas on a Redis Cluster: the bucket key prefixes of the agent's
    /// stripes (`<prefix>:events:{<agent>/<k>}:`, [`crate::connect::cluster::stripe_tags`]),
    /// one per pipeline (the writer picks the least loaded, `sink::backlog`), so the buckets
    /// spread over every primary. `None`: every bucket under `key`.
    stripes: Option<std::sync::Arc<[String]>>,
    /// The last slot handed out; slots only grow, so a retried write reuses its slot and a new
    /// record never takes an old one.
    last: Slot,
}

/// A stored record as the readers see it, whatever the layout (and whichever version wrote it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
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
    /// `conn`, or TCP flags such as `S`, `PA`; an unknown kind is passed through as written.
    pub kind: String,
    /// TCP payload length, for packet records.
    pub len: Option<u32>,
}

impl Decoded {
    /// What `rec` reads back as once stored.
    pub fn of(rec: &Record) -> Decoded {
        Decoded {
            ts_us: rec.ts_us,
            src: rec.src.ip(),
            sport: rec.src.port(),
            dst: rec.dst.ip(),
            dport: rec.dst.port(),
            kind: rec.kind_str().into_owned(),
            len: match rec.kind {
                crate::record::Kind::Conn => None,
                crate::record::Kind::Segment { len, .. } => Some(u32::from(len)),
            },
        }
    }
}

/// The bucket (capture second, Unix time) a record goes to.
pub fn bucket_of(rec: &Record) -> u64 {
    rec.ts_us / 1_000_000
}

/// One bucket stream: a capture second, and on a Redis Cluster the stripe (hash tag) it is
/// written under. One agent's second may then be several streams, one per stripe that a
/// pipeline of that second was given; each is created once with its expiry, and entry IDs
/// grow in each as in one. Stripe 0 is the only one elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bucket {
    /// The capture second (Unix time).
    pub sec: u64,
    /// The stripe; always 0 outside a cluster.
    pub stripe: u8,
}

impl Bucket {
    /// The bucket of `rec` under `stripe`.
    pub fn of(rec: &Record, stripe: u8) -> Bucket {
        Bucket {
            sec: bucket_of(rec),
            stripe,
        }
    }
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
                Value::BulkString(json) => Some(keys::check_answer(json)),
                Value::Nil => None,
                _ => stream::check_answer(v),
            }),
            Ask::Top => Answer::Top(stream::newest_id(v)),
        }
    }
}

/// A Redis string reply as text (RESP2 bulk or RESP3 simple string).
pub fn text(v: &redis::Value) -> Option<&str> {
    match v {
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok(),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

impl Layout {
    /// The layout for `agent` under `prefix`.
    pub fn new(schema: Schema, prefix: &str, agent: &str, retention_ms: u64) -> Self {
        let key = match schema {
            Schema::Stream | Schema::Packed => stream::bucket_prefix(prefix, agent),
            Schema::Keys => keys::keys_prefix(prefix, agent),
        };
        Layout {
            schema,
            key,
            probe_key: format!("{prefix}:probe:{agent}"),
            retention_ms,
            listen: None,
            stripes: None,
            last: Slot { major: 0, seq: 0 },
        }
    }

    /// The same, for a Redis Cluster backend: the stream and packed schemas' buckets spread
    /// over the agent's stripes, one stripe per pipeline. An entry's stripe is fixed when it
    /// is formed, as its slot is, so every resend goes to the same key; the keys schema has no
    /// hash tag: its keys spread by themselves.
    pub fn for_cluster(mut self, prefix: &str, agent: &str) -> Self {
        if self.is_stream() {
            let tags = crate::connect::cluster::stripe_tags(agent);
            self.stripes = Some(
                tags.iter()
                    .map(|t| format!("{prefix}:events:{{{t}}}:"))
                    .collect(),
            );
        }
        self
    }

    /// The same with only `n` (at least one) of the cluster stripes, spread over the slot space:
    /// stripe `(2i + 1) · 16 / 2n` for `i < n`, which becomes stripe `i`. The simulation in
    /// `tests/exactly_once.rs` uses a few, so that its short schedules reuse a stripe's bucket
    /// across pipelines as a long run does with all sixteen.
    #[doc(hidden)]
    pub fn with_stripes(mut self, n: usize) -> Self {
        if let Some(s) = &self.stripes {
            let n = n.clamp(1, s.len());
            self.stripes = Some(
                (0..n)
                    .map(|i| s[(2 * i + 1) * s.len() / (2 * n)].clone())
                    .collect(),
            );
        }
        self
    }

    /// The same, for an agent listening on `listen`: an unspecified address (any of the host's)
    /// is no help, since records then reach several destinations.
    pub fn with_listen(mut self, listen: std::net::SocketAddr) -> Self {
        self.listen = (!listen.ip().is_unspecified()).then_some(listen);
        self
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
            Schema::Stream | Schema::Packed => rec.ts_ms(),
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

    /// How many stripes the buckets rotate over: 1 outside a cluster.
    pub fn stripes(&self) -> usize {
        self.stripes.as_ref().map_or(1, |s| s.len())
    }

    /// The stripe after `stripe` in the writer's order: stride 7 (prime to 16 stripes), so
    /// consecutive pipelines land far apart in the slot space, on different primaries; stride
    /// 1 for a count 7 divides, so the order still visits every stripe. Always 0 outside a
    /// cluster.
    pub fn stripe_after(&self, stripe: u8) -> u8 {
        match &self.stripes {
            Some(s) => {
                let stride = if s.len() % 7 == 0 { 1 } else { 7 };
                ((usize::from(stripe) + stride) % s.len()) as u8
            }
            None => 0,
        }
    }

    /// The key of bucket `bucket` (stream and packed schemas).
    pub fn bucket_key(&self, bucket: Bucket) -> String {
        let head = match &self.stripes {
            Some(s) => &s[usize::from(bucket.stripe) % s.len()],
            None => &self.key,
        };
        let mut key = String::with_capacity(head.len() + 12);
        let _ = write!(key, "{head}{}", bucket.sec);
        key
    }

    /// The key name of `slot` (keys schema).
    pub fn key_name(&self, slot: Slot) -> String {
        let mut key = String::with_capacity(self.key.len() + 24);
        let _ = write!(key, "{}{}:{}", self.key, slot.major, slot.seq);
        key
    }

    /// Whether stores go to bucket streams (stream and packed layouts), with their rules for
    /// XADD's answers, rather than to NX keys.
    pub fn is_stream(&self) -> bool {
        self.schema != Schema::Keys
    }

    /// Queue the command that stores the entry `recs` (one record, except in the packed
    /// layout) at `slot` of the bucket of its stripe `stripe` ([`stream::push_store`],
    /// [`keys::push_store`], [`packed::push_store`] with `value`, the entry's encoding by
    /// [`Layout::pack`]). `create`: the bucket stream's first entry in this pipeline. A second
    /// copy at the same slot is never stored: XADD refuses an ID not above the stream's top,
    /// and SET … NX keeps the first value.
    pub fn push_store(
        &self,
        pipe: &mut Pipeline,
        recs: &[Record],
        value: &[u8],
        slot: Slot,
        stripe: u8,
        create: bool,
    ) {
        let bucket = Bucket::of(&recs[0], stripe);
        match self.schema {
            Schema::Stream => stream::push_store(self, pipe, &recs[0], bucket, slot, create),
            Schema::Keys => keys::push_store(self, pipe, &recs[0], slot),
            Schema::Packed => packed::push_store(self, pipe, bucket, value, slot, create),
        }
    }

    /// The value of a packed entry of `recs` at `slot` (empty in the other layouts, whose
    /// commands are built from the record itself).
    pub fn pack(&self, recs: &[Record], slot: Slot) -> Vec<u8> {
        match self.schema {
            Schema::Packed => packed::encode(recs, slot.major, self.listen),
            Schema::Stream | Schema::Keys => Vec::new(),
        }
    }

    /// Queue a read of what is stored at `rec`'s `slot` (in its stripe's bucket): `XRANGE key
    /// id id` (stream schema), `GET key` (keys schema).
    pub fn push_check(&self, pipe: &mut Pipeline, rec: &Record, slot: Slot, stripe: u8) {
        match self.schema {
            Schema::Stream | Schema::Packed => {
                stream::push_check(self, pipe, Bucket::of(rec, stripe), slot)
            }
            Schema::Keys => {
                pipe.cmd("GET").arg(self.key_name(slot));
            }
        }
    }

    /// Queue a read of bucket `bucket`'s newest entry (stream schema).
    pub fn push_top(&self, pipe: &mut Pipeline, bucket: Bucket) {
        stream::push_top(self, pipe, bucket)
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

/// The kind text of `rec` (`conn`, or the TCP flag letters) formatted into `buf`.
fn kind_text<'a>(rec: &Record, buf: &'a mut StackBuf) -> &'a str {
    match rec.kind {
        crate::record::Kind::Conn => "conn",
        crate::record::Kind::Segment { flags, .. } => {
            crate::record::write_flags(buf, flags);
            buf.as_str()
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::record::Kind;

    fn rec(ts_us: u64) -> Record {
        Record {
            ts_us,
            src: "10.0.0.1:5000".parse().unwrap(),
            dst: "10.0.0.2:9000".parse().unwrap(),
            kind: Kind::Conn,
        }
    }

    /// Records of both families and every kind, with and without a payload length.
    pub(crate) fn samples() -> Vec<Record> {
        let mut out = Vec::new();
        let pairs = [
            ("10.0.0.1:5000", "10.0.0.2:9000"),
            ("[2001:db8::7]:65535", "[2001:db8::1]:443"),
            ("[::ffff:10.1.2.3]:1", "127.0.0.1:80"),
        ];
        let kinds = [
            Kind::Conn,
            Kind::Segment {
                flags: 0x02,
                len: 0,
            },
            Kind::Segment {
                flags: 0x18,
                len: 1460,
            },
            Kind::Segment {
                flags: 0x00,
                len: u16::MAX,
            },
            Kind::Segment {
                flags: 0xff,
                len: 1,
            },
        ];
        let mut ts_us = 1_700_000_000_123_456;
        for (src, dst) in pairs {
            for kind in kinds {
                out.push(Record {
                    ts_us,
                    src: src.parse().unwrap(),
                    dst: dst.parse().unwrap(),
                    kind,
                });
                ts_us += 333_331;
            }
        }
        out
    }

    /// The arguments of every command in `pipe`.
    pub(crate) fn args(pipe: &Pipeline) -> Vec<Vec<Vec<u8>>> {
        pipe.cmd_iter()
            .map(|c| {
                c.args_iter()
                    .map(|a| match a {
                        redis::Arg::Simple(b) => b.to_vec(),
                        redis::Arg::Cursor => b"0".to_vec(),
                    })
                    .collect()
            })
            .collect()
    }

    fn bulk(b: &[u8]) -> redis::Value {
        redis::Value::BulkString(b.to_vec())
    }

    /// Store `recs` with `schema` as the writer would (a slot each, the first of a bucket
    /// creating it), then decode what the commands would leave in Redis.
    fn round_trip(mut l: Layout, recs: &[Record]) -> Vec<Decoded> {
        let mut listen = None;
        let mut pipe = Pipeline::new();
        let mut created = Vec::new();
        for r in recs {
            let slot = l.next_slot(r);
            let create = !created.contains(&bucket_of(r));
            created.push(bucket_of(r));
            l.push_store(&mut pipe, std::slice::from_ref(r), &[], slot, 0, create);
        }
        args(&pipe)
            .into_iter()
            .map(|a| match a[0].as_slice() {
                b"EVAL" | b"XADD" => {
                    let at = if a[0] == b"EVAL" { 5 } else { 3 };
                    let id = std::str::from_utf8(&a[at]).unwrap();
                    let fields = redis::Value::Array(a[at + 1..].iter().map(|f| bulk(f)).collect());
                    // A bucket's creating entries carry the listen address for the others.
                    if let Some(l) = stream::listen_of(&fields) {
                        listen = Some(l);
                    }
                    let d = stream::decode(id, &fields, listen).expect("a stream entry decodes");
                    // A read-back sees the same capture time and source port.
                    let one = redis::Value::Array(vec![redis::Value::Array(vec![
                        bulk(id.as_bytes()),
                        fields,
                    ])]);
                    assert_eq!(stream::check_answer(&one), Some((d.ts_us, d.sport)));
                    d
                }
                b"SET" => {
                    let d = keys::decode(&a[2]).expect("a key value decodes");
                    assert_eq!(keys::check_answer(&a[2]), (d.ts_us, d.sport));
                    d
                }
                other => panic!("unexpected command {}", String::from_utf8_lossy(other)),
            })
            .collect()
    }

    #[test]
    fn every_layout_reads_back_what_it_wrote() {
        let recs = samples();
        let want: Vec<Decoded> = recs.iter().map(Decoded::of).collect();
        for schema in [Schema::Stream, Schema::Keys] {
            let l = Layout::new(schema, "rt", "agent-1", 60_000);
            assert_eq!(round_trip(l.clone(), &recs), want, "{schema:?}");
            // Listening on the address most records reach: those store no destination.
            let l = l.with_listen("10.0.0.2:9000".parse().unwrap());
            assert_eq!(
                round_trip(l, &recs),
                want,
                "{schema:?} with a listen address"
            );
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
        assert_eq!(l.bucket_key(Bucket { sec: 5, stripe: 0 }), "p:events:{a}:5");
    }

    #[test]
    fn the_stripe_order_visits_every_stripe_whatever_their_count() {
        for n in [1, 2, 3, 7, 14, 16] {
            let l = Layout::new(Schema::Stream, "p", "a", 1000)
                .for_cluster("p", "a")
                .with_stripes(n);
            assert_eq!(l.stripes(), n);
            let mut s = 0;
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..n {
                s = l.stripe_after(s);
                seen.insert(s);
            }
            assert_eq!(seen.len(), n, "{n} stripes");
        }
        let keys = Layout::new(Schema::Keys, "p", "a", 1000).for_cluster("p", "a");
        assert_eq!((keys.stripes(), keys.stripe_after(0)), (1, 0));
    }

    #[test]
    fn stream_ids_parse() {
        assert_eq!(
            stream::parse_stream_id("1700000000000-3"),
            Some(Slot {
                major: 1_700_000_000_000,
                seq: 3
            })
        );
        assert_eq!(stream::parse_stream_id("junk"), None);
    }
}
