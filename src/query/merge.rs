//! The k-way merge: every backend (and every agent in it) read at once, handed on in capture-time
//! order.
//!
//! Owns the reader tasks' lifetimes and the memory bound of a read (sources × [`PAGES_AHEAD`]
//! messages, each a page of [`PAGE`](super::PAGE) rows or one bucket — a second of one agent's
//! records — plus [`read::BUCKETS_AHEAD`] buckets being read per source). Never formats, never
//! writes to Redis.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::ops::ControlFlow;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::read::{self, BackendError, Holdings};
use super::{Failure, Filter, Outcome, Progress, Row, Sources, Window};

/// Pages (or whole buckets) a reader may hand on ahead of the merge.
pub const PAGES_AHEAD: usize = 2;

/// One ordered source of rows: a page receiver fed by a reader task.
struct Cursor {
    backend: usize,
    rx: mpsc::Receiver<Result<Vec<Row>, BackendError>>,
    buf: VecDeque<Row>,
}

/// Read every backend in `window`, merge in capture-time order and hand each row that passes
/// `filter` to `emit` until it breaks. Ties break by backend order, then agent.
///
/// Memory is bounded by sources × ([`PAGES_AHEAD`] + [`read::BUCKETS_AHEAD`]) pages or buckets
/// (a bucket holds one second of one agent's records; plus, in the keys schema, 24 bytes per key
/// name in the window: key names come unordered from SCAN and must be sorted).
pub async fn read_merged(
    sources: &Sources,
    window: Window,
    filter: &Filter,
    progress: &Arc<Progress>,
    mut emit: impl FnMut(Row) -> ControlFlow<()>,
) -> Outcome {
    let mut outcome = Outcome::default();
    if window.is_empty() {
        return outcome;
    }
    let mut cursors = Vec::new();
    for (i, found) in discover_all(sources, Some(window), progress).await {
        let b = &sources.backends[i];
        match found {
            Err(e) => outcome.fail(Failure::new(b, &e)),
            Ok((conn, holdings)) => {
                for rx in read::spawn_readers(
                    conn,
                    b.name.as_str().into(),
                    &sources.selection,
                    holdings,
                    window,
                    filter.clone(),
                    progress.clone(),
                    PAGES_AHEAD,
                ) {
                    cursors.push(Cursor {
                        backend: i,
                        rx,
                        buf: VecDeque::new(),
                    });
                }
            }
        }
    }

    let mut heap = BinaryHeap::new();
    for (c, cursor) in cursors.iter_mut().enumerate() {
        if let Some(ts) = refill(cursor, sources, &mut outcome).await {
            heap.push(Reverse((ts, c)));
        }
    }
    while let Some(Reverse((_, c))) = heap.pop() {
        let cursor = &mut cursors[c];
        let row = cursor
            .buf
            .pop_front()
            .expect("a cursor in the heap has a row");
        outcome.rows += 1;
        if emit(row).is_break() {
            break;
        }
        let next = match cursor.buf.front() {
            Some(r) => Some(r.ts_us),
            None => refill(cursor, sources, &mut outcome).await,
        };
        if let Some(ts) = next {
            heap.push(Reverse((ts, c)));
        }
    }
    outcome
}

/// Wait for the cursor's next page; the timestamp of its first row, or `None` at its end.
async fn refill(cursor: &mut Cursor, sources: &Sources, outcome: &mut Outcome) -> Option<u64> {
    match cursor.rx.recv().await {
        Some(Ok(page)) => {
            cursor.buf.extend(page);
            cursor.buf.front().map(|r| r.ts_us)
        }
        Some(Err(e)) => {
            outcome.fail(Failure::new(&sources.backends[cursor.backend], &e));
            None
        }
        None => None,
    }
}

/// Connect to and discover every backend at once; results in backend order.
pub(crate) async fn discover_all(
    sources: &Sources,
    window: Option<Window>,
    progress: &Arc<Progress>,
) -> Vec<(
    usize,
    Result<(crate::connect::Conn, Holdings), BackendError>,
)> {
    let mut tasks = Vec::new();
    for b in &sources.backends {
        let (b, sel, progress) = (b.clone(), sources.selection.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = read::connect(&b).await?;
            let holdings = read::discover(&mut conn, &sel, window, &progress).await?;
            Ok((conn, holdings))
        }));
    }
    let mut out = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t
            .await
            .unwrap_or_else(|e| Err(BackendError::Internal(e.to_string())));
        out.push((i, r));
    }
    out
}
