//! `redtap query`: the records of a window, oldest first, as a table, JSON Lines or CSV.
//!
//! Owns its flags and `run`; the reading is `query::merge`/`read`, the formats `query::output`.
//! Never writes.

use std::io::Write;
use std::ops::ControlFlow;
use std::sync::Arc;

use crate::query::args::{
    finish_output, report, wrote, CliError, Exit, ProgressLine, Range, RangeArgs,
};
use crate::query::output::{self, RowFormat, RowWriter};
use crate::query::{merge, Outcome, Progress};

/// `redtap query`.
#[derive(Debug, Clone, clap::Args)]
pub struct QueryArgs {
    /// Where, which records and when.
    #[command(flatten)]
    pub range: RangeArgs,
    /// Print at most N records (the oldest N of the window).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: RowFormat,
}

/// `redtap query`: print the records of the window, oldest first, to `out`.
pub async fn run(args: &QueryArgs, out: impl Write) -> Result<Exit, CliError> {
    let Range {
        sources,
        filter,
        window,
        ..
    } = args.range.resolve()?;
    let with_date =
        output::utc_day(window.from_us.min(window.to_us)) != output::utc_day(window.to_us);
    let mut w = RowWriter::new(std::io::BufWriter::new(out), args.format, with_date);
    finish_output(w.header())?;
    let progress = Arc::new(Progress::default());
    let line = ProgressLine::start(args.range.source.progress, &progress);
    let mut err = None;
    let mut shown = 0u64;
    let limit = args.limit.unwrap_or(usize::MAX) as u64;
    let mut outcome = if limit == 0 {
        Outcome::default()
    } else {
        merge::read_merged(&sources, window, &filter, &progress, |r| {
            shown += 1;
            wrote(w.row(&r), &mut err)?;
            if shown >= limit {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await
    };
    line.finish().await;
    crate::query::args::report_skipped(&progress);
    if let Some(e) = err {
        return Err(e.into());
    }
    outcome.rows = shown;
    finish_output(w.footer(shown, &outcome.failures))?;
    finish_output(w.flush())?;
    report(&outcome.failures);
    Ok(Exit::of(&outcome))
}
