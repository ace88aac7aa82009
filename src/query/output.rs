//! Output of the read commands: tables for people (80 columns), JSON and CSV for programs.
//!
//! Owns every output format and its stability (documented in docs/query.md; a field is never
//! renamed or removed, new fields may be added). Pure: strings and writers in, no Redis.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use super::{Failure, Row, Stats, Top, TopBy};

/// How `query` and `tail` print records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RowFormat {
    /// Aligned columns, times in UTC.
    Table,
    /// One JSON object per line (JSON Lines).
    Json,
    /// Comma-separated values with a header line.
    Csv,
}

/// How `top` and `stats` print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DocFormat {
    /// Aligned columns.
    Table,
    /// One JSON document.
    Json,
}

/// RFC 3339 UTC with microseconds: `2026-11-24T03:41:05.123456Z`.
pub fn rfc3339_us(ts_us: u64) -> String {
    humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(ts_us)).to_string()
}

/// A table's time column: `03:41:05.123`, or `11-24 03:41:05.123` with the date.
fn table_time(ts_us: u64, with_date: bool) -> String {
    let s = rfc3339_us(ts_us);
    if with_date {
        format!("{} {}", &s[5..10], &s[11..23])
    } else {
        s[11..23].to_string()
    }
}

/// The UTC date of `ts_us`, to decide whether a table needs a date column.
pub fn utc_day(ts_us: u64) -> u64 {
    ts_us / 86_400_000_000
}

/// `4s`, `4m05s`, `3h07m`, `2d04h`.
pub fn age(now_us: u64, ts_us: u64) -> String {
    let s = now_us.saturating_sub(ts_us) / 1_000_000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `1.2MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

/// Writes records one at a time, so a long answer streams.
pub struct RowWriter<W: Write> {
    w: W,
    format: RowFormat,
    with_date: bool,
}

impl<W: Write> RowWriter<W> {
    /// A writer in `format`; `with_date` adds the date to the table's time column.
    pub fn new(w: W, format: RowFormat, with_date: bool) -> Self {
        RowWriter {
            w,
            format,
            with_date,
        }
    }

    /// The header line (table and CSV).
    pub fn header(&mut self) -> io::Result<()> {
        match self.format {
            RowFormat::Table => {
                let t = if self.with_date { 18 } else { 12 };
                writeln!(
                    self.w,
                    "{:<t$} {:<21} {:<21} {:<4} {:>4} BACKEND",
                    "TIME (UTC)", "SOURCE", "DESTINATION", "KIND", "LEN"
                )
            }
            RowFormat::Csv => writeln!(
                self.w,
                "ts,ts_us,src,sport,dst,dport,kind,len,backend,agent"
            ),
            RowFormat::Json => Ok(()),
        }
    }

    /// One record.
    pub fn row(&mut self, r: &Row) -> io::Result<()> {
        match self.format {
            RowFormat::Table => {
                let t = if self.with_date { 18 } else { 12 };
                let len = r.len.map(|l| l.to_string()).unwrap_or_default();
                writeln!(
                    self.w,
                    "{:<t$} {:<21} {:<21} {:<4} {:>4} {}",
                    table_time(r.ts_us, self.with_date),
                    SocketAddr::new(r.src, r.sport).to_string(),
                    SocketAddr::new(r.dst, r.dport).to_string(),
                    r.kind,
                    len,
                    r.backend
                )
            }
            RowFormat::Json => {
                serde_json::to_writer(&mut self.w, &row_json(r))?;
                self.w.write_all(b"\n")
            }
            RowFormat::Csv => writeln!(
                self.w,
                "{},{},{},{},{},{},{},{},{},{}",
                rfc3339_us(r.ts_us),
                r.ts_us,
                r.src,
                r.sport,
                r.dst,
                r.dport,
                csv_field(&r.kind),
                r.len.map(|l| l.to_string()).unwrap_or_default(),
                csv_field(&r.backend),
                csv_field(&r.agent)
            ),
        }
    }

    /// The closing line of a table: how many records, and whether the answer is partial.
    pub fn footer(&mut self, rows: u64, failures: &[Failure]) -> io::Result<()> {
        if self.format != RowFormat::Table {
            return Ok(());
        }
        writeln!(
            self.w,
            "-- {rows} record{}",
            if rows == 1 { "" } else { "s" }
        )?;
        partial_line(&mut self.w, failures)
    }

    /// Flush the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

fn partial_line(w: &mut impl Write, failures: &[Failure]) -> io::Result<()> {
    if failures.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = failures.iter().map(|f| f.backend.as_str()).collect();
    writeln!(
        w,
        "-- PARTIAL: no answer from backend {}; see stderr",
        names.join(", ")
    )
}

/// The JSON object of one record (one line of `query --format json`); see docs/query.md.
#[derive(Debug, serde::Serialize)]
pub struct RowJson<'a> {
    /// Capture time, RFC 3339 UTC with µs.
    pub ts: String,
    /// Capture time, µs since the epoch.
    pub ts_us: u64,
    /// Sender IP.
    pub src: std::net::IpAddr,
    /// Sender port.
    pub sport: u16,
    /// Destination IP.
    pub dst: std::net::IpAddr,
    /// Destination port.
    pub dport: u16,
    /// `conn` or TCP flags.
    pub kind: &'a str,
    /// Payload length (packet records), else null.
    pub len: Option<u32>,
    /// Backend it was read from.
    pub backend: &'a str,
    /// Agent that wrote it.
    pub agent: &'a str,
}

/// The JSON form of one record.
pub fn row_json(r: &Row) -> RowJson<'_> {
    RowJson {
        ts: rfc3339_us(r.ts_us),
        ts_us: r.ts_us,
        src: r.src,
        sport: r.sport,
        dst: r.dst,
        dport: r.dport,
        kind: &r.kind,
        len: r.len,
        backend: &r.backend,
        agent: &r.agent,
    }
}

/// A backend that did not answer, in JSON.
#[derive(Debug, serde::Serialize)]
pub struct FailureJson<'a> {
    /// Backend name.
    pub backend: &'a str,
    /// Its URL, password redacted.
    pub url: &'a str,
    /// What went wrong.
    pub error: &'a str,
}

fn failures_json(failures: &[Failure]) -> Vec<FailureJson<'_>> {
    failures
        .iter()
        .map(|f| FailureJson {
            backend: &f.backend,
            url: &f.url,
            error: &f.error,
        })
        .collect()
}

fn by_name(by: TopBy) -> (&'static str, &'static str) {
    match by {
        TopBy::Src => ("src", "SOURCE"),
        TopBy::Dst => ("dst", "DESTINATION"),
        TopBy::Pair => ("pair", "SOURCE > DESTINATION"),
    }
}

/// `top` as a table.
pub fn top_table(t: &Top, by: TopBy, now_us: u64) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>4}  {:>9}  {:>6}  {:<40}  LAST SEEN",
        "RANK",
        "COUNT",
        "SHARE",
        by_name(by).1
    );
    for (i, x) in t.talkers.iter().enumerate() {
        let share = if t.total == 0 {
            0.0
        } else {
            x.count as f64 / t.total as f64
        };
        let _ = writeln!(
            s,
            "{:>4}  {:>9}  {:>6}  {:<40}  {} ago",
            i + 1,
            x.count,
            pct(share),
            x.key,
            age(now_us, x.last_us)
        );
    }
    let _ = writeln!(
        s,
        "-- {} records from {} group{}; top {} shown",
        t.total,
        t.groups,
        if t.groups == 1 { "" } else { "s" },
        t.talkers.len()
    );
    let mut v = Vec::new();
    let _ = partial_line(&mut v, &t.outcome.failures);
    s.push_str(&String::from_utf8_lossy(&v));
    s
}

/// `top --format json`; see docs/query.md.
#[derive(Debug, serde::Serialize)]
pub struct TopJson<'a> {
    /// `src`, `dst` or `pair`.
    pub by: &'static str,
    /// Start of the window read (after retention), RFC 3339.
    pub from: String,
    /// End of the window read, RFC 3339.
    pub to: String,
    /// Records that passed the filters.
    pub total: u64,
    /// Distinct groups among them.
    pub groups: u64,
    /// Whether some backend did not answer.
    pub partial: bool,
    /// The backends that did not answer.
    pub failures: Vec<FailureJson<'a>>,
    /// The busiest groups, most records first.
    pub top: Vec<TalkerJson<'a>>,
}

/// One group of `top --format json`.
#[derive(Debug, serde::Serialize)]
pub struct TalkerJson<'a> {
    /// 1 for the busiest.
    pub rank: usize,
    /// `10.0.0.1`, `192.0.2.1:9000` or `10.0.0.1 > 192.0.2.1:9000`.
    pub key: &'a str,
    /// Records.
    pub count: u64,
    /// count / total.
    pub share: f64,
    /// First capture, RFC 3339.
    pub first: String,
    /// Last capture, RFC 3339.
    pub last: String,
}

/// `top` as one JSON document.
pub fn top_json(t: &Top, by: TopBy, from_us: u64, to_us: u64) -> TopJson<'_> {
    TopJson {
        by: by_name(by).0,
        from: rfc3339_us(from_us),
        to: rfc3339_us(to_us),
        total: t.total,
        groups: t.groups,
        partial: t.outcome.is_partial(),
        failures: failures_json(&t.outcome.failures),
        top: t
            .talkers
            .iter()
            .enumerate()
            .map(|(i, x)| TalkerJson {
                rank: i + 1,
                key: &x.key,
                count: x.count,
                share: if t.total == 0 {
                    0.0
                } else {
                    x.count as f64 / t.total as f64
                },
                first: rfc3339_us(x.first_us),
                last: rfc3339_us(x.last_us),
            })
            .collect(),
    }
}

/// `stats` as a table.
pub fn stats_table(s: &Stats) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10}  {:>6}  {:>6}  {:>9}  {:>6}  {:>8}  {:>8}  {:>9}",
        "BACKEND", "WEIGHT", "TARGET", "RECORDS", "SHARE", "OLDEST", "NEWEST", "MEMORY"
    );
    for b in &s.backends {
        if !b.reachable {
            let _ = writeln!(
                out,
                "{:<10}  {:>6}  {:>6}  {:>9}  unreachable (see stderr)",
                b.name,
                b.weight,
                pct(b.target_share),
                "-"
            );
            continue;
        }
        let opt_age = |t: Option<u64>| t.map(|t| age(s.now_us, t)).unwrap_or("-".into());
        let _ = writeln!(
            out,
            "{:<10}  {:>6}  {:>6}  {:>9}  {:>6}  {:>8}  {:>8}  {:>9}",
            b.name,
            b.weight,
            pct(b.target_share),
            b.records,
            b.share.map(pct).unwrap_or("-".into()),
            opt_age(b.oldest_us),
            opt_age(b.newest_us),
            b.used_memory.map(bytes).unwrap_or("-".into()),
        );
    }
    let weight: u64 = s.backends.iter().map(|b| b.weight as u64).sum();
    let _ = writeln!(
        out,
        "{:<10}  {:>6}  {:>6}  {:>9}",
        "TOTAL", weight, "", s.total
    );
    let mut agents: std::collections::BTreeMap<&str, u64> = Default::default();
    for b in &s.backends {
        for (a, n) in &b.agents {
            *agents.entry(a).or_default() += n;
        }
    }
    if !agents.is_empty() {
        let list: Vec<String> = agents.iter().map(|(a, n)| format!("{a} ({n})")).collect();
        let _ = writeln!(out, "-- agents: {}", list.join(", "));
    }
    let _ = writeln!(out, "-- OLDEST/NEWEST: age of the capture times held");
    let mut v = Vec::new();
    let _ = partial_line(&mut v, &s.outcome.failures);
    out.push_str(&String::from_utf8_lossy(&v));
    out
}

/// `stats --format json`; see docs/query.md.
#[derive(Debug, serde::Serialize)]
pub struct StatsJson<'a> {
    /// When the counts were taken, RFC 3339.
    pub now: String,
    /// The retention applied, ms.
    pub retention_ms: u64,
    /// Records inside retention, all reachable backends.
    pub total: u64,
    /// Whether some backend did not answer.
    pub partial: bool,
    /// The backends that did not answer.
    pub failures: Vec<FailureJson<'a>>,
    /// One entry per configured backend, in configured order.
    pub backends: Vec<BackendJson<'a>>,
}

/// One backend of `stats --format json`.
#[derive(Debug, serde::Serialize)]
pub struct BackendJson<'a> {
    /// Name.
    pub name: &'a str,
    /// URL, password redacted.
    pub url: &'a str,
    /// Configured weight.
    pub weight: u32,
    /// weight / sum of weights.
    pub target_share: f64,
    /// Whether it answered.
    pub reachable: bool,
    /// Why not; null when reachable.
    pub error: Option<&'a str>,
    /// Records inside retention.
    pub records: u64,
    /// Records Redis holds, including any past retention not yet removed.
    pub held: u64,
    /// records / total; null when unreachable or when there are no records.
    pub share: Option<f64>,
    /// Oldest capture inside retention, RFC 3339, or null.
    pub oldest: Option<String>,
    /// Newest capture, RFC 3339, or null.
    pub newest: Option<String>,
    /// INFO memory used_memory in bytes (the whole instance), or null.
    pub used_memory: Option<u64>,
    /// Records inside retention per agent.
    pub agents: &'a std::collections::BTreeMap<String, u64>,
}

/// `stats` as one JSON document.
pub fn stats_json(s: &Stats, retention: Duration) -> StatsJson<'_> {
    StatsJson {
        now: rfc3339_us(s.now_us),
        retention_ms: retention.as_millis() as u64,
        total: s.total,
        partial: s.outcome.is_partial(),
        failures: failures_json(&s.outcome.failures),
        backends: s
            .backends
            .iter()
            .map(|b| BackendJson {
                name: &b.name,
                url: &b.url,
                weight: b.weight,
                target_share: b.target_share,
                reachable: b.reachable,
                error: b.error.as_deref(),
                records: b.records,
                held: b.held,
                share: b.share,
                oldest: b.oldest_us.map(rfc3339_us),
                newest: b.newest_us.map(rfc3339_us),
                used_memory: b.used_memory,
                agents: &b.agents,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(
            rfc3339_us(1_000_000_000_123_456),
            "2001-09-09T01:46:40.123456Z"
        );
        assert_eq!(table_time(1_000_000_000_123_456, false), "01:46:40.123");
        assert_eq!(
            table_time(1_000_000_000_123_456, true),
            "09-09 01:46:40.123"
        );
        assert_eq!(age(10_000_000_000, 10_000_000_000 - 65_000_000), "1m05s");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }

    #[test]
    fn table_rows_fit_80_columns() {
        let r = Row {
            ts_us: 1_000_000_000_123_456,
            src: "255.255.255.255".parse().unwrap(),
            sport: 65535,
            dst: "255.255.255.255".parse().unwrap(),
            dport: 65535,
            kind: "FSPA".into(),
            len: Some(9000),
            backend: "redis-1".into(),
            agent: "a".into(),
        };
        let mut w = RowWriter::new(Vec::new(), RowFormat::Table, true);
        w.header().unwrap();
        w.row(&r).unwrap();
        let out = String::from_utf8(w.w).unwrap();
        for line in out.lines() {
            assert!(line.len() <= 80, "{} columns: {line}", line.len());
        }
    }
}
