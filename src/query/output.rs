//! The output the read commands share: rows (`query`, `tail`) as tables for people (80
//! columns), JSON Lines and CSV for programs, and the helpers every table uses. `top` and `stats`
//! keep their own formats beside their work, in [`super::cmd`].
//!
//! Owns the row formats and their stability (documented in docs/query.md; a field is never
//! renamed or removed, new fields may be added). Pure: strings and writers in, no Redis.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use super::{Failure, Row};

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
pub fn table_time(ts_us: u64, with_date: bool) -> String {
    let s = rfc3339_us(ts_us);
    if with_date {
        format!("{} {}", &s[5..10], &s[11..23])
    } else {
        s[11..23].to_string()
    }
}

/// The milliseconds within the second of `ts_us` (the table's `.123`).
fn ts_ms_part(ts_us: u64) -> u64 {
    ts_us % 1_000_000 / 1000
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

pub fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

pub fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
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
    /// The last row's second and its RFC 3339 text up to the seconds (`2026-11-24T03:41:05`):
    /// rows come in capture order, so most share it, and formatting a date is the costliest
    /// part of a row.
    second: Option<(u64, String)>,
    /// A table row being built, kept for its allocation.
    line: String,
}

impl<W: Write> RowWriter<W> {
    /// A writer in `format`; `with_date` adds the date to the table's time column.
    pub fn new(w: W, format: RowFormat, with_date: bool) -> Self {
        RowWriter {
            w,
            format,
            with_date,
            second: None,
            line: String::new(),
        }
    }

    /// `ts_us`'s RFC 3339 text up to the seconds.
    fn second_text(&mut self, ts_us: u64) -> &str {
        let sec = ts_us / 1_000_000;
        if self.second.as_ref().is_none_or(|(s, _)| *s != sec) {
            let mut t = rfc3339_us(sec * 1_000_000);
            t.truncate(19);
            self.second = Some((sec, t));
        }
        self.second.as_ref().map_or("", |(_, t)| t.as_str())
    }

    /// [`rfc3339_us`] of `ts_us`, from the second's cached text.
    fn rfc3339(&mut self, ts_us: u64) -> String {
        let micros = ts_us % 1_000_000;
        format!("{}.{micros:06}Z", self.second_text(ts_us))
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
                // Written piece by piece (the same text as `table_time`, padded columns):
                // a table of millions of rows is mostly this function.
                let ms = ts_ms_part(r.ts_us);
                let with_date = self.with_date;
                let mut line = std::mem::take(&mut self.line);
                line.clear();
                let sec = self.second_text(r.ts_us);
                let (date, time) = (sec.get(5..10).unwrap_or(""), sec.get(11..19).unwrap_or(""));
                if with_date {
                    let _ = write!(line, "{date} ");
                }
                let _ = write!(
                    line,
                    "{time}.{ms:03} {:<21} {:<21} ",
                    SocketAddr::new(r.src, r.sport),
                    SocketAddr::new(r.dst, r.dport),
                );
                // TCP flags in brackets, as tcpdump prints them: a bare `A` (ACK) next to a
                // backend named `A` reads as a backend name.
                let kind_len = if r.kind == "conn" {
                    let _ = line.write_str("conn");
                    4
                } else {
                    let _ = write!(line, "[{}]", r.kind);
                    r.kind.chars().count() + 2
                };
                for _ in kind_len..4 {
                    let _ = line.write_str(" ");
                }
                match r.len {
                    Some(l) => {
                        let _ = write!(line, " {l:>4} ");
                    }
                    None => {
                        let _ = line.write_str("      ");
                    }
                }
                let _ = writeln!(line, "{}", r.backend);
                let done = self.w.write_all(line.as_bytes());
                self.line = line;
                done
            }
            RowFormat::Json => {
                let ts = self.rfc3339(r.ts_us);
                serde_json::to_writer(&mut self.w, &row_json_at(r, ts))?;
                self.w.write_all(b"\n")
            }
            RowFormat::Csv => {
                let ts = self.rfc3339(r.ts_us);
                writeln!(
                    self.w,
                    "{},{},{},{},{},{},{},{},{},{}",
                    ts,
                    r.ts_us,
                    r.src,
                    r.sport,
                    r.dst,
                    r.dport,
                    csv_field(&r.kind),
                    r.len.map(|l| l.to_string()).unwrap_or_default(),
                    csv_field(&r.backend),
                    csv_field(&r.agent)
                )
            }
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

pub fn partial_line(w: &mut impl Write, failures: &[Failure]) -> io::Result<()> {
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
    row_json_at(r, rfc3339_us(r.ts_us))
}

/// The same, with `ts` already formatted.
fn row_json_at(r: &Row, ts: String) -> RowJson<'_> {
    RowJson {
        ts,
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

pub fn failures_json(failures: &[Failure]) -> Vec<FailureJson<'_>> {
    failures
        .iter()
        .map(|f| FailureJson {
            backend: &f.backend,
            url: &f.url,
            error: &f.error,
        })
        .collect()
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
        // The widest IPv4 row: with the date column, common flags fit; without it, any.
        for (with_date, flags) in [(true, "PA"), (true, "SA"), (false, "FSPA")] {
            let r = Row {
                ts_us: 1_000_000_000_123_456,
                src: "255.255.255.255".parse().unwrap(),
                sport: 65535,
                dst: "255.255.255.255".parse().unwrap(),
                dport: 65535,
                kind: flags.into(),
                len: Some(9000),
                backend: "redis-1".into(),
                agent: "a".into(),
            };
            let mut w = RowWriter::new(Vec::new(), RowFormat::Table, with_date);
            w.header().unwrap();
            w.row(&r).unwrap();
            let out = String::from_utf8(w.w).unwrap();
            assert!(
                out.contains(&format!(" [{flags}] ")),
                "flags in brackets: {out}"
            );
            for line in out.lines() {
                assert!(line.len() <= 80, "{} columns: {line}", line.len());
            }
        }
    }

    /// The table row as it was first written (one `format!` a column): the fast writer must
    /// print exactly this.
    fn table_row_as_before(r: &Row, with_date: bool) -> String {
        let t = if with_date { 18 } else { 12 };
        let len = r.len.map(|l| l.to_string()).unwrap_or_default();
        let kind = if r.kind == "conn" {
            r.kind.to_string()
        } else {
            format!("[{}]", r.kind)
        };
        format!(
            "{:<t$} {:<21} {:<21} {:<4} {:>4} {}\n",
            table_time(r.ts_us, with_date),
            SocketAddr::new(r.src, r.sport).to_string(),
            SocketAddr::new(r.dst, r.dport).to_string(),
            kind,
            len,
            r.backend
        )
    }

    #[test]
    fn rows_print_as_they_always_did() {
        let mut rows = Vec::new();
        let mut ts = 1_795_492_181_588_311u64;
        for (src, dst) in [
            ("10.0.0.1", "192.0.2.1"),
            ("2001:db8::7", "2001:db8:ffff::1"),
            ("::ffff:10.1.2.3", "127.0.0.1"),
        ] {
            for kind in ["conn", "PA", "S", "FSRPAUEW", ".", "é", "odd,kind\"x"] {
                for len in [None, Some(0), Some(1460), Some(123_456)] {
                    rows.push(Row {
                        ts_us: ts,
                        src: src.parse().unwrap(),
                        sport: 65535,
                        dst: dst.parse().unwrap(),
                        dport: 9,
                        kind: kind.to_string().into(),
                        len,
                        backend: "redis-1".into(),
                        agent: "web,1".into(),
                    });
                    ts += 333_333_337; // several rows a second, and a new second now and then
                }
            }
        }
        for with_date in [false, true] {
            let mut w = RowWriter::new(Vec::new(), RowFormat::Table, with_date);
            let mut want = String::new();
            for r in &rows {
                w.row(r).unwrap();
                want.push_str(&table_row_as_before(r, with_date));
            }
            assert_eq!(String::from_utf8(w.w).unwrap(), want);
        }
        let mut w = RowWriter::new(Vec::new(), RowFormat::Json, false);
        let mut want = String::new();
        for r in &rows {
            w.row(r).unwrap();
            want.push_str(&serde_json::to_string(&row_json(r)).unwrap());
            want.push('\n');
        }
        assert_eq!(String::from_utf8(w.w).unwrap(), want);
        let mut w = RowWriter::new(Vec::new(), RowFormat::Csv, false);
        for r in &rows {
            w.row(r).unwrap();
        }
        let out = String::from_utf8(w.w).unwrap();
        for (line, r) in out.lines().zip(&rows) {
            assert!(line.starts_with(&format!("{},{},", rfc3339_us(r.ts_us), r.ts_us)));
        }
    }
}
