//! `redtap tail`: new records as they arrive, until Ctrl-C.
//!
//! Owns its flags and the follow loop's hand-off to the output; never writes, never ends on its
//! own while backends answer.

use std::collections::HashSet;
use std::io::Write;
use std::ops::ControlFlow;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::query::args::{
    filter, finish_output, parse_time_here, sources, wrote, CliError, Exit, FilterArgs, SourceArgs,
};
use crate::query::output::{RowFormat, RowWriter};
use crate::query::read;
use crate::query::{Failure, Filter, Outcome, Row, Sources};
use crate::record::now_us;

/// `redtap tail`.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// Where to read.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Also show records captured since then (a duration ago or RFC 3339); default: only new.
    #[arg(long)]
    pub since: Option<String>,
    /// Which records.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: RowFormat,
}

/// What a tail reports besides rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailEvent {
    /// New records from one backend, in capture order.
    Rows(Vec<Row>),
    /// A backend stopped answering; it is retried.
    Down(Failure),
    /// A backend that was down answers again.
    Up(String),
}

/// How often a tail looks for new agents (streams) and new keys.
const TAIL_DISCOVER_EVERY: Duration = Duration::from_secs(1);

/// Keys schema: how late after its capture a key may appear and still be shown by a tail.
pub const TAIL_KEYS_LAG: Duration = Duration::from_secs(10);

/// Follow every backend from `start_us` until `shutdown`, handing events to `on_event` as they
/// come (rows in capture order per backend and batch; across backends, in arrival order).
///
/// Streams are followed with `XREAD BLOCK` from the last ID seen in each (on a Redis Cluster, a
/// non-blocking `XREAD` per hash slot on every primary at once, polled); keys by SCAN for names
/// not seen yet. Memory: the last ID per stream, and the keys seen in the last
/// [`TAIL_KEYS_LAG`].
pub async fn tail(
    sources: &Sources,
    filter: &Filter,
    start_us: u64,
    shutdown: CancellationToken,
    mut on_event: impl FnMut(TailEvent) -> ControlFlow<()>,
) -> Outcome {
    let (tx, mut rx) = mpsc::channel(64);
    let stop = shutdown.child_token();
    for b in &sources.backends {
        tokio::spawn(read::follow(
            b.clone(),
            sources.selection.clone(),
            sources.retention,
            filter.clone(),
            start_us,
            TAIL_DISCOVER_EVERY,
            TAIL_KEYS_LAG,
            tx.clone(),
            stop.clone(),
        ));
    }
    drop(tx);
    let mut outcome = Outcome::default();
    let mut down: HashSet<String> = HashSet::new();
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = rx.recv() => match ev { Some(ev) => ev, None => break },
        };
        match &ev {
            TailEvent::Rows(rows) => outcome.rows += rows.len() as u64,
            TailEvent::Down(f) => {
                if !down.insert(f.backend.clone()) {
                    continue; // already reported
                }
                outcome.fail(f.clone());
            }
            TailEvent::Up(name) => {
                if !down.remove(name) {
                    continue;
                }
            }
        }
        if on_event(ev).is_break() {
            break;
        }
    }
    stop.cancel();
    outcome
}

/// `redtap tail`: print new records as they arrive until `shutdown` (Ctrl-C). Failures are
/// reported on stderr when they happen; the exit is [`Exit::Partial`] if any backend was down
/// at some point.
pub async fn run(
    args: &TailArgs,
    out: impl Write,
    shutdown: CancellationToken,
) -> Result<Exit, CliError> {
    let sources = sources(&args.source)?;
    let filter = filter(&args.filter)?;
    let now = now_us();
    let start = match &args.since {
        Some(s) => parse_time_here("since", s, now)?,
        None => now,
    };
    let mut w = RowWriter::new(out, args.format, false);
    finish_output(w.header().and_then(|_| w.flush()))?;
    let mut err = None;
    let outcome = tail(&sources, &filter, start, shutdown, |ev| match ev {
        TailEvent::Rows(rows) => {
            for r in &rows {
                wrote(w.row(r), &mut err)?;
            }
            wrote(w.flush(), &mut err)
        }
        TailEvent::Down(f) => {
            eprintln!("redtap: {f}; retrying — its records are missing until it answers");
            ControlFlow::Continue(())
        }
        TailEvent::Up(name) => {
            eprintln!("redtap: backend {name} answers again");
            ControlFlow::Continue(())
        }
    })
    .await;
    if let Some(e) = err {
        return Err(e.into());
    }
    Ok(Exit::of(&outcome))
}
