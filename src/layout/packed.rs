//! The packed layout (`schema = packed`, issue 11.1): the stream layout's bucket streams, each
//! entry a batch of one backend's records of one capture second in one binary value, field `p`,
//! format version 1.
//!
//! Owns the byte format (docs/redis-schema.md, "Packed format"), its encoder and decoder, and
//! the command that stores an entry (the stream layout's bucket-creating script or
//! `XADD … NOMKSTREAM`, with the one field). Which records form an entry, and the entry's
//! exactly-once handling, are the writer's (`sink::backlog`: its unit is an entry). It never
//! talks to Redis, and decoding never panics on bytes from outside.
//!
//! ```text
//! value   = version:u8 (=1)  kind:u8 (0 connections, 1 segments)  listen  count:varint  record*
//! listen  = 0  |  4 ip:[4] port:u16be  |  6 ip:[16] port:u16be
//! record  = tag:u8  dt:zigzag-varint  [src ip]  sport:u16be  [flags:u8 len:varint]  [dst]
//! tag     = bit0 src is IPv6 · bit1 src as the previous record's (no ip bytes)
//!           · bit2 own dst follows (not the listen address) · bit3 that dst is IPv6
//! dt      = first record: capture µs − entry ID ms × 1000; then: µs since the previous record
//! dst     = ip:[4|16] port:u16be
//! ```

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use redis::{Pipeline, Value};

use super::stream;
use super::{Bucket, Decoded, Layout, Slot, StackBuf};
use crate::record::{flags_str, Kind, Record};

/// The format version, the value's first byte.
pub const VERSION: u8 = 1;

const SRC_V6: u8 = 1;
const SRC_SAME: u8 = 2;
const OWN_DST: u8 = 4;
const DST_V6: u8 = 8;

/// Why a value does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackedError {
    /// A version this build does not know.
    #[error("packed format version {0} is not known (this build reads version 1)")]
    Version(u8),
    /// The bytes end or go wrong part way.
    #[error("packed value malformed at byte {0}")]
    Malformed(usize),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

/// Encode `recs` (all connections, or all segments) as the value of an entry whose ID has
/// millisecond `entry_ms`; `listen`, if given, is written once and left out of every record
/// that reached it.
pub fn encode(recs: &[Record], entry_ms: u64, listen: Option<SocketAddr>) -> Vec<u8> {
    let segments = recs.iter().any(|r| matches!(r.kind, Kind::Segment { .. }));
    let mut out = Vec::with_capacity(24 + recs.len() * 12);
    out.push(VERSION);
    out.push(segments as u8);
    match listen {
        None => out.push(0),
        Some(l) => {
            out.push(if l.is_ipv4() { 4 } else { 6 });
            put_ip(&mut out, l.ip());
            out.extend_from_slice(&l.port().to_be_bytes());
        }
    }
    put_varint(&mut out, recs.len() as u64);
    let mut prev_ts = (entry_ms as i128 * 1000) as i64;
    let mut prev_src: Option<IpAddr> = None;
    for r in recs {
        let mut tag = 0;
        if r.src.is_ipv6() {
            tag |= SRC_V6;
        }
        let same = prev_src == Some(r.src.ip());
        if same {
            tag |= SRC_SAME;
        }
        let own_dst = listen != Some(r.dst);
        if own_dst {
            tag |= OWN_DST;
            if r.dst.is_ipv6() {
                tag |= DST_V6;
            }
        }
        out.push(tag);
        put_varint(&mut out, zigzag(r.ts_us as i64 - prev_ts));
        prev_ts = r.ts_us as i64;
        if !same {
            put_ip(&mut out, r.src.ip());
        }
        prev_src = Some(r.src.ip());
        out.extend_from_slice(&r.src.port().to_be_bytes());
        if segments {
            let (flags, len) = match r.kind {
                Kind::Segment { flags, len } => (flags, len),
                Kind::Conn => (0, 0),
            };
            out.push(flags);
            put_varint(&mut out, u64::from(len));
        }
        if own_dst {
            put_ip(&mut out, r.dst.ip());
            out.extend_from_slice(&r.dst.port().to_be_bytes());
        }
    }
    out
}

/// The field that holds an entry's packed value.
pub const FIELD: &str = "p";

/// Queue the command that stores the packed entry `value` at `slot` of bucket `bucket`: the
/// bucket-creating script when `create`, else `XADD … NOMKSTREAM` (as the stream layout).
pub fn push_store(
    layout: &Layout,
    pipe: &mut Pipeline,
    bucket: Bucket,
    value: &[u8],
    slot: Slot,
    create: bool,
) {
    let mut id = StackBuf::new();
    let _ = write!(id, "{}-{}", slot.major, slot.seq);
    let mut cmd = redis::Cmd::with_capacity(9, layout.key.len() + value.len() + 160);
    stream::store_head(&mut cmd, layout, bucket, create);
    cmd.arg(id.as_str()).arg(FIELD).arg(value);
    pipe.add_command(cmd);
}

/// The packed value among a stream entry's fields, if it is a packed entry.
pub fn value_of(fields: &Value) -> Option<&[u8]> {
    fn bytes(v: &Value) -> Option<&[u8]> {
        match v {
            Value::BulkString(b) => Some(b.as_slice()),
            _ => None,
        }
    }
    let is_field = |k: &Value| bytes(k) == Some(FIELD.as_bytes());
    match fields {
        Value::Array(flat) => flat
            .chunks_exact(2)
            .find(|p| is_field(&p[0]))
            .and_then(|p| bytes(&p[1])),
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| is_field(k))
            .and_then(|(_, v)| bytes(v)),
        _ => None,
    }
}

/// A cursor over a value's bytes.
struct Bytes<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PackedError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or(PackedError::Malformed(self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PackedError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PackedError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn varint(&mut self) -> Result<u64, PackedError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(PackedError::Malformed(self.at))
    }

    fn ip(&mut self, v6: bool) -> Result<IpAddr, PackedError> {
        Ok(if v6 {
            let b: [u8; 16] = self.take(16)?.try_into().expect("16 bytes");
            Ipv6Addr::from(b).into()
        } else {
            let b: [u8; 4] = self.take(4)?.try_into().expect("4 bytes");
            Ipv4Addr::from(b).into()
        })
    }
}

/// One record of a packed value, as decoded: plain data, no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedRecord {
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
    /// TCP segments: the flags byte and the payload length; `None` for an accepted connection.
    pub segment: Option<(u8, u32)>,
}

impl PackedRecord {
    /// As the readers see any stored record.
    pub fn decoded(&self) -> Decoded {
        let (kind, len) = match self.segment {
            Some((flags, len)) => (flags_str(flags), Some(len)),
            None => ("conn".to_string(), None),
        };
        Decoded {
            ts_us: self.ts_us,
            src: self.src,
            sport: self.sport,
            dst: self.dst,
            dport: self.dport,
            kind,
            len,
        }
    }
}

/// Decode the value of an entry whose ID has millisecond `entry_ms`.
pub fn decode(value: &[u8], entry_ms: u64) -> Result<Vec<Decoded>, PackedError> {
    let mut out = Vec::new();
    decode_into(value, entry_ms, &mut out)?;
    Ok(out.iter().map(PackedRecord::decoded).collect())
}

/// The listen address a value's header names, if it is a value of this version that names one.
pub fn listen_of(value: &[u8]) -> Option<SocketAddr> {
    let mut c = Bytes { b: value, at: 0 };
    if c.u8().ok()? != VERSION {
        return None;
    }
    c.u8().ok()?;
    match c.u8().ok()? {
        f @ (4 | 6) => {
            let ip = c.ip(f == 6).ok()?;
            Some(SocketAddr::new(ip, c.u16().ok()?))
        }
        _ => None,
    }
}

/// Decode the value of an entry whose ID has millisecond `entry_ms`, appending its records to
/// `out` (a buffer the caller reuses: the readers' path). All or nothing: on an error `out` is
/// as it was.
pub fn decode_into(
    value: &[u8],
    entry_ms: u64,
    out: &mut Vec<PackedRecord>,
) -> Result<(), PackedError> {
    let before = out.len();
    let r = decode_records(value, entry_ms, out);
    if r.is_err() {
        out.truncate(before);
    }
    r
}

fn decode_records(
    value: &[u8],
    entry_ms: u64,
    out: &mut Vec<PackedRecord>,
) -> Result<(), PackedError> {
    let mut c = Bytes { b: value, at: 0 };
    let version = c.u8()?;
    if version != VERSION {
        return Err(PackedError::Version(version));
    }
    let segments = match c.u8()? {
        0 => false,
        1 => true,
        _ => return Err(PackedError::Malformed(1)),
    };
    let listen = match c.u8()? {
        0 => None,
        f @ (4 | 6) => {
            let ip = c.ip(f == 6)?;
            Some((ip, c.u16()?))
        }
        _ => return Err(PackedError::Malformed(2)),
    };
    let count = c.varint()?;
    // Each record takes at least 4 bytes: a count beyond that is a lie, not an allocation.
    if count > (value.len() / 4) as u64 {
        return Err(PackedError::Malformed(c.at));
    }
    out.reserve(count as usize);
    let mut ts = (entry_ms as i128) * 1000;
    let mut prev_src: Option<IpAddr> = None;
    for _ in 0..count {
        let at = c.at;
        let tag = c.u8()?;
        ts += i128::from(unzigzag(c.varint()?));
        let ts_us = u64::try_from(ts).map_err(|_| PackedError::Malformed(at))?;
        let src = if tag & SRC_SAME != 0 {
            prev_src.ok_or(PackedError::Malformed(at))?
        } else {
            c.ip(tag & SRC_V6 != 0)?
        };
        prev_src = Some(src);
        let sport = c.u16()?;
        let segment = if segments {
            let flags = c.u8()?;
            let len = u32::try_from(c.varint()?).map_err(|_| PackedError::Malformed(at))?;
            Some((flags, len))
        } else {
            None
        };
        let (dst, dport) = if tag & OWN_DST != 0 {
            let ip = c.ip(tag & DST_V6 != 0)?;
            (ip, c.u16()?)
        } else {
            listen.ok_or(PackedError::Malformed(at))?
        };
        out.push(PackedRecord {
            ts_us,
            src,
            sport,
            dst,
            dport,
            segment,
        });
    }
    if c.at != value.len() {
        return Err(PackedError::Malformed(c.at));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::tests::samples;

    #[test]
    fn a_batch_reads_back_as_written() {
        let all = samples();
        let (conns, segs): (Vec<Record>, Vec<Record>) =
            all.into_iter().partition(|r| r.kind == Kind::Conn);
        for recs in [conns, segs] {
            let want: Vec<Decoded> = recs.iter().map(Decoded::of).collect();
            let ms = recs[0].ts_ms() + 3; // the ID may sit after the capture ms
            for listen in [None, Some(recs[0].dst), Some("[::1]:1".parse().unwrap())] {
                let v = encode(&recs, ms, listen);
                assert_eq!(v[0], VERSION);
                assert_eq!(decode(&v, ms).unwrap(), want, "listen {listen:?}");
                // Any cut is an error, never a panic or a shorter batch.
                for n in 0..v.len() {
                    assert!(decode(&v[..n], ms).is_err(), "cut at {n}");
                }
            }
        }
    }

    #[test]
    fn a_record_of_a_busy_second_takes_about_nine_to_twelve_bytes() {
        let recs: Vec<Record> = (0..512u64)
            .map(|i| Record {
                ts_us: 1_700_000_000_000_000 + i * 50 + i % 13,
                src: SocketAddr::new(Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8).into(), 1024),
                dst: "10.0.0.2:9000".parse().unwrap(),
                kind: Kind::Segment {
                    flags: 0x18,
                    len: 1460,
                },
            })
            .collect();
        let v = encode(&recs, recs[0].ts_ms(), Some(recs[0].dst));
        assert!(v.len() <= 512 * 12 + 16, "{} bytes", v.len());
    }

    #[test]
    fn mangled_values_are_errors_or_records_never_a_panic() {
        let valid = encode(&samples()[5..], 1_700_000_000_500, None);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut v = valid.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % v.len();
                v[i] = next() as u8;
            }
            v.truncate(1 + (next() as usize) % (v.len() + 8));
            let _ = decode(&v, next() >> 20);
            let noise: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
            let _ = decode(&noise, next() >> 20);
        }
    }

    #[test]
    fn a_stored_entry_reads_back_and_is_identified_by_its_first_record() {
        use crate::config::Schema;
        // One kind per entry, as the writer forms them.
        let recs: Vec<Record> = samples().into_iter().skip(1).take(3).collect();
        let mut l = Layout::new(Schema::Packed, "rt", "a", 60_000);
        let slot = l.next_slot(&recs[0]);
        let value = l.pack(&recs, slot);
        for create in [true, false] {
            let mut pipe = Pipeline::new();
            l.push_store(&mut pipe, &recs, &value, slot, 0, create);
            let args = &crate::layout::tests::args(&pipe)[0];
            let at = if create { 5 } else { 3 };
            let id = format!("{}-{}", slot.major, slot.seq);
            assert_eq!(args[at], id.as_bytes());
            assert_eq!(args[at + 1], b"p");
            assert_eq!(args[at + 2], value);
            let fields = Value::Array(vec![
                Value::BulkString(b"p".to_vec()),
                Value::BulkString(args[at + 2].clone()),
            ]);
            let got = decode(value_of(&fields).unwrap(), slot.major).unwrap();
            assert_eq!(got, recs.iter().map(Decoded::of).collect::<Vec<_>>());
            let xrange = Value::Array(vec![Value::Array(vec![
                Value::BulkString(id.into_bytes()),
                fields,
            ])]);
            assert_eq!(
                super::super::stream::check_answer(&xrange),
                Some((recs[0].ts_us, recs[0].src.port()))
            );
        }
    }

    #[test]
    fn unknown_versions_are_refused() {
        assert_eq!(decode(&[2, 0, 0, 0], 0), Err(PackedError::Version(2)));
    }
}
