//! `redtap top`: the busiest senders, destinations or pairs of a window.
//!
//! Aggregates as the rows stream past (one entry per group, never every row).

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::sync::Arc;

use crate::query::args::{print_document, CliError, Exit, ProgressLine, Range, RangeArgs};
use crate::query::output::{
    age, failures_json, partial_line, pct, rfc3339_us, DocFormat, FailureJson,
};
use crate::query::{merge, Filter, Outcome, Progress, Sources, Window};

/// `redtap top`.
#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    /// Where, which records and when.
    #[command(flatten)]
    pub range: RangeArgs,
    /// Group by sender IP, destination IP:port, or both.
    #[arg(long, value_enum, default_value = "src")]
    pub by: TopBy,
    /// How many groups to show.
    #[arg(
        short = 'n',
        long = "count",
        visible_alias = "top",
        default_value_t = 20
    )]
    pub n: usize,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: DocFormat,
}

/// What `top` groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopBy {
    /// The sender's IP.
    Src,
    /// The address and port reached (`IP:port`).
    Dst,
    /// Sender IP and the address:port it reached.
    Pair,
}

/// One line of `top`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Talker {
    /// The group: `10.0.0.1`, `10.0.0.2:9000` or `10.0.0.1 > 10.0.0.2:9000`.
    pub key: String,
    /// Records in the window.
    pub count: u64,
    /// Earliest capture, µs.
    pub first_us: u64,
    /// Latest capture, µs.
    pub last_us: u64,
}

/// The answer of `top`.
#[derive(Debug, Clone, PartialEq)]
pub struct Top {
    /// Records that passed the filter, all groups.
    pub total: u64,
    /// Distinct groups.
    pub groups: u64,
    /// The busiest `n` groups, most records first, ties by key.
    pub talkers: Vec<Talker>,
    /// How the read went.
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Group {
    Src(IpAddr),
    Dst(IpAddr, u16),
    Pair(IpAddr, IpAddr, u16),
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Group::Src(ip) => write!(f, "{ip}"),
            Group::Dst(ip, port) => write!(f, "{}", std::net::SocketAddr::new(*ip, *port)),
            Group::Pair(s, ip, port) => {
                write!(f, "{s} > {}", std::net::SocketAddr::new(*ip, *port))
            }
        }
    }
}

/// Count records per group over `window` and keep the `n` busiest. Memory: one entry per group.
pub async fn top(
    sources: &Sources,
    window: Window,
    filter: &Filter,
    by: TopBy,
    n: usize,
    progress: &Arc<Progress>,
) -> Top {
    let mut counts: HashMap<Group, (u64, u64, u64)> = HashMap::new();
    let outcome = merge::read_merged(sources, window, filter, progress, |r| {
        let g = match by {
            TopBy::Src => Group::Src(r.src),
            TopBy::Dst => Group::Dst(r.dst, r.dport),
            TopBy::Pair => Group::Pair(r.src, r.dst, r.dport),
        };
        let e = counts.entry(g).or_insert((0, u64::MAX, 0));
        e.0 += 1;
        e.1 = e.1.min(r.ts_us);
        e.2 = e.2.max(r.ts_us);
        ControlFlow::Continue(())
    })
    .await;
    let groups = counts.len() as u64;
    let mut all: Vec<(Group, (u64, u64, u64))> = counts.into_iter().collect();
    all.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(&b.0)));
    all.truncate(n);
    Top {
        total: outcome.rows,
        groups,
        talkers: all
            .into_iter()
            .map(|(g, (count, first_us, last_us))| Talker {
                key: g.to_string(),
                count,
                first_us,
                last_us,
            })
            .collect(),
        outcome,
    }
}

/// `redtap top`: the busiest groups of the window.
pub async fn run(args: &TopArgs, out: impl Write) -> Result<Exit, CliError> {
    let Range {
        sources,
        filter,
        window,
        now_us: now,
    } = args.range.resolve()?;
    let progress = Arc::new(Progress::default());
    let line = ProgressLine::start(args.range.source.progress, &progress);
    let t = top(&sources, window, &filter, args.by, args.n, &progress).await;
    line.finish().await;
    crate::query::args::report_skipped(&progress);
    print_document(
        out,
        args.format,
        || top_table(&t, args.by, now),
        || top_json(&t, args.by, window.from_us, window.to_us),
        &t.outcome,
    )
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
