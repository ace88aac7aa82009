//! The flags every read command shares and what they resolve to.
//!
//! Owns: resolving backends, retention and prefix from flags and the config file (the same
//! `--backend NAME=URL@WEIGHT` syntax and file as `redtap run`), parsing times and filters, the
//! progress line, and the exit rule: [`Exit::Complete`] (0) when every backend answered,
//! [`Exit::Partial`] (2) when some did not — the others' results are still printed and each
//! failure is named on stderr — and [`CliError`] for usage (64) or output (1) errors.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::output;
use super::read::Selection;
use super::{Failure, Filter, Outcome, Progress, Sources, Window};
use crate::config::{self, ConfigError, Schema};

/// How a read command ended, when it could print an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every backend answered: exit 0.
    Complete,
    /// Some backend did not; the rest was printed: exit 2.
    Partial,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Complete => 0,
            Exit::Partial => 2,
        }
    }

    pub fn of(o: &Outcome) -> Exit {
        if o.is_partial() {
            Exit::Partial
        } else {
            Exit::Complete
        }
    }
}

/// A read command that could not answer at all.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad flags or config file: exit 64.
    #[error(transparent)]
    Usage(#[from] ConfigError),
    /// Writing the answer failed (other than a closed pipe, which ends quietly): exit 1.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

impl CliError {
    /// The process exit code.
    pub fn code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 64,
            CliError::Output(_) => 1,
        }
    }
}

/// Where to read: shared by every read command.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct SourceArgs {
    /// The TOML configuration file of `redtap run`: its backends, retention and prefix.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// A Redis backend as NAME=URL (NAME=URL@WEIGHT as for `redtap run` is taken too);
    /// replaces the file's backends.
    #[arg(long = "backend", value_name = "NAME=URL")]
    pub backends: Vec<String>,
    /// Records older than this are never shown (default: the file's, else 5m).
    #[arg(long)]
    pub retention: Option<String>,
    /// Key prefix (default: the file's, else redtap).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Only this agent's records (default: every agent found).
    #[arg(long)]
    pub agent: Option<String>,
    /// Only this layout (default: read both).
    #[arg(long, value_enum)]
    pub schema: Option<Schema>,
    /// Show scan progress on stderr even when it is not a terminal.
    #[arg(long)]
    pub progress: bool,
}

/// Which records: shared by `query`, `top` and `tail`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct FilterArgs {
    /// Only senders in this network (CIDR like 10.0.0.0/8, or one address).
    #[arg(long, value_name = "CIDR")]
    pub src: Option<String>,
    /// Only destinations in this network.
    #[arg(long, value_name = "CIDR")]
    pub dst: Option<String>,
    /// Only records whose source or destination port is N (like tcpdump's `port N`).
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
}

/// Where, which records and when: shared by `query` and `top`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct RangeArgs {
    /// Where to read.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Which records.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Start: a duration ago (5m) or an RFC 3339 time (default: the whole retention window).
    #[arg(long)]
    pub since: Option<String>,
    /// End: a duration ago (1m), an RFC 3339 time, or `now` (default now).
    #[arg(long)]
    pub until: Option<String>,
}

/// What [`RangeArgs`] resolve to.
pub struct Range {
    /// The backends and where in them.
    pub sources: Sources,
    /// Which records.
    pub filter: Filter,
    /// When, cut to retention.
    pub window: Window,
    /// The `now` the window was taken at, µs.
    pub now_us: u64,
}

impl RangeArgs {
    /// Resolve flags and file into what to read, now.
    pub fn resolve(&self) -> Result<Range, ConfigError> {
        let sources = sources(&self.source)?;
        let filter = filter(&self.filter)?;
        let now_us = crate::record::now_us();
        let window = window(&sources, &self.since, &self.until, now_us)?;
        Ok(Range {
            sources,
            filter,
            window,
            now_us,
        })
    }
}

/// Resolve `args` (flags over the file) into [`Sources`]. The file's `agent` and `schema`
/// describe one writer and are not used: a read covers every agent and both layouts unless
/// `--agent` / `--schema` narrow it.
pub fn sources(args: &SourceArgs) -> Result<Sources, ConfigError> {
    let file = match &args.config {
        Some(p) => config::read_file(p)?,
        None => config::FileConfig::default(),
    };
    let (backends, weights_known) = if args.backends.is_empty() {
        (file.backend.clone(), true)
    } else {
        let mut known = true;
        let mut backends = Vec::new();
        for s in &args.backends {
            // Readers need no weight: `NAME=URL` is enough (a URL may hold '@' itself, before
            // its host, so only digits after the last '@' are a weight).
            let weighted = s
                .rsplit_once('@')
                .is_some_and(|(_, w)| !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()));
            known &= weighted;
            backends.push(if weighted {
                config::parse_backend_flag(s)?
            } else {
                config::parse_backend_flag(&format!("{s}@1"))?
            });
        }
        (backends, known)
    };
    config::validate_backends(&backends)?;
    // Retention and prefix as `redtap run` reads them: the same defaults, the same checks, and
    // messages that name the flag or the file key that was typed.
    let flags = config::Settings {
        retention: args.retention.clone(),
        prefix: args.prefix.clone(),
        agent: args.agent.clone(),
        ..Default::default()
    };
    let no_env = |_: &str| None;
    let layers = config::Layers::new(&flags, &file, &no_env);
    let retention = config::parse_duration(&layers.retention()?)?;
    let prefix = config::key_part(layers.prefix()?)?;
    // The file's `agent` describes one writer: only `--agent` narrows a read.
    let agent = match layers.agent() {
        Ok(a) if a.origin == config::Origin::Flag => Some(config::key_part(a)?),
        _ => None,
    };
    Ok(Sources {
        backends,
        selection: Selection {
            prefix,
            agent,
            schema: args.schema,
        },
        retention,
        weights_known,
        admin: file.admin.filter(|a| a != "off"),
        admin_token: file.admin_token,
    })
}

/// Parse a filter's flags.
pub fn filter(args: &FilterArgs) -> Result<Filter, ConfigError> {
    let net = |flag: &str, v: &Option<String>| -> Result<Option<ipnet::IpNet>, ConfigError> {
        let Some(s) = v else { return Ok(None) };
        if let Ok(n) = s.parse::<ipnet::IpNet>() {
            return Ok(Some(n.trunc()));
        }
        s.parse::<std::net::IpAddr>()
            .map(|ip| Some(ip.into()))
            .map_err(|_| {
                ConfigError::Usage(format!(
                    "--{flag} {s:?} is not a network or address (e.g. 10.0.0.0/8, 192.0.2.7, 2001:db8::/32)"
                ))
            })
    };
    Ok(Filter {
        src: net("src", &args.src)?,
        dst: net("dst", &args.dst)?,
        port: args.port,
    })
}

/// A point in time as µs since the epoch: `now`, a duration ago (`5m`, `90s`), RFC 3339 with
/// a zone (`2026-11-24T03:40:00Z`, `2026-11-24T04:40:00+01:00`, fractions allowed), or a local
/// date or time in `tz` (`2026-11-24`, `2026-11-24 09:00`, `2026-11-24T09:00:00`).
///
/// A local input also returns a note saying how it was read, for stderr: tables show UTC.
pub fn parse_time(
    flag: &str,
    s: &str,
    now_us: u64,
    tz: &jiff::tz::TimeZone,
) -> Result<(u64, Option<String>), ConfigError> {
    let s = s.trim();
    if s == "now" {
        return Ok((now_us, None));
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok((now_us.saturating_sub(d.as_micros() as u64), None));
    }
    let us = |t: jiff::Timestamp| u64::try_from(t.as_microsecond()).ok();
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        if let Some(v) = us(t) {
            return Ok((v, None));
        }
    }
    let local = s
        .parse::<jiff::civil::DateTime>()
        .or_else(|_| s.parse::<jiff::civil::Date>().map(|d| d.at(0, 0, 0, 0)));
    if let Ok(dt) = local {
        if let Some((v, z)) = dt
            .to_zoned_datetime(tz.clone())
            .ok()
            .and_then(|z| Some((us(z.timestamp())?, z)))
        {
            let zone = tz
                .iana_name()
                .map_or_else(|| z.offset().to_string(), str::to_string);
            let note = format!(
                "--{flag} {s:?} read as local time ({zone}): {} (tables show UTC)",
                z.timestamp()
            );
            return Ok((v, Some(note)));
        }
    }
    Err(ConfigError::Usage(format!(
        "--{flag} {s:?} is not a time: use a duration ago (5m, 90s), now, a date (2026-11-24), a \
         local time (\"2026-11-24 09:00\"), or RFC 3339 with a zone (2026-11-24T09:00:00Z)"
    )))
}

/// [`parse_time`] in the system's time zone, with its note on stderr.
pub fn parse_time_here(flag: &str, s: &str, now_us: u64) -> Result<u64, ConfigError> {
    let (t, note) = parse_time(flag, s, now_us, &jiff::tz::TimeZone::system())?;
    if let Some(note) = note {
        eprintln!("redtap: {note}");
    }
    Ok(t)
}

/// The window of `--since` / `--until` under retention.
fn window(
    sources: &Sources,
    since: &Option<String>,
    until: &Option<String>,
    now: u64,
) -> Result<Window, ConfigError> {
    let since_us = match since {
        Some(s) => parse_time_here("since", s, now)?,
        None => 0,
    };
    let until_us = match until {
        Some(s) => parse_time_here("until", s, now)?,
        None => now,
    };
    if since_us > until_us {
        return Err(ConfigError::Usage(format!(
            "the window ends ({}, --until) before it starts ({}, --since): swap them?",
            output::rfc3339_us(until_us),
            output::rfc3339_us(since_us)
        )));
    }
    let w = Window::new(since_us, until_us, sources.retention, now);
    if w.is_empty() {
        eprintln!(
            "redtap: nothing to read: the window ends ({}) before it starts ({}, the later of \
             --since and the retention limit of {})",
            output::rfc3339_us(w.to_us),
            output::rfc3339_us(w.from_us),
            humantime::format_duration(sources.retention)
        );
    }
    Ok(w)
}

/// Print a one-document answer (`top`, `stats`) as a table or as JSON, name the backends that
/// failed on stderr, and say how the read ended.
pub fn print_document<J: serde::Serialize>(
    mut out: impl std::io::Write,
    format: super::output::DocFormat,
    table: impl FnOnce() -> String,
    json: impl FnOnce() -> J,
    outcome: &Outcome,
) -> Result<Exit, CliError> {
    let text = match format {
        super::output::DocFormat::Table => table(),
        super::output::DocFormat::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(&json()).expect("serializable")
        ),
    };
    finish_output(out.write_all(text.as_bytes()).and_then(|_| out.flush()))?;
    report(&outcome.failures);
    Ok(Exit::of(outcome))
}

/// Say on stderr how many packed entries could not be read, if any did not.
pub fn report_skipped(p: &Progress) {
    if let Some(note) = p.skipped_note() {
        eprintln!("redtap: {note}");
    }
}

/// Print each failure on stderr.
pub fn report(failures: &[Failure]) {
    for f in failures {
        eprintln!("redtap: {f}; its records are missing from this answer (partial, exit 2)");
    }
}

/// A progress line on stderr while a read runs: redrawn in place on a terminal, or one line a
/// second with `--progress` when stderr is not a terminal.
pub struct ProgressLine {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ProgressLine {
    pub fn start(forced: bool, p: &Arc<Progress>) -> Self {
        let stop = CancellationToken::new();
        let tty = std::io::stderr().is_terminal();
        if !tty && !forced {
            return ProgressLine { stop, task: None };
        }
        let (p, s) = (p.clone(), stop.clone());
        let every = Duration::from_millis(if tty { 200 } else { 1000 });
        let task = tokio::spawn(async move {
            let line = |p: &Progress| {
                format!(
                    "redtap: {} keys scanned, {} records read",
                    p.keys_scanned.load(Ordering::Relaxed),
                    p.records_read.load(Ordering::Relaxed)
                )
            };
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = s.cancelled() => break,
                    _ = tick.tick() => {
                        if tty {
                            eprint!("\r\x1b[2K{}", line(&p));
                        } else {
                            eprintln!("{}", line(&p));
                        }
                    }
                }
            }
            if tty {
                eprint!("\r\x1b[2K");
            } else {
                eprintln!("{} (done)", line(&p));
            }
        });
        ProgressLine {
            stop,
            task: Some(task),
        }
    }

    pub async fn finish(self) {
        self.stop.cancel();
        if let Some(t) = self.task {
            let _ = t.await;
        }
    }
}

/// Turn a write result into "keep going", "stop quietly" (closed pipe) or an error to return.
pub fn wrote(r: std::io::Result<()>, err: &mut Option<std::io::Error>) -> ControlFlow<()> {
    match r {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                *err = Some(e);
            }
            ControlFlow::Break(())
        }
    }
}

pub fn finish_output(r: std::io::Result<()>) -> Result<(), CliError> {
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_durations_rfc3339_dates_and_local_times() {
        let now = 1_800_000_000_000_000; // 2027-01-15T08:00:00Z
        let utc = jiff::tz::TimeZone::UTC;
        let t = |s: &str| parse_time("until", s, now, &utc).map(|(t, _)| t);
        assert_eq!(t("5m").unwrap(), now - 300_000_000);
        assert_eq!(t("now").unwrap(), now);
        assert_eq!(t("2027-01-15T08:00:00Z").unwrap(), now);
        assert_eq!(t("2027-01-15T09:00:00.5+01:00").unwrap(), now + 500_000);
        assert_eq!(t("2027-01-15T07:30:00-00:30").unwrap(), now);
        // Dates and times without a zone are local: here UTC, then UTC+2.
        assert_eq!(t("2027-01-15").unwrap(), now - 8 * 3_600_000_000);
        assert_eq!(t("2027-01-15 08:00:00").unwrap(), now);
        assert_eq!(t("2027-01-15T08:00").unwrap(), now);
        let plus2 = jiff::tz::TimeZone::fixed(jiff::tz::offset(2));
        let (v, note) = parse_time("since", "2027-01-15 10:00", now, &plus2).unwrap();
        assert_eq!(v, now);
        let note = note.expect("a local time is noted");
        assert!(
            note.contains("+02") && note.contains("2027-01-15T08:00:00Z"),
            "{note}"
        );
        assert_eq!(parse_time("since", "5m", now, &plus2).unwrap().1, None);
        let e = t("yesterday").unwrap_err();
        assert!(
            e.to_string().contains("RFC 3339") && e.to_string().contains("2026-11-24"),
            "{e}"
        );
    }

    #[test]
    fn filters_parse() {
        let f = filter(&FilterArgs {
            src: Some("10.1.2.3/8".into()),
            dst: Some("192.0.2.7".into()),
            port: Some(80),
        })
        .unwrap();
        assert_eq!(f.src.unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(f.dst.unwrap().to_string(), "192.0.2.7/32");
        let e = filter(&FilterArgs {
            src: Some("10.0.0/8".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("--src"), "{e}");
    }
}
