//! One bucket entry of either kind → the records it holds, for the readers: the readable fields
//! of [`super::stream`] (any version) or a batch in the [`super::packed`] format. A bucket may
//! hold both during an upgrade, so the kind is told from each entry itself, not from a setting.
//!
//! Owns telling the two kinds apart (a packed entry has one field, [`PACKED_FIELD`]) and the
//! readers' decoding of an entry straight from the Redis reply, without a heap allocation per
//! field or per record (the read side's cost at millions of records, see BENCHMARKS.md). It
//! never talks to Redis and never panics on what Redis returns.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use redis::Value;

use super::packed::{self, PackedError, PackedRecord};
use super::stream::{self, parse_stream_id, Listen};

/// The one field of a packed entry, holding the binary value (docs/redis-schema.md).
pub const PACKED_FIELD: &str = "p";

/// A record read from an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
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
    /// `conn`, or TCP flags such as `S`, `PA`; an unknown kind as written. Borrowed (no
    /// allocation) unless an entry of an earlier version wrote a text other than `conn`.
    pub kind: Cow<'static, str>,
    /// TCP payload length, for packet records.
    pub len: Option<u32>,
}

/// Why an entry gave no records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skipped {
    /// Fields redtap does not write (another program's entry): skipped silently, as always.
    #[error("not a redtap record")]
    NotOurs,
    /// A packed value that does not decode: malformed, or a newer format version. Its records
    /// are lost to this reader, so callers count and report it.
    #[error(transparent)]
    Packed(#[from] PackedError),
}

/// The letters of a TCP flags byte ([`crate::record::flags_str`]), made once per byte value.
pub fn flags_text(flags: u8) -> &'static str {
    static TABLE: OnceLock<Vec<String>> = OnceLock::new();
    &TABLE.get_or_init(|| (0..=255u8).map(crate::record::flags_str).collect())[flags as usize]
}

/// A reply value's bytes, if it is a string.
fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The value of a packed entry's fields (one field, [`PACKED_FIELD`]), or `None` for any other
/// entry.
pub fn packed_value(fields: &Value) -> Option<&[u8]> {
    let (k, v) = match fields {
        Value::Array(flat) if flat.len() == 2 => (&flat[0], &flat[1]),
        Value::Map(m) if m.len() == 1 => (&m[0].0, &m[0].1),
        _ => return None,
    };
    (bytes(k)? == PACKED_FIELD.as_bytes()).then(|| bytes(v))?
}

/// Call `f` with each (name, value) field whose name and value are text; `None` if `fields`
/// is no field list, or `f` said stop.
fn each_field<'a>(
    fields: &'a Value,
    mut f: impl FnMut(&'a [u8], &'a str) -> Option<()>,
) -> Option<()> {
    let mut one = |k: &'a Value, v: &'a Value| match (bytes(k), bytes(v)) {
        (Some(k), Some(v)) => match std::str::from_utf8(v) {
            Ok(v) => f(k, v),
            Err(_) => Some(()),
        },
        _ => Some(()),
    };
    match fields {
        Value::Array(flat) => {
            for p in flat.chunks_exact(2) {
                one(&p[0], &p[1])?;
            }
        }
        Value::Map(m) => {
            for (k, v) in m {
                one(k, v)?;
            }
        }
        _ => return None,
    }
    Some(())
}

/// A readable entry at `id` in a bucket sent to `listen` → its record; the same rules as
/// [`stream::decode`] (which the writer's round-trip tests use), without its allocations.
fn readable(id: &str, fields: &Value, listen: Option<Listen>) -> Option<Item> {
    let (mut ts, mut us, mut sport, mut src, mut dst, mut dport) =
        (None, None, None, None, None, None);
    let (mut kind, mut len) = (None, None);
    each_field(fields, |k, v| {
        match k {
            b"ts" => ts = v.parse::<u64>().ok(),
            b"us" => us = v.parse::<i64>().ok(),
            b"sport" => sport = v.parse::<u16>().ok(),
            b"src" => src = v.parse::<IpAddr>().ok(),
            b"dst" => dst = v.parse::<IpAddr>().ok(),
            b"dport" => dport = v.parse::<u16>().ok(),
            b"kind" if v == "conn" => kind = Some(Cow::Borrowed("conn")),
            b"kind" => kind = Some(Cow::Owned(v.to_string())),
            b"flags" => kind = Some(Cow::Borrowed(flags_text(v.parse().ok()?))),
            b"len" => len = v.parse::<u32>().ok(),
            _ => {}
        }
        Some(())
    })?;
    let ts_us = match ts {
        Some(t) => t,
        None => {
            let ms = parse_stream_id(id)?.major;
            u64::try_from((ms as i128) * 1000 + us? as i128).ok()?
        }
    };
    let (dst, dport) = match (dst, dport) {
        (Some(d), Some(p)) => (d, p),
        _ => listen.map(|l| (l.ip(), l.port()))?,
    };
    Some(Item {
        ts_us,
        src: src?,
        sport: sport?,
        dst,
        dport,
        kind: kind.unwrap_or(Cow::Borrowed("conn")),
        len,
    })
}

fn item(r: &PackedRecord) -> Item {
    let (kind, len) = match r.segment {
        Some((flags, len)) => (flags_text(flags), Some(len)),
        None => ("conn", None),
    };
    Item {
        ts_us: r.ts_us,
        src: r.src,
        sport: r.sport,
        dst: r.dst,
        dport: r.dport,
        kind: Cow::Borrowed(kind),
        len,
    }
}

/// The listen address of the bucket whose first page (an XRANGE answer from `-`) is `first`:
/// what its first entry names ([`stream::bucket_listen`]), or, when that entry is packed, its
/// value's header.
pub fn bucket_listen(first: &Value) -> Option<Listen> {
    stream::bucket_listen(first).or_else(|| {
        let (_, fields) = *stream::entries(first).first()?;
        packed::listen_of(packed_value(fields)?)
    })
}

/// Decodes entries of either kind, reusing one buffer for packed batches.
#[derive(Debug, Default)]
pub struct EntryDecoder {
    batch: Vec<PackedRecord>,
}

impl EntryDecoder {
    /// The entry at `id` with `fields`, in a bucket sent to `listen` → each of its records to
    /// `f`, in stored order. A packed value is decoded whole before any record is handed on:
    /// an entry is never half read.
    pub fn decode(
        &mut self,
        id: &str,
        fields: &Value,
        listen: Option<Listen>,
        mut f: impl FnMut(Item),
    ) -> Result<(), Skipped> {
        match packed_value(fields) {
            Some(v) => {
                let ms = parse_stream_id(id).ok_or(Skipped::NotOurs)?.major;
                self.batch.clear();
                packed::decode_into(v, ms, &mut self.batch)?;
                self.batch.iter().for_each(|r| f(item(r)));
                Ok(())
            }
            None => {
                f(readable(id, fields, listen).ok_or(Skipped::NotOurs)?);
                Ok(())
            }
        }
    }

    /// The records of one entry, collected (for the few-entry reads: `stats`' ends of a bucket).
    pub fn items(
        &mut self,
        id: &str,
        fields: &Value,
        listen: Option<SocketAddr>,
    ) -> Result<Vec<Item>, Skipped> {
        let mut out = Vec::new();
        self.decode(id, fields, listen, |i| out.push(i))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{tests::samples, Decoded};
    use crate::record::Record;

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    fn fields(pairs: &[(&str, &str)]) -> Value {
        Value::Array(
            pairs
                .iter()
                .flat_map(|(k, v)| [bulk(k.as_bytes()), bulk(v.as_bytes())])
                .collect(),
        )
    }

    fn decoded(i: &Item) -> Decoded {
        Decoded {
            ts_us: i.ts_us,
            src: i.src,
            sport: i.sport,
            dst: i.dst,
            dport: i.dport,
            kind: i.kind.to_string(),
            len: i.len,
        }
    }

    #[test]
    fn readable_entries_read_as_the_stream_layout_decodes_them() {
        let listen: Option<Listen> = Some("10.0.0.2:9000".parse().unwrap());
        let cases: Vec<(&str, Value)> = vec![
            (
                "5-0",
                fields(&[("src", "10.0.0.1"), ("sport", "7"), ("us", "250")]),
            ),
            (
                "5-1",
                fields(&[
                    ("src", "::1"),
                    ("sport", "7"),
                    ("us", "-3"),
                    ("flags", "24"),
                ]),
            ),
            (
                "5-2",
                fields(&[("src", "::1"), ("sport", "7"), ("us", "1"), ("flags", "x")]),
            ),
            (
                "5-3",
                fields(&[
                    ("src", "::1"),
                    ("dst", "::2"),
                    ("sport", "1"),
                    ("dport", "2"),
                    ("ts", "3"),
                    ("kind", "SA"),
                    ("len", "9"),
                ]),
            ),
            ("5-4", fields(&[("src", "::1"), ("sport", "7")])),
            (
                "junk",
                fields(&[("src", "::1"), ("sport", "7"), ("us", "1")]),
            ),
            ("5-5", fields(&[("hello", "world")])),
            ("5-6", Value::Int(3)),
        ];
        let mut d = EntryDecoder::default();
        for (id, f) in &cases {
            for l in [None, listen] {
                let want = stream::decode(id, f, l);
                let got = d.items(id, f, l).ok().map(|v| decoded(&v[0]));
                assert_eq!(got, want, "{id} {f:?} {l:?}");
            }
        }
    }

    #[test]
    fn a_packed_entry_reads_as_its_records_and_a_bad_one_is_an_error() {
        let recs: Vec<Record> = samples()
            .into_iter()
            .filter(|r| r.kind != crate::record::Kind::Conn)
            .collect();
        let ms = recs[0].ts_ms();
        let v = packed::encode(&recs, ms, Some(recs[0].dst));
        let f = Value::Array(vec![bulk(b"p"), bulk(&v)]);
        assert_eq!(packed_value(&f), Some(&v[..]));
        let mut d = EntryDecoder::default();
        let got: Vec<Decoded> = d
            .items(&format!("{ms}-0"), &f, None)
            .unwrap()
            .iter()
            .map(decoded)
            .collect();
        assert_eq!(got, packed::decode(&v, ms).unwrap());
        assert_eq!(got, recs.iter().map(Decoded::of).collect::<Vec<_>>());
        let first = Value::Array(vec![Value::Array(vec![bulk(b"1-0"), f])]);
        assert_eq!(bucket_listen(&first), Some(recs[0].dst));

        let mut future = v.clone();
        future[0] = 2;
        let f = Value::Array(vec![bulk(b"p"), bulk(&future)]);
        assert_eq!(
            d.items("1-0", &f, None),
            Err(Skipped::Packed(PackedError::Version(2)))
        );
        let f = Value::Array(vec![bulk(b"p"), bulk(&v[..v.len() - 1])]);
        assert!(matches!(
            d.items("1-0", &f, None),
            Err(Skipped::Packed(PackedError::Malformed(_)))
        ));
    }

    #[test]
    fn flag_letters_come_from_the_table() {
        for b in 0..=255u8 {
            assert_eq!(flags_text(b), crate::record::flags_str(b));
        }
    }

    /// Random field lists (names redtap writes, values good and bad, now and then a packed
    /// field with noise, as arrays and as RESP3 maps): never a panic, and a readable entry
    /// always reads as [`stream::decode`] reads it.
    #[test]
    fn random_entries_never_panic_and_agree_with_the_stream_layout() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let names = [
            "src", "dst", "sport", "dport", "ts", "us", "kind", "flags", "len", "listen", "p", "x",
        ];
        let values = [
            "10.0.0.1",
            "::1",
            "::ffff:1.2.3.4",
            "0",
            "1",
            "-5",
            "65535",
            "65536",
            "24",
            "256",
            "conn",
            "PA",
            "",
            "1700000000123456",
            "18446744073709551615",
            "-9223372036854775808",
            "10.0.0.2:9000",
            "[::1]:80",
            "é",
        ];
        let ids = ["1700000000123-0", "0-0", "18446744073709551615-1", "x", "5"];
        let listen: Option<Listen> = Some("10.0.0.2:9000".parse().unwrap());
        let mut d = EntryDecoder::default();
        let mut records = 0;
        for _ in 0..20_000 {
            let n = next() % 6;
            let mut flat = Vec::new();
            // Mostly a plausible record, then fields that may spoil or complete it.
            for (k, v) in [("src", "10.0.0.1"), ("sport", "7"), ("us", "5")] {
                if next() % 10 != 0 {
                    flat.push(bulk(k.as_bytes()));
                    flat.push(bulk(v.as_bytes()));
                }
            }
            for _ in 0..n {
                flat.push(bulk(
                    names[(next() % names.len() as u64) as usize].as_bytes(),
                ));
                if next() % 10 == 0 {
                    let noise: Vec<u8> = (0..next() % 40).map(|_| next() as u8).collect();
                    flat.push(bulk(&noise));
                } else {
                    flat.push(bulk(
                        values[(next() % values.len() as u64) as usize].as_bytes(),
                    ));
                }
            }
            if next() % 7 == 0 {
                flat.pop(); // an odd count
            }
            let f = if next() % 3 == 0 {
                Value::Map(
                    flat.chunks_exact(2)
                        .map(|p| (p[0].clone(), p[1].clone()))
                        .collect(),
                )
            } else {
                Value::Array(flat)
            };
            let id = ids[(next() % ids.len() as u64) as usize];
            for l in [None, listen] {
                let got = d.items(id, &f, l);
                if packed_value(&f).is_none() {
                    let got = got.ok().map(|v| decoded(&v[0]));
                    records += got.is_some() as u32;
                    assert_eq!(got, stream::decode(id, &f, l), "{id} {f:?}");
                }
            }
        }
        assert!(
            records > 1_000,
            "only {records} entries were records: a weak test"
        );
    }
}
