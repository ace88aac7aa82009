//! `redtap stats`: what each backend holds against its weight.
//!
//! Owns its flags, the per-backend counts and their table; never writes (read-only, like
//! every read command).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::BackendView;
use crate::client;
use crate::query::args::{print_document, sources, CliError, Exit, ProgressLine, SourceArgs};
use crate::query::output::{
    age, bytes, failures_json, partial_line, pct, rfc3339_us, DocFormat, FailureJson,
};
use crate::query::read::{self, BackendError};
use crate::query::{retention_floor_us, Failure, Outcome, Progress, Sources};
use crate::record::now_us;

/// `redtap stats`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatsArgs {
    /// Where to read.
    #[command(flatten)]
    pub source: SourceArgs,
    /// The admin API of the agent writing here (ADDR:PORT or a URL), for the weights in force
    /// (default: the config file's `admin`). Without it TARGET shows the configured weights.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Bearer token for --admin (default: the config file's `admin_token`).
    #[arg(long, env = "REDTAP_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: DocFormat,
}

/// Where the weights of the TARGET column come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsFrom {
    /// The weights in force, from the agent's admin API at this URL.
    Live(String),
    /// The configured weights (`-c FILE` or `--backend …@WEIGHT`): a live change is not seen.
    Configured,
    /// None given (`--backend NAME=URL`): no target.
    Unknown,
}

/// What one backend holds, for `stats`.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendStats {
    /// Backend name.
    pub name: String,
    /// URL, password redacted.
    pub url: String,
    /// Its weight (see [`Stats::weights_from`]); `None` when not known.
    pub weight: Option<u32>,
    /// weight / sum of weights.
    pub target_share: Option<f64>,
    /// Whether it answered.
    pub reachable: bool,
    /// Why not, when it did not.
    pub error: Option<String>,
    /// Records still inside retention, all agents.
    pub records: u64,
    /// Records Redis holds, including any past retention not yet trimmed or expired.
    pub held: u64,
    /// records / records of all reachable backends; `None` when there are none.
    pub share: Option<f64>,
    /// Capture time of the oldest record inside retention, µs.
    pub oldest_us: Option<u64>,
    /// Capture time of the newest record, µs.
    pub newest_us: Option<u64>,
    /// `INFO memory` `used_memory`, bytes (the whole Redis instance, not only redtap's keys).
    pub used_memory: Option<u64>,
    /// Records inside retention per agent.
    pub agents: BTreeMap<String, u64>,
}

/// The answer of `stats`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// When it was taken, µs.
    pub now_us: u64,
    /// One entry per configured backend, in order.
    pub backends: Vec<BackendStats>,
    /// Records inside retention, all reachable backends.
    pub total: u64,
    /// Where the weights come from.
    pub weights_from: WeightsFrom,
    /// How the read went.
    pub outcome: Outcome,
}

/// Count what every backend holds. Streams are counted with XLEN (minus entries past
/// retention); keys with SCAN.
pub async fn stats(sources: &Sources, progress: &Arc<Progress>) -> Stats {
    let now = now_us();
    let floor = retention_floor_us(sources.retention, now);
    let mut tasks = Vec::new();
    for b in &sources.backends {
        let (b, sel, progress) = (b.clone(), sources.selection.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = read::connect(&b).await?;
            read::backend_stats(&mut conn, &sel, floor, &progress).await
        }));
    }
    let mut outcome = Outcome::default();
    let mut backends = Vec::new();
    for (b, t) in sources.backends.iter().zip(tasks) {
        let r = t
            .await
            .unwrap_or_else(|e| Err(BackendError::Internal(e.to_string())));
        let mut s = BackendStats {
            name: b.name.clone(),
            url: b.redacted_url(),
            weight: sources.weights_known.then_some(b.weight),
            target_share: None,
            reachable: r.is_ok(),
            error: None,
            records: 0,
            held: 0,
            share: None,
            oldest_us: None,
            newest_us: None,
            used_memory: None,
            agents: BTreeMap::new(),
        };
        match r {
            Ok(h) => {
                s.records = h.agents.values().sum();
                s.held = h.held;
                s.oldest_us = h.oldest_us;
                s.newest_us = h.newest_us;
                s.used_memory = h.used_memory;
                s.agents = h.agents;
            }
            Err(e) => {
                let f = Failure::new(b, &e);
                s.error = Some(f.error.clone());
                outcome.fail(f);
            }
        }
        backends.push(s);
    }
    let total: u64 = backends.iter().map(|b| b.records).sum();
    for b in &mut backends {
        if b.reachable && total > 0 {
            b.share = Some(b.records as f64 / total as f64);
        }
    }
    outcome.rows = total;
    let mut s = Stats {
        now_us: now,
        backends,
        total,
        weights_from: if sources.weights_known {
            WeightsFrom::Configured
        } else {
            WeightsFrom::Unknown
        },
        outcome,
    };
    s.set_targets();
    s
}

impl Stats {
    /// Take the weights in force from an agent's `GET /v1/backends` (at `admin`), by name.
    pub fn use_live_weights(&mut self, live: &[BackendView], admin: &str) {
        for b in &mut self.backends {
            b.weight = live.iter().find(|v| v.name == b.name).map(|v| v.weight);
        }
        self.weights_from = WeightsFrom::Live(admin.to_string());
        self.set_targets();
    }

    fn set_targets(&mut self) {
        let sum: u64 = self
            .backends
            .iter()
            .filter_map(|b| b.weight)
            .map(u64::from)
            .sum();
        for b in &mut self.backends {
            b.target_share = b.weight.filter(|_| sum > 0).map(|w| w as f64 / sum as f64);
        }
    }
}

/// `redtap stats`: what each backend holds against its weight.
pub async fn run(args: &StatsArgs, out: impl Write) -> Result<Exit, CliError> {
    let sources = sources(&args.source)?;
    let progress = Arc::new(Progress::default());
    let line = ProgressLine::start(args.source.progress, &progress);
    let mut s = stats(&sources, &progress).await;
    line.finish().await;
    crate::query::args::report_skipped(&progress);
    if let Some(admin) = args.admin.as_ref().or(sources.admin.as_ref()) {
        let url = client::admin_url(admin);
        let token = args.token.as_deref().or(sources.admin_token.as_deref());
        match client::backends(&url, token).await {
            Ok(live) => s.use_live_weights(&live, &url),
            Err(e) => eprintln!(
                "redtap: TARGET shows the configured weights, not the ones in force: {e:#}"
            ),
        }
    }
    print_document(
        out,
        args.format,
        || stats_table(&s),
        || stats_json(&s, sources.retention),
        &s.outcome,
    )
}

/// A number, or `-`.
fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
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
                "{:<10}  {:>6}  {:>6}  {:>9}  no answer (see stderr)",
                b.name,
                opt(b.weight),
                b.target_share.map(pct).unwrap_or("-".into()),
                "-"
            );
            continue;
        }
        let opt_age = |t: Option<u64>| t.map(|t| age(s.now_us, t)).unwrap_or("-".into());
        let _ = writeln!(
            out,
            "{:<10}  {:>6}  {:>6}  {:>9}  {:>6}  {:>8}  {:>8}  {:>9}",
            b.name,
            opt(b.weight),
            b.target_share.map(pct).unwrap_or("-".into()),
            b.records,
            b.share.map(pct).unwrap_or("-".into()),
            opt_age(b.oldest_us),
            opt_age(b.newest_us),
            b.used_memory.map(bytes).unwrap_or("-".into()),
        );
    }
    let weight: Option<u64> = s.backends.iter().map(|b| b.weight.map(u64::from)).sum();
    let _ = writeln!(
        out,
        "{:<10}  {:>6}  {:>6}  {:>9}",
        "TOTAL",
        opt(weight),
        "",
        s.total
    );
    let _ = match &s.weights_from {
        WeightsFrom::Live(url) => writeln!(out, "-- WEIGHT: in force now, from {url}"),
        WeightsFrom::Configured => writeln!(
            out,
            "-- WEIGHT: as configured; a live change shows with --admin ADDR"
        ),
        WeightsFrom::Unknown => writeln!(out, "-- WEIGHT: not given (--backend NAME=URL@WEIGHT)"),
    };
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
    /// Where the weights come from: `live` (the admin API at `admin`), `configured`, or `none`.
    pub weights_from: &'static str,
    /// The admin API the live weights came from, or null.
    pub admin: Option<&'a str>,
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
    /// Its weight (see `weights_from`); null when not known.
    pub weight: Option<u32>,
    /// weight / sum of weights; null when not known.
    pub target_share: Option<f64>,
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
        weights_from: match s.weights_from {
            WeightsFrom::Live(_) => "live",
            WeightsFrom::Configured => "configured",
            WeightsFrom::Unknown => "none",
        },
        admin: match &s.weights_from {
            WeightsFrom::Live(url) => Some(url),
            _ => None,
        },
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
