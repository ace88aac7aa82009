//! The keys layout (`schema = keys`): one string key per record,
//! `<prefix>:ev:<agent>:<ts_us>:<seq>`, holding a JSON object, with an absolute expiry.
//!
//! Owns the key names and their parsing, the `SET … PXAT … NX` that stores a record, and the
//! parsing of a stored value into a [`Decoded`] record. It never talks to Redis.

use std::fmt::Write as _;
use std::net::IpAddr;

use redis::Pipeline;

use super::{kind_text, Decoded, Layout, Slot, StackBuf};
use crate::record::{Kind, Record};

/// The key-name prefix of an agent: `<prefix>:ev:<agent>:`.
pub fn keys_prefix(prefix: &str, agent: &str) -> String {
    format!("{prefix}:ev:{agent}:")
}

/// `<agent>:<ts_us>:<seq>` (a key name after `<prefix>:ev:`) → its parts.
pub fn parse_key_rest(rest: &str) -> Option<(&str, u64, u64)> {
    let mut it = rest.rsplitn(3, ':');
    let seq = it.next()?.parse().ok()?;
    let ts = it.next()?.parse().ok()?;
    let agent = it.next()?;
    (!agent.is_empty() && !agent.contains(':')).then_some((agent, ts, seq))
}

/// Queue `SET <key> <json> PXAT <capture + retention> NX`: `rec` at `slot`.
pub fn push_store(layout: &Layout, pipe: &mut Pipeline, rec: &Record, slot: Slot) {
    let mut src = StackBuf::new();
    let mut dst = StackBuf::new();
    let _ = write!(src, "{}", rec.src.ip());
    let _ = write!(dst, "{}", rec.dst.ip());
    let mut flags = StackBuf::new();
    let kind = kind_text(rec, &mut flags);
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
        .arg(layout.key_name(slot))
        .arg(value)
        .arg("PXAT")
        .arg(layout.expire_at_ms(rec))
        .arg("NX");
}

/// The value the keys layout stores.
#[derive(serde::Deserialize)]
struct KeyValue {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    ts: u64,
    kind: String,
    #[serde(default)]
    len: Option<u32>,
}

/// A stored value → the record it holds; `None` if it is not the JSON the writer stores.
pub fn decode(v: &[u8]) -> Option<Decoded> {
    let k: KeyValue = serde_json::from_slice(v).ok()?;
    Some(Decoded {
        ts_us: k.ts,
        src: k.src,
        sport: k.sport,
        dst: k.dst,
        dport: k.dport,
        kind: k.kind,
        len: k.len,
    })
}

/// The `ts` and `sport` of a value read back by GET; (0, 0), which matches no record, if it is
/// not one of ours.
pub fn check_answer(json: &[u8]) -> (u64, u16) {
    #[derive(serde::Deserialize)]
    struct TsSport {
        ts: u64,
        sport: u16,
    }
    serde_json::from_slice::<TsSport>(json)
        .map(|v| (v.ts, v.sport))
        .unwrap_or((0, 0))
}
