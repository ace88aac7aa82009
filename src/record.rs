//! The captured record: who sent TCP traffic to us, where, and when.
//!
//! A [`Record`] is produced by capture and flows one way through the dispatcher to a sink. It is
//! small and `Copy` so the hot path moves it without allocating.
//!
//! Owns the record's fields, its TCP-flags text and the capture clock; never how a record is
//! stored (that is `layout`) or where it goes (`balance`).

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// One capture event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Capture time in microseconds since the Unix epoch.
    pub ts_us: u64,
    /// The sender: source IP and port.
    pub src: SocketAddr,
    /// The address the sender reached: destination IP and port.
    pub dst: SocketAddr,
    /// What was captured.
    pub kind: Kind,
}

/// What a record stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An accepted connection (connections capture mode).
    Conn,
    /// One TCP segment (packets capture mode).
    Segment {
        /// The TCP flags byte (FIN=0x01 … CWR=0x80).
        flags: u8,
        /// TCP payload length in bytes.
        len: u16,
    },
}

impl Record {
    /// Capture time in whole milliseconds since the Unix epoch.
    pub fn ts_ms(&self) -> u64 {
        self.ts_us / 1000
    }

    /// The `kind` field as stored in Redis: `conn`, or the TCP flags such as `S`, `PA`, `FA`.
    pub fn kind_str(&self) -> std::borrow::Cow<'static, str> {
        match self.kind {
            Kind::Conn => "conn".into(),
            Kind::Segment { flags, .. } => flags_str(flags).into(),
        }
    }
}

/// TCP flags in tcpdump's order of letters: `S`, `A`, `PA`, `FA`, `R`, `SA`…
///
/// Letters: F(IN) S(YN) R(ST) P(SH) A(CK) U(RG) E(CE) W (CWR). A segment with no flag set is `.`.
pub fn flags_str(flags: u8) -> String {
    let mut s = String::new();
    write_flags(&mut s, flags);
    s
}

/// Write the letters of [`flags_str`] into `out` without allocating.
pub fn write_flags(out: &mut impl std::fmt::Write, flags: u8) {
    const LETTERS: [(u8, char); 8] = [
        (0x01, 'F'),
        (0x02, 'S'),
        (0x04, 'R'),
        (0x08, 'P'),
        (0x10, 'A'),
        (0x20, 'U'),
        (0x40, 'E'),
        (0x80, 'W'),
    ];
    if flags == 0 {
        let _ = out.write_char('.');
    }
    for (bit, c) in LETTERS {
        if flags & bit != 0 {
            let _ = out.write_char(c);
        }
    }
}

/// The current wall-clock time in microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_read_like_tcpdump() {
        assert_eq!(flags_str(0x02), "S");
        assert_eq!(flags_str(0x12), "SA");
        assert_eq!(flags_str(0x18), "PA");
        assert_eq!(flags_str(0x11), "FA");
        assert_eq!(flags_str(0x04), "R");
        assert_eq!(flags_str(0x00), ".");
    }
}
