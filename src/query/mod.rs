//! Reading records back: `redtap query`, `top`, `tail` and `stats`, across every backend.
//!
//! Owns: what a read-back [`Row`] is, the time window and filters a read applies, and the
//! failure accounting every read command shares. It only reads; it never writes, trims or expires
//! anything, and it shares nothing with the capture pipeline except the layouts in
//! [`crate::layout`].
//!
//! Layout:
//! - this module: the shared model — [`Row`], [`Sources`] (what to read), [`Window`],
//!   [`Filter`], [`Failure`], [`Outcome`], [`Progress`].
//! - [`args`]: the flags every read command shares (`--config`, `--backend`, `--since`…), their
//!   resolution into [`Sources`], [`Window`] and [`Filter`], the progress line and the exit rule.
//! - [`read`]: one backend — connect, discover agents and keys, page through ranges, parse.
//! - [`merge`]: many backends (and agents) into one capture-time-ordered sequence.
//! - [`output`]: the row formats `query` and `tail` share (table, JSON Lines, CSV) and the
//!   table helpers; formatting never touches Redis.
//! - [`cmd`]: one file per command — its flags, its work, its output — [`cmd::query`],
//!   [`cmd::top`], [`cmd::tail`], [`cmd::stats`].
//!
//! Retention is enforced here, not trusted to Redis: a record captured at `t` is shown only while
//! `now < t + retention`, even if Redis still holds it. A backend that fails is reported in
//! [`Outcome::failures`]; the others still answer.

pub mod args;
pub mod cmd;
pub mod merge;
pub mod output;
pub mod read;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::config::{BackendConfig, Schema};
use read::{BackendError, Selection};

/// Records a reader task fetches per round trip (XRANGE COUNT, MGET size).
pub const PAGE: usize = 1000;

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
    /// `conn`, or TCP flags such as `S`, `PA` (packets capture). Borrowed from static text
    /// whenever it can be: a read makes millions of rows.
    pub kind: std::borrow::Cow<'static, str>,
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
    /// Whether every backend came with its weight (`--backend NAME=URL` alone has none: readers
    /// do not need one); `stats` shows no target without them.
    pub weights_known: bool,
    /// The admin API of the agent that writes here, from the config file: where `stats` finds
    /// the weights in force.
    pub admin: Option<String>,
    /// Its bearer token, from the config file.
    pub admin_token: Option<String>,
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
    pub(crate) fn new(b: &BackendConfig, e: &BackendError) -> Self {
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

    pub(crate) fn fail(&mut self, f: Failure) {
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
    /// Packed entries that did not decode (malformed, or a newer format version): their
    /// records are missing from the answer.
    pub entries_skipped: AtomicU64,
    /// Why the first of them did not.
    pub skip_reason: std::sync::Mutex<Option<String>>,
}

impl Progress {
    pub(crate) fn add_keys(&self, n: u64) {
        self.keys_scanned.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_records(&self, n: u64) {
        self.records_read.fetch_add(n, Ordering::Relaxed);
    }
    /// Count an entry whose records could not be read, keeping the first reason.
    pub(crate) fn skip(&self, key: &str, id: &str, why: &dyn std::fmt::Display) {
        if self.entries_skipped.fetch_add(1, Ordering::Relaxed) == 0 {
            if let Ok(mut r) = self.skip_reason.lock() {
                *r = Some(format!("{key} entry {id}: {why}"));
            }
        }
    }
    /// The warning for skipped entries, if there were any.
    pub fn skipped_note(&self) -> Option<String> {
        let n = self.entries_skipped.load(Ordering::Relaxed);
        if n == 0 {
            return None;
        }
        let first = self.skip_reason.lock().ok().and_then(|r| r.clone());
        Some(format!(
            "{n} packed entr{} could not be read and {} records are missing from this answer \
             (first: {}); a newer redtap may read them",
            if n == 1 { "y" } else { "ies" },
            if n == 1 { "its" } else { "their" },
            first.unwrap_or_default()
        ))
    }
}

/// Which schemas a selection reads. The packed layout shares the stream layout's buckets (each
/// entry says which it is), so `--schema packed` and `--schema stream` read the same keys.
pub fn reads_schema(sel: Option<Schema>, s: Schema) -> bool {
    let keys_of = |x: Schema| match x {
        Schema::Packed => Schema::Stream,
        x => x,
    };
    sel.is_none_or(|x| keys_of(x) == keys_of(s))
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
