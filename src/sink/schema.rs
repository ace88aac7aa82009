//! The Redis data layouts (documented for users in docs/redis-schema.md — keep the two in step).
//!
//! Owns key names, entry IDs and the commands that store and trim records. It builds commands
//! only; it never talks to Redis.

use std::fmt::Write as _;

use redis::Pipeline;

use crate::config::Schema;
use crate::record::{Kind, Record};

/// Where a record goes inside one backend: a stream entry ID, or a key name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
    /// Stream schema: the stream key. Keys schema: the key-name prefix up to the timestamp.
    pub key: String,
    /// `<prefix>:probe:<agent>`: written (with a 2 s expiry) to test a down backend, since a
    /// Redis that refuses writes (OOM, read-only) still answers PING.
    pub probe_key: String,
    /// Retention in milliseconds.
    pub retention_ms: u64,
    /// The last slot handed out; slots only grow, so a retried write reuses its slot and a new
    /// record never takes an old one.
    last: Slot,
    /// The newest capture (ms) whose expiry was last sent for the stream key.
    expiry_sent_ms: u64,
}

/// How far the newest capture moves on before the stream key's expiry is pushed out again.
pub const EXPIRY_STEP_MS: u64 = 100;

/// The stream key of an agent: `<prefix>:events:<agent>`.
pub fn stream_key(prefix: &str, agent: &str) -> String {
    format!("{prefix}:events:{agent}")
}

/// The key-name prefix of an agent in the keys schema: `<prefix>:ev:<agent>:`.
pub fn keys_prefix(prefix: &str, agent: &str) -> String {
    format!("{prefix}:ev:{agent}:")
}

impl Layout {
    /// The layout for `agent` under `prefix`.
    pub fn new(schema: Schema, prefix: &str, agent: &str, retention_ms: u64) -> Self {
        let key = match schema {
            Schema::Stream => stream_key(prefix, agent),
            Schema::Keys => keys_prefix(prefix, agent),
        };
        Layout {
            schema,
            key,
            probe_key: format!("{prefix}:probe:{agent}"),
            retention_ms,
            last: Slot { major: 0, seq: 0 },
            expiry_sent_ms: 0,
        }
    }

    /// Continue numbering after `slot` (e.g. the newest entry already in the stream).
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
            Slot {
                major: self.last.major,
                seq: self.last.seq + 1,
            }
        };
        self.last = slot;
        slot
    }

    /// Queue the command that stores `rec` at `slot`. Storing the same slot twice stores it
    /// once: XADD refuses an ID not above the stream's top, and SET … NX keeps the first value.
    pub fn push_store(&self, pipe: &mut Pipeline, rec: &Record, slot: Slot) {
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
                // Sized up front: one allocation per command instead of a string of reallocs.
                let mut cmd = redis::Cmd::with_capacity(17, self.key.len() + 128);
                cmd.arg("XADD")
                    .arg(&self.key)
                    .arg(id.as_str())
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
                let mut key = String::with_capacity(self.key.len() + 24);
                let _ = write!(key, "{}{}:{}", self.key, slot.major, slot.seq);
                pipe.cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("PXAT")
                    .arg(self.expire_at_ms(rec))
                    .arg("NX");
            }
        }
    }

    /// Queue what keeps a stream's key alive while this agent writes and lets it vanish once
    /// the agent stops: its expiry follows the newest entry (`newest_ms`, the newest capture
    /// this writer has stored, which only grows). Sent when the newest capture has moved on by
    /// [`EXPIRY_STEP_MS`], so the key may expire up to that much before its newest entry would —
    /// well inside the one-second retention promise. Nothing for the keys schema, whose keys
    /// each carry their own expiry.
    pub fn push_expiry(&mut self, pipe: &mut Pipeline, newest_ms: u64) {
        if self.schema == Schema::Stream && newest_ms >= self.expiry_sent_ms + EXPIRY_STEP_MS {
            pipe.cmd("PEXPIREAT")
                .arg(&self.key)
                .arg(newest_ms + self.retention_ms)
                .ignore();
            self.expiry_sent_ms = newest_ms;
        }
    }

    /// Forget which expiry was sent (its pipeline may have been lost): the next batch sends it.
    pub fn expiry_unknown(&mut self) {
        self.expiry_sent_ms = 0;
    }

    /// Queue an exact trim of every stream entry captured before `now − retention`.
    pub fn push_trim(&self, pipe: &mut Pipeline, now_ms: u64) {
        if self.schema == Schema::Stream {
            pipe.cmd("XTRIM")
                .arg(&self.key)
                .arg("MINID")
                .arg(now_ms.saturating_sub(self.retention_ms))
                .ignore();
        }
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
